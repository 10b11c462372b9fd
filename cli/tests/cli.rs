//! The real `treaty` binary against a real `treatyd` and two bank-account participants:
//! a refused transfer shows its reason, a stuck transaction is listed first, retried and
//! resolved by hand, `--json` parses, and errors have their exit codes.

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use treaty_examples::bank::Leg;
use treaty_sdk::{Branch, Client, Outcome, TxState};
use treaty_tests::{run_to_end, wait_until, BankAccount, Treatyd};

const BOUND: Duration = Duration::from_secs(60);

/// Runs `treaty` against `coordinator`; returns (exit code, stdout, stderr).
fn treaty(coordinator: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_treaty"));
    cmd.arg("--coordinator").arg(coordinator).args(args);
    run_to_end(cmd, BOUND).unwrap_or_else(|e| panic!("treaty {args:?}: {e}"))
}

/// `treaty --json ARGS` that must succeed, parsed.
fn treaty_json(coordinator: &str, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = treaty(coordinator, &all);
    assert_eq!(code, 0, "treaty {all:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("treaty {all:?}: {e}: {out}"))
}

fn two_phase(client: &Client, a: &str, b: &str, amount: i64) -> treaty_sdk::TwoPhaseBuilder {
    client
        .two_phase()
        .branch(Branch::new(a, "debit").payload(Leg::payload("alice", amount)))
        .branch(Branch::new(b, "credit").payload(Leg::payload("bob", amount)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_explains_retries_and_resolves_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let treatyd = Treatyd::start(
        &dir.path().join("treatyd"),
        &[
            "--stuck-after-attempts",
            "1",
            "--initial-backoff-ms",
            "20",
            "--max-backoff-ms",
            "200",
        ],
        &[],
    )
    .unwrap();
    let coord = treatyd.uri();
    let a = BankAccount::start(&dir.path().join("a"), &coord, "alice=100").unwrap();
    let mut b = BankAccount::start(&dir.path().join("b"), &coord, "bob=50").unwrap();
    let client = Client::connect(coord.clone()).await.unwrap();

    // A refused transfer: `show` says why.
    let refused = two_phase(&client, &a.uri(), &b.uri(), 1000)
        .submit_and_wait(Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(refused.outcome, Outcome::Aborted);
    let why = format!(
        "branch 0 (debit at {}) refused: insufficient funds: alice has 100, the transfer needs 1000",
        a.uri()
    );
    let (code, out, err) = treaty(&coord, &["show", &refused.gid]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("reason    {why}")), "{out}");
    assert!(out.contains("refused"), "{out}");
    let shown = treaty_json(&coord, &["show", &refused.gid]);
    assert_eq!(shown["reason"], why.as_str());
    assert_eq!(shown["state"], "aborted");
    assert_eq!(
        shown["branches"][0]["last_error"],
        "insufficient funds: alice has 100, the transfer needs 1000"
    );

    // A stuck one: bob's instance is gone, so the abort after the deadline cannot reach it.
    b.kill();
    let stuck = two_phase(&client, &a.uri(), &b.uri(), 10)
        .deadline(Duration::from_millis(300))
        .submit()
        .await
        .unwrap()
        .gid;
    wait_until("the transaction to be stuck", BOUND, || async {
        client
            .get(&stuck)
            .await
            .ok()
            .filter(|t| t.stuck)
            .map(|_| ())
    })
    .await;
    // And a newer one that commits: newest first alone would list it before the stuck one.
    let newer = client
        .two_phase()
        .branch(Branch::new(a.uri(), "debit").payload(Leg::payload("alice", 1)))
        .submit_and_wait(Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(newer.outcome, Outcome::Committed);

    let (code, out, err) = treaty(&coord, &["list"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("GID"), "{out}");
    assert!(
        lines[1].starts_with(&stuck) && lines[1].contains("STUCK"),
        "{out}"
    );
    assert_eq!(lines.len(), 4, "{out}");
    let listed = treaty_json(&coord, &["list"]);
    let gids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["gid"].as_str().unwrap())
        .collect();
    assert_eq!(
        gids,
        [stuck.as_str(), newer.gid.as_str(), refused.gid.as_str()]
    );
    // Filters, and paging through every page (one transaction per page).
    let only_stuck = treaty_json(&coord, &["list", "--stuck"]);
    assert_eq!(only_stuck.as_array().unwrap().len(), 1);
    // (Its last record is written unforced: the log may still say committing.)
    let committed = treaty_json(
        &coord,
        &[
            "list",
            "--state",
            "committed",
            "--state",
            "committing",
            "--mode",
            "2pc",
        ],
    );
    assert_eq!(committed[0]["gid"], newer.gid.as_str());
    let limited = treaty_json(&coord, &["list", "--limit", "2"]);
    assert_eq!(limited.as_array().unwrap().len(), 2);
    // (Attempts of the stuck one change between two calls: compare the gids.)
    let paged = treaty_json(&coord, &["list", "--page-size", "1"]);
    let paged: Vec<&str> = paged
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["gid"].as_str().unwrap())
        .collect();
    assert_eq!(paged, gids);
    let old = treaty_json(&coord, &["list", "--older-than", "1d"]);
    assert_eq!(old, serde_json::json!([]));
    let shown = treaty_json(&coord, &["show", &stuck]);
    assert!(
        shown["reason"].as_str().unwrap().starts_with(&format!(
            "deadline passed while branch 1 (credit at {})",
            b.uri()
        )),
        "{shown}"
    );

    // Retry sends the waiting abort now (it fails again: bob is still gone).
    let (code, out, err) = treaty(&coord, &["retry", &stuck]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sent now"), "{out}");
    let retried = treaty_json(&coord, &["retry", &stuck]);
    assert!(retried["retried"].is_u64(), "{retried}");

    // Resolve: bob's side is declared aborted by hand, audited; the transaction finishes.
    let resolved = treaty_json(
        &coord,
        &[
            "resolve",
            &stuck,
            "1",
            "--operator",
            "ops@example",
            "--reason",
            "instance b decommissioned, ticket OPS-7",
        ],
    );
    assert_eq!(
        resolved["branches"][1]["resolution"]["operator"],
        "ops@example"
    );
    wait_until("the resolved transaction to finish", BOUND, || async {
        let t = client.get(&stuck).await.ok()?;
        (t.state == TxState::Aborted).then_some(())
    })
    .await;
    let (code, out, err) = treaty(&coord, &["show", &stuck]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("branch 1 resolved by hand by ops@example") && out.contains("ticket OPS-7"),
        "{out}"
    );
    // Resolving again is refused: nothing is outstanding.
    let (code, _, err) = treaty(
        &coord,
        &["resolve", &stuck, "1", "--operator", "x", "--reason", "y"],
    );
    assert_eq!(code, 1, "{err}");

    // Watch of a finished transaction: its final state, then the end.
    let (code, out, err) = treaty(&coord, &["watch", &stuck]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains(" aborted outcome=aborted"), "{out}");

    // An unknown gid.
    for sub in ["show", "watch", "retry"] {
        let (code, _, err) = treaty(&coord, &[sub, "no-such-gid"]);
        assert_eq!(code, 1, "{sub}: {err}");
        assert!(
            err.contains("no transaction \"no-such-gid\""),
            "{sub}: {err}"
        );
    }
}

#[test]
fn an_unreachable_coordinator_exits_2_and_help_is_everywhere() {
    // A port nobody listens on: bound, then released.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, out, err) = treaty(&format!("http://127.0.0.1:{port}"), &["list"]);
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(err.contains("cannot connect to"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    for sub in ["list", "show", "watch", "retry", "resolve"] {
        let (code, out, err) = treaty("http://127.0.0.1:1", &[sub, "--help"]);
        assert_eq!(code, 0, "{sub}: {err}");
        assert!(
            out.contains("--json") && out.contains("--coordinator"),
            "{sub}: {out}"
        );
    }
    let (_, out, _) = treaty("http://127.0.0.1:1", &["list", "--help"]);
    assert!(
        out.contains("--older-than") && out.contains("--stuck"),
        "{out}"
    );
}
