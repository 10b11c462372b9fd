//! The barrier-store conformance suite: the contract of [`BarrierStore`], written as tests
//! that every store runs. A store is done when this suite passes, not when it compiles.
//!
//! A store's tests implement [`Harness`] (open a fresh store, write and read a business
//! marker through the store's own transaction) and call [`run_all`], or each check on its
//! own:
//!
//! ```
//! use std::sync::Mutex;
//! use treaty_sdk::sled::SledStore;
//! use treaty_sdk::store::conformance::{self, Harness};
//! use treaty_sdk::{HandlerResult, Txn};
//!
//! /// Fresh sled stores, each in its own temporary directory.
//! struct SledHarness(Mutex<Vec<tempfile::TempDir>>);
//!
//! impl Harness for SledHarness {
//!     type Store = SledStore;
//!
//!     async fn open(&self) -> SledStore {
//!         let dir = tempfile::tempdir().unwrap();
//!         let store = SledStore::open_dir(dir.path(), "business").unwrap();
//!         self.0.lock().unwrap().push(dir);
//!         store
//!     }
//!
//!     async fn write_mark<'a, 't>(tx: &'a mut Txn<'t, SledStore>, key: &'a str) -> HandlerResult {
//!         tx.insert(key.as_bytes(), b"x".as_slice())?;
//!         Ok(())
//!     }
//!
//!     async fn has_mark(store: &SledStore, key: &str) -> bool {
//!         store.tree().get(key).unwrap().is_some()
//!     }
//! }
//!
//! # fn main() {
//! // In a store's tests: #[tokio::test(flavor = "multi_thread")] async fn conforms() { .. }
//! tokio::runtime::Runtime::new()
//!     .unwrap()
//!     .block_on(conformance::run_all(&SledHarness(Mutex::new(Vec::new()))));
//! # }
//! ```
//!
//! Each check panics (with the scenario's name) on the first deviation. The checks cover the
//! barrier's rules end to end through the store (duplicates, null compensation, no hanging,
//! cancel before forward, commit after abort, refusals rolled back, unknown handlers, a reused
//! gid), concurrency (concurrent duplicates run the business code once), the rows read back
//! (per gid, numbered in commit order), the in-doubt index (open on `PREPARED`, closed on
//! commit/abort, full payloads of any size), and handler failures (a panic and a retry are
//! answered RETRY with nothing of the delivery kept), and for a store that
//! [`BarrierStore::sweeps`], the sweep (pages of whole gids, rows replaced by a marker only
//! while unchanged, late deliveries to a swept gid change nothing, markers expire). Durability on a crash is not something
//! an in-process suite can show: the sled store's power-cut test (`tests/lazyfs`) does that.
//!
//! A store whose 2PC prepare holds its change in a prepared transaction of its own
//! (PostgreSQL) says so with [`Harness::PREPARE_HELD`]; the suite then expects the prepare's
//! change to show only once committed, and no abort handler run for a prepared branch.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::barrier::{now_unix_ms, Answer, Op, Swept, Verdict};
use crate::error::HandlerError;
use crate::participant::{refuse, BranchContext, HandlerResult, Registered};
use crate::store::{BarrierStore, HandlerCall, Txn};
use crate::{SagaHandler, TwoPhaseHandler};

/// What the suite needs from a store's tests.
pub trait Harness: Send + Sync + 'static {
    /// The store under test.
    type Store: BarrierStore;

    /// A fresh, empty store (its own directory, schema or database).
    fn open(&self) -> impl Future<Output = Self::Store> + Send;

    /// Inside a handler: writes the business marker `key` through the delivery's
    /// transaction (so it commits, or rolls back, with the delivery).
    fn write_mark<'a, 't>(
        tx: &'a mut Txn<'t, Self::Store>,
        key: &'a str,
    ) -> impl Future<Output = HandlerResult> + 'a;

    /// Whether the business marker `key` is committed in `store`.
    fn has_mark(store: &Self::Store, key: &str) -> impl Future<Output = bool> + Send;

    /// Whether a 2PC prepare **holds** its business change rather than committing it: the
    /// store's own prepared transaction keeps it invisible until the commit makes it
    /// visible, and the abort rolls it back, so the abort handler is not called for a
    /// prepared branch (there is nothing left for it to undo). PostgreSQL's `PREPARE
    /// TRANSACTION` works this way; sled commits the prepare's change, and its abort handler
    /// undoes it. The suite expects the business changes and handler runs that follow.
    const PREPARE_HELD: bool = false;
}

