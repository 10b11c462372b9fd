//! The bank: accounts in a participant's own store, moved by 2PC or by saga.
//!
//! On sled ([`Instance`], the default), keys `acct/<name>` → balance, `held/<name>` → amount
//! prepared for debit but not yet committed (both i64 big-endian). On PostgreSQL
//! ([`PgInstance`]), the table `bank_accounts (name, balance, held)`. The handlers are written
//! once, over a small `Ledger` trait (read and write one amount) that each store's
//! transaction implements. Payloads are JSON `{"account": "alice", "amount": 10}`.
//!
//! 2PC (`debit`, `credit`): a debit's prepare moves the amount from balance to held (so it can
//! neither be spent twice nor be missing at commit); commit drops the hold; abort returns it.
//! A credit's prepare only checks the account; commit adds the amount. Nothing is visible to
//! others before the decision.
//!
//! Saga (`saga-debit`, `saga-credit`): execute applies at once, compensate undoes. A saga has
//! no isolation: a compensated credit may take a balance below zero if the money was spent
//! in between, and the compensation must still succeed.

use crate::proto;
use serde::{Deserialize, Serialize};
use sled::transaction::TransactionalTree;
use std::path::Path;
use treaty_sdk::postgres::{PgStore, PgStoreOptions};
use treaty_sdk::sled::SledStore;
use treaty_sdk::{
    decode_json, refuse, BarrierRow, BarrierStore, BranchContext, HandlerError, HandlerResult,
    Participant, ParticipantBuilder, ParticipantError, Saga, StoreError, TwoPhase, Txn,
};

/// A transfer leg, the payload of every bank handler: which account, how much.
///
/// On the wire it is JSON, `{"account": "alice", "amount": 10}`; handlers refuse an amount
/// that is not positive.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Leg {
    /// The account's name on the instance the leg is sent to.
    pub account: String,
    /// How much to move; must be more than zero.
    pub amount: i64,
}

impl Leg {
    /// The JSON payload of this leg.
    pub fn payload(account: &str, amount: i64) -> Vec<u8> {
        // A struct of a string and an integer always serializes; no panic path on input.
        serde_json::to_vec(&Leg {
            account: account.into(),
            amount,
        })
        .unwrap_or_default()
    }
}

type TxResult<T> = Result<T, HandlerError>;

/// Which amount of an account: its balance, or what prepared debits hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Column {
    /// `acct/<name>` on sled, `bank_accounts.balance` on PostgreSQL.
    Balance,
    /// `held/<name>` on sled, `bank_accounts.held` on PostgreSQL.
    Held,
}

impl Column {
    fn prefix(self) -> &'static str {
        match self {
            Column::Balance => "acct",
            Column::Held => "held",
        }
    }
}

/// What the bank's handlers need of a delivery's transaction: read and write one amount of
/// one account. The business rules (below) are written once over it; each store gives it in
/// its own terms (sled keys, PostgreSQL rows), on the transaction the barrier commits with.
trait Ledger {
    /// The amount, `None` when the account (or, on sled, its held amount) is absent.
    async fn read(&mut self, column: Column, account: &str) -> TxResult<Option<i64>>;
    /// Sets the amount.
    async fn write(&mut self, column: Column, account: &str, value: i64) -> HandlerResult;
}

fn key(prefix: &str, account: &str) -> Vec<u8> {
    format!("{prefix}/{account}").into_bytes()
}

/// Decodes a stored amount (i64 big-endian). Anything else is corruption, never guessed at.
fn decode_i64(k: &[u8], v: &[u8]) -> Result<i64, sled::Error> {
    let bytes: [u8; 8] = v.try_into().map_err(|_| {
        sled::Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "corrupt bank value at {:?}: {} bytes, expected 8",
                String::from_utf8_lossy(k),
                v.len()
            ),
        ))
    })?;
    Ok(i64::from_be_bytes(bytes))
}

impl Ledger for Txn<'_, SledStore> {
    async fn read(&mut self, column: Column, account: &str) -> TxResult<Option<i64>> {
        let tree: &TransactionalTree = self;
        let k = key(column.prefix(), account);
        match tree.get(&k)? {
            None => Ok(None),
            // A storage error: answered RETRY by the SDK, and logged.
            Some(v) => decode_i64(&k, &v).map(Some).map_err(HandlerError::retry),
        }
    }

    async fn write(&mut self, column: Column, account: &str, value: i64) -> HandlerResult {
        let tree: &TransactionalTree = self;
        tree.insert(key(column.prefix(), account), &value.to_be_bytes())?;
        Ok(())
    }
}

