//! Compiles the device wire protocol with protox (pure Rust: no system
//! `protoc`) into prost types. The publisher gRPC API lives in the
//! `wakewire-api` crate, so devices do not pull in an HTTP/2 stack.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/wakewire/device/v1/device.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
