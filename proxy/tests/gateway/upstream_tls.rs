//! Upstream TLS per pool (`tls: {sni, ca, verify}`): a backend served over TLS with a CA
//! made by the test; real handshakes from the gateway's own client, for requests and for
//! health checks, through both engines.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::common::*;

/// A CA of the test's own, written as `<name>.pem` in `dir`, with its key.
fn ca(dir: &Path, name: &str) -> (rcgen::Certificate, rcgen::KeyPair, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("floodgate {name}"));
    let cert = params.self_signed(&key).unwrap();
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, cert.pem()).unwrap();
    (cert, key, path)
}

/// A backend that speaks only TLS (HTTP/1.1 inside): `/ready` answers 200; every other
/// request is counted and answered with its method and body length.
struct TlsBackend {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    probes: Arc<AtomicU64>,
    /// Connections whose TLS handshake failed (a plaintext client, an untrusting one).
    failed_handshakes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_backend(
    dir: &Path,
    issuer: &(rcgen::Certificate, rcgen::KeyPair, PathBuf),
) -> TlsBackend {
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["backend.test".to_string()])
        .unwrap()
        .signed_by(&key, &issuer.0, &issuer.1)
        .unwrap();
    let (cert_p, key_p) = (dir.join("backend.pem"), dir.join("backend.key"));
    std::fs::write(&cert_p, leaf.pem()).unwrap();
    std::fs::write(&key_p, key.serialize_pem()).unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_p)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&key_p).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let probes = Arc::new(AtomicU64::new(0));
    let failed_handshakes = Arc::new(AtomicU64::new(0));
    let (r, p, f) = (requests.clone(), probes.clone(), failed_handshakes.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, r, p, f) = (acceptor.clone(), r.clone(), p.clone(), f.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    f.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    let (r, p) = (r.clone(), p.clone());
                    async move {
                        if req.uri().path() == "/ws" {
                            // An upgrade: 101, then what comes is echoed upper-cased.
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let Ok(up) = on.await else { return };
                                let mut io = TokioIo::new(up);
                                let mut buf = [0u8; 256];
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0
                                        || io
                                            .write_all(&buf[..n].to_ascii_uppercase())
                                            .await
                                            .is_err()
                                    {
                                        break;
                                    }
                                }
                            });
                            return Ok(Response::builder()
                                .status(101)
                                .header("Upgrade", "websocket")
                                .header("Connection", "Upgrade")
                                .body(Full::new(Bytes::new()))
                                .unwrap());
                        }
                        if req.uri().path() == "/ready" {
                            p.fetch_add(1, Ordering::SeqCst);
                            return Ok::<_, std::io::Error>(Response::new(Full::new(
                                Bytes::from_static(b"{}"),
                            )));
                        }
                        r.fetch_add(1, Ordering::SeqCst);
                        let method = req.method().to_string();
                        let len = http_body_util::BodyExt::collect(req.into_body())
                            .await
                            .map(|b| b.to_bytes().len())
                            .unwrap_or(0);
                        Ok(Response::new(Full::new(Bytes::from(format!(
                            "{{\"tls\":true,\"method\":\"{method}\",\"len\":{len}}}"
                        )))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    TlsBackend {
        addr,
        requests,
        probes,
        failed_handshakes,
        task,
    }
}

/// A WebSocket upgrade through the gateway on `port`: the answer's status line, and after a
/// 101 what the backend echoes to `hello`.
async fn upgrade(port: u16) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut pending = Vec::new();
    let (head, _) = read_answer(&mut s, &mut pending, true).await;
    let status = head.lines().next().unwrap_or_default().to_string();
    if !status.starts_with("HTTP/1.1 101") {
        return (status, String::new());
    }
    s.write_all(b"hello").await.unwrap();
    let mut echo = vec![0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut echo))
        .await
        .unwrap()
        .unwrap();
    (status, String::from_utf8_lossy(&echo[..n]).into_owned())
}

/// The config of a gateway in front of `b` with this pool `tls:`.
fn config(b: &TlsBackend, tls: &str, extra: &str) -> String {
    format!(
        "{extra}upstream:\n  backends: [\"{}\"]\n  tls: {tls}\n{HEALTH}",
        b.addr
    )
}

