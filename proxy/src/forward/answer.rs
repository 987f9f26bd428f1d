//! A backend's answer, as every engine relays it: its head rewritten for the client (the
//! framing judged by [`framing::answer_framing`], hop-by-hop headers removed) and its
//! chunked body decoded strictly.

use crate::policy::framing::{self, AnswerBody, InvalidAnswer};
use crate::policy::headers;

/// Most headers an answer may have.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4096;

/// What the relay needs of an answer head.
#[derive(Debug)]
pub struct AnswerHead {
    pub status: u16,
    /// The length of the head as received; the body bytes that came with it follow.
    pub len: usize,
    pub body: AnswerBody,
    /// The backend's connection may serve another request after this answer.
    pub keep_alive: bool,
}

fn push_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Remove every `name:` line (any case) from an answer head's lines (status line first).
pub fn drop_lines(lines: &mut Vec<u8>, name: &[u8]) {
    let mut kept = Vec::with_capacity(lines.len());
    for (i, line) in lines.split_inclusive(|&b| b == b'\n').enumerate() {
        let named = line.len() > name.len()
            && line[..name.len()].eq_ignore_ascii_case(name)
            && line[name.len()] == b':';
        if i == 0 || !named {
            kept.extend_from_slice(line);
        }
    }
    *lines = kept;
}

/// Whether `name` is listed in a `Connection` header value.
fn listed(connection: &[&[u8]], name: &str) -> bool {
    connection.iter().any(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
    })
}

/// Parse the answer head at the start of `buf`. `Ok(None)`: incomplete; `Ok(Some((len,
/// None)))`: an interim 1xx of `len` bytes, dropped; otherwise the head, and `lines` holds
/// the status line and header lines the client gets (without the blank line).
pub fn parse_answer_head(
    buf: &[u8],
    head_request: bool,
    lines: &mut Vec<u8>,
) -> Result<Option<(usize, Option<AnswerHead>)>, InvalidAnswer> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(InvalidAnswer("unparsable head")),
    };
    let status = res.code.ok_or(InvalidAnswer("no status"))?;
    if status == 101 {
        // Upgrades are not served here: a 101 nobody asked for is refused.
        return Err(InvalidAnswer("unsolicited 101"));
    }
    if (100..200).contains(&status) {
        return Ok(Some((len, None)));
    }
    let http10 = res.version != Some(1);
    let all = || res.headers.iter().map(|h| (h.name.as_bytes(), h.value));
    let body = framing::answer_framing(status, http10, head_request, all())?;
    let connection: Vec<&[u8]> = res
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .map(|h| h.value)
        .collect();
    let keep_alive = !http10 && !listed(&connection, "close");
    let chunked = matches!(body, AnswerBody::Chunked);
    lines.clear();
    lines.extend_from_slice(b"HTTP/1.1 ");
    lines.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    lines.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    lines.extend_from_slice(b"\r\n");
    let mut length_written = false;
    for h in res.headers.iter() {
        let n = h.name;
        let hop_by_hop = headers::hop_by_hop(n.as_bytes()) || listed(&connection, n);
        if hop_by_hop || n.eq_ignore_ascii_case("x-request-id") || n.eq_ignore_ascii_case("date") {
            continue;
        }
        if n.eq_ignore_ascii_case("content-length") {
            // Beside a Transfer-Encoding it is ignored and not passed on; equal repeats once.
            if chunked || std::mem::replace(&mut length_written, true) {
                continue;
            }
        }
        push_line(lines, n.as_bytes(), h.value);
    }
    Ok(Some((
        len,
        Some(AnswerHead {
            status,
            len: 0,
            body,
            keep_alive,
        }),
    )))
}

/// Decodes a chunked body fed piece by piece, strictly: hex sizes only ([`framing::chunk_size`]),
/// every line ended by CRLF, CRLF after each chunk's data. Trailers are read and dropped.
pub struct ChunkDecoder {
    state: State,
    line: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        ChunkDecoder {
            state: State::Size,
            line: Vec::new(),
        }
    }
}

