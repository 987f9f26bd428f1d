//! `upstreams:` (named pools beside `upstream:`, which is the pool `default`) and `routes:`
//! (which pool, or which fixed answer, a request gets by its host, path, method and headers),
//! compiled at load into a [`RouteTable`] the request path looks up without a scan.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::file::{
    Balance, FileBackend, FileHealthCheck, FileOutlier, FileRateLimit, FileUpstreamTls, HashKey,
};
use super::values::{NonEmpty, PositiveDuration};
use super::{BackendQueue, BackendSpec, Balancing, HealthSettings, RateSpec, Timeouts};

/// One named pool: its backends and, optionally, its own health check, balancing, queue,
/// timeouts and retries; what it leaves out is `upstream:`'s.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePool {
    pub backends: NonEmpty<FileBackend>,
    pub health_check: Option<FileHealthCheck>,
    pub balance: Option<Balance>,
    pub hash_key: Option<HashKey>,
    pub ewma_decay: Option<PositiveDuration>,
    pub outlier: Option<FileOutlier>,
    pub max_concurrent_per_backend: Option<usize>,
    pub max_queue: Option<usize>,
    pub queue_timeout: Option<PositiveDuration>,
    #[serde(default)]
    pub timeouts: FileUpstreamTimeouts,
    #[serde(default)]
    pub retries: FileRetries,
    /// TLS to this pool's backends (not inherited from `upstream:`); none: plaintext.
    pub tls: Option<FileUpstreamTls>,
}

/// A pool's or a route's upstream timeouts; each one left out is inherited.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreamTimeouts {
    pub connect: Option<PositiveDuration>,
    pub read: Option<PositiveDuration>,
    pub write: Option<PositiveDuration>,
}

/// A pool's or a route's retry policy; each one left out is inherited.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRetries {
    pub connect_retries: Option<usize>,
    pub retry_idempotent: Option<bool>,
}

/// One entry of `routes:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    /// For metrics, the access log and the limiter state a reload keeps; default `routes[i]`.
    pub name: Option<String>,
    /// `api.example.com`, or `*.example.com` (any subdomain); none: any host.
    pub host: Option<String>,
    /// A path prefix (`/api/`), or the exact path with `exact: true`; none: every path.
    pub path: Option<String>,
    #[serde(default)]
    pub exact: bool,
    /// Only these methods (`[GET, HEAD]`); none: any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Only requests with this header (`{name: X-Canary}`), or with this exact value.
    pub header: Option<FileHeaderMatch>,
    /// The pool (a name under `upstreams:`, or `default`).
    pub pool: Option<String>,
    /// Remove `path` from the front of the target before it goes to the pool.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace `path` at the front of the target with this (`/v2/`).
    pub replace_prefix: Option<String>,
    /// A fixed answer instead of a pool: `{status: 410, message: "gone"}`.
    pub answer: Option<FileAnswer>,
    /// This route's per-IP rate limit, instead of `limits.per_ip`.
    pub limit: Option<FileRateLimit>,
    /// Upstream timeouts for this route (over its pool's).
    #[serde(default)]
    pub timeouts: FileUpstreamTimeouts,
    /// Retry policy for this route (over its pool's).
    #[serde(default)]
    pub retries: FileRetries,
    /// Body cap for this route, instead of `buffers.max_body_bytes`.
    pub max_body_bytes: Option<usize>,
    /// Request headers set (replacing the client's) and removed before the pool gets it.
    #[serde(default)]
    pub request_headers: FileHeaderRules,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHeaderMatch {
    pub name: String,
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHeaderRules {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAnswer {
    pub status: u16,
    pub message: String,
}

/// How requests are sent to a pool's backends: balancing, queue, timeouts, retries.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    pub balance: Balancing,
    pub hash_key: HashKey,
    pub queue: BackendQueue,
    pub timeouts: Timeouts,
    pub connect_retries: usize,
    pub retry_idempotent: bool,
    /// The pool's TLS to its backends; none: plaintext.
    pub tls: Option<crate::tls::UpstreamTls>,
}

impl PoolSettings {
    fn with(&self, t: &FileUpstreamTimeouts, r: &FileRetries) -> PoolSettings {
        let mut s = self.clone();
        let pick = |o: &Option<PositiveDuration>, d: Duration| o.as_ref().map_or(d, |v| v.0);
        s.timeouts.connect = pick(&t.connect, s.timeouts.connect);
        s.timeouts.read = pick(&t.read, s.timeouts.read);
        s.timeouts.write = pick(&t.write, s.timeouts.write);
        s.connect_retries = r.connect_retries.unwrap_or(s.connect_retries);
        s.retry_idempotent = r.retry_idempotent.unwrap_or(s.retry_idempotent);
        s
    }

    fn for_pool(&self, p: &FilePool) -> PoolSettings {
        let mut s = self.with(&p.timeouts, &p.retries);
        if let Some(b) = p.balance {
            s.balance.algorithm = b;
        }
        if let Some(k) = &p.hash_key {
            s.hash_key = k.clone();
        }
        if let Some(d) = &p.ewma_decay {
            s.balance.ewma_decay = d.0;
        }
        if let Some(o) = &p.outlier {
            s.balance.eject_after = o.consecutive_failures;
            s.balance.base_ejection = o.base_ejection.0;
            s.balance.max_ejection_percent = o.max_ejection_percent.min(100);
        }
        s.queue.max_concurrent = p
            .max_concurrent_per_backend
            .unwrap_or(s.queue.max_concurrent);
        s.queue.max_queue = p.max_queue.unwrap_or(s.queue.max_queue);
        s.queue.timeout = p.queue_timeout.as_ref().map_or(s.queue.timeout, |d| d.0);
        s.tls = None;
        s
    }
}

/// A named pool, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub name: String,
    pub backends: Vec<BackendSpec>,
    pub health: HealthSettings,
    pub settings: PoolSettings,
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

/// A route, validated. Every request has one: with no `routes:`, [`RouteTable::default`].
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Its place in `routes:`; the default route's is `usize::MAX`.
    pub index: usize,
    /// `name:`, or `routes[i]`; the default route's is `-`.
    pub name: String,
    pub host: HostMatch,
    pub path: String,
    pub exact: bool,
    /// Upper case; empty: any method.
    pub methods: Vec<String>,
    /// Lower-case name, and the exact value when one is required.
    pub header: Option<(String, Option<String>)>,
    pub target: RouteTarget,
    /// What replaces `path` at the front of the target (`""` for `strip_prefix`).
    pub replace_prefix: Option<String>,
    pub limit: Option<RateSpec>,
    pub max_body_bytes: usize,
    /// Names as written (compared without case).
    pub set_headers: Vec<(String, String)>,
    pub remove_headers: Vec<String>,
    pub settings: PoolSettings,
    /// Its `gateway_route_requests_total` series.
    pub series: crate::metrics::RouteSeries,
}

