//! The gateway's own HTTP/1.1 engine: requests read from the connection's bytes with
//! `httparse`, the policy ([`crate::policy`]) applied, the exchange done by
//! [`crate::forward`], the answer written as bytes ([`sink`]). Why it exists, and what
//! pingora would need upstream to retire it: `docs/decisions/0001-own-http1-engine.md`.
//!
//! It serves HTTP/1.1 requests with no body or a `Content-Length` one, and hands everything
//! else to pingora's engine ([`request::Handover`]), on the same connection, with the bytes
//! it had read put back ([`ClientStream::rewind`]); from there on pingora serves the
//! connection. A body is read whole before a backend is chosen.

mod body;
mod request;
mod sink;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use pingora::protocols::{GetSocketDigest, Ssl};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::answers::ErrorAnswer;
use crate::downstream::ClientStream;
use crate::forward::{Downstream, Fixed, Request};
use crate::policy::record::{record, Engine, Finished, InflightGuard};
use crate::policy::{admit, outcome, Rejection};
use crate::state::{Gateway, Snapshot};
pub use request::Handover;
use request::{Parsed, Plan};
use sink::RawDownstream;

/// How long an idle keep-alive connection is kept once draining began, for a request
/// already on its way (it is answered with `Connection: close`).
const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);

/// How the own engine left a connection.
pub enum Served {
    /// Closed, or to be closed: nothing more to do.
    Closed,
    /// The next request is pingora's; its bytes were put back.
    Pingora,
}

/// Reads more bytes into `buf`; false when the peer closed or the read failed.
async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> bool {
    if buf.capacity() - buf.len() < 2048 {
        buf.reserve(4096);
    }
    matches!(r.read_buf(buf).await, Ok(n) if n > 0)
}

thread_local! {
    /// This worker thread's runtime has its ticker ([`keep_timer_wakeups_near`]).
    static TICKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// How often each worker's runtime is woken by its ticker.
const TICK: Duration = Duration::from_millis(250);

/// tokio's time driver wakes itself (an eventfd write, then one more `epoll_wait`) whenever a
/// timer is registered to fire before the earliest one it knew of when it last went to
/// sleep. Every proxied request registers one (the backend's read timeout, 30 s by default),
/// and with the keep-alive timers of idle connections (60 s) the earliest, so at moderate
/// rates nearly every request paid those two syscalls. A ticker per worker runtime keeps the
/// earliest known timer within `TICK`, so request timers never come first: four wake-ups a
/// second when idle, instead of two syscalls per request.
fn keep_timer_wakeups_near() {
    TICKING.with(|ticking| {
        if !ticking.replace(true) {
            tokio::spawn(async {
                let mut tick = tokio::time::interval(TICK);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tick.tick().await;
                }
            });
        }
    });
}

