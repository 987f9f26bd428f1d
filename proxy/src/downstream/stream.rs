//! The client connection as every engine reads it: a stream with a deadline for each
//! request head, bytes the own engine read put back for pingora's, and pingora's own empty
//! error answers replaced by the gateway's JSON ones.
//!
//! The head deadline: pingora's own header timeout restarts on every read, so a client
//! sending one byte a second would never hit it; this one runs from the first byte of a
//! request head (from accept for the first request) to the blank line that ends it. The own
//! engine also bounds a head whose bytes came pipelined behind the last request
//! ([`crate::h1`]).
//!
//! pingora answers a head it cannot parse, and a CONNECT request, itself with an empty 400
//! or 405 before any `ProxyHttp` hook runs; that exact answer
//! ([`pingora_compat::canned_error_answer`]) is recognised as it is written and the
//! gateway's JSON answer written in its place, counted (`malformed_request`,
//! `connect_method`).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pingora::protocols::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::h2_frames::{FrameScan, ServerFrames};
use crate::answers::ErrorAnswer;
use crate::metrics::Metrics;
use crate::pingora_compat;
use crate::policy::{request, Rejection};

/// A stream that fails reads once a request head has taken longer than its deadline, and
/// turns pingora's own empty error answers into the gateway's JSON ones.
pub struct ClientStream {
    pub(super) inner: Stream,
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
    /// Bytes received since the current head began (its body and anything pipelined
    /// behind it included): [`ClientStream::bytes_since_head_start`].
    head_bytes: usize,
    /// The request line of the head being received, until its end is seen.
    line: Vec<u8>,
    line_done: bool,
    /// A request line refused, and why (answered 400 and counted once, reads fail after).
    refused: Option<Rejection>,
    /// Bytes the own engine read and handed back ([`ClientStream::rewind`]), read again
    /// before the socket; `rewound_at` of them already were.
    pub(super) rewound: Vec<u8>,
    pub(super) rewound_at: usize,
    /// An HTTP/2 connection: its frames, followed instead of HTTP/1 heads (only the preface
    /// is bound by the deadline).
    h2: Option<FrameScan>,
    /// And the server's frames (its refused streams are counted).
    h2_out: Option<ServerFrames>,
}

impl fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientStream")
            .field("inner", &self.inner)
            .field("in_head", &self.in_head)
            .finish()
    }
}

impl ClientStream {
    /// `first_due`: when the first head must be complete (accept + timeout, like nginx's
    /// client_header_timeout; a PROXY protocol header counts against it too).
    pub fn new(
        inner: Stream,
        timeout: Duration,
        first_due: Instant,
        metrics: Arc<Metrics>,
    ) -> Self {
        ClientStream {
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
            head_bytes: 0,
            line: Vec::new(),
            line_done: false,
            refused: None,
            rewound: Vec::new(),
            rewound_at: 0,
            h2: None,
            h2_out: None,
        }
    }

    /// For an HTTP/2 connection: the deadline bounds the client's connection preface only;
    /// then the client's stream resets and CONTINUATION frames are counted ([`FrameScan`]:
    /// over `max_resets` in 10 s, or a header block continued past h2's bound for
    /// `max_header_bytes`, the connection is closed).
    pub fn http2(mut self, max_resets: u32, max_header_bytes: usize) -> Self {
        self.h2 = Some(FrameScan::new(
            max_resets,
            super::h2_frames::max_continuations(max_header_bytes),
        ));
        self.h2_out = Some(ServerFrames::default());
        self
    }

    /// Bytes received since the current request's head began: its head, its body, and
    /// whatever was pipelined behind it. pingora's engine compares it with what the request
    /// used, to know whether part of a next head is already waiting (`pingora_h1`).
    pub fn bytes_since_head_start(&self) -> usize {
        self.head_bytes
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

    /// Bytes written to the client: an answer began; on HTTP/2, the streams the server
    /// refused are counted.
    fn wrote<'a>(&mut self, parts: impl Iterator<Item = &'a [u8]>) {
        for part in parts.filter(|p| !p.is_empty()) {
            self.responded = true;
            if let Some(out) = &mut self.h2_out {
                for _ in 0..out.refused(part) {
                    self.metrics.reject(Rejection::Http2TooManyStreams);
                }
            }
        }
    }

