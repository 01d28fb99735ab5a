//! The checks of the parts of a manifest that have rules of their own:
//! process limits, exec and socket sources (their timings shared), the
//! capabilities offered to fan-outs, and the HTTP routes. Each returns the
//! field (as `source.path`) and why, for `Manifest::validate` to name.

use super::*;

/// Longest `source.listen_flag`, in bytes.
const MAX_FLAG: usize = 64;
/// Longest duration an exec plugin's manifest may ask for, in milliseconds
/// (an hour: longer would be a typo, and would not fit some clocks' math).
const MAX_EXEC_MS: u64 = 3_600_000;

/// `limits`: only for process isolation, each within its bounds.
pub(super) fn validate_limits(
    limits: &Limits,
    isolation: Isolation,
    source: &Source,
) -> std::result::Result<(), (String, String)> {
    if !matches!(source, Source::LocalSo { .. }) {
        return Err((
            "limits".into(),
            format!(
                "limits apply to native plugins (source.mode \"local_so\") with isolation \"process\", not to source.mode \"{}\"",
                source.mode()
            ),
        ));
    }
    if isolation != Isolation::Process {
        return Err((
            "limits".into(),
            format!(
                "limits apply to isolation \"process\" only, not \"{}\"",
                isolation.as_str()
            ),
        ));
    }
    let fields = [
        ("limits.memory_mb", limits.memory_mb, 64, 1 << 30),
        ("limits.open_files", limits.open_files, 16, 1 << 30),
        ("limits.cpu_seconds", limits.cpu_seconds, 1, 1 << 40),
    ];
    for (field, value, min, max) in fields {
        if let Some(value) = value.filter(|v| !(min..=max).contains(v)) {
            return Err((
                field.into(),
                format!("expected {min} to {max}, found {value}"),
            ));
        }
    }
    Ok(())
}

/// `source` of an `exec` plugin: every field named on error.
pub(super) fn validate_exec(source: &Source) -> std::result::Result<(), (String, String)> {
    let Source::Exec {
        path,
        protocol,
        sha256,
        md5,
        listen_flag,
        start_timeout_ms,
        health_interval_ms,
        health_timeout_ms,
        health_misses,
        restart_backoff_ms,
        restart_backoff_max_ms,
        stop_grace_ms,
        ..
    } = source
    else {
        return Ok(());
    };
    let fail = |field: &str, message: String| Err((format!("source.{field}"), message));
    if path.is_empty() {
        return fail(
            "path",
            "expected an executable path, found an empty string".into(),
        );
    }
    if !Path::new(path).is_absolute()
        && let Err(why) = check_relative(path)
    {
        return fail("path", format!("{why} (or an absolute path)"));
    }
    if matches!(protocol, Protocol::Jsonrpc | Protocol::Docker) {
        return fail(
            "protocol",
            format!(
                "exec plugins speak \"rest\" or \"grpc\" (goplugin's protocols); \"{}\" is for source.mode \"socket\"",
                protocol.as_str()
            ),
        );
    }
    if let Some(h) = sha256.as_deref().filter(|h| !is_hex(h, 64)) {
        return fail(
            "sha256",
            format!("expected 64 hex digits, found `{}`", quote(h)),
        );
    }
    if let Some(h) = md5.as_deref().filter(|h| !is_hex(h, 32)) {
        return fail(
            "md5",
            format!("expected 32 hex digits, found `{}`", quote(h)),
        );
    }
    if let Some(flag) = listen_flag {
        let valid = flag.len() <= MAX_FLAG
            && flag.len() > 1
            && flag.starts_with('-')
            && !flag.contains(|c: char| c == '=' || c.is_whitespace() || c.is_control());
        if !valid {
            return fail(
                "listen_flag",
                format!(
                    "expected a flag such as `--port` or `-port` (a `-`, then at most {MAX_FLAG} bytes without `=`, spaces or control characters), found `{}`",
                    quote(flag)
                ),
            );
        }
    }
    check_timings(
        &[
            ("start_timeout_ms", start_timeout_ms, 1),
            ("health_interval_ms", health_interval_ms, 0),
            ("health_timeout_ms", health_timeout_ms, 1),
            ("restart_backoff_ms", restart_backoff_ms, 0),
            ("restart_backoff_max_ms", restart_backoff_max_ms, 0),
            ("stop_grace_ms", stop_grace_ms, 0),
        ],
        (*health_misses, "pings"),
        [
            ("restart_backoff_ms", *restart_backoff_ms),
            ("restart_backoff_max_ms", *restart_backoff_max_ms),
        ],
    )
}