impl Ledger for Txn<'_, PgStore> {
    async fn read(&mut self, column: Column, account: &str) -> TxResult<Option<i64>> {
        // FOR UPDATE: the row stays locked until the delivery's transaction ends (for a
        // prepare, until the decision), so two debits cannot both spend the same money.
        let row = self
            .query_opt(
                "SELECT balance, held FROM bank_accounts WHERE name = $1 FOR UPDATE",
                &[&account],
            )
            .await
            .map_err(HandlerError::retry)?;
        Ok(row.map(|r| match column {
            Column::Balance => r.get(0),
            Column::Held => r.get(1),
        }))
    }

    async fn write(&mut self, column: Column, account: &str, value: i64) -> HandlerResult {
        let sql = match column {
            Column::Balance => "UPDATE bank_accounts SET balance = $2 WHERE name = $1",
            Column::Held => "UPDATE bank_accounts SET held = $2 WHERE name = $1",
        };
        let n = self
            .execute(sql, &[&account, &value])
            .await
            .map_err(HandlerError::retry)?;
        if n != 1 {
            return Err(HandlerError::retry(format!(
                "no account {account:?} to update"
            )));
        }
        Ok(())
    }
}

fn leg(payload: &[u8]) -> TxResult<Leg> {
    let leg: Leg = decode_json(payload)?;
    if leg.amount <= 0 {
        return Err(refuse(format!(
            "amount must be positive, got {}",
            leg.amount
        )));
    }
    Ok(leg)
}

/// Balance of an existing account, or a refusal naming it.
async fn balance(l: &mut impl Ledger, account: &str) -> TxResult<i64> {
    l.read(Column::Balance, account)
        .await?
        .ok_or_else(|| refuse(format!("no account {account:?}")))
}

/// Adds `delta` to one amount of `account` (absent counts as 0). An overflow is a
/// refusal: from prepare/execute a business "no", from a phase-two operation a RETRY that
/// makes the transaction visible as stuck rather than silently wrong.
async fn add(l: &mut impl Ledger, column: Column, account: &str, delta: i64) -> HandlerResult {
    let v = l.read(column, account).await?.unwrap_or(0);
    let sum = v.checked_add(delta).ok_or_else(|| {
        refuse(format!(
            "{}/{account} would overflow: {v} + {delta}",
            column.prefix()
        ))
    })?;
    l.write(column, account, sum).await
}

/// Refuses when the account does not have `amount`, saying what it has: the refusal reaches
/// whoever asked for the transfer (the transaction's reason).
fn check_funds(l: &Leg, balance: i64) -> HandlerResult {
    if balance < l.amount {
        return Err(refuse(format!(
            "insufficient funds: {} has {balance}, the transfer needs {}",
            l.account, l.amount
        )));
    }
    Ok(())
}

// The handlers, once for every store whose transaction is a `Ledger`. On PostgreSQL a 2PC
// prepare is a prepared transaction: its hold stays invisible (and its row locked) until the
// decision, and an abort is its rollback, so `debit_abort` is only called on sled.

async fn debit_prepare<S: BarrierStore>(
    _: &BranchContext,
    tx: &mut Txn<'_, S>,
    payload: &[u8],
) -> HandlerResult
where
    for<'t> Txn<'t, S>: Ledger,
{
    let l = leg(payload)?;
    let b = balance(tx, &l.account).await?;
    check_funds(&l, b)?;
    // Reserve, do not just check: commit must be certain to succeed, and the held money can
    // not be spent by another transaction in between.
    tx.write(Column::Balance, &l.account, b - l.amount).await?;
    add(tx, Column::Held, &l.account, l.amount).await
}

async fn debit_commit<S: BarrierStore>(
    _: &BranchContext,
    tx: &mut Txn<'_, S>,
    payload: &[u8],
) -> HandlerResult
where
    for<'t> Txn<'t, S>: Ledger,
{
    let l = leg(payload)?;
    add(tx, Column::Held, &l.account, -l.amount).await
}

async fn debit_abort<S: BarrierStore>(
    _: &BranchContext,
    tx: &mut Txn<'_, S>,
    payload: &[u8],
) -> HandlerResult
where
    for<'t> Txn<'t, S>: Ledger,
{
    let l = leg(payload)?;
    add(tx, Column::Held, &l.account, -l.amount).await?;
    add(tx, Column::Balance, &l.account, l.amount).await
}

async fn credit_prepare<S: BarrierStore>(
    _: &BranchContext,
    tx: &mut Txn<'_, S>,
    payload: &[u8],
) -> HandlerResult
where
    for<'t> Txn<'t, S>: Ledger,
{
    let l = leg(payload)?;
    let b = balance(tx, &l.account).await?;
    // Nothing is written: the credit must stay invisible before the decision. The overflow
    // check is only a best effort (other credits may commit in between), hence `add` checks
    // again at commit.
    if b.checked_add(l.amount).is_none() {
        return Err(refuse(format!(
            "crediting {} to {} would overflow its balance {b}",
            l.amount, l.account
        )));
    }
    Ok(())
}