impl ChunkDecoder {
    /// Feed raw bytes; decoded data is appended to `out`, and the end of each chunk's data
    /// within it to `ends` (so a relay can keep the backend's chunk boundaries).
    /// `Ok(Some(n))`: the body ended after `n` bytes of `data` (the rest is not the body's).
    pub fn feed(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        ends: &mut Vec<usize>,
    ) -> Result<Option<usize>, InvalidAnswer> {
        let bad = InvalidAnswer("invalid chunked body");
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Data(left) => {
                    let n = (left as usize).min(data.len() - i);
                    out.extend_from_slice(&data[i..i + n]);
                    ends.push(out.len());
                    i += n;
                    self.state = if left as usize == n {
                        State::DataEnd
                    } else {
                        State::Data(left - n as u64)
                    };
                }
                State::Size | State::DataEnd | State::Trailer => {
                    let Some(nl) = data[i..].iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(&data[i..]);
                        if self.line.len() > MAX_LINE {
                            return Err(bad);
                        }
                        return Ok(None);
                    };
                    self.line.extend_from_slice(&data[i..i + nl]);
                    i += nl + 1;
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").ok_or(bad)?;
                    match self.state {
                        State::DataEnd if line.is_empty() => self.state = State::Size,
                        State::DataEnd => return Err(bad),
                        State::Size => match framing::chunk_size(line).ok_or(bad)? {
                            0 => self.state = State::Trailer,
                            n => self.state = State::Data(n),
                        },
                        _ if line.is_empty() => return Ok(Some(i)),
                        // A trailer field: dropped.
                        _ => {}
                    }
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &[u8]) -> Result<Option<(usize, Vec<u8>)>, InvalidAnswer> {
        let mut out = Vec::new();
        ChunkDecoder::default()
            .feed(body, &mut out, &mut Vec::new())
            .map(|end| end.map(|n| (n, out)))
    }

    #[test]
    fn chunked_bodies_decode_whole_or_byte_by_byte() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(
            decode(body).unwrap(),
            Some((body.len(), b"Wikipedia".to_vec()))
        );
        let mut d = ChunkDecoder::default();
        let mut out = Vec::new();
        let mut bounds = Vec::new();
        let ends: Vec<_> = body
            .iter()
            .map(|b| d.feed(&[*b], &mut out, &mut bounds))
            .collect();
        assert!(ends[..body.len() - 1].iter().all(|e| *e == Ok(None)));
        assert_eq!(ends[body.len() - 1], Ok(Some(1)));
        assert_eq!(out, b"Wikipedia");
        let mut more = body.to_vec();
        more.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(decode(&more).unwrap().unwrap().0, body.len());
    }

    /// Issue 20, case 4: what the own engine used to accept and relay.
    #[test]
    fn invalid_chunked_bodies_are_refused() {
        for bad in [
            &b"+5\r\nhello\r\n0\r\n\r\n"[..],
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"zz\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    fn head(raw: &[u8], head_request: bool) -> Result<Option<(AnswerHead, String)>, InvalidAnswer> {
        let mut lines = Vec::new();
        let parsed = parse_answer_head(raw, head_request, &mut lines)?;
        Ok(parsed.and_then(|(len, h)| {
            h.map(|mut h| {
                h.len = len;
                (h, String::from_utf8(lines).unwrap())
            })
        }))
    }

    #[test]
    fn drop_lines_removes_every_line_of_a_name() {
        let mut lines = b"HTTP/1.1 200 OK\r\nstrict-transport-security: a\r\nX: 1\r\nStrict-Transport-Security: b\r\nStrict-Transport-Securityx: c\r\n".to_vec();
        drop_lines(&mut lines, b"Strict-Transport-Security");
        assert_eq!(
            lines,
            b"HTTP/1.1 200 OK\r\nX: 1\r\nStrict-Transport-Securityx: c\r\n"
        );
    }

    #[test]
    fn answer_heads_are_rewritten_for_the_client() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nDate: x\r\nX-Request-Id: theirs\r\nX-A: b\r\n\r\nhi";
        let (h, lines) = head(raw, false).unwrap().unwrap();
        assert_eq!(
            (h.status, h.body, h.keep_alive),
            (200, AnswerBody::Length(2), false)
        );
        assert_eq!(lines, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n");
        assert_eq!(&raw[h.len..], b"hi");
        let (h, lines) = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.body, AnswerBody::Chunked);
        assert_eq!(lines, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n");
        let (h, _) = head(b"HTTP/1.0 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert!(h.body == AnswerBody::UntilClose && !h.keep_alive);
        let (h, lines) = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(lines.matches("Content-Length").count(), 1);
        assert_eq!(h.body, AnswerBody::Length(2));
        // Interim answers are dropped; conflicting lengths, `+5`, 101 and an HTTP/1.0 chunked
        // answer are refused.
        assert!(head(b"HTTP/1.1 103 Early Hints\r\n\r\n", false)
            .unwrap()
            .is_none());
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(
                head(bad, false).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
