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
        // Every spelling of `/old` takes its route: a client cannot walk around a route
        // by dot segments, doubled slashes or percent-encoded unreserved characters.
        for spelling in ["/api/../old", "//old", "/%6fld", "/./old", "/x/%2e%2e/old"] {
            let (status, _, _) = get(&gw, "www.example.com", spelling).await;
            assert_eq!(status, 410, "{engine}{spelling}");
        }
        // `/old/x` is not the exact `/old`: the `/` route.
        assert_eq!(
            get(&gw, "www.example.com", "/old/x").await.1,
            "web",
            "{engine}"
        );
    }
}

/// What a route sets, on both engines: methods and a header narrow it, its target is
/// rewritten, its header edits reach the pool (and a client cannot pre-empt them), its body
/// cap and its own rate limit hold, and its requests are counted by route and pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_settings_on_both_engines() {
    let (default, api, web) = (
        Upstream::start("default").await,
        Upstream::start("api").await,
        Upstream::start("web").await,
    );
    let routes = "routes:\n  - {name: reads, path: /api/, pool: api, replace_prefix: /v2/, request_headers: {set: {X-Env: prod}, remove: [X-Secret]}}\n  - {name: writes, path: /api/, methods: [POST], pool: web, max_body_bytes: 10}\n  - {name: canary, path: /api/, header: {name: X-Canary, value: \"1\"}, pool: web}\n  - {name: limited, path: /limited/, pool: api, limit: {rate: 1r/m, burst: 1}}\n";
    for engine in ["fast_path: true\n", "fast_path: false\n"] {
        let gw = GatewayProc::start(&format!(
            "{engine}upstream:\n  backends: [\"{}\"]\n{HEALTH}{}{routes}",
            default.addr,
            pools(&api, &web)
        ))
        .await;
        gw.wait_backends_up(3).await;
        let client = reqwest::Client::new();
        let r = client
            .get(gw.url("/api/items?x=1"))
            .header("X-Secret", "s")
            .header("X-Env", "spoofed")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{engine}");
        assert_eq!(api.target(), "/v2/items?x=1", "{engine}");
        assert_eq!(api.header("x-env").as_deref(), Some("prod"), "{engine}");
        assert_eq!(api.header("x-secret"), None, "{engine}");
        let served = |r: &reqwest::Response| {
            r.headers()
                .get("x-served-by")
                .map(|v| v.to_str().unwrap().to_string())
        };
        // The method and the header narrow the `/api/` routes.
        let r = client
            .post(gw.url("/api/items"))
            .body("0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(
            (r.status().as_u16(), served(&r).as_deref()),
            (200, Some("web")),
            "{engine}"
        );
        let r = client
            .get(gw.url("/api/items"))
            .header("X-Canary", "1")
            .send()
            .await
            .unwrap();
        assert_eq!(served(&r).as_deref(), Some("web"), "{engine}");
        // The write route's body cap: declared, and chunked (read by pingora's engine).
        let r = client
            .post(gw.url("/api/items"))
            .body("0123456789a")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413, "{engine}");
        let chunks = futures_util::stream::iter(
            ["01234567", "89abcdef"].map(|c| Ok::<_, std::io::Error>(c.as_bytes().to_vec())),
        );
        let r = client
            .post(gw.url("/api/items"))
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413, "{engine}");
        // A bigger body is fine where the route does not cap it (PUT takes `reads`).
        let r = client
            .put(gw.url("/api/items"))
            .body("x".repeat(1000))
            .send()
            .await
            .unwrap();
        assert_eq!(
            (r.status().as_u16(), served(&r).as_deref()),
            (200, Some("api")),
            "{engine}"
        );
        // The route's own limit: 1 now and 1 of burst, then 429 with Retry-After; other
        // routes are not affected.
        for _ in 0..2 {
            let r = client.get(gw.url("/limited/x")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{engine}");
        }
        let r = client.get(gw.url("/limited/x")).send().await.unwrap();
        assert_eq!(r.status(), 429, "{engine}");
        assert!(r.headers().contains_key("retry-after"), "{engine}");
        let r = client.get(gw.url("/api/x")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{engine}");
        let m = gw.metrics().await;
        assert!(
            metric_value(
                &m,
                "gateway_route_requests_total{code=\"2xx\",pool=\"api\",route=\"reads\"}"
            ) >= 2.0,
            "{engine}{m}"
        );
        assert_eq!(
            metric_value(
                &m,
                "gateway_route_requests_total{code=\"4xx\",pool=\"api\",route=\"limited\"}"
            ),
            1.0,
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
        let (ok, err) = check_config(&format!("upstream:\n  backends: [\"127.0.0.1:9\"]\n{yaml}"));
        assert!(!ok && err.contains(says), "{yaml}: {err}");
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
