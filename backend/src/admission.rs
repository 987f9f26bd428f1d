//! Per-instance admission control: how many requests run at once, and what happens to the
//! rest.
//!
//! - `fixed` (`ADMISSION=fixed`): uvicorn's `--limit-concurrency`, a cap of `MAX_IN_FLIGHT`;
//!   beyond it a request is shed at once with 503 + `Retry-After`, nothing waits.
//! - `adaptive` (the default): the cap is a limit that follows measured latency, a gradient
//!   algorithm in the manner of Netflix's concurrency-limits (Gradient2) and Envoy's adaptive
//!   concurrency filter ([`GradientLimit`]). A request over the limit waits up to
//!   `ADMISSION_QUEUE_TIMEOUT` for a slot, so a burst is absorbed rather than refused; when
//!   the wait runs out, or the queue is full, it gets 503 + `Retry-After`. Slots go to the
//!   oldest waiter, except while waits are running out (a waiter timed out in the last
//!   [`LIFO_AFTER_TIMEOUT`]): then to the newest (adaptive LIFO, as in Facebook's "Fail at
//!   scale"), so under sustained overload the requests served have barely waited and the
//!   queue timeout bounds only how long a refused one waited for its 503.
//!
//! Time is tokio's clock ([`tokio::time::Instant`]), so tests drive it with a paused runtime,
//! and the limit itself is a plain state machine fed (time, latency, in flight) samples.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// Which admission control runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The limit follows latency; a short bounded wait for a slot.
    Adaptive,
    /// A fixed cap (`MAX_IN_FLIGHT`); no waiting.
    Fixed,
}

/// Admission settings, from `ADMISSION*` and `MAX_IN_FLIGHT`.
#[derive(Debug, Clone)]
pub struct AdmissionSettings {
    pub mode: Mode,
    /// Fixed mode's cap; adaptive mode's starting limit (clamped to min..=max).
    pub max_in_flight: usize,
    pub min: usize,
    pub max: usize,
    /// Latency up to `tolerance` x the baseline counts as "near" it (no cut)...
    pub tolerance: f64,
    /// ... and so does latency up to the baseline + `slack`, whichever is more.
    pub slack: Duration,
    /// Longest a request waits for a slot (adaptive only; zero: no waiting).
    pub queue_timeout: Duration,
}

impl AdmissionSettings {
    pub fn fixed(cap: usize) -> Self {
        AdmissionSettings {
            mode: Mode::Fixed,
            max_in_flight: cap,
            min: 1,
            max: cap,
            tolerance: 2.0,
            slack: Duration::ZERO,
            queue_timeout: Duration::ZERO,
        }
    }
}

/// The gradient limit. Every completed request is a sample (its latency from admission to
/// answer, and how many were in flight). Samples are averaged over windows of at least
/// [`WINDOW`] and [`WINDOW_SAMPLES`] samples; at the end of each window:
///
/// - the baseline (the no-load latency) is the fastest single request of the last
///   [`BASELINE_SPAN`] (kept as one minimum per [`BASELINE_BUCKET`]): the latency of a
///   request that did not queue anywhere, which under load still happens, and which follows
///   a database that became slower for good within the span;
/// - the allowed latency is max(tolerance x baseline, baseline + slack): a multiple of the
///   baseline, and for very fast requests an absolute allowance (on a loaded machine a 0.2 ms
///   request is 1 ms at a concurrency of 5: not worth refusing anyone for);
/// - gradient = clamp(allowed / window average, 0.5, 1);
/// - new = limit x gradient + sqrt(limit) (a little headroom so the limit keeps probing);
///   the limit moves [`SMOOTHING`] of the way to `new`, within `min..=max`.
///
/// So while the average stays within the allowance the limit grows by about
/// sqrt(limit) a window, and when latency rises it is cut by up to half a window. It only
/// grows when the window used at least half the limit: an idle instance does not talk itself
/// into a limit it never tried.
#[derive(Debug, Clone)]
pub struct GradientLimit {
    limit: f64,
    min: f64,
    max: f64,
    tolerance: f64,
    slack: Duration,
    window_start: Option<Instant>,
    window_sum: Duration,
    window_n: u32,
    window_max_inflight: usize,
    /// (bucket number, fastest sample in it); the baseline is the minimum over the span.
    minima: VecDeque<(u64, Duration)>,
    epoch: Option<Instant>,
}

