//! Deterministic simulation of the protocol engine (DESIGN.md section 11).
//!
//! One seed drives one single-threaded, discrete-event world: a priority queue of
//! `(sim_time, seq, event)`. Nothing in it reads a clock or depends on thread timing. The
//! rules under test are the product's own, called as pure functions; only I/O is simulated.
//!
//! What runs:
//! - the **coordinator**: the real engine (`Tx::handle`) per gid and the real [`MemoryLog`]
//!   (codec included). A forced write is written at once but made durable only when its
//!   simulated fsync completes (`sync_now`), and only then is `Durable{seq}` delivered, so a
//!   crash in between loses it (unless another fsync, group-commit style, covered it). Its
//!   answers to clients and participants go through the runtime's own pure rules
//!   (`engine::admission`): `Begin` through `decide_begin` over the live transaction, else the
//!   log's record, else its tombstone; `Outcome` through `answer_outcome` (live and durable,
//!   record, tombstone, or presumed abort with `known = false`). Every delivery carries the
//!   log id and the payload of the engine's record. Deadlines are armed as the runtime arms
//!   them: for at most a day of monotonic time, re-armed until the wall clock reaches them;
//! - **participants**: the SDK's barrier rules themselves (`treaty_sdk::barrier::rules::plan`,
//!   then `Plan::settle`) over rows kept in maps that survive participant crashes (as sled
//!   rows do), in front of business code that refuses at random; the index of open prepared
//!   branches (`InDoubt`); and the SDK's **in-doubt resolver**: a branch prepared more than
//!   `IN_DOUBT_AFTER_MS` ago asks `Outcome` and applies COMMITTED/ABORTED as a replayed
//!   commit/abort through the barrier, only when the answer's log id is the one stored with
//!   the prepare (the SDK's own rule, `rules::decide_in_doubt`, through [`resolver_decides`]);
//! - **clients**: each transaction is submitted, then resubmitted at random times, with the
//!   same definition or (sometimes) another one under the same gid;
//! - the **network**: every call, reply and inquiry answer may be lost; calls and replies may
//!   be duplicated or delayed (so reordered); a call without an answer turns into a
//!   `Transient` at the per-call timeout;
//! - **faults**: coordinator crashes at random times and between two commands of a batch
//!   (in-memory state and timers gone, the log loses what was not durable, restart recovers
//!   from `scan_active`); a restart that comes back with a **wiped log** (a fresh `MemoryLog`,
//!   a new log id, its old branches left in doubt); resolvers that ask a **second
//!   coordinator** (another log that never heard of the gid: `Aborted`, `known = false`);
//!   participant crashes; operator `Retry(gid)`; **retention** (`collect_ended` on the sim's
//!   wall clock: finished records become tombstones while resubmissions and late inquiries
//!   still arrive); **wall-clock jumps** back and forth, by seconds or days, while the queue's
//!   time goes on (the engine gets the wall clock per event).
//!
//! Faults happen during a window, then stop; the world then runs until no event is left
//! (bounded in sim time). Checked at every step:
//! - no `Commit` issued before the durable record is `Committing`; no `Compensate` before it is
//!   `Compensating`;
//! - no 2PC branch committed while another aborted; the barrier never meets a contradiction
//!   (commit after abort, commit without a prepare, a foreign commit: `Reply::Violation`);
//! - **no participant decides a branch against its coordinator**: a commit or abort applied
//!   to a prepared branch (by the coordinator or by a resolver) agrees with what the log that
//!   prepared it holds durably (for a wiped log: what it held when wiped);
//! - **`Begin`**: a gid names one transaction forever (a new one starts only if the log holds
//!   no durable record and no tombstone of it); another definition under a known gid is
//!   `Conflict`, the same definition never is; `Finished` tells the logged outcome;
//! - a deadline is acted on only once the wall clock reaches it;
//! - saga compensations in reverse order (a step is compensated only once every later step that
//!   was sent is compensated or failed), and only for steps whose `Execute` was sent (or, after
//!   a restart, that the log says may have run);
//! - each participant effect (business code that succeeded) at most once per (gid, branch,
//!   operation); no step or prepare applied after its compensation or abort;
//! - an outcome once told (`Decided`) never changes; the engine never panics.
//!
//! And at the end: the coordinator is idle, every transaction is terminal in the log, or a
//! tombstone, or never begun (and then nothing of it ran); the outcome told is the one logged;
//! for the branches the current log drove: 2PC committed means every branch committed, aborted
//! means none committed and every prepared one aborted; saga committed means every step ran
//! and none was compensated, aborted means every step that ran was compensated. Branches a
//! wiped log drove are never decided against it, and may stay in doubt for good (the SDK logs
//! them at ERROR).
//!
//! Each check is shown to bite: engine mutations (`Tx::set_mutations`) and deliberate bugs of
//! the harness's stand-ins for the runtime and the SDK ([`HarnessBug`]) must be caught.
//!
//! Running:
//! - `cargo test -p treaty-coordinator --test simulation`: seeds `0..2000` (about 10 s in a
//!   debug build on 2 cores), plus the bug-catching tests.
//! - `TREATY_SIM_SEEDS=200000 cargo test --release -p treaty-coordinator --test simulation`:
//!   a longer campaign (all cores).
//! - `TREATY_SIM_SEED=<n>`: one seed, with its readable trace of events on stdout; add
//!   `TREATY_SIM_BUG=<name>` (see [`HarnessBug::ALL`]) to replay it with a harness bug.

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use treaty_coordinator::engine::{
    answer_outcome, decide_begin, BeginDecision, BranchDef, Command, Event, Known, Mode, Mutations,
    NewTx, Op, Outcome, Phase, Reply, RetryPolicy, Tx,
};
use treaty_coordinator::log::memory::MemoryLog;
use treaty_coordinator::log::{LogError, LogFuture, LogStore};

/// The result of a memory-log operation, which is complete when the call returns: the memory
/// log answers at call time and no sync is ever held here, so its futures are ready at once.
/// This keeps the simulation single-threaded and deterministic, with no executor.
fn ready<T>(op: LogFuture<T>) -> Result<T, LogError> {
    use futures::FutureExt;
    op.now_or_never()
        .expect("the memory log's futures are ready at once (no held syncs in the simulation)")
}
use treaty_coordinator::runtime::{deadline_step, TIMER_DELAY_MAX};
use treaty_sdk::barrier::rules::{self, Business, Delivery, InDoubt, Recorded, Rule};
use treaty_sdk::{Answer, Op as SdkOp};

/// Seeds run by default (CI).
const CI_SEEDS: u64 = 2_000;
/// The simulated clock starts at a plausible unix time (ms); traces print time since then.
const T0: u64 = 1_700_000_000_000;
/// Faults (crashes, losses, duplicates, `RETRY`s) happen only before this (ms since T0).
const FAULT_WINDOW_MS: u64 = 6_000;
/// After the fault window, every transaction must be done within this (sim ms).
const SETTLE_LIMIT_MS: u64 = 600_000;
/// The coordinator's per-call timeout.
const CALL_TIMEOUT_MS: u64 = 300;
const PARTICIPANTS: usize = 4;
/// Coordinator crashes per run, at most (random ones and those between two commands).
const COORD_CRASHES_MAX: u32 = 5;
/// Trace lines printed with a failure (the replay prints all).
const TRACE_TAIL: usize = 80;
/// A prepared branch not finished after this long asks its coordinator (the SDK's
/// `in_doubt_after`).
const IN_DOUBT_AFTER_MS: u64 = 1_000;
/// Period of each participant's resolver rounds.
const RESOLVE_PERIOD_MS: u64 = 700;
/// Resolvers, resubmissions and retention stop this long after the faults, so that a branch
/// left in doubt for good (its log wiped) does not keep the world busy forever.
const LATE_HORIZON_MS: u64 = 30_000;
/// Retention: finished records older than this (wall clock) become tombstones.
const RETENTION_MS: u64 = 2_000;
/// The runtime arms one timer for at most a day and re-arms it until the wall clock reaches
/// the deadline (`runtime::TIMER_DELAY_MAX`).
const TIMER_DELAY_MAX_MS: u64 = TIMER_DELAY_MAX.as_millis() as u64;
/// A wall-clock jump is at most this (either way); some jump by days.
const WALL_JUMP_MAX_MS: i64 = 20_000;
const WALL_JUMP_FAR_MS: i64 = 3 * 24 * 3_600_000;

// ---------------------------------------------------------------------------------------------
// The workload and the fault profile of one seed.

struct TxDef {
    gid: String,
    mode: Mode,
    /// The participant serving each branch.
    parts: Vec<usize>,
    submit_ms: u64,
    /// Deadline, relative to the wall clock at submission (some are days away).
    deadline_in_ms: u64,
    retry: RetryPolicy,
}

/// Probabilities and counts, drawn per seed so that runs range from calm to hostile.
#[derive(Debug)]
struct Faults {
    loss: f64,
    dup: f64,
    /// Chance a message takes a long path (past the call timeout).
    slow: f64,
    delay_max_ms: u64,
    fsync_max_ms: u64,
    /// Chance an fsync stalls for seconds (a busy disk): decisions stay in flight while
    /// participants wait in doubt and ask.
    fsync_stall: f64,
    retry_answer: f64,
    refuse: f64,
    fail: f64,
    coord_crashes: u32,
    crash_between_commands: f64,
    part_crashes: u32,
    part_crash_after_apply: f64,
    retry_now: u32,
    /// Chance a coordinator restart comes back with a wiped log (a fresh log id).
    wipe: f64,
    /// Chance a resolver asks another coordinator (another log) than the one it stored.
    ask_wrong: f64,
    /// Client `Begin` resubmissions per transaction, at most.
    resubmits_max: u32,
    /// Chance a resubmission carries another definition under the same gid.
    resubmit_other: f64,
    /// Retention passes.
    retention_runs: u32,
    /// Wall-clock jumps.
    wall_jumps: u32,
}

