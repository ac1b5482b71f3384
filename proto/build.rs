//! Compiles the `.proto` files with protox (pure Rust: no system `protoc`),
//! generates prost/tonic code, and writes the encoded descriptor set that the
//! relay serves through gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/wakewire/device/v1/device.proto",
        "proto/wakewire/publish/v1/publisher.proto",
        "proto/wakewire/store/v1/store.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("wakewire_descriptor.bin"), fds.encode_to_vec())?;
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
