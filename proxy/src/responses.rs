//! Answers the gateway writes itself: one JSON shape, `{"error": "...", "status": N}`.

use bytes::Bytes;
use pingora::prelude::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

/// The body of every error the gateway answers itself.
pub fn error_body(status: u16, message: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "error": message, "status": status }).to_string())
}

/// Write a complete JSON error response. 429 and 503 should carry `retry_after` (seconds).
pub async fn send_json_error(
    session: &mut Session,
    status: u16,
    message: &str,
    retry_after: Option<u64>,
    request_id: Option<&str>,
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
        resp.insert_header("X-Request-Id", id)?;
    }
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}
