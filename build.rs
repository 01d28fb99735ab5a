//! Compiles `proto/*.proto` with protox (pure Rust: no system `protoc`
//! needed): the goplugin `plugin.Plugin` service for the `exec` feature
//! (its client calls exec plugins), and with `server` its server side and
//! the `dynplug.v1` service and the plugin registry (`plugins.PluginRegistry`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTOS: &[&str] = &[
        "proto/dynplug.proto",
        "proto/plugin.proto",
        "proto/registry.proto",
        "proto/health.proto",
    ];
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    #[cfg(feature = "exec")]
    {
        let protos: &[&str] = if cfg!(feature = "server") {
            PROTOS
        } else {
            &["proto/plugin.proto", "proto/health.proto"]
        };
        let fds = protox::compile(protos, ["proto"])?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(cfg!(feature = "server"))
            .compile_fds(fds)?;
    }
    Ok(())
}
