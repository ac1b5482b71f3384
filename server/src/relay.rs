//! Starting and stopping a relay: binds (or takes) its sockets, opens the
//! data directory and the store, and runs the two front doors
//! ([`crate::quic`] for devices, [`crate::grpc`] for publishers), the
//! sweeper and the metrics exporter.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use wakewire_proto::pb::device::GoAwayReason;
use wakewire_proto::ErrorCode;

use crate::certs::ReloadableCert;
use crate::claims::Claims;
use crate::cluster::{Cluster, Retention};
use crate::config::{GrpcTls, RelayConfig, TlsSource};
use crate::data_dir::{DataDir, DataDirError, Keys};
use crate::registry::{ConnCommand, Registry};
use crate::revocation::Revocations;
use crate::state::{clock, Shared};
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsError};

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
    /// Cluster mode: NATS or JetStream could not be set up.
    #[error("{0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The gRPC services could not be built.
    #[error("gRPC setup: {0}")]
    Grpc(String),
    /// The revocation list could not be read.
    #[error("revocation list {path}: {source}")]
    Revocations {
        /// Its path.
        path: PathBuf,
        /// I/O error.
        source: std::io::Error,
    },
    /// A part of the running relay stopped on its own (a front door's accept
    /// loop, the sweeper): the relay shut down so a supervisor restarts it.
    #[error("{0} stopped unexpectedly; the relay shut down")]
    Stopped(&'static str),
}

/// The sockets a relay serves on, bound by the caller (tests bind port 0
/// and keep the addresses; a supervisor may pass inherited sockets).
#[derive(Debug)]
pub struct Listeners {
    /// UDP socket of the device endpoint.
    pub quic: std::net::UdpSocket,
    /// TCP listener of the device endpoint over TLS, if on.
    pub tcp: Option<std::net::TcpListener>,
    /// TCP listener of the publisher gRPC API.
    pub grpc: std::net::TcpListener,
    /// UDP socket of the probe service, if on.
    pub probe: Option<std::net::UdpSocket>,
    /// TCP listener of the plaintext health endpoint, if on.
    pub health: Option<std::net::TcpListener>,
}

impl Listeners {
    /// Binds the addresses of `config`.
    pub fn bind(config: &RelayConfig) -> Result<Self, StartError> {
        let quic = bind_udp(config.quic_listen).map_err(|source| StartError::Bind {
            what: "QUIC (UDP)",
            addr: config.quic_listen,
            source,
        })?;
        let tcp = match config.tcp_listen {
            Some(addr) => Some(bind_tcp(addr).map_err(|source| StartError::Bind {
                what: "devices (TCP)",
                addr,
                source,
            })?),
            None => None,
        };
        let grpc = bind_tcp(config.grpc_listen).map_err(|source| StartError::Bind {
            what: "gRPC (TCP)",
            addr: config.grpc_listen,
            source,
        })?;
        let probe = match config.probe_listen {
            Some(addr) => Some(bind_udp(addr).map_err(|source| StartError::Bind {
                what: "probe (UDP)",
                addr,
                source,
            })?),
            None => None,
        };
        let health = match config.health_listen {
            Some(addr) => Some(bind_tcp(addr).map_err(|source| StartError::Bind {
                what: "health (TCP)",
                addr,
                source,
            })?),
            None => None,
        };
        Ok(Self {
            quic,
            tcp,
            grpc,
            probe,
            health,
        })
    }
}

/// A TCP listener with a backlog of 1024 (std's 128 overflows in a burst
/// of publisher connections, or while the relay is out of descriptors).
fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .or_else(|e| {
            ipv4_instead(addr, e).and_then(|a| {
                Socket::new(Domain::for_address(a), Type::STREAM, Some(Protocol::TCP))
            })
        })?;
    let addr = match socket.domain() {
        Ok(d) if d == Domain::IPV4 && addr.is_ipv6() => {
            SocketAddr::from(([0, 0, 0, 0], addr.port()))
        }
        _ => addr,
    };
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// `[::]:port` on a host without IPv6: `0.0.0.0:port` instead (the
/// default device addresses are dual-stack). Other errors stand.
fn ipv4_instead(addr: SocketAddr, e: std::io::Error) -> std::io::Result<SocketAddr> {
    /// EAFNOSUPPORT: the kernel has no IPv6.
    const NO_FAMILY: i32 = 97;
    if addr.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        && e.raw_os_error() == Some(NO_FAMILY)
    {
        warn!(%addr, "no IPv6 on this host: listening on IPv4 only");
        Ok(SocketAddr::from(([0, 0, 0, 0], addr.port())))
    } else {
        Err(e)
    }
}

