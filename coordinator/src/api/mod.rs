//! The gRPC edge: `treaty.v1.Coordinator` over the [`Runtime`]. Requests are checked by
//! [`validate`] (and here, for the small ones), converted with [`crate::mapping`], and the
//! answers converted back the same way. Health and reflection are added in `crate::server`.
//!
//! With a token file ([`crate::security::Auth`]) every method first checks its caller's role:
//! `Begin` needs submit; `Get`, `List`, `Watch` and `Outcome` need read (so a participant's
//! in-doubt inquiries need a read token or certificate); `Retry` and `Resolve` need operate.
//! Without one every caller may do everything (trusted networks only).

pub mod callers;
pub mod validate;

use crate::engine::Outcome;
use crate::log::{ListFilter, LogError};
use crate::mapping::{self, outcome_to_proto, transaction_to_proto as to_proto};
use crate::runtime::{now_ms, BeginError, ResolveError, Runtime, WatchTarget};
use crate::security::{Auth, Role};
use callers::{BeginLimiter, CallerId};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_server::Coordinator;

/// The Coordinator gRPC service.
#[derive(Clone)]
pub struct CoordinatorService {
    rt: Runtime,
    /// Per-caller `Begin` rate ([`callers`]).
    begins: Arc<BeginLimiter>,
    auth: Option<Arc<Auth>>,
}

impl CoordinatorService {
    /// The service without authentication: every caller may do everything.
    pub fn new(rt: Runtime) -> Self {
        let begins = Arc::new(BeginLimiter::new(rt.config().max_begins_per_caller_per_sec));
        CoordinatorService {
            rt,
            begins,
            auth: None,
        }
    }

    /// Every call must authenticate against `auth` and hold the role its method needs.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = Some(Arc::new(auth));
        self
    }

    /// Whether `req` may do what needs `role` (always, without a token file); also used by
    /// the dashboard's API ([`crate::admin::dashboard`]) for what is not a gRPC method.
    pub fn authorize<T>(&self, req: &Request<T>, role: Role, method: &str) -> Result<(), Status> {
        match &self.auth {
            None => Ok(()),
            Some(auth) => auth.check(req, role, method).inspect_err(|s| {
                tracing::warn!(method, code = ?s.code(), reason = s.message(), "call refused");
            }),
        }
    }
}

fn log_status(e: LogError) -> Status {
    match e {
        LogError::Closed | LogError::Stopped(_) | LogError::Fenced(_) => {
            Status::unavailable(e.to_string())
        }
        other => Status::internal(other.to_string()),
    }
}

fn begin_status(e: BeginError) -> Status {
    match e {
        BeginError::AlreadyExists(_) => Status::already_exists(e.to_string()),
        BeginError::ShuttingDown => Status::unavailable(e.to_string()),
        BeginError::Overloaded(_) => Status::resource_exhausted(e.to_string()),
        BeginError::Log(l) => log_status(l),
    }
}

/// Bounds on the free-text fields of `Resolve`, which are stored in the log.
const OPERATOR_BYTES_MAX: usize = 256;
/// How long a watch of a transaction driven elsewhere waits for one change before it reads
/// again from scratch (the loop goes on until the terminal state or the client leaves).
const FOLLOW_BOUND: std::time::Duration = std::time::Duration::from_secs(60);
const REASON_BYTES_MAX: usize = 1024;

