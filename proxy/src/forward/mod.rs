//! One proxied exchange, for every engine: choose a backend (the pool's balancing, the
//! backend's concurrency gate), send the buffered request on a pooled or new connection,
//! retry as [`retry::decide`] says, and relay the answer to a [`Downstream`], which is the
//! only part an engine writes: the own HTTP/1 engine writes bytes to its socket, pingora's
//! writes through its session.
//!
//! Once any part of an answer went to the client, a backend failure cuts the client
//! connection ([`outcome::after_failure`]); before, it is answered 502/504.

pub mod answer;
pub mod request;

use std::net::SocketAddr;
use std::sync::Arc;

use pingora::lb::Backend;

use crate::answers::ErrorAnswer;
use crate::config::{ListenerPolicy, PoolSettings, Route};
use crate::policy::framing::AnswerBody;
use crate::policy::outcome::{self, AfterFailure, UpstreamError};
use crate::policy::retry::{self, Attempts, Failure, Retry};
use crate::policy::Rejection;
use crate::state::{Gateway, Snapshot};
use crate::upstream::conn::{self, UpConn, RELAY_BYTES};
use crate::upstream::{state_of, BackendState, Upstreams};
use answer::{AnswerHead, ChunkDecoder};

/// Where an answer goes: an engine's client side.
#[allow(async_fn_in_trait)]
pub trait Downstream {
    /// The buffer the answer's status line and header lines are written into.
    fn lines(&mut self) -> &mut Vec<u8>;
    /// The answer's head is in `lines()`; `keep_alive`: the client connection may serve
    /// another request after this answer. False when the client is gone.
    async fn head(&mut self, head: &AnswerHead, keep_alive: bool) -> bool;
    /// Body data, decoded (for a chunked answer, one of the backend's chunks, or the part of
    /// it that arrived); staged until [`Downstream::flush`].
    async fn body(&mut self, data: &[u8]) -> bool;
    /// Send what was staged; `end`: the body is complete.
    async fn flush(&mut self, end: bool) -> bool;
    /// The gateway's own answer, when nothing of a backend's was sent.
    async fn error(&mut self, answer: &ErrorAnswer<'_>) -> bool;
    /// Some byte of an answer was written to the client.
    fn started(&self) -> bool;
}

/// A request its route answers without a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fixed {
    /// No route (404), or the route's pool is gone.
    Refused(Rejection),
    /// The route's fixed answer.
    Answer { status: u16, message: String },
    /// A plaintext listener's redirect to HTTPS (`listen[].redirect_https`): its `Location`.
    Redirect {
        status: u16,
        location: [(&'static str, String); 1],
    },
}

impl Fixed {
    /// The answer's status, message and header lines.
    pub fn parts(&self) -> (u16, &str, &[(&'static str, String)]) {
        match self {
            Fixed::Refused(r) => (r.status(), r.message(), &[]),
            Fixed::Answer { status, message } => (*status, message, &[]),
            Fixed::Redirect { status, location } => (
                *status,
                "this address serves HTTPS only: see Location",
                location,
            ),
        }
    }
}

/// The route a request takes (the default route when it matched none: its limits and caps
/// apply to the 404), and where that sends it: a pool with the target it gets there (`None`:
/// the client's), or a fixed answer.
pub struct Chosen {
    pub route: Arc<Route>,
    pub to: Result<(Arc<Upstreams>, Option<Vec<u8>>), Fixed>,
}

/// The one routing step every engine takes ([`crate::policy::route::decide`]). `header`:
/// the first value of a request header by lower-case name. `listener`: the policy of the
/// listener the request came in on; one that redirects to HTTPS sends every request there
/// (on the default route: its limits apply, as to a 404).
pub fn routed<'h>(
    gw: &Gateway,
    snap: &Snapshot,
    listener: Option<&ListenerPolicy>,
    host: Option<&[u8]>,
    method: &[u8],
    target: &[u8],
    header: &impl Fn(&str) -> Option<&'h [u8]>,
) -> Chosen {
    use crate::policy::route::{decide, https_location, Routed};
    let table = &snap.config.routes;
    if let Some(r) = listener.and_then(|l| l.redirect) {
        return Chosen {
            route: table.default.clone(),
            to: Err(match https_location(host, target, r.port) {
                Ok(location) => Fixed::Redirect {
                    status: r.status,
                    location: [("Location", location)],
                },
                Err(reason) => Fixed::Refused(reason),
            }),
        };
    }
    match decide(table, host, method, target, header) {
        Routed::Pool { route, target } => {
            let to = match gw.pools.get(route.pool_name()) {
                Some(pool) => Ok((
                    pool,
                    match target {
                        std::borrow::Cow::Borrowed(_) => None,
                        std::borrow::Cow::Owned(t) => Some(t),
                    },
                )),
                None => Err(Fixed::Refused(Rejection::NoHealthyBackend)),
            };
            Chosen {
                route: route.clone(),
                to,
            }
        }
        Routed::Answer {
            route,
            status,
            message,
        } => Chosen {
            route: route.clone(),
            to: Err(Fixed::Answer {
                status,
                message: message.to_string(),
            }),
        },
        Routed::NoRoute => Chosen {
            route: table.default.clone(),
            to: Err(Fixed::Refused(Rejection::NoRoute)),
        },
    }
}

/// The request as the backend gets it.
pub struct Request<'a> {
    /// Head and body ([`request::write_upstream_request`]).
    pub bytes: &'a [u8],
    pub request_id: &'a [u8],
    /// GET, HEAD, PUT, DELETE, OPTIONS: may be sent again after a failure.
    pub idempotent: bool,
    pub head_request: bool,
    /// The client connection closes after this request anyway.
    pub last: bool,
    /// `balance: hash`'s key ([`crate::policy::affinity::key`]).
    pub affinity: Option<&'a [u8]>,
    /// The pool its route chose.
    pub pool: &'a Upstreams,
    /// How it is sent there: the route's balancing, queue, timeouts and retries.
    pub settings: &'a PoolSettings,
}

/// How the exchange ended.
#[derive(Default)]
pub struct Outcome {
    /// The status the client got; 0 when none (or the answer was cut).
    pub status: u16,
    pub backend: Option<Arc<BackendState>>,
    pub rejection: Option<Rejection>,
    pub error: Option<UpstreamError>,
    /// The client connection may serve another request.
    pub keep_alive: bool,
    /// An answer was begun and cut: the client connection must be closed without an end.
    pub cut: bool,
}

impl Gateway {
    /// Proxy one buffered request to a backend and relay the answer to `down`.
    pub async fn forward<D: Downstream>(&self, req: &Request<'_>, down: &mut D) -> Outcome {
        let set = req.settings;
        let t = set.timeouts;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempts = Attempts::default();
        let mut fresh_only = false;
        let mut again: Option<Backend> = None;
        let mut out = Outcome::default();
        loop {
            let Some(backend) = again
                .take()
                .or_else(|| req.pool.select(&tried, &set.balance, req.affinity))
            else {
                return self
                    .refuse(req, down, Rejection::NoHealthyBackend, out)
                    .await;
            };
            let addr = *backend.as_inet().expect("backends are inet addresses");
            let state = state_of(&backend).clone();
            // In flight from here (its queue wait included), for `least_conn` and `p2c_ewma`.
            let _load = state.load.begin();
            let _slot = match state.gate.enter(&set.queue).await {
                Ok(slot) => slot,
                Err(reason) => return self.refuse(req, down, reason, out).await,
            };
            let pooled = if fresh_only {
                None
            } else {
                conn::take_idle(&state, t.idle)
            };
            let reused = pooled.is_some();
            fresh_only = false;
            out.backend = Some(state.clone());
            let mut c = match pooled {
                Some(c) => c,
                None => match conn::connect(
                    addr,
                    t.connect,
                    set.tls.as_ref(),
                    state.host().as_deref().map(String::as_str),
                )
                .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        state.metrics.connect_failures.inc();
                        req.pool.observe(&state, None, false, &set.balance);
                        tried.push(addr);
                        if retry::decide(set, req.idempotent, Failure::Connect, &mut attempts)
                            == Retry::AnotherBackend
                        {
                            self.metrics.retries_connect.inc();
                            continue;
                        }
                        return self.failed(req, down, e, out).await;
                    }
                },
            };
            // (A clock read only when an estimate uses it.)
            let sent = (set.balance.algorithm == crate::config::Balance::P2cEwma)
                .then(std::time::Instant::now);
            let head = conn::exchange_head(
                &mut c,
                req.bytes,
                req.head_request,
                down.lines(),
                t.write,
                t.read,
            )
            .await;
            let head = match head {
                Ok(h) => {
                    let ok = h.status < 500;
                    req.pool
                        .observe(&state, sent.map(|t| t.elapsed()), ok, &set.balance);
                    h
                }
                Err((e, answered)) => {
                    let failure = Failure::AfterSend { reused, answered };
                    let decision = retry::decide(set, req.idempotent, failure, &mut attempts);
                    // A stale pooled connection is not the backend's failure.
                    if decision != Retry::SameBackendNewConnection {
                        req.pool.observe(&state, None, false, &set.balance);
                    }
                    match decision {
                        Retry::SameBackendNewConnection => {
                            fresh_only = true;
                            again = Some(backend);
                        }
                        Retry::AnotherBackend => tried.push(addr),
                        Retry::No => return self.failed(req, down, e, out).await,
                    }
                    self.metrics.retries_after_send.inc();
                    continue;
                }
            };
            return self.relay(req, down, c, head, &state, t.read, out).await;
        }
    }