impl Route {
    /// The pool's name, or `-` for a fixed answer.
    pub fn pool_name(&self) -> &str {
        match &self.target {
            RouteTarget::Pool(p) => p,
            RouteTarget::Answer { .. } => "-",
        }
    }

    /// The conditions besides host and path: a route with more is more specific.
    pub fn conditions(&self) -> usize {
        usize::from(!self.methods.is_empty()) + usize::from(self.header.is_some())
    }

    /// Whether the request's method and headers meet the route's conditions.
    pub fn accepts<'h>(&self, method: &[u8], header: &impl Fn(&str) -> Option<&'h [u8]>) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m.as_bytes() == method) {
            return false;
        }
        match &self.header {
            None => true,
            Some((name, want)) => match (header(name), want) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(v), Some(w)) => v == w.as_bytes(),
            },
        }
    }

    /// Whether the request's header edits apply (set or remove this name).
    pub fn edits_header(&self, name: &[u8]) -> bool {
        self.set_headers
            .iter()
            .any(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
            || self
                .remove_headers
                .iter()
                .any(|n| n.as_bytes().eq_ignore_ascii_case(name))
    }
}

/// Routes of one host kind, by path: exact paths in a map, prefixes by length, longest first.
/// Each list is in match order: more conditions first, then file order.
#[derive(Debug, Clone, Default)]
pub struct PathTable {
    pub exact: FastMap<Vec<usize>>,
    pub prefixes: FastMap<Vec<usize>>,
    /// The distinct prefix lengths, longest first.
    pub prefix_lengths: Vec<usize>,
    /// The second bytes of the prefixes longer than `/` (a one-level trie: a path whose
    /// second byte is not here can only match `/`), as a 256-bit set.
    pub second_bytes: [u64; 4],
}

/// `routes:` compiled: the host map, then per host the path table. Lookup cost grows with
/// the number of distinct prefix lengths, not with the number of routes.
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub routes: Vec<Arc<Route>>,
    /// Where requests go with no `routes:`: the pool `default`.
    pub default: Arc<Route>,
    pub exact_hosts: FastMap<PathTable>,
    /// `*.example.com` by suffix, longest first.
    pub suffixes: Vec<(String, PathTable)>,
    pub any_host: PathTable,
}