/// Runs every check of the suite, each on a fresh store.
pub async fn run_all<H: Harness>(h: &H) {
    barrier_rules(h).await;
    concurrent_duplicates_run_the_business_once(h).await;
    rows_of_one_gid_exclude_longer_gids(h).await;
    in_doubt_lists_open_prepared_branches(h).await;
    large_payloads_are_replayed_whole(h).await;
    rows_are_numbered_in_commit_order(h).await;
    reused_gid_with_another_body_is_refused(h).await;
    handler_panic_is_answered_retry_naming_it(h).await;
    handler_retry_keeps_nothing(h).await;
    sweep_replaces_finished_rows_by_a_marker(h).await;
}

/// What the scripted handler does when called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Biz {
    /// Writes its marker and succeeds.
    Ok,
    /// Writes its marker and refuses.
    Refuse,
    /// No handler is registered.
    Missing,
    /// Writes its marker and panics.
    Panic,
    /// Writes its marker and asks for a retry.
    Retry,
}

/// The marker a handler writes for `(gid, op)`.
fn mark_key(gid: &str, op: Op) -> String {
    format!("biz/{gid}/{op}")
}

/// A handler of both kinds that counts its runs, writes its marker, then does `biz`.
struct Scripted<H> {
    runs: Arc<AtomicU32>,
    biz: Biz,
    harness: PhantomData<fn() -> H>,
}

impl<H: Harness> Scripted<H> {
    async fn run(&self, op: Op, ctx: &BranchContext, tx: &mut Txn<'_, H::Store>) -> HandlerResult {
        self.runs.fetch_add(1, Ordering::SeqCst);
        H::write_mark(tx, &mark_key(&ctx.gid, op)).await?;
        match self.biz {
            Biz::Ok => Ok(()),
            Biz::Refuse => Err(refuse("insufficient funds")),
            Biz::Panic => panic!("the scripted handler broke"),
            Biz::Retry => Err(HandlerError::retry("the scripted dependency is down")),
            Biz::Missing => unreachable!("a missing handler is never called"),
        }
    }
}

impl<H: Harness> TwoPhaseHandler<H::Store> for Scripted<H> {
    async fn prepare(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, H::Store>,
        _: &[u8],
    ) -> HandlerResult {
        self.run(Op::Prepare, ctx, tx).await
    }
    async fn commit(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, H::Store>,
        _: &[u8],
    ) -> HandlerResult {
        self.run(Op::Commit, ctx, tx).await
    }
    async fn abort(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, H::Store>,
        _: &[u8],
    ) -> HandlerResult {
        self.run(Op::Abort, ctx, tx).await
    }
}

impl<H: Harness> SagaHandler<H::Store> for Scripted<H> {
    async fn execute(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, H::Store>,
        _: &[u8],
    ) -> HandlerResult {
        self.run(Op::Execute, ctx, tx).await
    }
    async fn compensate(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, H::Store>,
        _: &[u8],
    ) -> HandlerResult {
        self.run(Op::Compensate, ctx, tx).await
    }
}

fn ctx(gid: &str) -> BranchContext {
    BranchContext {
        gid: gid.to_string(),
        branch_id: 0,
        attempt: 1,
        deadline_unix_ms: 0,
        handler: "h".to_string(),
        log_id: String::new(),
        outcome_endpoint: String::new(),
    }
}

/// A store under test and the run counter of its scripted handlers.
struct Fixture<H: Harness> {
    store: Arc<H::Store>,
    runs: Arc<AtomicU32>,
}

impl<H: Harness> Fixture<H> {
    async fn new(h: &H) -> Self {
        Fixture {
            store: Arc::new(h.open().await),
            runs: Arc::new(AtomicU32::new(0)),
        }
    }

    fn call(&self, op: Op, biz: Biz) -> Option<HandlerCall<H::Store>> {
        if biz == Biz::Missing {
            return None;
        }
        let scripted = Scripted::<H> {
            runs: self.runs.clone(),
            biz,
            harness: PhantomData,
        };
        let handler = match op {
            Op::Prepare | Op::Commit | Op::Abort => Registered::two_phase(scripted),
            Op::Execute | Op::Compensate => Registered::saga(scripted),
        };
        HandlerCall::new(op, handler)
    }

