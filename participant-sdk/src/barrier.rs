//! The barrier: exactly-once effects for participant operations (DESIGN.md section 7).
//!
//! Every operation a participant receives may arrive more than once, late, or out of order.
//! The barrier records one row per `(gid, branch_id, operation)` in the user's own sled tree,
//! **in the same sled transaction as the business change**, so the change and its row commit
//! together or not at all.
//!
//! What to do with a delivery is decided by one pure function, [`rules::plan`], from the rows
//! already recorded for its branch; its module docs list the rules. In short: a duplicate
//! repeats the first answer without running business code; an `Abort`/`Compensate` whose
//! `Prepare`/`Execute` never ran is recorded as a no-op and makes the late forward operation
//! `REFUSED`/`FAILED`; a recorded cancel is checked before the forward row; a delivery whose
//! body (fingerprint of handler and payload) or coordinator log differs from the recorded
//! one is another transaction reusing the gid and is refused, never answered from the old
//! row; a phase-two operation that contradicts the recorded state is a protocol violation
//! (business code does not run, an error is logged and the answer is `RETRY`). This module
//! is the sled store that runs those plans.
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
//!
//! Rows, index entries and chunks are checked when read back; a corrupt row is a storage
//! error (answered RETRY), never guessed at. Rows are never deleted by the SDK.
//!
//! # Format v1
//!
//! Rows written by earlier versions (format v1: `1 u8 | answer u8 | flags u8 (bit 0: has
//! payload) | unix_ms u64 BE | handler | message | payload (rest)`) are still decoded: they
//! carry no fingerprint, log id or sequence number (reported as `None`, empty and 0: they
//! were all written before any v2 row), and the rules treat those unknowns as matching, so a
//! participant upgraded in place answers its old branches as before. When a participant is
//! built, [`Barrier::migrate_v1`] rewrites each v1 prepare row that kept a payload as a v2
//! row (fingerprint computed from that payload), and indexes it with its payload chunks if it
//! is still open; a marker then makes later starts skip the scan. Decoding rather than
//! refusing v1 was chosen because refusing would strand every prepared branch of an
//! upgraded participant until an operator intervened.
//!
//! # Concurrency
//!
//! sled 0.34 runs transactions under one process-wide lock, so two deliveries of the same
//! operation are serialized: the second one sees the first one's row. Keep handlers short:
//! they hold that lock.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use crate::participant::{BranchContext, HandlerResult, Refusal};

pub mod rules;

use rules::{Business as Run, Delivery, Fingerprint, InDoubt as IndexChange};

/// Key prefix of every barrier row in the user's tree. Business keys must not start with
/// `0xFF 't'`.
pub const BARRIER_PREFIX: &[u8] = b"\xfftreaty/barrier/";

/// Key prefix of the index of open prepared branches.
const OPEN_PREFIX: &[u8] = b"\xfftreaty/open/";

/// Key prefix of the payload chunks an open branch keeps for a replay.
const REPLAY_PREFIX: &[u8] = b"\xfftreaty/replay/";

/// The row sequence counter.
const SEQ_KEY: &[u8] = b"\xfftreaty/seq";

/// Present (value `2`) once no v1 row needs migrating.
const FORMAT_KEY: &[u8] = b"\xfftreaty/format";

/// Largest chunk of a replay payload: far below sled 0.34's ~128 KiB blob threshold.
pub const REPLAY_CHUNK_BYTES: usize = 32 * 1024;

/// Longest gid the participant accepts (it becomes part of every barrier key). The
/// coordinator's limit is configurable (default 128 bytes); this hard cap only bounds the key
/// layout, and a coordinator must not be configured above it.
pub const GID_BYTES_MAX: usize = 1024;

/// Longest handler name, log id and outcome endpoint accepted: each is stored in rows or
/// index entries, which must stay small.
pub const FIELD_BYTES_MAX: usize = 1024;

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

/// A participant operation, as recorded by the barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// 2PC phase one.
    Prepare,
    /// 2PC phase two, commit.
    Commit,
    /// 2PC phase two, abort.
    Abort,
    /// Saga step.
    Execute,
    /// Saga compensation.
    Compensate,
}

