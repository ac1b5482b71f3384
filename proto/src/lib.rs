//! # wakewire-proto
//!
//! Everything two wakewire peers must agree on, with no I/O:
//!
//! - [`pb`]: the generated protobuf types of the device wire protocol
//!   (`wakewire.device.v1`), compiled from `proto/` by protox (no system
//!   `protoc`). The publisher gRPC API is the `wakewire-api` crate, so
//!   devices do not pull in an HTTP/2 stack.
//! - [`codec`]: the length-delimited frame codec of the control stream, with a
//!   hard maximum frame size.
//! - [`ErrorCode`]: the QUIC application close codes, in one place.
//! - [`token`]: Ed25519-signed device and publisher credentials.
//! - [`ids`]: channel id derivation (HMAC, stable, unguessable) and event ids.
//! - [`relay_session`] and [`device_session`]: the protocol's sans-IO state
//!   machines for the two ends (frames, handshake, keepalive).
//! - [`relay_connection`] and [`device_connection`]: everything each end
//!   decides around its session: the relay's delivery queue, hold timer,
//!   in-flight set and ack ownership; the device's channel table,
//!   re-registration and duplicate suppression.
//!
//! All four take input with the time passed in (`handle_*`) and yield output
//! (`poll_*`: bytes to write, events, the next timeout, a close). They never
//! touch a socket, a runtime or a clock, so every race is tested on a
//! simulated clock with in-memory pairs, and the relay and SDK are thin
//! drivers around them (the design of quinn-proto).

pub mod codec;
pub mod device_connection;
pub mod device_session;
mod error_code;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod ids;
pub mod names;
pub mod pb;
pub mod probe;
pub mod relay_connection;
pub mod relay_session;
mod session_core;
pub mod token;

pub use error_code::ErrorCode;

/// ALPN protocol id of the device protocol, version 1.
pub const ALPN: &[u8] = b"wakewire/1";
/// Device protocol version spoken by this crate.
pub const PROTOCOL_VERSION: u32 = 1;
/// Hard upper bound for one control-stream frame, in bytes.
pub const MAX_FRAME_SIZE: usize = 16 * 1024;
/// Largest wake payload, in bytes.
pub const MAX_PAYLOAD_SIZE: usize = 4096;
/// Default UDP port of the device endpoint.
pub const DEFAULT_QUIC_PORT: u16 = 4433;
/// Default TCP port of the publisher gRPC API.
pub const DEFAULT_GRPC_PORT: u16 = 50051;
