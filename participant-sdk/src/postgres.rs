//! [`PgStore`]: the barrier store for participants whose business data lives in PostgreSQL
//! (cargo feature `postgres`).
//!
//! The handler runs its SQL on **the same PostgreSQL transaction** as the barrier rows: a
//! handler receives the delivery's [`tokio_postgres::Transaction`] (as [`Txn<'_, PgStore>`]),
//! so its business change and the barrier rows commit, or roll back, together. PostgreSQL's
//! commit is the sync: a delivery answers once its commit has returned.
//!
//! # Tables
//!
//! Created at [`PgStore::connect`] if missing (idempotent; concurrent opens are serialized by
//! an advisory lock), in the connection's schema (`search_path`):
//!
//! - `treaty_barrier`: one row per `(gid, branch_id, op)` (`op` is [`Op::key_byte`]), with the
//!   answer, the fingerprint, the log id, the handler, the message, the outcome endpoint, the
//!   wall-clock time and `seq`, the commit order. `gid` is `COLLATE "C"`, so rows and sweep
//!   pages are in byte order as on sled.
//! - `treaty_barrier_open`: the index of open prepared branches, with what a replay needs
//!   (handler, payload, log id, outcome endpoint) and the name of the branch's PostgreSQL
//!   prepared transaction; what [`BarrierStore::in_doubt`] reads.
//! - `treaty_barrier_swept`: the markers of swept gids ([`crate::retention`]).
//! - `treaty_barrier_meta`: one row, the store's identity (a UUID made at creation) and the
//!   last `seq` given out. A delivery that writes rows takes that row's lock last, just
//!   before its commit, so `seq` is in commit order with no gaps inside a transaction; commits
//!   that write rows are serialized on it (briefly: the handler already ran).
//!
//! # Concurrency
//!
//! Every saga delivery first takes a transaction-level advisory lock on its gid (class
//! [`LOCK_CLASS`], key a 32-bit hash of the gid: a collision only serializes two gids), so
//! concurrent duplicates are planned one after the other and the business code runs once;
//! a 2PC delivery takes that lock shared and its branch's lock exclusive (see below); the
//! sweep takes the gid's lock exclusive, so no row can appear behind a marker. Connections are
//! opened with `lock_timeout` ([`PgStoreOptions::lock_timeout`]): a handler blocked on a row
//! that another transaction holds answers RETRY rather than holding a pooled connection for
//! ever.
//!
//! # 2PC: PostgreSQL's prepared transactions
//!
//! A 2PC prepare is a PostgreSQL prepared transaction, so the prepare's change stays
//! invisible (and its row locks held) until the decision, survives a crash of the
//! participant and of the server, and is listed in `pg_prepared_xacts`. Its name is
//! `treaty-<store id>-<hex SHA-256 of (log id, gid, branch)>` (108 bytes; PostgreSQL allows
//! under 200): deterministic, unique across the databases of a server (the store id), and
//! recognisable by its prefix ([`PgStore::prepared_transactions`]). [`PgStore::connect`]
//! refuses a server with `max_prepared_transactions = 0` (PostgreSQL's default), saying how
//! to set it. A 2PC delivery holds advisory locks at session level for all its steps (a
//! prepared transaction does not keep session locks, so `PREPARE TRANSACTION` is allowed):
//! its gid's lock shared and its branch's lock ([`BRANCH_LOCK_CLASS`]) exclusive, so the
//! branches of one gid in one database never wait for each other (a commit waiting behind
//! its sibling branch, which waits for a row another transaction's prepared branch holds,
//! was a livelock).
//!
//! - **Prepare**: the `PREPARED` row and the open-branch entry (with the name) commit first;
//!   then the handler runs on a new transaction, which also inserts a proof row
//!   (`treaty_barrier_xact`) and ends with `PREPARE TRANSACTION '<name>'`, durable on return;
//!   then PREPARED is answered. A refusal, a retry, a panic or a failed `PREPARE` roll back
//!   and remove what the first step wrote (a refusal records `REFUSED` in that step).
//! - **Commit**: `COMMIT PREPARED '<name>'`, then the commit handler, the `COMMIT` row, the
//!   entry and the proof removed, in one transaction.
//! - **Abort**: `ROLLBACK PREPARED '<name>'` (the database undoes the prepare's change: the
//!   abort handler is **not** called for a prepared branch), then the `ABORT` row and the
//!   entry removed.
//!
//! Where the branch stands is read under the lock from three facts: the entry, the name in
//! `pg_prepared_xacts`, the proof row. Each case:
//!
//! - *Duplicate prepare* (before or after the decision, after a restart): the `PREPARED` row
//!   answers; no business code, nothing prepared again.
//! - *Commit or abort of a branch already decided* (a duplicate, a redelivery after a restart
//!   of either side): the `COMMIT`/`ABORT` row answers DONE. `COMMIT/ROLLBACK PREPARED` is
//!   sent only for a name found in `pg_prepared_xacts`, so an unknown name is never an error
//!   to interpret: the rows say what happened.
//! - *Commit of a branch never prepared* (no row): a violation (RETRY, logged), as on sled.
//! - *Abort before its prepare*: a null abort, `REFUSED` recorded for the prepare, so the late
//!   prepare is refused and prepares nothing (no hanging).
//! - *Crash after the first step of a prepare, before `PREPARE TRANSACTION`*: the entry names a
//!   transaction that does not exist and there is no proof: nothing was prepared. The next
//!   delivery of the branch removes the entry and its `PREPARED` row, then plans from what is
//!   left (a redelivered prepare runs again); the resolver does not list it.
//! - *Crash after `COMMIT PREPARED`, before its rows*: the proof row is visible (it committed
//!   with the prepare's change), so the branch is listed in doubt; the next commit (the
//!   coordinator's retry, or the resolver's replay) runs only the second step. An abort then
//!   is a violation.
//! - *Crash after `ROLLBACK PREPARED`, before its rows*: as a prepare that never happened; the
//!   abort's redelivery records a null abort (`REFUSED`, `ABORT`): nothing applied either way.
//! - *Participant restart with prepared branches*: their entries and `pg_prepared_xacts` list
//!   them ([`BarrierStore::in_doubt`]); the in-doubt resolver asks the coordinator that drove
//!   each and replays its outcome through the barrier, as on sled.
//! - *PostgreSQL restart or crash*: prepared transactions survive it; the pool reconnects.
//!
//! A reader (`rows`) may see the `PREPARED` row of a prepare whose `PREPARE TRANSACTION` is
//! in flight, or that a crash interrupted (until the next delivery removes it).
//!
//! # Where handlers run
//!
//! A handler's future is not `Send` (see [`crate::store`]): each delivery runs on a blocking
//! thread with `Handle::block_on`, while the runtime's workers drive the sockets.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use futures::FutureExt;
use sha2::{Digest, Sha256};
use tokio_postgres::{Client, GenericClient, NoTls, Row, Transaction};

use crate::barrier::rules::{
    self, Business, Delivery, Fingerprint, InDoubt as IndexChange, FINGERPRINT_BYTES,
};
use crate::barrier::{now_unix_ms, Answer, BarrierRow, InDoubt, Op, Swept, Verdict};
use crate::error::{chain, HandlerError, StoreError};
use crate::participant::BranchContext;
use crate::store::{panic_message, BarrierStore, HandlerCall, SweepPage, Txn};

