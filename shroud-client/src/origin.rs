//! One visitor connection, from the tunnel stream to the origin.
//!
//! The client acknowledges the stream with the first bytes it writes on it, or alone after a
//! moment (see the mux crate's `header` module for why), reads the header, dials the origin
//! that serves the stream's kind and copies both ways, passing half-closes through. With
//! `--tls-cert` it terminates the visitor's TLS itself and speaks plain bytes to the origin.
//! With `--acme` it first reads the ClientHello of a TLS stream: a certificate authority's
//! TLS-ALPN-01 check is answered here and never reaches the origin; a visitor is terminated
//! with the certificate obtained, or, with `--acme-export`, passed through to the origin, its
//! ClientHello written first. With `--proxy-protocol` the origin connection starts with a PROXY
//! protocol header naming the visitor, written as soon as it is dialled, so before any byte of
//! the visitor's (decrypted or not).
//!
//! Visitors of the client's own onion service ([`crate::onion`]) take the same path from
//! [`forward`] on, with [`Peer::Onion`]: they have no address, so their PROXY protocol header
//! says so (v1 `UNKNOWN`, v2 `LOCAL`) and the origin uses the connection's own addresses.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use arti_client::DataStream;
use shroud_mux::header::{Acknowledging, StreamHeader, StreamKind};
use shroud_mux::replay::Replay;
use shroud_mux::MuxStream;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, Instrument as _};

use crate::acme::Acme;
use crate::hello::{self, Hello};
use crate::proxy_protocol;
use crate::shared::{ClientConfig, Target};

/// What a plain-HTTP visitor gets when the origin cannot be reached.
const BAD_GATEWAY: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Length: 36\r\n\
Connection: close\r\n\
\r\n\
the origin server is not reachable.\n";

/// Serves one stream the proxy opened. Errors end the stream and are logged at debug level:
/// they concern one visitor, never the tunnel.
pub async fn serve_stream(stream: MuxStream, config: Arc<ClientConfig>) {
    let _counted = config.metrics.stream();
    let timing = &config.timing;
    // The acknowledgement goes out with the origin's first bytes, or alone after a moment.
    let mut stream = Acknowledging::new(stream);
    let header = match timeout(
        timing.stream_header_timeout,
        StreamHeader::read(&mut stream),
    )
    .await
    {
        Ok(Ok(header)) => header,
        Ok(Err(err)) => {
            debug!(%err, "bad stream header");
            return;
        }
        Err(_) => {
            debug!("no stream header in time");
            return;
        }
    };
    let span = tracing::debug_span!(
        "visitor",
        visitor = %header.visitor,
        kind = ?header.kind,
    );
    async move {
        if header.hostname != config.hostname {
            debug!(hostname = %header.hostname, "stream for a hostname this client does not serve");
            return;
        }
        let peer = Peer::Visitor {
            addr: header.visitor,
            public_port: header.public_port,
        };
        if let Err(err) = forward(stream, header.kind, &peer, &config).await {
            debug!(%err, "visitor connection ended with an error");
        }
    }
    .instrument(span)
    .await
}

/// Who a connection to the origin serves, as far as the origin's PROXY protocol header can
/// tell it.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    /// A visitor through a proxy: its address, and the proxy's public port it connected to.
    Visitor {
        /// The visitor's address, as the proxy saw it.
        addr: SocketAddr,
        /// The proxy's public port.
        public_port: u16,
    },
    /// A visitor over Tor to the client's onion service: no address to tell.
    Onion,
}

/// Serves one visitor's connection, `stream`, of `kind`: answers a CA's TLS-ALPN-01 check
/// (with `--acme`), or dials the origin that serves `kind` and copies both ways, terminating
/// TLS here with `--tls-cert` or the ACME certificate.
pub async fn forward<S>(
    mut stream: S,
    kind: StreamKind,
    peer: &Peer,
    config: &ClientConfig,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + OwesAck + Unpin,
{
    // With ACME, a TLS stream may be the CA checking the name: look before dialling.
    let mut hello_bytes = None;
    if let (Some(acme), StreamKind::Tls) = (&config.acme, kind) {
        // Boxed, as every TLS-terminating path below: what only some visitors need is not
        // laid out in every visitor's task.
        let read = timeout(
            config.timing.stream_header_timeout,
            Box::pin(hello::read_client_hello(&mut stream)),
        );
        let (hello, bytes) = read.await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "reading the ClientHello")
        })??;
        if hello.is_acme_validation() {
            return Box::pin(answer_validation(&acme.acme, hello, bytes, stream, config)).await;
        }
        hello_bytes = Some(bytes);
    }
    let target = match kind {
        StreamKind::Tls => &config.target,
        StreamKind::Http => match &config.http_target {
            Some(target) => target,
            None => return Ok(()), // The proxy redirects these; it should not send them.
        },
    };
    let origin = match owing(&mut stream, dial(target, peer, config)).await {
        Ok(origin) => origin,
        Err(err) => {
            debug!(%err, "origin unreachable");
            config.metrics.origin_failed(kind == StreamKind::Http);
            if kind == StreamKind::Http {
                let _ = stream.write_all(BAD_GATEWAY).await;
            }
            let _ = stream.shutdown().await;
            return Ok(());
        }
    };
    match (&config.acme, hello_bytes) {
        (Some(acme), Some(bytes)) if acme.terminate => {
            let acceptor = TlsAcceptor::from(acme.acme.visitor_config());
            let visitor = Replay::new(bytes, stream);
            return Box::pin(terminate(&acceptor, visitor, origin, config)).await;
        }
        (Some(_), Some(bytes)) => {
            // The origin terminates TLS: it gets the ClientHello as the visitor sent it.
            let mut origin = origin;
            origin.write_all(&bytes).await?;
            return splice(stream, origin, config).await;
        }
        _ => {}
    }
    match (&config.origin_tls, kind) {
        (Some(acceptor), StreamKind::Tls) => {
            Box::pin(terminate(acceptor, stream, origin, config)).await
        }
        _ => splice(stream, origin, config).await,
    }
}

