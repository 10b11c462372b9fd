//! Coordinator configuration: what the runtime, the API and the daemon may be tuned with.
//!
//! `treatyd` fills a [`Config`] from flags, `TREATY_*` environment variables and an optional
//! TOML file, in that order of precedence, through the one table in [`crate::settings`];
//! embedders build one directly. Every field has a default that suits a small production
//! deployment ([`Config::default`], which `treatyd --help` shows).

use crate::security::Security;
use serde::Deserialize;
use std::time::Duration;

/// Limits on what a client may submit; each is enforced with `INVALID_ARGUMENT`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_branches: usize,
    pub max_payload_bytes: usize,
    pub max_tx_bytes: usize,
    pub max_gid_bytes: usize,
    pub max_handler_bytes: usize,
    pub max_endpoint_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_branches: 64,
            max_payload_bytes: 1 << 20,
            max_tx_bytes: 4 << 20,
            max_gid_bytes: 128,
            max_handler_bytes: 128,
            max_endpoint_bytes: 2048,
        }
    }
}

/// The largest `max_deadline` accepted: a year. A transaction's deadline is a timer the
/// runtime must be able to arm (it re-arms day by day), and a year is beyond any phase one.
pub const MAX_DEADLINE_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// Everything the coordinator runtime and API need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Phase-one / forward-run deadline when the client sets none.
    pub default_deadline: Duration,
    /// Largest deadline a client may ask for.
    pub max_deadline: Duration,
    /// Timeout of one participant call.
    pub call_timeout: Duration,
    /// Backoff start, cap and stuck threshold when the client sets none.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub stuck_after_attempts: u32,
    /// Bound of `Begin` with `wait` when the client sets none, and its maximum.
    pub default_wait: Duration,
    pub max_wait: Duration,
    /// How long finished transactions are kept, and how often they are collected.
    pub retention: Duration,
    pub gc_interval: Duration,
    /// How long the tombstone (gid, outcome, fingerprint) of a collected transaction is kept:
    /// until then a `Begin` reusing the gid is answered from it, never started again, and an
    /// `Outcome` inquiry gets the real outcome. About 100 bytes per transaction.
    pub tombstone_retention: Duration,
    /// Live transactions at most; past it `Begin` answers RESOURCE_EXHAUSTED.
    pub max_live_transactions: usize,
    /// Bytes of definitions (payloads, endpoints, handlers) live transactions may hold in
    /// memory at most; past it `Begin` answers RESOURCE_EXHAUSTED.
    pub max_live_bytes: usize,
    /// `Begin` calls a second each caller may make (as many at once); past it its `Begin`
    /// answers RESOURCE_EXHAUSTED while other callers go on. 0: no per-caller limit.
    pub max_begins_per_caller_per_sec: u32,
    /// The gRPC URI participants should use to ask this coordinator about outcomes (sent with
    /// every branch call). `None`: participants ask their own configured coordinator.
    pub advertise_url: Option<String>,
    /// On shutdown, how long in-flight calls may finish before the process exits.
    pub shutdown_grace: Duration,
    pub limits: Limits,
    /// TLS and authentication files (all unset: plaintext, every caller trusted).
    pub security: Security,
    /// Make OpenTelemetry spans (a transaction span, one span per branch call) and carry W3C
    /// trace context from `Begin` to every branch call (see [`crate::otel`]). `treatyd`
    /// turns it on with `--otlp-endpoint`; an embedder whose `tracing` subscriber has an
    /// OpenTelemetry layer sets it. Off: no span, no metadata, nothing stored.
    pub traces: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_deadline: Duration::from_secs(30),
            max_deadline: Duration::from_secs(24 * 3600),
            call_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            stuck_after_attempts: 10,
            default_wait: Duration::from_secs(30),
            max_wait: Duration::from_secs(300),
            retention: Duration::from_secs(7 * 24 * 3600),
            gc_interval: Duration::from_secs(600),
            tombstone_retention: Duration::from_secs(90 * 24 * 3600),
            max_live_transactions: 1_000_000,
            max_live_bytes: 4 << 30,
            max_begins_per_caller_per_sec: 0,
            advertise_url: None,
            shutdown_grace: Duration::from_secs(10),
            limits: Limits::default(),
            security: Security::default(),
            traces: false,
        }
    }
}

impl Config {
    /// Check the values make sense together; the message names the offending setting.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("default-deadline", self.default_deadline),
            ("call-timeout", self.call_timeout),
            ("initial-backoff", self.initial_backoff),
            ("max-backoff", self.max_backoff),
            ("gc-interval", self.gc_interval),
        ];
        for (name, d) in nonzero {
            if d.is_zero() {
                return Err(format!("{name} must be greater than zero"));
            }
        }
        if self.max_backoff < self.initial_backoff {
            return Err("max-backoff must be at least initial-backoff".into());
        }
        if self.default_deadline > self.max_deadline {
            return Err("default-deadline must not exceed max-deadline".into());
        }
        if self.max_deadline > MAX_DEADLINE_LIMIT {
            return Err(format!(
                "max-deadline must be at most {} days",
                MAX_DEADLINE_LIMIT.as_secs() / 86_400
            ));
        }
        if self.tombstone_retention < self.retention {
            return Err(
                "tombstone-retention must be at least retention: a gid must not be \
                        forgotten while its record could still be collected"
                    .into(),
            );
        }
        if self.max_live_transactions == 0 || self.max_live_bytes == 0 {
            return Err(
                "max-live-transactions and max-live-bytes must be greater than zero".into(),
            );
        }
        if let Some(url) = &self.advertise_url {
            match url.parse::<http::Uri>() {
                Ok(u)
                    if matches!(u.scheme_str(), Some("http" | "https"))
                        && u.authority().is_some() => {}
                _ => {
                    return Err(format!(
                        "advertise-url {url:?} is not an http(s)://host:port URI"
                    ))
                }
            }
        }
        self.security.validate()?;
        if self.default_wait > self.max_wait {
            return Err("default-wait must not exceed max-wait".into());
        }
        if self.stuck_after_attempts == 0 {
            return Err("stuck-after-attempts must be at least 1".into());
        }
        let l = &self.limits;
        if l.max_branches == 0 || l.max_payload_bytes == 0 || l.max_tx_bytes == 0 {
            return Err("limits must be greater than zero".into());
        }
        if l.max_gid_bytes == 0 || l.max_handler_bytes == 0 {
            return Err("limits must be greater than zero".into());
        }
        // Participants (treaty-sdk) refuse longer ones: a gid or handler the coordinator
        // accepted but no participant can take would leave a transaction retrying forever.
        if l.max_gid_bytes > treaty_proto::limits::GID_BYTES_MAX {
            return Err(format!(
                "max-gid-bytes must be at most {} (what treaty-sdk participants accept)",
                treaty_proto::limits::GID_BYTES_MAX
            ));
        }
        if l.max_handler_bytes > treaty_proto::limits::FIELD_BYTES_MAX {
            return Err(format!(
                "max-handler-bytes must be at most {} (what treaty-sdk participants accept)",
                treaty_proto::limits::FIELD_BYTES_MAX
            ));
        }
        Ok(())
    }
}
