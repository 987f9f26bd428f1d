//! Load balancing that sees slow and failing backends (issue 23): `least_conn` and
//! `p2c_ewma` send a backend slowed by 50 ms far less than its third, and a backend answering
//! 500s is ejected after N failures in a row, within the pool's ejection share, and comes back.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use crate::common::*;

/// `n` requests from `concurrency` clients at once; how many each backend served.
async fn spread(gw: &GatewayProc, n: usize, concurrency: usize) -> HashMap<String, usize> {
    let url = gw.url("/items");
    let per = n / concurrency;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            let mut seen = HashMap::new();
            for _ in 0..per {
                let r = c.get(&url).send().await.unwrap();
                let by = r
                    .headers()
                    .get("x-served-by")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_else(|| format!("status {}", r.status()));
                *seen.entry(by).or_insert(0) += 1;
            }
            seen
        }));
    }
    let mut all = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *all.entry(k).or_insert(0) += v;
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_and_p2c_ewma_avoid_a_slow_backend() {
    let (a, b, slow) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("slow").await,
    );
    slow.state.delay_ms.store(50, Ordering::SeqCst);
    for balance in ["least_conn", "p2c_ewma", "round_robin"] {
        let gw = GatewayProc::start(&format!(
            "limits: {{global: null, per_ip: null}}\nupstream:\n  balance: {balance}\n  backends:\n{}{HEALTH}",
            backends_yaml(&[&a, &b, &slow])
        ))
        .await;
        gw.wait_backends_up(3).await;
        let seen = spread(&gw, 300, 6).await;
        let share = *seen.get("slow").unwrap_or(&0) as f64 / 300.0;
        println!("{balance}: {seen:?}");
        if balance == "round_robin" {
            // The control: a third, whatever it costs.
            assert!((0.30..0.37).contains(&share), "{balance}: {seen:?}");
        } else {
            assert!(
                share < 0.15,
                "{balance}: the slow backend got {share:.2}: {seen:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_is_ejected_within_the_share_and_comes_back() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    b.state.failing.store(true, Ordering::SeqCst);
    c.state.failing.store(true, Ordering::SeqCst);
    let gw = GatewayProc::start(&format!(
        "limits: {{global: null, per_ip: null}}\nupstream:\n  outlier: {{consecutive_failures: 3, base_ejection: 1s, max_ejection_percent: 34}}\n  backends:\n{}{HEALTH}",
        backends_yaml(&[&a, &b, &c])
    ))
    .await;
    gw.wait_backends_up(3).await;
    let seen = spread(&gw, 60, 1).await;
    // One of the two failing backends was ejected (34% of three: one), the other was not.
    let ejections = |m: &str, up: &Upstream| {
        metric_value(
            m,
            &format!(
                "gateway_backend_ejections_total{{backend=\"{}\",pool=\"default\"}}",
                up.addr
            ),
        )
    };
    let m = gw.metrics().await;
    let (eb, ec) = (ejections(&m, &b), ejections(&m, &c));
    assert_eq!(eb + ec, 1.0, "{seen:?}\n{m}");
    assert_eq!(ejections(&m, &a), 0.0);
    // After the ejection ran out, and the backend healed, it serves again.
    b.state.failing.store(false, Ordering::SeqCst);
    c.state.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let seen = spread(&gw, 60, 1).await;
    for name in ["a", "b", "c"] {
        assert!(seen.get(name).copied().unwrap_or(0) >= 15, "{seen:?}");
    }
}

/// An upgraded connection (WebSocket) is proxied end to end on both engines: the 101, then
/// bytes both ways; it is counted as a connection, and cut after `timeouts.websocket_idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_tunnelled_and_cut_when_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A backend that answers `/ready` and upgrades `/ws`, then echoes what it gets, upper-cased.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET /ready") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .await;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let up = buf[..n].to_ascii_uppercase();
                            if s.write_all(&up).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    for engine in ["fast_path: true\n", "fast_path: false\n"] {
        let gw = GatewayProc::start(&format!(
            "{engine}timeouts: {{websocket_idle: 1s}}\nupstream:\n  backends: [\"{addr}\"]\n{HEALTH}"
        ))
        .await;
        gw.wait_backends_up(1).await;
        let mut c = tcp_from("127.0.0.1", gw.port).await;
        c.write_all(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "{engine}closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 101"),
            "{engine}{}",
            String::from_utf8_lossy(&got)
        );
        for msg in [&b"hello"[..], b"frames both ways"] {
            c.write_all(msg).await.unwrap();
            let n = c.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], msg.to_ascii_uppercase().as_slice(), "{engine}");
        }
        assert_eq!(
            gw.metric("gateway_downstream_connections").await,
            1.0,
            "{engine}"
        );
        // Idle both ways: cut after about a second.
        let started = std::time::Instant::now();
        let took = closed_after(&mut c, started).await;
        assert!(took < std::time::Duration::from_secs(5), "{engine}{took:?}");
    }
}

/// `balance: hash` on a header: a key always goes to the same backend, keys spread over all,
/// and a backend leaving moves only its own keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_keeps_a_key_on_its_backend_and_a_leaving_one_moves_only_its_share() {
    let (a, b, mut c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let gw = GatewayProc::start(&format!(
        "limits: {{global: null, per_ip: null}}\nupstream:\n  balance: hash\n  hash_key: \"header:X-User\"\n  backends:\n{}{HEALTH}",
        backends_yaml(&[&a, &b, &c])
    ))
    .await;
    gw.wait_backends_up(3).await;
    let client = reqwest::Client::new();
    let served = |user: String| {
        let (client, url) = (client.clone(), gw.url("/items"));
        async move {
            let r = client.get(url).header("X-User", user).send().await.unwrap();
            r.headers()["x-served-by"].to_str().unwrap().to_string()
        }
    };
    let mut before = HashMap::new();
    for u in 0..60 {
        let first = served(format!("user-{u}")).await;
        for _ in 0..3 {
            assert_eq!(served(format!("user-{u}")).await, first, "user-{u} moved");
        }
        before.insert(u, first);
    }
    let mut per: HashMap<&str, usize> = HashMap::new();
    for v in before.values() {
        *per.entry(v.as_str()).or_insert(0) += 1;
    }
    assert_eq!(per.len(), 3, "keys spread over all three: {per:?}");
    // c leaves (killed; marked down by its checks): only c's keys move.
    c.kill();
    gw.wait_backends_up(2).await;
    for (u, was) in &before {
        let now = served(format!("user-{u}")).await;
        if was != "c" {
            assert_eq!(&now, was, "user-{u} moved although its backend stayed");
        } else {
            assert_ne!(now, "c");
        }
    }
}
