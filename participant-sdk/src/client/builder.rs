//! Transaction definitions: saga [`Step`]s and 2PC [`Branch`]es with named parts, the two
//! builders that submit them, and the options they share.

use std::time::Duration;

use bytes::Bytes;
use treaty_proto::v1 as pb;

use super::error::{submit_error, ClientError};
use super::status::{Mode, Submitted};
use super::Client;

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

/// Serializes `value` as JSON, or says which part of which handler's branch did not.
fn json<T: serde::Serialize + ?Sized>(
    what: &str,
    handler: &str,
    value: &T,
) -> Result<Bytes, String> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| format!("the {what} for handler {handler:?} does not serialize as JSON: {e}"))
}

/// One saga step: `handler` at the participant `endpoint` executes the payload, and is given
/// the compensation payload if the step must be undone. Both payloads default to empty.
///
/// ```
/// use treaty_sdk::client::Step;
/// let step = Step::new("http://127.0.0.1:7801", "book")
///     .payload(&b"room 12"[..])
///     .compensation(&b"room 12"[..]);
/// let typed = Step::new("http://127.0.0.1:7801", "book")
///     .payload_json(&("room", 12))
///     .compensation_json(&("room", 12));
/// # let _ = (step, typed);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    branch: pb::Branch,
    /// The first payload that did not serialize; reported by `submit`, so the builder
    /// methods stay chainable.
    error: Option<String>,
}

impl Step {
    /// A step calling `handler` at the participant `endpoint` (a gRPC URI).
    pub fn new(endpoint: impl Into<String>, handler: impl Into<String>) -> Step {
        Step {
            branch: pb::Branch {
                endpoint: endpoint.into(),
                handler: handler.into(),
                ..Default::default()
            },
            error: None,
        }
    }

    /// The bytes `execute` gets.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.branch.payload = payload.into();
        self
    }

    /// The bytes `compensate` gets.
    pub fn compensation(mut self, payload: impl Into<Bytes>) -> Self {
        self.branch.compensation_payload = payload.into();
        self
    }

    /// `execute`'s payload as JSON (decode it with [`crate::decode_json`]). A value that does
    /// not serialize makes `submit` fail with [`ClientError::InvalidInput`].
    pub fn payload_json<T: serde::Serialize + ?Sized>(self, value: &T) -> Self {
        self.json_into("payload", value, |b| &mut b.payload)
    }

    /// `compensate`'s payload as JSON; as [`Step::payload_json`].
    pub fn compensation_json<T: serde::Serialize + ?Sized>(self, value: &T) -> Self {
        self.json_into("compensation payload", value, |b| {
            &mut b.compensation_payload
        })
    }

    fn json_into<T: serde::Serialize + ?Sized>(
        mut self,
        what: &str,
        value: &T,
        slot: fn(&mut pb::Branch) -> &mut Bytes,
    ) -> Self {
        match json(what, &self.branch.handler, value) {
            Ok(bytes) => *slot(&mut self.branch) = bytes,
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }
}

/// One 2PC branch: `handler` at the participant `endpoint` gets the payload for prepare,
/// commit and abort. The payload defaults to empty.
///
/// ```
/// use treaty_sdk::client::Branch;
/// let raw = Branch::new("http://127.0.0.1:7801", "debit").payload(&b"40"[..]);
/// let typed = Branch::new("http://127.0.0.1:7801", "debit").payload_json(&40);
/// # let _ = (raw, typed);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    step: Step,
}

impl Branch {
    /// A branch calling `handler` at the participant `endpoint` (a gRPC URI).
    pub fn new(endpoint: impl Into<String>, handler: impl Into<String>) -> Branch {
        Branch {
            step: Step::new(endpoint, handler),
        }
    }

    /// The bytes prepare, commit and abort get.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.step = self.step.payload(payload);
        self
    }

    /// The payload as JSON (decode it with [`crate::decode_json`]). A value that does not
    /// serialize makes `submit` fail with [`ClientError::InvalidInput`].
    pub fn payload_json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        self.step = self.step.payload_json(value);
        self
    }
}

