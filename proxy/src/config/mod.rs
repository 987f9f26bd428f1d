//! The gateway's configuration: the YAML file schema users write, and the validated
//! [`GatewayConfig`] the code uses.
//!
//! Validation happens while parsing ("parse, don't validate"): every value that can be wrong
//! is a type whose `Deserialize` refuses bad input, so serde_yaml reports the error with the
//! key path, line and column, exactly as `gateway -t` must print it.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

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

/// A duration written as a human string ("250ms", "5s", "1m"); zero is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| {
                de::Error::custom(format!(
                    "invalid duration {s:?} ({e}); write it like \"250ms\", \"5s\" or \"1m\""
                ))
            })
    }
}

/// A duration that must be greater than zero (intervals, timeouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositiveDuration(pub Duration);

impl<'de> Deserialize<'de> for PositiveDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let HumanDuration(v) = HumanDuration::deserialize(d)?;
        if v.is_zero() {
            return Err(de::Error::custom("must be greater than zero"));
        }
        Ok(PositiveDuration(v))
    }
}

/// An integer that must be at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtLeastOne(pub usize);

impl<'de> Deserialize<'de> for AtLeastOne {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = usize::deserialize(d)?;
        if v == 0 {
            return Err(de::Error::custom("must be at least 1"));
        }
        Ok(AtLeastOne(v))
    }
}

/// A listen or backend address: `host:port`, where host is an IP address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// The address as a socket address when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.to_string().parse().ok()
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(HostPort {
                host: sa.ip().to_string(),
                port: sa.port(),
            });
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("invalid address {s:?}: expected host:port"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("invalid address {s:?}: port {port:?} is not 1-65535"))?;
        let valid_host = !host.is_empty()
            && host.len() <= 253
            && host
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        if !valid_host {
            return Err(format!(
                "invalid address {s:?}: {host:?} is neither an IP address nor a DNS name"
            ));
        }
        Ok(HostPort {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// A list that must hold at least one element.
#[derive(Debug, Clone, PartialEq)]
pub struct NonEmpty<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for NonEmpty<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<T>::deserialize(d)?;
        if v.is_empty() {
            return Err(de::Error::custom("must list at least one entry"));
        }
        Ok(NonEmpty(v))
    }
}

/// `log_level`: one of error, warn, info, debug, trace, off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The file schema. Every section is `#[serde(default)]` so a minimal file only names backends;
// `deny_unknown_fields` turns typos into errors instead of silently ignored settings.
// ---------------------------------------------------------------------------------------------

/// The whole YAML file, as written by users.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Addresses the proxy listens on.
    pub listen: NonEmpty<HostPort>,
    /// Worker threads of the proxy service (like nginx `worker_processes`).
    pub workers: AtLeastOne,
    /// false: each worker thread serves its own connections on its own runtime, as nginx's
    /// workers do; true: tokio's work-stealing scheduler moves tasks between workers.
    pub work_stealing: bool,
    /// Where `/metrics` is served; kept off the proxy listener so clients cannot scrape it.
    pub metrics_listen: Option<HostPort>,
    /// Log level for the process (overridden by `RUST_LOG` when that is set).
    pub log_level: LogLevel,
    /// One access-log line per request through `log` (target `access`).
    pub access_log: bool,
    /// How long SIGTERM/SIGINT waits for in-flight requests before exiting.
    pub shutdown_grace: HumanDuration,
    /// Also reload when the config file changes (its directory is watched, so a Kubernetes
    /// ConfigMap's symlink swap is seen). SIGHUP always reloads.
    pub watch: bool,
    /// The upstream pool.
    pub upstream: FileUpstream,
    /// Timeouts towards upstreams and for idle downstream connections.
    pub timeouts: FileTimeouts,
    /// Who the client is: trusted proxies and IPv6 keying.
    pub client: FileClient,
    /// Request rate limits (per client IP, per path prefix, global).
    pub limits: FileLimits,
    /// Open-connection caps.
    pub connections: FileConnections,
    /// Request size caps.
    pub buffers: FileBuffers,
    /// Slow-client defences.
    pub slow_clients: FileSlowClients,
    /// Serve plain HTTP/1.1 requests (no body or a Content-Length one) on the gateway's own
    /// HTTP/1 path instead of pingora's (same limits, answers, metrics and logs; about half
    /// the CPU per request). Everything else always goes through pingora's path.
    pub fast_path: bool,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            listen: NonEmpty(vec!["0.0.0.0:8000".parse().expect("valid default")]),
            workers: AtLeastOne(2),
            work_stealing: false,
            metrics_listen: Some("127.0.0.1:9100".parse().expect("valid default")),
            log_level: LogLevel::Info,
            access_log: true,
            shutdown_grace: HumanDuration(Duration::from_secs(5)),
            watch: false,
            upstream: FileUpstream::default(),
            timeouts: FileTimeouts::default(),
            client: FileClient::default(),
            limits: FileLimits::default(),
            connections: FileConnections::default(),
            buffers: FileBuffers::default(),
            slow_clients: FileSlowClients::default(),
            fast_path: true,
        }
    }
}

