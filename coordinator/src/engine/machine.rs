//! The per-transaction state machine: what every protocol shares.
//!
//! [`Tx::handle`] takes the current time and one [`Event`] and returns the [`Command`]s the
//! runtime must carry out, in order. It never blocks, sleeps, reads a clock or does I/O, so the
//! same code runs under tokio (the runtime), under a simulated network and clock (the
//! simulation) and in table-driven unit tests.
//!
//! # One file per transaction shape
//!
//! This file owns the plumbing every protocol needs: the durable record and the volatile call
//! state of each branch, forced writes and the gates that wait for them, the deadline, retries
//! with backoff, the stuck flag, recovery of a finished record, operator resolution, and the
//! rule that no outcome is told twice. What differs between shapes is behind the small
//! `Protocol` trait, one implementation per file:
//!
//! - `two_phase.rs`: two-phase commit with presumed abort (`Prepare`, then a forced
//!   `Committing` decision, then `Commit` or `Abort` everywhere);
//! - `saga.rs`: a saga (`Execute` step by step, then on failure a forced
//!   `Compensating` record and `Compensate` in reverse order).
//!
//! [`Tx`] picks the implementation on every event by matching the record's [`Mode`]
//! (`protocol(mode)` returns a `&'static dyn Protocol`; the implementations are unit structs
//! with no state of their own, so all state stays in [`Tx`] and its record). A transaction
//! never changes shape. A new shape is a new `Mode`, a new file implementing `Protocol`, one
//! arm in `protocol` (and a `Gate` variant if it waits on a forced write of its own); the
//! shared rules here apply to it unchanged.
//!
//! Rules the machine enforces (with `assert!`, in every build: a violation is a bug, and the
//! runtime's shard supervisor turns the panic into a fail-stop):
//! - No `Commit` is issued before the forced decision record (`Committing`) is durable.
//! - A branch moves only along `legal_branch_transition`.
//! - The outcome, once told, never changes.
//!
//! Rules kept by construction (tested by `engine/tests.rs`, the simulation and the model, not
//! asserted at run time):
//! - A reply for an unknown branch, for an operation the branch is no longer doing, a duplicate
//!   of an answer already taken, or a transient error from an outdated attempt is ignored
//!   (here, before any protocol sees it).
//! - A saga compensates only steps that ran or may have run, highest first, one at a time,
//!   and only after the forced `Compensating` record is durable (`saga.rs`).

use super::saga::Saga;
use super::two_phase::TwoPhase;
use super::types::{
    BranchRecord, BranchState, Mode, Outcome, Phase, Resolution, RetryPolicy, TxRecord,
    REASON_BYTES_MAX,
};

/// An operation the coordinator asks a participant to do for one branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Prepare,
    Commit,
    Abort,
    Execute,
    Compensate,
}

impl Op {
    /// Whether this operation belongs to phase two (must eventually succeed; retried forever).
    pub fn is_phase_two(self) -> bool {
        matches!(self, Op::Commit | Op::Abort | Op::Compensate)
    }
}

/// What a participant answered (or what the runtime observed instead of an answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Prepared,
    Refused(String),
    Succeeded,
    Failed(String),
    Done,
    /// No definite answer: unavailable, timed out, `RETRY`, or an unexpected status.
    Transient(String),
}

/// Something that happened to a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A new transaction was submitted; nothing is stored yet.
    Start,
    /// The transaction was read back from the log after a restart.
    Recovered,
    /// The record written with this `seq` is on stable storage.
    Durable { seq: u64 },
    /// A participant answered a call.
    Reply {
        branch: u32,
        op: Op,
        attempt: u32,
        reply: Reply,
    },
    /// A backoff scheduled by [`Command::ScheduleRetry`] has elapsed.
    RetryDue { branch: u32, op: Op, attempt: u32 },
    /// The phase-one / forward-run deadline set by [`Command::SetDeadline`] has passed.
    DeadlinePassed,
    /// An operator asked to retry every waiting call now.
    RetryNow,
}

