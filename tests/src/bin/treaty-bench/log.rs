//! `treaty-bench log`: forced writes to the coordinator's sled log, one at a time and many at
//! once, so the effect of group commit is a number: writes/s, mean latency, fsyncs per write.
//!
//! It drives `treaty_coordinator::log::SledLog` directly (no gRPC, no engine), in a fresh
//! directory on the build's disk for every concurrency level.

use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use treaty_coordinator::engine::{
    BranchDef, BranchRecord, BranchState, Mode, Phase, RetryPolicy, TxRecord,
};
use treaty_coordinator::log::sled::{SledLog, SledLogOptions};
use treaty_coordinator::log::LogStore;

/// What `treaty-bench log` measures.
#[derive(clap::Args, Debug)]
pub struct LogArgs {
    /// Forced writes per concurrency level.
    #[arg(long, default_value_t = 4000)]
    pub count: u64,
    /// Concurrency levels to measure (writers each waiting for their write to be durable).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    pub concurrency: Vec<u64>,
    /// Payload bytes per branch (2 branches per record).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Print one JSON object per level instead of a table.
    #[arg(long)]
    pub json: bool,
}

struct Level {
    concurrency: u64,
    writes: u64,
    elapsed: Duration,
    mean_latency: Duration,
    flushes: u64,
}

fn record(gid: String, payload: &Bytes) -> TxRecord {
    let branch = |i: usize| BranchRecord {
        def: BranchDef {
            endpoint: format!("http://127.0.0.1:{}", 7801 + i),
            handler: "debit".into(),
            payload: payload.clone(),
            compensation_payload: payload.clone(),
        },
        state: BranchState::Pending,
        attempts: 0,
        last_error: String::new(),
        resolution: None,
    };
    TxRecord {
        gid,
        mode: Mode::Saga,
        phase: Phase::Active,
        branches: vec![branch(0), branch(1)],
        created_unix_ms: 0,
        updated_unix_ms: 0,
        deadline_unix_ms: 0,
        retry: RetryPolicy::default(),
        stuck: false,
        seq: 1,
        reason: None,
        trace_parent: None,
    }
}

async fn level(a: &LogArgs, concurrency: u64) -> Result<Level, String> {
    let base = treaty_tests::workspace_root()
        .join("target")
        .join("treaty-bench");
    std::fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    let dir = tempfile::tempdir_in(&base)
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let log = Arc::new(
        SledLog::open(dir.path(), SledLogOptions::default())
            .map_err(|e| format!("cannot open the log: {e}"))?,
    );
    let payload = Bytes::from(vec![7u8; a.payload_bytes]);
    let next = Arc::new(AtomicU64::new(0));
    let latency_ns = Arc::new(AtomicU64::new(0));
    let before = log.stats();
    let start = Instant::now();
    let mut writers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (log, next, latency_ns, payload) = (
            log.clone(),
            next.clone(),
            latency_ns.clone(),
            payload.clone(),
        );
        let count = a.count;
        writers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return Ok::<(), String>(());
                }
                let t = Instant::now();
                log.put(record(format!("bench-{i:012}"), &payload), true)
                    .await
                    .map_err(|e| format!("forced write failed: {e}"))?;
                latency_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }));
    }
    for w in writers {
        w.await.map_err(|e| format!("writer task: {e}"))??;
    }
    let elapsed = start.elapsed();
    let after = log.stats();
    Ok(Level {
        concurrency,
        writes: a.count,
        elapsed,
        mean_latency: Duration::from_nanos(latency_ns.load(Ordering::Relaxed) / a.count.max(1)),
        flushes: after.flushes - before.flushes,
    })
}

pub async fn run(a: LogArgs) -> Result<(), String> {
    if a.count == 0 || a.concurrency.is_empty() || a.concurrency.contains(&0) {
        return Err("--count and every --concurrency level must be at least 1".into());
    }
    if !a.json {
        println!(
            "forced writes to the sled log ({} per level, fsynced)",
            a.count
        );
        println!("concurrency   writes/s   mean latency   fsyncs/write");
    }
    for &c in &a.concurrency {
        let l = level(&a, c).await?;
        let per_s = l.writes as f64 / l.elapsed.as_secs_f64();
        let flushes_per_write = l.flushes as f64 / l.writes as f64;
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "concurrency": l.concurrency,
                    "writes": l.writes,
                    "writes_per_s": (per_s * 10.0).round() / 10.0,
                    "mean_latency_us": l.mean_latency.as_micros() as u64,
                    "flushes": l.flushes,
                    "flushes_per_write": (flushes_per_write * 1000.0).round() / 1000.0,
                })
            );
        } else {
            println!(
                "{:>11}   {:>8.0}   {:>9.0} µs   {:>12.3}",
                l.concurrency,
                per_s,
                l.mean_latency.as_secs_f64() * 1e6,
                flushes_per_write
            );
        }
    }
    if !a.json {
        println!(
            "reproduce: cargo run --release -p treaty-tests --bin treaty-bench -- log --count {} \
             --concurrency {}",
            a.count,
            a.concurrency
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    Ok(())
}
