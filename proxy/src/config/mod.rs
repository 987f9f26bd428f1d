//! The gateway's configuration: the YAML file schema users write, and the validated
//! [`GatewayConfig`] the code uses.
//!
//! Validation happens while parsing ("parse, don't validate"): every value that can be wrong
//! is a type whose `Deserialize` refuses bad input, so serde_yaml reports the error with the
//! key path, line and column, exactly as `gateway -t` must print it.

mod file;
mod listen;
mod routes;
#[cfg(test)]
mod tests;
mod values;

use std::path::Path;
use std::time::Duration;

pub use file::*;
pub use listen::*;
pub use routes::*;
pub use values::*;

/// FNV-1a of the file, shown in `gateway_config_info{hash}`.
pub fn config_hash(text: &str) -> u64 {
    fnv(FNV_OFFSET, text.as_bytes())
}

/// FNV-1a's starting value.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a of `bytes`, continuing from `h` ([`FNV_OFFSET`] to start): the config's hash, the
/// named files' fingerprint, the route table's map hasher.
#[inline]
pub fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

/// Why a config could not be loaded. The message names the key and line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Everything the running gateway needs, already validated.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: Vec<HostPort>,
    /// The `listen:` entries with `tls:`, their certificates read and checked.
    pub tls: Vec<TlsListener>,
    /// Every file the config names (certificates, keys, CA files, the hosts file): `watch`
    /// follows them too, and a change of one is a change of the config.
    pub files: Vec<std::path::PathBuf>,
    /// The listeners that redirect to HTTPS or send HSTS (most configs: none).
    pub listener_policies: Vec<ListenerPolicy>,
    pub http2: Http2Settings,
    /// `slow_clients.handshake_timeout`.
    pub handshake_timeout: Duration,
    pub workers: usize,
    /// Restart-only.
    pub work_stealing: bool,
    pub metrics_listen: Option<HostPort>,
    pub log_level: LogLevel,
    pub access_log: bool,
    pub shutdown_grace: Duration,
    pub watch: bool,
    pub backends: Vec<BackendSpec>,
    /// Named pools besides `default` (`upstreams:`).
    pub pools: Vec<PoolSpec>,
    /// `routes:`, compiled; its `default` route (the pool `default`, with `upstream:`'s
    /// settings) is every request's when there are none.
    pub routes: RouteTable,
    pub hosts_file: Option<std::path::PathBuf>,
    pub keepalive_pool: usize,
    pub health: HealthSettings,
    pub timeouts: Timeouts,
    pub trusted_proxies: Vec<Cidr>,
    pub proxy_protocol: bool,
    pub ipv6_prefix: u8,
    /// `cluster:`, when any limit has `scope: cluster` (restart-only).
    pub cluster: Option<ClusterSpec>,
    pub global_limit: Option<RateSpec>,
    pub per_ip_limit: Option<RateSpec>,
    /// Sorted longest prefix first.
    pub route_limits: Vec<(String, Option<RateSpec>)>,
    pub exempt: Vec<Cidr>,
    pub table_slots: usize,
    pub conn_per_ip: usize,
    pub conn_total: usize,
    pub max_body_bytes: usize,
    pub total_body_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// The listeners' write buffer (restart-only).
    pub client_write_bytes: usize,
    pub header_timeout: Duration,
    pub body_idle_timeout: Duration,
    /// Bytes per second, 0 = off.
    pub body_min_rate: u64,
    pub body_min_rate_grace: Duration,
    pub keepalive_timeout: Duration,
    pub max_requests_per_connection: usize,
    /// Plain requests take the gateway's own HTTP/1 path (checked per connection).
    pub fast_path: bool,
}

/// A validated rate limit: one or more windows (all enforced), a burst, its scope.
#[derive(Debug, Clone, PartialEq)]
pub struct RateSpec {
    /// The windows, at least one, at most [`MAX_WINDOWS`], in file order.
    pub rates: Vec<RateValue>,
    pub burst: u32,
    pub delay: bool,
    pub max_delay: Duration,
    pub scope: Scope,
}

