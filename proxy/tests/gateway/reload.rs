//! Black-box tests of in-place reload: SIGHUP and file watching on the real binary, under
//! load from the test, and DNS re-resolution through a hosts file.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

/// Checks every 100 ms: reload tests watch backends come and go.
const QUICK_HEALTH: &str =
    "  health_check: {interval: 100ms, timeout: 200ms, failures: 2, successes: 1}\n";

fn pool(ups: &[&Upstream]) -> String {
    format!(
        "upstream:\n  backends:\n{}{QUICK_HEALTH}",
        backends_yaml(ups)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_under_load_drop_nothing_and_removed_backends_get_nothing() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = GatewayProc::start(&pool(&[&a])).await;
    gw.wait_backends_up(1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed, load) = steady_load(gw.url("/items"), 4, &stop);
    for i in 0..10 {
        // Alternate: add b with a per-IP limit, then remove it with another limit.
        let adding = i % 2 == 0;
        let limit = if adding { "100000r/s" } else { "200000r/s" };
        let ups: Vec<&Upstream> = if adding { vec![&a, &b] } else { vec![&a] };
        gw.rewrite(&format!(
            "limits:\n  global: null\n  per_ip: {{rate: {limit}, burst: 1000}}\n{}",
            pool(&ups)
        ));
        let (ok, errors) = gw.reload().await;
        assert_eq!((ok, errors), ((i + 1) as f64, 0.0), "{}", gw.log());
        if adding {
            gw.wait_backends_up(2).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        } else {
            // Requests already sent to b may still arrive; then nothing more.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let after_removal = b.requests();
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(
                b.requests(),
                after_removal,
                "removed backend got new requests"
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert!(sent > 100, "too little load: {sent}");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed across 10 reloads"
    );
    assert!(b.requests() > 0, "the added backend never served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_flight_to_a_removed_backend_completes() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let gw = GatewayProc::start(&pool(&[&b])).await;
    gw.wait_backends_up(1).await;
    let url = gw.url("/slow?ms=1000");
    let inflight = tokio::spawn(async move { client().get(url).send().await });
    while b.state.inflight.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.rewrite(&pool(&[&a]));
    assert_eq!(gw.reload().await, (1.0, 0.0));
    let r = inflight.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-served-by"], "b");
    gw.wait_backends_up(1).await;
    let r = client().get(gw.url("/items")).send().await.unwrap();
    assert_eq!(r.headers()["x-served-by"], "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_raises_the_log_level_as_well_as_lowering_it() {
    let a = Upstream::start("a").await;
    let gw = GatewayProc::start(&format!("log_level: warn\n{}", pool(&[&a]))).await;
    gw.wait_backends_up(1).await;
    let c = client();
    // The access line is written after the answer: wait a little for the expected count.
    let access_lines_become = |n: usize| {
        after_answer(
            || async { gw.log().matches(" access] ").count() },
            move |&seen| seen == n,
        )
    };
    assert_eq!(c.get(gw.url("/items")).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(access_lines_become(0).await, 0, "{}", gw.log());
    for (level, lines) in [("info", 1), ("error", 1), ("info", 2)] {
        gw.rewrite(&format!("log_level: {level}\n{}", pool(&[&a])));
        gw.reload().await;
        assert_eq!(c.get(gw.url("/items")).send().await.unwrap().status(), 200);
        if level == "error" {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            access_lines_become(lines).await,
            lines,
            "at {level}: {}",
            gw.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_change_nothing_and_the_next_good_one_applies() {
    let a = Upstream::start("a").await;
    let limited = format!(
        "limits:\n  global: null\n  per_ip: {{rate: 1r/m, burst: 0}}\n{}",
        pool(&[&a])
    );
    let mut gw = GatewayProc::start(&limited).await;
    gw.wait_backends_up(1).await;
    let c = client_from("127.0.0.2");
    assert_eq!(c.get(gw.url("/items")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(gw.url("/items")).send().await.unwrap().status(), 429);

    let broken = [
        "upstream: [\n".to_string(),
        format!("limitz: {{}}\n{}", pool(&[&a])),
        format!("limits:\n  per_ip: {{rate: fast}}\n{}", pool(&[&a])),
    ];
    for (i, text) in broken.iter().enumerate() {
        std::fs::write(&gw.config_path, text).unwrap();
        let (ok, errors) = gw.reload().await;
        assert_eq!((ok, errors), (0.0, (i + 1) as f64));
        // Still up, still on the old config.
        assert!(gw.child.try_wait().unwrap().is_none(), "the gateway exited");
        assert_eq!(c.get(gw.url("/items")).send().await.unwrap().status(), 429);
    }
    assert!(
        gw.log().contains("line"),
        "the error names the line: {}",
        gw.log()
    );

    // A changed limit takes effect on the very next request.
    gw.rewrite(&format!(
        "limits:\n  global: null\n  per_ip: null\n{}",
        pool(&[&a])
    ));
    assert_eq!(gw.reload().await, (1.0, 3.0));
    assert_eq!(c.get(gw.url("/items")).send().await.unwrap().status(), 200);
    let m = gw.metrics().await;
    assert!(m.contains("gateway_config_info{hash=\""), "{m}");
    assert!(metric_value(&m, "gateway_config_last_reload_success_timestamp_seconds") > 1.7e9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_configmap_symlink_swap_is_picked_up_once() {
    let a = Upstream::start("a").await;
    let body = format!(
        "watch: true\nlimits:\n  global: null\n  per_ip: {{rate: 1r/m, burst: 0}}\n{}",
        pool(&[&a])
    );
    // The layout kubelet makes: gateway.yaml -> ..data/gateway.yaml, ..data -> ..v1
    let gw = GatewayProc::start_with(&body, |dir, yaml| {
        std::fs::create_dir(dir.join("..v1")).unwrap();
        std::fs::write(dir.join("..v1/gateway.yaml"), yaml).unwrap();
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/gateway.yaml", dir.join("gateway.yaml")).unwrap();
        dir.join("gateway.yaml")
    })
    .await;
    gw.wait_backends_up(1).await;
    let c = client_from("127.0.0.3");
    assert_eq!(c.get(gw.url("/items")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(gw.url("/items")).send().await.unwrap().status(), 429);

    let dir = gw.dir.path();
    std::fs::create_dir(dir.join("..v2")).unwrap();
    let next = format!(
        "watch: true\nlimits:\n  global: null\n  per_ip: null\n{}",
        pool(&[&a])
    );
    std::fs::write(dir.join("..v2/gateway.yaml"), gw.render(&next)).unwrap();
    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..v1")).unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.reload_counts().await.0 < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the swap was not picked up: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        gw.reload_counts().await,
        (1.0, 0.0),
        "picked up exactly once"
    );
    assert_eq!(c.get(gw.url("/items")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_backends_are_resolved_and_followed() {
    // Two upstreams on the same port, on two loopback addresses.
    let first = Upstream::start("first").await;
    let port = first.addr.port();
    let second = Upstream::start_at("second", format!("127.0.0.2:{port}").parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 backend.test\n").unwrap();
    let gw = GatewayProc::start(&format!(
        "upstream:\n  hosts_file: \"{}\"\n  backends:\n    - {{address: \"backend.test:{port}\", resolve: 200ms}}\n    - {{address: \"localhost:{port}\", resolve: 200ms}}\n{QUICK_HEALTH}",
        hosts.display()
    ))
    .await;
    gw.wait_backends_up(1).await;
    let r = client().get(gw.url("/items")).send().await.unwrap();
    assert_eq!(r.headers()["x-served-by"], "first");

    // The name now points elsewhere: followed without a reload.
    std::fs::write(&hosts, "127.0.0.2 backend.test\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = gw.metrics().await;
        if m.contains(&format!(
            "gateway_backend_up{{backend=\"127.0.0.2:{port}\",pool=\"default\"}} 1"
        )) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "address change not followed:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut served = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = client().get(gw.url("/items")).send().await.unwrap();
        served.insert(r.headers()["x-served-by"].to_str().unwrap().to_string());
    }
    assert!(served.contains("second"), "{served:?}");

    // Resolution failures keep the last known addresses.
    std::fs::write(&hosts, "").unwrap();
    std::fs::remove_file(&hosts).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        gw.metric("gateway_dns_resolutions_total{result=\"error\"}")
            .await
            > 0.0
    );
    let r = client().get(gw.url("/items")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    drop(second);
}
