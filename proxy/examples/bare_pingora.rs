//! pingora's own example load balancer (pingora-proxy/examples/load_balancer.rs), plain HTTP,
//! as a reference for loadtest/: what pingora gives before any of Floodgate's work (no limits,
//! no caps, no metrics, no request ids, the system allocator). The report shows it beside
//! Floodgate, nginx and HAProxy, so the share of the gap that is pingora's own is measured in
//! the same run rather than assumed.
//! Usage: bare_pingora <listen-port> <threads> <upstream host:port>...

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::lb::{health_check, selection::RoundRobin, LoadBalancer};
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::{Error, ErrorType, Result};

struct Lb(Arc<LoadBalancer<RoundRobin>>);

#[async_trait]
impl ProxyHttp for Lb {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let upstream = self
            .0
            .select(b"", 256)
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(503), "no upstream"))?;
        Ok(Box::new(HttpPeer::new(upstream, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: bare_pingora <listen-port> <threads> <upstream host:port>...");
        std::process::exit(2);
    }
    let threads: usize = args[1].parse().expect("threads");
    let conf = ServerConf {
        threads,
        // Its own socket, so it can run beside a gateway without taking over from it.
        upgrade_sock: format!("/tmp/bare-pingora-{}.sock", std::process::id()),
        // Exit at once on SIGTERM (pingora's default waits a minute for a hand-over).
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();

    let mut upstreams = LoadBalancer::try_from_iter(&args[2..]).expect("upstream addresses");
    upstreams.set_health_check(health_check::TcpHealthCheck::new());
    upstreams.health_check_frequency = Some(Duration::from_secs(1));
    let background = background_service("health check", upstreams);
    let upstreams = background.task();

    let mut lb = pingora::proxy::http_proxy_service(&server.configuration, Lb(upstreams));
    lb.add_tcp(&format!("127.0.0.1:{}", args[0]));
    server.add_service(lb);
    server.add_service(background);
    server.run_forever();
}
