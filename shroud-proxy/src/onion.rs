//! The tunnel listener as a Tor onion service (`--onion-tunnel`): clients reach the proxy
//! without leaving Tor through an exit.
//!
//! [`OnionTunnels::start`] bootstraps an embedded Arti whose state (its identity key among it)
//! lives under the proxy's state directory, launches the service and learns its address,
//! which [`crate::cli`] prints and announces. [`accept`] then hands every stream a client
//! opens to the service's port to [`crate::tunnel::serve`], exactly as a TCP tunnel connection
//! is handed: the TLS handshake with the proxy's certificate, the bind proof and the streams
//! that follow are the same. Onion connections have no address, so until they are bound they
//! count together as one address, [`ONION_PEER`], against `--max-connections-per-address`, and
//! against `--max-connections` like any other. The service checks itself through Tor every
//! `--onion-probe-interval-secs` and, when Tor clients cannot reach it, relaunches with new
//! introduction points ([`shroud_tor::onion_service`]).

use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shroud_tor::onion_service::{OnionConnection, OnionHealth, OnionListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, Instrument as _};

use crate::admission::{AddressGuard, Limit};
use crate::shared::Shared;
use crate::tunnel;

/// The onion service's nickname in Arti's keystore: its key is
/// `STATE_DIR/tor/state/keystore/hss/shroud-proxy-tunnel/`.
pub const NICKNAME: &str = "shroud-proxy-tunnel";

/// The default port of the service, as clients dial it when none is given.
pub const DEFAULT_PORT: u16 = 443;

/// The address every onion connection counts under until it is bound: `100::`, in RFC 6666's
/// discard-only prefix, which no TCP peer ever has.
pub const ONION_PEER: IpAddr = IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0));

/// What hosting the tunnel listener as an onion service needs.
#[derive(Debug, Clone)]
pub struct OnionOptions {
    /// The proxy's state directory (`--state-dir`): Arti's state, cache and keys go in
    /// `tor/` inside it. Created mode 0700; refused if others may enter it.
    pub state_dir: PathBuf,
    /// Another Tor network than the public one (`--tor-network`), in Arti's TOML form.
    pub network_file: Option<PathBuf>,
    /// Vanguards on the service's circuits (`--vanguards`).
    pub vanguards: shroud_tor::Vanguards,
    /// How long Arti may take to bootstrap before the proxy gives up.
    pub bootstrap_timeout: Duration,
    /// The port the service serves.
    pub port: u16,
    /// How often the service checks, through Tor, that clients reach it, and relaunches it
    /// with new introduction points when they do not (`--onion-probe-interval-secs`); `None`
    /// never checks.
    pub probe_interval: Option<Duration>,
}

/// The running onion service, and the Tor client that hosts it.
pub struct OnionTunnels {
    listener: OnionListener,
    port: u16,
    /// The service runs on this client; it lives as long as the listener.
    _client: Arc<shroud_tor::Tor>,
}

impl OnionTunnels {
    /// Bootstraps Tor and launches the service, making its key on first start; afterwards
    /// checks that nothing under the keystore lets others in.
    pub async fn start(options: OnionOptions) -> anyhow::Result<Self> {
        shroud_tor::private_dir::ensure(&options.state_dir)?;
        let tor_dir = options.state_dir.join("tor");
        shroud_tor::private_dir::ensure(&tor_dir)?;
        let config =
            shroud_tor::arti_config(options.network_file.as_deref(), &tor_dir, options.vanguards)?;
        let client = shroud_tor::bootstrap(config, options.bootstrap_timeout, false, None).await?;
        let service = shroud_tor::onion_service::OnionOptions {
            nickname: NICKNAME.into(),
            ports: vec![options.port],
            tor_dir: tor_dir.clone(),
            probe_interval: options.probe_interval,
        };
        let listener = OnionListener::launch(client.clone(), service)?;
        // Arti writes keys mode 0600 in directories it makes 0700; a key others can read is
        // a leaked address, so check rather than trust.
        let keystore = tor_dir.join("state/keystore");
        if keystore.exists() {
            shroud_tor::private_dir::check_tree(&keystore)?;
        }
        Ok(Self {
            listener,
            port: options.port,
            _client: client,
        })
    }

    /// The service's address, `...xyzad.onion`.
    pub fn address(&self) -> &str {
        self.listener.address()
    }

    /// The port it serves.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its self-checks and relaunches, for metrics.
    pub fn health(&self) -> Arc<OnionHealth> {
        self.listener.health()
    }
}

/// Accepts tunnels arriving on the onion service until `shutdown`, each on a task of `tracker`
/// holding one of `permits` (the proxy's connection limit).
pub(crate) async fn accept(
    mut onion: OnionTunnels,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    info!(
        onion = %onion.address(),
        port = onion.port(),
        listener = "onion",
        "listening"
    );
    loop {
        let connection = tokio::select! {
            () = shutdown.cancelled() => {
                onion.listener.stop().await;
                return;
            }
            next = onion.listener.next() => match next {
                Some(connection) => connection,
                None => {
                    info!("the onion service stopped");
                    return;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!("connection limit reached; refusing an onion connection");
            shared.admission.refused(Limit::Connections);
            continue;
        };
        let Some(address) = shared.admission.connection_from(ONION_PEER) else {
            continue;
        };
        let (shared, shutdown) = (shared.clone(), shutdown.clone());
        let span = tracing::info_span!("tunnel", via = "onion");
        tracker.spawn(
            async move {
                serve(connection, shared, shutdown, address).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Opens one onion stream and serves it as a tunnel.
async fn serve(
    connection: OnionConnection,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    address: AddressGuard,
) {
    let timeout = shared.limits.handshake_timeout;
    let stream = match tokio::time::timeout(timeout, connection.accept()).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return debug!(%err, "onion stream failed"),
        Err(_) => return debug!("accepting an onion stream timed out"),
    };
    if let Err(err) = tunnel::serve(stream, "onion", shared, shutdown, Some(address)).await {
        debug!(%err, "tunnel failed");
    }
}
