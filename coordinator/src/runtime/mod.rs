//! The runtime: carries out the engine's commands with real sockets, files and time.
//!
//! Each live transaction has one driver task that owns its [`Tx`] state machine and a
//! channel of events. The driver writes records through the [`LogStore`] (awaiting forced
//! writes, whose durability it then reports to the engine), spawns participant calls, timers
//! and backoffs that send their results back as events, and publishes a [`Snapshot`] after
//! each batch for `Get`, `Watch` and waiting clients.
//!
//! Invariants kept here:
//! - A forced record is reported durable to the engine only after the log says so.
//! - A transaction leaves the in-memory table only after its terminal record is readable
//!   from the log, so `Get`/`Outcome` never miss it.
//! - A failed log write is retried, never skipped (except the first `Begun` write, which
//!   fails the `Begin` call instead).

pub mod participants;

use crate::config::Config;
use crate::engine::{
    BranchDef, Command, Event, Mode, Mutations, NewTx, Op, Outcome, Phase, RetryPolicy, Tx,
    TxRecord,
};
use crate::log::{ListFilter, LogError, LogStore};
use participants::Pool;
use rand::Rng;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};
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
    /// A snapshot of a record read from the log (no driver running).
    pub fn from_log(record: TxRecord) -> Snapshot {
        let outcome = match record.phase {
            Phase::Committed | Phase::Committing => Outcome::Committed,
            Phase::Aborted | Phase::Aborting => Outcome::Aborted,
            Phase::Active | Phase::Compensating => Outcome::Pending,
        };
        Snapshot { record, outcome }
    }
}

enum Msg {
    Engine(Event),
    /// Operator retry; answers how many calls went out.
    RetryNow(oneshot::Sender<u32>),
}

