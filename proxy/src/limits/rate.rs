//! Rate limits with nginx `limit_req` semantics, as GCRA (the generic cell rate algorithm,
//! the same leaky bucket nginx uses): a sustained rate plus a burst, passed at once
//! (`nodelay`) or delayed to the rate, with a `max_delay` past which a request is rejected at
//! once instead of waiting.
//!
//! State is one 64-bit word per key, updated with compare-and-swap: no locks. The per-IP table
//! has a fixed number of slots (8 bytes each) whatever the number of clients, organised as
//! 8-way sets; a slot holds a 16-bit key fingerprint and the key's theoretical arrival time
//! (TAT) in microseconds. A key whose TAT has passed holds no state (its bucket is full), so
//! its slot is free for another key. Exactness: exact while fewer than 8 keys that are over
//! their rate share a set; beyond that the slot closest to expiry is taken over, which can
//! only reset (never tighten) that key's state. Two keys with the same set and fingerprint
//! (1 in 65,536 within a set) share one bucket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::RateSpec;

const TAT_BITS: u32 = 48;
const TAT_MASK: u64 = (1 << TAT_BITS) - 1;
const WAYS: usize = 8;

/// Microseconds on a monotonic clock shared by every limiter of the process.
pub fn now_us() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    // Start at 1 s so that "zero" can mean "no state".
    START.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1_000_000
}

/// What a limiter decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Pass, after waiting this long (zero with `nodelay`). `remaining` more requests would
    /// pass at once.
    Allow { wait: Duration, remaining: u32 },
    /// Refuse; it would conform after `retry_after`.
    Reject { retry_after: Duration },
}

/// The GCRA parameters of one rate spec.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gcra {
    pub spec: RateSpec,
    /// Emission interval: microseconds per request at the sustained rate.
    interval: u64,
    /// Burst tolerance: `burst` intervals.
    tolerance: u64,
}

impl Gcra {
    pub fn new(spec: RateSpec) -> Self {
        let interval = ((1e6 / spec.per_second).round() as u64).max(1);
        Gcra {
            spec,
            interval,
            tolerance: interval * spec.burst as u64,
        }
    }

    /// The new TAT to store (None: store nothing) and the decision, from the stored TAT.
    fn decide(&self, stored_tat: u64, now: u64) -> (Option<u64>, Decision) {
        let tat = stored_tat.max(now);
        let ahead = tat - now;
        if ahead > self.tolerance {
            let retry_after = Duration::from_micros(ahead - self.tolerance);
            return (None, Decision::Reject { retry_after });
        }
        let wait = if self.spec.delay {
            Duration::from_micros(ahead)
        } else {
            Duration::ZERO
        };
        if wait > self.spec.max_delay {
            // It would wait past the deadline: refuse now, without taking its place.
            let retry_after = Duration::from_micros(ahead) - self.spec.max_delay;
            return (None, Decision::Reject { retry_after });
        }
        let new_tat = tat + self.interval;
        let remaining =
            ((self.tolerance + self.interval).saturating_sub(new_tat - now) / self.interval) as u32;
        (Some(new_tat), Decision::Allow { wait, remaining })
    }

    /// `RateLimit-Policy` value, e.g. `100;w=1;burst=200`.
    pub fn policy_header(&self) -> String {
        let q = self.spec.per_second * self.spec.window_secs as f64;
        format!(
            "{};w={};burst={}",
            q.round() as u64,
            self.spec.window_secs,
            self.spec.burst
        )
    }

    /// Requests that pass at once from a full bucket.
    pub fn capacity(&self) -> u32 {
        self.spec.burst + 1
    }
}

/// One limit shared by every request (the global ceiling).
pub struct SharedLimiter {
    pub gcra: Gcra,
    tat: AtomicU64,
}

impl SharedLimiter {
    pub fn new(spec: RateSpec) -> Self {
        SharedLimiter {
            gcra: Gcra::new(spec),
            tat: AtomicU64::new(0),
        }
    }

    pub fn check(&self) -> Decision {
        self.check_at(now_us())
    }

    pub fn check_at(&self, now: u64) -> Decision {
        let mut current = self.tat.load(Ordering::Acquire);
        loop {
            let (store, decision) = self.gcra.decide(current, now);
            let Some(new) = store else { return decision };
            match self
                .tat
                .compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return decision,
                Err(seen) => current = seen,
            }
        }
    }
}

/// One limit per key (client IP), in a fixed-size table.
pub struct KeyedLimiter {
    pub gcra: Gcra,
    slots: Box<[AtomicU64]>,
    set_mask: usize,
}

impl KeyedLimiter {
    /// `slots` is rounded up to a power of two, at least one set.
    pub fn new(spec: RateSpec, slots: usize) -> Self {
        let slots = slots.next_power_of_two().max(WAYS);
        KeyedLimiter {
            gcra: Gcra::new(spec),
            slots: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            set_mask: slots / WAYS - 1,
        }
    }

