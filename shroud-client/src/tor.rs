//! The Tor transport: every connection to a proxy goes through embedded Arti.
//!
//! Nothing leaves this machine outside Tor on this path: proxy names are resolved by the exit
//! relay, never locally. Only with `--tor-network` (a private Tor network, for tests and labs)
//! may circuits lead to loopback or private addresses, and only then is `--resolve` honoured.
//!
//! Each proxy's tunnel has a circuit of its own ([`KeptTorCircuit`], through
//! [`Transport::circuit`]): built with an isolation token of its own, so proxies never share
//! one, and then held, so that a reconnect after the proxy ended the session (a drop, a
//! go-away, a stall, a TLS error, a refused bind) opens its stream on the same circuit and
//! builds none. Holding the circuit's handle keeps it out of Arti's dirtiness rule
//! (`max_dirtiness`, 10 minutes): Arti stops handing a dirty circuit out for new requests but
//! never closes one that is still held, and streams are opened on it directly. The circuit is
//! given up, and the next attempt builds a new one (charged to [`crate::circuits`]), only when
//! it is judged bad: Arti reports it closed (a relay or the channel to the guard ended it),
//! opening a stream on it fails other than by the exit's refusal on the proxy's behalf, or no
//! answer comes from the exit within [`STREAM_OPEN_TIMEOUT`]. The exit's refusals that keep
//! it are END reasons about the proxy's side: connection refused or reset, done, timed out,
//! misc; any other reason (exit policy, resolve failed, hibernating, resource limit, ...)
//! says this exit cannot serve the proxy, and gives it up.
//!
//! A new circuit to an exit is asked for with an optimistic stream, so that Arti hands the
//! stream (and its circuit) back before the exit answers, and a refusal still leaves the
//! circuit in hand. Arti opens streams to onion services only after the answer, so for an
//! onion proxy a refusal on a new rendezvous circuit loses it, and the next attempt builds
//! (and is charged for) another.
//!
//! Other connections (discovery, DNS over Tor, ACME) go through [`Transport::connect`], each
//! with a token of its own as before.
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

use arti_client::{IsolationToken, StreamPrefs};
use futures::future::BoxFuture;
use tor_cell::relaycell::msg::EndReason;
use tor_proto::client::stream::{ClientStreamCtrl as _, DataStream, StreamParameters};
use tor_proto::ClientTunnel;

use crate::metrics::ClientMetrics;
use crate::transport::{BoxStream, KeptCircuit, Resolve, Transport};

/// How long the exit has to answer a request for a stream on a held circuit (Arti's own
/// default for a stream's connection): no answer in time gives the circuit up.
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(20);
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
    client: Arc<shroud_tor::Tor>,
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
    pub fn client(&self) -> Arc<shroud_tor::Tor> {
        self.client.clone()
    }
}

impl Transport for TorTransport {
    fn connect<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            // A token of its own: this connection shares a circuit with nothing else.
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

    fn circuit(&self) -> Option<Box<dyn KeptCircuit>> {
        Some(Box::new(KeptTorCircuit {
            client: self.client.clone(),
            resolve: self.resolve.clone(),
            held: None,
            given_up: None,
        }))
    }
}

/// One proxy's circuit, kept for its reconnects; see the [module docs](self).
pub struct KeptTorCircuit {
    client: Arc<shroud_tor::Tor>,
    resolve: Resolve,
    held: Option<Held>,
    given_up: Option<String>,
}

/// A circuit held, and how streams are opened on it.
struct Held {
    tunnel: Arc<ClientTunnel>,
    params: StreamParameters,
}

/// What became of a stream opened on a circuit.
enum Opened {
    /// Connected to the proxy.
    Connected(Box<DataStream>),
    /// The exit answered but the proxy did not take the connection: the circuit works.
    Refused(tor_proto::Error),
    /// The circuit is bad.
    Bad(String),
}

impl KeptTorCircuit {
    /// Where to ask the exit to connect: `--resolve`'s address for `host`, or `host` itself
    /// (always for an onion address).
    fn target(&self, host: &str, port: u16) -> String {
        match self.resolve.get(host, port) {
            Some(addr) if !shroud_mux::onion::is_onion(host) => addr.ip().to_string(),
            _ => host.to_owned(),
        }
    }

