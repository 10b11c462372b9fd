//! `treatyd`: the Treaty coordinator daemon. A thin `main` over
//! [`treaty_coordinator::server::run`]: settings from flags, `TREATY_*` environment variables
//! and an optional TOML file (in that order of precedence), then the log, the listener and
//! signal handling.

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use treaty_coordinator::config::{Config, Limits};
use treaty_coordinator::log::sled::{SledLog, SledLogOptions};

// glibc malloc showed up at the top of treatyd's profile (free-list consolidation under
// many small, short-lived allocations); mimalloc handles that pattern far better.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
const DEFAULT_DATA_DIR: &str = "./treaty-data";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Human,
    Json,
}

/// Treaty coordinator daemon: drives distributed transactions (two-phase commit and saga) to
/// their end through crashes, restarts, timeouts and lost messages.
///
/// Every option can also be set with the environment variable shown, or in the TOML file given
/// by --config (keys are the option names with '_' for '-', e.g. `call_timeout_ms = 2000`).
/// Precedence: flag, then environment, then file, then default.
#[derive(Parser, Debug, Default)]
#[command(name = "treatyd", version)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "TREATY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to serve gRPC on (Coordinator, health, reflection) [default: 127.0.0.1:7700].
    #[arg(long, env = "TREATY_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Directory of the durable transaction log; locked while treatyd runs [default: ./treaty-data].
    #[arg(long, env = "TREATY_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log output format [default: human].
    #[arg(long, env = "TREATY_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, in tracing's EnvFilter syntax [default: info].
    #[arg(long, env = "TREATY_LOG_LEVEL", value_name = "FILTER")]
    log_level: Option<String>,
    /// Phase-one / forward-run deadline when a transaction sets none [default: 30000].
    #[arg(long, env = "TREATY_DEFAULT_DEADLINE_MS", value_name = "MS")]
    default_deadline_ms: Option<u64>,
    /// Largest deadline a client may ask for [default: 86400000].
    #[arg(long, env = "TREATY_MAX_DEADLINE_MS", value_name = "MS")]
    max_deadline_ms: Option<u64>,
    /// Timeout of one participant call [default: 5000].
    #[arg(long, env = "TREATY_CALL_TIMEOUT_MS", value_name = "MS")]
    call_timeout_ms: Option<u64>,
    /// First retry backoff bound; doubles per attempt, with full jitter [default: 100].
    #[arg(long, env = "TREATY_INITIAL_BACKOFF_MS", value_name = "MS")]
    initial_backoff_ms: Option<u64>,
    /// Backoff cap [default: 30000].
    #[arg(long, env = "TREATY_MAX_BACKOFF_MS", value_name = "MS")]
    max_backoff_ms: Option<u64>,
    /// Failed phase-two attempts after which a transaction is flagged stuck [default: 10].
    #[arg(long, env = "TREATY_STUCK_AFTER_ATTEMPTS", value_name = "N")]
    stuck_after_attempts: Option<u32>,
    /// Bound of Begin with `wait` when the client sets none [default: 30000].
    #[arg(long, env = "TREATY_DEFAULT_WAIT_MS", value_name = "MS")]
    default_wait_ms: Option<u64>,
    /// Largest wait a client may ask for [default: 300000].
    #[arg(long, env = "TREATY_MAX_WAIT_MS", value_name = "MS")]
    max_wait_ms: Option<u64>,
    /// How long finished transactions are kept [default: 604800 (7 days)].
    #[arg(long, env = "TREATY_RETENTION_SECS", value_name = "SECS")]
    retention_secs: Option<u64>,
    /// How often finished transactions past retention are deleted [default: 600].
    #[arg(long, env = "TREATY_GC_INTERVAL_SECS", value_name = "SECS")]
    gc_interval_secs: Option<u64>,
    /// On SIGTERM/SIGINT, how long in-flight work may finish [default: 10000].
    #[arg(long, env = "TREATY_SHUTDOWN_GRACE_MS", value_name = "MS")]
    shutdown_grace_ms: Option<u64>,
    /// Most branches per transaction [default: 64].
    #[arg(long, env = "TREATY_MAX_BRANCHES", value_name = "N")]
    max_branches: Option<usize>,
    /// Largest payload (or compensation payload) of one branch [default: 1048576].
    #[arg(long, env = "TREATY_MAX_PAYLOAD_BYTES", value_name = "BYTES")]
    max_payload_bytes: Option<usize>,
    /// Largest transaction (all payloads, handlers and endpoints) [default: 4194304].
    #[arg(long, env = "TREATY_MAX_TX_BYTES", value_name = "BYTES")]
    max_tx_bytes: Option<usize>,
    /// Longest gid [default: 128].
    #[arg(long, env = "TREATY_MAX_GID_BYTES", value_name = "BYTES")]
    max_gid_bytes: Option<usize>,
    /// Longest handler name [default: 128].
    #[arg(long, env = "TREATY_MAX_HANDLER_BYTES", value_name = "BYTES")]
    max_handler_bytes: Option<usize>,
    /// sled page cache size [default: 67108864].
    #[arg(long, env = "TREATY_CACHE_BYTES", value_name = "BYTES")]
    cache_bytes: Option<u64>,
    /// How long the tombstone (gid, outcome) of a collected transaction is kept; until then
    /// a Begin reusing the gid is answered from it [default: 7776000 (90 days)].
    #[arg(long, env = "TREATY_TOMBSTONE_RETENTION_SECS", value_name = "SECS")]
    tombstone_retention_secs: Option<u64>,
    /// Live transactions at most; past it Begin answers RESOURCE_EXHAUSTED [default: 1000000].
    #[arg(long, env = "TREATY_MAX_LIVE_TRANSACTIONS", value_name = "N")]
    max_live_transactions: Option<usize>,
    /// Bytes of definitions live transactions may hold in memory [default: 4294967296].
    #[arg(long, env = "TREATY_MAX_LIVE_BYTES", value_name = "BYTES")]
    max_live_bytes: Option<usize>,
    /// gRPC URI participants use to ask this coordinator about outcomes, sent with every
    /// branch call [default: http://<listen address>, unless it is 0.0.0.0 or [::]].
    #[arg(long, env = "TREATY_ADVERTISE_URL", value_name = "URL")]
    advertise_url: Option<String>,
}

