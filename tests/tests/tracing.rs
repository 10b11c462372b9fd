//! OpenTelemetry traces end to end: a fake OTLP collector in this process, a real `treatyd`
//! exporting to it (`--otlp-endpoint`), SDK participants and a client in this process
//! exporting to it too. A client span around a 2PC transfer and a saga whose step first
//! answers RETRY must give one trace: every span (client, treatyd, participants, a handler's
//! own span) carries the client's trace id, treatyd's branch-call spans name the gid and
//! branch, the retried step shows one span per attempt, and each participant delivery is a
//! child of the treatyd call that carried it. Then a saga whose step cannot succeed yet is
//! cut off by a crash of treatyd: the restarted treatyd resumes it in the same trace (the
//! client's `traceparent` is kept in the log record). Nothing sleeps: the collector (and
//! every other condition) is polled with a bound.

use opentelemetry::trace::TraceContextExt;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;
use treaty_sdk::sled::SledStore;
use treaty_sdk::{Branch, Client, HandlerError, Outcome, Participant, Saga, Step, TwoPhase};
use treaty_tests::{wait_until, Treatyd};

const WAIT: Duration = Duration::from_secs(30);

/// The `gated` step answers RETRY until this is set; its attempts are counted.
static GATE_OPEN: AtomicBool = AtomicBool::new(false);
static GATED_ATTEMPTS: AtomicU32 = AtomicU32::new(0);

/// The fake collector: keeps every export request.
#[derive(Clone, Default)]
struct Collector {
    got: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.got.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// One exported span, flattened.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attrs: HashMap<String, String>,
}

impl Got {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(String::as_str)
    }
}

fn value(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

impl Collector {
    fn spans(&self) -> Vec<Got> {
        let mut out = Vec::new();
        for req in self.got.lock().unwrap().iter() {
            for rs in &req.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .map(value)
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push(Got {
                            service: service.clone(),
                            name: s.name.clone(),
                            trace_id: s.trace_id.clone(),
                            span_id: s.span_id.clone(),
                            parent_span_id: s.parent_span_id.clone(),
                            attrs: s
                                .attributes
                                .iter()
                                .map(|kv| (kv.key.clone(), value(kv)))
                                .collect(),
                        });
                    }
                }
            }
        }
        out
    }
}

/// Serves the collector on 127.0.0.1:0; returns its `http://` URI.
async fn start_collector(collector: Collector) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    uri
}

/// This process's spans (the client's, the SDK's, the handlers') go to the collector too, as
/// a service using the SDK would set it up (README, "Traces").
fn install_tracing(collector: &str) -> opentelemetry_sdk::trace::SdkTracerProvider {
    use opentelemetry::trace::TracerProvider as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(collector)
        .build()
        .expect("OTLP exporter");
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("bank-test")
                .build(),
        )
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("treaty-tests"))
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("treaty_sdk", tracing::Level::INFO)
                .with_target("bank", tracing::Level::INFO),
        );
    tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .expect("the only subscriber of this test binary");
    provider
}

