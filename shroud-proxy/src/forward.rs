//! Forwarding between the proxies of a fleet: a visitor that reaches a proxy with no tunnel
//! for its name goes, bytes untouched, to a peer that holds one.
//!
//! The forwarding proxy opens a stream on its link to the holder, writes
//! [`StreamKind::Forward`], the visitor's [`StreamHeader`] (its real address, and the public
//! port it reached) and the bytes already read, then waits for the holder's [`Reply`]. The
//! holder opens its tunnel stream with those bytes, so that the client can answer them at once
//! (PROTOCOL.md §11.3). Only [`Reply::Accepted`] passes further bytes on; after any other, no
//! request reached a client, so another holder may be tried. A holder whose tunnel failed after
//! taking a plain-HTTP request answers nothing, and such a visitor is not offered again. The
//! holder routes to its own tunnels only: a forwarded visitor is never forwarded again, so two
//! proxies that each believe the other holds a name cannot pass a visitor back and forth.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shroud_mux::header::{StreamHeader, StreamKind as VisitorKind};
use shroud_mux::peer::{Reply, StreamKind};
use shroud_mux::{Incoming, MuxStream, SessionError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::{debug, Instrument as _};

use crate::handoff::{self, Refusal, SpliceError, OPEN_ATTEMPTS};
use crate::metrics::{Listener, Outcome, Path};
use crate::peers::Peers;
use crate::registry::Route;
use crate::shared::Shared;
use crate::visitor::count_bytes;

/// How long a stream on a link may take to say what it is and send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Forwards `visitor` to a peer holding `header.hostname`, sending `bytes` (what was read of
/// it) first, and copies both ways until both directions are done. Tries up to
/// [`OPEN_ATTEMPTS`] holders. On `Err`, nothing was written to the visitor.
pub(crate) async fn forward(
    visitor: &mut TcpStream,
    shared: &Shared,
    peers: &Arc<Peers>,
    header: &StreamHeader,
    bytes: &[u8],
) -> Result<(), Refusal> {
    let mut first = Vec::with_capacity(1 + shroud_mux::header::MAX_HEADER_LEN + bytes.len());
    first.push(StreamKind::Forward.byte());
    first.extend_from_slice(&header.encode());
    first.extend_from_slice(bytes);
    let mut refusal = Refusal::Forward;
    for holder in peers
        .holders(&header.hostname)
        .into_iter()
        .take(OPEN_ATTEMPTS)
    {
        match offer(shared, peers, holder, &first).await {
            Ok((Reply::Accepted, mut stream)) => {
                debug!(peer = %holder, "forwarded");
                let listener = match header.kind {
                    VisitorKind::Http => Listener::Http,
                    VisitorKind::Tls => Listener::Https,
                };
                shared.metrics.connection(listener, Outcome::Forwarded);
                shared.metrics.forwarded(true, true);
                let buffer = shroud_mux::session::copy_buffer_len(shared.limits.stream_buffer);
                let [to_origin, to_visitor] = shared.metrics.bytes(Path::ForwardedOut);
                // What was read to route it went with the offer.
                to_origin.inc_by(bytes.len() as u64);
                let copied = shroud_mux::splice::splice_reporting(
                    visitor,
                    &mut stream,
                    buffer,
                    |up, down| {
                        if up > 0 {
                            to_origin.inc_by(up);
                        }
                        if down > 0 {
                            to_visitor.inc_by(down);
                        }
                    },
                );
                if let Err(err) = copied.await {
                    debug!(%err, "forwarded visitor ended with an error");
                }
                return Ok(());
            }
            Ok((Reply::HttpsOnly, _)) => return Err(Refusal::NoTunnel(Route::RedirectToHttps)),
            Ok((Reply::HostnameFull, _)) => return Err(Refusal::HostnameFull),
            Ok((reply @ (Reply::NoTunnel | Reply::Failed), _)) => {
                debug!(peer = %holder, ?reply, "peer did not take the visitor");
                if reply == Reply::NoTunnel {
                    refusal = Refusal::NoTunnel(Route::Unknown);
                }
            }
            Err(err) => {
                debug!(peer = %holder, %err, "forwarding failed");
                // A holder that got the request and ended the stream without answering may
                // have passed it to an origin: a plain-HTTP request is not sent twice.
                if header.kind == VisitorKind::Http && err.offered() {
                    break;
                }
            }
        }
    }
    shared.metrics.forwarded(true, false);
    Err(refusal)
}

/// Offers the visitor to one holder: its answer, and the stream to copy on if it accepted.
async fn offer(
    shared: &Shared,
    peers: &Arc<Peers>,
    holder: SocketAddr,
    first: &[u8],
) -> Result<(Reply, MuxStream), ForwardError> {
    let session = peers.link(holder).await?;
    let limit = shared.limits.stream_open_timeout;
    // The holder waits up to the stream-open timeout for its tunnel; give it that and a
    // little more before giving up on it.
    let deadline = tokio::time::Instant::now() + limit + Duration::from_secs(2);
    let mut stream = tokio::time::timeout_at(deadline, session.open())
        .await
        .map_err(|_| ForwardError::OpenTimeout)??;
    let offered = async {
        stream.write_all(first).await?;
        stream.flush().await?;
        Reply::read(&mut stream).await
    };
    let reply = tokio::time::timeout_at(deadline, offered)
        .await
        .map_err(|_| ForwardError::Timeout)?
        .map_err(ForwardError::Unanswered)?;
    Ok((reply, stream))
}

/// Why a holder could not be offered a visitor.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error(transparent)]
    Link(#[from] crate::peer_link::LinkError),
    #[error("opening a stream on the peer link: {0}")]
    Open(#[from] SessionError),
    #[error("the peer link opened no stream in time")]
    OpenTimeout,
    #[error("the peer did not answer: {0}")]
    Unanswered(std::io::Error),
    #[error("the peer did not answer in time")]
    Timeout,
}

impl ForwardError {
    /// Whether the visitor's bytes may have reached the peer, and through it a tunnel.
    fn offered(&self) -> bool {
        matches!(self, ForwardError::Unanswered(_) | ForwardError::Timeout)
    }
}

/// At most this many of a forwarded visitor's bytes go to the tunnel with the stream header.
/// What a proxy reads to route a visitor (a ClientHello's records, a request head) fits.
const INITIAL_AT_HAND: usize = 64 * 1024;

/// The bytes that came on `stream` with what was read of it so far, up to `limit`, without
/// waiting for more. The forwarding proxy writes the stream header and the visitor's bytes in
/// one write, so they arrive in one frame; bytes that come later are copied on with the rest.
fn bytes_at_hand(stream: &mut MuxStream, limit: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    while bytes.len() < limit {
        let want = (limit - bytes.len()).min(chunk.len());
        let mut buf = tokio::io::ReadBuf::new(&mut chunk[..want]);
        match std::pin::Pin::new(&mut *stream).poll_read(&mut cx, &mut buf) {
            std::task::Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                bytes.extend_from_slice(buf.filled());
            }
            // Nothing more yet, the end of the stream, or an error: the copy that follows
            // meets the same again and deals with it.
            _ => break,
        }
    }
    bytes
}

/// Serves the streams a peer opens on the link it dialled: gossip frames go to `gossip`,
/// forwarded visitors to this proxy's tunnels. Returns when the link ends, or once
/// `shutdown` is cancelled and the visitors already forwarded are done.
pub(crate) async fn serve_link(
    mut incoming: Incoming,
    from: SocketAddr,
    shared: Arc<Shared>,
    gossip: tokio::sync::mpsc::Sender<Vec<u8>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            stream = incoming.accept() => match stream {
                Some(stream) => stream,
                None => break,
            },
        };
        let (shared, gossip, stop) = (shared.clone(), gossip.clone(), shutdown.clone());
        let span = tracing::debug_span!("peer", %from);
        tracker.spawn(serve_stream(stream, shared, gossip, stop).instrument(span));
    }
    tracker.close();
    tracker.wait().await;
}

