//! Choosing a backend for a request, for every engine: weighted round robin (pingora's
//! selection), least connections, or the power of two random choices over peak-EWMA latency
//! (linkerd's and Finagle's rule); each skips backends that are down, ejected as outliers, or
//! already tried for this request. And the passive side: each exchange's latency and result
//! feed the estimates and the outlier ejection (Envoy's rule: N failures in a row eject a
//! backend for a time that doubles with each ejection in a row, never more than a set share of
//! the pool at once; the active health checks still decide when it is up).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pingora::lb::Backend;

use super::backend::state_of;
use crate::config::{Balance, Balancing};

/// What selection knows about one backend's load and behaviour.
#[derive(Default)]
pub struct Load {
    inflight: AtomicUsize,
    /// Peak-EWMA of the time to an answer's head, microseconds as f64 bits; 0: no sample yet.
    ewma_us: AtomicU64,
    /// When `ewma_us` was last updated, microseconds since [`epoch`].
    ewma_at_us: AtomicU64,
    failures_in_row: AtomicU32,
    ejections_in_row: AtomicU32,
    /// Ejected until this time (microseconds since [`epoch`]); 0: not ejected.
    ejected_until_us: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

/// Counts one request in flight to a backend for as long as it lives.
pub struct InFlight<'a>(&'a Load);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Load {
    pub fn begin(&self) -> InFlight<'_> {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// The active checks found it up again (after being down): whatever ejection it had is
    /// over, and its count starts afresh.
    pub fn clear_ejection(&self) {
        self.ejected_until_us.store(0, Ordering::Relaxed);
        self.failures_in_row.store(0, Ordering::Relaxed);
        self.ejections_in_row.store(0, Ordering::Relaxed);
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until_us.load(Ordering::Relaxed) > now_us()
    }

    /// The peak-EWMA estimate (µs), or `neutral` before the first sample.
    fn ewma(&self, decay: Duration, neutral: f64) -> f64 {
        let v = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        if v == 0.0 {
            return neutral;
        }
        // Decayed towards zero while no sample came: an idle backend gets tried again.
        let idle = now_us().saturating_sub(self.ewma_at_us.load(Ordering::Relaxed)) as f64;
        v * (-idle / decay.as_micros().max(1) as f64).exp()
    }

    /// One exchange's time to its answer head.
    pub fn observe_latency(&self, rtt: Duration, decay: Duration) {
        let rtt = rtt.as_micros().max(1) as f64;
        let now = now_us();
        let old = f64::from_bits(self.ewma_us.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.ewma_at_us.load(Ordering::Relaxed)) as f64;
        let next = if old == 0.0 || rtt > old {
            // Peak: a slower answer takes over at once.
            rtt
        } else {
            let w = (-elapsed / decay.as_micros().max(1) as f64).exp();
            old * w + rtt * (1.0 - w)
        };
        self.ewma_us.store(next.to_bits(), Ordering::Relaxed);
        self.ewma_at_us.store(now, Ordering::Relaxed);
    }

    /// One exchange's result; `ejected_now` is how many of the pool are ejected. Returns the
    /// ejection's length when this one ejected the backend.
    pub fn observe_result(
        &self,
        ok: bool,
        cfg: &Balancing,
        pool: usize,
        ejected_now: usize,
    ) -> Option<Duration> {
        if ok {
            self.failures_in_row.store(0, Ordering::Relaxed);
            if !self.is_ejected() {
                self.ejections_in_row.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let failures = self.failures_in_row.fetch_add(1, Ordering::Relaxed) + 1;
        if cfg.eject_after == 0 || failures < cfg.eject_after || self.is_ejected() {
            return None;
        }
        // Never more than the share: at least one backend of a pool may always be ejected
        // when the share allows any (Envoy rounds the same way).
        let allowed = (pool * cfg.max_ejection_percent as usize / 100)
            .max(usize::from(cfg.max_ejection_percent > 0 && pool > 1));
        if ejected_now >= allowed {
            return None;
        }
        let n = self.ejections_in_row.fetch_add(1, Ordering::Relaxed).min(3);
        let length = (cfg.base_ejection * 2u32.pow(n)).min(cfg.base_ejection * 10);
        self.ejected_until_us
            .store(now_us() + length.as_micros() as u64, Ordering::Relaxed);
        self.failures_in_row.store(0, Ordering::Relaxed);
        Some(length)
    }
}

thread_local! {
    static RNG: std::cell::Cell<u64> = std::cell::Cell::new(
        (now_us() ^ (std::process::id() as u64) << 32) | 1
    );
}

fn random() -> u64 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        r.set(x);
        x
    })
}

