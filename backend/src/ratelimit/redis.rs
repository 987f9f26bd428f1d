//! The shared store: Redis, one atomic Lua script per request (loaded once, called with
//! EVALSHA; the `redis` crate reloads it on NOSCRIPT), timed by the Redis server's clock so
//! instance clocks do not matter.

use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Check, Outcome, Usage};

/// KEYS: one sorted set per limit. ARGV: a unique member, then (limit, window ms) per key.
/// Returns {admitted, count_1, oldest_ms_1, count_2, oldest_ms_2, ..., now_ms}.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member = ARGV[1]
local n = #KEYS
local counts = {}
local admitted = 1
for i = 1, n do
  local limit = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
  local c = redis.call('ZCARD', KEYS[i])
  counts[i] = c
  if c >= limit then admitted = 0 end
end
local out = {admitted}
for i = 1, n do
  local window = tonumber(ARGV[2 * i + 1])
  if admitted == 1 then
    redis.call('ZADD', KEYS[i], now, member)
    redis.call('PEXPIRE', KEYS[i], window)
    counts[i] = counts[i] + 1
  end
  local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  local o = -1
  if oldest[2] then o = tonumber(oldest[2]) end
  table.insert(out, counts[i])
  table.insert(out, o)
end
table.insert(out, now)
return out
"#;

/// Limits kept in Redis.
pub struct RedisStore {
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    script: redis::Script,
    timeout: Duration,
    /// Makes each admission's member unique across instances.
    instance: String,
    seq: std::sync::atomic::AtomicU64,
}

impl RedisStore {
    pub fn new(url: &str, instance: &str, timeout: Duration) -> redis::RedisResult<Self> {
        Ok(RedisStore {
            client: redis::Client::open(url)?,
            conn: ArcSwapOption::empty(),
            script: redis::Script::new(SCRIPT),
            timeout,
            instance: format!("{instance}-{:08x}", rand::random::<u32>()),
            seq: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The connection manager, made on first use (Redis may be down at start); it then
    /// reconnects by itself.
    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(c) = self.conn.load_full() {
            return Ok((*c).clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1);
        let c = ConnectionManager::new_with_config(self.client.clone(), config).await?;
        self.conn.store(Some(std::sync::Arc::new(c.clone())));
        Ok(c)
    }

    /// Round-trip check (`PING`), for readiness reporting.
    pub async fn ping(&self) -> redis::RedisResult<()> {
        let mut c = self.connection().await?;
        redis::cmd("PING").query_async::<()>(&mut c).await
    }

    pub async fn check(&self, checks: &[Check]) -> redis::RedisResult<Outcome> {
        let mut conn = self.connection().await?;
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut inv = self.script.prepare_invoke();
        for c in checks {
            inv.key(&c.key);
        }
        inv.arg(format!("{}-{seq}", self.instance));
        for c in checks {
            inv.arg(c.quota.limit)
                .arg(c.quota.window.as_millis() as u64);
        }
        let out: Vec<i64> = inv.invoke_async(&mut conn).await?;
        let now = *out.last().unwrap_or(&0);
        let admitted = out.first() == Some(&1);
        let usage = checks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let count = out.get(1 + 2 * i).copied().unwrap_or(0).max(0) as u32;
                let oldest = out.get(2 + 2 * i).copied().unwrap_or(-1);
                let window = c.quota.window.as_millis() as i64;
                let reset = if oldest >= 0 {
                    Duration::from_millis((oldest + window - now).max(0) as u64)
                } else {
                    Duration::ZERO
                };
                Usage {
                    quota: c.quota,
                    remaining: c.quota.limit.saturating_sub(count),
                    reset,
                }
            })
            .collect();
        Ok(Outcome { admitted, usage })
    }
}

/// The script's source, for the benchmark that compares it with a read-then-add limiter.
pub fn script_source() -> &'static str {
    SCRIPT
}
