//! Visitor connections: read just enough to route them, then splice them onto a tunnel.
//!
//! On the HTTPS listener the first bytes are a TLS ClientHello, read without terminating TLS:
//! its SNI picks the tunnel, or its ALPN `shroud/1` marks a shroud client arriving on the same
//! port. On the HTTP listener the request head's Host picks the tunnel. The bytes read are
//! written onto the tunnel stream before everything else, so the origin sees the connection
//! exactly as the visitor sent it.

use std::net::SocketAddr;
use std::sync::Arc;

use shroud_mux::header::{StreamHeader, StreamKind};
use shroud_mux::{MuxStream, SessionError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument as _};

use crate::admission::AddressGuard;
use crate::handoff::{self, Refusal, SpliceError};
use crate::http_sniff::{self, HttpSniffError};
use crate::metrics::{HostSeries, Listener, Outcome, Path};
use crate::peers::Peers;
use crate::registry::Route;
use crate::shared::{RoutingGuard, Shared};
use crate::tunnel;
use crate::{forward, tls_sniff};
use shroud_mux::quickack::QuickAck;
use shroud_mux::replay::Replay;

/// How long a refused plain-HTTP visitor's remaining bytes are read after its answer.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// How many of those bytes are read at most.
const LINGER_BYTES: usize = 64 * 1024;

/// Handles one connection on the public HTTPS listener: a visitor or a shroud client.
/// `address` counts the connection against its address: for as long as it lasts if it is a
/// visitor, until it is bound if it is a tunnel.
pub async fn serve_https(
    mut stream: TcpStream,
    peer: SocketAddr,
    address: AddressGuard,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let routing = shared.routing();
    let limits = &shared.limits;
    let read = timeout(
        limits.client_hello_timeout,
        tls_sniff::read_client_hello(&mut stream, limits.max_client_hello),
    );
    let metrics = &shared.metrics;
    let (hello, bytes) = match read.await {
        Ok(Ok(found)) => found,
        Ok(Err(err)) => {
            debug!(%err, "unreadable ClientHello; closing");
            let outcome = match err {
                tls_sniff::SniffError::Eof | tls_sniff::SniffError::Io(_) => Outcome::ClosedEarly,
                tls_sniff::SniffError::TooLarge => Outcome::TooLarge,
                tls_sniff::SniffError::NotTls | tls_sniff::SniffError::Malformed(_) => {
                    Outcome::Malformed
                }
            };
            metrics.connection(Listener::Https, outcome);
            return;
        }
        Err(_) => {
            debug!("no complete ClientHello in time; closing");
            metrics.connection(Listener::Https, Outcome::SniffTimeout);
            return;
        }
    };

    let offers_shroud = hello.alpn.iter().any(|p| p == shroud_mux::ALPN);
    let for_proxy = hello
        .sni
        .as_deref()
        .is_none_or(|sni| sni == shared.tunnel_name);
    if offers_shroud && for_proxy {
        drop(routing);
        metrics.connection(Listener::Https, Outcome::Tunnel);
        let span = tracing::info_span!("tunnel", %peer);
        // A tunnel's far end is usually a Tor exit, whose small writes wait on our ACKs.
        let io = Replay::new(bytes, QuickAck::new(stream));
        // Boxed: a tunnel's handshake and session would otherwise be laid out in every
        // visitor's task.
        let served = Box::pin(tunnel::serve(
            io,
            peer,
            shared.clone(),
            shutdown,
            Some(address),
        ))
        .instrument(span.clone())
        .await;
        if let Err(err) = served {
            span.in_scope(|| debug!(%err, "tunnel failed"));
        }
        return;
    }

    let Some(sni) = hello.sni else {
        debug!("ClientHello without SNI; closing");
        metrics.connection(Listener::Https, Outcome::NoSni);
        return;
    };
    let span = tracing::debug_span!("visitor", host = %sni, %peer);
    async {
        let header = StreamHeader {
            hostname: sni,
            kind: StreamKind::Tls,
            visitor: peer,
            public_port: local_port(&stream),
        };
        if let Err(refusal) = splice_visitor(&mut stream, &shared, routing, header, bytes).await {
            shared
                .metrics
                .connection(Listener::Https, refusal.outcome());
            // A TLS visitor can only be told with an alert; which one is all it learns.
            let alert = match refusal {
                Refusal::NoTunnel(_) => tls_sniff::unrecognized_name_alert(),
                Refusal::HostnameFull | Refusal::Open(_) | Refusal::Forward => {
                    tls_sniff::internal_error_alert()
                }
            };
            let _ = stream.write_all(&alert).await;
        }
    }
    .instrument(span)
    .await;
    drop(address);
}

