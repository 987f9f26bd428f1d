//! Who is calling: the `X-API-Key` (or `Authorization: Bearer`) header, looked up by its
//! SHA-256 in `api_keys`. Lookups are cached in process for `API_KEY_CACHE_TTL`, unknown keys
//! included, so a hot key costs no database round trip and a revoked key stops working
//! within the TTL.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderMap;

use crate::db::{hash_key, Db, KeyOwner};
use crate::error::ApiError;

/// The caller of one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Caller {
    /// No key: allowed on the items routes, refused where a user is required.
    Anonymous,
    User(KeyOwner),
}

/// Most entries the cache holds; when full it is cleared (simple, bounded).
const MAX_CACHED: usize = 100_000;

pub struct Callers {
    ttl: Duration,
    cache: Mutex<HashMap<String, (Option<KeyOwner>, Instant)>>,
}

/// The key a request presents, if any.
fn presented_key(headers: &HeaderMap) -> Option<Result<&str, ApiError>> {
    let raw = if let Some(v) = headers.get("x-api-key") {
        v
    } else {
        let v = headers.get(http::header::AUTHORIZATION)?;
        let Some(token) = v.to_str().ok().and_then(|s| s.strip_prefix("Bearer ")) else {
            return Some(Err(ApiError::Unauthorized(
                "Authorization must be `Bearer <API key>`".into(),
            )));
        };
        return Some(check_shape(token));
    };
    Some(match raw.to_str() {
        Ok(s) => check_shape(s),
        Err(_) => Err(ApiError::Unauthorized("malformed API key".into())),
    })
}

fn check_shape(key: &str) -> Result<&str, ApiError> {
    let key = key.trim();
    if key.is_empty() || key.len() > 200 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::Unauthorized("malformed API key".into()));
    }
    Ok(key)
}

impl Callers {
    pub fn new(ttl: Duration) -> Self {
        Callers {
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The caller, or 401 for a malformed, unknown or revoked key (503 if the database
    /// cannot be asked).
    pub async fn identify(&self, db: &Db, headers: &HeaderMap) -> Result<Caller, ApiError> {
        let key = match presented_key(headers) {
            None => return Ok(Caller::Anonymous),
            Some(k) => k?,
        };
        let hash = hash_key(key);
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .get(&hash)
                .filter(|(_, at)| at.elapsed() < self.ttl)
                .map(|(owner, _)| owner.clone())
        };
        let owner = match cached {
            Some(o) => o,
            None => {
                let o = db.key_owner(&hash).await?;
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
                cache.insert(hash, (o.clone(), Instant::now()));
                o
            }
        };
        owner
            .map(Caller::User)
            .ok_or_else(|| ApiError::Unauthorized("unknown or revoked API key".into()))
    }
}
