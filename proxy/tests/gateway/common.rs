//! Test harness: real HTTP upstreams (small hyper servers on free ports) and the real
//! `gateway` binary started with a config written for the test.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub use testkit::{free_port, metric_value, seeded, stable_addr};

/// What an upstream observed.
#[derive(Default)]
pub struct UpstreamState {
    /// Requests other than health checks.
    pub requests: AtomicU64,
    /// Health checks answered.
    pub probes: AtomicU64,
    /// When false, `/ready` answers 503.
    pub ready: AtomicBool,
    /// Requests being served right now, and the most seen at once.
    pub inflight: AtomicUsize,
    pub max_inflight: AtomicUsize,
    /// The last request's headers, as `name: value` lines.
    pub last_headers: std::sync::Mutex<Vec<(String, String)>>,
    /// The last request's target (path and query), as it arrived.
    pub last_target: std::sync::Mutex<String>,
    /// Request bodies received completely, and the largest one.
    pub bodies: AtomicU64,
    pub max_body: AtomicUsize,
    /// Every request (not health checks) waits this long before its answer.
    pub delay_ms: AtomicU64,
    /// Every request (not health checks) is answered 500.
    pub failing: AtomicBool,
}

/// A real HTTP upstream that says who it is. `/slow?ms=N` waits N ms before answering;
/// `/drop` closes the connection without an answer; `/big?bytes=N` answers N bytes.
pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
    tasks: Option<JoinSet<()>>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Self::start_on(name, stable_addr(), Arc::default(), true).await
    }

    /// An upstream on a given address.
    pub async fn start_at(name: &str, addr: SocketAddr) -> Upstream {
        Self::start_on(name, addr, Arc::default(), true).await
    }

    /// An upstream whose readiness probe always fails.
    pub async fn start_never_ready(name: &str) -> Upstream {
        Self::start_on(name, stable_addr(), Arc::default(), false).await
    }

    async fn start_on(
        name: &str,
        addr: SocketAddr,
        state: Arc<UpstreamState>,
        ready: bool,
    ) -> Upstream {
        state.ready.store(ready, Ordering::SeqCst);
        // An aborted predecessor on this address may not have released it yet.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot bind {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let mut tasks = JoinSet::new();
        let (n, s) = (name.to_string(), state.clone());
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (n, s) = (n.clone(), s.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req| handle(n.clone(), s.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            name: name.to_string(),
            addr,
            state,
            tasks: Some(tasks),
        }
    }

    /// Stop listening and drop every open connection, like a killed process.
    pub fn kill(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            t.abort_all();
        }
    }

    /// Start again on the same address, keeping the counters.
    pub async fn restart(&mut self) {
        let fresh = Self::start_on(&self.name, self.addr, self.state.clone(), true).await;
        self.tasks = fresh.tasks;
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn target(&self) -> String {
        self.state.last_target.lock().unwrap().clone()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.state
            .last_headers
            .lock()
            .unwrap()
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

async fn handle(
    name: String,
    state: Arc<UpstreamState>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    if req.uri().path() == "/ready" {
        state.probes.fetch_add(1, Ordering::SeqCst);
        let status = if state.ready.load(Ordering::SeqCst) {
            200
        } else {
            503
        };
        return Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap());
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    *state.last_target.lock().unwrap() = req
        .uri()
        .path_and_query()
        .map_or_else(String::new, |p| p.to_string());
    *state.last_headers.lock().unwrap() = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let now = state.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_inflight.fetch_max(now, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    if let Ok(body) = http_body_util::BodyExt::collect(req.into_body()).await {
        let len = body.to_bytes().len();
        if len > 0 {
            state.bodies.fetch_add(1, Ordering::SeqCst);
            state.max_body.fetch_max(len, Ordering::SeqCst);
        }
    }
    let number = |key: &str, default: u64| {
        query
            .as_deref()
            .and_then(|q| q.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    if path == "/slow" {
        tokio::time::sleep(Duration::from_millis(number("ms=", 1000))).await;
    }
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if state.failing.load(Ordering::SeqCst) {
        state.inflight.fetch_sub(1, Ordering::SeqCst);
        return Ok(Response::builder()
            .status(500)
            .header("X-Served-By", name.as_str())
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap());
    }
    state.inflight.fetch_sub(1, Ordering::SeqCst);
    if path == "/drop" {
        // hyper closes the connection when the service fails.
        return Err(std::io::Error::other("dropped without an answer"));
    }
    if path == "/big" {
        return Ok(Response::builder()
            .header("X-Served-By", name.as_str())
            .body(Full::new(Bytes::from(vec![
                b'x';
                number("bytes=", 0) as usize
            ])))
            .unwrap());
    }
    let mut answer = Response::builder();
    if path == "/sts" {
        // The backend's own HSTS (a gateway with `tls.hsts` replaces it).
        answer = answer.header("Strict-Transport-Security", "max-age=1");
    }
    Ok(answer
        .header("X-Served-By", name.as_str())
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(format!(
            "{{\"served_by\":\"{name}\"}}"
        ))))
        .unwrap())
}

/// The path of the built `gateway` binary.
pub fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_gateway")
}

/// A running `gateway` process with its own config file; killed on drop.
pub struct GatewayProc {
    pub child: Child,
    pub port: u16,
    pub metrics_port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl GatewayProc {
    /// Start a gateway whose config is `body` (YAML without `listen`/`metrics_listen`, which
    /// the harness adds on free ports). Waits until it accepts connections.
    pub async fn start(body: &str) -> GatewayProc {
        Self::start_with(body, |dir, yaml| {
            let path = dir.join("gateway.yaml");
            std::fs::write(&path, yaml).unwrap();
            path
        })
        .await
    }

    /// Start with the config laid out by `write(dir, yaml)`, which returns the path to pass
    /// with `-c` (a ConfigMap-style symlink layout, say).
    pub async fn start_with(body: &str, write: impl FnOnce(&Path, &str) -> PathBuf) -> GatewayProc {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let metrics_port = free_port();
        let config_path = write(dir.path(), &render(port, metrics_port, body));
        let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
        let child = Command::new(gateway_bin())
            .arg("-c")
            .arg(&config_path)
            .arg("--upgrade-sock")
            .arg(dir.path().join("upgrade.sock"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("gateway binary runs");
        let mut g = GatewayProc {
            child,
            port,
            metrics_port,
            dir,
            config_path,
        };
        g.wait_listening().await;
        g
    }

    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("gateway exited with {status}: {}", self.log());
            }
            let a = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await;
            let b = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await;
            if a.is_ok() && b.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not start: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The config text this gateway would get for `body` (same ports).
    pub fn render(&self, body: &str) -> String {
        render(self.port, self.metrics_port, body)
    }

    /// Replace the config file atomically (write + rename) with `body`.
    pub fn rewrite(&self, body: &str) {
        let tmp = self.dir.path().join(".gateway.yaml.tmp");
        std::fs::write(&tmp, self.render(body)).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Send SIGHUP and wait until the reload counters moved; returns (successes, errors).
    pub async fn reload(&self) -> (f64, f64) {
        let before = self.reload_counts().await;
        self.signal(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.reload_counts().await;
            if now != before {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "no reload happened: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn reload_counts(&self) -> (f64, f64) {
        let m = self.metrics().await;
        (
            metric_value(&m, "gateway_config_reloads_total{result=\"success\"}"),
            metric_value(&m, "gateway_config_reloads_total{result=\"error\"}"),
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one sample, `name{labels}` exactly as exposed, or 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// A series that is counted after its answer was sent (`logging`): its value once it
    /// reaches `expected`, or after 2 s.
    pub async fn metric_after_answer(&self, series: &str, expected: f64) -> f64 {
        after_answer(|| self.metric(series), |v| *v == expected).await
    }

    /// `gateway_rejections_total` for one reason.
    pub async fn rejections(&self, reason: &str) -> f64 {
        self.metric(&format!("gateway_rejections_total{{reason=\"{reason}\"}}"))
            .await
    }

    /// Wait until `n` backends report up.
    pub async fn wait_backends_up(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = self.metrics().await;
            let up = text
                .lines()
                .filter(|l| l.starts_with("gateway_backend_up{") && l.ends_with(" 1"))
                .count();
            if up == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "backends up: {up}, wanted {n}\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, sig: i32) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the gateway records just after an answer is sent (pingora's `logging` hook: counters,
/// the access line, its error line): `probe`'s value once `done` accepts it, or its value
/// after 2 s, polled every 20 ms.
pub async fn after_answer<T, F: std::future::Future<Output = T>>(
    mut probe: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let v = probe().await;
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `gateway -t -c <path>`: whether it accepted the file, and what it printed.
pub fn dash_t(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(gateway_bin())
        .arg("-t")
        .arg("-c")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code() == Some(0),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

/// `gateway -t` on a file holding `yaml`.
pub fn check_config(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.yaml");
    std::fs::write(&path, yaml).unwrap();
    dash_t(&path)
}

/// Health checks fast enough for tests.
pub const HEALTH: &str =
    "  health_check: {interval: 200ms, timeout: 200ms, failures: 2, successes: 1}\n";

/// One upstream ("a") and a gateway in front of it with `extra` config, the backend up.
pub async fn upstream_and_gateway(extra: &str) -> (Upstream, GatewayProc) {
    let up = Upstream::start("a").await;
    let gw = gateway_with(&up, extra).await;
    (up, gw)
}

/// A gateway in front of `up` with `extra` config, once the backend is up.
pub async fn gateway_with(up: &Upstream, extra: &str) -> GatewayProc {
    let gw = GatewayProc::start(&format!(
        "{extra}upstream:\n  backends:\n    - \"{}\"\n{HEALTH}",
        up.addr
    ))
    .await;
    gw.wait_backends_up(1).await;
    gw
}

/// A full config: the harness's listeners, no protections unless `body` configures them.
pub fn render(port: u16, metrics_port: u16, body: &str) -> String {
    let mut defaults = String::new();
    if !body.contains("limits:") {
        defaults.push_str("limits: {per_ip: null, global: null}\n");
    }
    if !body.contains("connections:") {
        defaults.push_str("connections: {per_ip: 0, total: 0}\n");
    }
    if !body.contains("log_level:") {
        defaults.push_str("log_level: warn\n");
    }
    // FLOODGATE_TEST_PATH=pingora: the whole suite with the fast path off (`make test` runs
    // it both ways), so pingora's path stays tested for everything it still serves.
    if !body.contains("fast_path:")
        && std::env::var("FLOODGATE_TEST_PATH").is_ok_and(|v| v == "pingora")
    {
        defaults.push_str("fast_path: false\n");
    }
    // A body with its own `listen:` (TLS tests) names the harness's port as `%PORT%`.
    if body.contains("%PORT%") {
        let body = body.replace("%PORT%", &port.to_string());
        return format!(
            "metrics_listen: \"127.0.0.1:{metrics_port}\"\nworkers: 2\n{defaults}{body}"
        );
    }
    format!(
        "listen: [\"127.0.0.1:{port}\"]\nmetrics_listen: \"127.0.0.1:{metrics_port}\"\nworkers: 2\n{defaults}{body}"
    )
}

/// A client that opens a fresh connection for every request (no pooling surprises).
pub fn client() -> reqwest::Client {
    client_from("127.0.0.1")
}

/// Such a client whose connections come from a given loopback address (per-IP tests).
pub fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A raw TCP connection to `port` from loopback address `from`.
pub async fn tcp_from(from: &str, port: u16) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    sock.connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap()
}

/// Backends as YAML lines.
pub fn backends_yaml(ups: &[&Upstream]) -> String {
    ups.iter()
        .map(|u| format!("    - \"{}\"\n", u.addr))
        .collect()
}

// ---- The raw HTTP/1 client: bytes in, bytes out, for the cases a real client never sends.

/// Read one answer from `conn` (after `pending` bytes already read): its head, its body.
/// Content-Length and chunked bodies; `head_only` for an answer to HEAD.
pub async fn read_answer(
    conn: &mut TcpStream,
    pending: &mut Vec<u8>,
    head_only: bool,
) -> (String, Vec<u8>) {
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_string();
            let lower = head.to_ascii_lowercase();
            let rest = pending[end + 4..].to_vec();
            let length = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map(|v| v.trim().parse::<usize>().unwrap());
            let chunked = lower.contains("transfer-encoding: chunked");
            let body_end = if head_only {
                Some(0)
            } else if let Some(n) = length {
                (rest.len() >= n).then_some(n)
            } else if chunked {
                rest.windows(5)
                    .position(|w| w == b"0\r\n\r\n")
                    .map(|p| p + 5)
            } else {
                None
            };
            if let Some(n) = body_end {
                let body = rest[..n].to_vec();
                *pending = rest[n..].to_vec();
                return (head, body);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before a whole answer; got {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&buf[..n]);
    }
}

pub async fn closed_after(s: &mut tokio::net::TcpStream, started: Instant) -> Duration {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("not closed within 10 s"),
        }
    }
}

/// Asserts that a raw HTTP answer is the gateway's JSON error: `status_line`, the same status
/// in the body, and an error message containing `says`.
pub fn assert_json_error(answer: &str, status_line: &str, says: &str) {
    let (head, body) = answer.split_once("\r\n\r\n").expect(answer);
    assert_eq!(head.lines().next(), Some(status_line), "{answer}");
    assert!(
        head.contains("\r\nContent-Type: application/json\r\n"),
        "{answer}"
    );
    let body: serde_json::Value = serde_json::from_str(body).expect(answer);
    assert_eq!(body["status"].to_string(), status_line[9..12], "{answer}");
    assert!(body["error"].as_str().unwrap().contains(says), "{answer}");
}

pub async fn all_it_says_to(ip: &str, port: u16, request: &[u8]) -> String {
    let mut s = tcp_from(ip, port).await;
    s.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Everything a new connection from `ip` is told before it is closed ("" when it is closed,
/// or reset, without an answer).
pub async fn all_it_says(ip: &str, port: u16) -> String {
    all_it_says_to(ip, port, b"").await
}

/// Clients sending GET `url` in a loop until `stop`, each answer not 200 counted as failed:
/// (sent, failed, the tasks).
pub fn steady_load(
    url: String,
    clients: usize,
    stop: &Arc<AtomicBool>,
) -> (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tasks = (0..clients)
        .map(|_| {
            let (stop, sent, failed, url) =
                (stop.clone(), sent.clone(), failed.clone(), url.clone());
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::SeqCst) {
                    let ok = c.get(&url).send().await.is_ok_and(|r| r.status() == 200);
                    sent.fetch_add(1, Ordering::SeqCst);
                    if !ok {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    (sent, failed, tasks)
}
