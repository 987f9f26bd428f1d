//! Value types of the config file: each one refuses bad input in its `Deserialize`, so
//! serde_yaml reports the error with the key path, line and column.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::{de, Deserialize, Deserializer};

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

/// Where a rate limit's state lives: `local` (this process) or `cluster` (shared by every
/// replica through Redis, `cluster:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Local,
    Cluster,
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