async fn credit_commit<S: BarrierStore>(
    _: &BranchContext,
    tx: &mut Txn<'_, S>,
    payload: &[u8],
) -> HandlerResult
where
    for<'t> Txn<'t, S>: Ledger,
{
    let l = leg(payload)?;
    add(tx, Column::Balance, &l.account, l.amount).await
}

async fn credit_abort<S: BarrierStore>(
    _: &BranchContext,
    _: &mut Txn<'_, S>,
    _: &[u8],
) -> HandlerResult {
    // Prepare changed nothing, so there is nothing to release.
    Ok(())
}

async fn saga_debit<S: BarrierStore>(
    _: &BranchContext,
    tx: &mut Txn<'_, S>,
    payload: &[u8],
) -> HandlerResult
where
    for<'t> Txn<'t, S>: Ledger,
{
    let l = leg(payload)?;
    let b = balance(tx, &l.account).await?;
    check_funds(&l, b)?;
    tx.write(Column::Balance, &l.account, b - l.amount).await
}

async fn saga_debit_undo<S: BarrierStore>(
    _: &BranchContext,
    tx: &mut Txn<'_, S>,
    payload: &[u8],
) -> HandlerResult
where
    for<'t> Txn<'t, S>: Ledger,
{
    let l = leg(payload)?;
    add(tx, Column::Balance, &l.account, l.amount).await
}

async fn saga_credit<S: BarrierStore>(
    _: &BranchContext,
    tx: &mut Txn<'_, S>,
    payload: &[u8],
) -> HandlerResult
where
    for<'t> Txn<'t, S>: Ledger,
{
    let l = leg(payload)?;
    balance(tx, &l.account).await?;
    add(tx, Column::Balance, &l.account, l.amount).await
}

async fn saga_credit_undo<S: BarrierStore>(
    _: &BranchContext,
    tx: &mut Txn<'_, S>,
    payload: &[u8],
) -> HandlerResult
where
    for<'t> Txn<'t, S>: Ledger,
{
    let l = leg(payload)?;
    // No isolation in a saga: the credited money may have been spent meanwhile, so this may
    // take the balance below zero. A compensation must succeed, so it does.
    add(tx, Column::Balance, &l.account, -l.amount).await
}

/// Registers every bank handler on `b`: 2PC `debit` / `credit`, saga `saga-debit` /
/// `saga-credit`, the same code on every store.
fn with_handlers<S: BarrierStore>(b: ParticipantBuilder<S>) -> ParticipantBuilder<S>
where
    for<'t> Txn<'t, S>: Ledger,
{
    b.two_phase(
        "debit",
        TwoPhase::<S>::new()
            .prepare(debit_prepare::<S>)
            .commit(debit_commit::<S>)
            .abort(debit_abort::<S>),
    )
    .two_phase(
        "credit",
        TwoPhase::<S>::new()
            .prepare(credit_prepare::<S>)
            .commit(credit_commit::<S>)
            .abort(credit_abort::<S>),
    )
    .saga(
        "saga-debit",
        Saga::<S>::new()
            .execute(saga_debit::<S>)
            .compensate(saga_debit_undo::<S>),
    )
    .saga(
        "saga-credit",
        Saga::<S>::new()
            .execute(saga_credit::<S>)
            .compensate(saga_credit_undo::<S>),
    )
}

/// The sled tree (inside the instance's db) that holds accounts and barrier rows.
pub const TREE: &str = "bank";

/// One account's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountState {
    /// The account's name.
    pub name: String,
    /// Money available to spend.
    pub balance: i64,
    /// Money reserved by prepared 2PC debits: gone from `balance`, not yet committed.
    pub held: i64,
}

/// Every account in `tree`, by name.
pub fn accounts(tree: &sled::Tree) -> Result<Vec<AccountState>, sled::Error> {
    let mut out = Vec::new();
    for kv in tree.scan_prefix(b"acct/") {
        let (k, v) = kv?;
        let name = String::from_utf8_lossy(&k[b"acct/".len()..]).into_owned();
        let hk = key("held", &name);
        let held = match tree.get(&hk)? {
            Some(h) => decode_i64(&hk, &h)?,
            None => 0,
        };
        out.push(AccountState {
            name,
            balance: decode_i64(&k, &v)?,
            held,
        });
    }
    Ok(out)
}

/// One bank instance: its sled store and its participant with every handler registered:
/// 2PC `debit` / `credit`, saga `saga-debit` / `saga-credit` (one name, one handler).
pub struct Instance {
    /// The instance's sled database.
    pub db: sled::Db,
    /// The [`TREE`] tree: accounts and the SDK's barrier rows.
    pub tree: sled::Tree,
    /// The participant to serve (the barrier wraps every handler).
    pub participant: Participant<SledStore>,
}

