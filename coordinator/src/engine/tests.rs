//! Table-driven tests of every transition. Each case is a list of steps: an event and the
//! commands it must produce, rendered compactly (`persist(Committing,forced)`,
//! `call(0,Commit,1)`, `retry(1,Prepare,2)`, `deadline`, `decided(Committed)`, `finished`).

use super::machine::{Command, Event, NewTx, Op, Reply, Tx};
use super::types::*;
use bytes::Bytes;

const DEADLINE: u64 = 10_000;

fn new_tx(mode: Mode, n: usize) -> Tx {
    let branches = (0..n)
        .map(|i| BranchDef {
            endpoint: format!("http://127.0.0.1:{}", 7000 + i),
            handler: "h".into(),
            payload: Bytes::from_static(b"p"),
            compensation_payload: Bytes::from_static(b"c"),
        })
        .collect();
    Tx::new(
        NewTx {
            gid: "g1".into(),
            mode,
            branches,
            deadline_unix_ms: DEADLINE,
            retry: RetryPolicy {
                initial_backoff_ms: 100,
                max_backoff_ms: 1_000,
                stuck_after_attempts: 3,
            },
            trace_parent: None,
        },
        0,
    )
}

fn render(c: &Command) -> String {
    match c {
        Command::Persist { record, forced } => format!(
            "persist({:?}{})",
            record.phase,
            if *forced { ",forced" } else { "" }
        ),
        Command::Call {
            branch,
            op,
            attempt,
        } => format!("call({branch},{op:?},{attempt})"),
        Command::ScheduleRetry {
            branch,
            op,
            attempt,
            ..
        } => format!("retry({branch},{op:?},{attempt})"),
        Command::SetDeadline { .. } => "deadline".into(),
        Command::Decided(o) => format!("decided({o:?})"),
        Command::Finished => "finished".into(),
    }
}

/// Feed each event at time 1 and compare the commands with the expectation.
fn run(tx: &mut Tx, steps: &[(Event, &[&str])]) {
    run_at(tx, 1, steps)
}

fn run_at(tx: &mut Tx, now: u64, steps: &[(Event, &[&str])]) {
    for (i, (ev, want)) in steps.iter().enumerate() {
        let got: Vec<String> = tx.handle(now, ev.clone()).iter().map(render).collect();
        assert_eq!(got, *want, "step {i}: {ev:?}");
    }
}

fn reply(branch: u32, op: Op, attempt: u32, reply: Reply) -> Event {
    Event::Reply {
        branch,
        op,
        attempt,
        reply,
    }
}

fn transient(branch: u32, op: Op, attempt: u32) -> Event {
    reply(branch, op, attempt, Reply::Transient("unavailable".into()))
}

fn durable(seq: u64) -> Event {
    Event::Durable { seq }
}

use Op::*;
use Reply::{Done, Failed, Prepared, Refused, Succeeded};

#[test]
fn two_phase_commits_only_after_the_decision_is_durable() {
    let mut tx = new_tx(Mode::TwoPhase, 2);
    run(
        &mut tx,
        &[
            (Event::Start, &["persist(Active,forced)", "deadline"]),
            (durable(1), &["call(0,Prepare,1)", "call(1,Prepare,1)"]),
            (reply(0, Prepare, 1, Prepared), &[]),
            (
                reply(1, Prepare, 1, Prepared),
                &["persist(Committing,forced)"],
            ),
            (Event::DeadlinePassed, &[]),
            (
                durable(2),
                &["decided(Committed)", "call(0,Commit,1)", "call(1,Commit,1)"],
            ),
            (reply(1, Commit, 1, Done), &[]),
            (reply(1, Commit, 1, Done), &[]),
            (
                reply(0, Commit, 1, Done),
                &["persist(Committed)", "finished"],
            ),
            (reply(0, Commit, 1, Done), &[]),
        ],
    );
    assert!(tx.is_finished());
    assert_eq!(tx.record().phase, Phase::Committed);
}

