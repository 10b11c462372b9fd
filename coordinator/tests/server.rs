//! The coordinator started in-process through its library entry point, `server::run`, on a
//! 127.0.0.1:0 listener over the in-memory log, with an SDK participant in the same process:
//! health, reflection, Begin/Watch/List/Get, recovery of a logged transaction, and a graceful
//! stop through the shutdown future.

use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use treaty_coordinator::config::Config;
use treaty_coordinator::engine::{BranchDef, Mode, NewTx, Phase, RetryPolicy, Tx};
use treaty_coordinator::log::memory::MemoryLog;
use treaty_coordinator::log::LogStore;
use treaty_sdk::sled::SledStore;
use treaty_sdk::{Branch, Client, ListFilter, Outcome, Participant, Saga, Step, TwoPhase, TxState};

struct Harness {
    coordinator: String,
    participant: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), treaty_coordinator::server::ServeError>>,
    log: Arc<MemoryLog>,
    dir: tempfile::TempDir,
}

/// Start a participant (2PC handler `h2`, saga handler `hs`, each recording what it did
/// under `<op>/<gid>/<branch>`) and the coordinator over `log`.
async fn start(log: Arc<MemoryLog>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open_dir(dir.path(), "data").unwrap();
    struct Mark;
    impl Mark {
        fn mark(
            op: &str,
            ctx: &treaty_sdk::BranchContext,
            tx: &mut treaty_sdk::Txn<'_, SledStore>,
        ) -> treaty_sdk::HandlerResult {
            tx.insert(
                format!("{op}/{}/{}", ctx.gid, ctx.branch_id).as_bytes(),
                b"",
            )?;
            Ok(())
        }
    }
    let participant = Participant::builder(store)
        .two_phase(
            "h2",
            TwoPhase::<SledStore>::new()
                .prepare(async |ctx, tx, _| Mark::mark("prepare", ctx, tx))
                .commit(async |ctx, tx, _| Mark::mark("commit", ctx, tx))
                .abort(async |ctx, tx, _| Mark::mark("abort", ctx, tx)),
        )
        .saga(
            "hs",
            Saga::<SledStore>::new()
                .execute(async |ctx, tx, _| Mark::mark("execute", ctx, tx))
                .compensate(async |ctx, tx, _| Mark::mark("compensate", ctx, tx)),
        )
        .build()
        .unwrap();
    let pl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let participant_uri = format!("http://{}", pl.local_addr().unwrap());
    tokio::spawn(participant.serve(pl, std::future::pending()));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coordinator = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = Config {
        shutdown_grace: Duration::from_secs(2),
        ..Config::default()
    };
    let dyn_log: Arc<dyn LogStore> = log.clone();
    let server = tokio::spawn(treaty_coordinator::server::run(
        listener,
        dyn_log,
        config,
        async {
            let _ = stop_rx.await;
        },
    ));
    Harness {
        coordinator,
        participant: participant_uri,
        stop: Some(stop_tx),
        server,
        log,
        dir,
    }
}

