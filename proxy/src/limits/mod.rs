//! The rate limiter mechanisms (what to limit is decided in [`crate::policy::admit`]):
//!
//! - [`rate`]: request rate limits (per client IP, per path prefix, global), GCRA.
//!
//! [`Limits`] holds the limiter state built from one config; a reload keeps the state of
//! every limiter whose settings did not change.

pub mod rate;

use std::sync::Arc;

use crate::config::{GatewayConfig, RateSpec};
use rate::{KeyedLimiter, SharedLimiter};

/// The rate limiters of one config.
pub struct Limits {
    pub global: Option<Arc<SharedLimiter>>,
    pub per_ip: Option<Arc<KeyedLimiter>>,
    /// Longest prefix first; `None`: no per-IP limit under that prefix.
    pub routes: Vec<(String, Option<Arc<KeyedLimiter>>)>,
}

impl Limits {
    /// Build the limiters for `cfg`, reusing those of `previous` whose settings are unchanged
    /// (so a reload does not hand every client a fresh burst).
    pub fn build(cfg: &GatewayConfig, previous: Option<&Limits>) -> Limits {
        let keyed = |spec: &Option<RateSpec>, old: Option<&Arc<KeyedLimiter>>| {
            spec.map(|s| match old {
                Some(o) if o.gcra.spec == s && o.memory_bytes() == cfg.table_slots * 8 => o.clone(),
                _ => Arc::new(KeyedLimiter::new(s, cfg.table_slots)),
            })
        };
        let global = cfg
            .global_limit
            .map(|s| match previous.and_then(|p| p.global.as_ref()) {
                Some(o) if o.gcra.spec == s => o.clone(),
                _ => Arc::new(SharedLimiter::new(s)),
            });
        let per_ip = keyed(&cfg.per_ip_limit, previous.and_then(|p| p.per_ip.as_ref()));
        let routes = cfg
            .route_limits
            .iter()
            .map(|(prefix, spec)| {
                let old = previous.and_then(|p| {
                    p.routes
                        .iter()
                        .find(|(op, _)| op == prefix)
                        .and_then(|(_, l)| l.as_ref())
                });
                (prefix.clone(), keyed(spec, old))
            })
            .collect();
        Limits {
            global,
            per_ip,
            routes,
        }
    }

    /// The per-IP limiter for a path: the longest matching route prefix, else the default.
    pub fn per_ip_for(&self, path: &str) -> Option<&Arc<KeyedLimiter>> {
        for (prefix, limiter) in &self.routes {
            if path.starts_with(prefix.as_str()) {
                return limiter.as_ref();
            }
        }
        self.per_ip.as_ref()
    }
}
