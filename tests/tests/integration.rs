//! End-to-end tests with real processes on 127.0.0.1: `treatyd` and the bank example's
//! account service, on OS-assigned ports, in temporary directories. Every process is killed on
//! drop, so a failing test leaves nothing behind.

use futures::StreamExt;
use std::time::Duration;
use treaty_proto::v1 as pb;
use treaty_sdk::{
    Branch, BranchState, Client, ClientError, ListFilter, ManualResolution, Mode, Outcome, Step,
    TransactionStatus, TxState,
};
use treaty_tests::{bank, run_to_end, wait_until, BankAccount, Treatyd};

/// One coordinator and two bank instances: alice=100 on `a`, bob=50 on `b`.
struct Bank {
    _dir: tempfile::TempDir,
    treatyd: Treatyd,
    a: BankAccount,
    b: BankAccount,
    client: Client,
}

async fn bank_cluster(treatyd_args: &[&str]) -> Bank {
    let dir = tempfile::tempdir().expect("temp dir");
    let treatyd = Treatyd::start(&dir.path().join("treatyd"), treatyd_args, &[]).expect("treatyd");
    let a = BankAccount::start(&dir.path().join("a"), &treatyd.uri(), "alice=100").expect("a");
    let b = BankAccount::start(&dir.path().join("b"), &treatyd.uri(), "bob=50").expect("b");
    let client = Client::connect(treatyd.uri()).await.expect("connect");
    Bank {
        _dir: dir,
        treatyd,
        a,
        b,
        client,
    }
}

fn payload(account: &str, amount: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "account": account, "amount": amount })).unwrap()
}

/// A saga step whose compensation payload is its payload (the bank's handlers undo by it).
fn saga_step(endpoint: &str, handler: &str, account: &str, amount: i64) -> Step {
    Step::new(endpoint, handler)
        .payload(payload(account, amount))
        .compensation(payload(account, amount))
}

impl Bank {
    fn two_phase(&self, amount: i64) -> treaty_sdk::TwoPhaseBuilder {
        self.client
            .two_phase()
            .branch(Branch::new(self.a.uri(), "debit").payload(payload("alice", amount)))
            .branch(Branch::new(self.b.uri(), "credit").payload(payload("bob", amount)))
    }

    fn saga(&self, amount: i64) -> treaty_sdk::SagaBuilder {
        self.client
            .saga()
            .step(saga_step(&self.a.uri(), "saga-debit", "alice", amount))
            .step(saga_step(&self.b.uri(), "saga-credit", "bob", amount))
    }

    /// (alice balance, alice held, bob balance, bob held)
    async fn balances(&self) -> (i64, i64, i64, i64) {
        let a = bank::balances(&self.a.uri()).await.expect("balances a");
        let b = bank::balances(&self.b.uri()).await.expect("balances b");
        (a["alice"].0, a["alice"].1, b["bob"].0, b["bob"].1)
    }

    /// Wait until the transaction is terminal in the coordinator and return its state.
    async fn terminal(&self, gid: &str) -> TxState {
        wait_until(
            &format!("{gid} to be terminal"),
            Duration::from_secs(60),
            || async {
                let tx = self.client.get(gid).await.ok()?;
                tx.state.is_terminal().then_some(tx.state)
            },
        )
        .await
    }
}

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_commit_moves_money_between_instances() {
    let bank = bank_cluster(&[]).await;
    let gid = "2pc-commit-1";
    let submitted = bank
        .two_phase(30)
        .gid(gid)
        .submit_and_wait(WAIT)
        .await
        .unwrap();
    assert_eq!(submitted.gid, gid);
    assert_eq!(submitted.outcome, Outcome::Committed);
    assert!(!submitted.existing);
    assert_eq!(bank.terminal(gid).await, TxState::Committed);
    assert_eq!(bank.balances().await, (70, 0, 80, 0));
    // Begin is idempotent for the same gid and definition, and refuses another definition.
    let again = bank
        .two_phase(30)
        .gid(gid)
        .submit_and_wait(WAIT)
        .await
        .unwrap();
    assert_eq!(again.outcome, Outcome::Committed);
    assert!(again.existing, "a resubmission begins nothing new");
    assert_eq!(bank.balances().await, (70, 0, 80, 0), "no second effect");
    match bank.two_phase(31).gid(gid).submit().await {
        Err(ClientError::GidExists { gid: g, .. }) => assert_eq!(g, gid),
        other => panic!("want ALREADY_EXISTS, got {other:?}"),
    }
}

