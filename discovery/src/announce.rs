//! What a proxy runs to register itself with the discovery service.
//!
//! [`run`] posts a heartbeat every interval until shut down, then one last heartbeat with
//! `leaving: true` so the service delists the proxy at once instead of after the heartbeat
//! timeout. Failures are logged and retried on the next tick; a proxy keeps serving whether or
//! not the discovery service is reachable.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use shroud_process::resolve::Resolve;

use crate::api::{self, Heartbeat};
use crate::http::{self, HttpError};
use crate::secret::FleetSecret;
use crate::signed::ProxyEntry;

/// The least time between two heartbeats to one service when names change quickly.
pub const MIN_SPACING: Duration = Duration::from_secs(1);
/// Default time between heartbeats.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Deadline for one heartbeat, connection included.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the final `leaving` heartbeat.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the discovery service is: `https://HOST[:PORT]`, nothing more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryUrl {
    host: String,
    port: u16,
}

/// Why a text is not a discovery URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// The scheme is not `https://`.
    #[error("the discovery URL must start with https://")]
    NotHttps,
    /// The URL has a path, query, fragment or user part.
    #[error("the discovery URL is https://HOST[:PORT], without a path, query or user")]
    Extra,
    /// The host is neither a hostname nor an IP address.
    #[error("the discovery URL's host is not a hostname or an IP address")]
    BadHost,
    /// The port is not a number from 1 to 65535.
    #[error("the discovery URL's port is not a number from 1 to 65535")]
    BadPort,
}

impl DiscoveryUrl {
    /// The host (a normalised hostname, or an IP address without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `Host` header value: the host, with the port unless it is 443.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl FromStr for DiscoveryUrl {
    type Err = UrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rest = text
            .get(..8)
            .filter(|scheme| scheme.eq_ignore_ascii_case("https://"))
            .map(|_| &text[8..])
            .ok_or(UrlError::NotHttps)?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#', '@']) {
            return Err(UrlError::Extra);
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (v6, after) = bracketed.split_once(']').ok_or(UrlError::BadHost)?;
            let v6: std::net::Ipv6Addr = v6.parse().map_err(|_| UrlError::BadHost)?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or(UrlError::BadPort)?),
            };
            (v6.to_string(), port)
        } else {
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            let host = match host.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) => v4.to_string(),
                Ok(IpAddr::V6(_)) => return Err(UrlError::BadHost),
                Err(_) => shroud_mux::hostname::normalize(host).map_err(|_| UrlError::BadHost)?,
            };
            (host, port)
        };
        let port = match port {
            None => 443,
            Some(text) => match text.parse::<u16>() {
                Ok(port) if port != 0 && text.bytes().all(|b| b.is_ascii_digit()) => port,
                _ => return Err(UrlError::BadPort),
            },
        };
        Ok(Self { host, port })
    }
}

impl fmt::Display for DiscoveryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}", self.authority())
    }
}

