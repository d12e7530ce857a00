//! The proxy's listeners and shutdown: accepts connections and hands each to its task.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::sign::CertifiedKey;
use shroud_mux::quickack::QuickAck;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

use crate::admission::{AddressGuard, Limit};
use crate::metrics::{Listener, Outcome};
use crate::shared::{ProxyConfig, Shared};
use crate::{tunnel, visitor};

/// The sockets a proxy serves. Bind them yourself (port 0 in tests) and pass them in.
#[derive(Default)]
pub struct Listeners {
    /// Public TLS: visitors routed by SNI, and tunnels recognised by ALPN.
    pub https: Option<TcpListener>,
    /// Public plain HTTP: visitors routed by Host.
    pub http: Option<TcpListener>,
    /// Tunnels only.
    pub tunnel: Option<TcpListener>,
    /// Links from the other proxies of the fleet; needs [`ProxyConfig::fleet`].
    pub peer: Option<TcpListener>,
    /// Tunnels only, arriving on a Tor onion service (`--onion-tunnel`).
    pub onion: Option<crate::onion::OnionTunnels>,
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
    tunnel_tls_for(shroud_process::tls::load_certified_key(cert, key)?)
}

/// The TLS configuration for tunnels serving `certified`.
pub fn tunnel_tls_for(certified: CertifiedKey) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut config = shroud_process::tls::single_cert_config(certified, &[shroud_mux::ALPN])?;
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
    serve(listeners, Shared::new(config, shutdown.clone()), shutdown).await
}

/// [`run`] with the shared state made already, for a caller that also reads it (the
/// announcement of the names bound here, say). `shutdown` must be the one `shared` was made
/// with.
pub async fn serve(
    listeners: Listeners,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if listeners.https.is_none()
        && listeners.http.is_none()
        && listeners.tunnel.is_none()
        && listeners.onion.is_none()
    {
        anyhow::bail!("no listener given");
    }
    let tracker = TaskTracker::new();
    if let Some(peers) = shared.peers.clone() {
        let Some(listener) = listeners.peer else {
            anyhow::bail!("a fleet member needs its peer listener");
        };
        start_fleet(listener, &shared, peers, &tracker, &shutdown)?;
    }
    let permits = Arc::new(Semaphore::new(shared.limits.max_connections));
    let drain_timeout = shared.limits.drain_timeout;
    if let Some(onion) = listeners.onion {
        tracker.spawn(crate::onion::accept(
            onion,
            shared.clone(),
            permits.clone(),
            tracker.clone(),
            shutdown.clone(),
        ));
    }
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
    shared.metrics.serving();
    shutdown.cancelled().await;
    shared.metrics.draining();
    info!("shutting down: draining tunnels");
    // Every tunnel sends go-away and waits for its own streams; give them that long, and a
    // little more for the last bytes to leave.
    let grace = drain_timeout + Duration::from_secs(2);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!("drain deadline passed with connections still open; closing them");
    }
    Ok(())
}

/// Most peer links being set up at once; more connections are closed at once.
const MAX_PEER_HANDSHAKES: usize = 64;
/// Gossip frames waiting for the gossip task; more are dropped.
const GOSSIP_BACKLOG: usize = 1024;

/// Starts this proxy's part in its fleet: the gossip task, and the acceptor of peer links.
fn start_fleet(
    listener: TcpListener,
    shared: &Arc<Shared>,
    peers: Arc<crate::peers::Peers>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let (gossip, inbound) = tokio::sync::mpsc::channel(GOSSIP_BACKLOG);
    info!(addr = %listener.local_addr()?, advertised = %peers.advertise(), "listening for peers");
    tracker.spawn(crate::gossip::run(
        shared.clone(),
        peers.clone(),
        inbound,
        shutdown.clone(),
    ));
    let (shared, shutdown, links) = (shared.clone(), shutdown.clone(), tracker.clone());
    let handshakes = Arc::new(Semaphore::new(MAX_PEER_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, from) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        warn!(%err, "accepting a peer link failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                debug!(%from, "too many peer links being set up; closing");
                continue;
            };
            // The tunnel certificate in place now: a reload may have replaced it.
            let tls = crate::peer_link::server_config(&shared.tunnel_tls());
            let (shared, peers, gossip, stop) = (
                shared.clone(),
                peers.clone(),
                gossip.clone(),
                shutdown.clone(),
            );
            // On the tracker: a draining proxy waits for the visitors forwarded to it.
            links.spawn(async move {
                let accepted =
                    crate::peer_link::accept(tcp, tls, &peers.secret, peers.session_config()).await;
                drop(permit);
                match accepted {
                    Ok((session, incoming)) => {
                        debug!(%from, "peer linked");
                        crate::forward::serve_link(incoming, from, shared, gossip, stop).await;
                        session.close();
                    }
                    // An operator wants to hear of a member with the wrong secret; anything
                    // else failing before the proof is noise from the open internet.
                    Err(err @ crate::peer_link::LinkError::WrongSecret) => {
                        info!(%from, %err, "peer link refused");
                    }
                    Err(err) => debug!(%from, %err, "peer link refused"),
                }
            });
        }
    });
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

    fn listener(self) -> Listener {
        match self {
            Kind::Https => Listener::Https,
            Kind::Http => Listener::Http,
            Kind::Tunnel => Listener::Tunnel,
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
        let metrics = &self.shared.metrics;
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            debug!(%peer, "connection limit reached; closing new connection");
            self.shared.admission.refused(Limit::Connections);
            metrics.connection(self.kind.listener(), Outcome::RefusedConnections);
            return;
        };
        let open = metrics.open_connection();
        let Some(address) = self.shared.admission.connection_from(peer.ip()) else {
            metrics.connection(self.kind.listener(), Outcome::RefusedPerAddress);
            if let Kind::Http = self.kind {
                // Plain HTTP can be told why, cheaply and within a short deadline.
                self.tracker.spawn(async move {
                    visitor::refuse_http_early(stream).await;
                    drop((permit, open));
                });
            }
            return;
        };
        let _ = stream.set_nodelay(true);
        let (shared, shutdown, kind) = (self.shared.clone(), self.shutdown.clone(), self.kind);
        self.tracker.spawn(async move {
            serve_connection(kind, stream, peer, address, shared, shutdown).await;
            drop((permit, open));
        });
    }

    /// On shutdown, serves the connections the kernel has already completed before the
    /// listener closes: closing it would reset them, and they reached a live proxy.
    fn take_backlog(&self) {
        take_queued(&self.listener, |stream, peer| self.dispatch(stream, peer));
    }
}

