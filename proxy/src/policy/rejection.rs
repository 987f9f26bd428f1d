//! Why the gateway answered a request (or a connection) itself: its status, its message and
//! its metric label.

/// Why the gateway answered a request (or a connection) itself instead of proxying it.
/// The label is the `reason` of `gateway_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No backend was healthy (or all were tried): 503.
    NoHealthyBackend,
    /// Per-IP request rate: 429.
    RateLimitIp,
    /// Global request rate of this instance: 503.
    RateLimitGlobal,
    /// Per-IP open-connection cap: connection answered 503 and closed.
    ConnectionsPerIp,
    /// Total open-connection cap: connection answered 503 and closed.
    ConnectionsTotal,
    /// Body over `buffers.max_body_bytes`: 413.
    BodyTooLarge,
    /// Request head over `buffers.max_header_bytes` or `max_headers`: 431.
    HeaderTooLarge,
    /// Backend concurrency cap reached and its queue full: 503.
    BackendQueueFull,
    /// Waited `upstream.queue_timeout` for a backend slot: 503.
    BackendQueueTimeout,
    /// Both Content-Length and Transfer-Encoding (a request-smuggling shape): 400.
    AmbiguousFraming,
    /// A Transfer-Encoding other than chunked: 501.
    UnsupportedTransferEncoding,
    /// A trusted proxy's connection without a valid PROXY protocol header: 400 and closed.
    ProxyProtocol,
    /// A request body below `slow_clients.body_min_rate` after its grace time: 408.
    BodyTooSlow,
    /// A request head pingora could not parse (request line, header syntax, framing): 400.
    MalformedRequest,
    /// A CONNECT request (the gateway is not a forward proxy): 405.
    ConnectMethod,
    /// The client stopped sending its body (`slow_clients.body_idle_timeout`) or reading the
    /// answer: 408.
    ClientTimeout,
    /// A request head not complete within `slow_clients.header_timeout`: 408 if it had begun,
    /// closed without an answer if nothing was sent.
    HeaderTimeout,
    /// A target other than origin form (`*`, authority or absolute form) or with bytes
    /// outside visible ASCII: 400.
    InvalidTarget,
    /// No `Host` on HTTP/1.1, two of them, or one that is not a host name or address with
    /// an optional port: 400.
    InvalidHost,
    /// Buffering this body would take the bodies in flight over `buffers.total_body_bytes`:
    /// 503.
    BodyBudget,
    /// `routes:` exist and none matches the request: 404.
    NoRoute,
    /// A TLS handshake that failed (garbage, truncated, no shared version or cipher):
    /// closed.
    TlsHandshake,
    /// A TLS handshake not done within `slow_clients.handshake_timeout`: closed.
    TlsHandshakeTimeout,
    /// An SNI no certificate of the listener covers: the handshake is refused.
    TlsUnknownServerName,
    /// Plain HTTP sent to a TLS listener: 400 in plaintext, closed.
    PlaintextOnTls,
    /// An HTTP/2 client that reset more than `http2.max_resets` streams in 10 s (rapid reset,
    /// CVE-2023-44487): the connection is closed.
    Http2RapidReset,
    /// An HTTP/2 header block continued by more CONTINUATION frames than its size cap needs
    /// (CONTINUATION flood, CVE-2024-27316 and kin): the connection is closed.
    Http2ContinuationFlood,
    /// A stream the HTTP/2 server refused (`REFUSED_STREAM`): over
    /// `http2.max_concurrent_streams`, or opened while the connection drains. The connection
    /// stays.
    Http2TooManyStreams,
}

