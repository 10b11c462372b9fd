//! The sled barrier store, the embedded default: [`SledStore`].
//!
//! One value holds everything the participant needs from sled: the database, the tree the
//! handlers write to (business keys and barrier rows side by side), and the group-commit
//! fsync ([`treaty_durable::SledSync`]) that makes every barrier row durable before its
//! answer is sent (sled's own `flush` is not a full fsync). Open it with
//! [`SledStore::open`] (a [`sled::Config`], so every sled option stays yours) or
//! [`SledStore::open_dir`].
//!
//! # Handlers on sled
//!
//! A handler receives [`Txn<'_, SledStore>`](crate::Txn), which dereferences to a
//! [`SledTx`] and from there to sled's [`TransactionalTree`]: `tx.get(..)`, `tx.insert(..)`,
//! `tx.remove(..)`, with `?` turning sled's errors into [`HandlerError::Retry`] (a conflict
//! makes sled re-run the transaction, handler included).
//!
//! Handlers are async (the same traits serve every store), but sled transactions are
//! synchronous closures that sled may run more than once. The store therefore runs each
//! delivery on a blocking thread, inside `Tree::transaction`, and drives the handler's future
//! to completion there with a trivial executor: polled until ready, and polled again only if
//! it woke itself (a yield). A sled handle does no I/O, so a handler that only uses it is
//! ready at once. A handler that waits on anything else (a timer, the network) would hold
//! sled's process-wide transaction lock while it waits; it is not waited for: its writes are
//! rolled back and the delivery is answered RETRY, saying so. A handler panic is caught
//! inside the closure (the transaction is rolled back) and answered RETRY naming the panic.
//!
//! # Storage layout
//!
//! Everything lives under keys starting with `0xFF "treaty/"`: **business keys must not
//! start with the bytes `0xFF 't'`**.
//!
//! - Rows, under [`BARRIER_PREFIX`] (`0xFF "treaty/barrier/"`): the key is
//!   `prefix ++ gid ++ 0x00 ++ branch_id (u32 BE) ++ op` where `op` is one byte (`P`repare,
//!   `C`ommit, `A`bort, `E`xecute, compensate `X`), so the rows of one branch are adjacent.
//!   The value, format v2: `2 u8 | answer u8 | flags u8 (bit 0: has fingerprint) | seq u64 BE
//!   | unix_ms u64 BE | [fingerprint 16 bytes] | handler | message | log_id |
//!   outcome_endpoint`, each string as `len u16 BE ++ utf-8`. Rows keep no payload.
//! - The row sequence counter, `0xFF "treaty/seq"` (u64 BE): every row written takes the
//!   next number ([`BarrierRow::seq`]), in the same transaction, so the order of the numbers
//!   is the order in which the rows (and the business changes with them) were committed. A
//!   checker reads the order of compensations from it.
//! - The index of open prepared branches, under `0xFF "treaty/open/"`: key
//!   `gid ++ 0x00 ++ branch_id (u32 BE)`, value `1 u8 | unix_ms u64 BE | payload_len u32 BE |
//!   handler | log_id | outcome_endpoint`. Written in the same transaction as a `PREPARED`
//!   row, removed in the same transaction as the commit/abort row. The in-doubt resolver
//!   reads only this range.
//! - The payload an open branch needs for a replay, under `0xFF "treaty/replay/"`: key
//!   `gid ++ 0x00 ++ branch_id (u32 BE) ++ chunk index (u32 BE)`, in chunks of at most
//!   [`REPLAY_CHUNK_BYTES`], removed with the index entry. sled 0.34 stores values above
//!   about 128 KiB as separate blob files with weaker crash recovery; chunking keeps every
//!   value the barrier writes below 33 KiB, whatever the payload size.
//! - `0xFF "treaty/format"`: `2` once the tree holds no v1 row that still needs migrating.
//! - The markers of swept gids (see *Retention* below), under `0xFF "treaty/swept/"`: key
//!   `gid`, value `1 u8 | swept_unix_ms u64 BE | log_id`; and by time for their expiry,
//!   under `0xFF "treaty/swept-at/"`: key `swept_unix_ms u64 BE ++ gid`, empty value.
//!
//! Rows, index entries and chunks are checked when read back; a corrupt row is a storage
//! error (answered RETRY), never guessed at.
//!
//! # Retention
//!
//! Rows are deleted only by [`BarrierStore::sweep_gid`], which the participant's sweep calls
//! for a gid its coordinator says is finished (see [`crate::retention`]
//! for the whole argument): first a marker is written (every delivery reads it before the
//! rows and, finding it, follows [`rules::plan_swept`] and writes nothing, so no row can
//! appear from then on); then the gid's rows are read again and, if they are exactly the
//! ones the participant judged, deleted in a second transaction; otherwise the marker is
//! removed again. A crash between the two leaves rows and marker, which the next round
//! finishes. Markers expire through [`BarrierStore::expire_swept`].
//!
//! # Format v1
//!
//! Rows written by earlier versions (format v1: `1 u8 | answer u8 | flags u8 (bit 0: has
//! payload) | unix_ms u64 BE | handler | message | payload (rest)`) are still decoded: they
//! carry no fingerprint, log id or sequence number (reported as `None`, empty and 0: they
//! were all written before any v2 row), and the rules treat those unknowns as matching, so a
//! participant upgraded in place answers its old branches as before. When the store is
//! opened, [`SledStore::migrate_v1`] rewrites each v1 prepare row that kept a payload as a
//! v2 row (fingerprint computed from that payload), and indexes it with its payload chunks if
//! it is still open; a marker then makes later starts skip the scan. Decoding rather than
//! refusing v1 was chosen because refusing would strand every prepared branch of an
//! upgraded participant until an operator intervened.
//!
//! # Concurrency
//!
//! sled 0.34 runs transactions under one process-wide lock, so two deliveries of the same
//! operation are serialized: the second one sees the first one's row. Keep handlers short:
//! they hold that lock.

use std::future::Future;
use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use treaty_durable::SledSync;

use crate::barrier::rules::{self, Business as Run, Delivery, Fingerprint, InDoubt as IndexChange};
use crate::barrier::{
    now_unix_ms, Answer, BarrierRow, InDoubt, Op, Swept, Verdict, FIELD_BYTES_MAX,
};
use crate::error::{chain, HandlerError, StoreError};
use crate::participant::BranchContext;
use crate::store::{panic_message, BarrierStore, HandlerCall, SweepPage, Txn};

/// Key prefix of every barrier row in the user's tree. Business keys must not start with
/// `0xFF 't'`.
pub const BARRIER_PREFIX: &[u8] = b"\xfftreaty/barrier/";

/// Key prefix of the index of open prepared branches.
const OPEN_PREFIX: &[u8] = b"\xfftreaty/open/";

/// Key prefix of the payload chunks an open branch keeps for a replay.
const REPLAY_PREFIX: &[u8] = b"\xfftreaty/replay/";

/// Key prefix of the markers of swept gids: `prefix ++ gid`.
const SWEPT_PREFIX: &[u8] = b"\xfftreaty/swept/";

/// Key prefix of the markers by time, for expiry: `prefix ++ swept_unix_ms (u64 BE) ++ gid`.
const SWEPT_AT_PREFIX: &[u8] = b"\xfftreaty/swept-at/";

/// The format byte of markers.
const SWEPT_FORMAT_V1: u8 = 1;

/// The row sequence counter.
const SEQ_KEY: &[u8] = b"\xfftreaty/seq";

/// Present (value `2`) once no v1 row needs migrating.
const FORMAT_KEY: &[u8] = b"\xfftreaty/format";

/// Largest chunk of a replay payload: far below sled 0.34's ~128 KiB blob threshold.
pub const REPLAY_CHUNK_BYTES: usize = 32 * 1024;

