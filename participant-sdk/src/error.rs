//! Errors, by side:
//!
//! - the participant side: [`ParticipantError`] (building and serving a participant),
//!   [`HandlerError`] (what a handler returns), [`StoreError`] (a barrier store failed);
//! - the client side: [`SdkError`], kept here only until the client's own error type lands
//!   (see its docs).

use std::fmt;

/// An error from building or running a [`crate::Participant`]. Each variant names what the
/// caller should do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParticipantError {
    /// The participant was configured wrongly (duplicate or empty handler name, bad
    /// coordinator URI, zero `in_doubt_after`). Fix the code or configuration.
    #[error("invalid participant configuration: {0}")]
    Config(String),

    /// The participant's barrier store failed (reading the in-doubt index, opening the
    /// store). Nothing was answered as done; check the store (disk full, permissions,
    /// corruption, database down) and retry.
    #[error("participant storage error: {0}")]
    Storage(#[from] StoreError),

    /// The participant's gRPC server failed while serving (for example, the listener broke).
    #[error("participant server failed: {0}; restart it")]
    Serve(#[source] tonic::transport::Error),

    /// The participant's store can no longer promise durability (an fsync failed), so it
    /// stopped serving (fail-stop). Restart the process: the store recovers from disk, and
    /// every operation not answered is delivered again.
    #[error("participant stopped: {0}; restart the process to recover from disk")]
    DurabilityLost(String),
}

/// A barrier store failed: an I/O or database error, or data that does not decode (corrupt
/// rows are never guessed at). Says what was being done; the cause is its
/// [`std::error::Error::source`].
#[derive(Debug)]
pub struct StoreError {
    what: String,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl StoreError {
    /// `source` happened while doing `what` (e.g. "reading the in-doubt index").
    pub fn new(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> StoreError {
        StoreError {
            what: what.into(),
            source: source.into(),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}; check the participant's store (disk full, permissions, corruption, \
             database down)",
            self.what,
            chain(&*self.source)
        )
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// What a handler returns when it does not succeed. Owned by the SDK, whatever the store:
/// each store converts its own errors into it (`?` on a sled handle through
/// `From<sled::transaction::UnabortableTransactionError>`).
///
/// Either way the handler's writes are rolled back with the store's transaction.
#[derive(Debug)]
#[non_exhaustive]
pub enum HandlerError {
    /// A business "no" ([`crate::refuse`]): from `prepare` it is REFUSED, from `execute`
    /// FAILED, both recorded by the barrier and repeated to duplicates. From `commit`,
    /// `abort` and `compensate` it is answered RETRY (nothing recorded): those must
    /// eventually succeed.
    Refuse(String),
    /// Not now: nothing is recorded and the operation is answered RETRY, so the coordinator
    /// delivers it again (a store error, a conflict the store could not retry itself, a
    /// dependency that is down). Build one with [`HandlerError::retry`] or `?` on a store
    /// error.
    Retry(Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl HandlerError {
    /// A RETRY with `why` as the message (see [`HandlerError::Retry`]).
    pub fn retry(
        why: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> HandlerError {
        HandlerError::Retry(why.into())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerError::Refuse(reason) => write!(f, "refused: {reason}"),
            HandlerError::Retry(e) => write!(f, "retry: {}", chain(&**e)),
        }
    }
}

impl std::error::Error for HandlerError {}

// ---------------------------------------------------------------------------------------
// Client side. `SdkError` is the client's error until the client's own error type
// (`ClientError`, being introduced in `client*` by another change) lands; then this section
// goes. Participant code does not use it.
// ---------------------------------------------------------------------------------------

/// An error from the client side of the SDK. Each variant names what the caller should do
/// about it. (The participant side has its own error, [`ParticipantError`].)
///
/// The split that matters most is [`SdkError::Rejected`] versus [`SdkError::OutcomeUnknown`]:
/// a rejected request changed nothing and will be rejected again if sent unchanged, while a
/// request whose outcome is unknown may have been applied and must be resolved by looking up
/// its gid ([`crate::Client::get`], [`crate::Client::watch`]) or by resubmitting it with the
/// same gid (`Begin` is idempotent for the same gid and definition).
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The coordinator refused the request (bad input, including a gid outside the limits
    /// the coordinator is configured with; unknown gid; ...). Nothing was applied; do not
    /// retry it unchanged.
    #[error(
        "the coordinator rejected the request ({code:?}): {message}; \
         nothing was applied: fix the request, sending it unchanged fails again"
    )]
    Rejected {
        /// The gRPC status code the coordinator answered with.
        code: tonic::Code,
        /// The coordinator's explanation.
        message: String,
    },

    /// `Begin` named a gid that already belongs to a transaction with **another definition**
    /// (`ALREADY_EXISTS`). Something was applied: that transaction exists, running or
    /// finished. Look it up ([`crate::Client::get`], [`crate::Client::watch`]) before doing
    /// anything else; submitting this definition under a new gid would run a second
    /// transaction besides it.
    #[error(
        "transaction {gid} already exists with a different definition ({message}): it was \
         submitted before, perhaps by an earlier attempt of this caller; look it up with \
         Client::get/Client::watch on gid {gid} before resubmitting anything under a new gid"
    )]
    GidExists {
        /// The gid that is taken.
        gid: String,
        /// The coordinator's explanation.
        message: String,
    },

    /// The request was (or may have been) sent, and no answer came back: the transaction may
    /// or may not exist. Resolve it with [`crate::Client::get`] / [`crate::Client::watch`] on
    /// `gid`, or resubmit the same definition with the same gid.
    #[error(
        "outcome of transaction {gid} is unknown ({code:?}: {message}): it may or may not have \
         been applied; look it up with Client::get/Client::watch on gid {gid}, or resubmit \
         the same definition with the same gid (Begin is idempotent)",
        code = source.code(),
        message = source.message()
    )]
    OutcomeUnknown {
        /// The transaction's gid (generated by the SDK when the caller gave none).
        gid: String,
        /// The gRPC status the call failed with.
        #[source]
        source: tonic::Status,
    },

    /// A read-only or steering call (get, list, watch, outcome, retry) got no answer. It
    /// changed nothing that matters: retry it, with backoff if the coordinator is down.
    #[error(
        "the coordinator did not answer ({code:?}: {message}); the call is safe to retry",
        code = source.code(),
        message = source.message()
    )]
    Unavailable {
        /// The gRPC status the call failed with.
        #[source]
        source: tonic::Status,
    },

    /// No connection could be established to `uri`.
    #[error(
        "cannot connect to {uri}: {cause}; is the service running and is the URI right?",
        cause = chain(source)
    )]
    Connect {
        /// The URI that was dialed.
        uri: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },

    /// The SDK was configured or used wrongly (bad URI, a payload that does not serialize).
    /// Fix the code or configuration.
    #[error("invalid SDK configuration or input: {0}")]
    Config(String),
}