    async fn deliver_with(&self, c: BranchContext, op: Op, biz: Biz, payload: &[u8]) -> Verdict {
        let call = self.call(op, biz);
        self.store
            .deliver(op, c, Bytes::copy_from_slice(payload), call)
            .await
    }

    async fn deliver(&self, gid: &str, op: Op, biz: Biz) -> Verdict {
        self.deliver_with(ctx(gid), op, biz, b"payload").await
    }

    async fn rows(&self, gid: &str) -> Vec<(Op, Answer)> {
        let mut r: Vec<_> = self
            .store
            .rows(gid)
            .await
            .unwrap_or_else(|e| panic!("reading the rows of {gid}: {e}"))
            .into_iter()
            .map(|r| (r.op, r.answer))
            .collect();
        r.sort();
        r
    }

    async fn seq(&self, gid: &str, op: Op) -> u64 {
        let rows = self.store.rows(gid).await.expect("rows");
        rows.iter()
            .find(|r| r.op == op)
            .unwrap_or_else(|| panic!("no {op} row for {gid}: {rows:?}"))
            .seq
    }

    async fn has_change(&self, gid: &str, op: Op) -> bool {
        H::has_mark(&self.store, &mark_key(gid, op)).await
    }

    async fn open_gids(&self) -> Vec<String> {
        let mut gids: Vec<_> = self
            .store
            .in_doubt(None)
            .await
            .expect("reading the in-doubt index")
            .into_iter()
            .map(|b| b.gid)
            .collect();
        gids.sort();
        gids
    }
}

/// The short form of a verdict, for tables.
#[derive(Debug, PartialEq)]
enum V {
    A(Answer),
    Retry,
    Violation,
}

fn short(v: &Verdict) -> V {
    match v {
        Verdict::Answer { answer, .. } => V::A(*answer),
        Verdict::Retry(_) => V::Retry,
        Verdict::Violation(_) => V::Violation,
    }
}

/// One scenario: deliveries in order, each with its expected verdict; then the expected
/// number of business runs, the barrier rows, and which business changes are committed.
struct Case {
    name: &'static str,
    steps: &'static [(Op, Biz, V)],
    runs: u32,
    rows: &'static [(Op, Answer)],
    changes: &'static [Op],
}

/// What a case expects of a store whose prepare holds its change ([`Harness::PREPARE_HELD`]):
/// the abort handler never runs (the abort rolls the prepare back), and the prepare's change
/// is visible only once committed.
fn held_expectation(case: &Case) -> (u32, Vec<Op>) {
    let committed = case.rows.iter().any(|(op, _)| *op == Op::Commit);
    let aborted_prepared = case.changes.contains(&Op::Abort);
    let runs = case.runs - u32::from(aborted_prepared);
    let changes = case
        .changes
        .iter()
        .copied()
        .filter(|op| *op != Op::Abort && (*op != Op::Prepare || committed))
        .collect();
    (runs, changes)
}

async fn check<H: Harness>(h: &H, case: &Case) {
    let f = Fixture::new(h).await;
    let (want_runs, want_changes) = if H::PREPARE_HELD {
        held_expectation(case)
    } else {
        (case.runs, case.changes.to_vec())
    };
    let gid = "g1";
    for (i, (op, biz, want)) in case.steps.iter().enumerate() {
        let got = f.deliver(gid, *op, *biz).await;
        assert_eq!(
            &short(&got),
            want,
            "{}: step {i} ({op}): {got:?}",
            case.name
        );
    }
    assert_eq!(
        f.runs.load(Ordering::SeqCst),
        want_runs,
        "{}: business runs",
        case.name
    );
    let mut want_rows = case.rows.to_vec();
    want_rows.sort();
    assert_eq!(f.rows(gid).await, want_rows, "{}: rows", case.name);
    for op in [
        Op::Prepare,
        Op::Commit,
        Op::Abort,
        Op::Execute,
        Op::Compensate,
    ] {
        assert_eq!(
            f.has_change(gid, op).await,
            want_changes.contains(&op),
            "{}: business change of {op}",
            case.name
        );
    }
}

