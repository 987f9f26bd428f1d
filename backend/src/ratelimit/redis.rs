//! The shared store: Redis, one atomic Lua script per request (loaded once, called with
//! EVALSHA; the `redis` crate reloads it on NOSCRIPT), timed by the Redis server's clock so
//! instance clocks do not matter.

use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Check, Outcome, Usage};

/// KEYS: one sorted set per limit. ARGV: a unique member, then (limit, window µs) per key.
/// Returns {admitted, count_1, oldest_1, count_2, oldest_2, ..., now}, times in µs of the
/// Redis server's clock. Microseconds, not milliseconds: a millisecond score truncated the
/// time, so two admissions could be counted up to 1 ms closer or further apart than they were.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
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
    redis.call('PEXPIRE', KEYS[i], math.ceil(window / 1000))
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

/// The vendor contract: the same sliding-window log for one key, plus a marker of when this
/// Redis's state began (`KEYS[2]`, set by the first call, never expiring), so that a Redis
/// that restarted empty (its log of recent calls lost) is noticed even by an instance whose
/// connection reconnected without an error.
/// ARGV: member, limit, window µs, the marker the caller knows ("" when none).
/// Returns {admitted, count, oldest, now, marker}; admitted is -1 (nothing counted) when the
/// marker is not the one the caller knows. A limit of 0 only reads.
const CONTRACT_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local born = redis.call('GET', KEYS[2])
if not born then
  born = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[2], born)
end
if ARGV[4] ~= '' and ARGV[4] ~= born then
  return {-1, 0, -1, now, tonumber(born)}
end
local limit = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local c = redis.call('ZCARD', KEYS[1])
local admitted = 0
if c < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
  c = c + 1
  admitted = 1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local o = -1
if oldest[2] then o = tonumber(oldest[2]) end
return {admitted, c, o, now, tonumber(born)}
"#;

/// What the contract script said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContractReply {
    /// None: the marker changed (Redis restarted empty); nothing was counted.
    pub admitted: Option<bool>,
    /// Until the oldest counted call leaves the window.
    pub reset: Duration,
    /// The marker of this Redis's state.
    pub born: i64,
}

/// Why a Redis call gave no answer in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Evidence that Redis is gone: the connection was refused, reset or closed (a killed or
    /// restarted Redis). False for a call that was only slow (a timeout, this machine or
    /// Redis stalled for a moment) or that Redis answered with an error.
    pub gone: bool,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

impl Failure {
    fn of(e: &redis::RedisError) -> Failure {
        Failure {
            gone: e.is_connection_refusal()
                || e.is_connection_dropped()
                || (e.is_io_error() && !e.is_timeout()),
            detail: e.to_string(),
        }
    }
}

/// Until the oldest entry (µs, -1 for none) leaves a window of `window` at `now` (µs).
fn reset_of(oldest: i64, window: Duration, now: i64) -> Duration {
    if oldest < 0 {
        return Duration::ZERO;
    }
    Duration::from_micros((oldest + window.as_micros() as i64 - now).max(0) as u64)
}

/// Limits kept in Redis.
pub struct RedisStore {
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    script: redis::Script,
    contract_script: redis::Script,
    timeout: Duration,
    /// Makes each admission's member unique across instances.
    instance: String,
    seq: std::sync::atomic::AtomicU64,
}

impl RedisStore {
    /// A store at `url` (`redis://`, or `rediss://` trusting the system's CA store).
    pub fn new(url: &str, instance: &str, timeout: Duration) -> redis::RedisResult<Self> {
        crate::tls::init();
        Ok(Self::with_client(
            redis::Client::open(url)?,
            instance,
            timeout,
        ))
    }

    /// A store through `client` (see [`crate::tls::redis_client`] for TLS settings).
    pub fn with_client(client: redis::Client, instance: &str, timeout: Duration) -> Self {
        RedisStore {
            client,
            conn: ArcSwapOption::empty(),
            script: redis::Script::new(SCRIPT),
            contract_script: redis::Script::new(CONTRACT_SCRIPT),
            timeout,
            instance: format!("{instance}-{:08x}", rand::random::<u32>()),
            seq: std::sync::atomic::AtomicU64::new(0),
        }
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
            // One attempt per reconnection, no backoff (its delays start near a second): a
            // killed Redis then shows as a refused connection (evidence that it is gone) rather
            // than as calls that time out waiting on the retries; every call and heartbeat is
            // the next attempt.
            .set_number_of_retries(0);
        let c = ConnectionManager::new_with_config(self.client.clone(), config).await?;
        self.conn.store(Some(std::sync::Arc::new(c.clone())));
        Ok(c)
    }

    /// Round-trip check (`PING`), for readiness reporting.
    pub async fn ping(&self) -> redis::RedisResult<()> {
        let mut c = self.connection().await?;
        redis::cmd("PING").query_async::<()>(&mut c).await
    }

