//! The bank: accounts in a participant's sled tree, moved by 2PC or by saga.
//!
//! Keys: `acct/<name>` → balance, `held/<name>` → amount prepared for debit but not yet
//! committed (both i64 big-endian). Payloads are JSON `{"account": "alice", "amount": 10}`.
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
use treaty_sdk::{
    decode_json, refuse, saga_fn, two_phase_fn, BranchContext, HandlerResult, Participant, SdkError,
};

/// A transfer leg: which account, how much.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Leg {
    pub account: String,
    pub amount: i64,
}

impl Leg {
    /// The JSON payload of this leg.
    pub fn payload(account: &str, amount: i64) -> Vec<u8> {
        serde_json::to_vec(&Leg {
            account: account.into(),
            amount,
        })
        .expect("a Leg always serializes")
    }
}

fn key(prefix: &str, account: &str) -> Vec<u8> {
    format!("{prefix}/{account}").into_bytes()
}

fn read(
    tree: &TransactionalTree,
    k: &[u8],
) -> Result<Option<i64>, sled::transaction::UnabortableTransactionError> {
    Ok(tree.get(k)?.map(|v| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v[..8.min(v.len())]);
        i64::from_be_bytes(b)
    }))
}

fn write(tree: &TransactionalTree, k: &[u8], v: i64) -> HandlerResult {
    tree.insert(k, &v.to_be_bytes())?;
    Ok(())
}

fn leg(
    payload: &[u8],
) -> Result<Leg, sled::transaction::ConflictableTransactionError<treaty_sdk::Refusal>> {
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
fn balance(
    tree: &TransactionalTree,
    account: &str,
) -> Result<i64, sled::transaction::ConflictableTransactionError<treaty_sdk::Refusal>> {
    read(tree, &key("acct", account))?.ok_or_else(|| refuse(format!("no account {account:?}")))
}

fn add(tree: &TransactionalTree, prefix: &str, account: &str, delta: i64) -> HandlerResult {
    let k = key(prefix, account);
    let v = read(tree, &k)?.unwrap_or(0);
    write(tree, &k, v + delta)
}

fn debit_prepare(_: &BranchContext, tree: &TransactionalTree, payload: &[u8]) -> HandlerResult {
    let l = leg(payload)?;
    let b = balance(tree, &l.account)?;
    if b < l.amount {
        return Err(refuse(format!(
            "insufficient funds in {}: {b} < {}",
            l.account, l.amount
        )));
    }
    write(tree, &key("acct", &l.account), b - l.amount)?;
    add(tree, "held", &l.account, l.amount)
}

fn debit_commit(_: &BranchContext, tree: &TransactionalTree, payload: &[u8]) -> HandlerResult {
    let l = leg(payload)?;
    add(tree, "held", &l.account, -l.amount)
}

fn debit_abort(_: &BranchContext, tree: &TransactionalTree, payload: &[u8]) -> HandlerResult {
    let l = leg(payload)?;
    add(tree, "held", &l.account, -l.amount)?;
    add(tree, "acct", &l.account, l.amount)
}

fn credit_prepare(_: &BranchContext, tree: &TransactionalTree, payload: &[u8]) -> HandlerResult {
    let l = leg(payload)?;
    balance(tree, &l.account)?;
    Ok(())
}

fn credit_commit(_: &BranchContext, tree: &TransactionalTree, payload: &[u8]) -> HandlerResult {
    let l = leg(payload)?;
    add(tree, "acct", &l.account, l.amount)
}

fn credit_abort(_: &BranchContext, _: &TransactionalTree, _: &[u8]) -> HandlerResult {
    Ok(())
}

fn saga_debit(_: &BranchContext, tree: &TransactionalTree, payload: &[u8]) -> HandlerResult {
    let l = leg(payload)?;
    let b = balance(tree, &l.account)?;
    if b < l.amount {
        return Err(refuse(format!(
            "insufficient funds in {}: {b} < {}",
            l.account, l.amount
        )));
    }
    write(tree, &key("acct", &l.account), b - l.amount)
}

fn saga_debit_undo(_: &BranchContext, tree: &TransactionalTree, payload: &[u8]) -> HandlerResult {
    let l = leg(payload)?;
    add(tree, "acct", &l.account, l.amount)
}

fn saga_credit(_: &BranchContext, tree: &TransactionalTree, payload: &[u8]) -> HandlerResult {
    let l = leg(payload)?;
    let b = balance(tree, &l.account)?;
    write(tree, &key("acct", &l.account), b + l.amount)
}

fn saga_credit_undo(_: &BranchContext, tree: &TransactionalTree, payload: &[u8]) -> HandlerResult {
    let l = leg(payload)?;
    add(tree, "acct", &l.account, -l.amount)
}

/// One bank instance: its sled store and its participant with every handler registered.
pub struct Instance {
    pub db: sled::Db,
    pub tree: sled::Tree,
    pub participant: Participant,
}

impl Instance {
    /// Open (or create) the instance's store in `dir`, create the missing `accounts` with their
    /// opening balances, and build the participant.
    pub fn open(
        dir: &Path,
        coordinator: &str,
        accounts: &[(String, i64)],
    ) -> Result<Instance, SdkError> {
        std::fs::create_dir_all(dir).map_err(|e| SdkError::Storage(sled::Error::Io(e)))?;
        let db = sled::open(dir)?;
        let tree = db.open_tree("bank")?;
        for (name, opening) in accounts {
            // Only if absent: a restarted instance keeps its balances.
            tree.compare_and_swap(
                key("acct", name),
                None as Option<&[u8]>,
                Some(&opening.to_be_bytes()[..]),
            )?
            .ok();
        }
        let participant = Participant::builder(db.clone(), tree.clone(), dir)
            .coordinator(coordinator)
            .two_phase(
                "debit",
                two_phase_fn(debit_prepare, debit_commit, debit_abort),
            )
            .two_phase(
                "credit",
                two_phase_fn(credit_prepare, credit_commit, credit_abort),
            )
            .saga("saga-debit", saga_fn(saga_debit, saga_debit_undo))
            .saga("saga-credit", saga_fn(saga_credit, saga_credit_undo))
            .build()?;
        // Opening balances must survive a crash like everything else.
        db.flush()?;
        Ok(Instance {
            db,
            tree,
            participant,
        })
    }

    /// Every account: (name, balance, held).
    pub fn accounts(&self) -> Result<Vec<(String, i64, i64)>, sled::Error> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(b"acct/") {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[5..]).into_owned();
            let held = self
                .tree
                .get(key("held", &name))?
                .map(|h| be_i64(&h))
                .unwrap_or(0);
            out.push((name, be_i64(&v), held));
        }
        Ok(out)
    }

    /// The `Bank` inspection service of this instance.
    pub fn bank_service(&self) -> proto::bank_server::BankServer<BankService> {
        proto::bank_server::BankServer::new(BankService {
            tree: self.tree.clone(),
            barrier: self.participant.barrier().clone(),
        })
    }
}

