//! Proxies from a discovery service (`--discovery URL --discovery-key KEY`).
//!
//! The list is fetched over HTTPS through the transport in use (so through Tor in tor mode),
//! and accepted only when signed by the pinned key, for this hostname, fresh, and not older
//! than a list already accepted: neither a Tor exit nor a compromised TLS front end can hand
//! the client a fleet of its choosing. It is asked for again when two thirds of its lifetime
//! have passed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use shroud_discovery::signed::{self, VerifyError};
use shroud_mux::auth::PublicKey;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use crate::fleet::{Fleet, FleetError, FleetSource};
use crate::shared::ProxyAddr;
use crate::transport::Transport;

/// Largest discovery response read.
const MAX_RESPONSE: usize = 64 * 1024;
/// Never ask again sooner than this, however short-lived the list.
const MIN_REFRESH: Duration = Duration::from_secs(10);

/// A discovery service (one or several equal instances), and what the client has accepted
/// from it so far.
///
/// Instances share the signing key, so any of them may answer: the client asks the one that
/// answered last, and on any failure the next, in the order given. A list is refused as a
/// replay if it is older than one already accepted from any instance.
pub struct DiscoverySource {
    /// Each instance's host and port.
    services: Vec<(String, u16)>,
    /// The instance to ask first.
    current: usize,
    hostname: String,
    key: PublicKey,
    tls: Arc<rustls::ClientConfig>,
    max_proxies: usize,
    request_timeout: Duration,
    newest_seen: Option<u64>,
    /// Ask for, and dial, proxies' onion endpoints.
    onion: bool,
}

impl DiscoverySource {
    /// A source for `hostname`'s proxies from the service whose instances are at `urls`
    /// (`https://HOST[:PORT][/]` each, at least one), whose lists must be signed by `key`.
    /// `extra_ca` is trusted besides the web's roots. Each request may take `request_timeout`.
    pub fn new<S: AsRef<str>>(
        urls: &[S],
        key: PublicKey,
        hostname: &str,
        extra_ca: Option<&Path>,
        max_proxies: usize,
        request_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let services = urls
            .iter()
            .map(|url| parse_url(url.as_ref()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!services.is_empty(), "no discovery URL given");
        Ok(Self {
            services,
            current: 0,
            hostname: hostname.to_owned(),
            key,
            tls: crate::tls::https_client_config(extra_ca)?,
            max_proxies,
            request_timeout,
            newest_seen: None,
            onion: false,
        })
    }

    /// Asks for proxies' onion endpoints too (`shroud-proxy --onion-tunnel`), and dials a
    /// proxy that has one there instead of at its name, still checking the certificate for
    /// its name. Only for a transport that reaches onion services: Tor.
    pub fn with_onion(mut self) -> Self {
        self.onion = true;
        self
    }

    /// Asks the instances in turn, starting with the current one, until one gives a list. The
    /// error, when none does, is permanent only if every instance's was.
    async fn fetch_any(&mut self, transport: &dyn Transport) -> Result<Fleet, FleetError> {
        let mut errors = Vec::new();
        let mut permanent = true;
        for offset in 0..self.services.len() {
            let index = (self.current + offset) % self.services.len();
            let (host, port) = self.services[index].clone();
            let limit = self.request_timeout;
            let result = match timeout(limit, self.fetch_list(transport, &host, port)).await {
                Ok(result) => result,
                Err(_) => Err(FleetError {
                    permanent: false,
                    message: format!("the discovery service did not answer within {limit:?}"),
                }),
            };
            match result {
                Ok(fleet) => {
                    if index != self.current {
                        tracing::info!(discovery = %host, "asking this discovery instance from now on");
                    }
                    self.current = index;
                    return Ok(fleet);
                }
                Err(err) => {
                    if self.services.len() > 1 {
                        tracing::warn!(discovery = %host, %err, "discovery instance failed; trying the next");
                    }
                    permanent &= err.permanent;
                    errors.push(format!("{host}:{port}: {}", err.message));
                }
            }
        }
        Err(FleetError {
            permanent,
            message: errors.join("; "),
        })
    }

    async fn fetch_list(
        &mut self,
        transport: &dyn Transport,
        host: &str,
        port: u16,
    ) -> Result<Fleet, FleetError> {
        let transient = |message: String| FleetError {
            permanent: false,
            message,
        };
        let stream = transport
            .connect(host, port)
            .await
            .map_err(|err| transient(format!("reaching the discovery service: {err}")))?;
        let server_name =
            crate::tls::server_name(host).map_err(|err| transient(err.to_string()))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(server_name, stream)
            .await
            .map_err(|err| FleetError {
                // A certificate that does not verify will not verify next time either.
                permanent: is_certificate_error(&err),
                message: format!("TLS to the discovery service: {err}"),
            })?;
        let host_header = if port == 443 {
            host.to_owned()
        } else {
            format!("{host}:{port}")
        };
        let mut path = format!("/v1/proxies?host={}", self.hostname);
        if self.onion {
            path = format!("{path}&{}", shroud_discovery::api::ONION_PARAM);
        }
        let response = shroud_discovery::http::request(
            tls,
            "GET",
            &host_header,
            &path,
            &[],
            None,
            MAX_RESPONSE,
        )
        .await
        .map_err(|err| transient(format!("discovery request: {err}")))?;
        if response.status != 200 {
            let text = String::from_utf8_lossy(&response.body);
            let text: String = text.chars().take(200).collect();
            return Err(transient(format!(
                "the discovery service answered {}: {}",
                response.status,
                text.trim()
            )));
        }
        let now = unix_now();
        let list = signed::verify(
            &response.body,
            &self.key,
            &self.hostname,
            now,
            self.newest_seen,
        )
        .map_err(|err| FleetError {
            permanent: is_forgery(&err),
            message: format!("discovery answer refused: {err}"),
        })?;
        self.newest_seen = Some(list.issued_at);
        let mut proxies: Vec<ProxyAddr> = list.proxies.iter().map(|p| self.proxy(p)).collect();
        let spares = proxies.split_off(self.max_proxies.min(proxies.len()));
        let lifetime = list.expires_at.saturating_sub(now);
        Ok(Fleet {
            proxies,
            spares,
            refresh_after: Duration::from_secs(lifetime * 2 / 3).max(MIN_REFRESH),
        })
    }
}

impl DiscoverySource {
    /// The proxy an entry names: at its onion endpoint when it has one and this source dials
    /// them ([`DiscoverySource::with_onion`]), else at its name. The list's signature covers
    /// both, and [`signed::verify`] checked the endpoint's form.
    fn proxy(&self, entry: &signed::ProxyEntry) -> ProxyAddr {
        let onion = entry
            .onion
            .as_deref()
            .filter(|_| self.onion)
            .and_then(|endpoint| shroud_mux::onion::parse_endpoint(endpoint, entry.port).ok());
        match onion {
            Some((address, port)) => ProxyAddr {
                name: entry.name.clone(),
                port,
                onion: Some(address),
            },
            None => ProxyAddr::new(entry.name.clone(), entry.port),
        }
    }
}

impl FleetSource for DiscoverySource {
    fn fetch<'a>(
        &'a mut self,
        transport: &'a dyn Transport,
    ) -> BoxFuture<'a, Result<Fleet, FleetError>> {
        Box::pin(self.fetch_any(transport))
    }

    fn describe(&self) -> String {
        let urls: Vec<String> = self
            .services
            .iter()
            .map(|(host, port)| format!("https://{host}:{port}"))
            .collect();
        format!("discovery {}", urls.join(", "))
    }
}

