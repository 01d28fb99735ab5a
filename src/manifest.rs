//! `plugin.json`: parsing and validation.
//!
//! Parsing is strict: unknown keys are errors (a typo must not be silently
//! ignored), and every error names the file, the field and what was expected.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The manifest file's name inside a plugin directory.
pub const MANIFEST_FILE: &str = "plugin.json";

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
    /// A subprocess speaking REST or gRPC.
    Exec {
        /// The executable, relative to the plugin directory or absolute.
        path: String,
        /// Arguments before `--port N`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        args: Vec<String>,
        /// The wire protocol.
        protocol: Protocol,
        /// Hex SHA-256 of the executable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        /// Hex MD5 of the executable (goplugin compatibility).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        md5: Option<String>,
    },
    /// An already running server.
    Socket {
        /// A Unix socket path or a `tcp://host:port` URL.
        path: String,
        /// The wire protocol.
        protocol: Protocol,
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
    /// JSON-RPC 2.0 over HTTP.
    Jsonrpc,
}

/// Where a native plugin's calls run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Isolation {
    /// On the caller's thread: fastest; a replaced version is never unloaded.
    Inline,
    /// On worker threads owned by the loaded version, so it can be drained and unloaded.
    #[default]
    Pooled,
    /// In a child process.
    Process,
}

impl Isolation {
    /// The name as written in the manifest.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Inline => "inline",
            Isolation::Pooled => "pooled",
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
    /// Path pattern with `:param` segments, e.g. `/api/hello/:id`.
    pub route: String,
    /// HTTP method, upper case.
    pub method: String,
    /// The label the plugin is called with.
    pub label: String,
    /// Deadline of each call on this route, in milliseconds (default: the server's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl Route {
    /// The route with parameter names erased (`/a/:id` → `/a/:`), for
    /// comparing routes that would match the same requests.
    pub fn shape(&self) -> String {
        self.route
            .split('/')
            .map(|seg| {
                if seg.starts_with(':') {
                    ":"
                } else if seg.starts_with('*') {
                    "*"
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

impl Manifest {
    /// Reads and validates `<dir>/plugin.json`; the directory's name must equal `name`.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::Manifest`] naming the
    /// field if it is malformed or invalid.
    pub fn from_dir(dir: &Path) -> Result<Manifest> {
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
        Ok(manifest)
    }

    /// Parses and validates manifest bytes; `path` and `plugin` only label errors.
    ///
    /// # Errors
    /// [`Error::Manifest`] naming the field.
    pub fn parse(bytes: &[u8], path: &Path, plugin: &str) -> Result<Manifest> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let manifest: Manifest = serde_path_to_error::deserialize(de).map_err(|e| {
            // serde_path_to_error says `?` when the document itself is cut short.
            let field = match e.path().to_string() {
                p if p == "?" => ".".to_owned(),
                p => p,
            };
            invalid(plugin, path, &field, e.into_inner().to_string())
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
                    self.name
                ),
            );
        }
        match &self.source {
            Source::LocalSo { path: p, sha256 } => {
                if let Err(why) = check_relative(p) {
                    return fail("source.path", why);
                }
                if let Some(h) = sha256.as_deref().filter(|h| !is_hex(h, 64)) {
                    return fail(
                        "source.sha256",
                        format!("expected 64 hex digits, found `{h}`"),
                    );
                }
            }
            Source::Exec {
                path: p,
                sha256,
                md5,
                ..
            } => {
                if p.is_empty() {
                    return fail(
                        "source.path",
                        "expected an executable path, found an empty string".into(),
                    );
                }
                if let Some(h) = sha256.as_deref().filter(|h| !is_hex(h, 64)) {
                    return fail(
                        "source.sha256",
                        format!("expected 64 hex digits, found `{h}`"),
                    );
                }
                if let Some(h) = md5.as_deref().filter(|h| !is_hex(h, 32)) {
                    return fail("source.md5", format!("expected 32 hex digits, found `{h}`"));
                }
            }
            Source::RemoteGit { path: p, .. } | Source::Socket { path: p, .. } => {
                if p.is_empty() {
                    return fail("source.path", "expected a non-empty path".into());
                }
            }
        }
        if let Some(http) = &self.http_services {
            if let Some(driver) = http.driver.as_deref().filter(|d| *d != "axum") {
                return fail(
                    "http_services.driver",
                    format!("expected \"axum\", found `{driver}`"),
                );
            }
            for (i, route) in http.routes.iter().enumerate() {
                let field = |name: &str| format!("http_services.routes[{i}].{name}");
                if !route.route.starts_with('/') {
                    return fail(
                        &field("route"),
                        format!("expected a path starting with `/`, found `{}`", route.route),
                    );
                }
                if is_reserved_path(&route.route) {
                    return fail(
                        &field("route"),
                        format!(
                            "`{}` is reserved for dynplug's management API and metrics (`/_dynplug/...`, `/metrics`)",
                            route.route
                        ),
                    );
                }
                if !METHODS.contains(&route.method.as_str()) {
                    return fail(
                        &field("method"),
                        format!(
                            "expected one of {}, found `{}`",
                            METHODS.join(", "),
                            route.method
                        ),
                    );
                }
                if route.label.is_empty() {
                    return fail(&field("label"), "expected a non-empty label".into());
                }
                if route.timeout_ms == Some(0) {
                    return fail(
                        &field("timeout_ms"),
                        "expected a positive number of milliseconds, found 0".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The routes of `http_services` (empty without it).
    pub fn routes(&self) -> &[Route] {
        self.http_services.as_ref().map_or(&[], |h| &h.routes)
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
}

fn invalid(plugin: &str, path: &Path, field: &str, message: String) -> Error {
    Error::Manifest {
        plugin: plugin.to_owned(),
        path: path.to_owned(),
        field: field.to_owned(),
        message,
    }
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
                    "must stay inside the plugin directory (relative, no `..`), found `{path}`"
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
    fn minimal_manifest_defaults_to_pooled() {
        let m = parse(MINIMAL).unwrap();
        assert_eq!(m.isolation, Isolation::Pooled);
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
    fn every_mode_parses() {
        for source in [
            r#"{"mode":"remote_git","path":"https://example.com/x.git","rev":"v1","package":"x"}"#,
            r#"{"mode":"exec","path":"bin/x","args":["-v"],"protocol":"grpc","md5":"0123456789abcdef0123456789abcdef"}"#,
            r#"{"mode":"socket","path":"/run/x.sock","protocol":"jsonrpc"}"#,
        ] {
            let json = format!(r#"{{"name":"p","version":"1.0.0","source":{source}}}"#);
            parse(&json).unwrap();
        }
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
