//! Message framing, judged the same way by every engine, for requests and for backend
//! answers (RFC 9112 sections 6 and 7). Anything that two parsers could read two ways is
//! refused: a request with 400 (or 501), an answer with 502, and the backend connection is
//! never reused after it.

use super::Rejection;

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    None,
    Length(u64),
    Chunked,
}

/// A `Content-Length` value: ASCII digits only (no sign, no spaces inside, no list), at most
/// 18 of them.
pub fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The framing of a request from its header lines (`http10`: an HTTP/1.0 request). Several
/// equal `Content-Length` lines count as one (and are forwarded as one); unequal ones, a
/// malformed one, `Transfer-Encoding` other than exactly `chunked`, both together, or
/// `Transfer-Encoding` on HTTP/1.0 are refused.
pub fn request_framing<'a>(
    http10: bool,
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<RequestBody, Rejection> {
    let mut length: Option<u64> = None;
    let mut has_te = false;
    // The codings of every Transfer-Encoding line, joined in order: the last, and how many
    // there are, and how many of them are `chunked`.
    let (mut last_chunked, mut codings, mut chunked) = (false, 0, 0);
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(value).ok_or(Rejection::MalformedRequest)?;
            if length.is_some_and(|m| m != n) {
                return Err(Rejection::MalformedRequest);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            has_te = true;
            for coding in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if coding.is_empty() {
                    continue;
                }
                codings += 1;
                last_chunked = coding.eq_ignore_ascii_case(b"chunked");
                chunked += usize::from(last_chunked);
            }
        }
    }
    if !has_te {
        return Ok(length.map_or(RequestBody::None, RequestBody::Length));
    }
    // RFC 9112 6.3: chunked must be the final coding, applied once (else 400, as pingora's
    // parser answers before any hook); with Content-Length too it is a smuggling shape.
    if http10 || !last_chunked || chunked > 1 {
        return Err(Rejection::MalformedRequest);
    }
    if length.is_some() {
        return Err(Rejection::AmbiguousFraming);
    }
    // Other codings before chunked are not decoded here (nginx answers 501 too).
    if codings > 1 {
        return Err(Rejection::UnsupportedTransferEncoding);
    }
    Ok(RequestBody::Chunked)
}

/// How an answer's body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerBody {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Why an answer head is refused (502).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidAnswer(pub &'static str);

/// The framing of a backend's answer. `head_request`: the request was HEAD. 1xx answers are
/// the caller's (interim ones are dropped; a 101 nobody asked for is refused).
pub fn answer_framing<'a>(
    status: u16,
    http10: bool,
    head_request: bool,
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone,
) -> Result<AnswerBody, InvalidAnswer> {
    let mut length: Option<u64> = None;
    let mut te: Option<bool> = None;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(value).ok_or(InvalidAnswer("malformed Content-Length"))?;
            if length.is_some_and(|m| m != n) {
                return Err(InvalidAnswer("conflicting Content-Length"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if http10 {
                return Err(InvalidAnswer("Transfer-Encoding in an HTTP/1.0 answer"));
            }
            // The last coding decides; several lines are one list.
            let last = value
                .rsplit(|&b| b == b',')
                .next()
                .map(<[u8]>::trim_ascii)
                .unwrap_or(b"");
            te = Some(last.eq_ignore_ascii_case(b"chunked"));
        }
    }
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(AnswerBody::None);
    }
    Ok(match (te, length) {
        // With a Transfer-Encoding the length is ignored (and not forwarded).
        (Some(true), _) => AnswerBody::Chunked,
        (Some(false), _) => AnswerBody::UntilClose,
        (None, Some(n)) => AnswerBody::Length(n),
        (None, None) => AnswerBody::UntilClose,
    })
}

