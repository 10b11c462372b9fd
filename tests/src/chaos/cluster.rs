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

use super::workload::Account;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use treaty_tests::proxy::{Fault, Proxy};
use treaty_tests::{BankAccount, Treatyd};

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
    pub banks: Vec<Mutex<BankAccount>>,
    /// Each instance's own address (for balances and barrier rows: never through a proxy).
    pub bank_uris: Vec<String>,
    /// Branch endpoints: instance `i` is reached through `proxies[i]`.
    pub proxies: Vec<Proxy>,
    pub accounts: Vec<Account>,
    pub openings: BTreeMap<Account, i64>,
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
    ) -> Result<Cluster, String> {
        // Private copies of the binaries: a campaign outlives builds, and a build of the
        // workspace meanwhile (e.g. `cargo build --release`, which compiles treatyd without
        // failpoints) would otherwise swap a different treatyd in under the runner.
        let bin = dir.join("bin");
        let copy = |from: PathBuf| -> Result<PathBuf, String> {
            std::fs::create_dir_all(&bin)
                .map_err(|e| format!("cannot create {}: {e}", bin.display()))?;
            let to = bin.join(from.file_name().unwrap_or_default());
            std::fs::copy(&from, &to)
                .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))?;
            Ok(to)
        };
        let treatyd_bin = copy(treaty_tests::treatyd_bin())?;
        let bank_bin = copy(treaty_tests::bank_account_bin())?;
        let treatyd = Treatyd::start_from(treatyd_bin, &dir.join("treatyd"), &TREATYD_ARGS, &[])?;
        let treatyd_uri = treatyd.uri();
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
            let bank = BankAccount::start_from(
                bank_bin.clone(),
                &dir.join(format!("bank{i}")),
                &treatyd_uri,
                &spec,
            )?;
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
            banks,
            bank_uris,
            proxies,
            accounts,
            openings,
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
        let mut t = lock(&self.treatyd);
        if t.proc.exited().is_some() || t.proc.pid() == 0 {
            t.restart()?;
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
/// for 0.3 to 3 s; delay a proxy's traffic by 20 to 1200 ms for 0.5 to 3 s.
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
    let n = cluster.proxies.len();
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
                    let mut t = lock(&cluster.treatyd);
                    eprintln!("[chaos {}] SIGKILL treatyd (down {down:?})", at(t0));
                    t.kill();
                    counts.coordinator_kills += 1;
                    std::thread::sleep(down);
                    t.restart()?;
                }
                40..=54 => {
                    let fp = FAILPOINTS[next_failpoint % FAILPOINTS.len()];
                    next_failpoint += 1;
                    let mut t = lock(&cluster.treatyd);
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
