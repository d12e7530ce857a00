//! The state every task of a proxy shares: its configuration and limits, the routing table,
//! the admission counts, and the shutdown signal; and what a reload replaces while it runs
//! (the [`Authorization`] and the tunnel certificate, see [`crate::reload`]).
//!
//! The per-connection tasks ([`crate::tunnel`], [`crate::visitor`]) and the listeners
//! ([`crate::server`]) all import this module; it imports none of them, so a [`Shared`] can be
//! built on its own with [`Shared::new`], in unit tests as in [`crate::server::run`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use shroud_process::reload::ReloadCounts;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, AdmissionLimits};
use crate::dns_auth::DnsAuthorizer;
use crate::metrics::ProxyMetrics;
use crate::peers::{FleetConfig, Peers};
use crate::policy::Policy;
use crate::registry::Registry;

/// Deadlines and bounds of a proxy.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a visitor may take to send its whole ClientHello.
    pub client_hello_timeout: Duration,
    /// Largest ClientHello accepted, in bytes, records included.
    pub max_client_hello: usize,
    /// How long a visitor may take to send its whole HTTP request head.
    pub http_head_timeout: Duration,
    /// Largest HTTP request head accepted, in bytes.
    pub max_http_head: usize,
    /// How long a client may take from its first byte to a completed bind.
    pub handshake_timeout: Duration,
    /// How long opening a tunnel stream and its acknowledgement may take.
    pub stream_open_timeout: Duration,
    /// A tunnel whose client sends nothing on its control stream for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// Most streams open on one tunnel.
    pub max_streams_per_tunnel: usize,
    /// Most connections (visitors and tunnels) being served at once; more are closed at once.
    pub max_connections: usize,
    /// Most connections from one address (IPv4, or IPv6 /64) at once: visitors, and tunnels
    /// until they are bound. See [`crate::admission`].
    pub max_connections_per_address: usize,
    /// Most visitor connections to one hostname at once.
    pub max_connections_per_hostname: usize,
    /// Most bound tunnels one client key may hold at once.
    pub max_tunnels_per_key: usize,
    /// Most distinct hostnames one client key may hold bound, over all its tunnels.
    pub max_hostnames_per_key: usize,
    /// Most bytes one tunnel stream may hold received but unread (its yamux window cap); the
    /// copy buffers of a spliced visitor scale with it. See
    /// [`shroud_mux::session::connection_receive_window`].
    pub stream_buffer: usize,
    /// On shutdown, how long streams in flight may take to finish.
    pub drain_timeout: Duration,
    /// How long a visitor for a name with no tunnel waits for one to bind, when the name is
    /// likely to be bound again soon (the proxy just started, or the name's tunnel just left).
    /// Zero refuses such visitors at once.
    pub route_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            client_hello_timeout: Duration::from_secs(5),
            max_client_hello: 16 * 1024,
            http_head_timeout: Duration::from_secs(10),
            max_http_head: 16 * 1024,
            handshake_timeout: Duration::from_secs(20),
            stream_open_timeout: Duration::from_secs(20),
            tunnel_idle_timeout: Duration::from_secs(45),
            max_streams_per_tunnel: 4096,
            max_connections: 20_000,
            max_connections_per_address: 512,
            max_connections_per_hostname: 10_000,
            max_tunnels_per_key: 8,
            max_hostnames_per_key: 64,
            stream_buffer: shroud_mux::session::DEFAULT_STREAM_BUFFER,
            drain_timeout: Duration::from_secs(30),
            route_wait: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// The limits [`Admission`] enforces.
    fn admission(&self) -> AdmissionLimits {
        AdmissionLimits {
            max_tunnels_per_key: self.max_tunnels_per_key,
            max_hostnames_per_key: self.max_hostnames_per_key,
            max_connections_per_hostname: self.max_connections_per_hostname,
            max_connections_per_address: self.max_connections_per_address,
        }
    }
}

/// Everything a proxy needs besides its listeners.
pub struct ProxyConfig {
    /// The proxy's own name: tunnels arrive with this SNI (or none), and no client may bind it.
    pub tunnel_name: String,
    /// TLS for tunnels: the proxy's certificate for `tunnel_name`, ALPN `shroud/1`.
    pub tls: Arc<rustls::ServerConfig>,
    /// Which key may bind which hostname.
    pub policy: Policy,
    /// Also let a key bind a hostname whose `_shroud` TXT record lists it.
    pub dns: Option<DnsAuthorizer>,
    /// Domains (normalised) under which a key may bind its own word name, and only that
    /// (see [`shroud_mux::words`]).
    pub word_domains: Vec<String>,
    /// Deadlines and bounds.
    pub limits: Limits,
    /// Membership of a fleet whose proxies forward visitors to each other, if any.
    pub fleet: Option<FleetConfig>,
}

/// Which key may bind which name, besides DNS: the authorized file's policy and the word-name
/// domains. A reload replaces it whole; each bound tunnel then checks its names against it.
#[derive(Debug, Default)]
pub struct Authorization {
    /// Which key may bind which hostname, from the authorized file.
    pub policy: Policy,
    /// Domains (normalised) under which a key may bind its own word name, and only that.
    pub word_domains: Vec<String>,
}