impl Instance {
    /// Opens (or creates) the instance's store in `dir`, creates the missing `accounts` with
    /// their opening balances (existing accounts keep theirs), and builds the participant,
    /// which asks `coordinator` about branches left in doubt.
    pub fn open(
        dir: &Path,
        coordinator: &str,
        accounts: &[(String, i64)],
    ) -> Result<Instance, ParticipantError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::new(format!("creating {}", dir.display()), e))?;
        let config = sled::Config::new().path(dir);
        // The deliberately broken build (tests only) skips the real fdatasync; without sled's
        // own periodic sync too, the power-cut test sees every acknowledged row at risk.
        #[cfg(feature = "mutation-skip-fdatasync")]
        let config = config.flush_every_ms(None);
        let store = SledStore::open(config, TREE)?;
        let (db, tree) = (store.db().clone(), store.tree().clone());
        for (name, opening) in accounts {
            // Only if absent: a restarted instance keeps its balances. The inner Err is
            // "the key exists", which is the case to leave alone.
            let _exists = tree
                .compare_and_swap(
                    key("acct", name),
                    None as Option<&[u8]>,
                    Some(&opening.to_be_bytes()[..]),
                )
                .map_err(|e| StoreError::new("creating the opening balances", e))?;
        }
        let participant =
            with_handlers(Participant::builder(store).coordinator(coordinator)).build()?;
        // Opening balances must survive a crash like everything else.
        db.flush()
            .map_err(|e| StoreError::new("flushing the opening balances", e))?;
        Ok(Instance {
            db,
            tree,
            participant,
        })
    }

    /// Every account of this instance.
    pub fn accounts(&self) -> Result<Vec<AccountState>, sled::Error> {
        accounts(&self.tree)
    }

    /// The `Bank` inspection service of this instance.
    pub fn bank_service(&self) -> proto::bank_server::BankServer<BankService> {
        proto::bank_server::BankServer::new(BankService {
            source: Source::Sled {
                tree: self.tree.clone(),
                store: self.participant.store().clone(),
            },
        })
    }
}

