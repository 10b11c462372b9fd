//! The web dashboard on the admin listener: one static page (HTML, CSS and JavaScript built
//! into the binary with `include_str!`: no build step) and the JSON API it polls.
//!
//! - `GET /` redirects to `GET /dashboard/`: the page, `app.js`, `style.css` (no data in them,
//!   so they are served to anyone; the page asks for a token).
//! - `GET /api/summary`: live, stuck, begun, committed and aborted counts (read).
//! - `GET /api/transactions?states=&mode=&stuck=&min_age_ms=&page_size=&page_token=`: the
//!   `List` of the gRPC API, newest first, then stuck ones moved to the top of the page as
//!   `treaty list` does (read).
//! - `GET /api/transactions/{gid}`: `Get` (read).
//! - `POST /api/transactions/{gid}/retry` with `{}`: `Retry` (operate).
//! - `POST /api/transactions/{gid}/resolve` with `{"branch_id", "operator", "reason"}`:
//!   `Resolve` (operate).
//!
//! Every API route calls the same [`crate::api::CoordinatorService`] method the gRPC API serves (its
//! validation, filters, role check and answers), in-process, with the request's
//! `Authorization: Bearer` header as its metadata. An error comes back as JSON
//! `{"error", "code"}` with the HTTP status of its gRPC code (401 unauthenticated, 403
//! permission denied, 400, 404, 409, 429, 503), and is counted in
//! `treaty_requests_rejected_total` like a refused gRPC call.

use super::AdminState;
use crate::security::{Role, AUTHORIZATION};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tonic::{Code, Request, Status};
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_server::Coordinator;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// The dashboard's routes, merged into [`super::router`].
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard/") }))
        .route("/dashboard", get(|| async { Redirect::to("/dashboard/") }))
        .route(
            "/dashboard/",
            get(|| asset("text/html; charset=utf-8", INDEX_HTML)),
        )
        .route(
            "/dashboard/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/dashboard/style.css",
            get(|| asset("text/css; charset=utf-8", STYLE_CSS)),
        )
        .route("/api/summary", get(summary))
        .route("/api/transactions", get(list))
        .route("/api/transactions/{gid}", get(show))
        .route("/api/transactions/{gid}/retry", post(retry))
        .route("/api/transactions/{gid}/resolve", post(resolve))
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The page renders data with textContent only; this forbids inline scripts and
            // any other origin, so an injected tag could not run even if one slipped in.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// A gRPC error as the dashboard's API answers it.
