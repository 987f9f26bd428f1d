//! Who the client is, and what the backend is told about it.
//!
//! The client is the socket peer, unless the peer is a trusted proxy: then the right-most
//! `X-Forwarded-For` address that is not itself a trusted proxy (nginx `real_ip_recursive
//! on`), read over **every** `X-Forwarded-For` line joined in order (RFC 9110 section 5.3: a
//! repeated list header is one list). A trusted proxy that adds its own line after the
//! client's (HAProxy `option forwardfor` does) therefore decides; the client's own line only
//! adds addresses to the left. A client talking to us directly cannot change its identity by
//! sending `X-Forwarded-For`.

use std::net::IpAddr;

use crate::config::Cidr;

/// The client address the limits apply to. `forwarded_for`: the `X-Forwarded-For` lines of
/// the request, in the order they came.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &[Cidr],
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    // Right to left: the last line first, each line's entries right to left.
    for line in forwarded_for.rev() {
        let Ok(line) = std::str::from_utf8(line) else {
            return client;
        };
        for part in line.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !is_trusted(ip) {
                        return client;
                    }
                }
                // Garbage in the chain: stop at the last address we could vouch for.
                Err(_) => return client,
            }
        }
    }
    client
}

/// The per-IP key of every per-client limit (rate limits and connection caps alike): the
/// IPv4 address, or the IPv6 address cut to `v6_prefix` bits (one customer usually holds a
/// whole /64).
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

/// A client's `X-Request-Id` is kept when it is 1 to 200 bytes of visible ASCII (so it can
/// be logged and echoed as it came); otherwise the gateway makes one.
pub fn usable_request_id(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= 200 && id.iter().all(|b| b.is_ascii_graphic())
}

/// Appends the text form of an address to `out`. IPv4 (nearly every request) is written by
/// hand: `Display` through the formatting machinery showed in profiles.
pub fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        out.extend_from_slice(ip.to_string().as_bytes());
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if octet >= 100 {
            out.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.push(b'0' + octet / 10 % 10);
        }
        out.push(b'0' + octet % 10);
    }
}

/// What the backend is told about the client, as header values: `X-Forwarded-For` keeps
/// every entry of every line the request brought, in order, and gains the hop this
/// connection came from (nginx's `$proxy_add_x_forwarded_for`); `X-Real-IP` is the client
/// the gateway believes; `X-Forwarded-Proto` the scheme the client used.
pub struct Forwarding {
    pub forwarded_for: Vec<u8>,
    pub real_ip: Vec<u8>,
    pub proto: &'static [u8],
}

/// The `X-Forwarded-For` value: every entry of every line, in order, then `peer`.
fn push_forwarded_for<'a>(
    out: &mut Vec<u8>,
    lines: impl Iterator<Item = &'a [u8]>,
    peer_text: &[u8],
) {
    for line in lines {
        let line = line.trim_ascii();
        if !line.is_empty() {
            out.extend_from_slice(line);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(peer_text);
}

fn proto(tls: bool) -> &'static [u8] {
    if tls {
        b"https"
    } else {
        b"http"
    }
}

/// The three forwarding header lines, written straight into a request head being built
/// (the own engine's path: no value is kept apart). `peer_text`: the peer's address as text,
/// made once per connection.
pub fn write_forwarding<'a>(
    out: &mut Vec<u8>,
    peer: IpAddr,
    peer_text: &[u8],
    client: IpAddr,
    forwarded_for: impl Iterator<Item = &'a [u8]>,
    tls: bool,
) {
    out.extend_from_slice(b"X-Forwarded-For: ");
    push_forwarded_for(out, forwarded_for, peer_text);
    out.extend_from_slice(b"\r\nX-Real-IP: ");
    if client == peer {
        out.extend_from_slice(peer_text);
    } else {
        push_ip(out, client);
    }
    out.extend_from_slice(b"\r\nX-Forwarded-Proto: ");
    out.extend_from_slice(proto(tls));
    out.extend_from_slice(b"\r\n");
}

