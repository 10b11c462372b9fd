//! Validation of every request field against [`Limits`]. Each error names the field and
//! becomes `INVALID_ARGUMENT`; nothing a client sends can make the daemon panic.

use crate::config::{Config, Limits};
use crate::engine::{BranchDef, Mode, NewTx, RetryPolicy};
use crate::runtime::new_tx;
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

fn endpoint(field: &str, ep: &str, limits: &Limits) -> Result<(), Invalid> {
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
        // tonic dials an https URI in plaintext without a TLS feature, so every call would
        // fail and the transaction would hang in retries: refuse it up front.
        Some("https") => {
            return Err(invalid(format!(
                "{field}: https:// is not supported by this treatyd (it is built without TLS); use http://, got {ep:?}"
            )))
        }
        _ => {
            return Err(invalid(format!(
                "{field}: must be an http:// URI, got {ep:?}"
            )))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(format!("{field}: has no host: {ep:?}")));
    }
    Ok(())
}

/// Turn a `BeginRequest` into the engine's definition, applying defaults. Returns the
/// definition and the wait bound (`None` without `wait`).
pub fn begin(req: pb::BeginRequest, config: &Config) -> Result<(NewTx, Option<Duration>), Invalid> {
    let limits = &config.limits;
    let gid_value = if req.gid.is_empty() {
        uuid::Uuid::now_v7().to_string()
    } else {
        gid("gid", &req.gid, limits)?;
        req.gid.clone()
    };
    let mode = match pb::Mode::try_from(req.mode) {
        Ok(pb::Mode::TwoPhase) => Mode::TwoPhase,
        Ok(pb::Mode::Saga) => Mode::Saga,
        _ => {
            return Err(invalid(format!(
                "mode: must be MODE_TWO_PHASE or MODE_SAGA, got {}",
                req.mode
            )))
        }
    };
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
        endpoint(&format!("branches[{i}].endpoint"), &b.endpoint, limits)?;
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
        branches.push(BranchDef {
            endpoint: b.endpoint,
            handler: b.handler,
            payload: b.payload,
            compensation_payload: b.compensation_payload,
        });
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
    let retry = match req.retry {
        None => None,
        Some(r) => {
            let mut p = RetryPolicy {
                initial_backoff_ms: config.initial_backoff.as_millis() as u64,
                max_backoff_ms: config.max_backoff.as_millis() as u64,
                stuck_after_attempts: config.stuck_after_attempts,
            };
            if r.initial_backoff_ms != 0 {
                p.initial_backoff_ms = r.initial_backoff_ms;
            }
            if r.max_backoff_ms != 0 {
                p.max_backoff_ms = r.max_backoff_ms;
            }
            if r.stuck_after_attempts != 0 {
                p.stuck_after_attempts = r.stuck_after_attempts;
            }
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
            Some(p)
        }
    };
    let wait = req.wait.then(|| match req.wait_timeout_ms {
        0 => config.default_wait,
        ms => Duration::from_millis(ms).min(config.max_wait),
    });
    Ok((
        new_tx(config, gid_value, mode, branches, deadline, retry),
        wait,
    ))
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
    fn valid_request_gets_defaults() {
        let (tx, wait) = begin(request(), &Config::default()).unwrap();
        assert_eq!(tx.gid, "order-1");
        assert_eq!(tx.retry, RetryPolicy::default());
        assert_eq!(wait, None);
        let mut r = request();
        r.gid.clear();
        r.wait = true;
        let (tx, wait) = begin(r, &Config::default()).unwrap();
        assert_eq!(tx.gid.len(), 36, "a UUID is assigned");
        assert_eq!(wait, Some(Config::default().default_wait));
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
        ];
        for (want, mutate) in cases {
            let got = err_of(mutate);
            assert!(got.starts_with(want), "want {want:?}, got {got:?}");
        }
    }
}
