//! `wakewire-relay serve`: settings from file, env and flags; run until
//! SIGINT or SIGTERM, then drain (a second signal exits at once); SIGHUP
//! reloads the certificates.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tokio::signal::unix::{signal, SignalKind};
use wakewire_server::{Listeners, Settings};

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// TOML config file (keys as the flags below, with underscores).
    #[arg(long)]
    config: Option<PathBuf>,
    /// UDP address for devices (QUIC) [env: WAKEWIRE_QUIC_LISTEN] [default: [::]:4433, IPv4 and IPv6]
    #[arg(long)]
    quic_listen: Option<std::net::SocketAddr>,
    /// TCP address of the device endpoint over TLS (fallback for networks blocking UDP), or "off" [env: WAKEWIRE_TCP_LISTEN] [default: [::]:4433]
    #[arg(long)]
    tcp_listen: Option<String>,
    /// TCP address of the publisher gRPC API; without TLS only loopback [env: WAKEWIRE_GRPC_LISTEN] [default: 127.0.0.1:50051]
    #[arg(long)]
    grpc_listen: Option<std::net::SocketAddr>,
    /// PEM certificate chain of the publisher API (TLS) [env: WAKEWIRE_GRPC_TLS_CERT]
    #[arg(long, requires = "grpc_tls_key")]
    grpc_tls_cert: Option<PathBuf>,
    /// PEM private key for --grpc-tls-cert [env: WAKEWIRE_GRPC_TLS_KEY]
    #[arg(long, requires = "grpc_tls_cert")]
    grpc_tls_key: Option<PathBuf>,
    /// Serve the device endpoint's certificate on the publisher API too [env: WAKEWIRE_GRPC_TLS_USE_DEVICE_CERTIFICATE]
    #[arg(long)]
    grpc_tls_use_device_certificate: Option<bool>,
    /// PEM file of CAs backends' client certificates must come from (mTLS) [env: WAKEWIRE_GRPC_CLIENT_CA]
    #[arg(long)]
    grpc_client_ca: Option<PathBuf>,
    /// Allow a plaintext publisher API beyond loopback [env: WAKEWIRE_GRPC_INSECURE_PLAINTEXT_ON_ANY_ADDRESS] [default: false]
    #[arg(long)]
    grpc_insecure_plaintext_on_any_address: Option<bool>,
    /// Seconds between NOT_SERVING and telling devices to leave, on shutdown [env: WAKEWIRE_DRAIN_DELAY_SECS] [default: 5]
    #[arg(long)]
    drain_delay_secs: Option<u64>,
    /// Longest graceful shutdown, seconds [env: WAKEWIRE_DRAIN_TIMEOUT_SECS] [default: 30]
    #[arg(long)]
    drain_timeout_secs: Option<u64>,
    /// Log format: text or json [env: WAKEWIRE_LOG_FORMAT] [default: text]
    #[arg(long)]
    log_format: Option<String>,
    /// TCP address of the Prometheus /metrics endpoint, or "off" [env: WAKEWIRE_METRICS_LISTEN] [default: 127.0.0.1:9464]
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Directory for keys and the dev certificate [env: WAKEWIRE_DATA_DIR] [default: ./wakewire-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// PEM certificate chain; without it a self-signed localhost certificate is generated (dev mode) [env: WAKEWIRE_TLS_CERT]
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert [env: WAKEWIRE_TLS_KEY]
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM file of the CAs issuing device client certificates [env: WAKEWIRE_DEVICE_CLIENT_CA]
    #[arg(long)]
    device_client_ca: Option<PathBuf>,
    /// How devices authenticate: token, certificate, either, both [env: WAKEWIRE_DEVICE_AUTH] [default: token]
    #[arg(long)]
    device_auth: Option<String>,
    /// TLS resumption: tickets (stateless, survive restarts, no 0-RTT) or cache (0-RTT, memory per device) [env: WAKEWIRE_TLS_RESUMPTION] [default: tickets]
    #[arg(long)]
    tls_resumption: Option<String>,
    /// Hours each TLS ticket key seals new tickets [env: WAKEWIRE_TLS_TICKET_ROTATION_HOURS] [default: 12]
    #[arg(long)]
    tls_ticket_rotation_hours: Option<u64>,
    /// Most channels per device [env: WAKEWIRE_MAX_CHANNELS_PER_DEVICE] [default: 64]
    #[arg(long)]
    max_channels_per_device: Option<usize>,
    /// Seconds a connection has to send Hello [env: WAKEWIRE_HELLO_TIMEOUT_SECS] [default: 10]
    #[arg(long)]
    hello_timeout_secs: Option<u64>,
    /// Seconds of silence before a device connection is dropped [env: WAKEWIRE_IDLE_TIMEOUT_SECS] [default: 660]
    #[arg(long)]
    idle_timeout_secs: Option<u64>,
    /// Milliseconds Publish waits for the device's ack [env: WAKEWIRE_ACK_WAIT_MS] [default: 5000]
    #[arg(long)]
    ack_wait_ms: Option<u64>,
    /// Largest TTL accepted, seconds [env: WAKEWIRE_MAX_TTL_SECS] [default: 2419200 = 4 weeks]
    #[arg(long)]
    max_ttl_secs: Option<u32>,
    /// TTL of events published without one, seconds [env: WAKEWIRE_DEFAULT_TTL_SECS] [default: 2419200]
    #[arg(long)]
    default_ttl_secs: Option<u32>,
    /// TCP address of the plaintext health endpoint, or "off" [env: WAKEWIRE_HEALTH_LISTEN] [default: 127.0.0.1:50052]
    #[arg(long)]
    health_listen: Option<String>,
    /// UDP address of the NAT binding-lifetime probe service, or "off" [env: WAKEWIRE_PROBE_LISTEN] [default: 0.0.0.0:4434]
    #[arg(long)]
    probe_listen: Option<String>,
    /// Most device connections at once [env: WAKEWIRE_MAX_CONNECTIONS] [default: 1000000]
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most handshakes in progress; more are refused and retried by devices [env: WAKEWIRE_MAX_PENDING_HANDSHAKES] [default: 1024]
    #[arg(long)]
    max_pending_handshakes: Option<usize>,
    /// Devices per second to spread reconnects over after a shutdown [env: WAKEWIRE_SHUTDOWN_RECONNECT_RATE] [default: 1000]
    #[arg(long)]
    shutdown_reconnect_rate: Option<u32>,
    /// UDP socket buffer size to request, bytes [env: WAKEWIRE_UDP_BUFFER_BYTES] [default: 8388608]
    #[arg(long)]
    udp_buffer_bytes: Option<usize>,
    /// Most queued events per channel [env: WAKEWIRE_QUEUE_LIMIT] [default: 100]
    #[arg(long)]
    queue_limit: Option<usize>,
    /// Longest hold of a normal-priority event, ms [env: WAKEWIRE_NORMAL_MAX_DELAY_MS] [default: 60000]
    #[arg(long)]
    normal_max_delay_ms: Option<u64>,
    /// How long finished events stay queryable, s [env: WAKEWIRE_STATUS_RETENTION_SECS] [default: 86400]
    #[arg(long)]
    status_retention_secs: Option<u64>,
    /// Days after which a channel its device no longer registers is gone [env: WAKEWIRE_CHANNEL_EXPIRY_DAYS] [default: 30]
    #[arg(long)]
    channel_expiry_days: Option<u64>,
    /// Group commit of concurrent publishes: true or false [env: WAKEWIRE_STORE_GROUP_COMMIT] [default: true]
    #[arg(long)]
    store_group_commit: Option<bool>,
    /// Microseconds a small batch of publishes waits for more to share its fsync [env: WAKEWIRE_STORE_COMMIT_DELAY_US] [default: 2000]
    #[arg(long)]
    store_commit_delay_us: Option<u64>,
    /// Most wakes one connection tracks at once [env: WAKEWIRE_MAX_IN_FLIGHT_PER_CONNECTION] [default: 4096]
    #[arg(long)]
    max_in_flight_per_connection: Option<usize>,
    /// Hours a Publish idempotency key is remembered [env: WAKEWIRE_IDEMPOTENCY_RETENTION_HOURS] [default: 24]
    #[arg(long)]
    idempotency_retention_hours: Option<u64>,
    /// Days a gone channel is remembered [env: WAKEWIRE_GONE_RETENTION_DAYS] [default: 30]
    #[arg(long)]
    gone_retention_days: Option<u64>,
    /// Most TCP connections to the publisher API [env: WAKEWIRE_GRPC_MAX_CONNECTIONS] [default: 4096]
    #[arg(long)]
    grpc_max_connections: Option<usize>,
    /// Most HTTP/2 streams per publisher connection [env: WAKEWIRE_GRPC_MAX_STREAMS_PER_CONNECTION] [default: 128]
    #[arg(long)]
    grpc_max_streams_per_connection: Option<u32>,
    /// Most publisher requests handled at once [env: WAKEWIRE_GRPC_MAX_IN_FLIGHT] [default: 1024]
    #[arg(long)]
    grpc_max_in_flight: Option<usize>,
    /// Deadline of a publisher request, s [env: WAKEWIRE_GRPC_REQUEST_TIMEOUT_SECS] [default: 30]
    #[arg(long)]
    grpc_request_timeout_secs: Option<u64>,
    /// Silent publisher connections are closed after this, s [env: WAKEWIRE_GRPC_IDLE_TIMEOUT_SECS] [default: 120]
    #[arg(long)]
    grpc_idle_timeout_secs: Option<u64>,
    /// Publishes per second per publisher token [env: WAKEWIRE_PUBLISHER_RATE_PER_SEC] [default: 20000]
    #[arg(long)]
    publisher_rate_per_sec: Option<u32>,
    /// Publish burst per publisher token [env: WAKEWIRE_PUBLISHER_BURST] [default: 40000]
    #[arg(long)]
    publisher_burst: Option<u32>,
    /// WatchDeliveries streams per publisher token [env: WAKEWIRE_PUBLISHER_MAX_WATCHERS] [default: 16]
    #[arg(long)]
    publisher_max_watchers: Option<u32>,
    /// Bytes queued per publisher token [env: WAKEWIRE_PUBLISHER_MAX_STORED_BYTES] [default: 1073741824]
    #[arg(long)]
    publisher_max_stored_bytes: Option<u64>,
    /// Pending handshakes beyond which a QUIC Retry is required [env: WAKEWIRE_RETRY_THRESHOLD] [default: 256]
    #[arg(long)]
    retry_threshold: Option<usize>,
    /// Pending handshakes per /24 or /64 [env: WAKEWIRE_MAX_PENDING_HANDSHAKES_PER_PREFIX] [default: 256]
    #[arg(long)]
    max_pending_handshakes_per_prefix: Option<usize>,
    /// Deadline of a QUIC handshake, s [env: WAKEWIRE_HANDSHAKE_TIMEOUT_SECS] [default: 5]
    #[arg(long)]
    handshake_timeout_secs: Option<u64>,
    /// Log filter, e.g. "info" or "info,wakewire_server=debug" [env: WAKEWIRE_LOG] [default: info]
    #[arg(long)]
    log: Option<String>,
    /// Cluster mode: NATS URLs, comma-separated; unset = one node on the embedded store [env: WAKEWIRE_CLUSTER_NATS_URLS]
    #[arg(long)]
    cluster_nats_urls: Option<String>,
    /// NATS .creds file [env: WAKEWIRE_CLUSTER_NATS_CREDENTIALS]
    #[arg(long)]
    cluster_nats_credentials: Option<PathBuf>,
    /// PEM CA of the NATS servers (TLS required) [env: WAKEWIRE_CLUSTER_NATS_TLS_CA]
    #[arg(long)]
    cluster_nats_tls_ca: Option<PathBuf>,
    /// Cluster name: prefix of its streams and subjects [env: WAKEWIRE_CLUSTER_NAME] [default: wakewire]
    #[arg(long)]
    cluster_name: Option<String>,
    /// JetStream replicas: 1, 3 or 5 [env: WAKEWIRE_CLUSTER_REPLICAS] [default: 3]
    #[arg(long)]
    cluster_replicas: Option<usize>,
    /// Seconds without NATS before health says NOT_SERVING [env: WAKEWIRE_CLUSTER_UNAVAILABLE_AFTER_SECS] [default: 5]
    #[arg(long)]
    cluster_unavailable_after_secs: Option<u64>,
    /// host:port devices reach this relay at, told to devices of a draining peer [env: WAKEWIRE_CLUSTER_ADVERTISE]
    #[arg(long)]
    cluster_advertise: Option<String>,
    /// Seconds between heartbeats of each device's queue consumer [env: WAKEWIRE_CLUSTER_CONSUMER_HEARTBEAT_SECS] [default: 5]
    #[arg(long)]
    cluster_consumer_heartbeat_secs: Option<u64>,
}