/// The advisory-lock class (first key of `pg_advisory_xact_lock(int, int)`) of the barrier's
/// per-gid locks: "TRTY". An application using two-key advisory locks should avoid it.
pub const LOCK_CLASS: i32 = 0x5452_5459;

/// The advisory-lock class of the per-branch locks of 2PC deliveries: "TRTB". A 2PC delivery
/// holds its gid's lock ([`LOCK_CLASS`]) shared and its branch's lock exclusive, so that the
/// deliveries of two branches of one gid in the same database never wait for each other.
pub const BRANCH_LOCK_CLASS: i32 = 0x5452_5442;

/// The second key of the lock that serializes schema creation.
const SCHEMA_LOCK: i32 = 0;

/// How a [`PgStore`] connects.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PgStoreOptions {
    /// Most connections the store's pool opens (at least 2). Default 16.
    pub pool_size: usize,
    /// `lock_timeout` of the store's connections: how long a statement (the handler's
    /// included) waits for a lock before its delivery answers RETRY. Default 5 s.
    pub lock_timeout: Duration,
    /// With `sslmode=require` in the URL: the CA (PEM file) that signed the database
    /// server's certificate, the only roots trusted; the connections are then TLS (rustls),
    /// the certificate and host name checked. Required then. Without `sslmode=require`
    /// connections are plain TCP. Default none.
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Default for PgStoreOptions {
    fn default() -> Self {
        PgStoreOptions {
            pool_size: 16,
            lock_timeout: Duration::from_secs(5),
            tls_ca: None,
        }
    }
}

impl PgStoreOptions {
    /// The options with `pool_size` connections at most.
    pub fn pool_size(mut self, pool_size: usize) -> Self {
        self.pool_size = pool_size;
        self
    }

    /// The options with TLS checked against the CA in `ca` (PEM), for a URL with
    /// `sslmode=require`.
    pub fn tls_ca(mut self, ca: impl Into<std::path::PathBuf>) -> Self {
        self.tls_ca = Some(ca.into());
        self
    }

    /// The options with this `lock_timeout`.
    pub fn lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.lock_timeout = lock_timeout;
        self
    }
}