/// Something the runtime must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Write the record. A forced write must be reported back with [`Event::Durable`].
    Persist { record: TxRecord, forced: bool },
    /// Call the participant of `branch`.
    Call { branch: u32, op: Op, attempt: u32 },
    /// After a random delay in `[0, backoff_bound_ms]`, deliver [`Event::RetryDue`].
    ScheduleRetry {
        branch: u32,
        op: Op,
        attempt: u32,
        backoff_bound_ms: u64,
    },
    /// Deliver [`Event::DeadlinePassed`] at this time (immediately if it is past).
    SetDeadline { at_unix_ms: u64 },
    /// The outcome is final and may be told to clients and participants. Issued once.
    Decided(Outcome),
    /// Nothing more will happen; once the preceding commands are done the runtime may drop
    /// the transaction from memory. Always the last command of its batch.
    Finished,
}

/// What to do once a forced write is durable. `Begun` is shared; the others belong to one
/// protocol each, and [`Protocol::on_gate`] handles them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Gate {
    /// `Begun` is durable: start phase one / the forward run.
    Begun,
    /// 2PC: `Committing` is durable: tell the outcome and send `Commit`.
    CommitDecision,
    /// Saga: `Compensating` is durable: compensate.
    Compensation,
    /// Saga: `Committed` is durable: tell the outcome and finish.
    SagaCommit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CallStatus {
    /// No call outstanding for the branch's current operation.
    Idle,
    /// A call is outstanding.
    InFlight,
    /// Waiting for a backoff to elapse before the next attempt.
    Backoff,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Call {
    pub(super) op: Option<Op>,
    pub(super) status: CallStatus,
}

/// Test-only deliberate protocol bugs, to prove the simulation and chaos checkers catch them.
/// Compiled only with the `mutations` feature: the build users run has none of them.
#[cfg(feature = "mutations")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mutations {
    /// Send `Commit` as soon as every branch prepared, before the decision is durable.
    pub commit_before_durable: bool,
    /// Skip compensating the lowest step that needs it.
    pub skip_one_compensation: bool,
    /// On recovery, forget the last branch (as if it were never part of the transaction).
    pub forget_branch_on_recovery: bool,
    /// 2PC: tell the client COMMITTED as soon as the `Committing` record is issued, before it
    /// is durable (the `Commit` calls still wait for durability).
    pub decide_before_durable: bool,
    /// Saga: compensate the steps in forward order (lowest first) instead of reverse.
    pub compensate_forward: bool,
    /// Runtime: answer `Begin` for a gid whose record retention collected as if the gid were
    /// new, ignoring its tombstone.
    pub ignore_tombstones: bool,
}

/// Whether the deliberate bug `$name` ([`Mutations`]) is switched on for `$tx`. Without the
/// `mutations` feature this is the constant `false`, and no field, type or branch of a
/// mutation is compiled.
macro_rules! mutated {
    ($tx:expr, $name:ident) => {{
        #[cfg(feature = "mutations")]
        let on = $tx.mutations.$name;
        #[cfg(not(feature = "mutations"))]
        let on = false;
        on
    }};
}
pub(super) use mutated;

/// What differs between transaction shapes. Each method is called by [`Tx`] at one point of
/// the shared plumbing, with the transaction in the given state; an implementation changes
/// the record and calls through [`Tx`]'s helpers (`persist`, `start_op`, `decide`,
/// `finish`), never around them.
pub(super) trait Protocol {
    /// `Begun` is durable and the deadline has not passed: start phase one / the forward run.
    fn start(&self, tx: &mut Tx, out: &mut Vec<Command>);
    /// Phase one / the forward run cannot succeed any more (the deadline passed): undo.
    fn give_up(&self, tx: &mut Tx, now_ms: u64, out: &mut Vec<Command>);
    /// A recovered record that is not terminal: resume where the log says it stopped.
    fn resume(&self, tx: &mut Tx, now_ms: u64, out: &mut Vec<Command>);
    /// A forced write gated with one of this protocol's [`Gate`]s is durable.
    fn on_gate(&self, tx: &mut Tx, now_ms: u64, gate: Gate, out: &mut Vec<Command>);
    /// A definite answer (`Tx` checked it is one, and current) to `op` for branch `b`, which
    /// is idle again. `op` is one this protocol issued.
    fn on_answer(
        &self,
        tx: &mut Tx,
        now_ms: u64,
        b: usize,
        op: Op,
        reply: Reply,
        out: &mut Vec<Command>,
    );
    /// An operator declared branch `b`'s outstanding `op` (phase two) done by hand; its
    /// state and the audit record are already written.
    fn after_resolution(&self, tx: &mut Tx, now_ms: u64, op: Op, out: &mut Vec<Command>);
}

