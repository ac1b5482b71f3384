//! Records of the relay's embedded store (`wakewire.store.v1`), generated
//! from `proto/wakewire/store/v1/store.proto` (protobuf, so old records stay
//! readable as fields are added).

#![allow(missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/wakewire.store.v1.rs"));
