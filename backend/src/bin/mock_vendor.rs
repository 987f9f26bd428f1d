//! `mock-vendor`: an HTTP server standing in for the external vendor API. It enforces its own
//! contract (N calls per sliding window W, 429 beyond it) and counts every violation, so
//! tests and the demo can prove the backend never breaks the contract.
//!
//! `POST /<anything>` answers `{"id", "model", "completion"}` after `--latency`;
//! `GET /stats` reports calls, violations and the highest concurrency seen (in total and per
//! calling instance, from `X-Floodgate-Instance`); `GET /health` answers 200.
//!
//! With `--tls-cert` and `--tls-key` it serves HTTPS only (rustls; HTTP/1.1 and h2 by ALPN),
//! so the backend's `VENDOR_URL=https://...` can be tested.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// A mock vendor API that enforces a call contract and reports violations.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Opts {
    /// Address to listen on.
    #[arg(long, env = "MOCK_VENDOR_LISTEN", default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Contract: calls allowed per window (for the whole account).
    #[arg(long, env = "MOCK_VENDOR_LIMIT", default_value_t = 500)]
    limit: usize,
    /// Contract: the sliding window.
    #[arg(long, env = "MOCK_VENDOR_WINDOW", default_value = "60s", value_parser = duration)]
    window: Duration,
    /// Time to answer a call.
    #[arg(long, env = "MOCK_VENDOR_LATENCY", default_value = "50ms", value_parser = duration)]
    latency: Duration,
    /// Share of calls answered 503 at random (0.0-1.0).
    #[arg(long, env = "MOCK_VENDOR_ERROR_RATE", default_value_t = 0.0)]
    error_rate: f64,
    /// The first N calls fail with 503 (a 5xx burst), then the vendor recovers.
    #[arg(long, env = "MOCK_VENDOR_FAIL_FIRST", default_value_t = 0)]
    fail_first: u64,
    /// Share of calls that never answer (held until the client gives up).
    #[arg(long, env = "MOCK_VENDOR_TIMEOUT_RATE", default_value_t = 0.0)]
    timeout_rate: f64,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "MOCK_VENDOR_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "MOCK_VENDOR_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

/// The TLS acceptor for `--tls-cert` and `--tls-key`; exits with the reason when they fail.
fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        eprintln!("mock-vendor: {what}: {e}");
        std::process::exit(2)
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .unwrap_or_else(|e| fail(&format!("--tls-cert {}", cert.display()), &e));
    let key = PrivateKeyDer::from_pem_file(key)
        .unwrap_or_else(|e| fail(&format!("--tls-key {}", key.display()), &e));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| fail("TLS versions", &e))
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap_or_else(|e| fail("--tls-cert and --tls-key", &e));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[derive(Default)]
struct Stats {
    calls: AtomicU64,
    accepted: AtomicU64,
    violations: AtomicU64,
    failed: AtomicU64,
    state: Mutex<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Times of accepted calls within the window.
    window: VecDeque<Instant>,
    max_in_window: usize,
    concurrent: usize,
    max_concurrent: usize,
    per_instance: HashMap<String, (usize, usize)>,
}

fn json_resp(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

async fn handle(
    opts: Arc<Opts>,
    stats: Arc<Stats>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/health") => return Ok(json_resp(StatusCode::OK, json!({"status": "ok"}))),
        ("GET", "/stats") => {
            let s = stats.state.lock().unwrap();
            let per: serde_json::Map<String, serde_json::Value> = s
                .per_instance
                .iter()
                .map(|(k, (_, max))| (k.clone(), json!(max)))
                .collect();
            return Ok(json_resp(
                StatusCode::OK,
                json!({
                    "calls": stats.calls.load(Ordering::SeqCst),
                    "accepted": stats.accepted.load(Ordering::SeqCst),
                    "violations": stats.violations.load(Ordering::SeqCst),
                    "failed": stats.failed.load(Ordering::SeqCst),
                    "max_in_window": s.max_in_window,
                    "max_concurrency": s.max_concurrent,
                    "max_concurrency_per_instance": per,
                    "contract": {"limit": opts.limit, "window_ms": opts.window.as_millis() as u64},
                }),
            ));
        }
        ("POST", _) => {}
        _ => {
            return Ok(json_resp(
                StatusCode::NOT_FOUND,
                json!({"error": "POST a JSON payload; GET /stats"}),
            ))
        }
    }
    let instance = req
        .headers()
        .get("x-floodgate-instance")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .to_string();
    let n = stats.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let now = Instant::now();
    let over_contract = {
        let mut s = stats.state.lock().unwrap();
        while s
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= opts.window)
        {
            s.window.pop_front();
        }
        if s.window.len() >= opts.limit {
            true
        } else {
            s.window.push_back(now);
            s.max_in_window = s.max_in_window.max(s.window.len());
            s.concurrent += 1;
            s.max_concurrent = s.max_concurrent.max(s.concurrent);
            let e = s.per_instance.entry(instance.clone()).or_default();
            e.0 += 1;
            e.1 = e.1.max(e.0);
            false
        }
    };
    if over_contract {
        stats.violations.fetch_add(1, Ordering::SeqCst);
        let mut r = json_resp(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": "contract exceeded", "limit": opts.limit}),
        );
        r.headers_mut()
            .insert("Retry-After", http::HeaderValue::from_static("1"));
        return Ok(r);
    }
    stats.accepted.fetch_add(1, Ordering::SeqCst);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let prompt: serde_json::Value = serde_json::from_slice(&body).unwrap_or(json!(null));
    let hang = rand::random::<f64>() < opts.timeout_rate;
    tokio::time::sleep(if hang {
        Duration::from_secs(3600)
    } else {
        opts.latency
    })
    .await;
    let failing = n <= opts.fail_first || rand::random::<f64>() < opts.error_rate;
    {
        let mut s = stats.state.lock().unwrap();
        s.concurrent -= 1;
        if let Some(e) = s.per_instance.get_mut(&instance) {
            e.0 -= 1;
        }
    }
    if failing {
        stats.failed.fetch_add(1, Ordering::SeqCst);
        return Ok(json_resp(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "vendor temporarily failing"}),
        ));
    }
    Ok(json_resp(
        StatusCode::OK,
        json!({"id": format!("cmpl-{n}"), "model": "mock-1", "completion": format!("echo: {prompt}")}),
    ))
}

#[tokio::main]
async fn main() {
    let opts = Arc::new(Opts::parse());
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {}: {e}", opts.listen));
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)),
        _ => None,
    };
    eprintln!(
        "mock-vendor on {} ({}): contract {} calls per {:?}, latency {:?}",
        opts.listen,
        if tls.is_some() { "https" } else { "http" },
        opts.limit,
        opts.window,
        opts.latency
    );
    let stats = Arc::new(Stats::default());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (opts, stats, tls) = (opts.clone(), stats.clone(), tls.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(opts.clone(), stats.clone(), req));
            let http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            match tls {
                None => {
                    let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                }
                Some(tls) => {
                    // A failed handshake (an untrusting client) just ends the connection.
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), tls.accept(stream));
                    if let Ok(Ok(stream)) = handshake.await {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            }
        });
    }
}
