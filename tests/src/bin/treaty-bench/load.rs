//! A closed-loop load driver: `concurrency` tasks, each issuing one operation after another,
//! for a duration or a total count, recording client-observed latencies.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much work a phase does.
#[derive(Clone, Copy, Debug)]
pub enum Workload {
    For(Duration),
    Count(u64),
}

/// What one operation reports.
pub enum OpResult {
    /// Completed as intended (a committed transaction, a DONE).
    Ok,
    /// Completed otherwise (aborted, pending): counted, not in the rate.
    Other(String),
    /// Failed (an RPC error).
    Err(String),
}

/// What a phase measured.
pub struct LoadResult {
    pub ok: u64,
    pub other: u64,
    pub errors: u64,
    pub first_problem: Option<String>,
    pub elapsed: Duration,
    /// Latencies of every completed operation, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

impl LoadResult {
    pub fn ok_per_s(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile (0..=1) of latencies, in ms.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

/// Run `op(i)` for i = 0, 1, ... from `concurrency` tasks until `work` is done. `label` names
/// the phase on the progress bar (stderr; hidden when `quiet`).
pub async fn drive<F, Fut>(
    label: &str,
    concurrency: usize,
    work: Workload,
    quiet: bool,
    op: F,
) -> LoadResult
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = OpResult> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let problem: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let start = Instant::now();
    let end = match work {
        Workload::For(d) => Some(start + d),
        Workload::Count(_) => None,
    };
    let limit = match work {
        Workload::Count(n) => n,
        Workload::For(_) => u64::MAX,
    };
    let bar = progress_bar(label, work, quiet);
    let ticker = {
        let (bar, done) = (bar.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let n = done.load(Ordering::Relaxed);
                let secs = start.elapsed().as_secs_f64();
                match work {
                    Workload::For(_) => bar.set_position(start.elapsed().as_millis() as u64),
                    Workload::Count(_) => bar.set_position(n),
                }
                bar.set_message(format!("{n} done, {:.0}/s", n as f64 / secs.max(1e-9)));
            }
        })
    };
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency.max(1) {
        let (op, next, done, problem) = (
            op.clone(),
            Arc::clone(&next),
            Arc::clone(&done),
            Arc::clone(&problem),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let (mut ok, mut other, mut errors) = (0u64, 0u64, 0u64);
            let mut last = Instant::now();
            loop {
                if end.is_some_and(|e| Instant::now() >= e) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= limit {
                    break;
                }
                let t0 = Instant::now();
                let res = op(i).await;
                last = Instant::now();
                lat.push((last - t0).as_micros().min(u32::MAX as u128) as u32);
                done.fetch_add(1, Ordering::Relaxed);
                match res {
                    OpResult::Ok => ok += 1,
                    OpResult::Other(m) => {
                        other += 1;
                        problem.lock().unwrap().get_or_insert(m);
                    }
                    OpResult::Err(m) => {
                        errors += 1;
                        problem.lock().unwrap().get_or_insert(m);
                    }
                }
            }
            (lat, ok, other, errors, last)
        }));
    }
    let mut result = LoadResult {
        ok: 0,
        other: 0,
        errors: 0,
        first_problem: None,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
    };
    let mut last_done = start;
    for t in tasks {
        let (lat, ok, other, errors, last) = t.await.expect("load task panicked");
        result.latencies_us.extend(lat);
        result.ok += ok;
        result.other += other;
        result.errors += errors;
        last_done = last_done.max(last);
    }
    ticker.abort();
    bar.finish_and_clear();
    // The phase lasted until its last operation completed (in duration mode, operations
    // started before the end may finish a little after it).
    result.elapsed = last_done - start;
    result.latencies_us.sort_unstable();
    result.first_problem = problem.lock().unwrap().take();
    result
}

fn progress_bar(label: &str, work: Workload, quiet: bool) -> ProgressBar {
    let len = match work {
        Workload::For(d) => d.as_millis() as u64,
        Workload::Count(n) => n,
    };
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let template = match work {
        Workload::For(_) => "{prefix:>12} [{elapsed_precise}] {wide_bar} {msg}",
        Workload::Count(_) => "{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
    };
    bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
    bar.set_prefix(label.to_string());
    bar
}
