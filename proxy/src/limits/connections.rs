//! Downstream connections: exact open-connection caps (per client IP and in total) and the
//! deadline for a whole request head.
//!
//! pingora has no connection-close hook, so the proxy app is wrapped ([`ConnectionTracked`]):
//! the wrapper owns the keep-alive loop of a connection and holds a [`ConnectionGuard`] for
//! exactly as long as the connection is open, idle keep-alive time and slow header bytes
//! included (nginx's `limit_conn` counts only connections with a request in flight).
//!
//! A client refused again within a second of its 503 is turned away earlier, in pingora's
//! accept loop ([`AcceptFilter`]): no task, no answer, a quarter less CPU per refusal under a
//! connection flood.
//!
//! The head deadline wraps the connection's byte stream ([`HeadDeadline`]): pingora's own
//! header timeout restarts on every read, so a client sending one byte a second would
//! never hit it; ours runs from the first byte of a request head (from accept for the first
//! request) to the blank line that ends it.
//!
//! The same wrapper gives pingora's two answers that no filter sees the gateway's shape: a
//! head pingora cannot parse, and a CONNECT request, are answered by pingora itself with an
//! empty 400 or 405 before any `ProxyHttp` hook runs. The wrapper recognises that exact answer
//! ([`pingora_error_answer`]) as it is written, writes the gateway's JSON answer in its
//! place, and counts it (`malformed_request`, `connect_method`).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::ConnectionFilter;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use pingora::protocols::{SocketDigest, TimingDigest};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::proxy_protocol::{self, Source};
use super::Snapshot;
use crate::config::GatewayConfig;
use crate::fast::Outcome;
use crate::metrics::{Metrics, Rejection};
use crate::proxy::Gateway;
use crate::responses;

const SHARDS: usize = 16;

/// Open connections, in total and per client IP. Entries exist only while an IP holds a
/// connection, so memory is bounded by the total cap.
pub struct ConnectionCounter {
    total: AtomicUsize,
    per_ip: [Mutex<HashMap<IpAddr, IpConnections>>; SHARDS],
    /// When a connection over the total cap was last answered (ms since `epoch`; 0: never).
    total_answered_ms: AtomicU64,
    epoch: Instant,
    metrics: Arc<Metrics>,
}

/// One client IP's open connections, and when one over its cap was last answered with a 503
/// (ms since the counter's epoch; 0: never).
#[derive(Default)]
struct IpConnections {
    open: u32,
    answered_ms: u64,
}

/// Connections refused again within this long after a 503 answer are closed in the accept
/// loop without one (a client told once does not need telling a thousand times a second).
const ANSWER_EVERY_MS: u64 = 1000;

/// Releases one connection's counts when dropped, however the connection ends.
pub struct ConnectionGuard {
    counter: Arc<ConnectionCounter>,
    /// The IP whose per-IP count this connection holds (None when not counted per IP).
    ip: Option<IpAddr>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            self.counter.release_ip(ip);
        }
        self.counter.total.fetch_sub(1, Ordering::AcqRel);
        self.counter.metrics.downstream_connections.dec();
    }
}

impl ConnectionCounter {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(ConnectionCounter {
            total: AtomicUsize::new(0),
            per_ip: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            total_answered_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
        })
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, IpConnections>> {
        let h = match ip {
            IpAddr::V4(v4) => u32::from(*v4) as usize,
            IpAddr::V6(v6) => (u128::from(*v6) as usize) ^ ((u128::from(*v6) >> 64) as usize),
        };
        &self.per_ip[h.wrapping_mul(0x9E37_79B9) % SHARDS]
    }

