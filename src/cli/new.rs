//! `dynplug new NAME`: a plugin crate that builds and loads the first time,
//! with a unit test of its `execute`: a native plugin (a `cdylib` against
//! `plugin-abi`), or with `--kind exec` a program speaking goplugin's REST
//! protocol.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Where the new crate's `plugin-abi` comes from.
pub(crate) enum AbiSource {
    /// A `plugin-abi` crate directory.
    Path(PathBuf),
    /// crates.io, this host's exact version.
    Registry,
}

impl AbiSource {
    /// `--plugin-abi` (or `$DYNPLUG_PLUGIN_ABI`) when given, else this
    /// checkout's `plugin-abi` when the binary was built from source, else
    /// crates.io at this host's version.
    pub(crate) fn choose(given: Option<PathBuf>) -> AbiSource {
        if let Some(path) = given {
            return AbiSource::Path(path);
        }
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin-abi");
        if checkout.join("Cargo.toml").is_file() {
            AbiSource::Path(checkout)
        } else {
            AbiSource::Registry
        }
    }

    fn dependency(&self) -> String {
        match self {
            AbiSource::Path(path) => {
                let path = path.canonicalize().unwrap_or_else(|_| path.clone());
                format!("plugin-abi = {{ path = {:?} }}", path.display().to_string())
            }
            AbiSource::Registry => format!("plugin-abi = \"={}\"", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Which kind of plugin the crate builds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// A `cdylib` loaded into the host (`source.mode = "local_so"`).
    #[default]
    Native,
    /// A program the host starts and calls over REST (`source.mode = "exec"`).
    Exec,
}

/// Writes the crate `dir/NAME` and returns its directory.
pub(crate) fn create(
    name: &str,
    parent: &Path,
    kind: Kind,
    abi: &AbiSource,
) -> anyhow::Result<PathBuf> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        bail!(
            "`{name}` cannot name a plugin crate: use 1-64 letters, digits, `-` and `_`, starting with a letter"
        );
    }
    let dir = parent.join(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let lib = name.replace('-', "_");
    let files = match kind {
        Kind::Native => native_files(name, &lib, abi),
        Kind::Exec => exec_files(name),
    };
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.display()))?;
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

fn native_files(name: &str, lib: &str, abi: &AbiSource) -> [(&'static str, String); 5] {
    [
        ("Cargo.toml", cargo_toml(name, abi)),
        ("src/lib.rs", LIB_RS.replace("NAME", name)),
        (
            "plugin.json",
            PLUGIN_JSON.replace("LIB", lib).replace("NAME", name),
        ),
        ("README.md", README.replace("NAME", name)),
        (".gitignore", "/target\n".to_owned()),
    ]
}

fn exec_files(name: &str) -> [(&'static str, String); 5] {
    [
        ("Cargo.toml", EXEC_CARGO_TOML.replace("NAME", name)),
        ("src/main.rs", EXEC_MAIN_RS.replace("NAME", name)),
        ("plugin.json", EXEC_PLUGIN_JSON.replace("NAME", name)),
        ("README.md", README.replace("NAME", name)),
        (".gitignore", "/target\n".to_owned()),
    ]
}

fn cargo_toml(name: &str, abi: &AbiSource) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# A C-compatible dynamic library: what a dynplug host loads.
crate-type = ["cdylib"]

[dependencies]
# The plugin ABI of the dynplug that created this crate. A host refuses a
# plugin built against another ABI: keep this in step with your host (a
# path to its checkout, a git dependency, or its exact crates.io version).
{dependency}

# A workspace of its own, so the crate builds wherever it is created.
[workspace]
"#,
        dependency = abi.dependency()
    )
}

const LIB_RS: &str = r#"//! NAME: a dynplug plugin.

use plugin_abi::{Context, PluginError, export_plugin};

/// Runs one call; the label says which operation. Over HTTP the reply is
/// what it sets: `{"greeting": "hello, Ada"}`.
fn execute(ctx: &mut Context) -> Result<(), PluginError> {
    match ctx.label() {
        "NAME.hello" => {
            // A value set by the caller, else the route's `:name`.
            let who = ctx
                .get_str("name")
                .or_else(|| ctx.get_str_in("params", "name"))
                .unwrap_or("world");
            let greeting = format!("hello, {who}");
            ctx.set("greeting", greeting);
            Ok(())
        }
        other => Err(PluginError::new(format!("unknown label {other}"))),
    }
}

export_plugin!(execute);

#[cfg(test)]
mod tests {
    use plugin_abi::TestContext;

    use super::execute;

    #[test]
    fn says_hello() {
        let mut ctx = TestContext::new("NAME.hello").with("name", "Ada");
        execute(&mut ctx).unwrap();
        assert_eq!(ctx.get_str("greeting"), Some("hello, Ada"));
    }

    #[test]
    fn refuses_unknown_labels() {
        let mut ctx = TestContext::new("NAME.nope");
        assert!(execute(&mut ctx).is_err());
    }
}
"#;

const PLUGIN_JSON: &str = r#"{
  "name": "NAME",
  "version": "0.1.0",
  "description": "A dynplug plugin",
  "source": { "mode": "local_so", "path": "libLIB" },
  "http_services": {
    "routes": [
      { "route": "/api/NAME/:name", "method": "GET", "label": "NAME.hello" }
    ]
  }
}
"#;

