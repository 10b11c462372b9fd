//! The barrier's rules as one pure function (DESIGN.md section 7).
//!
//! [`plan`] takes the rows already recorded for one `(gid, branch)` and the delivery that
//! just arrived, and says what to do: which rows to write, whether the business code runs,
//! what to answer, and whether the branch enters or leaves the index of open prepared
//! branches. It does no I/O, reads no clock and knows no store: every barrier store
//! ([`crate::store::BarrierStore`], e.g. [`crate::sled::SledStore`]) calls it inside its
//! transaction, and the coordinator's deterministic simulation calls it with rows kept in
//! memory, so all of them run the same rules.
//!
//! # The rules, in the order they are checked
//!
//! A forward delivery (`Prepare`, `Execute`):
//!
//! 1. [`Rule::Cancelled`]: the cancel row (`Abort` / `Compensate`) is checked **first**: once
//!    it is recorded, the forward operation is `REFUSED` / `FAILED`, even if an earlier
//!    delivery of it was recorded (and answered otherwise). No business code runs.
//! 2. [`Rule::Reused`]: a forward row exists but the delivery is not the one it recorded (see
//!    *identity* below): the gid was reused for another transaction. Refused, nothing written,
//!    never answered from the old row.
//! 3. [`Rule::Repeat`]: a forward row exists for the same delivery: its answer again.
//! 4. [`Rule::UnknownHandler`]: no handler of the right kind is registered: recorded as a
//!    refusal (the coordinator aborts or compensates; a later delivery gets the same answer).
//! 5. [`Rule::Run`]: the business code runs; its success is recorded (a successful `Prepare`
//!    opens the branch in the in-doubt index), its refusal is recorded as `REFUSED`/`FAILED`.
//!
//! A phase-two delivery (`Commit`, `Abort`, `Compensate`):
//!
//! 1. [`Rule::Foreign`]: the delivery belongs to another transaction that reused the gid
//!    (identity differs from the recorded forward row or from the operation's own row). That
//!    transaction's forward operation was refused here (or will be, by rule 2 above), so
//!    nothing of it was applied: `Abort`/`Compensate` answer `DONE` with nothing written and
//!    no business code; `Commit` is a violation (this branch never promised that body).
//! 2. [`Rule::Repeat`]: the operation's own row exists: `DONE` again.
//! 3. [`Rule::Contradiction`]: commit after abort, abort after commit: violation.
//! 4. [`Rule::CommitWithoutPrepare`]: commit without a `PREPARED` row: violation.
//! 5. [`Rule::NullCancel`]: `Abort`/`Compensate` with no forward row: the forward row is
//!    recorded as `REFUSED`/`FAILED` (so a late forward delivery is refused, no hanging) and
//!    the operation as `DONE`; no business code.
//! 6. [`Rule::NothingToUndo`]: `Abort`/`Compensate` after a refused forward operation: `DONE`,
//!    no business code.
//! 7. [`Rule::UnknownHandler`]: business code must run but no handler is registered: RETRY
//!    (nothing written), until the handler is deployed.
//! 8. [`Rule::Run`]: the business code runs; `DONE` is recorded (commit/abort close the
//!    branch in the in-doubt index); a refusal is answered RETRY: phase two must succeed.
//!
//! # Identity of a delivery
//!
//! A delivery's [`Fingerprint`] covers `(handler, payload)`. Forward rows keep the
//! fingerprint of the forward delivery. `Commit` and `Abort` carry the branch payload again,
//! so they are checked against the `Prepare` row's fingerprint. `Compensate` carries the
//! *compensation* payload, which cannot be compared with the `Execute` row: it is checked
//! against an earlier `Compensate` row only; against the `Execute` row, only the log identity
//! is compared. Rows also keep the coordinator's log id: a delivery naming another log (both
//! ids non-empty) is another transaction too. An unknown value (rows written by format v1, a
//! coordinator that sends no log id, the forward row a null compensation wrote) matches
//! anything: the rules never refuse on a guess.

use std::fmt;

use sha2::{Digest, Sha256};

use super::{Answer, BarrierRow, Op};

/// Bytes of a [`Fingerprint`]: SHA-256 truncated to 128 bits, far beyond accidental
/// collisions for the few bodies one gid ever sees.
pub const FINGERPRINT_BYTES: usize = 16;

/// Fingerprint of a delivery's `(handler, payload)`, kept in forward rows.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; FINGERPRINT_BYTES]);

impl Fingerprint {
    /// The fingerprint of `(handler, payload)`. The handler is length-prefixed so that no
    /// two different pairs hash the same bytes.
    pub fn of(handler: &str, payload: &[u8]) -> Fingerprint {
        let mut h = Sha256::new();
        h.update((handler.len() as u64).to_be_bytes());
        h.update(handler.as_bytes());
        h.update(payload);
        let digest = h.finalize();
        let mut out = [0; FINGERPRINT_BYTES];
        out.copy_from_slice(&digest[..FINGERPRINT_BYTES]);
        Fingerprint(out)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A row already recorded for the `(gid, branch)` the delivery is addressed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The operation the row records.
    pub op: Op,
    /// The answer it recorded.
    pub answer: Answer,
    /// Fingerprint of the delivery that wrote it; `None` when unknown (format v1 rows, the
    /// forward row written by a null compensation).
    pub fingerprint: Option<Fingerprint>,
    /// Log id of the coordinator that sent the delivery; empty when unknown.
    pub log_id: String,
    /// The message answered with it (repeated to duplicates).
    pub message: String,
}

/// One delivery of an operation to a branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The operation.
    pub op: Op,
    /// The handler name it is addressed to.
    pub handler: String,
    /// [`Fingerprint::of`] the handler and the payload as delivered.
    pub fingerprint: Fingerprint,
    /// `BranchRequest.log_id`: the coordinator log that sent it; empty when unknown.
    pub log_id: String,
    /// Whether a handler of the right kind (2PC for prepare/commit/abort, saga for
    /// execute/compensate) is registered under `handler`.
    pub handler_registered: bool,
}