/// The accounts table of an instance on PostgreSQL (`held`: what prepared debits hold; on
/// PostgreSQL a prepared debit's hold is visible only once committed, since the prepare is a
/// prepared transaction).
const PG_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS bank_accounts (\
    name text COLLATE \"C\" PRIMARY KEY, \
    balance bigint NOT NULL, \
    held bigint NOT NULL DEFAULT 0)";

/// One bank instance whose accounts live in PostgreSQL (table `bank_accounts`, next to the
/// SDK's barrier tables): the same handlers as [`Instance`], on a [`PgStore`].
pub struct PgInstance {
    /// The instance's store (its pool reads balances).
    pub store: PgStore,
    /// The participant to serve.
    pub participant: Participant<PgStore>,
}

impl PgInstance {
    /// Connects to `url`, creates the accounts table and the missing `accounts` with their
    /// opening balances (existing accounts keep theirs), and builds the participant, which
    /// asks `coordinator` about branches left in doubt.
    pub async fn open(
        url: &str,
        coordinator: &str,
        accounts: &[(String, i64)],
    ) -> Result<PgInstance, ParticipantError> {
        PgInstance::open_with(url, PgStoreOptions::default(), coordinator, accounts).await
    }

    /// [`PgInstance::open`] with the store's `options` (e.g. TLS to the database).
    pub async fn open_with(
        url: &str,
        options: PgStoreOptions,
        coordinator: &str,
        accounts: &[(String, i64)],
    ) -> Result<PgInstance, ParticipantError> {
        let store = PgStore::connect_with(url, options).await?;
        let conn = store
            .pool()
            .get()
            .await
            .map_err(|e| StoreError::new("connecting to create the accounts table", e))?;
        conn.batch_execute(PG_SCHEMA)
            .await
            .map_err(|e| StoreError::new("creating the accounts table", e))?;
        for (name, opening) in accounts {
            // Only if absent, and without touching an existing row: a prepared transaction
            // left by a crash may hold it, and even `ON CONFLICT DO NOTHING` would wait for
            // that transaction, which only this service (once started) can get resolved.
            conn.execute(
                "INSERT INTO bank_accounts (name, balance) SELECT $1, $2 \
                 WHERE NOT EXISTS (SELECT 1 FROM bank_accounts WHERE name = $1) \
                 ON CONFLICT (name) DO NOTHING",
                &[name, opening],
            )
            .await
            .map_err(|e| StoreError::new("creating the opening balances", e))?;
        }
        let participant =
            with_handlers(Participant::builder(store.clone()).coordinator(coordinator)).build()?;
        Ok(PgInstance { store, participant })
    }

    /// Every account of this instance, by name.
    pub async fn accounts(&self) -> Result<Vec<AccountState>, StoreError> {
        pg_accounts(&self.store).await
    }

    /// The `Bank` inspection service of this instance.
    pub fn bank_service(&self) -> proto::bank_server::BankServer<BankService> {
        proto::bank_server::BankServer::new(BankService {
            source: Source::Pg(self.store.clone()),
        })
    }
}

async fn pg_accounts(store: &PgStore) -> Result<Vec<AccountState>, StoreError> {
    let conn = store
        .pool()
        .get()
        .await
        .map_err(|e| StoreError::new("connecting to read balances", e))?;
    let rows = conn
        .query(
            "SELECT name, balance, held FROM bank_accounts ORDER BY name",
            &[],
        )
        .await
        .map_err(|e| StoreError::new("reading balances", e))?;
    Ok(rows
        .iter()
        .map(|r| AccountState {
            name: r.get(0),
            balance: r.get(1),
            held: r.get(2),
        })
        .collect())
}

/// Serves `Balances` and `BarrierRows` for one instance (read-only).
pub struct BankService {
    source: Source,
}

/// Where an instance keeps its accounts.
enum Source {
    Sled { tree: sled::Tree, store: SledStore },
    Pg(PgStore),
}

fn internal(what: &str, e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::internal(format!("{what}: {e}; check the instance's data directory"))
}

#[tonic::async_trait]
impl proto::bank_server::Bank for BankService {
    async fn balances(
        &self,
        _: tonic::Request<proto::BalancesRequest>,
    ) -> Result<tonic::Response<proto::BalancesResponse>, tonic::Status> {
        let accounts = match &self.source {
            Source::Sled { tree, .. } => {
                let tree = tree.clone();
                tokio::task::spawn_blocking(move || accounts(&tree))
                    .await
                    .map_err(|e| internal("reading balances", e))?
                    .map_err(|e| internal("reading balances", e))?
            }
            Source::Pg(store) => pg_accounts(store)
                .await
                .map_err(|e| internal("reading balances", e))?,
        };
        Ok(tonic::Response::new(proto::BalancesResponse {
            accounts: accounts
                .into_iter()
                .map(|a| proto::Account {
                    name: a.name,
                    balance: a.balance,
                    held: a.held,
                })
                .collect(),
        }))
    }

    type BarrierRowsStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<proto::BarrierRowsResponse, tonic::Status>>>;

    async fn barrier_rows(
        &self,
        req: tonic::Request<proto::BarrierRowsRequest>,
    ) -> Result<tonic::Response<Self::BarrierRowsStream>, tonic::Status> {
        /// Rows per streamed page: about 200 KiB, far below the 4 MiB message limit.
        const PAGE: usize = 4096;
        let gid = req.into_inner().gid;
        let rows: Vec<BarrierRow> = match &self.source {
            Source::Sled { store, .. } => {
                let store = store.clone();
                tokio::task::spawn_blocking(move || {
                    if gid.is_empty() {
                        store.try_all_rows()
                    } else {
                        store.try_rows(&gid)
                    }
                })
                .await
                .map_err(|e| internal("reading barrier rows", e))?
            }
            Source::Pg(store) if gid.is_empty() => store.all_rows().await,
            Source::Pg(store) => store.rows(&gid).await,
        }
        .map_err(|e| internal("reading barrier rows", e))?;
        let pages: Vec<_> = rows
            .chunks(PAGE)
            .map(|page| {
                Ok(proto::BarrierRowsResponse {
                    rows: page
                        .iter()
                        .map(|r| proto::BarrierRow {
                            gid: r.gid.clone(),
                            branch_id: r.branch_id,
                            op: r.op.to_string(),
                            answer: answer_name(r.answer).to_string(),
                            seq: r.seq,
                        })
                        .collect(),
                })
            })
            .collect();
        Ok(tonic::Response::new(tokio_stream::iter(pages)))
    }
}

/// The wire name of a barrier answer (see `BarrierRow.answer` in bank.proto).
pub fn answer_name(a: treaty_sdk::Answer) -> &'static str {
    use treaty_sdk::Answer::*;
    match a {
        Prepared => "prepared",
        Refused => "refused",
        Succeeded => "succeeded",
        Failed => "failed",
        Done => "done",
    }
}

/// Parses `alice=100,bob=50` into (name, opening balance) pairs.
///
/// A name is 1 to 64 characters of `[A-Za-z0-9_.-]` (it ends a URI and a sled key); a balance
/// is a non-negative integer; a name may appear once.
pub fn parse_accounts(s: &str) -> Result<Vec<(String, i64)>, String> {
    let mut out: Vec<(String, i64)> = Vec::new();
    for p in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, amount) = p
            .split_once('=')
            .ok_or_else(|| format!("account {p:?}: expected name=amount, e.g. alice=100"))?;
        let name = name.trim();
        check_account_name(name).map_err(|e| format!("account {p:?}: {e}"))?;
        let amount: i64 = amount
            .trim()
            .parse()
            .map_err(|e| format!("account {p:?}: amount is not an integer: {e}"))?;
        if amount < 0 {
            return Err(format!(
                "account {p:?}: an opening balance cannot be negative"
            ));
        }
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("account {name:?} is given twice"));
        }
        out.push((name.to_string(), amount));
    }
    Ok(out)
}

