//! The Tor transport: every connection to a proxy goes through embedded Arti.
//!
//! Nothing leaves this machine outside Tor on this path: proxy names are resolved by the exit
//! relay, never locally, and each connection attempt gets its own isolation token, so each
//! proxy's tunnel has a circuit of its own and a reconnect after a failure builds a fresh one.
//! Only with `--tor-network` (a private Tor network, for tests and labs) may circuits lead to
//! loopback or private addresses, and only then is `--resolve` honoured.
//!
//! A `.onion` host is an onion service (a proxy run with `--onion-tunnel`): Arti finds its
//! descriptor and meets it at a rendezvous point, so the connection never leaves Tor through an
//! exit, and Tor checks that whoever answers holds the address's key. Its own isolation token
//! gives each connection its own rendezvous circuit, as it gives other proxies their own exit
//! circuit. `--resolve` never applies to onion addresses.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arti_client::{IsolationToken, StreamPrefs, TorClient};
use futures::future::BoxFuture;
use tor_rtcompat::PreferredRuntime;

use crate::metrics::ClientMetrics;
use crate::transport::{BoxStream, Resolve, Transport};
pub use shroud_tor::{arti_config, TorError, Vanguards};

/// What the Tor transport needs from the command line.
#[derive(Debug, Clone)]
pub struct TorOptions {
    /// Where Arti keeps its state and directory cache.
    pub state_dir: PathBuf,
    /// Another Tor network, in Arti's TOML config form; `None` for the real Tor network.
    pub network_file: Option<PathBuf>,
    /// Vanguards on onion-service circuits (`--vanguards`).
    pub vanguards: shroud_tor::Vanguards,
    /// Name overrides; refused unless `network_file` is given.
    pub resolve: Resolve,
    /// How long bootstrap may take before the client gives up.
    pub bootstrap_timeout: Duration,
    /// Show a progress bar (on a terminal) rather than log lines.
    pub progress_bar: bool,
}

/// Connections to proxies through Tor.
pub struct TorTransport {
    client: Arc<TorClient<PreferredRuntime>>,
    resolve: Resolve,
}

impl TorTransport {
    /// Starts Arti and waits until it has bootstrapped, showing progress.
    pub async fn bootstrap(options: TorOptions) -> Result<Self, TorError> {
        Self::bootstrap_reporting(options, None).await
    }

    /// [`TorTransport::bootstrap`], with Tor's progress and readiness also kept in `metrics`,
    /// during the bootstrap and for as long as Arti reports on it after.
    pub async fn bootstrap_reporting(
        options: TorOptions,
        metrics: Option<Arc<ClientMetrics>>,
    ) -> Result<Self, TorError> {
        if options.network_file.is_none() && !options.resolve.is_empty() {
            return Err(TorError::ResolveRefused);
        }
        let config = arti_config(
            options.network_file.as_deref(),
            &options.state_dir,
            options.vanguards,
        )?;
        if let Some(metrics) = &metrics {
            metrics.tor_enabled();
        }
        let observer = metrics.map(|metrics| {
            Arc::new(move |status: &arti_client::status::BootstrapStatus| {
                metrics.tor_status(
                    shroud_tor::bootstrap::percent(status),
                    status.ready_for_traffic(),
                );
            }) as shroud_tor::bootstrap::StatusObserver
        });
        let client = shroud_tor::bootstrap(
            config,
            options.bootstrap_timeout,
            options.progress_bar,
            observer,
        )
        .await?;
        Ok(Self {
            client,
            resolve: options.resolve,
        })
    }
}

impl TorTransport {
    /// The Arti client, for what else goes through this Tor: the client's own onion service
    /// (`--onion`) and local programs' connections (`--socks-listen`).
    pub fn client(&self) -> Arc<TorClient<PreferredRuntime>> {
        self.client.clone()
    }
}

impl Transport for TorTransport {
    fn connect<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            // A token of its own: this connection shares a circuit with nothing else, so each
            // proxy has its own circuit and every reconnect builds a new one.
            let mut prefs = StreamPrefs::new();
            prefs.set_isolation(IsolationToken::new());
            let onion = shroud_mux::onion::is_onion(host);
            let stream = match self.resolve.get(host, port).filter(|_| !onion) {
                Some(addr) => {
                    self.client
                        .connect_with_prefs((addr.ip().to_string(), port), &prefs)
                        .await
                }
                None => self.client.connect_with_prefs((host, port), &prefs).await,
            };
            let stream = stream
                .map_err(|err| io::Error::other(format!("through Tor to {host}:{port}: {err}")))?;
            Ok(Box::new(stream) as BoxStream)
        })
    }

    fn name(&self) -> &'static str {
        "tor"
    }
}
