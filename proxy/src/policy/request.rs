//! What a request head must be before anything else happens, for every engine: an
//! origin-form target, one valid `Host` (required on HTTP/1.1), framing that only one
//! reading exists for ([`framing::request_framing`]), no CONNECT. And what it asks of the
//! connection: whether it closes after this request, whether it is an upgrade.

use super::framing::{self, RequestBody};
use super::Rejection;

/// What the checks learned about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub body: RequestBody,
    /// GET, HEAD, PUT, DELETE, OPTIONS (RFC 9110 section 9.2.2): may be sent again.
    pub idempotent: bool,
    pub head: bool,
    /// The connection closes after this request: `Connection: close`, or HTTP/1.0 without
    /// `Connection: keep-alive` (nginx answers those with `Connection: close` too).
    pub close: bool,
    /// `Connection: upgrade` with an `Upgrade` header (WebSocket).
    pub upgrade: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
}

/// A `Host` value: a name (letters, digits, `-`, `.`, `_`), an IPv4 address or a bracketed
/// IPv6 literal, then optionally `:` and up to 5 digits. No user info, no spaces, one port.
pub fn valid_host(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(end) = v.iter().position(|&b| b == b']') else {
            return false;
        };
        let inside = &v[1..end];
        if inside.is_empty()
            || !inside
                .iter()
                .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
        {
            return false;
        }
        match &v[end + 1..] {
            [] => (&v[..0], None),
            [b':', port @ ..] => (&v[..0], Some(port)),
            _ => return false,
        }
    } else {
        match v.iter().position(|&b| b == b':') {
            Some(i) => (&v[..i], Some(&v[i + 1..])),
            None => (v, None),
        }
    };
    let host_ok = host.iter().all(|&b| HOST[b as usize]);
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    host_ok && port_ok
}

/// What is wrong with a request line, if anything: it must be `METHOD SP target SP
/// HTTP/1.0|1.1`, one space each, a token method (else `malformed_request`), and a target of
/// visible ASCII without `"`, `<`, `>` (else `invalid_target`).
pub fn request_line_problem(line: &[u8]) -> Option<Rejection> {
    // One pass per part, each byte checked in a table: this runs for every request.
    let version = line.len().checked_sub(8).map(|i| &line[i..]);
    let well_formed_end = matches!(version, Some(b"HTTP/1.1" | b"HTTP/1.0"))
        && line.len() > 9
        && line[line.len() - 9] == b' ';
    let method_len = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let method_ok = method_len > 0 && line[..method_len].iter().all(|&b| TOKEN[b as usize]);
    if !method_ok || !well_formed_end {
        return Some(Rejection::MalformedRequest);
    }
    // Between the method's space and the version's: one space each, a visible target.
    let target = &line[(method_len + 1).min(line.len() - 9)..line.len() - 9];
    (target.is_empty() || !target.iter().all(|&b| TARGET[b as usize]))
        .then_some(Rejection::InvalidTarget)
}

/// Bytes of a host name: letters, digits, `-`, `.`, `_`.
const HOST: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        i += 1;
    }
    t
};

/// Bytes of a token (RFC 9110 5.6.2): a method.
const TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        i += 1;
    }
    t
};

/// Bytes a target may hold: visible ASCII but `"`, `<`, `>` (the ones pingora would
/// percent-encode) and, so, no space: a space inside is an invalid target.
const TARGET: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_graphic() && !matches!(b, b'"' | b'<' | b'>');
        i += 1;
    }
    t
};

/// Whether `token` is listed in any of the `Connection` values.
pub fn connection_lists(connection: &[&[u8]], token: &[u8]) -> bool {
    connection.iter().any(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    })
}

