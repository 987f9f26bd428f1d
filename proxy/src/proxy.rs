//! The request lifecycle: `impl ProxyHttp`, a table of contents that delegates each phase.
//!
//! | phase                      | what happens here                                        |
//! |----------------------------|----------------------------------------------------------|
//! | `request_filter`           | client identity, request id, size caps, rate limits      |
//! | `request_body_filter`      | body cap for bodies without Content-Length              |
//! | `upstream_peer`            | pick a healthy backend not tried yet, take its slot      |
//! | `upstream_request_filter`  | forwarding headers (`X-Forwarded-*`, `X-Request-Id`)     |
//! | `fail_to_connect`          | passive failure: count it, retry on another backend      |
//! | `error_while_proxy`        | after sending: retry only idempotent, only if configured |
//! | `response_filter`          | echo `X-Request-Id`                                      |
//! | `fail_to_proxy`            | every error the gateway answers itself, as JSON          |
//! | `logging`                  | metrics and the access log                               |

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::lb::Backend;
use pingora::modules::http::HttpModules;
use pingora::prelude::{HttpPeer, RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::Peer;
use pingora::{Error, ErrorSource, ErrorType, Result};

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue};
use tokio::sync::OwnedSemaphorePermit;

use crate::limits::client::{client_ip, limit_key};
use crate::limits::rate::{Decision, Gcra};
use crate::limits::Snapshot;
use crate::metrics::{class_index, Metrics, Rejection};
use crate::responses;
use crate::upstreams::{state_of, BackendState, Upstreams};

/// Header names looked up on every request, parsed once (a `&str` key is parsed per lookup).
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Shared by every request: the config snapshot, the pool, the metrics. Cloned for the fast
/// path ([`crate::fast`]), which shares all of it, the request-id sequence included.
#[derive(Clone)]
pub struct Gateway {
    /// The config in force and its limiter state; replaced as a whole by reload, read
    /// without locks.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub upstreams: Arc<Upstreams>,
    pub metrics: Arc<Metrics>,
    /// Process-unique prefix of generated request ids.
    request_id_prefix: u32,
    request_seq: Arc<AtomicU64>,
}

impl Gateway {
    pub fn new(
        snapshot: Arc<ArcSwap<Snapshot>>,
        upstreams: Arc<Upstreams>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
            .unwrap_or(0)
            ^ std::process::id().rotate_left(16);
        Gateway {
            snapshot,
            upstreams,
            metrics,
            request_id_prefix: seed,
            request_seq: Arc::new(AtomicU64::new(0)),
        }
    }

    /// 20 hex digits: the process prefix, then a sequence number. Written without the
    /// formatting machinery: this runs for every request that brings no id.
    fn new_request_id(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.new_request_id_bytes())
            .expect("hex digits are a valid header value")
    }

    pub(crate) fn new_request_id_bytes(&self) -> [u8; 20] {
        let n = self.request_seq.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 20];
        hex_into(&mut id[..8], u64::from(self.request_id_prefix));
        hex_into(&mut id[8..], n);
        id
    }

    /// Answer the request with the rejection's status and JSON body, count it, and end it.
    async fn reject(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        reason: Rejection,
        retry_after: Option<u64>,
        extra: &[(&'static str, String)],
    ) -> Result<bool> {
        ctx.rejection = Some(reason);
        self.metrics.reject(reason);
        let _ = responses::send_json_error(
            session,
            reason.status(),
            reason.message(),
            retry_after,
            Some(&ctx.request_id),
            extra,
        )
        .await;
        Ok(true)
    }
}

/// `out.len()` lowercase hex digits of `n` (its low bits), most significant first.
fn hex_into(out: &mut [u8], mut n: u64) {
    for b in out.iter_mut().rev() {
        *b = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// The text form of an IP address as a header value. IPv4 (nearly every request) is written
/// by hand: `Display` through the formatting machinery showed in profiles.
pub(crate) fn ip_header_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string()).expect("an address is a valid header value");
    };
    let mut buf = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        let digits = [octet / 100, octet / 10 % 10, octet % 10];
        let skip = if octet >= 100 {
            0
        } else if octet >= 10 {
            1
        } else {
            2
        };
        for d in &digits[skip..] {
            buf[len] = b'0' + d;
            len += 1;
        }
    }
    HeaderValue::from_bytes(&buf[..len]).expect("digits and dots are a valid header value")
}