/// The timing fields exec and socket plugins share, each named on error
/// (`source.FIELD`): milliseconds within `min..=MAX_EXEC_MS`, health misses
/// (counted in `what`) 1 to 1000, and a first backoff not above the longest.
fn check_timings(
    millis: &[(&str, &Option<u64>, u64)],
    (misses, what): (Option<u32>, &str),
    [(first_name, first), (max_name, max)]: [(&str, Option<u64>); 2],
) -> std::result::Result<(), (String, String)> {
    let fail = |field: &str, message: String| Err((format!("source.{field}"), message));
    for &(field, value, min) in millis {
        if let Some(ms) = *value
            && !(min..=MAX_EXEC_MS).contains(&ms)
        {
            return fail(
                field,
                format!("expected {min} to {MAX_EXEC_MS} milliseconds, found {ms}"),
            );
        }
    }
    if let Some(misses) = misses
        && !(1..=1000).contains(&misses)
    {
        return fail(
            "health_misses",
            format!("expected 1 to 1000 {what}, found {misses}"),
        );
    }
    if let (Some(first), Some(max)) = (first, max)
        && first > max
    {
        return fail(first_name, format!("{first} is above {max_name} ({max})"));
    }
    Ok(())
}

/// Most `capabilities`, and the longest.
const MAX_CAPABILITIES: usize = 32;
const MAX_CAPABILITY: usize = 32;

/// `capabilities`: upper-case names (`CONNECTION`), each once.
pub(super) fn validate_capabilities(
    capabilities: &[String],
) -> std::result::Result<(), (String, String)> {
    if capabilities.len() > MAX_CAPABILITIES {
        return Err((
            "capabilities".into(),
            format!(
                "expected at most {MAX_CAPABILITIES} entries, found {}",
                capabilities.len()
            ),
        ));
    }
    for (i, capability) in capabilities.iter().enumerate() {
        let mut chars = capability.chars();
        let valid = matches!(chars.next(), Some('A'..='Z'))
            && capability.len() <= MAX_CAPABILITY
            && chars.all(|c| matches!(c, 'A'..='Z' | '0'..='9' | '_'));
        if !valid {
            return Err((
                format!("capabilities[{i}]"),
                format!(
                    "expected an upper-case name such as CONNECTION (A-Z, 0-9, _; at most {MAX_CAPABILITY}), found `{}`",
                    quote(capability)
                ),
            ));
        }
        if capabilities[..i].contains(capability) {
            return Err((
                format!("capabilities[{i}]"),
                format!("`{capability}` is listed twice"),
            ));
        }
    }
    Ok(())
}

/// Where a socket plugin listens, as `source.path` says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SocketPath<'a> {
    /// `tcp://host:port`.
    Tcp { host: &'a str, port: u16 },
    /// A Unix socket path, relative to the plugin directory or absolute.
    Unix(&'a Path),
}

impl SocketPath<'_> {
    /// Reads `source.path` of a socket plugin.
    pub(crate) fn parse(path: &str) -> std::result::Result<SocketPath<'_>, String> {
        if let Some(rest) = path.strip_prefix("tcp://") {
            let rest = rest.strip_suffix('/').unwrap_or(rest);
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("expected tcp://HOST:PORT, found `{}`", quote(path)))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            let port: u16 =
                port.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
                    format!("expected a port from 1 to 65535 in `{}`", quote(path))
                })?;
            if host.is_empty() || host.contains(['/', '@', '?', '#']) {
                return Err(format!("expected tcp://HOST:PORT, found `{}`", quote(path)));
            }
            return Ok(SocketPath::Tcp { host, port });
        }
        let unix = path.strip_prefix("unix:").unwrap_or(path);
        if unix.contains("://") {
            return Err(format!(
                "expected a Unix socket path or tcp://HOST:PORT, found `{}`",
                quote(path)
            ));
        }
        if !Path::new(unix).is_absolute() {
            check_relative(unix).map_err(|why| format!("{why} (or an absolute path)"))?;
        }
        // `sun_path` holds 108 bytes with its NUL.
        if unix.len() > 107 {
            return Err(format!(
                "a Unix socket path is at most 107 bytes, found {}",
                unix.len()
            ));
        }
        Ok(SocketPath::Unix(Path::new(unix)))
    }
}

