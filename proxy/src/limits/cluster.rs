//! Cluster-wide rate limits (`scope: cluster`): one limit shared by every gateway replica
//! through Redis, without Redis on the request path.
//!
//! Each replica decides every request alone, with atomics, as a local limit does:
//!
//! - Redis holds the cluster's GCRA state per key and window (a TAT in µs of Redis's clock).
//!   A background task per process ([`run`]) takes **leases** from it: a number of requests'
//!   worth of tokens, granted by one Lua script per batch (all keys of the batch, `TIME`,
//!   the heartbeat), every `cluster.sync_interval` and as soon as a lease runs low.
//! - The request path spends the lease (a compare-and-swap); an empty lease refuses and wakes
//!   the task. It never waits for Redis.
//! - Per-key limits (per IP) first admit a key on this replica's **share** (the limit divided
//!   by the live replica count) in a local table, as a local limit would; only a key that goes
//!   over its share (the local threshold) becomes *hot*: it gets a slot in a fixed-size lease
//!   table and a bucket in Redis, charged first with what the share admitted. Cold keys (a
//!   spray of spoofed addresses) never reach Redis.
//! - Redis unreachable or slower than `cluster.timeout`: the replica is *degraded* and admits
//!   on its share alone (`gateway_cluster_limits_degraded` 1) until a sync succeeds again; what
//!   the global limit admitted meanwhile is charged to Redis first, and a bucket a restarted
//!   Redis lost starts empty within its window, so the return brings no burst. After a call
//!   that timed out (a frozen Redis runs it when it resumes) only heartbeats are sent until one
//!   is answered, so nothing is charged or granted twice.
//!
//! The bound (README, "Cluster-wide limits"): in any period T a limit of N/s with burst B over
//! R replicas with leases of at most L (`L = ceil(N·sync_interval / R)`) admits at most
//! `N·T + max(B, L) + 1 + R·L`: Redis grants at most `N·T + max(B, L) + 1` in T (its bucket
//! holds at least one lease; shares' admissions are charged to it), and a replica can hold at
//! most L granted before T began. Not covered: a per-key client that stays under its share on
//! some replicas while over it on others gets those shares on top (N/R a second each).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::rate::{Decision, Gcra, KeyedLimiter, SharedLimiter};
use crate::config::{ClusterSpec, RateSpec};
use crate::metrics::Metrics;

const TOKEN_BITS: u32 = 48;
const TOKEN_MASK: u64 = (1 << TOKEN_BITS) - 1;
const WAYS: usize = 8;
/// Hot keys one per-key cluster limit tracks on a replica (8 bytes each); past that, the
/// coldest hot key is forgotten and falls back to its share.
pub const HOT_SLOTS: usize = 1 << 14;
/// Keys one sync asks leases for at most; the rest wait for the next one.
pub const MAX_WANTED: usize = 4096;

/// What every cluster limit of the process shares: the Redis settings, whether Redis answers,
/// the live replica count. Kept across reloads (`cluster:` is restart-only).
pub struct Cluster {
    pub spec: ClusterSpec,
    /// A sync succeeded within the last `timeout` + `sync_interval`: leases are trusted.
    healthy: AtomicBool,
    replicas: AtomicU32,
    /// Wakes the sync task: a lease ran low or out.
    wake: tokio::sync::Notify,
}

impl Cluster {
    pub fn new(spec: ClusterSpec) -> Arc<Cluster> {
        Arc::new(Cluster {
            replicas: AtomicU32::new(spec.replicas),
            spec,
            healthy: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        })
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The replica count the shares are computed with.
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }
}

/// This replica's share of a limit: its own local limiter at `limit / replicas`.
enum Share {
    Shared(SharedLimiter),
    Keyed(KeyedLimiter),
}

struct ShareOf {
    replicas: u32,
    limiter: Share,
}