impl Delivery {
    /// A delivery of `op` to `handler` with `payload`, from the log `log_id`.
    pub fn new(
        op: Op,
        handler: &str,
        payload: &[u8],
        log_id: &str,
        handler_registered: bool,
    ) -> Delivery {
        Delivery {
            op,
            handler: handler.to_string(),
            fingerprint: Fingerprint::of(handler, payload),
            log_id: log_id.to_string(),
            handler_registered,
        }
    }
}

/// A row the store must write (with the delivery's log id, the handler, the time and the
/// next sequence number, which are the store's business).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// The operation the row records.
    pub op: Op,
    /// The answer it records.
    pub answer: Answer,
    /// The fingerprint to keep; `None` when the body of that operation was never seen.
    pub fingerprint: Option<Fingerprint>,
    /// The message to keep with it (empty for a plain success).
    pub message: String,
}

impl Write {
    /// The row as [`plan`] will find it later, once written by a delivery from `log_id`: what
    /// an in-memory store (the simulation) keeps.
    pub fn recorded(&self, log_id: &str) -> Recorded {
        Recorded {
            op: self.op,
            answer: self.answer,
            fingerprint: self.fingerprint,
            log_id: log_id.to_string(),
            message: self.message.clone(),
        }
    }
}

/// Whether the business code runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Business {
    /// It does not run.
    Skip,
    /// It runs, in the same local transaction as [`Plan::writes`]; when it succeeds, the
    /// writes and [`Plan::reply`] stand. When it refuses, its changes are rolled back and
    /// `on_refusal` applies instead.
    Run {
        /// What a business refusal turns into.
        on_refusal: OnRefusal,
    },
}

/// What a business refusal turns into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnRefusal {
    /// Write this row (its message replaced by the refusal's reason) instead of
    /// [`Plan::writes`], and answer its answer with the reason.
    Record(Write),
    /// Write nothing and answer RETRY: a phase-two operation must eventually succeed.
    Retry,
}

/// What to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A definitive answer (new, or repeated from a row).
    Answer {
        /// The answer.
        answer: Answer,
        /// For humans.
        message: String,
    },
    /// Ask the coordinator to deliver again later (nothing was written).
    Retry(String),
    /// The delivery contradicts the recorded state: nothing written, no business code, log it
    /// at error level and answer RETRY so that the transaction shows up as stuck.
    Violation(String),
}

/// How the branch's entry in the index of open prepared branches changes, in the same local
/// transaction as the writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InDoubt {
    /// No change.
    Unchanged,
    /// The branch is now prepared and undecided: add it (with what a replay needs).
    Open,
    /// The branch is decided: remove it (if present).
    Close,
}

/// Which rule decided (see the module docs): for tests, logs and the simulation's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// A forward delivery after its cancel row: refused.
    Cancelled,
    /// A forward delivery whose identity differs from the recorded forward row.
    Reused,
    /// A phase-two delivery of another transaction that reused the gid.
    Foreign,
    /// A duplicate: the recorded answer again.
    Repeat,
    /// Commit after abort, or abort after commit.
    Contradiction,
    /// Commit with no `PREPARED` row.
    CommitWithoutPrepare,
    /// Abort/compensate before any forward row: recorded as a no-op, late forward refused.
    NullCancel,
    /// Abort/compensate after a refused forward operation.
    NothingToUndo,
    /// No handler of the right kind is registered.
    UnknownHandler,
    /// The branch's gid was swept (its rows deleted, a marker kept): see [`plan_swept`].
    Swept,
    /// The business code runs.
    Run,
}

/// The decision for one delivery. [`Plan::writes`] are written only if the business code
/// (when it runs) succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The rule that decided.
    pub rule: Rule,
    /// Whether the business code runs.
    pub business: Business,
    /// Rows to write, in this order (the store numbers them in this order).
    pub writes: Vec<Write>,
    /// The answer.
    pub reply: Reply,
    /// The in-doubt index change that goes with the writes.
    pub in_doubt: InDoubt,
}

/// What a plan comes to once the business code has run (or not): the rows to write, the
/// answer, the index change. See [`Plan::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// Rows to write, in order.
    pub writes: Vec<Write>,
    /// The answer.
    pub reply: Reply,
    /// The index change.
    pub in_doubt: InDoubt,
}

impl Plan {
    /// What this plan comes to when the business code succeeded or did not run
    /// (`refusal = None`), or when it refused with a reason (`Some(reason)`; the store rolls
    /// its changes back). Every store settles a plan this way, so that a refusal means the
    /// same everywhere: a forward refusal is recorded, a phase-two one is answered RETRY.
    pub fn settle(&self, refusal: Option<&str>) -> Settled {
        match (&self.business, refusal) {
            (Business::Run { on_refusal }, Some(reason)) => match on_refusal {
                OnRefusal::Record(w) => Settled {
                    writes: vec![Write {
                        message: reason.to_string(),
                        ..w.clone()
                    }],
                    reply: Reply::Answer {
                        answer: w.answer,
                        message: reason.to_string(),
                    },
                    in_doubt: InDoubt::Unchanged,
                },
                OnRefusal::Retry => Settled {
                    writes: Vec::new(),
                    reply: Reply::Retry(format!(
                        "handler refused ({reason}); commit, abort and compensate must \
                         eventually succeed: it will be retried"
                    )),
                    in_doubt: InDoubt::Unchanged,
                },
            },
            _ => Settled {
                writes: self.writes.clone(),
                reply: self.reply.clone(),
                in_doubt: self.in_doubt,
            },
        }
    }

