//! Generated protobuf and gRPC types.

#![allow(missing_docs, clippy::all)]

/// Device wire protocol (`wakewire.device.v1`).
pub mod device {
    include!(concat!(env!("OUT_DIR"), "/wakewire.device.v1.rs"));
}

/// Publisher gRPC API (`wakewire.publish.v1`).
pub mod publish {
    include!(concat!(env!("OUT_DIR"), "/wakewire.publish.v1.rs"));
}

/// Records of the relay's embedded store (`wakewire.store.v1`).
pub mod store {
    include!(concat!(env!("OUT_DIR"), "/wakewire.store.v1.rs"));
}

/// Encoded `FileDescriptorSet` of every wakewire `.proto` file, for gRPC
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/wakewire_descriptor.bin"));