impl Faults {
    fn draw(rng: &mut StdRng) -> Faults {
        let calm = rng.gen_bool(0.15);
        let p = |rng: &mut StdRng, max: f64| if calm { 0.0 } else { rng.gen_range(0.0..max) };
        Faults {
            loss: p(rng, 0.15),
            dup: p(rng, 0.10),
            slow: p(rng, 0.05),
            delay_max_ms: rng.gen_range(1..=120),
            fsync_max_ms: rng.gen_range(1..=30),
            fsync_stall: p(rng, 0.05),
            retry_answer: p(rng, 0.2),
            refuse: rng.gen_range(0.0..0.25),
            fail: rng.gen_range(0.0..0.25),
            coord_crashes: if calm { 0 } else { rng.gen_range(0..=4) },
            crash_between_commands: p(rng, 0.02),
            part_crashes: if calm { 0 } else { rng.gen_range(0..=4) },
            part_crash_after_apply: p(rng, 0.03),
            retry_now: rng.gen_range(0..=2),
            wipe: if calm || rng.gen_bool(0.7) {
                0.0
            } else {
                rng.gen_range(0.0..0.5)
            },
            ask_wrong: if rng.gen_bool(0.5) {
                0.0
            } else {
                rng.gen_range(0.0..0.4)
            },
            resubmits_max: rng.gen_range(0..=3),
            resubmit_other: rng.gen_range(0.0..0.3),
            retention_runs: rng.gen_range(0..=4),
            wall_jumps: if calm { 0 } else { rng.gen_range(0..=3) },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Events of the world.

#[derive(Clone, Debug)]
struct Request {
    epoch: u64,
    /// The coordinator's log id, carried by every delivery.
    log_id: String,
    /// The payload from the engine's record (the compensation payload for `Compensate`).
    payload: Bytes,
    call: u64,
    tx: usize,
    branch: u32,
    op: Op,
    attempt: u32,
}

#[derive(Clone, Debug)]
struct Response {
    req: Request,
    reply: Reply,
}

#[derive(Clone, Debug)]
enum SimEv {
    /// A client submits transaction `tx` (`Begin`); `other` sends another definition under
    /// the same gid (a client bug, or gid reuse), `again` marks a resubmission.
    Submit {
        tx: usize,
        again: bool,
        other: bool,
    },
    /// The runtime's deadline timer of `tx`, due at `due` on the wall clock.
    Deadline {
        epoch: u64,
        tx: usize,
        due: u64,
        /// Armed again at least once (the wall clock had not reached `due`).
        rearmed: bool,
    },
    /// A resolver round at participant `p`.
    ResolveRound {
        p: usize,
    },
    /// An `Outcome(gid)` inquiry arrives at a coordinator (`wrong`: another one).
    OutcomeAsk {
        p: usize,
        tx: usize,
        /// The branches in doubt when the round scanned the index: the answer is for them
        /// only (a branch prepared after the question was asked is not covered by it).
        branches: Vec<u32>,
        wrong: bool,
    },
    /// The answer arrives back at participant `p`.
    OutcomeAnswer {
        p: usize,
        tx: usize,
        branches: Vec<u32>,
        outcome: Outcome,
        known: bool,
        log_id: String,
    },
    Retention,
    WallJump,
    /// The fsync covering the forced write `seq` of `tx` completed.
    FsyncDone {
        epoch: u64,
        tx: usize,
        seq: u64,
    },
    /// An engine timer (`RetryDue`, `DeadlinePassed`) fires, or `Durable` is delivered.
    Timer {
        epoch: u64,
        tx: usize,
        ev: Event,
    },
    /// A call arrives at its participant.
    Request(Request),
    /// A reply arrives at the coordinator.
    Response(Response),
    /// The per-call timeout of a call.
    CallTimeout(Request),
    CoordCrash,
    CoordRestart,
    PartCrash {
        p: usize,
    },
    PartRestart {
        p: usize,
    },
    /// An operator's `Retry(gid)`.
    RetryNow {
        tx: usize,
    },
    FaultsEnd,
}

struct Item {
    at: u64,
    seq: u64,
    ev: SimEv,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    /// Reversed: `BinaryHeap` pops the earliest, ties in scheduling order.
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

// ---------------------------------------------------------------------------------------------
// The trace: structured while running (cheap), rendered only when printed.

#[derive(Clone, Debug)]
enum Actor {
    Client,
    Coord,
    Part(usize),
    Net,
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Client => f.write_str("client"),
            Actor::Coord => f.write_str("coord"),
            Actor::Part(p) => write!(f, "p{p}"),
            Actor::Net => f.write_str("net"),
        }
    }
}

#[derive(Clone, Debug)]
enum What {
    Submit {
        tx: usize,
        mode: Mode,
        parts: Vec<usize>,
        deadline_in_ms: u64,
    },
    /// Free text for the rarer events (resubmissions, inquiries, wipes, jumps, retention).
    Note(String),
    SubmitLater {
        tx: usize,
    },
    Engine {
        tx: usize,
        ev: Event,
    },
    Persist {
        tx: usize,
        phase: Phase,
        forced: bool,
        seq: u64,
    },
    Call {
        tx: usize,
        branch: u32,
        op: Op,
        attempt: u32,
    },
    Retry {
        tx: usize,
        branch: u32,
        op: Op,
        attempt: u32,
        in_ms: u64,
    },
    Deadline {
        tx: usize,
        at: u64,
    },
    Decided {
        tx: usize,
        outcome: Outcome,
    },
    Finished {
        tx: usize,
    },
    Crash {
        why: &'static str,
        lost_writes: usize,
    },
    Restart {
        recovered: usize,
    },
    Down,
    Up,
    Apply {
        tx: usize,
        branch: u32,
        op: Op,
        reply: Reply,
        effect: bool,
        dup: bool,
    },
    Unavailable {
        tx: usize,
        branch: u32,
        op: Op,
    },
    Lost {
        to: &'static str,
        tx: usize,
        branch: u32,
        op: Op,
        attempt: u32,
    },
    Duplicated {
        to: &'static str,
        tx: usize,
        branch: u32,
        op: Op,
        attempt: u32,
    },
    Dropped {
        tx: usize,
        branch: u32,
        op: Op,
        attempt: u32,
    },
    Timeout {
        tx: usize,
        branch: u32,
        op: Op,
        attempt: u32,
    },
    FaultsEnd,
}

#[derive(Clone, Debug)]
struct Line {
    at: u64,
    actor: Actor,
    what: What,
}

fn gid(tx: usize) -> String {
    format!("g{tx:02}")
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>7} {:<6} ", self.at - T0, self.actor.to_string())?;
        match &self.what {
            What::Submit {
                tx,
                mode,
                parts,
                deadline_in_ms,
            } => write!(
                f,
                "submit {} {mode:?}, branches on participants {parts:?}, deadline in {deadline_in_ms} ms",
                gid(*tx)
            ),
            What::Note(s) => f.write_str(s),
            What::SubmitLater { tx } => {
                write!(f, "submit {}: coordinator down, retry later", gid(*tx))
            }
            What::Engine { tx, ev } => write!(f, "{} <- {ev:?}", gid(*tx)),
            What::Persist {
                tx,
                phase,
                forced,
                seq,
            } => write!(
                f,
                "{} persist #{seq} {phase:?}{}",
                gid(*tx),
                if *forced { " (forced)" } else { "" }
            ),
            What::Call {
                tx,
                branch,
                op,
                attempt,
            } => {
                write!(f, "{} call b{branch} {op:?} attempt {attempt}", gid(*tx))
            }
            What::Retry {
                tx,
                branch,
                op,
                attempt,
                in_ms,
            } => write!(
                f,
                "{} retry b{branch} {op:?} attempt {attempt} in {in_ms} ms",
                gid(*tx)
            ),
            What::Deadline { tx, at } => {
                write!(f, "{} deadline at {}", gid(*tx), at.saturating_sub(T0))
            }
            What::Decided { tx, outcome } => write!(f, "{} decided {outcome:?}", gid(*tx)),
            What::Finished { tx } => write!(f, "{} finished", gid(*tx)),
            What::Crash { why, lost_writes } => {
                write!(
                    f,
                    "CRASH ({why}); {lost_writes} log writes not durable are lost"
                )
            }
            What::Restart { recovered } => {
                write!(f, "restart: {recovered} non-terminal records recovered")
            }
            What::Down => f.write_str("CRASH (down)"),
            What::Up => f.write_str("up"),
            What::Apply {
                tx,
                branch,
                op,
                reply,
                effect,
                dup,
            } => write!(
                f,
                "{} b{branch} {op:?} -> {reply:?}{}",
                gid(*tx),
                if *dup {
                    " (barrier: duplicate)"
                } else if *effect {
                    " (business effect)"
                } else {
                    " (barrier: no effect)"
                }
            ),
            What::Unavailable { tx, branch, op } => {
                write!(f, "{} b{branch} {op:?}: participant down", gid(*tx))
            }
            What::Lost {
                to,
                tx,
                branch,
                op,
                attempt,
            } => {
                write!(f, "lost {to} {} b{branch} {op:?} #{attempt}", gid(*tx))
            }
            What::Duplicated {
                to,
                tx,
                branch,
                op,
                attempt,
            } => {
                write!(
                    f,
                    "duplicated {to} {} b{branch} {op:?} #{attempt}",
                    gid(*tx)
                )
            }
            What::Dropped {
                tx,
                branch,
                op,
                attempt,
            } => write!(
                f,
                "reply {} b{branch} {op:?} #{attempt} dropped (coordinator restarted)",
                gid(*tx)
            ),
            What::Timeout {
                tx,
                branch,
                op,
                attempt,
            } => {
                write!(f, "{} b{branch} {op:?} #{attempt} timed out", gid(*tx))
            }
            What::FaultsEnd => f.write_str("faults stop"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Participants: the SDK's barrier rules (`treaty_sdk::barrier::rules`) over rows kept in
// memory. The rows survive participant crashes, as the sled rows do.

fn sdk_op(op: Op) -> SdkOp {
    match op {
        Op::Prepare => SdkOp::Prepare,
        Op::Commit => SdkOp::Commit,
        Op::Abort => SdkOp::Abort,
        Op::Execute => SdkOp::Execute,
        Op::Compensate => SdkOp::Compensate,
    }
}

fn op_idx(op: Op) -> usize {
    match op {
        Op::Prepare => 0,
        Op::Commit => 1,
        Op::Abort => 2,
        Op::Execute => 3,
        Op::Compensate => 4,
    }
}

/// The rows of one `(gid, branch)`, in the order written.
type Rows = Vec<Recorded>;

struct Participant {
    up: bool,
    /// (tx, branch) -> rows. Survives crashes.
    barrier: BTreeMap<(usize, u32), Rows>,
    /// The index of open prepared branches: (tx, branch) -> when it opened (sim time) and
    /// the payload a replayed commit or abort carries (the SDK keeps it there too).
    open: BTreeMap<(usize, u32), (u64, Bytes)>,
}

/// The SDK's resolver rule itself ([`rules::decide_in_doubt`]): act on an answer only when it
/// comes from the log that prepared the branch; without a stored log id, only on a known
/// outcome. `None`: stay in doubt (pending, or the wrong log).
fn resolver_decides(stored: &str, outcome: Outcome, known: bool, answered: &str) -> Option<Op> {
    let told = match outcome {
        Outcome::Committed => rules::Told::Committed,
        Outcome::Aborted => rules::Told::Aborted,
        Outcome::Pending => rules::Told::Pending,
    };
    match rules::decide_in_doubt(stored, told, known, answered) {
        rules::InDoubtDecision::Apply(SdkOp::Commit) => Some(Op::Commit),
        rules::InDoubtDecision::Apply(_) => Some(Op::Abort),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// A failed invariant.

/// An invariant the run broke, with when and what.
#[derive(Clone, Debug)]
pub struct Violation {
    at: u64,
    invariant: &'static str,
    detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "at t={} ms: {}: {}",
            self.at.saturating_sub(T0),
            self.invariant,
            self.detail
        )
    }
}

/// What one run saw, summed over a campaign to show the faults really happened.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    committed_2pc: u64,
    aborted_2pc: u64,
    committed_saga: u64,
    aborted_saga: u64,
    never_begun: u64,
    coord_crashes: u64,
    recovered_txs: u64,
    part_crashes: u64,
    lost: u64,
    duplicated: u64,
    timeouts: u64,
    late_replies: u64,
    /// In-doubt branches the resolver committed / aborted on their own log's answer.
    resolved_commit: u64,
    resolved_abort: u64,
    /// Of those aborts, presumed (`known == false`).
    resolved_presumed: u64,
    /// Answers the resolver refused because they came from another log.
    wrong_log_answers: u64,
    wipes: u64,
    /// Branches left in doubt at the end (their log wiped).
    left_in_doubt: u64,
    begin_existing: u64,
    begin_finished: u64,
    begin_conflict: u64,
    /// Resubmissions that started the transaction (its first `Begun` was lost).
    begin_restarted: u64,
    tombstones: u64,
    wall_jumps_back: u64,
    deadline_rearms: u64,
    /// Deadlines reached, by an active transaction, through a re-armed timer.
    rearmed_deadlines_reached: u64,
    /// Rules of the barrier that decided, for the rare ones.
    rule_null_cancel: u64,
    rule_cancelled: u64,
    rule_reused: u64,
    rule_foreign: u64,
    events: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.committed_2pc += o.committed_2pc;
        self.aborted_2pc += o.aborted_2pc;
        self.committed_saga += o.committed_saga;
        self.aborted_saga += o.aborted_saga;
        self.never_begun += o.never_begun;
        self.coord_crashes += o.coord_crashes;
        self.recovered_txs += o.recovered_txs;
        self.part_crashes += o.part_crashes;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.timeouts += o.timeouts;
        self.late_replies += o.late_replies;
        self.resolved_commit += o.resolved_commit;
        self.resolved_abort += o.resolved_abort;
        self.resolved_presumed += o.resolved_presumed;
        self.wrong_log_answers += o.wrong_log_answers;
        self.wipes += o.wipes;
        self.left_in_doubt += o.left_in_doubt;
        self.begin_existing += o.begin_existing;
        self.begin_finished += o.begin_finished;
        self.begin_conflict += o.begin_conflict;
        self.begin_restarted += o.begin_restarted;
        self.tombstones += o.tombstones;
        self.wall_jumps_back += o.wall_jumps_back;
        self.deadline_rearms += o.deadline_rearms;
        self.rearmed_deadlines_reached += o.rearmed_deadlines_reached;
        self.rule_null_cancel += o.rule_null_cancel;
        self.rule_cancelled += o.rule_cancelled;
        self.rule_reused += o.rule_reused;
        self.rule_foreign += o.rule_foreign;
        self.events += o.events;
    }
}

// ---------------------------------------------------------------------------------------------
// The world.

/// Deliberate bugs in the harness's own stand-ins for the runtime and the SDK (not the
/// engine's: see [`Mutations`]), to show that the checks on them bite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HarnessBug {
    /// The resolver applies any answer, from whatever log (presumed abort from a log that
    /// never drove the branch).
    ResolverTrustsAnyLog,
    /// `Begin` looks at live and logged records but not at tombstones.
    BeginIgnoresTombstones,
    /// `Begin` ignores the definition: another definition under a known gid is answered as
    /// the existing one.
    BeginIgnoresDefinition,
    /// `Begin` of a tombstoned gid answers `Aborted` whatever the tombstone says (the
    /// `Outcome` path's presumed abort applied to `Begin`).
    BeginPresumesAbort,
    /// `Outcome` answers from the live transaction's in-memory phase, not from what is
    /// durable (`visible_phase`): a decision whose forced write is still in flight is told.
    OutcomeBeforeDurable,
    /// The deadline timer trusts the wall clock it was armed with: when it fires it delivers
    /// `DeadlinePassed` even if the wall clock (set back meanwhile) has not reached it.
    DeadlineNotRearmed,
}

impl HarnessBug {
    const ALL: [(&'static str, HarnessBug); 6] = [
        ("resolver-trusts-any-log", HarnessBug::ResolverTrustsAnyLog),
        (
            "begin-ignores-tombstones",
            HarnessBug::BeginIgnoresTombstones,
        ),
        (
            "begin-ignores-definition",
            HarnessBug::BeginIgnoresDefinition,
        ),
        ("begin-presumes-abort", HarnessBug::BeginPresumesAbort),
        ("outcome-before-durable", HarnessBug::OutcomeBeforeDurable),
        ("deadline-not-rearmed", HarnessBug::DeadlineNotRearmed),
    ];

    /// `TREATY_SIM_BUG=<name>`: replay a seed (`TREATY_SIM_SEED`) with a harness bug.
    fn from_env() -> Option<HarnessBug> {
        let v = std::env::var("TREATY_SIM_BUG").ok()?;
        let found = HarnessBug::ALL.iter().find(|(n, _)| *n == v.trim());
        Some(found.map(|(_, b)| *b).unwrap_or_else(|| {
            let names: Vec<&str> = HarnessBug::ALL.iter().map(|(n, _)| *n).collect();
            panic!("TREATY_SIM_BUG={v:?} is not one of {names:?}")
        }))
    }
}

/// What a run tests: the engine as built, or with a deliberate bug.
#[derive(Clone, Copy, Debug, Default)]
struct Setup {
    mutations: Mutations,
    bug: Option<HarnessBug>,
    /// Resolvers always ask the coordinator their row names: only wiped logs answer for
    /// another log.
    no_wrong_asks: bool,
    /// No log is ever wiped: only a second coordinator answers for another log.
    no_wipes: bool,
    /// Participant 0 answers RETRY to every `Prepare`/`Execute` for good (a lock it never
    /// gets), and every deadline is days away: those transactions end only when their far
    /// deadline is reached, through re-armed timers and wall-clock jumps.
    stall: bool,
    /// Leave out the direct check that no `Commit` is issued before the decision is durable,
    /// to show that the participants' effects alone expose such a bug.
    trust_commit_timing: bool,
}

struct Slot {
    tx: Tx,
    /// Read back from the log: it may not know everything the crashed process did.
    recovered: bool,
}

struct Sim {
    rng: StdRng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Item>,
    faults: Faults,
    faults_on: bool,
    /// Past this (sim time) a live transaction is stuck.
    settle_until: u64,
    setup: Setup,
    defs: Vec<TxDef>,

