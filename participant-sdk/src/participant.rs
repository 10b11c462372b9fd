//! The participant side: handlers, the builder, and the `treaty.v1.Participant` gRPC service.
//!
//! A request goes: gRPC method → [`Participant`] looks up the handler by name → the
//! [`Barrier`] runs the barrier logic and the handler inside **one sled transaction** on the
//! user's tree (on a blocking thread) → [`SledSync::sync`] makes the row durable → the typed
//! answer leaves. No answer leaves before its barrier row is on stable storage, so a
//! `PREPARED` promise or a `DONE` survives a crash of the participant.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_client::CoordinatorClient;
use treaty_proto::v1::participant_server::{Participant as ParticipantService, ParticipantServer};

use crate::barrier::rules::{self, InDoubtDecision as Decision, Told};
use crate::barrier::{
    now_unix_ms, Answer, Barrier, Business, InDoubt, Op, Verdict, FIELD_BYTES_MAX, GID_BYTES_MAX,
};
use crate::durable::SledSync;
use crate::error::SdkError;

/// What a handler returns: `Ok(())` to apply its writes, [`refuse`] for a business "no"
/// (the transaction is rolled back), or a sled error (via `?` on [`TransactionalTree`]
/// operations), which is answered as RETRY.
pub type HandlerResult = Result<(), ConflictableTransactionError<Refusal>>;

/// A business "no", with the reason sent back to the coordinator.
///
/// From `prepare` it means REFUSED, from `execute` FAILED. From `commit`, `abort` and
/// `compensate` it is answered as RETRY: those must eventually succeed.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Why, for humans (shown by the coordinator and stored in the barrier row).
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// A business "no": return `Err(refuse("insufficient funds"))` from a handler.
pub fn refuse(reason: impl Into<String>) -> ConflictableTransactionError<Refusal> {
    ConflictableTransactionError::Abort(Refusal {
        reason: reason.into(),
    })
}

/// Decodes a JSON payload (as sent by the client's `*_json` helpers); a payload that does
/// not decode is refused with the decoding error as the reason.
pub fn decode_json<T: serde::de::DeserializeOwned>(
    payload: &[u8],
) -> Result<T, ConflictableTransactionError<Refusal>> {
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

/// A two-phase-commit handler: prepare, then commit or abort.
///
/// Each method runs **synchronously inside a sled transaction** on the participant's tree,
/// together with the barrier row, so its writes and the row commit atomically. The barrier
/// guarantees each method's writes are applied at most once per branch, that `commit`/`abort`
/// run only after a successful `prepare`, and never both.
///
/// sled may run the closure **more than once** (it retries on conflict): write only through
/// `tree`, with no side effects outside it (no network calls, no counters, no files). Keep
/// it short: sled 0.34 serializes transactions process-wide. Keys starting with `0xFF 't'`
/// are reserved for the barrier.
///
/// `prepare` must make `commit` certain to succeed (reserve, do not just check); `commit` and
/// `abort` must eventually succeed: a refusal from them is answered as RETRY.
pub trait TwoPhaseHandler: Send + Sync + 'static {
    /// Phase one: validate and reserve. Return [`refuse`] for a business "no".
    fn prepare(
        &self,
        ctx: &BranchContext,
        tree: &TransactionalTree,
        payload: &[u8],
    ) -> HandlerResult;
    /// Make the prepared change final. `payload` is the branch payload again.
    fn commit(
        &self,
        ctx: &BranchContext,
        tree: &TransactionalTree,
        payload: &[u8],
    ) -> HandlerResult;
    /// Release what `prepare` reserved. Called only if `prepare` answered PREPARED.
    fn abort(&self, ctx: &BranchContext, tree: &TransactionalTree, payload: &[u8])
        -> HandlerResult;
}

