//! Power cuts on treaty-lazyfs: what was fsynced survives, what was not is gone, and sled +
//! `SledSync` keeps every record it acknowledged, while a `SledSync` that skips the fdatasync
//! of sled's db file is caught losing acknowledged records.
//!
//! Needs FUSE (`/dev/fuse`, `fusermount3`, root). In CI a failed mount fails the test; elsewhere
//! the test says how to install fuse3 and skips.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use treaty_lazyfs::probe::{key, value};
use treaty_lazyfs::{mount_or_skip, LazyFs};

/// How many records a probe acknowledges before the power cut.
const RECORDS: u64 = 40;
/// How long a probe may take to acknowledge them all (a debug build on a busy machine).
const PROBE_BOUND: Duration = Duration::from_secs(120);

/// A backing directory and a mountpoint, removed on drop (after the mount guard is gone).
struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Dirs {
        let root = tempfile::Builder::new()
            .prefix("treaty-lazyfs-test")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir(root.path().join("backing")).expect("backing dir");
        std::fs::create_dir(root.path().join("mnt")).expect("mountpoint");
        Dirs { root }
    }
    fn backing(&self) -> PathBuf {
        self.root.path().join("backing")
    }
    fn mnt(&self) -> PathBuf {
        self.root.path().join("mnt")
    }
}

#[test]
fn fsynced_data_survives_a_power_cut_and_unsynced_data_is_gone() {
    let dirs = Dirs::new();
    let Some(fs) = mount_or_skip("power cut on plain files", &dirs.backing(), &dirs.mnt()) else {
        return;
    };
    let mnt = fs.mountpoint().to_path_buf();
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(mnt.join(name))
            .unwrap_or_else(|e| panic!("opening {name} on the mount: {e}"))
    };

    // Synced, then more written without a sync.
    let mut kept = open("kept");
    kept.write_all(b"synced part;").expect("write");
    kept.sync_all().expect("fsync");
    kept.write_all(b" unsynced tail").expect("write");
    drop(kept); // close(2) is not a sync.
                // Never synced since its creation.
    let mut lost = open("lost");
    lost.write_all(b"never synced").expect("write");
    drop(lost);
    // Synced with fdatasync, then shrunk without a sync.
    let mut shrunk = open("shrunk");
    shrunk.write_all(b"0123456789").expect("write");
    shrunk.sync_data().expect("fdatasync");
    shrunk.set_len(3).expect("truncate");
    drop(shrunk);

    assert_eq!(read(&mnt, "kept"), b"synced part; unsynced tail");
    assert_eq!(read(&mnt, "lost"), b"never synced");
    assert_eq!(read(&mnt, "shrunk"), b"012");

    let report = fs.cut_power().expect("power cut");
    assert_eq!(report.files, 3, "{report:?}");
    assert_eq!(read(&mnt, "kept"), b"synced part;");
    assert_eq!(
        read(&mnt, "lost"),
        b"",
        "a file never fsynced comes back empty"
    );
    assert_eq!(read(&mnt, "shrunk"), b"0123456789");
    // Names are not lazy: all three entries are still there.
    let mut names: Vec<String> = std::fs::read_dir(&mnt)
        .expect("listing the mount")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    assert_eq!(names, ["kept", "lost", "shrunk"]);
    // And a second cut with nothing unsynced loses nothing.
    assert_eq!(fs.cut_power().expect("power cut").files, 0);
    assert_eq!(read(&mnt, "kept"), b"synced part;");
}

fn read(dir: &Path, name: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    std::fs::File::open(dir.join(name))
        .and_then(|mut f| f.read_to_end(&mut buf))
        .unwrap_or_else(|e| panic!("reading {name} on the mount: {e}"));
    buf
}

#[test]
fn sled_with_sled_sync_keeps_every_acknowledged_record_across_a_power_cut() {
    #[cfg(feature = "mutation-skip-fdatasync")]
    panic!(
        "these tests were built with mutation-skip-fdatasync (--all-features?): the probe cargo \
         built for them is the broken one; run them without that feature"
    );
    #[cfg(not(feature = "mutation-skip-fdatasync"))]
    real_sled_sync_keeps_every_acknowledged_record();
}

#[cfg(not(feature = "mutation-skip-fdatasync"))]
fn real_sled_sync_keeps_every_acknowledged_record() {
    let outcome = power_cut_run(
        "sled + SledSync power cut",
        Path::new(env!("CARGO_BIN_EXE_lazyfs-probe")),
    );
    let Some(outcome) = outcome else { return };
    assert!(
        outcome.lost.is_empty(),
        "the real SledSync lost {} of {RECORDS} acknowledged records after a power cut: {:?}",
        outcome.lost.len(),
        outcome.lost
    );
}