impl Forwarding {
    pub fn new<'a>(
        peer: IpAddr,
        client: IpAddr,
        forwarded_for: impl Iterator<Item = &'a [u8]>,
        tls: bool,
    ) -> Self {
        let mut list = Vec::with_capacity(64);
        let mut peer_text = Vec::with_capacity(15);
        push_ip(&mut peer_text, peer);
        push_forwarded_for(&mut list, forwarded_for, &peer_text);
        let mut real_ip = Vec::with_capacity(15);
        push_ip(&mut real_ip, client);
        Forwarding {
            forwarded_for: list,
            real_ip,
            proto: proto(tls),
        }
    }

    /// The same three lines as [`write_forwarding`].
    pub fn write(&self, out: &mut Vec<u8>) {
        for (name, value) in self.headers() {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The three headers, as (name, value).
    pub fn headers(&self) -> [(&'static str, &[u8]); 3] {
        [
            ("X-Forwarded-For", &self.forwarded_for),
            ("X-Real-IP", &self.real_ip),
            ("X-Forwarded-Proto", self.proto),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn lines<'a>(l: &'a [&'a str]) -> impl DoubleEndedIterator<Item = &'a [u8]> {
        l.iter().map(|s| s.as_bytes())
    }

    #[test]
    fn untrusted_peer_keeps_its_own_address() {
        let peer = ip("198.51.100.7");
        assert_eq!(client_ip(peer, lines(&["1.2.3.4"]), &[]), peer);
        assert_eq!(
            client_ip(peer, lines(&["1.2.3.4"]), &cidrs(&["10.0.0.0/8"])),
            peer
        );
    }

    #[test]
    fn trusted_peer_gives_the_rightmost_untrusted_address() {
        let peer = ip("10.0.0.2");
        let t = cidrs(&["10.0.0.0/8", "192.168.1.1"]);
        let got = client_ip(peer, lines(&["6.6.6.6, 203.0.113.5, 192.168.1.1"]), &t);
        assert_eq!(got, ip("203.0.113.5"));
        assert_eq!(client_ip(peer, lines(&[]), &t), peer);
        assert_eq!(client_ip(peer, lines(&["junk"]), &t), peer);
    }

    /// Issue 20, case 1: the client's own line comes first, the trusted proxy's last; the
    /// proxy's line decides, whatever the client wrote.
    #[test]
    fn two_forwarded_for_lines_are_one_list() {
        let peer = ip("10.0.0.2");
        let t = cidrs(&["10.0.0.0/8"]);
        let got = client_ip(peer, lines(&["6.6.6.1", "203.0.113.9"]), &t);
        assert_eq!(got, ip("203.0.113.9"));
        // Through two trusted hops, each with its own line.
        let got = client_ip(peer, lines(&["6.6.6.1, 198.51.100.4", "10.0.0.9"]), &t);
        assert_eq!(got, ip("198.51.100.4"));
        let f = Forwarding::new(peer, got, lines(&["6.6.6.1", " 203.0.113.9 "]), false);
        assert_eq!(f.forwarded_for, b"6.6.6.1, 203.0.113.9, 10.0.0.2");
    }

    /// Random chains of trusted and untrusted addresses, split into lines at random: the
    /// answer is the right-most untrusted address of the whole list, however it is split.
    #[test]
    fn any_split_into_lines_gives_the_same_client() {
        let (seed, mut next) = crate::policy::testing::seeded();
        let t = cidrs(&["10.0.0.0/8"]);
        for _ in 0..500 {
            let n = 1 + next() % 6;
            let chain: Vec<String> = (0..n)
                .map(|_| {
                    if next() % 2 == 0 {
                        format!("10.0.0.{}", next() % 250)
                    } else {
                        format!("203.0.113.{}", next() % 250)
                    }
                })
                .collect();
            let expected = chain
                .iter()
                .rev()
                .find(|a| !a.starts_with("10."))
                .map(|a| ip(a))
                .unwrap_or_else(|| ip(&chain[0]));
            let mut split: Vec<String> = Vec::new();
            for a in &chain {
                match split.last_mut() {
                    Some(last) if next() % 2 == 0 => *last = format!("{last}, {a}"),
                    _ => split.push(a.clone()),
                }
            }
            let refs: Vec<&str> = split.iter().map(String::as_str).collect();
            let got = client_ip(ip("10.0.0.1"), lines(&refs), &t);
            assert_eq!(got, expected, "seed {seed}: {split:?}");
        }
    }

    #[test]
    fn ipv6_is_keyed_by_prefix() {
        let a = ip("2001:db8:1:2::1");
        let b = ip("2001:db8:1:2:ffff::9");
        let c = ip("2001:db8:1:3::1");
        assert_eq!(limit_key(a, 64), limit_key(b, 64));
        assert_ne!(limit_key(a, 64), limit_key(c, 64));
        assert_ne!(limit_key(a, 128), limit_key(b, 128));
    }

    #[test]
    fn push_ip_matches_display() {
        for s in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "9.99.100.255",
            "192.168.1.9",
            "255.255.255.255",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            let mut out = Vec::new();
            push_ip(&mut out, ip(s));
            assert_eq!(out, s.as_bytes());
        }
    }

    #[test]
    fn request_ids() {
        assert!(usable_request_id(b"abc-123"));
        assert!(!usable_request_id(b""));
        assert!(!usable_request_id(&[b'a'; 201]));
        assert!(!usable_request_id(b"x\" status=200"));
    }
}
