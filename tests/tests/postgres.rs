//! `treatyd --store postgres://...` as a real process against a private PostgreSQL server
//! (`treaty-pg-harness`): what an outage of the database does to a coordinator, and that a
//! transaction in flight during it finishes once the database is back, without a restart.
//!
//! Without PostgreSQL installed the test skips with a message outside CI and fails in CI.

use std::process::Command;
use std::time::Duration;
use treaty_pg_harness::{PgOptions, PgServer};
use treaty_proto::v1 as pb;
use treaty_sdk::{Client, Outcome, Step, TxState};
use treaty_tests::{bank, http_get, treatyd_bin, wait_until, BankAccount, Proc};

fn payload(account: &str, amount: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "account": account, "amount": amount })).unwrap()
}

fn saga_step(endpoint: &str, handler: &str, account: &str, amount: i64) -> Step {
    Step::new(endpoint, handler)
        .payload(payload(account, amount))
        .compensation(payload(account, amount))
}

/// gRPC health of the Coordinator service.
async fn health(uri: &str) -> Option<i32> {
    let ch = tonic::transport::Endpoint::from_shared(uri.to_string())
        .ok()?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = c
        .check(tonic_health::pb::HealthCheckRequest {
            service: "treaty.v1.Coordinator".into(),
        })
        .await
        .ok()?;
    Some(r.into_inner().status)
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_database_is_unavailable_and_treatyd_resumes_when_it_returns() {
    let Some(mut pg) = PgServer::start_for_test(PgOptions::default()) else {
        return;
    };
    let url = pg.create_database("treaty").expect("create database");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(treatyd_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--store", &url])
        .args(["--initial-backoff-ms", "20", "--max-backoff-ms", "200"])
        .env(
            "TREATY_LOG_LEVEL",
            std::env::var("TREATY_TEST_LOG").unwrap_or("warn".into()),
        );
    let mut treatyd = Proc::spawn("treatyd", cmd, Duration::from_secs(60)).expect("treatyd");
    let admin = treatyd
        .admin_addr(Duration::from_secs(10))
        .expect("admin address");
    let a = BankAccount::start(&dir.path().join("a"), &treatyd.uri(), "alice=100").expect("a");
    let mut b = BankAccount::start(&dir.path().join("b"), &treatyd.uri(), "bob=50").expect("b");
    let client = Client::connect(treatyd.uri()).await.expect("connect");

    // A saga in flight: its first step ran, its second waits for bob's service.
    b.kill();
    let gid = client
        .saga()
        .step(saga_step(&a.uri(), "saga-debit", "alice", 10))
        .step(saga_step(&b.uri(), "saga-credit", "bob", 10))
        .deadline(Duration::from_secs(120))
        .submit()
        .await
        .expect("submit")
        .gid;
    assert_eq!(client.get(&gid).await.expect("get").state, TxState::Active);

    // The database goes away: the saga's next retry cannot be logged.
    pg.kill();
    let status = wait_until(
        "treatyd to report NOT_SERVING",
        Duration::from_secs(30),
        || async { health(&treatyd.uri()).await.filter(|s| *s == NOT_SERVING) },
    )
    .await;
    assert_eq!(status, NOT_SERVING);
    assert_eq!(http_get(admin, "/readyz").expect("readyz").0, 503);
    let mut raw = pb::coordinator_client::CoordinatorClient::connect(treatyd.uri())
        .await
        .expect("connect");
    let err = raw
        .get(pb::GetRequest {
            gid: gid.clone(),
            ..Default::default()
        })
        .await
        .expect_err("no answer while the database is down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        treatyd.exited().is_none(),
        "treatyd must not exit while the database is down"
    );

    // Both come back: the saga finishes, once, without a restart of treatyd.
    b.restart().expect("restart b");
    pg.restart().expect("restart PostgreSQL");
    wait_until(
        "treatyd to serve again",
        Duration::from_secs(60),
        || async {
            let ready = http_get(admin, "/readyz").ok().map(|r| r.0) == Some(200);
            let serving = health(&treatyd.uri()).await == Some(SERVING);
            (ready && serving).then_some(())
        },
    )
    .await;
    let client = Client::connect(treatyd.uri()).await.expect("connect");
    let state = wait_until("the saga to finish", Duration::from_secs(60), || async {
        let tx = client.get(&gid).await.ok()?;
        tx.state.is_terminal().then_some(tx.state)
    })
    .await;
    assert_eq!(state, TxState::Committed);
    let (ab, bb) = (
        bank::balances(&a.uri()).await.expect("balances a"),
        bank::balances(&b.uri()).await.expect("balances b"),
    );
    assert_eq!((ab["alice"].0, bb["bob"].0), (90, 60), "moved exactly once");
    assert!(treatyd.exited().is_none(), "the same treatyd process");
    // And new work is taken again.
    let again = client
        .saga()
        .step(saga_step(&a.uri(), "saga-debit", "alice", 5))
        .step(saga_step(&b.uri(), "saga-credit", "bob", 5))
        .submit_and_wait(Duration::from_secs(20))
        .await
        .expect("a new saga");
    assert_eq!(again.outcome, Outcome::Committed);
}
