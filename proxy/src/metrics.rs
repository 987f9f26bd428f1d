//! Every Prometheus metric the gateway exports, in one place, and the `/metrics` endpoint.
//!
//! Label lookups (`with_label_values`) hash and lock, so the request path never does them:
//! handles for each backend are resolved once when the backend joins the pool
//! ([`BackendMetrics`]) and the fixed-label ones are resolved here at start-up.

use std::sync::Arc;

pub use crate::policy::Rejection;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The gateway's metrics registry and pre-resolved handles.
pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    /// `gateway_requests_total` for requests that never reached a backend, by status class.
    no_backend_requests: [IntCounter; 5],
    pub request_duration: Histogram,
    backend_up: IntGaugeVec,
    pub downstream_connections: IntGauge,
    /// Distinct client IPs holding open connections.
    pub downstream_client_ips: IntGauge,
    pub inflight_requests: IntGauge,
    /// Request body bytes buffered right now (`buffers.total_body_bytes` bounds it).
    pub buffered_body_bytes: IntGauge,
    connect_failures: IntCounterVec,
    ejections: IntCounterVec,
    pub retries_connect: IntCounter,
    pub retries_after_send: IntCounter,
    rejections: Vec<IntCounter>,
    pub reloads_ok: IntCounter,
    pub reloads_error: IntCounter,
    /// Unix time of the last config load that took effect.
    pub config_loaded_at: prometheus::Gauge,
    /// `gateway_config_info{hash}`: 1 for the config in force.
    config_info: IntGaugeVec,
    pub dns_ok: IntCounter,
    pub dns_errors: IntCounter,
    /// Requests by the HTTP/1 path that served them: [fast, pingora].
    pub http1_path: [IntCounter; 2],
    /// `gateway_route_requests_total{route,pool,code}`: requests that matched a route of
    /// `routes:` (none without routes).
    route_requests: IntCounterVec,
    /// 1 while `scope: cluster` limits run on this replica's share (Redis unreachable).
    pub cluster_degraded: IntGauge,
    /// Live gateway replicas counted by Redis heartbeats (or `cluster.replicas`).
    pub cluster_replicas: IntGauge,
    /// Reconciliations with Redis: [ok, error].
    pub cluster_syncs: [IntCounter; 2],
    /// Tokens Redis leased to this replica.
    pub cluster_leased: IntCounter,
    /// `gateway_tls_certificate_expiry_seconds{name}`: Unix time each certificate in force
    /// expires.
    tls_expiry: IntGaugeVec,
}

/// A route's `gateway_route_requests_total` handles by status class, resolved once (a route
/// is part of the config: a reload's routes resolve theirs again, to the same series).
#[derive(Default)]
pub struct RouteSeries(std::sync::OnceLock<[IntCounter; 5]>);

impl Clone for RouteSeries {
    fn clone(&self) -> Self {
        RouteSeries::default()
    }
}

impl PartialEq for RouteSeries {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for RouteSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteSeries")
    }
}

