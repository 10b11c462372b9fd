//! Per-caller admission control: one runaway client cannot starve the others.
//!
//! Beyond the global caps (`max_live_transactions`, `max_live_bytes`, answered by the
//! runtime), each caller gets a token bucket of `Begin`s: `--max-begins-per-caller-per-sec`
//! tokens a second, as many at once (a burst of one second's worth). A `Begin` without a
//! token is answered RESOURCE_EXHAUSTED before anything is validated or logged, so it costs
//! the coordinator almost nothing. 0 turns it off.
//!
//! The caller is a [`CallerId`]: the identity an authentication layer put in the request's
//! extensions if any, else the remote IP address. Memory is bounded: at most
//! [`CALLERS_MAX`] buckets; a full bucket is the same as none, so idle callers are dropped
//! first, then the longest idle ones.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use tokio::time::Instant;
use tonic::{Request, Status};

/// Buckets kept at most (a few dozen bytes each).
pub const CALLERS_MAX: usize = 100_000;

/// Who is calling, for per-caller limits. An authentication layer (tokens, mTLS) inserts
/// one into the request's extensions; without one, the remote IP address is the caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CallerId(String);

impl CallerId {
    /// A caller named by an authentication layer (a token's subject, a certificate's name).
    pub fn named(name: impl Into<String>) -> CallerId {
        CallerId(name.into())
    }

    /// The caller of an unauthenticated connection from `ip`.
    pub fn ip(ip: IpAddr) -> CallerId {
        CallerId(format!("ip:{ip}"))
    }

    /// The caller of `req`: the identity in its extensions, else its remote IP, else one
    /// shared "unknown" caller (a transport that gives no address).
    pub fn of<T>(req: &Request<T>) -> CallerId {
        if let Some(id) = req.extensions().get::<CallerId>() {
            return id.clone();
        }
        match req.remote_addr() {
            Some(addr) => CallerId::ip(addr.ip()),
            None => CallerId("unknown".into()),
        }
    }
}

impl std::fmt::Display for CallerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One caller's bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets of `Begin`s, one per caller: see the module docs.
#[derive(Debug)]
pub struct BeginLimiter {
    per_sec: u32,
    callers_max: usize,
    buckets: Mutex<HashMap<CallerId, Bucket>>,
}

impl BeginLimiter {
    /// `per_sec` `Begin`s a second per caller, as many at once; 0: no limit.
    pub fn new(per_sec: u32) -> BeginLimiter {
        BeginLimiter::with_callers_max(per_sec, CALLERS_MAX)
    }

    fn with_callers_max(per_sec: u32, callers_max: usize) -> BeginLimiter {
        assert!(callers_max > 0, "at least one bucket");
        BeginLimiter {
            per_sec,
            callers_max,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `caller` at `now`; RESOURCE_EXHAUSTED naming the limit when none is
    /// left.
    pub fn admit(&self, caller: &CallerId, now: Instant) -> Result<(), Status> {
        if self.per_sec == 0 {
            return Ok(());
        }
        let rate = f64::from(self.per_sec);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let refill =
            |b: &Bucket| (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(rate);
        if !buckets.contains_key(caller) && buckets.len() >= self.callers_max {
            // Full buckets are the same as none.
            buckets.retain(|_, b| refill(b) < rate);
            if buckets.len() >= self.callers_max {
                let idlest = buckets
                    .iter()
                    .min_by_key(|(_, b)| b.at)
                    .map(|(c, _)| c.clone());
                if let Some(c) = idlest {
                    buckets.remove(&c);
                }
            }
        }
        let b = buckets.entry(caller.clone()).or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        b.tokens = refill(b);
        b.at = now;
        if b.tokens < 1.0 {
            return Err(Status::resource_exhausted(format!(
                "caller {caller} is over its limit of {} Begin calls a second \
                 (--max-begins-per-caller-per-sec); retry with backoff",
                self.per_sec
            )));
        }
        b.tokens -= 1.0;
        Ok(())
    }

    /// Buckets held now (for tests).
    pub fn callers(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tonic::Code;

    fn ip(last: u8) -> CallerId {
        CallerId::ip(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn a_caller_over_its_rate_is_refused_while_others_still_begin() {
        let l = BeginLimiter::new(2);
        let t0 = Instant::now();
        assert!(l.admit(&ip(1), t0).is_ok());
        assert!(l.admit(&ip(1), t0).is_ok());
        let e = l.admit(&ip(1), t0).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.message().contains("ip:10.0.0.1"), "{e:?}");
        assert!(l.admit(&ip(2), t0).is_ok(), "another caller is not starved");
        // Half a second later one token is back, not more.
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.admit(&ip(1), t1).is_ok());
        assert!(l.admit(&ip(1), t1).is_err());
    }

    #[test]
    fn zero_is_no_limit() {
        let l = BeginLimiter::new(0);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(l.admit(&ip(1), t0).is_ok());
        }
        assert_eq!(l.callers(), 0);
    }

    #[test]
    fn memory_is_bounded_idle_callers_go_first() {
        let l = BeginLimiter::with_callers_max(1, 3);
        let t0 = Instant::now();
        for i in 0..3 {
            l.admit(&ip(i), t0).unwrap();
        }
        assert!(l.admit(&ip(0), t0).is_err(), "caller 0 used its token");
        // A new caller at the cap: the idlest bucket goes (all are empty at t0).
        l.admit(&ip(9), t0).unwrap();
        assert_eq!(l.callers(), 3);
        // A second later every old bucket is full again, so all of them can go.
        l.admit(&ip(10), t0 + Duration::from_secs(1)).unwrap();
        assert!(l.callers() <= 3, "{}", l.callers());
    }

    #[test]
    fn an_authenticated_identity_wins_over_the_address() {
        let mut req = Request::new(());
        assert_eq!(CallerId::of(&req), CallerId("unknown".into()));
        req.extensions_mut().insert(CallerId::named("token:alice"));
        assert_eq!(CallerId::of(&req), CallerId::named("token:alice"));
    }
}