#[test]
fn two_phase_refusal_aborts_every_branch() {
    let mut tx = new_tx(Mode::TwoPhase, 3);
    run(
        &mut tx,
        &[
            (Event::Start, &["persist(Active,forced)", "deadline"]),
            (
                durable(1),
                &[
                    "call(0,Prepare,1)",
                    "call(1,Prepare,1)",
                    "call(2,Prepare,1)",
                ],
            ),
            (reply(0, Prepare, 1, Prepared), &[]),
            (
                reply(1, Prepare, 1, Refused("no funds".into())),
                &[
                    "persist(Aborting)",
                    "decided(Aborted)",
                    "call(0,Abort,1)",
                    "call(1,Abort,1)",
                    "call(2,Abort,1)",
                ],
            ),
            // A late prepare answer for a branch now aborting is ignored.
            (reply(2, Prepare, 1, Prepared), &[]),
            (reply(0, Abort, 1, Done), &[]),
            (reply(1, Abort, 1, Done), &[]),
            (reply(2, Abort, 1, Done), &["persist(Aborted)", "finished"]),
        ],
    );
    assert_eq!(tx.record().branches[1].last_error, "no funds");
}

#[test]
fn two_phase_deadline_aborts_including_silent_branches() {
    let mut tx = new_tx(Mode::TwoPhase, 2);
    run(
        &mut tx,
        &[
            (Event::Start, &["persist(Active,forced)", "deadline"]),
            (durable(1), &["call(0,Prepare,1)", "call(1,Prepare,1)"]),
            (reply(0, Prepare, 1, Prepared), &[]),
            (
                Event::DeadlinePassed,
                &[
                    "persist(Aborting)",
                    "decided(Aborted)",
                    "call(0,Abort,1)",
                    "call(1,Abort,1)",
                ],
            ),
            (Event::DeadlinePassed, &[]),
        ],
    );
}

#[test]
fn deadline_passed_while_begun_was_written_aborts_before_any_call() {
    let mut tx = new_tx(Mode::TwoPhase, 1);
    run(
        &mut tx,
        &[(Event::Start, &["persist(Active,forced)", "deadline"])],
    );
    run(&mut tx, &[(Event::DeadlinePassed, &[])]);
    run_at(
        &mut tx,
        DEADLINE,
        &[(
            durable(1),
            &["persist(Aborting)", "decided(Aborted)", "call(0,Abort,1)"],
        )],
    );
}

#[test]
fn transient_prepare_is_retried_with_backoff_and_stale_errors_are_ignored() {
    let mut tx = new_tx(Mode::TwoPhase, 1);
    run(
        &mut tx,
        &[
            (Event::Start, &["persist(Active,forced)", "deadline"]),
            (durable(1), &["call(0,Prepare,1)"]),
            (transient(0, Prepare, 1), &["retry(0,Prepare,2)"]),
            // A duplicate failure of the same attempt does not schedule a second retry.
            (transient(0, Prepare, 1), &[]),
            // A timer for another attempt is ignored.
            (
                Event::RetryDue {
                    branch: 0,
                    op: Prepare,
                    attempt: 5,
                },
                &[],
            ),
            (
                Event::RetryDue {
                    branch: 0,
                    op: Prepare,
                    attempt: 2,
                },
                &["call(0,Prepare,2)"],
            ),
            // The first attempt's error arriving late changes nothing.
            (transient(0, Prepare, 1), &[]),
            // But its success counts: the barrier answers every attempt alike.
            (
                reply(0, Prepare, 1, Prepared),
                &["persist(Committing,forced)"],
            ),
            (reply(0, Prepare, 2, Prepared), &[]),
        ],
    );
    assert_eq!(tx.record().branches[0].attempts, 2);
}

