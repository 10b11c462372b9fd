//! LazyFS for Treaty: a FUSE filesystem that loses unsynced writes on a simulated power cut,
//! modelled on LazyFS (the filesystem Jepsen uses for the same purpose).
//!
//! - [`fs`]: the filesystem itself ([`fs::LazyFilesystem`] over a backing directory) and its
//!   model of what a power cut loses; read its module doc before trusting a result.
//! - [`serve`]: what the `treaty-lazyfs` binary runs: mount, answer the control socket.
//! - [`LazyFs`]: the test-side guard: [`LazyFs::mount`] starts the binary, [`LazyFs::cut_power`]
//!   drops every unsynced write, and dropping the guard unmounts and stops the process.
//! - The `lazyfs-probe` binary writes acknowledged records with sled + `SledSync` on a mount;
//!   `tests/power_cut.rs` cuts the power under it, with the real `SledSync` and with a broken
//!   one that must be caught.
//!
//! # Control protocol
//!
//! The binary listens on a unix socket (`--control PATH`). One request per connection, one
//! line each way: `cut` → `ok FILES BYTES` once every unsynced write is discarded (FILES files,
//! BYTES bytes of unsynced content); `ping` → `ok`. It prints `ready` on stdout once mounted.

pub mod fs;

/// The records `lazyfs-probe` writes, shared with the test that checks them.
pub mod probe {
    /// The key of record `i`.
    pub fn key(i: u64) -> String {
        format!("rec-{i:06}")
    }

    /// The value of record `i`: small, except every 16th (from the 8th), which is 300 KiB so
    /// that sled stores it as a separate blob file, whose fsync `SledSync` must not miss.
    pub fn value(i: u64) -> Vec<u8> {
        let line = format!("record {i:06} ");
        let repeat = if i % 16 == 7 {
            300 * 1024 / line.len()
        } else {
            8
        };
        line.repeat(repeat).into_bytes()
    }
}

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub use fs::CutReport;

/// How long a mount may take to be ready, and a control request to be answered.
const STARTUP_BOUND: Duration = Duration::from_secs(30);
const CONTROL_BOUND: Duration = Duration::from_secs(30);
/// How long the process may take to exit once unmounted, before it is killed.
const EXIT_BOUND: Duration = Duration::from_secs(10);

/// What to tell someone whose mount failed.
pub const INSTALL_HINT: &str = "FUSE needs /dev/fuse and fusermount3: install it with \
     `apt-get install -y fuse3` (as root)";

/// Mounts a [`fs::LazyFilesystem`] over `backing` at `mountpoint` and serves it until it is
/// unmounted, answering power-cut requests on `control`. Prints `ready` on stdout once the
/// mount can be used. This is the `treaty-lazyfs` binary's body.
pub fn serve(backing: &Path, mountpoint: &Path, control: &Path) -> io::Result<()> {
    if !backing.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "the backing directory {} does not exist; create it first",
                backing.display()
            ),
        ));
    }
    let state = Arc::new(Mutex::new(fs::LazyState::new(backing)));
    let listener = UnixListener::bind(control).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("binding the control socket {}: {e}", control.display()),
        )
    })?;
    {
        let state = Arc::clone(&state);
        std::thread::Builder::new()
            .name("lazyfs-control".into())
            .spawn(move || control_loop(listener, state))?;
    }
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("treaty-lazyfs".into()),
        // If this process dies, fusermount3 unmounts: no stale mount is left behind.
        fuser::MountOption::AutoUnmount,
    ];
    config.acl = fuser::SessionACL::RootAndOwner;
    let session = fuser::Session::new(fs::LazyFilesystem::new(state), mountpoint, &config)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "mounting treaty-lazyfs at {}: {e}; {INSTALL_HINT}",
                    mountpoint.display()
                ),
            )
        })?;
    // The FUSE handshake is done: the mount answers from here on.
    println!("ready");
    io::stdout().flush()?;
    // Returns once the filesystem is unmounted.
    session.run()
}

fn control_loop(listener: UnixListener, state: Arc<Mutex<fs::LazyState>>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        // A client that sends garbage or vanishes only loses its own answer.
        let _ = answer(conn, &state);
    }
}

fn answer(conn: UnixStream, state: &Mutex<fs::LazyState>) -> io::Result<()> {
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let reply = match line.trim() {
        "cut" => {
            let r = fs::lock(state).cut_power();
            format!("ok {} {}\n", r.files, r.bytes)
        }
        "ping" => "ok\n".to_string(),
        other => format!("error unknown command {other:?}; expected cut or ping\n"),
    };
    (&conn).write_all(reply.as_bytes())
}

/// A running `treaty-lazyfs` mount. Dropping it unmounts (`fusermount3 -u`) and stops the
/// process (killing it if it does not exit on its own).
///
/// The process dies with the thread that mounted it (`PR_SET_PDEATHSIG`) and unmounts itself
/// when it dies (`auto_unmount`), so a test killed mid-way leaves no mount behind: keep the
/// guard on the thread that created it.
pub struct LazyFs {
    child: Option<Child>,
    mountpoint: PathBuf,
    control: PathBuf,
    /// Holds the control socket.
    _control_dir: tempfile::TempDir,
}