    /// Track head boundaries in newly read bytes.
    fn observe(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.received_any = true;
        if let Some(scan) = &mut self.h2 {
            if let Err(reason) = scan.observe(data, std::time::Instant::now) {
                self.refused = Some(reason);
            }
            self.in_head = scan.in_preface();
            return;
        }
        if !self.in_head && self.responded {
            self.in_head = true;
            self.responded = false;
            self.tail_len = 0;
            self.due = Instant::now() + self.timeout;
            self.line.clear();
            self.line_done = false;
            self.head_bytes = 0;
        }
        self.head_bytes += data.len();
        if !self.in_head {
            return;
        }
        self.check_request_line(data);
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

impl ClientStream {
    /// Collect the head's request line; once whole, refuse it unless it is strictly
    /// `METHOD SP target SP HTTP/1.x` with a target of visible ASCII other than `"<>`.
    /// pingora's parser would percent-encode such a target and serve it; the own engine's
    /// would hand it over. Empty lines before a request line are skipped (RFC 9112 2.2).
    fn check_request_line(&mut self, data: &[u8]) {
        if self.line_done {
            return;
        }
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            // Nearly always the whole line is in this read: checked in place, not copied.
            let whole: &[u8] = if self.line.is_empty() {
                &rest[..nl]
            } else {
                self.line.extend_from_slice(&rest[..nl]);
                &self.line
            };
            let line = whole.strip_suffix(b"\r").unwrap_or(whole);
            rest = &rest[nl + 1..];
            if line.is_empty() {
                self.line.clear();
                continue;
            }
            self.line_done = true;
            self.refused = request::request_line_problem(line);
            self.line = Vec::new();
            return;
        }
        self.line.extend_from_slice(rest);
        if self.line.len() > 16 * 1024 {
            // Longer than any head allowed: the size caps answer it.
            self.line_done = true;
            self.line = Vec::new();
        }
    }

    /// A refused request line: answered 400 once (counted), then every read fails.
    fn refuse_line(&mut self, cx: &mut Context<'_>, reason: Rejection) -> Poll<io::Result<()>> {
        if !self.timed_out {
            self.timed_out = true;
            self.metrics.reject(reason);
            if self.h2.is_some() {
                // Closed without an HTTP/1 answer: the connection speaks HTTP/2.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    reason.message(),
                )));
            }
            let answer = ErrorAnswer::closing(reason.status(), reason.message(), None).to_bytes();
            if let Poll::Ready(Ok(_)) = Pin::new(&mut self.inner).poll_write(cx, &answer) {
                let _ = Pin::new(&mut self.inner).poll_flush(cx);
            }
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "request line refused",
        )))
    }
}

impl AsyncRead for ClientStream {
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
            Poll::Ready(Ok(())) => {
                this.observe(&buf.filled()[before..]);
                if let Some(reason) = this.refused {
                    buf.set_filled(before);
                    return this.refuse_line(cx, reason);
                }
            }
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

impl ClientStream {
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
                let answer =
                    ErrorAnswer::closing(reason.status(), reason.message(), None).to_bytes();
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
            let reason = pingora_compat::canned_error_answer(data)?;
            self.metrics.reject(reason);
            let answer = ErrorAnswer::closing(reason.status(), reason.message(), None).to_bytes();
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

impl AsyncWrite for ClientStream {
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
        if let Poll::Ready(Ok(n)) = r {
            this.wrote(data.get(..n).into_iter());
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
        if let Poll::Ready(Ok(n)) = r {
            // The first `n` bytes of the slices went out.
            let mut left = n;
            this.wrote(bufs.iter().map_while(|b| {
                let part = b.get(..left.min(b.len()))?;
                left -= part.len();
                (!part.is_empty()).then_some(part)
            }));
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// pingora's canned 400 written through the wrapper reaches the client as the gateway's
    /// JSON answer, whole, even when the socket takes it in pieces; counted once.
    #[tokio::test]
    async fn a_canned_answer_is_replaced_whole_across_partial_writes() {
        let canned = "HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\nDate: Mon, 23 Nov 2026 15:40:40 GMT\r\n\
                      Content-Length: 0\r\nCache-Control: private, no-store\r\nConnection: close\r\n\r\n";
        let reason = Rejection::MalformedRequest;
        let answer = ErrorAnswer::closing(reason.status(), reason.message(), None).to_bytes();
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
        let mut s = ClientStream::new(
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
}