/// Handles one connection on the public HTTP listener.
pub async fn serve_http(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let routing = shared.routing();
    let limits = &shared.limits;
    let read = timeout(
        limits.http_head_timeout,
        http_sniff::read_request_head(&mut stream, limits.max_http_head),
    );
    let (head, bytes) = match read.await {
        Ok(Ok(found)) => found,
        Ok(Err(err)) => {
            debug!(%peer, %err, "bad HTTP request head");
            let outcome = match err {
                HttpSniffError::Eof | HttpSniffError::Io(_) => Outcome::ClosedEarly,
                HttpSniffError::TooLarge | HttpSniffError::TooManyHeaders => Outcome::TooLarge,
                HttpSniffError::Malformed(_)
                | HttpSniffError::MissingHost
                | HttpSniffError::DuplicateHost
                | HttpSniffError::BadHost(_) => Outcome::Malformed,
            };
            shared.metrics.connection(Listener::Http, outcome);
            if let Some(response) = error_response(&err) {
                respond(&mut stream, &response).await;
            }
            return;
        }
        Err(_) => {
            debug!(%peer, "no complete HTTP request head in time");
            shared
                .metrics
                .connection(Listener::Http, Outcome::SniffTimeout);
            let response =
                http_sniff::simple_response(408, "Request Timeout", &[], "request timeout\n");
            respond(&mut stream, &response).await;
            return;
        }
    };
    let span = tracing::debug_span!("visitor", host = %head.host, %peer);
    async {
        let header = StreamHeader {
            hostname: head.host.clone(),
            kind: StreamKind::Http,
            visitor: peer,
            public_port: local_port(&stream),
        };
        let Err(refusal) = splice_visitor(&mut stream, &shared, routing, header, bytes).await
        else {
            return;
        };
        shared.metrics.connection(Listener::Http, refusal.outcome());
        let response = match refusal {
            Refusal::NoTunnel(Route::RedirectToHttps) => {
                let location = format!("https://{}{}", head.host, head.path);
                let response = http_sniff::simple_response(
                    308,
                    "Permanent Redirect",
                    &[("Location", &location)],
                    &format!("moved to {location}\n"),
                );
                return respond(&mut stream, &response).await;
            }
            Refusal::NoTunnel(_) => {
                let response = http_sniff::simple_response(
                    404,
                    "Not Found",
                    &[],
                    "no service is published under this name here\n",
                );
                return respond(&mut stream, &response).await;
            }
            Refusal::HostnameFull => http_sniff::simple_response(
                503,
                "Service Unavailable",
                &[("Retry-After", "5")],
                "this service has too many visitors at the moment; try again shortly\n",
            ),
            Refusal::Open(SpliceError::Open(SessionError::TooManyStreams)) => {
                http_sniff::simple_response(
                    503,
                    "Service Unavailable",
                    &[("Retry-After", "5")],
                    "this service has too many connections open at the moment; try again \
                     shortly\n",
                )
            }
            Refusal::Open(SpliceError::AckTimeout) => http_sniff::simple_response(
                504,
                "Gateway Timeout",
                &[],
                "the service did not answer in time\n",
            ),
            Refusal::Forward | Refusal::Open(SpliceError::Open(_) | SpliceError::Tunnel(_)) => {
                http_sniff::simple_response(
                    502,
                    "Bad Gateway",
                    &[("Retry-After", "5")],
                    "the service's tunnel failed; try again shortly\n",
                )
            }
        };
        respond_and_linger(&mut stream, &response).await;
    }
    .instrument(span)
    .await
}

