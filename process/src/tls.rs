//! A TLS server configuration from PEM files.

use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsFilesError::Protocols)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsFilesError::Unusable)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
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
}
