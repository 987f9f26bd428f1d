//! A trivial upstream for proxy benchmarks (loadtest/): answers every request at once with a
//! small JSON body, so the proxy in front of it is the bottleneck; with a delay, each answer
//! takes that long (requests are then in flight when a scenario kills the upstream). It reads
//! each request body before answering, as an API does: hyper closes a keep-alive connection
//! whose request body was left unread, which would make every proxy reconnect.
//! `GET /__count` answers how many requests it served (health checks at `/ready` and itself
//! not counted): loadtest's slow-backend scenario reads each upstream's share from it.
//! `GET /__bodies` answers `<heads of requests with a body> <bodies received whole>`: the
//! trickled-body scenario reads how many heads reached it without their body.
//! Usage: fast_upstream <port> [threads] [delay ms] [body bytes]
//! (body bytes: 0, the default, answers `{"items":[],"next":null}`; N answers N bytes.)

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

static SERVED: AtomicU64 = AtomicU64::new(0);
/// Requests with a body: heads received, and bodies received whole (`GET /__bodies`).
static BODIES_STARTED: AtomicU64 = AtomicU64::new(0);
static BODIES_DONE: AtomicU64 = AtomicU64::new(0);

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(8101);
    let threads: usize = args.next().and_then(|t| t.parse().ok()).unwrap_or(1);
    let delay =
        std::time::Duration::from_millis(args.next().and_then(|d| d.parse().ok()).unwrap_or(0));
    let body = match args.next().and_then(|n| n.parse().ok()).unwrap_or(0) {
        0 => Bytes::from_static(b"{\"items\":[],\"next\":null}"),
        n => Bytes::from(vec![b'x'; n]),
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(serve(port, delay, body));
}

async fn serve(port: u16, delay: std::time::Duration, body: Bytes) {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let name = format!("upstream-{port}");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (name, body) = (name.clone(), body.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (name, body) = (name.clone(), body.clone());
                async move {
                    let path = req.uri().path().to_string();
                    if path == "/__count" {
                        let n = SERVED.load(Ordering::Relaxed).to_string();
                        return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(n))));
                    }
                    if path == "/__bodies" {
                        let n = format!(
                            "{} {}",
                            BODIES_STARTED.load(Ordering::Relaxed),
                            BODIES_DONE.load(Ordering::Relaxed)
                        );
                        return Ok(Response::new(Full::new(Bytes::from(n))));
                    }
                    if path != "/ready" {
                        SERVED.fetch_add(1, Ordering::Relaxed);
                    }
                    let has_body = req.headers().contains_key("content-length")
                        || req.headers().contains_key("transfer-encoding");
                    if has_body {
                        BODIES_STARTED.fetch_add(1, Ordering::Relaxed);
                    }
                    // A broken body ends in the same answer; the proxy under test sees the close.
                    if req.into_body().collect().await.is_ok() && has_body {
                        BODIES_DONE.fetch_add(1, Ordering::Relaxed);
                    }
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("Content-Type", "application/json")
                            .header("X-Served-By", name)
                            .body(Full::new(body))
                            .expect("valid response"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
