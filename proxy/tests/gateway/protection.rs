//! Black-box tests of the gateway's protections: the real binary, real upstreams, clients on
//! different loopback addresses.

use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limit_refuses_after_the_burst_and_spares_other_ips() {
    let (_up, gw) =
        upstream_and_gateway("limits:\n  global: null\n  per_ip: {rate: 1r/m, burst: 5}\n").await;
    let (a, b) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(a.get(gw.url("/items")).send().await.unwrap());
    }
    let ok = statuses.iter().filter(|r| r.status() == 200).count();
    assert_eq!(ok, 6, "burst 5 lets 1 + 5 through");
    assert!(statuses[6..].iter().all(|r| r.status() == 429));
    let r = &statuses[9];
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(r.headers()["ratelimit-policy"], "1;w=60;burst=5");
    let rl = r.headers()["ratelimit"].to_str().unwrap();
    assert!(rl.starts_with("limit=6, remaining=0, reset="), "{rl}");
    // Another client at the same moment is unaffected.
    assert_eq!(b.get(gw.url("/items")).send().await.unwrap().status(), 200);
    let body: serde_json::Value = a
        .get(gw.url("/items"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], 429);
    assert!(gw.rejections("rate_limit_ip").await >= 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_profiles_apply_by_longest_prefix() {
    let (_up, gw) = upstream_and_gateway(
        "limits:\n  global: null\n  per_ip: null\n  routes:\n    - {prefix: /llm, per_ip: {rate: 1r/m, burst: 1}}\n    - {prefix: /llm/free, per_ip: null}\n",
    )
    .await;
    let c = client_from("127.0.0.4");
    let mut llm = Vec::new();
    for _ in 0..4 {
        llm.push(
            c.get(gw.url("/llm"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(llm, vec![200, 200, 429, 429]);
    for _ in 0..5 {
        assert_eq!(c.get(gw.url("/items")).send().await.unwrap().status(), 200);
        assert_eq!(
            c.get(gw.url("/llm/free/x")).send().await.unwrap().status(),
            200
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_mode_spaces_requests_and_rejects_at_once_past_max_delay() {
    let (_up, gw) = upstream_and_gateway(
        "limits:\n  global: null\n  per_ip: {rate: 10r/s, burst: 10, delay: true, max_delay: 300ms}\n",
    )
    .await;
    let c = client_from("127.0.0.5");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url) = (c.clone(), gw.url("/items"));
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), t.elapsed())
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let ok: Vec<_> = results.iter().filter(|(s, _)| *s == 200).collect();
    let refused: Vec<_> = results.iter().filter(|(s, _)| *s == 429).collect();
    // Waits of 0, 100, 200, 300 ms pass; the rest would wait longer and are refused.
    assert_eq!(ok.len(), 4, "{results:?}");
    assert_eq!(refused.len(), 4, "{results:?}");
    let slowest = ok.iter().map(|(_, d)| *d).max().unwrap();
    assert!(slowest >= Duration::from_millis(250), "{results:?}");
    for (_, d) in refused {
        assert!(
            *d < Duration::from_millis(150),
            "refused after {d:?}, not at once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_ceiling_holds_under_a_flood_from_four_ips() {
    let up = Upstream::start("a").await;
    // A small burst absorbs arrival jitter: with burst 0 every admission loses the gap
    // between its conforming time and the next arrival.
    let gw = gateway_with(
        &up,
        "limits:\n  per_ip: null\n  global: {rate: 50r/s, burst: 10}\n",
    )
    .await;
    let started = Instant::now();
    let run_for = Duration::from_secs(3);
    let mut tasks = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        for _ in 0..4 {
            let (c, url) = (client_from(ip), gw.url("/items"));
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut refused) = (0u64, 0u64);
                while started.elapsed() < run_for {
                    match c.get(&url).send().await.map(|r| r.status().as_u16()) {
                        Ok(200) => ok += 1,
                        Ok(503) => refused += 1,
                        other => panic!("unexpected {other:?}"),
                    }
                }
                (ok, refused)
            }));
        }
    }
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (o, r) = t.await.unwrap();
        ok += o;
        refused += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    // What the config allows: the rate over the run, plus the burst and the first request.
    let expected = 50.0 * elapsed + 11.0;
    let error = (ok as f64 - expected) / expected;
    assert!(
        refused > ok,
        "the flood must exceed the ceiling: {ok} ok, {refused} refused"
    );
    // The ceiling holds within 5%; below it, a machine starved by other work (CI runs every
    // test binary at once) leaves some of the rate unused, which is not the limiter's error.
    assert!(
        (-0.15..=0.05).contains(&error),
        "admitted {ok}, expected {expected:.0} ({:+.1}%)",
        error * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    let (up, gw) = upstream_and_gateway(
        "client:\n  trusted_proxies: [\"127.0.0.3/32\"]\n\
         limits:\n  global: null\n  per_ip: {rate: 1r/m, burst: 0}\n",
    )
    .await;
    let get = |c: &reqwest::Client, xff: &str| {
        c.get(gw.url("/items"))
            .header("X-Forwarded-For", xff)
            .send()
    };
    // An untrusted peer cannot dodge its limit by inventing addresses.
    let direct = client_from("127.0.0.2");
    assert_eq!(get(&direct, "9.9.9.1").await.unwrap().status(), 200);
    assert_eq!(get(&direct, "9.9.9.2").await.unwrap().status(), 429);
    // Behind a trusted proxy, each forwarded client has its own limit.
    let proxy = client_from("127.0.0.3");
    assert_eq!(get(&proxy, "9.9.9.3").await.unwrap().status(), 200);
    assert_eq!(get(&proxy, "9.9.9.4").await.unwrap().status(), 200);
    // The chain gains the hop the gateway received from (the proxy), not the client twice;
    // X-Real-IP is the client the gateway believes.
    assert_eq!(
        up.header("x-forwarded-for").as_deref(),
        Some("9.9.9.4, 127.0.0.3")
    );
    assert_eq!(up.header("x-real-ip").as_deref(), Some("9.9.9.4"));
    assert_eq!(get(&proxy, "6.6.6.6, 9.9.9.3").await.unwrap().status(), 429);
}

/// Write `pieces` with a pause after each (a header split across reads), then read one answer.
async fn raw_exchange(stream: &mut tokio::net::TcpStream, pieces: &[&[u8]]) -> String {
    for piece in pieces {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A PROXY protocol v2 header for an IPv4 client (`cmd` 1: PROXY, 0: LOCAL).
fn proxy_v2(cmd: u8, client: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x20 | cmd, 0x11, 0, 12]);
    h.extend(client);
    h.extend([127, 0, 0, 1]);
    h.extend(port.to_be_bytes());
    h.extend(80u16.to_be_bytes());
    h
}

/// An upstream and a gateway that expects a PROXY protocol header from 127.0.0.3 (the
/// balancer), with `extra` config.
async fn behind_a_balancer(extra: &str) -> (Upstream, GatewayProc) {
    let client = "client:\n  trusted_proxies: [\"127.0.0.3/32\"]\n  proxy_protocol: true\n";
    upstream_and_gateway(&format!("{client}{extra}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_is_believed_only_from_trusted_balancers() {
    let (up, gw) = behind_a_balancer(
        "limits:\n  global: null\n  per_ip: {rate: 1r/m, burst: 0}\n\
         connections: {per_ip: 2, total: 100}\n",
    )
    .await;
    const GET: &[u8] = b"GET /items HTTP/1.1\r\nHost: x\r\n\r\n";
    // From the balancer, a v1 header names the client: the upstream sees it, and the per-IP
    // limit is the client's, not the balancer's.
    let mut lb = tcp_from("127.0.0.3", gw.port).await;
    let v1 = b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 80\r\n";
    let answer = raw_exchange(&mut lb, &[&[&v1[..], GET].concat()]).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.header("x-real-ip").as_deref(), Some("203.0.113.7"));
    assert_eq!(up.header("x-forwarded-for").as_deref(), Some("203.0.113.7"));
    assert!(raw_exchange(&mut lb, &[GET])
        .await
        .starts_with("HTTP/1.1 429"));
    // A v2 header arriving in pieces, for another client: its own limit.
    let mut lb2 = tcp_from("127.0.0.3", gw.port).await;
    let v2 = proxy_v2(1, [203, 0, 113, 8], 40000);
    let answer = raw_exchange(&mut lb2, &[&v2[..5], &v2[5..], GET]).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.header("x-real-ip").as_deref(), Some("203.0.113.8"));
    // Connection caps count the client too: two held for .20, the third refused, while
    // the balancer as a whole is not capped.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tcp_from("127.0.0.3", gw.port).await;
        s.write_all(&proxy_v2(1, [203, 0, 113, 20], 1))
            .await
            .unwrap();
        held.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.metric("gateway_downstream_connections").await < 4.0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut third = tcp_from("127.0.0.3", gw.port).await;
    let answer = raw_exchange(&mut third, &[&proxy_v2(1, [203, 0, 113, 20], 1)]).await;
    assert!(answer.contains("too many open connections"), "{answer}");
    // LOCAL (the balancer's own health check): the balancer is the client.
    let mut check = tcp_from("127.0.0.3", gw.port).await;
    let answer = raw_exchange(&mut check, &[&[&proxy_v2(0, [0; 4], 0)[..], GET].concat()]).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.header("x-real-ip").as_deref(), Some("127.0.0.3"));
    // A balancer connection without the header is refused with the reason, and counted.
    let mut bare = tcp_from("127.0.0.3", gw.port).await;
    bare.write_all(GET).await.unwrap();
    let mut answer = String::new();
    bare.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("PROXY protocol"), "{answer}");
    assert_eq!(gw.rejections("proxy_protocol").await, 1.0);
    // Anyone else cannot claim an address with it: the line is not HTTP, so 400; their own
    // requests are plain HTTP under their own address.
    let mut liar = tcp_from("127.0.0.2", gw.port).await;
    let answer = raw_exchange(
        &mut liar,
        &[&[&b"PROXY TCP4 9.9.9.9 127.0.0.1 1 80\r\n"[..], GET].concat()],
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let mut direct = tcp_from("127.0.0.2", gw.port).await;
    assert!(raw_get(&mut direct).await.starts_with("HTTP/1.1 200"));
    assert_eq!(up.header("x-real-ip").as_deref(), Some("127.0.0.2"));
    drop(held);
}

/// Read until the peer closes (or resets); how long after `started` that was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_proxy_protocol_header_counts_against_the_head_deadline() {
    let (up, gw) = behind_a_balancer("slow_clients: {header_timeout: 2s}\n").await;
    // Half a PROXY header, then nothing: closed at the deadline, counted.
    let mut stalled = tcp_from("127.0.0.3", gw.port).await;
    let started = Instant::now();
    stalled.write_all(b"PROXY TCP4 203.0.113.7").await.unwrap();
    let t = closed_after(&mut stalled, started).await;
    assert!(
        t >= Duration::from_millis(1900) && t < Duration::from_secs(4),
        "{t:?}"
    );
    assert_eq!(gw.rejections("proxy_protocol").await, 1.0);
    // A header that took 1.5 s leaves the first request head the rest of the 2 s, not a
    // fresh 2 s (which would close it at 3.5 s).
    let mut slow = tcp_from("127.0.0.3", gw.port).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    slow.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 1 80\r\nGET /items HTTP/1.1\r\n")
        .await
        .unwrap();
    let t = closed_after(&mut slow, started).await;
    assert!(
        t >= Duration::from_millis(1900) && t < Duration::from_secs(3),
        "{t:?}"
    );
    assert_eq!(up.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_pingora_refuses_itself_get_the_gateways_json_answer_and_are_counted() {
    let (up, gw) = upstream_and_gateway("").await;
    // A keep-alive connection: a good request, then a broken one.
    let mut s = tcp_from("127.0.0.2", gw.port).await;
    assert!(raw_get(&mut s).await.starts_with("HTTP/1.1 200"));
    s.write_all(b"GET /items HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_json_error(&answer, "HTTP/1.1 400 Bad Request", "malformed request");
    // Not HTTP at all.
    let answer = all_it_says_to("127.0.0.2", gw.port, b"HELLO THERE\r\n\r\n").await;
    assert_json_error(&answer, "HTTP/1.1 400 Bad Request", "malformed request");
    // CONNECT: the gateway is not a forward proxy.
    let connect = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
    let answer = all_it_says_to("127.0.0.2", gw.port, connect).await;
    assert_json_error(&answer, "HTTP/1.1 405 Method Not Allowed", "CONNECT");
    assert_eq!(gw.rejections("malformed_request").await, 2.0);
    assert_eq!(gw.rejections("connect_method").await, 1.0);
    assert_eq!(up.requests(), 1);
}

/// Everything a new connection from `ip` is told after sending `request`, until it is closed.
async fn raw_get(stream: &mut tokio::net::TcpStream) -> String {
    stream
        .write_all(b"GET /items HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_count_idle_connections_and_release_them() {
    let (_up, gw) = upstream_and_gateway("connections: {per_ip: 20, total: 100}\n").await;
    let mut held = Vec::new();
    for i in 0..20 {
        let mut s = tcp_from("127.0.0.2", gw.port).await;
        if i % 2 == 0 {
            // Half of them served one request and now sit idle in keep-alive.
            assert!(raw_get(&mut s).await.starts_with("HTTP/1.1 200"));
        }
        held.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.metric("gateway_downstream_connections").await != 20.0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The 21st from the same IP is answered 503 and closed.
    let refused = || all_it_says("127.0.0.2", gw.port);
    let answer = refused().await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("Retry-After: 1"));
    assert!(answer.contains("too many open connections"));
    // Told once, the same client's next tries within a second are closed without an answer
    // (in pingora's accept loop, no task spawned); a second later it is answered again.
    let told_at = Instant::now();
    assert_eq!(refused().await, "");
    assert_eq!(refused().await, "");
    assert!(told_at.elapsed() < Duration::from_millis(900));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(refused().await.starts_with("HTTP/1.1 503"));
    assert_eq!(gw.rejections("connections_per_ip").await, 4.0);
    // Another IP still gets in.
    let mut other = tcp_from("127.0.0.3", gw.port).await;
    assert!(raw_get(&mut other).await.starts_with("HTTP/1.1 200"));
    drop(other);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = gw.metrics().await;
        if metric_value(&m, "gateway_downstream_connections") == 0.0
            && metric_value(&m, "gateway_downstream_client_ips") == 0.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gauges did not return to 0:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut again = tcp_from("127.0.0.2", gw.port).await;
    assert!(raw_get(&mut again).await.starts_with("HTTP/1.1 200"));
    assert_eq!(gw.rejections("connections_per_ip").await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_total_cap_one_refusal_a_second_is_answered() {
    let (_up, gw) = upstream_and_gateway("connections: {per_ip: 0, total: 2}\n").await;
    let held = [
        tcp_from("127.0.0.2", gw.port).await,
        tcp_from("127.0.0.3", gw.port).await,
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.metric("gateway_downstream_connections").await != 2.0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = |ip| all_it_says(ip, gw.port);
    let answer = refused("127.0.0.4").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("connection limit"), "{answer}");
    // Within the second, anyone else over the total cap is closed without an answer.
    assert_eq!(refused("127.0.0.5").await, "");
    assert_eq!(gw.rejections("connections_total").await, 2.0);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connect_close_cycles_leave_the_gauges_at_zero() {
    let (_up, gw) = upstream_and_gateway("connections: {per_ip: 20, total: 5000}\n").await;
    let mut tasks = Vec::new();
    for w in 0..8u32 {
        let port = gw.port;
        tasks.push(tokio::spawn(async move {
            let from = format!("127.0.1.{}", w + 1);
            for i in 0..1250u32 {
                let mut s = tcp_from(&from, port).await;
                if i % 2 == 0 {
                    let answer = raw_get(&mut s).await;
                    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
                }
                drop(s);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = gw.metrics().await;
        let (c, ips) = (
            metric_value(&m, "gateway_downstream_connections"),
            metric_value(&m, "gateway_downstream_client_ips"),
        );
        if c == 0.0 && ips == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "connections {c}, ips {ips}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_cap_bodies_and_heads_are_refused_before_the_backend() {
    let (up, gw) = upstream_and_gateway(
        "buffers: {max_body_bytes: 1000, max_header_bytes: 4096, max_headers: 20}\n",
    )
    .await;
    let c = client();
    let r = c
        .post(gw.url("/items"))
        .body(vec![b'x'; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(up.requests(), 0, "the backend saw the over-cap request");
    // Chunked (no Content-Length): `n` chunks of `size` bytes.
    let post_chunked = |n: usize, size: usize| {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            (0..n).map(|_| Ok(vec![b'y'; size])).collect();
        c.post(gw.url("/items"))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
    };
    // Cut at the cap; the backend never receives the body.
    let r = post_chunked(4, 500).await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(up.state.bodies.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Under the cap, both ways, the body arrives whole.
    let r = post_chunked(2, 400).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.state.max_body.load(std::sync::atomic::Ordering::SeqCst),
        800
    );

    let r = c
        .get(gw.url("/items"))
        .header("X-Big", "v".repeat(5000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    let mut req = c.get(gw.url("/items"));
    for i in 0..25 {
        req = req.header(format!("X-H{i}"), "1");
    }
    assert_eq!(req.send().await.unwrap().status(), 431);
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(&m, "gateway_rejections_total{reason=\"body_too_large\"}"),
        2.0
    );
    assert_eq!(
        metric_value(&m, "gateway_rejections_total{reason=\"header_too_large\"}"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_closed_at_the_head_deadline() {
    let (up, gw) = upstream_and_gateway("slow_clients: {header_timeout: 1s}\n").await;
    let mut s = tcp_from("127.0.0.6", gw.port).await;
    let started = Instant::now();
    let head = b"GET /items HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed_at = None;
    let mut answer = Vec::new();
    for byte in head.iter() {
        if s.write_all(&[*byte]).await.is_err() {
            closed_at = Some(started.elapsed());
            break;
        }
        // One byte every 200 ms: every single read is quick, the head never completes.
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_at = Some(started.elapsed());
                break;
            }
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]), // the answer before the close
            Err(_) => {}
        }
    }
    let closed_at = closed_at.expect("the slow connection was never closed");
    assert!(
        closed_at >= Duration::from_millis(900) && closed_at < Duration::from_millis(2000),
        "closed after {closed_at:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert_json_error(
        &answer,
        "HTTP/1.1 408 Request Timeout",
        "did not arrive in time",
    );
    // A connection that sends nothing is closed at the deadline too, without an answer (a
    // browser's pre-connect is not told off).
    let started = Instant::now();
    assert_eq!(all_it_says("127.0.0.6", gw.port).await, "");
    let closed_at = started.elapsed();
    assert!(
        closed_at >= Duration::from_millis(900) && closed_at < Duration::from_millis(2000),
        "closed after {closed_at:?}"
    );
    assert_eq!(gw.rejections("header_timeout").await, 2.0);
    assert_eq!(up.requests(), 0);
    // The client's doing, counted: not an error of the gateway's (pingora's ERROR is demoted).
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_below_the_minimum_rate_is_refused_after_its_grace() {
    let (up, gw) =
        upstream_and_gateway("slow_clients: {body_min_rate: 1000, body_min_rate_grace: 1s}\n")
            .await;
    let head = |len: usize| {
        format!(
            "POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {len}\r\n\r\n"
        )
    };
    // 10 bytes every 100 ms (100 B/s against 1000 B/s): no pause is long enough for the
    // idle timeout, but after the 1 s grace the body is refused.
    let mut slow = tcp_from("127.0.0.7", gw.port).await;
    let started = Instant::now();
    slow.write_all(head(100_000).as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    while started.elapsed() < Duration::from_secs(5) {
        if slow.write_all(&[b'x'; 10]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let refused_after = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("too slowly"), "{answer}");
    assert!(
        refused_after >= Duration::from_millis(900) && refused_after < Duration::from_secs(4),
        "{refused_after:?}"
    );
    assert_eq!(gw.rejections("body_too_slow").await, 1.0);
    // A body that keeps up (2,000 bytes every 100 ms for 1.5 s) is taken whole.
    let mut steady = tcp_from("127.0.0.7", gw.port).await;
    steady.write_all(head(30_000).as_bytes()).await.unwrap();
    for _ in 0..15 {
        steady.write_all(&[b'y'; 2000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut buf = [0u8; 1024];
    let n = steady.read(&mut buf).await.unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        up.state.max_body.load(std::sync::atomic::Ordering::SeqCst),
        30_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_408_and_a_broken_chunked_body_400_both_counted() {
    let (_up, gw) = upstream_and_gateway("slow_clients: {body_idle_timeout: 1s}\n").await;
    // Three bytes of ten, then nothing.
    let mut s = tcp_from("127.0.0.8", gw.port).await;
    let started = Instant::now();
    s.write_all(b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await;
    let took = started.elapsed();
    assert_json_error(&answer, "HTTP/1.1 408 Request Timeout", "timed out");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(gw.rejections("client_timeout").await, 1.0);
    // A chunk size that is not hexadecimal.
    let broken = b"POST /items HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
    let answer = all_it_says_to("127.0.0.8", gw.port, broken).await;
    assert_json_error(&answer, "HTTP/1.1 400 Bad Request", "malformed");
    assert_eq!(gw.rejections("malformed_request").await, 1.0);
    tokio::time::sleep(Duration::from_millis(200)).await; // (a log line follows its answer)
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
}

/// The deadline runs from the first byte of each head, not only the first one of a
/// connection: a client that sent a good request and then trickles the next is cut too.
#[tokio::test]
async fn a_trickled_second_request_is_closed_at_its_own_deadline() {
    let (up, gw) = upstream_and_gateway("slow_clients: {header_timeout: 1s}\n").await;
    let mut s = tcp_from("127.0.0.7", gw.port).await;
    // Idle longer than the deadline before the first request: idle time is not head time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(b"GET /items HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("first response")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Keep-alive idle, longer than the deadline: not a head yet, so not cut.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let started = Instant::now();
    let mut closed_at = None;
    for byte in b"GET /items HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
        if s.write_all(&[*byte]).await.is_err() {
            closed_at = Some(started.elapsed());
            break;
        }
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_at = Some(started.elapsed());
                break;
            }
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    let closed_at = closed_at.expect("the trickled second request was never cut");
    assert!(
        closed_at >= Duration::from_millis(900) && closed_at < Duration::from_millis(2000),
        "closed {closed_at:?} after its first byte"
    );
    assert_eq!(gw.rejections("header_timeout").await, 1.0);
    assert_eq!(up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_queue_full_or_timed_out_is_503_within_the_timeout() {
    let up = Upstream::start("a").await;
    let gw = GatewayProc::start(&format!(
        "upstream:\n  max_concurrent_per_backend: 1\n  max_queue: 1\n  queue_timeout: 300ms\n  backends:\n    - \"{}\"\n{HEALTH}",
        up.addr
    ))
    .await;
    gw.wait_backends_up(1).await;
    let mut tasks = Vec::new();
    for i in 0..3u64 {
        let url = gw.url("/slow?ms=1000");
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100 * i)).await;
            let t = Instant::now();
            let r = client().get(url).send().await.unwrap();
            (
                r.status().as_u16(),
                r.headers().get("retry-after").is_some(),
                t.elapsed(),
            )
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(results[0].0, 200, "{results:?}");
    // The second waited in the queue and gave up at the timeout; the third found it full.
    assert_eq!((results[1].0, results[1].1), (503, true), "{results:?}");
    assert!(
        results[1].2 >= Duration::from_millis(280) && results[1].2 < Duration::from_millis(600),
        "{results:?}"
    );
    assert_eq!((results[2].0, results[2].1), (503, true), "{results:?}");
    assert!(results[2].2 < Duration::from_millis(150), "{results:?}");
    assert_eq!(
        up.state
            .max_inflight
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "gateway_rejections_total{reason=\"backend_queue_timeout\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &m,
            "gateway_rejections_total{reason=\"backend_queue_full\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_and_hop_by_hop_cannot_strip_our_headers() {
    let (up, gw) = upstream_and_gateway("").await;
    let mut s = tcp_from("127.0.0.7", gw.port).await;
    s.write_all(
        b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(up.requests(), 0);

    let r = client()
        .get(gw.url("/items"))
        .header("Connection", "X-Forwarded-For")
        .send()
        .await
        .unwrap();
    if r.status() == 200 {
        assert_eq!(up.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    } else {
        assert_eq!(r.status(), 400);
    }
}