    fn answer(rule: Rule, answer: Answer, message: impl Into<String>) -> Plan {
        Plan {
            rule,
            business: Business::Skip,
            writes: Vec::new(),
            reply: Reply::Answer {
                answer,
                message: message.into(),
            },
            in_doubt: InDoubt::Unchanged,
        }
    }

    fn record(rule: Rule, writes: Vec<Write>, answer: Answer, message: String) -> Plan {
        Plan {
            writes,
            ..Plan::answer(rule, answer, message)
        }
    }

    fn violation(rule: Rule, message: String) -> Plan {
        Plan {
            reply: Reply::Violation(message),
            ..Plan::answer(rule, Answer::Done, "")
        }
    }
}

/// How `op` relates to the other operations of its branch.
struct Shape {
    /// The forward operation of the branch (`Prepare` or `Execute`).
    forward: Op,
    /// Its success answer.
    ok: Answer,
    /// Its refusal answer.
    no: Answer,
    /// The cancel operation (`Abort` or `Compensate`).
    cancel: Op,
    /// "2PC" or "saga", for messages.
    kind: &'static str,
}

fn shape(op: Op) -> Shape {
    match op {
        Op::Prepare | Op::Commit | Op::Abort => Shape {
            forward: Op::Prepare,
            ok: Answer::Prepared,
            no: Answer::Refused,
            cancel: Op::Abort,
            kind: "2PC",
        },
        Op::Execute | Op::Compensate => Shape {
            forward: Op::Execute,
            ok: Answer::Succeeded,
            no: Answer::Failed,
            cancel: Op::Compensate,
            kind: "saga",
        },
    }
}

/// Whether a recorded value and a delivered one may be the same (unknown matches anything).
fn same_log(recorded: &str, delivered: &str) -> bool {
    recorded.is_empty() || delivered.is_empty() || recorded == delivered
}

fn same_body(recorded: Option<Fingerprint>, delivered: Fingerprint) -> bool {
    recorded.is_none_or(|r| r == delivered)
}

/// Why `row` does not belong to `d`, if it does not.
fn mismatch(row: &Recorded, d: &Delivery, compare_body: bool) -> Option<String> {
    if !same_log(&row.log_id, &d.log_id) {
        return Some(format!(
            "this branch was recorded for coordinator log {:?}, the delivery comes from log {:?}",
            row.log_id, d.log_id
        ));
    }
    if compare_body && !same_body(row.fingerprint, d.fingerprint) {
        return Some(format!(
            "the recorded {} has body fingerprint {}, this delivery {}",
            row.op,
            row.fingerprint.expect("checked by same_body"),
            d.fingerprint
        ));
    }
    None
}

