//! TLS on TCP listeners (rustls with the ring provider: it builds without
//! cmake), with optional client certificates naming [`Client`](super::Client)s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

use crate::error::{Error, Result};

/// Where the server's certificate, key and (for mTLS) client CA are.
#[derive(Debug, Clone)]
pub(crate) struct TlsFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) client_ca: Option<PathBuf>,
}

/// The acceptors of one server: the HTTP façade offers `h2` and
/// `http/1.1` by ALPN, gRPC only `h2` (gRPC clients require it).
pub(crate) struct Acceptors {
    pub(crate) http: TlsAcceptor,
    pub(crate) grpc: TlsAcceptor,
}

fn config_error(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Config {
        what: format!("TLS: {}", path.display()),
        message: message.to_string(),
    }
}

impl TlsFiles {
    /// Reads the PEM files and builds the acceptors.
    ///
    /// With a client CA, a client certificate is verified against it when
    /// one is presented (a bad one fails the handshake); a connection
    /// without one is accepted and must then authenticate with a token.
    pub(crate) fn acceptors(&self) -> Result<Acceptors> {
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| config_error(&self.cert, e))?;
        if chain.is_empty() {
            return Err(config_error(&self.cert, "no certificate in the file"));
        }
        let key =
            PrivateKeyDer::from_pem_file(&self.key).map_err(|e| config_error(&self.key, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error(&self.cert, e))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).map_err(|e| config_error(ca, e))? {
                    let cert = cert.map_err(|e| config_error(ca, e))?;
                    roots.add(cert).map_err(|e| config_error(ca, e))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| config_error(ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| config_error(&self.key, e))?;
        let with_alpn = |protocols: &[&[u8]]| {
            let mut config = config.clone();
            config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
            TlsAcceptor::from(Arc::new(config))
        };
        Ok(Acceptors {
            http: with_alpn(&[b"h2", b"http/1.1"]),
            grpc: with_alpn(&[b"h2"]),
        })
    }
}

/// The names a (verified) certificate gives its holder: the subject's
/// common names, then its DNS subject alternative names. A small DER walk:
/// rustls has already parsed and verified the certificate, and an X.509
/// crate would cost more to build than this costs to read.
pub(crate) fn cert_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let mut names = Vec::new();
    let _ = collect_names(cert.as_ref(), &mut names);
    names
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
/// `id-at-commonName`, 2.5.4.3.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// `id-ce-subjectAltName`, 2.5.29.17.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
/// `dNSName [2] IA5String` in GeneralNames.
const DNS_NAME: u8 = 0x82;

/// Splits one DER element off `input`: (tag, contents, rest).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (bytes, rest) = input.split_at_checked(count)?;
        input = rest;
        bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
    };
    let (contents, rest) = input.split_at_checked(len)?;
    Some((tag, contents, rest))
}

/// The elements of a constructed value, in order.
fn elements(mut input: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, contents, rest) = element(input)?;
        input = rest;
        Some((tag, contents))
    })
}

fn collect_names(der: &[u8], names: &mut Vec<String>) -> Option<()> {
    let (SEQUENCE, certificate, _) = element(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(certificate)? else {
        return None;
    };
    // version [0] (optional), serial, signature, issuer, validity, subject,
    // subjectPublicKeyInfo, then optional [1], [2] and extensions [3].
    let mut fields = elements(tbs).peekable();
    if fields.peek().is_some_and(|(tag, _)| *tag == 0xa0) {
        fields.next();
    }
    let (_, subject) = fields.nth(4)?;
    for (_, rdn) in elements(subject).filter(|(tag, _)| *tag == SET) {
        for (_, attribute) in elements(rdn).filter(|(tag, _)| *tag == SEQUENCE) {
            let mut parts = elements(attribute);
            if parts.next() == Some((OID, COMMON_NAME))
                && let Some((_, value)) = parts.next()
            {
                names.push(String::from_utf8_lossy(value).into_owned());
            }
        }
    }
    let (_, extensions) = fields.find(|(tag, _)| *tag == 0xa3)?;
    let (SEQUENCE, extensions, _) = element(extensions)? else {
        return None;
    };
    for (_, extension) in elements(extensions) {
        let mut parts = elements(extension);
        if parts.next() != Some((OID, SUBJECT_ALT_NAME)) {
            continue;
        }
        // `critical` is optional; the value is the last part, an OCTET STRING.
        let (_, value) = parts.last()?;
        let (SEQUENCE, general_names, _) = element(value)? else {
            return None;
        };
        for (tag, name) in elements(general_names) {
            if tag == DNS_NAME {
                names.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_common_name_and_dns_alt_names() {
        let mut params =
            rcgen::CertificateParams::new(vec!["billing.example".into(), "b2".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Org");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "billing");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(cert_names(cert.der()), ["billing", "billing.example", "b2"]);
        assert!(cert_names(&CertificateDer::from(vec![0x30, 0x85, 1])).is_empty());
        assert!(cert_names(&CertificateDer::from(Vec::new())).is_empty());
    }
}
