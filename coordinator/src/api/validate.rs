//! Validation of client requests: [`begin`] checks a `BeginRequest` and turns it into the
//! runtime's plain [`BeginRequest`], defaults left unset (the
//! runtime applies them, in one place); [`gid`] checks a gid for the other calls. Each error
//! names the field and becomes `INVALID_ARGUMENT`; nothing a client sends can make the daemon
//! panic.
//!
//! What is checked, and what is not (so that a reader does not assume more):
//! - gid (when set), mode, branch count, each branch's endpoint, handler and payload sizes,
//!   the transaction's total size, against [`Limits`];
//! - `deadline_ms` against `max_deadline`, and the retry policy as it will be applied
//!   (`max_backoff_ms` at least `initial_backoff_ms`, at most an hour);
//! - not checked: `wait_timeout_ms` (any value is accepted and capped at `max_wait`),
//!   `retry.initial_backoff_ms` and `retry.stuck_after_attempts` beyond the above (0 means
//!   "the default"), and a branch's payloads' content (opaque bytes).
//!
//! The other calls check what they use: `List` in `api/mod.rs`, `Resolve`'s free-text fields
//! there too.

use crate::config::{Config, Limits};
use crate::engine::{Mode, RetryPolicy};
use crate::mapping;
use crate::runtime::{BeginRequest, RetryOverrides, Wait};
use std::time::Duration;
use treaty_proto::v1 as pb;

/// A request field that is not acceptable, with a message naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

/// Check a gid: 1 to `max` bytes of `[A-Za-z0-9._:-]`.
pub fn gid(field: &str, gid: &str, limits: &Limits) -> Result<(), Invalid> {
    if gid.is_empty() {
        return Err(invalid(format!("{field}: must not be empty")));
    }
    if gid.len() > limits.max_gid_bytes {
        return Err(invalid(format!(
            "{field}: at most {} bytes allowed, got {}",
            limits.max_gid_bytes,
            gid.len()
        )));
    }
    if let Some(c) = gid
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
    {
        return Err(invalid(format!(
            "{field}: only [A-Za-z0-9._:-] allowed, found {c:?}"
        )));
    }
    Ok(())
}