    // Coordinator.
    log: MemoryLog,
    /// Bumped by each wipe of the log.
    gen: u32,
    /// What each wiped log held durably when it was wiped: log id -> gid -> outcome
    /// (`Committed` only for a durable `Committing`/`Committed` record or tombstone).
    wiped: HashMap<String, BTreeMap<String, Outcome>>,
    /// The wiped log ids, oldest first.
    wiped_order: Vec<String>,
    /// Another coordinator, with its own log, that never hears of any gid.
    other: MemoryLog,
    /// The simulated wall clock is `now + wall_offset`: jumps move it, not the queue.
    wall_offset: i64,
    /// The definition variant each (log generation, tx) was started with (`true`: the other).
    variant: BTreeMap<(u32, usize), bool>,
    /// The log's durable phases, read from it; dropped whenever they may change (a flush or
    /// a crash: unforced puts never change them).
    durable_phases: Option<BTreeMap<String, Phase>>,
    up: bool,
    /// Bumped at each crash: timers, fsyncs and replies of an older epoch died with it.
    epoch: u64,
    txs: BTreeMap<usize, Slot>,
    next_call: u64,
    /// Calls of this epoch that got their answer or timed out.
    resolved: HashMap<u64, bool>,
    crashes: u32,

    // Participants.
    parts: Vec<Participant>,

    // What the harness observes.
    /// Business closures run, per (tx, branch, op index).
    effects: BTreeMap<(usize, u32), [u32; 5]>,
    /// (log generation, tx, branch) for which a `Prepare`/`Execute` was ever sent.
    forward_sent: BTreeSet<(u32, usize, u32)>,
    /// The first outcome told for each (log generation, tx); it must never change.
    decided: BTreeMap<(u32, usize), Outcome>,
    stats: Stats,
    trace: Vec<Line>,
}

type Check = Result<(), Violation>;

impl Sim {
    fn new(seed: u64, setup: Setup) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let faults = Faults::draw(&mut rng);
        let n_tx = rng.gen_range(2..=16);
        let defs = (0..n_tx)
            .map(|i| {
                let mode = if rng.gen_bool(0.5) {
                    Mode::TwoPhase
                } else {
                    Mode::Saga
                };
                let n = rng.gen_range(1..=5);
                let submit_ms = T0 + rng.gen_range(0..FAULT_WINDOW_MS * 3 / 4);
                let deadline_in_ms = if rng.gen_bool(0.05) {
                    // Past the runtime's longest timer: reached by re-arming.
                    rng.gen_range(TIMER_DELAY_MAX_MS..3 * TIMER_DELAY_MAX_MS)
                } else {
                    rng.gen_range(50..=3_000)
                };
                TxDef {
                    gid: gid(i),
                    mode,
                    parts: (0..n).map(|_| rng.gen_range(0..PARTICIPANTS)).collect(),
                    submit_ms,
                    deadline_in_ms,
                    retry: RetryPolicy {
                        initial_backoff_ms: rng.gen_range(5..=100),
                        max_backoff_ms: 800,
                        stuck_after_attempts: 5,
                    },
                }
            })
            .collect();
        let mut defs: Vec<TxDef> = defs;
        let mut settle_until = T0 + FAULT_WINDOW_MS + SETTLE_LIMIT_MS;
        if setup.stall {
            for d in &mut defs {
                d.deadline_in_ms = rng.gen_range(TIMER_DELAY_MAX_MS..3 * TIMER_DELAY_MAX_MS);
                // Retrying a stalled prepare for days at sub-second backoff would cost
                // millions of events; the engine's cap is per transaction.
                d.retry.max_backoff_ms = 3_600_000;
            }
            let far = WALL_JUMP_FAR_MS as u64 * u64::from(faults.wall_jumps);
            settle_until += 3 * TIMER_DELAY_MAX_MS + far;
        }
        let mut sim = Sim {
            settle_until,
            rng,
            now: T0,
            seq: 0,
            queue: BinaryHeap::new(),
            faults,
            faults_on: true,
            setup,
            defs,
            log: MemoryLog::new(),
            gen: 0,
            wiped: HashMap::new(),
            wiped_order: Vec::new(),
            other: MemoryLog::new(),
            wall_offset: 0,
            variant: BTreeMap::new(),
            durable_phases: None,
            up: true,
            epoch: 0,
            txs: BTreeMap::new(),
            next_call: 0,
            resolved: HashMap::new(),
            crashes: 0,
            parts: (0..PARTICIPANTS)
                .map(|_| Participant {
                    up: true,
                    barrier: BTreeMap::new(),
                    open: BTreeMap::new(),
                })
                .collect(),
            effects: BTreeMap::new(),
            forward_sent: BTreeSet::new(),
            decided: BTreeMap::new(),
            stats: Stats::default(),
            trace: Vec::new(),
        };
        let late = T0 + FAULT_WINDOW_MS + LATE_HORIZON_MS;
        for tx in 0..sim.defs.len() {
            let first = SimEv::Submit {
                tx,
                again: false,
                other: false,
            };
            sim.at(sim.defs[tx].submit_ms, first);
            for _ in 0..sim.rng.gen_range(0..=sim.faults.resubmits_max) {
                let t = sim.rng.gen_range(sim.defs[tx].submit_ms..late);
                let other = sim.rng.gen_bool(sim.faults.resubmit_other);
                let again = SimEv::Submit {
                    tx,
                    again: true,
                    other,
                };
                sim.at(t, again);
            }
        }
        for p in 0..PARTICIPANTS {
            let t = T0 + sim.rng.gen_range(0..RESOLVE_PERIOD_MS);
            sim.at(t, SimEv::ResolveRound { p });
        }
        for _ in 0..sim.faults.retention_runs {
            let t = T0 + sim.rng.gen_range(0..late - T0);
            sim.at(t, SimEv::Retention);
        }
        for _ in 0..sim.faults.wall_jumps {
            let t = T0 + sim.rng.gen_range(0..FAULT_WINDOW_MS);
            sim.at(t, SimEv::WallJump);
        }
        for _ in 0..sim.faults.coord_crashes {
            let t = T0 + sim.rng.gen_range(0..FAULT_WINDOW_MS);
            sim.at(t, SimEv::CoordCrash);
        }
        for _ in 0..sim.faults.part_crashes {
            let t = T0 + sim.rng.gen_range(0..FAULT_WINDOW_MS);
            let p = sim.rng.gen_range(0..PARTICIPANTS);
            sim.at(t, SimEv::PartCrash { p });
        }
        for _ in 0..sim.faults.retry_now {
            let t = T0 + sim.rng.gen_range(0..FAULT_WINDOW_MS);
            let tx = sim.rng.gen_range(0..sim.defs.len());
            sim.at(t, SimEv::RetryNow { tx });
        }
        sim.at(T0 + FAULT_WINDOW_MS, SimEv::FaultsEnd);
        sim
    }

