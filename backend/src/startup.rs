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
    /// The in-flight cap.
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
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Config(String),
}

impl Server {
    /// Connect the database, apply migrations, bind the listener.
    pub async fn build(settings: Settings) -> Result<Server, StartError> {
        let db = Db::connect(&settings.db())?;
        db.migrate().await?;
        Self::build_with_db(settings, db)
    }

    /// Bind with an already-connected database.
    pub fn build_with_db(settings: Settings, db: Db) -> Result<Server, StartError> {
        let addr = SocketAddr::new(settings.host, settings.port);
        let listener = bind(addr, settings.listen_backlog)
            .map_err(|source| StartError::Bind { addr, source })?;
        let admission = Admission::new(settings.max_in_flight);
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
        let metrics = Arc::new(Metrics::new());
        let redis_store = || -> Result<Option<ratelimit::redis::RedisStore>, StartError> {
            match settings.redis_url.as_deref().filter(|u| !u.is_empty()) {
                Some(url) => ratelimit::redis::RedisStore::new(
                    url,
                    &settings.instance_id(),
                    settings.redis_timeout,
                )
                .map(Some)
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
        log::info!(
            "{} listening on {} ({} storage, max in flight {})",
            app.settings.instance_id(),
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            app.db.engine(),
            app.settings.max_in_flight
        );
        let serve = |stream: tokio::net::TcpStream| {
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            let svc = service_fn(move |req| routes::handle(app.clone(), req));
            let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
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
