//! The fast path: plain HTTP/1.1 requests (no body, or a `Content-Length` one), proxied
//! without pingora's HTTP/1 session and proxy loop.
//!
//! pingora's path costs ~75k instructions per proxied request before the gateway adds
//! anything (header maps kept twice and hashed on every lookup, the upstream request cloned,
//! a task spawned per pooled connection, ~66 allocations): 0.64× nginx in requests/s on the
//! project's machines. The same work written against the bytes (`httparse` over the
//! connection's buffer, the upstream head assembled in one reused buffer, the answer's head
//! and body in one write) runs ~20k instructions per request, fewer than nginx's ~29k.
//!
//! It serves only what it can serve exactly as the pingora path would, and hands everything
//! else to pingora, on the same connection, with the bytes it had read put back
//! ([`HeadDeadline::rewind`]): a request with a `Connection`, `Upgrade`, `Expect`, `TE` or
//! `Transfer-Encoding` header, HTTP/1.0, a method other than GET, HEAD, POST, PUT, PATCH,
//! DELETE, OPTIONS, an absolute-form target, a head over the size caps (pingora's path answers
//! 431) or a body over the cap (413), a head `httparse` refuses or a malformed
//! `Content-Length` (400), a repeated `Host`, `X-Forwarded-For` or `X-Request-Id`. From there
//! on pingora serves the connection. A `Content-Length` body is read whole before anything is
//! sent (the same slow-body rules as pingora's path) and goes out with its head in one write;
//! only idempotent methods are sent again after a failure. What the pingora path does per
//! request (`proxy.rs`) is done here by the same functions: client identity, request id,
//! header-size measure, rate limits, backend selection and its queue, the same JSON errors and
//! connection rule after them, metrics and access log.
//!
//! Upstream connections are kept per backend ([`Idle`], at most `upstream.keepalive_pool`
//! each) and checked when taken rather than watched by a task while idle: one the backend
//! closed or older than `timeouts.idle` is dropped, and a reused one that fails before any
//! answer byte arrived is retried once on a new connection to the same backend (pingora's
//! rule for a stale pooled connection).

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

use pingora::lb::Backend;
use pingora::protocols::http::date::get_cached_date;
use pingora::protocols::GetSocketDigest;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::limits::client::client_ip;
use crate::limits::connections::HeadDeadline;
use crate::limits::Snapshot;
use crate::metrics::Rejection;
use crate::proxy::{
    admit, head_size, ip_header_value, usable_request_id, Finished, Gateway, InflightGuard,
};
use crate::responses::{keeps_connection, raw_answer, RawExtras};
use crate::upstreams::{state_of, BackendState};

/// Most headers a request or answer may have on this path (pingora's own limit is 256;
/// `buffers.max_headers` is checked separately and a request over either goes to pingora).
const MAX_HEADERS: usize = 128;
/// Largest upstream answer head read before it is refused as a 502.
const MAX_ANSWER_HEAD: usize = 64 * 1024;
/// The piece size of a body relayed in pieces (bounded buffering).
const RELAY_BYTES: usize = 16 * 1024;

/// An idle keep-alive connection to a backend.
pub struct Idle {
    conn: UpConn,
    since: Instant,
}

/// A connection to a backend and the buffer its answers are read into (kept with it, so a
/// request allocates neither).
struct UpConn {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// How the fast path left a connection.
pub enum Outcome {
    /// Closed, or to be closed: nothing more to do.
    Closed,
    /// The next request is pingora's; its bytes were put back.
    Pingora,
}

/// A request the fast path will serve, parsed from the head at the start of the buffer.
struct Plan {
    head_len: usize,
    method: Range<usize>,
    target: Range<usize>,
    is_head: bool,
    /// GET, HEAD, PUT, DELETE, OPTIONS: may be sent again after a failure.
    idempotent: bool,
    /// The Content-Length body that follows the head (0: none).
    body_len: usize,
    client_ip: IpAddr,
    /// Where the request id is in the upstream head.
    request_id: Range<usize>,
}

enum Parsed {
    Plan(Plan),
    Partial,
    Pingora,
}

/// Why an exchange with a backend failed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum UpstreamError {
    ConnectRefused,
    ConnectTimeout,
    WriteTimeout,
    ReadTimeout,
    /// Closed or reset before a whole answer head arrived.
    Closed,
    Invalid,
}

impl UpstreamError {
    fn answer(self) -> (u16, &'static str) {
        match self {
            UpstreamError::ConnectTimeout
            | UpstreamError::WriteTimeout
            | UpstreamError::ReadTimeout => (504, "the backend did not answer in time"),
            _ => (502, "the backend failed to answer"),
        }
    }

