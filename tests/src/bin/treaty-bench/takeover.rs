//! `treaty-bench takeover`: how long the transactions of a coordinator that dies wait before
//! the other coordinators of the shared PostgreSQL log have finished them.
//!
//! One repetition, on a fresh database of one private PostgreSQL server:
//!
//! 1. N treatyd (`--lease-ms L`) on the database, and no-op participants that answer phase
//!    one RETRY until a release file exists (`participant --hold-until`).
//! 2. K transactions begun on coordinator 0 (without waiting): each is durable and owned by
//!    coordinator 0's epoch, and none can finish. The bench checks through coordinator 1
//!    that all K are still pending.
//! 3. SIGKILL coordinator 0 (no clean leave: its lease must run out), then create the
//!    release file.
//! 4. Poll coordinator 1 (`Get` of every gid not yet terminal, bounded by `--bound`) until
//!    all K are terminal. The figure is the time from the SIGKILL to the last one seen
//!    terminal: the rest of coordinator 0's lease, the claim poll of the others (500 ms),
//!    the retry backoff of the held calls (capped by `--max-backoff-ms`) and the
//!    transactions' remaining work. The time of the first one seen terminal is reported too.
//!
//! The held transactions retry with a small backoff cap so that, once released, they do not
//! sit in a long backoff: what is measured is the takeover, not the retry policy.

use super::{branches, channel, round3, spawn_treatyd, start_participants, workspace, Mode};
use crate::participant::Answer;
use clap::Args;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_client::CoordinatorClient;
use treaty_tests::Proc;

/// treatyd's own default lease, in ms (the default of `--lease-ms` here too).
const DEFAULT_LEASE_MS: u64 = treaty_coordinator::log::postgres::DEFAULT_LEASE.as_millis() as u64;

