//! Readiness: what `/ready` reports. Dependency state is checked in the background (never on
//! the probe itself); load and error rate come from counters the request path keeps.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::admission::Admission;
use crate::db::Db;

/// Counts requests and 5xx per second over a sliding window of whole seconds, lock-free.
pub struct ErrorWindow {
    buckets: Vec<Bucket>,
}

#[derive(Default)]
struct Bucket {
    second: AtomicU64,
    total: AtomicU64,
    errors: AtomicU64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ErrorWindow {
    pub fn new(window_secs: u64) -> Self {
        ErrorWindow {
            buckets: (0..window_secs.max(1)).map(|_| Bucket::default()).collect(),
        }
    }

    pub fn record(&self, error: bool) {
        self.record_at(now_secs(), error)
    }

    fn record_at(&self, sec: u64, error: bool) {
        let b = &self.buckets[(sec % self.buckets.len() as u64) as usize];
        let seen = b.second.load(Ordering::Acquire);
        if seen != sec
            && b.second
                .compare_exchange(seen, sec, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.total.store(0, Ordering::Release);
            b.errors.store(0, Ordering::Release);
        }
        b.total.fetch_add(1, Ordering::AcqRel);
        if error {
            b.errors.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// (requests, errors) in the window ending now.
    pub fn totals(&self) -> (u64, u64) {
        self.totals_at(now_secs())
    }

    fn totals_at(&self, now: u64) -> (u64, u64) {
        let oldest = now.saturating_sub(self.buckets.len() as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| (oldest..=now).contains(&b.second.load(Ordering::Acquire)))
            .fold((0, 0), |(t, e), b| {
                (
                    t + b.total.load(Ordering::Acquire),
                    e + b.errors.load(Ordering::Acquire),
                )
            })
    }
}

/// Everything `/ready` looks at.
pub struct Readiness {
    pub shutting_down: AtomicBool,
    /// Result of the last background database check.
    pub database_ok: AtomicBool,
    pub errors: ErrorWindow,
    admission: Arc<Admission>,
    inflight_ratio: f64,
    max_error_rate: f64,
    min_requests: u64,
}

impl Readiness {
    pub fn new(
        admission: Arc<Admission>,
        window_secs: u64,
        inflight_ratio: f64,
        max_error_rate: f64,
        min_requests: u64,
    ) -> Self {
        Readiness {
            shutting_down: AtomicBool::new(false),
            database_ok: AtomicBool::new(false),
            errors: ErrorWindow::new(window_secs),
            admission,
            inflight_ratio,
            max_error_rate,
            min_requests,
        }
    }

    /// Ok, or the reason this instance should not get traffic.
    pub fn check(&self) -> Result<(), String> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err("shutting down".into());
        }
        if !self.database_ok.load(Ordering::Acquire) {
            return Err("database unreachable".into());
        }
        let (inflight, limit) = (self.admission.inflight(), self.admission.limit());
        if inflight as f64 >= limit as f64 * self.inflight_ratio {
            return Err(format!("near the in-flight limit ({inflight} of {limit})"));
        }
        let (total, errors) = self.errors.totals();
        if total >= self.min_requests && errors as f64 > total as f64 * self.max_error_rate {
            return Err(format!(
                "error rate too high ({errors} of {total} recent requests)"
            ));
        }
        Ok(())
    }

    /// Check the database every `interval`, forever.
    pub async fn watch_database(self: Arc<Self>, db: Db, interval: Duration) {
        loop {
            let ok = matches!(
                tokio::time::timeout(interval.max(Duration::from_millis(500)), db.ping()).await,
                Ok(Ok(()))
            );
            if self.database_ok.swap(ok, Ordering::AcqRel) != ok {
                if ok {
                    log::info!("database reachable");
                } else {
                    log::warn!("database unreachable: readiness fails");
                }
            }
            tokio::time::sleep(interval).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_forgets_old_seconds() {
        let w = ErrorWindow::new(3);
        w.record_at(100, true);
        w.record_at(101, false);
        w.record_at(102, false);
        assert_eq!(w.totals_at(102), (3, 1));
        assert_eq!(w.totals_at(103), (2, 0));
        w.record_at(103, true); // reuses the bucket of second 100
        assert_eq!(w.totals_at(103), (3, 1));
        assert_eq!(w.totals_at(110), (0, 0));
    }
}