/// Largest value the barrier ever writes (checked before every write): a chunk plus slack.
const STORED_VALUE_BYTES_MAX: usize = REPLAY_CHUNK_BYTES + 1024;

/// The format byte of rows written now.
const ROW_FORMAT_V2: u8 = 2;
/// The format byte of rows written by earlier versions (still decoded).
const ROW_FORMAT_V1: u8 = 1;
/// The format byte of index entries.
const OPEN_FORMAT_V1: u8 = 1;

/// Messages stored in rows are cut to this many bytes (they are for humans).
const ROW_MESSAGE_BYTES_MAX: usize = 1024;

/// How many times the trivial executor polls a handler future that keeps waking itself
/// (yields) before giving up on it: a bound, not a budget any real handler needs.
const HANDLER_POLLS_MAX: usize = 1024;

/// The sled barrier store: a sled database, the tree handlers write to, and the fsync that
/// makes their transactions durable (see the module docs). Cheap to clone (shared).
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<SledInner>,
}

struct SledInner {
    db: sled::Db,
    tree: sled::Tree,
    sync: SledSync,
    /// Set (never cleared) once a sync failed: see [`BarrierStore::failure`].
    failure: Mutex<Option<String>>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("tree", &String::from_utf8_lossy(&self.inner.tree.name()))
            .finish()
    }
}

/// A handler's handle on the sled store: the delivery's sled transaction. Dereferences to
/// [`TransactionalTree`] (`get`, `insert`, `remove`; `?` on their errors gives a
/// [`HandlerError`]).
pub struct SledTx<'t> {
    tree: &'t TransactionalTree,
}

impl Deref for SledTx<'_> {
    type Target = TransactionalTree;
    fn deref(&self) -> &TransactionalTree {
        self.tree
    }
}

/// `?` on a sled transaction operation in a handler. A conflict reaches sled again (which
/// re-runs the transaction, handler included); a storage error is answered RETRY.
impl From<UnabortableTransactionError> for HandlerError {
    fn from(e: UnabortableTransactionError) -> Self {
        HandlerError::Retry(Box::new(e))
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::new("sled", e)
    }
}

/// A row's value, as stored (see the module docs for the layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowValue {
    pub(crate) answer: Answer,
    pub(crate) seq: u64,
    pub(crate) unix_ms: u64,
    pub(crate) fingerprint: Option<Fingerprint>,
    pub(crate) handler: String,
    pub(crate) message: String,
    pub(crate) log_id: String,
    pub(crate) outcome_endpoint: String,
    /// Only in v1 prepare rows: the payload kept for replay (migrated away by
    /// [`SledStore::migrate_v1`]). Never written by v2.
    pub(crate) v1_payload: Option<Vec<u8>>,
}

impl RowValue {
    fn encode(&self) -> Vec<u8> {
        debug_assert!(self.v1_payload.is_none(), "v2 rows keep no payload");
        let mut out = Vec::with_capacity(64 + self.handler.len() + self.message.len());
        out.push(ROW_FORMAT_V2);
        out.push(self.answer.code());
        out.push(u8::from(self.fingerprint.is_some()));
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.unix_ms.to_be_bytes());
        if let Some(fp) = self.fingerprint {
            out.extend_from_slice(&fp.0);
        }
        put_str(&mut out, truncate(&self.handler, FIELD_BYTES_MAX));
        put_str(&mut out, truncate(&self.message, ROW_MESSAGE_BYTES_MAX));
        put_str(&mut out, truncate(&self.log_id, FIELD_BYTES_MAX));
        put_str(&mut out, truncate(&self.outcome_endpoint, FIELD_BYTES_MAX));
        out
    }

    fn decode(bytes: &[u8]) -> Result<RowValue, String> {
        let mut r = Reader(bytes);
        let format = r.u8()?;
        if format == ROW_FORMAT_V1 {
            return RowValue::decode_v1(r);
        }
        if format != ROW_FORMAT_V2 {
            return Err(format!("unknown row format {format}"));
        }
        let answer = r.u8()?;
        let answer = Answer::from_code(answer).ok_or(format!("unknown answer code {answer}"))?;
        let flags = r.u8()?;
        if flags & !1 != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let seq = r.u64()?;
        let unix_ms = r.u64()?;
        let fingerprint = if flags & 1 == 1 {
            Some(Fingerprint(r.take(16)?.try_into().expect("16 bytes")))
        } else {
            None
        };
        let row = RowValue {
            answer,
            seq,
            unix_ms,
            fingerprint,
            handler: r.string()?,
            message: r.string()?,
            log_id: r.string()?,
            outcome_endpoint: r.string()?,
            v1_payload: None,
        };
        r.end()?;
        Ok(row)
    }

    fn decode_v1(mut r: Reader<'_>) -> Result<RowValue, String> {
        let answer = r.u8()?;
        let answer = Answer::from_code(answer).ok_or(format!("unknown answer code {answer}"))?;
        let flags = r.u8()?;
        if flags & !1 != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let unix_ms = r.u64()?;
        let handler = r.string()?;
        let message = r.string()?;
        let v1_payload = if flags & 1 == 1 {
            Some(std::mem::take(&mut r.0).to_vec())
        } else {
            r.end()?;
            None
        };
        Ok(RowValue {
            answer,
            seq: 0,
            unix_ms,
            fingerprint: None,
            handler,
            message,
            log_id: String::new(),
            outcome_endpoint: String::new(),
            v1_payload,
        })
    }

    fn recorded(&self, op: Op) -> rules::Recorded {
        rules::Recorded {
            op,
            answer: self.answer,
            fingerprint: self.fingerprint,
            log_id: self.log_id.clone(),
            message: self.message.clone(),
        }
    }
}

/// An index entry of an open prepared branch (see the module docs for the layout).
#[derive(Debug, Clone, PartialEq, Eq)]
struct OpenEntry {
    unix_ms: u64,
    payload_len: u32,
    handler: String,
    log_id: String,
    outcome_endpoint: String,
}

impl OpenEntry {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.handler.len() + self.outcome_endpoint.len());
        out.push(OPEN_FORMAT_V1);
        out.extend_from_slice(&self.unix_ms.to_be_bytes());
        out.extend_from_slice(&self.payload_len.to_be_bytes());
        put_str(&mut out, truncate(&self.handler, FIELD_BYTES_MAX));
        put_str(&mut out, truncate(&self.log_id, FIELD_BYTES_MAX));
        put_str(&mut out, truncate(&self.outcome_endpoint, FIELD_BYTES_MAX));
        out
    }

    fn decode(bytes: &[u8]) -> Result<OpenEntry, String> {
        let mut r = Reader(bytes);
        let format = r.u8()?;
        if format != OPEN_FORMAT_V1 {
            return Err(format!("unknown index entry format {format}"));
        }
        let unix_ms = r.u64()?;
        let payload_len = u32::from_be_bytes(r.take(4)?.try_into().expect("4 bytes"));
        let e = OpenEntry {
            unix_ms,
            payload_len,
            handler: r.string()?,
            log_id: r.string()?,
            outcome_endpoint: r.string()?,
        };
        r.end()?;
        Ok(e)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= u16::MAX as usize);
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated: wanted {n} more bytes, {} left",
                self.0.len()
            ));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|e| format!("bad utf-8: {e}"))
    }

    fn end(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes", self.0.len()))
        }
    }
}

/// Cuts `s` to at most `max` bytes on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `prefix ++ gid ++ 0x00 ++ branch_id (u32 BE)`.
fn branch_key(prefix: &[u8], gid: &str, branch_id: u32) -> Vec<u8> {
    debug_assert!(
        !gid.is_empty() && !gid.contains('\0'),
        "gid checked at the edge"
    );
    let mut k = Vec::with_capacity(prefix.len() + gid.len() + 10);
    k.extend_from_slice(prefix);
    k.extend_from_slice(gid.as_bytes());
    k.push(0);
    k.extend_from_slice(&branch_id.to_be_bytes());
    k
}

