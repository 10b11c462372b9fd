//! `treaty`: the operator's command line for a Treaty coordinator.
//!
//! - this file: the arguments (clap derive), one function per subcommand over the typed SDK
//!   client ([`treaty_sdk::Client`]), and the exit codes;
//! - [`view`]: what is printed: serde views of the SDK's domain types for `--json`, and the
//!   human tables.
//!
//! Exit codes: 0 done; 1 the coordinator refused or does not know the transaction (the
//! message says which); 2 the coordinator cannot be reached (nothing was done, or for
//! `retry`/`resolve` it may have been: look the transaction up). Never a panic.

mod view;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use treaty_sdk::{Client, ClientError, ListFilter, ManualResolution, Mode, TxState};

/// Inspect and steer the transactions of a Treaty coordinator (treatyd).
#[derive(Parser, Debug)]
#[command(name = "treaty", version, about, long_about = None)]
struct Cli {
    /// The coordinator's gRPC URI.
    #[arg(
        long,
        global = true,
        env = "TREATY_COORDINATOR",
        default_value = "http://127.0.0.1:7700"
    )]
    coordinator: String,
    /// Print JSON instead of tables (one object; `watch` prints one object per line).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List transactions: stuck ones first, then newest first.
    List {
        /// Only transactions in this state (repeat for several).
        #[arg(long, value_enum)]
        state: Vec<StateArg>,
        /// Only transactions of this mode.
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// Only transactions flagged stuck (a phase-two call keeps failing).
        #[arg(long)]
        stuck: bool,
        /// Only transactions created at least this long ago, e.g. 30s, 5m, 2h, 1d, 500ms.
        #[arg(long, value_parser = view::parse_duration)]
        older_than: Option<Duration>,
        /// Stop after this many transactions (the pages are fetched until then).
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Transactions per request to the coordinator (it caps this at 1000).
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// Show one transaction: branches, attempts, last errors, operator resolutions, reason.
    Show {
        /// The transaction's gid.
        gid: String,
    },
    /// Print each state change of a transaction until it is committed or aborted.
    Watch {
        /// The transaction's gid.
        gid: String,
    },
    /// Make every waiting branch call of a transaction go out now.
    Retry {
        /// The transaction's gid.
        gid: String,
    },
    /// Record, as an audited operator action, that a branch's commit, abort or
    /// compensation was carried out by hand (for a participant that is gone for good).
    Resolve {
        /// The transaction's gid.
        gid: String,
        /// The branch (its index, as `show` lists it).
        branch: u32,
        /// Who resolves it (recorded).
        #[arg(long)]
        operator: String,
        /// Why, e.g. "refund issued by hand, ticket OPS-123" (recorded).
        #[arg(long)]
        reason: String,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum StateArg {
    Active,
    Committing,
    Aborting,
    Compensating,
    Committed,
    Aborted,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ModeArg {
    /// Two-phase commit.
    #[value(name = "2pc")]
    TwoPhase,
    /// Saga.
    Saga,
}

/// Why a subcommand failed, with the exit code it gives.
enum Failure {
    /// Refused or unknown (exit 1).
    Refused(String),
    /// The coordinator cannot be reached (exit 2).
    Unreachable(String),
}

impl Failure {
    /// `e` from a call about `gid` (if any) to the coordinator at `uri`.
    fn from_client(e: ClientError, uri: &str, gid: Option<&str>) -> Failure {
        match (&e, gid) {
            (e, Some(gid)) if e.is_not_found() => {
                Failure::Refused(format!("no transaction {gid:?} at {uri}"))
            }
            (ClientError::Connect { .. }, _) => Failure::Unreachable(e.to_string()),
            (ClientError::Unavailable { .. }, _) => {
                Failure::Unreachable(format!("coordinator at {uri} is unreachable: {e}"))
            }
            _ => Failure::Refused(e.to_string()),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
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
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(m)) => {
            eprintln!("treaty: {m}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(m)) => {
            eprintln!("treaty: {m}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let uri = cli.coordinator.clone();
    let client = Client::connect(uri.clone())
        .await
        .map_err(|e| Failure::from_client(e, &uri, None))?;
    let json = cli.json;
    match cli.command {
        Cmd::List {
            state,
            mode,
            stuck,
            older_than,
            limit,
            page_size,
        } => {
            let mut filter = ListFilter::new().states(state.into_iter().map(|s| match s {
                StateArg::Active => TxState::Active,
                StateArg::Committing => TxState::Committing,
                StateArg::Aborting => TxState::Aborting,
                StateArg::Compensating => TxState::Compensating,
                StateArg::Committed => TxState::Committed,
                StateArg::Aborted => TxState::Aborted,
            }));
            if let Some(m) = mode {
                filter = filter.mode(match m {
                    ModeArg::TwoPhase => Mode::TwoPhase,
                    ModeArg::Saga => Mode::Saga,
                });
            }
            if stuck {
                filter = filter.stuck_only();
            }
            if let Some(age) = older_than {
                filter = filter.min_age(age);
            }
            let filter = filter.page_size(page_size);
            let mut found = Vec::new();
            let mut page_filter = filter.clone();
            while found.len() < limit {
                let page = client
                    .list(&page_filter)
                    .await
                    .map_err(|e| Failure::from_client(e, &uri, None))?;
                found.extend(page.transactions);
                match page.next_page_token {
                    Some(token) => page_filter = filter.clone().page_token(token),
                    None => break,
                }
            }
            found.truncate(limit);
            // Stuck ones first: they are what an operator came for. The sort is stable, so
            // each group stays newest first, as the coordinator listed it.
            found.sort_by_key(|t| !t.stuck);
            let views: Vec<view::TxView> = found.iter().map(view::TxView::from).collect();
            if json {
                view::print_json(&views);
            } else {
                print!("{}", view::list_table(&views));
            }
        }
        Cmd::Show { gid } => {
            let tx = client
                .get(&gid)
                .await
                .map_err(|e| Failure::from_client(e, &uri, Some(&gid)))?;
            let v = view::TxView::from(&tx);
            if json {
                view::print_json(&v);
            } else {
                print!("{}", view::show(&v));
            }
        }
        Cmd::Watch { gid } => {
            let fail = |e| Failure::from_client(e, &uri, Some(&gid));
            let mut watch = client.watch(&gid).await.map_err(fail)?;
            let mut last = None;
            while let Some(item) = watch.next().await {
                let v = view::TxView::from(&item.map_err(fail)?);
                let line = if json {
                    serde_json::to_string(&v).expect("a view serializes")
                } else {
                    view::watch_line(&v)
                };
                // The coordinator publishes every record change; an operator wants changes
                // of what the line shows.
                if last.as_ref() != Some(&line) {
                    println!("{line}");
                    last = Some(line);
                }
            }
        }
        Cmd::Retry { gid } => {
            let r = client
                .retry(&gid)
                .await
                .map_err(|e| Failure::from_client(e, &uri, Some(&gid)))?;
            if json {
                view::print_json(
                    &serde_json::json!({ "gid": gid, "retried": r.retried, "forwarded": r.forwarded }),
                );
            } else {
                if r.forwarded {
                    println!("{gid}: passed on to the coordinator that drives it");
                } else {
                    println!("{gid}: {} waiting branch call(s) sent now", r.retried);
                }
            }
        }
        Cmd::Resolve {
            gid,
            branch,
            operator,
            reason,
        } => {
            let resolution = ManualResolution {
                branch_id: branch,
                operator,
                reason,
            };
            let tx = client
                .resolve(&gid, &resolution)
                .await
                .map_err(|e| Failure::from_client(e, &uri, Some(&gid)))?;
            let v = view::TxView::from(&tx);
            if json {
                view::print_json(&v);
            } else {
                println!("{gid}: branch {branch} resolved by hand");
                print!("{}", view::show(&v));
            }
        }
    }
    Ok(())
}
