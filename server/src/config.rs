//! Relay configuration: one [`Settings`] struct read from a TOML file, then
//! `WAKEWIRE_*` environment variables, then command-line flags (each layer
//! overrides the one before), and validated into a typed [`RelayConfig`] at
//! start. Unknown keys in any layer are errors, not silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use wakewire_proto::relay_connection::RelayConnectionConfig;
use wakewire_proto::relay_session::RelaySessionConfig;
use wakewire_proto::{DEFAULT_GRPC_PORT, DEFAULT_QUIC_PORT, MAX_FRAME_SIZE, MAX_PAYLOAD_SIZE};

/// Prefix of the environment variables that set [`Settings`] fields:
/// `WAKEWIRE_QUIC_LISTEN` sets `quic_listen`, and so on.
pub const ENV_PREFIX: &str = "WAKEWIRE_";

/// Everything an operator can set, as written in the config file. Field
/// names are the TOML keys; the env variable is `WAKEWIRE_` + the upper-case
/// name.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// UDP address of the device (QUIC) endpoint. `[::]` takes IPv4 and
    /// IPv6 (falling back to IPv4 only where the host has no IPv6).
    pub quic_listen: SocketAddr,
    /// TCP address of the device endpoint over TLS (the fallback for
    /// networks that block UDP; same frames, ALPN wakewire/1); empty or
    /// "off" = off. Behind a load balancer or with CAP_NET_BIND_SERVICE it
    /// can be 443, where restrictive networks still let TLS through.
    pub tcp_listen: String,
    /// TCP address of the publisher gRPC API. Without TLS it must be a
    /// loopback address (unless `grpc_insecure_plaintext_on_any_address`).
    pub grpc_listen: SocketAddr,
    /// PEM certificate chain of the publisher API (TLS); reloaded when the
    /// file changes and on SIGHUP.
    pub grpc_tls_cert: Option<PathBuf>,
    /// PEM private key matching `grpc_tls_cert`.
    pub grpc_tls_key: Option<PathBuf>,
    /// Serve the device endpoint's certificate (dev or `tls_cert`) on the
    /// publisher API too.
    pub grpc_tls_use_device_certificate: bool,
    /// PEM file of CAs whose client certificates backends must present on
    /// the publisher API (mTLS, besides their token); needs TLS.
    pub grpc_client_ca: Option<PathBuf>,
    /// Allow a plaintext publisher API on a non-loopback address (bearer
    /// tokens then cross the network in the clear).
    pub grpc_insecure_plaintext_on_any_address: bool,
    /// On shutdown, seconds between reporting NOT_SERVING (readiness) and
    /// telling devices to leave, so load balancers stop sending first.
    pub drain_delay_secs: u64,
    /// Longest a graceful shutdown may take, seconds; then the relay exits
    /// anyway (accepted events are durable; unacked ones are resent).
    pub drain_timeout_secs: u64,
    /// TCP address of the Prometheus metrics endpoint; empty = off.
    pub metrics_listen: String,
    /// TCP address of a plaintext endpoint serving only the gRPC health
    /// service (for `wakewire-relay health`, container health checks and
    /// Kubernetes gRPC probes, which cannot speak TLS); empty or "off" =
    /// off. It carries no secrets.
    pub health_listen: String,
    /// UDP address of the binding-lifetime probe service (devices learn
    /// their NAT timeout with it); empty or "off" = off.
    pub probe_listen: String,
    /// Directory for keys, the dev certificate and (later) the store.
    pub data_dir: PathBuf,
    /// PEM certificate chain for the device endpoint; unset = dev mode
    /// (self-signed certificate for `localhost` in the data directory).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key matching `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM file of the CAs that issue device client certificates (mTLS);
    /// unset = devices present no certificate.
    pub device_client_ca: Option<PathBuf>,
    /// How devices resume TLS sessions: `tickets` (stateless, sealed with a
    /// rotated key kept in the data directory: no memory per device, works
    /// after a restart, no 0-RTT) or `cache` (a server-side cache: 0-RTT
    /// Hello on reconnect, memory per device, empty after a restart).
    pub tls_resumption: String,
    /// Hours each TLS ticket key seals new tickets; tickets then resume for
    /// 1 to 2 times this long.
    pub tls_ticket_rotation_hours: u64,
    /// How devices prove who they are: `token` (a device token in Hello),
    /// `certificate` (a client certificate with a `wakewire:device:<id>`
    /// SAN URI), `either`, or `both` (naming the same device).
    pub device_auth: String,
    /// Most channels one device may register.
    pub max_channels_per_device: usize,
    /// Seconds a new connection has to send Hello.
    pub hello_timeout_secs: u64,
    /// Seconds of silence after which a device connection is closed.
    pub idle_timeout_secs: u64,
    /// Milliseconds a Publish waits for the device's ack before answering
    /// `SENT_UNACKED`.
    pub ack_wait_ms: u64,
    /// Largest TTL a publisher may ask for, in seconds.
    pub max_ttl_secs: u32,
    /// TTL of events published without one, in seconds.
    pub default_ttl_secs: u32,
    /// Most device connections at once; more are refused (the device backs
    /// off and retries).
    pub max_connections: usize,
    /// Most QUIC handshakes in progress at once; more are refused, which
    /// keeps a reconnect storm from exhausting the relay.
    pub max_pending_handshakes: usize,
    /// On shutdown, devices are told to come back spread over
    /// `connected / shutdown_reconnect_rate` seconds.
    pub shutdown_reconnect_rate: u32,
    /// Requested UDP socket buffer size (bytes) for receive and send.
    pub udp_buffer_bytes: usize,
    /// Most queued (undelivered) events per channel; when full, the oldest
    /// event without a collapse key is dropped.
    pub queue_limit: usize,
    /// Longest a normal-priority event is held to share a radio wake with
    /// other traffic, in milliseconds.
    pub normal_max_delay_ms: u64,
    /// How long delivered, expired and dropped events stay queryable with
    /// GetEvent, in seconds.
    pub status_retention_secs: u64,
    /// A channel whose device has not registered it for this many days is
    /// gone (publishing to it is NOT_FOUND).
    pub channel_expiry_days: u64,
    /// Commit concurrent publishes together (one fsync per batch). Turn off
    /// only to measure the difference.
    pub store_group_commit: bool,
    /// Microseconds a small batch of publishes waits for more to share its
    /// fsync (0 = commit at once). The device gets its wake meanwhile; only
    /// the Publish answer waits.
    pub store_commit_delay_us: u64,
    /// Most wakes one connection tracks at once (sent or waiting, not
    /// acked); more stay queued and follow as acks come in.
    pub max_in_flight_per_connection: usize,
    /// Hours a Publish idempotency key is remembered.
    pub idempotency_retention_hours: u64,
    /// Days a gone channel is remembered (publishing to it says why it is
    /// gone); after that it is forgotten.
    pub gone_retention_days: u64,
    /// Most TCP connections to the publisher API at once; more are closed
    /// as soon as they are accepted.
    pub grpc_max_connections: usize,
    /// Most concurrent HTTP/2 streams per publisher connection.
    pub grpc_max_streams_per_connection: u32,
    /// Most publisher requests being handled at once, over all
    /// connections; more are answered RESOURCE_EXHAUSTED.
    pub grpc_max_in_flight: usize,
    /// Longest a publisher request may take before it is answered
    /// CANCELLED (streams: until the stream starts).
    pub grpc_request_timeout_secs: u64,
    /// A publisher connection that sends nothing for this long (not even an
    /// HTTP/2 ping answer) is closed.
    pub grpc_idle_timeout_secs: u64,
    /// Publishes per second per publisher token (events of a batch count
    /// one each); more are RESOURCE_EXHAUSTED with a retry delay.
    pub publisher_rate_per_sec: u32,
    /// Publishes a publisher token may send at once above its rate.
    pub publisher_burst: u32,
    /// Concurrent WatchDeliveries streams per publisher token.
    pub publisher_max_watchers: u32,
    /// Bytes of payload and keys a publisher token may have queued in the
    /// store at once.
    pub publisher_max_stored_bytes: u64,
    /// Handshakes in progress beyond which new ones must first prove their
    /// address with a QUIC Retry (0 = always).
    pub retry_threshold: usize,
    /// Most handshakes in progress from one /24 (IPv4) or /64 (IPv6).
    pub max_pending_handshakes_per_prefix: usize,
    /// Longest a QUIC handshake may take, seconds (shorter than the Hello
    /// timeout).
    pub handshake_timeout_secs: u64,
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info,wakewire_server=debug`.
    pub log: String,
    /// Log line format: `text` (for people) or `json` (one object per line,
    /// for log collectors).
    pub log_format: String,
    /// Cluster mode: NATS server URLs, comma-separated (`nats://a:4222,
    /// nats://b:4222`); empty = a single node on the embedded store. All
    /// relays of a cluster share one data directory's keys
    /// (docs/cluster.md).
    pub cluster_nats_urls: String,
    /// NATS credentials file (`.creds`: JWT and NKey seed).
    pub cluster_nats_credentials: Option<PathBuf>,
    /// NATS user (with `cluster_nats_password`).
    pub cluster_nats_user: Option<String>,
    /// NATS password (prefer the WAKEWIRE_CLUSTER_NATS_PASSWORD variable).
    pub cluster_nats_password: Option<String>,
    /// NATS token.
    pub cluster_nats_token: Option<String>,
    /// PEM CA file of the NATS servers' certificates; set = TLS required.
    pub cluster_nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate for NATS (mTLS).
    pub cluster_nats_tls_cert: Option<PathBuf>,
    /// PEM private key of `cluster_nats_tls_cert`.
    pub cluster_nats_tls_key: Option<PathBuf>,
    /// Cluster name: prefix of its JetStream streams, buckets and subjects
    /// (lower-case letters, digits, `_`); relays with the same name and
    /// NATS form one cluster.
    pub cluster_name: String,
    /// JetStream replicas of the cluster's streams and buckets (1, 3 or
    /// 5; at most the number of NATS servers).
    pub cluster_replicas: usize,
    /// NATS unreachable for this many seconds: health NOT_SERVING.
    /// Publishes are refused UNAVAILABLE as soon as a write fails.
    pub cluster_unavailable_after_secs: u64,
    /// Longest wait for a JetStream answer, milliseconds.
    pub cluster_request_timeout_ms: u64,
    /// The `host:port` devices reach this relay at, announced to the other
    /// relays: a draining relay sends its devices to its peers.
    pub cluster_advertise: String,
    /// Seconds between heartbeats of each connected device's queue
    /// consumer; one lost with its NATS node is replaced after two missed.
    /// Shorter: faster recovery, more idle messages (one per device per
    /// interval).
    pub cluster_consumer_heartbeat_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            quic_listen: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, DEFAULT_QUIC_PORT)),
            tcp_listen: format!("[::]:{DEFAULT_QUIC_PORT}"),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_GRPC_PORT)),
            grpc_tls_cert: None,
            grpc_tls_key: None,
            grpc_tls_use_device_certificate: false,
            grpc_client_ca: None,
            grpc_insecure_plaintext_on_any_address: false,
            drain_delay_secs: 5,
            drain_timeout_secs: 30,
            metrics_listen: "127.0.0.1:9464".into(),
            health_listen: "127.0.0.1:50052".into(),
            probe_listen: "0.0.0.0:4434".into(),
            data_dir: PathBuf::from("wakewire-data"),
            tls_cert: None,
            tls_key: None,
            device_client_ca: None,
            tls_resumption: "tickets".into(),
            tls_ticket_rotation_hours: 12,
            device_auth: "token".into(),
            max_channels_per_device: 64,
            hello_timeout_secs: 10,
            idle_timeout_secs: 660,
            ack_wait_ms: 5_000,
            max_ttl_secs: 28 * 24 * 3600,
            default_ttl_secs: 28 * 24 * 3600,
            max_connections: 1_000_000,
            max_pending_handshakes: 1024,
            shutdown_reconnect_rate: 2000,
            udp_buffer_bytes: 8 * 1024 * 1024,
            queue_limit: 100,
            normal_max_delay_ms: 60_000,
            status_retention_secs: 86_400,
            channel_expiry_days: 30,
            store_group_commit: true,
            store_commit_delay_us: 2_000,
            max_in_flight_per_connection: 4096,
            idempotency_retention_hours: 24,
            gone_retention_days: 30,
            grpc_max_connections: 4096,
            grpc_max_streams_per_connection: 128,
            grpc_max_in_flight: 1024,
            grpc_request_timeout_secs: 30,
            grpc_idle_timeout_secs: 120,
            publisher_rate_per_sec: 20_000,
            publisher_burst: 40_000,
            publisher_max_watchers: 16,
            publisher_max_stored_bytes: 1 << 30,
            retry_threshold: 256,
            max_pending_handshakes_per_prefix: 256,
            handshake_timeout_secs: 5,
            log: "info".into(),
            log_format: "text".into(),
            cluster_nats_urls: String::new(),
            cluster_nats_credentials: None,
            cluster_nats_user: None,
            cluster_nats_password: None,
            cluster_nats_token: None,
            cluster_nats_tls_ca: None,
            cluster_nats_tls_cert: None,
            cluster_nats_tls_key: None,
            cluster_name: "wakewire".into(),
            cluster_replicas: 3,
            cluster_unavailable_after_secs: 5,
            cluster_request_timeout_ms: 2_000,
            cluster_advertise: String::new(),
            cluster_consumer_heartbeat_secs: 5,
        }
    }
}

