//! `bank`: transfer money between bank-account instances, and print balances.

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;
use std::time::Duration;
use treaty_examples::bank::{parse_account_uri, Leg};
use treaty_examples::proto::{bank_client::BankClient, BalancesRequest};
use treaty_examples::{check_http_uri, error_chain};
use treaty_sdk::{Branch, Client, Outcome, Step, Submitted};

/// The Treaty bank example's command line: transfers between accounts of `bank-account`
/// instances, through the coordinator, by 2PC or saga; and balances.
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
        /// The coordinator (treatyd) gRPC URI.
        #[arg(long, default_value = "http://127.0.0.1:7700")]
        coordinator: String,
        /// Source account: PARTICIPANT_URI/ACCOUNT, e.g. http://127.0.0.1:7801/alice.
        #[arg(long)]
        from: String,
        /// Destination account: PARTICIPANT_URI/ACCOUNT, e.g. http://127.0.0.1:7802/bob.
        #[arg(long)]
        to: String,
        /// Amount, a positive integer.
        #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
        amount: i64,
        /// Protocol: 2pc (handlers debit/credit) or saga (saga-debit/saga-credit).
        #[arg(long, value_enum, default_value = "2pc")]
        mode: Mode,
        /// How long to wait for the outcome, in milliseconds; past it the transfer is
        /// printed as PENDING (exit 4) and the coordinator finishes it on its own.
        #[arg(long, default_value_t = 10_000)]
        wait_ms: u64,
        /// Transaction id (default: a new UUIDv7). Resubmitting the same transfer with the same
        /// gid is idempotent: use it to retry a transfer whose outcome is unknown.
        #[arg(long)]
        gid: Option<String>,
    },
    /// Print every account (balance and held) of the given instances, and the total.
    Balances {
        /// Participant URIs, e.g. http://127.0.0.1:7801 http://127.0.0.1:7802.
        #[arg(required = true)]
        instances: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    // Output piped into `head` and the like: end quietly when the reader goes away, as
    // command-line tools do, instead of panicking on a failed write to stdout.
    // SAFETY: SIG_DFL installs no handler of ours, so nothing runs in signal context.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    match treaty_examples::parse_args::<Cli>().command {
        Cmd::Transfer {
            coordinator,
            from,
            to,
            amount,
            mode,
            wait_ms,
            gid,
        } => match transfer(&coordinator, &from, &to, amount, mode, wait_ms, gid).await {
            Ok(submitted) => {
                let (word, code) = match submitted.outcome {
                    Outcome::Committed => ("COMMITTED", 0),
                    Outcome::Aborted => ("ABORTED", 3),
                    Outcome::Pending => ("PENDING", 4),
                };
                match submitted.reason {
                    Some(why) => println!("{} {word}: {why}", submitted.gid),
                    None => println!("{} {word}", submitted.gid),
                }
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
) -> Result<Submitted, String> {
    if amount <= 0 {
        return Err(format!("--amount must be a positive integer, got {amount}"));
    }
    let (from_uri, from_acct) = parse_account_uri(from).map_err(|e| format!("--from {e}"))?;
    let (to_uri, to_acct) = parse_account_uri(to).map_err(|e| format!("--to {e}"))?;
    check_http_uri("--coordinator", coordinator)?;
    let client = Client::connect(coordinator)
        .await
        .map_err(|e| error_chain(&e))?;
    let debit = Leg::payload(&from_acct, amount);
    let credit = Leg::payload(&to_acct, amount);
    let wait = Duration::from_millis(wait_ms);
    // Without --gid the SDK generates one; it comes back with the outcome, and an unknown
    // outcome's error names it.
    let submitted = match mode {
        Mode::TwoPhase => {
            let mut tx = client
                .two_phase()
                .branch(Branch::new(from_uri, "debit").payload(debit))
                .branch(Branch::new(to_uri, "credit").payload(credit));
            if let Some(gid) = gid {
                tx = tx.gid(gid);
            }
            tx.submit_and_wait(wait).await
        }
        Mode::Saga => {
            let mut tx = client
                .saga()
                .step(
                    Step::new(from_uri, "saga-debit")
                        .payload(debit.clone())
                        .compensation(debit),
                )
                .step(
                    Step::new(to_uri, "saga-credit")
                        .payload(credit.clone())
                        .compensation(credit),
                );
            if let Some(gid) = gid {
                tx = tx.gid(gid);
            }
            tx.submit_and_wait(wait).await
        }
    }
    .map_err(|e| error_chain(&e))?;
    Ok(submitted)
}

/// Bound on connecting to an instance and on each `Balances` call.
const BALANCES_TIMEOUT: Duration = Duration::from_secs(5);

async fn balances(instances: &[String]) -> Result<(), String> {
    let mut total = 0i64;
    for uri in instances {
        let endpoint = tonic::transport::Endpoint::from_shared(uri.clone())
            .map_err(|e| {
                format!("{uri:?} is not a URI ({e}); expected e.g. http://127.0.0.1:7801")
            })?
            .connect_timeout(BALANCES_TIMEOUT)
            .timeout(BALANCES_TIMEOUT);
        let channel = endpoint.connect().await.map_err(|e| {
            format!(
                "cannot connect to {uri}: {}; is bank-account running there?",
                error_chain(&e)
            )
        })?;
        let accounts = BankClient::new(channel)
            .balances(BalancesRequest {})
            .await
            .map_err(|e| format!("{uri}: {}", e.message()))?
            .into_inner()
            .accounts;
        if accounts.is_empty() {
            println!("{uri}: no accounts (start bank-account with --accounts name=amount)");
        }
        for a in accounts {
            println!(
                "{:<32} balance {:>8}  held {:>6}",
                format!("{uri}/{}", a.name),
                a.balance,
                a.held
            );
            // Held money is prepared for a debit but not committed: it still exists.
            total = total.saturating_add(a.balance).saturating_add(a.held);
        }
    }
    println!("total {total} (balance + held over all accounts)");
    Ok(())
}
