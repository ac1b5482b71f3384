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
//! // A short callback, acked when it returns...
//! let mail = client
//!     .channel("mail")
//!     .on_wake(|w| println!("wake {} on {}: {:?}", w.event_id, w.channel, w.payload))
//!     .register()
//!     .await?;
//! // ...or a stream, for work that takes time: ack when done.
//! let (chat, mut wakes) = client.channel("chat").subscribe().await?;
//! println!("publish to channels {mail} and {chat}");
//! while let Some(wake) = wakes.next().await {
//!     println!("chat: {:?}", wake.payload);
//!     wake.ack();
//! }
//! # Ok(()) }
//! ```
//!
//! Design: what the device decides lives in the sans-IO
//! [`wakewire_proto::device_connection::DeviceConnection`] (channel table,
//! re-registration after a reconnect, which wakes reach the app, acks) and
//! the sans-IO keepalive [`tuner`]; this crate is the driver that owns the
//! socket, runs callbacks, persists the dedup window, and reconnects with
//! capped exponential backoff and full jitter. [`Client::info`] reports what
//! was negotiated; a connection below [`Protection`] is refused.
//!
//! Feature `testing` adds what simulations and tests need: the standby
//! simulation ([`sim`]), the radio energy model ([`energy`]) and a raw QUIC
//! client configuration ([`quic_client_config`]).

mod backoff;
mod client;
mod clock;
mod config;
mod dedup;
mod driver;
#[cfg(feature = "testing")]
pub mod energy;
mod error;
mod keepalive;
mod limit;
mod link;
mod memory;
mod relays;
#[cfg(feature = "testing")]
pub mod sim;
mod stream;
mod tls;
mod transport;
pub mod tuner;
mod types;

pub use backoff::Backoff;
pub use client::{ChannelBuilder, Client, ClientBuilder};
pub use error::{ClientClosed, ConnectError, RegisterError, RegisterRefusal};
pub use limit::HandshakeLimit;
pub use stream::{Wake, WakeStream};
#[cfg(feature = "testing")]
pub use tls::quic_client_config;
pub use tls::{transport_config, CipherSuite, Protection};
pub use transport::{Proxy, Transport};
pub use tuner::{IntervalReason, Learned, TunerConfig};
pub use types::{ChannelId, ConnectionInfo, KeepalivePolicy, Priority, Status, WakeEvent};
