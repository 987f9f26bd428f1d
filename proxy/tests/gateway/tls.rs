//! TLS listeners and HTTP/2: certificates made by the test (a CA of its own, rcgen), real
//! handshakes (tokio-rustls, reqwest, a raw `h2` client).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

use super::common::*;

/// The test's own certificate authority.
struct Pki {
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// One leaf certificate: its PEM files and its DER (to recognise it in a handshake).
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "floodgate test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    /// A certificate for `names`, written as `<file>.pem` and `<file>.key` in `dir`.
    fn leaf(&self, dir: &Path, file: &str, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let leaf = Leaf {
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        roots
    }

    fn reqwest_root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).unwrap()
    }
}

/// A refused connection is closed as its handshake is dropped, a moment before it is
/// counted: the count once it reaches `expected` (or after 2 s).
async fn counted(gw: &GatewayProc, reason: &str, expected: f64) -> f64 {
    gw.metric_after_answer(
        &format!("gateway_rejections_total{{reason=\"{reason}\"}}"),
        expected,
    )
    .await
}

/// `certificates:` YAML for these leaves.
fn certificates(leaves: &[&Leaf]) -> String {
    leaves
        .iter()
        .map(|l| {
            format!(
                "{{cert: \"{}\", key: \"{}\"}}",
                l.cert.display(),
                l.key.display()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `listen:` with the harness's plaintext port and a TLS one.
fn listen(tls_port: u16, leaves: &[&Leaf], tls_extra: &str) -> String {
    format!(
        "listen:\n  - \"127.0.0.1:%PORT%\"\n  - {{address: \"127.0.0.1:{tls_port}\", tls: {{certificates: [{}]{tls_extra}}}}}\n",
        certificates(leaves)
    )
}

/// A TLS handshake with `sni` (none: the client connects by IP address and sends no SNI)
/// offering `alpn`; the stream, or the handshake's error.
async fn connect(
    pki: &Pki,
    port: u16,
    sni: Option<&str>,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    connect_with(client_config(pki, alpn), port, sni).await
}

/// A client config trusting the test CA (its session cache resumes with the same config).
fn client_config(pki: &Pki, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn connect_with(
    config: Arc<rustls::ClientConfig>,
    port: u16,
    sni: Option<&str>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// The leaf certificate the server presented.
fn presented(s: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    let certs: &[CertificateDer] = s.get_ref().1.peer_certificates().unwrap();
    certs[0].to_vec()
}

/// A reqwest client trusting the test CA that reaches `name` on the gateway's TLS port.
fn https_client(pki: &Pki, name: &str, port: u16, http1: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .add_root_certificate(pki.reqwest_root())
        .resolve(name, SocketAddr::from(([127, 0, 0, 1], port)))
        .timeout(Duration::from_secs(10));
    if http1 {
        b = b.http1_only();
    }
    b.build().unwrap()
}

/// A gateway with a TLS listener serving one certificate for `a.test`, in front of one
/// upstream, with `extra` config.
struct OneName {
    pki: Pki,
    port: u16,
    up: Upstream,
    gw: GatewayProc,
    _dir: tempfile::TempDir,
}

async fn one_name(extra: &str) -> OneName {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let a = pki.leaf(dir.path(), "a", &["a.test"]);
    let port = free_port();
    let up = Upstream::start("a").await;
    let gw = gateway_with(&up, &format!("{}{extra}", listen(port, &[&a], ""))).await;
    OneName {
        pki,
        port,
        up,
        gw,
        _dir: dir,
    }
}

impl OneName {
    /// A TLS connection that chose `h2`, for raw frames.
    async fn raw_h2(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        connect(&self.pki, self.port, Some("a.test"), &[b"h2"])
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn sni_picks_the_certificate_and_alpn_the_protocol() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let default = pki.leaf(dir.path(), "default", &["default.test", "127.0.0.1"]);
    let a = pki.leaf(dir.path(), "a", &["a.test"]);
    let b = pki.leaf(dir.path(), "b", &["b.test"]);
    let wild = pki.leaf(dir.path(), "wild", &["*.w.test"]);
    let tls_port = free_port();
    let up = Upstream::start("a").await;
    let gw = gateway_with(&up, &listen(tls_port, &[&default, &a, &b, &wild], "")).await;

    for (sni, want) in [
        (Some("a.test"), &a),
        (Some("b.test"), &b),
        (Some("x.w.test"), &wild),
        (None, &default),
    ] {
        let s = connect(&pki, tls_port, sni, &[b"http/1.1"]).await.unwrap();
        assert!(presented(&s) == want.der, "{sni:?} got another certificate");
    }
    // A name no certificate covers is refused, and counted.
    assert!(connect(&pki, tls_port, Some("unknown.test"), &[])
        .await
        .is_err());
    assert_eq!(counted(&gw, "tls_unknown_server_name", 1.0).await, 1.0);

    // Resumption: a second connection with the session of the first (TLS 1.3 tickets, which
    // arrive after the handshake: read the first connection's answer).
    let config = client_config(&pki, &[b"http/1.1"]);
    let mut first = connect_with(config.clone(), tls_port, Some("a.test"))
        .await
        .unwrap();
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = first.read_to_end(&mut answer).await;
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    let second = connect_with(config, tls_port, Some("a.test"))
        .await
        .unwrap();
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );

    // ALPN: h2 when offered, else http/1.1.
    let s = connect(&pki, tls_port, Some("a.test"), &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let s = connect(&pki, tls_port, Some("a.test"), &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    // Requests over both, proxied, with X-Forwarded-Proto: https.
    for (http1, version) in [
        (true, reqwest::Version::HTTP_11),
        (false, reqwest::Version::HTTP_2),
    ] {
        let client = https_client(&pki, "a.test", tls_port, http1);
        let r = client
            .get(format!("https://a.test:{tls_port}/items?x=1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), version);
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("x-request-id"));
        assert_eq!(up.header("x-forwarded-proto").as_deref(), Some("https"));
        // A body over HTTP/2 without Content-Length is forwarded whole, with its length.
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(vec![
            Ok::<_, std::io::Error>(b"hello ".to_vec()),
            Ok(b"world".to_vec()),
        ]));
        let r = client
            .post(format!("https://a.test:{tls_port}/echo"))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{version:?}");
        assert_eq!(up.header("content-length").as_deref(), Some("11"));
    }
    // Plaintext stays plaintext.
    let r = client().get(gw.url("/items")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.header("x-forwarded-proto").as_deref(), Some("http"));

    // Expiry of each certificate, by name.
    let m = gw.metrics().await;
    for name in ["default.test", "a.test", "b.test", "*.w.test"] {
        let v = metric_value(
            &m,
            &format!("gateway_tls_certificate_expiry_seconds{{name=\"{name}\"}}"),
        );
        assert!(v > 1.7e9, "{name}: {v}\n{m}");
    }
}

/// `redirect_https` on a plaintext listener, `hsts` on a TLS one: every answer of the TLS
/// listener carries the gateway's HSTS once (the backend's own replaced), over HTTP/1.1 and
/// HTTP/2, proxied or the gateway's own; the plaintext listeners carry none. The suite's
/// second pass (`FLOODGATE_TEST_PATH=pingora`) runs it on pingora's engine.
#[tokio::test]
async fn plaintext_redirects_to_https_and_tls_answers_carry_hsts() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let a = pki.leaf(dir.path(), "a", &["a.test"]);
    let (tls_port, redirect_port) = (free_port(), free_port());
    let up = Upstream::start("a").await;
    let gw = gateway_with(
        &up,
        &format!(
            "{}  - {{address: \"127.0.0.1:{redirect_port}\", redirect_https: {{port: {tls_port}}}}}\n\
             buffers: {{max_body_bytes: 100}}\n",
            listen(tls_port, &[&a], ", hsts: {max_age: 1d, include_subdomains: true}")
        ),
    )
    .await;
    const HSTS: &str = "max-age=86400; includeSubDomains";

    // The redirecting listener: 308 to the same host and target over https, keep-alive, a
    // body read and dropped; nothing reaches the backend.
    let mut conn = TcpStream::connect(("127.0.0.1", redirect_port))
        .await
        .unwrap();
    conn.write_all(
        b"GET /items?x=1 HTTP/1.1\r\nHost: a.test:80\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await
    .unwrap();
    let mut pending = Vec::new();
    for target in ["/items?x=1", "/echo"] {
        let (head, body) = read_answer(&mut conn, &mut pending, false).await;
        let answer = format!("{head}\r\n\r\n{}", String::from_utf8_lossy(&body));
        assert_json_error(&answer, "HTTP/1.1 308 Permanent Redirect", "HTTPS");
        assert!(
            head.contains(&format!(
                "\r\nLocation: https://a.test:{tls_port}{target}\r\n"
            )),
            "{head}"
        );
        assert!(
            !head.to_ascii_lowercase().contains("strict-transport"),
            "{head}"
        );
    }
    // Without a Host there is nowhere to send it.
    let said = all_it_says_to("127.0.0.1", redirect_port, b"GET / HTTP/1.0\r\n\r\n").await;
    assert_json_error(&said, "HTTP/1.1 400 Bad Request", "Host");
    assert_eq!(up.requests(), 0);

    // The harness's plaintext listener: proxied, no HSTS.
    let r = client().get(gw.url("/sts")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let sts: Vec<_> = r
        .headers()
        .get_all("strict-transport-security")
        .iter()
        .collect();
    assert_eq!(sts, ["max-age=1"]);

    // The TLS listener, both protocols: the gateway's HSTS once on every answer.
    for (http1, version) in [
        (true, reqwest::Version::HTTP_11),
        (false, reqwest::Version::HTTP_2),
    ] {
        let client = https_client(&pki, "a.test", tls_port, http1);
        for (path, body, status) in [("/items", 0, 200), ("/sts", 0, 200), ("/upload", 1000, 413)] {
            let r = client
                .post(format!("https://a.test:{tls_port}{path}"))
                .body(vec![b'x'; body])
                .send()
                .await
                .unwrap();
            assert_eq!(
                (r.version(), r.status().as_u16()),
                (version, status),
                "{path}"
            );
            let sts: Vec<_> = r
                .headers()
                .get_all("strict-transport-security")
                .iter()
                .collect();
            assert_eq!(sts, [HSTS], "{version:?} {path}");
        }
    }
}

/// `strict_sni: false`: a client whose SNI no certificate covers gets the first certificate
/// (nginx's behaviour) instead of a failed handshake.
#[tokio::test]
async fn lenient_sni_serves_the_first_certificate() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let a = pki.leaf(dir.path(), "a", &["a.test"]);
    let port = free_port();
    let up = Upstream::start("a").await;
    let gw = gateway_with(&up, &listen(port, &[&a], ", strict_sni: false")).await;
    // The client's own check fails on the name: this one does not check.
    let lax = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .resolve("other.test", SocketAddr::from(([127, 0, 0, 1], port)))
        .build()
        .unwrap();
    let r = lax
        .get(format!("https://other.test:{port}/items"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(gw.rejections("tls_unknown_server_name").await, 0.0);
    // A checking client refuses it, as it should.
    let strict = https_client(&pki, "other.test", port, true);
    assert!(strict
        .get(format!("https://other.test:{port}/items"))
        .send()
        .await
        .is_err());
}

#[tokio::test]
async fn http2_requests_get_the_same_limits() {
    let OneName {
        pki,
        port: tls_port,
        up,
        gw,
        ..
    } = one_name(
        "limits: {per_ip: {rate: 5r/s, burst: 3}, global: null}\nbuffers: {max_body_bytes: 1000}\n",
    )
    .await;
    let client = https_client(&pki, "a.test", tls_port, false);
    let big = client
        .post(format!("https://a.test:{tls_port}/upload"))
        .body(vec![b'x'; 5000])
        .send()
        .await
        .unwrap();
    assert_eq!(big.version(), reqwest::Version::HTTP_2);
    assert_eq!(big.status(), 413);
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let r = client
            .get(format!("https://a.test:{tls_port}/items"))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            assert!(r.headers().contains_key("retry-after"));
        }
        statuses.push(r.status().as_u16());
    }
    assert!(
        statuses.contains(&200) && statuses.contains(&429),
        "{statuses:?}"
    );
    assert!(gw.rejections("rate_limit_ip").await >= 1.0);
    assert_eq!(gw.rejections("body_too_large").await, 1.0);
    // Only the requests answered 200 reached the backend.
    let passed = statuses.iter().filter(|s| **s == 200).count() as u64;
    assert_eq!(up.requests(), passed);
}

#[tokio::test]
async fn bad_handshakes_are_bounded_refused_and_counted() {
    let OneName {
        pki,
        port: tls_port,
        up,
        gw,
        ..
    } = one_name("slow_clients: {handshake_timeout: 300ms}\n").await;
    // Silent after connecting, and stalled mid-ClientHello: closed at the deadline.
    let started = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    let mut stalled = TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    for s in [&mut silent, &mut stalled] {
        let took = closed_after(s, started).await;
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
    assert_eq!(counted(&gw, "tls_handshake_timeout", 2.0).await, 2.0);

    // Garbage: refused at once.
    let mut garbage = TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    garbage
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef])
        .await
        .unwrap();
    closed_after(&mut garbage, Instant::now()).await;
    assert_eq!(counted(&gw, "tls_handshake", 1.0).await, 1.0);

    // Plain HTTP to the TLS port: told so, in plaintext.
    let mut plain = TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_string(&mut answer)).await;
    assert_json_error(&answer, "HTTP/1.1 400 Bad Request", "https");
    assert_eq!(counted(&gw, "plaintext_on_tls", 1.0).await, 1.0);

    // None of it touched the backend, and a real client is served.
    assert_eq!(up.requests(), 0);
    let r = https_client(&pki, "a.test", tls_port, true)
        .get(format!("https://a.test:{tls_port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn reload_swaps_certificates_without_errors_and_refuses_a_broken_pair() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let old = pki.leaf(dir.path(), "old", &["a.test"]);
    let new = pki.leaf(dir.path(), "new", &["a.test"]);
    let other = pki.leaf(dir.path(), "other", &["a.test"]);
    let tls_port = free_port();
    let up = Upstream::start("a").await;
    let backend = format!("upstream:\n  backends:\n    - \"{}\"\n{HEALTH}", up.addr);
    let config = |leaf: &Leaf| format!("{}{backend}", listen(tls_port, &[leaf], ""));
    let gw = GatewayProc::start(&config(&old)).await;
    gw.wait_backends_up(1).await;
    assert!(presented(&connect(&pki, tls_port, Some("a.test"), &[]).await.unwrap()) == old.der);

    // A client loop on new connections while the certificate changes.
    let errors = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .add_root_certificate(pki.reqwest_root())
        .resolve("a.test", SocketAddr::from(([127, 0, 0, 1], tls_port)))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let looping = {
        let (errors, served, stop) = (errors.clone(), served.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match client
                    .get(format!("https://a.test:{tls_port}/items"))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => served.fetch_add(1, Ordering::SeqCst),
                    _ => errors.fetch_add(1, Ordering::SeqCst),
                };
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.rewrite(&config(&new));
    assert_eq!(gw.reload().await, (1.0, 0.0));
    assert!(presented(&connect(&pki, tls_port, Some("a.test"), &[]).await.unwrap()) == new.der);

    // A key that does not match: `-t` names the file, the reload is refused, `new` stays.
    let broken = Leaf {
        cert: new.cert.clone(),
        key: other.key.clone(),
        der: Vec::new(),
    };
    gw.rewrite(&config(&broken));
    let (ok, said) = dash_t(&gw.config_path);
    assert!(!ok, "{said}");
    assert!(
        said.contains("other.key") && said.contains("does not match"),
        "{said}"
    );
    assert_eq!(gw.reload().await, (1.0, 1.0));
    assert!(presented(&connect(&pki, tls_port, Some("a.test"), &[]).await.unwrap()) == new.der);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    looping.await.unwrap();
    assert_eq!(errors.load(Ordering::SeqCst), 0);
    assert!(served.load(Ordering::SeqCst) > 10);
}

#[tokio::test]
async fn a_rapid_reset_flood_is_cut_off_while_others_are_served() {
    let OneName {
        pki,
        port: tls_port,
        up,
        gw,
        ..
    } = one_name("").await;

    // Another client, on HTTP/2 too, all along.
    let good = https_client(&pki, "a.test", tls_port, false);
    let steady = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..100 {
            let r = good
                .get(format!("https://a.test:{tls_port}/items"))
                .send()
                .await;
            statuses.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
        }
        statuses
    });

    // HEADERS then RST_STREAM, in a loop, on one connection.
    let tls = connect(&pki, tls_port, Some("a.test"), &[b"h2"])
        .await
        .unwrap();
    let (mut h2, conn) = h2::client::handshake(tls).await.unwrap();
    let driver = tokio::spawn(conn);
    const FLOOD: usize = 20_000;
    let mut sent = 0;
    for _ in 0..FLOOD {
        h2 = match h2.ready().await {
            Ok(h) => h,
            Err(_) => break,
        };
        let req = http::Request::get(format!("https://a.test:{tls_port}/items"))
            .body(())
            .unwrap();
        let Ok((_answer, mut stream)) = h2.send_request(req, true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
        // Let the connection's task write them (one thread runs this test).
        tokio::task::yield_now().await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
    assert!(sent < FLOOD, "the flood was never cut off");
    assert!(ended.is_ok(), "the flooding connection stayed open");
    let statuses = steady.await.unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(counted(&gw, "http2_rapid_reset", 1.0).await, 1.0);
    eprintln!(
        "rapid reset: cut off after {sent} streams; the backend saw {} requests",
        up.requests()
    );
    drop(gw);
}

/// `watch: true` follows the certificate files too: a renewal written over them (a new file
/// renamed into place, as certbot and cert-manager do) in another directory than the config,
/// named by a path relative to the config's, is in force for new handshakes without a
/// signal; the config file never changed.
#[tokio::test]
async fn watch_follows_a_renewed_certificate() {
    let pki = Pki::new();
    let issued = tempfile::tempdir().unwrap();
    let old = pki.leaf(issued.path(), "old", &["a.test"]);
    let new = pki.leaf(issued.path(), "new", &["a.test"]);
    let tls_port = free_port();
    let up = Upstream::start("a").await;
    let body = format!(
        "watch: true\nlisten:\n  - \"127.0.0.1:%PORT%\"\n  - {{address: \"127.0.0.1:{tls_port}\", tls: {{certificates: [{{cert: certs/a.pem, key: certs/a.key}}]}}}}\nupstream:\n  backends: [\"{}\"]\n{HEALTH}",
        up.addr
    );
    let gw = GatewayProc::start_with(&body, |dir, yaml| {
        std::fs::create_dir(dir.join("certs")).unwrap();
        std::fs::copy(&old.cert, dir.join("certs/a.pem")).unwrap();
        std::fs::copy(&old.key, dir.join("certs/a.key")).unwrap();
        let path = dir.join("gateway.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    })
    .await;
    let got = || async { presented(&connect(&pki, tls_port, Some("a.test"), &[]).await.unwrap()) };
    assert!(got().await == old.der);
    let before = gw.reload_counts().await;
    let certs = gw.dir.path().join("certs");
    for (from, to) in [(&new.key, "a.key"), (&new.cert, "a.pem")] {
        std::fs::copy(from, certs.join("next")).unwrap();
        std::fs::rename(certs.join("next"), certs.join(to)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while got().await != new.der {
        assert!(
            Instant::now() < deadline,
            "the renewal was not picked up: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = gw.reload_counts().await;
    assert!(after.0 > before.0, "{before:?} {after:?}");
    // Between the two renames the pair did not match: that reload (if one ran) was refused
    // and the old pair stayed in force; no other reload is counted as failed.
    assert!(after.1 - before.1 <= 1.0, "{before:?} {after:?}");
}

/// A CONTINUATION flood: one header block continued by frame after frame, never ended. The
/// connection is closed at h2's bound (5 frames for the default 16 KiB header cap) and
/// counted, while another HTTP/2 client is served all along.
#[tokio::test]
async fn a_continuation_flood_is_cut_off_and_counted() {
    let one = one_name("").await;
    let (gw, tls_port) = (&one.gw, one.port);
    let good = https_client(&one.pki, "a.test", tls_port, false);
    let mut tls = one.raw_h2().await;
    // SETTINGS, then HEADERS on stream 1 without END_HEADERS: `:method: GET`, `:scheme:
    // https`, `:path: /`.
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(h2_frame(0x4, 0, 0, &[]));
    opening.extend(h2_frame(0x1, 0x1, 1, &[0x82, 0x87, 0x84]));
    tls.write_all(&opening).await.unwrap();
    let mut sent = 0;
    const FLOOD: usize = 10_000;
    // CONTINUATION frames (a 16-byte literal header each), never END_HEADERS.
    let continuation = h2_frame(
        0x9,
        0,
        1,
        &[
            0x40, 0x01, b'x', 0x0c, b'y', b'y', b'y', b'y', b'y', b'y', b'y', b'y', b'y', b'y',
            b'y', b'y',
        ],
    );
    while sent < FLOOD {
        if tls.write_all(&continuation).await.is_err() {
            break;
        }
        sent += 1;
        if sent % 4 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Whatever it answered (a GOAWAY, or nothing), the connection ends.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the flooding connection stayed open after {sent} frames"
    );
    assert_eq!(counted(gw, "http2_continuation_flood", 1.0).await, 1.0);
    let r = good
        .get(format!("https://a.test:{tls_port}/items"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.version(), r.status().as_u16()),
        (reqwest::Version::HTTP_2, 200)
    );
    eprintln!("continuation flood: {sent} frames written before the connection failed");
}

/// One raw HTTP/2 frame: type, flags, stream, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The frames a raw HTTP/2 connection receives within `wait` (type, flags, stream, payload).
async fn h2_frames_for(
    s: &mut tokio_rustls::client::TlsStream<TcpStream>,
    wait: Duration,
) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + wait;
    while let Ok(Ok(n)) = tokio::time::timeout_at(end, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    let mut frames = Vec::new();
    let mut at = 0;
    while bytes.len() >= at + 9 {
        let h = &bytes[at..at + 9];
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        let Some(payload) = bytes.get(at + 9..at + 9 + len) else {
            break;
        };
        frames.push((h[3], h[4], stream, payload.to_vec()));
        at += 9 + len;
    }
    frames
}

/// A client opening more streams than `http2.max_concurrent_streams`: each stream over the
/// cap is refused (`RST_STREAM` `REFUSED_STREAM`) and counted, the connection stays, the
/// streams within the cap are served.
#[tokio::test]
async fn streams_over_the_cap_are_refused_and_counted() {
    let one = one_name("http2: {max_concurrent_streams: 3}\n").await;
    let mut tls = one.raw_h2().await;
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend(h2_frame(0x4, 0, 0, &[]));
    tls.write_all(&opening).await.unwrap();
    // The server's SETTINGS, acknowledged: its stream cap applies from then on.
    let settings = h2_frames_for(&mut tls, Duration::from_millis(300)).await;
    assert!(
        settings.iter().any(|f| f.0 == 0x4 && f.1 & 1 == 0),
        "{settings:?}"
    );
    tls.write_all(&h2_frame(0x4, 0x1, 0, &[])).await.unwrap();
    // Ten POSTs whose bodies never come (END_HEADERS, no END_STREAM): they stay open.
    // `:method: POST`, `:scheme: https`, `:path: /`, `:authority: a.test`.
    let head = [
        0x83, 0x87, 0x84, 0x01, 0x06, b'a', b'.', b't', b'e', b's', b't',
    ];
    let mut streams = Vec::new();
    for i in 0..10u32 {
        streams.extend(h2_frame(0x1, 0x4, 1 + 2 * i, &head));
    }
    tls.write_all(&streams).await.unwrap();
    let frames = h2_frames_for(&mut tls, Duration::from_millis(500)).await;
    let refused: Vec<u32> = frames
        .iter()
        .filter(|f| f.0 == 0x3 && f.3 == 7u32.to_be_bytes())
        .map(|f| f.2)
        .collect();
    assert_eq!(refused, [7, 9, 11, 13, 15, 17, 19], "{frames:?}");
    assert!(!frames.iter().any(|f| f.0 == 0x7), "a GOAWAY: {frames:?}");
    assert_eq!(counted(&one.gw, "http2_too_many_streams", 7.0).await, 7.0);
    // The connection still serves: a GET on a new stream once one of the three ends (its
    // body ends empty).
    tls.write_all(&h2_frame(0x0, 0x1, 1, &[])).await.unwrap();
    let get = [
        0x82, 0x87, 0x84, 0x01, 0x06, b'a', b'.', b't', b'e', b's', b't',
    ];
    tls.write_all(&h2_frame(0x1, 0x5, 21, &get)).await.unwrap();
    let frames = h2_frames_for(&mut tls, Duration::from_millis(500)).await;
    // HEADERS answers on stream 1 and on stream 21 (`:status: 200` is HPACK index 8: 0x88).
    for stream in [1, 21] {
        assert!(
            frames
                .iter()
                .any(|f| f.0 == 0x1 && f.2 == stream && f.3.first() == Some(&0x88)),
            "stream {stream}: {frames:?}"
        );
    }
}

/// An HTTP/2 request over cleartext with prior knowledge (h2c) on a plaintext listener.
async fn h2c_status(port: u16) -> Result<u16, h2::Error> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(conn);
    let mut h2 = h2.ready().await?;
    let req = http::Request::get(format!("http://127.0.0.1:{port}/items"))
        .body(())
        .unwrap();
    let (answer, _) = h2.send_request(req, true)?;
    Ok(answer.await?.status().as_u16())
}

#[tokio::test]
async fn cleartext_http2_only_when_enabled() {
    let (up, gw) = upstream_and_gateway("http2: {cleartext: true}\n").await;
    assert_eq!(h2c_status(gw.port).await.unwrap(), 200);
    assert_eq!(up.header("x-forwarded-proto").as_deref(), Some("http"));
    // HTTP/1 on the same listener as before.
    let r = client().get(gw.url("/items")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    drop(gw);

    // Off by default: the preface is not HTTP/1 either, and is refused.
    let gw = gateway_with(&up, "").await;
    assert!(h2c_status(gw.port).await.is_err());
}
