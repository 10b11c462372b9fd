//! The coordinator's durable transaction log.
//!
//! One record per transaction (the latest copy wins), encoded as a versioned protobuf
//! [`treaty_proto::v1::LogRecord`] by [`codec`]. Two backends implement [`LogStore`]:
//! [`sled::SledLog`] (the default; forced writes are fsynced and shared by group commit) and
//! [`memory::MemoryLog`] (tests and simulation; models which writes are durable so a simulated
//! crash can lose the rest).
//!
//! Invariants:
//! - A forced `put` resolves only after the record is on stable storage.
//! - Any `put` resolves only after a following `get` of the same gid sees it.
//! - Writes of one gid are applied in the order they were issued.
//! - A record that fails to decode is an error naming the gid, never skipped.

pub mod codec;
pub mod memory;
pub mod sled;

use crate::engine::types::{Mode, Phase, TxRecord};
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

/// Storage for transaction records. Cheap to share (`Arc<dyn LogStore>`).
pub trait LogStore: Send + Sync + 'static {
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

    /// Every non-terminal record (for recovery at startup).
    fn scan_active(&self) -> Result<Vec<TxRecord>, LogError>;

    /// Up to `limit` records matching `filter`, in descending gid order, starting strictly
    /// below `before_gid` when given (pagination).
    fn list(
        &self,
        filter: &ListFilter,
        before_gid: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TxRecord>, LogError>;

    /// Delete up to `max` terminal records last updated before `before_unix_ms` (retention).
    /// Returns how many were deleted. Never deletes a non-terminal record.
    fn collect_ended(&self, before_unix_ms: u64, max: usize) -> Result<usize, LogError>;

    /// Make every write issued so far durable (used at shutdown).
    fn sync(&self) -> BoxFuture<'static, Result<(), LogError>>;

    /// Counters since open.
    fn stats(&self) -> LogStats;
}
