//! The bank example on PostgreSQL, end to end: a real `treatyd` (sled log) and two
//! `bank-account --store postgres://...` processes, each on its own database of a private
//! PostgreSQL server (`treaty-pg-harness`). 2PC and saga transfers move money; refused ones
//! (insufficient funds) change nothing and leave no prepared transaction behind.

use std::time::Duration;
use treaty_pg_harness::{PgOptions, PgServer};
use treaty_sdk::{Branch, Client, Outcome, Step, TxState};
use treaty_tests::{bank, wait_until, BankAccount, Treatyd};

const WAIT: Duration = Duration::from_secs(20);

fn payload(account: &str, amount: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "account": account, "amount": amount })).unwrap()
}

struct Bank {
    client: Client,
    a: BankAccount,
    b: BankAccount,
    urls: [String; 2],
    _treatyd: Treatyd,
    _server: PgServer,
    _dir: tempfile::TempDir,
}

impl Bank {
    /// (alice balance, alice held, bob balance, bob held)
    async fn balances(&self) -> (i64, i64, i64, i64) {
        let a = bank::balances(&self.a.uri()).await.expect("balances a");
        let b = bank::balances(&self.b.uri()).await.expect("balances b");
        (a["alice"].0, a["alice"].1, b["bob"].0, b["bob"].1)
    }

    async fn two_phase(&self, amount: i64) -> (String, Outcome) {
        let s = self
            .client
            .two_phase()
            .branch(Branch::new(self.a.uri(), "debit").payload(payload("alice", amount)))
            .branch(Branch::new(self.b.uri(), "credit").payload(payload("bob", amount)))
            .submit_and_wait(WAIT)
            .await
            .expect("2PC submitted");
        (s.gid, s.outcome)
    }

    async fn saga(&self, amount: i64) -> (String, Outcome) {
        let step = |uri: String, handler: &str, account: &str| {
            Step::new(uri, handler)
                .payload(payload(account, amount))
                .compensation(payload(account, amount))
        };
        let s = self
            .client
            .saga()
            .step(step(self.a.uri(), "saga-debit", "alice"))
            .step(step(self.b.uri(), "saga-credit", "bob"))
            .submit_and_wait(WAIT)
            .await
            .expect("saga submitted");
        (s.gid, s.outcome)
    }

    /// Waits until the coordinator has ended `gid` (every branch answered its phase two).
    async fn ended(&self, gid: &str) -> TxState {
        wait_until(
            &format!("{gid} terminal"),
            Duration::from_secs(60),
            || async {
                let tx = self.client.get(gid).await.ok()?;
                tx.state.is_terminal().then_some(tx.state)
            },
        )
        .await
    }

    /// Prepared transactions in either bank database.
    async fn prepared(&self) -> i64 {
        let mut n = 0;
        for url in &self.urls {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            let row = client
                .query_one(
                    "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
                    &[],
                )
                .await
                .expect("count prepared transactions");
            n += row.get::<_, i64>(0);
        }
        n
    }
}