/// One `scope: cluster` limit (global when `keyed` is false, per IP otherwise).
pub struct ClusterLimiter {
    /// Names its keys in Redis (`global`, `per_ip`, `route:/llm`).
    pub name: String,
    pub spec: RateSpec,
    /// The whole limit's windows (for the headers and Redis).
    pub gcras: Vec<Gcra>,
    pub cluster: Arc<Cluster>,
    table_slots: usize,
    share: ArcSwap<ShareOf>,
    keyed: bool,
    /// The global lease: tokens left.
    lease: AtomicU64,
    /// Tokens the global lease last received: refill at half of it.
    low_water: AtomicU64,
    wanted: AtomicBool,
    /// Requests the global share admitted while degraded, charged to Redis on return.
    unreported: AtomicU64,
    /// Per-key leases of hot keys: fingerprint and tokens, 8-way sets.
    leases: Box<[AtomicU64]>,
    /// Hot keys whose lease ran low or out, for the next sync, with what their share had
    /// admitted when they turned hot (charged to Redis once).
    want: Mutex<Vec<(u64, u64)>>,
    /// [`ClusterLimiter::lease_size`] for the replica count in force.
    size: AtomicU64,
}

/// How a per-key lease lookup went.
enum Lease {
    /// A token taken; this many are left.
    Taken(u64),
    /// The key is hot and its lease is empty.
    Empty,
    /// The key is not hot here.
    Absent,
}

impl ClusterLimiter {
    pub fn new(
        name: &str,
        spec: RateSpec,
        keyed: bool,
        table_slots: usize,
        cluster: Arc<Cluster>,
    ) -> Self {
        let replicas = cluster.replicas();
        let share = Self::share_of(&spec, keyed, table_slots, replicas);
        let l = ClusterLimiter {
            name: name.to_string(),
            gcras: Gcra::windows(&spec),
            spec,
            cluster,
            table_slots,
            share: ArcSwap::from_pointee(share),
            keyed,
            lease: AtomicU64::new(0),
            low_water: AtomicU64::new(0),
            wanted: AtomicBool::new(false),
            unreported: AtomicU64::new(0),
            leases: if keyed {
                (0..HOT_SLOTS).map(|_| AtomicU64::new(0)).collect()
            } else {
                Box::new([])
            },
            want: Mutex::new(Vec::new()),
            size: AtomicU64::new(0),
        };
        l.size.store(l.lease_size(), Ordering::Relaxed);
        l
    }

    fn share_of(spec: &RateSpec, keyed: bool, table_slots: usize, replicas: u32) -> ShareOf {
        let share = spec.share(replicas);
        ShareOf {
            replicas,
            limiter: if keyed {
                Share::Keyed(KeyedLimiter::new(share, table_slots))
            } else {
                Share::Shared(SharedLimiter::new(share))
            },
        }
    }

    /// Whether this limiter can stand for `spec` after a reload (same settings, same cluster).
    pub fn same(
        &self,
        name: &str,
        spec: &RateSpec,
        table_slots: usize,
        cluster: &Arc<Cluster>,
    ) -> bool {
        self.name == name
            && &self.spec == spec
            && self.table_slots == table_slots
            && Arc::ptr_eq(&self.cluster, cluster)
    }

    /// The most tokens one lease holds: `ceil(N·sync_interval / R)`, at least 1, with N the
    /// tightest rate: a replica's share of one interval. A lease is topped up when it falls
    /// to half, up to eight times an interval, so one replica alone can take up to `8·N/R`.
    pub fn lease_size(&self) -> u64 {
        let n = self.spec.min_per_second() * self.cluster.spec.sync_interval.as_secs_f64();
        ((n / self.cluster.replicas() as f64).ceil() as u64).max(1)
    }

