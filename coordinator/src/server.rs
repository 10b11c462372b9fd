//! The injectable entry point: serve the coordinator on a listener over a log store until a
//! shutdown future resolves. `treatyd` is a thin `main` over [`run`]; tests and embedders call
//! it the same way, on a listener bound to port 0.

use crate::admin::{self, AdminState};
use crate::api::CoordinatorService;
use crate::config::Config;
#[cfg(feature = "mutations")]
use crate::engine::Mutations;
use crate::log::{LogError, LogStore};
use crate::runtime::Runtime;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use treaty_proto::v1::coordinator_server::CoordinatorServer;

/// Why the coordinator stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot recover transactions from the log: {0}")]
    Recover(#[source] LogError),
    #[error("stopped after a failure (fail-stop); restart to recover from the log on disk: {0}")]
    Failed(String),
    #[error("cannot make the log durable at shutdown: {0}")]
    Shutdown(#[source] LogError),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
}

/// What [`run_with`] takes beyond [`run`]'s arguments; `Default` is none of it.
#[derive(Default)]
pub struct Extras {
    /// Serve the admin HTTP routes ([`crate::admin`]: metrics, health) on this listener,
    /// for as long as the coordinator runs.
    pub admin_listener: Option<TcpListener>,
    /// Deliberate engine bugs (see [`run_with_mutations`]).
    #[cfg(feature = "mutations")]
    pub mutations: Mutations,
}

/// Serve until `shutdown` resolves, then shut down gracefully: stop taking new transactions,
/// give in-flight work `config.shutdown_grace`, make the log durable.
///
/// Every non-terminal transaction in `log` is resumed before the first request is served.
pub async fn run(
    listener: TcpListener,
    log: Arc<dyn LogStore>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve(listener, log, config, Extras::default(), shutdown).await
}

/// [`run`] with [`Extras`]: the admin listener (and, in test builds, mutations).
pub async fn run_with(
    listener: TcpListener,
    log: Arc<dyn LogStore>,
    config: Config,
    extras: Extras,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve(listener, log, config, extras, shutdown).await
}

/// [`run`] with deliberate engine bugs switched on: only for tests proving that a checker
/// (the chaos runner) catches a broken coordinator. Compiled only with the `mutations`
/// feature; `treatyd` built with it reads them from `TREATY_TEST_MUTATIONS`.
#[cfg(feature = "mutations")]
pub async fn run_with_mutations(
    listener: TcpListener,
    log: Arc<dyn LogStore>,
    config: Config,
    mutations: Mutations,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let extras = Extras {
        mutations,
        ..Extras::default()
    };
    serve(listener, log, config, extras, shutdown).await
}

async fn serve(
    listener: TcpListener,
    log: Arc<dyn LogStore>,
    config: Config,
    extras: Extras,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate().map_err(ServeError::Config)?;
    // Every TLS and token file is read now: a bad one stops the start with its name, before
    // the log is touched or a request is taken.
    let server_tls = config.security.server_tls().map_err(ServeError::Config)?;
    config.security.auth().map_err(ServeError::Config)?;
    config.security.outbound().map_err(ServeError::Config)?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = server_tls {
        builder = builder.tls_config(tls).map_err(|e| {
            ServeError::Config(format!(
                "tls-cert/tls-key/tls-client-ca: cannot build the TLS server config: {e}"
            ))
        })?;
    }
    let config_tls = config.security.serves_tls();
    // The admin listener serves TLS with the same files (mTLS too) when the API does.
    let admin_tls = match extras.admin_listener {
        Some(_) => config.security.admin_tls().map_err(ServeError::Config)?,
        None => None,
    };
    let grace = config.shutdown_grace;
    let gc_interval = config.gc_interval;
    let max_message_bytes = config.limits.max_tx_bytes.saturating_add(64 << 10);
    // Each incarnation serves on a clone of the same sockets, so the port stays bound (and
    // connections wait in its backlog) while a failed runtime is replaced (see `Ended`).
    let listener = listener
        .into_std()
        .map_err(|e| ServeError::Config(format!("cannot take over the gRPC listener: {e}")))?;
    let admin_listener = match extras.admin_listener {
        Some(l) => Some(l.into_std().map_err(|e| {
            ServeError::Config(format!("cannot take over the admin listener: {e}"))
        })?),
        None => None,
    };
    let (stop_all, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_all.send(true);
    });
    // One health service for the process, not one per incarnation: a health watch open on
    // a connection served by a failed incarnation (a load balancer keeps one open for ever)
    // must see the replacement report SERVING, not the failed one's NOT_SERVING for good.
    let health_reporter = tonic_health::server::HealthReporter::new();
    let health = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health_reporter.clone()),
    );
    let incarnation = Incarnation {
        health_reporter,
        health,
        log,
        config,
        #[cfg(feature = "mutations")]
        mutations: extras.mutations,
        builder,
        config_tls,
        admin_tls,
        grace,
        gc_interval,
        max_message_bytes,
    };
    let mut grpc = Grpc {
        listener,
        current: tokio::sync::watch::channel(None).0,
        task: None,
        stop: None,
    };
    let mut replaced = false;
    loop {
        let clone = |l: &std::net::TcpListener, what: &str| {
            l.try_clone()
                .and_then(TcpListener::from_std)
                .map_err(|e| ServeError::Config(format!("cannot reuse the {what} listener: {e}")))
        };
        let admin = match &admin_listener {
            Some(l) => Some(clone(l, "admin")?),
            None => None,
        };
        match serve_once(
            &incarnation,
            &mut grpc,
            admin,
            &mut stopping.clone(),
            replaced,
        )
        .await
        {
            Ok(Ended::Done(r)) => return r,
            Ok(Ended::Replace) => {
                tracing::info!("the log answers again: recovering from it with a new runtime");
            }
            // The log failed again while a replacement recovered from it: wait once more
            // (the port keeps its backlog meanwhile) rather than exit.
            Err(ServeError::Recover(e)) if replaced && incarnation.log.recovers_in_process() => {
                tracing::warn!(error = %e, "recovery from the log failed; waiting for the log again");
                let mut stop = stopping.clone();
                tokio::select! {
                    () = wait_for_log(incarnation.log.as_ref()) => {}
                    _ = stop.wait_for(|stop| *stop) => return Err(ServeError::Recover(e)),
                }
            }
            Err(e) => return Err(e),
        }
        replaced = true;
    }
}

