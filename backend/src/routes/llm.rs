//! `POST /llm`: the payload goes to the vendor through the guarded pipeline ([`crate::vendor`]);
//! the vendor's JSON comes back.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;

use super::Resp;
use crate::error::ApiError;
use crate::startup::App;

pub async fn complete(app: &App, body: Bytes) -> Result<Resp, ApiError> {
    // The payload must be a JSON object; it is passed on as sent.
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(_)) => {}
        Ok(_) => return Err(ApiError::invalid("body", "must be a JSON object")),
        Err(e) => return Err(ApiError::MalformedJson(e.to_string())),
    }
    let (status, answer) = app.vendor.call(body).await?;
    Ok(Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::OK))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(answer))
        .expect("valid response"))
}
