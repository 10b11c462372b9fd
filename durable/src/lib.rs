//! Truly durable sled writes, with group commit: [`SledSync`].
//!
//! Its own crate because two parts need it and neither should depend on the other for it:
//! the coordinator's sled log and the participant SDK's sled barrier store.
//!
//! # Why `Db::flush()` is not enough
//!
//! sled 0.34's `Db::flush` ([`sled::Tree::flush`]) writes its log buffers and then calls
//! `sync_file_range` on Linux (`pagecache/iobuf.rs`). That pushes the data to the device queue, but it is not
//! `fsync`/`fdatasync`: the drive's volatile cache is not flushed and neither is the file
//! metadata (such as a grown file size), so a power loss can still lose "flushed" writes.
//! Worse, values larger than a quarter of a segment (about 128 KiB with the default 512 KiB
//! segments) are written as separate files under `<dir>/blobs/` (`pagecache/blob_io.rs`) with
//! no sync at all, and neither the `blobs` directory nor the database directory is ever
//! fsynced, so a new blob file (or the whole `<dir>/conf`) may not survive a crash even though
//! the log entry pointing at it does. sled's background flusher only runs a full `sync_all`
//! on `<dir>/db` every `flush_every_ms`.
//!
//! Measured on the FUSE filesystem of `tests/lazyfs`, which drops whatever was not fsynced on
//! a simulated power cut: with step 3 below, every acknowledged record survives; without it
//! (cargo feature `mutation-skip-fdatasync`, a deliberate bug for that test only), all of them
//! are lost, because `sync_file_range` never reaches the filesystem as a sync.
//!
//! # What a sync round does
//!
//! [`SledSync::sync`] enqueues the caller; a single flusher thread (`treaty-sled-sync`) loops:
//!
//! 1. take every waiting caller (up to [`WAITERS_PER_ROUND_MAX`]);
//! 2. `db.flush()`: sled writes and `sync_file_range`s its log buffers;
//! 3. `fdatasync` `<dir>/db` (through a `File` kept open for the life of the thread);
//! 4. `fsync` every file in `<dir>/blobs/` and every other regular file directly in `<dir>`
//!    (`conf`, snapshots) that was not synced before at its current length. Files are keyed
//!    by (name, length), length read *before* the fsync: sled writes a blob once, front to
//!    back, with `create_new`, so a file seen mid-write has a shorter length and is synced
//!    again in a later round. Names that disappeared are forgotten;
//! 5. `fsync` the `blobs` directory and `<dir>` when their list of entries changed since the
//!    last round (and both, plus the parent of `<dir>`, in the first round), so new files are
//!    reachable after a crash;
//! 6. wake every caller of the round with the result.
//!
//! Concurrent callers therefore share one flush (group commit): throughput scales with the
//! number of writers instead of being capped by the device's flush latency.
//!
//! # Errors: any error is fatal
//!
//! An `Err` from [`SledSync::sync`] (or [`SledSync::sync_blocking`]) always means *durability
//! can no longer be promised*: the handle is poisoned, every later sync fails at once, and the
//! process must stop and recover from disk. After a failed fsync Linux may drop the dirty pages
//! and report success on the next fsync ("fsyncgate"), so retrying an fsync proves nothing.
//!
//! Failures that say nothing about the data, only about the moment (listing a directory or
//! opening a file to fsync it with `EMFILE`, `ENFILE`, `EINTR`, `EAGAIN`, `ENOMEM`,
//! `ENOBUFS`), are retried inside the round with a capped exponential backoff
//! ([`SyncOptions`]: 1 ms doubling to 100 ms, for up to 30 s per round by default). Callers
//! just wait longer. Only a transient failure that outlasts that bound fails the round, and
//! then fatally like any other: a process that cannot open a file for 30 s is not healthy.
//! Any other failure is fatal at once: `ENOSPC` or `EIO` from an fsync or from sled's flush,
//! and listing or opening errors that will not pass by waiting (`EACCES`, a vanished sled
//! directory). A blob file removed between the listing and its open is simply skipped.
//!
//! # Failpoints (cargo feature `failpoints`)
//!
//! Compiled out otherwise, so a release build cannot be told to break itself. Armed through
//! the `FAILPOINTS` environment variable (with [`fail::FailScenario`]) or `fail::cfg`;
//! `return` makes the step fail, and a count such as `3*return` makes it fail that many times:
//!
//! - `treaty::sync::fsync_eio`: the fdatasync of `<dir>/db` fails with `EIO` (fatal);
//! - `treaty::sync::fsync_enospc`: the fdatasync of `<dir>/db` fails with `ENOSPC` (fatal);
//! - `treaty::sync::list_emfile`: listing a directory fails with `EMFILE` (transient: retried).

