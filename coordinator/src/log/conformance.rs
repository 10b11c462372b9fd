//! The [`LogStore`] contract as one async test suite that every backend runs: memory and
//! sled today, PostgreSQL through the same entry point. A backend is done when [`check_all`]
//! passes on it, not when it compiles.
//!
//! A backend plugs in through [`Backend`]: how to open a new, empty log, and (where it can)
//! how to reopen the same stored log as a restart would, and how to make its syncs fail.
//! Each check names the clause of the contract on [`LogStore`] it checks and panics with a
//! message naming the broken rule. [`check_all`] runs them all, each on a fresh log.
//!
//! The suite is an `async fn` with no executor of its own: the memory log's futures are
//! ready at once (any executor will do), the sled log's reads want a tokio runtime (else they
//! run inline), a network backend brings its own.

use super::{ListFilter, LogError, LogStore, LIST_SCANNED_PER_RESULT_MAX};
use crate::engine::types::{
    BranchDef, BranchRecord, BranchState, Mode, Outcome, Phase, RetryPolicy, TxRecord,
};
use futures::future::BoxFuture;
use std::sync::Arc;

/// How the suite gets logs of one backend.
pub trait Backend: Send {
    /// A short name for failure messages, e.g. `"sled"`.
    fn name(&self) -> &str;

    /// A new, empty log with a new identity.
    fn open_fresh(&mut self) -> BoxFuture<'_, Arc<dyn LogStore>>;

    /// What a restart finds: `log` (the suite's only handle, from this backend) is closed and
    /// the same stored log opened again. What was promised durable (a forced `put` or a
    /// `sync` that resolved `Ok`) must be there; anything else may be lost. A backend that
    /// cannot reopen returns `None`, and the durability checks are skipped for it (say so in
    /// its tests).
    fn reopen(&mut self, log: Arc<dyn LogStore>) -> BoxFuture<'_, Option<Arc<dyn LogStore>>>;

    /// Makes every forced `put` and `sync` of `log` fail from now on (`true`) or work again
    /// (`false`), as a failing disk would. Returns false if the backend cannot inject this
    /// fault; the check is then skipped for it.
    fn fail_syncs(&mut self, log: &Arc<dyn LogStore>, failing: bool) -> bool;
}

/// Every check, each on a fresh log of `backend`, in the order of the contract's clauses.
pub async fn check_all(backend: &mut dyn Backend) {
    identity_is_a_uuid(backend).await;
    identity_survives_reopen(backend).await;
    latest_write_wins_and_reads_see_it(backend).await;
    read_your_issued_writes(backend).await;
    writes_of_one_gid_apply_in_call_order(backend).await;
    forced_writes_survive_reopen(backend).await;
    sync_makes_every_issued_write_durable(backend).await;
    a_failed_write_is_an_error(backend).await;
    a_failed_sync_is_an_error(backend).await;
    scan_active_pages_to_the_end(backend).await;
    list_pages_by_cursor_to_the_end(backend).await;
    stuck_records_are_listed_and_leave_when_terminal(backend).await;
    retention_leaves_tombstones(backend).await;
    tombstones_have_their_own_retention(backend).await;
}

/// A record of `gid` in `phase`, last updated at `updated_unix_ms`, with one branch.
pub fn record(gid: &str, phase: Phase, updated_unix_ms: u64) -> TxRecord {
    TxRecord {
        gid: gid.into(),
        mode: Mode::TwoPhase,
        phase,
        branches: vec![BranchRecord {
            def: BranchDef {
                endpoint: "http://127.0.0.1:1".into(),
                handler: "h".into(),
                payload: bytes::Bytes::from_static(b"p"),
                compensation_payload: bytes::Bytes::new(),
            },
            state: BranchState::Pending,
            attempts: 0,
            last_error: String::new(),
            resolution: None,
        }],
        created_unix_ms: 1,
        updated_unix_ms,
        deadline_unix_ms: 0,
        retry: RetryPolicy::default(),
        stuck: false,
        seq: 1,
        reason: None,
        trace_parent: None,
    }
}

/// `record` as the `seq`-th write of its transaction.
fn nth(gid: &str, phase: Phase, seq: u64) -> TxRecord {
    TxRecord {
        seq,
        ..record(gid, phase, seq)
    }
}

