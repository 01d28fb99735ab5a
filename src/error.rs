use std::path::PathBuf;

/// Everything that can go wrong in dynplug, named after the step that failed.
///
/// Every variant carries the plugin name and, where a file is involved, its path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory could not be read, copied or written.
    #[error("{}{action} {}: {source}", prefix(.plugin), .path.display())]
    Io {
        /// The plugin concerned (empty for the plugins directory itself).
        plugin: String,
        /// What was being done ("reading", "copying to", …).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// `plugin.json` is malformed or invalid.
    #[error("{plugin}: {path}: {field}: {message}")]
    Manifest {
        /// The plugin directory's name.
        plugin: String,
        /// The manifest file.
        path: PathBuf,
        /// The offending field, as a path (`source.mode`), or `.` for the whole file.
        field: String,
        /// What was expected and what was found.
        message: String,
    },

    /// The manifest asks for something this host does not do yet.
    #[error("{plugin}: {path}: {what} is not supported yet")]
    Unsupported {
        /// The plugin.
        plugin: String,
        /// The manifest file.
        path: PathBuf,
        /// The feature, e.g. `source.mode "exec"`.
        what: String,
    },

    /// The artifact's checksum differs from the manifest's (`sha256`, or
    /// `md5` for exec plugins).
    #[error("{plugin}: {path}: {algorithm} mismatch: manifest says {expected}, file has {found}")]
    Checksum {
        /// The plugin.
        plugin: String,
        /// The artifact.
        path: PathBuf,
        /// `sha256` or `md5`.
        algorithm: &'static str,
        /// From the manifest.
        expected: String,
        /// Of the bytes read.
        found: String,
    },

    /// A `.plg` package breaks a rule (a link, a path leaving the package,
    /// too many entries, too large unpacked) or is misnamed.
    #[error("{}{}: {message}", prefix(.plugin), .path.display())]
    Package {
        /// The plugin, once its manifest was read (else empty).
        plugin: String,
        /// The package file.
        path: PathBuf,
        /// Which rule, and for which entry.
        message: String,
    },

    /// The host checks signatures and this plugin's is missing, does not
    /// match what is loaded, or is by a key it does not trust.
    #[error("{plugin}: {path}: {reason}")]
    Signature {
        /// The plugin.
        plugin: String,
        /// The signature file (`plugin.sig`), present or not.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// Building a plugin from source (`source.mode = "remote_git"`) failed:
    /// fetching, checking out or compiling.
    #[error("{plugin}: building from {source_path}: {message}")]
    Build {
        /// The plugin.
        plugin: String,
        /// The repository (`source.path`).
        source_path: String,
        /// What failed, with the last lines of git's or cargo's output.
        message: String,
    },

    /// `dlopen` refused the artifact (a missing dependency, an unresolved
    /// symbol, …).
    #[error("{plugin}: {path}: cannot load library: {message}")]
    Open {
        /// The plugin.
        plugin: String,
        /// The artifact (drop location, not the image loaded).
        path: PathBuf,
        /// The loader's message (`dlerror`).
        message: String,
    },

    /// A file or directory that others could change is refused: a plugins
    /// directory, plugin directory or library writable by every user, or a
    /// private directory (shadow copies, sockets) owned by someone else.
    #[error("{}{}: {reason}", prefix(.plugin), .path.display())]
    Insecure {
        /// The plugin concerned (empty for the plugins directory itself).
        plugin: String,
        /// The file or directory.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// The file is not a complete shared library for this platform (e.g. truncated).
    #[error("{plugin}: {path}: not a loadable library: {message}")]
    BadLibrary {
        /// The plugin.
        plugin: String,
        /// The artifact.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// The library does not export a dynplug root.
    #[error(
        "{plugin}: {path}: no `{symbol}` symbol: not a dynplug plugin (export it with plugin_abi::export_plugin!)"
    )]
    MissingRoot {
        /// The plugin.
        plugin: String,
        /// The artifact.
        path: PathBuf,
        /// The symbol looked for.
        symbol: &'static str,
    },

    /// The plugin was built against an incompatible `plugin-abi`.
    #[error("{plugin}: {path}: built against {found}, but this host needs {expected}")]
    AbiMismatch {
        /// The plugin.
        plugin: String,
        /// The artifact.
        path: PathBuf,
        /// What the plugin was built with, e.g. `plugin-abi 0.0.9 (ABI 0.9)`,
        /// with the layout differences found, if any.
        found: String,
        /// What the host needs.
        expected: String,
    },

    /// The plugin's `init` returned an error or panicked.
    #[error("{plugin}: init failed: {message}")]
    Init {
        /// The plugin.
        plugin: String,
        /// The plugin's message (or panic message).
        message: String,
    },

    /// An exec plugin's process could not be started, or did not become
    /// ready: not executable, exited at once, or never answered Ping within
    /// its start timeout.
    #[error("{plugin}: {path}: cannot start: {reason}{}", stderr_tail(.stderr))]
    Start {
        /// The plugin.
        plugin: String,
        /// The executable, as the manifest names it.
        path: PathBuf,
        /// What went wrong.
        reason: String,
        /// The last lines the process wrote to stderr, oldest first.
        stderr: Vec<String>,
    },

    /// An exec plugin's reply could not be understood (not its protocol,
    /// not hex, over the size limit).
    #[error("{plugin}: {label}: bad reply: {message}")]
    BadReply {
        /// The plugin.
        plugin: String,
        /// The label called.
        label: String,
        /// What is wrong with the reply.
        message: String,
    },

    /// The process of a plugin with `isolation: "process"` died during the
    /// call (a segfault, an abort, a limit, or killed for running past its
    /// deadline): the call failed, the host lives, and the process is
    /// being restarted.
    #[error("{plugin}: {label}: the plugin's process crashed during the call: {reason}")]
    Crashed {
        /// The plugin.
        plugin: String,
        /// The label called.
        label: String,
        /// How the process ended, e.g. `its process killed by SIGSEGV`,
        /// with its last line on stderr and the limit it hit, if any.
        reason: String,
    },

    /// The new version is lower than the one serving and downgrades are not allowed.
    #[error(
        "{plugin}: {path}: version {found} is lower than the serving {serving}; downgrades are not allowed"
    )]
    Downgrade {
        /// The plugin.
        plugin: String,
        /// The new manifest.
        path: PathBuf,
        /// The version serving.
        serving: String,
        /// The version dropped.
        found: String,
    },

    /// A route of the plugin is already served by another plugin, which keeps it.
    #[error("{plugin}: {path}: route {route} is already served by plugin {owner}")]
    RouteConflict {
        /// The plugin refused.
        plugin: String,
        /// Its manifest.
        path: PathBuf,
        /// Method and route, e.g. `GET /api/hello/:name`.
        route: String,
        /// The plugin serving it.
        owner: String,
    },

    /// A server could not listen on an address.
    #[error("listening on {address}: {source}")]
    Bind {
        /// The TCP address or Unix socket path.
        address: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The server's configuration is invalid or unsafe (a client definition,
    /// a TLS file, the management API open to the network without a token).
    #[error("{what}: {message}")]
    Config {
        /// What is configured, e.g. `client \`billing\`` or an endpoint.
        what: String,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// The caller did not say who it is, or with credentials no one has.
    #[error("{reason}")]
    Unauthenticated {
        /// What was missing or wrong.
        reason: String,
    },

    /// The caller may not do this (call this plugin, or reach the
    /// management API from this site or by this host name).
    #[error("{}forbidden: {reason}", prefix(.plugin))]
    Forbidden {
        /// The plugin concerned (empty when none).
        plugin: String,
        /// Why.
        reason: String,
    },

    /// The name is taken by another plugin of another origin: a plugin of
    /// the plugins directory, a socket found in a sockets directory, or a
    /// registration.
    #[error("{plugin}: the name is taken by {by}")]
    NameTaken {
        /// The name.
        plugin: String,
        /// Who has it.
        by: String,
    },

    /// No plugin of that name is known.
    #[error("{plugin}: no such plugin")]
    NotFound {
        /// The name asked for.
        plugin: String,
    },

    /// The plugin exists but cannot take calls now (failed, draining, unloaded).
    #[error("{plugin}: unavailable: {reason}")]
    Unavailable {
        /// The plugin.
        plugin: String,
        /// Why.
        reason: String,
    },

    /// The plugin's queue is full: as many calls as the manager's
    /// `queue_limit` allows already wait for one of its workers. Retry later.
    #[error("{plugin}: overloaded: queue full ({limit} waiting)")]
    Overloaded {
        /// The plugin.
        plugin: String,
        /// The queue limit that was reached.
        limit: usize,
    },

    /// The plugin's `execute` returned an error (for a JSON-RPC plugin,
    /// its error object: `code`, `message` and `data`).
    #[error("{plugin}: {label}: {message}{}", fault_tail(*.code, .data.as_ref()))]
    Plugin {
        /// The plugin.
        plugin: String,
        /// The label called.
        label: String,
        /// The plugin's message.
        message: String,
        /// The error's code, from plugins whose protocol has one (JSON-RPC:
        /// -32601 method not found, -32602 invalid params, -32000 and below
        /// the plugin's own).
        code: Option<i64>,
        /// The error's data, from plugins whose protocol has it (JSON-RPC).
        data: Option<plugin_abi::Value>,
    },

    /// The plugin panicked; the host caught it and keeps running.
    #[error("{plugin}: {label}: panicked: {message}")]
    Panic {
        /// The plugin.
        plugin: String,
        /// The label called.
        label: String,
        /// The panic message.
        message: String,
    },

    /// The call's deadline passed before the plugin answered.
    #[error("{plugin}: {label}: deadline exceeded")]
    DeadlineExceeded {
        /// The plugin.
        plugin: String,
        /// The label called.
        label: String,
    },

    /// The call was cancelled by the caller.
    #[error("{plugin}: {label}: cancelled")]
    Cancelled {
        /// The plugin.
        plugin: String,
        /// The label called.
        label: String,
    },
}

impl Error {
    /// The plugin this error is about.
    pub fn plugin(&self) -> &str {
        match self {
            Error::Io { plugin, .. }
            | Error::Manifest { plugin, .. }
            | Error::Unsupported { plugin, .. }
            | Error::Checksum { plugin, .. }
            | Error::Package { plugin, .. }
            | Error::Signature { plugin, .. }
            | Error::Build { plugin, .. }
            | Error::Open { plugin, .. }
            | Error::Insecure { plugin, .. }
            | Error::BadLibrary { plugin, .. }
            | Error::MissingRoot { plugin, .. }
            | Error::AbiMismatch { plugin, .. }
            | Error::Init { plugin, .. }
            | Error::Start { plugin, .. }
            | Error::BadReply { plugin, .. }
            | Error::Crashed { plugin, .. }
            | Error::Downgrade { plugin, .. }
            | Error::RouteConflict { plugin, .. }
            | Error::Forbidden { plugin, .. }
            | Error::NotFound { plugin }
            | Error::NameTaken { plugin, .. }
            | Error::Unavailable { plugin, .. }
            | Error::Overloaded { plugin, .. }
            | Error::Plugin { plugin, .. }
            | Error::Panic { plugin, .. }
            | Error::DeadlineExceeded { plugin, .. }
            | Error::Cancelled { plugin, .. } => plugin,
            Error::Bind { .. } | Error::Config { .. } | Error::Unauthenticated { .. } => "",
        }
    }
}

impl Error {
    /// Whether the error may come from a file still being written (a short
    /// read, a cut manifest): the watcher retries those once the file settles.
    pub(crate) fn may_be_partial_write(&self) -> bool {
        matches!(
            self,
            Error::Io { .. }
                | Error::Manifest { .. }
                | Error::Open { .. }
                | Error::BadLibrary { .. }
                | Error::MissingRoot { .. }
                | Error::Checksum { .. }
                | Error::Package { .. }
                | Error::Signature { .. }
        )
    }
}

/// ` (code -32000; data: {…})`, or nothing.
fn fault_tail(code: Option<i64>, data: Option<&plugin_abi::Value>) -> String {
    let data = data
        .map(|d| serde_json::to_string(d).unwrap_or_default())
        .map(|d| format!("; data: {}", crate::text::printable(&d, 512)))
        .unwrap_or_default();
    match code {
        Some(code) => format!(" (code {code}{data})"),
        None if !data.is_empty() => format!(" ({})", &data[2..]),
        None => String::new(),
    }
}

/// `; stderr: «a» «b»`, or nothing.
fn stderr_tail(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let quoted: Vec<String> = lines.iter().map(|l| format!("«{l}»")).collect();
    format!("; last lines on stderr: {}", quoted.join(" "))
}

fn prefix(plugin: &str) -> String {
    if plugin.is_empty() {
        String::new()
    } else {
        format!("{plugin}: ")
    }
}

/// `Result` with dynplug's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