impl ServeArgs {
    pub(crate) fn settings(
        &self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Settings> {
        let mut s = Settings::load(self.config.as_deref(), env)?;
        macro_rules! set {
            ($($f:ident),*) => {$( if let Some(v) = &self.$f { s.$f = v.clone(); } )*};
        }
        set!(
            tls_resumption,
            tls_ticket_rotation_hours,
            probe_listen,
            max_connections,
            max_pending_handshakes,
            shutdown_reconnect_rate,
            udp_buffer_bytes,
            queue_limit,
            normal_max_delay_ms,
            status_retention_secs,
            channel_expiry_days,
            store_group_commit,
            store_commit_delay_us,
            quic_listen,
            grpc_listen,
            metrics_listen,
            data_dir,
            max_channels_per_device,
            hello_timeout_secs,
            idle_timeout_secs,
            ack_wait_ms,
            max_ttl_secs,
            default_ttl_secs,
            max_in_flight_per_connection,
            idempotency_retention_hours,
            gone_retention_days,
            grpc_max_connections,
            grpc_max_streams_per_connection,
            grpc_max_in_flight,
            grpc_request_timeout_secs,
            grpc_idle_timeout_secs,
            publisher_rate_per_sec,
            publisher_burst,
            publisher_max_watchers,
            publisher_max_stored_bytes,
            retry_threshold,
            max_pending_handshakes_per_prefix,
            handshake_timeout_secs,
            grpc_tls_use_device_certificate,
            grpc_insecure_plaintext_on_any_address,
            drain_delay_secs,
            drain_timeout_secs,
            log_format,
            health_listen,
            tcp_listen,
            log,
            cluster_nats_urls,
            cluster_name,
            cluster_replicas,
            cluster_unavailable_after_secs,
            cluster_advertise,
            cluster_consumer_heartbeat_secs
        );
        if self.cluster_nats_credentials.is_some() {
            s.cluster_nats_credentials = self.cluster_nats_credentials.clone();
        }
        if self.cluster_nats_tls_ca.is_some() {
            s.cluster_nats_tls_ca = self.cluster_nats_tls_ca.clone();
        }
        if self.grpc_tls_cert.is_some() {
            s.grpc_tls_cert = self.grpc_tls_cert.clone();
            s.grpc_tls_key = self.grpc_tls_key.clone();
        }
        if self.grpc_client_ca.is_some() {
            s.grpc_client_ca = self.grpc_client_ca.clone();
        }
        if self.device_client_ca.is_some() {
            s.device_client_ca = self.device_client_ca.clone();
        }
        if let Some(a) = &self.device_auth {
            s.device_auth = a.clone();
        }
        if self.tls_cert.is_some() {
            s.tls_cert = self.tls_cert.clone();
            s.tls_key = self.tls_key.clone();
        }
        Ok(s)
    }
}

/// Validates the settings (file, environment, flags) without starting;
/// prints them, effective, as TOML.
pub(crate) fn check_config(args: &ServeArgs) -> anyhow::Result<()> {
    let settings = args.settings(std::env::vars())?;
    settings.validate()?;
    print!("{}", settings.to_toml()?);
    eprintln!("configuration is valid");
    Ok(())
}

pub(crate) async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let settings = args.settings(std::env::vars())?;
    crate::init_logs(&settings.log, &settings.log_format)?;
    let config = settings.validate()?;
    let listeners = Listeners::bind(&config)?;
    let mut relay = wakewire_server::start_on(config, listeners).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let failed = loop {
        tokio::select! {
            _ = term.recv() => break None,
            _ = int.recv() => break None,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading certificates");
                relay.reload_certificates();
            }
            name = relay.failed() => break Some(name),
        }
    };
    if let Some(name) = failed {
        tracing::error!(part = name, "stopped unexpectedly; shutting down");
    }
    // A second SIGTERM or SIGINT exits at once (accepted events are
    // durable; what was in flight is sent again after the restart).
    let drain = relay.shutdown(Duration::from_secs(1));
    tokio::select! {
        () = drain => {}
        _ = term.recv() => {
            tracing::warn!("second signal: exiting without finishing the drain");
            std::process::exit(2);
        }
        _ = int.recv() => {
            tracing::warn!("second signal: exiting without finishing the drain");
            std::process::exit(2);
        }
    }
    match failed {
        None => Ok(()),
        Some(name) => Err(wakewire_server::StartError::Stopped(name).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(clap::Subcommand)]
    enum Cmd {
        Serve(ServeArgs),
    }

    #[test]
    fn flags_override_env_which_overrides_defaults() {
        let args = Cli::parse_from(["wakewire-relay", "serve", "--ack-wait-ms", "7"]);
        let Cmd::Serve(serve) = args.cmd;
        let s = serve
            .settings([
                ("WAKEWIRE_ACK_WAIT_MS".to_string(), "3".to_string()),
                ("WAKEWIRE_LOG".into(), "debug".into()),
            ])
            .unwrap();
        assert_eq!(s.ack_wait_ms, 7);
        assert_eq!(s.log, "debug");
    }
}
