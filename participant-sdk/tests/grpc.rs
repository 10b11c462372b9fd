//! The SDK over real gRPC on 127.0.0.1 (port 0): the participant service called through the
//! generated client, in-doubt resolution against a fake coordinator, and the client's
//! submit path and error classification.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use treaty_proto::v1::participant_client::ParticipantClient;
use treaty_proto::v1::participant_server::Participant as _;
use treaty_sdk::sled::SledStore;
use treaty_sdk::{
    refuse, Answer, Branch, BranchContext, Client, ClientError, HandlerResult, Op, Outcome,
    OutcomeAnswer, Participant, ParticipantBuilder, ParticipantError, RetentionPolicy, Saga,
    SagaHandler, Step, TwoPhase, TwoPhaseHandler, Txn,
};

/// A sled store, and a participant whose handlers write `<op>/<gid>/<branch>` keys;
/// "debit" refuses a payload of `no`.
struct Node {
    _dir: tempfile::TempDir,
    tree: sled::Tree,
    participant: Participant<SledStore>,
}

/// The handler of every node: a 2PC handler and a saga handler that record what they did.
struct Mark;

impl Mark {
    fn mark(
        op: &str,
        ctx: &BranchContext,
        tx: &mut Txn<'_, SledStore>,
        payload: &[u8],
    ) -> HandlerResult {
        if payload == b"no" {
            return Err(refuse("the payload says no"));
        }
        tx.insert(
            format!("{op}/{}/{}", ctx.gid, ctx.branch_id).as_bytes(),
            payload,
        )?;
        Ok(())
    }
}

impl TwoPhaseHandler<SledStore> for Mark {
    async fn prepare(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, SledStore>,
        payload: &[u8],
    ) -> HandlerResult {
        Mark::mark("prepare", ctx, tx, payload)
    }
    async fn commit(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, SledStore>,
        payload: &[u8],
    ) -> HandlerResult {
        Mark::mark("commit", ctx, tx, payload)
    }
    async fn abort(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, SledStore>,
        payload: &[u8],
    ) -> HandlerResult {
        Mark::mark("abort", ctx, tx, payload)
    }
}

impl SagaHandler<SledStore> for Mark {
    async fn execute(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, SledStore>,
        payload: &[u8],
    ) -> HandlerResult {
        Mark::mark("execute", ctx, tx, payload)
    }
    async fn compensate(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, SledStore>,
        payload: &[u8],
    ) -> HandlerResult {
        Mark::mark("compensate", ctx, tx, payload)
    }
}

fn node(coordinator: Option<String>) -> Node {
    node_with(|b| match coordinator {
        Some(uri) => b.coordinator(uri),
        None => b,
    })
}

/// A node whose builder `configure` finishes (coordinator, more handlers).
fn node_with(
    configure: impl FnOnce(ParticipantBuilder<SledStore>) -> ParticipantBuilder<SledStore>,
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open_dir(dir.path(), "business").unwrap();
    let tree = store.tree().clone();
    let b = Participant::builder(store)
        .two_phase("debit", Mark)
        .saga("book", Mark);
    Node {
        _dir: dir,
        tree,
        participant: configure(b).build().unwrap(),
    }
}

impl Node {
    fn has(&self, op: &str, gid: &str) -> bool {
        self.tree.get(format!("{op}/{gid}/0")).unwrap().is_some()
    }

    fn rows(&self, gid: &str) -> Vec<(Op, Answer)> {
        self.participant
            .store()
            .try_rows(gid)
            .unwrap()
            .into_iter()
            .map(|r| (r.op, r.answer))
            .collect()
    }
}