    /// Builds a new circuit with a token of its own and opens the stream on it. The circuit
    /// comes back with the stream whenever Arti built one, however the stream fared.
    async fn open_new(&self, host: &str, port: u16) -> (Option<Held>, Opened) {
        let target = self.target(host, port);
        let onion = shroud_mux::onion::is_onion(host);
        let mut prefs = StreamPrefs::new();
        prefs.set_isolation(IsolationToken::new());
        let mut params = StreamParameters::default();
        if onion {
            // As Arti opens streams to onion services: nothing but the port in the BEGIN.
            params
                .suppress_hostname()
                .suppress_begin_flags()
                .optimistic(false);
        } else {
            // Optimistic, so that Arti hands the stream (and so its circuit) back before the
            // exit answers: a refusal by the proxy then still leaves the circuit in hand.
            prefs.optimistic();
        }
        let stream = match self.client.connect_with_prefs((target, port), &prefs).await {
            Ok(stream) => stream,
            Err(err) => return (None, Opened::Bad(format!("no circuit: {err}"))),
        };
        let Some(tunnel) = tunnel_of(&stream) else {
            return (None, Opened::Bad("the stream has no circuit".into()));
        };
        let held = Held { tunnel, params };
        (Some(held), connected(stream).await)
    }
}

/// The circuit a stream runs on.
fn tunnel_of(stream: &DataStream) -> Option<Arc<ClientTunnel>> {
    stream.client_stream_ctrl().and_then(|ctrl| ctrl.tunnel())
}

/// Waits for the exit's answer to a stream request.
async fn connected(mut stream: DataStream) -> Opened {
    match tokio::time::timeout(STREAM_OPEN_TIMEOUT, stream.wait_for_connection()).await {
        Ok(Ok(())) => Opened::Connected(Box::new(stream)),
        Ok(Err(err)) => classify(err),
        Err(_) => Opened::Bad(format!(
            "no answer from the exit within {STREAM_OPEN_TIMEOUT:?}"
        )),
    }
}

/// Whether a failure to open a stream leaves the circuit usable.
fn classify(err: tor_proto::Error) -> Opened {
    match err {
        tor_proto::Error::EndReceived(reason) if proxy_side(reason) => Opened::Refused(err),
        other => Opened::Bad(other.to_string()),
    }
}

/// END reasons that are about the proxy's side of the exit, not the circuit or the exit.
fn proxy_side(reason: EndReason) -> bool {
    [
        EndReason::CONNECTREFUSED,
        EndReason::CONNRESET,
        EndReason::DONE,
        EndReason::TIMEOUT,
        EndReason::MISC,
    ]
    .contains(&reason)
}

impl KeptCircuit for KeptTorCircuit {
    fn is_held(&mut self) -> bool {
        if self.held.as_ref().is_some_and(|h| h.tunnel.is_closed()) {
            self.held = None;
            self.given_up = Some("Arti reports the circuit closed".into());
            tracing::info!("this tunnel's Tor circuit has closed");
        }
        self.held.is_some()
    }

    fn connect<'a>(&'a mut self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            // Taken out while in use: if this attempt is abandoned half way (the caller's own
            // deadline), the circuit is not trusted again and the next attempt builds anew.
            let (held, opened) = match self.held.take() {
                Some(held) if held.tunnel.is_closed() => (
                    Some(held),
                    Opened::Bad("Arti reports the circuit closed".into()),
                ),
                Some(held) => {
                    let target = self.target(host, port);
                    let begin = held
                        .tunnel
                        .begin_stream(&target, port, Some(held.params.clone()));
                    let opened = match tokio::time::timeout(STREAM_OPEN_TIMEOUT, begin).await {
                        Ok(Ok(stream)) => connected(stream).await,
                        Ok(Err(err)) => classify(err),
                        Err(_) => Opened::Bad(format!(
                            "no answer from the exit within {STREAM_OPEN_TIMEOUT:?}"
                        )),
                    };
                    (Some(held), opened)
                }
                None => self.open_new(host, port).await,
            };
            let err = match opened {
                Opened::Connected(stream) => {
                    self.held = held;
                    return Ok(stream as BoxStream);
                }
                Opened::Refused(err) => {
                    self.held = held;
                    io::Error::new(io::ErrorKind::ConnectionRefused, err)
                }
                Opened::Bad(reason) => {
                    if let Some(held) = held {
                        held.tunnel.terminate();
                        tracing::info!(%reason, "giving up this tunnel's Tor circuit");
                    }
                    self.given_up = Some(reason.clone());
                    io::Error::other(reason)
                }
            };
            Err(io::Error::new(
                err.kind(),
                format!("through Tor to {host}:{port}: {err}"),
            ))
        })
    }

    fn given_up(&self) -> Option<&str> {
        self.given_up.as_deref()
    }
}
