//! TLS settings: toward proxies (always verified), and toward visitors when the client terminates
//! their TLS itself (`--tls-cert`/`--tls-key`).
//!
//! A proxy's certificate is checked against the Mozilla roots shipped in `webpki-roots`, plus any
//! CA the user names with `--proxy-ca` (for private or test proxies). There is deliberately no way
//! to turn verification off: the bind proof ties the client's key to this TLS connection, and
//! that is only worth something if the connection really ends at the proxy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, InvalidDnsNameError, ServerName};
use shroud_mux::ALPN;
use shroud_process::tls::{CertSlot, TlsFilesError};

/// The ALPN protocol offered to visitors whose TLS the client terminates.
pub const ORIGIN_ALPN: &[u8] = b"http/1.1";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A PEM file of certificates could not be read or decoded.
    #[error("could not read certificates from {}", path.display())]
    ReadCertificates {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A PEM file that should hold certificates holds none.
    #[error("{} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")", path.display())]
    NoCertificates {
        /// The file.
        path: PathBuf,
    },
    /// A certificate given as a CA could not be used as a trust anchor.
    #[error("a certificate in {} cannot be used as a CA", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// A private key file could not be read, or holds no private key.
    #[error("could not read a private key from {}", path.display())]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate chain and private key do not make a usable pair.
    #[error("the certificate in {} and the key in {} cannot be used together", cert.display(), key.display())]
    CertKeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The name is not a DNS name or IP address that TLS can check a certificate against.
    #[error("{name:?} is not a valid TLS server name")]
    InvalidServerName {
        /// The name as given.
        name: String,
        /// What was wrong with it.
        #[source]
        source: InvalidDnsNameError,
    },
    /// rustls refused the protocol settings (a bug, not a user error).
    #[error("could not set up TLS")]
    Rustls(#[source] rustls::Error),
}

/// aws-lc-rs, offering AES-128-GCM first: the suite TLS 1.3 makes every peer support, and with
/// four fewer AES rounds than AES-256-GCM (aws-lc-rs's first choice) the cheapest on the bulk
/// of a tunnel's bytes. The proxy (rustls) follows the client's order.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The TLS settings for connections to proxies: verify against the web's roots plus every
/// certificate in `extra_ca` (a PEM file), offer ALPN `shroud/1`, present no client certificate.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut config = verifying_config(extra_ca)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // The bind proof signs a TLS exporter value: sound only with the extended master secret
    // under TLS 1.2 (RFC 7627). TLS 1.3 always has it.
    config.require_ems = true;
    Ok(Arc::new(config))
}

