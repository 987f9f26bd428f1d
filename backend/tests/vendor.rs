//! The vendor pipeline against the real `mock-vendor` and a real redis-server, with three
//! backend instances and the contract scaled down to 60 calls per 10 s.

mod common;

use std::time::{Duration, Instant};

use common::*;
use floodgate_backend::config::Settings;
use floodgate_backend::db::Db;
use serde_json::{json, Value};

struct Cluster {
    apps: Vec<TestApp>,
    _data: tempfile::TempDir,
}

async fn cluster(n: usize, redis: Option<&RedisServer>, tweak: impl Fn(&mut Settings)) -> Cluster {
    let data = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/shared.db", data.path().display());
    let db = Db::connect(&test_settings(Some(url.clone())).db()).unwrap();
    db.migrate().await.unwrap();
    db.upsert_user_key("big", "enterprise", "k-big")
        .await
        .unwrap();
    db.upsert_user_key("small", "free", "k-small")
        .await
        .unwrap();
    db.close().await;
    let mut apps = Vec::new();
    for i in 0..n {
        let mut s = test_settings(Some(url.clone()));
        s.instance_id = Some(format!("instance-{i}"));
        s.redis_url = redis.map(|r| r.url());
        s.max_in_flight = 1000;
        s.tier_limits = "free=10/min,pro=100/min,enterprise=100000/min".into();
        s.endpoint_limits = "llm=100000/min".into();
        s.vendor_contract = "60/10s".into();
        s.vendor_local_rate = "300/10s".into();
        s.vendor_expected_instances = n as u32;
        tweak(&mut s);
        apps.push(spawn_app(s).await);
    }
    Cluster { apps, _data: data }
}

