//! [`MemoryLog`]: an in-memory [`LogStore`] that models durability, for tests and the
//! deterministic simulation.
//!
//! It keeps two things: the durable state (what survives a crash) and the list of pending
//! writes and deletions not yet durable, in the order they were issued. An unforced put or a
//! deletion becomes pending; a forced put or [`LogStore::sync`] makes every pending write
//! durable, in order, like one group-commit flush of a real disk. [`MemoryLog::crash`] throws
//! the pending writes away, as a power loss would.
//!
//! Faults for tests of the runtime: [`MemoryLog::hold_syncs`] makes forced writes wait until
//! [`MemoryLog::release_syncs`] (a slow disk), and [`MemoryLog::fail_syncs`] makes them fail
//! after their record was applied, as a failed fsync does on a real disk;
//! [`MemoryLog::fault_at`] starts either at the first forced write of a record in a given
//! phase, so a test can aim at one decision without racing the runtime.
//!
//! Records are stored encoded with [`codec`], so the simulation exercises the codec too.
//! Every operation is done when it is called, under one lock, so the order of calls is the
//! order of effects; without held syncs the futures returned are already complete and need
//! no runtime (the deterministic simulation takes their results with `now_or_never`).

use super::codec;
use super::{ListFilter, ListPage, LogError, LogFuture, LogStats, LogStore};
use crate::engine::types::{Phase, Tombstone, TxRecord};
use futures::future::FutureExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The path reported in errors; there is no file.
const PATH: &str = "<memory>";

/// An in-memory log that knows which writes would survive a crash. Cheap to share behind an
/// `Arc`; all methods take `&self`.
pub struct MemoryLog {
    log_id: String,
    /// Shared with forced writes held by [`MemoryLog::hold_syncs`], which finish later.
    state: Arc<Mutex<State>>,
}

impl Default for MemoryLog {
    fn default() -> Self {
        MemoryLog {
            log_id: uuid::Uuid::new_v4().to_string(),
            state: Arc::default(),
        }
    }
}

/// The stored maps: records and tombstones, by gid.
#[derive(Clone, Default)]
struct Maps {
    records: BTreeMap<String, Vec<u8>>,
    tombs: BTreeMap<String, Tombstone>,
}

#[derive(Default)]
struct State {
    /// What a crash leaves.
    durable: Maps,
    /// Writes issued but not yet durable, oldest first.
    pending: Vec<Op>,
    /// What readers see: `durable` with `pending` applied.
    visible: Maps,
    stats: LogStats,
    /// Forced writes wait here while syncs are held.
    held: Option<Vec<futures::channel::oneshot::Sender<()>>>,
    /// While set, forced writes and syncs fail with this message (nothing becomes durable).
    failing: Option<String>,
    /// A fault that starts at the first forced write of a record in this phase.
    armed: Option<(Phase, Fault)>,
}

/// What [`MemoryLog::fault_at`] starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Hold forced writes and syncs, from that write on, until [`MemoryLog::release_syncs`].
    Hold,
    /// Fail that write and every sync after it (as after an fsync EIO).
    Fail,
}

enum Op {
    Put(String, Vec<u8>),
    Delete(String),
    PutTomb(Tombstone),
    DeleteTomb(String),
}

impl Maps {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Put(gid, bytes) => {
                self.records.insert(gid.clone(), bytes.clone());
            }
            Op::Delete(gid) => {
                self.records.remove(gid);
            }
            Op::PutTomb(t) => {
                self.tombs.insert(t.gid.clone(), t.clone());
            }
            Op::DeleteTomb(gid) => {
                self.tombs.remove(gid);
            }
        }
    }
}

impl State {
    /// Makes every pending write durable, in order: one group-commit flush.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        for op in std::mem::take(&mut self.pending) {
            self.durable.apply(&op);
        }
        self.stats.flushes += 1;
    }

    /// Issues `op`: visible at once, durable at the next flush.
    fn issue(&mut self, op: Op) {
        self.visible.apply(&op);
        self.pending.push(op);
    }
}

impl MemoryLog {
    /// An empty log with a new identity.
    pub fn new() -> MemoryLog {
        MemoryLog::default()
    }

    /// An empty log with the identity `log_id` (a simulation names its logs itself, so that
    /// its traces are the same on every run of a seed).
    pub fn with_log_id(log_id: impl Into<String>) -> MemoryLog {
        MemoryLog {
            log_id: log_id.into(),
            state: Arc::default(),
        }
    }

