//! The client side: submit sagas and 2PC transactions to a coordinator, and look them up.
//!
//! The SDK chooses the gid (a UUIDv7) before sending when the caller gives none, so a call
//! that fails after sending can still name the transaction in
//! [`SdkError::OutcomeUnknown`]; resubmitting with that gid is safe (`Begin` is idempotent
//! for the same gid and definition).

use std::time::Duration;

use bytes::Bytes;
use tonic::transport::{Channel, Endpoint};
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_client::CoordinatorClient;

use crate::error::{read_error, submit_error, SdkError};

/// Default bound on one coordinator call (plus the wait, for `submit_and_wait`).
pub const CALL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// Bound on establishing the connection in [`Client::connect`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The final outcome of a transaction, or `Pending` while it is not final yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Every branch committed (2PC) or every step succeeded (saga).
    Committed,
    /// Aborted (2PC) or compensated (saga).
    Aborted,
    /// Not final yet (or the wait bound passed): use [`Client::get`] / [`Client::watch`].
    Pending,
}

impl Outcome {
    fn from_proto(o: pb::Outcome) -> Outcome {
        match o {
            pb::Outcome::Committed => Outcome::Committed,
            pb::Outcome::Aborted => Outcome::Aborted,
            pb::Outcome::Pending | pb::Outcome::Unspecified => Outcome::Pending,
        }
    }
}

/// Retry policy for a transaction's branch calls: exponential backoff with full jitter.
/// Mirrors the proto `RetryPolicy`; a zero field takes the coordinator's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First backoff, ms (coordinator default 100).
    pub initial_backoff_ms: u64,
    /// Backoff cap, ms (coordinator default 30 000).
    pub max_backoff_ms: u64,
    /// Phase-two attempts after which the transaction is flagged stuck (default 10). It is
    /// still retried.
    pub stuck_after_attempts: u32,
}

impl From<RetryPolicy> for pb::RetryPolicy {
    fn from(p: RetryPolicy) -> Self {
        pb::RetryPolicy {
            initial_backoff_ms: p.initial_backoff_ms,
            max_backoff_ms: p.max_backoff_ms,
            stuck_after_attempts: p.stuck_after_attempts,
        }
    }
}

/// A connection to a Treaty coordinator. Cheap to clone (one shared HTTP/2 channel).
#[derive(Debug, Clone)]
pub struct Client {
    inner: CoordinatorClient<Channel>,
    call_timeout: Duration,
}