/// `upstream:` the one backend pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileUpstream {
    /// Backends, weighted round robin.
    pub backends: NonEmpty<FileBackend>,
    /// Idle keep-alive connections kept to upstreams (shared by all backends).
    pub keepalive_pool: usize,
    /// Active health checks.
    pub health_check: FileHealthCheck,
    /// How many other backends a request is tried on when connecting fails.
    pub connect_retries: usize,
    /// Also retry idempotent requests (GET, HEAD, PUT, DELETE, OPTIONS) that failed after
    /// they were sent (nginx `proxy_next_upstream` for errors after sending).
    pub retry_idempotent: bool,
    /// Concurrent requests per backend (HAProxy `maxconn`); 0 = unlimited.
    pub max_concurrent_per_backend: usize,
    /// Requests that may wait for a backend slot (HAProxy `maxqueue`), per backend.
    pub max_queue: usize,
    /// How long a request may wait in that queue (HAProxy `timeout queue`).
    pub queue_timeout: PositiveDuration,
    /// A hosts-format file consulted before DNS when resolving backend names.
    pub hosts_file: Option<std::path::PathBuf>,
}

impl Default for FileUpstream {
    fn default() -> Self {
        FileUpstream {
            backends: NonEmpty(vec![FileBackend {
                address: "127.0.0.1:8001".parse().expect("valid default"),
                weight: AtLeastOne(1),
                resolve: None,
            }]),
            keepalive_pool: 128,
            health_check: FileHealthCheck::default(),
            connect_retries: 2,
            retry_idempotent: false,
            max_concurrent_per_backend: 0,
            max_queue: 100,
            queue_timeout: PositiveDuration(Duration::from_secs(1)),
            hosts_file: None,
        }
    }
}

/// One backend: `{address: "host:port", weight: 1, resolve: 5s}` or just `"host:port"`.
#[derive(Debug, Clone, PartialEq)]
pub struct FileBackend {
    pub address: HostPort,
    pub weight: AtLeastOne,
    /// Re-resolve the name on this interval (every address it resolves to is a backend).
    pub resolve: Option<PositiveDuration>,
}

impl<'de> Deserialize<'de> for FileBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Long {
            address: HostPort,
            #[serde(default = "one")]
            weight: AtLeastOne,
            #[serde(default)]
            resolve: Option<PositiveDuration>,
        }
        fn one() -> AtLeastOne {
            AtLeastOne(1)
        }
        // Two forms; an untagged enum would hide the inner error, so dispatch by hand.
        let v = serde_yaml::Value::deserialize(d)?;
        if let serde_yaml::Value::String(s) = &v {
            let address = s.parse().map_err(de::Error::custom)?;
            return Ok(FileBackend {
                address,
                weight: one(),
                resolve: None,
            });
        }
        let long: Long = serde_yaml::from_value(v).map_err(de::Error::custom)?;
        Ok(FileBackend {
            address: long.address,
            weight: long.weight,
            resolve: long.resolve,
        })
    }
}

/// `upstream.health_check:` active HTTP checks against every backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileHealthCheck {
    /// Path requested with GET; a 200 passes.
    pub path: String,
    /// Time between two checks of one backend.
    pub interval: PositiveDuration,
    /// Connect + response deadline of one check.
    pub timeout: PositiveDuration,
    /// Consecutive failed checks that mark a healthy backend down.
    pub failures: AtLeastOne,
    /// Consecutive passed checks that bring a down backend back.
    pub successes: AtLeastOne,
}

