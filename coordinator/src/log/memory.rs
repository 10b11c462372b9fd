//! [`MemoryLog`]: an in-memory [`LogStore`] that models durability, for tests and the
//! deterministic simulation.
//!
//! It keeps two things: the `durable` map (what survives a crash) and the list of pending
//! writes and deletions not yet durable, in the order they were issued. An unforced put or a
//! deletion becomes pending; a forced put or [`LogStore::sync`] makes every pending write
//! durable, in order, like one group-commit flush of a real disk. [`MemoryLog::crash`] throws
//! the pending writes away, as a power loss would.
//!
//! Records are stored encoded with [`codec`], so the simulation exercises the codec too.
//! Everything is synchronous and needs no runtime: the futures returned are already ready.

use super::codec;
use super::{ListFilter, LogError, LogStats, LogStore};
use crate::engine::types::TxRecord;
use futures::future::{BoxFuture, FutureExt};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// The path reported in errors; there is no file.
const PATH: &str = "<memory>";

/// How many records [`LogStore::list`] examines per record it may return, as the sled
/// backend does (see `super::sled::LIST_SCANNED_PER_RESULT_MAX`), so that pagination behaves
/// the same in the simulation as in production.
const LIST_SCANNED_PER_RESULT_MAX: usize = super::sled::LIST_SCANNED_PER_RESULT_MAX;

/// An in-memory log that knows which writes would survive a crash. Cheap to share behind an
/// `Arc`; all methods take `&self`.
#[derive(Default)]
pub struct MemoryLog {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// What a crash leaves: gid -> encoded record.
    durable: BTreeMap<String, Vec<u8>>,
    /// Writes issued but not yet durable, oldest first.
    pending: Vec<Op>,
    /// What readers see: `durable` with `pending` applied.
    visible: BTreeMap<String, Vec<u8>>,
    stats: LogStats,
}

enum Op {
    Put(String, Vec<u8>),
    Delete(String),
}

impl State {
    /// Makes every pending write durable, in order: one group-commit flush.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        for op in self.pending.drain(..) {
            match op {
                Op::Put(gid, bytes) => {
                    self.durable.insert(gid, bytes);
                }
                Op::Delete(gid) => {
                    self.durable.remove(&gid);
                }
            }
        }
        self.stats.flushes += 1;
    }
}

impl MemoryLog {
    /// An empty log.
    pub fn new() -> MemoryLog {
        MemoryLog::default()
    }

