//! The barrier: exactly-once effects for participant operations (DESIGN.md section 7).
//!
//! Every operation a participant receives may arrive more than once, late, or out of order.
//! The barrier records one row per `(gid, branch_id, operation)` in the user's own sled tree,
//! **in the same sled transaction as the business change**, so the change and its row commit
//! together or not at all. From those rows:
//!
//! - a duplicate of an operation already applied returns its first answer, and the business
//!   code does not run again;
//! - an `Abort`/`Compensate` whose `Prepare`/`Execute` never ran records that the forward
//!   operation was refused (null compensation), answers `DONE`, and makes the late
//!   `Prepare`/`Execute` answer `REFUSED`/`FAILED` (no hanging);
//! - a phase-two operation that contradicts the recorded state (commit without a successful
//!   prepare, commit after abort) is a protocol violation: business code does not run, an
//!   error is logged and the answer is `RETRY`.
//!
//! # Storage layout
//!
//! Rows live under the reserved key prefix [`BARRIER_PREFIX`] (`0xFF "treaty/barrier/"`):
//! **business keys must not start with the bytes `0xFF 't'`**. A row's key is
//! `prefix ++ gid ++ 0x00 ++ branch_id (u32 big-endian) ++ op` where `op` is one byte
//! (`P`repare, `C`ommit, `A`bort, `E`xecute, compensate `X`), so the rows of one branch are
//! adjacent. The value is hand-packed, format v1: `1 u8 | answer u8 | flags u8 (bit 0: has
//! payload) | unix_ms u64 BE | handler_len u16 BE | handler | message_len u16 BE | message |
//! payload (rest)`. Prepare rows keep the payload, so the in-doubt resolver can replay
//! commit/abort without the coordinator. Rows are checked when read back (format, answer
//! allowed for the operation); a corrupt row is a storage error (answered RETRY), never
//! guessed at.
//!
//! Rows are never deleted by the SDK.
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

/// Key prefix of every barrier row in the user's tree. Business keys must not start with
/// `0xFF 't'`.
pub const BARRIER_PREFIX: &[u8] = b"\xfftreaty/barrier/";