impl Gateway {
    /// Serve the connection's requests while they are this engine's.
    pub async fn serve_h1(&self, io: &mut ClientStream, shutdown: &ShutdownWatch) -> Served {
        keep_timer_wakeups_near();
        let Some(peer) = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
        else {
            return Served::Pingora;
        };
        // The peer's address as text, for the forwarding headers of every request.
        let mut hop = Vec::with_capacity(15);
        crate::policy::identity::push_ip(&mut hop, peer);
        let tls = io.get_ssl_digest().is_some();
        let local = io
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let mut shutdown = shutdown.clone();
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut upstream: Vec<u8> = Vec::with_capacity(1024);
        let mut answer: Vec<u8> = Vec::with_capacity(4096);
        let mut served = 0usize;
        loop {
            if buf.is_empty() {
                let got = if served == 0 {
                    // The head deadline (ClientStream) bounds the first request's wait.
                    read_more(io, &mut buf).await
                } else {
                    let idle = self.snapshot.load().config.keepalive_timeout;
                    tokio::select! {
                        biased;
                        r = tokio::time::timeout(idle, read_more(io, &mut buf)) => r.unwrap_or(false),
                        // Draining: a request already on its way on this idle connection is
                        // still answered (with `Connection: close`), rather than cut.
                        _ = shutdown.changed() => {
                            tokio::time::timeout(DRAIN_IDLE_GRACE, read_more(io, &mut buf))
                                .await
                                .unwrap_or(false)
                        }
                    }
                };
                if !got {
                    return Served::Closed;
                }
            }
            // A head that is not whole when parsed (pipelined bytes behind the last request, or
            // a slow client) must be whole `slow_clients.header_timeout` after that, however
            // its bytes arrive; set then, so a whole head costs no clock read.
            let mut head_due: Option<Instant> = None;
            let snap = self.snapshot.load_full();
            let listener = snap.config.listener_policy(local);
            let hsts = listener.and_then(|l| l.hsts.as_deref());
            let plan = loop {
                match self.parse_request(&buf, peer, &hop, tls, listener, &snap, &mut upstream) {
                    Parsed::Plan(p) => break p,
                    Parsed::Handover(reason) => {
                        log::debug!("to pingora's engine: {reason:?}");
                        io.rewind(std::mem::take(&mut buf));
                        return Served::Pingora;
                    }
                    Parsed::Refused(reason) => {
                        self.refuse_head(io, &mut answer, reason, peer, hsts).await;
                        return Served::Closed;
                    }
                    // A head over the caps: refused without reading the rest.
                    Parsed::Partial if buf.len() > snap.config.max_header_bytes + 1024 => {
                        self.refuse_head(io, &mut answer, Rejection::HeaderTooLarge, peer, hsts)
                            .await;
                        return Served::Closed;
                    }
                    Parsed::Partial => {
                        let more = tokio::time::timeout_at(
                            (*head_due.get_or_insert_with(|| {
                                Instant::now() + snap.config.header_timeout
                            }))
                            .into(),
                            read_more(io, &mut buf),
                        );
                        match more.await {
                            Ok(true) => {}
                            // The client went away.
                            Ok(false) => return Served::Closed,
                            Err(_) => {
                                self.refuse_head(
                                    io,
                                    &mut answer,
                                    Rejection::HeaderTimeout,
                                    peer,
                                    hsts,
                                )
                                .await;
                                return Served::Closed;
                            }
                        }
                    }
                }
            };
            served += 1;
            let last = plan.close
                || served >= snap.config.max_requests_per_connection
                || *shutdown.borrow();
            let keep = self
                .one(
                    io,
                    &mut buf,
                    &plan,
                    &snap,
                    &mut upstream,
                    &mut answer,
                    last,
                    hsts,
                )
                .await;
            if !keep || last {
                return Served::Closed;
            }
            buf.drain(..plan.head_len + plan.body_len);
        }
    }

    /// A head refused before it was read whole or by the policy's checks: answered (counted,
    /// logged), then the connection closes.
    async fn refuse_head(
        &self,
        io: &mut ClientStream,
        out: &mut Vec<u8>,
        reason: Rejection,
        peer: IpAddr,
        hsts: Option<&[u8]>,
    ) {
        let _inflight = InflightGuard::new(&self.metrics.inflight_requests);
        self.metrics.reject(reason);
        let id = self.new_request_id();
        let answer = ErrorAnswer {
            request_id: Some(&id),
            ..ErrorAnswer::closing(reason.status(), reason.message(), None)
        };
        let status = RawDownstream::new(io, out, &id)
            .with_hsts(hsts)
            .error(&answer)
            .await;
        let done = Finished {
            started: Instant::now(),
            status: if status { reason.status() } else { 0 },
            backend: None,
            rejection: Some(reason),
            client_ip: Some(peer),
            method: b"-",
            target: b"-",
            request_id: &id,
            error: None,
            engine: Engine::Own,
            route: None,
        };
        record(&self.metrics, self.snapshot.load().config.access_log, &done);
    }