/// A UDP socket; an IPv6 one also takes IPv4.
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).or_else(|e| {
            ipv4_instead(addr, e)
                .and_then(|a| Socket::new(Domain::for_address(a), Type::DGRAM, Some(Protocol::UDP)))
        })?;
    let addr = match socket.domain() {
        Ok(d) if d == Domain::IPV4 && addr.is_ipv6() => {
            SocketAddr::from(([0, 0, 0, 0], addr.port()))
        }
        _ => addr,
    };
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Runs a relay on `listeners` until `shutdown` completes, then stops it
/// gracefully (GoAway to every device).
pub async fn run(
    config: RelayConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let mut relay = start_on(config, listeners).await?;
    let failed = tokio::select! {
        () = shutdown => None,
        name = relay.failed() => Some(name),
    };
    match failed {
        None => info!("shutting down"),
        Some(name) => tracing::error!(part = name, "stopped unexpectedly; shutting down"),
    }
    relay.shutdown(Duration::from_secs(1)).await;
    match failed {
        None => Ok(()),
        Some(name) => Err(StartError::Stopped(name)),
    }
}

/// The relay's long-running tasks: each reports when it ends, so that one
/// ending on its own stops the relay instead of leaving it half alive.
#[derive(Debug)]
struct Tasks {
    aborts: Vec<tokio::task::AbortHandle>,
    ended_tx: tokio::sync::mpsc::UnboundedSender<&'static str>,
    ended: tokio::sync::mpsc::UnboundedReceiver<&'static str>,
}

impl Tasks {
    fn new() -> Self {
        let (ended_tx, ended) = tokio::sync::mpsc::unbounded_channel();
        Self {
            aborts: vec![],
            ended_tx,
            ended,
        }
    }

    /// Spawns `fut` as the task `name`; the handle completes when it ends.
    fn spawn(
        &mut self,
        name: &'static str,
        fut: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        let inner = tokio::spawn(fut);
        self.aborts.push(inner.abort_handle());
        let tx = self.ended_tx.clone();
        tokio::spawn(async move {
            // Ended (or panicked): tell whoever watches.
            let _ = inner.await;
            let _ = tx.send(name);
        })
    }

    fn abort_all(&self) {
        for a in &self.aborts {
            a.abort();
        }
    }
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
    tasks: Tasks,
    probe: Option<SocketAddr>,
    tcp_addr: Option<SocketAddr>,
    grpc_task: JoinHandle<()>,
    health: crate::grpc::Health,
    health_addr: Option<SocketAddr>,
}

/// Binds the configured addresses and starts a relay on the current tokio
/// runtime.
pub async fn start(config: RelayConfig) -> Result<RelayHandle, StartError> {
    let listeners = Listeners::bind(&config)?;
    start_on(config, listeners).await
}