/// Serves one stream of a link: gossip until the proxy shuts down, or a forwarded visitor
/// until it is done.
async fn serve_stream(
    mut stream: MuxStream,
    shared: Arc<Shared>,
    gossip: tokio::sync::mpsc::Sender<Vec<u8>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut kind = [0u8; 1];
    match tokio::time::timeout(HEADER_TIMEOUT, stream.read_exact(&mut kind)).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    match StreamKind::from_byte(kind[0]) {
        Some(StreamKind::Gossip) => {
            tokio::select! {
                () = read_gossip(stream, gossip) => {}
                () = shutdown.cancelled() => {}
            }
        }
        Some(StreamKind::Forward) => serve_forwarded(stream, &shared).await,
        None => debug!(kind = kind[0], "unknown peer stream; closing"),
    }
}

async fn read_gossip(mut stream: MuxStream, gossip: tokio::sync::mpsc::Sender<Vec<u8>>) {
    let mut frame = Vec::new();
    loop {
        match shroud_mux::peer::read_frame(&mut stream, &mut frame).await {
            Ok(true) => {
                if gossip.try_send(std::mem::take(&mut frame)).is_err() {
                    debug!("gossip backlog full; frame dropped");
                }
            }
            Ok(false) => return,
            Err(err) => {
                debug!(%err, "gossip stream failed");
                return;
            }
        }
    }
}

