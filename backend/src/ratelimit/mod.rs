//! Per-user and per-endpoint rate limits, shared by every instance through Redis.
//!
//! Semantics: a sliding-window log. A limit "N per W" admits a request only if fewer than N
//! requests were admitted in the W before it, so no window of length W ever holds more than
//! N admitted requests (no double burst at window edges). A request under several limits
//! (its tier and its endpoint) is admitted only if it passes all of them, and counts against
//! all of them, in one atomic step.
//!
//! - [`redis`]: the shared store: one Lua script, one round trip, Redis server time.
//! - [`local`]: the same semantics in process, used when `REDIS_URL` is unset and, per
//!   instance, while Redis is unreachable (the `backend_ratelimit_degraded` gauge says so).

pub mod local;
pub mod redis;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// "N per W": `10/min`, `100/1m`, `5/10s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u32,
    pub window: Duration,
}

impl FromStr for Quota {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, w) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("invalid limit {s:?}: write it like 10/min or 60/10s"))?;
        let limit: u32 =
            n.trim().parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                format!("invalid limit {s:?}: the count must be a positive integer")
            })?;
        let window = match w.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "min" | "minute" | "m" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other)
                .map_err(|e| format!("invalid limit {s:?}: window {other:?}: {e}"))?,
        };
        if window.is_zero() {
            return Err(format!("invalid limit {s:?}: the window must be positive"));
        }
        Ok(Quota { limit, window })
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {}s", self.limit, self.window.as_secs_f64())
    }
}

/// One limit a request is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The store key, e.g. `rl:user:42:tier` or `rl:user:42:ep:llm`.
    pub key: String,
    pub quota: Quota,
    /// How the 429 names it: `free tier` or `endpoint /llm`.
    pub name: String,
}

/// The state of one limit after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub quota: Quota,
    /// Requests still admissible in the current window (after this one, when admitted).
    pub remaining: u32,
    /// Until the oldest admitted request leaves the window (0 when none is in it).
    pub reset: Duration,
}

/// The outcome for a request and every limit it was checked against, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub admitted: bool,
    pub usage: Vec<Usage>,
}

impl Outcome {
    /// The limit to report in headers: the first one that refused, else the tightest.
    pub fn reported(&self) -> Option<(usize, &Usage)> {
        if !self.admitted {
            return self
                .usage
                .iter()
                .enumerate()
                .find(|(_, u)| u.remaining == 0);
        }
        self.usage
            .iter()
            .enumerate()
            .min_by_key(|(_, u)| u.remaining)
    }
}

/// Which limits apply to whom, from `TIER_LIMITS`, `ENDPOINT_LIMITS`, `ANON_LIMIT`.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub tiers: Vec<(String, Quota)>,
    pub endpoints: Vec<(String, Quota)>,
    pub anonymous: Option<Quota>,
}

fn parse_pairs(what: &str, text: &str) -> Result<Vec<(String, Quota)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, quota) = pair
                .split_once('=')
                .ok_or_else(|| format!("{what}: {pair:?} is not name=N/window"))?;
            let quota = quota.parse().map_err(|e| format!("{what}: {e}"))?;
            Ok((name.trim().to_string(), quota))
        })
        .collect()
}

impl Policy {
    pub fn parse(tiers: &str, endpoints: &str, anonymous: Option<&str>) -> Result<Self, String> {
        let tiers = parse_pairs("TIER_LIMITS", tiers)?;
        for t in ["free", "pro", "enterprise"] {
            if !tiers.iter().any(|(n, _)| n == t) {
                return Err(format!("TIER_LIMITS: no limit for tier {t}"));
            }
        }
        let endpoints = parse_pairs("ENDPOINT_LIMITS", endpoints)?;
        let routes = [
            "list_items",
            "create_item",
            "get_item",
            "delete_item",
            "llm",
        ];
        if let Some((bad, _)) = endpoints
            .iter()
            .find(|(n, _)| !routes.contains(&n.as_str()))
        {
            return Err(format!(
                "ENDPOINT_LIMITS: unknown route {bad:?} (routes: {})",
                routes.join(", ")
            ));
        }
        let anonymous = anonymous
            .filter(|a| !a.trim().is_empty())
            .map(|a| a.parse().map_err(|e| format!("ANON_LIMIT: {e}")))
            .transpose()?;
        Ok(Policy {
            tiers,
            endpoints,
            anonymous,
        })
    }