/// How one incarnation of the coordinator ended.
enum Ended {
    /// For good: shut down, or failed over a log that only a restart can recover from.
    Done(Result<(), ServeError>),
    /// Its runtime failed over a log whose data lives elsewhere and is safe
    /// ([`LogStore::recovers_in_process`], PostgreSQL), and the log answers again: serve
    /// again with a new runtime recovered from the log.
    ///
    /// Why a new runtime rather than carrying on with the old one: a write whose commit
    /// failed (the connection was lost mid-commit) has an unknown outcome, and the runtime's
    /// memory may hold a decision the database never got, or miss one it did. The only state
    /// that can be vouched for is the database's, so the failed runtime is dropped whole
    /// (fail-stop, as for sled) and a new one recovers from the database exactly as a
    /// restarted process would, only without the restart: the log store has made sure that
    /// no write of the old connection can still land (it waits for its old backend to end
    /// before it answers again), so recovery reads final records. Meanwhile the old server
    /// keeps answering: every Coordinator call UNAVAILABLE, health NOT_SERVING, /readyz 503.
    Replace,
}

/// What every incarnation of [`serve`] is built from.
struct Incarnation {
    /// The process's health service and its reporter (see [`serve`]).
    health_reporter: tonic_health::server::HealthReporter,
    health: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    log: Arc<dyn LogStore>,
    config: Config,
    #[cfg(feature = "mutations")]
    mutations: Mutations,
    builder: tonic::transport::Server,
    config_tls: bool,
    /// TLS for the admin listener (the API's certificate), when the API serves TLS.
    admin_tls: Option<Arc<rustls::ServerConfig>>,
    grace: std::time::Duration,
    gc_interval: std::time::Duration,
    max_message_bytes: usize,
}

