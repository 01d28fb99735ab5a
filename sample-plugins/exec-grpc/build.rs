//! Compiles goplugin's `plugin.proto` (the copy in dynplug's `proto/`) with
//! protox: no system `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto/plugin.proto");
    let fds = protox::compile(["plugin.proto"], ["../../proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(fds)?;
    Ok(())
}
