//! The vendor contract across every instance: never more than N calls in any window W at the
//! vendor, retries included, through Redis outages, pauses and restarts.
//!
//! - Shared: one Lua script in Redis counts every call of every instance (microsecond scores,
//!   Redis server time) over W plus `VENDOR_CONTRACT_MARGIN`, which covers the variation of
//!   the time between taking a token and the vendor receiving the call.
//! - Redis lost: the instance cannot know what the others used in the last window, so it
//!   assumes the window is full and admits nothing for one window; then it admits its share
//!   (contract / `VENDOR_EXPECTED_INSTANCES`) from its own log. Lost means evidence that Redis
//!   is gone or stale, not one slow call: a refused, reset or closed connection; or
//!   `VENDOR_REDIS_LOST_FAILURES` failed calls in a row (timeouts or errors, heartbeats
//!   included, no answer in between) spanning at least `VENDOR_REDIS_LOST_AFTER`; or the
//!   restart marker below. A call that merely timed out is not sent (its entry, if the script
//!   ran late, is compensated), so a slow Redis costs calls, never the contract: Redis stays
//!   the only judge until it is declared lost.
//! - Redis back: the calls made on shares during the outage are not in Redis, so for one
//!   window (plus the time every instance needs to notice that Redis is back) a call needs
//!   both its share and Redis; only then does Redis alone decide again.
//! - Redis restarted empty (its log lost; noticed by a marker the script keeps, even when the
//!   connection reconnected without an error): the instance holds for one window, as when
//!   Redis is lost.
//!
//! A heartbeat reads Redis every [`HEARTBEAT`], so every instance notices an outage and a
//! return within `HEARTBEAT + REDIS_TIMEOUT`, whether or not it has calls to make. An
//! instance whose run of failures ends with an answer after long enough that another instance
//! may have declared Redis lost and used its share (half of `VENDOR_REDIS_LOST_AFTER` or of
//! the window, whichever is shorter) applies its share for a window too, as if it had lost
//! Redis itself: the others' calls on shares are not in Redis.
//! What this cannot keep: an instance cut off from Redis while the others still reach it (a
//! partition), and more instances than `VENDOR_EXPECTED_INSTANCES` sharing an outage.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::ratelimit::local::LocalStore;
use crate::ratelimit::redis::{ContractReply, Failure, RedisStore};
use crate::ratelimit::{Check, Quota};

/// How often each instance reads Redis, calls or not.
pub const HEARTBEAT: Duration = Duration::from_millis(250);

/// When failed Redis calls mean Redis is lost (`VENDOR_REDIS_LOST_FAILURES`,
/// `VENDOR_REDIS_LOST_AFTER`); a connection refused, reset or closed means it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossRule {
    /// Failed calls in a row, no answer in between.
    pub failures: u32,
    /// The least time from the first of them to the latest.
    pub after: Duration,
}

/// Why no call may be made now, and how long to wait before asking again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The contract (or, without Redis, this instance's share) is used up.
    Full(Duration),
    /// Redis did not answer this time (slow or failing, not declared lost yet): no call.
    RedisFailed(Duration),
    /// Redis was lost (or restarted empty): no call until one window has passed.
    Held(Duration),
}

impl Refusal {
    pub fn wait(&self) -> Duration {
        match *self {
            Refusal::Full(d) | Refusal::RedisFailed(d) | Refusal::Held(d) => d,
        }
    }
}

pub struct Contract {
    store: Option<RedisStore>,
    /// This instance's calls, for its share (while Redis is lost, and after it returns).
    local: LocalStore,
    /// The contract with the margin added to its window, in Redis.
    contract: Quota,
    /// This instance's share, with the same window.
    share: Check,
    key: String,
    /// How late an instance may notice that Redis is back, after another noticed.
    spread: Duration,
    loss: LossRule,
    /// A run of failures at least this long, ended by an answer: another instance may have
    /// declared Redis lost and used its share meanwhile.
    recover_after: Duration,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct State {
    degraded: bool,
    /// The marker of the Redis state this instance knows.
    born: Option<i64>,
    /// No call at all before this (the window may be full of calls this instance cannot see).
    hold_until: Option<Instant>,
    /// Until this, a call needs its share as well as Redis.
    recovering_until: Option<Instant>,
    /// The current run of failed Redis calls (no answer since): when it began, how many.
    streak: Option<(Instant, u32)>,
}

fn later(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.max(b)))
}

