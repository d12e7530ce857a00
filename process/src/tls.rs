//! A TLS server configuration from PEM files, and a certificate a reload may replace.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};

/// Why a TLS server configuration could not be made from its files.
#[derive(Debug, thiserror::Error)]
pub enum TlsFilesError {
    /// The certificate file could not be read or holds malformed PEM.
    #[error("reading certificates from {}: {source}", path.display())]
    Certificates {
        /// The certificate file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{} holds no certificate", .0.display())]
    NoCertificate(PathBuf),
    /// The key file could not be read or holds no private key.
    #[error("reading the private key from {}: {source}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The certificate and key do not belong together, or rustls cannot use them.
    #[error("the TLS certificate and key do not form a usable pair: {0}")]
    Unusable(#[source] rustls::Error),
    /// rustls refused its own safe default protocol versions (a bug, not a user error).
    #[error("could not set up TLS: {0}")]
    Protocols(#[source] rustls::Error),
}

/// A TLS server configuration serving the certificate chain in `cert` with the private key in
/// `key` (both PEM), on aws-lc-rs with rustls' safe default protocol versions, offering `alpn`.
/// Callers tighten it further where their protocol needs it.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsFilesError> {
    single_cert_config(load_certified_key(cert, key)?, alpn)
}

/// A TLS server configuration serving `certified`, as [`server_config`] makes from files.
pub fn single_cert_config(
    certified: CertifiedKey,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsFilesError> {
    config_with(
        Arc::new(rustls::sign::SingleCertAndKey::from(certified)),
        alpn,
    )
}

/// The certificate chain in `cert` and the private key in `key` (both PEM), checked to belong
/// together, as TLS serves them.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsFilesError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsFilesError::Certificates {
            path: cert.to_path_buf(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsFilesError::NoCertificate(cert.to_path_buf()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsFilesError::Key {
        path: key.to_path_buf(),
        source,
    })?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(TlsFilesError::Unusable)
}

/// A server configuration whose certificate `certs` picks, on aws-lc-rs with rustls' safe
/// default protocol versions, offering `alpn`.
fn config_with(
    certs: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsFilesError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsFilesError::Protocols)?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The SHA-256 of a certificate chain's first (leaf) certificate, in hex: which certificate is
/// served, for logs. Certificates are public; this says nothing of the key.
pub fn fingerprint(key: &CertifiedKey) -> String {
    let leaf = key.cert.first().map(AsRef::as_ref).unwrap_or_default();
    Sha256::digest(leaf)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The certificate a TLS server presents, replaced whole by a reload. Each handshake takes the
/// one in place when it starts, so connections already open keep theirs.
pub struct CertSlot(RwLock<Arc<CertifiedKey>>);

impl CertSlot {
    /// A slot holding the certificate in `cert` and the key in `key` (PEM).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsFilesError> {
        Ok(Arc::new(Self(RwLock::new(Arc::new(load_certified_key(
            cert, key,
        )?)))))
    }

    /// The certificate and key in place.
    pub fn current(&self) -> Arc<CertifiedKey> {
        match self.0.read() {
            Ok(slot) => slot.clone(),
            // A writer panicked mid-assignment of an Arc: the value is still whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts `key` in place for the handshakes to come. Returns whether its certificate chain
    /// differs from the one it replaces.
    pub fn replace(&self, key: CertifiedKey) -> bool {
        let key = Arc::new(key);
        let mut slot = match self.0.write() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        let changed = slot.cert != key.cert;
        *slot = key;
        changed
    }

    /// A server configuration that serves whatever this slot holds at each handshake, on
    /// aws-lc-rs with rustls' safe default protocol versions, offering `alpn`.
    pub fn server_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Result<rustls::ServerConfig, TlsFilesError> {
        config_with(self.clone(), alpn)
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl std::fmt::Debug for CertSlot {
    // The key stays out of it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSlot")
            .field("leaf_sha256", &fingerprint(&self.current()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn write_pair(dir: &Path) -> (PathBuf, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec!["proxy.test".into()]).unwrap();
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    #[test]
    fn a_matching_pair_serves_with_the_given_alpn() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path());
        let config = server_config(&cert, &key, &[b"shroud/1"]).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"shroud/1".to_vec()]);
    }

    #[test]
    fn each_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path());
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let missing = dir.path().join("missing.pem");

        let err = server_config(&missing, &key, &[]).unwrap_err();
        assert!(matches!(err, TlsFilesError::Certificates { .. }), "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let err = server_config(&empty, &key, &[]).unwrap_err();
        assert!(matches!(err, TlsFilesError::NoCertificate(_)), "{err}");
        let err = server_config(&cert, &empty, &[]).unwrap_err();
        assert!(matches!(err, TlsFilesError::Key { .. }), "{err}");

        let other = tempfile::tempdir().unwrap();
        let (other_cert, _) = write_pair(other.path());
        let err = server_config(&other_cert, &key, &[]).unwrap_err();
        assert!(matches!(err, TlsFilesError::Unusable(_)), "{err}");
    }

    /// Completes a handshake with `server` over a pipe and returns the leaf it presented.
    async fn leaf_served(server: Arc<rustls::ServerConfig>) -> Vec<u8> {
        use rustls::client::danger::{
            HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
        };
        use rustls::DigitallySignedStruct;
        use rustls_pki_types::{ServerName, UnixTime};

        /// Takes any certificate: the test asks which one was sent, not whether it is trusted.
        #[derive(Debug)]
        struct Any;
        impl ServerCertVerifier for Any {
            fn verify_server_cert(
                &self,
                _: &CertificateDer<'_>,
                _: &[CertificateDer<'_>],
                _: &ServerName<'_>,
                _: &[u8],
                _: UnixTime,
            ) -> Result<ServerCertVerified, rustls::Error> {
                Ok(ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                Ok(HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, rustls::Error> {
                Ok(HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                rustls::crypto::aws_lc_rs::default_provider()
                    .signature_verification_algorithms
                    .supported_schemes()
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Any))
            .with_no_client_auth();
        let (client_io, server_io) = tokio::io::duplex(4096);
        let server = tokio::spawn(tokio_rustls::TlsAcceptor::from(server).accept(server_io));
        let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(ServerName::try_from("proxy.test").unwrap(), client_io)
            .await
            .unwrap();
        drop(server.await.unwrap().unwrap());
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    #[tokio::test]
    async fn a_slot_serves_the_certificate_in_place_at_each_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path());
        let slot = CertSlot::load(&cert, &key).unwrap();
        let config = Arc::new(slot.server_config(&[b"h2"]).unwrap());
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        let first = slot.current();
        assert_eq!(leaf_served(config.clone()).await, first.cert[0].to_vec());
        assert_eq!(fingerprint(&first).len(), 64);

        // The same files again: nothing changes.
        assert!(!slot.replace(load_certified_key(&cert, &key).unwrap()));

        let other = tempfile::tempdir().unwrap();
        let (new_cert, new_key) = write_pair(other.path());
        assert!(slot.replace(load_certified_key(&new_cert, &new_key).unwrap()));
        let served = leaf_served(config).await;
        assert_eq!(served, slot.current().cert[0].to_vec());
        assert_ne!(served, first.cert[0].to_vec());
        assert_ne!(fingerprint(&slot.current()), fingerprint(&first));
        assert!(!format!("{slot:?}").contains("PRIVATE"));
    }
}
