//! Building and running the server: the proxy service with its engines, the metrics
//! listener (with the gateway's own `/ready`), reload, health checks, and the drain on
//! shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::anyhow_like;
use crate::config::GatewayConfig;
use crate::downstream::connections::{AcceptFilter, ConnectionCounter};
use crate::downstream::dispatch::ConnectionTracked;
use crate::metrics::{Metrics, MetricsEndpoint};
use crate::reload;
use crate::state::{Gateway, Snapshot};
use crate::upstream::{HealthService, Pools, Upstreams};

/// Options that come from the command line rather than the file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The config file, reloaded on SIGHUP (and on change with `watch: true`).
    pub config_path: std::path::PathBuf,
    /// Hash of the file the config was loaded from.
    pub config_hash: u64,
    /// Take over the listening sockets of a running gateway (pingora's `--upgrade`).
    pub upgrade: bool,
    /// Path of the socket used for the `--upgrade` hand-over.
    pub upgrade_sock: Option<String>,
}

/// Build the pingora server (proxy, metrics listener, health checks) from a validated config.
pub fn build_server(config: GatewayConfig, opts: &RunOptions) -> anyhow_like::Result<Server> {
    let metrics = Metrics::new();
    let upstreams = Upstreams::new(
        "default",
        &config.health,
        config.keepalive_pool,
        metrics.clone(),
    );
    // Resolve the initial pool and run one health pass (bounded by the check timeout) before
    // serving, so the first requests (at a cold start, or right after an `--upgrade`
    // hand-over) find the backends that are up instead of none.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(upstreams.set_backends(
        &config.backends,
        &config.upstream().queue,
        config.hosts_file.as_deref(),
    ))?;
    upstreams.set_tls(config.upstream().tls.as_ref());
    let pools = Pools::new(upstreams.clone(), metrics.clone());
    rt.block_on(pools.apply(&config))?;
    rt.block_on(pools.check_once());
    drop(rt);

    let mut conf = ServerConf {
        threads: config.workers,
        work_stealing: config.work_stealing,
        // pingora's own connection pool serves upgrades only (`pingora_h1`); requests use the
        // gateway's per-backend pool (`upstream::conn`).
        upstream_keepalive_pool_size: config.keepalive_pool,
        // pingora sleeps this long after SIGTERM; the drain watcher below exits as soon as
        // the last in-flight request finished, so this is only the upper bound.
        grace_period_seconds: Some(config.shutdown_grace.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    if let Some(sock) = &opts.upgrade_sock {
        conf.upgrade_sock = sock.clone();
    }
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::new(config.clone(), None)));
    let gateway = Gateway::new(snapshot.clone(), pools.clone(), metrics.clone());
    let own = Arc::new(gateway.clone());
    let mut http = pingora::proxy::HttpProxy::new(gateway, server.configuration.clone());
    http.handle_init_modules();
    let mut options = pingora::apps::HttpServerOptions::default();
    options.keepalive_request_limit = Some(config.max_requests_per_connection as u32);
    options.h2c = config.http2.cleartext;
    options.h2_idle_timeout = Some(config.keepalive_timeout);
    http.server_options = Some(options);
    http.h2_options = Some(h2_options(&config));
    metrics.tls_certificates(&config);
    let counter = ConnectionCounter::new(metrics.clone());
    let app = ConnectionTracked {
        inner: Arc::new(http),
        gateway: own,
        snapshot: snapshot.clone(),
        counter: counter.clone(),
        metrics: metrics.clone(),
    };
    let mut proxy_service = Service::new("floodgate proxy".to_string(), app);
    proxy_service.set_connection_filter(Arc::new(AcceptFilter {
        snapshot: snapshot.clone(),
        counter,
        metrics: metrics.clone(),
    }));
    // A head and a body that fit in the write buffer go out in one write (see
    // `buffers.client_write_bytes`); pingora's own default buffer is one MSS.
    let buffers = L4BufferSettings::default().write(config.client_write_bytes);
    for addr in &config.listen {
        proxy_service.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(buffers));
    }
    server.add_service(proxy_service);

    if let Some(addr) = &config.metrics_listen {
        let scrape_upstreams = pools.clone();
        let ready_upstreams = pools.clone();
        let endpoint = MetricsEndpoint {
            metrics: metrics.clone(),
            on_scrape: Box::new(move || scrape_upstreams.refresh_gauges()),
            ready: Box::new(move || ready_upstreams.ready()),
        };
        let mut metrics_service = Service::new("metrics".to_string(), endpoint);
        metrics_service.add_tcp(&addr.to_string());
        metrics_service.threads = Some(1);
        server.add_service(metrics_service);
    }

    let snapshot_for_cluster = snapshot.clone();
    let reloader = reload::Reloader::new(
        opts.config_path.clone(),
        config.clone(),
        opts.config_hash,
        snapshot,
        pools.clone(),
        metrics.clone(),
    );
    server.add_service(background_service(
        "reload",
        reload::ReloadService {
            reloader,
            watch: config.watch,
        },
    ));
    server.add_service(background_service("health checks", HealthService(pools)));
    if let Some(cluster) = snapshot_for_cluster.load().limits.cluster.clone() {
        server.add_service(background_service(
            "cluster limits",
            ClusterSync {
                cluster,
                snapshot: snapshot_for_cluster.clone(),
                metrics: metrics.clone(),
            },
        ));
    }
    server.add_service(background_service(
        "drain",
        DrainWatcher {
            metrics,
            grace: config.shutdown_grace,
        },
    ));
    Ok(server)
}

