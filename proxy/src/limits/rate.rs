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
    /// Refuse; it would conform after `retry_after`. `window`: which of the limit's rates
    /// refused it (its index in `rates`).
    Reject {
        retry_after: Duration,
        window: usize,
    },
}

/// The GCRA parameters of one window of a rate spec.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gcra {
    /// Requests per second.
    pub per_second: f64,
    /// The unit the rate was written in (1, 60, 3600 s).
    pub window_secs: u64,
    pub burst: u32,
    delay: bool,
    max_delay: Duration,
    /// Emission interval: microseconds per request at the sustained rate.
    pub interval: u64,
    /// Burst tolerance: `burst` intervals.
    pub tolerance: u64,
}

impl Gcra {
    /// Every window of `spec`, in its order. The first has the spec's `burst`; each further
    /// one caps its whole window: its burst is its count per window less one (so
    /// `rates: [10000r/m, 100000r/h]` passes the hour's 100,000 at the minute's pace, as a
    /// minute and an hour quota do), never less than `burst`.
    pub fn windows(spec: &RateSpec) -> Vec<Gcra> {
        spec.rates
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let interval = ((1e6 / r.per_second).round() as u64).max(1);
                let burst = if i == 0 {
                    spec.burst
                } else {
                    let count = (r.per_second * r.window_secs as f64).round() as u32;
                    count.saturating_sub(1).max(spec.burst)
                };
                Gcra {
                    per_second: r.per_second,
                    window_secs: r.window_secs,
                    burst,
                    delay: spec.delay,
                    max_delay: spec.max_delay,
                    interval,
                    tolerance: interval * burst as u64,
                }
            })
            .collect()
    }

    /// The new TAT to store (None: store nothing) and the decision, from the stored TAT.
    fn decide(&self, stored_tat: u64, now: u64, window: usize) -> (Option<u64>, Decision) {
        let tat = stored_tat.max(now);
        let ahead = tat - now;
        if ahead > self.tolerance {
            let retry_after = Duration::from_micros(ahead - self.tolerance);
            return (
                None,
                Decision::Reject {
                    retry_after,
                    window,
                },
            );
        }
        let wait = if self.delay {
            Duration::from_micros(ahead)
        } else {
            Duration::ZERO
        };
        if wait > self.max_delay {
            // It would wait past the deadline: refuse now, without taking its place.
            let retry_after = Duration::from_micros(ahead) - self.max_delay;
            return (
                None,
                Decision::Reject {
                    retry_after,
                    window,
                },
            );
        }
        let new_tat = tat + self.interval;
        let remaining =
            ((self.tolerance + self.interval).saturating_sub(new_tat - now) / self.interval) as u32;
        (Some(new_tat), Decision::Allow { wait, remaining })
    }

    /// `RateLimit-Policy` value, e.g. `100;w=1;burst=200`.
    pub fn policy_header(&self) -> String {
        let q = self.per_second * self.window_secs as f64;
        format!(
            "{};w={};burst={}",
            q.round() as u64,
            self.window_secs,
            self.burst
        )
    }

    /// Requests that pass at once from a full bucket.
    pub fn capacity(&self) -> u32 {
        self.burst + 1
    }
}

/// Folds the decisions of a limit's windows: the longest wait and the fewest remaining.
fn fold(acc: Decision, next: Decision) -> Decision {
    match (acc, next) {
        (
            Decision::Allow { wait, remaining },
            Decision::Allow {
                wait: w,
                remaining: r,
            },
        ) => Decision::Allow {
            wait: wait.max(w),
            remaining: remaining.min(r),
        },
        (_, reject) => reject,
    }
}

const ALLOW: Decision = Decision::Allow {
    wait: Duration::ZERO,
    remaining: u32::MAX,
};

/// One limit shared by every request (the global ceiling): one TAT per window.
pub struct SharedLimiter {
    pub spec: RateSpec,
    pub gcras: Vec<Gcra>,
    tats: Box<[AtomicU64]>,
}

impl SharedLimiter {
    pub fn new(spec: RateSpec) -> Self {
        let gcras = Gcra::windows(&spec);
        SharedLimiter {
            tats: gcras.iter().map(|_| AtomicU64::new(0)).collect(),
            gcras,
            spec,
        }
    }

    pub fn check(&self) -> Decision {
        self.check_at(now_us())
    }

    pub fn check_at(&self, now: u64) -> Decision {
        let mut acc = ALLOW;
        for (i, (gcra, tat)) in self.gcras.iter().zip(self.tats.iter()).enumerate() {
            let decision = Self::check_window(gcra, tat, now, i);
            if let Decision::Reject { .. } = decision {
                // The windows before it counted a request that is refused: give it back.
                for (g, t) in self.gcras[..i].iter().zip(self.tats.iter()) {
                    t.fetch_sub(g.interval, Ordering::AcqRel);
                }
                return decision;
            }
            acc = fold(acc, decision);
        }
        acc
    }

    fn check_window(gcra: &Gcra, tat: &AtomicU64, now: u64, window: usize) -> Decision {
        let mut current = tat.load(Ordering::Acquire);
        loop {
            let (store, decision) = gcra.decide(current, now, window);
            let Some(new) = store else { return decision };
            match tat.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return decision,
                Err(seen) => current = seen,
            }
        }
    }
}

/// One limit per key (client IP), in a fixed-size table per window.
pub struct KeyedLimiter {
    pub spec: RateSpec,
    pub gcras: Vec<Gcra>,
    tables: Vec<Box<[AtomicU64]>>,
    set_mask: usize,
}