impl RateSpec {
    /// One window, local, no delay.
    pub fn single(per_second: f64, window_secs: u64, burst: u32) -> Self {
        RateSpec::from(&FileRateLimit::new(
            RateValue {
                per_second,
                window_secs,
            },
            burst,
        ))
    }

    /// The tightest sustained rate, requests per second.
    pub fn min_per_second(&self) -> f64 {
        self.rates
            .iter()
            .map(|r| r.per_second)
            .fold(f64::INFINITY, f64::min)
    }

    /// This spec divided among `replicas` (the fallback share of a cluster limit): every
    /// rate and the burst divided, the burst rounded down.
    pub fn share(&self, replicas: u32) -> RateSpec {
        let n = replicas.max(1);
        RateSpec {
            rates: self
                .rates
                .iter()
                .map(|r| RateValue {
                    per_second: r.per_second / n as f64,
                    window_secs: r.window_secs,
                })
                .collect(),
            burst: self.burst / n,
            scope: Scope::Local,
            ..self.clone()
        }
    }
}

impl From<&FileRateLimit> for RateSpec {
    fn from(f: &FileRateLimit) -> Self {
        RateSpec {
            rates: f.rates.clone(),
            burst: f.burst,
            delay: f.delay,
            max_delay: f.max_delay.0,
            scope: f.scope,
        }
    }
}

/// A validated `cluster:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    pub redis: String,
    pub sync_interval: Duration,
    pub timeout: Duration,
    pub replicas: u32,
    pub prefix: String,
}

/// How backends are chosen and when one is ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balancing {
    pub algorithm: Balance,
    pub ewma_decay: Duration,
    pub eject_after: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// HAProxy-style per-backend concurrency cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendQueue {
    pub max_concurrent: usize,
    pub max_queue: usize,
    pub timeout: Duration,
}

/// One configured backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSpec {
    pub address: HostPort,
    pub weight: usize,
    /// Re-resolution interval for a DNS name.
    pub resolve: Option<Duration>,
}

/// Health-check settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub failures: usize,
    pub successes: usize,
}

/// Upstream timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    pub idle: Duration,
    pub websocket_idle: Duration,
}

