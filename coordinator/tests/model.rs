//! Model checking of the two protocols with `stateright` (DESIGN.md sections 4, 5 and 11).
//!
//! These are abstract models of the rules the engine follows, not the engine itself (the
//! simulation in `simulation.rs` runs the real engine): small enough to explore every
//! interleaving, with bounded coordinator crashes.
//!
//! - **2PC, presumed abort**, 3 participants: the coordinator's durable record (`Begun`,
//!   `Committing`, `Aborting`, ended) survives a crash; its volatile state (prepare answers,
//!   phase-two progress) and any unforced write not yet flushed do not. Participants'
//!   states are durable (the barrier); one that crashes before it prepared loses its work and
//!   refuses. Messages live in a set: each may be delivered any number of times, late, in any
//!   order, or never. A prepared participant may ask the coordinator for the outcome.
//! - **Saga** of 3 steps: forward execution one step at a time (step records unforced), a
//!   business failure or the deadline writes a forced `Compensating` record, compensation runs
//!   in reverse over every step that ran or may have run; the barrier turns a compensation of a
//!   step that never ran into a no-op that refuses the step later.
//!
//! Each model also has a deliberately broken variant, which the checker must refute: proof
//! that the properties can fail.

use stateright::{Checker, Model, Property};
use std::collections::BTreeSet;

/// Coordinator crashes explored per run.
const CRASHES_MAX: u8 = 2;

// =============================================================================================
// Model 1: two-phase commit, presumed abort.

const N: usize = 3;

/// A participant's durable state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Rm {
    Working,
    Prepared,
    Committed,
    Aborted,
}

/// The coordinator's record of the transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Logged {
    Begun,
    Committing,
    Aborting,
    Committed,
    Aborted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum TmPhase {
    Preparing,
    Committing,
    Aborting,
    Ended,
}

