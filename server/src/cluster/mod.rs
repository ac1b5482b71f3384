//! Cluster mode: several relays share one NATS JetStream (docs/cluster.md).
//!
//! The embedded store keeps a single node's state; a cluster keeps it in
//! JetStream instead, replicated by NATS (R3 on three NATS nodes), and
//! lets JetStream's own features do the work where they fit:
//!
//! | single node (redb) | cluster (JetStream) |
//! |---|---|
//! | channel queue, `queue_limit` | a subject per channel in the events stream, at most `queue_limit` messages (discard-new per subject; the publishing relay then drops the oldest itself, so it can give it a receipt) |
//! | collapse key | a subject per collapse key, written with a rollup and a compare-and-set on its last sequence |
//! | TTL | checked at delivery; the stream's max age (the largest TTL) removes the rest |
//! | idempotency keys | the stream's deduplication window (`Nats-Msg-Id`) plus ids derived from the key |
//! | final states (receipts, GetEvent) | the status stream, one subject per event, kept for the status retention |
//! | channel table | a key-value bucket, watched by every relay |
//!
//! Routing: the relay holding a device reads the device's subjects with an
//! ordered push consumer (one per connection), so an event accepted by any
//! relay reaches it, and an offline device's queue waits in the stream for
//! whichever relay it comes back to. No relay subscribes to devices it does
//! not hold. A publish is answered OK only after JetStream acknowledged the
//! replicated write.
//!
//! `core` holds the decisions (sans-IO); `events` and `device` drive them.

pub mod core;
mod device;
mod events;
pub mod naming;
mod publisher;
mod settings;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use thiserror::Error;
use tracing::{info, warn};

pub(crate) use device::{link_device, DeviceLink};
pub use events::{LiveOutcome, StoredIn};

use crate::state::clock;
use core::NatsHealth;
use naming::Names;

/// How a relay authenticates to NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials.
    None,
    /// A `.creds` file (JWT and NKey seed).
    CredsFile(PathBuf),
    /// User and password.
    UserPassword(String, String),
    /// A token.
    Token(String),
}

/// Typed cluster settings (from the `cluster_*` settings).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS server URLs (any of them; the client learns the others).
    pub nats_urls: Vec<String>,
    /// Credentials.
    pub auth: NatsAuth,
    /// PEM CA file for NATS servers' certificates (TLS required when set).
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for NATS (mTLS).
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Cluster name: prefix of streams, buckets and subjects.
    pub name: String,
    /// JetStream replicas of every stream and bucket.
    pub replicas: usize,
    /// NATS unreachable for longer than this: health NOT_SERVING.
    pub unavailable_after: Duration,
    /// Longest wait for a JetStream answer.
    pub request_timeout: Duration,
    /// The address devices reach this relay at, announced to its peers (a
    /// draining relay points its devices at the others').
    pub advertise: Option<String>,
    /// Heartbeat of each connected device's queue consumer: a consumer lost
    /// with its NATS node is noticed after two missed ones (its events wait
    /// in the stream meanwhile). Each costs one message per interval per
    /// idle device.
    pub consumer_heartbeat: Duration,
}

/// What the cluster keeps, sized from the relay's store settings.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Most queued events per channel.
    pub queue_limit: usize,
    /// How long receipts stay queryable.
    pub status_retention: Duration,
    /// JetStream deduplication window of keyed publishes.
    pub idempotency_retention: Duration,
    /// Largest TTL: the events stream's max age.
    pub max_ttl: Duration,
}

/// A cluster operation failed. Nothing was answered OK for it.
#[derive(Debug, Clone, Error)]
pub enum ClusterError {
    /// The relay could not connect to NATS at start.
    #[error("cannot connect to NATS at {urls}: {message}")]
    Connect {
        /// The URLs tried.
        urls: String,
        /// Why.
        message: String,
    },
    /// A stream or bucket could not be created or updated at start.
    #[error("cannot set up JetStream {what}: {message}")]
    Setup {
        /// Which stream or bucket.
        what: String,
        /// Why.
        message: String,
    },
    /// A NATS request failed or timed out (NATS unreachable, no quorum):
    /// retrying later may help.
    #[error("NATS: {0}")]
    Nats(String),
    /// Too many concurrent writers to one channel queue; retry.
    #[error("channel queue contended by concurrent publishes: the event was not stored")]
    Contended,
    /// Not connected to NATS now: nothing was sent.
    #[error("not connected to NATS: the event was not stored")]
    Disconnected,
    /// A write was sent but JetStream did not confirm it in time (a NATS
    /// node lost, an election): it may or may not be stored.
    #[error("JetStream did not confirm the write in time: the event may or may not be stored")]
    Unconfirmed,
    /// A record in JetStream could not be decoded.
    #[error("corrupt record in {what}: {message}")]
    Corrupt {
        /// Where.
        what: &'static str,
        /// Decoder error.
        message: String,
    },
}

