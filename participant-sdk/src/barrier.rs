//! The barrier: exactly-once effects for participant operations (DESIGN.md section 7).
//!
//! Every operation a participant receives may arrive more than once, late, or out of order.
//! The barrier records one row per `(gid, branch_id, operation)` in the participant's own
//! store, **in the same local transaction as the business change**, so the change and its
//! row commit together or not at all.
//!
//! What to do with a delivery is decided by one pure function, [`rules::plan`], from the rows
//! already recorded for its branch; its module docs list the rules. In short: a duplicate
//! repeats the first answer without running business code; an `Abort`/`Compensate` whose
//! `Prepare`/`Execute` never ran is recorded as a no-op and makes the late forward operation
//! `REFUSED`/`FAILED`; a recorded cancel is checked before the forward row; a delivery whose
//! body (fingerprint of handler and payload) or coordinator log differs from the recorded
//! one is another transaction reusing the gid and is refused, never answered from the old
//! row; a phase-two operation that contradicts the recorded state is a protocol violation
//! (business code does not run, an error is logged and the answer is `RETRY`).
//!
//! This module holds what every store shares: the operations ([`Op`]), the answers
//! ([`Answer`]), a decoded row ([`BarrierRow`]), a branch in doubt ([`InDoubt`]), what a
//! delivery came to ([`Verdict`]), and the rules. Stores carry the plans out: see
//! [`crate::store::BarrierStore`] for the contract and [`crate::sled::SledStore`] for the
//! embedded default (its module docs give its storage layout).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

pub mod rules;

use rules::Fingerprint;

/// Re-exported from [`treaty_proto::limits`], the one place these limits are defined (the
/// coordinator checks its configuration against them).
pub use treaty_proto::limits::{FIELD_BYTES_MAX, GID_BYTES_MAX};

/// A participant operation, as recorded by the barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// 2PC phase one.
    Prepare,
    /// 2PC phase two, commit.
    Commit,
    /// 2PC phase two, abort.
    Abort,
    /// Saga step.
    Execute,
    /// Saga compensation.
    Compensate,
}

impl Op {
    /// The byte that ends this operation's row keys.
    pub fn key_byte(self) -> u8 {
        match self {
            Op::Prepare => b'P',
            Op::Commit => b'C',
            Op::Abort => b'A',
            Op::Execute => b'E',
            Op::Compensate => b'X',
        }
    }

    /// The operation whose row key ends with `b`, if any.
    pub fn from_key_byte(b: u8) -> Option<Op> {
        Some(match b {
            b'P' => Op::Prepare,
            b'C' => Op::Commit,
            b'A' => Op::Abort,
            b'E' => Op::Execute,
            b'X' => Op::Compensate,
            _ => return None,
        })
    }

    /// Whether `answer` is one this operation can record (stores check rows read back with
    /// it: a row whose answer does not fit its operation is corrupt).
    pub fn allows(self, answer: Answer) -> bool {
        match self {
            Op::Prepare => matches!(answer, Answer::Prepared | Answer::Refused),
            Op::Execute => matches!(answer, Answer::Succeeded | Answer::Failed),
            Op::Commit | Op::Abort | Op::Compensate => answer == Answer::Done,
        }
    }
}

