//! Which header names the gateway owns, in one place: what is never passed on (hop-by-hop,
//! framing the gateway writes again), what the gateway writes itself for the backend
//! (forwarding, request id), and so what a route may not set or remove.

/// Hop-by-hop headers (RFC 9110 §7.6.1, and the old `Keep-Alive` and `Proxy-Connection`):
/// they describe one connection and are passed on in neither direction, nor are the names a
/// `Connection` header lists. `Transfer-Encoding` is one too, but it is framing: each
/// direction handles it on its own.
pub const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// The request headers the gateway writes for the backend itself ([`super::identity`]).
pub const FORWARDING: [&str; 4] = [
    "x-forwarded-for",
    "x-real-ip",
    "x-forwarded-proto",
    "x-request-id",
];

fn one_of(name: &[u8], list: &[&str]) -> bool {
    list.iter().any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

pub fn hop_by_hop(name: &[u8]) -> bool {
    one_of(name, &HOP_BY_HOP)
}

/// A client's request header that is not sent on as it came: hop-by-hop, or framing the
/// gateway writes again (`Transfer-Encoding`, `Content-Length`; `Expect`, which the gateway
/// answers itself).
pub fn not_forwarded(name: &[u8]) -> bool {
    hop_by_hop(name)
        || name.eq_ignore_ascii_case(b"transfer-encoding")
        || name.eq_ignore_ascii_case(b"content-length")
        || name.eq_ignore_ascii_case(b"expect")
}

/// Request headers the backend never gets from the client: the ones the gateway sets itself
/// ([`FORWARDING`]), and every name with an underscore (nginx's `underscores_in_headers
/// off`: some frameworks map `X_Real_IP` onto `X-Real-IP`, which would let a client choose
/// it).
pub fn replaced_by_gateway(name: &[u8]) -> bool {
    name.contains(&b'_') || one_of(name, &FORWARDING)
}

/// A name a route's `request_headers` may not set or remove: everything above, and
/// `X-Forwarded-Host` (the Host the client sent, which routing already used).
pub fn gateway_owned(name: &[u8]) -> bool {
    not_forwarded(name)
        || replaced_by_gateway(name)
        || name.eq_ignore_ascii_case(b"x-forwarded-host")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateways_headers() {
        assert!(replaced_by_gateway(b"X-Real-IP"));
        assert!(replaced_by_gateway(b"X_Real_IP"));
        assert!(replaced_by_gateway(b"x_forwarded_for"));
        assert!(!replaced_by_gateway(b"X-Custom"));
        for n in [
            "Connection",
            "TE",
            "Transfer-Encoding",
            "Content-Length",
            "Expect",
        ] {
            assert!(
                not_forwarded(n.as_bytes()) && gateway_owned(n.as_bytes()),
                "{n}"
            );
        }
        assert!(!hop_by_hop(b"transfer-encoding"));
        assert!(gateway_owned(b"X-Forwarded-Host") && gateway_owned(b"x-request-id"));
        assert!(!gateway_owned(b"X-Canary"));
    }
}
