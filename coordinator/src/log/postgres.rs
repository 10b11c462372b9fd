//! [`PgLog`]: a [`LogStore`] in a PostgreSQL database, so that the log outlives the machine a
//! coordinator runs on and several coordinators can share one log identity.
//!
//! # Why tokio-postgres (and not sqlx)
//!
//! Group commit wants *pipelining*: `BEGIN`, one upsert carrying a whole batch of records and
//! `COMMIT` sent back to back on one connection and answered in one round trip. tokio-postgres
//! pipelines any requests in flight on one `Client`, needs no database at compile time (sqlx's
//! checked queries do, or an offline cache to keep in sync), and is small: it pulls in no
//! runtime-agnostic layer, no connection pool and no migration framework we would not use.
//! TLS to the database (rustls, as for the API) when the URL says `sslmode=require`: the
//! server's certificate is checked against [`PgLogOptions::tls_ca`] and its host name.
//! Otherwise the connection is plain TCP (tokio-postgres' default `sslmode=prefer` is not
//! attempted over TLS: an unverified TLS connection would only look safe).
//!
//! # Layout (schema version [`SCHEMA_VERSION`])
//!
//! - `treaty_meta`: one row: the schema version, the log identity (`log_id`, a UUID created
//!   with the log) and when it was created. Every coordinator of one database reads the same
//!   row, so they all answer with one log identity.
//! - `treaty_tx`: one row per gid: `rec` holds the record encoded by [`codec`] (the bytes the
//!   sled log stores), beside it the columns the queries need: `phase`, `mode`, `active`
//!   (non-terminal), `stuck`, `created_ms`, `updated_ms`. Partial indexes on `gid` for
//!   active and stuck records, and on `(updated_ms, gid)` for terminal ones (retention).
//! - `treaty_tombstones`: gid -> encoded [`Tombstone`], `collected_ms` indexed for its own
//!   retention.
//! - Ownership (schema 2, see `MIGRATE_TO_2`): `treaty_coordinators` (one row per
//!   coordinator epoch, with its lease), `treaty_tx.owner` and `treaty_tx.owners`, an index
//!   on `(owner, gid)` of active records, and the function `treaty_fence`.
//!
//! `gid` columns use the `"C"` collation, so their order is byte order, as in sled.
//! [`PgLog::open`] creates the tables when they are missing, under an advisory lock so that
//! coordinators starting together do not race, and refuses a database whose schema is newer.
//!
//! # One writer task, in call order
//!
//! Every call sends one operation down a channel to a single task that owns the connection.
//! The channel is the call order: a read issued after a `put` is answered after that `put`
//! committed (the contract's "issued at call time"), and writes of one gid apply in order.
//! The task takes everything queued (up to [`BATCH_OPS_MAX`]) and runs it as one round trip:
//! the writes as one transaction, the reads pipelined after its upsert (a read may see a
//! write issued after it, never miss one issued before it); retention operations, rare,
//! run alone in their place.
//!
//! # Group commit and durability
//!
//! A run of writes is one PostgreSQL transaction: `BEGIN`, one `INSERT .. ON CONFLICT` of every
//! record of the run (the latest write of each gid: the earlier ones of the same run are never
//! visible to anyone, since reads wait for the commit), `COMMIT`, pipelined. When a forced
//! write or a `sync` is in the run, the commit is synchronous (`synchronous_commit` as the
//! server has it, `on` by default: the WAL is flushed before `COMMIT` returns) and is counted
//! in [`LogStats::flushes`]; else the run commits with `synchronous_commit = off`, which
//! PostgreSQL makes durable with the next synchronous commit: WAL is flushed in order, so a
//! synchronous commit makes every earlier commit durable too, which is exactly what the
//! contract asks of a forced write. `sync` with nothing to write commits a one-row update of
//! `treaty_meta` synchronously when anything was committed asynchronously since the last
//! synchronous commit (and once after open, for what an earlier process left).
//!
//! # Errors
//!
//! A lost connection, a statement that fails, or a batch that does not finish within
//! [`PgLogOptions::op_timeout`] (a paused or unreachable server) fails every operation of the
//! batch with [`LogError::Io`]; the connection is dropped and the next batch reconnects,
//! after a backoff that doubles from 100 ms up to 5 s while the database stays unreachable
//! (operations arriving meanwhile fail at once). A failed `COMMIT` leaves the outcome
//! unknown: the caller treats it as the contract says for a failed forced write (the
//! runtime fail-stops). Before a new connection answers anything, the server process of the
//! lost one is terminated and waited for: a batch still in it (or in its socket buffer)
//! would otherwise commit later, behind a coordinator that has already read the log again.
//! With that, [`LogStore::recovers_in_process`] holds: `treatyd` replaces its failed
//! runtime by one recovered from the database without restarting (`server.rs`). Nothing in
//! this module panics on a database error.
//!
//! # Several coordinators: epochs, leases, claims and the fence
//!
//! Every [`PgLog`] joins as a new *epoch* (a row of `treaty_coordinators`, numbered by a
//! sequence) with a lease that runs until `now() + lease` in the *database's* clock, renewed
//! every third of the lease. Every record it writes is owned by its epoch.
//!
//! - **Fence.** Each write transaction starts with `treaty_fence(epoch)`, pipelined before the
//!   upsert: it takes the epoch's row `FOR SHARE` and raises `TRFEN` unless the epoch is
//!   alive. Declaring an epoch dead is an `UPDATE` of that row, which waits for every write
//!   holding it: so a write either commits first (and the claim that follows sees it) or
//!   finds the epoch dead and lands nothing. The upsert also leaves alone a record another
//!   live epoch owns. A refused write is [`LogError::Fenced`], and the store stays fenced
//!   (every later write and sync fails at once) until [`LogStore::rejoin`]: the runtime
//!   fail-stops and `treatyd` starts a new runtime under a new epoch, which owns nothing it
//!   has not claimed.
//! - **Claims** ([`LogStore::claim`], every 500 ms in `treatyd`, and at recovery): one
//!   transaction declares dead every other epoch whose lease ran out, then takes up to a page
//!   of active records owned by dead epochs (or by nobody) with `FOR UPDATE SKIP LOCKED`
//!   through the `(owner, gid)` index, so claimers never block on or take the same record,
//!   and forgets dead epochs that own nothing any more.
//! - **Leaving** ([`LogStore::leave`], at a clean shutdown and when the last handle is
//!   dropped) marks the epoch dead at once: its transactions are claimed without waiting for
//!   the lease.
//! - **Nudges**: `Retry` on a coordinator that does not own the transaction sends
//!   `NOTIFY treaty_retry '<owner epoch> <gid>'`; every coordinator `LISTEN`s on its log
//!   connection and retries the gids sent to its current epoch.
//!
//! `owners` keeps every epoch that wrote or claimed a record, in order: an epoch that
//! appears again after another one would be a coordinator that wrote after losing the
//! record, which the fence forbids (the chaos runner checks it).

use super::codec;
use super::{ListFilter, ListPage, LogError, LogFuture, LogStats, LogStore};
use crate::engine::types::{Mode, Phase, Tombstone, TxRecord};
use futures::future::FutureExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, NoTls, Statement};

/// How connections to the database are made: plain, or TLS checked against a CA.
#[derive(Clone)]
enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Tls {
    /// TLS when `cfg` says `sslmode=require`, with `ca` (PEM) as the only trusted roots.
    fn for_config(
        cfg: &tokio_postgres::Config,
        ca: Option<&std::path::Path>,
    ) -> Result<Tls, String> {
        use rustls_pki_types::pem::PemObject;
        if cfg.get_ssl_mode() != tokio_postgres::config::SslMode::Require {
            return Ok(Tls::Plain);
        }
        let Some(ca) = ca else {
            return Err(
                "sslmode=require needs the CA that signed the database server's certificate: \
                 give it with --store-ca FILE (PEM)"
                    .into(),
            );
        };
        let pem = std::fs::read(ca)
            .map_err(|e| format!("--store-ca {}: cannot read: {e}", ca.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("--store-ca {}: {e}", ca.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("--store-ca {}: {e}", ca.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("--store-ca {}: no certificate in it", ca.display()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS to PostgreSQL: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
            config,
        )))
    }
}

/// Connects to the database (through `tls`) and drives the connection on a task, handing
/// the notifications it receives to `nudges`.
async fn open_conn(
    cfg: &tokio_postgres::Config,
    tls: &Tls,
    nudges: Option<Arc<Nudges>>,
) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    Ok(match tls {
        Tls::Plain => {
            let (client, connection) = cfg.connect(NoTls).await?;
            (client, tokio::spawn(drive(connection, nudges)))
        }
        Tls::Rustls(tls) => {
            let (client, connection) = cfg.connect(tls.clone()).await?;
            (client, tokio::spawn(drive(connection, nudges)))
        }
    })
}

/// Drives a connection until it closes. Driving it this way (rather than awaiting it) also
/// hands over what the server sends unasked: the nudges of `LISTEN treaty_retry`.
async fn drive<S, T>(mut connection: tokio_postgres::Connection<S, T>, nudges: Option<Arc<Nudges>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(m) = futures::StreamExt::next(&mut messages).await {
        match m {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                if let Some(nudges) = &nudges {
                    nudges.deliver(n.payload());
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "PostgreSQL log connection closed");
                return;
            }
        }
    }
}

