//! Origins: the servers a shroud client publishes, each on `127.0.0.1:0`.
//!
//! Every origin returns a handle that reports its address, counts the TCP
//! connections it accepted, and stops when dropped: dropping cancels the
//! accept loop and every connection task (asynchronously). [`shutdown`]-style
//! methods do the same and wait until the listener is closed and every
//! connection dropped, for tests that need "origin gone" to be true now.
//!
//! An origin made with `tls(config)` terminates TLS itself with that config;
//! it counts a connection on TCP accept, before the handshake.
//!
//! [`shutdown`]: EchoOrigin::shutdown

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::bulk::{self, Received, BUF_LEN, ORIGIN_SEED};

/// How long an origin waits for a visitor's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an origin keeps reading after its answer, so that closing never
/// resets a connection whose peer still had bytes in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest HTTP request head [`HttpOrigin`] accepts.
pub const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// What an origin does with each accepted (and, if TLS, handshaken) stream.
trait Service: Copy + Send + Sync + 'static {
    const NAME: &'static str;

    fn serve<S>(self, stream: S) -> impl Future<Output = io::Result<()>> + Send
    where
        S: AsyncRead + AsyncWrite + Unpin + Send;
}

/// The listener task and what the handle needs to report on and stop it.
#[derive(Debug)]
struct Running {
    addr: SocketAddr,
    accepted: watch::Sender<usize>,
    token: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Running {
    async fn start<S: Service>(service: S, tls: Option<Arc<ServerConfig>>) -> anyhow::Result<Self> {
        // A deep backlog, as a real origin server has, so bursts of visitors are not dropped.
        let listener = shroud_proxy::server::bind_listener(([127, 0, 0, 1], 0).into())
            .with_context(|| format!("bind {} origin", S::NAME))?;
        let addr = listener
            .local_addr()
            .context("read origin's local address")?;
        let (accepted, _) = watch::channel(0);
        let token = CancellationToken::new();
        let task = tokio::spawn(
            accept_loop(
                listener,
                tls.map(TlsAcceptor::from),
                service,
                accepted.clone(),
                token.clone(),
            )
            .instrument(tracing::debug_span!("origin", kind = S::NAME, %addr)),
        );
        Ok(Running {
            addr,
            accepted,
            token,
            task: Some(task),
        })
    }

    async fn wait_accepted(&self, n: usize) {
        let mut seen = self.accepted.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _closed = seen.wait_for(|count| *count >= n).await;
    }

    async fn shutdown(mut self) {
        self.token.cancel();
        if let Some(task) = self.task.take() {
            if let Err(err) = task.await {
                tracing::warn!(%err, "origin task failed");
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn accept_loop<S: Service>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    accepted: watch::Sender<usize>,
    token: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(err) = done {
                    tracing::warn!(%err, "origin connection task failed");
                }
            }
            res = listener.accept() => match res {
                Ok((stream, peer)) => {
                    accepted.send_modify(|count| *count += 1);
                    let tls = tls.clone();
                    let token = token.clone();
                    conns.spawn(
                        async move {
                            let result = tokio::select! {
                                r = serve_one(stream, tls, service) => r,
                                () = token.cancelled() => Ok(()),
                            };
                            match result {
                                Ok(()) => tracing::debug!("connection done"),
                                Err(err) => tracing::debug!(%err, "connection ended with error"),
                            }
                        }
                        .instrument(tracing::debug_span!("conn", %peer)),
                    );
                }
                Err(err) => {
                    // Transient (EMFILE and the like): back off instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn serve_one<S: Service>(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    service: S,
) -> io::Result<()> {
    match tls {
        None => service.serve(stream).await,
        Some(acceptor) => {
            let tls_stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            service.serve(tls_stream).await
        }
    }
}

/// Reads and discards until EOF, an error, or [`DRAIN_TIMEOUT`].
async fn drain<R: AsyncRead + Unpin>(reader: &mut R) {
    let mut buf = vec![0u8; 4096];
    let _expired = tokio::time::timeout(DRAIN_TIMEOUT, async {
        // Errors here (a TLS peer closing without close_notify, a reset) mean
        // the peer is gone, which is all draining waits for.
        while let Ok(n) = reader.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Defines an origin handle type around [`Running`].
macro_rules! origin_handle {
    ($(#[$doc:meta])* $name:ident, $service:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name {
            running: Running,
        }

        impl $name {
            /// The address the origin listens on (always on 127.0.0.1).
            pub fn addr(&self) -> SocketAddr {
                self.running.addr
            }

            /// How many TCP connections the origin has accepted so far.
            pub fn accepted(&self) -> usize {
                *self.running.accepted.borrow()
            }

            /// Waits until the origin has accepted at least `n` connections.
            pub async fn wait_accepted(&self, n: usize) {
                self.running.wait_accepted(n).await
            }

            /// Stops the origin and waits until its listener is closed and
            /// every connection it held is dropped.
            pub async fn shutdown(self) {
                self.running.shutdown().await
            }

            async fn start(tls: Option<Arc<ServerConfig>>) -> anyhow::Result<Self> {
                Ok(Self {
                    running: Running::start($service, tls).await?,
                })
            }
        }
    };
}

/// Defines the `plain` and `tls` constructors of an origin handle type.
macro_rules! origin_constructors {
    ($name:ident) => {
        impl $name {
            /// Starts the origin on 127.0.0.1:0, speaking over plain TCP.
            pub async fn plain() -> anyhow::Result<Self> {
                Self::start(None).await
            }

            /// Starts the origin on 127.0.0.1:0, terminating TLS with `config`.
            pub async fn tls(config: Arc<ServerConfig>) -> anyhow::Result<Self> {
                Self::start(Some(config)).await
            }
        }
    };
}

origin_handle!(
    /// Echoes every byte back. When the visitor half-closes, it finishes
    /// writing, then shuts down its own write side (a TLS close_notify and a
    /// TCP FIN), so half-close can be followed end to end.
    EchoOrigin,
    Echo
);
origin_constructors!(EchoOrigin);

origin_handle!(
    /// A minimal HTTP/1.1 server. It reads one request head (at most
    /// [`MAX_REQUEST_HEAD`] bytes), answers `200 OK` with the body
    /// `hello from origin: {METHOD} {TARGET}\n` and the header
    /// `X-Origin: test`, and closes. `GET /bytes/N` (N at most [`MAX_BYTES`])
    /// answers N bytes of [`byte_at`] instead, for downloads. Oversized heads
    /// get `431`, malformed request lines `400`.
    HttpOrigin,
    Http
);
origin_constructors!(HttpOrigin);

origin_handle!(
    /// The far end of the bulk-transfer protocol described in
    /// [`crate::bulk`], for moving large amounts of data both ways at once.
    BulkOrigin,
    Bulk
);
origin_constructors!(BulkOrigin);

origin_handle!(
    /// [`HttpOrigin`] and [`BulkOrigin`] on one port, told apart by the first byte a visitor
    /// sends: a bulk transfer starts with the top byte of its length, zero below 2^56 bytes;
    /// an HTTP request with a letter of its method. For a client that publishes one port and
    /// visitors that send both kinds of traffic to it (the soak).
    MixedOrigin,
    Mixed
);
origin_constructors!(MixedOrigin);

origin_handle!(
    /// Accepts connections and never reads or writes; it holds them open
    /// until dropped. For testing an origin that never answers.
    SilentOrigin,
    Silent
);

impl SilentOrigin {
    /// Starts the origin on 127.0.0.1:0.
    pub async fn plain() -> anyhow::Result<Self> {
        Self::start(None).await
    }
}

#[derive(Debug, Clone, Copy)]
struct Echo;

impl Service for Echo {
    const NAME: &'static str = "echo";

    async fn serve<S>(self, mut stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut buf = vec![0u8; BUF_LEN];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            stream.write_all(&buf[..n]).await?;
        }
        stream.flush().await?;
        stream.shutdown().await
    }
}

#[derive(Debug, Clone, Copy)]
struct Http;

/// Outcome of reading an HTTP request head.
enum Head {
    Complete(Vec<u8>),
    TooLarge,
    Eof,
}

async fn read_head<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Head> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok(Head::Eof);
        }
        // Search only where the terminator could newly appear.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if let Some(at) = head[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + at + 4;
            if end > MAX_REQUEST_HEAD {
                return Ok(Head::TooLarge);
            }
            head.truncate(end);
            return Ok(Head::Complete(head));
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Ok(Head::TooLarge);
        }
    }
}

fn http_response(status: &str, body: &str, with_body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         X-Origin: test\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    if with_body {
        out.push_str(body);
    }
    out.into_bytes()
}

impl Service for Http {
    const NAME: &'static str = "http";

    async fn serve<S>(self, mut stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let response = match read_head(&mut stream).await? {
            Head::Eof => return Ok(()),
            Head::TooLarge => http_response(
                "431 Request Header Fields Too Large",
                "request head too large\n",
                true,
            ),
            Head::Complete(head) => {
                let line_end = head
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .unwrap_or(head.len());
                let line = String::from_utf8_lossy(&head[..line_end]);
                let mut parts = line.split(' ');
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(method), Some(target), Some(version), None)
                        if !method.is_empty()
                            && !target.is_empty()
                            && version.starts_with("HTTP/1.") =>
                    {
                        if let Some(n) = bytes_wanted(method, target) {
                            return send_bytes(stream, n).await;
                        }
                        let body = format!("hello from origin: {method} {target}\n");
                        http_response("200 OK", &body, method != "HEAD")
                    }
                    _ => http_response("400 Bad Request", "malformed request line\n", true),
                }
            }
        };
        stream.write_all(&response).await?;
        stream.flush().await?;
        stream.shutdown().await?;
        drain(&mut stream).await;
        Ok(())
    }
}

/// The most bytes `GET /bytes/N` sends.
pub const MAX_BYTES: u64 = 1 << 30;

/// Byte `i` of a `GET /bytes/N` body: a pattern that a byte lost, added or moved breaks.
pub fn byte_at(i: u64) -> u8 {
    (i % 251) as u8
}

/// N, for `GET /bytes/N` with N at most [`MAX_BYTES`].
fn bytes_wanted(method: &str, target: &str) -> Option<u64> {
    let n: u64 = target.strip_prefix("/bytes/")?.parse().ok()?;
    (method == "GET" && n <= MAX_BYTES).then_some(n)
}

/// Answers `GET /bytes/n`: a head with its length, then the body in 64 KiB writes.
async fn send_bytes<S: AsyncWrite + Unpin>(mut stream: S, n: u64) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nX-Origin: test\r\n\
         Content-Length: {n}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < n {
        let len = (n - sent).min(chunk.len() as u64) as usize;
        for (offset, byte) in chunk[..len].iter_mut().enumerate() {
            *byte = byte_at(sent + offset as u64);
        }
        stream.write_all(&chunk[..len]).await?;
        sent += len as u64;
    }
    stream.flush().await?;
    stream.shutdown().await
}