/// Why one heartbeat failed.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// The host cannot be a TLS server name.
    #[error("{0} cannot be checked against a certificate")]
    ServerName(String),
    /// The TCP connection could not be made.
    #[error("could not connect to the discovery service")]
    Connect(#[source] std::io::Error),
    /// The TLS handshake failed (often: the certificate is not trusted).
    #[error("the TLS handshake with the discovery service failed")]
    Tls(#[source] std::io::Error),
    /// The HTTP exchange failed.
    #[error("the heartbeat request failed")]
    Http(#[from] HttpError),
    /// The service answered something other than 204.
    #[error("the discovery service answered {status}: {message}")]
    Status {
        /// The status code.
        status: u16,
        /// The start of the body, control characters removed.
        message: String,
    },
    /// The heartbeat took longer than its deadline.
    #[error("the heartbeat timed out")]
    Timeout,
}

/// A discovery service to announce to, and how to reach it.
#[derive(Clone)]
pub struct Endpoint {
    /// Where the service is.
    pub url: DiscoveryUrl,
    /// TLS toward it (roots, ALPN); see [`client_tls`].
    pub tls: Arc<rustls::ClientConfig>,
    /// Addresses to dial instead of asking DNS for the URL's host (`--resolve`).
    pub resolve: Resolve,
}

impl Endpoint {
    /// The service at `url`, reached with `tls`, its host looked up in DNS.
    pub fn new(url: DiscoveryUrl, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            url,
            tls,
            resolve: Resolve::new(),
        }
    }
}

/// Called with the peer addresses a heartbeat's answer named (see [`Presence::on_peers`]).
pub type PeersFound = Box<dyn Fn(&[SocketAddr]) + Send + Sync>;

/// What a proxy announces about itself: its entry, where visitors reach it, and (asked anew
/// for each heartbeat) the hostnames bound on it now.
pub struct Presence {
    /// The entry lists carry.
    pub entry: ProxyEntry,
    /// Its public addresses, for the service's DNS answers.
    pub addrs: Vec<IpAddr>,
    /// The hostnames bound on it now.
    pub names: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// Changes when `names` may have: a heartbeat then goes out at once (at most one a
    /// [`MIN_SPACING`]), so the service's DNS follows binds without waiting for the interval.
    pub changes: Option<tokio::sync::watch::Receiver<u64>>,
    /// Where its peer link listens, when it links with the rest of the fleet.
    pub peer: Option<SocketAddr>,
    /// Told, after each heartbeat that named `peer`, the other members' peer addresses the
    /// service knows: where to join the fleet's gossip.
    pub on_peers: Option<PeersFound>,
}

impl Presence {
    /// A presence of `entry` alone: no addresses, no names.
    pub fn new(entry: ProxyEntry) -> Self {
        Self {
            entry,
            addrs: Vec::new(),
            names: Box::new(Vec::new),
            changes: None,
            peer: None,
            on_peers: None,
        }
    }

    /// The heartbeat to send now.
    pub fn heartbeat(&self, leaving: bool) -> Heartbeat {
        let mut beat = Heartbeat::new(&self.entry, leaving);
        if !leaving {
            beat.addrs.clone_from(&self.addrs);
            beat.names = (self.names)();
            beat.peer = self.peer;
        }
        beat
    }
}

/// Builds the TLS configuration for reaching the discovery service: the public web roots,
/// plus the certificates in `extra_ca` (PEM) if given. Uses the aws-lc-rs provider.
pub fn client_tls(extra_ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::CertificateDer;

    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading CA certificates from {}", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("{} holds no certificate", path.display());
        }
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("a CA certificate in {} is unusable", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Sends one heartbeat and waits for the service's answer, within [`ATTEMPT_TIMEOUT`]: the
/// other members' peer addresses when the heartbeat named its own (see
/// [`api::HeartbeatReply`]), else nothing.
pub async fn send_heartbeat(
    endpoint: &Endpoint,
    secret: &FleetSecret,
    heartbeat: &Heartbeat,
) -> Result<Vec<SocketAddr>, AnnounceError> {
    tokio::time::timeout(ATTEMPT_TIMEOUT, exchange(endpoint, secret, heartbeat))
        .await
        .map_err(|_| AnnounceError::Timeout)?
}

async fn exchange(
    endpoint: &Endpoint,
    secret: &FleetSecret,
    heartbeat: &Heartbeat,
) -> Result<Vec<SocketAddr>, AnnounceError> {
    let url = &endpoint.url;
    let server_name = ServerName::try_from(url.host.clone())
        .map_err(|_| AnnounceError::ServerName(url.host.clone()))?;
    let tcp = match endpoint.resolve.get(&url.host, url.port) {
        Some(addr) => TcpStream::connect(addr).await,
        None => TcpStream::connect((url.host.as_str(), url.port)).await,
    }
    .map_err(AnnounceError::Connect)?;
    if let Err(err) = tcp.set_nodelay(true) {
        debug!(%err, "could not set TCP_NODELAY");
    }
    let stream = TlsConnector::from(endpoint.tls.clone())
        .connect(server_name, tcp)
        .await
        .map_err(AnnounceError::Tls)?;
    // Serialising a struct of strings and numbers cannot fail; map it anyway rather than panic.
    let body =
        serde_json::to_vec(heartbeat).map_err(|err| HttpError::Io(std::io::Error::other(err)))?;
    let authorization = format!("Bearer {}", secret.expose());
    let response = http::request(
        stream,
        "POST",
        &url.authority(),
        api::HEARTBEAT_PATH,
        &[
            ("Authorization", &authorization),
            ("Content-Type", "application/json"),
        ],
        Some(&body),
        4096,
    )
    .await?;
    match response.status {
        204 => Ok(Vec::new()),
        200 => {
            let reply: api::HeartbeatReply =
                serde_json::from_slice(&response.body).map_err(|err| AnnounceError::Status {
                    status: 200,
                    message: format!("unreadable answer: {err}"),
                })?;
            let mut peers = reply.peers;
            peers.truncate(api::MAX_PEERS_IN_REPLY);
            Ok(peers)
        }
        status => Err(AnnounceError::Status {
            status,
            message: api::printable_prefix(&response.body),
        }),
    }
}

/// Waits for `changes` to change; never, when there is nothing to watch or its sender is gone.
async fn names_changed(changes: &mut Option<tokio::sync::watch::Receiver<u64>>) -> Option<()> {
    match changes {
        Some(receiver) => receiver.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// Posts a heartbeat for `presence` every `interval` until `shutdown` is cancelled, then posts
/// once with `leaving: true` (within [`LEAVE_TIMEOUT`]) and returns.
///
/// The first heartbeat goes out at once. Errors are logged at warn and retried on the next
/// tick; the secret never reaches a log.
pub async fn run(
    endpoint: &Endpoint,
    secret: FleetSecret,
    presence: &Presence,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let url = &endpoint.url;
    let entry = &presence.entry;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut changes = presence.changes.clone();
    let mut registered = false;
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
            Some(()) = names_changed(&mut changes) => {
                // Let a burst of binds settle into one heartbeat, and never send more than one
                // a MIN_SPACING; the periodic beat then counts from this one.
                if let Some(last) = last_sent {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep_until(last + MIN_SPACING) => {}
                    }
                }
                ticker.reset();
            }
        }
        last_sent = Some(tokio::time::Instant::now());
        let beat = presence.heartbeat(false);
        let result = tokio::select! {
            () = shutdown.cancelled() => break,
            result = send_heartbeat(endpoint, &secret, &beat) => result,
        };
        if let (Ok(peers), Some(on_peers)) = (&result, &presence.on_peers) {
            on_peers(peers);
        }
        match result {
            Ok(_) if !registered => {
                info!(discovery = %url, name = %entry.name, port = entry.port, "registered with the discovery service");
                registered = true;
            }
            Ok(_) => debug!(discovery = %url, "heartbeat sent"),
            Err(err) => {
                warn!(discovery = %url, err = %anyhow::Error::new(err), "heartbeat failed; retrying next interval");
                registered = false;
            }
        }
    }

    let leave = presence.heartbeat(true);
    match tokio::time::timeout(LEAVE_TIMEOUT, send_heartbeat(endpoint, &secret, &leave)).await {
        Ok(Ok(_)) => info!(discovery = %url, "left the discovery service"),
        Ok(Err(err)) => {
            warn!(discovery = %url, err = %anyhow::Error::new(err), "could not tell the discovery service this proxy is leaving")
        }
        Err(_) => {
            warn!(discovery = %url, "telling the discovery service this proxy is leaving timed out")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_discovery_urls() {
        let url: DiscoveryUrl = "https://Disc.Example.net".parse().unwrap();
        assert_eq!((url.host(), url.port()), ("disc.example.net", 443));
        assert_eq!(url.authority(), "disc.example.net");
        assert_eq!(url.to_string(), "https://disc.example.net");

        let url: DiscoveryUrl = "HTTPS://disc.example.net:8443/".parse().unwrap();
        assert_eq!((url.host(), url.port()), ("disc.example.net", 8443));
        assert_eq!(url.authority(), "disc.example.net:8443");

        let url: DiscoveryUrl = "https://127.0.0.1:9000".parse().unwrap();
        assert_eq!((url.host(), url.port()), ("127.0.0.1", 9000));
        let url: DiscoveryUrl = "https://[::1]:9000".parse().unwrap();
        assert_eq!((url.host(), url.port()), ("::1", 9000));
        assert_eq!(url.authority(), "[::1]:9000");

        for (text, err) in [
            ("http://disc.example.net", UrlError::NotHttps),
            ("disc.example.net", UrlError::NotHttps),
            ("https://disc.example.net/v1", UrlError::Extra),
            ("https://user@disc.example.net", UrlError::Extra),
            ("https://disc.example.net?x", UrlError::Extra),
            ("https://", UrlError::BadHost),
            ("https://bad host", UrlError::BadHost),
            ("https://::1", UrlError::BadHost),
            ("https://disc.example.net:0", UrlError::BadPort),
            ("https://disc.example.net:+80", UrlError::BadPort),
            ("https://disc.example.net:99999", UrlError::BadPort),
            ("https://[::1]x", UrlError::BadPort),
        ] {
            assert_eq!(text.parse::<DiscoveryUrl>(), Err(err), "{text}");
        }
    }
}
