//! The app-facing API: [`ClientBuilder`], [`Client`], channels, callbacks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;
use tokio::sync::{mpsc, oneshot};
use wakewire_proto::names::validate_channel_name;

use crate::config::{Config, Shared, StatusCallback};
use crate::driver::{self, Command, Sink};
use crate::error::{ClientClosed, ConnectError, RegisterError};
use crate::stream::{WakeStream, STREAM_BUFFER};
use crate::tls::{ClientAuth, Protection};
use crate::types::{ChannelId, ConnectionInfo, KeepalivePolicy, Status, WakeEvent};

/// Builds a [`Client`].
pub struct ClientBuilder {
    relay: String,
    server_name: Option<String>,
    trust_files: Vec<PathBuf>,
    trust_certs: Vec<CertificateDer<'static>>,
    token: Option<String>,
    client_auth: ClientAuth,
    min_protection: Protection,
    keepalive: KeepalivePolicy,
    keepalive_timeout: Duration,
    connect_timeout: Duration,
    backoff: (Duration, Duration),
    on_status: Option<StatusCallback>,
    endpoint: Option<quinn::Endpoint>,
    handshake_limit: Option<crate::limit::HandshakeLimit>,
    dedup_file: Option<PathBuf>,
    dedup_window: usize,
    network_id: String,
    network_memory: Option<PathBuf>,
    probe_addr: Option<SocketAddr>,
    transport: crate::transport::Transport,
    tcp_fallback_delay: Duration,
    quic_retry: Duration,
    proxy: Option<crate::transport::Proxy>,
    tcp_port: Option<u16>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("relay", &self.relay)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// A builder for the relay at `relay` (`host:port`). A cluster: several
    /// addresses separated by commas (`relay-1:4433,relay-2:4433`), or a
    /// name with several DNS records; each connection picks one at random,
    /// avoiding relays that were just lost or asked the device to leave. A
    /// name with both IPv6 and IPv4 addresses is raced (RFC 8305): IPv6
    /// first, IPv4 250 ms later.
    pub fn new(relay: impl Into<String>) -> Self {
        Self {
            relay: relay.into(),
            server_name: None,
            trust_files: vec![],
            trust_certs: vec![],
            token: None,
            client_auth: ClientAuth::None,
            min_protection: Protection::default(),
            keepalive: KeepalivePolicy::default(),
            keepalive_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            backoff: (Duration::from_secs(1), Duration::from_secs(60)),
            on_status: None,
            endpoint: None,
            handshake_limit: None,
            dedup_file: None,
            dedup_window: wakewire_proto::device_connection::DEFAULT_DEDUP_WINDOW,
            network_id: "default".into(),
            network_memory: None,
            probe_addr: None,
            transport: crate::transport::Transport::Auto,
            tcp_fallback_delay: Duration::from_millis(300),
            quic_retry: Duration::from_secs(300),
            proxy: None,
            tcp_port: None,
        }
    }

    /// Identity of the current network (an SSID hash, a carrier...), under
    /// which the adaptive keepalive remembers what it learned.
    pub fn network_id(mut self, id: impl Into<String>) -> Self {
        self.network_id = id.into();
        self
    }

    /// File where learned keepalive intervals are kept per network.
    pub fn network_memory(mut self, path: impl Into<PathBuf>) -> Self {
        self.network_memory = Some(path.into());
        self
    }

    /// Where to send binding-lifetime probes (default: the relay's host and
    /// the probe port it announces).
    pub fn probe_address(mut self, addr: SocketAddr) -> Self {
        self.probe_addr = Some(addr);
        self
    }

    /// Remembers the ids of handled events in this file (synced before each
    /// ack), so an event delivered again after the app restarts does not
    /// fire its callback twice. Without it the window lives in memory and
    /// covers reconnects only.
    pub fn dedup_store(mut self, path: impl Into<PathBuf>) -> Self {
        self.dedup_file = Some(path.into());
        self
    }

    /// How many handled event ids are remembered (default 4096).
    pub fn dedup_window(mut self, ids: usize) -> Self {
        self.dedup_window = ids;
        self
    }

    /// Uses this QUIC endpoint (UDP socket) instead of opening one. Many
    /// clients can share one endpoint: quinn multiplexes connections per
    /// socket (the load tester simulates fleets this way).
    pub fn endpoint(mut self, endpoint: quinn::Endpoint) -> Self {
        self.endpoint = Some(endpoint);
        self
    }