/// The key of the row for `(gid, branch_id, op)`.
pub(crate) fn row_key(gid: &str, branch_id: u32, op: Op) -> Vec<u8> {
    let mut k = branch_key(BARRIER_PREFIX, gid, branch_id);
    k.push(op.key_byte());
    k
}

fn open_key(gid: &str, branch_id: u32) -> Vec<u8> {
    branch_key(OPEN_PREFIX, gid, branch_id)
}

fn chunk_key(gid: &str, branch_id: u32, index: u32) -> Vec<u8> {
    let mut k = branch_key(REPLAY_PREFIX, gid, branch_id);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The prefix shared by every row of `gid`.
fn gid_prefix(gid: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(BARRIER_PREFIX.len() + gid.len() + 1);
    k.extend_from_slice(BARRIER_PREFIX);
    k.extend_from_slice(gid.as_bytes());
    k.push(0);
    k
}

/// Splits `prefix ++ gid ++ 0x00 ++ branch_id (u32 BE) ++ rest` (rest of `rest_len` bytes)
/// into `(gid, branch_id, rest)`.
fn parse_branch_key<'a>(
    prefix: &[u8],
    key: &'a [u8],
    rest_len: usize,
) -> Result<(String, u32, &'a [u8]), String> {
    let body = key.strip_prefix(prefix).ok_or("missing prefix")?;
    // gid (at least 1 byte) ++ 0x00 ++ branch_id (4) ++ rest
    if body.len() < 6 + rest_len {
        return Err(format!(
            "key too short ({} bytes after the prefix)",
            body.len()
        ));
    }
    let (head, tail) = body.split_at(body.len() - 5 - rest_len);
    if tail[0] != 0 {
        return Err("missing gid terminator".to_string());
    }
    let branch_id = u32::from_be_bytes(tail[1..5].try_into().expect("4 bytes"));
    let gid = String::from_utf8(head.to_vec()).map_err(|e| format!("gid is not utf-8: {e}"))?;
    Ok((gid, branch_id, &tail[5..]))
}

/// Splits a row key into `(gid, branch_id, op)`.
fn parse_key(key: &[u8]) -> Result<(String, u32, Op), String> {
    let (gid, branch_id, rest) = parse_branch_key(BARRIER_PREFIX, key, 1)?;
    let op = Op::from_key_byte(rest[0]).ok_or(format!("unknown op byte {:#x}", rest[0]))?;
    Ok((gid, branch_id, op))
}

fn key_for_humans(key: &[u8]) -> String {
    String::from_utf8_lossy(key.strip_prefix(b"\xfftreaty/").unwrap_or(key)).into_owned()
}

/// Why a sled transaction closure stopped (its writes rolled back).
#[derive(Debug)]
enum Stop {
    /// The handler refused (a business "no").
    Refused(String),
    /// The handler asked for a retry, or waited on something other than the store.
    Retry(String),
    /// The handler panicked.
    Panicked(String),
}

type TxResult<T> = Result<T, ConflictableTransactionError<Stop>>;
/// Decodes a row value and checks that its answer fits the operation in its key: data read
/// back from disk is checked before it decides anything.
/// The public row of a decoded key and value.
fn row_of(gid: String, branch_id: u32, op: Op, value: RowValue) -> BarrierRow {
    BarrierRow::new(
        gid,
        branch_id,
        op,
        value.answer,
        value.unix_ms,
        value.seq,
        value.fingerprint,
        value.log_id,
        value.handler,
        value.message,
    )
    .with_outcome_endpoint(value.outcome_endpoint)
}

fn decode_row(key: &[u8], value: &[u8]) -> Result<RowValue, String> {
    let row = RowValue::decode(value)?;
    let op = key
        .last()
        .and_then(|b| Op::from_key_byte(*b))
        .ok_or("unknown op byte")?;
    if !op.allows(row.answer) {
        return Err(format!("answer {:?} is impossible for {op}", row.answer));
    }
    Ok(row)
}

fn corrupt(key: &[u8], why: &str) -> sled::Error {
    sled::Error::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("corrupt barrier data at {:?}: {why}", key_for_humans(key)),
    ))
}

fn tx_corrupt<T>(key: &[u8], why: &str) -> TxResult<T> {
    Err(ConflictableTransactionError::Storage(corrupt(key, why)))
}

/// Checks the size of a value before it goes to disk (see [`STORED_VALUE_BYTES_MAX`]).
fn checked(key: &[u8], value: Vec<u8>) -> TxResult<Vec<u8>> {
    if value.len() > STORED_VALUE_BYTES_MAX {
        return tx_corrupt(
            key,
            &format!(
                "refusing to store a {} byte value (limit {STORED_VALUE_BYTES_MAX})",
                value.len()
            ),
        );
    }
    Ok(value)
}

/// The rows recorded for the branch of `ctx` that `op` belongs to (2PC: prepare, commit,
/// abort; saga: execute, compensate).
fn read_rows(
    tx: &TransactionalTree,
    ctx: &BranchContext,
    op: Op,
) -> TxResult<Vec<rules::Recorded>> {
    let ops: &[Op] = match op {
        Op::Prepare | Op::Commit | Op::Abort => &[Op::Prepare, Op::Commit, Op::Abort],
        Op::Execute | Op::Compensate => &[Op::Execute, Op::Compensate],
    };
    let mut rows = Vec::with_capacity(ops.len());
    for op in ops {
        let key = row_key(&ctx.gid, ctx.branch_id, *op);
        if let Some(v) = tx.get(&key)? {
            match decode_row(&key, &v) {
                Ok(row) => rows.push(row.recorded(*op)),
                Err(why) => return tx_corrupt(&key, &why),
            }
        }
    }
    Ok(rows)
}

/// The plan for a delivery: from the gid's marker if it was swept (checked first: from the
/// marker on, no row of the gid is written), else from the branch's rows.
fn plan_for(
    tx: &TransactionalTree,
    ctx: &BranchContext,
    op: Op,
    delivery: &Delivery,
) -> TxResult<rules::Plan> {
    let key = swept_key(&ctx.gid);
    if let Some(v) = tx.get(&key)? {
        return match SweptValue::decode(&v) {
            Ok(m) => Ok(rules::plan_swept(&m.log_id, delivery)),
            Err(why) => tx_corrupt(&key, &why),
        };
    }
    Ok(rules::plan(&read_rows(tx, ctx, op)?, delivery))
}

/// A marker's value, as stored (see the module docs for the layout).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SweptValue {
    swept_unix_ms: u64,
    log_id: String,
}

impl SweptValue {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.log_id.len());
        out.push(SWEPT_FORMAT_V1);
        out.extend_from_slice(&self.swept_unix_ms.to_be_bytes());
        put_str(&mut out, truncate(&self.log_id, FIELD_BYTES_MAX));
        out
    }

    fn decode(bytes: &[u8]) -> Result<SweptValue, String> {
        let mut r = Reader(bytes);
        let format = r.u8()?;
        if format != SWEPT_FORMAT_V1 {
            return Err(format!("unknown swept marker format {format}"));
        }
        let v = SweptValue {
            swept_unix_ms: r.u64()?,
            log_id: r.string()?,
        };
        r.end()?;
        Ok(v)
    }
}

fn swept_key(gid: &str) -> Vec<u8> {
    [SWEPT_PREFIX, gid.as_bytes()].concat()
}

fn swept_at_key(swept_unix_ms: u64, gid: &str) -> Vec<u8> {
    [
        SWEPT_AT_PREFIX,
        &swept_unix_ms.to_be_bytes(),
        gid.as_bytes(),
    ]
    .concat()
}

