//! `plugin.json`: parsing and validation.
//!
//! Parsing is strict: unknown keys are errors (a typo must not be silently
//! ignored), and every error names the file, the field and what was expected.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::route::{Method, Pattern, Router};
use crate::text::printable;

mod validate;

#[cfg_attr(not(feature = "exec"), allow(unused_imports))]
pub(crate) use validate::SocketPath;
use validate::{
    validate_capabilities, validate_exec, validate_limits, validate_routes, validate_socket,
};

/// The manifest file's name inside a plugin directory.
pub const MANIFEST_FILE: &str = "plugin.json";

/// Most routes one manifest may declare (100,000 once stalled the watcher
/// for 17 s; the count is refused before any route is looked at).
const MAX_ROUTES: usize = 1024;
/// Longest `version`, in bytes: semver puts no bound on pre-release and
/// build parts, and a long one ended up in a file name ("File name too long").
const MAX_VERSION_LEN: usize = 128;
/// Longest label, `rev`, `package` and maintainer, in bytes.
const MAX_SHORT_TEXT: usize = 256;
/// Longest `description`, `home`, `source.path` and argument, in bytes
/// (4,096: Linux's `PATH_MAX`).
const MAX_LONG_TEXT: usize = 4096;
/// Most `maintainers` and most `args`.
const MAX_ITEMS: usize = 256;
/// Longest error message and field path, in characters, and longest value
/// quoted in a message: a manifest's text (and serde's quotes of it) ends
/// up in logs, terminals and `dynplug list`.
const MAX_MESSAGE: usize = 1024;
const MAX_FIELD: usize = 256;
const QUOTED: usize = 120;

/// A parsed and validated `plugin.json`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Manifest {
    /// Path-safe identifier; equals the plugin directory's name.
    pub name: String,
    /// Semantic version (semver 2).
    pub version: semver::Version,
    /// One line about the plugin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Contacts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maintainers: Vec<String>,
    /// Home page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    /// Where the plugin's code comes from.
    pub source: Source,
    /// How a native plugin's calls run.
    #[serde(default)]
    pub isolation: Isolation,
    /// Passed to the plugin's `init`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// HTTP routes served by the façade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_services: Option<HttpServices>,
    /// What the plugin offers to fan-outs (`PluginManager::chain`,
    /// `PluginManager::validate`), e.g. `CONNECTION`: upper-case names.
    /// Registered plugins get those they registered with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Resource limits of the child process (`isolation: "process"` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

/// `limits`: resource limits set (`setrlimit`) in the child process of a
/// plugin with `isolation: "process"`. Going over one is a crash of that
/// process, reported with its cause; the process is restarted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Limits {
    /// Address space of the process, in MiB (`RLIMIT_AS`): virtual memory,
    /// so leave room beyond what the plugin uses (at least 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Open file descriptors (`RLIMIT_NOFILE`; at least 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    /// CPU time of the process, in seconds (`RLIMIT_CPU`), over its whole
    /// life: SIGXCPU when it is used up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<u64>,
}

/// `source`: where a plugin's code comes from, by `mode`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Source {
    /// A `cdylib` in the plugin directory.
    LocalSo {
        /// Relative to the plugin directory; without extension, the platform's is added.
        path: String,
        /// Hex SHA-256 of the library, verified over the exact bytes loaded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
    },
    /// A crate in a git repository, built by the host.
    RemoteGit {
        /// A git URL or local repository path.
        path: String,
        /// Branch, tag or commit.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rev: Option<String>,
        /// The package to build, in a workspace.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        package: Option<String>,
    },
    /// A subprocess speaking REST or gRPC, started and supervised by the
    /// host (see `docs/exec-plugins.md`). Durations are in milliseconds;
    /// unset ones take the defaults documented there.
    Exec {
        /// The executable (a binary or a `#!` script), relative to the
        /// plugin directory (without `..`) or absolute.
        path: String,
        /// Arguments, before the address flag.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        args: Vec<String>,
        /// The wire protocol: `rest` or `grpc`.
        protocol: Protocol,
        /// Hex SHA-256 of the executable, verified over the bytes executed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        /// Hex MD5 of the executable (goplugin compatibility), verified likewise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        md5: Option<String>,
        /// Where the plugin listens: `tcp` (default) or `unix`.
        #[serde(default)]
        listen: Listen,
        /// The flag that passes the address: default `--port` (then the
        /// port number) for `tcp`, `--socket` (then the path) for `unix`.
        /// goplugin plugins take `-port`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listen_flag: Option<String>,
        /// How long the plugin may take to answer its first Ping (default 10,000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        start_timeout_ms: Option<u64>,
        /// Time between health pings (default 2,000; 0 turns them off).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health_interval_ms: Option<u64>,
        /// How long a health ping may take (default 1,000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health_timeout_ms: Option<u64>,
        /// Health pings missed in a row before the process is restarted (default 3).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health_misses: Option<u32>,
        /// The first delay between restarts after the immediate one (default 100).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restart_backoff_ms: Option<u64>,
        /// The longest delay between restarts (default 30,000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restart_backoff_max_ms: Option<u64>,
        /// Time between SIGTERM and SIGKILL when the process is stopped (default 2,000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop_grace_ms: Option<u64>,
    },
    /// An already running server that dynplug connects to and watches
    /// (see `docs/socket-plugins.md`). Durations are in milliseconds.
    Socket {
        /// A Unix socket path (relative to the plugin directory, without
        /// `..`, or absolute) or a `tcp://host:port` URL.
        path: String,
        /// The wire protocol: `grpc`, `rest`, `jsonrpc` or `docker`.
        protocol: Protocol,
        /// Time between health checks (default 2,000; 0 turns them off).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health_interval_ms: Option<u64>,
        /// How long a health check may take (default 1,000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health_timeout_ms: Option<u64>,
        /// Health checks missed in a row before the plugin is taken as
        /// unreachable (default 3).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        health_misses: Option<u32>,
        /// The first delay between reconnection attempts (default 100).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reconnect_backoff_ms: Option<u64>,
        /// The longest delay between reconnection attempts (default 30,000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reconnect_backoff_max_ms: Option<u64>,
        /// The user the server on a Unix socket must run as, checked on
        /// every connection (`SO_PEERCRED`); none: any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer_uid: Option<u32>,
    },
}

