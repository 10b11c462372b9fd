//! The storage seam of the participant: [`BarrierStore`].
//!
//! A barrier store has one job (DESIGN.md section 7): run the business change and the
//! barrier rows of one delivery in **one atomic transaction of the participant's own store**,
//! then make that transaction durable before the answer leaves. Everything else about a
//! delivery (which rows to write, whether the business code runs, what to answer) is decided
//! by the pure function [`crate::barrier::rules::plan`], which every store calls: the rules
//! live in one place, and a store only reads rows, writes rows and commits.
//!
//! # Shape of the trait, and why
//!
//! - **Async.** A store talks to a disk (sled, on a blocking thread) or to a database over
//!   the network (PostgreSQL): [`BarrierStore::deliver`] and the reads are `async` and their
//!   futures are `Send`, so the participant's gRPC service can await them.
//! - **The handler's handle is the store's own transaction**, an associated type with a
//!   lifetime, [`BarrierStore::Tx`]: for sled a wrapper of `&TransactionalTree`
//!   ([`crate::sled::SledTx`]); for PostgreSQL it can be `tokio_postgres::Transaction<'t>`
//!   itself, borrowed from the connection for the length of the delivery. Handlers receive it
//!   as [`Txn<'_, S>`](Txn), a thin wrapper that dereferences to it (the wrapper exists so that
//!   handler methods written for a concrete store match the trait's signature; a bare
//!   `&mut S::Tx<'_>` would make the lifetime early-bound and every impl fail to compile).
//! - **Handlers are async** ([`crate::TwoPhaseHandler`], [`crate::SagaHandler`]): a
//!   PostgreSQL handler awaits its queries on the delivery's transaction. Their futures are
//!   **not required to be `Send`**: a store decides where a handler runs, and a sled
//!   transaction handle is not `Send` (it holds `Rc`s). The store gets the handler as a
//!   [`HandlerCall`] (owned, `Send`, `'static`) and runs its future where it likes:
//!   - sled runs the whole delivery on a blocking thread inside sled's synchronous
//!     transaction closure, and drives the handler's future to completion there with a
//!     trivial executor: a sled handle does no I/O, so a handler future is ready at once
//!     (one that waits on something else is answered RETRY, never blocked on while holding
//!     sled's transaction lock). sled may run the closure more than once on a conflict, and
//!     the handler with it: handlers write only through the handle;
//!   - a store whose handle does real async I/O (PostgreSQL: `Tx<'t> =
//!     tokio_postgres::Transaction<'t>`) runs the delivery on a blocking thread with
//!     `tokio::runtime::Handle::block_on` (no `Send` needed; the runtime's workers drive the
//!     sockets), or on worker threads of its own (a `LocalSet`): begin, read the branch's
//!     rows, plan, run the handler on the transaction, write the rows, then `COMMIT` (or
//!     `PREPARE TRANSACTION` for a prepare), which is durable on return: the database's commit
//!     is the sync. `participant-sdk/tests/async_store.rs` is such a store (in memory, with an
//!     async handle), written with the public API only, and passes the conformance suite.
//! - **Durability and fail-stop**: [`BarrierStore::deliver`] returns only once its verdict
//!   is durable. A store that can no longer promise durability (an fsync failed) answers
//!   RETRY from then on and says why in [`BarrierStore::failure`]; the participant then stops
//!   serving (see [`crate::Participant::failed`]).
//! - **Panics** in a handler are the store's to catch (the transaction is rolled back): the
//!   verdict is [`Verdict::Retry`] naming the panic ([`panic_message`] helps). The participant
//!   catches a panic that escapes a store too, and reports it the same way.
//!
//! - **Retention** (optional): a store that [`BarrierStore::sweeps`] pages through its rows
//!   by gid, replaces the rows of a finished gid by a small marker in one transaction, and
//!   plans every delivery to a marked gid with [`crate::barrier::rules::plan_swept`]; the
//!   participant decides what to sweep (see [`crate::retention`]).
//!
//! The contract is written as tests: [`conformance`], which every store runs (the sled store
//! runs it in `cargo test`).

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;

