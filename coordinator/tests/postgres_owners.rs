//! Ownership on a PostgreSQL log several coordinators share: leases, claims and the fence,
//! at the log store level (two `PgLog`s on one database play two coordinators). The
//! processes-level proof (two `treatyd`, one paused with SIGSTOP) is in
//! `tests/tests/postgres_coordinators.rs`.
//!
//! Each test starts its own server; without PostgreSQL installed they skip with a message
//! outside CI and fail in CI (`CI=true`).

use std::collections::HashSet;
use std::time::Duration;
use treaty_coordinator::engine::types::Phase;
use treaty_coordinator::log::conformance::record;
use treaty_coordinator::log::postgres::{PgLog, PgLogOptions};
use treaty_coordinator::log::{LogError, LogStore};
use treaty_pg_harness::{PgOptions, PgServer};

fn server() -> Option<PgServer> {
    PgServer::start_for_test(PgOptions::default())
}

fn opts(lease_ms: u64) -> PgLogOptions {
    PgLogOptions {
        lease: Duration::from_millis(lease_ms),
        ..PgLogOptions::default()
    }
}

/// Ends the lease of `epoch` now, as if its coordinator had stopped renewing it long ago
/// (a paused process): the database's clock decides, so this is what a pause looks like.
async fn expire(url: &str, epoch: i64) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let task = tokio::spawn(conn);
    let n = client
        .execute(
            "UPDATE treaty_coordinators SET lease_until = now() - interval '1 second' \
             WHERE epoch = $1",
            &[&epoch],
        )
        .await
        .expect("expire the lease");
    assert_eq!(n, 1, "epoch {epoch} has a row");
    task.abort();
}

/// `(owner, owners)` of `gid` as stored.
async fn owners(url: &str, gid: &str) -> (i64, Vec<i64>) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let task = tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT owner, owners FROM treaty_tx WHERE gid = $1",
            &[&gid],
        )
        .await
        .expect("read the owners");
    task.abort();
    (row.get(0), row.get(1))
}

async fn claim_all(log: &PgLog, page: usize) -> Vec<String> {
    let mut all = Vec::new();
    loop {
        let got = log.claim(page).await.expect("claim");
        let n = got.len();
        all.extend(got.into_iter().map(|r| r.gid));
        if n < page {
            return all;
        }
    }
}

/// The fence: once another coordinator took its transactions over, a coordinator whose
/// lease ran out writes nothing (its write is refused whole, the record stays the new
/// owner's), its syncs fail too, so it stops; joining again gives it a new epoch that owns
/// nothing it did not claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_whose_lease_was_taken_over_writes_nothing() {
    let Some(server) = server() else { return };
    let url = server.create_database("fence").expect("create database");
    let a = PgLog::open(&url, opts(60_000)).await.expect("open a");
    let b = PgLog::open(&url, opts(60_000)).await.expect("open b");
    assert_ne!(a.epoch(), b.epoch(), "each coordinator has its own epoch");
    a.put(record("x", Phase::Active, 1), true)
        .await
        .expect("a writes its transaction");
    assert!(
        b.claim(10).await.expect("claim").is_empty(),
        "a live owner's transactions are not claimed"
    );

    expire(&url, a.epoch()).await;
    let claimed = claim_all(&b, 10).await;
    assert_eq!(claimed, ["x"], "b takes over what a owned");
    b.put(record("x", Phase::Committing, 2), true)
        .await
        .expect("the new owner writes");

    // `a` wakes up and carries on as if nothing happened.
    let refused = a.put(record("x", Phase::Aborting, 3), true).await;
    assert!(
        matches!(refused, Err(LogError::Fenced(_))),
        "the old owner's write is refused: {refused:?}"
    );
    let other = a.put(record("y", Phase::Active, 1), true).await;
    assert!(
        matches!(other, Err(LogError::Fenced(_))),
        "a fenced coordinator writes no other gid either: {other:?}"
    );
    assert!(
        matches!(a.sync().await, Err(LogError::Fenced(_))),
        "a fenced coordinator's sync fails, so that its runtime stops"
    );
    assert_eq!(
        b.get("x").await.expect("get").map(|r| r.phase),
        Some(Phase::Committing),
        "none of the old owner's writes landed"
    );
    assert_eq!(b.get("y").await.expect("get"), None);
    let (owner, history) = owners(&url, "x").await;
    assert_eq!(owner, b.epoch());
    assert_eq!(
        history,
        [a.epoch(), b.epoch()],
        "owned by a, then by b, never a again"
    );

    // Joining again: a new epoch, which may write what it starts, not what b owns.
    let old = a.epoch();
    a.rejoin().await.expect("rejoin");
    assert!(a.epoch() > old, "a new epoch after rejoining");
    a.put(record("y", Phase::Active, 1), true)
        .await
        .expect("a new epoch writes a new transaction");
    let stolen = a.put(record("x", Phase::Aborted, 4), true).await;
    assert!(
        matches!(stolen, Err(LogError::Fenced(_))),
        "nobody writes a record a live coordinator owns: {stolen:?}"
    );
    assert_eq!(
        b.get("x").await.expect("get").map(|r| r.phase),
        Some(Phase::Committing)
    );
}