impl Source {
    /// The `mode` as written in the manifest.
    pub fn mode(&self) -> &'static str {
        match self {
            Source::LocalSo { .. } => "local_so",
            Source::RemoteGit { .. } => "remote_git",
            Source::Exec { .. } => "exec",
            Source::Socket { .. } => "socket",
        }
    }

    /// `source.path`.
    pub fn path(&self) -> &str {
        match self {
            Source::LocalSo { path, .. }
            | Source::RemoteGit { path, .. }
            | Source::Exec { path, .. }
            | Source::Socket { path, .. } => path,
        }
    }
}

/// Wire protocol of a socket-based plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Protocol {
    /// The goplugin `plugin.Plugin` gRPC service.
    Grpc,
    /// The goplugin REST protocol.
    Rest,
    /// JSON-RPC 2.0 over HTTP (InfraKit's plugins).
    Jsonrpc,
    /// Docker's plugin protocol: `POST /Plugin.Activate`, then
    /// `POST /<Service.Method>` with JSON bodies.
    Docker,
}

impl Protocol {
    /// The name as written in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Rest => "rest",
            Protocol::Jsonrpc => "jsonrpc",
            Protocol::Docker => "docker",
        }
    }
}

/// Where an exec plugin listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Listen {
    /// `127.0.0.1` on a free port, passed as `--port N`.
    #[default]
    Tcp,
    /// A Unix socket in a private directory, passed as `--socket PATH`.
    Unix,
}

impl Listen {
    /// The name as written in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Listen::Tcp => "tcp",
            Listen::Unix => "unix",
        }
    }
}

/// Where a native plugin's calls run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Isolation {
    /// On the caller's thread, always: fastest; a call holds its caller (an
    /// async runtime's worker too) until it returns. Unloaded when no thread
    /// holds state of its code, where dynplug sees that (see the crate docs).
    Inline,
    /// On worker threads owned by the loaded version, always: a caller can
    /// stop waiting at its deadline, and calls queue up to `queue_limit`.
    Pooled,
    /// On the caller's thread while its calls of that label are quick and,
    /// on an async runtime, another worker stays free; on the version's
    /// workers otherwise (on its workers always where dynplug does not see
    /// what plugin code leaves on threads).
    #[default]
    Auto,
    /// In a child process.
    Process,
}

impl Isolation {
    /// The name as written in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Inline => "inline",
            Isolation::Pooled => "pooled",
            Isolation::Auto => "auto",
            Isolation::Process => "process",
        }
    }
}

