//! A device speaking the bare protocol (a [`DeviceSession`] over a raw
//! QUIC connection, no SDK): it does only what a test tells it, so tests
//! can pause between protocol steps, withhold acks, or send what the SDK
//! never would (acks for other devices' events, floods).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use wakewire_proto::codec::encode_to_bytes;
use wakewire_proto::device_session::{
    DeviceEvent, DeviceSession, DeviceSessionConfig, RegisterRefused,
};
use wakewire_proto::pb::device::{frame::Body, Ack, Wake};
use wakewire_proto::MAX_FRAME_SIZE;

use crate::TestRelay;

/// A raw device; its own clock is the real one.
pub struct RawDevice {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    session: DeviceSession,
    /// Wakes received and not yet taken by [`RawDevice::next_wake`].
    wakes: Vec<Wake>,
}

#[allow(clippy::disallowed_methods)] // a raw device's own clock
fn now() -> Instant {
    Instant::now()
}

const WAIT: Duration = Duration::from_secs(20);

impl RawDevice {
    /// Connects as `device_id` and waits for Welcome.
    pub async fn connect(relay: &TestRelay, device_id: &str) -> anyhow::Result<Self> {
        let ca = relay.relay().dev_cert_path().context("dev mode")?;
        Self::connect_to(relay.quic_addr(), ca, relay.device_token(device_id)).await
    }

    /// Connects to the relay at `addr` (trusting the PEM file `ca`, name
    /// "localhost") with a device `token`, and waits for Welcome.
    pub async fn connect_to(
        addr: std::net::SocketAddr,
        ca: &std::path::Path,
        token: String,
    ) -> anyhow::Result<Self> {
        let cfg = wakewire_sdk::quic_client_config(ca)?;
        let endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
        let conn = endpoint.connect_with(cfg, addr, "localhost")?.await?;
        let (send, recv) = conn.open_bi().await?;
        let mut config = DeviceSessionConfig::new(token);
        config.keepalive_interval = Duration::from_secs(3600);
        let mut d = Self {
            _endpoint: endpoint,
            conn,
            send,
            recv,
            session: DeviceSession::new(now(), config),
            wakes: vec![],
        };
        d.until(|ev| matches!(ev, DeviceEvent::Welcome { .. }).then_some(()))
            .await
            .context("no Welcome")?;
        Ok(d)
    }

    /// Registers channels; returns their ids in order.
    pub async fn register(&mut self, names: &[&str]) -> anyhow::Result<Vec<String>> {
        let req = self
            .session
            .register(now(), names.iter().map(|n| n.to_string()).collect());
        self.until(|ev| match ev {
            DeviceEvent::Registered {
                request_id,
                result: Ok(b),
            } if *request_id == req => Some(b.iter().map(|b| b.channel_id.clone()).collect()),
            _ => None,
        })
        .await
    }

    /// Registers channels, expecting a refusal; the relay's answer.
    pub async fn register_refused(&mut self, names: &[&str]) -> anyhow::Result<RegisterRefused> {
        match self.register_or_refused(names).await? {
            Ok(ids) => bail!("registered {ids:?}"),
            Err(r) => Ok(r),
        }
    }

    /// Registers channels: their ids, or the relay's refusal.
    pub async fn register_or_refused(
        &mut self,
        names: &[&str],
    ) -> anyhow::Result<Result<Vec<String>, RegisterRefused>> {
        let req = self
            .session
            .register(now(), names.iter().map(|n| n.to_string()).collect());
        self.until(|ev| match ev {
            DeviceEvent::Registered { request_id, result } if *request_id == req => Some(
                result
                    .clone()
                    .map(|b| b.iter().map(|b| b.channel_id.clone()).collect()),
            ),
            _ => None,
        })
        .await
    }

    /// Unregisters channels.
    pub async fn unregister(&mut self, channel_ids: &[String]) -> anyhow::Result<()> {
        self.session.unregister(now(), channel_ids.to_vec());
        self.flush().await
    }

    /// The next wake (bounded wait), not acked.
    pub async fn next_wake(&mut self) -> anyhow::Result<Wake> {
        if !self.wakes.is_empty() {
            return Ok(self.wakes.remove(0));
        }
        self.until(|ev| match ev {
            DeviceEvent::Wake(w) => Some(w.clone()),
            _ => None,
        })
        .await
    }

    /// Whether a wake arrives within `d` (it is kept for `next_wake`).
    pub async fn wake_within(&mut self, d: Duration) -> bool {
        if !self.wakes.is_empty() {
            return true;
        }
        match tokio::time::timeout(d, self.next_wake()).await {
            Ok(Ok(w)) => {
                self.wakes.push(w);
                true
            }
            _ => false,
        }
    }

    /// Acks an event (any id: the relay decides whether it counts).
    pub async fn ack(&mut self, event_id: &str) -> anyhow::Result<()> {
        self.session.ack(now(), event_id.to_owned());
        self.flush().await
    }

    /// Writes `n` acks for made-up event ids in one go.
    pub async fn ack_flood(&mut self, n: usize) -> anyhow::Result<()> {
        let mut bytes = Vec::new();
        for i in 0..n {
            let frame = encode_to_bytes(
                Body::Ack(Ack {
                    event_id: format!("{i:032x}"),
                }),
                MAX_FRAME_SIZE,
            )?;
            bytes.extend_from_slice(&frame);
        }
        self.send.write_all(&bytes).await?;
        Ok(())
    }

    /// Waits (bounded) for the relay to close the connection; its code and
    /// reason.
    pub async fn closed(&self) -> anyhow::Result<quinn::ConnectionError> {
        tokio::time::timeout(WAIT, self.conn.closed())
            .await
            .context("connection not closed")
    }

    /// Closes the connection without acking anything.
    pub fn drop_connection(&self) {
        self.conn.close(0u32.into(), b"gone");
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        while let Some(b) = self.session.poll_transmit() {
            self.send.write_all(&b).await?;
        }
        Ok(())
    }

    /// Runs the session until `pick` returns something; wakes seen on the
    /// way are kept.
    async fn until<T>(
        &mut self,
        mut pick: impl FnMut(&DeviceEvent) -> Option<T>,
    ) -> anyhow::Result<T> {
        tokio::time::timeout(WAIT, async {
            loop {
                self.flush().await?;
                while let Some(ev) = self.session.poll_event() {
                    if let Some(t) = pick(&ev) {
                        return Ok(t);
                    }
                    if let DeviceEvent::Wake(w) = ev {
                        self.wakes.push(w);
                    }
                }
                if let Some(c) = self.session.poll_close() {
                    bail!("session closed: {c:?}");
                }
                match self.recv.read_chunk(usize::MAX, true).await? {
                    Some(chunk) => self.session.handle_data(now(), &chunk.bytes),
                    None => bail!("relay closed the stream"),
                }
            }
        })
        .await
        .context("timed out")?
    }
}
