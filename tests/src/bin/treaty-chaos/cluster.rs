//! The processes under test and the faults done to them.
//!
//! ```text
//!  workers ──Begin/Get──▶ treatyd ──▶ proxy 0 ──▶ bank-account 0   (own sled store)
//!                            │   ───▶ proxy 1 ──▶ bank-account 1
//!                            │   ───▶ proxy 2 ──▶ bank-account 2
//!                            ◀── Outcome (in-doubt resolver, direct) ──┘
//! ```
//!
//! Every process is a real child process on 127.0.0.1, restartable on the same address and
//! data directory, killed (SIGKILL) when the cluster is dropped. The nemesis runs on a plain
//! thread with its own RNG, seeded from the run's seed.
//!
//! [`Options`] add modes: sync failures (treatyd, and bank instances, restarted with a sync
//! failpoint that must make them fail-stop, or with a burst of transient EMFILE they must
//! ride out), retention (treatyd collects finished records after a second), and power cuts
//! (treatyd's and bank 0's data directories on treaty-lazyfs mounts; both are SIGKILLed and
//! lose every unsynced write), and PostgreSQL ([`PgMode`]).
//!
//! # The PostgreSQL mode
//!
//! ```text
//!  workers ──▶ treatyd --store postgres://…/treaty_log ──▶ proxy i ──▶ bank-account i
//!                                   │                                  --store postgres://…/bank_i
//!                                   └────────── one PostgreSQL server (ours) ──┘
//! ```
//!
//! The runner starts its own PostgreSQL server (treaty-pg-harness: initdb into the run's
//! directory, a free port, fsync on unless `--pg-fsync-off`), one database for the
//! coordinator's log and one per bank instance. The nemesis adds: SIGKILL of the whole server
//! (postmaster and backends at once) and its restart after up to 1.5 s, a pause of the whole
//! server (SIGSTOP, then SIGCONT after 0.3 to 3 s), and a pause of treatyd (SIGSTOP/SIGCONT).
//! After a server kill, every process that exited meanwhile (a coordinator that fail-stopped
//! on a lost log write) is started again and counted. With `--coordinators N` (N > 1), N
//! treatyd share the one log database (see `owners.rs`): the nemesis kills and pauses any one
//! of them, and the checker reads the log's ownership history.

use super::workload::Account;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use treaty_lazyfs::LazyFs;
use treaty_tests::proxy::{Fault, Proxy};
use treaty_tests::{BankAccount, Treatyd};

/// The modes beyond the base campaign (all off: the base campaign).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Restart treatyd and bank instances with sync failpoints armed (fail-stop, EMFILE).
    pub sync_faults: bool,
    /// treatyd collects finished records after 1 s; the workload reuses finished gids.
    pub retention: bool,
    /// treatyd's and bank 0's data on treaty-lazyfs; the nemesis cuts the power.
    pub power_cut: bool,
    /// FAILPOINTS for every treatyd start not arming its own (tests of the checker).
    pub treatyd_failpoints: Option<String>,
    /// Run treatyd and bank-account built with `mutation-skip-fdatasync` (a broken SledSync
    /// the power-cut mode must catch).
    pub skip_fdatasync_mutant: bool,
    /// Run on PostgreSQL (the log and every bank), with the PostgreSQL nemeses.
    pub postgres: Option<PgMode>,
    /// Run bank-account built with `mutation-abort-keeps-prepared` (an abort that leaves its
    /// prepared transaction in PostgreSQL), which the PostgreSQL mode's check must catch.
    pub abort_keeps_prepared_mutant: bool,
}

/// The PostgreSQL mode's settings.
#[derive(Clone, Debug)]
pub struct PgMode {
    /// The server's `fsync` (on by default; off only for speed: the nemesis kills processes,
    /// not the machine).
    pub fsync: bool,
    /// Coordinators on the one log database (each with a short lease when more than one,
    /// see `owners.rs`).
    pub coordinators: usize,
    /// Checker tests only: the nemesis only freezes coordinator 0 past its lease, until
    /// another coordinator has taken its transactions over, again and again (`owners.rs`).
    pub pause_past_lease: bool,
}

/// The name of the coordinator's log database in the PostgreSQL mode.
pub const PG_LOG_DB: &str = "treaty_log";

/// The bank instance whose data directory is on a lazyfs mount in the power-cut mode.
const POWER_CUT_BANK: usize = 0;

