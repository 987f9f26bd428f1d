//! The YAML file as users write it (`config/gateway.yaml` documents every key and default).

use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

use super::values::*;

/// The whole YAML file, as written by users.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Addresses the proxy listens on: `"host:port"`, or `{address, tls: {...}}` for TLS.
    pub listen: NonEmpty<super::listen::FileListen>,
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
    /// The upstream pool (the pool `default`).
    pub upstream: FileUpstream,
    /// More pools, by name (`routes:` send requests to them).
    pub upstreams: std::collections::BTreeMap<String, super::routes::FilePool>,
    /// Which pool (or fixed answer) a request gets by host and path; none: every request goes
    /// to `default`.
    pub routes: Vec<super::routes::FileRoute>,
    /// Timeouts towards upstreams and for idle downstream connections.
    pub timeouts: FileTimeouts,
    /// Who the client is: trusted proxies and IPv6 keying.
    pub client: FileClient,
    /// Request rate limits (per client IP, per path prefix, global).
    pub limits: FileLimits,
    /// Shared state of `scope: cluster` limits (Redis); none: every limit is local.
    pub cluster: Option<FileCluster>,
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
    /// HTTP/2 towards clients.
    pub http2: super::listen::FileHttp2,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            listen: NonEmpty(vec![super::listen::FileListen::from(
                "0.0.0.0:8000".parse::<HostPort>().expect("valid default"),
            )]),
            workers: AtLeastOne(2),
            work_stealing: false,
            metrics_listen: Some("127.0.0.1:9100".parse().expect("valid default")),
            log_level: LogLevel::Info,
            access_log: true,
            shutdown_grace: HumanDuration(Duration::from_secs(5)),
            watch: false,
            upstream: FileUpstream::default(),
            upstreams: Default::default(),
            routes: Vec::new(),
            timeouts: FileTimeouts::default(),
            client: FileClient::default(),
            limits: FileLimits::default(),
            cluster: None,
            connections: FileConnections::default(),
            buffers: FileBuffers::default(),
            slow_clients: FileSlowClients::default(),
            fast_path: true,
            http2: Default::default(),
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
    /// How a backend is chosen for a request.
    pub balance: Balance,
    /// `hash`: what requests are keyed on: `client_ip`, `header:<name>` or `cookie:<name>`.
    pub hash_key: HashKey,
    /// Peak-EWMA decay of `p2c_ewma`: how fast an old latency sample loses weight.
    pub ewma_decay: PositiveDuration,
    /// Passive outlier ejection.
    pub outlier: FileOutlier,
    /// Speak TLS to the backends; none: plaintext.
    pub tls: Option<FileUpstreamTls>,
}

/// A pool's `tls:` (`upstream.tls`, `upstreams.<name>.tls`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreamTls {
    /// The name asked for and checked; default: the backend's host when it is a DNS name,
    /// else none (the certificate is checked for the IP address).
    pub sni: Option<String>,
    /// Trusted CA certificates (PEM); default: the system's roots.
    pub ca: Option<std::path::PathBuf>,
    /// Check the backend's certificate (false is logged as a warning).
    #[serde(default = "verify_default")]
    pub verify: bool,
}

fn verify_default() -> bool {
    true
}

impl FileUpstreamTls {
    /// The pool's client config; `key` names it in errors.
    pub fn build(&self, key: &str) -> Result<crate::tls::UpstreamTls, String> {
        crate::tls::upstream_tls(self.sni.as_deref(), self.ca.as_deref(), self.verify, key)
    }
}

/// `upstream.balance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Weighted round robin.
    RoundRobin,
    /// The fewest requests in flight per unit of weight, ties broken at random.
    LeastConn,
    /// Power of two random choices over peak-EWMA latency x (in flight + 1) / weight.
    P2cEwma,
    /// Consistent hashing (ketama) on `hash_key`: the same key goes to the same backend, and
    /// a backend leaving moves only its share.
    Hash,
}

/// What `balance: hash` keys a request on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(String),
    Cookie(String),
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.split_once(':') {
            None if s == "client_ip" => Ok(HashKey::ClientIp),
            Some(("header", name)) if !name.is_empty() => {
                Ok(HashKey::Header(name.to_ascii_lowercase()))
            }
            Some(("cookie", name)) if !name.is_empty() => Ok(HashKey::Cookie(name.to_string())),
            _ => Err(de::Error::custom(format!(
                "hash_key {s:?}: expected client_ip, header:<name> or cookie:<name>"
            ))),
        }
    }
}

/// `upstream.outlier:` N consecutive failures (5xx answers, connect failures, timeouts)
/// eject a backend for a time that doubles with each ejection in a row (Envoy's rule).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileOutlier {
    /// Consecutive failures that eject a backend; 0 turns ejection off.
    pub consecutive_failures: u32,
    /// The first ejection's length; each further one in a row doubles it, up to 10x.
    pub base_ejection: PositiveDuration,
    /// At most this share of a pool is ejected at once, percent.
    pub max_ejection_percent: u32,
}