/// Handles for one backend's series, resolved when it joins the pool.
pub struct BackendMetrics {
    pub requests: [IntCounter; 5],
    pub up: IntGauge,
    pub connect_failures: IntCounter,
    /// Passive outlier ejections of this backend.
    pub ejections: IntCounter,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Index into a `[_; 5]` of status classes.
pub fn class_index(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "gateway_requests_total",
                "Requests answered, by status class and backend (\"none\" when no backend served it).",
            ),
            &["code", "backend"],
        )
        .expect("valid metric");
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_request_duration_seconds",
                "Time from request header to the end of the response, in seconds.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        let backend_up = IntGaugeVec::new(
            Opts::new(
                "gateway_backend_up",
                "1 when the backend passes health checks and receives traffic, else 0.",
            ),
            &["pool", "backend"],
        )
        .expect("valid metric");
        let downstream_connections = IntGauge::new(
            "gateway_downstream_connections",
            "Open client connections (idle keep-alive ones included).",
        )
        .expect("valid metric");
        let downstream_client_ips = IntGauge::new(
            "gateway_downstream_client_ips",
            "Distinct client IPs holding open connections (entries of the per-IP cap table).",
        )
        .expect("valid metric");
        let inflight_requests = IntGauge::new(
            "gateway_inflight_requests",
            "Requests being processed right now.",
        )
        .expect("valid metric");
        let buffered_body_bytes = IntGauge::new(
            "gateway_buffered_body_bytes",
            "Request body bytes buffered right now, all connections together.",
        )
        .expect("valid metric");
        let ejections = IntCounterVec::new(
            Opts::new(
                "gateway_backend_ejections_total",
                "Passive outlier ejections (upstream.outlier): N failures in a row.",
            ),
            &["pool", "backend"],
        )
        .expect("valid metric");
        let connect_failures = IntCounterVec::new(
            Opts::new(
                "gateway_upstream_connect_failures_total",
                "Failed connection attempts to a backend (refused, timeout).",
            ),
            &["backend"],
        )
        .expect("valid metric");
        let retries = IntCounterVec::new(
            Opts::new(
                "gateway_upstream_retries_total",
                "Requests retried on another backend, by why.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let rejections_vec = IntCounterVec::new(
            Opts::new(
                "gateway_rejections_total",
                "Requests the gateway answered itself with an error, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "gateway_config_reloads_total",
                "Config reloads (SIGHUP or file change), by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let config_loaded_at = prometheus::Gauge::new(
            "gateway_config_last_reload_success_timestamp_seconds",
            "Unix time when the config in force was loaded.",
        )
        .expect("valid metric");
        let config_info = IntGaugeVec::new(
            Opts::new(
                "gateway_config_info",
                "1 for the config in force, labelled with a hash of its file.",
            ),
            &["hash"],
        )
        .expect("valid metric");
        let dns = IntCounterVec::new(
            Opts::new(
                "gateway_dns_resolutions_total",
                "Backend name resolutions, by result (errors keep the last known addresses).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let http1_path = IntCounterVec::new(
            Opts::new(
                "gateway_http1_path_requests_total",
                "Requests by the path that served them: \"fast\" (the gateway's own HTTP/1 path for plain requests) or \"pingora\".",
            ),
            &["path"],
        )
        .expect("valid metric");
        let route_requests = IntCounterVec::new(
            Opts::new(
                "gateway_route_requests_total",
                "Requests that matched a route of `routes:`, by route, its pool (\"-\" for a fixed answer) and status class.",
            ),
            &["route", "pool", "code"],
        )
        .expect("valid metric");
        let tls_expiry = IntGaugeVec::new(
            Opts::new(
                "gateway_tls_certificate_expiry_seconds",
                "Unix time each certificate in force expires, by its first name.",
            ),
            &["name"],
        )
        .expect("valid metric");
        let cluster_degraded = IntGauge::new(
            "gateway_cluster_limits_degraded",
            "1 while scope: cluster limits cannot reach Redis and admit this replica's share (limit / replicas), else 0.",
        )
        .expect("valid metric");
        let cluster_replicas = IntGauge::new(
            "gateway_cluster_replicas",
            "Gateway replicas counted live by Redis heartbeats (cluster.replicas until counted).",
        )
        .expect("valid metric");
        let cluster_syncs = IntCounterVec::new(
            Opts::new(
                "gateway_cluster_syncs_total",
                "Reconciliations of scope: cluster limits with Redis, by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let cluster_leased = IntCounter::new(
            "gateway_cluster_leased_tokens_total",
            "Requests' worth of tokens Redis leased to this replica for scope: cluster limits.",
        )
        .expect("valid metric");
        for c in [
            Box::new(route_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tls_expiry.clone()),
            Box::new(reloads.clone()),
            Box::new(cluster_degraded.clone()),
            Box::new(cluster_replicas.clone()),
            Box::new(cluster_syncs.clone()),
            Box::new(cluster_leased.clone()),
            Box::new(http1_path.clone()),
            Box::new(config_loaded_at.clone()),
            Box::new(config_info.clone()),
            Box::new(dns.clone()),
            Box::new(requests.clone()),
            Box::new(request_duration.clone()),
            Box::new(backend_up.clone()),
            Box::new(downstream_connections.clone()),
            Box::new(downstream_client_ips.clone()),
            Box::new(inflight_requests.clone()),
            Box::new(buffered_body_bytes.clone()),
            Box::new(connect_failures.clone()),
            Box::new(ejections.clone()),
            Box::new(retries.clone()),
            Box::new(rejections_vec.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        let no_backend_requests = CLASSES.map(|c| requests.with_label_values(&[c, "none"]));
        let rejections = Rejection::ALL
            .iter()
            .map(|r| rejections_vec.with_label_values(&[r.label()]))
            .collect();
        Arc::new(Metrics {
            registry,
            requests,
            no_backend_requests,
            request_duration,
            backend_up,
            downstream_connections,
            downstream_client_ips,
            inflight_requests,
            buffered_body_bytes,
            connect_failures,
            ejections,
            retries_connect: retries.with_label_values(&["connect_failure"]),
            retries_after_send: retries.with_label_values(&["error_after_send"]),
            rejections,
            reloads_ok: reloads.with_label_values(&["success"]),
            reloads_error: reloads.with_label_values(&["error"]),
            config_loaded_at,
            config_info,
            dns_ok: dns.with_label_values(&["success"]),
            dns_errors: dns.with_label_values(&["error"]),
            http1_path: ["fast", "pingora"].map(|p| http1_path.with_label_values(&[p])),
            route_requests,
            cluster_degraded,
            cluster_replicas,
            cluster_syncs: ["ok", "error"].map(|r| cluster_syncs.with_label_values(&[r])),
            cluster_leased,
            tls_expiry,
        })
    }

    /// Resolve the series of one backend (called when it joins the pool, not per request).
    pub fn backend(&self, pool: &str, label: &str) -> BackendMetrics {
        BackendMetrics {
            requests: CLASSES.map(|c| self.requests.with_label_values(&[c, label])),
            up: self.backend_up.with_label_values(&[pool, label]),
            connect_failures: self.connect_failures.with_label_values(&[label]),
            ejections: self.ejections.with_label_values(&[pool, label]),
        }
    }

    /// Count a request a route of `routes:` took (its series resolved on its first request).
    pub fn route_request(&self, series: &RouteSeries, route: &str, pool: &str, status: u16) {
        series.0.get_or_init(|| {
            CLASSES.map(|c| self.route_requests.with_label_values(&[route, pool, c]))
        })[class_index(status)]
        .inc();
    }

    /// Drop the series of a backend that left its pool.
    pub fn forget_backend(&self, pool: &str, label: &str) {
        let _ = self.backend_up.remove_label_values(&[pool, label]);
    }

    /// The expiry of every certificate of the config in force (replacing the previous set).
    pub fn tls_certificates(&self, config: &crate::config::GatewayConfig) {
        self.tls_expiry.reset();
        for cert in config.tls.iter().flat_map(|l| l.certs.certs.iter()) {
            self.tls_expiry
                .with_label_values(&[cert.label()])
                .set(cert.not_after);
        }
    }

    /// Record the config now in force.
    pub fn config_applied(&self, hash: &str) {
        self.config_info.reset();
        self.config_info.with_label_values(&[hash]).set(1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.config_loaded_at.set(now);
    }

    /// Count a response that no backend served.
    pub fn no_backend_response(&self, status: u16) {
        self.no_backend_requests[class_index(status)].inc();
    }

    pub fn reject(&self, reason: Rejection) {
        self.rejections[reason as usize].inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to a Vec cannot fail");
        buf
    }
}

/// The `/metrics` HTTP endpoint, on its own listener.
pub struct MetricsEndpoint {
    pub metrics: Arc<Metrics>,
    /// Refreshes gauges that are derived from other state (backend health) before a scrape.
    pub on_scrape: Box<dyn Fn() + Send + Sync>,
    /// The gateway's own readiness: the config is loaded (it is, once this serves) and at
    /// least one backend is up.
    pub ready: Box<dyn Fn() -> bool + Send + Sync>,
}

#[async_trait]
impl ServeHttp for MetricsEndpoint {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path();
        let (status, ctype, body) = if path == "/metrics" {
            (self.on_scrape)();
            (200, "text/plain; version=0.0.4", self.metrics.render())
        } else if path == "/ready" {
            if (self.ready)() {
                (200, "application/json", br#"{"status":"ready"}"#.to_vec())
            } else {
                (
                    503,
                    "application/json",
                    br#"{"status":"no backend is up"}"#.to_vec(),
                )
            }
        } else {
            (
                404,
                "application/json",
                br#"{"error":"not found: metrics are at /metrics, readiness at /ready"}"#.to_vec(),
            )
        };
        Response::builder()
            .status(status)
            .header("Content-Type", ctype)
            .header("Content-Length", body.len())
            .body(body)
            .expect("valid response")
    }
}
