//! `treatyd`: the Treaty coordinator daemon. A thin `main` over
//! [`treaty_coordinator::server::run`]: settings from flags, `TREATY_*` environment variables
//! and an optional TOML file (in that order of precedence), then the log, the listener and
//! signal handling.

use std::process::ExitCode;
use std::sync::Arc;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;
use treaty_coordinator::log::postgres::{PgLog, PgLogOptions};
use treaty_coordinator::log::sled::{SledLog, SledLogOptions};
use treaty_coordinator::log::LogStore;
use treaty_coordinator::otel::{self, Exporter};
use treaty_coordinator::settings::{Daemon, LoadError, LogFormat};

// glibc malloc showed up at the top of treatyd's profile (free-list consolidation under
// many small, short-lived allocations); mimalloc handles that pattern far better.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Logs to stderr filtered by `--log-level`; with an exporter, Treaty's spans (and only
/// those, whatever the log level) go to it too.
fn init_tracing(format: LogFormat, level: &str, exporter: Option<&Exporter>) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("invalid --log-level {level:?}: {e}"))?;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Human => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let spans = exporter.map(|e| {
        e.layer().with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(otel::SPAN_TARGET, tracing::Level::INFO),
        )
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(spans)
        .try_init()
        .map_err(|e| format!("cannot set up logging: {e}"))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops treatyd");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn main() -> ExitCode {
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let settings = match Daemon::load(std::env::args_os().skip(1), |k| std::env::var_os(k)) {
        Ok(s) => s,
        // `--help`, `--version`, or a malformed command line: clap prints and picks the status.
        Err(LoadError::Cli(e)) => e.exit(),
        Err(LoadError::Invalid(e)) => {
            eprintln!("treatyd: {e}\nSee `treatyd --help` for every option.");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("treatyd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's gRPC channel runs on the runtime, so it is built inside it.
    let exporter = match &settings.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let _entered = runtime.enter();
            match Exporter::install(endpoint, &settings.otlp_service_name) {
                Ok(e) => Some(e),
                Err(e) => {
                    eprintln!("treatyd: {e}\nSee `treatyd --help` for every option.");
                    return ExitCode::from(2);
                }
            }
        }
    };
    if let Err(e) = init_tracing(settings.log_format, &settings.log_level, exporter.as_ref()) {
        eprintln!("treatyd: {e}");
        return ExitCode::from(2);
    }
    // TLS and token files are settings too: one that cannot be read or used is refused
    // before the log is opened or the port bound (server::run reads them again to serve).
    if let Err(e) = check_security_files(&settings.config.security) {
        eprintln!("treatyd: {e}\nSee `treatyd --help` for every option.");
        return ExitCode::from(2);
    }
    let served = runtime.block_on(serve(settings));
    // Spans still queued leave now, while the runtime that drives the exporter still runs.
    if let Some(exporter) = exporter {
        if let Err(e) = exporter.shutdown() {
            eprintln!("treatyd: {e}");
        }
    }
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("treatyd: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(mut s: Daemon) -> Result<(), String> {
    // Before the log and the port: a bad TREATY_TEST_MUTATIONS is a configuration error.
    #[cfg(feature = "mutations")]
    let (mutations, skip_fence) = test_mutations()?;
    #[cfg(not(feature = "mutations"))]
    no_test_mutations()?;
    // The sled log first: its lock says at once when another treatyd runs on the directory.
    let sled: Option<Arc<dyn LogStore>> = match &s.store {
        Some(_) => None,
        None => {
            let opts = SledLogOptions {
                cache_capacity_bytes: s.cache_bytes,
            };
            Some(Arc::new(
                SledLog::open(&s.data_dir, opts).map_err(|e| e.to_string())?,
            ))
        }
    };
    let listener = tokio::net::TcpListener::bind(s.listen)
        .await
        .map_err(|e| bind_error("--listen", s.listen, e))?;
    // Tests and scripts that pass port 0 read the real address from this line.
    if let Ok(addr) = listener.local_addr() {
        println!("treatyd listening on {addr}");
        if s.config.advertise_url.is_none() && !addr.ip().is_unspecified() {
            let scheme = if s.config.security.serves_tls() {
                "https"
            } else {
                "http"
            };
            s.config.advertise_url = Some(format!("{scheme}://{addr}"));
        }
    }
    // A PostgreSQL log after the port, so that this coordinator's row in the database
    // names the URL it is reached at.
    let log: Arc<dyn LogStore> = match (sled, &s.store) {
        (Some(sled), _) => sled,
        (None, url) => {
            let url = url.as_deref().unwrap_or_default();
            let opts = PgLogOptions {
                lease: s.lease,
                tls_ca: s.store_ca.clone(),
                name: s
                    .config
                    .advertise_url
                    .clone()
                    .unwrap_or_else(|| format!("{} (pid {})", s.listen, std::process::id())),
                #[cfg(feature = "mutations")]
                skip_fence,
                ..PgLogOptions::default()
            };
            Arc::new(PgLog::open(url, opts).await.map_err(|e| e.to_string())?)
        }
    };
    let admin_listener = match s.admin_listen {
        None => None,
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| bind_error("--admin-listen", addr, e))?;
            // Tests and scripts that pass port 0 read the real address from this line.
            if let Ok(addr) = l.local_addr() {
                println!("treatyd admin listening on {addr}");
            }
            Some(l)
        }
    };
    let extras = treaty_coordinator::server::Extras {
        admin_listener,
        #[cfg(feature = "mutations")]
        mutations,
    };
    let served =
        treaty_coordinator::server::run_with(listener, log, s.config, extras, shutdown_signal())
            .await;
    served.map_err(|e| e.to_string())
}