    /// [`LogStore::put`] without a future: writes `rec`; when `forced`, makes it and every
    /// earlier pending write durable before returning (syncs must not be held).
    pub fn put_sync(&self, rec: TxRecord, forced: bool) -> Result<(), LogError> {
        self.apply(rec, forced)?;
        if forced {
            let mut st = self.lock();
            assert!(st.held.is_none(), "put_sync with held syncs");
            Self::flush_or_fail(&mut st)?;
        }
        Ok(())
    }

    /// Applies a write (visible, pending) and counts it.
    fn apply(&self, rec: TxRecord, forced: bool) -> Result<(), LogError> {
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
        if forced && st.armed.is_some_and(|(p, _)| p == rec.phase) {
            match st.armed.take().map(|(_, f)| f) {
                Some(Fault::Hold) if st.held.is_none() => st.held = Some(Vec::new()),
                Some(Fault::Fail) => {
                    st.failing = Some(format!(
                        "injected fsync failure at the forced write of gid {:?} in phase {:?}",
                        rec.gid, rec.phase
                    ))
                }
                _ => {}
            }
        }
        st.issue(Op::Put(rec.gid, bytes));
        st.stats.writes += 1;
        if forced {
            st.stats.forced_writes += 1;
        }
        Ok(())
    }

    /// Arms `fault` to start at the first forced write of a record in `phase`.
    pub fn fault_at(&self, phase: Phase, fault: Fault) {
        self.lock().armed = Some((phase, fault));
    }

    fn flush_or_fail(st: &mut State) -> Result<(), LogError> {
        if let Some(msg) = &st.failing {
            return Err(LogError::Io {
                doing: "syncing the memory log".into(),
                source: std::io::Error::other(msg.clone()),
            });
        }
        st.flush();
        Ok(())
    }

    /// Makes every pending write durable (what [`LogStore::sync`] does), synchronously.
    pub fn sync_now(&self) {
        self.lock().flush();
    }

    /// From now on forced writes and syncs wait (a slow disk) until [`MemoryLog::release_syncs`].
    pub fn hold_syncs(&self) {
        let mut st = self.lock();
        if st.held.is_none() {
            st.held = Some(Vec::new());
        }
    }

    /// Lets every held forced write and sync complete (succeeding or failing per
    /// [`MemoryLog::fail_syncs`]), and stops holding new ones.
    pub fn release_syncs(&self) {
        let held = self.lock().held.take().unwrap_or_default();
        for h in held {
            let _ = h.send(());
        }
    }

    /// Forced writes and syncs waiting in [`MemoryLog::hold_syncs`].
    pub fn held_syncs(&self) -> usize {
        self.lock().held.as_ref().map_or(0, Vec::len)
    }

    /// From now on forced writes and syncs fail with `message` after their record was
    /// applied (as a failed fsync leaves the page cache), until called with `None`.
    pub fn fail_syncs(&self, message: Option<&str>) {
        self.lock().failing = message.map(str::to_string);
    }