    fn at(&mut self, at: u64, ev: SimEv) {
        self.seq += 1;
        self.queue.push(Item {
            at: at.max(self.now),
            seq: self.seq,
            ev,
        });
    }

    fn after(&mut self, delay_ms: u64, ev: SimEv) {
        self.at(self.now + delay_ms, ev);
    }

    fn note(&mut self, actor: Actor, what: What) {
        self.trace.push(Line {
            at: self.now,
            actor,
            what,
        });
    }

    fn violation(&self, invariant: &'static str, detail: String) -> Violation {
        Violation {
            at: self.now,
            invariant,
            detail,
        }
    }

    /// Runs to quiescence, then checks the end state.
    fn run(&mut self) -> Check {
        while let Some(item) = self.queue.pop() {
            if item.at > self.settle_until {
                if self.up && self.txs.is_empty() {
                    // Only far deadline timers of finished transactions are left: no-ops.
                    continue;
                }
                let live: Vec<String> = self.txs.keys().map(|&t| gid(t)).collect();
                return Err(self.violation(
                    "every transaction ends once faults stop",
                    format!("still running after the settle limit: {live:?}"),
                ));
            }
            self.now = item.at;
            self.stats.events += 1;
            self.step(item.ev)?;
        }
        self.check_end()
    }

    fn step(&mut self, ev: SimEv) -> Check {
        match ev {
            SimEv::Submit { tx, again, other } => self.submit(tx, again, other),
            SimEv::Deadline {
                epoch,
                tx,
                due,
                rearmed,
            } => self.deadline_timer(epoch, tx, due, rearmed),
            SimEv::ResolveRound { p } => self.resolve_round(p),
            SimEv::OutcomeAsk {
                p,
                tx,
                branches,
                wrong,
            } => {
                self.answer_inquiry(p, tx, branches, wrong);
                Ok(())
            }
            SimEv::OutcomeAnswer {
                p,
                tx,
                branches,
                outcome,
                known,
                log_id,
            } => self.apply_answer(p, tx, &branches, outcome, known, &log_id),
            SimEv::Retention => {
                self.retention();
                Ok(())
            }
            SimEv::WallJump => {
                let jump = if self.rng.gen_bool(0.2) {
                    WALL_JUMP_FAR_MS
                } else {
                    self.rng.gen_range(1..=WALL_JUMP_MAX_MS)
                };
                let jump = if self.rng.gen_bool(0.5) { -jump } else { jump };
                self.wall_offset += jump;
                if jump < 0 {
                    self.stats.wall_jumps_back += 1;
                }
                self.note(
                    Actor::Net,
                    What::Note(format!("wall clock jumps {jump:+} ms")),
                );
                Ok(())
            }
            SimEv::FsyncDone { epoch, tx, seq } => {
                if epoch != self.epoch {
                    return Ok(());
                }
                self.log.sync_now();
                self.durable_phases = None;
                // The write is on disk; the engine hears of it a moment later (a crash in
                // between leaves a durable record its process never acted on).
                let ev = Event::Durable { seq };
                let delay = self.rng.gen_range(0..=2);
                self.after(delay, SimEv::Timer { epoch, tx, ev });
                Ok(())
            }
            SimEv::Timer { epoch, tx, ev } => {
                if epoch != self.epoch {
                    return Ok(());
                }
                self.deliver(tx, ev)
            }
            SimEv::Request(req) => self.participant_receives(req),
            SimEv::Response(resp) => self.coordinator_receives(resp),
            SimEv::CallTimeout(req) => {
                if req.epoch != self.epoch || self.resolved.get(&req.call) == Some(&true) {
                    return Ok(());
                }
                self.resolved.insert(req.call, true);
                self.stats.timeouts += 1;
                self.note(
                    Actor::Coord,
                    What::Timeout {
                        tx: req.tx,
                        branch: req.branch,
                        op: req.op,
                        attempt: req.attempt,
                    },
                );
                let ev = Event::Reply {
                    branch: req.branch,
                    op: req.op,
                    attempt: req.attempt,
                    reply: Reply::Transient("deadline exceeded".into()),
                };
                self.deliver(req.tx, ev)
            }
            SimEv::CoordCrash => {
                if self.up && self.crashes < COORD_CRASHES_MAX {
                    self.crash_coordinator("random time");
                }
                Ok(())
            }
            SimEv::CoordRestart => self.restart_coordinator(),
            SimEv::PartCrash { p } => {
                self.crash_participant(p);
                Ok(())
            }
            SimEv::PartRestart { p } => {
                self.parts[p].up = true;
                self.note(Actor::Part(p), What::Up);
                Ok(())
            }
            SimEv::RetryNow { tx } => self.deliver(tx, Event::RetryNow),
            SimEv::FaultsEnd => {
                self.faults_on = false;
                self.note(Actor::Net, What::FaultsEnd);
                Ok(())
            }
        }
    }

    // -- client --------------------------------------------------------------------------------

    /// The wall clock the engine and the log see (the queue's time plus the jumps).
    fn wall(&self) -> u64 {
        (self.now as i64 + self.wall_offset).max(0) as u64
    }

    fn branches(&self, tx: usize, other: bool) -> Vec<BranchDef> {
        let d = &self.defs[tx];
        d.parts
            .iter()
            .enumerate()
            .map(|(b, p)| BranchDef {
                endpoint: format!("http://p{p}.sim:7000"),
                handler: "h".into(),
                payload: Bytes::from(format!("{}:{b}{}", d.gid, if other { ":v2" } else { "" })),
                compensation_payload: Bytes::from_static(b"undo"),
            })
            .collect()
    }

    /// A client's `Begin`, answered as the runtime does: through `decide_begin` over the live
    /// transaction, else the log's record, else its tombstone.
    fn submit(&mut self, tx: usize, again: bool, other: bool) -> Check {
        if !self.up {
            if !again {
                // The client cannot reach the coordinator; it tries again.
                self.note(Actor::Client, What::SubmitLater { tx });
                let ev = SimEv::Submit { tx, again, other };
                self.after(100, ev);
            }
            return Ok(());
        }
        let g = gid(tx);
        let mode = self.defs[tx].mode;
        let branches = self.branches(tx, other);
        let bug = self.setup.bug;
        let rec = ready(self.log.get(&g)).expect("the memory log decodes its records");
        let tomb = ready(self.log.get_tombstone(&g)).expect("tombstones read");
        let decision = if let Some(slot) = self.txs.get(&tx) {
            decide_begin(Known::Record(slot.tx.record()), mode, &branches)
        } else if let Some(rec) = &rec {
            decide_begin(Known::Record(rec), mode, &branches)
        } else if let (Some(t), false) = (&tomb, bug == Some(HarnessBug::BeginIgnoresTombstones)) {
            decide_begin(Known::Tombstone(t), mode, &branches)
        } else {
            decide_begin(Known::Nothing, mode, &branches)
        };
        let decision = match decision {
            BeginDecision::Conflict if bug == Some(HarnessBug::BeginIgnoresDefinition) => {
                match &tomb {
                    Some(t) if rec.is_none() && !self.txs.contains_key(&tx) => {
                        BeginDecision::Finished(t.outcome)
                    }
                    _ => BeginDecision::Existing,
                }
            }
            BeginDecision::Finished(_) if bug == Some(HarnessBug::BeginPresumesAbort) => {
                BeginDecision::Finished(Outcome::Aborted)
            }
            d => d,
        };
        if again {
            self.note(
                Actor::Client,
                What::Note(format!(
                    "resubmit {g}{}: {decision:?}",
                    if other {
                        " with another definition"
                    } else {
                        ""
                    }
                )),
            );
        }
        // What the gid already names, whatever variant the client sends now.
        let started_as = self.variant.get(&(self.gen, tx)).copied();
        let same = started_as.is_none_or(|v| v == other);
        match decision {
            BeginDecision::Start if again => self.stats.begin_restarted += 1,
            BeginDecision::Existing => self.stats.begin_existing += 1,
            BeginDecision::Finished(_) => self.stats.begin_finished += 1,
            BeginDecision::Conflict => self.stats.begin_conflict += 1,
            BeginDecision::Start => {}
        }
        match decision {
            BeginDecision::Start => {}
            BeginDecision::Existing | BeginDecision::Finished(_) if !same => {
                return Err(self.violation(
                    "another definition under a known gid is ALREADY_EXISTS",
                    format!("{g}: Begin with another definition answered {decision:?}"),
                ));
            }
            BeginDecision::Existing => return Ok(()),
            BeginDecision::Finished(outcome) => {
                let told = self.decided.get(&(self.gen, tx)).copied();
                let current = self.log.log_id().to_string();
                let truth = self.truth(&current, tx);
                if told.is_some_and(|t| t != outcome) || truth != outcome {
                    return Err(self.violation(
                        "a Begin answered Finished tells the logged outcome",
                        format!("{g}: answered {outcome:?}, told {told:?}, logged {truth:?}"),
                    ));
                }
                return Ok(());
            }
            BeginDecision::Conflict => {
                if same {
                    return Err(self.violation(
                        "the same definition is never ALREADY_EXISTS",
                        format!("{g}: Begin with its own definition answered Conflict"),
                    ));
                }
                return Ok(());
            }
        }
        // A gid names one transaction forever: nothing durable, no tombstone, no live one.
        if self.durable_phase(tx).is_some() || tomb.is_some() || self.txs.contains_key(&tx) {
            return Err(self.violation(
                "a gid names one transaction forever",
                format!("{g}: a second transaction started while the log knows the gid"),
            ));
        }
        self.variant.insert((self.gen, tx), other);
        let d = &self.defs[tx];
        let what = What::Submit {
            tx,
            mode: d.mode,
            parts: d.parts.clone(),
            deadline_in_ms: d.deadline_in_ms,
        };
        self.note(Actor::Client, what);
        let d = &self.defs[tx];
        let mut t = Tx::new(
            NewTx {
                gid: d.gid.clone(),
                mode: d.mode,
                branches,
                deadline_unix_ms: self.wall() + d.deadline_in_ms,
                retry: d.retry,
                trace_parent: None,
            },
            self.wall(),
        );
        t.set_mutations(self.setup.mutations);
        self.txs.insert(
            tx,
            Slot {
                tx: t,
                recovered: false,
            },
        );
        self.deliver(tx, Event::Start)
    }

    /// The runtime's deadline timer: armed for at most a day of monotonic time; when it fires
    /// before the wall clock reached the deadline (the clock was set back, or the deadline is
    /// days away), armed again.
    fn arm_deadline(&mut self, epoch: u64, tx: usize, due: u64, rearmed: bool) {
        let delay = deadline_step(self.wall(), due).map_or(0, |d| d.as_millis() as u64);
        let ev = SimEv::Deadline {
            epoch,
            tx,
            due,
            rearmed,
        };
        self.after(delay, ev);
    }

    fn deadline_timer(&mut self, epoch: u64, tx: usize, due: u64, rearmed: bool) -> Check {
        if epoch != self.epoch || !self.txs.contains_key(&tx) {
            return Ok(());
        }
        if deadline_step(self.wall(), due).is_some()
            && self.setup.bug != Some(HarnessBug::DeadlineNotRearmed)
        {
            self.stats.deadline_rearms += 1;
            self.arm_deadline(epoch, tx, due, true);
            return Ok(());
        }
        let active = self.txs[&tx].tx.record().phase == Phase::Active;
        if active && rearmed {
            self.stats.rearmed_deadlines_reached += 1;
        }
        if active && self.wall() < due {
            return Err(self.violation(
                "a deadline is acted on only once the wall clock reaches it",
                format!(
                    "{}: DeadlinePassed at wall {} before the deadline {}",
                    gid(tx),
                    self.wall().saturating_sub(T0),
                    due.saturating_sub(T0)
                ),
            ));
        }
        self.deliver(tx, Event::DeadlinePassed)
    }

