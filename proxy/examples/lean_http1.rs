//! A measurement, not a product: how fast an HTTP/1.1 proxy on pingora's server and tokio can
//! be when it does not go through pingora's HTTP/1 session and proxy loop. It runs as a
//! pingora `ServerApp` (pingora's listeners, accept loop and runtime, as the gateway does) and
//! does per request what the gateway's forwarding does on the wire: parse the head
//! (`httparse`), drop hop-by-hop headers, add `X-Forwarded-For`, `X-Real-IP`,
//! `X-Forwarded-Proto` and `X-Request-Id` (the client's or a new one), round robin over
//! keep-alive upstream connections, return the answer with `X-Request-Id`, head and body in one
//! write. No limits, no health checks, no timeouts, no metrics, no logs; bodies with a
//! `Content-Length` only (anything else gets a 501). The README's "Where the gap is" says what
//! it measured: the figure for "a different HTTP/1 design" on the same runtime.
//! Usage: lean_http1 <listen-port> <threads> <upstream host:port>...

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{Server, ShutdownWatch};
use pingora::services::listening::Service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_HEADERS: usize = 64;
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-request-id",
];

struct Upstream {
    addr: SocketAddr,
    idle: Mutex<Vec<Conn>>,
}

/// An upstream connection and the buffer its answers are read into.
struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
}

struct Lean {
    upstreams: Vec<Upstream>,
    next: AtomicUsize,
    ids: AtomicU64,
    id_prefix: u64,
}

enum Failure {
    /// The client went away or sent nothing more: close quietly.
    Closed,
    /// Answer this and close.
    Answer(&'static [u8]),
}

const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 28\r\nConnection: close\r\n\r\n{\"error\":\"malformed request\"}";
const NOT_IMPLEMENTED: &[u8] = b"HTTP/1.1 501 Not Implemented\r\nContent-Type: application/json\r\nContent-Length: 27\r\nConnection: close\r\n\r\n{\"error\":\"not implemented\"}";
const BAD_GATEWAY: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\nContent-Length: 29\r\nConnection: close\r\n\r\n{\"error\":\"upstream failed\"}\n";

fn content_length(headers: &[httparse::Header]) -> Result<usize, Failure> {
    let mut len = 0;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Failure::Answer(NOT_IMPLEMENTED));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(Failure::Answer(BAD_REQUEST))?;
        }
    }
    Ok(len)
}

fn hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Reads until `buf` holds `want` bytes; false if the peer closed first.
async fn fill<R: tokio::io::AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, want: usize) -> bool {
    while buf.len() < want {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(4096);
        }
        match r.read_buf(buf).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
    true
}

impl Lean {
    fn request_id(&self, out: &mut [u8; 32]) {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let hex = b"0123456789abcdef";
        for (i, byte) in self
            .id_prefix
            .to_be_bytes()
            .iter()
            .chain(n.to_be_bytes().iter())
            .enumerate()
        {
            out[2 * i] = hex[(byte >> 4) as usize];
            out[2 * i + 1] = hex[(byte & 15) as usize];
        }
    }