/// Codes that mean "the coordinator looked at the request and said no": nothing was applied.
/// Every other code is treated as "may have been applied", which is the safe side.
pub(crate) fn is_rejection(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        InvalidArgument
            | AlreadyExists
            | FailedPrecondition
            | OutOfRange
            | NotFound
            | PermissionDenied
            | Unauthenticated
            | Unimplemented
    )
}

/// Classifies the failure of a call that creates a transaction.
pub(crate) fn submit_error(gid: &str, status: tonic::Status) -> SdkError {
    if status.code() == tonic::Code::AlreadyExists {
        return SdkError::GidExists {
            gid: gid.to_string(),
            message: status.message().to_string(),
        };
    }
    if is_rejection(status.code()) {
        SdkError::Rejected {
            code: status.code(),
            message: status.message().to_string(),
        }
    } else {
        SdkError::OutcomeUnknown {
            gid: gid.to_string(),
            source: status,
        }
    }
}

/// Classifies the failure of a call that only reads or steers an existing transaction.
pub(crate) fn read_error(status: tonic::Status) -> SdkError {
    if is_rejection(status.code()) {
        SdkError::Rejected {
            code: status.code(),
            message: status.message().to_string(),
        }
    } else {
        SdkError::Unavailable { source: status }
    }
}

/// An error and its causes, `outer: inner: innermost` (tonic's transport error alone says only
/// "transport error"; the cause says e.g. "Connection refused").
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}
