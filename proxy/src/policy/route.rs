//! Which route a request takes (`routes:`), by its `Host` and its normalised path
//! ([`super::path::normalize`]). The most specific match wins, as nginx picks a `server` and
//! then a `location`: first the host (an exact name, then the longest `*.` suffix, then any
//! host), then the path (an exact path, then the longest prefix), then the conditions (a
//! route with `methods` or `header` before one without); equal ones in file order. A host
//! kind with no matching route falls through to the next (an exact host's table, then the
//! suffixes', then any host's). Hosts compare in lower case without port or trailing dot;
//! paths case-sensitively. The lookup is a few hash probes per host kind (one per distinct
//! prefix length), whatever the number of routes.

use std::borrow::Cow;
use std::sync::Arc;

use crate::config::{normalize_host, PathTable, Route, RouteTable, RouteTarget};
use crate::policy::Rejection;

/// `Location` of a plaintext request's redirect to HTTPS (`listen[].redirect_https`): the
/// request's host without its port, then `port` unless it is 443, then the target as
/// received. A request without a usable Host (HTTP/1.0 may omit it) has nowhere to be sent:
/// `invalid_host`; a byte a header value must not carry (the checks before refuse those
/// anyway): `invalid_target`.
pub fn https_location(host: Option<&[u8]>, target: &[u8], port: u16) -> Result<String, Rejection> {
    let host = host.map(<[u8]>::trim_ascii).unwrap_or_default();
    let name = match host.first() {
        Some(b'[') => host
            .iter()
            .position(|&b| b == b']')
            .map_or(host, |end| &host[..=end]),
        _ => host.split(|&b| b == b':').next().unwrap_or_default(),
    };
    let visible = |v: &[u8]| v.iter().all(|b| (0x21..0x7f).contains(b));
    if name.is_empty() || !visible(name) {
        return Err(Rejection::InvalidHost);
    }
    if !target.starts_with(b"/") || !visible(target) {
        return Err(Rejection::InvalidTarget);
    }
    let mut out = String::with_capacity(16 + name.len() + target.len());
    out.push_str("https://");
    out.push_str(std::str::from_utf8(name).map_err(|_| Rejection::InvalidHost)?);
    if port != 443 {
        out.push(':');
        out.push_str(&port.to_string());
    }
    out.push_str(std::str::from_utf8(target).map_err(|_| Rejection::InvalidTarget)?);
    Ok(out)
}

/// In one host kind's table: an exact path, then the longest prefix; per path, the first
/// route (more conditions first, then file order) whose method and header conditions hold.
fn in_table<'t, 'h>(
    table: &PathTable,
    routes: &'t [Arc<Route>],
    path: &str,
    method: &[u8],
    header: &impl Fn(&str) -> Option<&'h [u8]>,
) -> Option<&'t Arc<Route>> {
    let first = |list: &Vec<usize>| {
        list.iter()
            .map(|&i| &routes[i])
            .find(|r| r.accepts(method, header))
    };
    if let Some(r) = table.exact.get(path).and_then(first) {
        return Some(r);
    }
    // Past `/`, only prefixes that share the path's second byte can match.
    let second = path.as_bytes().get(1).copied();
    let may = |len: usize| {
        len <= 1
            || second
                .is_some_and(|b| table.second_bytes[usize::from(b >> 6)] & (1 << (b & 63)) != 0)
    };
    for &len in &table.prefix_lengths {
        if !may(len) {
            continue;
        }
        if let Some(prefix) = path.get(..len) {
            if let Some(r) = table.prefixes.get(prefix).and_then(first) {
                return Some(r);
            }
        }
    }
    None
}