/// The decision for `delivery`, given `rows`: every row recorded for the same
/// `(gid, branch)`, in any order (rows of other branches must not be passed).
///
/// # Panics
///
/// If `rows` holds two rows for one operation, or a row whose answer its operation cannot
/// record: the caller's store is corrupt, and no decision may be taken from it.
pub fn plan(rows: &[Recorded], delivery: &Delivery) -> Plan {
    let find = |op: Op| {
        let mut it = rows.iter().filter(move |r| r.op == op);
        let row = it.next();
        assert!(it.next().is_none(), "two {op} rows for one branch");
        if let Some(r) = row {
            assert!(
                r.op.allows(r.answer),
                "row {op} recorded the impossible answer {:?}",
                r.answer
            );
        }
        row
    };
    let d = delivery;
    let s = shape(d.op);
    let forward = find(s.forward);
    let cancel = find(s.cancel);
    let write = |op: Op, answer: Answer, fingerprint: Option<Fingerprint>, message: &str| Write {
        op,
        answer,
        fingerprint,
        message: message.to_string(),
    };

    if d.op == s.forward {
        // Rule 1: the cancel row first, whatever the forward row says.
        if cancel.is_some() {
            let msg = format!(
                "{} already recorded for this branch: a {} after it is refused",
                s.cancel, d.op
            );
            // The forward row exists whenever the cancel row does (a null cancel writes both);
            // a tree edited by hand still gets one, so the late delivery is answered the same
            // way next time.
            let writes = match forward {
                Some(_) => Vec::new(),
                None => vec![write(d.op, s.no, Some(d.fingerprint), &msg)],
            };
            return Plan::record(Rule::Cancelled, writes, s.no, msg);
        }
        if let Some(row) = forward {
            if let Some(why) = mismatch(row, d, true) {
                return Plan::answer(
                    Rule::Reused,
                    s.no,
                    format!(
                        "gid reused with a different body: {why}; {} refused, the gid names \
                         another transaction here: submit under a new gid",
                        d.op
                    ),
                );
            }
            return Plan::answer(Rule::Repeat, row.answer, row.message.clone());
        }
        if !d.handler_registered {
            let msg = format!(
                "unknown handler {:?}: no {} handler of that name is registered on this \
                 participant",
                d.handler, s.kind
            );
            return Plan::record(
                Rule::UnknownHandler,
                vec![write(d.op, s.no, Some(d.fingerprint), &msg)],
                s.no,
                msg,
            );
        }
        return Plan {
            rule: Rule::Run,
            business: Business::Run {
                on_refusal: OnRefusal::Record(write(d.op, s.no, Some(d.fingerprint), "")),
            },
            writes: vec![write(d.op, s.ok, Some(d.fingerprint), "")],
            reply: Reply::Answer {
                answer: s.ok,
                message: String::new(),
            },
            in_doubt: if d.op == Op::Prepare {
                InDoubt::Open
            } else {
                InDoubt::Unchanged
            },
        };
    }

    // Phase two. Commit and abort carry the branch payload: compared with the prepare row.
    // Compensate carries the compensation payload: compared with an earlier compensate row.
    let own = find(d.op);
    let compare_forward_body = d.op != Op::Compensate;
    let foreign = forward
        .and_then(|f| mismatch(f, d, compare_forward_body))
        .or_else(|| own.and_then(|o| mismatch(o, d, true)));
    if let Some(why) = foreign {
        if d.op == Op::Commit {
            return Plan::violation(
                Rule::Foreign,
                format!(
                    "commit of a gid reused with a different body: {why}; this branch never \
                     prepared that body"
                ),
            );
        }
        return Plan::answer(
            Rule::Foreign,
            Answer::Done,
            format!(
                "{} of a gid reused with a different body: {why}; nothing of that transaction \
                 was applied here",
                d.op
            ),
        );
    }
    if let Some(row) = own {
        return Plan::answer(Rule::Repeat, Answer::Done, row.message.clone());
    }
    let contra = match d.op {
        Op::Commit => Some(Op::Abort),
        Op::Abort => Some(Op::Commit),
        _ => None,
    };
    if let Some(c) = contra.filter(|c| find(*c).is_some()) {
        return Plan::violation(
            Rule::Contradiction,
            format!(
                "{} received but {c} was already applied to this branch",
                d.op
            ),
        );
    }
    let done = |message: &str| write(d.op, Answer::Done, Some(d.fingerprint), message);
    match forward {
        None if d.op == Op::Commit => Plan::violation(
            Rule::CommitWithoutPrepare,
            "commit received but prepare never ran for this branch".to_string(),
        ),
        None => {
            let msg = format!(
                "null {}: {} never ran; a late {} will be refused",
                d.op, s.forward, s.forward
            );
            // Abort carries the prepare's body, so its fingerprint is the prepare's;
            // compensate does not carry the execute's body: unknown.
            let fwd_fp = (d.op == Op::Abort).then_some(d.fingerprint);
            Plan::record(
                Rule::NullCancel,
                vec![write(s.forward, s.no, fwd_fp, &msg), done(&msg)],
                Answer::Done,
                msg,
            )
        }
        Some(row) if row.answer != s.ok => {
            if d.op == Op::Commit {
                return Plan::violation(
                    Rule::CommitWithoutPrepare,
                    format!(
                        "commit received but prepare answered {:?} for this branch",
                        row.answer
                    ),
                );
            }
            let msg = format!("{} was {:?}: nothing to undo", s.forward, row.answer);
            Plan::record(Rule::NothingToUndo, vec![done(&msg)], Answer::Done, msg)
        }
        Some(_) if !d.handler_registered => Plan {
            reply: Reply::Retry(format!(
                "unknown handler {:?}: no {} handler of that name is registered on this \
                 participant; register it and this {} succeeds on retry",
                d.handler, s.kind, d.op
            )),
            ..Plan::answer(Rule::UnknownHandler, Answer::Done, "")
        },
        Some(_) => Plan {
            rule: Rule::Run,
            business: Business::Run {
                on_refusal: OnRefusal::Retry,
            },
            writes: vec![done("")],
            reply: Reply::Answer {
                answer: Answer::Done,
                message: String::new(),
            },
            in_doubt: if d.op == Op::Compensate {
                InDoubt::Unchanged
            } else {
                InDoubt::Close
            },
        },
    }
}

/// What a coordinator told a participant's in-doubt resolver (`Coordinator.Outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Told {
    /// COMMITTED.
    Committed,
    /// ABORTED (known, or presumed for a gid the answering log does not know).
    Aborted,
    /// Not decided yet (or no usable answer).
    Pending,
}

/// What the in-doubt resolver does with one prepared branch, given an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InDoubtDecision {
    /// Apply the outcome: replay `Commit` or `Abort` through the barrier.
    Apply(Op),
    /// Not decided yet: ask again later.
    Pending,
    /// The answer came from another log than the one that drove the branch: stay in doubt
    /// (logged loudly), never act on it.
    WrongLog,
    /// The branch has no stored log identity and the coordinator does not know the gid:
    /// presumed abort cannot be trusted without knowing who answers; stay in doubt.
    UnknownWithoutLogId,
}

/// The log-identity rule of presumed abort (DESIGN.md section 4): act on an answer only when
/// it comes from the log that drove the branch (`stored_log_id`); a branch prepared without
/// a log identity is resolved only by an outcome the coordinator actually knows.
pub fn decide_in_doubt(
    stored_log_id: &str,
    told: Told,
    known: bool,
    answering_log_id: &str,
) -> InDoubtDecision {
    if stored_log_id.is_empty() {
        if !known {
            return InDoubtDecision::UnknownWithoutLogId;
        }
    } else if answering_log_id != stored_log_id {
        return InDoubtDecision::WrongLog;
    }
    match told {
        Told::Committed => InDoubtDecision::Apply(Op::Commit),
        Told::Aborted => InDoubtDecision::Apply(Op::Abort),
        Told::Pending => InDoubtDecision::Pending,
    }
}

