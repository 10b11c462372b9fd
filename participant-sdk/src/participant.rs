//! The participant side: handlers, the builder, and the `treaty.v1.Participant` gRPC service.
//!
//! A request goes: gRPC method → [`Participant`] looks up the handler by name → the
//! participant's [`BarrierStore`] runs the barrier's plan and the handler in **one
//! transaction of its own store**, then makes it durable ([`BarrierStore::deliver`]) → the
//! typed answer leaves. No answer leaves before its barrier row is on stable storage, so a
//! `PREPARED` promise or a `DONE` survives a crash of the participant.
//!
//! Everything here is generic over the store `S`: a handler is written for one store (it
//! receives that store's transaction, [`Txn<'_, S>`](Txn)), and the participant serves
//! handlers of one store. [`crate::sled::SledStore`] is the embedded default.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use opentelemetry::trace::TraceContextExt;
use sha2::{Digest, Sha256};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_client::CoordinatorClient;
use treaty_proto::v1::participant_server::{Participant as ParticipantService, ParticipantServer};

use crate::barrier::rules::{self, InDoubtDecision as Decision, Told};
use crate::barrier::{now_unix_ms, Answer, InDoubt, Op, Verdict, FIELD_BYTES_MAX, GID_BYTES_MAX};
use crate::error::{chain, HandlerError, ParticipantError};
use crate::metrics::ParticipantMetrics;
use crate::retention::RetentionPolicy;
use crate::store::{panic_message, BarrierStore, HandlerCall, HandlerFuture, Txn};
use crate::tls::{ClientOptions, ServerTls, AUTHORIZATION};

/// What a handler returns: `Ok(())` to commit its writes with the barrier row,
/// `Err(`[`refuse`]`(..))` for a business "no", or [`HandlerError::Retry`] (also what `?`
/// on a store error gives) to be delivered again later.
pub type HandlerResult = Result<(), HandlerError>;

/// A business "no": return `Err(refuse("insufficient funds"))` from a handler.
///
/// From `prepare` it means REFUSED, from `execute` FAILED. From `commit`, `abort` and
/// `compensate` it is answered as RETRY: those must eventually succeed.
pub fn refuse(reason: impl Into<String>) -> HandlerError {
    HandlerError::Refuse(reason.into())
}

/// Decodes a JSON payload (as sent by the client's `*_json` helpers); a payload that does
/// not decode is refused with the decoding error as the reason.
pub fn decode_json<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, HandlerError> {
    serde_json::from_slice(payload)
        .map_err(|e| refuse(format!("payload is not the JSON expected: {e}")))
}

/// What a handler knows about the call it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchContext {
    /// Global transaction id.
    pub gid: String,
    /// This branch's index in the transaction.
    pub branch_id: u32,
    /// 1 for the first delivery of this operation, then 2, 3, ...; 0 when the SDK's in-doubt
    /// resolver replays a commit/abort on its own.
    pub attempt: u32,
    /// Unix ms after which the coordinator no longer waits for phase one; 0: none.
    pub deadline_unix_ms: u64,
    /// The handler name the operation was addressed to.
    pub handler: String,
    /// Identity of the coordinator log that drives the branch (`BranchRequest.log_id`);
    /// empty when the coordinator sent none (an older coordinator).
    pub log_id: String,
    /// Where to ask `Coordinator.Outcome` about this gid; empty: the participant's configured
    /// coordinator.
    pub outcome_endpoint: String,
}

/// A two-phase-commit handler for store `S`: prepare, then commit or abort.
///
/// Each method runs **inside one transaction of the store** (`tx`), together with the
/// barrier row, so its writes and the row commit atomically. The barrier guarantees each
/// method's writes are applied at most once per branch, that `commit`/`abort` run only after
/// a successful `prepare`, and never both.
///
/// Write only through `tx`, with no side effects outside it (no network calls, no counters,
/// no files): a store may run a method more than once (sled re-runs a transaction on a
/// conflict) and rolls its writes back on a refusal. On sled, keep it short (sled 0.34
/// serializes transactions process-wide) and do not await anything but the handle; keys
/// starting with `0xFF 't'` are reserved for the barrier.
///
/// `prepare` must make `commit` certain to succeed (reserve, do not just check); `commit` and
/// `abort` must eventually succeed: a refusal from them is answered as RETRY.
///
/// Implement it with `async fn`s, or build one from closures with [`TwoPhase`]. The futures
/// need not be `Send` (the store decides where they run).
pub trait TwoPhaseHandler<S: BarrierStore>: Send + Sync + 'static {
    /// Phase one: validate and reserve. Return [`refuse`] for a business "no".
    fn prepare(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, S>,
        payload: &[u8],
    ) -> impl Future<Output = HandlerResult>;
    /// Make the prepared change final. `payload` is the branch payload again.
    fn commit(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, S>,
        payload: &[u8],
    ) -> impl Future<Output = HandlerResult>;
    /// Release what `prepare` reserved. Called only if `prepare` answered PREPARED.
    fn abort(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, S>,
        payload: &[u8],
    ) -> impl Future<Output = HandlerResult>;
}

/// A saga step handler for store `S`: execute, and compensate if the saga fails.
///
/// Same rules as [`TwoPhaseHandler`]: runs inside one transaction of the store together with
/// the barrier row, may run more than once, must have no side effects outside `tx`.
/// `compensate` runs only if `execute` succeeded (a compensation for a step that never ran is
/// recorded without calling it) and must eventually succeed. Build one from closures with
/// [`Saga`].
pub trait SagaHandler<S: BarrierStore>: Send + Sync + 'static {
    /// Apply the step. Return [`refuse`] for a business failure (FAILED).
    fn execute(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, S>,
        payload: &[u8],
    ) -> impl Future<Output = HandlerResult>;
    /// Undo the step. `payload` is the step's compensation payload.
    fn compensate(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, S>,
        payload: &[u8],
    ) -> impl Future<Output = HandlerResult>;
}

/// A method of [`TwoPhase`] or [`Saga`] not given yet. A builder with one of these does not
/// implement the handler trait: registering it fails to compile.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unset;

