//! OpenTelemetry traces: the OTLP exporter `treatyd` installs with `--otlp-endpoint`, and the
//! spans the runtime makes when [`Config::traces`](crate::config::Config::traces) is on.
//!
//! - One **transaction span** (`treaty.transaction`) per transaction while a shard drives it,
//!   a child of the client's span: its `traceparent` arrives in the `Begin` metadata and is
//!   kept in the transaction's log record ([`crate::engine::TxRecord::trace_parent`]), so a
//!   transaction recovered after a restart opens a new transaction span in the same trace.
//! - One **branch-call span** (`treaty.prepare`, `treaty.commit`, ...) per participant call,
//!   every attempt its own, a child of the transaction span, with the attributes
//!   `treaty.gid`, `treaty.branch`, `treaty.op`, `treaty.attempt`, `treaty.handler`,
//!   `treaty.endpoint` and, once answered, `treaty.result` (the `result` label of
//!   `treaty_branch_call_duration_seconds`). Its context goes to the participant as
//!   `traceparent` metadata ([`treaty_proto::trace_context`]), where the SDK continues it.
//!
//! With traces off (the default) no span is made and no metadata is added: the hot path
//! checks one `bool`.

use crate::engine::{Mode, Op, Reply, TxRecord};
use crate::metrics::{mode_label, op_label, CallResult};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Default of `--otlp-service-name`: the `service.name` resource attribute of every span.
pub const SERVICE_NAME_DEFAULT: &str = "treatyd";

/// The target every span here is made under: a subscriber's OpenTelemetry layer should take
/// this target (and need take no other) at INFO.
pub const SPAN_TARGET: &str = "treaty_coordinator::otel";

/// The OTLP/gRPC span exporter behind a batch processor: spans leave in batches from the
/// processor's own thread, never from the runtime's shards.
pub struct Exporter {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Exporter {
    /// An exporter to the OTLP/gRPC collector at `endpoint` (`http://host:4317`), naming
    /// this process `service_name`. Must be called inside a tokio runtime that outlives the
    /// exporter (tonic's channel runs on it). Nothing is dialled here: an unreachable
    /// collector costs dropped spans (logged by OpenTelemetry), never a transaction.
    pub fn install(endpoint: &str, service_name: &str) -> Result<Exporter, String> {
        check_endpoint(endpoint)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("--otlp-endpoint {endpoint:?}: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.to_string())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("treaty-coordinator");
        Ok(Exporter { provider, tracer })
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans for this exporter.
    /// Filter it to [`SPAN_TARGET`] so only Treaty's spans are exported.
    pub fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.tracer.clone())
    }

    /// Exports every finished span still queued and stops the exporter. Blocks (up to the
    /// exporter's timeout when the collector does not answer): call it from outside the
    /// tokio runtime, while that runtime still exists.
    pub fn shutdown(self) -> Result<(), String> {
        self.provider
            .shutdown()
            .map_err(|e| format!("flushing traces to the OTLP collector: {e}"))
    }
}

/// `--otlp-endpoint` must be a plaintext gRPC URI (a local collector or agent): TLS towards
/// the collector is not offered yet, and an `https://` endpoint is refused rather than
/// dialled in plaintext.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("not a URI ({e}); expected e.g. http://127.0.0.1:4317"))?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some() => Ok(()),
        Some("https") => Err(
            "https:// is not supported yet; export to a local OpenTelemetry collector or \
             agent over http:// (e.g. http://127.0.0.1:4317)"
                .into(),
        ),
        _ => Err("expected an http:// URI with a host, e.g. http://127.0.0.1:4317".into()),
    }
}

/// The span of a transaction driven by a shard, child of the client's span named by its
/// stored `traceparent` (a root span when it has none). `Span::none()` when traces are off.
pub fn transaction_span(on: bool, rec: &TxRecord, recovered: bool) -> Span {
    if !on {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "treaty.transaction",
        otel.name = transaction_name(rec.mode),
        otel.kind = "internal",
        treaty.gid = %rec.gid,
        treaty.mode = mode_label(rec.mode),
        treaty.branches = rec.branches.len(),
        treaty.recovered = recovered,
        treaty.outcome = tracing::field::Empty,
    );
    if let Some(tp) = &rec.trace_parent {
        // Fails only without an OpenTelemetry layer, when the span goes nowhere anyway.
        let _ = span.set_parent(treaty_proto::trace_context::context_from_traceparent(tp));
    }
    span
}

fn transaction_name(mode: Mode) -> &'static str {
    match mode {
        Mode::TwoPhase => "treaty 2pc",
        Mode::Saga => "treaty saga",
    }
}

/// Records how a transaction span's transaction left its shard.
pub fn record_outcome(span: &Span, outcome: crate::engine::Outcome) {
    if span.is_none() {
        return;
    }
    let label = match outcome {
        crate::engine::Outcome::Committed => "committed",
        crate::engine::Outcome::Aborted => "aborted",
        crate::engine::Outcome::Pending => "pending",
    };
    span.record("treaty.outcome", label);
}

/// The span of one call (one attempt) to a branch, child of `tx` (its transaction span);
/// `Span::none()` when `tx` is (traces off).
pub fn branch_call_span(tx: &Span, rec: &TxRecord, branch: u32, op: Op, attempt: u32) -> Span {
    if tx.is_none() {
        return Span::none();
    }
    let def = rec.branches.get(branch as usize).map(|b| &b.def);
    tracing::info_span!(
        target: SPAN_TARGET,
        parent: tx,
        "treaty.branch_call",
        otel.name = call_name(op),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        treaty.gid = %rec.gid,
        treaty.branch = branch,
        treaty.op = op_label(op),
        treaty.attempt = attempt,
        treaty.handler = def.map_or("", |d| d.handler.as_str()),
        treaty.endpoint = def.map_or("", |d| d.endpoint.as_str()),
        treaty.result = tracing::field::Empty,
    )
}

fn call_name(op: Op) -> &'static str {
    match op {
        Op::Prepare => "treaty.prepare",
        Op::Commit => "treaty.commit",
        Op::Abort => "treaty.abort",
        Op::Execute => "treaty.execute",
        Op::Compensate => "treaty.compensate",
    }
}

/// Puts `span`'s context on a branch call's metadata, so the participant continues the trace.
pub fn inject(span: &Span, metadata: &mut tonic::metadata::MetadataMap) {
    if span.is_none() {
        return;
    }
    treaty_proto::trace_context::inject(&span.context(), metadata);
}

/// Records a branch call's answer on its span; anything but a definite answer is an error
/// status (it will be retried).
pub fn record_reply(span: &Span, reply: &Reply) {
    if span.is_none() {
        return;
    }
    let result = CallResult::of(reply);
    span.record("treaty.result", result.label());
    if matches!(
        result,
        CallResult::Retry | CallResult::Timeout | CallResult::Unavailable | CallResult::Error
    ) {
        span.record("otel.status_code", "ERROR");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_endpoints_with_a_host_are_taken() {
        assert!(check_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(check_endpoint("http://collector.internal:4317").is_ok());
        for bad in ["https://c:4317", "127.0.0.1:4317", "", "ftp://x", "http://"] {
            assert!(check_endpoint(bad).is_err(), "{bad:?}");
        }
    }
}
