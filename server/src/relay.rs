//! Starting and stopping a relay: the QUIC device endpoint, the gRPC
//! publisher API (with reflection and health), and the metrics exporter.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use wakewire_proto::pb::device::GoAwayReason;
use wakewire_proto::pb::publish::publisher_server::PublisherServer;
use wakewire_proto::pb::FILE_DESCRIPTOR_SET;
use wakewire_proto::ErrorCode;

use crate::config::{RelayConfig, TlsSource};
use crate::data_dir::{DataDir, DataDirError, Keys};
use crate::publish::PublisherService;
use crate::registry::{ConnCommand, Registry};
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsError};

/// State shared by every task of a relay.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: RelayConfig,
    pub(crate) keys: Keys,
    pub(crate) registry: Registry,
    pub(crate) store: Store,
    conn_ids: AtomicU64,
    /// Handshakes in progress (admission control).
    pub(crate) handshaking: AtomicUsize,
    /// Established connections.
    pub(crate) connections: AtomicUsize,
}

impl Shared {
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether a new connection may start its handshake now.
    fn admit(&self) -> bool {
        self.handshaking.load(Ordering::Relaxed) < self.config.max_pending_handshakes
            && self.connections.load(Ordering::Relaxed) < self.config.max_connections
    }
}

/// Why the relay could not start. All are configuration or environment
/// problems: fix and start again.
#[derive(Debug, Error)]
pub enum StartError {
    /// Data directory problem.
    #[error("data directory: {0}")]
    DataDir(#[from] DataDirError),
    /// Certificate or TLS problem.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// A listen address could not be bound.
    #[error("cannot listen on {what} {addr}: {source}")]
    Bind {
        /// "QUIC (UDP)" or "gRPC (TCP)".
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// The metrics exporter could not start.
    #[error("metrics exporter on {addr}: {message}")]
    Metrics {
        /// Address.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
    /// The embedded store could not be opened.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The gRPC services could not be built.
    #[error("gRPC setup: {0}")]
    Grpc(String),
}

/// A running relay. Dropping it does not stop it; call [`RelayHandle::shutdown`].
#[derive(Debug)]
pub struct RelayHandle {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    quic_addr: SocketAddr,
    grpc_addr: SocketAddr,
    dev_cert: Option<PathBuf>,
    stop: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    probe: Option<(SocketAddr, JoinHandle<()>)>,
    grpc_task: JoinHandle<()>,
}

/// Starts a relay on the current tokio runtime.
pub async fn start(mut config: RelayConfig) -> Result<RelayHandle, StartError> {
    let data_dir = DataDir::open(&config.data_dir)?;
    let keys = data_dir.keys()?;
    let (cert_path, key_path, dev_cert) = match &config.tls {
        TlsSource::Dev => {
            let (c, k) = data_dir.dev_certificate()?;
            (c.clone(), k, Some(c))
        }
        TlsSource::Files { cert, key } => (cert.clone(), key.clone(), None),
    };
    let (certs, key) = tls::load_pem(&cert_path, &key_path)?;
    let server_config = tls::server_config(certs, key, config.session.idle_timeout)?;
    let bind_err = |source| StartError::Bind {
        what: "QUIC (UDP)",
        addr: config.quic_listen,
        source,
    };
    let socket = udp_socket(config.quic_listen, config.udp_buffer_bytes).map_err(bind_err)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_err(std::io::Error::other("no async runtime for quinn")))?;
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(keys.reset_key.clone()));
    // Answer every packet of a connection we no longer know with a stateless
    // reset (quinn's default allows one per 20 ms): after a crash, devices
    // whose keepalives arrive together must all learn at once that they
    // should reconnect. A reset is always smaller than the packet that
    // caused it, so this cannot amplify traffic.
    endpoint_config.min_reset_interval(Duration::ZERO);
    // Connection ids validated with a key that survives restarts: quinn only
    // answers packets whose id it recognises as its own with a reset.
    let cid_key = keys.cid_key;
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let endpoint = quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)
        .map_err(bind_err)?;
    let quic_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
        what: "QUIC (UDP)",
        addr: config.quic_listen,
        source,
    })?;
    let listener = tokio::net::TcpListener::bind(config.grpc_listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "gRPC (TCP)",
            addr: config.grpc_listen,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| StartError::Bind {
        what: "gRPC (TCP)",
        addr: config.grpc_listen,
        source,
    })?;
    if let Some(addr) = config.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| StartError::Metrics {
                addr,
                message: e.to_string(),
            })?;
        info!(%addr, "Prometheus metrics at http://{addr}/metrics");
    }

    let probe = match config.probe_listen {
        Some(addr) => {
            let socket =
                tokio::net::UdpSocket::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind {
                        what: "probe (UDP)",
                        addr,
                        source,
                    })?;
            let bound = socket.local_addr().map_err(|source| StartError::Bind {
                what: "probe (UDP)",
                addr,
                source,
            })?;
            config.session.probe_port = bound.port();
            Some((bound, tokio::spawn(crate::probe::serve(socket))))
        }
        None => None,
    };
    let store = Store::open(data_dir.path(), config.store.clone())?;
    let registry = Registry::default();
    let mut known = 0usize;
    for (id, ch) in store.channels()? {
        if ch.gone_reason.is_empty() {
            registry.register_channel(
                &id,
                &Arc::from(ch.device_id.as_str()),
                &ch.name,
                ch.last_used_ms,
            );
            known += 1;
        } else {
            registry.channel_gone(&id, &ch.gone_reason);
        }
    }
    info!(channels = known, "store opened");
    let shared = Arc::new(Shared {
        config,
        keys,
        registry,
        store,
        conn_ids: AtomicU64::new(1),
        handshaking: AtomicUsize::new(0),
        connections: AtomicUsize::new(0),
    });
    let (stop, stop_rx) = watch::channel(false);

    let accept_task = {
        let endpoint = endpoint.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                if !shared.admit() {
                    // Cheap refusal: the device backs off (with jitter) and retries.
                    metrics::counter!(crate::metrics::REFUSED).increment(1);
                    incoming.refuse();
                    continue;
                }
                shared.handshaking.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(crate::device_conn::serve(incoming, shared.clone()));
            }
        })
    };

    let sweeper = tokio::spawn(sweep_loop(shared.clone()));

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Grpc(e.to_string()))?;
    let (mut health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<PublisherServer<PublisherService>>()
        .await;
    let publisher = PublisherServer::new(PublisherService::new(shared.clone()));
    let grpc_task = {
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(reflection)
                .add_service(publisher)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    },
                )
                .await;
            if let Err(e) = result {
                warn!(error = %e, "gRPC server stopped with an error");
            }
        })
    };
    info!(quic = %quic_addr, grpc = %grpc_addr, probe = ?probe.as_ref().map(|p| p.0), data_dir = %shared.config.data_dir.display(), "relay started");
    if let Some(cert) = &dev_cert {
        info!(
            cert = %cert.display(),
            "dev mode: self-signed certificate for localhost; devices must trust this file. \
             Mint tokens with `wakewire-relay token device --device-id D` and \
             `wakewire-relay token publisher --device-id D`"
        );
    }
    Ok(RelayHandle {
        shared,
        endpoint,
        quic_addr,
        grpc_addr,
        dev_cert,
        stop,
        accept_task,
        sweeper,
        probe,
        grpc_task,
    })
}