    /// Count a new connection, or refuse it. `per_ip_cap` None: not counted per IP (exempt
    /// clients, trusted proxies); 0 caps mean unlimited.
    pub fn try_open(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        per_ip_cap: Option<usize>,
        total_cap: usize,
    ) -> Result<ConnectionGuard, Rejection> {
        let before = self.total.fetch_add(1, Ordering::AcqRel);
        if total_cap > 0 && before >= total_cap {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejection::ConnectionsTotal);
        }
        let counted_ip = match (ip, per_ip_cap) {
            (Some(ip), Some(cap)) => {
                let mut map = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
                let entry = map.entry(ip).or_default();
                if cap > 0 && entry.open as usize >= cap {
                    if entry.open == 0 {
                        map.remove(&ip);
                    }
                    drop(map);
                    self.total.fetch_sub(1, Ordering::AcqRel);
                    return Err(Rejection::ConnectionsPerIp);
                }
                entry.open += 1;
                if entry.open == 1 {
                    self.metrics.downstream_client_ips.inc();
                }
                Some(ip)
            }
            _ => None,
        };
        self.metrics.downstream_connections.inc();
        Ok(ConnectionGuard {
            counter: self.clone(),
            ip: counted_ip,
        })
    }

    fn release_ip(&self, ip: IpAddr) {
        let mut map = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&ip) {
            entry.open -= 1;
            if entry.open == 0 {
                map.remove(&ip);
                self.metrics.downstream_client_ips.dec();
            }
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 keeps meaning "never".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Record that a connection refused for `reason` was answered with a 503.
    fn answered(&self, ip: Option<IpAddr>, reason: Rejection) {
        let now = self.now_ms();
        match (reason, ip) {
            (Rejection::ConnectionsPerIp, Some(ip)) => {
                let mut map = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
                if let Some(entry) = map.get_mut(&ip) {
                    entry.answered_ms = now;
                }
            }
            _ => self.total_answered_ms.store(now, Ordering::Relaxed),
        }
    }

    /// Whether a new connection would be refused and was already answered within the last
    /// second: then it is closed in the accept loop, without a task or an answer. A read of
    /// the counts only; `try_open` stays the exact check.
    pub fn refuse_quietly(
        &self,
        ip: IpAddr,
        per_ip_cap: Option<usize>,
        total_cap: usize,
    ) -> Option<Rejection> {
        let recent = |at: u64| at > 0 && self.now_ms().saturating_sub(at) < ANSWER_EVERY_MS;
        if total_cap > 0
            && self.total.load(Ordering::Acquire) >= total_cap
            && recent(self.total_answered_ms.load(Ordering::Relaxed))
        {
            return Some(Rejection::ConnectionsTotal);
        }
        let cap = per_ip_cap.filter(|&c| c > 0)?;
        let map = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.get(&ip)?;
        (entry.open as usize >= cap && recent(entry.answered_ms))
            .then_some(Rejection::ConnectionsPerIp)
    }
}

fn is_trusted(c: &GatewayConfig, ip: IpAddr) -> bool {
    c.trusted_proxies.iter().any(|n| n.contains(ip))
}

/// Whether a connection from `ip` must open with a PROXY protocol header (its client is not
/// known before the header is read).
fn expects_proxy_header(c: &GatewayConfig, ip: IpAddr) -> bool {
    c.proxy_protocol && is_trusted(c, ip)
}

/// The per-IP connection cap for a peer: None for exempt clients and trusted proxies (many
/// clients behind one address).
fn per_ip_cap(c: &GatewayConfig, ip: Option<IpAddr>) -> Option<usize> {
    let exempt = ip.is_some_and(|ip| c.exempt.iter().any(|n| n.contains(ip)) || is_trusted(c, ip));
    (!exempt).then_some(c.conn_per_ip)
}

/// Runs in pingora's accept loop: a connection that would be refused again within a second
/// of a 503 answer to the same client (or, at the total cap, to anyone) is closed there,
/// before a task is spawned for it. Counted like every refusal.
pub struct AcceptFilter {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub counter: Arc<ConnectionCounter>,
    pub metrics: Arc<Metrics>,
}

impl fmt::Debug for AcceptFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AcceptFilter")
    }
}

#[async_trait]
impl ConnectionFilter for AcceptFilter {
    async fn should_accept(&self, addr: Option<&std::net::SocketAddr>) -> bool {
        let Some(ip) = addr.map(|a| a.ip()) else {
            return true;
        };
        let snap = self.snapshot.load();
        let c = &snap.config;
        if expects_proxy_header(c, ip) {
            return true;
        }
        match self
            .counter
            .refuse_quietly(ip, per_ip_cap(c, Some(ip)), c.conn_total)
        {
            Some(reason) => {
                self.metrics.reject(reason);
                false
            }
            None => true,
        }
    }
}

