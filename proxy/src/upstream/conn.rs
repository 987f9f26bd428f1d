//! Connections to backends: connect, the idle pool, and one request's exchange up to the
//! end of the answer's head. Used by every engine ([`crate::forward`]).
//!
//! Idle connections are kept per backend (at most `upstream.keepalive_pool` each, fixed at
//! start) and checked when taken rather than watched by a task while idle: one the backend
//! closed (or wrote to unasked) is known from the readiness the runtime already has, and is
//! dropped; one older than `timeouts.idle` too.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::backend::BackendState;
use crate::forward::answer::{parse_answer_head, AnswerHead};
use crate::policy::outcome::UpstreamError;

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
    pub tcp: TcpStream,
    pub buf: Vec<u8>,
}

pub async fn connect(addr: SocketAddr, limit: Duration) -> Result<UpConn, UpstreamError> {
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

/// The most recently idle connection that is still open.
pub fn take_idle(state: &BackendState, max_idle: Duration) -> Option<UpConn> {
    let mut idle = state.idle.lock().expect("idle pool");
    while let Some(c) = idle.pop() {
        let open = matches!(c.conn.tcp.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
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
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
    limit: Duration,
) -> Result<(), UpstreamError> {
    if buf.capacity() - buf.len() < 2048 {
        buf.reserve(4096);
    }
    match tokio::time::timeout(limit, tcp.read_buf(buf)).await {
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
    match tokio::time::timeout(write_timeout, conn.tcp.write_all(request)).await {
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
                if let Err(e) = read_upstream(&mut conn.tcp, buf, read_timeout).await {
                    return Err((e, !before));
                }
            }
        }
    }
}