impl Default for FileHealthCheck {
    fn default() -> Self {
        FileHealthCheck {
            path: "/ready".into(),
            interval: PositiveDuration(Duration::from_secs(2)),
            timeout: PositiveDuration(Duration::from_secs(1)),
            failures: AtLeastOne(3),
            successes: AtLeastOne(2),
        }
    }
}

/// `timeouts:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileTimeouts {
    /// TCP connect to a backend.
    pub connect: PositiveDuration,
    /// Each read from a backend (time to first byte, and between body chunks).
    pub read: PositiveDuration,
    /// Each write to a backend.
    pub write: PositiveDuration,
    /// Idle upstream keep-alive connections are closed after this.
    pub idle: PositiveDuration,
    /// An upgraded (WebSocket) connection with no bytes either way for this long is closed.
    pub websocket_idle: PositiveDuration,
}

impl Default for FileTimeouts {
    fn default() -> Self {
        FileTimeouts {
            connect: PositiveDuration(Duration::from_secs(1)),
            read: PositiveDuration(Duration::from_secs(30)),
            write: PositiveDuration(Duration::from_secs(30)),
            idle: PositiveDuration(Duration::from_secs(60)),
            websocket_idle: PositiveDuration(Duration::from_secs(300)),
        }
    }
}

/// A rate written like nginx: "10r/s" or "600r/m".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateValue {
    /// Requests per second.
    pub per_second: f64,
    /// The unit it was written in, in seconds (1, 60, 3600), for the `RateLimit-Policy` header.
    pub window_secs: u64,
}

impl<'de> Deserialize<'de> for RateValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim();
        let (num, per) = t.split_once("r/").ok_or_else(|| {
            de::Error::custom(format!(
                "invalid rate {s:?}: write it like \"10r/s\" or \"600r/m\""
            ))
        })?;
        let n: f64 = num
            .trim()
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite() && *n > 0.0)
            .ok_or_else(|| {
                de::Error::custom(format!(
                    "invalid rate {s:?}: the count must be a positive number"
                ))
            })?;
        let (per_second, window_secs) = match per.trim() {
            "s" => (n, 1),
            "m" => (n / 60.0, 60),
            "h" => (n / 3600.0, 3600),
            _ => {
                return Err(de::Error::custom(format!(
                    "invalid rate {s:?}: the unit must be r/s, r/m or r/h"
                )))
            }
        };
        Ok(RateValue {
            per_second,
            window_secs,
        })
    }
}

/// One rate limit: GCRA (nginx `limit_req`) with a burst.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRateLimit {
    /// The sustained rate.
    pub rate: RateValue,
    /// Requests allowed over the rate at once (nginx `burst`). Default: 0.
    #[serde(default)]
    pub burst: u32,
    /// false: burst requests pass at once (nginx `nodelay`); true: they are delayed to the
    /// rate. Default: false.
    #[serde(default)]
    pub delay: bool,
    /// With `delay`, the longest a request may be held; one that would wait longer is
    /// rejected at once. Default: 1s.
    #[serde(default = "default_max_delay")]
    pub max_delay: HumanDuration,
}

fn default_max_delay() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

/// `client:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileClient {
    /// Peers whose `X-Forwarded-For` (and PROXY protocol header) is believed (CIDRs).
    /// Default: none.
    pub trusted_proxies: Vec<Cidr>,
    /// Connections from trusted proxies must open with a PROXY protocol v1/v2 header, whose
    /// source address then stands for the socket peer (HAProxy `accept-proxy`, nginx
    /// `listen ... proxy_protocol`). Default: false.
    pub proxy_protocol: bool,
    /// IPv6 clients are keyed by this prefix length. Default: 64.
    pub ipv6_prefix: u8,
}

impl Default for FileClient {
    fn default() -> Self {
        FileClient {
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            ipv6_prefix: 64,
        }
    }
}

