//! The backend pool: weighted round robin (pingora-load-balancing), active HTTP health checks,
//! and a discovery source that start-up, reload and DNS re-resolution all update the same way.
//!
//! pingora starts every backend healthy; we do better: a backend gets traffic only after its
//! first health check passed ([`BackendState::passed_first_check`]), so a backend that never
//! answers its readiness probe never sees a request.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Extensions, LoadBalancer};
use pingora::prelude::RequestHeader;
use pingora::protocols::l4::socket::SocketAddr as PSocketAddr;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::Result;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{BackendQueue, BackendSpec, HealthSettings};
use crate::metrics::{BackendMetrics, Metrics, Rejection};

/// What the gateway keeps about one backend address, carried in [`Backend::ext`] so the
/// request path reaches it without a lookup.
pub struct BackendState {
    /// `ip:port`, the label of its metrics and the access log.
    pub label: String,
    /// Set by the first passed health check; until then the backend gets no traffic.
    passed_first_check: AtomicBool,
    /// Its pre-resolved metric series.
    pub metrics: BackendMetrics,
    /// Its concurrency cap and wait queue (HAProxy `maxconn` / `maxqueue`).
    pub gate: BackendGate,
    /// Idle keep-alive connections of the fast path ([`crate::fast`]), most recent last.
    pub idle: Mutex<Vec<crate::fast::Idle>>,
}

/// A per-backend cap on concurrent requests with a bounded, timed wait queue.
pub struct BackendGate {
    slots: Arc<Semaphore>,
    /// Current number of slots (0: unlimited, the semaphore is unused).
    capacity: AtomicUsize,
    waiting: AtomicUsize,
}

impl BackendGate {
    fn new(capacity: usize) -> Self {
        BackendGate {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity: AtomicUsize::new(capacity),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Follow a changed cap (reload). Lowering it takes effect as slots are returned.
    fn resize(&self, capacity: usize) {
        let old = self.capacity.swap(capacity, Ordering::AcqRel);
        if capacity > old {
            self.slots.add_permits(capacity - old);
        } else if capacity < old {
            self.slots.forget_permits(old - capacity);
        }
    }

    /// A slot for one request: at once, or after waiting in the queue; None when unlimited.
    pub async fn enter(&self, q: &BackendQueue) -> Result<Option<OwnedSemaphorePermit>, Rejection> {
        if q.max_concurrent == 0 {
            return Ok(None);
        }
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(Some(p));
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= q.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejection::BackendQueueFull);
        }
        let r = tokio::time::timeout(q.timeout, self.slots.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match r {
            Ok(Ok(p)) => Ok(Some(p)),
            _ => Err(Rejection::BackendQueueTimeout),
        }
    }
}

impl BackendState {
    pub fn passed_first_check(&self) -> bool {
        self.passed_first_check.load(Ordering::Relaxed)
    }
}

/// The state of a selected backend.
pub fn state_of(b: &Backend) -> &Arc<BackendState> {
    b.ext
        .get::<Arc<BackendState>>()
        .expect("every backend is created with its state")
}

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

/// The health check: pingora's HTTP check with settings that reload can swap, which also
/// records each backend's first pass.
struct ReadinessCheck {
    settings: ArcSwap<(HealthSettings, HttpHealthCheck)>,
}

impl ReadinessCheck {
    fn build(s: &HealthSettings) -> (HealthSettings, HttpHealthCheck) {
        let mut hc = HttpHealthCheck::new("localhost", false);
        let mut req = RequestHeader::build("GET", s.path.as_bytes(), None)
            .expect("health path validated at config load");
        req.insert_header("Host", "localhost")
            .expect("valid header");
        req.insert_header("User-Agent", "floodgate-health-check")
            .expect("valid header");
        hc.req = req;
        hc.peer_template.options.connection_timeout = Some(s.timeout);
        hc.peer_template.options.total_connection_timeout = Some(s.timeout);
        hc.peer_template.options.read_timeout = Some(s.timeout);
        hc.peer_template.options.write_timeout = Some(s.timeout);
        hc.consecutive_failure = s.failures;
        hc.consecutive_success = s.successes;
        (s.clone(), hc)
    }
}

#[async_trait]
impl HealthCheck for ReadinessCheck {
    async fn check(&self, target: &Backend) -> Result<()> {
        let current = self.settings.load_full();
        let timeout = current.0.timeout;
        // pingora's check has per-step timeouts; bound the whole check as well.
        let result = match tokio::time::timeout(timeout, current.1.check(target)).await {
            Ok(r) => r,
            Err(_) => pingora::Error::e_explain(
                pingora::ErrorType::ReadTimedout,
                "health check timed out",
            ),
        };
        if result.is_ok() {
            if let Some(state) = target.ext.get::<Arc<BackendState>>() {
                if !state.passed_first_check.swap(true, Ordering::Relaxed) {
                    log::info!("backend {} passed its first health check", state.label);
                }
            }
        }
        result
    }