use bytes::Bytes;

use crate::barrier::{BarrierRow, InDoubt, Op, Swept, Verdict};
use crate::error::StoreError;
use crate::participant::{BranchContext, HandlerResult, Registered};

pub mod conformance;

/// A participant's local store for barrier rows and business data: see the module docs.
pub trait BarrierStore: Send + Sync + Sized + 'static {
    /// The store's open transaction, handed to handlers (wrapped in [`Txn`]) for the length
    /// of one delivery. Business writes made through it commit atomically with the barrier
    /// rows of that delivery.
    type Tx<'t>;

    /// Runs one delivery of `op` through the barrier, all in one transaction of this store:
    /// read the rows recorded for the branch of `ctx`, ask [`crate::barrier::rules::plan`],
    /// run `handler` if the plan says so (a business refusal rolls its changes back and is
    /// recorded as the plan's `settle` says, in a new transaction that plans again), write
    /// the plan's rows and its in-doubt index change, commit; then make the commit durable.
    ///
    /// Returns only once the verdict may be sent: a [`Verdict::Answer`] is durable (also a
    /// repeated one: its first delivery may still be waiting for its sync, and the repeat
    /// must not overtake it). `handler` is `None` when no handler of the right kind is
    /// registered under `ctx.handler` (the rules decide whether that matters). A storage
    /// error, a handler's [`crate::HandlerError::Retry`] or panic, a durability failure:
    /// [`Verdict::Retry`], with nothing of the delivery visible.
    fn deliver(
        &self,
        op: Op,
        ctx: BranchContext,
        payload: Bytes,
        handler: Option<HandlerCall<Self>>,
    ) -> impl Future<Output = Verdict> + Send;

    /// Every row recorded for `gid`, ordered by branch then operation ([`Op::key_byte`]).
    fn rows(&self, gid: &str) -> impl Future<Output = Result<Vec<BarrierRow>, StoreError>> + Send;

    /// Every row in the store, ordered by gid, branch, operation (sort by
    /// [`BarrierRow::seq`] for the order they were committed in).
    fn all_rows(&self) -> impl Future<Output = Result<Vec<BarrierRow>, StoreError>> + Send;

    /// The open prepared branches (prepared, neither committed nor aborted), from the
    /// store's index of open branches (written with the `PREPARED` row, removed with the
    /// commit/abort row), prepared at or before `prepared_before_unix_ms` (`None`: all),
    /// each with its full payload for a replay. A corrupt entry is logged and skipped: the
    /// resolver must not stop on one bad branch.
    fn in_doubt(
        &self,
        prepared_before_unix_ms: Option<u64>,
    ) -> impl Future<Output = Result<Vec<InDoubt>, StoreError>> + Send;

    /// Whether this store implements the sweep (the four methods below). A store that does
    /// not keeps its rows forever; [`crate::ParticipantBuilder::retention`] refuses it.
    fn sweeps(&self) -> bool {
        false
    }

    /// A page of rows for the sweep: every row of whole gids, in gid order (then branch,
    /// operation), of the gids after `after_gid` (`None`: from the first), stopping at the
    /// first gid boundary once `rows_max` rows are read (a gid is never split: a page holds
    /// at least one whole gid). [`SweepPage::next`] is the cursor of the next page, `None` at
    /// the end. Rows carry their [`BarrierRow::outcome_endpoint`].
    fn sweep_page(
        &self,
        after_gid: Option<String>,
        rows_max: usize,
    ) -> impl Future<Output = Result<SweepPage, StoreError>> + Send {
        let _ = (after_gid, rows_max);
        async { Ok(SweepPage::default()) }
    }

    /// Deletes the rows of `marker.gid`, provided they are still exactly `expected` (the
    /// same operations with the same sequence numbers), and keeps `marker` in their place;
    /// returns whether it did. From the moment the marker is written, every delivery to the
    /// gid is planned by [`crate::barrier::rules::plan_swept`] (nothing written, no business
    /// code), so no row can appear behind the check; if the rows differ, the marker is
    /// removed again and nothing is deleted. Need not be synced: rows and marker change
    /// atomically, and an answer given from the marker is synced by
    /// [`BarrierStore::deliver`] as any other.
    fn sweep_gid(
        &self,
        expected: Vec<BarrierRow>,
        marker: Swept,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = (expected, marker);
        async { Ok(false) }
    }

    /// Deletes at most `max` markers swept before `swept_before_unix_ms`, oldest first;
    /// returns how many.
    fn expire_swept(
        &self,
        swept_before_unix_ms: u64,
        max: usize,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send {
        let _ = (swept_before_unix_ms, max);
        async { Ok(0) }
    }

    /// The marker of `gid`, if its rows were swept (and the marker has not expired).
    fn swept(&self, gid: &str) -> impl Future<Output = Result<Option<Swept>, StoreError>> + Send {
        let _ = gid;
        async { Ok(None) }
    }

    /// Why this store can no longer promise durability (a failed fsync: nothing written
    /// since can be vouched for), once that happened; never cleared. `None` while all is
    /// well.
    fn failure(&self) -> Option<String>;
}

