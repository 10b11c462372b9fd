//! `treaty-bench`: throughput, latency and scale figures for Treaty, measured against the bare
//! gRPC bound of the same machine at the same moment.
//!
//! Process layout (everything on 127.0.0.1, OS-assigned ports):
//!
//! ```text
//!   treaty-bench (client, C tasks)  --Begin(wait)-->  treatyd  --Prepare/Commit/Execute-->  participant 0
//!                                                              \------------------------->  participant 1 ...
//! ```
//!
//! One no-op participant process per branch index (`treaty-bench participant`), because in a
//! real deployment each branch of a transaction is a different service: treatyd then holds one
//! HTTP/2 channel per participant, as it would in production. The participants answer at once
//! and store nothing, so what is measured is the coordinator (its log, its engine, its gRPC).
//!
//! The bare gRPC bound runs in the same invocation with the same processes and concurrency:
//! the client calls the participants' `Commit` directly (a trivial unary call), spread over the
//! participants as treatyd's calls are.
//!
//! treatyd's log counters (flushes, forced writes) are read from the one line it logs at
//! shutdown (`log stats at shutdown`, JSON log format), after the bench sends SIGTERM: no new
//! API, no extra port, and the count covers the daemon's whole life, which the bench controls.
//!
//! With `--postgres --coordinators N`, `run` starts N treatyd on one PostgreSQL database
//! and sends operation i to coordinator i mod N. `takeover` measures how long the
//! transactions of a killed coordinator wait until another one has finished them.
//!
//! This file: the command line, the `run` workload, and the `parked` and `recovery` scale
//! figures.
//!
//! - [`procs`]: the bench's treatyd binary and `/proc` readings (processes are
//!   `treaty_tests::Proc`).
//! - [`participant`]: the no-op participant service.
//! - [`load`]: the closed-loop load driver and latency quantiles.
//! - [`log`]: the `log` subcommand (forced writes to the sled log, with and without sharing).
//! - [`takeover`]: the `takeover` subcommand (SIGKILL one of several coordinators of a
//!   PostgreSQL log, time until the others have finished its transactions).

mod load;
mod log;
mod participant;
mod procs;
mod takeover;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use load::{drive, LoadResult, OpResult, Workload};
use participant::Answer;
use procs::{cpu_seconds, self_cpu_seconds, status_kib};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_client::CoordinatorClient;
use treaty_proto::v1::participant_client::ParticipantClient;
use treaty_tests::{Proc, Stderr};

/// Treaty benchmark: transactions per second and latency of treatyd with no-op participants,
/// next to the bare gRPC bound measured in the same run; memory per parked transaction;
/// recovery time.
///
/// Without a subcommand, `run` is assumed: `treaty-bench --mode 2pc --json`.
/// Build in release for meaningful figures:
/// `cargo run --release -p treaty-tests --bin treaty-bench -- --mode saga`.
#[derive(Parser, Debug)]
#[command(name = "treaty-bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Throughput and latency of one workload, and the bare gRPC bound (the default).
    Run(RunArgs),
    /// Serve a no-op treaty.v1.Participant (started by the other subcommands).
    Participant(ParticipantArgs),
    /// Memory of treatyd per in-flight transaction parked in retry backoff.
    Parked(ScaleArgs),
    /// Time for treatyd to restart over many non-terminal transactions and resume them all.
    Recovery(ScaleArgs),
    /// Forced writes to the sled log one at a time and many at once: what group commit buys.
    Log(log::LogArgs),
    /// Time for the coordinators of a shared PostgreSQL log to finish the transactions of one
    /// that was SIGKILLed (its lease running out, their claim, their drive).
    Takeover(takeover::TakeoverArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Saga: steps one after the other (N+1 RPCs per transaction with Begin).
    Saga,
    /// Two-phase commit (2N+1 RPCs per transaction with Begin).
    #[value(name = "2pc")]
    TwoPc,
}

impl Mode {
    fn proto(self) -> pb::Mode {
        match self {
            Mode::Saga => pb::Mode::Saga,
            Mode::TwoPc => pb::Mode::TwoPhase,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mode::Saga => "saga",
            Mode::TwoPc => "2pc",
        }
    }
    /// RPCs per transaction: Begin, plus per branch Execute (saga) or Prepare and Commit (2PC).
    fn rpcs_per_tx(self, branches: usize) -> usize {
        match self {
            Mode::Saga => branches + 1,
            Mode::TwoPc => 2 * branches + 1,
        }
    }
}