#[derive(Clone)]
struct Handle {
    tx: mpsc::UnboundedSender<Msg>,
    snapshot: watch::Receiver<Snapshot>,
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

struct Inner {
    log: Arc<dyn LogStore>,
    config: Config,
    txs: Mutex<HashMap<String, Handle>>,
    pool: Pool,
    accepting: AtomicBool,
    mutations: Mutations,
}

/// The coordinator runtime: owns live transactions. Cheap to clone.
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
        let pool = Pool::new(config.call_timeout);
        Runtime {
            inner: Arc::new(Inner {
                log,
                config,
                txs: Mutex::new(HashMap::new()),
                pool,
                accepting: AtomicBool::new(true),
                mutations,
            }),
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn log(&self) -> &Arc<dyn LogStore> {
        &self.inner.log
    }

    /// Number of transactions being driven.
    pub fn live(&self) -> usize {
        self.table().len()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
        self.inner.txs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resume every non-terminal transaction in the log. Returns how many.
    pub fn recover(&self) -> Result<usize, LogError> {
        let records = self.inner.log.scan_active()?;
        let n = records.len();
        for rec in records {
            let mut tx = Tx::recover(rec);
            tx.set_mutations(self.inner.mutations);
            self.spawn_driver(tx, Event::Recovered, None);
        }
        Ok(n)
    }

    /// Start a transaction (or find the existing one with this gid) and answer once `Begun`
    /// is durable; with `wait`, once the outcome is final or `wait` has passed.
    pub async fn begin(&self, mut def: NewTx, wait: Option<Duration>) -> Result<Begun, BeginError> {
        if !self.inner.accepting.load(Ordering::Acquire) {
            return Err(BeginError::ShuttingDown);
        }
        // Payloads decoded from a gRPC request are zero-copy slices of tonic's decode buffer
        // (8 KiB or more), so keeping them would pin that whole buffer for the life of the
        // transaction: measured 8 KiB per parked transaction (treaty-bench parked, massif).
        // Copy them into allocations of their own size.
        for b in &mut def.branches {
            b.payload = bytes::Bytes::copy_from_slice(&b.payload);
            b.compensation_payload = bytes::Bytes::copy_from_slice(&b.compensation_payload);
        }
        let gid = def.gid.clone();
        // Check and insert under the table lock so two racing Begins of one gid start one
        // driver. A finished transaction is found in the log (its terminal record is readable
        // before it leaves the table).
        let start = {
            let mut table = self.table();
            if let Some(h) = table.get(&gid) {
                let same = h
                    .snapshot
                    .borrow()
                    .record
                    .same_definition(def.mode, &def.branches);
                Start::Live(h.clone(), same)
            } else if let Some(rec) = self.inner.log.get(&gid)? {
                let same = rec.same_definition(def.mode, &def.branches);
                Start::Stored(rec, same)
            } else {
                let mut tx = Tx::new(def, now_ms());
                tx.set_mutations(self.inner.mutations);
                let (ack_tx, ack_rx) = oneshot::channel();
                let snap = self.spawn_driver_locked(&mut table, tx, Event::Start, Some(ack_tx));
                Start::New(snap, ack_rx)
            }
        };
        let (snapshot, existing) = match start {
            Start::Live(h, same) => {
                if !same {
                    return Err(BeginError::AlreadyExists(gid));
                }
                (h.snapshot, true)
            }
            Start::Stored(rec, same) => {
                if !same {
                    return Err(BeginError::AlreadyExists(gid));
                }
                let outcome = Snapshot::from_log(rec).outcome;
                return Ok(Begun {
                    gid,
                    outcome: if wait.is_some() {
                        outcome
                    } else {
                        Outcome::Pending
                    },
                    existing: true,
                });
            }
            Start::New(snap, ack) => {
                match ack.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => return Err(LogError::Closed.into()),
                }
                (snap, false)
            }
        };
        let outcome = match wait {
            None => Outcome::Pending,
            Some(bound) => wait_outcome(snapshot, bound).await,
        };
        Ok(Begun {
            gid,
            outcome,
            existing,
        })
    }

    /// The current snapshot of `gid`: live, else from the log.
    pub fn get(&self, gid: &str) -> Result<Option<Snapshot>, LogError> {
        if let Some(h) = self.table().get(gid) {
            return Ok(Some(h.snapshot.borrow().clone()));
        }
        Ok(self.inner.log.get(gid)?.map(Snapshot::from_log))
    }

    /// A receiver of every change of a live transaction, or its stored snapshot.
    pub fn watch(&self, gid: &str) -> Result<WatchTarget, LogError> {
        if let Some(h) = self.table().get(gid) {
            return Ok(WatchTarget::Live(h.snapshot.clone()));
        }
        Ok(match self.inner.log.get(gid)? {
            Some(rec) => WatchTarget::Stored(Snapshot::from_log(rec)),
            None => WatchTarget::Unknown,
        })
    }

    /// What a participant in doubt is told. Presumed abort: unknown means aborted.
    pub fn outcome(&self, gid: &str) -> Result<Outcome, LogError> {
        Ok(match self.get(gid)? {
            Some(s) => s.outcome,
            None => Outcome::Aborted,
        })
    }

    /// Send every waiting call of `gid` now. `None` when the gid is not live.
    pub async fn retry(&self, gid: &str) -> Option<u32> {
        let h = self.table().get(gid).cloned()?;
        let (tx, rx) = oneshot::channel();
        h.tx.send(Msg::RetryNow(tx)).ok()?;
        rx.await.ok()
    }

    /// Records matching `filter`, newest gid first, with live state overlaid.
    pub fn list(
        &self,
        filter: &ListFilter,
        before_gid: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Snapshot>, LogError> {
        let records = self.inner.log.list(filter, before_gid, limit)?;
        let table = self.table();
        Ok(records
            .into_iter()
            .map(|rec| match table.get(&rec.gid) {
                Some(h) => h.snapshot.borrow().clone(),
                None => Snapshot::from_log(rec),
            })
            .collect())
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

    fn spawn_driver(
        &self,
        tx: Tx,
        first: Event,
        ack: Option<oneshot::Sender<Result<(), LogError>>>,
    ) -> watch::Receiver<Snapshot> {
        let mut table = self.table();
        self.spawn_driver_locked(&mut table, tx, first, ack)
    }

    fn spawn_driver_locked(
        &self,
        table: &mut HashMap<String, Handle>,
        tx: Tx,
        first: Event,
        ack: Option<oneshot::Sender<Result<(), LogError>>>,
    ) -> watch::Receiver<Snapshot> {
        let (msg_tx, msg_rx) = mpsc::unbounded_channel();
        let (snap_tx, snap_rx) = watch::channel(Snapshot {
            record: tx.record().clone(),
            outcome: tx.decided(),
        });
        table.insert(
            tx.record().gid.clone(),
            Handle {
                tx: msg_tx.clone(),
                snapshot: snap_rx.clone(),
            },
        );
        let driver = Driver {
            rt: self.clone(),
            tx,
            deadline: None,
            me: msg_tx,
            snap: snap_tx,
            ack,
        };
        tokio::spawn(driver.run(first, msg_rx));
        snap_rx
    }
}

enum Start {
    Live(Handle, bool),
    Stored(TxRecord, bool),
    New(
        watch::Receiver<Snapshot>,
        oneshot::Receiver<Result<(), LogError>>,
    ),
}

/// Where `Watch` reads from.
pub enum WatchTarget {
    Live(watch::Receiver<Snapshot>),
    Stored(Snapshot),
    Unknown,
}

async fn wait_outcome(mut snap: watch::Receiver<Snapshot>, bound: Duration) -> Outcome {
    let waited = tokio::time::timeout(bound, async {
        snap.wait_for(|s| s.outcome != Outcome::Pending)
            .await
            .map(|s| s.outcome)
    })
    .await;
    match waited {
        Ok(Ok(outcome)) => outcome,
        // The driver ended (finished: read the last value) or the bound passed.
        _ => snap.borrow().outcome,
    }
}

struct Driver {
    rt: Runtime,
    tx: Tx,
    /// The deadline timer, aborted when the transaction finishes so that finished
    /// transactions leave no sleeping task behind.
    deadline: Option<tokio::task::JoinHandle<()>>,
    me: mpsc::UnboundedSender<Msg>,
    snap: watch::Sender<Snapshot>,
    ack: Option<oneshot::Sender<Result<(), LogError>>>,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(d) = self.deadline.take() {
            d.abort();
        }
    }
}

impl Driver {
    async fn run(mut self, first: Event, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let gid = self.tx.record().gid.clone();
        let mut queue = VecDeque::from([first]);
        loop {
            while let Some(ev) = queue.pop_front() {
                let commands = self.tx.handle(now_ms(), ev);
                if !self.execute(commands, &mut queue).await {
                    self.rt.table().remove(&gid);
                    return;
                }
            }
            self.snap.send_replace(Snapshot {
                record: self.tx.record().clone(),
                outcome: self.tx.decided(),
            });
            if self.tx.is_finished() {
                self.rt.table().remove(&gid);
                return;
            }
            match rx.recv().await {
                Some(Msg::Engine(ev)) => queue.push_back(ev),
                Some(Msg::RetryNow(reply)) => {
                    let commands = self.tx.handle(now_ms(), Event::RetryNow);
                    let n = commands
                        .iter()
                        .filter(|c| matches!(c, Command::Call { .. }))
                        .count() as u32;
                    let _ = reply.send(n);
                    if !self.execute(commands, &mut queue).await {
                        self.rt.table().remove(&gid);
                        return;
                    }
                }
                None => return,
            }
        }
    }

    /// Carry out commands in order. Returns false when the driver must stop (the `Begun`
    /// write failed and the client was told).
    async fn execute(&mut self, commands: Vec<Command>, queue: &mut VecDeque<Event>) -> bool {
        let mut phase_two_calls = 0usize;
        for cmd in commands {
            match cmd {
                Command::Persist { record, forced } => {
                    let seq = record.seq;
                    let phase = record.phase;
                    if phase.is_terminal() {
                        crash_point!("treaty::before_ended");
                    }
                    if !self.persist(record, forced).await {
                        return false;
                    }
                    if forced {
                        queue.push_back(Event::Durable { seq });
                        if let Some(ack) = self.ack.take() {
                            crash_point!("treaty::after_begun_durable");
                            let _ = ack.send(Ok(()));
                        } else if matches!(phase, Phase::Committing | Phase::Compensating) {
                            crash_point!("treaty::after_decision_durable");
                        }
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
                    self.spawn_call(branch, op, attempt);
                }
                Command::ScheduleRetry {
                    branch,
                    op,
                    attempt,
                    backoff_bound_ms,
                } => {
                    // Full jitter: uniform in [0, bound].
                    let delay = rand::thread_rng().gen_range(0..=backoff_bound_ms);
                    let me = self.me.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let _ = me.send(Msg::Engine(Event::RetryDue {
                            branch,
                            op,
                            attempt,
                        }));
                    });
                }
                Command::SetDeadline { at_unix_ms } => {
                    let me = self.me.clone();
                    let delay = at_unix_ms.saturating_sub(now_ms());
                    if let Some(old) = self.deadline.take() {
                        old.abort();
                    }
                    self.deadline = Some(tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let _ = me.send(Msg::Engine(Event::DeadlinePassed));
                    }));
                }
                Command::Decided(outcome) => {
                    self.snap.send_modify(|s| s.outcome = outcome);
                }
                Command::Finished => {}
            }
        }
        true
    }

    /// Write a record; retry failures forever with capped backoff, except the very first
    /// `Begun` write, whose failure is the client's answer.
    async fn persist(&mut self, record: TxRecord, forced: bool) -> bool {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.rt.inner.log.put(record.clone(), forced).await {
                Ok(()) => return true,
                Err(e) => {
                    if let Some(ack) = self.ack.take() {
                        tracing::error!(gid = %record.gid, error = %e, "cannot record Begun");
                        let _ = ack.send(Err(e));
                        return false;
                    }
                    tracing::error!(gid = %record.gid, error = %e, "log write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn spawn_call(&self, branch: u32, op: Op, attempt: u32) {
        let rec = self.tx.record();
        let b = &rec.branches[branch as usize];
        let payload = if op == Op::Compensate {
            b.def.compensation_payload.clone()
        } else {
            b.def.payload.clone()
        };
        let req = BranchRequest {
            gid: rec.gid.clone(),
            branch_id: branch,
            handler: b.def.handler.clone(),
            payload,
            attempt,
            deadline_unix_ms: if op.is_phase_two() {
                0
            } else {
                rec.deadline_unix_ms
            },
        };
        let endpoint = b.def.endpoint.clone();
        let me = self.me.clone();
        let rt = self.rt.clone();
        tokio::spawn(async move {
            let reply = rt.inner.pool.call(&endpoint, op, req).await;
            if matches!(op, Op::Prepare | Op::Execute) {
                crash_point!("treaty::after_some_phase_one_replies");
            }
            let _ = me.send(Msg::Engine(Event::Reply {
                branch,
                op,
                attempt,
                reply,
            }));
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