/// Shortest averaging window.
pub const WINDOW: Duration = Duration::from_millis(50);
/// Fewest samples in a window.
pub const WINDOW_SAMPLES: u32 = 10;
/// How far back the baseline looks.
pub const BASELINE_SPAN: Duration = Duration::from_secs(10);
/// The baseline's resolution.
pub const BASELINE_BUCKET: Duration = Duration::from_secs(1);
/// Share of the way the limit moves toward the gradient's figure per window.
pub const SMOOTHING: f64 = 0.3;

impl GradientLimit {
    pub fn new(initial: usize, min: usize, max: usize, tolerance: f64, slack: Duration) -> Self {
        let (min, max) = (min.max(1) as f64, max.max(min.max(1)) as f64);
        GradientLimit {
            limit: (initial as f64).clamp(min, max),
            min,
            max,
            tolerance: tolerance.max(1.0),
            slack,
            window_start: None,
            window_sum: Duration::ZERO,
            window_n: 0,
            window_max_inflight: 0,
            minima: VecDeque::new(),
            epoch: None,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit as usize
    }

    /// The no-load latency estimate, once there is one.
    pub fn baseline(&self) -> Option<Duration> {
        self.minima.iter().map(|(_, d)| *d).min()
    }

    /// One completed request: `rtt` from admission to answer, `inflight` when it was admitted
    /// (itself included). Returns true when a window closed (the limit may have moved).
    pub fn sample(&mut self, now: Instant, rtt: Duration, inflight: usize) -> bool {
        let epoch = *self.epoch.get_or_insert(now);
        let bucket = now.saturating_duration_since(epoch).as_secs() / BASELINE_BUCKET.as_secs();
        match self.minima.back_mut() {
            Some((b, d)) if *b == bucket => *d = (*d).min(rtt),
            _ => self.minima.push_back((bucket, rtt)),
        }
        let keep = BASELINE_SPAN.as_secs() / BASELINE_BUCKET.as_secs();
        while self.minima.front().is_some_and(|(b, _)| b + keep <= bucket) {
            self.minima.pop_front();
        }
        let start = *self.window_start.get_or_insert(now);
        self.window_sum += rtt;
        self.window_n += 1;
        self.window_max_inflight = self.window_max_inflight.max(inflight);
        if self.window_n < WINDOW_SAMPLES || now.saturating_duration_since(start) < WINDOW {
            return false;
        }
        let average = self.window_sum.as_secs_f64() / self.window_n as f64;
        let used = self.window_max_inflight as f64;
        self.window_start = Some(now);
        self.window_sum = Duration::ZERO;
        self.window_n = 0;
        self.window_max_inflight = 0;
        let baseline = self.baseline().unwrap_or(rtt).as_secs_f64();
        let allowed = (self.tolerance * baseline).max(baseline + self.slack.as_secs_f64());
        let gradient = if average > 0.0 {
            (allowed / average).clamp(0.5, 1.0)
        } else {
            1.0
        };
        let mut new = self.limit * gradient + self.limit.sqrt();
        if new > self.limit && used < self.limit / 2.0 {
            new = self.limit; // application-limited: nothing learned about a higher limit
        }
        self.limit = (self.limit + (new - self.limit) * SMOOTHING).clamp(self.min, self.max);
        true
    }
}

/// Metrics the admission control keeps up to date.
#[derive(Clone)]
pub struct AdmissionMetrics {
    pub limit: prometheus::IntGauge,
    pub baseline: prometheus::Gauge,
    pub queued: prometheus::IntGauge,
    /// Time a request waited for a slot (requests that waited only).
    pub queue_wait: prometheus::Histogram,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// Fixed mode: at the cap.
    InFlightCap,
    /// Waited `ADMISSION_QUEUE_TIMEOUT` without a slot.
    QueueTimeout,
    /// As many waiting as the limit's maximum (or no waiting allowed).
    QueueFull,
}

impl Shed {
    pub fn reason(self) -> &'static str {
        match self {
            Shed::InFlightCap => "in_flight_cap",
            Shed::QueueTimeout => "queue_timeout",
            Shed::QueueFull => "queue_full",
        }
    }
}