/// How treatyd is obtained when the bench starts it.
#[derive(Args, Debug, Clone)]
struct DaemonArgs {
    /// Use this treatyd binary instead of building one (same profile as the bench).
    #[arg(long, value_name = "PATH")]
    treatyd: Option<PathBuf>,
    /// Data directory for treatyd [default: a temporary directory under target/, on the same
    /// file system as the build, deleted at the end].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Keep treatyd's log in PostgreSQL instead of sled: start a private PostgreSQL server
    /// (treaty-pg-harness: initdb into a temporary directory, fsync and synchronous_commit
    /// on) and run treatyd with `--store` on a database of it.
    #[arg(long, conflicts_with = "data_dir")]
    postgres: bool,
    /// Extra flag for treatyd (repeatable), e.g. `--treatyd-arg=--cache-bytes=16777216`.
    #[arg(long = "treatyd-arg", value_name = "ARG", allow_hyphen_values = true)]
    treatyd_args: Vec<String>,
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Transaction protocol.
    #[arg(long, value_enum, default_value = "saga")]
    mode: Mode,
    /// Branches (saga steps or 2PC participants) per transaction; one participant process each.
    #[arg(long, default_value_t = 2)]
    branches: usize,
    /// Transactions in flight (closed loop: each of C tasks submits, waits, submits again).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds of measured load (ignored with --count).
    #[arg(long, default_value_t = 10.0, value_name = "S")]
    duration: f64,
    /// Run exactly N transactions instead of a duration (the bound then makes N x RPCs/tx
    /// calls).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Bytes of payload per branch (and of compensation payload for sagas).
    #[arg(long, default_value_t = 64, value_name = "B")]
    payload_bytes: usize,
    /// Seconds of unmeasured load first (connections, caches, allocator); 0 for none.
    #[arg(long, default_value_t = 1.0, value_name = "S")]
    warmup: f64,
    /// Seconds of the bare gRPC bound phase (ignored with --count).
    #[arg(long, default_value_t = 3.0, value_name = "S")]
    bound_duration: f64,
    /// Use the treatyd at this URI instead of starting one (then treatyd's CPU, memory and
    /// flush counts are not reported). The participants must be reachable from it on
    /// 127.0.0.1.
    #[arg(long, value_name = "URI")]
    coordinator: Option<String>,
    /// Start N treatyd on the same PostgreSQL database (needs --postgres) and send
    /// transaction i to coordinator i mod N. CPU and flush counts are then the sum over the
    /// N, peak RSS the largest.
    #[arg(long, default_value_t = 1, value_name = "N")]
    coordinators: usize,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Args, Debug)]
