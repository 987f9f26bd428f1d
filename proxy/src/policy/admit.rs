//! Whether a request is let in: its size against the caps, then the rate limits.

use std::net::IpAddr;
use std::time::Duration;

use super::identity::limit_key;
use super::path;
use super::Rejection;
use crate::config::Route;
use crate::limits::rate::{Decision, Gcra};
use crate::limits::Limiter;
use crate::state::Snapshot;

/// The measure of `buffers.max_header_bytes`: the request line and every header line, from
/// their lengths (method, target, then name and value per header).
pub fn head_size(
    method: usize,
    target: usize,
    headers: impl Iterator<Item = (usize, usize)>,
) -> usize {
    method + target + 12 + headers.map(|(name, value)| name + value + 4).sum::<usize>()
}

/// The head caps (`buffers.max_headers`, `buffers.max_header_bytes`): 431 over either.
pub fn check_head(snap: &Snapshot, headers: usize, head_bytes: usize) -> Result<(), Rejection> {
    let cfg = &snap.config;
    if headers > cfg.max_headers || head_bytes > cfg.max_header_bytes {
        return Err(Rejection::HeaderTooLarge);
    }
    Ok(())
}

/// A declared `Content-Length` over the route's body cap (`max_body_bytes`, by default
/// `buffers.max_body_bytes`): 413 before any of it is read.
pub fn check_declared_body(route: &Route, length: u64) -> Result<(), Rejection> {
    if length > route.max_body_bytes as u64 {
        return Err(Rejection::BodyTooLarge);
    }
    Ok(())
}