/// A [`TwoPhaseHandler`] from three async closures (or `async fn`s), named:
///
/// ```
/// use treaty_sdk::{sled::SledStore, TwoPhase, TwoPhaseHandler};
///
/// fn handler() -> impl TwoPhaseHandler<SledStore> {
///     TwoPhase::<SledStore>::new()
///         .prepare(async |_ctx, tx, payload| {
///             tx.insert(b"held", payload)?; // reserve
///             Ok(())
///         })
///         .commit(async |_ctx, tx, _payload| {
///             tx.remove(b"held")?; // apply
///             Ok(())
///         })
///         .abort(async |_ctx, tx, _payload| {
///             tx.remove(b"held")?; // release
///             Ok(())
///         })
/// }
/// ```
///
/// Name the store (`TwoPhase::<SledStore>::new()`) so the closures' `tx` has a known type.
/// All three must be given.
pub struct TwoPhase<S, P = Unset, C = Unset, A = Unset> {
    prepare: P,
    commit: C,
    abort: A,
    store: PhantomData<fn() -> S>,
}

impl<S: BarrierStore> TwoPhase<S> {
    /// A builder with no method given yet.
    pub fn new() -> Self {
        TwoPhase {
            prepare: Unset,
            commit: Unset,
            abort: Unset,
            store: PhantomData,
        }
    }
}

impl<S: BarrierStore> Default for TwoPhase<S> {
    fn default() -> Self {
        TwoPhase::new()
    }
}

