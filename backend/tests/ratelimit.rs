//! Per-user limits shared through a real redis-server by three backend instances.

mod common;

use std::time::{Duration, Instant};

use common::*;
use floodgate_backend::db::Db;
use futures_util::StreamExt;
use serde_json::Value;

/// Three instances sharing one SQLite file (with the demo keys) and `redis`.
struct Cluster {
    apps: Vec<TestApp>,
    _data: tempfile::TempDir,
}

impl Cluster {
    async fn start(
        redis: Option<&RedisServer>,
        tweak: impl Fn(&mut floodgate_backend::config::Settings),
    ) -> Cluster {
        let data = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/shared.db", data.path().display());
        let db = Db::connect(&test_settings(Some(url.clone())).db()).unwrap();
        db.migrate().await.unwrap();
        for (user, tier, key) in [
            ("free-user", "free", "k-free"),
            ("free-user-2", "free", "k-free-2"),
            ("pro-user", "pro", "k-pro"),
            ("ent-user", "enterprise", "k-ent"),
        ] {
            db.upsert_user_key(user, tier, key).await.unwrap();
        }
        db.close().await;
        let mut apps = Vec::new();
        for _ in 0..3 {
            let mut s = test_settings(Some(url.clone()));
            s.redis_url = redis.map(|r| r.url());
            s.admission = floodgate_backend::admission::Mode::Fixed; // not what these test
            s.max_in_flight = 1000;
            // Exact counts are about atomicity, not the outage path (tested on its own below):
            // a loaded test machine must not push Redis calls past the timeout into fallback.
            s.redis_timeout = Duration::from_secs(2);
            tweak(&mut s);
            apps.push(spawn_app(s).await);
        }
        Cluster { apps, _data: data }
    }

    fn url(&self, i: usize, path: &str) -> String {
        self.apps[i % self.apps.len()].url(path)
    }
}