/// The barrier's rules, end to end through the store, one scenario per rule.
pub async fn barrier_rules<H: Harness>(h: &H) {
    use Answer::*;
    use Biz::Ok as Y;
    use Biz::{Missing as M, Refuse as N};
    use Op::*;
    let cases = [
        Case {
            name: "prepare then commit",
            steps: &[(Prepare, Y, V::A(Prepared)), (Commit, Y, V::A(Done))],
            runs: 2,
            rows: &[(Prepare, Prepared), (Commit, Done)],
            changes: &[Prepare, Commit],
        },
        Case {
            name: "duplicate prepare runs business once",
            steps: &[(Prepare, Y, V::A(Prepared)), (Prepare, Y, V::A(Prepared))],
            runs: 1,
            rows: &[(Prepare, Prepared)],
            changes: &[Prepare],
        },
        Case {
            name: "duplicate commit runs business once",
            steps: &[
                (Prepare, Y, V::A(Prepared)),
                (Commit, Y, V::A(Done)),
                (Commit, Y, V::A(Done)),
            ],
            runs: 2,
            rows: &[(Prepare, Prepared), (Commit, Done)],
            changes: &[Prepare, Commit],
        },
        Case {
            name: "refusal leaves no business change and records REFUSED",
            steps: &[(Prepare, N, V::A(Refused)), (Prepare, Y, V::A(Refused))],
            runs: 1,
            rows: &[(Prepare, Refused)],
            changes: &[],
        },
        Case {
            name: "abort before prepare: null abort, later prepare refused, business never ran",
            steps: &[
                (Abort, Y, V::A(Done)),
                (Prepare, Y, V::A(Refused)),
                (Abort, Y, V::A(Done)),
            ],
            runs: 0,
            rows: &[(Prepare, Refused), (Abort, Done)],
            changes: &[],
        },
        Case {
            name: "abort after refused prepare: no business",
            steps: &[(Prepare, N, V::A(Refused)), (Abort, Y, V::A(Done))],
            runs: 1,
            rows: &[(Prepare, Refused), (Abort, Done)],
            changes: &[],
        },
        Case {
            name: "abort after prepared runs abort once",
            steps: &[
                (Prepare, Y, V::A(Prepared)),
                (Abort, Y, V::A(Done)),
                (Abort, Y, V::A(Done)),
            ],
            runs: 2,
            rows: &[(Prepare, Prepared), (Abort, Done)],
            changes: &[Prepare, Abort],
        },
        Case {
            name: "commit without prepare: violation, no business",
            steps: &[(Commit, Y, V::Violation)],
            runs: 0,
            rows: &[],
            changes: &[],
        },
        Case {
            name: "commit after refused prepare: violation",
            steps: &[(Prepare, N, V::A(Refused)), (Commit, Y, V::Violation)],
            runs: 1,
            rows: &[(Prepare, Refused)],
            changes: &[],
        },
        Case {
            name: "commit after abort: violation",
            steps: &[
                (Prepare, Y, V::A(Prepared)),
                (Abort, Y, V::A(Done)),
                (Commit, Y, V::Violation),
            ],
            runs: 2,
            rows: &[(Prepare, Prepared), (Abort, Done)],
            changes: &[Prepare, Abort],
        },
        Case {
            name: "abort after commit: violation",
            steps: &[
                (Prepare, Y, V::A(Prepared)),
                (Commit, Y, V::A(Done)),
                (Abort, Y, V::Violation),
            ],
            runs: 2,
            rows: &[(Prepare, Prepared), (Commit, Done)],
            changes: &[Prepare, Commit],
        },
        Case {
            name: "commit handler refusing: RETRY, nothing recorded, then succeeds",
            steps: &[
                (Prepare, Y, V::A(Prepared)),
                (Commit, N, V::Retry),
                (Commit, Y, V::A(Done)),
            ],
            runs: 3,
            rows: &[(Prepare, Prepared), (Commit, Done)],
            changes: &[Prepare, Commit],
        },
        Case {
            name: "unknown handler: prepare refused and recorded",
            steps: &[(Prepare, M, V::A(Refused)), (Abort, M, V::A(Done))],
            runs: 0,
            rows: &[(Prepare, Refused), (Abort, Done)],
            changes: &[],
        },
        Case {
            name: "unknown handler at commit time: RETRY until registered",
            steps: &[
                (Prepare, Y, V::A(Prepared)),
                (Commit, M, V::Retry),
                (Commit, Y, V::A(Done)),
            ],
            runs: 2,
            rows: &[(Prepare, Prepared), (Commit, Done)],
            changes: &[Prepare, Commit],
        },
        Case {
            name: "execute then compensate",
            steps: &[
                (Execute, Y, V::A(Succeeded)),
                (Compensate, Y, V::A(Done)),
                (Compensate, Y, V::A(Done)),
            ],
            runs: 2,
            rows: &[(Execute, Succeeded), (Compensate, Done)],
            changes: &[Execute, Compensate],
        },
        Case {
            name: "duplicate execute runs business once",
            steps: &[(Execute, Y, V::A(Succeeded)), (Execute, Y, V::A(Succeeded))],
            runs: 1,
            rows: &[(Execute, Succeeded)],
            changes: &[Execute],
        },
        Case {
            name: "compensate before execute: null compensation, later execute FAILED",
            steps: &[(Compensate, Y, V::A(Done)), (Execute, Y, V::A(Failed))],
            runs: 0,
            rows: &[(Execute, Failed), (Compensate, Done)],
            changes: &[],
        },
        Case {
            name: "failed execute: compensate records only",
            steps: &[(Execute, N, V::A(Failed)), (Compensate, Y, V::A(Done))],
            runs: 1,
            rows: &[(Execute, Failed), (Compensate, Done)],
            changes: &[],
        },
        Case {
            name: "prepare after abort is refused even though a prepare was recorded",
            steps: &[
                (Prepare, Y, V::A(Prepared)),
                (Abort, Y, V::A(Done)),
                (Prepare, Y, V::A(Refused)),
            ],
            runs: 2,
            rows: &[(Prepare, Prepared), (Abort, Done)],
            changes: &[Prepare, Abort],
        },
        Case {
            name: "execute after compensate is failed even though it succeeded before",
            steps: &[
                (Execute, Y, V::A(Succeeded)),
                (Compensate, Y, V::A(Done)),
                (Execute, Y, V::A(Failed)),
            ],
            runs: 2,
            rows: &[(Execute, Succeeded), (Compensate, Done)],
            changes: &[Execute, Compensate],
        },
        Case {
            name: "compensate handler refusing: RETRY",
            steps: &[(Execute, Y, V::A(Succeeded)), (Compensate, N, V::Retry)],
            runs: 2,
            rows: &[(Execute, Succeeded)],
            changes: &[Execute],
        },
    ];
    for case in &cases {
        check(h, case).await;
    }
}