/// A configuration that cannot be used. The message names the setting.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// File path.
        path: PathBuf,
        /// I/O error.
        source: std::io::Error,
    },
    /// The config file or the environment has a bad or unknown key.
    #[error("invalid configuration ({origin}): {message}")]
    Parse {
        /// "config file <path>" or "environment".
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A setting has a value that cannot work.
    #[error("invalid setting {setting}: {message}")]
    Invalid {
        /// Setting name.
        setting: &'static str,
        /// Why.
        message: String,
    },
}

impl Settings {
    /// Layers a TOML file (if given) and the `WAKEWIRE_*` variables among
    /// `env` over the defaults. `env` is passed in so tests need no
    /// `set_var`; the binary passes `std::env::vars()`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                        path: path.to_owned(),
                        source,
                    })?;
                toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::Parse {
                    origin: format!("config file {}", path.display()),
                    message: e.to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        let origin = file.map_or("defaults".to_owned(), |p| {
            format!("config file {}", p.display())
        });
        // Check the file alone first so its errors name the file.
        toml::Value::Table(table.clone())
            .try_into::<Settings>()
            .map_err(|e| ConfigError::Parse {
                origin,
                message: e.to_string(),
            })?;
        for (key, value) in env {
            let Some(name) = key.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let name = name.to_ascii_lowercase();
            let value = match (value.parse::<i64>(), value.as_str()) {
                (Ok(n), _) => toml::Value::Integer(n),
                (_, "true") => toml::Value::Boolean(true),
                (_, "false") => toml::Value::Boolean(false),
                _ => toml::Value::String(value),
            };
            table.insert(name, value);
        }
        toml::Value::Table(table)
            .try_into::<Settings>()
            .map_err(|e| ConfigError::Parse {
                origin: "environment (WAKEWIRE_* variables)".into(),
                message: e.to_string(),
            })
    }

    /// The settings as TOML (every key, in declaration order).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Parse {
            origin: "settings".into(),
            message: e.to_string(),
        })
    }

    /// Every setting's key (unset optional ones included).
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(Settings::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => vec![],
        }
    }

    /// Checks every setting and builds the typed configuration.
    pub fn validate(&self) -> Result<RelayConfig, ConfigError> {
        let invalid = |setting, message: &str| ConfigError::Invalid {
            setting,
            message: message.to_owned(),
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (None, None) => TlsSource::Dev,
            (Some(cert), Some(key)) => {
                for (setting, p) in [("tls_cert", cert), ("tls_key", key)] {
                    if !p.is_file() {
                        return Err(invalid(
                            setting,
                            &format!("{} is not a readable file", p.display()),
                        ));
                    }
                }
                TlsSource::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                }
            }
            _ => {
                return Err(invalid(
                    "tls_cert",
                    "tls_cert and tls_key must be set together",
                ))
            }
        };
        let resumption = match self.tls_resumption.trim() {
            "tickets" => Resumption::Tickets {
                rotation: Duration::from_secs(self.tls_ticket_rotation_hours.saturating_mul(3600)),
            },
            "cache" => Resumption::Cache,
            other => {
                return Err(invalid(
                    "tls_resumption",
                    &format!("{other:?} is not one of tickets, cache"),
                ))
            }
        };
        if self.store_commit_delay_us > 100_000 {
            return Err(invalid(
                "store_commit_delay_us",
                "must be at most 100000 (100 ms): every Publish answer waits for it",
            ));
        }
        if !(1..=168).contains(&self.tls_ticket_rotation_hours) {
            return Err(invalid(
                "tls_ticket_rotation_hours",
                "must be 1 to 168 (tickets then resume for at most 2 weeks)",
            ));
        }
        let device_auth = match self.device_auth.trim() {
            "token" => DeviceAuth::Token,
            "certificate" => DeviceAuth::Certificate,
            "either" => DeviceAuth::Either,
            "both" => DeviceAuth::Both,
            other => {
                return Err(invalid(
                    "device_auth",
                    &format!("{other:?} is not one of token, certificate, either, both"),
                ))
            }
        };
        if let Some(ca) = &self.device_client_ca {
            if !ca.is_file() {
                return Err(invalid(
                    "device_client_ca",
                    &format!("{} is not a readable file", ca.display()),
                ));
            }
        } else if device_auth != DeviceAuth::Token {
            return Err(invalid(
                "device_auth",
                "certificate, either and both need device_client_ca",
            ));
        }
        let grpc_tls = match (
            &self.grpc_tls_cert,
            &self.grpc_tls_key,
            self.grpc_tls_use_device_certificate,
        ) {
            (None, None, false) => None,
            (None, None, true) => Some(GrpcTls::DeviceCertificate),
            (Some(cert), Some(key), false) => {
                for (setting, p) in [("grpc_tls_cert", cert), ("grpc_tls_key", key)] {
                    if !p.is_file() {
                        return Err(invalid(
                            setting,
                            &format!("{} is not a readable file", p.display()),
                        ));
                    }
                }
                Some(GrpcTls::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                })
            }
            (Some(_), Some(_), true) => {
                return Err(invalid(
                    "grpc_tls_use_device_certificate",
                    "set either it or grpc_tls_cert/grpc_tls_key, not both",
                ))
            }
            _ => {
                return Err(invalid(
                    "grpc_tls_cert",
                    "grpc_tls_cert and grpc_tls_key must be set together",
                ))
            }
        };
        if grpc_tls.is_none()
            && !self.grpc_listen.ip().is_loopback()
            && !self.grpc_insecure_plaintext_on_any_address
        {
            return Err(invalid(
                "grpc_listen",
                &format!(
                    "{} is not a loopback address and the publisher API has no TLS: bearer tokens would cross the network in the clear. Set grpc_tls_cert/grpc_tls_key (or grpc_tls_use_device_certificate), or grpc_insecure_plaintext_on_any_address = true",
                    self.grpc_listen
                ),
            ));
        }
        if let Some(ca) = &self.grpc_client_ca {
            if grpc_tls.is_none() {
                return Err(invalid("grpc_client_ca", "needs TLS on the publisher API"));
            }
            if !ca.is_file() {
                return Err(invalid(
                    "grpc_client_ca",
                    &format!("{} is not a readable file", ca.display()),
                ));
            }
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(invalid("log_format", "must be text or json"));
        }
        if self.drain_timeout_secs == 0 {
            return Err(invalid("drain_timeout_secs", "must be at least 1"));
        }
        if self.drain_delay_secs >= self.drain_timeout_secs {
            return Err(invalid(
                "drain_delay_secs",
                "must be shorter than drain_timeout_secs",
            ));
        }
        let metrics_listen = match self.metrics_listen.trim() {
            "" | "off" => None,
            s => Some(s.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "metrics_listen",
                    &format!("{s:?} is not an address like 127.0.0.1:9464 ({e})"),
                )
            })?),
        };
        let tcp_listen = match self.tcp_listen.trim() {
            "" | "off" => None,
            s => Some(s.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "tcp_listen",
                    &format!("{s:?} is not an address like [::]:4433 ({e})"),
                )
            })?),
        };
        let health_listen = match self.health_listen.trim() {
            "" | "off" => None,
            s => Some(s.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "health_listen",
                    &format!("{s:?} is not an address like 127.0.0.1:50052 ({e})"),
                )
            })?),
        };
        let probe_listen = match self.probe_listen.trim() {
            "" | "off" => None,
            s => Some(s.parse::<SocketAddr>().map_err(|e| {
                invalid(
                    "probe_listen",
                    &format!("{s:?} is not an address like 0.0.0.0:4434 ({e})"),
                )
            })?),
        };
        if self.max_channels_per_device == 0 || self.max_channels_per_device > 10_000 {
            return Err(invalid(
                "max_channels_per_device",
                "must be between 1 and 10000",
            ));
        }
        if self.hello_timeout_secs == 0 {
            return Err(invalid("hello_timeout_secs", "must be at least 1"));
        }
        if !(10..=86_400).contains(&self.idle_timeout_secs) {
            return Err(invalid("idle_timeout_secs", "must be between 10 and 86400"));
        }
        if self.ack_wait_ms > 60_000 {
            return Err(invalid("ack_wait_ms", "must be at most 60000"));
        }
        if self.default_ttl_secs > self.max_ttl_secs {
            return Err(invalid("default_ttl_secs", "must not exceed max_ttl_secs"));
        }
        if self.max_connections == 0 || self.max_pending_handshakes == 0 {
            return Err(invalid(
                "max_connections",
                "max_connections and max_pending_handshakes must be at least 1",
            ));
        }
        if !(1..=100_000).contains(&self.queue_limit) {
            return Err(invalid("queue_limit", "must be between 1 and 100000"));
        }
        if self.normal_max_delay_ms > 3_600_000 {
            return Err(invalid(
                "normal_max_delay_ms",
                "must be at most 3600000 (1 h)",
            ));
        }
        if self.channel_expiry_days == 0 {
            return Err(invalid("channel_expiry_days", "must be at least 1"));
        }
        if self.shutdown_reconnect_rate == 0 {
            return Err(invalid("shutdown_reconnect_rate", "must be at least 1"));
        }
        if !(1..=1_000_000).contains(&self.max_in_flight_per_connection) {
            return Err(invalid(
                "max_in_flight_per_connection",
                "must be between 1 and 1000000",
            ));
        }
        if !(1..=24 * 365).contains(&self.idempotency_retention_hours) {
            return Err(invalid(
                "idempotency_retention_hours",
                "must be between 1 and 8760",
            ));
        }
        if !(1..=3650).contains(&self.gone_retention_days) {
            return Err(invalid("gone_retention_days", "must be between 1 and 3650"));
        }
        for (setting, v) in [
            ("grpc_max_connections", self.grpc_max_connections as u64),
            (
                "grpc_max_streams_per_connection",
                u64::from(self.grpc_max_streams_per_connection),
            ),
            ("grpc_max_in_flight", self.grpc_max_in_flight as u64),
            ("grpc_request_timeout_secs", self.grpc_request_timeout_secs),
            ("grpc_idle_timeout_secs", self.grpc_idle_timeout_secs),
            (
                "publisher_rate_per_sec",
                u64::from(self.publisher_rate_per_sec),
            ),
            (
                "publisher_max_watchers",
                u64::from(self.publisher_max_watchers),
            ),
            (
                "publisher_max_stored_bytes",
                self.publisher_max_stored_bytes,
            ),
            (
                "max_pending_handshakes_per_prefix",
                self.max_pending_handshakes_per_prefix as u64,
            ),
            ("handshake_timeout_secs", self.handshake_timeout_secs),
        ] {
            if v == 0 {
                return Err(invalid(setting, "must be at least 1"));
            }
        }
        if self.publisher_burst < self.publisher_rate_per_sec {
            return Err(invalid(
                "publisher_burst",
                "must be at least publisher_rate_per_sec",
            ));
        }
        if self.handshake_timeout_secs > self.hello_timeout_secs {
            return Err(invalid(
                "handshake_timeout_secs",
                "must not exceed hello_timeout_secs",
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let cluster = self.cluster_config()?;
        Ok(RelayConfig {
            cluster,
            quic_listen: self.quic_listen,
            tcp_listen,
            grpc_listen: self.grpc_listen,
            grpc_tls,
            grpc_client_ca: self.grpc_client_ca.clone(),
            drain_delay: Duration::from_secs(self.drain_delay_secs),
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            metrics_listen,
            health_listen,
            probe_listen,
            data_dir: self.data_dir.clone(),
            tls,
            device_client_ca: self.device_client_ca.clone(),
            resumption,
            device_auth,
            connection: RelayConnectionConfig {
                session: RelaySessionConfig {
                    max_frame_size: MAX_FRAME_SIZE,
                    max_payload_size: MAX_PAYLOAD_SIZE,
                    max_channels: self.max_channels_per_device,
                    hello_timeout: Duration::from_secs(self.hello_timeout_secs),
                    idle_timeout: Duration::from_secs(self.idle_timeout_secs),
                    probe_port: 0,
                    ..RelaySessionConfig::default()
                },
                max_in_flight: self.max_in_flight_per_connection,
                normal_max_delay: Duration::from_millis(self.normal_max_delay_ms),
                ..RelayConnectionConfig::default()
            },
            ack_wait: Duration::from_millis(self.ack_wait_ms),
            max_ttl_secs: self.max_ttl_secs,
            default_ttl_secs: self.default_ttl_secs,
            max_connections: self.max_connections,
            max_pending_handshakes: self.max_pending_handshakes,
            shutdown_reconnect_rate: self.shutdown_reconnect_rate,
            udp_buffer_bytes: self.udp_buffer_bytes,
            store: crate::store::StoreConfig {
                queue_limit: self.queue_limit,
                status_retention: Duration::from_secs(self.status_retention_secs),
                idempotency_retention: Duration::from_secs(
                    self.idempotency_retention_hours.saturating_mul(3600),
                ),
                group_commit: self.store_group_commit,
                commit_delay: Duration::from_micros(self.store_commit_delay_us),
                max_bytes_per_publisher: self.publisher_max_stored_bytes,
            },
            channel_expiry: Duration::from_secs(self.channel_expiry_days.saturating_mul(86_400)),
            gone_retention: Duration::from_secs(self.gone_retention_days.saturating_mul(86_400)),
            grpc: GrpcLimits {
                max_connections: self.grpc_max_connections,
                max_streams_per_connection: self.grpc_max_streams_per_connection,
                max_in_flight: self.grpc_max_in_flight,
                request_timeout: Duration::from_secs(self.grpc_request_timeout_secs),
                idle_timeout: Duration::from_secs(self.grpc_idle_timeout_secs),
            },
            quotas: crate::quota::QuotaConfig {
                rate_per_sec: self.publisher_rate_per_sec,
                burst: self.publisher_burst,
                max_watchers: self.publisher_max_watchers,
                max_stored_bytes: self.publisher_max_stored_bytes,
            },
            admission: Admission {
                retry_threshold: self.retry_threshold,
                max_pending_per_prefix: self.max_pending_handshakes_per_prefix,
                handshake_timeout: Duration::from_secs(self.handshake_timeout_secs),
            },
        })
    }
}

/// Where the publisher API's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcTls {
    /// The device endpoint's certificate (dev or files).
    DeviceCertificate,
    /// Its own files.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
}