/// Starts a relay on already-bound sockets.
pub async fn start_on(
    mut config: RelayConfig,
    listeners: Listeners,
) -> Result<RelayHandle, StartError> {
    let data_dir = DataDir::open(&config.data_dir)?;
    let keys = data_dir.keys()?;
    for path in data_dir.tighten_permissions()? {
        warn!(path = %path.display(), "was readable by others: made private (0600 files, 0700 directory)");
    }
    let revocations =
        Revocations::load(data_dir.revoked_path()).map_err(|source| StartError::Revocations {
            path: data_dir.revoked_path(),
            source,
        })?;
    let (cert_path, key_path, dev_cert) = match &config.tls {
        TlsSource::Dev => {
            let (c, k) = data_dir.dev_certificate()?;
            (c.clone(), k, Some(c))
        }
        TlsSource::Files { cert, key } => (cert.clone(), key.clone(), None),
    };
    let device_cert = ReloadableCert::load(&cert_path, &key_path)?;
    let client_ca = match &config.device_client_ca {
        Some(path) => Some(tls::load_certificates(path)?),
        None => None,
    };
    let resumption = match config.resumption {
        crate::config::Resumption::Tickets { rotation } => tls::Resumption::Tickets(Arc::new(
            crate::tickets::Ticketer::open(data_dir.path(), rotation)?,
        )),
        crate::config::Resumption::Cache => tls::Resumption::Cache,
    };
    let tcp_tls = tls::tcp_server_config(device_cert.clone(), client_ca.clone(), &resumption)?;
    let server_config = tls::server_config(
        device_cert.clone(),
        config.connection.session.idle_timeout,
        client_ca,
        &resumption,
    )?;
    let mut certificates = vec![device_cert.clone()];
    let grpc_tls = match &config.grpc_tls {
        None => None,
        Some(GrpcTls::DeviceCertificate) => Some(device_cert.clone()),
        Some(GrpcTls::Files { cert, key }) => {
            let c = ReloadableCert::load(cert, key)?;
            certificates.push(c.clone());
            Some(c)
        }
    };
    let grpc_tls = match grpc_tls {
        None => None,
        Some(cert) => {
            let ca = match &config.grpc_client_ca {
                Some(path) => Some(tls::load_certificates(path)?),
                None => None,
            };
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                tls::grpc_tls_config(cert, ca)?,
            )))
        }
    };
    let bind_err = |what, addr, source| StartError::Bind { what, addr, source };
    let quic_addr = listeners
        .quic
        .local_addr()
        .map_err(|e| bind_err("QUIC (UDP)", config.quic_listen, e))?;
    let endpoint = crate::quic::endpoint(
        listeners.quic,
        &keys,
        server_config,
        config.udp_buffer_bytes,
    )
    .map_err(|e| bind_err("QUIC (UDP)", quic_addr, e))?;
    listeners
        .grpc
        .set_nonblocking(true)
        .map_err(|e| bind_err("gRPC (TCP)", config.grpc_listen, e))?;
    let listener = tokio::net::TcpListener::from_std(listeners.grpc)
        .map_err(|e| bind_err("gRPC (TCP)", config.grpc_listen, e))?;
    let grpc_addr = listener
        .local_addr()
        .map_err(|e| bind_err("gRPC (TCP)", config.grpc_listen, e))?;
    let mut tasks = Tasks::new();
    if let Some(addr) = config.metrics_listen {
        let metrics_err = |message: String| StartError::Metrics { addr, message };
        let (recorder, exporter) = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets(crate::metrics::BUCKETS)
            .map_err(|e| metrics_err(e.to_string()))?
            .build()
            .map_err(|e| metrics_err(e.to_string()))?;
        metrics::set_global_recorder(recorder).map_err(|e| metrics_err(e.to_string()))?;
        crate::metrics::register_all(config.cluster.is_some());
        tasks.spawn("the metrics endpoint", async move {
            if let Err(e) = exporter.await {
                warn!(error = ?e, "metrics endpoint stopped");
            }
        });
        info!(%addr, "Prometheus metrics at http://{addr}/metrics");
    }
    let probe = match listeners.probe {
        Some(socket) => {
            let addr = socket
                .local_addr()
                .map_err(|e| bind_err("probe (UDP)", quic_addr, e))?;
            socket
                .set_nonblocking(true)
                .map_err(|e| bind_err("probe (UDP)", addr, e))?;
            let socket = tokio::net::UdpSocket::from_std(socket)
                .map_err(|e| bind_err("probe (UDP)", addr, e))?;
            config.connection.session.probe_port = addr.port();
            let probe_key = keys.probe_key;
            Some((
                addr,
                tasks.spawn("the probe service", crate::probe::serve(socket, probe_key)),
            ))
        }
        None => None,
    };
    let claims = Arc::new(Claims::default());
    let cluster = match &config.cluster {
        Some(c) => Some(
            Cluster::connect(
                {
                    // Devices can reach a relay bound to one address there.
                    let mut c = c.clone();
                    if c.advertise.is_none() && !quic_addr.ip().is_unspecified() {
                        c.advertise = Some(quic_addr.to_string());
                    }
                    c
                },
                &Retention {
                    queue_limit: config.store.queue_limit,
                    status_retention: config.store.status_retention,
                    idempotency_retention: config.store.idempotency_retention,
                    max_ttl: Duration::from_secs(u64::from(config.max_ttl_secs)),
                },
                keys.cluster_key.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let store = match cluster {
        // The state lives in JetStream; the embedded store stays empty.
        Some(_) => Store::open_in_memory(config.store.clone(), claims)?,
        None => Store::open(data_dir.path(), config.store.clone(), claims)?,
    };
    let registry = Registry::default();
    let mut known = 0usize;
    let records = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.channels_blocking())
            .await
            .map_err(|e| StartError::Store(StoreError::Read(e.to_string())))??
    };
    for (id, ch) in records {
        let device: Arc<str> = Arc::from(ch.device_id.as_str());
        if ch.gone_reason.is_empty() {
            registry.register_channel(&id, &device, &ch.name, ch.last_used_ms);
            known += 1;
        } else {
            registry.channel_gone(&id, &device, &ch.gone_reason, ch.gone_at_ms);
        }
    }
    let shared = Arc::new(Shared::new(
        config,
        keys,
        registry,
        store,
        cluster,
        revocations,
        certificates,
    ));
    if let Some(cluster) = shared.cluster.clone() {
        // Every channel record, then every change any relay makes.
        let (loaded, count) = tokio::sync::oneshot::channel();
        let s = shared.clone();
        tasks.spawn("the cluster's channel watch", async move {
            if let Err(e) = cluster.follow_channels(&s.registry, loaded).await {
                warn!(error = %e, "cluster channel watch ended");
            }
        });
        known = tokio::time::timeout(Duration::from_secs(60), count)
            .await
            .map_err(|_| {
                crate::cluster::ClusterError::Nats("loading the channel records timed out".into())
            })?
            .map_err(|_| {
                crate::cluster::ClusterError::Nats("the channel watch ended while loading".into())
            })?;
    }
    info!(
        channels = known,
        cluster = shared.cluster.is_some(),
        "store opened"
    );
    let (stop, stop_rx) = watch::channel(false);
    tasks.spawn(
        "the QUIC accept loop",
        crate::quic::accept_loop(endpoint.clone(), shared.clone()),
    );
    let tcp_addr = match listeners.tcp {
        Some(l) => {
            let bind_err = |e| StartError::Bind {
                what: "devices (TCP)",
                addr: quic_addr,
                source: e,
            };
            l.set_nonblocking(true).map_err(bind_err)?;
            let l = tokio::net::TcpListener::from_std(l).map_err(bind_err)?;
            let addr = l.local_addr().map_err(bind_err)?;
            tasks.spawn(
                "the TCP device endpoint",
                crate::tcp::accept_loop(
                    l,
                    tokio_rustls::TlsAcceptor::from(tcp_tls),
                    shared.clone(),
                ),
            );
            Some(addr)
        }
        None => None,
    };
    tasks.spawn("the sweeper", sweep_loop(shared.clone()));
    let (grpc, health) = crate::grpc::server(listener, grpc_tls, shared.clone(), stop_rx)
        .await
        .map_err(StartError::Grpc)?;
    let grpc_task = tasks.spawn("the gRPC server", grpc);
    if let Some(cluster) = shared.cluster.clone() {
        tasks.spawn(
            "the cluster watch",
            cluster_watch(cluster, health.clone(), stop.subscribe()),
        );
    }
    let health_addr = match listeners.health {
        Some(l) => {
            l.set_nonblocking(true)
                .map_err(|e| bind_err("health (TCP)", grpc_addr, e))?;
            let l = tokio::net::TcpListener::from_std(l)
                .map_err(|e| bind_err("health (TCP)", grpc_addr, e))?;
            let addr = l
                .local_addr()
                .map_err(|e| bind_err("health (TCP)", grpc_addr, e))?;
            tasks.spawn(
                "the health endpoint",
                crate::grpc::health_server(l, health.clone(), stop.subscribe()),
            );
            Some(addr)
        }
        None => None,
    };
    let tcp_shown = tcp_addr.map_or("off".to_owned(), |a| a.to_string());
    info!(quic = %quic_addr, tcp = %tcp_shown, grpc = %grpc_addr, grpc_tls = shared.config.grpc_tls.is_some(), health = ?health_addr, probe = ?probe.as_ref().map(|p| p.0), data_dir = %shared.config.data_dir.display(), "relay started");
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
        tasks,
        probe: probe.map(|(addr, _)| addr),
        tcp_addr,
        grpc_task,
        health,
        health_addr,
    })
}