/// What both builders share.
#[derive(Debug)]
struct Definition {
    client: Client,
    mode: Mode,
    gid: Option<String>,
    deadline: Option<Duration>,
    retry: Option<RetryPolicy>,
    branches: Vec<pb::Branch>,
    /// The first branch that could not be built, returned by `submit`.
    error: Option<String>,
}

impl Definition {
    fn new(client: Client, mode: Mode) -> Definition {
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

    fn push(&mut self, step: Step) {
        if let Some(e) = step.error {
            let n = self.branches.len();
            self.error.get_or_insert(format!("branch {n}: {e}"));
        }
        self.branches.push(step.branch);
    }

    async fn submit(self, wait: Option<Duration>) -> Result<Submitted, ClientError> {
        if let Some(e) = self.error {
            return Err(ClientError::InvalidInput(e));
        }
        // Chosen here rather than by the coordinator, so a call that fails after sending
        // can still name the transaction (`OutcomeUnknown`), and a resubmission is idempotent.
        let gid = self.gid.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let req = pb::BeginRequest {
            gid: gid.clone(),
            mode: self.mode.to_proto() as i32,
            branches: self.branches,
            deadline_ms: self.deadline.map_or(0, |d| d.as_millis().max(1) as u64),
            retry: self.retry.map(Into::into),
            wait: wait.is_some(),
            wait_timeout_ms: wait.map_or(0, |w| w.as_millis().max(1) as u64),
        };
        // Resubmitting to another coordinator of the same log with the same gid is safe:
        // `Begin` is idempotent for the same gid and definition.
        let timeout = self.client.call_timeout + wait.unwrap_or_default();
        let resp = self
            .client
            .call(timeout, |mut c| {
                let mut request = tonic::Request::new(req.clone());
                request.set_timeout(timeout);
                async move { c.begin(request).await }
            })
            .await
            .map_err(|status| submit_error(&gid, status))?
            .into_inner();
        Ok(Submitted::from_proto(resp, gid))
    }
}

macro_rules! common_options {
    () => {
        /// Uses `gid` instead of a generated UUIDv7. Submitting the same definition with the
        /// same gid twice is idempotent; another definition with it fails with
        /// [`ClientError::GidExists`]. The SDK does not check the gid: the coordinator
        /// enforces its own (configurable) limits and answers [`ClientError::Rejected`] with
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

        /// Submits the transaction and returns once it is durably recorded; the coordinator
        /// drives it from there. [`Submitted::gid`] names it for [`Client::get`] and
        /// [`Client::watch`].
        ///
        /// [`ClientError::Rejected`]: nothing was recorded. [`ClientError::OutcomeUnknown`]:
        /// it may have been; the error names the gid to look up.
        /// [`ClientError::GidExists`]: the gid already names another transaction; look that
        /// one up. [`ClientError::InvalidInput`]: a payload did not serialize; nothing was
        /// sent.
        pub async fn submit(self) -> Result<Submitted, ClientError> {
            self.def.submit(None).await
        }

        /// Submits the transaction and waits up to `wait` for its final outcome (the
        /// coordinator may cap the wait). [`Outcome::Pending`] when the wait ran out: follow
        /// the transaction up with [`Client::get`] / [`Client::watch`] on
        /// [`Submitted::gid`]. Errors as for `submit`.
        pub async fn submit_and_wait(self, wait: Duration) -> Result<Submitted, ClientError> {
            self.def.submit(Some(wait)).await
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
    pub(super) fn new(client: Client) -> SagaBuilder {
        SagaBuilder {
            def: Definition::new(client, Mode::Saga),
        }
    }

    /// Adds `step` after the ones added so far.
    pub fn step(mut self, step: Step) -> Self {
        self.def.push(step);
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
    pub(super) fn new(client: Client) -> TwoPhaseBuilder {
        TwoPhaseBuilder {
            def: Definition::new(client, Mode::TwoPhase),
        }
    }

    /// Adds `branch` after the ones added so far.
    pub fn branch(mut self, branch: Branch) -> Self {
        self.def.push(branch.step);
        self
    }

    common_options!();
}