/// The same settings as the flags, read from the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    log_format: Option<LogFormat>,
    log_level: Option<String>,
    default_deadline_ms: Option<u64>,
    max_deadline_ms: Option<u64>,
    call_timeout_ms: Option<u64>,
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    stuck_after_attempts: Option<u32>,
    default_wait_ms: Option<u64>,
    max_wait_ms: Option<u64>,
    retention_secs: Option<u64>,
    gc_interval_secs: Option<u64>,
    shutdown_grace_ms: Option<u64>,
    max_branches: Option<usize>,
    max_payload_bytes: Option<usize>,
    max_tx_bytes: Option<usize>,
    max_gid_bytes: Option<usize>,
    max_handler_bytes: Option<usize>,
    cache_bytes: Option<u64>,
    tombstone_retention_secs: Option<u64>,
    max_live_transactions: Option<usize>,
    max_live_bytes: Option<usize>,
    advertise_url: Option<String>,
}

struct Settings {
    listen: SocketAddr,
    data_dir: PathBuf,
    log_format: LogFormat,
    log_level: String,
    cache_bytes: u64,
    config: Config,
}

fn load_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

fn settings(cli: Cli) -> Result<Settings, String> {
    let file = match &cli.config {
        Some(p) => load_file(p)?,
        None => FileConfig::default(),
    };
    let d = Config::default();
    let l = Limits::default();
    // Flag or environment (clap merged those), then the file, then the default.
    macro_rules! pick {
        ($name:ident, $default:expr) => {
            cli.$name.clone().or(file.$name.clone()).unwrap_or($default)
        };
    }
    let ms = Duration::from_millis;
    let secs = Duration::from_secs;
    let config = Config {
        default_deadline: ms(pick!(
            default_deadline_ms,
            d.default_deadline.as_millis() as u64
        )),
        max_deadline: ms(pick!(max_deadline_ms, d.max_deadline.as_millis() as u64)),
        call_timeout: ms(pick!(call_timeout_ms, d.call_timeout.as_millis() as u64)),
        initial_backoff: ms(pick!(
            initial_backoff_ms,
            d.initial_backoff.as_millis() as u64
        )),
        max_backoff: ms(pick!(max_backoff_ms, d.max_backoff.as_millis() as u64)),
        stuck_after_attempts: pick!(stuck_after_attempts, d.stuck_after_attempts),
        default_wait: ms(pick!(default_wait_ms, d.default_wait.as_millis() as u64)),
        max_wait: ms(pick!(max_wait_ms, d.max_wait.as_millis() as u64)),
        retention: secs(pick!(retention_secs, d.retention.as_secs())),
        gc_interval: secs(pick!(gc_interval_secs, d.gc_interval.as_secs())),
        tombstone_retention: secs(pick!(
            tombstone_retention_secs,
            d.tombstone_retention.as_secs()
        )),
        max_live_transactions: pick!(max_live_transactions, d.max_live_transactions),
        max_live_bytes: pick!(max_live_bytes, d.max_live_bytes),
        advertise_url: cli.advertise_url.clone().or(file.advertise_url.clone()),
        shutdown_grace: ms(pick!(
            shutdown_grace_ms,
            d.shutdown_grace.as_millis() as u64
        )),
        limits: Limits {
            max_branches: pick!(max_branches, l.max_branches),
            max_payload_bytes: pick!(max_payload_bytes, l.max_payload_bytes),
            max_tx_bytes: pick!(max_tx_bytes, l.max_tx_bytes),
            max_gid_bytes: pick!(max_gid_bytes, l.max_gid_bytes),
            max_handler_bytes: pick!(max_handler_bytes, l.max_handler_bytes),
            max_endpoint_bytes: l.max_endpoint_bytes,
        },
    };
    config.validate()?;
    Ok(Settings {
        listen: pick!(
            listen,
            DEFAULT_LISTEN.parse().expect("valid default address")
        ),
        data_dir: pick!(data_dir, PathBuf::from(DEFAULT_DATA_DIR)),
        log_format: pick!(log_format, LogFormat::Human),
        log_level: pick!(log_level, "info".to_string()),
        cache_bytes: pick!(cache_bytes, SledLogOptions::default().cache_capacity_bytes),
        config,
    })
}

