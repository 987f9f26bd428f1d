//! Storage: PostgreSQL when `DATABASE_URL` is a `postgres://` URL, otherwise an embedded
//! SQLite file (WAL mode, busy timeout). The SQL is the same text for both (`$1` placeholders
//! work in both); [`with_pool!`] dispatches one query to whichever pool is in use.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

/// An item as stored and returned.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq)]
pub struct Item {
    pub id: i64,
    pub name: String,
    pub description: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
}

/// `created_at` exactly as chrono's `Serialize` writes it (RFC 3339, `Z`, the fraction in 0, 3,
/// 6 or 9 digits as needed), written into a stack buffer: chrono's goes through `fmt` a
/// character at a time (`core::fmt::Write::write_char`, ~2% of the backend's CPU on
/// `GET /items` under the seed's wrk load, 50 timestamps a page). Years outside 0..=9999 and
/// leap seconds are left to chrono.
fn rfc3339<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    use chrono::{Datelike, Timelike};
    let (year, nanos) = (t.year(), t.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return t.serialize(s);
    }
    let mut b = [0u8; 30];
    let mut put = |at: usize, v: u32, width: usize| {
        let mut v = v;
        for i in (0..width).rev() {
            b[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, year as u32, 4);
    put(5, t.month(), 2);
    put(8, t.day(), 2);
    put(11, t.hour(), 2);
    put(14, t.minute(), 2);
    put(17, t.second(), 2);
    let (frac, digits) = if nanos == 0 {
        (0, 0)
    } else if nanos % 1_000_000 == 0 {
        (nanos / 1_000_000, 3)
    } else if nanos % 1_000 == 0 {
        (nanos / 1_000, 6)
    } else {
        (nanos, 9)
    };
    if digits > 0 {
        put(20, frac, digits);
    }
    let mut len = 19;
    if digits > 0 {
        b[19] = b'.';
        len = 20 + digits;
    }
    b[len] = b'Z';
    for (i, c) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')] {
        b[i] = c;
    }
    s.serialize_str(std::str::from_utf8(&b[..=len]).expect("ascii"))
}

/// A user resolved from an API key.
#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct KeyOwner {
    pub user_id: i64,
    pub user_name: String,
    pub tier: String,
}

/// Storage failures, split by what the client should be told.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database cannot be reached (down, pool exhausted, timed out): 503.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// The database refused the value itself (a constraint, a character or length it cannot
    /// store): the client's input, 422. Validation should have caught it first.
    #[error("database refused the value: {0}")]
    Rejected(sqlx::Error),
    /// Anything else: a bug or a broken schema, 500.
    #[error("database error: {0}")]
    Other(sqlx::Error),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => DbError::Unavailable(e),
            sqlx::Error::Database(d) => {
                // PostgreSQL class 08 (connection), 53 (resources), 57P (shutdown);
                // SQLite BUSY/LOCKED (5, 6).
                let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
                if code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57P")
                    || code == "5"
                    || code == "6"
                {
                    DbError::Unavailable(e)
                } else if refused_value(d.as_ref(), &code) {
                    DbError::Rejected(e)
                } else {
                    DbError::Other(e)
                }
            }
            _ => DbError::Other(e),
        }
    }
}

/// A refusal of the data rather than a failure of the database: a constraint (unique,
/// foreign key, not null, check), PostgreSQL class 22 (data exception: a character not in
/// the repertoire, a string too long) and 23 (integrity), SQLite TOOBIG (18), CONSTRAINT
/// (19 and its extended codes) and MISMATCH (20).
fn refused_value(d: &dyn sqlx::error::DatabaseError, code: &str) -> bool {
    use sqlx::error::ErrorKind;
    let sqlite_primary = code.parse::<u32>().ok().map(|c| c & 0xff);
    !matches!(d.kind(), ErrorKind::Other)
        || (code.len() == 5 && (code.starts_with("22") || code.starts_with("23")))
        || matches!(sqlite_primary, Some(18..=20))
}

/// `DATABASE_URL`'s connect options. TLS is libpq's `sslmode` (`require`: encrypted, the
/// certificate unchecked; `verify-ca`: signed by a trusted CA; `verify-full`: and naming the
/// host), with `sslrootcert` (a CA file, added to the system's store by sqlx, where libpq
/// trusts only it), `sslcert` and `sslkey`. One thing differs from libpq: a URL without
/// `sslmode` (and no `PGSSLMODE`) connects in plaintext, as it always has here, rather than
/// libpq's `prefer` (TLS when offered, never verified: no defence against an active attacker,
/// yet TLS's cost on every connection). Certificate files named in the URL are read here, so
/// a wrong path fails at start naming the parameter.
fn pg_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let mut options = PgConnectOptions::from_str(url)?;
    let parsed = url::Url::parse(url).map_err(|e| sqlx::Error::Configuration(e.into()))?;
    let mut sslmode = std::env::var_os("PGSSLMODE").is_some();
    for (key, value) in parsed.query_pairs() {
        let file = || std::path::PathBuf::from(&*value);
        let inline = value.starts_with("-----BEGIN");
        let checked = match &*key {
            "sslmode" | "ssl-mode" => {
                sslmode = true;
                Ok(())
            }
            "sslrootcert" | "ssl-root-cert" | "ssl-ca" | "sslcert" | "ssl-cert" if !inline => {
                crate::tls::read_certificates(&format!("DATABASE_URL {key}"), &file()).map(|_| ())
            }
            "sslkey" | "ssl-key" if !inline => {
                crate::tls::read_private_key(&format!("DATABASE_URL {key}"), &file()).map(|_| ())
            }
            _ => Ok(()),
        };
        checked.map_err(|e| sqlx::Error::Configuration(e.into()))?;
    }
    if !sslmode {
        options = options.ssl_mode(PgSslMode::Disable);
    }
    Ok(options)
}