/// Sixteen concurrent deliveries of one prepare: the business code runs once, every one is
/// answered PREPARED, one row.
pub async fn concurrent_duplicates_run_the_business_once<H: Harness>(h: &H) {
    let f = Fixture::new(h).await;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let call = f.call(Op::Prepare, Biz::Ok);
            let store = f.store.clone();
            tokio::spawn(async move {
                store
                    .deliver(Op::Prepare, ctx("g"), Bytes::from_static(b"payload"), call)
                    .await
            })
        })
        .collect();
    for t in tasks {
        let v = t.await.expect("delivery task");
        assert_eq!(short(&v), V::A(Answer::Prepared), "{v:?}");
    }
    assert_eq!(f.runs.load(Ordering::SeqCst), 1, "business runs");
    assert_eq!(f.rows("g").await, vec![(Op::Prepare, Answer::Prepared)]);
}

/// The rows of `g` are not those of `g2`.
pub async fn rows_of_one_gid_exclude_longer_gids<H: Harness>(h: &H) {
    let f = Fixture::new(h).await;
    f.deliver("g", Op::Prepare, Biz::Ok).await;
    f.deliver("g2", Op::Execute, Biz::Ok).await;
    assert_eq!(f.rows("g").await, vec![(Op::Prepare, Answer::Prepared)]);
    assert_eq!(f.store.all_rows().await.expect("all rows").len(), 2);
}

