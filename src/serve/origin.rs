//! Where a management request comes from. DNS rebinding reaches a loopback
//! listener from a web page with a foreign `Host`; browsers send cross-site
//! form POSTs (with cookies). So the management API checks the `Host` it is
//! named by, and refuses state-changing requests sent by another site, as Go
//! 1.25's `http.CrossOriginProtection` does.

use axum::extract::Request;
use axum::http::{Method, header};

use super::conn::Peer;
use crate::error::{Error, Result};

/// The host names the management API answers to besides IP literals,
/// `localhost` and `*.localhost`; `"*"` turns the check off.
#[derive(Debug, Default, Clone)]
pub(crate) struct AllowedHosts {
    any: bool,
    names: Vec<String>,
}

impl AllowedHosts {
    pub(crate) fn new(names: &[String]) -> AllowedHosts {
        AllowedHosts {
            any: names.iter().any(|n| n == "*"),
            names: names.iter().map(|n| normalize(n)).collect(),
        }
    }

    fn allows(&self, host: &str) -> bool {
        if self.any || host == "localhost" || host.ends_with(".localhost") {
            return true;
        }
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        literal.parse::<std::net::IpAddr>().is_ok() || self.names.iter().any(|n| n == host)
    }
}

/// Lower case, without a trailing dot.
fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// `host[:port]` or `[v6]:port` → the host (brackets kept for IPv6).
fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

/// The authority the request names: `Host`, or HTTP/2's `:authority`.
fn authority(request: &Request) -> Option<&str> {
    match request.headers().get(header::HOST) {
        Some(host) => host.to_str().ok(),
        None => request.uri().authority().map(|a| a.as_str()),
    }
}

fn forbidden(reason: String) -> Error {
    Error::Forbidden {
        plugin: String::new(),
        reason,
    }
}

/// Refuses a management request named by a host not allowed, or a
/// state-changing one sent by another site.
pub(crate) fn check(request: &Request, hosts: &AllowedHosts) -> Result<()> {
    // No browser reaches a Unix socket: neither rebinding nor cross-site
    // forms can, and clients there send any Host (some the socket path).
    let unix = request
        .extensions()
        .get::<Peer>()
        .is_some_and(|peer| peer.unix);
    let named = authority(request);
    if !unix {
        let host = named.map(host_of).map(normalize).unwrap_or_default();
        if !hosts.allows(&host) {
            return Err(forbidden(format!(
                "Host `{host}` is not allowed; add it with --allowed-host (or Server::allowed_hosts)"
            )));
        }
    }
    if matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    ) {
        return Ok(());
    }
    let headers = request.headers();
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("?");
        return match site {
            "same-origin" | "none" => Ok(()),
            _ => Err(forbidden(format!(
                "cross-site request refused (Sec-Fetch-Site: {site})"
            ))),
        };
    }
    // Without Sec-Fetch-Site (older browsers, other clients), an Origin that
    // names another host:port is another site; no Origin is not a browser.
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("null");
    let origin_authority = origin.split_once("://").map(|(_, rest)| rest);
    match (origin_authority, named) {
        (Some(from), Some(to)) if from.eq_ignore_ascii_case(to) => Ok(()),
        _ => Err(forbidden(format!(
            "cross-origin request refused: Origin {origin} is not this server ({})",
            named.unwrap_or("no Host")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, headers: &[(&str, &str)]) -> Request {
        let mut builder = Request::builder().method(method).uri("/_dynplug/plugins");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn hosts_are_ip_literals_localhost_or_allowed_names() {
        let hosts = AllowedHosts::new(&["dynplug.example".to_owned()]);
        for host in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "[::1]:8080",
            "[::1]",
            "localhost",
            "LOCALHOST:80",
            "app.localhost:1",
            "10.1.2.3",
            "dynplug.example:8080",
            "dynplug.example.",
        ] {
            assert!(
                check(&request("GET", &[("host", host)]), &hosts).is_ok(),
                "{host}"
            );
        }
        for host in ["evil.example", "evil.example:8080", "localhost.evil", "::1"] {
            let err = check(&request("GET", &[("host", host)]), &hosts).unwrap_err();
            assert!(err.to_string().contains("--allowed-host"), "{host}: {err}");
        }
        let any = AllowedHosts::new(&["*".to_owned()]);
        assert!(check(&request("GET", &[("host", "evil.example")]), &any).is_ok());
    }

    #[test]
    fn state_changes_must_come_from_the_same_origin() {
        let hosts = AllowedHosts::default();
        let host = ("host", "127.0.0.1:8080");
        for headers in [
            vec![host],
            vec![host, ("sec-fetch-site", "same-origin")],
            vec![host, ("sec-fetch-site", "none")],
            vec![host, ("origin", "http://127.0.0.1:8080")],
        ] {
            assert!(
                check(&request("POST", &headers), &hosts).is_ok(),
                "{headers:?}"
            );
        }
        for headers in [
            vec![host, ("sec-fetch-site", "cross-site")],
            vec![host, ("sec-fetch-site", "same-site")],
            vec![host, ("origin", "http://evil.example")],
            vec![host, ("origin", "null")],
            vec![
                host,
                ("origin", "http://127.0.0.1:8080"),
                ("sec-fetch-site", "cross-site"),
            ],
        ] {
            let err = check(&request("DELETE", &headers), &hosts).unwrap_err();
            assert!(err.to_string().contains("refused"), "{headers:?}: {err}");
        }
        // Reading is not a state change (and CORS keeps the answer from the page).
        let get = request("GET", &[host, ("sec-fetch-site", "cross-site")]);
        assert!(check(&get, &hosts).is_ok());
    }
}
