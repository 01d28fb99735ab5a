//! Command-line interface (binary only).

mod config;
mod demo;
mod dev;
mod install;
mod keys;
mod new;
mod package;
mod plugin_crate;
mod serve;
mod trust;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use dynplug::{Context, PluginInfo, PluginManager, Value};
use trust::TrustArgs;

/// Load, call and verify dynplug plugins.
#[derive(Debug, Parser)]
#[command(version, about)]
pub(crate) struct Args {
    /// Log more (-v: info, and `serve` logs every plugin request and response; -vv: debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    /// A TOML configuration file; flags and environment variables win over it.
    #[arg(long, global = true, env = "DYNPLUG_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Where the plugins are and how the manager runs them.
#[derive(Debug, Default, clap::Args)]
struct PluginsDir {
    /// The plugins directory [default: plugins].
    #[arg(long, env = "DYNPLUG_PLUGINS_DIR")]
    plugins: Option<PathBuf>,
    /// Worker threads of each `pooled` plugin version (default 2).
    #[arg(long, env = "DYNPLUG_POOL_SIZE", value_name = "THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pool_size: Option<u16>,
    /// At most this many calls wait for a worker of a `pooled` version; past
    /// it a call fails at once as overloaded (HTTP 503). Default: no limit.
    #[arg(long, env = "DYNPLUG_QUEUE_LIMIT", value_name = "CALLS")]
    queue_limit: Option<usize>,
    /// How long a replaced or unloaded version may finish its calls before it
    /// is reported leaked (default 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// Accept a lower version over a serving one (refused by default).
    #[arg(long)]
    allow_downgrades: bool,
    /// Load each native plugin's library on its first call, not at start
    /// (listed `deferred` until then): for many plugins of which few are called.
    #[arg(long)]
    load_on_first_call: bool,
    /// Unload a native plugin no call has reached for this long (e.g. 10m);
    /// its next call loads it again. Implies --load-on-first-call.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    unload_idle_after: Option<Duration>,
    #[command(flatten)]
    trust: TrustArgs,
    /// Where `remote_git` plugins are cloned and built [default:
    /// ~/.cache/dynplug/builds].
    #[arg(long, env = "DYNPLUG_BUILD_CACHE", value_name = "DIR")]
    build_cache: Option<PathBuf>,
    /// How long each git or cargo step of a `remote_git` build may take [default: 10m].
    #[arg(long, value_parser = humantime::parse_duration)]
    build_timeout: Option<Duration>,
    /// A sockets directory: each Unix socket in it is a plugin named by its
    /// file name (`NAME.listen` holding tcp://HOST:PORT for TCP), spoken to
    /// in JSON-RPC 2.0 or Docker's plugin protocol (repeatable).
    #[arg(long, value_name = "DIR")]
    sockets: Vec<PathBuf>,
}

impl PluginsDir {
    /// Fills what the command line left unset from the configuration file.
    fn apply(&mut self, config: &config::Config) {
        self.plugins = self.plugins.take().or_else(|| config.plugins.clone());
        self.pool_size = self.pool_size.or(config.pool_size);
        self.queue_limit = self.queue_limit.or(config.queue_limit);
        self.drain_timeout = self.drain_timeout.or(config.drain_timeout);
        self.allow_downgrades |= config.allow_downgrades.unwrap_or(false);
        self.load_on_first_call |= config.load_on_first_call.unwrap_or(false);
        self.unload_idle_after = self.unload_idle_after.or(config.unload_idle_after);
        self.trust.apply(config);
        if self.sockets.is_empty() {
            self.sockets.clone_from(&config.sockets);
        }
    }

    fn plugins(&self) -> &Path {
        self.plugins.as_deref().unwrap_or(Path::new("plugins"))
    }

    fn manager(&self) -> dynplug::Result<PluginManager> {
        let mut builder = PluginManager::builder(self.plugins())
            .allow_downgrades(self.allow_downgrades)
            .load_on_first_call(self.load_on_first_call);
        if let Some(threads) = self.pool_size {
            builder = builder.pool_size(threads.into());
        }
        if let Some(calls) = self.queue_limit {
            builder = builder.queue_limit(calls);
        }
        if let Some(timeout) = self.drain_timeout {
            builder = builder.drain_timeout(timeout);
        }
        if let Some(idle) = self.unload_idle_after {
            builder = builder.unload_idle_after(idle);
        }
        if let Some(cache) = &self.build_cache {
            builder = builder.build_cache(cache);
        }
        if let Some(timeout) = self.build_timeout {
            builder = builder.build_timeout(timeout);
        }
        if let Some(keys) = &self.trust.trusted_keys {
            builder = builder.trusted_keys_file(keys);
        }
        builder
            .require_signatures(self.trust.require_signatures)
            .build()
    }

