//! Test harness: throwaway PostgreSQL clusters (and Redis servers) on free ports in temp
//! directories, and the backend started in-process on port 0 (`spawn_app`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use floodgate_backend::config::Settings;
use floodgate_backend::startup::Server;
use tokio::sync::oneshot;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Run a PostgreSQL tool; as root, as the `postgres` user (initdb refuses root).
fn pg_command(bin: &Path, tool: &str) -> Command {
    let exe = bin.join(tool);
    if is_root() {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(exe);
        c
    } else {
        Command::new(exe)
    }
}

fn pg_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return p;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .filter(|p| p.join("initdb").exists())
        .expect("PostgreSQL server binaries not found: run `make deps` (apt package postgresql)")
}

/// A private PostgreSQL cluster; stopped and deleted on drop.
pub struct PgServer {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl PgServer {
    pub fn start() -> PgServer {
        let bin = pg_bindir();
        let dir = tempfile::Builder::new().prefix("fg-pg-").tempdir().unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the PostgreSQL temp dir failed");
        }
        let out = pg_command(&bin, "initdb")
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = PgServer {
            port: free_port(),
            dir,
            bin,
        };
        pg.start_again();
        pg
    }

    /// (Re)start the cluster on its port.
    pub fn start_again(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let out = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-o")
            .arg(opts)
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "30", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "PostgreSQL did not start: {} {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    pub fn stop(&self) {
        let _ = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

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
    let deadline = Instant::now() + within;
    let c = reqwest::Client::new();
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
