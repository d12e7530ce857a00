//! `--socks-listen`: a SOCKS5 and HTTP CONNECT proxy on this machine, so the origin's own
//! programs (webhooks, API calls, package updates) reach the internet through the client's
//! embedded Tor, as its tunnels do, and never reveal where the origin is.
//!
//! Each connection is read with [`shroud_socks`] (protocol told by its first byte, within
//! [`SocksOptions::handshake_timeout`]), checked, and opened through an [`Outbound`]: the
//! client's Tor in production ([`TorOutbound`]). Names go to the exit as names: nothing here
//! resolves one. Destinations on this machine or its local networks are refused ("connection
//! not allowed by ruleset", HTTP 403) unless the client runs on a private Tor network
//! (`--tor-network`), where everything is on loopback. Streams to one destination (host and
//! port, and the credentials given, if any) share circuits; streams to another never do.
//! At most [`SocksOptions::max_connections`] connections are served at once; one more is
//! closed at once.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arti_client::isolation::IsolationHelper;
use arti_client::{ErrorKind, HasKind as _, StreamPrefs};
use futures::future::BoxFuture;
use shroud_socks::{Destination, Protocol, Reply, Request};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

use crate::transport::BoxStream;

/// How a proxy for local programs behaves.
#[derive(Debug, Clone)]
pub struct SocksOptions {
    /// Let destinations on loopback and private networks through: only on a private Tor
    /// network, where every relay and server is on loopback.
    pub allow_local: bool,
    /// Connections served at once; one more is closed at once.
    pub max_connections: usize,
    /// From accepting a connection to a complete request.
    pub handshake_timeout: Duration,
    /// From a complete request to an open stream (a circuit may be built first).
    pub connect_timeout: Duration,
    /// The copy buffer per direction while data flows.
    pub copy_buffer: usize,
}

impl Default for SocksOptions {
    fn default() -> Self {
        Self {
            allow_local: false,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(60),
            copy_buffer: 64 * 1024,
        }
    }
}

/// Which streams may share a circuit: those to the same host and port, with the same
/// credentials (SOCKS5 username and password, or HTTP `Proxy-Authorization`), like Tor's
/// `IsolateDestAddr`, `IsolateDestPort` and `IsolateSOCKSAuth` together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationIsolation {
    destination: Destination,
    credentials: Option<Vec<u8>>,
}

impl IsolationHelper for DestinationIsolation {
    fn compatible_same_type(&self, other: &Self) -> bool {
        self == other
    }

    fn join_same_type(&self, other: &Self) -> Option<Self> {
        (self == other).then(|| self.clone())
    }
}

/// A stream could not be opened; `reply` is what the program is told.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OutboundError {
    /// The reply for the program.
    pub reply: Reply,
    /// Why, in words.
    pub message: String,
}

/// Opens streams to destinations: Tor in production, anything in tests.
pub trait Outbound: Send + Sync + 'static {
    /// Opens a stream to `destination`, on a circuit only streams with an equal `isolation`
    /// may share.
    fn connect<'a>(
        &'a self,
        destination: &'a Destination,
        isolation: DestinationIsolation,
    ) -> BoxFuture<'a, Result<BoxStream, OutboundError>>;
}

/// Streams through the client's Tor: names resolved by the exit; onion addresses reached
/// inside Tor.
pub struct TorOutbound {
    client: Arc<shroud_tor::Tor>,
}

impl TorOutbound {
    /// Streams through `client`.
    pub fn new(client: Arc<shroud_tor::Tor>) -> Self {
        Self { client }
    }
}

impl Outbound for TorOutbound {
    fn connect<'a>(
        &'a self,
        destination: &'a Destination,
        isolation: DestinationIsolation,
    ) -> BoxFuture<'a, Result<BoxStream, OutboundError>> {
        Box::pin(async move {
            let mut prefs = StreamPrefs::new();
            prefs.set_isolation(isolation);
            if destination.is_onion() {
                prefs.connect_to_onion_services(arti_client::config::BoolOrAuto::Explicit(true));
            }
            let host = destination.host_text();
            match self
                .client
                .connect_with_prefs((host.as_str(), destination.port), &prefs)
                .await
            {
                Ok(stream) => Ok(Box::new(stream) as BoxStream),
                Err(err) => Err(OutboundError {
                    reply: reply_for(err.kind()),
                    message: format!("through Tor to {destination}: {err}"),
                }),
            }
        })
    }
}

/// The reply that tells a program best what Arti's error means.
fn reply_for(kind: ErrorKind) -> Reply {
    match kind {
        ErrorKind::RemoteHostNotFound
        | ErrorKind::RemoteHostResolutionFailed
        | ErrorKind::OnionServiceNotFound
        | ErrorKind::OnionServiceNotRunning
        | ErrorKind::OnionServiceConnectionFailed
        | ErrorKind::OnionServiceAddressInvalid => Reply::HostUnreachable,
        // An END instead of CONNECTED: with DONE ("stream closed") it is how onion services,
        // C-tor's and Arti's alike, refuse a port they do not serve; C-tor's SOCKS port calls
        // that "connection refused" too.
        ErrorKind::RemoteConnectionRefused | ErrorKind::RemoteStreamClosed => {
            Reply::ConnectionRefused
        }
        ErrorKind::RemoteNetworkFailed => Reply::NetworkUnreachable,
        ErrorKind::RemoteNetworkTimeout | ErrorKind::ExitTimeout | ErrorKind::TorNetworkTimeout => {
            Reply::TimedOut
        }
        ErrorKind::ExitPolicyRejected | ErrorKind::ForbiddenStreamTarget => Reply::NotAllowed,
        _ => Reply::GeneralFailure,
    }
}

