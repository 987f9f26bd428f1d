//! A request body as it arrives: the size cap and the slow-sender rule, for every engine.
//!
//! Bodies are read whole before a backend is chosen (nginx's `proxy_request_buffering on`),
//! so a backend never gets a head without its body and an over-cap or trickled body never
//! holds a backend slot.

use std::time::Duration;

use super::Rejection;
use crate::config::GatewayConfig;

/// Whether the body read so far may go on: `bytes` received after `elapsed` since its first
/// byte was awaited; `finished`: the body is complete. Over `buffers.max_body_bytes`: 413; an
/// unfinished body slower than `slow_clients.body_min_rate` after its grace time: 408.
pub fn check_progress(
    cfg: &GatewayConfig,
    bytes: usize,
    elapsed: Duration,
    finished: bool,
) -> Result<(), Rejection> {
    if bytes > cfg.max_body_bytes {
        return Err(Rejection::BodyTooLarge);
    }
    // A finished body is taken whatever its pace; an unfinished one must keep up.
    if cfg.body_min_rate > 0 && !finished {
        let allowed = cfg.body_min_rate_grace
            + Duration::from_secs_f64(bytes as f64 / cfg.body_min_rate as f64);
        if elapsed > allowed {
            return Err(Rejection::BodyTooSlow);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_bodies_are_cut_after_their_grace_and_caps_hold() {
        let cfg = GatewayConfig::parse(
            "upstream:\n  backends: [\"127.0.0.1:9\"]\nbuffers:\n  max_body_bytes: 1000\nslow_clients:\n  body_min_rate: 100\n  body_min_rate_grace: 2s\n",
        )
        .unwrap();
        let s = Duration::from_secs;
        // Within the grace, anything goes.
        assert!(check_progress(&cfg, 0, s(2), false).is_ok());
        // After it: 100 bytes a second on average since the start, plus the grace.
        assert_eq!(
            check_progress(&cfg, 0, s(3), false),
            Err(Rejection::BodyTooSlow)
        );
        assert!(check_progress(&cfg, 200, s(4), false).is_ok());
        assert_eq!(
            check_progress(&cfg, 200, s(5), false),
            Err(Rejection::BodyTooSlow)
        );
        // A finished body is taken whatever its pace.
        assert!(check_progress(&cfg, 200, s(60), true).is_ok());
        assert_eq!(
            check_progress(&cfg, 1001, s(0), false),
            Err(Rejection::BodyTooLarge)
        );
    }
}
