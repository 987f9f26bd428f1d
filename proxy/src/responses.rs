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
    let body = error_body(status, message);
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let retry = retry_after.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
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
    // Keep the connection when the request carried no body (nothing left unread): a client
    // told to slow down should not pay a reconnect too (nginx keeps it as well).
    let req = session.req_header();
    let has_body = req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body || status >= 500 && status != 503 {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}
