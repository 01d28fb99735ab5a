//! Compiles `proto/*.proto` with protox (pure Rust: no system `protoc`
//! needed): the goplugin `plugin.Plugin` service for the `exec` feature
//! (its client calls exec plugins), and with `server` its server side and
//! the `dynplug.v1` service and the plugin registry (`plugins.PluginRegistry`).
//! It also has this package's executables (the `dynplug` binary, tests,
//! examples, benchmarks) export dynplug's definitions of the C functions
//! plugin code registers per-thread state with, so plugins bind to them
//! (see `src/native/ffi/interpose.rs`).

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
    println!("cargo:rerun-if-changed=build.rs");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if target_os == "linux" && target_env == "gnu" {
        // The same line as `dynplug::THREAD_TRACKING_LINK_ARG`, for every
        // kind of executable target of this package.
        println!(
            "cargo:rustc-link-arg=-Wl,--export-dynamic-symbol=__cxa_thread_atexit_impl,--export-dynamic-symbol=pthread_key_create,--export-dynamic-symbol=pthread_key_delete,--export-dynamic-symbol=pthread_setspecific"
        );
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