impl Op {
    /// The byte that ends this operation's row keys.
    pub fn key_byte(self) -> u8 {
        match self {
            Op::Prepare => b'P',
            Op::Commit => b'C',
            Op::Abort => b'A',
            Op::Execute => b'E',
            Op::Compensate => b'X',
        }
    }

    /// The operation whose row key ends with `b`, if any.
    pub fn from_key_byte(b: u8) -> Option<Op> {
        Some(match b {
            b'P' => Op::Prepare,
            b'C' => Op::Commit,
            b'A' => Op::Abort,
            b'E' => Op::Execute,
            b'X' => Op::Compensate,
            _ => return None,
        })
    }

    /// Whether `answer` is one this operation can record.
    pub(crate) fn allows(self, answer: Answer) -> bool {
        match self {
            Op::Prepare => matches!(answer, Answer::Prepared | Answer::Refused),
            Op::Execute => matches!(answer, Answer::Succeeded | Answer::Failed),
            Op::Commit | Op::Abort | Op::Compensate => answer == Answer::Done,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Prepare => "prepare",
            Op::Commit => "commit",
            Op::Abort => "abort",
            Op::Execute => "execute",
            Op::Compensate => "compensate",
        })
    }
}

/// The answer recorded for an operation (and repeated to every duplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Answer {
    /// Prepare: durable promise that a later commit succeeds.
    Prepared,
    /// Prepare: business no, or aborted before it arrived (null compensation).
    Refused,
    /// Execute: the step's change is applied.
    Succeeded,
    /// Execute: business failure, or compensated before it arrived (null compensation).
    Failed,
    /// Commit, abort, compensate: finished.
    Done,
}

impl Answer {
    fn code(self) -> u8 {
        match self {
            Answer::Prepared => 1,
            Answer::Refused => 2,
            Answer::Succeeded => 3,
            Answer::Failed => 4,
            Answer::Done => 5,
        }
    }

    fn from_code(c: u8) -> Option<Answer> {
        Some(match c {
            1 => Answer::Prepared,
            2 => Answer::Refused,
            3 => Answer::Succeeded,
            4 => Answer::Failed,
            5 => Answer::Done,
            _ => return None,
        })
    }
}

/// One barrier row, decoded. For tests, checkers and operators.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BarrierRow {
    /// Global transaction id.
    pub gid: String,
    /// Branch index within the transaction.
    pub branch_id: u32,
    /// The operation this row records.
    pub op: Op,
    /// The answer given (and repeated to duplicates).
    pub answer: Answer,
    /// When the row was written, unix milliseconds (wall clock: for humans, not for order).
    pub unix_ms: u64,
    /// Position in the order rows were committed in this tree, from 1, with no gaps between
    /// rows of one transaction; 0 for rows of format v1 (all written before any numbered row).
    /// Two rows compare by `seq` the way their business changes were applied.
    pub seq: u64,
    /// Fingerprint of the delivery's `(handler, payload)`; `None` when unknown (v1 rows, the
    /// forward row written by a null compensation).
    pub fingerprint: Option<Fingerprint>,
    /// Log id of the coordinator that sent the delivery; empty when unknown.
    pub log_id: String,
    /// The handler the delivery was addressed to.
    pub handler: String,
    /// The message answered (a refusal's reason, a null compensation's explanation, ...).
    pub message: String,
}

/// The barrier over one user tree. Cheap to clone.
///
/// The participant uses it internally; tests and checkers use [`Barrier::rows`] and
/// [`Barrier::all_rows`] to see what was recorded. [`Barrier::new`] on the same tree gives a
/// read view from outside a running participant.
#[derive(Debug, Clone)]
pub struct Barrier {
    tree: sled::Tree,
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
    /// [`Barrier::migrate_v1`]). Never written by v2.
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

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

/// A borrowed business closure: the handler method bound to its context and payload.
pub(crate) type Business<'a> = &'a dyn Fn(&TransactionalTree) -> HandlerResult;

/// What the barrier decided for one delivery of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A definitive answer, new or repeated. It is in the tree (not yet necessarily on disk:
    /// the caller syncs before sending it).
    Answer { answer: Answer, message: String },
    /// Nothing was written; the caller should deliver the operation again later (storage
    /// error, unknown handler, a phase-two handler that refused).
    Retry(String),
    /// The operation contradicts the recorded state. Nothing was written, no business code
    /// ran; answered as RETRY. Already logged at error level.
    Violation(String),
}

