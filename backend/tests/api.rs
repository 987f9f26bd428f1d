//! Black-box tests of the backend: the real service on a free port, on SQLite and on a real
//! PostgreSQL cluster started by the harness.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sqlx::Connection;

async fn expect_error(resp: reqwest::Response, status: u16, field: Option<&str>) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert!(resp.headers().contains_key("x-served-by"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    if let Some(f) = field {
        assert_eq!(body["field"], f, "{body}");
    }
    body
}

/// Create, paginate, get, delete, and every bad-input case, against one instance.
async fn exercise_items_api(app: &TestApp) {
    let c = reqwest::Client::new();
    let mut created = Vec::new();
    for i in 0..25 {
        let r = c
            .post(app.url("/items"))
            .json(&json!({"name": format!("item {i}"), "description": "y"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["x-served-by"], "test-instance");
        let location = r.headers()["location"].to_str().unwrap().to_string();
        let item: Value = r.json().await.unwrap();
        assert_eq!(item["name"], format!("item {i}"));
        assert_eq!(item["description"], "y");
        assert!(item["created_at"].as_str().unwrap().starts_with("20"));
        assert_eq!(location, format!("/items/{}", item["id"]));
        created.push(item);
    }
    // A description is optional.
    let r = c
        .post(app.url("/items"))
        .json(&json!({"name": "bare"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let bare: Value = r.json().await.unwrap();
    assert_eq!(bare["description"], Value::Null);
    created.push(bare);

    // The cursor walks every item exactly once, in order.
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    let mut pages = 0;
    loop {
        let url = match &next {
            Some(n) => app.url(&format!("/items?limit=10&after={n}")),
            None => app.url("/items?limit=10"),
        };
        let page: Value = get_json(&c, &url).await;
        pages += 1;
        seen.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(n) => next = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created);
    let default_page: Value = get_json(&c, &app.url("/items")).await;
    assert_eq!(default_page["items"].as_array().unwrap().len(), 26);
    assert_eq!(default_page["next"], Value::Null);

    let id = created[3]["id"].as_i64().unwrap();
    let got: Value = get_json(&c, &app.url(&format!("/items/{id}"))).await;
    assert_eq!(got, created[3]);
    let r = c
        .delete(app.url(&format!("/items/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Gone: reading it or deleting it again is 404.
    let gone = app.url(&format!("/items/{id}"));
    for req in [c.get(&gone), c.delete(&gone)] {
        expect_error(req.send().await.unwrap(), 404, None).await;
    }

    // Bad input: one clear status and one JSON shape each.
    let post = |body: &'static str, ctype: &'static str| {
        c.post(app.url("/items"))
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    expect_error(
        post("{\"name\":", "application/json").await.unwrap(),
        400,
        None,
    )
    .await;
    expect_error(
        post("{\"name\":\"x\"}", "text/plain").await.unwrap(),
        415,
        None,
    )
    .await;
    expect_error(post("{\"name\":\"x\"}", "").await.unwrap(), 415, None).await;
    expect_error(
        post("{\"name\":\"\"}", "application/json").await.unwrap(),
        422,
        Some("name"),
    )
    .await;
    expect_error(
        post("{\"description\":\"d\"}", "application/json")
            .await
            .unwrap(),
        422,
        Some("name"),
    )
    .await;
    expect_error(
        post("{\"name\":[1]}", "application/json; charset=utf-8")
            .await
            .unwrap(),
        422,
        Some("name"),
    )
    .await;
    let long = json!({"name": "x", "description": "d".repeat(2001)});
    expect_error(
        c.post(app.url("/items")).json(&long).send().await.unwrap(),
        422,
        Some("description"),
    )
    .await;
    let long = json!({"name": "n".repeat(201)});
    expect_error(
        c.post(app.url("/items")).json(&long).send().await.unwrap(),
        422,
        Some("name"),
    )
    .await;
    // Text a database cannot store (PostgreSQL refuses NUL; SQLite's length() stops at it).
    for (body, field) in [
        (json!({"name": "\u{0}"}), "name"),
        (json!({"name": "a\u{0}b"}), "name"),
        (
            json!({"name": "ok", "description": "d\u{0}"}),
            "description",
        ),
    ] {
        let r = c.post(app.url("/items")).json(&body).send().await.unwrap();
        expect_error(r, 422, Some(field)).await;
    }
    for (path, status, field) in [
        ("/items?limit=0", 422, Some("limit")),
        ("/items?limit=501", 422, Some("limit")),
        ("/items?after=x", 422, Some("after")),
        ("/nothing-here", 404, None),
        ("/items/abc", 404, None),
    ] {
        expect_error(c.get(app.url(path)).send().await.unwrap(), status, field).await;
    }
    // The gateway's request id comes back, on errors too; none is made up without one.
    let r = c
        .get(app.url("/items/999999"))
        .header("x-request-id", "req-7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "req-7");
    expect_error(r, 404, None).await;
    let r = c.get(app.url("/items")).send().await.unwrap();
    assert!(!r.headers().contains_key("x-request-id"));
    for (path, allow) in [
        ("/items", "GET, HEAD, POST"),
        ("/items/1", "GET, HEAD, DELETE"),
    ] {
        let r = c.put(app.url(path)).send().await.unwrap();
        assert_eq!(r.headers()["allow"], allow, "{path}");
        expect_error(r, 405, None).await;
    }
    // Over the body cap: declared length, and a chunked body cut at the cap.
    let big = format!("{{\"name\":\"{}\"}}", "x".repeat(70_000));
    let r = c
        .post(app.url("/items"))
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    expect_error(r, 413, None).await;
    let stream = futures_stream(big.into_bytes());
    let r = c
        .post(app.url("/items"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    expect_error(r, 413, None).await;

    // None of the rejected writes was stored.
    let all: Value = get_json(&c, &app.url("/items?limit=500")).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 25);
}

/// A body sent chunked (no Content-Length), in 8 KiB pieces.
fn futures_stream(
    data: Vec<u8>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        data.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    futures_util::stream::iter(chunks)
}

#[tokio::test]
async fn items_api_on_sqlite() {
    let app = spawn_app(test_settings(None)).await;
    exercise_items_api(&app).await;
}

#[tokio::test]
async fn items_api_on_postgres() {
    let pg = PgServer::start();
    let app = spawn_app(test_settings(Some(pg.url()))).await;
    exercise_items_api(&app).await;
}

/// Thirty NUL names from one client, concurrently (batched together on PostgreSQL): 422 each,
/// naming the field, and readiness stays 200 (they were 500s, and thirty of them failed
/// readiness through the error-rate window on every instance).
async fn nul_names_are_refused_and_readiness_holds(app: &TestApp) {
    let c = reqwest::Client::new();
    let mut posts = Vec::new();
    for i in 0..30 {
        let (c, url) = (c.clone(), app.url("/items"));
        let name = if i % 2 == 0 {
            "\u{0}".to_string()
        } else {
            format!("x{i}\u{0}")
        };
        posts.push(tokio::spawn(async move {
            c.post(url)
                .json(&json!({ "name": name }))
                .send()
                .await
                .unwrap()
        }));
    }
    for p in posts {
        expect_error(p.await.unwrap(), 422, Some("name")).await;
    }
    let ready = c.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);
    let m = metrics_text(app).await;
    assert_eq!(
        metric_value(
            &m,
            "backend_requests_total{method=\"POST\",route=\"create_item\",status=\"422\"}"
        ),
        30.0
    );
}

/// A value the database refuses, should one pass validation, is the client's 422, not 500.
async fn database_refusals_are_client_errors(url: Option<String>) {
    use floodgate_backend::db::{Db, DbError};
    use floodgate_backend::error::ApiError;
    let dir = tempfile::tempdir().unwrap();
    let url = url.unwrap_or_else(|| format!("sqlite://{}/r.db", dir.path().display()));
    let db = Db::connect(&test_settings(Some(url)).db()).unwrap();
    db.migrate().await.unwrap();
    for (name, description) in [("\u{0}", None), ("n".repeat(201).leak() as &str, None)] {
        let e = db.create_item(name, description).await.unwrap_err();
        assert!(matches!(e, DbError::Rejected(_)), "{e:?}");
        assert_eq!(ApiError::from(e).status(), 422);
    }
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_names_are_422_and_readiness_holds_on_sqlite() {
    let app = spawn_app(test_settings(None)).await;
    nul_names_are_refused_and_readiness_holds(&app).await;
    database_refusals_are_client_errors(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_names_are_422_and_readiness_holds_on_postgres() {
    let pg = PgServer::start();
    let app = spawn_app(test_settings(Some(pg.url()))).await;
    nul_names_are_refused_and_readiness_holds(&app).await;
    database_refusals_are_client_errors(Some(pg.url())).await;
}

/// Concurrent POSTs are group-committed on PostgreSQL: with the table locked they pile up,
/// and once it is released they are written in shared statements (rows of one statement share
/// `created_at`, the transaction time). Every request still gets back exactly its own row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_are_batched_and_each_gets_its_own_row() {
    let pg = PgServer::start();
    let mut settings = test_settings(Some(pg.url()));
    settings.admission = floodgate_backend::admission::Mode::Fixed;
    settings.max_in_flight = 200;
    settings.db_acquire_timeout = Duration::from_secs(30);
    settings.endpoint_limits = String::new();
    let app = spawn_app(settings).await;
    let mut lock = lock_items(&pg).await;

    const N: usize = 60;
    let c = reqwest::Client::new();
    let mut requests = Vec::new();
    for i in 0..N {
        let (c, url) = (c.clone(), app.url("/items"));
        let body = if i % 3 == 0 {
            json!({ "name": format!("item {i}") })
        } else {
            json!({ "name": format!("item {i}"), "description": format!("about {i}") })
        };
        requests.push(tokio::spawn(async move {
            let resp = c.post(url).json(&body).send().await.unwrap();
            (
                body,
                resp.status().as_u16(),
                resp.json::<Value>().await.unwrap(),
            )
        }));
    }
    // Every request is queued behind the lock before it is released.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();

    let mut ids = std::collections::HashSet::new();
    for r in requests {
        let (sent, status, got) = r.await.unwrap();
        assert_eq!(status, 201, "{got}");
        assert_eq!(got["name"], sent["name"], "{got}");
        assert_eq!(
            got["description"],
            sent.get("description").cloned().unwrap_or(Value::Null),
            "{got}"
        );
        let id = got["id"].as_i64().unwrap();
        assert!(ids.insert(id), "id {id} returned twice");
        // What was acknowledged is what is stored.
        let stored: Value = get_json(&c, &app.url(&format!("/items/{id}"))).await;
        assert_eq!(stored, got);
    }
    let mut conn = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    let (rows, statements): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT created_at) FROM items")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(rows, N as i64);
    assert!(
        statements <= (N / 4) as i64,
        "{N} rows written by {statements} statements: not batched"
    );
}

/// Hold `LOCK TABLE items` in an open transaction so every query on items waits.
async fn lock_items(pg: &PgServer) -> sqlx::PgConnection {
    let mut conn = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_cap_sheds_exactly_the_extra_request() {
    let pg = PgServer::start();
    let mut settings = test_settings(Some(pg.url()));
    settings.admission = floodgate_backend::admission::Mode::Fixed;
    settings.max_in_flight = 3;
    settings.db_acquire_timeout = Duration::from_secs(30);
    let app = spawn_app(settings).await;
    let mut lock = lock_items(&pg).await;

    let c = reqwest::Client::new();
    let mut requests = Vec::new();
    for _ in 0..4 {
        let (c, url) = (c.clone(), app.url("/items"));
        requests.push(tokio::spawn(
            async move { c.get(url).send().await.unwrap() },
        ));
    }
    // The shed one answers at once; the other three are held by the lock.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let health = c.get(app.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200, "liveness must answer at the cap");
    let ready = c.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "readiness fails near the cap");
    let metrics = metrics_text(&app).await;
    assert!(
        metrics.contains("backend_shed_total{reason=\"in_flight_cap\"} 1"),
        "{metrics}"
    );

    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    let mut statuses = Vec::new();
    for r in requests {
        let r = r.await.unwrap();
        if r.status() == 503 {
            assert_eq!(r.headers()["retry-after"], "1");
        }
        statuses.push(r.status().as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 200, 503]);
}

/// Adaptive admission with its limit pinned at 2 (ADMISSION_MIN = ADMISSION_MAX): a request
/// over the limit waits for a slot; one that gets none within ADMISSION_QUEUE_TIMEOUT is shed
/// with 503 + `Retry-After`, one that does is served. The limit, the queue and the sheds are
/// in the metrics, and `/ready` fails at the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_admission_queues_briefly_then_sheds_with_retry_after() {
    let pg = PgServer::start();
    let mut settings = test_settings(Some(pg.url()));
    settings.admission = floodgate_backend::admission::Mode::Adaptive;
    settings.admission_min = 2;
    settings.admission_max = 2;
    settings.admission_queue_timeout = Duration::from_secs(2);
    settings.db_acquire_timeout = Duration::from_secs(30);
    let app = spawn_app(settings).await;
    let mut lock = lock_items(&pg).await;
    let c = reqwest::Client::new();
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (c, url) = (c.clone(), app.url("/items"));
            tokio::spawn(async move { c.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    wait_for_status(&app.url("/ready"), 503, Duration::from_secs(10)).await;
    let body: Value = get_json(&c, &app.url("/ready")).await;
    assert!(
        body["reason"].as_str().unwrap().contains("in-flight limit"),
        "{body}"
    );

    // Nothing frees a slot: the third waits out the queue timeout and is shed.
    let r = c.get(app.url("/items")).send().await.unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    expect_error(r, 503, None).await;
    let metrics = metrics_text(&app).await;
    for line in [
        "backend_shed_total{reason=\"queue_timeout\"} 1",
        "backend_admission_limit 2",
        "backend_admission_queue_seconds_count 1",
        "backend_admission_queued 0",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }

    // A fourth waits, a slot frees while it does, and it is served.
    let queued = {
        let (c, url) = (c.clone(), app.url("/items"));
        tokio::spawn(async move { c.get(url).send().await.unwrap().status().as_u16() })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !metrics_text(&app)
        .await
        .contains("backend_admission_queued 1")
    {
        assert!(std::time::Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    assert_eq!(queued.await.unwrap(), 200);
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    wait_for_status(&app.url("/ready"), 200, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_postgres_outage_and_no_write_is_lost() {
    let pg = PgServer::start();
    let app = spawn_app(test_settings(Some(pg.url()))).await;
    let c = reqwest::Client::new();
    let r = c
        .post(app.url("/items"))
        .json(&json!({"name": "before"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    pg.stop();
    wait_for_status(&app.url("/ready"), 503, Duration::from_secs(10)).await;
    let body: Value = get_json(&c, &app.url("/ready")).await;
    assert_eq!(body["reason"], "database unreachable");
    for _ in 0..5 {
        let r = c
            .post(app.url("/items"))
            .json(&json!({"name": "during"}))
            .send()
            .await
            .unwrap();
        let body = expect_error(r, 503, None).await;
        assert!(
            body["error"].as_str().unwrap().contains("database"),
            "{body}"
        );
    }
    assert_eq!(
        c.get(app.url("/health")).send().await.unwrap().status(),
        200
    );

    pg.start_again();
    wait_for_status(&app.url("/ready"), 200, Duration::from_secs(15)).await;
    let r = c
        .post(app.url("/items"))
        .json(&json!({"name": "after"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let all: Value = get_json(&c, &app.url("/items")).await;
    let names: Vec<&str> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["before", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_the_in_flight_request_complete() {
    let pg = PgServer::start();
    let mut settings = test_settings(Some(pg.url()));
    settings.db_acquire_timeout = Duration::from_secs(30);
    settings.shutdown_drain_delay = Duration::from_millis(800);
    let mut app = spawn_app(settings).await;
    let mut lock = lock_items(&pg).await;
    let url = app.url("/items");
    let inflight = tokio::spawn(async move { reqwest::get(url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    app.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Readiness fails first while new connections are still served (the drain delay), so a
    // health checker can see it fail before the listener closes.
    let ready = reqwest::get(app.url("/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(
        reqwest::get(app.url("/health")).await.unwrap().status(),
        200
    );
    // After the drain delay, new connections are refused.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(reqwest::get(app.url("/health")).await.is_err());
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    let r = inflight.await.unwrap().expect("in-flight request answered");
    assert_eq!(r.status(), 200);
    let task = app.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("server stopped after draining")
        .unwrap();
}

/// What hyper answers by itself (a URL over 64 KiB, a thousand headers, a head that does not
/// parse) comes in the API's JSON error shape, not hyper's empty body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_url_and_headers_get_json_errors() {
    use std::io::{Read, Write};
    let app = spawn_app(test_settings(None)).await;
    let many: String = (0..1000).map(|i| format!("x-h{i}: v\r\n")).collect();
    for (head, status) in [
        (
            format!(
                "GET /items?q={} HTTP/1.1\r\nHost: t\r\n\r\n",
                "a".repeat(70_000)
            ),
            414,
        ),
        (format!("GET /items HTTP/1.1\r\nHost: t\r\n{many}\r\n"), 431),
        ("GET /items HTTP/1.1\r\nHost t\r\n\r\n".to_string(), 400),
    ] {
        let mut s = std::net::TcpStream::connect(app.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(head.as_bytes());
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer).to_string();
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
        assert!(text.contains("content-type: application/json"), "{text}");
        let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["status"], status, "{text}");
    }
}
