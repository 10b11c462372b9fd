//! The coordinator's durable transaction log.
//!
//! One record per transaction (the latest copy wins), encoded as a versioned protobuf
//! [`treaty_proto::v1::LogRecord`] by [`codec`]. Two backends implement [`LogStore`]:
//! [`sled::SledLog`] (the default; forced writes are fsynced and shared by group commit) and
//! [`memory::MemoryLog`] (tests and simulation; models which writes are durable so a simulated
//! crash can lose the rest). [`postgres::PgLog`] keeps the log in a PostgreSQL database
//! (`treatyd --store postgres://...`), group-committing forced writes.
//!
//! Every I/O method of [`LogStore`] is async and returns a `'static` [`LogFuture`], so a
//! network-backed store never blocks a tokio worker. The contract every backend keeps (write
//! order per gid, visibility at call time, what "forced" and `sync` promise, errors and
//! fail-stop, paging, retention, identity) is written on [`LogStore`] and checked by
//! [`conformance::check_all`], which every backend's tests run.

pub mod codec;
pub mod conformance;
pub mod memory;
pub mod postgres;
pub mod sled;

use crate::engine::types::{Mode, Phase, Tombstone, TxRecord};
use futures::future::{BoxFuture, FutureExt};

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
    /// A shared log refused a write: this coordinator no longer owns what it wrote (another
    /// coordinator took its transactions over after its lease ran out, or owns the gid).
    /// Nothing of the write landed; the coordinator must stop acting on what it remembers.
    #[error("fenced: {0}")]
    Fenced(String),
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

/// What a shared log calls with the gid of a `Retry` another coordinator passed on.
pub type NudgeHandler = std::sync::Arc<dyn Fn(String) + Send + Sync>;

/// A log operation in flight. `'static` (it borrows neither the store nor the arguments),
/// so a caller can move it into a task; see [`LogStore`] for when each one is issued.
pub type LogFuture<T> = BoxFuture<'static, Result<T, LogError>>;

