#![no_main]
//! cargo-fuzz target: `wakewire_proto::fuzz::probe` must not panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| wakewire_proto::fuzz::probe(data));
