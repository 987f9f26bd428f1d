//! The router: method + path to a handler, and what every response gets on the way out
//! (admission control, `X-Served-By`, metrics, the error-rate window).

pub mod items;
pub mod llm;
pub mod probes;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};

use crate::callers::Caller;
use crate::error::ApiError;
use crate::ratelimit::{self, Check};
use crate::startup::App;

const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Every route, named by what it is for; the name is the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Ready,
    Metrics,
    ListItems,
    CreateItem,
    GetItem(i64),
    DeleteItem(i64),
    /// `POST /llm`: the guarded vendor call.
    Llm,
    /// A known path with a method it does not take: its label and the methods it does take
    /// (the `Allow` header of the 405).
    WrongMethod(&'static str, &'static str),
    NotFound,
}

impl Route {
    pub fn resolve(method: &Method, path: &str) -> Route {
        let path = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        match path {
            "/health" | "/healthz" => return probe(method, Route::Health, "health"),
            "/ready" | "/readyz" => return probe(method, Route::Ready, "ready"),
            "/metrics" => return probe(method, Route::Metrics, "metrics"),
            "/llm" => {
                return match *method {
                    Method::POST => Route::Llm,
                    _ => Route::WrongMethod("llm", "POST"),
                }
            }
            "/items" => {
                return match *method {
                    Method::GET | Method::HEAD => Route::ListItems,
                    Method::POST => Route::CreateItem,
                    _ => Route::WrongMethod("items", "GET, HEAD, POST"),
                }
            }
            _ => {}
        }
        if let Some(id) = path.strip_prefix("/items/") {
            let Ok(id) = id.parse::<i64>() else {
                return Route::NotFound;
            };
            return match *method {
                Method::GET | Method::HEAD => Route::GetItem(id),
                Method::DELETE => Route::DeleteItem(id),
                _ => Route::WrongMethod("item", "GET, HEAD, DELETE"),
            };
        }
        Route::NotFound
    }

    pub fn label(&self) -> &'static str {
        match self {
            Route::Health => "health",
            Route::Ready => "ready",
            Route::Metrics => "metrics",
            Route::ListItems => "list_items",
            Route::CreateItem => "create_item",
            Route::GetItem(_) => "get_item",
            Route::DeleteItem(_) => "delete_item",
            Route::Llm => "llm",
            Route::WrongMethod(l, _) => l,
            Route::NotFound => "not_found",
        }
    }

    /// Probes answer even when the instance is at its admission limit.
    fn is_probe(&self) -> bool {
        matches!(self, Route::Health | Route::Ready | Route::Metrics)
    }

    /// Routes of the API, subject to identification and per-user limits.
    fn is_api(&self) -> bool {
        matches!(
            self,
            Route::ListItems
                | Route::CreateItem
                | Route::GetItem(_)
                | Route::DeleteItem(_)
                | Route::Llm
        )
    }

    /// Routes that refuse anonymous callers.
    fn requires_user(&self) -> bool {
        matches!(self, Route::Llm)
    }
}

fn probe(method: &Method, route: Route, label: &'static str) -> Route {
    if method == Method::GET || method == Method::HEAD {
        route
    } else {
        Route::WrongMethod(label, "GET, HEAD")
    }
}

pub type Resp = Response<Full<Bytes>>;

/// Handle one request: admission, dispatch, and the bookkeeping every response gets.
pub async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
) -> Result<Resp, std::convert::Infallible> {
    let started = Instant::now();
    let route = Route::resolve(req.method(), req.uri().path());
    let method = req.method().clone();
    // The gateway's request id: echoed, and named in the log line of a failed request, so a
    // failure can be followed from the gateway's access log to this instance's log.
    let request_id = req.headers().get(&X_REQUEST_ID).cloned();
    let result = if route.is_probe() {
        dispatch(&app, route, req).await
    } else {
        match app.admission.enter().await {
            Ok(permit) => {
                app.metrics.inflight.inc();
                let r = guarded(&app, route, req).await;
                app.metrics.inflight.dec();
                permit.done();
                r
            }
            Err(shed) => {
                app.metrics.shed.with_label_values(&[shed.reason()]).inc();
                Err(ApiError::Overloaded)
            }
        }
    };
    let own_failure = matches!(&result, Err(e) if e.is_own_failure());
    let mut resp = result.unwrap_or_else(ApiError::into_response);

    let status = resp.status();
    resp.headers_mut()
        .insert("x-served-by", app.served_by.clone());
    if let Some(id) = &request_id {
        resp.headers_mut().insert(X_REQUEST_ID, id.clone());
    }
    // Logged: 500/502/504. 503s are sheds (admission limit, database or vendor down): the
    // admission control working, counted in metrics; a line each would flood the log.
    if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
        log::warn!(
            target: "request",
            "{method} {} -> {} request_id={}",
            route.label(),
            status.as_u16(),
            request_id
                .as_ref()
                .map_or("-".into(), |id| String::from_utf8_lossy(id.as_bytes()))
        );
    }
    // The readiness error window counts only this instance's own failures
    // (`ApiError::is_own_failure`), never a status a client's input or a shared dependency
    // produced: a client must not be able to take the instance out of rotation.
    if !route.is_probe() {
        app.readiness.errors.record(own_failure);
    }
    app.metrics
        .requests
        .with_label_values(&[route.label(), method.as_str(), status.as_str()])
        .inc();
    app.metrics
        .duration
        .with_label_values(&[route.label()])
        .observe(started.elapsed().as_secs_f64());
    Ok(resp)
}