/// The decision for `delivery` to a gid whose rows were swept (see [`sweep_candidate`]): the
/// store keeps a marker with the coordinator log that drove the gid, and finds no rows.
///
/// The gid was finished when it was swept: its coordinator (`swept_log_id`) had it terminal,
/// durably, and every branch here was decided. So no delivery of it is still due, and one
/// that arrives anyway is a late duplicate (a delayed packet, a retry of a call whose answer
/// was lost, a resend after a coordinator crash lost an unsynced record): it must change
/// nothing. Nothing is written and no business code runs:
///
/// - `Prepare`/`Execute`: `REFUSED`/`FAILED` (the coordinator that finished the gid ignores
///   it; a new transaction reusing the gid is refused, safely, until the marker expires);
/// - `Abort`/`Compensate`: `DONE` (nothing to undo that was not undone, or was never to be);
/// - `Commit` from the log that drove the gid (or one that sends no log id): `DONE` (a log
///   sends `Commit` only for a committed transaction, and every branch of this one was
///   decided here before the sweep, so this branch committed); from another log: a
///   violation, as for [`Rule::Foreign`].
pub fn plan_swept(swept_log_id: &str, d: &Delivery) -> Plan {
    let why = "the transaction finished and its barrier rows were swept; a late delivery \
               changes nothing";
    match d.op {
        Op::Prepare | Op::Execute => {
            let no = shape(d.op).no;
            Plan::answer(Rule::Swept, no, why)
        }
        Op::Abort | Op::Compensate => Plan::answer(Rule::Swept, Answer::Done, why),
        Op::Commit if same_log(swept_log_id, &d.log_id) => {
            Plan::answer(Rule::Swept, Answer::Done, why)
        }
        Op::Commit => Plan::violation(
            Rule::Swept,
            format!(
                "commit from coordinator log {:?} for a gid that log {swept_log_id:?} drove \
                 and that was swept here: this branch never promised it",
                d.log_id
            ),
        ),
    }
}

/// Why the rows of a gid are kept by a sweep round (see [`sweep_candidate`] and
/// [`sweep_told`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Keep {
    /// A row is younger than the horizon: a delivery may still be in flight.
    Young,
    /// A branch is prepared and undecided here: the in-doubt resolver's business first.
    Open,
    /// A row names no coordinator log (an older coordinator, a format v1 row): no answer can
    /// be checked against it.
    NoLogId,
    /// The rows of the gid name more than one coordinator (log or outcome endpoint).
    Mixed,
    /// No coordinator could be asked (none named or configured, unreachable, an error).
    Unanswered,
    /// The answer came from another log than the one that drove the gid.
    WrongLog,
    /// The coordinator does not know the gid (never did, or forgot it past its tombstone):
    /// nothing there would refuse a reuse of the gid, so the rows stay.
    Unknown,
    /// Known and not finished yet (or finished but still in its shard).
    NotFinished,
    /// The rows changed between the read and the sweep's transaction.
    Changed,
}

/// What a coordinator answered `Outcome(gid)` with, as far as the sweep cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorSays {
    /// `OutcomeResponse.log_id`.
    pub log_id: String,
    /// `OutcomeResponse.known`.
    pub known: bool,
    /// `OutcomeResponse.finished`.
    pub finished: bool,
}

/// The local half of the sweep rule: whether `rows` (every row of one gid, any order) may be
/// swept as far as this participant can tell, at `now_unix_ms` with rows kept at least
/// `horizon_ms`. Then the coordinator must be asked ([`sweep_told`]).
///
/// Every row must be older than the horizon (longer than any delivery of the gid can be in
/// flight: the coordinator's call timeout and backoff), name the same non-empty coordinator
/// log and outcome endpoint, and no branch may be open (prepared without commit or abort).
/// Everything else is finished here: a decided 2PC branch, a refused prepare, a compensated
/// or failed step, a succeeded step of a saga (whose compensation, if any could come, the
/// coordinator's `finished` rules out).
pub fn sweep_candidate(rows: &[BarrierRow], now_unix_ms: u64, horizon_ms: u64) -> Result<(), Keep> {
    let Some(first) = rows.first() else {
        return Err(Keep::Changed);
    };
    if rows
        .iter()
        .any(|r| r.unix_ms.saturating_add(horizon_ms) > now_unix_ms)
    {
        return Err(Keep::Young);
    }
    if rows.iter().any(|r| r.log_id.is_empty()) {
        return Err(Keep::NoLogId);
    }
    if rows
        .iter()
        .any(|r| r.log_id != first.log_id || r.outcome_endpoint != first.outcome_endpoint)
    {
        return Err(Keep::Mixed);
    }
    let open = rows.iter().any(|p| {
        p.op == Op::Prepare
            && p.answer == Answer::Prepared
            && !rows
                .iter()
                .any(|r| r.branch_id == p.branch_id && matches!(r.op, Op::Commit | Op::Abort))
    });
    if open {
        return Err(Keep::Open);
    }
    Ok(())
}