/// The protocol of a transaction of `mode`.
fn protocol(mode: Mode) -> &'static dyn Protocol {
    match mode {
        Mode::TwoPhase => &TwoPhase,
        Mode::Saga => &Saga,
    }
}

/// One global transaction's protocol state: the durable record plus volatile call state.
#[derive(Clone, Debug)]
pub struct Tx {
    pub(super) rec: TxRecord,
    pub(super) calls: Vec<Call>,
    /// A forced write we are waiting for, and what to do then.
    pub(super) gate: Option<(u64, Gate)>,
    /// Highest seq known durable.
    pub(super) durable_seq: u64,
    /// Seq of the latest forced write issued (0: none).
    forced_seq: u64,
    /// Phase of the latest record issued, and the phase of the record issued before the
    /// latest forced write: what may be shown while that write is in flight.
    persisted_phase: Phase,
    phase_before_forced: Phase,
    /// Seq of the `Committing` record, once written.
    pub(super) decision_seq: Option<u64>,
    decided: Option<Outcome>,
    finished: bool,
    #[cfg(feature = "mutations")]
    pub(super) mutations: Mutations,
}

/// A transaction to start: a client's request as the API validated it, with the runtime's
/// defaults applied (`runtime::BeginRequest::with_defaults`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewTx {
    pub gid: String,
    pub mode: Mode,
    pub branches: Vec<super::types::BranchDef>,
    pub deadline_unix_ms: u64,
    pub retry: RetryPolicy,
    /// See [`TxRecord::trace_parent`].
    pub trace_parent: Option<String>,
}

impl Tx {
    /// A transaction just submitted at `now_ms`. Feed it [`Event::Start`] next.
    ///
    /// # Panics
    /// If `def` has no branch: the API layer rejects that before it gets here.
    pub fn new(def: NewTx, now_ms: u64) -> Tx {
        assert!(
            !def.branches.is_empty(),
            "a transaction has at least one branch"
        );
        let branches = def
            .branches
            .into_iter()
            .map(|d| BranchRecord {
                def: d,
                state: BranchState::Pending,
                attempts: 0,
                last_error: String::new(),
                resolution: None,
            })
            .collect();
        let rec = TxRecord {
            gid: def.gid,
            mode: def.mode,
            phase: Phase::Active,
            branches,
            created_unix_ms: now_ms,
            updated_unix_ms: now_ms,
            deadline_unix_ms: def.deadline_unix_ms,
            retry: def.retry,
            stuck: false,
            seq: 0,
            reason: None,
            trace_parent: def.trace_parent,
        };
        Tx::with_record(rec, 0)
    }

    /// A transaction read back from the log. Feed it [`Event::Recovered`] next.
    pub fn recover(rec: TxRecord) -> Tx {
        let durable = rec.seq;
        Tx::with_record(rec, durable)
    }

    fn with_record(rec: TxRecord, durable_seq: u64) -> Tx {
        let rec_phase_is_committing = matches!(rec.phase, Phase::Committing | Phase::Committed);
        let calls = vec![
            Call {
                op: None,
                status: CallStatus::Idle,
            };
            rec.branches.len()
        ];
        Tx {
            persisted_phase: rec.phase,
            phase_before_forced: rec.phase,
            rec,
            calls,
            gate: None,
            durable_seq,
            forced_seq: 0,
            decision_seq: (rec_phase_is_committing).then_some(durable_seq),
            decided: None,
            finished: false,
            #[cfg(feature = "mutations")]
            mutations: Mutations::default(),
        }
    }