async fn bank_on_postgres() -> Option<Bank> {
    let server = PgServer::start_for_test(PgOptions {
        fsync: false,
        ..PgOptions::default()
    })?;
    let dir = tempfile::tempdir().expect("temp dir");
    let urls = [
        server.create_database("bank_a").expect("database a"),
        server.create_database("bank_b").expect("database b"),
    ];
    let treatyd = Treatyd::start(&dir.path().join("treatyd"), &[], &[]).expect("treatyd");
    let a = BankAccount::start_on_postgres(&urls[0], &treatyd.uri(), "alice=100").expect("a");
    let b = BankAccount::start_on_postgres(&urls[1], &treatyd.uri(), "bob=50").expect("b");
    let client = Client::connect(treatyd.uri()).await.expect("connect");
    Some(Bank {
        client,
        a,
        b,
        urls,
        _treatyd: treatyd,
        _server: server,
        _dir: dir,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_between_banks_on_postgres_by_2pc_and_saga() {
    let Some(bank) = bank_on_postgres().await else {
        return;
    };
    assert_eq!(bank.balances().await, (100, 0, 50, 0));

    let (gid, outcome) = bank.two_phase(30).await;
    assert_eq!(outcome, Outcome::Committed);
    assert_eq!(bank.ended(&gid).await, TxState::Committed);
    assert_eq!(bank.balances().await, (70, 0, 80, 0));
    let rows = bank::barrier_rows(&bank.a.uri(), &gid).await.expect("rows");
    let ops: Vec<_> = rows
        .iter()
        .map(|r| (r.op.as_str(), r.answer.as_str()))
        .collect();
    assert_eq!(ops, [("commit", "done"), ("prepare", "prepared")]);

    let (gid, outcome) = bank.saga(10).await;
    assert_eq!(outcome, Outcome::Committed);
    assert_eq!(bank.ended(&gid).await, TxState::Committed);
    assert_eq!(bank.balances().await, (60, 0, 90, 0));

    // Refused: alice has 60. Nothing moves, nothing stays prepared.
    let (gid, outcome) = bank.two_phase(1_000).await;
    assert_eq!(outcome, Outcome::Aborted);
    assert_eq!(bank.ended(&gid).await, TxState::Aborted);
    let tx = bank.client.get(&gid).await.expect("get");
    let reason = tx.reason.unwrap_or_default();
    assert!(reason.contains("insufficient funds"), "{reason}");
    assert_eq!(bank.balances().await, (60, 0, 90, 0));

    let (gid, outcome) = bank.saga(1_000).await;
    assert_eq!(outcome, Outcome::Aborted);
    assert_eq!(bank.ended(&gid).await, TxState::Aborted);
    assert_eq!(bank.balances().await, (60, 0, 90, 0));

    assert_eq!(bank.prepared().await, 0, "no prepared transaction left");
}

/// Prepared on PostgreSQL, then everything crashes before the commit: `treatyd` right after
/// its decision is durable (failpoint), both account services (SIGKILL) and the PostgreSQL
/// server (SIGKILL). The prepared transactions survive; once all restart, the coordinator's
/// commit lands and nothing stays prepared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2pc_transfer_prepared_on_postgres_commits_after_everything_crashed() {
    let Some(mut bank) = bank_on_postgres().await else {
        return;
    };
    bank._treatyd
        .restart_with(&[("FAILPOINTS", "treaty::after_decision_durable=return")])
        .expect("treatyd with the failpoint");
    bank.client = Client::connect(bank._treatyd.uri()).await.expect("connect");
    let gid = "pg-crash-after-decision";
    let result = bank
        .client
        .two_phase()
        .gid(gid)
        .branch(Branch::new(bank.a.uri(), "debit").payload(payload("alice", 40)))
        .branch(Branch::new(bank.b.uri(), "credit").payload(payload("bob", 40)))
        .submit_and_wait(WAIT)
        .await;
    assert!(result.is_err(), "treatyd died mid-call: {result:?}");
    wait_until(
        "treatyd to exit at the failpoint",
        Duration::from_secs(10),
        || {
            let exited = bank._treatyd.proc.exited().is_some();
            async move { exited.then_some(()) }
        },
    )
    .await;
    // Prepared, not committed: PostgreSQL holds both branches, invisible to readers.
    assert_eq!(bank.balances().await, (100, 0, 50, 0));
    assert_eq!(bank.prepared().await, 2);

    bank.a.kill();
    bank.b.kill();
    bank._server.kill();
    bank._server.restart().expect("PostgreSQL restarts");
    assert_eq!(
        bank.prepared().await,
        2,
        "prepared transactions survive a crash"
    );
    bank.a.restart().expect("a restarts");
    bank.b.restart().expect("b restarts");
    bank._treatyd.restart().expect("treatyd restarts");
    bank.client = Client::connect(bank._treatyd.uri()).await.expect("connect");

    assert_eq!(bank.ended(gid).await, TxState::Committed);
    assert_eq!(bank.balances().await, (60, 0, 90, 0));
    assert_eq!(bank.prepared().await, 0, "no prepared transaction left");
}

/// A participant alone is SIGKILLed between prepare and commit: its branch stays prepared in
/// PostgreSQL across the crash, and once the service is back the commit lands there (the
/// coordinator's retry or the restarted service's in-doubt resolution, whichever is first),
/// exactly once. treatyd holds its commits back for a while after the decision is durable
/// (a `sleep` failpoint, which also blocks the transaction's shard: nothing here asks
/// treatyd about it meanwhile) so that the kill falls between the two phases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_killed_between_prepare_and_commit_commits_after_its_restart() {
    let Some(mut bank) = bank_on_postgres().await else {
        return;
    };
    bank._treatyd
        .restart_with(&[
            ("FAILPOINTS", "treaty::after_decision_durable=sleep(6000)"),
            // Commit retries while bob is down stay short.
            ("TREATY_INITIAL_BACKOFF_MS", "20"),
            ("TREATY_MAX_BACKOFF_MS", "200"),
        ])
        .expect("treatyd with the failpoint");
    bank.client = Client::connect(bank._treatyd.uri()).await.expect("connect");
    let gid = "pg-participant-killed";
    let submit = {
        let tx = bank
            .client
            .two_phase()
            .gid(gid)
            .branch(Branch::new(bank.a.uri(), "debit").payload(payload("alice", 40)))
            .branch(Branch::new(bank.b.uri(), "credit").payload(payload("bob", 40)));
        tokio::spawn(async move { tx.submit_and_wait(Duration::from_secs(60)).await })
    };
    wait_until(
        "both branches prepared",
        Duration::from_secs(20),
        || async { (bank.prepared().await == 2).then_some(()) },
    )
    .await;
    bank.b.kill();
    assert_eq!(
        bank.prepared().await,
        2,
        "bob's branch stays prepared after its service died"
    );
    bank.b.restart().expect("bob's service restarts");

    let told = submit.await.expect("task").expect("the client is told");
    assert_eq!(told.outcome, Outcome::Committed);
    assert_eq!(bank.ended(gid).await, TxState::Committed);
    assert_eq!(bank.balances().await, (60, 0, 90, 0), "moved exactly once");
    assert_eq!(bank.prepared().await, 0, "no prepared transaction left");
}
