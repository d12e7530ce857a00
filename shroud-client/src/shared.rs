//! The state every task of a client shares: what it publishes and where, how it reaches
//! proxies, its timing, and where each tunnel reports its state.
//!
//! The supervisor ([`crate::client`]), the tunnel tasks ([`crate::tunnel`]) and the visitor
//! streams ([`crate::origin`]) all import this module; it imports none of them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shroud_mux::auth::SecretKey;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::transport::Transport;

/// A proxy to hold a tunnel to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProxyAddr {
    /// Hostname, checked against the proxy's certificate (and sent as SNI).
    pub name: String,
    /// TCP port: of `name`, or of `onion` when there is one.
    pub port: u16,
    /// The proxy's tunnel listener as an onion service, `ADDRESS.onion` (normalised), dialed
    /// through Tor instead of `name`; the certificate is still checked against `name`, which
    /// is the onion address itself when nothing else names the proxy.
    pub onion: Option<String>,
}

impl ProxyAddr {
    /// A proxy reached at `name:port`.
    pub fn new(name: String, port: u16) -> Self {
        Self {
            name,
            port,
            onion: None,
        }
    }

    /// Where to connect: the onion address if there is one, else the name.
    pub fn dial_host(&self) -> &str {
        self.onion.as_deref().unwrap_or(&self.name)
    }
}

impl std::fmt::Display for ProxyAddr {
    /// `NAME:PORT`, or `NAME@ADDRESS.onion:PORT` (as `--proxy` takes it), or
    /// `ADDRESS.onion:PORT` when the onion address is the name too.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.onion {
            Some(onion) if *onion != self.name => {
                write!(f, "{}@{onion}:{}", self.name, self.port)
            }
            _ => write!(f, "{}:{}", self.name, self.port),
        }
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

/// How long a client waits, by default, before asking a proxy whose policy refused it again.
pub const DEFAULT_REFUSED_RETRY: Duration = Duration::from_secs(120);

/// Timeouts and intervals of a client, and the settings of each visitor's stream.
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
    /// The PROXY protocol header each connection to the origin starts with, if any.
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// After a proxy's policy refused the hostname (at bind time or later), how long before
    /// asking that proxy again.
    pub refused_retry: Duration,
    /// New Tor circuits one proxy's tunnel may cost in any hour (see [`crate::circuits`]).
    pub circuits_per_proxy: u32,
    /// New Tor circuits all tunnels together may cost in any hour.
    pub circuits_total: u32,
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
            proxy_protocol: None,
            refused_retry: DEFAULT_REFUSED_RETRY,
            circuits_per_proxy: crate::circuits::DEFAULT_PER_PROXY,
            circuits_total: crate::circuits::DEFAULT_TOTAL,
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
    /// Certificates from ACME, and the CA's checks answered here.
    pub acme: Option<AcmeTls>,
    /// How proxies are reached.
    pub transport: Arc<dyn Transport>,
    /// TLS toward proxies (roots, ALPN).
    pub tls: Arc<rustls::ClientConfig>,
    /// The client's identity.
    pub key: SecretKey,
    /// Timeouts and intervals.
    pub timing: Timing,
    /// What the client counts, for `--metrics-listen`.
    pub metrics: Arc<crate::metrics::ClientMetrics>,
}

/// The hostname's certificate from ACME (`--acme`).
#[derive(Clone)]
pub struct AcmeTls {
    /// What obtains and renews the certificate, and answers the CA's TLS-ALPN-01 checks.
    pub acme: Arc<crate::acme::Acme>,
    /// Terminate visitors' TLS with the certificate and send `target` plaintext; else
    /// (`--acme-export`) pass visitors' TLS through to `target`, which holds the exported
    /// certificate. The CA's checks are answered here either way.
    pub terminate: bool,
}

/// What a tunnel task is doing now, as shown to whoever watches the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelState {
    /// Connecting or binding.
    Connecting,
    /// Bound: the proxy sends this tunnel visitors.
    Bound,
    /// Waiting before the next attempt.
    Waiting {
        /// Why the last attempt or tunnel ended.
        reason: String,
    },
    /// Gave up: retrying cannot help.
    Failed {
        /// Why.
        reason: String,
    },
    /// The client is shutting down.
    Stopped,
}

/// The tunnels' states, by proxy.
pub type States = BTreeMap<ProxyAddr, TunnelState>;

/// Reports one tunnel's state into the client's map; made by the client for each tunnel task.
pub struct StateReporter {
    states: watch::Sender<States>,
    proxy: ProxyAddr,
    /// Set when the proxy left the list: the tunnel's last words must not bring it back.
    retired: Arc<AtomicBool>,
}

impl StateReporter {
    /// A reporter of `proxy`'s tunnel into `states`, and the flag that retires it.
    pub(crate) fn new(states: watch::Sender<States>, proxy: ProxyAddr) -> (Self, Arc<AtomicBool>) {
        let retired = Arc::new(AtomicBool::new(false));
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
            if !self.retired.load(Ordering::SeqCst) {
                states.insert(self.proxy.clone(), state);
            }
        });
    }
}

/// Where the streams of a client's tunnels run, and what ends them: the client's own tracker
/// and shutdown, not one tunnel task's. Sessions the proxy is draining run there too, so they
/// outlive their tunnel task's reconnect, and the proxy leaving the list (as a draining proxy
/// soon does), and end when the proxy closes them or the client stops.
#[derive(Debug, Clone)]
pub struct StreamTasks {
    /// Every visitor stream and draining session, for the client to wait on when it stops.
    pub tracker: TaskTracker,
    /// The client's shutdown.
    pub shutdown: CancellationToken,
}