/// How devices resume TLS sessions (`tls_resumption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumption {
    /// Stateless tickets, keys rotated this often ([`crate::tickets`]).
    Tickets {
        /// How long each key seals new tickets.
        rotation: Duration,
    },
    /// A server-side session cache (0-RTT).
    Cache,
}

/// How devices prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceAuth {
    /// A device token in Hello.
    Token,
    /// A client certificate naming the device (the token is not needed).
    Certificate,
    /// Either of them (the certificate wins when both are present; they
    /// must then name the same device).
    Either,
    /// Both, naming the same device.
    Both,
}

/// Where the device endpoint's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// Self-signed `localhost` certificate generated into the data directory.
    Dev,
    /// Operator-provided PEM files.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
}

/// Validated relay configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Cluster mode (NATS JetStream), if configured.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// UDP address of the device endpoint (port 0 = any free port).
    pub quic_listen: SocketAddr,
    /// TCP address of the device endpoint over TLS, if on.
    pub tcp_listen: Option<SocketAddr>,
    /// TCP address of the gRPC API (port 0 = any free port).
    pub grpc_listen: SocketAddr,
    /// TLS of the publisher API, if any.
    pub grpc_tls: Option<GrpcTls>,
    /// CAs of backends' client certificates on the publisher API.
    pub grpc_client_ca: Option<PathBuf>,
    /// Readiness-to-GoAway delay of a graceful shutdown.
    pub drain_delay: Duration,
    /// Bound of a graceful shutdown.
    pub drain_timeout: Duration,
    /// Prometheus endpoint, if any.
    pub metrics_listen: Option<SocketAddr>,
    /// Plaintext health-only endpoint, if any.
    pub health_listen: Option<SocketAddr>,
    /// Probe service, if any.
    pub probe_listen: Option<SocketAddr>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Certificate source.
    pub tls: TlsSource,
    /// CAs of device client certificates, if any.
    pub device_client_ca: Option<PathBuf>,
    /// How devices resume TLS sessions.
    pub resumption: Resumption,
    /// How devices authenticate.
    pub device_auth: DeviceAuth,
    /// Per-connection limits and timers (session, delivery).
    pub connection: RelayConnectionConfig,
    /// How long Publish waits for an ack.
    pub ack_wait: Duration,
    /// Largest TTL accepted.
    pub max_ttl_secs: u32,
    /// TTL when none is given.
    pub default_ttl_secs: u32,
    /// Connection limit.
    pub max_connections: usize,
    /// Concurrent handshake limit.
    pub max_pending_handshakes: usize,
    /// Reconnect spreading rate on shutdown (devices per second).
    pub shutdown_reconnect_rate: u32,
    /// UDP socket buffer request.
    pub udp_buffer_bytes: usize,
    /// Store settings.
    pub store: crate::store::StoreConfig,
    /// Channel expiry after its last registration.
    pub channel_expiry: Duration,
    /// How long gone channels are remembered.
    pub gone_retention: Duration,
    /// Limits of the publisher API's transport.
    pub grpc: GrpcLimits,
    /// Per-publisher rate limits and quotas.
    pub quotas: crate::quota::QuotaConfig,
    /// Handshake admission of the device endpoint.
    pub admission: Admission,
}

