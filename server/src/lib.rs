//! # wakewire-server
//!
//! The relay: devices hold one QUIC connection each (ALPN `wakewire/1`,
//! TLS 1.3) carrying all their channels; app backends publish wake events
//! over gRPC; the relay stores each event durably, routes it to the
//! connection of the device that owns the channel and reports whether the
//! device acknowledged it. The binary `wakewire-relay` is in the
//! `wakewire-cli` crate.
//!
//! Design: everything that decides lives in a sans-IO type, everything that
//! waits lives in a driver.
//! - Deciders: [`wakewire_proto::relay_connection::RelayConnection`] (per
//!   connection: delivery queue, hold timer, in-flight set, ack ownership)
//!   and the [`store`]'s writer (per event: queued, dropped, expired,
//!   delivered), with [`claims`] keeping them consistent.
//! - Drivers: `device_conn` (one task per connection), [`publish`] (one task
//!   per publish), the two front doors `quic` and `grpc`, and [`relay`],
//!   which starts and stops them. They read the time only through one
//!   clock (`state::clock`), tokio's, so tests can pause it.
//!
//! Layout:
//! - [`config`]: settings from file, `WAKEWIRE_*` env and flags, validated.
//! - [`data_dir`]: signing key, channel id secret, dev certificate.
//! - [`tls`]: the one crypto provider, rustls and QUIC transport settings.
//! - [`registry`]: channel and connection tables (dashmap).
//! - [`store`]: the embedded durable store (redb) with group commit.
//! - [`claims`]: which stored events may be on their way to a device.
//! - [`metrics`]: metric names; [`probe`]: the NAT probe responder.

mod auth;
pub mod certs;
pub mod claims;
pub mod cluster;
pub mod config;
pub mod data_dir;
mod device_auth;
mod device_conn;
mod device_io;
mod grpc;
pub mod metrics;
pub mod pb;
pub mod probe;
pub mod publish;
mod publish_error;
mod publish_stream;
mod quic;
pub mod quota;
pub mod registry;
pub mod relay;
pub mod revocation;
mod state;
pub mod store;
mod tcp;
pub mod tickets;
pub mod tls;

pub use config::{RelayConfig, Settings};
pub use relay::{run, start, start_on, Listeners, RelayHandle, StartError};
