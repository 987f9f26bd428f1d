//! Liveness (`/health`), readiness (`/ready`) and `/metrics`. Probes never touch a dependency:
//! readiness reads state the background checker keeps.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::Resp;
use crate::error::json_response;
use crate::startup::App;

/// The process answers.
pub fn health() -> Resp {
    json_response(StatusCode::OK, &json!({ "status": "ok" }))
}

/// 200 when this instance should get traffic, else 503 with the reason.
pub fn ready(app: &App) -> Resp {
    // Redis being down does not fail readiness: limits fall back to this instance.
    let rate_limits = match (app.limiter.is_shared(), app.limiter.is_degraded()) {
        (true, false) => "shared (redis)",
        (true, true) => "per instance (redis unreachable)",
        (false, _) => "per instance",
    };
    match app.readiness.check() {
        Ok(()) => json_response(
            StatusCode::OK,
            &json!({ "status": "ready", "rate_limits": rate_limits }),
        ),
        Err(reason) => {
            let mut r = json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "status": "not ready", "error": reason, "reason": reason }),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
    }
}

pub fn metrics(app: &App) -> Resp {
    let (used, idle) = app.db.pool_usage();
    app.metrics
        .db_pool
        .with_label_values(&["used"])
        .set(used as i64);
    app.metrics
        .db_pool
        .with_label_values(&["idle"])
        .set(idle as i64);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(app.metrics.render())))
        .expect("valid response")
}
