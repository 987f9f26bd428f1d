//! The seed's vendor limiter (read the count, then add: two round trips) against Floodgate's
//! one atomic Lua script, under the same concurrent load on a real Redis.
//! Usage: limiter_race <redis-url> [limit] [callers] [rounds]
//! Prints, per round, how many calls each admitted for a limit of `limit` in one window.

use std::time::{SystemTime, UNIX_EPOCH};

use floodgate_backend::ratelimit::redis::RedisStore;
use floodgate_backend::ratelimit::{Check, Quota};

/// The seed's `acquire()`: ZREMRANGEBYSCORE + ZCARD in a pipeline, then ZADD if under.
async fn seed_acquire(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    limit: u64,
    n: u64,
) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let (_, count): (u64, u64) = redis::pipe()
        .zrembyscore(key, 0, now - 60.0)
        .zcard(key)
        .query_async(conn)
        .await
        .expect("redis");
    if count >= limit {
        return false;
    }
    let _: () = redis::cmd("ZADD")
        .arg(key)
        .arg(now)
        .arg(format!("{now}-{n}"))
        .query_async(conn)
        .await
        .expect("redis");
    true
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .expect("usage: limiter_race <redis-url> [limit] [callers] [rounds]");
    let limit: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let callers: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let rounds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let client = redis::Client::open(url.as_str()).expect("redis url");
    println!("limit {limit} per window, {callers} concurrent callers on 8 connections");
    println!("round seed_admitted floodgate_admitted");
    for round in 0..rounds {
        let seed_key = format!("race:seed:{round}");
        let mut conns = Vec::new();
        for _ in 0..8 {
            conns.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect"),
            );
        }
        let mut tasks = Vec::new();
        for n in 0..callers {
            let mut c = conns[(n % 8) as usize].clone();
            let key = seed_key.clone();
            tasks.push(tokio::spawn(async move {
                seed_acquire(&mut c, &key, limit, n).await
            }));
        }
        let mut seed = 0;
        for t in tasks {
            seed += t.await.unwrap() as u64;
        }
        let store = std::sync::Arc::new(
            RedisStore::new(&url, "race", std::time::Duration::from_secs(5)).expect("redis url"),
        );
        let check = Check {
            key: format!("race:floodgate:{round}"),
            quota: Quota {
                limit: limit as u32,
                window: std::time::Duration::from_secs(60),
            },
            name: "race".into(),
        };
        let mut tasks = Vec::new();
        for _ in 0..callers {
            let (store, check) = (store.clone(), check.clone());
            tasks.push(tokio::spawn(async move {
                store.check(&[check]).await.expect("redis").admitted
            }));
        }
        let mut ours = 0;
        for t in tasks {
            ours += t.await.unwrap() as u64;
        }
        println!("{round} {seed} {ours}");
    }
}
