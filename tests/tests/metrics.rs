//! The admin listener of a real `treatyd` (`--admin-listen 127.0.0.1:0`): `/metrics` counts
//! what the bank's transactions did, `/healthz` and `/readyz` say what state the daemon is in.
//! Processes are killed on drop; nothing sleeps to synchronize.

use std::net::SocketAddr;
use std::time::Duration;
use treaty_proto::v1 as pb;
use treaty_sdk::{Branch, Client, Outcome};
use treaty_tests::{http_get, metric_value, wait_until, BankAccount, Treatyd};

const WAIT: Duration = Duration::from_secs(20);

fn payload(account: &str, amount: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "account": account, "amount": amount })).unwrap()
}

/// The exposition, asserting the scrape itself succeeds.
fn scrape(admin: SocketAddr) -> String {
    let (status, body) = http_get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// Wait until `/readyz` says SERVING (it does not during recovery, which runs after the
/// addresses are printed).
async fn wait_ready(admin: SocketAddr) {
    wait_until("readyz to answer SERVING", WAIT, || async move {
        let (status, body) = http_get(admin, "/readyz").ok()?;
        (status == 200).then(|| assert_eq!(body, "SERVING\n"))
    })
    .await;
}

/// Wait until `series` has `want` in the exposition; return the last exposition.
async fn wait_for(admin: SocketAddr, series: &str, want: f64) -> String {
    wait_until(
        &format!("{series} to be {want}"),
        Duration::from_secs(20),
        || async move {
            let body = scrape(admin);
            (metric_value(&body, series) == Some(want)).then_some(body)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_committed_and_an_aborted_transaction_and_rejections() {
    let dir = tempfile::tempdir().expect("temp dir");
    let treatyd = Treatyd::start(
        &dir.path().join("treatyd"),
        &["--admin-listen", "127.0.0.1:0"],
        &[],
    )
    .expect("treatyd");
    let admin = treatyd.proc.admin_addr(WAIT).expect("admin address");
    let a = BankAccount::start(&dir.path().join("a"), &treatyd.uri(), "alice=100").expect("a");
    let b = BankAccount::start(&dir.path().join("b"), &treatyd.uri(), "bob=50").expect("b");
    let client = Client::connect(treatyd.uri()).await.expect("connect");

    let (status, body) = http_get(admin, "/healthz").expect("healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    wait_ready(admin).await;

    let transfer = |amount: i64| {
        client
            .two_phase()
            .branch(Branch::new(a.uri(), "debit").payload(payload("alice", amount)))
            .branch(Branch::new(b.uri(), "credit").payload(payload("bob", amount)))
    };
    let committed = transfer(30)
        .gid("metrics-commit")
        .submit_and_wait(WAIT)
        .await
        .unwrap();
    assert_eq!(committed.outcome, Outcome::Committed);
    // alice has 70 left: the debit of 1000 is refused, the transaction aborts.
    let aborted = transfer(1000)
        .gid("metrics-abort")
        .submit_and_wait(WAIT)
        .await
        .unwrap();
    assert_eq!(aborted.outcome, Outcome::Aborted);
    // Rejected: the same gid with another definition, and a request with no branches.
    assert!(transfer(31).gid("metrics-commit").submit().await.is_err());
    let mut raw = pb::coordinator_client::CoordinatorClient::connect(treatyd.uri())
        .await
        .unwrap();
    let e = raw
        .begin(pb::BeginRequest {
            gid: "metrics-empty".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // A transaction is counted finished once its phase two is done, after the client heard
    // the outcome: wait for it.
    wait_for(
        admin,
        r#"treaty_transactions_finished_total{mode="2pc",outcome="aborted"}"#,
        1.0,
    )
    .await;
    let m = wait_for(
        admin,
        r#"treaty_transactions_finished_total{mode="2pc",outcome="committed"}"#,
        1.0,
    )
    .await;
    let v = |series: &str| metric_value(&m, series).unwrap_or_else(|| panic!("{series}\n{m}"));
    assert_eq!(v(r#"treaty_transactions_begun_total{mode="2pc"}"#), 2.0);
    assert_eq!(v(r#"treaty_transactions_begun_total{mode="saga"}"#), 0.0);
    assert_eq!(
        v(r#"treaty_transactions_finished_total{mode="saga",outcome="committed"}"#),
        0.0
    );
    assert_eq!(v("treaty_transactions_live"), 0.0);
    assert_eq!(v("treaty_transactions_stuck"), 0.0);
    assert_eq!(
        v(r#"treaty_requests_rejected_total{reason="already_exists"}"#),
        1.0
    );
    assert_eq!(
        v(r#"treaty_requests_rejected_total{reason="invalid_argument"}"#),
        1.0
    );
    // Both commits went out once each and were answered; alice's refusal was counted.
    assert_eq!(
        v(r#"treaty_branch_call_duration_seconds_count{op="commit",result="ok"}"#),
        2.0
    );
    assert_eq!(
        v(r#"treaty_branch_call_duration_seconds_count{op="prepare",result="refused"}"#),
        1.0
    );
    // Forced: both `Begun` records and the commit decision (presumed abort forces no abort).
    assert!(v("treaty_log_forced_write_duration_seconds_count") >= 3.0);
    assert!(v("treaty_log_flush_records_count") >= 1.0);
    assert_eq!(v("treaty_log_fsync_errors_total"), 0.0);
    assert!(!m.contains("gid="), "no series is labelled by gid:\n{m}");
}

/// `/readyz` answers SERVING while treatyd serves, and nothing does once a failed fsync
/// stopped it (fail-stop: the process exits; it must never look ready meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_serving_until_a_failed_fsync_stops_treatyd() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut treatyd = Treatyd::start(
        &dir.path().join("treatyd"),
        &["--admin-listen", "127.0.0.1:0"],
        &[],
    )
    .expect("treatyd");
    // Restarted over its log (created, so no sync of a new log identity): round 1, the sync
    // before recovery, passes; round 2, the `Begun` of the first transaction, fails.
    treatyd
        .restart_with(&[("FAILPOINTS", "treaty::sync::fsync_eio=1*off->return")])
        .unwrap();
    let admin = treatyd.proc.admin_addr(WAIT).expect("admin address");
    wait_ready(admin).await;
    let a = BankAccount::start(&dir.path().join("a"), &treatyd.uri(), "alice=100").expect("a");
    let client = Client::connect(treatyd.uri()).await.expect("connect");
    let result = client
        .two_phase()
        .branch(Branch::new(a.uri(), "debit").payload(payload("alice", 1)))
        .submit()
        .await;
    assert!(result.is_err(), "nothing is told after a failed fsync");
    wait_until("treatyd to fail-stop", WAIT, || {
        let exited = treatyd.proc.exited();
        async move { exited }
    })
    .await;
    // Either the listener is gone with the process, or it must not say ready.
    if let Ok((status, body)) = http_get(admin, "/readyz") {
        assert_ne!(status, 200, "ready after fail-stop: {body}");
    }
}

/// An admin port in use stops treatyd at start, naming the setting; `--help` lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn treatyd_refuses_an_admin_port_in_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut cmd = std::process::Command::new(treaty_tests::treatyd_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--admin-listen", &taken.local_addr().unwrap().to_string()]);
    let (code, _, err) = treaty_tests::run_to_end(cmd, Duration::from_secs(30)).unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("address already in use") && err.contains("--admin-listen"),
        "{err}"
    );
    let mut help = std::process::Command::new(treaty_tests::treatyd_bin());
    help.arg("--help");
    let (code, out, _) = treaty_tests::run_to_end(help, Duration::from_secs(30)).unwrap();
    assert_eq!(code, 0);
    assert!(
        out.contains("--admin-listen") && out.contains("TREATY_ADMIN_LISTEN"),
        "{out}"
    );
}
