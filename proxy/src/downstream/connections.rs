//! Open-connection caps, exact, per client and in total, and the accept-loop filter that
//! turns away a client told within the last second.
//!
//! pingora has no connection-close hook, so the dispatcher ([`super::dispatch`]) holds a
//! [`ConnectionGuard`] for exactly as long as the connection is open, idle keep-alive time
//! and slow header bytes included (nginx's `limit_conn` counts only connections with a
//! request in flight). Clients are keyed as every per-client limit is
//! ([`identity::limit_key`]: an IPv6 client by its /64 by default), so one host cannot
//! spread its connections over its addresses.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::ConnectionFilter;
use tokio::time::Instant;

use crate::config::GatewayConfig;
use crate::metrics::Metrics;
use crate::policy::identity;
use crate::policy::Rejection;
use crate::state::Snapshot;

const SHARDS: usize = 16;

/// Open connections, in total and per client IP. Entries exist only while an IP holds a
/// connection, so memory is bounded by the total cap.
pub struct ConnectionCounter {
    total: AtomicUsize,
    per_ip: [Mutex<HashMap<u64, IpConnections>>; SHARDS],
    /// When a connection over the total cap was last answered (ms since `epoch`; 0: never).
    total_answered_ms: AtomicU64,
    epoch: Instant,
    metrics: Arc<Metrics>,
}

/// One client IP's open connections, and when one over its cap was last answered with a 503
/// (ms since the counter's epoch; 0: never).
#[derive(Default)]
struct IpConnections {
    open: u32,
    answered_ms: u64,
}

/// Connections refused again within this long after a 503 answer are closed in the accept
/// loop without one (a client told once does not need telling a thousand times a second).
const ANSWER_EVERY_MS: u64 = 1000;

/// Releases one connection's counts when dropped, however the connection ends.
pub struct ConnectionGuard {
    counter: Arc<ConnectionCounter>,
    /// The client key whose count this connection holds (None when not counted per client).
    ip: Option<u64>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            self.counter.release_ip(ip);
        }
        self.counter.total.fetch_sub(1, Ordering::AcqRel);
        self.counter.metrics.downstream_connections.dec();
    }
}

impl ConnectionCounter {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(ConnectionCounter {
            total: AtomicUsize::new(0),
            per_ip: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            total_answered_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
        })
    }

    fn shard(&self, key: &u64) -> &Mutex<HashMap<u64, IpConnections>> {
        let h = (*key ^ (*key >> 32)) as usize;
        &self.per_ip[h.wrapping_mul(0x9E37_79B9) % SHARDS]
    }

    /// Count a new connection, or refuse it. `ip`: the client's key ([`client_key`]);
    /// `per_ip_cap` None: not counted per client (exempt clients, trusted proxies); 0 caps
    /// mean unlimited.
    pub fn try_open(
        self: &Arc<Self>,
        ip: Option<u64>,
        per_ip_cap: Option<usize>,
        total_cap: usize,
    ) -> Result<ConnectionGuard, Rejection> {
        let before = self.total.fetch_add(1, Ordering::AcqRel);
        if total_cap > 0 && before >= total_cap {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejection::ConnectionsTotal);
        }
        let counted_ip = match (ip, per_ip_cap) {
            (Some(ip), Some(cap)) => {
                let mut map = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
                let entry = map.entry(ip).or_default();
                if cap > 0 && entry.open as usize >= cap {
                    if entry.open == 0 {
                        map.remove(&ip);
                    }
                    drop(map);
                    self.total.fetch_sub(1, Ordering::AcqRel);
                    return Err(Rejection::ConnectionsPerIp);
                }
                entry.open += 1;
                if entry.open == 1 {
                    self.metrics.downstream_client_ips.inc();
                }
                Some(ip)
            }
            _ => None,
        };
        self.metrics.downstream_connections.inc();
        Ok(ConnectionGuard {
            counter: self.clone(),
            ip: counted_ip,
        })
    }

    fn release_ip(&self, ip: u64) {
        let mut map = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&ip) {
            entry.open -= 1;
            if entry.open == 0 {
                map.remove(&ip);
                self.metrics.downstream_client_ips.dec();
            }
        }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that 0 keeps meaning "never".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Record that a connection refused for `reason` was answered with a 503.
    pub fn answered(&self, ip: Option<u64>, reason: Rejection) {
        let now = self.now_ms();
        match (reason, ip) {
            (Rejection::ConnectionsPerIp, Some(ip)) => {
                let mut map = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
                if let Some(entry) = map.get_mut(&ip) {
                    entry.answered_ms = now;
                }
            }
            _ => self.total_answered_ms.store(now, Ordering::Relaxed),
        }
    }

    /// Whether a new connection would be refused and was already answered within the last
    /// second: then it is closed in the accept loop, without a task or an answer. A read of
    /// the counts only; `try_open` stays the exact check.
    pub fn refuse_quietly(
        &self,
        ip: u64,
        per_ip_cap: Option<usize>,
        total_cap: usize,
    ) -> Option<Rejection> {
        let recent = |at: u64| at > 0 && self.now_ms().saturating_sub(at) < ANSWER_EVERY_MS;
        if total_cap > 0
            && self.total.load(Ordering::Acquire) >= total_cap
            && recent(self.total_answered_ms.load(Ordering::Relaxed))
        {
            return Some(Rejection::ConnectionsTotal);
        }
        let cap = per_ip_cap.filter(|&c| c > 0)?;
        let map = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.get(&ip)?;
        (entry.open as usize >= cap && recent(entry.answered_ms))
            .then_some(Rejection::ConnectionsPerIp)
    }
}

