//! Who is calling: named clients with hashed tokens or client certificates,
//! and the plugins each may call. With no client configured, plugin calls are
//! open (local use); with one, every call needs an identity.

use std::fmt;

use sha2::Digest as _;

use super::conn::Peer;
use crate::error::{Error, Result};

/// A caller of plugins, named in the server's configuration.
///
/// It proves who it is with a bearer token (`Authorization: Bearer <token>`
/// over HTTP, `authorization` metadata over gRPC), of which the server keeps
/// only the SHA-256, or with a TLS client certificate whose subject common
/// name or a DNS name matches [`cert_name`](Self::cert_name) (see
/// [`Server::tls_client_ca`](super::Server::tls_client_ca)).
///
/// ```
/// use dynplug::serve::Client;
/// // The hash of the token "s3cret": printf %s s3cret | sha256sum
/// let billing = Client::new("billing")
///     .token_sha256("1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0")
///     .plugins(["hello", "counter"]);
/// let ops = Client::new("ops").cert_name("ops.example").plugins(["*"]).management(true);
/// # let _ = (billing, ops);
/// ```
#[derive(Clone)]
pub struct Client {
    name: String,
    token_sha256: Option<String>,
    cert_name: Option<String>,
    plugins: Vec<String>,
    management: bool,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("cert_name", &self.cert_name)
            .field("plugins", &self.plugins)
            .field("management", &self.management)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client called `name` (in logs and errors) that may call no plugin yet.
    pub fn new(name: impl Into<String>) -> Client {
        Client {
            name: name.into(),
            token_sha256: None,
            cert_name: None,
            plugins: Vec::new(),
            management: false,
        }
    }

    /// The SHA-256 of its token, as 64 hex digits
    /// (`printf %s TOKEN | sha256sum`). Checked by `Server::start`.
    #[must_use]
    pub fn token_sha256(mut self, hex: impl Into<String>) -> Client {
        self.token_sha256 = Some(hex.into());
        self
    }

    /// Its token, of which only the SHA-256 is kept.
    #[must_use]
    pub fn token(self, token: &str) -> Client {
        let hex = sha2::Sha256::digest(token)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        self.token_sha256(hex)
    }

    /// The name its TLS client certificate carries (subject common name or
    /// a DNS subject alternative name).
    #[must_use]
    pub fn cert_name(mut self, name: impl Into<String>) -> Client {
        self.cert_name = Some(name.into());
        self
    }

    /// The plugins it may call; `"*"` is every plugin.
    #[must_use]
    pub fn plugins<I: IntoIterator<Item = S>, S: Into<String>>(mut self, plugins: I) -> Client {
        self.plugins = plugins.into_iter().map(Into::into).collect();
        self
    }

    /// Whether it may use the management API (list, reload, unload, events),
    /// as the management token may.
    #[must_use]
    pub fn management(mut self, allowed: bool) -> Client {
        self.management = allowed;
        self
    }
}

/// A client as checked at start.
#[derive(Debug)]
pub(crate) struct Known {
    pub(crate) name: String,
    hash: Option<[u8; 32]>,
    cert_name: Option<String>,
    every_plugin: bool,
    plugins: Vec<String>,
    pub(crate) management: bool,
}

impl Known {
    /// Whether this client may call `plugin`.
    pub(crate) fn may_call(&self, plugin: &str) -> Result<()> {
        if self.every_plugin || self.plugins.iter().any(|p| p == plugin) {
            return Ok(());
        }
        Err(Error::Forbidden {
            plugin: plugin.to_owned(),
            reason: format!("client `{}` may not call this plugin", self.name),
        })
    }
}