impl<S: BarrierStore, P, C, A> TwoPhase<S, P, C, A> {
    /// Phase one ([`TwoPhaseHandler::prepare`]).
    pub fn prepare<F>(self, prepare: F) -> TwoPhase<S, F, C, A>
    where
        F: AsyncFn(&BranchContext, &mut Txn<'_, S>, &[u8]) -> HandlerResult + Send + Sync + 'static,
    {
        TwoPhase {
            prepare,
            commit: self.commit,
            abort: self.abort,
            store: PhantomData,
        }
    }

    /// Commit ([`TwoPhaseHandler::commit`]).
    pub fn commit<F>(self, commit: F) -> TwoPhase<S, P, F, A>
    where
        F: AsyncFn(&BranchContext, &mut Txn<'_, S>, &[u8]) -> HandlerResult + Send + Sync + 'static,
    {
        TwoPhase {
            prepare: self.prepare,
            commit,
            abort: self.abort,
            store: PhantomData,
        }
    }

    /// Abort ([`TwoPhaseHandler::abort`]).
    pub fn abort<F>(self, abort: F) -> TwoPhase<S, P, C, F>
    where
        F: AsyncFn(&BranchContext, &mut Txn<'_, S>, &[u8]) -> HandlerResult + Send + Sync + 'static,
    {
        TwoPhase {
            prepare: self.prepare,
            commit: self.commit,
            abort,
            store: PhantomData,
        }
    }
}

impl<S, P, C, A> TwoPhaseHandler<S> for TwoPhase<S, P, C, A>
where
    S: BarrierStore,
    P: AsyncFn(&BranchContext, &mut Txn<'_, S>, &[u8]) -> HandlerResult + Send + Sync + 'static,
    C: AsyncFn(&BranchContext, &mut Txn<'_, S>, &[u8]) -> HandlerResult + Send + Sync + 'static,
    A: AsyncFn(&BranchContext, &mut Txn<'_, S>, &[u8]) -> HandlerResult + Send + Sync + 'static,
{
    fn prepare(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, S>,
        payload: &[u8],
    ) -> impl Future<Output = HandlerResult> {
        (self.prepare)(ctx, tx, payload)
    }
    fn commit(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, S>,
        payload: &[u8],
    ) -> impl Future<Output = HandlerResult> {
        (self.commit)(ctx, tx, payload)
    }
    fn abort(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, S>,
        payload: &[u8],
    ) -> impl Future<Output = HandlerResult> {
        (self.abort)(ctx, tx, payload)
    }
}

/// A [`SagaHandler`] from two async closures (or `async fn`s), named:
///
/// ```
/// use treaty_sdk::{sled::SledStore, Saga, SagaHandler};
///
/// fn handler() -> impl SagaHandler<SledStore> {
///     Saga::<SledStore>::new()
///         .execute(async |ctx, tx, payload| {
///             tx.insert(ctx.gid.as_bytes(), payload)?; // apply
///             Ok(())
///         })
///         .compensate(async |ctx, tx, _payload| {
///             tx.remove(ctx.gid.as_bytes())?; // undo
///             Ok(())
///         })
/// }
/// ```
///
/// Both must be given.
pub struct Saga<S, E = Unset, C = Unset> {
    execute: E,
    compensate: C,
    store: PhantomData<fn() -> S>,
}

impl<S: BarrierStore> Saga<S> {
    /// A builder with no method given yet.
    pub fn new() -> Self {
        Saga {
            execute: Unset,
            compensate: Unset,
            store: PhantomData,
        }
    }
}

impl<S: BarrierStore> Default for Saga<S> {
    fn default() -> Self {
        Saga::new()
    }
}

impl<S: BarrierStore, E, C> Saga<S, E, C> {
    /// The step ([`SagaHandler::execute`]).
    pub fn execute<F>(self, execute: F) -> Saga<S, F, C>
    where
        F: AsyncFn(&BranchContext, &mut Txn<'_, S>, &[u8]) -> HandlerResult + Send + Sync + 'static,
    {
        Saga {
            execute,
            compensate: self.compensate,
            store: PhantomData,
        }
    }

    /// Its compensation ([`SagaHandler::compensate`]).
    pub fn compensate<F>(self, compensate: F) -> Saga<S, E, F>
    where
        F: AsyncFn(&BranchContext, &mut Txn<'_, S>, &[u8]) -> HandlerResult + Send + Sync + 'static,
    {
        Saga {
            execute: self.execute,
            compensate,
            store: PhantomData,
        }
    }
}

impl<S, E, C> SagaHandler<S> for Saga<S, E, C>
where
    S: BarrierStore,
    E: AsyncFn(&BranchContext, &mut Txn<'_, S>, &[u8]) -> HandlerResult + Send + Sync + 'static,
    C: AsyncFn(&BranchContext, &mut Txn<'_, S>, &[u8]) -> HandlerResult + Send + Sync + 'static,
{
    fn execute(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, S>,
        payload: &[u8],
    ) -> impl Future<Output = HandlerResult> {
        (self.execute)(ctx, tx, payload)
    }
    fn compensate(
        &self,
        ctx: &BranchContext,
        tx: &mut Txn<'_, S>,
        payload: &[u8],
    ) -> impl Future<Output = HandlerResult> {
        (self.compensate)(ctx, tx, payload)
    }
}

/// A handler of either kind made object-safe: the participant keeps handlers of many types
/// by name. [`Registered`] pairs it with its kind, so `call` sees only the operations
/// [`Registered::serves`] admits.
trait DynHandler<S: BarrierStore>: Send + Sync {
    fn call<'a, 't: 'a>(
        &'a self,
        op: Op,
        ctx: &'a BranchContext,
        tx: &'a mut Txn<'t, S>,
        payload: &'a [u8],
    ) -> HandlerFuture<'a>;
}

struct AsTwoPhase<H>(H);
struct AsSaga<H>(H);

/// The answer for an operation a handler has no method for: unreachable through
/// [`HandlerCall::new`], which checks [`Registered::serves`], but a retry, never a panic.
fn not_served<'a>(op: Op, kind: &str) -> HandlerFuture<'a> {
    let why = format!("bug: a {kind} handler was called for {op}");
    Box::pin(async move { Err(crate::HandlerError::retry(why)) })
}

impl<S: BarrierStore, H: TwoPhaseHandler<S>> DynHandler<S> for AsTwoPhase<H> {
    fn call<'a, 't: 'a>(
        &'a self,
        op: Op,
        ctx: &'a BranchContext,
        tx: &'a mut Txn<'t, S>,
        payload: &'a [u8],
    ) -> HandlerFuture<'a> {
        match op {
            Op::Prepare => Box::pin(self.0.prepare(ctx, tx, payload)),
            Op::Commit => Box::pin(self.0.commit(ctx, tx, payload)),
            Op::Abort => Box::pin(self.0.abort(ctx, tx, payload)),
            Op::Execute | Op::Compensate => not_served(op, "2PC"),
        }
    }
}

impl<S: BarrierStore, H: SagaHandler<S>> DynHandler<S> for AsSaga<H> {
    fn call<'a, 't: 'a>(
        &'a self,
        op: Op,
        ctx: &'a BranchContext,
        tx: &'a mut Txn<'t, S>,
        payload: &'a [u8],
    ) -> HandlerFuture<'a> {
        match op {
            Op::Execute => Box::pin(self.0.execute(ctx, tx, payload)),
            Op::Compensate => Box::pin(self.0.compensate(ctx, tx, payload)),
            Op::Prepare | Op::Commit | Op::Abort => not_served(op, "saga"),
        }
    }
}

/// A registered handler, of either kind.
pub(crate) struct Registered<S: BarrierStore> {
    two_phase: bool,
    handler: Arc<dyn DynHandler<S>>,
}

impl<S: BarrierStore> Clone for Registered<S> {
    fn clone(&self) -> Self {
        Registered {
            two_phase: self.two_phase,
            handler: self.handler.clone(),
        }
    }
}

impl<S: BarrierStore> Registered<S> {
    pub(crate) fn two_phase(h: impl TwoPhaseHandler<S>) -> Self {
        Registered {
            two_phase: true,
            handler: Arc::new(AsTwoPhase(h)),
        }
    }

    pub(crate) fn saga(h: impl SagaHandler<S>) -> Self {
        Registered {
            two_phase: false,
            handler: Arc::new(AsSaga(h)),
        }
    }

    /// Whether this handler has a method for `op` (a 2PC handler serves prepare, commit and
    /// abort; a saga handler execute and compensate).
    pub(crate) fn serves(&self, op: Op) -> bool {
        let two_phase_op = matches!(op, Op::Prepare | Op::Commit | Op::Abort);
        two_phase_op == self.two_phase
    }

    pub(crate) fn call<'a, 't: 'a>(
        &'a self,
        op: Op,
        ctx: &'a BranchContext,
        tx: &'a mut Txn<'t, S>,
        payload: &'a [u8],
    ) -> HandlerFuture<'a> {
        self.handler.call(op, ctx, tx, payload)
    }
}

/// Default for [`ParticipantBuilder::in_doubt_after`].
pub const IN_DOUBT_AFTER_DEFAULT: Duration = Duration::from_secs(30);

/// Timeout for connecting to, and for each call to, the coordinator during in-doubt
/// resolution.
const COORDINATOR_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The in-doubt resolver never runs more often than this, whatever `in_doubt_after` is.
const RESOLVE_INTERVAL_MIN: Duration = Duration::from_millis(100);

/// How the configured coordinator is reached.
enum CoordinatorConfig {
    /// Dialled by the SDK, with the builder's [`ClientOptions`].
    Uri(String),
    /// A channel the user built (TLS, interceptors, load balancing), for the coordinator
    /// that branches name by this URI.
    Channel(String, Channel),
}

/// Configures a [`Participant`]; made by [`Participant::builder`].
pub struct ParticipantBuilder<S: BarrierStore> {
    store: S,
    coordinator: Option<CoordinatorConfig>,
    coordinator_options: ClientOptions,
    required_token: Option<String>,
    in_doubt_after: Duration,
    retention: Option<RetentionPolicy>,
    handlers: HashMap<String, Registered<S>>,
    duplicates: Vec<String>,
}

impl<S: BarrierStore> ParticipantBuilder<S> {
    /// The coordinator's gRPC URI (e.g. `http://127.0.0.1:7700`), asked during in-doubt
    /// resolution about branches that name no outcome endpoint of their own (coordinators
    /// from before `BranchRequest.outcome_endpoint`, or ones that leave it empty). Without
    /// it, such a branch left prepared waits for its coordinator to resend.
    pub fn coordinator(mut self, uri: impl Into<String>) -> Self {
        self.coordinator = Some(CoordinatorConfig::Uri(uri.into()));
        self
    }

    /// Like [`ParticipantBuilder::coordinator`], through a channel you built (TLS,
    /// interceptors, load balancing stay your choice). `uri` is the coordinator's name as
    /// branches give it in their outcome endpoint: a branch naming `uri`, or naming none, is
    /// resolved through `channel`. Each call is still bounded by the SDK's call timeout.
    pub fn coordinator_channel(mut self, uri: impl Into<String>, channel: Channel) -> Self {
        self.coordinator = Some(CoordinatorConfig::Channel(uri.into(), channel));
        self
    }

    /// How the SDK dials coordinators for in-doubt inquiries (the configured one and those
    /// that branches name): TLS for `https://` URIs and a token. With `treatyd --auth-tokens`
    /// the token needs the `read` role (`Outcome` is a read).
    pub fn coordinator_options(mut self, options: ClientOptions) -> Self {
        self.coordinator_options = options;
        self
    }

    /// Refuse every branch call (prepare, commit, abort, execute, compensate) that does not
    /// carry `authorization: Bearer <token>`, with UNAUTHENTICATED and without touching the
    /// store: only a coordinator given the token (`treatyd --participant-token-file`) can
    /// drive this participant. The token must be printable ASCII without spaces.
    pub fn require_token(mut self, token: impl Into<String>) -> Self {
        self.required_token = Some(token.into());
        self
    }

    /// How long a branch stays prepared, without commit or abort, before the participant asks
    /// the coordinator for its outcome. Default 30 s. The resolver runs every half of this.
    pub fn in_doubt_after(mut self, after: Duration) -> Self {
        self.in_doubt_after = after;
        self
    }

    /// Sweeps the barrier rows of finished transactions by `policy` (see
    /// [`crate::retention`] for when a row may go and why that is safe). Off by default: rows
    /// are kept forever. The store must support it ([`BarrierStore::sweeps`]).
    pub fn retention(mut self, policy: RetentionPolicy) -> Self {
        self.retention = Some(policy);
        self
    }

    /// Registers a 2PC handler under `name` (the `handler` of the branches addressed to it).
    pub fn two_phase(mut self, name: impl Into<String>, handler: impl TwoPhaseHandler<S>) -> Self {
        self.register(name.into(), Registered::two_phase(handler));
        self
    }

    /// Registers a saga handler under `name`.
    pub fn saga(mut self, name: impl Into<String>, handler: impl SagaHandler<S>) -> Self {
        self.register(name.into(), Registered::saga(handler));
        self
    }

    fn register(&mut self, name: String, h: Registered<S>) {
        if self.handlers.insert(name.clone(), h).is_some() {
            self.duplicates.push(name);
        }
    }

    /// Checks the configuration.
    ///
    /// Fails with [`ParticipantError::Config`] on a duplicate, empty or too long handler
    /// name, a bad coordinator URI or a zero `in_doubt_after`.
    pub fn build(self) -> Result<Participant<S>, ParticipantError> {
        if !self.duplicates.is_empty() {
            return Err(ParticipantError::Config(format!(
                "handler names registered twice: {:?}; each name must be unique",
                self.duplicates
            )));
        }
        if self.handlers.contains_key("") {
            return Err(ParticipantError::Config(
                "a handler was registered with an empty name".into(),
            ));
        }
        if let Some(long) = self.handlers.keys().find(|n| n.len() > FIELD_BYTES_MAX) {
            return Err(ParticipantError::Config(format!(
                "handler name {:?}... is {} bytes; at most {FIELD_BYTES_MAX} are allowed",
                long.chars().take(32).collect::<String>(),
                long.len()
            )));
        }
        if self.in_doubt_after.is_zero() {
            return Err(ParticipantError::Config(
                "in_doubt_after must be more than zero".into(),
            ));
        }
        if let Some(policy) = &self.retention {
            policy.check()?;
            if !self.store.sweeps() {
                return Err(ParticipantError::Config(
                    "retention is configured but this barrier store does not sweep (BarrierStore::sweeps is false)"
                        .into(),
                ));
            }
        }
        let required_token = match self.required_token {
            None => None,
            Some(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()) => {
                Some(digest(format!("Bearer {t}").as_bytes()))
            }
            Some(_) => {
                return Err(ParticipantError::Config(
                    "require_token: the token must be non-empty printable ASCII without spaces"
                        .into(),
                ))
            }
        };
        let coordinator_token = self
            .coordinator_options
            .bearer()
            .map_err(|e| ParticipantError::Config(format!("coordinator_options: {e}")))?;
        let mut clients = HashMap::new();
        let coordinator = match self.coordinator {
            None => None,
            Some(CoordinatorConfig::Uri(uri)) => {
                // Checked now (TLS files included), dialled when first needed.
                endpoint(&uri, &self.coordinator_options).map_err(ParticipantError::Config)?;
                Some(uri)
            }
            Some(CoordinatorConfig::Channel(uri, channel)) => {
                if uri.is_empty() {
                    return Err(ParticipantError::Config(
                        "coordinator_channel needs the coordinator's URI as branches name it"
                            .into(),
                    ));
                }
                clients.insert(uri.clone(), CoordinatorClient::new(channel));
                Some(uri)
            }
        };
        Ok(Participant {
            inner: Arc::new(Inner {
                store: self.store,
                handlers: self.handlers,
                coordinator,
                coordinator_options: self.coordinator_options,
                coordinator_token,
                required_token,
                coordinator_clients: tokio::sync::Mutex::new(clients),
                in_doubt_after: self.in_doubt_after,
                retention: self.retention,
                first_round_done: AtomicBool::new(false),
                fatal: tokio::sync::watch::channel(None).0,
                metrics: ParticipantMetrics::default(),
            }),
        })
    }
}

/// The endpoint the SDK dials for a coordinator URI (TLS for `https://`, through the same
/// builder as [`crate::Client::connect_with`]), or why it cannot.
fn endpoint(uri: &str, options: &ClientOptions) -> Result<Endpoint, String> {
    Ok(options
        .endpoint(uri, COORDINATOR_CALL_TIMEOUT)?
        .timeout(COORDINATOR_CALL_TIMEOUT))
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A participant: registered handlers behind the barrier of store `S`, served as the
/// `treaty.v1.Participant` gRPC service. Cheap to clone (shared state).
pub struct Participant<S: BarrierStore> {
    inner: Arc<Inner<S>>,
}

impl<S: BarrierStore> Clone for Participant<S> {
    fn clone(&self) -> Self {
        Participant {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<S: BarrierStore> {
    store: S,
    handlers: HashMap<String, Registered<S>>,
    /// The configured coordinator's URI (its client, when given as a channel, is in
    /// `coordinator_clients` from the start).
    coordinator: Option<String>,
    /// How coordinator URIs are dialled, and the token sent on each inquiry.
    coordinator_options: ClientOptions,
    coordinator_token: Option<AsciiMetadataValue>,
    /// SHA-256 of the `authorization` value every branch call must carry, if required.
    required_token: Option<[u8; 32]>,
    /// Clients of the coordinators asked so far, by URI.
    coordinator_clients: tokio::sync::Mutex<HashMap<String, CoordinatorClient<Channel>>>,
    in_doubt_after: Duration,
    retention: Option<RetentionPolicy>,
    /// Until one resolver round completed, every prepared branch counts as in doubt, whatever
    /// its age: after a restart nobody else may ever tell us.
    first_round_done: AtomicBool,
    /// Set once the store can no longer promise durability: from then on the participant
    /// must stop and restart (fail-stop, see [`Participant::failed`]).
    fatal: tokio::sync::watch::Sender<Option<String>>,
    metrics: ParticipantMetrics,
}

impl<S: BarrierStore> std::fmt::Debug for Participant<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.inner.handlers.keys().collect();
        names.sort();
        f.debug_struct("Participant")
            .field("handlers", &names)
            .field("coordinator", &self.inner.coordinator)
            .field("in_doubt_after", &self.inner.in_doubt_after)
            .finish()
    }
}

impl<S: BarrierStore> Participant<S> {
    /// Starts configuring a participant whose handlers write to `store` (which also keeps
    /// the barrier rows, in the same transactions).
    pub fn builder(store: S) -> ParticipantBuilder<S> {
        ParticipantBuilder {
            store,
            coordinator: None,
            coordinator_options: ClientOptions::new(),
            required_token: None,
            in_doubt_after: IN_DOUBT_AFTER_DEFAULT,
            retention: None,
            handlers: HashMap::new(),
            duplicates: Vec::new(),
        }
    }

    /// The store the handlers write to (to read business data and barrier rows).
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The configured retention policy, if any.
    pub fn retention_policy(&self) -> Option<&RetentionPolicy> {
        self.inner.retention.as_ref()
    }

    /// The configured coordinator's URI, if any.
    pub(crate) fn coordinator_uri(&self) -> Option<&str> {
        self.inner.coordinator.as_deref()
    }

    /// Add this participant's metrics (see [`crate::metrics`]) to the host service's
    /// Prometheus registry. Register one participant per registry (names would clash).
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.metrics.register(registry);
    }

    /// The tonic service, to `add_service` to a server you already run. Does not start the
    /// in-doubt resolver: also call [`Participant::spawn_in_doubt_resolver`].
    pub fn into_service(self) -> ParticipantServer<Participant<S>> {
        ParticipantServer::new(self)
    }

    /// Serves the participant alone on `listener` until `shutdown` resolves, and runs the
    /// in-doubt resolver (at start, then every `in_doubt_after / 2`) and, when a retention
    /// policy is configured, the sweeper ([`Participant::spawn_sweeper`]).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ParticipantError> {
        self.serve_on(tonic::transport::Server::builder(), listener, shutdown)
            .await
    }

    /// [`Participant::serve`] over TLS with `tls` (with a client CA, only callers presenting
    /// a certificate it signed can connect: mTLS). Fails with [`ParticipantError::Config`],
    /// naming the file, when a certificate or key cannot be read or used.
    pub async fn serve_tls(
        self,
        listener: tokio::net::TcpListener,
        tls: ServerTls,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ParticipantError> {
        let config = tls
            .server_config()
            .map_err(|e| ParticipantError::Config(format!("serve_tls: {e}")))?;
        let builder = tonic::transport::Server::builder()
            .tls_config(config)
            .map_err(|e| ParticipantError::Config(format!("serve_tls: {e}")))?;
        self.serve_on(builder, listener, shutdown).await
    }

    async fn serve_on(
        self,
        mut builder: tonic::transport::Server,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ParticipantError> {
        let resolver = self.spawn_in_doubt_resolver();
        let sweeper = self.spawn_sweeper();
        let me = self.clone();
        let failed = async move { me.failed().await };
        let res = builder
            .add_service(self.clone().into_service())
            .serve_with_incoming_shutdown(
                // Nagle off: small HTTP/2 frames must not wait for delayed ACKs.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move {
                    tokio::select! {
                        _ = shutdown => {}
                        _ = failed => {}
                    }
                },
            )
            .await;
        resolver.abort();
        if let Some(sweeper) = sweeper {
            sweeper.abort();
        }
        if let Some(why) = self.inner.fatal.borrow().clone() {
            return Err(ParticipantError::DurabilityLost(why));
        }
        res.map_err(ParticipantError::Serve)
    }

    /// Why this participant stopped, once its store can no longer make barrier rows durable
    /// (an fsync failed, and as after fsyncgate nothing written since can be vouched for).
    /// Every delivery is then answered RETRY; the process must stop and restart (the store
    /// recovers from disk). `None` while all is well.
    pub fn failure(&self) -> Option<String> {
        self.inner.fatal.borrow().clone()
    }

    /// Resolves, with the reason, once [`Participant::failure`] is set.
    /// [`Participant::serve`] then returns [`ParticipantError::DurabilityLost`] by itself;
    /// when you serve [`Participant::into_service`] in your own server, stop it when this
    /// resolves.
    pub async fn failed(&self) -> String {
        let mut rx = self.inner.fatal.subscribe();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Starts the in-doubt resolver task (a round now, then every `in_doubt_after / 2`).
    /// [`Participant::serve`] does this itself; call it when you `add_service`
    /// [`Participant::into_service`] to your own server, and abort the handle on shutdown.
    /// Needs a tokio runtime. It runs even without a configured coordinator: branches name
    /// the coordinator to ask (`BranchRequest.outcome_endpoint`).
    pub fn spawn_in_doubt_resolver(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().resolver_loop())
    }

    async fn resolver_loop(self) {
        let period = (self.inner.in_doubt_after / 2).max(RESOLVE_INTERVAL_MIN);
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.resolve_in_doubt().await {
                Ok(r) if r.resolved == 0 => {}
                Ok(r) => tracing::info!(resolved = r.resolved, "resolved in-doubt branches"),
                Err(e) => {
                    tracing::warn!(error = %e, "in-doubt resolution failed; will retry next round")
                }
            }
        }
    }

    /// One round of in-doubt resolution: for every branch prepared here more than
    /// `in_doubt_after` ago (until a round has reached every coordinator it needed since
    /// start: every open prepared branch) and neither committed nor aborted, asks
    /// `Coordinator.Outcome` at the endpoint the branch named (or the configured coordinator
    /// when it named none), and applies the answer through the barrier.
    ///
    /// An answer is acted on only when it comes from the log that drove the branch
    /// (`OutcomeResponse.log_id` equals the `log_id` stored with the prepare): COMMITTED runs
    /// commit, ABORTED (known, or presumed because the log has no record) runs abort, PENDING
    /// waits. An answer from another log leaves the branch in doubt and is logged at ERROR:
    /// presumed abort from a log that never drove the branch (a wiped or different
    /// coordinator) could abort a branch its real coordinator committed. A branch prepared
    /// without a log id (an older coordinator) is resolved only by an answer the coordinator
    /// knows (`known = true`), never by presumption.
    ///
    /// A coordinator that cannot be reached is logged and counted in
    /// [`Resolution::unanswered`]; the round goes on with the others. Fails only when the
    /// index cannot be read ([`ParticipantError::Storage`]).
    pub async fn resolve_in_doubt(&self) -> Result<Resolution, ParticipantError> {
        let first = !self.inner.first_round_done.load(Ordering::Acquire);
        let cutoff = (!first)
            .then(|| now_unix_ms().saturating_sub(self.inner.in_doubt_after.as_millis() as u64));
        let branches = self.inner.store.in_doubt(cutoff).await?;
        let mut r = Resolution::default();
        // One question per (endpoint, gid): the branches of one gid share its outcome.
        let mut answers: HashMap<(String, String), Option<pb::OutcomeResponse>> = HashMap::new();
        for b in branches {
            let uri = if b.outcome_endpoint.is_empty() {
                match &self.inner.coordinator {
                    Some(uri) => uri.clone(),
                    None => {
                        tracing::warn!(gid = %b.gid, branch_id = b.branch_id, "in-doubt branch names no coordinator and none is configured (ParticipantBuilder::coordinator); it waits for its coordinator to resend");
                        r.unanswered += 1;
                        continue;
                    }
                }
            } else {
                b.outcome_endpoint.clone()
            };
            let key = (uri.clone(), b.gid.clone());
            let answer = match answers.get(&key) {
                Some(a) => a.clone(),
                None => {
                    let a = self.ask_outcome(&uri, &b.gid).await;
                    answers.insert(key, a.clone());
                    a
                }
            };
            let Some(answer) = answer else {
                r.unanswered += 1;
                continue;
            };
            let op = match decide(&b, &answer) {
                Decision::Apply(op) => op,
                Decision::Pending => {
                    r.pending += 1;
                    continue;
                }
                Decision::WrongLog => {
                    tracing::error!(
                        gid = %b.gid,
                        branch_id = b.branch_id,
                        stored_log_id = %b.log_id,
                        answer_log_id = %answer.log_id,
                        endpoint = %uri,
                        "in-doubt branch left in doubt: the outcome came from another coordinator \
                         log than the one that prepared it (asked the wrong coordinator? its log \
                         wiped or replaced?); not acting on it"
                    );
                    r.wrong_log += 1;
                    continue;
                }
                Decision::UnknownWithoutLogId => {
                    tracing::warn!(
                        gid = %b.gid,
                        branch_id = b.branch_id,
                        endpoint = %uri,
                        "in-doubt branch prepared without a log id (older coordinator) is unknown \
                         to the coordinator; presumed abort is not applied without a log \
                         identity: left in doubt"
                    );
                    r.unknown_without_log_id += 1;
                    continue;
                }
            };
            let ctx = BranchContext {
                gid: b.gid.clone(),
                branch_id: b.branch_id,
                attempt: 0,
                deadline_unix_ms: 0,
                handler: b.handler,
                log_id: b.log_id,
                outcome_endpoint: b.outcome_endpoint,
            };
            match self.apply(op, ctx, Bytes::from(b.payload)).await {
                Verdict::Answer { .. } => {
                    tracing::info!(gid = %b.gid, branch_id = b.branch_id, known = answer.known, "in-doubt branch resolved: {op}");
                    r.resolved += 1;
                    self.inner.metrics.in_doubt_resolved(1);
                }
                Verdict::Retry(msg) | Verdict::Violation(msg) => {
                    tracing::warn!(gid = %b.gid, branch_id = b.branch_id, "in-doubt {op} not applied: {msg}");
                    r.not_applied += 1;
                }
            }
        }
        if r.unanswered == 0 {
            self.inner.first_round_done.store(true, Ordering::Release);
        }
        Ok(r)
    }

    /// Asks the coordinator at `uri` for the outcome of `gid`; `None` (logged) when it cannot
    /// be asked or does not answer within the call timeout.
    pub(crate) async fn ask_outcome(&self, uri: &str, gid: &str) -> Option<pb::OutcomeResponse> {
        let mut client = {
            let mut cached = self.inner.coordinator_clients.lock().await;
            match cached.get(uri) {
                Some(c) => c.clone(),
                None => {
                    let endpoint = match endpoint(uri, &self.inner.coordinator_options) {
                        Ok(e) => e,
                        Err(why) => {
                            tracing::error!(gid = %gid, endpoint = %uri, "outcome endpoint of an in-doubt branch cannot be dialled ({why}); it waits for its coordinator to resend");
                            return None;
                        }
                    };
                    match endpoint.connect().await {
                        Ok(ch) => cached
                            .entry(uri.to_string())
                            .or_insert(CoordinatorClient::new(ch))
                            .clone(),
                        Err(e) => {
                            tracing::warn!(gid = %gid, endpoint = %uri, error = %chain(&e), "cannot reach the coordinator to resolve an in-doubt branch; will retry next round");
                            return None;
                        }
                    }
                }
            }
        };
        let mut req = Request::new(pb::OutcomeRequest {
            gid: gid.to_string(),
        });
        if let Some(token) = &self.inner.coordinator_token {
            req.metadata_mut().insert(AUTHORIZATION, token.clone());
        }
        // Bounded even on a channel the user built without a timeout.
        match tokio::time::timeout(COORDINATOR_CALL_TIMEOUT, client.outcome(req)).await {
            Ok(Ok(r)) => Some(r.into_inner()),
            Ok(Err(status)) => {
                tracing::warn!(gid = %gid, endpoint = %uri, error = %status, "asking the coordinator for the outcome failed; will retry next round");
                None
            }
            Err(_) => {
                tracing::warn!(gid = %gid, endpoint = %uri, "the coordinator did not answer the outcome question in {COORDINATOR_CALL_TIMEOUT:?}; will retry next round");
                None
            }
        }
    }

    /// Runs one operation through the store's barrier, which makes the answer durable
    /// before returning. Every path that answers a participant operation goes through here.
    async fn apply(&self, op: Op, ctx: BranchContext, payload: Bytes) -> Verdict {
        let store = &self.inner.store;
        let started = std::time::Instant::now();
        let (gid, branch_id) = (ctx.gid.clone(), ctx.branch_id);
        let call = self
            .inner
            .handlers
            .get(&ctx.handler)
            .and_then(|h| HandlerCall::new(op, h.clone()));
        // A store catches a panicking handler itself; one that escapes a store must not take
        // the service down either, and is reported the same way (never as a configuration
        // error).
        let verdict = match AssertUnwindSafe(store.deliver(op, ctx, payload, call))
            .catch_unwind()
            .await
        {
            Ok(v) => v,
            Err(panic) => {
                let msg = panic_message(&*panic);
                tracing::error!(gid = %gid, branch_id, "{op} handler panicked: {msg}");
                Verdict::Retry(format!("{op} handler panicked: {msg}"))
            }
        };
        if let Some(why) = store.failure() {
            self.inner.fatal.send_if_modified(|f| {
                if f.is_some() {
                    return false;
                }
                tracing::error!(reason = %why, "participant storage lost durability: stop this process and restart it (fail-stop); the store recovers from disk");
                self.inner.metrics.failed();
                *f = Some(why.clone());
                true
            });
        }
        self.inner
            .metrics
            .delivered(op, &verdict, started.elapsed());
        verdict
    }

    async fn handle(&self, op: Op, req: Request<pb::BranchRequest>) -> Result<Verdict, Status> {
        if let Some(expected) = &self.inner.required_token {
            // Digests are compared, not the secrets, so the time taken says nothing about
            // how much of a guess was right.
            let sent = req
                .metadata()
                .get(AUTHORIZATION)
                .map(|v| digest(v.as_bytes()));
            if sent.as_ref() != Some(expected) {
                tracing::warn!(?op, gid = %req.get_ref().gid, "branch call refused: no or wrong coordinator token");
                return Err(Status::unauthenticated(
                    "this participant accepts branch calls only from its coordinator: send \
                     `authorization: Bearer <token>` (treatyd --participant-token-file)",
                ));
            }
        }
        let parent = treaty_proto::trace_context::extract(req.metadata());
        let req = req.into_inner();
        check_request(&req)?;
        // The handler runs in this span, a child of the coordinator's branch-call span, so
        // spans a handler opens join the transaction's trace.
        let span = tracing::info_span!(
            "treaty.handle",
            otel.name = handle_name(op),
            otel.kind = "server",
            treaty.gid = %req.gid,
            treaty.branch = req.branch_id,
            treaty.op = op.as_str(),
            treaty.attempt = req.attempt,
            treaty.handler = %req.handler,
        );
        if parent.span().span_context().is_valid() {
            // Fails only without an OpenTelemetry layer, when the span goes nowhere anyway.
            let _ = span.set_parent(parent);
        }
        let ctx = BranchContext {
            gid: req.gid,
            branch_id: req.branch_id,
            attempt: req.attempt,
            deadline_unix_ms: req.deadline_unix_ms,
            handler: req.handler,
            log_id: req.log_id,
            outcome_endpoint: req.outcome_endpoint,
        };
        Ok(self.apply(op, ctx, req.payload).instrument(span).await)
    }
}

/// The name of a delivery's span, by operation.
fn handle_name(op: Op) -> &'static str {
    match op {
        Op::Prepare => "treaty.handle prepare",
        Op::Commit => "treaty.handle commit",
        Op::Abort => "treaty.handle abort",
        Op::Execute => "treaty.handle execute",
        Op::Compensate => "treaty.handle compensate",
    }
}

/// Checks only what the participant's own storage needs: the gid becomes part of every
/// barrier key (non-empty, no NUL: NUL ends the gid in a key, at most [`GID_BYTES_MAX`]
/// bytes), and the handler, log id and outcome endpoint are stored in rows (at most
/// [`FIELD_BYTES_MAX`] bytes each). Every other limit (the gid's alphabet, its usual length)
/// is the coordinator's to enforce, with its own configuration.
fn check_request(req: &pb::BranchRequest) -> Result<(), Status> {
    let gid = &req.gid;
    if gid.is_empty() {
        return Err(Status::invalid_argument(
            "gid is empty: BranchRequest.gid is required",
        ));
    }
    if gid.len() > GID_BYTES_MAX || gid.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "gid is invalid: BranchRequest.gid must be at most {GID_BYTES_MAX} bytes with no NUL \
             (this participant's key layout); it is {} bytes",
            gid.len()
        )));
    }
    for (name, value) in [
        ("handler", &req.handler),
        ("log_id", &req.log_id),
        ("outcome_endpoint", &req.outcome_endpoint),
    ] {
        if value.len() > FIELD_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "BranchRequest.{name} is {} bytes; this participant stores at most \
                 {FIELD_BYTES_MAX}",
                value.len()
            )));
        }
    }
    Ok(())
}

