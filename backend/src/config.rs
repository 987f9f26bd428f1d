//! Configuration from flags and environment variables; `backend --help` lists them all.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Parse "250ms", "5s", "1m".
fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Floodgate API backend: items API, probes, admission control.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Settings {
    /// Address to bind.
    #[arg(long, env = "HOST", default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 8001)]
    pub port: u16,
    /// Instance id sent in `X-Served-By` (default: backend-<port>).
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// `postgres://user:pass@host:port/db`; unset: embedded SQLite under DATA_DIR. TLS:
    /// `?sslmode=require` (encrypted, unverified), `verify-full` (and the host name) with
    /// `&sslrootcert=CA-FILE`; no sslmode (nor PGSSLMODE): plaintext.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Directory of the embedded SQLite file (data/floodgate.db).
    #[arg(long, env = "DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Database connections per instance.
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 10)]
    pub db_pool_size: u32,
    /// How long a request waits for a database connection before 503.
    #[arg(long, env = "DB_ACQUIRE_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub db_acquire_timeout: Duration,
    /// Most `POST /items` rows written in one statement and commit (PostgreSQL group commit;
    /// 1 = one commit per row).
    #[arg(long, env = "INSERT_BATCH_MAX", default_value_t = 64)]
    pub insert_batch_max: usize,
    /// Batched insert statements in flight at once (each holds one pooled connection).
    #[arg(long, env = "INSERT_WRITERS", default_value_t = 4)]
    pub insert_writers: usize,
    /// `redis://host:port`, or `rediss://host:port` over TLS; unset: limits are kept
    /// in-process (one instance's scope).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// `rediss://`: the CA certificates (PEM) that verify Redis, instead of the system's.
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// `rediss://`: a client certificate (PEM), for a Redis that asks for one
    /// (`tls-auth-clients yes`, Redis's default); with REDIS_CLIENT_KEY_FILE.
    #[arg(long, env = "REDIS_CLIENT_CERT_FILE")]
    pub redis_client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "REDIS_CLIENT_KEY_FILE")]
    pub redis_client_key_file: Option<PathBuf>,
    /// Admission control: `adaptive` (a limit that follows latency, with a short wait for a
    /// slot) or `fixed` (the `MAX_IN_FLIGHT` cap, no waiting). Probes are always exempt.
    #[arg(long, env = "ADMISSION", value_enum, default_value = "adaptive")]
    pub admission: crate::admission::Mode,
    /// `fixed`: cap on requests in flight, beyond it 503 at once. `adaptive`: the starting
    /// limit.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = 50)]
    pub max_in_flight: usize,
    /// `adaptive`: the lowest the limit goes (the database pool's size is a good floor).
    #[arg(long, env = "ADMISSION_MIN", default_value_t = 10)]
    pub admission_min: usize,
    /// `adaptive`: the highest the limit goes; also the most requests waiting for a slot.
    #[arg(long, env = "ADMISSION_MAX", default_value_t = 500)]
    pub admission_max: usize,
    /// `adaptive`: average latency up to this multiple of the no-load baseline lets the
    /// limit grow; above it the limit is cut in proportion (at most by half a window).
    #[arg(long, env = "ADMISSION_TOLERANCE", default_value_t = 2.0)]
    pub admission_tolerance: f64,
    /// `adaptive`: ... as does latency up to the baseline plus this, whichever is more (an
    /// absolute allowance for requests of a fraction of a millisecond).
    #[arg(long, env = "ADMISSION_SLACK", default_value = "10ms", value_parser = duration)]
    pub admission_slack: Duration,
    /// `adaptive`: longest a request over the limit waits for a slot before 503 (slots go to
    /// the oldest waiter, or to the newest while waits are running out).
    #[arg(long, env = "ADMISSION_QUEUE_TIMEOUT", default_value = "25ms", value_parser = duration)]
    pub admission_queue_timeout: Duration,
    /// Listen backlog (pending connections the kernel queues).
    #[arg(long, env = "LISTEN_BACKLOG", default_value_t = 1024)]
    pub listen_backlog: u32,
    /// Time allowed to receive a complete request head, counted from when the connection
    /// became idle: it is also the keep-alive idle timeout (uvicorn's --timeout-keep-alive).
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// Largest accepted request body, in bytes (413 beyond).
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 65536)]
    pub max_body_bytes: usize,
    /// SIGTERM: `/ready` fails at once and the instance keeps accepting and serving this long,
    /// so health checkers see it fail and stop routing to it before its listener closes. The
    /// default is a little over the gateway's health check (2s interval x 3 failures + 1s
    /// timeout).
    #[arg(long, env = "SHUTDOWN_DRAIN_DELAY", default_value = "8s", value_parser = duration)]
    pub shutdown_drain_delay: Duration,
    /// After the drain delay the listener closes and in-flight requests get this long.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
    pub shutdown_grace: Duration,
    /// Readiness fails when in-flight requests reach this share of the current limit
    /// (adaptive) or of MAX_IN_FLIGHT (fixed).
    #[arg(long, env = "READY_INFLIGHT_RATIO", default_value_t = 0.9)]
    pub ready_inflight_ratio: f64,
    /// Readiness fails when this share of recent requests failed with 5xx (sheds excluded).
    #[arg(long, env = "READY_MAX_ERROR_RATE", default_value_t = 0.5)]
    pub ready_max_error_rate: f64,
    /// The sliding window of the error rate, in seconds.
    #[arg(long, env = "READY_ERROR_WINDOW_SECS", default_value_t = 10)]
    pub ready_error_window_secs: u64,
    /// Fewest requests in the window before the error rate counts.
    #[arg(long, env = "READY_ERROR_MIN_REQUESTS", default_value_t = 20)]
    pub ready_error_min_requests: u64,
    /// How often dependencies (database) are checked in the background.
    #[arg(long, env = "DEPENDENCY_CHECK_INTERVAL", default_value = "1s", value_parser = duration)]
    pub dependency_check_interval: Duration,
    /// Requests per user by tier: `tier=N/window,...` (window: s, min, h, or like 10s).
    #[arg(
        long,
        env = "TIER_LIMITS",
        default_value = "free=10/min,pro=100/min,enterprise=1000/min"
    )]
    pub tier_limits: String,
    /// Requests per user per endpoint, on top of the tier: `route=N/window,...`; routes are
    /// list_items, create_item, get_item, delete_item, llm.
    #[arg(
        long,
        env = "ENDPOINT_LIMITS",
        default_value = "llm=20/min,create_item=60/min"
    )]
    pub endpoint_limits: String,
    /// Limit for callers without a key, per instance (e.g. `100/s`); unset: none.
    #[arg(long, env = "ANON_LIMIT")]
    pub anon_limit: Option<String>,
    /// Longest a Redis rate-limit call may take before this instance's own limits answer.
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "100ms", value_parser = duration)]
    pub redis_timeout: Duration,
    /// How long an API-key lookup is cached (a revoked key works at most this long).
    #[arg(long, env = "API_KEY_CACHE_TTL", default_value = "30s", value_parser = duration)]
    pub api_key_cache_ttl: Duration,
    /// The vendor endpoint `POST /llm` calls (`https://` over TLS).
    #[arg(
        long,
        env = "VENDOR_URL",
        default_value = "http://127.0.0.1:9000/v1/complete"
    )]
    pub vendor_url: String,
    /// `https://`: the CA certificates (PEM) that verify the vendor, instead of the system's.
    #[arg(long, env = "VENDOR_CA_FILE")]
    pub vendor_ca_file: Option<PathBuf>,
    /// Longest a call may wait for admission (local limiter, global limiter, semaphore).
    #[arg(long, env = "VENDOR_QUEUE_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub vendor_queue_timeout: Duration,
    /// Per-instance smoothing of vendor calls (N/window).
    #[arg(long, env = "VENDOR_LOCAL_RATE", default_value = "80/min")]
    pub vendor_local_rate: String,
    /// The vendor contract for the whole account, enforced across instances in Redis.
    #[arg(long, env = "VENDOR_CONTRACT", default_value = "500/min")]
    pub vendor_contract: String,
    /// Added to the contract's window on our side, so the vendor, which counts a call when
    /// it arrives, never sees more than the contract in its window: covers the variation of
    /// the time from taking a token to the vendor receiving the call (measured with the
    /// randomized contract test on two cores: 3 violations in 4 runs without a margin, none
    /// at 10 ms; the default leaves ten times that).
    #[arg(long, env = "VENDOR_CONTRACT_MARGIN", default_value = "100ms", value_parser = duration)]
    pub vendor_contract_margin: Duration,
    /// Longest a call waits for a token of the contract before 429.
    #[arg(long, env = "VENDOR_LIMITER_WAIT", default_value = "3s", value_parser = duration)]
    pub vendor_limiter_wait: Duration,
    /// Concurrent vendor calls per instance.
    #[arg(long, env = "VENDOR_CONCURRENCY", default_value_t = 50)]
    pub vendor_concurrency: usize,
    /// Timeout of one vendor call attempt.
    #[arg(long, env = "VENDOR_CALL_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub vendor_call_timeout: Duration,
    /// TCP connect timeout to the vendor.
    #[arg(long, env = "VENDOR_CONNECT_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub vendor_connect_timeout: Duration,
    /// Attempts per call, the first included.
    #[arg(long, env = "VENDOR_MAX_ATTEMPTS", default_value_t = 3)]
    pub vendor_max_attempts: u32,
    /// Backoff before retry n: uniform in [0, min(max, base * 2^(n-1))].
    #[arg(long, env = "VENDOR_BACKOFF_BASE", default_value = "100ms", value_parser = duration)]
    pub vendor_backoff_base: Duration,
    #[arg(long, env = "VENDOR_BACKOFF_MAX", default_value = "2s", value_parser = duration)]
    pub vendor_backoff_max: Duration,
    /// Retries allowed as a share of calls (over 10 s).
    #[arg(long, env = "VENDOR_RETRY_BUDGET", default_value_t = 0.2)]
    pub vendor_retry_budget: f32,
    /// Consecutive failed calls that open the circuit.
    #[arg(long, env = "VENDOR_BREAKER_FAILURES", default_value_t = 5)]
    pub vendor_breaker_failures: u32,
    /// How long the circuit stays open before one probe call.
    #[arg(long, env = "VENDOR_BREAKER_COOLDOWN", default_value = "10s", value_parser = duration)]
    pub vendor_breaker_cooldown: Duration,
    /// Instances sharing the contract: after Redis is lost (and one window of no calls), and
    /// for one window after it returns, each takes contract/this.
    #[arg(long, env = "VENDOR_EXPECTED_INSTANCES", default_value_t = 3)]
    pub vendor_expected_instances: u32,
    /// The vendor limiter declares Redis lost (no vendor calls for one window, then shares)
    /// after this many failed Redis calls in a row (timeouts or errors, heartbeats included,
    /// no answer in between) ...
    #[arg(long, env = "VENDOR_REDIS_LOST_FAILURES", default_value_t = 3)]
    pub vendor_redis_lost_failures: u32,
    /// ... spanning at least this long, so one slow call or a short stall of Redis or of this
    /// machine is not a lost Redis (a call that timed out is not sent, so waiting costs calls,
    /// never the contract). A refused, reset or closed connection is a lost Redis at once.
    #[arg(long, env = "VENDOR_REDIS_LOST_AFTER", default_value = "1s", value_parser = duration)]
    pub vendor_redis_lost_after: Duration,
    /// Log level (RUST_LOG overrides).
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Create the demo users and API keys (one per tier) and print the keys.
    Seed,
}

