//! The API's errors, each mapped to an HTTP status in exactly one place.
//! Every error body has one shape: `{"error": "...", "status": N}` plus `field` when a
//! specific input field is at fault.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;

use crate::db::DbError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed; allowed: {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("server is at its in-flight limit; retry shortly")]
    Overloaded,
    #[error("database unavailable; retry shortly")]
    DatabaseUnavailable,
    #[error("internal error")]
    Internal,
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after: u64,
        /// `RateLimit-Policy`, `RateLimit`, `X-RateLimit-*`.
        headers: Vec<(&'static str, String)>,
        /// Which limit refused: `tier:free`, `endpoint:llm`.
        limit: String,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{}", vendor_message(.0))]
    Vendor(crate::vendor::VendorError),
}

fn vendor_message(e: &crate::vendor::VendorError) -> String {
    use crate::vendor::VendorError::*;
    match e {
        CircuitOpen { .. } => "the vendor is failing; calls are paused (circuit open)".into(),
        QueueTimeout { stage } => format!("timed out waiting for a vendor slot ({stage})"),
        Quota { .. } => "the vendor quota is used up; retry later".into(),
        LimiterUnavailable { .. } => {
            "vendor calls paused: the shared limiter (Redis) is unavailable; retry later".into()
        }
        VendorQuota { .. } => "the vendor refused the call over its quota; retry later".into(),
        Timeout => "the vendor did not answer in time".into(),
        Upstream { detail } => format!("vendor error: {detail}"),
    }
}

impl From<crate::vendor::VendorError> for ApiError {
    fn from(e: crate::vendor::VendorError) -> Self {
        ApiError::Vendor(e)
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded | ApiError::DatabaseUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Vendor(v) => {
                use crate::vendor::VendorError::*;
                match v {
                    CircuitOpen { .. } | QueueTimeout { .. } | LimiterUnavailable { .. } => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    Quota { .. } | VendorQuota { .. } => StatusCode::TOO_MANY_REQUESTS,
                    Timeout => StatusCode::GATEWAY_TIMEOUT,
                    Upstream { .. } => StatusCode::BAD_GATEWAY,
                }
            }
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Overloaded | ApiError::DatabaseUnavailable => Some(1),
            ApiError::TooManyRequests { retry_after, .. } => Some(*retry_after),
            ApiError::Vendor(v) => {
                use crate::vendor::VendorError::*;
                match v {
                    CircuitOpen { retry_after }
                    | Quota { retry_after }
                    | LimiterUnavailable { retry_after }
                    | VendorQuota { retry_after } => {
                        Some((retry_after.as_millis().div_ceil(1000) as u64).max(1))
                    }
                    QueueTimeout { .. } => Some(1),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// A failure of this instance itself (its code or schema), as opposed to a refusal of
    /// the client's input, a shed (503), or a shared dependency's failure (the vendor, with
    /// its own breaker): the only errors the readiness error window counts, so that no
    /// client can take an instance out of rotation by what it sends.
    pub fn is_own_failure(&self) -> bool {
        matches!(self, ApiError::Internal)
    }

    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field,
            message: message.into(),
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let status = self.status();
        let mut body = serde_json::json!({ "error": self.to_string(), "status": status.as_u16() });
        if let ApiError::Invalid { field, .. } = &self {
            body["field"] = serde_json::Value::from(*field);
        }
        if let ApiError::TooManyRequests { limit, .. } = &self {
            body["limit"] = serde_json::Value::from(limit.as_str());
        }
        if let ApiError::Vendor(v) = &self {
            body["stage"] = serde_json::Value::from(v.stage());
        }
        let mut resp = json_response(status, &body);
        if let ApiError::TooManyRequests { headers, .. } = &self {
            for (name, value) in headers {
                if let Ok(v) = value.parse() {
                    resp.headers_mut().insert(*name, v);
                }
            }
        }
        if let ApiError::MethodNotAllowed { allow } = &self {
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static(allow));
        }
        if let Some(secs) = self.retry_after() {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                secs.to_string().parse().expect("digits"),
            );
        }
        resp
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable(e) => {
                log::warn!("database unavailable: {e}");
                ApiError::DatabaseUnavailable
            }
            DbError::Rejected(e) => {
                log::warn!("database refused a value that passed validation: {e}");
                ApiError::invalid("body", "contains a value the database cannot store")
            }
            DbError::Other(e) => {
                log::error!("database error: {e}");
                ApiError::Internal
            }
        }
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).expect("serializable");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("valid response")
}