    /// What a log says about `tx` for good: `Committed` once a `Committing` record (or a
    /// committed tombstone) is durable, else `Aborted` (what presumed abort makes of it).
    fn truth(&mut self, log_id: &str, tx: usize) -> Outcome {
        if log_id != self.log.log_id() {
            return self
                .wiped
                .get(log_id)
                .and_then(|m| m.get(&gid(tx)).copied())
                .unwrap_or(Outcome::Aborted);
        }
        let committed = matches!(
            self.durable_phase(tx),
            Some(Phase::Committing | Phase::Committed)
        ) || ready(self.log.get_tombstone(&gid(tx)))
            .expect("tombstones read")
            .is_some_and(|t| t.outcome == Outcome::Committed);
        if committed {
            Outcome::Committed
        } else {
            Outcome::Aborted
        }
    }

    /// Retention as the runtime runs it: finished records older than the horizon become
    /// tombstones, on the wall clock.
    fn retention(&mut self) {
        if !self.up {
            return;
        }
        let now = self.wall();
        let n = ready(
            self.log
                .collect_ended(now.saturating_sub(RETENTION_MS), now, 64),
        )
        .expect("the memory log collects");
        self.durable_phases = None;
        self.stats.tombstones += n as u64;
        self.note(
            Actor::Coord,
            What::Note(format!("retention: {n} finished records become tombstones")),
        );
    }

    // -- coordinator ---------------------------------------------------------------------------

    fn deliver(&mut self, tx: usize, ev: Event) -> Check {
        if !self.up {
            return Ok(());
        }
        let Some(slot) = self.txs.get_mut(&tx) else {
            return Ok(()); // finished, or never begun in this incarnation
        };
        let now = (self.now as i64 + self.wall_offset).max(0) as u64;
        let commands = slot.tx.handle(now, ev.clone());
        self.note(Actor::Coord, What::Engine { tx, ev });
        self.execute(tx, commands)
    }

    /// Carries out commands in order, as the runtime does. May crash between two of them.
    fn execute(&mut self, tx: usize, commands: Vec<Command>) -> Check {
        let epoch = self.epoch;
        for (i, cmd) in commands.into_iter().enumerate() {
            if i > 0
                && self.faults_on
                && self.crashes < COORD_CRASHES_MAX
                && self.rng.gen_bool(self.faults.crash_between_commands)
            {
                self.crash_coordinator("between two commands");
                return Ok(());
            }
            debug_assert_eq!(epoch, self.epoch);
            match cmd {
                Command::Persist { record, forced } => {
                    let seq = record.seq;
                    self.note(
                        Actor::Coord,
                        What::Persist {
                            tx,
                            phase: record.phase,
                            forced,
                            seq,
                        },
                    );
                    // Written now, durable only when the simulated fsync completes.
                    self.log
                        .put_sync(record, false)
                        .expect("the memory log accepts every engine record");
                    if forced {
                        let delay = if self.faults_on && self.rng.gen_bool(self.faults.fsync_stall)
                        {
                            self.rng
                                .gen_range(IN_DOUBT_AFTER_MS / 2..=3 * IN_DOUBT_AFTER_MS)
                        } else {
                            self.rng.gen_range(1..=self.faults.fsync_max_ms)
                        };
                        self.after(delay, SimEv::FsyncDone { epoch, tx, seq });
                    }
                }
                Command::Call {
                    branch,
                    op,
                    attempt,
                } => {
                    self.note(
                        Actor::Coord,
                        What::Call {
                            tx,
                            branch,
                            op,
                            attempt,
                        },
                    );
                    self.check_call(tx, branch, op)?;
                    self.next_call += 1;
                    let def = &self.txs[&tx].tx.record().branches[branch as usize].def;
                    let payload = match op {
                        Op::Compensate => def.compensation_payload.clone(),
                        _ => def.payload.clone(),
                    };
                    let req = Request {
                        epoch,
                        log_id: self.log.log_id().to_string(),
                        payload,
                        call: self.next_call,
                        tx,
                        branch,
                        op,
                        attempt,
                    };
                    self.after(CALL_TIMEOUT_MS, SimEv::CallTimeout(req.clone()));
                    self.send(SimEv::Request(req));
                }
                Command::ScheduleRetry {
                    branch,
                    op,
                    attempt,
                    backoff_bound_ms,
                } => {
                    let in_ms = self.rng.gen_range(0..=backoff_bound_ms);
                    self.note(
                        Actor::Coord,
                        What::Retry {
                            tx,
                            branch,
                            op,
                            attempt,
                            in_ms,
                        },
                    );
                    let ev = Event::RetryDue {
                        branch,
                        op,
                        attempt,
                    };
                    self.after(in_ms, SimEv::Timer { epoch, tx, ev });
                }
                Command::SetDeadline { at_unix_ms } => {
                    self.note(Actor::Coord, What::Deadline { tx, at: at_unix_ms });
                    self.arm_deadline(epoch, tx, at_unix_ms, false);
                }
                Command::Decided(outcome) => {
                    self.note(Actor::Coord, What::Decided { tx, outcome });
                    if outcome == Outcome::Pending {
                        return Err(self.violation(
                            "a decided outcome is final",
                            format!("{} decided Pending", gid(tx)),
                        ));
                    }
                    match self.decided.get(&(self.gen, tx)) {
                        Some(&first) if first != outcome => {
                            return Err(self.violation(
                                "an outcome once told never changes",
                                format!("{} told {first:?}, later {outcome:?}", gid(tx)),
                            ))
                        }
                        _ => {
                            self.decided.insert((self.gen, tx), outcome);
                        }
                    }
                }
                Command::Finished => {
                    self.note(Actor::Coord, What::Finished { tx });
                    self.txs.remove(&tx);
                }
            }
        }
        Ok(())
    }

    /// The durable phase of `tx`'s record: what a crash now would leave.
    fn durable_phase(&mut self, tx: usize) -> Option<Phase> {
        let log = &self.log;
        let durable = self.durable_phases.get_or_insert_with(|| {
            log.durable_snapshot()
                .into_iter()
                .map(|r| (r.gid, r.phase))
                .collect()
        });
        durable.get(&gid(tx)).copied()
    }

    /// Invariants on the calls the coordinator issues.
    fn check_call(&mut self, tx: usize, branch: u32, op: Op) -> Check {
        let mode = self.defs[tx].mode;
        let fits = match op {
            Op::Prepare | Op::Commit | Op::Abort => mode == Mode::TwoPhase,
            Op::Execute | Op::Compensate => mode == Mode::Saga,
        };
        if !fits {
            return Err(self.violation(
                "operations fit the protocol",
                format!("{op:?} sent for a {mode:?} transaction {}", gid(tx)),
            ));
        }
        match op {
            Op::Prepare | Op::Execute => {
                self.forward_sent.insert((self.gen, tx, branch));
            }
            Op::Commit if !self.setup.trust_commit_timing => {
                let phase = self.durable_phase(tx);
                if !matches!(phase, Some(Phase::Committing | Phase::Committed)) {
                    return Err(self.violation(
                        "no Commit before the decision is durable",
                        format!(
                            "Commit to {} b{branch} while the durable record is {phase:?}",
                            gid(tx)
                        ),
                    ));
                }
            }
            Op::Compensate => {
                let phase = self.durable_phase(tx);
                if phase != Some(Phase::Compensating) {
                    return Err(self.violation(
                        "no Compensate before the Compensating record is durable",
                        format!(
                            "Compensate to {} b{branch} while the durable record is {phase:?}",
                            gid(tx)
                        ),
                    ));
                }
                // A process that saw the whole forward run compensates only steps it sent;
                // one that recovered from the log may compensate any step that may have run.
                let recovered = self.txs.get(&tx).is_some_and(|s| s.recovered);
                if !recovered && !self.forward_sent.contains(&(self.gen, tx, branch)) {
                    return Err(self.violation(
                        "compensations only for steps that ran or may have run",
                        format!("Compensate {} b{branch}: no Execute was ever sent", gid(tx)),
                    ));
                }
            }
            Op::Abort | Op::Commit => {}
        }
        Ok(())
    }

    fn crash_coordinator(&mut self, why: &'static str) {
        let lost_writes = self.log.pending_writes();
        self.log.crash();
        self.durable_phases = None;
        self.up = false;
        self.epoch += 1;
        self.crashes += 1;
        self.stats.coord_crashes += 1;
        self.txs.clear();
        self.resolved.clear();
        self.note(Actor::Coord, What::Crash { why, lost_writes });
        let down_ms = self.rng.gen_range(1..=1_500);
        self.after(down_ms, SimEv::CoordRestart);
    }

    /// Restart as the runtime does: resume every non-terminal record in the log.
    fn restart_coordinator(&mut self) -> Check {
        self.up = true;
        if self.faults_on && !self.setup.no_wipes && self.rng.gen_bool(self.faults.wipe) {
            // The disk is lost or replaced: a fresh log, with a new identity. Keep what the old
            // one knew for good, to judge the branches it drove.
            let known: BTreeMap<String, Outcome> = self
                .log
                .durable_snapshot()
                .into_iter()
                .map(|r| {
                    let committed = matches!(r.phase, Phase::Committing | Phase::Committed);
                    let o = if committed {
                        Outcome::Committed
                    } else {
                        Outcome::Aborted
                    };
                    (r.gid, o)
                })
                .chain((0..self.defs.len()).filter_map(|tx| {
                    let t = ready(self.log.get_tombstone(&gid(tx))).ok()??;
                    Some((t.gid, t.outcome))
                }))
                .collect();
            let old = std::mem::take(&mut self.log);
            self.wiped.insert(old.log_id().to_string(), known);
            self.wiped_order.push(old.log_id().to_string());
            self.gen += 1;
            self.stats.wipes += 1;
            self.durable_phases = None;
            self.note(
                Actor::Coord,
                // Log ids are random UUIDs: the trace names generations, to replay alike.
                What::Note(format!(
                    "LOG WIPED: generation {} starts with a fresh log id",
                    self.gen
                )),
            );
        }
        let records = ready(self.log.scan_active(None, usize::MAX))
            .expect("every record in the memory log decodes");
        self.note(
            Actor::Coord,
            What::Restart {
                recovered: records.len(),
            },
        );
        self.stats.recovered_txs += records.len() as u64;
        let mut order = Vec::new();
        for rec in records {
            let tx: usize = rec.gid[1..].parse().expect("gids are g<index>");
            let mut t = Tx::recover(rec);
            t.set_mutations(self.setup.mutations);
            self.txs.insert(
                tx,
                Slot {
                    tx: t,
                    recovered: true,
                },
            );
            order.push(tx);
        }
        let epoch = self.epoch;
        for tx in order {
            if self.epoch != epoch {
                break; // crashed again while recovering
            }
            self.deliver(tx, Event::Recovered)?;
        }
        Ok(())
    }

    fn coordinator_receives(&mut self, resp: Response) -> Check {
        let req = resp.req;
        if !self.up || req.epoch != self.epoch {
            self.note(
                Actor::Coord,
                What::Dropped {
                    tx: req.tx,
                    branch: req.branch,
                    op: req.op,
                    attempt: req.attempt,
                },
            );
            return Ok(());
        }
        if self.resolved.insert(req.call, true) == Some(true) {
            // After its timeout, or a duplicate: the engine must shrug it off.
            self.stats.late_replies += 1;
        }
        let ev = Event::Reply {
            branch: req.branch,
            op: req.op,
            attempt: req.attempt,
            reply: resp.reply,
        };
        self.deliver(req.tx, ev)
    }