#![warn(missing_docs)]

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The most callers one round answers. A round's flush covers every write completed before it
/// started, so the cap only bounds the memory a round holds; the rest go to the next round.
pub const WAITERS_PER_ROUND_MAX: usize = 65_536;

/// Name of the flusher thread, as seen in debuggers and `top -H`.
const THREAD_NAME: &str = "treaty-sled-sync";

/// How a [`SledSync`] flusher rides out transient failures. [`SyncOptions::default`] suits
/// production; tests shorten the bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncOptions {
    /// Wait before the first retry of a transient failure (default 1 ms).
    pub retry_backoff_initial: Duration,
    /// Cap of the backoff, which doubles after each retry (default 100 ms).
    pub retry_backoff_max: Duration,
    /// How long a round keeps retrying transient failures, counted from the first one, before
    /// it gives up and poisons the handle (default 30 s).
    pub retry_total_max: Duration,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            retry_backoff_initial: Duration::from_millis(1),
            retry_backoff_max: Duration::from_millis(100),
            retry_total_max: Duration::from_secs(30),
        }
    }
}

/// Makes sled writes truly durable, with group commit.
///
/// Cheap to clone; every clone feeds the same flusher thread. The thread stops when the last
/// clone is dropped, and that drop waits for it (at most one round), so the sled `Db` it holds
/// is released and the directory can be reopened right away.
#[derive(Clone)]
pub struct SledSync {
    inner: Arc<Inner>,
}

/// Owns the request channel and the thread; dropping the last one stops the thread.
struct Inner {
    tx: Option<mpsc::Sender<Waiter>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// State shared by the handles and the flusher thread.
struct Shared {
    /// Completed rounds.
    flushes: AtomicU64,
    /// Transient failures retried so far (see [`SyncOptions`]).
    transient_retries: AtomicU64,
    /// Set once a round failed; every later sync fails with this message.
    poisoned: Mutex<Option<String>>,
    /// Told of every round (set once, by [`SledSync::observe`]).
    observer: std::sync::OnceLock<Arc<dyn FlushObserver>>,
    /// Files already fsynced, by path relative to `dir` (e.g. `blobs/123`), with the length
    /// they had just before the fsync.
    synced: Mutex<HashMap<PathBuf, u64>>,
}

/// Told of every flush round, on the flusher thread (so it must be quick): for metrics.
pub trait FlushObserver: Send + Sync {
    /// A round made `records` waiting callers durable (`ok`), or failed for all of them.
    fn flushed(&self, records: usize, ok: bool);
}

/// How to answer one caller.
enum Waiter {
    Async(tokio::sync::oneshot::Sender<io::Result<()>>),
    Blocking(mpsc::SyncSender<io::Result<()>>),
}

impl Waiter {
    fn answer(self, res: io::Result<()>) {
        // The caller may have given up (a cancelled future); nobody is left to tell.
        match self {
            Waiter::Async(tx) => {
                let _ = tx.send(res);
            }
            Waiter::Blocking(tx) => {
                let _ = tx.send(res);
            }
        }
    }
}

impl SledSync {
    /// Starts the flusher thread for `db` with the default [`SyncOptions`]. `dir` is the
    /// directory the sled Db was opened at.
    ///
    /// Fails if `<dir>/db` cannot be opened or the thread cannot be spawned.
    pub fn new(db: sled::Db, dir: &std::path::Path) -> std::io::Result<SledSync> {
        SledSync::with_options(db, dir, SyncOptions::default())
    }