struct ApiError(Status);

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    code: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.code();
        let status = match code {
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut resp = (
            status,
            Json(ErrorBody {
                error: self.0.message(),
                code: crate::metrics::code_label(code),
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// Runs one API call: builds the gRPC request with the caller's credentials, and counts an
/// error answer in `treaty_requests_rejected_total`.
async fn call<Q, A, F, Fut>(
    s: &AdminState,
    headers: &HeaderMap,
    msg: Q,
    f: F,
) -> Result<A, ApiError>
where
    F: FnOnce(crate::api::CoordinatorService, Request<Q>) -> Fut,
    Fut: std::future::Future<Output = Result<A, Status>>,
{
    let answer = async {
        let mut req = Request::new(msg);
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let value = value
                .to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| {
                    Status::unauthenticated("the Authorization header must be `Bearer <token>`")
                })?;
            req.metadata_mut().insert(AUTHORIZATION, value);
        }
        f(s.api.clone(), req).await
    }
    .await;
    answer.map_err(|status| {
        s.runtime.metrics().rejected(status.code());
        ApiError(status)
    })
}

#[derive(Serialize)]
struct Summary {
    #[serde(flatten)]
    counts: crate::metrics::Counts,
    ready: bool,
}

async fn summary(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<Summary>, ApiError> {
    call(&s, &headers, (), |api, req| async move {
        api.authorize(&req, Role::Read, "Summary")
    })
    .await?;
    s.runtime.refresh_metrics();
    Ok(Json(Summary {
        counts: s.runtime.metrics().counts(),
        ready: s.is_ready(),
    }))
}

/// The list filters, as query parameters (`states` is comma-separated).
#[derive(Deserialize, Default)]
#[serde(default)]
struct ListQuery {
    states: String,
    mode: String,
    stuck: bool,
    min_age_ms: u64,
    page_size: u32,
    page_token: String,
}

#[derive(Serialize)]
struct ListAnswer {
    transactions: Vec<TxView>,
    next_page_token: String,
}

async fn list(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Result<Json<ListAnswer>, ApiError> {
    let mut states = Vec::new();
    for name in q.states.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let upper = format!("TX_STATE_{}", name.to_ascii_uppercase());
        let state = pb::TxState::from_str_name(&upper).ok_or_else(|| {
            ApiError(Status::invalid_argument(format!(
                "states: unknown state {name:?}; states are active, committing, aborting, \
                 compensating, committed, aborted"
            )))
        })?;
        states.push(state as i32);
    }
    let mode = match q.mode.as_str() {
        "" => pb::Mode::Unspecified,
        "2pc" => pb::Mode::TwoPhase,
        "saga" => pb::Mode::Saga,
        other => {
            return Err(ApiError(Status::invalid_argument(format!(
                "mode: unknown mode {other:?}; modes are 2pc and saga"
            ))))
        }
    };
    let req = pb::ListRequest {
        states,
        mode: mode as i32,
        stuck_only: q.stuck,
        min_age_ms: q.min_age_ms,
        page_size: q.page_size,
        page_token: q.page_token,
    };
    let page = call(&s, &headers, req, |api, req| async move {
        api.list(req).await.map(|r| r.into_inner())
    })
    .await?;
    // Stuck ones first, then newest first (the order `treaty list` prints), within a page.
    let mut transactions: Vec<TxView> = page.transactions.iter().map(TxView::from).collect();
    transactions.sort_by_key(|t| !t.stuck);
    Ok(Json(ListAnswer {
        transactions,
        next_page_token: page.next_page_token,
    }))
}

async fn show(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(gid): Path<String>,
) -> Result<Json<TxView>, ApiError> {
    let t = call(
        &s,
        &headers,
        pb::GetRequest { gid },
        |api, req| async move { api.get(req).await.map(|r| r.into_inner()) },
    )
    .await?;
    Ok(Json(TxView::from(&t)))
}

#[derive(Serialize)]
struct Retried {
    /// Branches whose waiting call was sent now (0: nothing was waiting, e.g. finished).
    retried: u32,
    forwarded: bool,
}

async fn retry(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(gid): Path<String>,
    body: Result<Json<serde_json::Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Retried>, ApiError> {
    // A JSON body (`{}`), like resolve's: another site's page cannot send one without a
    // CORS preflight, which this listener never grants, so it cannot make an operator's
    // browser retry (what a bearer token already prevents, for a treatyd without one).
    if let Err(e) = body {
        return Err(ApiError(Status::invalid_argument(format!(
            "retry needs a JSON body (`{{}}`, Content-Type: application/json): {}",
            e.body_text()
        ))));
    }
    let r = call(
        &s,
        &headers,
        pb::RetryRequest { gid },
        |api, req| async move { api.retry(req).await.map(|r| r.into_inner()) },
    )
    .await?;
    Ok(Json(Retried {
        retried: r.retried,
        forwarded: r.forwarded,
    }))
}

#[derive(Deserialize)]
struct ResolveBody {
    branch_id: u32,
    operator: String,
    reason: String,
}

async fn resolve(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(gid): Path<String>,
    body: Result<Json<ResolveBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<TxView>, ApiError> {
    let Json(b) = body.map_err(|e| {
        ApiError(Status::invalid_argument(format!(
            "expected a JSON body {{\"branch_id\", \"operator\", \"reason\"}}: {}",
            e.body_text()
        )))
    })?;
    let req = pb::ResolveRequest {
        gid,
        branch_id: b.branch_id,
        operator: b.operator,
        reason: b.reason,
    };
    let t = call(&s, &headers, req, |api, req| async move {
        api.resolve(req).await.map(|r| r.into_inner())
    })
    .await?;
    Ok(Json(TxView::from(&t)))
}

/// A transaction as the dashboard shows it: the gRPC answer with its enums as lowercase
/// names (the proto's own names without their prefix), times in unix ms.
#[derive(Serialize, Debug)]
struct TxView {
    gid: String,
    /// `2pc` or `saga`.
    mode: &'static str,
    state: String,
    outcome: String,
    stuck: bool,
    reason: String,
    created_unix_ms: u64,
    updated_unix_ms: u64,
    deadline_unix_ms: u64,
    branches: Vec<BranchView>,
}

#[derive(Serialize, Debug)]
struct BranchView {
    branch_id: u32,
    endpoint: String,
    handler: String,
    state: String,
    attempts: u32,
    last_error: String,
    resolution: Option<ResolutionView>,
}

#[derive(Serialize, Debug)]
struct ResolutionView {
    operator: String,
    unix_ms: u64,
    reason: String,
}

/// `TX_STATE_IN_DOUBT` → `in_doubt`; an unknown number → `unknown`.
fn enum_name(name: Option<&str>, prefix: &str) -> String {
    name.and_then(|n| n.strip_prefix(prefix))
        .unwrap_or("UNKNOWN")
        .to_ascii_lowercase()
}

impl From<&pb::Transaction> for TxView {
    fn from(t: &pb::Transaction) -> TxView {
        TxView {
            gid: t.gid.clone(),
            mode: match t.mode() {
                pb::Mode::TwoPhase => "2pc",
                pb::Mode::Saga => "saga",
                pb::Mode::Unspecified => "unknown",
            },
            state: enum_name(
                pb::TxState::try_from(t.state).ok().map(|s| s.as_str_name()),
                "TX_STATE_",
            ),
            outcome: enum_name(
                pb::Outcome::try_from(t.outcome)
                    .ok()
                    .map(|s| s.as_str_name()),
                "OUTCOME_",
            ),
            stuck: t.stuck,
            reason: t.reason.clone(),
            created_unix_ms: t.created_unix_ms,
            updated_unix_ms: t.updated_unix_ms,
            deadline_unix_ms: t.deadline_unix_ms,
            branches: t
                .branches
                .iter()
                .map(|b| BranchView {
                    branch_id: b.branch_id,
                    endpoint: b.endpoint.clone(),
                    handler: b.handler.clone(),
                    state: enum_name(
                        pb::BranchState::try_from(b.state)
                            .ok()
                            .map(|s| s.as_str_name()),
                        "BRANCH_STATE_",
                    ),
                    attempts: b.attempts,
                    last_error: b.last_error.clone(),
                    resolution: b.resolution.as_ref().map(|r| ResolutionView {
                        operator: r.operator.clone(),
                        unix_ms: r.unix_ms,
                        reason: r.reason.clone(),
                    }),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{router, AdminState};
    use crate::api::CoordinatorService;
    use crate::config::Config;
    use crate::log::memory::MemoryLog;
    use crate::runtime::Runtime;
    use crate::security::Auth;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use std::sync::Arc;
    use tower::ServiceExt;

    fn state(auth: Option<&str>) -> AdminState {
        let rt = Runtime::new(Arc::new(MemoryLog::new()), Config::default());
        let mut api = CoordinatorService::new(rt.clone());
        if let Some(tokens) = auth {
            api = api.with_auth(Auth::parse(tokens, "test tokens").expect("tokens"));
        }
        AdminState::new(rt).with_api(api)
    }

    async fn send(
        s: &AdminState,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let resp = router(s.clone())
            .oneshot(req.body(Body::from(body.to_string())).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    const TOKENS: &str = "reader-1 = read\nops-1 = read, operate\n";

    /// With a token file: no token is 401, a read token reads but cannot retry or resolve
    /// (403, naming the role), an operate token can; each refusal is a JSON error counted
    /// in treaty_requests_rejected_total like a refused gRPC call.
    #[tokio::test]
    async fn reads_need_read_and_actions_need_operate() {
        let s = state(Some(TOKENS));
        let (status, body) = send(&s, "GET", "/api/transactions", None, "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["code"], "unauthenticated");
        let (status, _) = send(&s, "GET", "/api/summary", Some("wrong"), "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);

        let (status, body) = send(&s, "GET", "/api/summary", Some("reader-1"), "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["live"], 0);
        let (status, body) = send(&s, "GET", "/api/transactions", Some("reader-1"), "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["transactions"], serde_json::json!([]));

        let (status, body) = send(
            &s,
            "POST",
            "/api/transactions/g1/retry",
            Some("reader-1"),
            "{}",
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("`operate` role"),
            "{body}"
        );
        let resolve = r#"{"branch_id": 0, "operator": "me", "reason": "why"}"#;
        let (status, _) = send(
            &s,
            "POST",
            "/api/transactions/g1/resolve",
            Some("reader-1"),
            resolve,
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        // Operate passes the role check: the answer is the API's own (no such gid).
        let (status, body) = send(
            &s,
            "POST",
            "/api/transactions/g1/retry",
            Some("ops-1"),
            "{}",
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("no transaction"),
            "{body}"
        );

        let metrics = s.runtime.metrics().encode();
        for line in [
            "treaty_requests_rejected_total{reason=\"unauthenticated\"} 2",
            "treaty_requests_rejected_total{reason=\"permission_denied\"} 2",
            "treaty_requests_rejected_total{reason=\"not_found\"} 1",
        ] {
            assert!(metrics.contains(line), "{line} in {metrics}");
        }
    }

    /// A stuck 2PC (its only participant is not there) as the page reads it: listed with
    /// lowercase names, stuck; an operator resolves its branch and it finishes aborted.
    #[tokio::test]
    async fn an_operator_resolves_a_stuck_transaction_through_the_api() {
        use crate::engine::{BranchDef, Mode};
        use crate::runtime::{BeginRequest, RetryOverrides};
        let s = state(Some(TOKENS));
        let begin = BeginRequest {
            gid: Some("stuck-1".into()),
            deadline: Some(std::time::Duration::from_millis(100)),
            retry: RetryOverrides {
                initial_backoff_ms: Some(10),
                max_backoff_ms: Some(50),
                stuck_after_attempts: Some(1),
            },
            ..BeginRequest::new(
                Mode::TwoPhase,
                vec![BranchDef {
                    endpoint: "http://127.0.0.1:1".into(),
                    handler: "debit".into(),
                    payload: bytes::Bytes::new(),
                    compensation_payload: bytes::Bytes::new(),
                }],
            )
        };
        s.runtime.begin(begin).await.expect("begun");
        let bound = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let listed = loop {
            let (status, body) = send(
                &s,
                "GET",
                "/api/transactions?stuck=true",
                Some("reader-1"),
                "",
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if body["transactions"]
                .as_array()
                .is_some_and(|t| !t.is_empty())
            {
                break body["transactions"][0].clone();
            }
            assert!(std::time::Instant::now() < bound, "never stuck: {body}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(listed["gid"], "stuck-1");
        assert_eq!(listed["mode"], "2pc");
        assert_eq!(listed["state"], "aborting");
        assert_eq!(listed["stuck"], true);
        assert_eq!(listed["branches"][0]["handler"], "debit");
        assert!(
            listed["reason"]
                .as_str()
                .unwrap()
                .contains("deadline passed"),
            "{listed}"
        );
        let (_, summary) = send(&s, "GET", "/api/summary", Some("reader-1"), "").await;
        assert_eq!(summary["stuck"], 1, "{summary}");

        let body = r#"{"branch_id": 0, "operator": "ops@example", "reason": "gone, OPS-1"}"#;
        let (status, t) = send(
            &s,
            "POST",
            "/api/transactions/stuck-1/resolve",
            Some("ops-1"),
            body,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{t}");
        assert_eq!(t["branches"][0]["resolution"]["operator"], "ops@example");
        let t = loop {
            let (_, t) = send(&s, "GET", "/api/transactions/stuck-1", Some("reader-1"), "").await;
            if t["state"] == "aborted" {
                break t;
            }
            assert!(std::time::Instant::now() < bound, "never finished: {t}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(t["outcome"], "aborted");
        assert_eq!(t["branches"][0]["resolution"]["reason"], "gone, OPS-1");
        // Nothing is outstanding any more: a second resolve is a conflict.
        let (status, _) = send(
            &s,
            "POST",
            "/api/transactions/stuck-1/resolve",
            Some("ops-1"),
            body,
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
    }

    /// Bad input gets the API's own validation message, as a 400.
    #[tokio::test]
    async fn bad_filters_and_bodies_are_400_with_the_reason() {
        let s = state(None);
        for (method, path, body, says) in [
            ("GET", "/api/transactions?states=done", "", "unknown state"),
            ("GET", "/api/transactions?mode=3pc", "", "unknown mode"),
            ("GET", "/api/transactions/bad%20gid", "", "gid"),
            (
                "POST",
                "/api/transactions/g/resolve",
                "{}",
                "expected a JSON body",
            ),
            // No JSON body: what a cross-site form post would send.
            ("POST", "/api/transactions/g/retry", "", "needs a JSON body"),
            (
                "POST",
                "/api/transactions/g/resolve",
                r#"{"branch_id": 0, "operator": " ", "reason": "r"}"#,
                "operator: required",
            ),
        ] {
            let (status, json) = send(&s, method, path, None, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {json}");
            assert!(
                json["error"].as_str().unwrap_or_default().contains(says),
                "{path}: {json}"
            );
        }
    }

    /// The page and its assets are served without a token (they hold no data), with a
    /// content security policy that forbids inline scripts; the app renders data as text.
    #[tokio::test]
    async fn the_page_is_served_with_a_strict_content_security_policy() {
        let s = state(Some(TOKENS));
        for path in ["/dashboard/", "/dashboard/app.js", "/dashboard/style.css"] {
            let resp = router(s.clone())
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            let csp = resp.headers()["content-security-policy"].to_str().unwrap();
            assert!(csp.contains("default-src 'self'"), "{path}: {csp}");
        }
        let resp = router(s)
            .oneshot(Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.headers()["location"], "/dashboard/");
        assert!(
            !super::APP_JS.contains("innerHTML"),
            "data is set as text only"
        );
    }
}