impl Default for FileOutlier {
    fn default() -> Self {
        FileOutlier {
            consecutive_failures: 5,
            base_ejection: PositiveDuration(Duration::from_secs(10)),
            max_ejection_percent: 50,
        }
    }
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
            balance: Balance::RoundRobin,
            hash_key: HashKey::ClientIp,
            ewma_decay: PositiveDuration(Duration::from_secs(10)),
            outlier: FileOutlier::default(),
            tls: None,
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

/// One rate limit: GCRA (nginx `limit_req`) with a burst, over one window (`rate:`) or
/// several, all enforced (`rates:`), kept in this process (`scope: local`) or across the
/// gateway's replicas through Redis (`scope: cluster`, see `cluster:`).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawRateLimit")]
pub struct FileRateLimit {
    /// The sustained rates, one GCRA each; a request passes only when every one admits it.
    pub rates: Vec<RateValue>,
    /// Requests allowed over the rate at once (nginx `burst`), in every window. Default: 0.
    pub burst: u32,
    /// false: burst requests pass at once (nginx `nodelay`); true: they are delayed to the
    /// rate. Default: false.
    pub delay: bool,
    /// With `delay`, the longest a request may be held; one that would wait longer is
    /// rejected at once. Default: 1s.
    pub max_delay: HumanDuration,
    /// Where the limit's state lives. Default: local.
    pub scope: Scope,
}

/// `FileRateLimit` as written: `rate:` or `rates:`, checked into one list.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    #[serde(default)]
    rate: Option<RateValue>,
    #[serde(default)]
    rates: Vec<RateValue>,
    #[serde(default)]
    burst: u32,
    #[serde(default)]
    delay: bool,
    #[serde(default = "default_max_delay")]
    max_delay: HumanDuration,
    #[serde(default)]
    scope: Scope,
}

/// The most windows one limit may have (each is a word of state per key).
pub const MAX_WINDOWS: usize = 4;

impl TryFrom<RawRateLimit> for FileRateLimit {
    type Error = String;
    fn try_from(r: RawRateLimit) -> Result<Self, String> {
        let rates = match (r.rate, r.rates.is_empty()) {
            (Some(rate), true) => vec![rate],
            (None, false) => r.rates,
            (Some(_), false) => return Err("write either `rate` or `rates`, not both".into()),
            (None, true) => return Err("a rate limit needs `rate` (or `rates`)".into()),
        };
        if rates.len() > MAX_WINDOWS {
            return Err(format!("`rates`: at most {MAX_WINDOWS} windows"));
        }
        if r.delay && r.scope == Scope::Cluster {
            return Err("`delay: true` is for `scope: local` only (a cluster limit admits or refuses at once)".into());
        }
        Ok(FileRateLimit {
            rates,
            burst: r.burst,
            delay: r.delay,
            max_delay: r.max_delay,
            scope: r.scope,
        })
    }
}

impl FileRateLimit {
    /// One window, local, no delay.
    pub fn new(rate: RateValue, burst: u32) -> Self {
        FileRateLimit {
            rates: vec![rate],
            burst,
            delay: false,
            max_delay: default_max_delay(),
            scope: Scope::Local,
        }
    }
}

/// `cluster:` where `scope: cluster` limits keep their shared state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    /// `redis://host:port/db`. Required.
    pub redis: String,
    /// How often each replica reconciles its leases with Redis (and sends its heartbeat).
    /// Default: 100ms.
    #[serde(default = "default_sync_interval")]
    pub sync_interval: PositiveDuration,
    /// The longest one background call to Redis may take before the replica counts Redis as
    /// unreachable and falls back to its share. Requests never wait for Redis. Default: 50ms.
    #[serde(default = "default_cluster_timeout")]
    pub timeout: PositiveDuration,
    /// The replicas expected, for the fallback share (limit / replicas) until heartbeats
    /// counted the live ones. Default: 2.
    #[serde(default = "default_replicas")]
    pub replicas: AtLeastOne,
    /// Prefix of every Redis key, so that several gateway clusters can share one Redis.
    /// Default: "floodgate".
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_sync_interval() -> PositiveDuration {
    PositiveDuration(Duration::from_millis(100))
}

fn default_cluster_timeout() -> PositiveDuration {
    PositiveDuration(Duration::from_millis(50))
}

fn default_replicas() -> AtLeastOne {
    AtLeastOne(2)
}

fn default_prefix() -> String {
    "floodgate".into()
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
    /// Ceiling across all clients (of this instance, or of the cluster with
    /// `scope: cluster`); over it: 503.
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
            global: Some(FileRateLimit::new(
                RateValue {
                    per_second: 2000.0,
                    window_secs: 1,
                },
                1000,
            )),
            per_ip: Some(FileRateLimit::new(
                RateValue {
                    per_second: 100.0,
                    window_secs: 1,
                },
                200,
            )),
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
    /// Request bodies buffered at once, all connections together, bytes: a body that would
    /// go over it is refused 503 (`body_budget`), so slow senders cannot pin memory.
    pub total_body_bytes: usize,
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
            total_body_bytes: 256 << 20,
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
    /// A TLS handshake must be done within this after the connection was accepted.
    pub handshake_timeout: PositiveDuration,
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
            handshake_timeout: PositiveDuration(Duration::from_secs(10)),
        }
    }
}

impl FileConfig {
    /// Make every relative file path in the config `dir`'s.
    pub(super) fn anchor_paths(&mut self, dir: &std::path::Path) {
        for p in self.paths_mut() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    /// Every file the config names: certificates and keys, CA files, the hosts file.
    pub(super) fn paths_mut(&mut self) -> Vec<&mut std::path::PathBuf> {
        let mut paths = Vec::new();
        for l in &mut self.listen.0 {
            for c in l.tls.iter_mut().flat_map(|t| t.certificates.0.iter_mut()) {
                paths.push(&mut c.cert);
                paths.push(&mut c.key);
            }
        }
        let pools = self.upstreams.values_mut().map(|p| &mut p.tls);
        for tls in std::iter::once(&mut self.upstream.tls).chain(pools) {
            if let Some(ca) = tls.as_mut().and_then(|t| t.ca.as_mut()) {
                paths.push(ca);
            }
        }
        if let Some(h) = self.upstream.hosts_file.as_mut() {
            paths.push(h);
        }
        paths
    }
}
