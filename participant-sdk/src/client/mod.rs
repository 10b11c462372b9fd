//! The client side: submit sagas and 2PC transactions to a coordinator, and look them up.
//!
//! - [`Client`] (this file): the connection and the calls. Built with [`Client::connect`],
//!   [`Client::connect_with`] (TLS and a token, [`crate::tls::ClientOptions`]), or
//!   [`Client::from_channel`] on a `Channel` you configured (interceptors, load balancing).
//! - [`builder`]: [`Step`] and [`Branch`] (named parts of a definition), [`SagaBuilder`] and
//!   [`TwoPhaseBuilder`], which submit it.
//! - [`status`]: what the coordinator reports, as domain types ([`TransactionStatus`],
//!   [`Outcome`], [`ListPage`], ...), and the one place they are mapped from protobuf.
//! - [`error`]: [`ClientError`], split by what the caller must do.
//!
//! Several coordinators of one log ([`Client::connect_any`]): a call that gets no answer from
//! one (UNAVAILABLE, or no answer within the call timeout) goes to the next, which must
//! answer for the same log (checked by its log identity before it is used), so `Begin` may be
//! resubmitted there with the same gid and `watch` resumes there.
//!
//! **Traces**: every call carries the caller's current `tracing` span as W3C trace context
//! (`traceparent` metadata) when the process has a `tracing-opentelemetry` layer, so the
//! coordinator's spans for a transaction join the trace of the span around `submit`.
//!
//! The SDK chooses the gid (a UUIDv7) before sending when the caller gives none, so a call
//! that fails after sending can still name the transaction in
//! [`ClientError::OutcomeUnknown`]; resubmitting with that gid is safe (`Begin` is idempotent
//! for the same gid and definition).

pub mod builder;
pub mod error;
pub mod status;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::service::{interceptor::InterceptedService, Interceptor};
use tonic::transport::Channel;
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_client::CoordinatorClient;

pub use builder::{Branch, RetryPolicy, SagaBuilder, Step, TwoPhaseBuilder};
pub use error::ClientError;
pub use status::{
    BranchState, BranchStatus, ListFilter, ListPage, ManualResolution, Mode, OperatorResolution,
    Outcome, OutcomeAnswer, RetryOutcome, Submitted, TransactionStatus, TxState,
};

use crate::tls::{ClientOptions, AUTHORIZATION};
use error::read_error;

/// Default bound on one coordinator call (plus the wait, for `submit_and_wait`).
pub const CALL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// Bound on establishing the connection in [`Client::connect`].
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to a Treaty coordinator, or to several coordinators of one log
/// ([`Client::connect_any`]). Cheap to clone (shared HTTP/2 channels).
#[derive(Debug, Clone)]
pub struct Client {
    coordinators: Arc<Coordinators>,
    call_timeout: Duration,
}

type Inner = CoordinatorClient<InterceptedService<Channel, SharedInterceptor>>;

/// The coordinators a client calls: the one in use, and the others it fails over to.
#[derive(Debug)]
struct Coordinators {
    targets: Vec<Target>,
    /// Index of the target calls go to first.
    current: AtomicUsize,
    /// The log identity every target must answer for (learned from the first one that
    /// answered); `None` with a single target, which is never checked.
    log_id: Option<String>,
}

#[derive(Debug)]
struct Target {
    uri: String,
    client: Inner,
    /// Whether this target has answered with `log_id` (checked once, before its first use).
    same_log: AtomicBool,
}

/// The gid the client asks `Outcome` about to learn which log a coordinator answers for: any
/// valid gid would do, the answer carries the log identity either way.
const LOG_PROBE_GID: &str = "treaty-client-log-probe";

