//! CI exercises `treaty-bench`: a short run must print one JSON object with the figures the
//! issue asks for. Behaviour only: no timing is asserted (benchmarks measure, tests assert).

use std::process::Command;
use std::time::Duration;

#[test]
fn a_short_bench_run_prints_the_figures_as_json() {
    let bench = treaty_tests::binary("treaty-tests", "treaty-bench", "");
    let mut cmd = Command::new(bench);
    cmd.args([
        "run",
        "--mode",
        "2pc",
        "--count",
        "200",
        "--concurrency",
        "8",
        "--warmup",
        "0",
        "--json",
    ]);
    let (code, stdout, stderr) =
        treaty_tests::run_to_end(cmd, Duration::from_secs(600)).expect("treaty-bench finishes");
    assert_eq!(code, 0, "treaty-bench failed:\n{stderr}");
    let line = stdout.lines().last().expect("one line of JSON");
    let v: serde_json::Value = serde_json::from_str(line).expect("valid JSON");
    for field in [
        "mode",
        "branches",
        "concurrency",
        "tx_per_s",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "flushes_per_tx",
        "rpc_bound_per_s",
        "rpc_ratio",
        "treatyd_cpu_s",
        "treatyd_peak_rss_kib",
        "command",
    ] {
        assert!(
            !v[field].is_null(),
            "field {field} missing or null in {line}"
        );
    }
    assert_eq!(v["mode"], "2pc");
    assert_eq!(v["committed"], 200, "{line}");
    assert!(v["tx_per_s"].as_f64().expect("number") > 0.0, "{line}");
    assert!(
        v["rpc_bound_per_s"].as_f64().expect("number") > 0.0,
        "{line}"
    );
    // 2PC presumed abort: at least the forced Begun and decision records were flushed.
    assert!(
        v["flushes_per_tx"].as_f64().expect("number") > 0.0,
        "{line}"
    );
}

/// `treaty-bench log`: one writer alone needs an fsync per forced write; many writers waiting
/// at once share them (group commit). Counts, not times.
#[test]
fn the_log_bench_shows_forced_writes_sharing_fsyncs() {
    let bench = treaty_tests::binary("treaty-tests", "treaty-bench", "");
    let mut cmd = Command::new(bench);
    cmd.args(["log", "--count", "300", "--concurrency", "1,64", "--json"]);
    let (code, stdout, stderr) =
        treaty_tests::run_to_end(cmd, Duration::from_secs(300)).expect("treaty-bench finishes");
    assert_eq!(code, 0, "treaty-bench log failed:\n{stderr}");
    let levels: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(levels.len(), 2, "{stdout}");
    assert_eq!(levels[0]["concurrency"], 1);
    assert_eq!(
        levels[0]["flushes"], 300,
        "alone, every forced write is flushed: {stdout}"
    );
    assert_eq!(levels[1]["concurrency"], 64);
    let shared = levels[1]["flushes"].as_u64().expect("number");
    assert!(
        (1..300).contains(&shared),
        "64 writers at once must share fsyncs: {stdout}"
    );
}