impl LazyFs {
    /// Mounts `backing` at `mountpoint` with the `treaty-lazyfs` binary found by
    /// [`default_binary`], and waits until the mount is ready.
    pub fn mount(backing: &Path, mountpoint: &Path) -> io::Result<LazyFs> {
        LazyFs::mount_with(&default_binary()?, backing, mountpoint)
    }

    /// [`LazyFs::mount`] with an explicit path to the `treaty-lazyfs` binary.
    pub fn mount_with(bin: &Path, backing: &Path, mountpoint: &Path) -> io::Result<LazyFs> {
        let control_dir = tempfile::Builder::new()
            .prefix("treaty-lazyfs-control")
            .tempdir()?;
        let control = control_dir.path().join("control.sock");
        let mut child = Command::new(bin)
            .arg(backing)
            .arg(mountpoint)
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {}: {e}", bin.display())))?;
        // Read stdout on a thread so the wait for `ready` is bounded.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut guard = LazyFs {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            control,
            _control_dir: control_dir,
        };
        match rx.recv_timeout(STARTUP_BOUND) {
            Ok(line) if line == "ready" => Ok(guard),
            Ok(line) => Err(io::Error::other(format!(
                "treaty-lazyfs at {} said {line:?} instead of ready",
                mountpoint.display()
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = guard.child.as_mut().and_then(|c| c.wait().ok());
                guard.child = None;
                Err(io::Error::other(format!(
                    "treaty-lazyfs could not mount {} over {} (exit {status:?}; its error is on \
                     stderr above); {INSTALL_HINT}",
                    mountpoint.display(),
                    backing.display()
                )))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "treaty-lazyfs did not mount {} within {STARTUP_BOUND:?}",
                    mountpoint.display()
                ),
            )),
        }
    }

    /// Where the filesystem is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Simulates a power cut: every write not fsynced since is discarded. Returns once that is
    /// done, with what was lost. Processes using the mount should be killed first, as a power
    /// cut would: a live process keeps the state it had in memory.
    pub fn cut_power(&self) -> io::Result<CutReport> {
        let reply = self.control("cut")?;
        let mut words = reply.split_whitespace();
        let parsed = match (words.next(), words.next(), words.next()) {
            (Some("ok"), Some(files), Some(bytes)) => files
                .parse()
                .ok()
                .zip(bytes.parse().ok())
                .map(|(files, bytes)| CutReport { files, bytes }),
            _ => None,
        };
        parsed.ok_or_else(|| {
            io::Error::other(format!(
                "treaty-lazyfs at {} answered {reply:?} to a power cut",
                self.mountpoint.display()
            ))
        })
    }

    fn control(&self, command: &str) -> io::Result<String> {
        let doing = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!(
                    "sending {command:?} to treaty-lazyfs at {} (socket {}): {e}",
                    self.mountpoint.display(),
                    self.control.display()
                ),
            )
        };
        let conn = UnixStream::connect(&self.control).map_err(doing)?;
        conn.set_read_timeout(Some(CONTROL_BOUND)).map_err(doing)?;
        (&conn)
            .write_all(format!("{command}\n").as_bytes())
            .map_err(doing)?;
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).map_err(doing)?;
        Ok(line.trim().to_string())
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // A normal unmount first; a lazy one if something still has a file open there.
        let unmounted =
            fusermount(&["-u"], &self.mountpoint) || fusermount(&["-uz"], &self.mountpoint);
        let deadline = Instant::now() + EXIT_BOUND;
        while unmounted && Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn fusermount(flags: &[&str], mountpoint: &Path) -> bool {
    Command::new("fusermount3")
        .args(flags)
        .arg(mountpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The `treaty-lazyfs` binary: `$TREATY_LAZYFS_BIN` if set, else the one cargo built next to
/// the running executable (`target/<profile>/`, the parent of a test's `deps/`).
pub fn default_binary() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("TREATY_LAZYFS_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("treaty-lazyfs"))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no treaty-lazyfs binary at {candidates:?}; build it with \
                 `cargo build -p treaty-lazyfs` or set TREATY_LAZYFS_BIN"
                ),
            )
        })
}

/// Whether FUSE failures must fail tests: in CI (`CI=true`) a test never skips for lack of
/// FUSE, since `.ci/run` installs it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Mounts, or, outside CI only, explains why this machine cannot and returns `None` so the
/// caller can skip. In CI a failed mount panics.
pub fn mount_or_skip(test: &str, backing: &Path, mountpoint: &Path) -> Option<LazyFs> {
    match LazyFs::mount(backing, mountpoint) {
        Ok(m) => Some(m),
        Err(e) if !in_ci() => {
            eprintln!("SKIPPED {test}: cannot mount treaty-lazyfs: {e}");
            None
        }
        Err(e) => panic!("{test}: cannot mount treaty-lazyfs (CI never skips this): {e}"),
    }
}
