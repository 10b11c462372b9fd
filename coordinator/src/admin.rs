//! The admin HTTP listener (`treatyd --admin-listen ADDR`): Prometheus metrics and health, on
//! a port of its own, apart from the Coordinator API.
//!
//! - `GET /metrics`: every metric of [`crate::metrics`], in OpenMetrics text.
//! - `GET /healthz`: `200 ok` while the process answers at all (liveness).
//! - `GET /readyz`: `200 SERVING` only while the runtime takes transactions (recovered, not
//!   failed, not shutting down); `503 NOT_SERVING` otherwise (readiness).
//!
//! [`router`] returns a plain axum `Router` over [`AdminState`], so more pages (the dashboard)
//! are mounted with `router(state).merge(...)` or `.route(...)` on the same listener.

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
}

impl AdminState {
    /// State for `runtime`, not ready until [`AdminState::ready`] is set.
    pub fn new(runtime: Runtime) -> AdminState {
        AdminState {
            runtime,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Ready: recovered, serving, not failed, not shutting down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.runtime.is_serving()
    }
}

/// The admin routes: `/metrics`, `/healthz`, `/readyz`.
pub fn router(state: AdminState) -> Router {
    Router::new()
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
