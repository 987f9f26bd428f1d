//! Open-loop load for loadtest/'s overload scenario: `rate` GETs a second on a fixed schedule
//! for `seconds`, each sent when its time comes whatever the answers' pace (new connections
//! are opened as needed, up to `max_conns`), so an overloaded server sees the arrivals grow
//! its queue instead of slowing the client down, as real users do.
//! Usage: openloop <url> <rate> <seconds> [max_conns = 2000]
//! Prints one JSON line: sent, per-status counts, errors (no answer within 10 s), 2xx per
//! second, and the p50/p90/p99/max latency of 2xx answers only, in ms.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 3 {
        eprintln!("usage: openloop <url> <rate> <seconds> [max_conns]");
        std::process::exit(2);
    }
    let url = a[0].clone();
    let rate: f64 = a[1].parse().expect("rate");
    let secs: f64 = a[2].parse().expect("seconds");
    let max_conns: usize = a.get(3).and_then(|m| m.parse().ok()).unwrap_or(2000);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(max_conns)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let conns = Arc::new(tokio::sync::Semaphore::new(max_conns));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<(u16, Duration)>>();
    let start = tokio::time::Instant::now();
    let n = (rate * secs).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    for i in 0..n {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let (client, url, tx, conns) = (client.clone(), url.clone(), tx.clone(), conns.clone());
        tokio::spawn(async move {
            let _slot = conns.acquire_owned().await;
            let t = Instant::now();
            let r = match client.get(&url).send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let ok = resp.bytes().await.is_ok();
                    ok.then(|| (status, t.elapsed()))
                }
                Err(_) => None,
            };
            let _ = tx.send(r);
        });
    }
    drop(tx);
    let mut statuses = BTreeMap::<u16, u64>::new();
    let (mut errors, mut ok_lat) = (0u64, Vec::new());
    while let Some(r) = rx.recv().await {
        match r {
            Some((status, lat)) => {
                *statuses.entry(status).or_default() += 1;
                if (200..300).contains(&status) {
                    ok_lat.push(lat.as_secs_f64() * 1000.0);
                }
            }
            None => errors += 1,
        }
    }
    ok_lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        ok_lat
            .get(((ok_lat.len() as f64 * p) as usize).min(ok_lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let statuses: Vec<String> = statuses
        .iter()
        .map(|(k, v)| format!("\"{k}\":{v}"))
        .collect();
    println!(
        "{{\"sent\":{n},\"errors\":{errors},\"statuses\":{{{}}},\"ok_per_s\":{:.1},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3}}}",
        statuses.join(","),
        ok_lat.len() as f64 / secs,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        ok_lat.last().copied().unwrap_or(0.0)
    );
}