/// The coordinator's volatile state: lost on a crash.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Tm {
    phase: TmPhase,
    prepared: [bool; N],
    done: [bool; N],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Msg {
    Prepare,
    Prepared(usize),
    Refused(usize),
    Commit,
    Abort,
    /// Phase two done at participant `.0`; `.1`: it was a commit.
    Done(usize, bool),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TpcState {
    rm: [Rm; N],
    /// `None` while the coordinator is down.
    tm: Option<Tm>,
    /// What a crash leaves.
    durable: Logged,
    /// The latest unforced write, not flushed yet.
    pending: Option<Logged>,
    msgs: BTreeSet<Msg>,
    crashes: u8,
}

impl TpcState {
    /// What the log answers now (`Coordinator.Outcome` reads it).
    fn visible(&self) -> Logged {
        self.pending.unwrap_or(self.durable)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TpcAction {
    TmSendPrepare,
    RmPrepare(usize),
    RmRefuse(usize),
    /// A participant that has not prepared crashes: its uncommitted work is gone.
    RmCrashBeforePrepare(usize),
    /// An aborted participant answers a (repeated) prepare with REFUSED (the barrier).
    RmRefuseAgain(usize),
    TmRcvPrepared(usize),
    TmCommit,
    /// A refusal arrived or the deadline passed.
    TmAbort,
    TmSendCommit,
    TmSendAbort,
    RmRcvCommit(usize),
    RmRcvAbort(usize),
    TmRcvDone(usize),
    /// An unforced write reaches the disk (a later flush, group commit).
    TmFlush,
    TmCrash,
    TmRecover,
    /// A prepared participant in doubt asks `Coordinator.Outcome`.
    RmAskOutcome(usize),
}

struct TwoPhase {
    /// The bug to refute: the commit decision is written unforced and `Commit` is sent
    /// before it is durable.
    commit_before_durable: bool,
}

impl Model for TwoPhase {
    type State = TpcState;
    type Action = TpcAction;

    fn init_states(&self) -> Vec<TpcState> {
        // `Begun` is forced before anything else happens.
        vec![TpcState {
            rm: [Rm::Working; N],
            tm: Some(Tm {
                phase: TmPhase::Preparing,
                prepared: [false; N],
                done: [false; N],
            }),
            durable: Logged::Begun,
            pending: None,
            msgs: BTreeSet::new(),
            crashes: 0,
        }]
    }

    fn actions(&self, s: &TpcState, a: &mut Vec<TpcAction>) {
        use TpcAction::*;
        for i in 0..N {
            if s.msgs.contains(&Msg::Prepare) && s.rm[i] == Rm::Working {
                a.push(RmPrepare(i));
                a.push(RmRefuse(i));
            }
            if s.rm[i] == Rm::Working {
                a.push(RmCrashBeforePrepare(i));
            }
            if s.msgs.contains(&Msg::Prepare)
                && s.rm[i] == Rm::Aborted
                && !s.msgs.contains(&Msg::Refused(i))
            {
                a.push(RmRefuseAgain(i));
            }
            if s.msgs.contains(&Msg::Commit) && !s.msgs.contains(&Msg::Done(i, true)) {
                a.push(RmRcvCommit(i));
            }
            if s.msgs.contains(&Msg::Abort) && !s.msgs.contains(&Msg::Done(i, false)) {
                a.push(RmRcvAbort(i));
            }
            if s.rm[i] == Rm::Prepared && s.tm.is_some() {
                a.push(RmAskOutcome(i));
            }
        }
        match &s.tm {
            None => a.push(TmRecover),
            Some(tm) => {
                match tm.phase {
                    TmPhase::Preparing => {
                        if !s.msgs.contains(&Msg::Prepare) {
                            a.push(TmSendPrepare);
                        }
                        for i in 0..N {
                            if !tm.prepared[i] && s.msgs.contains(&Msg::Prepared(i)) {
                                a.push(TmRcvPrepared(i));
                            }
                        }
                        if tm.prepared.iter().all(|&p| p) {
                            a.push(TmCommit);
                        }
                        // Any refusal, or the deadline (which may pass at any time).
                        a.push(TmAbort);
                    }
                    TmPhase::Committing | TmPhase::Aborting => {
                        let commit = tm.phase == TmPhase::Committing;
                        let m = if commit { Msg::Commit } else { Msg::Abort };
                        if !s.msgs.contains(&m) {
                            a.push(if commit { TmSendCommit } else { TmSendAbort });
                        }
                        for i in 0..N {
                            if !tm.done[i] && s.msgs.contains(&Msg::Done(i, commit)) {
                                a.push(TmRcvDone(i));
                            }
                        }
                    }
                    TmPhase::Ended => {}
                }
                if s.pending.is_some() {
                    a.push(TmFlush);
                }
                if s.crashes < CRASHES_MAX {
                    a.push(TmCrash);
                }
            }
        }
    }

    fn next_state(&self, last: &TpcState, action: TpcAction) -> Option<TpcState> {
        use TpcAction::*;
        let mut s = last.clone();
        match action {
            TmSendPrepare => {
                s.msgs.insert(Msg::Prepare);
            }
            RmPrepare(i) => {
                s.rm[i] = Rm::Prepared;
                s.msgs.insert(Msg::Prepared(i));
            }
            RmRefuse(i) => {
                s.rm[i] = Rm::Aborted;
                s.msgs.insert(Msg::Refused(i));
            }
            RmCrashBeforePrepare(i) => s.rm[i] = Rm::Aborted,
            RmRefuseAgain(i) => {
                s.msgs.insert(Msg::Refused(i));
            }
            TmRcvPrepared(i) => s.tm.as_mut()?.prepared[i] = true,
            TmCommit => {
                if self.commit_before_durable {
                    s.pending = Some(Logged::Committing);
                } else {
                    // Forced: durable, with every write before it.
                    s.durable = Logged::Committing;
                    s.pending = None;
                }
                s.tm.as_mut()?.phase = TmPhase::Committing;
            }
            TmAbort => {
                // Unforced (presumed abort): a lost `Aborting` reads back as `Begun`.
                s.pending = Some(Logged::Aborting);
                s.tm.as_mut()?.phase = TmPhase::Aborting;
            }
            TmSendCommit => {
                s.msgs.insert(Msg::Commit);
            }
            TmSendAbort => {
                s.msgs.insert(Msg::Abort);
            }
            RmRcvCommit(i) => {
                // The barrier: commit applies to a prepared branch; a repeat answers DONE.
                if s.rm[i] == Rm::Prepared {
                    s.rm[i] = Rm::Committed;
                }
                if s.rm[i] == Rm::Committed {
                    s.msgs.insert(Msg::Done(i, true));
                }
            }
            RmRcvAbort(i) => {
                // Rolls back a prepared branch; before prepare it is a null abort that makes
                // a later prepare refuse.
                if matches!(s.rm[i], Rm::Working | Rm::Prepared) {
                    s.rm[i] = Rm::Aborted;
                }
                if s.rm[i] == Rm::Aborted {
                    s.msgs.insert(Msg::Done(i, false));
                }
            }
            TmRcvDone(i) => {
                let tm = s.tm.as_mut()?;
                tm.done[i] = true;
                if tm.done.iter().all(|&d| d) {
                    let commit = tm.phase == TmPhase::Committing;
                    tm.phase = TmPhase::Ended;
                    s.pending = Some(if commit {
                        Logged::Committed
                    } else {
                        Logged::Aborted
                    });
                }
            }
            TmFlush => s.durable = s.pending.take()?,
            TmCrash => {
                s.tm = None;
                s.pending = None;
                s.crashes += 1;
            }
            TmRecover => {
                let phase = match s.durable {
                    // No decision on disk: presumed abort.
                    Logged::Begun => {
                        s.pending = Some(Logged::Aborting);
                        TmPhase::Aborting
                    }
                    Logged::Committing => TmPhase::Committing,
                    Logged::Aborting => TmPhase::Aborting,
                    Logged::Committed | Logged::Aborted => TmPhase::Ended,
                };
                s.tm = Some(Tm {
                    phase,
                    prepared: [false; N],
                    done: [false; N],
                });
            }
            RmAskOutcome(_) => {
                let tm = s.tm.as_ref()?;
                let commit = match tm.phase {
                    TmPhase::Preparing => return None, // PENDING: nothing changes
                    TmPhase::Committing => true,
                    TmPhase::Aborting => false,
                    TmPhase::Ended => s.visible() == Logged::Committed,
                };
                s.msgs.insert(if commit { Msg::Commit } else { Msg::Abort });
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::<Self>::always("consistent", |_, s| {
                !(s.rm.contains(&Rm::Committed) && s.rm.contains(&Rm::Aborted))
            }),
            Property::<Self>::always("no Commit before the decision is durable", |_, s| {
                !s.msgs.contains(&Msg::Commit)
                    || matches!(s.durable, Logged::Committing | Logged::Committed)
            }),
            Property::<Self>::always("an ended transaction has one outcome everywhere", |_, s| {
                match s.tm.as_ref().map(|t| t.phase) {
                    Some(TmPhase::Ended) => {
                        let want = if s.visible() == Logged::Committed {
                            Rm::Committed
                        } else {
                            Rm::Aborted
                        };
                        s.rm.iter().all(|&r| r == want)
                    }
                    _ => true,
                }
            }),
            Property::<Self>::sometimes("commit reachable", |_, s| {
                s.rm.iter().all(|&r| r == Rm::Committed)
            }),
            Property::<Self>::sometimes("abort reachable", |_, s| {
                s.rm.iter().all(|&r| r == Rm::Aborted)
            }),
            Property::<Self>::sometimes("commit reachable across a crash", |_, s| {
                s.crashes > 0 && s.rm.iter().all(|&r| r == Rm::Committed)
            }),
        ]
    }
}

#[test]
fn two_phase_commit_presumed_abort_is_consistent() {
    let started = std::time::Instant::now();
    let checker = TwoPhase {
        commit_before_durable: false,
    }
    .checker()
    .spawn_bfs()
    .join();
    let states = checker.unique_state_count();
    eprintln!(
        "2PC model ({N} participants, up to {CRASHES_MAX} coordinator crashes): \
         {states} states explored in {:.1?}",
        started.elapsed()
    );
    checker.assert_properties();
    // Exact: a change of the model shows here and is a deliberate update.
    assert_eq!(states, 20_969, "2PC model state count");
}

#[test]
fn two_phase_commit_before_durable_is_refuted() {
    let checker = TwoPhase {
        commit_before_durable: true,
    }
    .checker()
    .spawn_bfs()
    .join();
    let path = checker
        .discovery("consistent")
        .expect("committing before the decision is durable must break consistency");
    eprintln!(
        "2PC model with commit before durable: counterexample {:?}",
        path.into_actions()
    );
}

// =============================================================================================
// Model 2: saga of 3 steps with compensation.

const STEPS: usize = 3;

/// A step at its participant (durable, the barrier's rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    NotRun,
    Applied,
    /// Executed, answered FAILED: nothing applied.
    Failed,
    Compensated,
    /// Compensated before it ran: a later execute is refused.
    NullCompensated,
}

/// What the coordinator knows of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Known {
    Pending,
    /// Sent without a definite answer: it may have run.
    InDoubt,
    Succeeded,
    Failed,
    Compensated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum SagaPhase {
    Active,
    Compensating,
    Committed,
    Aborted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Rec {
    phase: SagaPhase,
    steps: [Known; STEPS],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum SagaMsg {
    Execute(usize),
    Succeeded(usize),
    Failed(usize),
    Compensate(usize),
    Compensated(usize),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SagaState {
    parts: [Step; STEPS],
    /// The coordinator's in-memory record; `None` while down.
    tm: Option<Rec>,
    durable: Rec,
    pending: Option<Rec>,
    msgs: BTreeSet<SagaMsg>,
    crashes: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum SagaAction {
    TmExecute(usize),
    RmExecuteOk(usize),
    RmExecuteFail(usize),
    /// A repeated execute: the barrier returns the first answer (or refuses after a null
    /// compensation).
    RmExecuteAgain(usize),
    TmRcvSucceeded(usize),
    TmRcvFailed(usize),
    TmDeadline,
    TmCompensate(usize),
    RmCompensate(usize),
    TmRcvCompensated(usize),
    TmFlush,
    TmCrash,
    TmRecover,
}

struct Saga {
    /// The bug to refute: compensate only the steps known to have succeeded, forgetting the
    /// one in doubt.
    forget_in_doubt: bool,
}

impl Saga {
    /// The next step to compensate: the highest that ran or may have run.
    fn to_compensate(&self, r: &Rec) -> Option<usize> {
        (0..STEPS).rev().find(|&k| match r.steps[k] {
            Known::Succeeded => true,
            Known::InDoubt => !self.forget_in_doubt,
            _ => false,
        })
    }
}

/// The step the forward run is at: the first not known to have succeeded.
fn current_step(r: &Rec) -> Option<usize> {
    (0..STEPS).find(|&k| r.steps[k] != Known::Succeeded)
}

impl Model for Saga {
    type State = SagaState;
    type Action = SagaAction;

    fn init_states(&self) -> Vec<SagaState> {
        let rec = Rec {
            phase: SagaPhase::Active,
            steps: [Known::Pending; STEPS],
        };
        vec![SagaState {
            parts: [Step::NotRun; STEPS],
            tm: Some(rec),
            durable: rec,
            pending: None,
            msgs: BTreeSet::new(),
            crashes: 0,
        }]
    }

    fn actions(&self, s: &SagaState, a: &mut Vec<SagaAction>) {
        use SagaAction::*;
        for k in 0..STEPS {
            if s.msgs.contains(&SagaMsg::Execute(k)) {
                if s.parts[k] == Step::NotRun {
                    a.push(RmExecuteOk(k));
                    a.push(RmExecuteFail(k));
                } else {
                    a.push(RmExecuteAgain(k));
                }
            }
            if s.msgs.contains(&SagaMsg::Compensate(k))
                && !s.msgs.contains(&SagaMsg::Compensated(k))
            {
                a.push(RmCompensate(k));
            }
        }
        let Some(r) = &s.tm else {
            a.push(TmRecover);
            return;
        };
        match r.phase {
            SagaPhase::Active => {
                if let Some(k) = current_step(r) {
                    if matches!(r.steps[k], Known::Pending | Known::InDoubt)
                        && !s.msgs.contains(&SagaMsg::Execute(k))
                    {
                        a.push(TmExecute(k));
                    }
                    if r.steps[k] == Known::InDoubt {
                        if s.msgs.contains(&SagaMsg::Succeeded(k)) {
                            a.push(TmRcvSucceeded(k));
                        }
                        if s.msgs.contains(&SagaMsg::Failed(k)) {
                            a.push(TmRcvFailed(k));
                        }
                    }
                }
                a.push(TmDeadline);
            }
            SagaPhase::Compensating => {
                if let Some(k) = self.to_compensate(r) {
                    if s.msgs.contains(&SagaMsg::Compensated(k)) {
                        a.push(TmRcvCompensated(k));
                    } else if !s.msgs.contains(&SagaMsg::Compensate(k)) {
                        a.push(TmCompensate(k));
                    }
                }
            }
            SagaPhase::Committed | SagaPhase::Aborted => {}
        }
        if s.pending.is_some() {
            a.push(TmFlush);
        }
        if s.crashes < CRASHES_MAX {
            a.push(TmCrash);
        }
    }

    fn next_state(&self, last: &SagaState, action: SagaAction) -> Option<SagaState> {
        use SagaAction::*;
        let mut s = last.clone();
        match action {
            TmExecute(k) => {
                s.tm.as_mut()?.steps[k] = Known::InDoubt;
                s.msgs.insert(SagaMsg::Execute(k));
            }
            RmExecuteOk(k) => {
                s.parts[k] = Step::Applied;
                s.msgs.insert(SagaMsg::Succeeded(k));
            }
            RmExecuteFail(k) => {
                s.parts[k] = Step::Failed;
                s.msgs.insert(SagaMsg::Failed(k));
            }
            RmExecuteAgain(k) => {
                s.msgs.insert(match s.parts[k] {
                    Step::Applied | Step::Compensated => SagaMsg::Succeeded(k),
                    Step::Failed | Step::NullCompensated => SagaMsg::Failed(k),
                    Step::NotRun => return None,
                });
            }
            TmRcvSucceeded(k) => {
                let r = s.tm.as_mut()?;
                r.steps[k] = Known::Succeeded;
                if k + 1 == STEPS {
                    // Forced.
                    r.phase = SagaPhase::Committed;
                    s.durable = *r;
                    s.pending = None;
                } else {
                    // Unforced: a lost step record only repeats the step.
                    s.pending = Some(*r);
                }
            }
            TmRcvFailed(k) => {
                let r = s.tm.as_mut()?;
                r.steps[k] = Known::Failed;
                r.phase = SagaPhase::Compensating;
                s.durable = *r;
                s.pending = None;
            }
            TmDeadline => {
                let r = s.tm.as_mut()?;
                r.phase = SagaPhase::Compensating;
                s.durable = *r;
                s.pending = None;
            }
            TmCompensate(k) => {
                s.msgs.insert(SagaMsg::Compensate(k));
            }
            RmCompensate(k) => {
                s.parts[k] = match s.parts[k] {
                    Step::Applied => Step::Compensated,
                    Step::NotRun => Step::NullCompensated,
                    other => other,
                };
                s.msgs.insert(SagaMsg::Compensated(k));
            }
            TmRcvCompensated(k) => {
                let r = s.tm.as_mut()?;
                r.steps[k] = Known::Compensated;
                if self.to_compensate(r).is_none() {
                    r.phase = SagaPhase::Aborted;
                }
                s.pending = Some(*r);
            }
            TmFlush => s.durable = s.pending.take()?,
            TmCrash => {
                s.tm = None;
                s.pending = None;
                s.crashes += 1;
            }
            TmRecover => {
                let mut r = s.durable;
                if r.phase == SagaPhase::Active {
                    match current_step(&r) {
                        None => {
                            // Every step succeeded, the final record was lost: commit.
                            r.phase = SagaPhase::Committed;
                            s.durable = r;
                        }
                        Some(k) => {
                            // Any step from k on may have run.
                            for st in &mut r.steps[k..] {
                                if *st == Known::Pending {
                                    *st = Known::InDoubt;
                                }
                            }
                            if r.steps[k] == Known::Failed {
                                r.phase = SagaPhase::Compensating;
                                s.durable = r;
                            }
                        }
                    }
                }
                s.tm = Some(r);
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::<Self>::always(
                "never a compensated step while a later step remains applied",
                |_, s| {
                    (0..STEPS).all(|i| {
                        !matches!(s.parts[i], Step::Compensated | Step::NullCompensated)
                            || s.parts[i + 1..].iter().all(|&p| p != Step::Applied)
                    })
                },
            ),
            Property::<Self>::always("consistent: no partial outcome once ended", |_, s| {
                let phase = s.tm.map_or(s.durable.phase, |r| r.phase);
                let ended = [phase, s.durable.phase];
                let committed_ok = s.parts.iter().all(|&p| p == Step::Applied);
                let aborted_ok = s.parts.iter().all(|&p| p != Step::Applied);
                (!ended.contains(&SagaPhase::Committed) || committed_ok)
                    && (!ended.contains(&SagaPhase::Aborted) || aborted_ok)
            }),
            Property::<Self>::sometimes("commit reachable", |_, s| {
                s.durable.phase == SagaPhase::Committed
            }),
            Property::<Self>::sometimes("abort with compensation reachable", |_, s| {
                s.tm.is_some_and(|r| r.phase == SagaPhase::Aborted)
                    && s.parts.contains(&Step::Compensated)
            }),
            Property::<Self>::sometimes("abort reachable across a crash", |_, s| {
                s.crashes > 0
                    && s.tm.is_some_and(|r| r.phase == SagaPhase::Aborted)
                    && s.parts.contains(&Step::Compensated)
            }),
        ]
    }
}

#[test]
fn saga_compensation_is_consistent() {
    let started = std::time::Instant::now();
    let checker = Saga {
        forget_in_doubt: false,
    }
    .checker()
    .spawn_bfs()
    .join();
    let states = checker.unique_state_count();
    eprintln!(
        "saga model ({STEPS} steps, up to {CRASHES_MAX} coordinator crashes): \
         {states} states explored in {:.1?}",
        started.elapsed()
    );
    checker.assert_properties();
    assert_eq!(states, 2_514, "saga model state count");
}

#[test]
fn saga_forgetting_the_step_in_doubt_is_refuted() {
    let checker = Saga {
        forget_in_doubt: true,
    }
    .checker()
    .spawn_bfs()
    .join();
    let path = checker
        .discovery("consistent: no partial outcome once ended")
        .expect("forgetting the step in doubt must leave a step applied in an aborted saga");
    eprintln!(
        "saga model forgetting the step in doubt: counterexample {:?}",
        path.into_actions()
    );
}
