//! The proxy's listeners, shared state and shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

use crate::admission::{AddressGuard, Admission, AdmissionLimits, Limit};
use crate::policy::Policy;
use crate::registry::Registry;
use crate::{tunnel, visitor};

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
    pub dns: Option<crate::dns_auth::DnsAuthorizer>,
    /// Deadlines and bounds.
    pub limits: Limits,
}

/// The sockets a proxy serves. Bind them yourself (port 0 in tests) and pass them in.
#[derive(Default)]
pub struct Listeners {
    /// Public TLS: visitors routed by SNI, and tunnels recognised by ALPN.
    pub https: Option<TcpListener>,
    /// Public plain HTTP: visitors routed by Host.
    pub http: Option<TcpListener>,
    /// Tunnels only.
    pub tunnel: Option<TcpListener>,
}

/// State shared by every connection of a proxy.
pub struct Shared {
    pub(crate) tunnel_name: String,
    pub(crate) tls_acceptor: TlsAcceptor,
    pub(crate) policy: Policy,
    pub(crate) dns: Option<crate::dns_auth::DnsAuthorizer>,
    pub(crate) limits: Limits,
    pub(crate) registry: Registry,
    /// The per-address, per-hostname and per-key counts (see [`crate::admission`]).
    pub(crate) admission: Admission,
    /// Visitors accepted and not yet routed; a draining tunnel waits for them.
    pub(crate) routing: AtomicUsize,
    /// Cancelled when the proxy starts shutting down.
    pub(crate) shutdown: CancellationToken,
}

impl Shared {
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

/// Listen backlog of the proxy's sockets. tokio's default (1024) overflows when a burst of
/// visitors arrives while the accept loop is busy, and the kernel then drops or resets them.
pub const LISTEN_BACKLOG: u32 = 8192;

/// Binds a listener as the proxy wants it: address reuse (for restarts) and a deep backlog.
pub fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Builds the TLS configuration for tunnels from PEM files.
pub fn tunnel_tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context as _;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the private key from {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![shroud_mux::ALPN.to_vec()];
    // The bind proof relies on the TLS exporter, which is only a sound channel binding under
    // TLS 1.2 with the extended master secret (RFC 7627); TLS 1.3 always has it.
    config.require_ems = true;
    Ok(Arc::new(config))
}

/// Serves until `shutdown` is cancelled, then drains: stops accepting, sends go-away on every
/// tunnel, and waits up to the drain deadline for streams in flight.
pub async fn run(
    listeners: Listeners,
    config: ProxyConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if listeners.https.is_none() && listeners.http.is_none() && listeners.tunnel.is_none() {
        anyhow::bail!("no listener given");
    }
    let shared = Arc::new(Shared {
        tunnel_name: config.tunnel_name,
        tls_acceptor: TlsAcceptor::from(config.tls),
        policy: config.policy,
        dns: config.dns,
        admission: Admission::new(config.limits.admission()),
        limits: config.limits,
        registry: Registry::default(),
        routing: AtomicUsize::new(0),
        shutdown: shutdown.clone(),
    });
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(shared.limits.max_connections));
    let drain_timeout = shared.limits.drain_timeout;
    let listeners = [
        (listeners.https, Kind::Https),
        (listeners.http, Kind::Http),
        (listeners.tunnel, Kind::Tunnel),
    ];
    for (listener, kind) in listeners {
        let Some(listener) = listener else { continue };
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, listener = kind.name(), "listening");
        }
        let acceptor = Acceptor {
            listener,
            kind,
            shared: shared.clone(),
            permits: permits.clone(),
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
        };
        tracker.spawn(acceptor.run());
    }
    tracker.close();
    shutdown.cancelled().await;
    info!("shutting down: draining tunnels");
    // Every tunnel sends go-away and waits for its own streams; give them that long, and a
    // little more for the last bytes to leave.
    let grace = drain_timeout + Duration::from_secs(2);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!("drain deadline passed with connections still open; closing them");
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Https,
    Http,
    Tunnel,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Https => "https",
            Kind::Http => "http",
            Kind::Tunnel => "tunnel",
        }
    }
}

struct Acceptor {
    listener: TcpListener,
    kind: Kind,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Acceptor {
    async fn run(self) {
        loop {
            let accepted = tokio::select! {
                () = self.shutdown.cancelled() => {
                    self.take_backlog();
                    return;
                }
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning; the listener survives.
                    warn!(%err, listener = self.kind.name(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.dispatch(stream, peer);
        }
    }

    /// Serves `stream` on a task of its own, or closes it at once if the proxy is full or its
    /// address has too many connections already: the first two checks of
    /// [`crate::admission`], made before anything is read.
    fn dispatch(&self, stream: TcpStream, peer: SocketAddr) {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            debug!(%peer, "connection limit reached; closing new connection");
            self.shared.admission.refused(Limit::Connections);
            return;
        };
        let Some(address) = self.shared.admission.connection_from(peer.ip()) else {
            if let Kind::Http = self.kind {
                // Plain HTTP can be told why, cheaply and within a short deadline.
                self.tracker.spawn(async move {
                    visitor::refuse_http_early(stream).await;
                    drop(permit);
                });
            }
            return;
        };
        let _ = stream.set_nodelay(true);
        let (shared, shutdown, kind) = (self.shared.clone(), self.shutdown.clone(), self.kind);
        self.tracker.spawn(async move {
            serve(kind, stream, peer, address, shared, shutdown).await;
            drop(permit);
        });
    }

    /// On shutdown, serves the connections the kernel has already completed before the
    /// listener closes: closing it would reset them, and they reached a live proxy.
    fn take_backlog(&self) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for _ in 0..LISTEN_BACKLOG {
            match self.listener.poll_accept(&mut cx) {
                std::task::Poll::Ready(Ok((stream, peer))) => self.dispatch(stream, peer),
                _ => break,
            }
        }
    }
}

async fn serve(
    kind: Kind,
    stream: TcpStream,
    peer: SocketAddr,
    address: AddressGuard,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    match kind {
        Kind::Https => visitor::serve_https(stream, peer, address, shared, shutdown).await,
        Kind::Http => {
            visitor::serve_http(stream, peer, shared).await;
            drop(address);
        }
        Kind::Tunnel => {
            let span = tracing::info_span!("tunnel", %peer);
            if let Err(err) = tunnel::serve(stream, peer, shared, shutdown, Some(address))
                .instrument(span.clone())
                .await
            {
                span.in_scope(|| debug!(%err, "tunnel failed"));
            }
        }
    }
}
