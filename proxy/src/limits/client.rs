//! Who the client is. The socket peer, unless the peer is a trusted proxy: then the
//! right-most `X-Forwarded-For` address that is not itself a trusted proxy (nginx
//! `real_ip_recursive on`). A client talking to us directly cannot change its identity by
//! sending `X-Forwarded-For`.

use std::net::IpAddr;

use crate::config::Cidr;

/// The client address the limits apply to.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&[u8]>, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    let Some(xff) = forwarded_for.and_then(|v| std::str::from_utf8(v).ok()) else {
        return peer;
    };
    let mut client = peer;
    for part in xff.rsplit(',') {
        match part.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(ip) {
                    break;
                }
            }
            // Garbage in the chain: stop at the last address we could vouch for.
            Err(_) => break,
        }
    }
    client
}

/// The per-IP limiter key: the IPv4 address, or the IPv6 address cut to `v6_prefix` bits
/// (one customer usually holds a whole /64).
pub fn limit_key(ip: IpAddr, v6_prefix: u8) -> u64 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u64,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return u32::from(v4) as u64;
            }
            let mask = u128::MAX.checked_shl(128 - v6_prefix as u32).unwrap_or(0);
            let bits = u128::from(v6) & mask;
            ((bits >> 64) as u64).rotate_left(17) ^ (bits as u64) ^ (1 << 63)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn untrusted_peer_keeps_its_own_address() {
        let peer: IpAddr = "198.51.100.7".parse().unwrap();
        let xff = Some(&b"1.2.3.4"[..]);
        assert_eq!(client_ip(peer, xff, &[]), peer);
        assert_eq!(client_ip(peer, xff, &cidrs(&["10.0.0.0/8"])), peer);
    }

    #[test]
    fn trusted_peer_gives_the_rightmost_untrusted_address() {
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let t = cidrs(&["10.0.0.0/8", "192.168.1.1"]);
        let got = client_ip(peer, Some(b"6.6.6.6, 203.0.113.5, 192.168.1.1"), &t);
        assert_eq!(got, "203.0.113.5".parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(peer, None, &t), peer);
        assert_eq!(client_ip(peer, Some(b"junk"), &t), peer);
    }

    #[test]
    fn ipv6_is_keyed_by_prefix() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limit_key(a, 64), limit_key(b, 64));
        assert_ne!(limit_key(a, 64), limit_key(c, 64));
        assert_ne!(limit_key(a, 128), limit_key(b, 128));
    }
}