    /// Enable deliberate bugs (tests of the checkers only; feature `mutations`).
    #[cfg(feature = "mutations")]
    pub fn set_mutations(&mut self, m: Mutations) {
        self.mutations = m;
    }

    /// The current record (including volatile attempt counts not yet written).
    pub fn record(&self) -> &TxRecord {
        &self.rec
    }

    /// The outcome once final ([`Command::Decided`] was issued), else `Pending`.
    pub fn decided(&self) -> Outcome {
        self.decided.unwrap_or(Outcome::Pending)
    }

    /// Whether [`Command::Finished`] was issued.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Whether a forced write was issued and is not reported durable yet. While it is, the
    /// current record must not be shown to anyone: it may never reach the disk.
    pub fn forced_pending(&self) -> bool {
        self.forced_seq > self.durable_seq
    }

    /// Whether the transaction's first record (`Begun`) is durable, i.e. it may be told to
    /// exist. Always true for a recovered transaction.
    pub fn begun_durable(&self) -> bool {
        self.durable_seq >= 1
    }

    /// The highest record seq known durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// The phase that may be told: the current one, or while a forced write is in flight the
    /// phase recorded before it (a `Committing` decision is not a decision until durable).
    pub fn visible_phase(&self) -> Phase {
        if self.forced_pending() {
            self.phase_before_forced
        } else {
            self.rec.phase
        }
    }

    /// An operator declares that `branch`'s phase-two operation (commit, abort or
    /// compensate) was carried out by hand: the branch is done, the record keeps who, when
    /// and why (written forced: it is an audit record), and the transaction moves on.
    ///
    /// Allowed only for a branch whose phase-two operation is outstanding; anything else
    /// (phase one, a finished branch, a saga step not being compensated now) is refused
    /// with the reason, and nothing changes.
    pub fn resolve(
        &mut self,
        now_ms: u64,
        branch: u32,
        operator: &str,
        reason: &str,
    ) -> Result<Vec<Command>, String> {
        let b = branch as usize;
        if self.finished {
            return Err("the transaction is finished".into());
        }
        if b >= self.calls.len() {
            return Err(format!(
                "no branch {branch}: the transaction has {} branches",
                self.calls.len()
            ));
        }
        let op = match self.calls[b].op {
            Some(op) if op.is_phase_two() && self.calls[b].status != CallStatus::Idle => op,
            _ => {
                return Err(format!(
                    "branch {branch} has no outstanding commit, abort or compensation (state \
                     {:?}, transaction {:?}); only those can be resolved by hand",
                    self.rec.branches[b].state, self.rec.phase
                ))
            }
        };
        let mut out = Vec::new();
        self.calls[b] = Call {
            op: None,
            status: CallStatus::Idle,
        };
        self.rec.branches[b].resolution = Some(Resolution {
            operator: operator.to_string(),
            unix_ms: now_ms,
            reason: reason.to_string(),
        });
        self.rec.branches[b].last_error.clear();
        let done = if op == Op::Commit {
            BranchState::Committed
        } else {
            BranchState::Aborted
        };
        self.set_state(b, done);
        if !self
            .calls
            .iter()
            .any(|c| c.op.is_some_and(Op::is_phase_two) && c.status != CallStatus::Idle)
        {
            self.rec.stuck = false;
        }
        self.persist(now_ms, true, None, &mut out);
        protocol(self.rec.mode).after_resolution(self, now_ms, op, &mut out);
        Ok(out)
    }

