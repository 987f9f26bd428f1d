//! The request lifecycle: `impl ProxyHttp`, a table of contents that delegates each phase.
//!
//! | phase                      | what happens here                                        |
//! |----------------------------|----------------------------------------------------------|
//! | `request_filter`           | client identity, request id                              |
//! | `upstream_peer`            | pick a healthy backend not tried yet ([`Upstreams`])     |
//! | `upstream_request_filter`  | forwarding headers (`X-Forwarded-*`, `X-Request-Id`)     |
//! | `fail_to_connect`          | passive failure: count it, retry on another backend      |
//! | `error_while_proxy`        | after sending: retry only idempotent, only if configured |
//! | `response_filter`          | echo `X-Request-Id`                                      |
//! | `fail_to_proxy`            | every error the gateway answers itself, as JSON          |
//! | `logging`                  | metrics and the access log                               |

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::lb::Backend;
use pingora::prelude::{HttpPeer, RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::Peer;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::config::GatewayConfig;
use crate::metrics::{class_index, Metrics, Rejection};
use crate::responses;
use crate::upstreams::{state_of, Upstreams};

/// Shared by every request: the config snapshot, the pool, the metrics.
pub struct Gateway {
    /// The config in force; replaced as a whole by reload, read without locks.
    pub config: Arc<ArcSwap<GatewayConfig>>,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<Metrics>,
    /// Process-unique prefix of generated request ids.
    request_id_prefix: u32,
    request_seq: AtomicU64,
}

impl Gateway {
    pub fn new(
        config: Arc<ArcSwap<GatewayConfig>>,
        upstreams: Arc<Upstreams>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
            .unwrap_or(0)
            ^ std::process::id().rotate_left(16);
        Gateway {
            config,
            upstreams,
            metrics,
            request_id_prefix: seed,
            request_seq: AtomicU64::new(0),
        }
    }

    fn new_request_id(&self) -> String {
        let n = self.request_seq.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}{:012x}", self.request_id_prefix, n)
    }
}

/// Counts a request as in flight for exactly as long as its context lives.
pub struct InflightGuard(prometheus::IntGauge);

impl InflightGuard {
    fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        InflightGuard(gauge.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Per-request state shared across the phases.
pub struct RequestCtx {
    started: Instant,
    /// The client as the gateway believes it (the socket peer).
    client_ip: Option<IpAddr>,
    /// `X-Request-Id`: the client's, or generated.
    request_id: String,
    /// The backend this request is (or was last) sent to.
    backend: Option<Backend>,
    /// Backends that already failed this request, skipped on retry.
    tried: Vec<SocketAddr>,
    /// Why the gateway answered itself, when it did.
    rejection: Option<Rejection>,
    _inflight: InflightGuard,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            started: Instant::now(),
            client_ip: None,
            request_id: String::new(),
            backend: None,
            tried: Vec::new(),
            rejection: None,
            _inflight: InflightGuard::new(&self.metrics.inflight_requests),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.request_id = match session.req_header().headers.get("x-request-id") {
            Some(v) if !v.is_empty() && v.len() <= 200 => {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            }
            _ => self.new_request_id(),
        };
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(backend) = self.upstreams.select(&ctx.tried) else {
            ctx.rejection = Some(Rejection::NoHealthyBackend);
            return Error::e_explain(ErrorType::HTTPStatus(503), "no healthy backend");
        };
        let addr = *backend.as_inet().expect("backends are inet addresses");
        let cfg = self.config.load();
        let mut peer = HttpPeer::new(addr, false, String::new());
        let t = cfg.timeouts;
        peer.options.connection_timeout = Some(t.connect);
        peer.options.total_connection_timeout = Some(t.connect);
        peer.options.read_timeout = Some(t.read);
        peer.options.write_timeout = Some(t.write);
        peer.options.idle_timeout = Some(t.idle);
        ctx.backend = Some(backend);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(ip) = ctx.client_ip {
            let ip = ip.to_string();
            let xff = match session.req_header().headers.get("x-forwarded-for") {
                Some(prev) if !prev.is_empty() => {
                    format!("{}, {ip}", String::from_utf8_lossy(prev.as_bytes()))
                }
                _ => ip.clone(),
            };
            req.insert_header("X-Forwarded-For", xff)?;
            req.insert_header("X-Real-IP", ip)?;
        }
        req.insert_header("X-Forwarded-Proto", "http")?;
        req.insert_header("X-Request-Id", ctx.request_id.as_str())?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        resp.insert_header("X-Request-Id", ctx.request_id.as_str())?;
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(b) = ctx.backend.as_ref() {
            state_of(b).metrics.connect_failures.inc();
        }
        if let Some(addr) = peer.address().as_inet() {
            ctx.tried.push(*addr);
        }
        // Nothing was sent, so trying another backend is safe for every method.
        let retry = ctx.tried.len() <= self.config.load().connect_retries;
        if retry {
            self.metrics.retries_connect.inc();
        }
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        let idempotent = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        if !idempotent {
            e.set_retry(false);
        } else if self.config.load().retry_idempotent {
            if let Some(addr) = peer.address().as_inet() {
                ctx.tried.push(*addr);
            }
            e.set_retry(true);
        } else {
            // A stale pooled connection may be retried once; pingora's default.
            e.retry.decide_reuse(client_reused);
        }
        if e.retry() {
            self.metrics.retries_after_send.inc();
        }
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let (code, message): (u16, &str) = match e.etype() {
            ErrorType::HTTPStatus(503) if ctx.rejection == Some(Rejection::NoHealthyBackend) => {
                (503, "no healthy backend is available; retry later")
            }
            ErrorType::HTTPStatus(code) => (*code, "request refused"),
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                match e.esource() {
                    ErrorSource::Downstream => (408, "client timed out"),
                    _ => (504, "the backend did not answer in time"),
                }
            }
            _ => match e.esource() {
                ErrorSource::Upstream => (502, "the backend failed to answer"),
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => {
                        (0, "")
                    }
                    _ => (400, "malformed request"),
                },
                _ => (500, "internal gateway error"),
            },
        };
        if let Some(r) = ctx.rejection {
            self.metrics.reject(r);
        }
        if code > 0 {
            let retry_after = matches!(code, 429 | 503).then_some(1);
            let _ = responses::send_json_error(
                session,
                code,
                message,
                retry_after,
                Some(&ctx.request_id),
            )
            .await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let elapsed = ctx.started.elapsed();
        self.metrics.request_duration.observe(elapsed.as_secs_f64());
        let backend_label = match (&ctx.backend, ctx.rejection) {
            (Some(b), None) => {
                if status > 0 {
                    state_of(b).metrics.requests[class_index(status)].inc();
                }
                state_of(b).label.as_str()
            }
            _ => {
                if status > 0 {
                    self.metrics.no_backend_response(status);
                }
                "-"
            }
        };
        if self.config.load().access_log {
            let req = session.req_header();
            log::info!(
                target: "access",
                "{} \"{} {}\" {} backend={} {:.3}ms id={}{}",
                ctx.client_ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                req.method,
                req.uri,
                status,
                backend_label,
                elapsed.as_secs_f64() * 1000.0,
                ctx.request_id,
                e.map(|e| format!(" error=\"{e}\"")).unwrap_or_default(),
            );
        }
    }
}