/// The key a client's connections are counted under: the same as its rate limits'.
pub fn client_key(c: &GatewayConfig, ip: IpAddr) -> u64 {
    identity::limit_key(ip, c.ipv6_prefix)
}

fn is_trusted(c: &GatewayConfig, ip: IpAddr) -> bool {
    c.trusted_proxies.iter().any(|n| n.contains(ip))
}

/// Whether a connection from `ip` must open with a PROXY protocol header (its client is not
/// known before the header is read).
pub fn expects_proxy_header(c: &GatewayConfig, ip: IpAddr) -> bool {
    c.proxy_protocol && is_trusted(c, ip)
}

/// The per-IP connection cap for a peer: None for exempt clients and trusted proxies (many
/// clients behind one address).
pub fn per_ip_cap(c: &GatewayConfig, ip: Option<IpAddr>) -> Option<usize> {
    let exempt = ip.is_some_and(|ip| c.exempt.iter().any(|n| n.contains(ip)) || is_trusted(c, ip));
    (!exempt).then_some(c.conn_per_ip)
}

/// Runs in pingora's accept loop: a connection that would be refused again within a second
/// of a 503 answer to the same client (or, at the total cap, to anyone) is closed there,
/// before a task is spawned for it. Counted like every refusal.
pub struct AcceptFilter {
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub counter: Arc<ConnectionCounter>,
    pub metrics: Arc<Metrics>,
}

impl fmt::Debug for AcceptFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AcceptFilter")
    }
}

#[async_trait]
impl ConnectionFilter for AcceptFilter {
    async fn should_accept(&self, addr: Option<&std::net::SocketAddr>) -> bool {
        let Some(ip) = addr.map(|a| a.ip()) else {
            return true;
        };
        let snap = self.snapshot.load();
        let c = &snap.config;
        if expects_proxy_header(c, ip) {
            return true;
        }
        match self
            .counter
            .refuse_quietly(client_key(c, ip), per_ip_cap(c, Some(ip)), c.conn_total)
        {
            Some(reason) => {
                self.metrics.reject(reason);
                false
            }
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_exact_and_released() {
        let counter = ConnectionCounter::new(Metrics::new());
        let (a, b) = (2u64, 3u64);
        let held: Vec<_> = (0..3)
            .map(|_| counter.try_open(Some(a), Some(3), 5).unwrap())
            .collect();
        assert_eq!(
            counter.try_open(Some(a), Some(3), 5).err(),
            Some(Rejection::ConnectionsPerIp)
        );
        let other: Vec<_> = (0..2)
            .map(|_| counter.try_open(Some(b), Some(3), 5).unwrap())
            .collect();
        assert_eq!(
            counter.try_open(Some(b), Some(3), 5).err(),
            Some(Rejection::ConnectionsTotal)
        );
        drop(held);
        drop(other);
        assert_eq!(counter.metrics.downstream_connections.get(), 0);
        assert_eq!(counter.metrics.downstream_client_ips.get(), 0);
        assert!(counter.per_ip.iter().all(|s| s.lock().unwrap().is_empty()));
    }

    /// Issue 20, case 6: an IPv6 host's addresses in one /64 share its connection cap.
    #[test]
    fn ipv6_connections_are_counted_per_prefix() {
        let c = GatewayConfig::parse("upstream:\n  backends: [\"127.0.0.1:9\"]\n").unwrap();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let counter = ConnectionCounter::new(Metrics::new());
        let _one = counter
            .try_open(Some(client_key(&c, a)), Some(1), 0)
            .unwrap();
        assert_eq!(
            counter.try_open(Some(client_key(&c, b)), Some(1), 0).err(),
            Some(Rejection::ConnectionsPerIp)
        );
    }
}