/// What one round of [`Participant::resolve_in_doubt`] did, branch by branch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Resolution {
    /// Branches committed or aborted on their coordinator's answer.
    pub resolved: usize,
    /// Branches whose coordinator answered PENDING.
    pub pending: usize,
    /// Branches left in doubt because the answer came from another log than the one that
    /// prepared them (each logged at ERROR).
    pub wrong_log: usize,
    /// Branches prepared without a log id (older coordinator) that the coordinator does not
    /// know: never aborted by presumption, left in doubt.
    pub unknown_without_log_id: usize,
    /// Branches whose coordinator could not be asked (none named or configured, unreachable,
    /// call failed); asked again next round.
    pub unanswered: usize,
    /// Branches whose outcome is known but could not be applied (storage error, handler
    /// missing or refusing; logged); applied again once they are old enough to be asked
    /// again.
    pub not_applied: usize,
}

/// The log-identity rule of presumed abort, applied to a protobuf answer: see
/// [`rules::decide_in_doubt`].
fn decide(branch: &InDoubt, answer: &pb::OutcomeResponse) -> Decision {
    let told = match answer.outcome() {
        pb::Outcome::Committed => Told::Committed,
        pb::Outcome::Aborted => Told::Aborted,
        pb::Outcome::Pending | pb::Outcome::Unspecified => Told::Pending,
    };
    rules::decide_in_doubt(&branch.log_id, told, answer.known, &answer.log_id)
}

