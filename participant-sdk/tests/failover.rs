//! A client of several coordinators of one log (`Client::connect_any`): calls that get no
//! answer go to the next coordinator, `Begin` is resubmitted there with the same gid, a
//! broken watch resumes there, and a coordinator of another log is never used. The
//! coordinators are fakes serving the Coordinator API, so each can be made to fail exactly.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use treaty_sdk::{Branch, Client, ClientError, ClientOptions, Outcome, TxState};

/// How a fake answers a call.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behave {
    /// Answers.
    Serve,
    /// Answers UNAVAILABLE (a coordinator shutting down, or cut off from its database).
    Unavailable,
    /// Never answers (a paused process).
    Hang,
}

#[derive(Clone)]
struct Fake {
    log_id: String,
    behave: Arc<Mutex<Behave>>,
    /// Gids of the Begin calls received.
    begun: Arc<Mutex<Vec<String>>>,
    /// Transactions the watch stream sends, then (with `watch_breaks`) UNAVAILABLE.
    watch_items: Vec<pb::TxState>,
    watch_breaks: bool,
}

impl Fake {
    fn new(log_id: &str) -> Fake {
        Fake {
            log_id: log_id.into(),
            behave: Arc::new(Mutex::new(Behave::Serve)),
            begun: Arc::default(),
            watch_items: vec![pb::TxState::Committed],
            watch_breaks: false,
        }
    }

    fn set(&self, b: Behave) {
        *self.behave.lock().unwrap() = b;
    }

    /// Applies the behaviour to a call.
    async fn gate(&self) -> Result<(), Status> {
        let b = *self.behave.lock().unwrap();
        match b {
            Behave::Serve => Ok(()),
            Behave::Unavailable => Err(Status::unavailable("fake: shutting down")),
            Behave::Hang => std::future::pending().await,
        }
    }
}