/// A barrier store in PostgreSQL: see the module docs.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// `host:port/db` of the server, for messages (never the password).
    place: String,
    /// The store's identity (`treaty_barrier_meta.store_id`).
    store_id: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("place", &self.inner.place)
            .field("store_id", &self.inner.store_id)
            .finish()
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS treaty_barrier (
    gid text COLLATE "C" NOT NULL,
    branch_id bigint NOT NULL,
    op smallint NOT NULL,
    answer smallint NOT NULL,
    unix_ms bigint NOT NULL,
    seq bigint NOT NULL,
    fingerprint bytea,
    log_id text NOT NULL,
    handler text NOT NULL,
    message text NOT NULL,
    outcome_endpoint text NOT NULL,
    PRIMARY KEY (gid, branch_id, op)
);
CREATE TABLE IF NOT EXISTS treaty_barrier_open (
    gid text COLLATE "C" NOT NULL,
    branch_id bigint NOT NULL,
    handler text NOT NULL,
    payload bytea NOT NULL,
    fingerprint bytea,
    log_id text NOT NULL,
    outcome_endpoint text NOT NULL,
    prepared_unix_ms bigint NOT NULL,
    xact text NOT NULL,
    PRIMARY KEY (gid, branch_id)
);
CREATE TABLE IF NOT EXISTS treaty_barrier_xact (
    xact text PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS treaty_barrier_swept (
    gid text COLLATE "C" PRIMARY KEY,
    log_id text NOT NULL,
    swept_unix_ms bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS treaty_barrier_swept_by_time
    ON treaty_barrier_swept (swept_unix_ms, gid);
CREATE TABLE IF NOT EXISTS treaty_barrier_meta (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    store_id text NOT NULL,
    seq bigint NOT NULL
);
"#;

const ROW_COLUMNS: &str = "gid, branch_id, op, answer, unix_ms, seq, fingerprint, log_id, \
                           handler, message, outcome_endpoint";

/// What went wrong talking to PostgreSQL: what was being done, and the server's words.
fn pg_error(what: impl Into<String>, e: tokio_postgres::Error) -> StoreError {
    let what = what.into();
    match e.as_db_error() {
        Some(db) => StoreError::new(what, format!("{}: {}", db.code().code(), db.message())),
        None => StoreError::new(what, chain(&e)),
    }
}

/// The 32-bit advisory-lock key of a gid.
fn gid_lock_key(gid: &str) -> i32 {
    let digest = Sha256::digest(gid.as_bytes());
    i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// The 32-bit advisory-lock key of a branch (class [`BRANCH_LOCK_CLASS`]).
fn branch_lock_key(gid: &str, branch_id: u32) -> i32 {
    let digest = Sha256::new()
        .chain_update(gid.as_bytes())
        .chain_update([0])
        .chain_update(branch_id.to_be_bytes())
        .finalize();
    i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

fn u64_of(v: i64, what: &str) -> Result<u64, String> {
    u64::try_from(v).map_err(|_| format!("{what} is negative: {v}"))
}

fn fingerprint_of(v: Option<Vec<u8>>) -> Result<Option<Fingerprint>, String> {
    v.map(|b| {
        <[u8; FINGERPRINT_BYTES]>::try_from(b.as_slice())
            .map(Fingerprint)
            .map_err(|_| format!("fingerprint of {} bytes", b.len()))
    })
    .transpose()
}

/// A `treaty_barrier` row (selected with [`ROW_COLUMNS`]), checked.
fn decode_row(row: &Row) -> Result<BarrierRow, String> {
    let gid: String = row.get(0);
    let context = |why: String| format!("barrier row of {gid:?}: {why}");
    let branch_id: i64 = row.get(1);
    let branch_id = u32::try_from(branch_id)
        .map_err(|_| context(format!("branch_id {branch_id} out of range")))?;
    let op_byte: i16 = row.get(2);
    let op = u8::try_from(op_byte)
        .ok()
        .and_then(Op::from_key_byte)
        .ok_or_else(|| context(format!("unknown op {op_byte}")))?;
    let code: i16 = row.get(3);
    let answer = u8::try_from(code)
        .ok()
        .and_then(Answer::from_code)
        .filter(|a| op.allows(*a))
        .ok_or_else(|| context(format!("answer {code} cannot be recorded for {op}")))?;
    let unix_ms = u64_of(row.get(4), "unix_ms").map_err(context)?;
    let seq = u64_of(row.get(5), "seq").map_err(context)?;
    let fingerprint = fingerprint_of(row.get(6)).map_err(context)?;
    Ok(BarrierRow::new(
        gid.clone(),
        branch_id,
        op,
        answer,
        unix_ms,
        seq,
        fingerprint,
        row.get(7),
        row.get(8),
        row.get(9),
    )
    .with_outcome_endpoint(row.get(10)))
}

fn decode_rows(rows: &[Row], what: &str) -> Result<Vec<BarrierRow>, StoreError> {
    rows.iter()
        .map(|r| decode_row(r).map_err(|why| StoreError::new(what.to_string(), why)))
        .collect()
}

/// The operations of the branch `op` belongs to.
fn ops_of(op: Op) -> &'static [Op] {
    match op {
        Op::Prepare | Op::Commit | Op::Abort => &[Op::Prepare, Op::Commit, Op::Abort],
        Op::Execute | Op::Compensate => &[Op::Execute, Op::Compensate],
    }
}

fn recorded(row: &BarrierRow) -> rules::Recorded {
    rules::Recorded {
        op: row.op,
        answer: row.answer,
        fingerprint: row.fingerprint,
        log_id: row.log_id.clone(),
        message: row.message.clone(),
    }
}

/// Takes the gid's advisory lock for the rest of `tx`.
async fn lock_gid(tx: &Transaction<'_>, gid: &str) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&LOCK_CLASS, &gid_lock_key(gid)],
    )
    .await
    .map(|_| ())
}

/// The rows of the branch of `ctx` that `op` belongs to.
async fn branch_rows(
    tx: &impl GenericClient,
    ctx: &BranchContext,
    op: Op,
) -> Result<Vec<BarrierRow>, StoreError> {
    let ops: Vec<i16> = ops_of(op).iter().map(|o| o.key_byte() as i16).collect();
    let rows = tx
        .query(
            &format!(
                "SELECT {ROW_COLUMNS} FROM treaty_barrier \
                 WHERE gid = $1 AND branch_id = $2 AND op = ANY($3) ORDER BY op"
            ),
            &[&ctx.gid, &i64::from(ctx.branch_id), &ops],
        )
        .await
        .map_err(|e| pg_error("reading the branch's barrier rows", e))?;
    decode_rows(&rows, "reading the branch's barrier rows")
}

/// The plan for a delivery: from the gid's marker if it was swept, else from the branch's
/// rows. The caller holds the gid's lock.
async fn plan_for(
    tx: &Transaction<'_>,
    ctx: &BranchContext,
    op: Op,
    delivery: &Delivery,
) -> Result<rules::Plan, StoreError> {
    let marker = tx
        .query_opt(
            "SELECT log_id FROM treaty_barrier_swept WHERE gid = $1",
            &[&ctx.gid],
        )
        .await
        .map_err(|e| pg_error("reading the swept marker", e))?;
    if let Some(m) = marker {
        return Ok(rules::plan_swept(m.get(0), delivery));
    }
    let rows = branch_rows(tx, ctx, op).await?;
    Ok(rules::plan(
        &rows.iter().map(recorded).collect::<Vec<_>>(),
        delivery,
    ))
}

/// Writes `writes` (numbered from the store's counter, taken last: see the module docs).
async fn write_rows(
    tx: &Transaction<'_>,
    ctx: &BranchContext,
    writes: &[rules::Write],
) -> Result<(), StoreError> {
    if writes.is_empty() {
        return Ok(());
    }
    let what = |e| pg_error("writing barrier rows", e);
    let last: i64 = tx
        .query_one(
            "UPDATE treaty_barrier_meta SET seq = seq + $1 RETURNING seq",
            &[&(writes.len() as i64)],
        )
        .await
        .map_err(what)?
        .get(0);
    let now = now_unix_ms() as i64;
    let first = last - writes.len() as i64 + 1;
    for (i, w) in writes.iter().enumerate() {
        tx.execute(
            "INSERT INTO treaty_barrier (gid, branch_id, op, answer, unix_ms, seq, fingerprint, \
             log_id, handler, message, outcome_endpoint) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &ctx.gid,
                &i64::from(ctx.branch_id),
                &(w.op.key_byte() as i16),
                &(w.answer.code() as i16),
                &now,
                &(first + i as i64),
                &w.fingerprint.map(|f| f.0.to_vec()),
                &ctx.log_id,
                &ctx.handler,
                &w.message,
                &ctx.outcome_endpoint,
            ],
        )
        .await
        .map_err(what)?;
    }
    Ok(())
}

/// Opens or closes the branch in the index of open prepared branches.
async fn change_index(
    tx: &Transaction<'_>,
    ctx: &BranchContext,
    payload: &[u8],
    change: IndexChange,
    xact: &str,
) -> Result<(), StoreError> {
    let what = |e| pg_error("updating the index of open prepared branches", e);
    match change {
        IndexChange::Unchanged => Ok(()),
        IndexChange::Open => tx
            .execute(
                "INSERT INTO treaty_barrier_open (gid, branch_id, handler, payload, fingerprint, \
                 log_id, outcome_endpoint, prepared_unix_ms, xact) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (gid, branch_id) DO UPDATE SET handler = $3, payload = $4, \
                 fingerprint = $5, log_id = $6, outcome_endpoint = $7, prepared_unix_ms = $8, \
                 xact = $9",
                &[
                    &ctx.gid,
                    &i64::from(ctx.branch_id),
                    &ctx.handler,
                    &payload,
                    &Fingerprint::of(&ctx.handler, payload).0.to_vec(),
                    &ctx.log_id,
                    &ctx.outcome_endpoint,
                    &(now_unix_ms() as i64),
                    &xact,
                ],
            )
            .await
            .map(|_| ())
            .map_err(what),
        IndexChange::Close => tx
            .execute(
                "DELETE FROM treaty_barrier_open WHERE gid = $1 AND branch_id = $2",
                &[&ctx.gid, &i64::from(ctx.branch_id)],
            )
            .await
            .map(|_| ())
            .map_err(what),
    }
}

/// How the business code of a delivery ended, when it did not succeed.
enum Stopped {
    /// A business refusal: settled in a new transaction.
    Refused(String),
    /// RETRY with this message (handler retry, panic, storage error).
    Retry(String),
}

impl From<StoreError> for Stopped {
    fn from(e: StoreError) -> Self {
        Stopped::Retry(e.to_string())
    }
}

/// Runs the handler on `tx`; gives the transaction back when it succeeded (else it is
/// rolled back by the caller dropping it).
async fn run_handler<'t>(
    call: &HandlerCall<PgStore>,
    ctx: &BranchContext,
    tx: Transaction<'t>,
    payload: &[u8],
) -> Result<Transaction<'t>, (Transaction<'t>, Stopped)> {
    let op = call.op();
    let mut txn = Txn::<PgStore>::new(tx);
    let ran = AssertUnwindSafe(call.run(ctx, &mut txn, payload))
        .catch_unwind()
        .await;
    let tx = txn.into_inner();
    match ran {
        Ok(Ok(())) => Ok(tx),
        Ok(Err(HandlerError::Refuse(reason))) => Err((tx, Stopped::Refused(reason))),
        Ok(Err(e)) => Err((tx, Stopped::Retry(format!("{op} handler: {e}")))),
        Err(panic) => {
            let msg = panic_message(&*panic);
            tracing::error!(gid = %ctx.gid, branch_id = ctx.branch_id, handler = %ctx.handler, "{op} handler panicked: {msg}; its writes were rolled back, answering RETRY");
            Err((tx, Stopped::Retry(format!("{op} handler panicked: {msg}"))))
        }
    }
}