    fn text(self) -> &'static str {
        match self {
            UpstreamError::ConnectRefused => "connect failed",
            UpstreamError::ConnectTimeout => "connect timed out",
            UpstreamError::WriteTimeout => "writing the request timed out",
            UpstreamError::ReadTimeout => "reading the answer timed out",
            UpstreamError::Closed => "connection closed before a whole answer",
            UpstreamError::Invalid => "invalid answer",
        }
    }
}

fn eq(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn offset(buf: &[u8], part: &str) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Reads more bytes into `buf`; false when the peer closed or the read failed.
async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> bool {
    if buf.capacity() - buf.len() < 2048 {
        buf.reserve(4096);
    }
    matches!(r.read_buf(buf).await, Ok(n) if n > 0)
}

/// Like [`read_more`], failing with a timeout after `limit`.
async fn read_upstream(
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
    limit: Duration,
) -> Result<(), UpstreamError> {
    match tokio::time::timeout(limit, read_more(tcp, buf)).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(UpstreamError::Closed),
        Err(_) => Err(UpstreamError::ReadTimeout),
    }
}

/// How an answer's body is delimited (RFC 9112 section 6.3).
#[derive(Clone, Copy, PartialEq)]
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

/// Finds where a chunked body ends in raw chunked bytes fed piece by piece; the position is
/// carried across calls.
struct Chunks {
    /// Data bytes (plus CRLF) of the current chunk not yet seen.
    skip: usize,
    /// In the trailer section after the last chunk.
    trailer: bool,
    /// An incomplete size or trailer line kept from the last call.
    line: Vec<u8>,
}

impl Chunks {
    fn new() -> Self {
        Chunks {
            skip: 0,
            trailer: false,
            line: Vec::new(),
        }
    }

    /// Feed the next bytes; Ok(Some(n)): the body ends after `n` bytes of `data`.
    fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, ()> {
        let mut i = 0;
        while i < data.len() {
            if self.skip > 0 {
                let n = self.skip.min(data.len() - i);
                self.skip -= n;
                i += n;
                continue;
            }
            // A line: a chunk size, or a trailer line.
            let Some(nl) = data[i..].iter().position(|&b| b == b'\n') else {
                self.line.extend_from_slice(&data[i..]);
                if self.line.len() > 4096 {
                    return Err(());
                }
                return Ok(None);
            };
            self.line.extend_from_slice(&data[i..i + nl]);
            i += nl + 1;
            let line = std::mem::take(&mut self.line);
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            if self.trailer {
                if line.is_empty() {
                    return Ok(Some(i));
                }
                continue;
            }
            let digits = line.split(|&b| b == b';').next().unwrap_or(b"");
            let text = std::str::from_utf8(digits).map_err(|_| ())?.trim();
            let size = usize::from_str_radix(text, 16).map_err(|_| ())?;
            if size == 0 {
                self.trailer = true;
            } else {
                self.skip = size.checked_add(2).ok_or(())?;
            }
        }
        Ok(None)
    }
}