async fn llm(c: &reqwest::Client, url: String, key: &str) -> (u16, Value, Duration) {
    let t = Instant::now();
    let r = c
        .post(url)
        .header("X-API-Key", key)
        .json(&json!({"prompt": "hello"}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body, t.elapsed())
}

async fn flood(cl: &Cluster, n: usize, key: &'static str) -> Vec<(u16, Value, Duration)> {
    let c = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (c, url) = (c.clone(), cl.apps[i % cl.apps.len()].url("/llm"));
        tasks.push(tokio::spawn(async move { llm(&c, url, key).await }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn count(results: &[(u16, Value, Duration)], status: u16) -> usize {
    results.iter().filter(|r| r.0 == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_calls_never_break_the_contract() {
    let vendor =
        MockVendor::start(&["--limit", "60", "--window", "10s", "--latency", "50ms"]).await;
    let redis = RedisServer::start();
    let cl = cluster(3, Some(&redis), |s| {
        s.vendor_url = vendor.url();
        s.vendor_concurrency = 5;
        s.vendor_queue_timeout = Duration::from_secs(2);
        s.vendor_limiter_wait = Duration::from_secs(1);
    })
    .await;
    let results = flood(&cl, 300, "k-big").await;
    let ok = count(&results, 200);
    let refused = count(&results, 429) + count(&results, 503);
    assert_eq!(
        ok + refused,
        300,
        "only 200, 429 and 503: {:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(ok > 0 && ok <= 60, "{ok} admitted");
    for (status, body, took) in &results {
        assert!(*took < Duration::from_secs(4), "answered after {took:?}");
        if *status != 200 {
            assert!(body["stage"].is_string(), "{body}");
        }
    }
    let stats = vendor.stats().await;
    assert_eq!(stats["violations"], 0, "{stats}");
    assert!(stats["max_in_window"].as_u64().unwrap() <= 60, "{stats}");
    let per_instance = stats["max_concurrency_per_instance"].as_object().unwrap();
    assert_eq!(per_instance.len(), 3, "{stats}");
    for (instance, max) in per_instance {
        assert!(
            max.as_u64().unwrap() <= 5,
            "{instance} reached {max} concurrent calls"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_still_keeps_the_contract() {
    let vendor =
        MockVendor::start(&["--limit", "60", "--window", "10s", "--latency", "20ms"]).await;
    let mut redis = RedisServer::start();
    let cl = cluster(3, Some(&redis), |s| {
        s.vendor_url = vendor.url();
        s.vendor_queue_timeout = Duration::from_secs(2);
        s.vendor_limiter_wait = Duration::from_millis(500);
    })
    .await;
    redis.stop();
    let results = flood(&cl, 300, "k-big").await;
    let ok = count(&results, 200);
    assert!(ok > 0 && ok <= 60, "{ok} admitted");
    let stats = vendor.stats().await;
    assert_eq!(stats["violations"], 0, "{stats}");
    let m = reqwest::get(cl.apps[0].url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric_value(&m, "backend_vendor_limiter_degraded"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_vendor_times_out_with_504_and_retries_stay_in_budget() {
    let vendor = MockVendor::start(&["--limit", "10000", "--latency", "2s"]).await;
    let cl = cluster(1, None, |s| {
        s.vendor_url = vendor.url();
        s.vendor_call_timeout = Duration::from_millis(200);
        s.vendor_backoff_base = Duration::from_millis(10);
        s.vendor_contract = "10000/10s".into();
        s.vendor_breaker_failures = 1000;
    })
    .await;
    let (status, body, took) = llm(&reqwest::Client::new(), cl.apps[0].url("/llm"), "k-big").await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["stage"], "call");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(vendor.stats().await["calls"], 3, "three attempts");

    // Many failing calls at once: the budget (20% of calls, plus a small reserve) caps retries.
    let results = flood(&cl, 40, "k-big").await;
    assert_eq!(count(&results, 504), 40);
    let m = reqwest::get(cl.apps[0].url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let retries = metric_value(&m, "backend_vendor_retries_total");
    assert!(
        retries <= 2.0 + 10.0 + 0.2 * 41.0 + 1.0,
        "{retries} retries"
    );
    assert!(metric_value(&m, "backend_vendor_retry_budget_exhausted_total") > 0.0);
    let calls = vendor.stats().await["calls"].as_u64().unwrap() as f64;
    assert_eq!(
        calls,
        41.0 + retries,
        "every vendor call is a first attempt or a counted retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_opens_on_failures_and_closes_after_recovery() {
    let vendor =
        MockVendor::start(&["--limit", "10000", "--latency", "10ms", "--fail-first", "5"]).await;
    let cl = cluster(1, None, |s| {
        s.vendor_url = vendor.url();
        s.vendor_max_attempts = 1;
        s.vendor_breaker_failures = 3;
        s.vendor_breaker_cooldown = Duration::from_millis(300);
        s.vendor_contract = "10000/10s".into();
    })
    .await;
    let c = reqwest::Client::new();
    let mut statuses = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        let (status, body, took) = llm(&c, cl.apps[0].url("/llm"), "k-big").await;
        if status == 503 {
            assert_eq!(body["stage"], "circuit", "{body}");
            assert!(
                took < Duration::from_millis(100),
                "an open circuit fails fast"
            );
        }
        statuses.push(status);
        if statuses.iter().rev().take(5).filter(|s| **s == 200).count() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(&statuses[..3], &[502, 502, 502], "{statuses:?}");
    assert_eq!(statuses[3], 503, "opened after 3 failures: {statuses:?}");
    assert_eq!(count_of(&statuses, 502), 5, "{statuses:?}");
    assert!(statuses.ends_with(&[200; 5]), "{statuses:?}");
    // While open, calls were not sent: the vendor saw its 5 failures and the successes only.
    let stats = vendor.stats().await;
    assert_eq!(
        stats["calls"].as_u64().unwrap() as usize,
        5 + count_of(&statuses, 200)
    );
    let m = reqwest::get(cl.apps[0].url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric_value(&m, "backend_vendor_circuit_state"), 0.0);
}

fn count_of(statuses: &[u16], s: u16) -> usize {
    statuses.iter().filter(|x| **x == s).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_its_limit_takes_no_slot_and_no_token() {
    let vendor = MockVendor::start(&["--limit", "10000", "--latency", "10ms"]).await;
    let cl = cluster(1, None, |s| {
        s.vendor_url = vendor.url();
        s.endpoint_limits = "llm=2/min".into();
    })
    .await;
    let c = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let (status, body, _) = llm(&c, cl.apps[0].url("/llm"), "k-small").await;
        if status == 200 {
            assert!(
                body["completion"].as_str().unwrap().contains("hello"),
                "{body}"
            );
        } else {
            assert_eq!(body["limit"], "endpoint:llm", "{body}");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, vec![200, 200, 429, 429, 429]);
    let m = reqwest::get(cl.apps[0].url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_value(
            &m,
            "backend_vendor_stage_total{result=\"admitted\",stage=\"global_limiter\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &m,
            "backend_vendor_stage_total{result=\"admitted\",stage=\"semaphore\"}"
        ),
        2.0
    );
    assert_eq!(vendor.stats().await["calls"], 2);
    // Bad payloads are refused before the pipeline.
    let r = c
        .post(cl.apps[0].url("/llm"))
        .header("X-API-Key", "k-big")
        .header("content-type", "application/json")
        .body("[1]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
}
