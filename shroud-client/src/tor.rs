//! The Tor transport: every connection to a proxy goes through embedded Arti.
//!
//! Nothing leaves this machine outside Tor on this path: proxy names are resolved by the exit
//! relay, never locally, and each connection attempt gets its own isolation token, so each
//! proxy's tunnel has a circuit of its own and a reconnect after a failure builds a fresh one.
//! Only with `--tor-network` (a private Tor network, for tests and labs) may circuits lead to
//! loopback or private addresses, and only then is `--resolve` honoured.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arti_client::config::TorClientConfigBuilder;
use arti_client::{IsolationToken, StreamPrefs, TorClient, TorClientConfig};
use futures::future::BoxFuture;
use futures::StreamExt as _;
use tor_rtcompat::PreferredRuntime;
use tracing::{info, warn};

use crate::metrics::ClientMetrics;
use crate::transport::{BoxStream, Resolve, Transport};

/// Why Tor could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TorError {
    /// The `--tor-network` file could not be read.
    #[error("reading the Tor network file {path}: {source}")]
    ReadNetwork {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The `--tor-network` file is not Arti configuration.
    #[error("the Tor network file {path} is not valid Arti configuration: {reason}")]
    ParseNetwork {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The configuration did not validate.
    #[error("Tor configuration: {0}")]
    Config(String),
    /// `--resolve` was given without a private network.
    #[error(
        "--resolve is refused with the tor transport: names are resolved by the Tor exit, never \
         locally (it is allowed only with --tor-network, for a private Tor network)"
    )]
    ResolveRefused,
    /// Arti failed to start or bootstrap.
    #[error("Tor: {0}")]
    Arti(String),
    /// Bootstrap did not finish in time.
    #[error("Tor bootstrap did not finish within {secs} s (last status: {status})")]
    BootstrapTimeout {
        /// The deadline.
        secs: u64,
        /// Arti's last bootstrap status, with its blocked reason if any.
        status: String,
    },
}

/// What the Tor transport needs from the command line.
#[derive(Debug, Clone)]
pub struct TorOptions {
    /// Where Arti keeps its state and directory cache.
    pub state_dir: PathBuf,
    /// Another Tor network, in Arti's TOML config form; `None` for the real Tor network.
    pub network_file: Option<PathBuf>,
    /// Name overrides; refused unless `network_file` is given.
    pub resolve: Resolve,
    /// How long bootstrap may take before the client gives up.
    pub bootstrap_timeout: Duration,
    /// Show a progress bar (on a terminal) rather than log lines.
    pub progress_bar: bool,
}

/// Builds Arti's configuration: the network file's settings if given, storage under
/// `state_dir`.
pub fn arti_config(
    network_file: Option<&Path>,
    state_dir: &Path,
) -> Result<TorClientConfig, TorError> {
    let mut builder = match network_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| TorError::ReadNetwork {
                path: path.to_owned(),
                source,
            })?;
            toml::from_str::<TorClientConfigBuilder>(&text).map_err(|err| {
                TorError::ParseNetwork {
                    path: path.to_owned(),
                    reason: err.to_string(),
                }
            })?
        }
        None => TorClientConfigBuilder::default(),
    };
    builder
        .storage()
        .cache_dir(arti_client::config::CfgPath::new_literal(
            state_dir.join("cache"),
        ))
        .state_dir(arti_client::config::CfgPath::new_literal(
            state_dir.join("state"),
        ));
    builder
        .build()
        .map_err(|err| TorError::Config(err.to_string()))
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
        let config = arti_config(options.network_file.as_deref(), &options.state_dir)?;
        let client = TorClient::builder()
            .config(config)
            .bootstrap_behavior(arti_client::BootstrapBehavior::Manual)
            .create_unbootstrapped()
            .map_err(|err| TorError::Arti(err.to_string()))?;
        let started = tokio::time::Instant::now();
        // Before bootstrap() is called Arti reports itself "disabled, waiting to be told to
        // bootstrap": that is not a stall worth a warning.
        let not_started = client
            .bootstrap_status()
            .blocked()
            .map(|b| b.to_string())
            .unwrap_or_default();
        if let Some(metrics) = &metrics {
            metrics.tor_enabled();
        }
        let progress = tokio::spawn(show_progress(
            client.bootstrap_events(),
            options.progress_bar,
            not_started,
            metrics.clone(),
        ));
        let bootstrap = tokio::time::timeout(options.bootstrap_timeout, client.bootstrap()).await;
        progress.abort();
        match bootstrap {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(TorError::Arti(err.to_string())),
            Err(_) => {
                return Err(TorError::BootstrapTimeout {
                    secs: options.bootstrap_timeout.as_secs(),
                    status: client.bootstrap_status().to_string(),
                })
            }
        }
        info!(elapsed = ?started.elapsed(), "Tor bootstrapped");
        if let Some(metrics) = metrics {
            let status = client.bootstrap_status();
            metrics.tor_status(percent(&status), status.ready_for_traffic());
            tokio::spawn(follow_status(client.bootstrap_events(), metrics));
        }
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
            let stream = match self.resolve.get(host, port) {
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

/// A bootstrap status as a percentage.
fn percent(status: &arti_client::status::BootstrapStatus) -> i64 {
    (status.as_frac() * 100.0).round() as i64
}

/// Keeps `metrics` in step with Arti's status after the bootstrap (a directory gone stale
/// shows there), until Arti stops reporting.
async fn follow_status(
    mut events: arti_client::status::BootstrapEvents,
    metrics: Arc<ClientMetrics>,
) {
    while let Some(status) = events.next().await {
        metrics.tor_status(percent(&status), status.ready_for_traffic());
    }
}

/// Reports bootstrap progress until it is aborted: a bar on a terminal, log lines otherwise.
/// When progress stalls, says why (Arti's blocked reason).
async fn show_progress(
    mut events: arti_client::status::BootstrapEvents,
    bar: bool,
    not_started: String,
    metrics: Option<Arc<ClientMetrics>>,
) {
    let bar = bar.then(|| {
        let bar = indicatif::ProgressBar::new(100);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("Tor bootstrap [{bar:30}] {pos:>3}% {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    let mut last_logged = -1i32;
    let mut last_blocked = not_started;
    loop {
        let status = tokio::time::timeout(Duration::from_secs(10), events.next()).await;
        let status = match status {
            Ok(Some(status)) => status,
            Ok(None) => break,
            Err(_) => {
                // Ten seconds without news: say where it stands.
                warn!("Tor bootstrap is taking a while; still trying");
                continue;
            }
        };
        if let Some(metrics) = &metrics {
            metrics.tor_status(self::percent(&status), status.ready_for_traffic());
        }
        let percent = (status.as_frac() * 100.0).round() as i32;
        let blocked = status.blocked().map(|b| b.to_string()).unwrap_or_default();
        if let Some(bar) = &bar {
            bar.set_position(percent.clamp(0, 100) as u64);
            bar.set_message(if blocked.is_empty() {
                String::new()
            } else {
                format!("(stalled: {blocked})")
            });
        }
        if percent / 10 != last_logged / 10 {
            info!(percent, "Tor bootstrap: {status}");
            last_logged = percent;
        }
        if !blocked.is_empty() && blocked != last_blocked {
            warn!(reason = %blocked, "Tor bootstrap is stalled");
        }
        last_blocked = blocked;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