/// Every named crash point of treatyd; the nemesis arms them in turn.
pub const FAILPOINTS: [&str; 5] = [
    "treaty::after_begun_durable",
    "treaty::after_some_phase_one_replies",
    "treaty::after_decision_durable",
    "treaty::between_phase_two_calls",
    "treaty::before_ended",
];

/// treatyd's settings for the run: short timeouts and backoffs, so that the system converges
/// quickly once a fault ends (the defaults are minutes-scale for production).
const TREATYD_ARGS: [&str; 10] = [
    "--call-timeout-ms",
    "1000",
    "--initial-backoff-ms",
    "20",
    "--max-backoff-ms",
    "500",
    "--default-wait-ms",
    "3000",
    "--shutdown-grace-ms",
    "1000",
];

pub struct Cluster {
    pub treatyd: Mutex<Treatyd>,
    pub treatyd_uri: String,
    /// PostgreSQL mode with `--coordinators N`: coordinators 1..N on the same log
    /// (coordinator 0 is `treatyd`).
    pub others: Vec<Mutex<Treatyd>>,
    pub banks: Vec<Mutex<BankAccount>>,
    /// Each instance's own address (for balances and barrier rows: never through a proxy).
    pub bank_uris: Vec<String>,
    /// Branch endpoints: instance `i` is reached through `proxies[i]`.
    pub proxies: Vec<Proxy>,
    pub accounts: Vec<Account>,
    pub openings: BTreeMap<Account, i64>,
    pub opts: Options,
    /// PostgreSQL mode: the URLs of the bank databases (bank `i` on `bank_{i}`).
    pub bank_dbs: Vec<String>,
    /// PostgreSQL mode: the URL of the coordinator's log database.
    pub log_db: Option<String>,
    /// PostgreSQL mode: the server. Declared after the processes that use it, so that they
    /// are killed (dropped) before it stops.
    pub pg: Option<Mutex<treaty_pg_harness::PgServer>>,
    /// Power-cut mode: treatyd's mount, then bank 0's. Declared last so that the processes
    /// using them are killed (dropped) before they are unmounted.
    mounts: Vec<LazyFs>,
}

