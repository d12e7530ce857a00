//! `--onion`: the client also publishes TARGET as its own onion service, through its embedded
//! Tor, so visitors with a Tor client reach the origin without any proxy or exit relay.
//!
//! The service's identity key is made on first start and kept in Arti's keystore under the
//! client's Tor state (`STATE_DIR/tor/state/keystore`, files 0600, directories 0700), so the
//! address stays the same across restarts with the same state directory. Port 443 of the
//! service goes to TARGET and port 80 to `--http-target` (if given), by the same path as a
//! tunnel's visitor ([`crate::origin::forward`]): TLS passed through or terminated here as
//! configured, a TLS-ALPN-01 check answered here, and a PROXY protocol header that says the
//! visitor has no address. A stream for any other port is refused with Tor's `END` (`DONE`),
//! as C-tor does, so the service looks like any other. The service itself is shroud-tor's
//! [`OnionListener`], as `shroud-proxy --onion-tunnel`'s: it checks through Tor every
//! `--onion-probe-interval-secs` that visitors reach it, and relaunches with new introduction
//! points when they do not.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use shroud_mux::header::StreamKind;
use shroud_tor::onion_service::{OnionConnection, OnionListener, OnionOptions};
use shroud_tor::TorError;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, Instrument as _};

use crate::origin::{self, Peer};
use crate::shared::ClientConfig;

/// The service's nickname in Arti's keystore and state, its keys living under it: one per
/// hostname, so that clients for several hostnames sharing one state directory (and so one
/// guard, as the systemd unit's instances do) each have an address of their own.
///
/// `app.example.com` becomes `shroud-app_example_com`, readable in the keystore; a hostname
/// with an `_` of its own (where that mapping could collide) becomes `shroud_` and the
/// SHA-256 of the name, which cannot meet the first form (those all start `shroud-`).
pub fn nickname(hostname: &str) -> String {
    if hostname.contains('_') {
        let digest = Sha256::digest(hostname.as_bytes());
        let hex: String = digest[..16]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        format!("shroud_{hex}")
    } else {
        format!("shroud-{}", hostname.to_ascii_lowercase().replace('.', "_"))
    }
}
/// The onion service's port that leads to TARGET.
pub const HTTPS_PORT: u16 = 443;
/// The onion service's port that leads to `--http-target`.
pub const HTTP_PORT: u16 = 80;
/// How long visitors' streams get to end when the client stops.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the service keeps its state, and how it checks itself.
#[derive(Debug, Clone)]
pub struct OnionSettings {
    /// The directory the client's Arti keeps its storage under (`STATE_DIR/tor`).
    pub tor_dir: PathBuf,
    /// How often the service checks, through Tor, that visitors reach it, relaunching it with
    /// new introduction points when they do not (`--onion-probe-interval-secs`); `None` never
    /// checks.
    pub probe_interval: Option<Duration>,
}

/// The client's running onion service.
pub struct Onion {
    /// The service's address, `<56 base32 characters>.onion`.
    pub address: String,
    /// Ends once the service has stopped, after `shutdown`.
    pub task: JoinHandle<()>,
}

/// Launches the client's onion service on `client` and serves its visitors from `config`'s
/// targets until `shutdown`. Returns once Arti has the service's identity (made now, if this
/// is the first start): the address is known, while the descriptor is published in the
/// background (logged as "onion service published its descriptor").
pub fn launch(
    client: Arc<shroud_tor::Tor>,
    settings: OnionSettings,
    config: Arc<ClientConfig>,
    shutdown: CancellationToken,
) -> Result<Onion, TorError> {
    let mut ports = vec![HTTPS_PORT];
    if config.http_target.is_some() {
        ports.push(HTTP_PORT);
    }
    let options = OnionOptions {
        nickname: nickname(&config.hostname),
        ports,
        tor_dir: settings.tor_dir,
        probe_interval: settings.probe_interval,
    };
    let span = tracing::info_span!("onion");
    let listener = span.in_scope(|| OnionListener::launch(client, options))?;
    config.metrics.onion.set(listener.health());
    let address = listener.address().to_owned();
    let task = tokio::spawn(serve(listener, config, shutdown).instrument(span));
    Ok(Onion { address, task })
}

/// Serves visitors until `shutdown`, then stops the service and waits a little for visitors'
/// streams to end.
async fn serve(
    mut listener: OnionListener,
    config: Arc<ClientConfig>,
    shutdown: CancellationToken,
) {
    // As many visitors at once as one tunnel takes.
    let permits = Arc::new(Semaphore::new(config.timing.max_streams));
    let tracker = TaskTracker::new();
    loop {
        let connection = tokio::select! {
            () = shutdown.cancelled() => break,
            next = listener.next() => match next {
                Some(connection) => connection,
                None => {
                    tracing::warn!("the onion service stopped taking visitors");
                    break;
                }
            },
        };
        let Some(kind) = stream_kind(connection.port()) else {
            tracker.spawn(connection.reject());
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("as many onion visitors as --max-streams allows; refused");
            tracker.spawn(connection.reject());
            continue;
        };
        let config = config.clone();
        let span = tracing::debug_span!("visitor", kind = ?kind);
        tracker.spawn(
            async move {
                visit(connection, kind, &config).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
    listener.stop().await;
    tracker.close();
    // Visitors' streams end with the service's circuits; this wait is short.
    let _ = tokio::time::timeout(STOP_TIMEOUT, tracker.wait()).await;
    info!("onion service stopped");
}

/// What a stream to the service's `port` is for: 443 is TLS for TARGET, 80 plain HTTP for
/// `--http-target` (the service serves 80 only when there is one); `None` for anything else.
fn stream_kind(port: u16) -> Option<StreamKind> {
    match port {
        HTTPS_PORT => Some(StreamKind::Tls),
        HTTP_PORT => Some(StreamKind::Http),
        _ => None,
    }
}

/// Accepts a visitor's stream and takes it to the origin.
async fn visit(connection: OnionConnection, kind: StreamKind, config: &ClientConfig) {
    let stream = match connection.accept().await {
        Ok(stream) => stream,
        Err(err) => return debug!(%err, "accepting a visitor's stream failed"),
    };
    if let Err(err) = origin::forward(stream, kind, &Peer::Onion, config).await {
        debug!(%err, "onion visitor's connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_443_is_tls_80_is_http_and_no_other_is_served() {
        assert_eq!(stream_kind(443), Some(StreamKind::Tls));
        assert_eq!(stream_kind(80), Some(StreamKind::Http));
        for port in [1, 22, 8080, 8443] {
            assert_eq!(stream_kind(port), None, "{port}");
        }
    }

    #[test]
    fn each_hostname_has_a_nickname_of_its_own_that_arti_accepts() {
        let names = [
            "app.example.com",
            "app-example.com",
            "app.example-com",
            "x",
            "_dmarc.example.com",
            "a_b.example",
            "a.b_example",
        ];
        let nicknames: Vec<String> = names.iter().map(|name| nickname(name)).collect();
        assert_eq!(nicknames[0], "shroud-app_example_com");
        for (name, nick) in names.iter().zip(&nicknames) {
            assert!(
                tor_hsservice::HsNickname::new(nick.clone()).is_ok(),
                "{name}: {nick}"
            );
        }
        let distinct: std::collections::HashSet<_> = nicknames.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{nicknames:?}");
    }
}