/// The in-doubt index: a `PREPARED` branch is open (with its payload and identity) until its
/// commit or abort; refused prepares and saga steps never are; the cutoff applies.
pub async fn in_doubt_lists_open_prepared_branches<H: Harness>(h: &H) {
    let f = Fixture::new(h).await;
    f.deliver("committed", Op::Prepare, Biz::Ok).await;
    f.deliver("aborted", Op::Prepare, Biz::Ok).await;
    f.deliver("refused", Op::Prepare, Biz::Refuse).await;
    f.deliver("saga", Op::Execute, Biz::Ok).await;
    let doubt = BranchContext {
        log_id: "log-1".into(),
        outcome_endpoint: "http://c:7700".into(),
        branch_id: 3,
        ..ctx("doubt")
    };
    let v = f
        .deliver_with(doubt, Op::Prepare, Biz::Ok, b"the payload")
        .await;
    assert_eq!(short(&v), V::A(Answer::Prepared));
    assert_eq!(f.open_gids().await, ["aborted", "committed", "doubt"]);
    f.deliver("committed", Op::Commit, Biz::Ok).await;
    f.deliver("aborted", Op::Abort, Biz::Ok).await;
    let list = f.store.in_doubt(None).await.expect("in doubt");
    assert_eq!(list.len(), 1, "{list:?}");
    let b = &list[0];
    assert_eq!(
        (b.gid.as_str(), b.branch_id, b.handler.as_str()),
        ("doubt", 3, "h")
    );
    assert_eq!(b.payload, b"the payload");
    assert_eq!(
        (b.log_id.as_str(), b.outcome_endpoint.as_str()),
        ("log-1", "http://c:7700")
    );
    // A cutoff before the prepare excludes it; one after includes it.
    assert!(f
        .store
        .in_doubt(Some(0))
        .await
        .expect("in doubt")
        .is_empty());
    assert_eq!(
        f.store
            .in_doubt(Some(u64::MAX))
            .await
            .expect("in doubt")
            .len(),
        1
    );
}

/// A prepared branch keeps its whole payload for a replay, whatever its size (1 MiB here).
pub async fn large_payloads_are_replayed_whole<H: Harness>(h: &H) {
    let f = Fixture::new(h).await;
    let payload: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let v = f
        .deliver_with(ctx("big"), Op::Prepare, Biz::Ok, &payload)
        .await;
    assert_eq!(short(&v), V::A(Answer::Prepared));
    let list = f.store.in_doubt(None).await.expect("in doubt");
    assert_eq!(list.len(), 1);
    assert!(list[0].payload == payload, "the payload comes back whole");
    // The same body again is a duplicate (its fingerprint matches).
    let again = f
        .deliver_with(ctx("big"), Op::Prepare, Biz::Ok, &payload)
        .await;
    assert_eq!(short(&again), V::A(Answer::Prepared));
    assert_eq!(f.runs.load(Ordering::SeqCst), 1);
}

/// Rows carry a sequence number in commit order, with no gaps within a transaction.
pub async fn rows_are_numbered_in_commit_order<H: Harness>(h: &H) {
    use Op::*;
    let f = Fixture::new(h).await;
    f.deliver("s", Execute, Biz::Ok).await; // 1
    f.deliver("t", Execute, Biz::Ok).await; // 2
    f.deliver("t", Compensate, Biz::Ok).await; // 3
    f.deliver("t", Compensate, Biz::Ok).await; // duplicate: no row
    f.deliver("s", Compensate, Biz::Ok).await; // 4
    f.deliver("n", Compensate, Biz::Ok).await; // null: execute 5, compensate 6
    assert_eq!(f.seq("s", Execute).await, 1);
    assert_eq!(f.seq("t", Execute).await, 2);
    assert_eq!(f.seq("t", Compensate).await, 3);
    assert_eq!(f.seq("s", Compensate).await, 4);
    assert_eq!(
        (f.seq("n", Execute).await, f.seq("n", Compensate).await),
        (5, 6)
    );
}