    /// Handle one event at time `now_ms` (unix ms; only used to stamp records and to compare
    /// with the deadline on recovery). Returns the commands to carry out, in order.
    pub fn handle(&mut self, now_ms: u64, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        if self.finished {
            // A finished transaction may still have a forced write in flight (an operator's
            // resolution right before the end); its durability is still news.
            if let Event::Durable { seq } = event {
                self.durable_seq = self.durable_seq.max(seq);
            }
            return out;
        }
        match event {
            Event::Start => self.on_start(now_ms, &mut out),
            Event::Recovered => self.on_recovered(now_ms, &mut out),
            Event::Durable { seq } => self.on_durable(now_ms, seq, &mut out),
            Event::Reply {
                branch,
                op,
                attempt,
                reply,
            } => self.on_reply(now_ms, branch, op, attempt, reply, &mut out),
            Event::RetryDue {
                branch,
                op,
                attempt,
            } => self.on_retry_due(branch, op, attempt, &mut out),
            Event::DeadlinePassed => self.on_deadline(now_ms, &mut out),
            Event::RetryNow => self.on_retry_now(&mut out),
        }
        out
    }

    fn on_start(&mut self, now_ms: u64, out: &mut Vec<Command>) {
        assert_eq!(
            self.rec.seq, 0,
            "Start is the first event of a new transaction"
        );
        assert_eq!(self.rec.phase, Phase::Active);
        self.persist(now_ms, true, Some(Gate::Begun), out);
        out.push(Command::SetDeadline {
            at_unix_ms: self.rec.deadline_unix_ms,
        });
    }

    fn on_recovered(&mut self, now_ms: u64, out: &mut Vec<Command>) {
        if mutated!(self, forget_branch_on_recovery) && self.rec.branches.len() > 1 {
            self.rec.branches.pop();
            self.calls.pop();
        }
        match self.rec.phase {
            Phase::Committed | Phase::Aborted => {
                self.decide(
                    if self.rec.phase == Phase::Committed {
                        Outcome::Committed
                    } else {
                        Outcome::Aborted
                    },
                    out,
                );
                self.finish(out);
            }
            Phase::Active | Phase::Committing | Phase::Aborting | Phase::Compensating => {
                protocol(self.rec.mode).resume(self, now_ms, out)
            }
        }
    }

    fn on_durable(&mut self, now_ms: u64, seq: u64, out: &mut Vec<Command>) {
        self.durable_seq = self.durable_seq.max(seq);
        let Some((gate_seq, gate)) = self.gate else {
            return;
        };
        if seq < gate_seq {
            return;
        }
        self.gate = None;
        let protocol = protocol(self.rec.mode);
        match gate {
            // The deadline passed while `Begun` was being written: nothing ran yet.
            Gate::Begun if now_ms >= self.rec.deadline_unix_ms => {
                protocol.give_up(self, now_ms, out)
            }
            Gate::Begun => protocol.start(self, out),
            other => protocol.on_gate(self, now_ms, other, out),
        }
    }

    fn on_reply(
        &mut self,
        now_ms: u64,
        branch: u32,
        op: Op,
        attempt: u32,
        reply: Reply,
        out: &mut Vec<Command>,
    ) {
        let b = branch as usize;
        // Unknown branch, an operation the branch no longer does, or already answered.
        if b >= self.calls.len()
            || self.calls[b].op != Some(op)
            || self.calls[b].status == CallStatus::Idle
        {
            return;
        }
        let definite = matches!(
            (op, &reply),
            (Op::Prepare, Reply::Prepared | Reply::Refused(_))
                | (Op::Execute, Reply::Succeeded | Reply::Failed(_))
                | (Op::Commit | Op::Abort | Op::Compensate, Reply::Done)
        );
        if !definite {
            let err = match reply {
                Reply::Transient(e) => e,
                other => format!("unexpected reply {other:?} to {op:?}"),
            };
            // Only the newest attempt's failure schedules a retry; older ones are noise.
            if attempt == self.rec.branches[b].attempts
                && self.calls[b].status == CallStatus::InFlight
            {
                self.on_transient(now_ms, b, op, err, out);
            }
            return;
        }
        self.calls[b].status = CallStatus::Idle;
        protocol(self.rec.mode).on_answer(self, now_ms, b, op, reply, out);
    }

