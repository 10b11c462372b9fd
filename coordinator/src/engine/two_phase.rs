//! Two-phase commit with presumed abort (DESIGN section 4), as a [`Protocol`] of the shared
//! machine ([`super::machine`]).
//!
//! Phase one sends `Prepare` to every branch at once. All `PREPARED`: the forced `Committing`
//! record is the decision, and only once it is durable is COMMITTED told and `Commit` sent.
//! A `REFUSED` or the deadline: an unforced `Aborting` record (a lost one reads back as
//! `Begun`, which recovery aborts anyway: presumed abort) and `Abort` to every branch,
//! including those that never answered. Every branch `DONE`: an unforced `Ended` record.

use super::machine::{mutated, Command, Gate, Op, Protocol, Reply, Tx};
use super::types::{BranchState, Mode, Outcome, Phase};

/// Two-phase commit, presumed abort.
pub(super) struct TwoPhase;

impl Protocol for TwoPhase {
    fn start(&self, tx: &mut Tx, out: &mut Vec<Command>) {
        for b in 0..tx.rec.branches.len() {
            tx.start_op(b, Op::Prepare, out);
        }
    }

    fn give_up(&self, tx: &mut Tx, now_ms: u64, out: &mut Vec<Command>) {
        tx.set_reason(|r| Tx::deadline_reason(r, "branch", |s| s == BranchState::InDoubt));
        abort(tx, now_ms, out);
    }

    fn resume(&self, tx: &mut Tx, now_ms: u64, out: &mut Vec<Command>) {
        match tx.rec.phase {
            // Prepares' answers died with the process: presumed abort.
            Phase::Active => {
                tx.set_reason(|_| {
                    "the coordinator restarted before every branch had prepared (presumed abort)"
                        .into()
                });
                abort(tx, now_ms, out)
            }
            Phase::Committing => resume_phase_two(tx, now_ms, Outcome::Committed, out),
            Phase::Aborting => resume_phase_two(tx, now_ms, Outcome::Aborted, out),
            // Not written by this protocol; nothing was decided to commit: abort.
            Phase::Compensating => {
                tx.set_reason(|_| "recovered in the saga-only phase Compensating".into());
                abort(tx, now_ms, out)
            }
            Phase::Committed | Phase::Aborted => {
                unreachable!("the machine finishes terminal records itself")
            }
        }
    }

    fn on_gate(&self, tx: &mut Tx, _now_ms: u64, gate: Gate, out: &mut Vec<Command>) {
        match gate {
            Gate::CommitDecision => {
                if mutated!(tx, commit_before_durable) {
                    return; // commits were already sent
                }
                tx.decide(Outcome::Committed, out);
                for b in 0..tx.rec.branches.len() {
                    tx.start_op(b, Op::Commit, out);
                }
            }
            other => unreachable!("2PC never waits on {other:?}"),
        }
    }

    fn on_answer(
        &self,
        tx: &mut Tx,
        now_ms: u64,
        b: usize,
        op: Op,
        reply: Reply,
        out: &mut Vec<Command>,
    ) {
        let phase = tx.rec.phase;
        match (op, reply) {
            (Op::Prepare, Reply::Prepared) => {
                tx.set_state(b, BranchState::Prepared);
                let all = tx
                    .rec
                    .branches
                    .iter()
                    .all(|x| x.state == BranchState::Prepared);
                if phase == Phase::Active && all {
                    tx.rec.phase = Phase::Committing;
                    tx.persist(now_ms, true, Some(Gate::CommitDecision), out);
                    tx.decision_seq = Some(tx.rec.seq);
                    if mutated!(tx, decide_before_durable) {
                        // Deliberate bug: the client hears COMMITTED before the decision is
                        // on disk.
                        tx.decide(Outcome::Committed, out);
                    }
                    if mutated!(tx, commit_before_durable) {
                        tx.decide(Outcome::Committed, out);
                        for x in 0..tx.rec.branches.len() {
                            tx.start_op(x, Op::Commit, out);
                        }
                    }
                }
            }
            (Op::Prepare, Reply::Refused(why)) => {
                tx.set_state(b, BranchState::Refused);
                if phase == Phase::Active {
                    tx.set_reason(|r| {
                        format!("{} refused: {why}", Tx::describe_branch(r, b, "branch"))
                    });
                }
                tx.rec.branches[b].last_error = why;
                if phase == Phase::Active {
                    abort(tx, now_ms, out);
                }
            }
            (Op::Commit, Reply::Done) => {
                tx.set_state(b, BranchState::Committed);
                maybe_finish_phase_two(tx, now_ms, out);
            }
            (Op::Abort, Reply::Done) => {
                tx.set_state(b, BranchState::Aborted);
                maybe_finish_phase_two(tx, now_ms, out);
            }
            (op, reply) => unreachable!("2PC never takes {reply:?} to {op:?}"),
        }
    }

    fn after_resolution(&self, tx: &mut Tx, now_ms: u64, _op: Op, out: &mut Vec<Command>) {
        maybe_finish_phase_two(tx, now_ms, out);
    }
}

/// A recovered decision (`Committed` or `Aborted`): tell it again, and finish phase two on
/// every branch not done yet.
fn resume_phase_two(tx: &mut Tx, now_ms: u64, outcome: Outcome, out: &mut Vec<Command>) {
    let (op, done) = match outcome {
        Outcome::Committed => (Op::Commit, BranchState::Committed),
        Outcome::Aborted | Outcome::Pending => (Op::Abort, BranchState::Aborted),
    };
    tx.decide(outcome, out);
    for b in 0..tx.rec.branches.len() {
        if tx.rec.branches[b].state != done {
            tx.start_op(b, op, out);
        }
    }
    maybe_finish_phase_two(tx, now_ms, out);
}

/// Decide abort. Unforced: with presumed abort a lost `Aborting` record reads back as
/// `Begun`, which recovery aborts anyway.
fn abort(tx: &mut Tx, now_ms: u64, out: &mut Vec<Command>) {
    debug_assert_eq!(tx.rec.mode, Mode::TwoPhase);
    tx.rec.phase = Phase::Aborting;
    tx.gate = None;
    tx.persist(now_ms, false, None, out);
    tx.decide(Outcome::Aborted, out);
    for b in 0..tx.rec.branches.len() {
        tx.start_op(b, Op::Abort, out);
    }
}

/// Phase two: finish when every branch is done.
fn maybe_finish_phase_two(tx: &mut Tx, now_ms: u64, out: &mut Vec<Command>) {
    let (target, phase) = match tx.rec.phase {
        Phase::Committing => (BranchState::Committed, Phase::Committed),
        Phase::Aborting => (BranchState::Aborted, Phase::Aborted),
        _ => return,
    };
    if tx.rec.branches.iter().all(|b| b.state == target) {
        tx.rec.phase = phase;
        tx.rec.stuck = false;
        // Unforced `Ended`: if lost, recovery repeats phase two, which is idempotent.
        tx.persist(now_ms, false, None, out);
        tx.finish(out);
    }
}