/// A participant with a 2PC handler and a saga handler whose `execute` answers RETRY to the
/// first attempt of every step; each handler opens a span of its own (`bank.work`).
async fn start_participant(dir: &std::path::Path) -> String {
    fn work(ctx: &treaty_sdk::BranchContext) {
        let span = tracing::info_span!(target: "bank", "bank.work", gid = %ctx.gid);
        let _in = span.enter();
    }
    let store = SledStore::open_dir(dir, "data").unwrap();
    let participant = Participant::builder(store)
        .two_phase(
            "account",
            TwoPhase::<SledStore>::new()
                .prepare(async |ctx, _, _| {
                    work(ctx);
                    Ok(())
                })
                .commit(async |ctx, _, _| {
                    work(ctx);
                    Ok(())
                })
                .abort(async |_, _, _| Ok(())),
        )
        .saga(
            "busy-once",
            Saga::<SledStore>::new()
                .execute(async |ctx, _, _| {
                    work(ctx);
                    if ctx.attempt == 1 {
                        return Err(HandlerError::retry("busy, try again"));
                    }
                    Ok(())
                })
                .compensate(async |_, _, _| Ok(())),
        )
        .saga(
            "gated",
            Saga::<SledStore>::new()
                .execute(async |_, _, _| {
                    GATED_ATTEMPTS.fetch_add(1, Ordering::SeqCst);
                    if !GATE_OPEN.load(Ordering::SeqCst) {
                        return Err(HandlerError::retry("not yet"));
                    }
                    Ok(())
                })
                .compensate(async |_, _, _| Ok(())),
        )
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(participant.serve(listener, std::future::pending()));
    uri
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_transaction_from_the_client_through_treatyd_to_every_handler() {
    let collector = Collector::default();
    let collector_uri = start_collector(collector.clone()).await;
    let provider = install_tracing(&collector_uri);
    let dir = tempfile::tempdir().unwrap();
    let mut treatyd = Treatyd::start(
        &dir.path().join("treatyd"),
        &[
            "--otlp-endpoint",
            &collector_uri,
            "--otlp-service-name",
            "treatyd-test",
            "--initial-backoff-ms",
            "1",
            "--max-backoff-ms",
            "20",
        ],
        &[],
    )
    .expect("treatyd");
    let a = start_participant(&dir.path().join("a")).await;
    let b = start_participant(&dir.path().join("b")).await;
    let client = Client::connect(treatyd.uri()).await.expect("connect");

    // The user's own span around the submissions: the root of the trace.
    let root = tracing::info_span!(target: "bank", "bank.transfer");
    let trace_id = root.context().span().span_context().trace_id().to_bytes();
    let root_id = root.context().span().span_context().span_id().to_bytes();
    async {
        let two_phase = client
            .two_phase()
            .gid("traced-2pc")
            .branch(Branch::new(&a, "account"))
            .branch(Branch::new(&b, "account"))
            .submit_and_wait(WAIT)
            .await
            .expect("2PC");
        assert_eq!(two_phase.outcome, Outcome::Committed);
        let saga = client
            .saga()
            .gid("traced-saga")
            .step(Step::new(&a, "busy-once"))
            .step(Step::new(&b, "busy-once"))
            .submit_and_wait(WAIT)
            .await
            .expect("saga");
        assert_eq!(saga.outcome, Outcome::Committed);
    }
    .instrument(root.clone())
    .await;
    drop(root);

    // treatyd flushes its exporter as it exits; this process flushes its own.
    assert!(
        treatyd.proc.terminate(WAIT).is_some_and(|s| s.success()),
        "treatyd exits cleanly on SIGTERM"
    );
    tokio::task::spawn_blocking(move || provider.force_flush().expect("flush"))
        .await
        .unwrap();

    // Every operation of both transactions (2 prepares, 2 commits, 4 executes: two of them
    // retried) reached both sides.
    let spans = wait_until("every span at the collector", WAIT, || {
        let spans = collector.spans();
        let calls = spans
            .iter()
            .filter(|s| s.service == "treatyd-test" && s.attr("treaty.op").is_some())
            .count();
        let handled = spans
            .iter()
            .filter(|s| s.name.starts_with("treaty.handle"))
            .count();
        let txs = spans
            .iter()
            .filter(|s| s.attr("treaty.mode").is_some())
            .count();
        let root = spans.iter().any(|s| s.name == "bank.transfer");
        std::future::ready((calls >= 8 && handled >= 8 && txs >= 2 && root).then_some(spans))
    })
    .await;
    let show = || {
        spans
            .iter()
            .map(|s| format!("{} {} {:?}", s.service, s.name, s.attrs))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // One trace: client, treatyd, participants, handlers' own spans.
    for s in &spans {
        assert_eq!(
            s.trace_id,
            trace_id.to_vec(),
            "{} span {} left the client's trace\n{}",
            s.service,
            s.name,
            show()
        );
    }
    let by_id: HashMap<&[u8], &Got> = spans.iter().map(|s| (&s.span_id[..], s)).collect();

    // treatyd: one span per transaction, a child of the client's span.
    let txs: Vec<&Got> = spans
        .iter()
        .filter(|s| s.service == "treatyd-test" && s.attr("treaty.mode").is_some())
        .collect();
    assert_eq!(txs.len(), 2, "{}", show());
    for t in &txs {
        assert_eq!(t.parent_span_id, root_id.to_vec(), "{}", show());
        assert_eq!(t.attr("treaty.outcome"), Some("committed"));
    }

    // Every branch call names its gid and branch, and is a child of its transaction's span.
    let calls: Vec<&Got> = spans
        .iter()
        .filter(|s| s.service == "treatyd-test" && s.attr("treaty.op").is_some())
        .collect();
    for c in &calls {
        let gid = c.attr("treaty.gid").expect("treaty.gid");
        assert!(c.attr("treaty.branch").is_some(), "{c:?}");
        assert!(c.attr("treaty.attempt").is_some(), "{c:?}");
        assert!(c.attr("treaty.result").is_some(), "{c:?}");
        let parent = by_id.get(&c.parent_span_id[..]).expect("the call's parent");
        assert_eq!(parent.attr("treaty.gid"), Some(gid), "{c:?}");
    }
    let ops = |gid: &str, op: &str| {
        let mut v: Vec<(String, String, String)> = calls
            .iter()
            .filter(|c| c.attr("treaty.gid") == Some(gid) && c.attr("treaty.op") == Some(op))
            .map(|c| {
                let a = |k| c.attr(k).unwrap_or_default().to_string();
                (a("treaty.branch"), a("treaty.attempt"), a("treaty.result"))
            })
            .collect();
        v.sort();
        v
    };
    let t = |b: &str, n: &str, r: &str| (b.to_string(), n.to_string(), r.to_string());
    assert_eq!(
        ops("traced-2pc", "prepare"),
        vec![t("0", "1", "ok"), t("1", "1", "ok")]
    );
    assert_eq!(
        ops("traced-2pc", "commit"),
        vec![t("0", "1", "ok"), t("1", "1", "ok")]
    );
    // The step that answered RETRY: one span per attempt.
    assert_eq!(
        ops("traced-saga", "execute"),
        vec![
            t("0", "1", "retry"),
            t("0", "2", "ok"),
            t("1", "1", "retry"),
            t("1", "2", "ok")
        ],
        "{}",
        show()
    );

    // Participants: every delivery is a child of the treatyd call that carried it, and a
    // handler's own span is a child of its delivery.
    let handled: Vec<&Got> = spans
        .iter()
        .filter(|s| s.name.starts_with("treaty.handle"))
        .collect();
    assert_eq!(handled.len(), 8, "{}", show());
    for h in &handled {
        let call = by_id
            .get(&h.parent_span_id[..])
            .unwrap_or_else(|| panic!("no parent for {h:?}\n{}", show()));
        assert_eq!(call.service, "treatyd-test", "{h:?}");
        for key in ["treaty.gid", "treaty.branch", "treaty.op", "treaty.attempt"] {
            assert_eq!(call.attr(key), h.attr(key), "{key} of {h:?}");
        }
    }
    let work: Vec<&Got> = spans.iter().filter(|s| s.name == "bank.work").collect();
    assert_eq!(work.len(), 8, "{}", show());
    for w in &work {
        let delivery = by_id
            .get(&w.parent_span_id[..])
            .expect("the handler's parent");
        assert!(delivery.name.starts_with("treaty.handle"), "{w:?}");
        assert_eq!(delivery.attr("treaty.gid"), w.attr("gid"));
    }

    recovered_transaction_continues_its_trace(&mut treatyd, &client, &a, &collector).await;
}

/// A saga step that cannot succeed yet; treatyd is killed (SIGKILL: nothing flushed) while
/// it retries, and restarted. The recovered transaction's span (and the calls after the
/// restart, and their deliveries) must be in the trace of the client span that submitted it,
/// which only the `traceparent` stored in the log record can tell the new process.
async fn recovered_transaction_continues_its_trace(
    treatyd: &mut Treatyd,
    client: &Client,
    participant: &str,
    collector: &Collector,
) {
    treatyd.restart().expect("treatyd again");
    let root = tracing::info_span!(target: "bank", "bank.later");
    let trace_id = root.context().span().span_context().trace_id().to_bytes();
    let root_id = root.context().span().span_context().span_id().to_bytes();
    client
        .saga()
        .gid("traced-recovered")
        .step(Step::new(participant, "gated"))
        .submit()
        .instrument(root.clone())
        .await
        .expect("submitted");
    drop(root);
    wait_until("the gated step to be tried", WAIT, || {
        std::future::ready((GATED_ATTEMPTS.load(Ordering::SeqCst) > 0).then_some(()))
    })
    .await;
    treatyd.kill();
    GATE_OPEN.store(true, Ordering::SeqCst);
    treatyd.restart().expect("treatyd after the crash");
    wait_until("the recovered saga to commit", WAIT, || async {
        let answer = client.outcome("traced-recovered").await.ok()?;
        (answer.outcome == Outcome::Committed).then_some(())
    })
    .await;
    // SIGTERM: the transaction leaves (its span ends) and the exporter flushes.
    assert!(
        treatyd.proc.terminate(WAIT).is_some_and(|s| s.success()),
        "treatyd exits cleanly on SIGTERM"
    );

    let recovered = wait_until("the recovered transaction's span", WAIT, || {
        std::future::ready(collector.spans().into_iter().find(|s| {
            s.attr("treaty.gid") == Some("traced-recovered")
                && s.attr("treaty.recovered") == Some("true")
                && s.attr("treaty.outcome") == Some("committed")
        }))
    })
    .await;
    assert_eq!(recovered.trace_id, trace_id.to_vec(), "{recovered:?}");
    assert_eq!(recovered.parent_span_id, root_id.to_vec(), "{recovered:?}");
    let last_call = collector
        .spans()
        .into_iter()
        .find(|s| s.parent_span_id == recovered.span_id && s.attr("treaty.result") == Some("ok"))
        .expect("the successful call after the restart, under the recovered span");
    assert_eq!(last_call.trace_id, trace_id.to_vec());
}