/// `limits:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileLimits {
    /// Ceiling for this gateway instance across all clients; over it: 503.
    pub global: Option<FileRateLimit>,
    /// Per client IP on paths no route profile matches; over it: 429.
    pub per_ip: Option<FileRateLimit>,
    /// Per-IP limits for path prefixes (longest prefix wins), like nginx locations.
    pub routes: Vec<FileRouteLimit>,
    /// Clients never rate-limited or capped per IP (CIDRs), like an nginx `geo` allow-list.
    pub exempt: Vec<Cidr>,
    /// Slots of each per-IP table (fixed memory: 8 bytes a slot).
    pub table_slots: usize,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            global: Some(FileRateLimit {
                rate: RateValue {
                    per_second: 2000.0,
                    window_secs: 1,
                },
                burst: 1000,
                delay: false,
                max_delay: default_max_delay(),
            }),
            per_ip: Some(FileRateLimit {
                rate: RateValue {
                    per_second: 100.0,
                    window_secs: 1,
                },
                burst: 200,
                delay: false,
                max_delay: default_max_delay(),
            }),
            routes: Vec::new(),
            exempt: Vec::new(),
            table_slots: 1 << 18,
        }
    }
}

/// One entry of `limits.routes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRouteLimit {
    pub prefix: String,
    /// null: no per-IP limit on this prefix.
    pub per_ip: Option<FileRateLimit>,
}

/// `connections:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConnections {
    /// Open connections per client IP (idle keep-alive ones count). 0 = unlimited.
    pub per_ip: usize,
    /// Open connections in total. 0 = unlimited.
    pub total: usize,
}

impl Default for FileConnections {
    fn default() -> Self {
        FileConnections {
            per_ip: 20,
            total: 5000,
        }
    }
}

/// The largest `buffers.client_write_bytes`: the buffer is allocated for every connection.
pub const MAX_CLIENT_WRITE_BYTES: usize = 1 << 20;

/// `buffers:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileBuffers {
    /// Largest request body (nginx `client_max_body_size`), bytes. 413 beyond.
    pub max_body_bytes: usize,
    /// Largest request head (request line + headers), bytes. 431 beyond.
    pub max_header_bytes: usize,
    /// Most request headers. 431 beyond.
    pub max_headers: usize,
    /// Bytes of a response with a known length gathered before writing them to the client, so
    /// that a head and a body that fit go out in one write (nginx writes them with one
    /// `writev`). pingora's own default is 1,460: a head and a body larger than that took two
    /// writes and two TCP segments. 0: every write goes straight to the socket. Chunked and
    /// close-delimited bodies are written through as they arrive, whatever this is.
    pub client_write_bytes: usize,
}

impl Default for FileBuffers {
    fn default() -> Self {
        FileBuffers {
            max_body_bytes: 1 << 20,
            max_header_bytes: 16 << 10,
            max_headers: 100,
            client_write_bytes: 16 << 10,
        }
    }
}

/// `slow_clients:`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSlowClients {
    /// The whole request head must arrive within this (nginx `client_header_timeout`).
    pub header_timeout: PositiveDuration,
    /// Longest pause between two reads of a request body (nginx `client_body_timeout`).
    pub body_idle_timeout: PositiveDuration,
    /// Minimum average rate of a request body, bytes per second (0: off): a body still
    /// incomplete after `body_min_rate_grace` plus one second per this many bytes received is
    /// refused with 408 (Apache `mod_reqtimeout` `body=...,MinRate=...`).
    pub body_min_rate: u64,
    /// Time a body gets before `body_min_rate` applies.
    pub body_min_rate_grace: PositiveDuration,
    /// Idle keep-alive connections are closed after this (nginx `keepalive_timeout`).
    pub keepalive_timeout: PositiveDuration,
    /// Requests served on one connection before it is closed (nginx `keepalive_requests`).
    pub max_requests_per_connection: AtLeastOne,
}

impl Default for FileSlowClients {
    fn default() -> Self {
        FileSlowClients {
            header_timeout: PositiveDuration(Duration::from_secs(10)),
            body_idle_timeout: PositiveDuration(Duration::from_secs(10)),
            body_min_rate: 500,
            body_min_rate_grace: PositiveDuration(Duration::from_secs(10)),
            keepalive_timeout: PositiveDuration(Duration::from_secs(60)),
            max_requests_per_connection: AtLeastOne(1000),
        }
    }
}

