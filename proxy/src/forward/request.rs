//! The request a backend gets, as bytes, whatever engine read it: the client's method,
//! target and end-to-end headers as they came, the gateway's forwarding headers and request
//! id, and the whole body with its `Content-Length` (bodies are buffered before a backend
//! is chosen, so a chunked body goes on as a length-delimited one, as nginx sends it).

use std::ops::Range;

use crate::config::Route;
use crate::policy::headers::{not_forwarded, replaced_by_gateway};

/// Writes the upstream request head into `out` (the caller appends the body); returns where
/// the request id is in it. `connection`: the values of the client's `Connection` headers
/// (the names they list are hop-by-hop too). `route`: its header edits (`request_headers`).
/// `body_len`: None when the request had no body framing at all.
#[allow(clippy::too_many_arguments)]
pub fn write_upstream_request<'a>(
    out: &mut Vec<u8>,
    method: &[u8],
    target: &[u8],
    route: &Route,
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    connection: &[&[u8]],
    forwarding: impl FnOnce(&mut Vec<u8>),
    request_id: &[u8],
    body_len: Option<usize>,
) -> Range<usize> {
    out.clear();
    out.extend_from_slice(method);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let listed = |name: &[u8]| {
        connection.iter().any(|v| {
            v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
        })
    };
    let edits = !route.set_headers.is_empty() || !route.remove_headers.is_empty();
    for (name, value) in headers {
        if not_forwarded(name)
            || replaced_by_gateway(name)
            || (!connection.is_empty() && listed(name))
            || (edits && route.edits_header(name))
        {
            continue;
        }
        push(out, name, value);
    }
    for (name, value) in &route.set_headers {
        push(out, name.as_bytes(), value.as_bytes());
    }
    forwarding(out);
    out.extend_from_slice(b"X-Request-Id: ");
    let start = out.len();
    out.extend_from_slice(request_id);
    let id = start..out.len();
    out.extend_from_slice(b"\r\n");
    if let Some(n) = body_len {
        out.extend_from_slice(b"Content-Length: ");
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    id
}

fn push(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::identity::Forwarding;

    #[test]
    fn the_upstream_request() {
        let peer = "10.0.0.2".parse().unwrap();
        let client = "203.0.113.9".parse().unwrap();
        let f = Forwarding::new(
            peer,
            client,
            [&b"6.6.6.6"[..], b"203.0.113.9"].into_iter(),
            false,
        );
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b"Host", b"example.com"),
            (b"Connection", b"keep-alive, X-Secret"),
            (b"X-Secret", b"hop"),
            (b"X-Forwarded-For", b"6.6.6.6"),
            (b"X-Forwarded-For", b"203.0.113.9"),
            (b"X_Real_IP", b"1.1.1.1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"X-Ok", b"1"),
        ];
        let mut out = Vec::new();
        let id = write_upstream_request(
            &mut out,
            b"POST",
            b"/items?a=1",
            &crate::config::GatewayConfig::parse("upstream: {backends: [\"127.0.0.1:9\"]}")
                .unwrap()
                .routes
                .default,
            headers.into_iter(),
            &[b"keep-alive, X-Secret"],
            |out: &mut Vec<u8>| f.write(out),
            b"rid",
            Some(5),
        );
        out.extend_from_slice(b"hello");
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(
            text,
            "POST /items?a=1 HTTP/1.1\r\nHost: example.com\r\nX-Ok: 1\r\n\
             X-Forwarded-For: 6.6.6.6, 203.0.113.9, 10.0.0.2\r\nX-Real-IP: 203.0.113.9\r\n\
             X-Forwarded-Proto: http\r\nX-Request-Id: rid\r\nContent-Length: 5\r\n\r\nhello"
        );
        assert_eq!(&out[id], b"rid");
    }

    #[test]
    fn a_route_sets_and_removes_request_headers() {
        let cfg = crate::config::GatewayConfig::parse(
            "upstream: {backends: [\"127.0.0.1:9\"]}\nroutes:\n  - {path: /, pool: default, request_headers: {set: {Host: internal, X-Env: prod}, remove: [Cookie]}}\n",
        )
        .unwrap();
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b"host", b"public.example"),
            (b"cookie", b"a=1"),
            (b"X-ENV", b"spoofed"),
            (b"X-Ok", b"1"),
        ];
        let mut out = Vec::new();
        write_upstream_request(
            &mut out,
            b"GET",
            b"/",
            &cfg.routes.routes[0],
            headers.into_iter(),
            &[],
            |_: &mut Vec<u8>| {},
            b"rid",
            None,
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "GET / HTTP/1.1\r\nX-Ok: 1\r\nHost: internal\r\nX-Env: prod\r\nX-Request-Id: rid\r\n\r\n"
        );
    }
}
