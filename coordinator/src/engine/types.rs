//! The engine's own data types. Protobuf types stay at the edges (gRPC and the log codec);
//! these are what the state machines reason about.

use bytes::Bytes;

/// Which protocol drives a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Two-phase commit, presumed abort.
    TwoPhase,
    /// Saga: steps forward in order, compensations in reverse order on failure.
    Saga,
}

/// The phase of a transaction, as recorded in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// `Begun`: 2PC preparing, or saga running forward.
    Active,
    /// 2PC: the commit decision is recorded; sending `Commit`.
    Committing,
    /// 2PC: the abort decision is recorded (presumed abort: not necessarily durable).
    Aborting,
    /// Saga: compensating the steps that ran or may have run, in reverse order.
    Compensating,
    /// Terminal: committed.
    Committed,
    /// Terminal: aborted (2PC) or compensated (saga).
    Aborted,
}

impl Phase {
    /// Whether nothing more will happen to a transaction in this phase.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Committed | Phase::Aborted)
    }
}

/// The final answer a client or a participant in doubt gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Not decided yet.
    Pending,
    Committed,
    Aborted,
}

/// The state of one branch as the coordinator knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BranchState {
    /// Never called.
    Pending,
    /// Called without a definite answer: it may have run.
    InDoubt,
    /// 2PC: answered `PREPARED`.
    Prepared,
    /// 2PC: answered `REFUSED`.
    Refused,
    /// Saga: answered `SUCCEEDED`.
    Succeeded,
    /// Saga: answered `FAILED` (nothing applied).
    Failed,
    /// Phase two finished with commit.
    Committed,
    /// Phase two finished with abort (2PC) or compensation (saga).
    Aborted,
}

impl Mode {
    /// Every mode, for exhaustive tests of mappings and codecs.
    pub const ALL: [Mode; 2] = [Mode::TwoPhase, Mode::Saga];
}

impl Phase {
    /// Every phase, for exhaustive tests of mappings and codecs.
    pub const ALL: [Phase; 6] = [
        Phase::Active,
        Phase::Committing,
        Phase::Aborting,
        Phase::Compensating,
        Phase::Committed,
        Phase::Aborted,
    ];
}

impl BranchState {
    /// Every branch state, for exhaustive tests of mappings and codecs.
    pub const ALL: [BranchState; 8] = [
        BranchState::Pending,
        BranchState::InDoubt,
        BranchState::Prepared,
        BranchState::Refused,
        BranchState::Succeeded,
        BranchState::Failed,
        BranchState::Committed,
        BranchState::Aborted,
    ];
}

impl Outcome {
    /// Every outcome, for exhaustive tests of mappings and codecs.
    pub const ALL: [Outcome; 3] = [Outcome::Pending, Outcome::Committed, Outcome::Aborted];
}

/// Retry policy: exponential backoff with full jitter, and the stuck threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Phase-two attempts on one branch after which the transaction is flagged stuck.
    pub stuck_after_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_backoff_ms: 100,
            max_backoff_ms: 30_000,
            stuck_after_attempts: 10,
        }
    }
}

impl RetryPolicy {
    /// The upper bound of the backoff before attempt `attempt + 1`, after `attempt` failed
    /// attempts (`attempt >= 1`): `min(max, initial * 2^min(attempt-1, 40))`, the product
    /// saturating. The runtime sleeps a uniformly random time in `[0, bound]`, both ends
    /// included (full jitter). `RetryPolicy` in `proto/treaty/v1/types.proto` states the same.
    pub fn backoff_bound_ms(&self, attempt: u32) -> u64 {
        let shift = attempt.saturating_sub(1).min(40);
        self.initial_backoff_ms
            .saturating_mul(1u64 << shift)
            .min(self.max_backoff_ms)
    }
}

/// What the client asked for in one branch. Immutable once begun.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchDef {
    pub endpoint: String,
    pub handler: String,
    pub payload: Bytes,
    /// Saga only.
    pub compensation_payload: Bytes,
}

/// An operator's manual resolution of a branch (`Coordinator.Resolve`): the audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolution {
    /// Who resolved it.
    pub operator: String,
    /// When, unix ms.
    pub unix_ms: u64,
    /// Why, as the operator put it.
    pub reason: String,
}

/// One branch in the log: its definition and what the coordinator knows of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchRecord {
    pub def: BranchDef,
    pub state: BranchState,
    /// Calls made for this branch's current operation.
    pub attempts: u32,
    /// The last transient error, for operators.
    pub last_error: String,
    /// Set when an operator resolved the branch by hand.
    pub resolution: Option<Resolution>,
}

