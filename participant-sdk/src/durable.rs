//! Truly durable sled writes, with group commit: [`SledSync`].
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
//! # Errors
//!
//! An error of a round is returned to every caller of that round. If the failure was in
//! `db.flush()` or in an fsync, the handle is poisoned and every later sync fails too: after a
//! failed fsync Linux may drop the dirty pages and report success on the next fsync
//! ("fsyncgate"), so durability can no longer be promised; restart and let sled recover.
//! Failures to list or open files (such as too many open files) do not poison.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The most callers one round answers. A round's flush covers every write completed before it
/// started, so the cap only bounds the memory a round holds; the rest go to the next round.
pub const WAITERS_PER_ROUND_MAX: usize = 65_536;

/// Name of the flusher thread, as seen in debuggers and `top -H`.
const THREAD_NAME: &str = "treaty-sled-sync";

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
    /// Set once a flush or fsync failed; every later sync fails with this message.
    poisoned: Mutex<Option<String>>,
    /// Files already fsynced, by path relative to `dir` (e.g. `blobs/123`), with the length
    /// they had just before the fsync.
    synced: Mutex<HashMap<PathBuf, u64>>,
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
    /// Starts the flusher thread for `db`. `dir` is the directory the sled Db was opened at.
    ///
    /// Fails if `<dir>/db` cannot be opened or the thread cannot be spawned.
    pub fn new(db: sled::Db, dir: &std::path::Path) -> std::io::Result<SledSync> {
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
            poisoned: Mutex::new(None),
            synced: Mutex::new(HashMap::new()),
        });
        let (tx, rx) = mpsc::channel::<Waiter>();
        let mut flusher = Flusher {
            db,
            dir: dir.to_path_buf(),
            db_file,
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
    pub async fn sync(&self) -> std::io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(Waiter::Async(tx))?;
        rx.await.map_err(|_| thread_gone())?
    }

    /// Blocking variant of [`SledSync::sync`] for non-async callers. Blocks the calling thread
    /// for up to two rounds; do not call it on an async executor thread.
    pub fn sync_blocking(&self) -> std::io::Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.enqueue(Waiter::Blocking(tx))?;
        rx.recv().map_err(|_| thread_gone())?
    }

    /// Number of flush+fsync rounds completed successfully so far.
    pub fn flushes(&self) -> u64 {
        self.inner.shared.flushes.load(Ordering::Relaxed)
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
    shared: Arc<Shared>,
    /// Entries of `dir` at the last round; `None` before the first round.
    dir_entries: Option<HashSet<OsString>>,
    /// Entries of `dir/blobs` at the last round; `None` before the first round.
    blob_entries: Option<HashSet<OsString>>,
}

/// Whether a failed step means durability can no longer be promised.
enum Failure {
    /// Flush or fsync failed: poison the handle.
    Fatal(io::Error),
    /// Listing or opening failed: only this round fails.
    Transient(io::Error),
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
            for w in waiters {
                // io::Error is not Clone; every waiter gets an equivalent one.
                w.answer(match &res {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                });
            }
        }
    }

    /// One round, honouring and setting the poison flag.
    fn round_checked(&mut self) -> io::Result<()> {
        if let Some(msg) = self.shared.poison_message() {
            return Err(io::Error::other(msg));
        }
        match self.round() {
            Ok(()) => {
                self.shared.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(Failure::Transient(e)) => Err(e),
            Err(Failure::Fatal(e)) => {
                let msg = format!(
                    "durability of the sled database at {} can no longer be guaranteed: {e}; \
                     restart the process to recover from the log",
                    self.dir.display()
                );
                *lock(&self.shared.poisoned) = Some(msg);
                Err(e)
            }
        }
    }

    fn round(&mut self) -> Result<(), Failure> {
        let dir = self.dir.clone();
        self.db.flush().map_err(|e| {
            Failure::Fatal(with_context(
                io::Error::other(e),
                &format!("flushing the sled database at {}", dir.display()),
            ))
        })?;
        self.db_file.sync_data().map_err(|e| {
            Failure::Fatal(with_context(
                e,
                &format!("fdatasync of {}", dir.join("db").display()),
            ))
        })?;

        let blobs_dir = dir.join("blobs");
        let blob_names = list_dir(&blobs_dir, true)?;
        self.sync_new_files(Path::new("blobs"), &blob_names)?;
        let top_names = list_dir(&dir, false)?;
        // `db` is fdatasync'd above every round; the others (`conf`, snapshots) by length.
        let top_files: Vec<OsString> = top_names
            .iter()
            .filter(|n| n.as_os_str() != "db" && dir.join(n).is_file())
            .cloned()
            .collect();
        self.sync_new_files(Path::new(""), &top_files)?;
        self.forget_missing(&blob_names, &top_files);

        let first_round = self.dir_entries.is_none();
        let blob_set: HashSet<OsString> = blob_names.into_iter().collect();
        if self.blob_entries.as_ref() != Some(&blob_set) && blobs_dir.is_dir() {
            fsync_dir(&blobs_dir)?;
        }
        self.blob_entries = Some(blob_set);
        let top_set: HashSet<OsString> = top_names.into_iter().collect();
        if self.dir_entries.as_ref() != Some(&top_set) {
            fsync_dir(&dir)?;
        }
        self.dir_entries = Some(top_set);
        if first_round {
            // The entry of `dir` itself in its parent, in case the directory is new. A parent
            // we cannot open (e.g. no permission) is not our data: skip it.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                if File::open(parent).is_ok() {
                    fsync_dir(parent)?;
                }
            }
        }
        Ok(())
    }

    /// fsyncs each of `names` (in `self.dir/sub`) whose current length differs from the one
    /// recorded when it was last synced.
    fn sync_new_files(&mut self, sub: &Path, names: &[OsString]) -> Result<(), Failure> {
        for name in names {
            let rel = sub.join(name);
            let path = self.dir.join(&rel);
            let file = match File::open(&path) {
                Ok(f) => f,
                // Removed since the listing (sled's blob GC, a snapshot's temp file).
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(Failure::Transient(with_context(
                        e,
                        &format!("opening {} to fsync it", path.display()),
                    )))
                }
            };
            // The length before the fsync: everything up to it is covered by the fsync.
            let len = file
                .metadata()
                .map_err(|e| {
                    Failure::Transient(with_context(
                        e,
                        &format!("reading the length of {}", path.display()),
                    ))
                })?
                .len();
            if lock(&self.shared.synced).get(&rel) == Some(&len) {
                continue;
            }
            file.sync_all().map_err(|e| {
                Failure::Fatal(with_context(e, &format!("fsync of {}", path.display())))
            })?;
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
fn list_dir(dir: &Path, missing_ok: bool) -> Result<Vec<OsString>, Failure> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if missing_ok && e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Failure::Transient(with_context(
                e,
                &format!("listing {}", dir.display()),
            )))
        }
    };
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| {
            Failure::Transient(with_context(e, &format!("listing {}", dir.display())))
        })?;
        names.push(entry.file_name());
    }
    Ok(names)
}

/// fsync a directory so the entries created or removed in it survive a crash.
fn fsync_dir(dir: &Path) -> Result<(), Failure> {
    let f = File::open(dir).map_err(|e| {
        Failure::Transient(with_context(
            e,
            &format!("opening directory {} to fsync it", dir.display()),
        ))
    })?;
    f.sync_all().map_err(|e| {
        Failure::Fatal(with_context(
            e,
            &format!("fsync of directory {}", dir.display()),
        ))
    })
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