/// Whether a failed call should go to the next coordinator: no answer came (the coordinator
/// is down, unreachable, paused, or shutting down; a call past its timeout is cancelled by
/// the channel). Any answer the coordinator gave (a refusal, NOT_FOUND, ...) is its word and
/// is returned as it is.
fn fails_over(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => true,
        // The connection broke under the call (the coordinator died mid-call): tonic says
        // UNKNOWN with the transport error as its source. A coordinator's own UNKNOWN
        // answer has no source, and does not fail over.
        tonic::Code::Unknown => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// The caller's interceptor (or none), shared by every clone of the client.
#[derive(Clone)]
pub(crate) struct SharedInterceptor(Option<Arc<InterceptorFn>>);

type InterceptorFn =
    dyn Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync;

impl Interceptor for SharedInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        // Runs in the caller's task as the call starts: the caller's current span is the
        // parent of everything the coordinator does for this call (nothing is added without
        // an OpenTelemetry layer or outside a span).
        treaty_proto::trace_context::inject(
            &tracing_opentelemetry::OpenTelemetrySpanExt::context(&tracing::Span::current()),
            request.metadata_mut(),
        );
        match &self.0 {
            Some(f) => f(request),
            None => Ok(request),
        }
    }
}

impl std::fmt::Debug for SharedInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "SharedInterceptor(Some(..))"
        } else {
            "SharedInterceptor(None)"
        })
    }
}

impl Client {
    /// Connects to the coordinator at `uri` (e.g. `http://127.0.0.1:7700`; an `https://`
    /// URI is checked against the system's roots), without a token: see
    /// [`Client::connect_with`].
    pub async fn connect(uri: impl Into<String>) -> Result<Client, ClientError> {
        Client::connect_with(uri, &ClientOptions::new()).await
    }