type TxResult<T> = Result<T, ConflictableTransactionError<Refusal>>;

/// Decodes a row value and checks that its answer fits the operation in its key: data read
/// back from disk is checked before it decides anything.
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

/// An in-doubt branch: prepared, neither committed nor aborted.
#[derive(Debug, Clone)]
pub(crate) struct InDoubt {
    pub(crate) gid: String,
    pub(crate) branch_id: u32,
    pub(crate) handler: String,
    pub(crate) payload: Vec<u8>,
    /// The log that drove the branch; empty when the coordinator sent none.
    pub(crate) log_id: String,
    /// Where to ask for the outcome; empty: the participant's configured coordinator.
    pub(crate) outcome_endpoint: String,
}

impl Barrier {
    /// A barrier over `tree` (the tree the business handlers write to).
    pub fn new(tree: sled::Tree) -> Barrier {
        Barrier { tree }
    }

    /// The tree the rows live in.
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Every row recorded for `gid`, ordered by branch then operation byte.
    ///
    /// # Panics
    ///
    /// On a storage error or a corrupt row: this is meant for tests and checkers, which must
    /// not go on silently. Use [`Barrier::try_rows`] elsewhere.
    pub fn rows(&self, gid: &str) -> Vec<BarrierRow> {
        self.try_rows(gid)
            .unwrap_or_else(|e| panic!("reading barrier rows of {gid}: {e}"))
    }

    /// Every row in the tree, ordered by gid, branch, operation byte (sort by
    /// [`BarrierRow::seq`] for the order they were written in).
    ///
    /// # Panics
    ///
    /// On a storage error or a corrupt row; see [`Barrier::try_all_rows`].
    pub fn all_rows(&self) -> Vec<BarrierRow> {
        self.try_all_rows()
            .unwrap_or_else(|e| panic!("reading barrier rows: {e}"))
    }

    /// Every row recorded for `gid`, or the storage error / corruption met.
    pub fn try_rows(&self, gid: &str) -> Result<Vec<BarrierRow>, sled::Error> {
        self.scan(&gid_prefix(gid))
    }

    /// Every row in the tree, or the storage error / corruption met.
    pub fn try_all_rows(&self) -> Result<Vec<BarrierRow>, sled::Error> {
        self.scan(BARRIER_PREFIX)
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<BarrierRow>, sled::Error> {
        let mut rows = Vec::new();
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item?;
            let (gid, branch_id, op) = parse_key(&k).map_err(|why| corrupt(&k, &why))?;
            let value = decode_row(&k, &v).map_err(|why| corrupt(&k, &why))?;
            rows.push(BarrierRow {
                gid,
                branch_id,
                op,
                answer: value.answer,
                unix_ms: value.unix_ms,
                seq: value.seq,
                fingerprint: value.fingerprint,
                log_id: value.log_id,
                handler: value.handler,
                message: value.message,
            });
        }
        Ok(rows)
    }