/// Storage for transaction records. Cheap to share (`Arc<dyn LogStore>`); every method takes
/// `&self` and may be called from many tasks at once.
///
/// # The contract
///
/// Every backend runs [`conformance::check_all`], which checks each clause below (the name
/// of the check is given in brackets). A backend is done when that suite passes.
///
/// **Issued at call time.** An I/O method does its ordering work when it is *called*, not
/// when its future is first polled: the future only reports the result. Futures may be
/// awaited in any order, or dropped; dropping one does not undo a write that was issued.
///
/// - *Visibility* [`read_your_issued_writes`](conformance::read_your_issued_writes): a
///   write is visible once `put` has been called. A read called after `put` was called sees
///   that write or a later write of the same gid, even if the `put` future has not resolved
///   (or was never polled). A network backend meets this by answering a read only after every
///   write issued before it was applied.
/// - *Order per gid* [`writes_of_one_gid_apply_in_call_order`](conformance::writes_of_one_gid_apply_in_call_order):
///   writes of one gid are applied in the order `put` was called, without the caller awaiting
///   each; the latest call wins. (The runtime relies on this: one transaction's engine issues
///   several writes in a row.) Writes of different gids are not ordered against each other,
///   except by `sync` and forced writes (below).
/// - *Forced write* [`forced_writes_survive_reopen`](conformance::forced_writes_survive_reopen):
///   `put(rec, true)` resolves `Ok` only once `rec` **and every write issued before it** (any
///   gid) is on stable storage: a crash or a restart after that finds `rec` or a later write
///   of its gid. Concurrent forced writes may share one flush (group commit). `put(rec,
///   false)` resolves once the write is applied; it may be lost by a crash until a later
///   forced write or `sync` resolves.
/// - *Sync* [`sync_makes_every_issued_write_durable`](conformance::sync_makes_every_issued_write_durable):
///   `sync()` resolves `Ok` once every write issued before it was called is on stable
///   storage.
/// - *Failure* [`a_failed_write_is_an_error`](conformance::a_failed_write_is_an_error),
///   [`a_failed_sync_is_an_error`](conformance::a_failed_sync_is_an_error): a write the store
///   refuses (e.g. an empty gid) resolves to an error and is not applied. A forced `put` or
///   `sync` that cannot vouch for durability resolves to an error; its writes may already be
///   applied (a read may see a write whose forced `put` failed, as a failed `fsync` leaves
///   the page cache) and may or may not survive a crash. After such an error nothing the
///   store says about durability can be trusted: the caller must **stop** (the runtime's
///   fail-stop: it answers nothing more and exits) and a restart recovers from what is on
///   stable storage, after one successful `sync`. A failed *read* is only reported; it does
///   not by itself mean the log lost anything.
/// - *Identity* [`identity_is_a_uuid`](conformance::identity_is_a_uuid),
///   [`identity_survives_reopen`](conformance::identity_survives_reopen): `log_id` is a UUID
///   created with the log, durable before the store is first handed out, and the same after
///   every reopen of the same stored log. It is synchronous: a store reads it once, at open.
/// - *Paging* [`scan_active_pages_to_the_end`](conformance::scan_active_pages_to_the_end),
///   [`list_pages_by_cursor_to_the_end`](conformance::list_pages_by_cursor_to_the_end):
///   `scan_active` returns non-terminal records in ascending gid order strictly after its
///   cursor, at most `limit`; a page shorter than `limit` is the last. `list` returns
///   matching records in descending gid order strictly below its cursor, examines a bounded
///   number of entries per call ([`LIST_SCANNED_PER_RESULT_MAX`] per result) and returns the
///   last gid it examined as the next cursor, so a page may be short or empty and still have
///   a cursor; only `next_cursor == None` ends paging. Paging to the end visits every
///   matching record that existed for the whole walk exactly once.
/// - *Retention* [`retention_leaves_tombstones`](conformance::retention_leaves_tombstones),
///   [`tombstones_have_their_own_retention`](conformance::tombstones_have_their_own_retention):
///   `collect_ended` replaces at most `max` terminal records last updated before the cutoff
///   by tombstones (outcome and fingerprint kept), oldest first, never a non-terminal record
///   and never a record rewritten since it was examined; `collect_tombstones` deletes at most
///   `max` tombstones collected before its cutoff, oldest first. Retention writes are
///   unforced: they become durable with the next forced write or `sync`.
/// - A record that fails to decode is an error naming its gid ([`LogError::Corrupt`]) from
///   `get`, `scan_active` and `list`, never skipped; `collect_ended` skips it and keeps it.
///
/// - *Ownership* (a shared log only, [`LogStore::is_shared`]): a write of a coordinator whose
///   records were claimed by another, or of a record another live coordinator owns, fails
///   with [`LogError::Fenced`] and lands nothing; so does every write and `sync` after it,
///   until [`LogStore::rejoin`]. Checked by `coordinator/tests/postgres_owners.rs` (a
///   single-owner backend has nothing to check).
///
/// The futures of a store never need a particular executor, except that a backend may
/// require a tokio runtime to be current when a method is *called* (the sled log then reads
/// on tokio's blocking pool; with no runtime it reads on the calling thread).
pub trait LogStore: Send + Sync + 'static {
    /// The identity of this log: a UUID created with it, never changed. Participants trust
    /// presumed abort only from the log that drove their branch.
    fn log_id(&self) -> &str;

    /// Write `rec` as the latest record of `rec.gid`: applied (visible, ordered after every
    /// earlier `put` of the gid) when called; the future resolves once it is applied and, when
    /// `forced`, on stable storage together with every write issued before it.
    fn put(&self, rec: TxRecord, forced: bool) -> LogFuture<()>;

    /// The latest record of `gid`, if any.
    fn get(&self, gid: &str) -> LogFuture<Option<TxRecord>>;

    /// Up to `limit` non-terminal records with a gid strictly above `after_gid`, in
    /// ascending gid order (recovery reads them page by page, never all at once).
    fn scan_active(&self, after_gid: Option<&str>, limit: usize) -> LogFuture<Vec<TxRecord>>;

    /// Records matching `filter`, in descending gid order, strictly below `cursor` when
    /// given. Non-terminal and stuck records are found through indexes, so a filter on them
    /// costs what they number, not what the log holds.
    fn list(&self, filter: &ListFilter, cursor: Option<&str>, limit: usize) -> LogFuture<ListPage>;

    /// Replace up to `max` terminal records last updated before `before_unix_ms` by their
    /// tombstones stamped `now_unix_ms` (retention). Returns how many were collected. Never
    /// touches a non-terminal record; a record that cannot be decoded is logged with its gid
    /// and skipped, never stopping retention.
    fn collect_ended(&self, before_unix_ms: u64, now_unix_ms: u64, max: usize) -> LogFuture<usize>;

    /// The tombstone of a collected transaction, if any.
    fn get_tombstone(&self, gid: &str) -> LogFuture<Option<Tombstone>>;

    /// Delete up to `max` tombstones collected before `before_unix_ms`. Returns how many.
    fn collect_tombstones(&self, before_unix_ms: u64, max: usize) -> LogFuture<usize>;

    /// Make every write issued so far durable (at startup before recovery, and at shutdown).
    fn sync(&self) -> LogFuture<()>;

    /// Counters since open.
    fn stats(&self) -> LogStats;

    /// Whether a runtime that failed over this log may be replaced in the same process by a
    /// new one recovered from the log, once the log answers a `sync` again (see
    /// `server::Ended::Replace`): true when the data lives in another process that outlives
    /// the failure (PostgreSQL), and the store makes sure no write issued before the failure
    /// can still land after it answers again. False (the default) for a local disk, whose
    /// failed flush leaves durability unknown until the process restarts.
    fn recovers_in_process(&self) -> bool {
        false
    }

    /// Whether several coordinators share this log (PostgreSQL). Each non-terminal record
    /// then has one owner, a live coordinator: only its owner writes it (a write to a record
    /// another live coordinator owns fails with [`LogError::Fenced`], and so does every write
    /// of a coordinator whose ownership was taken away). Recovery [`claim`](Self::claim)s
    /// records instead of scanning them, and a running coordinator claims again and again,
    /// to take over the transactions of a coordinator whose lease ran out.
    fn is_shared(&self) -> bool {
        false
    }

    /// A shared log: make this coordinator the owner of up to `limit` non-terminal records
    /// whose owner is gone (its lease ran out, or it left), and return them; a page shorter
    /// than `limit` means none is left for now. A log with a single owner has nothing to
    /// claim (recovery scans it with [`scan_active`](Self::scan_active)).
    fn claim(&self, limit: usize) -> LogFuture<Vec<TxRecord>> {
        let _ = limit;
        futures::future::ready(Ok(Vec::new())).boxed()
    }

    /// A shared log: join again as a new owner, for a new runtime that replaces a failed one
    /// in the same process (`server::Ended::Replace`). What the old runtime owned is given
    /// up, for the new one (or another coordinator) to claim; a fence raised against the old
    /// one no longer applies. Other logs: a `sync`.
    fn rejoin(&self) -> LogFuture<()> {
        self.sync()
    }

    /// A shared log: give up ownership at a clean shutdown, so that other coordinators take
    /// the unfinished transactions over at once rather than after the lease. Nothing is
    /// written after it. Other logs: nothing.
    fn leave(&self) -> LogFuture<()> {
        futures::future::ready(Ok(())).boxed()
    }

    /// A shared log: ask the live coordinator that owns `gid` (when it is non-terminal) to
    /// retry its waiting calls now (`Retry` on a coordinator that does not drive it).
    /// Whether such an owner was found and told. Other logs: `false`.
    fn nudge(&self, gid: &str) -> LogFuture<bool> {
        let _ = gid;
        futures::future::ready(Ok(false)).boxed()
    }

    /// A shared log: call `handler` with the gid of every [`nudge`](Self::nudge) aimed at
    /// this coordinator (the latest handler wins). Other logs: ignored.
    fn on_nudge(&self, handler: NudgeHandler) {
        let _ = handler;
    }

    /// Tell `observer` of every flush (for metrics: records per flush, failed flushes). A
    /// backend without flushes of its own ignores it.
    fn observe_flushes(&self, observer: std::sync::Arc<dyn treaty_durable::FlushObserver>) {
        let _ = observer;
    }
}