    fn on_transient(&mut self, now_ms: u64, b: usize, op: Op, err: String, out: &mut Vec<Command>) {
        self.rec.branches[b].last_error = err;
        if !op.is_phase_two() && self.rec.phase != Phase::Active {
            // Phase one is over; this call no longer matters.
            self.calls[b].status = CallStatus::Idle;
            return;
        }
        let attempts = self.rec.branches[b].attempts;
        if op.is_phase_two() && !self.rec.stuck && attempts >= self.rec.retry.stuck_after_attempts {
            self.rec.stuck = true;
            self.persist(now_ms, false, None, out);
        }
        self.calls[b].status = CallStatus::Backoff;
        out.push(Command::ScheduleRetry {
            branch: b as u32,
            op,
            attempt: attempts + 1,
            backoff_bound_ms: self.rec.retry.backoff_bound_ms(attempts),
        });
    }

    fn on_retry_due(&mut self, branch: u32, op: Op, attempt: u32, out: &mut Vec<Command>) {
        let b = branch as usize;
        if b >= self.calls.len()
            || self.calls[b].op != Some(op)
            || self.calls[b].status != CallStatus::Backoff
            || attempt != self.rec.branches[b].attempts + 1
        {
            return;
        }
        if !op.is_phase_two() && self.rec.phase != Phase::Active {
            self.calls[b].status = CallStatus::Idle;
            return;
        }
        self.issue_call(b, op, out);
    }

    fn on_deadline(&mut self, now_ms: u64, out: &mut Vec<Command>) {
        // Decided already, or still writing `Begun` (checked again once it is durable).
        if self.rec.phase != Phase::Active || self.gate.is_some() {
            return;
        }
        protocol(self.rec.mode).give_up(self, now_ms, out);
    }

    fn on_retry_now(&mut self, out: &mut Vec<Command>) {
        for b in 0..self.calls.len() {
            if self.calls[b].status == CallStatus::Backoff {
                if let Some(op) = self.calls[b].op {
                    if op.is_phase_two() || self.rec.phase == Phase::Active {
                        self.issue_call(b, op, out);
                    }
                }
            }
        }
    }

    /// Start `op` on branch `b`: a fresh attempt count, and the first call.
    pub(super) fn start_op(&mut self, b: usize, op: Op, out: &mut Vec<Command>) {
        if op == Op::Commit && !mutated!(self, commit_before_durable) {
            assert!(
                self.rec.phase == Phase::Committing
                    && self.decision_seq.is_some_and(|d| self.durable_seq >= d),
                "Commit before the decision is durable (gid {})",
                self.rec.gid
            );
        }
        if matches!(op, Op::Prepare | Op::Execute)
            && self.rec.branches[b].state == BranchState::Pending
        {
            self.rec.branches[b].state = BranchState::InDoubt;
        }
        self.rec.branches[b].attempts = 0;
        self.calls[b].op = Some(op);
        self.issue_call(b, op, out);
    }

    fn issue_call(&mut self, b: usize, op: Op, out: &mut Vec<Command>) {
        self.rec.branches[b].attempts += 1;
        self.calls[b].status = CallStatus::InFlight;
        out.push(Command::Call {
            branch: b as u32,
            op,
            attempt: self.rec.branches[b].attempts,
        });
    }

    /// Move branch `b` to `to`.
    ///
    /// # Panics
    /// If the move is not a [`legal_branch_transition`] (a bug; checked in every build).
    pub(super) fn set_state(&mut self, b: usize, to: BranchState) {
        let from = self.rec.branches[b].state;
        assert!(
            legal_branch_transition(from, to),
            "illegal branch transition {from:?} -> {to:?} (gid {}, branch {b})",
            self.rec.gid
        );
        self.rec.branches[b].state = to;
    }

