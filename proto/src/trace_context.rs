//! W3C trace context (`traceparent`, `tracestate`) in gRPC metadata: the one place the client,
//! `treatyd` and the participant SDK put an OpenTelemetry [`Context`] on a call and read it
//! back, so one trace follows a transaction from the client's `Begin` through the coordinator
//! to every branch call.
//!
//! The propagator is OpenTelemetry's own [`TraceContextPropagator`]; this module only adapts
//! tonic's [`MetadataMap`] to its [`Injector`] and [`Extractor`]. Nothing here needs a tracer
//! or an exporter: a context without a valid span injects nothing, and metadata without a
//! (valid) `traceparent` extracts an empty context.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

/// The W3C header carrying the trace id, the parent span id and the sampling flag.
pub const TRACEPARENT: &str = "traceparent";

/// The W3C header carrying vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// Writes into gRPC metadata; keys or values that are not valid ASCII metadata are skipped
/// (the propagator only writes valid ones).
pub struct MetadataInjector<'a>(pub &'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Reads from gRPC metadata; binary (`-bin`) entries and non-ASCII values are not seen.
pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Puts `cx`'s span context on `metadata` as `traceparent` (and `tracestate`). Nothing is
/// written when `cx` has no valid span (no tracing layer, or no span entered).
pub fn inject(cx: &Context, metadata: &mut MetadataMap) {
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
}

/// The remote context `metadata` carries; empty (no span) when it has no valid
/// `traceparent`.
pub fn extract(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// The `traceparent` of `metadata` in canonical form (what the propagator itself writes,
/// 55 ASCII characters), or `None` when it carries none or an invalid one: what a coordinator
/// stores with a transaction to continue its trace later. `tracestate` is not kept.
pub fn traceparent(metadata: &MetadataMap) -> Option<String> {
    let cx = extract(metadata);
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.remove(TRACEPARENT)
}

/// The remote context a stored `traceparent` names (empty when it is not valid).
pub fn context_from_traceparent(traceparent: &str) -> Context {
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    TraceContextPropagator::new().extract(&carrier)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    fn remote(trace: u128, span: u64) -> Context {
        let state = TraceState::from_key_value([("vendor", "x1")]).expect("trace state");
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            true,
            state,
        ))
    }

    #[test]
    fn a_context_survives_a_round_trip_through_metadata() {
        let cx = remote(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331);
        let mut md = MetadataMap::new();
        md.insert("authorization", "Bearer t".parse().unwrap());
        inject(&cx, &mut md);
        assert_eq!(
            md.get(TRACEPARENT).unwrap(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(md.get(TRACESTATE).unwrap(), "vendor=x1");
        assert_eq!(
            md.get("authorization").unwrap(),
            "Bearer t",
            "others untouched"
        );

        let back = extract(&md);
        let sc = back.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(sc.trace_id(), cx.span().span_context().trace_id());
        assert_eq!(sc.span_id(), cx.span().span_context().span_id());
        assert_eq!(sc.trace_state().get("vendor"), Some("x1"));

        let stored = traceparent(&md).expect("a valid traceparent");
        assert_eq!(
            stored,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        let again = context_from_traceparent(&stored);
        assert_eq!(again.span().span_context().span_id(), sc.span_id());
    }

    #[test]
    fn nothing_is_injected_without_a_span_and_garbage_extracts_nothing() {
        let mut md = MetadataMap::new();
        inject(&Context::new(), &mut md);
        assert!(md.is_empty());

        for bad in [
            "",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "zz-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "not a traceparent",
        ] {
            let mut md = MetadataMap::new();
            md.insert(TRACEPARENT, bad.parse().unwrap());
            assert!(!extract(&md).span().span_context().is_valid(), "{bad:?}");
            assert_eq!(traceparent(&md), None, "{bad:?}");
            assert!(!context_from_traceparent(bad)
                .span()
                .span_context()
                .is_valid());
        }
    }
}