impl Client {
    /// Connects to the coordinator at `uri` (e.g. `http://127.0.0.1:7700`).
    ///
    /// Fails with [`SdkError::Config`] on a malformed URI and [`SdkError::Connect`] when
    /// nothing answers there. Later calls reconnect on their own.
    pub async fn connect(uri: impl Into<String>) -> Result<Client, SdkError> {
        let uri = uri.into();
        crate::refuse_tls_uri(&uri)?;
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|e| SdkError::Config(format!("coordinator URI {uri:?} is invalid: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| SdkError::Connect { uri, source })?;
        Ok(Client {
            inner: CoordinatorClient::new(channel),
            call_timeout: CALL_TIMEOUT_DEFAULT,
        })
    }

    /// Sets the bound on each call (default [`CALL_TIMEOUT_DEFAULT`]); `submit_and_wait` adds
    /// its wait to it.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Starts a saga definition.
    pub fn saga(&self) -> SagaBuilder {
        SagaBuilder {
            def: Definition::new(self.clone(), pb::Mode::Saga),
        }
    }

    /// Starts a two-phase-commit definition.
    pub fn two_phase(&self) -> TwoPhaseBuilder {
        TwoPhaseBuilder {
            def: Definition::new(self.clone(), pb::Mode::TwoPhase),
        }
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.call_timeout);
        r
    }

    /// The current state of transaction `gid`. Unknown gid: [`SdkError::Rejected`] with
    /// `NOT_FOUND`.
    pub async fn get(&self, gid: impl Into<String>) -> Result<pb::Transaction, SdkError> {
        let req = self.request(pb::GetRequest { gid: gid.into() });
        Ok(self
            .inner
            .clone()
            .get(req)
            .await
            .map_err(read_error)?
            .into_inner())
    }

    /// A stream of transaction `gid`'s state on every change, ending when it is terminal.
    /// Items are `Err(Status)` if the stream breaks: call `watch` again.
    pub async fn watch(
        &self,
        gid: impl Into<String>,
    ) -> Result<tonic::Streaming<pb::Transaction>, SdkError> {
        // No call timeout: a watch lasts as long as the transaction.
        let req = tonic::Request::new(pb::WatchRequest { gid: gid.into() });
        Ok(self
            .inner
            .clone()
            .watch(req)
            .await
            .map_err(read_error)?
            .into_inner())
    }

    /// The outcome of `gid` as the coordinator knows it (an unknown gid is `Aborted`:
    /// presumed abort).
    pub async fn outcome(&self, gid: impl Into<String>) -> Result<Outcome, SdkError> {
        let req = self.request(pb::OutcomeRequest { gid: gid.into() });
        let resp = self.inner.clone().outcome(req).await.map_err(read_error)?;
        Ok(Outcome::from_proto(resp.into_inner().outcome()))
    }

    /// Makes every waiting branch call of `gid` go out now (operator action).
    pub async fn retry(&self, gid: impl Into<String>) -> Result<pb::RetryResponse, SdkError> {
        let req = self.request(pb::RetryRequest { gid: gid.into() });
        Ok(self
            .inner
            .clone()
            .retry(req)
            .await
            .map_err(read_error)?
            .into_inner())
    }

    /// Transactions matching `filter`, newest first, one page.
    pub async fn list(&self, filter: pb::ListRequest) -> Result<pb::ListResponse, SdkError> {
        let req = self.request(filter);
        Ok(self
            .inner
            .clone()
            .list(req)
            .await
            .map_err(read_error)?
            .into_inner())
    }

    /// The generated gRPC client, for anything the wrappers do not cover.
    pub fn coordinator(&self) -> CoordinatorClient<Channel> {
        self.inner.clone()
    }
}

/// What both builders share.
#[derive(Debug)]
struct Definition {
    client: Client,
    mode: pb::Mode,
    gid: Option<String>,
    deadline: Option<Duration>,
    retry: Option<RetryPolicy>,
    branches: Vec<pb::Branch>,
    /// The first error met while building (a payload that did not serialize), returned by
    /// `submit`: builder methods stay chainable.
    error: Option<SdkError>,
}

impl Definition {
    fn new(client: Client, mode: pb::Mode) -> Definition {
        Definition {
            client,
            mode,
            gid: None,
            deadline: None,
            retry: None,
            branches: Vec::new(),
            error: None,
        }
    }

    fn push(
        &mut self,
        endpoint: String,
        handler: String,
        payload: Bytes,
        compensation_payload: Bytes,
    ) {
        self.branches.push(pb::Branch {
            endpoint,
            handler,
            payload,
            compensation_payload,
        });
    }

    fn json<T: serde::Serialize + ?Sized>(
        &mut self,
        what: &str,
        handler: &str,
        value: &T,
    ) -> Bytes {
        match serde_json::to_vec(value) {
            Ok(v) => Bytes::from(v),
            Err(e) => {
                let n = self.branches.len();
                self.error.get_or_insert(SdkError::Config(format!(
                    "{what} of branch {n} (handler {handler:?}) does not serialize as JSON: {e}"
                )));
                Bytes::new()
            }
        }
    }

    async fn submit(self, wait: Option<Duration>) -> Result<(String, Outcome), SdkError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let gid = self.gid.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let req = pb::BeginRequest {
            gid: gid.clone(),
            mode: self.mode as i32,
            branches: self.branches,
            deadline_ms: self.deadline.map_or(0, |d| d.as_millis().max(1) as u64),
            retry: self.retry.map(Into::into),
            wait: wait.is_some(),
            wait_timeout_ms: wait.map_or(0, |w| w.as_millis().max(1) as u64),
        };
        let mut request = tonic::Request::new(req);
        request.set_timeout(self.client.call_timeout + wait.unwrap_or_default());
        let resp = self
            .client
            .inner
            .clone()
            .begin(request)
            .await
            .map_err(|status| submit_error(&gid, status))?
            .into_inner();
        let outcome = Outcome::from_proto(resp.outcome());
        let gid = if resp.gid.is_empty() { gid } else { resp.gid };
        Ok((gid, outcome))
    }
}

