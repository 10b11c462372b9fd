//! What [`super::Runtime::begin`] takes: a `Begin` as the API validated it, with nothing
//! defaulted, and [`BeginRequest::with_defaults`], the one place the runtime fills in what the
//! client left to the coordinator (gid, deadline, retry policy, wait bound) from [`Config`].
//!
//! Validation ([`crate::api::validate`]) checks what the client sent against the limits and
//! builds this type; it never picks a default itself, so a default changes in one place.

use crate::config::Config;
use crate::engine::{BranchDef, Mode, NewTx, RetryPolicy};
use std::time::Duration;

/// A `Begin` whose every field is within the configured limits. `None` (or
/// [`Wait::Default`]) means "the coordinator's default".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BeginRequest {
    /// The client's gid; `None`: the coordinator assigns a UUIDv7.
    pub gid: Option<String>,
    pub mode: Mode,
    /// At least one.
    pub branches: Vec<BranchDef>,
    /// Phase-one / forward-run deadline from submission; `None`: `Config::default_deadline`.
    pub deadline: Option<Duration>,
    pub retry: RetryOverrides,
    pub wait: Wait,
    /// The client's W3C `traceparent`, kept with the transaction when the coordinator makes
    /// traces ([`crate::config::Config::traces`]); `None` otherwise.
    pub trace_parent: Option<String>,
}

/// The parts of a retry policy the client set; each `None` takes the [`Config`] value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryOverrides {
    pub initial_backoff_ms: Option<u64>,
    pub max_backoff_ms: Option<u64>,
    pub stuck_after_attempts: Option<u32>,
}

/// Whether, and how long, `Begin` waits for the outcome before answering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Wait {
    /// Answer once `Begun` is durable (outcome PENDING).
    #[default]
    No,
    /// Wait up to `Config::default_wait`.
    Default,
    /// Wait up to this long, capped at `Config::max_wait`.
    For(Duration),
}

impl RetryOverrides {
    /// The policy these overrides give over `config`'s defaults.
    pub fn over(&self, config: &Config) -> RetryPolicy {
        RetryPolicy {
            initial_backoff_ms: self
                .initial_backoff_ms
                .unwrap_or(config.initial_backoff.as_millis() as u64),
            max_backoff_ms: self
                .max_backoff_ms
                .unwrap_or(config.max_backoff.as_millis() as u64),
            stuck_after_attempts: self
                .stuck_after_attempts
                .unwrap_or(config.stuck_after_attempts),
        }
    }
}

impl BeginRequest {
    /// A request with every optional field left to the coordinator.
    pub fn new(mode: Mode, branches: Vec<BranchDef>) -> BeginRequest {
        BeginRequest {
            gid: None,
            mode,
            branches,
            deadline: None,
            retry: RetryOverrides::default(),
            wait: Wait::No,
            trace_parent: None,
        }
    }

    /// The engine's definition of the transaction submitted at `now_ms`, and the wait bound
    /// (`None`: answer without waiting), with `config`'s defaults for what the client left
    /// unset. The only place those defaults are applied.
    pub fn with_defaults(self, config: &Config, now_ms: u64) -> (NewTx, Option<Duration>) {
        let deadline = self.deadline.unwrap_or(config.default_deadline);
        let wait = match self.wait {
            Wait::No => None,
            Wait::Default => Some(config.default_wait),
            Wait::For(d) => Some(d.min(config.max_wait)),
        };
        let def = NewTx {
            gid: self.gid.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
            mode: self.mode,
            branches: self.branches,
            deadline_unix_ms: now_ms.saturating_add(deadline.as_millis() as u64),
            retry: self.retry.over(config),
            trace_parent: self.trace_parent,
        };
        (def, wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn branch() -> BranchDef {
        BranchDef {
            endpoint: "http://127.0.0.1:1".into(),
            handler: "h".into(),
            payload: Default::default(),
            compensation_payload: Default::default(),
        }
    }

    #[test]
    fn unset_fields_take_the_config_defaults() {
        let config = Config {
            default_deadline: Duration::from_secs(7),
            initial_backoff: Duration::from_millis(11),
            max_backoff: Duration::from_millis(13),
            stuck_after_attempts: 17,
            default_wait: Duration::from_secs(19),
            ..Config::default()
        };
        let mut req = BeginRequest::new(Mode::Saga, vec![branch()]);
        req.wait = Wait::Default;
        let (def, wait) = req.with_defaults(&config, 1_000);
        assert_eq!(def.gid.len(), 36, "a UUID is assigned");
        assert_eq!(def.deadline_unix_ms, 8_000);
        assert_eq!(
            def.retry,
            RetryPolicy {
                initial_backoff_ms: 11,
                max_backoff_ms: 13,
                stuck_after_attempts: 17
            }
        );
        assert_eq!(wait, Some(Duration::from_secs(19)));
    }

    #[test]
    fn set_fields_win_and_the_wait_is_capped() {
        let config = Config::default();
        let req = BeginRequest {
            gid: Some("g".into()),
            deadline: Some(Duration::from_millis(5)),
            retry: RetryOverrides {
                initial_backoff_ms: Some(1),
                max_backoff_ms: None,
                stuck_after_attempts: Some(2),
            },
            wait: Wait::For(config.max_wait * 2),
            ..BeginRequest::new(Mode::TwoPhase, vec![branch()])
        };
        let (def, wait) = req.with_defaults(&config, 10);
        assert_eq!(def.gid, "g");
        assert_eq!(def.deadline_unix_ms, 15);
        assert_eq!(
            def.retry,
            RetryPolicy {
                initial_backoff_ms: 1,
                max_backoff_ms: config.max_backoff.as_millis() as u64,
                stuck_after_attempts: 2
            }
        );
        assert_eq!(wait, Some(config.max_wait));
        let (_, wait) = BeginRequest::new(Mode::Saga, vec![branch()]).with_defaults(&config, 0);
        assert_eq!(wait, None);
    }
}