    /// Decide one request (`key` is ignored by the global limit).
    pub fn check(&self, key: u64) -> Decision {
        if !self.cluster.healthy() {
            return self.on_share(key);
        }
        if !self.keyed {
            return match self.take_global() {
                Some(left) => Decision::Allow {
                    wait: Duration::ZERO,
                    remaining: left.min(u32::MAX as u64) as u32,
                },
                None => self.refuse(),
            };
        }
        match self.take_keyed(key) {
            Lease::Taken(left) => Decision::Allow {
                wait: Duration::ZERO,
                remaining: left.min(u32::MAX as u64) as u32,
            },
            Lease::Empty => {
                self.want_key(key, 0);
                self.refuse()
            }
            Lease::Absent => {
                let share = self.share.load();
                let Share::Keyed(l) = &share.limiter else {
                    return self.on_share(key);
                };
                let d = l.check(key);
                if let Decision::Reject { .. } = d {
                    // Over its share: from now on the key is counted by the cluster, which
                    // is first charged with what the share admitted.
                    self.insert_hot(key);
                    self.want_key(key, l.pending(key));
                }
                d
            }
        }
    }

    /// Degraded: this replica's share alone.
    fn on_share(&self, key: u64) -> Decision {
        let share = self.share.load();
        match &share.limiter {
            Share::Keyed(l) => l.check(key),
            Share::Shared(l) => {
                let d = l.check();
                if let Decision::Allow { .. } = d {
                    self.unreported.fetch_add(1, Ordering::Relaxed);
                }
                d
            }
        }
    }

    fn refuse(&self) -> Decision {
        Decision::Reject {
            retry_after: Duration::from_micros(self.gcras[0].interval)
                .max(self.cluster.spec.sync_interval),
            window: 0,
        }
    }