/// Request-head size: the request line plus every header line.
fn head_bytes(req: &RequestHeader) -> usize {
    let target = req.uri.path_and_query().map_or(1, |p| p.as_str().len());
    head_size(
        req.method.as_str().len(),
        target,
        req.headers.iter().map(|(k, v)| (k.as_str().len(), v.len())),
    )
}

/// The measure of `buffers.max_header_bytes`, on both request paths: the request line and
/// every header line, from their lengths (method, target, then name and value per header).
pub(crate) fn head_size(
    method: usize,
    target: usize,
    headers: impl Iterator<Item = (usize, usize)>,
) -> usize {
    method + target + 12 + headers.map(|(name, value)| name + value + 4).sum::<usize>()
}

/// A client's `X-Request-Id` is kept when it is neither empty nor over 200 bytes; otherwise
/// the gateway makes one (both request paths).
pub(crate) fn usable_request_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= 200
}

/// Framing nginx refuses: Transfer-Encoding other than chunked (501), or together with a
/// Content-Length (400; pingora drops the Content-Length per RFC 9112, so look at the raw
/// head). Only called when Transfer-Encoding is present.
fn framing_problem(session: &Session) -> Option<Rejection> {
    let te = session
        .req_header()
        .headers
        .get_all(http::header::TRANSFER_ENCODING);
    let chunked_only = te.iter().all(|v| {
        v.to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"))
    });
    if !chunked_only || te.iter().count() != 1 {
        return Some(Rejection::UnsupportedTransferEncoding);
    }
    if let pingora::protocols::http::ServerSession::H1(h1) = session.as_ref() {
        let raw = h1.get_headers_raw_bytes();
        let has_cl = raw
            .split(|b| *b == b'\n')
            .any(|line| line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:"));
        if has_cl {
            return Some(Rejection::AmbiguousFraming);
        }
    }
    None
}

/// `RateLimit-Policy` and `RateLimit` (IETF draft) for a rejection.
fn rate_headers(gcra: &Gcra, retry_after: u64) -> [(&'static str, String); 2] {
    [
        ("RateLimit-Policy", gcra.policy_header()),
        (
            "RateLimit",
            format!(
                "limit={}, remaining=0, reset={retry_after}",
                gcra.capacity()
            ),
        ),
    ]
}

/// Whole seconds, rounded up, at least 1 (the `Retry-After` of a rejection).
fn ceil_secs(d: Duration) -> u64 {
    (d.as_micros().div_ceil(1_000_000) as u64).max(1)
}

/// A request refused by a rate limit: why, when to retry, and the `RateLimit` headers.
pub(crate) struct Refusal {
    pub reason: Rejection,
    pub retry_after: u64,
    pub headers: [(&'static str, String); 2],
}

/// The rate limits, for both request paths: the client's own first (an abuser is refused
/// without using the shared budget), then this instance's ceiling. Ok: how long to hold the
/// request first (`delay` limits).
pub(crate) fn admit(
    snap: &Snapshot,
    client_ip: Option<IpAddr>,
    path: &str,
) -> std::result::Result<Duration, Refusal> {
    let cfg = &snap.config;
    let refused = |reason, gcra: &Gcra, retry_after| {
        let secs = ceil_secs(retry_after);
        Refusal {
            reason,
            retry_after: secs,
            headers: rate_headers(gcra, secs),
        }
    };
    let mut wait = Duration::ZERO;
    let exempt = client_ip.is_some_and(|ip| cfg.exempt.iter().any(|n| n.contains(ip)));
    if let (Some(ip), false) = (client_ip, exempt) {
        if let Some(limiter) = snap.limits.per_ip_for(path) {
            match limiter.check(limit_key(ip, cfg.ipv6_prefix)) {
                Decision::Allow { wait: w, .. } => wait = wait.max(w),
                Decision::Reject { retry_after } => {
                    return Err(refused(Rejection::RateLimitIp, &limiter.gcra, retry_after));
                }
            }
        }
    }
    if let Some(global) = &snap.limits.global {
        match global.check() {
            Decision::Allow { wait: w, .. } => wait = wait.max(w),
            Decision::Reject { retry_after } => {
                return Err(refused(
                    Rejection::RateLimitGlobal,
                    &global.gcra,
                    retry_after,
                ));
            }
        }
    }
    Ok(wait)
}

/// A finished request, as both request paths record it.
pub(crate) struct Finished<'a> {
    pub started: Instant,
    /// The status the client got; 0 when none was written.
    pub status: u16,
    /// The backend that served it (or last failed it).
    pub backend: Option<Arc<BackendState>>,
    pub rejection: Option<Rejection>,
    pub client_ip: Option<IpAddr>,
    pub method: &'a str,
    pub target: &'a str,
    pub request_id: &'a [u8],
    pub error: Option<&'a str>,
    /// Served by the fast path ([`crate::fast`]) rather than pingora's.
    pub fast: bool,
}

impl Gateway {
    /// Metrics and the access log for a finished request.
    pub(crate) fn record(&self, snap: &Snapshot, done: &Finished) {
        let status = done.status;
        let elapsed = done.started.elapsed();
        self.metrics.request_duration.observe(elapsed.as_secs_f64());
        self.metrics.http1_path[usize::from(!done.fast)].inc();
        let backend_label = match (&done.backend, done.rejection) {
            (Some(b), None) => {
                if status > 0 {
                    b.metrics.requests[class_index(status)].inc();
                }
                b.label.as_str()
            }
            _ => {
                if status > 0 {
                    self.metrics.no_backend_response(status);
                }
                "-"
            }
        };
        if snap.config.access_log {
            log::info!(
                target: "access",
                "{} \"{} {}\" {} backend={} {:.3}ms id={}{}",
                done.client_ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                done.method,
                done.target,
                status,
                backend_label,
                elapsed.as_secs_f64() * 1000.0,
                String::from_utf8_lossy(done.request_id),
                done.error.map(|e| format!(" error=\"{e}\"")).unwrap_or_default(),
            );
        }
    }
}

/// Counts a request as in flight for exactly as long as its context lives.
pub struct InflightGuard(prometheus::IntGauge);

impl InflightGuard {
    pub(crate) fn new(gauge: &prometheus::IntGauge) -> Self {
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
    /// The config this request runs under, from its start to its end, even if a reload
    /// swaps in another meanwhile.
    snap: Arc<Snapshot>,
    started: Instant,
    /// The client as the gateway believes it: the socket peer, or from X-Forwarded-For when
    /// the peer is a trusted proxy.
    client_ip: Option<IpAddr>,
    /// The socket peer: the hop appended to X-Forwarded-For.
    peer_ip: Option<IpAddr>,
    /// `X-Request-Id`: the client's, or generated; a header value, so forwarding and echoing
    /// it copy nothing.
    request_id: HeaderValue,
    /// The backend this request is (or was last) sent to.
    backend: Option<Backend>,
    /// Backends that already failed this request, skipped on retry.
    tried: Vec<SocketAddr>,
    /// Why the gateway answered itself, when it did.
    rejection: Option<Rejection>,
    /// Body bytes seen so far, against `buffers.max_body_bytes`.
    body_bytes: usize,
    /// A body without Content-Length is held here until complete (bounded by the cap), so
    /// an over-cap body never reaches a backend (nginx buffers request bodies the same way).
    held_body: Option<BytesMut>,
    /// When the first body bytes were handed over (`slow_clients.body_min_rate`).
    body_started: Option<Instant>,
    /// The backend slot this request holds (per-backend concurrency cap).
    backend_slot: Option<OwnedSemaphorePermit>,
    _inflight: InflightGuard,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules. pingora's default adds its response-compression module switched
    /// off, which still builds a context and runs its filters for every request; the gateway
    /// passes bodies through as the backend encoded them.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            snap: self.snapshot.load_full(),
            started: Instant::now(),
            client_ip: None,
            peer_ip: None,
            request_id: HeaderValue::from_static(""),
            backend: None,
            tried: Vec::new(),
            rejection: None,
            body_bytes: 0,
            held_body: None,
            body_started: None,
            backend_slot: None,
            _inflight: InflightGuard::new(&self.metrics.inflight_requests),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // A request pipelined behind this one is served after it, in order (as nginx and the
        // fast path do); pingora's default closes the connection and drops it.
        session.set_pipelining_enabled(true);
        let snap = ctx.snap.clone();
        let cfg = &snap.config;
        let req = session.req_header();
        ctx.request_id = match req.headers.get(&X_REQUEST_ID) {
            Some(v) if usable_request_id(v.as_bytes()) => v.clone(),
            _ => self.new_request_id(),
        };
        // Who is asking: the socket peer, or X-Forwarded-For when the peer is trusted.
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.peer_ip = peer;
        ctx.client_ip = peer.map(|p| {
            let xff = req.headers.get(&X_FORWARDED_FOR).map(|v| v.as_bytes());
            client_ip(p, xff, &cfg.trusted_proxies)
        });

        // Size caps, before anything is read or forwarded.
        if req.headers.len() > cfg.max_headers || head_bytes(req) > cfg.max_header_bytes {
            return self
                .reject(session, ctx, Rejection::HeaderTooLarge, None, &[])
                .await;
        }
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        match declared {
            Some(n) if n > cfg.max_body_bytes as u64 => {
                return self
                    .reject(session, ctx, Rejection::BodyTooLarge, None, &[])
                    .await;
            }
            Some(_) => {}
            None if req.headers.contains_key(http::header::TRANSFER_ENCODING) => {
                if let Some(reason) = framing_problem(session) {
                    return self.reject(session, ctx, reason, None, &[]).await;
                }
                ctx.held_body = Some(BytesMut::new());
            }
            None => {}
        }

        let wait = match admit(&snap, ctx.client_ip, req.uri.path()) {
            Ok(wait) => wait,
            Err(r) => {
                return self
                    .reject(session, ctx, r.reason, Some(r.retry_after), &r.headers)
                    .await;
            }
        };

        // Slow clients: bound the pause between body reads and the keep-alive idle time.
        session.set_read_timeout(Some(cfg.body_idle_timeout));
        session.set_keepalive(Some(cfg.keepalive_timeout.as_secs().max(1)));
        drop(snap);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(chunk) = body.as_ref() {
            ctx.body_bytes += chunk.len();
            if ctx.body_bytes > ctx.snap.config.max_body_bytes {
                ctx.rejection = Some(Rejection::BodyTooLarge);
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body over the cap");
            }
        }
        let (min_rate, grace) = (
            ctx.snap.config.body_min_rate,
            ctx.snap.config.body_min_rate_grace,
        );
        // A finished body is taken whatever its pace; an unfinished one must keep up.
        if min_rate > 0 && !end_of_stream {
            let started = *ctx.body_started.get_or_insert_with(Instant::now);
            let allowed = grace + Duration::from_secs_f64(ctx.body_bytes as f64 / min_rate as f64);
            if started.elapsed() > allowed {
                ctx.rejection = Some(Rejection::BodyTooSlow);
                return Error::e_explain(ErrorType::HTTPStatus(408), "request body too slow");
            }
        }
        if let Some(held) = ctx.held_body.as_mut() {
            if let Some(chunk) = body.as_ref() {
                held.extend_from_slice(chunk);
            }
            // An empty chunk sends nothing (None would end the upstream body).
            *body = Some(Bytes::new());
            if end_of_stream {
                *body = ctx.held_body.take().map(BytesMut::freeze);
            }
        }
        Ok(())
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
        let queue = ctx.snap.config.backend_queue;
        ctx.backend_slot = None;
        match state_of(&backend).gate.enter(&queue).await {
            Ok(slot) => ctx.backend_slot = slot,
            Err(reason) => {
                ctx.rejection = Some(reason);
                return Error::e_explain(ErrorType::HTTPStatus(503), reason.message());
            }
        }
        let cfg = &ctx.snap.config;
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
        if let (Some(client), Some(peer)) = (ctx.client_ip, ctx.peer_ip) {
            // X-Forwarded-For gains the hop this connection came from (nginx's
            // $proxy_add_x_forwarded_for, without realip turning it into the client twice);
            // X-Real-IP is the client the gateway believes.
            let hop = ip_header_value(peer);
            let xff = match session.req_header().headers.get(&X_FORWARDED_FOR) {
                Some(prev) if !prev.is_empty() => {
                    let mut list = Vec::with_capacity(prev.len() + 2 + hop.len());
                    list.extend_from_slice(prev.as_bytes());
                    list.extend_from_slice(b", ");
                    list.extend_from_slice(hop.as_bytes());
                    HeaderValue::from_maybe_shared(Bytes::from(list)).map_err(|_| {
                        Error::explain(ErrorType::InvalidHTTPHeader, "X-Forwarded-For")
                    })?
                }
                _ => hop.clone(),
            };
            let real = if client == peer {
                hop
            } else {
                ip_header_value(client)
            };
            req.insert_header("X-Forwarded-For", xff)?;
            req.insert_header("X-Real-IP", real)?;
        }
        req.insert_header("X-Forwarded-Proto", HeaderValue::from_static("http"))?;
        req.insert_header("X-Request-Id", ctx.request_id.clone())?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        resp.insert_header("X-Request-Id", ctx.request_id.clone())?;
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
        let retry = ctx.tried.len() <= ctx.snap.config.connect_retries;
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
        } else if ctx.snap.config.retry_idempotent {
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

    /// pingora's ERROR line per failed request is kept for the backend's failures (502, 504,
    /// connect errors). The gateway's own rejections and the client's failures are counted in
    /// `gateway_rejections_total` and in the access log; one ERROR each would let any client
    /// (or an outage answered 503) flood the error log.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        ctx.rejection.is_some() || e.esource() == &ErrorSource::Downstream
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        // The client's own failures are rejections: counted with their reason.
        if ctx.rejection.is_none() && e.esource() == &ErrorSource::Downstream {
            ctx.rejection = match e.etype() {
                ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                    Some(Rejection::ClientTimeout)
                }
                // Gone (nobody to answer), or already a rejection's status.
                ErrorType::WriteError
                | ErrorType::ReadError
                | ErrorType::ConnectionClosed
                | ErrorType::HTTPStatus(_) => None,
                _ => Some(Rejection::MalformedRequest),
            };
        }
        let (code, message): (u16, &str) = match (e.etype(), ctx.rejection) {
            (ErrorType::HTTPStatus(_), Some(r))
            | (_, Some(r @ (Rejection::ClientTimeout | Rejection::MalformedRequest))) => {
                (r.status(), r.message())
            }
            (etype, _) => match etype {
                ErrorType::HTTPStatus(code) => (*code, "request refused"),
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                    (504, "the backend did not answer in time")
                }
                _ => match e.esource() {
                    ErrorSource::Upstream => (502, "the backend failed to answer"),
                    // The client went away: nobody to answer.
                    ErrorSource::Downstream => (0, ""),
                    _ => (500, "internal gateway error"),
                },
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
                &[],
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
        let req = session.req_header();
        let target = req.uri.to_string();
        let error = e.map(|e| e.to_string());
        let done = Finished {
            started: ctx.started,
            status,
            backend: ctx.backend.as_ref().map(|b| state_of(b).clone()),
            rejection: ctx.rejection,
            client_ip: ctx.client_ip,
            method: req.method.as_str(),
            target: &target,
            request_id: ctx.request_id.as_bytes(),
            error: error.as_deref(),
            fast: false,
        };
        self.record(&ctx.snap, &done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_header_value_matches_display() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "9.99.100.255",
            "192.168.1.9",
            "255.255.255.255",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_header_value(ip).to_str().unwrap(), ip.to_string());
        }
    }

    #[test]
    fn hex_into_writes_fixed_width_lowercase() {
        let mut out = [0u8; 12];
        hex_into(&mut out, 0xabc_0123);
        assert_eq!(&out, b"00000abc0123");
        let mut out = [0u8; 8];
        hex_into(&mut out, 0xdead_beef_ffff_ffff);
        assert_eq!(&out, b"ffffffff");
    }
}
