//! The two transports a device connection can use, behind one interface
//! for the connection driver: QUIC (one connection, one bidirectional
//! control stream) and TLS 1.3 over TCP (the fallback for networks that
//! block UDP). The frames are the same; only how a connection ends
//! differs: QUIC carries the close code in its CONNECTION_CLOSE, TCP in a
//! last `Close` frame before the stream is shut down.

use std::net::SocketAddr;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use wakewire_proto::relay_session::Close;

use crate::tls::CertIdentity;

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Read size on TCP (frames are at most 16 KiB).
const READ_CHUNK: usize = 16 * 1024;

/// The connection itself: who is at the other end, and how it ends.
pub(crate) enum Conn {
    Quic(quinn::Connection),
    Tcp {
        remote: SocketAddr,
        identity: CertIdentity,
    },
}

/// What the driver writes to.
pub(crate) enum Sender {
    Quic(quinn::SendStream),
    Tcp(WriteHalf<TlsStream>),
}

/// What the driver reads from.
pub(crate) enum Receiver {
    Quic(quinn::RecvStream),
    Tcp(ReadHalf<TlsStream>, Box<[u8]>),
}

/// A read that failed (the connection is over).
#[derive(Debug)]
pub(crate) struct ReadFailed(pub(crate) String);

impl std::fmt::Display for ReadFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Conn {
    /// Transport label for metrics and logs.
    pub(crate) fn transport(&self) -> &'static str {
        match self {
            Conn::Quic(_) => "quic",
            Conn::Tcp { .. } => "tcp",
        }
    }

    /// The device's address as this relay sees it.
    pub(crate) fn remote_address(&self) -> SocketAddr {
        match self {
            Conn::Quic(c) => c.remote_address(),
            Conn::Tcp { remote, .. } => *remote,
        }
    }

    /// The device a client certificate names, if one was presented.
    pub(crate) fn certificate_identity(&self) -> CertIdentity {
        match self {
            Conn::Quic(c) => crate::tls::certificate_identity(c),
            Conn::Tcp { identity, .. } => identity.clone(),
        }
    }

    /// Ends the connection with `close` (QUIC; on TCP the writer sends
    /// the Close frame, [`Sender::finish`]).
    pub(crate) fn close(&self, close: &Close) {
        if let Conn::Quic(c) = self {
            c.close(close.code.as_u32().into(), close.reason.as_bytes());
        }
    }

    /// Completes when the peer or the network ended the connection (QUIC;
    /// on TCP a read fails instead).
    pub(crate) async fn closed(&self) -> String {
        match self {
            Conn::Quic(c) => c.closed().await.to_string(),
            Conn::Tcp { .. } => std::future::pending().await,
        }
    }
}

impl Sender {
    /// Writes some of `buf`; how much.
    pub(crate) async fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sender::Quic(s) => s.write(buf).await.map_err(std::io::Error::other),
            Sender::Tcp(w) => w.write(buf).await,
        }
    }

    /// Writes `rest` (and, on TCP, the Close frame), then ends the stream
    /// and waits for the peer to have it.
    pub(crate) async fn finish(&mut self, rest: &[u8], close: Option<&Close>) -> Option<()> {
        match self {
            Sender::Quic(s) => {
                s.write_all(rest).await.ok()?;
                s.finish().ok()?;
                s.stopped().await.ok().map(|_| ())
            }
            Sender::Tcp(w) => {
                w.write_all(rest).await.ok()?;
                if let Some(c) = close {
                    w.write_all(&c.to_frame()).await.ok()?;
                }
                w.shutdown().await.ok()
            }
        }
    }
}

impl Receiver {
    /// The next bytes; `None` when the peer finished its side.
    pub(crate) async fn read(&mut self) -> Result<Option<Bytes>, ReadFailed> {
        match self {
            Receiver::Quic(r) => match r.read_chunk(usize::MAX, true).await {
                Ok(Some(chunk)) => Ok(Some(chunk.bytes)),
                Ok(None) => Ok(None),
                Err(e) => Err(ReadFailed(e.to_string())),
            },
            Receiver::Tcp(r, buf) => match r.read(buf).await {
                Ok(0) => Ok(None),
                Ok(n) => Ok(Some(Bytes::copy_from_slice(&buf[..n]))),
                Err(e) => Err(ReadFailed(e.to_string())),
            },
        }
    }
}

/// The driver's halves of an accepted TLS-over-TCP connection.
pub(crate) fn tcp(stream: TlsStream, remote: SocketAddr) -> (Conn, Sender, Receiver) {
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map_or(CertIdentity::None, crate::tls::device_of_certificate);
    let (r, w) = tokio::io::split(stream);
    (
        Conn::Tcp { remote, identity },
        Sender::Tcp(w),
        Receiver::Tcp(r, vec![0u8; READ_CHUNK].into_boxed_slice()),
    )
}
