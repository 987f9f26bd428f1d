//! The backend pool: weighted round robin (pingora-load-balancing), active HTTP health checks,
//! and a discovery source that start-up, reload and DNS re-resolution all update the same way.
//!
//! pingora starts every backend healthy; we do better: a backend gets traffic only after its
//! first health check passed, and its health is kept per address ([`backend`]), so a backend
//! that never answers its readiness probe never sees a request.

pub mod backend;
pub mod balance;
pub mod conn;
mod health;
pub mod pools;

pub use backend::{state_of, BackendState};
pub use health::HealthService;
pub use pools::Pools;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::selection::consistent::KetamaHashing;
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Extensions, LoadBalancer};
use pingora::protocols::l4::socket::SocketAddr as PSocketAddr;
use pingora::Result;

use crate::config::{BackendQueue, BackendSpec, Balance, Balancing, HealthSettings};
use crate::metrics::Metrics;
use health::{ReadinessCheck, SharedCheck};

/// The discovery source: the current backend set, replaced as a whole.
#[derive(Default)]
struct PoolDiscovery {
    current: ArcSwap<BTreeSet<Backend>>,
}

/// The handle pingora's `Backends` owns; we keep the other one to publish changes.
struct DiscoveryHandle(Arc<PoolDiscovery>);

#[async_trait]
impl ServiceDiscovery for DiscoveryHandle {
    async fn discover(&self) -> Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        Ok(((**self.0.current.load()).clone(), HashMap::new()))
    }
}

/// The pool of backends behind the gateway.
pub struct Upstreams {
    lb: LoadBalancer<RoundRobin>,
    /// The same backends on a ketama ring, for `balance: hash` (health is ours, on
    /// [`BackendState`], so this one runs no checks).
    ring: LoadBalancer<KetamaHashing>,
    discovery: Arc<PoolDiscovery>,
    check: Arc<ReadinessCheck>,
    metrics: Arc<Metrics>,
    /// Last addresses each backend name resolved to, kept when a later lookup fails.
    resolved: Mutex<HashMap<crate::config::HostPort, Vec<SocketAddr>>>,
    /// Idle connections kept per backend (`upstream.keepalive_pool`; restart-only, so it is
    /// fixed here at start for every engine).
    pub keepalive_pool: usize,
    /// `default`, or its name under `upstreams:` (the `pool` label of its backends' series).
    pub name: String,
}

/// The addresses a hosts-format file gives `name` (first match wins, like /etc/hosts).
fn hosts_lookup(hosts: &str, name: &str) -> Option<Vec<std::net::IpAddr>> {
    let ips: Vec<std::net::IpAddr> = hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let ip = parts.next()?.parse().ok()?;
            parts.any(|n| n.eq_ignore_ascii_case(name)).then_some(ip)
        })
        .collect();
    (!ips.is_empty()).then_some(ips)
}

impl Upstreams {
    pub fn new(
        name: &str,
        health: &HealthSettings,
        keepalive_pool: usize,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let discovery = Arc::new(PoolDiscovery::default());
        let backends = pingora::lb::Backends::new(Box::new(DiscoveryHandle(discovery.clone())));
        let mut lb = LoadBalancer::<RoundRobin>::from_backends(backends);
        let check = Arc::new(ReadinessCheck::new(health));
        lb.set_health_check(Box::new(SharedCheck(check.clone())));
        let ring = LoadBalancer::<KetamaHashing>::from_backends(pingora::lb::Backends::new(
            Box::new(DiscoveryHandle(discovery.clone())),
        ));
        Arc::new(Upstreams {
            lb,
            ring,
            discovery,
            check,
            metrics,
            resolved: Mutex::new(HashMap::new()),
            keepalive_pool,
            name: name.to_string(),
        })
    }

