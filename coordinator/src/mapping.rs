//! Every conversion between protobuf types (`treaty_proto::v1`) and the engine's types, in one
//! place: exactly one `match` per enum pair, one function per message.
//!
//! Two edges of the coordinator speak protobuf: the gRPC API ([`crate::api`]) and the log
//! encoding ([`crate::log::codec`]). Both use this module, which is why it sits at the crate
//! root rather than under either of them: the log must not depend on the API, and the engine
//! depends on neither (DESIGN section 1: protobuf types stay at the edges). The runtime uses it
//! for participant calls ([`branch_request`], [`prepare_reply`], [`execute_reply`],
//! [`phase_two_reply`]).
//!
//! Conversions from protobuf are strict: `UNSPECIFIED` and unknown enum values are
//! [`EnumError`]s that the caller names a field for (an `INVALID_ARGUMENT` in the API, a
//! [`crate::log::codec::DecodeError`] in the log). Conversions to protobuf never fail.

use crate::engine::types::{
    BranchDef, BranchState, Mode, Outcome, Phase, Resolution, RetryPolicy, TxRecord,
};
use crate::engine::{Op, Reply};
use crate::runtime::Snapshot;
use treaty_proto::v1 as pb;

/// A protobuf enum value that has no engine equivalent: `UNSPECIFIED` or a value from a newer
/// schema.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe_enum_error(self))]
pub struct EnumError {
    /// The protobuf enum's name, e.g. `TxState`.
    pub enum_name: &'static str,
    /// The raw value received.
    pub value: i32,
}

fn describe_enum_error(e: &EnumError) -> String {
    if e.value == 0 {
        format!("{} is UNSPECIFIED (0); a value is required", e.enum_name)
    } else {
        format!("unknown {} value {}", e.enum_name, e.value)
    }
}

/// [`Mode`] to its protobuf enum.
pub fn mode_to_proto(m: Mode) -> pb::Mode {
    match m {
        Mode::TwoPhase => pb::Mode::TwoPhase,
        Mode::Saga => pb::Mode::Saga,
    }
}

/// A raw protobuf `Mode` value to [`Mode`]; `UNSPECIFIED` and unknown values are errors.
pub fn mode_from_proto(v: i32) -> Result<Mode, EnumError> {
    match pb::Mode::try_from(v) {
        Ok(pb::Mode::TwoPhase) => Ok(Mode::TwoPhase),
        Ok(pb::Mode::Saga) => Ok(Mode::Saga),
        Ok(pb::Mode::Unspecified) | Err(_) => Err(EnumError {
            enum_name: "Mode",
            value: v,
        }),
    }
}

/// A raw protobuf `Mode` used as a filter (`ListRequest.mode`): `UNSPECIFIED` means any mode
/// (`None`); unknown values are errors.
pub fn mode_filter_from_proto(v: i32) -> Result<Option<Mode>, EnumError> {
    if v == pb::Mode::Unspecified as i32 {
        return Ok(None);
    }
    mode_from_proto(v).map(Some)
}

/// [`Phase`] to the protobuf `TxState`.
pub fn phase_to_proto(p: Phase) -> pb::TxState {
    match p {
        Phase::Active => pb::TxState::Active,
        Phase::Committing => pb::TxState::Committing,
        Phase::Aborting => pb::TxState::Aborting,
        Phase::Compensating => pb::TxState::Compensating,
        Phase::Committed => pb::TxState::Committed,
        Phase::Aborted => pb::TxState::Aborted,
    }
}