fn req(gid: &str, handler: &str, payload: &[u8]) -> pb::BranchRequest {
    pb::BranchRequest {
        gid: gid.to_string(),
        branch_id: 0,
        handler: handler.to_string(),
        payload: payload.to_vec().into(),
        attempt: 1,
        deadline_unix_ms: 0,
        ..Default::default()
    }
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// Polls `cond` every 10 ms for at most 10 s.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn participant_over_grpc() {
    let n = node(None);
    let (l, addr) = listener().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(n.participant.clone().serve(l, async {
        let _ = stopped.await;
    }));
    let mut c = ParticipantClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // Prepare twice, commit twice: business once each.
    for _ in 0..2 {
        let r = c
            .prepare(req("t1", "debit", b"10"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::PrepareResult::Prepared, "{r:?}");
    }
    for _ in 0..2 {
        let r = c
            .commit(req("t1", "debit", b"10"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::PhaseTwoResult::Done, "{r:?}");
    }
    assert!(n.has("prepare", "t1") && n.has("commit", "t1"));
    assert_eq!(
        n.rows("t1"),
        vec![(Op::Commit, Answer::Done), (Op::Prepare, Answer::Prepared)]
    );

    // Refused prepare: message carries the reason, no business change.
    let r = c
        .prepare(req("t2", "debit", b"no"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PrepareResult::Refused);
    assert!(r.message.contains("the payload says no"), "{r:?}");
    assert!(!n.has("prepare", "t2"));

    // Abort before prepare, then the late prepare is refused.
    let r = c
        .abort(req("t3", "debit", b"1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Done);
    let r = c
        .prepare(req("t3", "debit", b"1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PrepareResult::Refused);
    assert!(!n.has("prepare", "t3"));

    // Commit without prepare: RETRY, no business.
    let r = c
        .commit(req("t4", "debit", b"1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Retry);
    assert!(r.message.contains("protocol violation"), "{r:?}");
    assert!(!n.has("commit", "t4"));

    // Saga: compensate before execute, then execute FAILED; a normal step SUCCEEDED.
    let r = c
        .compensate(req("s1", "book", b"x"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Done);
    let r = c
        .execute(req("s1", "book", b"x"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::ExecuteResult::Failed);
    let r = c
        .execute(req("s2", "book", b"x"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::ExecuteResult::Succeeded);
    assert!(n.has("execute", "s2") && !n.has("execute", "s1"));

    // Unknown handler / wrong kind.
    let r = c
        .prepare(req("u1", "nope", b""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PrepareResult::Refused);
    assert!(r.message.contains("unknown handler"), "{r:?}");
    let r = c
        .execute(req("u2", "debit", b""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::ExecuteResult::Failed);
    assert!(r.message.contains("unknown handler"), "{r:?}");
    // Commit needs the handler to run business code: RETRY until it is deployed.
    let r = c
        .commit(req("t1b", "debit", b"1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Retry);
    c.prepare(req("t5", "debit", b"1")).await.unwrap();
    // A commit naming another handler is not the body that was prepared (the fingerprint
    // covers the handler): a violation, never run. (A handler missing at commit time is in
    // the barrier's table.)
    let r = c
        .commit(req("t5", "renamed", b"1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Retry);
    assert!(r.message.contains("different body"), "{r:?}");

    // Empty gid.
    let err = c.prepare(req("", "debit", b"1")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("gid"), "{err:?}");

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A coordinator that answers `Outcome` from a table (unknown gids: PENDING, so the test
/// notices a wrong question), counts the questions, and records `Begin` requests, answering
/// them with `begin_answer`.
///
/// Answers name the fake's `log_id`; table answers are `known = true`. With
/// `presume_unknown`, a gid not in the table is answered ABORTED with `known = false`, as a
/// real coordinator does (presumed abort), for example after its log was wiped.
#[derive(Default, Clone)]
struct FakeCoordinator {
    outcomes: Arc<Mutex<HashMap<String, pb::Outcome>>>,
    asked: Arc<Mutex<Vec<String>>>,
    begun: Arc<Mutex<Vec<pb::BeginRequest>>>,
    begin_answer: Arc<Mutex<Option<Result<pb::Outcome, Status>>>>,
    log_id: String,
    presume_unknown: bool,
    /// Gids answered `finished = true` (terminal and durable).
    finished: Arc<Mutex<HashSet<String>>>,
}

impl FakeCoordinator {
    fn with_log(log_id: &str, presume_unknown: bool) -> FakeCoordinator {
        FakeCoordinator {
            log_id: log_id.to_string(),
            presume_unknown,
            ..Default::default()
        }
    }

    fn asked(&self) -> Vec<String> {
        let mut a = self.asked.lock().unwrap().clone();
        a.sort();
        a
    }
}

#[tonic::async_trait]
impl Coordinator for FakeCoordinator {
    async fn begin(
        &self,
        r: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        let r = r.into_inner();
        let gid = r.gid.clone();
        self.begun.lock().unwrap().push(r);
        let outcome = self
            .begin_answer
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(Ok(pb::Outcome::Pending))?;
        Ok(Response::new(pb::BeginResponse {
            gid,
            outcome: outcome as i32,
            existing: false,
            reason: String::new(),
        }))
    }
    async fn get(&self, _: Request<pb::GetRequest>) -> Result<Response<pb::Transaction>, Status> {
        Err(Status::not_found("no such transaction"))
    }
    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Transaction, Status>> + Send>>;
    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn outcome(
        &self,
        r: Request<pb::OutcomeRequest>,
    ) -> Result<Response<pb::OutcomeResponse>, Status> {
        let gid = r.into_inner().gid;
        self.asked.lock().unwrap().push(gid.clone());
        let (o, known) = match self.outcomes.lock().unwrap().get(&gid).copied() {
            Some(o) => (o, true),
            None if self.presume_unknown => (pb::Outcome::Aborted, false),
            None => (pb::Outcome::Pending, false),
        };
        Ok(Response::new(pb::OutcomeResponse {
            outcome: o as i32,
            known,
            log_id: self.log_id.clone(),
            finished: self.finished.lock().unwrap().contains(&gid),
        }))
    }
    async fn retry(
        &self,
        _: Request<pb::RetryRequest>,
    ) -> Result<Response<pb::RetryResponse>, Status> {
        Err(Status::unavailable("fake is down"))
    }
    async fn resolve(
        &self,
        _: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::Transaction>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves `fake` on 127.0.0.1:0; returns its URI and a stopper.
async fn serve_fake(fake: FakeCoordinator) -> (String, oneshot::Sender<()>) {
    let (l, addr) = listener().await;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(fake))
            .serve_with_incoming_shutdown(TcpListenerStream::new(l), async {
                let _ = stopped.await;
            }),
    );
    (format!("http://{addr}"), stop)
}

#[tokio::test]
async fn resolve_in_doubt_applies_the_coordinators_outcome() {
    let fake = FakeCoordinator::default();
    fake.outcomes.lock().unwrap().extend([
        ("c".to_string(), pb::Outcome::Committed),
        ("a".to_string(), pb::Outcome::Aborted),
    ]);
    let (uri, _stop) = serve_fake(fake.clone()).await;
    let n = node(Some(uri));
    let p = &n.participant;
    for gid in ["c", "a", "pending", "done"] {
        let r = p
            .prepare(Request::new(req(gid, "debit", b"7")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::PrepareResult::Prepared);
    }
    p.commit(Request::new(req("done", "debit", b"7")))
        .await
        .unwrap();

    // First round: every prepared, unfinished branch is in doubt, whatever its age.
    assert_eq!(p.resolve_in_doubt().await.unwrap().resolved, 2);
    let mut asked = fake.asked.lock().unwrap().clone();
    asked.sort();
    assert_eq!(asked, vec!["a", "c", "pending"]);
    assert!(n.has("commit", "c") && !n.has("abort", "c"));
    assert!(n.has("abort", "a") && !n.has("commit", "a"));
    assert!(!n.has("commit", "pending") && !n.has("abort", "pending"));
    // The replayed commit used the payload stored with the prepare.
    assert_eq!(
        n.tree.get("commit/c/0").unwrap().as_deref(),
        Some(&b"7"[..])
    );
    assert!(n.rows("c").contains(&(Op::Commit, Answer::Done)));

    // Later rounds only ask about branches older than in_doubt_after (30 s): none here.
    fake.asked.lock().unwrap().clear();
    assert_eq!(p.resolve_in_doubt().await.unwrap().resolved, 0);
    assert!(fake.asked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn serve_runs_the_in_doubt_resolver() {
    let fake = FakeCoordinator::default();
    fake.outcomes
        .lock()
        .unwrap()
        .insert("c".to_string(), pb::Outcome::Committed);
    let (uri, _stop) = serve_fake(fake).await;
    let n = node(Some(uri));
    n.participant
        .prepare(Request::new(req("c", "debit", b"1")))
        .await
        .unwrap();
    let (l, _) = listener().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(n.participant.clone().serve(l, async {
        let _ = stopped.await;
    }));
    wait_for("the resolver to commit", || n.has("commit", "c")).await;
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A coordinator that cannot be asked (none named, none configured, nothing listening)
/// leaves the branch in doubt, counted as unanswered; the round does not fail.
#[tokio::test]
async fn resolve_in_doubt_without_coordinator_or_unreachable() {
    let (_, addr) = listener().await; // bound then dropped: nothing listens there
    let uri = format!("http://{addr}");
    // Nothing in doubt: no need to connect.
    let n = node(Some(uri.clone()));
    assert_eq!(
        n.participant.resolve_in_doubt().await.unwrap().unanswered,
        0
    );
    // Something in doubt (first round: whatever its age), coordinator unreachable.
    let n = node(Some(uri));
    n.participant
        .prepare(Request::new(req("x", "debit", b"1")))
        .await
        .unwrap();
    let r = n.participant.resolve_in_doubt().await.unwrap();
    assert_eq!((r.resolved, r.unanswered), (0, 1), "{r:?}");
    // No coordinator configured and none named by the branch.
    let n = node(None);
    prepared(&n.participant, req("y", "debit", b"1")).await;
    let r = n.participant.resolve_in_doubt().await.unwrap();
    assert_eq!((r.resolved, r.unanswered), (0, 1), "{r:?}");
    // No coordinator configured, but the branch names one: asked there.
    let c = FakeCoordinator::with_log("log-1", true);
    let (curi, _stop) = serve_fake(c.clone()).await;
    prepared(&n.participant, req_from("z", b"1", "log-1", &curi)).await;
    let r = n.participant.resolve_in_doubt().await.unwrap();
    assert_eq!((r.resolved, r.unanswered), (1, 1), "{r:?}");
    assert!(n.has("abort", "z") && !n.has("abort", "y"));
}

#[tokio::test]
async fn builder_rejects_duplicate_handler_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open_dir(dir.path(), "t").unwrap();
    let err = Participant::builder(store)
        .saga(
            "x",
            Saga::<SledStore>::new()
                .execute(async |_, _, _| Ok(()))
                .compensate(async |_, _, _| Ok(())),
        )
        .two_phase(
            "x",
            TwoPhase::<SledStore>::new()
                .prepare(async |_, _, _| Ok(()))
                .commit(async |_, _, _| Ok(()))
                .abort(async |_, _, _| Ok(())),
        )
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, ParticipantError::Config(m) if m.contains("\"x\"")),
        "{err}"
    );
}

/// A panicking handler is answered RETRY naming the panic (never as a configuration error),
/// nothing is recorded, and the participant goes on serving.
#[tokio::test]
async fn a_panicking_handler_is_answered_retry_naming_the_panic() {
    let n = node_with(|b| {
        b.two_phase(
            "boom",
            TwoPhase::<SledStore>::new()
                .prepare(async |ctx, tx, _| {
                    tx.insert(b"boom", b"x".as_slice())?;
                    if ctx.attempt == 1 {
                        panic!("the ledger is on fire");
                    }
                    Ok(())
                })
                .commit(async |_, _, _| Ok(()))
                .abort(async |_, _, _| Ok(())),
        )
    });
    let r = n
        .participant
        .prepare(Request::new(req("p", "boom", b"1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PrepareResult::Retry, "{r:?}");
    assert!(
        r.message.contains("panicked") && r.message.contains("the ledger is on fire"),
        "{}",
        r.message
    );
    assert!(n.rows("p").is_empty());
    assert!(n.tree.get(b"boom").unwrap().is_none(), "rolled back");
    assert!(n.participant.failure().is_none());
    let again = pb::BranchRequest {
        attempt: 2,
        ..req("p", "boom", b"1")
    };
    let r = n
        .participant
        .prepare(Request::new(again))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PrepareResult::Prepared, "{r:?}");
}

/// The coordinator can be given as a channel built by the caller (TLS, interceptors): the
/// resolver asks through it for branches naming that coordinator, or none.
#[tokio::test]
async fn resolver_asks_through_a_coordinator_channel() {
    let fake = FakeCoordinator::with_log("log-1", true);
    fake.outcomes
        .lock()
        .unwrap()
        .insert("c".to_string(), pb::Outcome::Committed);
    let (uri, _stop) = serve_fake(fake.clone()).await;
    let channel = tonic::transport::Endpoint::from_shared(uri)
        .unwrap()
        .connect_lazy();
    // The name the branches give is not dialable: only the channel reaches the coordinator.
    let name = "http://coordinator.invalid:7700";
    let n = node_with(|b| b.coordinator_channel(name, channel));
    prepared(&n.participant, req_from("c", b"1", "log-1", name)).await;
    prepared(&n.participant, req_from("d", b"1", "log-1", "")).await;
    let r = n.participant.resolve_in_doubt().await.unwrap();
    assert_eq!((r.resolved, r.unanswered), (2, 0), "{r:?}");
    assert!(n.has("commit", "c") && n.has("abort", "d"));
    let mut asked = fake.asked();
    asked.sort();
    assert_eq!(asked, ["c", "d"]);
}

#[tokio::test]
async fn client_submits_and_classifies_errors() {
    let fake = FakeCoordinator::default();
    let (uri, _stop) = serve_fake(fake.clone()).await;
    let client = Client::connect(uri).await.unwrap();

    // Generated gid: a UUIDv7, sent with the request.
    let submitted = client
        .saga()
        .step(
            Step::new("http://127.0.0.1:1", "book")
                .payload(&b"p"[..])
                .compensation(&b"c"[..]),
        )
        .step(
            Step::new("http://127.0.0.1:2", "book")
                .payload_json(&serde_json::json!({"room": 12}))
                .compensation_json(&12),
        )
        .deadline(Duration::from_secs(3))
        .submit()
        .await
        .unwrap();
    let gid = submitted.gid;
    assert_eq!(uuid::Uuid::parse_str(&gid).unwrap().get_version_num(), 7);
    assert_eq!(submitted.outcome, Outcome::Pending);
    assert!(!submitted.existing);
    {
        let begun = fake.begun.lock().unwrap();
        let b = &begun[0];
        assert_eq!(b.gid, gid);
        assert_eq!(b.mode(), pb::Mode::Saga);
        assert_eq!(b.deadline_ms, 3000);
        assert!(!b.wait);
        assert_eq!(b.branches.len(), 2);
        assert_eq!(b.branches[0].endpoint, "http://127.0.0.1:1");
        assert_eq!(b.branches[0].handler, "book");
        assert_eq!(&b.branches[0].payload[..], b"p");
        assert_eq!(&b.branches[0].compensation_payload[..], b"c");
        assert_eq!(&b.branches[1].payload[..], br#"{"room":12}"#);
        assert_eq!(&b.branches[1].compensation_payload[..], b"12");
    }

    // submit_and_wait: the outcome comes back.
    *fake.begin_answer.lock().unwrap() = Some(Ok(pb::Outcome::Committed));
    let submitted = client
        .two_phase()
        .gid("mine")
        .branch(Branch::new("http://127.0.0.1:1", "debit").payload(&b"1"[..]))
        .submit_and_wait(Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(submitted.gid, "mine");
    assert_eq!(submitted.outcome, Outcome::Committed);
    {
        let begun = fake.begun.lock().unwrap();
        assert_eq!(begun[1].gid, "mine");
        assert!(begun[1].wait);
        assert_eq!(begun[1].wait_timeout_ms, 2000);
    }

    // Rejected: bad input.
    *fake.begin_answer.lock().unwrap() = Some(Err(Status::invalid_argument("too many branches")));
    let err = client.two_phase().submit().await.unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Rejected {
                code: Code::InvalidArgument,
                ..
            }
        ),
        "{err:?}"
    );

    // Unknown outcome: names the gid it used.
    *fake.begin_answer.lock().unwrap() = Some(Err(Status::unavailable("connection reset")));
    let err = client.saga().gid("lost").submit().await.unwrap_err();
    assert!(
        matches!(&err, ClientError::OutcomeUnknown { gid, .. } if gid == "lost"),
        "{err:?}"
    );
    assert!(err.to_string().contains("lost"));

    // Read calls.
    let err = client.get("nope").await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Rejected {
                code: Code::NotFound,
                ..
            }
        ),
        "{err:?}"
    );
    let err = client.retry("g").await.unwrap_err();
    assert!(matches!(err, ClientError::Unavailable { .. }), "{err:?}");
    fake.outcomes
        .lock()
        .unwrap()
        .insert("g".into(), pb::Outcome::Aborted);
    assert_eq!(
        client.outcome("g").await.unwrap(),
        OutcomeAnswer {
            outcome: Outcome::Aborted,
            known: true,
            log_id: fake.log_id.clone(),
        }
    );
}

#[tokio::test]
async fn client_connect_errors() {
    let err = Client::connect("not a uri").await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidInput(_)), "{err:?}");
    let (_, addr) = listener().await;
    let err = Client::connect(format!("http://{addr}")).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    // An https URI is dialled with TLS; a CA file that cannot be read is named before
    // anything is dialled.
    let (l, addr) = listener().await;
    let options = treaty_sdk::ClientOptions::new()
        .tls(treaty_sdk::TlsConfig::new().ca_file("/nonexistent/treaty-ca.pem"));
    let err = Client::connect_with(format!("https://{addr}"), &options)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidInput(m) if m.contains("/nonexistent/treaty-ca.pem")),
        "{err:?}"
    );
    drop(l);
}

/// A payload that does not serialize fails the submit before anything is sent, naming the
/// branch and handler.
#[tokio::test]
async fn client_refuses_a_payload_that_does_not_serialize() {
    let fake = FakeCoordinator::default();
    let (uri, _stop) = serve_fake(fake.clone()).await;
    let client = Client::connect(uri).await.unwrap();
    // JSON object keys must be strings.
    let bad: std::collections::BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
    let err = client
        .two_phase()
        .branch(Branch::new("http://127.0.0.1:1", "debit").payload_json(&1))
        .branch(Branch::new("http://127.0.0.1:2", "credit").payload_json(&bad))
        .submit()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::InvalidInput(m) if m.contains("branch 1") && m.contains("\"credit\"")),
        "{err:?}"
    );
    assert!(fake.begun.lock().unwrap().is_empty());
}

/// A client built on the caller's channel (here a lazy one: nothing is dialed until the
/// first call) works like a connected one, and the caller's interceptor runs on every call.
#[tokio::test]
async fn client_from_channel_and_interceptor() {
    let fake = FakeCoordinator::default();
    let (uri, _stop) = serve_fake(fake.clone()).await;
    let channel = tonic::transport::Endpoint::from_shared(uri)
        .unwrap()
        .connect_lazy();

    let client = Client::from_channel(channel.clone());
    let submitted = client
        .saga()
        .gid("over-my-channel")
        .step(Step::new("http://127.0.0.1:1", "book"))
        .submit()
        .await
        .unwrap();
    assert_eq!(submitted.gid, "over-my-channel");

    let stamped = Client::from_channel_with_interceptor(channel.clone(), |mut req| {
        req.metadata_mut()
            .insert("x-caller", "test".parse().unwrap());
        Ok(req)
    });
    stamped
        .saga()
        .gid("stamped")
        .step(Step::new("http://127.0.0.1:1", "book"))
        .submit()
        .await
        .unwrap();
    assert_eq!(fake.begun.lock().unwrap()[1].gid, "stamped");

    // An interceptor's refusal fails the call before it is sent: nothing was applied.
    let refusing = Client::from_channel_with_interceptor(channel, |_| {
        Err(Status::unauthenticated("no credentials"))
    });
    let err = refusing
        .saga()
        .gid("refused")
        .step(Step::new("http://127.0.0.1:1", "book"))
        .submit()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Rejected {
                code: Code::Unauthenticated,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(fake.begun.lock().unwrap().len(), 2);
}

/// A branch request as a coordinator with log `log_id` sends it, naming `endpoint` as the
/// place to ask for its outcome.
fn req_from(gid: &str, payload: &[u8], log_id: &str, endpoint: &str) -> pb::BranchRequest {
    pb::BranchRequest {
        log_id: log_id.to_string(),
        outcome_endpoint: endpoint.to_string(),
        ..req(gid, "debit", payload)
    }
}

async fn prepared(p: &Participant<SledStore>, r: pb::BranchRequest) {
    let a = p.prepare(Request::new(r)).await.unwrap().into_inner();
    assert_eq!(a.result(), pb::PrepareResult::Prepared, "{a:?}");
}

/// Issue 8: a participant shared by two coordinators asks each branch's own coordinator, and
/// acts only on an answer from the log that drove the branch.
#[tokio::test]
async fn resolver_asks_the_log_that_drove_the_branch() {
    let a = FakeCoordinator::with_log("log-a", true);
    let b = FakeCoordinator::with_log("log-b", true);
    b.outcomes
        .lock()
        .unwrap()
        .insert("from-b".to_string(), pb::Outcome::Committed);
    let (uri_a, _stop_a) = serve_fake(a.clone()).await;
    let (uri_b, _stop_b) = serve_fake(b.clone()).await;
    // The configured coordinator is A; B's branch names B.
    let n = node(Some(uri_a.clone()));
    let p = &n.participant;
    prepared(p, req_from("from-b", b"5", "log-b", &uri_b)).await;
    // A branch of A's log that A no longer knows: presumed abort is valid from A.
    prepared(p, req_from("from-a", b"6", "log-a", "")).await;

    p.resolve_in_doubt().await.unwrap();
    assert_eq!(b.asked(), vec!["from-b"], "B's branch is asked of B");
    assert_eq!(
        a.asked(),
        vec!["from-a"],
        "A's branch (no endpoint) is asked of A"
    );
    assert!(n.has("commit", "from-b") && !n.has("abort", "from-b"));
    assert!(n.has("abort", "from-a") && !n.has("commit", "from-a"));
}

/// Issue 8: a coordinator whose log was wiped (new log id, every gid unknown) must not make
/// a participant abort a branch it prepared for the old log: presumed abort is valid only
/// from the log that drove the branch.
#[tokio::test]
async fn wiped_coordinator_does_not_make_the_participant_abort() {
    let wiped = FakeCoordinator::with_log("log-new", true);
    let (uri, _stop) = serve_fake(wiped.clone()).await;
    let n = node(Some(uri.clone()));
    let p = &n.participant;
    prepared(p, req_from("old", b"5", "log-old", &uri)).await;
    let r = p.resolve_in_doubt().await.unwrap();
    assert_eq!((r.resolved, r.wrong_log), (0, 1), "{r:?}");
    assert_eq!(wiped.asked(), vec!["old"]);
    assert!(!n.has("abort", "old") && !n.has("commit", "old"));
    // Still prepared, still open: the next round past in_doubt_after asks again.
    assert_eq!(n.rows("old"), vec![(Op::Prepare, Answer::Prepared)]);
}

/// Issue 8: a branch prepared for an old coordinator (no log id) is resolved only by an
/// answer the coordinator knows, never by presumption.
#[tokio::test]
async fn branch_without_log_id_is_never_aborted_by_presumption() {
    let c = FakeCoordinator::with_log("log-1", true);
    c.outcomes
        .lock()
        .unwrap()
        .insert("known".to_string(), pb::Outcome::Aborted);
    let (uri, _stop) = serve_fake(c.clone()).await;
    let n = node(Some(uri));
    let p = &n.participant;
    prepared(p, req_from("unknown", b"5", "", "")).await;
    prepared(p, req_from("known", b"5", "", "")).await;
    let r = p.resolve_in_doubt().await.unwrap();
    assert_eq!((r.resolved, r.unknown_without_log_id), (1, 1), "{r:?}");
    assert_eq!(c.asked(), vec!["known", "unknown"]);
    assert!(!n.has("abort", "unknown") && !n.has("commit", "unknown"));
    assert!(n.has("abort", "known"));
}

/// Issue 8: a gid delivered again with another body (a reused gid) is refused, never
/// answered from the first delivery's row, and its business code never runs.
#[tokio::test]
async fn reused_gid_with_another_body_is_refused() {
    let n = node(None);
    let p = &n.participant;
    prepared(p, req("g", "debit", b"10")).await;
    let r = p
        .prepare(Request::new(req("g", "debit", b"20")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PrepareResult::Refused, "{r:?}");
    assert!(r.message.contains("different body"), "{r:?}");
    // Same body again: the first answer.
    prepared(p, req("g", "debit", b"10")).await;
    // Commit of the other body: this branch never prepared it.
    let r = p
        .commit(Request::new(req("g", "debit", b"20")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Retry, "{r:?}");
    assert!(!n.has("commit", "g"));
    // Abort of the other body: nothing of it was applied here; the prepared branch stays.
    let r = p
        .abort(Request::new(req("g", "debit", b"20")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Done, "{r:?}");
    assert!(!n.has("abort", "g"));
    assert_eq!(n.rows("g"), vec![(Op::Prepare, Answer::Prepared)]);
    // The right commit still works.
    let r = p
        .commit(Request::new(req("g", "debit", b"10")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Done, "{r:?}");
    assert_eq!(
        n.tree.get("commit/g/0").unwrap().as_deref(),
        Some(&b"10"[..])
    );

    // Saga: the same for execute.
    let ok = p
        .execute(Request::new(req("s", "book", b"a")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.result(), pb::ExecuteResult::Succeeded);
    let r = p
        .execute(Request::new(req("s", "book", b"b")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::ExecuteResult::Failed, "{r:?}");
    assert!(r.message.contains("different body"), "{r:?}");
    assert_eq!(
        n.tree.get("execute/s/0").unwrap().as_deref(),
        Some(&b"a"[..])
    );
}

/// Issue 8: a 1 MiB prepare payload is kept for replay without any stored value near sled's
/// blob threshold (~128 KiB), and the resolver replays the commit with the whole payload.
#[tokio::test]
async fn one_mib_payload_keeps_every_stored_value_small() {
    let c = FakeCoordinator::with_log("log-1", true);
    c.outcomes
        .lock()
        .unwrap()
        .insert("big".to_string(), pb::Outcome::Committed);
    let (uri, _stop) = serve_fake(c).await;
    let n = node(Some(uri));
    let payload: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    prepared(&n.participant, req_from("big", &payload, "log-1", "")).await;
    let largest = |tree: &sled::Tree| {
        tree.scan_prefix(b"\xfft")
            .map(|kv| kv.unwrap().1.len())
            .max()
            .unwrap_or(0)
    };
    assert!(
        largest(&n.tree) <= 40 * 1024,
        "a barrier value of {} bytes",
        largest(&n.tree)
    );
    assert_eq!(n.participant.resolve_in_doubt().await.unwrap().resolved, 1);
    assert_eq!(
        n.tree.get("commit/big/0").unwrap().as_deref(),
        Some(&payload[..])
    );
    // Nothing of the replay copy is left once the branch is finished.
    let reserved: usize = n
        .tree
        .scan_prefix(b"\xfft")
        .map(|kv| kv.unwrap().1.len())
        .sum();
    assert!(
        reserved < 4096,
        "{reserved} bytes left under the reserved prefix"
    );
}

/// Issue 8: the participant checks only what its key layout needs; a gid longer than the
/// coordinator's default limit (a coordinator may be configured higher) is accepted.
#[tokio::test]
async fn participant_accepts_long_gids_up_to_its_documented_cap() {
    let n = node(None);
    let p = &n.participant;
    prepared(p, req(&"g".repeat(200), "debit", b"1")).await;
    let err = p
        .prepare(Request::new(req(&"g".repeat(1025), "debit", b"1")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = p
        .prepare(Request::new(req("a\0b", "debit", b"1")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// Issue 8: the client leaves gid limits to the coordinator, and ALREADY_EXISTS is not
/// "nothing was applied": the gid names an existing transaction to look up.
#[tokio::test]
async fn client_gid_already_exists_and_limits() {
    let fake = FakeCoordinator::default();
    let (uri, _stop) = serve_fake(fake.clone()).await;
    let client = Client::connect(uri).await.unwrap();
    let long = "x".repeat(300);
    client.saga().gid(long.clone()).submit().await.unwrap();
    assert_eq!(fake.begun.lock().unwrap()[0].gid, long);

    *fake.begin_answer.lock().unwrap() = Some(Err(Status::already_exists(
        "gid t1 exists with another definition",
    )));
    let err = client.saga().gid("t1").submit().await.unwrap_err();
    assert!(
        matches!(&err, ClientError::GidExists { gid, message } if gid == "t1" && message.contains("another definition")),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(!text.contains("nothing was applied"), "{text}");
    assert!(
        text.contains("t1") && text.contains("Client::get"),
        "{text}"
    );

    *fake.begin_answer.lock().unwrap() = Some(Err(Status::invalid_argument("gid too long")));
    let err = client.saga().gid(long).submit().await.unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Rejected {
                code: Code::InvalidArgument,
                ..
            }
        ),
        "{err:?}"
    );
}

/// Every business run of the sweep test's handlers adds one to `runs`: a late duplicate that
/// ran the business code again would show there.
fn runs(n: &Node) -> u64 {
    n.tree
        .get("runs")
        .unwrap()
        .map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()))
}

/// Issue 11, participant-side retention: rows of gids their coordinator says finished are
/// swept (after the horizon); rows of open branches, of gids not finished, unknown to the
/// coordinator, driven by another log or whose coordinator is unreachable are kept; and a
/// late duplicate of every operation after the sweep changes nothing.
#[tokio::test]
async fn sweep_deletes_only_finished_gids_and_late_duplicates_stay_harmless() {
    let fake = FakeCoordinator::with_log("log-1", true);
    for (gid, o) in [
        ("committed", pb::Outcome::Committed),
        ("aborted", pb::Outcome::Aborted),
        ("compensated", pb::Outcome::Aborted),
        ("saga-done", pb::Outcome::Committed),
        ("open", pb::Outcome::Committed),
        ("live", pb::Outcome::Committed),
        ("other-log", pb::Outcome::Committed),
    ] {
        fake.outcomes.lock().unwrap().insert(gid.into(), o);
    }
    // "live" is known but still finishing; "unknown" is not in the table (presumed abort,
    // known = false).
    fake.finished.lock().unwrap().extend(
        [
            "committed",
            "aborted",
            "compensated",
            "saga-done",
            "open",
            "other-log",
            "unknown",
        ]
        .map(String::from),
    );
    let (uri, _stop) = serve_fake(fake.clone()).await;
    let (_, gone) = listener().await; // bound then dropped: nothing listens there
    let unreachable = format!("http://{gone}");
    let count = |op: &'static str| {
        move |_: &BranchContext, tx: &mut Txn<'_, SledStore>, _: &[u8]| -> HandlerResult {
            let n = tx
                .get("runs")?
                .map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()));
            tx.insert("runs", &(n + 1).to_be_bytes())?;
            let _ = op;
            Ok(())
        }
    };
    let (p, c, a, e, x) = (
        count("prepare"),
        count("commit"),
        count("abort"),
        count("execute"),
        count("compensate"),
    );
    let n = node_with(|b| {
        b.retention(RetentionPolicy::with_horizon(Duration::ZERO))
            .two_phase(
                "count",
                TwoPhase::<SledStore>::new()
                    .prepare(async move |ctx, tx, pl| p(ctx, tx, pl))
                    .commit(async move |ctx, tx, pl| c(ctx, tx, pl))
                    .abort(async move |ctx, tx, pl| a(ctx, tx, pl)),
            )
            .saga(
                "count-saga",
                Saga::<SledStore>::new()
                    .execute(async move |ctx, tx, pl| e(ctx, tx, pl))
                    .compensate(async move |ctx, tx, pl| x(ctx, tx, pl)),
            )
    });
    let part = &n.participant;
    let at = |gid: &str, handler: &str, log: &str, endpoint: &str| pb::BranchRequest {
        handler: handler.to_string(),
        ..req_from(gid, b"1", log, endpoint)
    };
    let tpc = |gid: &str| at(gid, "count", "log-1", &uri);
    let saga = |gid: &str| at(gid, "count-saga", "log-1", &uri);
    for gid in ["committed", "open", "live", "unknown"] {
        prepared(part, tpc(gid)).await;
    }
    for gid in ["committed", "live", "unknown"] {
        part.commit(Request::new(tpc(gid))).await.unwrap();
    }
    part.abort(Request::new(tpc("aborted"))).await.unwrap(); // null abort
    for gid in ["compensated", "saga-done"] {
        part.execute(Request::new(saga(gid))).await.unwrap();
    }
    part.compensate(Request::new(saga("compensated")))
        .await
        .unwrap();
    part.execute(Request::new(at("other-log", "count-saga", "log-0", &uri)))
        .await
        .unwrap();
    part.execute(Request::new(at("far", "count-saga", "log-1", &unreachable)))
        .await
        .unwrap();
    let before = runs(&n);
    assert_eq!(before, 12);

    // A horizon longer than the rows' age keeps everything, without asking anyone.
    let young =
        node_with(|b| b.retention(RetentionPolicy::with_horizon(Duration::from_secs(3600))));
    young
        .participant
        .prepare(Request::new(tpc("y")))
        .await
        .unwrap();
    young
        .participant
        .commit(Request::new(tpc("y")))
        .await
        .unwrap();
    let r = young.participant.sweep().await.unwrap();
    assert_eq!((r.swept_gids, r.young), (0, 1), "{r:?}");

    let r = part.sweep().await.unwrap();
    assert_eq!((r.swept_gids, r.swept_rows), (4, 7), "{r:?}");
    assert_eq!(
        (r.open, r.not_finished, r.unknown, r.wrong_log, r.unanswered),
        (1, 1, 1, 1, 1),
        "{r:?}"
    );
    for gid in ["committed", "aborted", "compensated", "saga-done"] {
        assert!(n.rows(gid).is_empty(), "{gid} swept");
    }
    for gid in ["open", "live", "unknown", "other-log", "far"] {
        assert!(!n.rows(gid).is_empty(), "{gid} kept");
    }
    // The open branch is still the in-doubt resolver's: it commits it as told.
    assert_eq!(part.resolve_in_doubt().await.unwrap().resolved, 1);

    // Late duplicates of every operation after the sweep: safe answers, no business run, no
    // row written, nothing opened.
    let r = part
        .prepare(Request::new(tpc("committed")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PrepareResult::Refused, "{r:?}");
    let r = part
        .commit(Request::new(tpc("committed")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Done, "{r:?}");
    let r = part
        .prepare(Request::new(tpc("aborted")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PrepareResult::Refused, "{r:?}");
    let r = part
        .abort(Request::new(tpc("aborted")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Done, "{r:?}");
    for gid in ["compensated", "saga-done"] {
        let r = part
            .execute(Request::new(saga(gid)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::ExecuteResult::Failed, "{gid}: {r:?}");
        let r = part
            .compensate(Request::new(saga(gid)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::PhaseTwoResult::Done, "{gid}: {r:?}");
    }
    for gid in ["committed", "aborted", "compensated", "saga-done"] {
        assert!(
            n.rows(gid).is_empty(),
            "{gid}: a late duplicate wrote a row"
        );
    }
    // One run more: the resolver's commit of "open"; none for the late duplicates.
    assert_eq!(runs(&n), before + 1);
    assert!(part
        .store()
        .try_rows("open")
        .unwrap()
        .iter()
        .any(|r| r.op == Op::Commit));
}