/// Whether `path` belongs to the HTTP server itself (management API,
/// metrics) rather than to plugin routes. One rule for the manifest check
/// and the server's dispatch.
pub(crate) fn is_reserved_path(path: &str) -> bool {
    path == "/metrics"
        || path
            .strip_prefix("/_dynplug")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `http_services`: routes served by the HTTP façade.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpServices {
    /// Must be `axum` when given (kept for goplugin compatibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The routes.
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// One HTTP route mapped to a label.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Route {
    /// Path pattern: `/` and segments that are literals, `:name` (one
    /// segment) or a last `*name` (the rest of the path), e.g.
    /// `/api/hello/:id`. At most 1,024 bytes.
    pub route: String,
    /// HTTP method, upper case.
    pub method: String,
    /// The label the plugin is called with.
    pub label: String,
    /// Deadline of each call on this route, in milliseconds (default: the server's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl Manifest {
    /// Reads and validates `<dir>/plugin.json`; the directory's name must equal `name`.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::Manifest`] naming the
    /// field if it is malformed or invalid.
    pub fn from_dir(dir: &Path) -> Result<Manifest> {
        Manifest::read_dir(dir).map(|(manifest, _)| manifest)
    }

    /// [`Manifest::from_dir`], with the bytes parsed (what a signature covers).
    pub(crate) fn read_dir(dir: &Path) -> Result<(Manifest, Vec<u8>)> {
        let path = dir.join(MANIFEST_FILE);
        // `dynplug verify .` names the directory by its real name.
        let real = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
        let dir_name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = crate::untrusted::read_file(&path, crate::untrusted::MAX_MANIFEST_BYTES)
            .map_err(|source| Error::Io {
                plugin: dir_name.clone(),
                action: "reading",
                path: path.clone(),
                source,
            })?;
        let manifest = Manifest::parse(&bytes, &path, &dir_name)?;
        if manifest.name != dir_name {
            return Err(invalid(
                &dir_name,
                &path,
                "name",
                format!(
                    "must equal the directory name `{dir_name}`, found `{}`",
                    manifest.name
                ),
            ));
        }
        Ok((manifest, bytes))
    }

    /// Parses and validates manifest bytes; `path` and `plugin` only label errors.
    ///
    /// # Errors
    /// [`Error::Manifest`] naming the field.
    pub fn parse(bytes: &[u8], path: &Path, plugin: &str) -> Result<Manifest> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let manifest: Manifest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            // serde_path_to_error says `?` when the document itself is cut short.
            let field = match e.path().to_string() {
                p if p == "?" => ".".to_owned(),
                p => p,
            };
            invalid(plugin, path, &field, e.into_inner().to_string())
        })?;
        // The deserializer stops after one value: without this, `{…} junk`
        // and two concatenated objects passed as the first object.
        de.end().map_err(|e| {
            invalid(
                plugin,
                path,
                ".",
                format!("expected one JSON object and nothing after it: {e}"),
            )
        })?;
        manifest.validate(path, plugin)?;
        Ok(manifest)
    }

    fn validate(&self, path: &Path, plugin: &str) -> Result<()> {
        let fail = |field: &str, message: String| Err(invalid(plugin, path, field, message));
        if !is_path_safe(&self.name) {
            return fail(
                "name",
                format!(
                    "expected 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit, found `{}`",
                    quote(&self.name)
                ),
            );
        }
        let version = self.version.to_string();
        if version.len() > MAX_VERSION_LEN {
            return fail(
                "version",
                format!(
                    "expected at most {MAX_VERSION_LEN} characters, found {}: `{}`",
                    version.len(),
                    quote(&version)
                ),
            );
        }
        self.check_text_sizes()
            .map_err(|(field, message)| invalid(plugin, path, &field, message))?;
        match &self.source {
            Source::LocalSo { path: p, sha256 } => {
                if let Err(why) = check_relative(p) {
                    return fail("source.path", why);
                }
                if let Some(h) = sha256.as_deref().filter(|h| !is_hex(h, 64)) {
                    return fail(
                        "source.sha256",
                        format!("expected 64 hex digits, found `{}`", quote(h)),
                    );
                }
            }
            Source::Exec { .. } => {
                validate_exec(&self.source)
                    .map_err(|(field, message)| invalid(plugin, path, &field, message))?;
            }
            Source::RemoteGit { path: p, .. } => {
                if p.is_empty() {
                    return fail("source.path", "expected a non-empty path".into());
                }
            }
            Source::Socket { .. } => {
                validate_socket(&self.source)
                    .map_err(|(field, message)| invalid(plugin, path, &field, message))?;
            }
        }
        if let Some(limits) = &self.limits {
            validate_limits(limits, self.isolation, &self.source)
                .map_err(|(field, message)| invalid(plugin, path, &field, message))?;
        }
        validate_capabilities(&self.capabilities)
            .map_err(|(field, message)| invalid(plugin, path, &field, message))?;
        if let Some(http) = &self.http_services {
            if let Some(driver) = http.driver.as_deref().filter(|d| *d != "axum") {
                return fail(
                    "http_services.driver",
                    format!("expected \"axum\", found `{}`", quote(driver)),
                );
            }
            validate_routes(&http.routes)
                .map_err(|(field, message)| invalid(plugin, path, &field, message))?;
        }
        Ok(())
    }

    /// Bounds every free text, so that no manifest value is unbounded
    /// anywhere downstream (file names, logs, errors, the web page).
    fn check_text_sizes(&self) -> std::result::Result<(), (String, String)> {
        let mut texts: Vec<(String, &str, usize)> = Vec::new();
        let mut lists: Vec<(&str, usize)> = vec![("maintainers", self.maintainers.len())];
        if let Some(description) = &self.description {
            texts.push(("description".into(), description, MAX_LONG_TEXT));
        }
        if let Some(home) = &self.home {
            texts.push(("home".into(), home, MAX_LONG_TEXT));
        }
        for (i, maintainer) in self.maintainers.iter().enumerate().take(MAX_ITEMS + 1) {
            texts.push((format!("maintainers[{i}]"), maintainer, MAX_SHORT_TEXT));
        }
        texts.push(("source.path".into(), self.source.path(), MAX_LONG_TEXT));
        match &self.source {
            Source::RemoteGit { rev, package, .. } => {
                texts.extend(
                    rev.as_deref()
                        .map(|r| ("source.rev".into(), r, MAX_SHORT_TEXT)),
                );
                texts.extend(
                    package
                        .as_deref()
                        .map(|p| ("source.package".into(), p, MAX_SHORT_TEXT)),
                );
            }
            Source::Exec { args, .. } => {
                lists.push(("source.args", args.len()));
                for (i, arg) in args.iter().enumerate().take(MAX_ITEMS + 1) {
                    texts.push((format!("source.args[{i}]"), arg, MAX_LONG_TEXT));
                }
            }
            Source::LocalSo { .. } | Source::Socket { .. } => {}
        }
        if let Some((field, len)) = lists.into_iter().find(|(_, len)| *len > MAX_ITEMS) {
            return Err((
                field.to_owned(),
                format!("expected at most {MAX_ITEMS} entries, found {len}"),
            ));
        }
        match texts.into_iter().find(|(_, text, max)| text.len() > *max) {
            Some((field, text, max)) => Err((
                field,
                format!(
                    "expected at most {max} bytes, found {}: `{}`",
                    text.len(),
                    quote(text)
                ),
            )),
            None => Ok(()),
        }
    }

    /// The routes of `http_services` (empty without it).
    pub fn routes(&self) -> &[Route] {
        self.http_services.as_ref().map_or(&[], |h| &h.routes)
    }

    /// The routes with their method and pattern parsed. A route that does
    /// not parse (only possible in a manifest that did not come through
    /// [`Manifest::parse`]) is left out, as the route table leaves it out.
    pub(crate) fn parsed_routes(&self) -> impl Iterator<Item = (Method, Pattern, &Route)> {
        self.routes().iter().filter_map(|route| {
            let method = Method::parse(&route.method)?;
            Some((method, Pattern::parse(&route.route).ok()?, route))
        })
    }

    /// The `config` object converted for the plugin's `init` (`Null` without one).
    pub fn config_value(&self) -> plugin_abi::Value {
        self.config
            .clone()
            .map_or(plugin_abi::Value::Null, Into::into)
    }

    /// For `local_so`: the library path inside `dir`, with the platform's
    /// extension added when `source.path` has none of `.so`, `.dylib`, `.dll`
    /// (so `libfoo-1.2` becomes `libfoo-1.2.so`, `libfoo.so.1` stays).
    pub fn library_path(&self, dir: &Path) -> Option<PathBuf> {
        match &self.source {
            Source::LocalSo { path, .. } => {
                let has_extension = path.contains(".so.")
                    || [".so", ".dylib", ".dll"]
                        .iter()
                        .any(|ext| path.ends_with(ext));
                Some(if has_extension {
                    dir.join(path)
                } else {
                    dir.join(format!("{path}.{}", std::env::consts::DLL_EXTENSION))
                })
            }
            _ => None,
        }
    }

    /// The file the plugin runs from, inside `dir`: the library of
    /// `local_so`, the executable of `exec` (absolute paths as given). A
    /// change to it is an upgrade. `None` for kinds without a file.
    pub fn artifact_path(&self, dir: &Path) -> Option<PathBuf> {
        match &self.source {
            Source::LocalSo { .. } => self.library_path(dir),
            Source::Exec { path, .. } => Some(dir.join(path)),
            _ => None,
        }
    }
}

