//! The coordinator's Prometheus metrics: the registry and every metric, each defined once here
//! with its HELP text. [`crate::admin`] serves them at `GET /metrics`.
//!
//! Conventions (checked by this module's tests on the exposition itself): names start with
//! `treaty_`, units come last (`_seconds`), counters end in `_total` (prometheus-client
//! appends it), and every label has a small fixed set of values: `mode`, `outcome`, `op`,
//! `result`, `reason`, `shard`. A gid is never a label: one per transaction would grow the
//! series without bound.
//!
//! The hot path stays cheap: every labelled series a shard touches is created up front and
//! kept in an array indexed by the label's enum, so recording is an atomic add (counters) or
//! prometheus-client's own per-histogram lock, never a map lookup. Values that already live in
//! the runtime (live transactions, inbox depths) cost nothing per call: they are read when
//! scraped ([`crate::runtime::Runtime::refresh_metrics`]).

use crate::engine::{Mode, Op, Outcome, Reply};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::time::Duration;

/// The content type of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus
/// scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const MODES: [Mode; 2] = [Mode::TwoPhase, Mode::Saga];
const OPS: [Op; 5] = [
    Op::Prepare,
    Op::Commit,
    Op::Abort,
    Op::Execute,
    Op::Compensate,
];

pub(crate) fn mode_label(m: Mode) -> &'static str {
    match m {
        Mode::TwoPhase => "2pc",
        Mode::Saga => "saga",
    }
}

fn mode_index(m: Mode) -> usize {
    match m {
        Mode::TwoPhase => 0,
        Mode::Saga => 1,
    }
}

pub(crate) fn op_label(op: Op) -> &'static str {
    match op {
        Op::Prepare => "prepare",
        Op::Commit => "commit",
        Op::Abort => "abort",
        Op::Execute => "execute",
        Op::Compensate => "compensate",
    }
}

fn op_index(op: Op) -> usize {
    match op {
        Op::Prepare => 0,
        Op::Commit => 1,
        Op::Abort => 2,
        Op::Execute => 3,
        Op::Compensate => 4,
    }
}

/// How a branch call ended, as the `result` label of `treaty_branch_call_duration_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallResult {
    /// A definite answer that lets the transaction go on (prepared, succeeded, done).
    Ok,
    /// The participant refused to prepare.
    Refused,
    /// A saga step failed (the saga compensates).
    Failed,
    /// The participant answered RETRY (or another transient answer of its own).
    Retry,
    /// No answer within the call timeout.
    Timeout,
    /// The participant could not be reached.
    Unavailable,
    /// Any other gRPC error (a bad endpoint, an unexpected status).
    Error,
}

impl CallResult {
    const ALL: [CallResult; 7] = [
        CallResult::Ok,
        CallResult::Refused,
        CallResult::Failed,
        CallResult::Retry,
        CallResult::Timeout,
        CallResult::Unavailable,
        CallResult::Error,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            CallResult::Ok => "ok",
            CallResult::Refused => "refused",
            CallResult::Failed => "failed",
            CallResult::Retry => "retry",
            CallResult::Timeout => "timeout",
            CallResult::Unavailable => "unavailable",
            CallResult::Error => "error",
        }
    }

    /// Classifies a participant call's reply. A transient reply carries only its message,
    /// made by `runtime::participants::call` (`"{code:?}: ..."`, `"no answer within ..."`)
    /// or by `mapping` for a participant's own answer (`"PHASE_TWO_RESULT_RETRY: ..."`).
    pub fn of(reply: &Reply) -> CallResult {
        match reply {
            Reply::Prepared | Reply::Succeeded | Reply::Done => CallResult::Ok,
            Reply::Refused(_) => CallResult::Refused,
            Reply::Failed(_) => CallResult::Failed,
            Reply::Transient(m) => {
                if m.starts_with("no answer within") || m.starts_with("DeadlineExceeded") {
                    CallResult::Timeout
                } else if m.starts_with("Unavailable") || m.starts_with("Cancelled") {
                    CallResult::Unavailable
                } else if m.contains("_RESULT_") {
                    CallResult::Retry
                } else {
                    CallResult::Error
                }
            }
        }
    }
}