    /// [`LogStore::put`] without a future: writes `rec`; when `forced`, makes it and every
    /// earlier pending write durable before returning.
    pub fn put_sync(&self, rec: TxRecord, forced: bool) -> Result<(), LogError> {
        if rec.gid.is_empty() {
            // The codec refuses to read such a record back; refuse to write it.
            return Err(LogError::Io {
                doing: "writing a record with an empty gid to the memory log".into(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        }
        let bytes = codec::encode(&rec);
        debug_assert_eq!(codec::decode(&bytes).as_ref(), Ok(&rec));
        let mut st = self.lock();
        st.visible.insert(rec.gid.clone(), bytes.clone());
        st.pending.push(Op::Put(rec.gid, bytes));
        st.stats.writes += 1;
        if forced {
            st.stats.forced_writes += 1;
            st.flush();
        }
        Ok(())
    }

    /// Makes every pending write durable (what [`LogStore::sync`] does), synchronously.
    pub fn sync_now(&self) {
        self.lock().flush();
    }

    /// Simulates a power loss: every write not yet durable is lost. The log stays usable, as
    /// if reopened after the crash.
    pub fn crash(&self) {
        let mut st = self.lock();
        st.pending.clear();
        st.visible = st.durable.clone();
    }

    /// The durable records, in gid order. Raw bytes that do not decode (only
    /// [`MemoryLog::put_raw`] can store those) are left out; `scan_active` and `get` report
    /// them as [`LogError::Corrupt`].
    pub fn durable_snapshot(&self) -> Vec<TxRecord> {
        self.lock()
            .durable
            .values()
            .filter_map(|b| codec::decode(b).ok())
            .collect()
    }

    /// How many writes and deletions are not durable yet.
    pub fn pending_writes(&self) -> usize {
        self.lock().pending.len()
    }

    /// Stores `bytes` as the durable record of `gid`, bypassing the codec: lets tests and
    /// simulations check that a damaged record stops recovery with an error naming the gid.
    pub fn put_raw(&self, gid: &str, bytes: Vec<u8>) {
        let mut st = self.lock();
        st.flush();
        st.durable.insert(gid.to_string(), bytes.clone());
        st.visible.insert(gid.to_string(), bytes);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update of State completes without panicking points in between that could
        // leave it half-changed, so a poisoned lock still guards consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn decode(gid: &str, bytes: &[u8]) -> Result<TxRecord, LogError> {
    let rec = codec::decode(bytes).map_err(|e| corrupt(gid, e.to_string()))?;
    if rec.gid != gid {
        return Err(corrupt(
            gid,
            format!("the record stored under this gid names gid {:?}", rec.gid),
        ));
    }
    Ok(rec)
}

fn corrupt(gid: &str, reason: String) -> LogError {
    LogError::Corrupt {
        path: PATH.into(),
        gid: gid.into(),
        reason,
    }
}

impl LogStore for MemoryLog {
    fn put(&self, rec: TxRecord, forced: bool) -> BoxFuture<'static, Result<(), LogError>> {
        futures::future::ready(self.put_sync(rec, forced)).boxed()
    }

    fn get(&self, gid: &str) -> Result<Option<TxRecord>, LogError> {
        match self.lock().visible.get(gid) {
            Some(b) => decode(gid, b).map(Some),
            None => Ok(None),
        }
    }

    fn scan_active(&self) -> Result<Vec<TxRecord>, LogError> {
        let st = self.lock();
        let mut out = Vec::new();
        for (gid, b) in &st.visible {
            let rec = decode(gid, b)?;
            if !rec.phase.is_terminal() {
                out.push(rec);
            }
        }
        Ok(out)
    }

    fn list(
        &self,
        filter: &ListFilter,
        before_gid: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TxRecord>, LogError> {
        let st = self.lock();
        use std::ops::Bound;
        let upper = before_gid.map_or(Bound::Unbounded, Bound::Excluded);
        let range = st.visible.range::<str, _>((Bound::Unbounded, upper));
        let mut out = Vec::new();
        let scan_max = limit.saturating_mul(LIST_SCANNED_PER_RESULT_MAX);
        for (gid, b) in range.rev().take(scan_max) {
            if out.len() >= limit {
                break;
            }
            let rec = decode(gid, b)?;
            if filter.matches(&rec) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    fn collect_ended(&self, before_unix_ms: u64, max: usize) -> Result<usize, LogError> {
        let mut st = self.lock();
        // Oldest first, like the sled backend's (updated_unix_ms, gid) index.
        let mut ended = Vec::new();
        for (gid, b) in &st.visible {
            let rec = decode(gid, b)?;
            if rec.phase.is_terminal() && rec.updated_unix_ms < before_unix_ms {
                ended.push((rec.updated_unix_ms, gid.clone()));
            }
        }
        ended.sort();
        ended.truncate(max);
        for (_, gid) in &ended {
            st.visible.remove(gid);
            // A deletion is not durable until the next flush, as on disk: a crash brings the
            // (terminal) record back, which is harmless.
            st.pending.push(Op::Delete(gid.clone()));
        }
        Ok(ended.len())
    }

    fn sync(&self) -> BoxFuture<'static, Result<(), LogError>> {
        self.sync_now();
        futures::future::ready(Ok(())).boxed()
    }

    fn stats(&self) -> LogStats {
        self.lock().stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::types::{Mode, Phase, RetryPolicy};
    use futures::FutureExt;

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
        }
    }

    #[test]
    fn put_future_is_ready_without_a_runtime() {
        let log = MemoryLog::new();
        let res = log
            .put(rec("a", Phase::Active, 1), true)
            .now_or_never()
            .expect("ready immediately");
        assert!(res.is_ok());
        assert_eq!(log.get("a").expect("get"), Some(rec("a", Phase::Active, 1)));
    }

    #[test]
    fn crash_loses_unforced_writes_only() {
        let log = MemoryLog::new();
        log.put_sync(rec("a", Phase::Active, 1), true).expect("put");
        log.put_sync(rec("b", Phase::Active, 1), false)
            .expect("put");
        log.put_sync(rec("a", Phase::Committing, 2), false)
            .expect("put");
        assert_eq!(log.pending_writes(), 2);
        assert_eq!(log.scan_active().expect("scan").len(), 2);
        log.crash();
        assert_eq!(log.durable_snapshot(), vec![rec("a", Phase::Active, 1)]);
        assert_eq!(log.get("b").expect("get"), None);
        assert_eq!(log.get("a").expect("get"), Some(rec("a", Phase::Active, 1)));
    }

    #[test]
    fn a_forced_put_makes_earlier_pending_writes_durable_in_order() {
        let log = MemoryLog::new();
        log.put_sync(rec("a", Phase::Active, 1), false)
            .expect("put");
        log.put_sync(rec("a", Phase::Committing, 2), false)
            .expect("put");
        log.put_sync(rec("b", Phase::Active, 1), true).expect("put");
        log.crash();
        assert_eq!(
            log.durable_snapshot(),
            vec![rec("a", Phase::Committing, 2), rec("b", Phase::Active, 1)]
        );
        assert_eq!(
            log.stats(),
            LogStats {
                writes: 3,
                forced_writes: 1,
                flushes: 1
            }
        );
    }

    #[test]
    fn sync_flushes_pending_and_counts_only_real_flushes() {
        let log = MemoryLog::new();
        log.sync().now_or_never().expect("ready").expect("sync");
        assert_eq!(log.stats().flushes, 0);
        log.put_sync(rec("a", Phase::Active, 1), false)
            .expect("put");
        log.sync().now_or_never().expect("ready").expect("sync");
        log.crash();
        assert_eq!(log.durable_snapshot().len(), 1);
        assert_eq!(log.stats().flushes, 1);
    }

    #[test]
    fn list_paginates_in_descending_gid_order_with_filter() {
        let log = MemoryLog::new();
        for (g, p) in [
            ("a", Phase::Active),
            ("b", Phase::Committed),
            ("c", Phase::Active),
            ("d", Phase::Active),
        ] {
            log.put_sync(rec(g, p, 1), false).expect("put");
        }
        let f = ListFilter {
            phases: vec![Phase::Active],
            ..ListFilter::default()
        };
        let gids = |v: Vec<TxRecord>| v.into_iter().map(|r| r.gid).collect::<Vec<_>>();
        assert_eq!(gids(log.list(&f, None, 2).expect("list")), ["d", "c"]);
        assert_eq!(gids(log.list(&f, Some("c"), 2).expect("list")), ["a"]);
        assert!(log.list(&f, None, 0).expect("list").is_empty());
    }

    #[test]
    fn collect_ended_deletes_old_terminal_records_only_oldest_first() {
        let log = MemoryLog::new();
        log.put_sync(rec("active-old", Phase::Active, 1), false)
            .expect("put");
        log.put_sync(rec("done-new", Phase::Committed, 100), false)
            .expect("put");
        log.put_sync(rec("done-old2", Phase::Aborted, 5), false)
            .expect("put");
        log.put_sync(rec("done-old1", Phase::Committed, 3), false)
            .expect("put");
        assert_eq!(log.collect_ended(50, 1).expect("collect"), 1);
        assert_eq!(log.get("done-old1").expect("get"), None);
        assert_eq!(log.collect_ended(50, 10).expect("collect"), 1);
        assert_eq!(log.get("done-old2").expect("get"), None);
        assert!(log.get("active-old").expect("get").is_some());
        assert!(log.get("done-new").expect("get").is_some());
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_the_gid() {
        let log = MemoryLog::new();
        log.put_raw("bad-gid", b"\xff\xff".to_vec());
        match log.scan_active() {
            Err(LogError::Corrupt { gid, .. }) => assert_eq!(gid, "bad-gid"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
