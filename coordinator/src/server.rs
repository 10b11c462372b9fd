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
    let auth = config.security.auth().map_err(ServeError::Config)?;
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
    let authenticated = auth.is_some();
    // The admin listener serves TLS with the same files (mTLS too) when the API does.
    let admin_tls = match extras.admin_listener {
        Some(_) => config.security.admin_tls().map_err(ServeError::Config)?,
        None => None,
    };
    let grace = config.shutdown_grace;
    let gc_interval = config.gc_interval;
    let max_message_bytes = config.limits.max_tx_bytes.saturating_add(64 << 10);
    // What a killed process left in the page cache may not be on disk: make it durable
    // before recovery acts on it (a record read back must be one a crash would keep).
    log.sync().await.map_err(ServeError::Recover)?;
    #[cfg(feature = "mutations")]
    let rt = Runtime::with_mutations(log, config, extras.mutations);
    #[cfg(not(feature = "mutations"))]
    let rt = Runtime::new(log, config);
    let service = match auth {
        Some(auth) => CoordinatorService::new(rt.clone()).with_auth(auth),
        None => CoordinatorService::new(rt.clone()),
    };
    // Up before recovery, so liveness answers while a long recovery runs (not ready yet).
    // The dashboard calls the same service, so its token file and checks apply there too.
    let admin_state = AdminState::new(rt.clone()).with_api(service.clone());
    let _admin = match extras.admin_listener {
        Some(l) => Some(AdminServer::start(l, admin_state.clone(), admin_tls)?),
        None => None,
    };
    let resumed = rt.recover().await.map_err(ServeError::Recover)?;
    let addr = listener.local_addr().ok();
    tracing::info!(
        ?addr,
        resumed,
        tls = config_tls,
        authenticated,
        "treaty coordinator serving"
    );

    let (health_reporter, health) = tonic_health::server::health_reporter();
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

    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = builder
        // Every error answer counted by its status (treaty_requests_rejected_total).
        .layer(crate::metrics::rejections_layer(Arc::clone(rt.metrics())))
        .add_service(health)
        .add_service(reflection)
        .add_service(
            // tonic's default 4 MiB decode limit would refuse a valid transaction of
            // max_tx_bytes before validation could say why.
            CoordinatorServer::new(service).max_decoding_message_size(max_message_bytes),
        )
        // Nagle off on accepted connections: small HTTP/2 frames must not wait for ACKs.
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    let mut server = tokio::spawn(server);
    admin_state.ready.store(true, Ordering::Release);

    tokio::select! {
        res = &mut server => {
            gc.abort();
            return match res {
                Ok(r) => r.map_err(ServeError::from),
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
            server.abort();
            return Err(ServeError::Failed(why));
        }
        _ = shutdown => {}
    }
    admin_state.ready.store(false, Ordering::Release);
    tracing::info!(
        live = rt.live(),
        ?grace,
        "shutting down: no new transactions"
    );
    health_reporter
        .set_not_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    let _ = stop_tx.send(());
    let deadline = tokio::time::Instant::now() + grace;
    let finished = rt.shutdown(grace);
    let (log_result, _) = tokio::join!(finished, async {
        if tokio::time::timeout_at(deadline, &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    });
    gc.abort();
    log_result.map_err(ServeError::Shutdown)?;
    tracing::info!(
        unfinished = rt.live(),
        "stopped; unfinished transactions resume at next start"
    );
    Ok(())
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