    /// Issue a write of the current record; with `gate`, run that step once it is durable.
    pub(super) fn persist(
        &mut self,
        now_ms: u64,
        forced: bool,
        gate: Option<Gate>,
        out: &mut Vec<Command>,
    ) {
        self.rec.seq += 1;
        if forced {
            self.forced_seq = self.rec.seq;
            self.phase_before_forced = self.persisted_phase;
        }
        self.persisted_phase = self.rec.phase;
        self.rec.updated_unix_ms = now_ms.max(self.rec.updated_unix_ms);
        if let Some(g) = gate {
            self.gate = Some((self.rec.seq, g));
        }
        out.push(Command::Persist {
            record: self.rec.clone(),
            forced,
        });
    }

    /// Tell the outcome (once; a second call with the same outcome does nothing).
    ///
    /// # Panics
    /// If an outcome was already told and `outcome` differs (a bug; checked in every build).
    pub(super) fn decide(&mut self, outcome: Outcome, out: &mut Vec<Command>) {
        match self.decided {
            None => {
                self.decided = Some(outcome);
                out.push(Command::Decided(outcome));
            }
            Some(told) => assert_eq!(
                told, outcome,
                "the outcome never changes (gid {})",
                self.rec.gid
            ),
        }
    }

    /// Records why the transaction is being undone. The first reason stays: later ones
    /// (e.g. a second refusal arriving after the abort) are consequences, not causes. Cut to
    /// [`REASON_BYTES_MAX`] at a character boundary.
    pub(super) fn set_reason(&mut self, why: impl FnOnce(&TxRecord) -> String) {
        if self.rec.reason.is_none() {
            let mut why = why(&self.rec);
            if why.len() > REASON_BYTES_MAX {
                let mut end = REASON_BYTES_MAX - '…'.len_utf8();
                while !why.is_char_boundary(end) {
                    end -= 1;
                }
                why.truncate(end);
                why.push('…');
            }
            self.rec.reason = Some(why);
        }
    }

    /// How a reason names branch `b`: `branch 0 (debit at http://127.0.0.1:7801)`.
    pub(super) fn describe_branch(rec: &TxRecord, b: usize, noun: &str) -> String {
        let def = &rec.branches[b].def;
        format!("{noun} {b} ({} at {})", def.handler, def.endpoint)
    }

    /// The reason for giving up at the deadline: which branches had not answered (`in_doubt`
    /// selects them by state), with the last error seen for each.
    pub(super) fn deadline_reason(
        rec: &TxRecord,
        noun: &str,
        in_doubt: impl Fn(BranchState) -> bool,
    ) -> String {
        let waiting: Vec<usize> = (0..rec.branches.len())
            .filter(|&b| in_doubt(rec.branches[b].state))
            .collect();
        if waiting.is_empty() {
            return "deadline passed before any branch was called".into();
        }
        let names: Vec<String> = waiting
            .iter()
            .map(|&b| Tx::describe_branch(rec, b, noun))
            .collect();
        let errors: Vec<String> = waiting
            .iter()
            .filter(|&&b| !rec.branches[b].last_error.is_empty())
            .map(|&b| {
                let err = &rec.branches[b].last_error;
                if waiting.len() == 1 {
                    format!("last error: {err}")
                } else {
                    format!("{noun} {b}'s last error: {err}")
                }
            })
            .collect();
        let mut why = format!(
            "deadline passed while {} {} in doubt",
            names.join(", "),
            if waiting.len() == 1 { "was" } else { "were" }
        );
        if !errors.is_empty() {
            why.push_str(&format!(" ({})", errors.join("; ")));
        }
        why
    }

    pub(super) fn finish(&mut self, out: &mut Vec<Command>) {
        self.finished = true;
        out.push(Command::Finished);
    }
}

/// The branch state transitions the engine may make.
fn legal_branch_transition(from: BranchState, to: BranchState) -> bool {
    use BranchState::*;
    from == to
        || matches!(
            (from, to),
            (Pending | InDoubt, Prepared | Refused | Succeeded | Failed)
                | (Prepared, Committed | Aborted)
                | (Pending | InDoubt | Refused, Aborted)
                | (Succeeded, Aborted)
        )
}