#[test]
fn replies_for_unknown_branches_or_wrong_operations_are_ignored() {
    let mut tx = new_tx(Mode::TwoPhase, 1);
    run(
        &mut tx,
        &[
            (Event::Start, &["persist(Active,forced)", "deadline"]),
            (durable(1), &["call(0,Prepare,1)"]),
            (reply(7, Prepare, 1, Prepared), &[]),
            (reply(0, Commit, 1, Done), &[]),
            (reply(0, Execute, 1, Succeeded), &[]),
            (
                Event::RetryDue {
                    branch: 9,
                    op: Prepare,
                    attempt: 2,
                },
                &[],
            ),
        ],
    );
    assert_eq!(tx.record().branches[0].state, BranchState::InDoubt);
}

#[test]
fn a_wrong_kind_of_answer_is_treated_as_transient() {
    let mut tx = new_tx(Mode::TwoPhase, 1);
    run(
        &mut tx,
        &[
            (Event::Start, &["persist(Active,forced)", "deadline"]),
            (durable(1), &["call(0,Prepare,1)"]),
            (reply(0, Prepare, 1, Done), &["retry(0,Prepare,2)"]),
        ],
    );
    assert!(tx.record().branches[0].last_error.contains("unexpected"));
}

#[test]
fn phase_two_failures_are_retried_forever_and_flag_stuck() {
    let mut tx = new_tx(Mode::TwoPhase, 1);
    run(
        &mut tx,
        &[
            (Event::Start, &["persist(Active,forced)", "deadline"]),
            (durable(1), &["call(0,Prepare,1)"]),
            (
                reply(0, Prepare, 1, Prepared),
                &["persist(Committing,forced)"],
            ),
            (durable(2), &["decided(Committed)", "call(0,Commit,1)"]),
            (transient(0, Commit, 1), &["retry(0,Commit,2)"]),
        ],
    );
    let due = |attempt| Event::RetryDue {
        branch: 0,
        op: Commit,
        attempt,
    };
    run(
        &mut tx,
        &[
            (due(2), &["call(0,Commit,2)"]),
            (transient(0, Commit, 2), &["retry(0,Commit,3)"]),
            (due(3), &["call(0,Commit,3)"]),
            // Third failed attempt reaches stuck_after_attempts = 3.
            (
                transient(0, Commit, 3),
                &["persist(Committing)", "retry(0,Commit,4)"],
            ),
            (due(4), &["call(0,Commit,4)"]),
            (transient(0, Commit, 4), &["retry(0,Commit,5)"]),
        ],
    );
    assert!(tx.record().stuck);
    // The operator's Retry sends it now; success ends the transaction and clears the flag.
    run(
        &mut tx,
        &[
            (Event::RetryNow, &["call(0,Commit,5)"]),
            (due(5), &[]),
            (
                reply(0, Commit, 5, Done),
                &["persist(Committed)", "finished"],
            ),
        ],
    );
    assert!(!tx.record().stuck);
}

#[test]
fn backoff_bound_doubles_up_to_the_cap() {
    let p = RetryPolicy {
        initial_backoff_ms: 100,
        max_backoff_ms: 30_000,
        stuck_after_attempts: 10,
    };
    let bounds: Vec<u64> = (1..=10).map(|a| p.backoff_bound_ms(a)).collect();
    assert_eq!(
        bounds,
        [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000]
    );
    assert_eq!(p.backoff_bound_ms(u32::MAX), 30_000);
}

/// The formula documented on `RetryPolicy` in types.proto, to the edges: the exponent stops at
/// 40 and the product saturates instead of overflowing.
#[test]
fn backoff_bound_exponent_is_capped_at_40_and_saturates() {
    let uncapped = RetryPolicy {
        initial_backoff_ms: 1,
        max_backoff_ms: u64::MAX,
        stuck_after_attempts: 10,
    };
    assert_eq!(uncapped.backoff_bound_ms(41), 1 << 40);
    assert_eq!(uncapped.backoff_bound_ms(1_000), 1 << 40);
    let huge = RetryPolicy {
        initial_backoff_ms: u64::MAX / 2,
        ..uncapped
    };
    assert_eq!(huge.backoff_bound_ms(3), u64::MAX);
}

