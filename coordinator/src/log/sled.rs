//! [`SledLog`]: the default [`LogStore`], on sled 0.34, with forced writes made truly durable
//! and shared by group commit through [`treaty_durable::SledSync`].
//!
//! # Layout
//!
//! `<dir>/LOCK` holds an exclusive `flock` and the pid of the owner; `<dir>/sled` is the sled
//! database, with three trees:
//!
//! - `tx`: gid -> encoded record ([`codec`]); the source of truth.
//! - `active`: gid -> empty, for every non-terminal record (recovery scans only these).
//! - `ended`: `be_u64(updated_unix_ms) ++ gid` -> empty, for terminal records, oldest first
//!   (retention walks it from the start).
//! - `stuck`: gid -> empty, for records written with the stuck flag (removed when terminal;
//!   `list` double-checks the record, so a stale entry only costs a read).
//! - `tombstones`: gid -> encoded [`Tombstone`] of a collected record; `tombstones_by_time`:
//!   `be_u64(collected_unix_ms) ++ gid` -> empty, for their own retention.
//! - `meta`: `log` -> the log's identity ([`codec::encode_meta`]), written (and synced) once
//!   when the log is created.
//!
//! # Crash safety without multi-tree transactions
//!
//! sled's multi-tree transactions serialize on a process-wide lock and are slow, so writes
//! are ordered so that a crash between two of them leaves a state [`LogStore::scan_active`]
//! repairs (sled recovers a prefix of its writes across all trees):
//!
//! - non-terminal record: insert `active`, then `tx`. A crash in between leaves an `active`
//!   entry with no record (removed by the scan) or with the previous, still non-terminal,
//!   record (correct as is).
//! - terminal record: insert `tx`, insert `ended`, remove `active`. A crash in between leaves
//!   a terminal record in `active`; the scan inserts its `ended` entry and removes it from
//!   `active`.
//!
//! Retention ([`LogStore::collect_ended`]) double-checks the record itself before deleting,
//! and writes the tombstone before it deletes the record: sled recovers a prefix of its
//! writes, so a deletion that survived a crash has its tombstone too.
//!
//! # Durability
//!
//! A forced put does its inserts and then waits for a [`SledSync`] round: `Db::flush()`
//! followed by a real `fdatasync`/`fsync` of sled's files and directories (sled's own flush
//! only calls `sync_file_range`, and never syncs large-value blob files). Concurrent forced
//! puts share a round.

use super::codec;
use super::{ListFilter, LogError, LogFuture, LogStats, LogStore};
use crate::engine::types::{Tombstone, TxRecord};
use futures::future::FutureExt;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use treaty_durable::SledSync;

use super::ListPage;

/// [`LogStore::collect_ended`] examines at most `max * COLLECT_SCANNED_PER_DELETE_MAX +
/// COLLECT_SCANNED_EXTRA` index entries: stale entries (left by a crash or a rewritten
/// terminal record) are removed but do not count as deletions.
const COLLECT_SCANNED_PER_DELETE_MAX: usize = 4;
const COLLECT_SCANNED_EXTRA: usize = 64;

/// Options of [`SledLog::open`].
#[derive(Clone, Debug)]
pub struct SledLogOptions {
    /// sled's page cache size. The log is mostly written, read back only at startup and by
    /// `Get`/`List`, so a small cache is enough. Default 64 MiB.
    pub cache_capacity_bytes: u64,
}

impl Default for SledLogOptions {
    fn default() -> Self {
        SledLogOptions {
            cache_capacity_bytes: 64 << 20,
        }
    }
}

/// The sled-backed log. See the module documentation for its layout and guarantees.
///
/// Writes are sled inserts done inline by [`LogStore::put`] (they go to sled's page cache and
/// log buffers, and doing them on the calling thread is what orders them by call order); only
/// the flush of a forced write is waited for, on the [`SledSync`] thread. Point reads (`get`,
/// `get_tombstone`) are answered on the calling thread too: sled serves them from its page
/// cache, and the blocking pool costs more than they do (see [`SledLog::get`]). Scans, lists
/// and retention, whose cost grows with the log and may wait on the disk, run on tokio's
/// blocking pool when a tokio runtime is current, never on an async worker.
pub struct SledLog {
    store: Arc<Store>,
}