/// One incarnation: a runtime over the log, recovered from it, serving until shutdown or
/// until it fails (see [`Ended`]).
async fn serve_once(
    inc: &Incarnation,
    grpc: &mut Grpc,
    admin_listener: Option<TcpListener>,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
    replacing: bool,
) -> Result<Ended, ServeError> {
    let log = Arc::clone(&inc.log);
    let config = inc.config.clone();
    let builder = inc.builder.clone();
    // Read at start already (a bad file stopped it there); read again for this incarnation.
    let auth = config.security.auth().map_err(ServeError::Config)?;
    let (config_tls, grace, gc_interval, max_message_bytes) = (
        inc.config_tls,
        inc.grace,
        inc.gc_interval,
        inc.max_message_bytes,
    );
    let shutdown = async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    tokio::pin!(shutdown);
    // A new runtime over a shared log is a new owner: what the failed one owned is given
    // up, and claimed back by the recovery below (or by another coordinator).
    if replacing {
        log.rejoin().await.map_err(ServeError::Recover)?;
    }
    // What a killed process left in the page cache may not be on disk: make it durable
    // before recovery acts on it (a record read back must be one a crash would keep).
    log.sync().await.map_err(ServeError::Recover)?;
    #[cfg(feature = "mutations")]
    let rt = Runtime::with_mutations(Arc::clone(&log), config, inc.mutations);
    #[cfg(not(feature = "mutations"))]
    let rt = Runtime::new(Arc::clone(&log), config);
    let authenticated = auth.is_some();
    let service = match auth {
        Some(auth) => CoordinatorService::new(rt.clone()).with_auth(auth),
        None => CoordinatorService::new(rt.clone()),
    };
    // Up before recovery, so liveness answers while a long recovery runs (not ready yet).
    // The dashboard calls the same service, so its token file and checks apply there too.
    let admin_state = AdminState::new(rt.clone()).with_api(service.clone());
    let _admin = match admin_listener {
        Some(l) => Some(AdminServer::start(
            l,
            admin_state.clone(),
            inc.admin_tls.clone(),
        )?),
        None => None,
    };
    let resumed = rt.recover().await.map_err(ServeError::Recover)?;
    let addr = grpc.listener.local_addr().ok();
    tracing::info!(
        ?addr,
        resumed,
        tls = config_tls,
        authenticated,
        "treaty coordinator serving"
    );

    let health_reporter = inc.health_reporter.clone();
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(treaty_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let gc = {
        let rt = rt.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(gc_interval);
            loop {
                tick.tick().await;
                // The log runs retention off the async workers itself (see LogStore).
                match rt.collect_garbage().await {
                    Ok((0, 0)) => {}
                    Ok((records, tombstones)) => tracing::info!(
                        records,
                        tombstones,
                        "retention: finished transactions replaced by tombstones, old tombstones deleted"
                    ),
                    Err(e) => tracing::warn!(error = %e, "retention collection failed"),
                }
            }
        })
    };

    // A log in another process can go away while nothing is written: probe it, so that
    // health and readiness follow it (a failed probe is a failed sync: fail-stop, then
    // `Ended::Replace` once it answers again).
    let probe = log.recovers_in_process().then(|| {
        let (rt, log) = (rt.clone(), Arc::clone(&log));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOG_PROBE_INTERVAL);
            loop {
                tick.tick().await;
                if let Err(e) = log.sync().await {
                    rt.fail_stop(format!("the log does not answer: {e}"));
                    return;
                }
            }
        })
    });
    let _probe = AbortOnDrop(probe);
    // Several coordinators share the log: keep taking over the transactions of those whose
    // lease ran out (recovery above took what was orphaned at start).
    let takeover = log.is_shared().then(|| {
        let rt = rt.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TAKEOVER_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                match rt.take_over().await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        transactions = n,
                        "took over transactions of a coordinator that is gone"
                    ),
                    Err(LogError::Fenced(why)) => {
                        rt.fail_stop(format!("fenced: {why}"));
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "claiming orphaned transactions failed"),
                }
            }
        })
    });
    let takeover = AbortOnDrop(takeover);
    // `Retry` on another coordinator of a shared log, for a transaction this one drives.
    log.on_nudge(nudge_handler(&rt));
    // From now on every Coordinator call goes to this incarnation, on every connection,
    // including those a failed predecessor served (see `Current`).
    grpc.current.send_replace(Some(Serving {
        // tonic's default 4 MiB decode limit would refuse a valid transaction of
        // max_tx_bytes before validation could say why.
        api: CoordinatorServer::new(service).max_decoding_message_size(max_message_bytes),
        metrics: Arc::clone(rt.metrics()),
    }));
    grpc.start(builder, inc.health.clone(), reflection)?;
    let server = grpc.task.as_mut().expect("started above");
    admin_state.ready.store(true, Ordering::Release);

    tokio::select! {
        res = &mut *server => {
            gc.abort();
            return match res {
                Ok(r) => r.map(|()| Ended::Done(Ok(()))).map_err(ServeError::from),
                Err(e) => Err(ServeError::Config(format!("server task failed: {e}"))),
            };
        }
        why = rt.failed() => {
            // Fail-stop: nothing more is answered; the caller exits and the next start
            // recovers from the disk. No graceful drain: the log can vouch for nothing.
            health_reporter
                .set_not_serving::<CoordinatorServer<CoordinatorService>>()
                .await;
            gc.abort();
            if !log.recovers_in_process() {
                server.abort();
                return Err(ServeError::Failed(why));
            }
            // Meanwhile the gRPC server stays up, routing to this (failed) incarnation:
            // UNAVAILABLE, until the replacement has recovered and takes over.
            // The data is safe in the database: keep answering (UNAVAILABLE, NOT_SERVING)
            // until it answers again, then serve anew (see `Ended::Replace`).
            admin_state.ready.store(false, Ordering::Release);
            tracing::warn!(reason = %why, "the log failed: answering UNAVAILABLE until it answers again, then recovering from it without a restart");
            let back = tokio::select! {
                () = wait_for_log(log.as_ref()) => true,
                () = &mut shutdown => false,
            };
            if !back {
                server.abort();
            }
            return Ok(if back { Ended::Replace } else { Ended::Done(Err(ServeError::Failed(why))) });
        }
        _ = &mut shutdown => {}
    }
    // Stopping: take nothing more over (what this coordinator has is left at the end).
    drop(takeover);
    admin_state.ready.store(false, Ordering::Release);
    tracing::info!(
        live = rt.live(),
        ?grace,
        "shutting down: no new transactions"
    );
    health_reporter
        .set_not_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    if let Some(stop) = grpc.stop.take() {
        let _ = stop.send(());
    }
    let deadline = tokio::time::Instant::now() + grace;
    let finished = rt.shutdown(grace);
    let (log_result, _) = tokio::join!(finished, async {
        if tokio::time::timeout_at(deadline, &mut *server)
            .await
            .is_err()
        {
            server.abort();
        }
    });
    gc.abort();
    log_result.map_err(ServeError::Shutdown)?;
    // Unfinished transactions are for the other coordinators of a shared log now.
    if let Err(e) = log.leave().await {
        tracing::warn!(error = %e, "could not give up ownership; others take over after the lease");
    }
    tracing::info!(
        unfinished = rt.live(),
        "stopped; unfinished transactions resume at next start"
    );
    Ok(Ended::Done(Ok(())))
}