/// The route for a request; None when none matches (404 `no_route`). `header`: the first
/// value of a request header by lower-case name.
pub fn choose<'t, 'h>(
    table: &'t RouteTable,
    host: Option<&[u8]>,
    path: &str,
    method: &[u8],
    header: &impl Fn(&str) -> Option<&'h [u8]>,
) -> Option<&'t Arc<Route>> {
    let host = host
        .and_then(|h| std::str::from_utf8(h.trim_ascii()).ok())
        .map(normalize_host)
        .unwrap_or_default();
    let host: &str = &host;
    let routes = &table.routes;
    if let Some(r) = table
        .exact_hosts
        .get(host)
        .and_then(|t| in_table(t, routes, path, method, header))
    {
        return Some(r);
    }
    for (suffix, t) in &table.suffixes {
        if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
            if let Some(r) = in_table(t, routes, path, method, header) {
                return Some(r);
            }
        }
    }
    in_table(&table.any_host, routes, path, method, header)
}

/// What a request's route says.
#[derive(Debug, PartialEq)]
pub enum Routed<'a> {
    /// Proxy it through this route, with this target (the client's, or rewritten).
    Pool {
        route: &'a Arc<Route>,
        target: Cow<'a, [u8]>,
    },
    /// Answer it with this status and message (a route's fixed answer).
    Answer {
        route: &'a Arc<Route>,
        status: u16,
        message: &'a str,
    },
    /// Routes exist and none matches: 404 `no_route`.
    NoRoute,
}

/// The decision for a request: with no `routes:` every request takes the default route.
pub fn decide<'a, 'h>(
    table: &'a RouteTable,
    host: Option<&[u8]>,
    method: &[u8],
    target: &'a [u8],
    header: &impl Fn(&str) -> Option<&'h [u8]>,
) -> Routed<'a> {
    if table.is_empty() {
        return Routed::Pool {
            route: &table.default,
            target: Cow::Borrowed(target),
        };
    }
    let text = std::str::from_utf8(target).unwrap_or("/");
    let path = super::path::normalize(text);
    let Some(route) = choose(table, host, &path, method, header) else {
        return Routed::NoRoute;
    };
    match &route.target {
        RouteTarget::Answer { status, message } => Routed::Answer {
            route,
            status: *status,
            message,
        },
        RouteTarget::Pool(_) => {
            let target = match &route.replace_prefix {
                None => Cow::Borrowed(target),
                Some(with) if target.starts_with(route.path.as_bytes()) => {
                    Cow::Owned(rewrite(target, &route.path, with))
                }
                Some(with) => {
                    // Matched through normalisation: rewrite the normalised path.
                    let query = text.find('?').map_or("", |i| &text[i..]);
                    let mut normal = path.into_owned().into_bytes();
                    normal.extend_from_slice(query.as_bytes());
                    Cow::Owned(rewrite(&normal, &route.path, with))
                }
            };
            Routed::Pool { route, target }
        }
    }
}

