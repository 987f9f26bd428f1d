//! Builds the service so `main` and the tests start it the same way (tests on port 0).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};

use crate::admission::Admission;
use crate::callers::Callers;
use crate::config::Settings;
use crate::db::Db;
use crate::metrics::Metrics;
use crate::ratelimit::{self, Limiter, Policy};
use crate::readiness::Readiness;
use crate::routes;

/// Shared by every request.
pub struct App {
    pub settings: Settings,
    /// `X-Served-By`, so round robin is visible through the gateway.
    pub served_by: http::HeaderValue,
    pub db: Db,
    /// Where `POST /items` rows go (group commit on PostgreSQL).
    pub writer: crate::writes::ItemWriter,
    /// Admission control (adaptive limit or fixed cap).
    pub admission: Arc<Admission>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    /// API key -> user and tier, cached.
    pub callers: Callers,
    /// Which limits apply to whom.
    pub policy: Policy,
    /// Where the per-user counters live (Redis, or this process).
    pub limiter: Limiter,
    /// The guarded vendor call.
    pub vendor: crate::vendor::Vendor,
}

/// A bound, not yet serving, instance.
pub struct Server {
    listener: TcpListener,
    pub app: Arc<App>,
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("database settings: {0}")]
    Database(#[from] sqlx::Error),
    /// PostgreSQL refused or could not be reached (a TLS failure says so here).
    #[error("cannot connect to PostgreSQL (sslmode={sslmode}): {source}")]
    Connect {
        sslmode: &'static str,
        source: crate::db::DbError,
    },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Config(String),
}

impl Server {
    /// Connect the database, apply migrations, bind the listener.
    pub async fn build(settings: Settings) -> Result<Server, StartError> {
        crate::tls::init();
        let db = Db::connect(&settings.db())?;
        if let Some(sslmode) = db.tls_mode() {
            // Before the migrations, whose error would name them rather than the connection.
            db.ping()
                .await
                .map_err(|source| StartError::Connect { sslmode, source })?;
        }
        db.migrate().await?;
        Self::build_with_db(settings, db)
    }

    /// Bind with an already-connected database.
    pub fn build_with_db(settings: Settings, db: Db) -> Result<Server, StartError> {
        crate::tls::init();
        let addr = SocketAddr::new(settings.host, settings.port);
        let listener = bind(addr, settings.listen_backlog)
            .map_err(|source| StartError::Bind { addr, source })?;
        let metrics = Arc::new(Metrics::new());
        let admission = Admission::new(
            settings.admission().map_err(StartError::Config)?,
            Some(metrics.admission()),
        );
        let readiness = Arc::new(Readiness::new(
            admission.clone(),
            settings.ready_error_window_secs,
            settings.ready_inflight_ratio,
            settings.ready_max_error_rate,
            settings.ready_error_min_requests,
        ));
        let policy = Policy::parse(
            &settings.tier_limits,
            &settings.endpoint_limits,
            settings.anon_limit.as_deref(),
        )
        .map_err(StartError::Config)?;
        let redis_store = || -> Result<Option<ratelimit::redis::RedisStore>, StartError> {
            match settings.redis_url.as_deref().filter(|u| !u.is_empty()) {
                Some(url) => crate::tls::redis_client(url, &settings.redis_tls())
                    .map(|client| {
                        Some(ratelimit::redis::RedisStore::with_client(
                            client,
                            &settings.instance_id(),
                            settings.redis_timeout,
                        ))
                    })
                    .map_err(|e| StartError::Config(format!("REDIS_URL: {e}"))),
                None => Ok(None),
            }
        };
        if settings.redis_url.as_deref().is_none_or(str::is_empty) {
            log::info!("REDIS_URL unset: per-user and vendor limits are kept per instance");
        }
        let limiter = Limiter::new(redis_store()?, metrics.clone());
        let vendor = crate::vendor::Vendor::new(
            settings.vendor().map_err(StartError::Config)?,
            redis_store()?,
            settings.redis_timeout,
            metrics.clone(),
            &settings.instance_id(),
        )
        .map_err(StartError::Config)?;
        let app = Arc::new(App {
            served_by: routes::served_by(&settings.instance_id()),
            callers: Callers::new(settings.api_key_cache_ttl),
            policy,
            limiter,
            vendor,
            writer: crate::writes::ItemWriter::new(
                &db,
                settings.insert_batch_max,
                settings.insert_writers,
            ),
            settings,
            db,
            admission,
            readiness,
            metrics,
        });
        Ok(Server { listener, app })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// Serve until `shutdown` resolves. Then: `/ready` fails at once while the instance
    /// keeps accepting and serving for `shutdown_drain_delay` (long enough for the gateway's
    /// health checks, or a kubelet's, to see it fail and stop routing); then it takes what is
    /// already queued, closes the listener, and in-flight requests get `shutdown_grace` to
    /// finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server { listener, app } = self;
        let checker = tokio::spawn(
            app.readiness
                .clone()
                .watch_database(app.db.clone(), app.settings.dependency_check_interval),
        );
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(app.settings.header_read_timeout)
            .keep_alive(true);
        let graceful = GracefulShutdown::new();
        let s = &app.settings;
        log::info!(
            "{} listening on {} ({} storage{}, admission {})",
            s.instance_id(),
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            app.db.engine(),
            app.db
                .tls_mode()
                .map(|m| format!(" with sslmode={m}"))
                .unwrap_or_default(),
            match s.admission {
                crate::admission::Mode::Fixed => format!("fixed at {}", s.max_in_flight),
                crate::admission::Mode::Adaptive => format!(
                    "adaptive {}..{} from {}, queue timeout {:?}",
                    s.admission_min, s.admission_max, s.max_in_flight, s.admission_queue_timeout
                ),
            }
        );
        let serve = |stream: tokio::net::TcpStream| {
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            let svc = service_fn(move |req| routes::handle(app.clone(), req));
            let io = TokioIo::new(JsonParseErrors::new(stream));
            let conn = graceful.watch(http.serve_connection(io, svc));
            tokio::spawn(async move {
                let _ = conn.await;
            });
        };
        accept_until(&listener, shutdown, &serve).await;
        app.readiness.shutting_down.store(true, Ordering::Release);
        let drain = app.settings.shutdown_drain_delay;
        log::info!("shutting down: /ready fails; still serving for {drain:?}");
        accept_until(&listener, tokio::time::sleep(drain), &serve).await;
        // Connections the kernel already completed are served, not reset with the listener.
        while let Some(accepted) = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match listener.poll_accept(cx) {
                std::task::Poll::Ready(r) => Some(r),
                std::task::Poll::Pending => None,
            })
        })
        .await
        {
            match accepted {
                Ok((stream, _)) => serve(stream),
                Err(_) => break,
            }
        }
        drop(listener);
        log::info!("listener closed: waiting for in-flight requests");
        if tokio::time::timeout(app.settings.shutdown_grace, graceful.shutdown())
            .await
            .is_err()
        {
            log::warn!("grace period over; closing remaining connections");
        }
        checker.abort();
        app.db.close().await;
    }
}