/// The schema this build writes and reads. A database with a newer one is refused.
pub const SCHEMA_VERSION: i32 = 2;

/// Most operations one batch takes from the queue: bounds one transaction's size.
pub const BATCH_OPS_MAX: usize = 1024;

/// The advisory lock key under which the schema is created (`'treaty'` in ASCII).
const SCHEMA_LOCK_KEY: i64 = 0x7472_6561_7479;

/// The first and the largest wait before reconnecting to an unreachable database.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How [`LogStore::collect_ended`] bounds its scan, as the sled log does: records that cannot
/// be decoded are skipped but still examined.
const COLLECT_SCANNED_PER_DELETE_MAX: usize = 4;
const COLLECT_SCANNED_EXTRA: usize = 64;

/// Options of [`PgLog::open`].
#[derive(Clone, Debug)]
pub struct PgLogOptions {
    /// The longest a batch (or a connection attempt) may take before it fails and the
    /// connection is dropped. Default 10 s.
    pub op_timeout: Duration,
    /// How long this coordinator's ownership outlives its last renewal (renewed every third
    /// of it): after it, other coordinators of the database take its transactions over.
    /// Default [`DEFAULT_LEASE`].
    pub lease: Duration,
    /// How this coordinator is named in `treaty_coordinators` (for operators): e.g. its
    /// advertised URL. Default `pid N`.
    pub name: String,
    /// With `sslmode=require` in the URL: the CA (PEM) that signed the database server's
    /// certificate, the only roots trusted (`--store-ca`). Required then; unused otherwise.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Test only (feature `mutations`): write without the ownership checks, as a coordinator
    /// without fencing would, to prove the checks that catch it.
    #[cfg(feature = "mutations")]
    pub skip_fence: bool,
}

/// The default lease: a dead coordinator's transactions are taken over within about this
/// long (plus one claim interval).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

impl Default for PgLogOptions {
    fn default() -> Self {
        PgLogOptions {
            op_timeout: Duration::from_secs(10),
            lease: DEFAULT_LEASE,
            name: format!("pid {}", std::process::id()),
            tls_ca: None,
            #[cfg(feature = "mutations")]
            skip_fence: false,
        }
    }
}

/// The PostgreSQL-backed log. See the module documentation.
pub struct PgLog {
    log_id: String,
    ops: mpsc::UnboundedSender<Op>,
    counters: Arc<Counters>,
    /// This coordinator's current epoch (its row in `treaty_coordinators`), 0 before it joined.
    epoch: Arc<std::sync::atomic::AtomicI64>,
    nudges: Arc<Nudges>,
    /// `host:port/dbname`, for errors (never the password).
    target: String,
}

#[derive(Default)]
struct Counters {
    writes: AtomicU64,
    forced_writes: AtomicU64,
    flushes: AtomicU64,
}

type Reply<T> = oneshot::Sender<Result<T, LogError>>;