impl RelayHandle {
    /// Bound UDP address of the device endpoint.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// Bound TCP address of the gRPC API.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The dev certificate devices must trust (dev mode only).
    pub fn dev_cert_path(&self) -> Option<&std::path::Path> {
        self.dev_cert.as_deref()
    }

    /// The relay's keys (to mint tokens in tests and tools).
    pub fn keys(&self) -> &Keys {
        &self.shared.keys
    }

    /// Devices connected right now.
    pub fn connected_devices(&self) -> usize {
        self.shared.registry.connected_devices()
    }

    /// Stops the relay: asks every device to go away, waits up to 2 s for
    /// them to leave, then closes the endpoint and the gRPC server. Devices
    /// are told to come back after `reconnect_after` plus a share of a window
    /// of `connected / shutdown_reconnect_rate` seconds, so a restart is not
    /// followed by every device at once.
    pub async fn shutdown(self, reconnect_after: Duration) {
        self.endpoint.set_server_config(None);
        let conns = self.shared.registry.all_connections();
        let window_ms = (conns.len() as u64).saturating_mul(1000)
            / u64::from(self.shared.config.shutdown_reconnect_rate);
        for (i, conn) in conns.iter().enumerate() {
            let spread = if conns.len() > 1 {
                window_ms * i as u64 / (conns.len() as u64 - 1)
            } else {
                0
            };
            let _ = conn.try_send(Box::new(ConnCommand::GoAway {
                reason: GoAwayReason::Shutdown,
                reconnect_after: reconnect_after + Duration::from_millis(spread),
                message: "relay shutting down",
            }));
        }
        let drained = tokio::time::timeout(Duration::from_secs(2), async {
            while self.shared.registry.connected_devices() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if drained.is_err() {
            warn!(
                left = self.shared.registry.connected_devices(),
                "devices still connected at shutdown"
            );
        }
        self.endpoint
            .close(ErrorCode::GoingAway.as_u32().into(), b"relay shutting down");
        let _ = self.stop.send(true);
        let _ = self.grpc_task.await;
        self.accept_task.abort();
        self.sweeper.abort();
        if let Some((_, task)) = &self.probe {
            task.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        info!("relay stopped");
    }

    /// Stops at once without telling devices (as a crash would, minus the
    /// process exit): for tests of reconnection.
    pub async fn abort(self) {
        self.endpoint
            .close(ErrorCode::Internal.as_u32().into(), b"relay aborted");
        let _ = self.stop.send(true);
        self.accept_task.abort();
        self.sweeper.abort();
        if let Some((_, task)) = &self.probe {
            task.abort();
        }
        let _ = self.grpc_task.await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    /// Bound UDP address of the probe service, if on.
    pub fn probe_addr(&self) -> Option<SocketAddr> {
        self.probe.as_ref().map(|p| p.0)
    }

    /// The relay's store (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.shared.store
    }
}

/// Once a second: expire events past their TTL, forget finished events
/// past their retention; once a minute: expire channels whose device has
/// not registered them for `channel_expiry`.
async fn sweep_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tick.tick().await;
        n += 1;
        let now = unix_ms();
        match shared.store.sweep(now).await {
            Ok(out) if !out.finished.is_empty() => {
                metrics::counter!(crate::metrics::EXPIRED).increment(out.finished.len() as u64);
                tracing::debug!(expired = out.finished.len(), "swept");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "sweep failed"),
        }
        if n % 60 == 1 {
            let limit = u64::try_from(shared.config.channel_expiry.as_millis()).unwrap_or(u64::MAX);
            for id in shared.registry.stale_channels(now.saturating_sub(limit)) {
                let reason = format!(
                    "expired: its device has not registered it for {} days",
                    shared.config.channel_expiry.as_secs() / 86_400
                );
                match shared
                    .store
                    .channel_gone(id.clone(), reason.clone(), now)
                    .await
                {
                    Ok(_) => shared.registry.channel_gone(&id, &reason),
                    Err(e) => warn!(error = %e, "channel expiry failed"),
                }
            }
        }
    }
}

/// A UDP socket with the requested buffer sizes (the kernel may cap them
/// at net.core.rmem_max / wmem_max; as root we ask to exceed that).
fn udp_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    if socket.set_recv_buffer_size(buffer).is_err() {
        tracing::debug!(buffer, "could not set the UDP receive buffer");
    }
    if socket.set_send_buffer_size(buffer).is_err() {
        tracing::debug!(buffer, "could not set the UDP send buffer");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Wall clock, Unix milliseconds.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Wall clock, Unix seconds.
pub(crate) fn unix_secs() -> u64 {
    unix_ms() / 1000
}
