//! `treaty-chaos`: the chaos runner. A bank (several `bank-account` processes, each behind a
//! fault proxy) under a stream of concurrent 2PC and saga transfers driven by `treatyd`, while
//! a seeded nemesis SIGKILLs participants and the coordinator (also at each named failpoint)
//! and cuts, black-holes and delays connections. Then the faults stop, every transaction must
//! end, and the bank is checked (see `check.rs` for the invariants). Extra modes:
//! `--sync-faults`, `--retention`, `--power-cut`; `--all` runs every one of them at once;
//! `--postgres` runs the coordinator's log and every bank on a PostgreSQL server of its own,
//! which the nemesis kills and pauses too.
//!
//! ```text
//! TREATY_SEED=42 TREATY_CHAOS_SECS=600 cargo run --release -p treaty-tests --bin treaty-chaos
//! # the long campaign: every mode and nemesis together
//! TREATY_CHAOS_SECS=1800 cargo run --release -p treaty-tests --bin treaty-chaos -- --all
//! # on PostgreSQL (needs the PostgreSQL server binaries: initdb, postgres)
//! TREATY_CHAOS_SECS=600 cargo run --release -p treaty-tests --bin treaty-chaos -- --postgres
//! ```
//!
//! This file: the command line, the run (start, load + faults, drain, check), the summary.
//!
//! - [`cluster`]: the processes (treatyd, bank instances), the proxies, and the nemesis that
//!   kills, crashes at failpoints and cuts connections.
//! - [`workload`]: the transfers and the clients that submit them.
//! - [`check`]: the invariants checked at the end.

mod check;
mod cluster;
mod owners;
mod workload;

use check::{Final, Observed};
use clap::Parser;
use cluster::Cluster;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use treaty_sdk::{Client, Outcome, TxState};
use workload::{Record, Reuse, Submitted, Told};