    // -- network -------------------------------------------------------------------------------

    fn send(&mut self, ev: SimEv) {
        let (to, req) = match &ev {
            SimEv::Request(r) => ("call", r),
            SimEv::Response(r) => ("reply", &r.req),
            _ => unreachable!("only messages travel"),
        };
        let (tx, branch, op, attempt) = (req.tx, req.branch, req.op, req.attempt);
        if self.faults_on && self.rng.gen_bool(self.faults.loss) {
            self.stats.lost += 1;
            self.note(
                Actor::Net,
                What::Lost {
                    to,
                    tx,
                    branch,
                    op,
                    attempt,
                },
            );
            return;
        }
        let copies = if self.faults_on && self.rng.gen_bool(self.faults.dup) {
            self.stats.duplicated += 1;
            self.note(
                Actor::Net,
                What::Duplicated {
                    to,
                    tx,
                    branch,
                    op,
                    attempt,
                },
            );
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.faults_on && self.rng.gen_bool(self.faults.slow) {
                self.rng.gen_range(CALL_TIMEOUT_MS..=4 * CALL_TIMEOUT_MS)
            } else {
                self.rng.gen_range(1..=self.faults.delay_max_ms)
            };
            self.after(delay, ev.clone());
        }
    }

    // -- participants --------------------------------------------------------------------------

    fn crash_participant(&mut self, p: usize) {
        if !self.parts[p].up {
            return;
        }
        self.parts[p].up = false;
        self.stats.part_crashes += 1;
        self.note(Actor::Part(p), What::Down);
        let down_ms = self.rng.gen_range(1..=2_000);
        self.after(down_ms, SimEv::PartRestart { p });
    }

    fn participant_receives(&mut self, req: Request) -> Check {
        let p = self.defs[req.tx].parts[req.branch as usize];
        let reply = if !self.parts[p].up {
            // Connection refused: the caller sees UNAVAILABLE.
            self.note(
                Actor::Part(p),
                What::Unavailable {
                    tx: req.tx,
                    branch: req.branch,
                    op: req.op,
                },
            );
            Reply::Transient("unavailable".into())
        } else if self.faults_on && self.rng.gen_bool(self.faults.retry_answer) {
            // The SDK answers RETRY before the barrier runs (e.g. a lock timeout).
            Reply::Transient("RETRY".into())
        } else if self.setup.stall && p == 0 && matches!(req.op, Op::Prepare | Op::Execute) {
            Reply::Transient("RETRY: lock wait".into())
        } else {
            let (tx, b, op) = (req.tx, req.branch, req.op);
            let reply = self.barrier(p, tx, b, op, &req.payload, &req.log_id)?;
            if self.faults_on && self.rng.gen_bool(self.faults.part_crash_after_apply) {
                // Applied and committed locally, then died before answering.
                self.crash_participant(p);
                return Ok(());
            }
            reply
        };
        self.send(SimEv::Response(Response { req, reply }));
        Ok(())
    }

    fn rows(&self, tx: usize, b: u32) -> Option<&Rows> {
        let p = self.defs[tx].parts[b as usize];
        self.parts[p].barrier.get(&(tx, b))
    }

    /// The row of `op`, if written.
    fn row(&self, tx: usize, b: u32, op: Op) -> Option<&Recorded> {
        let op = sdk_op(op);
        self.rows(tx, b)
            .and_then(|rows| rows.iter().rev().find(|r| r.op == op))
    }

    fn answered(&self, tx: usize, b: u32, op: Op, answer: Answer) -> bool {
        self.row(tx, b, op).is_some_and(|r| r.answer == answer)
    }

    /// One delivery through the SDK's own rules (`rules::plan`, then `settle`), in front of a
    /// business closure that answers at random. Returns the answer for the coordinator;
    /// records business effects for the checks.
    fn barrier(
        &mut self,
        p: usize,
        tx: usize,
        b: u32,
        op: Op,
        payload: &[u8],
        log_id: &str,
    ) -> Result<Reply, Violation> {
        let g = gid(tx);
        let rows = self.parts[p]
            .barrier
            .get(&(tx, b))
            .cloned()
            .unwrap_or_default();
        let delivery = Delivery::new(sdk_op(op), "h", payload, log_id, true);
        let plan = rules::plan(&rows, &delivery);
        let refusal = match (&plan.business, op) {
            (Business::Run { .. }, Op::Prepare) if self.rng.gen_bool(self.faults.refuse) => {
                Some("insufficient funds")
            }
            (Business::Run { .. }, Op::Execute) if self.rng.gen_bool(self.faults.fail) => {
                Some("no seats left")
            }
            _ => None,
        };
        let effect = matches!(plan.business, Business::Run { .. });
        if effect && op == Op::Compensate {
            // Reverse order: every later step of this log's run that may have applied is
            // undone already.
            let gen = self.gen_of(log_id);
            let n = self.defs[tx].parts.len() as u32;
            for later in b + 1..n {
                let failed = self.answered(tx, later, Op::Execute, Answer::Failed);
                let applied_or_may = self.forward_sent.contains(&(gen, tx, later)) && !failed;
                if applied_or_may && self.row(tx, later, Op::Compensate).is_none() {
                    return Err(self.violation(
                        "saga compensations in reverse order",
                        format!(
                            "{g}: compensating b{b} while b{later} (Execute sent, row {:?}) is \
                             not compensated",
                            self.row(tx, later, Op::Execute)
                        ),
                    ));
                }
            }
        }
        let undone =
            self.row(tx, b, Op::Abort).is_some() || self.row(tx, b, Op::Compensate).is_some();
        if effect && matches!(op, Op::Prepare | Op::Execute) && undone {
            return Err(self.violation(
                "no step or prepare applied after its compensation or abort",
                format!("{g} b{b}: {op:?} ran its business code after the undo"),
            ));
        }
        let settled = plan.settle(refusal);
        let dup = plan.rule == Rule::Repeat;
        match plan.rule {
            Rule::NullCancel => self.stats.rule_null_cancel += 1,
            Rule::Cancelled => self.stats.rule_cancelled += 1,
            Rule::Reused => self.stats.rule_reused += 1,
            Rule::Foreign => self.stats.rule_foreign += 1,
            _ => {}
        }
        let reply = match &settled.reply {
            rules::Reply::Answer { answer, message } => match answer {
                Answer::Prepared => Reply::Prepared,
                Answer::Refused => Reply::Refused(message.clone()),
                Answer::Succeeded => Reply::Succeeded,
                Answer::Failed => Reply::Failed(message.clone()),
                Answer::Done => Reply::Done,
            },
            rules::Reply::Retry(m) => Reply::Transient(format!("RETRY: {m}")),
            rules::Reply::Violation(m) => {
                let invariant = match plan.rule {
                    Rule::Contradiction => "no branch both committed and aborted",
                    _ => "Commit only for a prepared branch",
                };
                return Err(self.violation(
                    invariant,
                    format!("{g} b{b}: {op:?} from log gen {}: {m}", self.gen_of(log_id)),
                ));
            }
        };
        // A decision applied here must be the one the log that prepared the branch made.
        if matches!(op, Op::Commit | Op::Abort) && !settled.writes.is_empty() {
            let stored = self
                .row(tx, b, Op::Prepare)
                .map(|r| r.log_id.clone())
                .unwrap_or_default();
            if !stored.is_empty()
                && self
                    .row(tx, b, Op::Prepare)
                    .is_some_and(|r| r.answer == Answer::Prepared)
            {
                let truth = self.truth(&stored, tx);
                let against = match op {
                    Op::Abort => truth == Outcome::Committed,
                    _ => truth != Outcome::Committed && !self.setup.trust_commit_timing,
                };
                if against {
                    return Err(self.violation(
                        "no participant decides a branch against its coordinator",
                        format!(
                            "{g} b{b}: {op:?} applied while the log that prepared it (gen {}) \
                             says {truth:?}",
                            self.gen_of(&stored)
                        ),
                    ));
                }
            }
        }
        let part = &mut self.parts[p];
        let entry = part.barrier.entry((tx, b)).or_default();
        for w in &settled.writes {
            entry.push(w.recorded(log_id));
        }
        match settled.in_doubt {
            InDoubt::Open => {
                part.open
                    .insert((tx, b), (self.now, Bytes::copy_from_slice(payload)));
            }
            InDoubt::Close => {
                part.open.remove(&(tx, b));
            }
            InDoubt::Unchanged => {}
        }
        // Business code that refused was rolled back: only a success is an effect.
        let effect = effect && refusal.is_none();
        // The coordinator gets the message with log ids named too (it only keeps it as the
        // branch's last error), so that its trace lines replay alike as well.
        let reply = self.redact(&reply);
        self.note(
            Actor::Part(p),
            What::Apply {
                tx,
                branch: b,
                op,
                reply: reply.clone(),
                effect,
                dup,
            },
        );
        if effect {
            let count = &mut self.effects.entry((tx, b)).or_default()[op_idx(op)];
            *count += 1;
            if *count > 1 {
                let count = *count;
                return Err(self.violation(
                    "each participant effect applied at most once",
                    format!("{g} b{b} {op:?} applied {count} times"),
                ));
            }
        }
        if matches!(op, Op::Commit | Op::Abort) {
            self.check_atomic_2pc(tx)?;
        }
        Ok(reply)
    }

    /// `reply` with the log ids in its message named by generation: log ids are random UUIDs
    /// (`MemoryLog::new`), and a seed's trace must read the same on every replay.
    fn redact(&self, reply: &Reply) -> Reply {
        let name = |m: &String| {
            if !m.contains('-') {
                return m.clone();
            }
            let mut m = m.replace(self.log.log_id(), &format!("<log gen {}>", self.gen));
            for (i, id) in self.wiped_order.iter().enumerate() {
                m = m.replace(id.as_str(), &format!("<log gen {i}>"));
            }
            m.replace(self.other.log_id(), "<other log>")
        };
        match reply {
            Reply::Refused(m) => Reply::Refused(name(m)),
            Reply::Failed(m) => Reply::Failed(name(m)),
            Reply::Transient(m) => Reply::Transient(name(m)),
            r => r.clone(),
        }
    }

    /// The log generation a log id belongs to (for traces and per-generation bookkeeping).
    fn gen_of(&self, log_id: &str) -> u32 {
        if log_id == self.log.log_id() {
            return self.gen;
        }
        // Wiped logs, in order: generation = how many were wiped before it. Few, so a scan.
        self.wiped_order
            .iter()
            .position(|l| l == log_id)
            .map_or(u32::MAX, |i| i as u32)
    }

    fn check_atomic_2pc(&self, tx: usize) -> Check {
        let n = self.defs[tx].parts.len() as u32;
        let committed: Vec<u32> = (0..n)
            .filter(|&b| self.row(tx, b, Op::Commit).is_some())
            .collect();
        let aborted: Vec<u32> = (0..n)
            .filter(|&b| {
                self.answered(tx, b, Op::Prepare, Answer::Prepared)
                    && self.row(tx, b, Op::Abort).is_some()
            })
            .collect();
        if !committed.is_empty() && !aborted.is_empty() {
            return Err(self.violation(
                "no 2PC branch committed while another aborted",
                format!("{}: committed {committed:?}, aborted {aborted:?}", gid(tx)),
            ));
        }
        Ok(())
    }

    // -- in-doubt resolvers (the SDK's `resolve_in_doubt`) -------------------------------------