impl Contract {
    /// `margin` is added to the contract's window; the heartbeat starts when called inside a
    /// tokio runtime and stops when the contract is dropped.
    pub fn new(
        store: Option<RedisStore>,
        contract: Quota,
        margin: Duration,
        expected_instances: u32,
        redis_timeout: Duration,
        loss: LossRule,
        metrics: Arc<Metrics>,
    ) -> Arc<Contract> {
        let window = contract.window + margin;
        let key = "vendor:calls".to_string();
        let c = Arc::new(Contract {
            contract: Quota {
                limit: contract.limit,
                window,
            },
            share: Check {
                key: key.clone(),
                quota: Quota {
                    limit: (contract.limit / expected_instances.max(1)).max(1),
                    window,
                },
                name: "vendor contract (per-instance share)".into(),
            },
            key,
            spread: 2 * (HEARTBEAT + redis_timeout),
            loss: LossRule {
                failures: loss.failures.max(1),
                after: loss.after,
            },
            recover_after: loss.after.min(window) / 2,
            local: LocalStore::default(),
            state: Mutex::new(State::default()),
            store,
            metrics,
        });
        if c.store.is_some() && tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(heartbeat(Arc::downgrade(&c)));
        }
        c
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_degraded(&self) -> bool {
        self.state().degraded
    }

    /// Count one call: Ok, or why not and how long to wait before asking again.
    pub async fn acquire(&self) -> Result<(), Refusal> {
        let now = Instant::now();
        let Some(store) = &self.store else {
            return self.take_share(now).map_err(Refusal::Full);
        };
        let (born, recovering) = {
            let st = self.state();
            if let Some(until) = st.hold_until.filter(|t| now < *t) {
                return Err(Refusal::Held(until - now));
            }
            if st.degraded {
                drop(st);
                return self.take_share(now).map_err(Refusal::Full);
            }
            (st.born, st.recovering_until.is_some_and(|t| now < t))
        };
        if recovering {
            self.take_share(now).map_err(Refusal::Full)?;
        }
        let reply = store
            .contract(&self.key, self.contract, self.contract.limit, born)
            .await;
        let admitted = reply.as_ref().ok().and_then(|r| r.admitted) == Some(true);
        if recovering && !admitted {
            self.local.forget(&self.share, now);
        }
        let refusal = match &reply {
            Ok(r) => Refusal::Full(r.reset),
            Err(_) => Refusal::RedisFailed(Duration::ZERO),
        };
        self.observe(reply);
        if admitted {
            return Ok(());
        }
        let hold = self.state().hold_until.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        });
        if hold > Duration::ZERO {
            return Err(Refusal::Held(hold.max(refusal.wait())));
        }
        Err(refusal)
    }

    /// This instance's share, from its own log.
    fn take_share(&self, now: Instant) -> Result<(), Duration> {
        let outcome = self.local.check(std::slice::from_ref(&self.share), now);
        if outcome.admitted {
            Ok(())
        } else {
            Err(outcome.usage.first().map_or(HEARTBEAT, |u| u.reset))
        }
    }

    /// Read Redis without counting: notices an outage, a return and a restart.
    async fn beat(&self) {
        let Some(store) = &self.store else { return };
        let born = self.state().born;
        let reply = store.contract(&self.key, self.contract, 0, born).await;
        self.observe(reply);
    }

    /// Move between the modes on what Redis answered (or did not).
    fn observe(&self, reply: Result<ContractReply, Failure>) {
        let now = Instant::now();
        let window = self.contract.window;
        let mut st = self.state();
        match reply {
            Err(why) => {
                if st.degraded {
                    return;
                }
                let (since, failures) = st.streak.map_or((now, 1), |(t, n)| (t, n + 1));
                st.streak = Some((since, failures));
                let lost = why.gone
                    || (failures >= self.loss.failures
                        && now.duration_since(since) >= self.loss.after);
                if !lost {
                    log::debug!(
                        "vendor limiter: Redis call failed ({why}); {failures} in a row over \
                         {:?}: not lost yet",
                        now.duration_since(since)
                    );
                    return;
                }
                st.degraded = true;
                st.streak = None;
                st.hold_until = later(st.hold_until, now + window);
                self.metrics.vendor_limiter_degraded.set(1);
                log::warn!(
                    "vendor limiter: Redis lost ({why}; {failures} failed calls in a row over \
                     {:?}); no vendor calls for one window ({window:?}), then this instance's \
                     share",
                    now.duration_since(since)
                );
            }
            Ok(r) => {
                if let Some((since, failures)) = st.streak.take() {
                    // A long run of failures: another instance may have declared Redis lost
                    // and called on its share, which Redis does not count.
                    if !st.degraded && now.duration_since(since) >= self.recover_after {
                        st.recovering_until =
                            later(st.recovering_until, now + window + self.spread);
                        log::info!(
                            "vendor limiter: Redis answers again after {failures} failed calls \
                             over {:?}; shares apply for one window",
                            now.duration_since(since)
                        );
                    }
                }
                if r.admitted.is_none() {
                    // Redis restarted empty: the calls of the last window are not in it.
                    if !st.degraded {
                        st.hold_until = later(st.hold_until, now + window);
                    }
                    st.recovering_until = later(st.recovering_until, now + window + self.spread);
                    log::warn!("vendor limiter: Redis lost its state; holding for one window");
                }
                if st.born.is_none() || r.admitted.is_none() {
                    st.born = Some(r.born);
                }
                if st.degraded {
                    st.degraded = false;
                    st.recovering_until = later(st.recovering_until, now + window + self.spread);
                    self.metrics.vendor_limiter_degraded.set(0);
                    log::info!(
                        "vendor limiter: Redis reachable again; shares still apply for one window"
                    );
                }
            }
        }
    }
}

