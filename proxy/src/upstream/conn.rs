//! Connections to backends: connect, the idle pool, and one request's exchange up to the
//! end of the answer's head. Used by every engine ([`crate::forward`]).
//!
//! Idle connections are kept per backend (at most `upstream.keepalive_pool` each, fixed at
//! start) and checked when taken rather than watched by a task while idle: one the backend
//! closed (or wrote to unasked) is known from the readiness the runtime already has, and is
//! dropped; one older than `timeouts.idle` too.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::backend::BackendState;
use crate::forward::answer::{parse_answer_head, AnswerHead};
use crate::policy::outcome::UpstreamError;
use crate::tls::UpstreamTls;

/// The size of the buffer an answer is read into, and of the pieces a body is relayed in
/// (bounded buffering).
pub const RELAY_BYTES: usize = 16 * 1024;
/// Largest answer head read before it is refused as a 502.
const MAX_ANSWER_HEAD: usize = 64 * 1024;

/// An idle keep-alive connection to a backend.
pub struct Idle {
    conn: UpConn,
    since: Instant,
}

/// A connection to a backend and the buffer its answers are read into (kept with it, so a
/// request allocates neither).
pub struct UpConn {
    pub stream: UpStream,
    pub buf: Vec<u8>,
}

/// A connection to a backend: plaintext, or TLS for a pool with `tls:`.
pub enum UpStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            UpStream::Plain(t) => t,
            UpStream::Tls(t) => t.get_ref().0,
        }
    }
}

impl AsyncRead for UpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(t) => Pin::new(t).poll_read(cx, buf),
            UpStream::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpStream::Plain(t) => Pin::new(t).poll_write(cx, buf),
            UpStream::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(t) => Pin::new(t).poll_flush(cx),
            UpStream::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpStream::Plain(t) => Pin::new(t).poll_shutdown(cx),
            UpStream::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connect to `addr`, and for a TLS pool make the handshake, all within `limit`. `host`:
/// the name the backend was resolved from (the default SNI).
pub async fn connect(
    addr: SocketAddr,
    limit: Duration,
    tls: Option<&UpstreamTls>,
    host: Option<&str>,
) -> Result<UpConn, UpstreamError> {
    let open = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|_| UpstreamError::ConnectRefused)?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = tls else {
            return Ok(UpStream::Plain(tcp));
        };
        let name = tls.server_name(addr, host);
        match tokio_rustls::TlsConnector::from(tls.config.clone())
            .connect(name, tcp)
            .await
        {
            Ok(s) => Ok(UpStream::Tls(Box::new(s))),
            Err(e) => {
                log::warn!("TLS handshake with backend {addr} failed: {e}");
                Err(UpstreamError::Tls)
            }
        }
    };
    match tokio::time::timeout(limit, open).await {
        Ok(Ok(stream)) => Ok(UpConn {
            stream,
            buf: Vec::with_capacity(RELAY_BYTES),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(UpstreamError::ConnectTimeout),
    }
}

/// The most recently idle connection that is still open.
pub fn take_idle(state: &BackendState, max_idle: Duration) -> Option<UpConn> {
    let mut idle = state.idle.lock().expect("idle pool");
    while let Some(c) = idle.pop() {
        let open = matches!(c.conn.stream.tcp().try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        if open && c.since.elapsed() < max_idle {
            return Some(c.conn);
        }
    }
    None
}

/// Keep a connection whose last answer ended exactly; at most `cap` per backend, the oldest
/// dropped first (the likeliest to have been closed by the backend).
pub fn put_idle(state: &BackendState, conn: UpConn, cap: usize) {
    if cap == 0 {
        return;
    }
    let mut idle = state.idle.lock().expect("idle pool");
    if idle.len() >= cap {
        idle.remove(0);
    }
    idle.push(Idle {
        conn,
        since: Instant::now(),
    });
}

/// Reads more bytes into `buf` within `limit`.
pub async fn read_upstream(
    stream: &mut UpStream,
    buf: &mut Vec<u8>,
    limit: Duration,
) -> Result<(), UpstreamError> {
    if buf.capacity() - buf.len() < 2048 {
        buf.reserve(4096);
    }
    match tokio::time::timeout(limit, stream.read_buf(buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(_) => Err(UpstreamError::Closed),
        Err(_) => Err(UpstreamError::ReadTimeout),
    }
}

/// Write the request (head and body), read the answer's head (skipping 1xx interim
/// answers). On success `lines` holds the head as the client gets it, less its end (the
/// gateway's headers and the blank line), and `conn.buf` the head as received
/// (`AnswerHead::len` bytes) and the body bytes that came with it. The error says whether
/// any answer byte arrived.
pub async fn exchange_head(
    conn: &mut UpConn,
    request: &[u8],
    head_request: bool,
    lines: &mut Vec<u8>,
    write_timeout: Duration,
    read_timeout: Duration,
) -> Result<AnswerHead, (UpstreamError, bool)> {
    match tokio::time::timeout(write_timeout, conn.stream.write_all(request)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err((UpstreamError::Closed, false)),
        Err(_) => return Err((UpstreamError::WriteTimeout, false)),
    }
    let buf = &mut conn.buf;
    buf.clear();
    loop {
        match parse_answer_head(buf, head_request, lines) {
            Ok(Some((len, Some(mut head)))) => {
                head.len = len;
                return Ok(head);
            }
            // An interim 1xx: dropped (as nginx does), the final answer follows.
            Ok(Some((len, None))) => {
                buf.drain(..len);
            }
            Err(_) => return Err((UpstreamError::Invalid, true)),
            Ok(None) => {
                if buf.len() > MAX_ANSWER_HEAD {
                    return Err((UpstreamError::Invalid, true));
                }
                let before = buf.is_empty();
                if let Err(e) = read_upstream(&mut conn.stream, buf, read_timeout).await {
                    return Err((e, !before));
                }
            }
        }
    }
}
