//! Treaty SDK: embed Treaty in a service.
//!
//! # Where things are
//!
//! - [`participant`]: the participant side. Register handlers ([`TwoPhaseHandler`],
//!   [`SagaHandler`], or async closures named by their method via [`TwoPhase`] / [`Saga`])
//!   on a [`Participant::builder`] over a barrier store, then either `add_service`
//!   [`Participant::into_service`] to your own tonic server or call [`Participant::serve`].
//!   Handlers are async and run inside one transaction of the store, which they receive as
//!   [`Txn<'_, S>`](Txn).
//! - [`store`]: the storage seam, [`BarrierStore`]: run the business change and the barrier
//!   rows in one atomic transaction of the participant's own store, then make it durable
//!   before the answer leaves. Its contract is a public test suite,
//!   [`store::conformance`], that every store runs.
//! - [`sled`]: [`SledStore`], the embedded default store (one value: database, tree and
//!   group-commit fsync); its module docs give the storage layout and how async handlers
//!   run inside sled's synchronous transactions.
//! - `postgres` (cargo feature `postgres`): `PgStore`, the barrier store for business data in
//!   PostgreSQL; handlers get the delivery's `tokio_postgres::Transaction`, and a 2PC prepare
//!   is a PostgreSQL prepared transaction.
//! - [`barrier`]: what every store shares: operations, answers, rows, and the rules. The
//!   decisions are one pure function, [`barrier::rules::plan`], shared with the
//!   coordinator's simulation. A duplicate repeats the first answer, a compensation that
//!   arrives before its action is recorded as a no-op and the late action is refused, a
//!   recorded cancel wins over a recorded action, and a gid reused with another body is
//!   refused.
//! - [`metrics`]: the participant's Prometheus metrics (deliveries, their latency, barrier
//!   decisions, in-doubt resolutions, fail-stop), added to the host service's registry by
//!   [`Participant::register_metrics`].
//! - In-doubt resolution: a branch left prepared is resolved by asking the coordinator log
//!   that drove it ([`Participant::resolve_in_doubt`]); presumed abort is applied only from
//!   that log. The coordinator is given as a URI (dialled with
//!   [`ParticipantBuilder::coordinator_options`]: TLS, token) or as a channel you built
//!   ([`ParticipantBuilder::coordinator_channel`], for interceptors).
//! - [`retention`]: the sweep of barrier rows of finished transactions
//!   ([`ParticipantBuilder::retention`], [`Participant::sweep`]): when a row may go, why that
//!   is safe, and the marker that keeps a late duplicate harmless.
//! - [`client`]: submit sagas ([`Step`]) and 2PC transactions ([`Branch`]) to the
//!   coordinator with a [`Client`], and follow them up ([`TransactionStatus`], a [`Watch`]
//!   stream).
//! - [`tls`]: TLS and tokens: [`ClientOptions`] (one channel builder for the client and the
//!   participant's coordinator connection: [`TlsConfig`] and a bearer token), [`ServerTls`]
//!   for [`Participant::serve_tls`] (mTLS with a client CA), and
//!   [`ParticipantBuilder::require_token`] (refuse branch calls without the coordinator's
//!   token).
//! - Errors: [`ParticipantError`] (building and serving a participant), [`HandlerError`]
//!   (what handlers return: [`refuse`] or retry), [`StoreError`] (a store failed); on the
//!   client side [`ClientError`], split by what the caller must do (notably
//!   [`ClientError::Rejected`] versus [`ClientError::OutcomeUnknown`] versus
//!   [`ClientError::GidExists`]).
//! - The fsync that makes sled writes durable lives in its own crate, `treaty-durable`
//!   (`SledSync`), shared with the coordinator's log.
//!
//! # Example
//!
//! A participant with a 2PC handler and a saga handler over a sled store, served on its
//! own, and a client submitting a saga to it through the coordinator.
//!
//! ```no_run
//! use std::time::Duration;
//! use treaty_sdk::sled::SledStore;
//! use treaty_sdk::{decode_json, refuse, Client, Outcome, Participant, Saga, Step, TwoPhase};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SledStore::open_dir("./bank-data", "accounts")?;
//!
//! let participant = Participant::builder(store)
//!     .coordinator("http://127.0.0.1:7700") // for in-doubt resolution after a crash
//!     // 2PC: prepare reserves (here: just checks a key), commit applies, abort releases.
//!     .two_phase(
//!         "debit",
//!         TwoPhase::<SledStore>::new()
//!             .prepare(async |_ctx, tx, payload| {
//!                 let amount: u64 = decode_json(payload)?;
//!                 if amount > 100 {
//!                     return Err(refuse("insufficient funds"));
//!                 }
//!                 tx.insert(b"held", payload)?;
//!                 Ok(())
//!             })
//!             .commit(async |_ctx, tx, _payload| {
//!                 tx.remove(b"held")?;
//!                 Ok(())
//!             })
//!             .abort(async |_ctx, tx, _payload| {
//!                 tx.remove(b"held")?;
//!                 Ok(())
//!             }),
//!     )
//!     // Saga step: execute applies, compensate undoes. Both may run more than once inside
//!     // sled's retry loop: write only through `tx`.
//!     .saga(
//!         "book",
//!         Saga::<SledStore>::new()
//!             .execute(async |ctx, tx, payload| {
//!                 tx.insert(ctx.gid.as_bytes(), payload)?;
//!                 Ok(())
//!             })
//!             .compensate(async |ctx, tx, _payload| {
//!                 tx.remove(ctx.gid.as_bytes())?;
//!                 Ok(())
//!             }),
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
mod error;
pub mod metrics;
pub mod participant;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod retention;
pub mod sled;
pub mod store;
pub mod tls;

pub use crate::sled::SledStore;
pub use barrier::{Answer, BarrierRow, InDoubt, Op, Swept, Verdict};
pub use client::{
    Branch, BranchState, BranchStatus, Client, ClientError, ListFilter, ListPage, ManualResolution,
    Mode, OperatorResolution, Outcome, OutcomeAnswer, RetryOutcome, RetryPolicy, SagaBuilder, Step,
    Submitted, TransactionStatus, TwoPhaseBuilder, TxState, Watch,
};
pub use error::{HandlerError, ParticipantError, StoreError};
pub use participant::{
    decode_json, refuse, BranchContext, HandlerResult, Participant, ParticipantBuilder, Resolution,
    Saga, SagaHandler, TwoPhase, TwoPhaseHandler, Unset,
};
pub use retention::{RetentionPolicy, SweepReport};
pub use store::{BarrierStore, HandlerCall, SweepPage, Txn};
pub use tls::{ClientOptions, ServerTls, TlsConfig};
