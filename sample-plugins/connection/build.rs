//! Compiles goplugin's `plugin.proto` (served) and dynplug's
//! `registry.proto` (called), from dynplug's `proto/`, with protox: no
//! system `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto/plugin.proto");
    println!("cargo:rerun-if-changed=../../proto/registry.proto");
    let fds = protox::compile(["plugin.proto", "registry.proto"], ["../../proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