/// What a [`SledLog`] owns, shared with the reads running on the blocking pool.
struct Store {
    tx: sled::Tree,
    active: sled::Tree,
    ended: sled::Tree,
    stuck: sled::Tree,
    tombs: sled::Tree,
    tombs_by_time: sled::Tree,
    log_id: String,
    sync: SledSync,
    counters: Arc<Counters>,
    /// For error messages.
    dir: PathBuf,
    /// Declared after the trees and `sync` so it is dropped (and the lock released) after
    /// sled has closed.
    db: sled::Db,
    _lock: File,
}

#[derive(Default)]
struct Counters {
    writes: AtomicU64,
    forced_writes: AtomicU64,
}

impl SledLog {
    /// Opens (creating if needed) the log in `dir`.
    ///
    /// Fails with [`LogError::Locked`] if another process (or another `SledLog` in this one)
    /// has it open, and with [`LogError::Io`] if the directory or sled cannot be opened.
    pub fn open(dir: &Path, opts: SledLogOptions) -> Result<SledLog, LogError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| io_err(format!("creating the log directory {}", dir.display()), e))?;
        let lock = lock_dir(dir)?;
        let sled_dir = dir.join("sled");
        let config = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(opts.cache_capacity_bytes);
        // The deliberately broken build (tests only) skips the real fdatasync; sled's own
        // periodic sync would hide that for up to 500 ms, making the power-cut test that must
        // catch it a matter of luck. Off there, so every acknowledged write is at risk.
        #[cfg(feature = "mutation-skip-fdatasync")]
        let config = config.flush_every_ms(None);
        let db = config.open().map_err(|e| {
            io_err(
                format!("opening the sled database at {}", sled_dir.display()),
                e.into(),
            )
        })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|e| {
                io_err(
                    format!("opening tree {name:?} in {}", sled_dir.display()),
                    e.into(),
                )
            })
        };
        let (tx, active, ended) = (tree("tx")?, tree("active")?, tree("ended")?);
        let (stuck, tombs, tombs_by_time) = (
            tree("stuck")?,
            tree("tombstones")?,
            tree("tombstones_by_time")?,
        );
        let meta = tree("meta")?;
        let sync = SledSync::new(db.clone(), &sled_dir).map_err(|e| {
            io_err(
                format!("starting the sync thread for {}", sled_dir.display()),
                e,
            )
        })?;
        let log_id = match meta.get(b"log").map_err(|e| {
            io_err(
                format!("reading the log identity in {}", sled_dir.display()),
                e.into(),
            )
        })? {
            Some(bytes) => codec::decode_meta(&bytes).map_err(|e| LogError::Corrupt {
                path: dir.display().to_string(),
                gid: "<log identity>".into(),
                reason: e.to_string(),
            })?,
            None => {
                // A new log: its identity must be durable before anything names it.
                let id = uuid::Uuid::new_v4().to_string();
                let now = crate::runtime::now_ms();
                meta.insert(b"log", codec::encode_meta(&id, now))
                    .map_err(|e| {
                        io_err(
                            format!("writing the log identity in {}", sled_dir.display()),
                            e.into(),
                        )
                    })?;
                sync.sync_blocking().map_err(|e| {
                    io_err(
                        format!("syncing the new log identity in {}", sled_dir.display()),
                        e,
                    )
                })?;
                id
            }
        };
        Ok(SledLog {
            store: Arc::new(Store {
                tx,
                active,
                ended,
                stuck,
                tombs,
                tombs_by_time,
                log_id,
                sync,
                counters: Arc::new(Counters::default()),
                dir: dir.to_path_buf(),
                db,
                _lock: lock,
            }),
        })
    }

    /// Runs `f` on the store: on tokio's blocking pool when a tokio runtime is current (it is
    /// started now, so it reads what was written before this call), else on this thread.
    fn blocking<T: Send + 'static>(
        &self,
        doing: &'static str,
        f: impl FnOnce(&Store) -> Result<T, LogError> + Send + 'static,
    ) -> LogFuture<T> {
        let store = Arc::clone(&self.store);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let task = rt.spawn_blocking(move || f(&store));
                let dir = self.store.dir.clone();
                async move {
                    task.await.map_err(|e| {
                        io_err(
                            format!("{doing} in {}: the blocking task failed", dir.display()),
                            std::io::Error::other(e),
                        )
                    })?
                }
                .boxed()
            }
            Err(_) => futures::future::ready(f(&store)).boxed(),
        }
    }
}

