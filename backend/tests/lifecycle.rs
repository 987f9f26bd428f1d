//! The `backend` binary as an operator runs it: several processes cold-started together on
//! one fresh SQLite file, and SIGTERM with connections open.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A `backend` process on a free port; killed on drop.
struct Proc {
    port: u16,
    child: Child,
}

impl Proc {
    fn start(db_url: &str, envs: &[(&str, &str)]) -> Proc {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_backend"))
            .env_clear()
            .env("PORT", port.to_string())
            .env("DATABASE_URL", db_url)
            .env("DEPENDENCY_CHECK_INTERVAL", "100ms")
            .env("LOG_LEVEL", "warn")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("backend runs");
        Proc { port, child }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Wait until `/ready` is 200; panics with the process's stderr if it exited.
    async fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        let c = reqwest::Client::new();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("backend on {} exited ({status}): {err}", self.port);
            }
            if let Ok(r) = c.get(self.url("/ready")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "backend on {} not ready",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// sqlx takes no migration lock on SQLite: started together, two instances both saw an empty
/// database and one exited with "table items already exists". Five rounds of three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_cold_started_together_on_one_fresh_sqlite_file_all_serve() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/fresh.db", dir.path().display());
        let mut procs: Vec<Proc> = (0..3).map(|_| Proc::start(&url, &[])).collect();
        for p in &mut procs {
            p.wait_ready(Duration::from_secs(20)).await;
        }
        let c = reqwest::Client::new();
        for (i, p) in procs.iter().enumerate() {
            let r = c
                .post(p.url("/items"))
                .json(&serde_json::json!({"name": format!("r{round} p{i}")}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "round {round}, instance {i}");
        }
        let all = get_json(&c, &procs[0].url("/items")).await;
        assert_eq!(all["items"].as_array().unwrap().len(), 3, "round {round}");
    }
}

/// One HTTP/1.1 request on an open connection; the status code, or the I/O error.
fn request(conn: &mut TcpStream, path: &str) -> std::io::Result<u16> {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Read the head and a Content-Length body.
    loop {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len: usize = text[..head_end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= head_end + 4 + len {
                return Ok(text[9..12].parse().unwrap());
            }
        }
    }
}

/// SIGTERM: `/ready` fails at once, while connections open at that moment (idle keep-alive
/// ones, and ones whose request is sent just after the signal) and new ones are all answered
/// for the drain delay; then the listener closes and the process exits. It used to close the
/// listener at once and reset connections accepted but not yet read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_open_at_sigterm_are_answered_during_the_drain_delay() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/t.db", dir.path().display());
    let mut p = Proc::start(&url, &[("SHUTDOWN_DRAIN_DELAY", "1500ms")]);
    p.wait_ready(Duration::from_secs(20)).await;
    let addr = ("127.0.0.1", p.port);
    // Connections open at SIGTERM: some used once (idle keep-alive), some never used.
    let mut used: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for c in &mut used {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(request(c, "/items").unwrap(), 200);
    }
    let mut fresh: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for c in &mut fresh {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;

    p.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    // Readiness fails first, and is seen failing: the instance still answers.
    assert_eq!(request(&mut used[0], "/ready").unwrap(), 503);
    for (i, c) in used.iter_mut().chain(fresh.iter_mut()).enumerate() {
        assert_eq!(request(c, "/items").unwrap(), 200, "connection {i}");
    }
    // New connections during the drain delay are served too.
    let c = reqwest::Client::new();
    let r = c.get(p.url("/items")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(p.url("/ready")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "shutting down");
    assert!(
        signalled.elapsed() < Duration::from_millis(1200),
        "test too slow"
    );

    // After the drain delay: the listener is closed and the process exits by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after the drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    assert!(signalled.elapsed() >= Duration::from_millis(1200));
    assert!(TcpStream::connect(addr).is_err(), "listener closed");
}
