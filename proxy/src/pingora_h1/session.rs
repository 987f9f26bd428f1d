//! pingora's engine, the part that is not a phase: the request's lines as received, the
//! answer written through the session ([`SessionDownstream`]), refusals, the body read whole.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue};
use pingora::prelude::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};

use super::RequestCtx;
use crate::answers::{ErrorAnswer, HSTS};
use crate::forward::answer::AnswerHead;
use crate::forward::Downstream;
use crate::pingora_compat;
use crate::policy::body::BodyReservation;
use crate::policy::framing::AnswerBody;
use crate::policy::headers;
use crate::policy::outcome::UpstreamError;
use crate::policy::record::{Engine, Finished};
use crate::policy::{body, Rejection};
use crate::state::{Gateway, Snapshot};

/// A request's header lines as received (pingora keeps them: see [`pingora_compat`]).
pub(super) type Lines = Vec<(Vec<u8>, Vec<u8>)>;

/// The raw target and header lines; None when the head as received is not one a strict
/// parser accepts (pingora's is more lenient: it percent-encodes a NUL in the target, say).
/// An HTTP/2 request has no raw head: its lines are made from pingora's parsed one
/// ([`pingora_compat::h2_request_lines`]).
pub(super) fn lines_of(session: &mut Session) -> Option<(Vec<u8>, Lines)> {
    let mut lines = Vec::new();
    let push = |n: &[u8], v: &[u8]| lines.push((n.to_vec(), v.to_vec()));
    let target = match pingora_compat::is_http2(session) {
        true => pingora_compat::h2_request_lines(session, push),
        false => pingora_compat::raw_request_lines(session, push),
    }?;
    Some((target, lines))
}

pub(super) fn values<'a>(
    lines: &'a Lines,
    name: &'a str,
) -> impl DoubleEndedIterator<Item = &'a [u8]> + 'a {
    lines
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v.as_slice())
}

/// pingora's errors as the policy knows them.
pub(super) fn upstream_error(e: &Error) -> UpstreamError {
    match e.etype() {
        ErrorType::ConnectTimedout => UpstreamError::ConnectTimeout,
        ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
            UpstreamError::ConnectRefused
        }
        ErrorType::ReadTimedout => UpstreamError::ReadTimeout,
        ErrorType::WriteTimedout => UpstreamError::WriteTimeout,
        ErrorType::InvalidHTTPHeader | ErrorType::H1Error | ErrorType::InvalidH2 => {
            UpstreamError::Invalid
        }
        _ => UpstreamError::Closed,
    }
}

/// The answer through pingora's session.
///
/// Over HTTP/2 the answer goes to pingora's HTTP/2 session directly (the gateway has no
/// downstream modules for pingora's `Session` to run): the head as HEADERS with END_STREAM
/// when there is no body, else the body staged until [`Downstream::flush`] and sent as DATA
/// with END_STREAM on the last piece. Through pingora's `Session` every answer took three
/// frames (HEADERS, DATA, and an empty DATA to end the stream, as pingora's `Session` drops
/// the end flag of a head), each one queued, encoded and flushed by the `h2` crate.
pub(super) struct SessionDownstream<'a> {
    pub(super) session: &'a mut Session,
    pub(super) lines: Vec<u8>,
    pub(super) request_id: &'a [u8],
    /// The listener's `Strict-Transport-Security` value (replaces the backend's).
    pub(super) hsts: Option<&'a [u8]>,
    /// The head, staged until the first body piece is ready (so a body found invalid at once
    /// can still be answered 502), and whether it has no body.
    pub(super) head: Option<(Box<ResponseHeader>, bool)>,
    pub(super) started: bool,
    /// Body bytes staged until the next [`Downstream::flush`].
    pub(super) staged: BytesMut,
}

impl<'a> SessionDownstream<'a> {
    pub(super) fn new(
        session: &'a mut Session,
        request_id: &'a [u8],
        hsts: Option<&'a [u8]>,
    ) -> Self {
        SessionDownstream {
            session,
            lines: Vec::with_capacity(512),
            request_id,
            hsts,
            head: None,
            started: false,
            staged: BytesMut::new(),
        }
    }