/// The target with a route's prefix replaced by `with` (`""`: `strip_prefix`), as the pool
/// gets it; always starts with `/`.
pub fn rewrite(target: &[u8], prefix: &str, with: &str) -> Vec<u8> {
    let rest = target
        .strip_prefix(prefix.trim_end_matches('/').as_bytes())
        .unwrap_or(target);
    let with = with.trim_end_matches('/');
    let mut out = Vec::with_capacity(with.len() + rest.len() + 1);
    out.extend_from_slice(with.as_bytes());
    if rest.first() != Some(&b'/') {
        out.push(b'/');
    }
    out.extend_from_slice(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;

    fn routes(yaml: &str) -> RouteTable {
        GatewayConfig::parse(&format!(
            "upstream:\n  backends: [\"127.0.0.1:9\"]\nupstreams:\n  api: {{backends: [\"127.0.0.1:10\"]}}\n  web: {{backends: [\"127.0.0.1:11\"]}}\nroutes:\n{yaml}"
        ))
        .unwrap()
        .routes
    }

    fn no_headers(_: &str) -> Option<&'static [u8]> {
        None
    }

    fn name(r: &RouteTable, host: &str, path: &str) -> Option<String> {
        choose(r, Some(host.as_bytes()), path, b"GET", &no_headers).map(|r| r.name.clone())
    }

    /// The reference rule, as a scan: the greatest (host kind, host length, exact path,
    /// path length, conditions), ties to the earlier route.
    fn by_scan(
        t: &RouteTable,
        host: &str,
        path: &str,
        method: &[u8],
        hv: Option<&[u8]>,
    ) -> Option<usize> {
        use crate::config::HostMatch;
        let host = normalize_host(host).into_owned();
        let header = |_: &str| hv;
        // (route, (host kind, host length, exact path, path length, conditions))
        type Ranked = (usize, (u8, usize, u8, usize, usize));
        let mut best: Option<Ranked> = None;
        for r in &t.routes {
            let h = match &r.host {
                HostMatch::Exact(h) if *h == host => (2, h.len()),
                HostMatch::Suffix(s) if host.ends_with(s.as_str()) && host.len() > s.len() => {
                    (1, s.len())
                }
                HostMatch::Any => (0, 0),
                _ => continue,
            };
            let p = if r.exact {
                if path != r.path {
                    continue;
                }
                (1, r.path.len())
            } else {
                if !path.starts_with(r.path.as_str()) {
                    continue;
                }
                (0, r.path.len())
            };
            if !r.accepts(method, &header) {
                continue;
            }
            let k = (h.0, h.1, p.0, p.1, r.conditions());
            if best.is_none_or(|(_, b)| k > b) {
                best = Some((r.index, k));
            }
        }
        best.map(|(i, _)| i)
    }

    #[test]
    fn the_most_specific_route_wins_then_file_order() {
        let r = routes(
            "  - {path: /, pool: web}\n  - {path: /api/, pool: api}\n  - {host: \"*.example.com\", path: /, pool: web}\n  - {host: api.example.com, path: /, pool: api}\n  - {path: /api/v1, exact: true, answer: {status: 410, message: gone}}\n  - {path: /api/, host: \"*.example.com\", pool: api}\n",
        );
        assert_eq!(name(&r, "other.org", "/x").as_deref(), Some("routes[0]"));
        assert_eq!(
            name(&r, "other.org", "/api/x").as_deref(),
            Some("routes[1]")
        );
        assert_eq!(
            name(&r, "other.org", "/api/v1").as_deref(),
            Some("routes[4]")
        );
        assert_eq!(
            name(&r, "www.example.com", "/x").as_deref(),
            Some("routes[2]")
        );
        assert_eq!(
            name(&r, "www.example.com", "/api/x").as_deref(),
            Some("routes[5]")
        );
        // An exact host beats a wildcard, whatever the path's length.
        assert_eq!(
            name(&r, "API.example.com.:443", "/api/x").as_deref(),
            Some("routes[3]")
        );
        // `*.example.com` is not `example.com` itself.
        assert_eq!(name(&r, "example.com", "/x").as_deref(), Some("routes[0]"));
    }

    #[test]
    fn methods_and_headers_narrow_a_route() {
        let r = routes(
            "  - {path: /api/, pool: api}\n  - {name: writes, path: /api/, methods: [POST, PUT], pool: web}\n  - {name: canary, path: /api/, header: {name: X-Canary, value: \"1\"}, pool: web}\n",
        );
        let pick = |method: &[u8], canary: Option<&'static [u8]>| {
            let h = move |n: &str| if n == "x-canary" { canary } else { None };
            choose(&r, Some(b"h"), "/api/x", method, &h).map(|r| r.name.clone())
        };
        assert_eq!(pick(b"GET", None).as_deref(), Some("routes[0]"));
        assert_eq!(pick(b"POST", None).as_deref(), Some("writes"));
        assert_eq!(pick(b"GET", Some(b"1")).as_deref(), Some("canary"));
        assert_eq!(pick(b"GET", Some(b"2")).as_deref(), Some("routes[0]"));
        // Both conditions hold: the earlier of the two equally specific routes.
        assert_eq!(pick(b"POST", Some(b"1")).as_deref(), Some("writes"));
    }

    /// The compiled table chooses what the reference rule (a scan over every route) chooses,
    /// over random route sets and requests.
    #[test]
    fn the_table_agrees_with_the_rule_on_random_routes() {
        let (seed, mut next) = crate::policy::testing::seeded();
        let mut below = move |n: usize| (next() % n as u64) as usize;
        let hosts = [
            "a.example.com",
            "b.example.com",
            "*.example.com",
            "*.b.example.com",
            "*",
        ];
        let paths = ["/", "/a", "/a/", "/a/b", "/ab", "/b", "/a/b/c"];
        for round in 0..300 {
            let mut yaml = String::new();
            let n = 1 + below(12);
            for i in 0..n {
                let host = hosts[below(hosts.len())];
                let path = paths[below(paths.len())];
                let exact = below(4) == 0;
                let methods = if below(3) == 0 {
                    "methods: [POST], "
                } else {
                    ""
                };
                let header = if below(4) == 0 {
                    "header: {name: X-A}, "
                } else {
                    ""
                };
                yaml.push_str(&format!(
                    "  - {{name: r{i}, host: \"{host}\", path: {path}, exact: {exact}, {methods}{header}pool: api}}\n"
                ));
            }
            let Ok(cfg) = GatewayConfig::parse(&format!(
                "upstream:\n  backends: [\"127.0.0.1:9\"]\nupstreams:\n  api: {{backends: [\"127.0.0.1:10\"]}}\nroutes:\n{yaml}"
            )) else {
                continue; // two routes with the same matchers: refused, as it should be
            };
            let t = &cfg.routes;
            for _ in 0..20 {
                let host = [
                    "a.example.com",
                    "x.b.example.com",
                    "b.example.com",
                    "example.com",
                    "other",
                ][below(5)];
                let path = ["/", "/a", "/a/", "/a/b", "/a/bc", "/ab", "/b/x", "/a/b/c/d"][below(8)];
                let method: &[u8] = if below(2) == 0 { b"GET" } else { b"POST" };
                let hv: Option<&[u8]> = if below(2) == 0 { Some(b"1") } else { None };
                let header = |_: &str| hv;
                let got = choose(t, Some(host.as_bytes()), path, method, &header).map(|r| r.index);
                assert_eq!(
                    got,
                    by_scan(t, host, path, method, hv),
                    "seed {seed} round {round}: {host} {path}\n{yaml}"
                );
            }
        }
    }

    #[test]
    fn no_match_and_config_errors() {
        let r = routes("  - {host: a.example.com, pool: api}\n");
        assert_eq!(name(&r, "b.example.com", "/"), None);
        let bad = |yaml: &str| {
            GatewayConfig::parse(&format!(
                "upstream:\n  backends: [\"127.0.0.1:9\"]\nroutes:\n{yaml}"
            ))
            .unwrap_err()
        };
        assert!(
            bad("  - {path: /, pool: nope}\n").contains("no pool named"),
            "unknown pool"
        );
        assert!(
            bad("  - {path: /a, pool: default}\n  - {path: /a, pool: default}\n")
                .contains("never be chosen")
        );
        assert!(bad("  - {path: /a, methods: [GET, POST], pool: default}\n  - {path: /a, methods: [POST, GET], pool: default}\n")
            .contains("never be chosen"));
        assert!(bad("  - {path: /a}\n").contains("exactly one"));
        assert!(bad("  - {path: a, pool: default}\n").contains("must start with"));
        assert!(bad("  - {path: /a, methods: [get], pool: default}\n").contains("upper-case"));
        assert!(bad(
            "  - {path: /a, pool: default, request_headers: {set: {X-Forwarded-For: x}}}\n"
        )
        .contains("gateway's own"));
        assert!(
            bad("  - {path: /a, pool: default, request_headers: {set: {X-A: \"a\\nb\"}}}\n")
                .contains("control")
        );
        assert!(
            bad("  - {path: /a, pool: default, strip_prefix: true, replace_prefix: /b}\n")
                .contains("at most one")
        );
        assert!(bad(
            "  - {name: x, path: /a, pool: default}\n  - {name: x, path: /b, pool: default}\n"
        )
        .contains("name"));
    }

    #[test]
    fn decisions_with_rewrite_answer_and_no_route() {
        let r = routes(
            "  - {path: /api/, pool: api, strip_prefix: true}\n  - {path: /old, answer: {status: 410, message: gone}}\n  - {path: /v1/, pool: api, replace_prefix: /v2/}\n",
        );
        let d = |t: &'static str| match decide(&r, Some(b"h"), b"GET", t.as_bytes(), &no_headers) {
            Routed::Pool { route, target } => {
                format!("{} {}", route.pool_name(), String::from_utf8_lossy(&target))
            }
            Routed::Answer {
                status, message, ..
            } => format!("{status} {message}"),
            Routed::NoRoute => "none".into(),
        };
        assert_eq!(d("/api/items?x=1"), "api /items?x=1");
        assert_eq!(d("//api/../api/items"), "api /items");
        assert_eq!(d("/v1/items?x=1"), "api /v2/items?x=1");
        assert_eq!(d("/old"), "410 gone");
        assert_eq!(d("/other"), "none");
        let empty = routes("  - {path: /, pool: default}\n");
        let none = GatewayConfig::parse("upstream:\n  backends: [\"127.0.0.1:9\"]\n")
            .unwrap()
            .routes;
        assert!(
            matches!(decide(&none, None, b"GET", b"/x", &no_headers), Routed::Pool { route, .. } if route.name == "-")
        );
        assert!(
            matches!(decide(&empty, None, b"GET", b"/x", &no_headers), Routed::Pool { route, .. } if route.name == "routes[0]")
        );
    }

    #[test]
    fn prefixes_are_rewritten_to_a_path() {
        assert_eq!(rewrite(b"/api/items?x=1", "/api/", ""), b"/items?x=1");
        assert_eq!(rewrite(b"/api", "/api/", ""), b"/");
        assert_eq!(rewrite(b"/apix", "/api", ""), b"/x");
        assert_eq!(rewrite(b"/other", "/api/", ""), b"/other");
        assert_eq!(rewrite(b"/api/items", "/api/", "/v2/"), b"/v2/items");
        assert_eq!(rewrite(b"/api", "/api", "/v2"), b"/v2/");
    }

    #[test]
    fn redirects_to_https_name_the_host_without_its_port() {
        let loc =
            |h: Option<&str>, t: &str, p| https_location(h.map(str::as_bytes), t.as_bytes(), p);
        assert_eq!(
            loc(Some("api.test:8080"), "/a?b=1", 443).unwrap(),
            "https://api.test/a?b=1"
        );
        assert_eq!(
            loc(Some("api.test"), "/", 8443).unwrap(),
            "https://api.test:8443/"
        );
        assert_eq!(
            loc(Some("[::1]:80"), "/x", 8443).unwrap(),
            "https://[::1]:8443/x"
        );
        assert_eq!(loc(None, "/", 443), Err(Rejection::InvalidHost));
        assert_eq!(loc(Some(":80"), "/", 443), Err(Rejection::InvalidHost));
        assert_eq!(loc(Some("a b"), "/", 443), Err(Rejection::InvalidHost));
        assert_eq!(
            loc(Some("a"), "/x\r\nSet-Cookie: y", 443),
            Err(Rejection::InvalidTarget)
        );
        assert_eq!(loc(Some("a"), "*", 443), Err(Rejection::InvalidTarget));
    }
}