fn endpoint(field: &str, ep: &str, config: &Config) -> Result<(), Invalid> {
    let limits = &config.limits;
    if ep.len() > limits.max_endpoint_bytes {
        return Err(invalid(format!(
            "{field}: at most {} bytes allowed, got {}",
            limits.max_endpoint_bytes,
            ep.len()
        )));
    }
    let uri: http::Uri = ep
        .parse()
        .map_err(|e| invalid(format!("{field}: not a valid URI ({e}): {ep:?}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") if config.security.participant_ca.is_some() => {}
        // Without a CA to check the participant's certificate against, every call would
        // fail and the transaction would hang in retries: refuse it up front.
        Some("https") => {
            return Err(invalid(format!(
                "{field}: https:// endpoints need treatyd started with --participant-ca (the CA \
                 that participants' certificates chain to); got {ep:?}"
            )))
        }
        _ => {
            return Err(invalid(format!(
                "{field}: must be an http:// or https:// URI, got {ep:?}"
            )))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(format!("{field}: has no host: {ep:?}")));
    }
    Ok(())
}

/// Check a `BeginRequest` against `config`'s limits and turn it into the runtime's plain
/// request. Nothing is defaulted here: an unset gid, deadline, retry field or wait bound stays
/// unset for [`BeginRequest::with_defaults`]. (`config`'s retry defaults are read only to
/// check the policy that will apply, so a client's `max_backoff_ms` below the default
/// `initial_backoff_ms` is refused here, not later.)
pub fn begin(req: pb::BeginRequest, config: &Config) -> Result<BeginRequest, Invalid> {
    let limits = &config.limits;
    let gid_value = if req.gid.is_empty() {
        None
    } else {
        gid("gid", &req.gid, limits)?;
        Some(req.gid)
    };
    let mode = mapping::mode_from_proto(req.mode).map_err(|_| {
        invalid(format!(
            "mode: must be MODE_TWO_PHASE or MODE_SAGA, got {}",
            req.mode
        ))
    })?;
    if req.branches.is_empty() {
        return Err(invalid("branches: at least one branch is required"));
    }
    if req.branches.len() > limits.max_branches {
        return Err(invalid(format!(
            "branches: at most {} allowed, got {}",
            limits.max_branches,
            req.branches.len()
        )));
    }
    let mut total = 0usize;
    let mut branches = Vec::with_capacity(req.branches.len());
    for (i, b) in req.branches.into_iter().enumerate() {
        endpoint(&format!("branches[{i}].endpoint"), &b.endpoint, config)?;
        if b.handler.is_empty() {
            return Err(invalid(format!("branches[{i}].handler: must not be empty")));
        }
        if b.handler.len() > limits.max_handler_bytes {
            return Err(invalid(format!(
                "branches[{i}].handler: at most {} bytes allowed, got {}",
                limits.max_handler_bytes,
                b.handler.len()
            )));
        }
        for (name, len) in [
            ("payload", b.payload.len()),
            ("compensation_payload", b.compensation_payload.len()),
        ] {
            if len > limits.max_payload_bytes {
                return Err(invalid(format!(
                    "branches[{i}].{name}: at most {} bytes allowed, got {len}",
                    limits.max_payload_bytes
                )));
            }
        }
        if mode == Mode::TwoPhase && !b.compensation_payload.is_empty() {
            return Err(invalid(format!(
                "branches[{i}].compensation_payload: only saga steps have compensations"
            )));
        }
        total +=
            b.payload.len() + b.compensation_payload.len() + b.handler.len() + b.endpoint.len();
        branches.push(mapping::branch_def_from_proto(b));
    }
    if total > limits.max_tx_bytes {
        return Err(invalid(format!(
            "branches: at most {} bytes per transaction allowed, got {total}",
            limits.max_tx_bytes
        )));
    }
    let deadline = match req.deadline_ms {
        0 => None,
        ms => {
            let d = Duration::from_millis(ms);
            if d > config.max_deadline {
                return Err(invalid(format!(
                    "deadline_ms: at most {} allowed, got {ms}",
                    config.max_deadline.as_millis()
                )));
            }
            Some(d)
        }
    };
    // 0 is proto3's "unset": the coordinator's default.
    let set = |v: u64| (v != 0).then_some(v);
    let retry = match req.retry {
        None => RetryOverrides::default(),
        Some(r) => {
            let o = RetryOverrides {
                initial_backoff_ms: set(r.initial_backoff_ms),
                max_backoff_ms: set(r.max_backoff_ms),
                stuck_after_attempts: (r.stuck_after_attempts != 0)
                    .then_some(r.stuck_after_attempts),
            };
            // Checked as it will apply, over the defaults (which `Config::validate` vouches
            // for on their own).
            check_retry(&o.over(config))?;
            o
        }
    };
    let wait = match (req.wait, req.wait_timeout_ms) {
        (false, _) => Wait::No,
        (true, 0) => Wait::Default,
        (true, ms) => Wait::For(Duration::from_millis(ms)),
    };
    Ok(BeginRequest {
        gid: gid_value,
        mode,
        branches,
        deadline,
        retry,
        wait,
        trace_parent: None,
    })
}

/// The policy a transaction will run with must be usable: a cap at least the start, and at
/// most an hour (a longer sleep between phase-two attempts would look like a hang).
fn check_retry(p: &RetryPolicy) -> Result<(), Invalid> {
    if p.max_backoff_ms < p.initial_backoff_ms {
        return Err(invalid(format!(
            "retry.max_backoff_ms: must be at least initial_backoff_ms ({})",
            p.initial_backoff_ms
        )));
    }
    if p.max_backoff_ms > 3_600_000 {
        return Err(invalid(
            "retry.max_backoff_ms: at most 3600000 (1 hour) allowed",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn branch(endpoint: &str, handler: &str) -> pb::Branch {
        pb::Branch {
            endpoint: endpoint.into(),
            handler: handler.into(),
            payload: Bytes::new(),
            compensation_payload: Bytes::new(),
        }
    }

    fn request() -> pb::BeginRequest {
        pb::BeginRequest {
            gid: "order-1".into(),
            mode: pb::Mode::Saga as i32,
            branches: vec![branch("http://127.0.0.1:7801", "debit")],
            ..Default::default()
        }
    }

    fn err_of(f: impl FnOnce(&mut pb::BeginRequest)) -> String {
        let mut r = request();
        f(&mut r);
        begin(r, &Config::default())
            .expect_err("must be rejected")
            .0
    }

    #[test]
    fn https_endpoints_are_accepted_once_a_participant_ca_is_configured() {
        let mut r = request();
        r.branches[0].endpoint = "https://bank:7801".into();
        let mut config = Config::default();
        config.security.participant_ca = Some("/etc/treaty/participants-ca.pem".into());
        begin(r, &config).expect("https with a CA");
    }

    #[test]
    fn a_valid_request_keeps_unset_fields_unset() {
        let req = begin(request(), &Config::default()).unwrap();
        assert_eq!(req.gid.as_deref(), Some("order-1"));
        assert_eq!(req.mode, Mode::Saga);
        assert_eq!(req.deadline, None);
        assert_eq!(req.retry, RetryOverrides::default());
        assert_eq!(req.wait, Wait::No);
        let mut r = request();
        r.gid.clear();
        r.wait = true;
        r.retry = Some(pb::RetryPolicy {
            initial_backoff_ms: 0,
            max_backoff_ms: 500,
            stuck_after_attempts: 0,
        });
        let req = begin(r, &Config::default()).unwrap();
        assert_eq!(req.gid, None, "the runtime assigns the gid");
        assert_eq!(req.wait, Wait::Default);
        assert_eq!(
            req.retry,
            RetryOverrides {
                max_backoff_ms: Some(500),
                ..RetryOverrides::default()
            }
        );
        let mut r = request();
        r.wait = true;
        r.wait_timeout_ms = 1234;
        r.deadline_ms = 99;
        let req = begin(r, &Config::default()).unwrap();
        assert_eq!(req.wait, Wait::For(Duration::from_millis(1234)));
        assert_eq!(req.deadline, Some(Duration::from_millis(99)));
    }

    #[test]
    fn every_bad_field_is_named() {
        let big = Bytes::from(vec![0u8; (1 << 20) + 1]);
        type Mutate = Box<dyn FnOnce(&mut pb::BeginRequest)>;
        let cases: Vec<(&str, Mutate)> = vec![
            ("gid: only", Box::new(|r| r.gid = "a b".into())),
            ("gid: at most 128", Box::new(|r| r.gid = "x".repeat(129))),
            ("mode:", Box::new(|r| r.mode = 0)),
            ("mode:", Box::new(|r| r.mode = 99)),
            ("branches: at least one", Box::new(|r| r.branches.clear())),
            (
                "branches: at most 64",
                Box::new(|r| r.branches = vec![branch("http://a:1", "h"); 65]),
            ),
            (
                "branches[0].endpoint: must be an http",
                Box::new(|r| r.branches[0].endpoint = "ftp://x".into()),
            ),
            (
                "branches[0].endpoint: https:// endpoints need treatyd started with \
                 --participant-ca",
                Box::new(|r| r.branches[0].endpoint = "https://bank:7801".into()),
            ),
            (
                "branches[0].endpoint: not a valid URI",
                Box::new(|r| r.branches[0].endpoint = "http://exa mple".into()),
            ),
            (
                "branches[0].endpoint: not a valid URI",
                Box::new(|r| r.branches[0].endpoint = "".into()),
            ),
            (
                "branches[0].handler: must not be empty",
                Box::new(|r| r.branches[0].handler.clear()),
            ),
            (
                "branches[0].handler: at most 128",
                Box::new(|r| r.branches[0].handler = "h".repeat(129)),
            ),
            (
                "branches[0].payload: at most",
                Box::new(move |r| r.branches[0].payload = big),
            ),
            (
                "branches[0].compensation_payload: only saga",
                Box::new(|r| {
                    r.mode = pb::Mode::TwoPhase as i32;
                    r.branches[0].compensation_payload = Bytes::from_static(b"x");
                }),
            ),
            (
                "branches: at most 4194304 bytes",
                Box::new(|r| {
                    let p = Bytes::from(vec![0u8; 1 << 20]);
                    r.branches = (0..5)
                        .map(|_| pb::Branch {
                            payload: p.clone(),
                            ..branch("http://a:1", "h")
                        })
                        .collect();
                }),
            ),
            (
                "deadline_ms: at most",
                Box::new(|r| r.deadline_ms = u64::MAX),
            ),
            (
                "retry.max_backoff_ms: must be at least",
                Box::new(|r| {
                    r.retry = Some(pb::RetryPolicy {
                        initial_backoff_ms: 500,
                        max_backoff_ms: 10,
                        stuck_after_attempts: 0,
                    })
                }),
            ),
            (
                // Checked against the default start it will run with.
                "retry.max_backoff_ms: must be at least initial_backoff_ms (100)",
                Box::new(|r| {
                    r.retry = Some(pb::RetryPolicy {
                        initial_backoff_ms: 0,
                        max_backoff_ms: 10,
                        stuck_after_attempts: 0,
                    })
                }),
            ),
            (
                "retry.max_backoff_ms: at most 3600000",
                Box::new(|r| {
                    r.retry = Some(pb::RetryPolicy {
                        initial_backoff_ms: 0,
                        max_backoff_ms: 3_600_001,
                        stuck_after_attempts: 0,
                    })
                }),
            ),
        ];
        for (want, mutate) in cases {
            let got = err_of(mutate);
            assert!(got.starts_with(want), "want {want:?}, got {got:?}");
        }
    }
}