/// The TLS settings for HTTPS requests (the discovery service): the same roots as
/// [`client_config`], ALPN `http/1.1`.
pub fn https_client_config(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut config = verifying_config(extra_ca)?;
    config.alpn_protocols = vec![ORIGIN_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Verification against the web's roots plus every certificate in `extra_ca`; no ALPN yet.
fn verifying_config(extra_ca: Option<&Path>) -> Result<ClientConfig, TlsSetupError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca {
        for cert in read_certificates(path)? {
            roots.add(cert).map_err(|source| TlsSetupError::BadCa {
                path: path.to_owned(),
                source,
            })?;
        }
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Rustls)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The name to check a proxy's certificate against (and send as SNI).
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsSetupError> {
    ServerName::try_from(name.to_owned()).map_err(|source| TlsSetupError::InvalidServerName {
        name: name.to_owned(),
        source,
    })
}

/// The TLS settings for terminating visitors' TLS at the client, from a PEM certificate chain
/// (leaf first) and a PEM private key. Offers ALPN `http/1.1` only, since what lies behind is
/// spoken to as plain HTTP/1 or raw bytes; every browser offers `http/1.1` alongside `h2`.
pub fn origin_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsSetupError> {
    origin_tls(cert, key).map(|(config, _)| config)
}

/// [`origin_server_config`], serving whatever certificate the returned slot holds at each
/// handshake: a reload puts a new one in it ([`origin_certificate`]).
pub fn origin_tls(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<ServerConfig>, Arc<CertSlot>), TlsSetupError> {
    let slot = CertSlot::load(cert, key).map_err(|err| files_error(err, cert, key))?;
    let config = slot
        .server_config(&[ORIGIN_ALPN])
        .map_err(|err| files_error(err, cert, key))?;
    Ok((Arc::new(config), slot))
}

/// The certificate chain in `cert` and the key in `key`, checked to belong together, for a
/// reload to put in the slot [`origin_tls`] made.
pub fn origin_certificate(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsSetupError> {
    shroud_process::tls::load_certified_key(cert, key).map_err(|err| files_error(err, cert, key))
}

/// The error of the files `cert` and `key`, as this module says it.
fn files_error(err: TlsFilesError, cert: &Path, key: &Path) -> TlsSetupError {
    match err {
        TlsFilesError::Certificates { path, source } => {
            TlsSetupError::ReadCertificates { path, source }
        }
        TlsFilesError::NoCertificate(path) => TlsSetupError::NoCertificates { path },
        TlsFilesError::Key { path, source } => TlsSetupError::ReadKey { path, source },
        TlsFilesError::Unusable(source) => TlsSetupError::CertKeyMismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        },
        TlsFilesError::Protocols(source) => TlsSetupError::Rustls(source),
    }
}

/// When the first (leaf) certificate of a PEM file expires; `None` if the file cannot be read
/// or parsed (loading it for TLS says why).
pub fn leaf_expiry(path: &Path) -> Option<std::time::SystemTime> {
    let certs = read_certificates(path).ok()?;
    let secs = crate::metrics::not_after(certs.first()?)?;
    let secs = u64::try_from(secs).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// Every certificate in a PEM file; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let read_error = |source| TlsSetupError::ReadCertificates {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error)?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::CertificateError;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use rustls_pki_types::PrivateKeyDer;

    use super::*;

    /// A private CA, and a certificate it issued for `proxy.test`, written as PEM files.
    struct Pki {
        dir: tempfile::TempDir,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    }

    fn make_pki() -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["proxy.test".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let pki = Pki {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            dir,
        };
        fs::write(&pki.ca, ca.pem()).unwrap();
        fs::write(&pki.cert, leaf.pem()).unwrap();
        fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
        pki
    }

    /// A proxy-like server config: the leaf certificate, ALPN `shroud/1`.
    fn proxy_server_config(pki: &Pki) -> Arc<ServerConfig> {
        let chain = read_certificates(&pki.cert).unwrap();
        let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![ALPN.to_vec()];
        Arc::new(config)
    }

    /// Runs one handshake over an in-memory pipe; returns the client's result and the
    /// negotiated ALPN protocol.
    async fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
        name: &str,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let (client_io, server_io) = tokio::io::duplex(1024);
        let server_task = tokio::spawn(async move {
            let mut tls = TlsAcceptor::from(server).accept(server_io).await?;
            tls.write_all(b"hello").await?;
            tls.shutdown().await
        });
        let result = async {
            let mut tls = TlsConnector::from(client)
                .connect(server_name(name).unwrap(), client_io)
                .await?;
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"hello");
            Ok(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec))
        }
        .await;
        // The server's side fails too when the client rejects it; only the client's view matters.
        drop(server_task.await.unwrap());
        result
    }

    /// Why the client refused the proxy's certificate, if that is what failed.
    fn certificate_error(err: &std::io::Error) -> Option<&CertificateError> {
        match err.get_ref()?.downcast_ref::<rustls::Error>()? {
            rustls::Error::InvalidCertificate(cert_err) => Some(cert_err),
            _ => None,
        }
    }

    #[tokio::test]
    async fn trusts_an_extra_ca_and_offers_shroud_alpn() {
        let pki = make_pki();
        let client = client_config(Some(&pki.ca)).unwrap();
        let alpn = handshake(client, proxy_server_config(&pki), "proxy.test")
            .await
            .unwrap();
        assert_eq!(alpn.as_deref(), Some(ALPN));
    }

    #[tokio::test]
    async fn refuses_a_certificate_for_another_name() {
        let pki = make_pki();
        let client = client_config(Some(&pki.ca)).unwrap();
        let err = handshake(client, proxy_server_config(&pki), "other.test")
            .await
            .unwrap_err();
        assert!(
            matches!(
                certificate_error(&err),
                Some(
                    CertificateError::NotValidForName
                        | CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn refuses_an_unknown_ca_without_the_extra_one() {
        let pki = make_pki();
        let client = client_config(None).unwrap();
        let err = handshake(client, proxy_server_config(&pki), "proxy.test")
            .await
            .unwrap_err();
        assert!(
            matches!(
                certificate_error(&err),
                Some(CertificateError::UnknownIssuer)
            ),
            "{err}"
        );
    }

    #[test]
    fn missing_or_empty_ca_files_name_the_path() {
        let pki = make_pki();
        let missing = pki.dir.path().join("missing-ca.pem");
        let err = client_config(Some(&missing)).unwrap_err();
        assert!(
            matches!(err, TlsSetupError::ReadCertificates { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("missing-ca.pem"), "{err}");

        // A key file holds PEM, but no certificate.
        let err = client_config(Some(&pki.key)).unwrap_err();
        assert!(
            matches!(err, TlsSetupError::NoCertificates { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("key.pem"), "{err}");
    }

    #[test]
    fn server_names() {
        assert!(server_name("proxy.example").is_ok());
        assert!(server_name("192.0.2.1").is_ok());
        let err = server_name("not a name").unwrap_err();
        assert!(err.to_string().contains("not a name"), "{err}");
    }

    #[tokio::test]
    async fn origin_config_serves_http1_to_visitors() {
        let pki = make_pki();
        let server = origin_server_config(&pki.cert, &pki.key).unwrap();
        assert_eq!(server.alpn_protocols, vec![ORIGIN_ALPN.to_vec()]);

        // Trust the test CA, the way a visitor's browser would trust a public one.
        let mut roots = RootCertStore::empty();
        for cert in read_certificates(&pki.ca).unwrap() {
            roots.add(cert).unwrap();
        }
        let mut visitor = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        visitor.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let alpn = handshake(Arc::new(visitor), server, "proxy.test")
            .await
            .unwrap();
        assert_eq!(alpn.as_deref(), Some(ORIGIN_ALPN));
    }

    #[test]
    fn origin_config_errors_name_the_files() {
        let pki = make_pki();
        let missing = pki.dir.path().join("missing-key.pem");
        let err = origin_server_config(&pki.cert, &missing).unwrap_err();
        assert!(matches!(err, TlsSetupError::ReadKey { .. }), "{err:?}");
        assert!(err.to_string().contains("missing-key.pem"), "{err}");

        // The CA's certificate with the leaf's key: not a pair.
        let err = origin_server_config(&pki.ca, &pki.key).unwrap_err();
        assert!(
            matches!(err, TlsSetupError::CertKeyMismatch { .. }),
            "{err:?}"
        );
    }
}