impl GatewayConfig {
    /// Settings that only a restart (or the `--upgrade` hand-over) can change, by key, when
    /// they differ between `self` and `next`.
    pub fn restart_only_changes(&self, next: &GatewayConfig) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.listen != next.listen {
            keys.push("listen");
        }
        if self.http2.max_concurrent_streams != next.http2.max_concurrent_streams {
            keys.push("http2.max_concurrent_streams");
        }
        if self.http2.max_resets != next.http2.max_resets {
            keys.push("http2.max_resets");
        }
        if self.http2.cleartext != next.http2.cleartext {
            keys.push("http2.cleartext");
        }
        if self.workers != next.workers {
            keys.push("workers");
        }
        if self.work_stealing != next.work_stealing {
            keys.push("work_stealing");
        }
        if self.metrics_listen != next.metrics_listen {
            keys.push("metrics_listen");
        }
        if self.keepalive_pool != next.keepalive_pool {
            keys.push("upstream.keepalive_pool");
        }
        if self.max_requests_per_connection != next.max_requests_per_connection {
            keys.push("slow_clients.max_requests_per_connection");
        }
        if self.client_write_bytes != next.client_write_bytes {
            keys.push("buffers.client_write_bytes");
        }
        if self.cluster != next.cluster {
            keys.push("cluster");
        }
        if self.shutdown_grace != next.shutdown_grace {
            keys.push("shutdown_grace");
        }
        keys
    }

    /// The default pool's settings (`upstream:`'s balancing, queue, timeouts, retries).
    pub fn upstream(&self) -> &PoolSettings {
        &self.routes.default.settings
    }

    /// The shortest `resolve` interval among the backends of every pool, if any backend is a
    /// DNS name to follow.
    pub fn resolve_interval(&self) -> Option<Duration> {
        self.backends
            .iter()
            .chain(self.pools.iter().flat_map(|p| p.backends.iter()))
            .filter_map(|b| b.resolve)
            .min()
    }

    /// The policy of the listener a connection was accepted on (`local`: its local address),
    /// if that listener has one.
    pub fn listener_policy(&self, local: Option<std::net::SocketAddr>) -> Option<&ListenerPolicy> {
        if self.listener_policies.is_empty() {
            return None;
        }
        by_local(&self.listener_policies, |p| &p.address, local?)
    }

    /// A fingerprint of the contents of [`GatewayConfig::files`] (an unreadable one counts
    /// as such): a renewed certificate changes it though the config file is the same.
    pub fn files_fingerprint(&self) -> u64 {
        self.files.iter().fold(FNV_OFFSET, |h, path| {
            let h = fnv(h, path.as_os_str().as_encoded_bytes());
            match std::fs::read(path) {
                Ok(bytes) => fnv(fnv(h, &[0]), &bytes),
                Err(_) => fnv(h, &[1]),
            }
        })
    }

    /// Read and validate a config file: what start-up, `gateway -t` and every reload run.
    /// Also returns the file's hash ([`config_hash`]).
    pub fn load(path: &Path) -> Result<(Self, u64), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config =
            Self::parse_in(&text, path.parent()).map_err(|message| ConfigError::Invalid {
                path: path.display().to_string(),
                message,
            })?;
        Ok((config, config_hash(&text)))
    }

    /// Parse and validate YAML text. The error names the key, line and what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_in(text, None)
    }

    /// Parse YAML text read from a file in `dir`: relative file paths in it (certificates,
    /// keys, CA files, `hosts_file`) are that directory's, as nginx's are its prefix's.
    pub fn parse_in(text: &str, dir: Option<&Path>) -> Result<Self, String> {
        let mut file: FileConfig = if text.trim().is_empty() {
            return Err("the file is empty: at least `upstream.backends` is required".into());
        } else {
            serde_yaml::from_str(text).map_err(|e| name_the_key(&e, text))?
        };
        if let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) {
            file.anchor_paths(dir);
        }
        Self::from_file(file)
    }

    fn from_file(mut f: FileConfig) -> Result<Self, String> {
        let files = f.paths_mut().into_iter().map(|p| p.clone()).collect();
        let health = |hc: FileHealthCheck, key: &str| -> Result<HealthSettings, String> {
            if !hc.path.starts_with('/') {
                return Err(format!("{key}.path: {:?} must start with '/'", hc.path));
            }
            Ok(HealthSettings {
                path: hc.path,
                interval: hc.interval.0,
                timeout: hc.timeout.0,
                failures: hc.failures.0,
                successes: hc.successes.0,
            })
        };
        let convert =
            |list: NonEmpty<FileBackend>, key: &str| -> Result<Vec<BackendSpec>, String> {
                let mut backends: Vec<BackendSpec> = list
                    .0
                    .into_iter()
                    .map(|b| BackendSpec {
                        address: b.address,
                        weight: b.weight.0,
                        resolve: b.resolve.map(|r| r.0),
                    })
                    .collect();
                let count = backends.len();
                backends.sort();
                backends.dedup_by(|a, b| a.address == b.address);
                if backends.len() != count {
                    return Err(format!("{key}: the same address is listed twice"));
                }
                Ok(backends)
            };
        let default_health = health(f.upstream.health_check.clone(), "upstream.health_check")?;
        let backends = convert(f.upstream.backends.clone(), "upstream.backends")?;
        let cluster = cluster_spec(&f)?;
        let t = f.timeouts;
        let timeouts = Timeouts {
            connect: t.connect.0,
            read: t.read.0,
            write: t.write.0,
            idle: t.idle.0,
            websocket_idle: t.websocket_idle.0,
        };
        let u = &f.upstream;
        let settings = PoolSettings {
            hash_key: u.hash_key.clone(),
            balance: Balancing {
                algorithm: u.balance,
                ewma_decay: u.ewma_decay.0,
                eject_after: u.outlier.consecutive_failures,
                base_ejection: u.outlier.base_ejection.0,
                max_ejection_percent: u.outlier.max_ejection_percent.min(100),
            },
            queue: BackendQueue {
                max_concurrent: u.max_concurrent_per_backend,
                max_queue: u.max_queue,
                timeout: u.queue_timeout.0,
            },
            timeouts,
            connect_retries: u.connect_retries,
            retry_idempotent: u.retry_idempotent,
            tls: u
                .tls
                .as_ref()
                .map(|t| t.build("upstream.tls"))
                .transpose()?,
        };
        let (pools, routes) = pools_and_routes(
            std::mem::take(&mut f.upstreams),
            std::mem::take(&mut f.routes),
            Inherited {
                settings: &settings,
                health: &default_health,
                max_body_bytes: f.buffers.max_body_bytes,
            },
            convert,
            health,
        )?;
        if f.client.ipv6_prefix == 0 || f.client.ipv6_prefix > 128 {
            return Err("client.ipv6_prefix: must be 1-128".into());
        }
        if f.client.proxy_protocol && f.client.trusted_proxies.is_empty() {
            return Err(
                "client.proxy_protocol: list the balancers that send it in client.trusted_proxies"
                    .into(),
            );
        }
        let mut route_limits = Vec::new();
        for (i, r) in f.limits.routes.iter().enumerate() {
            if !r.prefix.starts_with('/') {
                return Err(format!(
                    "limits.routes[{i}].prefix: {:?} must start with '/'",
                    r.prefix
                ));
            }
            route_limits.push((r.prefix.clone(), r.per_ip.as_ref().map(RateSpec::from)));
        }
        route_limits.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        if f.limits.table_slots < 64 {
            return Err("limits.table_slots: must be at least 64".into());
        }
        let Listeners {
            addresses: listen,
            tls,
            policies: listener_policies,
        } = listeners(f.listen.0, crate::tls::unix_now())?;
        hosts_have_certificates(&routes, &tls)?;
        let (b, sc) = (f.buffers, f.slow_clients);
        if b.client_write_bytes > MAX_CLIENT_WRITE_BYTES {
            return Err(format!(
                "buffers.client_write_bytes: at most {MAX_CLIENT_WRITE_BYTES} (it is allocated for every connection)"
            ));
        }
        Ok(GatewayConfig {
            trusted_proxies: f.client.trusted_proxies,
            proxy_protocol: f.client.proxy_protocol,
            ipv6_prefix: f.client.ipv6_prefix,
            cluster,
            global_limit: f.limits.global.as_ref().map(RateSpec::from),
            per_ip_limit: f.limits.per_ip.as_ref().map(RateSpec::from),
            route_limits,
            exempt: f.limits.exempt,
            table_slots: f.limits.table_slots.next_power_of_two(),
            conn_per_ip: f.connections.per_ip,
            conn_total: f.connections.total,
            max_body_bytes: b.max_body_bytes,
            total_body_bytes: b.total_body_bytes,
            max_header_bytes: b.max_header_bytes,
            max_headers: b.max_headers,
            client_write_bytes: b.client_write_bytes,
            header_timeout: sc.header_timeout.0,
            body_idle_timeout: sc.body_idle_timeout.0,
            body_min_rate: sc.body_min_rate,
            body_min_rate_grace: sc.body_min_rate_grace.0,
            keepalive_timeout: sc.keepalive_timeout.0,
            max_requests_per_connection: sc.max_requests_per_connection.0,
            fast_path: f.fast_path,
            listen,
            tls,
            files,
            listener_policies,
            http2: Http2Settings::from(&f.http2),
            handshake_timeout: sc.handshake_timeout.0,
            workers: f.workers.0,
            work_stealing: f.work_stealing,
            metrics_listen: f.metrics_listen,
            log_level: f.log_level,
            access_log: f.access_log,
            shutdown_grace: f.shutdown_grace.0,
            watch: f.watch,
            backends,
            hosts_file: f.upstream.hosts_file,
            keepalive_pool: f.upstream.keepalive_pool,
            health: default_health,
            pools,
            routes,
            timeouts,
        })
    }
}

