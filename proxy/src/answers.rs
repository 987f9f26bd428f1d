//! The one answer the gateway writes itself: a short JSON error, `{"error": "...",
//! "status": N}`, with the same headers whichever engine writes it: as bytes (the own
//! HTTP/1 engine, and connections refused before any request) or through a pingora session.

use bytes::Bytes;
use pingora::prelude::ResponseHeader;
use pingora::proxy::Session;

use crate::policy::{outcome, Rejection};

/// The header a listener with `tls.hsts` adds to every answer.
pub const HSTS: &str = "Strict-Transport-Security";

/// An error answer, before it is written.
#[derive(Clone, Copy)]
pub struct ErrorAnswer<'a> {
    pub status: u16,
    pub message: &'a str,
    /// Seconds; see [`outcome::retry_after`] (a 429 or 503 always has one).
    pub retry_after: Option<u64>,
    pub request_id: Option<&'a [u8]>,
    /// Headers such as `RateLimit`.
    pub headers: &'a [(&'static str, String)],
    /// Keep the connection open after it (`Connection: keep-alive`).
    pub keep_alive: bool,
    /// The listener's `Strict-Transport-Security` value (`listen[].tls.hsts`).
    pub hsts: Option<&'a [u8]>,
}

impl<'a> ErrorAnswer<'a> {
    /// A closing answer to a connection, with no request id (refused before any request).
    pub fn closing(status: u16, message: &'a str, retry_after: Option<u64>) -> Self {
        ErrorAnswer {
            status,
            message,
            retry_after: outcome::retry_after(status, retry_after),
            request_id: None,
            headers: &[],
            keep_alive: false,
            hsts: None,
        }
    }

    /// The answer to a request (with its id), no extra headers; `Retry-After` as
    /// [`outcome::retry_after`] says.
    pub fn for_request(
        status: u16,
        message: &'a str,
        request_id: &'a [u8],
        keep_alive: bool,
    ) -> Self {
        ErrorAnswer {
            status,
            message,
            retry_after: outcome::retry_after(status, None),
            request_id: Some(request_id),
            headers: &[],
            keep_alive,
            hsts: None,
        }
    }

    /// The gateway's refusal of a request (a [`Rejection`]), with the refusal's own
    /// `Retry-After` and headers (rate limits have them); kept alive as
    /// [`outcome::keep_alive_after_error`] says.
    pub fn refusal(
        reason: Rejection,
        retry_after: Option<u64>,
        headers: &'a [(&'static str, String)],
        request_id: &'a [u8],
        unread_body: bool,
        last: bool,
    ) -> Self {
        let status = reason.status();
        ErrorAnswer {
            status,
            message: reason.message(),
            retry_after: outcome::retry_after(status, retry_after),
            request_id: Some(request_id),
            headers,
            keep_alive: outcome::keep_alive_after_error(status, unread_body, last),
            hsts: None,
        }
    }

    pub fn body(&self) -> Bytes {
        Bytes::from(serde_json::json!({ "error": self.message, "status": self.status }).to_string())
    }

    /// Every header but `Date` and `Connection` (each writer has its own), in order.
    fn fields(&self, body_len: usize, mut f: impl FnMut(&str, &[u8])) {
        f("Content-Type", b"application/json");
        f("Content-Length", body_len.to_string().as_bytes());
        f("Cache-Control", b"no-store");
        if let Some(secs) = self.retry_after {
            f("Retry-After", secs.to_string().as_bytes());
        }
        if let Some(id) = self.request_id {
            f("X-Request-Id", id);
        }
        for (name, value) in self.headers.iter().filter(|(name, _)| !name.is_empty()) {
            f(name, value.as_bytes());
        }
        if let Some(v) = self.hsts {
            f(HSTS, v);
        }
    }

    /// Append the whole answer, as HTTP/1.1 bytes, to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>, date: Option<&[u8]>) {
        let body = self.body();
        let reason = http::StatusCode::from_u16(self.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        out.extend_from_slice(format!("HTTP/1.1 {} {reason}\r\n", self.status).as_bytes());
        let mut field = |name: &str, value: &[u8]| {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        self.fields(body.len(), &mut field);
        if let Some(date) = date {
            field("Date", date);
        }
        field(
            "Connection",
            if self.keep_alive {
                b"keep-alive"
            } else {
                b"close"
            },
        );
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
    }

    /// The whole answer as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.write_to(&mut out, None);
        out
    }

    /// Write the whole answer through a pingora session (it adds `Date` and `Connection`).
    pub async fn send(&self, session: &mut Session) -> pingora::Result<()> {
        let body = self.body();
        let mut resp = ResponseHeader::build(self.status, Some(7))?;
        let mut failed = None;
        self.fields(body.len(), |name, value| {
            if let Err(e) = resp.append_header(name.to_string(), value) {
                failed = Some(e);
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        if !self.keep_alive {
            session.set_keepalive(None);
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_as_bytes() {
        let headers = [("RateLimit", "limit=1".to_string())];
        let a = ErrorAnswer {
            status: 429,
            message: "slow down",
            retry_after: Some(3),
            request_id: Some(b"abc"),
            headers: &headers,
            keep_alive: true,
            hsts: None,
        };
        let text = String::from_utf8(a.to_bytes()).unwrap();
        let body = r#"{"error":"slow down","status":429}"#;
        assert_eq!(
            text,
            format!(
                "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Cache-Control: no-store\r\nRetry-After: 3\r\nX-Request-Id: abc\r\nRateLimit: limit=1\r\n\
                 Connection: keep-alive\r\n\r\n{body}",
                body.len()
            )
        );
        // A header with no name is never written (a refusal without rate-limit headers once
        // wrote `: ` lines, which clients refuse as a malformed answer).
        let none = [("", String::new())];
        let refused = ErrorAnswer::refusal(Rejection::BodyTooSlow, None, &none, b"id", true, false);
        let text = String::from_utf8(refused.to_bytes()).unwrap();
        assert!(!text.contains("\r\n: "), "{text}");
        let closing =
            String::from_utf8(ErrorAnswer::closing(503, "full", None).to_bytes()).unwrap();
        assert!(
            closing.contains("Retry-After: 1\r\n") && closing.contains("Connection: close\r\n")
        );
    }
}
