//! The PostgreSQL barrier store against a private PostgreSQL server (`treaty-pg-harness`):
//! the conformance suite, and what only PostgreSQL does (prepared transactions, refusing a
//! server without them, in-doubt branches found after a restart).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use treaty_pg_harness::{PgOptions, PgServer};
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use treaty_proto::v1::participant_server::Participant as _;
use treaty_sdk::postgres::PgStore;
use treaty_sdk::store::conformance::{self, Harness};
use treaty_sdk::{
    refuse, Answer, BarrierStore, BranchContext, HandlerError, HandlerResult, Op, Participant,
    Swept, TwoPhase, TwoPhaseHandler, Txn,
};

/// A fresh database per store, on one server.
struct PgHarness {
    server: Mutex<PgServer>,
    next: AtomicU32,
}

impl PgHarness {
    fn start() -> Option<PgHarness> {
        let server = PgServer::start_for_test(PgOptions {
            fsync: false,
            ..PgOptions::default()
        })?;
        Some(PgHarness {
            server: Mutex::new(server),
            next: AtomicU32::new(0),
        })
    }

    fn new_database(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        self.server
            .lock()
            .unwrap()
            .create_database(&format!("conformance_{n}"))
            .expect("create a database")
    }
}

impl Harness for PgHarness {
    type Store = PgStore;

    // A 2PC prepare is a PostgreSQL prepared transaction: its change shows once committed.
    const PREPARE_HELD: bool = true;

    async fn open(&self) -> PgStore {
        let url = self.new_database();
        let store = PgStore::connect(&url).await.expect("open the store");
        store
            .pool()
            .get()
            .await
            .expect("a connection")
            .batch_execute("CREATE TABLE marks (key text PRIMARY KEY)")
            .await
            .expect("the business table");
        store
    }

    async fn write_mark<'a, 't>(tx: &'a mut Txn<'t, PgStore>, key: &'a str) -> HandlerResult {
        tx.execute(
            "INSERT INTO marks (key) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&key],
        )
        .await
        .map_err(HandlerError::retry)?;
        Ok(())
    }