impl Store {
    /// The inserts of one put, in the crash-repairable order described in the module docs.
    fn write(&self, rec: &TxRecord) -> Result<(), LogError> {
        if rec.gid.is_empty() {
            // The codec refuses to read such a record back; refuse to write it.
            return Err(io_err(
                format!(
                    "writing a record with an empty gid to {}",
                    self.dir.display()
                ),
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            ));
        }
        let bytes = codec::encode(rec);
        debug_assert_eq!(codec::decode(&bytes).as_ref(), Ok(rec));
        let gid = rec.gid.as_bytes();
        let doing = || {
            format!(
                "writing the record of gid {:?} to {}",
                rec.gid,
                self.dir.display()
            )
        };
        if rec.phase.is_terminal() {
            self.tx
                .insert(gid, bytes)
                .map_err(|e| io_err(doing(), e.into()))?;
            self.ended
                .insert(ended_key(rec.updated_unix_ms, &rec.gid), &[])
                .map_err(|e| io_err(doing(), e.into()))?;
            self.active
                .remove(gid)
                .map_err(|e| io_err(doing(), e.into()))?;
            self.stuck
                .remove(gid)
                .map_err(|e| io_err(doing(), e.into()))?;
        } else {
            if rec.stuck {
                self.stuck
                    .insert(gid, &[])
                    .map_err(|e| io_err(doing(), e.into()))?;
            }
            // Only a transaction's first write (seq 1) needs the index entry: every later
            // non-terminal write finds it in place (recovery found the transaction through it),
            // and skipping it saves one sled insert per step.
            if rec.seq <= 1 {
                self.active
                    .insert(gid, &[])
                    .map_err(|e| io_err(doing(), e.into()))?;
            }
            self.tx
                .insert(gid, bytes)
                .map_err(|e| io_err(doing(), e.into()))?;
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn decode(&self, gid: &str, bytes: &[u8]) -> Result<TxRecord, LogError> {
        let rec = codec::decode(bytes).map_err(|e| self.corrupt(gid, e.to_string()))?;
        if rec.gid != gid {
            return Err(self.corrupt(
                gid,
                format!("the record stored under this gid names gid {:?}", rec.gid),
            ));
        }
        Ok(rec)
    }

    fn corrupt(&self, gid: &str, reason: String) -> LogError {
        LogError::Corrupt {
            path: self.dir.display().to_string(),
            gid: gid.to_string(),
            reason,
        }
    }

    fn sled_err(&self, doing: &str, e: sled::Error) -> LogError {
        io_err(format!("{doing} in {}", self.dir.display()), e.into())
    }

    /// A key of `tx` or `active` as a gid; keys are written from `String`s, so anything else
    /// is damage.
    fn key_gid(&self, key: &[u8]) -> Result<String, LogError> {
        String::from_utf8(key.to_vec()).map_err(|_| {
            self.corrupt(
                &String::from_utf8_lossy(key),
                "the key is not valid UTF-8".into(),
            )
        })
    }

    /// Removes the `ended` entry `key` (stale or collected).
    fn remove_ended(&self, key: &[u8]) -> Result<(), LogError> {
        self.ended
            .remove(key)
            .map(drop)
            .map_err(|e| self.sled_err("removing a retention index entry", e))
    }

    fn get(&self, gid: &str) -> Result<Option<TxRecord>, LogError> {
        match self
            .tx
            .get(gid.as_bytes())
            .map_err(|e| self.sled_err(&format!("reading gid {gid:?}"), e))?
        {
            Some(b) => self.decode(gid, &b).map(Some),
            None => Ok(None),
        }
    }

    /// Also repairs what a crash between the inserts of one put left behind (see the module
    /// docs); repairs are idempotent and need no flush.
    fn scan_active(
        &self,
        after_gid: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TxRecord>, LogError> {
        use std::ops::Bound;
        let lower = after_gid.map_or(Bound::Unbounded, |g| Bound::Excluded(g.as_bytes()));
        let mut out = Vec::new();
        for entry in self.active.range::<&[u8], _>((lower, Bound::Unbounded)) {
            if out.len() >= limit {
                break;
            }
            let (key, _) = entry.map_err(|e| self.sled_err("scanning active records", e))?;
            let gid = self.key_gid(&key)?;
            let bytes = self
                .tx
                .get(&key)
                .map_err(|e| self.sled_err(&format!("reading gid {gid:?}"), e))?;
            let Some(bytes) = bytes else {
                // Crash after `active` was inserted, before the first record was.
                self.active
                    .remove(&key)
                    .map_err(|e| self.sled_err("removing a dangling active entry", e))?;
                continue;
            };
            let rec = self.decode(&gid, &bytes)?;
            if rec.phase.is_terminal() {
                // Crash after a terminal record was written, before `active` was cleaned.
                self.ended
                    .insert(ended_key(rec.updated_unix_ms, &gid), &[])
                    .map_err(|e| self.sled_err("repairing the retention index", e))?;
                self.active
                    .remove(&key)
                    .map_err(|e| self.sled_err("repairing the active index", e))?;
                continue;
            }
            out.push(rec);
        }
        Ok(out)
    }

    fn list(
        &self,
        filter: &ListFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, LogError> {
        // The smallest index that holds every match.
        let only_live = !filter.phases.is_empty() && filter.phases.iter().all(|p| !p.is_terminal());
        let index = if filter.stuck_only {
            &self.stuck
        } else if only_live {
            &self.active
        } else {
            &self.tx
        };
        let iter = match cursor {
            Some(c) => index.range(..c.as_bytes()),
            None => index.iter(),
        };
        let entries = iter.rev().map(|entry| {
            let (key, _) = entry.map_err(|e| self.sled_err("listing records", e))?;
            let gid = self.key_gid(&key)?;
            let bytes = self
                .tx
                .get(&key)
                .map_err(|e| self.sled_err(&format!("reading gid {gid:?}"), e))?;
            let rec = bytes.map(|b| self.decode(&gid, &b)).transpose()?;
            Ok((gid, rec))
        });
        super::list_page(entries, filter, limit)
    }

    fn collect_ended(
        &self,
        before_unix_ms: u64,
        now_unix_ms: u64,
        max: usize,
    ) -> Result<usize, LogError> {
        let scan_max = max
            .saturating_mul(COLLECT_SCANNED_PER_DELETE_MAX)
            .saturating_add(COLLECT_SCANNED_EXTRA);
        let mut deleted = 0;
        for entry in self.ended.iter().take(scan_max) {
            if deleted >= max {
                break;
            }
            let (key, _) = entry.map_err(|e| self.sled_err("scanning the retention index", e))?;
            let Some((ts, gid)) = key.split_first_chunk::<8>() else {
                // Too short to be ours: index damage; the index is derived, so drop it.
                self.remove_ended(&key)?;
                continue;
            };
            let ts = u64::from_be_bytes(*ts);
            if ts >= before_unix_ms {
                break; // sorted by time: nothing older follows
            }
            let gid = self.key_gid(gid)?;
            let bytes = self
                .tx
                .get(gid.as_bytes())
                .map_err(|e| self.sled_err(&format!("reading gid {gid:?}"), e))?;
            let Some(bytes) = bytes else {
                // Crash between deleting the record and its index entry.
                self.remove_ended(&key)?;
                continue;
            };
            let rec = match self.decode(&gid, &bytes) {
                Ok(rec) => rec,
                Err(e) => {
                    // One damaged record must not stop retention for good: leave it for an
                    // operator (it stays readable as an error by `get`) and go on.
                    tracing::error!(gid = %gid, error = %e, "retention skips a record that cannot be decoded; it is kept for inspection");
                    self.remove_ended(&key)?;
                    continue;
                }
            };
            if !rec.phase.is_terminal() || rec.updated_unix_ms != ts {
                // A stale entry (the record was rewritten since): never delete from it.
                self.remove_ended(&key)?;
                continue;
            }
            // The tombstone first: a deletion that survives a crash has its tombstone.
            let tomb = rec.tombstone(now_unix_ms);
            self.tombs
                .insert(gid.as_bytes(), codec::encode_tombstone(&tomb))
                .map_err(|e| self.sled_err(&format!("writing the tombstone of gid {gid:?}"), e))?;
            self.tombs_by_time
                .insert(ended_key(now_unix_ms, &gid), &[])
                .map_err(|e| self.sled_err(&format!("indexing the tombstone of gid {gid:?}"), e))?;
            // Delete only the exact bytes we checked: a concurrent rewrite wins.
            let swapped = self
                .tx
                .compare_and_swap(gid.as_bytes(), Some(&bytes), None::<&[u8]>)
                .map_err(|e| self.sled_err(&format!("deleting gid {gid:?}"), e))?;
            self.remove_ended(&key)?;
            if swapped.is_ok() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    fn get_tombstone(&self, gid: &str) -> Result<Option<Tombstone>, LogError> {
        match self
            .tombs
            .get(gid.as_bytes())
            .map_err(|e| self.sled_err(&format!("reading the tombstone of gid {gid:?}"), e))?
        {
            Some(b) => codec::decode_tombstone(&b)
                .map(Some)
                .map_err(|e| self.corrupt(gid, format!("tombstone: {e}"))),
            None => Ok(None),
        }
    }

    fn collect_tombstones(&self, before_unix_ms: u64, max: usize) -> Result<usize, LogError> {
        let mut deleted = 0;
        for entry in self.tombs_by_time.iter() {
            if deleted >= max {
                break;
            }
            let (key, _) = entry.map_err(|e| self.sled_err("scanning the tombstone index", e))?;
            let Some((ts, gid)) = key.split_first_chunk::<8>() else {
                self.tombs_by_time
                    .remove(&key)
                    .map_err(|e| self.sled_err("removing a damaged tombstone index entry", e))?;
                continue;
            };
            if u64::from_be_bytes(*ts) >= before_unix_ms {
                break;
            }
            // A gid collected twice (reused after its tombstone went) has two entries; only
            // the one matching the stored tombstone deletes it.
            let gid = self.key_gid(gid)?;
            let matches = match self.get_tombstone(&gid) {
                Ok(Some(t)) => t.collected_unix_ms == u64::from_be_bytes(*ts),
                Ok(None) => false,
                Err(_) => true, // damaged: it has served its time either way
            };
            if matches {
                self.tombs
                    .remove(gid.as_bytes())
                    .map_err(|e| self.sled_err(&format!("deleting the tombstone of {gid:?}"), e))?;
                deleted += 1;
            }
            self.tombs_by_time
                .remove(&key)
                .map_err(|e| self.sled_err("removing a tombstone index entry", e))?;
        }
        Ok(deleted)
    }
}

/// `be_u64(updated_unix_ms) ++ gid`: big-endian so the byte order of keys is time order.
fn ended_key(updated_unix_ms: u64, gid: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + gid.len());
    k.extend_from_slice(&updated_unix_ms.to_be_bytes());
    k.extend_from_slice(gid.as_bytes());
    k
}

fn io_err(doing: String, source: std::io::Error) -> LogError {
    LogError::Io { doing, source }
}

/// Takes the exclusive lock on `<dir>/LOCK` and writes our pid into it.
fn lock_dir(dir: &Path) -> Result<File, LogError> {
    use fs2::FileExt;
    let path = dir.join("LOCK");
    // Not truncated on open: until we hold the lock, its content is the holder's pid.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_err(format!("opening the lock file {}", path.display()), e))?;
    if let Err(e) = f.try_lock_exclusive() {
        if e.kind() != fs2::lock_contended_error().kind() {
            return Err(io_err(format!("locking {}", path.display()), e));
        }
        let mut content = String::new();
        let holder = match f.read_to_string(&mut content) {
            Ok(_) if !content.trim().is_empty() => format!("pid {}", content.trim()),
            _ => "unknown pid".to_string(),
        };
        return Err(LogError::Locked {
            path: dir.display().to_string(),
            holder,
        });
    }
    let pid = std::process::id();
    f.set_len(0)
        .and_then(|()| f.rewind())
        .and_then(|()| writeln!(f, "{pid}"))
        .map_err(|e| io_err(format!("writing our pid to {}", path.display()), e))?;
    Ok(f)
}

impl LogStore for SledLog {
    fn log_id(&self) -> &str {
        &self.store.log_id
    }

    fn put(&self, rec: TxRecord, forced: bool) -> LogFuture<()> {
        // sled inserts go to the page cache and log buffers, so they run inline: this applies
        // writes in call order and makes them visible at once. Only the flush is waited for,
        // off this thread, by the SledSync round the future joins.
        if let Err(e) = self.store.write(&rec) {
            return futures::future::ready(Err(e)).boxed();
        }
        if !forced {
            return futures::future::ready(Ok(())).boxed();
        }
        self.store
            .counters
            .forced_writes
            .fetch_add(1, Ordering::Relaxed);
        let sync = self.store.sync.clone();
        let dir = self.store.dir.clone();
        let gid = rec.gid;
        async move {
            sync.sync().await.map_err(|e| {
                io_err(
                    format!(
                        "making the record of gid {gid:?} durable in {}",
                        dir.display()
                    ),
                    e,
                )
            })
        }
        .boxed()
    }

    /// A point read, answered on the calling thread like the inserts of `put`: sled serves it
    /// from its page cache, and a trip through the blocking pool costs more than the read.
    /// Every `Begin` of a new gid makes two (record, tombstone); on the blocking pool they cut
    /// the saga benchmark from about 5,400 to 4,000 transactions/s on 2 cores. Scans, lists
    /// and retention, whose cost grows with the log, do go to the blocking pool.
    fn get(&self, gid: &str) -> LogFuture<Option<TxRecord>> {
        futures::future::ready(self.store.get(gid)).boxed()
    }

    /// Also repairs what a crash between the inserts of one put left behind (see the module
    /// docs); repairs are idempotent and need no flush.
    fn scan_active(&self, after_gid: Option<&str>, limit: usize) -> LogFuture<Vec<TxRecord>> {
        let after = after_gid.map(str::to_string);
        self.blocking("scanning active records", move |s| {
            s.scan_active(after.as_deref(), limit)
        })
    }

    fn list(&self, filter: &ListFilter, cursor: Option<&str>, limit: usize) -> LogFuture<ListPage> {
        let (filter, cursor) = (filter.clone(), cursor.map(str::to_string));
        self.blocking("listing records", move |s| {
            s.list(&filter, cursor.as_deref(), limit)
        })
    }

    fn collect_ended(&self, before_unix_ms: u64, now_unix_ms: u64, max: usize) -> LogFuture<usize> {
        self.blocking("collecting ended records", move |s| {
            s.collect_ended(before_unix_ms, now_unix_ms, max)
        })
    }

    /// A point read on the calling thread, as [`SledLog::get`].
    fn get_tombstone(&self, gid: &str) -> LogFuture<Option<Tombstone>> {
        futures::future::ready(self.store.get_tombstone(gid)).boxed()
    }

    fn collect_tombstones(&self, before_unix_ms: u64, max: usize) -> LogFuture<usize> {
        self.blocking("collecting tombstones", move |s| {
            s.collect_tombstones(before_unix_ms, max)
        })
    }

    fn sync(&self) -> LogFuture<()> {
        // The round joins SledSync when first polled; a round flushes everything sled holds
        // when it starts, so it covers every write issued before this call.
        let sync = self.store.sync.clone();
        let dir = self.store.dir.clone();
        async move {
            sync.sync()
                .await
                .map_err(|e| io_err(format!("syncing the log at {}", dir.display()), e))
        }
        .boxed()
    }

    fn stats(&self) -> LogStats {
        LogStats {
            writes: self.store.counters.writes.load(Ordering::Relaxed),
            forced_writes: self.store.counters.forced_writes.load(Ordering::Relaxed),
            flushes: self.store.sync.flushes(),
        }
    }

    fn observe_flushes(&self, observer: Arc<dyn treaty_durable::FlushObserver>) {
        self.store.sync.observe(observer);
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Best effort: unforced writes reach the disk at sled's own pace otherwise. Callers
        // that need durability use `sync()`; an error here has nobody to go to.
        let _ = self.db.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance;
    use super::*;
    use crate::engine::types::{Mode, Phase, RetryPolicy};
    use futures::future::BoxFuture;

    fn rec(gid: &str, phase: Phase, updated_unix_ms: u64) -> TxRecord {
        TxRecord {
            gid: gid.into(),
            mode: Mode::TwoPhase,
            phase,
            branches: vec![],
            created_unix_ms: 1,
            updated_unix_ms,
            deadline_unix_ms: 0,
            retry: RetryPolicy::default(),
            stuck: false,
            seq: 1,
            reason: None,
            trace_parent: None,
        }
    }

    fn open(dir: &Path) -> SledLog {
        SledLog::open(
            dir,
            SledLogOptions {
                cache_capacity_bytes: 4 << 20,
            },
        )
        .expect("open log")
    }

    fn gids(v: Vec<TxRecord>) -> Vec<String> {
        v.into_iter().map(|r| r.gid).collect()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    /// The sled log under the conformance suite: each log in a directory of its own, a
    /// reopen closes the log and opens the same directory. sled cannot be made to fail its
    /// syncs here; the power-cut and failing-disk tests under `tests/lazyfs` cover that.
    #[derive(Default)]
    struct Backend {
        dirs: std::collections::HashMap<String, tempfile::TempDir>,
    }

    impl conformance::Backend for Backend {
        fn name(&self) -> &str {
            "sled"
        }

        fn open_fresh(&mut self) -> BoxFuture<'_, Arc<dyn LogStore>> {
            let tmp = tempfile::tempdir().expect("tempdir");
            let log = open(tmp.path());
            self.dirs.insert(log.log_id().to_string(), tmp);
            futures::future::ready(Arc::new(log) as Arc<dyn LogStore>).boxed()
        }

        fn reopen(&mut self, log: Arc<dyn LogStore>) -> BoxFuture<'_, Option<Arc<dyn LogStore>>> {
            let dir = self.dirs[log.log_id()].path().to_path_buf();
            assert_eq!(
                Arc::strong_count(&log),
                1,
                "the suite holds the only handle of a log it reopens"
            );
            // Every read it started has finished (the suite awaited them), so this closes the
            // database and releases the directory lock.
            drop(log);
            futures::future::ready(Some(Arc::new(open(&dir)) as Arc<dyn LogStore>)).boxed()
        }

        fn fail_syncs(&mut self, _log: &Arc<dyn LogStore>, _failing: bool) -> bool {
            false
        }
    }

    #[test]
    fn conforms_to_the_log_store_contract() {
        // A multi-threaded runtime, as treatyd runs: scans and lists go to the blocking pool.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(conformance::check_all(&mut Backend::default()));
    }

    #[test]
    fn conforms_to_the_log_store_contract_without_a_runtime() {
        // No tokio runtime: reads run inline on the calling thread.
        futures::executor::block_on(conformance::check_all(&mut Backend::default()));
    }

    #[test]
    fn the_log_identity_is_kept_across_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let id = open(tmp.path()).log_id().to_string();
        assert_eq!(open(tmp.path()).log_id(), id);
        let other = tempfile::tempdir().expect("tempdir");
        assert_ne!(open(other.path()).log_id(), id, "a new log, a new identity");
    }

    #[test]
    fn a_rewritten_terminal_record_is_kept_until_its_latest_time() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = open(tmp.path());
        block_on(log.put(rec("a", Phase::Committed, 5), false)).expect("put");
        block_on(log.put(rec("a", Phase::Committed, 50), false)).expect("put");
        assert_eq!(block_on(log.collect_ended(10, 11, 10)).expect("collect"), 0);
        assert!(block_on(log.get("a")).expect("get").is_some());
        assert_eq!(
            block_on(log.collect_ended(100, 101, 10)).expect("collect"),
            1
        );
        assert_eq!(
            log.store.ended.len(),
            0,
            "stale index entries are cleaned up"
        );
    }

    #[test]
    fn a_second_open_is_locked_and_names_our_pid() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let _log = open(tmp.path());
        match SledLog::open(tmp.path(), SledLogOptions::default()) {
            Err(e @ LogError::Locked { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("pid {}", std::process::id())),
                    "{msg}"
                );
                assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
            }
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("expected Locked, got a second log"),
        }
    }

    #[test]
    fn forced_writes_survive_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        {
            let log = open(tmp.path());
            block_on(log.put(rec("a", Phase::Active, 1), true)).expect("put");
            block_on(log.put(rec("b", Phase::Committing, 1), true)).expect("put");
        }
        let log = open(tmp.path());
        assert_eq!(
            gids(block_on(log.scan_active(None, 100)).expect("scan")),
            ["a", "b"]
        );
        assert_eq!(
            block_on(log.get("b")).expect("get"),
            Some(rec("b", Phase::Committing, 1))
        );
    }