impl Cluster {
    /// Start treatyd and `instances` bank accounts of `per_instance` accounts each under
    /// `dir`, and a proxy in front of every bank (its tasks run on `rt`). Blocks while the
    /// processes start: call it from outside the runtime's tasks.
    pub fn start(
        rt: &tokio::runtime::Handle,
        dir: &Path,
        instances: usize,
        per_instance: usize,
        opening: i64,
        opts: &Options,
    ) -> Result<Cluster, String> {
        // Private copies of the binaries: a campaign outlives builds, and a build of the
        // workspace meanwhile (e.g. `cargo build --release`, which compiles treatyd without
        // failpoints) would otherwise swap a different treatyd in under the runner.
        let bin = dir.join("bin");
        let copy = |from: PathBuf| treaty_tests::private_copy(&from, &bin);
        if let Some(m) = &opts.postgres {
            if m.coordinators == 0 {
                return Err("--coordinators must be at least 1".into());
            }
            if opts.power_cut || opts.sync_faults || opts.skip_fdatasync_mutant {
                return Err(
                    "--postgres cannot be combined with --power-cut, --sync-faults or \
                     --skip-fdatasync-mutant (they fault sled's files, which this mode does \
                     not use)"
                        .into(),
                );
            }
        } else if opts.abort_keeps_prepared_mutant {
            return Err("--abort-keeps-prepared-mutant needs --postgres".into());
        }
        let (treatyd_bin, bank_bin) = if opts.abort_keeps_prepared_mutant {
            (
                treaty_tests::treatyd_bin(),
                treaty_tests::bank_account_bin_with("mutation-abort-keeps-prepared"),
            )
        } else if opts.skip_fdatasync_mutant {
            (
                treaty_tests::binary(
                    "treaty-coordinator",
                    "treatyd",
                    "failpoints mutation-skip-fdatasync",
                ),
                treaty_tests::bank_account_bin_with("failpoints mutation-skip-fdatasync"),
            )
        } else if opts.sync_faults {
            (
                treaty_tests::treatyd_bin(),
                treaty_tests::bank_account_bin_with("failpoints"),
            )
        } else {
            (
                treaty_tests::treatyd_bin(),
                treaty_tests::bank_account_bin(),
            )
        };
        let treatyd_bin = copy(treatyd_bin)?;
        let bank_bin = copy(bank_bin)?;
        // Power-cut mode: a lazyfs mount for treatyd's data and one for bank 0's.
        let mut mounts = Vec::new();
        if opts.power_cut {
            let lazyfs = treaty_tests::lazyfs_bin();
            for name in ["treatyd", &format!("bank{POWER_CUT_BANK}")] {
                let backing = dir.join(format!("{name}.backing"));
                let mnt = dir.join(name);
                for d in [&backing, &mnt] {
                    std::fs::create_dir_all(d)
                        .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
                }
                mounts.push(
                    LazyFs::mount_with(&lazyfs, &backing, &mnt)
                        .map_err(|e| format!("power-cut mode: {e}"))?,
                );
            }
        }
        // PostgreSQL mode: our own server, the log's database and one per bank.
        let mut pg = None;
        let mut log_db = None;
        let mut bank_dbs = Vec::new();
        if let Some(m) = &opts.postgres {
            let server = treaty_pg_harness::PgServer::start_with(treaty_pg_harness::PgOptions {
                fsync: m.fsync,
                ..Default::default()
            })
            .map_err(|e| format!("PostgreSQL mode: cannot start PostgreSQL: {e}"))?;
            let db = |name: &str| {
                server
                    .create_database(name)
                    .map_err(|e| format!("PostgreSQL mode: {e}"))
            };
            log_db = Some(db(PG_LOG_DB)?);
            for i in 0..instances {
                bank_dbs.push(db(&format!("bank_{i}"))?);
            }
            pg = Some(server);
        }
        let mut args: Vec<&str> = TREATYD_ARGS.to_vec();
        if opts.retention {
            args.extend(["--retention-secs", "1", "--gc-interval-secs", "1"]);
        }
        if let Some(url) = &log_db {
            args.extend(["--store", url]);
        }
        let coordinators = opts.postgres.as_ref().map_or(1, |m| m.coordinators);
        if coordinators > 1 {
            args.extend(super::owners::SHARED_LOG_ARGS);
        }
        let env: Vec<(&str, &str)> = opts
            .treatyd_failpoints
            .as_deref()
            .map(|f| ("FAILPOINTS", f))
            .into_iter()
            .collect();
        let treatyd = Treatyd::start_from(treatyd_bin.clone(), &dir.join("treatyd"), &args, &env)?;
        let treatyd_uri = treatyd.uri();
        let others = super::owners::start_others(&treatyd_bin, dir, coordinators, &args, &env)?;
        let coordinator_uris = super::owners::uris(&treatyd_uri, &others);
        let mut banks = Vec::new();
        let mut bank_uris = Vec::new();
        let mut proxies = Vec::new();
        let mut accounts = Vec::new();
        let mut openings = BTreeMap::new();
        for i in 0..instances {
            let names: Vec<String> = (0..per_instance).map(|a| format!("i{i}a{a}")).collect();
            let spec = names
                .iter()
                .map(|n| format!("{n}={opening}"))
                .collect::<Vec<_>>()
                .join(",");
            // Several coordinators: banks ask them round robin (any one answers Outcome).
            let coordinator = &coordinator_uris[i % coordinator_uris.len()];
            let bank = match bank_dbs.get(i) {
                Some(url) => {
                    BankAccount::start_on_postgres_from(bank_bin.clone(), url, coordinator, &spec)?
                }
                None => BankAccount::start_from(
                    bank_bin.clone(),
                    &dir.join(format!("bank{i}")),
                    &treatyd_uri,
                    &spec,
                )?,
            };
            let proxy = rt
                .block_on(Proxy::start(bank.proc.addr))
                .map_err(|e| format!("cannot start the proxy for bank {i}: {e}"))?;
            bank_uris.push(bank.uri());
            proxies.push(proxy);
            banks.push(Mutex::new(bank));
            for name in names {
                let a = Account { inst: i, name };
                openings.insert(a.clone(), opening);
                accounts.push(a);
            }
        }
        Ok(Cluster {
            treatyd: Mutex::new(treatyd),
            treatyd_uri,
            others: others.into_iter().map(Mutex::new).collect(),
            banks,
            bank_uris,
            proxies,
            accounts,
            openings,
            opts: opts.clone(),
            bank_dbs,
            log_db,
            pg: pg.map(Mutex::new),
            mounts,
        })
    }