/// What a shared log calls when another coordinator passes a `Retry` on: retry here. (The
/// next incarnation sets its own, which lets this runtime go.)
fn nudge_handler(rt: &Runtime) -> crate::log::NudgeHandler {
    let rt = rt.clone();
    Arc::new(move |gid: String| {
        let rt = rt.clone();
        tokio::spawn(async move {
            match rt.retry(&gid).await {
                Ok(calls) => {
                    tracing::info!(gid = %gid, ?calls, "retry passed on by another coordinator")
                }
                Err(e) => {
                    tracing::debug!(gid = %gid, error = %e, "a retry passed on could not run")
                }
            }
        });
    })
}

/// How often a coordinator of a shared log claims what gone coordinators owned: a dead
/// coordinator's transactions resume within its lease plus this.
const TAKEOVER_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// What serves the Coordinator service now: the incarnation's API, with its metrics.
#[derive(Clone)]
struct Serving {
    api: CoordinatorServer<CoordinatorService>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// The gRPC server: one for the whole process, started by the first incarnation once it has
/// recovered (connections wait in the listener's backlog until then), stopped by the last
/// one (a graceful shutdown), aborted when dropped. Every Coordinator call is routed to the
/// incarnation in `current` ([`Current`]).
///
/// Why not a server per incarnation: tonic serves each HTTP/2 connection in a task of its
/// own, which outlives the server that accepted it, and clients keep their connections
/// (channels, pools, a health watch a load balancer holds open). A connection accepted
/// before an outage went on being served by the failed incarnation, and once told to go
/// away it was closed under the calls sent on it meanwhile.
struct Grpc {
    listener: std::net::TcpListener,
    current: tokio::sync::watch::Sender<Option<Serving>>,
    task: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Grpc {
    /// Start serving, unless already started.
    fn start(
        &mut self,
        builder: tonic::transport::Server,
        health: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
        reflection: tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
    ) -> Result<(), ServeError> {
        if self.task.is_some() {
            return Ok(());
        }
        let listener = self
            .listener
            .try_clone()
            .and_then(TcpListener::from_std)
            .map_err(|e| ServeError::Config(format!("cannot reuse the gRPC listener: {e}")))?;
        // Nagle off on accepted connections: small HTTP/2 frames must not wait for ACKs.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let current = self.current.subscribe();
        let counted = current.clone();
        let server = builder
            // Every error answer counted by its status (treaty_requests_rejected_total), in
            // the metrics of the incarnation serving now.
            .layer(tower::util::MapResponseLayer::new(
                move |resp: http::Response<tonic::body::Body>| {
                    let code = resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map(tonic::Code::from_i32);
                    if let (Some(code), Some(serving)) = (code, counted.borrow().as_ref()) {
                        if code != tonic::Code::Ok {
                            serving.metrics.rejected(code);
                        }
                    }
                    resp
                },
            ))
            .add_service(health)
            .add_service(reflection)
            .add_service(Current(current))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            });
        self.task = Some(tokio::spawn(server));
        self.stop = Some(stop);
        Ok(())
    }
}

