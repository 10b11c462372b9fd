//! `trip`: book a flight, a hotel and a car as one saga on three participant services.

use clap::{Parser, ValueEnum};
use std::process::ExitCode;
use std::time::Duration;
use treaty_examples::trip::{service, Journal};
use treaty_sdk::{Client, Outcome};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Step {
    Flight,
    Hotel,
    Car,
    None,
}

/// Books flight, hotel and car as a saga. The three booking services run in this process,
/// each on its own port with its own sled store; the coordinator drives the saga. With
/// `--fail-at`, that step refuses and the earlier bookings are cancelled in reverse order.
/// Prints the journal of what each service did, then the outcome.
#[derive(Parser, Debug)]
#[command(name = "trip", version)]
struct Cli {
    /// The coordinator (treatyd).
    #[arg(long, default_value = "http://127.0.0.1:7700")]
    coordinator: String,
    /// The step whose booking is refused.
    #[arg(long, value_enum, default_value = "none")]
    fail_at: Step,
    /// Where the services keep their stores (default: a fresh temporary directory).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
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
    let tmp;
    let dir = match &cli.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
            tmp.path().to_path_buf()
        }
    };
    let journal = Journal::default();
    let mut uris = Vec::new();
    for (kind, step) in [
        ("flight", Step::Flight),
        ("hotel", Step::Hotel),
        ("car", Step::Car),
    ] {
        let p = service(
            kind,
            &dir.join(kind),
            &cli.coordinator,
            cli.fail_at == step,
            journal.clone(),
        )
        .map_err(|e| format!("cannot start the {kind} service: {e}"))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot listen: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        uris.push((kind, format!("http://{addr}")));
        tokio::spawn(p.serve(listener, std::future::pending()));
    }
    let client = Client::connect(&cli.coordinator)
        .await
        .map_err(|e| e.to_string())?;
    let mut saga = client.saga().deadline(Duration::from_secs(20));
    for (kind, uri) in &uris {
        let booking = format!("{{\"what\":\"{kind}\"}}");
        saga = saga.step(uri.clone(), "book", booking.clone(), booking);
    }
    let outcome = saga
        .submit_and_wait(Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())?;
    for entry in journal.entries() {
        println!("{entry}");
    }
    let word = match outcome {
        Outcome::Committed => "COMMITTED",
        Outcome::Aborted => "ABORTED",
        Outcome::Pending => "PENDING",
    };
    println!("outcome: {word}");
    Ok(outcome)
}
