//! Test support for Treaty's cross-process tests, the chaos runner and the benchmark.
//!
//! - [`binary`] builds (once per test process) and locates a workspace binary, so tests always
//!   run the current code: `treatyd` is built with the `failpoints` feature (failpoints are
//!   inert unless armed through `FAILPOINTS`).
//! - [`Proc`] is a child process that is killed (SIGKILL) and reaped when dropped, so a failing
//!   test leaves nothing running. It waits for the child's "listening on <addr>" line to learn
//!   the OS-assigned port, and can keep the child's stderr lines for a runner to parse. The
//!   tests, `treaty-chaos` and `treaty-bench` all start their processes with it.
//! - [`Treatyd`] and [`BankAccount`] start the daemon and the bank example's account service on
//!   127.0.0.1 in a temporary directory, and can be killed and restarted on the same address.
//! - [`wait_until`] polls a condition with a bound: tests never sleep to synchronize.

pub mod proxy;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Build `bin` of `package` (with `features`) in the current profile and return its path.
/// Builds happen once per process per binary; cargo makes them no-ops when fresh.
///
/// # Panics
/// When the build fails (tests cannot go on without the binary); [`try_binary`] returns the
/// error instead.
pub fn binary(package: &str, bin: &str, features: &str) -> PathBuf {
    try_binary(package, bin, features).unwrap_or_else(|e| panic!("{e}"))
}

/// [`binary`], returning the build error (for the runners, which report it and exit).
pub fn try_binary(package: &str, bin: &str, features: &str) -> Result<PathBuf, String> {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let key = format!("{package}/{bin}/{features}");
    let mut built = BUILT
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(p) = built.get(&key) {
        return Ok(p.clone());
    }
    let mut build = escargot::CargoBuild::new()
        .manifest_path(workspace_root().join("Cargo.toml"))
        .package(package)
        .bin(bin)
        .current_release();
    if !features.is_empty() {
        build = build.features(features);
    }
    let run = build
        .run()
        .map_err(|e| format!("cannot build {package}/{bin}: {e}"))?;
    let path = run.path().to_path_buf();
    built.insert(key, path.clone());
    Ok(path)
}

/// Copy the binary at `bin` into the directory `into` (created if missing) and return the
/// copy's path. A runner that outlives builds runs its private copy, so that a build of the
/// workspace meanwhile (another profile or feature set) cannot swap the binary under it.
pub fn private_copy(bin: &Path, into: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(into).map_err(|e| format!("cannot create {}: {e}", into.display()))?;
    let to = into.join(bin.file_name().unwrap_or_default());
    std::fs::copy(bin, &to)
        .map_err(|e| format!("cannot copy {} to {}: {e}", bin.display(), to.display()))?;
    Ok(to)
}

/// The `treatyd` binary used by tests (with failpoints and the `TREATY_TEST_MUTATIONS`
/// engine bugs compiled in, both off unless armed through the environment).
pub fn treatyd_bin() -> PathBuf {
    binary("treaty-coordinator", "treatyd", "failpoints mutations")
}

/// The bank example's account service.
pub fn bank_account_bin() -> PathBuf {
    binary("treaty-examples", "bank-account", "")
}

/// The bank example's account service built with extra cargo `features` of treaty-examples
/// (e.g. `failpoints`, so its SDK's sync failpoints can be armed through `FAILPOINTS`).
pub fn bank_account_bin_with(features: &str) -> PathBuf {
    binary("treaty-examples", "bank-account", features)
}

/// The `treaty-lazyfs` FUSE filesystem (the power-cut mode of the chaos runner).
pub fn lazyfs_bin() -> PathBuf {
    binary("treaty-lazyfs", "treaty-lazyfs", "")
}

/// What a [`Proc`] does with its child's stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stderr {
    /// Inherited: the child writes straight to ours (visible when a test fails).
    Inherit,
    /// Read line by line and kept (bounded) for [`Proc::wait_line`], for log lines a runner
    /// parses; lines that look like warnings, errors or panics are echoed with the child's
    /// name.
    Keep,
}

/// One line of a child's stderr, with the time it was read.
struct Line {
    at: Instant,
    text: String,
}

/// Lines kept per child at most: a runner parses a few lines, not a flood.
const KEPT_LINES_MAX: usize = 10_000;