/// Without `gid(..)`, the gid the SDK generated comes back with the outcome, and names the
/// transaction for `get` and `list`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_and_wait_returns_the_generated_gid() {
    let bank = bank_cluster(&[]).await;
    let submitted = bank.saga(10).submit_and_wait(WAIT).await.unwrap();
    assert_eq!(submitted.outcome, Outcome::Committed);
    let gid = submitted.gid;
    assert_eq!(uuid::Uuid::parse_str(&gid).unwrap().get_version_num(), 7);

    let tx = bank.client.get(&gid).await.unwrap();
    assert_eq!(tx.gid, gid);
    assert_eq!(tx.mode, Mode::Saga);
    assert_eq!(
        (tx.state, tx.outcome),
        (TxState::Committed, Outcome::Committed)
    );
    assert!(!tx.stuck);
    assert!(tx.created_at <= tx.updated_at);
    let branches: Vec<_> = tx
        .branches
        .iter()
        .map(|b| (b.branch_id, b.endpoint.clone(), b.handler.as_str(), b.state))
        .collect();
    assert_eq!(
        branches,
        [
            (0, bank.a.uri(), "saga-debit", BranchState::Succeeded),
            (1, bank.b.uri(), "saga-credit", BranchState::Succeeded),
        ]
    );

    // A second transaction, then the committed sagas one per page, newest first.
    let second = bank.saga(1).submit_and_wait(WAIT).await.unwrap().gid;
    let filter = ListFilter::new()
        .states([TxState::Committed])
        .mode(Mode::Saga)
        .page_size(1);
    let first_page = bank.client.list(&filter).await.unwrap();
    assert_eq!(first_page.transactions.len(), 1);
    assert_eq!(first_page.transactions[0].gid, second);
    let token = first_page.next_page_token.expect("a second page");
    let next = bank.client.list(&filter.page_token(token)).await.unwrap();
    assert_eq!(next.transactions[0].gid, gid);
    let none = ListFilter::new().mode(Mode::TwoPhase);
    assert!(bank
        .client
        .list(&none)
        .await
        .unwrap()
        .transactions
        .is_empty());
}