fn check_security_files(security: &treaty_coordinator::security::Security) -> Result<(), String> {
    security.server_tls()?;
    security.auth()?;
    security.outbound()?;
    Ok(())
}

/// A bind error naming the setting, and what to do when the port is taken.
fn bind_error(flag: &str, addr: std::net::SocketAddr, e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        format!(
            "cannot listen on {addr}: address already in use; is another treatyd running? \
             Stop it or choose another {flag} address"
        )
    } else {
        format!("cannot listen on {addr} ({flag}): {e}")
    }
}

/// A build without the `mutations` feature refuses `TREATY_TEST_MUTATIONS` rather than
/// ignore it: a checker test run against it would otherwise test a correct coordinator.
#[cfg(not(feature = "mutations"))]
fn no_test_mutations() -> Result<(), String> {
    match std::env::var_os("TREATY_TEST_MUTATIONS") {
        Some(v) if !v.is_empty() => Err(
            "TREATY_TEST_MUTATIONS is set, but this treatyd was built without the `mutations` \
             feature; build it with `--features mutations` (test use only) or unset it"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// Deliberate engine bugs named in `TREATY_TEST_MUTATIONS` (comma-separated:
/// `commit_before_durable`, `skip_one_compensation`, `forget_branch_on_recovery`,
/// `decide_before_durable`, `compensate_forward`, `ignore_tombstones`), for tests
/// proving the chaos checker catches a broken coordinator. Only in test builds (feature
/// `mutations`): the release build users run has none of this code.
///
/// `skip_fence` (the second value) makes the PostgreSQL log write without its ownership
/// checks, as a coordinator without fencing would.
#[cfg(feature = "mutations")]
fn test_mutations() -> Result<(treaty_coordinator::engine::Mutations, bool), String> {
    let mut m = treaty_coordinator::engine::Mutations::default();
    let mut skip_fence = false;
    let names = std::env::var("TREATY_TEST_MUTATIONS").unwrap_or_default();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name {
            "commit_before_durable" => m.commit_before_durable = true,
            "skip_one_compensation" => m.skip_one_compensation = true,
            "forget_branch_on_recovery" => m.forget_branch_on_recovery = true,
            "decide_before_durable" => m.decide_before_durable = true,
            "compensate_forward" => m.compensate_forward = true,
            "ignore_tombstones" => m.ignore_tombstones = true,
            "skip_fence" => skip_fence = true,
            other => {
                return Err(format!(
                    "TREATY_TEST_MUTATIONS: unknown mutation {other:?}; known: \
                     commit_before_durable, skip_one_compensation, forget_branch_on_recovery, \
                     decide_before_durable, compensate_forward, ignore_tombstones, skip_fence"
                ))
            }
        }
    }
    if m != treaty_coordinator::engine::Mutations::default() || skip_fence {
        tracing::warn!(
            ?m,
            skip_fence,
            "deliberate engine bugs are ON (TREATY_TEST_MUTATIONS): test use only"
        );
    }
    Ok((m, skip_fence))
}