fn check_account_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "account name {name:?} must be 1 to 64 characters of A-Z a-z 0-9 _ . -"
        ))
    }
}

/// Splits `http://127.0.0.1:7801/alice` at the last `/` into the participant URI and the
/// account name.
pub fn parse_account_uri(s: &str) -> Result<(String, String), String> {
    let (uri, account) = s
        .rsplit_once('/')
        .filter(|(u, _)| {
            u.split_once("://")
                .is_some_and(|(scheme, host)| !scheme.is_empty() && !host.is_empty())
        })
        .ok_or_else(|| {
            format!("{s:?}: expected <participant-uri>/<account>, e.g. http://127.0.0.1:7801/alice")
        })?;
    check_account_name(account).map_err(|e| format!("{s:?}: {e}"))?;
    Ok((uri.to_string(), account.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use treaty_proto::v1 as pb;
    use treaty_proto::v1::participant_client::ParticipantClient;

    /// One instance served through the SDK on 127.0.0.1:0, and a raw participant client.
    struct Bench {
        _dir: tempfile::TempDir,
        inst: Instance,
        client: ParticipantClient<tonic::transport::Channel>,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    impl Bench {
        async fn new(accounts: &str) -> Bench {
            let dir = tempfile::tempdir().unwrap();
            // Nothing listens on port 1: in-doubt resolution is not under test here.
            let inst = Instance::open(
                dir.path(),
                "http://127.0.0.1:1",
                &parse_accounts(accounts).unwrap(),
            )
            .unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let uri = format!("http://{}", listener.local_addr().unwrap());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(inst.participant.clone().serve(listener, async {
                let _ = stopped.await;
            }));
            let client = ParticipantClient::connect(uri).await.unwrap();
            Bench {
                _dir: dir,
                inst,
                client,
                _stop: stop,
            }
        }

        /// (name, balance, held) of every account.
        fn state(&self) -> Vec<(String, i64, i64)> {
            self.inst
                .accounts()
                .unwrap()
                .into_iter()
                .map(|a| (a.name, a.balance, a.held))
                .collect()
        }

        async fn prepare(&mut self, gid: &str, h: &str, acct: &str, n: i64) -> pb::PrepareResult {
            let r = self.client.prepare(req(gid, h, acct, n)).await.unwrap();
            r.into_inner().result()
        }

        async fn commit(&mut self, gid: &str, h: &str, acct: &str, n: i64) -> pb::PhaseTwoResult {
            let r = self.client.commit(req(gid, h, acct, n)).await.unwrap();
            r.into_inner().result()
        }

        async fn abort(&mut self, gid: &str, h: &str, acct: &str, n: i64) -> pb::PhaseTwoResult {
            let r = self.client.abort(req(gid, h, acct, n)).await.unwrap();
            r.into_inner().result()
        }

        async fn execute(&mut self, gid: &str, h: &str, acct: &str, n: i64) -> pb::ExecuteResult {
            let r = self.client.execute(req(gid, h, acct, n)).await.unwrap();
            r.into_inner().result()
        }

        async fn compensate(
            &mut self,
            gid: &str,
            h: &str,
            acct: &str,
            n: i64,
        ) -> pb::PhaseTwoResult {
            let r = self.client.compensate(req(gid, h, acct, n)).await.unwrap();
            r.into_inner().result()
        }
    }

    fn req(gid: &str, handler: &str, account: &str, amount: i64) -> pb::BranchRequest {
        pb::BranchRequest {
            gid: gid.into(),
            branch_id: 0,
            handler: handler.into(),
            payload: Leg::payload(account, amount).into(),
            attempt: 1,
            deadline_unix_ms: 0,
            ..Default::default()
        }
    }

    fn row(name: &str, balance: i64, held: i64) -> (String, i64, i64) {
        (name.to_string(), balance, held)
    }

    use pb::{ExecuteResult as E, PhaseTwoResult as P2, PrepareResult as P};

    #[tokio::test]
    async fn debit_prepare_holds_commit_keeps_it_abort_returns_it() {
        let mut b = Bench::new("alice=100").await;
        assert_eq!(b.prepare("g1", "debit", "alice", 30).await, P::Prepared);
        assert_eq!(b.state(), [row("alice", 70, 30)]);
        // A duplicate prepare repeats the answer and holds nothing more.
        assert_eq!(b.prepare("g1", "debit", "alice", 30).await, P::Prepared);
        assert_eq!(b.state(), [row("alice", 70, 30)]);
        assert_eq!(b.commit("g1", "debit", "alice", 30).await, P2::Done);
        assert_eq!(b.commit("g1", "debit", "alice", 30).await, P2::Done);
        assert_eq!(b.state(), [row("alice", 70, 0)]);

        assert_eq!(b.prepare("g2", "debit", "alice", 20).await, P::Prepared);
        assert_eq!(b.state(), [row("alice", 50, 20)]);
        assert_eq!(b.abort("g2", "debit", "alice", 20).await, P2::Done);
        assert_eq!(b.abort("g2", "debit", "alice", 20).await, P2::Done);
        assert_eq!(b.state(), [row("alice", 70, 0)]);
    }

    #[tokio::test]
    async fn credit_is_invisible_until_commit_and_abort_changes_nothing() {
        let mut b = Bench::new("bob=50").await;
        assert_eq!(b.prepare("g1", "credit", "bob", 30).await, P::Prepared);
        assert_eq!(b.state(), [row("bob", 50, 0)]);
        assert_eq!(b.commit("g1", "credit", "bob", 30).await, P2::Done);
        assert_eq!(b.state(), [row("bob", 80, 0)]);

        assert_eq!(b.prepare("g2", "credit", "bob", 5).await, P::Prepared);
        assert_eq!(b.abort("g2", "credit", "bob", 5).await, P2::Done);
        assert_eq!(b.state(), [row("bob", 80, 0)]);
    }

    #[tokio::test]
    async fn refused_prepares_leave_balances_untouched() {
        let mut b = Bench::new("alice=100").await;
        assert_eq!(b.prepare("g1", "debit", "alice", 101).await, P::Refused);
        assert_eq!(b.prepare("g2", "debit", "nobody", 1).await, P::Refused);
        assert_eq!(b.prepare("g3", "credit", "nobody", 1).await, P::Refused);
        assert_eq!(b.prepare("g4", "debit", "alice", 0).await, P::Refused);
        assert_eq!(b.prepare("g5", "credit", "alice", -5).await, P::Refused);
        assert_eq!(
            b.prepare("g6", "no-such-handler", "alice", 1).await,
            P::Refused
        );
        let mut bad = req("g7", "debit", "alice", 1);
        bad.payload = bytes::Bytes::from_static(b"not json");
        let r = b.client.prepare(bad).await.unwrap().into_inner();
        assert_eq!(r.result(), P::Refused, "{}", r.message);
        // The coordinator aborts a refused branch: nothing to give back.
        assert_eq!(b.abort("g1", "debit", "alice", 101).await, P2::Done);
        assert_eq!(b.state(), [row("alice", 100, 0)]);
    }

    #[tokio::test]
    async fn a_2pc_transfer_across_two_instances_keeps_the_total() {
        let mut a = Bench::new("alice=100").await;
        let mut b = Bench::new("bob=50").await;
        assert_eq!(a.prepare("t", "debit", "alice", 40).await, P::Prepared);
        assert_eq!(b.prepare("t", "credit", "bob", 40).await, P::Prepared);
        assert_eq!(a.commit("t", "debit", "alice", 40).await, P2::Done);
        assert_eq!(b.commit("t", "credit", "bob", 40).await, P2::Done);
        assert_eq!(a.state(), [row("alice", 60, 0)]);
        assert_eq!(b.state(), [row("bob", 90, 0)]);
    }

    #[tokio::test]
    async fn saga_debit_applies_at_once_and_compensation_restores() {
        let mut b = Bench::new("alice=100").await;
        assert_eq!(
            b.execute("s1", "saga-debit", "alice", 30).await,
            E::Succeeded
        );
        assert_eq!(
            b.execute("s1", "saga-debit", "alice", 30).await,
            E::Succeeded
        );
        assert_eq!(b.state(), [row("alice", 70, 0)]);
        assert_eq!(
            b.compensate("s1", "saga-debit", "alice", 30).await,
            P2::Done
        );
        assert_eq!(
            b.compensate("s1", "saga-debit", "alice", 30).await,
            P2::Done
        );
        assert_eq!(b.state(), [row("alice", 100, 0)]);

        assert_eq!(b.execute("s2", "saga-debit", "alice", 500).await, E::Failed);
        assert_eq!(b.execute("s3", "saga-debit", "nobody", 1).await, E::Failed);
        // Compensating a failed step undoes nothing.
        assert_eq!(
            b.compensate("s2", "saga-debit", "alice", 500).await,
            P2::Done
        );
        assert_eq!(b.state(), [row("alice", 100, 0)]);
    }

    #[tokio::test]
    async fn saga_credit_compensation_succeeds_even_below_zero() {
        let mut b = Bench::new("bob=10").await;
        assert_eq!(b.execute("s1", "saga-credit", "bob", 5).await, E::Succeeded);
        assert_eq!(b.state(), [row("bob", 15, 0)]);
        assert_eq!(b.compensate("s1", "saga-credit", "bob", 5).await, P2::Done);
        assert_eq!(b.state(), [row("bob", 10, 0)]);
        assert_eq!(b.execute("s2", "saga-credit", "nobody", 5).await, E::Failed);

        // No isolation: the credited money is spent before the compensation arrives.
        assert_eq!(
            b.execute("s3", "saga-credit", "bob", 20).await,
            E::Succeeded
        );
        assert_eq!(b.execute("s4", "saga-debit", "bob", 30).await, E::Succeeded);
        assert_eq!(b.compensate("s3", "saga-credit", "bob", 20).await, P2::Done);
        assert_eq!(b.state(), [row("bob", -20, 0)]);
    }

    #[tokio::test]
    async fn a_compensation_before_its_step_makes_the_late_step_fail() {
        let mut b = Bench::new("alice=100").await;
        assert_eq!(
            b.compensate("s1", "saga-debit", "alice", 10).await,
            P2::Done
        );
        assert_eq!(b.execute("s1", "saga-debit", "alice", 10).await, E::Failed);
        assert_eq!(b.state(), [row("alice", 100, 0)]);
    }

    #[test]
    fn opening_balances_are_kept_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = parse_accounts("alice=100").unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _guard = rt.enter();
        {
            let inst = Instance::open(dir.path(), "http://127.0.0.1:1", &accounts).unwrap();
            inst.tree
                .insert(key("acct", "alice"), &7i64.to_be_bytes())
                .unwrap();
            inst.db.flush().unwrap();
        }
        let more = parse_accounts("alice=100,carol=5").unwrap();
        let inst = Instance::open(dir.path(), "http://127.0.0.1:1", &more).unwrap();
        let got: Vec<_> = inst
            .accounts()
            .unwrap()
            .into_iter()
            .map(|a| (a.name, a.balance))
            .collect();
        assert_eq!(got, [("alice".to_string(), 7), ("carol".to_string(), 5)]);
    }

    #[test]
    fn parsing() {
        assert_eq!(
            parse_accounts("a=1, b=2").unwrap(),
            [("a".into(), 1), ("b".into(), 2)]
        );
        assert_eq!(parse_accounts("").unwrap(), []);
        for bad in [
            "a",
            "a=x",
            "a=-1",
            "=1",
            "a/b=1",
            "a=1,a=2",
            "a=99999999999999999999",
        ] {
            assert!(parse_accounts(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_account_uri("http://127.0.0.1:7801/alice").unwrap(),
            ("http://127.0.0.1:7801".into(), "alice".into())
        );
        for bad in [
            "alice",
            "http://127.0.0.1:7801/",
            "http:///alice",
            "/alice",
            "x/a b",
        ] {
            assert!(parse_account_uri(bad).is_err(), "{bad}");
        }
    }

    /// More rows than one page: `BarrierRows` streams them all, in pages, and a one-gid
    /// request gets only that gid's rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn barrier_rows_stream_every_row_in_pages() {
        use futures::StreamExt;
        let b = Bench::new("alice=100").await;
        const GIDS: usize = 2_300;
        // Null compensations (nothing ran) each leave rows (the compensation's, and the one
        // that refuses a late Execute); many at once share fsyncs.
        let calls = futures::stream::iter(0..GIDS).map(|i| {
            let mut c = b.client.clone();
            async move {
                let r = c.compensate(req(&format!("g{i}"), "saga-debit", "alice", 1));
                r.await.unwrap().into_inner().result()
            }
        });
        let answers: Vec<_> = calls.buffer_unordered(64).collect().await;
        assert!(answers.iter().all(|a| *a == P2::Done));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap());
        let svc = b.inst.bank_service();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut bank = proto::bank_client::BankClient::connect(uri).await.unwrap();
        let mut pages = bank
            .barrier_rows(proto::BarrierRowsRequest { gid: String::new() })
            .await
            .unwrap()
            .into_inner();
        let (mut n_pages, mut rows) = (0, Vec::new());
        while let Some(page) = pages.message().await.unwrap() {
            n_pages += 1;
            rows.extend(page.rows);
        }
        let mut one = bank
            .barrier_rows(proto::BarrierRowsRequest { gid: "g7".into() })
            .await
            .unwrap()
            .into_inner();
        let page = one.message().await.unwrap().expect("one page");
        assert!(one.message().await.unwrap().is_none());
        assert!(page.rows.iter().all(|r| r.gid == "g7"));
        let ops: Vec<_> = page
            .rows
            .iter()
            .map(|r| (r.op.as_str(), r.answer.as_str()))
            .collect();
        assert!(ops.contains(&("compensate", "done")), "{ops:?}");

        let per_gid = page.rows.len();
        assert_eq!(rows.len(), GIDS * per_gid);
        assert!(rows.len() > 4096, "the test must span pages");
        assert_eq!(n_pages, rows.len().div_ceil(4096));
        let gids: std::collections::HashSet<_> = rows.iter().map(|r| r.gid.as_str()).collect();
        assert_eq!(gids.len(), GIDS);
    }
}