/// The coordinator's half of the sweep rule: the rows (driven by log `rows_log_id`) may be
/// swept only on an answer from that very log that knows the gid and has it finished
/// (terminal and durable, or a tombstone), so that its record or tombstone outlives the rows
/// and answers any reuse of the gid. `None`: no answer.
pub fn sweep_told(rows_log_id: &str, answer: Option<&CoordinatorSays>) -> Result<(), Keep> {
    let Some(a) = answer else {
        return Err(Keep::Unanswered);
    };
    if a.log_id != rows_log_id {
        return Err(Keep::WrongLog);
    }
    if !a.known {
        return Err(Keep::Unknown);
    }
    if !a.finished {
        return Err(Keep::NotFinished);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Answer::*;
    use Op::*;

    const F1: &[u8] = b"body one";
    const F2: &[u8] = b"body two";

    fn fp(body: &[u8]) -> Fingerprint {
        Fingerprint::of("h", body)
    }

    /// A recorded row: `(op, answer, body or None for unknown, log id)`.
    fn row(op: Op, answer: Answer, body: Option<&[u8]>, log: &str) -> Recorded {
        Recorded {
            op,
            answer,
            fingerprint: body.map(fp),
            log_id: log.into(),
            message: format!("first {op}"),
        }
    }

    fn delivery(op: Op, body: &[u8], log: &str) -> Delivery {
        Delivery::new(op, "h", body, log, true)
    }

    /// The short form of a plan, for the table: rule, whether business runs, rows written
    /// `(op, answer, fingerprint known)`, the reply, the index change.
    #[derive(Debug, PartialEq)]
    struct Short {
        rule: Rule,
        runs: bool,
        writes: Vec<(Op, Answer, Option<Fingerprint>)>,
        reply: R,
        in_doubt: InDoubt,
    }

    #[derive(Debug, PartialEq)]
    enum R {
        A(Answer),
        Retry,
        Violation,
    }

    fn short(p: &Plan) -> Short {
        Short {
            rule: p.rule,
            runs: matches!(p.business, Business::Run { .. }),
            writes: p
                .writes
                .iter()
                .map(|w| (w.op, w.answer, w.fingerprint))
                .collect(),
            reply: match &p.reply {
                Reply::Answer { answer, .. } => R::A(*answer),
                Reply::Retry(_) => R::Retry,
                Reply::Violation(_) => R::Violation,
            },
            in_doubt: p.in_doubt,
        }
    }

    fn s(
        rule: Rule,
        runs: bool,
        writes: &[(Op, Answer, Option<Fingerprint>)],
        reply: R,
        in_doubt: InDoubt,
    ) -> Short {
        Short {
            rule,
            runs,
            writes: writes.to_vec(),
            reply,
            in_doubt,
        }
    }

    use InDoubt::{Close, Open, Unchanged as Same};

    /// One row of the table per rule (and per variant of a rule worth pinning down).
    #[test]
    fn every_rule() {
        let f1 = Some(fp(F1));
        let unregistered = |op, body| Delivery {
            handler_registered: false,
            ..delivery(op, body, "L")
        };
        let cases: Vec<(&str, Vec<Recorded>, Delivery, Short)> = vec![
            (
                "forward, first delivery: business runs, prepare opens the branch",
                vec![],
                delivery(Prepare, F1, "L"),
                s(
                    Rule::Run,
                    true,
                    &[(Prepare, Prepared, f1)],
                    R::A(Prepared),
                    Open,
                ),
            ),
            (
                "execute, first delivery: no index",
                vec![],
                delivery(Execute, F1, "L"),
                s(
                    Rule::Run,
                    true,
                    &[(Execute, Succeeded, f1)],
                    R::A(Succeeded),
                    Same,
                ),
            ),
            (
                "cancel row first: prepare after abort is refused though prepare was recorded",
                vec![
                    row(Prepare, Prepared, Some(F1), "L"),
                    row(Abort, Done, Some(F1), "L"),
                ],
                delivery(Prepare, F1, "L"),
                s(Rule::Cancelled, false, &[], R::A(Refused), Same),
            ),
            (
                "cancel row first: execute after compensate is failed",
                vec![
                    row(Execute, Succeeded, Some(F1), "L"),
                    row(Compensate, Done, None, "L"),
                ],
                delivery(Execute, F1, "L"),
                s(Rule::Cancelled, false, &[], R::A(Failed), Same),
            ),
            (
                "cancel row without forward row (edited by hand): forward row recorded",
                vec![row(Abort, Done, Some(F1), "L")],
                delivery(Prepare, F1, "L"),
                s(
                    Rule::Cancelled,
                    false,
                    &[(Prepare, Refused, f1)],
                    R::A(Refused),
                    Same,
                ),
            ),
            (
                "reused gid, other body: refused, not answered from the row",
                vec![row(Prepare, Prepared, Some(F1), "L")],
                delivery(Prepare, F2, "L"),
                s(Rule::Reused, false, &[], R::A(Refused), Same),
            ),
            (
                "reused gid, other log: refused",
                vec![row(Execute, Succeeded, Some(F1), "L")],
                delivery(Execute, F1, "M"),
                s(Rule::Reused, false, &[], R::A(Failed), Same),
            ),
            (
                "duplicate forward: first answer again",
                vec![row(Prepare, Refused, Some(F1), "L")],
                delivery(Prepare, F1, "L"),
                s(Rule::Repeat, false, &[], R::A(Refused), Same),
            ),
            (
                "duplicate of a v1 row (identity unknown): first answer again",
                vec![row(Prepare, Prepared, None, "")],
                delivery(Prepare, F2, "L"),
                s(Rule::Repeat, false, &[], R::A(Prepared), Same),
            ),
            (
                "forward to an unknown handler: refusal recorded",
                vec![],
                unregistered(Prepare, F1),
                s(
                    Rule::UnknownHandler,
                    false,
                    &[(Prepare, Refused, f1)],
                    R::A(Refused),
                    Same,
                ),
            ),
            (
                "commit of another body: violation",
                vec![row(Prepare, Prepared, Some(F1), "L")],
                delivery(Commit, F2, "L"),
                s(Rule::Foreign, false, &[], R::Violation, Same),
            ),
            (
                "abort of another body: done, nothing written or run",
                vec![row(Prepare, Prepared, Some(F1), "L")],
                delivery(Abort, F2, "L"),
                s(Rule::Foreign, false, &[], R::A(Done), Same),
            ),
            (
                "abort from another log: done, nothing written or run",
                vec![row(Prepare, Prepared, Some(F1), "L")],
                delivery(Abort, F1, "M"),
                s(Rule::Foreign, false, &[], R::A(Done), Same),
            ),
            (
                "compensate from another log: done, nothing written or run",
                vec![row(Execute, Succeeded, Some(F1), "L")],
                delivery(Compensate, F2, "M"),
                s(Rule::Foreign, false, &[], R::A(Done), Same),
            ),
            (
                "compensate with another compensation body than the recorded one",
                vec![
                    row(Execute, Succeeded, Some(F1), "L"),
                    row(Compensate, Done, Some(F1), "L"),
                ],
                delivery(Compensate, F2, "L"),
                s(Rule::Foreign, false, &[], R::A(Done), Same),
            ),
            (
                "duplicate commit: done again",
                vec![
                    row(Prepare, Prepared, Some(F1), "L"),
                    row(Commit, Done, Some(F1), "L"),
                ],
                delivery(Commit, F1, "L"),
                s(Rule::Repeat, false, &[], R::A(Done), Same),
            ),
            (
                "commit after abort: violation",
                vec![
                    row(Prepare, Prepared, Some(F1), "L"),
                    row(Abort, Done, Some(F1), "L"),
                ],
                delivery(Commit, F1, "L"),
                s(Rule::Contradiction, false, &[], R::Violation, Same),
            ),
            (
                "abort after commit: violation",
                vec![
                    row(Prepare, Prepared, Some(F1), "L"),
                    row(Commit, Done, Some(F1), "L"),
                ],
                delivery(Abort, F1, "L"),
                s(Rule::Contradiction, false, &[], R::Violation, Same),
            ),
            (
                "commit without prepare: violation",
                vec![],
                delivery(Commit, F1, "L"),
                s(Rule::CommitWithoutPrepare, false, &[], R::Violation, Same),
            ),
            (
                "commit after a refused prepare: violation",
                vec![row(Prepare, Refused, Some(F1), "L")],
                delivery(Commit, F1, "L"),
                s(Rule::CommitWithoutPrepare, false, &[], R::Violation, Same),
            ),
            (
                "abort before prepare: null abort, prepare recorded refused with the body",
                vec![],
                unregistered(Abort, F1),
                s(
                    Rule::NullCancel,
                    false,
                    &[(Prepare, Refused, f1), (Abort, Done, f1)],
                    R::A(Done),
                    Same,
                ),
            ),
            (
                "compensate before execute: execute's body is unknown",
                vec![],
                delivery(Compensate, F1, "L"),
                s(
                    Rule::NullCancel,
                    false,
                    &[(Execute, Failed, None), (Compensate, Done, f1)],
                    R::A(Done),
                    Same,
                ),
            ),
            (
                "abort after a refused prepare: nothing to undo",
                vec![row(Prepare, Refused, Some(F1), "L")],
                delivery(Abort, F1, "L"),
                s(
                    Rule::NothingToUndo,
                    false,
                    &[(Abort, Done, f1)],
                    R::A(Done),
                    Same,
                ),
            ),
            (
                "commit with its handler missing: retry until deployed",
                vec![row(Prepare, Prepared, Some(F1), "L")],
                unregistered(Commit, F1),
                s(Rule::UnknownHandler, false, &[], R::Retry, Same),
            ),
            (
                "commit: business runs, branch leaves the index",
                vec![row(Prepare, Prepared, Some(F1), "L")],
                delivery(Commit, F1, "L"),
                s(Rule::Run, true, &[(Commit, Done, f1)], R::A(Done), Close),
            ),
            (
                "compensate with its own (other) body: business runs",
                vec![row(Execute, Succeeded, Some(F1), "L")],
                delivery(Compensate, F2, "L"),
                s(
                    Rule::Run,
                    true,
                    &[(Compensate, Done, Some(fp(F2)))],
                    R::A(Done),
                    Same,
                ),
            ),
            (
                "commit from an old coordinator (no log id) of a v2 row: same branch",
                vec![row(Prepare, Prepared, Some(F1), "L")],
                delivery(Commit, F1, ""),
                s(Rule::Run, true, &[(Commit, Done, f1)], R::A(Done), Close),
            ),
        ];
        for (name, rows, d, want) in cases {
            assert_eq!(short(&plan(&rows, &d)), want, "{name}");
        }
    }

    #[test]
    fn refusals_turn_into_the_forward_no_or_retry() {
        let p = plan(&[], &delivery(Execute, F1, "L"));
        let Business::Run {
            on_refusal: OnRefusal::Record(w),
        } = p.business
        else {
            panic!("{p:?}")
        };
        assert_eq!(
            (w.op, w.answer, w.fingerprint),
            (Execute, Failed, Some(fp(F1)))
        );
        let rows = [row(Prepare, Prepared, Some(F1), "L")];
        let p = plan(&rows, &delivery(Abort, F1, "L"));
        assert_eq!(
            p.business,
            Business::Run {
                on_refusal: OnRefusal::Retry
            }
        );
    }

    #[test]
    fn settle_applies_a_refusal_the_same_way_for_every_store() {
        let p = plan(&[], &delivery(Prepare, F1, "L"));
        assert_eq!(p.settle(None).writes, p.writes);
        assert_eq!(p.settle(None).in_doubt, Open);
        let refused = p.settle(Some("no funds"));
        assert_eq!(
            refused.writes,
            vec![Write {
                op: Prepare,
                answer: Refused,
                fingerprint: Some(fp(F1)),
                message: "no funds".into()
            }]
        );
        assert_eq!(
            refused.reply,
            Reply::Answer {
                answer: Refused,
                message: "no funds".into()
            }
        );
        assert_eq!(refused.in_doubt, Same, "a refused prepare is not open");
        // Written rows read back as the plan expects them.
        let rows: Vec<_> = refused.writes.iter().map(|w| w.recorded("L")).collect();
        assert_eq!(plan(&rows, &delivery(Prepare, F1, "L")).rule, Rule::Repeat);
        let rows = [row(Prepare, Prepared, Some(F1), "L")];
        let retry = plan(&rows, &delivery(Commit, F1, "L")).settle(Some("busy"));
        assert!(retry.writes.is_empty() && matches!(retry.reply, Reply::Retry(_)));
        assert_eq!(retry.in_doubt, Same, "still open");
    }

    #[test]
    fn messages_say_why() {
        let rows = [row(Prepare, Refused, Some(F1), "L")];
        let Reply::Answer { message, .. } = plan(&rows, &delivery(Prepare, F1, "L")).reply else {
            panic!()
        };
        assert_eq!(
            message, "first prepare",
            "a duplicate repeats the first message"
        );
        let Reply::Answer { message, .. } = plan(&rows, &delivery(Prepare, F2, "L")).reply else {
            panic!()
        };
        assert!(message.contains("different body"), "{message}");
    }

    #[test]
    fn fingerprint_covers_handler_and_payload() {
        assert_eq!(Fingerprint::of("h", b"p"), Fingerprint::of("h", b"p"));
        assert_ne!(Fingerprint::of("h", b"p"), Fingerprint::of("h", b"q"));
        assert_ne!(Fingerprint::of("h", b"p"), Fingerprint::of("g", b"p"));
        // The handler is length-prefixed: moving bytes between handler and payload differs.
        assert_ne!(Fingerprint::of("ab", b"c"), Fingerprint::of("a", b"bc"));
        assert_eq!(format!("{}", Fingerprint([0xab; 16])).len(), 32);
    }

    #[test]
    #[should_panic(expected = "two prepare rows")]
    fn two_rows_for_one_op_are_corruption() {
        let rows = [
            row(Prepare, Prepared, Some(F1), "L"),
            row(Prepare, Refused, Some(F1), "L"),
        ];
        plan(&rows, &delivery(Prepare, F1, "L"));
    }

    #[test]
    fn a_late_delivery_to_a_swept_gid_changes_nothing() {
        for (op, log, want) in [
            (Prepare, "L", R::A(Refused)),
            (Execute, "L", R::A(Failed)),
            (Abort, "L", R::A(Done)),
            (Compensate, "L", R::A(Done)),
            (Commit, "L", R::A(Done)),
            (Commit, "", R::A(Done)),
            (Commit, "other", R::Violation),
            (Prepare, "other", R::A(Refused)),
        ] {
            let p = plan_swept("L", &delivery(op, F1, log));
            let s = short(&p);
            assert_eq!(
                (s.rule, s.runs, s.writes.len(), s.in_doubt),
                (Rule::Swept, false, 0, InDoubt::Unchanged),
                "{op} from {log:?}"
            );
            assert_eq!(s.reply, want, "{op} from {log:?}");
        }
    }

    fn brow(branch_id: u32, op: Op, answer: Answer, unix_ms: u64, log: &str) -> BarrierRow {
        BarrierRow::new(
            "g".into(),
            branch_id,
            op,
            answer,
            unix_ms,
            1,
            None,
            log.into(),
            "h".into(),
            String::new(),
        )
        .with_outcome_endpoint("http://c".into())
    }

    #[test]
    fn sweep_candidates_are_old_decided_and_of_one_log() {
        let decided = [
            brow(0, Prepare, Prepared, 10, "L"),
            brow(0, Commit, Done, 10, "L"),
            brow(1, Prepare, Refused, 10, "L"),
            brow(2, Execute, Succeeded, 10, "L"),
            brow(3, Execute, Succeeded, 10, "L"),
            brow(3, Compensate, Done, 10, "L"),
        ];
        assert_eq!(sweep_candidate(&decided, 110, 100), Ok(()));
        assert_eq!(sweep_candidate(&decided, 109, 100), Err(Keep::Young));
        let open = [
            brow(0, Prepare, Prepared, 10, "L"),
            brow(1, Abort, Done, 10, "L"),
        ];
        assert_eq!(sweep_candidate(&open, 1000, 100), Err(Keep::Open));
        let anonymous = [brow(0, Execute, Failed, 10, "")];
        assert_eq!(sweep_candidate(&anonymous, 1000, 100), Err(Keep::NoLogId));
        let mixed = [
            brow(0, Execute, Failed, 10, "L"),
            brow(1, Execute, Failed, 10, "M"),
        ];
        assert_eq!(sweep_candidate(&mixed, 1000, 100), Err(Keep::Mixed));
        let elsewhere = [
            brow(0, Execute, Failed, 10, "L"),
            brow(1, Execute, Failed, 10, "L").with_outcome_endpoint("http://d".into()),
        ];
        assert_eq!(sweep_candidate(&elsewhere, 1000, 100), Err(Keep::Mixed));
        assert_eq!(sweep_candidate(&[], 1000, 100), Err(Keep::Changed));
    }

    #[test]
    fn only_the_driving_log_knowing_the_gid_finished_allows_a_sweep() {
        let says = |log: &str, known, finished| CoordinatorSays {
            log_id: log.into(),
            known,
            finished,
        };
        assert_eq!(sweep_told("L", Some(&says("L", true, true))), Ok(()));
        assert_eq!(sweep_told("L", None), Err(Keep::Unanswered));
        assert_eq!(
            sweep_told("L", Some(&says("M", true, true))),
            Err(Keep::WrongLog)
        );
        assert_eq!(
            sweep_told("L", Some(&says("L", false, true))),
            Err(Keep::Unknown)
        );
        assert_eq!(
            sweep_told("L", Some(&says("L", true, false))),
            Err(Keep::NotFinished)
        );
    }
}
