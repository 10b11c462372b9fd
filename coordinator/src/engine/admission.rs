//! What the coordinator answers about a gid from what it knows of it: a `Begin` (start it,
//! it exists, it finished long ago, or it is another transaction's gid) and an `Outcome`
//! inquiry (with presumed abort only for a gid this log does not know). Pure, so the runtime
//! and the simulation apply the same rules.

use super::types::{fingerprint, BranchDef, Mode, Outcome, Phase, Tombstone, TxRecord};

/// What the coordinator knows of a gid.
#[derive(Clone, Copy, Debug)]
pub enum Known<'a> {
    /// A record, live or in the log. Only records whose forced writes are durable may be
    /// passed as proof of an outcome.
    Record(&'a TxRecord),
    /// Retention collected the record; this is what stays.
    Tombstone(&'a Tombstone),
    /// Never seen, or forgotten past the tombstone horizon.
    Nothing,
}

/// What a `Begin` leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BeginDecision {
    /// A new transaction.
    Start,
    /// The same definition is already recorded: answer it, start nothing.
    Existing,
    /// The same definition finished long ago with this outcome: answer it, start nothing.
    Finished(Outcome),
    /// The gid names another definition: ALREADY_EXISTS.
    Conflict,
}

/// The answer to a `Begin` of (`mode`, `branches`) for a gid of which `known` is known.
pub fn decide_begin(known: Known<'_>, mode: Mode, branches: &[BranchDef]) -> BeginDecision {
    match known {
        Known::Nothing => BeginDecision::Start,
        Known::Record(rec) if rec.same_definition(mode, branches) => BeginDecision::Existing,
        Known::Record(_) => BeginDecision::Conflict,
        Known::Tombstone(t) if t.fingerprint == fingerprint(mode, branches) => {
            BeginDecision::Finished(t.outcome)
        }
        Known::Tombstone(_) => BeginDecision::Conflict,
    }
}

/// The answer to `Outcome(gid)`: the outcome, and whether this log knows the gid. An
/// unknown gid is `Aborted` by presumption, which a participant may apply only when this
/// log drove its branch.
pub fn answer_outcome(known: Known<'_>) -> (Outcome, bool) {
    match known {
        Known::Record(rec) => (
            match rec.phase {
                Phase::Committed | Phase::Committing => Outcome::Committed,
                Phase::Aborted | Phase::Aborting => Outcome::Aborted,
                Phase::Active | Phase::Compensating => Outcome::Pending,
            },
            true,
        ),
        Known::Tombstone(t) => (t.outcome, true),
        Known::Nothing => (Outcome::Aborted, false),
    }
}

/// Whether `known` shows the transaction finished: a terminal record (committed, aborted)
/// or a tombstone. The coordinator sends nothing more for such a gid, which lets a
/// participant sweep its barrier rows of it (`OutcomeResponse.finished`); a caller must tell
/// it only from a record that is durable.
pub fn is_finished(known: Known<'_>) -> bool {
    match known {
        Known::Record(rec) => matches!(rec.phase, Phase::Committed | Phase::Aborted),
        Known::Tombstone(_) => true,
        Known::Nothing => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::types::RetryPolicy;

    fn def(payload: &'static [u8]) -> Vec<BranchDef> {
        vec![BranchDef {
            endpoint: "http://127.0.0.1:1".into(),
            handler: "h".into(),
            payload: bytes::Bytes::from_static(payload),
            compensation_payload: bytes::Bytes::new(),
        }]
    }

    fn rec(phase: Phase) -> TxRecord {
        let mut tx = crate::engine::Tx::new(
            crate::engine::NewTx {
                gid: "g".into(),
                mode: Mode::Saga,
                branches: def(b"a"),
                deadline_unix_ms: 10,
                retry: RetryPolicy::default(),
                trace_parent: None,
            },
            1,
        )
        .record()
        .clone();
        tx.phase = phase;
        tx
    }

    #[test]
    fn begin_decisions() {
        let r = rec(Phase::Committed);
        let t = r.tombstone(5);
        let same = def(b"a");
        let other = def(b"b");
        let cases: [(Known<'_>, Mode, &[BranchDef], BeginDecision); 7] = [
            (Known::Nothing, Mode::Saga, &same, BeginDecision::Start),
            (
                Known::Record(&r),
                Mode::Saga,
                &same,
                BeginDecision::Existing,
            ),
            (
                Known::Record(&r),
                Mode::Saga,
                &other,
                BeginDecision::Conflict,
            ),
            (
                Known::Record(&r),
                Mode::TwoPhase,
                &same,
                BeginDecision::Conflict,
            ),
            (
                Known::Tombstone(&t),
                Mode::Saga,
                &same,
                BeginDecision::Finished(Outcome::Committed),
            ),
            (
                Known::Tombstone(&t),
                Mode::Saga,
                &other,
                BeginDecision::Conflict,
            ),
            (
                Known::Tombstone(&t),
                Mode::TwoPhase,
                &same,
                BeginDecision::Conflict,
            ),
        ];
        for (i, (known, mode, branches, want)) in cases.into_iter().enumerate() {
            assert_eq!(decide_begin(known, mode, branches), want, "case {i}");
        }
    }

    #[test]
    fn outcome_answers() {
        for (phase, want) in [
            (Phase::Active, Outcome::Pending),
            (Phase::Compensating, Outcome::Pending),
            (Phase::Committing, Outcome::Committed),
            (Phase::Committed, Outcome::Committed),
            (Phase::Aborting, Outcome::Aborted),
            (Phase::Aborted, Outcome::Aborted),
        ] {
            assert_eq!(answer_outcome(Known::Record(&rec(phase))), (want, true));
        }
        let t = rec(Phase::Aborted).tombstone(1);
        assert_eq!(
            answer_outcome(Known::Tombstone(&t)),
            (Outcome::Aborted, true)
        );
        assert_eq!(answer_outcome(Known::Nothing), (Outcome::Aborted, false));
    }

    #[test]
    fn only_terminal_records_and_tombstones_are_finished() {
        for (phase, want) in [
            (Phase::Active, false),
            (Phase::Compensating, false),
            (Phase::Committing, false),
            (Phase::Aborting, false),
            (Phase::Committed, true),
            (Phase::Aborted, true),
        ] {
            assert_eq!(is_finished(Known::Record(&rec(phase))), want, "{phase:?}");
        }
        assert!(is_finished(Known::Tombstone(
            &rec(Phase::Aborted).tombstone(1)
        )));
        assert!(!is_finished(Known::Nothing));
    }
}