fn recovered(mode: Mode, phase: Phase, states: &[BranchState]) -> Tx {
    let mut tx = new_tx(mode, states.len());
    let mut rec = tx.record().clone();
    rec.phase = phase;
    rec.seq = 4;
    for (b, s) in rec.branches.iter_mut().zip(states) {
        b.state = *s;
    }
    tx = Tx::recover(rec);
    tx
}

use BranchState as S;

#[test]
fn recovery_follows_the_log() {
    let cases: &[(Mode, Phase, &[BranchState], &[&str])] = &[
        // 2PC without a decision: presumed abort, every branch.
        (
            Mode::TwoPhase,
            Phase::Active,
            &[S::Prepared, S::InDoubt],
            &[
                "persist(Aborting)",
                "decided(Aborted)",
                "call(0,Abort,1)",
                "call(1,Abort,1)",
            ],
        ),
        // Decided commit: resend Commit to the branches not done.
        (
            Mode::TwoPhase,
            Phase::Committing,
            &[S::Committed, S::Prepared],
            &["decided(Committed)", "call(1,Commit,1)"],
        ),
        (
            Mode::TwoPhase,
            Phase::Committing,
            &[S::Committed, S::Committed],
            &["decided(Committed)", "persist(Committed)", "finished"],
        ),
        (
            Mode::TwoPhase,
            Phase::Aborting,
            &[S::Aborted, S::Refused],
            &["decided(Aborted)", "call(1,Abort,1)"],
        ),
        // Saga forward: resume at the first step not known to have succeeded.
        (
            Mode::Saga,
            Phase::Active,
            &[S::Succeeded, S::Pending, S::Pending],
            &["deadline", "call(1,Execute,1)"],
        ),
        // All steps recorded as succeeded, final record lost: commit.
        (
            Mode::Saga,
            Phase::Active,
            &[S::Succeeded, S::Succeeded],
            &["persist(Committed,forced)"],
        ),
        // Compensating: continue from the highest step that may have run.
        (
            Mode::Saga,
            Phase::Compensating,
            &[S::Succeeded, S::Aborted, S::Failed],
            &["call(0,Compensate,1)"],
        ),
        (
            Mode::Saga,
            Phase::Compensating,
            &[S::Aborted, S::Failed],
            &["persist(Aborted)", "decided(Aborted)", "finished"],
        ),
        (
            Mode::Saga,
            Phase::Committed,
            &[S::Succeeded],
            &["decided(Committed)", "finished"],
        ),
    ];
    for (mode, phase, states, want) in cases {
        let mut tx = recovered(*mode, *phase, states);
        let got: Vec<String> = tx.handle(1, Event::Recovered).iter().map(render).collect();
        assert_eq!(&got, want, "{mode:?} {phase:?} {states:?}");
    }
}

#[test]
fn recovered_saga_past_its_deadline_compensates_every_step_that_may_have_run() {
    let mut tx = recovered(
        Mode::Saga,
        Phase::Active,
        &[S::Succeeded, S::Pending, S::Pending],
    );
    run_at(
        &mut tx,
        DEADLINE + 1,
        &[
            (Event::Recovered, &["persist(Compensating,forced)"]),
            (durable(5), &["call(2,Compensate,1)"]),
            (reply(2, Compensate, 1, Done), &["call(1,Compensate,1)"]),
            (reply(1, Compensate, 1, Done), &["call(0,Compensate,1)"]),
            (
                reply(0, Compensate, 1, Done),
                &["persist(Aborted)", "decided(Aborted)", "finished"],
            ),
        ],
    );
}