struct State {
    inflight: usize,
    gradient: Option<GradientLimit>,
    cap: usize,
    /// Requests waiting for a slot, oldest first.
    waiters: VecDeque<oneshot::Sender<Permit>>,
    /// When a waiter last timed out.
    last_timeout: Option<Instant>,
}

/// How long after a waiter timed out slots go to the newest waiter.
pub const LIFO_AFTER_TIMEOUT: Duration = Duration::from_millis(250);

impl State {
    fn limit(&self) -> usize {
        self.gradient
            .as_ref()
            .map_or(self.cap, GradientLimit::limit)
    }
}

/// The in-flight count, the limit, and the queue.
pub struct Admission {
    settings: AdmissionSettings,
    state: Mutex<State>,
    /// Mirrors for lock-free reads (readiness, metrics).
    inflight: AtomicUsize,
    limit: AtomicUsize,
    metrics: Option<AdmissionMetrics>,
}

/// Holds one in-flight slot until dropped. [`Permit::done`] also reports the request's
/// latency to the limit; a permit dropped without it (the client went away) only frees the
/// slot.
pub struct Permit {
    admission: Option<Arc<Admission>>,
    admitted: Instant,
    inflight: usize,
}

impl Permit {
    /// The request was answered: free the slot and record its latency.
    pub fn done(mut self) {
        if let Some(a) = self.admission.take() {
            a.release(Some((self.admitted.elapsed(), self.inflight)));
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(a) = self.admission.take() {
            a.release(None);
        }
    }
}

impl Admission {
    pub fn new(settings: AdmissionSettings, metrics: Option<AdmissionMetrics>) -> Arc<Self> {
        let gradient = (settings.mode == Mode::Adaptive).then(|| {
            GradientLimit::new(
                settings.max_in_flight,
                settings.min,
                settings.max,
                settings.tolerance,
                settings.slack,
            )
        });
        let state = State {
            inflight: 0,
            cap: settings.max_in_flight,
            gradient,
            waiters: VecDeque::new(),
            last_timeout: None,
        };
        let limit = state.limit();
        if let Some(m) = &metrics {
            m.limit.set(limit as i64);
        }
        Arc::new(Admission {
            settings,
            state: Mutex::new(state),
            inflight: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            metrics,
        })
    }