    /// One round at `p`: every branch prepared here more than `IN_DOUBT_AFTER_MS` ago and still
    /// open asks `Outcome` of the coordinator its row names (sometimes, misconfigured, of
    /// another one).
    fn resolve_round(&mut self, p: usize) -> Check {
        if self.now > T0 + FAULT_WINDOW_MS + LATE_HORIZON_MS {
            return Ok(());
        }
        self.after(RESOLVE_PERIOD_MS, SimEv::ResolveRound { p });
        if !self.parts[p].up {
            return Ok(());
        }
        let due: Vec<(usize, u32)> = self.parts[p]
            .open
            .iter()
            .filter(|(_, (at, _))| at + IN_DOUBT_AFTER_MS <= self.now)
            .map(|(&k, _)| k)
            .collect();
        // One question per gid per round, as the SDK asks.
        let mut asked: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for (tx, b) in due {
            asked.entry(tx).or_default().push(b);
        }
        for (tx, branches) in asked {
            let wrong = self.rng.gen_bool(self.faults.ask_wrong) && !self.setup.no_wrong_asks;
            let delay = self.rng.gen_range(1..=self.faults.delay_max_ms);
            let ev = SimEv::OutcomeAsk {
                p,
                tx,
                branches,
                wrong,
            };
            self.after(delay, ev);
        }
        Ok(())
    }

    /// The coordinator answers `Outcome` as the runtime does: the live transaction (pending
    /// until `Begun` is durable, then its visible phase), else the log's record, else its
    /// tombstone, else presumed abort; always through `answer_outcome`, with its log id.
    fn answer_inquiry(&mut self, p: usize, tx: usize, branches: Vec<u32>, wrong: bool) {
        let (outcome, known, log_id) = if wrong {
            let (o, k) = answer_outcome(Known::Nothing);
            (o, k, self.other.log_id().to_string())
        } else {
            if !self.up {
                return; // unanswered: the next round asks again
            }
            let g = gid(tx);
            let (o, k) = if let Some(slot) = self.txs.get(&tx) {
                if slot.tx.begun_durable() {
                    let mut rec = slot.tx.record().clone();
                    if self.setup.bug != Some(HarnessBug::OutcomeBeforeDurable) {
                        rec.phase = slot.tx.visible_phase();
                    }
                    answer_outcome(Known::Record(&rec))
                } else {
                    (Outcome::Pending, true)
                }
            } else if let Some(rec) = ready(self.log.get(&g)).expect("records decode") {
                answer_outcome(Known::Record(&rec))
            } else if let Some(t) = ready(self.log.get_tombstone(&g)).expect("tombstones read") {
                answer_outcome(Known::Tombstone(&t))
            } else {
                answer_outcome(Known::Nothing)
            };
            (o, k, self.log.log_id().to_string())
        };
        self.note(
            Actor::Coord,
            What::Note(format!(
                "Outcome({}) asked by p{p}{}: {outcome:?} known={known}",
                gid(tx),
                if wrong { " of ANOTHER coordinator" } else { "" }
            )),
        );
        if self.faults_on && self.rng.gen_bool(self.faults.loss) {
            return;
        }
        let delay = self.rng.gen_range(1..=self.faults.delay_max_ms);
        let ev = SimEv::OutcomeAnswer {
            p,
            tx,
            branches,
            outcome,
            known,
            log_id,
        };
        self.after(delay, ev);
    }

    /// The resolver applies an answer to each branch it asked about that is still open at
    /// `p`: only from
    /// the log stored with the branch (the SDK's rule), as a replayed commit or abort through
    /// the barrier.
    fn apply_answer(
        &mut self,
        p: usize,
        tx: usize,
        branches: &[u32],
        outcome: Outcome,
        known: bool,
        answered: &str,
    ) -> Check {
        if !self.parts[p].up {
            return Ok(());
        }
        let open: Vec<(u32, Bytes)> = self.parts[p]
            .open
            .iter()
            .filter(|(k, _)| k.0 == tx && branches.contains(&k.1))
            .map(|(k, (_, payload))| (k.1, payload.clone()))
            .collect();
        for (b, payload) in open {
            let stored = self
                .row(tx, b, Op::Prepare)
                .map(|r| r.log_id.clone())
                .unwrap_or_default();
            let op = if self.setup.bug == Some(HarnessBug::ResolverTrustsAnyLog) {
                resolver_decides(answered, outcome, known, answered)
            } else {
                resolver_decides(&stored, outcome, known, answered)
            };
            let Some(op) = op else {
                if outcome != Outcome::Pending {
                    self.stats.wrong_log_answers += 1;
                }
                continue;
            };
            match op {
                Op::Commit => self.stats.resolved_commit += 1,
                _ if known => self.stats.resolved_abort += 1,
                _ => {
                    self.stats.resolved_abort += 1;
                    self.stats.resolved_presumed += 1;
                }
            }
            self.note(
                Actor::Part(p),
                What::Note(format!("resolver: {} b{b} {op:?} (replayed)", gid(tx))),
            );
            self.barrier(p, tx, b, op, &payload, &stored)?;
        }
        Ok(())
    }

    // -- the end -------------------------------------------------------------------------------

    fn check_end(&mut self) -> Check {
        if !self.up {
            return Err(self.violation("the coordinator is up at the end", String::new()));
        }
        if let Some((&tx, _)) = self.txs.iter().next() {
            return Err(self.violation(
                "every transaction ends once faults stop",
                format!("{} is still live with nothing left to happen", gid(tx)),
            ));
        }
        for tx in 0..self.defs.len() {
            self.check_end_of(tx)?;
        }
        self.stats.left_in_doubt = self.parts.iter().map(|p| p.open.len() as u64).sum();
        Ok(())
    }

    fn check_end_of(&mut self, tx: usize) -> Check {
        let g = gid(tx);
        let d = &self.defs[tx];
        let n = d.parts.len() as u32;
        let mode = d.mode;
        let current = self.log.log_id().to_string();
        // A branch belongs to the log named in its forward row (or, with none, to the current
        // log). Branches a wiped log drove are judged against what that log knew for good:
        // never decided against it; they may stay in doubt (loudly, in the SDK) for good.
        let mut mine = Vec::new();
        for b in 0..n {
            let fwd = match mode {
                Mode::TwoPhase => Op::Prepare,
                Mode::Saga => Op::Execute,
            };
            let owner = self
                .row(tx, b, fwd)
                .map(|r| r.log_id.clone())
                .filter(|l| !l.is_empty())
                .unwrap_or_else(|| current.clone());
            if owner == current {
                mine.push(b);
                continue;
            }
            if mode == Mode::TwoPhase && self.answered(tx, b, Op::Prepare, Answer::Prepared) {
                let truth = self.truth(&owner, tx);
                let bad = match truth {
                    Outcome::Committed => self.row(tx, b, Op::Abort).is_some(),
                    _ => self.row(tx, b, Op::Commit).is_some(),
                };
                if bad {
                    return Err(self.violation(
                        "no participant decides a branch against its coordinator",
                        format!(
                            "{g} b{b}: wiped log (gen {}) says {truth:?}, rows {:?}",
                            self.gen_of(&owner),
                            self.rows(tx, b)
                        ),
                    ));
                }
            }
        }
        let rec = ready(self.log.get(&g)).expect("the memory log decodes its own records");
        let tomb = ready(self.log.get_tombstone(&g)).expect("tombstones read");
        let outcome = match (&rec, &tomb) {
            (Some(rec), _) => {
                if !rec.phase.is_terminal() {
                    return Err(self.violation(
                        "every transaction terminal in the log",
                        format!("{g} ends in phase {:?}", rec.phase),
                    ));
                }
                rec.outcome()
            }
            (None, Some(t)) => t.outcome,
            (None, None) => {
                // `Begun` never became durable in this log: nothing of it may have run.
                if let Some(&b) = mine.iter().find(|&&b| {
                    self.rows(tx, b)
                        .is_some_and(|r| r.iter().any(|r| r.log_id == current))
                }) {
                    return Err(self.violation(
                        "nothing runs before Begun is durable",
                        format!("{g} is not in the log but b{b} saw calls"),
                    ));
                }
                if let Some(o) = self.decided.get(&(self.gen, tx)) {
                    return Err(self.violation(
                        "nothing is decided before Begun is durable",
                        format!("{g} is not in the log but was decided {o:?}"),
                    ));
                }
                self.stats.never_begun += 1;
                return Ok(());
            }
        };
        // Nothing told is fine: a terminal record made durable by another write's flush just
        // before a crash is not recovered, and `Get` reports it from the log.
        if let Some(&told) = self.decided.get(&(self.gen, tx)).filter(|&&o| o != outcome) {
            return Err(self.violation(
                "the outcome told is the outcome logged",
                format!("{g} logged {outcome:?}, told {told:?}"),
            ));
        }
        let mut bad = Vec::new();
        for &b in &mine {
            let has = |op: Op| self.row(tx, b, op).is_some();
            let ok = match (mode, outcome) {
                (Mode::TwoPhase, Outcome::Committed) => has(Op::Commit) && !has(Op::Abort),
                // Nothing committed, and every prepared branch released.
                (Mode::TwoPhase, _) => {
                    !has(Op::Commit)
                        && (!self.answered(tx, b, Op::Prepare, Answer::Prepared) || has(Op::Abort))
                }
                (Mode::Saga, Outcome::Committed) => {
                    self.answered(tx, b, Op::Execute, Answer::Succeeded) && !has(Op::Compensate)
                }
                (Mode::Saga, _) => {
                    !self.answered(tx, b, Op::Execute, Answer::Succeeded) || has(Op::Compensate)
                }
            };
            if !ok {
                bad.push(format!("b{b}: {:?}", self.rows(tx, b)));
            }
        }
        if !bad.is_empty() {
            let invariant = match (mode, outcome) {
                (Mode::TwoPhase, Outcome::Committed) => "2PC committed: every branch committed",
                (Mode::TwoPhase, _) => {
                    "2PC aborted: no branch committed, every prepared one aborted"
                }
                (Mode::Saga, Outcome::Committed) => {
                    "saga committed: every step ran, none compensated"
                }
                (Mode::Saga, _) => "saga aborted: every step that ran is compensated",
            };
            return Err(self.violation(invariant, format!("{g}: rows {}", bad.join("; "))));
        }
        match (mode, outcome) {
            (Mode::TwoPhase, Outcome::Committed) => self.stats.committed_2pc += 1,
            (Mode::TwoPhase, _) => self.stats.aborted_2pc += 1,
            (Mode::Saga, Outcome::Committed) => self.stats.committed_saga += 1,
            (Mode::Saga, _) => self.stats.aborted_saga += 1,
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Running seeds.

/// The result of one seed: the violation if any (an engine panic counts as one), the trace
/// and what happened.
struct RunResult {
    violation: Option<Violation>,
    trace: Vec<Line>,
    stats: Stats,
}

fn run_seed(seed: u64, setup: Setup) -> RunResult {
    let mut sim = Sim::new(seed, setup);
    // An engine assert is a finding too: report it with its seed and trace.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    let violation = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(v)) => Some(v),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Some(Violation {
                at: sim.now,
                invariant: "the engine does not panic",
                detail: msg,
            })
        }
    };
    RunResult {
        violation,
        trace: sim.trace,
        stats: sim.stats,
    }
}

fn render_trace(trace: &[Line]) -> String {
    let mut s = String::new();
    for line in trace {
        let _ = writeln!(s, "{line}");
    }
    s
}