    /// The gateway's own refusal (no backend, backend queue), counted with its reason.
    async fn refuse<D: Downstream>(
        &self,
        req: &Request<'_>,
        down: &mut D,
        reason: Rejection,
        mut out: Outcome,
    ) -> Outcome {
        self.metrics.reject(reason);
        out.rejection = Some(reason);
        let status = reason.status();
        let keep_alive = outcome::keep_alive_after_error(status, false, req.last);
        let answer = ErrorAnswer::for_request(status, reason.message(), req.request_id, keep_alive);
        let ok = down.error(&answer).await;
        out.status = status;
        out.keep_alive = ok && keep_alive;
        out
    }

    /// A backend failed: answered 502/504 when nothing was sent yet, else cut.
    async fn failed<D: Downstream>(
        &self,
        req: &Request<'_>,
        down: &mut D,
        e: UpstreamError,
        mut out: Outcome,
    ) -> Outcome {
        out.error = Some(e);
        out.keep_alive = false;
        match outcome::after_failure(e, down.started()) {
            AfterFailure::Cut => out.cut = true,
            AfterFailure::Answer { status, message } => {
                let answer = ErrorAnswer::for_request(status, message, req.request_id, false);
                down.error(&answer).await;
                out.status = status;
            }
        }
        out
    }

