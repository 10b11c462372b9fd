//! The [`LogStore`] contract as tests every backend runs (memory and sled today). A backend
//! is done when [`check_all`] passes on a new, empty log of it, not when it compiles.
//!
//! Each check takes an empty log and panics with a message naming the broken rule.

use super::{ListFilter, LogStore, LIST_SCANNED_PER_RESULT_MAX};
use crate::engine::types::{
    BranchDef, BranchRecord, BranchState, Mode, Outcome, Phase, RetryPolicy, TxRecord,
};

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
    }
}

fn put(log: &dyn LogStore, rec: TxRecord, forced: bool) {
    futures::executor::block_on(log.put(rec, forced)).expect("put");
}

fn gids(recs: &[TxRecord]) -> Vec<&str> {
    recs.iter().map(|r| r.gid.as_str()).collect()
}

/// Every check, each on a fresh log from `new_log`.
pub fn check_all(new_log: &mut dyn FnMut() -> Box<dyn LogStore>) {
    identity_is_a_uuid(new_log().as_ref());
    latest_write_wins_and_reads_see_it(new_log().as_ref());
    scan_active_pages_in_gid_order(new_log().as_ref());
    list_pages_by_cursor_to_the_end(new_log().as_ref());
    stuck_records_are_listed_and_leave_when_terminal(new_log().as_ref());
    retention_leaves_tombstones(new_log().as_ref());
}

/// Every log has a UUID identity.
pub fn identity_is_a_uuid(log: &dyn LogStore) {
    assert!(
        uuid::Uuid::parse_str(log.log_id()).is_ok(),
        "log_id {:?} is not a UUID",
        log.log_id()
    );
}

/// `put` applies before it returns (forced or not) and the latest copy of a gid wins.
pub fn latest_write_wins_and_reads_see_it(log: &dyn LogStore) {
    put(log, record("b", Phase::Active, 10), true);
    assert_eq!(
        log.get("b").expect("get"),
        Some(record("b", Phase::Active, 10))
    );
    let mut later = record("b", Phase::Committed, 20);
    later.seq = 2;
    put(log, later.clone(), false);
    assert_eq!(log.get("b").expect("get"), Some(later));
    assert_eq!(log.get("nope").expect("get"), None);
}

/// `scan_active` returns non-terminal records only, ascending, a page at a time.
pub fn scan_active_pages_in_gid_order(log: &dyn LogStore) {
    for (g, p) in [
        ("a", Phase::Active),
        ("b", Phase::Committed),
        ("c", Phase::Committing),
        ("d", Phase::Aborting),
        ("e", Phase::Aborted),
    ] {
        put(log, record(g, p, 1), false);
    }
    let all = log.scan_active(None, 100).expect("scan");
    assert_eq!(gids(&all), ["a", "c", "d"], "non-terminal only, in order");
    let first = log.scan_active(None, 2).expect("scan");
    assert_eq!(gids(&first), ["a", "c"]);
    let rest = log.scan_active(Some("c"), 2).expect("scan");
    assert_eq!(gids(&rest), ["d"], "strictly after the cursor");
}

/// `list` pages newest gid first; the cursor is where the scan stopped, so a selective
/// filter whose matches lie beyond one call's scan budget is still found by paging on, and
/// paging ends only at the end of the log.
pub fn list_pages_by_cursor_to_the_end(log: &dyn LogStore) {
    // One old matching record below a wall of non-matching newer ones.
    put(log, record("a-old-active", Phase::Active, 1), false);
    let wall = 2 * LIST_SCANNED_PER_RESULT_MAX + 5;
    for i in 0..wall {
        put(log, record(&format!("z{i:05}"), Phase::Committed, 1), false);
    }
    let active = ListFilter {
        phases: vec![Phase::Aborted],
        ..ListFilter::default()
    };
    // Nothing matches `Aborted`: paging must still end (a cursor of None).
    let mut cursor: Option<String> = None;
    let mut calls = 0;
    loop {
        let page = log
            .list(&active, cursor.as_deref(), 1)
            .expect("list aborted");
        assert!(page.records.is_empty());
        calls += 1;
        assert!(calls <= wall + 2, "paging never ends");
        match page.next_cursor {
            None => break,
            Some(c) => cursor = Some(c),
        }
    }
    // The old record is found by paging on, whatever the index.
    let mut found = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..=wall {
        let page = log
            .list(&ListFilter::default(), cursor.as_deref(), 1)
            .expect("list");
        found.extend(page.records.into_iter().map(|r| r.gid));
        match page.next_cursor {
            None => break,
            Some(c) => cursor = Some(c),
        }
    }
    assert_eq!(found.len(), wall + 1, "every record is listed once");
    assert_eq!(found.last().map(String::as_str), Some("a-old-active"));
    let live = ListFilter {
        phases: vec![Phase::Active],
        ..ListFilter::default()
    };
    let mut cursor: Option<String> = None;
    let mut live_found = Vec::new();
    for _ in 0..=wall {
        let page = log.list(&live, cursor.as_deref(), 10).expect("list");
        live_found.extend(page.records.into_iter().map(|r| r.gid));
        match page.next_cursor {
            None => break,
            Some(c) => cursor = Some(c),
        }
    }
    assert_eq!(live_found, ["a-old-active"]);
}

/// Records written stuck are listed by `stuck_only`; once terminal they are not.
pub fn stuck_records_are_listed_and_leave_when_terminal(log: &dyn LogStore) {
    let mut s = record("s", Phase::Committing, 1);
    s.stuck = true;
    put(log, s.clone(), false);
    put(log, record("t", Phase::Committing, 1), false);
    let stuck = ListFilter {
        stuck_only: true,
        ..ListFilter::default()
    };
    let page = log.list(&stuck, None, 10).expect("list");
    assert_eq!(gids(&page.records), ["s"]);
    s.phase = Phase::Committed;
    s.stuck = false;
    s.seq = 2;
    put(log, s, false);
    assert!(log.list(&stuck, None, 10).expect("list").records.is_empty());
}

/// Retention replaces old terminal records by tombstones (outcome and fingerprint kept),
/// never touches live ones, and tombstones have a retention of their own.
pub fn retention_leaves_tombstones(log: &dyn LogStore) {
    put(log, record("live-old", Phase::Committing, 1), false);
    let done = record("done-old", Phase::Aborted, 5);
    put(log, done.clone(), false);
    put(log, record("done-new", Phase::Committed, 100), false);
    assert_eq!(log.collect_ended(50, 60, 10).expect("collect"), 1);
    assert_eq!(log.get("done-old").expect("get"), None);
    let t = log
        .get_tombstone("done-old")
        .expect("tombstone")
        .expect("a tombstone replaces the record");
    assert_eq!(t.outcome, Outcome::Aborted);
    assert_eq!(t.fingerprint, done.fingerprint());
    assert_eq!(t.collected_unix_ms, 60);
    assert!(log.get("live-old").expect("get").is_some(), "live is kept");
    assert!(log.get("done-new").expect("get").is_some(), "newer is kept");
    assert_eq!(log.get_tombstone("done-new").expect("tombstone"), None);
    assert_eq!(log.collect_tombstones(60, 10).expect("collect"), 0);
    assert_eq!(log.collect_tombstones(61, 10).expect("collect"), 1);
    assert_eq!(log.get_tombstone("done-old").expect("tombstone"), None);
}