async fn put(log: &dyn LogStore, rec: TxRecord, forced: bool) {
    let gid = rec.gid.clone();
    log.put(rec, forced)
        .await
        .unwrap_or_else(|e| panic!("put of gid {gid:?} (forced: {forced}) failed: {e}"));
}

async fn get(log: &dyn LogStore, gid: &str) -> Option<TxRecord> {
    log.get(gid)
        .await
        .unwrap_or_else(|e| panic!("get of gid {gid:?} failed: {e}"))
}

fn gids(recs: &[TxRecord]) -> Vec<&str> {
    recs.iter().map(|r| r.gid.as_str()).collect()
}

/// Identity: every log has a UUID identity.
pub async fn identity_is_a_uuid(backend: &mut dyn Backend) {
    let log = backend.open_fresh().await;
    assert!(
        uuid::Uuid::parse_str(log.log_id()).is_ok(),
        "{}: log_id {:?} is not a UUID",
        backend.name(),
        log.log_id()
    );
    let other = backend.open_fresh().await;
    assert_ne!(
        log.log_id(),
        other.log_id(),
        "{}: two new logs share an identity",
        backend.name()
    );
}

/// Identity: reopening the same stored log keeps its identity, written or not.
pub async fn identity_survives_reopen(backend: &mut dyn Backend) {
    let log = backend.open_fresh().await;
    let id = log.log_id().to_string();
    let Some(log) = backend.reopen(log).await else {
        return;
    };
    assert_eq!(
        log.log_id(),
        id,
        "{}: reopen changed log_id",
        backend.name()
    );
    put(log.as_ref(), record("a", Phase::Active, 1), true).await;
    let Some(log) = backend.reopen(log).await else {
        return;
    };
    assert_eq!(
        log.log_id(),
        id,
        "{}: reopen changed log_id",
        backend.name()
    );
}

/// `put` applies before it resolves (forced or not), the latest copy of a gid wins, and an
/// unknown gid reads as `None`.
pub async fn latest_write_wins_and_reads_see_it(backend: &mut dyn Backend) {
    let log = backend.open_fresh().await;
    let log = log.as_ref();
    put(log, record("b", Phase::Active, 10), true).await;
    assert_eq!(get(log, "b").await, Some(record("b", Phase::Active, 10)));
    let later = nth("b", Phase::Committed, 2);
    put(log, later.clone(), false).await;
    assert_eq!(get(log, "b").await, Some(later));
    assert_eq!(get(log, "nope").await, None);
}

/// Visibility: a read called after `put` was called sees the write, although the `put`
/// future was neither awaited nor polled (forced or not); so do scans and `list`.
pub async fn read_your_issued_writes(backend: &mut dyn Backend) {
    let name = backend.name().to_string();
    let log = backend.open_fresh().await;
    let forced = log.put(record("f", Phase::Active, 1), true);
    let unforced = log.put(record("u", Phase::Committing, 1), false);
    assert_eq!(
        get(log.as_ref(), "f").await,
        Some(record("f", Phase::Active, 1)),
        "{name}: a forced write is not visible before its future resolves"
    );
    assert_eq!(
        get(log.as_ref(), "u").await,
        Some(record("u", Phase::Committing, 1)),
        "{name}: an unforced write is not visible before its future resolves"
    );
    let active = log.scan_active(None, 10).await.expect("scan_active");
    assert_eq!(
        gids(&active),
        ["f", "u"],
        "{name}: scan_active misses issued writes"
    );
    let listed = log
        .list(&ListFilter::default(), None, 10)
        .await
        .expect("list");
    assert_eq!(
        gids(&listed.records),
        ["u", "f"],
        "{name}: list misses issued writes"
    );
    forced.await.expect("forced put");
    unforced.await.expect("unforced put");
}