impl Settings {
    pub fn instance_id(&self) -> String {
        self.instance_id
            .clone()
            .unwrap_or_else(|| format!("backend-{}", self.port))
    }

    pub fn db(&self) -> crate::db::DbSettings {
        crate::db::DbSettings {
            url: self.database_url.clone().filter(|u| !u.is_empty()),
            data_dir: self.data_dir.clone(),
            pool_size: self.db_pool_size,
            acquire_timeout: self.db_acquire_timeout,
        }
    }

    /// The Redis client's TLS files (empty values count as unset).
    pub fn redis_tls(&self) -> crate::tls::RedisTlsFiles {
        let set = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        crate::tls::RedisTlsFiles {
            ca: set(&self.redis_ca_file),
            client_cert: set(&self.redis_client_cert_file),
            client_key: set(&self.redis_client_key_file),
        }
    }

    /// The admission control's settings.
    pub fn admission(&self) -> Result<crate::admission::AdmissionSettings, String> {
        if self.admission_min == 0 || self.admission_min > self.admission_max {
            return Err("ADMISSION_MIN must be at least 1 and at most ADMISSION_MAX".into());
        }
        if self.admission_tolerance.is_nan() || self.admission_tolerance < 1.0 {
            return Err("ADMISSION_TOLERANCE must be at least 1".into());
        }
        Ok(crate::admission::AdmissionSettings {
            mode: self.admission,
            max_in_flight: self.max_in_flight.max(1),
            min: self.admission_min,
            max: self.admission_max,
            tolerance: self.admission_tolerance,
            slack: self.admission_slack,
            queue_timeout: self.admission_queue_timeout,
        })
    }