    /// Branch endpoints, one per instance (the proxies).
    pub fn endpoints(&self) -> Vec<String> {
        self.proxies.iter().map(Proxy::uri).collect()
    }

    /// End every fault: proxies pass, every process that is down is started again.
    pub fn heal(&self) -> Result<(), String> {
        for p in &self.proxies {
            p.pass();
        }
        if let Some(pg) = &self.pg {
            let mut pg = lock(pg);
            pg.pause(false);
            pg.restart()
                .map_err(|e| format!("cannot restart PostgreSQL: {e}"))?;
        }
        for t in self.coordinators() {
            let mut t = lock(t);
            if t.proc.exited().is_some() || t.proc.pid() == 0 {
                t.restart()?;
            }
        }
        for b in &self.banks {
            let mut b = lock(b);
            if b.proc.exited().is_some() || b.proc.pid() == 0 {
                b.restart()?;
            }
        }
        Ok(())
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the nemesis did.
#[derive(Clone, Debug, Default)]
pub struct FaultCounts {
    pub participant_kills: u64,
    /// treatyd deaths caused: SIGKILLs and failpoint crashes.
    pub coordinator_kills: u64,
    /// Per failpoint: how many times treatyd died there.
    pub failpoint_crashes: BTreeMap<String, u64>,
    pub proxy_faults: u64,
    /// treatyd restarts with a sync failpoint after which it exited on its own (fail-stop).
    pub sync_failstops: u64,
    /// The same for bank instances.
    pub bank_sync_failstops: u64,
    /// treatyd restarts with a burst of transient EMFILE it rode out.
    pub emfile_bursts: u64,
    /// Power cuts (treatyd and bank 0 killed, unsynced writes dropped).
    pub power_cuts: u64,
    /// Unsynced bytes the power cuts dropped.
    pub power_cut_bytes: u64,
    /// PostgreSQL mode: SIGKILLs (and restarts) of the whole server.
    pub pg_kills: u64,
    /// PostgreSQL mode: pauses (SIGSTOP, SIGCONT) of the whole server.
    pub pg_pauses: u64,
    /// PostgreSQL mode: pauses (SIGSTOP, SIGCONT) of treatyd.
    pub coordinator_pauses: u64,
    /// Several coordinators: pauses that lasted until another coordinator had taken the
    /// paused one's transactions over (`--pause-past-lease`).
    pub paused_past_takeover: u64,
    /// PostgreSQL mode: processes found exited after a server kill (and started again).
    pub exited_after_pg_kill: u64,
    /// Things that went wrong in a way only the nemesis can see (e.g. a process that did
    /// not fail-stop on a failed fsync); reported as violations.
    pub problems: Vec<String>,
}

/// Wait up to `bound` for `p` to exit; its status if it did.
fn wait_exit(p: &mut treaty_tests::Proc, bound: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = p.exited() {
            return Some(s);
        }
        if start.elapsed() >= bound {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fail-stop is an exit with a failure status, not a clean exit and not a crash signal
/// (a panic or abort would also stop, but says the error was not handled).
fn fail_stopped(s: std::process::ExitStatus) -> bool {
    s.code().is_some_and(|c| c != 0)
}

/// The nemesis's extra actions, by mode.
#[derive(Clone, Copy, Debug)]
enum Extra {
    TreatydSyncFailure,
    TreatydEmfileBurst,
    BankSyncFailure,
    PowerCut,
    PgKill,
    PgPause,
    CoordinatorPause,
}

/// Do one extra action.
fn extra(
    cluster: &Cluster,
    what: Extra,
    rng: &mut StdRng,
    t0: Instant,
    counts: &mut FaultCounts,
) -> Result<(), String> {
    match what {
        Extra::TreatydSyncFailure => {
            let point = if rng.gen_bool(0.7) {
                "treaty::sync::fsync_eio"
            } else {
                "treaty::sync::fsync_enospc"
            };
            let spec = format!("{point}={}*off->return", rng.gen_range(5..40));
            let mut t = lock(&cluster.treatyd);
            eprintln!("[chaos {}] SIGKILL treatyd, restart with {spec}", at(t0));
            t.restart_with(&[("FAILPOINTS", &spec)])?;
            counts.coordinator_kills += 1;
            match wait_exit(&mut t.proc, Duration::from_secs(10)) {
                Some(s) if fail_stopped(s) => {
                    counts.sync_failstops += 1;
                    eprintln!("[chaos {}] treatyd fail-stopped ({s}); restart", at(t0));
                }
                Some(s) => counts.problems.push(format!(
                    "treatyd with {spec} exited with {s}: a failed fsync must stop it with a \
                     failure status"
                )),
                None => eprintln!(
                    "[chaos {}] {spec}: not reached in 10 s; SIGKILL, restart clean",
                    at(t0)
                ),
            }
            t.restart()?;
        }
        Extra::TreatydEmfileBurst => {
            let spec = format!("treaty::sync::list_emfile={}*return", rng.gen_range(1..6));
            let mut t = lock(&cluster.treatyd);
            eprintln!("[chaos {}] SIGKILL treatyd, restart with {spec}", at(t0));
            t.restart_with(&[("FAILPOINTS", &spec)])?;
            counts.coordinator_kills += 1;
            counts.emfile_bursts += 1;
            // Transient: treatyd must ride it out and keep serving.
            if let Some(s) = wait_exit(&mut t.proc, Duration::from_secs(2)) {
                counts.problems.push(format!(
                    "treatyd exited ({s}) on {spec}: EMFILE is transient and must be retried"
                ));
                t.restart()?;
            }
        }
        Extra::BankSyncFailure => {
            let i = rng.gen_range(0..cluster.banks.len());
            let spec = format!(
                "treaty::sync::fsync_eio={}*off->return",
                rng.gen_range(3..30)
            );
            let mut b = lock(&cluster.banks[i]);
            eprintln!("[chaos {}] SIGKILL bank {i}, restart with {spec}", at(t0));
            b.restart_with(&[("FAILPOINTS", &spec)])?;
            counts.participant_kills += 1;
            match wait_exit(&mut b.proc, Duration::from_secs(5)) {
                Some(s) if fail_stopped(s) => {
                    counts.bank_sync_failstops += 1;
                    eprintln!("[chaos {}] bank {i} fail-stopped ({s}); restart", at(t0));
                }
                Some(s) => counts.problems.push(format!(
                    "bank {i} with {spec} exited with {s}: a failed fsync must stop it with a \
                     failure status"
                )),
                // Its armed fsync was not reached within the wait (too little traffic):
                // nothing failed yet, so nothing had to stop.
                None => eprintln!(
                    "[chaos {}] bank {i} {spec}: still running after 5 s; SIGKILL, restart clean",
                    at(t0)
                ),
            }
            b.restart()?;
        }
        Extra::PowerCut => {
            let mut t = lock(&cluster.treatyd);
            let mut b = lock(&cluster.banks[POWER_CUT_BANK]);
            eprintln!(
                "[chaos {}] power cut: SIGKILL treatyd and bank {POWER_CUT_BANK}, drop unsynced writes",
                at(t0)
            );
            t.kill();
            b.kill();
            for m in &cluster.mounts {
                let r = m
                    .cut_power()
                    .map_err(|e| format!("power cut on {}: {e}", m.mountpoint().display()))?;
                counts.power_cut_bytes += r.bytes;
            }
            counts.power_cuts += 1;
            counts.coordinator_kills += 1;
            counts.participant_kills += 1;
            t.restart()?;
            b.restart()?;
        }
        Extra::PgKill => {
            let Some(pg) = &cluster.pg else {
                return Ok(());
            };
            let down = Duration::from_millis(rng.gen_range(0..1500));
            {
                let mut pg = lock(pg);
                eprintln!("[chaos {}] SIGKILL PostgreSQL (down {down:?})", at(t0));
                pg.kill();
                counts.pg_kills += 1;
                std::thread::sleep(down);
                pg.restart()
                    .map_err(|e| format!("cannot restart PostgreSQL: {e}"))?;
            }
            // A process may have stopped on a lost write (treatyd fail-stops on a failed
            // forced write of its log); the campaign continues with it started again.
            for t in cluster.coordinators() {
                let mut t = lock(t);
                if t.proc.exited().is_some() {
                    eprintln!("[chaos {}] treatyd exited meanwhile; restart", at(t0));
                    counts.exited_after_pg_kill += 1;
                    t.restart()?;
                }
            }
            for (i, b) in cluster.banks.iter().enumerate() {
                let mut b = lock(b);
                if b.proc.exited().is_some() {
                    eprintln!("[chaos {}] bank {i} exited meanwhile; restart", at(t0));
                    counts.exited_after_pg_kill += 1;
                    b.restart()?;
                }
            }
        }
        Extra::PgPause => {
            let Some(pg) = &cluster.pg else {
                return Ok(());
            };
            let lasts = Duration::from_millis(rng.gen_range(300..3000));
            let pg = lock(pg);
            eprintln!("[chaos {}] SIGSTOP PostgreSQL for {lasts:?}", at(t0));
            pg.pause(true);
            counts.pg_pauses += 1;
            std::thread::sleep(lasts);
            pg.pause(false);
        }
        Extra::CoordinatorPause => {
            let lasts = Duration::from_millis(rng.gen_range(300..3000));
            let (lasts, t) = cluster.pick_coordinator(rng, lasts);
            let mut t = lock(t);
            // Never signal pid 0 (our own process group): only a running treatyd.
            if t.proc.pid() == 0 || t.proc.exited().is_some() {
                return Ok(());
            }
            let pid = nix::unistd::Pid::from_raw(t.proc.pid() as i32);
            eprintln!("[chaos {}] SIGSTOP treatyd for {lasts:?}", at(t0));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
            counts.coordinator_pauses += 1;
            std::thread::sleep(lasts);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        }
    }
    Ok(())
}

/// Elapsed seconds since `t0`, for log lines.
fn at(t0: Instant) -> String {
    format!("{:6.1}s", t0.elapsed().as_secs_f64())
}

/// Inject faults until `until` (or until `abort` is set), then heal everything.
///
/// Each step sleeps a random 0.3 to 1.5 s, ends the proxy faults whose time is up, then does
/// one of: SIGKILL a bank instance and restart it after up to 1.5 s; SIGKILL treatyd and
/// restart it after up to 0.8 s; restart treatyd with the next failpoint armed, wait (up to
/// 5 s) for it to die there, restart it clean; cut a proxy's connections; black-hole a proxy
/// for 0.3 to 3 s; delay a proxy's traffic by 20 to 1200 ms for 0.5 to 3 s. With extra modes
/// on ([`Options`]), three steps in ten do one of the modes' actions instead, chosen evenly
/// (in the PostgreSQL mode, in turn):
/// restart treatyd with a failing fsync or fdatasync-ENOSPC after 5 to 40 good ones (it must
/// exit with a failure status: fail-stop; then it is restarted clean and must recover),
/// restart it with 1 to 5 EMFILE in a row on a directory listing (it must keep running),
/// restart a bank instance with a failing fsync (it must fail-stop too), or cut the power:
/// SIGKILL treatyd and bank 0, drop every unsynced write on both mounts, restart both; in
/// the PostgreSQL mode: SIGKILL the PostgreSQL server and restart it after up to 1.5 s
/// (then restart whatever exited meanwhile), pause it for 0.3 to 3 s, or pause treatyd for
/// 0.3 to 3 s.
pub fn nemesis(
    cluster: &Cluster,
    seed: u64,
    t0: Instant,
    until: Instant,
    abort: &AtomicBool,
) -> Result<FaultCounts, String> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
    let mut counts = FaultCounts::default();
    // (proxy, when to restore it)
    let mut faulted: Vec<(usize, Instant)> = Vec::new();
    let mut next_failpoint = 0;
    let mut next_extra = 0;
    let n = cluster.proxies.len();
    let mut extras = Vec::new();
    if cluster.opts.sync_faults {
        extras.extend([
            Extra::TreatydSyncFailure,
            Extra::TreatydEmfileBurst,
            Extra::BankSyncFailure,
        ]);
    }
    if cluster.opts.power_cut {
        extras.push(Extra::PowerCut);
    }
    if cluster.pg.is_some() {
        extras.extend([Extra::PgKill, Extra::PgPause, Extra::CoordinatorPause]);
    }
    let result = (|| -> Result<(), String> {
        while Instant::now() < until && !abort.load(Ordering::Acquire) {
            let pause = Duration::from_millis(rng.gen_range(300..1500));
            std::thread::sleep(pause.min(until.saturating_duration_since(Instant::now())));
            let now = Instant::now();
            faulted.retain(|&(p, end)| {
                if end <= now {
                    cluster.proxies[p].pass();
                    eprintln!("[chaos {}] proxy {p}: pass", at(t0));
                    false
                } else {
                    true
                }
            });
            if now >= until {
                break;
            }
            // Checker tests: only this fault, at every step (owners.rs).
            if cluster.pause_past_lease() {
                super::owners::pause_past_lease(cluster, t0, &mut counts)?;
                continue;
            }
            if !extras.is_empty() && rng.gen_bool(0.3) {
                // PostgreSQL mode: its actions in turn (a server kill first), so that a short
                // campaign is sure to do each; the other modes keep their random choice.
                let what = if cluster.pg.is_some() {
                    next_extra += 1;
                    extras[(next_extra - 1) % extras.len()]
                } else {
                    extras[rng.gen_range(0..extras.len())]
                };
                extra(cluster, what, &mut rng, t0, &mut counts)?;
                continue;
            }
            let roll = rng.gen_range(0..100);
            match roll {
                0..=24 => {
                    let i = rng.gen_range(0..n);
                    let down = Duration::from_millis(rng.gen_range(0..1500));
                    let mut b = lock(&cluster.banks[i]);
                    eprintln!("[chaos {}] SIGKILL bank {i} (down {down:?})", at(t0));
                    b.kill();
                    counts.participant_kills += 1;
                    std::thread::sleep(down);
                    b.restart()?;
                }
                25..=39 => {
                    let down = Duration::from_millis(rng.gen_range(0..800));
                    // Several coordinators: sometimes down past the lease (a takeover).
                    let (down, t) = cluster.pick_coordinator(&mut rng, down);
                    let mut t = lock(t);
                    eprintln!("[chaos {}] SIGKILL treatyd (down {down:?})", at(t0));
                    t.kill();
                    counts.coordinator_kills += 1;
                    std::thread::sleep(down);
                    t.restart()?;
                }
                40..=54 => {
                    let fp = FAILPOINTS[next_failpoint % FAILPOINTS.len()];
                    next_failpoint += 1;
                    let (_, t) = cluster.pick_coordinator(&mut rng, Duration::ZERO);
                    let mut t = lock(t);
                    eprintln!(
                        "[chaos {}] SIGKILL treatyd, restart with {fp} armed",
                        at(t0)
                    );
                    t.restart_with(&[("FAILPOINTS", &format!("{fp}=return"))])?;
                    counts.coordinator_kills += 1;
                    let armed = Instant::now();
                    let mut died = false;
                    while armed.elapsed() < Duration::from_secs(5) {
                        if t.proc.exited().is_some() {
                            died = true;
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    counts.coordinator_kills += 1;
                    if died {
                        *counts.failpoint_crashes.entry(fp.to_string()).or_default() += 1;
                        eprintln!("[chaos {}] treatyd died at {fp}; restart clean", at(t0));
                    } else {
                        eprintln!(
                            "[chaos {}] {fp} not reached in 5 s; SIGKILL, restart clean",
                            at(t0)
                        );
                    }
                    t.restart()?;
                }
                55..=69 => {
                    let p = rng.gen_range(0..n);
                    eprintln!("[chaos {}] proxy {p}: cut every connection", at(t0));
                    cluster.proxies[p].cut();
                    counts.proxy_faults += 1;
                }
                70..=84 => {
                    let p = rng.gen_range(0..n);
                    let lasts = Duration::from_millis(rng.gen_range(300..3000));
                    eprintln!("[chaos {}] proxy {p}: black-hole for {lasts:?}", at(t0));
                    cluster.proxies[p].set(Fault::Blackhole);
                    faulted.retain(|&(q, _)| q != p);
                    faulted.push((p, Instant::now() + lasts));
                    counts.proxy_faults += 1;
                }
                _ => {
                    let p = rng.gen_range(0..n);
                    let delay = Duration::from_millis(rng.gen_range(20..1200));
                    let lasts = Duration::from_millis(rng.gen_range(500..3000));
                    eprintln!(
                        "[chaos {}] proxy {p}: delay {delay:?} for {lasts:?}",
                        at(t0)
                    );
                    cluster.proxies[p].set(Fault::Delay(delay));
                    faulted.retain(|&(q, _)| q != p);
                    faulted.push((p, Instant::now() + lasts));
                    counts.proxy_faults += 1;
                }
            }
        }
        Ok(())
    })();
    // Heal whatever happened: the checks need every process up and every proxy passing.
    let healed = cluster.heal();
    eprintln!(
        "[chaos {}] faults stopped; every process up, every proxy passing",
        at(t0)
    );
    result.and(healed).map(|()| counts)
}