/// Hands `each` every connection waiting in `listener`'s accept queue, at most
/// [`LISTEN_BACKLOG`] of them, without waiting for more.
///
/// Asks the kernel itself: tokio's `poll_accept` tries `accept(2)` only once its reactor has
/// seen the listener readable, and would leave behind a connection completed since the
/// reactor's last turn.
fn take_queued(listener: &TcpListener, mut each: impl FnMut(TcpStream, SocketAddr)) {
    let listener = socket2::SockRef::from(listener);
    for _ in 0..LISTEN_BACKLOG {
        let accepted = listener.accept().and_then(|(socket, peer)| {
            let peer = peer.as_socket().ok_or(std::io::ErrorKind::InvalidData)?;
            let stream = std::net::TcpStream::from(socket);
            stream.set_nonblocking(true)?;
            Ok((TcpStream::from_std(stream)?, peer))
        });
        match accepted {
            Ok((stream, peer)) => each(stream, peer),
            // Reset by its peer while queued: the next one.
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionAborted => {}
            // Empty (`WouldBlock`), or out of descriptors: nothing more to take.
            Err(err) => {
                if err.kind() != std::io::ErrorKind::WouldBlock {
                    warn!(%err, "accepting from the backlog failed");
                }
                return;
            }
        }
    }
}

async fn serve_connection(
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
            shared.metrics.connection(Listener::Tunnel, Outcome::Tunnel);
            let span = tracing::info_span!("tunnel", %peer);
            // A tunnel's far end is usually a Tor exit, whose small writes wait on our ACKs.
            let stream = QuickAck::new(stream);
            // Boxed: a tunnel's handshake and session would otherwise be laid out in every
            // visitor's task too.
            let serve = Box::pin(tunnel::serve(stream, peer, shared, shutdown, Some(address)));
            if let Err(err) = serve.instrument(span.clone()).await {
                span.in_scope(|| debug!(%err, "tunnel failed"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<F, A, B, C, D, E, G, Fut>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D, E, G) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// What a connection's task holds for as long as it lives, however little it is doing: an
    /// idle visitor costs this plus its socket, its stream and the buffers it borrows while
    /// data flows. Whatever only some connections need (a tunnel's handshake and session,
    /// forwarding to a peer, routing) is boxed rather than laid out in every visitor's task.
    #[test]
    fn a_connection_task_is_small() {
        let size = future_size(serve_connection);
        assert!(size <= 2048, "a connection's task holds {size} bytes");
    }

    /// Connections the kernel completed while the accept loop was not looking (here: before
    /// the runtime's reactor ever turned) are all taken at shutdown, none left to be reset.
    #[tokio::test(flavor = "current_thread")]
    async fn shutdown_takes_every_queued_connection() {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let clients: Vec<_> = (0..5)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let mut taken = Vec::new();
        take_queued(&listener, |stream, peer| taken.push((stream, peer)));
        let mut peers: Vec<_> = taken.iter().map(|(_, peer)| *peer).collect();
        let mut expected: Vec<_> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
        peers.sort();
        expected.sort();
        assert_eq!(peers, expected);
        // And the queue is empty now: nothing more is taken.
        take_queued(&listener, |_, peer| panic!("{peer} taken twice"));
    }
}