/// A TLS connector that trusts only the CA certificates in the PEM file `ca`.
fn tls_checked_by(
    ca: Option<&std::path::Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls_pki_types::pem::PemObject;
    let Some(ca) = ca else {
        return Err(
            "sslmode=require needs the CA of the database server's certificate \
                    (PgStoreOptions::tls_ca)"
                .into(),
        );
    };
    let pem = std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", ca.display()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl PgStore {
    /// Connects to PostgreSQL at `url` (`postgres://user:password@host:port/db`) with
    /// [`PgStoreOptions::default`], and creates the barrier tables if missing.
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        PgStore::connect_with(url, PgStoreOptions::default()).await
    }

    /// Connects with `options` (see [`PgStore::connect`]).
    pub async fn connect_with(url: &str, options: PgStoreOptions) -> Result<PgStore, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError::new("parsing the PostgreSQL URL", chain(&e)))?;
        let place = place_of(&config);
        let timeout = format!("-c lock_timeout={}", options.lock_timeout.as_millis());
        let opts = match config.get_options() {
            Some(o) if !o.is_empty() => format!("{o} {timeout}"),
            _ => timeout,
        };
        config.options(&opts);
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            let tls = tls_checked_by(options.tls_ca.as_deref())
                .map_err(|e| StoreError::new(format!("setting up TLS to {place}"), e))?;
            Manager::from_config(config, tls, manager_config)
        } else {
            Manager::from_config(config, NoTls, manager_config)
        };
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .build()
            .map_err(|e| StoreError::new(format!("building the pool for {place}"), e))?;
        let mut conn = pool.get().await.map_err(|e| {
            StoreError::new(
                format!("connecting to PostgreSQL at {place}"),
                chain(&e).to_string(),
            )
        })?;
        check_prepared_transactions(&conn, &place).await?;
        let store_id = create_schema(&mut conn, &place).await?;
        drop(conn);
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                place,
                store_id,
            }),
        })
    }

    /// The store's connection pool: for the application's own reads outside deliveries
    /// (writes that must be atomic with a barrier row belong in a handler).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The store's identity: a UUID made when its tables were created.
    pub fn store_id(&self) -> &str {
        &self.inner.store_id
    }

    /// The names of this store's prepared transactions now in `pg_prepared_xacts` (those
    /// starting `treaty-<store id>-`): the branches prepared and not yet committed or rolled
    /// back. For operators and tests (none should be left once every transaction ended).
    pub async fn prepared_transactions(&self) -> Result<Vec<String>, StoreError> {
        self.inner.prepared_transactions().await
    }
}

/// `host:port/db`, for messages.
fn place_of(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        config.get_dbname().unwrap_or("(default database)")
    )
}

/// Refuses a server that cannot prepare transactions (`max_prepared_transactions = 0`, its
/// default): every 2PC branch here is a PostgreSQL prepared transaction.
async fn check_prepared_transactions(conn: &Object, place: &str) -> Result<(), StoreError> {
    let value: String = conn
        .query_one("SHOW max_prepared_transactions", &[])
        .await
        .map_err(|e| pg_error(format!("reading max_prepared_transactions of {place}"), e))?
        .get(0);
    match value.trim().parse::<i64>() {
        Ok(n) if n > 0 => Ok(()),
        _ => Err(StoreError::new(
            format!("opening the barrier store in {place}"),
            format!(
                "PostgreSQL has max_prepared_transactions = {value}, so it cannot prepare \
                 transactions, and every 2PC branch of a PostgreSQL participant is a prepared \
                 transaction (PREPARE TRANSACTION). Set it above 0, to at least the number of \
                 branches that may be prepared at once (max_connections is a safe choice): \
                 `max_prepared_transactions = 100` in postgresql.conf, or \
                 `ALTER SYSTEM SET max_prepared_transactions = 100;` as a superuser, then \
                 restart PostgreSQL"
            ),
        )),
    }
}

/// Creates the tables if missing and returns the store's identity.
async fn create_schema(conn: &mut Object, place: &str) -> Result<String, StoreError> {
    let what = |e| pg_error(format!("creating the barrier tables in {place}"), e);
    let client: &mut Client = conn;
    let tx = client.transaction().await.map_err(what)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[&LOCK_CLASS, &SCHEMA_LOCK],
    )
    .await
    .map_err(what)?;
    tx.batch_execute(SCHEMA).await.map_err(what)?;
    tx.execute(
        "INSERT INTO treaty_barrier_meta (store_id, seq) VALUES ($1, 0) ON CONFLICT DO NOTHING",
        &[&uuid::Uuid::new_v4().to_string()],
    )
    .await
    .map_err(what)?;
    let id: String = tx
        .query_one("SELECT store_id FROM treaty_barrier_meta", &[])
        .await
        .map_err(what)?
        .get(0);
    tx.commit().await.map_err(what)?;
    Ok(id)
}

/// A pooled connection holding a 2PC delivery's session locks ([`Inner::lock_branch`]).
/// Dropped before [`BranchLocked::unlock`] (the delivery's future was cancelled while it
/// waited for a lock, which the server may still grant), its statement is cancelled and the
/// connection taken out of the pool and closed, which releases whatever the session holds:
/// a connection holding a lock never goes back to the pool.
struct BranchLocked {
    conn: Option<Object>,
}

impl BranchLocked {
    /// Releases every advisory lock of the session and returns the connection to the pool
    /// (or closes it, when the release fails).
    async fn unlock(mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Session locks survive a failed statement: release whatever this session holds.
        if conn
            .execute("SELECT pg_advisory_unlock_all()", &[])
            .await
            .is_err()
        {
            drop(Object::take(conn));
        }
    }
}

impl Drop for BranchLocked {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // The connection only closes once its statement in flight ends: cancel that
        // statement (a lock wait, until `lock_timeout` otherwise) through the server.
        let cancel = conn.cancel_token();
        drop(Object::take(conn));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = cancel.cancel_query(NoTls).await;
            });
        }
    }
}

