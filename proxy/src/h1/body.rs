//! A `Content-Length` body, read whole into the connection's buffer after its head, under
//! the policy's rules ([`body::check_progress`]) and `slow_clients.body_idle_timeout`.

use std::time::Instant;

use tokio::io::AsyncReadExt;

use super::request::Plan;
use crate::downstream::ClientStream;
use crate::policy::body::{self, BodyReservation};
use crate::policy::Rejection;
use crate::state::Snapshot;
use crate::upstream::conn::RELAY_BYTES;

/// Err(None): the client went away; Err(Some): refused (408, or 503 over the body budget).
pub(super) async fn read(
    io: &mut ClientStream,
    buf: &mut Vec<u8>,
    plan: &Plan,
    snap: &Snapshot,
    held: &mut BodyReservation,
) -> Result<(), Option<Rejection>> {
    let cfg = &snap.config;
    if plan.body_len > 0 {
        held.grow(cfg.total_body_bytes, plan.body_len)
            .map_err(Some)?;
    }
    let want = plan.head_len + plan.body_len;
    let started = Instant::now();
    while buf.len() < want {
        let got = buf.len() - plan.head_len;
        // The declared length was checked against the route's cap.
        body::check_progress(cfg, plan.body_len, got, started.elapsed(), false).map_err(Some)?;
        buf.reserve((want - buf.len()).min(RELAY_BYTES * 4));
        match tokio::time::timeout(cfg.body_idle_timeout, io.read_buf(buf)).await {
            Err(_) => return Err(Some(Rejection::ClientTimeout)),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(None),
            Ok(Ok(_)) => {}
        }
    }
    Ok(())
}
