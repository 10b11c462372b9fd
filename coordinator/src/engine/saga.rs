//! Sagas (DESIGN section 5), as a [`Protocol`] of the shared machine ([`super::machine`]).
//!
//! Steps run one at a time, in order (`Execute`); each step's outcome is written unforced (a
//! lost record only repeats an idempotent step). Every step `SUCCEEDED`: a forced `Committed`
//! record, then COMMITTED. A step `FAILED` or the deadline: a forced `Compensating` record,
//! and only once it is durable `Compensate` for every step that ran or may have run, highest
//! first, one at a time; then `Aborted`.

use super::machine::{mutated, Command, Gate, Op, Protocol, Reply, Tx};
use super::types::{BranchState, Mode, Outcome, Phase, TxRecord};

/// A saga: forward steps, compensations in reverse on failure.
pub(super) struct Saga;

impl Protocol for Saga {
    fn start(&self, tx: &mut Tx, out: &mut Vec<Command>) {
        tx.start_op(0, Op::Execute, out);
    }

    fn give_up(&self, tx: &mut Tx, now_ms: u64, out: &mut Vec<Command>) {
        tx.set_reason(deadline_reason);
        start_compensation(tx, now_ms, out);
    }

    fn resume(&self, tx: &mut Tx, now_ms: u64, out: &mut Vec<Command>) {
        match tx.rec.phase {
            Phase::Active => {
                let first = tx
                    .rec
                    .branches
                    .iter()
                    .position(|b| b.state != BranchState::Succeeded);
                match first {
                    None => {
                        // Every step succeeded but the final record was lost.
                        tx.rec.phase = Phase::Committed;
                        tx.persist(now_ms, true, Some(Gate::SagaCommit), out);
                    }
                    Some(k) => {
                        // Step outcomes are written unforced, so any step from k on may have
                        // run: if we end up compensating, they are all compensated (the
                        // barrier makes a compensation of a step that never ran a no-op).
                        for b in &mut tx.rec.branches[k..] {
                            if matches!(b.state, BranchState::Pending) {
                                b.state = BranchState::InDoubt;
                            }
                        }
                        if tx.rec.branches[k].state == BranchState::Failed {
                            let why = tx.rec.branches[k].last_error.clone();
                            tx.set_reason(|r| failed_reason(r, k, &why));
                            start_compensation(tx, now_ms, out);
                        } else if now_ms >= tx.rec.deadline_unix_ms {
                            tx.set_reason(deadline_reason);
                            start_compensation(tx, now_ms, out);
                        } else {
                            out.push(Command::SetDeadline {
                                at_unix_ms: tx.rec.deadline_unix_ms,
                            });
                            tx.start_op(k, Op::Execute, out);
                        }
                    }
                }
            }
            Phase::Compensating => compensate_next(tx, now_ms, out),
            Phase::Committing | Phase::Aborting => {
                // Not written by this protocol for sagas; treat like compensation to be safe.
                let was = tx.rec.phase;
                tx.set_reason(|_| format!("recovered in the 2PC-only phase {was:?}"));
                tx.rec.phase = Phase::Compensating;
                compensate_next(tx, now_ms, out);
            }
            Phase::Committed | Phase::Aborted => {
                unreachable!("the machine finishes terminal records itself")
            }
        }
    }

    fn on_gate(&self, tx: &mut Tx, now_ms: u64, gate: Gate, out: &mut Vec<Command>) {
        match gate {
            Gate::Compensation => compensate_next(tx, now_ms, out),
            Gate::SagaCommit => {
                tx.decide(Outcome::Committed, out);
                tx.finish(out);
            }
            other => unreachable!("a saga never waits on {other:?}"),
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
            (Op::Execute, Reply::Succeeded) => {
                tx.set_state(b, BranchState::Succeeded);
                if phase == Phase::Active {
                    let next = b + 1;
                    if next == tx.rec.branches.len() {
                        tx.rec.phase = Phase::Committed;
                        tx.persist(now_ms, true, Some(Gate::SagaCommit), out);
                    } else {
                        // Unforced: a lost step record only repeats the (idempotent) step.
                        tx.persist(now_ms, false, None, out);
                        tx.start_op(next, Op::Execute, out);
                    }
                }
            }
            (Op::Execute, Reply::Failed(why)) => {
                tx.set_state(b, BranchState::Failed);
                if phase == Phase::Active {
                    tx.set_reason(|r| failed_reason(r, b, &why));
                }
                tx.rec.branches[b].last_error = why;
                if phase == Phase::Active {
                    start_compensation(tx, now_ms, out);
                }
            }
            (Op::Compensate, Reply::Done) => {
                tx.set_state(b, BranchState::Aborted);
                compensate_next(tx, now_ms, out);
            }
            (op, reply) => unreachable!("a saga never takes {reply:?} to {op:?}"),
        }
    }

    fn after_resolution(&self, tx: &mut Tx, now_ms: u64, _op: Op, out: &mut Vec<Command>) {
        compensate_next(tx, now_ms, out);
    }
}

/// The reason when step `b` answered FAILED with `why`.
fn failed_reason(rec: &TxRecord, b: usize, why: &str) -> String {
    format!("{} failed: {why}", Tx::describe_branch(rec, b, "step"))
}

/// The reason when the forward run's deadline passed: the step that had not answered.
fn deadline_reason(rec: &TxRecord) -> String {
    Tx::deadline_reason(rec, "step", |s| s == BranchState::InDoubt)
}

/// A step failed or the deadline passed. Forced: once compensation starts, recovery must not
/// resume the forward run.
fn start_compensation(tx: &mut Tx, now_ms: u64, out: &mut Vec<Command>) {
    debug_assert_eq!(tx.rec.mode, Mode::Saga);
    tx.rec.phase = Phase::Compensating;
    tx.persist(now_ms, true, Some(Gate::Compensation), out);
}

/// Compensate the highest step that ran or may have run, or finish.
fn compensate_next(tx: &mut Tx, now_ms: u64, out: &mut Vec<Command>) {
    debug_assert_eq!(tx.rec.phase, Phase::Compensating);
    if tx.gate.is_some() {
        return;
    }
    let needs = |s: BranchState| matches!(s, BranchState::Succeeded | BranchState::InDoubt);
    let pending: Vec<usize> = (0..tx.rec.branches.len())
        .filter(|&b| needs(tx.rec.branches[b].state))
        .collect();
    // A compensation already in flight finishes first (one at a time, in order).
    if tx
        .calls
        .iter()
        .any(|c| c.op == Some(Op::Compensate) && c.status != super::machine::CallStatus::Idle)
    {
        return;
    }
    let next = if mutated!(tx, skip_one_compensation) && pending.len() > 1 {
        // Deliberate bug: pretend the lowest one was done.
        let low = pending[0];
        tx.rec.branches[low].state = BranchState::Aborted;
        pending.last().copied()
    } else if mutated!(tx, compensate_forward) {
        // Deliberate bug: lowest first.
        pending.first().copied()
    } else {
        pending.last().copied()
    };
    match next {
        Some(b) => tx.start_op(b, Op::Compensate, out),
        None => {
            tx.rec.phase = Phase::Aborted;
            tx.rec.stuck = false;
            tx.persist(now_ms, false, None, out);
            tx.decide(Outcome::Aborted, out);
            tx.finish(out);
        }
    }
}
