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
            &format!("gateway_backend_ejections_total{{backend=\"{}\"}}", up.addr),
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