impl KeyedLimiter {
    /// `slots` (per window) is rounded up to a power of two, at least one set.
    pub fn new(spec: RateSpec, slots: usize) -> Self {
        let slots = slots.next_power_of_two().max(WAYS);
        let gcras = Gcra::windows(&spec);
        KeyedLimiter {
            tables: gcras
                .iter()
                .map(|_| (0..slots).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            gcras,
            spec,
            set_mask: slots / WAYS - 1,
        }
    }

    pub fn check(&self, key: u64) -> Decision {
        self.check_at(key, now_us())
    }

    pub fn check_at(&self, key: u64, now: u64) -> Decision {
        let key = mix(key);
        let first = (key as usize & self.set_mask) * WAYS;
        let fp = ((key >> TAT_BITS) as u16).max(1) as u64;
        let mut acc = ALLOW;
        for (i, (gcra, table)) in self.gcras.iter().zip(self.tables.iter()).enumerate() {
            let decision = Self::check_window(gcra, &table[first..][..WAYS], fp, now, i);
            if let Decision::Reject { .. } = decision {
                for (g, t) in self.gcras[..i].iter().zip(self.tables.iter()) {
                    Self::give_back(g, &t[first..][..WAYS], fp);
                }
                return decision;
            }
            acc = fold(acc, decision);
        }
        acc
    }

    fn check_window(gcra: &Gcra, set: &[AtomicU64], fp: u64, now: u64, window: usize) -> Decision {
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
            let (store, decision) = gcra.decide(stored_tat, now, window);
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

    /// Take back one request's interval from the key's slot (a later window refused it);
    /// nothing when the slot was taken over meanwhile.
    fn give_back(gcra: &Gcra, set: &[AtomicU64], fp: u64) {
        for slot in set {
            let mut v = slot.load(Ordering::Acquire);
            while v >> TAT_BITS == fp {
                let tat = (v & TAT_MASK).saturating_sub(gcra.interval);
                match slot.compare_exchange(
                    v,
                    (fp << TAT_BITS) | tat,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return,
                    Err(seen) => v = seen,
                }
            }
        }
    }

    /// Requests of `key` its buckets still hold (admitted and not yet refilled), the most
    /// over its windows: what a cluster limit charges when a key leaves its share.
    pub fn pending(&self, key: u64) -> u64 {
        let now = now_us();
        let key = mix(key);
        let first = (key as usize & self.set_mask) * WAYS;
        let fp = ((key >> TAT_BITS) as u16).max(1) as u64;
        self.gcras
            .iter()
            .zip(self.tables.iter())
            .filter_map(|(g, t)| {
                let v = t[first..][..WAYS]
                    .iter()
                    .map(|s| s.load(Ordering::Acquire))
                    .find(|v| v >> TAT_BITS == fp)?;
                Some((v & TAT_MASK).saturating_sub(now).div_ceil(g.interval))
            })
            .max()
            .unwrap_or(0)
    }

    /// Slots per window.
    pub fn slots(&self) -> usize {
        self.tables.first().map_or(0, |t| t.len())
    }

    /// Bytes of state, whatever the number of clients.
    pub fn memory_bytes(&self) -> usize {
        self.slots() * 8 * self.tables.len()
    }
}

/// A 64-bit finalizer (splitmix64), so set index and fingerprint are independent bits.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(per_second: f64, burst: u32, delay: bool, max_delay_ms: u64) -> RateSpec {
        RateSpec {
            delay,
            max_delay: Duration::from_millis(max_delay_ms),
            ..RateSpec::single(per_second, 1, burst)
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
            Decision::Reject { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_millis(100))
            }
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

    /// Several windows, all enforced: against a plain reference (one TAT per key and window,
    /// all advanced only when every window admits), over random keys and arrival times.
    #[test]
    fn several_windows_match_a_reference() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        println!("seed {seed}");
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let spec = RateSpec {
            rates: vec![
                crate::config::RateValue {
                    per_second: 20.0,
                    window_secs: 1,
                },
                crate::config::RateValue {
                    per_second: 300.0 / 60.0,
                    window_secs: 60,
                },
            ],
            ..RateSpec::single(1.0, 1, 10)
        };
        let keyed = KeyedLimiter::new(spec.clone(), 1 << 12);
        let shared = SharedLimiter::new(spec);
        let (i1, i2) = (50_000u64, 200_000u64);
        // The minute window's burst is its count less one: 299.
        let (t1, t2) = (i1 * 10, i2 * 299);
        let mut reference = std::collections::HashMap::<u64, (u64, u64)>::new();
        let mut shared_ref = (0u64, 0u64);
        let mut now = 10_000_000u64;
        let admit = |tats: &mut (u64, u64), now: u64| {
            let (a, b) = (tats.0.max(now), tats.1.max(now));
            if a - now <= t1 && b - now <= t2 {
                *tats = (a + i1, b + i2);
                true
            } else {
                false
            }
        };
        let mut passed = 0;
        for _ in 0..20_000 {
            now += next() % 40_000;
            let key = next() % 5;
            let want = admit(reference.entry(key).or_default(), now);
            assert_eq!(
                allowed(keyed.check_at(key, now)),
                want,
                "key {key} at {now}"
            );
            let want = admit(&mut shared_ref, now);
            passed += usize::from(want);
            let got = shared.check_at(now);
            assert_eq!(allowed(got), want, "shared at {now}");
            if let Decision::Reject { window, .. } = got {
                assert!(window < 2);
            }
        }
        assert!(passed > 100, "the test exercised admissions: {passed}");
    }
}
