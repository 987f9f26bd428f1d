//! The rate limiter mechanisms (what to limit is decided in [`crate::policy::admit`]):
//!
//! - [`rate`]: request rate limits kept in this process (`scope: local`), GCRA, one or more
//!   windows.
//! - [`cluster`]: limits shared by every gateway replica through Redis (`scope: cluster`),
//!   decided locally on leased tokens.
//!
//! [`Limits`] holds the limiter state built from one config; a reload keeps the state of
//! every limiter whose settings did not change.

pub mod cluster;
pub mod rate;

use std::sync::Arc;

use crate::config::{GatewayConfig, RateSpec, Route, Scope};
use cluster::{Cluster, ClusterLimiter};
use rate::{Decision, Gcra, KeyedLimiter, SharedLimiter};

/// One configured limit, whatever its kind.
#[derive(Clone)]
pub enum Limiter {
    /// The global ceiling of this process.
    Shared(Arc<SharedLimiter>),
    /// Per key (client IP), in this process.
    Keyed(Arc<KeyedLimiter>),
    /// Either, across the cluster.
    Cluster(Arc<ClusterLimiter>),
}

impl Limiter {
    /// Decide one request of `key` (ignored by a global limit).
    #[inline]
    pub fn check(&self, key: u64) -> Decision {
        match self {
            Limiter::Shared(l) => l.check(),
            Limiter::Keyed(l) => l.check(key),
            Limiter::Cluster(l) => l.check(key),
        }
    }

    /// Whether two limiters are one (the same state).
    pub fn same_state(&self, other: &Limiter) -> bool {
        match (self, other) {
            (Limiter::Shared(a), Limiter::Shared(b)) => Arc::ptr_eq(a, b),
            (Limiter::Keyed(a), Limiter::Keyed(b)) => Arc::ptr_eq(a, b),
            (Limiter::Cluster(a), Limiter::Cluster(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// The window `window` of the limit (for the `RateLimit` headers of a refusal).
    pub fn gcra(&self, window: usize) -> &Gcra {
        let gcras = match self {
            Limiter::Shared(l) => &l.gcras,
            Limiter::Keyed(l) => &l.gcras,
            Limiter::Cluster(l) => &l.gcras,
        };
        &gcras[window.min(gcras.len() - 1)]
    }
}

/// The rate limiters of one config.
pub struct Limits {
    pub global: Option<Limiter>,
    pub per_ip: Option<Limiter>,
    /// Longest prefix first; `None`: no per-IP limit under that prefix.
    pub routes: Vec<(String, Option<Limiter>)>,
    /// By route index (`routes:`), the route's name and its own per-IP `limit`.
    pub by_route: Vec<Option<(String, Limiter)>>,
    /// The process's cluster state, when `cluster:` is configured (kept across reloads).
    pub cluster: Option<Arc<Cluster>>,
}

impl Limits {
    /// Build the limiters for `cfg`, reusing those of `previous` whose settings are unchanged
    /// (so a reload does not hand every client a fresh burst).
    pub fn build(cfg: &GatewayConfig, previous: Option<&Limits>) -> Limits {
        // `cluster:` is restart-only: the process keeps the state (and sync task) it started
        // with.
        let cluster = previous
            .and_then(|p| p.cluster.clone())
            .or_else(|| cfg.cluster.clone().map(Cluster::new));
        let make =
            |name: &str, spec: &Option<RateSpec>, keyed: bool, old: Option<&Limiter>| {
                let spec = spec.as_ref()?;
                let slots = cfg.table_slots;
                Some(match (spec.scope, old, &cluster) {
                    (Scope::Cluster, Some(Limiter::Cluster(o)), Some(c))
                        if o.same(name, spec, slots, c) =>
                    {
                        Limiter::Cluster(o.clone())
                    }
                    (Scope::Cluster, _, Some(c)) => Limiter::Cluster(Arc::new(
                        ClusterLimiter::new(name, spec.clone(), keyed, slots, c.clone()),
                    )),
                    (_, Some(Limiter::Keyed(o)), _)
                        if keyed && &o.spec == spec && o.slots() == slots =>
                    {
                        Limiter::Keyed(o.clone())
                    }
                    (_, Some(Limiter::Shared(o)), _) if !keyed && &o.spec == spec => {
                        Limiter::Shared(o.clone())
                    }
                    _ if keyed => Limiter::Keyed(Arc::new(KeyedLimiter::new(spec.clone(), slots))),
                    _ => Limiter::Shared(Arc::new(SharedLimiter::new(spec.clone()))),
                })
            };
        let global = make(
            "global",
            &cfg.global_limit,
            false,
            previous.and_then(|p| p.global.as_ref()),
        );
        let per_ip = make(
            "per_ip",
            &cfg.per_ip_limit,
            true,
            previous.and_then(|p| p.per_ip.as_ref()),
        );
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
                (
                    prefix.clone(),
                    make(&format!("prefix:{prefix}"), spec, true, old),
                )
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
                make(&format!("route:{}", r.name), &r.limit, true, old).map(|l| (r.name.clone(), l))
            })
            .collect();
        Limits {
            global,
            per_ip,
            routes,
            by_route,
            cluster,
        }
    }

    /// A route's own per-IP limiter (`routes[i].limit`), if it has one.
    pub fn for_route(&self, route: &Route) -> Option<&Limiter> {
        self.by_route.get(route.index)?.as_ref().map(|(_, l)| l)
    }

    /// The per-IP limiter for a path: the longest matching route prefix, else the default.
    pub fn per_ip_for(&self, path: &str) -> Option<&Limiter> {
        for (prefix, limiter) in &self.routes {
            if path.starts_with(prefix.as_str()) {
                return limiter.as_ref();
            }
        }
        self.per_ip.as_ref()
    }

    /// Every `scope: cluster` limiter (the sync task serves them).
    pub fn cluster_limiters(&self) -> Vec<Arc<ClusterLimiter>> {
        let routes = self.routes.iter().filter_map(|(_, l)| l.as_ref());
        let by_route = self.by_route.iter().flatten().map(|(_, l)| l);
        self.global
            .iter()
            .chain(self.per_ip.iter())
            .chain(routes)
            .chain(by_route)
            .filter_map(|l| match l {
                Limiter::Cluster(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
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
        assert!(kept
            .for_route(route)
            .unwrap()
            .same_state(old.for_route(&a.routes.routes[0]).unwrap()));
        assert!(kept.for_route(&moved.routes.routes[0]).is_none());
        let changed = cfg("  - {name: llm, path: /llm, pool: default, limit: {rate: 2r/s}}\n");
        let fresh = Limits::build(&changed, Some(&kept));
        assert!(!fresh
            .for_route(&changed.routes.routes[0])
            .unwrap()
            .same_state(kept.for_route(route).unwrap()));
    }
}