    /// Connects to the coordinator at `uri` with `options`: TLS for an `https://` URI (the
    /// CA, a client certificate for mTLS) and a bearer token sent on every call.
    ///
    /// Fails with [`ClientError::InvalidInput`] on a malformed URI, an unreadable or invalid
    /// certificate or key file (named), or a token that is not printable ASCII, and
    /// [`ClientError::Connect`] when nothing answers there (or the TLS handshake fails).
    /// Later calls reconnect on their own.
    pub async fn connect_with(
        uri: impl Into<String>,
        options: &ClientOptions,
    ) -> Result<Client, ClientError> {
        let uri = uri.into();
        let endpoint = options
            .endpoint(&uri, CONNECT_TIMEOUT)
            .map_err(ClientError::InvalidInput)?;
        let interceptor = interceptor_for(options)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect { uri, source })?;
        Ok(Client::build(channel, interceptor))
    }

    /// Connects to several coordinators that share one log (coordinators on one PostgreSQL
    /// database), with `options` for all of them. A URI whose host name resolves to several
    /// addresses counts as one coordinator per address (TLS still checks the host name).
    ///
    /// Calls go to one coordinator; when it gives no answer (UNAVAILABLE, or nothing within
    /// the call timeout) the call goes to the next, and stays there. Before a coordinator is
    /// first used it must answer for the same log as the first one that answered (its log
    /// identity, from `Outcome`): coordinators of different logs are never mixed, because a
    /// `Begin` resubmitted to another log would run the transaction twice. So the token needs
    /// the `read` role.
    ///
    /// Fails like [`Client::connect_with`] on bad input, and with [`ClientError::Connect`]
    /// (the last one tried) when no coordinator answers now.
    pub async fn connect_any<I, S>(uris: I, options: &ClientOptions) -> Result<Client, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let interceptor = interceptor_for(options)?;
        let mut targets = Vec::new();
        for uri in uris {
            for (uri, endpoint) in resolve(&uri.into(), options).await? {
                let channel = endpoint.connect_lazy();
                targets.push(Target {
                    uri,
                    client: CoordinatorClient::with_interceptor(channel, interceptor.clone()),
                    same_log: AtomicBool::new(false),
                });
            }
        }
        if targets.is_empty() {
            return Err(ClientError::InvalidInput(
                "connect_any needs at least one coordinator URI".into(),
            ));
        }
        // The first coordinator that answers names the log; the others are checked against
        // it before they are used.
        let mut last = None;
        for (i, t) in targets.iter().enumerate() {
            let probe = probe_log_id(&t.client, CONNECT_TIMEOUT).await;
            match probe {
                Ok(log_id) => {
                    t.same_log.store(true, Ordering::Relaxed);
                    return Ok(Client {
                        coordinators: Arc::new(Coordinators {
                            current: AtomicUsize::new(i),
                            log_id: Some(log_id),
                            targets,
                        }),
                        call_timeout: CALL_TIMEOUT_DEFAULT,
                    });
                }
                Err(status) if fails_over(&status) => last = Some((t.uri.clone(), status)),
                Err(status) => return Err(read_error(status)),
            }
        }
        let (uri, status) = last.expect("at least one target was tried");
        Err(ClientError::Unavailable {
            source: tonic::Status::unavailable(format!(
                "no coordinator answered; the last one tried, {uri}: {}",
                status.message()
            )),
        })
    }

    /// A client over `channel`, which you configured: TLS (`Endpoint::tls_config`; tonic's
    /// `tls-ring` feature is on in this SDK), load balancing (`Channel::balance_list`), timeouts,
    /// keep-alive. Nothing is dialed here: a lazy channel (`Endpoint::connect_lazy`)
    /// connects on the first call, and its errors come back from that call.
    pub fn from_channel(channel: Channel) -> Client {
        Client::build(channel, SharedInterceptor(None))
    }

    /// [`Client::from_channel`], with `interceptor` run on every call before it is sent (to
    /// add credentials or tracing metadata); an `Err` it returns fails the call with that
    /// status.
    pub fn from_channel_with_interceptor<F>(channel: Channel, interceptor: F) -> Client
    where
        F: Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>
            + Send
            + Sync
            + 'static,
    {
        Client::build(channel, SharedInterceptor(Some(Arc::new(interceptor))))
    }

    fn build(channel: Channel, interceptor: SharedInterceptor) -> Client {
        Client {
            coordinators: Arc::new(Coordinators {
                targets: vec![Target {
                    uri: String::new(),
                    client: CoordinatorClient::with_interceptor(channel, interceptor),
                    same_log: AtomicBool::new(true),
                }],
                current: AtomicUsize::new(0),
                log_id: None,
            }),
            call_timeout: CALL_TIMEOUT_DEFAULT,
        }
    }

    /// Runs `call` on the coordinator in use, bounded by `timeout`; when no answer comes, on
    /// the next coordinator of the same log, and so on once round. Returns the first answer
    /// (success or the coordinator's refusal), or the last failure.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        timeout: Duration,
        mut call: F,
    ) -> Result<T, tonic::Status>
    where
        F: FnMut(Inner) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let c = &self.coordinators;
        let n = c.targets.len();
        let first = c.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            let target = &c.targets[i];
            if let Err(status) = c.check_same_log(target).await {
                last = Some(status);
                continue;
            }
            let answer = match tokio::time::timeout(timeout, call(target.client.clone())).await {
                Ok(answer) => answer,
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {timeout:?}"
                ))),
            };
            match answer {
                Err(status) if n > 1 && fails_over(&status) => {
                    tracing::warn!(coordinator = %target.uri, error = %status.message(), "no answer; trying the next coordinator");
                    last = Some(status);
                }
                answer => {
                    c.current.store(i, Ordering::Relaxed);
                    return answer;
                }
            }
        }
        Err(last.unwrap_or_else(|| tonic::Status::unavailable("no coordinator answered")))
    }

    /// Sets the bound on each call (default [`CALL_TIMEOUT_DEFAULT`]); `submit_and_wait` adds
    /// its wait to it.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Starts a saga definition.
    pub fn saga(&self) -> SagaBuilder {
        SagaBuilder::new(self.clone())
    }

    /// Starts a two-phase-commit definition.
    pub fn two_phase(&self) -> TwoPhaseBuilder {
        TwoPhaseBuilder::new(self.clone())
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.call_timeout);
        r
    }

    /// The current state of transaction `gid`. Unknown gid: [`ClientError::Rejected`] with
    /// `NOT_FOUND` ([`ClientError::is_not_found`]).
    pub async fn get(&self, gid: impl Into<String>) -> Result<TransactionStatus, ClientError> {
        let msg = pb::GetRequest { gid: gid.into() };
        let tx = self
            .call(self.call_timeout, |mut c| {
                let r = self.request(msg.clone());
                async move { c.get(r).await }
            })
            .await
            .map_err(read_error)?;
        TransactionStatus::try_from(tx.into_inner())
    }

    /// Transaction `gid`'s state now and on every change, ending after the terminal state
    /// (committed or aborted, with its outcome). An unknown gid fails here (`NOT_FOUND`).
    /// With several coordinators ([`Client::connect_any`]) a stream that breaks is resumed on
    /// the next one (states already seen may be seen again). Otherwise, or when no
    /// coordinator answers, its last item is an error ([`ClientError::Unavailable`]): call
    /// `watch` again.
    pub async fn watch(&self, gid: impl Into<String>) -> Result<Watch, ClientError> {
        let gid = gid.into();
        let stream = self.open_watch(&gid).await.map_err(read_error)?;
        let state = WatchState {
            client: self.clone(),
            gid,
            stream: Some(stream),
            ended: false,
        };
        Ok(Watch {
            inner: futures::stream::unfold(state, WatchState::next).boxed(),
        })
    }

    async fn open_watch(
        &self,
        gid: &str,
    ) -> Result<tonic::Streaming<pb::Transaction>, tonic::Status> {
        let msg = pb::WatchRequest {
            gid: gid.to_string(),
        };
        // Only opening the stream is bounded: a watch lasts as long as the transaction.
        let resp = self
            .call(self.call_timeout, |mut c| {
                let r = tonic::Request::new(msg.clone());
                async move { c.watch(r).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// The outcome of `gid` as the coordinator's log knows it. An unknown gid (never seen, or
    /// forgotten past its tombstone horizon) is `Aborted` with `known: false` (presumed
    /// abort); a collected record with a tombstone is still `known`.
    pub async fn outcome(&self, gid: impl Into<String>) -> Result<OutcomeAnswer, ClientError> {
        let msg = pb::OutcomeRequest { gid: gid.into() };
        let resp = self
            .call(self.call_timeout, |mut c| {
                let r = self.request(msg.clone());
                async move { c.outcome(r).await }
            })
            .await
            .map_err(read_error)?;
        Ok(resp.into_inner().into())
    }

    /// Makes every waiting branch call of `gid` go out now (operator action).
    pub async fn retry(&self, gid: impl Into<String>) -> Result<RetryOutcome, ClientError> {
        let msg = pb::RetryRequest { gid: gid.into() };
        let resp = self
            .call(self.call_timeout, |mut c| {
                let r = self.request(msg.clone());
                async move { c.retry(r).await }
            })
            .await
            .map_err(read_error)?;
        Ok(resp.into_inner().into())
    }

    /// Records, as an audited operator action, that one branch of `gid` had its phase-two
    /// operation (commit, abort or compensate) carried out by hand, for a participant that
    /// is gone for good; returns the transaction after the change. A transaction that is not
    /// in phase two, or a branch that is not waiting, is [`ClientError::Rejected`]
    /// (`FAILED_PRECONDITION`).
    pub async fn resolve(
        &self,
        gid: impl Into<String>,
        resolution: &ManualResolution,
    ) -> Result<TransactionStatus, ClientError> {
        let msg = resolution.to_proto(gid.into());
        let resp = self
            .call(self.call_timeout, |mut c| {
                let r = self.request(msg.clone());
                async move { c.resolve(r).await }
            })
            .await
            .map_err(read_error)?;
        TransactionStatus::try_from(resp.into_inner())
    }

    /// One page of the transactions matching `filter`, newest first; pass
    /// [`ListPage::next_page_token`] to [`ListFilter::page_token`] for the next one.
    pub async fn list(&self, filter: &ListFilter) -> Result<ListPage, ClientError> {
        let msg = pb::ListRequest::from(filter);
        let resp = self
            .call(self.call_timeout, |mut c| {
                let r = self.request(msg.clone());
                async move { c.list(r).await }
            })
            .await
            .map_err(read_error)?;
        ListPage::try_from(resp.into_inner())
    }
}

/// What a [`Watch`] is reading: the open stream, reopened on the next coordinator when it
/// breaks.
struct WatchState {
    client: Client,
    gid: String,
    stream: Option<tonic::Streaming<pb::Transaction>>,
    ended: bool,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<TransactionStatus, ClientError>, WatchState)> {
        if self.ended {
            return None;
        }
        loop {
            let status = match self.stream.as_mut() {
                Some(stream) => match stream.message().await {
                    Ok(Some(tx)) => {
                        let item = TransactionStatus::try_from(tx);
                        return Some((item, self));
                    }
                    // The coordinator ends the stream after the terminal state.
                    Ok(None) => return None,
                    Err(status) => status,
                },
                None => tonic::Status::unavailable("the watch stream is not open"),
            };
            self.stream = None;
            if self.client.coordinators.targets.len() > 1 && fails_over(&status) {
                match self.client.open_watch(&self.gid).await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        continue;
                    }
                    Err(e) => {
                        self.ended = true;
                        return Some((Err(read_error(e)), self));
                    }
                }
            }
            self.ended = true;
            return Some((Err(read_error(status)), self));
        }
    }
}

