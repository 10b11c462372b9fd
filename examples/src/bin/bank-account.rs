//! `bank-account`: one instance of the bank example's account service.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use treaty_examples::bank::{parse_accounts, Instance};

/// An account service of the Treaty bank example: serves treaty.v1.Participant (handlers
/// debit/credit for 2PC, saga-debit/saga-credit for sagas) and the Bank inspection service
/// (balances, barrier rows) on one port, over its own sled store.
#[derive(clap::Parser, Debug)]
#[command(name = "bank-account", version)]
struct Cli {
    /// Address to serve on (port 0: any free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7801")]
    listen: SocketAddr,
    /// Directory of this instance's sled store.
    #[arg(long, default_value = "./bank-account-data")]
    data_dir: PathBuf,
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
    let inst = Instance::open(&cli.data_dir, &cli.coordinator, &accounts)
        .map_err(|e| format!("cannot open the store at {}: {e}", cli.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cli.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("bank-account listening on {addr}");
    let _ = std::io::stdout().flush();
    let resolver = inst.participant.spawn_in_doubt_resolver();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let participant = inst.participant.clone();
    let result = tonic::transport::Server::builder()
        .add_service(inst.participant.clone().into_service())
        .add_service(inst.bank_service())
        .serve_with_incoming_shutdown(incoming, async move {
            // Fail-stop: once a barrier row cannot be made durable, stop serving and exit
            // with an error, so a supervisor restarts us and sled recovers from disk.
            tokio::select! {
                _ = shutdown() => {}
                why = participant.failed() => eprintln!("bank-account: {why}"),
            }
        })
        .await;
    resolver.abort();
    if let Some(why) = inst.participant.failure() {
        return Err(format!(
            "stopped: {why}; restart to recover from the data directory"
        ));
    }
    result.map_err(|e| format!("server failed: {e}"))?;
    inst.db
        .flush()
        .map_err(|e| format!("flush at shutdown: {e}"))?;
    Ok(())
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
