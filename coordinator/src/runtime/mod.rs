//! The runtime: carries out the engine's commands with real sockets, files and time.
//!
//! Live transactions are spread over a fixed number of **shards** by a hash of their gid.
//! Each shard is one tokio task that owns its transactions' [`Tx`] state machines, one timer
//! queue (backoffs and deadlines) and one inbox; it feeds events to the engine and executes
//! the commands: log writes (forced ones report back as [`Event::Durable`] when the log says
//! they are on stable storage), participant calls (spawned; their answers come back through
//! the inbox), timers, and answers to clients waiting for an outcome. A parked transaction
//! therefore costs its state and a timer entry, not a task and channels of its own.
//!
//! Invariants kept here:
//! - A forced record is reported durable to the engine only after the log says so.
//! - Writes of one transaction reach the log in the order the engine issued them (`put`
//!   applies a write before it returns; see [`LogStore::put`]).
//! - A transaction leaves its shard only after its terminal record is readable from the log,
//!   so `Get`/`Outcome` never miss it.
//! - A transaction whose log write fails is never driven past it: it is dropped from memory
//!   (and resumed from the log at the next start); a failed `Begun` write fails the `Begin`.

pub mod participants;

use crate::config::Config;
use crate::engine::{
    BranchDef, Command, Event, Mode, Mutations, NewTx, Op, Outcome, Phase, RetryPolicy, Tx,
    TxRecord,
};
use crate::log::{ListFilter, LogError, LogStore};
use futures::{FutureExt, StreamExt};
use participants::Pool;
use rand::Rng;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::time::{delay_queue, DelayQueue};
use treaty_proto::v1::BranchRequest;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Crash on purpose at a named point when the `failpoints` feature is on and the point is
/// armed (`FAILPOINTS=<name>=return`); compiled out otherwise.
macro_rules! crash_point {
    ($name:expr) => {
        fail::fail_point!($name, |_| {
            eprintln!("treatyd: failpoint {} fired: exiting now", $name);
            std::process::abort();
        })
    };
}

/// The state of one transaction as published to readers.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub record: TxRecord,
    /// The final outcome once it can be told (for 2PC commit: once the decision is durable).
    pub outcome: Outcome,
}

impl Snapshot {
    /// A snapshot of a record read from the log (no shard drives it).
    pub fn from_log(record: TxRecord) -> Snapshot {
        let outcome = match record.phase {
            Phase::Committed | Phase::Committing => Outcome::Committed,
            Phase::Aborted | Phase::Aborting => Outcome::Aborted,
            Phase::Active | Phase::Compensating => Outcome::Pending,
        };
        Snapshot { record, outcome }
    }

    fn of(tx: &Tx) -> Snapshot {
        Snapshot {
            record: tx.record().clone(),
            outcome: tx.decided(),
        }
    }
}

