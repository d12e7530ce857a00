//! The two TLS faces of the ACME client: visitors get the current certificate, picked per
//! handshake; the CA's validator gets the TLS-ALPN-01 challenge certificate (RFC 8737).

use std::fmt;
use std::sync::{Arc, RwLock};

use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::ACME_TLS_ALPN;
use crate::tls::ORIGIN_ALPN;

/// The certificate served to visitors, replaced whole on renewal. A handshake takes the one
/// in place when it starts; live connections keep theirs.
#[derive(Default)]
pub(crate) struct CertSlot(RwLock<Option<Arc<CertifiedKey>>>);

impl CertSlot {
    pub(crate) fn get(&self) -> Option<Arc<CertifiedKey>> {
        match self.0.read() {
            Ok(slot) => slot.clone(),
            // A writer panicked mid-assignment of an Arc: the value is still whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn set(&self, key: Arc<CertifiedKey>) {
        match self.0.write() {
            Ok(mut slot) => *slot = Some(key),
            Err(poisoned) => *poisoned.into_inner() = Some(key),
        }
    }
}

impl fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertSlot")
            .field("present", &self.get().is_some())
            .finish()
    }
}

/// Picks the slot's certificate for each visitor's handshake, whatever the SNI (the proxy only
/// routed the connection here because of it); none yet fails the handshake.
#[derive(Debug)]
struct SlotResolver(Arc<CertSlot>);

impl ResolvesServerCert for SlotResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.get()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The server configuration for visitors: TLS 1.2 and 1.3, ALPN `http/1.1` alone, as
/// [`crate::tls::origin_server_config`] offers for `--tls-cert`.
pub(crate) fn visitor_config(slot: Arc<CertSlot>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SlotResolver(slot)));
    config.alpn_protocols = vec![ORIGIN_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Why a challenge certificate could not be made (a bug or a broken crypto library).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChallengeError {
    #[error("making the TLS-ALPN-01 certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("serving the TLS-ALPN-01 certificate: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server configuration that answers a TLS-ALPN-01 challenge for `hostname`: a fresh
/// self-signed certificate naming it, with the critical acmeIdentifier extension holding
/// `digest` (the SHA-256 of the key authorization), offered with ALPN `acme-tls/1` alone.
pub(crate) fn challenge_config(
    hostname: &str,
    digest: &[u8; 32],
) -> Result<Arc<ServerConfig>, ChallengeError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![hostname.to_owned()])?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = provider();
    // Not `with_single_cert`: it parses the certificate with webpki, which refuses the
    // critical extension that the validator is there to read.
    let signing_key = provider.key_provider.load_private_key(key)?;
    let certified = CertifiedKey::new(vec![cert.der().clone()], signing_key);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    /// Accepts any certificate, like an ACME validator does for the challenge (it checks the
    /// extension, not the chain), and keeps the one it saw.
    #[derive(Debug, Default)]
    struct Capture(std::sync::Mutex<Option<CertificateDer<'static>>>);

    impl ServerCertVerifier for Capture {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            *self.0.lock().unwrap() = Some(end_entity.clone().into_owned());
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
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    async fn handshake(
        server: Arc<ServerConfig>,
        alpn: &[&[u8]],
    ) -> (
        std::io::Result<Option<Vec<u8>>>,
        Option<CertificateDer<'static>>,
    ) {
        let capture = Arc::new(Capture::default());
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(capture.clone())
            .with_no_client_auth();
        client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let (client_io, server_io) = tokio::io::duplex(512);
        let server_task =
            tokio::spawn(async move { TlsAcceptor::from(server).accept(server_io).await });
        let result = TlsConnector::from(Arc::new(client))
            .connect(ServerName::try_from("example.test").unwrap(), client_io)
            .await
            .map(|tls| tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec));
        drop(server_task.await.unwrap());
        let seen = capture.0.lock().unwrap().clone();
        (result, seen)
    }

    #[tokio::test]
    async fn the_challenge_certificate_carries_the_digest_and_speaks_acme_tls_only() {
        let digest = [7u8; 32];
        let config = challenge_config("example.test", &digest).unwrap();
        assert_eq!(config.alpn_protocols, vec![ACME_TLS_ALPN.to_vec()]);

        let (alpn, cert) = handshake(config.clone(), &[ACME_TLS_ALPN]).await;
        assert_eq!(alpn.unwrap().as_deref(), Some(ACME_TLS_ALPN));
        let cert = cert.unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
        let acme_oid = x509_parser::oid_registry::Oid::from(&[1, 3, 6, 1, 5, 5, 7, 1, 31]).unwrap();
        let ext = parsed
            .extensions()
            .iter()
            .find(|ext| ext.oid == acme_oid)
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // An OCTET STRING of 32 bytes: tag, length, digest.
        assert_eq!(ext.value, [&[0x04, 32][..], &digest[..]].concat());
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[DNSName(\"example.test\")]"
        );

        // A client that does not offer acme-tls/1 is refused.
        let (refused, _) = handshake(config, &[b"http/1.1"]).await;
        assert!(refused.is_err());
    }

    #[tokio::test]
    async fn visitors_fail_cleanly_until_a_certificate_is_in_place() {
        let slot = Arc::new(CertSlot::default());
        let config = visitor_config(slot.clone()).unwrap();
        let (result, _) = handshake(config.clone(), &[b"h2", b"http/1.1"]).await;
        assert!(result.is_err());

        let pair = rcgen::generate_simple_self_signed(vec!["example.test".into()]).unwrap();
        let issued = super::super::store::Issued::from_pem(
            pair.cert.pem(),
            pair.signing_key.serialize_pem(),
        )
        .unwrap();
        slot.set(issued.key.clone());
        let (alpn, cert) = handshake(config, &[b"h2", b"http/1.1"]).await;
        assert_eq!(alpn.unwrap().as_deref(), Some(ORIGIN_ALPN));
        assert_eq!(cert.as_ref(), issued.leaf());
    }
}