/// Every configured client.
#[derive(Debug, Default)]
pub(crate) struct Clients(Vec<Known>);

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Equal without an early exit: the time taken does not tell where a guess
/// differs.
pub(crate) fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Clients {
    /// Checks the definitions: a name, a way to authenticate, a valid hash.
    pub(crate) fn new(clients: Vec<Client>) -> Result<Clients> {
        let mut known = Vec::with_capacity(clients.len());
        for client in clients {
            let what = format!("client `{}`", client.name);
            let invalid = |message: &str| Error::Config {
                what: what.clone(),
                message: message.to_owned(),
            };
            if client.name.is_empty() {
                return Err(invalid("the name is empty"));
            }
            if known.iter().any(|k: &Known| k.name == client.name) {
                return Err(invalid("defined twice"));
            }
            let hash = match &client.token_sha256 {
                None => None,
                Some(hex) => Some(parse_hex(hex).ok_or_else(|| {
                    invalid("token_sha256: expected 64 hex digits (printf %s TOKEN | sha256sum)")
                })?),
            };
            if hash.is_none() && client.cert_name.is_none() {
                return Err(invalid(
                    "no way to authenticate: give it a token_sha256 or a cert_name",
                ));
            }
            known.push(Known {
                every_plugin: client.plugins.iter().any(|p| p == "*"),
                name: client.name,
                hash,
                cert_name: client.cert_name,
                plugins: client.plugins,
                management: client.management,
            });
        }
        Ok(Clients(known))
    }

    /// Whether callers must say who they are.
    pub(crate) fn enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// The client holding `token`, comparing with every client's hash.
    pub(crate) fn by_token(&self, token: &str) -> Option<&Known> {
        let hash: [u8; 32] = sha2::Sha256::digest(token.trim()).into();
        let mut found = None;
        for client in &self.0 {
            if let Some(expected) = &client.hash
                && same_hash(&hash, expected)
            {
                found = Some(client);
            }
        }
        found
    }

    /// The client a verified certificate names.
    pub(crate) fn by_cert(&self, names: &[String]) -> Option<&Known> {
        self.0.iter().find(|client| {
            client
                .cert_name
                .as_ref()
                .is_some_and(|wanted| names.iter().any(|n| n.eq_ignore_ascii_case(wanted)))
        })
    }

    /// Who is calling: `Ok(None)` when no client is configured (open),
    /// else the client the bearer token or the certificate names.
    ///
    /// # Errors
    /// [`Error::Unauthenticated`] when clients are configured and the
    /// request names none of them.
    pub(crate) fn identify(
        &self,
        bearer: Option<&str>,
        peer: Option<&Peer>,
    ) -> Result<Option<&Known>> {
        if !self.enabled() {
            return Ok(None);
        }
        if let Some(token) = bearer {
            return self
                .by_token(token)
                .map(Some)
                .ok_or_else(|| Error::Unauthenticated {
                    reason: "unknown client token".into(),
                });
        }
        if let Some(names) = peer.and_then(|p| p.cert_names.as_deref()) {
            return self
                .by_cert(names)
                .map(Some)
                .ok_or_else(|| Error::Unauthenticated {
                    reason: format!(
                        "the client certificate ({}) names no client",
                        names.join(", ")
                    ),
                });
        }
        Err(Error::Unauthenticated {
            reason: "this server needs a client token: Authorization: Bearer <token>".into(),
        })
    }
}

/// The credentials of `Authorization: Bearer <credentials>` (the scheme is
/// case-insensitive, RFC 7235).
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_certificates_name_clients() {
        let clients = Clients::new(vec![
            Client::new("billing").token("t1").plugins(["hello"]),
            Client::new("ops").cert_name("ops.example").plugins(["*"]),
        ])
        .unwrap();
        let billing = clients.identify(Some("t1"), None).unwrap().unwrap();
        assert_eq!(billing.name, "billing");
        assert!(billing.may_call("hello").is_ok());
        let denied = billing.may_call("counter").unwrap_err().to_string();
        assert!(denied.contains("client `billing` may not call"), "{denied}");
        assert!(matches!(
            clients.identify(Some("t2"), None),
            Err(Error::Unauthenticated { .. })
        ));
        assert!(clients.identify(None, None).is_err());
        let peer = Peer {
            unix: false,
            cert_names: Some(vec!["x".to_owned(), "OPS.example".to_owned()].into()),
            cred: None,
        };
        let ops = clients.identify(None, Some(&peer)).unwrap().unwrap();
        assert!(ops.may_call("anything").is_ok());
        assert!(Clients::default().identify(None, None).unwrap().is_none());
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
    }

    #[test]
    fn definitions_are_checked() {
        for (client, needle) in [
            (Client::new("a").token_sha256("zz"), "64 hex digits"),
            (Client::new("a"), "no way to authenticate"),
            (Client::new("").token("x"), "name is empty"),
        ] {
            let err = Clients::new(vec![client]).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let twice = vec![Client::new("a").token("x"), Client::new("a").token("y")];
        assert!(
            Clients::new(twice)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        let hex = "1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0";
        assert!(Clients::new(vec![Client::new("a").token_sha256(hex)]).is_ok());
    }
}