/// The choice among `candidates` (already filtered: up, not ejected, not tried) for the
/// load-aware algorithms; None when there is none. Round robin is pingora's (`Upstreams`).
pub fn choose<'a>(candidates: &[&'a Backend], cfg: &Balancing) -> Option<&'a Backend> {
    let cost_conn = |b: &Backend| (state_of(b).load.inflight() + 1) as f64 / b.weight.max(1) as f64;
    match (cfg.algorithm, candidates.len()) {
        (_, 0) => None,
        (_, 1) => Some(candidates[0]),
        (Balance::LeastConn, n) => {
            // The lowest cost; among equals, a random one (start at a random index).
            let start = (random() % n as u64) as usize;
            (0..n)
                .map(|i| candidates[(start + i) % n])
                .min_by(|a, b| cost_conn(a).total_cmp(&cost_conn(b)))
        }
        (_, n) => {
            // A new backend starts at the pool's mean estimate, not zero (it would take all).
            let known: Vec<f64> = candidates
                .iter()
                .map(|b| f64::from_bits(state_of(b).load.ewma_us.load(Ordering::Relaxed)))
                .filter(|v| *v > 0.0)
                .collect();
            let neutral = if known.is_empty() {
                1000.0
            } else {
                known.iter().sum::<f64>() / known.len() as f64
            };
            let cost = |b: &Backend| state_of(b).load.ewma(cfg.ewma_decay, neutral) * cost_conn(b);
            let i = (random() % n as u64) as usize;
            let mut j = (random() % (n as u64 - 1)) as usize;
            if j >= i {
                j += 1;
            }
            let (a, b) = (candidates[i], candidates[j]);
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(eject_after: u32, max_percent: u32) -> Balancing {
        Balancing {
            algorithm: Balance::P2cEwma,
            ewma_decay: Duration::from_secs(10),
            eject_after,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: max_percent,
        }
    }

    #[test]
    fn n_failures_in_a_row_eject_for_a_doubling_time_within_the_share() {
        let l = Load::default();
        let c = cfg(3, 50);
        assert_eq!(l.observe_result(false, &c, 4, 0), None);
        assert_eq!(l.observe_result(true, &c, 4, 0), None);
        assert_eq!(l.observe_result(false, &c, 4, 0), None);
        assert_eq!(l.observe_result(false, &c, 4, 0), None);
        assert_eq!(
            l.observe_result(false, &c, 4, 0),
            Some(Duration::from_secs(10))
        );
        assert!(l.is_ejected());
        // The share is full: another backend of the pool is not ejected.
        let other = Load::default();
        for _ in 0..5 {
            assert_eq!(other.observe_result(false, &c, 4, 2), None);
        }
        assert!(!other.is_ejected());
        // Ejected again in a row: twice as long.
        l.ejected_until_us.store(0, Ordering::Relaxed);
        for _ in 0..2 {
            l.observe_result(false, &c, 4, 0);
        }
        assert_eq!(
            l.observe_result(false, &c, 4, 0),
            Some(Duration::from_secs(20))
        );
        // Off: never.
        let off = Load::default();
        for _ in 0..100 {
            assert_eq!(off.observe_result(false, &cfg(0, 50), 4, 0), None);
        }
    }

    #[test]
    fn peak_ewma_takes_peaks_at_once_and_decays_slowly() {
        let l = Load::default();
        let decay = Duration::from_secs(10);
        l.observe_latency(Duration::from_millis(1), decay);
        assert!((l.ewma(decay, 0.0) - 1000.0).abs() < 10.0);
        l.observe_latency(Duration::from_millis(50), decay);
        assert!(l.ewma(decay, 0.0) > 49_000.0);
        // A fast sample right after moves it only a little.
        l.observe_latency(Duration::from_millis(1), decay);
        assert!(l.ewma(decay, 0.0) > 40_000.0);
        // No sample yet: the neutral estimate.
        assert_eq!(Load::default().ewma(decay, 777.0), 777.0);
    }
}
