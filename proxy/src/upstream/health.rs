//! Active health checks: pingora's HTTP check with settings that reload can swap. Each
//! result is counted on the backend's own state ([`BackendState::record_check`]), which is
//! kept per address: pingora keys its health by address and weight, so a weight changed by a
//! reload would start over as healthy there. The pool selects on our state only.

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use async_trait::async_trait;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::lb::Backend;
use pingora::prelude::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::Result;

use super::backend::BackendState;
use super::conn;
use super::Pools;
use crate::config::HealthSettings;
use crate::tls::UpstreamTls;

pub(super) struct ReadinessCheck {
    pub(super) settings: ArcSwap<(HealthSettings, HttpHealthCheck)>,
    /// The pool's TLS: its checks go over TLS too, through the gateway's own client.
    pub(super) tls: ArcSwapOption<UpstreamTls>,
}

/// One check of a TLS pool's backend over the gateway's own client (the same handshake as
/// its requests): `GET <path>`, a 200 passes.
async fn tls_check(tls: &UpstreamTls, s: &HealthSettings, target: &Backend) -> Result<()> {
    let fail = |why: &str| {
        pingora::Error::e_explain(
            pingora::ErrorType::ConnectError,
            format!("health check: {why}"),
        )
    };
    let Some(addr) = target.as_inet().copied() else {
        return fail("not an inet address");
    };
    let host = target
        .ext
        .get::<Arc<BackendState>>()
        .and_then(|st| st.host());
    let host = host.as_deref().map(String::as_str);
    let mut c = match conn::connect(addr, s.timeout, Some(tls), host).await {
        Ok(c) => c,
        Err(e) => return fail(e.text()),
    };
    let name = tls.sni.as_deref().or(host).unwrap_or("localhost");
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {name}\r\nUser-Agent: floodgate-health-check\r\nConnection: close\r\n\r\n",
        s.path
    );
    let mut lines = Vec::new();
    match conn::exchange_head(
        &mut c,
        request.as_bytes(),
        false,
        &mut lines,
        s.timeout,
        s.timeout,
    )
    .await
    {
        Ok(head) if head.status == 200 => Ok(()),
        Ok(head) => fail(&format!("status {}", head.status)),
        Err((e, _)) => fail(e.text()),
    }
}

impl ReadinessCheck {
    pub(super) fn new(s: &HealthSettings) -> Self {
        ReadinessCheck {
            settings: ArcSwap::from_pointee(Self::build(s)),
            tls: ArcSwapOption::empty(),
        }
    }

    pub(super) fn build(s: &HealthSettings) -> (HealthSettings, HttpHealthCheck) {
        let mut hc = HttpHealthCheck::new("localhost", false);
        let mut req = RequestHeader::build("GET", s.path.as_bytes(), None)
            .expect("health path validated at config load");
        req.insert_header("Host", "localhost")
            .expect("valid header");
        req.insert_header("User-Agent", "floodgate-health-check")
            .expect("valid header");
        hc.req = req;
        hc.peer_template.options.connection_timeout = Some(s.timeout);
        hc.peer_template.options.total_connection_timeout = Some(s.timeout);
        hc.peer_template.options.read_timeout = Some(s.timeout);
        hc.peer_template.options.write_timeout = Some(s.timeout);
        hc.consecutive_failure = s.failures;
        hc.consecutive_success = s.successes;
        (s.clone(), hc)
    }
}

#[async_trait]
impl HealthCheck for ReadinessCheck {
    async fn check(&self, target: &Backend) -> Result<()> {
        let current = self.settings.load_full();
        let s = &current.0;
        // pingora's check has per-step timeouts; bound the whole check as well.
        let tls = self.tls.load_full();
        let check = async {
            match &tls {
                Some(tls) => tls_check(tls, s, target).await,
                None => current.1.check(target).await,
            }
        };
        let result = match tokio::time::timeout(s.timeout, check).await {
            Ok(r) => r,
            Err(_) => pingora::Error::e_explain(
                pingora::ErrorType::ReadTimedout,
                "health check timed out",
            ),
        };
        if let Some(state) = target.ext.get::<Arc<BackendState>>() {
            match state.record_check(result.is_ok(), s.successes, s.failures) {
                Some(true) => {
                    // The checks decide recovery: an ejection of a backend that was down ends.
                    state.load.clear_ejection();
                    log::info!("backend {} is up", state.label)
                }
                Some(false) => log::warn!("backend {} is down", state.label),
                None => {}
            }
        }
        result
    }

    fn health_threshold(&self, success: bool) -> usize {
        let s = &self.settings.load().0;
        if success {
            s.successes
        } else {
            s.failures
        }
    }
}

/// The health check registered with pingora delegates to our shared [`ReadinessCheck`].
pub(super) struct SharedCheck(pub(super) Arc<ReadinessCheck>);

#[async_trait]
impl HealthCheck for SharedCheck {
    async fn check(&self, target: &Backend) -> Result<()> {
        self.0.check(target).await
    }
    fn health_threshold(&self, success: bool) -> usize {
        self.0.health_threshold(success)
    }
}

/// Runs the health checks of every pool as a pingora background service.
pub struct HealthService(pub Arc<Pools>);

#[async_trait]
impl BackgroundService for HealthService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        tokio::select! {
            _ = self.0.health_loop() => {}
            _ = shutdown.changed() => {}
        }
    }
}
