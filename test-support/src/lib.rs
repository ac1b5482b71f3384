//! Shared test utilities: an in-process relay on loopback with ephemeral
//! ports and its own data directory, SDK clients that trust it, publisher
//! gRPC clients with tokens, and a raw QUIC connection for sending bytes
//! the SDK never would.

pub mod cluster;
pub mod flood;

/// Whether a test's outside tool is there. Where it is not, the test says
/// so and is skipped (`cargo test` works on a machine with only the Rust
/// toolchain), unless `REQUIRE_TEST_TOOLS=1` (set by `.ci/run`, which
/// installs them), where its absence fails the test.
pub fn tool_or_skip(tool: &str, found: Result<(), String>) -> bool {
    match found {
        Ok(()) => true,
        Err(why) if std::env::var("REQUIRE_TEST_TOOLS").as_deref() != Ok("1") => {
            eprintln!("SKIPPED: needs {tool}: {why}");
            false
        }
        Err(why) => panic!("{tool} required (REQUIRE_TEST_TOOLS=1): {why}"),
    }
}
pub mod kernel_nat;
pub mod metrics;
pub mod nats;
pub mod process;
pub mod proxy;
mod raw_device;

pub use raw_device::RawDevice;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tonic::transport::Channel;
use wakewire_api::pb::publisher_client::PublisherClient;
use wakewire_sdk::{ClientBuilder, Status, WakeEvent};
use wakewire_server::{Listeners, RelayConfig, RelayHandle};

/// Seconds since the Unix epoch.
#[allow(clippy::disallowed_methods)] // token validity in tests
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A loopback port (127.0.0.1) that is free for both TCP and UDP, for a
/// child process that must be told its port before it binds it (a
/// `nats-server` route, a proxy, a relay restarted on known ports).
///
/// The port is taken below (or above) the kernel's ephemeral range, so no
/// outgoing connection of a test running in parallel can take it between
/// this check and the child's bind, as a `bind(:0)` port could; each call in
/// a process returns a different port.
pub fn free_port() -> anyhow::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU32, Ordering};
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999));
    let base = if lo >= 1024 + SPAN {
        lo - SPAN
    } else if hi + SPAN <= 65_535 {
        hi + 1
    } else {
        anyhow::bail!("the ephemeral port range {lo}-{hi} leaves no room for fixed test ports");
    };
    // A per-process random start, so test binaries run one after another
    // do not all probe the same ports first.
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as u32;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(base + seed.wrapping_add(n) % SPAN)?;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port in {base}..{}", base + SPAN)
}

/// A relay running in this process, with its data directory.
pub struct TestRelay {
    /// The running relay (None between `stop` and `restart`).
    pub handle: Option<RelayHandle>,
    /// Data directory (kept across restarts).
    pub dir: tempfile::TempDir,
    /// Configuration used to start it.
    pub config: RelayConfig,
}

impl TestRelay {
    /// Starts a relay on 127.0.0.1 with ephemeral ports.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Starts a relay after letting `tweak` change the local configuration.
    /// Its sockets are bound here (ephemeral ports) and handed to it.
    pub async fn start_with(tweak: impl FnOnce(&mut RelayConfig)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = RelayConfig::local(dir.path().join("data"));
        tweak(&mut config);
        let listeners = Listeners::bind(&config)?;
        let handle = wakewire_server::start_on(config.clone(), listeners).await?;
        Ok(Self {
            handle: Some(handle),
            dir,
            config,
        })
    }

    /// The running relay.
    pub fn relay(&self) -> &RelayHandle {
        self.handle.as_ref().expect("relay is running")
    }

