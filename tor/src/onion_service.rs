//! Hosting an onion service: a listener whose connections arrive through Tor, never through an
//! exit.
//!
//! [`OnionListener::launch`] starts the service on a bootstrapped Arti client. Its identity key
//! lives in Arti's keystore under the client's state directory (`state/keystore/hss/NICKNAME`),
//! made on first launch and reused after, so the address stays the same across restarts.
//! Each stream a Tor client opens to the service's port comes out of [`OnionListener::next`]
//! as an [`OnionConnection`] to accept; streams to any other port are refused the way other
//! onion service implementations refuse them (an `END` with reason `DONE`), so the service does
//! not stand out.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use arti_client::config::onion_service::OnionServiceConfigBuilder;
use arti_client::{DataStream, TorClient};
use futures::{Stream, StreamExt as _};
use tor_cell::relaycell::msg::{Connected, End, EndReason};
use tor_hsservice::status::State;
use tor_hsservice::{HsNickname, RunningOnionService, StreamRequest};
use tor_proto::stream::IncomingStreamRequest;
use tor_rtcompat::PreferredRuntime;
use tracing::{debug, info, warn};

use crate::TorError;

/// A running onion service, and the streams Tor clients open to it.
pub struct OnionListener {
    /// Dropping it stops the service.
    running: Arc<RunningOnionService>,
    address: String,
    port: u16,
    requests: Pin<Box<dyn Stream<Item = StreamRequest> + Send>>,
}

/// One stream a Tor client opened to the service's port, not yet accepted.
pub struct OnionConnection {
    request: StreamRequest,
}

impl OnionConnection {
    /// Tells the client the stream is open (a `CONNECTED` cell) and returns it as a byte
    /// stream, which implements tokio's and futures' I/O traits; written data is sent on
    /// flush.
    pub async fn accept(self) -> io::Result<DataStream> {
        self.request
            .accept(Connected::new_empty())
            .await
            .map_err(|err| io::Error::other(format!("accepting an onion stream: {err}")))
    }
}

impl OnionListener {
    /// Launches the service `nickname` on `client` (bootstrapped), serving `port`. The
    /// nickname names its keys in the keystore: the same nickname on the same state directory
    /// is the same address.
    pub fn launch(
        client: &TorClient<PreferredRuntime>,
        nickname: &str,
        port: u16,
    ) -> Result<Self, TorError> {
        let nickname = HsNickname::new(nickname.to_owned())
            .map_err(|err| TorError::OnionService(format!("nickname {nickname:?}: {err}")))?;
        let config = OnionServiceConfigBuilder::default()
            .nickname(nickname)
            .build()
            .map_err(|err| TorError::OnionService(err.to_string()))?;
        let (running, rend_requests) = client
            .launch_onion_service(config)
            .map_err(|err| TorError::OnionService(err.to_string()))?
            .ok_or_else(|| TorError::OnionService("the service is disabled".into()))?;
        let id = running
            .onion_address()
            .ok_or_else(|| TorError::OnionService("the service has no identity key".into()))?;
        let address = shroud_mux::onion::from_public_key(id.as_ref());
        Ok(Self {
            running,
            address,
            port,
            requests: Box::pin(tor_hsservice::handle_rend_requests(rend_requests)),
        })
    }

    /// The service's address, `...xyzad.onion`: its public key, so clients that dial it know
    /// they reached the holder of the key.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The port it serves.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The next stream a client opens to the service's port; `None` once the service has
    /// stopped. Streams to other ports are refused on the way.
    pub async fn next(&mut self) -> Option<OnionConnection> {
        loop {
            let request = self.requests.next().await?;
            let port = match request.request() {
                IncomingStreamRequest::Begin(begin) => Some(begin.port()),
                _ => None,
            };
            if port == Some(self.port) {
                return Some(OnionConnection { request });
            }
            debug!(?port, "refusing an onion stream to another port");
            tokio::spawn(async move {
                let _ = request.reject(End::new_with_reason(EndReason::DONE)).await;
            });
        }
    }

    /// Logs the service's state as it changes (published and reachable, degraded, broken,
    /// with Arti's reason), until the service stops. Spawn it.
    pub fn log_status(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut events = self.running.status_events();
        let address = self.address.clone();
        async move {
            let mut last = None;
            while let Some(status) = events.next().await {
                let state = status.state();
                if last == Some(state) {
                    continue;
                }
                last = Some(state);
                let problem = status.current_problem().map(|p| format!("{p:?}"));
                match (state, problem) {
                    (State::Running, _) => info!(onion = %address, "onion service reachable"),
                    (State::DegradedReachable, problem) => {
                        info!(onion = %address, ?problem, "onion service reachable, degraded")
                    }
                    // Arti publishes for the current time period and for the one next to it,
                    // which needs the network's shared random values; a network younger than
                    // one shared-random round (a private one) has none yet. Nothing failed.
                    (State::DegradedUnreachable, None) => info!(
                        onion = %address,
                        "onion service reachable (descriptor published for the current time \
                         period only)"
                    ),
                    (State::Bootstrapping, _) => debug!(onion = %address, "onion service starting"),
                    (State::Recovering, problem) => {
                        info!(onion = %address, ?problem, "onion service recovering")
                    }
                    (State::Shutdown, _) => debug!(onion = %address, "onion service stopped"),
                    (state, problem) => {
                        warn!(onion = %address, ?state, ?problem, "onion service unreachable")
                    }
                }
            }
        }
    }
}
