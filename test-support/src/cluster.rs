//! A whole cluster on loopback: N `nats-server` processes with JetStream
//! and M `wakewire-relay serve` processes sharing one set of keys, plus
//! SDK clients that know every relay and publishers on any of them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::Channel;
use wakewire_api::pb::publisher_client::PublisherClient;
use wakewire_sdk::{ClientBuilder, KeepalivePolicy};
use wakewire_server::data_dir::{DataDir, Keys};

use crate::nats::{shared_data_dirs, NatsCluster};
use crate::process::RelayProcess;
use crate::unix_secs;

/// NATS nodes, relays, and the keys they share.
pub struct ClusterFixture {
    /// The NATS servers.
    pub nats: NatsCluster,
    /// The relays (`None` while one is stopped).
    pub relays: Vec<Option<RelayProcess>>,
    /// Their device addresses, fixed across restarts.
    pub quic: Vec<SocketAddr>,
    /// Their publisher addresses.
    pub grpc: Vec<SocketAddr>,
    dirs: Vec<PathBuf>,
    _root: tempfile::TempDir,
    keys: Keys,
    bin: PathBuf,
    extra: Vec<String>,
}

impl ClusterFixture {
    /// Starts `nats` NATS servers and `relays` relays of `bin` (the
    /// `wakewire-relay` binary), with `extra` serve flags for each relay.
    pub async fn start(
        bin: &Path,
        nats: usize,
        relays: usize,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let nats_cluster = NatsCluster::start(nats).await?;
        let (root, dirs) = shared_data_dirs(relays)?;
        let keys = DataDir::open(&dirs[0])?.keys()?;
        let replicas = if nats >= 3 { "3" } else { "1" };
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        extra.extend(
            [
                "--cluster-nats-urls",
                &nats_cluster.urls(),
                "--cluster-replicas",
                replicas,
                "--cluster-unavailable-after-secs",
                "2",
                "--drain-delay-secs",
                "0",
                // Well inside the 30 s the tests wait for a drained relay.
                "--drain-timeout-secs",
                "10",
                "--cluster-consumer-heartbeat-secs",
                "1",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let mut fixture = Self {
            nats: nats_cluster,
            relays: Vec::new(),
            quic: Vec::new(),
            grpc: Vec::new(),
            dirs,
            _root: root,
            keys,
            bin: bin.to_owned(),
            extra,
        };
        for i in 0..relays {
            let any: SocketAddr = ([127, 0, 0, 1], 0).into();
            let r = fixture.launch(i, any, any).await?;
            fixture.quic.push(r.quic);
            fixture.grpc.push(r.grpc);
            fixture.relays.push(Some(r));
        }
        Ok(fixture)
    }

    async fn launch(
        &self,
        i: usize,
        quic: SocketAddr,
        grpc: SocketAddr,
    ) -> anyhow::Result<RelayProcess> {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        RelayProcess::start(&self.bin, &self.dirs[i], quic, grpc, &extra).await
    }

    /// One attempt at starting relay `i` anew (any ports, its data
    /// directory), without the retries of [`ClusterFixture::restart`].
    /// The future owns what it needs, so the fixture stays usable (its NATS
    /// nodes can be started) while the relay starts.
    pub fn start_once(
        &self,
        i: usize,
    ) -> impl std::future::Future<Output = anyhow::Result<RelayProcess>> + 'static {
        let (bin, dir, extra) = (self.bin.clone(), self.dirs[i].clone(), self.extra.clone());
        async move {
            let any: SocketAddr = ([127, 0, 0, 1], 0).into();
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            RelayProcess::start(&bin, &dir, any, any, &extra).await
        }
    }

    /// Starts relay `i` again on its ports (after a kill or a drain).
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let mut last = None;
        for _ in 0..50 {
            match self.launch(i, self.quic[i], self.grpc[i]).await {
                Ok(r) => {
                    self.relays[i] = Some(r);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("restart failed")))
    }

    /// SIGKILL of relay `i`.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut r) = self.relays[i].take() {
            r.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM of relay `i`: it drains (GoAway to its devices) and exits.
    pub async fn drain(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut r) = self.relays[i].take() {
            r.terminate().await?;
        }
        Ok(())
    }

    /// The first relay's data directory (the keys every relay shares).
    pub fn data_dir(&self) -> &Path {
        &self.dirs[0]
    }

    /// The dev certificate every relay serves.
    pub fn dev_cert(&self) -> PathBuf {
        self.dirs[0].join(wakewire_server::data_dir::DEV_CERT_FILE)
    }

    /// The shared keys (tokens).
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The channel id of `name` on `device`, as every relay derives it.
    pub fn channel_id(&self, device: &str, name: &str) -> String {
        self.keys.channel_ids.derive(device, name)
    }

    /// Every relay's device address, as an SDK relay list.
    pub fn relay_list(&self) -> String {
        self.quic
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// An SDK builder for `device` that knows the relays in `relays`
    /// (`host:port`, comma-separated), with quick loss detection.
    pub fn client_for(&self, device: &str, relays: &str) -> ClientBuilder {
        ClientBuilder::new(relays)
            .server_name("localhost")
            .trust_pem_file(self.dev_cert())
            .device_token(
                self.keys
                    .device_token(device, Duration::from_secs(3600), unix_secs()),
            )
            .keepalive(KeepalivePolicy::Fixed(Duration::from_secs(1)))
            .keepalive_timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(2))
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// An SDK builder for `device` that knows every relay.
    pub fn client(&self, device: &str) -> ClientBuilder {
        self.client_for(device, &self.relay_list())
    }

    /// A publisher client on relay `i`.
    pub async fn publisher(&self, i: usize) -> anyhow::Result<PublisherClient<Channel>> {
        Ok(PublisherClient::connect(format!("http://{}", self.grpc[i])).await?)
    }

    /// A publisher token for these devices.
    pub fn publisher_token(&self, devices: &[&str]) -> String {
        let d: Vec<String> = devices.iter().map(|s| s.to_string()).collect();
        self.keys
            .publisher_token(&[], &d, Duration::from_secs(3600), unix_secs())
    }

    /// The relay index whose device address is `addr`.
    pub fn relay_at(&self, addr: SocketAddr) -> Option<usize> {
        self.quic.iter().position(|a| *a == addr)
    }
}

/// The monotonic clock, for measuring failovers in tests.
#[allow(clippy::disallowed_methods)] // tests measure elapsed time
pub fn now() -> std::time::Instant {
    std::time::Instant::now()
}