/// What is the same for TLS and plain-HTTP visitors once their first bytes are read: route by
/// `header.hostname`, count the visitor against its name, open a tunnel stream carrying the
/// header and the `bytes` already read (or forward it all to a peer holding the name), then
/// copy both ways until both directions are done. `routing` counts the visitor as not yet
/// routed, for draining tunnels to wait on. A visitor routed or forwarded is counted here, as
/// soon as it is; one refused is left to the caller to count.
async fn splice_visitor(
    stream: &mut TcpStream,
    shared: &Shared,
    routing: RoutingGuard,
    header: StreamHeader,
    bytes: Vec<u8>,
) -> Result<(), Refusal> {
    let http = header.kind == StreamKind::Http;
    // Boxed, as opening the stream below: what a visitor needs only until it is routed
    // should not stay laid out in its task while it is spliced.
    let route = Box::pin(route(shared, &header.hostname, http)).await;
    drop(routing);
    let session = match route {
        Destination::Here(Route::Tunnel(session)) => session,
        Destination::Peers(peers) => {
            let Some(_counted) = shared.admission.visitor_for(&header.hostname) else {
                return Err(Refusal::HostnameFull);
            };
            // Boxed: only forwarded visitors need its state laid out.
            return Box::pin(forward::forward(stream, shared, &peers, &header, &bytes)).await;
        }
        Destination::Here(other) => {
            debug!("no tunnel for this name");
            return Err(Refusal::NoTunnel(other));
        }
    };
    let Some(_counted) = shared.admission.visitor_for(&header.hostname) else {
        return Err(Refusal::HostnameFull);
    };
    let tunnel = match Box::pin(handoff::open(shared, session, &header, &bytes)).await {
        Ok(tunnel) => tunnel,
        Err(err) => {
            debug!(%err, "no tunnel stream for the visitor");
            if matches!(err, SpliceError::Open(SessionError::TooManyStreams)) {
                handoff::refused_stream(shared);
            }
            return Err(Refusal::Open(err));
        }
    };
    let listener = if http {
        Listener::Http
    } else {
        Listener::Https
    };
    shared.metrics.connection(listener, Outcome::Routed);
    let host = shared.metrics.hostnames().series(&header.hostname);
    host.visitors.inc();
    // What was read to route it went with the stream's header.
    let sniffed = bytes.len() as u64;
    count_bytes(
        [&shared.metrics.bytes(Path::Local)[0], &host.bytes[0]],
        sniffed,
    );
    drop(bytes);
    if let Err(err) = copy(stream, tunnel, shared, &host).await {
        debug!(%err, "visitor connection ended with an error");
    }
    Ok(())
}

/// Where a visitor goes.
enum Destination {
    /// To a tunnel here, or nowhere.
    Here(Route),
    /// To one of the peers holding its name.
    Peers(Arc<Peers>),
}

/// Finds where a visitor for `hostname` goes: a tunnel here first, else a peer holding the
/// name, else (if it is expected back) whichever of the two comes first within the route
/// wait.
async fn route(shared: &Shared, hostname: &str, http: bool) -> Destination {
    let Some(peers) = &shared.peers else {
        return Destination::Here(handoff::route_locally(shared, hostname, http).await);
    };
    // Subscribe before looking, so a change between the look and the wait is not missed.
    let mut changes = peers.watch();
    let here = shared.registry.route(hostname, http);
    if matches!(here, Route::Tunnel(_)) {
        return Destination::Here(here);
    }
    if peers.holds(hostname) {
        return Destination::Peers(peers.clone());
    }
    let wait = handoff::route_locally(shared, hostname, http);
    tokio::pin!(wait);
    let deadline = tokio::time::Instant::now() + shared.limits.route_wait;
    loop {
        tokio::select! {
            here = &mut wait => {
                if !matches!(here, Route::Tunnel(_)) && peers.holds(hostname) {
                    return Destination::Peers(peers.clone());
                }
                return Destination::Here(here);
            }
            changed = tokio::time::timeout_at(deadline, changes.changed()) => {
                if changed.is_ok() && peers.holds(hostname) {
                    return Destination::Peers(peers.clone());
                }
                if changed.is_err() {
                    // The route wait is over; the local wait ends at the same time.
                    return Destination::Here((&mut wait).await);
                }
            }
        }
    }
}