    /// Resolve `specs` and make them the pool. Addresses already in the pool keep their state
    /// (first-check flag, metric series, queue); removed ones get no new requests, and
    /// requests in flight to them finish on the connection they have.
    ///
    /// A name is looked up in `hosts_file` first, then DNS. When a name that has a `resolve`
    /// interval fails to resolve, its last known addresses are kept; a name without one must
    /// resolve (like nginx at start), or the whole change is refused.
    pub async fn set_backends(
        &self,
        specs: &[BackendSpec],
        queue: &BackendQueue,
        hosts_file: Option<&Path>,
    ) -> Result<(), String> {
        let hosts = match hosts_file {
            Some(p) => tokio::fs::read_to_string(p).await.unwrap_or_else(|e| {
                log::warn!("upstream.hosts_file {}: {e}; using DNS only", p.display());
                String::new()
            }),
            None => String::new(),
        };
        let mut resolved: Vec<(SocketAddr, usize, Option<&str>)> = Vec::new();
        for spec in specs {
            if let Some(sa) = spec.address.socket_addr() {
                resolved.push((sa, spec.weight, None));
                continue;
            }
            let looked_up = match hosts_lookup(&hosts, &spec.address.host) {
                Some(ips) => Ok(ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, spec.address.port))
                    .collect::<Vec<_>>()),
                None => tokio::net::lookup_host(spec.address.to_string())
                    .await
                    .map(|a| a.collect()),
            };
            let mut cache = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
            let addrs = match looked_up {
                Ok(addrs) if !addrs.is_empty() => {
                    self.metrics.dns_ok.inc();
                    cache.insert(spec.address.clone(), addrs.clone());
                    addrs
                }
                failed => {
                    self.metrics.dns_errors.inc();
                    let why = match failed {
                        Err(e) => e.to_string(),
                        Ok(_) => "no addresses".into(),
                    };
                    match (cache.get(&spec.address), spec.resolve) {
                        (Some(last), Some(_)) => {
                            log::warn!(
                                "cannot resolve backend {}: {why}; keeping {} last known address(es)",
                                spec.address,
                                last.len()
                            );
                            last.clone()
                        }
                        (None, Some(_)) => {
                            log::warn!(
                                "cannot resolve backend {}: {why}; none known yet",
                                spec.address
                            );
                            Vec::new()
                        }
                        (_, None) => {
                            return Err(format!(
                                "upstream.backends: cannot resolve {}: {why}",
                                spec.address
                            ))
                        }
                    }
                }
            };
            let host = Some(spec.address.host.as_str());
            resolved.extend(addrs.into_iter().map(|sa| (sa, spec.weight, host)));
        }
        resolved.sort();
        resolved.dedup_by_key(|(sa, _, _)| *sa);
        self.set_resolved(&resolved, queue.max_concurrent).await;
        Ok(())
    }

    /// The backend addresses in the pool now.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.discovery
            .current
            .load()
            .iter()
            .filter_map(|b| b.as_inet().copied())
            .collect()
    }

    async fn set_resolved(
        &self,
        resolved: &[(SocketAddr, usize, Option<&str>)],
        max_concurrent: usize,
    ) {
        let old = self.discovery.current.load_full();
        let existing: HashMap<SocketAddr, Arc<BackendState>> = old
            .iter()
            .filter_map(|b| Some((b.as_inet()?.to_owned(), state_of(b).clone())))
            .collect();
        let mut next = BTreeSet::new();
        for &(sa, weight, host) in resolved {
            let state = existing.get(&sa).cloned().unwrap_or_else(|| {
                let label = sa.to_string();
                let metrics = self.metrics.backend(&self.name, &label);
                Arc::new(BackendState::new(label, metrics, max_concurrent))
            });
            state.gate.resize(max_concurrent);
            state.set_host(host);
            let mut ext = Extensions::new();
            ext.insert(state);
            next.insert(Backend {
                addr: PSocketAddr::Inet(sa),
                weight,
                ext,
            });
        }
        for b in old.iter() {
            if !next.iter().any(|n| n.addr == b.addr) {
                self.metrics.forget_backend(&self.name, &state_of(b).label);
            }
        }
        self.discovery.current.store(Arc::new(next));
        // Our discovery never fails.
        let _ = self.lb.update().await;
        let _ = self.ring.update().await;
    }

    /// Swap in the pool's TLS (from its settings); the next health pass uses it (requests
    /// use their route's settings).
    pub fn set_tls(&self, tls: Option<&crate::tls::UpstreamTls>) {
        self.check.tls.store(tls.cloned().map(Arc::new));
    }

    /// Swap in new health-check settings; the next pass uses them.
    pub fn set_health(&self, health: &HealthSettings) {
        self.check
            .settings
            .store(Arc::new(ReadinessCheck::build(health)));
    }

    /// Pick the next backend (weighted round robin) that is up by our own health state
    /// (pingora's is ignored: see [`health`]) and is not in `tried`.
    /// `key`: what `balance: hash` hashes (the request's [`crate::policy::affinity`] key); a
    /// request without one is balanced round robin.
    pub fn select(
        &self,
        tried: &[SocketAddr],
        cfg: &Balancing,
        key: Option<&[u8]>,
    ) -> Option<Backend> {
        let usable = |b: &Backend| {
            let s = state_of(b);
            s.is_up() && !s.load.is_ejected() && !b.as_inet().is_some_and(|a| tried.contains(a))
        };
        match (cfg.algorithm, key) {
            (Balance::Hash, Some(key)) => return self.ring.select_with(key, 256, |b, _| usable(b)),
            (Balance::RoundRobin | Balance::Hash, _) => {
                return self.lb.select_with(b"", 256, |b, _| usable(b))
            }
            _ => {}
        }
        let pool = self.discovery.current.load();
        let candidates: Vec<&Backend> = pool.iter().filter(|b| usable(b)).collect();
        balance::choose(&candidates, cfg).cloned()
    }

    /// One exchange's outcome with a backend: its time to an answer head (None when there
    /// was no answer) and whether it was a success (not a 5xx, a connect failure or a
    /// timeout), for the latency estimates and the outlier ejection.
    pub fn observe(
        &self,
        state: &BackendState,
        rtt: Option<std::time::Duration>,
        ok: bool,
        cfg: &Balancing,
    ) {
        if let (Some(rtt), Balance::P2cEwma) = (rtt, cfg.algorithm) {
            state.load.observe_latency(rtt, cfg.ewma_decay);
        }
        if cfg.eject_after == 0 {
            return;
        }
        if ok {
            // A success only resets the count: no pool scan.
            state.load.observe_result(true, cfg, 0, 0);
            return;
        }
        let pool = self.discovery.current.load();
        let ejected = pool
            .iter()
            .filter(|b| state_of(b).load.is_ejected())
            .count();
        if let Some(length) = state.load.observe_result(ok, cfg, pool.len(), ejected) {
            state.metrics.ejections.inc();
            log::warn!(
                "backend {} ejected for {length:?}: {} failures in a row",
                state.label,
                cfg.eject_after
            );
        }
    }

    /// Refresh `gateway_backend_up` from the health state (called when metrics are scraped).
    pub fn refresh_gauges(&self) {
        for b in self.discovery.current.load().iter() {
            let state = state_of(b);
            state.metrics.up.set(state.is_up() as i64);
        }
    }

    /// One health pass over every backend, concurrently, bounded by the check timeout (each
    /// check is). Run before the gateway accepts (start and `--upgrade`), so its first
    /// requests find the backends that are up.
    pub async fn check_once(&self) {
        let timeout = self.check.settings.load().0.timeout + Duration::from_millis(100);
        let _ = tokio::time::timeout(timeout, self.lb.backends().run_health_check(true)).await;
    }

    /// Whether at least one backend is up (the gateway's own readiness).
    pub fn any_up(&self) -> bool {
        self.discovery
            .current
            .load()
            .iter()
            .any(|b| state_of(b).is_up())
    }

    /// One pass of health checks over every backend, concurrently.
    pub async fn check_pass(&self) {
        self.lb.backends().run_health_check(true).await;
    }

    /// The health-check interval in force.
    pub fn interval(&self) -> Duration {
        self.check.settings.load().0.interval
    }
}