/// Routes a visitor a peer forwarded to a tunnel here, never to another peer.
async fn serve_forwarded(mut stream: MuxStream, shared: &Shared) {
    let header = match tokio::time::timeout(HEADER_TIMEOUT, StreamHeader::read(&mut stream)).await {
        Ok(Ok(header)) => header,
        Ok(Err(err)) => {
            debug!(%err, "bad forwarded stream header");
            return;
        }
        Err(_) => return,
    };
    let span =
        tracing::debug_span!("forwarded", host = %header.hostname, visitor = %header.visitor);
    async {
        let http = header.kind == VisitorKind::Http;
        // The visitor's first bytes go to the tunnel with the stream header, as a visitor's
        // own do: its client answers them with its acknowledgement in the same frame, where
        // an open that carried none would wait out the client's ACK_HOLD (PROTOCOL.md §7.3).
        let initial = bytes_at_hand(&mut stream, INITIAL_AT_HAND);
        let reply = match shared.registry.route(&header.hostname, http) {
            Route::Tunnel(session) => match shared.admission.visitor_for(&header.hostname) {
                None => Err(Reply::HostnameFull),
                Some(counted) => match handoff::open(shared, session, &header, &initial).await {
                    Ok(tunnel) => Ok((tunnel, counted)),
                    Err(err) => {
                        debug!(%err, "no tunnel stream for the forwarded visitor");
                        if matches!(err, SpliceError::Open(SessionError::TooManyStreams)) {
                            handoff::refused_stream(shared);
                        }
                        if http && !initial.is_empty() && err.may_have_sent() {
                            // The request may have reached an origin: no answer, so that the
                            // forwarding proxy does not offer it to another holder.
                            shared.metrics.forwarded(false, false);
                            return;
                        }
                        Err(Reply::Failed)
                    }
                },
            },
            Route::RedirectToHttps => Err(Reply::HttpsOnly),
            Route::Unknown => Err(Reply::NoTunnel),
        };
        let (mut tunnel, _counted) = match reply {
            Ok(ready) => ready,
            Err(refusal) => {
                shared.metrics.forwarded(false, false);
                let _ = refusal.write(&mut stream).await;
                return;
            }
        };
        shared.metrics.forwarded(false, true);
        if Reply::Accepted.write(&mut stream).await.is_err() {
            return;
        }
        let host = shared.metrics.hostnames().series(&header.hostname);
        host.visitors.inc();
        let buffer = shroud_mux::session::copy_buffer_len(shared.limits.stream_buffer);
        let [to_origin, to_visitor] = shared.metrics.bytes(Path::ForwardedIn);
        count_bytes([to_origin, &host.bytes[0]], initial.len() as u64);
        let copied =
            shroud_mux::splice::splice_reporting(&mut stream, &mut tunnel, buffer, |up, down| {
                count_bytes([to_origin, &host.bytes[0]], up);
                count_bytes([to_visitor, &host.bytes[1]], down);
            });
        if let Err(err) = copied.await {
            debug!(%err, "forwarded visitor ended with an error");
        }
    }
    .instrument(span)
    .await;
}

#[cfg(test)]
mod tests;