    /// Shares a bound on handshakes in flight with the other clients given
    /// a clone of `limit` (see [`crate::HandshakeLimit`]: for processes
    /// hosting many clients, so a reconnect storm does not overload them).
    pub fn handshake_limit(mut self, limit: crate::HandshakeLimit) -> Self {
        self.handshake_limit = Some(limit);
        self
    }

    /// Which transports to use (default [`Transport::Auto`]: QUIC, with TLS
    /// over TCP on the same host and port as the fallback where UDP does
    /// not get through).
    ///
    /// [`Transport::Auto`]: crate::Transport::Auto
    pub fn transport(mut self, transport: crate::transport::Transport) -> Self {
        self.transport = transport;
        self
    }

    /// In `Auto`, how long QUIC has to connect before TCP starts too
    /// (default 300 ms, RFC 8305's order of magnitude).
    pub fn tcp_fallback_delay(mut self, d: Duration) -> Self {
        self.tcp_fallback_delay = d;
        self
    }

    /// In `Auto`, while connected over TCP, how often QUIC is tried again
    /// (default 5 minutes); when it works the client moves back to it.
    pub fn quic_retry_interval(mut self, d: Duration) -> Self {
        self.quic_retry = d;
        self
    }

    /// Connects over TCP through this proxy (HTTP CONNECT or SOCKS5, with
    /// credentials): [`crate::Proxy::parse`], [`crate::Proxy::from_env`].
    /// QUIC does not go through proxies; with a proxy the client uses TCP
    /// only, unless `transport` says otherwise.
    pub fn proxy(mut self, proxy: crate::transport::Proxy) -> Self {
        self.proxy = Some(proxy);
        self
    }

    /// The relays' TCP port for TLS over TCP (default: the same port as
    /// QUIC; e.g. 443 where only HTTPS gets through).
    pub fn tcp_port(mut self, port: u16) -> Self {
        self.tcp_port = Some(port);
        self
    }

    /// TLS server name to verify (default: the host part of the address).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Trusts the CA or self-signed certificates in a PEM file (e.g. the
    /// relay's `dev-cert.pem`).
    pub fn trust_pem_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.trust_files.push(path.into());
        self
    }

    /// Trusts a DER certificate.
    pub fn trust_certificate(mut self, cert: CertificateDer<'static>) -> Self {
        self.trust_certs.push(cert);
        self
    }

    /// The device credential minted by the relay.
    pub fn device_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Presents a client certificate (PEM chain and key) in the TLS
    /// handshake, for relays that authenticate devices by certificate
    /// (`device_auth = certificate | either | both`). The certificate names
    /// the device with a `wakewire:device:<id>` SAN URI; with `certificate`
    /// or `either`, no device token is needed.
    pub fn client_certificate(
        mut self,
        cert_pem: impl Into<PathBuf>,
        key_pem: impl Into<PathBuf>,
    ) -> Self {
        self.client_auth = ClientAuth::Chain(cert_pem.into(), key_pem.into());
        self
    }

    /// Presents a client certificate whose key the SDK never holds (a
    /// hardware keystore): rustls asks `resolver` for the certificate and a
    /// signing key (`rustls::sign::SigningKey`) at each handshake.
    pub fn client_cert_resolver(
        mut self,
        resolver: Arc<dyn rustls::client::ResolvesClientCert>,
    ) -> Self {
        self.client_auth = ClientAuth::Resolver(resolver);
        self
    }

    /// Refuse connections that negotiate less than `min`. By default the
    /// SDK offers TLS13_AES_128_GCM_SHA256 first (the cheaper handshake on
    /// CPUs with SHA extensions); with [`Protection::Tls13Aes256`] it offers
    /// TLS13_AES_256_GCM_SHA384 first, and the relay follows that order.
    pub fn min_protection(mut self, min: Protection) -> Self {
        self.min_protection = min;
        self
    }

    /// Keepalive policy.
    pub fn keepalive(mut self, policy: KeepalivePolicy) -> Self {
        self.keepalive = policy;
        self
    }

    /// Drop the connection if a keepalive is not answered within this time.
    pub fn keepalive_timeout(mut self, d: Duration) -> Self {
        self.keepalive_timeout = d;
        self
    }

    /// Limit for one connection attempt (QUIC handshake and Welcome).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Reconnect backoff: first ceiling and cap (full jitter below them).
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = (initial, max);
        self
    }

    /// Called on every [`Status`] change, from the SDK's task: keep it short.
    pub fn on_status(mut self, cb: impl Fn(&Status) + Send + Sync + 'static) -> Self {
        self.on_status = Some(Arc::new(cb));
        self
    }

    /// Connects (one attempt; reconnects happen on their own afterwards).
    /// Must be called within a tokio runtime.
    pub async fn connect(self) -> Result<Client, ConnectError> {
        let token = match (self.token, self.client_auth.is_some()) {
            (Some(t), _) => t,
            // The certificate names the device; the relay decides whether
            // that is enough (its device_auth mode).
            (None, true) => String::new(),
            (None, false) => {
                return Err(ConnectError::Config(
                    "no device token: call device_token() (or client_certificate())".into(),
                ))
            }
        };
        let mut roots = RootCertStore::empty();
        for path in &self.trust_files {
            crate::tls::add_pem_roots(&mut roots, path)?;
        }
        for c in self.trust_certs {
            roots
                .add(c)
                .map_err(|e| ConnectError::Config(format!("bad certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ConnectError::Config(
                "no trusted certificates: call trust_pem_file() or trust_certificate()".into(),
            ));
        }
        let tls = crate::tls::client_config(&roots, &self.client_auth, self.min_protection)?;
        let config = Arc::new(Config {
            relay: self.relay,
            server_name: self.server_name,
            tls: tls.quic,
            suite_probe: tls.probe,
            tcp_tls: tls.tcp,
            transport: self.transport,
            tcp_fallback_delay: self.tcp_fallback_delay,
            quic_retry: self.quic_retry,
            proxy: self.proxy,
            tcp_port: self.tcp_port,
            token: std::sync::Mutex::new(token),
            min_protection: self.min_protection,
            keepalive: self.keepalive,
            keepalive_timeout: self.keepalive_timeout,
            connect_timeout: self.connect_timeout,
            backoff: self.backoff,
            on_status: self.on_status,
            endpoint: self.endpoint,
            handshake_limit: self.handshake_limit,
            dedup_file: self.dedup_file,
            dedup_window: self.dedup_window,
            network_id: self.network_id,
            network_memory: self.network_memory,
            probe_addr: self.probe_addr,
        });
        let shared = Arc::new(Shared::default());
        let cmd = driver::start(config.clone(), shared.clone()).await?;
        Ok(Client {
            shared,
            config,
            cmd,
        })
    }
}