impl ClusterError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            ClusterError::Corrupt { .. } | ClusterError::Setup { .. }
        )
    }
}

pub(crate) fn nats_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Nats(e.to_string())
}

/// A relay's connection to its cluster. Cheap to share (`Arc`).
pub struct Cluster {
    pub(crate) names: Names,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) events: stream::Stream<()>,
    pub(crate) status: stream::Stream<()>,
    pub(crate) channels: kv::Store,
    relays: kv::Store,
    health: Arc<Mutex<NatsHealth>>,
    /// Counts NATS reconnections (device links read their queues again).
    reconnected: tokio::sync::watch::Sender<u64>,
    /// This relay's id in the cluster (takeovers, announcements).
    pub(crate) relay_id: String,
    pub(crate) config: ClusterConfig,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("relay_id", &self.relay_id)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects to NATS and creates (or updates) the streams and buckets.
    pub async fn connect(
        config: ClusterConfig,
        retention: &Retention,
        key: ring::hmac::Key,
    ) -> Result<Arc<Self>, ClusterError> {
        let urls = config.nats_urls.join(",");
        let connect_err = |message: String| ClusterError::Connect {
            urls: urls.clone(),
            message,
        };
        let relay_id = relay_id();
        let health = Arc::new(Mutex::new(NatsHealth::new(config.unavailable_after)));
        let events_health = health.clone();
        let (reconnected, _) = tokio::sync::watch::channel(0u64);
        let on_reconnect = reconnected.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("wakewire-relay {relay_id}"))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(config.request_timeout))
            // Undelivered wakes wait in subscriptions: never drop them for
            // a slow consumer silently (the ordered consumer recovers).
            .subscription_capacity(65_536)
            .event_callback(move |event| {
                let health = events_health.clone();
                let on_reconnect = on_reconnect.clone();
                async move {
                    let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
                    match event {
                        async_nats::Event::Connected => {
                            info!("NATS connected");
                            h.handle_connected();
                            metrics::gauge!(crate::metrics::NATS_CONNECTED).set(1.0);
                            on_reconnect.send_modify(|n| *n += 1);
                        }
                        async_nats::Event::Disconnected => {
                            warn!("NATS disconnected; reconnecting");
                            h.handle_disconnected(clock::now());
                            metrics::gauge!(crate::metrics::NATS_CONNECTED).set(0.0);
                        }
                        other => info!(event = %other, "NATS"),
                    }
                }
            });
        options = match &config.auth {
            NatsAuth::None => options,
            NatsAuth::CredsFile(p) => options
                .credentials_file(p)
                .await
                .map_err(|e| connect_err(format!("credentials file {}: {e}", p.display())))?,
            NatsAuth::UserPassword(u, p) => options.user_and_password(u.clone(), p.clone()),
            NatsAuth::Token(t) => options.token(t.clone()),
        };
        if let Some(ca) = &config.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some((cert, key)) = &config.tls_client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let client = options
            .connect(config.nats_urls.clone())
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let names = Names::new(&config.name, key);
        // A NATS cluster that is still forming (all nodes starting together,
        // a leader being elected) refuses stream placement for a while:
        // wait for it, within a bound, rather than exit.
        let give_up = clock::now() + SETUP_PATIENCE;
        let (events, status, channels, relays) = loop {
            match set_up(&js, &names, retention, &config).await {
                Ok(v) => break v,
                Err(e) if clock::now() < give_up => {
                    warn!(error = %e, "JetStream is not ready yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        };
        info!(%relay_id, nats = %urls, replicas = config.replicas, "cluster mode: JetStream streams and buckets ready");
        metrics::gauge!(crate::metrics::NATS_CONNECTED).set(1.0);
        Ok(Arc::new(Self {
            names,
            client,
            js,
            events,
            status,
            channels,
            relays,
            health,
            reconnected,
            relay_id,
            config,
        }))
    }

    /// Whether the relay should report SERVING (NATS reachable, or away
    /// for less than `unavailable_after`).
    pub fn serving(&self) -> bool {
        self.health
            .lock()
            .map(|h| h.serving(clock::now()))
            .unwrap_or(false)
    }

    /// Changes each time the NATS connection comes back.
    pub(crate) fn reconnects(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reconnected.subscribe()
    }

    /// This relay's id in the cluster.
    pub fn relay_id(&self) -> &str {
        &self.relay_id
    }

    /// Announces this relay (with its device address, if advertised) for
    /// 30 s; called every 10 s.
    pub(crate) async fn announce(&self) -> Result<(), ClusterError> {
        let value = self.config.advertise.clone().unwrap_or_default();
        self.relays
            .put(&self.relay_id, value.into())
            .await
            .map(|_| ())
            .map_err(nats_err)
    }

    /// The device addresses its live peers advertise (not this relay's).
    pub(crate) async fn peer_addresses(&self) -> Vec<String> {
        use tokio_stream::StreamExt;
        let mut out = Vec::new();
        let Ok(mut keys) = self.relays.keys().await else {
            return out;
        };
        while let Some(Ok(k)) = keys.next().await {
            if k == self.relay_id {
                continue;
            }
            if let Ok(Some(v)) = self.relays.get(&k).await {
                if let Ok(addr) = String::from_utf8(v.to_vec()) {
                    if !addr.is_empty() {
                        out.push(addr);
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Updates the stream size gauges (the cluster's backlog).
    pub(crate) async fn report_streams(&self) {
        for (label, stream) in [("events", &self.events), ("status", &self.status)] {
            if let Ok(info) = stream.get_info().await {
                metrics::gauge!(crate::metrics::CLUSTER_STREAM_MESSAGES, "stream" => label)
                    .set(info.state.messages as f64);
            }
        }
    }

    /// Removes this relay's announcement (on drain).
    pub(crate) async fn withdraw(&self) {
        let _ = self.relays.delete(&self.relay_id).await;
    }

    /// Waits until what this relay published has reached NATS.
    pub(crate) async fn flush(&self) -> Result<(), ClusterError> {
        self.client.flush().await.map_err(nats_err)
    }
}

/// How long a relay waits at start for JetStream to accept its streams.
const SETUP_PATIENCE: Duration = Duration::from_secs(60);

/// Creates (or updates) the streams and buckets the relay needs.
async fn set_up(
    js: &jetstream::Context,
    names: &Names,
    retention: &Retention,
    config: &ClusterConfig,
) -> Result<(stream::Stream<()>, stream::Stream<()>, kv::Store, kv::Store), ClusterError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| ClusterError::Setup {
        what: what.to_owned(),
        message: e.to_string(),
    };
    let events_name = names.events_stream();
    js.create_or_update_stream(stream::Config {
        name: events_name.clone(),
        description: Some(
            "wakewire: queued events, one subject per channel queue and per collapse key".into(),
        ),
        subjects: vec![names.events_subjects()],
        max_messages_per_subject: i64::try_from(retention.queue_limit).unwrap_or(i64::MAX),
        discard: stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        allow_rollup: true,
        duplicate_window: retention.idempotency_retention.min(retention.max_ttl),
        max_age: retention.max_ttl + Duration::from_secs(3600),
        max_message_size: 64 * 1024,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| setup(&events_name, &e))?;
    let status_name = names.status_stream();
    js.create_or_update_stream(stream::Config {
        name: status_name.clone(),
        description: Some("wakewire: final states of events (receipts)".into()),
        subjects: vec![names.status_subjects()],
        max_messages_per_subject: 1,
        max_age: retention.status_retention,
        max_message_size: 16 * 1024,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| setup(&status_name, &e))?;
    let events = js
        .get_stream_no_info(&events_name)
        .await
        .map_err(|e| setup(&events_name, &e))?;
    let status = js
        .get_stream_no_info(&status_name)
        .await
        .map_err(|e| setup(&status_name, &e))?;
    let channels_name = names.channels_bucket();
    let channels = key_value(
        js,
        &channels_name,
        "wakewire: channel records",
        Duration::ZERO,
        stream::StorageType::File,
        config.replicas,
    )
    .await?;
    let relays_name = names.relays_bucket();
    let relays = key_value(
        js,
        &relays_name,
        "wakewire: live relays and their device addresses",
        Duration::from_secs(30),
        stream::StorageType::Memory,
        config.replicas,
    )
    .await?;
    Ok((events, status, channels, relays))
}

/// Creates (or updates) a key-value bucket. Written as its stream (the
/// key-value conventions: `KV_<bucket>`, `$KV.<bucket>.>`, one value per
/// key, rollups) because the client's own call reads account fields NATS
/// 2.9 does not send.
async fn key_value(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    max_age: Duration,
    storage: stream::StorageType,
    replicas: usize,
) -> Result<kv::Store, ClusterError> {
    let setup = |e: &dyn std::fmt::Display| ClusterError::Setup {
        what: bucket.to_owned(),
        message: e.to_string(),
    };
    let window = if max_age.is_zero() {
        Duration::from_secs(120)
    } else {
        max_age.min(Duration::from_secs(120))
    };
    js.create_or_update_stream(stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        duplicate_window: window,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| setup(&e))?;
    js.get_key_value(bucket).await.map_err(|e| setup(&e))
}

/// A fresh id for this relay process: host name (if known) and random
/// bits, so restarts never reuse one.
fn relay_id() -> String {
    let mut r = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .take(32)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".into());
    format!("{host}-{}", naming::hex(&r))
}