/// A gid delivered again with another body, or from another coordinator log, is another
/// transaction: refused, never answered from the old row, and the old row stays.
pub async fn reused_gid_with_another_body_is_refused<H: Harness>(h: &H) {
    let f = Fixture::new(h).await;
    let first = BranchContext {
        log_id: "log-1".into(),
        ..ctx("r")
    };
    let v = f
        .deliver_with(first.clone(), Op::Prepare, Biz::Ok, b"one")
        .await;
    assert_eq!(short(&v), V::A(Answer::Prepared));
    let other_body = f
        .deliver_with(first.clone(), Op::Prepare, Biz::Ok, b"two")
        .await;
    assert_eq!(short(&other_body), V::A(Answer::Refused), "{other_body:?}");
    let other_log = BranchContext {
        log_id: "log-2".into(),
        ..ctx("r")
    };
    let v = f
        .deliver_with(other_log, Op::Prepare, Biz::Ok, b"one")
        .await;
    assert_eq!(short(&v), V::A(Answer::Refused), "{v:?}");
    // A commit of the other body was never promised: a violation, no business code.
    let commit = f
        .deliver_with(first.clone(), Op::Commit, Biz::Ok, b"two")
        .await;
    assert_eq!(short(&commit), V::Violation, "{commit:?}");
    assert_eq!(f.runs.load(Ordering::SeqCst), 1);
    assert_eq!(f.rows("r").await, vec![(Op::Prepare, Answer::Prepared)]);
    // The real commit still works.
    let commit = f.deliver_with(first, Op::Commit, Biz::Ok, b"one").await;
    assert_eq!(short(&commit), V::A(Answer::Done));
}

/// A handler that panics: RETRY naming the panic, its writes rolled back, nothing recorded;
/// the store goes on serving.
pub async fn handler_panic_is_answered_retry_naming_it<H: Harness>(h: &H) {
    let f = Fixture::new(h).await;
    for op in [Op::Prepare, Op::Execute] {
        let gid = format!("panic-{op}");
        let v = f.deliver(&gid, op, Biz::Panic).await;
        match &v {
            Verdict::Retry(m) => assert!(
                m.contains("panicked") && m.contains("the scripted handler broke"),
                "a panic is reported as one, with its message: {m}"
            ),
            other => panic!("{op}: a panicking handler must be answered RETRY: {other:?}"),
        }
        assert!(f.rows(&gid).await.is_empty(), "{op}: nothing recorded");
        assert!(!f.has_change(&gid, op).await, "{op}: writes rolled back");
        let v = f.deliver(&gid, op, Biz::Ok).await;
        assert!(
            matches!(v, Verdict::Answer { .. }),
            "{op}: then served: {v:?}"
        );
        if H::PREPARE_HELD && op == Op::Prepare {
            // The prepare's change shows once committed.
            let v = f.deliver(&gid, Op::Commit, Biz::Ok).await;
            assert_eq!(short(&v), V::A(Answer::Done), "{op}: commit: {v:?}");
        }
        assert!(f.has_change(&gid, op).await);
    }
    assert!(
        f.store.failure().is_none(),
        "a panic is not a storage failure"
    );
}

/// A handler that asks for a retry: RETRY with its reason, nothing recorded, writes rolled
/// back (for a forward operation too: it is not a refusal).
pub async fn handler_retry_keeps_nothing<H: Harness>(h: &H) {
    let f = Fixture::new(h).await;
    for op in [Op::Prepare, Op::Execute] {
        let gid = format!("retry-{op}");
        let v = f.deliver(&gid, op, Biz::Retry).await;
        match &v {
            Verdict::Retry(m) => assert!(
                m.contains("the scripted dependency is down"),
                "the reason is given: {m}"
            ),
            other => panic!("{op}: a handler asking for a retry is answered RETRY: {other:?}"),
        }
        assert!(f.rows(&gid).await.is_empty(), "{op}: nothing recorded");
        assert!(!f.has_change(&gid, op).await, "{op}: writes rolled back");
    }
}

