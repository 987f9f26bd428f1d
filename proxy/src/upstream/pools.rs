//! Every pool: `default` (`upstream:`) and the named ones (`upstreams:`), which a reload
//! creates, updates and removes (a removed pool's requests in flight finish on the
//! connections they have). Their health checks run in one loop, each pass checking every
//! pool's backends concurrently, at `upstream.health_check.interval`.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::task::JoinSet;

use super::Upstreams;
use crate::config::GatewayConfig;
use crate::metrics::Metrics;

pub struct Pools {
    pub default: Arc<Upstreams>,
    named: ArcSwap<HashMap<String, Arc<Upstreams>>>,
    metrics: Arc<Metrics>,
}

impl Pools {
    pub fn new(default: Arc<Upstreams>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Pools {
            default,
            named: ArcSwap::from_pointee(HashMap::new()),
            metrics,
        })
    }

    /// The pool a route names.
    pub fn get(&self, name: &str) -> Option<Arc<Upstreams>> {
        if name == "default" {
            return Some(self.default.clone());
        }
        self.named.load().get(name).cloned()
    }

    fn all(&self) -> Vec<Arc<Upstreams>> {
        let mut all = vec![self.default.clone()];
        all.extend(self.named.load().values().cloned());
        all
    }

    /// Create and update the named pools of `cfg` (the default pool is the caller's): an
    /// unchanged pool keeps its state. Pools `cfg` no longer has stay until [`Pools::retain`],
    /// called once the config naming them is out of force, so no request finds its pool gone.
    pub async fn apply(&self, cfg: &GatewayConfig) -> Result<(), String> {
        let current = self.named.load_full();
        let mut next: HashMap<String, Arc<Upstreams>> = (*current).clone();
        for spec in &cfg.pools {
            let pool = match current.get(&spec.name) {
                Some(p) => p.clone(),
                None => Upstreams::new(
                    &spec.name,
                    &spec.health,
                    self.default.keepalive_pool,
                    self.metrics.clone(),
                ),
            };
            pool.set_backends(
                &spec.backends,
                &spec.settings.queue,
                cfg.hosts_file.as_deref(),
            )
            .await
            .map_err(|e| format!("upstreams.{}: {e}", spec.name))?;
            pool.set_health(&spec.health);
            pool.set_tls(spec.settings.tls.as_ref());
            next.insert(spec.name.clone(), pool);
        }
        self.named.store(Arc::new(next));
        Ok(())
    }

    /// Drop the named pools `cfg` does not have (their requests in flight finish).
    pub fn retain(&self, cfg: &GatewayConfig) {
        let mut next = (*self.named.load_full()).clone();
        next.retain(|name, _| cfg.pools.iter().any(|p| &p.name == name));
        self.named.store(Arc::new(next));
    }

    /// One health pass over every pool, before accepting.
    pub async fn check_once(&self) {
        let mut set = JoinSet::new();
        for p in self.all() {
            set.spawn(async move { p.check_once().await });
        }
        while set.join_next().await.is_some() {}
    }

    /// The gateway's own readiness: at least one backend up in every pool.
    pub fn ready(&self) -> bool {
        self.all().iter().all(|p| p.any_up())
    }

    pub fn refresh_gauges(&self) {
        for p in self.all() {
            p.refresh_gauges();
        }
    }

    /// Health-check every pool's backends, every interval; forever.
    pub async fn health_loop(&self) {
        loop {
            let mut set = JoinSet::new();
            for p in self.all() {
                set.spawn(async move { p.check_pass().await });
            }
            while set.join_next().await.is_some() {}
            tokio::time::sleep(self.default.interval()).await;
        }
    }
}