/// Wraps the proxy app: caps connections, applies the head deadline, counts open ones.
pub struct ConnectionTracked<A> {
    pub inner: Arc<A>,
    /// The fast path for plain requests ([`crate::fast`], when `fast_path` is on); the rest
    /// go to `inner`.
    pub fast: Arc<Gateway>,
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub counter: Arc<ConnectionCounter>,
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ConnectionTracked<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        // One config for the whole set-up of this connection; let go of before its requests,
        // so a long keep-alive connection does not hold an old config after a reload.
        let snap = self.snapshot.load_full();
        let c = &snap.config;
        let head_timeout = c.header_timeout;
        let mut peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        if peer.is_some_and(|ip| expects_proxy_header(c, ip)) {
            match proxy_protocol::accept(stream, accepted + head_timeout).await {
                Ok((s, source)) => {
                    stream = s;
                    if let Source::Client(addr) = source {
                        peer = Some(addr.ip());
                    }
                }
                Err((s, why)) => {
                    self.metrics.reject(Rejection::ProxyProtocol);
                    if let Some(mut s) = s {
                        let _ = s.write_all(&responses::raw_error(400, why, None)).await;
                        let _ = s.flush().await;
                    }
                    return None;
                }
            }
        }
        let _guard = match self
            .counter
            .try_open(peer, per_ip_cap(c, peer), c.conn_total)
        {
            Ok(g) => g,
            Err(reason) => {
                self.metrics.reject(reason);
                // A minimal answer, then close: the client learns why instead of a reset.
                let _ = stream
                    .write_all(&responses::raw_error(503, reason.message(), Some(1)))
                    .await;
                let _ = stream.flush().await;
                self.counter.answered(peer, reason);
                return None;
            }
        };
        let fast = c.fast_path;
        drop(snap);
        let first_due = accepted + head_timeout;
        let mut io = HeadDeadline::new(stream, head_timeout, first_due, self.metrics.clone());
        if fast {
            match self.fast.serve_fast(&mut io, shutdown).await {
                Outcome::Closed => return None,
                Outcome::Pingora => {}
            }
        }
        let mut next: Option<Stream> = Some(Box::new(io));
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// A stream that fails reads once a request head has taken longer than its deadline, and
/// turns pingora's own empty error answers into the gateway's JSON ones.
pub struct HeadDeadline {
    inner: Stream,
    metrics: Arc<Metrics>,
    /// The gateway's answer being written in place of pingora's, how much of it is out, and
    /// the length of pingora's write it stands for.
    replacing: Option<(Vec<u8>, usize, usize)>,
    timeout: Duration,
    /// When the head being received must be complete.
    due: Instant,
    /// Armed only when a read inside a head has to wait for more bytes, so a head that
    /// arrives whole (nearly every request of a well-behaved client) costs no timer.
    timer: Option<Pin<Box<Sleep>>>,
    in_head: bool,
    /// A response was written since the last head ended: the next bytes start a new head.
    responded: bool,
    /// The last bytes of the head so far, to find "\r\n\r\n" across reads.
    tail: [u8; 3],
    tail_len: usize,
    /// Some byte arrived on this connection: a late head gets an answer.
    received_any: bool,
    /// The deadline was missed (counted and answered once).
    timed_out: bool,
    /// Bytes the fast path read and handed back ([`HeadDeadline::rewind`]), read again
    /// before the socket; `rewound_at` of them already were.
    rewound: Vec<u8>,
    rewound_at: usize,
}

impl fmt::Debug for HeadDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadDeadline")
            .field("inner", &self.inner)
            .field("in_head", &self.in_head)
            .finish()
    }
}

impl HeadDeadline {
    /// `first_due`: when the first head must be complete (accept + timeout, like nginx's
    /// client_header_timeout; a PROXY protocol header counts against it too).
    pub fn new(
        inner: Stream,
        timeout: Duration,
        first_due: Instant,
        metrics: Arc<Metrics>,
    ) -> Self {
        HeadDeadline {
            inner,
            metrics,
            replacing: None,
            timeout,
            due: first_due,
            timer: None,
            in_head: true,
            responded: false,
            tail: [0; 3],
            tail_len: 0,
            received_any: false,
            timed_out: false,
            rewound: Vec::new(),
            rewound_at: 0,
        }
    }

    /// Put bytes already read (and seen by the head tracking) back in front of the socket's,
    /// for pingora to read when the fast path hands it the connection.
    pub fn rewind(&mut self, data: Vec<u8>) {
        debug_assert!(
            self.rewound_at >= self.rewound.len(),
            "one rewind at a time"
        );
        self.rewound = data;
        self.rewound_at = 0;
    }

