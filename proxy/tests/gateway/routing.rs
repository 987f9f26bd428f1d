//! Routing to several pools by host and path (issue 23), on both engines: the most specific
//! route wins, a prefix can be stripped, a route can answer by itself, no route is 404, and a
//! reload moves a path to another pool under load without an error.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::common::*;

fn pools(api: &Upstream, web: &Upstream) -> String {
    format!(
        "upstreams:\n  api: {{backends: [\"{}\"]}}\n  web: {{backends: [\"{}\"]}}\n",
        api.addr, web.addr
    )
}

const ROUTES: &str = "routes:\n  - {path: /, pool: web}\n  - {path: /api/, pool: api, strip_prefix: true}\n  - {host: admin.example.com, path: /, pool: default}\n  - {path: /old, exact: true, answer: {status: 410, message: gone for good}}\n";

async fn get(gw: &GatewayProc, host: &str, path: &str) -> (u16, String, String) {
    let r = reqwest::Client::new()
        .get(gw.url(path))
        .header("Host", host)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let by = r
        .headers()
        .get("x-served-by")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, by, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_path_routes_on_both_engines() {
    let (default, api, web) = (
        Upstream::start("default").await,
        Upstream::start("api").await,
        Upstream::start("web").await,
    );
    for engine in ["fast_path: true\n", "fast_path: false\n"] {
        let gw = GatewayProc::start(&format!(
            "{engine}upstream:\n  backends: [\"{}\"]\n{HEALTH}{}{ROUTES}",
            default.addr,
            pools(&api, &web)
        ))
        .await;
        gw.wait_backends_up(3).await;
        assert_eq!(
            get(&gw, "www.example.com", "/page").await.1,
            "web",
            "{engine}"
        );
        let before = api.requests();
        let (status, by, _) = get(&gw, "www.example.com", "/api/items?x=1").await;
        assert_eq!((status, by.as_str()), (200, "api"), "{engine}");
        assert_eq!(api.requests(), before + 1);
        // Matched after normalisation too, and the prefix is gone at the pool: `/api/` is
        // stripped, the upstream saw `/items` (its answer says who served; the path is checked
        // by a route that only the stripped path reaches: none here, so by the count).
        assert_eq!(
            get(&gw, "www.example.com", "//api/../api/items").await.1,
            "api",
            "{engine}"
        );
        // An exact host beats every path route.
        assert_eq!(
            get(&gw, "ADMIN.example.com:8000", "/api/x").await.1,
            "default",
            "{engine}"
        );
        let (status, _, body) = get(&gw, "www.example.com", "/old").await;
        assert_eq!(status, 410, "{engine}");
        assert!(body.contains("gone for good"), "{engine}{body}");
        // `/old/x` is not the exact `/old`: the `/` route.
        assert_eq!(
            get(&gw, "www.example.com", "/old/x").await.1,
            "web",
            "{engine}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_and_bad_routes_are_refused_by_dash_t() {
    let (default, api, web) = (
        Upstream::start("default").await,
        Upstream::start("api").await,
        Upstream::start("web").await,
    );
    let gw = GatewayProc::start(&format!(
        "upstream:\n  backends: [\"{}\"]\n{HEALTH}{}routes:\n  - {{host: a.example.com, pool: api}}\n",
        default.addr,
        pools(&api, &web)
    ))
    .await;
    gw.wait_backends_up(3).await;
    let (status, _, body) = get(&gw, "b.example.com", "/").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(gw.rejections("no_route").await, 1.0);
    for (yaml, says) in [
        ("routes:\n  - {path: /, pool: nope}\n", "no pool named"),
        (
            "routes:\n  - {path: /a, pool: default}\n  - {path: /a, pool: default}\n",
            "never be chosen",
        ),
        (
            "upstreams:\n  default: {backends: [\"127.0.0.1:9\"]}\n",
            "taken",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.yaml");
        std::fs::write(
            &path,
            format!("upstream:\n  backends: [\"127.0.0.1:9\"]\n{yaml}"),
        )
        .unwrap();
        let out = std::process::Command::new(gateway_bin())
            .arg("-t")
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{yaml}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_a_path_to_another_pool_under_load_without_an_error() {
    let (default, api, web) = (
        Upstream::start("default").await,
        Upstream::start("api").await,
        Upstream::start("web").await,
    );
    let config = |pool: &str| {
        format!(
            "upstream:\n  backends: [\"{}\"]\n{HEALTH}{}routes:\n  - {{path: /, pool: default}}\n  - {{path: /moving/, pool: {pool}}}\n",
            default.addr,
            pools(&api, &web)
        )
    };
    let gw = GatewayProc::start(&config("api")).await;
    gw.wait_backends_up(3).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed, load) = steady_load(gw.url("/moving/x"), 3, &stop);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    gw.rewrite(&config("web"));
    assert_eq!(gw.reload().await.1, 0.0);
    let web_before = web.requests();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "of {}",
        sent.load(Ordering::SeqCst)
    );
    assert!(web.requests() > web_before, "the path moved to `web`");
    assert_eq!(get(&gw, "h", "/moving/y").await.1, "web");
}
