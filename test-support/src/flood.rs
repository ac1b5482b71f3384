//! A ClientHello flood: real QUIC Initial packets (made by quinn-proto, so
//! the relay parses each as a new connection attempt) sent from many UDP
//! sources that never answer, as a flood from spoofed or abandoned
//! addresses looks to a server.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;

/// `n` Initial datagrams for `relay`, each opening a distinct connection.
pub fn client_hellos(relay: SocketAddr, ca: &Path, n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let cfg = wakewire_sdk::quic_client_config(ca)?;
    let mut ep = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    #[allow(clippy::disallowed_methods)] // quinn-proto needs a time; any will do
    let now = Instant::now();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (_, mut conn) = ep
            .connect(now, cfg.clone(), relay, "localhost")
            .context("quinn-proto connect")?;
        let mut buf = Vec::new();
        let t = conn
            .poll_transmit(now, 1, &mut buf)
            .context("no Initial to send")?;
        buf.truncate(t.size);
        out.push(buf);
    }
    Ok(out)
}

/// Sends `datagrams` to `relay` round-robin from sockets bound on
/// `sources` (loopback addresses such as 127.0.9.1), and counts what came
/// back: (Retry packets, other packets) seen on those sockets right after.
pub async fn flood(
    relay: SocketAddr,
    sources: &[IpAddr],
    datagrams: &[Vec<u8>],
) -> anyhow::Result<FloodOutcome> {
    let mut sockets = vec![];
    for ip in sources {
        sockets.push(tokio::net::UdpSocket::bind(SocketAddr::new(*ip, 0)).await?);
    }
    for (i, d) in datagrams.iter().enumerate() {
        let s = &sockets[i % sockets.len()];
        s.send_to(d, relay).await?;
    }
    // Read what the relay sent back so far, without waiting for more.
    let mut outcome = FloodOutcome::default();
    let mut buf = vec![0u8; 2048];
    for s in &sockets {
        while let Ok((n, _)) = s.try_recv_from(&mut buf) {
            // Long header (0x80) with type Retry (0b11 in bits 4-5) in QUIC v1.
            if n > 0 && buf[0] & 0xb0 == 0xb0 {
                outcome.retries += 1;
            } else {
                outcome.other += 1;
            }
        }
    }
    outcome.sockets = sockets;
    Ok(outcome)
}

/// What a flood drew back (sockets are kept open so the relay's answers
/// keep arriving somewhere).
#[derive(Debug, Default)]
pub struct FloodOutcome {
    /// Retry packets received so far.
    pub retries: usize,
    /// Other packets (handshake replies, refusals) received so far.
    pub other: usize,
    /// The source sockets.
    pub sockets: Vec<tokio::net::UdpSocket>,
}

impl FloodOutcome {
    /// Waits for more answers and counts them, until each socket has been
    /// silent for `quiet`.
    pub async fn drain(&mut self, quiet: std::time::Duration) {
        let mut buf = vec![0u8; 2048];
        for s in &self.sockets {
            while let Ok(Ok((n, _))) = tokio::time::timeout(quiet, s.recv_from(&mut buf)).await {
                if n > 0 && buf[0] & 0xb0 == 0xb0 {
                    self.retries += 1;
                } else {
                    self.other += 1;
                }
            }
        }
    }
}
