//! What every request shares: the config in force with its limiter state ([`Snapshot`]),
//! the backend pool, the metrics, and the request-id sequence ([`Gateway`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::GatewayConfig;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::upstream::Pools;

/// The config in force and the state built from it, swapped as one by reload.
pub struct Snapshot {
    pub config: GatewayConfig,
    pub limits: Limits,
    /// The TLS listeners' handshake settings (certificates by SNI).
    pub tls: crate::tls::Edge,
}

impl Snapshot {
    pub fn new(config: GatewayConfig, previous: Option<&Snapshot>) -> Self {
        let limits = Limits::build(&config, previous.map(|p| &p.limits));
        let tls = crate::tls::Edge::build(&config, previous.map(|p| &p.tls));
        Snapshot {
            config,
            limits,
            tls,
        }
    }
}

/// Shared by every request of every engine.
#[derive(Clone)]
pub struct Gateway {
    /// The config in force and its limiter state; replaced as a whole by reload, read
    /// without locks.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    /// Every pool (`default` and the named ones).
    pub pools: Arc<Pools>,
    pub metrics: Arc<Metrics>,
    /// Request bodies buffered at once, all connections together.
    pub bodies: Arc<crate::policy::body::BodyBudget>,
    /// Process-unique prefix of generated request ids.
    request_id_prefix: u32,
    request_seq: Arc<AtomicU64>,
}

impl Gateway {
    pub fn new(snapshot: Arc<ArcSwap<Snapshot>>, pools: Arc<Pools>, metrics: Arc<Metrics>) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
            .unwrap_or(0)
            ^ std::process::id().rotate_left(16);
        Gateway {
            snapshot,
            pools,
            bodies: crate::policy::body::BodyBudget::new(metrics.buffered_body_bytes.clone()),
            metrics,
            request_id_prefix: seed,
            request_seq: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A new request id, 20 hex digits: the process prefix, then a sequence number. Written
    /// without the formatting machinery: this runs for every request that brings no id.
    pub fn new_request_id(&self) -> [u8; 20] {
        let n = self.request_seq.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 20];
        hex_into(&mut id[..8], u64::from(self.request_id_prefix));
        hex_into(&mut id[8..], n);
        id
    }
}

/// `out.len()` lowercase hex digits of `n` (its low bits), most significant first.
fn hex_into(out: &mut [u8], mut n: u64) {
    for b in out.iter_mut().rev() {
        *b = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_into_writes_fixed_width_lowercase() {
        let mut out = [0u8; 12];
        hex_into(&mut out, 0xabc_0123);
        assert_eq!(&out, b"00000abc0123");
        let mut out = [0u8; 8];
        hex_into(&mut out, 0xdead_beef_ffff_ffff);
        assert_eq!(&out, b"ffffffff");
    }
}