    /// One request, from its parsed head to the end of its answer. Returns whether the
    /// client connection may serve another request.
    #[allow(clippy::too_many_arguments)]
    async fn one(
        &self,
        io: &mut ClientStream,
        buf: &mut Vec<u8>,
        plan: &Plan,
        snap: &Snapshot,
        upstream: &mut Vec<u8>,
        answer: &mut Vec<u8>,
        last: bool,
        hsts: Option<&[u8]>,
    ) -> bool {
        let _inflight = InflightGuard::new(&self.metrics.inflight_requests);
        let started = Instant::now();
        let mut held = self.bodies.reservation();
        let target = std::str::from_utf8(&buf[plan.target.clone()]).unwrap_or("/");
        // A refusal, its own Retry-After and headers, and whether its body is left unread.
        let refused = match admit::admit(snap, Some(plan.client_ip), &plan.route, target) {
            Err(r) => Some((
                r.reason,
                Some(r.retry_after),
                Some(r.headers),
                plan.body_len > 0,
            )),
            Ok(_) if matches!(plan.pool, Err(Fixed::Refused(_))) => {
                let Err(Fixed::Refused(reason)) = plan.pool else {
                    unreachable!("matched above")
                };
                Some((reason, None, None, plan.body_len > 0))
            }
            Ok(wait) => {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                match body::read(io, buf, plan, snap, &mut held).await {
                    Ok(()) => {
                        upstream
                            .extend_from_slice(&buf[plan.head_len..plan.head_len + plan.body_len]);
                        None
                    }
                    Err(Some(reason)) => Some((reason, None, None, true)),
                    // The client went away mid-body: nobody to answer, nothing sent on.
                    Err(None) => {
                        let id = &upstream[plan.request_id.clone()];
                        record(
                            &self.metrics,
                            snap.config.access_log,
                            &finished(plan, buf, id, started),
                        );
                        return false;
                    }
                }
            }
        };
        let request_id = &upstream[plan.request_id.clone()];
        let mut done = finished(plan, buf, request_id, started);
        if let Some((reason, retry_after, headers, unread_body)) = refused {
            self.metrics.reject(reason);
            let answer_ = ErrorAnswer::refusal(
                reason,
                retry_after,
                headers.as_ref().map_or(&[][..], |h| &h[..]),
                request_id,
                unread_body,
                last,
            );
            let keep = answer_.keep_alive;
            let ok = RawDownstream::new(io, answer, request_id)
                .with_hsts(hsts)
                .error(&answer_)
                .await;
            done.rejection = Some(reason);
            done.status = reason.status();
            record(&self.metrics, snap.config.access_log, &done);
            return ok && keep;
        }
        let pool = match &plan.pool {
            Ok(pool) => pool,
            Err(fixed) => {
                // The route's own answer or a redirect (a refusal was answered above).
                let (status, message, headers) = fixed.parts();
                let keep = outcome::keep_alive_after_error(status, false, last);
                let a = ErrorAnswer {
                    headers,
                    ..ErrorAnswer::for_request(status, message, request_id, keep)
                };
                let ok = RawDownstream::new(io, answer, request_id)
                    .with_hsts(hsts)
                    .error(&a)
                    .await;
                done.status = status;
                record(&self.metrics, snap.config.access_log, &done);
                return ok && keep;
            }
        };
        let req = Request {
            bytes: &upstream[..],
            request_id,
            idempotent: plan.idempotent,
            head_request: plan.head_request,
            last,
            affinity: plan.affinity.as_deref(),
            pool,
            settings: &plan.route.settings,
        };
        let mut down = RawDownstream::new(io, answer, request_id).with_hsts(hsts);
        let out = self.forward(&req, &mut down).await;
        self.finish(snap, done, &out);
        out.keep_alive
    }
}

/// A request's record, before its outcome is known.
fn finished<'a>(
    plan: &'a Plan,
    buf: &'a [u8],
    request_id: &'a [u8],
    started: Instant,
) -> Finished<'a> {
    Finished {
        started,
        status: 0,
        backend: None,
        rejection: None,
        client_ip: Some(plan.client_ip),
        method: &buf[plan.method.clone()],
        target: &buf[plan.target.clone()],
        request_id,
        error: None,
        engine: Engine::Own,
        route: Some(&plan.route),
    }
}