fn tx(gid: &str, state: pb::TxState) -> pb::Transaction {
    pb::Transaction {
        gid: gid.into(),
        mode: pb::Mode::TwoPhase as i32,
        state: state as i32,
        outcome: match state {
            pb::TxState::Committed => pb::Outcome::Committed,
            _ => pb::Outcome::Pending,
        } as i32,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Coordinator for Fake {
    async fn begin(
        &self,
        r: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        let gid = r.into_inner().gid;
        self.begun.lock().unwrap().push(gid.clone());
        self.gate().await?;
        Ok(Response::new(pb::BeginResponse {
            gid,
            outcome: pb::Outcome::Committed as i32,
            existing: false,
            reason: String::new(),
        }))
    }
    async fn get(&self, r: Request<pb::GetRequest>) -> Result<Response<pb::Transaction>, Status> {
        self.gate().await?;
        Ok(Response::new(tx(
            &r.into_inner().gid,
            pb::TxState::Committed,
        )))
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
        r: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.gate().await?;
        let gid = r.into_inner().gid;
        let mut items: Vec<Result<pb::Transaction, Status>> =
            self.watch_items.iter().map(|s| Ok(tx(&gid, *s))).collect();
        if self.watch_breaks {
            items.push(Err(Status::unavailable("fake: the stream broke")));
        }
        Ok(Response::new(futures::stream::iter(items).boxed()))
    }
    async fn outcome(
        &self,
        _: Request<pb::OutcomeRequest>,
    ) -> Result<Response<pb::OutcomeResponse>, Status> {
        self.gate().await?;
        Ok(Response::new(pb::OutcomeResponse {
            outcome: pb::Outcome::Aborted as i32,
            known: false,
            log_id: self.log_id.clone(),
            finished: false,
        }))
    }
    async fn retry(
        &self,
        _: Request<pb::RetryRequest>,
    ) -> Result<Response<pb::RetryResponse>, Status> {
        self.gate().await?;
        Err(Status::not_found("fake: no such transaction"))
    }
    async fn resolve(
        &self,
        _: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::Transaction>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves `fake` on 127.0.0.1:0; the server stops when the returned sender is dropped.
async fn serve(fake: Fake) -> (String, oneshot::Sender<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
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

/// A URI nothing listens on.
async fn dead_uri() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

#[tokio::test]
async fn a_dead_first_coordinator_is_skipped_at_connect_and_after() {
    let b = Fake::new("log-1");
    let (b_uri, _b) = serve(b.clone()).await;
    let client = Client::connect_any([dead_uri().await, b_uri], &ClientOptions::new())
        .await
        .expect("the second coordinator answers");
    let s = client.get("g1").await.expect("get through the live one");
    assert_eq!(s.state, TxState::Committed);
}

#[tokio::test]
async fn begin_is_resubmitted_with_the_same_gid_to_the_next_coordinator() {
    let a = Fake::new("log-1");
    let b = Fake::new("log-1");
    let (a_uri, _a) = serve(a.clone()).await;
    let (b_uri, _b) = serve(b.clone()).await;
    let client = Client::connect_any([a_uri, b_uri], &ClientOptions::new())
        .await
        .expect("connect");
    a.set(Behave::Unavailable);
    let done = client
        .two_phase()
        .branch(Branch::new("http://127.0.0.1:1", "h"))
        .submit_and_wait(Duration::from_secs(5))
        .await
        .expect("answered by the second coordinator");
    assert_eq!(done.outcome, Outcome::Committed);
    assert_eq!(*a.begun.lock().unwrap(), vec![done.gid.clone()]);
    assert_eq!(
        *b.begun.lock().unwrap(),
        vec![done.gid.clone()],
        "the same gid, so the second Begin is the same transaction"
    );
    // The client stays on the coordinator that answered.
    a.set(Behave::Serve);
    client.get("g").await.expect("get");
    client
        .two_phase()
        .branch(Branch::new("http://127.0.0.1:1", "h"))
        .submit()
        .await
        .unwrap();
    assert_eq!(a.begun.lock().unwrap().len(), 1);
    assert_eq!(b.begun.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_paused_coordinator_is_left_after_the_call_timeout() {
    let a = Fake::new("log-1");
    let b = Fake::new("log-1");
    let (a_uri, _a) = serve(a.clone()).await;
    let (b_uri, _b) = serve(b.clone()).await;
    let client = Client::connect_any([a_uri, b_uri], &ClientOptions::new())
        .await
        .expect("connect")
        .with_call_timeout(Duration::from_millis(300));
    a.set(Behave::Hang);
    let s = tokio::time::timeout(Duration::from_secs(10), client.get("g2"))
        .await
        .expect("bounded by the call timeout, not hung")
        .expect("answered by the second coordinator");
    assert_eq!(s.gid, "g2");
}

#[tokio::test]
async fn a_broken_watch_resumes_on_the_next_coordinator() {
    let mut a = Fake::new("log-1");
    a.watch_items = vec![pb::TxState::Active];
    a.watch_breaks = true;
    let mut b = Fake::new("log-1");
    b.watch_items = vec![pb::TxState::Committing, pb::TxState::Committed];
    let (a_uri, _a) = serve(a.clone()).await;
    let (b_uri, _b) = serve(b.clone()).await;
    let client = Client::connect_any([a_uri, b_uri], &ClientOptions::new())
        .await
        .expect("connect");
    let mut watch = client.watch("g3").await.expect("watch");
    let mut seen = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the watch goes on")
    {
        seen.push(item.expect("no error reaches the caller").state);
        if seen.len() == 1 {
            // From now on the first coordinator is gone.
            a.set(Behave::Unavailable);
        }
    }
    assert_eq!(
        seen,
        vec![TxState::Active, TxState::Committing, TxState::Committed]
    );
}

#[tokio::test]
async fn a_coordinator_of_another_log_is_never_used() {
    let a = Fake::new("log-1");
    let other = Fake::new("log-2");
    let (a_uri, _a) = serve(a.clone()).await;
    let (other_uri, _o) = serve(other.clone()).await;
    let client = Client::connect_any([a_uri, other_uri.clone()], &ClientOptions::new())
        .await
        .expect("connect");
    a.set(Behave::Unavailable);
    let e = client
        .two_phase()
        .branch(Branch::new("http://127.0.0.1:1", "h"))
        .submit()
        .await
        .expect_err("no coordinator of log-1 answers");
    assert!(
        matches!(e, ClientError::OutcomeUnknown { .. }),
        "the first Begin may have landed: {e:?}"
    );
    assert!(
        other.begun.lock().unwrap().is_empty(),
        "a Begin sent to another log would run the transaction twice"
    );
    let e = client
        .get("g")
        .await
        .expect_err("no coordinator of log-1 answers");
    assert!(
        e.to_string().contains("log-2") && e.to_string().contains("log-1"),
        "{e}"
    );
}

#[tokio::test]
async fn no_coordinator_answering_at_connect_is_an_error_naming_one() {
    let dead = dead_uri().await;
    let e = Client::connect_any([dead.clone()], &ClientOptions::new())
        .await
        .expect_err("nothing answers");
    assert!(matches!(e, ClientError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains(&dead), "{e}");
    let e = Client::connect_any(Vec::<String>::new(), &ClientOptions::new())
        .await
        .expect_err("no URI");
    assert!(matches!(e, ClientError::InvalidInput(_)), "{e:?}");
}
