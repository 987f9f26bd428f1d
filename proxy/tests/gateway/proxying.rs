//! Black-box tests of the gateway core: the real binary in front of real HTTP upstreams.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

async fn served_by_counts(gw: &GatewayProc, n: usize) -> HashMap<String, usize> {
    let c = client();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = c.get(gw.url("/items")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let who = r.headers()["x-served-by"].to_str().unwrap().to_string();
        *counts.entry(who).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_is_even_and_weighted() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let gw = GatewayProc::start(&format!(
        "upstream:\n  backends:\n{}{HEALTH}",
        backends_yaml(&[&a, &b, &c])
    ))
    .await;
    gw.wait_backends_up(3).await;
    let counts = served_by_counts(&gw, 300).await;
    for name in ["a", "b", "c"] {
        let n = counts[name];
        assert!((99..=101).contains(&n), "{name} got {n}: {counts:?}");
    }
    drop(gw);

    let gw = GatewayProc::start(&format!(
        "upstream:\n  backends:\n    - {{address: \"{}\", weight: 1}}\n    - {{address: \"{}\", weight: 2}}\n{HEALTH}",
        a.addr, b.addr
    ))
    .await;
    gw.wait_backends_up(2).await;
    let counts = served_by_counts(&gw, 300).await;
    assert!((99..=101).contains(&counts["a"]), "{counts:?}");
    assert!((199..=201).contains(&counts["b"]), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_upstream_is_retried_then_marked_down_then_back() {
    let a = Upstream::start("a").await;
    let mut b = Upstream::start("b").await;
    let gw = GatewayProc::start(&format!(
        "upstream:\n  backends:\n{}{HEALTH}",
        backends_yaml(&[&a, &b])
    ))
    .await;
    gw.wait_backends_up(2).await;
    let failures = format!(
        "gateway_upstream_connect_failures_total{{backend=\"{}\"}}",
        b.addr
    );

    b.kill();
    let killed = Instant::now();
    // interval 200ms x failures 2 + 1 s: after this the dead backend gets no request.
    let settle = Duration::from_millis(200 * 2 + 1000);
    let c = client();
    let mut errors = 0;
    let mut sent = 0;
    while killed.elapsed() < settle {
        let r = c.get(gw.url("/items")).send().await;
        sent += 1;
        if !r.is_ok_and(|r| r.status() == 200) {
            errors += 1;
        }
    }
    assert_eq!(
        errors, 0,
        "{errors} of {sent} requests failed while the backend died"
    );
    let attempts_after_settle = gw.metric(&failures).await;
    for _ in 0..50 {
        let r = c.get(gw.url("/items")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-served-by"], "a");
    }
    assert_eq!(
        gw.metric(&failures).await,
        attempts_after_settle,
        "the dead backend was still tried after interval x failures + 1s"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            &format!(
                "gateway_backend_up{{backend=\"{}\",pool=\"default\"}}",
                b.addr
            )
        ),
        0.0
    );

    b.restart().await;
    gw.wait_backends_up(2).await;
    let counts = served_by_counts(&gw, 20).await;
    assert_eq!(counts.get("b"), Some(&10), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_never_passes_a_check_never_gets_a_request() {
    let good = Upstream::start("good").await;
    let never = Upstream::start_never_ready("never").await;
    let gw = GatewayProc::start(&format!(
        "upstream:\n  backends:\n{}{HEALTH}",
        backends_yaml(&[&good, &never])
    ))
    .await;
    // Send from the very first moment: pingora alone would treat `never` as healthy until it
    // failed `failures` checks.
    let c = client();
    for _ in 0..100 {
        let r = c.get(gw.url("/items")).send().await.unwrap();
        assert!(r.status() == 200 || r.status() == 503, "{}", r.status());
    }
    assert!(never.state.probes.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert_eq!(never.requests(), 0);
    assert!(good.requests() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_is_503_json_with_retry_after() {
    let mut a = Upstream::start("a").await;
    let addr = a.addr;
    a.kill();
    let gw = GatewayProc::start(&format!(
        "upstream:\n  backends:\n    - \"{addr}\"\n{HEALTH}"
    ))
    .await;
    let r = client().get(gw.url("/items")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.headers().contains_key("x-request-id"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no healthy backend"),
        "{body}"
    );
    assert_eq!(gw.rejections("no_healthy_backend").await, 1.0);
    // Counted and in the access log; not one ERROR line per refused request.
    tokio::time::sleep(Duration::from_millis(200)).await; // (a log line follows its answer)
    assert!(!gw.log().contains("ERROR"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_is_504_and_a_dropped_answer_is_502_both_json() {
    let (a, gw) = upstream_and_gateway("timeouts: {read: 300ms}\n").await;
    let c = client();
    for (path, status, says) in [
        ("/slow?ms=3000", 504, "did not answer in time"),
        ("/drop", 502, "failed to answer"),
    ] {
        let started = Instant::now();
        let r = c.get(gw.url(path)).send().await.unwrap();
        let took = started.elapsed();
        assert_eq!(r.status(), status, "{path}");
        assert_eq!(r.headers()["content-type"], "application/json", "{path}");
        assert_eq!(r.headers()["x-request-id"].len(), 20, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["status"], status, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(says),
            "{path}: {body}"
        );
        assert!(took < Duration::from_secs(2), "{path} took {took:?}");
    }
    // Neither is the client's doing: no rejection reason, both counted as the backend's 5xx.
    let series = format!(
        "gateway_requests_total{{backend=\"{}\",code=\"5xx\"}}",
        a.addr
    );
    assert_eq!(gw.metric_after_answer(&series, 2.0).await, 2.0);
    assert_eq!(
        gw.metric_after_answer("gateway_inflight_requests", 0.0)
            .await,
        0.0
    );
    // The backend's failures are the operator's business: logged as errors.
    // (written just after the answer: wait for it a little)
    let logged = |log: &str, status: &str| {
        log.lines()
            .any(|l| l.contains("ERROR ") && l.contains("] Fail to proxy") && l.contains(status))
    };
    let log = after_answer(
        || async { gw.log() },
        |log| logged(log, "status: 504") && logged(log, "status: 502"),
    )
    .await;
    assert!(
        logged(&log, "status: 504") && logged(&log, "status: 502"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_test_did_and_headers_are_forwarded() {
    let (a, gw) = upstream_and_gateway("").await;
    let c = client();
    for _ in 0..7 {
        assert_eq!(c.get(gw.url("/items")).send().await.unwrap().status(), 200);
    }
    let r = c
        .get(gw.url("/items"))
        .header("X-Request-Id", "abc-123")
        .header("X-Forwarded-For", "203.0.113.9")
        .header("Connection", "keep-alive, X-Custom-Hop")
        .header("X-Custom-Hop", "secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    assert_eq!(a.header("x-request-id").as_deref(), Some("abc-123"));
    assert_eq!(
        a.header("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(a.header("x-real-ip").as_deref(), Some("127.0.0.1"));
    assert_eq!(a.header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(a.header("x-custom-hop"), None, "hop-by-hop header leaked");

    let r = c.get(gw.url("/items")).send().await.unwrap();
    let generated = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 20);
    assert_eq!(a.header("x-request-id"), Some(generated));

    let m = gw.metrics().await;
    let series = format!(
        "gateway_requests_total{{backend=\"{}\",code=\"2xx\"}}",
        a.addr
    );
    assert_eq!(metric_value(&m, &series), 9.0, "{m}");
    assert_eq!(
        metric_value(&m, "gateway_request_duration_seconds_count"),
        9.0
    );
    assert_eq!(
        metric_value(
            &m,
            &format!(
                "gateway_backend_up{{backend=\"{}\",pool=\"default\"}}",
                a.addr
            )
        ),
        1.0
    );
    assert_eq!(metric_value(&m, "gateway_inflight_requests"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish() {
    let (a, mut gw) = upstream_and_gateway("shutdown_grace: 5s\n").await;
    let url = gw.url("/slow?ms=1000");
    let inflight = tokio::spawn(async move { client().get(url).send().await });
    while a.state.inflight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = Instant::now();
    gw.signal(15);
    let r = inflight
        .await
        .unwrap()
        .expect("in-flight request completed");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "{\"served_by\":\"a\"}");
    // It exits once drained, well before the grace period ends.
    let deadline = Instant::now() + Duration::from_secs(4);
    let status = loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not exit after draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    assert!(sent.elapsed() < Duration::from_secs(4));
}

#[test]
fn dash_t_accepts_the_shipped_config_and_rejects_bad_ones() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/gateway.yaml");
    let (ok, out) = check_config(&std::fs::read_to_string(shipped).unwrap());
    assert!(ok, "{out}");
    assert!(out.contains("is valid"));

    let cases = [
        (
            "unknown key",
            "upstream:\n  backends: [\"127.0.0.1:1\"]\nworkerz: 2\n",
            "workerz",
        ),
        (
            "bad duration",
            "upstream:\n  backends: [\"127.0.0.1:1\"]\ntimeouts:\n  connect: soon\n",
            "timeouts.connect",
        ),
        (
            "empty pool",
            "upstream:\n  backends: []\n",
            "upstream.backends",
        ),
        (
            "bad address",
            "upstream:\n  backends: [\"127.0.0.1\"]\n",
            "upstream.backends",
        ),
        (
            "zero interval",
            "upstream:\n  backends: [\"127.0.0.1:1\"]\n  health_check:\n    interval: 0ms\n",
            "upstream.health_check.interval",
        ),
        ("bad yaml", "upstream: [\n", "line"),
    ];
    for (what, yaml, key) in cases {
        let (ok, out) = check_config(yaml);
        assert!(!ok, "{what}: accepted");
        assert!(
            out.contains(key),
            "{what}: message does not name {key}: {out}"
        );
        assert!(out.contains("line"), "{what}: message has no line: {out}");
    }
}

/// Data segments the kernel has received on the TCP socket whose local address is `local`
/// (`ss`'s `data_segs_in`, from the kernel's `tcp_info`; `ss` leaves it out while it is 0).
fn data_segments_in(local: std::net::SocketAddr) -> u64 {
    let out = Command::new("ss")
        .args(["-tinH", "src", &local.to_string()])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .map(|n| n.parse::<u64>().unwrap())
    };
    assert!(
        field("segs_in:").is_some(),
        "no tcp_info for {local} in: {text}"
    );
    field("data_segs_in:").unwrap_or(0)
}

/// One GET on a kept-alive raw connection, read to the end of its body; the data segments it
/// arrived in.
async fn segments_of_one_answer(conn: &mut tokio::net::TcpStream, path: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let before = data_segments_in(conn.local_addr().unwrap());
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    let complete = |got: &[u8]| {
        let text = String::from_utf8_lossy(got);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_string)
            })?
            .trim()
            .parse()
            .ok()?;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        (body.len() >= length).then_some(())
    };
    while complete(&got).is_none() {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("the answer arrives")
            .unwrap();
        assert!(n > 0, "closed before the answer was complete");
        got.extend_from_slice(&buf[..n]);
    }
    data_segments_in(conn.local_addr().unwrap()) - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_and_body_that_fit_the_write_buffer_go_out_in_one_segment() {
    // Segments per answer, small (the harness's 25-byte JSON) and 4,500 bytes (about GET /items
    // on the demo's backend). The fast path writes head and body in one write whatever the
    // buffer. On pingora's path it depends on `buffers.client_write_bytes`: the default gathers
    // both in one write; pingora's own default (1,460) wrote the larger one in two; 0 writes
    // through. One write is always one segment on loopback; two writes can still be merged by
    // the kernel (TCP autocorking, when the first is not yet sent), so the two-write settings
    // must show two segments at least once in five answers, and the others never more than one.
    let up = Upstream::start("a").await;
    let pingora = "fast_path: false\n";
    for (setting, fast, small, large) in [
        ("", true, 1, 1),
        ("0", true, 1, 1),
        ("", false, 1, 1),
        ("1460", false, 1, 2),
        ("0", false, 2, 2),
    ] {
        let mut extra = match setting {
            "" => String::new(),
            n => format!("buffers: {{client_write_bytes: {n}}}\n"),
        };
        extra += if fast { "fast_path: true\n" } else { pingora };
        let gw = gateway_with(&up, &extra).await;
        let mut conn = tcp_from("127.0.0.1", gw.port).await;
        for (path, expected) in [("/items", small), ("/big?bytes=4500", large)] {
            let mut seen = Vec::new();
            for _ in 0..5 {
                seen.push(segments_of_one_answer(&mut conn, path).await);
            }
            let ok = if expected == 1 {
                seen.iter().all(|&n| n == 1)
            } else {
                seen.iter().all(|&n| (1..=expected).contains(&n)) && seen.contains(&expected)
            };
            assert!(
                ok,
                "{path} with client_write_bytes {setting:?}, fast path {fast}: segments {seen:?}"
            );
        }
        if setting.is_empty() {
            // An answer larger than the buffer still arrives whole, on either path.
            let body = client()
                .get(gw.url("/big?bytes=100000"))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(body.len(), 100_000);
        }
    }
}