/// Why `begin` did not start a transaction.
#[derive(Debug, thiserror::Error)]
pub enum BeginError {
    #[error("a transaction with gid {0:?} already exists with a different definition")]
    AlreadyExists(String),
    #[error("the coordinator is shutting down and takes no new transactions")]
    ShuttingDown,
    #[error(transparent)]
    Log(#[from] LogError),
}

/// What `begin` answers.
#[derive(Clone, Debug)]
pub struct Begun {
    pub gid: String,
    pub outcome: Outcome,
    /// The gid already existed with the same definition.
    pub existing: bool,
}

/// Where `Watch` reads from.
pub enum WatchTarget {
    Live(watch::Receiver<Snapshot>),
    Stored(Snapshot),
    Unknown,
}

/// A message to a shard about one gid. Boxed in the inbox so its slots stay small.
enum Msg {
    /// Something for the engine.
    Engine(Event),
    /// A forced write finished (durable, or failed).
    Written {
        seq: u64,
        result: Result<(), String>,
    },
    /// Start a new transaction unless the gid is live; answer once `Begun` is durable.
    Begin {
        tx: Box<Tx>,
        reply: oneshot::Sender<Result<Started, BeginError>>,
    },
    /// Resume a transaction read from the log.
    Recover(Box<Tx>),
    Get(oneshot::Sender<Option<Snapshot>>),
    Watch(oneshot::Sender<Option<watch::Receiver<Snapshot>>>),
    /// Answer with the outcome once decided (or `Pending` if the gid is not live).
    WaitOutcome(oneshot::Sender<Outcome>),
    RetryNow(oneshot::Sender<Option<u32>>),
}

/// What a shard answers to `Begin`.
enum Started {
    /// A new transaction; `Begun` is durable.
    New,
    /// The gid is live with the same definition.
    Live,
}

struct Entry {
    tx: Tx,
    deadline: Option<delay_queue::Key>,
    /// The `Begin` call waiting for `Begun` to be durable.
    begun: Option<oneshot::Sender<Result<Started, BeginError>>>,
    /// Clients waiting for the outcome.
    waiters: Vec<oneshot::Sender<Outcome>>,
    /// Created on the first `Watch`.
    watch: Option<watch::Sender<Snapshot>>,
}

struct Inner {
    log: Arc<dyn LogStore>,
    config: Config,
    pool: Pool,
    shards: Vec<mpsc::UnboundedSender<(String, Box<Msg>)>>,
    live: AtomicUsize,
    accepting: AtomicBool,
    mutations: Mutations,
}

/// The coordinator runtime: owns live transactions. Cheap to clone. Must be created inside a
/// tokio runtime (it spawns its shards).
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl Runtime {
    pub fn new(log: Arc<dyn LogStore>, config: Config) -> Runtime {
        Runtime::with_mutations(log, config, Mutations::default())
    }

    /// A runtime whose engines carry deliberate bugs (checker tests only).
    pub fn with_mutations(log: Arc<dyn LogStore>, config: Config, mutations: Mutations) -> Runtime {
        // A few shards per core: enough to use every core, few enough to batch well.
        let n = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        let mut receivers = Vec::with_capacity(n);
        let mut senders = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            receivers.push(rx);
        }
        let pool = Pool::new(config.call_timeout);
        let inner = Arc::new(Inner {
            log,
            config,
            pool,
            shards: senders,
            live: AtomicUsize::new(0),
            accepting: AtomicBool::new(true),
            mutations,
        });
        for (i, rx) in receivers.into_iter().enumerate() {
            let shard = Shard {
                rt: Arc::downgrade(&inner),
                me: inner.shards[i].downgrade(),
                txs: HashMap::new(),
                timers: DelayQueue::new(),
            };
            tokio::spawn(shard.run(rx));
        }
        Runtime { inner }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn log(&self) -> &Arc<dyn LogStore> {
        &self.inner.log
    }

    /// Number of transactions being driven.
    pub fn live(&self) -> usize {
        self.inner.live.load(Ordering::Acquire)
    }

    fn send(&self, gid: &str, msg: Msg) -> bool {
        let mut h = DefaultHasher::new();
        gid.hash(&mut h);
        let shard = &self.inner.shards[(h.finish() as usize) % self.inner.shards.len()];
        shard.send((gid.to_string(), Box::new(msg))).is_ok()
    }

    /// Resume every non-terminal transaction in the log. Returns how many.
    pub fn recover(&self) -> Result<usize, LogError> {
        let records = self.inner.log.scan_active()?;
        let n = records.len();
        for rec in records {
            let gid = rec.gid.clone();
            let mut tx = Tx::recover(rec);
            tx.set_mutations(self.inner.mutations);
            self.send(&gid, Msg::Recover(Box::new(tx)));
        }
        Ok(n)
    }

    /// Start a transaction (or find the existing one with this gid) and answer once `Begun`
    /// is durable; with `wait`, once the outcome is final or `wait` has passed.
    pub async fn begin(&self, mut def: NewTx, wait: Option<Duration>) -> Result<Begun, BeginError> {
        if !self.inner.accepting.load(Ordering::Acquire) {
            return Err(BeginError::ShuttingDown);
        }
        // Zero-copy payloads would keep tonic's whole decode buffer alive for as long as the
        // transaction: measured 8 KiB per parked transaction (treaty-bench parked, massif).
        // Copy them into allocations of their own size.
        for b in &mut def.branches {
            b.payload = bytes::Bytes::copy_from_slice(&b.payload);
            b.compensation_payload = bytes::Bytes::copy_from_slice(&b.compensation_payload);
        }
        let gid = def.gid.clone();
        let mut tx = Tx::new(def, now_ms());
        tx.set_mutations(self.inner.mutations);
        let (reply, answer) = oneshot::channel();
        if !self.send(
            &gid,
            Msg::Begin {
                tx: Box::new(tx),
                reply,
            },
        ) {
            return Err(BeginError::ShuttingDown);
        }
        let started = answer.await.map_err(|_| LogError::Closed)??;
        let existing = matches!(started, Started::Live);
        let outcome = match (wait, started) {
            (None, _) => Outcome::Pending,
            (Some(bound), _) => self.wait_outcome(&gid, bound).await?,
        };
        Ok(Begun {
            gid,
            outcome,
            existing,
        })
    }

    /// The outcome once final, waiting up to `bound`; from the log when the gid is not live.
    async fn wait_outcome(&self, gid: &str, bound: Duration) -> Result<Outcome, LogError> {
        let (tx, rx) = oneshot::channel();
        if self.send(gid, Msg::WaitOutcome(tx)) {
            match tokio::time::timeout(bound, rx).await {
                Ok(Ok(Outcome::Pending)) | Ok(Err(_)) => {}
                Ok(Ok(o)) => return Ok(o),
                Err(_) => return Ok(Outcome::Pending),
            }
        }
        // Not live (finished meanwhile): the log has the final record.
        Ok(self
            .inner
            .log
            .get(gid)?
            .map_or(Outcome::Pending, |r| Snapshot::from_log(r).outcome))
    }

    async fn ask<T>(&self, gid: &str, msg: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        if !self.send(gid, msg(tx)) {
            return None;
        }
        rx.await.ok()
    }

    /// The current snapshot of `gid`: live, else from the log.
    pub async fn get(&self, gid: &str) -> Result<Option<Snapshot>, LogError> {
        if let Some(Some(s)) = self.ask(gid, Msg::Get).await {
            return Ok(Some(s));
        }
        Ok(self.inner.log.get(gid)?.map(Snapshot::from_log))
    }

    /// A receiver of every change of a live transaction, or its stored snapshot.
    pub async fn watch(&self, gid: &str) -> Result<WatchTarget, LogError> {
        if let Some(Some(rx)) = self.ask(gid, Msg::Watch).await {
            return Ok(WatchTarget::Live(rx));
        }
        Ok(match self.inner.log.get(gid)? {
            Some(rec) => WatchTarget::Stored(Snapshot::from_log(rec)),
            None => WatchTarget::Unknown,
        })
    }

    /// What a participant in doubt is told. Presumed abort: unknown means aborted.
    pub async fn outcome(&self, gid: &str) -> Result<Outcome, LogError> {
        Ok(match self.get(gid).await? {
            Some(s) => s.outcome,
            None => Outcome::Aborted,
        })
    }

    /// Send every waiting call of `gid` now. `None` when the gid is not live.
    pub async fn retry(&self, gid: &str) -> Option<u32> {
        self.ask(gid, Msg::RetryNow).await.flatten()
    }

    /// Records matching `filter`, newest gid first, with live state overlaid.
    pub async fn list(
        &self,
        filter: &ListFilter,
        before_gid: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Snapshot>, LogError> {
        let records = self.inner.log.list(filter, before_gid, limit)?;
        let overlaid = records.into_iter().map(|rec| async move {
            if rec.phase.is_terminal() {
                return Snapshot::from_log(rec);
            }
            match self.ask(&rec.gid, Msg::Get).await {
                Some(Some(s)) => s,
                _ => Snapshot::from_log(rec),
            }
        });
        Ok(futures::future::join_all(overlaid).await)
    }

    /// Stop taking new transactions; wait up to `grace` for live ones to finish; make the
    /// log durable. Unfinished transactions are resumed by the next start.
    pub async fn shutdown(&self, grace: Duration) -> Result<(), LogError> {
        self.inner.accepting.store(false, Ordering::Release);
        let deadline = tokio::time::Instant::now() + grace;
        while self.live() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let synced = self.inner.log.sync().await;
        // One line with the log's counters over this run, for operators and for treaty-bench
        // (which reads `flushes` to report fsyncs per committed transaction).
        let stats = self.inner.log.stats();
        tracing::info!(
            writes = stats.writes,
            forced_writes = stats.forced_writes,
            flushes = stats.flushes,
            "log stats at shutdown"
        );
        synced
    }

    /// Delete finished transactions older than the retention period, in bounded batches.
    pub fn collect_garbage(&self) -> Result<usize, LogError> {
        let cutoff = now_ms().saturating_sub(self.inner.config.retention.as_millis() as u64);
        let mut total = 0;
        loop {
            let n = self.inner.log.collect_ended(cutoff, 10_000)?;
            total += n;
            if n < 10_000 {
                return Ok(total);
            }
        }
    }
}

/// One shard: the transactions whose gid hashes here, their timers, and an inbox.
struct Shard {
    /// Weak, so that dropping the last `Runtime` ends the shards.
    rt: std::sync::Weak<Inner>,
    /// Weak too: the shard's inbox closes, and the shard ends, once the runtime is gone and
    /// no call or write is still in flight.
    me: mpsc::WeakUnboundedSender<(String, Box<Msg>)>,
    txs: HashMap<String, Entry>,
    timers: DelayQueue<(String, Event)>,
}

impl Shard {
    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<(String, Box<Msg>)>) {
        loop {
            tokio::select! {
                msg = inbox.recv() => match msg {
                    Some((gid, msg)) => {
                        let Some(rt) = self.rt.upgrade() else { return };
                        self.on_msg(&rt, gid, *msg);
                    }
                    None => return,
                },
                Some(expired) = self.timers.next(), if !self.timers.is_empty() => {
                    let Some(rt) = self.rt.upgrade() else { return };
                    let (gid, event) = expired.into_inner();
                    if event == Event::DeadlinePassed {
                        if let Some(e) = self.txs.get_mut(&gid) {
                            e.deadline = None;
                        }
                    }
                    self.feed(&rt, &gid, event);
                }
            }
        }
    }

    fn on_msg(&mut self, rt: &Inner, gid: String, msg: Msg) {
        match msg {
            Msg::Engine(event) => {
                self.feed(rt, &gid, event);
            }
            Msg::Written { seq, result } => match result {
                Ok(()) => {
                    if let Some(e) = self.txs.get_mut(&gid) {
                        if let Some(reply) = e.begun.take() {
                            crash_point!("treaty::after_begun_durable");
                            let _ = reply.send(Ok(Started::New));
                        } else if matches!(
                            e.tx.record().phase,
                            Phase::Committing | Phase::Compensating
                        ) {
                            crash_point!("treaty::after_decision_durable");
                        }
                    }
                    self.feed(rt, &gid, Event::Durable { seq });
                }
                Err(e) => self.drop_failed(rt, &gid, e),
            },
            Msg::Begin { tx, reply } => {
                if let Some(e) = self.txs.get(&gid) {
                    let def: Vec<BranchDef> =
                        tx.record().branches.iter().map(|b| b.def.clone()).collect();
                    let same = e.tx.record().same_definition(tx.record().mode, &def);
                    let _ = reply.send(if same {
                        Ok(Started::Live)
                    } else {
                        Err(BeginError::AlreadyExists(gid))
                    });
                    return;
                }
                // A finished transaction is found in the log: its terminal record is readable
                // before it leaves the shard.
                match rt.log.get(&gid) {
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                    Ok(Some(rec)) => {
                        let def: Vec<BranchDef> =
                            tx.record().branches.iter().map(|b| b.def.clone()).collect();
                        let _ = reply.send(if rec.same_definition(tx.record().mode, &def) {
                            Ok(Started::Live)
                        } else {
                            Err(BeginError::AlreadyExists(gid))
                        });
                    }
                    Ok(None) => {
                        self.insert(rt, &gid, *tx, Some(reply));
                        self.feed(rt, &gid, Event::Start);
                    }
                }
            }
            Msg::Recover(tx) => {
                if !self.txs.contains_key(&gid) {
                    self.insert(rt, &gid, *tx, None);
                    self.feed(rt, &gid, Event::Recovered);
                }
            }
            Msg::Get(reply) => {
                let _ = reply.send(self.txs.get(&gid).map(|e| Snapshot::of(&e.tx)));
            }
            Msg::Watch(reply) => {
                let rx = self.txs.get_mut(&gid).map(|e| match &e.watch {
                    Some(w) => w.subscribe(),
                    None => {
                        let (w, rx) = watch::channel(Snapshot::of(&e.tx));
                        e.watch = Some(w);
                        rx
                    }
                });
                let _ = reply.send(rx);
            }
            Msg::WaitOutcome(reply) => match self.txs.get_mut(&gid) {
                Some(e) if e.tx.decided() == Outcome::Pending => e.waiters.push(reply),
                Some(e) => {
                    let _ = reply.send(e.tx.decided());
                }
                None => {
                    let _ = reply.send(Outcome::Pending);
                }
            },
            Msg::RetryNow(reply) => {
                let n = self.txs.contains_key(&gid).then(|| {
                    let calls = self.feed(rt, &gid, Event::RetryNow);
                    calls as u32
                });
                let _ = reply.send(n);
            }
        }
    }

    fn insert(
        &mut self,
        rt: &Inner,
        gid: &str,
        tx: Tx,
        begun: Option<oneshot::Sender<Result<Started, BeginError>>>,
    ) {
        rt.live.fetch_add(1, Ordering::AcqRel);
        self.txs.insert(
            gid.to_string(),
            Entry {
                tx,
                deadline: None,
                begun,
                waiters: Vec::new(),
                watch: None,
            },
        );
    }

    fn remove(&mut self, rt: &Inner, gid: &str) -> Option<Entry> {
        let mut e = self.txs.remove(gid)?;
        rt.live.fetch_sub(1, Ordering::AcqRel);
        if let Some(k) = e.deadline.take() {
            self.timers.remove(&k);
        }
        Some(e)
    }

    /// A log write of `gid` failed: stop driving it. Its last durable record is resumed at the
    /// next start; nothing that depends on the failed write happens.
    fn drop_failed(&mut self, rt: &Inner, gid: &str, error: String) {
        tracing::error!(gid, %error, "log write failed; the transaction is left to recovery");
        if let Some(mut e) = self.remove(rt, gid) {
            if let Some(reply) = e.begun.take() {
                let _ = reply.send(Err(BeginError::Log(LogError::Io {
                    doing: format!("recording Begun of gid {gid:?}"),
                    source: std::io::Error::other(error),
                })));
            }
        }
    }

    /// Feed one event to `gid`'s engine and carry out the commands. Returns how many calls
    /// went out (for `Retry`).
    fn feed(&mut self, rt: &Inner, gid: &str, event: Event) -> usize {
        let Some(entry) = self.txs.get_mut(gid) else {
            return 0;
        };
        let commands = entry.tx.handle(now_ms(), event);
        let mut calls = 0;
        let mut phase_two_calls = 0;
        let mut finished = false;
        for cmd in commands {
            match cmd {
                Command::Persist { record, forced } => {
                    if record.phase.is_terminal() {
                        crash_point!("treaty::before_ended");
                    }
                    let seq = record.seq;
                    // `put` applies the write before returning: order is the call order.
                    let written = rt.log.put(record, forced);
                    if forced {
                        let Some(me) = self.me.upgrade() else {
                            return calls;
                        };
                        let gid = gid.to_string();
                        tokio::spawn(async move {
                            let result = written.await.map_err(|e| e.to_string());
                            let _ = me.send((gid, Box::new(Msg::Written { seq, result })));
                        });
                    } else if let Some(Err(e)) = written.now_or_never() {
                        self.drop_failed(rt, gid, e.to_string());
                        return calls;
                    }
                }
                Command::Call {
                    branch,
                    op,
                    attempt,
                } => {
                    if op.is_phase_two() {
                        if phase_two_calls == 1 {
                            crash_point!("treaty::between_phase_two_calls");
                        }
                        phase_two_calls += 1;
                    }
                    calls += 1;
                    self.spawn_call(rt, gid, branch, op, attempt);
                }
                Command::ScheduleRetry {
                    branch,
                    op,
                    attempt,
                    backoff_bound_ms,
                } => {
                    // Full jitter: uniform in [0, bound].
                    let delay = rand::thread_rng().gen_range(0..=backoff_bound_ms);
                    self.timers.insert(
                        (
                            gid.to_string(),
                            Event::RetryDue {
                                branch,
                                op,
                                attempt,
                            },
                        ),
                        Duration::from_millis(delay),
                    );
                }
                Command::SetDeadline { at_unix_ms } => {
                    let delay = Duration::from_millis(at_unix_ms.saturating_sub(now_ms()));
                    let key = self
                        .timers
                        .insert((gid.to_string(), Event::DeadlinePassed), delay);
                    if let Some(e) = self.txs.get_mut(gid) {
                        if let Some(old) = e.deadline.replace(key) {
                            self.timers.remove(&old);
                        }
                    }
                }
                Command::Decided(outcome) => {
                    if let Some(e) = self.txs.get_mut(gid) {
                        for w in e.waiters.drain(..) {
                            let _ = w.send(outcome);
                        }
                    }
                }
                Command::Finished => finished = true,
            }
        }
        if let Some(e) = self.txs.get(gid) {
            if let Some(w) = &e.watch {
                w.send_replace(Snapshot::of(&e.tx));
            }
        }
        if finished {
            if let Some(e) = self.remove(rt, gid) {
                let outcome = e.tx.decided();
                for w in e.waiters {
                    let _ = w.send(outcome);
                }
            }
        }
        calls
    }

    fn spawn_call(&self, rt: &Inner, gid: &str, branch: u32, op: Op, attempt: u32) {
        let Some(e) = self.txs.get(gid) else { return };
        let rec = e.tx.record();
        let b = &rec.branches[branch as usize];
        let payload = if op == Op::Compensate {
            b.def.compensation_payload.clone()
        } else {
            b.def.payload.clone()
        };
        let req = BranchRequest {
            gid: gid.to_string(),
            branch_id: branch,
            handler: b.def.handler.clone(),
            payload,
            attempt,
            deadline_unix_ms: if op.is_phase_two() {
                0
            } else {
                rec.deadline_unix_ms
            },
            log_id: String::new(),
            outcome_endpoint: String::new(),
        };
        let client = rt.pool.client(&b.def.endpoint);
        let timeout = rt.config.call_timeout;
        let Some(me) = self.me.upgrade() else { return };
        let gid = gid.to_string();
        tokio::spawn(async move {
            let reply = participants::call(client, timeout, op, req).await;
            if matches!(op, Op::Prepare | Op::Execute) {
                crash_point!("treaty::after_some_phase_one_replies");
            }
            let event = Event::Reply {
                branch,
                op,
                attempt,
                reply,
            };
            let _ = me.send((gid, Box::new(Msg::Engine(event))));
        });
    }
}

/// Build the engine's definition of a new transaction with the runtime's defaults applied.
pub fn new_tx(
    config: &Config,
    gid: String,
    mode: Mode,
    branches: Vec<BranchDef>,
    deadline: Option<Duration>,
    retry: Option<RetryPolicy>,
) -> NewTx {
    let deadline = deadline.unwrap_or(config.default_deadline);
    NewTx {
        gid,
        mode,
        branches,
        deadline_unix_ms: now_ms() + deadline.as_millis() as u64,
        retry: retry.unwrap_or(RetryPolicy {
            initial_backoff_ms: config.initial_backoff.as_millis() as u64,
            max_backoff_ms: config.max_backoff.as_millis() as u64,
            stuck_after_attempts: config.stuck_after_attempts,
        }),
    }
}
