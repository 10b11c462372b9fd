//! Two branches of one gid in one PostgreSQL barrier store (a transfer between two accounts
//! of the same bank instance): a delivery of one branch must not wait for a delivery of the
//! other. A 2PC delivery holds its lock for all its steps, and its handler may wait (up to
//! `lock_timeout`) for a row that another transaction's prepared branch holds; when the
//! sibling branch's commit queued behind it on one gid-wide lock, the PostgreSQL chaos
//! campaign livelocked (transactions stuck in Committing and Aborting, every commit
//! answering "locking the gid: lock timeout").
//!
//! Against a private PostgreSQL server (`treaty-pg-harness`); without PostgreSQL installed
//! the test skips with a message outside CI and fails in CI (`CI=true`).

use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::Request;
use treaty_pg_harness::{PgOptions, PgServer};
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_server::Participant as _;
use treaty_sdk::postgres::{PgStore, PgStoreOptions, BRANCH_LOCK_CLASS};
use treaty_sdk::{Participant, TwoPhase};

/// A prepare with payload `wait` blocks here until the test adds a permit.
static GATE: Semaphore = Semaphore::const_new(0);

/// Opens the gate when dropped, also when an assertion fails: a prepare left waiting would
/// keep its blocking thread, and the test's runtime could never shut down.
struct OpenOnDrop;

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        GATE.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

/// Branch locks granted to any session of the server.
async fn branch_locks_held(url: &str) -> i64 {
    branch_locks(url, true).await
}

/// Branch locks granted (`granted`) or waited for (`!granted`) by any session.
async fn branch_locks(url: &str, granted: bool) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted = $2 \
             AND classid = $1::bigint::oid",
            &[&i64::from(BRANCH_LOCK_CLASS), &granted],
        )
        .await
        .expect("read pg_locks")
        .get(0)
}

fn req(gid: &str, branch_id: u32, payload: &[u8]) -> pb::BranchRequest {
    pb::BranchRequest {
        gid: gid.to_string(),
        branch_id,
        handler: "debit".to_string(),
        payload: payload.to_vec().into(),
        attempt: 1,
        log_id: "log-1".to_string(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_is_not_delayed_by_a_delivery_of_another_branch_of_its_gid() {
    let Some(server) = PgServer::start_for_test(PgOptions::default()) else {
        return;
    };
    let _open = OpenOnDrop;
    let url = server
        .create_database("branches")
        .expect("create a database");
    let store = PgStore::connect_with(
        &url,
        PgStoreOptions::default().lock_timeout(Duration::from_secs(30)),
    )
    .await
    .expect("open the store");
    let participant = Participant::builder(store.clone())
        .two_phase(
            "debit",
            TwoPhase::<PgStore>::new()
                .prepare(async |_, _, payload| {
                    if payload == b"wait" {
                        GATE.acquire().await.expect("open").forget();
                    }
                    Ok(())
                })
                .commit(async |_, _, _| Ok(()))
                .abort(async |_, _, _| Ok(())),
        )
        .build()
        .expect("a participant");

    // Branch 0's prepare is in its business code (as one waiting for a row lock would be).
    let slow = {
        let p = participant.clone();
        tokio::spawn(async move { p.prepare(Request::new(req("g", 0, b"wait"))).await })
    };
    let start = tokio::time::Instant::now();
    while branch_locks_held(&url).await == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "branch 0's prepare never took its lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Branch 1 of the same gid, meanwhile: prepared, then committed, at once.
    let r = participant
        .prepare(Request::new(req("g", 1, b"go")))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(
        r.result(),
        pb::PrepareResult::Prepared,
        "branch 1's prepare waited for branch 0's delivery: {}",
        r.message
    );
    let r = participant
        .commit(Request::new(req("g", 1, b"go")))
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Done, "{}", r.message);

    // A duplicate of branch 0's prepare (the coordinator's call timed out and it tried
    // again) waits for the first; when its caller goes away (tonic drops the handler's
    // future) it must stop waiting, not hold a pooled connection until `lock_timeout`.
    let duplicate = {
        let p = participant.clone();
        tokio::spawn(async move { p.prepare(Request::new(req("g", 0, b"go"))).await })
    };
    let start = tokio::time::Instant::now();
    while branch_locks(&url, false).await == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the duplicate never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    duplicate.abort();
    let _ = duplicate.await;
    let start = tokio::time::Instant::now();
    while branch_locks(&url, false).await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a cancelled duplicate still waits for the branch's lock (lock_timeout is 30 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    GATE.add_permits(1);
    let r = slow
        .await
        .expect("the slow prepare")
        .expect("answered")
        .into_inner();
    assert_eq!(r.result(), pb::PrepareResult::Prepared, "{}", r.message);
    assert_eq!(
        store.prepared_transactions().await.expect("listed").len(),
        1,
        "branch 0 prepared, branch 1 committed"
    );
    assert_eq!(branch_locks_held(&url).await, 0, "every lock released");
}