    fn take_global(&self) -> Option<u64> {
        let mut v = self.lease.load(Ordering::Acquire);
        loop {
            if v == 0 {
                self.want_global();
                return None;
            }
            match self
                .lease
                .compare_exchange_weak(v, v - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if v - 1 == self.low_water.load(Ordering::Relaxed) {
                        self.want_global();
                    }
                    return Some(v - 1);
                }
                Err(seen) => v = seen,
            }
        }
    }

    fn want_global(&self) {
        if !self.wanted.swap(true, Ordering::AcqRel) {
            self.cluster.wake.notify_one();
        }
    }

    fn want_key(&self, key: u64, charge: u64) {
        self.queue_key(key, charge);
        self.cluster.wake.notify_one();
    }

    /// Queue a key for the next sync. Never blocks a request: a contended queue skips the
    /// key until its next refusal (a charge is only lost if the queue is full); a key just
    /// queued without a charge is not queued again.
    fn queue_key(&self, key: u64, charge: u64) {
        let mut q = if charge > 0 {
            self.want.lock().unwrap_or_else(|e| e.into_inner())
        } else if let Ok(q) = self.want.try_lock() {
            q
        } else {
            return;
        };
        if q.len() < MAX_WANTED && (charge > 0 || q.last().map(|w| w.0) != Some(key)) {
            q.push((key, charge));
        }
    }

    fn set_of(&self, key: u64) -> (&[AtomicU64], u64) {
        let k = super::rate::mix(key ^ 0x5bd1_e995);
        let sets = self.leases.len() / WAYS;
        let first = (k as usize & (sets - 1)) * WAYS;
        let fp = ((k >> TOKEN_BITS) as u16).max(1) as u64;
        (&self.leases[first..][..WAYS], fp)
    }

    fn take_keyed(&self, key: u64) -> Lease {
        let (set, fp) = self.set_of(key);
        for slot in set {
            let mut v = slot.load(Ordering::Acquire);
            while v >> TOKEN_BITS == fp {
                let tokens = v & TOKEN_MASK;
                if tokens == 0 {
                    return Lease::Empty;
                }
                match slot.compare_exchange_weak(v, v - 1, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        if tokens - 1 == self.size.load(Ordering::Relaxed) / 2 {
                            self.want_key(key, 0);
                        }
                        return Lease::Taken(tokens - 1);
                    }
                    Err(seen) => v = seen,
                }
            }
        }
        Lease::Absent
    }

    /// Give a key a slot (empty lease): a free one, else the one with the fewest tokens.
    fn insert_hot(&self, key: u64) {
        let (set, fp) = self.set_of(key);
        self.deposit_in(set, fp, 0);
    }

    /// Add `tokens` to a key's lease, taking a slot if it has none.
    fn deposit_in(&self, set: &[AtomicU64], fp: u64, tokens: u64) {
        loop {
            let mut pick: Option<(usize, u64)> = None;
            for (i, slot) in set.iter().enumerate() {
                let v = slot.load(Ordering::Acquire);
                if v >> TOKEN_BITS == fp {
                    let new = (fp << TOKEN_BITS) | ((v & TOKEN_MASK) + tokens).min(TOKEN_MASK);
                    if slot
                        .compare_exchange(v, new, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        return;
                    }
                    pick = None;
                    break;
                }
                if pick.is_none_or(|(_, pv)| v & TOKEN_MASK < pv & TOKEN_MASK || v == 0) {
                    pick = Some((i, v));
                }
            }
            let Some((i, v)) = pick else { continue };
            if set[i]
                .compare_exchange(
                    v,
                    (fp << TOKEN_BITS) | tokens,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
            {
                return;
            }
        }
    }

    fn tokens_of(&self, key: u64) -> u64 {
        let (set, fp) = self.set_of(key);
        set.iter()
            .map(|s| s.load(Ordering::Acquire))
            .find(|v| v >> TOKEN_BITS == fp)
            .map_or(0, |v| v & TOKEN_MASK)
    }

    /// The asks of the next sync: (key, tokens wanted, degraded admissions to charge).
    fn asks(&self) -> Vec<(u64, u64, u64)> {
        let size = self.lease_size();
        if !self.keyed {
            self.wanted.store(false, Ordering::Release);
            let charge = self.unreported.swap(0, Ordering::Relaxed);
            let lease = self.lease.load(Ordering::Acquire);
            // Kept topped up, idle or not, so that the first request after a quiet spell
            // finds tokens: the bound counts every replica's lease as spendable anyway.
            let ask = if lease <= size / 2 { size - lease } else { 0 };
            return if ask > 0 || charge > 0 {
                vec![(0, ask, charge)]
            } else {
                Vec::new()
            };
        }
        let wanted = std::mem::take(&mut *self.want.lock().unwrap_or_else(|e| e.into_inner()));
        let mut charges: HashMap<u64, u64> = HashMap::new();
        let mut order = Vec::new();
        for (k, charge) in wanted {
            *charges.entry(k).or_insert_with(|| {
                order.push(k);
                0
            }) += charge;
        }
        order
            .into_iter()
            .filter_map(|k| {
                let (have, charge) = (self.tokens_of(k), charges[&k]);
                let ask = size.saturating_sub(have);
                (ask > 0 || charge > 0).then_some((k, ask, charge))
            })
            .collect()
    }

    /// Put back what a failed sync did not deliver, for the next tick (not at once: Redis
    /// just failed).
    fn unask(&self, asks: &[(u64, u64, u64)]) {
        for &(key, _, charge) in asks {
            if self.keyed {
                self.queue_key(key, charge);
            } else {
                self.unreported.fetch_add(charge, Ordering::Relaxed);
                self.wanted.store(true, Ordering::Release);
            }
        }
    }

    fn deposit(&self, key: u64, tokens: u64) {
        if self.keyed {
            let (set, fp) = self.set_of(key);
            self.deposit_in(set, fp, tokens);
        } else {
            let total = self.lease.fetch_add(tokens, Ordering::AcqRel) + tokens;
            self.low_water.store(total / 2, Ordering::Relaxed);
        }
    }

    /// Rebuild the share when the live replica count changed (its local state restarts).
    fn follow_replicas(&self, replicas: u32) {
        self.size.store(self.lease_size(), Ordering::Relaxed);
        if self.share.load().replicas != replicas {
            self.share.store(Arc::new(Self::share_of(
                &self.spec,
                self.keyed,
                self.table_slots,
                replicas,
            )));
        }
    }

    fn redis_key(&self, prefix: &str, key: u64, window: usize) -> String {
        let g = &self.gcras[window];
        let count = (g.per_second * g.window_secs as f64).round() as u64;
        format!(
            "{prefix}:rl:{}:{count}r{}b{}:{key:x}",
            self.name, g.window_secs, g.burst
        )
    }
}

