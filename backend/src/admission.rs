//! Per-instance admission control (uvicorn's `--limit-concurrency`): a cap on requests in
//! flight. Beyond it a request is shed at once with 503 + `Retry-After`; nothing queues.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The in-flight counter and its cap.
pub struct Admission {
    cap: usize,
    inflight: AtomicUsize,
}

/// Holds one in-flight slot until dropped.
pub struct Permit(Arc<Admission>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Admission {
            cap,
            inflight: AtomicUsize::new(0),
        })
    }

    /// A slot, or None when `cap` requests are already in flight.
    pub fn try_enter(self: &Arc<Self>) -> Option<Permit> {
        let prev = self.inflight.fetch_add(1, Ordering::AcqRel);
        if prev >= self.cap {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Permit(self.clone()))
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    pub fn cap(&self) -> usize {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_exactly_cap_and_releases_on_drop() {
        let a = Admission::new(2);
        let p1 = a.try_enter().unwrap();
        let _p2 = a.try_enter().unwrap();
        assert!(a.try_enter().is_none());
        assert_eq!(a.inflight(), 2);
        drop(p1);
        assert!(a.try_enter().is_some());
    }
}