    /// Write the staged head, if any; `end`: nothing follows it (HTTP/2: END_STREAM on it).
    async fn write_head(&mut self, end: bool) -> bool {
        let Some((resp, _)) = self.head.take() else {
            return true;
        };
        self.started = true;
        match self.session.as_mut() {
            ServerSession::H2(h2) => h2.write_response_header(resp, end).is_ok(),
            _ => self.session.write_response_header(resp, end).await.is_ok(),
        }
    }

    /// The staged body bytes, sent; `end`: the body is complete.
    async fn write_body(&mut self, end: bool) -> bool {
        let data = self.staged.split().freeze();
        match self.session.as_mut() {
            ServerSession::H2(h2) => h2.write_body(data, end).await.is_ok(),
            _ => self
                .session
                .write_response_body((!data.is_empty()).then_some(data), end)
                .await
                .is_ok(),
        }
    }
}

impl Downstream for SessionDownstream<'_> {
    fn lines(&mut self) -> &mut Vec<u8> {
        &mut self.lines
    }

    async fn head(&mut self, head: &AnswerHead, keep_alive: bool) -> bool {
        let resp = if pingora_compat::is_http2(self.session) {
            h2_head(head.status, &self.lines, self.request_id)
        } else {
            h1_head(head.status, &self.lines, self.request_id)
        };
        let Some(mut resp) = resp else {
            return false;
        };
        if let Some(v) = self.hsts {
            if resp.insert_header(HSTS, v).is_err() {
                return false;
            }
        }
        if !keep_alive {
            self.session.set_keepalive(None);
        }
        self.head = Some((Box::new(resp), head.body == AnswerBody::None));
        true
    }

    async fn body(&mut self, data: &[u8]) -> bool {
        self.staged.extend_from_slice(data);
        true
    }

    async fn flush(&mut self, end: bool) -> bool {
        if !self.staged.is_empty() {
            return self.write_head(false).await && self.write_body(end).await;
        }
        match self.head.take() {
            Some((resp, no_body)) => {
                self.started = true;
                if let ServerSession::H2(h2) = self.session.as_mut() {
                    // Nothing follows: END_STREAM on the head itself.
                    return h2.write_response_header(resp, end).is_ok();
                }
                // HTTP/1: pingora ends an answer without a body itself.
                if self
                    .session
                    .write_response_header(resp, no_body)
                    .await
                    .is_err()
                {
                    return false;
                }
                no_body || !end || self.write_body(true).await
            }
            None => !end || self.write_body(true).await,
        }
    }

    async fn error(&mut self, answer: &ErrorAnswer<'_>) -> bool {
        self.head = None;
        self.staged.clear();
        self.started = true;
        let answer = ErrorAnswer {
            hsts: self.hsts.or(answer.hsts),
            ..*answer
        };
        answer.send(self.session).await.is_ok()
    }

    fn started(&self) -> bool {
        self.started
    }
}

/// The answer's header lines as `forward::answer` wrote them into `lines` (the status line
/// first, then `Name: value` lines): each name and its trimmed value.
fn header_lines(lines: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    lines.split(|&b| b == b'\n').skip(1).filter_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        Some((&line[..colon], line[colon + 1..].trim_ascii()))
    })
}

/// The head for pingora's HTTP/1 session: the names' case kept.
fn h1_head(status: u16, lines: &[u8], request_id: &[u8]) -> Option<ResponseHeader> {
    let mut resp = ResponseHeader::build(status, None).ok()?;
    for (name, value) in header_lines(lines) {
        let name = String::from_utf8_lossy(name).into_owned();
        resp.append_header(name, value).ok()?;
    }
    resp.insert_header("X-Request-Id", request_id).ok()?;
    Some(resp)
}