struct ParticipantArgs {
    /// Address to serve on; port 0 picks one, printed as `listening on <addr>`.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// How Prepare/Execute are answered (phase two always answers DONE).
    #[arg(long, value_enum, default_value = "ok")]
    answer: Answer,
    /// Answer Prepare/Execute RETRY while this file does not exist, then as --answer says
    /// (a participant holding its transactions until it is released) [default: no hold].
    #[arg(long, value_name = "PATH")]
    hold_until: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct ScaleArgs {
    /// Transactions to park.
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Transaction protocol.
    #[arg(long, value_enum, default_value = "2pc")]
    mode: Mode,
    /// Branches per transaction.
    #[arg(long, default_value_t = 2)]
    branches: usize,
    /// Begin calls in flight while parking.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Bytes of payload per branch.
    #[arg(long, default_value_t = 64, value_name = "B")]
    payload_bytes: usize,
    /// `parked`: transactions parked before the baseline reading (so the baseline includes
    /// connections, buffers and caches that any load has).
    #[arg(long, default_value_t = 1_000, value_name = "N")]
    warmup_count: u64,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    daemon: DaemonArgs,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let cmd = cli.cmd.unwrap_or(Cmd::Run(cli.run));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("treaty-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = match cmd {
        Cmd::Participant(a) => rt.block_on(participant::serve(a.listen, a.answer, a.hold_until)),
        Cmd::Run(a) => rt.block_on(run(a)),
        Cmd::Parked(a) => rt.block_on(parked(a)),
        Cmd::Recovery(a) => rt.block_on(recovery(a)),
        Cmd::Log(a) => rt.block_on(log::run(a)),
        Cmd::Takeover(a) => rt.block_on(takeover::run(a)),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("treaty-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// treatyd's log filter: quiet, except the two info lines the bench reads (`resumed` from
/// the server when recovery is done, `log stats at shutdown` from the runtime).
const TREATYD_LOG_LEVEL: &str =
    "warn,treaty_coordinator::server=info,treaty_coordinator::runtime=info";

/// Where the bench keeps treatyd's binary and data: a temporary directory under `target/`
/// (a real disk, like the build, rather than a possible tmpfs under /tmp, where an fsync
/// costs nothing), or `--data-dir`.
struct Workspace {
    tmp: tempfile::TempDir,
    bin: PathBuf,
    data_dir: PathBuf,
    /// With `--postgres`: the server (stopped on drop) and the URL treatyd's log uses.
    postgres: Option<(treaty_pg_harness::PgServer, String)>,
}

fn workspace(d: &DaemonArgs) -> Result<Workspace, String> {
    let base = treaty_tests::workspace_root()
        .join("target")
        .join("treaty-bench");
    std::fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    let tmp = tempfile::tempdir_in(&base).map_err(|e| {
        format!(
            "cannot create a temporary directory in {}: {e}",
            base.display()
        )
    })?;
    let bin = match &d.treatyd {
        Some(p) => p.clone(),
        None => procs::build_treatyd(tmp.path())?,
    };
    let data_dir = d
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().join("data"));
    let postgres = if d.postgres {
        let server = treaty_pg_harness::PgServer::start_with(Default::default())
            .map_err(|e| format!("--postgres: cannot start PostgreSQL: {e}"))?;
        let url = server
            .create_database("treaty_bench")
            .map_err(|e| format!("--postgres: {e}"))?;
        Some((server, url))
    } else {
        None
    };
    Ok(Workspace {
        tmp,
        bin,
        data_dir,
        postgres,
    })
}

fn start_treatyd(ws: &Workspace, extra: &[String]) -> Result<Proc, String> {
    start_treatyd_named("treatyd", ws, extra)
}

/// [`start_treatyd`] under a name of its own (for its echoed log lines), one of several
/// treatyd on the workspace's PostgreSQL database.
fn start_treatyd_named(name: &str, ws: &Workspace, extra: &[String]) -> Result<Proc, String> {
    match &ws.postgres {
        Some((_, url)) => spawn_treatyd(name, &ws.bin, "--store", url.as_ref(), extra),
        None => spawn_treatyd(name, &ws.bin, "--data-dir", ws.data_dir.as_os_str(), extra),
    }
}

/// Start treatyd `bin` with its log at `--store <url>` or `--data-dir <dir>` (`store_flag`).
fn spawn_treatyd(
    name: &str,
    bin: &Path,
    store_flag: &str,
    store: &std::ffi::OsStr,
    extra: &[String],
) -> Result<Proc, String> {
    let mut cmd = Command::new(bin);
    cmd.arg("--listen")
        .arg("127.0.0.1:0")
        .arg(store_flag)
        .arg(store)
        .arg("--log-format")
        .arg("json")
        .arg("--log-level")
        .arg(TREATYD_LOG_LEVEL)
        .args(extra);
    Proc::spawn_with(name, cmd, Duration::from_secs(120), Stderr::Keep)
}

/// Start `n` no-op participants answering `answer` (held until `hold_until` exists, if
/// given).
fn start_participants(
    n: usize,
    answer: Answer,
    hold_until: Option<&Path>,
) -> Result<Vec<Proc>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find our own binary: {e}"))?;
    (0..n)
        .map(|i| {
            let mut cmd = Command::new(&exe);
            cmd.arg("participant")
                .arg("--listen")
                .arg("127.0.0.1:0")
                .arg("--answer")
                .arg(answer.to_possible_value().expect("named").get_name());
            if let Some(p) = hold_until {
                cmd.arg("--hold-until").arg(p);
            }
            Proc::spawn_with(
                &format!("participant-{i}"),
                cmd,
                Duration::from_secs(30),
                Stderr::Keep,
            )
        })
        .collect()
}

async fn channel(uri: &str) -> Result<Channel, String> {
    Endpoint::from_shared(uri.to_string())
        .map_err(|e| format!("bad URI {uri:?}: {e}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {uri}: {e}"))
}

/// The counters treatyd logs when it shuts down.
#[derive(Default, Debug, Clone, Copy)]
struct LogStats {
    writes: u64,
    forced_writes: u64,
    flushes: u64,
}

/// SIGTERM treatyd and read its `log stats at shutdown` line.
fn stop_treatyd(t: &mut Proc) -> Result<LogStats, String> {
    if t.terminate(Duration::from_secs(60)).is_none() {
        return Err("treatyd did not exit within 60 s of SIGTERM".into());
    }
    let (_, line) = t
        .wait_line(Duration::from_secs(2), |l| {
            l.contains("log stats at shutdown")
        })
        .ok_or("treatyd exited without logging `log stats at shutdown`")?;
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("bad stats line {line:?}: {e}"))?;
    let field = |k: &str| {
        v["fields"][k]
            .as_u64()
            .ok_or_else(|| format!("stats line has no {k}: {line}"))
    };
    Ok(LogStats {
        writes: field("writes")?,
        forced_writes: field("forced_writes")?,
        flushes: field("flushes")?,
    })
}

fn payload(bytes: usize) -> Bytes {
    use rand::RngCore;
    let mut v = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut v);
    Bytes::from(v)
}