/// Totals of [`Metrics`] for a summary ([`Metrics::counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Transactions begun, both modes.
    pub begun: u64,
    /// Finished committed.
    pub committed: u64,
    /// Finished aborted (2PC) or compensated (saga).
    pub aborted: u64,
    /// Being driven now.
    pub live: u64,
    /// Live and flagged stuck.
    pub stuck: u64,
}

/// Every metric of the coordinator. Created once per [`crate::runtime::Runtime`]; cheap to
/// share (`Arc`).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    begun: [Counter; 2],
    finished: [[Counter; 2]; 2],
    live: Gauge,
    stuck: Gauge,
    claimed: Counter,
    calls: [[Histogram; CallResult::ALL.len()]; OPS.len()],
    retries: [Counter; OPS.len()],
    forced_write: Histogram,
    flush_records: Histogram,
    fsync_errors: Counter,
    inbox: Family<[(&'static str, String); 1], Gauge>,
    rejected: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();

        let begun_family = Family::<[(&str, &str); 1], Counter>::default();
        r.register(
            "treaty_transactions_begun",
            "Transactions started (a new gid admitted by Begin), by mode.",
            begun_family.clone(),
        );
        let begun = MODES.map(|m| {
            begun_family
                .get_or_create(&[("mode", mode_label(m))])
                .clone()
        });

        let finished_family = Family::<[(&str, &str); 2], Counter>::default();
        r.register(
            "treaty_transactions_finished",
            "Transactions finished (every branch done, record terminal), by mode and outcome.",
            finished_family.clone(),
        );
        let finished = MODES.map(|m| {
            [("outcome", "committed"), ("outcome", "aborted")].map(|o| {
                finished_family
                    .get_or_create(&[("mode", mode_label(m)), o])
                    .clone()
            })
        });

        let live = Gauge::default();
        r.register(
            "treaty_transactions_live",
            "Transactions being driven now (not finished).",
            live.clone(),
        );
        let stuck = Gauge::default();
        r.register(
            "treaty_transactions_stuck",
            "Live transactions flagged stuck: a phase-two call has failed stuck-after-attempts \
             times. Retry or Resolve them.",
            stuck.clone(),
        );
        let claimed = Counter::default();
        r.register(
            "treaty_transactions_claimed",
            "Transactions this coordinator took over from a coordinator of the shared \
             PostgreSQL log whose lease ran out or that left (recovery included).",
            claimed.clone(),
        );

        // 0.5 ms to about 16 s: a local no-op call up to past the default call timeout.
        let calls_family =
            Family::<[(&str, &str); 2], Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            });
        r.register_with_unit(
            "treaty_branch_call_duration",
            "Participant calls made by the coordinator, by operation and result.",
            Unit::Seconds,
            calls_family.clone(),
        );
        let calls = OPS.map(|op| {
            CallResult::ALL.map(|res| {
                calls_family
                    .get_or_create(&[("op", op_label(op)), ("result", res.label())])
                    .clone()
            })
        });

        let retries_family = Family::<[(&str, &str); 1], Counter>::default();
        r.register(
            "treaty_branch_retries",
            "Branch calls scheduled again after a transient failure (backoff), by operation.",
            retries_family.clone(),
        );
        let retries = OPS.map(|op| {
            retries_family
                .get_or_create(&[("op", op_label(op))])
                .clone()
        });

        // 50 µs to about 1.6 s.
        let forced_write = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        r.register_with_unit(
            "treaty_log_forced_write_duration",
            "Forced log writes, from the write until it is on stable storage.",
            Unit::Seconds,
            forced_write.clone(),
        );
        let flush_records = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        r.register(
            "treaty_log_flush_records",
            "Forced writes (and syncs) made durable by one flush: the group-commit batch size.",
            flush_records.clone(),
        );
        let fsync_errors = Counter::default();
        r.register(
            "treaty_log_fsync_errors",
            "Flushes of the log that failed; each one stops the coordinator (fail-stop).",
            fsync_errors.clone(),
        );

        let inbox = Family::<[(&str, String); 1], Gauge>::default();
        r.register(
            "treaty_shard_inbox_messages",
            "Messages waiting in each shard's inbox (bounded; a full inbox refuses Begin).",
            inbox.clone(),
        );
        let rejected = Family::<[(&str, &str); 1], Counter>::default();
        r.register(
            "treaty_requests_rejected",
            "Coordinator API requests answered with an error, by gRPC status \
             (invalid_argument, resource_exhausted, unavailable, already_exists, ...).",
            rejected.clone(),
        );

        Metrics {
            registry: r,
            begun,
            finished,
            live,
            stuck,
            claimed,
            calls,
            retries,
            forced_write,
            flush_records,
            fsync_errors,
            inbox,
            rejected,
        }
    }

    /// The registry, to encode or to read in tests.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The exposition, in OpenMetrics text ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn begun(&self, mode: Mode) {
        self.begun[mode_index(mode)].inc();
    }

    /// A transaction left the runtime finished with `outcome` (`Pending` is not counted: it
    /// cannot be finished undecided).
    pub fn finished(&self, mode: Mode, outcome: Outcome) {
        let i = match outcome {
            Outcome::Committed => 0,
            Outcome::Aborted => 1,
            Outcome::Pending => return,
        };
        self.finished[mode_index(mode)][i].inc();
    }

    /// The counts the dashboard shows, read from the same counters `/metrics` exports (since
    /// this process started; `live` as of the last [`crate::runtime::Runtime::refresh_metrics`]).
    pub fn counts(&self) -> Counts {
        let sum = |c: &[Counter]| c.iter().map(Counter::get).sum::<u64>();
        Counts {
            begun: sum(&self.begun),
            committed: self.finished.iter().map(|f| f[0].get()).sum(),
            aborted: self.finished.iter().map(|f| f[1].get()).sum(),
            live: self.live.get().max(0) as u64,
            stuck: self.stuck.get().max(0) as u64,
        }
    }

    pub fn set_live(&self, n: usize) {
        self.live.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A live transaction became stuck (`true`) or stopped being stuck or left (`false`).
    pub fn stuck(&self, now_stuck: bool) {
        if now_stuck {
            self.stuck.inc();
        } else {
            self.stuck.dec();
        }
    }

    pub fn call(&self, op: Op, result: CallResult, took: Duration) {
        let r = CallResult::ALL
            .iter()
            .position(|c| *c == result)
            .unwrap_or(CallResult::ALL.len() - 1);
        self.calls[op_index(op)][r].observe(took.as_secs_f64());
    }

    /// `n` transactions claimed from gone owners of a shared log.
    pub fn taken_over(&self, n: usize) {
        self.claimed.inc_by(n as u64);
    }

    pub fn retry_scheduled(&self, op: Op) {
        self.retries[op_index(op)].inc();
    }

    pub fn forced_write(&self, took: Duration) {
        self.forced_write.observe(took.as_secs_f64());
    }

    pub fn set_inbox(&self, shard: usize, messages: usize) {
        self.inbox
            .get_or_create(&[("shard", shard.to_string())])
            .set(i64::try_from(messages).unwrap_or(i64::MAX));
    }

    /// A request answered with the gRPC status `code` (not `Ok`).
    pub fn rejected(&self, code: tonic::Code) {
        self.rejected
            .get_or_create(&[("reason", code_label(code))])
            .inc();
    }
}