/// Writes `rows` with the next sequence numbers, in order.
fn write_rows(tx: &TransactionalTree, ctx: &BranchContext, rows: &[rules::Write]) -> TxResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut seq = match tx.get(SEQ_KEY)? {
        None => 0,
        Some(v) => match <[u8; 8]>::try_from(v.as_ref()) {
            Ok(b) => u64::from_be_bytes(b),
            Err(_) => return tx_corrupt(SEQ_KEY, &format!("{} bytes, not 8", v.len())),
        },
    };
    let unix_ms = now_unix_ms();
    for w in rows {
        seq += 1;
        let key = row_key(&ctx.gid, ctx.branch_id, w.op);
        let row = RowValue {
            answer: w.answer,
            seq,
            unix_ms,
            fingerprint: w.fingerprint,
            handler: ctx.handler.clone(),
            message: w.message.clone(),
            log_id: ctx.log_id.clone(),
            outcome_endpoint: ctx.outcome_endpoint.clone(),
            v1_payload: None,
        };
        let value = checked(&key, row.encode())?;
        tx.insert(key, value)?;
    }
    tx.insert(SEQ_KEY, &seq.to_be_bytes())?;
    Ok(())
}

/// Adds the branch to the index of open prepared branches, with its payload in chunks.
fn open_branch(
    tx: &TransactionalTree,
    gid: &str,
    branch_id: u32,
    entry: &OpenEntry,
    payload: &[u8],
) -> TxResult<()> {
    assert_eq!(
        entry.payload_len as usize,
        payload.len(),
        "entry describes the payload"
    );
    let key = open_key(gid, branch_id);
    let value = checked(&key, entry.encode())?;
    tx.insert(key, value)?;
    for (i, chunk) in payload.chunks(REPLAY_CHUNK_BYTES).enumerate() {
        tx.insert(chunk_key(gid, branch_id, i as u32), chunk)?;
    }
    Ok(())
}

/// Removes the branch from the index, with its chunks (chunks are removed until the first
/// missing one, so a corrupt entry cannot keep its chunks alive or block the close).
fn close_branch(tx: &TransactionalTree, gid: &str, branch_id: u32) -> TxResult<()> {
    if tx.remove(open_key(gid, branch_id))?.is_none() {
        return Ok(());
    }
    let mut i = 0u32;
    while tx.remove(chunk_key(gid, branch_id, i))?.is_some() {
        i += 1;
    }
    Ok(())
}

fn storage_retry(what: &str, ctx: &BranchContext, e: sled::Error) -> Verdict {
    tracing::error!(gid = %ctx.gid, branch_id = ctx.branch_id, error = %e, "barrier storage error during {what}");
    Verdict::Retry(format!(
        "storage error during {what}: {e}; will succeed on retry once storage recovers"
    ))
}

/// Records that the task polled by [`poll_to_end`] woke itself.
struct WokenFlag(AtomicBool);

impl Wake for WokenFlag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// The trivial executor: polls `fut` until it is ready, polling again only when it woke
/// itself during the poll (a yield), at most [`HANDLER_POLLS_MAX`] times. `None`: it is
/// waiting on something else, which a sled handler must not do (see the module docs).
fn poll_to_end<F: Future>(fut: F) -> Option<F::Output> {
    let flag = Arc::new(WokenFlag(AtomicBool::new(false)));
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    for _ in 0..HANDLER_POLLS_MAX {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
        if !flag.0.swap(false, Ordering::SeqCst) {
            return None;
        }
    }
    None
}

/// Runs the handler inside the sled transaction `tx` (see the module docs).
fn run_handler(
    call: &HandlerCall<SledStore>,
    ctx: &BranchContext,
    tx: &TransactionalTree,
    payload: &[u8],
) -> TxResult<()> {
    let op = call.op();
    let mut handle = Txn::new(SledTx { tree: tx });
    let ran = catch_unwind(AssertUnwindSafe(|| {
        poll_to_end(call.run(ctx, &mut handle, payload))
    }));
    match ran {
        Ok(Some(Ok(()))) => Ok(()),
        Ok(Some(Err(HandlerError::Refuse(reason)))) => {
            Err(ConflictableTransactionError::Abort(Stop::Refused(reason)))
        }
        Ok(Some(Err(HandlerError::Retry(e)))) => {
            match e.downcast::<UnabortableTransactionError>() {
                // sled's own error, raised with `?`: a conflict is sled's to retry.
                Ok(sled_error) => Err((*sled_error).into()),
                Err(e) => Err(ConflictableTransactionError::Abort(Stop::Retry(format!(
                    "{op} handler asked for a retry: {}",
                    chain(&*e)
                )))),
            }
        }
        Ok(None) => Err(ConflictableTransactionError::Abort(Stop::Retry(format!(
            "{op} handler waited on something other than the sled store (a timer, the network, \
             another task); sled handlers must complete without waiting, as they hold sled's \
             transaction lock: its writes were rolled back"
        )))),
        Err(panic) => Err(ConflictableTransactionError::Abort(Stop::Panicked(
            panic_message(&*panic),
        ))),
    }
}

impl SledStore {
    /// Opens (or creates) the sled database `config` describes and the tree `tree` in it,
    /// migrates barrier rows of format v1, and starts the group-commit fsync thread on the
    /// database's directory (`config.path`). Handlers write to `tree`; its keys starting with
    /// `0xFF 't'` are reserved for the barrier.
    pub fn open(config: sled::Config, tree: &str) -> Result<SledStore, StoreError> {
        let dir = config.path.clone();
        let what = |doing: &str| format!("{doing} the sled store at {}", dir.display());
        let db = config
            .open()
            .map_err(|e| StoreError::new(what("opening"), e))?;
        let tree = db
            .open_tree(tree)
            .map_err(|e| StoreError::new(what(&format!("opening tree {tree:?} of")), e))?;
        let sync = SledSync::new(db.clone(), &dir)
            .map_err(|e| StoreError::new(what("starting the fsync thread of"), e))?;
        let store = SledStore {
            inner: Arc::new(SledInner {
                db,
                tree,
                sync,
                failure: Mutex::new(None),
            }),
        };
        // Before serving: branches prepared by an older SDK must be in the in-doubt index.
        // No sync needed: the migration answers nobody, and sled persists its log in order,
        // so the first answer synced later makes it durable too; lost in a crash before that,
        // it runs again at the next start.
        store
            .migrate_v1()
            .map_err(|e| StoreError::new(what("migrating barrier rows of"), e))?;
        Ok(store)
    }

    /// [`SledStore::open`] with sled's default configuration at `dir`.
    pub fn open_dir(dir: impl AsRef<Path>, tree: &str) -> Result<SledStore, StoreError> {
        SledStore::open(sled::Config::new().path(dir.as_ref()), tree)
    }

    /// The sled database (to open other trees, flush, ...).
    pub fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// The tree handlers write to, with the barrier rows (to read business data).
    pub fn tree(&self) -> &sled::Tree {
        &self.inner.tree
    }

    /// The fsync this store makes its deliveries durable with (to make other writes to the
    /// database durable the same way, sharing its group commit).
    pub fn sync(&self) -> &SledSync {
        &self.inner.sync
    }

    /// Every row recorded for `gid`, read now (synchronous; see [`BarrierStore::rows`]).
    pub fn try_rows(&self, gid: &str) -> Result<Vec<BarrierRow>, StoreError> {
        self.scan(&gid_prefix(gid))
            .map_err(|e| StoreError::new(format!("reading the barrier rows of {gid}"), e))
    }

