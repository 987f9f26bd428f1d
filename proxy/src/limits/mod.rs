//! The rate limiter mechanisms (what to limit is decided in [`crate::policy::admit`]):
//!
//! - [`rate`]: request rate limits (per client IP, per path prefix, global), GCRA.
//!
//! [`Limits`] holds the limiter state built from one config; a reload keeps the state of
//! every limiter whose settings did not change.

pub mod rate;

use std::sync::Arc;

use crate::config::{GatewayConfig, RateSpec, Route};
use rate::{KeyedLimiter, SharedLimiter};

/// The rate limiters of one config.
pub struct Limits {
    pub global: Option<Arc<SharedLimiter>>,
    pub per_ip: Option<Arc<KeyedLimiter>>,
    /// Longest prefix first; `None`: no per-IP limit under that prefix.
    pub routes: Vec<(String, Option<Arc<KeyedLimiter>>)>,
    /// By route index (`routes:`), the route's name and its own per-IP `limit`.
    pub by_route: Vec<Option<(String, Arc<KeyedLimiter>)>>,
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
        // A route's limiter is kept by its name (and settings), wherever it moved in the file.
        let by_route = cfg
            .routes
            .routes
            .iter()
            .map(|r| {
                let old = previous.and_then(|p| {
                    p.by_route
                        .iter()
                        .flatten()
                        .find(|(name, _)| *name == r.name)
                        .map(|(_, l)| l)
                });
                keyed(&r.limit, old).map(|l| (r.name.clone(), l))
            })
            .collect();
        Limits {
            global,
            per_ip,
            routes,
            by_route,
        }
    }

    /// A route's own per-IP limiter (`routes[i].limit`), if it has one.
    pub fn for_route(&self, route: &Route) -> Option<&Arc<KeyedLimiter>> {
        self.by_route.get(route.index)?.as_ref().map(|(_, l)| l)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(routes: &str) -> GatewayConfig {
        GatewayConfig::parse(&format!(
            "upstream:\n  backends: [\"127.0.0.1:9\"]\nroutes:\n{routes}"
        ))
        .unwrap()
    }

    /// A reload keeps a route's limiter (its clients' state) by the route's name, wherever the
    /// route moved in the file, and starts afresh when its limit changed.
    #[test]
    fn a_reload_keeps_route_limiters_by_name() {
        let a = cfg("  - {name: llm, path: /llm, pool: default, limit: {rate: 1r/s}}\n");
        let old = Limits::build(&a, None);
        let moved = cfg("  - {path: /x, pool: default}\n  - {name: llm, path: /llm2, pool: default, limit: {rate: 1r/s}}\n");
        let kept = Limits::build(&moved, Some(&old));
        let route = &moved.routes.routes[1];
        assert!(Arc::ptr_eq(
            kept.for_route(route).unwrap(),
            old.for_route(&a.routes.routes[0]).unwrap()
        ));
        assert!(kept.for_route(&moved.routes.routes[0]).is_none());
        let changed = cfg("  - {name: llm, path: /llm, pool: default, limit: {rate: 2r/s}}\n");
        let fresh = Limits::build(&changed, Some(&kept));
        assert!(!Arc::ptr_eq(
            fresh.for_route(&changed.routes.routes[0]).unwrap(),
            kept.for_route(route).unwrap()
        ));
    }
}
