//! `upstreams:` (named pools beside `upstream:`, which is the pool `default`) and `routes:`
//! (which pool, or which fixed answer, a request gets by its host and path).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::file::{FileBackend, FileHealthCheck};
use super::values::NonEmpty;
use super::{BackendSpec, HealthSettings};

/// One named pool: its backends and, optionally, its own health check. Balancing, outlier
/// ejection, queues, timeouts and retries are `upstream:`'s, for every pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePool {
    pub backends: NonEmpty<FileBackend>,
    pub health_check: Option<FileHealthCheck>,
}

/// One entry of `routes:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    /// `api.example.com`, or `*.example.com` (any subdomain); none: any host.
    pub host: Option<String>,
    /// A path prefix (`/api/`), or the exact path with `exact: true`; none: every path.
    pub path: Option<String>,
    #[serde(default)]
    pub exact: bool,
    /// The pool (a name under `upstreams:`, or `default`).
    pub pool: Option<String>,
    /// Remove `path` from the front of the target before it goes to the pool.
    #[serde(default)]
    pub strip_prefix: bool,
    /// A fixed answer instead of a pool: `{status: 410, message: "gone"}`.
    pub answer: Option<FileAnswer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAnswer {
    pub status: u16,
    pub message: String,
}

/// A named pool, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub name: String,
    pub backends: Vec<BackendSpec>,
    pub health: HealthSettings,
}

/// How a route matches a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// The name, lower case, no trailing dot.
    Exact(String),
    /// `*.example.com`: the suffix `.example.com`.
    Suffix(String),
}

/// Where a matched request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteTarget {
    Pool(String),
    Answer { status: u16, message: String },
}

/// A route, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Its place in the file (`routes[i]`), for logs and metrics.
    pub name: String,
    pub host: HostMatch,
    pub path: String,
    pub exact: bool,
    pub strip_prefix: bool,
    pub target: RouteTarget,
}

/// Host names as routes compare them: lower case, no port, no trailing dot.
pub fn normalize_host(host: &str) -> String {
    let host = if host.starts_with('[') {
        // An IPv6 literal, with or without a port.
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Validate `upstreams:` and `routes:`; `convert` turns a backend list into specs (the same
/// rules as `upstream.backends`).
pub fn pools_and_routes(
    pools: BTreeMap<String, FilePool>,
    routes: Vec<FileRoute>,
    default_health: &HealthSettings,
    convert: impl Fn(NonEmpty<FileBackend>, &str) -> Result<Vec<BackendSpec>, String>,
    health: impl Fn(FileHealthCheck, &str) -> Result<HealthSettings, String>,
) -> Result<(Vec<PoolSpec>, Vec<Route>), String> {
    let mut specs = Vec::new();
    for (name, p) in pools {
        if name == "default" || name.is_empty() {
            return Err(format!(
                "upstreams.{name}: the name is taken (`upstream:` is the pool `default`)"
            ));
        }
        let key = format!("upstreams.{name}");
        specs.push(PoolSpec {
            backends: convert(p.backends, &format!("{key}.backends"))?,
            health: match p.health_check {
                Some(h) => health(h, &format!("{key}.health_check"))?,
                None => default_health.clone(),
            },
            name,
        });
    }
    let mut out: Vec<Route> = Vec::new();
    for (i, r) in routes.into_iter().enumerate() {
        let key = format!("routes[{i}]");
        let host = match r.host.as_deref() {
            None | Some("*") => HostMatch::Any,
            Some(h) => match h.strip_prefix("*.") {
                Some(rest) if !rest.is_empty() => {
                    HostMatch::Suffix(format!(".{}", normalize_host(rest)))
                }
                _ if h.contains('*') => {
                    return Err(format!("{key}.host: {h:?}: only a leading `*.` is allowed"))
                }
                _ => HostMatch::Exact(normalize_host(h)),
            },
        };
        let path = r.path.unwrap_or_else(|| "/".into());
        if !path.starts_with('/') {
            return Err(format!("{key}.path: {path:?} must start with '/'"));
        }
        let target = match (r.pool, r.answer) {
            (Some(pool), None) => {
                if pool != "default" && !specs.iter().any(|p| p.name == pool) {
                    return Err(format!(
                        "{key}.pool: no pool named {pool:?} (under `upstreams:`, or `default`)"
                    ));
                }
                RouteTarget::Pool(pool)
            }
            (None, Some(a)) => {
                if !(200..=599).contains(&a.status) {
                    return Err(format!("{key}.answer.status: {} is not 200-599", a.status));
                }
                RouteTarget::Answer {
                    status: a.status,
                    message: a.message,
                }
            }
            _ => return Err(format!("{key}: give exactly one of `pool` and `answer`")),
        };
        if let Some(j) = out
            .iter()
            .position(|o| o.host == host && o.path == path && o.exact == r.exact)
        {
            return Err(format!(
                "{key}: the same host and path as routes[{j}]: it could never be chosen"
            ));
        }
        out.push(Route {
            name: key,
            host,
            path,
            exact: r.exact,
            strip_prefix: r.strip_prefix,
            target,
        });
    }
    Ok((specs, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_compared_without_port_dot_or_case() {
        assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("api.example.com."), "api.example.com");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("localhost"), "localhost");
    }
}