    /// [`SledSync::new`] with explicit [`SyncOptions`].
    pub fn with_options(
        db: sled::Db,
        dir: &std::path::Path,
        options: SyncOptions,
    ) -> std::io::Result<SledSync> {
        let db_path = dir.join("db");
        let db_file = File::open(&db_path).map_err(|e| {
            with_context(
                e,
                &format!(
                    "opening {} to fsync it (is {} a sled directory?)",
                    db_path.display(),
                    dir.display()
                ),
            )
        })?;
        let shared = Arc::new(Shared {
            flushes: AtomicU64::new(0),
            transient_retries: AtomicU64::new(0),
            poisoned: Mutex::new(None),
            observer: std::sync::OnceLock::new(),
            synced: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = mpsc::channel::<Waiter>();
        let mut flusher = Flusher {
            db,
            dir: dir.to_path_buf(),
            db_file,
            options,
            shared: Arc::clone(&shared),
            dir_entries: None,
            blob_entries: None,
        };
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.to_string())
            .spawn(move || flusher.run(rx))
            .map_err(|e| with_context(e, "spawning the sled sync thread"))?;
        Ok(SledSync {
            inner: Arc::new(Inner {
                tx: Some(tx),
                thread: Some(thread),
                shared,
            }),
        })
    }

    /// Resolves once every write to `db` that completed before this call is on stable storage.
    ///
    /// Concurrent callers share one flush (group commit). Cancelling the future does not
    /// cancel the round; it only drops the answer.
    ///
    /// # Errors
    ///
    /// An `Err` ALWAYS means that durability can no longer be promised: the handle is
    /// poisoned, every later call fails at once, and the process must stop and recover from
    /// disk (reopen sled, then sync once before trusting what it reads). Transient failures
    /// (too many open files, interrupted calls) never surface here: they are retried within
    /// the bound of [`SyncOptions`], and only one that outlasts it becomes this fatal error.
    pub async fn sync(&self) -> std::io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(Waiter::Async(tx))?;
        rx.await.map_err(|_| thread_gone())?
    }

    /// Blocking variant of [`SledSync::sync`] for non-async callers, with the same contract:
    /// an `Err` is fatal. Blocks the calling thread for up to two rounds; do not call it on an
    /// async executor thread.
    pub fn sync_blocking(&self) -> std::io::Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.enqueue(Waiter::Blocking(tx))?;
        rx.recv().map_err(|_| thread_gone())?
    }

    /// Tell `observer` of every later round. Only the first observer set is kept; returns
    /// false if one was already set.
    pub fn observe(&self, observer: Arc<dyn FlushObserver>) -> bool {
        self.inner.shared.observer.set(observer).is_ok()
    }

    /// Number of flush+fsync rounds completed successfully so far.
    pub fn flushes(&self) -> u64 {
        self.inner.shared.flushes.load(Ordering::Relaxed)
    }

    /// Number of transient failures (listing or opening files) retried so far. Each is a
    /// backoff the callers waited through; none failed a sync.
    pub fn transient_retries(&self) -> u64 {
        self.inner.shared.transient_retries.load(Ordering::Relaxed)
    }

    /// Why the handle is poisoned, if it is: once set, every sync fails with this message.
    pub fn poisoned(&self) -> Option<String> {
        self.inner.shared.poison_message()
    }

    fn enqueue(&self, w: Waiter) -> io::Result<()> {
        if let Some(msg) = self.inner.shared.poison_message() {
            return Err(io::Error::other(msg));
        }
        let tx = self.inner.tx.as_ref().ok_or_else(thread_gone)?;
        tx.send(w).map_err(|_| thread_gone())
    }

    /// Paths (relative to the sled directory) of the files fsynced so far, for tests.
    #[cfg(test)]
    fn synced_files(&self) -> Vec<PathBuf> {
        let synced = lock(&self.inner.shared.synced);
        let mut v: Vec<PathBuf> = synced.keys().cloned().collect();
        v.sort();
        v
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop after its current round; wait for it so
        // the sled Db it holds is closed (sled locks `<dir>/db` while open).
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            // A panic in the thread has already been reported by the panic hook.
            let _ = t.join();
        }
    }
}

impl Shared {
    fn poison_message(&self) -> Option<String> {
        lock(&self.poisoned).clone()
    }
}

/// The flusher thread's state.
struct Flusher {
    db: sled::Db,
    dir: PathBuf,
    /// `<dir>/db`, kept open: opening it per round would cost a syscall and could miss errors
    /// reported against an earlier descriptor.
    db_file: File,
    options: SyncOptions,
    shared: Arc<Shared>,
    /// Entries of `dir` at the last round; `None` before the first round.
    dir_entries: Option<HashSet<OsString>>,
    /// Entries of `dir/blobs` at the last round; `None` before the first round.
    blob_entries: Option<HashSet<OsString>>,
}

/// The retry state of one round: transient failures share one bound per round, so a round
/// with many files still gives up after [`SyncOptions::retry_total_max`] in all.
struct RetryBudget {
    /// When the round gives up; set at its first transient failure.
    deadline: Option<Instant>,
    /// The next wait.
    backoff: Duration,
    /// Transient failures met in this round.
    attempts: u64,
}