fn branches(participants: &[Proc], mode: Mode, payload_bytes: usize) -> Vec<pb::Branch> {
    let p = payload(payload_bytes);
    participants
        .iter()
        .map(|part| pb::Branch {
            endpoint: part.uri(),
            handler: "noop".into(),
            payload: p.clone(),
            // Only saga steps have compensations (2PC refuses one).
            compensation_payload: match mode {
                Mode::Saga => p.clone(),
                Mode::TwoPc => Bytes::new(),
            },
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// run

async fn run(a: RunArgs) -> Result<(), String> {
    if a.branches == 0 || a.concurrency == 0 {
        return Err("--branches and --concurrency must be at least 1".into());
    }
    if a.coordinators == 0 {
        return Err("--coordinators must be at least 1".into());
    }
    if a.coordinators > 1 && a.coordinator.is_some() {
        return Err(format!(
            "--coordinators {} starts its own coordinators: it cannot be combined with \
             --coordinator",
            a.coordinators
        ));
    }
    if a.coordinators > 1 && !a.daemon.postgres {
        return Err(format!(
            "--coordinators {} needs --postgres: several treatyd share one log only in \
             PostgreSQL (a sled log belongs to one process)",
            a.coordinators
        ));
    }
    let rpcs_per_tx = a.mode.rpcs_per_tx(a.branches);
    let (ws, mut treatyds) = match &a.coordinator {
        Some(_) => (None, Vec::new()),
        None => {
            let ws = workspace(&a.daemon)?;
            let mut ts = Vec::new();
            for i in 0..a.coordinators {
                let name = match a.coordinators {
                    1 => "treatyd".to_string(),
                    _ => format!("treatyd-{i}"),
                };
                ts.push(start_treatyd_named(&name, &ws, &a.daemon.treatyd_args)?);
            }
            (Some(ws), ts)
        }
    };
    let coord_uris: Vec<String> = match &a.coordinator {
        Some(u) => vec![u.clone()],
        None => treatyds.iter().map(|t| t.uri()).collect(),
    };
    let participants = start_participants(a.branches, Answer::Ok, None)?;
    let mut coordinators = Vec::new();
    for uri in &coord_uris {
        coordinators.push(CoordinatorClient::new(channel(uri).await?));
    }
    let defs = branches(&participants, a.mode, a.payload_bytes);
    let quiet = false;

    let begin = {
        let (clients, defs, mode) = (coordinators.clone(), defs.clone(), a.mode.proto());
        move |i: u64| {
            // Operation i goes to coordinator i mod N: an even spread, whatever the number
            // of load tasks.
            let mut client = clients[(i % clients.len() as u64) as usize].clone();
            let req = pb::BeginRequest {
                mode: mode as i32,
                branches: defs.clone(),
                wait: true,
                wait_timeout_ms: 30_000,
                ..Default::default()
            };
            async move {
                match client.begin(req).await {
                    Ok(r) => match r.into_inner().outcome() {
                        pb::Outcome::Committed => OpResult::Ok,
                        o => OpResult::Other(format!("outcome {}", o.as_str_name())),
                    },
                    Err(s) => OpResult::Err(format!("Begin: {:?}: {}", s.code(), s.message())),
                }
            }
        }
    };

    let mut committed_total = 0u64;
    if a.warmup > 0.0 {
        let w = drive(
            "warmup",
            a.concurrency,
            Workload::For(Duration::from_secs_f64(a.warmup)),
            quiet,
            begin.clone(),
        )
        .await;
        committed_total += w.ok;
    }

    let work = match a.count {
        Some(n) => Workload::Count(n),
        None => Workload::For(Duration::from_secs_f64(a.duration)),
    };
    let pids: Vec<u32> = participants.iter().map(|p| p.pid()).collect();
    let treatyd_pids: Vec<u32> = treatyds.iter().map(|t| t.pid()).collect();
    let cpu_before = cpu_snapshot(&treatyd_pids, &pids);
    let main = drive(a.mode.name(), a.concurrency, work, quiet, begin).await;
    let cpu_after = cpu_snapshot(&treatyd_pids, &pids);
    committed_total += main.ok;
    if main.ok == 0 {
        return Err(format!(
            "no transaction committed ({} other, {} errors; first: {})",
            main.other,
            main.errors,
            main.first_problem.as_deref().unwrap_or("none")
        ));
    }

    // The bare gRPC bound: the same client process, concurrency and participant processes,
    // each operation one trivial unary call (Commit answers DONE at once).
    let mut pclients = Vec::new();
    for p in &participants {
        pclients.push(ParticipantClient::new(channel(&p.uri()).await?));
    }
    let bound_work = match a.count {
        Some(n) => Workload::Count(n * rpcs_per_tx as u64),
        None => Workload::For(Duration::from_secs_f64(a.bound_duration)),
    };
    let bound_payload = payload(a.payload_bytes);
    let bound = drive("grpc bound", a.concurrency, bound_work, quiet, move |i| {
        let n = pclients.len() as u64;
        let mut client = pclients[(i % n) as usize].clone();
        let req = pb::BranchRequest {
            gid: "bench".into(),
            branch_id: (i % n) as u32,
            handler: "noop".into(),
            payload: bound_payload.clone(),
            attempt: 1,
            deadline_unix_ms: 0,
            ..Default::default()
        };
        async move {
            match client.commit(req).await {
                Ok(r) if r.get_ref().result() == pb::PhaseTwoResult::Done => OpResult::Ok,
                Ok(r) => OpResult::Other(format!("{:?}", r.get_ref().result())),
                Err(s) => OpResult::Err(format!("Commit: {:?}: {}", s.code(), s.message())),
            }
        }
    })
    .await;

    let peak_rss = treatyd_pids
        .iter()
        .map(|p| status_kib(*p, "VmHWM"))
        .collect::<Option<Vec<u64>>>()
        .and_then(|v| v.into_iter().max());
    let mut each = Vec::new();
    for t in treatyds.iter_mut() {
        each.push(stop_treatyd(t)?);
    }
    let stats = (!each.is_empty()).then(|| LogStats {
        writes: each.iter().map(|s| s.writes).sum(),
        forced_writes: each.iter().map(|s| s.forced_writes).sum(),
        flushes: each.iter().map(|s| s.flushes).sum(),
    });
    drop(participants);
    drop(ws);

    let tx_per_s = main.ok_per_s();
    let rpc_bound_per_s = bound.ok_per_s();
    let rpc_ratio = tx_per_s * rpcs_per_tx as f64 / rpc_bound_per_s.max(1e-9);
    let flushes_per_tx = stats.map(|s| s.flushes as f64 / committed_total.max(1) as f64);
    let cpu = cpu_after.minus(&cpu_before);
    let command = reproduce(&a);
    let report = serde_json::json!({
        "mode": a.mode.name(),
        "log": if a.daemon.postgres { "postgres" } else { "sled" },
        "coordinators": coord_uris.len(),
        "branches": a.branches,
        "concurrency": a.concurrency,
        "payload_bytes": a.payload_bytes,
        "committed": main.ok,
        "not_committed": main.other,
        "errors": main.errors,
        "first_problem": main.first_problem,
        "elapsed_s": round3(main.elapsed.as_secs_f64()),
        "tx_per_s": round1(tx_per_s),
        "p50_ms": round3(main.quantile_ms(0.50)),
        "p95_ms": round3(main.quantile_ms(0.95)),
        "p99_ms": round3(main.quantile_ms(0.99)),
        "max_ms": round3(main.quantile_ms(1.0)),
        "rpcs_per_tx": rpcs_per_tx,
        "rpc_bound_per_s": round1(rpc_bound_per_s),
        "rpc_bound_p99_ms": round3(bound.quantile_ms(0.99)),
        "rpc_ratio": round3(rpc_ratio),
        "flushes_per_tx": flushes_per_tx.map(round3),
        "log_flushes": stats.map(|s| s.flushes),
        "log_forced_writes": stats.map(|s| s.forced_writes),
        "log_writes": stats.map(|s| s.writes),
        "log_writes_per_coordinator": each.iter().map(|s| s.writes).collect::<Vec<_>>(),
        "committed_in_treatyd_life": committed_total,
        "treatyd_cpu_s": cpu.treatyd.map(round3),
        "participants_cpu_s": cpu.participants.iter().map(|c| c.map(round3)).collect::<Vec<_>>(),
        "bench_cpu_s": round3(cpu.bench),
        "cpu_s_per_tx_treatyd_us": cpu.treatyd.map(|c| round1(c * 1e6 / main.ok as f64)),
        "treatyd_peak_rss_kib": peak_rss,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "command": command,
    });
    if a.json {
        println!("{report}");
    } else {
        print_run(&report);
    }
    Ok(())
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

struct Cpu {
    treatyd: Option<f64>,
    participants: Vec<Option<f64>>,
    bench: f64,
}

impl Cpu {
    fn minus(&self, before: &Cpu) -> Cpu {
        let sub = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        Cpu {
            treatyd: sub(self.treatyd, before.treatyd),
            participants: self
                .participants
                .iter()
                .zip(&before.participants)
                .map(|(a, b)| sub(*a, *b))
                .collect(),
            bench: self.bench - before.bench,
        }
    }
}

/// CPU seconds so far; `treatyd` is the sum over the `treatyds` (none when there are none).
fn cpu_snapshot(treatyds: &[u32], participants: &[u32]) -> Cpu {
    Cpu {
        treatyd: match treatyds {
            [] => None,
            pids => pids.iter().map(|p| cpu_seconds(*p)).sum::<Option<f64>>(),
        },
        participants: participants.iter().map(|p| cpu_seconds(*p)).collect(),
        bench: self_cpu_seconds(),
    }
}

/// The command line that repeats this run, every option spelled out.
fn reproduce(a: &RunArgs) -> String {
    let mut s = String::from("cargo run");
    if !cfg!(debug_assertions) {
        s.push_str(" --release");
    }
    s.push_str(" -p treaty-tests --bin treaty-bench -- run");
    s.push_str(&format!(
        " --mode {} --branches {} --concurrency {}",
        a.mode.name(),
        a.branches,
        a.concurrency
    ));
    match a.count {
        Some(n) => s.push_str(&format!(" --count {n}")),
        None => s.push_str(&format!(
            " --duration {} --bound-duration {}",
            a.duration, a.bound_duration
        )),
    }
    s.push_str(&format!(
        " --payload-bytes {} --warmup {}",
        a.payload_bytes, a.warmup
    ));
    if let Some(c) = &a.coordinator {
        s.push_str(&format!(" --coordinator {c}"));
    }
    if a.daemon.postgres {
        s.push_str(" --postgres");
    }
    if a.coordinators != 1 {
        s.push_str(&format!(" --coordinators {}", a.coordinators));
    }
    for t in &a.daemon.treatyd_args {
        s.push_str(&format!(" --treatyd-arg={t}"));
    }
    if a.json {
        s.push_str(" --json");
    }
    s
}

fn print_run(r: &serde_json::Value) {
    let f = |k: &str| r[k].to_string();
    println!(
        "treaty-bench: {} on a {} log, {} coordinator(s), with {} branches, {} in flight, {} \
         cores",
        r["mode"].as_str().unwrap_or("?"),
        r["log"].as_str().unwrap_or("?"),
        f("coordinators"),
        f("branches"),
        f("concurrency"),
        f("cores")
    );
    println!(
        "  transactions     {} committed in {} s ({} not committed, {} errors): {} tx/s",
        f("committed"),
        f("elapsed_s"),
        f("not_committed"),
        f("errors"),
        f("tx_per_s")
    );
    if let Some(p) = r["first_problem"].as_str() {
        println!("  first problem    {p}");
    }
    println!(
        "  latency (ms)     p50 {}  p95 {}  p99 {}  max {}",
        f("p50_ms"),
        f("p95_ms"),
        f("p99_ms"),
        f("max_ms")
    );
    println!(
        "  gRPC bound       {} calls/s (p99 {} ms); {} RPCs/tx: rpc_ratio {}",
        f("rpc_bound_per_s"),
        f("rpc_bound_p99_ms"),
        f("rpcs_per_tx"),
        f("rpc_ratio")
    );
    println!(
        "  CPU seconds      treatyd {}, participants {}, bench {} (treatyd {} us/tx)",
        f("treatyd_cpu_s"),
        f("participants_cpu_s"),
        f("bench_cpu_s"),
        f("cpu_s_per_tx_treatyd_us")
    );
    println!(
        "  log              {} flushes per committed tx ({} flushes, {} forced writes, {} \
         writes, {} committed over treatyd's life)",
        f("flushes_per_tx"),
        f("log_flushes"),
        f("log_forced_writes"),
        f("log_writes"),
        f("committed_in_treatyd_life")
    );
    println!(
        "  treatyd memory   peak RSS {} KiB{}",
        f("treatyd_peak_rss_kib"),
        if r["coordinators"].as_u64().unwrap_or(1) > 1 {
            " (the largest of the coordinators)"
        } else {
            ""
        }
    );
    if r["coordinators"].as_u64().unwrap_or(1) > 1 {
        println!(
            "  per coordinator  log writes {}",
            f("log_writes_per_coordinator")
        );
    }
    println!("  reproduce        {}", r["command"].as_str().unwrap_or(""));
}

// ---------------------------------------------------------------------------------------------
// parked and recovery

/// treatyd flags for the scale runs: a short shutdown grace (the parked transactions would
/// not finish anyway).
fn scale_treatyd_args(a: &ScaleArgs) -> Vec<String> {
    let mut v = vec!["--shutdown-grace-ms".to_string(), "200".to_string()];
    v.extend(a.daemon.treatyd_args.iter().cloned());
    v
}

/// Begin `n` transactions (without wait) whose participants answer RETRY: each is durably
/// recorded, its first call answered RETRY, and it then sits in a 10-minute backoff with a
/// 1-hour deadline: an in-flight transaction waiting on a participant that cannot answer yet.
async fn park(
    label: &str,
    coordinator: &CoordinatorClient<Channel>,
    defs: &[pb::Branch],
    mode: Mode,
    n: u64,
    concurrency: usize,
) -> Result<LoadResult, String> {
    let (client, defs) = (coordinator.clone(), defs.to_vec());
    let begin = move |_i: u64| {
        let mut client = client.clone();
        let req = pb::BeginRequest {
            mode: mode.proto() as i32,
            branches: defs.clone(),
            deadline_ms: 3_600_000,
            retry: Some(pb::RetryPolicy {
                initial_backoff_ms: 600_000,
                max_backoff_ms: 600_000,
                stuck_after_attempts: 0,
            }),
            wait: false,
            ..Default::default()
        };
        async move {
            match client.begin(req).await {
                Ok(_) => OpResult::Ok,
                Err(s) => OpResult::Err(format!("Begin: {:?}: {}", s.code(), s.message())),
            }
        }
    };
    let r = drive(label, concurrency, Workload::Count(n), false, begin).await;
    if r.ok != n {
        return Err(format!(
            "only {} of {n} transactions were begun; first problem: {}",
            r.ok,
            r.first_problem.as_deref().unwrap_or("none")
        ));
    }
    Ok(r)
}

/// Wait until treatyd's RSS stops moving (the parked transactions' first calls answered and
/// their timers set): less than 0.5% change over one second, bounded by `bound`.
async fn settled_rss(pid: u32, bound: Duration) -> Option<u64> {
    let start = Instant::now();
    let mut last = status_kib(pid, "VmRSS")?;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = status_kib(pid, "VmRSS")?;
        if now.abs_diff(last) * 200 < last || start.elapsed() > bound {
            return Some(now);
        }
        last = now;
    }
}

async fn parked(a: ScaleArgs) -> Result<(), String> {
    let ws = workspace(&a.daemon)?;
    let treatyd = start_treatyd(&ws, &scale_treatyd_args(&a))?;
    let participants = start_participants(a.branches, Answer::Retry, None)?;
    let coordinator = CoordinatorClient::new(channel(&treatyd.uri()).await?);
    let defs = branches(&participants, a.mode, a.payload_bytes);
    let pid = treatyd.pid();

    if a.warmup_count > 0 {
        park(
            "warmup",
            &coordinator,
            &defs,
            a.mode,
            a.warmup_count,
            a.concurrency,
        )
        .await?;
    }
    let before = settled_rss(pid, Duration::from_secs(30))
        .await
        .ok_or("cannot read treatyd's RSS")?;
    let r = park(
        "parking",
        &coordinator,
        &defs,
        a.mode,
        a.count,
        a.concurrency,
    )
    .await?;
    let after = settled_rss(pid, Duration::from_secs(60))
        .await
        .ok_or("cannot read treatyd's RSS")?;
    let hwm = status_kib(pid, "VmHWM");
    let per_tx = (after as f64 - before as f64) / a.count.max(1) as f64;
    let report = serde_json::json!({
        "mode": a.mode.name(),
        "branches": a.branches,
        "parked": a.count,
        "payload_bytes": a.payload_bytes,
        "begin_per_s": round1(r.ok_per_s()),
        "treatyd_rss_before_kib": before,
        "treatyd_rss_after_kib": after,
        "treatyd_peak_rss_kib": hwm,
        "kib_per_parked_tx": round3(per_tx),
        "command": format!(
            "cargo run{} -p treaty-tests --bin treaty-bench -- parked --count {} --mode {} \
             --branches {} --concurrency {} --payload-bytes {} --warmup-count {}{}",
            if cfg!(debug_assertions) { "" } else { " --release" },
            a.count, a.mode.name(), a.branches, a.concurrency, a.payload_bytes,
            a.warmup_count, if a.json { " --json" } else { "" }
        ),
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "treaty-bench parked: {} {} transactions ({} branches) in retry backoff",
            a.count,
            a.mode.name(),
            a.branches
        );
        println!(
            "  treatyd RSS      {before} KiB before, {after} KiB after (peak {})",
            report["treatyd_peak_rss_kib"]
        );
        println!("  per parked tx    {per_tx:.3} KiB");
        println!("  begin rate       {:.0}/s (no wait)", r.ok_per_s());
        println!(
            "  reproduce        {}",
            report["command"].as_str().unwrap_or("")
        );
    }
    // A clean stop (not SIGKILL), so a treatyd run under a profiler writes its report.
    let mut treatyd = treatyd;
    treatyd.terminate(Duration::from_secs(30));
    drop(participants);
    drop(ws);
    Ok(())
}

async fn recovery(a: ScaleArgs) -> Result<(), String> {
    let ws = workspace(&a.daemon)?;
    let args = scale_treatyd_args(&a);
    let mut treatyd = start_treatyd(&ws, &args)?;
    let participants = start_participants(a.branches, Answer::Retry, None)?;
    {
        let coordinator = CoordinatorClient::new(channel(&treatyd.uri()).await?);
        let defs = branches(&participants, a.mode, a.payload_bytes);
        park(
            "parking",
            &coordinator,
            &defs,
            a.mode,
            a.count,
            a.concurrency,
        )
        .await?;
    }
    stop_treatyd(&mut treatyd)?;
    drop(treatyd);
    let data_bytes = dir_bytes(&ws.data_dir);

    // The restart: from spawn until treatyd logs that recovery is complete (`resumed=N`,
    // logged after every non-terminal record has been read and its driver started, before
    // the first request is served).
    let t = start_treatyd(&ws, &args)?;
    let (resumed_at, line) = t
        .wait_line(Duration::from_secs(600), |l| l.contains("\"resumed\""))
        .ok_or("treatyd did not report `resumed` within 600 s")?;
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("bad line {line:?}: {e}"))?;
    let resumed = v["fields"]["resumed"].as_u64().unwrap_or(0);
    let to_listen = (t.listening_at - t.spawned_at).as_secs_f64();
    let to_resumed = (resumed_at - t.spawned_at).as_secs_f64();
    let rss = status_kib(t.pid(), "VmRSS");
    let report = serde_json::json!({
        "mode": a.mode.name(),
        "branches": a.branches,
        "non_terminal": a.count,
        "resumed": resumed,
        "recovery_s": round3(to_resumed),
        "open_s": round3(to_listen),
        "log_bytes": data_bytes,
        "treatyd_rss_after_recovery_kib": rss,
        "command": format!(
            "cargo run{} -p treaty-tests --bin treaty-bench -- recovery --count {} --mode {} \
             --branches {} --concurrency {} --payload-bytes {}{}",
            if cfg!(debug_assertions) { "" } else { " --release" },
            a.count, a.mode.name(), a.branches, a.concurrency, a.payload_bytes,
            if a.json { " --json" } else { "" }
        ),
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "treaty-bench recovery: restart over {} non-terminal {} transactions ({} bytes of \
             log)",
            a.count,
            a.mode.name(),
            data_bytes
        );
        println!("  log opened       {to_listen:.3} s after spawn");
        println!("  all resumed      {to_resumed:.3} s after spawn ({resumed} resumed)");
        println!(
            "  reproduce        {}",
            report["command"].as_str().unwrap_or("")
        );
    }
    if resumed != a.count {
        return Err(format!("resumed {resumed}, expected {}", a.count));
    }
    drop(t);
    drop(participants);
    drop(ws);
    Ok(())
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