/// Serves local programs on `listener` until `shutdown`, opening their streams through
/// `outbound`. On shutdown it stops accepting, closes every connection and returns within a
/// few seconds.
pub async fn serve(
    listener: TcpListener,
    outbound: Arc<dyn Outbound>,
    options: SocksOptions,
    shutdown: CancellationToken,
) {
    let options = Arc::new(options);
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let tracker = TaskTracker::new();
    let busy_warned = AtomicU64::new(0);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors, most likely: wait rather than spin.
                warn!(%err, "SOCKS proxy: accepting a connection failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Closing says "busy" fastest; a reply would need the request read first.
            if warn_now(&busy_warned) {
                warn!(
                    max = options.max_connections,
                    "SOCKS proxy: as many connections as --socks-max-connections allows; \
                     closing new ones"
                );
            }
            drop(stream);
            continue;
        };
        let (outbound, options, shutdown) = (outbound.clone(), options.clone(), shutdown.clone());
        let span = tracing::debug_span!("socks", program = %peer);
        tracker.spawn(
            async move {
                tokio::select! {
                    () = shutdown.cancelled() => debug!("closed: the client is stopping"),
                    () = serve_connection(stream, outbound.as_ref(), &options) => {}
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
}

/// Whether a minute has passed since the last warning stamped in `last` (and stamps it).
fn warn_now(last: &AtomicU64) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let before = last.load(Ordering::Relaxed);
    now >= before + 60
        && last
            .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// One program's connection: its request, the check, the stream, then bytes both ways.
async fn serve_connection(mut stream: TcpStream, outbound: &dyn Outbound, options: &SocksOptions) {
    let _ = stream.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + options.handshake_timeout;
    let protocol =
        match tokio::time::timeout_at(deadline, shroud_socks::request::read_protocol(&mut stream))
            .await
        {
            Ok(Ok(protocol)) => protocol,
            Ok(Err(err)) => return debug!(%err, "not a request"),
            Err(_) => return debug!("no request in time"),
        };
    let request =
        match tokio::time::timeout_at(deadline, shroud_socks::read_request(&mut stream, protocol))
            .await
        {
            Ok(Ok(request)) => request,
            Ok(Err(err)) => {
                debug!(%err, "bad request");
                if let Some(reply) = err.reply() {
                    let _ = reply_and_close(&mut stream, protocol, reply, &err.to_string()).await;
                }
                return;
            }
            Err(_) => return debug!("request not complete in time"),
        };
    let destination = request.destination.clone();
    if destination.is_local() && !options.allow_local {
        info!(
            %destination,
            "SOCKS proxy: refused a connection to this machine or a local network (allowed \
             only on a private Tor network, --tor-network)"
        );
        let detail = format!(
            "{destination} is on this machine or a local network: refused, to keep Tor \
             traffic from reaching local services"
        );
        let _ = reply_and_close(&mut stream, protocol, Reply::NotAllowed, &detail).await;
        return;
    }
    if let Err(err) = connect_and_splice(stream, protocol, request, outbound, options).await {
        debug!(%destination, %err, "connection ended with an error");
    }
}

async fn connect_and_splice(
    mut stream: TcpStream,
    protocol: Protocol,
    request: Request,
    outbound: &dyn Outbound,
    options: &SocksOptions,
) -> io::Result<()> {
    let Request {
        destination,
        credentials,
        early_data,
    } = request;
    let isolation = DestinationIsolation {
        destination: destination.clone(),
        credentials,
    };
    let connect = outbound.connect(&destination, isolation);
    let mut remote = match tokio::time::timeout(options.connect_timeout, connect).await {
        Ok(Ok(remote)) => remote,
        Ok(Err(err)) => {
            debug!(%destination, %err, "could not connect");
            return reply_and_close(&mut stream, protocol, err.reply, &err.message).await;
        }
        Err(_) => {
            let detail = format!(
                "no connection to {destination} within {} s",
                options.connect_timeout.as_secs()
            );
            debug!(%destination, "{detail}");
            return reply_and_close(&mut stream, protocol, Reply::TimedOut, &detail).await;
        }
    };
    debug!(%destination, via = protocol_name(protocol), "connected");
    shroud_socks::write_reply(&mut stream, protocol, Reply::Succeeded, "").await?;
    if !early_data.is_empty() {
        remote.write_all(&early_data).await?;
        remote.flush().await?;
    }
    shroud_mux::splice::splice(&mut stream, &mut remote, options.copy_buffer).await?;
    Ok(())
}

/// Tells the program `reply` and closes its connection.
async fn reply_and_close(
    stream: &mut TcpStream,
    protocol: Protocol,
    reply: Reply,
    detail: &str,
) -> io::Result<()> {
    shroud_socks::write_reply(stream, protocol, reply, detail).await?;
    stream.shutdown().await
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Socks5 => "socks5",
        Protocol::Socks4 => "socks4",
        Protocol::Http { .. } => "http-connect",
    }
}

/// Checks a `--socks-listen` address: loopback, unless `allow_non_loopback`. An open SOCKS
/// proxy on a network lets everyone who can reach it use this machine's Tor: send traffic
/// that exits as the origin's, and reach onion services and the internet on its behalf.
pub fn check_listen_addr(addr: SocketAddr, allow_non_loopback: bool) -> Result<(), String> {
    if addr.ip().to_canonical().is_loopback() || allow_non_loopback {
        return Ok(());
    }
    Err(format!(
        "--socks-listen {addr} is not a loopback address: anyone who can reach it could use \
         this machine's Tor (their traffic would leave as the origin's). Listen on 127.0.0.1 or \
         [::1], or add --socks-allow-non-loopback if every host that can reach {addr} is yours"
    ))
}

#[cfg(test)]
mod tests;