#[test]
fn saga_success_runs_steps_in_order() {
    let mut tx = new_tx(Mode::Saga, 3);
    run(
        &mut tx,
        &[
            (Event::Start, &["persist(Active,forced)", "deadline"]),
            (durable(1), &["call(0,Execute,1)"]),
            (
                reply(0, Execute, 1, Succeeded),
                &["persist(Active)", "call(1,Execute,1)"],
            ),
            (reply(0, Execute, 1, Succeeded), &[]),
            (
                reply(1, Execute, 1, Succeeded),
                &["persist(Active)", "call(2,Execute,1)"],
            ),
            (
                reply(2, Execute, 1, Succeeded),
                &["persist(Committed,forced)"],
            ),
            (durable(3), &[]),
            (durable(4), &["decided(Committed)", "finished"]),
        ],
    );
}

#[test]
fn saga_failure_compensates_in_reverse_order_one_at_a_time() {
    let mut tx = new_tx(Mode::Saga, 4);
    run(
        &mut tx,
        &[
            (Event::Start, &["persist(Active,forced)", "deadline"]),
            (durable(1), &["call(0,Execute,1)"]),
            (
                reply(0, Execute, 1, Succeeded),
                &["persist(Active)", "call(1,Execute,1)"],
            ),
            (
                reply(1, Execute, 1, Succeeded),
                &["persist(Active)", "call(2,Execute,1)"],
            ),
            (
                reply(2, Execute, 1, Failed("no seats".into())),
                &["persist(Compensating,forced)"],
            ),
            (durable(3), &[]),
            // The failed step applied nothing: compensation starts at step 1.
            (durable(4), &["call(1,Compensate,1)"]),
            (transient(1, Compensate, 1), &["retry(1,Compensate,2)"]),
            (
                Event::RetryDue {
                    branch: 1,
                    op: Compensate,
                    attempt: 2,
                },
                &["call(1,Compensate,2)"],
            ),
            (reply(1, Compensate, 2, Done), &["call(0,Compensate,1)"]),
            (
                reply(0, Compensate, 1, Done),
                &["persist(Aborted)", "decided(Aborted)", "finished"],
            ),
        ],
    );
    let states: Vec<BranchState> = tx.record().branches.iter().map(|b| b.state).collect();
    assert_eq!(states, [S::Aborted, S::Aborted, S::Failed, S::Pending]);
}

#[test]
fn saga_deadline_compensates_the_step_in_flight() {
    let mut tx = new_tx(Mode::Saga, 2);
    run(
        &mut tx,
        &[
            (Event::Start, &["persist(Active,forced)", "deadline"]),
            (durable(1), &["call(0,Execute,1)"]),
            (
                reply(0, Execute, 1, Succeeded),
                &["persist(Active)", "call(1,Execute,1)"],
            ),
            (transient(1, Execute, 1), &["retry(1,Execute,2)"]),
            (Event::DeadlinePassed, &["persist(Compensating,forced)"]),
            // The backoff of a forward step no longer matters.
            (
                Event::RetryDue {
                    branch: 1,
                    op: Execute,
                    attempt: 2,
                },
                &[],
            ),
            (durable(3), &["call(1,Compensate,1)"]),
            // A late success of the step being compensated is ignored.
            (reply(1, Execute, 1, Succeeded), &[]),
            (reply(1, Compensate, 1, Done), &["call(0,Compensate,1)"]),
            (
                reply(0, Compensate, 1, Done),
                &["persist(Aborted)", "decided(Aborted)", "finished"],
            ),
        ],
    );
}

#[test]
fn late_success_while_the_compensation_record_is_written_is_compensated() {
    let mut tx = new_tx(Mode::Saga, 2);
    run(
        &mut tx,
        &[
            (Event::Start, &["persist(Active,forced)", "deadline"]),
            (durable(1), &["call(0,Execute,1)"]),
            (Event::DeadlinePassed, &["persist(Compensating,forced)"]),
            (reply(0, Execute, 1, Succeeded), &[]),
            (durable(2), &["call(0,Compensate,1)"]),
        ],
    );
    assert_eq!(tx.record().branches[0].state, S::Succeeded);
    assert_eq!(tx.record().branches[1].state, S::Pending);
}

