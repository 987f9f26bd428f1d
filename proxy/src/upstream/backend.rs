//! What the gateway keeps about one backend address, across reloads and weight changes:
//! its health (per address, so a weight change never resets it), its metric series, its
//! concurrency gate and its idle connections.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pingora::lb::Backend;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::balance::Load;
use super::conn::Idle;
use crate::config::BackendQueue;
use crate::metrics::BackendMetrics;
use crate::policy::Rejection;

/// Carried in [`Backend::ext`] so the request path reaches it without a lookup.
pub struct BackendState {
    /// `ip:port`, the label of its metrics and the access log.
    pub label: String,
    /// Gets traffic: set by its first passed health check, then by `successes` passes in a
    /// row; cleared by `failures` failures in a row.
    up: AtomicBool,
    /// Was ever up (the first pass rule).
    ever_up: AtomicBool,
    passes: AtomicU32,
    failures: AtomicU32,
    /// Its pre-resolved metric series.
    pub metrics: BackendMetrics,
    /// Its concurrency cap and wait queue (HAProxy `maxconn` / `maxqueue`).
    pub gate: BackendGate,
    /// Idle keep-alive connections, most recent last ([`super::conn`]).
    pub idle: Mutex<Vec<Idle>>,
    /// Requests in flight, latency estimate, outlier state ([`super::balance`]).
    pub load: Load,
    /// The name it was resolved from, if any (a TLS pool's default SNI).
    host: arc_swap::ArcSwapOption<String>,
}

impl BackendState {
    pub fn new(label: String, metrics: BackendMetrics, max_concurrent: usize) -> Self {
        BackendState {
            label,
            up: AtomicBool::new(false),
            ever_up: AtomicBool::new(false),
            passes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            metrics,
            gate: BackendGate::new(max_concurrent),
            idle: Mutex::new(Vec::new()),
            load: Load::default(),
            host: Default::default(),
        }
    }

    /// The name it was resolved from, if any.
    pub fn host(&self) -> Option<Arc<String>> {
        self.host.load_full()
    }

    pub fn set_host(&self, host: Option<&str>) {
        if self.host.load().as_deref().map(String::as_str) != host {
            self.host.store(host.map(|h| Arc::new(h.to_string())));
        }
    }

    /// Whether it may be sent requests.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Record one health-check result; returns the new state when it changed. A backend that
    /// never passed comes up on its first pass (it gets no traffic before).
    pub fn record_check(&self, ok: bool, successes: usize, failures: usize) -> Option<bool> {
        let up = self.is_up();
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            let passes = self.passes.fetch_add(1, Ordering::Relaxed) as usize + 1;
            let never = !self.ever_up.swap(true, Ordering::Relaxed);
            if !up && (never || passes >= successes) {
                self.up.store(true, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.passes.store(0, Ordering::Relaxed);
            let failed = self.failures.fetch_add(1, Ordering::Relaxed) as usize + 1;
            if up && failed >= failures {
                self.up.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }
}

/// The state of a selected backend.
pub fn state_of(b: &Backend) -> &Arc<BackendState> {
    b.ext
        .get::<Arc<BackendState>>()
        .expect("every backend is created with its state")
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
    pub fn resize(&self, capacity: usize) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_counted_per_address_with_thresholds() {
        let m = crate::metrics::Metrics::new();
        let s = BackendState::new("x".into(), m.backend("default", "x"), 0);
        assert!(!s.is_up());
        // The first pass brings a new backend up.
        assert_eq!(s.record_check(true, 2, 3), Some(true));
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(s.record_check(false, 2, 3), Some(false));
        // Back after `successes` passes in a row, not one.
        assert_eq!(s.record_check(true, 2, 3), None);
        assert!(!s.is_up());
        assert_eq!(s.record_check(true, 2, 3), Some(true));
    }
}