/// A request refused by a rate limit: why, when to retry, and the `RateLimit` headers.
#[derive(Debug)]
pub struct Refusal {
    pub reason: Rejection,
    pub retry_after: u64,
    pub headers: [(&'static str, String); 2],
}

/// `RateLimit-Policy` and `RateLimit` (IETF draft) for a rejection.
fn rate_headers(gcra: &Gcra, retry_after: u64) -> [(&'static str, String); 2] {
    [
        ("RateLimit-Policy", gcra.policy_header()),
        (
            "RateLimit",
            format!(
                "limit={}, remaining=0, reset={retry_after}",
                gcra.capacity()
            ),
        ),
    ]
}

/// Whole seconds, rounded up, at least 1 (the `Retry-After` of a rejection).
pub fn ceil_secs(d: Duration) -> u64 {
    (d.as_micros().div_ceil(1_000_000) as u64).max(1)
}

/// The rate limits: the client's own first (an abuser is refused without using the shared
/// budget), then the global ceiling (this instance's, or the cluster's with `scope: cluster`).
/// The client's own limit is its route's `limit`, else the longest `limits.routes` prefix of
/// the normalised path ([`path::normalize`]), else `limits.per_ip`. Every window of a limit
/// must admit the request. Ok: how long to hold the request first (`delay` limits).
pub fn admit(
    snap: &Snapshot,
    client_ip: Option<IpAddr>,
    route: &Route,
    target: &str,
) -> Result<Duration, Refusal> {
    let cfg = &snap.config;
    let refused = |reason, limiter: &Limiter, retry_after, window| {
        let secs = ceil_secs(retry_after);
        Refusal {
            reason,
            retry_after: secs,
            headers: rate_headers(limiter.gcra(window), secs),
        }
    };
    let mut wait = Duration::ZERO;
    let exempt = client_ip.is_some_and(|ip| cfg.exempt.iter().any(|n| n.contains(ip)));
    if let (Some(ip), false) = (client_ip, exempt) {
        let limiter = match snap.limits.for_route(route) {
            Some(l) => Some(l),
            // The path is normalised only for `limits.routes` prefixes, when there are any.
            None if snap.limits.routes.is_empty() => snap.limits.per_ip.as_ref(),
            None => snap.limits.per_ip_for(&path::normalize(target)),
        };
        if let Some(limiter) = limiter {
            match limiter.check(limit_key(ip, cfg.ipv6_prefix)) {
                Decision::Allow { wait: w, .. } => wait = wait.max(w),
                Decision::Reject {
                    retry_after,
                    window,
                } => {
                    return Err(refused(
                        Rejection::RateLimitIp,
                        limiter,
                        retry_after,
                        window,
                    ));
                }
            }
        }
    }
    if let Some(global) = &snap.limits.global {
        match global.check(0) {
            Decision::Allow { wait: w, .. } => wait = wait.max(w),
            Decision::Reject {
                retry_after,
                window,
            } => {
                return Err(refused(
                    Rejection::RateLimitGlobal,
                    global,
                    retry_after,
                    window,
                ));
            }
        }
    }
    Ok(wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;

    fn snapshot(yaml: &str) -> Snapshot {
        Snapshot::new(GatewayConfig::parse(yaml).expect("valid config"), None)
    }

    fn d(snap: &Snapshot) -> &Route {
        &snap.config.routes.default
    }

    const BASE: &str = "upstream:\n  backends: [\"127.0.0.1:9\"]\n";

    #[test]
    fn per_ip_then_global_with_retry_after_and_headers() {
        let snap = snapshot(&format!(
            "{BASE}limits:\n  per_ip: {{rate: 1r/m, burst: 0}}\n  global: {{rate: 1r/m, burst: 1}}\n"
        ));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(admit(&snap, Some(a), d(&snap), "/").is_ok());
        let r = admit(&snap, Some(a), d(&snap), "/").unwrap_err();
        assert_eq!(r.reason, Rejection::RateLimitIp);
        assert!(r.retry_after >= 1);
        assert_eq!(r.headers[0].0, "RateLimit-Policy");
        // Refused per IP without spending the global budget: b still gets through.
        assert!(admit(&snap, Some(b), d(&snap), "/").is_ok());
        let r = admit(&snap, Some("192.0.2.3".parse().unwrap()), d(&snap), "/").unwrap_err();
        assert_eq!(r.reason, Rejection::RateLimitGlobal);
    }

    /// Issue 20, case 5: a route's limit holds for every spelling of its path.
    #[test]
    fn route_limits_match_the_normalised_path() {
        let snap = snapshot(&format!(
            "{BASE}limits:\n  routes:\n    - {{prefix: /llm, per_ip: {{rate: 1r/m, burst: 0}}}}\n"
        ));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(admit(&snap, Some(a), d(&snap), "/llm").is_ok());
        for spelling in ["/llm", "/%6clm", "//llm", "/x/../llm?q=1", "/./llm/"] {
            let r = admit(&snap, Some(a), d(&snap), spelling).unwrap_err();
            assert_eq!(r.reason, Rejection::RateLimitIp, "{spelling}");
        }
        // Case-sensitive, as nginx's `location`.
        assert!(admit(&snap, Some(a), d(&snap), "/LLM").is_ok());
    }

    #[test]
    fn exempt_clients_skip_per_ip_limits() {
        let snap = snapshot(&format!(
            "{BASE}limits:\n  per_ip: {{rate: 1r/m, burst: 0}}\n  exempt: [\"192.0.2.0/24\"]\n"
        ));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            assert!(admit(&snap, Some(a), d(&snap), "/").is_ok());
        }
    }

    #[test]
    fn head_and_body_caps() {
        let snap = snapshot(&format!(
            "{BASE}buffers:\n  max_headers: 3\n  max_header_bytes: 100\n  max_body_bytes: 10\n"
        ));
        assert!(check_head(&snap, 3, 100).is_ok());
        assert_eq!(check_head(&snap, 4, 10), Err(Rejection::HeaderTooLarge));
        assert_eq!(check_head(&snap, 1, 101), Err(Rejection::HeaderTooLarge));
        assert!(check_declared_body(d(&snap), 10).is_ok());
        assert_eq!(
            check_declared_body(d(&snap), 11),
            Err(Rejection::BodyTooLarge)
        );
        assert_eq!(head_size(3, 1, [(4, 9)].into_iter()), 3 + 1 + 12 + 17);
    }
}
