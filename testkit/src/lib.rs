//! Test kit shared by the workspace's black-box tests: free ports that are safe to reuse, and
//! throwaway PostgreSQL clusters and Redis servers (free port, temp directory, stopped on
//! drop), either of them with TLS on (certificates from [`TestCa`]). A server that cannot
//! start fails the test with the reason: nothing is skipped and no server someone else
//! started is used.

mod tls;
pub use tls::TestCa;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A free port on 127.0.0.1, never the same twice in this process, and below the kernel's
/// ephemeral range (32768+): once released it is not taken as the local port of one of the
/// many client connections the tests make, nor handed to another test by `bind(0)`.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = (RandomState::new().hash_one(std::process::id()) % 20_000) as u32;
    let _ = NEXT.compare_exchange(0, base + 1, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 10_000 + (n % 22_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A free address for an upstream (see [`free_port`]).
pub fn stable_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
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
    /// `ssl=on` with the certificate and key copied into the cluster's directory.
    tls: bool,
}

impl PgServer {
    pub fn start() -> PgServer {
        Self::start_with(None)
    }

    /// A cluster that also accepts TLS (`ssl=on`), with `ca`'s server certificate: clients
    /// choose with `sslmode` (plaintext is still accepted, so a test can tell them apart in
    /// `pg_stat_ssl`).
    pub fn start_with(tls: Option<&TestCa>) -> PgServer {
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
        if let Some(ca) = tls {
            // PostgreSQL refuses a key that others can read: the copies are the server
            // user's, mode 0600.
            use std::os::unix::fs::PermissionsExt;
            for (from, to) in [
                (ca.server_cert(), "server.pem"),
                (ca.server_key(), "server.key"),
            ] {
                let to = dir.path().join(to);
                std::fs::copy(from, &to).unwrap();
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
                if is_root() {
                    let ok = Command::new("chown")
                        .arg("postgres:postgres")
                        .arg(&to)
                        .status()
                        .unwrap()
                        .success();
                    assert!(ok, "chown of {} failed", to.display());
                }
            }
        }
        let pg = PgServer {
            port: free_port(),
            dir,
            bin,
            tls: tls.is_some(),
        };
        pg.start_again();
        pg
    }

    /// (Re)start the cluster on its port.
    pub fn start_again(&self) {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        if self.tls {
            let d = self.dir.path();
            opts += &format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                d.join("server.pem").display(),
                d.join("server.key").display()
            );
        }
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

/// TLS for a [`RedisServer`]: its port is TLS only (`--port 0 --tls-port`).
#[derive(Clone, Copy)]
pub struct RedisTls<'a> {
    /// Signs the server certificate and, when asked for, the clients'.
    pub ca: &'a TestCa,
    /// `--tls-auth-clients`: whether clients must show a certificate `ca` signed.
    pub client_certificates: bool,
}

/// A private redis-server on a free port; killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    /// TLS files and `--tls-auth-clients`, when the port is TLS.
    tls: Option<(PathBuf, PathBuf, PathBuf, bool)>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(None)
    }

    /// A server whose one port is TLS (`rediss://`) with `tls`'s certificates, or plaintext.
    pub fn start_with(tls: Option<RedisTls>) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("fg-redis-")
            .tempdir()
            .unwrap();
        let mut r = RedisServer {
            port: free_port(),
            child: None,
            dir,
            tls: tls.map(|t| {
                (
                    t.ca.server_cert(),
                    t.ca.server_key(),
                    t.ca.ca(),
                    t.client_certificates,
                )
            }),
        };
        r.start_again();
        r
    }

    /// (Re)start on the same port.
    pub fn start_again(&mut self) {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &port]),
            Some((cert, key, ca, auth)) => cmd
                .args(["--port", "0", "--tls-port", &port])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", if *auth { "yes" } else { "no" }]),
        };
        // Its log says when it is ready (a TLS port does not answer a plaintext PING).
        let log = self.dir.path().join("redis.log");
        let child = cmd
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: run `make deps` (apt package redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ready(&log) {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                Instant::now() < deadline && exited.is_none(),
                "redis-server did not start on {} ({exited:?}): {}",
                self.port,
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ready(&self, log: &Path) -> bool {
        match self.tls {
            None => self.pong(),
            Some(_) => std::fs::read_to_string(log)
                .is_ok_and(|l| l.contains("Ready to accept connections")),
        }
    }

    fn pong(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// `redis://`, or `rediss://` when the port is TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .arg(sig)
                .arg(c.id().to_string())
                .status()
                .unwrap();
            assert!(ok.success());
        }
    }

    /// Freeze the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.stop();
    }
}

/// A Prometheus sample from `/metrics` text: `name{labels}` exactly as exposed; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A seeded generator for randomized tests: the seed from `FLOODGATE_SEED`, else the clock,
/// printed so a failure can be replayed.
pub fn seeded() -> (u64, impl FnMut() -> u64) {
    let seed = std::env::var("FLOODGATE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (replay with FLOODGATE_SEED={seed})");
    let mut x = seed | 1;
    let next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (seed, next)
}
