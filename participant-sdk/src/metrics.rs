//! The participant side's Prometheus metrics, for the host service's own registry:
//! [`crate::Participant::register_metrics`] adds them (the host serves its registry as it
//! likes). Names follow the coordinator's conventions (`treaty_participant_` prefix, units
//! last, counters `_total`, bounded labels, never a gid).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `treaty_participant_deliveries_total` | counter | `op`, `answer` |
//! | `treaty_participant_delivery_duration_seconds` | histogram | `op` |
//! | `treaty_participant_barrier_decisions_total` | counter | `rule` |
//! | `treaty_participant_in_doubt_resolved_total` | counter | |
//! | `treaty_participant_failed` | gauge | |
//!
//! `treaty_participant_barrier_decisions_total` counts the barrier rule that decided each
//! delivery ([`rules::Rule`]): `repeat` is a duplicate answered from its row, `null_cancel` a
//! null compensation, `cancelled` a late forward operation refused so it cannot hang. It is
//! counted by the store ([`barrier_decided`]), so per process: every participant of the
//! process shares it.

use crate::barrier::rules::Rule;
use crate::barrier::{Answer, Op, Verdict};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::LazyLock;
use std::time::Duration;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

fn rule_label(rule: Rule) -> &'static str {
    match rule {
        Rule::Cancelled => "cancelled",
        Rule::Reused => "reused",
        Rule::Foreign => "foreign",
        Rule::Repeat => "repeat",
        Rule::Contradiction => "contradiction",
        Rule::CommitWithoutPrepare => "commit_without_prepare",
        Rule::NullCancel => "null_cancel",
        Rule::NothingToUndo => "nothing_to_undo",
        Rule::UnknownHandler => "unknown_handler",
        Rule::Run => "run",
        Rule::Swept => "swept",
    }
}

/// The barrier's decisions in this process (see the module docs).
static BARRIER: LazyLock<Family<Labels1, Counter>> = LazyLock::new(Family::default);

/// Count the barrier rule that decided a delivery. Called by the store once per delivery's
/// plan (a store transaction retried on a conflict plans, and counts, again).
pub fn barrier_decided(rule: Rule) {
    BARRIER.get_or_create(&[("rule", rule_label(rule))]).inc();
}

/// One participant's metrics. Cheap to share.
#[derive(Debug, Clone)]
pub(crate) struct ParticipantMetrics {
    deliveries: Family<Labels2, Counter>,
    duration: Family<Labels1, Histogram, fn() -> Histogram>,
    in_doubt_resolved: Counter,
    failed: Gauge,
}

impl Default for ParticipantMetrics {
    fn default() -> Self {
        ParticipantMetrics {
            deliveries: Family::default(),
            // 0.1 ms to about 3 s: a barrier write with its fsync, up to a slow handler.
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 16))
            }),
            in_doubt_resolved: Counter::default(),
            failed: Gauge::default(),
        }
    }
}

impl ParticipantMetrics {
    pub(crate) fn register(&self, r: &mut Registry) {
        r.register(
            "treaty_participant_deliveries",
            "Operations delivered by coordinators, by operation and the answer sent \
             (retry and violation: nothing written, delivered again later).",
            self.deliveries.clone(),
        );
        r.register_with_unit(
            "treaty_participant_delivery_duration",
            "Deliveries from arrival to a durable answer: barrier, handler and sync.",
            Unit::Seconds,
            self.duration.clone(),
        );
        r.register(
            "treaty_participant_barrier_decisions",
            "Barrier rule that decided each delivery, in this process: repeat (duplicate), \
             null_cancel (null compensation), cancelled (late forward refused: no hang), ...",
            BARRIER.clone(),
        );
        r.register(
            "treaty_participant_in_doubt_resolved",
            "Prepared branches resolved by asking the coordinator (the in-doubt resolver).",
            self.in_doubt_resolved.clone(),
        );
        r.register(
            "treaty_participant_failed",
            "1 once storage lost durability (fail-stop): restart the process.",
            self.failed.clone(),
        );
    }

    pub(crate) fn delivered(&self, op: Op, verdict: &Verdict, took: Duration) {
        let answer = match verdict {
            Verdict::Answer { answer, .. } => match answer {
                Answer::Prepared => "prepared",
                Answer::Refused => "refused",
                Answer::Succeeded => "succeeded",
                Answer::Failed => "failed",
                Answer::Done => "done",
            },
            Verdict::Retry(_) => "retry",
            Verdict::Violation(_) => "violation",
        };
        self.deliveries
            .get_or_create(&[("op", op.as_str()), ("answer", answer)])
            .inc();
        self.duration
            .get_or_create(&[("op", op.as_str())])
            .observe(took.as_secs_f64());
    }

    pub(crate) fn in_doubt_resolved(&self, n: usize) {
        self.in_doubt_resolved.inc_by(n as u64);
    }

    pub(crate) fn failed(&self) {
        self.failed.set(1);
    }
}
