//! Reading a request head from the connection's buffer: which engine serves it
//! ([`Handover`], the one named predicate), the policy's checks, and the upstream request
//! head written for it.

use std::net::IpAddr;
use std::ops::Range;

use std::sync::Arc;

use crate::config::{ListenerPolicy, Route};
use crate::forward::request::write_upstream_request;
use crate::forward::{routed, Fixed};
use crate::policy::framing::RequestBody;
use crate::policy::identity::{client_ip, usable_request_id, write_forwarding};
use crate::policy::{admit, request, Rejection};
use crate::state::{Gateway, Snapshot};
use crate::upstream::Upstreams;

/// Most headers a request may have on this engine (pingora's own limit is 256; a head with
/// more goes to pingora, which applies `buffers.max_headers`).
const MAX_HEADERS: usize = 128;

/// Why a request goes to pingora's engine instead (from there on pingora serves the
/// connection, starting with this request's bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// A head `httparse` refuses, or with more than 128 headers: pingora answers it (400).
    Unparsable,
    /// HTTP/1.0: its answers need other framing (no chunked).
    Http10,
    /// A method other than GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS.
    Method,
    /// An upgrade (WebSocket): pingora proxies the upgraded connection.
    Upgrade,
    /// `Expect: 100-continue`: pingora's engine sends the interim answer.
    Expect,
    /// A chunked body: pingora's engine decodes it (and buffers it whole the same way).
    Chunked,
}

/// A request this engine serves, parsed from the head at the start of the buffer.
pub struct Plan {
    pub head_len: usize,
    pub method: Range<usize>,
    pub target: Range<usize>,
    pub head_request: bool,
    pub idempotent: bool,
    /// The client asked to close after it.
    pub close: bool,
    /// The Content-Length body that follows the head (0: none).
    pub body_len: usize,
    pub client_ip: IpAddr,
    /// Where the request id is in the upstream head.
    pub request_id: Range<usize>,
    /// `balance: hash`'s key.
    pub affinity: Option<Vec<u8>>,
    /// The pool its route chose, or the route's own answer.
    pub pool: Result<Arc<Upstreams>, Fixed>,
    /// The route it took (the default route when none matched).
    pub route: Arc<Route>,
}

pub enum Parsed {
    Plan(Plan),
    Partial,
    Handover(Handover),
    /// Refused by the policy before anything else: answered, then the connection closes.
    Refused(Rejection),
}

fn offset(buf: &[u8], part: &str) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

impl Gateway {
    /// Parse the head at the start of `buf`; when this engine serves it, write the upstream
    /// head (ending with the body's `Content-Length`, if any) into `out`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn parse_request(
        &self,
        buf: &[u8],
        peer: IpAddr,
        hop: &[u8],
        tls: bool,
        listener: Option<&ListenerPolicy>,
        snap: &Snapshot,
        out: &mut Vec<u8>,
    ) -> Parsed {
        let cfg = &snap.config;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            Err(_) => return Parsed::Handover(Handover::Unparsable),
        };
        let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version)
        else {
            return Parsed::Handover(Handover::Unparsable);
        };
        if version != 1 {
            return Parsed::Handover(Handover::Http10);
        }
        if !matches!(
            method,
            "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS"
        ) {
            return Parsed::Handover(Handover::Method);
        }
        let lines = || req.headers.iter().map(|h| (h.name.as_bytes(), h.value));
        let facts = match request::check(false, method.as_bytes(), target.as_bytes(), lines()) {
            Ok(f) => f,
            Err(r) => return Parsed::Refused(r),
        };
        if facts.upgrade {
            return Parsed::Handover(Handover::Upgrade);
        }
        if facts.expect_continue {
            return Parsed::Handover(Handover::Expect);
        }
        let head_bytes = admit::head_size(
            method.len(),
            target.len(),
            req.headers.iter().map(|h| (h.name.len(), h.value.len())),
        );
        if let Err(r) = admit::check_head(snap, req.headers.len(), head_bytes) {
            return Parsed::Refused(r);
        }
        if facts.body == RequestBody::Chunked {
            return Parsed::Handover(Handover::Chunked);
        }
        let headers = &*req.headers;
        let header = |name: &'static str| {
            headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        let first = |name: &str| {
            headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        let chosen = routed(
            self,
            snap,
            listener,
            header("host").next(),
            method.as_bytes(),
            target.as_bytes(),
            &first,
        );
        let body_len = match facts.body {
            RequestBody::Length(n) => match admit::check_declared_body(&chosen.route, n) {
                Ok(()) => Some(n as usize),
                Err(r) => return Parsed::Refused(r),
            },
            _ => None,
        };
        let client = client_ip(peer, header("x-forwarded-for"), &cfg.trusted_proxies);
        let connection: Vec<&[u8]> = header("connection").collect();
        let generated;
        let request_id = match header("x-request-id").next() {
            Some(v) if usable_request_id(v) => v,
            _ => {
                generated = self.new_request_id();
                &generated[..]
            }
        };
        let upstream_target = match &chosen.to {
            Ok((_, Some(rewritten))) => &rewritten[..],
            _ => target.as_bytes(),
        };
        let request_id = write_upstream_request(
            out,
            method.as_bytes(),
            upstream_target,
            &chosen.route,
            lines(),
            &connection,
            |out: &mut Vec<u8>| {
                write_forwarding(out, peer, hop, client, header("x-forwarded-for"), tls)
            },
            request_id,
            body_len,
        );
        Parsed::Plan(Plan {
            head_len,
            method: offset(buf, method),
            target: offset(buf, target),
            head_request: facts.head,
            idempotent: facts.idempotent,
            close: facts.close,
            body_len: body_len.unwrap_or(0),
            client_ip: client,
            request_id,
            affinity: crate::policy::affinity::key(&chosen.route.settings, Some(client), lines()),
            pool: chosen.to.map(|(p, _)| p),
            route: chosen.route,
        })
    }
}
