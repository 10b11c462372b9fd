//! Compiles proto/treaty/v1 with protox (pure Rust: no system `protoc` needed) and writes the
//! descriptor set to OUT_DIR for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "treaty/v1/types.proto",
        "treaty/v1/coordinator.proto",
        "treaty/v1/participant.proto",
        "treaty/v1/log.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("treaty_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