/// The interceptor `options` ask for: the bearer token on every call, or none.
fn interceptor_for(options: &ClientOptions) -> Result<SharedInterceptor, ClientError> {
    let token = options.bearer().map_err(ClientError::InvalidInput)?;
    Ok(SharedInterceptor(token.map(|token| {
        Arc::new(move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert(AUTHORIZATION, token.clone());
            Ok(req)
        }) as Arc<InterceptorFn>
    })))
}

/// The endpoints behind `uri`: one per address its host name resolves to (an IP address, or a
/// name with one address, gives just `uri`).
async fn resolve(
    uri: &str,
    options: &ClientOptions,
) -> Result<Vec<(String, tonic::transport::Endpoint)>, ClientError> {
    let parsed: tonic::codegen::http::Uri = uri.parse().map_err(|e| {
        ClientError::InvalidInput(format!("coordinator URI {uri:?} is invalid: {e}"))
    })?;
    let single = || {
        options
            .endpoint(uri, CONNECT_TIMEOUT)
            .map(|e| vec![(uri.to_string(), e)])
            .map_err(ClientError::InvalidInput)
    };
    let Some(host) = parsed.host() else {
        return single();
    };
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return single();
    }
    let https = parsed.scheme_str() == Some("https");
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addrs: Vec<std::net::SocketAddr> = match tokio::net::lookup_host((host, port)).await {
        Ok(a) => a.collect(),
        // Unresolvable now: keep the name, the channel resolves it when it dials.
        Err(_) => return single(),
    };
    if addrs.len() <= 1 {
        return single();
    }
    addrs
        .into_iter()
        .map(|addr| {
            let by_addr = format!("{}://{addr}", parsed.scheme_str().unwrap_or("http"));
            options
                .endpoint_for_host(&by_addr, host, CONNECT_TIMEOUT)
                .map(|e| (format!("{uri} ({addr})"), e))
                .map_err(ClientError::InvalidInput)
        })
        .collect()
}

