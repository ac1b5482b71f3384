//! What the SDK's driver needs to (re)connect, built once by the
//! [`crate::ClientBuilder`], and what it publishes for the app to read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::tls::Protection;
use crate::types::{ConnectionInfo, KeepalivePolicy, Status, WakeEvent};

pub(crate) type WakeCallback = Arc<dyn Fn(&WakeEvent) + Send + Sync>;
pub(crate) type PeriodicCallback = Arc<dyn Fn() + Send + Sync>;
pub(crate) type StatusCallback = Arc<dyn Fn(&Status) + Send + Sync>;

/// Everything the driver needs to (re)connect.
pub(crate) struct Config {
    /// The relays as the app named them (`host:port`, or several).
    pub(crate) relay: String,
    /// TLS server name; `None`: the host part of the chosen relay's address.
    pub(crate) server_name: Option<String>,
    /// QUIC/TLS client config, built once: reconnects reuse it (and its TLS
    /// session cache, so they resume instead of verifying the certificate
    /// again). Attempts are sequential, so one suite probe serves them all.
    pub(crate) tls: quinn::ClientConfig,
    pub(crate) suite_probe: Arc<crate::tls::SuiteProbe>,
    /// TLS over TCP (the fallback transport).
    pub(crate) tcp_tls: Arc<rustls::ClientConfig>,
    /// Which transports to use.
    pub(crate) transport: crate::transport::Transport,
    /// In `Auto`, how long QUIC has before TCP starts too.
    pub(crate) tcp_fallback_delay: Duration,
    /// On TCP in `Auto`, how often QUIC is tried again.
    pub(crate) quic_retry: Duration,
    /// Proxy for TCP connections.
    pub(crate) proxy: Option<crate::transport::Proxy>,
    /// TCP port of the relays (default: their QUIC port).
    pub(crate) tcp_port: Option<u16>,
    /// The device credential; replaced by `Client::set_device_token`.
    pub(crate) token: Mutex<String>,
    pub(crate) min_protection: Protection,
    pub(crate) keepalive: KeepalivePolicy,
    pub(crate) keepalive_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) backoff: (Duration, Duration),
    pub(crate) on_status: Option<StatusCallback>,
    pub(crate) endpoint: Option<quinn::Endpoint>,
    /// Attempts in flight shared with other clients of this process.
    pub(crate) handshake_limit: Option<crate::limit::HandshakeLimit>,
    pub(crate) dedup_file: Option<PathBuf>,
    pub(crate) dedup_window: usize,
    pub(crate) network_id: String,
    pub(crate) network_memory: Option<PathBuf>,
    pub(crate) probe_addr: Option<SocketAddr>,
}

/// State the driver publishes for the app to read.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) info: Mutex<Option<ConnectionInfo>>,
}
