//! Whether a failed attempt at a backend is tried again, and where. One rule for every
//! engine:
//!
//! - the connect failed: nothing was sent, so another backend is tried, for every method, at
//!   most `upstream.connect_retries` more times (nginx `proxy_next_upstream error timeout`);
//! - a reused (pooled) connection failed before any answer byte arrived: the backend most
//!   likely closed it while it sat idle, so the request goes once more to the **same**
//!   backend on a new connection, which does not count against it (nginx retries a cached
//!   upstream connection the same way); only for idempotent methods, since the backend may
//!   have acted on the request;
//! - anything else after sending: another backend only for idempotent methods, and only with
//!   `upstream.retry_idempotent`.

use crate::config::PoolSettings;

/// What the engine saw of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection could not be made (refused, timed out): nothing was sent.
    Connect,
    /// Failed after the request (or part of it) was written.
    AfterSend {
        /// The connection came from the idle pool.
        reused: bool,
        /// Some bytes of an answer had arrived.
        answered: bool,
    },
}

/// The request's retry history so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct Attempts {
    /// Backends given up on (each failed this request).
    pub backends_failed: usize,
    /// Already sent once more on a new connection after a stale pooled one.
    pub fresh_retry_used: bool,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Answer the failure (502/504).
    No,
    /// The same backend, on a new connection (never a pooled one).
    SameBackendNewConnection,
    /// Another backend, not one of those that failed.
    AnotherBackend,
}

/// The decision, and the history updated with it.
pub fn decide(
    cfg: &PoolSettings,
    idempotent: bool,
    failure: Failure,
    attempts: &mut Attempts,
) -> Retry {
    match failure {
        Failure::Connect => {
            attempts.backends_failed += 1;
            if attempts.backends_failed <= cfg.connect_retries {
                Retry::AnotherBackend
            } else {
                Retry::No
            }
        }
        Failure::AfterSend { .. } if !idempotent => Retry::No,
        Failure::AfterSend {
            reused: true,
            answered: false,
        } if !attempts.fresh_retry_used => {
            attempts.fresh_retry_used = true;
            Retry::SameBackendNewConnection
        }
        Failure::AfterSend { .. } => {
            attempts.backends_failed += 1;
            attempts.fresh_retry_used = false;
            if cfg.retry_idempotent {
                Retry::AnotherBackend
            } else {
                Retry::No
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;

    fn cfg(extra: &str) -> GatewayConfig {
        GatewayConfig::parse(&format!(
            "upstream:\n  backends: [\"127.0.0.1:9\"]\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn connect_failures_go_to_another_backend_up_to_the_limit() {
        let c = cfg("  connect_retries: 2\n");
        let mut a = Attempts::default();
        for _ in 0..2 {
            assert_eq!(
                decide(c.upstream(), false, Failure::Connect, &mut a),
                Retry::AnotherBackend
            );
        }
        assert_eq!(
            decide(c.upstream(), false, Failure::Connect, &mut a),
            Retry::No
        );
    }

    #[test]
    fn a_stale_pooled_connection_is_retried_once_on_the_same_backend() {
        let c = cfg("");
        let stale = Failure::AfterSend {
            reused: true,
            answered: false,
        };
        let mut a = Attempts::default();
        assert_eq!(
            decide(c.upstream(), true, stale, &mut a),
            Retry::SameBackendNewConnection
        );
        // The new connection failed too: no more (retry_idempotent is off).
        assert_eq!(decide(c.upstream(), true, stale, &mut a), Retry::No);
        // Never for a POST: the backend may have acted on it.
        assert_eq!(
            decide(c.upstream(), false, stale, &mut Attempts::default()),
            Retry::No
        );
        // An answer had begun: not a stale connection.
        let begun = Failure::AfterSend {
            reused: true,
            answered: true,
        };
        assert_eq!(
            decide(c.upstream(), true, begun, &mut Attempts::default()),
            Retry::No
        );
    }

    #[test]
    fn idempotent_requests_move_on_only_when_configured() {
        let on = cfg("  retry_idempotent: true\n");
        let fresh = Failure::AfterSend {
            reused: false,
            answered: true,
        };
        let mut a = Attempts::default();
        assert_eq!(
            decide(on.upstream(), true, fresh, &mut a),
            Retry::AnotherBackend
        );
        assert_eq!(a.backends_failed, 1);
        assert_eq!(decide(on.upstream(), false, fresh, &mut a), Retry::No);
        assert_eq!(
            decide(cfg("").upstream(), true, fresh, &mut Attempts::default()),
            Retry::No
        );
    }
}