    /// Device endpoint address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.relay().quic_addr()
    }

    /// Mints a device token valid for an hour.
    pub fn device_token(&self, device_id: &str) -> String {
        self.relay()
            .keys()
            .device_token(device_id, Duration::from_secs(3600), unix_secs())
    }

    /// Mints a publisher token for channel ids and device ids.
    pub fn publisher_token(&self, channels: &[&str], devices: &[&str]) -> String {
        let c: Vec<String> = channels.iter().map(|s| s.to_string()).collect();
        let d: Vec<String> = devices.iter().map(|s| s.to_string()).collect();
        self.relay()
            .keys()
            .publisher_token(&c, &d, Duration::from_secs(3600), unix_secs())
    }

    /// An SDK builder for `device_id` that trusts this relay, with fast
    /// reconnects for tests.
    pub fn client(&self, device_id: &str) -> ClientBuilder {
        self.client_at(device_id, self.quic_addr())
    }

    /// Like [`TestRelay::client`], connecting through `addr` (a proxy).
    pub fn client_at(&self, device_id: &str, addr: SocketAddr) -> ClientBuilder {
        let cert = self
            .relay()
            .dev_cert_path()
            .expect("dev mode")
            .to_path_buf();
        ClientBuilder::new(addr.to_string())
            .server_name("localhost")
            .trust_pem_file(cert)
            .device_token(self.device_token(device_id))
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
    }

    /// A gRPC publisher client.
    pub async fn publisher(&self) -> anyhow::Result<PublisherClient<Channel>> {
        let url = format!("http://{}", self.relay().grpc_addr());
        Ok(PublisherClient::connect(url).await?)
    }

    /// Publishes `payload` (high priority, default TTL) to `channel` with a
    /// token scoped to that channel.
    pub async fn publish_to(
        &self,
        channel: &str,
        payload: &[u8],
    ) -> anyhow::Result<wakewire_api::pb::PublishResponse> {
        let token = self.publisher_token(&[channel], &[]);
        let req = wakewire_api::pb::PublishRequest {
            channel_id: channel.to_owned(),
            payload: payload.to_vec(),
            ..Default::default()
        };
        Ok(self
            .publisher()
            .await?
            .publish(authed(req, &token))
            .await?
            .into_inner())
    }

    /// Stops the relay without telling devices.
    pub async fn abort(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort().await;
        }
    }

    /// Stops the relay gracefully (GoAway to every device).
    pub async fn shutdown(&mut self, reconnect_after: Duration) {
        if let Some(h) = self.handle.take() {
            h.shutdown(reconnect_after).await;
        }
    }

    /// Starts the relay again on the same ports and data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let prev = self.handle.take();
        let (quic, grpc) = match &prev {
            Some(h) => (h.quic_addr(), h.grpc_addr()),
            None => (self.config.quic_listen, self.config.grpc_listen),
        };
        if let Some(h) = prev {
            h.abort().await;
        }
        self.config.quic_listen = quic;
        self.config.grpc_listen = grpc;
        // The old relay's sockets and store close when its last tasks end,
        // just after it stopped: wait (bounded) until they are free. The
        // relay itself never retries.
        let mut last = None;
        for _ in 0..500 {
            let started = match Listeners::bind(&self.config) {
                Ok(listeners) => wakewire_server::start_on(self.config.clone(), listeners).await,
                Err(e) => Err(e),
            };
            match started {
                Ok(h) => {
                    self.handle = Some(h);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(last
            .map(anyhow::Error::from)
            .unwrap_or_else(|| anyhow::anyhow!("restart failed")))
    }

    /// Remembers the current ports so `restart` after `abort` reuses them.
    pub fn pin_ports(&mut self) {
        if let Some(h) = &self.handle {
            self.config.quic_listen = h.quic_addr();
            self.config.grpc_listen = h.grpc_addr();
        }
    }
}

/// A request with `authorization: Bearer <token>`.
pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    let value = format!("Bearer {token}").parse().expect("token is ASCII");
    req.metadata_mut().insert("authorization", value);
    req
}

/// A wake callback that forwards events into a channel.
pub fn wake_sink() -> (
    impl Fn(&WakeEvent) + Send + Sync + 'static,
    mpsc::UnboundedReceiver<WakeEvent>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (move |w: &WakeEvent| drop(tx.send(w.clone())), rx)
}

/// A status callback that forwards statuses into a channel.
pub fn status_sink() -> (
    impl Fn(&Status) + Send + Sync + 'static,
    mpsc::UnboundedReceiver<Status>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (move |s: &Status| drop(tx.send(s.clone())), rx)
}

/// Waits (bounded) for the first status matching `pred`.
pub async fn wait_status(
    rx: &mut mpsc::UnboundedReceiver<Status>,
    pred: impl Fn(&Status) -> bool,
) -> anyhow::Result<Status> {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(s) = rx.recv().await {
            if pred(&s) {
                return Ok(s);
            }
        }
        anyhow::bail!("status stream ended")
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out waiting for a status"))?
}

/// Receives one item (bounded wait).
pub async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> anyhow::Result<T> {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))?
        .ok_or_else(|| anyhow::anyhow!("channel closed"))
}

/// A raw QUIC connection to the relay (ALPN wakewire/1, trusting its dev
/// certificate), for sending bytes the SDK would never send.
pub async fn raw_connection(
    relay: &TestRelay,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let cfg = wakewire_sdk::quic_client_config(relay.relay().dev_cert_path().expect("dev mode"))?;
    let ep = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
    let conn = ep
        .connect_with(cfg, relay.quic_addr(), "localhost")?
        .await?;
    Ok((ep, conn))
}

/// Connects as a device with the bare protocol (no SDK), registers
/// `channel` and returns the first wake it receives, without acking it;
/// the connection is then closed. Models a device that lost its connection
/// between Wake and Ack.
pub async fn raw_device_take_one_wake(
    relay: &TestRelay,
    device_id: &str,
    channel: &str,
) -> anyhow::Result<wakewire_proto::pb::device::Wake> {
    let mut d = RawDevice::connect(relay, device_id).await?;
    d.register(&[channel]).await?;
    let w = d.next_wake().await?;
    d.drop_connection();
    Ok(w)
}
