//! TLS from the backend to its peers, against real servers started with certificates the
//! test makes (rcgen): PostgreSQL with `ssl=on` (each connection's encryption read from
//! `pg_stat_ssl`), Redis whose only port is TLS, and the mock vendor over HTTPS. Each peer
//! also refuses a certificate the backend was not told to trust, with a reason that says so.

mod common;

use std::time::Duration;

use common::*;
use floodgate_backend::config::Settings;
use floodgate_backend::db::Db;
use floodgate_backend::ratelimit::redis::RedisStore;
use floodgate_backend::startup::Server;
use serde_json::{json, Value};

/// A SQLite file with one user per tier key (`k-free`: 10 requests a minute, `k-big`).
async fn keyed_sqlite() -> (tempfile::TempDir, String) {
    let data = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/shared.db", data.path().display());
    let db = Db::connect(&test_settings(Some(url.clone())).db()).unwrap();
    db.migrate().await.unwrap();
    db.upsert_user_key("free", "free", "k-free").await.unwrap();
    db.upsert_user_key("big", "enterprise", "k-big")
        .await
        .unwrap();
    db.close().await;
    (data, url)
}

/// A TLS failure's text names the certificate problem (rustls: "invalid peer certificate:
/// UnknownIssuer").
fn says_untrusted(text: &str) -> bool {
    text.contains("invalid peer certificate") && text.contains("UnknownIssuer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_are_encrypted_as_the_url_says() {
    let ca = TestCa::new("postgres");
    let pg = PgServer::start_with(Some(&ca));
    let base = pg.url();
    let observer = sqlx::PgPool::connect(&format!("{base}?sslmode=disable"))
        .await
        .unwrap();
    let verify_full = format!("sslmode=verify-full&sslrootcert={}", ca.ca().display());
    for (name, tls, want_ssl) in [
        // No sslmode: plaintext, as before TLS existed here (not libpq's `prefer`).
        ("fg-plain", "", false),
        ("fg-require", "sslmode=require", true),
        ("fg-verify-full", verify_full.as_str(), true),
    ] {
        let url = format!("{base}?application_name={name}&{tls}");
        let app = spawn_app(test_settings(Some(url))).await;
        let c = reqwest::Client::new();
        let r = c
            .post(app.url("/items"))
            .json(&json!({"name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{name}: {}", r.text().await.unwrap());
        let r = c.get(app.url("/items")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let conns: Vec<(bool, Option<String>)> = sqlx::query_as(
            "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = $1",
        )
        .bind(name)
        .fetch_all(&observer)
        .await
        .unwrap();
        assert!(!conns.is_empty(), "{name}: no connection of the backend's");
        for (ssl, version) in &conns {
            assert_eq!(*ssl, want_ssl, "{name}: {conns:?}");
            if want_ssl {
                assert_eq!(version.as_deref(), Some("TLSv1.3"), "{name}");
            }
        }
    }

    // verify-full against another CA: the backend does not start, and says why.
    let other = TestCa::new("other");
    let url = format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        other.ca().display()
    );
    let err = Server::build(test_settings(Some(url)))
        .await
        .err()
        .expect("a server certificate from an untrusted CA is refused")
        .to_string();
    assert!(
        err.starts_with("cannot connect to PostgreSQL (sslmode=verify-full)"),
        "{err}"
    );
    assert!(says_untrusted(&err), "{err}");

    // A CA file that is not there fails at once, naming the parameter.
    let url = format!("{base}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
    let err = Server::build(test_settings(Some(url)))
        .await
        .err()
        .expect("a missing CA file is refused")
        .to_string();
    assert!(
        err.contains("DATABASE_URL sslrootcert=/nonexistent/ca.pem"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_is_reached_through_its_tls_port_only() {
    let ca = TestCa::new("redis");
    let redis = RedisServer::start_with(Some(RedisTls {
        ca: &ca,
        client_certificates: false,
    }));
    let url = redis.url();
    assert!(url.starts_with("rediss://"), "{url}");
    let (_data, db_url) = keyed_sqlite().await;
    let mut s = test_settings(Some(db_url));
    s.redis_url = Some(url.clone());
    s.redis_ca_file = Some(ca.ca());
    s.redis_timeout = Duration::from_secs(2); // a loaded machine must not fall back
    let app = spawn_app(s).await;
    let c = reqwest::Client::new();
    // The free tier's 10 a minute, counted in Redis: the 11th is refused.
    let mut statuses = Vec::new();
    for _ in 0..11 {
        let r = c
            .get(app.url("/items"))
            .header("X-API-Key", "k-free")
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses[..10], [200; 10], "{statuses:?}");
    assert_eq!(statuses[10], 429, "{statuses:?}");
    let ready = get_json(&c, &app.url("/ready")).await;
    assert_eq!(ready["rate_limits"], "shared (redis)", "{ready}");
    let metrics = metrics_text(&app).await;
    assert_eq!(
        metric_value(&metrics, "backend_ratelimit_redis_errors_total"),
        0.0
    );

    // The counts are in this Redis (read over TLS), and its port does not speak plaintext.
    let files = floodgate_backend::tls::RedisTlsFiles {
        ca: Some(ca.ca()),
        ..Default::default()
    };
    let client = floodgate_backend::tls::redis_client(&url, &files).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: i64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert!(keys >= 1, "no limit counted in Redis");
    let plain = url.replace("rediss://", "redis://");
    let plaintext = tokio::time::timeout(Duration::from_secs(2), async {
        let client = redis::Client::open(plain.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    })
    .await;
    assert!(
        !matches!(plaintext, Ok(Ok(_))),
        "plaintext answered: {plaintext:?}"
    );

    // A Redis whose certificate another CA signed is refused, with the reason.
    let other = TestCa::new("other");
    let files = floodgate_backend::tls::RedisTlsFiles {
        ca: Some(other.ca()),
        ..Default::default()
    };
    let store = RedisStore::with_client(
        floodgate_backend::tls::redis_client(&url, &files).unwrap(),
        "tls-test",
        Duration::from_secs(2),
    );
    let err = store.ping().await.expect_err("untrusted Redis").to_string();
    assert!(says_untrusted(&err), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_client_certificates_takes_ours() {
    let ca = TestCa::new("redis-mtls");
    let redis = RedisServer::start_with(Some(RedisTls {
        ca: &ca,
        client_certificates: true,
    }));
    let store = |cert: bool| {
        let files = floodgate_backend::tls::RedisTlsFiles {
            ca: Some(ca.ca()),
            client_cert: cert.then(|| ca.client_cert()),
            client_key: cert.then(|| ca.client_key()),
        };
        RedisStore::with_client(
            floodgate_backend::tls::redis_client(&redis.url(), &files).unwrap(),
            "tls-test",
            Duration::from_secs(2),
        )
    };
    store(true).ping().await.expect("with a client certificate");
    assert!(store(false).ping().await.is_err(), "without one");
    // Half a pair, or TLS files for a plaintext URL, is a configuration error.
    let half = floodgate_backend::tls::RedisTlsFiles {
        client_cert: Some(ca.client_cert()),
        ..Default::default()
    };
    assert!(floodgate_backend::tls::redis_client(&redis.url(), &half).is_err());
    let ca_only = floodgate_backend::tls::RedisTlsFiles {
        ca: Some(ca.ca()),
        ..Default::default()
    };
    let err = floodgate_backend::tls::redis_client("redis://127.0.0.1:1/", &ca_only)
        .err()
        .unwrap();
    assert!(err.contains("rediss://"), "{err}");
}

async fn llm(c: &reqwest::Client, app: &TestApp) -> (u16, Value) {
    let r = c
        .post(app.url("/llm"))
        .header("X-API-Key", "k-big")
        .json(&json!({"prompt": "hello"}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_calls_go_over_https() {
    let ca = TestCa::new("vendor");
    let vendor = MockVendor::start_with(&["--latency", "1ms"], Some(&ca)).await;
    assert!(vendor.url().starts_with("https://"));
    let (_data, db_url) = keyed_sqlite().await;
    let settings = |ca_file: Option<std::path::PathBuf>| -> Settings {
        let mut s = test_settings(Some(db_url.clone()));
        s.vendor_url = vendor.url();
        s.vendor_ca_file = ca_file;
        s.vendor_max_attempts = 1;
        s
    };
    let c = reqwest::Client::new();
    let trusting = spawn_app(settings(Some(ca.ca()))).await;
    let (status, body) = llm(&c, &trusting).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["completion"].is_string(), "{body}");
    assert_eq!(vendor.stats().await["calls"], 1);

    // The system's CA store does not vouch for the test CA: the call fails, with the reason,
    // and never reaches the vendor.
    let untrusting = spawn_app(settings(None)).await;
    let (status, body) = llm(&c, &untrusting).await;
    assert_eq!(status, 502, "{body}");
    assert!(says_untrusted(&body.to_string()), "{body}");
    assert_eq!(vendor.stats().await["calls"], 1);

    // A CA file that holds no certificate is refused at start, naming the variable.
    let empty = tempfile::NamedTempFile::new().unwrap();
    let err = Server::build(settings(Some(empty.path().to_path_buf())))
        .await
        .err()
        .expect("an empty CA file is refused")
        .to_string();
    assert!(err.contains("VENDOR_CA_FILE="), "{err}");
}