/// Order per gid: many writes of a few gids issued without awaiting any, then awaited in
/// reverse. A read issued between two writes sees the earlier one or a later one, never an
/// older one; once all resolve, the last write of each gid is what every read sees.
pub async fn writes_of_one_gid_apply_in_call_order(backend: &mut dyn Backend) {
    const GIDS: [&str; 3] = ["o-a", "o-b", "o-c"];
    const WRITES: u64 = 60;
    let name = backend.name().to_string();
    let log = backend.open_fresh().await;
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    for seq in 1..=WRITES {
        for (i, gid) in GIDS.iter().enumerate() {
            // Phases change too, so that the indexes of every backend move with the record.
            let phase = match (seq + i as u64) % 3 {
                0 => Phase::Active,
                1 => Phase::Committing,
                _ => Phase::Compensating,
            };
            let forced = (seq + i as u64) % 4 == 0;
            writes.push(log.put(nth(gid, phase, seq), forced));
        }
        if seq % 7 == 0 {
            reads.push((seq, log.get(GIDS[1])));
        }
    }
    // The last write of o-c is terminal: it must leave the active records.
    let last = nth(GIDS[2], Phase::Committed, WRITES + 1);
    writes.push(log.put(last.clone(), false));
    while let Some(w) = writes.pop() {
        w.await.expect("put");
    }
    for (issued_after, read) in reads {
        let seen = read.await.expect("get").map(|r| r.seq);
        assert!(
            seen.is_some_and(|s| s >= issued_after),
            "{name}: a read issued after write {issued_after} of {:?} saw {seen:?}",
            GIDS[1]
        );
    }
    for gid in &GIDS[..2] {
        let seen = get(log.as_ref(), gid).await.map(|r| r.seq);
        assert_eq!(
            seen,
            Some(WRITES),
            "{name}: the last write of {gid:?} did not win"
        );
    }
    assert_eq!(get(log.as_ref(), GIDS[2]).await, Some(last));
    let active = log.scan_active(None, 10).await.expect("scan_active");
    assert_eq!(
        gids(&active),
        &GIDS[..2],
        "{name}: scan_active disagrees with the latest writes"
    );
    assert!(
        active.iter().all(|r| r.seq == WRITES),
        "{name}: scan_active returned an older copy: {:?}",
        active.iter().map(|r| r.seq).collect::<Vec<_>>()
    );
}

/// Forced write: once a forced `put` resolves, a restart finds it (or a later write of its
/// gid), and it made every write issued before it durable too, whatever the gid.
pub async fn forced_writes_survive_reopen(backend: &mut dyn Backend) {
    let name = backend.name().to_string();
    let log = backend.open_fresh().await;
    put(log.as_ref(), nth("d-early", Phase::Active, 1), false).await;
    put(log.as_ref(), nth("d-a", Phase::Active, 1), true).await;
    // Two writes of one gid pending together: the flush must keep their order.
    put(log.as_ref(), nth("d-a", Phase::Committing, 2), false).await;
    put(log.as_ref(), nth("d-a", Phase::Committing, 3), false).await;
    put(log.as_ref(), nth("d-b", Phase::Compensating, 1), true).await;
    let Some(log) = backend.reopen(log).await else {
        return;
    };
    assert_eq!(
        get(log.as_ref(), "d-b").await,
        Some(nth("d-b", Phase::Compensating, 1)),
        "{name}: an acknowledged forced write is gone after reopen"
    );
    assert_eq!(
        get(log.as_ref(), "d-a").await.map(|r| r.seq),
        Some(3),
        "{name}: the writes issued before a forced write are not durable with it, in order"
    );
    assert_eq!(
        get(log.as_ref(), "d-early").await,
        Some(nth("d-early", Phase::Active, 1)),
        "{name}: a write of another gid issued before a forced write is not durable with it"
    );
    let active = log.scan_active(None, 10).await.expect("scan_active");
    assert_eq!(gids(&active), ["d-a", "d-b", "d-early"]);
}

/// Sync: once `sync` resolves, every write issued before it survives a restart, deletions
/// by retention included.
pub async fn sync_makes_every_issued_write_durable(backend: &mut dyn Backend) {
    let name = backend.name().to_string();
    let log = backend.open_fresh().await;
    put(log.as_ref(), nth("s-a", Phase::Active, 1), false).await;
    put(log.as_ref(), nth("s-b", Phase::Aborted, 1), false).await;
    assert_eq!(log.collect_ended(2, 3, 10).await.expect("collect"), 1);
    log.sync().await.expect("sync");
    let Some(log) = backend.reopen(log).await else {
        return;
    };
    assert_eq!(
        get(log.as_ref(), "s-a").await,
        Some(nth("s-a", Phase::Active, 1)),
        "{name}: a write issued before a successful sync is gone after reopen"
    );
    assert_eq!(
        get(log.as_ref(), "s-b").await,
        None,
        "{name}: a collected record is back after reopen"
    );
    let tomb = log.get_tombstone("s-b").await.expect("get_tombstone");
    assert!(
        tomb.is_some(),
        "{name}: the tombstone of a synced collection is gone after reopen"
    );
}