/// Check a request head. `http10`: HTTP/1.0; `headers`: every header line in order.
pub fn check<'a>(
    http10: bool,
    method: &[u8],
    target: &[u8],
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
) -> Result<Facts, Rejection> {
    if method == b"CONNECT" {
        return Err(Rejection::ConnectMethod);
    }
    // Origin form only: `*`, authority form and absolute form are refused, and so is any
    // byte a parser could read two ways.
    if target.first() != Some(&b'/') || target.iter().any(|b| !b.is_ascii_graphic()) {
        return Err(Rejection::InvalidTarget);
    }
    let mut hosts = 0;
    let mut connection: [&[u8]; 4] = [b""; 4];
    let mut n_connection = 0;
    let mut has_upgrade = false;
    let mut expect_continue = false;
    for (name, value) in headers.clone() {
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            if hosts > 1 || !valid_host(value.trim_ascii()) {
                return Err(Rejection::InvalidHost);
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            if n_connection == connection.len() {
                return Err(Rejection::MalformedRequest);
            }
            connection[n_connection] = value;
            n_connection += 1;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            has_upgrade = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue |= value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }
    if hosts == 0 && !http10 {
        return Err(Rejection::InvalidHost);
    }
    let body = framing::request_framing(http10, headers)?;
    let connection = &connection[..n_connection];
    let close = if http10 {
        !connection_lists(connection, b"keep-alive")
    } else {
        connection_lists(connection, b"close")
    };
    Ok(Facts {
        body,
        idempotent: matches!(method, b"GET" | b"HEAD" | b"PUT" | b"DELETE" | b"OPTIONS"),
        head: method == b"HEAD",
        close,
        upgrade: has_upgrade && connection_lists(connection, b"upgrade"),
        expect_continue,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        http10: bool,
        method: &str,
        target: &str,
        h: &[(&str, &str)],
    ) -> Result<Facts, Rejection> {
        check(
            http10,
            method.as_bytes(),
            target.as_bytes(),
            h.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        )
    }

    #[test]
    fn targets_and_hosts() {
        let host = [("Host", "example.com")];
        assert!(run(false, "GET", "/a?b=c", &host).is_ok());
        for t in [
            "*",
            "example.com:443",
            "http://example.com/",
            "/a\0b",
            "/a\tb",
            "/a b",
        ] {
            assert_eq!(
                run(false, "GET", t, &host),
                Err(Rejection::InvalidTarget),
                "{t:?}"
            );
        }
        assert_eq!(
            run(false, "CONNECT", "/", &host),
            Err(Rejection::ConnectMethod)
        );
        for h in [
            "example.com",
            "example.com:8080",
            "127.0.0.1:80",
            "[::1]:80",
            "[::1]",
            "a_b.local",
            "",
        ] {
            assert!(run(false, "GET", "/", &[("Host", h)]).is_ok(), "{h}");
        }
        for h in [
            "pro be",
            "probe:80:81",
            "user@evil",
            "a/b",
            "[::1",
            "x:",
            "x:123456",
            "[zz]",
        ] {
            assert_eq!(
                run(false, "GET", "/", &[("Host", h)]),
                Err(Rejection::InvalidHost),
                "{h}"
            );
        }
        assert_eq!(run(false, "GET", "/", &[]), Err(Rejection::InvalidHost));
        assert_eq!(
            run(false, "GET", "/", &[("Host", "a"), ("Host", "a")]),
            Err(Rejection::InvalidHost)
        );
        // HTTP/1.0 may omit it.
        assert!(run(true, "GET", "/", &[]).is_ok());
    }

    #[test]
    fn connection_rules() {
        let f = run(true, "GET", "/", &[]).unwrap();
        assert!(f.close, "HTTP/1.0 closes unless asked");
        let f = run(true, "GET", "/", &[("Connection", "Keep-Alive")]).unwrap();
        assert!(!f.close);
        let f = run(
            false,
            "GET",
            "/",
            &[("Host", "a"), ("Connection", "keep-alive, close")],
        )
        .unwrap();
        assert!(f.close);
        let f = run(
            false,
            "GET",
            "/",
            &[
                ("Host", "a"),
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
            ],
        )
        .unwrap();
        assert!(f.upgrade && !f.close);
        let f = run(
            false,
            "POST",
            "/",
            &[
                ("Host", "a"),
                ("Expect", "100-continue"),
                ("Content-Length", "3"),
            ],
        )
        .unwrap();
        assert!(f.expect_continue && !f.idempotent && f.body == RequestBody::Length(3));
    }

    #[test]
    fn request_lines_are_strict() {
        assert_eq!(request_line_problem(b"GET /a?b=c HTTP/1.1"), None);
        assert_eq!(request_line_problem(b"OPTIONS * HTTP/1.1"), None);
        for bad in [
            &b"GET /a\0b HTTP/1.1"[..],
            b"GET /a b HTTP/1.1",
            b"GET /a\tb HTTP/1.1",
            b"GET /<x> HTTP/1.1",
            b"GET /\xc3\xa9 HTTP/1.1",
            b"GET  /a HTTP/1.1",
        ] {
            let got = request_line_problem(bad);
            let line = String::from_utf8_lossy(bad);
            assert_eq!(got, Some(Rejection::InvalidTarget), "{line:?}");
        }
        for bad in [
            &b"GET /a HTTP/2.0"[..],
            b"G(T /a HTTP/1.1",
            b"HELLO THERE",
            b"GET /a",
        ] {
            let got = request_line_problem(bad);
            let line = String::from_utf8_lossy(bad);
            assert_eq!(got, Some(Rejection::MalformedRequest), "{line:?}");
        }
    }
}
