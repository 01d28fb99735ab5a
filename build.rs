//! Compiles `proto/*.proto` with protox (pure Rust: no system `protoc`
//! needed), for the `server` feature.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTOS: &[&str] = &["proto/dynplug.proto", "proto/plugin.proto"];
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    #[cfg(feature = "server")]
    {
        let fds = protox::compile(PROTOS, ["proto"])?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_fds(fds)?;
    }
    Ok(())
}
