//! What a client sends on an HTTP/2 connection, seen frame by frame as its bytes are read
//! (only the 9-byte frame headers are looked at): the rapid-reset defence (CVE-2023-44487).
//!
//! The `h2` crate (0.4.20) closes a connection whose client resets too many streams the
//! server had not taken yet (its CVE-2023-44487 fix), uncounted; pingora takes streams as
//! soon as it can, so a client that paces HEADERS + RST_STREAM to pingora's accept loop gets
//! a request started for each and is never stopped by it. Here every RST_STREAM from the
//! client is counted as its bytes are read (before h2 parses them): more than
//! `http2.max_resets` within 10 s and the connection is closed (`http2_rapid_reset`). A
//! browser resets a few streams when a page is left; a flood resets thousands a second.
//!
//! CONTINUATION flood (CVE-2024-27316 and kin): a header block (HEADERS without
//! END_HEADERS) continued by endless CONTINUATION frames. `h2` closes such a connection at
//! `max(5, 1.25 × header cap / frame size)` frames in one block, uncounted; the same bound
//! is applied here as the bytes arrive, so the connection is closed and counted
//! (`http2_continuation_flood`) before h2 decodes the frame that crosses it.

use std::time::{Duration, Instant};

use crate::policy::Rejection;

/// The client's connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
pub const PREFACE_LEN: usize = 24;
/// The window `max_resets` is counted over.
pub const RESET_WINDOW: Duration = Duration::from_secs(10);
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
/// RST_STREAM's error code for a stream the server did not take.
const REFUSED_STREAM: u32 = 0x7;
const END_HEADERS: u8 = 0x4;
/// The frame size the server allows (HTTP/2's default `SETTINGS_MAX_FRAME_SIZE`; pingora
/// keeps it).
const MAX_FRAME: usize = 16_384;

/// CONTINUATION frames one header block may have, as `h2` counts them for a header cap of
/// `header_bytes` (its `calc_max_continuation_frames`).
pub fn max_continuations(header_bytes: usize) -> u32 {
    let frames = (header_bytes / MAX_FRAME).max(1);
    (frames + (frames >> 2)).max(5).min(u32::MAX as usize) as u32
}

/// Frame boundaries in one direction of a connection's bytes, whatever their split: each
/// frame's 9-byte header, and the first bytes of its payload when asked for.
#[derive(Debug)]
struct Walk {
    preface_left: usize,
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
    /// The first bytes of the current frame's payload, when its header asked for them.
    kept: [u8; 4],
    kept_len: usize,
    keep: usize,
}

/// What [`Walk::walk`] reports.
enum Seen {
    /// A frame's header; the walker keeps the first `n` bytes of its payload when the
    /// callback returns `n`.
    Header([u8; 9]),
    /// The kept first bytes of the payload of the frame whose header came last.
    Kept([u8; 4]),
}

impl Walk {
    fn new(preface: usize) -> Self {
        Walk {
            preface_left: preface,
            header: [0; 9],
            header_len: 0,
            payload_left: 0,
            kept: [0; 4],
            kept_len: 0,
            keep: 0,
        }
    }

    fn walk<E>(
        &mut self,
        mut data: &[u8],
        mut seen: impl FnMut(Seen) -> Result<usize, E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(data.len());
                self.preface_left -= n;
                data = &data[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(data.len());
                if self.kept_len < self.keep {
                    let k = (self.keep - self.kept_len).min(n);
                    self.kept[self.kept_len..self.kept_len + k].copy_from_slice(&data[..k]);
                    self.kept_len += k;
                    if self.kept_len == self.keep {
                        seen(Seen::Kept(self.kept))?;
                    }
                }
                self.payload_left -= n;
                data = &data[n..];
            } else {
                let n = (9 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
                self.header_len += n;
                data = &data[n..];
                if self.header_len == 9 {
                    self.header_len = 0;
                    let h = self.header;
                    self.payload_left =
                        (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                    self.keep = seen(Seen::Header(h))?.min(4).min(self.payload_left);
                    self.kept_len = 0;
                }
            }
        }
        Ok(())
    }
}

/// What a client sends, frame by frame.
#[derive(Debug)]
pub struct FrameScan {
    walk: Walk,
    resets: Resets,
    /// CONTINUATION frames without END_HEADERS in the open header block.
    continuations: u32,
    max_continuations: u32,
}

/// The client's RST_STREAM frames within [`RESET_WINDOW`].
#[derive(Debug)]
struct Resets {
    max: u32,
    count: u32,
    window_start: Option<Instant>,
}

impl Resets {
    /// Count one; false once over the cap.
    fn count(&mut self, now: Instant) -> bool {
        match self.window_start {
            Some(start) if now.duration_since(start) < RESET_WINDOW => self.count += 1,
            _ => {
                self.window_start = Some(now);
                self.count = 1;
            }
        }
        self.count <= self.max
    }
}

impl FrameScan {
    pub fn new(max_resets: u32, max_continuations: u32) -> Self {
        FrameScan {
            walk: Walk::new(PREFACE_LEN),
            resets: Resets {
                max: max_resets,
                count: 0,
                window_start: None,
            },
            continuations: 0,
            max_continuations,
        }
    }