fn check_gid(gid: &str, rt: &Runtime) -> Result<(), Status> {
    validate::gid("gid", gid, &rt.config().limits).map_err(|e| Status::invalid_argument(e.0))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Transaction, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn begin(
        &self,
        req: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        self.authorize(&req, Role::Submit, "Begin")?;
        // Then, before any work: a runaway caller costs the others nothing.
        self.begins
            .admit(&CallerId::of(&req), tokio::time::Instant::now())?;
        // The client's span, continued by the transaction's spans (only when making traces).
        let trace_parent = self
            .rt
            .config()
            .traces
            .then(|| treaty_proto::trace_context::traceparent(req.metadata()))
            .flatten();
        let mut begin = validate::begin(req.into_inner(), self.rt.config())
            .map_err(|e| Status::invalid_argument(e.0))?;
        begin.trace_parent = trace_parent;
        let begun = self.rt.begin(begin).await.map_err(begin_status)?;
        Ok(Response::new(pb::BeginResponse {
            gid: begun.gid,
            outcome: outcome_to_proto(begun.outcome).into(),
            existing: begun.existing,
            reason: begun.reason.unwrap_or_default(),
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Transaction>, Status> {
        self.authorize(&req, Role::Read, "Get")?;
        let gid = req.into_inner().gid;
        check_gid(&gid, &self.rt)?;
        match self.rt.get(&gid).await.map_err(log_status)? {
            Some(s) => Ok(Response::new(to_proto(&s))),
            None => Err(Status::not_found(format!(
                "no transaction with gid {gid:?}"
            ))),
        }
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.authorize(&req, Role::Read, "List")?;
        let req = req.into_inner();
        let mut phases = Vec::with_capacity(req.states.len());
        for (i, s) in req.states.iter().enumerate() {
            let p = mapping::phase_from_proto(*s)
                .map_err(|_| Status::invalid_argument(format!("states[{i}]: unknown state {s}")))?;
            phases.push(p);
        }
        let mode = mapping::mode_filter_from_proto(req.mode)
            .map_err(|_| Status::invalid_argument(format!("mode: unknown mode {}", req.mode)))?;
        if !req.page_token.is_empty() {
            validate::gid("page_token", &req.page_token, &self.rt.config().limits)
                .map_err(|e| Status::invalid_argument(e.0))?;
        }
        let limit = match req.page_size {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let filter = ListFilter {
            phases,
            mode,
            stuck_only: req.stuck_only,
            created_before_unix_ms: (req.min_age_ms > 0)
                .then(|| now_ms().saturating_sub(req.min_age_ms)),
        };
        let cursor = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
        let (page, next) = self
            .rt
            .list(&filter, cursor, limit)
            .await
            .map_err(log_status)?;
        Ok(Response::new(pb::ListResponse {
            transactions: page.iter().map(to_proto).collect(),
            // The cursor is where the scan stopped, not the last match: a short page (the
            // scan budget ran out) still continues, and only the end of the log ends paging.
            next_page_token: next.unwrap_or_default(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.authorize(&req, Role::Read, "Watch")?;
        let gid = req.into_inner().gid;
        check_gid(&gid, &self.rt)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        match self.rt.watch(&gid).await.map_err(begin_status)? {
            WatchTarget::Unknown => {
                return Err(Status::not_found(format!(
                    "no transaction with gid {gid:?}"
                )))
            }
            WatchTarget::Stored(s) => {
                // Not driven here: finished, or driven by another coordinator of a shared
                // log. Follow the log until the terminal state.
                let rt = self.rt.clone();
                tokio::spawn(async move {
                    let mut current = s;
                    loop {
                        let terminal = current.record.phase.is_terminal()
                            && current.outcome != Outcome::Pending;
                        if tx.send(Ok(to_proto(&current))).await.is_err() || terminal {
                            return;
                        }
                        let next = tokio::select! {
                            n = rt.next_change(&gid, current.record.seq, FOLLOW_BOUND) => n,
                            _ = tx.closed() => return,
                        };
                        match next {
                            Ok(Some(n)) => current = n,
                            Ok(None) => {
                                let _ = tx
                                    .send(Err(Status::not_found(format!(
                                        "transaction {gid:?} was collected while watched"
                                    ))))
                                    .await;
                                return;
                            }
                            Err(e) => {
                                let _ = tx.send(Err(log_status(e))).await;
                                return;
                            }
                        }
                    }
                });
            }
            WatchTarget::Live(mut snap) => {
                tokio::spawn(async move {
                    loop {
                        let current = snap.borrow_and_update().clone();
                        // Ends at the terminal phase once its outcome can be told.
                        let terminal = current.record.phase.is_terminal()
                            && current.outcome != Outcome::Pending;
                        if tx.send(Ok(to_proto(&current))).await.is_err() || terminal {
                            return;
                        }
                        let changed = tokio::select! {
                            c = snap.changed() => c,
                            // The client went away: stop watching a transaction that may
                            // never change again, rather than hold its receiver forever.
                            _ = tx.closed() => return,
                        };
                        if changed.is_err() {
                            // The driver finished; its last snapshot is the terminal one,
                            // unless the runtime stopped under it (fail-stop): then the
                            // stream ends UNAVAILABLE, so that the client watches again
                            // (a clean end would read as "finished" with a live state).
                            let last = snap.borrow().clone();
                            if last.record.seq != current.record.seq {
                                let _ = tx.send(Ok(to_proto(&last))).await;
                            }
                            if !(last.record.phase.is_terminal()
                                && last.outcome != Outcome::Pending)
                            {
                                let _ = tx
                                    .send(Err(Status::unavailable(format!(
                                        "the coordinator stopped driving transaction {gid:?} \
                                         before it ended (a failed log?); watch it again"
                                    ))))
                                    .await;
                            }
                            return;
                        }
                    }
                });
            }
        }
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn outcome(
        &self,
        req: Request<pb::OutcomeRequest>,
    ) -> Result<Response<pb::OutcomeResponse>, Status> {
        self.authorize(&req, Role::Read, "Outcome")?;
        let gid = req.into_inner().gid;
        check_gid(&gid, &self.rt)?;
        let o = self.rt.outcome(&gid).await.map_err(log_status)?;
        Ok(Response::new(pb::OutcomeResponse {
            outcome: outcome_to_proto(o.outcome).into(),
            known: o.known,
            log_id: self.rt.log().log_id().to_string(),
            finished: o.finished,
        }))
    }

    async fn retry(
        &self,
        req: Request<pb::RetryRequest>,
    ) -> Result<Response<pb::RetryResponse>, Status> {
        self.authorize(&req, Role::Operate, "Retry")?;
        let gid = req.into_inner().gid;
        check_gid(&gid, &self.rt)?;
        match self.rt.retry(&gid).await.map_err(log_status)? {
            Some(n) => Ok(Response::new(pb::RetryResponse {
                retried: n,
                forwarded: false,
            })),
            // Not live here: finished, or (a shared log) driven by another coordinator, which
            // is told to retry.
            None => match self.rt.get(&gid).await.map_err(log_status)? {
                Some(s) => {
                    let forwarded = !s.record.phase.is_terminal()
                        && self.rt.log().nudge(&gid).await.map_err(log_status)?;
                    Ok(Response::new(pb::RetryResponse {
                        retried: 0,
                        forwarded,
                    }))
                }
                None => Err(Status::not_found(format!(
                    "no transaction with gid {gid:?}"
                ))),
            },
        }
    }

    async fn resolve(
        &self,
        req: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::Transaction>, Status> {
        self.authorize(&req, Role::Operate, "Resolve")?;
        let req = req.into_inner();
        check_gid(&req.gid, &self.rt)?;
        for (field, value, max) in [
            ("operator", &req.operator, OPERATOR_BYTES_MAX),
            ("reason", &req.reason, REASON_BYTES_MAX),
        ] {
            if value.trim().is_empty() {
                return Err(Status::invalid_argument(format!(
                    "{field}: required: a resolution by hand is an audited action"
                )));
            }
            if value.len() > max {
                return Err(Status::invalid_argument(format!(
                    "{field}: at most {max} bytes allowed, got {}",
                    value.len()
                )));
            }
        }
        match self
            .rt
            .resolve(&req.gid, req.branch_id, &req.operator, &req.reason)
            .await
        {
            Ok(s) => Ok(Response::new(to_proto(&s))),
            Err(e @ ResolveError::NotLive(_)) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ ResolveError::Refused(_)) => Err(Status::failed_precondition(e.to_string())),
            Err(ResolveError::Log(l)) => Err(log_status(l)),
        }
    }
}