fn be_i64(v: &[u8]) -> i64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[..n].copy_from_slice(&v[..n]);
    i64::from_be_bytes(b)
}

/// Serves `Balances` and `BarrierRows` for one instance.
pub struct BankService {
    tree: sled::Tree,
    barrier: treaty_sdk::Barrier,
}

#[tonic::async_trait]
impl proto::bank_server::Bank for BankService {
    async fn balances(
        &self,
        _: tonic::Request<proto::BalancesRequest>,
    ) -> Result<tonic::Response<proto::BalancesResponse>, tonic::Status> {
        let mut accounts = Vec::new();
        for kv in self.tree.scan_prefix(b"acct/") {
            let (k, v) = kv.map_err(|e| tonic::Status::internal(e.to_string()))?;
            let name = String::from_utf8_lossy(&k[5..]).into_owned();
            let held = self
                .tree
                .get(key("held", &name))
                .map_err(|e| tonic::Status::internal(e.to_string()))?
                .map(|h| be_i64(&h))
                .unwrap_or(0);
            accounts.push(proto::Account {
                name,
                balance: be_i64(&v),
                held,
            });
        }
        Ok(tonic::Response::new(proto::BalancesResponse { accounts }))
    }

    async fn barrier_rows(
        &self,
        req: tonic::Request<proto::BarrierRowsRequest>,
    ) -> Result<tonic::Response<proto::BarrierRowsResponse>, tonic::Status> {
        let gid = req.into_inner().gid;
        let rows = if gid.is_empty() {
            self.barrier.try_all_rows()
        } else {
            self.barrier.try_rows(&gid)
        }
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(proto::BarrierRowsResponse {
            rows: rows
                .into_iter()
                .map(|r| proto::BarrierRow {
                    gid: r.gid,
                    branch_id: r.branch_id,
                    op: r.op.to_string(),
                    answer: format!("{:?}", r.answer).to_lowercase(),
                })
                .collect(),
        }))
    }
}

