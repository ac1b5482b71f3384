//! # wakewire-api
//!
//! The publisher gRPC API (`wakewire.publish.v1`), which app backends use to
//! send wake events to devices: the `.proto` file (in `proto/`), the prost
//! types and tonic client and server generated from it (compiled by protox,
//! no system `protoc`), and the encoded descriptor set for gRPC reflection.
//!
//! Devices never need this crate: the device protocol lives in
//! `wakewire-proto`, which does not depend on an HTTP/2 stack.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use wakewire_api::pb::{publisher_client::PublisherClient, PublishRequest};
//! let mut client = PublisherClient::connect("http://127.0.0.1:50051").await?;
//! let request = wakewire_api::with_token(
//!     PublishRequest { channel_id: "3q2-7wEjXh0pQ0Bqk5Xv1A".into(), payload: b"hi".to_vec(), ..Default::default() },
//!     "ww1....",
//! )?;
//! let answer = client.publish(request).await?.into_inner();
//! println!("{} {:?}", answer.event_id, answer.status());
//! # Ok(()) }
//! ```

/// Generated types, client and server of `wakewire.publish.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/wakewire.publish.v1.rs"));
}

/// Encoded `FileDescriptorSet` of the publisher API, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/publisher_descriptor.bin"));

/// Trailing metadata key set on an error answer to Publish when the event
/// was nevertheless stored or sent: the event id, to follow with GetEvent.
pub const EVENT_ID_METADATA: &str = "wakewire-event-id";

/// Metadata key set on a RESOURCE_EXHAUSTED answer that a retry can cure:
/// milliseconds to wait before retrying.
pub const RETRY_AFTER_METADATA: &str = "wakewire-retry-after-ms";

/// A request carrying `authorization: Bearer <token>`.
///
/// Fails only if the token holds characters that cannot travel in an HTTP
/// header (tokens minted by the relay never do).
pub fn with_token<T>(
    message: T,
    token: &str,
) -> Result<tonic::Request<T>, tonic::metadata::errors::InvalidMetadataValue> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}