impl Flusher {
    fn run(&mut self, rx: mpsc::Receiver<Waiter>) {
        // `recv` fails only when every `SledSync` is gone: time to stop.
        while let Ok(first) = rx.recv() {
            let mut waiters = vec![first];
            while waiters.len() < WAITERS_PER_ROUND_MAX {
                match rx.try_recv() {
                    Ok(w) => waiters.push(w),
                    Err(_) => break,
                }
            }
            let res = self.round_checked();
            if let Some(o) = self.shared.observer.get() {
                o.flushed(waiters.len(), res.is_ok());
            }
            for w in waiters {
                // io::Error is not Clone; every waiter gets an equivalent one.
                w.answer(match &res {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                });
            }
        }
    }

    /// One round, honouring and setting the poison flag: any failure poisons.
    fn round_checked(&mut self) -> io::Result<()> {
        if let Some(msg) = self.shared.poison_message() {
            return Err(io::Error::other(msg));
        }
        let mut budget = RetryBudget {
            deadline: None,
            backoff: self.options.retry_backoff_initial,
            attempts: 0,
        };
        match self.round(&mut budget) {
            Ok(()) => {
                self.shared.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                let msg = format!(
                    "durability of the sled database at {} can no longer be guaranteed: {e}; \
                     stop the process and restart it to recover from disk",
                    self.dir.display()
                );
                tracing::error!("{msg}");
                *lock(&self.shared.poisoned) = Some(msg.clone());
                Err(io::Error::new(e.kind(), msg))
            }
        }
    }

    /// Runs `op` until it succeeds, retrying transient failures with a capped, doubling
    /// backoff until the round's budget is spent. Any other failure is returned at once.
    /// `what` says what was being done, for the error.
    fn retrying<T>(
        &self,
        budget: &mut RetryBudget,
        what: &dyn Fn() -> String,
        mut op: impl FnMut() -> io::Result<T>,
    ) -> io::Result<T> {
        loop {
            let e = match op() {
                Ok(v) => return Ok(v),
                Err(e) if is_transient(&e) => e,
                Err(e) => return Err(with_context(e, &what())),
            };
            budget.attempts += 1;
            let now = Instant::now();
            let deadline = *budget
                .deadline
                .get_or_insert(now + self.options.retry_total_max);
            if now >= deadline {
                return Err(with_context(
                    e,
                    &format!(
                        "{} (still failing after {} retries over {:?}; transient failures are \
                         retried for up to {:?})",
                        what(),
                        budget.attempts - 1,
                        self.options.retry_total_max,
                        self.options.retry_total_max
                    ),
                ));
            }
            if budget.attempts == 1 {
                tracing::warn!(
                    "{}: {e}; retrying for up to {:?}",
                    what(),
                    self.options.retry_total_max
                );
            }
            self.shared
                .transient_retries
                .fetch_add(1, Ordering::Relaxed);
            // A backoff, not a synchronization: nothing signals that file descriptors or
            // memory became available again.
            std::thread::sleep(budget.backoff.min(deadline - now));
            budget.backoff = (budget.backoff * 2).min(self.options.retry_backoff_max);
        }
    }