/// A saga step handler: execute, and compensate if the saga fails.
///
/// Same rules as [`TwoPhaseHandler`]: runs inside a sled transaction together with the
/// barrier row, may run more than once, must have no side effects outside `tree`.
/// `compensate` runs only if `execute` succeeded (a compensation for a step that never ran is
/// recorded without calling it) and must eventually succeed.
pub trait SagaHandler: Send + Sync + 'static {
    /// Apply the step. Return [`refuse`] for a business failure (FAILED).
    fn execute(
        &self,
        ctx: &BranchContext,
        tree: &TransactionalTree,
        payload: &[u8],
    ) -> HandlerResult;
    /// Undo the step. `payload` is the step's compensation payload.
    fn compensate(
        &self,
        ctx: &BranchContext,
        tree: &TransactionalTree,
        payload: &[u8],
    ) -> HandlerResult;
}

struct TwoPhaseFn<P, C, A> {
    prepare: P,
    commit: C,
    abort: A,
}

impl<P, C, A> TwoPhaseHandler for TwoPhaseFn<P, C, A>
where
    P: Fn(&BranchContext, &TransactionalTree, &[u8]) -> HandlerResult + Send + Sync + 'static,
    C: Fn(&BranchContext, &TransactionalTree, &[u8]) -> HandlerResult + Send + Sync + 'static,
    A: Fn(&BranchContext, &TransactionalTree, &[u8]) -> HandlerResult + Send + Sync + 'static,
{
    fn prepare(
        &self,
        ctx: &BranchContext,
        tree: &TransactionalTree,
        payload: &[u8],
    ) -> HandlerResult {
        (self.prepare)(ctx, tree, payload)
    }
    fn commit(
        &self,
        ctx: &BranchContext,
        tree: &TransactionalTree,
        payload: &[u8],
    ) -> HandlerResult {
        (self.commit)(ctx, tree, payload)
    }
    fn abort(
        &self,
        ctx: &BranchContext,
        tree: &TransactionalTree,
        payload: &[u8],
    ) -> HandlerResult {
        (self.abort)(ctx, tree, payload)
    }
}

/// A [`TwoPhaseHandler`] from three closures (prepare, commit, abort).
pub fn two_phase_fn<P, C, A>(prepare: P, commit: C, abort: A) -> impl TwoPhaseHandler
where
    P: Fn(&BranchContext, &TransactionalTree, &[u8]) -> HandlerResult + Send + Sync + 'static,
    C: Fn(&BranchContext, &TransactionalTree, &[u8]) -> HandlerResult + Send + Sync + 'static,
    A: Fn(&BranchContext, &TransactionalTree, &[u8]) -> HandlerResult + Send + Sync + 'static,
{
    TwoPhaseFn {
        prepare,
        commit,
        abort,
    }
}

struct SagaFn<E, C> {
    execute: E,
    compensate: C,
}

impl<E, C> SagaHandler for SagaFn<E, C>
where
    E: Fn(&BranchContext, &TransactionalTree, &[u8]) -> HandlerResult + Send + Sync + 'static,
    C: Fn(&BranchContext, &TransactionalTree, &[u8]) -> HandlerResult + Send + Sync + 'static,
{
    fn execute(
        &self,
        ctx: &BranchContext,
        tree: &TransactionalTree,
        payload: &[u8],
    ) -> HandlerResult {
        (self.execute)(ctx, tree, payload)
    }
    fn compensate(
        &self,
        ctx: &BranchContext,
        tree: &TransactionalTree,
        payload: &[u8],
    ) -> HandlerResult {
        (self.compensate)(ctx, tree, payload)
    }
}

/// A [`SagaHandler`] from two closures (execute, compensate).
pub fn saga_fn<E, C>(execute: E, compensate: C) -> impl SagaHandler
where
    E: Fn(&BranchContext, &TransactionalTree, &[u8]) -> HandlerResult + Send + Sync + 'static,
    C: Fn(&BranchContext, &TransactionalTree, &[u8]) -> HandlerResult + Send + Sync + 'static,
{
    SagaFn {
        execute,
        compensate,
    }
}

