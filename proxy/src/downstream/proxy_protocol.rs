//! The PROXY protocol (HAProxy's spec, versions 1 and 2): an L4 load balancer in front of
//! the gateway (AWS NLB, HAProxy `send-proxy`, ...) opens each connection with a header that
//! names the client it accepted the connection from. Believed only from `trusted_proxies`
//! and only when `client.proxy_protocol` is on; the source address then stands for the
//! socket peer (see `connections::ConnectionTracked`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// The 12 bytes every version 2 header starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A version 1 header is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// Longest version 2 header we accept (16 fixed bytes + addresses + TLVs). The spec allows
/// 64 KiB of TLVs; load balancers send a few hundred bytes at most.
pub const V2_MAX: usize = 4096;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client the balancer accepted the connection from.
    Client(SocketAddr),
    /// The balancer speaking for itself (v2 `LOCAL`, e.g. its health checks) or a source
    /// it cannot name (v1 `UNKNOWN`, v2 `UNSPEC`/UNIX): the socket peer stays the client.
    Peer,
}

/// The result of looking at the first bytes of a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes; the bytes after it belong to HTTP.
    Done { source: Source, len: usize },
    /// Valid so far; more bytes are needed.
    Partial,
    /// Not a PROXY protocol header, or a broken one.
    Invalid(&'static str),
}

/// Parse a PROXY protocol header (v1 or v2) at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.starts_with(b"PROXY ") {
        return parse_v1(buf);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Parsed::Partial
        } else {
            parse_v2(buf)
        };
    }
    if b"PROXY ".starts_with(&buf[..buf.len().min(6)]) {
        return Parsed::Partial;
    }
    Parsed::Invalid("the connection does not start with a PROXY protocol header")
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid("PROXY v1 header longer than 107 bytes")
        } else {
            Parsed::Partial
        };
    };
    let Ok(line) = std::str::from_utf8(&buf[6..end]) else {
        return Parsed::Invalid("PROXY v1 header is not ASCII");
    };
    let len = end + 2;
    let mut parts = line.split(' ');
    let source = match parts.next() {
        Some("UNKNOWN") => Source::Peer,
        Some(family @ ("TCP4" | "TCP6")) => {
            let fields: Vec<&str> = parts.collect();
            let [src, dst, sport, dport] = fields[..] else {
                return Parsed::Invalid("PROXY v1 header needs 4 fields after the family");
            };
            let (Ok(ip), Ok(_), Ok(port), Ok(_)) = (
                src.parse::<IpAddr>(),
                dst.parse::<IpAddr>(),
                sport.parse::<u16>(),
                dport.parse::<u16>(),
            ) else {
                return Parsed::Invalid("PROXY v1 header has a bad address or port");
            };
            if ip.is_ipv4() != (family == "TCP4") {
                return Parsed::Invalid("PROXY v1 address does not match its family");
            }
            Source::Client(SocketAddr::new(ip, port))
        }
        _ => return Parsed::Invalid("PROXY v1 header has an unknown family"),
    };
    Parsed::Done { source, len }
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < 16 {
        return Parsed::Partial;
    }
    let (ver_cmd, family) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Parsed::Invalid("PROXY v2 header has a bad version");
    }
    let len = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > V2_MAX {
        return Parsed::Invalid("PROXY v2 header is too long");
    }
    if buf.len() < len {
        return Parsed::Partial;
    }
    let body = &buf[16..len];
    let source = match ver_cmd & 0x0f {
        0 => Source::Peer, // LOCAL: the balancer's own connection
        1 => match family >> 4 {
            1 if body.len() >= 12 => {
                let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                Source::Client(SocketAddr::new(
                    ip.into(),
                    u16::from_be_bytes([body[8], body[9]]),
                ))
            }
            2 if body.len() >= 36 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[..16]);
                Source::Client(SocketAddr::new(
                    Ipv6Addr::from(octets).into(),
                    u16::from_be_bytes([body[32], body[33]]),
                ))
            }
            1 | 2 => return Parsed::Invalid("PROXY v2 address block is too short"),
            _ => Source::Peer, // UNSPEC or UNIX: nothing to key a limit on
        },
        _ => return Parsed::Invalid("PROXY v2 header has an unknown command"),
    };
    Parsed::Done { source, len }
}

