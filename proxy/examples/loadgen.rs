//! A small HTTP/1.1 load generator for loadtest/: keep-alive connections from a chosen source
//! address (wrk and hey cannot bind one, and per-IP scenarios need several), closed-loop or at
//! a fixed total rate (each connection's sends evenly staggered against the others'). Prints
//! one JSON line: sent, per-status counts, errors, p50/p90/p99 ms, and when the first and last
//! failed request (error or status >= 500) ended, in seconds from the start (-1 when none
//! failed).
//! Usage: loadgen <url> <source-ip> <connections> <seconds> [rate per second, 0 = max] [Host]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

struct Result {
    latencies_us: Vec<u64>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    /// First and last failure, in seconds since the start.
    failed: Option<(f64, f64)>,
}

impl Result {
    fn fail_at(&mut self, t: f64) {
        let (first, last) = self.failed.get_or_insert((t, t));
        *first = first.min(t);
        *last = last.max(t);
    }
}

async fn connect(src: &str, addr: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{src}:0").parse().expect("source ip"))?;
    let stream = s.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One request on `stream`; the status, or None when the connection must be reopened.
async fn request(stream: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> Option<(u16, bool)> {
    stream.write_all(req).await.ok()?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status: u16 = head.get(9..12)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let close = head.contains("connection: close");
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some((status, close))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 4 {
        eprintln!("usage: loadgen <url> <source-ip> <connections> <seconds> [rate] [host]");
        std::process::exit(2);
    }
    let url = a[0].strip_prefix("http://").expect("http:// url");
    let (hostport, path) = url.split_at(url.find('/').unwrap_or(url.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr: std::net::SocketAddr = hostport.parse().expect("ip:port");
    let src = a[1].clone();
    let conns: usize = a[2].parse().expect("connections");
    let secs: f64 = a[3].parse().expect("seconds");
    let rate: f64 = a.get(4).and_then(|r| r.parse().ok()).unwrap_or(0.0);
    let host = a.get(5).map_or(hostport, |h| h.as_str());
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let per_conn_interval = (rate > 0.0).then(|| Duration::from_secs_f64(conns as f64 / rate));
    let mut tasks = Vec::new();
    for i in 0..conns {
        let (src, req) = (src.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = Result {
                latencies_us: Vec::new(),
                statuses: BTreeMap::new(),
                errors: 0,
                failed: None,
            };
            let mut buf = Vec::with_capacity(16384);
            let mut stream: Option<TcpStream> = None;
            // Connections start spread over one interval, so a fixed rate is a steady stream
            // rather than all connections firing together in bursts.
            let mut next =
                Instant::now() + per_conn_interval.unwrap_or_default() * i as u32 / conns as u32;
            while Instant::now() < end {
                if let Some(iv) = per_conn_interval {
                    tokio::time::sleep_until(next.into()).await;
                    next += iv;
                }
                if stream.is_none() {
                    match connect(&src, addr).await {
                        Ok(s) => stream = Some(s),
                        Err(_) => {
                            r.errors += 1;
                            r.fail_at(start.elapsed().as_secs_f64());
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let t = Instant::now();
                match request(stream.as_mut().expect("connected"), &req, &mut buf).await {
                    Some((status, close)) => {
                        if status >= 500 {
                            r.fail_at(start.elapsed().as_secs_f64());
                        }
                        r.latencies_us.push(t.elapsed().as_micros() as u64);
                        *r.statuses.entry(status).or_default() += 1;
                        if close {
                            stream = None;
                        }
                    }
                    None => {
                        r.errors += 1;
                        r.fail_at(start.elapsed().as_secs_f64());
                        stream = None;
                    }
                }
            }
            r
        }));
    }
    let mut all = Result {
        latencies_us: Vec::new(),
        statuses: BTreeMap::new(),
        errors: 0,
        failed: None,
    };
    for t in tasks {
        let r = t.await.expect("task");
        all.latencies_us.extend(r.latencies_us);
        for (k, v) in r.statuses {
            *all.statuses.entry(k).or_default() += v;
        }
        all.errors += r.errors;
        if let Some((first, last)) = r.failed {
            all.fail_at(first);
            all.fail_at(last);
        }
    }
    all.latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((all.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        all.latencies_us[i] as f64 / 1000.0
    };
    let statuses: Vec<String> = all
        .statuses
        .iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    println!(
        "{{\"sent\":{},\"errors\":{},\"statuses\":{{{}}},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"seconds\":{secs},\"first_fail_s\":{:.3},\"last_fail_s\":{:.3}}}",
        all.latencies_us.len() as u64 + all.errors,
        all.errors,
        statuses.join(","),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        all.failed.map_or(-1.0, |f| f.0),
        all.failed.map_or(-1.0, |f| f.1),
    );
}
