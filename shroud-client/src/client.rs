//! The client as a whole: one tunnel task per proxy, kept in step with where the list of
//! proxies comes from, and what the tunnels report.
//!
//! A fixed list (`--proxy`) starts its tunnels once. A list from discovery or DNS SRV is asked
//! for again before it goes stale; tunnels to proxies that joined are opened, and tunnels to
//! proxies that left are closed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use shroud_mux::auth::SecretKey;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument as _};

use crate::backoff::Backoff;
use crate::transport::Transport;
use crate::tunnel::{self, StreamTasks, TunnelState};

/// A proxy to hold a tunnel to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// Most bytes one stream (one visitor) may hold here received from the proxy but not yet
    /// passed to the origin: the cap on its yamux receive window; the copy buffers grow with
    /// it. See [`shroud_mux::session::connection_receive_window`].
    pub stream_buffer: usize,
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
            stream_buffer: shroud_mux::session::DEFAULT_STREAM_BUFFER,
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

/// Where the list of proxies comes from.
pub enum ProxySource {
    /// A fixed list, as `--proxy` gives.
    Static(Vec<ProxyAddr>),
    /// A list that is asked for again: discovery, or DNS SRV records.
    Dynamic(Box<dyn FleetSource>),
}

/// A source of proxy lists that changes over time.
pub trait FleetSource: Send + Sync + 'static {
    /// Fetches the current list, through `transport` where it goes over the network.
    fn fetch<'a>(
        &'a mut self,
        transport: &'a dyn Transport,
    ) -> BoxFuture<'a, Result<Fleet, FleetError>>;

    /// What this source is, for logs (never secret).
    fn describe(&self) -> String;
}

/// One answer of a [`FleetSource`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// The proxies to hold tunnels to now.
    pub proxies: Vec<ProxyAddr>,
    /// When to ask again.
    pub refresh_after: Duration,
}

/// Why a [`FleetSource`] could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FleetError {
    /// Whether asking again cannot help (a forged or wrongly signed answer, say).
    pub permanent: bool,
    /// What went wrong.
    pub message: String,
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
    /// Where the proxies to hold tunnels to come from.
    pub source: ProxySource,
    /// How proxies are reached.
    pub transport: Arc<dyn Transport>,
    /// TLS toward proxies (roots, ALPN).
    pub tls: Arc<rustls::ClientConfig>,
    /// The client's identity.
    pub key: SecretKey,
    /// Timeouts and intervals.
    pub timing: Timing,
}

/// The tunnels' states, by proxy.
pub type States = BTreeMap<ProxyAddr, TunnelState>;

/// Why a client stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No proxy was given.
    #[error("no proxy to connect to")]
    NoProxies,
    /// Every proxy refused in a way that retrying cannot change.
    #[error("no tunnel can succeed: {}", .0.join("; "))]
    AllFailed(Vec<String>),
    /// The list of proxies could not be had, and asking again cannot help.
    #[error("no list of proxies: {0}")]
    Fleet(FleetError),
}

/// A running client: its tunnels' states, and the task that ends when it stops.
pub struct Client {
    states: watch::Receiver<States>,
    task: JoinHandle<Result<(), ClientError>>,
}

impl Client {
    /// Starts the client on the current runtime. It runs until `shutdown` is cancelled, until
    /// every proxy of a fixed list has refused for good, or until its list of proxies cannot
    /// be had at all.
    pub fn spawn(config: ClientConfig, shutdown: CancellationToken) -> Result<Client, ClientError> {
        if matches!(&config.source, ProxySource::Static(list) if list.is_empty()) {
            return Err(ClientError::NoProxies);
        }
        let (states_tx, states) = watch::channel(States::new());
        let task = tokio::spawn(supervise(config, states_tx, shutdown));
        Ok(Client { states, task })
    }

    /// The current state of each tunnel.
    pub fn states(&self) -> Vec<(ProxyAddr, TunnelState)> {
        self.states
            .borrow()
            .iter()
            .map(|(proxy, state)| (proxy.clone(), state.clone()))
            .collect()
    }

    /// Waits until at least `count` tunnels are bound.
    pub async fn wait_bound(&mut self, count: usize) {
        let _ = self
            .states
            .wait_for(|states| {
                states
                    .values()
                    .filter(|s| **s == TunnelState::Bound)
                    .count()
                    >= count
            })
            .await;
    }

    /// Waits until the tunnel to the `index`-th proxy (in name order) reaches a state that
    /// `pred` accepts.
    pub async fn wait_for(&mut self, index: usize, pred: impl Fn(&TunnelState) -> bool) {
        let _ = self
            .states
            .wait_for(|states| states.values().nth(index).is_some_and(&pred))
            .await;
    }

    /// Waits until the set of proxies with a tunnel (in any state) satisfies `pred`.
    pub async fn wait_for_proxies(&mut self, pred: impl Fn(&[ProxyAddr]) -> bool) {
        let _ = self
            .states
            .wait_for(|states| pred(&states.keys().cloned().collect::<Vec<_>>()))
            .await;
    }

    /// Waits for the client to stop, and says why it did.
    pub async fn join(self) -> Result<(), ClientError> {
        match self.task.await {
            Ok(result) => result,
            Err(err) => Err(ClientError::AllFailed(vec![format!("client task: {err}")])),
        }
    }
}

/// Reports one tunnel's state into the client's map; made by the client for each tunnel task.
pub struct StateReporter {
    states: watch::Sender<States>,
    proxy: ProxyAddr,
    /// Set when the proxy left the list: the tunnel's last words must not bring it back.
    retired: Arc<std::sync::atomic::AtomicBool>,
}

