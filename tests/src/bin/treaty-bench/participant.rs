//! The no-op participant (`treaty-bench participant`): serves `treaty.v1.Participant` and
//! answers at once, storing nothing, so the bench measures the coordinator, not a store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_server::{Participant, ParticipantServer};

/// How phase one (`Prepare`, `Execute`) is answered. Phase two always answers `DONE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Answer {
    /// PREPARED / SUCCEEDED.
    Ok,
    /// RETRY: the transaction waits in backoff (a participant that cannot answer yet).
    Retry,
}

#[derive(Clone)]
struct Noop {
    answer: Answer,
    /// While this file does not exist, phase one answers RETRY whatever `answer` says: a
    /// participant holding its transactions until the bench releases them (`takeover`).
    hold_until: Option<Arc<PathBuf>>,
    calls: Arc<AtomicU64>,
}

impl Noop {
    /// Whether phase one answers OK now.
    fn ok_now(&self) -> bool {
        self.answer == Answer::Ok && self.hold_until.as_ref().is_none_or(|p| p.exists())
    }
}

#[tonic::async_trait]
impl Participant for Noop {
    async fn prepare(
        &self,
        _req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let result = if self.ok_now() {
            pb::PrepareResult::Prepared
        } else {
            pb::PrepareResult::Retry
        };
        Ok(Response::new(pb::PrepareResponse {
            result: result as i32,
            message: String::new(),
        }))
    }

    async fn execute(
        &self,
        _req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let result = if self.ok_now() {
            pb::ExecuteResult::Succeeded
        } else {
            pb::ExecuteResult::Retry
        };
        Ok(Response::new(pb::ExecuteResponse {
            result: result as i32,
            message: String::new(),
        }))
    }

    async fn commit(
        &self,
        _req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::PhaseTwoResponse>, Status> {
        Ok(done())
    }

    async fn abort(
        &self,
        _req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::PhaseTwoResponse>, Status> {
        Ok(done())
    }

    async fn compensate(
        &self,
        _req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::PhaseTwoResponse>, Status> {
        Ok(done())
    }
}

fn done() -> Response<pb::PhaseTwoResponse> {
    Response::new(pb::PhaseTwoResponse {
        result: pb::PhaseTwoResult::Done as i32,
        message: String::new(),
    })
}

/// Serve until killed (the bench SIGKILLs its participants when it is done). Prints
/// `listening on <addr>` on stdout once bound. With `hold_until`, phase one answers RETRY
/// until that file exists.
pub async fn serve(
    listen: SocketAddr,
    answer: Answer,
    hold_until: Option<PathBuf>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on {addr}");
    let svc = Noop {
        answer,
        hold_until: hold_until.map(Arc::new),
        calls: Arc::new(AtomicU64::new(0)),
    };
    // Nagle off on accepted sockets, as tonic's own `serve(addr)` does.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(ParticipantServer::new(svc))
        .serve_with_incoming(incoming)
        .await
        .map_err(|e| format!("participant server failed: {e}"))
}