async fn heartbeat(contract: Weak<Contract>) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let Some(c) = contract.upgrade() else { return };
        c.beat().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract(after: Duration) -> Arc<Contract> {
        Contract::new(
            None,
            Quota {
                limit: 30,
                window: Duration::from_secs(3),
            },
            Duration::from_millis(100),
            3,
            Duration::from_millis(100),
            LossRule { failures: 3, after },
            Arc::new(Metrics::new()),
        )
    }

    fn slow() -> Result<ContractReply, Failure> {
        Err(Failure {
            gone: false,
            detail: "no answer within 100ms".into(),
        })
    }

    fn answer() -> Result<ContractReply, Failure> {
        Ok(ContractReply {
            admitted: Some(true),
            reset: Duration::ZERO,
            born: 1,
        })
    }

    #[test]
    fn failures_in_a_burst_are_not_a_lost_redis() {
        let c = contract(Duration::from_secs(60));
        for _ in 0..10 {
            c.observe(slow());
        }
        assert!(!c.is_degraded(), "ten timeouts at once: slow, not lost");
        c.observe(answer());
        let st = c.state();
        assert!(st.streak.is_none() && st.hold_until.is_none());
        assert!(st.recovering_until.is_none(), "a short run of failures");
    }

    #[test]
    fn failures_that_last_are_a_lost_redis() {
        let c = contract(Duration::from_millis(30));
        c.observe(slow());
        c.observe(slow());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!c.is_degraded());
        c.observe(slow());
        assert!(c.is_degraded(), "three failures over 30 ms");
        assert!(c.state().hold_until.is_some_and(|t| t > Instant::now()));
    }

    #[test]
    fn a_long_run_of_failures_ended_by_an_answer_applies_shares() {
        let c = contract(Duration::from_secs(60));
        c.observe(answer());
        c.observe(slow());
        // recover_after is half the shorter of LOST_AFTER and the window (3.1 s).
        std::thread::sleep(Duration::from_millis(1600));
        c.observe(answer());
        assert!(!c.is_degraded());
        assert!(
            c.state().recovering_until.is_some(),
            "another may have used its share"
        );
    }

    #[test]
    fn a_refused_connection_is_a_lost_redis_at_once() {
        let c = contract(Duration::from_secs(60));
        c.observe(Err(Failure {
            gone: true,
            detail: "Connection refused".into(),
        }));
        assert!(c.is_degraded());
    }
}
