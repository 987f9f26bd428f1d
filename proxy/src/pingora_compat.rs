//! Everything that depends on pingora's internals, checked against pingora 0.9.1. Each item
//! is pinned by a test here or named below; re-check them on every pingora upgrade.
//!
//! - [`canned_error_answer`]: the exact bytes of pingora's own empty 400/405 answers
//!   (`pingora_core::protocols::http::error_resp`), replaced by the gateway's JSON ones
//!   (`downstream::stream`; test `only_pingoras_own_empty_answers_are_replaced`).
//! - `logging::client_failed_before_its_head`: the text of pingora's log line for a client that
//!   failed before its head (`logging`; test there).
//! - [`raw_request_lines`]: the request head as received, which pingora keeps
//!   (`get_headers_raw_bytes`): pingora drops a `Content-Length` beside a
//!   `Transfer-Encoding` (RFC 9112), and the policy must see every line to refuse it.
//! - Pipelining: pingora closes a connection with a pipelined request unless
//!   `set_pipelining_enabled(true)` (`pingora_h1`; test `pipelined_requests_are_answered_in_order`).
//! - [`client_stream`]: the session's stream is the `ClientStream` the dispatcher gave
//!   pingora (`Stream::as_any`); used to learn whether bytes of a pipelined head wait in
//!   pingora's buffer, which pingora would wait on for the whole keep-alive timeout.
//! - A request body read in `request_filter` is not read again by the proxy loop; bodies are
//!   therefore forwarded by the gateway's own exchange (`forward`), never by pingora's.
//! - [`h2_request_lines`]: an HTTP/2 request has no raw head; its lines are rebuilt from
//!   pingora's parsed one (`:authority` as `host`), so the same policy reads them.
//! - TLS (`downstream::tls`): the handshake is pingora's `protocols::tls::server::handshake`
//!   with an `Acceptor::from_server_config`, run by the dispatcher; the ALPN it selected
//!   decides HTTP/2 (`Ssl::selected_alpn_proto`, which `ClientStream` passes through, as
//!   pingora's `HttpServerApp` reads it too). Tests: `tests/gateway/tls.rs`.

use pingora::proxy::Session;

use crate::downstream::ClientStream;
use crate::policy::Rejection;

/// pingora answers a head it cannot parse (400) and a CONNECT request (405) itself, before
/// any hook, with a fixed empty response (`pingora_core::protocols::http::error_resp`):
/// status line, `Server: Pingora`, `Date`, `Content-Length: 0`, `Cache-Control: private,
/// no-store`, `Connection: close`. Only that exact shape, written whole, is recognised: it has
/// no body and closes the connection, so answering differently cannot break any framing. A
/// proxied answer does not have it (the gateway adds `X-Request-Id` to every one, after the
/// backend's headers); a backend that sent exactly this shape would have its empty 400 or
/// 405 delivered with the gateway's JSON body instead.
pub fn canned_error_answer(data: &[u8]) -> Option<Rejection> {
    const ANSWERS: [(&[u8], Rejection); 2] = [
        (
            b"HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\nDate: ",
            Rejection::MalformedRequest,
        ),
        (
            b"HTTP/1.1 405 Method Not Allowed\r\nServer: Pingora\r\nDate: ",
            Rejection::ConnectMethod,
        ),
    ];
    const TAIL: &[u8] =
        b"\r\nContent-Length: 0\r\nCache-Control: private, no-store\r\nConnection: close\r\n\r\n";
    // Every write of every response passes here: two bytes of the status code rule out
    // nearly all of them.
    if data.len() > 256 || data.get(9..11) != Some(b"40") || !data.ends_with(TAIL) {
        return None;
    }
    ANSWERS
        .iter()
        .find(|(head, _)| data.starts_with(head))
        .map(|&(_, reason)| reason)
}

/// The request head as the client sent it, parsed strictly (`httparse`, as the own engine
/// parses it): each header line (name, value) in order, and the raw target. None when pingora
/// kept no raw head or a strict parse refuses it.
pub fn raw_request_lines(session: &Session, mut each: impl FnMut(&[u8], &[u8])) -> Option<Vec<u8>> {
    let pingora::protocols::http::ServerSession::H1(h1) = session.as_ref() else {
        return None;
    };
    let raw = h1.get_headers_raw_bytes();
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(&raw), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    for h in req.headers.iter() {
        each(h.name.as_bytes(), h.value);
    }
    req.path.map(|p| p.as_bytes().to_vec())
}