    /// Loads the plugins of the sockets directories and follows them while
    /// the returned guards live.
    fn discover(&self, manager: &PluginManager) -> dynplug::Result<Vec<dynplug::Discovery>> {
        self.sockets
            .iter()
            .map(|dir| manager.discover_sockets(dir))
            .collect()
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load every plugin and print a table of name, version, mode, isolation, state and error.
    List {
        #[command(flatten)]
        dir: PluginsDir,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only plugins whose handshake says they implement this interface
        /// (`Group`, or `Group/0.1.0`).
        #[arg(long, value_name = "NAME")]
        interface: Option<String>,
        /// Only plugins offering this capability (e.g. CONNECTION).
        #[arg(long, value_name = "NAME")]
        capability: Option<String>,
    },
    /// Load one plugin, call it once and print the context's values as JSON.
    Call {
        #[command(flatten)]
        dir: PluginsDir,
        /// The plugin's name.
        name: String,
        /// The label to call.
        #[arg(long, short)]
        label: String,
        /// A value: key=value, where value is parsed as JSON if it can be, else taken as a string.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        values: Vec<String>,
        /// Deadline of the call, e.g. 2s or 500ms.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Check one plugin directory or `.plg` without running the plugin: the
    /// unpacking rules, the manifest, the signature, and the artifact
    /// (native: checksum, header, ABI; exec: the executable, its checksums
    /// and format; no process is started).
    Verify {
        /// The plugin directory or package.
        #[arg(value_name = "DIR|PLG")]
        path: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Load every plugin and serve them over HTTP and gRPC until SIGINT/SIGTERM.
    Serve(Box<ServeArgs>),
    /// Load every plugin, follow the directory, and print lifecycle events as JSON lines.
    Watch {
        #[command(flatten)]
        dir: PluginsDir,
    },
    /// Create a plugin crate NAME that builds and loads as it is, with a unit test.
    New {
        /// The plugin's (and crate's) name.
        name: String,
        /// Where to create the crate directory [default: the current directory].
        #[arg(long, value_name = "DIR")]
        path: Option<PathBuf>,
        /// The `plugin-abi` crate to depend on [default: this dynplug's
        /// checkout when built from source, else its crates.io version].
        #[arg(long, env = "DYNPLUG_PLUGIN_ABI", value_name = "DIR")]
        plugin_abi: Option<PathBuf>,
        /// A native plugin (a cdylib the host loads), or an exec plugin (a
        /// program the host starts and calls over goplugin's REST protocol).
        #[arg(long, value_enum, default_value_t = new::Kind::Native)]
        kind: new::Kind,
    },
    /// Build a plugin crate, serve it, and rebuild and hot-upgrade it on every save.
    Dev {
        /// The plugin crate [default: the current directory].
        #[arg(value_name = "CRATE")]
        krate: Option<PathBuf>,
        /// HTTP address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: std::net::SocketAddr,
        /// gRPC address.
        #[arg(long, default_value = "127.0.0.1:50051")]
        grpc: std::net::SocketAddr,
        /// Build in release mode (slower builds, faster plugin).
        #[arg(long)]
        release: bool,
    },
    /// Pack a plugin directory, or build and pack a plugin crate, into NAME-VERSION.plg.
    Pack {
        /// The plugin directory or crate [default: the current directory].
        #[arg(value_name = "DIR|CRATE")]
        path: Option<PathBuf>,
        /// Where to write the package [default: the current directory].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Create an ed25519 key pair to sign plugins: FILE (secret, 0600) and FILE.pub.
    Keygen {
        /// The key's name, shown as the signer.
        name: String,
        /// The secret key file [default: NAME.key].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Sign a plugin directory (writes plugin.sig) or a `.plg` (rewritten with it).
    Sign {
        /// The secret key file (from `dynplug keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The plugin directory or package.
        #[arg(value_name = "DIR|PLG")]
        path: PathBuf,
    },
    /// Install a plugin into the plugins directory, atomically: a plugin
    /// directory or crate, a `.plg`, an http(s) URL of a `.plg`, or a git repository.
    Install {
        /// DIR, CRATE, FILE.plg, https://…/NAME-VERSION.plg, or a git URL
        /// (`git+file:///…`, `git+https://…`, `https://….git`, `git@…`).
        source: String,
        /// The plugins directory [default: plugins].
        #[arg(long, env = "DYNPLUG_PLUGINS_DIR")]
        plugins: Option<PathBuf>,
        /// For a git repository: the branch, tag or commit to build.
        #[arg(long)]
        rev: Option<String>,
    },
    /// From a source checkout: build the sample plugins and serve them (watching the directory).
    Demo {
        /// HTTP address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: std::net::SocketAddr,
        /// gRPC address.
        #[arg(long, default_value = "127.0.0.1:50051")]
        grpc: std::net::SocketAddr,
    },
}

#[derive(Debug, Default, clap::Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    dir: PluginsDir,
    /// HTTP address (default 127.0.0.1:8080 unless --http-unix is given).
    #[arg(long, env = "DYNPLUG_HTTP")]
    http: Vec<std::net::SocketAddr>,
    /// HTTP on a Unix socket.
    #[arg(long)]
    http_unix: Vec<PathBuf>,
    /// gRPC address (default 127.0.0.1:50051 unless --grpc-unix is given).
    #[arg(long, env = "DYNPLUG_GRPC")]
    grpc: Vec<std::net::SocketAddr>,
    /// gRPC on a Unix socket.
    #[arg(long)]
    grpc_unix: Vec<PathBuf>,
    /// Serve the goplugin `plugin.Plugin` service on DIR/<plugin>.sock for every loaded plugin.
    #[arg(long, value_name = "DIR")]
    goplugin_dir: Option<PathBuf>,
    /// Serve the plugin registry (gRPC `plugins.PluginRegistry`) on this
    /// Unix socket: plugins serving `plugin.Plugin` on a socket of their
    /// own register there (its directory is created 0700).
    #[arg(long, value_name = "PATH")]
    registry_unix: Option<PathBuf>,
    /// Where registered endpoints may be (repeatable) [default: the
    /// registry socket's directory].
    #[arg(long, value_name = "DIR", requires = "registry_unix")]
    registry_endpoint_dir: Vec<PathBuf>,
    /// Users allowed to register, by uid (repeatable) [default: this
    /// server's user only; the list replaces it].
    #[arg(long, value_name = "UID", requires = "registry_unix")]
    registry_allow_uid: Vec<u32>,
    /// Time between probes of registered plugins [default: 1s].
    #[arg(long, value_parser = humantime::parse_duration, requires = "registry_unix")]
    registry_probe_interval: Option<Duration>,
    /// Missed probes in a row before a plugin is unregistered [default: 3].
    #[arg(long, value_name = "N", requires = "registry_unix")]
    registry_probe_misses: Option<u32>,
    /// Follow the plugins directory: load, upgrade and unload as plugins come, change and go.
    #[arg(long)]
    watch: bool,
    /// Default deadline of a plugin call [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Require this token (Authorization: Bearer) for the management API's
    /// data and actions; prefer the environment variable to the flag.
    #[arg(
        long,
        env = "DYNPLUG_MANAGEMENT_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    management_token: Option<String>,
    /// Serve the management API on a non-loopback address without a token
    /// or clients (refused otherwise: anyone reaching it could unload plugins).
    #[arg(long)]
    allow_open_management: bool,
    /// A host name the management API answers to, besides IP literals and
    /// localhost (repeatable; `*` turns the Host check off).
    #[arg(long = "allowed-host", value_name = "NAME")]
    allowed_hosts: Vec<String>,
    /// At most this many open connections, over every endpoint [default:
    /// half the open-file limit, 16 to 4096].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// How long a client may take to send a request's headers, or a TLS
    /// handshake [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    header_read_timeout: Option<Duration>,
    /// Close a connection with no request in flight for this long [default: 60s].
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Most concurrent HTTP/2 streams per connection, gRPC and HTTP [default: 100].
    #[arg(long, value_name = "N")]
    max_concurrent_streams: Option<u32>,
    /// Mode of the Unix sockets, in octal (e.g. 660 for the group) [default: 600].
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    unix_socket_mode: Option<u32>,
    /// Serve TCP endpoints over TLS with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Verify client certificates against these PEM CA certificates; a
    /// verified certificate names a client by its `cert_name`.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Named clients, from the configuration file's `[[clients]]`.
    #[arg(skip)]
    clients: Vec<config::ClientConfig>,
    /// Largest gRPC request message, from the configuration file.
    #[arg(skip)]
    grpc_max_message_size: Option<usize>,
    /// Largest request head, from the configuration file.
    #[arg(skip)]
    max_header_bytes: Option<usize>,
}

/// `660`, `0660` or `0o660`.
fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.trim_start_matches("0o");
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("`{text}` is not an octal file mode such as 600 or 660"))
}

pub(crate) fn init_logging(args: &Args) {
    let quiet = matches!(
        args.command,
        Command::List { .. }
            | Command::Call { .. }
            | Command::Verify { .. }
            | Command::New { .. }
            | Command::Pack { .. }
            | Command::Keygen { .. }
            | Command::Sign { .. }
            | Command::Install { .. }
    );
    let level = match args.verbose {
        0 if quiet => tracing::Level::WARN,
        0 => tracing::Level::INFO,
        1 => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

impl ServeArgs {
    /// Fills what the command line left unset from the configuration file.
    /// Endpoints go by façade: any HTTP endpoint on the command line replaces
    /// the file's HTTP endpoints (likewise gRPC).
    fn apply(&mut self, config: &config::Config) {
        self.dir.apply(config);
        let file = &config.serve;
        if self.http.is_empty() && self.http_unix.is_empty() {
            self.http.clone_from(&file.http);
            self.http_unix.clone_from(&file.http_unix);
        }
        if self.grpc.is_empty() && self.grpc_unix.is_empty() {
            self.grpc.clone_from(&file.grpc);
            self.grpc_unix.clone_from(&file.grpc_unix);
        }
        self.goplugin_dir = self
            .goplugin_dir
            .take()
            .or_else(|| file.goplugin_dir.clone());
        if self.registry_unix.is_none() {
            self.registry_unix.clone_from(&file.registry_unix);
            self.registry_endpoint_dir
                .clone_from(&file.registry_endpoint_dirs);
            self.registry_allow_uid
                .clone_from(&file.registry_allowed_uids);
            self.registry_probe_interval = file.registry_probe_interval;
            self.registry_probe_misses = file.registry_probe_misses;
        }
        self.watch |= file.watch.unwrap_or(false);
        self.timeout = self.timeout.or(file.timeout);
        self.management_token = self
            .management_token
            .take()
            .or_else(|| file.management_token.clone());
        self.allow_open_management |= file.allow_open_management.unwrap_or(false);
        if self.allowed_hosts.is_empty() {
            self.allowed_hosts.clone_from(&file.allowed_hosts);
        }
        self.max_connections = self.max_connections.or(file.max_connections);
        self.header_read_timeout = self.header_read_timeout.or(file.header_read_timeout);
        self.idle_timeout = self.idle_timeout.or(file.idle_timeout);
        self.max_concurrent_streams = self.max_concurrent_streams.or(file.max_concurrent_streams);
        self.unix_socket_mode = self.unix_socket_mode.or(file.unix_socket_mode);
        if self.tls_cert.is_none() {
            self.tls_cert.clone_from(&file.tls_cert);
            self.tls_key.clone_from(&file.tls_key);
        }
        self.tls_client_ca = self
            .tls_client_ca
            .take()
            .or_else(|| file.tls_client_ca.clone());
        self.grpc_max_message_size = file.grpc_max_message_size;
        self.max_header_bytes = file.max_header_bytes;
        self.clients.clone_from(&config.clients);
    }
}

pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut command = args.command;
    if let Some(path) = &args.config {
        let config = config::Config::load(path)?;
        match &mut command {
            Command::List { dir, .. } | Command::Call { dir, .. } | Command::Watch { dir } => {
                dir.apply(&config)
            }
            Command::Serve(serve) => serve.apply(&config),
            Command::Verify { trust, .. } => trust.apply(&config),
            Command::Install { plugins, .. } => {
                *plugins = plugins.take().or_else(|| config.plugins.clone());
            }
            _ => {}
        }
    }
    match command {
        Command::List {
            dir,
            json,
            interface,
            capability,
        } => list(&dir, json, interface.as_deref(), capability.as_deref()),
        Command::Call {
            dir,
            name,
            label,
            values,
            timeout,
        } => call(&dir, &name, &label, &values, timeout),
        Command::Verify { path, trust } => package::verify(&path, &trust),
        Command::New {
            name,
            path,
            plugin_abi,
            kind,
        } => {
            let parent = path.unwrap_or_else(|| PathBuf::from("."));
            let abi = new::AbiSource::choose(plugin_abi);
            let dir = new::create(&name, &parent, kind, &abi)?;
            println!("created {}: cd there, then `dynplug dev`", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev {
            krate,
            http,
            grpc,
            release,
        } => {
            let args = dev::DevArgs {
                krate: krate.unwrap_or_else(|| PathBuf::from(".")),
                http,
                grpc,
                release,
                verbose: args.verbose > 0,
            };
            runtime()?.block_on(dev::run(args))
        }
        Command::Pack { path, out } => {
            let path = path.unwrap_or_else(|| PathBuf::from("."));
            let out = out.unwrap_or_else(|| PathBuf::from("."));
            let packed = package::pack(&path, &out)?;
            println!("{}", packed.path.display());
            if packed.dropped_signature {
                eprintln!(
                    "dynplug: the directory's plugin.sig was left out (filling in sha256 changed the manifest it signed): sign the package"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { name, out } => keys::keygen(&name, out),
        Command::Sign { key, path } => keys::sign(&key, &path),
        Command::Install {
            source,
            plugins,
            rev,
        } => {
            let plugins = plugins.unwrap_or_else(|| PathBuf::from("plugins"));
            let installed = install::install(&source, rev.as_deref(), &plugins)?;
            println!("installed {}", installed.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(serve) => {
            let verbose = args.verbose > 0;
            runtime()?.block_on(serve::run(*serve, verbose))
        }
        Command::Watch { dir } => runtime()?.block_on(serve::watch(&dir)),
        Command::Demo { http, grpc } => {
            let plugins = demo::build_samples()?;
            let serve = ServeArgs {
                dir: PluginsDir {
                    plugins: Some(plugins),
                    ..PluginsDir::default()
                },
                http: vec![http],
                grpc: vec![grpc],
                watch: true,
                ..ServeArgs::default()
            };
            runtime()?.block_on(serve::run(serve, args.verbose > 0))
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn list(
    dir: &PluginsDir,
    json: bool,
    interface: Option<&str>,
    capability: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let manager = dir.manager()?;
    manager.load_plugins()?;
    let found = dir.discover(&manager)?;
    let rows: Vec<PluginInfo> = manager
        .list()
        .into_iter()
        .filter(|row| interface.is_none_or(|i| row.implements(i)))
        .filter(|row| capability.is_none_or(|c| row.has_capability(c)))
        .collect();
    drop(found);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    manager.unload_all();
    Ok(ExitCode::SUCCESS)
}

/// Widest cell of the table, in characters; the last column (the error) is
/// not padded and may be longer.
const CELL_WIDTH: usize = 64;
const LAST_CELL_WIDTH: usize = 1024;

pub(crate) fn print_table(rows: &[PluginInfo]) {
    // Cells hold what plugin directories and errors hold: escape what a
    // terminal would act on, and cut (a `format!` width past 65,535 panics).
    let cell = |text: &str, width: usize| dynplug::text::printable(text, width).into_owned();
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                cell(&r.name, CELL_WIDTH),
                cell(r.version.as_deref().unwrap_or("-"), CELL_WIDTH),
                cell(r.mode.as_deref().unwrap_or("-"), CELL_WIDTH),
                r.isolation.map_or("-", |i| i.as_str()).to_owned(),
                r.state.as_str().to_owned(),
                cell(r.error.as_deref().unwrap_or_default(), LAST_CELL_WIDTH),
            ]
        })
        .collect();
    let header = ["NAME", "VERSION", "MODE", "ISOLATION", "STATE", "ERROR"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // The last column is not padded.
    widths[header.len() - 1] = 0;
    for row in std::iter::once(&header).chain(&cells) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn call(
    dir: &PluginsDir,
    name: &str,
    label: &str,
    values: &[String],
    timeout: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let mut ctx = Context::new(label);
    for pair in values {
        let Some((key, raw)) = pair.split_once('=') else {
            bail!("--set {pair}: expected KEY=VALUE");
        };
        let value = serde_json::from_str::<serde_json::Value>(raw)
            .map_or_else(|_| Value::String(raw.to_owned()), Value::from);
        ctx.set(key, value);
    }
    if let Some(timeout) = timeout {
        ctx = ctx.with_timeout(timeout);
    }
    let manager = dir.manager()?;
    let _found = dir.discover(&manager)?;
    if manager.info(name).is_none() {
        manager.load_plugin(name)?;
    }
    let (_, executor) = manager.get_plugin(name)?;
    executor
        .execute(&mut ctx)
        .with_context(|| format!("calling {name} with label {label}"))?;
    let sorted: BTreeMap<_, _> = ctx.values().collect();
    println!("{}", serde_json::to_string_pretty(&sorted)?);
    manager.unload_all();
    Ok(ExitCode::SUCCESS)
}