/// One Lua call: the heartbeat, then for each ask its windows' buckets.
///
/// KEYS: the heartbeat sorted set, this Redis's birth marker, then every ask's window keys.
/// ARGV: instance, heartbeat lifetime µs, the birth marker this replica knew ("" if none),
/// number of asks, then per ask: windows, tokens asked, admissions to charge, then per window:
/// interval µs, tolerance µs, window µs.
/// Returns: live replicas, the birth marker, then the tokens granted per ask.
///
/// A bucket Redis does not hold starts full (a key is synced once it went over a replica's
/// share; that replica charges what its share admitted), except within a window after Redis
/// restarted empty (a replica knew another birth marker): it then starts empty, so the
/// restart hands out no fresh burst. Every bucket's key expires once the bucket is full again.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local life = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - life)
redis.call('PEXPIRE', KEYS[1], math.ceil(life / 1000))
local marker = redis.call('GET', KEYS[2])
if not marker then
  marker = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[2], marker)
end
local restarted_at = tonumber(redis.call('HGET', KEYS[2] .. ':restart', marker) or '-1')
if ARGV[3] ~= '' and ARGV[3] ~= marker and restarted_at < 0 then
  restarted_at = tonumber(marker)
  redis.call('HSET', KEYS[2] .. ':restart', marker, restarted_at)
end
local out = {redis.call('ZCARD', KEYS[1]), tonumber(marker)}
local a = 5
local k = 3
for i = 1, tonumber(ARGV[4]) do
  local windows = tonumber(ARGV[a])
  local grant = tonumber(ARGV[a + 1])
  local charge = tonumber(ARGV[a + 2])
  a = a + 3
  local tats, intervals, tols = {}, {}, {}
  for w = 1, windows do
    local interval = tonumber(ARGV[a])
    local tol = tonumber(ARGV[a + 1])
    local span = tonumber(ARGV[a + 2])
    a = a + 3
    local tat = tonumber(redis.call('GET', KEYS[k + w - 1]) or '0')
    if tat == 0 and restarted_at >= 0 and now - restarted_at < span + tol then
      tat = now + tol + interval
    end
    if tat < now then tat = now end
    tat = math.min(tat + charge * interval, now + tol + span)
    local avail = math.floor((now + tol + interval - tat) / interval)
    if avail < grant then grant = avail end
    tats[w], intervals[w], tols[w] = tat, interval, tol
  end
  if grant < 0 then grant = 0 end
  for w = 1, windows do
    local tat = tats[w] + grant * intervals[w]
    redis.call('SET', KEYS[k + w - 1], tat, 'PX', math.max(1, math.ceil((tat - now) / 1000)))
  end
  k = k + windows
  table.insert(out, grant)
end
return out
"#;

/// A unique name for this process's heartbeat.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{}-{nanos:08x}", host.trim(), std::process::id())
}

/// The limiters a sync serves: those of the config in force.
pub type Limiters = Box<dyn Fn() -> Vec<Arc<ClusterLimiter>> + Send + Sync>;