/// SHA-256 of a transaction's definition (mode and every branch), to tell a resubmission of
/// the same transaction from a different one that reuses its gid. Every variable-length
/// field is length-prefixed, so no two definitions share an encoding.
pub fn fingerprint(mode: Mode, branches: &[BranchDef]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"treaty.tx.v1");
    h.update([match mode {
        Mode::TwoPhase => 1u8,
        Mode::Saga => 2u8,
    }]);
    h.update((branches.len() as u64).to_be_bytes());
    for b in branches {
        for field in [
            b.endpoint.as_bytes(),
            b.handler.as_bytes(),
            &b.payload[..],
            &b.compensation_payload[..],
        ] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field);
        }
    }
    h.finalize().into()
}

/// What stays of a finished transaction once retention collected its record: enough to
/// answer a `Begin` that reuses the gid, and an `Outcome` inquiry, for a long horizon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tombstone {
    pub gid: String,
    /// `Committed` or `Aborted`.
    pub outcome: Outcome,
    /// [`fingerprint`] of the definition.
    pub fingerprint: [u8; 32],
    /// When the record was collected, unix ms (the tombstone's own retention starts here).
    pub collected_unix_ms: u64,
}

/// The durable record of one transaction. The log stores the latest copy per gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxRecord {
    pub gid: String,
    pub mode: Mode,
    pub phase: Phase,
    /// Index = branch_id.
    pub branches: Vec<BranchRecord>,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// End of phase one (2PC) or of the forward run (saga).
    pub deadline_unix_ms: u64,
    pub retry: RetryPolicy,
    pub stuck: bool,
    /// Bumped on every write of this record.
    pub seq: u64,
    /// Why the transaction is aborting or compensating, set once when the engine decides to
    /// undo it (a participant's refusal or failure, the deadline, a recovery) and never
    /// changed after; at most [`REASON_BYTES_MAX`] bytes. `None` while nothing went wrong,
    /// and for records written before reasons were recorded.
    pub reason: Option<String>,
    /// The W3C `traceparent` of the client's span that submitted the transaction (when the
    /// coordinator makes traces), so that its spans, also after a restart, join the client's
    /// trace. Carried, never read, by the engine; not part of the definition (a resubmission
    /// from another trace is the same transaction). Canonical form, 55 ASCII characters.
    pub trace_parent: Option<String>,
}

/// Bound on [`TxRecord::trace_parent`] when a record is read back: a longer value is not a
/// `traceparent` this coordinator wrote, and is dropped rather than trusted.
pub const TRACE_PARENT_BYTES_MAX: usize = 128;

/// Bound on [`TxRecord::reason`]: it quotes a participant's message, which the coordinator
/// does not control, and it is stored and shown with every copy of the record.
pub const REASON_BYTES_MAX: usize = 1024;

impl TxRecord {
    /// The outcome implied by the recorded phase, as `Outcome(gid)` reports it.
    pub fn outcome(&self) -> Outcome {
        match self.phase {
            Phase::Active => Outcome::Pending,
            Phase::Compensating => Outcome::Pending,
            Phase::Committing | Phase::Committed => Outcome::Committed,
            Phase::Aborting | Phase::Aborted => Outcome::Aborted,
        }
    }

    /// Whether two records describe the same submitted transaction (for idempotent `Begin`).
    pub fn same_definition(&self, mode: Mode, branches: &[BranchDef]) -> bool {
        self.mode == mode
            && self.branches.len() == branches.len()
            && self.branches.iter().zip(branches).all(|(b, d)| &b.def == d)
    }

    /// [`fingerprint`] of this record's definition.
    pub fn fingerprint(&self) -> [u8; 32] {
        let defs: Vec<BranchDef> = self.branches.iter().map(|b| b.def.clone()).collect();
        fingerprint(self.mode, &defs)
    }

    /// The tombstone that replaces this terminal record when retention collects it.
    ///
    /// Meant for terminal records only (retention scans only those). That is a debug check
    /// (`debug_assert!`), not enforced in release builds: there, a non-terminal record would
    /// get a tombstone carrying the outcome its phase implies (`Pending` for an active one).
    pub fn tombstone(&self, collected_unix_ms: u64) -> Tombstone {
        debug_assert!(
            self.phase.is_terminal(),
            "only finished records are collected"
        );
        Tombstone {
            gid: self.gid.clone(),
            outcome: self.outcome(),
            fingerprint: self.fingerprint(),
            collected_unix_ms,
        }
    }
}