impl Rejection {
    pub const ALL: [Rejection; 28] = [
        Rejection::NoHealthyBackend,
        Rejection::RateLimitIp,
        Rejection::RateLimitGlobal,
        Rejection::ConnectionsPerIp,
        Rejection::ConnectionsTotal,
        Rejection::BodyTooLarge,
        Rejection::HeaderTooLarge,
        Rejection::BackendQueueFull,
        Rejection::BackendQueueTimeout,
        Rejection::AmbiguousFraming,
        Rejection::UnsupportedTransferEncoding,
        Rejection::ProxyProtocol,
        Rejection::BodyTooSlow,
        Rejection::MalformedRequest,
        Rejection::ConnectMethod,
        Rejection::ClientTimeout,
        Rejection::HeaderTimeout,
        Rejection::InvalidTarget,
        Rejection::InvalidHost,
        Rejection::BodyBudget,
        Rejection::NoRoute,
        Rejection::TlsHandshake,
        Rejection::TlsHandshakeTimeout,
        Rejection::TlsUnknownServerName,
        Rejection::PlaintextOnTls,
        Rejection::Http2RapidReset,
        Rejection::Http2ContinuationFlood,
        Rejection::Http2TooManyStreams,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejection::NoHealthyBackend => "no_healthy_backend",
            Rejection::RateLimitIp => "rate_limit_ip",
            Rejection::RateLimitGlobal => "rate_limit_global",
            Rejection::ConnectionsPerIp => "connections_per_ip",
            Rejection::ConnectionsTotal => "connections_total",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::HeaderTooLarge => "header_too_large",
            Rejection::BackendQueueFull => "backend_queue_full",
            Rejection::BackendQueueTimeout => "backend_queue_timeout",
            Rejection::AmbiguousFraming => "ambiguous_framing",
            Rejection::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            Rejection::ProxyProtocol => "proxy_protocol",
            Rejection::BodyTooSlow => "body_too_slow",
            Rejection::MalformedRequest => "malformed_request",
            Rejection::ConnectMethod => "connect_method",
            Rejection::ClientTimeout => "client_timeout",
            Rejection::HeaderTimeout => "header_timeout",
            Rejection::InvalidTarget => "invalid_target",
            Rejection::InvalidHost => "invalid_host",
            Rejection::BodyBudget => "body_budget",
            Rejection::NoRoute => "no_route",
            Rejection::TlsHandshake => "tls_handshake",
            Rejection::TlsHandshakeTimeout => "tls_handshake_timeout",
            Rejection::TlsUnknownServerName => "tls_unknown_server_name",
            Rejection::PlaintextOnTls => "plaintext_on_tls",
            Rejection::Http2RapidReset => "http2_rapid_reset",
            Rejection::Http2ContinuationFlood => "http2_continuation_flood",
            Rejection::Http2TooManyStreams => "http2_too_many_streams",
        }
    }

    /// The status the client gets.
    pub fn status(self) -> u16 {
        match self {
            Rejection::RateLimitIp => 429,
            Rejection::BodyTooSlow
            | Rejection::ClientTimeout
            | Rejection::HeaderTimeout
            | Rejection::TlsHandshakeTimeout => 408,
            Rejection::BodyTooLarge => 413,
            Rejection::HeaderTooLarge => 431,
            Rejection::AmbiguousFraming
            | Rejection::InvalidTarget
            | Rejection::InvalidHost
            | Rejection::ProxyProtocol
            | Rejection::MalformedRequest
            | Rejection::TlsHandshake
            | Rejection::TlsUnknownServerName
            | Rejection::PlaintextOnTls
            | Rejection::Http2RapidReset
            | Rejection::Http2ContinuationFlood => 400,
            Rejection::Http2TooManyStreams => 429,
            Rejection::ConnectMethod => 405,
            Rejection::NoRoute => 404,
            Rejection::UnsupportedTransferEncoding => 501,
            _ => 503,
        }
    }

    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            Rejection::NoHealthyBackend => "no healthy backend is available; retry later",
            Rejection::RateLimitIp => "too many requests from your address; slow down",
            Rejection::RateLimitGlobal => "the service is saturated; retry later",
            Rejection::ConnectionsPerIp => "too many open connections from your address",
            Rejection::ConnectionsTotal => "the gateway is at its connection limit",
            Rejection::BodyTooLarge => "request body is too large",
            Rejection::HeaderTooLarge => "request headers are too large",
            Rejection::BackendQueueFull => "the backend is at capacity and its queue is full",
            Rejection::BackendQueueTimeout => "timed out waiting for a backend slot",
            Rejection::AmbiguousFraming => "request has both Content-Length and Transfer-Encoding",
            Rejection::UnsupportedTransferEncoding => {
                "only Transfer-Encoding: chunked is supported"
            }
            Rejection::ProxyProtocol => "invalid or missing PROXY protocol header",
            Rejection::BodyTooSlow => "request body is arriving too slowly",
            Rejection::MalformedRequest => "malformed request: not valid HTTP/1.1",
            Rejection::ConnectMethod => "CONNECT is not supported: this is not a forward proxy",
            Rejection::ClientTimeout => "timed out waiting for the client",
            Rejection::HeaderTimeout => "the request head did not arrive in time",
            Rejection::InvalidTarget => "invalid request target: only /path targets are served",
            Rejection::InvalidHost => "missing, repeated or invalid Host header",
            Rejection::NoRoute => "no route for this host and path",
            Rejection::TlsHandshake => "TLS handshake failed",
            Rejection::TlsHandshakeTimeout => "the TLS handshake did not finish in time",
            Rejection::TlsUnknownServerName => "no certificate for this server name",
            Rejection::PlaintextOnTls => "plain HTTP was sent to an HTTPS port; use https://",
            Rejection::Http2RapidReset => "too many HTTP/2 streams reset",
            Rejection::Http2ContinuationFlood => "too many HTTP/2 CONTINUATION frames",
            Rejection::Http2TooManyStreams => "too many concurrent HTTP/2 streams",
            Rejection::BodyBudget => {
                "the gateway is buffering too many request bodies; retry later"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Metrics::reject` indexes its counters by the variant's number.
    #[test]
    fn all_lists_every_reason_in_declaration_order() {
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }
}