/// Whether a refused list means someone is forging them (or the key is wrong), rather than a
/// clock or timing problem that may pass.
fn is_forgery(err: &VerifyError) -> bool {
    !matches!(
        err,
        VerifyError::Expired { .. }
            | VerifyError::FromTheFuture { .. }
            | VerifyError::Replay { .. }
    )
}

fn is_certificate_error(err: &std::io::Error) -> bool {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|tls| matches!(tls, rustls::Error::InvalidCertificate(_)))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads `https://HOST[:PORT][/]`. Only https: the list is signed, but the request says which
/// hostname the client serves, which is no business of the network path.
fn parse_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| anyhow::anyhow!("--discovery {url:?}: only https:// URLs are accepted"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    anyhow::ensure!(
        !authority.contains('/') && !authority.contains('@') && !authority.is_empty(),
        "--discovery {url:?}: give the service's base URL, like https://discovery.example.net"
    );
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| anyhow::anyhow!("--discovery {url:?}: bad port {port:?}"))?,
        ),
        None => (authority, 443),
    };
    let host = shroud_mux::hostname::normalize(host)
        .map_err(|err| anyhow::anyhow!("--discovery {url:?}: {err}"))?;
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn onion_endpoints_are_asked_for_and_dialed_only_with_tor() {
        let key = shroud_mux::auth::SecretKey::from_seed(&[1; 32]).public();
        let source = DiscoverySource::new(
            &["https://disco.example"],
            key,
            "a.example",
            None,
            3,
            Duration::from_secs(5),
        )
        .unwrap();
        let onion = shroud_mux::onion::from_public_key(&[3; 32]);
        let entry = signed::ProxyEntry {
            name: "p.example".into(),
            port: 443,
            region: "eu".into(),
            onion: Some(format!("{onion}:8443")),
        };
        // Without Tor the entry's name is dialed (and the service is not asked for onions).
        assert_eq!(
            source.proxy(&entry),
            ProxyAddr::new("p.example".into(), 443)
        );
        // With Tor the onion endpoint is dialed, and the certificate still checked for the
        // entry's name.
        let source = source.with_onion();
        assert_eq!(
            source.proxy(&entry),
            ProxyAddr {
                name: "p.example".into(),
                port: 8443,
                onion: Some(onion),
            }
        );
        let plain = signed::ProxyEntry {
            onion: None,
            ..entry
        };
        assert_eq!(
            source.proxy(&plain),
            ProxyAddr::new("p.example".into(), 443)
        );
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("https://Disco.Example/").unwrap(),
            ("disco.example".to_owned(), 443)
        );
        assert_eq!(
            parse_url("https://disco.example:8443").unwrap(),
            ("disco.example".to_owned(), 8443)
        );
        for bad in [
            "http://disco.example",
            "https://",
            "https://disco.example/v1",
            "https://user@disco.example",
            "https://disco.example:0",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
