//! pingora's HTTP/1 engine: `impl ProxyHttp`, each phase a few lines calling the policy.
//!
//! pingora parses the head and writes the answer; the gateway does the rest. In
//! `request_filter` a request gets the same checks as on the own engine, its body is read
//! whole (nginx's `proxy_request_buffering on`), and the exchange with a backend is
//! [`Gateway::forward`], the same one the own engine uses, with pingora's session as the
//! [`Downstream`]. pingora's own proxy loop (the phases after `request_filter`) serves only
//! upgrades (WebSocket), where the connection becomes a tunnel.
//!
//! | phase                      | what happens here                                        |
//! |----------------------------|----------------------------------------------------------|
//! | `request_filter`           | checks, identity, limits, body, [`Gateway::forward`]     |
//! | `upstream_peer`            | upgrades: a backend from the pool, its slot              |
//! | `upstream_request_filter`  | upgrades: forwarding headers                             |
//! | `fail_to_connect`, `error_while_proxy` | upgrades: [`retry::decide`]                 |
//! | `response_filter`          | upgrades: echo `X-Request-Id`, HSTS                      |
//! | `fail_to_proxy`            | the answer to a failure, or the cut                      |
//! | `logging`                  | [`record`] (once)                                        |

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use pingora::lb::Backend;
use pingora::modules::http::HttpModules;
use pingora::prelude::{HttpPeer, RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::Peer;
use pingora::{Error, ErrorSource, ErrorType, Result};
use tokio::sync::OwnedSemaphorePermit;

use crate::answers::ErrorAnswer;
use crate::config::{PoolSettings, Route};
use crate::forward::request::write_upstream_request;
use crate::forward::{routed, Fixed, Outcome, Request};
use crate::pingora_compat;
use crate::policy::framing::RequestBody;
use crate::policy::headers::replaced_by_gateway;
use crate::policy::identity::{client_ip, usable_request_id, Forwarding};

mod session;
use crate::policy::outcome;
use crate::policy::record::{record, InflightGuard};
use crate::policy::retry::{self, Attempts, Failure, Retry};
use crate::policy::{admit, request, Rejection};
use crate::state::{Gateway, Snapshot};
use crate::upstream::{state_of, Upstreams};
use session::{lines_of, upstream_error, values, SessionDownstream};

/// Per-request state shared across the phases.
pub struct RequestCtx {
    /// The config this request runs under, from its start to its end.
    snap: Arc<Snapshot>,
    started: Instant,
    client_ip: Option<IpAddr>,
    request_id: Vec<u8>,
    rejection: Option<Rejection>,
    /// Recorded already (metrics and access log written by the forward path).
    recorded: bool,
    /// An answer was begun and cut: nothing more may be written.
    cut: bool,
    /// Upgrades only: the forwarding headers, the backend, the retry state.
    forwarding: Option<Forwarding>,
    backend: Option<Backend>,
    tried: Vec<SocketAddr>,
    attempts: Attempts,
    again: Option<Backend>,
    backend_slot: Option<OwnedSemaphorePermit>,
    /// The route it took, the pool that chose, and the target as the route rewrote it.
    route: Option<Arc<Route>>,
    pool: Option<Arc<Upstreams>>,
    stripped: Option<Vec<u8>>,
    /// The listener's `Strict-Transport-Security` value, for every answer.
    hsts: Option<Arc<[u8]>>,
    _inflight: InflightGuard,
}

impl RequestCtx {
    /// Its route's balancing, queue, timeouts and retries (the default pool's before routing).
    fn settings(&self) -> &PoolSettings {
        match &self.route {
            Some(r) => &r.settings,
            None => self.snap.config.upstream(),
        }
    }
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
            request_id: Vec::new(),
            rejection: None,
            recorded: false,
            cut: false,
            forwarding: None,
            backend: None,
            tried: Vec::new(),
            attempts: Attempts::default(),
            again: None,
            backend_slot: None,
            route: None,
            pool: None,
            stripped: None,
            hsts: None,
            _inflight: InflightGuard::new(&self.metrics.inflight_requests),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // A request pipelined behind this one is served after it, in order (as nginx and the
        // own engine do); pingora's default closes the connection and drops it.
        session.set_pipelining_enabled(true);
        let snap = ctx.snap.clone();
        let cfg = &snap.config;
        let listener = cfg.listener_policy(pingora_compat::local_addr(session));
        ctx.hsts = listener.and_then(|l| l.hsts.clone());
        let Some((target, lines)) = lines_of(session) else {
            ctx.request_id = self.new_request_id().to_vec();
            return self
                .reject(session, ctx, Rejection::MalformedRequest, None, &[], true)
                .await;
        };
        let all = || lines.iter().map(|(n, v)| (n.as_slice(), v.as_slice()));
        ctx.request_id = match values(&lines, "x-request-id").next() {
            Some(v) if usable_request_id(v) => v.to_vec(),
            _ => self.new_request_id().to_vec(),
        };
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.client_ip =
            peer.map(|p| client_ip(p, values(&lines, "x-forwarded-for"), &cfg.trusted_proxies));

        let req = session.req_header();
        let http10 = req.version == http::Version::HTTP_10;
        let method = req.method.as_str().as_bytes().to_vec();
        let facts = match request::check(http10, &method, &target, all()) {
            Ok(f) => f,
            Err(r) => return self.reject(session, ctx, r, None, &[], true).await,
        };
        let header = |name: &str| {
            lines
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| v.as_slice())
        };
        let chosen = routed(
            self,
            &snap,
            listener,
            values(&lines, "host").next(),
            &method,
            &target,
            &header,
        );
        let route = chosen.route.clone();
        ctx.route = Some(route.clone());
        let head_bytes = admit::head_size(
            method.len(),
            target.len(),
            lines.iter().map(|(n, v)| (n.len(), v.len())),
        );
        let declared = match facts.body {
            RequestBody::Length(n) => admit::check_declared_body(&route, n),
            _ => Ok(()),
        };
        if let Err(r) = admit::check_head(&snap, lines.len(), head_bytes).and(declared) {
            return self.reject(session, ctx, r, None, &[], true).await;
        }
        let has_body = facts.body != RequestBody::None;
        let target_text = String::from_utf8_lossy(&target);
        let wait = match admit::admit(&snap, ctx.client_ip, &route, &target_text) {
            Ok(wait) => wait,
            Err(r) => {
                return self
                    .reject(
                        session,
                        ctx,
                        r.reason,
                        Some(r.retry_after),
                        &r.headers,
                        has_body,
                    )
                    .await
            }
        };
        let (pool, stripped) = match chosen.to {
            Ok(chosen) => chosen,
            Err(Fixed::Refused(r)) => {
                return self.reject(session, ctx, r, None, &[], has_body).await
            }
            // The route's own answer, or a redirect.
            Err(fixed) => {
                let (status, message, headers) = fixed.parts();
                let keep = outcome::keep_alive_after_error(status, has_body, facts.close);
                let answer = ErrorAnswer {
                    headers,
                    hsts: ctx.hsts.as_deref(),
                    ..ErrorAnswer::for_request(status, message, &ctx.request_id, keep)
                };
                let _ = answer.send(session).await;
                return Ok(true);
            }
        };
        ctx.pool = Some(pool.clone());
        ctx.stripped = stripped.clone();
        session.set_keepalive((!facts.close).then(|| cfg.keepalive_timeout.as_secs().max(1)));
        // Each read of this session (a pipelined head behind this request included) waits
        // at most this long.
        session.set_read_timeout(Some(cfg.body_idle_timeout));
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let forwarding = peer.map(|p| {
            Forwarding::new(
                p,
                ctx.client_ip.unwrap_or(p),
                values(&lines, "x-forwarded-for"),
                pingora_compat::is_tls(session),
            )
        });
        if facts.upgrade {
            // pingora's proxy loop tunnels it (the phases below).
            ctx.forwarding = forwarding;
            return Ok(false);
        }
        // The reservation holds the body's bytes against the budget until it was forwarded.
        let (body, _reserved) = match self
            .read_body(session, &snap, route.max_body_bytes, facts.expect_continue)
            .await
        {
            Ok(b) => b,
            Err(Some(r)) => return self.reject(session, ctx, r, None, &[], true).await,
            // The client went away: nobody to answer.
            Err(None) => {
                return Err(
                    Error::explain(ErrorType::ReadError, "client closed mid-body").into_down(),
                )
            }
        };
        let Some(forwarding) = forwarding else {
            return Error::e_explain(ErrorType::InternalError, "no peer address");
        };
        // Bytes of a next head already waiting (pipelined behind this request): pingora would
        // wait the whole keep-alive timeout for the rest of it; the head deadline bounds it.
        if let RequestBody::None | RequestBody::Length(_) = facts.body {
            let used = pingora_compat::raw_head_len(session).unwrap_or(0) + body.len();
            let received =
                pingora_compat::client_stream(session).map_or(0, |s| s.bytes_since_head_start());
            if received > used && !facts.close {
                session.set_keepalive(Some(cfg.header_timeout.as_secs().max(1)));
            }
        }
        let connection: Vec<&[u8]> = values(&lines, "connection").collect();
        let mut bytes = Vec::with_capacity(512 + body.len());
        write_upstream_request(
            &mut bytes,
            &method,
            stripped.as_deref().unwrap_or(&target),
            &route,
            all(),
            &connection,
            |out: &mut Vec<u8>| forwarding.write(out),
            &ctx.request_id,
            has_body.then_some(body.len()),
        );
        bytes.extend_from_slice(&body);
        let request_id = ctx.request_id.clone();
        let affinity = crate::policy::affinity::key(&route.settings, ctx.client_ip, all());
        let fwd = Request {
            bytes: &bytes,
            request_id: &request_id,
            idempotent: facts.idempotent,
            head_request: facts.head,
            last: facts.close,
            affinity: affinity.as_deref(),
            pool: &pool,
            settings: &route.settings,
        };
        let mut down = SessionDownstream::new(session, &request_id, ctx.hsts.as_deref());
        let out: Outcome = self.forward(&fwd, &mut down).await;
        drop(down);
        self.finish(&snap, Self::finished(ctx, session.req_header()), &out);
        ctx.recorded = true;
        if out.cut {
            ctx.cut = true;
            return Error::e_explain(
                ErrorType::HTTPStatus(0),
                "backend failed after its answer began",
            );
        }
        if !out.keep_alive {
            session.set_keepalive(None);
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let pool = ctx
            .pool
            .clone()
            .unwrap_or_else(|| self.pools.default.clone());
        let Some(backend) = ctx
            .again
            .take()
            .or_else(|| pool.select(&ctx.tried, &ctx.settings().balance, None))
        else {
            ctx.rejection = Some(Rejection::NoHealthyBackend);
            return Error::e_explain(ErrorType::HTTPStatus(503), "no healthy backend");
        };
        let addr = *backend.as_inet().expect("backends are inet addresses");
        ctx.backend_slot = None;
        match state_of(&backend).gate.enter(&ctx.settings().queue).await {
            Ok(slot) => ctx.backend_slot = slot,
            Err(reason) => {
                ctx.rejection = Some(reason);
                return Error::e_explain(ErrorType::HTTPStatus(503), reason.message());
            }
        }
        let t = ctx.settings().timeouts;
        let mut peer = match &ctx.settings().tls {
            None => HttpPeer::new(addr, false, String::new()),
            // A TLS pool: the pool's name, trust anchors and `verify`, as the own client has.
            Some(tls) => {
                let host = state_of(&backend).host();
                let name = tls.server_name_text(addr, host.as_deref().map(String::as_str));
                let mut peer = HttpPeer::new(addr, true, name);
                peer.options.ca = tls.pingora_ca.clone();
                peer.options.verify_cert = tls.verify;
                peer.options.verify_hostname = tls.verify;
                peer.options.alpn = pingora::protocols::ALPN::H1;
                peer
            }
        };
        peer.options.connection_timeout = Some(t.connect);
        peer.options.total_connection_timeout = Some(t.connect);
        peer.options.read_timeout = Some(t.websocket_idle);
        peer.options.write_timeout = Some(t.write);
        peer.options.idle_timeout = Some(t.idle);
        ctx.backend = Some(backend);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let route = ctx.route.clone();
        let edits = |name: &str| {
            route
                .as_ref()
                .is_some_and(|r| r.edits_header(name.as_bytes()))
        };
        let names: Vec<String> = req.headers.keys().map(|k| k.as_str().to_string()).collect();
        for name in names {
            if replaced_by_gateway(name.as_bytes()) || edits(&name) {
                req.remove_header(&name);
            }
        }
        for (name, value) in route.iter().flat_map(|r| r.set_headers.iter()) {
            req.insert_header(name.clone(), value.as_str())?;
        }
        if let Some(f) = &ctx.forwarding {
            for (name, value) in f.headers() {
                req.insert_header(name, value)?;
            }
        }
        req.insert_header("X-Request-Id", ctx.request_id.as_slice())?;
        if let Some(path) = &ctx.stripped {
            req.set_raw_path(path)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        resp.insert_header("X-Request-Id", ctx.request_id.as_slice())?;
        if let Some(v) = &ctx.hsts {
            resp.insert_header(crate::answers::HSTS, &v[..])?;
        }
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
        let settings = ctx.settings().clone();
        let retry = retry::decide(&settings, true, Failure::Connect, &mut ctx.attempts)
            == Retry::AnotherBackend;
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
        let idempotent = session.req_header().method.is_idempotent();
        let failure = Failure::AfterSend {
            reused: client_reused,
            answered: session.response_written().is_some(),
        };
        let settings = ctx.settings().clone();
        let decision = retry::decide(&settings, idempotent, failure, &mut ctx.attempts);
        match decision {
            Retry::SameBackendNewConnection => ctx.again = ctx.backend.clone(),
            Retry::AnotherBackend => {
                if let Some(addr) = peer.address().as_inet() {
                    ctx.tried.push(*addr);
                }
            }
            Retry::No => {}
        }
        e.set_retry(decision != Retry::No);
        if e.retry() {
            self.metrics.retries_after_send.inc();
        }
        e
    }

    /// pingora's ERROR line per failed request is kept for the backend's failures on the
    /// upgrade path (the forward path logs its own). The gateway's own rejections and the
    /// client's failures are counted in `gateway_rejections_total` and the access log.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        ctx.recorded || ctx.rejection.is_some() || e.esource() == &ErrorSource::Downstream
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let cut = FailToProxy {
            error_code: 0,
            can_reuse_downstream: false,
        };
        if ctx.cut || ctx.recorded {
            return cut;
        }
        // The client's own failures are rejections: counted with their reason.
        if ctx.rejection.is_none() && e.esource() == &ErrorSource::Downstream {
            ctx.rejection = match e.etype() {
                ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                    Some(Rejection::ClientTimeout)
                }
                ErrorType::WriteError
                | ErrorType::ReadError
                | ErrorType::ConnectionClosed
                | ErrorType::HTTPStatus(_) => None,
                _ => Some(Rejection::MalformedRequest),
            };
        }
        let (code, message) = match (ctx.rejection, e.esource()) {
            (Some(r), _) => {
                self.metrics.reject(r);
                (r.status(), r.message())
            }
            // The client went away: nobody to answer.
            (None, ErrorSource::Downstream) => return cut,
            (None, _) => match outcome::after_failure(
                upstream_error(e),
                session.response_written().is_some(),
            ) {
                outcome::AfterFailure::Cut => return cut,
                outcome::AfterFailure::Answer { status, message } => (status, message),
            },
        };
        let answer = ErrorAnswer {
            hsts: ctx.hsts.as_deref(),
            ..ErrorAnswer::for_request(code, message, &ctx.request_id, false)
        };
        let _ = answer.send(session).await;
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if ctx.recorded {
            return;
        }
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let error = e.map(|e| e.to_string());
        let req = session.req_header();
        let mut done = Self::finished(ctx, req);
        done.status = status;
        done.backend = ctx.backend.as_ref().map(|b| state_of(b).clone());
        done.error = error.as_deref();
        record(&self.metrics, ctx.snap.config.access_log, &done);
    }
}
