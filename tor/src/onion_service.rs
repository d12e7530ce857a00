//! Hosting an onion service: a listener whose connections arrive through Tor, never through an
//! exit, and that heals itself when Tor clients can no longer reach it.
//!
//! [`OnionListener::launch`] starts the service on a bootstrapped Arti client. Its identity key
//! lives in Arti's keystore under the client's state directory (`state/keystore/hss/NICKNAME`),
//! made on first launch and reused after, so the address stays the same across restarts.
//! Each stream a Tor client opens to one of the service's ports comes out of
//! [`OnionListener::next`] as an [`OnionConnection`] (which says its port) to accept or
//! refuse; streams to any other port are refused the way other onion service implementations
//! refuse them (an `END` with reason `DONE`), so the service does not stand out.
//!
//! **Self-healing.** Arti keeps retrying an introduction point it cannot reach for 15 minutes
//! before it picks another relay (`FAULTY_IPT_THRESHOLD` in tor-hsservice), so when the relays
//! holding all of a service's introduction points die, the service is unreachable that long;
//! and Arti's own status is no guide (on a private network it says "unreachable" forever). So
//! the service checks itself the way a visitor would: every [`OnionOptions::probe_interval`]
//! it opens a stream to its own address through its own Tor client, on a port it does not
//! serve, on fresh circuits (its own isolation, so a descriptor cached by an earlier check is
//! never reused: Arti's client refetches a descriptor only when an introduction point
//! *refuses* it, not when it cannot be reached). The `END` it gets back can only come from the
//! service, so it proves that the descriptor, an introduction point and a rendezvous all
//! worked. After [`PROBE_FAILURES_TO_RELAUNCH`] failed checks in a row it relaunches the
//! service with the same key (the same address) and new introduction points, and publishes a
//! new descriptor (the timings are in `onion_service/heal.rs`).

mod heal;
mod metrics;

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arti_client::config::onion_service::OnionServiceConfigBuilder;
use arti_client::DataStream;
use futures::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tor_cell::relaycell::msg::{Connected, End, EndReason};
use tor_hsservice::{HsNickname, RunningOnionService, StreamRequest};
use tor_proto::stream::IncomingStreamRequest;
use tracing::{debug, Instrument as _};

use crate::{Tor, TorError};

pub use heal::{DEFAULT_PROBE_INTERVAL, PROBE_FAILURES_TO_RELAUNCH};
pub use metrics::OnionMetrics;

/// How many accepted-but-not-yet-taken streams wait for [`OnionListener::next`].
const BACKLOG: usize = 32;
/// How long [`OnionListener::stop`] waits for the service to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`OnionListener::launch`] needs besides the Tor client.
#[derive(Debug, Clone)]
pub struct OnionOptions {
    /// Names the service's keys in the keystore: the same nickname on the same state directory
    /// is the same address.
    pub nickname: String,
    /// The ports it serves (at least one); streams to others are refused.
    pub ports: Vec<u16>,
    /// The directory Arti's storage is under, as given to [`crate::arti_config`]: the service's
    /// state is in `state/hss/NICKNAME/` inside it.
    pub tor_dir: PathBuf,
    /// How often the service checks that Tor clients reach it; `None` never checks (and so
    /// never heals).
    pub probe_interval: Option<Duration>,
}

/// Counts of the service's self-checks and relaunches, for metrics; read them at any time.
#[derive(Debug, Default)]
pub struct OnionHealth {
    probes_ok: AtomicU64,
    probes_failed: AtomicU64,
    relaunches: AtomicU64,
}

impl OnionHealth {
    /// Self-checks that reached the service through Tor.
    pub fn probes_succeeded(&self) -> u64 {
        self.probes_ok.load(Ordering::Relaxed)
    }

    /// Self-checks that did not.
    pub fn probes_failed(&self) -> u64 {
        self.probes_failed.load(Ordering::Relaxed)
    }

    /// Times the service was relaunched with new introduction points.
    pub fn relaunches(&self) -> u64 {
        self.relaunches.load(Ordering::Relaxed)
    }
}

/// A running onion service, and the streams Tor clients open to it.
pub struct OnionListener {
    address: String,
    ports: Vec<u16>,
    connections: mpsc::Receiver<OnionConnection>,
    health: Arc<OnionHealth>,
    /// Serves the service, checks it and relaunches it; ends (stopping the service) once
    /// `connections` is dropped.
    keeper: JoinHandle<()>,
}