macro_rules! common_options {
    () => {
        /// Uses `gid` instead of a generated UUIDv7. Submitting the same definition with the
        /// same gid twice is idempotent; another definition with it fails with
        /// [`SdkError::GidExists`]. The SDK does not check the gid: the coordinator enforces
        /// its own (configurable) limits and answers [`SdkError::Rejected`] with
        /// `INVALID_ARGUMENT`.
        pub fn gid(mut self, gid: impl Into<String>) -> Self {
            self.def.gid = Some(gid.into());
            self
        }

        /// Deadline for phase one (2PC) or the forward run (saga); default: the coordinator's.
        pub fn deadline(mut self, deadline: Duration) -> Self {
            self.def.deadline = Some(deadline);
            self
        }

        /// Retry policy for the branch calls; default: the coordinator's.
        pub fn retry(mut self, policy: RetryPolicy) -> Self {
            self.def.retry = Some(policy);
            self
        }

        /// Submits the transaction and returns its gid once it is durably recorded; the
        /// coordinator drives it from there.
        ///
        /// [`SdkError::Rejected`]: nothing was recorded. [`SdkError::OutcomeUnknown`]: it may
        /// have been; the error names the gid to look up. [`SdkError::GidExists`]: the gid
        /// already names another transaction; look that one up.
        pub async fn submit(self) -> Result<String, SdkError> {
            Ok(self.def.submit(None).await?.0)
        }

        /// Submits the transaction and waits up to `wait` for its final outcome (the
        /// coordinator may cap the wait). [`Outcome::Pending`] when the wait ran out: to
        /// follow such a transaction up ([`Client::get`], [`Client::watch`]), choose its gid
        /// with `gid(..)` before submitting (which also makes a resubmission after
        /// [`SdkError::OutcomeUnknown`] idempotent), or use `submit` and then `watch`.
        pub async fn submit_and_wait(self, wait: Duration) -> Result<Outcome, SdkError> {
            Ok(self.def.submit(Some(wait)).await?.1)
        }
    };
}

/// Builds a saga: steps run in order; on a failure the steps that ran are compensated in
/// reverse order. Made by [`Client::saga`].
#[derive(Debug)]
pub struct SagaBuilder {
    def: Definition,
}

impl SagaBuilder {
    /// Adds a step: `handler` at the participant `endpoint` executes `payload`, and is given
    /// `compensation_payload` if the step must be undone.
    pub fn step(
        mut self,
        endpoint: impl Into<String>,
        handler: impl Into<String>,
        payload: impl Into<Bytes>,
        compensation_payload: impl Into<Bytes>,
    ) -> Self {
        self.def.push(
            endpoint.into(),
            handler.into(),
            payload.into(),
            compensation_payload.into(),
        );
        self
    }

    /// Adds a step whose payloads are serde values, sent as JSON (decode them with
    /// [`crate::decode_json`]).
    pub fn step_json<T: serde::Serialize + ?Sized, U: serde::Serialize + ?Sized>(
        mut self,
        endpoint: impl Into<String>,
        handler: impl Into<String>,
        payload: &T,
        compensation_payload: &U,
    ) -> Self {
        let handler = handler.into();
        let p = self.def.json("payload", &handler, payload);
        let c = self
            .def
            .json("compensation payload", &handler, compensation_payload);
        self.def.push(endpoint.into(), handler, p, c);
        self
    }

    common_options!();
}

/// Builds a two-phase-commit transaction: every branch prepares, then all commit or all
/// abort. Made by [`Client::two_phase`].
#[derive(Debug)]
pub struct TwoPhaseBuilder {
    def: Definition,
}

impl TwoPhaseBuilder {
    /// Adds a branch: `handler` at the participant `endpoint` gets `payload` for prepare,
    /// commit and abort.
    pub fn branch(
        mut self,
        endpoint: impl Into<String>,
        handler: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        self.def.push(
            endpoint.into(),
            handler.into(),
            payload.into(),
            Bytes::new(),
        );
        self
    }

    /// Adds a branch whose payload is a serde value, sent as JSON.
    pub fn branch_json<T: serde::Serialize + ?Sized>(
        mut self,
        endpoint: impl Into<String>,
        handler: impl Into<String>,
        payload: &T,
    ) -> Self {
        let handler = handler.into();
        let p = self.def.json("payload", &handler, payload);
        self.def.push(endpoint.into(), handler, p, Bytes::new());
        self
    }

    common_options!();
}
