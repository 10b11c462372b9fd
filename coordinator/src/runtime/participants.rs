//! Calling participants: one pooled tonic channel per endpoint (TLS for `https://` ones,
//! with the CA and client identity of [`Outbound`]), a timeout per call, the shared token on
//! every call, and the mapping from gRPC statuses to engine [`Reply`]s (typed answers map in
//! `crate::mapping`).

use crate::engine::{Op, Reply};
use crate::mapping::{execute_reply, phase_two_reply, prepare_reply};
use crate::security::{Outbound, AUTHORIZATION};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use treaty_proto::v1::{participant_client::ParticipantClient, BranchRequest};

/// Channels the pool keeps at most; past it the least recently used one is dropped (a later
/// call to its endpoint connects again).
pub const POOL_CHANNELS_MAX: usize = 4_096;

/// A channel unused for this long is dropped by [`Pool::evict_idle`]: endpoints come and go
/// (participants are redeployed under new addresses) and each channel holds a connection.
pub const POOL_IDLE_MAX: Duration = Duration::from_secs(600);

/// One lazily connected HTTP/2 channel per participant endpoint, shared by every
/// transaction (calls are multiplexed as streams). Bounded: see [`POOL_CHANNELS_MAX`] and
/// [`POOL_IDLE_MAX`].
pub struct Pool {
    clients: Mutex<HashMap<String, (ParticipantClient<Channel>, Instant)>>,
    call_timeout: Duration,
    /// TLS and token for calls, or why they could not be read (then every call fails with
    /// it; `server::run` refuses to start in that case, so only embedders see it).
    outbound: Result<Outbound, String>,
}

/// A participant to call: its client and the credentials every call carries.
pub struct Target {
    client: ParticipantClient<Channel>,
    token: Option<tonic::metadata::AsciiMetadataValue>,
}

impl Pool {
    pub fn new(call_timeout: Duration, outbound: Result<Outbound, String>) -> Pool {
        Pool {
            clients: Mutex::new(HashMap::new()),
            call_timeout,
            outbound,
        }
    }

    /// Channels held now.
    pub fn len(&self) -> usize {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no channel is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every channel unused since `now - idle_max`. Returns how many.
    pub fn evict_idle(&self, now: Instant, idle_max: Duration) -> usize {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let before = clients.len();
        clients.retain(|_, (_, used)| now.saturating_duration_since(*used) < idle_max);
        before - clients.len()
    }

    /// The client for `endpoint`, created on first use. The endpoint was validated at
    /// `Begin`, but a bad one still yields an error, never a panic.
    pub fn client(&self, endpoint: &str) -> Result<Target, String> {
        let outbound = self.outbound.as_ref().map_err(Clone::clone)?;
        let target = |client| Target {
            client,
            token: outbound.token.clone(),
        };
        let now = Instant::now();
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((c, used)) = clients.get_mut(endpoint) {
            *used = now;
            return Ok(target(c.clone()));
        }
        if clients.len() >= POOL_CHANNELS_MAX {
            let oldest = clients
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                clients.remove(&k);
            }
        }
        let mut ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("bad endpoint {endpoint:?}: {e}"))?;
        if ep.uri().scheme_str() == Some("https") {
            let tls = outbound.tls.clone().ok_or_else(|| {
                format!("endpoint {endpoint:?} is https:// but treatyd has no --participant-ca")
            })?;
            ep = ep
                .tls_config(tls)
                .map_err(|e| format!("TLS for endpoint {endpoint:?}: {e}"))?;
        }
        let ep = ep
            .timeout(self.call_timeout)
            .connect_timeout(self.call_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let client = ParticipantClient::new(ep.connect_lazy());
        clients.insert(endpoint.to_string(), (client.clone(), now));
        Ok(target(client))
    }
}

/// Make one call with `client` (as [`Pool::client`] returned it) and classify the result.
/// Never fails: anything that is not a definite answer is [`Reply::Transient`].
pub async fn call(
    target: Result<Target, String>,
    call_timeout: Duration,
    op: Op,
    req: BranchRequest,
    span: &tracing::Span,
) -> Reply {
    {
        let Target { mut client, token } = match target {
            Ok(t) => t,
            Err(e) => return Reply::Transient(e),
        };
        let mut req = tonic::Request::new(req);
        if let Some(token) = token {
            req.metadata_mut().insert(AUTHORIZATION, token);
        }
        // The participant continues the trace from this call's span (nothing when off).
        crate::otel::inject(span, req.metadata_mut());
        let call = async {
            match op {
                Op::Prepare => client
                    .prepare(req)
                    .await
                    .map(|r| prepare_reply(r.into_inner())),
                Op::Execute => client
                    .execute(req)
                    .await
                    .map(|r| execute_reply(r.into_inner())),
                Op::Commit => client
                    .commit(req)
                    .await
                    .map(|r| phase_two_reply(r.into_inner())),
                Op::Abort => client
                    .abort(req)
                    .await
                    .map(|r| phase_two_reply(r.into_inner())),
                Op::Compensate => client
                    .compensate(req)
                    .await
                    .map(|r| phase_two_reply(r.into_inner())),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn channels_are_bounded_and_idle_ones_evicted() {
        let pool = Pool::new(Duration::from_secs(1), Ok(Outbound::default()));
        for i in 0..POOL_CHANNELS_MAX + 10 {
            pool.client(&format!("http://127.0.0.1:{}", 1000 + i))
                .expect("client");
        }
        assert_eq!(pool.len(), POOL_CHANNELS_MAX, "the cap holds");
        // The most recent endpoints are the ones kept.
        let newest = format!("http://127.0.0.1:{}", 1000 + POOL_CHANNELS_MAX + 9);
        assert!(pool.clients.lock().unwrap().contains_key(&newest));
        assert_eq!(pool.evict_idle(Instant::now(), Duration::from_secs(60)), 0);
        let later = Instant::now() + Duration::from_secs(61);
        assert_eq!(
            pool.evict_idle(later, Duration::from_secs(60)),
            POOL_CHANNELS_MAX
        );
        assert!(pool.is_empty());
    }
}
