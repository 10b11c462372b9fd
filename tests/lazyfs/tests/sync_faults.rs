//! `SledSync` under injected faults: transient failures are ridden out inside the flusher,
//! fatal ones poison the handle (see the contract on `SledSync::sync`).
//!
//! Both fault sources are process-global (the file-descriptor limit, and the `fail` crate's
//! configuration), so every test here takes [`serial`] first, and this file is its own test
//! process: no other test can be hit by the exhausted descriptors.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use treaty_durable::{SledSync, SyncOptions};

/// Serializes the tests of this file.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    // A test that failed while holding the lock left nothing shared behind that matters:
    // each test configures the faults it needs.
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn open(dir: &Path, options: SyncOptions) -> (sled::Db, SledSync) {
    let db = sled::Config::new()
        .path(dir)
        .open()
        .unwrap_or_else(|e| panic!("opening sled at {}: {e}", dir.display()));
    let sync = SledSync::with_options(db.clone(), dir, options)
        .unwrap_or_else(|e| panic!("starting SledSync at {}: {e}", dir.display()));
    (db, sync)
}

/// Makes every new file descriptor of this process fail with EMFILE until dropped: lowers the
/// soft `RLIMIT_NOFILE` just above the highest descriptor in use and fills the gap.
struct FdExhaustion {
    old: libc::rlimit,
    fillers: Vec<std::fs::File>,
}

impl FdExhaustion {
    fn start() -> FdExhaustion {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass, nothing else.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) };
        assert_eq!(rc, 0, "getrlimit: {}", std::io::Error::last_os_error());
        let highest = std::fs::read_dir("/proc/self/fd")
            .expect("listing /proc/self/fd")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .expect("some descriptor is open");
        let low = libc::rlimit {
            rlim_cur: (highest + 32).min(old.rlim_cur),
            rlim_max: old.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) };
        assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
        let mut fillers = Vec::new();
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => fillers.push(f),
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
                Err(e) => panic!("filling the descriptor table: {e}"),
            }
            assert!(fillers.len() < 100_000, "the descriptor table never filled");
        }
        FdExhaustion { old, fillers }
    }
}

impl Drop for FdExhaustion {
    fn drop(&mut self) {
        self.fillers.clear();
        // SAFETY: as above. Restoring can only fail if the hard limit changed, which we never do.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.old) };
    }
}

/// Waits up to `bound` for `cond`, polling: the flusher offers no event to wait on.
fn wait_until(bound: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < bound {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// The bug of issue 8: a round that met EMFILE while listing sled's directory failed, although
/// the data had been synced, and the coordinator then dropped the transaction. Now the flusher
/// waits the shortage out and the sync succeeds. (Against the old code this test failed: the
/// sync answered `Too many open files` at once.)
#[test]
fn running_out_of_file_descriptors_delays_a_sync_but_never_fails_it() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (db, sync) = open(tmp.path(), SyncOptions::default());
    db.insert(b"before", b"1".to_vec()).expect("insert");
    sync.sync_blocking()
        .expect("a sync with descriptors to spare");
    db.insert(b"during", b"2".to_vec()).expect("insert");

    let exhausted = FdExhaustion::start();
    let (tx, rx) = mpsc::channel();
    let caller = {
        let sync = sync.clone();
        std::thread::spawn(move || {
            let _ = tx.send(sync.sync_blocking());
        })
    };
    // Wait until the flusher is riding out EMFILE, or the sync has answered already.
    let mut early = None;
    let retrying = wait_until(Duration::from_secs(20), || {
        if let Ok(res) = rx.try_recv() {
            early = Some(res);
            return true;
        }
        sync.transient_retries() > 0
    });
    drop(exhausted);
    assert!(
        retrying,
        "the sync neither answered nor retried within 20 s"
    );
    let res = early.unwrap_or_else(|| {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the sync answers within 60 s once descriptors are back")
    });
    caller.join().expect("caller thread");
    res.expect("a sync that met EMFILE must be retried, not failed");
    assert!(sync.transient_retries() > 0, "EMFILE was never met");
    assert_eq!(sync.poisoned(), None);
    db.insert(b"after", b"3".to_vec()).expect("insert");
    sync.sync_blocking().expect("the handle still works");
}

#[test]
fn a_few_emfile_while_listing_are_retried_and_do_not_poison() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (db, sync) = open(tmp.path(), SyncOptions::default());
    db.insert(b"k", b"v".to_vec()).expect("insert");
    fail::cfg("treaty::sync::list_emfile", "3*return").expect("arming list_emfile");
    let res = sync.sync_blocking();
    fail::remove("treaty::sync::list_emfile");
    res.expect("three EMFILEs while listing are transient");
    assert_eq!(sync.transient_retries(), 3);
    assert_eq!(sync.poisoned(), None);
    sync.sync_blocking().expect("later syncs work");
}

#[test]
fn emfile_that_outlasts_the_bound_is_fatal() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    let options = SyncOptions {
        retry_total_max: Duration::from_millis(200),
        ..SyncOptions::default()
    };
    let (_db, sync) = open(tmp.path(), options);
    fail::cfg("treaty::sync::list_emfile", "return").expect("arming list_emfile");
    let started = Instant::now();
    let res = sync.sync_blocking();
    fail::remove("treaty::sync::list_emfile");
    let err = res.expect_err("EMFILE for longer than the bound fails the sync");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "gave up after {:?}, before the bound",
        started.elapsed()
    );
    assert!(sync.transient_retries() > 1, "the backoff never retried");
    assert!(err.to_string().contains("still failing"), "{err}");
    assert!(sync.poisoned().is_some(), "a failed sync must poison");
    sync.sync_blocking()
        .expect_err("every sync after a fatal one fails");
}

fn assert_fatal(failpoint: &str, expected: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (db, sync) = open(tmp.path(), SyncOptions::default());
    db.insert(b"k", b"v".to_vec()).expect("insert");
    fail::cfg(failpoint, "1*return").expect("arming the failpoint");
    let res = sync.sync_blocking();
    fail::remove(failpoint);
    let err = res.expect_err("a failed fdatasync fails the sync");
    assert!(err.to_string().contains(expected), "{failpoint}: {err}");
    let poison = sync
        .poisoned()
        .expect("a failed fdatasync poisons the handle");
    assert!(poison.contains("can no longer be guaranteed"), "{poison}");
    // The failpoint fired once and is gone: the later failures are the poison alone.
    let started = Instant::now();
    for _ in 0..3 {
        let err = sync.sync_blocking().expect_err("every later sync fails");
        assert!(
            err.to_string().contains("can no longer be guaranteed"),
            "{err}"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(sync.sync())
        .expect_err("the async sync fails too");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a poisoned handle must fail at once, took {:?}",
        started.elapsed()
    );
}

#[test]
fn fsync_eio_is_fatal_and_poisons() {
    let _serial = serial();
    assert_fatal("treaty::sync::fsync_eio", "Input/output error");
}

#[test]
fn fsync_enospc_is_fatal_and_poisons() {
    let _serial = serial();
    assert_fatal("treaty::sync::fsync_enospc", "No space left");
}
