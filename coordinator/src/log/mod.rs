//! The coordinator's durable transaction log.
//!
//! One record per transaction (the latest copy wins), encoded as a versioned protobuf
//! [`treaty_proto::v1::LogRecord`] by [`codec`]. Two backends implement [`LogStore`]:
//! [`sled::SledLog`] (the default; forced writes are fsynced and shared by group commit) and
//! [`memory::MemoryLog`] (tests and simulation; models which writes are durable so a simulated
//! crash can lose the rest).
//!
//! Invariants:
//! - Every log has an identity ([`LogStore::log_id`]) created with it and never changed.
//! - A forced `put` resolves only after the record is on stable storage; an error from a
//!   forced `put` or from `sync` means durability can no longer be promised (the caller
//!   must stop and recover from disk, see the runtime's fail-stop).
//! - Any `put` resolves only after a following `get` of the same gid sees it.
//! - Writes of one gid are applied in the order they were issued.
//! - A record that fails to decode is an error naming the gid, never skipped.

pub mod codec;
pub mod conformance;
pub mod memory;
pub mod sled;

use crate::engine::types::{Mode, Phase, Tombstone, TxRecord};
use futures::future::BoxFuture;

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The data directory is locked by another process.
    #[error("cannot open log at {path}: locked by another process ({holder}); is another treatyd running?")]
    Locked {
        /// The log directory.
        path: String,
        /// Who holds the lock, e.g. `pid 4242`, as read from `<path>/LOCK`.
        holder: String,
    },
    /// A stored record could not be decoded.
    #[error("log record for gid {gid:?} cannot be decoded: {reason}; the log at {path} needs repair or a newer treatyd")]
    Corrupt {
        /// The log directory (`<memory>` for the memory log).
        path: String,
        /// The gid the record is stored under.
        gid: String,
        /// What the decoder refused.
        reason: String,
    },
    /// The storage engine or the file system failed.
    #[error("log i/o error while {doing}: {source}")]
    Io {
        /// What was being done, to what path.
        doing: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The log was closed (shutdown) before the operation completed.
    #[error("log is closed")]
    Closed,
    /// The coordinator stopped serving after a storage failure (fail-stop); it must be
    /// restarted and recovers from what is on disk.
    #[error("the coordinator stopped after a failure and answers nothing until restarted: {0}")]
    Stopped(String),
}

/// Counters a log exposes for benchmarks and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records written (forced or not).
    pub writes: u64,
    /// Forced writes.
    pub forced_writes: u64,
    /// Flushes to stable storage (each one shared by every forced write waiting at that time).
    pub flushes: u64,
}

/// A filter for [`LogStore::list`].
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Only these phases; empty: all.
    pub phases: Vec<Phase>,
    /// Only this mode; `None`: both.
    pub mode: Option<Mode>,
    /// Only records flagged stuck.
    pub stuck_only: bool,
    /// Only records created at or before this time.
    pub created_before_unix_ms: Option<u64>,
}

impl ListFilter {
    /// Whether `rec` passes the filter.
    pub fn matches(&self, rec: &TxRecord) -> bool {
        (self.phases.is_empty() || self.phases.contains(&rec.phase))
            && self.mode.is_none_or(|m| m == rec.mode)
            && (!self.stuck_only || rec.stuck)
            && self
                .created_before_unix_ms
                .is_none_or(|t| rec.created_unix_ms <= t)
    }
}

/// One page of [`LogStore::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPage {
    /// Matching records, descending gid order.
    pub records: Vec<TxRecord>,
    /// Where the next page starts (exclusive): the last gid *examined*, which may be below
    /// the last one returned. `None` once the scan reached the end. A page may hold fewer
    /// than `limit` records (each call examines a bounded number) and still have a cursor.
    pub next_cursor: Option<String>,
}

/// How many index entries [`LogStore::list`] examines per record it may return, so that a
/// selective filter over a large log costs a bounded amount of work per call.
pub const LIST_SCANNED_PER_RESULT_MAX: usize = 100;

/// One page of [`LogStore::list`] from index entries in descending gid order, each a gid and
/// its record (`None` for a stale index entry): at most `limit` matches, at most
/// `limit * LIST_SCANNED_PER_RESULT_MAX` entries examined, the cursor at the last one
/// examined, or `None` when the entries ran out. Every backend pages through this.
pub(crate) fn list_page(
    entries: impl Iterator<Item = Result<(String, Option<TxRecord>), LogError>>,
    filter: &ListFilter,
    limit: usize,
) -> Result<ListPage, LogError> {
    let scan_max = limit.max(1).saturating_mul(LIST_SCANNED_PER_RESULT_MAX);
    let mut page = ListPage::default();
    let mut last = None;
    for (scanned, entry) in entries.enumerate() {
        if page.records.len() >= limit || scanned >= scan_max {
            page.next_cursor = last;
            return Ok(page);
        }
        let (gid, rec) = entry?;
        last = Some(gid);
        if let Some(rec) = rec.filter(|r| filter.matches(r)) {
            page.records.push(rec);
        }
    }
    Ok(page)
}

/// Storage for transaction records. Cheap to share (`Arc<dyn LogStore>`).
pub trait LogStore: Send + Sync + 'static {
    /// The identity of this log: a UUID created with it, never changed. Participants trust
    /// presumed abort only from the log that drove their branch.
    fn log_id(&self) -> &str;

    /// Write `rec` as the latest record of `rec.gid`.
    ///
    /// The write is applied (readable by `get`, ordered after every earlier `put`) before
    /// `put` returns; the runtime relies on this to keep one transaction's writes in order
    /// without awaiting each. The future resolves at once for an unforced write and once the
    /// record is on stable storage for a forced one (a write that failed to apply resolves to
    /// that error).
    fn put(&self, rec: TxRecord, forced: bool) -> BoxFuture<'static, Result<(), LogError>>;

    /// The latest record of `gid`, if any.
    fn get(&self, gid: &str) -> Result<Option<TxRecord>, LogError>;

    /// Up to `limit` non-terminal records with a gid strictly above `after_gid`, in
    /// ascending gid order (recovery reads them page by page, never all at once).
    fn scan_active(&self, after_gid: Option<&str>, limit: usize)
        -> Result<Vec<TxRecord>, LogError>;

    /// Records matching `filter`, in descending gid order, strictly below `cursor` when
    /// given. Non-terminal and stuck records are found through indexes, so a filter on them
    /// costs what they number, not what the log holds.
    fn list(
        &self,
        filter: &ListFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, LogError>;

    /// Replace up to `max` terminal records last updated before `before_unix_ms` by their
    /// tombstones stamped `now_unix_ms` (retention). Returns how many were collected. Never
    /// touches a non-terminal record; a record that cannot be decoded is logged with its gid
    /// and skipped, never stopping retention.
    fn collect_ended(
        &self,
        before_unix_ms: u64,
        now_unix_ms: u64,
        max: usize,
    ) -> Result<usize, LogError>;

    /// The tombstone of a collected transaction, if any.
    fn get_tombstone(&self, gid: &str) -> Result<Option<Tombstone>, LogError>;

    /// Delete up to `max` tombstones collected before `before_unix_ms`. Returns how many.
    fn collect_tombstones(&self, before_unix_ms: u64, max: usize) -> Result<usize, LogError>;

    /// Make every write issued so far durable (used at shutdown).
    fn sync(&self) -> BoxFuture<'static, Result<(), LogError>>;

    /// Counters since open.
    fn stats(&self) -> LogStats;
}