#[derive(Debug, Clone, Copy)]
struct Bulk;

impl Service for Bulk {
    const NAME: &'static str = "bulk";

    async fn serve<S>(self, mut stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut len = [0u8; 8];
        stream.read_exact(&mut len).await?;
        let n = u64::from_be_bytes(len);
        tracing::debug!(n, "bulk transfer starting");

        let (mut reader, mut writer) = tokio::io::split(stream);
        let (received, _) = tokio::try_join!(
            bulk::receive_hashed(&mut reader, n),
            bulk::send_pattern(&mut writer, ORIGIN_SEED, n, false, bulk::BUF_LEN, None),
        )?;
        let hash = match received {
            Received::Complete(hash) => hash,
            Received::Truncated(got) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("visitor sent {got} of {n} bytes"),
                ))
            }
        };
        writer.write_all(&hash).await?;
        writer.flush().await?;
        writer.shutdown().await?;
        drain(&mut reader).await;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Mixed;

impl Service for Mixed {
    const NAME: &'static str = "mixed";

    async fn serve<S>(self, mut stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut first = [0u8; 1];
        if stream.read(&mut first).await? == 0 {
            return Ok(());
        }
        let stream = Prefixed {
            first: Some(first[0]),
            inner: stream,
        };
        if first[0] == 0 {
            Bulk.serve(stream).await
        } else {
            Http.serve(stream).await
        }
    }
}

/// A stream whose first byte, already read by [`Mixed`], is handed out again before the rest.
struct Prefixed<S> {
    first: Option<u8>,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if buf.remaining() > 0 {
            if let Some(byte) = self.first.take() {
                buf.put_slice(&[byte]);
                return std::task::Poll::Ready(Ok(()));
            }
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Debug, Clone, Copy)]
struct Silent;

impl Service for Silent {
    const NAME: &'static str = "silent";

    async fn serve<S>(self, stream: S) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        // Holding the stream keeps the connection open; cancellation drops it.
        let _held = stream;
        std::future::pending().await
    }
}