/// Parse `alice=100,bob=50`.
pub fn parse_accounts(s: &str) -> Result<Vec<(String, i64)>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (name, amount) = p
                .split_once('=')
                .ok_or_else(|| format!("account {p:?}: expected name=amount"))?;
            let amount: i64 = amount
                .trim()
                .parse()
                .map_err(|e| format!("account {p:?}: amount is not an integer: {e}"))?;
            let name = name.trim();
            if name.is_empty() || amount < 0 {
                return Err(format!(
                    "account {p:?}: needs a name and a non-negative amount"
                ));
            }
            Ok((name.to_string(), amount))
        })
        .collect()
}

/// Split `http://127.0.0.1:7801/alice` into the participant URI and the account.
pub fn parse_account_uri(s: &str) -> Result<(String, String), String> {
    let (uri, account) = s
        .rsplit_once('/')
        .filter(|(u, a)| u.contains("://") && !u.ends_with('/') && !a.is_empty())
        .ok_or_else(|| {
            format!("{s:?}: expected <participant-uri>/<account>, e.g. http://127.0.0.1:7801/alice")
        })?;
    Ok((uri.to_string(), account.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use treaty_proto::v1 as pb;

    async fn serve(accounts: &str) -> (tempfile::TempDir, Instance, String) {
        let dir = tempfile::tempdir().unwrap();
        let inst = Instance::open(
            dir.path(),
            "http://127.0.0.1:1",
            &parse_accounts(accounts).unwrap(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap());
        let p = inst.participant.clone();
        tokio::spawn(p.serve(listener, std::future::pending()));
        (dir, inst, uri)
    }

    fn req(gid: &str, handler: &str, account: &str, amount: i64) -> pb::BranchRequest {
        pb::BranchRequest {
            gid: gid.into(),
            branch_id: 0,
            handler: handler.into(),
            payload: Leg::payload(account, amount).into(),
            attempt: 1,
            deadline_unix_ms: 0,
        }
    }

    fn bal(inst: &Instance) -> Vec<(String, i64, i64)> {
        inst.accounts().unwrap()
    }

    #[tokio::test]
    async fn two_phase_debit_holds_then_commits_or_releases() {
        let (_d, inst, uri) = serve("alice=100").await;
        let mut c = pb::participant_client::ParticipantClient::connect(uri)
            .await
            .unwrap();
        let r = c
            .prepare(req("g1", "debit", "alice", 30))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::PrepareResult::Prepared);
        assert_eq!(bal(&inst), [("alice".into(), 70, 30)]);
        c.commit(req("g1", "debit", "alice", 30)).await.unwrap();
        assert_eq!(bal(&inst), [("alice".into(), 70, 0)]);
        c.prepare(req("g2", "debit", "alice", 20)).await.unwrap();
        c.abort(req("g2", "debit", "alice", 20)).await.unwrap();
        assert_eq!(bal(&inst), [("alice".into(), 70, 0)]);
        // Refusals change nothing.
        let r = c
            .prepare(req("g3", "debit", "alice", 1000))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::PrepareResult::Refused);
        let r = c
            .prepare(req("g4", "credit", "nobody", 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::PrepareResult::Refused);
        assert_eq!(bal(&inst), [("alice".into(), 70, 0)]);
    }

    #[tokio::test]
    async fn saga_steps_apply_and_compensate() {
        let (_d, inst, uri) = serve("bob=10").await;
        let mut c = pb::participant_client::ParticipantClient::connect(uri)
            .await
            .unwrap();
        c.execute(req("s1", "saga-credit", "bob", 5)).await.unwrap();
        assert_eq!(bal(&inst), [("bob".into(), 15, 0)]);
        c.compensate(req("s1", "saga-credit", "bob", 5))
            .await
            .unwrap();
        assert_eq!(bal(&inst), [("bob".into(), 10, 0)]);
        let r = c
            .execute(req("s2", "saga-debit", "bob", 50))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::ExecuteResult::Failed);
        assert_eq!(bal(&inst), [("bob".into(), 10, 0)]);
    }

    #[test]
    fn parsing() {
        assert_eq!(
            parse_accounts("a=1, b=2").unwrap(),
            [("a".into(), 1), ("b".into(), 2)]
        );
        assert!(parse_accounts("a").is_err());
        assert!(parse_accounts("a=x").is_err());
        assert_eq!(
            parse_account_uri("http://127.0.0.1:7801/alice").unwrap(),
            ("http://127.0.0.1:7801".into(), "alice".into())
        );
        assert!(parse_account_uri("alice").is_err());
        assert!(parse_account_uri("http://127.0.0.1:7801/").is_err());
    }
}