/// State shared by every connection of a proxy.
pub struct Shared {
    pub(crate) tunnel_name: String,
    /// TLS for tunnels; a reload replaces it, and each handshake takes the one in place.
    tunnel_tls: RwLock<Arc<rustls::ServerConfig>>,
    /// The authorized file and word names in force; tunnels watch it for reloads.
    authorization: watch::Sender<Arc<Authorization>>,
    pub(crate) dns: Option<DnsAuthorizer>,
    pub(crate) limits: Limits,
    pub(crate) registry: Registry,
    /// The rest of the fleet, when this proxy is a member of one.
    pub(crate) peers: Option<Arc<Peers>>,
    /// The per-address, per-hostname and per-key counts (see [`crate::admission`]).
    pub(crate) admission: Admission,
    /// Visitors accepted and not yet routed; a draining tunnel waits for them.
    pub(crate) routing: AtomicUsize,
    /// Cancelled when the proxy starts shutting down.
    pub(crate) shutdown: CancellationToken,
    /// What the proxy counts, for `--metrics-listen`.
    pub(crate) metrics: ProxyMetrics,
    /// Reloads made, and failed.
    pub(crate) reloads: ReloadCounts,
}

impl Shared {
    /// The hostnames a visitor can reach here now, in name order: what the proxy announces
    /// to discovery with each heartbeat.
    pub fn bound_names(&self) -> Vec<String> {
        self.registry.bound_names()
    }

    /// A receiver that sees a change whenever [`Shared::bound_names`] may have changed.
    pub fn watch_names(&self) -> tokio::sync::watch::Receiver<u64> {
        self.registry.watch_names()
    }

    /// The rest of the fleet, when this proxy is a member of one.
    pub fn peers(&self) -> Option<&Arc<Peers>> {
        self.peers.as_ref()
    }

    /// Whether some client may be able to bind `hostname` here: the authorized file or DNS
    /// could grant it, or it is a word name under an offered domain.
    pub(crate) fn may_bind(&self, hostname: &str) -> bool {
        let authorization = self.authorization();
        self.dns.is_some()
            || authorization.policy.covers(hostname)
            || shroud_mux::words::word_domain(hostname, &authorization.word_domains).is_some()
    }

    /// The authorization in force now.
    pub fn authorization(&self) -> Arc<Authorization> {
        self.authorization.borrow().clone()
    }

    /// A receiver of the authorization in force, which sees each reload's.
    pub(crate) fn watch_authorization(&self) -> watch::Receiver<Arc<Authorization>> {
        self.authorization.subscribe()
    }

    /// Puts `authorization` in force: binds from now on are judged by it, and every bound
    /// tunnel checks its names against it at once, unbinding those it no longer grants.
    pub(crate) fn set_authorization(&self, authorization: Authorization) {
        self.authorization.send_replace(Arc::new(authorization));
    }

    /// The TLS configuration tunnels are served with now.
    pub(crate) fn tunnel_tls(&self) -> Arc<rustls::ServerConfig> {
        match self.tunnel_tls.read() {
            Ok(tls) => tls.clone(),
            // A writer panicked mid-assignment of an Arc: the value is still whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Serves new tunnels (and peer links) with `tls`; connections already open keep theirs.
    pub(crate) fn set_tunnel_tls(&self, tls: Arc<rustls::ServerConfig>) {
        match self.tunnel_tls.write() {
            Ok(mut slot) => *slot = tls,
            Err(poisoned) => *poisoned.into_inner() = tls,
        }
    }

    /// How many reloads took effect, and how many failed.
    pub fn reload_counts(&self) -> &ReloadCounts {
        &self.reloads
    }

    /// The state of a proxy serving `config`, which stops when `shutdown` is cancelled. Nothing
    /// is bound or spawned: the routing table starts empty.
    pub fn new(config: ProxyConfig, shutdown: CancellationToken) -> Arc<Self> {
        let metrics = ProxyMetrics::new();
        Arc::new(Self {
            tunnel_name: config.tunnel_name,
            tunnel_tls: RwLock::new(config.tls),
            authorization: watch::Sender::new(Arc::new(Authorization {
                policy: config.policy,
                word_domains: config.word_domains,
            })),
            dns: config.dns,
            admission: Admission::new(config.limits.admission()),
            peers: config
                .fleet
                .map(|fleet| Arc::new(Peers::new(fleet, config.limits.stream_buffer))),
            limits: config.limits,
            registry: Registry::with_hostnames(metrics.hostnames().clone()),
            routing: AtomicUsize::new(0),
            shutdown,
            metrics,
            reloads: ReloadCounts::default(),
        })
    }

    /// Counts a visitor as being routed until the guard is dropped.
    pub(crate) fn routing(self: &Arc<Self>) -> RoutingGuard {
        self.routing.fetch_add(1, Ordering::SeqCst);
        RoutingGuard(self.clone())
    }

    /// Whether any visitor is still between accept and route.
    pub(crate) fn visitors_routing(&self) -> bool {
        self.routing.load(Ordering::SeqCst) > 0
    }
}

/// A visitor being routed; see [`Shared::routing`].
pub(crate) struct RoutingGuard(Arc<Shared>);

impl Drop for RoutingGuard {
    fn drop(&mut self) {
        self.0.routing.fetch_sub(1, Ordering::SeqCst);
    }
}