impl Op {
    /// The operation's name, lowercase (`prepare`, ..., `compensate`): its `Display` and its
    /// metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Prepare => "prepare",
            Op::Commit => "commit",
            Op::Abort => "abort",
            Op::Execute => "execute",
            Op::Compensate => "compensate",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer recorded for an operation (and repeated to every duplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Answer {
    /// Prepare: durable promise that a later commit succeeds.
    Prepared,
    /// Prepare: business no, or aborted before it arrived (null compensation).
    Refused,
    /// Execute: the step's change is applied.
    Succeeded,
    /// Execute: business failure, or compensated before it arrived (null compensation).
    Failed,
    /// Commit, abort, compensate: finished.
    Done,
}

impl Answer {
    pub(crate) fn code(self) -> u8 {
        match self {
            Answer::Prepared => 1,
            Answer::Refused => 2,
            Answer::Succeeded => 3,
            Answer::Failed => 4,
            Answer::Done => 5,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Answer> {
        Some(match c {
            1 => Answer::Prepared,
            2 => Answer::Refused,
            3 => Answer::Succeeded,
            4 => Answer::Failed,
            5 => Answer::Done,
            _ => return None,
        })
    }
}

/// One barrier row, decoded. For tests, checkers and operators.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BarrierRow {
    /// Global transaction id.
    pub gid: String,
    /// Branch index within the transaction.
    pub branch_id: u32,
    /// The operation this row records.
    pub op: Op,
    /// The answer given (and repeated to duplicates).
    pub answer: Answer,
    /// When the row was written, unix milliseconds (wall clock: for humans, not for order).
    pub unix_ms: u64,
    /// Position in the order rows were committed in this tree, from 1, with no gaps between
    /// rows of one transaction; 0 for rows of format v1 (all written before any numbered row).
    /// Two rows compare by `seq` the way their business changes were applied.
    pub seq: u64,
    /// Fingerprint of the delivery's `(handler, payload)`; `None` when unknown (v1 rows, the
    /// forward row written by a null compensation).
    pub fingerprint: Option<Fingerprint>,
    /// Log id of the coordinator that sent the delivery; empty when unknown.
    pub log_id: String,
    /// The handler the delivery was addressed to.
    pub handler: String,
    /// The message answered (a refusal's reason, a null compensation's explanation, ...).
    pub message: String,
    /// Where the coordinator that sent the delivery answers `Outcome`; empty when it named
    /// none (the participant's configured coordinator then). Set by stores that keep it
    /// ([`BarrierRow::with_outcome_endpoint`]); the sweep asks it.
    pub outcome_endpoint: String,
}

/// What stays of a gid once a sweep deleted its rows: the log that drove it and when, so
/// that a late duplicate delivery changes nothing ([`rules::plan_swept`]). Expires after the
/// retention policy's `swept_marker_ttl`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Swept {
    /// Global transaction id.
    pub gid: String,
    /// The coordinator log that drove the gid (every swept row named it).
    pub log_id: String,
    /// When the rows were swept, unix milliseconds.
    pub swept_unix_ms: u64,
}

impl Swept {
    /// A marker (for stores and the participant's sweep).
    pub fn new(gid: String, log_id: String, swept_unix_ms: u64) -> Swept {
        Swept {
            gid,
            log_id,
            swept_unix_ms,
        }
    }
}

/// A branch in doubt: prepared, neither committed nor aborted; what the in-doubt resolver
/// needs to ask its coordinator and to replay the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InDoubt {
    /// Global transaction id.
    pub gid: String,
    /// Branch index within the transaction.
    pub branch_id: u32,
    /// The handler the prepare was addressed to.
    pub handler: String,
    /// The branch payload, as delivered with the prepare (commit and abort carry it again).
    pub payload: Vec<u8>,
    /// The log that drove the branch; empty when the coordinator sent none.
    pub log_id: String,
    /// Where to ask for the outcome; empty: the participant's configured coordinator.
    pub outcome_endpoint: String,
    /// When the prepare was recorded, unix milliseconds.
    pub prepared_unix_ms: u64,
}

impl InDoubt {
    /// An in-doubt branch (for stores, which build these from their index).
    pub fn new(
        gid: String,
        branch_id: u32,
        handler: String,
        payload: Vec<u8>,
        log_id: String,
        outcome_endpoint: String,
        prepared_unix_ms: u64,
    ) -> InDoubt {
        InDoubt {
            gid,
            branch_id,
            handler,
            payload,
            log_id,
            outcome_endpoint,
            prepared_unix_ms,
        }
    }
}

impl BarrierRow {
    /// A decoded row (for stores, which build these when reading rows back).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gid: String,
        branch_id: u32,
        op: Op,
        answer: Answer,
        unix_ms: u64,
        seq: u64,
        fingerprint: Option<Fingerprint>,
        log_id: String,
        handler: String,
        message: String,
    ) -> BarrierRow {
        BarrierRow {
            gid,
            branch_id,
            op,
            answer,
            unix_ms,
            seq,
            fingerprint,
            log_id,
            handler,
            message,
            outcome_endpoint: String::new(),
        }
    }

    /// The row with the outcome endpoint it was recorded with (for stores that keep it).
    pub fn with_outcome_endpoint(mut self, outcome_endpoint: String) -> BarrierRow {
        self.outcome_endpoint = outcome_endpoint;
        self
    }
}

/// What one delivery of an operation came to, once the store has carried out its plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A definitive answer, new or repeated, durable in the store: it may be sent.
    Answer {
        /// The answer recorded (or repeated).
        answer: Answer,
        /// Its message (a refusal's reason, ...).
        message: String,
    },
    /// Nothing was written (or nothing could be made durable); deliver the operation again
    /// later: storage error, unknown handler, a phase-two handler that refused, a handler
    /// that panicked or asked for a retry.
    Retry(String),
    /// The operation contradicts the recorded state. Nothing was written, no business code
    /// ran; answered as RETRY. Already logged at error level.
    Violation(String),
}

impl Verdict {
    /// The verdict for a plan's reply (logging a violation).
    pub fn from_reply(
        op: Op,
        gid: &str,
        branch_id: u32,
        handler: &str,
        reply: rules::Reply,
    ) -> Verdict {
        match reply {
            rules::Reply::Answer { answer, message } => Verdict::Answer { answer, message },
            rules::Reply::Retry(m) => Verdict::Retry(m),
            rules::Reply::Violation(msg) => {
                tracing::error!(
                    gid = %gid,
                    branch_id,
                    handler = %handler,
                    "protocol violation on {op}, business code not run: {msg}"
                );
                Verdict::Violation(format!("protocol violation: {msg}"))
            }
        }
    }
}

/// Wall-clock now, unix milliseconds (for humans and the in-doubt age, never for order).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_accepts_only_its_answers() {
        assert!(Op::Prepare.allows(Answer::Prepared) && !Op::Prepare.allows(Answer::Done));
        assert!(Op::Compensate.allows(Answer::Done) && !Op::Compensate.allows(Answer::Failed));
    }
}