/// A raw protobuf `TxState` value to [`Phase`]; `UNSPECIFIED` and unknown values are errors.
pub fn phase_from_proto(v: i32) -> Result<Phase, EnumError> {
    match pb::TxState::try_from(v) {
        Ok(pb::TxState::Active) => Ok(Phase::Active),
        Ok(pb::TxState::Committing) => Ok(Phase::Committing),
        Ok(pb::TxState::Aborting) => Ok(Phase::Aborting),
        Ok(pb::TxState::Compensating) => Ok(Phase::Compensating),
        Ok(pb::TxState::Committed) => Ok(Phase::Committed),
        Ok(pb::TxState::Aborted) => Ok(Phase::Aborted),
        Ok(pb::TxState::Unspecified) | Err(_) => Err(EnumError {
            enum_name: "TxState",
            value: v,
        }),
    }
}

/// [`BranchState`] to its protobuf enum.
pub fn branch_state_to_proto(s: BranchState) -> pb::BranchState {
    match s {
        BranchState::Pending => pb::BranchState::Pending,
        BranchState::InDoubt => pb::BranchState::InDoubt,
        BranchState::Prepared => pb::BranchState::Prepared,
        BranchState::Refused => pb::BranchState::Refused,
        BranchState::Succeeded => pb::BranchState::Succeeded,
        BranchState::Failed => pb::BranchState::Failed,
        BranchState::Committed => pb::BranchState::Committed,
        BranchState::Aborted => pb::BranchState::Aborted,
    }
}

/// A raw protobuf `BranchState` value to [`BranchState`]; `UNSPECIFIED` and unknown values
/// are errors.
pub fn branch_state_from_proto(v: i32) -> Result<BranchState, EnumError> {
    match pb::BranchState::try_from(v) {
        Ok(pb::BranchState::Pending) => Ok(BranchState::Pending),
        Ok(pb::BranchState::InDoubt) => Ok(BranchState::InDoubt),
        Ok(pb::BranchState::Prepared) => Ok(BranchState::Prepared),
        Ok(pb::BranchState::Refused) => Ok(BranchState::Refused),
        Ok(pb::BranchState::Succeeded) => Ok(BranchState::Succeeded),
        Ok(pb::BranchState::Failed) => Ok(BranchState::Failed),
        Ok(pb::BranchState::Committed) => Ok(BranchState::Committed),
        Ok(pb::BranchState::Aborted) => Ok(BranchState::Aborted),
        Ok(pb::BranchState::Unspecified) | Err(_) => Err(EnumError {
            enum_name: "BranchState",
            value: v,
        }),
    }
}

/// [`Outcome`] to its protobuf enum.
pub fn outcome_to_proto(o: Outcome) -> pb::Outcome {
    match o {
        Outcome::Pending => pb::Outcome::Pending,
        Outcome::Committed => pb::Outcome::Committed,
        Outcome::Aborted => pb::Outcome::Aborted,
    }
}

/// A raw protobuf `Outcome` value to [`Outcome`]; `UNSPECIFIED` and unknown values are
/// errors. (`PENDING` is an outcome; a caller that needs a final one checks.)
pub fn outcome_from_proto(v: i32) -> Result<Outcome, EnumError> {
    match pb::Outcome::try_from(v) {
        Ok(pb::Outcome::Pending) => Ok(Outcome::Pending),
        Ok(pb::Outcome::Committed) => Ok(Outcome::Committed),
        Ok(pb::Outcome::Aborted) => Ok(Outcome::Aborted),
        Ok(pb::Outcome::Unspecified) | Err(_) => Err(EnumError {
            enum_name: "Outcome",
            value: v,
        }),
    }
}

/// [`RetryPolicy`] to its protobuf message.
pub fn retry_to_proto(r: &RetryPolicy) -> pb::RetryPolicy {
    pb::RetryPolicy {
        initial_backoff_ms: r.initial_backoff_ms,
        max_backoff_ms: r.max_backoff_ms,
        stuck_after_attempts: r.stuck_after_attempts,
    }
}

/// A protobuf `RetryPolicy` to [`RetryPolicy`], field by field. No validation and no
/// defaults: the log returns what was written; a client's policy goes through
/// [`crate::api::validate`] instead (where 0 means "the coordinator's default").
pub fn retry_from_proto(r: &pb::RetryPolicy) -> RetryPolicy {
    RetryPolicy {
        initial_backoff_ms: r.initial_backoff_ms,
        max_backoff_ms: r.max_backoff_ms,
        stuck_after_attempts: r.stuck_after_attempts,
    }
}