    /// Whether the preface is still being received.
    pub fn in_preface(&self) -> bool {
        self.walk.preface_left > 0
    }

    /// Follow `data`; the refusal once the client reset more streams than allowed or
    /// continued a header block too long.
    pub fn observe(&mut self, data: &[u8], now: impl Fn() -> Instant) -> Result<(), Rejection> {
        let (resets, continuations, max) = (
            &mut self.resets,
            &mut self.continuations,
            self.max_continuations,
        );
        self.walk.walk(data, |seen| {
            let Seen::Header(h) = seen else {
                return Ok(0);
            };
            let ends_block = h[4] & END_HEADERS != 0;
            match h[3] {
                RST_STREAM if !resets.count(now()) => return Err(Rejection::Http2RapidReset),
                HEADERS | PUSH_PROMISE => *continuations = 0,
                CONTINUATION if ends_block => *continuations = 0,
                CONTINUATION => {
                    *continuations += 1;
                    if *continuations > max {
                        return Err(Rejection::Http2ContinuationFlood);
                    }
                }
                _ => {}
            }
            Ok(0)
        })
    }
}

/// What the server sends, frame by frame: the streams it refuses (`RST_STREAM` with
/// `REFUSED_STREAM`: h2 refuses a stream over `http2.max_concurrent_streams` that way, and
/// streams opened while the connection drains).
#[derive(Debug)]
pub struct ServerFrames {
    walk: Walk,
}

impl Default for ServerFrames {
    fn default() -> Self {
        ServerFrames { walk: Walk::new(0) }
    }
}

impl ServerFrames {
    /// Follow `data`; how many streams it refuses.
    pub fn refused(&mut self, data: &[u8]) -> u32 {
        let mut refused = 0;
        let _ = self.walk.walk(data, |seen| {
            Ok::<_, ()>(match seen {
                Seen::Header(h) if h[3] == RST_STREAM => 4,
                Seen::Kept(code) => {
                    refused += u32::from(u32::from_be_bytes(code) == REFUSED_STREAM);
                    0
                }
                Seen::Header(_) => 0,
            })
        });
        refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            kind,
            0,
            0,
            0,
            0,
            1,
        ];
        // A payload that looks like frame headers of RST_STREAM, to catch a scan that loses
        // its place.
        f.extend(std::iter::repeat_n(RST_STREAM, payload));
        f
    }

    /// Seeded: the same bytes split at random places count the same resets.
    #[test]
    fn resets_are_counted_across_any_split() {
        let (seed, mut next) = crate::policy::testing::seeded();
        for _ in 0..200 {
            let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            let mut resets = 0;
            for _ in 0..(next() % 40) {
                let kind = (next() % 10) as u8;
                resets += u32::from(kind == RST_STREAM);
                bytes.extend(frame(kind, (next() % 300) as usize));
            }
            let t = Instant::now();
            let mut exact = FrameScan::new(resets, u32::MAX);
            let mut one_less = FrameScan::new(resets.saturating_sub(1), u32::MAX);
            let mut rest = &bytes[..];
            let (mut ok_exact, mut ok_less) = (true, true);
            while !rest.is_empty() {
                let n = 1 + (next() as usize % rest.len().min(50));
                ok_exact &= exact.observe(&rest[..n], || t).is_ok();
                ok_less &= one_less.observe(&rest[..n], || t).is_ok();
                rest = &rest[n..];
            }
            assert!(ok_exact, "seed {seed}: {resets} resets allowed");
            assert_eq!(ok_less, resets == 0, "seed {seed}: {resets} resets");
        }
    }