    /// The vendor pipeline's settings, parsed.
    pub fn vendor(&self) -> Result<crate::vendor::VendorSettings, String> {
        let quota = |name: &str, v: &str| {
            v.parse::<crate::ratelimit::Quota>()
                .map_err(|e| format!("{name}: {e}"))
        };
        if !(0.0..=1.0).contains(&self.vendor_retry_budget) {
            return Err("VENDOR_RETRY_BUDGET: must be between 0 and 1".into());
        }
        Ok(crate::vendor::VendorSettings {
            url: self.vendor_url.clone(),
            ca_file: self
                .vendor_ca_file
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            queue_timeout: self.vendor_queue_timeout,
            local_rate: quota("VENDOR_LOCAL_RATE", &self.vendor_local_rate)?,
            contract: quota("VENDOR_CONTRACT", &self.vendor_contract)?,
            contract_margin: self.vendor_contract_margin,
            limiter_wait: self.vendor_limiter_wait,
            concurrency: self.vendor_concurrency.max(1),
            call_timeout: self.vendor_call_timeout,
            connect_timeout: self.vendor_connect_timeout,
            max_attempts: self.vendor_max_attempts.max(1),
            backoff_base: self.vendor_backoff_base,
            backoff_max: self.vendor_backoff_max,
            retry_budget: self.vendor_retry_budget,
            breaker_failures: self.vendor_breaker_failures,
            breaker_cooldown: self.vendor_breaker_cooldown,
            expected_instances: self.vendor_expected_instances.max(1),
            redis_lost: crate::vendor::contract::LossRule {
                failures: self.vendor_redis_lost_failures.max(1),
                after: self.vendor_redis_lost_after,
            },
        })
    }

    /// Settings with every default, for tests.
    pub fn defaults() -> Settings {
        Settings::parse_from(["backend"])
    }
}