/// Whether the request came over HTTP/2 (pingora's HTTP/2 server).
pub fn is_http2(session: &Session) -> bool {
    matches!(
        session.as_ref(),
        pingora::protocols::http::ServerSession::H2(_)
    )
}

/// The local address the request's connection was accepted on (HTTP/1 or HTTP/2).
pub fn local_addr(session: &Session) -> Option<std::net::SocketAddr> {
    let digest = session.as_ref().digest()?;
    let socket = digest.socket_digest.as_ref()?;
    socket.local_addr()?.as_inet().copied()
}

/// Whether the request came over TLS (HTTP/1 or HTTP/2).
pub fn is_tls(session: &Session) -> bool {
    session
        .as_ref()
        .digest()
        .is_some_and(|d| d.ssl_digest.is_some())
}

/// An HTTP/2 request's lines, as HTTP/1 would have them, for the same policy: its headers in
/// order, `host` from `:authority` when it brought no `Host`, and `transfer-encoding:
/// chunked` when a body comes without `Content-Length` (the body is read whole and sent on
/// with its length, as an HTTP/1 chunked one is). The target is `:path`.
pub fn h2_request_lines(
    session: &mut Session,
    mut each: impl FnMut(&[u8], &[u8]),
) -> Option<Vec<u8>> {
    let body_without_length = !session.as_mut().is_body_empty()
        && !session
            .req_header()
            .headers
            .contains_key(http::header::CONTENT_LENGTH);
    let req = session.req_header();
    if !req.headers.contains_key(http::header::HOST) {
        if let Some(authority) = req.uri.authority() {
            each(b"host", authority.as_str().as_bytes());
        }
    }
    for (name, value) in req.headers.iter() {
        each(name.as_str().as_bytes(), value.as_bytes());
    }
    if body_without_length {
        each(b"transfer-encoding", b"chunked");
    }
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    Some(target.as_bytes().to_vec())
}

/// The connection's [`ClientStream`], under pingora's session.
pub fn client_stream(session: &Session) -> Option<&ClientStream> {
    session
        .as_ref()
        .stream()?
        .as_any()
        .downcast_ref::<ClientStream>()
}

/// The length of the request head as pingora received it.
pub fn raw_head_len(session: &Session) -> Option<usize> {
    match session.as_ref() {
        pingora::protocols::http::ServerSession::H1(h1) => Some(h1.get_headers_raw_bytes().len()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pingoras_own_empty_answers_are_replaced() {
        let tail =
            "Content-Length: 0\r\nCache-Control: private, no-store\r\nConnection: close\r\n\r\n";
        let date = "Date: Mon, 23 Nov 2026 15:40:40 GMT\r\n";
        let canned = |status: &str| format!("HTTP/1.1 {status}\r\nServer: Pingora\r\n{date}{tail}");
        let answer = |s: String| canned_error_answer(s.as_bytes());
        assert_eq!(
            answer(canned("400 Bad Request")),
            Some(Rejection::MalformedRequest)
        );
        assert_eq!(
            answer(canned("405 Method Not Allowed")),
            Some(Rejection::ConnectMethod)
        );
        // Other statuses pingora answers itself go through `fail_to_proxy` already.
        assert_eq!(answer(canned("502 Bad Gateway")), None);
        // A backend's 400, even from a pingora server, passed through: it has our request id.
        let proxied = format!(
            "HTTP/1.1 400 Bad Request\r\nServer: Pingora\r\n{date}Content-Length: 0\r\nCache-Control: private, no-store\r\nX-Request-Id: 1\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(answer(proxied), None);
        assert_eq!(answer(format!("{}{{}}", canned("400 Bad Request"))), None);
        assert_eq!(
            answer(format!("HTTP/1.1 400 Bad Request\r\n{date}{tail}")),
            None
        );
    }
}
