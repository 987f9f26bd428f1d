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
    /// Where `/metrics` is served; kept off the proxy listener so clients cannot scrape it.
    pub metrics_listen: Option<HostPort>,
    /// Log level for the process (overridden by `RUST_LOG` when that is set).
    pub log_level: LogLevel,
    /// One access-log line per request through `log` (target `access`).
    pub access_log: bool,
    /// How long SIGTERM/SIGINT waits for in-flight requests before exiting.
    pub shutdown_grace: HumanDuration,
    /// The upstream pool.
    pub upstream: FileUpstream,
    /// Timeouts towards upstreams and for idle downstream connections.
    pub timeouts: FileTimeouts,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            listen: NonEmpty(vec!["0.0.0.0:8000".parse().expect("valid default")]),
            workers: AtLeastOne(2),
            metrics_listen: Some("127.0.0.1:9100".parse().expect("valid default")),
            log_level: LogLevel::Info,
            access_log: true,
            shutdown_grace: HumanDuration(Duration::from_secs(5)),
            upstream: FileUpstream::default(),
            timeouts: FileTimeouts::default(),
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
}

impl Default for FileUpstream {
    fn default() -> Self {
        FileUpstream {
            backends: NonEmpty(vec![FileBackend {
                address: "127.0.0.1:8001".parse().expect("valid default"),
                weight: AtLeastOne(1),
            }]),
            keepalive_pool: 128,
            health_check: FileHealthCheck::default(),
            connect_retries: 2,
            retry_idempotent: false,
        }
    }
}

/// One backend: `{address: "host:port", weight: 1}` or just `"host:port"`.
#[derive(Debug, Clone, PartialEq)]
pub struct FileBackend {
    pub address: HostPort,
    pub weight: AtLeastOne,
}

impl<'de> Deserialize<'de> for FileBackend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Long {
            address: HostPort,
            #[serde(default = "one")]
            weight: AtLeastOne,
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
            });
        }
        let long: Long = serde_yaml::from_value(v).map_err(de::Error::custom)?;
        Ok(FileBackend {
            address: long.address,
            weight: long.weight,
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
}

impl Default for FileTimeouts {
    fn default() -> Self {
        FileTimeouts {
            connect: PositiveDuration(Duration::from_secs(1)),
            read: PositiveDuration(Duration::from_secs(30)),
            write: PositiveDuration(Duration::from_secs(30)),
            idle: PositiveDuration(Duration::from_secs(60)),
        }
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
    pub metrics_listen: Option<HostPort>,
    pub log_level: LogLevel,
    pub access_log: bool,
    pub shutdown_grace: Duration,
    pub backends: Vec<BackendSpec>,
    pub keepalive_pool: usize,
    pub health: HealthSettings,
    pub connect_retries: usize,
    pub retry_idempotent: bool,
    pub timeouts: Timeouts,
}

/// One configured backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSpec {
    pub address: HostPort,
    pub weight: usize,
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
}

impl GatewayConfig {
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
            })
            .collect();
        let count = backends.len();
        backends.sort();
        backends.dedup_by(|a, b| a.address == b.address);
        if backends.len() != count {
            return Err("upstream.backends: the same address is listed twice".into());
        }
        let t = f.timeouts;
        Ok(GatewayConfig {
            listen: f.listen.0,
            workers: f.workers.0,
            metrics_listen: f.metrics_listen,
            log_level: f.log_level,
            access_log: f.access_log,
            shutdown_grace: f.shutdown_grace.0,
            backends,
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
    }
}