impl RelayHandle {
    /// Bound UDP address of the device endpoint.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// Bound TCP address of the device endpoint over TLS, if on.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
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

    /// Drains and stops the relay, within `drain_timeout`:
    /// 1. the health service reports NOT_SERVING, then `drain_delay` passes
    ///    (readiness probes and load balancers stop sending first);
    /// 2. no new device connection is accepted; every device gets a GoAway
    ///    telling it to come back after `reconnect_after` plus a share of a
    ///    window of `connected / shutdown_reconnect_rate` seconds (a restart
    ///    is not followed by every device at once);
    /// 3. connections finish (their acks are written), publishes in flight
    ///    are answered, the gRPC server stops;
    /// 4. the store commits everything it was given.
    ///
    /// Accepted events are durable all along: whatever the bound cuts off
    /// is only sent again.
    pub async fn shutdown(self, reconnect_after: Duration) {
        let config = &self.shared.config;
        #[allow(clippy::disallowed_methods)] // a deadline, read once
        let deadline = tokio::time::Instant::now() + config.drain_timeout;
        self.health.set_draining().await;
        info!(delay = ?config.drain_delay, "draining: health NOT_SERVING");
        // In a cluster, devices leave for the other relays.
        let peers = match &self.shared.cluster {
            Some(c) => {
                c.withdraw().await;
                c.peer_addresses().await
            }
            None => Vec::new(),
        };
        tokio::time::sleep(config.drain_delay).await;
        // From here the accept loops refuse new devices.
        self.shared
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let conns = self.shared.registry.all_connections();
        let window_ms =
            (conns.len() as u64).saturating_mul(1000) / u64::from(config.shutdown_reconnect_rate);
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
                alternatives: peers.clone(),
            }));
        }
        let left = tokio::time::timeout_at(deadline, async {
            while self
                .shared
                .connections
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if left.is_err() {
            warn!(
                left = self
                    .shared
                    .connections
                    .load(std::sync::atomic::Ordering::Relaxed),
                "device connections still open at the drain timeout"
            );
        }
        self.endpoint
            .close(ErrorCode::GoingAway.as_u32().into(), b"relay shutting down");
        let _ = self.stop.send(true);
        if tokio::time::timeout_at(deadline, self.grpc_task)
            .await
            .is_err()
        {
            warn!("publisher requests still running at the drain timeout");
        }
        if let Some(c) = &self.shared.cluster {
            if tokio::time::timeout_at(deadline, c.flush()).await.is_err() {
                warn!("NATS still flushing at the drain timeout");
            }
        }
        match tokio::time::timeout_at(deadline, self.shared.store.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "store flush failed"),
            Err(_) => warn!("store still committing at the drain timeout"),
        }
        self.tasks.abort_all();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        info!("relay stopped");
    }

    /// Re-reads every certificate (device endpoint, publisher API): new
    /// handshakes use the new ones, connections stay. (Also done when the
    /// files change.) What does not load is logged; the old one stays.
    pub fn reload_certificates(&self) {
        reload_certificates(&self.shared, true);
    }

    /// The certificate chain the device endpoint serves now.
    pub fn device_certificate(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        self.shared
            .certificates
            .first()
            .map(|c| c.chain())
            .unwrap_or_default()
    }

    /// Stops at once without telling devices (as a crash would, minus the
    /// process exit): for tests of reconnection.
    pub async fn abort(self) {
        self.endpoint
            .close(ErrorCode::Internal.as_u32().into(), b"relay aborted");
        let _ = self.stop.send(true);
        self.tasks.abort_all();
        let _ = self.grpc_task.await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    /// Bound TCP address of the plaintext health endpoint, if on.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// Bound UDP address of the probe service, if on.
    pub fn probe_addr(&self) -> Option<SocketAddr> {
        self.probe
    }

    /// Completes when a part of the relay (a front door's accept loop, the
    /// probe service, the metrics endpoint, the sweeper) has stopped on its
    /// own; its name. Then the relay should be shut down and restarted.
    pub async fn failed(&mut self) -> &'static str {
        match self.tasks.ended.recv().await {
            Some(name) => name,
            None => std::future::pending().await,
        }
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
        let now = clock::unix_ms();
        match shared.store.sweep(now).await {
            Ok(finished) if !finished.is_empty() => {
                tracing::debug!(finished = finished.len(), "swept");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "sweep failed"),
        }
        reload_certificates(&shared, false);
        match shared.revocations.reload() {
            Ok(true) => info!(
                revoked = shared.revocations.len(),
                "revocation list reloaded"
            ),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "cannot read the revocation list; keeping the last one"),
        }
        if n % 60 == 1 {
            expire_channels(&shared, now).await;
            shared.quotas.prune(clock::now());
        }
    }
}

