//! What `balance: hash` keys a request on (`upstream.hash_key`): the client's address as the
//! policy knows it, a header's value, or a cookie's. None when the algorithm is another one,
//! or the request has no such header or cookie (it is then balanced round robin).

use std::net::IpAddr;

use crate::config::{Balance, HashKey, PoolSettings};

/// The key, from the client address and the request's header lines (name, value).
pub fn key<'a>(
    cfg: &PoolSettings,
    client: Option<IpAddr>,
    mut headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Option<Vec<u8>> {
    if cfg.balance.algorithm != Balance::Hash {
        return None;
    }
    match &cfg.hash_key {
        HashKey::ClientIp => client.map(|ip| ip.to_string().into_bytes()),
        HashKey::Header(name) => headers
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.to_vec()),
        HashKey::Cookie(name) => headers
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"cookie"))
            .flat_map(|(_, v)| v.split(|&b| b == b';'))
            .find_map(|pair| {
                let pair = pair.trim_ascii();
                let (n, v) = pair.split_at(pair.iter().position(|&b| b == b'=')?);
                (n == name.as_bytes()).then(|| v[1..].to_vec())
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;

    fn cfg(key: &str) -> GatewayConfig {
        GatewayConfig::parse(&format!(
            "upstream:\n  backends: [\"127.0.0.1:9\"]\n  balance: hash\n  hash_key: \"{key}\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn keys_from_the_client_a_header_or_a_cookie() {
        let h: Vec<(&[u8], &[u8])> =
            vec![(b"X-User", b"alice"), (b"Cookie", b"a=1; session=s3; b=2")];
        let ip = Some("192.0.2.7".parse().unwrap());
        assert_eq!(
            key(cfg("client_ip").upstream(), ip, h.iter().copied()),
            Some(b"192.0.2.7".to_vec())
        );
        assert_eq!(
            key(cfg("header:x-user").upstream(), ip, h.iter().copied()),
            Some(b"alice".to_vec())
        );
        assert_eq!(
            key(cfg("cookie:session").upstream(), ip, h.iter().copied()),
            Some(b"s3".to_vec())
        );
        assert_eq!(
            key(cfg("cookie:none").upstream(), ip, h.iter().copied()),
            None
        );
        assert!(GatewayConfig::parse(
            "upstream:\n  backends: [\"127.0.0.1:9\"]\n  hash_key: \"body\"\n"
        )
        .is_err());
        // Another algorithm: no key.
        let rr = GatewayConfig::parse("upstream:\n  backends: [\"127.0.0.1:9\"]\n").unwrap();
        assert_eq!(key(rr.upstream(), ip, h.iter().copied()), None);
    }
}