/// Default for [`ParticipantBuilder::in_doubt_after`].
pub const IN_DOUBT_AFTER_DEFAULT: Duration = Duration::from_secs(30);

/// Timeout for connecting to, and for each call to, the coordinator during in-doubt
/// resolution.
const COORDINATOR_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The in-doubt resolver never runs more often than this, whatever `in_doubt_after` is.
const RESOLVE_INTERVAL_MIN: Duration = Duration::from_millis(100);

#[derive(Clone)]
enum Registered {
    TwoPhase(Arc<dyn TwoPhaseHandler>),
    Saga(Arc<dyn SagaHandler>),
}

/// Configures a [`Participant`]; made by [`Participant::builder`].
pub struct ParticipantBuilder {
    db: sled::Db,
    tree: sled::Tree,
    dir: std::path::PathBuf,
    coordinator: Option<String>,
    in_doubt_after: Duration,
    handlers: HashMap<String, Registered>,
    duplicates: Vec<String>,
}

impl ParticipantBuilder {
    /// The coordinator's gRPC URI (e.g. `http://127.0.0.1:7700`), asked during in-doubt
    /// resolution about branches that name no outcome endpoint of their own (coordinators
    /// from before `BranchRequest.outcome_endpoint`, or ones that leave it empty). Without
    /// it, such a branch left prepared waits for its coordinator to resend.
    pub fn coordinator(mut self, uri: impl Into<String>) -> Self {
        self.coordinator = Some(uri.into());
        self
    }

    /// How long a branch stays prepared, without commit or abort, before the participant asks
    /// the coordinator for its outcome. Default 30 s. The resolver runs every half of this.
    pub fn in_doubt_after(mut self, after: Duration) -> Self {
        self.in_doubt_after = after;
        self
    }

    /// Registers a 2PC handler under `name` (the `handler` of the branches addressed to it).
    pub fn two_phase(mut self, name: impl Into<String>, handler: impl TwoPhaseHandler) -> Self {
        self.register(name.into(), Registered::TwoPhase(Arc::new(handler)));
        self
    }

    /// Registers a saga handler under `name`.
    pub fn saga(mut self, name: impl Into<String>, handler: impl SagaHandler) -> Self {
        self.register(name.into(), Registered::Saga(Arc::new(handler)));
        self
    }

    fn register(&mut self, name: String, h: Registered) {
        if self.handlers.insert(name.clone(), h).is_some() {
            self.duplicates.push(name);
        }
    }

    /// Checks the configuration and starts the durability thread ([`SledSync`]).
    ///
    /// Fails with [`SdkError::Config`] on a duplicate or empty handler name or a bad
    /// coordinator URI, and [`SdkError::Storage`] if `dir` is not where `db` was opened.
    pub fn build(self) -> Result<Participant, SdkError> {
        if !self.duplicates.is_empty() {
            return Err(SdkError::Config(format!(
                "handler names registered twice: {:?}; each name must be unique",
                self.duplicates
            )));
        }
        if self.handlers.contains_key("") {
            return Err(SdkError::Config(
                "a handler was registered with an empty name".into(),
            ));
        }
        if let Some(long) = self.handlers.keys().find(|n| n.len() > FIELD_BYTES_MAX) {
            return Err(SdkError::Config(format!(
                "handler name {:?}... is {} bytes; at most {FIELD_BYTES_MAX} are allowed",
                long.chars().take(32).collect::<String>(),
                long.len()
            )));
        }
        if self.in_doubt_after.is_zero() {
            return Err(SdkError::Config(
                "in_doubt_after must be more than zero".into(),
            ));
        }
        let coordinator = match self.coordinator {
            None => None,
            Some(uri) => {
                crate::refuse_tls_uri(&uri)?;
                let endpoint = Endpoint::from_shared(uri.clone())
                    .map_err(|e| {
                        SdkError::Config(format!("coordinator URI {uri:?} is invalid: {e}"))
                    })?
                    .connect_timeout(COORDINATOR_CALL_TIMEOUT)
                    .timeout(COORDINATOR_CALL_TIMEOUT);
                Some((uri, endpoint))
            }
        };
        let barrier = Barrier::new(self.tree);
        // Before serving: branches prepared by an older SDK must be in the in-doubt index.
        barrier.migrate_v1()?;
        // No sync needed for the migration: it answers nobody, and sled persists its log in
        // order, so the first answer synced later makes it durable too; lost in a crash
        // before that, it runs again at the next start.
        let sync = SledSync::new(self.db, &self.dir)?;
        Ok(Participant {
            inner: Arc::new(Inner {
                barrier,
                sync,
                handlers: self.handlers,
                coordinator,
                coordinator_clients: tokio::sync::Mutex::new(HashMap::new()),
                in_doubt_after: self.in_doubt_after,
                first_round_done: AtomicBool::new(false),
                fatal: tokio::sync::watch::channel(None).0,
            }),
        })
    }
}