/// For a store that sweeps: pages hold whole gids in order; `sweep_gid` replaces unchanged
/// rows by a marker and refuses stale ones; every late delivery to a swept gid changes
/// nothing (no business code, no row) and answers safely; markers expire oldest first.
pub async fn sweep_replaces_finished_rows_by_a_marker<H: Harness>(h: &H) {
    let f = Fixture::<H>::new(h).await;
    if !f.store.sweeps() {
        return;
    }
    let from = |gid: &str| BranchContext {
        log_id: "log-1".into(),
        ..ctx(gid)
    };
    for (gid, op) in [
        ("g-2pc", Op::Prepare),
        ("g-2pc", Op::Commit),
        ("g-saga", Op::Execute),
        ("g-saga", Op::Compensate),
    ] {
        let v = f.deliver_with(from(gid), op, Biz::Ok, b"payload").await;
        assert!(matches!(v, Verdict::Answer { .. }), "{gid} {op}: {v:?}");
    }
    let runs = f.runs.load(Ordering::SeqCst);

    // Pages: whole gids, in gid order, the cursor names the last gid of the page.
    let page = f.store.sweep_page(None, 1).await.expect("a page");
    assert_eq!(page.next.as_deref(), Some("g-2pc"), "sweep: {page:?}");
    assert_eq!(page.rows.len(), 2, "sweep: a gid is never split: {page:?}");
    let rest = f
        .store
        .sweep_page(page.next.clone(), 100)
        .await
        .expect("a page");
    assert!(rest.next.is_none(), "sweep: last page: {rest:?}");
    assert!(
        rest.rows.len() == 2 && rest.rows.iter().all(|r| r.gid == "g-saga"),
        "sweep: second page: {rest:?}"
    );

    // Stale expectations: nothing deleted, no marker.
    let mut stale = rest.rows.clone();
    stale[0].seq += 100;
    let marker = |gid: &str, at| Swept::new(gid.to_string(), "log-1".into(), at);
    assert!(
        !f.store
            .sweep_gid(stale, marker("g-saga", 5))
            .await
            .expect("sweep"),
        "sweep: rows that changed are not swept"
    );
    assert!(f.store.swept("g-saga").await.expect("marker").is_none());
    assert_eq!(f.rows("g-saga").await.len(), 2, "sweep: stale rows kept");

    // Sweep both gids.
    assert!(f
        .store
        .sweep_gid(page.rows, marker("g-2pc", 5))
        .await
        .expect("sweep"));
    assert!(f
        .store
        .sweep_gid(rest.rows, marker("g-saga", 6))
        .await
        .expect("sweep"));
    for gid in ["g-2pc", "g-saga"] {
        assert!(f.rows(gid).await.is_empty(), "sweep: rows of {gid} deleted");
        let m = f.store.swept(gid).await.expect("marker");
        assert_eq!(
            m.map(|m| m.log_id),
            Some("log-1".to_string()),
            "sweep: marker of {gid}"
        );
    }
    let empty = f.store.sweep_page(None, 100).await.expect("a page");
    assert!(empty.rows.is_empty() && empty.next.is_none(), "{empty:?}");

    // Late duplicates: safe answers, no business code, nothing written.
    for (gid, op, log, want) in [
        ("g-2pc", Op::Prepare, "log-1", V::A(Answer::Refused)),
        ("g-2pc", Op::Commit, "log-1", V::A(Answer::Done)),
        ("g-2pc", Op::Abort, "log-1", V::A(Answer::Done)),
        ("g-2pc", Op::Commit, "log-2", V::Violation),
        ("g-saga", Op::Execute, "log-1", V::A(Answer::Failed)),
        ("g-saga", Op::Compensate, "log-1", V::A(Answer::Done)),
    ] {
        let c = BranchContext {
            log_id: log.into(),
            ..ctx(gid)
        };
        let v = f.deliver_with(c, op, Biz::Ok, b"payload").await;
        assert_eq!(
            short(&v),
            want,
            "sweep: late {op} to {gid} from {log}: {v:?}"
        );
        assert!(f.rows(gid).await.is_empty(), "sweep: late {op} wrote a row");
    }
    assert_eq!(
        f.runs.load(Ordering::SeqCst),
        runs,
        "sweep: late deliveries ran no business code"
    );
    assert!(f.open_gids().await.is_empty(), "sweep: nothing opened");

    // Markers expire oldest first, within the bound; then the gid is new again.
    assert_eq!(
        f.store
            .expire_swept(now_unix_ms(), 1)
            .await
            .expect("expire"),
        1
    );
    assert!(f.store.swept("g-2pc").await.expect("marker").is_none());
    assert!(f.store.swept("g-saga").await.expect("marker").is_some());
    assert_eq!(
        f.store.expire_swept(6, 10).await.expect("expire"),
        0,
        "only before 6"
    );
    assert_eq!(f.store.expire_swept(7, 10).await.expect("expire"), 1);
    let v = f
        .deliver_with(from("g-2pc"), Op::Prepare, Biz::Ok, b"payload")
        .await;
    assert_eq!(
        short(&v),
        V::A(Answer::Prepared),
        "sweep: a gid whose marker expired"
    );
}