/// Treaty chaos runner: a bank under concurrent 2PC and saga transfers while participants and
/// the coordinator are SIGKILLed (at random moments and at every named failpoint) and their
/// connections are cut, black-holed and delayed. Then every fault stops, every transaction must
/// become terminal, and the bank is checked: total money unchanged, no negative balance a saga
/// cannot explain, every transaction all-or-nothing by each branch's barrier rows, balances
/// equal to the opening balances plus the committed transfers, nothing stuck or lost, the
/// outcome told to each client honoured, compensations in reverse step order.
///
/// Extra modes (any combination; `--all` turns every one on):
/// `--sync-faults` (treatyd and banks restarted with a failing fsync, which must stop them,
/// or a burst of EMFILE, which they must ride out), `--retention` (treatyd collects finished
/// records after 1 s; finished gids are resubmitted with the same body, which must get the
/// logged outcome, and with another, which must be refused), `--power-cut` (treatyd's and
/// bank 0's data on treaty-lazyfs FUSE mounts; both are SIGKILLed and lose every unsynced
/// write; needs fuse3 and root), `--postgres` (see below).
///
/// `--postgres`: the runner starts its own PostgreSQL server (initdb into the work
/// directory; fsync on unless `--pg-fsync-off`), treatyd logs to its database `treaty_log`
/// (`--store`), bank instance i keeps its accounts in `bank_<i>` (2PC prepares are PostgreSQL
/// prepared transactions). The nemesis also SIGKILLs and restarts the whole server, pauses it
/// (SIGSTOP/SIGCONT), and pauses treatyd. The checker also requires that no prepared
/// transaction is left in `pg_prepared_xacts` at the end, and that no transaction was driven
/// by two coordinators at once (no epoch in a record's `owners` history after another took
/// it over). `--coordinators N` runs N treatyd on the one log (lease 1.5 s): the clients fail
/// over across them, and the nemesis kills and pauses any one of them, a third of the time
/// past the lease (a takeover). Not combinable with the sled-file
/// modes (`--sync-faults`, `--power-cut`); `--all` does not include it.
///
/// The seed is printed first; `TREATY_SEED=<n>` replays the same fault schedule and the same
/// transfers (timing, and so the interleaving, still varies). The last line of stdout is a
/// JSON summary. Exit status: 0 when no violation, 1 when any (each printed with the seed and
/// the gid), 2 when the cluster could not be started.
///
/// The 30-minute campaign with every mode and nemesis at once (release build):
/// `TREATY_CHAOS_SECS=1800 cargo run --release -p treaty-tests --bin treaty-chaos -- --all`
#[derive(Parser, Debug)]
#[command(name = "treaty-chaos", version)]
struct Cli {
    /// Seconds of load with faults, before the drain and the checks.
    #[arg(long, env = "TREATY_CHAOS_SECS", default_value_t = 20)]
    secs: u64,
    /// Seed of every random choice (faults and transfers); random when not given.
    #[arg(long, env = "TREATY_SEED")]
    seed: Option<u64>,
    /// Bank account service instances (separate processes, each behind its own proxy).
    #[arg(long, default_value_t = 3)]
    instances: usize,
    /// Accounts per instance.
    #[arg(long, default_value_t = 4)]
    accounts: usize,
    /// Opening balance of every account.
    #[arg(long, default_value_t = 1000)]
    opening: i64,
    /// Concurrent clients submitting transfers.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Bound, after the faults stop, for every transaction to become terminal.
    #[arg(long, default_value_t = 120)]
    drain_secs: u64,
    /// Run without faults (a baseline for the checker).
    #[arg(long)]
    no_faults: bool,
    /// Every extra mode below at once (what a long campaign should run).
    #[arg(long, env = "TREATY_CHAOS_ALL")]
    all: bool,
    /// Restart treatyd and bank instances with sync failpoints armed: a failing fsync (must
    /// fail-stop) or a burst of EMFILE (must be ridden out).
    #[arg(long)]
    sync_faults: bool,
    /// treatyd collects finished records after 1 s (`--retention-secs 1 --gc-interval-secs
    /// 1`), and the workload resubmits finished gids with the same body and with another.
    #[arg(long)]
    retention: bool,
    /// Put treatyd's and bank 0's data directories on treaty-lazyfs mounts, and cut the power
    /// (SIGKILL both, drop every unsynced write) as a nemesis action. Needs FUSE.
    #[arg(long)]
    power_cut: bool,
    /// Checker tests only: FAILPOINTS for every treatyd start (e.g.
    /// `treaty::sync::fsync_eio=sleep(100)` to widen the window between a write and its sync).
    #[arg(long, value_name = "SPEC")]
    treatyd_failpoints: Option<String>,
    /// Checker tests only: run treatyd and bank-account built with the deliberately broken
    /// SledSync (`mutation-skip-fdatasync`), which the power-cut mode must catch.
    #[arg(long)]
    skip_fdatasync_mutant: bool,
    /// Run the coordinator's log and every bank on a PostgreSQL server the runner starts
    /// (needs initdb and postgres on PATH, in /usr/lib/postgresql/<v>/bin, or $TREATY_PG_BIN).
    #[arg(long, env = "TREATY_CHAOS_POSTGRES")]
    postgres: bool,
    /// With --postgres: run the server with fsync off (faster; still safe against the
    /// nemesis, which kills processes, not the machine) [default: fsync on].
    #[arg(long, requires = "postgres")]
    pg_fsync_off: bool,
    /// With --postgres: coordinators sharing the one log database (each with `--lease-ms
    /// 1500` when more than one); the nemesis kills and pauses any one of them.
    #[arg(long, default_value_t = 1, requires = "postgres")]
    coordinators: usize,
    /// Checker tests only, with --coordinators > 1: the nemesis does nothing but freeze
    /// coordinator 0 (with writes queued) until another coordinator has taken its
    /// transactions over, then resume it, again and again.
    #[arg(long, requires = "postgres")]
    pause_past_lease: bool,
    /// Checker tests only: run bank-account built with the deliberately broken PgStore
    /// (`mutation-abort-keeps-prepared`: an abort leaves its prepared transaction in
    /// PostgreSQL), which --postgres must catch.
    #[arg(long, requires = "postgres")]
    abort_keeps_prepared_mutant: bool,
    /// Directory to put the run's data directories in (a fresh subdirectory, removed at the
    /// end unless a violation was found) [default: the system temp dir].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.instances == 0 || cli.instances * cli.accounts < 4 {
        eprintln!("treaty-chaos: need at least 4 accounts in all (--instances x --accounts)");
        return ExitCode::from(2);
    }
    let seed = cli.seed.unwrap_or_else(rand::random);
    println!("treaty-chaos: seed {seed} (replay with TREATY_SEED={seed})");
    let _ = std::io::stdout().flush();
    // Keep the daemons' logs to what matters unless asked otherwise (a run logs many expected
    // warnings: calls failing while a participant is down).
    if std::env::var_os("TREATY_TEST_LOG").is_none() {
        std::env::set_var("TREATY_TEST_LOG", "error");
    }
    match run(&cli, seed) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("treaty-chaos: {e}");
            ExitCode::from(2)
        }
    }
}

