//! The client as a whole: one tunnel task per proxy, and what they report.

use std::sync::Arc;
use std::time::Duration;

use shroud_mux::auth::SecretKey;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, Instrument as _};

use crate::transport::Transport;
use crate::tunnel::{self, TunnelState};

/// A proxy to hold a tunnel to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyAddr {
    /// Hostname, checked against the proxy's certificate.
    pub name: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Display for ProxyAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.port)
    }
}

/// Where the client sends visitors' connections. Never logged at info level: it is the address
/// shroud exists to hide.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Target(<hidden>)")
    }
}

/// Timeouts and intervals of a client.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Reaching the proxy through the transport.
    pub connect_timeout: Duration,
    /// From the connection to a completed bind.
    pub handshake_timeout: Duration,
    /// How often the client pings; two intervals without a pong mark the tunnel dead.
    pub keepalive_interval: Duration,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_cap: Duration,
    /// A tunnel up this long resets the backoff.
    pub stable_after: Duration,
    /// Writing the acknowledgement and reading a stream's header.
    pub stream_header_timeout: Duration,
    /// Connecting to the origin.
    pub origin_connect_timeout: Duration,
    /// Most streams open on one tunnel.
    pub max_streams: usize,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(20),
            keepalive_interval: Duration::from_secs(10),
            backoff_base: crate::backoff::DEFAULT_BASE,
            backoff_cap: crate::backoff::DEFAULT_CAP,
            stable_after: crate::backoff::DEFAULT_STABLE_AFTER,
            stream_header_timeout: Duration::from_secs(10),
            origin_connect_timeout: Duration::from_secs(10),
            max_streams: 8192,
        }
    }
}

impl Timing {
    /// Defaults for the Tor transport: circuits take seconds to build, and each round trip
    /// crosses three relays.
    pub fn tor() -> Self {
        Self {
            connect_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(30),
            stream_header_timeout: Duration::from_secs(20),
            ..Self::default()
        }
    }
}

/// Everything a running client needs.
pub struct ClientConfig {
    /// The normalised hostname to publish.
    pub hostname: String,
    /// Where visitors' TLS connections go.
    pub target: Target,
    /// Where plain-HTTP visitors go; without it the proxy redirects them to HTTPS.
    pub http_target: Option<Target>,
    /// Terminate visitors' TLS here (and send plaintext to `target`).
    pub origin_tls: Option<TlsAcceptor>,
    /// The proxies to hold tunnels to.
    pub proxies: Vec<ProxyAddr>,
    /// How proxies are reached.
    pub transport: Arc<dyn Transport>,
    /// TLS toward proxies (roots, ALPN).
    pub tls: Arc<rustls::ClientConfig>,
    /// The client's identity.
    pub key: SecretKey,
    /// Timeouts and intervals.
    pub timing: Timing,
}

/// Why a client stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No proxy was given.
    #[error("no proxy to connect to")]
    NoProxies,
    /// Every proxy refused in a way that retrying cannot change.
    #[error("no tunnel can succeed: {}", .0.join("; "))]
    AllFailed(Vec<String>),
}

/// A running client: its tunnels' states, and the task that ends when it stops.
pub struct Client {
    states: Vec<(ProxyAddr, watch::Receiver<TunnelState>)>,
    task: tokio::task::JoinHandle<Result<(), ClientError>>,
}

impl Client {
    /// Starts the client on the current runtime. It runs until `shutdown` is cancelled or every
    /// proxy has refused for good.
    pub fn spawn(config: ClientConfig, shutdown: CancellationToken) -> Result<Client, ClientError> {
        if config.proxies.is_empty() {
            return Err(ClientError::NoProxies);
        }
        let config = Arc::new(config);
        let streams = TaskTracker::new();
        let mut states = Vec::new();
        let mut tunnels = Vec::new();
        for proxy in &config.proxies {
            let (state_tx, state_rx) = watch::channel(TunnelState::Connecting);
            states.push((proxy.clone(), state_rx));
            let span = tracing::info_span!("tunnel", proxy = %proxy);
            tunnels.push(tokio::spawn(
                tunnel::hold(
                    proxy.clone(),
                    config.clone(),
                    state_tx,
                    shutdown.clone(),
                    streams.clone(),
                )
                .instrument(span),
            ));
        }
        info!(
            hostname = %config.hostname,
            proxies = config.proxies.len(),
            transport = config.transport.name(),
            "client started"
        );
        let task = tokio::spawn(async move {
            let mut failures = Vec::new();
            for (proxy, tunnel) in config.proxies.iter().zip(tunnels) {
                if let Ok(Some(reason)) = tunnel.await {
                    failures.push(format!("{proxy}: {reason}"));
                }
            }
            streams.close();
            // Visitor streams end with their sessions; this wait is short.
            let _ = tokio::time::timeout(Duration::from_secs(5), streams.wait()).await;
            if failures.len() == config.proxies.len() {
                Err(ClientError::AllFailed(failures))
            } else {
                Ok(())
            }
        });
        Ok(Client { states, task })
    }

    /// The current state of each tunnel.
    pub fn states(&self) -> Vec<(ProxyAddr, TunnelState)> {
        self.states
            .iter()
            .map(|(proxy, rx)| (proxy.clone(), rx.borrow().clone()))
            .collect()
    }

    /// Waits until at least `count` tunnels are bound.
    pub async fn wait_bound(&mut self, count: usize) {
        loop {
            let bound = self
                .states
                .iter()
                .filter(|(_, rx)| *rx.borrow() == TunnelState::Bound)
                .count();
            if bound >= count {
                return;
            }
            let changes = self.states.iter_mut().map(|(_, rx)| Box::pin(rx.changed()));
            let _ = futures::future::select_all(changes).await;
        }
    }

    /// Waits until the tunnel to `proxy` reaches a state that `pred` accepts.
    pub async fn wait_for(&mut self, proxy: usize, pred: impl Fn(&TunnelState) -> bool) {
        if let Some((_, rx)) = self.states.get_mut(proxy) {
            let _ = rx.wait_for(|state| pred(state)).await;
        }
    }

    /// Waits for the client to stop, and says why it did.
    pub async fn join(self) -> Result<(), ClientError> {
        match self.task.await {
            Ok(result) => result,
            Err(err) => Err(ClientError::AllFailed(vec![format!("client task: {err}")])),
        }
    }
}
