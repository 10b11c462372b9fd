//! The runtime: carries out the engine's commands with real sockets, files and time.
//!
//! Live transactions are spread over a fixed number of **shards** by a hash of their gid.
//! Each shard is one tokio task that owns its transactions' [`Tx`] state machines, one timer
//! queue (backoffs and deadlines) and one bounded inbox; it feeds events to the engine and
//! executes the commands: log writes (forced ones report back as [`Event::Durable`] when the
//! log says they are on stable storage), participant calls (spawned; their answers come back
//! through the inbox), timers, and answers to clients waiting for an outcome. A parked
//! transaction therefore costs its state and a timer entry, not a task and channels of its own.
//!
//! Invariants kept here:
//! - **Nothing is told from a record whose forced write has not completed.** A live
//!   transaction is shown through `Snapshot::of`, which hides a transaction whose `Begun`
//!   is not durable and shows the phase from before a pending forced write; a transaction
//!   leaves its shard (and is then read from the log) only once all its forced writes are
//!   durable.
//! - **Fail-stop on the log.** A log write that fails (a forced write that could not be made
//!   durable, or any write the log refused) stops the runtime at once: every shard stops,
//!   every call answers [`LogError::Stopped`], and [`Runtime::failed`] resolves so the server
//!   exits; the next start recovers from what is on disk, after one sync.
//! - **A dead shard stops the process too**: each shard runs under a supervisor that turns a
//!   panic into the same fail-stop, so no shard is ever silently gone.
//! - Writes of one transaction reach the log in the order the engine issued them (`put`
//!   applies a write before it returns; see [`LogStore::put`]).
//! - **A shard never blocks on the log, and handles one gid's messages in arrival order.**
//!   The log is async; `Begin` of a gid that is not live must read it (a finished
//!   transaction or its tombstone). When that read is not answered at once, the shard parks
//!   the `Begin`, goes on with other gids, and queues every later message and timer of that
//!   gid until the answer comes back; then it decides the `Begin` and replays the queue in
//!   order, as if the read had been instant.
//! - Everything is bounded: live transactions and their bytes (`Begin` answers
//!   [`BeginError::Overloaded`]), shard inboxes, waiters and watchers per transaction, timer
//!   delays (clamped and re-armed, so no deadline can overflow the timer wheel).

pub mod participants;
pub mod request;

pub use request::{BeginRequest, RetryOverrides, Wait};

use crate::config::Config;
#[cfg(feature = "mutations")]
use crate::engine::Mutations;
use crate::engine::{
    answer_outcome, decide_begin, is_finished, BeginDecision, BranchDef, Command, Event, Known, Op,
    Outcome, Phase, Tombstone, Tx, TxRecord,
};
use crate::log::{ListFilter, LogError, LogFuture, LogStore};
use crate::mapping;
use crate::metrics::{CallResult, Metrics};
use crate::otel;
use futures::{FutureExt, StreamExt};
use participants::Pool;
use rand::Rng;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::time::{delay_queue, DelayQueue};

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The longest delay one timer entry is armed for. tokio-util's `DelayQueue` panics on a
/// delay above about 2^36 ms (2.18 years); a deadline further away (or a wall clock far
/// behind the one that set it) is reached by re-arming, one day at a time.
pub const TIMER_DELAY_MAX: Duration = Duration::from_secs(24 * 3600);

/// What a deadline timer does at wall time `now_ms`: the deadline is due, or the timer must
/// wait (again) this long. A timer fires early when the deadline is more than
/// [`TIMER_DELAY_MAX`] away or the wall clock was set back; it is then re-armed, so the
/// deadline is acted on exactly when the wall clock reaches it. Pure: the simulation uses it.
pub fn deadline_step(now_ms: u64, due_unix_ms: u64) -> Option<Duration> {
    (now_ms < due_unix_ms).then(|| Duration::from_millis(due_unix_ms - now_ms).min(TIMER_DELAY_MAX))
}

/// Messages a shard's inbox holds at most. A full inbox answers `Begin` with
/// [`BeginError::Overloaded`]; internal messages (answers, completed writes) wait for room.
pub const SHARD_INBOX_CAPACITY: usize = 16_384;

/// Clients waiting on one transaction's outcome (`Begin` with `wait`) at most; beyond it a
/// waiter is answered `Pending` at once (the answer a wait that runs out gets anyway).
pub const WAITERS_PER_TX_MAX: usize = 1_024;

/// `Watch` streams of one transaction at most; beyond it `Watch` is refused as overloaded.
pub const WATCHERS_PER_TX_MAX: usize = 1_024;

/// Client messages of one gid held at most while its `Begin` waits for the log; beyond it
/// each is answered at once as if the gid were not told yet (a `Begin` as overloaded).
pub const ADMISSION_QUEUE_MAX: usize = 1_024;

/// Records recovery reads from the log at a time.
const RECOVERY_PAGE: usize = 1_024;

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
    /// A snapshot of a record read from the log (no shard drives it). Every forced write of
    /// a record in the log has completed (see the module invariants), so its phase can be
    /// told.
    pub fn from_log(record: TxRecord) -> Snapshot {
        let (outcome, _) = answer_outcome(Known::Record(&record));
        Snapshot { record, outcome }
    }

    /// What may be told of a live transaction: `None` until its `Begun` is durable, and the
    /// phase from before a forced write still in flight (the write may never reach the disk).
    fn of(tx: &Tx) -> Option<Snapshot> {
        if !tx.begun_durable() {
            return None;
        }
        let mut record = tx.record().clone();
        record.phase = tx.visible_phase();
        Some(Snapshot {
            record,
            outcome: tx.decided(),
        })
    }
}

/// The pace of polling the log for a transaction another coordinator drives: soon at first
/// (most phases take milliseconds), then backing off to [`FOLLOW_POLL_MAX`].
struct FollowPoll(Duration);

/// The longest pause between two reads of a transaction another coordinator drives.
pub const FOLLOW_POLL_MAX: Duration = Duration::from_millis(500);

impl FollowPoll {
    fn new() -> FollowPoll {
        FollowPoll(Duration::from_millis(5))
    }

    /// Waits the current pause (at most `left`), then lengthens the next one.
    async fn wait(&mut self, left: Duration) {
        tokio::time::sleep(self.0.min(left)).await;
        self.0 = (self.0 * 2).min(FOLLOW_POLL_MAX);
    }
}

/// Why `begin` did not start a transaction.
#[derive(Debug, thiserror::Error)]
pub enum BeginError {
    #[error("a transaction with gid {0:?} already exists with a different definition; look it up (Get/Watch) rather than resubmitting it")]
    AlreadyExists(String),
    #[error("the coordinator is shutting down and takes no new transactions")]
    ShuttingDown,
    #[error("the coordinator is at capacity: {0}; retry later")]
    Overloaded(String),
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
    /// With `outcome` aborted: why ([`TxRecord::reason`]).
    pub reason: Option<String>,
}

