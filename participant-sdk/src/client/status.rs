//! What the coordinator reports, as domain types, and the one place where they are mapped
//! from (and, for filters, to) the generated protobuf types.
//!
//! Enum values this SDK does not know (a newer coordinator) are
//! [`ClientError::UnexpectedAnswer`], except an outcome, which reads as
//! [`Outcome::Pending`]: "not known final" is always safe, and it keeps a durable `Begin`
//! from being reported as an error.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use treaty_proto::v1 as pb;

use super::error::ClientError;

/// The final outcome of a transaction, or `Pending` while it is not final yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Every branch committed (2PC) or every step succeeded (saga).
    Committed,
    /// Aborted (2PC) or compensated (saga).
    Aborted,
    /// Not final yet (or the wait bound passed): use [`Client::get`](super::Client::get) /
    /// [`Client::watch`](super::Client::watch).
    Pending,
}

/// How a transaction runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// Two-phase commit, presumed abort.
    TwoPhase,
    /// Saga: steps in order, compensations in reverse order on failure.
    Saga,
}

/// The phase of a transaction, as recorded in the coordinator's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TxState {
    /// Begun durably; 2PC: preparing; saga: running steps forward.
    Active,
    /// 2PC decided commit (durable); sending Commit.
    Committing,
    /// 2PC decided abort; sending Abort.
    Aborting,
    /// Saga failed; compensating in reverse order.
    Compensating,
    /// Terminal: committed.
    Committed,
    /// Terminal: aborted (2PC) or fully compensated (saga).
    Aborted,
}

impl TxState {
    /// Whether the transaction is over (committed or aborted): it changes no more.
    pub fn is_terminal(self) -> bool {
        matches!(self, TxState::Committed | TxState::Aborted)
    }
}

/// The state of one branch as the coordinator knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BranchState {
    /// Not called yet.
    Pending,
    /// Called; no definite answer yet (it may have run).
    InDoubt,
    /// 2PC: prepared.
    Prepared,
    /// 2PC: the participant refused to prepare.
    Refused,
    /// Saga: the step succeeded.
    Succeeded,
    /// Saga: the step failed (a business failure; its effects were not applied).
    Failed,
    /// Phase two done: committed.
    Committed,
    /// Phase two done: aborted (2PC) or compensated (saga).
    Aborted,
}

/// An operator's manual resolution of a branch (`Coordinator.Resolve`): who, when, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorResolution {
    /// Who resolved it.
    pub operator: String,
    /// When.
    pub at: SystemTime,
    /// Why (e.g. "refund issued by hand, ticket OPS-123").
    pub reason: String,
}

/// What an operator records with [`Client::resolve`](super::Client::resolve): that one
/// branch's phase-two operation (commit, abort or compensate) was carried out by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManualResolution {
    /// The branch (its index in the definition, [`BranchStatus::branch_id`]).
    pub branch_id: u32,
    /// Who resolves it (recorded; required).
    pub operator: String,
    /// Why, e.g. "refund issued by hand, ticket OPS-123" (recorded; required).
    pub reason: String,
}

/// One participant's part of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchStatus {
    /// The branch's index in the definition (0-based).
    pub branch_id: u32,
    /// The participant's gRPC URI.
    pub endpoint: String,
    /// The handler name the participant dispatches on.
    pub handler: String,
    /// Where the branch is.
    pub state: BranchState,
    /// Calls made for the branch's current operation.
    pub attempts: u32,
    /// The last transient error seen, if any.
    pub last_error: Option<String>,
    /// Set when an operator resolved this branch by hand.
    pub resolution: Option<OperatorResolution>,
}

/// A transaction as the coordinator reports it ([`Client::get`](super::Client::get),
/// [`Client::list`](super::Client::list), [`Client::watch`](super::Client::watch)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionStatus {
    /// The global transaction id.
    pub gid: String,
    /// 2PC or saga.
    pub mode: Mode,
    /// The recorded phase.
    pub state: TxState,
    /// The outcome, once it can be told (`Committing` is already [`Outcome::Committed`]).
    pub outcome: Outcome,
    /// Every branch, in definition order.
    pub branches: Vec<BranchStatus>,
    /// When it was begun.
    pub created_at: SystemTime,
    /// When its record last changed.
    pub updated_at: SystemTime,
    /// The deadline of phase one (2PC) or the forward run (saga), if one applies.
    pub deadline: Option<SystemTime>,
    /// Flagged when a phase-two call failed its policy's `stuck_after_attempts` times; the
    /// coordinator still retries it ([`Client::retry`](super::Client::retry) makes it go
    /// out now).
    pub stuck: bool,
    /// Why it is aborting, aborted, compensating or compensated: the participant's refusal
    /// or failure, naming the branch (`branch 0 (debit at http://127.0.0.1:7801) refused:
    /// insufficient funds: alice has 75`), or the deadline. `None` while nothing went wrong.
    pub reason: Option<String>,
}