    /// Simulates a power loss: every write not yet durable is lost. The log stays usable, as
    /// if reopened after the crash, with the same identity.
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
            .records
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
        st.durable.records.insert(gid.to_string(), bytes.clone());
        st.visible.records.insert(gid.to_string(), bytes);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// A future that completes the forced write or sync: now, or once released.
    fn completion(&self) -> LogFuture<()> {
        let mut st = self.lock();
        let Some(held) = st.held.as_mut() else {
            return ready(Self::flush_or_fail(&mut st));
        };
        let (tx, rx) = futures::channel::oneshot::channel();
        held.push(tx);
        drop(st);
        let state = Arc::clone(&self.state);
        async move {
            // A dropped sender (the log went away) completes the write as released.
            let _ = rx.await;
            let mut st = lock(&state);
            Self::flush_or_fail(&mut st)
        }
        .boxed()
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // Every update of State completes without panicking points in between that could leave
    // it half-changed, so a poisoned lock still guards consistent data.
    state.lock().unwrap_or_else(|p| p.into_inner())
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

/// The reads and retention of the memory log, done at once (under the lock, at call time).
impl MemoryLog {
    fn get_now(&self, gid: &str) -> Result<Option<TxRecord>, LogError> {
        match self.lock().visible.records.get(gid) {
            Some(b) => decode(gid, b).map(Some),
            None => Ok(None),
        }
    }

    fn scan_active_now(
        &self,
        after_gid: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TxRecord>, LogError> {
        use std::ops::Bound;
        let st = self.lock();
        let lower = after_gid.map_or(Bound::Unbounded, Bound::Excluded);
        let mut out = Vec::new();
        for (gid, b) in st
            .visible
            .records
            .range::<str, _>((lower, Bound::Unbounded))
        {
            if out.len() >= limit {
                break;
            }
            let rec = decode(gid, b)?;
            if !rec.phase.is_terminal() {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Examines records in gid order with the same budget as the sled log's indexes would
    /// (the memory log has no indexes: every record counts as examined), so pagination
    /// behaves alike.
    fn list_now(
        &self,
        filter: &ListFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, LogError> {
        use std::ops::Bound;
        let st = self.lock();
        let upper = cursor.map_or(Bound::Unbounded, Bound::Excluded);
        let entries = st
            .visible
            .records
            .range::<str, _>((Bound::Unbounded, upper))
            .rev()
            .map(|(gid, b)| Ok((gid.clone(), Some(decode(gid, b)?))));
        super::list_page(entries, filter, limit)
    }

    fn collect_ended_now(
        &self,
        before_unix_ms: u64,
        now_unix_ms: u64,
        max: usize,
    ) -> Result<usize, LogError> {
        let mut st = self.lock();
        let mut ended = Vec::new();
        for (gid, b) in &st.visible.records {
            // Undecodable records are skipped (and stay), as the sled log does.
            let Ok(rec) = decode(gid, b) else { continue };
            if rec.phase.is_terminal() && rec.updated_unix_ms < before_unix_ms {
                ended.push((rec.updated_unix_ms, rec));
            }
        }
        ended.sort_by(|a, b| (a.0, &a.1.gid).cmp(&(b.0, &b.1.gid)));
        ended.truncate(max);
        for (_, rec) in &ended {
            st.issue(Op::PutTomb(rec.tombstone(now_unix_ms)));
            st.issue(Op::Delete(rec.gid.clone()));
        }
        Ok(ended.len())
    }

    fn get_tombstone_now(&self, gid: &str) -> Result<Option<Tombstone>, LogError> {
        Ok(self.lock().visible.tombs.get(gid).cloned())
    }

    fn collect_tombstones_now(&self, before_unix_ms: u64, max: usize) -> Result<usize, LogError> {
        let mut st = self.lock();
        let mut old: Vec<(u64, String)> = st
            .visible
            .tombs
            .values()
            .filter(|t| t.collected_unix_ms < before_unix_ms)
            .map(|t| (t.collected_unix_ms, t.gid.clone()))
            .collect();
        old.sort();
        old.truncate(max);
        for (_, gid) in &old {
            st.issue(Op::DeleteTomb(gid.clone()));
        }
        Ok(old.len())
    }
}

impl LogStore for MemoryLog {
    fn log_id(&self) -> &str {
        &self.log_id
    }

    fn put(&self, rec: TxRecord, forced: bool) -> LogFuture<()> {
        if let Err(e) = self.apply(rec, forced) {
            return ready(Err(e));
        }
        if !forced {
            return ready(Ok(()));
        }
        self.completion()
    }

    fn get(&self, gid: &str) -> LogFuture<Option<TxRecord>> {
        ready(self.get_now(gid))
    }

    fn scan_active(&self, after_gid: Option<&str>, limit: usize) -> LogFuture<Vec<TxRecord>> {
        ready(self.scan_active_now(after_gid, limit))
    }

    fn list(&self, filter: &ListFilter, cursor: Option<&str>, limit: usize) -> LogFuture<ListPage> {
        ready(self.list_now(filter, cursor, limit))
    }

    fn collect_ended(&self, before_unix_ms: u64, now_unix_ms: u64, max: usize) -> LogFuture<usize> {
        ready(self.collect_ended_now(before_unix_ms, now_unix_ms, max))
    }

    fn get_tombstone(&self, gid: &str) -> LogFuture<Option<Tombstone>> {
        ready(self.get_tombstone_now(gid))
    }

    fn collect_tombstones(&self, before_unix_ms: u64, max: usize) -> LogFuture<usize> {
        ready(self.collect_tombstones_now(before_unix_ms, max))
    }

    fn sync(&self) -> LogFuture<()> {
        self.completion()
    }

    fn stats(&self) -> LogStats {
        self.lock().stats
    }
}

/// A future that is already complete: the memory log answers at call time.
fn ready<T: Send + 'static>(result: Result<T, LogError>) -> LogFuture<T> {
    futures::future::ready(result).boxed()
}

#[cfg(test)]
mod tests {
    use super::super::conformance;
    use super::*;
    use crate::engine::types::{Mode, Outcome, Phase, RetryPolicy};
    use futures::future::BoxFuture;
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
            reason: None,
            trace_parent: None,
        }
    }

    /// The memory log under the conformance suite: a reopen is [`MemoryLog::crash`] (a power
    /// loss keeps only what was made durable), a failing disk is [`MemoryLog::fail_syncs`].
    #[derive(Default)]
    struct Backend {
        logs: std::collections::HashMap<String, Arc<MemoryLog>>,
    }

    impl conformance::Backend for Backend {
        fn name(&self) -> &str {
            "memory"
        }

        fn open_fresh(&mut self) -> BoxFuture<'_, Arc<dyn LogStore>> {
            let log = Arc::new(MemoryLog::new());
            self.logs.insert(log.log_id().to_string(), Arc::clone(&log));
            futures::future::ready(log as Arc<dyn LogStore>).boxed()
        }

        fn reopen(&mut self, log: Arc<dyn LogStore>) -> BoxFuture<'_, Option<Arc<dyn LogStore>>> {
            let same = Arc::clone(&self.logs[log.log_id()]);
            drop(log);
            same.crash();
            futures::future::ready(Some(same as Arc<dyn LogStore>)).boxed()
        }

        fn fail_syncs(&mut self, log: &Arc<dyn LogStore>, failing: bool) -> bool {
            self.logs[log.log_id()]
                .fail_syncs(failing.then_some("injected by the conformance suite"));
            true
        }
    }

    #[test]
    fn conforms_to_the_log_store_contract() {
        // Every future of the memory log is ready at once: any executor will do.
        futures::executor::block_on(conformance::check_all(&mut Backend::default()));
    }

    #[test]
    fn a_failed_sync_applies_the_write_but_does_not_make_it_durable() {
        let log = MemoryLog::new();
        log.fail_syncs(Some("EIO"));
        let res = log
            .put(rec("a", Phase::Committing, 1), true)
            .now_or_never()
            .expect("ready");
        assert!(res.is_err());
        assert!(
            log.get_now("a").expect("get").is_some(),
            "applied, as in a page cache"
        );
        log.crash();
        assert_eq!(log.get_now("a").expect("get"), None, "never durable");
    }

    #[test]
    fn held_syncs_complete_on_release() {
        let log = MemoryLog::new();
        log.hold_syncs();
        let mut put = log.put(rec("a", Phase::Active, 1), true);
        assert!((&mut put).now_or_never().is_none(), "held");
        assert_eq!(log.held_syncs(), 1);
        log.release_syncs();
        put.now_or_never().expect("released").expect("durable");
        log.crash();
        assert!(log.get_now("a").expect("get").is_some());
    }

    #[test]
    fn put_future_is_ready_without_a_runtime() {
        let log = MemoryLog::new();
        let res = log
            .put(rec("a", Phase::Active, 1), true)
            .now_or_never()
            .expect("ready immediately");
        assert!(res.is_ok());
        assert_eq!(
            log.get_now("a").expect("get"),
            Some(rec("a", Phase::Active, 1))
        );
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
        assert_eq!(log.scan_active_now(None, 10).expect("scan").len(), 2);
        log.crash();
        assert_eq!(log.durable_snapshot(), vec![rec("a", Phase::Active, 1)]);
        assert_eq!(log.get_now("b").expect("get"), None);
        assert_eq!(
            log.get_now("a").expect("get"),
            Some(rec("a", Phase::Active, 1))
        );
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
        let gids = |p: ListPage| p.records.into_iter().map(|r| r.gid).collect::<Vec<_>>();
        let first = log.list_now(&f, None, 2).expect("list");
        assert_eq!(first.next_cursor.as_deref(), Some("c"));
        assert_eq!(gids(first), ["d", "c"]);
        let second = log.list_now(&f, Some("c"), 2).expect("list");
        assert_eq!(second.next_cursor, None, "the scan reached the end");
        assert_eq!(gids(second), ["a"]);
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
        assert_eq!(log.collect_ended_now(50, 60, 1).expect("collect"), 1);
        assert_eq!(log.get_now("done-old1").expect("get"), None);
        let tomb = log
            .get_tombstone_now("done-old1")
            .expect("tomb")
            .expect("kept");
        assert_eq!(
            (tomb.outcome, tomb.collected_unix_ms),
            (Outcome::Committed, 60)
        );
        assert_eq!(log.collect_ended_now(50, 70, 10).expect("collect"), 1);
        assert_eq!(log.get_now("done-old2").expect("get"), None);
        assert!(log.get_now("active-old").expect("get").is_some());
        assert!(log.get_now("done-new").expect("get").is_some());
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_the_gid() {
        let log = MemoryLog::new();
        log.put_raw("bad-gid", b"\xff\xff".to_vec());
        match log.scan_active_now(None, 10) {
            Err(LogError::Corrupt { gid, .. }) => assert_eq!(gid, "bad-gid"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
