//! The own engine's side of an answer: bytes written to the client socket. A head is
//! staged and goes out with the first body piece (one write for a small answer); a chunked
//! body is chunked again as it is relayed, so only framing the gateway checked reaches the
//! client.

use pingora::protocols::http::date::get_cached_date;
use tokio::io::AsyncWriteExt;

use crate::answers::{ErrorAnswer, HSTS};
use crate::downstream::ClientStream;
use crate::forward::answer::{drop_lines, AnswerHead};
use crate::forward::Downstream;
use crate::policy::framing::AnswerBody;

pub struct RawDownstream<'a> {
    pub io: &'a mut ClientStream,
    /// The staged head (then head and first piece), reused across requests.
    pub out: &'a mut Vec<u8>,
    pub request_id: &'a [u8],
    /// The listener's `Strict-Transport-Security` value, on every answer.
    hsts: Option<&'a [u8]>,
    chunked: bool,
    written: bool,
}

impl<'a> RawDownstream<'a> {
    pub fn new(io: &'a mut ClientStream, out: &'a mut Vec<u8>, request_id: &'a [u8]) -> Self {
        RawDownstream {
            io,
            out,
            request_id,
            hsts: None,
            chunked: false,
            written: false,
        }
    }

    /// Every answer carries `Strict-Transport-Security: hsts` (the backend's own is replaced).
    pub fn with_hsts(mut self, hsts: Option<&'a [u8]>) -> Self {
        self.hsts = hsts;
        self
    }

    async fn flush_out(&mut self) -> bool {
        self.written = true;
        let ok = self.io.write_all(self.out).await.is_ok() && self.io.flush().await.is_ok();
        self.out.clear();
        ok
    }
}

fn push(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

impl Downstream for RawDownstream<'_> {
    fn lines(&mut self) -> &mut Vec<u8> {
        self.out
    }

    async fn head(&mut self, head: &AnswerHead, keep_alive: bool) -> bool {
        self.chunked = head.body == AnswerBody::Chunked;
        if let Some(v) = self.hsts {
            drop_lines(self.out, HSTS.as_bytes());
            push(self.out, HSTS.as_bytes(), v);
        }
        push(self.out, b"X-Request-Id", self.request_id);
        push(self.out, b"Date", get_cached_date().as_bytes());
        self.out.extend_from_slice(if keep_alive {
            b"Connection: keep-alive\r\n\r\n"
        } else {
            b"Connection: close\r\n\r\n"
        });
        true
    }

    async fn body(&mut self, data: &[u8]) -> bool {
        if self.chunked {
            if !data.is_empty() {
                self.out
                    .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                self.out.extend_from_slice(data);
                self.out.extend_from_slice(b"\r\n");
            }
        } else {
            self.out.extend_from_slice(data);
        }
        true
    }

    async fn flush(&mut self, end: bool) -> bool {
        if self.chunked && end {
            self.out.extend_from_slice(b"0\r\n\r\n");
        }
        if self.out.is_empty() {
            return true;
        }
        self.flush_out().await
    }

    fn started(&self) -> bool {
        self.written
    }

    async fn error(&mut self, answer: &ErrorAnswer<'_>) -> bool {
        self.out.clear();
        let answer = ErrorAnswer {
            hsts: self.hsts.or(answer.hsts),
            ..*answer
        };
        answer.write_to(self.out, Some(get_cached_date().as_bytes()));
        self.flush_out().await
    }
}