#[derive(Args, Debug)]
pub struct TakeoverArgs {
    /// Transactions begun on coordinator 0 and held by their participants when it is killed.
    #[arg(long, default_value_t = 100, value_name = "K")]
    transactions: u64,
    /// treatyd processes on the database (at least 2): coordinator 0 is killed, coordinator
    /// 1 is asked, any survivor may take over.
    #[arg(long, default_value_t = 3, value_name = "N")]
    coordinators: usize,
    /// treatyd's `--lease-ms` for every coordinator (the default is treatyd's own).
    #[arg(long, default_value_t = DEFAULT_LEASE_MS, value_name = "MS")]
    lease_ms: u64,
    /// Repetitions, each on a fresh database with fresh processes; min, median and max are
    /// reported.
    #[arg(long, default_value_t = 3, value_name = "R")]
    repetitions: usize,
    /// Transaction protocol. A saga goes on forward once its participant is released, and
    /// commits; a 2PC transaction taken over before its decision is aborted (presumed
    /// abort), which is terminal too.
    #[arg(long, value_enum, default_value = "saga")]
    mode: Mode,
    /// Branches per transaction; one participant process each.
    #[arg(long, default_value_t = 2)]
    branches: usize,
    /// Backoff cap of the held transactions' retries (their RetryPolicy), in ms: bounds
    /// how long a call waits after its participant is released.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    max_backoff_ms: u64,
    /// Seconds to wait, after the kill, for all transactions to be terminal before the run
    /// fails.
    #[arg(long, default_value_t = 120.0, value_name = "S")]
    bound: f64,
    /// Use this treatyd binary instead of building one (same profile as the bench).
    #[arg(long, value_name = "PATH")]
    treatyd: Option<PathBuf>,
    /// Extra flag for every treatyd (repeatable), e.g. `--treatyd-arg=--shards=4`.
    #[arg(long = "treatyd-arg", value_name = "ARG", allow_hyphen_values = true)]
    treatyd_args: Vec<String>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

/// What one repetition measured.
struct Repetition {
    /// From the SIGKILL until the last transaction was seen terminal through coordinator 1.
    all_terminal: Duration,
    /// From the SIGKILL until the first was.
    first_terminal: Duration,
    committed: u64,
    aborted: u64,
}

pub async fn run(a: TakeoverArgs) -> Result<(), String> {
    if a.coordinators < 2 {
        return Err("--coordinators must be at least 2 (one is killed, one takes over)".into());
    }
    if a.transactions == 0 || a.repetitions == 0 || a.branches == 0 {
        return Err("--transactions, --repetitions and --branches must be at least 1".into());
    }
    if a.lease_ms == 0 {
        return Err("--lease-ms must be at least 1".into());
    }
    if !(a.bound > 0.0 && a.bound.is_finite()) {
        return Err("--bound must be a positive number of seconds".into());
    }
    let ws = workspace(&super::DaemonArgs {
        treatyd: a.treatyd.clone(),
        data_dir: None,
        postgres: true,
        treatyd_args: Vec::new(),
    })?;
    let (server, _) = ws
        .postgres
        .as_ref()
        .ok_or("no PostgreSQL server was started")?;
    let mut reps = Vec::new();
    for r in 0..a.repetitions {
        let url = server
            .create_database(&format!("treaty_takeover_{r}"))
            .map_err(|e| format!("cannot create a database: {e}"))?;
        let release = ws.tmp.path().join(format!("release-{r}"));
        let rep = repetition(&a, &ws.bin, &url, &release).await?;
        if !a.json {
            eprintln!(
                "  repetition {}: all {} terminal {:.3} s after the SIGKILL (first {:.3} s)",
                r + 1,
                a.transactions,
                rep.all_terminal.as_secs_f64(),
                rep.first_terminal.as_secs_f64()
            );
        }
        reps.push(rep);
    }
    drop(ws);

    let mut times: Vec<f64> = reps.iter().map(|r| r.all_terminal.as_secs_f64()).collect();
    times.sort_by(f64::total_cmp);
    let median = match times.len() % 2 {
        1 => times[times.len() / 2],
        _ => (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0,
    };
    let command = format!(
        "cargo run{} -p treaty-tests --bin treaty-bench -- takeover --transactions {} \
         --coordinators {} --lease-ms {} --repetitions {} --mode {} --branches {} \
         --max-backoff-ms {} --bound {}{}{}",
        if cfg!(debug_assertions) {
            ""
        } else {
            " --release"
        },
        a.transactions,
        a.coordinators,
        a.lease_ms,
        a.repetitions,
        a.mode.name(),
        a.branches,
        a.max_backoff_ms,
        a.bound,
        a.treatyd_args
            .iter()
            .map(|t| format!(" --treatyd-arg={t}"))
            .collect::<String>(),
        if a.json { " --json" } else { "" }
    );
    let report = serde_json::json!({
        "mode": a.mode.name(),
        "branches": a.branches,
        "transactions": a.transactions,
        "coordinators": a.coordinators,
        "lease_ms": a.lease_ms,
        "repetitions": a.repetitions,
        "takeover_s": times.iter().map(|t| round3(*t)).collect::<Vec<_>>(),
        "min_s": round3(times[0]),
        "median_s": round3(median),
        "max_s": round3(times[times.len() - 1]),
        "first_terminal_s": reps
            .iter()
            .map(|r| round3(r.first_terminal.as_secs_f64()))
            .collect::<Vec<_>>(),
        "committed": reps.iter().map(|r| r.committed).sum::<u64>(),
        "aborted": reps.iter().map(|r| r.aborted).sum::<u64>(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "command": command,
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "treaty-bench takeover: {} held {} transactions ({} branches) on coordinator 0 of \
             {}, lease {} ms, {} repetitions, {} cores",
            a.transactions,
            a.mode.name(),
            a.branches,
            a.coordinators,
            a.lease_ms,
            a.repetitions,
            report["cores"]
        );
        println!(
            "  SIGKILL to all terminal (s)   min {}  median {}  max {}",
            report["min_s"], report["median_s"], report["max_s"]
        );
        println!(
            "  outcomes                      {} committed, {} aborted",
            report["committed"], report["aborted"]
        );
        println!(
            "  reproduce                     {}",
            report["command"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

async fn repetition(
    a: &TakeoverArgs,
    bin: &std::path::Path,
    url: &str,
    release: &std::path::Path,
) -> Result<Repetition, String> {
    let participants = start_participants(a.branches, Answer::Ok, Some(release))?;
    let mut args = vec![
        "--lease-ms".to_string(),
        a.lease_ms.to_string(),
        "--shutdown-grace-ms".to_string(),
        "200".to_string(),
    ];
    args.extend(a.treatyd_args.iter().cloned());
    let mut coordinators: Vec<Proc> = Vec::new();
    for i in 0..a.coordinators {
        coordinators.push(spawn_treatyd(
            &format!("treatyd-{i}"),
            bin,
            "--store",
            url.as_ref(),
            &args,
        )?);
    }
    let c0 = CoordinatorClient::new(channel(&coordinators[0].uri()).await?);
    let mut c1 = CoordinatorClient::new(channel(&coordinators[1].uri()).await?);

    // K transactions on coordinator 0, all at once (its log commits them in groups).
    let defs = branches(&participants, a.mode, 64);
    let mut begins = tokio::task::JoinSet::new();
    for _ in 0..a.transactions {
        let mut c0 = c0.clone();
        let req = pb::BeginRequest {
            mode: a.mode.proto() as i32,
            branches: defs.clone(),
            deadline_ms: 3_600_000,
            retry: Some(pb::RetryPolicy {
                initial_backoff_ms: a.max_backoff_ms.clamp(1, 10),
                max_backoff_ms: a.max_backoff_ms.max(1),
                stuck_after_attempts: 0,
            }),
            wait: false,
            ..Default::default()
        };
        begins.spawn(async move { c0.begin(req).await });
    }
    let mut gids = Vec::new();
    while let Some(r) = begins.join_next().await {
        let r = r.map_err(|e| format!("a Begin task failed: {e}"))?;
        let r =
            r.map_err(|s| format!("Begin on coordinator 0: {:?}: {}", s.code(), s.message()))?;
        gids.push(r.into_inner().gid);
    }

    // None may be terminal yet: else the figure would not be a takeover.
    for gid in &gids {
        let t = get(&mut c1, gid).await?;
        if t.outcome() != pb::Outcome::Pending {
            return Err(format!(
                "transaction {gid} is {} before coordinator 0 was killed: the participants \
                 did not hold it",
                t.outcome().as_str_name()
            ));
        }
    }

    let killed_at = Instant::now();
    coordinators[0].kill();
    std::fs::write(release, b"")
        .map_err(|e| format!("cannot create {}: {e}", release.display()))?;

    let bound = Duration::from_secs_f64(a.bound);
    let (mut committed, mut aborted) = (0, 0);
    let mut first_terminal = None;
    let mut pending = gids;
    let mut last_error = None;
    loop {
        let mut still = Vec::new();
        for gid in pending {
            match get(&mut c1, &gid).await {
                Ok(t) => match t.outcome() {
                    pb::Outcome::Committed => committed += 1,
                    pb::Outcome::Aborted => aborted += 1,
                    _ => still.push(gid),
                },
                Err(e) => {
                    last_error = Some(e);
                    still.push(gid);
                }
            }
        }
        if first_terminal.is_none() && still.len() < a.transactions as usize {
            first_terminal = Some(killed_at.elapsed());
        }
        if still.is_empty() {
            break;
        }
        if killed_at.elapsed() > bound {
            return Err(format!(
                "{} of {} transactions still not terminal {:.1} s after coordinator 0 was \
                 killed (last Get error: {})",
                still.len(),
                a.transactions,
                a.bound,
                last_error.as_deref().unwrap_or("none")
            ));
        }
        pending = still;
        // A poll interval, not a synchronization: the bound above ends the loop.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all_terminal = killed_at.elapsed();
    drop(coordinators);
    drop(participants);
    Ok(Repetition {
        all_terminal,
        first_terminal: first_terminal.unwrap_or(all_terminal),
        committed,
        aborted,
    })
}

async fn get(c: &mut CoordinatorClient<Channel>, gid: &str) -> Result<pb::Transaction, String> {
    c.get(pb::GetRequest {
        gid: gid.to_string(),
    })
    .await
    .map(|r| r.into_inner())
    .map_err(|s| {
        format!(
            "Get {gid} on coordinator 1: {:?}: {}",
            s.code(),
            s.message()
        )
    })
}