/// "No certificate for a configured name": a route's host that a TLS listener refusing
/// unknown names (`strict_sni`, the default) has no certificate for would be refused at the
/// handshake there. An exact host needs a certificate for it or a wildcard over it; a `*.`
/// host a wildcard certificate for the same parent (one label deep, as certificates are);
/// an IP address is covered (clients send no SNI for one: the first certificate answers).
fn hosts_have_certificates(routes: &RouteTable, tls: &[TlsListener]) -> Result<(), String> {
    for l in tls.iter().filter(|l| l.strict_sni) {
        for r in &routes.routes {
            let (covered, shown) = match &r.host {
                HostMatch::Any => continue,
                HostMatch::Exact(name) => (
                    name.parse::<std::net::IpAddr>().is_ok() || l.certs.pick(Some(name)).is_some(),
                    name.clone(),
                ),
                HostMatch::Suffix(suffix) => (
                    l.certs.has_wildcard(suffix.trim_start_matches('.')),
                    format!("*{suffix}"),
                ),
            };
            if !covered {
                return Err(format!(
                    "routes[{}].host: {shown}: no certificate of the TLS listener {} covers it, \
                     so its clients would be refused at the handshake there; add one, or set \
                     `strict_sni: false` on that listener to answer it with the first certificate",
                    r.index, l.address
                ));
            }
        }
    }
    Ok(())
}