/// The head for pingora's HTTP/2 session: names lower case (HTTP/2 has no case to keep), the
/// values slices of one copy of the lines, and without the connection-specific fields, which
/// pingora's HTTP/2 session would remove (RFC 9113 8.2.2).
fn h2_head(status: u16, lines: &[u8], request_id: &[u8]) -> Option<ResponseHeader> {
    let shared = Bytes::copy_from_slice(lines);
    let mut headers = http::HeaderMap::with_capacity(16);
    for (name, value) in header_lines(&shared) {
        let name = HeaderName::from_bytes(name).ok()?;
        if is_connection_specific(&name) {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(shared.slice_ref(value)).ok()?;
        headers.try_append(name, value).ok()?;
    }
    let mut id = HeaderValue::from_bytes(request_id).ok()?;
    // Unique to each answer: HPACK "never indexed", so h2's encoder neither searches its
    // table for it nor inserts it (evicting the fields that do repeat).
    id.set_sensitive(true);
    headers
        .try_insert(HeaderName::from_static("x-request-id"), id)
        .ok()?;
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = http::StatusCode::from_u16(status).ok()?;
    parts.headers = headers;
    Some(ResponseHeader::from(parts))
}

/// A header HTTP/2 forbids in an answer (RFC 9113 §8.2.2): the hop-by-hop ones, and
/// `Transfer-Encoding` (the own answer lines keep it for HTTP/1's re-chunking).
fn is_connection_specific(name: &HeaderName) -> bool {
    *name == http::header::TRANSFER_ENCODING || headers::hop_by_hop(name.as_str().as_bytes())
}

impl Gateway {
    /// Answer the request with the rejection's status and JSON body, count it, record it.
    pub(super) async fn reject(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        reason: Rejection,
        retry_after: Option<u64>,
        headers: &[(&'static str, String)],
        unread_body: bool,
    ) -> Result<bool> {
        ctx.rejection = Some(reason);
        self.metrics.reject(reason);
        let answer = ErrorAnswer {
            hsts: ctx.hsts.as_deref(),
            ..ErrorAnswer::refusal(
                reason,
                retry_after,
                headers,
                &ctx.request_id,
                unread_body,
                false,
            )
        };
        let _ = answer.send(session).await;
        Ok(true)
    }

    /// Read the whole body (nginx's `proxy_request_buffering on`) under the policy's rules.
    pub(super) async fn read_body(
        &self,
        session: &mut Session,
        snap: &Snapshot,
        cap: usize,
        expect_continue: bool,
    ) -> std::result::Result<(Bytes, BodyReservation), Option<Rejection>> {
        let cfg = &snap.config;
        if expect_continue {
            let go_on = ResponseHeader::build(100, Some(0)).map_err(|_| None)?;
            session
                .write_response_header(Box::new(go_on), false)
                .await
                .map_err(|_| None)?;
        }
        let mut held = BytesMut::new();
        let mut reserved = self.bodies.reservation();
        let started = Instant::now();
        loop {
            body::check_progress(cfg, cap, held.len(), started.elapsed(), false).map_err(Some)?;
            match tokio::time::timeout(cfg.body_idle_timeout, session.read_request_body()).await {
                Err(_) => return Err(Some(Rejection::ClientTimeout)),
                // pingora's own refusals of the body's framing (a bad chunk size) are a
                // malformed request; a read that failed is a client that went away.
                Ok(Err(e)) => {
                    return Err(match e.etype() {
                        ErrorType::ReadTimedout => Some(Rejection::ClientTimeout),
                        ErrorType::ReadError | ErrorType::ConnectionClosed => None,
                        _ => Some(Rejection::MalformedRequest),
                    })
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => {
                    reserved
                        .grow(cfg.total_body_bytes, chunk.len())
                        .map_err(Some)?;
                    held.extend_from_slice(&chunk);
                    body::check_progress(cfg, cap, held.len(), started.elapsed(), true)
                        .map_err(Some)?;
                }
            }
        }
        Ok((held.freeze(), reserved))
    }

    /// The request's record, before its outcome is known.
    pub(super) fn finished<'a>(ctx: &'a RequestCtx, req: &'a RequestHeader) -> Finished<'a> {
        Finished {
            started: ctx.started,
            status: 0,
            backend: None,
            rejection: ctx.rejection,
            client_ip: ctx.client_ip,
            method: req.method.as_str().as_bytes(),
            target: req.raw_path(),
            request_id: &ctx.request_id,
            error: None,
            engine: Engine::Pingora,
            route: ctx.route.as_deref(),
        }
    }
}