impl Drop for Grpc {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The Coordinator service as the gRPC server sees it: each call goes to the incarnation
/// serving at that moment ([`Grpc`]).
#[derive(Clone)]
struct Current(tokio::sync::watch::Receiver<Option<Serving>>);

impl tonic::server::NamedService for Current {
    const NAME: &'static str =
        <CoordinatorServer<CoordinatorService> as tonic::server::NamedService>::NAME;
}

impl<B> tower::Service<http::Request<B>> for Current
where
    CoordinatorServer<CoordinatorService>: tower::Service<
        http::Request<B>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = tonic::codegen::BoxFuture<
            http::Response<tonic::body::Body>,
            std::convert::Infallible,
        >,
    >,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future =
        tonic::codegen::BoxFuture<http::Response<tonic::body::Body>, std::convert::Infallible>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // A generated server is always ready; which one serves is chosen per call.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let serving = self.0.borrow().as_ref().map(|s| s.api.clone());
        match serving {
            Some(mut api) => tower::Service::call(&mut api, req),
            // Not reached: the server starts after the first incarnation is published.
            None => Box::pin(async {
                Ok(tonic::Status::unavailable("the coordinator is starting").into_http())
            }),
        }
    }
}

/// How often a log that [`LogStore::recovers_in_process`] is probed with a `sync`.
const LOG_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Aborts its task (if any) when dropped, on every way out of an incarnation.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

/// Returns once `log` makes every write durable again (a `sync` succeeds), trying with a
/// backoff that doubles from 100 ms to 2 s.
async fn wait_for_log(log: &dyn LogStore) {
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match log.sync().await {
            // Fenced: the database answers, and refuses this owner; the next runtime joins
            // again as a new one.
            Ok(()) | Err(LogError::Fenced(_)) => return,
            Err(e) => tracing::debug!(error = %e, ?backoff, "the log is still unavailable"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
    }
}

/// The admin HTTP server's task, stopped when dropped (on every way out of [`serve`], after
/// the graceful shutdown of the gRPC server), so its port is free once `run` returns.
struct AdminServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    fn start(
        listener: TcpListener,
        state: AdminState,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<AdminServer, ServeError> {
        let addr = listener.local_addr().ok();
        tracing::info!(
            ?addr,
            tls = tls.is_some(),
            "admin listener serving /metrics, /healthz, /readyz and the dashboard"
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = admin::router(state);
        let task = match tls {
            None => tokio::spawn(async move {
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::warn!(error = %e, "admin listener failed");
                }
            }),
            Some(tls) => {
                let std_listener = listener.into_std().map_err(|e| {
                    ServeError::Config(format!("admin listener: cannot take the socket: {e}"))
                })?;
                let server = axum_server::from_tcp_rustls(
                    std_listener,
                    axum_server::tls_rustls::RustlsConfig::from_config(tls),
                )
                .map_err(|e| ServeError::Config(format!("admin listener: {e}")))?;
                let handle = axum_server::Handle::new();
                let stopper = handle.clone();
                tokio::spawn(async move {
                    let _ = stopped.await;
                    stopper.shutdown();
                });
                tokio::spawn(async move {
                    let served = server
                        .handle(handle)
                        .serve(router.into_make_service())
                        .await;
                    if let Err(e) = served {
                        tracing::warn!(error = %e, "admin listener (TLS) failed");
                    }
                })
            }
        };
        Ok(AdminServer {
            stop: Some(stop),
            task,
        })
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Waiting for requests in flight would need an await here; a scrape is short, and
        // the port must be free when `run` returns.
        self.task.abort();
    }
}