    /// Open prepared branches (from the index only, never from the rows) prepared at or
    /// before `prepared_before_unix_ms` (`None`: all of them). A corrupt entry is logged and
    /// skipped: the resolver must not stop on one bad branch; the coordinator still drives
    /// it.
    pub(crate) fn in_doubt(
        &self,
        prepared_before_unix_ms: Option<u64>,
    ) -> Result<Vec<InDoubt>, sled::Error> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(OPEN_PREFIX) {
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
            for chunk in self
                .tree
                .scan_prefix(branch_key(REPLAY_PREFIX, &gid, branch_id))
            {
                payload.extend_from_slice(&chunk?.1);
            }
            if payload.len() != entry.payload_len as usize {
                // Closed between the two reads, or damaged: either way not replayable now.
                tracing::warn!(gid = %gid, branch_id, "in-doubt payload has {} bytes, its entry says {}; skipped this round", payload.len(), entry.payload_len);
                continue;
            }
            out.push(InDoubt {
                gid,
                branch_id,
                handler: entry.handler,
                payload,
                log_id: entry.log_id,
                outcome_endpoint: entry.outcome_endpoint,
            });
        }
        Ok(out)
    }

    /// Rewrites rows of format v1 that kept a payload (prepare rows) as v2 rows, indexing
    /// the branch with its payload chunks if it is still open; then marks the tree so later
    /// calls return at once. Returns how many rows were rewritten. Called when a participant
    /// is built, before it serves.
    pub fn migrate_v1(&self) -> Result<usize, sled::Error> {
        if self.tree.get(FORMAT_KEY)?.is_some() {
            return Ok(0);
        }
        let mut migrated = 0;
        for item in self.tree.scan_prefix(BARRIER_PREFIX) {
            let (k, v) = item?;
            let (gid, branch_id, op) = parse_key(&k).map_err(|why| corrupt(&k, &why))?;
            let row = decode_row(&k, &v).map_err(|why| corrupt(&k, &why))?;
            let Some(payload) = row.v1_payload.clone() else {
                continue;
            };
            let res = self.tree.transaction(|tx| -> TxResult<()> {
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
        self.tree.insert(FORMAT_KEY, &[ROW_FORMAT_V2])?;
        if migrated > 0 {
            tracing::info!(
                rows = migrated,
                "barrier rows migrated from format v1 to v2"
            );
        }
        Ok(migrated)
    }

    /// Runs one delivery of `op` through the barrier: reads the branch's rows, asks
    /// [`rules::plan`], and carries the plan out in one sled transaction with the business
    /// change. `business` is `None` when no handler of the right kind is registered.
    pub(crate) fn deliver(
        &self,
        op: Op,
        ctx: &BranchContext,
        payload: &[u8],
        business: Option<Business<'_>>,
    ) -> Verdict {
        let delivery = Delivery::new(op, &ctx.handler, payload, &ctx.log_id, business.is_some());
        let res = self.tree.transaction(|tx| {
            let plan = rules::plan(&read_rows(tx, ctx, op)?, &delivery);
            if let Run::Run { .. } = plan.business {
                let business = business.expect("the rules run business code only if registered");
                // A refusal aborts the whole transaction (business changes included) and is
                // handled by `after_refusal`.
                business(tx)?;
            }
            let settled = plan.settle(None);
            write_rows(tx, ctx, &settled.writes)?;
            self.change_index(tx, ctx, payload, settled.in_doubt)?;
            Ok(settled.reply)
        });
        match res {
            Ok(reply) => self.verdict(op, ctx, reply),
            Err(TransactionError::Abort(refusal)) => {
                self.after_refusal(op, ctx, payload, &delivery, &refusal)
            }
            Err(TransactionError::Storage(e)) => storage_retry(&op.to_string(), ctx, e),
        }
    }

    /// Applies an index change for the branch of `ctx`.
    fn change_index(
        &self,
        tx: &TransactionalTree,
        ctx: &BranchContext,
        payload: &[u8],
        change: IndexChange,
    ) -> TxResult<()> {
        match change {
            IndexChange::Unchanged => {}
            IndexChange::Open => {
                let entry = OpenEntry {
                    unix_ms: now_unix_ms(),
                    payload_len: u32::try_from(payload.len()).map_err(|_| {
                        ConflictableTransactionError::Abort(Refusal {
                            reason: format!("payload of {} bytes is too large", payload.len()),
                        })
                    })?,
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

    /// After a business refusal (its transaction rolled back with its changes): plans again
    /// in a new transaction, which sees any row written meanwhile, and records the refusal
    /// as the plan says.
    fn after_refusal(
        &self,
        op: Op,
        ctx: &BranchContext,
        payload: &[u8],
        delivery: &Delivery,
        refusal: &Refusal,
    ) -> Verdict {
        let res = self.tree.transaction(|tx| {
            let plan = rules::plan(&read_rows(tx, ctx, op)?, delivery);
            // Still a plan that runs the business code: settle it with the refusal. Otherwise
            // another delivery decided meanwhile: follow its plan, without business code.
            let reason = matches!(plan.business, Run::Run { .. }).then_some(&*refusal.reason);
            let settled = plan.settle(reason);
            write_rows(tx, ctx, &settled.writes)?;
            self.change_index(tx, ctx, payload, settled.in_doubt)?;
            Ok(settled.reply)
        });
        if let Ok(rules::Reply::Retry(_)) = &res {
            tracing::warn!(
                gid = %ctx.gid,
                branch_id = ctx.branch_id,
                handler = %ctx.handler,
                reason = %refusal.reason,
                "{op} handler refused; {op} must eventually succeed, answering RETRY"
            );
        }
        match res {
            Ok(reply) => self.verdict(op, ctx, reply),
            Err(TransactionError::Abort(r)) => Verdict::Retry(format!(
                "recording the {op} refusal failed: {}; retry",
                r.reason
            )),
            Err(TransactionError::Storage(e)) => {
                storage_retry(&format!("recording {op} refusal"), ctx, e)
            }
        }
    }

    fn verdict(&self, op: Op, ctx: &BranchContext, reply: rules::Reply) -> Verdict {
        match reply {
            rules::Reply::Answer { answer, message } => Verdict::Answer { answer, message },
            rules::Reply::Retry(m) => Verdict::Retry(m),
            rules::Reply::Violation(msg) => {
                tracing::error!(
                    gid = %ctx.gid,
                    branch_id = ctx.branch_id,
                    handler = %ctx.handler,
                    log_id = %ctx.log_id,
                    "protocol violation on {op}, business code not run: {msg}"
                );
                Verdict::Violation(format!("protocol violation: {msg}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::participant::refuse;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// A barrier over a fresh tree, and a business closure that counts its runs and writes
    /// `biz/<gid>/<op>` so the test can see whether the change is in the tree.
    struct Fixture {
        _dir: tempfile::TempDir,
        barrier: Barrier,
        runs: Arc<AtomicU32>,
    }

    /// What the business closure does when called.
    #[derive(Clone, Copy, PartialEq)]
    enum Biz {
        Ok,
        Refuse,
        Missing,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("business").unwrap();
        Fixture {
            _dir: dir,
            barrier: Barrier::new(tree),
            runs: Arc::new(AtomicU32::new(0)),
        }
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

    fn biz_key(gid: &str, op: Op) -> Vec<u8> {
        format!("biz/{gid}/{op}").into_bytes()
    }

    impl Fixture {
        fn deliver(&self, gid: &str, op: Op, biz: Biz) -> Verdict {
            let runs = self.runs.clone();
            let key = biz_key(gid, op);
            let f = move |tx: &TransactionalTree| -> HandlerResult {
                runs.fetch_add(1, Ordering::SeqCst);
                tx.insert(key.clone(), b"x".to_vec())?;
                if biz == Biz::Refuse {
                    return Err(refuse("insufficient funds"));
                }
                Ok(())
            };
            let business: Option<Business<'_>> = (biz != Biz::Missing).then_some(&f);
            self.barrier.deliver(op, &ctx(gid), b"payload", business)
        }

        fn has_change(&self, gid: &str, op: Op) -> bool {
            self.barrier.tree.get(biz_key(gid, op)).unwrap().is_some()
        }

        fn rows(&self, gid: &str) -> Vec<(Op, Answer)> {
            let mut r: Vec<_> = self
                .barrier
                .rows(gid)
                .into_iter()
                .map(|r| (r.op, r.answer))
                .collect();
            r.sort();
            r
        }
    }

    /// The short form of a verdict, for tables.
    #[derive(Debug, PartialEq)]
    enum V {
        A(Answer),
        Retry,
        Violation,
    }

    fn short(v: &Verdict) -> V {
        match v {
            Verdict::Answer { answer, .. } => V::A(*answer),
            Verdict::Retry(_) => V::Retry,
            Verdict::Violation(_) => V::Violation,
        }
    }

    use Answer::*;
    use Op::*;

    /// One scenario: deliveries in order, each with its expected verdict; then the expected
    /// number of business runs, the barrier rows, and which business changes are in the tree.
    struct Case {
        name: &'static str,
        steps: &'static [(Op, Biz, V)],
        runs: u32,
        rows: &'static [(Op, Answer)],
        changes: &'static [Op],
    }

    fn check(case: &Case) {
        let f = fixture();
        let gid = "g1";
        for (i, (op, biz, want)) in case.steps.iter().enumerate() {
            let got = f.deliver(gid, *op, *biz);
            assert_eq!(
                &short(&got),
                want,
                "{}: step {i} ({op}): {got:?}",
                case.name
            );
        }
        assert_eq!(
            f.runs.load(Ordering::SeqCst),
            case.runs,
            "{}: business runs",
            case.name
        );
        let mut want_rows = case.rows.to_vec();
        want_rows.sort();
        assert_eq!(f.rows(gid), want_rows, "{}: rows", case.name);
        for op in [Prepare, Commit, Abort, Execute, Compensate] {
            assert_eq!(
                f.has_change(gid, op),
                case.changes.contains(&op),
                "{}: business change of {op}",
                case.name
            );
        }
    }

    #[test]
    fn barrier_rules() {
        use Biz::Ok as Y;
        use Biz::{Missing as M, Refuse as N};
        let cases = [
            Case {
                name: "prepare then commit",
                steps: &[(Prepare, Y, V::A(Prepared)), (Commit, Y, V::A(Done))],
                runs: 2,
                rows: &[(Prepare, Prepared), (Commit, Done)],
                changes: &[Prepare, Commit],
            },
            Case {
                name: "duplicate prepare runs business once",
                steps: &[(Prepare, Y, V::A(Prepared)), (Prepare, Y, V::A(Prepared))],
                runs: 1,
                rows: &[(Prepare, Prepared)],
                changes: &[Prepare],
            },
            Case {
                name: "duplicate commit runs business once",
                steps: &[
                    (Prepare, Y, V::A(Prepared)),
                    (Commit, Y, V::A(Done)),
                    (Commit, Y, V::A(Done)),
                ],
                runs: 2,
                rows: &[(Prepare, Prepared), (Commit, Done)],
                changes: &[Prepare, Commit],
            },
            Case {
                name: "refusal leaves no business change and records REFUSED",
                steps: &[(Prepare, N, V::A(Refused)), (Prepare, Y, V::A(Refused))],
                runs: 1,
                rows: &[(Prepare, Refused)],
                changes: &[],
            },
            Case {
                name: "abort before prepare: null abort, later prepare refused, business never ran",
                steps: &[
                    (Abort, Y, V::A(Done)),
                    (Prepare, Y, V::A(Refused)),
                    (Abort, Y, V::A(Done)),
                ],
                runs: 0,
                rows: &[(Prepare, Refused), (Abort, Done)],
                changes: &[],
            },
            Case {
                name: "abort after refused prepare: no business",
                steps: &[(Prepare, N, V::A(Refused)), (Abort, Y, V::A(Done))],
                runs: 1,
                rows: &[(Prepare, Refused), (Abort, Done)],
                changes: &[],
            },
            Case {
                name: "abort after prepared runs abort once",
                steps: &[
                    (Prepare, Y, V::A(Prepared)),
                    (Abort, Y, V::A(Done)),
                    (Abort, Y, V::A(Done)),
                ],
                runs: 2,
                rows: &[(Prepare, Prepared), (Abort, Done)],
                changes: &[Prepare, Abort],
            },
            Case {
                name: "commit without prepare: violation, no business",
                steps: &[(Commit, Y, V::Violation)],
                runs: 0,
                rows: &[],
                changes: &[],
            },
            Case {
                name: "commit after refused prepare: violation",
                steps: &[(Prepare, N, V::A(Refused)), (Commit, Y, V::Violation)],
                runs: 1,
                rows: &[(Prepare, Refused)],
                changes: &[],
            },
            Case {
                name: "commit after abort: violation",
                steps: &[
                    (Prepare, Y, V::A(Prepared)),
                    (Abort, Y, V::A(Done)),
                    (Commit, Y, V::Violation),
                ],
                runs: 2,
                rows: &[(Prepare, Prepared), (Abort, Done)],
                changes: &[Prepare, Abort],
            },
            Case {
                name: "abort after commit: violation",
                steps: &[
                    (Prepare, Y, V::A(Prepared)),
                    (Commit, Y, V::A(Done)),
                    (Abort, Y, V::Violation),
                ],
                runs: 2,
                rows: &[(Prepare, Prepared), (Commit, Done)],
                changes: &[Prepare, Commit],
            },
            Case {
                name: "commit handler refusing: RETRY, nothing recorded, then succeeds",
                steps: &[
                    (Prepare, Y, V::A(Prepared)),
                    (Commit, N, V::Retry),
                    (Commit, Y, V::A(Done)),
                ],
                runs: 3,
                rows: &[(Prepare, Prepared), (Commit, Done)],
                changes: &[Prepare, Commit],
            },
            Case {
                name: "unknown handler: prepare refused and recorded",
                steps: &[(Prepare, M, V::A(Refused)), (Abort, M, V::A(Done))],
                runs: 0,
                rows: &[(Prepare, Refused), (Abort, Done)],
                changes: &[],
            },
            Case {
                name: "unknown handler at commit time: RETRY until registered",
                steps: &[
                    (Prepare, Y, V::A(Prepared)),
                    (Commit, M, V::Retry),
                    (Commit, Y, V::A(Done)),
                ],
                runs: 2,
                rows: &[(Prepare, Prepared), (Commit, Done)],
                changes: &[Prepare, Commit],
            },
            Case {
                name: "execute then compensate",
                steps: &[
                    (Execute, Y, V::A(Succeeded)),
                    (Compensate, Y, V::A(Done)),
                    (Compensate, Y, V::A(Done)),
                ],
                runs: 2,
                rows: &[(Execute, Succeeded), (Compensate, Done)],
                changes: &[Execute, Compensate],
            },
            Case {
                name: "duplicate execute runs business once",
                steps: &[(Execute, Y, V::A(Succeeded)), (Execute, Y, V::A(Succeeded))],
                runs: 1,
                rows: &[(Execute, Succeeded)],
                changes: &[Execute],
            },
            Case {
                name: "compensate before execute: null compensation, later execute FAILED",
                steps: &[(Compensate, Y, V::A(Done)), (Execute, Y, V::A(Failed))],
                runs: 0,
                rows: &[(Execute, Failed), (Compensate, Done)],
                changes: &[],
            },
            Case {
                name: "failed execute: compensate records only",
                steps: &[(Execute, N, V::A(Failed)), (Compensate, Y, V::A(Done))],
                runs: 1,
                rows: &[(Execute, Failed), (Compensate, Done)],
                changes: &[],
            },
            Case {
                name: "prepare after abort is refused even though a prepare was recorded",
                steps: &[
                    (Prepare, Y, V::A(Prepared)),
                    (Abort, Y, V::A(Done)),
                    (Prepare, Y, V::A(Refused)),
                ],
                runs: 2,
                rows: &[(Prepare, Prepared), (Abort, Done)],
                changes: &[Prepare, Abort],
            },
            Case {
                name: "execute after compensate is failed even though it succeeded before",
                steps: &[
                    (Execute, Y, V::A(Succeeded)),
                    (Compensate, Y, V::A(Done)),
                    (Execute, Y, V::A(Failed)),
                ],
                runs: 2,
                rows: &[(Execute, Succeeded), (Compensate, Done)],
                changes: &[Execute, Compensate],
            },
            Case {
                name: "compensate handler refusing: RETRY",
                steps: &[(Execute, Y, V::A(Succeeded)), (Compensate, N, V::Retry)],
                runs: 2,
                rows: &[(Execute, Succeeded)],
                changes: &[Execute],
            },
        ];
        for case in &cases {
            check(case);
        }
    }

    #[test]
    fn concurrent_duplicate_prepares_apply_once() {
        let f = Arc::new(fixture());
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let f = f.clone();
                std::thread::spawn(move || f.deliver("g", Prepare, Biz::Ok))
            })
            .collect();
        for t in threads {
            assert_eq!(short(&t.join().unwrap()), V::A(Prepared));
        }
        assert_eq!(f.runs.load(Ordering::SeqCst), 1);
        assert_eq!(f.rows("g"), vec![(Prepare, Prepared)]);
    }

    #[test]
    fn rows_of_one_gid_do_not_include_a_longer_gid() {
        let f = fixture();
        f.deliver("g", Prepare, Biz::Ok);
        f.deliver("g2", Execute, Biz::Ok);
        assert_eq!(f.rows("g"), vec![(Prepare, Prepared)]);
        assert_eq!(f.barrier.all_rows().len(), 2);
    }

    #[test]
    fn in_doubt_lists_prepared_unfinished_branches_with_payload() {
        let f = fixture();
        f.deliver("committed", Prepare, Biz::Ok);
        f.deliver("committed", Commit, Biz::Ok);
        f.deliver("refused", Prepare, Biz::Refuse);
        f.deliver("saga", Execute, Biz::Ok);
        f.deliver("doubt", Prepare, Biz::Ok);
        let list = f.barrier.in_doubt(None).unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0].gid, "doubt");
        assert_eq!(list[0].handler, "h");
        assert_eq!(list[0].payload, b"payload");
        // A cutoff before the prepare excludes it.
        assert!(f.barrier.in_doubt(Some(0)).unwrap().is_empty());
    }

    /// Issue 8: the resolver reads only an index of open prepared branches, written with the
    /// prepare row and removed with the commit/abort row.
    #[test]
    fn open_prepared_branches_are_indexed() {
        const OPEN: &[u8] = b"\xfftreaty/open/";
        let f = fixture();
        let open = |f: &Fixture| f.barrier.tree.scan_prefix(OPEN).count();
        f.deliver("a", Prepare, Biz::Ok);
        f.deliver("b", Prepare, Biz::Ok);
        f.deliver("r", Prepare, Biz::Refuse);
        f.deliver("s", Execute, Biz::Ok);
        assert_eq!(open(&f), 2);
        f.deliver("a", Commit, Biz::Ok);
        f.deliver("b", Abort, Biz::Ok);
        assert_eq!(open(&f), 0);
        // A prepared row without an index entry is not looked at by the resolver.
        f.deliver("c", Prepare, Biz::Ok);
        for kv in f.barrier.tree.scan_prefix(OPEN) {
            f.barrier.tree.remove(kv.unwrap().0).unwrap();
        }
        assert!(f.barrier.in_doubt(None).unwrap().is_empty());
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

    /// An upgraded participant: its open v1 prepared branch is indexed (with the payload
    /// for replay) and its prepare row loses the payload; duplicates are answered as before.
    #[test]
    fn migrate_v1_indexes_open_branches_and_drops_payloads() {
        let f = fixture();
        let t = &f.barrier.tree;
        let big = vec![7u8; 100_000];
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
        assert_eq!(f.barrier.migrate_v1().unwrap(), 2);
        assert_eq!(
            f.barrier.migrate_v1().unwrap(),
            0,
            "second start: marker set"
        );
        let open = f.barrier.in_doubt(None).unwrap();
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(
            (open[0].gid.as_str(), open[0].payload.len()),
            ("open", big.len())
        );
        assert!(t
            .iter()
            .all(|kv| kv.unwrap().1.len() <= STORED_VALUE_BYTES_MAX));
        // The migrated row kept its fingerprint: the same body is a duplicate, another is not.
        let same = f.barrier.deliver(Prepare, &ctx("open"), &big, None);
        assert_eq!(short(&same), V::A(Prepared));
        let other = f.barrier.deliver(Prepare, &ctx("open"), b"other", None);
        assert_eq!(short(&other), V::A(Refused));
        // The v1 execute row (no payload, no fingerprint) still answers duplicates.
        assert_eq!(short(&f.deliver("saga", Execute, Biz::Ok)), V::A(Succeeded));
        assert_eq!(f.runs.load(Ordering::SeqCst), 0);
    }

    /// Issue 8: rows carry a per-tree sequence number in commit order, so a checker can
    /// tell the order compensations were applied in.
    #[test]
    fn rows_are_numbered_in_commit_order() {
        let f = fixture();
        f.deliver("s", Execute, Biz::Ok); // 1
        f.deliver("t", Execute, Biz::Ok); // 2
        f.deliver("t", Compensate, Biz::Ok); // 3
        f.deliver("t", Compensate, Biz::Ok); // duplicate: no row
        f.deliver("s", Compensate, Biz::Ok); // 4
        f.deliver("n", Compensate, Biz::Ok); // null: execute 5, compensate 6
        let seq = |gid: &str, op: Op| {
            f.barrier
                .rows(gid)
                .into_iter()
                .find(|r| r.op == op)
                .unwrap()
                .seq
        };
        assert_eq!(seq("s", Execute), 1);
        assert_eq!(seq("t", Execute), 2);
        assert_eq!(seq("t", Compensate), 3);
        assert_eq!(seq("s", Compensate), 4);
        assert_eq!((seq("n", Execute), seq("n", Compensate)), (5, 6));
        // Reopened, the counter goes on.
        let again = Barrier::new(f.barrier.tree.clone());
        let c = ctx("u");
        again.deliver(Compensate, &c, b"", None);
        assert_eq!(seq("u", Compensate), 8);
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

    #[test]
    fn every_op_accepts_only_its_answers() {
        assert!(Prepare.allows(Prepared) && !Prepare.allows(Done));
        assert!(Compensate.allows(Done) && !Compensate.allows(Failed));
    }
}