/// The sync task: every `sync_interval`, and when a lease runs low (at most eight times an
/// interval), one script call with the heartbeat and every lease wanted. Runs until the
/// process ends.
pub async fn run(cluster: Arc<Cluster>, limiters: Limiters, metrics: Arc<Metrics>) {
    let spec = cluster.spec.clone();
    let instance = instance_name();
    let script = redis::Script::new(SCRIPT);
    let heartbeat_key = format!("{}:replicas", spec.prefix);
    let marker_key = format!("{}:born", spec.prefix);
    let mut marker = String::new();
    let mut suspect = false;
    // A replica is live while it sent a heartbeat within three intervals and a second.
    let life = (spec.sync_interval * 3 + Duration::from_secs(1)).as_micros() as u64;
    let min_gap = spec.sync_interval / 8;
    let mut conn: Option<redis::aio::ConnectionManager> = None;
    let mut next_tick = Instant::now();
    let mut last = Instant::now() - spec.sync_interval;
    metrics.cluster_degraded.set(1);
    metrics.cluster_replicas.set(cluster.replicas() as i64);
    let mut was_healthy = None;
    loop {
        let tick = tokio::select! {
            _ = tokio::time::sleep_until(next_tick.into()) => true,
            _ = cluster.wake.notified() => false,
        };
        if let Some(wait) = min_gap.checked_sub(last.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        last = Instant::now();
        if tick || last >= next_tick {
            next_tick = last + spec.sync_interval;
        }
        let limiters = limiters();
        // After a call that timed out (it may still run: a frozen Redis runs what was queued
        // when it resumes), only heartbeats until one is answered: asks and charges sent into
        // a stall would be granted or charged twice.
        let asks: Vec<Vec<(u64, u64, u64)>> = if suspect {
            vec![Vec::new(); limiters.len()]
        } else {
            limiters.iter().map(|l| l.asks()).collect()
        };
        let result = tokio::time::timeout(spec.timeout, async {
            if conn.is_none() {
                conn = Some(connect(&spec).await?);
            }
            let c = conn.as_mut().expect("connected above");
            let mut inv = script.prepare_invoke();
            inv.key(&heartbeat_key)
                .key(&marker_key)
                .arg(&instance)
                .arg(life)
                .arg(&marker)
                .arg(asks.iter().map(Vec::len).sum::<usize>());
            for (l, asks) in limiters.iter().zip(&asks) {
                let size = l.lease_size();
                for &(key, ask, charge) in asks {
                    inv.arg(l.gcras.len()).arg(ask).arg(charge);
                    for (w, g) in l.gcras.iter().enumerate() {
                        inv.key(l.redis_key(&spec.prefix, key, w));
                        // Redis's bucket holds at least one lease, or a burst of 0 would
                        // cap every grant at one token.
                        inv.arg(g.interval)
                            .arg(g.tolerance.max(size * g.interval))
                            .arg(g.window_secs * 1_000_000);
                    }
                }
            }
            inv.invoke_async::<Vec<u64>>(c).await
        })
        .await;
        let reply = match result {
            Ok(Ok(reply)) if reply.len() == 2 + asks.iter().map(Vec::len).sum::<usize>() => {
                Ok((reply[0], reply[1].to_string(), reply[2..].to_vec()))
            }
            Ok(Ok(reply)) => Err((format!("unexpected reply of {} values", reply.len()), false)),
            Ok(Err(e)) => Err((e.to_string(), e.is_timeout())),
            Err(_) => Err((format!("no answer within {:?}", spec.timeout), true)),
        };
        match reply {
            Ok((replicas, born, grants)) => {
                if !marker.is_empty() && marker != born {
                    log::warn!(
                        "cluster limits: Redis {} restarted empty; buckets it lost start empty",
                        spec.redis
                    );
                }
                marker = born;
                if suspect {
                    // Redis answers again: sync at once, with the asks held back.
                    suspect = false;
                    next_tick = Instant::now();
                    continue;
                }
                let replicas = (replicas.min(u32::MAX as u64) as u32).max(1);
                cluster.replicas.store(replicas, Ordering::Relaxed);
                metrics.cluster_replicas.set(replicas as i64);
                let mut grants = grants.iter();
                for (l, asks) in limiters.iter().zip(&asks) {
                    l.follow_replicas(replicas);
                    for &(key, _, _) in asks {
                        let granted = *grants.next().expect("length checked");
                        metrics.cluster_leased.inc_by(granted);
                        l.deposit(key, granted);
                    }
                }
                cluster.healthy.store(true, Ordering::Relaxed);
                metrics.cluster_degraded.set(0);
                metrics.cluster_syncs[0].inc();
                if was_healthy != Some(true) {
                    log::info!(
                        "cluster limits: synced with {} ({replicas} replica(s) live)",
                        spec.redis
                    );
                }
                was_healthy = Some(true);
            }
            Err((e, maybe_ran)) => {
                for (l, asks) in limiters.iter().zip(&asks) {
                    // A call that may still run keeps its charge and loses its grants; one
                    // that did not run is asked again.
                    if !maybe_ran {
                        l.unask(asks);
                    }
                    l.follow_replicas(cluster.replicas());
                }
                suspect |= maybe_ran;
                cluster.healthy.store(false, Ordering::Relaxed);
                metrics.cluster_degraded.set(1);
                metrics.cluster_syncs[1].inc();
                if was_healthy != Some(false) {
                    log::warn!(
                        "cluster limits degraded: Redis {}: {e}; each limit admits this replica's share (1/{})",
                        spec.redis,
                        cluster.replicas()
                    );
                }
                was_healthy = Some(false);
            }
        }
    }
}

async fn connect(spec: &ClusterSpec) -> redis::RedisResult<redis::aio::ConnectionManager> {
    let client = redis::Client::open(spec.redis.as_str())?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(spec.timeout)
        .set_response_timeout(spec.timeout)
        .set_number_of_retries(0);
    redis::aio::ConnectionManager::new_with_config(client, config).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(replicas: u32) -> Arc<Cluster> {
        Cluster::new(ClusterSpec {
            redis: "redis://127.0.0.1:1/".into(),
            sync_interval: Duration::from_millis(100),
            timeout: Duration::from_millis(50),
            replicas,
            prefix: "t".into(),
        })
    }

    fn allowed(d: Decision) -> bool {
        matches!(d, Decision::Allow { .. })
    }

    #[test]
    fn degraded_admits_the_share_then_leases_decide() {
        let c = cluster(4);
        let l = ClusterLimiter::new("global", RateSpec::single(40.0, 1, 7), false, 64, c.clone());
        // Degraded (never synced): 40/4 r/s with burst 7/4 = 1: two pass at once.
        let passed = (0..10).filter(|_| allowed(l.check(0))).count();
        assert_eq!(passed, 2);
        // Healthy: only leased tokens pass; an empty lease asks for a refill.
        c.healthy.store(true, Ordering::Relaxed);
        assert!(!allowed(l.check(0)));
        let asks = l.asks();
        assert_eq!(
            asks,
            vec![(0, l.lease_size(), 2)],
            "asks a lease, charges the two"
        );
        l.deposit(0, 3);
        let passed = (0..10).filter(|_| allowed(l.check(0))).count();
        assert_eq!(passed, 3);
    }

    #[test]
    fn keys_go_hot_only_over_their_share() {
        let c = cluster(2);
        c.healthy.store(true, Ordering::Relaxed);
        let l = ClusterLimiter::new("per_ip", RateSpec::single(10.0, 1, 4), true, 1024, c);
        // Share: 5 r/s, burst 2: three pass, the fourth makes the key hot.
        let passed = (0..4).filter(|_| allowed(l.check(7))).count();
        assert_eq!(passed, 3);
        assert!(matches!(l.take_keyed(7), Lease::Empty));
        assert!(matches!(l.take_keyed(8), Lease::Absent));
        let asks = l.asks();
        assert_eq!(
            asks,
            vec![(7, l.lease_size(), 3)],
            "charges the share's three"
        );
        l.deposit(7, 2);
        assert!(allowed(l.check(7)) && allowed(l.check(7)));
        assert!(!allowed(l.check(7)));
        // A million cold keys within their share never ask.
        for k in 100..1_000_100u64 {
            l.check(k);
        }
        assert_eq!(l.asks().len(), 1, "only key 7 again");
    }
}