/// One stream a Tor client opened to one of the service's ports, not yet accepted.
pub struct OnionConnection {
    request: StreamRequest,
    port: u16,
}

impl OnionConnection {
    /// The service's port the stream is for.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Tells the client the stream is open (a `CONNECTED` cell) and returns it as a byte
    /// stream, which implements tokio's and futures' I/O traits; written data is sent on
    /// flush.
    pub async fn accept(self) -> io::Result<DataStream> {
        self.request
            .accept(Connected::new_empty())
            .await
            .map_err(|err| io::Error::other(format!("accepting an onion stream: {err}")))
    }

    /// Refuses the stream as for a port the service does not serve (`END`, `DONE`).
    pub async fn reject(self) {
        reject(self.request).await;
    }
}

impl OnionListener {
    /// Launches the service on `client` (bootstrapped), as `options` say, and starts serving,
    /// checking and (when it must) relaunching it in the background. Returns once Arti has the
    /// service's identity (made now, on the first launch): the address is known, while the
    /// descriptor is published in the background (logged as "onion service published its
    /// descriptor").
    pub fn launch(client: Arc<Tor>, options: OnionOptions) -> Result<Self, TorError> {
        if options.ports.is_empty() {
            return Err(TorError::OnionService("no port to serve".into()));
        }
        let nickname = HsNickname::new(options.nickname.clone()).map_err(|err| {
            TorError::OnionService(format!("nickname {:?}: {err}", options.nickname))
        })?;
        let service = launch_service(&client, &nickname)?;
        let id = service
            .running
            .onion_address()
            .ok_or_else(|| TorError::OnionService("the service has no identity key".into()))?;
        let address = shroud_mux::onion::from_public_key(id.as_ref());
        let health = Arc::new(OnionHealth::default());
        let (sender, connections) = mpsc::channel(BACKLOG);
        let keeper = heal::Keeper::new(
            client,
            nickname,
            &options,
            address.clone(),
            sender,
            health.clone(),
        )?;
        let span = tracing::info_span!("onion_service", nickname = %options.nickname);
        let keeper = tokio::spawn(keeper.run(service).instrument(span));
        Ok(Self {
            address,
            ports: options.ports,
            connections,
            health,
            keeper,
        })
    }

    /// The service's address, `...xyzad.onion`: its public key, so clients that dial it know
    /// they reached the holder of the key.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The ports it serves.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Its self-checks and relaunches so far.
    pub fn health(&self) -> Arc<OnionHealth> {
        self.health.clone()
    }

    /// The next stream a client opens to one of the service's ports; `None` once the service
    /// has stopped for good. Streams to other ports are refused on the way.
    pub async fn next(&mut self) -> Option<OnionConnection> {
        self.connections.recv().await
    }

    /// Stops the service (streams already open stay open) and waits, a little, until Arti has
    /// let it go.
    pub async fn stop(self) {
        let Self {
            connections,
            keeper,
            ..
        } = self;
        drop(connections);
        if tokio::time::timeout(STOP_TIMEOUT, keeper).await.is_err() {
            debug!("the onion service took long to stop");
        }
    }
}

/// One launch of the service: Arti's handle (dropping it stops the service) and the stream
/// requests it hands over.
struct Launched {
    running: Arc<RunningOnionService>,
    requests: Pin<Box<dyn Stream<Item = StreamRequest> + Send>>,
}

/// Launches the service `nickname` on `client`.
fn launch_service(client: &Tor, nickname: &HsNickname) -> Result<Launched, TorError> {
    let config = OnionServiceConfigBuilder::default()
        .nickname(nickname.clone())
        .build()
        .map_err(|err| TorError::OnionService(err.to_string()))?;
    let (running, rend_requests) = client
        .launch_onion_service(config)
        .map_err(|err| TorError::OnionService(err.to_string()))?
        .ok_or_else(|| TorError::OnionService("the service is disabled".into()))?;
    Ok(Launched {
        running,
        requests: Box::pin(tor_hsservice::handle_rend_requests(rend_requests)),
    })
}

/// The port a stream request is for, if it is a `BEGIN`.
fn requested_port(request: &StreamRequest) -> Option<u16> {
    match request.request() {
        IncomingStreamRequest::Begin(begin) => Some(begin.port()),
        _ => None,
    }
}

/// Refuses a stream as C-tor refuses one for a port it does not serve: `END` with `DONE`.
async fn reject(request: StreamRequest) {
    if let Err(err) = request.reject(End::new_with_reason(EndReason::DONE)).await {
        debug!(%err, "refusing an onion stream failed");
    }
}
