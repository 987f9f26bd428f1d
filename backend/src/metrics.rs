//! The backend's Prometheus metrics, in one place.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    /// By route (a fixed name, never the raw path), method and status code.
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub inflight: IntGauge,
    /// Requests refused before any work, by reason (in_flight_cap, queue_timeout, queue_full).
    pub shed: IntCounterVec,
    /// Admission: the current limit, the no-load latency baseline, requests waiting for a
    /// slot and how long they waited.
    pub admission_limit: IntGauge,
    pub admission_baseline: prometheus::Gauge,
    pub admission_queued: IntGauge,
    pub admission_queue_wait: prometheus::Histogram,
    /// Database pool connections by state (used, idle).
    pub db_pool: IntGaugeVec,
    /// Rate-limit decisions by the limit that decided (tier:free, endpoint:llm, anonymous)
    /// and result (allowed, limited).
    pub ratelimit: IntCounterVec,
    /// 1 while Redis is unreachable and limits fall back to this instance.
    pub ratelimit_degraded: IntGauge,
    pub ratelimit_redis_errors: prometheus::IntCounter,
    /// Vendor pipeline: calls per stage and result (admitted, rejected, ok).
    pub vendor_stage: IntCounterVec,
    /// Calls waiting for admission (stages 1-4), and calls in flight to the vendor.
    pub vendor_waiting: IntGauge,
    pub vendor_inflight: IntGauge,
    pub vendor_retries: prometheus::IntCounter,
    pub vendor_budget_exhausted: prometheus::IntCounter,
    /// 0 closed, 1 open, 2 half-open.
    pub vendor_circuit: IntGauge,
    /// 1 while the vendor limiter uses this instance's share because Redis is unreachable.
    pub vendor_limiter_degraded: IntGauge,
    pub vendor_latency: prometheus::Histogram,
    /// Vendor 429s: calls the vendor counted over its contract.
    pub vendor_contract_rejections: prometheus::IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "backend_requests_total",
                "Requests by route, method and status.",
            ),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "backend_request_duration_seconds",
                "Request latency by route, in seconds.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["route"],
        )
        .expect("valid metric");
        let inflight = IntGauge::new("backend_inflight_requests", "Requests being served now.")
            .expect("valid metric");
        let shed = IntCounterVec::new(
            Opts::new(
                "backend_shed_total",
                "Requests refused with 503 before any work, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let admission_limit = IntGauge::new(
            "backend_admission_limit",
            "Current admission limit on requests in flight (fixed mode: MAX_IN_FLIGHT).",
        )
        .expect("valid metric");
        let admission_baseline = prometheus::Gauge::new(
            "backend_admission_baseline_seconds",
            "Adaptive admission: the no-load latency baseline (fastest request of the last 10 s).",
        )
        .expect("valid metric");
        let admission_queued = IntGauge::new(
            "backend_admission_queued",
            "Requests waiting for an admission slot now.",
        )
        .expect("valid metric");
        let admission_queue_wait = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "backend_admission_queue_seconds",
                "Time requests that had to wait spent waiting for an admission slot (admitted or shed).",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]),
        )
        .expect("valid metric");
        let db_pool = IntGaugeVec::new(
            Opts::new(
                "backend_db_pool_connections",
                "Database pool connections by state.",
            ),
            &["state"],
        )
        .expect("valid metric");
        let ratelimit = IntCounterVec::new(
            Opts::new(
                "backend_ratelimit_decisions_total",
                "Per-user rate-limit decisions, by limit and result.",
            ),
            &["limit", "result"],
        )
        .expect("valid metric");
        let ratelimit_degraded = IntGauge::new(
            "backend_ratelimit_degraded",
            "1 while Redis is unreachable and limits are kept per instance.",
        )
        .expect("valid metric");
        let ratelimit_redis_errors = prometheus::IntCounter::new(
            "backend_ratelimit_redis_errors_total",
            "Redis rate-limit calls that failed or timed out.",
        )
        .expect("valid metric");
        let vendor_stage = IntCounterVec::new(
            Opts::new(
                "backend_vendor_stage_total",
                "Vendor calls by pipeline stage (circuit, local_limiter, semaphore, global_limiter, call, vendor_contract) and result.",
            ),
            &["stage", "result"],
        )
        .expect("valid metric");
        let vendor_waiting = IntGauge::new(
            "backend_vendor_waiting",
            "Vendor calls waiting for admission.",
        )
        .expect("valid metric");
        let vendor_inflight = IntGauge::new("backend_vendor_inflight", "Vendor calls in flight.")
            .expect("valid metric");
        let vendor_retries =
            prometheus::IntCounter::new("backend_vendor_retries_total", "Vendor call retries.")
                .expect("valid metric");
        let vendor_budget_exhausted = prometheus::IntCounter::new(
            "backend_vendor_retry_budget_exhausted_total",
            "Retries refused because the retry budget was used up.",
        )
        .expect("valid metric");
        let vendor_circuit = IntGauge::new(
            "backend_vendor_circuit_state",
            "Vendor circuit breaker: 0 closed, 1 open, 2 half-open.",
        )
        .expect("valid metric");
        let vendor_limiter_degraded = IntGauge::new(
            "backend_vendor_limiter_degraded",
            "1 while the vendor limiter uses this instance's share (Redis unreachable).",
        )
        .expect("valid metric");
        let vendor_latency = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "backend_vendor_latency_seconds",
                "Vendor call latency per attempt.",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        let vendor_contract_rejections = prometheus::IntCounter::new(
            "backend_vendor_contract_rejections_total",
            "Calls the vendor refused with 429 (over its contract): violations seen from here.",
        )
        .expect("valid metric");
        for c in [
            Box::new(vendor_stage.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(vendor_waiting.clone()),
            Box::new(vendor_inflight.clone()),
            Box::new(vendor_retries.clone()),
            Box::new(vendor_budget_exhausted.clone()),
            Box::new(vendor_circuit.clone()),
            Box::new(vendor_limiter_degraded.clone()),
            Box::new(vendor_latency.clone()),
            Box::new(vendor_contract_rejections.clone()),
            Box::new(ratelimit.clone()),
            Box::new(ratelimit_degraded.clone()),
            Box::new(ratelimit_redis_errors.clone()),
            Box::new(requests.clone()),
            Box::new(duration.clone()),
            Box::new(inflight.clone()),
            Box::new(shed.clone()),
            Box::new(admission_limit.clone()),
            Box::new(admission_baseline.clone()),
            Box::new(admission_queued.clone()),
            Box::new(admission_queue_wait.clone()),
            Box::new(db_pool.clone()),
        ] {
            registry.register(c).expect("registered once");
        }
        Metrics {
            registry,
            requests,
            duration,
            inflight,
            shed,
            admission_limit,
            admission_baseline,
            admission_queued,
            admission_queue_wait,
            db_pool,
            ratelimit,
            ratelimit_degraded,
            ratelimit_redis_errors,
            vendor_stage,
            vendor_waiting,
            vendor_inflight,
            vendor_retries,
            vendor_budget_exhausted,
            vendor_circuit,
            vendor_limiter_degraded,
            vendor_latency,
            vendor_contract_rejections,
        }
    }

    /// The handles the admission control updates.
    pub fn admission(&self) -> crate::admission::AdmissionMetrics {
        crate::admission::AdmissionMetrics {
            limit: self.admission_limit.clone(),
            baseline: self.admission_baseline.clone(),
            queued: self.admission_queued.clone(),
            queue_wait: self.admission_queue_wait.clone(),
        }
    }

    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to a Vec cannot fail");
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