impl Inner {
    async fn conn(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| {
            StoreError::new(
                format!("getting a connection to {}", self.place),
                chain(&e).to_string(),
            )
        })
    }

    /// One delivery, all of it (see [`BarrierStore::deliver`]).
    async fn deliver(
        &self,
        op: Op,
        ctx: &BranchContext,
        payload: &[u8],
        handler: Option<&HandlerCall<PgStore>>,
        mut locked: BranchLocked,
    ) -> Verdict {
        let delivery = Delivery::new(op, &ctx.handler, payload, &ctx.log_id, handler.is_some());
        if matches!(op, Op::Prepare | Op::Commit | Op::Abort) {
            return self
                .deliver_two_phase(locked, op, ctx, payload, handler, &delivery)
                .await;
        }
        let verdict = self
            .deliver_saga(&mut locked, op, ctx, payload, handler, &delivery)
            .await;
        locked.unlock().await;
        verdict
    }

    /// A saga delivery under the gid's lock [`Inner::lock_branch`] took.
    async fn deliver_saga(
        &self,
        locked: &mut BranchLocked,
        op: Op,
        ctx: &BranchContext,
        payload: &[u8],
        handler: Option<&HandlerCall<PgStore>>,
        delivery: &Delivery,
    ) -> Verdict {
        let client: &mut Client = locked.conn.as_mut().expect("held until unlocked");
        match self
            .deliver_in_one(client, op, ctx, payload, handler, delivery)
            .await
        {
            Ok(reply) => verdict(op, ctx, reply),
            Err(Stopped::Refused(reason)) => {
                match self
                    .after_refusal(client, op, ctx, payload, delivery, &reason)
                    .await
                {
                    Ok(reply) => {
                        if let rules::Reply::Retry(_) = &reply {
                            tracing::warn!(gid = %ctx.gid, branch_id = ctx.branch_id, handler = %ctx.handler, reason = %reason, "{op} handler refused; {op} must eventually succeed, answering RETRY");
                        }
                        verdict(op, ctx, reply)
                    }
                    Err(e) => retry(op, ctx, format!("recording the {op} refusal: {e}")),
                }
            }
            Err(Stopped::Retry(msg)) => retry(op, ctx, msg),
        }
    }

    /// A saga delivery in one transaction: lock, plan, business code, rows, commit.
    async fn deliver_in_one(
        &self,
        client: &mut Client,
        op: Op,
        ctx: &BranchContext,
        payload: &[u8],
        handler: Option<&HandlerCall<PgStore>>,
        delivery: &Delivery,
    ) -> Result<rules::Reply, Stopped> {
        let what = |e| Stopped::from(pg_error(format!("delivering {op}"), e));
        let tx = client.transaction().await.map_err(what)?;
        lock_gid(&tx, &ctx.gid).await.map_err(what)?;
        let plan = plan_for(&tx, ctx, op, delivery).await?;
        crate::metrics::barrier_decided(plan.rule);
        let tx = match plan.business {
            Business::Run { .. } => {
                let call = handler.expect("the rules run business code only if registered");
                match run_handler(call, ctx, tx, payload).await {
                    Ok(tx) => tx,
                    Err((tx, stopped)) => {
                        // A failed rollback leaves nothing either: the connection goes.
                        let _ = tx.rollback().await;
                        return Err(stopped);
                    }
                }
            }
            Business::Skip => tx,
        };
        let settled = plan.settle(None);
        write_rows(&tx, ctx, &settled.writes).await?;
        change_index(&tx, ctx, payload, settled.in_doubt, "").await?;
        tx.commit().await.map_err(what)?;
        Ok(settled.reply)
    }

    /// After a business refusal (its transaction rolled back with its changes): plans again
    /// in a new transaction, which sees any row written meanwhile, and records the refusal
    /// as the plan says.
    async fn after_refusal(
        &self,
        client: &mut Client,
        op: Op,
        ctx: &BranchContext,
        payload: &[u8],
        delivery: &Delivery,
        reason: &str,
    ) -> Result<rules::Reply, StoreError> {
        let what = |e| pg_error(format!("recording the {op} refusal"), e);
        let tx = client.transaction().await.map_err(what)?;
        lock_gid(&tx, &ctx.gid).await.map_err(what)?;
        let plan = plan_for(&tx, ctx, op, delivery).await?;
        // Still a plan that runs the business code: settle it with the refusal. Otherwise
        // another delivery decided meanwhile: follow its plan, without business code.
        let refusal = matches!(plan.business, Business::Run { .. }).then_some(reason);
        let settled = plan.settle(refusal);
        write_rows(&tx, ctx, &settled.writes).await?;
        change_index(&tx, ctx, payload, settled.in_doubt, "").await?;
        tx.commit().await.map_err(what)?;
        Ok(settled.reply)
    }

    async fn rows(&self, gid: &str) -> Result<Vec<BarrierRow>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {ROW_COLUMNS} FROM treaty_barrier WHERE gid = $1 \
                     ORDER BY branch_id, op"
                ),
                &[&gid],
            )
            .await
            .map_err(|e| pg_error(format!("reading the barrier rows of {gid}"), e))?;
        decode_rows(&rows, "reading barrier rows")
    }

    async fn all_rows(&self) -> Result<Vec<BarrierRow>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                &format!("SELECT {ROW_COLUMNS} FROM treaty_barrier ORDER BY gid, branch_id, op"),
                &[],
            )
            .await
            .map_err(|e| pg_error("reading every barrier row", e))?;
        decode_rows(&rows, "reading barrier rows")
    }

    async fn in_doubt(&self, before: Option<u64>) -> Result<Vec<InDoubt>, StoreError> {
        let conn = self.conn().await?;
        let cutoff = before.map(|b| i64::try_from(b).unwrap_or(i64::MAX));
        let rows = conn
            .query(
                "SELECT gid, branch_id, handler, payload, log_id, outcome_endpoint, \
                 prepared_unix_ms FROM treaty_barrier_open o \
                 WHERE ($1::bigint IS NULL OR prepared_unix_ms <= $1) \
                 AND (EXISTS (SELECT 1 FROM pg_prepared_xacts p WHERE p.gid = o.xact \
                              AND p.database = current_database()) \
                      OR EXISTS (SELECT 1 FROM treaty_barrier_xact x WHERE x.xact = o.xact)) \
                 ORDER BY gid, branch_id",
                &[&cutoff],
            )
            .await
            .map_err(|e| pg_error("reading the open prepared branches", e))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let gid: String = r.get(0);
            let branch_id: i64 = r.get(1);
            let (Ok(branch_id), Ok(at)) =
                (u32::try_from(branch_id), u64::try_from(r.get::<_, i64>(6)))
            else {
                tracing::error!(gid = %gid, branch_id, "corrupt entry in treaty_barrier_open, skipped");
                continue;
            };
            out.push(InDoubt::new(
                gid,
                branch_id,
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                at,
            ));
        }
        Ok(out)
    }

    async fn sweep_page(
        &self,
        after: Option<String>,
        rows_max: usize,
    ) -> Result<SweepPage, StoreError> {
        let what = |e| pg_error("reading a page of barrier rows to sweep", e);
        let conn = self.conn().await?;
        let limit = rows_max.max(1) as i64;
        // The gid of the page's `rows_max`-th row (or its last): the page ends with it.
        let last = conn
            .query(
                "SELECT gid FROM treaty_barrier WHERE $1::text IS NULL OR gid > $1 \
                 ORDER BY gid, branch_id, op LIMIT $2",
                &[&after, &limit],
            )
            .await
            .map_err(what)?;
        let Some(last) = last.last().map(|r| r.get::<_, String>(0)) else {
            return Ok(SweepPage::new(Vec::new(), None));
        };
        let rows = conn
            .query(
                &format!(
                    "SELECT {ROW_COLUMNS} FROM treaty_barrier \
                     WHERE ($1::text IS NULL OR gid > $1) AND gid <= $2 \
                     ORDER BY gid, branch_id, op"
                ),
                &[&after, &last],
            )
            .await
            .map_err(what)?;
        let rows = decode_rows(&rows, "reading a page of barrier rows to sweep")?;
        let more: bool = conn
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM treaty_barrier WHERE gid > $1)",
                &[&last],
            )
            .await
            .map_err(what)?
            .get(0);
        Ok(SweepPage::new(rows, more.then_some(last)))
    }

    async fn sweep_gid(&self, expected: &[BarrierRow], marker: &Swept) -> Result<bool, StoreError> {
        let gid = marker.gid.as_str();
        let what = |e| pg_error(format!("sweeping the barrier rows of {gid}"), e);
        if gid.is_empty() || expected.iter().any(|r| r.gid != gid) {
            return Ok(false);
        }
        let mut conn = self.conn().await?;
        let client: &mut Client = &mut conn;
        let tx = client.transaction().await.map_err(what)?;
        // Under the gid's lock no delivery of it is between its plan and its commit: the
        // check, the deletion and the marker are one atomic step.
        lock_gid(&tx, gid).await.map_err(what)?;
        let now = tx
            .query(
                "SELECT branch_id, op, seq FROM treaty_barrier WHERE gid = $1",
                &[&gid],
            )
            .await
            .map_err(what)?;
        let same = now.len() == expected.len()
            && now.iter().all(|n| {
                let (b, o, s): (i64, i16, i64) = (n.get(0), n.get(1), n.get(2));
                expected.iter().any(|e| {
                    (i64::from(e.branch_id), e.op.key_byte() as i16, e.seq as i64) == (b, o, s)
                })
            });
        // A branch still open here (prepared, undecided) is never swept.
        let open: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM treaty_barrier_open WHERE gid = $1)",
                &[&gid],
            )
            .await
            .map_err(what)?
            .get(0);
        if !same || open {
            return Ok(false);
        }
        tx.execute("DELETE FROM treaty_barrier WHERE gid = $1", &[&gid])
            .await
            .map_err(what)?;
        tx.execute(
            "INSERT INTO treaty_barrier_swept (gid, log_id, swept_unix_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (gid) DO UPDATE SET log_id = $2, swept_unix_ms = $3",
            &[&gid, &marker.log_id, &(marker.swept_unix_ms as i64)],
        )
        .await
        .map_err(what)?;
        tx.commit().await.map_err(what)?;
        Ok(true)
    }

    async fn expire_swept(&self, before: u64, max: usize) -> Result<usize, StoreError> {
        let conn = self.conn().await?;
        let before = i64::try_from(before).unwrap_or(i64::MAX);
        let n = conn
            .execute(
                "DELETE FROM treaty_barrier_swept WHERE gid IN (SELECT gid FROM \
                 treaty_barrier_swept WHERE swept_unix_ms < $1 ORDER BY swept_unix_ms, gid \
                 LIMIT $2) AND swept_unix_ms < $1",
                &[&before, &(max as i64)],
            )
            .await
            .map_err(|e| pg_error("expiring swept markers", e))?;
        Ok(n as usize)
    }

    async fn swept(&self, gid: &str) -> Result<Option<Swept>, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT log_id, swept_unix_ms FROM treaty_barrier_swept WHERE gid = $1",
                &[&gid],
            )
            .await
            .map_err(|e| pg_error(format!("reading the swept marker of {gid}"), e))?;
        Ok(row.map(|r| {
            Swept::new(
                gid.to_string(),
                r.get(0),
                u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
            )
        }))
    }
}