    /// Every row in the tree, read now (synchronous; see [`BarrierStore::all_rows`]).
    pub fn try_all_rows(&self) -> Result<Vec<BarrierRow>, StoreError> {
        self.scan(BARRIER_PREFIX)
            .map_err(|e| StoreError::new("reading the barrier rows", e))
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<BarrierRow>, sled::Error> {
        let mut rows = Vec::new();
        for item in self.inner.tree.scan_prefix(prefix) {
            let (k, v) = item?;
            let (gid, branch_id, op) = parse_key(&k).map_err(|why| corrupt(&k, &why))?;
            let value = decode_row(&k, &v).map_err(|why| corrupt(&k, &why))?;
            rows.push(row_of(gid, branch_id, op, value));
        }
        Ok(rows)
    }

    /// Open prepared branches, read now (synchronous; see [`BarrierStore::in_doubt`]).
    fn in_doubt_now(
        &self,
        prepared_before_unix_ms: Option<u64>,
    ) -> Result<Vec<InDoubt>, sled::Error> {
        let tree = &self.inner.tree;
        let mut out = Vec::new();
        for item in tree.scan_prefix(OPEN_PREFIX) {
            let (k, v) = item?;
            let parsed = parse_branch_key(OPEN_PREFIX, &k, 0)
                .and_then(|(gid, b, _)| Ok((gid, b, OpenEntry::decode(&v)?)));
            let (gid, branch_id, entry) = match parsed {
                Ok(p) => p,
                Err(why) => {
                    tracing::error!(key = %key_for_humans(&k), "skipping corrupt in-doubt index entry: {why}");
                    continue;
                }
            };
            if prepared_before_unix_ms.is_some_and(|c| entry.unix_ms > c) {
                continue;
            }
            let mut payload = Vec::with_capacity(entry.payload_len as usize);
            for chunk in tree.scan_prefix(branch_key(REPLAY_PREFIX, &gid, branch_id)) {
                payload.extend_from_slice(&chunk?.1);
            }
            if payload.len() != entry.payload_len as usize {
                // Closed between the two reads, or damaged: either way not replayable now.
                tracing::warn!(gid = %gid, branch_id, "in-doubt payload has {} bytes, its entry says {}; skipped this round", payload.len(), entry.payload_len);
                continue;
            }
            out.push(InDoubt::new(
                gid,
                branch_id,
                entry.handler,
                payload,
                entry.log_id,
                entry.outcome_endpoint,
                entry.unix_ms,
            ));
        }
        Ok(out)
    }

    /// Rewrites rows of format v1 that kept a payload (prepare rows) as v2 rows, indexing
    /// the branch with its payload chunks if it is still open; then marks the tree so later
    /// calls return at once. Returns how many rows were rewritten. [`SledStore::open`] calls
    /// it, before anything is served.
    pub fn migrate_v1(&self) -> Result<usize, sled::Error> {
        let tree = &self.inner.tree;
        if tree.get(FORMAT_KEY)?.is_some() {
            return Ok(0);
        }
        let mut migrated = 0;
        for item in tree.scan_prefix(BARRIER_PREFIX) {
            let (k, v) = item?;
            let (gid, branch_id, op) = parse_key(&k).map_err(|why| corrupt(&k, &why))?;
            let row = decode_row(&k, &v).map_err(|why| corrupt(&k, &why))?;
            let Some(payload) = row.v1_payload.clone() else {
                continue;
            };
            let res = tree.transaction(|tx| -> TxResult<()> {
                let open = row.answer == Answer::Prepared
                    && tx.get(row_key(&gid, branch_id, Op::Commit))?.is_none()
                    && tx.get(row_key(&gid, branch_id, Op::Abort))?.is_none();
                let rewritten = RowValue {
                    fingerprint: Some(Fingerprint::of(&row.handler, &payload)),
                    v1_payload: None,
                    ..row.clone()
                };
                tx.insert(&*k, checked(&k, rewritten.encode())?)?;
                if open && op == Op::Prepare {
                    let entry = OpenEntry {
                        unix_ms: row.unix_ms,
                        payload_len: payload.len() as u32,
                        handler: row.handler.clone(),
                        log_id: String::new(),
                        outcome_endpoint: String::new(),
                    };
                    open_branch(tx, &gid, branch_id, &entry, &payload)?;
                }
                Ok(())
            });
            res.map_err(|e| match e {
                TransactionError::Abort(r) => unreachable!("no abort in migration: {r:?}"),
                TransactionError::Storage(e) => e,
            })?;
            migrated += 1;
        }
        tree.insert(FORMAT_KEY, &[ROW_FORMAT_V2])?;
        if migrated > 0 {
            tracing::info!(
                rows = migrated,
                "barrier rows migrated from format v1 to v2"
            );
        }
        Ok(migrated)
    }

    /// Runs one delivery of `op` through the barrier, synchronously (on a blocking thread):
    /// reads the branch's rows, asks [`rules::plan`], and carries the plan out in one sled
    /// transaction with the business change. Not yet durable: [`BarrierStore::deliver`]
    /// syncs.
    fn deliver_now(
        &self,
        op: Op,
        ctx: &BranchContext,
        payload: &[u8],
        handler: Option<&HandlerCall<SledStore>>,
    ) -> Verdict {
        let delivery = Delivery::new(op, &ctx.handler, payload, &ctx.log_id, handler.is_some());
        let res = self.inner.tree.transaction(|tx| {
            let plan = plan_for(tx, ctx, op, &delivery)?;
            crate::metrics::barrier_decided(plan.rule);
            if let Run::Run { .. } = plan.business {
                let call = handler.expect("the rules run business code only if registered");
                // A refusal aborts the whole transaction (business changes included) and is
                // handled by `after_refusal`.
                run_handler(call, ctx, tx, payload)?;
            }
            let settled = plan.settle(None);
            write_rows(tx, ctx, &settled.writes)?;
            change_index(tx, ctx, payload, settled.in_doubt)?;
            Ok(settled.reply)
        });
        match res {
            Ok(reply) => verdict(op, ctx, reply),
            Err(TransactionError::Abort(Stop::Refused(reason))) => {
                self.after_refusal(op, ctx, payload, &delivery, &reason)
            }
            Err(TransactionError::Abort(Stop::Retry(msg))) => {
                tracing::warn!(gid = %ctx.gid, branch_id = ctx.branch_id, handler = %ctx.handler, "{msg}; answering RETRY");
                Verdict::Retry(msg)
            }
            Err(TransactionError::Abort(Stop::Panicked(msg))) => {
                tracing::error!(gid = %ctx.gid, branch_id = ctx.branch_id, handler = %ctx.handler, "{op} handler panicked: {msg}; its writes were rolled back, answering RETRY");
                Verdict::Retry(format!("{op} handler panicked: {msg}"))
            }
            Err(TransactionError::Storage(e)) => storage_retry(&op.to_string(), ctx, e),
        }
    }

    /// After a business refusal (its transaction rolled back with its changes): plans again
    /// in a new transaction, which sees any row written meanwhile, and records the refusal
    /// as the plan says.
    fn after_refusal(
        &self,
        op: Op,
        ctx: &BranchContext,
        payload: &[u8],
        delivery: &Delivery,
        reason: &str,
    ) -> Verdict {
        let res = self.inner.tree.transaction(|tx| {
            let plan = plan_for(tx, ctx, op, delivery)?;
            // Still a plan that runs the business code: settle it with the refusal. Otherwise
            // another delivery decided meanwhile: follow its plan, without business code.
            let refusal = matches!(plan.business, Run::Run { .. }).then_some(reason);
            let settled = plan.settle(refusal);
            write_rows(tx, ctx, &settled.writes)?;
            change_index(tx, ctx, payload, settled.in_doubt)?;
            Ok(settled.reply)
        });
        if let Ok(rules::Reply::Retry(_)) = &res {
            tracing::warn!(
                gid = %ctx.gid,
                branch_id = ctx.branch_id,
                handler = %ctx.handler,
                reason = %reason,
                "{op} handler refused; {op} must eventually succeed, answering RETRY"
            );
        }
        match res {
            Ok(reply) => verdict(op, ctx, reply),
            Err(TransactionError::Abort(stop)) => Verdict::Retry(format!(
                "recording the {op} refusal failed: {stop:?}; retry"
            )),
            Err(TransactionError::Storage(e)) => {
                storage_retry(&format!("recording {op} refusal"), ctx, e)
            }
        }
    }

    /// A page of rows of whole gids after `after_gid` (see [`BarrierStore::sweep_page`]).
    pub fn try_sweep_page(
        &self,
        after_gid: Option<&str>,
        rows_max: usize,
    ) -> Result<SweepPage, StoreError> {
        let start = match after_gid {
            // Every key of `after` is `after ++ 0x00 ++ ..`, below `after ++ 0x01`.
            Some(after) => [BARRIER_PREFIX, after.as_bytes(), &[1]].concat(),
            None => BARRIER_PREFIX.to_vec(),
        };
        let mut rows: Vec<BarrierRow> = Vec::new();
        let what = |e| StoreError::new("reading a page of barrier rows to sweep", e);
        for item in self.inner.tree.range(start..) {
            let (k, v) = item.map_err(what)?;
            if !k.starts_with(BARRIER_PREFIX) {
                break;
            }
            let (gid, branch_id, op) = parse_key(&k).map_err(|why| what(corrupt(&k, &why)))?;
            if rows.len() >= rows_max.max(1) && rows.last().is_some_and(|r| r.gid != gid) {
                let next = rows.last().map(|r| r.gid.clone());
                return Ok(SweepPage::new(rows, next));
            }
            let value = decode_row(&k, &v).map_err(|why| what(corrupt(&k, &why)))?;
            rows.push(row_of(gid, branch_id, op, value));
        }
        Ok(SweepPage::new(rows, None))
    }

    /// Replaces the rows of `marker.gid` by the marker, if they are still `expected` (see
    /// [`BarrierStore::sweep_gid`] and the module docs).
    pub fn try_sweep_gid(
        &self,
        expected: &[BarrierRow],
        marker: &Swept,
    ) -> Result<bool, StoreError> {
        let gid = marker.gid.as_str();
        let what = |e| StoreError::new(format!("sweeping the barrier rows of {gid}"), e);
        if expected.iter().any(|r| r.gid != gid) || gid.is_empty() {
            return Ok(false);
        }
        let tree = &self.inner.tree;
        let value = SweptValue {
            swept_unix_ms: marker.swept_unix_ms,
            log_id: marker.log_id.clone(),
        };
        // 1. The marker, if the rows judged are all still there as they were.
        let marked = tree.transaction(|tx| -> TxResult<bool> {
            for r in expected {
                let key = row_key(gid, r.branch_id, r.op);
                match tx.get(&key)? {
                    Some(v) => match decode_row(&key, &v) {
                        Ok(row) if row.seq == r.seq => {}
                        Ok(_) => return Ok(false),
                        Err(why) => return tx_corrupt(&key, &why),
                    },
                    None => return Ok(false),
                }
            }
            let key = swept_key(gid);
            if let Some(old) = tx.get(&key)? {
                // Left by a crash between the two steps: keep its time index right.
                match SweptValue::decode(&old) {
                    Ok(o) => {
                        tx.remove(swept_at_key(o.swept_unix_ms, gid))?;
                    }
                    Err(why) => return tx_corrupt(&key, &why),
                }
            }
            tx.insert(key, value.encode())?;
            tx.insert(swept_at_key(value.swept_unix_ms, gid), &[])?;
            Ok(true)
        });
        if !marked.map_err(|e| what(tx_storage(e)))? {
            return Ok(false);
        }
        // 2. No row of the gid can be written now: read them again, delete or undo.
        let now = self.scan(&gid_prefix(gid)).map_err(what)?;
        let same = now.len() == expected.len()
            && now.iter().all(|n| {
                expected
                    .iter()
                    .any(|e| (e.branch_id, e.op, e.seq) == (n.branch_id, n.op, n.seq))
            });
        let done = tree.transaction(|tx| -> TxResult<()> {
            if same {
                for r in &now {
                    tx.remove(row_key(gid, r.branch_id, r.op))?;
                }
            } else {
                tx.remove(swept_key(gid))?;
                tx.remove(swept_at_key(value.swept_unix_ms, gid))?;
            }
            Ok(())
        });
        done.map_err(|e| what(tx_storage(e)))?;
        Ok(same)
    }

    /// Deletes at most `max` markers swept before `swept_before_unix_ms`, oldest first.
    pub fn try_expire_swept(
        &self,
        swept_before_unix_ms: u64,
        max: usize,
    ) -> Result<usize, StoreError> {
        let what = |e| StoreError::new("expiring swept markers", e);
        let tree = &self.inner.tree;
        let end = [SWEPT_AT_PREFIX, &swept_before_unix_ms.to_be_bytes()].concat();
        let mut expired = 0;
        for item in tree.range(SWEPT_AT_PREFIX.to_vec()..end).take(max) {
            let (k, _) = item.map_err(what)?;
            let body = &k[SWEPT_AT_PREFIX.len()..];
            if body.len() < 9 {
                return Err(what(corrupt(&k, "marker time key too short")));
            }
            let gid = String::from_utf8(body[8..].to_vec())
                .map_err(|e| what(corrupt(&k, &format!("gid is not utf-8: {e}"))))?;
            let key = swept_key(&gid);
            tree.transaction(|tx| -> TxResult<()> {
                tx.remove(&*k)?;
                // The marker itself only if this entry is its (a later sweep of a reused
                // gid rewrote both).
                if let Some(v) = tx.get(&key)? {
                    match SweptValue::decode(&v) {
                        Ok(m) if swept_at_key(m.swept_unix_ms, &gid) == *k => {
                            tx.remove(&*key)?;
                        }
                        Ok(_) => {}
                        Err(why) => return tx_corrupt(&key, &why),
                    }
                }
                Ok(())
            })
            .map_err(|e| what(tx_storage(e)))?;
            expired += 1;
        }
        Ok(expired)
    }

    /// The marker of `gid`, read now (see [`BarrierStore::swept`]).
    pub fn try_swept(&self, gid: &str) -> Result<Option<Swept>, StoreError> {
        let key = swept_key(gid);
        let what = |e| StoreError::new(format!("reading the swept marker of {gid}"), e);
        match self.inner.tree.get(&key).map_err(what)? {
            None => Ok(None),
            Some(v) => {
                let m = SweptValue::decode(&v).map_err(|why| what(corrupt(&key, &why)))?;
                Ok(Some(Swept::new(gid.to_string(), m.log_id, m.swept_unix_ms)))
            }
        }
    }

    /// Records the first sync failure (see [`BarrierStore::failure`]).
    fn fail(&self, why: String) {
        let mut f = self.inner.failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(why);
    }
}

/// The storage error of a transaction that never aborts on its own.
fn tx_storage(e: TransactionError<Stop>) -> sled::Error {
    match e {
        TransactionError::Storage(e) => e,
        TransactionError::Abort(stop) => unreachable!("no abort in this transaction: {stop:?}"),
    }
}

fn verdict(op: Op, ctx: &BranchContext, reply: rules::Reply) -> Verdict {
    Verdict::from_reply(op, &ctx.gid, ctx.branch_id, &ctx.handler, reply)
}

/// Applies an index change for the branch of `ctx`.
fn change_index(
    tx: &TransactionalTree,
    ctx: &BranchContext,
    payload: &[u8],
    change: IndexChange,
) -> TxResult<()> {
    match change {
        IndexChange::Unchanged => {}
        IndexChange::Open => {
            let Ok(payload_len) = u32::try_from(payload.len()) else {
                return Err(ConflictableTransactionError::Abort(Stop::Retry(format!(
                    "payload of {} bytes is too large to keep for a replay",
                    payload.len()
                ))));
            };
            let entry = OpenEntry {
                unix_ms: now_unix_ms(),
                payload_len,
                handler: ctx.handler.clone(),
                log_id: ctx.log_id.clone(),
                outcome_endpoint: ctx.outcome_endpoint.clone(),
            };
            open_branch(tx, &ctx.gid, ctx.branch_id, &entry, payload)?;
        }
        IndexChange::Close => close_branch(tx, &ctx.gid, ctx.branch_id)?,
    }
    Ok(())
}

impl BarrierStore for SledStore {
    type Tx<'t> = SledTx<'t>;

