//! Handing a routed visitor to a tunnel: opening its stream, sending the stream header and
//! the bytes already read, and waiting for the client's acknowledgement, with another tunnel
//! tried when one fails in a way that is safe to retry.
//!
//! Visitors at this proxy ([`crate::visitor`]) and visitors forwarded by a peer
//! ([`crate::forward`]) both come through here.

use std::time::Duration;

use shroud_mux::header::{self, StreamHeader, StreamKind};
use shroud_mux::{MuxStream, Session, SessionError};
use tokio::io::AsyncWriteExt;
use tracing::debug;

use crate::admission::Limit;
use crate::registry::Route;
use crate::shared::Shared;

/// Why a visitor was not spliced onto a tunnel. Nothing has been written to it then, so the
/// caller may still answer it, each kind of visitor in its own way.
pub(crate) enum Refusal {
    /// No tunnel serves the name (or, for plain HTTP, only tunnels that want HTTPS do).
    NoTunnel(Route),
    /// The name has as many visitors as it may.
    HostnameFull,
    /// No tunnel stream could be made ready.
    Open(SpliceError),
    /// Peers held the name, but none took the visitor.
    Forward,
}

impl Refusal {
    /// What this refusal makes of the visitor's connection, for the metrics.
    pub(crate) fn outcome(&self) -> crate::metrics::Outcome {
        use crate::metrics::Outcome;
        match self {
            Refusal::NoTunnel(Route::RedirectToHttps) => Outcome::Redirected,
            Refusal::NoTunnel(_) => Outcome::UnknownName,
            Refusal::HostnameFull => Outcome::RefusedPerHostname,
            Refusal::Open(SpliceError::Open(SessionError::TooManyStreams)) => {
                Outcome::RefusedStreamsPerTunnel
            }
            Refusal::Open(SpliceError::AckTimeout) => Outcome::TunnelTimeout,
            Refusal::Open(SpliceError::Open(_) | SpliceError::Tunnel(_)) => Outcome::TunnelFailed,
            Refusal::Forward => Outcome::ForwardFailed,
        }
    }
}

/// Finds a tunnel at this proxy for `hostname`, waiting a while for one if it is expected
/// back, unless the proxy is shutting down.
pub(crate) async fn route_locally(shared: &Shared, hostname: &str, http: bool) -> Route {
    let bindable = shared.may_bind(hostname);
    let wait = shared
        .registry
        .route_or_wait(hostname, http, shared.limits.route_wait, bindable);
    tokio::select! {
        route = wait => route,
        () = shared.shutdown.cancelled() => shared.registry.route(hostname, http),
    }
}