/// Claims come in pages, take only non-terminal records of owners that are gone (a
/// coordinator that left is gone at once, without waiting for its lease), and two claimers
/// racing never take the same record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_are_paged_take_only_orphans_and_never_twice() {
    const N: usize = 40;
    let Some(server) = server() else { return };
    let url = server.create_database("claims").expect("create database");
    let gone = PgLog::open(&url, opts(60_000)).await.expect("open");
    for i in 0..N {
        gone.put(record(&format!("t{i:02}"), Phase::Active, 1), false)
            .await
            .expect("put");
    }
    gone.put(record("done", Phase::Committed, 2), true)
        .await
        .expect("put");
    let b = PgLog::open(&url, opts(60_000)).await.expect("open b");
    let c = PgLog::open(&url, opts(60_000)).await.expect("open c");
    assert!(b.claim(5).await.expect("claim").is_empty());
    gone.leave().await.expect("leave");

    let (mine, theirs) = tokio::join!(claim_all(&b, 3), claim_all(&c, 3));
    let (mine, theirs): (HashSet<_>, HashSet<_>) =
        (mine.into_iter().collect(), theirs.into_iter().collect());
    assert!(mine.is_disjoint(&theirs), "a record claimed twice");
    let all: HashSet<_> = mine.union(&theirs).cloned().collect();
    assert_eq!(all.len(), N, "every orphan claimed once");
    assert!(!all.contains("done"), "a finished record is nobody's work");
    assert!(claim_all(&b, 3).await.is_empty(), "nothing is left");
}

/// The fence is what makes a woken owner harmless: the test-only `skip_fence` mutation
/// (a coordinator that writes without it) overwrites the new owner's record, and the owners
/// history shows it (the check the chaos campaign makes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_fence_a_woken_owner_overwrites_and_the_history_shows_it() {
    let Some(server) = server() else { return };
    let url = server.create_database("nofence").expect("create database");
    let unfenced = PgLogOptions {
        skip_fence: true,
        ..opts(60_000)
    };
    let a = PgLog::open(&url, unfenced).await.expect("open a");
    let b = PgLog::open(&url, opts(60_000)).await.expect("open b");
    a.put(record("x", Phase::Active, 1), true)
        .await
        .expect("put");
    expire(&url, a.epoch()).await;
    assert_eq!(claim_all(&b, 10).await, ["x"]);
    b.put(record("x", Phase::Committing, 2), true)
        .await
        .expect("put");
    a.put(record("x", Phase::Aborting, 3), true)
        .await
        .expect("without the fence the stale write lands");
    let (_, history) = owners(&url, "x").await;
    assert_eq!(history, [a.epoch(), b.epoch(), a.epoch()]);
}
