//! `trip`: book a flight, a hotel and a car as one saga on three participant services.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use treaty_examples::error_chain;
use treaty_examples::trip::{journal, Clock, Service, HANDLER};
use treaty_sdk::{client, Client, Outcome};

/// How long a booking service may take to stop once the saga is over.
const STOP_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Step {
    /// The flight booking is refused.
    Flight,
    /// The hotel booking is refused.
    Hotel,
    /// The car booking is refused.
    Car,
    /// Every booking succeeds.
    None,
}

/// Books flight, hotel and car as one saga. The three booking services run in this process,
/// each on its own port on 127.0.0.1 with its own sled store; the coordinator drives the saga.
/// With `--fail-at`, that step refuses ("no availability") and the bookings made before it are
/// cancelled in reverse order. Prints the journal of what each service did, then the outcome.
///
/// Exit status: 0 committed, 3 aborted (compensated), 4 still pending, 1 error.
#[derive(Parser, Debug)]
#[command(name = "trip", version)]
struct Cli {
    /// The coordinator (treatyd) gRPC URI.
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    coordinator: String,
    /// The step whose booking is refused.
    #[arg(long, value_enum, default_value = "none")]
    fail_at: Step,
    /// Where the services keep their stores, one subdirectory each (default: a fresh
    /// temporary directory, removed at exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How long to wait for the outcome, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    wait_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(treaty_examples::parse_args::<Cli>()).await {
        Ok(Outcome::Committed) => ExitCode::SUCCESS,
        Ok(Outcome::Aborted) => ExitCode::from(3),
        Ok(Outcome::Pending) => ExitCode::from(4),
        Err(e) => {
            eprintln!("trip: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<Outcome, String> {
    treaty_examples::check_http_uri("--coordinator", &cli.coordinator)?;
    // Kept alive until the end of `run`: dropping it deletes the directory.
    let tmp;
    let dir = match &cli.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().map_err(|e| {
                format!("cannot create a temporary directory: {e}; pass --data-dir DIR")
            })?;
            tmp.path().to_path_buf()
        }
    };
    let clock = Clock::default();
    let mut services = Vec::new();
    let mut servers = Vec::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut uris = Vec::new();
    for (kind, step) in [
        ("flight", Step::Flight),
        ("hotel", Step::Hotel),
        ("car", Step::Car),
    ] {
        let store = dir.join(kind);
        let s = Service::open(
            kind,
            &store,
            &cli.coordinator,
            cli.fail_at == step,
            clock.clone(),
        )
        .map_err(|e| format!("cannot open the {kind} service at {}: {e}", store.display()))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("the {kind} service cannot listen on 127.0.0.1:0: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("the {kind} service's address: {e}"))?;
        uris.push(format!("http://{addr}"));
        let mut stopped = stopped.clone();
        servers.push(tokio::spawn(s.participant.clone().serve(
            listener,
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )));
        services.push(s);
    }

    let result = book(&cli, &uris).await;
    // Stop the services before reading and before the temporary directory goes away.
    let _ = stop.send(true);
    for s in servers {
        // Bounded: a graceful stop waits for open connections, which the coordinator owns.
        match tokio::time::timeout(STOP_WAIT, s).await {
            Ok(Ok(Ok(()))) | Err(_) => {}
            Ok(Ok(Err(e))) => eprintln!("trip: a booking service failed: {e}"),
            Ok(Err(e)) => eprintln!("trip: a booking service task failed: {e}"),
        }
    }
    let (gid, outcome) = result?;

    for entry in journal(&services, &gid).map_err(|e| format!("reading the journal: {e}"))? {
        println!("{entry}");
    }
    let word = match outcome {
        Outcome::Committed => "COMMITTED",
        Outcome::Aborted => "ABORTED",
        Outcome::Pending => "PENDING (the journal above may be incomplete)",
    };
    println!("outcome: {gid} {word}");
    Ok(outcome)
}

/// Submits the saga and waits for its outcome.
async fn book(cli: &Cli, uris: &[String]) -> Result<(String, Outcome), String> {
    let client = Client::connect(&cli.coordinator)
        .await
        .map_err(|e| error_chain(&e))?;
    let mut saga = client.saga().deadline(Duration::from_secs(20));
    for (kind, uri) in ["flight", "hotel", "car"].iter().zip(uris) {
        let booking = serde_json::json!({ "what": kind });
        saga = saga.step(
            client::Step::new(uri.clone(), HANDLER)
                .payload_json(&booking)
                .compensation_json(&booking),
        );
    }
    // The SDK generates the gid and returns it with the outcome: the journal is read by it.
    let submitted = saga
        .submit_and_wait(Duration::from_millis(cli.wait_ms))
        .await
        .map_err(|e| error_chain(&e))?;
    Ok((submitted.gid, submitted.outcome))
}