/// Runs `body` in the transaction just begun on `c`: commits after it, rolls back when it
/// fails (so that the connection is usable again).
async fn in_tx<T>(
    c: &Client,
    body: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    match body.await {
        Ok(v) => {
            c.batch_execute("COMMIT").await?;
            Ok(v)
        }
        Err(e) => {
            let _ = c.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

/// One call, queued for the writer task.
enum Op {
    Put {
        row: Row,
        forced: bool,
        done: Reply<()>,
    },
    Sync {
        done: Reply<()>,
    },
    Get {
        gid: String,
        done: Reply<Option<TxRecord>>,
    },
    GetTomb {
        gid: String,
        done: Reply<Option<Tombstone>>,
    },
    ScanActive {
        after: Option<String>,
        limit: usize,
        done: Reply<Vec<TxRecord>>,
    },
    List {
        filter: ListFilter,
        cursor: Option<String>,
        limit: usize,
        done: Reply<ListPage>,
    },
    CollectEnded {
        before_ms: u64,
        now_ms: u64,
        max: usize,
        done: Reply<usize>,
    },
    CollectTombs {
        before_ms: u64,
        max: usize,
        done: Reply<usize>,
    },
    /// Join as a new owner (see [`LogStore::rejoin`]); answers the new epoch.
    Join {
        done: Reply<i64>,
    },
    /// Renew this coordinator's lease.
    Renew {
        done: Reply<()>,
    },
    /// Take over records of gone owners (see [`LogStore::claim`]).
    Claim {
        limit: usize,
        done: Reply<Vec<TxRecord>>,
    },
    /// Give up ownership (see [`LogStore::leave`]).
    Leave {
        done: Reply<()>,
    },
    /// Tell the owner of a gid to retry (see [`LogStore::nudge`]).
    Nudge {
        gid: String,
        done: Reply<bool>,
    },
}

impl Op {
    fn is_write(&self) -> bool {
        matches!(self, Op::Put { .. } | Op::Sync { .. })
    }

    fn is_membership(&self) -> bool {
        matches!(
            self,
            Op::Join { .. } | Op::Renew { .. } | Op::Claim { .. } | Op::Leave { .. }
        )
    }

    fn is_read(&self) -> bool {
        matches!(
            self,
            Op::Get { .. }
                | Op::GetTomb { .. }
                | Op::ScanActive { .. }
                | Op::List { .. }
                | Op::Nudge { .. }
        )
    }

    /// Answers the operation with `err` (the batch it was in failed).
    fn fail(self, err: &dyn Fn() -> LogError) {
        match self {
            Op::Put { done, .. } | Op::Sync { done } => drop(done.send(Err(err()))),
            Op::Get { done, .. } => drop(done.send(Err(err()))),
            Op::GetTomb { done, .. } => drop(done.send(Err(err()))),
            Op::ScanActive { done, .. } => drop(done.send(Err(err()))),
            Op::List { done, .. } => drop(done.send(Err(err()))),
            Op::CollectEnded { done, .. } | Op::CollectTombs { done, .. } => {
                drop(done.send(Err(err())))
            }
            Op::Join { done } => drop(done.send(Err(err()))),
            Op::Renew { done } | Op::Leave { done } => drop(done.send(Err(err()))),
            Op::Claim { done, .. } => drop(done.send(Err(err()))),
            Op::Nudge { done, .. } => drop(done.send(Err(err()))),
        }
    }
}

/// A record as stored: its bytes and the indexed columns.
struct Row {
    gid: String,
    bytes: Vec<u8>,
    phase: i16,
    mode: i16,
    active: bool,
    stuck: bool,
    created_ms: i64,
    updated_ms: i64,
}

impl Row {
    fn of(rec: &TxRecord) -> Row {
        Row {
            gid: rec.gid.clone(),
            bytes: codec::encode(rec),
            phase: phase_code(rec.phase),
            mode: mode_code(rec.mode),
            active: !rec.phase.is_terminal(),
            // A terminal record is never listed as stuck, whatever its flag says.
            stuck: rec.stuck && !rec.phase.is_terminal(),
            created_ms: ms(rec.created_unix_ms),
            updated_ms: ms(rec.updated_unix_ms),
        }
    }
}

fn phase_code(p: Phase) -> i16 {
    match p {
        Phase::Active => 0,
        Phase::Committing => 1,
        Phase::Aborting => 2,
        Phase::Compensating => 3,
        Phase::Committed => 4,
        Phase::Aborted => 5,
    }
}

fn mode_code(m: Mode) -> i16 {
    match m {
        Mode::TwoPhase => 0,
        Mode::Saga => 1,
    }
}

/// Unix ms as PostgreSQL's `bigint`; times past year 292 million are clamped.
fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The schema of [`SCHEMA_VERSION`], created in one transaction.
const SCHEMA: &str = r#"
CREATE TABLE treaty_tx (
    gid text COLLATE "C" PRIMARY KEY,
    rec bytea NOT NULL,
    phase smallint NOT NULL,
    mode smallint NOT NULL,
    active boolean NOT NULL,
    stuck boolean NOT NULL,
    created_ms bigint NOT NULL,
    updated_ms bigint NOT NULL
);
CREATE INDEX treaty_tx_active ON treaty_tx (gid) WHERE active;
CREATE INDEX treaty_tx_stuck ON treaty_tx (gid) WHERE stuck;
CREATE INDEX treaty_tx_ended ON treaty_tx (updated_ms, gid) WHERE NOT active;
CREATE TABLE treaty_tombstones (
    gid text COLLATE "C" PRIMARY KEY,
    tomb bytea NOT NULL,
    collected_ms bigint NOT NULL
);
CREATE INDEX treaty_tombstones_by_time ON treaty_tombstones (collected_ms, gid);
"#;

/// Schema version 1 to 2: ownership, for several coordinators on one database.
///
/// - `treaty_coordinators`: one row per coordinator *epoch* (a process, or a runtime that
///   replaced a failed one): its name, whether it is `alive`, and until when its lease runs
///   (database time, so the coordinators' clocks do not matter).
/// - `treaty_tx.owner`: the epoch that owns the record (0: nobody, e.g. written by schema
///   1); `owners`: every epoch that wrote or claimed it, in order (the audit the chaos
///   checker reads: no epoch may come back after another took over).
/// - `treaty_fence(epoch)`: the first statement of every write transaction. It locks the
///   epoch's row `FOR SHARE` and raises `TRFEN` unless it is alive: a write either commits
///   before another coordinator declares the epoch dead (which waits for the lock), and is
///   seen by its claim, or is refused. That is the fence.
const MIGRATE_TO_2: &str = r#"
CREATE SEQUENCE treaty_epochs;
CREATE TABLE treaty_coordinators (
    epoch bigint PRIMARY KEY,
    name text NOT NULL,
    alive boolean NOT NULL,
    lease_until timestamptz NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE treaty_tx ADD COLUMN owner bigint NOT NULL DEFAULT 0,
    ADD COLUMN owners bigint[] NOT NULL DEFAULT '{}';
CREATE INDEX treaty_tx_owned ON treaty_tx (owner, gid) WHERE active;
CREATE FUNCTION treaty_fence(e bigint) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    PERFORM 1 FROM treaty_coordinators WHERE epoch = e AND alive FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'coordinator epoch % no longer owns its transactions: its lease ran out and another coordinator took them over, or it left', e
            USING ERRCODE = 'TRFEN';
    END IF;
END
$f$;
"#;

/// The channel on which a coordinator passes a `Retry` on to the owner of the gid (payload
/// `"<owner epoch> <gid>"`); every coordinator listens, each takes its own.
const NUDGE_CHANNEL: &str = "treaty_retry";

/// Where nudges for this coordinator go: the handler the runtime set, and the current epoch
/// (a nudge for an older epoch of this process is not ours any more).
#[derive(Default)]
struct Nudges {
    handler: std::sync::Mutex<Option<super::NudgeHandler>>,
    epoch: Arc<std::sync::atomic::AtomicI64>,
}

impl Nudges {
    fn deliver(&self, payload: &str) {
        let Some((epoch, gid)) = payload.split_once(' ') else {
            return;
        };
        if epoch.parse::<i64>().ok() != Some(self.epoch.load(Ordering::Acquire)) {
            return;
        }
        let handler = self
            .handler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(h) = handler {
            h(gid.to_string());
        }
    }
}

/// The SQLSTATE `treaty_fence` raises.
const FENCED_SQLSTATE: &str = "TRFEN";

/// The upsert of a batch, owned by `$9`: a record owned by another *live* epoch is left as
/// it is (and its gid not returned), so that only its owner writes it.
fn put_sql(fence: bool) -> String {
    let owned = if fence {
        "WHERE t.owner = excluded.owner OR NOT EXISTS (SELECT 1 FROM treaty_coordinators c \
         WHERE c.epoch = t.owner AND c.alive)"
    } else {
        ""
    };
    format!(
        "INSERT INTO treaty_tx AS t \
         (gid, rec, phase, mode, active, stuck, created_ms, updated_ms, owner, owners) \
         SELECT g, r, p, m, a, s, c, u, $9, ARRAY[$9::int8] FROM unnest($1::text[], \
         $2::bytea[], $3::int2[], $4::int2[], $5::bool[], $6::bool[], $7::int8[], $8::int8[]) \
         AS v(g, r, p, m, a, s, c, u) \
         ON CONFLICT (gid) DO UPDATE SET rec = excluded.rec, phase = excluded.phase, \
         mode = excluded.mode, active = excluded.active, stuck = excluded.stuck, \
         created_ms = excluded.created_ms, updated_ms = excluded.updated_ms, \
         owner = excluded.owner, owners = CASE WHEN t.owners[cardinality(t.owners)] = \
         excluded.owner THEN t.owners ELSE t.owners || excluded.owner END {owned} \
         RETURNING t.gid"
    )
}

/// Claims up to `$2` non-terminal records whose owner is not alive for epoch `$1`, skipping
/// rows another claimer holds; through the `(owner, gid)` index of active records.
const CLAIM_SQL: &str = "WITH gone AS (SELECT epoch FROM treaty_coordinators WHERE NOT alive \
    UNION ALL SELECT 0), \
    mine AS (SELECT gid FROM treaty_tx WHERE active AND owner IN (SELECT epoch FROM gone) \
    LIMIT $2 FOR UPDATE SKIP LOCKED) \
    UPDATE treaty_tx t SET owner = $1::int8, owners = t.owners || $1::int8 FROM mine \
    WHERE t.gid = mine.gid RETURNING t.gid, t.rec";

/// The statements of the hot path, prepared once per connection.
struct Stmts {
    put: Statement,
    fence: Statement,
    get: Statement,
    get_tomb: Statement,
    touch: Statement,
}

/// A live connection: the client and the task driving its socket (aborted on drop).
struct Conn {
    client: Client,
    stmts: Stmts,
    task: tokio::task::JoinHandle<()>,
    /// The server process serving this connection: its pid and start time (as text), so a
    /// later connection can make sure it has ended (see [`Worker::conn`]).
    backend: (i32, String),
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `host:port/dbname` of a connection config, for messages (never the password).
fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let db = cfg.get_dbname().or(cfg.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// Parses a `postgres://` URL (or a `key=value` connection string): the error says what is
/// wrong, for `--store`.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(format!(
            "{url:?} is not a PostgreSQL URL; write postgres://USER@HOST:PORT/DATABASE"
        ));
    }
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| format!("bad PostgreSQL URL: {e}"))
}

fn db_err(doing: String, e: tokio_postgres::Error) -> LogError {
    LogError::Io {
        doing,
        source: std::io::Error::other(e),
    }
}

async fn connect(
    cfg: &tokio_postgres::Config,
    tls: &Tls,
    target: &str,
    timeout: Duration,
    fence: bool,
    nudges: &Arc<Nudges>,
) -> Result<Conn, LogError> {
    let attempt = async {
        let (client, task) = open_conn(cfg, tls, Some(Arc::clone(nudges)))
            .await
            .map_err(|e| db_err(format!("connecting to PostgreSQL at {target}"), e))?;
        client
            .batch_execute(&format!("LISTEN {NUDGE_CHANNEL}"))
            .await
            .map_err(|e| db_err(format!("listening for retries at {target}"), e))?;
        let prep = |sql: String| {
            let c = &client;
            async move {
                c.prepare(&sql)
                    .await
                    .map_err(|e| db_err(format!("preparing a log statement at {target}"), e))
            }
        };
        let prep_str = |sql: &'static str| prep(sql.to_string());
        let stmts = Stmts {
            put: prep(put_sql(fence)).await?,
            fence: prep_str("SELECT treaty_fence($1)").await?,
            get: prep_str("SELECT rec FROM treaty_tx WHERE gid = $1").await?,
            get_tomb: prep_str("SELECT tomb FROM treaty_tombstones WHERE gid = $1").await?,
            touch: prep_str("UPDATE treaty_meta SET synced_ms = $1").await?,
        };
        let row = client
            .query_one(
                "SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|e| db_err(format!("reading our backend at {target}"), e))?;
        Ok(Conn {
            client,
            stmts,
            task,
            backend: (row.get(0), row.get(1)),
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(timed_out(format!(
            "connecting to PostgreSQL at {target} (no answer within {timeout:?})"
        ))),
    }
}

fn timed_out(doing: String) -> LogError {
    LogError::Io {
        doing,
        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
    }
}

/// Creates the schema if missing and returns the log identity (creating it with the schema).
async fn migrate(client: &mut Client, target: &str) -> Result<String, LogError> {
    let err = |what: &str| {
        let doing = format!("{what} at {target}");
        move |e| db_err(doing, e)
    };
    let tx = client
        .transaction()
        .await
        .map_err(err("starting the schema check"))?;
    // Coordinators starting together on an empty database would race on CREATE TABLE.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
        .await
        .map_err(err("taking the schema lock"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS treaty_meta (\
            one boolean PRIMARY KEY DEFAULT true CHECK (one), \
            schema_version integer NOT NULL, \
            log_id text NOT NULL, \
            created_ms bigint NOT NULL, \
            synced_ms bigint NOT NULL DEFAULT 0)",
    )
    .await
    .map_err(err("creating treaty_meta"))?;
    let row = tx
        .query_opt("SELECT schema_version, log_id FROM treaty_meta", &[])
        .await
        .map_err(err("reading treaty_meta"))?;
    let log_id = match row {
        Some(row) => {
            let version: i32 = row.get(0);
            if version < 2 {
                tx.batch_execute(MIGRATE_TO_2)
                    .await
                    .map_err(err("upgrading the log tables to schema 2"))?;
                tx.execute(
                    "UPDATE treaty_meta SET schema_version = $1",
                    &[&SCHEMA_VERSION],
                )
                .await
                .map_err(err("recording the schema version"))?;
                tracing::info!(target = %target, "PostgreSQL log upgraded to schema 2 (ownership)");
            }
            let log_id: String = row.get(1);
            if version > SCHEMA_VERSION {
                return Err(LogError::Corrupt {
                    path: target.to_string(),
                    gid: "<schema>".into(),
                    reason: format!(
                        "the database holds a Treaty log of schema version {version}, this \
                         treatyd knows up to {SCHEMA_VERSION}; run a newer treatyd"
                    ),
                });
            }
            if uuid::Uuid::parse_str(&log_id).is_err() {
                return Err(LogError::Corrupt {
                    path: target.to_string(),
                    gid: "<log identity>".into(),
                    reason: format!("treaty_meta.log_id {log_id:?} is not a UUID"),
                });
            }
            log_id
        }
        None => {
            tx.batch_execute(SCHEMA)
                .await
                .map_err(err("creating the log tables"))?;
            tx.batch_execute(MIGRATE_TO_2)
                .await
                .map_err(err("creating the ownership tables"))?;
            let id = uuid::Uuid::new_v4().to_string();
            let now = ms(crate::runtime::now_ms());
            tx.execute(
                "INSERT INTO treaty_meta (schema_version, log_id, created_ms) VALUES ($1, $2, $3)",
                &[&SCHEMA_VERSION, &id, &now],
            )
            .await
            .map_err(err("writing the log identity"))?;
            id
        }
    };
    // A synchronous commit (the server's default): the identity is durable before use.
    tx.commit().await.map_err(err("committing the schema"))?;
    Ok(log_id)
}

impl PgLog {
    /// Connects to the database at `url`, creates the log's tables if missing, reads (or
    /// creates) the log identity and starts the writer task. Needs a tokio runtime.
    ///
    /// Fails with [`LogError::Io`] when the database cannot be reached or refuses us, and
    /// [`LogError::Corrupt`] when it holds a log of a newer schema.
    pub async fn open(url: &str, opts: PgLogOptions) -> Result<PgLog, LogError> {
        let cfg = parse_url(url).map_err(|e| LogError::Io {
            doing: "opening the PostgreSQL log".into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
        let target = describe(&cfg);
        let tls = Tls::for_config(&cfg, opts.tls_ca.as_deref()).map_err(|e| LogError::Io {
            doing: format!("setting up TLS to PostgreSQL at {target}"),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
        let mut conn = connect_for_migration(&cfg, &tls, &target, opts.op_timeout).await?;
        let log_id =
            match tokio::time::timeout(opts.op_timeout, migrate(&mut conn.0, &target)).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(timed_out(format!(
                        "creating or checking the log tables at {target} (no answer within {:?})",
                        opts.op_timeout
                    )))
                }
            };
        drop(conn);
        #[cfg(feature = "mutations")]
        let fence = !opts.skip_fence;
        #[cfg(not(feature = "mutations"))]
        let fence = true;
        let epoch = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let nudges = Arc::new(Nudges {
            handler: std::sync::Mutex::new(None),
            epoch: Arc::clone(&epoch),
        });
        let conn = connect(&cfg, &tls, &target, opts.op_timeout, fence, &nudges).await?;
        let counters = Arc::new(Counters::default());
        let lease = opts.lease;
        let (tx, rx) = mpsc::unbounded_channel();
        let worker = Worker {
            cfg,
            tls,
            target: target.clone(),
            opts,
            conn: Some(conn),
            // Whatever an earlier process committed asynchronously is made durable by the
            // first sync (the runtime syncs before recovery reads anything).
            dirty: true,
            retry_at: None,
            backoff: RECONNECT_BACKOFF_MIN,
            counters: Arc::clone(&counters),
            last_backend: None,
            epoch: Arc::clone(&epoch),
            fenced: None,
            nudges: Arc::clone(&nudges),
        };
        tokio::spawn(worker.run(rx));
        tokio::spawn(renew_lease(tx.downgrade(), lease));
        let log = PgLog {
            log_id,
            ops: tx,
            counters,
            epoch,
            nudges,
            target,
        };
        log.join().await?;
        Ok(log)
    }

    /// This coordinator's epoch: its row in `treaty_coordinators`, and the owner of what it
    /// writes. A new one after each [`LogStore::rejoin`].
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire)
    }

    async fn join(&self) -> Result<i64, LogError> {
        self.send(|done| Op::Join { done }).await
    }

    /// Sends `op` to the writer task and returns the future of its answer.
    fn send<T: Send + 'static>(&self, make: impl FnOnce(Reply<T>) -> Op) -> LogFuture<T> {
        let (done, answer) = oneshot::channel();
        if self.ops.send(make(done)).is_err() {
            return futures::future::ready(Err(LogError::Closed)).boxed();
        }
        let target = self.target.clone();
        async move {
            // A dropped answer: its batch timed out (the worker gave up on it), or the worker
            // is gone. Either way the outcome is unknown.
            answer.await.unwrap_or_else(|_| {
                Err(timed_out(format!(
                    "waiting for PostgreSQL at {target} (the batch timed out)"
                )))
            })
        }
        .boxed()
    }
}

/// Renews the lease every third of it while the log is open. A renewal that finds the epoch
/// dead fences the log (the worker remembers); one that fails on the network is retried at
/// the next tick (the writes fail meanwhile anyway).
async fn renew_lease(ops: mpsc::WeakUnboundedSender<Op>, lease: Duration) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(ops) = ops.upgrade() else { return };
        let (done, answer) = oneshot::channel();
        if ops.send(Op::Renew { done }).is_err() {
            return;
        }
        drop(ops);
        if let Ok(Err(e)) = answer.await {
            tracing::debug!(error = %e, "lease renewal failed");
        }
    }
}

/// The migration's own connection (it needs `&mut Client` for a transaction), dropped after.
struct MigrationConn(Client, tokio::task::JoinHandle<()>);

impl Drop for MigrationConn {
    fn drop(&mut self) {
        self.1.abort();
    }
}

async fn connect_for_migration(
    cfg: &tokio_postgres::Config,
    tls: &Tls,
    target: &str,
    timeout: Duration,
) -> Result<MigrationConn, LogError> {
    let attempt = async {
        let (client, task) = open_conn(cfg, tls, None)
            .await
            .map_err(|e| db_err(format!("connecting to PostgreSQL at {target}"), e))?;
        Ok(MigrationConn(client, task))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(timed_out(format!(
            "connecting to PostgreSQL at {target} (no answer within {timeout:?})"
        ))),
    }
}

/// The task that owns the connection and runs every operation in call order.
struct Worker {
    cfg: tokio_postgres::Config,
    tls: Tls,
    target: String,
    opts: PgLogOptions,
    conn: Option<Conn>,
    /// Something was committed with `synchronous_commit = off` since the last synchronous
    /// commit.
    dirty: bool,
    /// While the database is unreachable: no new attempt before this instant.
    retry_at: Option<Instant>,
    backoff: Duration,
    counters: Arc<Counters>,
    /// The backend of the last connection, until a new connection has seen it end.
    last_backend: Option<(i32, String)>,
    /// This coordinator's epoch (0 before it joined), shared with [`PgLog::epoch`].
    epoch: Arc<std::sync::atomic::AtomicI64>,
    /// The database said this epoch is no longer alive (or it left): every write fails
    /// with [`LogError::Fenced`] until it joins again.
    fenced: Option<String>,
    nudges: Arc<Nudges>,
}

/// Makes sure the server process of an earlier connection has ended, terminating it if it
/// still runs. A batch whose connection was dropped (a timeout, a lost network) may still be
/// in that process, or in its socket buffer, and would commit when it gets to it: after
/// this returns, whatever it did is final, so what we read next will not change behind us.
async fn end_backend(
    c: &Client,
    (pid, started): &(i32, String),
    timeout: Duration,
    target: &str,
) -> Result<(), LogError> {
    let wait = async {
        loop {
            // Only that process: a pid reused after a server restart has another start time.
            let alive = c
                .query_opt(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE pid = $1 AND backend_start::text = $2",
                    &[pid, started],
                )
                .await
                .map_err(|e| {
                    db_err(
                        format!("ending our previous connection's backend at {target}"),
                        e,
                    )
                })?;
            if alive.is_none() {
                return Ok(());
            }
            // Bounded by the timeout below; a terminated backend ends within milliseconds.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(r) => r,
        Err(_) => Err(timed_out(format!(
            "waiting for our previous connection's backend (pid {pid}) at {target} to end"
        ))),
    }
}

/// What one step of a batch does.
enum Step {
    /// Writes and reads between two retention operations: one round trip (see
    /// [`write_batch`]).
    Mixed { writes: Vec<Op>, reads: Vec<Op> },
    /// A retention operation, alone, in its place.
    One(Op),
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        while let Some(first) = rx.recv().await {
            let mut ops = vec![first];
            while ops.len() < BATCH_OPS_MAX {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            for step in steps(ops) {
                self.step(step).await;
            }
        }
        // Every `PgLog` handle is gone (a clean close): give up ownership, so that what
        // is unfinished is taken over at once, not after the lease. Best effort: a process
        // that dies without it is taken over after its lease.
        if self.epoch() != 0 && self.fenced.is_none() {
            let (done, _) = oneshot::channel();
            self.step(Step::One(Op::Leave { done })).await;
        }
    }

    fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether writes are fenced (always, but for the test-only `skip_fence` mutation).
    fn fences(&self) -> bool {
        #[cfg(feature = "mutations")]
        let on = !self.opts.skip_fence;
        #[cfg(not(feature = "mutations"))]
        let on = true;
        on
    }

    /// Joining, renewing, claiming and leaving (the ownership operations), alone in their
    /// place; answers `op`.
    async fn membership(&mut self, op: Op) -> Result<(), LogError> {
        let timeout = self.opts.op_timeout;
        let target = self.target.clone();
        let epoch = self.epoch();
        let lease = self.opts.lease.as_secs_f64();
        let name = self.opts.name.clone();
        let fenced = self.fenced.clone();
        let conn = self.conn().await?;
        let c = &conn.client;
        let err = |doing: &str| {
            let doing = format!("{doing} at {target}");
            move |e| db_err(doing, e)
        };
        match op {
            Op::Join { done } => {
                let joined = run_with_timeout(timeout, &target, async {
                    // The old epoch is given up in the same transaction: what it owned is
                    // claimable the moment the new one exists.
                    // Statements one after another (not pipelined: a statement that is not
                    // prepared yet would run after a pipelined COMMIT). Rare, so cheap.
                    c.batch_execute("BEGIN")
                        .await
                        .map_err(err("joining the coordinators"))?;
                    let row = in_tx(c, async {
                        c.execute(
                            "UPDATE treaty_coordinators SET alive = false WHERE epoch = $1",
                            &[&epoch],
                        )
                        .await?;
                        c.query_one(
                            "INSERT INTO treaty_coordinators (epoch, name, alive, lease_until) \
                             VALUES (nextval('treaty_epochs'), $1, true, \
                             now() + make_interval(secs => $2)) RETURNING epoch",
                            &[&name, &lease],
                        )
                        .await
                    })
                    .await
                    .map_err(err("joining the coordinators"))?;
                    Ok(row.get::<_, i64>(0))
                })
                .await;
                let db = joined.as_ref().err().map(copy);
                if let Ok(new) = &joined {
                    tracing::info!(epoch = new, previous = epoch, target = %target, "joined the coordinators of the PostgreSQL log");
                    self.epoch.store(*new, Ordering::Release);
                    self.fenced = None;
                }
                let _ = done.send(joined.map(|_| ()).map(|()| self.epoch()));
                db.map_or(Ok(()), Err)
            }
            Op::Renew { done } => {
                if let Some(why) = fenced {
                    let _ = done.send(Err(LogError::Fenced(why)));
                    return Ok(());
                }
                let r = run_with_timeout(timeout, &target, async {
                    c.execute(
                        "UPDATE treaty_coordinators SET lease_until = now() + \
                         make_interval(secs => $2) WHERE epoch = $1 AND alive",
                        &[&epoch, &lease],
                    )
                    .await
                    .map_err(err("renewing the lease"))
                })
                .await;
                let (answer, db) = match r {
                    Ok(1) => (Ok(()), Ok(())),
                    Ok(_) => {
                        let why = format!(
                            "coordinator epoch {epoch} was declared dead by another coordinator \
                             (its lease ran out) and its transactions taken over"
                        );
                        tracing::error!(epoch, "{why}");
                        self.fenced = Some(why.clone());
                        (Err(LogError::Fenced(why)), Ok(()))
                    }
                    Err(e) => {
                        let again = copy(&e);
                        (Err(e), Err(again))
                    }
                };
                let _ = done.send(answer);
                db
            }
            Op::Claim { limit, done } => {
                if let Some(why) = fenced {
                    let _ = done.send(Err(LogError::Fenced(why)));
                    return Ok(());
                }
                let lim = ms(limit as u64);
                let r = run_with_timeout(timeout, &target, async {
                    c.batch_execute("BEGIN")
                        .await
                        .map_err(err("claiming records"))?;
                    let (expired, claimed) = in_tx(c, async {
                        c.execute(&conn.stmts.fence, &[&epoch]).await?;
                        let expired = c
                            .query(
                                "UPDATE treaty_coordinators SET alive = false \
                                 WHERE alive AND lease_until < now() AND epoch <> $1 \
                                 RETURNING epoch, name",
                                &[&epoch],
                            )
                            .await?;
                        let claimed = c.query(CLAIM_SQL, &[&epoch, &lim]).await?;
                        c.execute(
                            "DELETE FROM treaty_coordinators c WHERE NOT alive AND NOT EXISTS \
                             (SELECT 1 FROM treaty_tx t WHERE t.active AND t.owner = c.epoch)",
                            &[],
                        )
                        .await?;
                        Ok((expired, claimed))
                    })
                    .await
                    .map_err(|e| fenced_or(e, "claiming records", &target))?;
                    for row in &expired {
                        let (dead, name): (i64, String) = (row.get(0), row.get(1));
                        tracing::warn!(epoch = dead, name = %name, "a coordinator's lease ran out: taking over its transactions");
                    }
                    claimed
                        .iter()
                        .map(|row| decode(&target, row.get(0), row.get(1)))
                        .collect::<Result<Vec<_>, _>>()
                })
                .await;
                if let Err(LogError::Fenced(why)) = &r {
                    self.fenced = Some(why.clone());
                }
                let db = match &r {
                    Err(e @ LogError::Io { .. }) => Err(copy(e)),
                    _ => Ok(()),
                };
                let _ = done.send(r);
                db
            }
            Op::Leave { done } => {
                let r = run_with_timeout(timeout, &target, async {
                    c.execute(
                        "UPDATE treaty_coordinators SET alive = false WHERE epoch = $1",
                        &[&epoch],
                    )
                    .await
                    .map_err(err("leaving the coordinators"))
                })
                .await;
                let db = r.as_ref().err().map(copy);
                if r.is_ok() {
                    tracing::info!(epoch, "left the coordinators: unfinished transactions are for others to take over");
                    self.fenced = Some(format!("coordinator epoch {epoch} left"));
                }
                let _ = done.send(r.map(|_| ()));
                db.map_or(Ok(()), Err)
            }
            other => {
                other.fail(&|| LogError::Closed);
                Ok(())
            }
        }
    }

    /// A connection, reconnecting (bounded by the backoff) when there is none.
    async fn conn(&mut self) -> Result<&Conn, LogError> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            if let Some(at) = self.retry_at {
                if Instant::now() < at {
                    return Err(LogError::Io {
                        doing: format!(
                            "reaching PostgreSQL at {} (unreachable; the next attempt is in \
                             {:?})",
                            self.target,
                            at.saturating_duration_since(Instant::now())
                        ),
                        source: std::io::Error::from(std::io::ErrorKind::NotConnected),
                    });
                }
            }
            let fence = self.fences();
            let connected = match connect(
                &self.cfg,
                &self.tls,
                &self.target,
                self.opts.op_timeout,
                fence,
                &self.nudges,
            )
            .await
            {
                Ok(c) => match &self.last_backend {
                    Some(old) => end_backend(&c.client, old, self.opts.op_timeout, &self.target)
                        .await
                        .map(|()| c),
                    None => Ok(c),
                },
                Err(e) => Err(e),
            };
            match connected {
                Ok(c) => {
                    tracing::info!(target = %self.target, "PostgreSQL log connected");
                    self.last_backend = Some(c.backend.clone());
                    self.conn = Some(c);
                    self.retry_at = None;
                    self.backoff = RECONNECT_BACKOFF_MIN;
                }
                Err(e) => {
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(RECONNECT_BACKOFF_MAX);
                    return Err(e);
                }
            }
        }
        self.conn.as_ref().ok_or(LogError::Closed)
    }

    async fn step(&mut self, step: Step) {
        let step = match step {
            Step::One(op) if op.is_membership() => {
                if let Err(e) = self.membership(op).await {
                    tracing::warn!(error = %e, "PostgreSQL log ownership operation failed; reconnecting");
                    self.conn = None;
                }
                return;
            }
            // Fenced: no write goes out (the database would refuse it anyway).
            Step::Mixed { writes, reads } if self.fenced.is_some() && !writes.is_empty() => {
                let why = self.fenced.clone().unwrap_or_default();
                for op in writes {
                    op.fail(&|| LogError::Fenced(why.clone()));
                }
                Step::Mixed {
                    writes: Vec::new(),
                    reads,
                }
            }
            other => other,
        };
        if matches!(&step, Step::Mixed { writes, reads } if writes.is_empty() && reads.is_empty()) {
            return;
        }
        let timeout = self.opts.op_timeout;
        let epoch = self.epoch();
        let fence = self.fences();
        let target = self.target.clone();
        let dirty = self.dirty;
        let conn = match self.conn().await {
            Ok(c) => c,
            Err(e) => {
                for op in step.into_ops() {
                    op.fail(&|| copy(&e));
                }
                return;
            }
        };
        let outcome = match step {
            Step::Mixed { writes, reads } if writes.is_empty() => {
                run_with_timeout(timeout, &target, read_batch(conn, reads, &target)).await
            }
            Step::Mixed { writes, reads } => {
                let r = run_with_timeout(
                    timeout,
                    &target,
                    write_batch(conn, writes, reads, dirty, (epoch, fence), &target),
                )
                .await;
                match r {
                    Ok(Some(durable)) => {
                        if durable {
                            self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                            self.dirty = false;
                        } else {
                            self.dirty = true;
                        }
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(LogError::Fenced(why)) => {
                        // The batch was refused whole (nothing of it landed) and the
                        // connection is fine: remember, so that nothing more is written.
                        tracing::error!(epoch, reason = %why, "fenced: this coordinator no longer owns its transactions");
                        self.fenced = Some(why);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Step::One(op) => {
                let r = run_with_timeout(timeout, &target, retention(conn, op, &target)).await;
                if r.is_ok() {
                    // Retention commits asynchronously: the next forced write or sync makes
                    // it durable.
                    self.dirty = true;
                }
                r
            }
        };
        if let Err(e) = outcome {
            // The ops were answered; what is left is whether the connection is still usable.
            // After a timeout or a lost connection it is not (a statement may still be
            // running on it): drop it, the next step reconnects.
            tracing::warn!(error = %e, "PostgreSQL log batch failed; reconnecting");
            self.conn = None;
        }
    }
}

impl Step {
    fn into_ops(self) -> Vec<Op> {
        match self {
            Step::Mixed { mut writes, reads } => {
                writes.extend(reads);
                writes
            }
            Step::One(op) => vec![op],
        }
    }
}

/// Cuts a batch into steps: retention operations alone, in their place; the writes and
/// reads between them together. Reads of one step run after its writes, so each read sees
/// every write issued before it and perhaps some issued after it, of its gid or another:
/// the contract allows a read to see a later write, never an earlier one only.
fn steps(ops: Vec<Op>) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::new();
    for op in ops {
        let (is_write, is_read) = (op.is_write(), op.is_read());
        if !is_write && !is_read {
            out.push(Step::One(op));
            continue;
        }
        if !matches!(out.last(), Some(Step::Mixed { .. })) {
            out.push(Step::Mixed {
                writes: Vec::new(),
                reads: Vec::new(),
            });
        }
        if let Some(Step::Mixed { writes, reads }) = out.last_mut() {
            if is_write {
                writes.push(op);
            } else {
                reads.push(op);
            }
        }
    }
    out
}

/// Runs `fut` (which answers its own ops) within `timeout`. On timeout its ops are dropped
/// unanswered, which their callers see as a timeout error; the returned error makes the
/// worker drop the connection.
async fn run_with_timeout<T>(
    timeout: Duration,
    target: &str,
    fut: impl std::future::Future<Output = Result<T, LogError>>,
) -> Result<T, LogError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(timed_out(format!(
            "waiting for PostgreSQL at {target} (no answer within {timeout:?})"
        ))),
    }
}

/// One transaction for the puts and syncs of a step, with the step's reads pipelined after
/// its upsert (inside the transaction, so they see its writes): one round trip for all.
/// Answers every op; returns whether the commit was synchronous (`Some(true)`), asynchronous
/// (`Some(false)`), or nothing was committed.
///
/// A read answered from inside the transaction may have seen a write whose commit then
/// failed: the contract allows that (a read may see a write whose forced `put` failed), and
/// the caller stops on the failed write.
async fn write_batch(
    conn: &Conn,
    ops: Vec<Op>,
    reads: Vec<Op>,
    dirty: bool,
    (epoch, fence): (i64, bool),
    target: &str,
) -> Result<Option<bool>, LogError> {
    let mut durable = false;
    let mut latest: HashMap<&str, usize> = HashMap::new();
    let mut rows: Vec<&Row> = Vec::new();
    for op in &ops {
        match op {
            Op::Put { row, forced, .. } => {
                durable |= *forced;
                match latest.get(row.gid.as_str()) {
                    Some(&i) => rows[i] = row,
                    None => {
                        latest.insert(&row.gid, rows.len());
                        rows.push(row);
                    }
                }
            }
            Op::Sync { .. } => durable = true,
            _ => {}
        }
    }
    let c = &conn.client;
    let result = if rows.is_empty() && !(durable && dirty) {
        // Only syncs, and nothing committed asynchronously since the last synchronous commit:
        // nothing to flush, but a sync still says the database answers (treatyd probes with
        // it while it serves).
        let (ping, read) =
            futures::join!(c.batch_execute("SELECT 1"), read_batch(conn, reads, target));
        ping.map_err(|e| db_err(format!("reaching PostgreSQL at {target}"), e))
            .and(read)
            .map(|()| None)
    } else {
        let begin = if durable {
            "BEGIN"
        } else {
            "BEGIN; SET LOCAL synchronous_commit = off"
        };
        let now = ms(crate::runtime::now_ms());
        let gids: Vec<&str> = rows.iter().map(|r| r.gid.as_str()).collect();
        let bytes: Vec<&[u8]> = rows.iter().map(|r| r.bytes.as_slice()).collect();
        let phases: Vec<i16> = rows.iter().map(|r| r.phase).collect();
        let modes: Vec<i16> = rows.iter().map(|r| r.mode).collect();
        let active: Vec<bool> = rows.iter().map(|r| r.active).collect();
        let stuck: Vec<bool> = rows.iter().map(|r| r.stuck).collect();
        let created: Vec<i64> = rows.iter().map(|r| r.created_ms).collect();
        let updated: Vec<i64> = rows.iter().map(|r| r.updated_ms).collect();
        // Pipelined: the requests go out back to back (tokio-postgres sends each when first
        // polled, and `join!` polls in order), one round trip in all.
        let (b, fenced, put, touch, read, commit) = futures::join!(
            c.batch_execute(begin),
            async {
                if rows.is_empty() || !fence {
                    return Ok(0);
                }
                // Prepared: its `Execute` must go out before the upsert's, in the pipeline.
                c.execute(&conn.stmts.fence, &[&epoch]).await
            },
            async {
                if rows.is_empty() {
                    return Ok(Vec::new());
                }
                c.query(
                    &conn.stmts.put,
                    &[
                        &gids, &bytes, &phases, &modes, &active, &stuck, &created, &updated, &epoch,
                    ],
                )
                .await
            },
            async {
                // A sync with nothing to write still needs a write for its commit to flush
                // the WAL that earlier asynchronous commits left.
                if rows.is_empty() {
                    c.execute(&conn.stmts.touch, &[&now]).await
                } else {
                    Ok(0)
                }
            },
            read_batch(conn, reads, target),
            c.batch_execute("COMMIT"),
        );
        // COMMIT of a transaction in which a statement failed is a ROLLBACK that reports
        // success: every part must have succeeded.
        let what = if durable {
            "committing (forced) a batch of log records"
        } else {
            "committing a batch of log records"
        };
        let landed = |put: Vec<tokio_postgres::Row>| {
            let landed: std::collections::HashSet<String> =
                put.iter().map(|r| r.get::<_, String>(0)).collect();
            landed
        };
        match b
            .and(fenced)
            .and(put.map(landed))
            .and_then(|landed| touch.and(commit).map(|_| landed))
        {
            Err(e) => Err(fenced_or(e, what, target)),
            // A record another live coordinator owns was left as it is: this coordinator
            // has no business writing it (it is fenced from it like from everything else).
            Ok(landed) if landed.len() != rows.len() => {
                let lost: Vec<&str> = gids
                    .iter()
                    .copied()
                    .filter(|g| !landed.contains(*g))
                    .collect();
                Err(LogError::Fenced(format!(
                    "{what} at {target}: gid(s) {lost:?} belong to another live coordinator; \
                     epoch {epoch} may not write them"
                )))
            }
            Ok(_) => match read {
                // A read that failed in the transaction rolled it back.
                Err(e) => Err(LogError::Io {
                    doing: format!("{what} at {target}: a read in its transaction failed: {e}"),
                    source: std::io::Error::other("the batch was rolled back"),
                }),
                Ok(()) => Ok(Some(durable)),
            },
        }
    };
    for op in ops {
        match (op, &result) {
            (Op::Put { done, .. } | Op::Sync { done }, Ok(_)) => drop(done.send(Ok(()))),
            // Not committed, or its outcome is unknown.
            (op, Err(e)) => op.fail(&|| copy(e)),
            (_, Ok(_)) => {}
        }
    }
    result
}

/// A database error as a [`LogError`]: [`LogError::Fenced`] when `treaty_fence` refused the
/// transaction, else [`LogError::Io`].
fn fenced_or(e: tokio_postgres::Error, doing: &str, target: &str) -> LogError {
    match e.as_db_error() {
        Some(db) if db.code().code() == FENCED_SQLSTATE => {
            LogError::Fenced(format!("{doing} at {target}: {}", db.message()))
        }
        _ => db_err(format!("{doing} at {target}"), e),
    }
}

/// The same error again, for every operation of a failed batch (`LogError` is not `Clone`:
/// its I/O source is not).
fn copy(e: &LogError) -> LogError {
    match e {
        LogError::Io { doing, source } => LogError::Io {
            doing: doing.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        LogError::Corrupt { path, gid, reason } => LogError::Corrupt {
            path: path.clone(),
            gid: gid.clone(),
            reason: reason.clone(),
        },
        LogError::Locked { path, holder } => LogError::Locked {
            path: path.clone(),
            holder: holder.clone(),
        },
        LogError::Closed => LogError::Closed,
        LogError::Stopped(why) => LogError::Stopped(why.clone()),
        LogError::Fenced(why) => LogError::Fenced(why.clone()),
    }
}

fn decode(target: &str, gid: &str, bytes: &[u8]) -> Result<TxRecord, LogError> {
    let rec = codec::decode(bytes).map_err(|e| corrupt(target, gid, e.to_string()))?;
    if rec.gid != gid {
        return Err(corrupt(
            target,
            gid,
            format!("the record stored under this gid names gid {:?}", rec.gid),
        ));
    }
    Ok(rec)
}

fn corrupt(target: &str, gid: &str, reason: String) -> LogError {
    LogError::Corrupt {
        path: format!("postgres {target}"),
        gid: gid.into(),
        reason,
    }
}

/// A run of reads, pipelined. Answers every op; the error (if any) is the first failure
/// that means the connection may be gone.
async fn read_batch(conn: &Conn, ops: Vec<Op>, target: &str) -> Result<(), LogError> {
    let reads = ops.into_iter().map(|op| read(conn, op, target));
    let results = futures::future::join_all(reads).await;
    results.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
}

/// One read; answers its op. Returns an error only when the database failed (not when a
/// record did not decode), for the worker to drop a broken connection.
async fn read(conn: &Conn, op: Op, target: &str) -> Result<(), LogError> {
    let c = &conn.client;
    let failed = |doing: String| move |e| db_err(doing, e);
    match op {
        Op::Get { gid, done } => {
            let r = c
                .query_opt(&conn.stmts.get, &[&gid])
                .await
                .map_err(failed(format!("reading gid {gid:?} at {target}")));
            let (answer, db) = split(r, |row| {
                row.map(|row| decode(target, &gid, row.get(0))).transpose()
            });
            let _ = done.send(answer);
            db
        }
        Op::GetTomb { gid, done } => {
            let r = c
                .query_opt(&conn.stmts.get_tomb, &[&gid])
                .await
                .map_err(failed(format!(
                    "reading the tombstone of gid {gid:?} at {target}"
                )));
            let (answer, db) = split(r, |row| {
                row.map(|row| {
                    codec::decode_tombstone(row.get(0))
                        .map_err(|e| corrupt(target, &gid, format!("tombstone: {e}")))
                })
                .transpose()
            });
            let _ = done.send(answer);
            db
        }
        Op::ScanActive { after, limit, done } => {
            let lim = ms(limit as u64);
            let r = match &after {
                Some(a) => {
                    c.query(
                        "SELECT gid, rec FROM treaty_tx WHERE active AND gid > $1 \
                         ORDER BY gid LIMIT $2",
                        &[a, &lim],
                    )
                    .await
                }
                None => {
                    c.query(
                        "SELECT gid, rec FROM treaty_tx WHERE active ORDER BY gid LIMIT $1",
                        &[&lim],
                    )
                    .await
                }
            }
            .map_err(failed(format!("scanning active records at {target}")));
            let (answer, db) = split(r, |rows| {
                rows.iter()
                    .map(|row| decode(target, row.get(0), row.get(1)))
                    .collect()
            });
            let _ = done.send(answer);
            db
        }
        Op::Nudge { gid, done } => {
            let r = c
                .query_opt(
                    "SELECT pg_notify($2, t.owner::text || ' ' || t.gid) FROM treaty_tx t \
                     WHERE t.gid = $1 AND t.active AND EXISTS (SELECT 1 FROM \
                     treaty_coordinators c WHERE c.epoch = t.owner AND c.alive)",
                    &[&gid, &NUDGE_CHANNEL],
                )
                .await
                .map_err(failed(format!(
                    "passing on a retry of gid {gid:?} at {target}"
                )));
            let (answer, db) = split(r, |row| Ok(row.is_some()));
            let _ = done.send(answer);
            db
        }
        Op::List {
            filter,
            cursor,
            limit,
            done,
        } => {
            let r = list(c, &filter, cursor.as_deref(), limit)
                .await
                .map_err(failed(format!("listing records at {target}")));
            let (answer, db) = split(r, |rows| {
                let entries = rows.iter().map(|row| {
                    let gid: String = row.get(0);
                    let bytes: Option<&[u8]> = row.get(1);
                    let rec = bytes.map(|b| decode(target, &gid, b)).transpose()?;
                    Ok((gid, rec))
                });
                super::list_page(entries, &filter, limit)
            });
            let _ = done.send(answer);
            db
        }
        other => {
            other.fail(&|| LogError::Closed);
            Ok(())
        }
    }
}

/// Turns a query result into the op's answer (through `f`) and the worker's verdict on the
/// connection: only a database error says anything about the connection.
fn split<R, T>(
    r: Result<R, LogError>,
    f: impl FnOnce(R) -> Result<T, LogError>,
) -> (Result<T, LogError>, Result<(), LogError>) {
    match r {
        Ok(v) => (f(v), Ok(())),
        Err(e) => {
            let again = copy(&e);
            (Err(e), Err(again))
        }
    }
}

/// The entries `list` examines: at most `limit * LIST_SCANNED_PER_RESULT_MAX + 1` gids below
/// the cursor, in descending order, from the smallest index that holds every match (as the
/// sled log does); the record only for those that match the filter's columns, so that the
/// entries examined but not matching cost their gid only. [`super::list_page`] then pages
/// them exactly as every backend does.
async fn list(
    c: &Client,
    filter: &ListFilter,
    cursor: Option<&str>,
    limit: usize,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let only_live = !filter.phases.is_empty() && filter.phases.iter().all(|p| !p.is_terminal());
    let index = if filter.stuck_only {
        " AND stuck"
    } else if only_live {
        " AND active"
    } else {
        ""
    };
    let below = if cursor.is_some() {
        " AND gid < $6"
    } else {
        ""
    };
    let sql = format!(
        "SELECT gid, CASE WHEN (cardinality($1::int2[]) = 0 OR phase = ANY($1)) \
         AND ($2::int2 IS NULL OR mode = $2) AND (NOT $3 OR stuck) \
         AND ($4::int8 IS NULL OR created_ms <= $4) THEN rec END \
         FROM treaty_tx WHERE true{index}{below} ORDER BY gid DESC LIMIT $5"
    );
    let phases: Vec<i16> = filter.phases.iter().map(|p| phase_code(*p)).collect();
    let mode = filter.mode.map(mode_code);
    let created = filter.created_before_unix_ms.map(ms);
    let scan = ms(limit
        .max(1)
        .saturating_mul(super::LIST_SCANNED_PER_RESULT_MAX)
        .saturating_add(1) as u64);
    match cursor {
        Some(cur) => {
            c.query(
                &sql,
                &[&phases, &mode, &filter.stuck_only, &created, &scan, &cur],
            )
            .await
        }
        None => {
            c.query(&sql, &[&phases, &mode, &filter.stuck_only, &created, &scan])
                .await
        }
    }
}

/// A retention operation; answers its op.
async fn retention(conn: &Conn, op: Op, target: &str) -> Result<(), LogError> {
    match op {
        Op::CollectEnded {
            before_ms,
            now_ms,
            max,
            done,
        } => {
            let r = collect_ended(conn, before_ms, now_ms, max, target).await;
            let db = r.as_ref().err().map(copy);
            let _ = done.send(r);
            db.map_or(Ok(()), Err)
        }
        Op::CollectTombs {
            before_ms,
            max,
            done,
        } => {
            let r = conn
                .client
                .execute(
                    "DELETE FROM treaty_tombstones WHERE gid IN (SELECT gid FROM \
                     treaty_tombstones WHERE collected_ms < $1 ORDER BY collected_ms, gid \
                     LIMIT $2)",
                    &[&ms(before_ms), &ms(max as u64)],
                )
                .await
                .map(|n| n as usize)
                .map_err(|e| db_err(format!("deleting old tombstones at {target}"), e));
            let db = r.as_ref().err().map(copy);
            let _ = done.send(r);
            db.map_or(Ok(()), Err)
        }
        other => {
            other.fail(&|| LogError::Closed);
            Ok(())
        }
    }
}

/// Replaces up to `max` old terminal records by tombstones in one transaction. A record is
/// deleted only if its bytes are still the ones examined (a rewrite since wins).
async fn collect_ended(
    conn: &Conn,
    before_ms: u64,
    now_ms: u64,
    max: usize,
    target: &str,
) -> Result<usize, LogError> {
    let c = &conn.client;
    let err = |doing: &str| {
        let doing = format!("{doing} at {target}");
        move |e| db_err(doing, e)
    };
    let scan = max
        .saturating_mul(COLLECT_SCANNED_PER_DELETE_MAX)
        .saturating_add(COLLECT_SCANNED_EXTRA);
    let rows = c
        .query(
            "SELECT gid, rec FROM treaty_tx WHERE NOT active AND updated_ms < $1 \
             ORDER BY updated_ms, gid LIMIT $2",
            &[&ms(before_ms), &ms(scan as u64)],
        )
        .await
        .map_err(err("scanning ended records"))?;
    let mut tombs: Vec<(String, Vec<u8>, Vec<u8>)> = Vec::new();
    for row in &rows {
        if tombs.len() >= max {
            break;
        }
        let gid: String = row.get(0);
        let bytes: Vec<u8> = row.get(1);
        match decode(target, &gid, &bytes) {
            Ok(rec) if rec.phase.is_terminal() => {
                let tomb = codec::encode_tombstone(&rec.tombstone(now_ms));
                tombs.push((gid, bytes, tomb));
            }
            Ok(_) => {}
            Err(e) => {
                // One damaged record must not stop retention for good: leave it for an
                // operator (`get` reports it) and go on.
                tracing::error!(gid = %gid, error = %e, "retention skips a record that cannot be decoded; it is kept for inspection");
            }
        }
    }
    if tombs.is_empty() {
        return Ok(0);
    }
    let gids: Vec<&str> = tombs.iter().map(|t| t.0.as_str()).collect();
    let recs: Vec<&[u8]> = tombs.iter().map(|t| t.1.as_slice()).collect();
    let encoded: Vec<&[u8]> = tombs.iter().map(|t| t.2.as_slice()).collect();
    let now = ms(now_ms);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&gids, &recs, &encoded, &now];
    // One statement: delete the records still as examined, and write the tombstones of
    // exactly those; unforced (durable with the next forced write or sync).
    let (b, n, commit) = futures::join!(
        c.batch_execute("BEGIN; SET LOCAL synchronous_commit = off"),
        c.query_one(
            "WITH gone AS (DELETE FROM treaty_tx t USING unnest($1::text[], $2::bytea[], \
             $3::bytea[]) AS v(gid, rec, tomb) WHERE t.gid = v.gid AND t.rec = v.rec \
             RETURNING v.gid, v.tomb), \
             put AS (INSERT INTO treaty_tombstones (gid, tomb, collected_ms) \
             SELECT gid, tomb, $4 FROM gone ON CONFLICT (gid) DO UPDATE SET \
             tomb = excluded.tomb, collected_ms = excluded.collected_ms RETURNING 1) \
             SELECT count(*) FROM put",
            &params,
        ),
        c.batch_execute("COMMIT"),
    );
    b.map_err(err("collecting ended records"))?;
    let n: i64 = n.map_err(err("collecting ended records"))?.get(0);
    commit.map_err(err("committing the collection of ended records"))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

impl LogStore for PgLog {
    fn log_id(&self) -> &str {
        &self.log_id
    }

    fn put(&self, rec: TxRecord, forced: bool) -> LogFuture<()> {
        if rec.gid.is_empty() {
            // The codec refuses to read such a record back; refuse to write it.
            return futures::future::ready(Err(LogError::Io {
                doing: format!(
                    "writing a record with an empty gid to the log at {}",
                    self.target
                ),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            }))
            .boxed();
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        if forced {
            self.counters.forced_writes.fetch_add(1, Ordering::Relaxed);
        }
        let row = Row::of(&rec);
        self.send(|done| Op::Put { row, forced, done })
    }

    fn get(&self, gid: &str) -> LogFuture<Option<TxRecord>> {
        let gid = gid.to_string();
        self.send(|done| Op::Get { gid, done })
    }

    fn scan_active(&self, after_gid: Option<&str>, limit: usize) -> LogFuture<Vec<TxRecord>> {
        let after = after_gid.map(str::to_string);
        self.send(|done| Op::ScanActive { after, limit, done })
    }

    fn list(&self, filter: &ListFilter, cursor: Option<&str>, limit: usize) -> LogFuture<ListPage> {
        let (filter, cursor) = (filter.clone(), cursor.map(str::to_string));
        self.send(|done| Op::List {
            filter,
            cursor,
            limit,
            done,
        })
    }

    fn collect_ended(&self, before_unix_ms: u64, now_unix_ms: u64, max: usize) -> LogFuture<usize> {
        self.send(|done| Op::CollectEnded {
            before_ms: before_unix_ms,
            now_ms: now_unix_ms,
            max,
            done,
        })
    }

    fn get_tombstone(&self, gid: &str) -> LogFuture<Option<Tombstone>> {
        let gid = gid.to_string();
        self.send(|done| Op::GetTomb { gid, done })
    }

    fn collect_tombstones(&self, before_unix_ms: u64, max: usize) -> LogFuture<usize> {
        self.send(|done| Op::CollectTombs {
            before_ms: before_unix_ms,
            max,
            done,
        })
    }

    fn sync(&self) -> LogFuture<()> {
        self.send(|done| Op::Sync { done })
    }

    fn stats(&self) -> LogStats {
        LogStats {
            writes: self.counters.writes.load(Ordering::Relaxed),
            forced_writes: self.counters.forced_writes.load(Ordering::Relaxed),
            flushes: self.counters.flushes.load(Ordering::Relaxed),
        }
    }

    /// The records live in the database, which outlives a lost connection; and the writer
    /// task answers again only once the backend of the lost connection has ended, so no
    /// write issued before the failure can land after a new runtime has read the log.
    fn recovers_in_process(&self) -> bool {
        true
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn claim(&self, limit: usize) -> LogFuture<Vec<TxRecord>> {
        self.send(|done| Op::Claim { limit, done })
    }

    fn rejoin(&self) -> LogFuture<()> {
        self.send(|done| Op::Join { done })
            .map(|r| r.map(|_| ()))
            .boxed()
    }

    fn leave(&self) -> LogFuture<()> {
        self.send(|done| Op::Leave { done })
    }

    fn nudge(&self, gid: &str) -> LogFuture<bool> {
        let gid = gid.to_string();
        self.send(|done| Op::Nudge { gid, done })
    }

    fn on_nudge(&self, handler: super::NudgeHandler) {
        *self
            .nudges
            .handler
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }
}