/// The coordinator's answer to [`Client::outcome`](super::Client::outcome).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeAnswer {
    /// The outcome; `Aborted` by presumption when `known` is false.
    pub outcome: Outcome,
    /// False when the answering log has no record of the gid (never seen, or forgotten past
    /// its tombstone horizon).
    pub known: bool,
    /// The identity of the answering log (a UUID created with it, never changed). A presumed
    /// abort is valid only from the log that drove the transaction.
    pub log_id: String,
}

/// What [`Client::retry`](super::Client::retry) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOutcome {
    /// Branch calls that were waiting and went out now.
    pub retried: u32,
    /// Another coordinator of the shared log drives the transaction: the retry was passed
    /// on to it (and `retried` is 0).
    pub forwarded: bool,
}

/// What a submit recorded ([`SagaBuilder::submit`](super::SagaBuilder::submit),
/// `submit_and_wait`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The transaction's gid: the one given with `gid(..)`, or the UUIDv7 the SDK generated.
    pub gid: String,
    /// The outcome if it became final within the wait; [`Outcome::Pending`] otherwise (and
    /// always for `submit`, unless the transaction already existed and is final).
    pub outcome: Outcome,
    /// True when a transaction with this gid and the same definition already existed (a
    /// resubmission): nothing new was begun.
    pub existing: bool,
    /// With [`Outcome::Aborted`]: why, as [`TransactionStatus::reason`] says it. `None`
    /// otherwise.
    pub reason: Option<String>,
}

/// Which transactions [`Client::list`](super::Client::list) returns, and from which page.
/// The default matches every transaction, first page, the coordinator's page size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    states: Vec<TxState>,
    mode: Option<Mode>,
    stuck_only: bool,
    min_age: Option<Duration>,
    page_size: Option<u32>,
    page_token: Option<String>,
}

impl ListFilter {
    /// Every transaction (the same as `default()`).
    pub fn new() -> ListFilter {
        ListFilter::default()
    }

    /// Only transactions in one of `states` (called again, it adds to them).
    pub fn states(mut self, states: impl IntoIterator<Item = TxState>) -> Self {
        self.states.extend(states);
        self
    }

    /// Only transactions of `mode`.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = Some(mode);
        self
    }

    /// Only transactions flagged stuck.
    pub fn stuck_only(mut self) -> Self {
        self.stuck_only = true;
        self
    }

    /// Only transactions created at least `age` ago.
    pub fn min_age(mut self, age: Duration) -> Self {
        self.min_age = Some(age);
        self
    }

    /// At most `n` per page (the coordinator's default is 100, its cap 1000).
    pub fn page_size(mut self, n: u32) -> Self {
        self.page_size = Some(n);
        self
    }

    /// The page after the one that returned `token` ([`ListPage::next_page_token`]).
    pub fn page_token(mut self, token: impl Into<String>) -> Self {
        self.page_token = Some(token.into());
        self
    }
}

/// One page of [`Client::list`](super::Client::list), newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    /// The transactions on this page.
    pub transactions: Vec<TransactionStatus>,
    /// Pass to [`ListFilter::page_token`] for the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

// ---------------------------------------------------------------------------------------
// The mapping: every protobuf field the client reads or sends is named here.
// ---------------------------------------------------------------------------------------

fn unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl Outcome {
    pub(crate) fn from_proto(o: i32) -> Outcome {
        match pb::Outcome::try_from(o) {
            Ok(pb::Outcome::Committed) => Outcome::Committed,
            Ok(pb::Outcome::Aborted) => Outcome::Aborted,
            Ok(pb::Outcome::Pending | pb::Outcome::Unspecified) | Err(_) => Outcome::Pending,
        }
    }
}

impl Mode {
    fn from_proto(m: i32) -> Result<Mode, ClientError> {
        match pb::Mode::try_from(m) {
            Ok(pb::Mode::TwoPhase) => Ok(Mode::TwoPhase),
            Ok(pb::Mode::Saga) => Ok(Mode::Saga),
            _ => Err(ClientError::UnexpectedAnswer(format!("unknown mode {m}"))),
        }
    }