/// A manifest error with its field and message made printable and bounded.
fn invalid(plugin: &str, path: &Path, field: &str, message: String) -> Error {
    Error::Manifest {
        plugin: plugin.to_owned(),
        path: path.to_owned(),
        field: printable(field, MAX_FIELD).into_owned(),
        message: printable(&message, MAX_MESSAGE).into_owned(),
    }
}

/// A manifest value to quote in a message: printable, cut.
fn quote(text: &str) -> std::borrow::Cow<'_, str> {
    printable(text, QUOTED)
}

/// Whether `name` can be used as a directory and file name component everywhere.
pub(crate) fn is_path_safe(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn check_relative(path: &str) -> std::result::Result<(), String> {
    if path.is_empty() {
        return Err("expected a file name, found an empty string".into());
    }
    for component in Path::new(path).components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            _ => {
                return Err(format!(
                    "must stay inside the plugin directory (relative, no `..`), found `{}`",
                    quote(path)
                ));
            }
        }
    }
    Ok(())
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Manifest> {
        Manifest::parse(json.as_bytes(), Path::new("p/plugin.json"), "p")
    }

    fn field_of(json: &str) -> (String, String) {
        match parse(json) {
            Err(Error::Manifest { field, message, .. }) => (field, message),
            other => panic!("expected a manifest error, got {other:?}"),
        }
    }

    const MINIMAL: &str =
        r#"{"name":"p","version":"1.0.0","source":{"mode":"local_so","path":"libp"}}"#;

    #[test]
    fn minimal_manifest_defaults_to_auto() {
        let m = parse(MINIMAL).unwrap();
        assert_eq!(m.isolation, Isolation::Auto);
        assert_eq!(
            m.library_path(Path::new("d")).unwrap(),
            Path::new("d").join(format!("libp.{}", std::env::consts::DLL_EXTENSION))
        );
    }

    #[test]
    fn library_extension_is_added_only_when_missing() {
        let with = |path: &str| {
            let json = format!(
                r#"{{"name":"p","version":"1.0.0","source":{{"mode":"local_so","path":"{path}"}}}}"#
            );
            let m = parse(&json).unwrap();
            m.library_path(Path::new("d"))
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        let ext = std::env::consts::DLL_EXTENSION;
        assert_eq!(with("libfoo"), format!("libfoo.{ext}"));
        assert_eq!(with("libfoo-1.2"), format!("libfoo-1.2.{ext}"));
        assert_eq!(with("libfoo.so"), "libfoo.so");
        assert_eq!(with("libfoo.so.1"), "libfoo.so.1");
        assert_eq!(with("libfoo.dylib"), "libfoo.dylib");
    }

    #[test]
    fn example_manifest_is_valid() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/plugin.json.example"))
                .unwrap();
        let m =
            Manifest::parse(text.as_bytes(), Path::new("plugin.json.example"), "hello").unwrap();
        assert_eq!(m.routes().len(), 2);
    }

    #[test]
    fn exec_example_manifest_is_valid() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/plugin.exec.json.example"
        ))
        .unwrap();
        let m = Manifest::parse(
            text.as_bytes(),
            Path::new("plugin.exec.json.example"),
            "greeter",
        )
        .unwrap();
        assert!(matches!(
            m.source,
            Source::Exec {
                listen: Listen::Unix,
                ..
            }
        ));
    }

    #[test]
    fn exec_fields_are_checked_and_named() {
        let exec = |fields: &str| {
            format!(
                r#"{{"name":"p","version":"1.0.0","source":{{"mode":"exec","path":"bin/p","protocol":"rest"{fields}}}}}"#
            )
        };
        parse(&exec("")).unwrap();
        parse(&exec("").replace("bin/p", "/usr/local/bin/p")).unwrap();
        for (fields, field, part) in [
            (
                r#","protocol":"jsonrpc""#,
                "source.protocol",
                "is for source.mode \"socket\"",
            ),
            (
                r#","listen_flag":"port""#,
                "source.listen_flag",
                "a flag such as `--port`",
            ),
            (
                r#","listen_flag":"--port=1""#,
                "source.listen_flag",
                "without `=`",
            ),
            (
                r#","start_timeout_ms":0"#,
                "source.start_timeout_ms",
                "expected 1 to 3600000",
            ),
            (
                r#","health_misses":0"#,
                "source.health_misses",
                "expected 1 to 1000",
            ),
            (
                r#","restart_backoff_ms":500,"restart_backoff_max_ms":100"#,
                "source.restart_backoff_ms",
                "above restart_backoff_max_ms",
            ),
            (r#","md5":"abc""#, "source.md5", "32 hex digits"),
        ] {
            let json = exec(fields).replacen(
                r#","protocol":"rest""#,
                "",
                usize::from(fields.contains("protocol")),
            );
            let (got, message) = field_of(&json);
            assert_eq!(got, field, "{fields}: {message}");
            assert!(message.contains(part), "{fields}: {message}");
        }
        let (field, message) = field_of(&exec("").replace("bin/p", "../p"));
        assert_eq!(field, "source.path");
        assert!(message.contains("or an absolute path"), "{message}");
        let (field, message) = field_of(&exec(r#","listen":"udp""#));
        assert_eq!(field, "source");
        assert!(message.contains("unknown variant `udp`"), "{message}");
        let (field, message) = field_of(&exec(r#","restart":true"#));
        assert_eq!(field, "source");
        assert!(message.contains("unknown field `restart`"), "{message}");
    }

    #[test]
    fn limits_are_for_process_isolation_and_bounded() {
        let with = |isolation: &str, limits: &str| {
            format!(
                r#"{{"name":"p","version":"1.0.0","isolation":"{isolation}","source":{{"mode":"local_so","path":"a"}},"limits":{limits}}}"#
            )
        };
        let m = parse(&with(
            "process",
            r#"{"memory_mb":256,"open_files":64,"cpu_seconds":5}"#,
        ))
        .unwrap();
        let limits = m.limits.unwrap();
        assert_eq!(limits.memory_mb, Some(256));
        assert_eq!((limits.open_files, limits.cpu_seconds), (Some(64), Some(5)));
        let (field, message) = field_of(&with("pooled", r#"{"memory_mb":256}"#));
        assert_eq!(field, "limits");
        assert!(message.contains("isolation \"process\" only"), "{message}");
        let (field, message) = field_of(&with("process", r#"{"memory_mb":1}"#));
        assert_eq!(field, "limits.memory_mb");
        assert!(message.contains("expected 64 to"), "{message}");
        let (field, _) = field_of(&with("process", r#"{"memroy_mb":100}"#));
        assert!(field.starts_with("limits"), "{field}");
    }

    #[test]
    fn every_mode_parses() {
        for source in [
            r#"{"mode":"remote_git","path":"https://example.com/x.git","rev":"v1","package":"x"}"#,
            r#"{"mode":"exec","path":"bin/x","args":["-v"],"protocol":"grpc","md5":"0123456789abcdef0123456789abcdef"}"#,
            r#"{"mode":"socket","path":"/run/x.sock","protocol":"jsonrpc"}"#,
            r#"{"mode":"socket","path":"tcp://127.0.0.1:9000","protocol":"docker","health_interval_ms":0}"#,
            r#"{"mode":"socket","path":"run/x.sock","protocol":"grpc","reconnect_backoff_ms":5,"reconnect_backoff_max_ms":50}"#,
        ] {
            let json = format!(r#"{{"name":"p","version":"1.0.0","source":{source}}}"#);
            parse(&json).unwrap();
        }
    }

    #[test]
    fn socket_fields_and_capabilities_are_checked_and_named() {
        let socket = |fields: &str| {
            field_of(&format!(
                r#"{{"name":"p","version":"1.0.0","source":{{"mode":"socket","protocol":"jsonrpc",{fields}}}}}"#
            ))
        };
        for (fields, field, why) in [
            (r#""path":"tcp://host""#, "source.path", "tcp://HOST:PORT"),
            (r#""path":"tcp://h:0""#, "source.path", "1 to 65535"),
            (
                r#""path":"http://h:1""#,
                "source.path",
                "Unix socket path or tcp://",
            ),
            (r#""path":"../x.sock""#, "source.path", "no `..`"),
            (
                r#""path":"x","health_timeout_ms":0"#,
                "source.health_timeout_ms",
                "1 to",
            ),
            (
                r#""path":"x","health_misses":0"#,
                "source.health_misses",
                "1 to 1000",
            ),
            (
                r#""path":"x","reconnect_backoff_ms":9,"reconnect_backoff_max_ms":5"#,
                "source.reconnect_backoff_ms",
                "above",
            ),
        ] {
            let (f, m) = socket(fields);
            assert_eq!(f, field, "{fields}: {m}");
            assert!(m.contains(why), "{fields}: {m}");
        }
        let (field, message) = field_of(
            r#"{"name":"p","version":"1.0.0","capabilities":["CONNECTION","conn"],"source":{"mode":"local_so","path":"a"}}"#,
        );
        assert_eq!(field, "capabilities[1]");
        assert!(message.contains("upper-case"), "{message}");
        let (field, _) = field_of(
            r#"{"name":"p","version":"1.0.0","capabilities":["A","A"],"source":{"mode":"local_so","path":"a"}}"#,
        );
        assert_eq!(field, "capabilities[1]");
        let (field, message) = field_of(
            r#"{"name":"p","version":"1.0.0","source":{"mode":"exec","path":"x","protocol":"docker"}}"#,
        );
        assert_eq!(field, "source.protocol");
        assert!(
            message.contains("\"docker\" is for source.mode \"socket\""),
            "{message}"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let (field, message) = field_of(
            r#"{"name":"p","version":"1.0.0","verison":"x","source":{"mode":"local_so","path":"a"}}"#,
        );
        assert_eq!(field, "verison");
        assert!(message.contains("unknown field `verison`"), "{message}");
        let (field, message) = field_of(
            r#"{"name":"p","version":"1.0.0","source":{"mode":"local_so","path":"a","sha":"x"}}"#,
        );
        // serde buffers an internally tagged enum, so the path stops at `source`.
        assert_eq!(field, "source");
        assert!(message.contains("unknown field `sha`"), "{message}");
    }

    #[test]
    fn bad_values_name_field_and_expectation() {
        let cases = [
            (
                r#"{"name":"p","version":"1.0","source":{"mode":"local_so","path":"a"}}"#,
                "version",
            ),
            (
                r#"{"name":"p","version":"1.0.0","source":{"mode":"ftp","path":"a"}}"#,
                "source.mode",
            ),
            (
                r#"{"name":"p","version":"1.0.0","source":{"mode":"local_so","path":"../x"}}"#,
                "source.path",
            ),
            (
                r#"{"name":"p","version":"1.0.0","source":{"mode":"local_so","path":"/x"}}"#,
                "source.path",
            ),
            (
                r#"{"name":"p","version":"1.0.0","source":{"mode":"local_so","path":"a","sha256":"zz"}}"#,
                "source.sha256",
            ),
            (
                r#"{"name":"../p","version":"1.0.0","source":{"mode":"local_so","path":"a"}}"#,
                "name",
            ),
            (
                r#"{"name":"p","version":"1.0.0","isolation":"thread","source":{"mode":"local_so","path":"a"}}"#,
                "isolation",
            ),
            (
                r#"{"name":"p","version":"1.0.0","source":{"mode":"local_so","path":"a"},"http_services":{"routes":[{"route":"/a","method":"GET","label":"x"},{"route":"/b","method":"FETCH","label":"x"}]}}"#,
                "http_services.routes[1].method",
            ),
            (
                r#"{"name":"p","version":"1.0.0","source":{"mode":"local_so","path":"a"},"http_services":{"routes":[{"route":"a","method":"GET","label":"x"}]}}"#,
                "http_services.routes[0].route",
            ),
            (
                r#"{"name":"p","version":"1.0.0","source":{"mode":"local_so","path":"a"},"http_services":{"routes":[{"route":"/_dynplug/plugins","method":"GET","label":"x"}]}}"#,
                "http_services.routes[0].route",
            ),
            (
                r#"{"name":"p","version":"1.0.0","source":{"mode":"local_so","path":"a"},"http_services":{"routes":[{"route":"/metrics","method":"GET","label":"x"}]}}"#,
                "http_services.routes[0].route",
            ),
            (
                r#"{"name":"p","version":"1.0.0","source":{"mode":"exec","path":"x"}}"#,
                "source",
            ),
            (r#"{"name":"p","version":"1.0.0""#, "."),
        ];
        for (json, want) in cases {
            let (field, message) = field_of(json);
            assert_eq!(field, want, "{json}: {message}");
            assert!(!message.is_empty());
        }
    }

    fn with_routes(routes: &str) -> String {
        format!(
            r#"{{"name":"p","version":"1.0.0","source":{{"mode":"local_so","path":"a"}},"http_services":{{"routes":[{routes}]}}}}"#
        )
    }

    #[test]
    fn invalid_route_patterns_are_refused_with_the_rule() {
        for (route, want) in [
            ("/api/hello/{name}", "`{` and `}` are not route syntax"),
            ("/a/{", "`{` and `}` are not route syntax"),
            ("/a/:", "expected a parameter name after `:`"),
            ("/a/*", "expected a parameter name after `*`"),
            ("/a/*rest/b", "must be the last segment"),
            ("/a//b", "segment 2 is empty"),
            ("/a/:x/:x", "`x` appears twice"),
        ] {
            let json = with_routes(&format!(
                r#"{{"route":"/ok","method":"GET","label":"x"}},{{"route":"{route}","method":"GET","label":"x"}}"#
            ));
            let (field, message) = field_of(&json);
            assert_eq!(field, "http_services.routes[1].route", "{route}");
            assert!(message.contains(want), "{route}: {message}");
        }
        let long = format!("/{}", "a".repeat(2000));
        let (field, message) = field_of(&with_routes(&format!(
            r#"{{"route":"{long}","method":"GET","label":"x"}}"#
        )));
        assert_eq!(field, "http_services.routes[0].route");
        assert!(
            message.contains("at most 1024 bytes long, found 2001"),
            "{message}"
        );
    }

    #[test]
    fn a_route_repeated_up_to_parameter_names_is_refused_overlaps_are_not() {
        let (field, message) = field_of(&with_routes(
            r#"{"route":"/a/:x","method":"GET","label":"x"},{"route":"/a/:y","method":"GET","label":"y"}"#,
        ));
        assert_eq!(field, "http_services.routes[1].route");
        assert!(
            message.contains("repeats routes[0] (`GET /a/:x`)"),
            "{message}"
        );
        // One plugin may overlap itself: precedence decides; HEAD may have its own.
        parse(&with_routes(
            r#"{"route":"/a/:x","method":"GET","label":"x"},{"route":"/a/b","method":"GET","label":"y"},{"route":"/a/*r","method":"GET","label":"z"},{"route":"/a/:x","method":"HEAD","label":"h"}"#,
        ))
        .unwrap();
    }

    #[test]
    fn at_most_1024_routes() {
        let route = r#"{"route":"/a","method":"GET","label":"x"}"#;
        let json = with_routes(&vec![route; 100_000].join(","));
        let (field, message) = field_of(&json);
        assert_eq!(field, "http_services.routes");
        assert_eq!(message, "at most 1024 routes, found 100000");
        let distinct: Vec<String> = (0..1024)
            .map(|i| format!(r#"{{"route":"/r/{i}","method":"GET","label":"x"}}"#))
            .collect();
        assert_eq!(
            parse(&with_routes(&distinct.join(",")))
                .unwrap()
                .routes()
                .len(),
            1024
        );
    }

    #[test]
    fn trailing_text_after_the_object_is_refused() {
        for tail in [" x", "{}", r#"{"name":"q"}"#, ",", "]"] {
            let (field, message) = field_of(&format!("{MINIMAL}{tail}"));
            assert_eq!(field, ".", "{tail}");
            assert!(
                message.starts_with(
                    "expected one JSON object and nothing after it: trailing characters"
                ),
                "{message}"
            );
        }
        parse(&format!(" {MINIMAL}\n\t ")).unwrap();
    }

    #[test]
    fn long_values_are_refused_with_bounded_printable_messages() {
        let long_version = format!("1.0.0-{}", "a".repeat(5000));
        let (field, message) = field_of(&MINIMAL.replace("1.0.0", &long_version));
        assert_eq!(field, "version");
        assert!(
            message.starts_with("expected at most 128 characters, found 5006"),
            "{message}"
        );
        let with =
            |key: &str, value: &str| MINIMAL.replacen('{', &format!(r#"{{"{key}":{value},"#), 1);
        let big = format!(r#""{}""#, "d".repeat(5000));
        assert_eq!(field_of(&with("description", &big)).0, "description");
        assert_eq!(field_of(&with("home", &big)).0, "home");
        assert_eq!(
            field_of(&with("maintainers", &format!("[{big}]"))).0,
            "maintainers[0]"
        );
        let many = format!("[{}]", vec![r#""m""#; 300].join(","));
        assert_eq!(field_of(&with("maintainers", &many)).0, "maintainers");
        let (field, message) = field_of(&with_routes(&format!(
            r#"{{"route":"/a","method":"GET","label":{big}}}"#
        )));
        assert_eq!(field, "http_services.routes[0].label");
        assert!(message.chars().count() < 300, "{message}");
        let (field, message) = field_of(&with_routes(
            r#"{"route":"/a","method":"GET","label":"a\u001b[2Jb"}"#,
        ));
        assert_eq!(field, "http_services.routes[0].label");
        assert!(
            message.ends_with("without control characters, found `a\\u{1b}[2Jb`"),
            "{message}"
        );
    }

    #[test]
    fn escapes_and_huge_keys_from_the_file_are_escaped_and_cut() {
        // serde quotes the unknown key in its message, and the key is the field.
        let key = format!("\\u001b]0;pwned\\u0007\\u001b[31m{}", "k".repeat(70_000));
        let (field, message) = field_of(&MINIMAL.replacen('{', &format!(r#"{{"{key}":1,"#), 1));
        for text in [&field, &message] {
            assert!(!text.contains(char::is_control), "{text:.200}");
            assert!(text.contains("\\u{1b}]0;pwned\\u{7}"), "{text:.200}");
            assert!(text.ends_with('…'));
        }
        assert!(field.chars().count() <= 256 && message.chars().count() <= 1024);
        let (_, message) = field_of(&with_routes(
            r#"{"route":"/a","method":"G\u001b[2JET","label":"x"}"#,
        ));
        assert!(message.contains("found `G\\u{1b}[2JET`"), "{message}");
    }

    #[test]
    fn reserved_paths() {
        for path in [
            "/metrics",
            "/_dynplug",
            "/_dynplug/",
            "/_dynplug/plugins/:name",
        ] {
            assert!(is_reserved_path(path), "{path}");
        }
        for path in ["/", "/metrics/x", "/_dynplugs", "/api/_dynplug", "/metric"] {
            assert!(!is_reserved_path(path), "{path}");
        }
    }

    #[test]
    fn directory_name_must_match() {
        let dir = tempfile::tempdir().unwrap();
        let plugin_dir = dir.path().join("other");
        std::fs::create_dir(&plugin_dir).unwrap();
        std::fs::write(plugin_dir.join(MANIFEST_FILE), MINIMAL).unwrap();
        let err = Manifest::from_dir(&plugin_dir).unwrap_err();
        assert!(
            err.to_string()
                .contains("must equal the directory name `other`"),
            "{err}"
        );
    }
}