    async fn has_mark(store: &PgStore, key: &str) -> bool {
        let conn = store.pool().get().await.expect("a connection");
        conn.query_opt("SELECT 1 FROM marks WHERE key = $1", &[&key])
            .await
            .expect("read the business table")
            .is_some()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_passes_the_conformance_suite() {
    let Some(h) = PgHarness::start() else { return };
    conformance::run_all(&h).await;
}

// ---------------------------------------------------------------------------------------
// What only PostgreSQL does: prepared transactions.

/// One database on a server of its own (killed and restarted by some tests).
struct Db {
    server: PgServer,
    url: String,
}

fn db(name: &str) -> Option<Db> {
    let server = PgServer::start_for_test(PgOptions {
        fsync: false,
        ..PgOptions::default()
    })?;
    let url = server.create_database(name).expect("create a database");
    Some(Db { server, url })
}

/// The 2PC handler of these tests: each operation inserts `<op>/<gid>` into `marks`, on the
/// delivery's transaction; a payload of `no` is refused.
fn mark_handler() -> impl TwoPhaseHandler<PgStore> {
    async fn mark(
        op: &str,
        ctx: &BranchContext,
        tx: &mut Txn<'_, PgStore>,
        payload: &[u8],
    ) -> HandlerResult {
        if payload == b"no" {
            return Err(refuse("the payload says no"));
        }
        let key = format!("{op}/{}", ctx.gid);
        tx.execute("INSERT INTO marks (key) VALUES ($1)", &[&key])
            .await
            .map_err(HandlerError::retry)?;
        Ok(())
    }
    TwoPhase::<PgStore>::new()
        .prepare(async |ctx, tx, payload| mark("prepare", ctx, tx, payload).await)
        .commit(async |ctx, tx, payload| mark("commit", ctx, tx, payload).await)
        .abort(async |ctx, tx, payload| mark("abort", ctx, tx, payload).await)
}

/// A participant over a new store on `url` (the business table created if missing).
async fn participant(url: &str, coordinator: Option<&str>) -> (PgStore, Participant<PgStore>) {
    let store = PgStore::connect(url).await.expect("open the store");
    store
        .pool()
        .get()
        .await
        .expect("a connection")
        .batch_execute("CREATE TABLE IF NOT EXISTS marks (key text PRIMARY KEY)")
        .await
        .expect("the business table");
    let mut b = Participant::builder(store.clone()).two_phase("debit", mark_handler());
    if let Some(uri) = coordinator {
        b = b.coordinator(uri);
    }
    (store, b.build().expect("a participant"))
}

async fn marks(store: &PgStore) -> Vec<String> {
    let conn = store.pool().get().await.expect("a connection");
    conn.query("SELECT key FROM marks ORDER BY key", &[])
        .await
        .expect("read marks")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn req(gid: &str, payload: &[u8]) -> pb::BranchRequest {
    pb::BranchRequest {
        gid: gid.to_string(),
        branch_id: 0,
        handler: "debit".to_string(),
        payload: payload.to_vec().into(),
        attempt: 1,
        log_id: "log-1".to_string(),
        ..Default::default()
    }
}

async fn prepare(p: &Participant<PgStore>, gid: &str, payload: &[u8]) -> pb::PrepareResult {
    p.prepare(Request::new(req(gid, payload)))
        .await
        .expect("prepare answered")
        .into_inner()
        .result()
}

/// A commit's answer: DONE, or RETRY with its message.
async fn commit(p: &Participant<PgStore>, gid: &str) -> Result<(), String> {
    phase_two(p.commit(Request::new(req(gid, b"7"))).await)
}

async fn abort(p: &Participant<PgStore>, gid: &str) -> Result<(), String> {
    phase_two(p.abort(Request::new(req(gid, b"7"))).await)
}

fn phase_two(r: Result<Response<pb::PhaseTwoResponse>, Status>) -> Result<(), String> {
    let r = r.expect("answered").into_inner();
    match r.result() {
        pb::PhaseTwoResult::Done => Ok(()),
        _ => Err(r.message),
    }
}

/// A protocol violation: answered RETRY, saying so.
fn violation(r: Result<(), String>) -> bool {
    matches!(r, Err(m) if m.contains("violation"))
}

async fn rows(store: &PgStore, gid: &str) -> Vec<(Op, Answer)> {
    store
        .rows(gid)
        .await
        .expect("rows")
        .into_iter()
        .map(|r| (r.op, r.answer))
        .collect()
}

/// Runs `sql` on a connection of its own (as an operator, or the first half of a crash).
async fn by_hand(url: &str, sql: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client.batch_execute(sql).await.expect(sql);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_prepared_transactions_is_refused_with_how_to_set_it() {
    let Some(server) = PgServer::start_for_test(PgOptions {
        fsync: false,
        max_prepared_transactions: 0,
        ..PgOptions::default()
    }) else {
        return;
    };
    let url = server.create_database("noprep").expect("a database");
    let err = PgStore::connect(&url).await.expect_err("must refuse");
    let msg = err.to_string();
    for needle in [
        "max_prepared_transactions = 0",
        "postgresql.conf",
        "ALTER SYSTEM SET max_prepared_transactions",
        "restart",
    ] {
        assert!(msg.contains(needle), "{needle:?} in: {msg}");
    }
}

/// `sslmode=require`: the store's connections are TLS, checked against `tls_ca`: refused
/// without a CA, a failed handshake with another CA, and TLS in `pg_stat_ssl` with the right
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sslmode_require_the_store_uses_tls_checked_against_the_ca() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use treaty_sdk::postgres::PgStoreOptions;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.path().join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        (Issuer::new(params, key), path)
    };
    let (issuer, ca_path) = ca("db-ca");
    let (_, other_ca_path) = ca("other-ca");
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let Some(server) = PgServer::start_for_test(PgOptions {
        fsync: false,
        tls: Some((cert.pem().into_bytes(), key.serialize_pem().into_bytes())),
        ..PgOptions::default()
    }) else {
        return;
    };
    let plain = server.create_database("tls").expect("a database");
    let url = format!("{plain}?sslmode=require");
    let err = PgStore::connect(&url).await.expect_err("no CA");
    assert!(err.to_string().contains("tls_ca"), "{err}");
    let err = PgStore::connect_with(&url, PgStoreOptions::default().tls_ca(&other_ca_path))
        .await
        .expect_err("another CA");
    assert!(err.to_string().contains("connecting"), "{err}");
    let store = PgStore::connect_with(&url, PgStoreOptions::default().tls_ca(&ca_path))
        .await
        .expect("TLS with the right CA");
    let conn = store.pool().get().await.expect("a pooled connection");
    let ssl: bool = conn
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("read pg_stat_ssl")
        .get(0);
    assert!(ssl, "the store's connection is TLS");
}

/// A prepare is a PostgreSQL prepared transaction: its change is invisible until the commit,
/// it survives the participant (every session of the store closed), and a new participant
/// finds it in doubt and commits it; duplicates change nothing, and nothing is left prepared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_branch_survives_a_participant_restart_and_its_commit_lands() {
    let Some(d) = db("restart") else { return };
    let (store, p) = participant(&d.url, None).await;
    assert_eq!(prepare(&p, "g", b"7").await, pb::PrepareResult::Prepared);
    let names = store.prepared_transactions().await.unwrap();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].len() < 200 && names[0].starts_with(&format!("treaty-{}-", store.store_id())));
    assert!(
        marks(&store).await.is_empty(),
        "a prepared change is invisible"
    );
    assert_eq!(rows(&store, "g").await, [(Op::Prepare, Answer::Prepared)]);
    // The participant goes away: its sessions close, the prepared transaction stays.
    drop(p);
    drop(store);

    let (store, p) = participant(&d.url, None).await;
    let doubt = store.in_doubt(None).await.unwrap();
    assert_eq!(doubt.len(), 1, "{doubt:?}");
    assert_eq!(
        (
            doubt[0].gid.as_str(),
            doubt[0].payload.as_slice(),
            doubt[0].log_id.as_str()
        ),
        ("g", &b"7"[..], "log-1")
    );
    // A duplicate prepare is answered from the rows; its business code does not run again.
    assert_eq!(prepare(&p, "g", b"7").await, pb::PrepareResult::Prepared);
    assert_eq!(commit(&p, "g").await, Ok(()));
    assert_eq!(marks(&store).await, ["commit/g", "prepare/g"]);
    assert!(store.prepared_transactions().await.unwrap().is_empty());
    assert!(store.in_doubt(None).await.unwrap().is_empty());
    // Duplicates after the commit: answered from the rows (the prepared transaction is gone).
    assert_eq!(commit(&p, "g").await, Ok(()));
    assert_eq!(prepare(&p, "g", b"7").await, pb::PrepareResult::Prepared);
    assert!(
        violation(abort(&p, "g").await),
        "abort after commit is a violation"
    );
    assert_eq!(marks(&store).await, ["commit/g", "prepare/g"]);
    assert_eq!(
        rows(&store, "g").await,
        [(Op::Commit, Answer::Done), (Op::Prepare, Answer::Prepared)]
    );
}