/// A participant: registered handlers behind the barrier, served as the
/// `treaty.v1.Participant` gRPC service. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Participant {
    inner: Arc<Inner>,
}

struct Inner {
    barrier: Barrier,
    sync: SledSync,
    handlers: HashMap<String, Registered>,
    coordinator: Option<(String, Endpoint)>,
    /// Clients of the coordinators asked so far, by URI.
    coordinator_clients: tokio::sync::Mutex<HashMap<String, CoordinatorClient<Channel>>>,
    in_doubt_after: Duration,
    /// Until one resolver round completed, every prepared branch counts as in doubt, whatever
    /// its age: after a restart nobody else may ever tell us.
    first_round_done: AtomicBool,
    /// Set once a barrier row could not be made durable (the sync is poisoned): from then on
    /// the participant must stop and restart (fail-stop, see [`Participant::failed`]).
    fatal: tokio::sync::watch::Sender<Option<String>>,
}

impl std::fmt::Debug for Participant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.inner.handlers.keys().collect();
        names.sort();
        f.debug_struct("Participant")
            .field("handlers", &names)
            .field(
                "coordinator",
                &self.inner.coordinator.as_ref().map(|c| &c.0),
            )
            .field("in_doubt_after", &self.inner.in_doubt_after)
            .finish()
    }
}

impl Participant {
    /// Starts configuring a participant whose handlers write to `tree`, a tree of `db`;
    /// `dir` is the directory `db` was opened at (needed to fsync it).
    pub fn builder(db: sled::Db, tree: sled::Tree, dir: &Path) -> ParticipantBuilder {
        ParticipantBuilder {
            db,
            tree,
            dir: dir.to_path_buf(),
            coordinator: None,
            in_doubt_after: IN_DOUBT_AFTER_DEFAULT,
            handlers: HashMap::new(),
            duplicates: Vec::new(),
        }
    }

    /// The tonic service, to `add_service` to a server you already run. Does not start the
    /// in-doubt resolver: also call [`Participant::spawn_in_doubt_resolver`].
    pub fn into_service(self) -> ParticipantServer<Participant> {
        ParticipantServer::new(self)
    }