/// An IP network "10.0.0.0/8", "::1/128", or a bare address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::*;
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            (V6(_), V4(ip)) => self.contains(std::net::IpAddr::V6(ip.to_ipv6_mapped())),
            (V4(_), V6(ip)) => ip.to_ipv4_mapped().is_some_and(|v4| self.contains(V4(v4))),
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.trim().split_once('/').unwrap_or((s.trim(), ""));
        let addr: std::net::IpAddr = a
            .parse()
            .map_err(|_| format!("invalid network {s:?}: expected an address like 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("invalid network {s:?}: prefix must be 0-{max}"))?
        };
        Ok(Cidr { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// The validated internal config.
// ---------------------------------------------------------------------------------------------

/// Everything the running gateway needs, already validated.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: Vec<HostPort>,
    pub workers: usize,
    /// Restart-only.
    pub work_stealing: bool,
    pub metrics_listen: Option<HostPort>,
    pub log_level: LogLevel,
    pub access_log: bool,
    pub shutdown_grace: Duration,
    pub watch: bool,
    pub backends: Vec<BackendSpec>,
    pub hosts_file: Option<std::path::PathBuf>,
    pub keepalive_pool: usize,
    pub health: HealthSettings,
    pub connect_retries: usize,
    pub retry_idempotent: bool,
    pub timeouts: Timeouts,
    /// Per-backend concurrency cap (0 = none), its queue length and queue timeout.
    pub backend_queue: BackendQueue,
    pub trusted_proxies: Vec<Cidr>,
    pub proxy_protocol: bool,
    pub ipv6_prefix: u8,
    pub global_limit: Option<RateSpec>,
    pub per_ip_limit: Option<RateSpec>,
    /// Sorted longest prefix first.
    pub route_limits: Vec<(String, Option<RateSpec>)>,
    pub exempt: Vec<Cidr>,
    pub table_slots: usize,
    pub conn_per_ip: usize,
    pub conn_total: usize,
    pub max_body_bytes: usize,
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

/// A validated rate limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateSpec {
    /// Requests per second.
    pub per_second: f64,
    /// The window the rate was written for (1, 60, 3600 s).
    pub window_secs: u64,
    pub burst: u32,
    pub delay: bool,
    pub max_delay: Duration,
}

impl From<&FileRateLimit> for RateSpec {
    fn from(f: &FileRateLimit) -> Self {
        RateSpec {
            per_second: f.rate.per_second,
            window_secs: f.rate.window_secs,
            burst: f.burst,
            delay: f.delay,
            max_delay: f.max_delay.0,
        }
    }
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
        if self.shutdown_grace != next.shutdown_grace {
            keys.push("shutdown_grace");
        }
        keys
    }

    /// The shortest `resolve` interval among the backends, if any backend is a DNS name to
    /// follow.
    pub fn resolve_interval(&self) -> Option<Duration> {
        self.backends.iter().filter_map(|b| b.resolve).min()
    }

    /// Read and validate a config file (what `gateway -t` and every reload run).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parse and validate YAML text. The error names the key, line and what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: FileConfig = if text.trim().is_empty() {
            return Err("the file is empty: at least `upstream.backends` is required".into());
        } else {
            serde_yaml::from_str(text).map_err(|e| name_the_key(&e, text))?
        };
        Self::from_file(file)
    }

    fn from_file(f: FileConfig) -> Result<Self, String> {
        let hc = f.upstream.health_check;
        if !hc.path.starts_with('/') {
            return Err(format!(
                "upstream.health_check.path: {:?} must start with '/'",
                hc.path
            ));
        }
        let mut backends: Vec<BackendSpec> = f
            .upstream
            .backends
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
            return Err("upstream.backends: the same address is listed twice".into());
        }
        let t = f.timeouts;
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
        let (b, sc) = (f.buffers, f.slow_clients);
        if b.client_write_bytes > MAX_CLIENT_WRITE_BYTES {
            return Err(format!(
                "buffers.client_write_bytes: at most {MAX_CLIENT_WRITE_BYTES} (it is allocated for every connection)"
            ));
        }
        Ok(GatewayConfig {
            backend_queue: BackendQueue {
                max_concurrent: f.upstream.max_concurrent_per_backend,
                max_queue: f.upstream.max_queue,
                timeout: f.upstream.queue_timeout.0,
            },
            trusted_proxies: f.client.trusted_proxies,
            proxy_protocol: f.client.proxy_protocol,
            ipv6_prefix: f.client.ipv6_prefix,
            global_limit: f.limits.global.as_ref().map(RateSpec::from),
            per_ip_limit: f.limits.per_ip.as_ref().map(RateSpec::from),
            route_limits,
            exempt: f.limits.exempt,
            table_slots: f.limits.table_slots.next_power_of_two(),
            conn_per_ip: f.connections.per_ip,
            conn_total: f.connections.total,
            max_body_bytes: b.max_body_bytes,
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
            listen: f.listen.0,
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
            health: HealthSettings {
                path: hc.path,
                interval: hc.interval.0,
                timeout: hc.timeout.0,
                failures: hc.failures.0,
                successes: hc.successes.0,
            },
            connect_retries: f.upstream.connect_retries,
            retry_idempotent: f.upstream.retry_idempotent,
            timeouts: Timeouts {
                connect: t.connect.0,
                read: t.read.0,
                write: t.write.0,
                idle: t.idle.0,
                websocket_idle: t.websocket_idle.0,
            },
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "upstream:\n  backends: [\"127.0.0.1:9001\"]\n";

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = GatewayConfig::parse(MINIMAL).unwrap();
        assert_eq!(c.workers, 2);
        assert_eq!(c.health.path, "/ready");
        assert_eq!(c.health.failures, 3);
        assert_eq!(c.backends[0].address.port, 9001);
        assert_eq!(c.shutdown_grace, Duration::from_secs(5));
        assert_eq!(c.client_write_bytes, 16 << 10);
        assert!(c.fast_path);
        assert!(!c.work_stealing);
        let stealing = GatewayConfig::parse(&format!("{MINIMAL}work_stealing: true\n")).unwrap();
        assert_eq!(c.restart_only_changes(&stealing), ["work_stealing"]);
        let slow = GatewayConfig::parse(&format!("{MINIMAL}fast_path: false\n")).unwrap();
        assert!(
            c.restart_only_changes(&slow).is_empty(),
            "fast_path reloads"
        );
    }

    #[test]
    fn the_client_write_buffer_is_bounded_and_restart_only() {
        let set = |n: usize| format!("{MINIMAL}buffers: {{client_write_bytes: {n}}}\n");
        let unbuffered = GatewayConfig::parse(&set(0)).unwrap();
        assert_eq!(unbuffered.client_write_bytes, 0);
        let e = err(&set(MAX_CLIENT_WRITE_BYTES + 1));
        assert!(e.contains("buffers.client_write_bytes"), "{e}");
        let most = GatewayConfig::parse(&set(MAX_CLIENT_WRITE_BYTES)).unwrap();
        assert_eq!(
            unbuffered.restart_only_changes(&most),
            ["buffers.client_write_bytes"]
        );
        assert!(most.restart_only_changes(&most).is_empty());
    }

    #[test]
    fn long_and_short_backend_forms() {
        let c = GatewayConfig::parse(
            "upstream:\n  backends:\n    - 127.0.0.1:1\n    - {address: \"backend-2.svc:80\", weight: 3}\n",
        )
        .unwrap();
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[1].weight, 3);
        assert_eq!(c.backends[1].address.host, "backend-2.svc");
    }

    fn err(text: &str) -> String {
        GatewayConfig::parse(text).unwrap_err()
    }

    #[test]
    fn errors_name_key_and_line() {
        let e = err("upstream:\n  backends: [\"127.0.0.1:1\"]\n  helth_check: {}\n");
        assert!(e.contains("helth_check") && e.contains("line 3"), "{e}");
        let e = err(
            "upstream:\n  backends: [\"127.0.0.1:1\"]\n  health_check:\n    interval: 5 parsecs\n",
        );
        assert!(
            e.contains("upstream.health_check.interval") && e.contains("line 4"),
            "{e}"
        );
        let e = err("upstream:\n  backends: []\n");
        assert!(
            e.contains("upstream.backends") && e.contains("at least one"),
            "{e}"
        );
        let e = err("listen: [\"0.0.0.0:http\"]\nupstream:\n  backends: [\"127.0.0.1:1\"]\n");
        assert!(e.contains("listen") && e.contains("port"), "{e}");
        let e =
            err("upstream:\n  backends: [\"127.0.0.1:1\"]\n  health_check:\n    interval: 0s\n");
        assert!(
            e.contains("interval") && e.contains("greater than zero"),
            "{e}"
        );
        let e = err("upstream:\n  backends: [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n");
        assert!(e.contains("twice"), "{e}");
        let e = err(&format!("{MINIMAL}client: {{proxy_protocol: true}}\n"));
        assert!(e.contains("client.trusted_proxies"), "{e}");
    }
}