/// `source` of a `socket` plugin: every field named on error.
pub(super) fn validate_socket(source: &Source) -> std::result::Result<(), (String, String)> {
    let Source::Socket {
        path,
        health_interval_ms,
        health_timeout_ms,
        health_misses,
        reconnect_backoff_ms,
        reconnect_backoff_max_ms,
        peer_uid,
        ..
    } = source
    else {
        return Ok(());
    };
    let fail = |field: &str, message: String| Err((format!("source.{field}"), message));
    match SocketPath::parse(path) {
        Err(why) => return fail("path", why),
        Ok(SocketPath::Tcp { .. }) if peer_uid.is_some() => {
            return fail(
                "peer_uid",
                "is checked on Unix sockets only (TCP peers have no user)".into(),
            );
        }
        Ok(_) => {}
    }
    check_timings(
        &[
            ("health_interval_ms", health_interval_ms, 0),
            ("health_timeout_ms", health_timeout_ms, 1),
            ("reconnect_backoff_ms", reconnect_backoff_ms, 1),
            ("reconnect_backoff_max_ms", reconnect_backoff_max_ms, 1),
        ],
        (*health_misses, "checks"),
        [
            ("reconnect_backoff_ms", *reconnect_backoff_ms),
            ("reconnect_backoff_max_ms", *reconnect_backoff_max_ms),
        ],
    )
}

/// `http_services.routes`: the count first (so a huge list costs nothing
/// more), then each route, then exact duplicates. Overlapping routes of one
/// plugin are fine: precedence decides between them.
pub(super) fn validate_routes(routes: &[Route]) -> std::result::Result<(), (String, String)> {
    if routes.len() > MAX_ROUTES {
        return Err((
            "http_services.routes".into(),
            format!("at most {MAX_ROUTES} routes, found {}", routes.len()),
        ));
    }
    let mut declared = Router::new();
    for (i, route) in routes.iter().enumerate() {
        let fail = |name: &str, message: String| {
            Err((format!("http_services.routes[{i}].{name}"), message))
        };
        let pattern = match Pattern::parse(&route.route) {
            Ok(pattern) => pattern,
            Err(e) => return fail("route", e.to_string()),
        };
        if is_reserved_path(&route.route) {
            return fail(
                "route",
                format!(
                    "`{}` is reserved for dynplug's management API and metrics (`/_dynplug/...`, `/metrics`)",
                    quote(&route.route)
                ),
            );
        }
        let Some(method) = Method::parse(&route.method) else {
            let all: Vec<&str> = Method::ALL.iter().map(|m| m.as_str()).collect();
            return fail(
                "method",
                format!(
                    "expected one of {}, found `{}`",
                    all.join(", "),
                    quote(&route.method)
                ),
            );
        };
        if route.label.is_empty() {
            return fail("label", "expected a non-empty label".into());
        }
        if route.label.len() > MAX_SHORT_TEXT || route.label.contains(char::is_control) {
            return fail(
                "label",
                format!(
                    "expected at most {MAX_SHORT_TEXT} bytes without control characters, found `{}`",
                    quote(&route.label)
                ),
            );
        }
        if route.timeout_ms == Some(0) {
            return fail(
                "timeout_ms",
                "expected a positive number of milliseconds, found 0".into(),
            );
        }
        if let Err(&first) = declared.insert(method, &pattern, i) {
            return fail(
                "route",
                format!(
                    "`{} {}` repeats routes[{first}] (`{} {}`): each method and route may appear once, whatever the parameter names",
                    route.method, route.route, routes[first].method, routes[first].route
                ),
            );
        }
    }
    Ok(())
}