    fn round(&mut self, budget: &mut RetryBudget) -> io::Result<()> {
        let dir = self.dir.clone();
        self.db.flush().map_err(|e| {
            with_context(
                io::Error::other(e),
                &format!("flushing the sled database at {}", dir.display()),
            )
        })?;
        fdatasync_db(&self.db_file)
            .map_err(|e| with_context(e, &format!("fdatasync of {}", dir.join("db").display())))?;

        let blobs_dir = dir.join("blobs");
        let blob_names = self.retrying(
            budget,
            &|| format!("listing {}", blobs_dir.display()),
            || list_dir(&blobs_dir, true),
        )?;
        self.sync_new_files(budget, Path::new("blobs"), &blob_names)?;
        let top_names = self.retrying(budget, &|| format!("listing {}", dir.display()), || {
            list_dir(&dir, false)
        })?;
        // `db` is fdatasync'd above every round; the others (`conf`, snapshots) by length.
        let top_files: Vec<OsString> = top_names
            .iter()
            .filter(|n| n.as_os_str() != "db" && dir.join(n).is_file())
            .cloned()
            .collect();
        self.sync_new_files(budget, Path::new(""), &top_files)?;
        self.forget_missing(&blob_names, &top_files);

        let first_round = self.dir_entries.is_none();
        let blob_set: HashSet<OsString> = blob_names.into_iter().collect();
        if self.blob_entries.as_ref() != Some(&blob_set) && blobs_dir.is_dir() {
            self.fsync_dir(budget, &blobs_dir)?;
        }
        self.blob_entries = Some(blob_set);
        let top_set: HashSet<OsString> = top_names.into_iter().collect();
        if self.dir_entries.as_ref() != Some(&top_set) {
            self.fsync_dir(budget, &dir)?;
        }
        self.dir_entries = Some(top_set);
        if first_round {
            // The entry of `dir` itself in its parent, in case the directory is new. A parent
            // we cannot open (e.g. no permission) is not our data: skip it.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                if File::open(parent).is_ok() {
                    self.fsync_dir(budget, parent)?;
                }
            }
        }
        Ok(())
    }

    /// fsync a directory so the entries created or removed in it survive a crash.
    fn fsync_dir(&self, budget: &mut RetryBudget, dir: &Path) -> io::Result<()> {
        let f = self.retrying(
            budget,
            &|| format!("opening directory {} to fsync it", dir.display()),
            || File::open(dir),
        )?;
        f.sync_all()
            .map_err(|e| with_context(e, &format!("fsync of directory {}", dir.display())))
    }

    /// fsyncs each of `names` (in `self.dir/sub`) whose current length differs from the one
    /// recorded when it was last synced.
    fn sync_new_files(
        &mut self,
        budget: &mut RetryBudget,
        sub: &Path,
        names: &[OsString],
    ) -> io::Result<()> {
        for name in names {
            let rel = sub.join(name);
            let path = self.dir.join(&rel);
            let opened = self.retrying(
                budget,
                &|| format!("opening {} to fsync it", path.display()),
                || match File::open(&path) {
                    Ok(f) => Ok(Some(f)),
                    // Removed since the listing (sled's blob GC, a snapshot's temp file).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                },
            )?;
            let Some(file) = opened else { continue };
            // The length before the fsync: everything up to it is covered by the fsync.
            let len = self
                .retrying(
                    budget,
                    &|| format!("reading the length of {}", path.display()),
                    || file.metadata(),
                )?
                .len();
            if lock(&self.shared.synced).get(&rel) == Some(&len) {
                continue;
            }
            file.sync_all()
                .map_err(|e| with_context(e, &format!("fsync of {}", path.display())))?;
            lock(&self.shared.synced).insert(rel, len);
        }
        Ok(())
    }

    /// Drops remembered files that no longer exist, so the map stays as small as the
    /// directory and a reused name is synced again.
    fn forget_missing(&mut self, blob_names: &[OsString], top_files: &[OsString]) {
        let present: HashSet<PathBuf> = blob_names
            .iter()
            .map(|n| Path::new("blobs").join(n))
            .chain(top_files.iter().map(PathBuf::from))
            .collect();
        lock(&self.shared.synced).retain(|p, _| present.contains(p));
    }
}

/// The names in `dir`. A missing `dir` is empty when `missing_ok` (sled creates `blobs`
/// lazily in some versions).
fn list_dir(dir: &Path, missing_ok: bool) -> io::Result<Vec<OsString>> {
    fail::fail_point!("treaty::sync::list_emfile", |_| Err(
        io::Error::from_raw_os_error(libc::EMFILE)
    ));
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if missing_ok && e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    rd.map(|entry| entry.map(|e| e.file_name())).collect()
}

/// The fdatasync of `<dir>/db`, where sled's log lives: the write every forced write needs.
fn fdatasync_db(file: &File) -> io::Result<()> {
    fail::fail_point!("treaty::sync::fsync_eio", |_| Err(
        io::Error::from_raw_os_error(libc::EIO)
    ));
    fail::fail_point!("treaty::sync::fsync_enospc", |_| Err(
        io::Error::from_raw_os_error(libc::ENOSPC)
    ));
    if cfg!(feature = "mutation-skip-fdatasync") {
        // The deliberate bug the power-cut test must catch: only sled's own
        // `sync_file_range`, which is not a sync, stands between a write and its loss.
        return Ok(());
    }
    file.sync_data()
}

/// Whether `e` says only that the moment was bad (no descriptor, no memory, interrupted),
/// not that data was lost: such a failure is worth retrying.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE | libc::ENFILE | libc::EINTR | libc::EAGAIN | libc::ENOMEM | libc::ENOBUFS
        )
    ) || matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::OutOfMemory
    )
}

fn with_context(e: io::Error, doing: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{doing}: {e}"))
}

fn thread_gone() -> io::Error {
    io::Error::other("the sled sync thread has stopped (it panicked or is shutting down)")
}