/// The power-cut test is only worth something if it catches a SledSync that does not sync:
/// the probe built with `mutation-skip-fdatasync` relies on sled's `flush()` alone, whose
/// `sync_file_range` FUSE never sees as a sync, and must be seen losing acknowledged records.
#[test]
fn a_sled_sync_that_skips_the_fdatasync_is_caught_losing_acknowledged_records() {
    if !fuse_usable("broken SledSync power cut") {
        return;
    }
    let mutant = mutant_probe();
    let Some(outcome) = power_cut_run("broken SledSync power cut", &mutant) else {
        return;
    };
    assert!(
        !outcome.lost.is_empty(),
        "the SledSync built without the fdatasync of the db file lost no acknowledged record \
         ({} checked): the power-cut test cannot tell a sync from no sync",
        RECORDS
    );
    eprintln!(
        "the broken SledSync lost {} of {RECORDS} acknowledged records, as it must",
        outcome.lost.len()
    );
}

/// Checks FUSE with a throwaway mount before an expensive build, skipping outside CI.
fn fuse_usable(test: &str) -> bool {
    let dirs = Dirs::new();
    // Bound to a name so the mount is gone before `dirs` is removed.
    let mounted = mount_or_skip(test, &dirs.backing(), &dirs.mnt());
    let usable = mounted.is_some();
    drop(mounted);
    usable
}

/// The probe built with the deliberate bug, in its own target directory so that it never
/// replaces the real probe that cargo built for these tests.
fn mutant_probe() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.join("../..");
    // The test executable is <target>/<profile>/deps/power_cut-<hash>.
    let exe = std::env::current_exe().expect("current exe");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test runs from <target>/<profile>/deps")
        .to_path_buf();
    escargot::CargoBuild::new()
        .manifest_path(workspace.join("Cargo.toml"))
        .package("treaty-lazyfs")
        .bin("lazyfs-probe")
        .features("mutation-skip-fdatasync")
        .target_dir(target.join("lazyfs-mutant"))
        .run()
        .unwrap_or_else(|e| panic!("building lazyfs-probe with mutation-skip-fdatasync: {e}"))
        .path()
        .to_path_buf()
}

/// What a run found after the power cut.
struct Outcome {
    /// Acknowledged records missing or wrong after the cut.
    lost: Vec<u64>,
}

/// Mounts, runs `probe` until it acknowledged [`RECORDS`] records, kills it (SIGKILL), cuts
/// the power, reopens sled on the mount and lists the acknowledged records that are gone.
/// `None` if FUSE is not available outside CI.
fn power_cut_run(test: &str, probe: &Path) -> Option<Outcome> {
    let dirs = Dirs::new();
    let fs = mount_or_skip(test, &dirs.backing(), &dirs.mnt())?;
    let db_dir = fs.mountpoint().join("db");
    let acked = {
        let mut probe = Probe::start(probe, &db_dir);
        let acked = probe.acknowledged(RECORDS);
        // The process dies with the power; its memory and the kernel's state of its files go.
        probe.kill();
        acked
    };
    assert_eq!(acked, RECORDS, "the probe stopped acknowledging early");
    let report = fs.cut_power().expect("power cut");
    eprintln!("{test}: the power cut discarded {report:?}");
    // The probe's unacknowledged tail was written but never synced: a cut that discarded
    // nothing would prove nothing.
    assert!(
        report.files >= 1,
        "{test}: the power cut found nothing unsynced"
    );
    let lost = missing_records(&fs, &db_dir, acked);
    Some(Outcome { lost })
}

fn missing_records(_fs: &LazyFs, db_dir: &Path, acked: u64) -> Vec<u64> {
    // sled may find a torn log and recover a prefix: fine, as long as every acknowledged
    // record is in it.
    let db = sled::Config::new()
        .path(db_dir)
        .open()
        .unwrap_or_else(|e| panic!("reopening sled at {} after the cut: {e}", db_dir.display()));
    (0..acked)
        .filter(|&i| {
            let got = db
                .get(key(i))
                .unwrap_or_else(|e| panic!("reading record {i}: {e}"));
            got.as_deref() != Some(&value(i)[..])
        })
        .collect()
}

/// A running probe, killed on drop.
struct Probe {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Probe {
    fn start(bin: &Path, dir: &Path) -> Probe {
        let mut child = Command::new(bin)
            .arg(dir)
            .arg(RECORDS.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Probe { child, lines }
    }

    /// Waits (bounded) for `done` and returns how many records were acknowledged, in order.
    fn acknowledged(&mut self, expected: u64) -> u64 {
        let mut acked = 0;
        loop {
            match self.lines.recv_timeout(PROBE_BOUND) {
                Ok(line) if line == "done" => return acked,
                Ok(line) => {
                    assert_eq!(
                        line,
                        format!("ack {acked}"),
                        "the probe acknowledged out of order"
                    );
                    acked += 1;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    panic!(
                        "the probe exited after {acked} of {expected} acknowledgements \
                         ({status:?}); its error is on stderr above"
                    );
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "the probe acknowledged {acked} of {expected} records in {PROBE_BOUND:?}"
                ),
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.kill();
    }
}