    fn member(&self) -> String {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}-{seq}", self.instance)
    }

    /// One script call, without a time limit.
    async fn invoke(
        &self,
        script: &redis::Script,
        keys: &[&str],
        args: &[String],
    ) -> redis::RedisResult<Vec<i64>> {
        let mut conn = self.connection().await?;
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            inv.arg(a);
        }
        inv.invoke_async(&mut conn).await
    }

    /// One script call within the store's timeout. A call that failed may still run
    /// later (a paused Redis runs what was queued when it resumes) and count an admission
    /// nobody made: its member is then removed from `counted` keys by a command sent after
    /// it on the same connection, so it runs after the script whenever that runs.
    async fn invoke_timed(
        &self,
        script: &redis::Script,
        keys: &[&str],
        counted: usize,
        args: &[String],
    ) -> Result<Vec<i64>, Failure> {
        let failure =
            match tokio::time::timeout(self.timeout, self.invoke(script, keys, args)).await {
                Ok(Ok(out)) => return Ok(out),
                Ok(Err(e)) => Failure::of(&e),
                Err(_) => Failure {
                    gone: false,
                    detail: format!("no answer within {:?}", self.timeout),
                },
            };
        // An error may be the connection's own response timeout: compensate either way
        // (removing a member that was never added changes nothing).
        if let Some(conn) = self.conn.load_full() {
            let mut conn = (*conn).clone();
            let keys: Vec<String> = keys[..counted].iter().map(|k| k.to_string()).collect();
            let member = args[0].clone();
            tokio::spawn(async move {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.zrem(k, &member).ignore();
                }
                let compensate = pipe.query_async::<()>(&mut conn);
                let _ = tokio::time::timeout(COMPENSATE_WITHIN, compensate).await;
            });
        }
        Err(failure)
    }

    /// Check and count, without a time limit (benchmarks).
    pub async fn check(&self, checks: &[Check]) -> redis::RedisResult<Outcome> {
        let args = self.check_args(checks);
        let keys: Vec<&str> = checks.iter().map(|c| c.key.as_str()).collect();
        let out = self.invoke(&self.script, &keys, &args).await?;
        Ok(outcome_of(checks, &out))
    }

    /// Check and count within the store's timeout; a call that timed out is compensated.
    pub async fn check_timed(&self, checks: &[Check]) -> Result<Outcome, String> {
        let args = self.check_args(checks);
        let keys: Vec<&str> = checks.iter().map(|c| c.key.as_str()).collect();
        let out = self
            .invoke_timed(&self.script, &keys, keys.len(), &args)
            .await
            .map_err(|f| f.detail)?;
        Ok(outcome_of(checks, &out))
    }

    fn check_args(&self, checks: &[Check]) -> Vec<String> {
        let mut args = vec![self.member()];
        for c in checks {
            args.push(c.quota.limit.to_string());
            args.push(c.quota.window.as_micros().to_string());
        }
        args
    }

    /// The vendor contract (see `CONTRACT_SCRIPT`): count one call against `quota` on `key`
    /// if `born` (the marker the caller knows, None for none yet) is still the marker; a
    /// limit of 0 only reads.
    pub async fn contract(
        &self,
        key: &str,
        quota: super::Quota,
        limit: u32,
        born: Option<i64>,
    ) -> Result<ContractReply, Failure> {
        let marker = format!("{key}:born");
        let args = [
            self.member(),
            limit.to_string(),
            quota.window.as_micros().to_string(),
            born.map(|b| b.to_string()).unwrap_or_default(),
        ];
        let out = self
            .invoke_timed(&self.contract_script, &[key, &marker], 1, &args)
            .await?;
        let [admitted, _count, oldest, now, born] = out[..] else {
            return Err(Failure {
                gone: false,
                detail: format!("unexpected reply {out:?}"),
            });
        };
        Ok(ContractReply {
            admitted: (admitted >= 0).then_some(admitted == 1),
            reset: reset_of(oldest, quota.window, now),
            born,
        })
    }
}

/// How long a compensation of a timed-out call may wait for Redis.
const COMPENSATE_WITHIN: Duration = Duration::from_secs(30);

fn outcome_of(checks: &[Check], out: &[i64]) -> Outcome {
    let now = *out.last().unwrap_or(&0);
    let admitted = out.first() == Some(&1);
    let usage = checks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let count = out.get(1 + 2 * i).copied().unwrap_or(0).max(0) as u32;
            let oldest = out.get(2 + 2 * i).copied().unwrap_or(-1);
            Usage {
                quota: c.quota,
                remaining: c.quota.limit.saturating_sub(count),
                reset: reset_of(oldest, c.quota.window, now),
            }
        })
        .collect();
    Outcome { admitted, usage }
}

/// The script's source, for the benchmark that compares it with a read-then-add limiter.
pub fn script_source() -> &'static str {
    SCRIPT
}
