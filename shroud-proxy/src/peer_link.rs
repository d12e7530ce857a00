//! Links between the proxies of a fleet: TLS, a proof of the fleet secret each way, then
//! yamux (PROTOCOL.md §11).
//!
//! What authenticates a link is the fleet secret, not a certificate: each end sends an
//! HMAC keyed by the secret over the connection's TLS exporter value, so a proof is good for
//! this one connection and neither end can be impersonated, nor the link relayed, without the
//! secret. The dialler does not check the listener's certificate against a name (peers are
//! dialled by address, and the proof is what it relies on); TLS still checks that the
//! listener holds the key of the certificate it sent. The listener sends its own proof only
//! after checking the dialler's, so a host outside the fleet learns nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::DigitallySignedStruct;
use shroud_discovery::secret::FleetSecret;
use shroud_mux::peer::{self, Side, EXPORTER_LABEL, EXPORTER_LEN, PROOF_LEN};
use shroud_mux::{Incoming, Role, Session, SessionConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long dialling a peer, its TLS handshake and the proofs may take together.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// Most streams open at once on one link, in both directions together.
pub const MAX_LINK_STREAMS: usize = 4096;

/// Why a link could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The connection failed.
    #[error("peer link: {0}")]
    Io(#[from] std::io::Error),
    /// The link was not up within [`LINK_TIMEOUT`].
    #[error("peer link not up within {LINK_TIMEOUT:?}")]
    Timeout,
    /// The other end did not speak the peer protocol.
    #[error("the other end does not speak shroud-peer/1")]
    NotPeer,
    /// The TLS exporter failed.
    #[error("TLS exporter: {0}")]
    Exporter(String),
    /// The peer failed to link a moment ago; it is not dialled again so soon.
    #[error("the last attempt to link failed less than a second ago")]
    Backoff,
    /// The other end's proof did not check out: it does not hold this fleet's secret.
    #[error("the other end does not hold the fleet secret")]
    WrongSecret,
}

/// The TLS a proxy dials its peers with: ALPN `shroud-peer/1`, TLS 1.3 only.
pub fn client_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(ProofIsTheCheck(provider.clone()));
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13]);
    let mut config = match builder {
        Ok(builder) => builder,
        Err(_) => unreachable!("aws-lc-rs supports TLS 1.3"),
    }
    .dangerous()
    .with_custom_certificate_verifier(verifier)
    .with_no_client_auth();
    config.alpn_protocols = vec![peer::ALPN.to_vec()];
    Arc::new(config)
}

/// The TLS a proxy accepts peers with: its tunnel certificate, ALPN `shroud-peer/1` only.
pub fn server_config(tunnel: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    let mut config = tunnel.clone();
    config.alpn_protocols = vec![peer::ALPN.to_vec()];
    Arc::new(config)
}

/// Dials the peer listening on `addr`, proves the fleet secret and checks its proof.
pub async fn dial(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    secret: &FleetSecret,
    config: SessionConfig,
) -> Result<(Session, Incoming), LinkError> {
    let link = async {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        let exporter = exporter(tls.get_ref().1)?;
        let ours = peer::proof(secret.expose().as_bytes(), Side::Dialer, &exporter);
        tls.write_all(&ours).await?;
        tls.flush().await?;
        check_proof(&mut tls, secret, Side::Listener, &exporter).await?;
        Ok::<_, LinkError>(tls)
    };
    let tls = tokio::time::timeout(LINK_TIMEOUT, link)
        .await
        .map_err(|_| LinkError::Timeout)??;
    Ok(Session::spawn(tls, Role::Client, config))
}

/// Accepts a peer on `tcp`: TLS with `tls`, then the dialler's proof, then ours.
pub async fn accept(
    tcp: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    secret: &FleetSecret,
    config: SessionConfig,
) -> Result<(Session, Incoming), LinkError> {
    let link = async {
        let _ = tcp.set_nodelay(true);
        let mut tls = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await?;
        if tls.get_ref().1.alpn_protocol() != Some(peer::ALPN) {
            return Err(LinkError::NotPeer);
        }
        let exporter = exporter(tls.get_ref().1)?;
        check_proof(&mut tls, secret, Side::Dialer, &exporter).await?;
        let ours = peer::proof(secret.expose().as_bytes(), Side::Listener, &exporter);
        tls.write_all(&ours).await?;
        tls.flush().await?;
        Ok::<_, LinkError>(tls)
    };
    let tls = tokio::time::timeout(LINK_TIMEOUT, link)
        .await
        .map_err(|_| LinkError::Timeout)??;
    Ok(Session::spawn(tls, Role::Proxy, config))
}

fn exporter<D>(connection: &rustls::ConnectionCommon<D>) -> Result<[u8; EXPORTER_LEN], LinkError> {
    connection
        .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
        .map_err(|err| LinkError::Exporter(err.to_string()))
}

async fn check_proof<S: AsyncRead + AsyncWrite + Unpin>(
    tls: &mut S,
    secret: &FleetSecret,
    side: Side,
    exporter: &[u8; EXPORTER_LEN],
) -> Result<(), LinkError> {
    let mut theirs = [0u8; PROOF_LEN];
    tls.read_exact(&mut theirs).await?;
    if peer::verify(secret.expose().as_bytes(), side, exporter, &theirs) {
        Ok(())
    } else {
        Err(LinkError::WrongSecret)
    }
}

/// Accepts any certificate, and checks only that the peer signed the handshake with the key
/// of the one it sent: on a peer link, the proof of the fleet secret over the exporter is
/// what authenticates (see the module documentation).
#[derive(Debug)]
struct ProofIsTheCheck(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for ProofIsTheCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The client config offers TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