/// A child process killed with SIGKILL and reaped on drop.
pub struct Proc {
    child: Option<Child>,
    /// The address the process reported it listens on.
    pub addr: SocketAddr,
    /// When the process was started.
    pub spawned_at: Instant,
    /// When its `listening on <addr>` line was read.
    pub listening_at: Instant,
    name: String,
    lines: Arc<Mutex<Vec<Line>>>,
    /// The admin address from a `admin listening on <addr>` stdout line (treatyd with
    /// `--admin-listen`), once read.
    admin: Arc<Mutex<Option<SocketAddr>>>,
}

impl Proc {
    /// A handle with no process yet (replaced by a spawned one before use).
    fn none(name: &str) -> Proc {
        let now = Instant::now();
        Proc {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            spawned_at: now,
            listening_at: now,
            name: name.to_string(),
            lines: Arc::default(),
            admin: Arc::default(),
        }
    }

    /// Start `cmd` and wait (up to `bound`) for a stdout line containing `listening on <addr>`.
    /// Its later stdout is drained on a thread; stderr is inherited (visible on failure).
    pub fn spawn(name: &str, cmd: Command, bound: Duration) -> Result<Proc, String> {
        Proc::spawn_with(name, cmd, bound, Stderr::Inherit)
    }

    /// [`Proc::spawn`], with the child's stderr handled as `stderr` says.
    pub fn spawn_with(
        name: &str,
        mut cmd: Command,
        bound: Duration,
        stderr: Stderr,
    ) -> Result<Proc, String> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped());
        cmd.stderr(match stderr {
            Stderr::Inherit => Stdio::inherit(),
            Stderr::Keep => Stdio::piped(),
        });
        let mut proc = Proc::none(name);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        if let Some(err) = child.stderr.take() {
            let lines = Arc::clone(&proc.lines);
            let label = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(text) = line else { break };
                    let upper = text.to_ascii_uppercase();
                    if upper.contains("WARN") || upper.contains("ERROR") || upper.contains("PANIC")
                    {
                        eprintln!("[{label}] {text}");
                    }
                    let mut l = lines.lock().unwrap_or_else(|p| p.into_inner());
                    if l.len() < KEPT_LINES_MAX {
                        l.push(Line {
                            at: Instant::now(),
                            text,
                        });
                    }
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let label = name.to_string();
        let admin = Arc::clone(&proc.admin);
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line
                    .split("admin listening on ")
                    .nth(1)
                    .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                {
                    *admin.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr);
                    continue;
                }
                if !sent {
                    if let Some(addr) = line
                        .split("listening on ")
                        .nth(1)
                        .and_then(|a| a.trim().parse::<SocketAddr>().ok())
                    {
                        let _ = tx.send((addr, Instant::now()));
                        sent = true;
                        continue;
                    }
                }
                eprintln!("[{label}] {line}");
            }
        });
        proc.child = Some(child);
        match rx.recv_timeout(bound) {
            Ok((addr, at)) => {
                proc.addr = addr;
                proc.listening_at = at;
                Ok(proc)
            }
            Err(_) => {
                let status = proc.exited();
                Err(format!(
                    "{name} did not report its address within {bound:?} (exit status: {status:?})"
                ))
            }
        }
    }

    /// `http://<addr>`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The admin listener's address (treatyd started with `--admin-listen`), waiting up to
    /// `bound` for the line that reports it.
    pub fn admin_addr(&self, bound: Duration) -> Result<SocketAddr, String> {
        let start = Instant::now();
        loop {
            if let Some(a) = *self.admin.lock().unwrap_or_else(|p| p.into_inner()) {
                return Ok(a);
            }
            if start.elapsed() > bound {
                return Err(format!(
                    "{} did not report an admin address within {bound:?}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Wait (up to `bound`) for a kept stderr line matching `pred` (a child spawned with
    /// [`Stderr::Keep`]); returns the time it was read and its text, or `None` past `bound`.
    pub fn wait_line(
        &self,
        bound: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(Instant, String)> {
        let start = Instant::now();
        loop {
            {
                let l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(line) = l.iter().find(|l| pred(&l.text)) {
                    return Some((line.at, line.text.clone()));
                }
            }
            if start.elapsed() > bound {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILL now and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send SIGTERM and wait (bounded) for exit; returns the exit status, or `None` when the
    /// process had to be killed (SIGKILL) past `bound`.
    pub fn terminate(&mut self, bound: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while start.elapsed() < bound {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Whether the process has exited (for processes expected to crash on a failpoint).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run a command to completion with a bound; returns (status code, stdout, stderr).
pub fn run_to_end(mut cmd: Command, bound: Duration) -> Result<(i32, String, String), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(bound) {
        Ok(Ok(out)) => Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )),
        Ok(Err(e)) => Err(format!("wait failed: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            Err(format!("did not finish within {bound:?}"))
        }
    }
}

/// `GET path` from an HTTP/1.1 server at `addr` (the admin listener): the status code and
/// the body. Plain `std` sockets with timeouts: enough for `/metrics` and the health routes.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(10);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("GET {path}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("GET {path}: reading the answer: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("GET {path}: no end of headers in {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: bad status line in {head:?}"))?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, dechunk(body)));
    }
    Ok((status, body.to_string()))
}

/// The body of a chunked HTTP/1.1 answer.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the sample `series` (name and labels exactly as exposed, e.g.
/// `treaty_transactions_live` or `x_total{mode="saga"}`) in a Prometheus exposition.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.split(' ').next()?.parse().ok()
    })
}

/// Poll `check` every 20 ms until it returns `Some`, or fail after `bound` naming `what`.
pub async fn wait_until<T, F, Fut>(what: &str, bound: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > bound {
            panic!("timed out after {bound:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `treatyd` process over a data directory, restartable on the same address.
pub struct Treatyd {
    pub proc: Proc,
    pub data_dir: PathBuf,
    bin: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl Treatyd {
    /// Start on 127.0.0.1:0 over `data_dir`, with extra flags and environment.
    pub fn start(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Treatyd, String> {
        Treatyd::start_from(treatyd_bin(), data_dir, args, env)
    }

    /// [`Treatyd::start`] with the binary at `bin` (every restart uses it too).
    pub fn start_from(
        bin: PathBuf,
        data_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Treatyd, String> {
        let mut t = Treatyd {
            bin,
            proc: Proc::none("treatyd"),
            data_dir: data_dir.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        t.proc = t.spawn(SocketAddr::from(([127, 0, 0, 1], 0)), &[])?;
        Ok(t)
    }

    fn spawn(&self, addr: SocketAddr, extra_env: &[(&str, &str)]) -> Result<Proc, String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--listen").arg(addr.to_string());
        // `--store` (a PostgreSQL log) excludes `--data-dir`.
        if !self.args.iter().any(|a| a == "--store") {
            cmd.arg("--data-dir").arg(&self.data_dir);
        }
        cmd.args(&self.args).env(
            "TREATY_LOG_LEVEL",
            std::env::var("TREATY_TEST_LOG").unwrap_or("warn".into()),
        );
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        Proc::spawn("treatyd", cmd, Duration::from_secs(120))
    }

    /// `http://<addr>`.
    pub fn uri(&self) -> String {
        self.proc.uri()
    }

    /// SIGKILL the daemon (a crash: nothing is flushed).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Start again on the same address and data directory, with extra environment (e.g. to
    /// arm a failpoint for this run only).
    pub fn restart_with(&mut self, extra_env: &[(&str, &str)]) -> Result<(), String> {
        self.proc.kill();
        self.proc = respawn(self.proc.addr, |addr| self.spawn(addr, extra_env))?;
        Ok(())
    }

    /// Start again on the same address and data directory.
    pub fn restart(&mut self) -> Result<(), String> {
        self.restart_with(&[])
    }
}

/// A bank example account service (`bank-account`), restartable on the same address.
pub struct BankAccount {
    pub proc: Proc,
    pub data_dir: PathBuf,
    bin: PathBuf,
    coordinator: String,
    accounts: String,
    /// `--store`: a PostgreSQL URL instead of sled in `data_dir`.
    store: Option<String>,
}

impl BankAccount {
    /// Start on 127.0.0.1:0 with its accounts and barrier rows in the PostgreSQL database at
    /// `url` (`bank-account --store <url>`), with `accounts` like `alice=100`.
    pub fn start_on_postgres(
        url: &str,
        coordinator: &str,
        accounts: &str,
    ) -> Result<BankAccount, String> {
        BankAccount::start_on_postgres_from(bank_account_bin(), url, coordinator, accounts)
    }

    /// [`BankAccount::start_on_postgres`] with the binary at `bin` (every restart uses it too).
    pub fn start_on_postgres_from(
        bin: PathBuf,
        url: &str,
        coordinator: &str,
        accounts: &str,
    ) -> Result<BankAccount, String> {
        let mut b = BankAccount {
            bin,
            proc: Proc::none("bank-account"),
            data_dir: PathBuf::new(),
            coordinator: coordinator.to_string(),
            accounts: accounts.to_string(),
            store: Some(url.to_string()),
        };
        b.proc = b.spawn(SocketAddr::from(([127, 0, 0, 1], 0)), &[])?;
        Ok(b)
    }

    /// Start on 127.0.0.1:0 with `accounts` like `alice=100,bob=50`.
    pub fn start(
        data_dir: &Path,
        coordinator: &str,
        accounts: &str,
    ) -> Result<BankAccount, String> {
        BankAccount::start_from(bank_account_bin(), data_dir, coordinator, accounts)
    }

    /// [`BankAccount::start`] with the binary at `bin` (every restart uses it too).
    pub fn start_from(
        bin: PathBuf,
        data_dir: &Path,
        coordinator: &str,
        accounts: &str,
    ) -> Result<BankAccount, String> {
        let mut b = BankAccount {
            bin,
            proc: Proc::none("bank-account"),
            data_dir: data_dir.to_path_buf(),
            coordinator: coordinator.to_string(),
            accounts: accounts.to_string(),
            store: None,
        };
        b.proc = b.spawn(SocketAddr::from(([127, 0, 0, 1], 0)), &[])?;
        Ok(b)
    }

    fn spawn(&self, addr: SocketAddr, extra_env: &[(&str, &str)]) -> Result<Proc, String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--coordinator")
            .arg(&self.coordinator)
            .arg("--accounts")
            .arg(&self.accounts)
            .env("RUST_LOG", "warn");
        match &self.store {
            Some(url) => cmd.arg("--store").arg(url),
            None => cmd.arg("--data-dir").arg(&self.data_dir),
        };
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        Proc::spawn("bank-account", cmd, Duration::from_secs(120))
    }

    /// `http://<addr>`.
    pub fn uri(&self) -> String {
        self.proc.uri()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Start again on the same address and data directory.
    pub fn restart(&mut self) -> Result<(), String> {
        self.restart_with(&[])
    }

    /// Start again on the same address and data directory, with extra environment (e.g. to
    /// arm a sync failpoint for this run only, in a build with the `failpoints` feature).
    pub fn restart_with(&mut self, extra_env: &[(&str, &str)]) -> Result<(), String> {
        self.proc.kill();
        self.proc = respawn(self.proc.addr, |addr| self.spawn(addr, extra_env))?;
        Ok(())
    }
}

/// Start a process again on `addr` with `spawn`, retrying for a bounded time: the old
/// socket may linger for a moment after SIGKILL.
fn respawn(
    addr: SocketAddr,
    spawn: impl Fn(SocketAddr) -> Result<Proc, String>,
) -> Result<Proc, String> {
    let start = Instant::now();
    loop {
        match spawn(addr) {
            Ok(p) => return Ok(p),
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reading a bank-account instance through its `Bank` service.
pub mod bank {
    use std::collections::BTreeMap;
    use treaty_examples::proto::{bank_client::BankClient, BalancesRequest, BarrierRowsRequest};

    pub use treaty_examples::proto::BarrierRow;

    /// account → (balance, held) of the instance at `uri`.
    pub async fn balances(uri: &str) -> Result<BTreeMap<String, (i64, i64)>, String> {
        let mut c = BankClient::connect(uri.to_string())
            .await
            .map_err(|e| format!("connect {uri}: {e}"))?;
        let accounts = c
            .balances(BalancesRequest {})
            .await
            .map_err(|e| format!("{uri}: {e}"))?
            .into_inner()
            .accounts;
        Ok(accounts
            .into_iter()
            .map(|a| (a.name, (a.balance, a.held)))
            .collect())
    }

    /// Every barrier row of the instance at `uri` (or of one gid).
    pub async fn barrier_rows(uri: &str, gid: &str) -> Result<Vec<BarrierRow>, String> {
        let mut c = BankClient::connect(uri.to_string())
            .await
            .map_err(|e| format!("connect {uri}: {e}"))?;
        let mut pages = c
            .barrier_rows(BarrierRowsRequest { gid: gid.into() })
            .await
            .map_err(|e| format!("{uri}: {e}"))?
            .into_inner();
        let mut rows = Vec::new();
        while let Some(page) = pages.message().await.map_err(|e| format!("{uri}: {e}"))? {
            rows.extend(page.rows);
        }
        Ok(rows)
    }
}