fn init_tracing(format: LogFormat, level: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("invalid --log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
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
    let settings = match settings(Cli::parse()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("treatyd: {e}\nSee `treatyd --help` for every option.");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = init_tracing(settings.log_format, &settings.log_level) {
        eprintln!("treatyd: {e}");
        return ExitCode::from(2);
    }
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
    match runtime.block_on(serve(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("treatyd: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(mut s: Settings) -> Result<(), String> {
    let opts = SledLogOptions {
        cache_capacity_bytes: s.cache_bytes,
    };
    let log = SledLog::open(&s.data_dir, opts).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(s.listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                "cannot listen on {}: address already in use; is another treatyd running? \
                 Stop it or choose another --listen address",
                s.listen
            )
        } else {
            format!("cannot listen on {}: {e}", s.listen)
        }
    })?;
    // Tests and scripts that pass port 0 read the real address from this line.
    if let Ok(addr) = listener.local_addr() {
        println!("treatyd listening on {addr}");
        if s.config.advertise_url.is_none() && !addr.ip().is_unspecified() {
            s.config.advertise_url = Some(format!("http://{addr}"));
        }
    }
    #[cfg(feature = "mutations")]
    {
        let mutations = test_mutations()?;
        treaty_coordinator::server::run_with_mutations(
            listener,
            Arc::new(log),
            s.config,
            mutations,
            shutdown_signal(),
        )
        .await
        .map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "mutations"))]
    {
        no_test_mutations()?;
        treaty_coordinator::server::run(listener, Arc::new(log), s.config, shutdown_signal())
            .await
            .map_err(|e| e.to_string())
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
#[cfg(feature = "mutations")]
fn test_mutations() -> Result<treaty_coordinator::engine::Mutations, String> {
    let mut m = treaty_coordinator::engine::Mutations::default();
    let names = std::env::var("TREATY_TEST_MUTATIONS").unwrap_or_default();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name {
            "commit_before_durable" => m.commit_before_durable = true,
            "skip_one_compensation" => m.skip_one_compensation = true,
            "forget_branch_on_recovery" => m.forget_branch_on_recovery = true,
            "decide_before_durable" => m.decide_before_durable = true,
            "compensate_forward" => m.compensate_forward = true,
            "ignore_tombstones" => m.ignore_tombstones = true,
            other => {
                return Err(format!(
                    "TREATY_TEST_MUTATIONS: unknown mutation {other:?}; known: \
                     commit_before_durable, skip_one_compensation, forget_branch_on_recovery, \
                     decide_before_durable, compensate_forward, ignore_tombstones"
                ))
            }
        }
    }
    if m != treaty_coordinator::engine::Mutations::default() {
        tracing::warn!(
            ?m,
            "deliberate engine bugs are ON (TREATY_TEST_MUTATIONS): test use only"
        );
    }
    Ok(m)
}