    fn health_threshold(&self, success: bool) -> usize {
        let s = &self.settings.load().0;
        if success {
            s.successes
        } else {
            s.failures
        }
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        let label = target
            .ext
            .get::<Arc<BackendState>>()
            .map(|s| s.label.as_str())
            .unwrap_or("?");
        if healthy {
            log::info!("backend {label} is up");
        } else {
            log::warn!("backend {label} is down");
        }
    }
}

/// The pool of backends behind the gateway.
pub struct Upstreams {
    lb: LoadBalancer<RoundRobin>,
    discovery: Arc<PoolDiscovery>,
    check: Arc<ReadinessCheck>,
    metrics: Arc<Metrics>,
    /// Last addresses each backend name resolved to, kept when a later lookup fails.
    resolved: Mutex<HashMap<crate::config::HostPort, Vec<SocketAddr>>>,
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

/// The health check registered with pingora delegates to our shared [`ReadinessCheck`].
struct SharedCheck(Arc<ReadinessCheck>);

#[async_trait]
impl HealthCheck for SharedCheck {
    async fn check(&self, target: &Backend) -> Result<()> {
        self.0.check(target).await
    }
    fn health_threshold(&self, success: bool) -> usize {
        self.0.health_threshold(success)
    }
    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        self.0.health_status_change(target, healthy).await
    }
}

impl Upstreams {
    pub fn new(health: &HealthSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        let discovery = Arc::new(PoolDiscovery::default());
        let backends = pingora::lb::Backends::new(Box::new(DiscoveryHandle(discovery.clone())));
        let mut lb = LoadBalancer::<RoundRobin>::from_backends(backends);
        let check = Arc::new(ReadinessCheck {
            settings: ArcSwap::from_pointee(ReadinessCheck::build(health)),
        });
        lb.set_health_check(Box::new(SharedCheck(check.clone())));
        Arc::new(Upstreams {
            lb,
            discovery,
            check,
            metrics,
            resolved: Mutex::new(HashMap::new()),
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
        let mut resolved: Vec<(SocketAddr, usize)> = Vec::new();
        for spec in specs {
            if let Some(sa) = spec.address.socket_addr() {
                resolved.push((sa, spec.weight));
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
            resolved.extend(addrs.into_iter().map(|sa| (sa, spec.weight)));
        }
        resolved.sort();
        resolved.dedup_by_key(|(sa, _)| *sa);
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

    async fn set_resolved(&self, resolved: &[(SocketAddr, usize)], max_concurrent: usize) {
        let old = self.discovery.current.load_full();
        let existing: HashMap<SocketAddr, Arc<BackendState>> = old
            .iter()
            .filter_map(|b| Some((b.as_inet()?.to_owned(), state_of(b).clone())))
            .collect();
        let mut next = BTreeSet::new();
        for &(sa, weight) in resolved {
            let state = existing.get(&sa).cloned().unwrap_or_else(|| {
                let label = sa.to_string();
                let metrics = self.metrics.backend(&label);
                Arc::new(BackendState {
                    label,
                    passed_first_check: AtomicBool::new(false),
                    metrics,
                    gate: BackendGate::new(max_concurrent),
                    idle: Mutex::new(Vec::new()),
                })
            });
            state.gate.resize(max_concurrent);
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
                self.metrics.forget_backend(&state_of(b).label);
            }
        }
        self.discovery.current.store(Arc::new(next));
        // Our discovery never fails.
        let _ = self.lb.update().await;
    }

    /// Swap in new health-check settings; the next pass uses them.
    pub fn set_health(&self, health: &HealthSettings) {
        self.check
            .settings
            .store(Arc::new(ReadinessCheck::build(health)));
    }

    /// Pick the next backend that is healthy, has passed a check, and is not in `tried`.
    pub fn select(&self, tried: &[SocketAddr]) -> Option<Backend> {
        self.lb.select_with(b"", 256, |b, healthy| {
            healthy
                && state_of(b).passed_first_check()
                && !b.as_inet().is_some_and(|a| tried.contains(a))
        })
    }

    /// Refresh `gateway_backend_up` from the health state (called when metrics are scraped).
    pub fn refresh_gauges(&self) {
        for b in self.discovery.current.load().iter() {
            let state = state_of(b);
            let up = self.lb.backends().ready(b) && state.passed_first_check();
            state.metrics.up.set(up as i64);
        }
    }

    /// Health-check every backend concurrently, then wait the configured interval; forever.
    async fn health_loop(&self) {
        loop {
            self.lb.backends().run_health_check(true).await;
            let interval = self.check.settings.load().0.interval;
            tokio::time::sleep(interval).await;
        }
    }
}

/// Runs the health checks as a pingora background service.
pub struct HealthService(pub Arc<Upstreams>);

#[async_trait]
impl BackgroundService for HealthService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        tokio::select! {
            _ = self.0.health_loop() => {}
            _ = shutdown.changed() => {}
        }
    }
}
