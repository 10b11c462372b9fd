//! Calling participants: one pooled tonic channel per endpoint, a timeout per call, and the
//! mapping from typed answers and gRPC statuses to engine [`Reply`]s.

use crate::engine::{Op, Reply};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use treaty_proto::v1::{
    participant_client::ParticipantClient, BranchRequest, ExecuteResult, PhaseTwoResult,
    PrepareResult,
};

/// One lazily connected HTTP/2 channel per participant endpoint, shared by every
/// transaction (calls are multiplexed as streams).
pub struct Pool {
    clients: Mutex<HashMap<String, ParticipantClient<Channel>>>,
    call_timeout: Duration,
}

impl Pool {
    pub fn new(call_timeout: Duration) -> Pool {
        Pool {
            clients: Mutex::new(HashMap::new()),
            call_timeout,
        }
    }

    /// The client for `endpoint`, created on first use. The endpoint was validated at
    /// `Begin`, but a bad one still yields an error, never a panic.
    pub fn client(&self, endpoint: &str) -> Result<ParticipantClient<Channel>, String> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(endpoint) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("bad endpoint {endpoint:?}: {e}"))?
            .timeout(self.call_timeout)
            .connect_timeout(self.call_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let client = ParticipantClient::new(ep.connect_lazy());
        clients.insert(endpoint.to_string(), client.clone());
        Ok(client)
    }
}

/// Make one call with `client` (as [`Pool::client`] returned it) and classify the result.
/// Never fails: anything that is not a definite answer is [`Reply::Transient`].
pub async fn call(
    client: Result<ParticipantClient<Channel>, String>,
    call_timeout: Duration,
    op: Op,
    req: BranchRequest,
) -> Reply {
    {
        let mut client = match client {
            Ok(c) => c,
            Err(e) => return Reply::Transient(e),
        };
        let call = async {
            match op {
                Op::Prepare => client.prepare(req).await.map(|r| {
                    let r = r.into_inner();
                    match r.result() {
                        PrepareResult::Prepared => Reply::Prepared,
                        PrepareResult::Refused => Reply::Refused(r.message),
                        other => {
                            Reply::Transient(format!("{}: {}", other.as_str_name(), r.message))
                        }
                    }
                }),
                Op::Execute => client.execute(req).await.map(|r| {
                    let r = r.into_inner();
                    match r.result() {
                        ExecuteResult::Succeeded => Reply::Succeeded,
                        ExecuteResult::Failed => Reply::Failed(r.message),
                        other => {
                            Reply::Transient(format!("{}: {}", other.as_str_name(), r.message))
                        }
                    }
                }),
                Op::Commit | Op::Abort | Op::Compensate => {
                    let r = match op {
                        Op::Commit => client.commit(req).await,
                        Op::Abort => client.abort(req).await,
                        _ => client.compensate(req).await,
                    };
                    r.map(|r| {
                        let r = r.into_inner();
                        match r.result() {
                            PhaseTwoResult::Done => Reply::Done,
                            other => {
                                Reply::Transient(format!("{}: {}", other.as_str_name(), r.message))
                            }
                        }
                    })
                }
            }
        };
        // tonic's per-request timeout normally fires first; this is the backstop.
        match tokio::time::timeout(call_timeout + Duration::from_millis(500), call).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(status)) => {
                Reply::Transient(format!("{:?}: {}", status.code(), status.message()))
            }
            Err(_) => Reply::Transient(format!("no answer within {call_timeout:?}")),
        }
    }
}