/// A visitor's stream that may still owe the proxy its acknowledgement (PROTOCOL.md §7.3).
pub trait OwesAck {
    /// Writes the acknowledgement once it falls due. Ready when nothing more is owed.
    fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>;
}

impl<S: AsyncWrite + Unpin> OwesAck for Acknowledging<S> {
    fn poll_owed(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_due(cx)
    }
}

/// A stream from a visitor of the client's own onion service: no proxy, nothing owed.
impl OwesAck for DataStream {
    fn poll_owed(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Awaits `work`, meanwhile writing `stream`'s acknowledgement if it falls due: nothing reads
/// or writes the stream while the origin is dialled.
async fn owing<S: OwesAck, F: Future>(stream: &mut S, work: F) -> F::Output {
    let mut work = std::pin::pin!(work);
    let mut owed = true;
    std::future::poll_fn(|cx| {
        // An error here surfaces again at the stream's next write.
        if owed && stream.poll_owed(cx).is_ready() {
            owed = false;
        }
        work.as_mut().poll(cx)
    })
    .await
}

/// Terminates the visitor's TLS with `acceptor`, then copies the plain bytes both ways.
async fn terminate<S>(
    acceptor: &TlsAcceptor,
    visitor: S,
    origin: TcpStream,
    config: &ClientConfig,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = timeout(
        config.timing.stream_header_timeout,
        acceptor.accept(visitor),
    );
    let visitor = handshake
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))??;
    splice(visitor, origin, config).await
}

/// Answers a certificate authority's TLS-ALPN-01 check (RFC 8737) with the challenge
/// certificate for the name, if one is pending, and ends the stream: the check ends with the
/// handshake, and the origin never hears of it.
async fn answer_validation<S>(
    acme: &Acme,
    hello: Hello,
    bytes: Vec<u8>,
    stream: S,
    config: &ClientConfig,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(tls) = hello
        .sni
        .as_deref()
        .and_then(|sni| acme.challenge_config(sni))
    else {
        debug!(sni = ?hello.sni, "a TLS-ALPN-01 check for no pending challenge; closing");
        return Ok(());
    };
    let handshake = TlsAcceptor::from(tls).accept(Replay::new(bytes, stream));
    let mut answered = timeout(config.timing.stream_header_timeout, handshake)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS-ALPN-01 handshake")
        })??;
    info!("answered the certificate authority's TLS-ALPN-01 check");
    let _ = answered.shutdown().await;
    Ok(())
}

/// Connects to the origin and, with `--proxy-protocol`, writes the PROXY protocol header that
/// names the visitor (or says there is none to name): nothing else has been sent on the
/// connection yet.
async fn dial(target: &Target, peer: &Peer, config: &ClientConfig) -> std::io::Result<TcpStream> {
    let connect = async {
        let mut stream = TcpStream::connect((target.host.as_str(), target.port)).await?;
        stream.set_nodelay(true)?;
        if let Some(version) = config.timing.proxy_protocol {
            let proxy_header = match *peer {
                Peer::Visitor { addr, public_port } => {
                    proxy_protocol::encode(version, addr, public_port)
                }
                Peer::Onion => proxy_protocol::encode_unknown(version),
            };
            stream.write_all(&proxy_header).await?;
        }
        Ok(stream)
    };
    timeout(config.timing.origin_connect_timeout, connect)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting to the origin")
        })?
}

/// Copies both ways, with a burst buffer per direction that scales with the stream buffer (held
/// only while data flows): with the stream's yamux window, that is all one visitor holds here.
async fn splice<A, B>(mut a: A, mut b: B, config: &ClientConfig) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let buffer = shroud_mux::session::copy_buffer_len(config.timing.stream_buffer);
    shroud_mux::splice::splice(&mut a, &mut b, buffer).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<F, A, B, Fut>(_: F) -> usize
    where
        F: FnOnce(A, B) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// What a visitor's task holds for as long as it lives, however little it is doing: an
    /// idle visitor costs this plus its stream, its origin connection and the buffers it
    /// borrows while data flows.
    #[test]
    fn a_visitor_task_is_small() {
        let size = future_size(serve_stream);
        assert!(size <= 2048, "a visitor's task holds {size} bytes");
    }
}
