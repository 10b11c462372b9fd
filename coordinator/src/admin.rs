//! The admin HTTP listener (`treatyd --admin-listen ADDR`): Prometheus metrics and health, on
//! a port of its own, apart from the Coordinator API.
//!
//! - `GET /metrics`: every metric of [`crate::metrics`], in OpenMetrics text.
//! - `GET /healthz`: `200 ok` while the process answers at all (liveness).
//! - `GET /readyz`: `200 SERVING` only while the runtime takes transactions (recovered, not
//!   failed, not shutting down); `503 NOT_SERVING` otherwise (readiness).
//!
//! - The web dashboard and its JSON API under `/api/` ([`dashboard`]): reads need the `read`
//!   role, retry and resolve `operate`, when treatyd has a token file (`--auth-tokens`).
//!   `/healthz` and `/readyz` stay open for probes; `/metrics` stays open too: it holds only
//!   aggregate counts (no gid, endpoint, payload or error text), and scrapers are commonly set
//!   up without credentials; restrict it by binding the listener to a private address, or
//!   with mTLS (`--tls-client-ca`, which applies to the admin listener as to the API).
//!
//! [`router`] returns a plain axum `Router` over [`AdminState`], so more pages are mounted
//! with `router(state).merge(...)` or `.route(...)` on the same listener.

pub mod dashboard;

use crate::api::CoordinatorService;
use crate::metrics::CONTENT_TYPE;
use crate::runtime::Runtime;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What the admin handlers read. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    pub runtime: Runtime,
    /// Set by the server once recovery is done and it serves; cleared when it stops.
    pub ready: Arc<AtomicBool>,
    /// The Coordinator API the dashboard calls in-process (its checks, its role checks).
    pub api: CoordinatorService,
}

impl AdminState {
    /// State for `runtime`, not ready until [`AdminState::ready`] is set.
    pub fn new(runtime: Runtime) -> AdminState {
        AdminState {
            api: CoordinatorService::new(runtime.clone()),
            runtime,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The dashboard's API goes through `api` (the server passes the service it serves, with
    /// its token file) instead of an unauthenticated one.
    pub fn with_api(mut self, api: CoordinatorService) -> AdminState {
        self.api = api;
        self
    }

    /// Ready: recovered, serving, not failed, not shutting down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.runtime.is_serving()
    }
}

/// The admin routes: `/metrics`, `/healthz`, `/readyz`, and the dashboard.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .merge(dashboard::routes())
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    s.runtime.refresh_metrics();
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        s.runtime.metrics().encode(),
    )
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.is_ready() {
        (StatusCode::OK, "SERVING\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::engine::{BranchDef, Mode, Phase};
    use crate::log::memory::{Fault, MemoryLog};
    use crate::runtime::BeginRequest;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(state: &AdminState, path: &str) -> (StatusCode, String) {
        let resp = router(state.clone())
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Ready only once the server says so, and never again after a fail-stop, while the
    /// process (here: the runtime) is still there to answer.
    #[tokio::test]
    async fn readyz_follows_the_runtime_and_healthz_stays_up() {
        let log = Arc::new(MemoryLog::new());
        let rt = Runtime::new(log.clone(), Config::default());
        let state = AdminState::new(rt.clone());
        assert_eq!(
            get(&state, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.ready.store(true, Ordering::Release);
        assert_eq!(
            get(&state, "/readyz").await,
            (StatusCode::OK, "SERVING\n".into())
        );

        // The first forced write fails: the runtime fail-stops.
        log.fault_at(Phase::Active, Fault::Fail);
        let def = BeginRequest {
            gid: Some("g".into()),
            ..BeginRequest::new(
                Mode::Saga,
                vec![BranchDef {
                    endpoint: "http://127.0.0.1:1".into(),
                    handler: "h".into(),
                    payload: bytes::Bytes::new(),
                    compensation_payload: bytes::Bytes::new(),
                }],
            )
        };
        assert!(
            rt.begin(def).await.is_err(),
            "nothing told after a failed write"
        );
        tokio::time::timeout(std::time::Duration::from_secs(10), rt.failed())
            .await
            .expect("the runtime fail-stops");
        assert_eq!(
            get(&state, "/readyz").await,
            (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n".into())
        );
        assert_eq!(get(&state, "/healthz").await.0, StatusCode::OK);
        let (status, metrics) = get(&state, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            metrics.contains("treaty_transactions_begun_total{mode=\"saga\"} 1"),
            "{metrics}"
        );
    }
}