impl Harness {
    /// Stop the coordinator; the participant keeps serving from its directory, returned here
    /// so it outlives this harness.
    async fn stop(mut self) -> (Arc<MemoryLog>, tempfile::TempDir) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), &mut self.server)
            .await
            .expect("stops within the grace period")
            .unwrap()
            .expect("clean shutdown");
        (self.log.clone(), self.dir)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_health_reflection_and_transactions_then_stops_gracefully() {
    let h = start(Arc::new(MemoryLog::new())).await;
    let channel = tonic::transport::Endpoint::from_shared(h.coordinator.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "treaty.v1.Coordinator".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1 as refl;
    let mut reflection = refl::server_reflection_client::ServerReflectionClient::new(channel);
    let req = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            refl::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let answer = stream.next().await.unwrap().unwrap();
    let services = match answer.message_response {
        Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    };
    assert!(
        services.contains(&"treaty.v1.Coordinator".to_string()),
        "{services:?}"
    );

    let client = Client::connect(h.coordinator.clone()).await.unwrap();
    let gid = client
        .saga()
        .gid("in-process-saga")
        .step(
            Step::new(h.participant.clone(), "hs")
                .payload("a")
                .compensation("a"),
        )
        .step(
            Step::new(h.participant.clone(), "hs")
                .payload("b")
                .compensation("b"),
        )
        .submit()
        .await
        .unwrap()
        .gid;
    // Watch streams every change until the terminal state, then ends.
    let mut watch = client.watch(&gid).await.unwrap();
    let mut last = None;
    while let Some(tx) = watch.next().await {
        last = Some(tx.unwrap());
    }
    let last = last.expect("at least one state");
    assert_eq!(last.state, TxState::Committed);
    assert_eq!(last.outcome, Outcome::Committed);

    let two_phase = client
        .two_phase()
        .branch(Branch::new(h.participant.clone(), "h2").payload("x"))
        .branch(Branch::new(h.participant.clone(), "h2").payload("y"))
        .submit_and_wait(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(two_phase.outcome, Outcome::Committed);

    let list = client
        .list(&ListFilter::new().mode(treaty_sdk::Mode::Saga))
        .await
        .unwrap();
    let gids: Vec<_> = list.transactions.iter().map(|t| t.gid.as_str()).collect();
    assert_eq!(gids, ["in-process-saga"]);

    let (log, _dir) = h.stop().await;
    let rec = log.get("in-process-saga").await.unwrap().unwrap();
    assert_eq!(rec.phase, Phase::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_undecided_two_phase_transaction_is_aborted_at_startup() {
    // A 2PC transaction whose Begun record is durable but which has no decision: the process
    // died during phase one. Presumed abort: the restarted coordinator aborts it.
    let log = Arc::new(MemoryLog::new());
    let h0 = start(log.clone()).await;
    let participant = h0.participant.clone();
    let mut tx = Tx::new(
        NewTx {
            gid: "left-behind".into(),
            mode: Mode::TwoPhase,
            branches: vec![BranchDef {
                endpoint: participant.clone(),
                handler: "h2".into(),
                payload: bytes::Bytes::from_static(b"p"),
                compensation_payload: bytes::Bytes::new(),
            }],
            deadline_unix_ms: u64::MAX / 2,
            retry: RetryPolicy::default(),
            trace_parent: None,
        },
        1,
    );
    for cmd in tx.handle(1, treaty_coordinator::engine::Event::Start) {
        if let treaty_coordinator::engine::Command::Persist { record, .. } = cmd {
            log.put_sync(record, true).unwrap();
        }
    }
    // Restart the coordinator over the same log (the participant keeps running).
    let (log, _participant_dir) = h0.stop().await;
    let h = start(log.clone()).await;
    let client = Client::connect(h.coordinator.clone()).await.unwrap();
    let state = {
        let start = std::time::Instant::now();
        loop {
            let t = client.get("left-behind").await.unwrap();
            if t.state == TxState::Aborted || start.elapsed() > Duration::from_secs(20) {
                break t.state;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let t = client.get("left-behind").await.unwrap();
    assert_eq!(state, TxState::Aborted, "{t:?}");
    assert_eq!(
        client.outcome("left-behind").await.unwrap().outcome,
        Outcome::Aborted
    );
    h.stop().await;
}

/// Issue 11, admission control: a caller over `--max-begins-per-caller-per-sec` gets
/// RESOURCE_EXHAUSTED while another caller (another address) still begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_begin_rate_is_refused_while_another_still_begins() {
    use treaty_proto::v1 as pb;
    use treaty_proto::v1::coordinator_client::CoordinatorClient;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = Config {
        max_begins_per_caller_per_sec: 1,
        shutdown_grace: Duration::from_millis(100),
        ..Config::default()
    };
    let server = tokio::spawn(treaty_coordinator::server::run(
        listener,
        Arc::new(MemoryLog::new()),
        config,
        async {
            let _ = stop_rx.await;
        },
    ));
    let client_from = |ip: [u8; 4]| {
        let uri = uri.clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(uri)
                .unwrap()
                .local_address(Some(std::net::IpAddr::from(ip)))
                .connect()
                .await
                .unwrap();
            CoordinatorClient::new(channel)
        }
    };
    // A saga whose participant is never reached: Begin answers once `Begun` is durable.
    let begin = |gid: String| pb::BeginRequest {
        gid,
        mode: pb::Mode::Saga.into(),
        branches: vec![pb::Branch {
            endpoint: "http://127.0.0.1:9".into(),
            handler: "h".into(),
            ..Default::default()
        }],
        deadline_ms: 1000,
        ..Default::default()
    };
    let mut runaway = client_from([127, 0, 0, 1]).await;
    let mut other = client_from([127, 0, 0, 2]).await;

    // One token a second: within a bounded number of quick calls the runaway runs out.
    let mut refused = None;
    for i in 0..50 {
        if let Err(e) = runaway.begin(begin(format!("runaway-{i}"))).await {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("the runaway caller is refused within 50 quick Begins");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("127.0.0.1"), "{e:?}");
    let r = other.begin(begin("other-0".into())).await;
    assert!(r.is_ok(), "another caller still begins: {r:?}");

    stop_tx.send(()).unwrap();
    let _ = server.await.unwrap();
}

/// Issue 11, participant-side retention end to end: the real coordinator says `finished`
/// once a saga is terminal and durable, an SDK participant sweeps its rows on it, and a late
/// duplicate of the step afterwards is answered FAILED without running the business code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_sweeps_a_finished_saga_and_a_late_duplicate_changes_nothing() {
    use treaty_proto::v1 as pb;
    use treaty_proto::v1::participant_server::Participant as _;
    use treaty_sdk::RetentionPolicy;

    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open_dir(dir.path(), "data").unwrap();
    let runs = |tree: &sled::Tree| {
        tree.get("runs")
            .unwrap()
            .map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()))
    };
    fn count(tx: &mut treaty_sdk::Txn<'_, SledStore>) -> treaty_sdk::HandlerResult {
        let n = tx
            .get("runs")?
            .map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()));
        tx.insert("runs", &(n + 1).to_be_bytes())?;
        Ok(())
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coordinator = format!("http://{}", listener.local_addr().unwrap());
    // `server::run` advertises no outcome endpoint: branches are asked about here.
    let participant = Participant::builder(store)
        .coordinator(coordinator.clone())
        .retention(RetentionPolicy::with_horizon(Duration::ZERO))
        .saga(
            "hs",
            Saga::<SledStore>::new()
                .execute(async |_, tx, _| count(tx))
                .compensate(async |_, tx, _| count(tx)),
        )
        .build()
        .unwrap();
    let pl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let participant_uri = format!("http://{}", pl.local_addr().unwrap());
    let (pstop, pstopped) = tokio::sync::oneshot::channel::<()>();
    let pserver = tokio::spawn(participant.clone().serve(pl, async {
        let _ = pstopped.await;
    }));

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(treaty_coordinator::server::run(
        listener,
        Arc::new(MemoryLog::new()),
        Config {
            shutdown_grace: Duration::from_millis(100),
            ..Config::default()
        },
        async {
            let _ = stop_rx.await;
        },
    ));

    let client = Client::connect(coordinator).await.unwrap();
    let done = client
        .saga()
        .gid("swept-saga")
        .step(
            Step::new(participant_uri, "hs")
                .payload("a")
                .compensation("a"),
        )
        .submit_and_wait(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done.outcome, Outcome::Committed);
    let tree = participant.store().tree().clone();
    assert_eq!(runs(&tree), 1);

    // Finished is said once the transaction has left its shard: bounded wait for it.
    let start = std::time::Instant::now();
    loop {
        let r = participant.sweep().await.unwrap();
        if r.swept_gids == 1 {
            assert_eq!(r.swept_rows, 1, "{r:?}");
            break;
        }
        assert!(
            r.not_finished == 1 && start.elapsed() < Duration::from_secs(10),
            "the coordinator never said finished: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = participant.store();
    assert!(store.try_rows("swept-saga").unwrap().is_empty());
    let marker = store.try_swept("swept-saga").unwrap().expect("a marker");

    // A late duplicate of the step, from the same log: FAILED, nothing run, nothing written.
    let late = pb::BranchRequest {
        gid: "swept-saga".into(),
        branch_id: 0,
        handler: "hs".into(),
        payload: "a".into(),
        log_id: marker.log_id.clone(),
        attempt: 1,
        ..Default::default()
    };
    let r = participant
        .execute(tonic::Request::new(late))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::ExecuteResult::Failed, "{r:?}");
    assert_eq!(runs(&tree), 1, "the late duplicate ran no business code");
    assert!(store.try_rows("swept-saga").unwrap().is_empty());

    stop_tx.send(()).unwrap();
    let _ = server.await.unwrap();
    pstop.send(()).unwrap();
    pserver.await.unwrap().unwrap();
}
