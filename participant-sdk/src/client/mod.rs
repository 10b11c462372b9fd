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

use std::pin::Pin;
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

/// A connection to a Treaty coordinator. Cheap to clone (one shared HTTP/2 channel).
#[derive(Debug, Clone)]
pub struct Client {
    inner: CoordinatorClient<InterceptedService<Channel, SharedInterceptor>>,
    call_timeout: Duration,
}

/// The caller's interceptor (or none), shared by every clone of the client.
#[derive(Clone)]
struct SharedInterceptor(Option<Arc<InterceptorFn>>);

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
        let token = options.bearer().map_err(ClientError::InvalidInput)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect { uri, source })?;
        Ok(match token {
            None => Client::from_channel(channel),
            Some(token) => Client::from_channel_with_interceptor(channel, move |mut req| {
                req.metadata_mut().insert(AUTHORIZATION, token.clone());
                Ok(req)
            }),
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
            inner: CoordinatorClient::with_interceptor(channel, interceptor),
            call_timeout: CALL_TIMEOUT_DEFAULT,
        }
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
        let req = self.request(pb::GetRequest { gid: gid.into() });
        let tx = self.inner.clone().get(req).await.map_err(read_error)?;
        TransactionStatus::try_from(tx.into_inner())
    }

    /// Transaction `gid`'s state now and on every change, ending after the terminal state
    /// (committed or aborted, with its outcome). An unknown gid fails here (`NOT_FOUND`). If
    /// the stream breaks, its last item is an error ([`ClientError::Unavailable`]): call
    /// `watch` again.
    pub async fn watch(&self, gid: impl Into<String>) -> Result<Watch, ClientError> {
        // No call timeout: a watch lasts as long as the transaction.
        let req = tonic::Request::new(pb::WatchRequest { gid: gid.into() });
        let stream = self
            .inner
            .clone()
            .watch(req)
            .await
            .map_err(read_error)?
            .into_inner();
        Ok(Watch {
            inner: stream
                .map(|item| {
                    item.map_err(read_error)
                        .and_then(TransactionStatus::try_from)
                })
                .boxed(),
        })
    }

    /// The outcome of `gid` as the coordinator's log knows it. An unknown gid (never seen, or
    /// forgotten past its tombstone horizon) is `Aborted` with `known: false` (presumed
    /// abort); a collected record with a tombstone is still `known`.
    pub async fn outcome(&self, gid: impl Into<String>) -> Result<OutcomeAnswer, ClientError> {
        let req = self.request(pb::OutcomeRequest { gid: gid.into() });
        let resp = self.inner.clone().outcome(req).await.map_err(read_error)?;
        Ok(resp.into_inner().into())
    }

    /// Makes every waiting branch call of `gid` go out now (operator action).
    pub async fn retry(&self, gid: impl Into<String>) -> Result<RetryOutcome, ClientError> {
        let req = self.request(pb::RetryRequest { gid: gid.into() });
        let resp = self.inner.clone().retry(req).await.map_err(read_error)?;
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
        let req = self.request(resolution.to_proto(gid.into()));
        let resp = self.inner.clone().resolve(req).await.map_err(read_error)?;
        TransactionStatus::try_from(resp.into_inner())
    }

    /// One page of the transactions matching `filter`, newest first; pass
    /// [`ListPage::next_page_token`] to [`ListFilter::page_token`] for the next one.
    pub async fn list(&self, filter: &ListFilter) -> Result<ListPage, ClientError> {
        let req = self.request(pb::ListRequest::from(filter));
        let resp = self.inner.clone().list(req).await.map_err(read_error)?;
        ListPage::try_from(resp.into_inner())
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