impl RouteTable {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    fn compile(routes: Vec<Route>, default: Route) -> RouteTable {
        let routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        let mut exact_hosts: FastMap<PathTable> = FastMap::default();
        let mut suffixes: Vec<(String, PathTable)> = Vec::new();
        let mut any_host = PathTable::default();
        for r in &routes {
            let table = match &r.host {
                HostMatch::Any => &mut any_host,
                HostMatch::Exact(h) => exact_hosts.entry(h.clone()).or_default(),
                HostMatch::Suffix(s) => match suffixes.iter().position(|(x, _)| x == s) {
                    Some(i) => &mut suffixes[i].1,
                    None => {
                        suffixes.push((s.clone(), PathTable::default()));
                        &mut suffixes.last_mut().expect("just pushed").1
                    }
                },
            };
            let list = if r.exact {
                table.exact.entry(r.path.clone()).or_default()
            } else {
                if !table.prefix_lengths.contains(&r.path.len()) {
                    table.prefix_lengths.push(r.path.len());
                }
                if let Some(&b) = r.path.as_bytes().get(1) {
                    table.second_bytes[usize::from(b >> 6)] |= 1 << (b & 63);
                }
                table.prefixes.entry(r.path.clone()).or_default()
            };
            list.push(r.index);
        }
        let order = |list: &mut Vec<usize>| {
            list.sort_by_key(|&i| (std::cmp::Reverse(routes[i].conditions()), i))
        };
        for t in exact_hosts
            .values_mut()
            .chain(suffixes.iter_mut().map(|(_, t)| t))
            .chain(std::iter::once(&mut any_host))
        {
            t.exact.values_mut().for_each(order);
            t.prefixes.values_mut().for_each(order);
            t.prefix_lengths.sort_by_key(|&l| std::cmp::Reverse(l));
        }
        suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        RouteTable {
            routes,
            default: Arc::new(default),
            exact_hosts,
            suffixes,
            any_host,
        }
    }
}

/// Host names as routes compare them: lower case, no port, no trailing dot; borrowed when
/// the name is already lower case (no allocation on the request path). One pass over the
/// bytes: this runs for every request when routes exist.
pub fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let b = host.as_bytes();
    let mut end = b.len();
    if b.first() == Some(&b'[') {
        // An IPv6 literal, with or without a port.
        end = b.iter().position(|&c| c == b']').map_or(end, |i| i + 1);
    } else {
        let mut i = end;
        while i > 0 && b[i - 1].is_ascii_digit() {
            i -= 1;
        }
        if i > 0 && b[i - 1] == b':' {
            end = i - 1;
        }
    }
    while end > 0 && b[end - 1] == b'.' {
        end -= 1;
    }
    // Cut at ASCII bytes only: `end` is a char boundary.
    let host = &host[..end];
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// FNV-1a for the route table's maps: their keys come from the config, so a client cannot
/// choose colliding keys, and for short host names and paths it is several times cheaper
/// per probe than the default SipHash.
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let h = if self.0 == 0 {
            super::FNV_OFFSET
        } else {
            self.0
        };
        self.0 = super::fnv(h, bytes);
    }
}

/// A map keyed by config strings, probed on the request path.
pub type FastMap<V> = HashMap<String, V, std::hash::BuildHasherDefault<Fnv>>;

/// A header name (an RFC 9110 token), as written.
fn token(key: &str, name: &str) -> Result<String, String> {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(tchar) {
        return Err(format!("{key}: {name:?} is not a header name"));
    }
    Ok(name.to_string())
}

/// A header a route may edit: a token, not one the gateway writes itself.
fn header_name(key: &str, name: &str) -> Result<String, String> {
    let name = token(key, name)?;
    if crate::policy::headers::gateway_owned(name.as_bytes()) {
        return Err(format!("{key}: {name} is the gateway's own header"));
    }
    Ok(name)
}

fn header_value(key: &str, value: &str) -> Result<(), String> {
    if value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        Ok(())
    } else {
        Err(format!("{key}: {value:?} has a control or non-ASCII byte"))
    }
}

/// What `pools_and_routes` inherits: `upstream:`'s settings and health check, and
/// `buffers.max_body_bytes`.
pub struct Inherited<'a> {
    pub settings: &'a PoolSettings,
    pub health: &'a HealthSettings,
    pub max_body_bytes: usize,
}