/// Failure: a write the store refuses (an empty gid, which no record may have) resolves to
/// an error, and the log is as before: no record appears, earlier ones are unchanged.
pub async fn a_failed_write_is_an_error(backend: &mut dyn Backend) {
    let name = backend.name().to_string();
    let log = backend.open_fresh().await;
    put(log.as_ref(), record("kept", Phase::Active, 1), true).await;
    for forced in [false, true] {
        let refused = log.put(record("", Phase::Active, 1), forced).await;
        assert!(
            refused.is_err(),
            "{name}: a record with an empty gid was accepted (forced: {forced})"
        );
    }
    assert_eq!(
        get(log.as_ref(), "").await,
        None,
        "{name}: a refused write is visible"
    );
    assert_eq!(
        get(log.as_ref(), "kept").await,
        Some(record("kept", Phase::Active, 1))
    );
    let active = log.scan_active(None, 10).await.expect("scan_active");
    assert_eq!(
        gids(&active),
        ["kept"],
        "{name}: a refused write is scanned"
    );
}

/// Failure: while the disk fails, a forced `put` and `sync` resolve to an error (never `Ok`),
/// a read may or may not see the failed write, and a restart keeps what was durable before.
pub async fn a_failed_sync_is_an_error(backend: &mut dyn Backend) {
    let name = backend.name().to_string();
    let log = backend.open_fresh().await;
    put(log.as_ref(), nth("e-a", Phase::Active, 1), true).await;
    if !backend.fail_syncs(&log, true) {
        return;
    }
    let failed = log.put(nth("e-a", Phase::Committing, 2), true).await;
    assert!(
        matches!(failed, Err(LogError::Io { .. })),
        "{name}: a forced write on a failing disk resolved {failed:?}"
    );
    let seen = get(log.as_ref(), "e-a").await.map(|r| r.seq);
    assert!(
        matches!(seen, Some(1 | 2)),
        "{name}: after a failed forced write, a read saw {seen:?}"
    );
    put(log.as_ref(), nth("e-b", Phase::Active, 1), false).await;
    let synced = log.sync().await;
    assert!(
        matches!(synced, Err(LogError::Io { .. })),
        "{name}: a sync on a failing disk resolved {synced:?}"
    );
    backend.fail_syncs(&log, false);
    let Some(log) = backend.reopen(log).await else {
        return;
    };
    let seen = get(log.as_ref(), "e-a").await.map(|r| r.seq);
    assert!(
        matches!(seen, Some(1 | 2)),
        "{name}: a durable write is gone after a failed sync and a restart: {seen:?}"
    );
    log.sync()
        .await
        .expect("a sync after the restart works again");
}