/// A client on the caller's own (lazy) channel watches a transaction: the stream starts at
/// its current state, follows it, and ends once it is terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_over_a_callers_channel_ends_when_the_transaction_ends() {
    let mut bank = bank_cluster(&["--initial-backoff-ms", "20", "--max-backoff-ms", "200"]).await;
    let channel = tonic::transport::Endpoint::from_shared(bank.treatyd.uri())
        .unwrap()
        .connect_lazy();
    let client = Client::from_channel(channel);
    // Bob is down: the transaction stays active until he is back.
    bank.b.kill();
    let gid = bank
        .two_phase(10)
        .deadline(Duration::from_secs(60))
        .submit()
        .await
        .unwrap()
        .gid;
    let mut watch = client.watch(&gid).await.unwrap();
    let first = watch.next().await.expect("a first state").unwrap();
    assert_eq!(
        (first.gid.as_str(), first.state),
        (gid.as_str(), TxState::Active)
    );
    bank.b.restart().unwrap();
    let rest: Vec<TransactionStatus> =
        tokio::time::timeout(Duration::from_secs(60), watch.collect::<Vec<_>>())
            .await
            .expect("the watch ends")
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
    let last = rest.last().expect("states after the first");
    assert_eq!(
        (last.state, last.outcome),
        (TxState::Committed, Outcome::Committed)
    );
    assert!(rest[..rest.len() - 1]
        .iter()
        .all(|t| !t.state.is_terminal()));
    assert_eq!(bank.balances().await, (90, 0, 60, 0));
    // A finished transaction's watch is its final state, then the end.
    let again: Vec<_> = client.watch(&gid).await.unwrap().collect().await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].as_ref().unwrap().state, TxState::Committed);
    // An unknown gid fails at once.
    let err = client.watch("no-such-gid").await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_aborts_when_a_participant_refuses() {
    let bank = bank_cluster(&[]).await;
    let submitted = bank.two_phase(1000).submit_and_wait(WAIT).await.unwrap();
    assert_eq!(submitted.outcome, Outcome::Aborted);
    assert_eq!(bank.balances().await, (100, 0, 50, 0));
    // Say why: the refusal reaches the submitter and `Get`, naming the branch.
    let why = format!(
        "branch 0 (debit at {}) refused: insufficient funds: alice has 100, the transfer needs 1000",
        bank.a.uri()
    );
    assert_eq!(submitted.reason.as_deref(), Some(why.as_str()));
    let tx = bank.client.get(&submitted.gid).await.unwrap();
    assert_eq!(tx.reason.as_deref(), Some(why.as_str()));

    // The same for a saga whose first step fails.
    let submitted = bank.saga(1000).submit_and_wait(WAIT).await.unwrap();
    assert_eq!(submitted.outcome, Outcome::Aborted);
    let why = format!(
        "step 0 (saga-debit at {}) failed: insufficient funds: alice has 100, the transfer needs 1000",
        bank.a.uri()
    );
    assert_eq!(submitted.reason.as_deref(), Some(why.as_str()));
    let tx = bank.client.get(&submitted.gid).await.unwrap();
    assert_eq!(tx.reason.as_deref(), Some(why.as_str()));
    // A committed transaction has no reason.
    let ok = bank.two_phase(1).submit_and_wait(WAIT).await.unwrap();
    assert_eq!((ok.outcome, ok.reason), (Outcome::Committed, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_aborts_at_the_deadline_and_releases_held_money() {
    let mut bank = bank_cluster(&["--initial-backoff-ms", "20", "--max-backoff-ms", "200"]).await;
    bank.b.kill();
    let gid = bank
        .two_phase(10)
        .deadline(Duration::from_millis(1500))
        .submit()
        .await
        .unwrap()
        .gid;
    // alice prepared (money held), bob cannot answer: the deadline aborts.
    assert_eq!(
        bank.client.outcome(&gid).await.unwrap().outcome,
        Outcome::Pending
    );
    let outcome = wait_until("abort at deadline", Duration::from_secs(30), || async {
        match bank.client.outcome(&gid).await.ok()?.outcome {
            Outcome::Pending => None,
            o => Some(o),
        }
    })
    .await;
    assert_eq!(outcome, Outcome::Aborted);
    // bob comes back; the abort reaches it and the transaction ends.
    bank.b.restart().unwrap();
    assert_eq!(bank.terminal(&gid).await, TxState::Aborted);
    assert_eq!(bank.balances().await, (100, 0, 50, 0));
}

/// An operator resolves by hand the abort a participant that is gone will never answer; the
/// record keeps who and why, and the transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_resolves_a_branch_whose_participant_is_gone() {
    let mut bank = bank_cluster(&["--initial-backoff-ms", "20", "--max-backoff-ms", "200"]).await;
    bank.b.kill();
    let gid = bank
        .two_phase(10)
        .deadline(Duration::from_millis(1500))
        .submit()
        .await
        .unwrap()
        .gid;
    let by_hand = ManualResolution {
        branch_id: 1,
        operator: "ops@example".into(),
        reason: "bob's service was decommissioned, ticket OPS-1".into(),
    };
    // Phase one: nothing to resolve by hand yet.
    let err = bank.client.resolve(&gid, &by_hand).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Rejected {
                code: tonic::Code::FailedPrecondition,
                ..
            }
        ),
        "{err:?}"
    );
    // The deadline aborts; the abort cannot reach bob.
    wait_until("the abort decision", Duration::from_secs(30), || async {
        let tx = bank.client.get(&gid).await.ok()?;
        (tx.state == TxState::Aborting).then_some(())
    })
    .await;
    let tx = bank.client.resolve(&gid, &by_hand).await.unwrap();
    let resolution = tx.branches[1].resolution.clone().expect("recorded");
    assert_eq!(
        (resolution.operator, resolution.reason),
        (by_hand.operator, by_hand.reason)
    );
    assert_eq!(bank.terminal(&gid).await, TxState::Aborted);
    // Alice's held money is released (bob stays down: his side had nothing prepared).
    let alice = bank::balances(&bank.a.uri()).await.unwrap();
    assert_eq!(alice["alice"], (100, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_commits_and_a_failed_saga_is_compensated() {
    let bank = bank_cluster(&[]).await;
    assert_eq!(
        bank.saga(25).submit_and_wait(WAIT).await.unwrap().outcome,
        Outcome::Committed
    );
    assert_eq!(bank.balances().await, (75, 0, 75, 0));
    // Debit succeeds, then a third step fails: the debit and the credit are compensated.
    let gid = bank
        .saga(5)
        .step(saga_step(&bank.b.uri(), "saga-debit", "bob", 10_000))
        .submit()
        .await
        .unwrap()
        .gid;
    assert_eq!(bank.terminal(&gid).await, TxState::Aborted);
    assert_eq!(bank.balances().await, (75, 0, 75, 0));
    let tx = bank.client.get(&gid).await.unwrap();
    let states: Vec<BranchState> = tx.branches.iter().map(|b| b.state).collect();
    assert_eq!(
        states,
        [
            BranchState::Aborted,
            BranchState::Aborted,
            BranchState::Failed
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trip_saga_compensates_in_reverse_order() {
    let dir = tempfile::tempdir().unwrap();
    let treatyd = Treatyd::start(&dir.path().join("treatyd"), &[], &[]).unwrap();
    let trip = treaty_tests::binary("treaty-examples", "trip", "");
    let mut cmd = std::process::Command::new(trip);
    cmd.args([
        "--coordinator",
        &treatyd.uri(),
        "--fail-at",
        "car",
        "--data-dir",
    ])
    .arg(dir.path().join("trip"));
    let (code, out, err) = run_to_end(cmd, Duration::from_secs(60)).unwrap();
    assert!(
        out.contains("ABORTED"),
        "stdout: {out}\nstderr: {err} (exit {code})"
    );
    let journal: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(": booked") || l.contains(": cancelled") || l.contains(": refused"))
        .map(str::trim)
        .collect();
    assert_eq!(
        journal,
        [
            "flight: booked",
            "hotel: booked",
            "car: refused",
            "hotel: cancelled",
            "flight: cancelled"
        ],
        "stdout: {out}"
    );
}

/// Duplicated, late and reordered deliveries straight to a participant: one effect each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_reordered_deliveries_have_one_effect() {
    let bank = bank_cluster(&[]).await;
    let mut p = pb::participant_client::ParticipantClient::connect(bank.a.uri())
        .await
        .unwrap();
    let req = |gid: &str, handler: &str, amount: i64| pb::BranchRequest {
        gid: gid.into(),
        branch_id: 0,
        handler: handler.into(),
        payload: payload("alice", amount).into(),
        attempt: 1,
        deadline_unix_ms: 0,
        ..Default::default()
    };
    // Prepare twice, commit twice: debited once.
    for _ in 0..2 {
        let r = p
            .prepare(req("dup-1", "debit", 10))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::PrepareResult::Prepared);
    }
    assert_eq!(bank.balances().await, (90, 10, 50, 0));
    for _ in 0..2 {
        let r = p
            .commit(req("dup-1", "debit", 10))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::PhaseTwoResult::Done);
    }
    assert_eq!(bank.balances().await, (90, 0, 50, 0));
    // Abort arrives before its prepare: a null abort, and the late prepare is refused.
    let r = p
        .abort(req("late-1", "debit", 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Done);
    let r = p
        .prepare(req("late-1", "debit", 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PrepareResult::Refused);
    // The same for a saga step: compensation first, then the execute fails.
    let r = p
        .compensate(req("late-2", "saga-debit", 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::PhaseTwoResult::Done);
    let r = p
        .execute(req("late-2", "saga-debit", 10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result(), pb::ExecuteResult::Failed);
    // Executed twice, compensated twice: net zero, applied once each.
    for _ in 0..2 {
        let r = p
            .execute(req("dup-2", "saga-debit", 10))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::ExecuteResult::Succeeded);
    }
    assert_eq!(bank.balances().await, (80, 0, 50, 0));
    for _ in 0..2 {
        let r = p
            .compensate(req("dup-2", "saga-debit", 10))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result(), pb::PhaseTwoResult::Done);
    }
    assert_eq!(bank.balances().await, (90, 0, 50, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_comes_back_completes_the_transaction() {
    let mut bank = bank_cluster(&["--initial-backoff-ms", "20", "--max-backoff-ms", "200"]).await;
    bank.b.kill();
    let gid = bank
        .two_phase(10)
        .deadline(Duration::from_secs(60))
        .submit()
        .await
        .unwrap()
        .gid;
    // While bob is down nothing is decided; once it is back the prepare goes through.
    let tx = bank.client.get(&gid).await.unwrap();
    assert_eq!(tx.state, TxState::Active);
    bank.b.restart().unwrap();
    assert_eq!(bank.terminal(&gid).await, TxState::Committed);
    assert_eq!(bank.balances().await, (90, 0, 60, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn treatyd_killed_after_the_decision_finishes_the_transaction_after_restart() {
    let mut bank = bank_cluster(&[]).await;
    // Crash right after the commit decision is durable, before any Commit is sent.
    bank.treatyd
        .restart_with(&[("FAILPOINTS", "treaty::after_decision_durable=return")])
        .unwrap();
    let client = Client::connect(bank.treatyd.uri()).await.unwrap();
    let gid = "crash-after-decision";
    let result = client
        .two_phase()
        .gid(gid)
        .branch(Branch::new(bank.a.uri(), "debit").payload(payload("alice", 40)))
        .branch(Branch::new(bank.b.uri(), "credit").payload(payload("bob", 40)))
        .submit_and_wait(WAIT)
        .await;
    assert!(
        matches!(result, Err(ClientError::OutcomeUnknown { .. })),
        "the daemon died mid-call: {result:?}"
    );
    wait_until(
        "treatyd to exit at the failpoint",
        Duration::from_secs(10),
        || {
            let exited = bank.treatyd.proc.exited().is_some();
            async move { exited.then_some(()) }
        },
    )
    .await;
    // Prepared but not committed: alice's money is held.
    assert_eq!(bank.balances().await, (60, 40, 50, 0));
    bank.treatyd.restart().unwrap();
    let client = Client::connect(bank.treatyd.uri()).await.unwrap();
    let bank = Bank { client, ..bank };
    assert_eq!(bank.terminal(gid).await, TxState::Committed);
    assert_eq!(bank.balances().await, (60, 0, 90, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_invalid_argument_naming_the_field() {
    let bank = bank_cluster(&[]).await;
    // Malformed requests the typed client cannot even express: the generated client, on a
    // channel of our own.
    let channel = tonic::transport::Endpoint::from_shared(bank.treatyd.uri())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::coordinator_client::CoordinatorClient::new(channel);
    let good = pb::BeginRequest {
        mode: pb::Mode::Saga as i32,
        branches: vec![pb::Branch {
            endpoint: bank.a.uri(),
            handler: "saga-debit".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let cases: Vec<(&str, pb::BeginRequest)> = vec![
        (
            "mode",
            pb::BeginRequest {
                mode: 0,
                ..good.clone()
            },
        ),
        (
            "branches",
            pb::BeginRequest {
                branches: vec![],
                ..good.clone()
            },
        ),
        (
            "gid",
            pb::BeginRequest {
                gid: "no spaces".into(),
                ..good.clone()
            },
        ),
        (
            "branches[0].endpoint",
            pb::BeginRequest {
                branches: vec![pb::Branch {
                    endpoint: "not a uri".into(),
                    ..good.branches[0].clone()
                }],
                ..good.clone()
            },
        ),
        (
            "branches[0].handler",
            pb::BeginRequest {
                branches: vec![pb::Branch {
                    handler: String::new(),
                    ..good.branches[0].clone()
                }],
                ..good.clone()
            },
        ),
    ];
    for (field, req) in cases {
        let status = c.begin(req).await.expect_err(field);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{field}: {status:?}"
        );
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }
    let status = c
        .get(pb::GetRequest { gid: String::new() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = c
        .get(pb::GetRequest {
            gid: "unknown".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    // Presumed abort: an unknown gid's outcome is ABORTED.
    let o = c
        .outcome(pb::OutcomeRequest {
            gid: "unknown".into(),
        })
        .await
        .unwrap();
    assert_eq!(o.into_inner().outcome(), pb::Outcome::Aborted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn treatyd_refuses_a_locked_data_dir_a_used_port_and_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut first = Treatyd::start(&data, &[], &[]).unwrap();
    let run = |args: Vec<String>| {
        let mut cmd = std::process::Command::new(treaty_tests::treatyd_bin());
        cmd.args(args);
        run_to_end(cmd, Duration::from_secs(30)).unwrap()
    };
    let data_s = data.display().to_string();
    let (code, _, err) = run(vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data_s.clone(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("locked"), "{err}");
    let (code, _, err) = run(vec![
        "--listen".into(),
        first.proc.addr.to_string(),
        "--data-dir".into(),
        dir.path().join("other").display().to_string(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("address already in use"), "{err}");
    let (code, _, err) = run(vec!["--call-timeout-ms".into(), "0".into()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("call-timeout must be greater than zero"),
        "{err}"
    );
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "no_such_setting = 1\n").unwrap();
    let (code, _, err) = run(vec!["--config".into(), bad_toml.display().to_string()]);
    assert_eq!(code, 2);
    assert!(err.contains("no_such_setting"), "{err}");
    let (code, out, _) = run(vec!["--help".into()]);
    assert_eq!(code, 0);
    for flag in [
        "--listen",
        "--data-dir",
        "--config",
        "TREATY_LISTEN",
        "--call-timeout-ms",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}");
    }
    // SIGTERM: a graceful stop with exit status 0.
    let status = first
        .proc
        .terminate(Duration::from_secs(30))
        .expect("exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_flags_then_environment_then_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("treaty.toml");
    std::fs::write(&file, "max_branches = 1\nmax_gid_bytes = 5\n").unwrap();
    let file_s = file.display().to_string();
    // File says 1 branch; the environment overrides the gid limit; a flag overrides the env.
    let t = Treatyd::start(
        &dir.path().join("data"),
        &["--config", &file_s, "--max-gid-bytes", "8"],
        &[("TREATY_MAX_GID_BYTES", "6")],
    )
    .unwrap();
    let mut c = pb::coordinator_client::CoordinatorClient::connect(t.uri())
        .await
        .unwrap();
    let branch = pb::Branch {
        endpoint: "http://127.0.0.1:1".into(),
        handler: "h".into(),
        ..Default::default()
    };
    let req = |gid: &str, n: usize| pb::BeginRequest {
        gid: gid.into(),
        mode: pb::Mode::Saga as i32,
        branches: vec![branch.clone(); n],
        deadline_ms: 100,
        ..Default::default()
    };
    let e = c.begin(req("abcdefgh", 2)).await.unwrap_err();
    assert!(
        e.message().starts_with("branches: at most 1"),
        "{}",
        e.message()
    );
    c.begin(req("abcdefgh", 1))
        .await
        .expect("8-byte gid allowed by the flag");
    let e = c.begin(req("abcdefghi", 1)).await.unwrap_err();
    assert!(e.message().starts_with("gid: at most 8"), "{}", e.message());
}

/// Issue 8, failure 1, with the real daemon and disk: the fdatasync of the commit decision
/// fails (failpoint `treaty::sync::fsync_eio`, armed to let the sync before recovery and the
/// `Begun` round pass). treatyd must stop at once (fail-stop) without telling anyone an
/// outcome; after a restart the transaction ends one way, on both participants.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_stops_treatyd_before_any_outcome_is_told() {
    let mut bank = bank_cluster(&[]).await;
    // Round 1: the sync before recovery; round 2: `Begun`; round 3: the decision fails.
    bank.treatyd
        .restart_with(&[("FAILPOINTS", "treaty::sync::fsync_eio=2*off->return")])
        .unwrap();
    let client = Client::connect(bank.treatyd.uri()).await.unwrap();
    let gid = "fsync-eio-at-decision";
    let result = client
        .two_phase()
        .gid(gid)
        .branch(Branch::new(bank.a.uri(), "debit").payload(payload("alice", 40)))
        .branch(Branch::new(bank.b.uri(), "credit").payload(payload("bob", 40)))
        .submit_and_wait(WAIT)
        .await;
    assert!(
        !matches!(&result, Ok(s) if s.outcome != Outcome::Pending),
        "an outcome was told although the decision's fsync failed: {result:?}"
    );
    let status = wait_until("treatyd to fail-stop", Duration::from_secs(10), || {
        let exited = bank.treatyd.proc.exited();
        async move { exited }
    })
    .await;
    assert!(
        !status.success(),
        "fail-stop exits with an error: {status:?}"
    );
    // Both branches prepared (the failure hit the decision, not an earlier write).
    assert_eq!(bank.balances().await, (60, 40, 50, 0));
    bank.treatyd.restart().unwrap();
    let client = Client::connect(bank.treatyd.uri()).await.unwrap();
    let bank = Bank { client, ..bank };
    // Whatever the disk kept decides, and both participants follow it.
    match bank.terminal(gid).await {
        TxState::Committed => assert_eq!(bank.balances().await, (60, 0, 90, 0)),
        TxState::Aborted => assert_eq!(bank.balances().await, (100, 0, 50, 0)),
        other => panic!("not terminal: {other:?}"),
    }
}

/// Issue 8, failure 5: a shard that panics must take the daemon down (fail-stop), not leave
/// it serving with one shard silently gone (before: health stayed SERVING and every gid of
/// that shard froze).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_shard_stops_treatyd() {
    let mut bank = bank_cluster(&[]).await;
    bank.treatyd
        .restart_with(&[("FAILPOINTS", "treaty::shard_panic=1*off->panic")])
        .unwrap();
    let client = Client::connect(bank.treatyd.uri()).await.unwrap();
    for i in 0..3 {
        // The first message is served; the next one panics its shard.
        let _ = client
            .saga()
            .gid(format!("shard-panic-{i}"))
            .step(saga_step(&bank.a.uri(), "saga-debit", "alice", 1))
            .submit()
            .await;
        if bank.treatyd.proc.exited().is_some() {
            break;
        }
    }
    let status = wait_until("treatyd to exit", Duration::from_secs(10), || {
        let exited = bank.treatyd.proc.exited();
        async move { exited }
    })
    .await;
    assert!(
        !status.success(),
        "a dead shard stops the process: {status:?}"
    );
}

/// Issue 8, failure 1 on the participant side: a bank instance whose barrier row cannot be
/// made durable (fsync EIO, failpoint) stops serving and exits with an error (fail-stop)
/// instead of staying up; after a restart the transaction completes on the disk's truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_whose_fsync_fails_stops_and_recovers_on_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let treatyd = Treatyd::start(
        &dir.path().join("treatyd"),
        &["--initial-backoff-ms", "20", "--max-backoff-ms", "200"],
        &[],
    )
    .expect("treatyd");
    let a = BankAccount::start(&dir.path().join("a"), &treatyd.uri(), "alice=100").expect("a");
    let mut b = BankAccount::start_from(
        treaty_tests::bank_account_bin_with("failpoints"),
        &dir.path().join("b"),
        &treatyd.uri(),
        "bob=50",
    )
    .expect("b");
    b.restart_with(&[("FAILPOINTS", "treaty::sync::fsync_eio=return")])
        .expect("b with the failpoint");
    let client = Client::connect(treatyd.uri()).await.expect("connect");
    let gid = client
        .two_phase()
        .branch(Branch::new(a.uri(), "debit").payload(payload("alice", 10)))
        .branch(Branch::new(b.uri(), "credit").payload(payload("bob", 10)))
        .deadline(Duration::from_secs(60))
        .submit()
        .await
        .expect("begin")
        .gid;
    let status = wait_until(
        "bob's service to fail-stop",
        Duration::from_secs(20),
        || {
            let exited = b.proc.exited();
            async move { exited }
        },
    )
    .await;
    assert!(
        !status.success(),
        "a failed fsync stops the participant: {status:?}"
    );
    b.restart().expect("b restarts clean");
    let bank = Bank {
        _dir: dir,
        treatyd,
        a,
        b,
        client,
    };
    let state = bank.terminal(&gid).await;
    match state {
        TxState::Committed => assert_eq!(bank.balances().await, (90, 0, 60, 0)),
        TxState::Aborted => assert_eq!(bank.balances().await, (100, 0, 50, 0)),
        other => panic!("not terminal: {other:?}"),
    }
}