/// The log identity `client`'s coordinator answers for.
async fn probe_log_id(client: &Inner, timeout: Duration) -> Result<String, tonic::Status> {
    let mut req = tonic::Request::new(pb::OutcomeRequest {
        gid: LOG_PROBE_GID.to_string(),
    });
    req.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.clone().outcome(req)).await {
        Ok(answer) => Ok(answer?.into_inner().log_id),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {timeout:?}"
        ))),
    }
}

impl Coordinators {
    /// Ok when `target` answers for this client's log (asked once, before its first use).
    /// A coordinator of another log is never used: UNAVAILABLE, naming both logs.
    async fn check_same_log(&self, target: &Target) -> Result<(), tonic::Status> {
        let Some(want) = &self.log_id else {
            return Ok(());
        };
        if target.same_log.load(Ordering::Relaxed) {
            return Ok(());
        }
        let got = probe_log_id(&target.client, CONNECT_TIMEOUT).await?;
        if &got == want {
            target.same_log.store(true, Ordering::Relaxed);
            Ok(())
        } else {
            tracing::error!(coordinator = %target.uri, log = %got, expected = %want, "coordinator answers for another log; not used");
            Err(tonic::Status::unavailable(format!(
                "{} answers for log {got}, not {want}: the coordinators given to \
                 connect_any must share one log",
                target.uri
            )))
        }
    }
}

/// The stream [`Client::watch`] returns: a transaction's state on every change, ending after
/// its terminal state.
pub struct Watch {
    inner: Pin<Box<dyn Stream<Item = Result<TransactionStatus, ClientError>> + Send>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

impl Stream for Watch {
    type Item = Result<TransactionStatus, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
