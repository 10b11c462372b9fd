//! Errors, by side:
//!
//! - the participant side: [`ParticipantError`] (building and serving a participant),
//!   [`HandlerError`] (what a handler returns), [`StoreError`] (a barrier store failed);
//! - the client side has its own error, [`crate::ClientError`] (in `client/error.rs`).

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
