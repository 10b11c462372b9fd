//! A private PostgreSQL server for tests, benchmarks and the chaos runner.
//!
//! [`PgServer::start`] runs `initdb` into a temporary directory and starts `postgres` on a free
//! port of 127.0.0.1, with `max_prepared_transactions` on, and waits until the server says it
//! is ready (the status line of `postmaster.pid`), never by sleeping. The server is stopped on
//! drop (SIGQUIT, then SIGKILL past a bound) and its directory removed, on success and on
//! failure alike.
//!
//! PostgreSQL refuses to run as root. When the tests run as root, the server runs as the
//! `postgres` user (its data directory is handed to that user), by setting the child's uid and
//! gid rather than through `runuser`, so that the process we signal is the postmaster itself.
//!
//! Where the binaries are missing: [`PgServer::start`] returns [`PgError::Missing`]; tests use
//! [`PgServer::start_for_test`], which fails in CI (`CI=true`) and otherwise returns `None`
//! after printing how to install PostgreSQL.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, User};

/// How long a start (initdb excluded) or a stop may take before it is an error.
const BOUND: Duration = Duration::from_secs(60);

/// What goes wrong starting a server.
#[derive(Debug)]
pub enum PgError {
    /// No PostgreSQL binaries on this machine; the text says how to install them.
    Missing(String),
    /// The binaries are there but the server did not start; the text says why.
    Failed(String),
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PgError::Missing(s) | PgError::Failed(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for PgError {}

/// How to start the server.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `fsync` on (the default) or off. Off is safe against killed processes (the chaos
    /// runner's nemesis kills the server, not the machine) and is faster; benchmarks keep it
    /// on so their figures mean durable commits.
    pub fsync: bool,
    /// `max_prepared_transactions`; 0 turns PREPARE TRANSACTION off (to test the refusal).
    pub max_prepared_transactions: u32,
    /// `max_connections`.
    pub max_connections: u32,
    /// Serve TLS (`ssl=on`) with this certificate chain and key (PEM); `None`: plain only.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            fsync: true,
            max_prepared_transactions: 64,
            max_connections: 200,
            tls: None,
        }
    }
}

/// A PostgreSQL server of our own, stopped and removed on drop.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    run_as: Option<User>,
    options: PgOptions,
    child: Option<Child>,
}

/// The user the server runs as: none when we are not root, else `postgres`.
fn server_user() -> Result<Option<User>, PgError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match User::from_name("postgres") {
        Ok(Some(u)) => Ok(Some(u)),
        _ => Err(PgError::Failed(
            "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` \
             user to run it as (installing Debian's postgresql package creates it)"
                .into(),
        )),
    }
}

/// The directory holding `initdb` and `postgres`: `$TREATY_PG_BIN`, else `PATH`, else the
/// newest `/usr/lib/postgresql/<version>/bin`.
pub fn find_bin_dir() -> Result<PathBuf, PgError> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("TREATY_PG_BIN").map(PathBuf::from) {
        return if has(&d) {
            Ok(d)
        } else {
            Err(PgError::Missing(format!(
                "TREATY_PG_BIN={} has no initdb and postgres",
                d.display()
            )))
        };
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has(&d) {
                return Ok(d);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d).ok_or_else(|| {
        PgError::Missing(
            "PostgreSQL is not installed (no initdb/postgres on PATH or in /usr/lib/postgresql). \
             Install it with `apt-get install postgresql` (Debian/Ubuntu) or set TREATY_PG_BIN \
             to the directory holding initdb and postgres"
                .into(),
        )
    })
}

/// A port nobody listens on now (the server binds it a moment later).
fn free_port() -> Result<u16, PgError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| PgError::Failed(format!("no free port: {e}")))
}

fn failed(what: &str) -> impl FnOnce(io::Error) -> PgError + '_ {
    move |e| PgError::Failed(format!("{what}: {e}"))
}

impl PgServer {
    /// Start a server with [`PgOptions::default`].
    pub fn start() -> Result<PgServer, PgError> {
        PgServer::start_with(PgOptions::default())
    }

    /// For tests: start a server, or, when PostgreSQL is missing and we are not in CI, print
    /// how to install it and return `None`. In CI (`CI=true`) a missing PostgreSQL panics: a
    /// skipped test there would be a silent pass.
    pub fn start_for_test(options: PgOptions) -> Option<PgServer> {
        match PgServer::start_with(options) {
            Ok(s) => Some(s),
            Err(PgError::Missing(why))
                if std::env::var("CI").map(|v| v != "true").unwrap_or(true) =>
            {
                eprintln!("skipping a PostgreSQL test: {why}");
                None
            }
            Err(e) => panic!("cannot start PostgreSQL for this test: {e}"),
        }
    }