/// [`BranchDef`] to the protobuf `Branch`. Payloads are shared, not copied.
pub fn branch_def_to_proto(d: &BranchDef) -> pb::Branch {
    pb::Branch {
        endpoint: d.endpoint.clone(),
        handler: d.handler.clone(),
        payload: d.payload.clone(),
        compensation_payload: d.compensation_payload.clone(),
    }
}

/// A protobuf `Branch` to [`BranchDef`] (unchecked; the API validates client input first).
pub fn branch_def_from_proto(b: pb::Branch) -> BranchDef {
    BranchDef {
        endpoint: b.endpoint,
        handler: b.handler,
        payload: b.payload,
        compensation_payload: b.compensation_payload,
    }
}

/// [`Resolution`] to its protobuf form.
pub fn resolution_to_proto(r: &Resolution) -> pb::OperatorResolution {
    pb::OperatorResolution {
        operator: r.operator.clone(),
        unix_ms: r.unix_ms,
        reason: r.reason.clone(),
    }
}

/// The protobuf `OperatorResolution` to [`Resolution`].
pub fn resolution_from_proto(r: pb::OperatorResolution) -> Resolution {
    Resolution {
        operator: r.operator,
        unix_ms: r.unix_ms,
        reason: r.reason,
    }
}

/// A runtime snapshot as the API shows it (`Get`, `List`, `Watch`, `Resolve`).
pub fn transaction_to_proto(s: &Snapshot) -> pb::Transaction {
    let r = &s.record;
    pb::Transaction {
        gid: r.gid.clone(),
        mode: mode_to_proto(r.mode).into(),
        state: phase_to_proto(r.phase).into(),
        outcome: outcome_to_proto(s.outcome).into(),
        branches: r
            .branches
            .iter()
            .enumerate()
            .map(|(i, b)| pb::BranchStatus {
                branch_id: i as u32,
                endpoint: b.def.endpoint.clone(),
                handler: b.def.handler.clone(),
                state: branch_state_to_proto(b.state).into(),
                attempts: b.attempts,
                last_error: b.last_error.clone(),
                resolution: b.resolution.as_ref().map(resolution_to_proto),
            })
            .collect(),
        created_unix_ms: r.created_unix_ms,
        updated_unix_ms: r.updated_unix_ms,
        deadline_unix_ms: r.deadline_unix_ms,
        stuck: r.stuck,
        reason: r.reason.clone().unwrap_or_default(),
    }
}

/// The request for `op`, attempt `attempt`, on branch `branch` of `rec`: the compensation
/// payload for `Compensate`, the payload otherwise; the deadline only in phase one.
/// `log_id` and `outcome_endpoint` tell the participant which log answers for the gid.
pub fn branch_request(
    rec: &TxRecord,
    branch: u32,
    op: Op,
    attempt: u32,
    log_id: &str,
    outcome_endpoint: &str,
) -> pb::BranchRequest {
    let b = &rec.branches[branch as usize];
    let payload = if op == Op::Compensate {
        b.def.compensation_payload.clone()
    } else {
        b.def.payload.clone()
    };
    pb::BranchRequest {
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
        log_id: log_id.to_string(),
        outcome_endpoint: outcome_endpoint.to_string(),
    }
}

/// A participant's answer to `Prepare` as the engine sees it; anything but `PREPARED` or
/// `REFUSED` (e.g. `RETRY`) is transient.
pub fn prepare_reply(r: pb::PrepareResponse) -> Reply {
    match r.result() {
        pb::PrepareResult::Prepared => Reply::Prepared,
        pb::PrepareResult::Refused => Reply::Refused(r.message),
        other => Reply::Transient(format!("{}: {}", other.as_str_name(), r.message)),
    }
}