/// Where a branch's PostgreSQL prepared transaction stands (read under the gid's lock).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    /// No prepared transaction is open for the branch.
    None,
    /// The prepared transaction of this name is in `pg_prepared_xacts`: prepared, undecided.
    Prepared(String),
    /// It was committed (`COMMIT PREPARED`: its proof row is visible), and the commit's own
    /// transaction (commit handler, `COMMIT` row) has not run yet.
    Committed(String),
}

impl Inner {
    /// The name of the branch's PostgreSQL prepared transaction: the store's prefix, then
    /// SHA-256 of (log identity, gid, branch), each length-prefixed: deterministic, 108 bytes
    /// (PostgreSQL allows under 200), of `[a-z0-9-]` only, so it can be quoted as is.
    fn xact_name(&self, ctx: &BranchContext) -> String {
        let mut h = Sha256::new();
        for part in [ctx.log_id.as_bytes(), ctx.gid.as_bytes()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.update(ctx.branch_id.to_be_bytes());
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        format!("{}{hex}", self.xact_prefix())
    }

    /// The prefix of every prepared transaction this store names: `treaty-<store id>-`.
    fn xact_prefix(&self) -> String {
        format!("treaty-{}-", self.store_id)
    }

    /// Takes a connection and the locks a delivery runs under, at session level (held across
    /// the several transactions of a prepare, a commit or an abort, and released before the
    /// answer). A saga delivery: its gid's lock exclusive. A 2PC delivery: its gid's lock
    /// shared (a sweep of the gid takes it exclusive) and its branch's lock exclusive
    /// (duplicates of the delivery run one after the other).
    ///
    /// Why not the gid's lock exclusive, as saga deliveries take it: a commit's handler may
    /// wait (up to `lock_timeout`) for a row that another transaction's prepared branch
    /// holds, and that transaction's decision may wait for a row that this gid's *other*
    /// branch, prepared in the same database, holds until its own commit. With one lock per
    /// gid that commit queued behind the first one (and behind its redeliveries), timed out
    /// on the lock, and came back at the end of the queue: a livelock that the PostgreSQL
    /// chaos campaign saw as transactions stuck in Committing or Aborting for good.
    ///
    /// Called where the caller going away cancels it (see [`PgStore::deliver`]): a
    /// redelivery waiting here for the first delivery is dropped when the coordinator's call
    /// times out, and its connection closed (which ends the wait in the server), instead of
    /// holding a pooled connection for as long as the first one runs. Under load such
    /// waiters filled the pool and starved the deliveries that would have released the rows
    /// everyone waited for.
    async fn lock_branch(&self, op: Op, ctx: &BranchContext) -> Result<BranchLocked, Verdict> {
        let conn = match self.conn().await {
            Ok(c) => c,
            Err(e) => return Err(retry(op, ctx, e.to_string())),
        };
        let locked = BranchLocked { conn: Some(conn) };
        let (gid_key, branch_key) = (
            gid_lock_key(&ctx.gid),
            branch_lock_key(&ctx.gid, ctx.branch_id),
        );
        let c = locked.conn.as_ref().expect("just set");
        let two_phase = matches!(op, Op::Prepare | Op::Commit | Op::Abort);
        let taken = async {
            if !two_phase {
                // A saga delivery: the gid's lock exclusive (its transaction takes it
                // again, which the session already holds).
                return c
                    .execute("SELECT pg_advisory_lock($1, $2)", &[&LOCK_CLASS, &gid_key])
                    .await;
            }
            c.execute(
                "SELECT pg_advisory_lock_shared($1, $2)",
                &[&LOCK_CLASS, &gid_key],
            )
            .await?;
            c.execute(
                "SELECT pg_advisory_lock($1, $2)",
                &[&BRANCH_LOCK_CLASS, &branch_key],
            )
            .await
        }
        .await;
        match taken {
            Ok(_) => Ok(locked),
            Err(e) => {
                locked.unlock().await;
                Err(retry(op, ctx, pg_error("locking the gid", e).to_string()))
            }
        }
    }

    /// A 2PC delivery under the locks [`Inner::lock_branch`] took, see
    /// [`Inner::two_phase_locked`]; the locks are released before the answer.
    async fn deliver_two_phase(
        &self,
        mut locked: BranchLocked,
        op: Op,
        ctx: &BranchContext,
        payload: &[u8],
        handler: Option<&HandlerCall<PgStore>>,
        delivery: &Delivery,
    ) -> Verdict {
        let conn = locked.conn.as_mut().expect("held until unlocked");
        let verdict = self
            .two_phase_locked(conn, op, ctx, payload, handler, delivery)
            .await;
        locked.unlock().await;
        verdict
    }

    /// Reads where the branch's prepared transaction stands; a stale entry of the index
    /// (written before a `PREPARE TRANSACTION` that never happened, or left by an abort that
    /// rolled back and stopped before its rows) is removed with its `PREPARED` row: nothing
    /// of that prepare is applied anywhere.
    async fn held(&self, client: &mut Client, ctx: &BranchContext) -> Result<Held, StoreError> {
        let what = |e| pg_error("reading the branch's prepared transaction", e);
        let open = client
            .query_opt(
                "SELECT xact FROM treaty_barrier_open WHERE gid = $1 AND branch_id = $2",
                &[&ctx.gid, &i64::from(ctx.branch_id)],
            )
            .await
            .map_err(what)?;
        let Some(open) = open else {
            return Ok(Held::None);
        };
        let xact: String = open.get(0);
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 \
                 AND database = current_database()), \
                 EXISTS (SELECT 1 FROM treaty_barrier_xact WHERE xact = $1)",
                &[&xact],
            )
            .await
            .map_err(what)?;
        let (prepared, committed): (bool, bool) = (row.get(0), row.get(1));
        if prepared {
            return Ok(Held::Prepared(xact));
        }
        if committed {
            return Ok(Held::Committed(xact));
        }
        tracing::info!(gid = %ctx.gid, branch_id = ctx.branch_id, xact = %xact, "removing a stale entry of the open branches: its prepared transaction does not exist");
        self.forget_prepare(client, ctx).await?;
        Ok(Held::None)
    }

    /// Deletes the branch's `PREPARED` row and its index entry, then writes `writes`, in one
    /// transaction.
    async fn forget_prepare_then(
        &self,
        client: &mut Client,
        ctx: &BranchContext,
        writes: &[rules::Write],
    ) -> Result<(), StoreError> {
        let what = |e| pg_error("removing a prepare that did not happen", e);
        let tx = client.transaction().await.map_err(what)?;
        tx.execute(
            "DELETE FROM treaty_barrier WHERE gid = $1 AND branch_id = $2 AND op = $3",
            &[
                &ctx.gid,
                &i64::from(ctx.branch_id),
                &(Op::Prepare.key_byte() as i16),
            ],
        )
        .await
        .map_err(what)?;
        change_index(&tx, ctx, &[], IndexChange::Close, "").await?;
        write_rows(&tx, ctx, writes).await?;
        tx.commit().await.map_err(what)
    }

    async fn forget_prepare(
        &self,
        client: &mut Client,
        ctx: &BranchContext,
    ) -> Result<(), StoreError> {
        self.forget_prepare_then(client, ctx, &[]).await
    }

    /// A 2PC delivery, the gid locked. The barrier rules decide as for every store; what
    /// differs is how a plan that runs business code is carried out:
    ///
    /// - **Prepare**: (1) the `PREPARED` row and the index entry (with the prepared
    ///   transaction's name) commit first; (2) the handler runs in a new transaction, which
    ///   also inserts a proof row (`treaty_barrier_xact`), and is ended by `PREPARE
    ///   TRANSACTION '<name>'`, durable when it returns; (3) PREPARED is answered. A refusal,
    ///   a retry, a panic or a failed `PREPARE` roll the transaction back and remove what (1)
    ///   wrote (a refusal records `REFUSED` in the same step). A crash between (1) and (2)
    ///   leaves an entry whose transaction does not exist: [`Inner::held`] removes it at the
    ///   next delivery, and the resolver never lists it.
    /// - **Commit**: `COMMIT PREPARED '<name>'` (unless already done: the proof row is
    ///   visible), then the commit handler, the `COMMIT` row, the index entry and the proof
    ///   row removed, in one transaction. A crash between the two leaves the proof: the next
    ///   commit (a redelivery, or the in-doubt resolver) runs only the second step.
    /// - **Abort**: `ROLLBACK PREPARED '<name>'`, which undoes the prepare's business change;
    ///   then the `ABORT` row and the index entry removed. The abort handler is **not**
    ///   called for a prepared branch: the database already undid what the prepare did. An
    ///   abort after a `COMMIT PREPARED` (proof visible) is a violation.
    ///
    /// Duplicates, an abort before its prepare (null abort, the late prepare refused), a
    /// commit without a prepare, a reused gid: the rules, from the rows, as on sled. A commit
    /// or abort whose rows are already written (after a restart too) is a repeat answered
    /// from them: `COMMIT/ROLLBACK PREPARED` of a name that no longer exists is never sent,
    /// since the name is looked up, under the lock, in `pg_prepared_xacts` first.
    async fn two_phase_locked(
        &self,
        client: &mut Client,
        op: Op,
        ctx: &BranchContext,
        payload: &[u8],
        handler: Option<&HandlerCall<PgStore>>,
        delivery: &Delivery,
    ) -> Verdict {
        match self
            .two_phase_steps(client, op, ctx, payload, handler, delivery)
            .await
        {
            Ok(reply) => verdict(op, ctx, reply),
            Err(e) => retry(op, ctx, e),
        }
    }

    async fn two_phase_steps(
        &self,
        client: &mut Client,
        op: Op,
        ctx: &BranchContext,
        payload: &[u8],
        handler: Option<&HandlerCall<PgStore>>,
        delivery: &Delivery,
    ) -> Result<rules::Reply, String> {
        let what = |e| pg_error(format!("delivering {op}"), e).to_string();
        let marker = client
            .query_opt(
                "SELECT log_id FROM treaty_barrier_swept WHERE gid = $1",
                &[&ctx.gid],
            )
            .await
            .map_err(what)?;
        if let Some(m) = marker {
            // A swept gid has nothing open here (the sweep checks): nothing to do but answer.
            let plan = rules::plan_swept(m.get(0), delivery);
            crate::metrics::barrier_decided(plan.rule);
            return Ok(plan.settle(None).reply);
        }
        let held = self.held(client, ctx).await.map_err(|e| e.to_string())?;
        let rows = branch_rows(&*client, ctx, op)
            .await
            .map_err(|e| e.to_string())?;
        let plan = rules::plan(&rows.iter().map(recorded).collect::<Vec<_>>(), delivery);
        crate::metrics::barrier_decided(plan.rule);
        if let Business::Skip = plan.business {
            let settled = plan.settle(None);
            let tx = client.transaction().await.map_err(what)?;
            write_rows(&tx, ctx, &settled.writes)
                .await
                .map_err(|e| e.to_string())?;
            change_index(&tx, ctx, payload, settled.in_doubt, "")
                .await
                .map_err(|e| e.to_string())?;
            tx.commit().await.map_err(what)?;
            return Ok(settled.reply);
        }
        let call = handler.expect("the rules run business code only if registered");
        match op {
            Op::Prepare => self.prepare(client, ctx, payload, call, &plan).await,
            Op::Commit => {
                let xact = match held {
                    Held::Prepared(xact) => {
                        client
                            .batch_execute(&format!("COMMIT PREPARED '{xact}'"))
                            .await
                            .map_err(|e| {
                                pg_error(format!("COMMIT PREPARED '{xact}'"), e).to_string()
                            })?;
                        xact
                    }
                    Held::Committed(xact) => xact,
                    Held::None => {
                        return Err(format!(
                            "the branch is recorded PREPARED but its prepared transaction {} \
                             does not exist (was it ended by hand?)",
                            self.xact_name(ctx)
                        ))
                    }
                };
                let tx = client.transaction().await.map_err(what)?;
                let tx = match run_handler(call, ctx, tx, payload).await {
                    Ok(tx) => tx,
                    Err((tx, stopped)) => {
                        let _ = tx.rollback().await;
                        return Ok(match stopped {
                            Stopped::Refused(reason) => plan.settle(Some(&reason)).reply,
                            Stopped::Retry(msg) => rules::Reply::Retry(msg),
                        });
                    }
                };
                self.decided(tx, ctx, &plan, &xact).await
            }
            Op::Abort => {
                let xact = match held {
                    // The deliberate bug: the abort is recorded but the prepared transaction
                    // is left in `pg_prepared_xacts` (its change never applies, so money and
                    // atomicity still hold: only a check of the server's prepared
                    // transactions catches it).
                    #[cfg(feature = "mutation-abort-keeps-prepared")]
                    Held::Prepared(xact) => xact,
                    #[cfg(not(feature = "mutation-abort-keeps-prepared"))]
                    Held::Prepared(xact) => {
                        client
                            .batch_execute(&format!("ROLLBACK PREPARED '{xact}'"))
                            .await
                            .map_err(|e| {
                                pg_error(format!("ROLLBACK PREPARED '{xact}'"), e).to_string()
                            })?;
                        xact
                    }
                    Held::Committed(xact) => {
                        return Ok(rules::Reply::Violation(format!(
                            "abort of a branch whose prepared transaction {xact} was committed"
                        )))
                    }
                    Held::None => {
                        return Err(format!(
                            "the branch is recorded PREPARED but its prepared transaction {} \
                             does not exist (was it ended by hand?)",
                            self.xact_name(ctx)
                        ))
                    }
                };
                let tx = client.transaction().await.map_err(what)?;
                self.decided(tx, ctx, &plan, &xact).await
            }
            Op::Execute | Op::Compensate => unreachable!("saga deliveries run in one transaction"),
        }
    }

    /// The second step of a commit or abort: its rows, the index entry and the proof row
    /// removed, in `tx` (which holds the commit handler's changes).
    async fn decided(
        &self,
        tx: Transaction<'_>,
        ctx: &BranchContext,
        plan: &rules::Plan,
        xact: &str,
    ) -> Result<rules::Reply, String> {
        let what = |e| pg_error("recording the decision", e).to_string();
        let settled = plan.settle(None);
        write_rows(&tx, ctx, &settled.writes)
            .await
            .map_err(|e| e.to_string())?;
        change_index(&tx, ctx, &[], settled.in_doubt, "")
            .await
            .map_err(|e| e.to_string())?;
        tx.execute("DELETE FROM treaty_barrier_xact WHERE xact = $1", &[&xact])
            .await
            .map_err(what)?;
        tx.commit().await.map_err(what)?;
        Ok(settled.reply)
    }

    /// A prepare whose business code runs (see [`Inner::two_phase_locked`]).
    async fn prepare(
        &self,
        client: &mut Client,
        ctx: &BranchContext,
        payload: &[u8],
        call: &HandlerCall<PgStore>,
        plan: &rules::Plan,
    ) -> Result<rules::Reply, String> {
        let what = |e| pg_error("preparing", e).to_string();
        let xact = self.xact_name(ctx);
        let settled = plan.settle(None);
        // 1. The PREPARED row and the index entry naming the prepared transaction.
        let tx = client.transaction().await.map_err(what)?;
        write_rows(&tx, ctx, &settled.writes)
            .await
            .map_err(|e| e.to_string())?;
        change_index(&tx, ctx, payload, settled.in_doubt, &xact)
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(what)?;
        // 2. The business change, held in a prepared transaction.
        let tx = client.transaction().await.map_err(what)?;
        let stopped = match run_handler(call, ctx, tx, payload).await {
            Ok(tx) => {
                let prepared = async {
                    tx.execute(
                        "INSERT INTO treaty_barrier_xact (xact) VALUES ($1)",
                        &[&xact],
                    )
                    .await?;
                    tx.batch_execute(&format!("PREPARE TRANSACTION '{xact}'"))
                        .await
                }
                .await;
                match prepared {
                    Ok(()) => {
                        // The prepared transaction belongs to no session now. Dropping `tx`
                        // would send a ROLLBACK that finds no transaction (PostgreSQL logs
                        // "WARNING: there is no transaction in progress" for each prepare);
                        // forgetting it leaks nothing (a borrow of the client, no savepoint).
                        std::mem::forget(tx);
                        return Ok(settled.reply);
                    }
                    Err(e) => Stopped::Retry(
                        pg_error(format!("PREPARE TRANSACTION '{xact}'"), e).to_string(),
                    ),
                }
            }
            Err((tx, stopped)) => {
                let _ = tx.rollback().await;
                stopped
            }
        };
        // Nothing was prepared: undo step 1 (and record a refusal with it).
        match stopped {
            Stopped::Refused(reason) => {
                let refused = plan.settle(Some(&reason));
                self.forget_prepare_then(client, ctx, &refused.writes)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(refused.reply)
            }
            Stopped::Retry(msg) => {
                if let Err(e) = self.forget_prepare(client, ctx).await {
                    tracing::warn!(gid = %ctx.gid, branch_id = ctx.branch_id, "{e}; the next delivery removes it");
                }
                Err(msg)
            }
        }
    }

    /// The names of the prepared transactions of this store in `pg_prepared_xacts`.
    async fn prepared_transactions(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() \
                 AND starts_with(gid, $1) ORDER BY gid",
                &[&self.xact_prefix()],
            )
            .await
            .map_err(|e| pg_error("listing prepared transactions", e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

fn verdict(op: Op, ctx: &BranchContext, reply: rules::Reply) -> Verdict {
    Verdict::from_reply(op, &ctx.gid, ctx.branch_id, &ctx.handler, reply)
}

fn retry(op: Op, ctx: &BranchContext, msg: String) -> Verdict {
    tracing::warn!(gid = %ctx.gid, branch_id = ctx.branch_id, handler = %ctx.handler, "{op}: {msg}; answering RETRY");
    Verdict::Retry(msg)
}

impl BarrierStore for PgStore {
    type Tx<'t> = Transaction<'t>;

    async fn deliver(
        &self,
        op: Op,
        ctx: BranchContext,
        payload: Bytes,
        handler: Option<HandlerCall<Self>>,
    ) -> Verdict {
        // Handler futures are not `Send`: the delivery runs on a blocking thread, driven with
        // the runtime's I/O (see the module docs).
        // A delivery's connection and locks are taken here, where the caller going away
        // (the coordinator's call timed out) cancels the wait (see `Inner::lock_branch`).
        let locked = match self.inner.lock_branch(op, &ctx).await {
            Ok(l) => l,
            Err(verdict) => return verdict,
        };
        let rt = tokio::runtime::Handle::current();
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            rt.block_on(inner.deliver(op, &ctx, &payload, handler.as_ref(), locked))
        })
        .await
        .unwrap_or_else(|e| Verdict::Retry(format!("{op} delivery panicked: {e}")))
    }

    async fn rows(&self, gid: &str) -> Result<Vec<BarrierRow>, StoreError> {
        self.inner.rows(gid).await
    }

    async fn all_rows(&self) -> Result<Vec<BarrierRow>, StoreError> {
        self.inner.all_rows().await
    }

    async fn in_doubt(
        &self,
        prepared_before_unix_ms: Option<u64>,
    ) -> Result<Vec<InDoubt>, StoreError> {
        self.inner.in_doubt(prepared_before_unix_ms).await
    }

    fn sweeps(&self) -> bool {
        true
    }

    async fn sweep_page(
        &self,
        after_gid: Option<String>,
        rows_max: usize,
    ) -> Result<SweepPage, StoreError> {
        self.inner.sweep_page(after_gid, rows_max).await
    }

    async fn sweep_gid(
        &self,
        expected: Vec<BarrierRow>,
        marker: Swept,
    ) -> Result<bool, StoreError> {
        self.inner.sweep_gid(&expected, &marker).await
    }

    async fn expire_swept(
        &self,
        swept_before_unix_ms: u64,
        max: usize,
    ) -> Result<usize, StoreError> {
        self.inner.expire_swept(swept_before_unix_ms, max).await
    }

    async fn swept(&self, gid: &str) -> Result<Option<Swept>, StoreError> {
        self.inner.swept(gid).await
    }

    /// PostgreSQL keeps its own durability promise (a commit that returned is on disk; a
    /// failed fsync stops the server): never a failure here. A lost connection is a RETRY.
    fn failure(&self) -> Option<String> {
        None
    }
}