    async fn deliver(
        &self,
        op: Op,
        ctx: BranchContext,
        payload: Bytes,
        handler: Option<HandlerCall<Self>>,
    ) -> Verdict {
        let me = self.clone();
        let (gid, branch_id) = (ctx.gid.clone(), ctx.branch_id);
        let blocking = move || me.deliver_now(op, &ctx, &payload, handler.as_ref());
        let verdict = match tokio::task::spawn_blocking(blocking).await {
            Ok(v) => v,
            // Handler panics are caught inside; this is a panic of the store itself (or the
            // runtime shutting down). Nothing was committed.
            Err(e) => {
                tracing::error!(gid = %gid, branch_id, "{op} delivery panicked in the sled store: {e}");
                return Verdict::Retry(format!("{op} delivery panicked in the sled store: {e}"));
            }
        };
        if let Verdict::Answer { answer, .. } = &verdict {
            // Also for a repeated answer: its first delivery may still be waiting for its
            // sync, and this one must not overtake it.
            if let Err(e) = self.inner.sync.sync().await {
                tracing::error!(gid = %gid, branch_id, error = %e, "making the barrier row durable failed");
                // Any sync error is fatal (the sync is poisoned): nothing this process
                // answers can be vouched for any more.
                self.fail(format!("a barrier row could not be made durable: {e}"));
                return Verdict::Retry(format!(
                    "{op} recorded {answer:?} but it could not be made durable: {e}; retry"
                ));
            }
        }
        verdict
    }

