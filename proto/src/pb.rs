//! Generated protobuf types of the device wire protocol.

#![allow(missing_docs, clippy::all)]

/// Device wire protocol (`wakewire.device.v1`).
pub mod device {
    include!(concat!(env!("OUT_DIR"), "/wakewire.device.v1.rs"));
}