/// Limits of the publisher API's transport.
#[derive(Debug, Clone)]
pub struct GrpcLimits {
    /// TCP connections at once.
    pub max_connections: usize,
    /// HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// Requests being handled at once, all connections.
    pub max_in_flight: usize,
    /// Deadline of a request.
    pub request_timeout: Duration,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
}

/// Handshake admission of the device endpoint.
#[derive(Debug, Clone)]
pub struct Admission {
    /// Pending handshakes beyond which a Retry is required first.
    pub retry_threshold: usize,
    /// Pending handshakes per /24 or /64.
    pub max_pending_per_prefix: usize,
    /// Deadline of a QUIC handshake.
    pub handshake_timeout: Duration,
}

impl RelayConfig {
    /// A configuration for tests and embedding: loopback, ephemeral ports,
    /// dev TLS in `data_dir`, no metrics endpoint.
    pub fn local(data_dir: impl Into<PathBuf>) -> Self {
        let mut s = Settings {
            quic_listen: "127.0.0.1:0"
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: String::new(),
            health_listen: "127.0.0.1:0".into(),
            probe_listen: "127.0.0.1:0".into(),
            tcp_listen: "127.0.0.1:0".into(),
            drain_delay_secs: 0,
            ..Settings::default()
        };
        s.data_dir = data_dir.into();
        s.validate()
            .unwrap_or_else(|e| unreachable!("local defaults are valid: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Settings::default().validate().unwrap();
        assert_eq!(c.quic_listen.port(), 4433);
        assert_eq!(c.grpc_listen.port(), 50051);
        assert_eq!(c.tls, TlsSource::Dev);
    }

    #[test]
    fn env_overrides_file_and_other_vars_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "ack_wait_ms = 100\nquic_listen = \"127.0.0.1:1\"\n").unwrap();
        let s = Settings::load(
            Some(&file),
            env(&[
                ("WAKEWIRE_QUIC_LISTEN", "127.0.0.1:2"),
                ("WAKEWIRE_MAX_CHANNELS_PER_DEVICE", "7"),
                ("WAKEWIRE_STORE_GROUP_COMMIT", "false"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(s.ack_wait_ms, 100);
        assert_eq!(s.quic_listen.port(), 2);
        assert_eq!(s.max_channels_per_device, 7);
        assert!(!s.store_group_commit);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        let err = Settings::load(None, env(&[("WAKEWIRE_QUIC_LISTN", "x")])).unwrap_err();
        assert!(err.to_string().contains("quic_listn"), "{err}");
        let err = Settings::load(None, env(&[("WAKEWIRE_QUIC_LISTEN", "nowhere")])).unwrap_err();
        assert!(err.to_string().contains("environment"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        std::fs::write(&file, "colour = \"blue\"\n").unwrap();
        let err = Settings::load(Some(&file), env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("relay.toml") && err.to_string().contains("colour"),
            "{err}"
        );
        assert!(matches!(
            Settings::load(Some(&dir.path().join("missing.toml")), env(&[])),
            Err(ConfigError::ReadFile { .. })
        ));
    }

    #[test]
    fn validation_names_the_setting() {
        let cases: Vec<(Settings, &str)> = vec![
            (
                Settings {
                    tls_resumption: "sometimes".into(),
                    ..Settings::default()
                },
                "tls_resumption",
            ),
            (
                Settings {
                    tls_ticket_rotation_hours: 0,
                    ..Settings::default()
                },
                "tls_ticket_rotation_hours",
            ),
            (
                Settings {
                    store_commit_delay_us: 1_000_000,
                    ..Settings::default()
                },
                "store_commit_delay_us",
            ),
            (
                Settings {
                    tls_cert: Some("/nope.pem".into()),
                    ..Settings::default()
                },
                "tls_cert",
            ),
            (
                Settings {
                    tls_cert: Some("/nope".into()),
                    tls_key: Some("/nope".into()),
                    ..Settings::default()
                },
                "tls_cert",
            ),
            (
                Settings {
                    metrics_listen: "here".into(),
                    ..Settings::default()
                },
                "metrics_listen",
            ),
            (
                Settings {
                    idle_timeout_secs: 1,
                    ..Settings::default()
                },
                "idle_timeout_secs",
            ),
            (
                Settings {
                    max_channels_per_device: 0,
                    ..Settings::default()
                },
                "max_channels_per_device",
            ),
            (
                Settings {
                    queue_limit: 0,
                    ..Settings::default()
                },
                "queue_limit",
            ),
            (
                Settings {
                    channel_expiry_days: 0,
                    ..Settings::default()
                },
                "channel_expiry_days",
            ),
            (
                Settings {
                    normal_max_delay_ms: u64::MAX,
                    ..Settings::default()
                },
                "normal_max_delay_ms",
            ),
            (
                Settings {
                    max_pending_handshakes: 0,
                    ..Settings::default()
                },
                "max_connections",
            ),
            (
                Settings {
                    default_ttl_secs: 10,
                    max_ttl_secs: 5,
                    ..Settings::default()
                },
                "default_ttl_secs",
            ),
        ];
        for (s, setting) in cases {
            let err = s.validate().unwrap_err();
            assert!(err.to_string().contains(setting), "{err} / {setting}");
        }
        let off = Settings {
            metrics_listen: "off".into(),
            ..Settings::default()
        };
        assert_eq!(off.validate().unwrap().metrics_listen, None);
    }

    fn repo_file(path: &str) -> String {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn every_setting_is_in_the_sample_file_and_the_docs() {
        let sample = repo_file("deploy/wakewire.toml");
        let docs = repo_file("docs/configuration.md");
        let keys = Settings::keys();
        assert!(keys.len() > 40, "{keys:?}");
        for key in &keys {
            assert!(
                sample.contains(&format!("{key} =")),
                "{key} is missing from deploy/wakewire.toml"
            );
            assert!(
                docs.contains(&format!("`{key}`")),
                "{key} is missing from docs/configuration.md"
            );
        }
        // The sample is valid as it is, with its defaults.
        let parsed: Settings = toml::from_str(&sample).unwrap();
        assert_eq!(parsed, Settings::default());
    }
}
