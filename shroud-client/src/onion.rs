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
//! as C-tor does, so the service looks like any other.

use std::sync::Arc;
use std::time::Duration;

use arti_client::TorClient;
use futures::StreamExt as _;
use safelog::DisplayRedacted as _;
use shroud_mux::header::StreamKind;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tor_cell::relaycell::msg::{Connected, End, EndReason};
use tor_hsservice::config::OnionServiceConfigBuilder;
use tor_hsservice::status::State;
use tor_hsservice::{RunningOnionService, StreamRequest};
use tor_proto::stream::IncomingStreamRequest;
use tor_rtcompat::PreferredRuntime;
use tracing::{debug, info, warn, Instrument as _};

use crate::origin::{self, Peer};
use crate::shared::ClientConfig;

/// The service's nickname in Arti's keystore and state: its keys live under it.
pub const NICKNAME: &str = "shroud";
/// The onion service's port that leads to TARGET.
pub const HTTPS_PORT: u16 = 443;
/// The onion service's port that leads to `--http-target`.
pub const HTTP_PORT: u16 = 80;
/// How long visitors' streams get to end when the client stops.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the onion service could not start.
#[derive(Debug, thiserror::Error)]
pub enum OnionError {
    /// The service's configuration did not build.
    #[error("onion service configuration: {0}")]
    Config(String),
    /// Arti could not launch it (its keystore or state could not be read or written, say).
    #[error("launching the onion service: {0}")]
    Launch(String),
    /// Arti launched it but has no identity for it.
    #[error("the onion service has no address (its identity key is missing from the keystore)")]
    NoAddress,
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
    client: &TorClient<PreferredRuntime>,
    config: Arc<ClientConfig>,
    shutdown: CancellationToken,
) -> Result<Onion, OnionError> {
    let nickname = NICKNAME
        .parse()
        .map_err(|err| OnionError::Config(format!("{err}")))?;
    let service_config = OnionServiceConfigBuilder::default()
        .nickname(nickname)
        .build()
        .map_err(|err| OnionError::Config(err.to_string()))?;
    let (service, requests) = client
        .launch_onion_service(service_config)
        .map_err(|err| OnionError::Launch(err.to_string()))?
        .ok_or_else(|| OnionError::Launch("Arti says the service is disabled".into()))?;
    let address = service
        .onion_address()
        .ok_or(OnionError::NoAddress)?
        .display_unredacted()
        .to_string();
    let span = tracing::info_span!("onion");
    let task = tokio::spawn(
        serve(
            service,
            tor_hsservice::handle_rend_requests(requests),
            config,
            shutdown,
        )
        .instrument(span),
    );
    Ok(Onion { address, task })
}

/// Serves stream requests until `shutdown`, then drops the service (which stops it) and waits
/// a little for visitors' streams to end.
async fn serve(
    service: Arc<RunningOnionService>,
    requests: impl futures::Stream<Item = StreamRequest>,
    config: Arc<ClientConfig>,
    shutdown: CancellationToken,
) {
    let mut requests = std::pin::pin!(requests);
    let mut status = service.status_events();
    // As many visitors at once as one tunnel takes.
    let permits = Arc::new(Semaphore::new(config.timing.max_streams));
    let tracker = TaskTracker::new();
    let mut published_logged = false;
    let mut last_state = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            // A status stream that ended disables this branch (each turn of the loop polls it
            // once more, and finds it ended at once).
            Some(now) = status.next() => {
                let state = now.state();
                let problem = now.current_problem();
                // Arti counts a descriptor missing from the next time period's HSDirs as
                // "unreachable": without a problem reported, visitors of this period find it
                // (and on a private testing network there is no next period to publish to).
                let published = state.is_fully_reachable()
                    || (state == State::DegradedUnreachable && problem.is_none());
                if !published_logged && published {
                    info!("onion service published its descriptor: visitors can reach it");
                    published_logged = true;
                }
                if last_state != Some(state) {
                    match (state, problem) {
                        (State::Broken | State::DegradedUnreachable | State::Recovering, Some(problem)) => {
                            warn!(?state, ?problem, "onion service state");
                        }
                        _ => info!(?state, "onion service state"),
                    }
                    last_state = Some(state);
                }
            }
            next = requests.next() => {
                let Some(request) = next else {
                    warn!("the onion service stopped taking visitors");
                    break;
                };
                let Some(kind) = stream_kind(request.request(), config.http_target.is_some()) else {
                    debug!("a stream for a port this service does not serve; refused");
                    tracker.spawn(reject(request));
                    continue;
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    debug!("as many onion visitors as --max-streams allows; refused");
                    tracker.spawn(reject(request));
                    continue;
                };
                let config = config.clone();
                let span = tracing::debug_span!("visitor", kind = ?kind);
                tracker.spawn(async move {
                    visit(request, kind, &config).await;
                    drop(permit);
                }.instrument(span));
            }
        }
    }
    drop(service);
    tracker.close();
    // Visitors' streams end with the service's circuits; this wait is short.
    let _ = tokio::time::timeout(STOP_TIMEOUT, tracker.wait()).await;
    info!("onion service stopped");
}

/// What a stream request on the service's `port` is for: 443 is TLS for TARGET, 80 plain HTTP
/// for `--http-target` (when there is one); `None` for anything else.
fn stream_kind(request: &IncomingStreamRequest, has_http_target: bool) -> Option<StreamKind> {
    let IncomingStreamRequest::Begin(begin) = request else {
        return None;
    };
    match begin.port() {
        HTTPS_PORT => Some(StreamKind::Tls),
        HTTP_PORT if has_http_target => Some(StreamKind::Http),
        _ => None,
    }
}

/// Refuses a stream as C-tor refuses one for a port it does not serve: `END` with `DONE`.
async fn reject(request: StreamRequest) {
    if let Err(err) = request.reject(End::new_with_reason(EndReason::DONE)).await {
        debug!(%err, "refusing a stream failed");
    }
}

/// Accepts a visitor's stream and takes it to the origin.
async fn visit(request: StreamRequest, kind: StreamKind, config: &ClientConfig) {
    let stream = match request.accept(Connected::new_empty()).await {
        Ok(stream) => stream,
        Err(err) => return debug!(%err, "accepting a visitor's stream failed"),
    };
    if let Err(err) = origin::forward(stream, kind, &Peer::Onion, config).await {
        debug!(%err, "onion visitor's connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use tor_cell::relaycell::msg::{Begin, BeginFlags};

    use super::*;

    fn begin(port: u16) -> IncomingStreamRequest {
        IncomingStreamRequest::Begin(Begin::new("", port, BeginFlags::empty()).unwrap())
    }

    #[test]
    fn port_443_is_tls_and_80_is_http_only_with_an_http_target() {
        assert_eq!(stream_kind(&begin(443), false), Some(StreamKind::Tls));
        assert_eq!(stream_kind(&begin(443), true), Some(StreamKind::Tls));
        assert_eq!(stream_kind(&begin(80), true), Some(StreamKind::Http));
        assert_eq!(stream_kind(&begin(80), false), None);
        for port in [22, 8080, 8443] {
            assert_eq!(stream_kind(&begin(port), true), None, "{port}");
        }
    }
}