#[test]
fn finished_transactions_ignore_everything() {
    let mut tx = recovered(Mode::TwoPhase, Phase::Aborted, &[S::Aborted]);
    tx.handle(1, Event::Recovered);
    assert!(tx.is_finished());
    for ev in [
        Event::RetryNow,
        Event::DeadlinePassed,
        reply(0, Abort, 1, Done),
        durable(9),
    ] {
        assert!(tx.handle(1, ev).is_empty());
    }
}

#[test]
fn outcome_is_reported_from_the_recorded_phase() {
    let cases = [
        (Phase::Active, Outcome::Pending),
        (Phase::Compensating, Outcome::Pending),
        (Phase::Committing, Outcome::Committed),
        (Phase::Committed, Outcome::Committed),
        (Phase::Aborting, Outcome::Aborted),
        (Phase::Aborted, Outcome::Aborted),
    ];
    for (phase, want) in cases {
        let tx = recovered(Mode::TwoPhase, phase, &[S::Pending]);
        assert_eq!(tx.record().outcome(), want, "{phase:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Say why: every way to undo a transaction records its reason in the record that decides it.
// ---------------------------------------------------------------------------------------

/// The reason carried by the last record the commands write.
fn written_reason(cmds: &[Command]) -> Option<Option<String>> {
    cmds.iter().rev().find_map(|c| match c {
        Command::Persist { record, .. } => Some(record.reason.clone()),
        _ => None,
    })
}

/// Feeds `steps` (events at time 1) and returns the commands of the last one.
fn feed(tx: &mut Tx, events: Vec<Event>) -> Vec<Command> {
    events
        .into_iter()
        .map(|e| tx.handle(1, e))
        .last()
        .unwrap_or_default()
}

#[test]
fn a_refused_prepare_is_the_reason_of_the_abort() {
    let mut tx = new_tx(Mode::TwoPhase, 2);
    let cmds = feed(
        &mut tx,
        vec![
            Event::Start,
            durable(1),
            reply(0, Prepare, 1, Prepared),
            reply(
                1,
                Prepare,
                1,
                Refused("insufficient funds: alice has 75".into()),
            ),
        ],
    );
    let why = "branch 1 (h at http://127.0.0.1:7001) refused: insufficient funds: alice has 75";
    assert_eq!(written_reason(&cmds), Some(Some(why.into())));
    // The cause stays through phase two, into the final record.
    feed(&mut tx, vec![reply(0, Abort, 1, Done)]);
    let cmds = feed(&mut tx, vec![reply(1, Abort, 1, Done)]);
    assert_eq!(render(&cmds[0]), "persist(Aborted)");
    assert_eq!(written_reason(&cmds), Some(Some(why.into())));
}

#[test]
fn only_the_first_refusal_is_the_reason() {
    let mut tx = new_tx(Mode::TwoPhase, 2);
    feed(
        &mut tx,
        vec![
            Event::Start,
            durable(1),
            reply(0, Prepare, 1, Refused("first".into())),
            reply(1, Prepare, 1, Refused("second".into())),
        ],
    );
    assert_eq!(
        tx.record().reason.as_deref(),
        Some("branch 0 (h at http://127.0.0.1:7000) refused: first")
    );
}

#[test]
fn a_failed_saga_step_is_the_reason_of_the_compensation() {
    let mut tx = new_tx(Mode::Saga, 3);
    let cmds = feed(
        &mut tx,
        vec![
            Event::Start,
            durable(1),
            reply(0, Execute, 1, Succeeded),
            reply(1, Execute, 1, Failed("no seats".into())),
        ],
    );
    let why = "step 1 (h at http://127.0.0.1:7001) failed: no seats";
    assert_eq!(render(&cmds[0]), "persist(Compensating,forced)");
    assert_eq!(written_reason(&cmds), Some(Some(why.into())));
    feed(&mut tx, vec![durable(3)]);
    let cmds = feed(&mut tx, vec![reply(0, Compensate, 1, Done)]);
    assert_eq!(render(&cmds[0]), "persist(Aborted)");
    assert_eq!(written_reason(&cmds), Some(Some(why.into())));
}

#[test]
fn the_deadline_names_the_branches_still_in_doubt() {
    let mut tx = new_tx(Mode::TwoPhase, 3);
    let cmds = feed(
        &mut tx,
        vec![
            Event::Start,
            durable(1),
            reply(0, Prepare, 1, Prepared),
            transient(2, Prepare, 1),
            Event::DeadlinePassed,
        ],
    );
    assert_eq!(
        written_reason(&cmds),
        Some(Some(
            "deadline passed while branch 1 (h at http://127.0.0.1:7001), branch 2 (h at \
             http://127.0.0.1:7002) were in doubt (branch 2's last error: unavailable)"
                .into()
        ))
    );

    let mut tx = new_tx(Mode::Saga, 2);
    let cmds = feed(
        &mut tx,
        vec![
            Event::Start,
            durable(1),
            reply(0, Execute, 1, Succeeded),
            Event::DeadlinePassed,
        ],
    );
    assert_eq!(
        written_reason(&cmds),
        Some(Some(
            "deadline passed while step 1 (h at http://127.0.0.1:7001) was in doubt".into()
        ))
    );

    // The deadline passed while `Begun` was being written: nothing was called.
    let mut tx = new_tx(Mode::TwoPhase, 1);
    feed(&mut tx, vec![Event::Start]);
    let cmds = tx.handle(DEADLINE, durable(1));
    assert_eq!(
        written_reason(&cmds),
        Some(Some("deadline passed before any branch was called".into()))
    );
}

#[test]
fn recovery_gives_its_own_reason_and_keeps_a_recorded_one() {
    let mut tx = recovered(Mode::TwoPhase, Phase::Active, &[S::Prepared, S::InDoubt]);
    let cmds = tx.handle(1, Event::Recovered);
    assert_eq!(
        written_reason(&cmds),
        Some(Some(
            "the coordinator restarted before every branch had prepared (presumed abort)".into()
        ))
    );

    let mut rec = new_tx(Mode::Saga, 2).record().clone();
    rec.phase = Phase::Active;
    rec.seq = 4;
    rec.branches[0].state = S::Succeeded;
    rec.branches[1].state = S::Failed;
    rec.branches[1].last_error = "no seats".into();
    let mut tx = Tx::recover(rec);
    let cmds = tx.handle(1, Event::Recovered);
    assert_eq!(
        written_reason(&cmds),
        Some(Some(
            "step 1 (h at http://127.0.0.1:7001) failed: no seats".into()
        ))
    );

    let mut rec = new_tx(Mode::TwoPhase, 1).record().clone();
    rec.phase = Phase::Aborting;
    rec.seq = 4;
    rec.reason = Some("branch 0 refused: recorded before the crash".into());
    let mut tx = Tx::recover(rec);
    feed(&mut tx, vec![Event::Recovered]);
    let cmds = tx.handle(1, reply(0, Abort, 1, Done));
    assert_eq!(
        written_reason(&cmds),
        Some(Some("branch 0 refused: recorded before the crash".into()))
    );
}

#[test]
fn a_commit_has_no_reason_and_a_long_one_is_cut() {
    let mut tx = new_tx(Mode::TwoPhase, 1);
    let cmds = feed(
        &mut tx,
        vec![Event::Start, durable(1), reply(0, Prepare, 1, Prepared)],
    );
    assert_eq!(written_reason(&cmds), Some(None));

    let mut tx = new_tx(Mode::TwoPhase, 1);
    feed(
        &mut tx,
        vec![
            Event::Start,
            durable(1),
            reply(0, Prepare, 1, Refused("é".repeat(4 * REASON_BYTES_MAX))),
        ],
    );
    let why = tx.record().reason.clone().expect("a reason");
    assert!(why.len() <= REASON_BYTES_MAX, "{} bytes", why.len());
    assert!(why.starts_with("branch 0 (h at http://127.0.0.1:7000) refused: éé"));
    assert!(why.ends_with('…'));
}