fn phase_two(v: Verdict) -> pb::PhaseTwoResponse {
    let (result, message) = match v {
        Verdict::Answer {
            answer: Answer::Done,
            message,
        } => (pb::PhaseTwoResult::Done, message),
        Verdict::Answer { answer, .. } => (
            pb::PhaseTwoResult::Retry,
            format!("bug: phase two recorded {answer:?}"),
        ),
        Verdict::Retry(m) | Verdict::Violation(m) => (pb::PhaseTwoResult::Retry, m),
    };
    pb::PhaseTwoResponse {
        result: result as i32,
        message,
    }
}

#[tonic::async_trait]
impl<S: BarrierStore> ParticipantService for Participant<S> {
    async fn prepare(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let (result, message) = match self.handle(Op::Prepare, req).await? {
            Verdict::Answer {
                answer: Answer::Prepared,
                message,
            } => (pb::PrepareResult::Prepared, message),
            Verdict::Answer {
                answer: Answer::Refused,
                message,
            } => (pb::PrepareResult::Refused, message),
            // Impossible (rows are checked on read), but never worth a panic.
            Verdict::Answer { answer, .. } => (
                pb::PrepareResult::Retry,
                format!("bug: prepare recorded {answer:?}"),
            ),
            Verdict::Retry(m) | Verdict::Violation(m) => (pb::PrepareResult::Retry, m),
        };
        Ok(Response::new(pb::PrepareResponse {
            result: result as i32,
            message,
        }))
    }