/// Reconciles the `scope: cluster` limits of the config in force with Redis
/// ([`crate::limits::cluster::run`]).
struct ClusterSync {
    cluster: Arc<crate::limits::cluster::Cluster>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl BackgroundService for ClusterSync {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let snapshot = self.snapshot.clone();
        let limiters = Box::new(move || snapshot.load().limits.cluster_limiters());
        tokio::select! {
            _ = crate::limits::cluster::run(self.cluster.clone(), limiters, self.metrics.clone()) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// pingora's HTTP/2 server settings (the `h2` crate's): the stream cap, the header-list cap
/// (`buffers.max_header_bytes`, from which h2 derives how many CONTINUATION frames a header
/// block may have), and h2's own rapid-reset cap (streams reset by the client before they
/// were taken) at `http2.max_resets`: the gateway's count of every reset and CONTINUATION
/// frame (`downstream::h2_frames`, at the same bounds) sees the bytes first, so it is the one
/// that closes a flood, and counts it.
fn h2_options(config: &GatewayConfig) -> pingora::protocols::http::v2::server::H2Options {
    let mut h2 = pingora::protocols::http::v2::server::H2Options::new();
    h2.max_concurrent_streams(config.http2.max_concurrent_streams)
        .max_header_list_size(config.max_header_bytes.min(u32::MAX as usize) as u32)
        .max_pending_accept_reset_streams(config.http2.max_resets as usize);
    h2
}

/// Build and run until a shutdown signal; SIGTERM and SIGINT both drain gracefully.
pub fn run(config: GatewayConfig, opts: &RunOptions) -> anyhow_like::Result<()> {
    let server = build_server(config, opts)?;
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals),
    });
    Ok(())
}

/// SIGTERM and SIGINT drain in-flight requests (pingora treats SIGINT as a fast exit);
/// SIGQUIT hands the listening sockets to a new process started with `--upgrade`.
struct Signals;

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("signal handler");
        let mut int = signal(SignalKind::interrupt()).expect("signal handler");
        let mut quit = signal(SignalKind::quit()).expect("signal handler");
        tokio::select! {
            _ = term.recv() => { log::info!("SIGTERM: draining"); ShutdownSignal::GracefulTerminate }
            _ = int.recv() => { log::info!("SIGINT: draining"); ShutdownSignal::GracefulTerminate }
            _ = quit.recv() => { log::info!("SIGQUIT: handing over to the new process"); ShutdownSignal::GracefulUpgrade }
        }
    }
}

/// Ends the process as soon as the last in-flight request finished and the last connection
/// closed after shutdown began (listeners are closed by then), instead of always sleeping
/// the whole grace period.
struct DrainWatcher {
    metrics: Arc<Metrics>,
    grace: Duration,
}

#[async_trait]
impl BackgroundService for DrainWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        let started = Instant::now();
        // Requests in flight, and connections: an idle one gets a moment to deliver a request
        // already sent (`h1::DRAIN_IDLE_GRACE`), so a client that does not retry loses none.
        let busy =
            |m: &Metrics| m.inflight_requests.get() > 0 || m.downstream_connections.get() > 0;
        while busy(&self.metrics) && started.elapsed() < self.grace {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        log::info!(
            "drained: {} request(s) still in flight after {:?}; exiting",
            self.metrics.inflight_requests.get(),
            started.elapsed()
        );
        std::process::exit(0);
    }
}