/// The format byte written first in every row value.
const ROW_FORMAT_V1: u8 = 1;

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
    fn allows(self, answer: Answer) -> bool {
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
pub struct BarrierRow {
    /// Global transaction id.
    pub gid: String,
    /// Branch index within the transaction.
    pub branch_id: u32,
    /// The operation this row records.
    pub op: Op,
    /// The answer given (and repeated to duplicates).
    pub answer: Answer,
    /// When the row was written, unix milliseconds.
    pub unix_ms: u64,
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

/// A row's value, as stored.
///
/// Layout (v1): `format u8 = 1 | answer u8 | flags u8 (bit 0: has payload) | unix_ms u64 BE |
/// handler_len u16 BE | handler | message_len u16 BE | message | payload (rest)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RowValue {
    pub(crate) answer: Answer,
    pub(crate) unix_ms: u64,
    pub(crate) handler: String,
    pub(crate) message: String,
    pub(crate) payload: Option<Vec<u8>>,
}

impl RowValue {
    fn new(answer: Answer, handler: &str, message: &str, payload: Option<&[u8]>) -> RowValue {
        RowValue {
            answer,
            unix_ms: now_unix_ms(),
            handler: handler.to_string(),
            message: truncate(message, ROW_MESSAGE_BYTES_MAX).to_string(),
            payload: payload.map(<[u8]>::to_vec),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let handler = truncate(&self.handler, u16::MAX as usize);
        let message = truncate(&self.message, ROW_MESSAGE_BYTES_MAX);
        let payload = self.payload.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(15 + handler.len() + message.len() + payload.len());
        out.push(ROW_FORMAT_V1);
        out.push(self.answer.code());
        out.push(u8::from(self.payload.is_some()));
        out.extend_from_slice(&self.unix_ms.to_be_bytes());
        out.extend_from_slice(&(handler.len() as u16).to_be_bytes());
        out.extend_from_slice(handler.as_bytes());
        out.extend_from_slice(&(message.len() as u16).to_be_bytes());
        out.extend_from_slice(message.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn decode(bytes: &[u8]) -> Result<RowValue, String> {
        let mut r = Reader(bytes);
        let format = r.u8()?;
        if format != ROW_FORMAT_V1 {
            return Err(format!("unknown row format {format}"));
        }
        let answer = r.u8()?;
        let answer = Answer::from_code(answer).ok_or(format!("unknown answer code {answer}"))?;
        let flags = r.u8()?;
        if flags & !1 != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let unix_ms = u64::from_be_bytes(r.take(8)?.try_into().expect("8 bytes"));
        let handler = r.string()?;
        let message = r.string()?;
        let payload = if flags & 1 == 1 {
            Some(r.0.to_vec())
        } else if r.0.is_empty() {
            None
        } else {
            return Err(format!("{} trailing bytes", r.0.len()));
        };
        Ok(RowValue {
            answer,
            unix_ms,
            handler,
            message,
            payload,
        })
    }
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

    fn string(&mut self) -> Result<String, String> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|e| format!("bad utf-8: {e}"))
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

/// The key of the row for `(gid, branch_id, op)`.
pub(crate) fn row_key(gid: &str, branch_id: u32, op: Op) -> Vec<u8> {
    debug_assert!(
        !gid.is_empty() && !gid.contains('\0'),
        "gid checked at the edge"
    );
    let mut k = Vec::with_capacity(BARRIER_PREFIX.len() + gid.len() + 6);
    k.extend_from_slice(BARRIER_PREFIX);
    k.extend_from_slice(gid.as_bytes());
    k.push(0);
    k.extend_from_slice(&branch_id.to_be_bytes());
    k.push(op.key_byte());
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

/// Splits a row key into `(gid, branch_id, op)`.
fn parse_key(key: &[u8]) -> Result<(String, u32, Op), String> {
    let rest = key
        .strip_prefix(BARRIER_PREFIX)
        .ok_or("missing barrier prefix")?;
    // gid (at least 1 byte) ++ 0x00 ++ branch_id (4) ++ op (1)
    if rest.len() < 7 {
        return Err(format!(
            "key too short ({} bytes after the prefix)",
            rest.len()
        ));
    }
    let (head, tail) = rest.split_at(rest.len() - 6);
    let op = Op::from_key_byte(tail[5]).ok_or(format!("unknown op byte {:#x}", tail[5]))?;
    let branch_id = u32::from_be_bytes(tail[1..5].try_into().expect("4 bytes"));
    if tail[0] != 0 {
        return Err("missing gid terminator".to_string());
    }
    let gid = String::from_utf8(head.to_vec()).map_err(|e| format!("gid is not utf-8: {e}"))?;
    Ok((gid, branch_id, op))
}

fn key_for_humans(key: &[u8]) -> String {
    String::from_utf8_lossy(key.strip_prefix(BARRIER_PREFIX).unwrap_or(key)).into_owned()
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

impl Verdict {
    fn answer(answer: Answer, message: impl Into<String>) -> Verdict {
        Verdict::Answer {
            answer,
            message: message.into(),
        }
    }
}

type TxResult<T> = Result<T, ConflictableTransactionError<Refusal>>;

fn get_row(tx: &TransactionalTree, key: &[u8]) -> TxResult<Option<RowValue>> {
    match tx.get(key)? {
        None => Ok(None),
        Some(v) => decode_row(key, &v)
            .map(Some)
            .map_err(|why| ConflictableTransactionError::Storage(corrupt(key, &why))),
    }
}

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

fn put_row(tx: &TransactionalTree, key: &[u8], row: &RowValue) -> TxResult<()> {
    tx.insert(key, row.encode())?;
    Ok(())
}

fn corrupt(key: &[u8], why: &str) -> sled::Error {
    sled::Error::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("corrupt barrier row {:?}: {why}", key_for_humans(key)),
    ))
}

fn storage_retry(what: &str, ctx: &BranchContext, e: sled::Error) -> Verdict {
    tracing::error!(gid = %ctx.gid, branch_id = ctx.branch_id, error = %e, "barrier storage error during {what}");
    Verdict::Retry(format!(
        "storage error during {what}: {e}; will succeed on retry once storage recovers"
    ))
}

fn unknown_handler(ctx: &BranchContext, kind: &str) -> String {
    format!(
        "unknown handler {:?}: no {kind} handler of that name is registered on this participant",
        ctx.handler
    )
}

/// An in-doubt branch: prepared, neither committed nor aborted.
#[derive(Debug, Clone)]
pub(crate) struct InDoubt {
    pub(crate) gid: String,
    pub(crate) branch_id: u32,
    pub(crate) handler: String,
    pub(crate) payload: Vec<u8>,
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

    /// Every row in the tree, ordered by gid, branch, operation byte.
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
            });
        }
        Ok(rows)
    }

    /// Prepared branches with neither a commit nor an abort row, prepared at or before
    /// `prepared_before_unix_ms` (`None`: all of them). A corrupt row is logged and skipped:
    /// the resolver must not stop on one bad branch; the coordinator still drives it.
    pub(crate) fn in_doubt(
        &self,
        prepared_before_unix_ms: Option<u64>,
    ) -> Result<Vec<InDoubt>, sled::Error> {
        // Rows of one branch are adjacent (same key but the last byte), so one pass with a
        // "current branch" suffices and only in-doubt payloads are kept.
        struct Current {
            gid: String,
            branch_id: u32,
            prepared: Option<RowValue>,
            finished: bool,
        }
        fn flush(cur: Option<Current>, cutoff: Option<u64>, out: &mut Vec<InDoubt>) {
            let Some(cur) = cur else { return };
            let Some(p) = cur.prepared else { return };
            if cur.finished || cutoff.is_some_and(|c| p.unix_ms > c) {
                return;
            }
            out.push(InDoubt {
                gid: cur.gid,
                branch_id: cur.branch_id,
                handler: p.handler,
                payload: p.payload.unwrap_or_default(),
            });
        }
        let mut out = Vec::new();
        let mut cur: Option<Current> = None;
        for item in self.tree.scan_prefix(BARRIER_PREFIX) {
            let (k, v) = item?;
            let (gid, branch_id, op) = match parse_key(&k) {
                Ok(parsed) => parsed,
                Err(why) => {
                    tracing::error!(key = %key_for_humans(&k), "skipping corrupt barrier key: {why}");
                    continue;
                }
            };
            if !matches!(op, Op::Prepare | Op::Commit | Op::Abort) {
                continue;
            }
            let same = cur
                .as_ref()
                .is_some_and(|c| c.gid == gid && c.branch_id == branch_id);
            if !same {
                flush(cur.take(), prepared_before_unix_ms, &mut out);
                cur = Some(Current {
                    gid,
                    branch_id,
                    prepared: None,
                    finished: false,
                });
            }
            let c = cur.as_mut().expect("set above");
            match op {
                Op::Commit | Op::Abort => c.finished = true,
                Op::Prepare => match decode_row(&k, &v) {
                    Ok(row) if row.answer == Answer::Prepared => c.prepared = Some(row),
                    Ok(_) => {}
                    Err(why) => {
                        tracing::error!(key = %key_for_humans(&k), "skipping corrupt barrier row: {why}");
                    }
                },
                Op::Execute | Op::Compensate => unreachable!("filtered above"),
            }
        }
        flush(cur, prepared_before_unix_ms, &mut out);
        Ok(out)
    }

    /// Runs a forward operation (`Prepare` or `Execute`) through the barrier. `business` is
    /// `None` when no handler of the right kind is registered (answered as a refusal).
    pub(crate) fn forward(
        &self,
        op: Op,
        ctx: &BranchContext,
        payload: &[u8],
        business: Option<Business<'_>>,
    ) -> Verdict {
        let (ok, no, cancel, kind) = match op {
            Op::Prepare => (Answer::Prepared, Answer::Refused, Op::Abort, "2PC"),
            Op::Execute => (Answer::Succeeded, Answer::Failed, Op::Compensate, "saga"),
            _ => unreachable!("forward() is only for prepare and execute, got {op}"),
        };
        let key = row_key(&ctx.gid, ctx.branch_id, op);
        let cancel_key = row_key(&ctx.gid, ctx.branch_id, cancel);
        // Only prepare rows keep the payload: the in-doubt resolver replays commit/abort.
        let kept_payload = (op == Op::Prepare).then_some(payload);
        let res = self.tree.transaction(|tx| {
            if let Some(row) = get_row(tx, &key)? {
                return Ok(Verdict::answer(row.answer, row.message));
            }
            if tx.get(&cancel_key)?.is_some() {
                // Unreachable through this module (the cancel path writes the forward row
                // too), but a tree edited by hand must still never run a cancelled branch.
                let msg = format!("{cancel} already recorded for this branch");
                put_row(tx, &key, &RowValue::new(no, &ctx.handler, &msg, None))?;
                return Ok(Verdict::answer(no, msg));
            }
            let Some(business) = business else {
                return Err(ConflictableTransactionError::Abort(Refusal {
                    reason: unknown_handler(ctx, kind),
                }));
            };
            business(tx)?;
            put_row(tx, &key, &RowValue::new(ok, &ctx.handler, "", kept_payload))?;
            Ok(Verdict::answer(ok, ""))
        });
        match res {
            Ok(v) => v,
            Err(TransactionError::Abort(refusal)) => self.record_refusal(op, no, ctx, &refusal),
            Err(TransactionError::Storage(e)) => storage_retry(&op.to_string(), ctx, e),
        }
    }

    /// Records a business "no" for a forward operation, in its own transaction (the business
    /// one was rolled back with its changes). Re-checks for a row written meanwhile.
    fn record_refusal(
        &self,
        op: Op,
        no: Answer,
        ctx: &BranchContext,
        refusal: &Refusal,
    ) -> Verdict {
        let key = row_key(&ctx.gid, ctx.branch_id, op);
        let res = self.tree.transaction(|tx| {
            if let Some(row) = get_row(tx, &key)? {
                return Ok(Verdict::answer(row.answer, row.message));
            }
            put_row(
                tx,
                &key,
                &RowValue::new(no, &ctx.handler, &refusal.reason, None),
            )?;
            Ok(Verdict::answer(no, refusal.reason.clone()))
        });
        match res {
            Ok(v) => v,
            Err(TransactionError::Abort(r)) => unreachable!("no abort in this transaction: {r:?}"),
            Err(TransactionError::Storage(e)) => {
                storage_retry(&format!("recording {op} refusal"), ctx, e)
            }
        }
    }

    /// Runs a phase-two operation (`Commit`, `Abort`, `Compensate`) through the barrier.
    /// `business` is `None` when no handler of the right kind is registered: that is only an
    /// error (RETRY) if business code has to run.
    pub(crate) fn finish(
        &self,
        op: Op,
        ctx: &BranchContext,
        business: Option<Business<'_>>,
    ) -> Verdict {
        // (forward op, its success answer, what a missing forward row becomes, contradicting op)
        let (fwd, fwd_ok, null_answer, contra, kind) = match op {
            Op::Commit => (Op::Prepare, Answer::Prepared, None, Some(Op::Abort), "2PC"),
            Op::Abort => (
                Op::Prepare,
                Answer::Prepared,
                Some(Answer::Refused),
                Some(Op::Commit),
                "2PC",
            ),
            Op::Compensate => (
                Op::Execute,
                Answer::Succeeded,
                Some(Answer::Failed),
                None,
                "saga",
            ),
            _ => unreachable!("finish() is only for commit, abort and compensate, got {op}"),
        };
        let key = row_key(&ctx.gid, ctx.branch_id, op);
        let fwd_key = row_key(&ctx.gid, ctx.branch_id, fwd);
        let contra_key = contra.map(|c| (c, row_key(&ctx.gid, ctx.branch_id, c)));
        let done = || RowValue::new(Answer::Done, &ctx.handler, "", None);
        let res = self.tree.transaction(|tx| {
            if get_row(tx, &key)?.is_some() {
                return Ok(Verdict::answer(Answer::Done, ""));
            }
            if let Some((c, ck)) = &contra_key {
                if tx.get(ck)?.is_some() {
                    return Ok(Verdict::Violation(format!(
                        "{op} received but {c} was already applied to this branch"
                    )));
                }
            }
            match get_row(tx, &fwd_key)? {
                None => match null_answer {
                    None => Ok(Verdict::Violation(format!(
                        "{op} received but {fwd} never ran for this branch"
                    ))),
                    Some(null) => {
                        let msg =
                            format!("null {op}: {fwd} never ran; a late {fwd} will be refused");
                        put_row(tx, &fwd_key, &RowValue::new(null, &ctx.handler, &msg, None))?;
                        put_row(tx, &key, &done())?;
                        Ok(Verdict::answer(Answer::Done, msg))
                    }
                },
                Some(row) if row.answer == fwd_ok => {
                    let Some(business) = business else {
                        return Ok(Verdict::Retry(format!(
                            "{}; register it and this {op} succeeds on retry",
                            unknown_handler(ctx, kind)
                        )));
                    };
                    business(tx)?;
                    put_row(tx, &key, &done())?;
                    Ok(Verdict::answer(Answer::Done, ""))
                }
                Some(row) => {
                    if op == Op::Commit {
                        return Ok(Verdict::Violation(format!(
                            "commit received but prepare answered {:?} for this branch",
                            row.answer
                        )));
                    }
                    // The forward op did not apply anything: nothing to undo.
                    put_row(tx, &key, &done())?;
                    Ok(Verdict::answer(
                        Answer::Done,
                        format!("{fwd} was {:?}: nothing to undo", row.answer),
                    ))
                }
            }
        });
        match res {
            Ok(Verdict::Violation(msg)) => {
                tracing::error!(
                    gid = %ctx.gid,
                    branch_id = ctx.branch_id,
                    handler = %ctx.handler,
                    "protocol violation, business code not run: {msg}"
                );
                Verdict::Violation(format!("protocol violation: {msg}"))
            }
            Ok(v) => v,
            Err(TransactionError::Abort(refusal)) => {
                tracing::warn!(
                    gid = %ctx.gid,
                    branch_id = ctx.branch_id,
                    handler = %ctx.handler,
                    reason = %refusal.reason,
                    "{op} handler refused; {op} must eventually succeed, answering RETRY"
                );
                Verdict::Retry(format!(
                    "{op} handler refused ({}); a {op} must eventually succeed, it will be retried",
                    refusal.reason
                ))
            }
            Err(TransactionError::Storage(e)) => storage_retry(&op.to_string(), ctx, e),
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
            let c = ctx(gid);
            match op {
                Op::Prepare | Op::Execute => self.barrier.forward(op, &c, b"payload", business),
                _ => self.barrier.finish(op, &c, business),
            }
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

    #[test]
    fn row_value_round_trips_and_rejects_garbage() {
        let v = RowValue::new(Prepared, "transfer", "é".repeat(600).as_str(), Some(b"pay"));
        let back = RowValue::decode(&v.encode()).unwrap();
        assert_eq!(back.answer, Prepared);
        assert_eq!(back.payload.as_deref(), Some(&b"pay"[..]));
        assert!(back.message.len() <= ROW_MESSAGE_BYTES_MAX);
        let none = RowValue::new(Done, "h", "", None);
        assert_eq!(RowValue::decode(&none.encode()).unwrap(), none);
        assert!(RowValue::decode(&[]).is_err());
        assert!(RowValue::decode(&[9, 1, 0]).is_err());
        let mut trailing = none.encode();
        trailing.push(1);
        assert!(RowValue::decode(&trailing).is_err());
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