async fn get_with_key(c: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    c.get(url).header("X-API-Key", key).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_limits_hold_across_three_instances() {
    let redis = RedisServer::start();
    let cluster = Cluster::start(Some(&redis), |_| {}).await;
    let c = reqwest::Client::new();
    let first = Instant::now();
    let mut statuses = Vec::new();
    for i in 0..30 {
        let r = get_with_key(&c, &cluster.url(i, "/items"), "k-free").await;
        if i == 0 {
            let h = r.headers();
            assert_eq!(h["ratelimit-policy"], "10;w=60");
            assert_eq!(h["ratelimit"], "limit=10, remaining=9, reset=60");
            assert_eq!(h["x-ratelimit-limit"], "10");
            assert_eq!(h["x-ratelimit-window"], "60s");
        }
        if r.status() == 429 {
            let h = r.headers();
            let retry_after: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
            // The first admitted request leaves the window 60 s after it was made.
            let real_wait = Duration::from_secs(60).saturating_sub(first.elapsed());
            assert!(
                retry_after >= 1 && retry_after <= real_wait.as_secs() + 1,
                "{retry_after} vs {real_wait:?}"
            );
            assert!(h["ratelimit"]
                .to_str()
                .unwrap()
                .starts_with("limit=10, remaining=0, reset="));
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["limit"], "tier:free");
            assert!(
                body["error"].as_str().unwrap().contains("tier:free"),
                "{body}"
            );
            statuses.push(429);
        } else {
            statuses.push(r.status().as_u16());
        }
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10);
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 20);
    assert!(statuses[..10].iter().all(|s| *s == 200));

    // Pro and enterprise at their limits, counted apart from each other (32 clients at a
    // time, like a busy user, rather than a thousand at once).
    for (key, limit) in [("k-pro", 100), ("k-ent", 1000)] {
        let statuses: Vec<u16> = futures_util::stream::iter(0..(limit + 10))
            .map(|i| {
                let (c, url) = (c.clone(), cluster.url(i, "/items?limit=1"));
                async move { get_with_key(&c, &url, key).await.status().as_u16() }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            limit,
            "{key}"
        );
        assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 10, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_requests_admit_exactly_ten() {
    let redis = RedisServer::start();
    let cluster = Cluster::start(Some(&redis), |_| {}).await;
    let c = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (c, url) = (c.clone(), cluster.url(i, "/items?limit=1"));
        tasks.push(tokio::spawn(async move {
            get_with_key(&c, &url, "k-free").await.status().as_u16()
        }));
    }
    let mut counts = std::collections::HashMap::new();
    for t in tasks {
        *counts.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(counts.get(&200), Some(&10), "{counts:?}");
    assert_eq!(counts.get(&429), Some(&190), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_limits_are_counted_apart() {
    let redis = RedisServer::start();
    let cluster = Cluster::start(Some(&redis), |s| {
        s.endpoint_limits = "create_item=3/min,get_item=2/min".into()
    })
    .await;
    let c = reqwest::Client::new();
    let mut created = Vec::new();
    for i in 0..5 {
        let r = c
            .post(cluster.url(i, "/items"))
            .header("X-API-Key", "k-pro")
            .json(&serde_json::json!({"name": "x"}))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            assert_eq!(r.headers()["ratelimit-policy"], "3;w=60");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["limit"], "endpoint:create_item");
        } else {
            assert_eq!(r.status(), 201);
            created.push(r.json::<Value>().await.unwrap()["id"].as_i64().unwrap());
        }
    }
    assert_eq!(created.len(), 3, "the endpoint limit admits 3");
    // Refused writes were not stored, and other endpoints have their own counts.
    let all: Value = get_with_key(&c, &cluster.url(0, "/items"), "k-pro")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(all["items"].as_array().unwrap().len(), 3);
    let gets: Vec<u16> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(
                get_with_key(
                    &c,
                    &cluster.url(i, &format!("/items/{}", created[0])),
                    "k-pro",
                )
                .await
                .status()
                .as_u16(),
            );
        }
        v
    };
    assert_eq!(gets, vec![200, 200, 429]);
    // The tier counted every admitted request (3 creates + 1 list + 2 gets = 6 of 100).
    let r = get_with_key(&c, &cluster.url(1, "/items"), "k-pro").await;
    assert_eq!(
        r.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .split(", ")
            .nth(1),
        Some("remaining=93")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked() {
    let cluster = Cluster::start(None, |_| {}).await;
    let c = reqwest::Client::new();
    let r = get_with_key(&c, &cluster.url(0, "/items"), "not-a-key").await;
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("unknown"),
        "{body}"
    );
    let r = c
        .get(cluster.url(0, "/items"))
        .header("Authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(cluster.url(0, "/items"))
        .header("Authorization", "Bearer k-free")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit"], "10");
    let r = c.get(cluster.url(0, "/items")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        !r.headers().contains_key("ratelimit"),
        "anonymous callers have no limit by default"
    );
    let r = c
        .post(cluster.url(0, "/llm"))
        .json(&serde_json::json!({"prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("API key is required"),
        "{body}"
    );
}

async fn metric(c: &reqwest::Client, url: &str, series: &str) -> f64 {
    metric_value(
        &c.get(url).send().await.unwrap().text().await.unwrap(),
        series,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_and_shared_counting_resumes() {
    let mut redis = RedisServer::start();
    // The default timeout: how long a request waits on a Redis that is gone.
    let cluster = Cluster::start(Some(&redis), |s| {
        s.redis_timeout = Duration::from_millis(100)
    })
    .await;
    let c = reqwest::Client::new();
    assert_eq!(
        get_with_key(&c, &cluster.url(0, "/items"), "k-free")
            .await
            .status(),
        200
    );

    redis.stop();
    // Served under the fallback: each instance now counts on its own (10 each).
    let mut ok = 0;
    for i in 0..45 {
        let r = get_with_key(&c, &cluster.url(i, "/items"), "k-free-2").await;
        assert!(r.status() == 200 || r.status() == 429, "{}", r.status());
        if r.status() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 30, "three instances, 10 each, while Redis is down");
    assert_eq!(
        metric(
            &c,
            &cluster.url(0, "/metrics"),
            "backend_ratelimit_degraded"
        )
        .await,
        1.0
    );
    let ready: Value = get_json(&c, &cluster.url(0, "/ready")).await;
    assert_eq!(ready["rate_limits"], "per instance (redis unreachable)");

    redis.start_again();
    // Each instance finds Redis again on its own, without a restart.
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..3 {
        while metric(
            &c,
            &cluster.url(i, "/metrics"),
            "backend_ratelimit_degraded",
        )
        .await
            != 0.0
        {
            assert!(Instant::now() < deadline, "instance {i} still degraded");
            get_with_key(&c, &cluster.url(i, "/items"), "k-pro").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Shared counting: 16 requests spread over the three instances, one window in Redis.
    for i in 0..15 {
        assert_eq!(
            get_with_key(&c, &cluster.url(i, "/items"), "k-ent")
                .await
                .status(),
            200
        );
    }
    let r = get_with_key(&c, &cluster.url(2, "/items"), "k-ent").await;
    assert_eq!(
        r.headers()["ratelimit"]
            .to_str()
            .unwrap()
            .split(", ")
            .nth(1),
        Some("remaining=984")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redis_costs_at_most_its_timeout() {
    let redis = RedisServer::start();
    let cluster = Cluster::start(Some(&redis), |s| {
        s.redis_timeout = Duration::from_millis(100)
    })
    .await;
    let c = reqwest::Client::new();
    assert_eq!(
        get_with_key(&c, &cluster.url(0, "/items"), "k-pro")
            .await
            .status(),
        200
    );
    redis.pause();
    for i in 0..6 {
        let t = Instant::now();
        let r = get_with_key(&c, &cluster.url(i, "/items"), "k-pro").await;
        let took = t.elapsed();
        assert_eq!(r.status(), 200);
        assert!(
            took < Duration::from_millis(600),
            "request {i} took {took:?} with Redis paused"
        );
    }
    redis.resume();
}

/// A Redis call that timed out still runs when a paused Redis resumes; it used to count an
/// admission nobody made (a 3 s pause admitted dozens of phantoms, under-admitting the user
/// for a window). Now each is removed again after it ran, and while Redis does not answer
/// one request per instance tries it again every 500 ms, not every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_timed_out_during_a_pause_leave_no_phantom_admissions() {
    let redis = RedisServer::start();
    let cluster = Cluster::start(Some(&redis), |s| {
        s.redis_timeout = Duration::from_millis(100)
    })
    .await;
    let c = reqwest::Client::new();
    let r = get_with_key(&c, &cluster.url(0, "/items"), "k-pro").await;
    assert_eq!(r.status(), 200);
    redis.pause();
    let until = Instant::now() + Duration::from_millis(1500);
    let mut i = 0;
    while Instant::now() < until {
        let r = get_with_key(&c, &cluster.url(i, "/items"), "k-pro").await;
        assert_eq!(r.status(), 200);
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis.resume();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("rl:u:*:tier")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut counted = 0;
    for k in &keys {
        let n: u64 = redis::cmd("ZCARD")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        counted += n;
    }
    // The one admission made before the pause; none of the ~60 made on local fallback.
    assert_eq!(counted, 1, "{keys:?}");
}