/// A chunk-size line (without its line end): hex digits only, then optionally `;` and
/// extensions. No sign, no spaces before the digits, at most 15 digits.
pub fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = match line.iter().position(|&b| b == b';') {
        Some(i) => line[..i].trim_ascii_end(),
        None => line,
    };
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<'a>(list: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone {
        list.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()))
    }

    #[test]
    fn request_framing_table() {
        use Rejection::*;
        use RequestBody as B;
        type Case<'a> = (
            bool,
            &'a [(&'a str, &'a str)],
            Result<RequestBody, Rejection>,
        );
        let cases: &[Case] = &[
            (false, &[], Ok(B::None)),
            (false, &[("Content-Length", "5")], Ok(B::Length(5))),
            (
                false,
                &[("Content-Length", "5"), ("content-length", "5")],
                Ok(B::Length(5)),
            ),
            (
                false,
                &[("Content-Length", "5"), ("Content-Length", "6")],
                Err(MalformedRequest),
            ),
            (false, &[("Content-Length", "+5")], Err(MalformedRequest)),
            (false, &[("Content-Length", "5, 5")], Err(MalformedRequest)),
            (false, &[("Content-Length", "-1")], Err(MalformedRequest)),
            (false, &[("Content-Length", "")], Err(MalformedRequest)),
            (false, &[("Transfer-Encoding", "chunked")], Ok(B::Chunked)),
            (false, &[("Transfer-Encoding", " Chunked ")], Ok(B::Chunked)),
            (
                false,
                &[("Transfer-Encoding", "gzip, chunked")],
                Err(UnsupportedTransferEncoding),
            ),
            (
                false,
                &[
                    ("Transfer-Encoding", "chunked"),
                    ("Transfer-Encoding", "chunked"),
                ],
                Err(MalformedRequest),
            ),
            (
                false,
                &[("Transfer-Encoding", "gzip")],
                Err(MalformedRequest),
            ),
            (
                false,
                &[("Transfer-Encoding", "chunked, gzip")],
                Err(MalformedRequest),
            ),
            (
                false,
                &[("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
                Err(AmbiguousFraming),
            ),
            (
                true,
                &[("Transfer-Encoding", "chunked")],
                Err(MalformedRequest),
            ),
            (true, &[("Content-Length", "2")], Ok(B::Length(2))),
        ];
        for (http10, headers, want) in cases {
            assert_eq!(request_framing(*http10, h(headers)), *want, "{headers:?}");
        }
    }

    #[test]
    fn answer_framing_table() {
        use AnswerBody as B;
        let ok =
            |status, http10, head, hs: &[(&str, &str)]| answer_framing(status, http10, head, h(hs));
        assert_eq!(
            ok(200, false, false, &[("Content-Length", "5")]),
            Ok(B::Length(5))
        );
        assert!(ok(200, false, false, &[("Content-Length", "+5")]).is_err());
        assert!(ok(
            200,
            false,
            false,
            &[("Content-Length", "5"), ("Content-Length", "6")]
        )
        .is_err());
        assert_eq!(
            ok(
                200,
                false,
                false,
                &[("Content-Length", "5"), ("Content-Length", "5")]
            ),
            Ok(B::Length(5))
        );
        assert_eq!(
            ok(
                200,
                false,
                false,
                &[
                    ("Transfer-Encoding", "gzip, chunked"),
                    ("Content-Length", "3")
                ]
            ),
            Ok(B::Chunked)
        );
        assert_eq!(
            ok(200, false, false, &[("Transfer-Encoding", "gzip")]),
            Ok(B::UntilClose)
        );
        assert!(ok(200, true, false, &[("Transfer-Encoding", "chunked")]).is_err());
        assert_eq!(
            ok(200, false, true, &[("Content-Length", "5")]),
            Ok(B::None)
        );
        assert_eq!(
            ok(304, false, false, &[("Content-Length", "5")]),
            Ok(B::None)
        );
        assert_eq!(ok(200, true, false, &[]), Ok(B::UntilClose));
    }

    #[test]
    fn chunk_sizes_are_strict() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"1A;ext=1"), Some(26));
        assert_eq!(chunk_size(b"5 ;ext"), Some(5));
        for bad in [
            &b"+5"[..],
            b" 5",
            b"",
            b"0x5",
            b"-1",
            b"5 5",
            b"zz",
            b"1234567890abcdef0",
        ] {
            assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