    /// Serves the participant alone on `listener` until `shutdown` resolves, and runs the
    /// in-doubt resolver (at start, then every `in_doubt_after / 2`).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), SdkError> {
        let resolver = self.spawn_in_doubt_resolver();
        let me = self.clone();
        let failed = async move { me.failed().await };
        let res = tonic::transport::Server::builder()
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
        if let Some(why) = self.inner.fatal.borrow().clone() {
            return Err(SdkError::DurabilityLost(why));
        }
        res.map_err(SdkError::Serve)
    }

    /// Why this participant stopped, once it can no longer make barrier rows durable (an
    /// fsync failed: the sync is poisoned, and as after fsyncgate nothing written since can
    /// be vouched for). Every delivery is then answered RETRY; the process must stop and
    /// restart (sled recovers from disk). `None` while all is well.
    pub fn failure(&self) -> Option<String> {
        self.inner.fatal.borrow().clone()
    }

    /// Resolves, with the reason, once [`Participant::failure`] is set.
    /// [`Participant::serve`] then returns [`SdkError::DurabilityLost`] by itself; when you
    /// serve [`Participant::into_service`] in your own server, stop it when this resolves.
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

    /// The barrier over this participant's tree (to inspect its rows).
    pub fn barrier(&self) -> &Barrier {
        &self.inner.barrier
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
    /// index cannot be read ([`SdkError::Storage`]).
    pub async fn resolve_in_doubt(&self) -> Result<Resolution, SdkError> {
        let first = !self.inner.first_round_done.load(Ordering::Acquire);
        let cutoff = (!first)
            .then(|| now_unix_ms().saturating_sub(self.inner.in_doubt_after.as_millis() as u64));
        let barrier = self.inner.barrier.clone();
        let branches = tokio::task::spawn_blocking(move || barrier.in_doubt(cutoff))
            .await
            .map_err(|e| SdkError::Config(format!("in-doubt scan panicked: {e}")))??;
        let mut r = Resolution::default();
        // One question per (endpoint, gid): the branches of one gid share its outcome.
        let mut answers: HashMap<(String, String), Option<pb::OutcomeResponse>> = HashMap::new();
        for b in branches {
            let uri = if b.outcome_endpoint.is_empty() {
                match &self.inner.coordinator {
                    Some((uri, _)) => uri.clone(),
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
    /// be asked or does not answer.
    async fn ask_outcome(&self, uri: &str, gid: &str) -> Option<pb::OutcomeResponse> {
        let mut client = {
            let mut cached = self.inner.coordinator_clients.lock().await;
            match cached.get(uri) {
                Some(c) => c.clone(),
                None => {
                    let endpoint = match &self.inner.coordinator {
                        Some((configured, e)) if configured == uri => Ok(e.clone()),
                        _ => Endpoint::from_shared(uri.to_string()).map(|e| {
                            e.connect_timeout(COORDINATOR_CALL_TIMEOUT)
                                .timeout(COORDINATOR_CALL_TIMEOUT)
                        }),
                    };
                    let channel = match endpoint {
                        Ok(e) => e.connect().await,
                        Err(e) => {
                            tracing::error!(gid = %gid, endpoint = %uri, error = %e, "outcome endpoint of an in-doubt branch is not a valid URI; it waits for its coordinator to resend");
                            return None;
                        }
                    };
                    match channel {
                        Ok(ch) => cached
                            .entry(uri.to_string())
                            .or_insert(CoordinatorClient::new(ch))
                            .clone(),
                        Err(source) => {
                            let e = SdkError::Connect {
                                uri: uri.to_string(),
                                source,
                            };
                            tracing::warn!(gid = %gid, error = %e, "cannot reach the coordinator to resolve an in-doubt branch; will retry next round");
                            return None;
                        }
                    }
                }
            }
        };
        let req = pb::OutcomeRequest {
            gid: gid.to_string(),
        };
        match client.outcome(req).await {
            Ok(r) => Some(r.into_inner()),
            Err(status) => {
                tracing::warn!(gid = %gid, endpoint = %uri, error = %status, "asking the coordinator for the outcome failed; will retry next round");
                None
            }
        }
    }

    /// Runs one operation through the barrier on a blocking thread, then makes the answer
    /// durable. Every path that answers a participant operation goes through here.
    async fn apply(&self, op: Op, ctx: BranchContext, payload: Bytes) -> Verdict {
        let inner = self.inner.clone();
        let (gid, branch_id) = (ctx.gid.clone(), ctx.branch_id);
        let verdict = match tokio::task::spawn_blocking(move || inner.run(op, &ctx, &payload)).await
        {
            Ok(v) => v,
            Err(e) => {
                // A panicking handler must not take the service down; the transaction was
                // rolled back, so the operation can be retried.
                tracing::error!(gid = %gid, branch_id, "{op} handler panicked: {e}");
                return Verdict::Retry(format!("{op} handler panicked: {e}"));
            }
        };
        if let Verdict::Answer { answer, .. } = &verdict {
            // Also for a repeated answer: its first delivery may still be waiting for its
            // sync, and this one must not overtake it.
            if let Err(e) = self.inner.sync.sync().await {
                tracing::error!(gid = %gid, branch_id, error = %e, "making the barrier row durable failed");
                // Any sync error is fatal (the sync is poisoned): nothing this process
                // answers can be vouched for any more.
                self.inner.fatal.send_if_modified(|f| {
                    if f.is_some() {
                        return false;
                    }
                    tracing::error!(error = %e, "participant storage lost durability: stop this process and restart it (fail-stop); sled recovers from disk");
                    *f = Some(format!("a barrier row could not be made durable: {e}"));
                    true
                });
                return Verdict::Retry(format!(
                    "{op} recorded {answer:?} but it could not be made durable: {e}; retry"
                ));
            }
        }
        verdict
    }

    async fn handle(&self, op: Op, req: Request<pb::BranchRequest>) -> Result<Verdict, Status> {
        let req = req.into_inner();
        check_request(&req)?;
        let ctx = BranchContext {
            gid: req.gid,
            branch_id: req.branch_id,
            attempt: req.attempt,
            deadline_unix_ms: req.deadline_unix_ms,
            handler: req.handler,
            log_id: req.log_id,
            outcome_endpoint: req.outcome_endpoint,
        };
        Ok(self.apply(op, ctx, req.payload).await)
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

impl Inner {
    /// The barrier step for one operation, synchronous (runs on a blocking thread).
    fn run(&self, op: Op, ctx: &BranchContext, payload: &[u8]) -> Verdict {
        let b = &self.barrier;
        let h = self.handlers.get(&ctx.handler);
        // An unknown name, or a handler of the other kind, is `None`: the rules decide
        // whether that matters (a forward op is refused; a phase-two op only needs the
        // handler if business code has to run).
        match (op, h) {
            (Op::Prepare, Some(Registered::TwoPhase(h))) => b.deliver(
                op,
                ctx,
                payload,
                Some(&|tx: &TransactionalTree| h.prepare(ctx, tx, payload)),
            ),
            (Op::Commit, Some(Registered::TwoPhase(h))) => b.deliver(
                op,
                ctx,
                payload,
                Some(&|tx: &TransactionalTree| h.commit(ctx, tx, payload)),
            ),
            (Op::Abort, Some(Registered::TwoPhase(h))) => b.deliver(
                op,
                ctx,
                payload,
                Some(&|tx: &TransactionalTree| h.abort(ctx, tx, payload)),
            ),
            (Op::Execute, Some(Registered::Saga(h))) => b.deliver(
                op,
                ctx,
                payload,
                Some(&|tx: &TransactionalTree| h.execute(ctx, tx, payload)),
            ),
            (Op::Compensate, Some(Registered::Saga(h))) => b.deliver(
                op,
                ctx,
                payload,
                Some(&|tx: &TransactionalTree| h.compensate(ctx, tx, payload)),
            ),
            _ => b.deliver(op, ctx, payload, None::<Business<'_>>),
        }
    }
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
impl ParticipantService for Participant {
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
        InDoubt {
            gid: "g".into(),
            branch_id: 0,
            handler: "h".into(),
            payload: Vec::new(),
            log_id: log_id.into(),
            outcome_endpoint: String::new(),
        }
    }

    fn answer(outcome: pb::Outcome, known: bool, log_id: &str) -> pb::OutcomeResponse {
        pb::OutcomeResponse {
            outcome: outcome as i32,
            known,
            log_id: log_id.into(),
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
}
