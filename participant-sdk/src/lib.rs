//! Treaty SDK: embed Treaty in a service.
//!
//! # Where things are
//!
//! - [`participant`]: the participant side. Register handlers ([`TwoPhaseHandler`],
//!   [`SagaHandler`], or closures via [`two_phase_fn`] / [`saga_fn`]) on a
//!   [`Participant::builder`], then either `add_service` [`Participant::into_service`] to
//!   your own tonic server or call [`Participant::serve`]. Handlers run synchronously inside a
//!   sled transaction on your tree.
//! - [`barrier`]: exactly-once effects. One row per `(gid, branch, operation)` in your tree,
//!   written in the same sled transaction as the business change; duplicates repeat the
//!   first answer, a compensation that arrives before its action is recorded as a no-op and
//!   the late action is refused, a recorded cancel wins over a recorded action, and a gid
//!   reused with another body is refused. **Keys starting with `0xFF 't'` are reserved.**
//!   The decisions themselves are one pure function, [`barrier::rules::plan`], shared with
//!   the coordinator's simulation.
//! - In-doubt resolution: a branch left prepared is resolved by asking the coordinator log
//!   that drove it ([`Participant::resolve_in_doubt`]); presumed abort is applied only from
//!   that log.
//! - [`durable`]: [`durable::SledSync`], the group-commit fsync that makes every barrier row
//!   durable before its answer is sent (sled's own `flush` is not a full fsync).
//! - [`client`]: submit sagas ([`Step`]) and 2PC transactions ([`Branch`]) to the
//!   coordinator with a [`Client`], and follow them up ([`TransactionStatus`], a [`Watch`]
//!   stream). Its errors are [`ClientError`], split by what the caller must do (notably
//!   [`ClientError::Rejected`] versus [`ClientError::OutcomeUnknown`] versus
//!   [`ClientError::GidExists`]).
//! - [`SdkError`]: the participant side's errors.
//!
//! # Example
//!
//! A participant with a 2PC handler and a saga handler, served on its own, and a client
//! submitting a saga to it through the coordinator.
//!
//! ```no_run
//! use std::time::Duration;
//! use treaty_sdk::{decode_json, refuse, saga_fn, two_phase_fn, Client, Outcome, Participant, Step};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::path::Path::new("./bank-data");
//! let db = sled::open(dir)?;
//! let accounts = db.open_tree("accounts")?;
//!
//! let participant = Participant::builder(db.clone(), accounts, dir)
//!     .coordinator("http://127.0.0.1:7700") // for in-doubt resolution after a crash
//!     // 2PC: prepare reserves (here: just checks a key), commit applies, abort releases.
//!     .two_phase(
//!         "debit",
//!         two_phase_fn(
//!             |_ctx, tree, payload| {
//!                 let amount: u64 = decode_json(payload)?;
//!                 if amount > 100 {
//!                     return Err(refuse("insufficient funds"));
//!                 }
//!                 tree.insert(b"held", payload)?;
//!                 Ok(())
//!             },
//!             |_ctx, tree, _payload| {
//!                 tree.remove(b"held")?;
//!                 Ok(())
//!             },
//!             |_ctx, tree, _payload| {
//!                 tree.remove(b"held")?;
//!                 Ok(())
//!             },
//!         ),
//!     )
//!     // Saga step: execute applies, compensate undoes. Both may run more than once inside
//!     // sled's retry loop: write only through `tree`.
//!     .saga(
//!         "book",
//!         saga_fn(
//!             |ctx, tree, payload| {
//!                 tree.insert(ctx.gid.as_bytes(), payload)?;
//!                 Ok(())
//!             },
//!             |ctx, tree, _payload| {
//!                 tree.remove(ctx.gid.as_bytes())?;
//!                 Ok(())
//!             },
//!         ),
//!     )
//!     .build()?;
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7801").await?;
//! tokio::spawn(participant.serve(listener, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! }));
//!
//! let client = Client::connect("http://127.0.0.1:7700").await?;
//! let submitted = client
//!     .saga()
//!     .step(
//!         Step::new("http://127.0.0.1:7801", "book")
//!             .payload_json(&"room 12")
//!             .compensation_json(&"room 12"),
//!     )
//!     .deadline(Duration::from_secs(10))
//!     .submit_and_wait(Duration::from_secs(5))
//!     .await?;
//! if submitted.outcome == Outcome::Pending {
//!     // Not final within the wait: follow it up by its gid.
//!     let status = client.get(&submitted.gid).await?;
//!     println!("{} is {:?}", submitted.gid, status.state);
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod barrier;
pub mod client;
pub mod durable;
// The client-side helpers left in error.rs (`submit_error`, `read_error`) are unused since
// the client has its own error type (client/error.rs); they go with `SdkError`'s client
// variants in the participant-side change to error.rs.
#[allow(dead_code)]
mod error;
pub mod participant;

pub use barrier::{Answer, Barrier, BarrierRow, Op, BARRIER_PREFIX};
pub use client::{
    Branch, BranchState, BranchStatus, Client, ClientError, ListFilter, ListPage, ManualResolution,
    Mode, OperatorResolution, Outcome, OutcomeAnswer, RetryOutcome, RetryPolicy, SagaBuilder, Step,
    Submitted, TransactionStatus, TwoPhaseBuilder, TxState, Watch,
};
pub use error::SdkError;
pub use participant::{
    decode_json, refuse, saga_fn, two_phase_fn, BranchContext, HandlerResult, Participant,
    ParticipantBuilder, Refusal, Resolution, SagaHandler, TwoPhaseHandler,
};

/// This build has no TLS: tonic would dial an `https://` URI in plaintext and every call
/// would fail with an obscure transport error, so it is refused up front with the reason.
pub(crate) fn refuse_tls_uri(uri: &str) -> Result<(), SdkError> {
    if uri
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("https://")
    {
        return Err(SdkError::Config(format!(
            "{uri:?}: https:// is not supported by this build of treaty-sdk (no TLS yet); use http://"
        )));
    }
    Ok(())
}
