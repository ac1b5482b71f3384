//! # wakewire-server
//!
//! The relay: devices hold one QUIC connection each (ALPN `wakewire/1`,
//! TLS 1.3) carrying all their channels; app backends publish wake events
//! over gRPC; the relay routes each event to the connection of the device
//! that owns the channel and reports whether the device acknowledged it.
//!
//! Layout:
//! - [`config`]: settings from file, `WAKEWIRE_*` env and flags, validated.
//! - [`data_dir`]: signing key, channel id secret, dev certificate.
//! - [`tls`]: the one crypto provider, rustls and QUIC transport settings.
//! - [`registry`]: channel and connection tables (dashmap).
//! - [`store`]: the embedded durable store (redb) with group commit: channels,
//!   event queues, TTL, collapse keys, delivery states.
//! - `device_conn`: the thin driver around the sans-IO
//!   [`wakewire_proto::relay_session::RelaySession`], one task per device.
//! - [`publish`]: the gRPC publisher service and its error-to-status map.
//! - [`relay`]: start and stop everything; [`metrics`]: metric names.

pub mod config;
pub mod data_dir;
mod device_conn;
pub mod metrics;
pub mod probe;
pub mod publish;
pub mod registry;
pub mod relay;
pub mod store;
pub mod tls;

pub use config::{RelayConfig, Settings};
pub use relay::{start, RelayHandle, StartError};