    pub fn check(&self, key: u64) -> Decision {
        self.check_at(key, now_us())
    }

    pub fn check_at(&self, key: u64, now: u64) -> Decision {
        let key = mix(key);
        let set = &self.slots[(key as usize & self.set_mask) * WAYS..][..WAYS];
        let fp = ((key >> TAT_BITS) as u16).max(1) as u64;
        loop {
            // The key's own slot, else a free or expired one, else the one closest to expiry.
            let mut pick: Option<(usize, u64)> = None;
            let mut own = None;
            for (i, slot) in set.iter().enumerate() {
                let v = slot.load(Ordering::Acquire);
                if v >> TAT_BITS == fp {
                    own = Some((i, v));
                    break;
                }
                let tat = v & TAT_MASK;
                let better = match pick {
                    None => true,
                    Some((_, pv)) => tat < (pv & TAT_MASK),
                };
                if better {
                    pick = Some((i, v));
                }
            }
            let (i, observed, stored_tat) = match own {
                Some((i, v)) => (i, v, v & TAT_MASK),
                None => {
                    let (i, v) = pick.expect("a set has slots");
                    (i, v, 0)
                }
            };
            let (store, decision) = self.gcra.decide(stored_tat, now);
            let Some(new_tat) = store else {
                return decision;
            };
            let new = (fp << TAT_BITS) | (new_tat & TAT_MASK);
            if set[i]
                .compare_exchange(observed, new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return decision;
            }
            // Someone else updated this set; look again.
        }
    }

    /// Bytes of state, whatever the number of clients.
    pub fn memory_bytes(&self) -> usize {
        self.slots.len() * 8
    }
}

/// A 64-bit finalizer (splitmix64), so set index and fingerprint are independent bits.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(per_second: f64, burst: u32, delay: bool, max_delay_ms: u64) -> RateSpec {
        RateSpec {
            per_second,
            window_secs: 1,
            burst,
            delay,
            max_delay: Duration::from_millis(max_delay_ms),
        }
    }

    fn allowed(d: Decision) -> bool {
        matches!(d, Decision::Allow { .. })
    }

    #[test]
    fn nodelay_passes_burst_plus_one_then_refills_at_the_rate() {
        let l = KeyedLimiter::new(spec(10.0, 5, false, 0), 1024);
        let t = 10_000_000;
        let passed = (0..20).filter(|_| allowed(l.check_at(1, t))).count();
        assert_eq!(passed, 6);
        match l.check_at(1, t) {
            Decision::Reject { retry_after } => assert_eq!(retry_after, Duration::from_millis(100)),
            d => panic!("{d:?}"),
        }
        // Another key is unaffected.
        assert!(allowed(l.check_at(2, t)));
        // 100 ms later one more request conforms.
        assert!(allowed(l.check_at(1, t + 100_000)));
        assert!(!allowed(l.check_at(1, t + 100_000)));
    }

    #[test]
    fn delay_mode_spaces_requests_and_rejects_past_max_delay() {
        let l = SharedLimiter::new(spec(10.0, 5, true, 250));
        let t = 10_000_000;
        let waits: Vec<_> = (0..5).map(|_| l.check_at(t)).collect();
        let ms: Vec<u128> = waits
            .iter()
            .map(|d| match d {
                Decision::Allow { wait, .. } => wait.as_millis(),
                Decision::Reject { .. } => u128::MAX,
            })
            .collect();
        // 0, 100, 200 ms; the fourth would wait 300 ms > max_delay: rejected at once.
        assert_eq!(&ms[..3], &[0, 100, 200]);
        assert!(matches!(waits[3], Decision::Reject { .. }));
    }

    #[test]
    fn remaining_counts_down() {
        let l = SharedLimiter::new(spec(1.0, 2, false, 0));
        let t = 10_000_000;
        let r: Vec<_> = (0..3)
            .map(|_| match l.check_at(t) {
                Decision::Allow { remaining, .. } => remaining,
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(r, vec![2, 1, 0]);
    }

    #[test]
    fn memory_is_fixed_with_a_million_keys() {
        let l = KeyedLimiter::new(spec(1.0, 0, false, 0), 1 << 12);
        let t = 10_000_000;
        for k in 0..1_000_000u64 {
            l.check_at(k, t);
        }
        assert_eq!(l.memory_bytes(), (1 << 12) * 8);
        // A key that just passed is still limited while its set is not overrun.
        let l = KeyedLimiter::new(spec(1.0, 0, false, 0), 1 << 16);
        for k in 0..1000u64 {
            assert!(allowed(l.check_at(k, t)));
        }
        let limited = (0..1000u64).filter(|k| !allowed(l.check_at(*k, t))).count();
        assert!(limited >= 999, "{limited}");
    }
}
