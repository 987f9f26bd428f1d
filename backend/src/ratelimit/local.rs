//! The in-process store: the same sliding-window-log semantics as the Redis script, for one
//! instance. Keys whose log is empty are dropped, so memory follows active callers.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Check, Outcome, Usage};

const SHARDS: usize = 16;

fn shard_of(key: &str) -> usize {
    key.bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
        % SHARDS
}

/// Admission times per key.
pub struct LocalStore {
    shards: [Mutex<HashMap<String, VecDeque<Instant>>>; SHARDS],
}

impl Default for LocalStore {
    fn default() -> Self {
        LocalStore {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

impl LocalStore {
    /// Take back an admission counted at `at` (the caller's other check refused it).
    pub fn forget(&self, check: &Check, at: Instant) {
        let mut map = self.shards[shard_of(&check.key)]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(log) = map.get_mut(&check.key) {
            if let Some(i) = log.iter().rposition(|t| *t == at) {
                log.remove(i);
            }
            if log.is_empty() {
                map.remove(&check.key);
            }
        }
    }

    /// All checks under one lock order (by shard index), so a multi-limit decision is atomic.
    pub fn check(&self, checks: &[Check], now: Instant) -> Outcome {
        let mut order: Vec<usize> = checks.iter().map(|c| shard_of(&c.key)).collect();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<_> = order
            .iter()
            .map(|i| {
                (
                    *i,
                    self.shards[*i].lock().unwrap_or_else(|p| p.into_inner()),
                )
            })
            .collect();
        let mut counts = Vec::with_capacity(checks.len());
        for c in checks {
            let shard = shard_of(&c.key);
            let map = &mut guards
                .iter_mut()
                .find(|(i, _)| *i == shard)
                .expect("locked")
                .1;
            let log = map.entry(c.key.clone()).or_default();
            while log
                .front()
                .is_some_and(|t| now.duration_since(*t) >= c.quota.window)
            {
                log.pop_front();
            }
            counts.push((log.len() as u32, log.front().copied()));
        }
        let admitted = checks
            .iter()
            .zip(&counts)
            .all(|(c, (n, _))| *n < c.quota.limit);
        let mut usage = Vec::with_capacity(checks.len());
        for (c, (n, oldest)) in checks.iter().zip(counts) {
            let shard = shard_of(&c.key);
            let map = &mut guards
                .iter_mut()
                .find(|(i, _)| *i == shard)
                .expect("locked")
                .1;
            let log = map.get_mut(&c.key).expect("entry made above");
            let n = if admitted {
                log.push_back(now);
                n + 1
            } else {
                n
            };
            let oldest = if admitted {
                oldest.or(Some(now))
            } else {
                oldest
            };
            let reset = oldest
                .map(|t| c.quota.window.saturating_sub(now.duration_since(t)))
                .unwrap_or(Duration::ZERO);
            if log.is_empty() {
                map.remove(&c.key);
            }
            usage.push(Usage {
                quota: c.quota,
                remaining: c.quota.limit.saturating_sub(n),
                reset,
            });
        }
        Outcome { admitted, usage }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::Quota;

    fn check(key: &str, limit: u32, secs: u64) -> Check {
        Check {
            key: key.into(),
            quota: Quota {
                limit,
                window: Duration::from_secs(secs),
            },
            name: key.into(),
        }
    }

    #[test]
    fn sliding_window_admits_exactly_n_in_any_window() {
        let s = LocalStore::default();
        let t0 = Instant::now();
        let c = [check("u", 3, 10)];
        let admitted: Vec<bool> = (0..5)
            .map(|i| s.check(&c, t0 + Duration::from_secs(i)).admitted)
            .collect();
        assert_eq!(admitted, vec![true, true, true, false, false]);
        // The first leaves the window at t0+10s: exactly one more.
        assert!(s.check(&c, t0 + Duration::from_secs(10)).admitted);
        assert!(!s.check(&c, t0 + Duration::from_millis(10_500)).admitted);
    }

    #[test]
    fn both_limits_must_pass_and_a_refusal_counts_against_neither() {
        let s = LocalStore::default();
        let t = Instant::now();
        let tier = check("tier", 5, 60);
        let ep = check("ep", 2, 60);
        assert!(s.check(&[tier.clone(), ep.clone()], t).admitted);
        assert!(s.check(&[tier.clone(), ep.clone()], t).admitted);
        let refused = s.check(&[tier.clone(), ep.clone()], t);
        assert!(!refused.admitted);
        assert_eq!(
            refused.reported().unwrap().0,
            1,
            "the endpoint limit refused"
        );
        // The tier still has 3 left: the refusal did not use one.
        let other = s.check(&[tier.clone(), check("ep2", 10, 60)], t);
        assert!(other.admitted);
        assert_eq!(other.usage[0].remaining, 2);
    }
}
