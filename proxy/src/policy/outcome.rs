//! How a request that was not answered by a backend ends: the status and message of a
//! backend failure (502/504), the `Retry-After` of a refusal, and whether the client
//! connection is kept after the gateway's own answer. Every engine maps its errors into
//! [`UpstreamError`] and asks here.

/// Why an exchange with a backend failed, whatever engine saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    ConnectRefused,
    ConnectTimeout,
    WriteTimeout,
    ReadTimeout,
    /// Closed or reset before a whole answer arrived.
    Closed,
    /// An answer the gateway refuses to relay (bad framing, bad head).
    Invalid,
    /// The TLS handshake with a TLS pool's backend failed (its certificate not trusted, not
    /// for the name, or no TLS at all).
    Tls,
}

impl UpstreamError {
    /// The status and message the client gets when nothing of the answer was sent yet.
    pub fn answer(self) -> (u16, &'static str) {
        match self {
            UpstreamError::ConnectTimeout
            | UpstreamError::WriteTimeout
            | UpstreamError::ReadTimeout => (504, "the backend did not answer in time"),
            _ => (502, "the backend failed to answer"),
        }
    }

    /// For the logs.
    pub fn text(self) -> &'static str {
        match self {
            UpstreamError::ConnectRefused => "connect failed",
            UpstreamError::ConnectTimeout => "connect timed out",
            UpstreamError::WriteTimeout => "writing the request timed out",
            UpstreamError::ReadTimeout => "reading the answer timed out",
            UpstreamError::Closed => "connection closed before a whole answer",
            UpstreamError::Invalid => "invalid answer",
            UpstreamError::Tls => "TLS handshake with the backend failed",
        }
    }
}

/// The `Retry-After` (seconds) of the gateway's own answer: the refusal's own when it has
/// one (a rate limit knows when), else 1 s for a 429 or 503, none otherwise.
pub fn retry_after(status: u16, own: Option<u64>) -> Option<u64> {
    own.or_else(|| matches!(status, 429 | 503).then_some(1))
}

/// Whether the client connection stays open after the gateway's own error answer: never
/// when a request body is left unread (its bytes would be read as the next request), never
/// after a 5xx other than 503 or a 400/408/413/431 (nginx closes after those too), and not
/// when the connection was to close anyway (`last`). A client told to slow down (429) or told
/// that no backend is available (503) does not pay a reconnect too: nginx keeps it as well.
pub fn keep_alive_after_error(status: u16, unread_body: bool, last: bool) -> bool {
    !last
        && !unread_body
        && !matches!(status, 400 | 408 | 413 | 431)
        && (status < 500 || status == 503)
}

/// Once a head was sent to the client, a backend failure can no longer be answered: the only
/// honest end is to cut the connection, so the client (and any cache) sees an incomplete
/// answer rather than a well-formed one with a wrong body. Before it, the failure is answered.
pub enum AfterFailure {
    Answer { status: u16, message: &'static str },
    Cut,
}

pub fn after_failure(e: UpstreamError, head_sent: bool) -> AfterFailure {
    if head_sent {
        return AfterFailure::Cut;
    }
    let (status, message) = e.answer();
    AfterFailure::Answer { status, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_504_and_the_rest_502() {
        assert_eq!(UpstreamError::ReadTimeout.answer().0, 504);
        assert_eq!(UpstreamError::ConnectTimeout.answer().0, 504);
        assert_eq!(UpstreamError::ConnectRefused.answer().0, 502);
        assert_eq!(UpstreamError::Invalid.answer().0, 502);
        assert!(matches!(
            after_failure(UpstreamError::Invalid, true),
            AfterFailure::Cut
        ));
    }

    #[test]
    fn the_keep_alive_rule_after_an_error() {
        // 429 and 503 (rate limits, no backend, queue) keep the connection.
        assert!(keep_alive_after_error(429, false, false));
        assert!(keep_alive_after_error(503, false, false));
        assert!(keep_alive_after_error(404, false, false));
        // Unless a body is left unread, or it was the last request anyway.
        assert!(!keep_alive_after_error(429, true, false));
        assert!(!keep_alive_after_error(503, false, true));
        // Errors about the request's own bytes and backend failures close it.
        for s in [400, 408, 413, 431, 500, 501, 502, 504] {
            assert!(!keep_alive_after_error(s, false, false), "{s}");
        }
        assert_eq!(retry_after(503, None), Some(1));
        assert_eq!(retry_after(429, Some(7)), Some(7));
        assert_eq!(retry_after(502, None), None);
    }
}