/// Validate `upstreams:` and `routes:` and compile the routes; `convert` turns a backend
/// list into specs (the same rules as `upstream.backends`).
pub fn pools_and_routes(
    pools: BTreeMap<String, FilePool>,
    routes: Vec<FileRoute>,
    inherited: Inherited,
    convert: impl Fn(NonEmpty<FileBackend>, &str) -> Result<Vec<BackendSpec>, String>,
    health: impl Fn(FileHealthCheck, &str) -> Result<HealthSettings, String>,
) -> Result<(Vec<PoolSpec>, RouteTable), String> {
    let mut specs = Vec::new();
    for (name, p) in pools {
        if name == "default" || name == "-" || name.is_empty() {
            return Err(format!(
                "upstreams.{name}: the name is taken (`upstream:` is the pool `default`)"
            ));
        }
        let key = format!("upstreams.{name}");
        let mut settings = inherited.settings.for_pool(&p);
        if let Some(t) = &p.tls {
            settings.tls = Some(t.build(&format!("{key}.tls"))?);
        }
        specs.push(PoolSpec {
            settings,
            backends: convert(p.backends, &format!("{key}.backends"))?,
            health: match p.health_check {
                Some(h) => health(h, &format!("{key}.health_check"))?,
                None => inherited.health.clone(),
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
                _ => HostMatch::Exact(normalize_host(h).into_owned()),
            },
        };
        let path = r.path.unwrap_or_else(|| "/".into());
        if !path.starts_with('/') {
            return Err(format!("{key}.path: {path:?} must start with '/'"));
        }
        let (target, settings) = match (r.pool, r.answer) {
            (Some(pool), None) => {
                let base = if pool == "default" {
                    inherited.settings
                } else {
                    match specs.iter().find(|p| p.name == pool) {
                        Some(p) => &p.settings,
                        None => {
                            return Err(format!(
                            "{key}.pool: no pool named {pool:?} (under `upstreams:`, or `default`)"
                        ))
                        }
                    }
                };
                (RouteTarget::Pool(pool), base.with(&r.timeouts, &r.retries))
            }
            (None, Some(a)) => {
                if !(200..=599).contains(&a.status) {
                    return Err(format!("{key}.answer.status: {} is not 200-599", a.status));
                }
                let answer = RouteTarget::Answer {
                    status: a.status,
                    message: a.message,
                };
                (answer, inherited.settings.clone())
            }
            _ => return Err(format!("{key}: give exactly one of `pool` and `answer`")),
        };
        let replace_prefix = match (r.strip_prefix, r.replace_prefix) {
            (true, Some(_)) => {
                return Err(format!(
                    "{key}: give at most one of `strip_prefix` and `replace_prefix`"
                ))
            }
            (true, None) => Some(String::new()),
            (false, Some(p)) if !p.starts_with('/') => {
                return Err(format!("{key}.replace_prefix: {p:?} must start with '/'"))
            }
            (false, p) => p,
        };
        let mut methods = Vec::new();
        for m in r.methods {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!("{key}.methods: {m:?} is not an upper-case method"));
            }
            methods.push(m);
        }
        methods.sort();
        methods.dedup();
        let header = match r.header {
            None => None,
            Some(h) => {
                let name = token(&format!("{key}.header.name"), &h.name)?;
                if let Some(v) = &h.value {
                    header_value(&format!("{key}.header.value"), v)?;
                }
                Some((name.to_ascii_lowercase(), h.value))
            }
        };
        let mut set_headers = Vec::new();
        for (name, value) in r.request_headers.set {
            let k = format!("{key}.request_headers.set");
            header_value(&k, &value)?;
            set_headers.push((header_name(&k, &name)?, value));
        }
        let mut remove_headers = Vec::new();
        for name in r.request_headers.remove {
            remove_headers.push(header_name(
                &format!("{key}.request_headers.remove"),
                &name,
            )?);
        }
        let name = r.name.unwrap_or_else(|| key.clone());
        if name == "-" || name.is_empty() || name.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(format!("{key}.name: {name:?}: visible ASCII, not `-`"));
        }
        if let Some(j) = out.iter().position(|o| o.name == name) {
            return Err(format!("{key}.name: {name:?} is routes[{j}]'s name too"));
        }
        let route = Route {
            index: i,
            name,
            host,
            path,
            exact: r.exact,
            methods,
            header,
            target,
            replace_prefix,
            limit: r.limit.as_ref().map(RateSpec::from),
            max_body_bytes: r.max_body_bytes.unwrap_or(inherited.max_body_bytes),
            set_headers,
            remove_headers,
            settings,
            series: Default::default(),
        };
        // Under "most specific wins, ties in file order", a later route is never chosen
        // exactly when an earlier one has the same matchers.
        if let Some(j) = out.iter().position(|o| {
            o.host == route.host
                && o.path == route.path
                && o.exact == route.exact
                && o.methods == route.methods
                && o.header == route.header
        }) {
            return Err(format!(
                "{key}: the same matchers as routes[{j}]: it could never be chosen"
            ));
        }
        out.push(route);
    }
    let default = Route {
        index: usize::MAX,
        name: "-".into(),
        host: HostMatch::Any,
        path: "/".into(),
        exact: false,
        methods: Vec::new(),
        header: None,
        target: RouteTarget::Pool("default".into()),
        replace_prefix: None,
        limit: None,
        max_body_bytes: inherited.max_body_bytes,
        set_headers: Vec::new(),
        remove_headers: Vec::new(),
        settings: inherited.settings.clone(),
        series: Default::default(),
    };
    Ok((specs, RouteTable::compile(out, default)))
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