    async fn commit(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::PhaseTwoResponse>, Status> {
        Ok(Response::new(phase_two(
            self.handle(Op::Commit, req).await?,
        )))
    }

    async fn abort(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::PhaseTwoResponse>, Status> {
        Ok(Response::new(phase_two(self.handle(Op::Abort, req).await?)))
    }

    async fn execute(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let (result, message) = match self.handle(Op::Execute, req).await? {
            Verdict::Answer {
                answer: Answer::Succeeded,
                message,
            } => (pb::ExecuteResult::Succeeded, message),
            Verdict::Answer {
                answer: Answer::Failed,
                message,
            } => (pb::ExecuteResult::Failed, message),
            Verdict::Answer { answer, .. } => (
                pb::ExecuteResult::Retry,
                format!("bug: execute recorded {answer:?}"),
            ),
            Verdict::Retry(m) | Verdict::Violation(m) => (pb::ExecuteResult::Retry, m),
        };
        Ok(Response::new(pb::ExecuteResponse {
            result: result as i32,
            message,
        }))
    }

    async fn compensate(
        &self,
        req: Request<pb::BranchRequest>,
    ) -> Result<Response<pb::PhaseTwoResponse>, Status> {
        Ok(Response::new(phase_two(
            self.handle(Op::Compensate, req).await?,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn branch(log_id: &str) -> InDoubt {
        InDoubt::new(
            "g".into(),
            0,
            "h".into(),
            Vec::new(),
            log_id.into(),
            String::new(),
            0,
        )
    }

    fn answer(outcome: pb::Outcome, known: bool, log_id: &str) -> pb::OutcomeResponse {
        pb::OutcomeResponse {
            outcome: outcome as i32,
            known,
            log_id: log_id.into(),
            finished: false,
        }
    }

    /// The log-identity rule of presumed abort, one row per case.
    #[test]
    fn decide_acts_only_on_the_log_that_drove_the_branch() {
        use pb::Outcome::{Aborted, Committed, Pending};
        use Decision::{Apply, UnknownWithoutLogId, WrongLog};
        let cases = [
            ("L", Committed, true, "L", Apply(Op::Commit)),
            ("L", Aborted, true, "L", Apply(Op::Abort)),
            ("L", Aborted, false, "L", Apply(Op::Abort)),
            ("L", Pending, true, "L", Decision::Pending),
            ("L", Aborted, false, "M", WrongLog),
            ("L", Committed, true, "M", WrongLog),
            ("L", Committed, true, "", WrongLog),
            ("", Committed, true, "M", Apply(Op::Commit)),
            ("", Aborted, true, "M", Apply(Op::Abort)),
            ("", Aborted, false, "M", UnknownWithoutLogId),
            ("", Aborted, false, "", UnknownWithoutLogId),
        ];
        for (stored, outcome, known, answered, want) in cases {
            assert_eq!(
                decide(&branch(stored), &answer(outcome, known, answered)),
                want,
                "stored {stored:?}, answer {outcome:?} known={known} from {answered:?}"
            );
        }
    }

    /// A store that fails as told: its deliveries panic, or lose durability.
    struct Broken {
        panic: bool,
        failure: std::sync::Mutex<Option<String>>,
    }

    impl BarrierStore for Broken {
        type Tx<'t> = ();

        async fn deliver(
            &self,
            op: Op,
            _: BranchContext,
            _: Bytes,
            _: Option<HandlerCall<Self>>,
        ) -> Verdict {
            if self.panic {
                panic!("the store fell over");
            }
            *self.failure.lock().unwrap() = Some("fsync failed: EIO".into());
            Verdict::Retry(format!("{op} could not be made durable"))
        }

        async fn rows(&self, _: &str) -> Result<Vec<crate::BarrierRow>, crate::StoreError> {
            Ok(Vec::new())
        }

        async fn all_rows(&self) -> Result<Vec<crate::BarrierRow>, crate::StoreError> {
            Ok(Vec::new())
        }

        async fn in_doubt(&self, _: Option<u64>) -> Result<Vec<InDoubt>, crate::StoreError> {
            Ok(Vec::new())
        }

        fn failure(&self) -> Option<String> {
            self.failure.lock().unwrap().clone()
        }
    }

    fn broken(panic: bool) -> Participant<Broken> {
        Participant::builder(Broken {
            panic,
            failure: std::sync::Mutex::new(None),
        })
        .build()
        .unwrap()
    }

    fn request() -> Request<pb::BranchRequest> {
        Request::new(pb::BranchRequest {
            gid: "g".into(),
            handler: "h".into(),
            attempt: 1,
            ..Default::default()
        })
    }

    /// Fail-stop, whatever the store: once the store says it lost durability, the
    /// participant reports it, and `serve` stops with [`ParticipantError::DurabilityLost`].
    #[tokio::test]
    async fn a_store_that_lost_durability_stops_the_participant() {
        let p = broken(false);
        assert!(p.failure().is_none());
        let r = p.prepare(request()).await.unwrap().into_inner();
        assert_eq!(r.result(), pb::PrepareResult::Retry);
        assert_eq!(p.failure().as_deref(), Some("fsync failed: EIO"));
        assert_eq!(p.failed().await, "fsync failed: EIO");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let served = p.clone().serve(listener, std::future::pending()).await;
        assert!(
            matches!(&served, Err(ParticipantError::DurabilityLost(why)) if why.contains("EIO")),
            "{served:?}"
        );
    }

    /// A panic that escapes a store is answered RETRY naming the panic, never as a
    /// configuration error, and the participant goes on.
    #[tokio::test]
    async fn a_panic_escaping_the_store_is_answered_retry_naming_it() {
        let p = broken(true);
        let r = p.execute(request()).await.unwrap().into_inner();
        assert_eq!(r.result(), pb::ExecuteResult::Retry);
        assert!(
            r.message.contains("panicked") && r.message.contains("the store fell over"),
            "{}",
            r.message
        );
        assert!(p.failure().is_none());
    }
}
