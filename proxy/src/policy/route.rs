//! Which route a request takes (`routes:`), by its `Host` and its normalised path
//! ([`super::path::normalize`]). The most specific match wins, as nginx picks a `server` and
//! then a `location`: first the host (an exact name, then the longest `*.` suffix, then any
//! host), then the path (an exact path, then the longest prefix); equal ones in file order.
//! Hosts compare in lower case without port or trailing dot; paths case-sensitively.

use crate::config::{normalize_host, HostMatch, Route};

/// How specific a match is, compared as a tuple: bigger is more specific (host kind, host
/// length, exact path, path length).
type Rank = (u8, usize, u8, usize);

fn rank(route: &Route, host: &str, path: &str) -> Option<Rank> {
    let host_rank = match &route.host {
        HostMatch::Exact(h) if h == host => (2, h.len()),
        HostMatch::Suffix(s) if host.ends_with(s.as_str()) && host.len() > s.len() => (1, s.len()),
        HostMatch::Any => (0, 0),
        _ => return None,
    };
    let path_rank = if route.exact {
        if path != route.path {
            return None;
        }
        (1, route.path.len())
    } else {
        if !path.starts_with(route.path.as_str()) {
            return None;
        }
        (0, route.path.len())
    };
    Some((host_rank.0, host_rank.1, path_rank.0, path_rank.1))
}

/// The route for a request; None when none matches (404 `no_route` when routes exist).
pub fn choose<'a>(routes: &'a [Route], host: Option<&[u8]>, path: &str) -> Option<&'a Route> {
    let host = host
        .and_then(|h| std::str::from_utf8(h).ok())
        .map(|h| normalize_host(h.trim()))
        .unwrap_or_default();
    let mut best: Option<(&Route, Rank)> = None;
    for r in routes {
        if let Some(k) = rank(r, &host, path) {
            // Strictly more specific only: ties stay with the earlier route.
            if best.is_none_or(|(_, b)| k > b) {
                best = Some((r, k));
            }
        }
    }
    best.map(|(r, _)| r)
}

/// What a request's route says.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed<'a> {
    /// Proxy it to this pool, with this target (the client's, or with the prefix stripped).
    Pool {
        pool: &'a str,
        target: std::borrow::Cow<'a, [u8]>,
    },
    /// Answer it with this status and message (a route's fixed answer).
    Answer { status: u16, message: &'a str },
    /// Routes exist and none matches: 404 `no_route`.
    NoRoute,
}

/// The decision for a request: with no `routes:` every request goes to `default`.
pub fn decide<'a>(routes: &'a [Route], host: Option<&[u8]>, target: &'a [u8]) -> Routed<'a> {
    use crate::config::RouteTarget;
    if routes.is_empty() {
        return Routed::Pool {
            pool: "default",
            target: std::borrow::Cow::Borrowed(target),
        };
    }
    let text = std::str::from_utf8(target).unwrap_or("/");
    let path = super::path::normalize(text);
    let Some(route) = choose(routes, host, &path) else {
        return Routed::NoRoute;
    };
    match &route.target {
        RouteTarget::Answer { status, message } => Routed::Answer {
            status: *status,
            message,
        },
        RouteTarget::Pool(pool) => {
            let target = if !route.strip_prefix {
                std::borrow::Cow::Borrowed(target)
            } else if target.starts_with(route.path.as_bytes()) {
                std::borrow::Cow::Owned(strip(target, &route.path))
            } else {
                // Matched through normalisation: strip from the normalised path.
                let query = text.find('?').map_or("", |i| &text[i..]);
                let mut normal = path.into_owned().into_bytes();
                normal.extend_from_slice(query.as_bytes());
                std::borrow::Cow::Owned(strip(&normal, &route.path))
            };
            Routed::Pool { pool, target }
        }
    }
}

/// The target with a route's prefix removed (`strip_prefix`), as the pool gets it; always
/// starts with `/`.
pub fn strip(target: &[u8], prefix: &str) -> Vec<u8> {
    let rest = target
        .strip_prefix(prefix.trim_end_matches('/').as_bytes())
        .unwrap_or(target);
    if rest.first() == Some(&b'/') {
        rest.to_vec()
    } else {
        let mut out = Vec::with_capacity(rest.len() + 1);
        out.push(b'/');
        out.extend_from_slice(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;

    fn routes(yaml: &str) -> Vec<Route> {
        GatewayConfig::parse(&format!(
            "upstream:\n  backends: [\"127.0.0.1:9\"]\nupstreams:\n  api: {{backends: [\"127.0.0.1:10\"]}}\n  web: {{backends: [\"127.0.0.1:11\"]}}\nroutes:\n{yaml}"
        ))
        .unwrap()
        .routes
    }

    fn name(r: &[Route], host: &str, path: &str) -> Option<String> {
        choose(r, Some(host.as_bytes()), path).map(|r| r.name.clone())
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
        assert!(bad("  - {path: /a}\n").contains("exactly one"));
        assert!(bad("  - {path: a, pool: default}\n").contains("must start with"));
    }

    #[test]
    fn decisions_with_strip_answer_and_no_route() {
        let r = routes(
            "  - {path: /api/, pool: api, strip_prefix: true}\n  - {path: /old, answer: {status: 410, message: gone}}\n",
        );
        let d = |t: &'static str| decide(&r, Some(b"h"), t.as_bytes());
        assert_eq!(
            d("/api/items?x=1"),
            Routed::Pool {
                pool: "api",
                target: std::borrow::Cow::Borrowed(&b"/items?x=1"[..])
            }
        );
        assert_eq!(
            d("//api/../api/items"),
            Routed::Pool {
                pool: "api",
                target: std::borrow::Cow::Borrowed(&b"/items"[..])
            }
        );
        assert_eq!(
            d("/old"),
            Routed::Answer {
                status: 410,
                message: "gone"
            }
        );
        assert_eq!(d("/other"), Routed::NoRoute);
        assert_eq!(
            decide(&[], None, b"/x"),
            Routed::Pool {
                pool: "default",
                target: std::borrow::Cow::Borrowed(&b"/x"[..])
            }
        );
    }

    #[test]
    fn prefixes_are_stripped_to_a_path() {
        assert_eq!(strip(b"/api/items?x=1", "/api/"), b"/items?x=1");
        assert_eq!(strip(b"/api", "/api/"), b"/");
        assert_eq!(strip(b"/apix", "/api"), b"/x");
        assert_eq!(strip(b"/other", "/api/"), b"/other");
    }
}
