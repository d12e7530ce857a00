//! Visitor connections: read just enough to route them, then splice them onto a tunnel.
//!
//! On the HTTPS listener the first bytes are a TLS ClientHello, read without terminating TLS:
//! its SNI picks the tunnel, or its ALPN `shroud/1` marks a shroud client arriving on the same
//! port. On the HTTP listener the request head's Host picks the tunnel. The bytes read are
//! written onto the tunnel stream before everything else, so the origin sees the connection
//! exactly as the visitor sent it.

use std::net::SocketAddr;
use std::sync::Arc;

use shroud_mux::header::{self, StreamHeader, StreamKind};
use shroud_mux::Session;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument as _};

use crate::http_sniff::{self, HttpSniffError};
use crate::registry::Route;
use crate::replay::Replay;
use crate::server::Shared;
use crate::tls_sniff;
use crate::tunnel;

/// Copy buffer for each direction of a spliced connection.
const COPY_BUFFER: usize = 16 * 1024;

/// Handles one connection on the public HTTPS listener: a visitor or a shroud client.
pub async fn serve_https(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let limits = &shared.limits;
    let read = timeout(
        limits.client_hello_timeout,
        tls_sniff::read_client_hello(&mut stream, limits.max_client_hello),
    );
    let (hello, bytes) = match read.await {
        Ok(Ok(found)) => found,
        Ok(Err(err)) => {
            debug!(%err, "unreadable ClientHello; closing");
            return;
        }
        Err(_) => {
            debug!("no complete ClientHello in time; closing");
            return;
        }
    };

    let offers_shroud = hello.alpn.iter().any(|p| p == shroud_mux::ALPN);
    let for_proxy = hello
        .sni
        .as_deref()
        .is_none_or(|sni| sni == shared.tunnel_name);
    if offers_shroud && for_proxy {
        let span = tracing::info_span!("tunnel", %peer);
        let served = tunnel::serve(Replay::new(bytes, stream), peer, shared.clone(), shutdown)
            .instrument(span.clone())
            .await;
        if let Err(err) = served {
            span.in_scope(|| debug!(%err, "tunnel failed"));
        }
        return;
    }

    let Some(sni) = hello.sni else {
        debug!("ClientHello without SNI; closing");
        return;
    };
    let span = tracing::debug_span!("visitor", host = %sni, %peer);
    async {
        let Route::Tunnel(session) = shared.registry.route(&sni, false) else {
            debug!("no tunnel for this name");
            let _ = stream
                .write_all(&tls_sniff::unrecognized_name_alert())
                .await;
            return;
        };
        let header = StreamHeader {
            hostname: sni,
            kind: StreamKind::Tls,
            visitor: peer,
            public_port: local_port(&stream),
        };
        if let Err(err) = splice(&session, header, bytes, stream, &shared).await {
            debug!(%err, "visitor connection ended with an error");
        }
    }
    .instrument(span)
    .await
}

/// Handles one connection on the public HTTP listener.
pub async fn serve_http(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let limits = &shared.limits;
    let read = timeout(
        limits.http_head_timeout,
        http_sniff::read_request_head(&mut stream, limits.max_http_head),
    );
    let (head, bytes) = match read.await {
        Ok(Ok(found)) => found,
        Ok(Err(err)) => {
            debug!(%peer, %err, "bad HTTP request head");
            if let Some(response) = error_response(&err) {
                respond(&mut stream, &response).await;
            }
            return;
        }
        Err(_) => {
            debug!(%peer, "no complete HTTP request head in time");
            let response =
                http_sniff::simple_response(408, "Request Timeout", &[], "request timeout\n");
            respond(&mut stream, &response).await;
            return;
        }
    };
    let span = tracing::debug_span!("visitor", host = %head.host, %peer);
    async {
        let session = match shared.registry.route(&head.host, true) {
            Route::Tunnel(session) => session,
            Route::RedirectToHttps => {
                let location = format!("https://{}{}", head.host, head.path);
                let response = http_sniff::simple_response(
                    308,
                    "Permanent Redirect",
                    &[("Location", &location)],
                    &format!("moved to {location}\n"),
                );
                respond(&mut stream, &response).await;
                return;
            }
            Route::Unknown => {
                let response = http_sniff::simple_response(
                    404,
                    "Not Found",
                    &[],
                    "no service is published under this name here\n",
                );
                respond(&mut stream, &response).await;
                return;
            }
        };
        let header = StreamHeader {
            hostname: head.host.clone(),
            kind: StreamKind::Http,
            visitor: peer,
            public_port: local_port(&stream),
        };
        if let Err(err) = splice(&session, header, bytes, stream, &shared).await {
            debug!(%err, "visitor connection ended with an error");
        }
    }
    .instrument(span)
    .await
}

/// Sends the proxy's own answer to a plain-HTTP visitor and ends the connection. A visitor
/// that has gone already is no error worth reporting.
async fn respond(stream: &mut TcpStream, response: &[u8]) {
    if stream.write_all(response).await.is_ok() {
        let _ = stream.shutdown().await;
    }
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

/// Why a visitor connection could not be spliced onto its tunnel.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// No stream could be opened on the tunnel.
    #[error("opening a tunnel stream: {0}")]
    Open(#[from] shroud_mux::SessionError),
    /// The tunnel did not open a stream, or the client did not acknowledge it, in time.
    #[error("the client did not accept the stream in time")]
    AckTimeout,
    /// Copying failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Opens a stream on `session`, sends the header and the bytes already read, waits for the
/// client's acknowledgement, then copies both ways until both directions are done.
async fn splice(
    session: &Session,
    header: StreamHeader,
    initial: Vec<u8>,
    visitor: TcpStream,
    shared: &Shared,
) -> Result<(), SpliceError> {
    let deadline = tokio::time::Instant::now() + shared.limits.stream_open_timeout;
    let mut tunnel = tokio::time::timeout_at(deadline, session.open())
        .await
        .map_err(|_| SpliceError::AckTimeout)??;
    let mut first = header.encode();
    first.extend_from_slice(&initial);
    drop(initial);
    tunnel.write_all(&first).await?;
    tunnel.flush().await?;
    tokio::time::timeout_at(deadline, header::read_ack(&mut tunnel))
        .await
        .map_err(|_| SpliceError::AckTimeout)??;
    let mut visitor = visitor;
    tokio::io::copy_bidirectional_with_sizes(&mut visitor, &mut tunnel, COPY_BUFFER, COPY_BUFFER)
        .await?;
    Ok(())
}

fn local_port(stream: &TcpStream) -> u16 {
    stream.local_addr().map(|a| a.port()).unwrap_or(0)
}