/// Locks `m`, ignoring poisoning: the guarded data (counters, a map of synced files) stays
/// consistent even if a holder panicked, because every update is a single insert or store.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (sled::Db, SledSync) {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(8 << 20)
            .open()
            .expect("open sled");
        let sync = SledSync::new(db.clone(), dir).expect("start SledSync");
        (db, sync)
    }

    #[test]
    fn sync_blocking_makes_a_round_and_writes_survive_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let (db, sync) = open(tmp.path());
            db.insert(b"k", b"v".to_vec()).expect("insert");
            sync.sync_blocking().expect("sync");
            assert_eq!(sync.flushes(), 1);
            // The first round syncs sled's `conf`, which `Db::flush` never does.
            assert!(sync.synced_files().contains(&PathBuf::from("conf")));
        }
        let (db, _sync) = open(tmp.path());
        assert_eq!(db.get(b"k").expect("get").as_deref(), Some(&b"v"[..]));
    }

    #[tokio::test]
    async fn async_sync_resolves() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (db, sync) = open(tmp.path());
        db.insert(b"k", b"v".to_vec()).expect("insert");
        sync.sync().await.expect("sync");
        sync.sync().await.expect("sync");
        assert_eq!(sync.flushes(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_syncs_share_flushes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (db, sync) = open(tmp.path());
        const CALLERS: usize = 64;
        // Start every caller before any can finish: the barrier releases them together.
        let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
        let mut tasks = Vec::new();
        for i in 0..CALLERS {
            let (db, sync, barrier) = (db.clone(), sync.clone(), Arc::clone(&barrier));
            tasks.push(tokio::spawn(async move {
                db.insert(format!("k{i}"), vec![0u8; 200]).expect("insert");
                barrier.wait().await;
                sync.sync().await
            }));
        }
        for t in tasks {
            t.await.expect("task").expect("sync");
        }
        let flushes = sync.flushes();
        assert!(flushes >= 1);
        assert!(
            flushes < CALLERS as u64,
            "{CALLERS} concurrent callers took {flushes} flushes: no group commit"
        );
    }

    #[test]
    fn large_value_blob_file_is_fsynced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (db, sync) = open(tmp.path());
        db.insert(b"big", vec![7u8; 300 * 1024]).expect("insert");
        sync.sync_blocking().expect("sync");
        let blobs: Vec<PathBuf> = std::fs::read_dir(tmp.path().join("blobs"))
            .expect("blobs dir")
            .map(|e| Path::new("blobs").join(e.expect("entry").file_name()))
            .collect();
        assert!(!blobs.is_empty(), "a 300 KiB value should be a blob file");
        let synced = sync.synced_files();
        for b in &blobs {
            assert!(synced.contains(b), "{} was not fsynced", b.display());
        }
        // Overwriting removes the old blob: it must be forgotten, the new one synced.
        db.insert(b"big", vec![8u8; 300 * 1024]).expect("insert");
        sync.sync_blocking().expect("sync");
        let now: Vec<PathBuf> = std::fs::read_dir(tmp.path().join("blobs"))
            .expect("blobs dir")
            .map(|e| Path::new("blobs").join(e.expect("entry").file_name()))
            .collect();
        let synced = sync.synced_files();
        for b in &now {
            assert!(synced.contains(b), "{} was not fsynced", b.display());
        }
        for s in synced.iter().filter(|p| p.starts_with("blobs")) {
            assert!(
                now.contains(s),
                "{} is gone but still remembered",
                s.display()
            );
        }
    }

    #[test]
    fn only_shortages_are_transient() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::EINTR,
            libc::EAGAIN,
            libc::ENOMEM,
        ] {
            assert!(
                is_transient(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [
            libc::EIO,
            libc::ENOSPC,
            libc::EACCES,
            libc::ENOENT,
            libc::EROFS,
        ] {
            assert!(
                !is_transient(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
    }

    #[test]
    fn new_fails_with_context_outside_a_sled_dir() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().temporary(true).open().expect("open");
        let err = SledSync::new(db, &tmp.path().join("nope"))
            .err()
            .expect("no db file there");
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn dropping_the_last_handle_releases_the_db() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (db, sync) = open(tmp.path());
        sync.sync_blocking().expect("sync");
        drop(sync);
        drop(db);
        // sled locks `<dir>/db`: this open fails if the flusher thread still held the Db.
        let (_db, sync) = open(tmp.path());
        sync.sync_blocking().expect("sync");
    }
}