/// Cluster mode: reports NOT_SERVING while NATS has been away too long,
/// and announces this relay to its peers every 10 s.
async fn cluster_watch(
    cluster: Arc<Cluster>,
    health: crate::grpc::Health,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let serving = cluster.serving();
        health.set_backend(serving).await;
        if n.is_multiple_of(20) && serving {
            if let Err(e) = cluster.announce().await {
                tracing::debug!(error = %e, "cluster announcement failed");
            }
            cluster.report_streams().await;
        }
        n += 1;
    }
}

/// Re-reads the certificates (all of them, or those whose files changed);
/// a pair that does not load is reported and the old one stays in service.
fn reload_certificates(shared: &Shared, all: bool) {
    for c in &shared.certificates {
        let r = if all {
            c.reload().map(|()| true)
        } else {
            c.reload_if_changed()
        };
        match r {
            Ok(true) => info!("certificate reloaded: new handshakes use it, connections stay"),
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "certificate not reloaded; the previous one stays in service")
            }
        }
    }
}

/// Channels whose device has not registered them for `channel_expiry` are
/// gone; gone channels are forgotten after `gone_retention`.
async fn expire_channels(shared: &Shared, now: u64) {
    let limit = u64::try_from(shared.config.channel_expiry.as_millis()).unwrap_or(u64::MAX);
    for id in shared.registry.stale_channels(now.saturating_sub(limit)) {
        let reason = format!(
            "expired: its device has not registered it for {} days",
            shared.config.channel_expiry.as_secs() / 86_400
        );
        let Some(device) = shared.registry.owner(&id) else {
            continue;
        };
        // In a cluster every relay sees the same records, so any of them
        // may expire a channel (the first write wins; the others repeat it).
        let done = match &shared.cluster {
            Some(c) => c
                .channel_gone(&id, &device, &reason, now)
                .await
                .map_err(|e| e.to_string()),
            None => shared
                .store
                .channel_gone(id.clone(), reason.clone(), now)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        match done {
            Ok(()) => shared.registry.channel_gone(&id, &device, &reason, now),
            Err(e) => warn!(error = %e, "channel expiry failed"),
        }
    }
    let keep = u64::try_from(shared.config.gone_retention.as_millis()).unwrap_or(u64::MAX);
    let before = now.saturating_sub(keep);
    let old = shared.registry.gone_before(before);
    if !old.is_empty() {
        let forgotten = match &shared.cluster {
            Some(c) => c.forget_channels(&old).await.map_err(|e| e.to_string()),
            None => shared
                .store
                .forget_channels(old.clone(), before)
                .await
                .map_err(|e| e.to_string()),
        };
        match forgotten {
            Ok(()) => {
                for id in &old {
                    shared.registry.forget_gone(id);
                }
                tracing::debug!(forgotten = old.len(), "gone channels forgotten");
            }
            Err(e) => warn!(error = %e, "forgetting gone channels failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_on_its_own_is_reported_by_name() {
        let mut tasks = Tasks::new();
        let (_keep, held) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn("the long one", async move {
            let _ = held.await;
        });
        tasks.spawn("the probe service", async {});
        assert_eq!(tasks.ended.recv().await, Some("the probe service"));
        tasks.abort_all();
    }
}
