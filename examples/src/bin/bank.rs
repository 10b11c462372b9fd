//! `bank`: transfer money between bank-account instances, and print balances.

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;
use std::time::Duration;
use treaty_examples::bank::{parse_account_uri, Leg};
use treaty_examples::proto::{bank_client::BankClient, BalancesRequest};
use treaty_sdk::{Client, Outcome};

/// The Treaty bank example's command line.
#[derive(Parser, Debug)]
#[command(name = "bank", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// Two-phase commit: debit prepares (holds the money), credit prepares, then both commit.
    #[value(name = "2pc")]
    TwoPhase,
    /// Saga: debit, then credit; if the credit fails, the debit is compensated.
    Saga,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Move money from one account to another (on the same or another instance).
    /// Exit status: 0 committed, 3 aborted, 4 still pending, 1 error.
    Transfer {
        /// The coordinator (treatyd).
        #[arg(long, default_value = "http://127.0.0.1:7700")]
        coordinator: String,
        /// Source: <participant-uri>/<account>, e.g. http://127.0.0.1:7801/alice.
        #[arg(long)]
        from: String,
        /// Destination: <participant-uri>/<account>, e.g. http://127.0.0.1:7802/bob.
        #[arg(long)]
        to: String,
        /// Amount, a positive integer.
        #[arg(long)]
        amount: i64,
        /// Protocol.
        #[arg(long, value_enum, default_value = "2pc")]
        mode: Mode,
        /// How long to wait for the outcome.
        #[arg(long, default_value_t = 10_000)]
        wait_ms: u64,
        /// Transaction id (default: a new UUIDv7). Reusing one makes the transfer idempotent.
        #[arg(long)]
        gid: Option<String>,
    },
    /// Print every account of the given instances and the total.
    Balances {
        /// Participant URIs, e.g. http://127.0.0.1:7801 http://127.0.0.1:7802.
        #[arg(required = true)]
        instances: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Transfer {
            coordinator,
            from,
            to,
            amount,
            mode,
            wait_ms,
            gid,
        } => match transfer(&coordinator, &from, &to, amount, mode, wait_ms, gid).await {
            Ok((gid, outcome)) => {
                let (word, code) = match outcome {
                    Outcome::Committed => ("COMMITTED", 0),
                    Outcome::Aborted => ("ABORTED", 3),
                    Outcome::Pending => ("PENDING", 4),
                };
                println!("{gid} {word}");
                ExitCode::from(code)
            }
            Err(e) => {
                eprintln!("bank transfer: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Balances { instances } => match balances(&instances).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bank balances: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn transfer(
    coordinator: &str,
    from: &str,
    to: &str,
    amount: i64,
    mode: Mode,
    wait_ms: u64,
    gid: Option<String>,
) -> Result<(String, Outcome), String> {
    if amount <= 0 {
        return Err(format!("--amount must be a positive integer, got {amount}"));
    }
    let (from_uri, from_acct) = parse_account_uri(from).map_err(|e| format!("--from {e}"))?;
    let (to_uri, to_acct) = parse_account_uri(to).map_err(|e| format!("--to {e}"))?;
    let client = Client::connect(coordinator)
        .await
        .map_err(|e| e.to_string())?;
    // Chosen here (not by the SDK) so it can be printed even when the outcome is unknown.
    let gid = gid.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let debit = Leg::payload(&from_acct, amount);
    let credit = Leg::payload(&to_acct, amount);
    let wait = Duration::from_millis(wait_ms);
    let outcome = match mode {
        Mode::TwoPhase => {
            client
                .two_phase()
                .gid(gid.clone())
                .branch(from_uri, "debit", debit)
                .branch(to_uri, "credit", credit)
                .submit_and_wait(wait)
                .await
        }
        Mode::Saga => {
            client
                .saga()
                .gid(gid.clone())
                .step(from_uri, "saga-debit", debit.clone(), debit)
                .step(to_uri, "saga-credit", credit.clone(), credit)
                .submit_and_wait(wait)
                .await
        }
    }
    .map_err(|e| e.to_string())?;
    Ok((gid, outcome))
}

async fn balances(instances: &[String]) -> Result<(), String> {
    let mut total = 0i64;
    for uri in instances {
        let mut c = BankClient::connect(uri.clone())
            .await
            .map_err(|e| format!("cannot connect to {uri}: {e}; is bank-account running?"))?;
        let accounts = c
            .balances(BalancesRequest {})
            .await
            .map_err(|e| format!("{uri}: {}", e.message()))?
            .into_inner()
            .accounts;
        for a in accounts {
            println!(
                "{uri}/{:<12} balance {:>8}  held {:>6}",
                a.name, a.balance, a.held
            );
            total += a.balance + a.held;
        }
    }
    println!("total {total}");
    Ok(())
}