const README: &str = r#"# NAME

A [dynplug](https://github.com/dynplug/dynplug) plugin.

```sh
cargo test                      # unit tests of execute, no host needed
dynplug dev                     # build, serve, rebuild and hot-upgrade on save
curl http://127.0.0.1:8080/api/NAME/Ada
dynplug pack                    # NAME-0.1.0.plg, ready to drop into a plugins directory
```
"#;

const EXEC_CARGO_TOML: &str = r#"[package]
name = "NAME"
version = "0.1.0"
edition = "2024"
publish = false

# An exec plugin: a program the dynplug host starts and calls over
# goplugin's REST protocol. Any language would do; this one is Rust.
[dependencies]
http-body-util = "0.1"
hyper = { version = "1", features = ["server", "http1"] }
hyper-util = { version = "0.1", features = ["tokio"] }
serde_json = "1"
tokio = { version = "1", features = ["rt", "net"] }

# A workspace of its own, so the crate builds wherever it is created.
[workspace]
"#;

const EXEC_PLUGIN_JSON: &str = r#"{
  "name": "NAME",
  "version": "0.1.0",
  "description": "A dynplug exec plugin",
  "source": { "mode": "exec", "path": "NAME", "protocol": "rest" },
  "http_services": {
    "routes": [
      { "route": "/api/NAME/:name", "method": "GET", "label": "NAME.hello" }
    ]
  }
}
"#;

const EXEC_MAIN_RS: &str = r#"//! NAME: a dynplug exec plugin over goplugin's REST protocol: `GET /ping`,
//! and `POST /exec` with `{"command", "payload"}`, the payload being the
//! hex of a JSON object of the call's values. It listens where the host
//! says: `--port N` on 127.0.0.1, or `--socket PATH`.

use std::convert::Infallible;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Map, Value, json};

/// Runs one call: the label (`command`) says which operation, the values
/// come in and go out as a JSON object. Over HTTP the reply is what it
/// returns: `{"greeting": "hello, Ada"}`.
fn execute(command: &str, values: &Map<String, Value>) -> Result<Value, String> {
    match command {
        "NAME.hello" => {
            // A value set by the caller, else the route's `:name`.
            let who = values
                .get("name")
                .or_else(|| values.get("params")?.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("world");
            Ok(json!({ "greeting": format!("hello, {who}") }))
        }
        other => Err(format!("unknown label {other}")),
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut port, mut socket) = (None, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" | "-port" => port = args.next(),
            "--socket" => socket = args.next(),
            _ => {}
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if let Some(path) = socket {
            let listener = tokio::net::UnixListener::bind(path)?;
            loop {
                let (stream, _) = listener.accept().await?;
                tokio::spawn(serve(stream));
            }
        } else {
            let port = port.unwrap_or_default();
            let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
            loop {
                let (stream, _) = listener.accept().await?;
                stream.set_nodelay(true)?;
                tokio::spawn(serve(stream));
            }
        }
    })
}

async fn serve<S>(stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let service = hyper::service::service_fn(handle);
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

async fn handle(request: Request<Incoming>) -> Result<Response<String>, Infallible> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/ping") => (
            StatusCode::OK,
            json!({"status": "success", "data": {"response": "pong"}}),
        ),
        (&Method::POST, "/exec") => match request.into_body().collect().await {
            Ok(body) => exec(&body.to_bytes()),
            Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        _ => error(StatusCode::NOT_FOUND, "not found"),
    };
    let mut response = Response::new(body.to_string());
    *response.status_mut() = status;
    Ok(response)
}

fn exec(body: &[u8]) -> (StatusCode, Value) {
    let request: Value = serde_json::from_slice(body).unwrap_or_default();
    let command = request["command"].as_str().unwrap_or_default();
    let payload = unhex(request["payload"].as_str().unwrap_or_default());
    let values: Map<String, Value> = serde_json::from_slice(&payload).unwrap_or_default();
    match execute(command, &values) {
        Ok(out) => (
            StatusCode::OK,
            json!({"status": "success", "data": {"response": hex(out.to_string().as_bytes())}}),
        ),
        // An application error: the host reports it, and never retries it.
        Err(message) => error(StatusCode::BAD_REQUEST, &message),
    }
}

fn error(status: StatusCode, message: &str) -> (StatusCode, Value) {
    (status, json!({"status": "error", "message": message}))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .filter_map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value, json};

    use super::execute;

    #[test]
    fn says_hello() {
        let values: Map<String, Value> = [("name".to_owned(), json!("Ada"))].into_iter().collect();
        let out = execute("NAME.hello", &values).unwrap();
        assert_eq!(out, json!({"greeting": "hello, Ada"}));
    }

    #[test]
    fn refuses_unknown_labels() {
        assert!(execute("NAME.nope", &Map::new()).is_err());
    }
}
"#;