    /// Track head boundaries in newly read bytes.
    fn observe(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.received_any = true;
        if !self.in_head && self.responded {
            self.in_head = true;
            self.responded = false;
            self.tail_len = 0;
            self.due = Instant::now() + self.timeout;
        }
        if !self.in_head {
            return;
        }
        // The blank line may straddle two reads: check the seam, then the new bytes.
        let mut seam = [0u8; 6];
        let n = self.tail_len;
        let m = data.len().min(3);
        seam[..n].copy_from_slice(&self.tail[..n]);
        seam[n..n + m].copy_from_slice(&data[..m]);
        let end = |b: &[u8]| b.windows(4).any(|w| w == b"\r\n\r\n");
        if end(&seam[..n + m]) || end(data) {
            self.in_head = false;
            self.tail_len = 0;
            return;
        }
        let joined = &seam[..n + m];
        let last = if data.len() >= 3 {
            &data[data.len() - 3..]
        } else {
            &joined[joined.len().saturating_sub(3)..]
        };
        self.tail[..last.len()].copy_from_slice(last);
        self.tail_len = last.len();
    }
}

impl AsyncRead for HeadDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rewound_at < this.rewound.len() {
            let n = buf.remaining().min(this.rewound.len() - this.rewound_at);
            buf.put_slice(&this.rewound[this.rewound_at..this.rewound_at + n]);
            this.rewound_at += n;
            if this.rewound_at == this.rewound.len() {
                this.rewound = Vec::new();
                this.rewound_at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        if this.in_head && Instant::now() >= this.due {
            return this.late(cx);
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) => this.observe(&buf.filled()[before..]),
            Poll::Pending if this.in_head => {
                // Waiting for the rest of a head: be woken at its deadline.
                let due = this.due;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                if timer.deadline() != due {
                    timer.as_mut().reset(due);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return this.late(cx);
                }
            }
            _ => {}
        }
        r
    }
}

