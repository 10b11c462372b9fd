//! The runtime under storage faults and adversarial clients, with the real runtime, a real
//! gRPC participant (a scripted fake) and the memory log's fault injection: a forced write
//! that fails, one that is slow, a gid reused after retention, a deadline beyond the timer
//! wheel, stuck transactions and the operator's ways out.
//!
//! Each test names the failure of the correctness issue it covers; each failed before its fix.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Request, Response, Status};
use treaty_coordinator::config::Config;
use treaty_coordinator::engine::{
    BranchDef, BranchRecord, BranchState, Mode, Outcome, Phase, RetryPolicy, Tombstone, TxRecord,
};
use treaty_coordinator::log::memory::{Fault, MemoryLog};
use treaty_coordinator::log::{ListFilter, ListPage, LogError, LogFuture, LogStats, LogStore};
use treaty_coordinator::runtime::{now_ms, BeginError, BeginRequest, Runtime, Wait};
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_server::{Participant, ParticipantServer};

/// What the fake participant answers, per operation; unset: the success answer.
#[derive(Clone, Default)]
struct Script {
    /// Answer phase-two calls with RETRY (a participant gone for good).
    phase_two_fails: bool,
    /// Answer `Prepare` with RETRY (a participant not ready yet).
    prepare_retries: bool,
}

#[derive(Clone, Default)]
struct Fake {
    script: Arc<Mutex<Script>>,
    calls: Arc<Mutex<Vec<(String, String, u32)>>>,
    requests: Arc<Mutex<Vec<pb::BranchRequest>>>,
}

impl Fake {
    fn record(&self, op: &str, r: &pb::BranchRequest) {
        self.calls
            .lock()
            .unwrap()
            .push((op.to_string(), r.gid.clone(), r.branch_id));
        self.requests.lock().unwrap().push(r.clone());
    }

    fn count(&self, op: &str, gid: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, g, _)| o == op && g == gid)
            .count()
    }

    fn phase_two(&self, op: &str, r: Request<pb::BranchRequest>) -> pb::PhaseTwoResponse {
        let r = r.into_inner();
        self.record(op, &r);
        if self.script.lock().unwrap().phase_two_fails {
            pb::PhaseTwoResponse {
                result: pb::PhaseTwoResult::Retry as i32,
                message: "participant is gone".into(),
            }
        } else {
            pb::PhaseTwoResponse {
                result: pb::PhaseTwoResult::Done as i32,
                message: String::new(),
            }
        }
    }
}

