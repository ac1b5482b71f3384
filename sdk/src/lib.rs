//! # wakewire-sdk
//!
//! The client library an app embeds to be woken by its server through a
//! wakewire relay. One QUIC connection per device carries every channel.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = wakewire_sdk::ClientBuilder::new("localhost:4433")
//!     .trust_pem_file("wakewire-data/dev-cert.pem")
//!     .device_token("ww1....")
//!     .on_status(|s| println!("status: {s:?}"))
//!     .connect()
//!     .await?;
//! let channel_id = client
//!     .channel("mail")
//!     .on_wake(|w| println!("wake {} on {}: {:?}", w.event_id, w.channel, w.payload))
//!     .register()
//!     .await?;
//! println!("publish to channel {channel_id}");
//! # Ok(()) }
//! ```
//!
//! Design: the protocol logic is the sans-IO
//! [`wakewire_proto::device_session::DeviceSession`]; this crate is the thin
//! driver that owns the socket, runs callbacks, acks after each callback
//! returns, and reconnects with capped exponential backoff and full jitter,
//! re-registering channels (their ids are stable). [`Client::info`] reports
//! what was negotiated; a connection below [`Protection`] is refused.

mod backoff;
mod client;
mod dedup;
mod driver;
pub mod energy;
mod error;
mod keepalive;
mod memory;
pub mod sim;
mod tls;
pub mod tuner;

pub use backoff::Backoff;
pub use client::{
    ChannelBuilder, Client, ClientBuilder, ConnectionInfo, KeepalivePolicy, Status, WakeEvent,
};
pub use error::{ConnectError, RegisterError};
pub use tls::{quic_client_config, transport_config, CipherSuite, Protection};
pub use tuner::{Learned, TunerConfig};
pub use wakewire_proto::pb::device::Priority;
