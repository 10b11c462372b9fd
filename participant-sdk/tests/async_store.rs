//! A barrier store other than sled, written only with the SDK's public API, whose handle is
//! **async** the way a `tokio_postgres::Transaction` is: handlers await it. It shows that the
//! seam fits such a store (the pattern a PostgreSQL store can follow: run the delivery on a
//! blocking thread with `Handle::block_on`, so handler futures need not be `Send`, and keep
//! the whole delivery in one transaction), and it runs the conformance suite on it.
//!
//! The "database" is in memory: one transaction at a time (an async lock held for the whole
//! delivery), business data staged in the handle and committed with the rows, or dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use treaty_sdk::barrier::now_unix_ms;
use treaty_sdk::barrier::rules::{self, Business, Delivery, InDoubt as IndexChange, Recorded};
use treaty_sdk::store::conformance::{self, Harness};
use treaty_sdk::store::panic_message;
use treaty_sdk::{
    BarrierRow, BarrierStore, BranchContext, HandlerCall, HandlerError, HandlerResult, InDoubt, Op,
    StoreError, Txn, Verdict,
};

#[derive(Default)]
struct Db {
    /// Rows by (gid, branch, op byte): the order `rows` promises.
    rows: BTreeMap<(String, u32, u8), BarrierRow>,
    seq: u64,
    open: BTreeMap<(String, u32), InDoubt>,
    marks: BTreeSet<String>,
}

#[derive(Clone, Default)]
struct MemStore {
    db: Arc<tokio::sync::Mutex<Db>>,
}

/// The handler's handle: business data staged for this transaction. Its methods are async.
struct MemTx<'t> {
    marks: &'t mut BTreeSet<String>,
}

impl MemTx<'_> {
    async fn insert(&mut self, key: &str) {
        // A real store awaits the network here; yielding makes the future really pend.
        tokio::task::yield_now().await;
        self.marks.insert(key.to_string());
    }
}

fn ops_of(op: Op) -> &'static [Op] {
    match op {
        Op::Prepare | Op::Commit | Op::Abort => &[Op::Prepare, Op::Commit, Op::Abort],
        Op::Execute | Op::Compensate => &[Op::Execute, Op::Compensate],
    }
}

impl Db {
    fn recorded(&self, gid: &str, branch_id: u32, op: Op) -> Vec<Recorded> {
        ops_of(op)
            .iter()
            .filter_map(|o| self.rows.get(&(gid.to_string(), branch_id, o.key_byte())))
            .map(|r| Recorded {
                op: r.op,
                answer: r.answer,
                fingerprint: r.fingerprint,
                log_id: r.log_id.clone(),
                message: r.message.clone(),
            })
            .collect()
    }
}

async fn deliver_in_one_transaction(
    db: Arc<tokio::sync::Mutex<Db>>,
    op: Op,
    ctx: BranchContext,
    payload: Bytes,
    handler: Option<HandlerCall<MemStore>>,
) -> Verdict {
    let mut db = db.lock().await;
    let delivery = Delivery::new(op, &ctx.handler, &payload, &ctx.log_id, handler.is_some());
    let plan = rules::plan(&db.recorded(&ctx.gid, ctx.branch_id, op), &delivery);
    let mut staged = db.marks.clone();
    let mut refusal = None;
    if let Business::Run { .. } = plan.business {
        let call = handler.expect("the rules run business code only if registered");
        let mut tx = Txn::new(MemTx { marks: &mut staged });
        let ran = AssertUnwindSafe(call.run(&ctx, &mut tx, &payload))
            .catch_unwind()
            .await;
        match ran {
            Ok(Ok(())) => {}
            Ok(Err(HandlerError::Refuse(reason))) => refusal = Some(reason),
            Ok(Err(e)) => return Verdict::Retry(format!("{op} handler: {e}")),
            Err(panic) => {
                return Verdict::Retry(format!("{op} handler panicked: {}", panic_message(&*panic)))
            }
        }
    }
    let settled = plan.settle(refusal.as_deref());
    for w in &settled.writes {
        db.seq += 1;
        let row = BarrierRow::new(
            ctx.gid.clone(),
            ctx.branch_id,
            w.op,
            w.answer,
            now_unix_ms(),
            db.seq,
            w.fingerprint,
            ctx.log_id.clone(),
            ctx.handler.clone(),
            w.message.clone(),
        );
        db.rows
            .insert((ctx.gid.clone(), ctx.branch_id, w.op.key_byte()), row);
    }
    let key = (ctx.gid.clone(), ctx.branch_id);
    match settled.in_doubt {
        IndexChange::Unchanged => {}
        IndexChange::Open => {
            let entry = InDoubt::new(
                ctx.gid.clone(),
                ctx.branch_id,
                ctx.handler.clone(),
                payload.to_vec(),
                ctx.log_id.clone(),
                ctx.outcome_endpoint.clone(),
                now_unix_ms(),
            );
            db.open.insert(key, entry);
        }
        IndexChange::Close => {
            db.open.remove(&key);
        }
    }
    if refusal.is_none() {
        db.marks = staged;
    }
    Verdict::from_reply(op, &ctx.gid, ctx.branch_id, &ctx.handler, settled.reply)
}

impl BarrierStore for MemStore {
    type Tx<'t> = MemTx<'t>;

    async fn deliver(
        &self,
        op: Op,
        ctx: BranchContext,
        payload: Bytes,
        handler: Option<HandlerCall<Self>>,
    ) -> Verdict {
        // Handler futures are not `Send`: run the delivery on a thread of its own, driving
        // it with the runtime's I/O and timers (what a PostgreSQL store can do too).
        let rt = tokio::runtime::Handle::current();
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            rt.block_on(deliver_in_one_transaction(db, op, ctx, payload, handler))
        })
        .await
        .unwrap_or_else(|e| Verdict::Retry(format!("{op} delivery panicked: {e}")))
    }

    async fn rows(&self, gid: &str) -> Result<Vec<BarrierRow>, StoreError> {
        let db = self.db.lock().await;
        Ok(db.rows.values().filter(|r| r.gid == gid).cloned().collect())
    }

    async fn all_rows(&self) -> Result<Vec<BarrierRow>, StoreError> {
        Ok(self.db.lock().await.rows.values().cloned().collect())
    }

    async fn in_doubt(&self, before: Option<u64>) -> Result<Vec<InDoubt>, StoreError> {
        let db = self.db.lock().await;
        Ok(db
            .open
            .values()
            .filter(|b| before.is_none_or(|c| b.prepared_unix_ms <= c))
            .cloned()
            .collect())
    }

    fn failure(&self) -> Option<String> {
        None
    }
}

struct MemHarness;

impl Harness for MemHarness {
    type Store = MemStore;

    async fn open(&self) -> MemStore {
        MemStore::default()
    }

    async fn write_mark<'a, 't>(tx: &'a mut Txn<'t, MemStore>, key: &'a str) -> HandlerResult {
        tx.insert(key).await;
        Ok(())
    }

    async fn has_mark(store: &MemStore, key: &str) -> bool {
        store.db.lock().await.marks.contains(key)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_with_an_async_handle_passes_the_conformance_suite() {
    conformance::run_all(&MemHarness).await;
}