#[tokio::test]
async fn a_tls_pool_is_proxied_get_and_post_through_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = ca(dir.path(), "ca");
    let b = tls_backend(dir.path(), &issuer).await;
    let tls = format!("{{ca: \"{}\", sni: backend.test}}", issuer.2.display());
    for fast_path in [true, false] {
        let before = b.requests.load(Ordering::SeqCst);
        let gw = GatewayProc::start(&config(&b, &tls, &format!("fast_path: {fast_path}\n"))).await;
        // The health checks pass over TLS too.
        gw.wait_backends_up(1).await;
        assert!(b.probes.load(Ordering::SeqCst) > 0);
        let c = client();
        for i in 0..3 {
            let r = c.get(gw.url(&format!("/get/{i}"))).send().await.unwrap();
            assert_eq!(r.status(), 200, "fast_path {fast_path}");
            assert_eq!(
                r.text().await.unwrap(),
                "{\"tls\":true,\"method\":\"GET\",\"len\":0}"
            );
            let r = c
                .post(gw.url("/post"))
                .body(vec![b'x'; 5000])
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "fast_path {fast_path}");
            assert_eq!(
                r.text().await.unwrap(),
                "{\"tls\":true,\"method\":\"POST\",\"len\":5000}"
            );
        }
        assert_eq!(b.requests.load(Ordering::SeqCst) - before, 6);

        // An upgrade (WebSocket) to a TLS pool is tunnelled over TLS too.
        let (status, echo) = upgrade(gw.port).await;
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        assert_eq!(echo, "HELLO");
    }
    assert_eq!(b.failed_handshakes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_untrusted_backend_certificate_is_a_502_and_a_missing_ca_is_named_by_dash_t() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = ca(dir.path(), "ca");
    let other = ca(dir.path(), "other-ca");
    let b = tls_backend(dir.path(), &issuer).await;
    let good = format!("{{ca: \"{}\", sni: backend.test}}", issuer.2.display());
    // No pooled connections (a reload's new trust applies to new connections), and one
    // health pass only (at start): the backend stays up while its trust is changed.
    let body = |tls: &str| {
        format!(
            "upstream:\n  backends: [\"{}\"]\n  keepalive_pool: 0\n  connect_retries: 0\n  tls: {tls}\n  health_check: {{interval: 1h, timeout: 1s}}\n",
            b.addr
        )
    };
    let gw = GatewayProc::start(&body(&good)).await;
    gw.wait_backends_up(1).await;
    let c = client();
    assert_eq!(c.get(gw.url("/a")).send().await.unwrap().status(), 200);

    // Another CA, the system's roots, or another name: the handshake fails, 502.
    for tls in [
        format!("{{ca: \"{}\", sni: backend.test}}", other.2.display()),
        "{sni: backend.test}".to_string(),
        format!("{{ca: \"{}\", sni: other.test}}", issuer.2.display()),
        // Without `sni`, an IP-address backend is checked for its IP: not in the certificate.
        format!("{{ca: \"{}\"}}", issuer.2.display()),
    ] {
        gw.rewrite(&body(&tls));
        gw.reload().await;
        let failed = b.failed_handshakes.load(Ordering::SeqCst);
        let r = c.get(gw.url("/a")).send().await.unwrap();
        assert_eq!(r.status(), 502, "{tls}");
        assert!(b.failed_handshakes.load(Ordering::SeqCst) > failed, "{tls}");
        // An upgrade gets the same check (pingora's client, given the pool's trust).
        let failed = b.failed_handshakes.load(Ordering::SeqCst);
        let (status, _) = upgrade(gw.port).await;
        assert!(status.starts_with("HTTP/1.1 502"), "{tls}: {status}");
        // The backend sees the refusal a moment after the client got its 502.
        let seen = after_answer(
            || async { b.failed_handshakes.load(Ordering::SeqCst) },
            |n| *n > failed,
        )
        .await;
        assert!(seen > failed, "{tls}: the backend saw no refused handshake");
    }
    // `verify: false` takes any certificate.
    gw.rewrite(&body(&format!(
        "{{ca: \"{}\", verify: false}}",
        other.2.display()
    )));
    gw.reload().await;
    assert_eq!(c.get(gw.url("/a")).send().await.unwrap().status(), 200);
    assert_eq!(upgrade(gw.port).await.1, "HELLO");

    // `gateway -t` names a CA file it cannot read, and a file with no certificate.
    let missing = dir.path().join("missing-ca.pem");
    let not_pem = dir.path().join("backend.key");
    for (ca, says) in [(&missing, "cannot read"), (&not_pem, "no certificate")] {
        gw.rewrite(&body(&format!("{{ca: \"{}\"}}", ca.display())));
        let (ok, said) = dash_t(&gw.config_path);
        assert!(!ok, "{said}");
        assert!(
            said.contains("upstream.tls.ca")
                && said.contains(&ca.display().to_string())
                && said.contains(says),
            "{said}"
        );
    }
}
