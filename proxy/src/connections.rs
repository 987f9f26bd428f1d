//! Downstream connection accounting. pingora has no connection-close hook, so the proxy app is
//! wrapped: the wrapper owns the keep-alive loop of a connection and holds a guard for exactly
//! as long as the connection is open (idle keep-alive time included).

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use crate::metrics::Metrics;

/// Wraps a server app and counts its open connections.
pub struct ConnectionTracked<A> {
    pub inner: Arc<A>,
    pub metrics: Arc<Metrics>,
}

/// Decrements the open-connection gauge when the connection ends, however it ends.
struct OpenConnection(prometheus::IntGauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ConnectionTracked<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.metrics.downstream_connections.inc();
        let _open = OpenConnection(self.metrics.downstream_connections.clone());
        let mut next = Some(stream);
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}