thread_local! {
    /// This worker thread's runtime has its ticker ([`keep_timer_wakeups_near`]).
    static TICKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How often each worker's runtime is woken by its ticker.
const TICK: Duration = Duration::from_millis(250);

/// tokio's time driver wakes itself (an eventfd write, then one more `epoll_wait`) whenever a
/// timer is registered to fire before the earliest one it knew of when it last went to
/// sleep. Every proxied request registers one (the backend's read timeout, 30 s by default),
/// and with the keep-alive timers of idle connections (60 s) the earliest, so at moderate
/// rates nearly every request paid those two syscalls. A ticker per worker runtime keeps the
/// earliest known timer within `TICK`, so request timers never come first: four wake-ups a
/// second when idle, instead of two syscalls per request.
fn keep_timer_wakeups_near() {
    TICKING.with(|ticking| {
        if !ticking.replace(true) {
            tokio::spawn(async {
                let mut tick = tokio::time::interval(TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tick.tick().await;
                }
            });
        }
    });
}

impl Gateway {
    /// Serve the connection's requests while they fit the fast path.
    pub async fn serve_fast(&self, io: &mut HeadDeadline, shutdown: &ShutdownWatch) -> Outcome {
        keep_timer_wakeups_near();
        let Some(peer) = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
        else {
            return Outcome::Pingora;
        };
        let hop = ip_header_value(peer);
        let mut shutdown = shutdown.clone();
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut upstream_head: Vec<u8> = Vec::with_capacity(1024);
        let mut answer: Vec<u8> = Vec::with_capacity(4096);
        let mut served = 0usize;
        loop {
            if buf.is_empty() {
                let got = if served == 0 {
                    // The head deadline (HeadDeadline) bounds the first request's wait.
                    read_more(io, &mut buf).await
                } else {
                    let idle = self.snapshot.load().config.keepalive_timeout;
                    tokio::select! {
                        biased;
                        r = tokio::time::timeout(idle, read_more(io, &mut buf)) => r.unwrap_or(false),
                        _ = shutdown.changed() => false,
                    }
                };
                if !got {
                    return Outcome::Closed;
                }
            }
            let snap = self.snapshot.load_full();
            let plan = loop {
                match self.parse(&buf, peer, hop.as_bytes(), &snap, &mut upstream_head) {
                    Parsed::Plan(p) => break p,
                    Parsed::Pingora => {
                        io.rewind(std::mem::take(&mut buf));
                        return Outcome::Pingora;
                    }
                    // A head over the caps: pingora's path reads the rest and answers 431.
                    Parsed::Partial if buf.len() > snap.config.max_header_bytes + 1024 => {
                        io.rewind(std::mem::take(&mut buf));
                        return Outcome::Pingora;
                    }
                    // The client went away, or missed the head deadline (already answered).
                    Parsed::Partial => {
                        if !read_more(io, &mut buf).await {
                            return Outcome::Closed;
                        }
                    }
                }
            };
            served += 1;
            let last = served >= snap.config.max_requests_per_connection || *shutdown.borrow();
            let keep = self
                .one(
                    io,
                    &mut buf,
                    &plan,
                    &snap,
                    &mut upstream_head,
                    &mut answer,
                    last,
                )
                .await;
            if !keep || last {
                return Outcome::Closed;
            }
            buf.drain(..plan.head_len + plan.body_len);
        }
    }

    /// Parse the head at the start of `buf`; when the fast path takes it, write the upstream
    /// head into `out`.
    fn parse(
        &self,
        buf: &[u8],
        peer: IpAddr,
        hop: &[u8],
        snap: &Snapshot,
        out: &mut Vec<u8>,
    ) -> Parsed {
        let cfg = &snap.config;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            Err(_) => return Parsed::Pingora,
        };
        let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
            return Parsed::Pingora;
        };
        let is_head = method == "HEAD";
        let idempotent = matches!(method, "GET" | "HEAD" | "PUT" | "DELETE" | "OPTIONS");
        if !(idempotent || method == "POST" || method == "PATCH") || !target.starts_with('/') {
            return Parsed::Pingora;
        }
        let head_bytes = head_size(
            method.len(),
            target.len(),
            req.headers.iter().map(|h| (h.name.len(), h.value.len())),
        );
        if req.headers.len() > cfg.max_headers || head_bytes > cfg.max_header_bytes {
            return Parsed::Pingora;
        }
        let mut forwarded_for: Option<&[u8]> = None;
        let mut request_id: Option<&[u8]> = None;
        let mut body_len: Option<usize> = None;
        let mut host = false;
        for h in req.headers.iter() {
            let n = h.name;
            if eq(n, "host") {
                // Two are refused by pingora's path (400).
                if std::mem::replace(&mut host, true) {
                    return Parsed::Pingora;
                }
            } else if eq(n, "content-length") {
                // Digits only, once, within the cap; anything else is pingora's (400 or 413).
                let len = (!h.value.is_empty() && h.value.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                    .flatten()
                    .filter(|&len| len <= cfg.max_body_bytes);
                match (len, body_len) {
                    (Some(len), None) => body_len = Some(len),
                    _ => return Parsed::Pingora,
                }
            } else if eq(n, "x-forwarded-for") {
                if forwarded_for.replace(h.value).is_some() {
                    return Parsed::Pingora;
                }
            } else if eq(n, "x-request-id") {
                if request_id.replace(h.value).is_some() {
                    return Parsed::Pingora;
                }
            } else if eq(n, "transfer-encoding")
                || eq(n, "connection")
                || eq(n, "upgrade")
                || eq(n, "expect")
                || eq(n, "te")
                || eq(n, "trailer")
                || eq(n, "keep-alive")
                || eq(n, "proxy-connection")
            {
                return Parsed::Pingora;
            }
        }
        let client = client_ip(peer, forwarded_for, &cfg.trusted_proxies);

        // The upstream head: the client's lines as they came, less the four the gateway
        // sets, then those four.
        out.clear();
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for h in req.headers.iter() {
            let n = h.name;
            if !(eq(n, "x-forwarded-for")
                || eq(n, "x-real-ip")
                || eq(n, "x-forwarded-proto")
                || eq(n, "x-request-id"))
            {
                push_header(out, n.as_bytes(), h.value);
            }
        }
        out.extend_from_slice(b"X-Forwarded-For: ");
        if let Some(prev) = forwarded_for.filter(|v| !v.is_empty()) {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(hop);
        out.extend_from_slice(b"\r\n");
        if client == peer {
            push_header(out, b"X-Real-IP", hop);
        } else {
            push_header(out, b"X-Real-IP", ip_header_value(client).as_bytes());
        }
        push_header(out, b"X-Forwarded-Proto", b"http");
        out.extend_from_slice(b"X-Request-Id: ");
        let id_start = out.len();
        match request_id {
            Some(v) if usable_request_id(v) => out.extend_from_slice(v),
            _ => out.extend_from_slice(&self.new_request_id_bytes()),
        }
        let request_id = id_start..out.len();
        out.extend_from_slice(b"\r\n\r\n");
        Parsed::Plan(Plan {
            head_len,
            idempotent,
            body_len: body_len.unwrap_or(0),
            method: offset(buf, method),
            target: offset(buf, target),
            is_head,
            client_ip: client,
            request_id,
        })
    }

    /// One request, from its parsed head to the end of its answer. Returns whether the
    /// client connection may serve another request.
    #[allow(clippy::too_many_arguments)]
    async fn one(
        &self,
        io: &mut HeadDeadline,
        buf: &mut Vec<u8>,
        plan: &Plan,
        snap: &Snapshot,
        upstream_head: &mut Vec<u8>,
        answer: &mut Vec<u8>,
        last: bool,
    ) -> bool {
        let _inflight = InflightGuard::new(&self.metrics.inflight_requests);
        let started = Instant::now();
        let admitted = {
            let target = std::str::from_utf8(&buf[plan.target.clone()]).unwrap_or("/");
            admit(
                snap,
                Some(plan.client_ip),
                target.split('?').next().unwrap_or(target),
            )
        };
        // A refusal and whether its request body is left unread.
        let refused = match admitted {
            Err(r) => Some((r.reason, Some(r.retry_after), r.headers, plan.body_len > 0)),
            Ok(wait) => {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                if plan.body_len == 0 {
                    None
                } else {
                    match read_body(io, buf, plan, snap).await {
                        Ok(()) => {
                            let body = &buf[plan.head_len..plan.head_len + plan.body_len];
                            upstream_head.extend_from_slice(body);
                            None
                        }
                        Err(Some(reason)) => Some((reason, None, Default::default(), true)),
                        // The client went away mid-body: nobody to answer, nothing sent on.
                        Err(None) => {
                            let id = &upstream_head[plan.request_id.clone()];
                            self.record(snap, &finished(plan, buf, id, started));
                            return false;
                        }
                    }
                }
            }
        };
        let request_id = &upstream_head[plan.request_id.clone()];
        let mut done = finished(plan, buf, request_id, started);
        if let Some((reason, retry_after, headers, unread_body)) = refused {
            let (keep, _) = self
                .refuse(
                    io,
                    answer,
                    reason,
                    retry_after,
                    &headers,
                    request_id,
                    last || unread_body,
                    &mut done,
                )
                .await;
            self.record(snap, &done);
            return keep;
        }
        let (keep, error) = self
            .forward(io, plan, snap, &upstream_head[..], answer, last, &mut done)
            .await;
        let error_text;
        if let Some((code, e)) = error {
            // The backend's failure (the gateway's own refusals carry no error): logged.
            error_text = format!("{}, status: {code}", e.text());
            done.error = Some(&error_text);
            log::error!(
                "Fail to proxy: {}, status: {code}, backend: {}, id={}",
                e.text(),
                done.backend.as_ref().map_or("-", |b| b.label.as_str()),
                String::from_utf8_lossy(request_id),
            );
        }
        self.record(snap, &done);
        keep
    }

    /// Send the request to a backend (retrying as the pingora path does) and relay its
    /// answer; answer an error itself when no backend answered. Returns whether the client
    /// connection stays open and the backend error, if any.
    #[allow(clippy::too_many_arguments)]
    async fn forward<'a>(
        &self,
        io: &mut HeadDeadline,
        plan: &Plan,
        snap: &Snapshot,
        upstream_head: &[u8],
        answer: &mut Vec<u8>,
        last: bool,
        done: &mut Finished<'a>,
    ) -> (bool, Option<(u16, UpstreamError)>) {
        let cfg = &snap.config;
        let t = cfg.timeouts;
        let request_id = &upstream_head[plan.request_id.clone()];
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut fresh_only = false;
        // The backend to try again on a new connection (a stale pooled one failed).
        let mut again: Option<Backend> = None;
        loop {
            let Some(backend) = again.take().or_else(|| self.upstreams.select(&tried)) else {
                return self
                    .refuse(
                        io,
                        answer,
                        Rejection::NoHealthyBackend,
                        None,
                        &[],
                        request_id,
                        last,
                        done,
                    )
                    .await;
            };
            let addr = *backend.as_inet().expect("backends are inet addresses");
            let state = state_of(&backend).clone();
            let _slot = match state.gate.enter(&cfg.backend_queue).await {
                Ok(slot) => slot,
                Err(reason) => {
                    return self
                        .refuse(io, answer, reason, None, &[], request_id, last, done)
                        .await;
                }
            };
            let pooled = if fresh_only {
                None
            } else {
                take_idle(&state, t.idle)
            };
            let reused = pooled.is_some();
            let mut conn = match pooled {
                Some(conn) => conn,
                None => match connect(addr, t.connect).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        state.metrics.connect_failures.inc();
                        tried.push(addr);
                        // Nothing was sent: another backend is safe for every method.
                        if tried.len() <= cfg.connect_retries {
                            self.metrics.retries_connect.inc();
                            continue;
                        }
                        done.backend = Some(state);
                        return self.backend_failed(io, answer, e, request_id, done).await;
                    }
                },
            };
            let head = send_and_read_head(&mut conn, upstream_head, answer, t.write, t.read).await;
            let head = match head {
                Ok(h) => h,
                Err((e, got_bytes)) => {
                    // A pooled connection the backend had closed: once more on a new connection
                    // to the same backend (pingora's rule), which does not count against it.
                    // Else an idempotent one goes to another backend when configured.
                    let retry = if !plan.idempotent {
                        // Sent: it may have been acted on (pingora's path does not retry it).
                        false
                    } else if reused && !got_bytes && !fresh_only {
                        fresh_only = true;
                        again = Some(backend);
                        true
                    } else if cfg.retry_idempotent {
                        tried.push(addr);
                        fresh_only = false;
                        true
                    } else {
                        false
                    };
                    if retry {
                        self.metrics.retries_after_send.inc();
                        continue;
                    }
                    done.backend = Some(state);
                    return self.backend_failed(io, answer, e, request_id, done).await;
                }
            };
            done.backend = Some(state.clone());
            return self
                .relay(
                    io, plan, conn, head, &state, request_id, answer, last, done, t.read,
                )
                .await;
        }
    }

    /// The backend's answer to the client: its head (hop-by-hop headers replaced, the request
    /// id added), then its body as it was framed.
    #[allow(clippy::too_many_arguments)]
    async fn relay<'a>(
        &self,
        io: &mut HeadDeadline,
        plan: &Plan,
        mut conn: UpConn,
        head: AnswerHead,
        state: &BackendState,
        request_id: &[u8],
        answer: &mut Vec<u8>,
        last: bool,
        done: &mut Finished<'a>,
        read_timeout: Duration,
    ) -> (bool, Option<(u16, UpstreamError)>) {
        let framing = if plan.is_head || head.status == 204 || head.status == 304 {
            Framing::None
        } else {
            head.framing
        };
        let keep_client = !last && framing != Framing::UntilClose;
        // `answer` holds the rewritten status line and headers (`send_and_read_head`).
        push_header(answer, b"X-Request-Id", request_id);
        push_header(answer, b"Date", get_cached_date().as_bytes());
        answer.extend_from_slice(if keep_client {
            b"Connection: keep-alive\r\n\r\n"
        } else {
            b"Connection: close\r\n\r\n"
        });
        done.status = head.status;
        let start = head.len;
        // A body that fits the relay buffer is gathered whole and goes out with the head in
        // one write (as pingora's path does with `buffers.client_write_bytes`).
        if let Framing::Length(n) = framing {
            while conn.buf.len() - start < n && n <= RELAY_BYTES {
                if let Err(e) = read_upstream(&mut conn.tcp, &mut conn.buf, read_timeout).await {
                    return self.backend_failed(io, answer, e, request_id, done).await;
                }
            }
        }
        let have = conn.buf.len() - start;
        let mut upstream_reusable = head.keep_alive;
        let sent = match framing {
            Framing::None => {
                upstream_reusable &= have == 0;
                write_client(io, answer).await
            }
            Framing::Length(n) if have >= n => {
                upstream_reusable &= have == n;
                answer.extend_from_slice(&conn.buf[start..start + n]);
                write_client(io, answer).await
            }
            _ => {
                let mut body = conn.buf.split_off(start);
                let r = self
                    .stream_body(io, &mut conn.tcp, answer, &mut body, framing, read_timeout)
                    .await;
                match r {
                    Ok(clean) => {
                        upstream_reusable &= clean;
                        true
                    }
                    Err(Some(e)) => {
                        // The head is out: all the client can learn is a cut answer.
                        return (false, Some((head.status, e)));
                    }
                    Err(None) => false,
                }
            }
        };
        // (A body delimited by the close never leaves it reusable.)
        if upstream_reusable {
            put_idle(state, conn, self.snapshot.load().config.keepalive_pool);
        }
        (sent && keep_client, None)
    }

    /// Relay a body that is not whole in the buffer: the head and what arrived, then the
    /// rest as it comes. Ok(true) when it ended exactly (the connection can be reused);
    /// Err(Some) when the backend failed, Err(None) when the client did.
    async fn stream_body(
        &self,
        io: &mut HeadDeadline,
        tcp: &mut TcpStream,
        answer: &mut Vec<u8>,
        body: &mut Vec<u8>,
        framing: Framing,
        read_timeout: Duration,
    ) -> Result<bool, Option<UpstreamError>> {
        let mut chunks = Chunks::new();
        let mut left = match framing {
            Framing::Length(n) => n,
            _ => usize::MAX,
        };
        // The first piece goes with the head.
        let mut piece = std::mem::take(body);
        let mut first = true;
        loop {
            let mut end = false;
            let mut exact = true;
            match framing {
                Framing::Length(_) => {
                    let n = piece.len().min(left);
                    exact = piece.len() <= left;
                    piece.truncate(n);
                    left -= n;
                    end = left == 0;
                }
                Framing::Chunked => match chunks.feed(&piece) {
                    Ok(Some(n)) => {
                        exact = n == piece.len();
                        piece.truncate(n);
                        end = true;
                    }
                    Ok(None) => {}
                    Err(()) => return Err(Some(UpstreamError::Invalid)),
                },
                _ => {}
            }
            let ok = if first {
                answer.extend_from_slice(&piece);
                first = false;
                write_client(io, answer).await
            } else {
                write_client(io, &piece).await
            };
            if !ok {
                return Err(None);
            }
            if end {
                return Ok(exact);
            }
            piece.clear();
            piece.reserve(RELAY_BYTES);
            match tokio::time::timeout(read_timeout, tcp.read_buf(&mut piece)).await {
                Ok(Ok(0)) if framing == Framing::UntilClose => return Ok(false),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Some(UpstreamError::Closed)),
                Ok(Ok(_)) => {}
                Err(_) => return Err(Some(UpstreamError::ReadTimeout)),
            }
        }
    }

    /// The gateway's own refusal (rate limit, slow body, no backend, backend queue), counted
    /// with its reason; `retry_after` defaults to 1 s for a 429 or 503. `close`: the
    /// connection cannot serve another request (its last, or a body left unread).
    #[allow(clippy::too_many_arguments)]
    async fn refuse<'a>(
        &self,
        io: &mut HeadDeadline,
        answer: &mut Vec<u8>,
        reason: Rejection,
        retry_after: Option<u64>,
        headers: &[(&'static str, String)],
        request_id: &[u8],
        close: bool,
        done: &mut Finished<'a>,
    ) -> (bool, Option<(u16, UpstreamError)>) {
        self.metrics.reject(reason);
        done.rejection = Some(reason);
        done.status = reason.status();
        let retry_after = retry_after.or_else(|| matches!(reason.status(), 429 | 503).then_some(1));
        let keep = keeps_connection(reason.status(), close);
        let ok = self
            .answer_error(
                io,
                answer,
                reason.status(),
                reason.message(),
                retry_after,
                headers,
                request_id,
                keep,
            )
            .await;
        (ok && keep, None)
    }

    /// A backend that did not answer: 502 or 504, the connection closed after it.
    async fn backend_failed<'a>(
        &self,
        io: &mut HeadDeadline,
        answer: &mut Vec<u8>,
        e: UpstreamError,
        request_id: &[u8],
        done: &mut Finished<'a>,
    ) -> (bool, Option<(u16, UpstreamError)>) {
        let (code, message) = e.answer();
        done.status = code;
        self.answer_error(io, answer, code, message, None, &[], request_id, false)
            .await;
        (false, Some((code, e)))
    }

    #[allow(clippy::too_many_arguments)]
    async fn answer_error(
        &self,
        io: &mut HeadDeadline,
        answer: &mut Vec<u8>,
        status: u16,
        message: &str,
        retry_after: Option<u64>,
        headers: &[(&'static str, String)],
        request_id: &[u8],
        keep_alive: bool,
    ) -> bool {
        answer.clear();
        let date = get_cached_date();
        let extras = RawExtras {
            request_id: Some(request_id),
            headers,
            date: Some(date.as_bytes()),
            keep_alive,
        };
        raw_answer(answer, status, message, retry_after, &extras);
        write_client(io, answer).await
    }
}

/// A request's record, before its outcome is known.
fn finished<'a>(
    plan: &Plan,
    buf: &'a [u8],
    request_id: &'a [u8],
    started: Instant,
) -> Finished<'a> {
    Finished {
        started,
        status: 0,
        backend: None,
        rejection: None,
        client_ip: Some(plan.client_ip),
        method: std::str::from_utf8(&buf[plan.method.clone()]).unwrap_or("-"),
        target: std::str::from_utf8(&buf[plan.target.clone()]).unwrap_or("-"),
        request_id,
        error: None,
        fast: true,
    }
}