    async fn rows(&self, gid: &str) -> Result<Vec<BarrierRow>, StoreError> {
        let (me, gid) = (self.clone(), gid.to_string());
        tokio::task::spawn_blocking(move || me.try_rows(&gid))
            .await
            .map_err(|e| StoreError::new("reading barrier rows", e))?
    }

    async fn all_rows(&self) -> Result<Vec<BarrierRow>, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.try_all_rows())
            .await
            .map_err(|e| StoreError::new("reading barrier rows", e))?
    }

    async fn in_doubt(
        &self,
        prepared_before_unix_ms: Option<u64>,
    ) -> Result<Vec<InDoubt>, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.in_doubt_now(prepared_before_unix_ms))
            .await
            .map_err(|e| StoreError::new("reading the in-doubt index", e))?
            .map_err(|e| StoreError::new("reading the in-doubt index", e))
    }

    fn sweeps(&self) -> bool {
        true
    }

    async fn sweep_page(
        &self,
        after_gid: Option<String>,
        rows_max: usize,
    ) -> Result<SweepPage, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.try_sweep_page(after_gid.as_deref(), rows_max))
            .await
            .map_err(|e| StoreError::new("reading a page of barrier rows to sweep", e))?
    }

    async fn sweep_gid(
        &self,
        expected: Vec<BarrierRow>,
        marker: Swept,
    ) -> Result<bool, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.try_sweep_gid(&expected, &marker))
            .await
            .map_err(|e| StoreError::new("sweeping barrier rows", e))?
    }

    async fn expire_swept(
        &self,
        swept_before_unix_ms: u64,
        max: usize,
    ) -> Result<usize, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.try_expire_swept(swept_before_unix_ms, max))
            .await
            .map_err(|e| StoreError::new("expiring swept markers", e))?
    }

    async fn swept(&self, gid: &str) -> Result<Option<Swept>, StoreError> {
        let (me, gid) = (self.clone(), gid.to_string());
        tokio::task::spawn_blocking(move || me.try_swept(&gid))
            .await
            .map_err(|e| StoreError::new("reading a swept marker", e))?
    }

    fn failure(&self) -> Option<String> {
        self.inner
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::participant::Registered;
    use crate::store::conformance::{self, Harness};
    use crate::{HandlerResult, Saga};
    use Answer::*;
    use Op::*;

    /// Runs the conformance suite on fresh sled stores, each in its own directory.
    struct SledHarness {
        dirs: Mutex<Vec<tempfile::TempDir>>,
    }

    impl Harness for SledHarness {
        type Store = SledStore;

        async fn open(&self) -> SledStore {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = SledStore::open_dir(dir.path(), "business").expect("open the store");
            self.dirs.lock().expect("dirs").push(dir);
            store
        }

        async fn write_mark<'a, 't>(tx: &'a mut Txn<'t, SledStore>, key: &'a str) -> HandlerResult {
            tx.insert(key.as_bytes(), b"x".as_slice())?;
            Ok(())
        }

        async fn has_mark(store: &SledStore, key: &str) -> bool {
            store.tree().get(key).expect("read").is_some()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sled_store_passes_the_barrier_store_conformance_suite() {
        conformance::run_all(&SledHarness {
            dirs: Mutex::new(Vec::new()),
        })
        .await;
    }

    fn store() -> (tempfile::TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open_dir(dir.path(), "business").unwrap();
        (dir, store)
    }

    fn ctx(gid: &str) -> BranchContext {
        BranchContext {
            gid: gid.to_string(),
            branch_id: 0,
            attempt: 1,
            deadline_unix_ms: 0,
            handler: "h".to_string(),
            log_id: String::new(),
            outcome_endpoint: String::new(),
        }
    }

    /// A 2PC handler whose every method succeeds without writing.
    fn noop(op: Op) -> Option<HandlerCall<SledStore>> {
        let h = crate::TwoPhase::<SledStore>::new()
            .prepare(async |_, _, _| Ok(()))
            .commit(async |_, _, _| Ok(()))
            .abort(async |_, _, _| Ok(()));
        HandlerCall::new(op, Registered::two_phase(h))
    }

    /// Issue 8: the resolver reads only an index of open prepared branches, written with the
    /// prepare row and removed with the commit/abort row.
    #[test]
    fn open_prepared_branches_are_indexed() {
        let (_dir, s) = store();
        let open = |s: &SledStore| s.tree().scan_prefix(OPEN_PREFIX).count();
        for gid in ["a", "b"] {
            s.deliver_now(Prepare, &ctx(gid), b"p", noop(Prepare).as_ref());
        }
        s.deliver_now(Execute, &ctx("s"), b"p", None);
        assert_eq!(open(&s), 2);
        s.deliver_now(Commit, &ctx("a"), b"p", noop(Commit).as_ref());
        s.deliver_now(Abort, &ctx("b"), b"p", noop(Abort).as_ref());
        assert_eq!(open(&s), 0);
        // A prepared row without an index entry is not looked at by the resolver.
        s.deliver_now(Prepare, &ctx("c"), b"p", noop(Prepare).as_ref());
        for kv in s.tree().scan_prefix(OPEN_PREFIX) {
            s.tree().remove(kv.unwrap().0).unwrap();
        }
        assert!(s.in_doubt_now(None).unwrap().is_empty());
    }

    /// Rows are numbered in the tree: a reopened store goes on from the last number.
    #[test]
    fn row_numbers_go_on_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open_dir(dir.path(), "business").unwrap();
        s.deliver_now(Compensate, &ctx("n"), b"", None); // null: execute 1, compensate 2
        drop(s);
        let s = SledStore::open_dir(dir.path(), "business").unwrap();
        s.deliver_now(Compensate, &ctx("u"), b"", None);
        let seqs: Vec<_> = s.try_rows("u").unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            [3, 4],
            "execute then compensate, after 1 and 2: {seqs:?}"
        );
    }

    /// A saga handler that runs `execute` and does nothing on compensate.
    fn saga_call<F>(execute: F) -> Option<HandlerCall<SledStore>>
    where
        F: AsyncFn(&BranchContext, &mut Txn<'_, SledStore>, &[u8]) -> HandlerResult
            + Send
            + Sync
            + 'static,
    {
        let h = Saga::<SledStore>::new()
            .execute(execute)
            .compensate(async |_, _, _| Ok(()));
        HandlerCall::new(Execute, Registered::saga(h))
    }

    /// A sled handler must not wait on anything but its handle (it holds sled's transaction
    /// lock): one that does is answered RETRY, saying so, with its writes rolled back.
    #[test]
    fn a_handler_waiting_on_something_else_is_answered_retry() {
        let (_dir, s) = store();
        let call = saga_call(async |_, tx, _| {
            tx.insert(b"biz", b"x".as_slice())?;
            std::future::pending::<()>().await;
            Ok(())
        });
        let v = s.deliver_now(Execute, &ctx("w"), b"p", call.as_ref());
        match v {
            Verdict::Retry(m) => assert!(m.contains("waited on something other"), "{m}"),
            other => panic!("expected RETRY: {other:?}"),
        }
        assert!(s.tree().get(b"biz").unwrap().is_none(), "rolled back");
        assert!(s.try_rows("w").unwrap().is_empty());
    }

    /// A future that returns Pending once, waking itself first (like a yield).
    struct YieldOnce(bool);

    impl Future for YieldOnce {
        type Output = ();
        fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// A handler that yields (wakes itself) is polled again and completes.
    #[test]
    fn a_handler_that_yields_completes() {
        let (_dir, s) = store();
        let call = saga_call(async |_, tx, _| {
            YieldOnce(false).await;
            tx.insert(b"biz", b"x".as_slice())?;
            Ok(())
        });
        let v = s.deliver_now(Execute, &ctx("y"), b"p", call.as_ref());
        assert!(
            matches!(
                v,
                Verdict::Answer {
                    answer: Succeeded,
                    ..
                }
            ),
            "{v:?}"
        );
        assert!(s.tree().get(b"biz").unwrap().is_some());
    }

    /// `?` on a sled error inside a handler: a storage error is answered RETRY.
    #[test]
    fn sled_errors_raised_with_question_mark_become_retry() {
        let e: HandlerError = UnabortableTransactionError::Storage(sled::Error::Io(
            std::io::Error::other("disk on fire"),
        ))
        .into();
        assert!(e.to_string().contains("disk on fire"), "{e}");
        let (_dir, s) = store();
        let call = saga_call(async |_, _, _| {
            Err(UnabortableTransactionError::Storage(sled::Error::Io(
                std::io::Error::other("disk on fire"),
            )))?;
            Ok(())
        });
        let v = s.deliver_now(Execute, &ctx("e"), b"p", call.as_ref());
        match v {
            Verdict::Retry(m) => assert!(m.contains("disk on fire"), "{m}"),
            other => panic!("expected RETRY: {other:?}"),
        }
    }

    fn row(answer: Answer, message: &str, fingerprint: Option<Fingerprint>) -> RowValue {
        RowValue {
            answer,
            seq: 7,
            unix_ms: 1_700_000_000_000,
            fingerprint,
            handler: "transfer".into(),
            message: message.into(),
            log_id: "0190c6a4-log".into(),
            outcome_endpoint: "http://c:7700".into(),
            v1_payload: None,
        }
    }

    #[test]
    fn row_value_round_trips_and_rejects_garbage() {
        let v = row(Prepared, &"é".repeat(600), Some(Fingerprint::of("h", b"p")));
        let back = RowValue::decode(&v.encode()).unwrap();
        assert!(back.message.len() <= ROW_MESSAGE_BYTES_MAX);
        assert_eq!(
            back,
            RowValue {
                message: back.message.clone(),
                ..v
            }
        );
        let none = row(Done, "", None);
        assert_eq!(RowValue::decode(&none.encode()).unwrap(), none);
        assert!(RowValue::decode(&[]).is_err());
        assert!(RowValue::decode(&[9, 1, 0]).is_err());
        let mut trailing = none.encode();
        trailing.push(1);
        assert!(RowValue::decode(&trailing).is_err());
    }

    /// A v1 value, as the SDK before format v2 wrote it.
    fn v1_value(answer: Answer, handler: &str, message: &str, payload: Option<&[u8]>) -> Vec<u8> {
        let mut out = vec![1, answer.code(), u8::from(payload.is_some())];
        out.extend_from_slice(&1_600_000_000_000u64.to_be_bytes());
        put_str(&mut out, handler);
        put_str(&mut out, message);
        out.extend_from_slice(payload.unwrap_or_default());
        out
    }

    #[test]
    fn v1_rows_still_decode_with_unknown_identity() {
        let v = RowValue::decode(&v1_value(Prepared, "h", "", Some(b"pay"))).unwrap();
        assert_eq!((v.answer, v.seq, v.fingerprint), (Prepared, 0, None));
        assert_eq!(v.v1_payload.as_deref(), Some(&b"pay"[..]));
        assert!(v.log_id.is_empty());
        let done = RowValue::decode(&v1_value(Done, "h", "m", None)).unwrap();
        assert_eq!((done.answer, done.message.as_str()), (Done, "m"));
        let mut trailing = v1_value(Done, "h", "", None);
        trailing.push(0);
        assert!(RowValue::decode(&trailing).is_err());
    }

    /// An upgraded participant: opening the store indexes its open v1 prepared branch (with
    /// the payload for replay) and drops the payload from its prepare row; duplicates are
    /// answered as before.
    #[test]
    fn open_migrates_v1_rows_indexes_open_branches_and_drops_payloads() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![7u8; 100_000];
        {
            let db = sled::open(dir.path()).unwrap();
            let t = db.open_tree("business").unwrap();
            t.insert(
                row_key("open", 0, Prepare),
                v1_value(Prepared, "h", "", Some(&big)),
            )
            .unwrap();
            t.insert(
                row_key("done", 0, Prepare),
                v1_value(Prepared, "h", "", Some(b"x")),
            )
            .unwrap();
            t.insert(row_key("done", 0, Commit), v1_value(Done, "h", "", None))
                .unwrap();
            t.insert(
                row_key("saga", 0, Execute),
                v1_value(Succeeded, "h", "", None),
            )
            .unwrap();
            db.flush().unwrap();
        }
        let s = SledStore::open_dir(dir.path(), "business").unwrap();
        assert_eq!(s.migrate_v1().unwrap(), 0, "migrated at open: marker set");
        let open = s.in_doubt_now(None).unwrap();
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(
            (open[0].gid.as_str(), open[0].payload.len()),
            ("open", big.len())
        );
        assert!(s
            .tree()
            .iter()
            .all(|kv| kv.unwrap().1.len() <= STORED_VALUE_BYTES_MAX));
        // The migrated row kept its fingerprint: the same body is a duplicate, another is not.
        let same = s.deliver_now(Prepare, &ctx("open"), &big, None);
        assert!(
            matches!(
                same,
                Verdict::Answer {
                    answer: Prepared,
                    ..
                }
            ),
            "{same:?}"
        );
        let other = s.deliver_now(Prepare, &ctx("open"), b"other", None);
        assert!(
            matches!(
                other,
                Verdict::Answer {
                    answer: Refused,
                    ..
                }
            ),
            "{other:?}"
        );
        // The v1 execute row (no payload, no fingerprint) still answers duplicates.
        let saga = s.deliver_now(Execute, &ctx("saga"), b"payload", None);
        assert!(
            matches!(
                saga,
                Verdict::Answer {
                    answer: Succeeded,
                    ..
                }
            ),
            "{saga:?}"
        );
    }

    #[test]
    fn key_round_trips() {
        let k = row_key("a:b.c-1", 0x0102_0304, Compensate);
        assert_eq!(
            parse_key(&k).unwrap(),
            ("a:b.c-1".to_string(), 0x0102_0304, Compensate)
        );
        assert!(parse_key(b"\xfftreaty/barrier/x").is_err());
    }
}