    pub(crate) fn to_proto(self) -> pb::Mode {
        match self {
            Mode::TwoPhase => pb::Mode::TwoPhase,
            Mode::Saga => pb::Mode::Saga,
        }
    }
}

impl TxState {
    fn from_proto(s: i32) -> Result<TxState, ClientError> {
        Ok(match pb::TxState::try_from(s) {
            Ok(pb::TxState::Active) => TxState::Active,
            Ok(pb::TxState::Committing) => TxState::Committing,
            Ok(pb::TxState::Aborting) => TxState::Aborting,
            Ok(pb::TxState::Compensating) => TxState::Compensating,
            Ok(pb::TxState::Committed) => TxState::Committed,
            Ok(pb::TxState::Aborted) => TxState::Aborted,
            Ok(pb::TxState::Unspecified) | Err(_) => {
                return Err(ClientError::UnexpectedAnswer(format!(
                    "unknown transaction state {s}"
                )))
            }
        })
    }

    fn to_proto(self) -> pb::TxState {
        match self {
            TxState::Active => pb::TxState::Active,
            TxState::Committing => pb::TxState::Committing,
            TxState::Aborting => pb::TxState::Aborting,
            TxState::Compensating => pb::TxState::Compensating,
            TxState::Committed => pb::TxState::Committed,
            TxState::Aborted => pb::TxState::Aborted,
        }
    }
}

impl BranchState {
    fn from_proto(s: i32) -> Result<BranchState, ClientError> {
        Ok(match pb::BranchState::try_from(s) {
            Ok(pb::BranchState::Pending) => BranchState::Pending,
            Ok(pb::BranchState::InDoubt) => BranchState::InDoubt,
            Ok(pb::BranchState::Prepared) => BranchState::Prepared,
            Ok(pb::BranchState::Refused) => BranchState::Refused,
            Ok(pb::BranchState::Succeeded) => BranchState::Succeeded,
            Ok(pb::BranchState::Failed) => BranchState::Failed,
            Ok(pb::BranchState::Committed) => BranchState::Committed,
            Ok(pb::BranchState::Aborted) => BranchState::Aborted,
            Ok(pb::BranchState::Unspecified) | Err(_) => {
                return Err(ClientError::UnexpectedAnswer(format!(
                    "unknown branch state {s}"
                )))
            }
        })
    }
}

impl TryFrom<pb::BranchStatus> for BranchStatus {
    type Error = ClientError;

    fn try_from(b: pb::BranchStatus) -> Result<Self, ClientError> {
        Ok(BranchStatus {
            branch_id: b.branch_id,
            state: BranchState::from_proto(b.state)?,
            endpoint: b.endpoint,
            handler: b.handler,
            attempts: b.attempts,
            last_error: Some(b.last_error).filter(|e| !e.is_empty()),
            resolution: b.resolution.map(|r| OperatorResolution {
                operator: r.operator,
                at: unix_ms(r.unix_ms),
                reason: r.reason,
            }),
        })
    }
}

impl TryFrom<pb::Transaction> for TransactionStatus {
    type Error = ClientError;

    fn try_from(t: pb::Transaction) -> Result<Self, ClientError> {
        let gid = t.gid;
        let in_tx = |e: ClientError| match e {
            ClientError::UnexpectedAnswer(m) => {
                ClientError::UnexpectedAnswer(format!("transaction {gid}: {m}"))
            }
            other => other,
        };
        let mode = Mode::from_proto(t.mode).map_err(in_tx)?;
        let state = TxState::from_proto(t.state).map_err(in_tx)?;
        let branches = t
            .branches
            .into_iter()
            .map(BranchStatus::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(in_tx)?;
        Ok(TransactionStatus {
            gid,
            mode,
            state,
            outcome: Outcome::from_proto(t.outcome),
            branches,
            created_at: unix_ms(t.created_unix_ms),
            updated_at: unix_ms(t.updated_unix_ms),
            deadline: (t.deadline_unix_ms != 0).then(|| unix_ms(t.deadline_unix_ms)),
            stuck: t.stuck,
            reason: non_empty(t.reason),
        })
    }
}

fn non_empty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

impl Submitted {
    /// `gid` is the one the SDK sent, for a coordinator that leaves the answer's empty.
    pub(crate) fn from_proto(resp: pb::BeginResponse, gid: String) -> Submitted {
        Submitted {
            gid: if resp.gid.is_empty() { gid } else { resp.gid },
            outcome: Outcome::from_proto(resp.outcome),
            existing: resp.existing,
            reason: non_empty(resp.reason),
        }
    }
}

impl From<pb::OutcomeResponse> for OutcomeAnswer {
    fn from(o: pb::OutcomeResponse) -> Self {
        OutcomeAnswer {
            outcome: Outcome::from_proto(o.outcome),
            known: o.known,
            log_id: o.log_id,
        }
    }
}

impl From<pb::RetryResponse> for RetryOutcome {
    fn from(r: pb::RetryResponse) -> Self {
        RetryOutcome {
            retried: r.retried,
            forwarded: r.forwarded,
        }
    }
}

impl TryFrom<pb::ListResponse> for ListPage {
    type Error = ClientError;