/// Read a request's Content-Length body into `buf` after its head, under the same rules as
/// pingora's path (`request_body_filter`): each read within `slow_clients.body_idle_timeout`
/// (else 408 `client_timeout`), and an unfinished body keeping up with `body_min_rate` after
/// its grace (else 408 `body_too_slow`). Err(None): the client went away.
async fn read_body(
    io: &mut HeadDeadline,
    buf: &mut Vec<u8>,
    plan: &Plan,
    snap: &Snapshot,
) -> Result<(), Option<Rejection>> {
    let cfg = &snap.config;
    let want = plan.head_len + plan.body_len;
    let started = Instant::now();
    while buf.len() < want {
        if cfg.body_min_rate > 0 {
            let got = (buf.len() - plan.head_len) as f64;
            let allowed =
                cfg.body_min_rate_grace + Duration::from_secs_f64(got / cfg.body_min_rate as f64);
            if started.elapsed() > allowed {
                return Err(Some(Rejection::BodyTooSlow));
            }
        }
        buf.reserve((want - buf.len()).min(RELAY_BYTES * 4));
        match tokio::time::timeout(cfg.body_idle_timeout, io.read_buf(buf)).await {
            Err(_) => return Err(Some(Rejection::ClientTimeout)),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(None),
            Ok(Ok(_)) => {}
        }
    }
    Ok(())
}

