//! A circuit breaker: after `failures` consecutive failed calls it opens for `cooldown` and
//! calls fail fast; then one probe call is let through, and its result closes or re-opens it.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

pub struct Breaker {
    failures_to_open: u32,
    cooldown: Duration,
    state: AtomicU8,
    consecutive_failures: AtomicU32,
    /// When it opened, in ms since `epoch`.
    opened_at_ms: AtomicU64,
    /// An abandoned probe hands its turn to the next caller, cool-down or not.
    probe_due: AtomicBool,
    epoch: Instant,
}

/// Why a call may not go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    /// Until the next probe may be tried.
    pub retry_after: Duration,
}

impl Breaker {
    pub fn new(failures_to_open: u32, cooldown: Duration) -> Self {
        Breaker {
            failures_to_open: failures_to_open.max(1),
            cooldown,
            state: AtomicU8::new(CLOSED),
            consecutive_failures: AtomicU32::new(0),
            opened_at_ms: AtomicU64::new(0),
            probe_due: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// May a call go ahead? While open, no; after the cool-down exactly one caller becomes
    /// the probe (`Ok(true)`).
    pub fn admit(&self) -> Result<bool, Open> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Ok(false),
            OPEN => {
                let since = self
                    .now_ms()
                    .saturating_sub(self.opened_at_ms.load(Ordering::Acquire));
                let cooldown = self.cooldown.as_millis() as u64;
                let due = since >= cooldown || self.probe_due.load(Ordering::Acquire);
                if due
                    && self
                        .state
                        .compare_exchange(OPEN, HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    self.probe_due.store(false, Ordering::Release);
                    log::info!("vendor circuit half-open: probing");
                    return Ok(true);
                }
                Err(Open {
                    retry_after: Duration::from_millis(cooldown.saturating_sub(since).max(1)),
                })
            }
            _ => Err(Open {
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// May a retry go ahead? Only while closed: a retry never becomes a probe.
    pub fn admit_retry(&self) -> Result<(), Open> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Ok(()),
            _ => Err(Open {
                retry_after: self.cooldown,
            }),
        }
    }

    /// A probe ended without a verdict: open again, with the next probe allowed at once.
    pub fn abandon_probe(&self) {
        self.probe_due.store(true, Ordering::Release);
        let _ = self
            .state
            .compare_exchange(HALF_OPEN, OPEN, Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn record(&self, success: bool) {
        if success {
            self.consecutive_failures.store(0, Ordering::Release);
            if self.state.swap(CLOSED, Ordering::AcqRel) != CLOSED {
                log::info!("vendor circuit closed");
            }
            return;
        }
        let n = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
        let state = self.state.load(Ordering::Acquire);
        if state == HALF_OPEN || (state == CLOSED && n >= self.failures_to_open) {
            self.opened_at_ms.store(self.now_ms(), Ordering::Release);
            self.state.store(OPEN, Ordering::Release);
            log::warn!("vendor circuit open after {n} consecutive failures");
        }
    }

    /// 0 closed, 1 open, 2 half-open (the `backend_vendor_circuit_state` gauge).
    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_n_failures_and_one_probe_closes_it() {
        let b = Breaker::new(3, Duration::from_millis(50));
        for _ in 0..2 {
            b.record(false);
        }
        assert_eq!(b.admit(), Ok(false));
        b.record(false);
        assert!(b.admit().is_err());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit(), Ok(true), "the probe");
        assert!(b.admit().is_err(), "only one probe at a time");
        b.record(true);
        assert_eq!(b.state(), CLOSED);
        assert!(b.admit().is_ok());
    }

    #[test]
    fn a_failed_probe_reopens() {
        let b = Breaker::new(1, Duration::from_millis(20));
        b.record(false);
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(b.admit(), Ok(true));
        b.record(false);
        assert_eq!(b.state(), OPEN);
        assert!(b.admit().is_err());
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_caller_probe() {
        let b = Breaker::new(1, Duration::from_secs(60));
        b.record(false);
        b.state.store(HALF_OPEN, Ordering::Release);
        b.abandon_probe();
        assert_eq!(b.admit(), Ok(true));
    }
}