/// Paging: `scan_active` returns non-terminal records only, ascending, strictly after the
/// cursor, at most `limit` a page; paging on from the last gid visits each exactly once.
pub async fn scan_active_pages_to_the_end(backend: &mut dyn Backend) {
    let name = backend.name().to_string();
    let log = backend.open_fresh().await;
    let log = log.as_ref();
    for (g, p) in [
        ("a", Phase::Active),
        ("b", Phase::Committed),
        ("c", Phase::Committing),
        ("d", Phase::Aborting),
        ("e", Phase::Aborted),
    ] {
        put(log, record(g, p, 1), false).await;
    }
    let all = log.scan_active(None, 100).await.expect("scan");
    assert_eq!(
        gids(&all),
        ["a", "c", "d"],
        "{name}: non-terminal only, in order"
    );
    let first = log.scan_active(None, 2).await.expect("scan");
    assert_eq!(gids(&first), ["a", "c"]);
    let rest = log.scan_active(Some("c"), 2).await.expect("scan");
    assert_eq!(gids(&rest), ["d"], "{name}: strictly after the cursor");
    // Many pages, with terminal records between the live ones.
    for i in 0..250 {
        let phase = if i % 3 == 0 {
            Phase::Committed
        } else {
            Phase::Compensating
        };
        put(log, record(&format!("p{i:04}"), phase, 1), false).await;
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = log.scan_active(after.as_deref(), 16).await.expect("scan");
        assert!(page.len() <= 16, "{name}: a page longer than its limit");
        seen.extend(page.iter().map(|r| r.gid.clone()));
        if page.len() < 16 {
            break;
        }
        after = page.last().map(|r| r.gid.clone());
    }
    let mut expected: Vec<String> = ["a", "c", "d"].map(String::from).to_vec();
    expected.extend((0..250).filter(|i| i % 3 != 0).map(|i| format!("p{i:04}")));
    expected.sort();
    assert_eq!(seen, expected, "{name}: paging scan_active to the end");
}

/// Paging: `list` pages newest gid first; the cursor is where the scan stopped, so a
/// selective filter whose matches lie beyond one call's scan budget is still found by paging
/// on, and paging ends only at the end of the log.
pub async fn list_pages_by_cursor_to_the_end(backend: &mut dyn Backend) {
    let name = backend.name().to_string();
    let log = backend.open_fresh().await;
    let log = log.as_ref();
    // One old matching record below a wall of non-matching newer ones.
    put(log, record("a-old-active", Phase::Active, 1), false).await;
    let wall = 2 * LIST_SCANNED_PER_RESULT_MAX + 5;
    for i in 0..wall {
        put(log, record(&format!("z{i:05}"), Phase::Committed, 1), false).await;
    }
    // Nothing matches: paging must still end (a cursor of None).
    let aborted = ListFilter {
        phases: vec![Phase::Aborted],
        ..ListFilter::default()
    };
    let mut cursor: Option<String> = None;
    let mut calls = 0;
    loop {
        let page = log
            .list(&aborted, cursor.as_deref(), 1)
            .await
            .expect("list aborted");
        assert!(
            page.records.is_empty(),
            "{name}: a non-matching record listed"
        );
        calls += 1;
        assert!(calls <= wall + 2, "{name}: paging never ends");
        match page.next_cursor {
            None => break,
            Some(c) => cursor = Some(c),
        }
    }
    // Every record is listed once, by paging on, whatever the index.
    let mut found = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..=wall {
        let page = log
            .list(&ListFilter::default(), cursor.as_deref(), 1)
            .await
            .expect("list");
        assert!(
            page.records.len() <= 1,
            "{name}: a page longer than its limit"
        );
        found.extend(page.records.into_iter().map(|r| r.gid));
        match page.next_cursor {
            None => break,
            Some(c) => cursor = Some(c),
        }
    }
    assert_eq!(found.len(), wall + 1, "{name}: every record is listed once");
    assert_eq!(found.last().map(String::as_str), Some("a-old-active"));
    let mut descending = found.clone();
    descending.sort_by(|a, b| b.cmp(a));
    assert_eq!(found, descending, "{name}: list is in descending gid order");
    // A selective filter: its one match lies past the first call's scan budget.
    let live = ListFilter {
        phases: vec![Phase::Active],
        ..ListFilter::default()
    };
    let mut cursor: Option<String> = None;
    let mut live_found = Vec::new();
    for _ in 0..=wall {
        let page = log.list(&live, cursor.as_deref(), 10).await.expect("list");
        live_found.extend(page.records.into_iter().map(|r| r.gid));
        match page.next_cursor {
            None => break,
            Some(c) => cursor = Some(c),
        }
    }
    assert_eq!(
        live_found,
        ["a-old-active"],
        "{name}: selective list paging"
    );
}

