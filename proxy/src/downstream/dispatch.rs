//! Every accepted connection: the PROXY protocol header when its peer is a trusted balancer,
//! the connection caps, the head deadline ([`ClientStream`]), then the engine: the own
//! HTTP/1 engine first (when `fast_path` is on), pingora's for what it hands over.

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::connections::{client_key, expects_proxy_header, per_ip_cap, ConnectionCounter};
use super::proxy_protocol::{self, Source};
use super::tls::{self, Handshake};
use super::ClientStream;
use crate::answers::ErrorAnswer;
use crate::h1::Served;
use crate::metrics::Metrics;
use crate::policy::Rejection;
use crate::state::{Gateway, Snapshot};

/// Wraps the proxy app: caps connections, applies the head deadline, counts open ones.
pub struct ConnectionTracked<A> {
    pub inner: Arc<A>,
    /// The own HTTP/1 engine ([`crate::h1`], when `fast_path` is on); what it hands over
    /// goes to `inner`.
    pub gateway: Arc<Gateway>,
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub counter: Arc<ConnectionCounter>,
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ConnectionTracked<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        // One config for the whole set-up of this connection; let go of before its requests,
        // so a long keep-alive connection does not hold an old config after a reload.
        let snap = self.snapshot.load_full();
        let c = &snap.config;
        let head_timeout = c.header_timeout;
        let mut peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        if peer.is_some_and(|ip| expects_proxy_header(c, ip)) {
            match proxy_protocol::accept(stream, accepted + head_timeout).await {
                Ok((s, source)) => {
                    stream = s;
                    if let Source::Client(addr) = source {
                        peer = Some(addr.ip());
                    }
                }
                Err((s, why)) => {
                    self.metrics.reject(Rejection::ProxyProtocol);
                    if let Some(mut s) = s {
                        let _ = s
                            .write_all(&ErrorAnswer::closing(400, why, None).to_bytes())
                            .await;
                        let _ = s.flush().await;
                    }
                    return None;
                }
            }
        }
        let key = peer.map(|ip| client_key(c, ip));
        let _guard = match self
            .counter
            .try_open(key, per_ip_cap(c, peer), c.conn_total)
        {
            Ok(g) => g,
            Err(reason) => {
                self.metrics.reject(reason);
                // A minimal answer, then close: the client learns why instead of a reset.
                let _ = stream
                    .write_all(&ErrorAnswer::closing(503, reason.message(), Some(1)).to_bytes())
                    .await;
                let _ = stream.flush().await;
                self.counter.answered(key, reason);
                return None;
            }
        };
        let fast = c.fast_path;
        let (max_resets, max_header_bytes) = (c.http2.max_resets, c.max_header_bytes);
        let mut first_due = accepted + head_timeout;
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let mut h2 = false;
        if let Some(edge) = local.and_then(|l| snap.tls.for_local(l)) {
            let due = accepted + c.handshake_timeout;
            match tls::handshake(&edge.acceptor, stream, due).await {
                Handshake::Done(s, alpn_h2) => {
                    stream = s;
                    h2 = alpn_h2;
                    first_due = Instant::now() + head_timeout;
                }
                Handshake::Refused(reason) => {
                    self.metrics.reject(reason);
                    return None;
                }
            }
        } else if c.http2.cleartext {
            h2 = tokio::time::timeout_at(first_due, starts_with_h2_preface(&mut stream))
                .await
                .unwrap_or(false);
        }
        drop(snap);
        let mut io = ClientStream::new(stream, head_timeout, first_due, self.metrics.clone());
        if h2 {
            // pingora's HTTP/2 server, its requests through pingora's engine (`pingora_h1`).
            let _ = self
                .inner
                .process_new(Box::new(io.http2(max_resets, max_header_bytes)), shutdown)
                .await;
            return None;
        }
        if fast {
            match self.gateway.serve_h1(&mut io, shutdown).await {
                Served::Closed => return None,
                Served::Pingora => {}
            }
        }
        let mut next: Option<Stream> = Some(Box::new(io));
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Whether a cleartext connection begins with the HTTP/2 preface (prior knowledge).
async fn starts_with_h2_preface(stream: &mut Stream) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; PREFACE.len()];
    matches!(stream.try_peek(&mut buf).await, Ok(true)) && buf == *PREFACE
}
