//! The own HTTP/1 engine (proxy/src/h1/): which requests it serves, what it hands to pingora on the
//! same connection, and answers of every framing relayed as the backend framed them. The rest
//! of the suite runs through it too (and again with it off: `FLOODGATE_TEST_PATH=pingora`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const FAST: &str = "gateway_http1_path_requests_total{path=\"fast\"}";
const PINGORA: &str = "gateway_http1_path_requests_total{path=\"pingora\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_requests_take_the_fast_path_and_the_rest_go_to_pingora_on_the_same_connection() {
    let (up, gw) = upstream_and_gateway("fast_path: true\n").await;
    let mut conn = tcp_from("127.0.0.1", gw.port).await;
    let mut pending = Vec::new();
    // A GET, then a HEAD: the fast path.
    conn.write_all(b"GET /items?x=1 HTTP/1.1\r\nHost: t\r\nX-Request-Id: first\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut conn, &mut pending, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("X-Request-Id: first"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: keep-alive"),
        "{head}"
    );
    assert_eq!(body, b"{\"served_by\":\"a\"}");
    assert_eq!(up.header("x-request-id").as_deref(), Some("first"));
    assert_eq!(up.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(up.header("x-real-ip").as_deref(), Some("127.0.0.1"));
    assert_eq!(up.header("x-forwarded-proto").as_deref(), Some("http"));
    conn.write_all(b"HEAD /items HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut conn, &mut pending, true).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.is_empty());
    assert_eq!(gw.metric_after_answer(FAST, 2.0).await, 2.0);
    assert_eq!(gw.metric(PINGORA).await, 0.0);

    // A Content-Length body, whole with its head, then one whose body follows later: the fast
    // path reads them and sends each head and body on together.
    conn.write_all(b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (head, _) = read_answer(&mut conn, &mut pending, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    conn.write_all(b"PUT /items/1 HTTP/1.1\r\nHost: t\r\nContent-Length: 3000\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.write_all(&[b'z'; 3000]).await.unwrap();
    let (head, _) = read_answer(&mut conn, &mut pending, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(up.state.bodies.load(Ordering::SeqCst), 2);
    assert_eq!(up.state.max_body.load(Ordering::SeqCst), 3000);
    assert_eq!(gw.metric_after_answer(FAST, 4.0).await, 4.0);

    // A chunked body whose first chunk came in the same write as its head: the fast path
    // hands both, already read, to pingora, which answers it and then serves the
    // connection's next request (pipelined ones: the last test).
    for request in [
        "POST /items HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "GET /items HTTP/1.1\r\nHost: t\r\n\r\n",
    ] {
        conn.write_all(request.as_bytes()).await.unwrap();
        let (head, body) = read_answer(&mut conn, &mut pending, false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"{\"served_by\":\"a\"}");
    }
    assert_eq!(up.requests(), 6);
    assert_eq!(up.state.bodies.load(Ordering::SeqCst), 3);
    assert_eq!(gw.metric_after_answer(PINGORA, 2.0).await, 2.0);
    assert_eq!(gw.metric(FAST).await, 4.0);

    // Requests the own engine leaves to pingora's on a new connection (`h1::Handover`):
    // HTTP/1.0, a method it does not serve, `Expect`. All answered 200 and counted as
    // pingora's. `Connection` headers and a stray `Upgrade` without `Connection: upgrade`
    // are the own engine's now (one policy: the hop-by-hop rules are the same on both).
    for request in [
        "GET /items HTTP/1.0\r\nHost: t\r\n\r\n",
        "PROPFIND /items HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "PUT /items HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    ] {
        let mut c = tcp_from("127.0.0.1", gw.port).await;
        c.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        if request.contains("Expect") {
            // The interim answer first.
            let mut all = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut all)).await;
            let all = String::from_utf8_lossy(&all);
            assert!(all.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), "{all}");
            continue;
        }
        let (head, _) = read_answer(&mut c, &mut got, false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{request:?}: {head}");
    }
    assert_eq!(gw.metric_after_answer(PINGORA, 5.0).await, 5.0);
    for request in [
        "GET /items HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "GET /items HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\r\n",
    ] {
        let mut c = tcp_from("127.0.0.1", gw.port).await;
        c.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let (head, _) = read_answer(&mut c, &mut got, false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{request:?}: {head}");
    }
    assert_eq!(gw.metric_after_answer(FAST, 6.0).await, 6.0);
    // An absolute-form target is refused (issue 20, case 6), by the engine that read it.
    let mut c = tcp_from("127.0.0.1", gw.port).await;
    c.write_all(b"GET http://t/items HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let (head, _) = read_answer(&mut c, &mut got, false).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    // Two Host headers: refused by pingora's path, as before the fast path existed.
    let mut c = tcp_from("127.0.0.1", gw.port).await;
    c.write_all(b"GET /items HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let (head, _) = read_answer(&mut c, &mut got, false).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(up.requests(), 6 + 5, "the upstream never saw it");
}

/// What the hand-written backend does with its connections, never saying `Connection: close`.
#[derive(Clone, Copy, PartialEq)]
enum Conns {
    KeepOpen,
    /// Closes each connection after its first answer (a backend dropping idle connections).
    CloseAfterAnswer,
    /// Closes a connection when its second request arrives, without answering it (the race
    /// of a backend closing an idle connection just as the gateway reuses it).
    DropSecondRequest,
}

/// A backend written by hand, for framings the test upstream (hyper) never sends: it answers
/// `/ready` with 200 and everything else with `answer(path)`, and treats its connections as
/// `conns` says. Counts the connections that carried a request other than a health check.
async fn raw_backend(answer: fn(&str) -> Vec<u8>, conns: Conns) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut first = true;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    if first && path != "/ready" {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    if !first && conns == Conns::DropSecondRequest {
                        return;
                    }
                    first = false;
                    let out = if path == "/ready" {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec()
                    } else {
                        answer(&path)
                    };
                    // Written in two pieces, so bodies arrive after their heads.
                    let half = out.len() / 2;
                    if s.write_all(&out[..half]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    if s.write_all(&out[half..]).await.is_err() {
                        return;
                    }
                    if path == "/until-close"
                        || (conns == Conns::CloseAfterAnswer && path != "/ready")
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, connections)
}

/// A gateway with the fast path on in front of one hand-written backend, the backend up.
async fn gateway_before(addr: &str) -> GatewayProc {
    let gw = GatewayProc::start(&format!(
        "fast_path: true\nupstream:\n  backends:\n    - \"{addr}\"\n{HEALTH}"
    ))
    .await;
    gw.wait_backends_up(1).await;
    gw
}

fn framed(path: &str) -> Vec<u8> {
    match path {
        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n".to_vec(),
        "/until-close" => b"HTTP/1.0 200 OK\r\nX-Kind: close\r\n\r\nuntil the end".to_vec(),
        "/interim" => b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal".to_vec(),
        "/empty" => b"HTTP/1.1 204 No Content\r\nX-Kind: empty\r\n\r\n".to_vec(),
        _ => format!("HTTP/1.1 200 OK\r\nContent-Length: 9000\r\n\r\n{}", "y".repeat(9000)).into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_of_every_framing_arrive_as_the_backend_framed_them() {
    let (addr, _) = raw_backend(framed, Conns::KeepOpen).await;
    let gw = gateway_before(&addr).await;
    let mut conn = tcp_from("127.0.0.1", gw.port).await;
    let mut pending = Vec::new();
    let mut ask = async |path: &str| {
        conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_answer(&mut conn, &mut pending, false).await
    };
    let (head, body) = ask("/chunked").await;
    assert!(
        head.contains("X-Kind: chunked") && head.contains("Transfer-Encoding: chunked"),
        "{head}"
    );
    assert_eq!(body, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    let (head, body) = ask("/interim").await;
    assert!(
        head.starts_with("HTTP/1.1 200") && !head.contains("Link"),
        "{head}"
    );
    assert_eq!(body, b"final");
    let (head, body) = ask("/big").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body.len(), 9000);
    // 204 has no body: the next answer on the connection is read cleanly after it.
    conn.write_all(b"GET /empty HTTP/1.1\r\nHost: t\r\n\r\nGET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_answer(&mut conn, &mut pending, true).await;
    assert!(
        head.starts_with("HTTP/1.1 204") && head.contains("X-Kind: empty"),
        "{head}"
    );
    assert!(body.is_empty());
    let (_, body) = read_answer(&mut conn, &mut pending, false).await;
    assert_eq!(body.len(), 9000);
    // A body delimited by the backend closing: relayed whole, then the client's connection
    // closes too (its end is the only end the client can see).
    conn.write_all(b"GET /until-close HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut all = pending.clone();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut all))
        .await
        .expect("closed after the body")
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains("X-Kind: close"),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\nuntil the end"), "{text}");
    assert_eq!(gw.metric_after_answer(FAST, 6.0).await, 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_the_backend_closed_are_not_used_and_a_race_is_retried() {
    // Five requests each way on one client connection; every one gets its 200 from a new
    // backend connection. A connection the backend closed while idle is dropped when taken
    // from the pool (no retry needed); one it closes as the request arrives is retried once on
    // a new connection (four times: the first request found nothing pooled).
    for (conns, retries) in [
        (Conns::CloseAfterAnswer, 0.0),
        (Conns::DropSecondRequest, 4.0),
    ] {
        let (addr, connections) = raw_backend(framed, conns).await;
        let gw = gateway_before(&addr).await;
        let mut conn = tcp_from("127.0.0.1", gw.port).await;
        let mut pending = Vec::new();
        for _ in 0..5 {
            conn.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .unwrap();
            let (head, body) = read_answer(&mut conn, &mut pending, false).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert_eq!(body.len(), 9000);
            // Let a backend's close arrive before the next request.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            connections.load(Ordering::SeqCst),
            5,
            "one backend connection per request"
        );
        let retried = "gateway_upstream_retries_total{reason=\"error_after_send\"}";
        assert_eq!(gw.metric_after_answer(retried, retries).await, retries);
        assert_eq!(gw.metric(FAST).await, 5.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_both_paths() {
    // Four requests in one write: a plain GET, a chunked POST, a GET with a Connection header
    // and a plain GET. With the fast path on, it serves the first and hands the rest, already
    // read, to pingora, which serves the connection from there; with it off, pingora serves
    // all four. Either way each is answered, in order.
    for (config, fast, pingora) in [
        ("fast_path: true\n", 1.0, 3.0),
        ("fast_path: false\n", 0.0, 4.0),
    ] {
        let (up, gw) = upstream_and_gateway(config).await;
        let mut conn = tcp_from("127.0.0.1", gw.port).await;
        conn.write_all(
            b"GET /items HTTP/1.1\r\nHost: t\r\nX-Request-Id: p1\r\n\r\n\
              POST /items HTTP/1.1\r\nHost: t\r\nX-Request-Id: p2\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
              GET /items HTTP/1.1\r\nHost: t\r\nX-Request-Id: p3\r\nConnection: keep-alive\r\n\r\n\
              GET /items HTTP/1.1\r\nHost: t\r\nX-Request-Id: p4\r\n\r\n",
        )
        .await
        .unwrap();
        let mut pending = Vec::new();
        for id in ["p1", "p2", "p3", "p4"] {
            let (head, body) = read_answer(&mut conn, &mut pending, false).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{config}{id}: {head}");
            assert!(
                head.to_ascii_lowercase()
                    .contains(&format!("x-request-id: {id}")),
                "{config}answers in request order: expected {id}, got {head}"
            );
            assert_eq!(body, b"{\"served_by\":\"a\"}");
        }
        assert!(pending.is_empty());
        assert_eq!(up.requests(), 4);
        assert_eq!(up.state.bodies.load(Ordering::SeqCst), 1);
        assert_eq!(gw.metric_after_answer(PINGORA, pingora).await, pingora);
        assert_eq!(gw.metric(FAST).await, fast);
    }
}