impl HeadDeadline {
    /// The head missed its deadline: counted, answered 408 if any of it had arrived (one write
    /// attempt, best effort; a connection that never sent a byte, such as a browser's
    /// pre-connect, is closed without one, as nginx does), and the read fails, so pingora
    /// closes the connection.
    fn late(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.timed_out {
            self.timed_out = true;
            let reason = Rejection::HeaderTimeout;
            self.metrics.reject(reason);
            if self.received_any {
                let answer = responses::raw_error(reason.status(), reason.message(), None);
                let inner = Pin::new(&mut self.inner);
                if let Poll::Ready(Ok(_)) = inner.poll_write(cx, &answer) {
                    let _ = Pin::new(&mut self.inner).poll_flush(cx);
                }
            }
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "request head not received within slow_clients.header_timeout",
        )))
    }

    /// When `data` (one whole write) is pingora's own answer to a head it rejected, write the
    /// gateway's answer in its place, counted; `None` for every other write. Done when all of
    /// it is out (pingora's `write_all` offers the same bytes again after `Pending`).
    fn poll_replacing(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Option<Poll<io::Result<usize>>> {
        if self.replacing.is_none() {
            let reason = pingora_error_answer(data)?;
            self.metrics.reject(reason);
            let answer = responses::raw_error(reason.status(), reason.message(), None);
            self.replacing = Some((answer, 0, data.len()));
        }
        let (answer, written, len) = self.replacing.as_mut()?;
        while *written < answer.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(0)) => {
                    return Some(Poll::Ready(Err(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => *written += n,
                other => return Some(other),
            }
        }
        let len = *len;
        self.replacing = None;
        self.responded = true;
        Some(Poll::Ready(Ok(len)))
    }
}

/// pingora answers a head it cannot parse (400) and a CONNECT request (405) itself, before
/// any hook, with a fixed empty response (`pingora_core::protocols::http::error_resp`):
/// status line, `Server: Pingora`, `Date`, `Content-Length: 0`, `Cache-Control: private,
/// no-store`, `Connection: close`. Only that exact shape, written whole, is recognised: it has
/// no body and closes the connection, so answering differently cannot break any framing. A
/// proxied answer does not have it (the gateway adds `X-Request-Id` to every one, after the
/// backend's headers); a backend that sent exactly this shape would have its empty 400 or
/// 405 delivered with the gateway's JSON body instead.
fn pingora_error_answer(data: &[u8]) -> Option<Rejection> {
    const ANSWERS: [(&[u8], Rejection); 2] = [
        (
            b"HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\nDate: ",
            Rejection::MalformedRequest,
        ),
        (
            b"HTTP/1.1 405 Method Not Allowed\r\nServer: Pingora\r\nDate: ",
            Rejection::ConnectMethod,
        ),
    ];
    const TAIL: &[u8] =
        b"\r\nContent-Length: 0\r\nCache-Control: private, no-store\r\nConnection: close\r\n\r\n";
    // Every write of every response passes here: two bytes of the status code rule out
    // nearly all of them.
    if data.len() > 256 || data.get(9..11) != Some(b"40") || !data.ends_with(TAIL) {
        return None;
    }
    ANSWERS
        .iter()
        .find(|(head, _)| data.starts_with(head))
        .map(|&(_, reason)| reason)
}

impl AsyncWrite for HeadDeadline {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(replaced) = this.poll_replacing(cx, data) {
            return replaced;
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.responded = true;
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.responded = true;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for HeadDeadline {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for HeadDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadDeadline {}

impl GetTimingDigest for HeadDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, d: SocketDigest) {
        self.inner.set_socket_digest(d)
    }
}

#[async_trait]
impl Peek for HeadDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let rewound = &self.rewound[self.rewound_at..];
        if !rewound.is_empty() {
            let n = buf.len().min(rewound.len());
            buf[..n].copy_from_slice(&rewound[..n]);
            return Ok(true);
        }
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pingoras_own_empty_answers_are_replaced() {
        let tail =
            "Content-Length: 0\r\nCache-Control: private, no-store\r\nConnection: close\r\n\r\n";
        let date = "Date: Mon, 23 Nov 2026 15:40:40 GMT\r\n";
        let canned = |status: &str| format!("HTTP/1.1 {status}\r\nServer: Pingora\r\n{date}{tail}");
        let answer = |s: String| pingora_error_answer(s.as_bytes());
        assert_eq!(
            answer(canned("400 Bad Request")),
            Some(Rejection::MalformedRequest)
        );
        assert_eq!(
            answer(canned("405 Method Not Allowed")),
            Some(Rejection::ConnectMethod)
        );
        // Other statuses pingora answers itself go through `fail_to_proxy` already.
        assert_eq!(answer(canned("502 Bad Gateway")), None);
        // A backend's 400, even from a pingora server, passed through: it has our request id.
        let proxied = format!(
            "HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\n{date}Content-Length: 0\r\nCache-Control: private, no-store\r\nX-Request-Id: 1\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(answer(proxied), None);
        assert_eq!(answer(format!("{}{{}}", canned("400 Bad Request"))), None);
        assert_eq!(
            answer(format!("HTTP/1.1 400 Bad Request\r\n{date}{tail}")),
            None
        );
    }

    /// pingora's canned 400 written through the wrapper reaches the client as the gateway's
    /// JSON answer, whole, even when the socket takes it in pieces; counted once.
    #[tokio::test]
    async fn a_canned_answer_is_replaced_whole_across_partial_writes() {
        let canned = "HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\nDate: Mon, 23 Nov 2026 15:40:40 GMT\r\n\
                      Content-Length: 0\r\nCache-Control: private, no-store\r\nConnection: close\r\n\r\n";
        let reason = Rejection::MalformedRequest;
        let answer = responses::raw_error(reason.status(), reason.message(), None);
        let (first, rest) = answer.split_at(20);
        let (second, third) = rest.split_at(30);
        let mock = tokio_test::io::Builder::new()
            .write(first)
            .wait(Duration::from_millis(10))
            .write(second)
            .write(third)
            .write(b"after")
            .build();
        let metrics = Metrics::new();
        let mut s = HeadDeadline::new(
            Box::new(mock),
            Duration::from_secs(10),
            Instant::now() + Duration::from_secs(10),
            metrics.clone(),
        );
        s.write_all(canned.as_bytes()).await.unwrap();
        // Later writes pass through untouched (the mock checks every byte).
        s.write_all(b"after").await.unwrap();
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.contains("gateway_rejections_total{reason=\"malformed_request\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn caps_are_exact_and_released() {
        let counter = ConnectionCounter::new(Metrics::new());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let held: Vec<_> = (0..3)
            .map(|_| counter.try_open(Some(a), Some(3), 5).unwrap())
            .collect();
        assert_eq!(
            counter.try_open(Some(a), Some(3), 5).err(),
            Some(Rejection::ConnectionsPerIp)
        );
        let other: Vec<_> = (0..2)
            .map(|_| counter.try_open(Some(b), Some(3), 5).unwrap())
            .collect();
        assert_eq!(
            counter.try_open(Some(b), Some(3), 5).err(),
            Some(Rejection::ConnectionsTotal)
        );
        drop(held);
        drop(other);
        assert_eq!(counter.metrics.downstream_connections.get(), 0);
        assert_eq!(counter.metrics.downstream_client_ips.get(), 0);
        assert!(counter.per_ip.iter().all(|s| s.lock().unwrap().is_empty()));
    }
}