/// The `cluster:` section, checked against the limits that use it: a `scope: cluster` limit
/// needs it, and it is refused when nothing uses it (a forgotten `scope` would otherwise
/// silently leave every limit per process).
fn cluster_spec(f: &FileConfig) -> Result<Option<ClusterSpec>, String> {
    let mut scoped: Vec<String> = Vec::new();
    let mut note = |key: String, l: &Option<FileRateLimit>| {
        if l.as_ref().is_some_and(|l| l.scope == Scope::Cluster) {
            scoped.push(key);
        }
    };
    note("limits.global".into(), &f.limits.global);
    note("limits.per_ip".into(), &f.limits.per_ip);
    for (i, r) in f.limits.routes.iter().enumerate() {
        note(format!("limits.routes[{i}].per_ip"), &r.per_ip);
    }
    for (i, r) in f.routes.iter().enumerate() {
        note(format!("routes[{i}].limit"), &r.limit);
    }
    let Some(c) = &f.cluster else {
        return match scoped.first() {
            Some(key) => Err(format!(
                "{key}: `scope: cluster` needs a top-level `cluster: {{redis: ...}}`"
            )),
            None => Ok(None),
        };
    };
    if scoped.is_empty() {
        return Err("cluster: no limit has `scope: cluster`".into());
    }
    if !(c.redis.starts_with("redis://") || c.redis.starts_with("rediss://")) {
        return Err(format!(
            "cluster.redis: {:?} must be a redis:// URL",
            c.redis
        ));
    }
    if c.prefix.is_empty() || c.prefix.contains(char::is_whitespace) {
        return Err("cluster.prefix: must be a non-empty word".into());
    }
    Ok(Some(ClusterSpec {
        redis: c.redis.clone(),
        sync_interval: c.sync_interval.0,
        timeout: c.timeout.0,
        replicas: c.replicas.0.min(u32::MAX as usize) as u32,
        prefix: c.prefix.clone(),
    }))
}

/// serde_yaml reports errors raised inside a value (a bad duration, say) at the path of the
/// enclosing map; the line it gives is the value's own, so take the key from that line.
fn name_the_key(e: &serde_yaml::Error, text: &str) -> String {
    let msg = e.to_string();
    let Some(loc) = e.location() else {
        return msg;
    };
    let Some(line) = text.lines().nth(loc.line().saturating_sub(1)) else {
        return msg;
    };
    let key = line.trim_start().trim_start_matches("- ");
    let Some((key, _)) = key.split_once(':') else {
        return msg;
    };
    let key = key.trim();
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return msg;
    }
    match msg.split_once(": ") {
        Some((path, rest))
            if !path.contains(' ')
                && !path.ends_with(key)
                && !rest.contains(&format!("`{key}`")) =>
        {
            format!("{path}.{key}: {rest}")
        }
        Some((path, _)) if path.contains(' ') => format!("{key}: {msg}"),
        _ => msg,
    }
}