/// The connection pool of whichever engine is configured.
#[derive(Clone, Debug)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Run `$body` with `$pool` bound to the concrete pool.
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Postgres($pool) => $body,
            Db::Sqlite($pool) => $body,
        }
    };
}

/// A pooled PostgreSQL connection idle at least this long is pinged before use.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct DbSettings {
    /// `postgres://...`, `sqlite://path`, or None for `<data_dir>/floodgate.db`.
    pub url: Option<String>,
    pub data_dir: std::path::PathBuf,
    pub pool_size: u32,
    /// How long a request waits for a pooled connection before 503.
    pub acquire_timeout: Duration,
}

impl Db {
    /// Connect lazily: the service starts even when the database is down (readiness says so).
    pub fn connect(s: &DbSettings) -> Result<Db, sqlx::Error> {
        match s.url.as_deref() {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let options = pg_options(url)?;
                // sqlx pings every connection it takes from the pool by default: a second
                // round trip to PostgreSQL for every query (a GET /items was a ping and a
                // query: twice the wake-ups and context switches, which dominate its cost on
                // loopback; perf under the seed's wrk load). A connection that sat idle for a
                // while is still checked, which is what the check is for (one left broken by
                // a database restart); one in steady use proves itself with every query, and
                // an I/O error drops it from the pool.
                let pool = PgPoolOptions::new()
                    .max_connections(s.pool_size)
                    .acquire_timeout(s.acquire_timeout)
                    .test_before_acquire(false)
                    .before_acquire(|conn, meta| {
                        Box::pin(async move {
                            if meta.idle_for >= PING_IF_IDLE_FOR {
                                sqlx::Connection::ping(conn).await?;
                            }
                            Ok(true)
                        })
                    })
                    .connect_lazy_with(options);
                Ok(Db::Postgres(pool))
            }
            other => {
                let opts = match other {
                    Some(url) => SqliteConnectOptions::from_str(url)?,
                    None => {
                        std::fs::create_dir_all(&s.data_dir)?;
                        SqliteConnectOptions::new().filename(default_sqlite_path(&s.data_dir))
                    }
                };
                let opts = opts
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(5))
                    .foreign_keys(true);
                let pool = SqlitePoolOptions::new()
                    .max_connections(s.pool_size)
                    .acquire_timeout(s.acquire_timeout)
                    .connect_lazy_with(opts);
                Ok(Db::Sqlite(pool))
            }
        }
    }

    /// The TLS mode of PostgreSQL connections (None on SQLite), for the startup log.
    pub fn tls_mode(&self) -> Option<&'static str> {
        match self {
            Db::Postgres(p) => Some(match p.connect_options().get_ssl_mode() {
                PgSslMode::Disable => "disable",
                PgSslMode::Allow => "allow",
                PgSslMode::Prefer => "prefer",
                PgSslMode::Require => "require",
                PgSslMode::VerifyCa => "verify-ca",
                PgSslMode::VerifyFull => "verify-full",
            }),
            Db::Sqlite(_) => None,
        }
    }

    pub fn engine(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "postgres",
            Db::Sqlite(_) => "sqlite",
        }
    }

    /// Apply the migrations in `migrations/<engine>/`. Any number of instances may do this at
    /// once: sqlx takes an advisory lock on PostgreSQL, and on SQLite (where it takes none)
    /// an exclusive `flock` on a file beside the database serialises them.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        match self {
            Db::Postgres(p) => sqlx::migrate!("../migrations/postgres").run(p).await,
            Db::Sqlite(p) => {
                let _lock = MigrationLock::take(p.connect_options().get_filename())
                    .await
                    .map_err(|e| sqlx::migrate::MigrateError::Execute(sqlx::Error::Io(e)))?;
                sqlx::migrate!("../migrations/sqlite").run(p).await
            }
        }
    }

    /// A cheap round trip, for the readiness checker.
    pub async fn ping(&self) -> Result<(), DbError> {
        with_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ())?);
        Ok(())
    }

    /// Insert an item; returns only after the row is committed.
    pub async fn create_item(
        &self,
        name: &str,
        description: Option<&str>,
    ) -> Result<Item, DbError> {
        const SQL: &str = "INSERT INTO items (name, description) VALUES ($1, $2) \
                           RETURNING id, name, description, created_at";
        Ok(with_pool!(self, p => sqlx::query_as::<_, Item>(SQL)
            .bind(name)
            .bind(description)
            .fetch_one(p)
            .await?))
    }

    /// Up to `limit` items with id greater than `after`, in id order.
    pub async fn list_items(&self, after: i64, limit: i64) -> Result<Vec<Item>, DbError> {
        const SQL: &str = "SELECT id, name, description, created_at FROM items \
                           WHERE id > $1 ORDER BY id LIMIT $2";
        Ok(with_pool!(self, p => sqlx::query_as::<_, Item>(SQL)
            .bind(after)
            .bind(limit)
            .fetch_all(p)
            .await?))
    }

    pub async fn get_item(&self, id: i64) -> Result<Option<Item>, DbError> {
        const SQL: &str = "SELECT id, name, description, created_at FROM items WHERE id = $1";
        Ok(with_pool!(self, p => sqlx::query_as::<_, Item>(SQL)
            .bind(id)
            .fetch_optional(p)
            .await?))
    }

    /// Delete an item; true when it existed.
    pub async fn delete_item(&self, id: i64) -> Result<bool, DbError> {
        const SQL: &str = "DELETE FROM items WHERE id = $1";
        let n = with_pool!(self, p => sqlx::query(SQL).bind(id).execute(p).await?.rows_affected());
        Ok(n > 0)
    }

    /// The owner of a non-revoked key, by the key's SHA-256 hex.
    pub async fn key_owner(&self, key_hash: &str) -> Result<Option<KeyOwner>, DbError> {
        const SQL: &str = "SELECT u.id AS user_id, u.name AS user_name, u.tier AS tier \
                           FROM api_keys k JOIN users u ON u.id = k.user_id \
                           WHERE k.key_hash = $1 AND k.revoked = FALSE";
        Ok(with_pool!(self, p => sqlx::query_as::<_, KeyOwner>(SQL)
            .bind(key_hash)
            .fetch_optional(p)
            .await?))
    }

    /// Create (or keep) a user and attach the key to it. Used by `backend seed`.
    pub async fn upsert_user_key(&self, name: &str, tier: &str, key: &str) -> Result<(), DbError> {
        const USER: &str = "INSERT INTO users (name, tier) VALUES ($1, $2) \
                            ON CONFLICT (name) DO UPDATE SET tier = excluded.tier";
        const KEY: &str = "INSERT INTO api_keys (key_hash, user_id) \
                           SELECT $1, id FROM users WHERE name = $2 \
                           ON CONFLICT (key_hash) DO NOTHING";
        let hash = hash_key(key);
        with_pool!(self, p => {
            let mut tx = p.begin().await?;
            sqlx::query(USER).bind(name).bind(tier).execute(&mut *tx).await?;
            sqlx::query(KEY).bind(&hash).bind(name).execute(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Connections in use and idle, for the pool gauges.
    pub fn pool_usage(&self) -> (u32, u32) {
        with_pool!(self, p => {
            let size = p.size();
            let idle = p.num_idle() as u32;
            (size.saturating_sub(idle), idle)
        })
    }

    pub async fn close(&self) {
        with_pool!(self, p => p.close().await)
    }
}

/// An exclusive `flock` on `<database>.migrate.lock`, held while migrations run and released
/// when dropped (or when the process dies: the kernel drops it with the descriptor).
struct MigrationLock {
    _held: Option<std::fs::File>,
}

impl MigrationLock {
    async fn take(db_file: &Path) -> std::io::Result<MigrationLock> {
        let name = db_file.as_os_str();
        if name.is_empty() || name == ":memory:" {
            return Ok(MigrationLock { _held: None }); // private to this process
        }
        let mut path = db_file.as_os_str().to_owned();
        path.push(".migrate.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        // std's File::lock is flock(LOCK_EX) on Unix: blocks until granted.
        tokio::task::spawn_blocking(move || {
            file.lock().map(|()| MigrationLock { _held: Some(file) })
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// SHA-256 hex of an API key, as stored.
pub fn hash_key(key: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Where the SQLite file lives when no URL is given.
pub fn default_sqlite_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("floodgate.db")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn created_at_is_written_as_chrono_writes_it() {
        let base = Utc.with_ymd_and_hms(2026, 12, 1, 3, 41, 18).unwrap();
        let mut cases = vec![
            Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
            Utc.with_ymd_and_hms(-1, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(10000, 1, 1, 0, 0, 0).unwrap(),
        ];
        for nanos in [
            0,
            1,
            999,
            1_000,
            410_400_000,
            410_400_000 + 1_000,
            7_000_000,
            999_999_999,
        ] {
            cases.push(base + chrono::Duration::nanoseconds(nanos));
        }
        for t in cases {
            let item = Item {
                id: 1,
                name: "n".into(),
                description: None,
                created_at: t,
            };
            let ours = serde_json::to_value(&item).unwrap()["created_at"].clone();
            assert_eq!(ours, serde_json::to_value(t).unwrap(), "{t:?}");
        }
    }
}