    /// Opens the raw sled database of a closed log, to plant what a crash or damage leaves.
    fn with_raw_db(dir: &Path, f: impl FnOnce(&sled::Db)) {
        let db = sled::open(dir.join("sled")).expect("raw open");
        f(&db);
        db.flush().expect("raw flush");
    }

    #[test]
    fn a_corrupt_record_fails_scan_active_naming_the_gid() {
        let tmp = tempfile::tempdir().expect("tempdir");
        drop(open(tmp.path()));
        with_raw_db(tmp.path(), |db| {
            let tx = db.open_tree("tx").expect("tree");
            let active = db.open_tree("active").expect("tree");
            tx.insert("bad-gid", &b"\x08\x01garbage"[..])
                .expect("insert");
            active.insert("bad-gid", &[]).expect("insert");
        });
        let log = open(tmp.path());
        match block_on(log.scan_active(None, 100)) {
            Err(e @ LogError::Corrupt { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("\"bad-gid\""), "{msg}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(matches!(
            block_on(log.get("bad-gid")),
            Err(LogError::Corrupt { .. })
        ));
    }

    #[test]
    fn scan_active_repairs_what_a_crash_between_inserts_leaves() {
        let tmp = tempfile::tempdir().expect("tempdir");
        drop(open(tmp.path()));
        with_raw_db(tmp.path(), |db| {
            let tx = db.open_tree("tx").expect("tree");
            let active = db.open_tree("active").expect("tree");
            // Terminal record still in `active`, no `ended` entry.
            tx.insert("done", codec::encode(&rec("done", Phase::Committed, 7)))
                .expect("insert");
            active.insert("done", &[]).expect("insert");
            // `active` entry whose record never got written.
            active.insert("ghost", &[]).expect("insert");
            tx.insert("live", codec::encode(&rec("live", Phase::Active, 7)))
                .expect("insert");
            active.insert("live", &[]).expect("insert");
        });
        let log = open(tmp.path());
        assert_eq!(
            gids(block_on(log.scan_active(None, 100)).expect("scan")),
            ["live"]
        );
        assert_eq!(log.store.active.len(), 1);
        assert!(log
            .store
            .ended
            .contains_key(ended_key(7, "done"))
            .expect("contains"));
        // The repaired record is now subject to retention.
        assert_eq!(block_on(log.collect_ended(8, 9, 10)).expect("collect"), 1);
        assert_eq!(block_on(log.get("done")).expect("get"), None);
    }

    /// Not a benchmark (nothing asserts timing): checks that concurrent forced puts share
    /// flushes, and prints the rates for the record.
    #[test]
    fn concurrent_forced_puts_share_flushes() {
        const N: usize = 512;
        const CONCURRENCY: usize = 64;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");

        let tmp = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(open(tmp.path()));
        // Opening a new log syncs its identity once.
        let at_open = log.stats().flushes;
        let t0 = std::time::Instant::now();
        rt.block_on(async {
            for i in 0..N {
                log.put(rec(&format!("s{i:06}"), Phase::Active, 1), true)
                    .await
                    .expect("put");
            }
        });
        let serial = t0.elapsed();
        let serial_flushes = log.stats().flushes - at_open;
        assert_eq!(
            serial_flushes, N as u64,
            "one flush per sequential forced put"
        );

        let t0 = std::time::Instant::now();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for w in 0..CONCURRENCY {
                let log = Arc::clone(&log);
                tasks.push(tokio::spawn(async move {
                    for i in (w..N).step_by(CONCURRENCY) {
                        log.put(rec(&format!("c{i:06}"), Phase::Active, 1), true)
                            .await
                            .expect("put");
                    }
                }));
            }
            for t in tasks {
                t.await.expect("task");
            }
        });
        let concurrent = t0.elapsed();
        let concurrent_flushes = log.stats().flushes - serial_flushes - at_open;
        assert!(
            concurrent_flushes < N as u64 / 4,
            "{concurrent_flushes} flushes for {N} concurrent forced puts: no group commit"
        );
        assert_eq!(
            block_on(log.scan_active(None, 4 * N)).expect("scan").len(),
            2 * N
        );
        println!(
            "sequential: {:.0} forced puts/s, {:.3} flushes/put; {CONCURRENCY} concurrent: \
             {:.0} forced puts/s, {:.3} flushes/put",
            N as f64 / serial.as_secs_f64(),
            serial_flushes as f64 / N as f64,
            N as f64 / concurrent.as_secs_f64(),
            concurrent_flushes as f64 / N as f64,
        );
    }
}
