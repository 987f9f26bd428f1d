//! A request body as it arrives: the size cap and the slow-sender rule, for every engine.
//!
//! Bodies are read whole before a backend is chosen (nginx's `proxy_request_buffering on`),
//! so a backend never gets a head without its body and an over-cap or trickled body never
//! holds a backend slot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Rejection;
use crate::config::GatewayConfig;

/// Whether the body read so far may go on: `bytes` received after `elapsed` since its first
/// byte was awaited; `finished`: the body is complete. Over `cap` (its route's
/// `max_body_bytes`, by default `buffers.max_body_bytes`): 413; an unfinished body slower
/// than `slow_clients.body_min_rate` after its grace time: 408.
pub fn check_progress(
    cfg: &GatewayConfig,
    cap: usize,
    bytes: usize,
    elapsed: Duration,
    finished: bool,
) -> Result<(), Rejection> {
    if bytes > cap {
        return Err(Rejection::BodyTooLarge);
    }
    // A finished body is taken whatever its pace; an unfinished one must keep up.
    if cfg.body_min_rate > 0 && !finished {
        let allowed = cfg.body_min_rate_grace
            + Duration::from_secs_f64(bytes as f64 / cfg.body_min_rate as f64);
        if elapsed > allowed {
            return Err(Rejection::BodyTooSlow);
        }
    }
    Ok(())
}

/// Request bodies buffered at once, all connections together, against
/// `buffers.total_body_bytes`. A [`BodyReservation`] holds its bytes until dropped.
pub struct BodyBudget {
    used: AtomicUsize,
    gauge: prometheus::IntGauge,
}

/// Bytes of one request's body counted against the [`BodyBudget`].
pub struct BodyReservation {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyBudget {
    pub fn new(gauge: prometheus::IntGauge) -> Arc<Self> {
        Arc::new(BodyBudget {
            used: AtomicUsize::new(0),
            gauge,
        })
    }

    /// An empty reservation, grown as the body arrives.
    pub fn reservation(self: &Arc<Self>) -> BodyReservation {
        BodyReservation {
            budget: self.clone(),
            bytes: 0,
        }
    }
}

impl BodyReservation {
    /// Count `more` bytes, unless that takes every body in flight over `cap`: 503.
    pub fn grow(&mut self, cap: usize, more: usize) -> Result<(), Rejection> {
        let before = self.budget.used.fetch_add(more, Ordering::AcqRel);
        if before + more > cap {
            self.budget.used.fetch_sub(more, Ordering::AcqRel);
            return Err(Rejection::BodyBudget);
        }
        self.bytes += more;
        self.budget.gauge.add(more as i64);
        Ok(())
    }
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.gauge.sub(self.bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_bodies_are_cut_after_their_grace_and_caps_hold() {
        let cfg = GatewayConfig::parse(
            "upstream:\n  backends: [\"127.0.0.1:9\"]\nbuffers:\n  max_body_bytes: 1000\nslow_clients:\n  body_min_rate: 100\n  body_min_rate_grace: 2s\n",
        )
        .unwrap();
        let s = Duration::from_secs;
        // Within the grace, anything goes.
        assert!(check_progress(&cfg, cfg.max_body_bytes, 0, s(2), false).is_ok());
        // After it: 100 bytes a second on average since the start, plus the grace.
        assert_eq!(
            check_progress(&cfg, cfg.max_body_bytes, 0, s(3), false),
            Err(Rejection::BodyTooSlow)
        );
        assert!(check_progress(&cfg, cfg.max_body_bytes, 200, s(4), false).is_ok());
        assert_eq!(
            check_progress(&cfg, cfg.max_body_bytes, 200, s(5), false),
            Err(Rejection::BodyTooSlow)
        );
        // A finished body is taken whatever its pace.
        assert!(check_progress(&cfg, cfg.max_body_bytes, 200, s(60), true).is_ok());
        assert_eq!(
            check_progress(&cfg, cfg.max_body_bytes, 1001, s(0), false),
            Err(Rejection::BodyTooLarge)
        );
    }

    #[test]
    fn the_body_budget_is_shared_and_released() {
        let budget = BodyBudget::new(prometheus::IntGauge::new("g", "g").unwrap());
        let mut a = budget.reservation();
        let mut b = budget.reservation();
        assert!(a.grow(100, 60).is_ok());
        assert_eq!(b.grow(100, 50), Err(Rejection::BodyBudget));
        assert!(b.grow(100, 40).is_ok());
        drop(a);
        assert!(b.grow(100, 60).is_ok());
        assert_eq!(budget.gauge.get(), 100);
        drop(b);
        assert_eq!(budget.gauge.get(), 0);
    }
}