/// Identify the caller and apply its limits ("reject before any expensive work"), then
/// dispatch; limited responses carry the rate-limit headers.
async fn guarded(app: &App, route: Route, req: Request<Incoming>) -> Result<Resp, ApiError> {
    if !route.is_api() {
        return dispatch(app, route, req).await;
    }
    let caller = app.callers.identify(&app.db, req.headers()).await?;
    let (checks, shared) = match &caller {
        Caller::User(u) => (
            app.policy
                .checks_for_user(u.user_id, &u.tier, route.label()),
            true,
        ),
        Caller::Anonymous if route.requires_user() => {
            return Err(ApiError::Unauthorized(format!(
                "an API key is required for {} (X-API-Key or Authorization: Bearer)",
                req.uri().path()
            )));
        }
        Caller::Anonymous => match app.policy.anonymous {
            Some(quota) => (
                vec![Check {
                    key: "rl:anonymous".into(),
                    quota,
                    name: "anonymous".into(),
                }],
                false,
            ),
            None => (Vec::new(), false),
        },
    };
    if checks.is_empty() {
        return dispatch(app, route, req).await;
    }
    let outcome = if shared {
        app.limiter.check(&checks).await
    } else {
        app.limiter.check_local(&checks)
    };
    let headers = ratelimit::headers(&outcome);
    if !outcome.admitted {
        let (i, usage) = outcome.reported().expect("a refusal names its limit");
        let name = checks[i].name.clone();
        app.metrics
            .ratelimit
            .with_label_values(&[&name, "limited"])
            .inc();
        return Err(ApiError::TooManyRequests {
            message: format!("rate limit exceeded: {name} allows {}", usage.quota),
            retry_after: (usage.reset.as_millis().div_ceil(1000) as u64).max(1),
            headers,
            limit: name,
        });
    }
    for c in &checks {
        app.metrics
            .ratelimit
            .with_label_values(&[&c.name, "allowed"])
            .inc();
    }
    let mut resp = dispatch(app, route, req).await?;
    for (name, value) in headers {
        if let Ok(v) = value.parse() {
            resp.headers_mut().insert(name, v);
        }
    }
    Ok(resp)
}

async fn dispatch(app: &App, route: Route, req: Request<Incoming>) -> Result<Resp, ApiError> {
    match route {
        Route::Health => Ok(probes::health()),
        Route::Ready => Ok(probes::ready(app)),
        Route::Metrics => Ok(probes::metrics(app)),
        Route::ListItems => items::list(app, req.uri().query()).await,
        Route::CreateItem => {
            let body = json_body(app, req).await?;
            items::create(app, &body).await
        }
        Route::GetItem(id) => items::get(app, id).await,
        Route::DeleteItem(id) => items::delete(app, id).await,
        Route::Llm => {
            let body = json_body(app, req).await?;
            llm::complete(app, body).await
        }
        Route::WrongMethod(_, allow) => Err(ApiError::MethodNotAllowed { allow }),
        Route::NotFound => Err(ApiError::NotFound(format!(
            "no route for {} {}",
            req.method(),
            req.uri().path()
        ))),
    }
}

/// The request body, after checking its content type and size (413 before reading when the
/// declared length is over the cap, and as soon as a chunked body passes it).
async fn json_body(app: &App, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let ctype = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ctype.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::UnsupportedMediaType);
    }
    let cap = app.settings.max_body_bytes;
    if req.body().size_hint().lower() > cap as u64 {
        return Err(ApiError::PayloadTooLarge(cap));
    }
    match Limited::new(req.into_body(), cap).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::PayloadTooLarge(cap)),
        Err(e) => Err(ApiError::MalformedJson(format!(
            "could not read the body: {e}"
        ))),
    }
}

/// `X-Served-By` value for this instance.
pub fn served_by(instance: &str) -> HeaderValue {
    HeaderValue::from_str(instance).unwrap_or_else(|_| HeaderValue::from_static("backend"))
}
