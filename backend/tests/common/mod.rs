//! Test harness: the backend started in-process on port 0 (`spawn_app`), with throwaway
//! PostgreSQL and Redis servers from `testkit`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use floodgate_backend::config::Settings;
use floodgate_backend::startup::Server;
use tokio::sync::oneshot;

#[allow(unused_imports)]
pub use testkit::{free_port, metric_value, PgServer, RedisServer, RedisTls, TestCa};

/// A running backend instance in this process.
pub struct TestApp {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<()>>,
    _data: Option<tempfile::TempDir>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Begin graceful shutdown.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Settings for a test instance: port 0, quick dependency checks, the given database.
pub fn test_settings(database_url: Option<String>) -> Settings {
    let mut s = Settings::defaults();
    s.port = 0;
    s.database_url = database_url;
    s.dependency_check_interval = Duration::from_millis(100);
    s.db_acquire_timeout = Duration::from_secs(1);
    s.instance_id = Some("test-instance".into());
    s
}

/// Start an instance; with no database URL it gets a fresh SQLite file in a temp dir.
pub async fn spawn_app(mut settings: Settings) -> TestApp {
    let data = if settings.database_url.is_none() {
        let d = tempfile::tempdir().unwrap();
        settings.data_dir = d.path().to_path_buf();
        Some(d)
    } else {
        None
    };
    let server = Server::build(settings).await.expect("backend starts");
    let addr = server.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    let app = TestApp {
        addr,
        shutdown: Some(tx),
        task: Some(task),
        _data: data,
    };
    wait_for_status(&app.url("/ready"), 200, Duration::from_secs(10)).await;
    app
}

/// Poll `url` until it answers `status`.
pub async fn wait_for_status(url: &str, status: u16, within: Duration) {
    wait_for_status_with(&reqwest::Client::new(), url, status, within).await
}

/// Poll `url` with client `c` until it answers `status`.
pub async fn wait_for_status_with(c: &reqwest::Client, url: &str, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = c.get(url).send().await.map(|r| r.status().as_u16());
        if got.as_ref().is_ok_and(|s| *s == status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url}: wanted {status}, last {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `mock-vendor` binary on a free port, with the given flags; killed on drop.
pub struct MockVendor {
    pub port: u16,
    child: std::process::Child,
    /// `http://127.0.0.1:port`, or `https://` when serving TLS.
    base: String,
    /// Trusts the vendor's CA when it serves TLS.
    client: reqwest::Client,
}

impl MockVendor {
    pub async fn start(flags: &[&str]) -> MockVendor {
        Self::start_with(flags, None).await
    }

    /// Serving HTTPS only, with `tls`'s server certificate when given.
    pub async fn start_with(flags: &[&str], tls: Option<&TestCa>) -> MockVendor {
        let port = free_port();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mock-vendor"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(flags)
            .stderr(std::process::Stdio::null());
        let mut client = reqwest::Client::builder();
        if let Some(ca) = tls {
            cmd.arg("--tls-cert")
                .arg(ca.server_cert())
                .arg("--tls-key")
                .arg(ca.server_key());
            let pem = std::fs::read(ca.ca()).unwrap();
            client = client.add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
        }
        let child = cmd.spawn().expect("mock-vendor runs");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let v = MockVendor {
            port,
            child,
            base: format!("{scheme}://127.0.0.1:{port}"),
            client: client.build().unwrap(),
        };
        wait_for_status_with(
            &v.client,
            &format!("{}/health", v.base),
            200,
            Duration::from_secs(10),
        )
        .await;
        v
    }

    pub fn url(&self) -> String {
        format!("{}/v1/complete", self.base)
    }

    pub async fn stats(&self) -> serde_json::Value {
        get_json(&self.client, &format!("{}/stats", self.base)).await
    }
}

impl Drop for MockVendor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `url` and parse its JSON body, whatever the status.
pub async fn get_json(c: &reqwest::Client, url: &str) -> serde_json::Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

/// The instance's `/metrics` text.
pub async fn metrics_text(app: &TestApp) -> String {
    reqwest::get(app.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