/// Runs seeds `0..n` on every core; returns the lowest failing seed (with its result) and the
/// summed stats of the seeds run.
fn campaign(n: u64, setup: Setup) -> (Option<(u64, RunResult)>, Stats) {
    let next = AtomicU64::new(0);
    let stop_at = AtomicU64::new(u64::MAX);
    let found: Mutex<Option<(u64, RunResult)>> = Mutex::new(None);
    let total = Mutex::new(Stats::default());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut mine = Stats::default();
                loop {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    // Seeds are taken in order, so every seed below the first failure found
                    // is still run: the failure reported is the lowest.
                    if seed >= n || seed > stop_at.load(Ordering::SeqCst) {
                        break;
                    }
                    let r = run_seed(seed, setup);
                    mine.add(&r.stats);
                    if r.violation.is_some() {
                        stop_at.fetch_min(seed, Ordering::SeqCst);
                        let mut f = found.lock().unwrap_or_else(|p| p.into_inner());
                        if f.as_ref().is_none_or(|(s, _)| seed < *s) {
                            *f = Some((seed, r));
                        }
                    }
                }
                total.lock().unwrap_or_else(|p| p.into_inner()).add(&mine);
            });
        }
    });
    (
        found.into_inner().unwrap_or_else(|p| p.into_inner()),
        total.into_inner().unwrap_or_else(|p| p.into_inner()),
    )
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// Bypasses the test harness's output capture, so the replay trace shows without --nocapture.
fn print_uncaptured(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

fn failure_report(seed: u64, r: &RunResult) -> String {
    let v = r.violation.as_ref().expect("a failure has a violation");
    let tail = &r.trace[r.trace.len().saturating_sub(TRACE_TAIL)..];
    format!(
        "simulation seed {seed} failed: {v}\n\nlast {} trace lines (time ms, actor, event):\n{}\n\
         replay with: TREATY_SIM_SEED={seed} cargo test -p treaty-coordinator --test simulation",
        tail.len(),
        render_trace(tail)
    )
}

#[test]
fn simulation() {
    if let Some(seed) = env_u64("TREATY_SIM_SEED") {
        let setup = Setup {
            bug: HarnessBug::from_env(),
            ..Setup::default()
        };
        let r = run_seed(seed, setup);
        print_uncaptured(&format!(
            "seed {seed} ({:?}): {:?}\n   time actor  event\n{}",
            setup.bug,
            Sim::new(seed, setup).faults,
            render_trace(&r.trace)
        ));
        if r.violation.is_some() {
            panic!("{}", failure_report(seed, &r));
        }
        print_uncaptured(&format!("seed {seed}: every invariant holds\n"));
        return;
    }
    let n = env_u64("TREATY_SIM_SEEDS").unwrap_or(CI_SEEDS);
    let started = std::time::Instant::now();
    let (failure, stats) = campaign(n, Setup::default());
    if let Some((seed, r)) = failure {
        panic!("{}", failure_report(seed, &r));
    }
    // Printed past the capture: CI logs show how long the seeds took.
    print_uncaptured(&format!(
        "simulation: {n} seeds in {:.1?}, every invariant held; {stats:?}\n",
        started.elapsed()
    ));
    // The campaign is only worth something if it reached every outcome and every fault.
    if n >= 200 {
        for (what, count) in [
            ("2PC commits", stats.committed_2pc),
            ("2PC aborts", stats.aborted_2pc),
            ("saga commits", stats.committed_saga),
            ("saga aborts", stats.aborted_saga),
            ("coordinator crashes", stats.coord_crashes),
            ("recovered transactions", stats.recovered_txs),
            ("participant crashes", stats.part_crashes),
            ("lost messages", stats.lost),
            ("duplicated messages", stats.duplicated),
            ("timeouts", stats.timeouts),
            ("late or duplicate replies", stats.late_replies),
            ("in-doubt commits by the resolver", stats.resolved_commit),
            ("in-doubt aborts by the resolver", stats.resolved_abort),
            (
                "answers refused as from another log",
                stats.wrong_log_answers,
            ),
            ("log wipes", stats.wipes),
            ("branches left in doubt by a wipe", stats.left_in_doubt),
            ("resubmissions answered Existing", stats.begin_existing),
            ("resubmissions answered Finished", stats.begin_finished),
            ("resubmissions answered Conflict", stats.begin_conflict),
            ("tombstones", stats.tombstones),
            ("wall clock set back", stats.wall_jumps_back),
            ("deadline timers re-armed", stats.deadline_rearms),
            (
                "deadlines reached by re-armed timers",
                stats.rearmed_deadlines_reached,
            ),
            ("null compensations", stats.rule_null_cancel),
            (
                "forward deliveries refused after their cancel",
                stats.rule_cancelled,
            ),
        ] {
            assert!(count > 0, "the campaign never produced {what}: {stats:?}");
        }
    }
}

#[test]
fn the_same_seed_replays_the_same_run() {
    // Seed 18949 wipes its log and sees a reused gid refused, whose message names log ids.
    for seed in [7, 18949] {
        let a = run_seed(seed, Setup::default());
        let b = run_seed(seed, Setup::default());
        assert_eq!(
            render_trace(&a.trace),
            render_trace(&b.trace),
            "seed {seed}"
        );
        assert!(a.trace.len() > 10, "seed {seed} does something");
    }
}

// ---------------------------------------------------------------------------------------------
// Show that it bites: each deliberate engine bug is caught within the CI seed budget.

/// Runs the CI seed budget with `setup` and asserts a seed fails on an invariant of the
/// harness (an engine assert does not count); returns the seed and the invariant.
fn assert_caught(name: &str, setup: Setup) -> (u64, &'static str) {
    let (failure, _) = campaign(CI_SEEDS, setup);
    let Some((seed, r)) = failure else {
        panic!("mutation {name} survived {CI_SEEDS} seeds: the simulation does not catch it");
    };
    let v = r.violation.as_ref().expect("a failure has a violation");
    eprintln!("mutation {name}: caught by seed {seed}: {v}");
    assert_ne!(
        v.invariant, "the engine does not panic",
        "mutation {name} must be caught by an invariant of the harness, not an engine assert"
    );
    (seed, v.invariant)
}

fn mutated(m: impl FnOnce(&mut Mutations)) -> Setup {
    let mut setup = Setup::default();
    m(&mut setup.mutations);
    setup
}

#[test]
fn mutation_commit_before_durable_is_caught() {
    let setup = mutated(|m| m.commit_before_durable = true);
    let (_, invariant) = assert_caught("commit_before_durable", setup);
    assert_eq!(invariant, "no Commit before the decision is durable");
    // Without that direct check, a crash that loses the decision still shows: as an outcome
    // told and then changed, or as mixed effects at the participants.
    let (_, invariant) = assert_caught(
        "commit_before_durable (participant effects only)",
        Setup {
            trust_commit_timing: true,
            ..setup
        },
    );
    assert_ne!(invariant, "no Commit before the decision is durable");
}

#[test]
fn mutation_skip_one_compensation_is_caught() {
    let setup = mutated(|m| m.skip_one_compensation = true);
    assert_caught("skip_one_compensation", setup);
}

#[test]
fn mutation_forget_branch_on_recovery_is_caught() {
    let setup = mutated(|m| m.forget_branch_on_recovery = true);
    assert_caught("forget_branch_on_recovery", setup);
}

// ---------------------------------------------------------------------------------------------
// Show that the new checks bite: each deliberate bug of the harness's stand-ins for the SDK's
// resolver and the runtime's `Begin` and timers is caught within a few hundred seeds.

/// Deadlines days away, past the runtime's longest timer and across wall-clock jumps either
/// way, are still reached: every transaction stalled on participant 0 ends by its deadline.
#[test]
fn far_deadlines_are_reached_by_rearmed_timers() {
    let setup = Setup {
        stall: true,
        ..Setup::default()
    };
    let (failure, stats) = campaign(200, setup);
    if let Some((seed, r)) = failure {
        panic!("{}", failure_report(seed, &r));
    }
    eprintln!("stalled participant: {stats:?}");
    assert!(stats.rearmed_deadlines_reached > 0, "{stats:?}");
    assert!(stats.aborted_2pc > 0 && stats.aborted_saga > 0, "{stats:?}");
}

/// Seeds a harness bug gets to show up in.
const BUG_SEEDS: u64 = 500;

/// Runs `BUG_SEEDS` seeds with `setup` and returns the violated invariant of the lowest
/// failing seed; panics if none fails.
fn caught_by(name: &str, setup: Setup) -> &'static str {
    caught_within(BUG_SEEDS, name, setup)
}

fn caught_within(seeds: u64, name: &str, setup: Setup) -> &'static str {
    let (failure, _) = campaign(seeds, setup);
    let Some((seed, r)) = failure else {
        panic!("harness bug {name} survived {seeds} seeds: the simulation does not catch it");
    };
    let v = r.violation.as_ref().expect("a failure has a violation");
    eprintln!("harness bug {name}: caught by seed {seed}: {v}");
    v.invariant
}

fn with_bug(bug: HarnessBug) -> Setup {
    Setup {
        bug: Some(bug),
        ..Setup::default()
    }
}

/// The invariants a participant deciding against its coordinator can break, first to last.
const DECIDED_AGAINST: [&str; 4] = [
    "no participant decides a branch against its coordinator",
    "no branch both committed and aborted",
    "no 2PC branch committed while another aborted",
    "2PC committed: every branch committed",
];

#[test]
fn bug_resolver_trusting_another_coordinator_is_caught() {
    // No wipes: only the second coordinator answers for another log.
    let setup = Setup {
        no_wipes: true,
        ..with_bug(HarnessBug::ResolverTrustsAnyLog)
    };
    let invariant = caught_by("resolver-trusts-any-log (another coordinator asked)", setup);
    assert!(DECIDED_AGAINST.contains(&invariant), "{invariant}");
}

#[test]
fn bug_resolver_trusting_a_wiped_log_is_caught() {
    // Only wiped logs answer for another log here: the same bug, caught through the wipes.
    let setup = Setup {
        no_wrong_asks: true,
        ..with_bug(HarnessBug::ResolverTrustsAnyLog)
    };
    let invariant = caught_by("resolver-trusts-any-log (wiped log only)", setup);
    assert!(DECIDED_AGAINST.contains(&invariant), "{invariant}");
}

#[test]
fn bug_begin_ignoring_tombstones_is_caught() {
    let invariant = caught_by(
        "begin-ignores-tombstones",
        with_bug(HarnessBug::BeginIgnoresTombstones),
    );
    assert_eq!(invariant, "a gid names one transaction forever");
}

#[test]
fn bug_begin_ignoring_the_definition_is_caught() {
    let invariant = caught_by(
        "begin-ignores-definition",
        with_bug(HarnessBug::BeginIgnoresDefinition),
    );
    assert_eq!(
        invariant,
        "another definition under a known gid is ALREADY_EXISTS"
    );
}

#[test]
fn bug_begin_presuming_abort_is_caught() {
    let invariant = caught_by(
        "begin-presumes-abort",
        with_bug(HarnessBug::BeginPresumesAbort),
    );
    assert_eq!(
        invariant,
        "a Begin answered Finished tells the logged outcome"
    );
}

#[test]
fn bug_outcome_told_before_durable_is_caught() {
    // It needs an fsync stalled past the resolver's delay and a crash that loses the decision:
    // rarer, so the full CI budget.
    let invariant = caught_within(
        CI_SEEDS,
        "outcome-before-durable",
        with_bug(HarnessBug::OutcomeBeforeDurable),
    );
    assert!(DECIDED_AGAINST.contains(&invariant), "{invariant}");
}

#[test]
fn bug_deadline_timer_trusting_the_wall_clock_is_caught() {
    let invariant = caught_by(
        "deadline-not-rearmed",
        with_bug(HarnessBug::DeadlineNotRearmed),
    );
    assert_eq!(
        invariant,
        "a deadline is acted on only once the wall clock reaches it"
    );
}