    /// Start a server: initdb into a temporary directory, then `postgres` on a free port.
    pub fn start_with(options: PgOptions) -> Result<PgServer, PgError> {
        let bin = find_bin_dir()?;
        let run_as = server_user()?;
        let dir = tempfile::Builder::new()
            .prefix("treaty-pg-")
            .tempdir()
            .map_err(failed("cannot make a temporary directory"))?;
        // The server's user must be able to enter the directory and own its data.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(failed("chmod"))?;
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        for d in [&data, &sock] {
            fs::create_dir(d).map_err(failed("mkdir"))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o700)).map_err(failed("chmod"))?;
            if let Some(u) = &run_as {
                nix::unistd::chown(d.as_path(), Some(u.uid), Some(u.gid))
                    .map_err(|e| PgError::Failed(format!("chown {}: {e}", d.display())))?;
            }
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "treaty",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .stdin(Stdio::null());
        as_user(&mut initdb, &run_as);
        let out = initdb.output().map_err(failed("cannot run initdb"))?;
        if !out.status.success() {
            return Err(PgError::Failed(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        if let Some((cert, key)) = &options.tls {
            // In the data directory: owned by the server's user, the key readable by it only
            // (PostgreSQL refuses a key others can read).
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = data.join(name);
                fs::write(&path, pem).map_err(failed("write the TLS files"))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .map_err(failed("chmod"))?;
                if let Some(u) = &run_as {
                    nix::unistd::chown(path.as_path(), Some(u.uid), Some(u.gid))
                        .map_err(|e| PgError::Failed(format!("chown {}: {e}", path.display())))?;
                }
            }
        }
        let mut server = PgServer {
            bin,
            dir,
            port: 0,
            run_as,
            options,
            child: None,
        };
        server.port = free_port()?;
        server.launch()?;
        Ok(server)
    }

    /// Start the postmaster on the data directory and wait until it accepts connections.
    fn launch(&mut self) -> Result<(), PgError> {
        let data = self.dir.path().join("data");
        let sock = self.dir.path().join("sock");
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&sock)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("fsync={}", on_off(self.options.fsync))])
            .args([
                "-c",
                &format!("synchronous_commit={}", on_off(self.options.fsync)),
            ])
            .args([
                "-c",
                &format!(
                    "max_prepared_transactions={}",
                    self.options.max_prepared_transactions
                ),
            ])
            .args([
                "-c",
                &format!("max_connections={}", self.options.max_connections),
            ])
            // After a crash, sync the data directory with one syncfs rather than an fsync per
            // file: the same guarantee, seconds faster on a busy disk.
            .args(["-c", "recovery_init_sync_method=syncfs"])
            .args(["-c", &format!("ssl={}", on_off(self.options.tls.is_some()))])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_user(&mut cmd, &self.run_as);
        let mut child = cmd.spawn().map_err(failed("cannot start postgres"))?;
        let stderr = child.stderr.take().expect("piped");
        // The server's log goes to our stderr, prefixed, so a failing test shows it.
        let port = self.port;
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in io::BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[postgres:{port}] {line}");
            }
        });
        self.child = Some(child);
        let pid_file = data.join("postmaster.pid");
        let start = Instant::now();
        loop {
            // Line 1 of postmaster.pid is the postmaster's pid, line 8 its status: "ready"
            // once it accepts connections. A killed server leaves its file behind, still
            // saying "ready": only our own child's file counts.
            let me = self.pid().to_string();
            if let Ok(text) = fs::read_to_string(&pid_file) {
                let mut lines = text.lines().map(str::trim);
                if lines.next() == Some(me.as_str()) && lines.nth(6) == Some("ready") {
                    return Ok(());
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(PgError::Failed(format!(
                    "postgres exited during start ({status}); its log is above"
                )));
            }
            if start.elapsed() > BOUND {
                self.stop();
                return Err(PgError::Failed(format!(
                    "postgres did not become ready within {BOUND:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `postgres://treaty@127.0.0.1:<port>/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://treaty@127.0.0.1:{}/{db}", self.port)
    }

    /// The port the server listens on (kept across [`PgServer::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The postmaster's process id (0 when stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Create a database with `psql` (`CREATE DATABASE`) and return its URL.
    pub fn create_database(&self, name: &str) -> Result<String, PgError> {
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || name.is_empty() {
            return Err(PgError::Failed(format!(
                "database name {name:?}: use letters, digits and _"
            )));
        }
        let psql = self.bin.join("psql");
        let psql = if psql.is_file() {
            psql
        } else {
            PathBuf::from("psql")
        };
        let out = Command::new(psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "treaty",
                "-d",
                "postgres",
            ])
            .args(["-c", &format!("CREATE DATABASE {name}")])
            .stdin(Stdio::null())
            .output()
            .map_err(failed("cannot run psql"))?;
        if !out.status.success() {
            return Err(PgError::Failed(format!(
                "CREATE DATABASE {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(self.url(name))
    }

    /// Kill the server with SIGKILL, postmaster and backends at once (a crash: prepared
    /// transactions and committed data survive, sessions are cut), and wait until every
    /// server process has gone.
    pub fn kill(&mut self) {
        self.signal_and_reap(Signal::SIGKILL);
    }

    /// Stop the server now (SIGQUIT: immediate shutdown, crash-safe), bounded; SIGKILL past it.
    pub fn stop(&mut self) {
        self.signal_and_reap(Signal::SIGQUIT);
    }

    /// Start the server again on the same directory and port after [`PgServer::kill`] or
    /// [`PgServer::stop`]; recovery replays its WAL.
    pub fn restart(&mut self) -> Result<(), PgError> {
        if self.child.is_some() {
            return Ok(());
        }
        self.launch()
    }

    /// Pause (SIGSTOP) or resume (SIGCONT) the postmaster and its backends, to make the
    /// database unreachable without losing a byte.
    pub fn pause(&self, paused: bool) {
        let sig = if paused {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        for pid in self.server_pids() {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }

    /// Signal the postmaster, reap it, and wait until its backends have gone too: a backend
    /// outlives a killed postmaster briefly (reparented, so no longer its child), and a
    /// restart before it goes fails ("pre-existing shared memory block is still in use").
    fn signal_and_reap(&mut self, sig: Signal) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let server = {
            // `server_pids` needs the child in place.
            self.child = Some(child);
            let pids = self.server_pids();
            child = self.child.take().expect("just put back");
            pids
        };
        // A paused server must be resumed to act on anything but SIGKILL.
        for &pid in &server {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
        let _ = kill(Pid::from_raw(child.id() as i32), sig);
        if sig == Signal::SIGKILL {
            // A crash takes the whole server at once, as a machine or container crash does;
            // backends left behind would only delay the restart.
            for &pid in &server {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let start = Instant::now();
        let mut reaped = false;
        while start.elapsed() < BOUND {
            if let Ok(Some(_)) = child.try_wait() {
                reaped = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if !reaped {
            let _ = child.kill();
            let _ = child.wait();
        }
        let master = child.id() as i32;
        let backends: Vec<i32> = server.into_iter().filter(|&p| p != master).collect();
        let start = Instant::now();
        while start.elapsed() < BOUND && backends.iter().any(|&p| alive(p)) {
            std::thread::sleep(Duration::from_millis(5));
        }
        for &p in backends.iter().filter(|&&p| alive(p)) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }

    /// Process ids of the server's processes: the postmaster and its children (backends).
    fn server_pids(&self) -> Vec<i32> {
        let master = self.pid() as i32;
        if master == 0 {
            return Vec::new();
        }
        let mut pids = vec![master];
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if pid != master && parent_of(pid) == Some(master) {
                pids.push(pid);
            }
        }
        pids
    }
}

/// The parent of `pid`, from field 4 of `/proc/<pid>/stat` (after the parenthesised name).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse::<i32>().ok())
}

/// Whether `pid` runs (a zombie has exited: state `Z` in `/proc/<pid>/stat`).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn as_user(cmd: &mut Command, user: &Option<User>) {
    if let Some(u) = user {
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        cmd.env("HOME", &u.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_starts_survives_a_kill_and_stops_on_drop() {
        let Some(mut pg) = PgServer::start_for_test(PgOptions::default()) else {
            return;
        };
        let url = pg.create_database("harness").expect("create database");
        assert!(url.ends_with("/harness"));
        let port = pg.port();
        let first = pg.pid();
        pg.kill();
        pg.restart().expect("restart after a kill");
        assert_eq!(pg.port(), port);
        assert_ne!(pg.pid(), first);
        // The database made before the kill is still there: a second CREATE says so.
        let again = pg
            .create_database("harness")
            .expect_err("it exists")
            .to_string();
        assert!(again.contains("already exists"), "{again}");
        let dir = pg.dir.path().to_path_buf();
        let master = pg.pid();
        drop(pg);
        assert!(!dir.exists(), "the server's directory is removed on drop");
        assert!(
            !Path::new(&format!("/proc/{master}")).exists(),
            "the server is stopped on drop"
        );
    }
}