/// Why no tunnel stream could be made ready for a visitor. Nothing has been written to the
/// visitor then, so the caller may still answer it.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// No stream could be opened on the tunnel.
    #[error("opening a tunnel stream: {0}")]
    Open(#[from] shroud_mux::SessionError),
    /// The tunnel did not open a stream, or the client did not acknowledge it, in time.
    #[error("the client did not accept the stream in time")]
    AckTimeout,
    /// The stream failed before the client acknowledged it.
    #[error("the tunnel stream failed before it was accepted: {0}")]
    Tunnel(#[from] std::io::Error),
}

impl SpliceError {
    /// Whether another tunnel may be tried for a visitor of this kind; the tunnel is then most
    /// likely one that has just died. A stream that could not be opened carried nothing. One
    /// that failed after its first bytes were sent may have reached the origin: harmless for
    /// TLS (the bytes are a ClientHello, and no request can follow without the visitor), but
    /// a plain-HTTP request might have been acted on, and must not be sent twice. A full
    /// tunnel is not retried (routing already prefers tunnels with room). A TLS visitor whose
    /// tunnel did not acknowledge in time was only given [`ACK_PATIENCE`] when another tunnel
    /// could take it (see [`open`]), or the full deadline on its last attempt.
    fn is_retryable(&self, kind: StreamKind) -> bool {
        match self {
            SpliceError::Open(SessionError::Closed | SessionError::Mux(_)) => true,
            SpliceError::Tunnel(_) | SpliceError::AckTimeout => kind == StreamKind::Tls,
            SpliceError::Open(SessionError::TooManyStreams) => false,
        }
    }

    /// Whether the visitor's first bytes may have gone out on a stream before it failed: once
    /// a stream was open, they were written to it.
    pub(crate) fn may_have_sent(&self) -> bool {
        matches!(self, SpliceError::Tunnel(_) | SpliceError::AckTimeout)
    }
}

/// How many tunnels one visitor is offered to at most.
pub(crate) const OPEN_ATTEMPTS: usize = 3;

/// How long a TLS visitor waits for a tunnel's acknowledgement when another tunnel could take
/// it instead. Clients acknowledge within 100 ms (PROTOCOL.md §7.3), so even over Tor this is
/// many round trips; a tunnel that takes longer is marked unresponsive, and routing avoids it
/// until it acknowledges a stream again.
const ACK_PATIENCE: Duration = Duration::from_secs(5);

/// Opens a stream for a visitor on `session`, sends the stream header and the bytes already
/// read, and waits for the client's acknowledgement. When the stream fails before that (and
/// may be retried, see [`SpliceError::is_retryable`]), the visitor is routed afresh (a tunnel
/// that died a moment ago is closed by then, and the name may have another tunnel, or get one
/// back within the route wait) and tried again.
pub(crate) async fn open(
    shared: &Shared,
    mut session: Session,
    header: &StreamHeader,
    initial: &[u8],
) -> Result<MuxStream, SpliceError> {
    let mut first = header.encode();
    first.extend_from_slice(initial);
    let http = header.kind == StreamKind::Http;
    let started = tokio::time::Instant::now();
    let mut attempt = 1;
    loop {
        // A TLS visitor whose tunnel is slow to acknowledge may move on to another tunnel.
        let patience = (!http
            && attempt < OPEN_ATTEMPTS
            && shared
                .registry
                .has_alternative(&header.hostname, http, &session))
        .then_some(ACK_PATIENCE);
        let err = match open_once(shared, &session, &first, patience).await {
            Ok(stream) => {
                session.set_unresponsive(false);
                shared.metrics.stream_opened(started.elapsed());
                return Ok(stream);
            }
            Err(err) => err,
        };
        let waited_in_full = matches!(err, SpliceError::AckTimeout) && patience.is_none();
        if matches!(err, SpliceError::AckTimeout) {
            session.set_unresponsive(true);
        }
        if attempt == OPEN_ATTEMPTS || waited_in_full || !err.is_retryable(header.kind) {
            return Err(err);
        }
        debug!(%err, attempt, "tunnel stream failed before it was accepted; routing again");
        session = match route_locally(shared, &header.hostname, http).await {
            Route::Tunnel(next) => next,
            Route::RedirectToHttps | Route::Unknown => return Err(err),
        };
        attempt += 1;
    }
}

async fn open_once(
    shared: &Shared,
    session: &Session,
    first: &[u8],
    patience: Option<Duration>,
) -> Result<MuxStream, SpliceError> {
    let limit = patience.map_or(shared.limits.stream_open_timeout, |p| {
        p.min(shared.limits.stream_open_timeout)
    });
    let deadline = tokio::time::Instant::now() + limit;
    let mut tunnel = tokio::time::timeout_at(deadline, session.open())
        .await
        .map_err(|_| SpliceError::AckTimeout)??;
    tunnel.write_all(first).await?;
    tunnel.flush().await?;
    tokio::time::timeout_at(deadline, header::read_ack(&mut tunnel))
        .await
        .map_err(|_| SpliceError::AckTimeout)??;
    Ok(tunnel)
}

/// Records a visitor turned away because its tunnel has as many streams open as it may.
pub(crate) fn refused_stream(shared: &Shared) {
    debug!("stream limit of the tunnel reached; refusing the visitor");
    shared.admission.refused(Limit::StreamsPerTunnel);
}

#[cfg(test)]
mod tests;