#[tonic::async_trait]
impl Participant for Fake {
    async fn prepare(
        &self,
        r: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        self.record("prepare", r.get_ref());
        let result = if self.script.lock().unwrap().prepare_retries {
            pb::PrepareResult::Retry
        } else {
            pb::PrepareResult::Prepared
        };
        Ok(Response::new(pb::PrepareResponse {
            result: result as i32,
            message: String::new(),
        }))
    }
    async fn commit(
        &self,
        r: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::PhaseTwoResponse>, Status> {
        Ok(Response::new(self.phase_two("commit", r)))
    }
    async fn abort(
        &self,
        r: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::PhaseTwoResponse>, Status> {
        Ok(Response::new(self.phase_two("abort", r)))
    }
    async fn execute(
        &self,
        r: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        self.record("execute", r.get_ref());
        Ok(Response::new(pb::ExecuteResponse {
            result: pb::ExecuteResult::Succeeded as i32,
            message: String::new(),
        }))
    }
    async fn compensate(
        &self,
        r: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::PhaseTwoResponse>, Status> {
        Ok(Response::new(self.phase_two("compensate", r)))
    }
}

struct Harness {
    rt: Runtime,
    log: Arc<MemoryLog>,
    fake: Fake,
    endpoint: String,
    _server: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self._server.abort();
    }
}

async fn harness(config: Config) -> Harness {
    harness_with(Arc::new(MemoryLog::new()), config).await
}

async fn harness_with(log: Arc<MemoryLog>, config: Config) -> Harness {
    let store: Arc<dyn LogStore> = log.clone();
    harness_over(log, store, config).await
}

/// A harness whose runtime writes to `store`, a wrapper around `log`.
async fn harness_over(log: Arc<MemoryLog>, store: Arc<dyn LogStore>, config: Config) -> Harness {
    let fake = Fake::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn({
        let fake = fake.clone();
        async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ParticipantServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        }
    });
    let rt = Runtime::new(store, config);
    Harness {
        rt,
        log,
        fake,
        endpoint,
        _server: server,
    }
}

/// `req` answered once its outcome is final (bounded at 5 s).
fn waiting(req: BeginRequest) -> BeginRequest {
    BeginRequest {
        wait: Wait::For(Duration::from_secs(5)),
        ..req
    }
}

fn fast_config() -> Config {
    Config {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        stuck_after_attempts: 3,
        call_timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

impl Harness {
    fn def(&self, gid: &str, mode: Mode, branches: usize, payload: &str) -> BeginRequest {
        let branches = (0..branches)
            .map(|_| BranchDef {
                endpoint: self.endpoint.clone(),
                handler: "h".into(),
                payload: bytes::Bytes::from(payload.to_string()),
                compensation_payload: bytes::Bytes::from_static(b"undo"),
            })
            .collect();
        BeginRequest {
            gid: Some(gid.to_string()),
            ..BeginRequest::new(mode, branches)
        }
    }

    /// Waits (bounded) until `cond` holds.
    async fn until(&self, what: &str, mut cond: impl FnMut(&Harness) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Failure 1: the `Committing` fsync fails. Before: the shard dropped the transaction and
/// `Begin(wait)` read the applied-but-not-durable record back from the log and answered
/// COMMITTED; after a restart the coordinator aborted it. Now the runtime fail-stops: no
/// answer claims an outcome, and the restarted coordinator's answer is the only one given.
#[tokio::test]
async fn a_failed_decision_fsync_is_never_reported_as_committed() {
    let h = harness(fast_config()).await;
    // `Begun` succeeds; the decision's fsync fails, as after an EIO.
    h.log.fault_at(Phase::Committing, Fault::Fail);
    let rt = h.rt.clone();
    let def = h.def("g-eio", Mode::TwoPhase, 2, "x");
    let begin = tokio::spawn(async move { rt.begin(waiting(def)).await });
    let answer = tokio::time::timeout(Duration::from_secs(10), begin)
        .await
        .expect("Begin answers")
        .expect("task");
    match answer {
        Ok(b) => assert_ne!(
            b.outcome,
            Outcome::Committed,
            "told COMMITTED although the decision is not durable"
        ),
        Err(BeginError::Log(LogError::Stopped(_))) => {}
        Err(e) => panic!("unexpected error {e}"),
    }
    assert!(
        h.rt.is_failed(),
        "the runtime fail-stops after a failed fsync"
    );
    assert_eq!(
        h.fake.count("commit", "g-eio"),
        0,
        "no Commit before a durable decision"
    );
    // Nothing is told from memory any more.
    assert!(matches!(
        h.rt.outcome("g-eio").await,
        Err(LogError::Stopped(_))
    ));
    assert!(matches!(h.rt.get("g-eio").await, Err(LogError::Stopped(_))));
    let listed = h.rt.list(&ListFilter::default(), None, 10).await;
    assert!(matches!(listed, Err(LogError::Stopped(_))));
    assert!(!h.rt.failed().await.is_empty(), "the reason is given");

    // Restart from what is on disk: the decision was never durable, so it aborts, and that
    // is the first outcome anyone hears.
    h.log.crash();
    h.log.fail_syncs(None);
    let log = Arc::clone(&h.log);
    drop(h);
    let h = harness_with(log, fast_config()).await;
    h.rt.recover().await.expect("recover");
    let o = h.rt.outcome("g-eio").await.expect("outcome");
    assert_eq!(o.outcome, Outcome::Aborted);
}

/// Failure 11 (and 1): while a forced write is in flight its record is not shown. Before:
/// `Get` showed COMMITTING (and the outcome COMMITTED to `Outcome`) before the decision
/// was durable.
#[tokio::test]
async fn get_and_outcome_never_show_a_decision_before_it_is_durable() {
    let h = harness(fast_config()).await;
    h.log.fault_at(Phase::Committing, Fault::Hold);
    let rt = h.rt.clone();
    let def = h.def("g-slow", Mode::TwoPhase, 1, "x");
    rt.begin(def).await.expect("begin");
    h.until("the decision is being written", |h| h.log.held_syncs() == 1)
        .await;
    // The decision is being written: not shown, not told, not acted on.
    let s = rt.get("g-slow").await.expect("get").expect("known");
    assert_eq!(
        s.record.phase,
        Phase::Active,
        "COMMITTING shown before durable"
    );
    assert_eq!(s.outcome, Outcome::Pending);
    let (listed, _) = rt
        .list(&ListFilter::default(), None, 10)
        .await
        .expect("list");
    assert_eq!(
        listed[0].record.phase,
        Phase::Active,
        "listed before durable"
    );
    let o = rt.outcome("g-slow").await.expect("outcome");
    assert_eq!(o.outcome, Outcome::Pending, "told COMMITTED before durable");
    assert_eq!(h.fake.count("commit", "g-slow"), 0);
    h.log.release_syncs();
    h.until("committed", |h| h.fake.count("commit", "g-slow") == 1)
        .await;
    let o = rt.outcome("g-slow").await.expect("outcome");
    assert_eq!((o.outcome, o.known), (Outcome::Committed, true));
}

/// Failure 6: a duplicate `Begin` was acknowledged before `Begun` was durable.
#[tokio::test]
async fn a_duplicate_begin_waits_for_begun_to_be_durable() {
    let h = harness(fast_config()).await;
    h.log.hold_syncs();
    let first = tokio::spawn({
        let (rt, def) = (h.rt.clone(), h.def("g-dup", Mode::Saga, 1, "x"));
        async move { rt.begin(def).await }
    });
    h.until("Begun is being written", |h| h.log.held_syncs() == 1)
        .await;
    let mut second = tokio::spawn({
        let (rt, def) = (h.rt.clone(), h.def("g-dup", Mode::Saga, 1, "x"));
        async move { rt.begin(def).await }
    });
    // Bounded check that it has *not* answered: a late answer passes, an early one fails.
    let early = tokio::time::timeout(Duration::from_millis(300), &mut second).await;
    assert!(
        early.is_err(),
        "the duplicate was acknowledged before Begun was durable"
    );
    assert!(
        h.rt.get("g-dup").await.expect("get").is_none(),
        "shown before durable"
    );
    h.log.release_syncs();
    let a = first.await.unwrap().expect("first begin");
    let b = second.await.unwrap().expect("second begin");
    assert!(!a.existing && b.existing);
}

/// Failure 3 (coordinator side): a gid reused after retention got a new transaction (or
/// COMMITTED from a branch's stale answer). Now a tombstone answers it: the same definition
/// gets the stored outcome, another one ALREADY_EXISTS; `Outcome` still knows it.
#[tokio::test]
async fn a_gid_reused_after_retention_is_answered_from_its_tombstone() {
    let config = Config {
        retention: Duration::ZERO,
        ..fast_config()
    };
    let h = harness(config).await;
    let b =
        h.rt.begin(waiting(h.def("g-reuse", Mode::Saga, 2, "x")))
            .await
            .expect("begin");
    assert_eq!(b.outcome, Outcome::Committed);
    h.until("finished", |h| h.rt.live() == 0).await;
    // Retention collects it (retention zero: everything finished before now).
    let h2 = &h;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (records, _) = h2.rt.collect_garbage().await.expect("gc");
        if records > 0 || h2.log.get("g-reuse").await.expect("get").is_none() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never collected");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        h.log.get("g-reuse").await.expect("get").is_none(),
        "collected"
    );
    let executed = h.fake.count("execute", "g-reuse");

    let again =
        h.rt.begin(waiting(h.def("g-reuse", Mode::Saga, 2, "x")))
            .await
            .expect("same definition again");
    assert!(again.existing);
    assert_eq!(again.outcome, Outcome::Committed);
    assert_eq!(
        h.fake.count("execute", "g-reuse"),
        executed,
        "never started again"
    );

    let other = h.rt.begin(h.def("g-reuse", Mode::Saga, 2, "y")).await;
    assert!(
        matches!(other, Err(BeginError::AlreadyExists(_))),
        "{other:?}"
    );
    let o = h.rt.outcome("g-reuse").await.expect("outcome");
    assert_eq!((o.outcome, o.known), (Outcome::Committed, true));
    // Only its tombstone is left: finished, so participants may sweep their rows of it.
    assert!(o.finished, "{o:?}");
    let unknown = h.rt.outcome("never-seen").await.expect("outcome");
    assert_eq!((unknown.outcome, unknown.known), (Outcome::Aborted, false));
    assert!(
        !unknown.finished,
        "an unknown gid is never finished: {unknown:?}"
    );
}

/// Failure 4 (coordinator side): every branch call names the log that drives it and where
/// to ask about the outcome.
#[tokio::test]
async fn branch_calls_carry_the_log_identity_and_the_outcome_endpoint() {
    let config = Config {
        advertise_url: Some("http://127.0.0.1:7700".into()),
        ..fast_config()
    };
    let h = harness(config).await;
    h.rt.begin(waiting(h.def("g-id", Mode::TwoPhase, 1, "x")))
        .await
        .expect("begin");
    let reqs = h.fake.requests.lock().unwrap().clone();
    assert!(!reqs.is_empty());
    for r in reqs {
        assert_eq!(r.log_id, h.log.log_id());
        assert_eq!(r.outcome_endpoint, "http://127.0.0.1:7700");
    }
}

/// Failure 5: a deadline beyond tokio-util's timer wheel (about 2.18 years; or a wall clock
/// far behind the one that set it) panicked the shard's `DelayQueue` at recovery, freezing
/// its transactions.
#[tokio::test]
async fn a_deadline_years_away_neither_panics_nor_freezes_a_shard() {
    let log = Arc::new(MemoryLog::new());
    let h = harness_with(Arc::clone(&log), fast_config()).await;
    let rec = TxRecord {
        gid: "g-far".into(),
        mode: Mode::Saga,
        phase: Phase::Active,
        branches: vec![BranchRecord {
            def: BranchDef {
                endpoint: h.endpoint.clone(),
                handler: "h".into(),
                payload: bytes::Bytes::from_static(b"x"),
                compensation_payload: bytes::Bytes::from_static(b"u"),
            },
            state: BranchState::Pending,
            attempts: 0,
            last_error: String::new(),
            resolution: None,
        }],
        created_unix_ms: now_ms(),
        updated_unix_ms: now_ms(),
        deadline_unix_ms: now_ms() + 3 * 365 * 24 * 3600 * 1000,
        retry: RetryPolicy::default(),
        stuck: false,
        seq: 1,
        reason: None,
        trace_parent: None,
    };
    log.put_sync(rec, true).expect("put");
    h.rt.recover().await.expect("recover");
    h.until("the saga ran and finished", |h| {
        h.fake.count("execute", "g-far") == 1 && h.rt.live() == 0
    })
    .await;
    assert!(!h.rt.is_failed());
    let s = h.rt.get("g-far").await.expect("get").expect("known");
    assert_eq!(s.record.phase, Phase::Committed);
}

/// Failure 7 and the operator paths: a stuck transaction is found by `List(stuck_only)`
/// however many newer records lie above it, `Retry` retries it now, and `Resolve` ends it
/// by hand with an audit trail.
#[tokio::test]
async fn stuck_transactions_are_listed_retried_and_resolved_by_hand() {
    let h = harness(fast_config()).await;
    h.fake.script.lock().unwrap().phase_two_fails = true;
    // "a..." sorts below every "z..." record: the old stuck one, under a wall of newer ones.
    h.rt.begin(h.def("a-stuck", Mode::TwoPhase, 2, "x"))
        .await
        .expect("begin");
    let wall = 250;
    for i in 0..wall {
        h.log
            .put_sync(
                TxRecord {
                    gid: format!("z{i:05}"),
                    mode: Mode::Saga,
                    phase: Phase::Committed,
                    branches: vec![],
                    created_unix_ms: 1,
                    updated_unix_ms: 1,
                    deadline_unix_ms: 0,
                    retry: RetryPolicy::default(),
                    stuck: false,
                    seq: 1,
                    reason: None,
                    trace_parent: None,
                },
                false,
            )
            .expect("put");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !h
        .rt
        .get("a-stuck")
        .await
        .expect("get")
        .is_some_and(|s| s.record.stuck)
    {
        assert!(tokio::time::Instant::now() < deadline, "never stuck");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stuck = ListFilter {
        stuck_only: true,
        ..ListFilter::default()
    };
    let mut found = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..=wall {
        let (page, next) = h.rt.list(&stuck, cursor.as_deref(), 1).await.expect("list");
        found.extend(page.into_iter().map(|s| s.record.gid));
        match next {
            None => break,
            Some(c) => cursor = Some(c),
        }
    }
    assert_eq!(found, ["a-stuck"]);

    // Retry sends the waiting calls now.
    let before = h.fake.count("commit", "a-stuck");
    let n = h.rt.retry("a-stuck").await.expect("retry");
    assert!(n.is_some());
    h.until("retried", |h| h.fake.count("commit", "a-stuck") > before)
        .await;

    // Resolve refuses phase one and unknown branches, then ends the branches by hand.
    assert!(h.rt.resolve("a-stuck", 9, "ops", "x").await.is_err());
    let s =
        h.rt.resolve("a-stuck", 0, "alice@ops", "committed by hand, ticket 7")
            .await
            .expect("resolve 0");
    let r = s.record.branches[0].resolution.clone().expect("recorded");
    assert_eq!(
        (r.operator.as_str(), r.reason.as_str()),
        ("alice@ops", "committed by hand, ticket 7")
    );
    assert!(r.unix_ms > 0);
    // The audit record is durable once resolve answered.
    h.log.crash();
    let durable = h.log.get("a-stuck").await.expect("get").expect("record");
    assert!(durable.branches[0].resolution.is_some());
    h.rt.resolve("a-stuck", 1, "alice@ops", "committed by hand, ticket 7")
        .await
        .expect("resolve 1");
    h.until("finished", |h| h.rt.live() == 0).await;
    let s = h.rt.get("a-stuck").await.expect("get").expect("known");
    assert_eq!(s.record.phase, Phase::Committed);
    assert!(!s.record.stuck);
}

/// Failure 9: the live-transaction cap answers `Begin` as overloaded, never queues without
/// bound; a waiter that gave up does not pile up.
#[tokio::test]
async fn the_live_transaction_cap_refuses_new_work() {
    let config = Config {
        max_live_transactions: 2,
        ..fast_config()
    };
    let h = harness(config).await;
    h.fake.script.lock().unwrap().phase_two_fails = true;
    for g in ["c1", "c2"] {
        h.rt.begin(h.def(g, Mode::TwoPhase, 1, "x"))
            .await
            .expect("begin");
    }
    let third = h.rt.begin(h.def("c3", Mode::TwoPhase, 1, "x")).await;
    assert!(matches!(third, Err(BeginError::Overloaded(_))), "{third:?}");
    // The same gid again is not new work: answered from the live transaction.
    let again = h.rt.begin(h.def("c1", Mode::TwoPhase, 1, "x")).await;
    assert!(again.expect("existing").existing);
    assert!(
        h.rt.get("c3").await.expect("get").is_none(),
        "nothing started"
    );
}

/// Failure 8: recovery acted on records a kill may have left only in the page cache. The
/// server now syncs the log before it recovers.
#[tokio::test]
async fn the_server_syncs_the_log_before_recovering() {
    let log = Arc::new(MemoryLog::new());
    let mut rec = TxRecord {
        gid: "g-cache".into(),
        mode: Mode::TwoPhase,
        phase: Phase::Aborting,
        branches: vec![],
        created_unix_ms: 1,
        updated_unix_ms: 1,
        deadline_unix_ms: 0,
        retry: RetryPolicy::default(),
        stuck: false,
        seq: 1,
        reason: None,
        trace_parent: None,
    };
    rec.branches = vec![];
    log.put_sync(rec, false).expect("put");
    assert_eq!(log.pending_writes(), 1, "in the page cache only");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let dyn_log: Arc<dyn LogStore> = log.clone();
    let server = tokio::spawn(treaty_coordinator::server::run(
        listener,
        dyn_log,
        fast_config(),
        async {
            let _ = stopped.await;
        },
    ));
    // The sync before recovery is the only flush this run makes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while log.stats().flushes == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never synced");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    log.crash();
    assert!(
        log.get("g-cache").await.expect("get").is_some(),
        "a crash now loses what recovery read"
    );
    let _ = stop.send(());
    server.await.unwrap().expect("clean stop");
}

/// The memory log, with the point reads of chosen gids held until released: a slow disk or a
/// slow network store, as seen by the shard that admits a `Begin`. A held read is issued at
/// call time, like every read (it sees the writes before it), and only answers late.
struct HeldReads {
    inner: Arc<MemoryLog>,
    held: Mutex<Vec<String>>,
    released: tokio::sync::watch::Sender<bool>,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

impl HeldReads {
    fn new(inner: Arc<MemoryLog>, held: &[&str]) -> HeldReads {
        HeldReads {
            inner,
            held: Mutex::new(held.iter().map(|g| g.to_string()).collect()),
            released: tokio::sync::watch::channel(false).0,
            waiting: Arc::default(),
        }
    }

    fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn release(&self) {
        self.held.lock().unwrap().clear();
        self.released.send_replace(true);
    }

    fn hold<T: Send + 'static>(&self, gid: &str, read: LogFuture<T>) -> LogFuture<T> {
        use futures::FutureExt;
        if !self.held.lock().unwrap().iter().any(|g| g == gid) {
            return read;
        }
        let mut released = self.released.subscribe();
        let waiting = Arc::clone(&self.waiting);
        waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let _ = released.wait_for(|r| *r).await;
            waiting.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            read.await
        }
        .boxed()
    }
}

impl LogStore for HeldReads {
    fn log_id(&self) -> &str {
        self.inner.log_id()
    }
    fn put(&self, rec: TxRecord, forced: bool) -> LogFuture<()> {
        self.inner.put(rec, forced)
    }
    fn get(&self, gid: &str) -> LogFuture<Option<TxRecord>> {
        self.hold(gid, self.inner.get(gid))
    }
    fn scan_active(&self, after_gid: Option<&str>, limit: usize) -> LogFuture<Vec<TxRecord>> {
        self.inner.scan_active(after_gid, limit)
    }
    fn list(&self, filter: &ListFilter, cursor: Option<&str>, limit: usize) -> LogFuture<ListPage> {
        self.inner.list(filter, cursor, limit)
    }
    fn collect_ended(&self, before: u64, now: u64, max: usize) -> LogFuture<usize> {
        self.inner.collect_ended(before, now, max)
    }
    fn get_tombstone(&self, gid: &str) -> LogFuture<Option<Tombstone>> {
        self.hold(gid, self.inner.get_tombstone(gid))
    }
    fn collect_tombstones(&self, before: u64, max: usize) -> LogFuture<usize> {
        self.inner.collect_tombstones(before, max)
    }
    fn sync(&self) -> LogFuture<()> {
        self.inner.sync()
    }
    fn stats(&self) -> LogStats {
        self.inner.stats()
    }
}

/// A `Begin` whose admission read is slow must neither block its shard (other gids, some on
/// the same shard, start and finish meanwhile) nor let a second `Begin` of the same gid past
/// it: the second waits behind the first, is told `existing`, and the transaction runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_admission_read_parks_only_its_gid() {
    let log = Arc::new(MemoryLog::new());
    let store = Arc::new(HeldReads::new(Arc::clone(&log), &["g-slow"]));
    let h = harness_over(log, store.clone(), fast_config()).await;
    let begin = |h: &Harness| {
        let (rt, def) = (h.rt.clone(), h.def("g-slow", Mode::Saga, 1, "x"));
        tokio::spawn(async move { rt.begin(def).await })
    };
    let first = begin(&h);
    h.until("the first Begin reads the log", |_| store.waiting() == 1)
        .await;
    let second = begin(&h);
    // More gids than shards: some share g-slow's shard, and that shard must serve them.
    let others = async {
        for i in 0..64 {
            let b =
                h.rt.begin(waiting(h.def(
                    &format!("g-other-{i:02}"),
                    Mode::Saga,
                    1,
                    "x",
                )))
                .await
                .expect("begin of another gid");
            assert_eq!(b.outcome, Outcome::Committed);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), others)
        .await
        .expect("other gids are served while g-slow's read is held (no shard blocks on it)");
    assert_eq!(
        store.waiting(),
        1,
        "the second Begin of g-slow read the log before the first was decided"
    );
    assert!(!first.is_finished() && !second.is_finished());
    store.release();
    let first = first.await.unwrap().expect("first begin");
    let second = second.await.unwrap().expect("second begin");
    assert!(!first.existing, "the first Begin starts the transaction");
    assert!(
        second.existing,
        "the second Begin finds the first one's transaction"
    );
    h.until("finished", |h| h.rt.live() == 0).await;
    assert_eq!(
        h.fake.count("execute", "g-slow"),
        1,
        "the transaction ran once"
    );
}

/// What waits behind a slow admission read is bounded: beyond
/// `ADMISSION_QUEUE_MAX` calls, a `Begin` of that gid is refused as overloaded at once, and
/// those that waited are answered once the read comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_behind_a_slow_admission_read_are_bounded() {
    use treaty_coordinator::runtime::ADMISSION_QUEUE_MAX;
    let log = Arc::new(MemoryLog::new());
    let store = Arc::new(HeldReads::new(Arc::clone(&log), &["g-slow"]));
    let h = harness_over(log, store.clone(), fast_config()).await;
    let begin = |h: &Harness| {
        let (rt, def) = (h.rt.clone(), h.def("g-slow", Mode::Saga, 1, "x"));
        tokio::spawn(async move { rt.begin(def).await })
    };
    let first = begin(&h);
    h.until("the first Begin reads the log", |_| store.waiting() == 1)
        .await;
    // One more than the queue holds: that one is refused without waiting for the read.
    let behind: Vec<_> = (0..=ADMISSION_QUEUE_MAX).map(|_| begin(&h)).collect();
    h.until("a Begin beyond the queue is refused", |_| {
        behind.iter().any(|t| t.is_finished())
    })
    .await;
    assert!(!first.is_finished());
    store.release();
    assert!(!first.await.unwrap().expect("first begin").existing);
    let (mut existing, mut refused) = (0, 0);
    for b in behind {
        match b.await.unwrap() {
            Ok(b) => {
                assert!(b.existing, "a second start of g-slow");
                existing += 1;
            }
            Err(BeginError::Overloaded(why)) => {
                assert!(why.contains("wait for its Begin"), "{why}");
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((existing, refused), (ADMISSION_QUEUE_MAX, 1));
    h.until("finished", |h| h.rt.live() == 0).await;
    assert_eq!(
        h.fake.count("execute", "g-slow"),
        1,
        "the transaction ran once"
    );
}

/// Several coordinators share one log (PostgreSQL): a transaction driven by one is followed
/// by the others from the log. Before, a second coordinator answered `Begin` with `wait` for
/// an existing gid it does not drive with PENDING at once, and its `Watch` ended after one
/// non-terminal state. Two runtimes over one memory log stand for two coordinators.
#[tokio::test]
async fn a_coordinator_follows_a_transaction_another_drives_in_the_shared_log() {
    use futures::StreamExt;
    use treaty_coordinator::api::CoordinatorService;
    use treaty_proto::v1::coordinator_server::Coordinator;

    let a = harness(fast_config()).await;
    a.fake.script.lock().unwrap().prepare_retries = true;
    let b = Runtime::new(a.log.clone(), fast_config());
    let def = a.def("g-shared", Mode::TwoPhase, 1, "x");
    // A begins and drives it; its participant is not ready, so it stays undecided.
    a.rt.begin(def.clone()).await.expect("begin at A");
    a.until("A is retrying the prepare", |h| {
        h.fake.count("prepare", "g-shared") >= 2
    })
    .await;

    // B is asked for the same transaction: the resubmission of a client that failed over,
    // and a watch.
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.begin(waiting(def)).await }
    });
    let service = CoordinatorService::new(b.clone());
    let mut watch = service
        .watch(Request::new(pb::WatchRequest {
            gid: "g-shared".into(),
        }))
        .await
        .expect("watch at B")
        .into_inner();
    let first = watch.next().await.expect("a first state").expect("ok");
    assert_eq!(first.state(), pb::TxState::Active);

    // The participant gets ready; A commits.
    a.fake.script.lock().unwrap().prepare_retries = false;
    let begun = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("B's Begin answers")
        .expect("task")
        .expect("B's Begin");
    assert!(begun.existing, "B did not start it again");
    assert_eq!(
        begun.outcome,
        Outcome::Committed,
        "B waited for A's outcome through the log"
    );
    let mut last = first;
    while let Some(item) = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("B's watch goes on until the terminal state")
    {
        last = item.expect("ok");
    }
    assert_eq!(last.state(), pb::TxState::Committed);
    assert_eq!(a.fake.count("commit", "g-shared"), 1, "only A drove it");
    assert_eq!(b.live(), 0, "B never took it into its shards");
}