/// Sends the proxy's own answer to a plain-HTTP visitor and ends the connection. A visitor
/// that has gone already is no error worth reporting.
async fn respond(stream: &mut TcpStream, response: &[u8]) {
    if stream.write_all(response).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

/// Answers a plain-HTTP visitor the proxy turns away, then reads and discards what it still
/// sends for a moment before closing: closing a socket with unread bytes resets the
/// connection, and the reset can destroy the answer before the visitor has read it.
async fn respond_and_linger(stream: &mut TcpStream, response: &[u8]) {
    let answer = async {
        stream.write_all(response).await?;
        stream.shutdown().await?;
        // On the heap: an array here would be laid out in every visitor's task.
        let mut sink = vec![0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match stream.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = timeout(LINGER, answer).await;
}

/// Turns away a plain-HTTP connection whose address has too many already, before reading
/// anything from it: `429 Too Many Requests`.
pub(crate) async fn refuse_http_early(mut stream: TcpStream) {
    let response = http_sniff::simple_response(
        429,
        "Too Many Requests",
        &[("Retry-After", "5")],
        "too many connections from your address at once; try again shortly\n",
    );
    respond_and_linger(&mut stream, &response).await;
}

/// The answer to a request head the proxy could not route, if it deserves one.
fn error_response(err: &HttpSniffError) -> Option<Vec<u8>> {
    let (status, reason, body) = match err {
        HttpSniffError::Eof | HttpSniffError::Io(_) => return None,
        HttpSniffError::TooLarge | HttpSniffError::TooManyHeaders => (
            431,
            "Request Header Fields Too Large",
            "request head too large\n",
        ),
        HttpSniffError::MissingHost => (400, "Bad Request", "missing Host header\n"),
        HttpSniffError::DuplicateHost => (400, "Bad Request", "more than one Host header\n"),
        HttpSniffError::BadHost(_) => (400, "Bad Request", "invalid Host header\n"),
        HttpSniffError::Malformed(_) => (400, "Bad Request", "malformed request\n"),
    };
    Some(http_sniff::simple_response(status, reason, &[], body))
}

/// Copies both ways between a visitor and its accepted tunnel stream until both directions
/// are done, counting the bytes for the proxy and for the visitor's hostname.
async fn copy(
    visitor: &mut TcpStream,
    mut tunnel: MuxStream,
    shared: &Shared,
    host: &HostSeries,
) -> std::io::Result<()> {
    // Per direction, while data flows; with the stream's yamux window this is all one visitor
    // holds here.
    let buffer = shroud_mux::session::copy_buffer_len(shared.limits.stream_buffer);
    let [to_origin, to_visitor] = shared.metrics.bytes(Path::Local);
    shroud_mux::splice::splice_reporting(visitor, &mut tunnel, buffer, |up, down| {
        count_bytes([to_origin, &host.bytes[0]], up);
        count_bytes([to_visitor, &host.bytes[1]], down);
    })
    .await?;
    Ok(())
}

/// Adds `n` bytes to each of `counters`, when there are any.
pub(crate) fn count_bytes(counters: [&prometheus_client::metrics::counter::Counter; 2], n: u64) {
    if n > 0 {
        for counter in counters {
            counter.inc_by(n);
        }
    }
}

fn local_port(stream: &TcpStream) -> u16 {
    stream.local_addr().map(|a| a.port()).unwrap_or(0)
}
