//! Child processes of the bench (treatyd, participants) and what `/proc` says about them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Build `treatyd` in the profile the bench itself was built in (release figures need a
/// release daemon), without failpoints, and copy it to `into`, so a concurrent build of
/// another profile or feature set cannot swap the binary under a running bench.
pub fn build_treatyd(into: &Path) -> Result<PathBuf, String> {
    let run = escargot::CargoBuild::new()
        .manifest_path(workspace_root().join("Cargo.toml"))
        .package("treaty-coordinator")
        .bin("treatyd")
        .current_release()
        .run()
        .map_err(|e| format!("cannot build treatyd: {e}"))?;
    let dest = into.join("treatyd");
    std::fs::copy(run.path(), &dest).map_err(|e| {
        format!(
            "cannot copy {} to {}: {e}",
            run.path().display(),
            dest.display()
        )
    })?;
    Ok(dest)
}

/// One line of a child's stderr, with the time it was read.
pub struct Line {
    pub at: Instant,
    pub text: String,
}

/// A child process, killed (SIGKILL) and reaped on drop, so a failing bench leaves nothing
/// running. Its stdout must print `listening on <addr>` once it serves; its stderr lines are
/// kept (for the daemon's log lines the bench parses) and those that look like warnings or
/// errors are echoed.
pub struct Proc {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub spawned_at: Instant,
    pub listening_at: Instant,
    lines: Arc<Mutex<Vec<Line>>>,
}

impl Proc {
    /// Start `cmd` and wait (up to `bound`) for its `listening on <addr>` stdout line.
    pub fn spawn(name: &str, mut cmd: Command, bound: Duration) -> Result<Proc, String> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawned_at = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        {
            let lines = Arc::clone(&lines);
            let label = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(text) = line else { break };
                    let upper = text.to_ascii_uppercase();
                    if upper.contains("WARN") || upper.contains("ERROR") || upper.contains("PANIC")
                    {
                        eprintln!("[{label}] {text}");
                    }
                    let mut l = lines.lock().unwrap_or_else(|p| p.into_inner());
                    // Bound what is kept: the bench parses a few lines, not a flood.
                    if l.len() < 10_000 {
                        l.push(Line {
                            at: Instant::now(),
                            text,
                        });
                    }
                }
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let label = name.to_string();
            std::thread::spawn(move || {
                let mut sent = false;
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
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
        }
        let mut proc = Proc {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            spawned_at,
            listening_at: spawned_at,
            lines,
        };
        match rx.recv_timeout(bound) {
            Ok((addr, at)) => {
                proc.addr = addr;
                proc.listening_at = at;
                Ok(proc)
            }
            Err(_) => {
                let status = proc
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                Err(format!(
                    "{name} did not report its address within {bound:?} (exit status: {status:?})"
                ))
            }
        }
    }

    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Wait (up to `bound`) for a stderr line matching `pred`; returns the time it was read
    /// and its text.
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

    /// SIGTERM, then wait (up to `bound`) for a clean exit; SIGKILL after that. Returns
    /// whether it exited on its own.
    pub fn terminate(&mut self, bound: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while start.elapsed() < bound {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat` times.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds of process `pid` so far (all its threads).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// User + system CPU seconds of this process so far (getrusage, all threads).
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass; zeroed is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