/// One campaign; returns the number of violations.
fn run(cli: &Cli, seed: u64) -> Result<usize, String> {
    let dir = match &cli.work_dir {
        Some(d) => tempfile::Builder::new()
            .prefix("treaty-chaos-")
            .tempdir_in(d),
        None => tempfile::Builder::new().prefix("treaty-chaos-").tempdir(),
    }
    .map_err(|e| format!("cannot create a work directory: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let opts = cluster::Options {
        sync_faults: cli.all || cli.sync_faults,
        retention: cli.all || cli.retention,
        power_cut: cli.all || cli.power_cut,
        treatyd_failpoints: cli.treatyd_failpoints.clone(),
        skip_fdatasync_mutant: cli.skip_fdatasync_mutant,
        postgres: cli.postgres.then_some(cluster::PgMode {
            fsync: !cli.pg_fsync_off,
            coordinators: cli.coordinators,
            pause_past_lease: cli.pause_past_lease,
        }),
        abort_keeps_prepared_mutant: cli.abort_keeps_prepared_mutant,
    };
    eprintln!("treaty-chaos: modes {opts:?}");
    let cluster = Cluster::start(
        rt.handle(),
        dir.path(),
        cli.instances,
        cli.accounts,
        cli.opening,
        &opts,
    )?;
    eprintln!(
        "treaty-chaos: treatyd {} ; banks {:?} behind proxies {:?} ; data in {}",
        cluster.treatyd_uri,
        cluster.bank_uris,
        cluster.endpoints(),
        dir.path().display()
    );
    if let Some(log) = &cluster.log_db {
        eprintln!(
            "treaty-chaos: PostgreSQL log {log} ; bank databases {:?}",
            cluster.bank_dbs
        );
    }
    let client = rt
        .block_on(Client::connect(cluster.treatyd_uri.clone()))
        .map_err(|e| format!("cannot connect to treatyd: {e}"))?;
    // Several coordinators: each worker fails over across all of them (and so does the drain).
    let clients = (0..cli.concurrency)
        .map(|w| rt.block_on(owners::worker_client(&cluster, &client, w)))
        .collect::<Result<Vec<_>, _>>()?;
    let client = clients.first().cloned().unwrap_or(client);

    let t0 = Instant::now();
    let stop_at = t0 + Duration::from_secs(cli.secs);
    let drain = Duration::from_secs(cli.drain_secs);
    // A submit whose outcome stays unknown is resubmitted until this; the rest of the drain
    // bound is for transactions to become terminal.
    let give_up_at = stop_at + drain / 2;
    let workers: Vec<_> = (0..cli.concurrency)
        .map(|w| {
            rt.spawn(workload::worker(
                seed,
                w,
                clients[w].clone(),
                cluster.endpoints(),
                cluster.accounts.clone(),
                stop_at,
                give_up_at,
                opts.retention,
            ))
        })
        .collect();

    let abort = AtomicBool::new(false);
    let (faults, records) = std::thread::scope(|s| {
        let nemesis = (!cli.no_faults)
            .then(|| s.spawn(|| cluster::nemesis(&cluster, seed, t0, stop_at, &abort)));
        let records: Result<(Vec<Record>, Vec<Reuse>), String> = rt.block_on(async {
            let mut all = Vec::new();
            let mut reuses = Vec::new();
            for w in workers {
                let log = w.await.map_err(|e| format!("a client task failed: {e}"))?;
                all.extend(log.records);
                reuses.extend(log.reuses);
            }
            Ok((all, reuses))
        });
        if records.is_err() {
            abort.store(true, std::sync::atomic::Ordering::Release);
        }
        let faults = match nemesis {
            Some(n) => n
                .join()
                .unwrap_or_else(|_| Err("the nemesis thread panicked".into())),
            None => Ok(cluster::FaultCounts::default()),
        };
        (faults, records)
    });
    let (records, reuses) = records?;
    let mut harness_problems = Vec::new();
    let faults = faults.unwrap_or_else(|e| {
        harness_problems.push(format!(
            "the cluster could not be restored after a fault: {e}"
        ));
        cluster::FaultCounts::default()
    });
    harness_problems.extend(faults.problems.iter().cloned());
    if let Err(e) = cluster.heal() {
        harness_problems.push(format!("the cluster could not be healed: {e}"));
    }
    eprintln!(
        "[chaos {:6.1}s] load stopped: {} transfers; waiting (up to {}s) for every one to end",
        t0.elapsed().as_secs_f64(),
        records.len(),
        cli.drain_secs
    );

    let finals = rt.block_on(drain_all(&client, &records, stop_at + drain));
    eprintln!(
        "[chaos {:6.1}s] coordinator states read; reading the banks and checking",
        t0.elapsed().as_secs_f64()
    );
    // PostgreSQL mode: every prepared transaction must have been committed or rolled back.
    let mut prepared_left = 0;
    // Whether that check ran and read the server's prepared transactions (for the tests).
    let mut prepared_checked = false;
    if let Some(url) = &cluster.log_db {
        match rt.block_on(prepared_left_over(
            url,
            Duration::from_secs(PREPARED_BOUND_SECS),
        )) {
            Ok(left) => {
                prepared_checked = true;
                prepared_left = left.len();
                for (gid, db) in left {
                    harness_problems.push(format!(
                        "prepared transaction {gid} left in pg_prepared_xacts of database \
                         {db} {PREPARED_BOUND_SECS} s after every transaction ended"
                    ));
                }
            }
            Err(e) => harness_problems.push(format!("cannot read pg_prepared_xacts: {e}")),
        }
    }
    // PostgreSQL mode: no transaction driven by two coordinators at once (owners.rs).
    let owners = cluster.log_db.as_ref().map(|url| {
        rt.block_on(owners::check(url)).unwrap_or_else(|e| {
            harness_problems.push(format!("cannot read the log's owners: {e}"));
            owners::Report::default()
        })
    });
    let banks = rt.block_on(read_banks(&cluster.bank_uris));
    let mut verdict = match banks {
        Ok((rows, balances)) => check::check(
            &records,
            &reuses,
            &cluster.openings,
            &Observed {
                finals,
                rows,
                balances,
            },
        ),
        // On sled a bank that cannot be read is the harness's failure (as before); on
        // PostgreSQL it is a finding too: a bank stuck behind locks a leaked prepared
        // transaction holds cannot answer, and that must be reported, not hang the run.
        Err(e) if cluster.log_db.is_some() => {
            harness_problems.push(format!("the banks could not be read: {e}"));
            check::Verdict::default()
        }
        Err(e) => return Err(e),
    };
    if let Some(o) = &owners {
        verdict.violations.extend(o.violations.iter().cloned());
    }
    for p in harness_problems {
        verdict
            .violations
            .push(check::Violation { gid: None, what: p });
    }
    for (i, v) in verdict.violations.iter().enumerate() {
        if i == 50 {
            eprintln!("... and {} more", verdict.violations.len() - 50);
            break;
        }
        eprintln!(
            "VIOLATION seed={seed} gid={}: {}",
            v.gid.as_deref().unwrap_or("-"),
            v.what
        );
    }
    let unknown_answers: u64 = records.iter().map(|r| r.unknown_answers as u64).sum();
    let told = |t: Told| {
        records
            .iter()
            .filter(|r| r.submitted == Submitted::Accepted(t))
            .count()
    };
    let mut summary = serde_json::json!({
        "seed": seed,
        "transactions": records.len(),
        "committed": verdict.committed,
        "aborted": verdict.aborted,
        "participant_kills": faults.participant_kills,
        "coordinator_kills": faults.coordinator_kills,
        "proxy_faults": faults.proxy_faults,
        "violations": verdict.violations.len(),
        "failpoint_crashes": faults.failpoint_crashes,
        "never_begun": verdict.never_begun,
        "rejected": verdict.rejected,
        "unknown_outcome_resubmits": unknown_answers,
        "compensated_saga_credits": verdict.compensated_credits,
        "negative_accounts_explained_by_sagas": verdict.negative_accounts,
        "told_committed": told(Told::Committed),
        "told_aborted": told(Told::Aborted),
        "told_pending": told(Told::Pending),
        "sync_failstops": faults.sync_failstops,
        "bank_sync_failstops": faults.bank_sync_failstops,
        "emfile_bursts": faults.emfile_bursts,
        "power_cuts": faults.power_cuts,
        "power_cut_bytes_lost": faults.power_cut_bytes,
        "pg_kills": faults.pg_kills,
        "pg_pauses": faults.pg_pauses,
        "coordinator_pauses": faults.coordinator_pauses,
        "exited_after_pg_kill": faults.exited_after_pg_kill,
        "pg_prepared_left": prepared_left,
        "pg_prepared_checked": prepared_checked,
        "reuse_same_body": verdict.reuse_same,
        "reuse_other_body_refused": verdict.reuse_refused,
        "reuse_unanswered": verdict.reuse_unanswered,
        "modes": {
            "sync_faults": opts.sync_faults,
            "retention": opts.retention,
            "power_cut": opts.power_cut,
            "postgres": opts.postgres.is_some(),
            "pg_fsync": opts.postgres.as_ref().map(|m| m.fsync),
            "coordinators": opts.postgres.as_ref().map_or(1, |m| m.coordinators),
        },
        "chaos_secs": cli.secs,
        "elapsed_secs": (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    });
    if let Some(o) = &owners {
        summary["owners_checked"] = o.gids.into();
        summary["owners_violations"] = o.violations.len().into();
        summary["coordinator_takeovers"] = o.takeovers.into();
        summary["paused_past_takeover"] = faults.paused_past_takeover.into();
    }
    let n = verdict.violations.len();
    drop(cluster);
    if n > 0 {
        let kept = dir.keep();
        eprintln!(
            "treaty-chaos: {n} violations with seed {seed}; data directories kept in {}",
            kept.display()
        );
    }
    println!("{summary}");
    let _ = std::io::stdout().flush();
    Ok(n)
}

/// Poll the coordinator until every submitted gid is terminal (or unknown to it), or until
/// `deadline`; what is left is reported as not terminal. Gids are looked up by
/// [`DRAIN_TASKS`] concurrent tasks: a long campaign has tens of thousands.
async fn drain_all(
    client: &Client,
    records: &[Record],
    deadline: Instant,
) -> HashMap<String, Final> {
    let gids: Vec<String> = records.iter().map(|r| r.transfer.gid.clone()).collect();
    let mut tasks = Vec::with_capacity(DRAIN_TASKS);
    for k in 0..DRAIN_TASKS {
        let mine: Vec<String> = gids.iter().skip(k).step_by(DRAIN_TASKS).cloned().collect();
        tasks.push(tokio::spawn(drain_some(client.clone(), mine, deadline)));
    }
    let mut finals = HashMap::with_capacity(gids.len());
    for t in tasks {
        match t.await {
            Ok(part) => finals.extend(part),
            // Its gids stay unread: the checker reports each one.
            Err(e) => eprintln!("treaty-chaos: a drain task failed: {e}"),
        }
    }
    finals
}

const DRAIN_TASKS: usize = 16;

async fn drain_some(
    client: Client,
    mut pending: Vec<String>,
    deadline: Instant,
) -> Vec<(String, Final)> {
    let mut finals = Vec::with_capacity(pending.len());
    let mut last: HashMap<String, String> = HashMap::new();
    loop {
        let mut still = Vec::new();
        for gid in pending {
            match client.get(gid.as_str()).await {
                Ok(tx) => match tx.state {
                    TxState::Committed => finals.push((gid, Final::Committed)),
                    TxState::Aborted => finals.push((gid, Final::Aborted)),
                    s => {
                        last.insert(gid.clone(), format!("{s:?} (stuck flag: {})", tx.stuck));
                        still.push(gid);
                    }
                },
                Err(e) if e.is_not_found() => {
                    // Retention may have replaced the record by a tombstone: `Outcome`
                    // answers from it (`known`).
                    match client.outcome(gid.as_str()).await {
                        Ok(o) => {
                            let fin = match (o.known, o.outcome) {
                                (false, _) => Final::NotFound,
                                (true, Outcome::Committed) => Final::Committed,
                                (true, Outcome::Aborted) => Final::Aborted,
                                (true, Outcome::Pending) => {
                                    last.insert(gid.clone(), "Outcome Pending".into());
                                    still.push(gid);
                                    continue;
                                }
                            };
                            finals.push((gid, fin));
                        }
                        Err(e) => {
                            last.insert(gid.clone(), format!("Outcome unreadable: {e}"));
                            still.push(gid);
                        }
                    }
                }
                Err(e) => {
                    last.insert(gid.clone(), format!("unreadable: {e}"));
                    still.push(gid);
                }
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for gid in pending {
        let state = last.remove(&gid).unwrap_or_default();
        finals.push((gid, Final::NotTerminal(state)));
    }
    finals
}

type Balances = std::collections::BTreeMap<String, (i64, i64)>;

/// Every instance's barrier rows and balances, read directly (not through a proxy), with a
/// few retries while an instance finishes starting.
async fn read_banks(
    uris: &[String],
) -> Result<(Vec<Vec<treaty_tests::bank::BarrierRow>>, Vec<Balances>), String> {
    let mut rows = Vec::new();
    let mut balances = Vec::new();
    for uri in uris {
        let mut tries = 0;
        let started = Instant::now();
        loop {
            let read = async {
                let r = treaty_tests::bank::barrier_rows(uri, "").await?;
                let b = treaty_tests::bank::balances(uri).await?;
                Ok::<_, String>((r, b))
            };
            // Bounded: a bank that hangs (e.g. every pooled connection waiting on a lock)
            // must not hang the runner.
            let read = tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .unwrap_or_else(|_| Err(format!("{uri}: no answer within 5 s")));
            match read {
                Ok((r, b)) => {
                    rows.push(r);
                    balances.push(b);
                    break;
                }
                Err(e) if tries >= 50 || started.elapsed() >= Duration::from_secs(20) => {
                    return Err(format!("cannot read bank {uri}: {e}"))
                }
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    Ok((rows, balances))
}

/// How long, after every transaction is terminal, prepared transactions may take to go.
const PREPARED_BOUND_SECS: u64 = 30;

/// The prepared transactions (name, database) still in the server's `pg_prepared_xacts`
/// (every database) once `bound` has passed, polling until none is left; empty when none.
/// A participant's last `COMMIT PREPARED` may land just after the coordinator's record ends,
/// hence the bounded wait; one still there after it is left for good.
async fn prepared_left_over(url: &str, bound: Duration) -> Result<Vec<(String, String)>, String> {
    let start = Instant::now();
    loop {
        let read = async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| format!("connect to {url}: {e}"))?;
            let conn = tokio::spawn(conn);
            let rows = client
                .query(
                    "SELECT gid, database::text FROM pg_prepared_xacts ORDER BY gid",
                    &[],
                )
                .await
                .map_err(|e| format!("SELECT FROM pg_prepared_xacts: {e}"))?;
            drop(client);
            let _ = conn.await;
            Ok::<_, String>(
                rows.iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                    .collect::<Vec<_>>(),
            )
        };
        match read.await {
            Ok(left) if left.is_empty() || start.elapsed() >= bound => return Ok(left),
            Err(e) if start.elapsed() >= bound => return Err(e),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