/// Read the PROXY protocol header that must open `stream`, by `deadline`. Nothing past
/// the header is consumed (bytes read beyond it are put back for HTTP), and when it names a
/// client, that address becomes the connection's peer address (what the limits, the
/// connection caps and the forwarding headers see). On error, the stream (when it is still
/// usable) so the client can be told why.
pub async fn accept(
    stream: Stream,
    deadline: Instant,
) -> Result<(Stream, Source), (Option<Stream>, &'static str)> {
    // The plain-TCP listeners hand over pingora's L4 stream; it can put bytes back.
    let Ok(mut l4) = stream.into_any().downcast::<L4Stream>() else {
        return Err((None, "PROXY protocol needs a plain TCP listener"));
    };
    let source = match tokio::time::timeout_at(deadline, read_header(&mut l4)).await {
        Ok(Ok(source)) => source,
        Ok(Err(why)) => return Err((Some(l4), why)),
        Err(_) => return Err((None, "PROXY protocol header not received in time")),
    };
    if let Source::Client(addr) = source {
        let digest = SocketDigest::from_raw_fd(l4.as_raw_fd());
        let _ = digest.peer_addr.set(Some(PingoraAddr::Inet(addr)));
        l4.set_socket_digest(digest);
    }
    Ok((l4, source))
}

async fn read_header(stream: &mut L4Stream) -> Result<Source, &'static str> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err("connection closed inside its PROXY protocol header"),
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        // `parse` refuses a header longer than V1_MAX/V2_MAX, so `buf` stays bounded.
        match parse(&buf) {
            Parsed::Done { source, len } => {
                stream.rewind(&buf[len..]);
                return Ok(source);
            }
            Parsed::Partial => {}
            Parsed::Invalid(why) => return Err(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, family: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend([0x20 | cmd, family]);
        h.extend((addrs.len() as u16).to_be_bytes());
        h.extend(addrs);
        h
    }

    #[test]
    fn v1_tcp4_and_tcp6_name_the_client() {
        let line = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 80\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(line),
            Parsed::Done {
                source: Source::Client("203.0.113.7:51000".parse().unwrap()),
                len: 42
            }
        );
        let line = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n";
        assert_eq!(
            parse(line),
            Parsed::Done {
                source: Source::Client("[2001:db8::1]:4000".parse().unwrap()),
                len: line.len()
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Done {
                source: Source::Peer,
                len: 15
            }
        );
    }

    #[test]
    fn v1_needs_more_bytes_until_crlf_and_refuses_garbage() {
        assert_eq!(parse(b"PRO"), Parsed::Partial);
        assert_eq!(parse(b"PROXY TCP4 203.0.113.7"), Parsed::Partial);
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Parsed::Invalid(_)));
        assert!(matches!(
            parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000\r\n"),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n"),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4 10.0.0.1 99999 80\r\n"),
            Parsed::Invalid(_)
        ));
        assert!(matches!(parse(&[b'P'; 200]), Parsed::Invalid(_)));
        let long = [&b"PROXY TCP4 "[..], &[b'1'; 120]].concat();
        assert!(matches!(parse(&long), Parsed::Invalid(_)));
    }

    #[test]
    fn v2_proxy_local_and_partial() {
        let ipv4 = [203, 0, 113, 9, 10, 0, 0, 1, 0xC3, 0x50, 0, 80];
        let h = v2(1, 0x11, &ipv4);
        let mut with_http = h.clone();
        with_http.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(
            parse(&with_http),
            Parsed::Done {
                source: Source::Client("203.0.113.9:50000".parse().unwrap()),
                len: 28
            }
        );
        assert_eq!(parse(&h[..20]), Parsed::Partial);
        assert_eq!(parse(&h[..5]), Parsed::Partial);
        let mut ipv6 = vec![0u8; 36];
        ipv6[..16].copy_from_slice(&"2001:db8::5".parse::<Ipv6Addr>().unwrap().octets());
        ipv6[32..34].copy_from_slice(&8080u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &ipv6)),
            Parsed::Done {
                source: Source::Client("[2001:db8::5]:8080".parse().unwrap()),
                len: 52
            }
        );
        assert_eq!(
            parse(&v2(0, 0x00, &[])),
            Parsed::Done {
                source: Source::Peer,
                len: 16
            }
        );
        // TLVs after the addresses are skipped with the header.
        let with_tlv = v2(1, 0x11, &[&ipv4[..], &[0x04, 0, 2, 9, 9]].concat());
        assert!(matches!(parse(&with_tlv), Parsed::Done { len: 33, .. }));
    }

    #[test]
    fn v2_refuses_bad_version_command_short_addresses_and_huge_headers() {
        let mut bad_version = v2(1, 0x11, &[0; 12]);
        bad_version[12] = 0x11;
        assert!(matches!(parse(&bad_version), Parsed::Invalid(_)));
        assert!(matches!(parse(&v2(2, 0x11, &[0; 12])), Parsed::Invalid(_)));
        assert!(matches!(parse(&v2(1, 0x11, &[0; 8])), Parsed::Invalid(_)));
        let mut huge = v2(1, 0x11, &[]);
        huge[14..16].copy_from_slice(&5000u16.to_be_bytes());
        assert!(matches!(parse(&huge), Parsed::Invalid(_)));
    }
}