    /// The limits a user's request to `route` must pass: its tier, then the endpoint's.
    pub fn checks_for_user(&self, user_id: i64, tier: &str, route: &str) -> Vec<Check> {
        let mut checks = Vec::with_capacity(2);
        if let Some((_, q)) = self.tiers.iter().find(|(t, _)| t == tier) {
            checks.push(Check {
                key: format!("rl:u:{user_id}:tier"),
                quota: *q,
                name: format!("tier:{tier}"),
            });
        }
        if let Some((_, q)) = self.endpoints.iter().find(|(r, _)| r == route) {
            checks.push(Check {
                key: format!("rl:u:{user_id}:ep:{route}"),
                quota: *q,
                name: format!("endpoint:{route}"),
            });
        }
        checks
    }
}

/// Response headers for a limited request: IETF draft `RateLimit-Policy` / `RateLimit` and the
/// seed's `X-RateLimit-Limit` / `X-RateLimit-Window`, for the limit [`Outcome::reported`].
pub fn headers(outcome: &Outcome) -> Vec<(&'static str, String)> {
    let Some((_, u)) = outcome.reported() else {
        return Vec::new();
    };
    let window = u.quota.window.as_secs().max(1);
    let reset = u.reset.as_millis().div_ceil(1000);
    vec![
        ("RateLimit-Policy", format!("{};w={window}", u.quota.limit)),
        (
            "RateLimit",
            format!(
                "limit={}, remaining={}, reset={reset}",
                u.quota.limit, u.remaining
            ),
        ),
        ("X-RateLimit-Limit", u.quota.limit.to_string()),
        ("X-RateLimit-Window", format!("{window}s")),
    ]
}

/// Where limits are kept: Redis when configured (with the local store as fallback while
/// Redis is unreachable), otherwise in process.
pub struct Limiter {
    shared: Option<redis::RedisStore>,
    local: local::LocalStore,
    /// Set while Redis is unreachable; requests use the local store meanwhile.
    degraded: AtomicBool,
    /// When the next attempt at Redis may be made during an outage (ms since `epoch`).
    retry_at_ms: AtomicU64,
    epoch: Instant,
    metrics: Arc<crate::metrics::Metrics>,
}

/// After a Redis failure, requests skip Redis for this long before one tries again.
const REDIS_RETRY_AFTER: Duration = Duration::from_millis(500);

impl Limiter {
    pub fn new(shared: Option<redis::RedisStore>, metrics: Arc<crate::metrics::Metrics>) -> Self {
        Limiter {
            shared,
            local: local::LocalStore::default(),
            degraded: AtomicBool::new(false),
            retry_at_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
        }
    }

    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Check `checks` and count the request against all of them if it passes all of them.
    /// While Redis is unreachable, this instance's own log answers; one request (not every
    /// request in the moment after `retry_at`) tries Redis again each `REDIS_RETRY_AFTER`.
    pub async fn check(&self, checks: &[Check]) -> Outcome {
        if checks.is_empty() {
            return Outcome {
                admitted: true,
                usage: Vec::new(),
            };
        }
        if let Some(store) = &self.shared {
            let now_ms = self.epoch.elapsed().as_millis() as u64;
            if !self.is_degraded() || self.take_probe(now_ms) {
                match store.check_timed(checks).await {
                    Ok(outcome) => {
                        if self.degraded.swap(false, Ordering::AcqRel) {
                            log::info!("Redis reachable again: rate limits are shared again");
                            self.metrics.ratelimit_degraded.set(0);
                        }
                        return outcome;
                    }
                    Err(why) => {
                        self.metrics.ratelimit_redis_errors.inc();
                        self.retry_at_ms.store(
                            now_ms + REDIS_RETRY_AFTER.as_millis() as u64,
                            Ordering::Release,
                        );
                        if !self.degraded.swap(true, Ordering::AcqRel) {
                            log::warn!(
                                "Redis unreachable ({why}): limits fall back to this instance"
                            );
                            self.metrics.ratelimit_degraded.set(1);
                        }
                    }
                }
            }
        }
        self.local.check(checks, Instant::now())
    }

    /// While degraded: true for the one caller that moves `retry_at` on once it is due.
    fn take_probe(&self, now_ms: u64) -> bool {
        let due = self.retry_at_ms.load(Ordering::Acquire);
        now_ms >= due
            && self
                .retry_at_ms
                .compare_exchange(
                    due,
                    now_ms + REDIS_RETRY_AFTER.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// Check limits that are per instance by design (anonymous callers).
    pub fn check_local(&self, checks: &[Check]) -> Outcome {
        self.local.check(checks, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_parse() {
        assert_eq!(
            "10/min".parse::<Quota>().unwrap(),
            Quota {
                limit: 10,
                window: Duration::from_secs(60)
            }
        );
        assert_eq!(
            "60/10s".parse::<Quota>().unwrap().window,
            Duration::from_secs(10)
        );
        for bad in ["10", "0/min", "x/min", "10/fortnight", "10/0s"] {
            assert!(bad.parse::<Quota>().is_err(), "{bad}");
        }
    }
}