/// An abort rolls the prepared transaction back: the prepare's change is gone, the abort
/// handler is not called (nothing is left to undo), a late prepare is refused, and a
/// refused prepare or an abort before the prepare prepares nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_rolls_the_prepared_transaction_back() {
    let Some(d) = db("abort") else { return };
    let (store, p) = participant(&d.url, None).await;
    assert_eq!(prepare(&p, "a", b"7").await, pb::PrepareResult::Prepared);
    assert_eq!(abort(&p, "a").await, Ok(()));
    assert_eq!(abort(&p, "a").await, Ok(()));
    assert_eq!(prepare(&p, "a", b"7").await, pb::PrepareResult::Refused);
    assert!(
        violation(commit(&p, "a").await),
        "commit after abort is a violation"
    );
    assert_eq!(
        rows(&store, "a").await,
        [(Op::Abort, Answer::Done), (Op::Prepare, Answer::Prepared)]
    );

    assert_eq!(prepare(&p, "no", b"no").await, pb::PrepareResult::Refused);
    assert_eq!(abort(&p, "early").await, Ok(()));
    assert_eq!(prepare(&p, "early", b"7").await, pb::PrepareResult::Refused);

    assert!(marks(&store).await.is_empty(), "{:?}", marks(&store).await);
    assert!(store.prepared_transactions().await.unwrap().is_empty());
    assert!(store.in_doubt(None).await.unwrap().is_empty());
}

/// The crash points between the steps of a commit and of an abort, reproduced by doing the
/// first step by hand: a `COMMIT PREPARED` whose second step did not run is in doubt and is
/// finished by the next commit (commit handler once); a `ROLLBACK PREPARED` whose rows were
/// not written is no longer in doubt, and the abort's redelivery records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_or_abort_interrupted_after_its_first_step_is_finished_by_its_redelivery() {
    let Some(d) = db("halfway") else { return };
    let (store, p) = participant(&d.url, None).await;
    assert_eq!(prepare(&p, "c", b"7").await, pb::PrepareResult::Prepared);
    assert_eq!(prepare(&p, "r", b"7").await, pb::PrepareResult::Prepared);
    let mut names = store.prepared_transactions().await.unwrap();
    assert_eq!(names.len(), 2);
    // Which name is whose: commit c's by hand, see which one is left.
    by_hand(&d.url, &format!("COMMIT PREPARED '{}'", names[0])).await;
    let committed_gid = if marks(&store).await == ["prepare/c"] {
        "c"
    } else {
        "r"
    };
    let other_gid = if committed_gid == "c" { "r" } else { "c" };
    names.remove(0);
    by_hand(&d.url, &format!("ROLLBACK PREPARED '{}'", names[0])).await;

    let doubt: Vec<String> = store
        .in_doubt(None)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.gid)
        .collect();
    assert_eq!(
        doubt,
        [committed_gid],
        "committed but unfinished: in doubt; rolled back: not"
    );
    assert!(
        violation(abort(&p, committed_gid).await),
        "abort after COMMIT PREPARED is a violation"
    );
    assert_eq!(commit(&p, committed_gid).await, Ok(()));
    assert_eq!(abort(&p, other_gid).await, Ok(()));
    assert_eq!(
        prepare(&p, other_gid, b"7").await,
        pb::PrepareResult::Refused
    );
    assert_eq!(
        marks(&store).await,
        [
            format!("commit/{committed_gid}"),
            format!("prepare/{committed_gid}")
        ]
    );
    assert!(store.in_doubt(None).await.unwrap().is_empty());
    assert!(store.prepared_transactions().await.unwrap().is_empty());
}

