//! Answers the gateway writes itself: one JSON shape, `{"error": "...", "status": N}`.

use bytes::Bytes;
use pingora::prelude::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

/// The body of every error the gateway answers itself.
pub fn error_body(status: u16, message: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "error": message, "status": status }).to_string())
}

/// A complete HTTP/1.1 error response as bytes, for a connection refused before any request
/// was read; it closes the connection. 429 and 503 should carry `retry_after` (seconds).
pub fn raw_error(status: u16, message: &str, retry_after: Option<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    raw_answer(
        &mut out,
        status,
        message,
        retry_after,
        &RawExtras::default(),
    );
    out
}

/// What an answer written as bytes carries beyond the JSON error (the fast path's answers,
/// which must look like the ones `send_json_error` writes through pingora).
#[derive(Default)]
pub struct RawExtras<'a> {
    pub request_id: Option<&'a [u8]>,
    pub headers: &'a [(&'static str, String)],
    pub date: Option<&'a [u8]>,
    /// Keep the connection open after this answer (`Connection: keep-alive`).
    pub keep_alive: bool,
}

/// Append a complete HTTP/1.1 JSON error response to `out`.
pub fn raw_answer(
    out: &mut Vec<u8>,
    status: u16,
    message: &str,
    retry_after: Option<u64>,
    extras: &RawExtras,
) {
    let body = error_body(status, message);
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(secs) = retry_after {
        head += &format!("Retry-After: {secs}\r\n");
    }
    for (name, value) in extras.headers {
        head += &format!("{name}: {value}\r\n");
    }
    out.extend_from_slice(head.as_bytes());
    if let Some(id) = extras.request_id {
        out.extend_from_slice(b"Cache-Control: no-store\r\nX-Request-Id: ");
        out.extend_from_slice(id);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(date) = extras.date {
        out.extend_from_slice(b"Date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if extras.keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
    out.extend_from_slice(&body);
}

/// Whether the connection stays open after the gateway's own error answer (both request
/// paths): only when no request body is left unread, and not after a 5xx other than 503. A
/// client told to slow down should not pay a reconnect too (nginx keeps it as well).
pub fn keeps_connection(status: u16, unread_body: bool) -> bool {
    !unread_body && (status < 500 || status == 503)
}

/// Write a complete JSON error response. 429 and 503 should carry `retry_after` (seconds);
/// `extra` adds headers such as `RateLimit`.
pub async fn send_json_error(
    session: &mut Session,
    status: u16,
    message: &str,
    retry_after: Option<u64>,
    request_id: Option<&http::HeaderValue>,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let body = error_body(status, message);
    let mut resp = ResponseHeader::build(status, Some(6))?;
    resp.insert_header("Content-Type", "application/json")?;
    resp.insert_header("Content-Length", body.len())?;
    resp.insert_header("Cache-Control", "no-store")?;
    if let Some(secs) = retry_after {
        resp.insert_header("Retry-After", secs)?;
    }
    if let Some(id) = request_id {
        resp.insert_header("X-Request-Id", id.clone())?;
    }
    for (name, value) in extra {
        resp.insert_header(*name, value.as_str())?;
    }
    let req = session.req_header();
    let has_body = req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if !keeps_connection(status, has_body) {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}