/// Host part of `host:port` / `[v6]:port`.
pub(crate) fn host_of(addr: &str) -> String {
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => addr,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

/// A connected wakewire client. Cheap to clone; all clones share one
/// connection. The connection is closed by [`Client::close`] or when every
/// clone is dropped.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    config: Arc<Config>,
    cmd: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("relay", &self.config.relay)
            .field("closed", &self.cmd.is_closed())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts registering a channel named `name`.
    pub fn channel(&self, name: impl Into<String>) -> ChannelBuilder<'_> {
        ChannelBuilder {
            client: self,
            name: name.into(),
            on_wake: None,
        }
    }

    /// What the current connection negotiated; `None` while disconnected.
    pub fn info(&self) -> Option<ConnectionInfo> {
        self.shared.info.lock().ok().and_then(|i| i.clone())
    }

    /// Stops receiving wakes on a channel.
    pub async fn unregister(&self, channel_id: &ChannelId) -> Result<(), RegisterError> {
        let (reply, answer) = oneshot::channel();
        self.cmd
            .send(Command::Unregister {
                channel_id: channel_id.as_str().to_owned(),
                reply,
            })
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Standby (true) aligns periodic work with the keepalive so the radio
    /// wakes as rarely as possible; false runs periodic work on its own
    /// schedule.
    pub fn set_standby(&self, standby: bool) -> Result<(), ClientClosed> {
        self.send(Command::SetStandby(standby))
    }

    /// The app saw its own server time out: keep alive more often
    /// (ControlChannelTrigger's DecreaseNetworkKeepAliveInterval).
    pub fn decrease_keepalive(&self) -> Result<(), ClientClosed> {
        self.send(Command::DecreaseKeepalive)
    }

    /// Switches the keepalive policy (e.g. to a fixed interval).
    pub fn set_keepalive(&self, policy: KeepalivePolicy) -> Result<(), ClientClosed> {
        self.send(Command::SetKeepalive(policy))
    }

    /// The device moved to another network: the keepalive switches to what
    /// it learned there (or starts learning), and the connection moves to a
    /// new local socket (QUIC migration) instead of reconnecting.
    pub fn network_changed(&self, network_id: impl Into<String>) -> Result<(), ClientClosed> {
        self.send(Command::NetworkChanged(network_id.into()))
    }

    /// Runs `cb` every `period` (ControlChannelTrigger's KeepAliveTrigger
    /// for the app's own server). In standby it runs at the keepalive at or
    /// before its due time, never waking the radio on its own.
    pub fn add_periodic(
        &self,
        period: Duration,
        cb: impl Fn() + Send + Sync + 'static,
    ) -> Result<(), ClientClosed> {
        self.send(Command::AddPeriodic(period, Arc::new(cb)))
    }

    /// Replaces the device token for the next connections (renewal before
    /// the current one expires, or after a key rotation). The current
    /// connection stays up.
    pub fn set_device_token(&self, token: impl Into<String>) -> Result<(), ClientClosed> {
        if self.cmd.is_closed() {
            return Err(ClientClosed);
        }
        match self.config.token.lock() {
            Ok(mut t) => *t = token.into(),
            Err(_) => return Err(ClientClosed),
        }
        Ok(())
    }

    /// Whether the client has been closed (by [`Client::close`] or for
    /// good after an error that retrying cannot fix).
    pub fn is_closed(&self) -> bool {
        self.cmd.is_closed()
    }

    /// Closes the connection (flushing pending acks) and stops
    /// reconnecting. Closing a closed client does nothing.
    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.cmd.send(Command::Close { reply }).is_ok() {
            let _ = answer.await;
        }
    }

    fn send(&self, cmd: Command) -> Result<(), ClientClosed> {
        self.cmd.send(cmd).map_err(|_| ClientClosed)
    }
}