/// Prepared transactions survive a crash of the PostgreSQL server itself: prepare, SIGKILL
/// the server, start it again, and the commit lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_branch_survives_a_postgres_crash_and_its_commit_lands() {
    let Some(mut d) = db("crash") else { return };
    let (store, p) = participant(&d.url, None).await;
    assert_eq!(prepare(&p, "k", b"7").await, pb::PrepareResult::Prepared);
    d.server.kill();
    d.server.restart().expect("restart PostgreSQL");
    assert_eq!(store.prepared_transactions().await.unwrap().len(), 1);
    assert_eq!(commit(&p, "k").await, Ok(()));
    assert_eq!(marks(&store).await, ["commit/k", "prepare/k"]);
    assert!(store.prepared_transactions().await.unwrap().is_empty());
}

/// A coordinator that answers `Outcome` from a table, from log `log-1`.
#[derive(Clone, Default)]
struct FakeCoordinator {
    outcomes: Arc<Mutex<HashMap<String, pb::Outcome>>>,
}

#[tonic::async_trait]
impl Coordinator for FakeCoordinator {
    async fn begin(
        &self,
        _: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get(&self, _: Request<pb::GetRequest>) -> Result<Response<pb::Transaction>, Status> {
        Err(Status::unimplemented("fake"))
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
        let known = self.outcomes.lock().unwrap().get(&gid).copied();
        Ok(Response::new(pb::OutcomeResponse {
            outcome: known.unwrap_or(pb::Outcome::Aborted) as i32,
            known: known.is_some(),
            log_id: "log-1".to_string(),
            finished: false,
        }))
    }
    async fn retry(
        &self,
        _: Request<pb::RetryRequest>,
    ) -> Result<Response<pb::RetryResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn resolve(
        &self,
        _: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::Transaction>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// After a participant restart, its in-doubt branches are found (from `pg_prepared_xacts`)
/// and resolved by the coordinator's outcome: committed ones commit, aborted and unknown
/// (presumed abort, from the log that drove them) ones roll back; nothing stays prepared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_coordinators_outcome_resolves_prepared_branches() {
    let Some(d) = db("resolve") else { return };
    let fake = FakeCoordinator::default();
    fake.outcomes.lock().unwrap().extend([
        ("c".to_string(), pb::Outcome::Committed),
        ("a".to_string(), pb::Outcome::Aborted),
    ]);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CoordinatorServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(l)),
    );
    let (store, p) = participant(&d.url, Some(&uri)).await;
    for gid in ["c", "a", "unknown"] {
        assert_eq!(prepare(&p, gid, b"7").await, pb::PrepareResult::Prepared);
    }
    assert_eq!(store.prepared_transactions().await.unwrap().len(), 3);
    drop(p);
    drop(store);

    let (store, p) = participant(&d.url, Some(&uri)).await;
    let r = p.resolve_in_doubt().await.expect("a round");
    assert_eq!(r.resolved, 3, "{r:?}");
    assert_eq!(marks(&store).await, ["commit/c", "prepare/c"]);
    assert!(store.prepared_transactions().await.unwrap().is_empty());
    assert!(store.in_doubt(None).await.unwrap().is_empty());
    assert_eq!(
        rows(&store, "a").await,
        [(Op::Abort, Answer::Done), (Op::Prepare, Answer::Prepared)]
    );
}

/// The sweep never takes the rows of a gid with a branch still prepared here, whatever it is
/// told: the prepared transaction would be left with no row to answer its commit from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_leaves_a_gid_with_a_prepared_branch_alone() {
    let Some(d) = db("sweep") else { return };
    let (store, p) = participant(&d.url, None).await;
    assert_eq!(prepare(&p, "open", b"7").await, pb::PrepareResult::Prepared);
    let rows = store.rows("open").await.unwrap();
    let marker = Swept::new("open".into(), "log-1".into(), 1);
    assert!(!store.sweep_gid(rows, marker).await.unwrap());
    assert!(store.swept("open").await.unwrap().is_none());
    assert_eq!(commit(&p, "open").await, Ok(()));
    assert_eq!(marks(&store).await, ["commit/open", "prepare/open"]);
}