impl StateReporter {
    /// A reporter of `proxy`'s tunnel into `states`, and the flag that retires it.
    pub(crate) fn new(
        states: watch::Sender<States>,
        proxy: ProxyAddr,
    ) -> (Self, Arc<std::sync::atomic::AtomicBool>) {
        let retired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reporter = Self {
            states,
            proxy,
            retired: retired.clone(),
        };
        (reporter, retired)
    }

    /// Sets this tunnel's state, unless its proxy has left the list.
    pub fn send_replace(&self, state: TunnelState) {
        self.states.send_modify(|states| {
            if !self.retired.load(std::sync::atomic::Ordering::SeqCst) {
                states.insert(self.proxy.clone(), state);
            }
        });
    }
}

struct Running {
    stop: CancellationToken,
    retired: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<Option<String>>,
}

/// The tunnels of a client, kept in step with a list of proxies.
struct Tunnels {
    config: Arc<ClientConfig>,
    states: watch::Sender<States>,
    shutdown: CancellationToken,
    streams: TaskTracker,
    running: HashMap<ProxyAddr, Running>,
}

impl Tunnels {
    /// Opens tunnels to proxies that joined and closes those to proxies that left.
    fn reconcile(&mut self, wanted: &[ProxyAddr]) {
        let gone: Vec<ProxyAddr> = self
            .running
            .keys()
            .filter(|p| !wanted.contains(p))
            .cloned()
            .collect();
        for proxy in gone {
            if let Some(running) = self.running.remove(&proxy) {
                info!(proxy = %proxy, "proxy left the list; closing its tunnel");
                running.stop.cancel();
                // Under the map's lock, so no report of the tunnel can land after the removal.
                self.states.send_modify(|states| {
                    running
                        .retired
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    states.remove(&proxy);
                });
            }
        }
        for proxy in wanted {
            if self.running.contains_key(proxy) {
                continue;
            }
            let stop = self.shutdown.child_token();
            let (reporter, retired) = StateReporter::new(self.states.clone(), proxy.clone());
            reporter.send_replace(TunnelState::Connecting);
            let span = tracing::info_span!("tunnel", proxy = %proxy);
            let tasks = StreamTasks {
                tracker: self.streams.clone(),
                shutdown: self.shutdown.clone(),
            };
            let task = tokio::spawn(
                tunnel::hold(
                    proxy.clone(),
                    self.config.clone(),
                    reporter,
                    stop.clone(),
                    tasks,
                )
                .instrument(span),
            );
            self.running.insert(
                proxy.clone(),
                Running {
                    stop,
                    retired,
                    task,
                },
            );
        }
    }

    /// Waits for every tunnel task to end; returns the reasons of those that gave up.
    async fn join_all(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        let mut running: Vec<_> = self.running.drain().collect();
        running.sort_by(|a, b| a.0.cmp(&b.0));
        for (proxy, tunnel) in running {
            if let Ok(Some(reason)) = tunnel.task.await {
                failures.push(format!("{proxy}: {reason}"));
            }
        }
        failures
    }
}

async fn supervise(
    config: ClientConfig,
    states: watch::Sender<States>,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let ClientConfig {
        hostname,
        target,
        http_target,
        origin_tls,
        source,
        transport,
        tls,
        key,
        timing,
    } = config;
    // The tunnels share everything but the source of the list.
    let config = Arc::new(ClientConfig {
        hostname,
        target,
        http_target,
        origin_tls,
        source: ProxySource::Static(Vec::new()),
        transport,
        tls,
        key,
        timing,
    });
    let mut tunnels = Tunnels {
        config: config.clone(),
        states,
        shutdown: shutdown.clone(),
        streams: TaskTracker::new(),
        running: HashMap::new(),
    };
    let result = match source {
        ProxySource::Static(list) => {
            info!(
                hostname = %config.hostname,
                proxies = list.len(),
                transport = config.transport.name(),
                "client started"
            );
            tunnels.reconcile(&list);
            let failures = tunnels.join_all().await;
            if !list.is_empty() && failures.len() == list.len() {
                Err(ClientError::AllFailed(failures))
            } else {
                Ok(())
            }
        }
        ProxySource::Dynamic(source) => follow(source, &mut tunnels, &config, &shutdown).await,
    };
    shutdown.cancel();
    tunnels.join_all().await;
    tunnels.streams.close();
    // Visitor streams end with their sessions; this wait is short.
    let _ = tokio::time::timeout(Duration::from_secs(5), tunnels.streams.wait()).await;
    result
}

/// Keeps the tunnels in step with a changing list until shutdown.
async fn follow(
    mut source: Box<dyn FleetSource>,
    tunnels: &mut Tunnels,
    config: &ClientConfig,
    shutdown: &CancellationToken,
) -> Result<(), ClientError> {
    info!(
        hostname = %config.hostname,
        source = %source.describe(),
        transport = config.transport.name(),
        "client started"
    );
    let timing = &config.timing;
    let mut backoff = Backoff::new(timing.backoff_base, timing.backoff_cap, timing.stable_after);
    let mut have_list = false;
    loop {
        let fetched = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            fetched = source.fetch(config.transport.as_ref()) => fetched,
        };
        let wait = match fetched {
            Ok(fleet) => {
                have_list = true;
                backoff =
                    Backoff::new(timing.backoff_base, timing.backoff_cap, timing.stable_after);
                let names: Vec<String> = fleet.proxies.iter().map(ToString::to_string).collect();
                info!(proxies = ?names, "list of proxies");
                tunnels.reconcile(&fleet.proxies);
                fleet.refresh_after
            }
            Err(err) if err.permanent && !have_list => return Err(ClientError::Fleet(err)),
            Err(err) => {
                // Keep the tunnels we have: they are still good connections.
                warn!(%err, "could not refresh the list of proxies; keeping the current tunnels");
                backoff.next_delay()
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
    }
}