    #[test]
    fn the_count_starts_again_after_the_window() {
        let mut scan = FrameScan::new(2, 5);
        let t = Instant::now();
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(RST_STREAM, 4));
        bytes.extend(frame(RST_STREAM, 4));
        assert!(scan.observe(&bytes, || t).is_ok());
        assert!(scan
            .observe(&frame(RST_STREAM, 4), || t + RESET_WINDOW)
            .is_ok());
        assert!(scan
            .observe(&frame(RST_STREAM, 4), || t + RESET_WINDOW)
            .is_ok());
        assert_eq!(
            scan.observe(&frame(RST_STREAM, 4), || t + RESET_WINDOW),
            Err(Rejection::Http2RapidReset)
        );
    }

    fn flagged(kind: u8, flags: u8, payload: usize) -> Vec<u8> {
        let mut f = frame(kind, payload);
        f[4] = flags;
        f
    }

    /// A header block may be continued up to h2's bound, any number of times; one frame more
    /// in one block is refused, whatever the payloads and however the bytes are split.
    #[test]
    fn continuation_floods_are_cut_at_h2s_bound() {
        assert_eq!(max_continuations(16 << 10), 5);
        assert_eq!(max_continuations(1 << 20), 80);
        let (seed, mut next) = crate::policy::testing::seeded();
        for _ in 0..200 {
            let max = 5;
            let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            let mut worst = 0;
            for _ in 0..(1 + next() % 6) {
                let open = next() % 2 == 0;
                bytes.extend(flagged(
                    HEADERS,
                    if open { 0 } else { END_HEADERS },
                    (next() % 40) as usize,
                ));
                if open {
                    let n = next() % 8;
                    worst = worst.max(n);
                    for _ in 0..n {
                        bytes.extend(flagged(CONTINUATION, 0, (next() % 40) as usize));
                    }
                    bytes.extend(flagged(CONTINUATION, END_HEADERS, 3));
                }
                bytes.extend(frame(0x0, (next() % 40) as usize));
            }
            let mut scan = FrameScan::new(u32::MAX, max);
            let mut rest = &bytes[..];
            let mut got = Ok(());
            while !rest.is_empty() && got.is_ok() {
                let n = 1 + (next() as usize % rest.len().min(50));
                got = scan.observe(&rest[..n], Instant::now);
                rest = &rest[n..];
            }
            let want = if worst > u64::from(max) {
                Err(Rejection::Http2ContinuationFlood)
            } else {
                Ok(())
            };
            assert_eq!(got, want, "seed {seed}: {worst} continuations");
        }
    }

    /// The server's RST_STREAM frames with REFUSED_STREAM are counted, however the bytes are
    /// split; other codes and other frames (whose payloads look like them) are not.
    #[test]
    fn refused_streams_are_counted_across_any_split() {
        let (seed, mut next) = crate::policy::testing::seeded();
        for _ in 0..200 {
            let mut bytes = Vec::new();
            let mut want = 0;
            for _ in 0..(next() % 30) {
                match next() % 3 {
                    0 => {
                        let code = if next() % 2 == 0 { REFUSED_STREAM } else { 0x8 };
                        want += u32::from(code == REFUSED_STREAM);
                        let mut f = frame(RST_STREAM, 0);
                        f[2] = 4;
                        f.extend(code.to_be_bytes());
                        bytes.extend(f);
                    }
                    _ => bytes.extend(frame(
                        (next() % 10) as u8 & !RST_STREAM,
                        (next() % 300) as usize,
                    )),
                }
            }
            let mut scan = ServerFrames::default();
            let mut rest = &bytes[..];
            let mut got = 0;
            while !rest.is_empty() {
                let n = 1 + (next() as usize % rest.len().min(50));
                got += scan.refused(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(got, want, "seed {seed}");
        }
    }
}
