//! The chaos campaign in CI: `treaty-chaos` (debug build) runs a short campaign and must find
//! nothing, after real faults; and the same runner against a deliberately broken coordinator
//! must find violations. A long campaign is the same binary with `TREATY_CHAOS_SECS`.
//!
//! The runner is started as the leader of its own process group; every process it starts
//! (treatyd, bank instances) inherits the group, so the guard below can SIGKILL all of them
//! at once whatever happens (timeout, panic). Data directories live in a temporary directory
//! owned by the test, removed on drop.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// SIGKILLs a process group when dropped.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

struct Run {
    code: i32,
    stdout: String,
    summary: serde_json::Value,
}

/// Run `treaty-chaos` with `env` for at most `bound`; everything it started dies with it.
fn chaos(env: &[(&str, &str)], bound: Duration) -> Run {
    let bin = treaty_tests::binary("treaty-tests", "treaty-chaos", "");
    // Build what the runner starts now, outside its time budget.
    treaty_tests::treatyd_bin();
    treaty_tests::bank_account_bin();
    let work = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(bin);
    cmd.arg("--work-dir")
        .arg(work.path())
        .env_remove("FAILPOINTS")
        .env_remove("TREATY_TEST_MUTATIONS")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0);
    let mut child = cmd.spawn().expect("start treaty-chaos");
    let _group = Group(child.id() as i32);
    let mut out = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            panic!("treaty-chaos did not finish within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = reader.join().expect("reader");
    let line = stdout.lines().last().unwrap_or_default();
    let summary = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("last line is not the JSON summary ({e}): {stdout}"));
    Run {
        code: status.code().unwrap_or(-1),
        stdout,
        summary,
    }
}

fn count(run: &Run, field: &str) -> u64 {
    run.summary[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field} missing in {}", run.summary))
}

#[test]
fn a_short_chaos_campaign_finds_nothing() {
    let run = chaos(
        &[("TREATY_CHAOS_SECS", "50"), ("TREATY_SEED", "20240601")],
        Duration::from_secs(170),
    );
    assert_eq!(count(&run, "violations"), 0, "{}", run.stdout);
    assert_eq!(run.code, 0, "{}", run.stdout);
    for field in [
        "transactions",
        "committed",
        "aborted",
        "participant_kills",
        "coordinator_kills",
        "proxy_faults",
    ] {
        assert!(count(&run, field) > 0, "{field} is 0: {}", run.summary);
    }
    // treatyd really crashed at its named failpoints (a build without them never does).
    let at_failpoints: u64 = run.summary["failpoint_crashes"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    assert!(at_failpoints > 0, "no failpoint crash: {}", run.summary);
    assert!(
        run.stdout.contains("seed 20240601"),
        "the seed is printed first: {}",
        run.stdout
    );
}

#[test]
fn a_coordinator_that_skips_a_compensation_is_caught() {
    let run = chaos(
        &[
            ("TREATY_CHAOS_SECS", "10"),
            ("TREATY_SEED", "7"),
            ("TREATY_TEST_MUTATIONS", "skip_one_compensation"),
        ],
        Duration::from_secs(170),
    );
    assert!(count(&run, "violations") > 0, "{}", run.stdout);
    assert_ne!(run.code, 0, "{}", run.stdout);
}
