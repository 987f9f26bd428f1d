//! What every finished request leaves behind: its metrics and its access-log line.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::Rejection;
use crate::config::Route;
use crate::metrics::{class_index, Metrics};
use crate::upstream::BackendState;

/// Which engine served a request (`gateway_http1_path_requests_total{path}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The gateway's own HTTP/1 engine ([`crate::h1`]).
    Own,
    /// pingora's HTTP/1 session ([`crate::pingora_h1`]).
    Pingora,
}

/// A finished request, as every engine records it.
pub struct Finished<'a> {
    pub started: Instant,
    /// The status the client got; 0 when none was written (or it was cut).
    pub status: u16,
    /// The backend that served it (or last failed it).
    pub backend: Option<Arc<BackendState>>,
    pub rejection: Option<Rejection>,
    pub client_ip: Option<IpAddr>,
    pub method: &'a [u8],
    pub target: &'a [u8],
    pub request_id: &'a [u8],
    pub error: Option<&'a str>,
    pub engine: Engine,
    /// The route it took, once known.
    pub route: Option<&'a Route>,
}

/// Counts a request as in flight for exactly as long as it lives.
pub struct InflightGuard(prometheus::IntGauge);

impl InflightGuard {
    pub fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        InflightGuard(gauge.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Appends `raw` to `out` with every byte a client could use to forge or split a log line
/// escaped: quotes, backslashes, control bytes and anything outside visible ASCII as `\xHH`.
pub fn escape_into(out: &mut String, raw: &[u8]) {
    for &b in raw {
        if b.is_ascii_graphic() && b != b'"' && b != b'\\' {
            out.push(b as char);
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
}

/// Metrics and the access log for a finished request.
pub fn record(metrics: &Metrics, access_log: bool, done: &Finished) {
    let status = done.status;
    let elapsed = done.started.elapsed();
    metrics.request_duration.observe(elapsed.as_secs_f64());
    metrics.http1_path[usize::from(done.engine == Engine::Pingora)].inc();
    let backend_label = match (&done.backend, done.rejection) {
        (Some(b), None) => {
            if status > 0 {
                b.metrics.requests[class_index(status)].inc();
            }
            b.label.as_str()
        }
        _ => {
            if status > 0 {
                metrics.no_backend_response(status);
            }
            "-"
        }
    };
    if let Some(r) = done.route.filter(|r| r.index != usize::MAX && status > 0) {
        metrics.route_request(&r.series, &r.name, r.pool_name(), status);
    }
    if access_log {
        log::info!(target: "access", "{}", access_line(done, backend_label, elapsed.as_secs_f64() * 1000.0));
    }
}

/// `client "METHOD target" status backend=.. 1.234ms id=..[ error=".."]`, every
/// client-controlled field escaped.
fn access_line(done: &Finished, backend: &str, ms: f64) -> String {
    let mut line = String::with_capacity(128);
    match done.client_ip {
        Some(ip) => {
            let _ = write!(line, "{ip}");
        }
        None => line.push('-'),
    }
    line.push_str(" \"");
    escape_into(&mut line, done.method);
    line.push(' ');
    escape_into(&mut line, done.target);
    let _ = write!(line, "\" {} backend={backend} {ms:.3}ms id=", done.status);
    escape_into(&mut line, done.request_id);
    if let Some(r) = done.route {
        let _ = write!(line, " route={} pool={}", r.name, r.pool_name());
    }
    if let Some(e) = done.error {
        line.push_str(" error=\"");
        escape_into(&mut line, e.as_bytes());
        line.push('"');
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20, case 6: a client cannot add fields to its access-log line.
    #[test]
    fn client_fields_cannot_forge_log_fields() {
        let done = Finished {
            started: Instant::now(),
            status: 404,
            backend: None,
            rejection: None,
            client_ip: Some("192.0.2.1".parse().unwrap()),
            method: b"GET",
            target: b"/a\" status=200 evil=\"1\n127.0.0.1 \"GET /",
            request_id: b"x\" status=200 evil=\"1",
            error: None,
            engine: Engine::Own,
            route: None,
        };
        let line = access_line(&done, "-", 1.0);
        assert_eq!(line.matches('"').count(), 2, "{line}");
        assert!(!line.contains('\n'));
        assert!(line.contains(" 404 backend=- "), "{line}");
        assert!(line.contains("id=x\\x22\\x20status=200"), "{line}");
    }
}
