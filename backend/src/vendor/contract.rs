//! The vendor contract across every instance: never more than N calls in any window W at the
//! vendor, retries included, through Redis outages, pauses and restarts.
//!
//! - Shared: one Lua script in Redis counts every call of every instance (microsecond scores,
//!   Redis server time) over W plus `VENDOR_CONTRACT_MARGIN`, which covers the variation of
//!   the time between taking a token and the vendor receiving the call.
//! - Redis lost (an error, a timeout, or a heartbeat that failed): the instance cannot know
//!   what the others used in the last window, so it assumes the window is full and admits
//!   nothing for one window; then it admits its share (contract / `VENDOR_EXPECTED_INSTANCES`)
//!   from its own log.
//! - Redis back: the calls made on shares during the outage are not in Redis, so for one
//!   window (plus the time every instance needs to notice that Redis is back) a call needs
//!   both its share and Redis; only then does Redis alone decide again.
//! - Redis restarted empty (its log lost; noticed by a marker the script keeps, even when the
//!   connection reconnected without an error): the instance holds for one window, as when
//!   Redis is lost.
//!
//! A heartbeat reads Redis every [`HEARTBEAT`], so every instance notices an outage and a
//! return within `HEARTBEAT + REDIS_TIMEOUT`, whether or not it has calls to make.
//! What this cannot keep: an instance cut off from Redis while the others still reach it (a
//! partition), and more instances than `VENDOR_EXPECTED_INSTANCES` sharing an outage.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::ratelimit::local::LocalStore;
use crate::ratelimit::redis::{ContractReply, RedisStore};
use crate::ratelimit::{Check, Quota};

/// How often each instance reads Redis, calls or not.
pub const HEARTBEAT: Duration = Duration::from_millis(250);

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

    /// Count one call: Ok, or how long to wait before asking again.
    pub async fn acquire(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let Some(store) = &self.store else {
            return self.take_share(now);
        };
        let (born, recovering) = {
            let st = self.state();
            if let Some(until) = st.hold_until.filter(|t| now < *t) {
                return Err(until - now);
            }
            if st.degraded {
                drop(st);
                return self.take_share(now);
            }
            (st.born, st.recovering_until.is_some_and(|t| now < t))
        };
        if recovering {
            self.take_share(now)?;
        }
        let reply = store
            .contract(&self.key, self.contract, self.contract.limit, born)
            .await;
        let admitted = reply.as_ref().ok().and_then(|r| r.admitted) == Some(true);
        if recovering && !admitted {
            self.local.forget(&self.share, now);
        }
        let wait = match &reply {
            Ok(r) => r.reset,
            Err(_) => Duration::ZERO,
        };
        self.observe(reply);
        if admitted {
            return Ok(());
        }
        let hold = self.state().hold_until.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        });
        Err(wait.max(hold))
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
    fn observe(&self, reply: Result<ContractReply, String>) {
        let now = Instant::now();
        let window = self.contract.window;
        let mut st = self.state();
        match reply {
            Err(why) => {
                if !st.degraded {
                    st.degraded = true;
                    st.hold_until = later(st.hold_until, now + window);
                    self.metrics.vendor_limiter_degraded.set(1);
                    log::warn!(
                        "vendor limiter: Redis unreachable ({why}); no vendor calls for one \
                         window ({window:?}), then this instance's share"
                    );
                }
            }
            Ok(r) => {
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
