//! The TLS handshake of a connection accepted on a TLS listener, done by the dispatcher
//! rather than by pingora's listener: after the PROXY protocol header and the connection caps
//! (so a flood of handshakes counts against them), within `slow_clients.handshake_timeout`
//! (pingora's listener allows 60 s, uncounted), and with every failure counted by reason.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType, ALPN,
};
use pingora::protocols::{SocketDigest, TimingDigest};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::answers::ErrorAnswer;
use crate::policy::Rejection;

/// What a handshake gave.
pub enum Handshake {
    /// The TLS stream, and whether the client chose `h2`.
    Done(Stream, bool),
    /// Refused and counted under this reason; the connection is closed.
    Refused(Rejection),
}

/// Handshake on `stream` by `due`. A connection whose first byte is an ASCII letter sent
/// plain HTTP: it gets a plaintext 400 saying so (nginx answers those 400 too).
pub async fn handshake(acceptor: &Acceptor, mut stream: Stream, due: Instant) -> Handshake {
    let work = async {
        let mut first = [0u8; 1];
        if matches!(stream.try_peek(&mut first).await, Ok(true)) && first[0].is_ascii_alphabetic() {
            let r = Rejection::PlaintextOnTls;
            let answer = ErrorAnswer::closing(r.status(), r.message(), None).to_bytes();
            let _ = stream.write_all(&answer).await;
            let _ = stream.flush().await;
            return Handshake::Refused(r);
        }
        match pingora::protocols::tls::server::handshake(acceptor, Raw(stream)).await {
            Ok(tls) => {
                let h2 = tls.selected_alpn_proto() == Some(ALPN::H2);
                Handshake::Done(Box::new(tls), h2)
            }
            Err(e) if e.to_string().contains(crate::tls::NO_CERTIFICATE_ERROR) => {
                Handshake::Refused(Rejection::TlsUnknownServerName)
            }
            Err(_) => Handshake::Refused(Rejection::TlsHandshake),
        }
    };
    tokio::time::timeout_at(due, work)
        .await
        .unwrap_or(Handshake::Refused(Rejection::TlsHandshakeTimeout))
}

/// The accepted stream as a concrete type (the TLS stream wraps one), every trait delegated.
#[derive(Debug)]
struct Raw(Stream);

impl AsyncRead for Raw {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Raw {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Raw {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.0).await
    }
}

impl UniqueID for Raw {
    fn id(&self) -> UniqueIDType {
        self.0.id()
    }
}

impl Ssl for Raw {}

impl GetTimingDigest for Raw {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.0.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.0.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.0.get_write_pending_time()
    }
}

impl GetProxyDigest for Raw {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.0.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.0.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Raw {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.0.get_socket_digest()
    }
    fn set_socket_digest(&mut self, d: SocketDigest) {
        self.0.set_socket_digest(d)
    }
}

#[async_trait]
impl Peek for Raw {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.0.try_peek(buf).await
    }
}