/// What the fast path needs of an answer head.
struct AnswerHead {
    status: u16,
    /// The length of the head as received; the body bytes that came with it follow.
    len: usize,
    framing: Framing,
    keep_alive: bool,
}

async fn connect(addr: SocketAddr, limit: Duration) -> Result<UpConn, UpstreamError> {
    match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(UpConn {
                tcp,
                buf: Vec::with_capacity(RELAY_BYTES),
            })
        }
        Ok(Err(_)) => Err(UpstreamError::ConnectRefused),
        Err(_) => Err(UpstreamError::ConnectTimeout),
    }
}

/// The most recently idle connection that is still open. One the backend closed (or wrote
/// to unasked) is known from the readiness the runtime already has, without a syscall unless
/// it became readable: such a connection is dropped here rather than found dead by a request.
fn take_idle(state: &BackendState, max_idle: Duration) -> Option<UpConn> {
    let mut idle = state.idle.lock().expect("idle pool");
    while let Some(c) = idle.pop() {
        let open = matches!(c.conn.tcp.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        if open && c.since.elapsed() < max_idle {
            return Some(c.conn);
        }
    }
    None
}

fn put_idle(state: &BackendState, conn: UpConn, cap: usize) {
    if cap == 0 {
        return;
    }
    let mut idle = state.idle.lock().expect("idle pool");
    if idle.len() >= cap {
        // The oldest goes (it is the likeliest to have been closed by the backend).
        idle.remove(0);
    }
    idle.push(Idle {
        conn,
        since: Instant::now(),
    });
}

async fn write_client(io: &mut HeadDeadline, data: &[u8]) -> bool {
    io.write_all(data).await.is_ok() && io.flush().await.is_ok()
}

/// Write the request head, read the answer's head (skipping 1xx interim answers). On
/// success `answer` holds the head as the client gets it, less its end (the gateway's
/// headers and the blank line), and `conn.buf` the head as received (`AnswerHead::len` bytes)
/// and the body bytes that came with it. The error says whether any answer byte arrived.
async fn send_and_read_head(
    conn: &mut UpConn,
    head: &[u8],
    answer: &mut Vec<u8>,
    write_timeout: Duration,
    read_timeout: Duration,
) -> Result<AnswerHead, (UpstreamError, bool)> {
    match tokio::time::timeout(write_timeout, conn.tcp.write_all(head)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err((UpstreamError::Closed, false)),
        Err(_) => return Err((UpstreamError::WriteTimeout, false)),
    }
    let buf = &mut conn.buf;
    buf.clear();
    loop {
        let parsed = {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut res = httparse::Response::new(&mut headers);
            match res.parse(buf) {
                Ok(httparse::Status::Complete(len)) => {
                    Some((len, rewrite_answer_head(&res, answer)))
                }
                Ok(httparse::Status::Partial) => None,
                Err(_) => return Err((UpstreamError::Invalid, true)),
            }
        };
        match parsed {
            Some((len, Ok(Some(mut head)))) => {
                head.len = len;
                return Ok(head);
            }
            // An interim 1xx: dropped (as nginx does), the final answer follows.
            Some((len, Ok(None))) => {
                buf.drain(..len);
                continue;
            }
            Some((_, Err(()))) => return Err((UpstreamError::Invalid, true)),
            None => {
                if buf.len() > MAX_ANSWER_HEAD {
                    return Err((UpstreamError::Invalid, true));
                }
                let before = buf.is_empty();
                if let Err(e) = read_upstream(&mut conn.tcp, buf, read_timeout).await {
                    return Err((e, !before));
                }
            }
        }
    }
}

/// From a parsed answer head: None for an interim answer (dropped), else what the client
/// gets of the head, less its end, written to `out` (`AnswerHead::len` is the caller's).
fn rewrite_answer_head(
    res: &httparse::Response,
    out: &mut Vec<u8>,
) -> Result<Option<AnswerHead>, ()> {
    let status = res.code.ok_or(())?;
    if (100..200).contains(&status) {
        if status == 101 {
            return Err(());
        }
        return Ok(None);
    }
    let mut framing = Framing::UntilClose;
    let mut keep_alive = res.version == Some(1);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in res.headers.iter() {
        let n = h.name;
        if eq(n, "transfer-encoding") {
            let chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            framing = if chunked {
                Framing::Chunked
            } else {
                Framing::UntilClose
            };
        } else if eq(n, "content-length") {
            // With a Transfer-Encoding as well, the length is ignored and not forwarded
            // (RFC 9112 section 6.3).
            if res.headers.iter().any(|h| eq(h.name, "transfer-encoding")) {
                continue;
            }
            let n: usize = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(())?;
            if matches!(framing, Framing::Length(m) if m != n) {
                return Err(());
            }
            framing = Framing::Length(n);
        } else if eq(n, "connection") {
            if h.value
                .split(|&b| b == b',')
                .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"close"))
            {
                keep_alive = false;
            }
            continue;
        }
        if eq(n, "keep-alive")
            || eq(n, "proxy-connection")
            || eq(n, "x-request-id")
            || eq(n, "date")
        {
            continue;
        }
        push_header(out, n.as_bytes(), h.value);
    }
    Ok(Some(AnswerHead {
        status,
        len: 0,
        framing,
        keep_alive,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_end_where_the_last_chunk_and_trailers_end() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\n";
        // Whole, then byte by byte: the same end.
        assert_eq!(Chunks::new().feed(body), Ok(Some(body.len())));
        let mut c = Chunks::new();
        let ends: Vec<_> = body.iter().map(|b| c.feed(&[*b])).collect();
        assert!(ends[..body.len() - 1].iter().all(|e| *e == Ok(None)));
        assert_eq!(ends[body.len() - 1], Ok(Some(1)));
        // Bytes after the end are not the body's.
        let mut more = body.to_vec();
        more.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(Chunks::new().feed(&more), Ok(Some(body.len())));
        assert_eq!(Chunks::new().feed(b"zz\r\n"), Err(()));
    }

    #[test]
    fn answer_heads_are_rewritten_for_the_client() {
        let parse = |raw: &[u8]| {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut res = httparse::Response::new(&mut headers);
            let httparse::Status::Complete(len) = res.parse(raw).unwrap() else {
                panic!("a whole head")
            };
            let mut out = Vec::new();
            rewrite_answer_head(&res, &mut out).map(|h| h.map(|h| (h, out, len)))
        };
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\nDate: x\r\nX-Request-Id: theirs\r\nX-A: b\r\n\r\nhi";
        let (head, out, len) = parse(raw).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert!(head.framing == Framing::Length(2));
        assert!(!head.keep_alive);
        assert_eq!(
            &out[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n"
        );
        assert_eq!(&raw[len..], b"hi");
        let (head, _, _) = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(head.framing == Framing::Chunked && head.keep_alive);
        // A length beside a Transfer-Encoding is ignored and not passed on.
        let (head, out, _) =
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(head.framing == Framing::Chunked);
        assert_eq!(
            &out[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
        );
        let (head, _, _) = parse(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(head.framing == Framing::UntilClose && !head.keep_alive);
        // Interim answers are dropped; conflicting lengths and 101 are refused.
        assert!(parse(b"HTTP/1.1 103 Early Hints\r\n\r\n")
            .unwrap()
            .is_none());
        assert!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n").is_err()
        );
        assert!(parse(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").is_err());
    }
}