/// What `outcome` answers a participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutcomeAnswer {
    pub outcome: Outcome,
    /// False when this log has no record of the gid (the outcome is then presumed abort).
    pub known: bool,
    /// The transaction is terminal, durably, or a tombstone: nothing more is sent for it
    /// (see [`crate::engine::is_finished`]).
    pub finished: bool,
}

/// Why `resolve` did not resolve a branch.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no live transaction with gid {0:?} (finished or unknown): nothing to resolve")]
    NotLive(String),
    #[error("cannot resolve: {0}")]
    Refused(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Where `Watch` reads from.
pub enum WatchTarget {
    Live(watch::Receiver<Snapshot>),
    Stored(Snapshot),
    Unknown,
}

/// What a shard knows of a gid.
enum Lookup {
    /// Not driven by this shard.
    NotLive,
    /// Live, but its `Begun` is not durable yet: it may not be told to exist.
    Hidden,
    Live(Snapshot),
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
    Begin(PendingBegin),
    /// The log's answer to the admission read of a parked `Begin` (see [`Shard::on_begin`]).
    Admitted {
        begin: PendingBegin,
        /// Boxed: a record is the largest thing a message carries, and rare here.
        found: Box<Result<Found, LogError>>,
    },
    /// Resume a transaction read from the log.
    Recover(Box<Tx>),
    Get(oneshot::Sender<Lookup>),
    Watch(oneshot::Sender<Result<Option<watch::Receiver<Snapshot>>, BeginError>>),
    /// Answer with the outcome once decided (or `Pending` if the gid is not live).
    WaitOutcome(oneshot::Sender<Outcome>),
    RetryNow(oneshot::Sender<Option<u32>>),
    Resolve {
        branch: u32,
        operator: String,
        reason: String,
        reply: oneshot::Sender<Result<Snapshot, ResolveError>>,
    },
}

/// A `Begin` as the shard receives it.
struct PendingBegin {
    tx: Box<Tx>,
    /// Live-byte budget this transaction holds (released when it leaves).
    bytes: usize,
    /// Set when the runtime is at capacity: answer an existing gid, start nothing new.
    refuse_new: Option<String>,
    reply: oneshot::Sender<Result<Started, BeginError>>,
}

/// What the log knows of a gid that is not live: its record, else its tombstone.
type Found = (Option<TxRecord>, Option<Tombstone>);

/// A message or timer of a gid whose `Begin` waits for the log, kept to be handled after it.
enum Deferred {
    Msg(Msg),
    Timer(Timer),
}

/// What a shard answers to `Begin`.
enum Started {
    /// A new transaction; `Begun` is durable.
    New,
    /// The gid is live (or in the log) with the same definition; `Begun` is durable.
    Existing,
    /// The gid finished long ago with this outcome (its tombstone matched).
    Finished(Outcome),
}

struct Entry {
    tx: Tx,
    deadline: Option<delay_queue::Key>,
    /// `Begin` calls waiting for `Begun` to be durable, with what each is to be told.
    begun: Vec<(oneshot::Sender<Result<Started, BeginError>>, Started)>,
    /// Clients waiting for the outcome.
    waiters: Vec<oneshot::Sender<Outcome>>,
    /// Created on the first `Watch`.
    watch: Option<watch::Sender<Snapshot>>,
    /// Operator resolutions waiting for their forced record: answered once `seq` is durable.
    resolved: Vec<(u64, oneshot::Sender<Result<Snapshot, ResolveError>>)>,
    /// Live-byte budget held.
    bytes: usize,
    /// The engine finished it; it leaves once its forced writes are durable.
    finishing: bool,
    /// The stuck flag as last seen, to log the moment a transaction becomes stuck.
    was_stuck: bool,
    /// The transaction's trace span (`Span::none()` unless `Config::traces`), parent of its
    /// branch-call spans; it ends when the transaction leaves the shard.
    span: tracing::Span,
}

/// A timer: the event to deliver, and for a deadline the time it is really due (a timer is
/// armed for at most [`TIMER_DELAY_MAX`] and re-armed until then).
struct Timer {
    gid: String,
    event: Event,
    due_unix_ms: Option<u64>,
}

/// The fail-stop latch, shared by the runtime, its shards and their supervisors.
struct Fatal {
    reason: watch::Sender<Option<String>>,
}

impl Fatal {
    fn stop(&self, why: String) {
        self.reason.send_if_modified(|r| {
            if r.is_some() {
                return false;
            }
            tracing::error!(reason = %why, "fail-stop: the coordinator stops serving; restart it to recover from the log on disk");
            *r = Some(why);
            true
        });
    }

    fn check(&self) -> Result<(), LogError> {
        match &*self.reason.borrow() {
            Some(why) => Err(LogError::Stopped(why.clone())),
            None => Ok(()),
        }
    }

    fn is_stopped(&self) -> bool {
        self.reason.borrow().is_some()
    }
}

struct Inner {
    log: Arc<dyn LogStore>,
    config: Config,
    pool: Pool,
    shards: Vec<mpsc::Sender<(String, Box<Msg>)>>,
    live: AtomicUsize,
    live_bytes: AtomicUsize,
    accepting: AtomicBool,
    #[cfg(feature = "mutations")]
    mutations: Mutations,
    fatal: Arc<Fatal>,
    metrics: Arc<Metrics>,
}

impl Inner {
    /// Whether the deliberate `ignore_tombstones` bug is on (never, without `mutations`).
    fn ignores_tombstones(&self) -> bool {
        #[cfg(feature = "mutations")]
        let on = self.mutations.ignore_tombstones;
        #[cfg(not(feature = "mutations"))]
        let on = false;
        on
    }

    /// A transaction's engine, with this runtime's deliberate bugs (if any) switched on.
    fn engine(&self, tx: Tx) -> Tx {
        #[cfg(feature = "mutations")]
        let tx = {
            let mut tx = tx;
            tx.set_mutations(self.mutations);
            tx
        };
        tx
    }
}

/// The coordinator runtime: owns live transactions. Cheap to clone. Must be created inside a
/// tokio runtime (it spawns its shards).
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl Runtime {
    pub fn new(log: Arc<dyn LogStore>, config: Config) -> Runtime {
        Runtime::build(
            log,
            config,
            #[cfg(feature = "mutations")]
            Mutations::default(),
        )
    }

    /// A runtime whose engines carry deliberate bugs (checker tests only; feature `mutations`).
    #[cfg(feature = "mutations")]
    pub fn with_mutations(log: Arc<dyn LogStore>, config: Config, mutations: Mutations) -> Runtime {
        Runtime::build(log, config, mutations)
    }

    fn build(
        log: Arc<dyn LogStore>,
        config: Config,
        #[cfg(feature = "mutations")] mutations: Mutations,
    ) -> Runtime {
        // A few shards per core: enough to use every core, few enough to batch well.
        let n = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        let mut receivers = Vec::with_capacity(n);
        let mut senders = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::channel(SHARD_INBOX_CAPACITY);
            senders.push(tx);
            receivers.push(rx);
        }
        // `server::run` has read these files once already and refused to start on an error.
        let pool = Pool::new(config.call_timeout, config.security.outbound());
        let fatal = Arc::new(Fatal {
            reason: watch::channel(None).0,
        });
        let metrics = Arc::new(Metrics::new());
        log.observe_flushes(Arc::clone(&metrics) as _);
        let inner = Arc::new(Inner {
            log,
            config,
            pool,
            shards: senders,
            live: AtomicUsize::new(0),
            live_bytes: AtomicUsize::new(0),
            accepting: AtomicBool::new(true),
            #[cfg(feature = "mutations")]
            mutations,
            fatal: Arc::clone(&fatal),
            metrics,
        });
        for (i, rx) in receivers.into_iter().enumerate() {
            let shard = Shard {
                rt: Arc::downgrade(&inner),
                me: inner.shards[i].downgrade(),
                txs: HashMap::new(),
                timers: DelayQueue::new(),
                admitting: HashMap::new(),
            };
            // The supervisor: a shard that panics takes the whole runtime down with it
            // (fail-stop), never leaving its transactions silently frozen.
            let task = tokio::spawn(shard.run(rx));
            let fatal = Arc::clone(&fatal);
            tokio::spawn(async move {
                if let Err(e) = task.await {
                    if e.is_panic() {
                        let what = e
                            .into_panic()
                            .downcast::<String>()
                            .map(|s| *s)
                            .or_else(|p| p.downcast::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|_| "a panic".to_string());
                        fatal.stop(format!("shard {i} panicked: {what}"));
                    }
                }
            });
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

    /// This runtime's metrics (see [`crate::metrics`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Set the gauges read from the runtime's own state (live transactions, inbox depths):
    /// done when scraped, so they cost the hot path nothing.
    pub fn refresh_metrics(&self) {
        let m = &self.inner.metrics;
        m.set_live(self.live());
        for (i, s) in self.inner.shards.iter().enumerate() {
            m.set_inbox(i, s.max_capacity() - s.capacity());
        }
    }

    /// Whether the runtime takes new transactions: not failed, not shutting down.
    pub fn is_serving(&self) -> bool {
        self.inner.accepting.load(Ordering::Acquire) && !self.is_failed()
    }

    /// Resolves with the reason once the runtime has failed and stopped (fail-stop): a log
    /// write failed or a shard died. The process must then exit and restart.
    pub async fn failed(&self) -> String {
        let mut rx = self.inner.fatal.reason.subscribe();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                // Unreachable while `self` holds the sender; never resolve then.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops the runtime as a failed log write would (fail-stop), for a failure seen from
    /// outside, e.g. a log that no longer answers (`server.rs` probes a PostgreSQL log).
    pub fn fail_stop(&self, why: String) {
        self.inner.fatal.stop(why);
    }

    /// Whether the runtime has failed and stopped.
    pub fn is_failed(&self) -> bool {
        self.inner.fatal.is_stopped()
    }

    fn shard_of(&self, gid: &str) -> &mpsc::Sender<(String, Box<Msg>)> {
        let mut h = DefaultHasher::new();
        gid.hash(&mut h);
        &self.inner.shards[(h.finish() as usize) % self.inner.shards.len()]
    }

    /// Sends to `gid`'s shard, waiting for room in its inbox. False if the shard is gone.
    async fn send(&self, gid: &str, msg: Msg) -> bool {
        self.shard_of(gid)
            .send((gid.to_string(), Box::new(msg)))
            .await
            .is_ok()
    }

    /// Resume every non-terminal transaction in the log, reading it page by page (a shard's
    /// inbox full of recovered transactions makes recovery wait). Returns how many.
    ///
    /// On a log several coordinators share ([`LogStore::is_shared`]), only the transactions
    /// nobody else owns: it claims them page by page. Called again and again while serving
    /// ([`Runtime::take_over`]), that is how the transactions of a coordinator whose lease
    /// ran out are finished by another.
    pub async fn recover(&self) -> Result<usize, LogError> {
        if self.inner.log.is_shared() {
            return self.take_over().await;
        }
        let mut after: Option<String> = None;
        let mut n = 0;
        loop {
            self.inner.fatal.check()?;
            let page = self
                .inner
                .log
                .scan_active(after.as_deref(), RECOVERY_PAGE)
                .await?;
            let Some(last) = page.last() else {
                return Ok(n);
            };
            after = Some(last.gid.clone());
            let full = page.len() == RECOVERY_PAGE;
            n += self.resume(page).await;
            if !full {
                return Ok(n);
            }
        }
    }

    /// Claim (see [`LogStore::claim`]) every transaction of the shared log whose owner is
    /// gone, and drive each as recovery would. Returns how many.
    pub async fn take_over(&self) -> Result<usize, LogError> {
        let mut n = 0;
        loop {
            self.inner.fatal.check()?;
            let page = self.inner.log.claim(RECOVERY_PAGE).await?;
            self.inner.fatal.check()?;
            let full = page.len() == RECOVERY_PAGE;
            n += self.resume(page).await;
            if !full {
                if n > 0 {
                    self.inner.metrics.taken_over(n);
                }
                return Ok(n);
            }
        }
    }

    /// Hands each recovered (or claimed) record to its shard, to be driven from where the log
    /// says it stopped. Returns how many.
    async fn resume(&self, page: Vec<TxRecord>) -> usize {
        let n = page.len();
        for rec in page {
            let gid = rec.gid.clone();
            let tx = self.inner.engine(Tx::recover(rec));
            self.send(&gid, Msg::Recover(Box::new(tx))).await;
        }
        n
    }

    /// Start a transaction (or find the existing one with this gid) and answer once `Begun`
    /// is durable; with a wait, once the outcome is final or the wait has passed. What the
    /// request leaves unset takes this runtime's [`Config`] defaults
    /// ([`BeginRequest::with_defaults`]).
    pub async fn begin(&self, req: BeginRequest) -> Result<Begun, BeginError> {
        self.inner.fatal.check()?;
        let (mut def, wait) = req.with_defaults(&self.inner.config, now_ms());
        if !self.inner.accepting.load(Ordering::Acquire) {
            return Err(BeginError::ShuttingDown);
        }
        // Zero-copy payloads would keep tonic's whole decode buffer alive for as long as the
        // transaction: measured 8 KiB per parked transaction (treaty-bench parked, massif).
        // Copy them into allocations of their own size.
        let mut bytes = 0;
        for b in &mut def.branches {
            b.payload = bytes::Bytes::copy_from_slice(&b.payload);
            b.compensation_payload = bytes::Bytes::copy_from_slice(&b.compensation_payload);
            bytes +=
                b.payload.len() + b.compensation_payload.len() + b.endpoint.len() + b.handler.len();
        }
        // At capacity, a resubmission of an existing gid is still answered (it is how a
        // client learns an outcome it lost); only new work is refused.
        let refuse_new = self.admit(bytes).err();
        let bytes = if refuse_new.is_some() { 0 } else { bytes };
        let gid = def.gid.clone();
        let tx = self.inner.engine(Tx::new(def, now_ms()));
        let (reply, answer) = oneshot::channel();
        let msg = Msg::Begin(PendingBegin {
            tx: Box::new(tx),
            bytes,
            refuse_new,
            reply,
        });
        // A full inbox is overload: refuse rather than queue without bound.
        if let Err(e) = self.shard_of(&gid).try_send((gid.clone(), Box::new(msg))) {
            self.release(bytes);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => BeginError::Overloaded(format!(
                    "a shard inbox holds {SHARD_INBOX_CAPACITY} messages"
                )),
                mpsc::error::TrySendError::Closed(_) => BeginError::ShuttingDown,
            });
        }
        let started = match answer.await {
            Ok(r) => r,
            Err(_) => Err(self.stopped_or(LogError::Closed).into()),
        }?;
        self.inner.fatal.check()?;
        let (existing, outcome) = match started {
            Started::Finished(o) => (true, o),
            Started::New | Started::Existing => {
                let existing = matches!(started, Started::Existing);
                match wait {
                    None => (existing, Outcome::Pending),
                    Some(bound) => (existing, self.wait_outcome(&gid, bound).await?),
                }
            }
        };
        // Read once more only for an abort, which is rare and which a client wants
        // explained; the record keeps its reason once set, so any later copy tells it.
        let reason = if outcome == Outcome::Aborted {
            self.get(&gid).await?.and_then(|s| s.record.reason)
        } else {
            None
        };
        Ok(Begun {
            gid,
            outcome,
            existing,
            reason,
        })
    }

    /// Takes `bytes` of the live budget and one live slot, or says why not. The shard gives
    /// them back when the transaction leaves (or at once when `Begin` starts nothing).
    fn admit(&self, bytes: usize) -> Result<(), String> {
        let max_live = self.inner.config.max_live_transactions;
        let max_bytes = self.inner.config.max_live_bytes;
        let live = self.inner.live.load(Ordering::Acquire);
        if live >= max_live {
            return Err(format!(
                "{live} live transactions (max-live-transactions is {max_live})"
            ));
        }
        let held = self.inner.live_bytes.fetch_add(bytes, Ordering::AcqRel);
        if held + bytes > max_bytes {
            self.inner.live_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(format!(
                "live transactions hold {held} bytes of definitions (max-live-bytes is {max_bytes})"
            ));
        }
        Ok(())
    }

    fn release(&self, bytes: usize) {
        self.inner.live_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// `err`, unless the runtime has failed: then the fail-stop error, which explains more.
    fn stopped_or(&self, err: LogError) -> LogError {
        match self.inner.fatal.check() {
            Err(stopped) => stopped,
            Ok(()) => err,
        }
    }

    /// The outcome once final, waiting up to `bound`; from the log when the gid is not live
    /// here (finished meanwhile, or driven by another coordinator of a shared log, whose
    /// progress only the log shows).
    async fn wait_outcome(&self, gid: &str, bound: Duration) -> Result<Outcome, LogError> {
        let start = tokio::time::Instant::now();
        let (tx, rx) = oneshot::channel();
        if self.send(gid, Msg::WaitOutcome(tx)).await {
            match tokio::time::timeout(bound, rx).await {
                Ok(Ok(Outcome::Pending)) | Ok(Err(_)) => {}
                Ok(Ok(o)) => return Ok(o),
                Err(_) => return Ok(Outcome::Pending),
            }
        }
        let mut poll = FollowPoll::new();
        loop {
            let outcome = self.get(gid).await?.map_or(Outcome::Pending, |s| s.outcome);
            let left = bound.saturating_sub(start.elapsed());
            if outcome != Outcome::Pending || left.is_zero() {
                return Ok(outcome);
            }
            poll.wait(left).await;
        }
    }

    /// The snapshot of `gid` once it differs from the one with `seen_seq`, polling the log
    /// (for a transaction this coordinator does not drive: another coordinator of a shared
    /// log does, and only the log shows its progress). `None` when the gid is gone (collected
    /// by retention); gives up with the last snapshot read past `bound`.
    pub async fn next_change(
        &self,
        gid: &str,
        seen_seq: u64,
        bound: Duration,
    ) -> Result<Option<Snapshot>, LogError> {
        let start = tokio::time::Instant::now();
        let mut poll = FollowPoll::new();
        loop {
            let snap = self.get(gid).await?;
            let left = bound.saturating_sub(start.elapsed());
            match snap {
                Some(s) if s.record.seq == seen_seq && !left.is_zero() => poll.wait(left).await,
                other => return Ok(other),
            }
        }
    }

    async fn ask<T>(&self, gid: &str, msg: impl FnOnce(oneshot::Sender<T>) -> Msg) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        if !self.send(gid, msg(tx)).await {
            return None;
        }
        rx.await.ok()
    }

    /// Awaits a read of the log, then checks the runtime still stands: a record read after
    /// a failure may be one whose forced write failed, and is never told.
    async fn read_log<T>(&self, read: LogFuture<T>) -> Result<T, LogError> {
        let out = read.await?;
        self.inner.fatal.check()?;
        Ok(out)
    }

    /// The current snapshot of `gid`: live, else from the log.
    pub async fn get(&self, gid: &str) -> Result<Option<Snapshot>, LogError> {
        self.inner.fatal.check()?;
        match self.ask(gid, Msg::Get).await {
            Some(Lookup::Live(s)) => return Ok(Some(s)),
            Some(Lookup::Hidden) => return Ok(None),
            Some(Lookup::NotLive) => {}
            None => return Err(self.stopped_or(LogError::Closed)),
        }
        Ok(self
            .read_log(self.inner.log.get(gid))
            .await?
            .map(Snapshot::from_log))
    }

    /// A receiver of every change of a live transaction, or its stored snapshot.
    pub async fn watch(&self, gid: &str) -> Result<WatchTarget, BeginError> {
        self.inner.fatal.check()?;
        match self.ask(gid, Msg::Watch).await {
            Some(Ok(Some(rx))) => return Ok(WatchTarget::Live(rx)),
            Some(Err(e)) => return Err(e),
            Some(Ok(None)) => {}
            None => return Err(self.stopped_or(LogError::Closed).into()),
        }
        Ok(match self.get(gid).await? {
            Some(s) => WatchTarget::Stored(s),
            None => WatchTarget::Unknown,
        })
    }

    /// What a participant in doubt is told: the outcome if this log knows the gid (live, in
    /// the log, or as a tombstone), else `Aborted` with `known: false` (presumed abort, which
    /// the participant applies only when this log drove its branch).
    pub async fn outcome(&self, gid: &str) -> Result<OutcomeAnswer, LogError> {
        self.inner.fatal.check()?;
        match self.ask(gid, Msg::Get).await {
            Some(Lookup::Live(s)) => {
                // Still in its shard: its last write may be in flight. Not finished yet; a
                // participant asks again later.
                return Ok(OutcomeAnswer {
                    outcome: s.outcome,
                    known: true,
                    finished: false,
                });
            }
            // Its branches have not been called yet: nothing to be in doubt about.
            Some(Lookup::Hidden) => {
                return Ok(OutcomeAnswer {
                    outcome: Outcome::Pending,
                    known: true,
                    finished: false,
                })
            }
            Some(Lookup::NotLive) => {}
            None => return Err(self.stopped_or(LogError::Closed)),
        }
        let (rec, tomb) = self
            .read_log(read_found(Arc::clone(&self.inner.log), gid))
            .await?;
        let known = match (&rec, &tomb) {
            (Some(rec), _) => Known::Record(rec),
            (None, Some(t)) => Known::Tombstone(t),
            (None, None) => Known::Nothing,
        };
        let finished = is_finished(known);
        let (outcome, known) = answer_outcome(known);
        if finished {
            // A participant deletes its barrier rows on this answer. A terminal record may
            // have been written unforced: were it lost in a crash, recovery would resume
            // from an earlier record and send to branches again. So it is told only once it
            // is on stable storage (a sync shares the group commit).
            if let Err(e) = self.inner.log.sync().await {
                self.inner.fatal.stop(format!(
                    "syncing the log before telling that {gid:?} is finished failed: {e}"
                ));
                return Err(self.stopped_or(e));
            }
            self.inner.fatal.check()?;
        }
        Ok(OutcomeAnswer {
            outcome,
            known,
            finished,
        })
    }

    /// Send every waiting call of `gid` now. `None` when the gid is not live.
    pub async fn retry(&self, gid: &str) -> Result<Option<u32>, LogError> {
        self.inner.fatal.check()?;
        Ok(self.ask(gid, Msg::RetryNow).await.flatten())
    }

    /// An operator resolves `branch` of `gid` by hand (see [`Tx::resolve`]). Answers once the
    /// audit record is durable, with the transaction as it is then.
    pub async fn resolve(
        &self,
        gid: &str,
        branch: u32,
        operator: &str,
        reason: &str,
    ) -> Result<Snapshot, ResolveError> {
        self.inner.fatal.check()?;
        let operator = operator.to_string();
        let reason = reason.to_string();
        match self
            .ask(gid, |reply| Msg::Resolve {
                branch,
                operator,
                reason,
                reply,
            })
            .await
        {
            Some(r) => r,
            None => Err(self.stopped_or(LogError::Closed).into()),
        }
    }

    /// Records matching `filter`, newest gid first, with live state overlaid, and the cursor
    /// of the next page (`None` at the end).
    pub async fn list(
        &self,
        filter: &ListFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Snapshot>, Option<String>), LogError> {
        self.inner.fatal.check()?;
        let page = self
            .read_log(self.inner.log.list(filter, cursor, limit))
            .await?;
        let overlaid = page.records.into_iter().map(|rec| async move {
            if rec.phase.is_terminal() {
                return Some(Snapshot::from_log(rec));
            }
            match self.ask(&rec.gid, Msg::Get).await {
                Some(Lookup::Live(s)) => Some(s),
                Some(Lookup::Hidden) => None,
                _ => Some(Snapshot::from_log(rec)),
            }
        });
        let snaps: Vec<Snapshot> = futures::future::join_all(overlaid)
            .await
            .into_iter()
            .flatten()
            // The live state may no longer match (it moved on since the log was read).
            .filter(|s| filter.matches(&s.record))
            .collect();
        self.inner.fatal.check()?;
        Ok((snaps, page.next_cursor))
    }

    /// Stop taking new transactions; wait up to `grace` for live ones to finish; make the
    /// log durable. Unfinished transactions are resumed by the next start.
    pub async fn shutdown(&self, grace: Duration) -> Result<(), LogError> {
        self.inner.accepting.store(false, Ordering::Release);
        let deadline = tokio::time::Instant::now() + grace;
        while self.live() > 0 && tokio::time::Instant::now() < deadline && !self.is_failed() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.inner.fatal.check()?;
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

    /// Replace finished transactions older than the retention period by tombstones, and
    /// delete tombstones older than their horizon, in bounded batches; drop participant
    /// channels idle for [`participants::POOL_IDLE_MAX`].
    pub async fn collect_garbage(&self) -> Result<(usize, usize), LogError> {
        self.inner.fatal.check()?;
        self.inner
            .pool
            .evict_idle(std::time::Instant::now(), participants::POOL_IDLE_MAX);
        let now = now_ms();
        let cutoff = now.saturating_sub(self.inner.config.retention.as_millis() as u64);
        let tomb_cutoff =
            now.saturating_sub(self.inner.config.tombstone_retention.as_millis() as u64);
        let (mut records, mut tombs) = (0, 0);
        loop {
            let n = self.inner.log.collect_ended(cutoff, now, 10_000).await?;
            records += n;
            if n < 10_000 {
                break;
            }
        }
        loop {
            let n = self
                .inner
                .log
                .collect_tombstones(tomb_cutoff, 10_000)
                .await?;
            tombs += n;
            if n < 10_000 {
                break;
            }
        }
        Ok((records, tombs))
    }
}

/// One shard: the transactions whose gid hashes here, their timers, and an inbox.
struct Shard {
    /// Weak, so that dropping the last `Runtime` ends the shards.
    rt: std::sync::Weak<Inner>,
    /// Weak too: the shard's inbox closes, and the shard ends, once the runtime is gone and
    /// no call or write is still in flight.
    me: mpsc::WeakSender<(String, Box<Msg>)>,
    txs: HashMap<String, Entry>,
    timers: DelayQueue<Timer>,
    /// Gids whose `Begin` waits for the log's answer, with what arrived for them since, in
    /// arrival order (see the module invariants).
    admitting: HashMap<String, VecDeque<Deferred>>,
}

impl Shard {
    async fn run(mut self, mut inbox: mpsc::Receiver<(String, Box<Msg>)>) {
        let Some(mut fatal) = self.rt.upgrade().map(|rt| rt.fatal.reason.subscribe()) else {
            return;
        };
        loop {
            tokio::select! {
                // Fail-stop at once: waiting clients must hear it now, not at the next event.
                _ = fatal.changed() => {
                    if let Some(rt) = self.rt.upgrade() {
                        self.stop(&rt);
                    }
                    return;
                }
                msg = inbox.recv() => match msg {
                    Some((gid, msg)) => {
                        let Some(rt) = self.rt.upgrade() else { return };
                        if rt.fatal.is_stopped() {
                            return self.stop(&rt);
                        }
                        fail::fail_point!("treaty::shard_panic", |_| {
                            panic!("failpoint treaty::shard_panic fired");
                        });
                        self.dispatch(&rt, gid, *msg);
                    }
                    None => return,
                },
                Some(expired) = self.timers.next(), if !self.timers.is_empty() => {
                    let Some(rt) = self.rt.upgrade() else { return };
                    if rt.fatal.is_stopped() {
                        return self.stop(&rt);
                    }
                    self.dispatch_timer(&rt, expired.into_inner());
                }
            }
        }
    }

    /// Fail-stop: drop every transaction without acting on it. Waiting clients are told the
    /// runtime stopped (their channels close); the log on disk is the truth from now on.
    fn stop(&mut self, rt: &Inner) {
        for (_, e) in self.txs.drain() {
            for (reply, _) in e.begun {
                let why = rt.fatal.check().err().unwrap_or(LogError::Closed);
                let _ = reply.send(Err(BeginError::Log(why)));
            }
        }
    }

    /// Handles `msg` now, or after the admission read of its gid if one is in flight.
    fn dispatch(&mut self, rt: &Inner, gid: String, msg: Msg) {
        if let Msg::Admitted { begin, found } = msg {
            return self.on_admitted(rt, gid, begin, *found);
        }
        let Some(queue) = self.admitting.get_mut(&gid) else {
            return self.on_msg(rt, gid, msg);
        };
        // The runtime's own messages always wait; a client's wait while there is room.
        let internal = matches!(msg, Msg::Engine(_) | Msg::Written { .. } | Msg::Recover(_));
        if internal || queue.len() < ADMISSION_QUEUE_MAX {
            queue.push_back(Deferred::Msg(msg));
            return;
        }
        let overloaded =
            || format!("{ADMISSION_QUEUE_MAX} calls of gid {gid:?} wait for its Begin already");
        match msg {
            Msg::Begin(begin) => {
                rt.live_bytes.fetch_sub(begin.bytes, Ordering::AcqRel);
                let _ = begin.reply.send(Err(BeginError::Overloaded(overloaded())));
            }
            // Its `Begun` is not durable (not even started): not to be told yet.
            Msg::Get(reply) => {
                let _ = reply.send(Lookup::Hidden);
            }
            Msg::Watch(reply) => {
                let _ = reply.send(Err(BeginError::Overloaded(overloaded())));
            }
            Msg::WaitOutcome(reply) => {
                let _ = reply.send(Outcome::Pending);
            }
            Msg::RetryNow(reply) => {
                let _ = reply.send(None);
            }
            Msg::Resolve { reply, .. } => {
                let _ = reply.send(Err(ResolveError::NotLive(gid)));
            }
            Msg::Engine(_) | Msg::Written { .. } | Msg::Recover(_) | Msg::Admitted { .. } => {
                unreachable!("internal messages are queued or handled above")
            }
        }
    }

    /// Handles `timer` now, or after the admission read of its gid if one is in flight.
    fn dispatch_timer(&mut self, rt: &Inner, timer: Timer) {
        match self.admitting.get_mut(&timer.gid) {
            Some(queue) => queue.push_back(Deferred::Timer(timer)),
            None => self.on_timer(rt, timer),
        }
    }

    /// The admission read of a parked `Begin` came back: decide it, then handle what queued
    /// behind it, in order (a queued `Begin` of the same gid may park again; what follows it
    /// then queues behind that one).
    fn on_admitted(
        &mut self,
        rt: &Inner,
        gid: String,
        begin: PendingBegin,
        found: Result<Found, LogError>,
    ) {
        let queue = self.admitting.remove(&gid).unwrap_or_default();
        self.admit(rt, gid.clone(), begin, found);
        for deferred in queue {
            match deferred {
                Deferred::Msg(msg) => self.dispatch(rt, gid.clone(), msg),
                Deferred::Timer(timer) => self.dispatch_timer(rt, timer),
            }
        }
    }

    fn on_timer(&mut self, rt: &Inner, timer: Timer) {
        let Timer {
            gid,
            event,
            due_unix_ms,
        } = timer;
        if let Some(due) = due_unix_ms {
            if deadline_step(now_ms(), due).is_some() {
                // Armed for at most TIMER_DELAY_MAX: not due yet, arm again.
                let key = self.arm(gid.clone(), event, Some(due));
                if let Some(e) = self.txs.get_mut(&gid) {
                    e.deadline = Some(key);
                }
                return;
            }
        }
        if event == Event::DeadlinePassed {
            if let Some(e) = self.txs.get_mut(&gid) {
                e.deadline = None;
            }
        }
        self.feed(rt, &gid, event);
    }

    /// Arms a timer for `event`: after `due_unix_ms - now` for a deadline, at once when it is
    /// past, never longer than [`TIMER_DELAY_MAX`].
    fn arm(&mut self, gid: String, event: Event, due_unix_ms: Option<u64>) -> delay_queue::Key {
        let delay = due_unix_ms
            .and_then(|due| deadline_step(now_ms(), due))
            .unwrap_or(Duration::ZERO);
        self.arm_after(gid, event, due_unix_ms, delay)
    }

    fn arm_after(
        &mut self,
        gid: String,
        event: Event,
        due_unix_ms: Option<u64>,
        delay: Duration,
    ) -> delay_queue::Key {
        self.timers.insert(
            Timer {
                gid,
                event,
                due_unix_ms,
            },
            delay.min(TIMER_DELAY_MAX),
        )
    }

    fn on_msg(&mut self, rt: &Inner, gid: String, msg: Msg) {
        match msg {
            Msg::Engine(event) => {
                self.feed(rt, &gid, event);
            }
            Msg::Written { seq, result } => match result {
                Ok(()) => {
                    if let Some(e) = self.txs.get(&gid) {
                        let at_begun = seq == 1 && !e.begun.is_empty();
                        let at_decision = !at_begun
                            && matches!(
                                e.tx.record().phase,
                                Phase::Committing | Phase::Compensating
                            );
                        if at_begun {
                            crash_point!("treaty::after_begun_durable");
                        }
                        if at_decision {
                            crash_point!("treaty::after_decision_durable");
                        }
                    }
                    self.feed(rt, &gid, Event::Durable { seq });
                }
                Err(e) => rt.fatal.stop(format!(
                    "a forced write of gid {gid:?} (record seq {seq}) failed: {e}"
                )),
            },
            Msg::Begin(begin) => self.on_begin(rt, gid, begin),
            Msg::Admitted { begin, found } => self.on_admitted(rt, gid, begin, *found),
            Msg::Recover(tx) => {
                if !self.txs.contains_key(&gid) {
                    self.insert(rt, &gid, *tx, 0, true);
                    self.feed(rt, &gid, Event::Recovered);
                }
            }
            Msg::Get(reply) => {
                let _ = reply.send(match self.txs.get(&gid) {
                    None => Lookup::NotLive,
                    Some(e) => Snapshot::of(&e.tx).map_or(Lookup::Hidden, Lookup::Live),
                });
            }
            Msg::Watch(reply) => {
                let answer = match self.txs.get_mut(&gid) {
                    None => Ok(None),
                    Some(e) => match (&e.watch, Snapshot::of(&e.tx)) {
                        (_, None) => Ok(None),
                        (Some(w), _) if w.receiver_count() >= WATCHERS_PER_TX_MAX => {
                            Err(BeginError::Overloaded(format!(
                                "{WATCHERS_PER_TX_MAX} watchers of gid {gid:?} already"
                            )))
                        }
                        (Some(w), _) => Ok(Some(w.subscribe())),
                        (None, Some(snap)) => {
                            let (w, rx) = watch::channel(snap);
                            e.watch = Some(w);
                            Ok(Some(rx))
                        }
                    },
                };
                let _ = reply.send(answer);
            }
            Msg::WaitOutcome(reply) => match self.txs.get_mut(&gid) {
                Some(e) if e.tx.decided() == Outcome::Pending => {
                    // Waiters that gave up (their wait ran out) go first.
                    e.waiters.retain(|w| !w.is_closed());
                    if e.waiters.len() >= WAITERS_PER_TX_MAX {
                        let _ = reply.send(Outcome::Pending);
                    } else {
                        e.waiters.push(reply);
                    }
                }
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
            Msg::Resolve {
                branch,
                operator,
                reason,
                reply,
            } => {
                let Some(e) = self.txs.get_mut(&gid) else {
                    let _ = reply.send(Err(ResolveError::NotLive(gid)));
                    return;
                };
                match e.tx.resolve(now_ms(), branch, &operator, &reason) {
                    Err(why) => {
                        let _ = reply.send(Err(ResolveError::Refused(why)));
                    }
                    Ok(commands) => {
                        tracing::warn!(
                            gid = %gid,
                            branch,
                            operator = %operator,
                            reason = %reason,
                            "branch resolved by an operator"
                        );
                        // The audit record is the first write of the commands.
                        let seq = commands
                            .iter()
                            .find_map(|c| match c {
                                Command::Persist { record, .. } => Some(record.seq),
                                _ => None,
                            })
                            .unwrap_or(0);
                        e.resolved.push((seq, reply));
                        self.execute(rt, &gid, commands);
                    }
                }
            }
        }
    }

    fn on_begin(&mut self, rt: &Inner, gid: String, begin: PendingBegin) {
        if let Some(e) = self.txs.get_mut(&gid) {
            rt.live_bytes.fetch_sub(begin.bytes, Ordering::AcqRel);
            let def: Vec<BranchDef> = begin
                .tx
                .record()
                .branches
                .iter()
                .map(|b| b.def.clone())
                .collect();
            match decide_begin(Known::Record(e.tx.record()), begin.tx.record().mode, &def) {
                BeginDecision::Existing if !e.tx.begun_durable() => {
                    // Told only once `Begun` is durable, like the first `Begin`.
                    e.begun.push((begin.reply, Started::Existing));
                }
                BeginDecision::Existing => {
                    let _ = begin.reply.send(Ok(Started::Existing));
                }
                _ => {
                    let _ = begin.reply.send(Err(BeginError::AlreadyExists(gid)));
                }
            }
            return;
        }
        // A finished transaction is found in the log (its terminal record is readable before
        // it leaves the shard: `put` applies at call time), or as a tombstone once retention
        // collected it. The read is issued now, so it sees every write made before; a log
        // that answers at once (the memory log) is decided here, else the `Begin` parks and
        // this gid's later messages wait behind it (see the module invariants).
        let mut read = read_found(Arc::clone(&rt.log), &gid);
        if let Some(found) = (&mut read).now_or_never() {
            return self.admit(rt, gid, begin, found);
        }
        let Some(me) = self.me.upgrade() else {
            rt.live_bytes.fetch_sub(begin.bytes, Ordering::AcqRel);
            let _ = begin.reply.send(Err(BeginError::ShuttingDown));
            return;
        };
        self.admitting.insert(gid.clone(), VecDeque::new());
        tokio::spawn(async move {
            let found = read.await;
            // A closed inbox means the shard stopped: the `Begin` is answered by its reply
            // channel closing, as every call is at a fail-stop.
            let _ = me
                .send((
                    gid,
                    Box::new(Msg::Admitted {
                        begin,
                        found: Box::new(found),
                    }),
                ))
                .await;
        });
    }

    /// Decides a `Begin` of a gid that is not live from what the log knows of it.
    fn admit(
        &mut self,
        rt: &Inner,
        gid: String,
        begin: PendingBegin,
        found: Result<Found, LogError>,
    ) {
        if self.txs.contains_key(&gid) {
            // Cannot happen: messages of a gid being admitted wait, and nothing else makes a
            // gid live. Handled as a `Begin` of a live gid should it ever change.
            debug_assert!(
                false,
                "gid {gid:?} became live while its Begin was admitted"
            );
            return self.on_begin(rt, gid, begin);
        }
        let PendingBegin {
            tx,
            bytes,
            refuse_new,
            reply,
        } = begin;
        let def: Vec<BranchDef> = tx.record().branches.iter().map(|b| b.def.clone()).collect();
        let mode = tx.record().mode;
        let decision = found.map(|found| match found {
            (Some(rec), _) => decide_begin(Known::Record(&rec), mode, &def),
            // `ignore_tombstones`: a deliberate bug for the chaos checker's tests only.
            (None, Some(t)) if !rt.ignores_tombstones() => {
                decide_begin(Known::Tombstone(&t), mode, &def)
            }
            (None, _) => decide_begin(Known::Nothing, mode, &def),
        });
        let answer = match decision {
            Ok(BeginDecision::Start) => match refuse_new {
                Some(why) => Err(BeginError::Overloaded(why)),
                None => {
                    rt.metrics.begun(mode);
                    self.insert(rt, &gid, *tx, bytes, false);
                    if let Some(e) = self.txs.get_mut(&gid) {
                        e.begun.push((reply, Started::New));
                    }
                    self.feed(rt, &gid, Event::Start);
                    return;
                }
            },
            Ok(BeginDecision::Existing) => Ok(Started::Existing),
            Ok(BeginDecision::Finished(o)) => Ok(Started::Finished(o)),
            Ok(BeginDecision::Conflict) => Err(BeginError::AlreadyExists(gid)),
            Err(e) => Err(e.into()),
        };
        rt.live_bytes.fetch_sub(bytes, Ordering::AcqRel);
        let _ = reply.send(answer);
    }

    fn insert(&mut self, rt: &Inner, gid: &str, tx: Tx, bytes: usize, recovered: bool) {
        rt.live.fetch_add(1, Ordering::AcqRel);
        let span = otel::transaction_span(rt.config.traces, tx.record(), recovered);
        let was_stuck = tx.record().stuck;
        if was_stuck {
            rt.metrics.stuck(true);
        }
        self.txs.insert(
            gid.to_string(),
            Entry {
                tx,
                deadline: None,
                begun: Vec::new(),
                waiters: Vec::new(),
                watch: None,
                resolved: Vec::new(),
                bytes,
                finishing: false,
                was_stuck,
                span,
            },
        );
    }

    fn remove(&mut self, rt: &Inner, gid: &str) -> Option<Entry> {
        let mut e = self.txs.remove(gid)?;
        if e.was_stuck {
            rt.metrics.stuck(false);
        }
        rt.live.fetch_sub(1, Ordering::AcqRel);
        rt.live_bytes.fetch_sub(e.bytes, Ordering::AcqRel);
        if let Some(k) = e.deadline.take() {
            self.timers.remove(&k);
        }
        Some(e)
    }

    /// Feed one event to `gid`'s engine and carry out the commands. Returns how many calls
    /// went out (for `Retry`).
    fn feed(&mut self, rt: &Inner, gid: &str, event: Event) -> usize {
        let Some(entry) = self.txs.get_mut(gid) else {
            return 0;
        };
        let commands = entry.tx.handle(now_ms(), event);
        self.execute(rt, gid, commands)
    }

    /// Carry out `commands` of `gid`'s engine, then tell whoever waits what may now be told.
    fn execute(&mut self, rt: &Inner, gid: &str, commands: Vec<Command>) -> usize {
        let mut calls = 0;
        let mut phase_two_calls = 0;
        for cmd in commands {
            match cmd {
                Command::Persist { record, forced } => {
                    if record.phase.is_terminal() {
                        crash_point!("treaty::before_ended");
                    }
                    let seq = record.seq;
                    // `put` applies the write before returning: order is the call order.
                    let started = Instant::now();
                    let written = rt.log.put(record, forced);
                    if forced {
                        let Some(me) = self.me.upgrade() else {
                            return calls;
                        };
                        let gid = gid.to_string();
                        let metrics = Arc::clone(&rt.metrics);
                        tokio::spawn(async move {
                            let result = written.await.map_err(|e| e.to_string());
                            metrics.forced_write(started.elapsed());
                            let _ = me.send((gid, Box::new(Msg::Written { seq, result }))).await;
                        });
                    } else if let Some(Err(e)) = written.now_or_never() {
                        rt.fatal.stop(format!(
                            "writing record seq {seq} of gid {gid:?} to the log failed: {e}"
                        ));
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
                    rt.metrics.retry_scheduled(op);
                    // Full jitter: uniform in [0, bound].
                    let delay = rand::thread_rng().gen_range(0..=backoff_bound_ms);
                    self.arm_after(
                        gid.to_string(),
                        Event::RetryDue {
                            branch,
                            op,
                            attempt,
                        },
                        None,
                        Duration::from_millis(delay),
                    );
                }
                Command::SetDeadline { at_unix_ms } => {
                    let key = self.arm(gid.to_string(), Event::DeadlinePassed, Some(at_unix_ms));
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
                Command::Finished => {
                    if let Some(e) = self.txs.get_mut(gid) {
                        e.finishing = true;
                    }
                }
            }
        }
        self.publish(rt, gid);
        calls
    }

    /// After a change: answer what waited for durability, update watchers, log a transaction
    /// that became stuck, and let a finished transaction go once nothing of it is in flight.
    fn publish(&mut self, rt: &Inner, gid: &str) {
        let Some(e) = self.txs.get_mut(gid) else {
            return;
        };
        if e.tx.begun_durable() {
            for (reply, started) in e.begun.drain(..) {
                let _ = reply.send(Ok(started));
            }
        }
        if !e.tx.begun_durable() {
            return;
        }
        let durable = !e.tx.forced_pending();
        // A snapshot clones the record: made only for someone who reads it.
        let durable_seq = e.tx.durable_seq();
        if e.resolved.iter().any(|(seq, _)| *seq <= durable_seq) || e.watch.is_some() {
            if let Some(snap) = Snapshot::of(&e.tx) {
                let (done, waiting): (Vec<_>, Vec<_>) = e
                    .resolved
                    .drain(..)
                    .partition(|(seq, _)| *seq <= durable_seq);
                e.resolved = waiting;
                for (_, reply) in done {
                    let _ = reply.send(Ok(snap.clone()));
                }
                if let Some(w) = &e.watch {
                    w.send_replace(snap);
                }
            }
        }
        let rec = e.tx.record();
        if rec.stuck && !e.was_stuck {
            let b = rec
                .branches
                .iter()
                .enumerate()
                .max_by_key(|(_, b)| b.attempts);
            tracing::warn!(
                gid = %gid,
                branch = b.map(|(i, _)| i),
                attempts = b.map(|(_, b)| b.attempts),
                last_error = b.map(|(_, b)| b.last_error.as_str()),
                "transaction is stuck: a phase-two call keeps failing; still retrying (Retry retries now, Resolve resolves a branch by hand)"
            );
        }
        if rec.stuck != e.was_stuck {
            rt.metrics.stuck(rec.stuck);
        }
        e.was_stuck = rec.stuck;
        if e.finishing && durable {
            if let Some(e) = self.remove(rt, gid) {
                let outcome = e.tx.decided();
                otel::record_outcome(&e.span, outcome);
                rt.metrics.finished(e.tx.record().mode, outcome);
                for w in e.waiters {
                    let _ = w.send(outcome);
                }
            }
        }
    }

    fn spawn_call(&self, rt: &Inner, gid: &str, branch: u32, op: Op, attempt: u32) {
        let Some(e) = self.txs.get(gid) else { return };
        let rec = e.tx.record();
        let req = mapping::branch_request(
            rec,
            branch,
            op,
            attempt,
            rt.log.log_id(),
            rt.config.advertise_url.as_deref().unwrap_or_default(),
        );
        let client = rt.pool.client(&rec.branches[branch as usize].def.endpoint);
        let timeout = rt.config.call_timeout;
        let Some(me) = self.me.upgrade() else { return };
        // One span per attempt; `Span::none()` (free) unless traces are on.
        let span = otel::branch_call_span(&e.span, rec, branch, op, attempt);
        let gid = gid.to_string();
        let metrics = Arc::clone(&rt.metrics);
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = participants::call(client, timeout, op, req, &span).await;
            otel::record_reply(&span, &reply);
            drop(span);
            metrics.call(op, CallResult::of(&reply), started.elapsed());
            if matches!(op, Op::Prepare | Op::Execute) {
                crash_point!("treaty::after_some_phase_one_replies");
            }
            let event = Event::Reply {
                branch,
                op,
                attempt,
                reply,
            };
            let _ = me.send((gid, Box::new(Msg::Engine(event)))).await;
        });
    }
}

/// What `log` knows of `gid`: its record, else its tombstone. The record is read first, and
/// the read is issued now: retention writes a tombstone before it deletes the record, so a
/// record gone by the time it is read has its tombstone in place for the second read.
fn read_found(log: Arc<dyn LogStore>, gid: &str) -> LogFuture<Found> {
    let record = log.get(gid);
    let gid = gid.to_string();
    async move {
        match record.await? {
            Some(rec) => Ok((Some(rec), None)),
            None => Ok((None, log.get_tombstone(&gid).await?)),
        }
    }
    .boxed()
}