    fn try_from(l: pb::ListResponse) -> Result<Self, ClientError> {
        Ok(ListPage {
            transactions: l
                .transactions
                .into_iter()
                .map(TransactionStatus::try_from)
                .collect::<Result<_, _>>()?,
            next_page_token: Some(l.next_page_token).filter(|t| !t.is_empty()),
        })
    }
}

impl ManualResolution {
    pub(crate) fn to_proto(&self, gid: String) -> pb::ResolveRequest {
        pb::ResolveRequest {
            gid,
            branch_id: self.branch_id,
            operator: self.operator.clone(),
            reason: self.reason.clone(),
        }
    }
}

impl From<&ListFilter> for pb::ListRequest {
    fn from(f: &ListFilter) -> Self {
        pb::ListRequest {
            states: f.states.iter().map(|s| s.to_proto() as i32).collect(),
            mode: f.mode.map_or(pb::Mode::Unspecified, Mode::to_proto) as i32,
            stuck_only: f.stuck_only,
            min_age_ms: f.min_age.map_or(0, |a| a.as_millis() as u64),
            page_size: f.page_size.unwrap_or(0),
            page_token: f.page_token.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto_tx() -> pb::Transaction {
        pb::Transaction {
            gid: "g-1".into(),
            mode: pb::Mode::Saga as i32,
            state: pb::TxState::Compensating as i32,
            outcome: pb::Outcome::Pending as i32,
            branches: vec![
                pb::BranchStatus {
                    branch_id: 0,
                    endpoint: "http://127.0.0.1:7801".into(),
                    handler: "book".into(),
                    state: pb::BranchState::Aborted as i32,
                    attempts: 3,
                    last_error: String::new(),
                    resolution: Some(pb::OperatorResolution {
                        operator: "ops@example".into(),
                        unix_ms: 1_700_000_000_500,
                        reason: "refund issued by hand".into(),
                    }),
                },
                pb::BranchStatus {
                    branch_id: 1,
                    endpoint: "http://127.0.0.1:7802".into(),
                    handler: "pay".into(),
                    state: pb::BranchState::InDoubt as i32,
                    attempts: 7,
                    last_error: "connection refused".into(),
                    resolution: None,
                },
            ],
            created_unix_ms: 1_700_000_000_000,
            updated_unix_ms: 1_700_000_000_250,
            deadline_unix_ms: 1_700_000_010_000,
            stuck: true,
            reason: "step 1 (pay at http://127.0.0.1:7802) failed: card declined".into(),
        }
    }

    #[test]
    fn a_transaction_maps_every_field() {
        let t = TransactionStatus::try_from(proto_tx()).unwrap();
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(
            t,
            TransactionStatus {
                gid: "g-1".into(),
                mode: Mode::Saga,
                state: TxState::Compensating,
                outcome: Outcome::Pending,
                branches: vec![
                    BranchStatus {
                        branch_id: 0,
                        endpoint: "http://127.0.0.1:7801".into(),
                        handler: "book".into(),
                        state: BranchState::Aborted,
                        attempts: 3,
                        last_error: None,
                        resolution: Some(OperatorResolution {
                            operator: "ops@example".into(),
                            at: at(1_700_000_000_500),
                            reason: "refund issued by hand".into(),
                        }),
                    },
                    BranchStatus {
                        branch_id: 1,
                        endpoint: "http://127.0.0.1:7802".into(),
                        handler: "pay".into(),
                        state: BranchState::InDoubt,
                        attempts: 7,
                        last_error: Some("connection refused".into()),
                        resolution: None,
                    },
                ],
                created_at: at(1_700_000_000_000),
                updated_at: at(1_700_000_000_250),
                deadline: Some(at(1_700_000_010_000)),
                stuck: true,
                reason: Some("step 1 (pay at http://127.0.0.1:7802) failed: card declined".into()),
            }
        );
        assert!(!t.state.is_terminal());
    }

    #[test]
    fn every_known_state_maps_and_an_unknown_one_is_an_unexpected_answer() {
        let states = [
            (pb::TxState::Active, TxState::Active),
            (pb::TxState::Committing, TxState::Committing),
            (pb::TxState::Aborting, TxState::Aborting),
            (pb::TxState::Compensating, TxState::Compensating),
            (pb::TxState::Committed, TxState::Committed),
            (pb::TxState::Aborted, TxState::Aborted),
        ];
        for (p, d) in states {
            assert_eq!(TxState::from_proto(p as i32).unwrap(), d);
            assert_eq!(d.to_proto(), p);
        }
        let branches = [
            (pb::BranchState::Pending, BranchState::Pending),
            (pb::BranchState::InDoubt, BranchState::InDoubt),
            (pb::BranchState::Prepared, BranchState::Prepared),
            (pb::BranchState::Refused, BranchState::Refused),
            (pb::BranchState::Succeeded, BranchState::Succeeded),
            (pb::BranchState::Failed, BranchState::Failed),
            (pb::BranchState::Committed, BranchState::Committed),
            (pb::BranchState::Aborted, BranchState::Aborted),
        ];
        for (p, d) in branches {
            assert_eq!(BranchState::from_proto(p as i32).unwrap(), d);
        }
        let mut newer = proto_tx();
        newer.state = 99;
        let err = TransactionStatus::try_from(newer).unwrap_err();
        assert!(
            matches!(&err, ClientError::UnexpectedAnswer(m) if m.contains("g-1") && m.contains("99")),
            "{err:?}"
        );
        let mut newer = proto_tx();
        newer.branches[1].state = 42;
        assert!(TransactionStatus::try_from(newer).is_err());
        // An outcome is never an error: not known final is the safe reading.
        assert_eq!(Outcome::from_proto(42), Outcome::Pending);
        assert_eq!(
            Outcome::from_proto(pb::Outcome::Committed as i32),
            Outcome::Committed
        );
    }

    #[test]
    fn no_deadline_and_no_next_page_read_as_none() {
        let mut t = proto_tx();
        t.deadline_unix_ms = 0;
        let page = ListPage::try_from(pb::ListResponse {
            transactions: vec![t],
            next_page_token: String::new(),
        })
        .unwrap();
        assert_eq!(page.transactions[0].deadline, None);
        let mut t = proto_tx();
        t.reason = String::new();
        assert_eq!(TransactionStatus::try_from(t).unwrap().reason, None);
        assert_eq!(page.next_page_token, None);
    }

    #[test]
    fn a_list_filter_maps_every_field() {
        let f = ListFilter::new()
            .states([TxState::Committing, TxState::Aborting])
            .mode(Mode::TwoPhase)
            .stuck_only()
            .min_age(Duration::from_secs(60))
            .page_size(10)
            .page_token("next");
        assert_eq!(
            pb::ListRequest::from(&f),
            pb::ListRequest {
                states: vec![pb::TxState::Committing as i32, pb::TxState::Aborting as i32],
                mode: pb::Mode::TwoPhase as i32,
                stuck_only: true,
                min_age_ms: 60_000,
                page_size: 10,
                page_token: "next".into(),
            }
        );
        assert_eq!(
            pb::ListRequest::from(&ListFilter::default()),
            pb::ListRequest::default()
        );
    }

    #[test]
    fn the_other_answers_map_every_field() {
        let o = OutcomeAnswer::from(pb::OutcomeResponse {
            outcome: pb::Outcome::Aborted as i32,
            known: false,
            log_id: "log-1".into(),
            finished: false,
        });
        assert_eq!(
            o,
            OutcomeAnswer {
                outcome: Outcome::Aborted,
                known: false,
                log_id: "log-1".into()
            }
        );
        assert_eq!(
            RetryOutcome::from(pb::RetryResponse {
                retried: 2,
                forwarded: false
            }),
            RetryOutcome {
                retried: 2,
                forwarded: false
            }
        );
        let by_hand = ManualResolution {
            branch_id: 1,
            operator: "ops@example".into(),
            reason: "refund issued by hand".into(),
        };
        assert_eq!(
            by_hand.to_proto("g".into()),
            pb::ResolveRequest {
                gid: "g".into(),
                branch_id: 1,
                operator: "ops@example".into(),
                reason: "refund issued by hand".into(),
            }
        );
    }
}