    /// A fixed cap and nothing else (tests, tools).
    pub fn fixed(cap: usize) -> Arc<Self> {
        Self::new(AdmissionSettings::fixed(cap), None)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn permit(self: &Arc<Self>, inflight: usize) -> Permit {
        Permit {
            admission: Some(self.clone()),
            admitted: Instant::now(),
            inflight,
        }
    }

    /// A slot now, or None (no waiting).
    pub fn try_enter(self: &Arc<Self>) -> Option<Permit> {
        self.take_free(&mut self.lock())
    }

    /// A free slot, unless others are waiting for one.
    fn take_free(self: &Arc<Self>, s: &mut State) -> Option<Permit> {
        if s.inflight < s.limit() && s.waiters.is_empty() {
            s.inflight += 1;
            self.inflight.store(s.inflight, Ordering::Release);
            return Some(self.permit(s.inflight));
        }
        None
    }

    /// A slot, waiting for one up to the queue timeout in adaptive mode.
    pub async fn enter(self: &Arc<Self>) -> Result<Permit, Shed> {
        let rx = {
            let mut s = self.lock();
            if let Some(p) = self.take_free(&mut s) {
                return Ok(p);
            }
            if self.settings.mode == Mode::Fixed {
                return Err(Shed::InFlightCap);
            }
            if self.settings.queue_timeout.is_zero() || s.waiters.len() >= self.settings.max {
                return Err(Shed::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            s.waiters.push_back(tx);
            if let Some(m) = &self.metrics {
                m.queued.set(s.waiters.len() as i64);
            }
            rx
        };
        let queued = Instant::now();
        let mut rx = rx;
        let result = match tokio::time::timeout(self.settings.queue_timeout, &mut rx).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                // Closing first: a slot handed over just before is still taken (and used).
                rx.close();
                rx.try_recv().map_err(|_| Shed::QueueTimeout)
            }
        };
        if let Some(m) = &self.metrics {
            m.queue_wait.observe(queued.elapsed().as_secs_f64());
        }
        if result.is_err() {
            // Timed-out waiters are dropped from the queue here, not only when a slot frees.
            let mut s = self.lock();
            s.waiters.retain(|tx| !tx.is_closed());
            s.last_timeout = Some(Instant::now());
            if let Some(m) = &self.metrics {
                m.queued.set(s.waiters.len() as i64);
            }
        }
        result.map(|mut p| {
            p.admitted = Instant::now(); // latency counts from admission, not from queueing
            p
        })
    }

    /// Free a slot (or hand it to the oldest waiter), after feeding the sample to the limit.
    fn release(self: &Arc<Self>, sample: Option<(Duration, usize)>) {
        let mut s = self.lock();
        if let (Some(g), Some((rtt, inflight))) = (s.gradient.as_mut(), sample) {
            if g.sample(Instant::now(), rtt, inflight) {
                let limit = g.limit();
                self.limit.store(limit, Ordering::Release);
                if let Some(m) = &self.metrics {
                    m.limit.set(limit as i64);
                    if let Some(b) = g.baseline() {
                        m.baseline.set(b.as_secs_f64());
                    }
                }
            }
        }
        // The slot goes to a waiter still waiting, if the limit allows it: the oldest, or the
        // newest while waits are running out.
        let lifo = s
            .last_timeout
            .is_some_and(|t| t.elapsed() < LIFO_AFTER_TIMEOUT);
        while s.inflight <= s.limit() {
            let next = if lifo {
                s.waiters.pop_back()
            } else {
                s.waiters.pop_front()
            };
            let Some(tx) = next else {
                break;
            };
            let handed = Permit {
                admission: Some(self.clone()),
                admitted: Instant::now(),
                inflight: s.inflight,
            };
            match tx.send(handed) {
                Ok(()) => {
                    if let Some(m) = &self.metrics {
                        m.queued.set(s.waiters.len() as i64);
                    }
                    return;
                }
                // That waiter gave up: the slot is still ours to give.
                Err(mut p) => p.admission = None,
            }
        }
        if let Some(m) = &self.metrics {
            m.queued.set(s.waiters.len() as i64);
        }
        s.inflight -= 1;
        self.inflight.store(s.inflight, Ordering::Release);
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// The current limit (fixed mode: the cap).
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.lock().waiters.len()
    }

    pub fn mode(&self) -> Mode {
        self.settings.mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptive(min: usize, max: usize, initial: usize, queue_ms: u64) -> Arc<Admission> {
        Admission::new(
            AdmissionSettings {
                mode: Mode::Adaptive,
                max_in_flight: initial,
                min,
                max,
                tolerance: 2.0,
                slack: Duration::ZERO,
                queue_timeout: Duration::from_millis(queue_ms),
            },
            None,
        )
    }

    #[test]
    fn fixed_admits_exactly_cap_and_releases_on_drop() {
        let a = Admission::fixed(2);
        let p1 = a.try_enter().unwrap();
        let _p2 = a.try_enter().unwrap();
        assert!(a.try_enter().is_none());
        assert_eq!(a.inflight(), 2);
        drop(p1);
        assert!(a.try_enter().is_some());
    }

    /// Feed `n` windows of samples at `rtt` with `inflight` requests in flight, on a clock
    /// that advances one window per window.
    fn drive(g: &mut GradientLimit, t: &mut Instant, windows: u32, rtt: Duration, inflight: usize) {
        for _ in 0..windows {
            for _ in 0..WINDOW_SAMPLES {
                *t += WINDOW / WINDOW_SAMPLES;
                g.sample(*t, rtt, inflight);
            }
        }
    }

    #[test]
    fn limit_rises_while_latency_stays_near_the_baseline() {
        let mut g = GradientLimit::new(20, 5, 500, 2.0, Duration::ZERO);
        let mut t = Instant::now();
        let ms = Duration::from_millis(1);
        drive(&mut g, &mut t, 5, ms, 20);
        let before = g.limit();
        assert!(before > 20, "{before}");
        // Latency within the tolerance (1.5 x baseline): still rising, as long as it is used.
        let mut last = before;
        for _ in 0..40 {
            let used = g.limit();
            drive(&mut g, &mut t, 1, ms * 3 / 2, used);
            assert!(g.limit() >= last, "{} < {last}", g.limit());
            last = g.limit();
        }
        assert!(last > before * 2, "{before} -> {last}");
        // It stops at the maximum.
        drive(&mut g, &mut t, 500, ms, 500);
        assert_eq!(g.limit(), 500);
        assert_eq!(g.baseline(), Some(ms));
    }

    #[test]
    fn the_slack_lets_fast_requests_queue_a_little() {
        let ms = Duration::from_millis(1);
        let mut with = GradientLimit::new(20, 5, 500, 2.0, ms * 5);
        let mut without = GradientLimit::new(20, 5, 500, 2.0, Duration::ZERO);
        for g in [&mut with, &mut without] {
            let mut t = Instant::now();
            drive(g, &mut t, 2, ms / 5, 20);
            // 4 ms: 20 x the 0.2 ms baseline, within baseline + 5 ms.
            for _ in 0..20 {
                let used = g.limit();
                drive(g, &mut t, 1, ms * 4, used);
            }
        }
        assert!(with.limit() > 20, "{}", with.limit());
        assert!(without.limit() < 10, "{}", without.limit());
    }

    #[test]
    fn an_idle_instance_does_not_raise_its_limit() {
        let mut g = GradientLimit::new(50, 5, 500, 2.0, Duration::ZERO);
        let mut t = Instant::now();
        drive(&mut g, &mut t, 50, Duration::from_millis(1), 3);
        assert_eq!(g.limit(), 50);
    }

    #[test]
    fn limit_falls_when_latency_rises_and_recovers() {
        let mut g = GradientLimit::new(200, 10, 1000, 2.0, Duration::ZERO);
        let mut t = Instant::now();
        let ms = Duration::from_millis(1);
        drive(&mut g, &mut t, 3, ms, 200);
        let high = g.limit();
        // The database slows down: latency 10 x the baseline (the first window is mixed).
        drive(&mut g, &mut t, 1, ms * 10, high);
        let mut last = g.limit();
        for _ in 0..20 {
            drive(&mut g, &mut t, 1, ms * 10, last);
            assert!(g.limit() <= last, "{} > {last}", g.limit());
            last = g.limit();
        }
        assert!(last < high / 4, "{high} -> {last}");
        drive(&mut g, &mut t, 100, ms * 10, last);
        assert_eq!(g.limit(), 10, "held at the minimum");
        // After the baseline span the slower database is the new no-load latency, and the
        // limit grows again.
        drive(&mut g, &mut t, 300, ms * 10, 10);
        assert_eq!(g.baseline(), Some(ms * 10));
        assert!(g.limit() > 10, "{}", g.limit());
    }

    #[test]
    fn a_slow_burst_cuts_by_at_most_half_per_window() {
        let mut g = GradientLimit::new(100, 1, 1000, 2.0, Duration::ZERO);
        let mut t = Instant::now();
        drive(&mut g, &mut t, 1, Duration::from_millis(1), 100);
        let before = g.limit() as f64;
        drive(&mut g, &mut t, 1, Duration::from_secs(1), 100);
        let after = g.limit() as f64;
        assert!(
            after >= before * (1.0 - 0.5 * SMOOTHING) - 1.0,
            "{before} -> {after}"
        );
        assert!(after < before);
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_wait_is_bounded_and_a_freed_slot_goes_to_the_oldest_waiter() {
        let a = adaptive(2, 2, 2, 5);
        let p1 = a.enter().await.unwrap();
        let _p2 = a.enter().await.unwrap();
        // Full: the next one waits exactly the queue timeout, then is shed.
        let t0 = Instant::now();
        assert_eq!(a.enter().await.err(), Some(Shed::QueueTimeout));
        assert_eq!(t0.elapsed(), Duration::from_millis(5));
        assert_eq!(a.queued(), 0);
        // A slot freed while one waits is handed to it (the in-flight count stays at 2).
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.enter().await.map(|_p| Instant::now()) })
        };
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(a.queued(), 1);
        let freed = Instant::now();
        p1.done();
        let admitted = waiter.await.unwrap().unwrap();
        assert_eq!(admitted, freed);
        assert_eq!(a.inflight(), 1, "the waiter's permit was dropped");
        // No more waiting than the maximum number of waiters (here: the limit's max, 2).
        let _p3 = a.enter().await.unwrap();
        let w: Vec<_> = (0..2)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move { a.enter().await.map(drop) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(a.enter().await.err(), Some(Shed::QueueFull));
        for w in w {
            assert_eq!(w.await.unwrap(), Err(Shed::QueueTimeout));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_timeout_slots_go_to_the_newest_waiter_for_a_while() {
        let a = adaptive(1, 3, 1, 10);
        let p = a.enter().await.unwrap();
        assert_eq!(a.enter().await.err(), Some(Shed::QueueTimeout));
        let wait = |a: &Arc<Admission>| {
            let a = a.clone();
            tokio::spawn(async move { a.enter().await.map(|p| (Instant::now(), p)) })
        };
        let old = wait(&a);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let new = wait(&a);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let freed = Instant::now();
        p.done();
        let (at, held) = new.await.unwrap().expect("the newest is served");
        assert_eq!(at, freed);
        assert_eq!(old.await.unwrap().err(), Some(Shed::QueueTimeout));
        drop(held);
        // Once no wait has run out for LIFO_AFTER_TIMEOUT, first come first served again.
        tokio::time::sleep(LIFO_AFTER_TIMEOUT).await;
        let p = a.enter().await.unwrap();
        let old = wait(&a);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let new = wait(&a);
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(p);
        let (at, held) = old.await.unwrap().expect("the oldest is served");
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(held);
        let (next, _) = new.await.unwrap().expect("then the next");
        assert!(next > at);
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_mode_never_waits() {
        let a = Admission::fixed(1);
        let _p = a.enter().await.unwrap();
        let t0 = Instant::now();
        assert_eq!(a.enter().await.err(), Some(Shed::InFlightCap));
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_follows_latency_through_permits() {
        // Requests whose latency is controlled by the (paused) clock: 1 ms each, then 20 ms.
        let a = adaptive(4, 400, 40, 5);
        async fn round(a: &Arc<Admission>, n: usize, each: Duration) {
            let mut permits = Vec::new();
            for _ in 0..n {
                permits.push(a.enter().await.unwrap());
            }
            tokio::time::sleep(each).await;
            for p in permits {
                p.done();
            }
        }
        for _ in 0..200 {
            let n = a.limit();
            round(&a, n, Duration::from_millis(1)).await;
        }
        let high = a.limit();
        assert!(high > 40, "{high}");
        for _ in 0..200 {
            let n = a.limit();
            round(&a, n, Duration::from_millis(20)).await;
        }
        assert!(a.limit() < high / 4, "{high} -> {}", a.limit());
    }
}