/// A participant's answer to `Execute`; anything but `SUCCEEDED` or `FAILED` is transient.
pub fn execute_reply(r: pb::ExecuteResponse) -> Reply {
    match r.result() {
        pb::ExecuteResult::Succeeded => Reply::Succeeded,
        pb::ExecuteResult::Failed => Reply::Failed(r.message),
        other => Reply::Transient(format!("{}: {}", other.as_str_name(), r.message)),
    }
}

/// A participant's answer to `Commit`, `Abort` or `Compensate`; anything but `DONE` is
/// transient (phase two is retried until it is done).
pub fn phase_two_reply(r: pb::PhaseTwoResponse) -> Reply {
    match r.result() {
        pb::PhaseTwoResult::Done => Reply::Done,
        other => Reply::Transient(format!("{}: {}", other.as_str_name(), r.message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_enum_value_maps_both_ways() {
        for m in Mode::ALL {
            assert_eq!(mode_from_proto(mode_to_proto(m).into()), Ok(m));
            assert_eq!(mode_filter_from_proto(mode_to_proto(m).into()), Ok(Some(m)));
        }
        for p in Phase::ALL {
            assert_eq!(phase_from_proto(phase_to_proto(p).into()), Ok(p));
        }
        for s in BranchState::ALL {
            assert_eq!(
                branch_state_from_proto(branch_state_to_proto(s).into()),
                Ok(s)
            );
        }
        for o in Outcome::ALL {
            assert_eq!(outcome_from_proto(outcome_to_proto(o).into()), Ok(o));
        }
        // Every valid proto value except UNSPECIFIED has an engine value.
        assert!((1..=2).all(|v| mode_from_proto(v).is_ok()));
        assert!((1..=6).all(|v| phase_from_proto(v).is_ok()));
        assert!((1..=8).all(|v| branch_state_from_proto(v).is_ok()));
        assert!((1..=3).all(|v| outcome_from_proto(v).is_ok()));
    }

    #[test]
    fn unspecified_and_unknown_enums_are_refused_with_a_reason() {
        let e = phase_from_proto(0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "TxState is UNSPECIFIED (0); a value is required"
        );
        let e = mode_from_proto(99).unwrap_err();
        assert_eq!(e.to_string(), "unknown Mode value 99");
        assert_eq!(
            outcome_from_proto(0).unwrap_err().to_string(),
            "Outcome is UNSPECIFIED (0); a value is required"
        );
        // As a filter, UNSPECIFIED means "any"; an unknown value is still an error.
        assert_eq!(mode_filter_from_proto(0), Ok(None));
        assert!(mode_filter_from_proto(99).is_err());
    }

    #[test]
    fn participant_answers_map_to_replies() {
        let prepare = |result: pb::PrepareResult| pb::PrepareResponse {
            result: result.into(),
            message: "m".into(),
        };
        assert_eq!(
            prepare_reply(prepare(pb::PrepareResult::Prepared)),
            Reply::Prepared
        );
        assert_eq!(
            prepare_reply(prepare(pb::PrepareResult::Refused)),
            Reply::Refused("m".into())
        );
        assert!(matches!(
            prepare_reply(prepare(pb::PrepareResult::Unspecified)),
            Reply::Transient(_)
        ));
        let execute = |result: pb::ExecuteResult| pb::ExecuteResponse {
            result: result.into(),
            message: "m".into(),
        };
        assert_eq!(
            execute_reply(execute(pb::ExecuteResult::Succeeded)),
            Reply::Succeeded
        );
        assert_eq!(
            execute_reply(execute(pb::ExecuteResult::Failed)),
            Reply::Failed("m".into())
        );
        let done = pb::PhaseTwoResponse {
            result: pb::PhaseTwoResult::Done.into(),
            message: String::new(),
        };
        assert_eq!(phase_two_reply(done), Reply::Done);
    }
}