    /// The backend's answer to the client: its head, then its body as it was framed, in
    /// pieces of at most [`RELAY_BYTES`]. A body that fits in one piece goes with the head.
    #[allow(clippy::too_many_arguments)]
    async fn relay<D: Downstream>(
        &self,
        req: &Request<'_>,
        down: &mut D,
        mut c: UpConn,
        head: AnswerHead,
        state: &BackendState,
        read_timeout: std::time::Duration,
        mut out: Outcome,
    ) -> Outcome {
        let keep_client = !req.last && head.body != AnswerBody::UntilClose;
        let start = head.len;
        // A length-delimited body that fits one piece is gathered whole first, so that the
        // head and body leave in one write.
        if let AnswerBody::Length(n) = head.body {
            while ((c.buf.len() - start) as u64) < n && n <= RELAY_BYTES as u64 {
                if let Err(e) = conn::read_upstream(&mut c.stream, &mut c.buf, read_timeout).await {
                    return self.failed(req, down, e, out).await;
                }
            }
        }
        if !down.head(&head, keep_client).await {
            out.status = head.status;
            return out;
        }
        out.status = head.status;
        let mut reusable = head.keep_alive;
        // The connection's buffer: its head, then the body bytes that came with it; later
        // pieces are read into it from the start.
        let mut piece = std::mem::take(&mut c.buf);
        let mut at = start;
        let mut decoded = Vec::new();
        let mut ends = Vec::new();
        let mut decoder = ChunkDecoder::default();
        let mut left = match head.body {
            AnswerBody::Length(n) => n,
            _ => u64::MAX,
        };
        loop {
            let cur = &piece[at..];
            let end = match head.body {
                AnswerBody::None => {
                    reusable &= cur.is_empty();
                    true
                }
                AnswerBody::Length(_) => {
                    let n = (cur.len() as u64).min(left) as usize;
                    left -= n as u64;
                    reusable &= left > 0 || cur.len() == n;
                    if n > 0 && !down.body(&cur[..n]).await {
                        return out;
                    }
                    left == 0
                }
                AnswerBody::Chunked => {
                    decoded.clear();
                    ends.clear();
                    let done = match decoder.feed(cur, &mut decoded, &mut ends) {
                        Ok(Some(n)) => {
                            reusable &= n == cur.len();
                            true
                        }
                        Ok(None) => false,
                        Err(_) => return self.failed(req, down, UpstreamError::Invalid, out).await,
                    };
                    let mut from = 0;
                    for &to in &ends {
                        if !down.body(&decoded[from..to]).await {
                            return out;
                        }
                        from = to;
                    }
                    done
                }
                AnswerBody::UntilClose => {
                    reusable = false;
                    if !cur.is_empty() && !down.body(cur).await {
                        return out;
                    }
                    false
                }
            };
            // The client is gone: nothing more to do.
            if !down.flush(end).await {
                return out;
            }
            if end {
                break;
            }
            piece.clear();
            at = 0;
            match conn::read_upstream(&mut c.stream, &mut piece, read_timeout).await {
                Ok(()) => {}
                Err(UpstreamError::Closed) if head.body == AnswerBody::UntilClose => {
                    if !down.flush(true).await {
                        return out;
                    }
                    break;
                }
                Err(e) => return self.failed(req, down, e, out).await,
            }
        }
        c.buf = piece;
        if reusable {
            conn::put_idle(state, c, req.pool.keepalive_pool);
        }
        out.keep_alive = keep_client;
        out
    }
}

impl Gateway {
    /// Record a forwarded request: its outcome into `done`, the backend's failure logged
    /// (the gateway's own refusals are counted, not logged), then metrics and access log.
    pub fn finish(
        &self,
        snap: &Snapshot,
        done: crate::policy::record::Finished<'_>,
        out: &Outcome,
    ) {
        let text = out.error.map(|e| {
            if out.cut {
                format!("{}, answer cut after its head", e.text())
            } else {
                format!("{}, status: {}", e.text(), out.status)
            }
        });
        let done = crate::policy::record::Finished {
            status: out.status,
            backend: out.backend.clone(),
            rejection: out.rejection,
            error: text.as_deref(),
            ..done
        };
        if let Some(text) = &text {
            log::error!(
                "Fail to proxy: {text}, backend: {}, id={}",
                done.backend.as_ref().map_or("-", |b| b.label.as_str()),
                String::from_utf8_lossy(done.request_id),
            );
        }
        crate::policy::record::record(&self.metrics, snap.config.access_log, &done);
    }
}