fn closed() -> RegisterError {
    RegisterError::Closed("the client is closed".into())
}

/// Registers one channel: `client.channel("mail").on_wake(cb).register()`.
pub struct ChannelBuilder<'a> {
    client: &'a Client,
    name: String,
    on_wake: Option<crate::config::WakeCallback>,
}

impl ChannelBuilder<'_> {
    /// The callback for this channel's wake events. It runs on the SDK's
    /// task, so keep it short (or use [`ChannelBuilder::subscribe`]); the
    /// event is acked when it returns, not if it panics.
    pub fn on_wake(mut self, cb: impl Fn(&WakeEvent) + Send + Sync + 'static) -> Self {
        self.on_wake = Some(Arc::new(cb));
        self
    }

    /// Registers the channel and returns its id, which is stable for this
    /// device and name. While disconnected, waits for the next connection.
    pub async fn register(self) -> Result<ChannelId, RegisterError> {
        let sink = Sink::Callback(self.on_wake.unwrap_or_else(|| Arc::new(|_: &WakeEvent| {})));
        Self::add(self.client, self.name, sink).await
    }

    /// Registers the channel and returns its id and a stream of its wakes,
    /// each acked by the app with [`crate::Wake::ack`] when it is done. The
    /// SDK's task never waits for the app: keepalives and other channels go
    /// on while a wake is being handled.
    pub async fn subscribe(self) -> Result<(ChannelId, WakeStream), RegisterError> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let id = Self::add(self.client, self.name, Sink::Stream(tx)).await?;
        Ok((id, WakeStream::new(rx)))
    }

    async fn add(client: &Client, name: String, sink: Sink) -> Result<ChannelId, RegisterError> {
        validate_channel_name(&name)?;
        let (reply, answer) = oneshot::channel();
        client
            .cmd
            .send(Command::Register { name, sink, reply })
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_taken_from_the_address() {
        assert_eq!(host_of("localhost:4433"), "localhost");
        assert_eq!(host_of("[::1]:4433"), "::1");
        assert_eq!(host_of("relay.example"), "relay.example");
    }

    #[tokio::test]
    async fn builder_refuses_missing_token_and_trust() {
        let e = ClientBuilder::new("localhost:1")
            .connect()
            .await
            .unwrap_err();
        assert!(
            matches!(e, ConnectError::Config(ref m) if m.contains("token")),
            "{e}"
        );
        let e = ClientBuilder::new("localhost:1")
            .device_token("t")
            .connect()
            .await
            .unwrap_err();
        assert!(
            matches!(e, ConnectError::Config(ref m) if m.contains("trusted")),
            "{e}"
        );
        let e = ClientBuilder::new("localhost:1")
            .device_token("t")
            .trust_pem_file("/nonexistent.pem")
            .connect()
            .await
            .unwrap_err();
        assert!(
            matches!(e, ConnectError::Config(ref m) if m.contains("nonexistent")),
            "{e}"
        );
    }
}
