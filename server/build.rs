//! Compiles the relay's on-disk record format (`wakewire.store.v1`) with
//! protox (pure Rust: no system `protoc`) into prost types.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/wakewire/store/v1/store.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
