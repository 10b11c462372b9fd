//! `bank-account`: one instance of the bank example's account service.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use treaty_examples::bank::{parse_accounts, BankService, Instance, PgInstance};
use treaty_examples::proto::bank_server::BankServer;
use treaty_sdk::{BarrierStore, Participant};

/// An account service of the Treaty bank example: serves treaty.v1.Participant (handlers
/// debit/credit for 2PC, saga-debit/saga-credit for sagas) and the Bank inspection service
/// (balances, barrier rows) on one port, over its own sled store (`--data-dir`, the default)
/// or a PostgreSQL database (`--store postgres://...`).
#[derive(clap::Parser, Debug)]
#[command(name = "bank-account", version)]
struct Cli {
    /// Address to serve on (port 0: any free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7801")]
    listen: SocketAddr,
    /// Directory of this instance's sled store (unless --store names PostgreSQL).
    #[arg(long, default_value = "./bank-account-data")]
    data_dir: PathBuf,
    /// Keep the accounts and barrier rows in PostgreSQL instead of sled, e.g.
    /// `postgres://user:password@127.0.0.1:5432/bank_a`. The server needs
    /// `max_prepared_transactions` above 0 (2PC prepares are PostgreSQL prepared
    /// transactions). Default: sled, in --data-dir.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// With `--store ...?sslmode=require`: the CA (PEM) that signed the database server's
    /// certificate; the connections are TLS, checked against it.
    #[arg(long, value_name = "FILE", requires = "store")]
    store_ca: Option<PathBuf>,
    /// The coordinator, asked about prepared branches left in doubt by a crash.
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    coordinator: String,
    /// Accounts to create if missing, with opening balances, e.g. `alice=100,bob=50`.
    /// Existing accounts keep their balance.
    #[arg(long, default_value = "")]
    accounts: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli: Cli = treaty_examples::parse_args();
    // Test builds only (feature `failpoints`): arm the SDK's sync failpoints from FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bank-account: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let accounts = parse_accounts(&cli.accounts).map_err(|e| format!("--accounts: {e}"))?;
    treaty_examples::check_http_uri("--coordinator", &cli.coordinator)?;
    if let Some(url) = &cli.store {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(format!(
                "--store {url:?}: expected a PostgreSQL URL, postgres://user:password@host:port/db"
            ));
        }
        let mut options = treaty_sdk::postgres::PgStoreOptions::default();
        if let Some(ca) = &cli.store_ca {
            options = options.tls_ca(ca);
        }
        let inst = PgInstance::open_with(url, options, &cli.coordinator, &accounts)
            .await
            .map_err(|e| format!("cannot open the PostgreSQL store: {e}"))?;
        let bank = inst.bank_service();
        // PostgreSQL commits are durable when they return: nothing to flush at shutdown.
        return serve(cli.listen, inst.participant, bank).await;
    }
    let inst = Instance::open(&cli.data_dir, &cli.coordinator, &accounts)
        .map_err(|e| format!("cannot open the store at {}: {e}", cli.data_dir.display()))?;
    let bank = inst.bank_service();
    serve(cli.listen, inst.participant.clone(), bank).await?;
    inst.db
        .flush()
        .map_err(|e| format!("flush at shutdown: {e}"))?;
    Ok(())
}

/// Serves the participant and the bank service until SIGTERM/SIGINT or a fail-stop.
async fn serve<S: BarrierStore>(
    listen: SocketAddr,
    participant: Participant<S>,
    bank: BankServer<BankService>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("bank-account listening on {addr}");
    let _ = std::io::stdout().flush();
    let resolver = participant.spawn_in_doubt_resolver();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let watched = participant.clone();
    let result = tonic::transport::Server::builder()
        .add_service(participant.clone().into_service())
        .add_service(bank)
        .serve_with_incoming_shutdown(incoming, async move {
            // Fail-stop: once a barrier row cannot be made durable, stop serving and exit
            // with an error, so a supervisor restarts us and sled recovers from disk.
            tokio::select! {
                _ = shutdown() => {}
                why = watched.failed() => eprintln!("bank-account: {why}"),
            }
        })
        .await;
    resolver.abort();
    if let Some(why) = participant.failure() {
        return Err(format!(
            "stopped: {why}; restart to recover from the data directory"
        ));
    }
    result.map_err(|e| format!("server failed: {e}"))
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