    async fn checkout(&self) -> Result<(usize, Conn), Failure> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len();
        let up = &self.upstreams[i];
        let idle = up.idle.lock().expect("pool").pop();
        if let Some(c) = idle {
            return Ok((i, c));
        }
        let tcp = TcpStream::connect(up.addr)
            .await
            .map_err(|_| Failure::Answer(BAD_GATEWAY))?;
        let _ = tcp.set_nodelay(true);
        Ok((
            i,
            Conn {
                tcp,
                buf: Vec::with_capacity(16384),
            },
        ))
    }

    /// One request: `buf` holds at least its head; returns how many bytes of `buf` it used.
    async fn one(
        &self,
        client: &mut Stream,
        buf: &mut Vec<u8>,
        peer: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<usize, Failure> {
        // Parse the head, reading more until it is whole.
        let (head_len, body_len, id) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let body = content_length(req.headers)?;
                    out.clear();
                    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
                    out.extend_from_slice(b" HTTP/1.1\r\n");
                    let mut forwarded_for: Option<&[u8]> = None;
                    let mut id: Option<&[u8]> = None;
                    for h in req.headers.iter() {
                        if h.name.eq_ignore_ascii_case("x-forwarded-for") {
                            forwarded_for = Some(h.value);
                        } else if h.name.eq_ignore_ascii_case("x-request-id") {
                            id = Some(h.value);
                        } else if h.name.eq_ignore_ascii_case("x-real-ip")
                            || h.name.eq_ignore_ascii_case("x-forwarded-proto")
                            || hop_by_hop(h.name)
                        {
                        } else {
                            push_header(out, h.name.as_bytes(), h.value);
                        }
                    }
                    out.extend_from_slice(b"X-Forwarded-For: ");
                    if let Some(f) = forwarded_for {
                        out.extend_from_slice(f);
                        out.extend_from_slice(b", ");
                    }
                    out.extend_from_slice(peer);
                    out.extend_from_slice(b"\r\n");
                    push_header(out, b"X-Real-IP", peer);
                    push_header(out, b"X-Forwarded-Proto", b"http");
                    let mut fresh = [0u8; 32];
                    let id = match id {
                        Some(id) => id,
                        None => {
                            self.request_id(&mut fresh);
                            &fresh
                        }
                    };
                    let id_at = out.len() + b"X-Request-Id: ".len();
                    push_header(out, b"X-Request-Id", id);
                    out.extend_from_slice(b"\r\n");
                    break (n, body, id_at..id_at + id.len());
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > 32 * 1024 {
                        return Err(Failure::Answer(BAD_REQUEST));
                    }
                    let at = buf.len();
                    if !fill(client, buf, at + 1).await {
                        return Err(Failure::Closed);
                    }
                }
                Err(_) => return Err(Failure::Answer(BAD_REQUEST)),
            }
        };
        let used = head_len + body_len;
        if !fill(client, buf, used).await {
            return Err(Failure::Closed);
        }
        out.extend_from_slice(&buf[head_len..used]);

        let (i, mut conn) = self.checkout().await?;
        if conn.tcp.write_all(out).await.is_err() {
            return Err(Failure::Answer(BAD_GATEWAY));
        }
        // The answer: head, then a Content-Length body.
        conn.buf.clear();
        let (ans_head, ans_body, keep) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut res = httparse::Response::new(&mut headers);
            match res.parse(&conn.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let body =
                        content_length(res.headers).map_err(|_| Failure::Answer(BAD_GATEWAY))?;
                    let mut keep = true;
                    let mut head = Vec::with_capacity(n + 64);
                    head.extend_from_slice(b"HTTP/1.1 ");
                    head.extend_from_slice(res.code.unwrap_or(502).to_string().as_bytes());
                    head.push(b' ');
                    head.extend_from_slice(res.reason.unwrap_or("").as_bytes());
                    head.extend_from_slice(b"\r\n");
                    for h in res.headers.iter() {
                        if h.name.eq_ignore_ascii_case("connection")
                            && h.value.eq_ignore_ascii_case(b"close")
                        {
                            keep = false;
                        }
                        if !hop_by_hop(h.name) {
                            push_header(&mut head, h.name.as_bytes(), h.value);
                        }
                    }
                    push_header(&mut head, b"X-Request-Id", &out[id.clone()]);
                    head.extend_from_slice(b"\r\n");
                    break (head, (n, body), keep);
                }
                Ok(httparse::Status::Partial) => {
                    let at = conn.buf.len();
                    if !fill(&mut conn.tcp, &mut conn.buf, at + 1).await {
                        return Err(Failure::Answer(BAD_GATEWAY));
                    }
                }
                Err(_) => return Err(Failure::Answer(BAD_GATEWAY)),
            }
        };
        let (n, body) = ans_body;
        if !fill(&mut conn.tcp, &mut conn.buf, n + body).await {
            return Err(Failure::Answer(BAD_GATEWAY));
        }
        let mut answer = ans_head;
        answer.extend_from_slice(&conn.buf[n..n + body]);
        if keep && conn.buf.len() == n + body {
            self.upstreams[i].idle.lock().expect("pool").push(conn);
        }
        if client.write_all(&answer).await.is_err() || client.flush().await.is_err() {
            return Err(Failure::Closed);
        }
        Ok(used)
    }
}

#[async_trait]
impl ServerApp for Lean {
    async fn process_new(
        self: &Arc<Self>,
        mut client: Stream,
        _shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let peer = client
            .get_socket_digest()
            .and_then(|d| {
                d.peer_addr()
                    .and_then(|a| a.as_inet())
                    .map(|a| a.ip().to_string())
            })
            .unwrap_or_default();
        let mut buf = Vec::with_capacity(4096);
        let mut out = Vec::with_capacity(1024);
        loop {
            if buf.is_empty() && !fill(&mut client, &mut buf, 1).await {
                return None;
            }
            match self
                .one(&mut client, &mut buf, peer.as_bytes(), &mut out)
                .await
            {
                Ok(used) => {
                    buf.drain(..used);
                }
                Err(Failure::Closed) => return None,
                Err(Failure::Answer(a)) => {
                    let _ = client.write_all(a).await;
                    let _ = client.flush().await;
                    return None;
                }
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: lean_http1 <listen-port> <threads> <upstream host:port>...");
        std::process::exit(2);
    }
    let threads: usize = args[1].parse().expect("threads");
    let conf = ServerConf {
        threads,
        upgrade_sock: format!("/tmp/lean-http1-{}.sock", std::process::id()),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let upstreams = args[2..]
        .iter()
        .map(|a| Upstream {
            addr: a.parse().expect("upstream host:port"),
            idle: Mutex::new(Vec::new()),
        })
        .collect();
    let app = Lean {
        upstreams,
        next: AtomicUsize::new(0),
        ids: AtomicU64::new(0),
        id_prefix: std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15,
    };
    let mut service = Service::new("lean http1".to_string(), app);
    service.add_tcp(&format!("127.0.0.1:{}", args[0]));
    server.add_service(service);
    server.run_forever();
}