impl treaty_durable::FlushObserver for Metrics {
    fn flushed(&self, records: usize, ok: bool) {
        if ok {
            self.flush_records.observe(records as f64);
        } else {
            self.fsync_errors.inc();
        }
    }
}

/// A gRPC status code as a label value: its name in snake case (a fixed set of 17).
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// A tower layer for the gRPC server that counts every error answer in
/// `treaty_requests_rejected_total{reason}`. tonic sends an error of a unary call as a
/// trailers-only response, so the `grpc-status` is in the headers; a success carries it in
/// the trailers and is not counted.
pub fn rejections_layer(
    metrics: std::sync::Arc<Metrics>,
) -> tower::util::MapResponseLayer<
    impl Fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> + Clone,
> {
    tower::util::MapResponseLayer::new(move |resp: http::Response<tonic::body::Body>| {
        if let Some(code) = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
        {
            let code = tonic::Code::from_i32(code);
            if code != tonic::Code::Ok {
                metrics.rejected(code);
            }
        }
        resp
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sample line of the exposition: (metric family name, sample name, labels).
    fn samples(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let name_end = l.find(['{', ' ']).expect("a sample has a value");
                let labels = match l[name_end..].strip_prefix('{') {
                    Some(rest) => rest[..rest.find('}').expect("labels end")].to_string(),
                    None => String::new(),
                };
                (l[..name_end].to_string(), labels)
            })
            .collect()
    }

    /// `# TYPE name kind` lines.
    fn types(text: &str) -> Vec<(String, String)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (n, k) = l.split_once(' ').expect("TYPE name kind");
                (n.to_string(), k.to_string())
            })
            .collect()
    }

    /// A registry with one of every series, as after some traffic.
    fn exercised() -> Metrics {
        let m = Metrics::new();
        m.begun(Mode::Saga);
        m.finished(Mode::TwoPhase, Outcome::Aborted);
        m.set_live(3);
        m.stuck(true);
        m.call(Op::Commit, CallResult::Timeout, Duration::from_millis(3));
        m.retry_scheduled(Op::Commit);
        m.taken_over(3);
        m.forced_write(Duration::from_micros(700));
        treaty_durable::FlushObserver::flushed(&m, 4, true);
        treaty_durable::FlushObserver::flushed(&m, 1, false);
        m.set_inbox(0, 2);
        m.rejected(tonic::Code::ResourceExhausted);
        m
    }

    #[test]
    fn names_and_labels_follow_prometheus_conventions() {
        let text = exercised().encode();
        assert!(text.ends_with("# EOF\n"), "OpenMetrics text: {text}");
        let types = types(&text);
        assert_eq!(types.len(), 12, "every metric is registered: {types:?}");
        for (name, kind) in &types {
            assert!(name.starts_with("treaty_"), "{name}: prefix");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name}: HELP text"
            );
            match kind.as_str() {
                "counter" => {
                    let samples = samples(&text);
                    let own: Vec<_> = samples
                        .iter()
                        .filter(|(s, _)| s.starts_with(name.as_str()))
                        .collect();
                    assert!(
                        own.iter().all(|(s, _)| s == &format!("{name}_total")
                            || s == &format!("{name}_created")),
                        "{name}: a counter's samples end in _total: {own:?}"
                    );
                    assert!(!own.is_empty(), "{name}: has samples");
                }
                "histogram" if name.contains("duration") => {
                    assert!(name.ends_with("_seconds"), "{name}: unit last");
                }
                "histogram" | "gauge" => {}
                other => panic!("{name}: unexpected type {other}"),
            }
        }
        let known_labels = ["mode", "outcome", "op", "result", "reason", "shard", "le"];
        for (sample, labels) in samples(&text) {
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let key = pair.split('=').next().unwrap_or_default();
                assert!(
                    known_labels.contains(&key),
                    "{sample}: label {key:?} is not one of the bounded set"
                );
                assert_ne!(key, "gid", "{sample}: never a gid label");
            }
        }
        // And the values recorded above are where they should be.
        assert!(text.contains("treaty_transactions_begun_total{mode=\"saga\"} 1"));
        assert!(
            text.contains("treaty_transactions_finished_total{mode=\"2pc\",outcome=\"aborted\"} 1")
        );
        assert!(text.contains("treaty_transactions_stuck 1"));
        assert!(text.contains("treaty_log_fsync_errors_total 1"));
        assert!(text.contains("treaty_requests_rejected_total{reason=\"resource_exhausted\"} 1"));
        assert!(text.contains(
            "treaty_branch_call_duration_seconds_count{op=\"commit\",result=\"timeout\"} 1"
        ));
    }

    #[test]
    fn transient_replies_are_classified_from_the_messages_the_runtime_makes() {
        for (msg, want) in [
            ("no answer within 5s", CallResult::Timeout),
            ("DeadlineExceeded: timeout expired", CallResult::Timeout),
            ("Unavailable: tcp connect error", CallResult::Unavailable),
            ("PHASE_TWO_RESULT_RETRY: busy", CallResult::Retry),
            ("Internal: boom", CallResult::Error),
        ] {
            assert_eq!(CallResult::of(&Reply::Transient(msg.into())), want, "{msg}");
        }
        assert_eq!(CallResult::of(&Reply::Done), CallResult::Ok);
        assert_eq!(
            CallResult::of(&Reply::Refused("no".into())),
            CallResult::Refused
        );
    }
}