/// Accept connections and hand each to `serve` until `until` resolves.
async fn accept_until(
    listener: &TcpListener,
    until: impl Future<Output = ()>,
    serve: &impl Fn(tokio::net::TcpStream),
) {
    tokio::pin!(until);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => serve(stream),
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = &mut until => return,
        }
    }
}

/// hyper answers a request head it cannot parse by itself, before any of our code runs, with
/// an empty body: 400 (malformed), 414 (URI over 64 KiB), 431 (head too large, too many
/// headers). This stream wrapper recognises such an answer as hyper writes it (our own
/// answers always have a body) and writes the API's JSON error shape in its place.
pub struct JsonParseErrors<S> {
    inner: S,
    /// A replacement answer still to be written, and how much of it was.
    pending: Option<(Vec<u8>, usize)>,
}

impl<S> JsonParseErrors<S> {
    pub fn new(inner: S) -> Self {
        JsonParseErrors {
            inner,
            pending: None,
        }
    }
}

/// The JSON answer for hyper's bodiless automatic one in `head`, if it is one.
fn json_parse_error(head: &[u8]) -> Option<Vec<u8>> {
    let (status, error) = match head.get(..13)? {
        b"HTTP/1.1 400 " => (400, "malformed request"),
        b"HTTP/1.1 414 " => (414, "request target (URL) too long"),
        b"HTTP/1.1 431 " => (431, "request header fields too large (size or count)"),
        _ => return None,
    };
    let text = std::str::from_utf8(head).ok()?.to_ascii_lowercase();
    if !(text.ends_with("\r\n\r\n") && text.contains("\r\ncontent-length: 0\r\n")) {
        return None;
    }
    let body = serde_json::json!({ "error": error, "status": status }).to_string();
    Some(
        format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or(""),
            body.len()
        )
        .into_bytes(),
    )
}

impl<S: tokio::io::AsyncWrite + Unpin> JsonParseErrors<S> {
    /// Write what is left of a replacement; Ready(Ok) once none is left.
    fn poll_pending(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while let Some((bytes, done)) = &mut self.pending {
            let n = std::task::ready!(
                std::pin::Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..])
            )?;
            if n == 0 {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            *done += n;
            if *done == bytes.len() {
                self.pending = None;
            }
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for JsonParseErrors<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for JsonParseErrors<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        if let Some(json) = json_parse_error(buf) {
            self.pending = Some((json, 0));
            // The replacement is written here or by the next write, flush or shutdown.
            let _ = self.poll_pending(cx)?;
            return std::task::Poll::Ready(Ok(buf.len()));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = int.recv() => log::info!("SIGINT received"),
    }
}
