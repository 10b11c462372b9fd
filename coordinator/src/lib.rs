//! Treaty's coordinator, as a library; `treatyd` (src/main.rs) is a thin `main` over it.
//!
//! Where things are:
//! - [`engine`]: the pure protocol state machines: what every transaction shares, and one
//!   file per protocol (2PC presumed abort, saga). No I/O.
//! - [`log`]: the async [`log::LogStore`] trait with its contract, the conformance suite every
//!   backend runs ([`log::conformance`]), the durable sled backend with group commit, and an
//!   in-memory backend that models durability for tests and simulation.
//! - [`runtime`]: drives each transaction's engine with real participant calls, timers and
//!   log writes.
//! - [`api`]: the `treaty.v1.Coordinator` gRPC service and request validation.
//! - [`mapping`]: every conversion between protobuf and engine types (for the API, the log
//!   encoding and participant calls).
//! - [`security`]: TLS of the API and of participant calls, the token file and roles, the
//!   token sent to participants.
//! - [`metrics`]: every Prometheus metric, defined once; [`admin`]: the admin HTTP listener
//!   (`/metrics`, `/healthz`, `/readyz`) as an axum `Router` others can extend.
//! - [`otel`]: OpenTelemetry traces: the OTLP exporter and the transaction and branch-call
//!   spans (W3C trace context from `Begin` to every branch call).
//! - [`settings`]: `treatyd`'s settings, each defined once (flag, environment variable, TOML
//!   key, default, help).
//! - [`server::run`]: the entry point: a listener, a log store, a [`config::Config`] and a
//!   shutdown future.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use treaty_coordinator::{config::Config, log::sled::{SledLog, SledLogOptions}, server};
//!
//! let log = SledLog::open(std::path::Path::new("./treaty-data"), SledLogOptions::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7700").await?;
//! server::run(listener, Arc::new(log), Config::default(), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(()) }
//! ```
pub mod admin;
pub mod api;
pub mod config;
pub mod engine;
pub mod log;
pub mod mapping;
pub mod metrics;
pub mod otel;
pub mod runtime;
pub mod security;
pub mod server;
pub mod settings;