/// One page of [`BarrierStore::sweep_page`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SweepPage {
    /// Every row of the page's gids.
    pub rows: Vec<BarrierRow>,
    /// The gid to pass as `after_gid` for the next page; `None`: this was the last.
    pub next: Option<String>,
}

impl SweepPage {
    /// A page (for stores).
    pub fn new(rows: Vec<BarrierRow>, next: Option<String>) -> SweepPage {
        SweepPage { rows, next }
    }
}

/// The handle a handler receives: the store's transaction ([`BarrierStore::Tx`]) for one
/// delivery. Dereferences to it, so a handler calls the store's own API on it
/// (`tx.insert(..)` on sled, `tx.execute(..)` on a PostgreSQL transaction).
pub struct Txn<'t, S: BarrierStore>(S::Tx<'t>);

impl<'t, S: BarrierStore> Txn<'t, S> {
    /// Wraps a store's transaction (for stores).
    pub fn new(tx: S::Tx<'t>) -> Self {
        Txn(tx)
    }

    /// The store's transaction (for stores).
    pub fn into_inner(self) -> S::Tx<'t> {
        self.0
    }
}

impl<'t, S: BarrierStore> Deref for Txn<'t, S> {
    type Target = S::Tx<'t>;
    fn deref(&self) -> &S::Tx<'t> {
        &self.0
    }
}

impl<'t, S: BarrierStore> DerefMut for Txn<'t, S> {
    fn deref_mut(&mut self) -> &mut S::Tx<'t> {
        &mut self.0
    }
}

/// The business code of one delivery: the registered handler's method for one operation.
/// Owned, `Send` and `'static`, so a store can move it to the thread that runs it.
pub struct HandlerCall<S: BarrierStore> {
    op: Op,
    handler: Registered<S>,
    /// The delivery's span (current when the call was made): the handler's future runs in
    /// it wherever the store polls it, so the handler's own spans join the trace.
    span: tracing::Span,
}

/// A handler's future, as a store runs it: not `Send` (see the module docs).
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = HandlerResult> + 'a>>;

impl<S: BarrierStore> HandlerCall<S> {
    pub(crate) fn new(op: Op, handler: Registered<S>) -> Option<HandlerCall<S>> {
        handler.serves(op).then(|| HandlerCall {
            op,
            handler,
            span: tracing::Span::current(),
        })
    }

    /// The operation this call runs.
    pub fn op(&self) -> Op {
        self.op
    }

    /// Runs the handler's method for [`HandlerCall::op`] on `tx`. May be called more than
    /// once (sled re-runs a transaction on a conflict): each call is a fresh run.
    pub fn run<'a, 't: 'a>(
        &'a self,
        ctx: &'a BranchContext,
        tx: &'a mut Txn<'t, S>,
        payload: &'a [u8],
    ) -> HandlerFuture<'a> {
        use tracing::Instrument;
        Box::pin(
            self.handler
                .call(self.op, ctx, tx, payload)
                .instrument(self.span.clone()),
        )
    }
}

/// The message of a caught panic (`panic!("...")` payloads are `&str` or `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}