/// Records written stuck are listed by `stuck_only`; once terminal they are not.
pub async fn stuck_records_are_listed_and_leave_when_terminal(backend: &mut dyn Backend) {
    let log = backend.open_fresh().await;
    let log = log.as_ref();
    let mut s = record("s", Phase::Committing, 1);
    s.stuck = true;
    put(log, s.clone(), false).await;
    put(log, record("t", Phase::Committing, 1), false).await;
    let stuck = ListFilter {
        stuck_only: true,
        ..ListFilter::default()
    };
    let page = log.list(&stuck, None, 10).await.expect("list");
    assert_eq!(gids(&page.records), ["s"]);
    s.phase = Phase::Committed;
    s.stuck = false;
    s.seq = 2;
    put(log, s, false).await;
    assert!(log
        .list(&stuck, None, 10)
        .await
        .expect("list")
        .records
        .is_empty());
}

/// Retention: `collect_ended` replaces old terminal records by tombstones (outcome and
/// fingerprint kept), oldest first and at most `max` a call, and never touches live ones or
/// newer ones.
pub async fn retention_leaves_tombstones(backend: &mut dyn Backend) {
    let name = backend.name().to_string();
    let log = backend.open_fresh().await;
    let log = log.as_ref();
    put(log, record("live-old", Phase::Committing, 1), false).await;
    let done = record("done-old", Phase::Aborted, 5);
    put(log, done.clone(), false).await;
    put(log, record("done-older", Phase::Committed, 3), false).await;
    put(log, record("done-new", Phase::Committed, 100), false).await;
    assert_eq!(log.collect_ended(50, 55, 1).await.expect("collect"), 1);
    assert_eq!(
        get(log, "done-older").await,
        None,
        "{name}: retention is not oldest first"
    );
    assert!(
        get(log, "done-old").await.is_some(),
        "{name}: max is not kept"
    );
    assert_eq!(log.collect_ended(50, 60, 10).await.expect("collect"), 1);
    assert_eq!(get(log, "done-old").await, None);
    let t = log
        .get_tombstone("done-old")
        .await
        .expect("tombstone")
        .expect("a tombstone replaces the record");
    assert_eq!(t.outcome, Outcome::Aborted);
    assert_eq!(t.fingerprint, done.fingerprint());
    assert_eq!(t.collected_unix_ms, 60);
    let older = log.get_tombstone("done-older").await.expect("tombstone");
    assert_eq!(older.map(|t| t.outcome), Some(Outcome::Committed));
    assert!(get(log, "live-old").await.is_some(), "{name}: live is kept");
    assert!(
        get(log, "done-new").await.is_some(),
        "{name}: newer is kept"
    );
    assert_eq!(
        log.get_tombstone("done-new").await.expect("tombstone"),
        None
    );
    assert_eq!(
        log.collect_ended(u64::MAX, 70, 10).await.expect("collect"),
        1,
        "{name}: only the terminal record is left to collect"
    );
    assert!(
        get(log, "live-old").await.is_some(),
        "{name}: live is never collected"
    );
}

/// Retention: tombstones are deleted by `collect_tombstones`, only those collected before the
/// cutoff, oldest first and at most `max` a call.
pub async fn tombstones_have_their_own_retention(backend: &mut dyn Backend) {
    let name = backend.name().to_string();
    let log = backend.open_fresh().await;
    let log = log.as_ref();
    for (gid, collected_at) in [("t-1", 10), ("t-2", 20), ("t-3", 30)] {
        put(log, record(gid, Phase::Committed, 1), false).await;
        assert_eq!(
            log.collect_ended(2, collected_at, 10)
                .await
                .expect("collect"),
            1
        );
    }
    let tomb = |gid: &'static str| async move {
        log.get_tombstone(gid)
            .await
            .expect("get_tombstone")
            .is_some()
    };
    assert_eq!(log.collect_tombstones(10, 10).await.expect("collect"), 0);
    assert_eq!(log.collect_tombstones(30, 1).await.expect("collect"), 1);
    assert!(
        !tomb("t-1").await,
        "{name}: tombstone retention is not oldest first"
    );
    assert!(tomb("t-2").await, "{name}: tombstone retention ignores max");
    assert_eq!(log.collect_tombstones(30, 10).await.expect("collect"), 1);
    assert!(!tomb("t-2").await);
    assert!(
        tomb("t-3").await,
        "{name}: a tombstone collected at the cutoff is kept"
    );
    assert_eq!(log.collect_tombstones(31, 10).await.expect("collect"), 1);
    assert!(!tomb("t-3").await);
}
