//! A yamux session driven by its own task.
//!
//! A `yamux::Connection` only makes progress while someone polls it, and it hands out streams
//! from the same `&mut` it needs for I/O. [`Session::spawn`] moves it into a driver task that
//! does both: it serves requests to open streams, passes inbound streams to an [`Incoming`]
//! queue, and keeps the I/O going. Callers hold cheap [`Session`] handles.
//!
//! The number of live streams (both directions) is bounded by a semaphore that shroud checks
//! *before* asking yamux for a stream: yamux treats going over its own limit as a fatal
//! connection error, which would take every other stream down with it.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt as _, TokioAsyncReadCompatExt as _};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::coalesce::{Coalesce, Cork};

/// Which end of the tunnel this is. The client opens the connection (and the control stream);
/// the proxy opens the data streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The shroud client.
    Client,
    /// The proxy.
    Proxy,
}

/// Tunables of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Most streams alive at once, in both directions together.
    pub max_streams: usize,
    /// Most inbound streams waiting for [`Incoming::accept`]; more are reset.
    pub accept_backlog: usize,
    /// Most bytes one stream may hold received but not yet read: the cap on its yamux receive
    /// window. Clamped to [`MIN_STREAM_BUFFER`]..=[`MAX_STREAM_BUFFER`]; see
    /// [`connection_receive_window`] for what it does and does not bound.
    pub stream_buffer: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_streams: 4096,
            accept_backlog: 1024,
            stream_buffer: DEFAULT_STREAM_BUFFER,
        }
    }
}

/// The smallest per-stream buffer: yamux's initial stream window (256 KiB), which the yamux
/// spec fixes and rust-yamux never shrinks below.
pub const MIN_STREAM_BUFFER: usize = yamux::DEFAULT_CREDIT as usize;
/// The default per-stream buffer: the largest, so that one stream over a long path (Tor's
/// round trips are hundreds of milliseconds) is not held to 256 KiB per round trip. It costs
/// little: growth comes from one pool per session (see [`connection_receive_window`]), so a
/// session holds at most this much beyond 256 KiB per stream, and only while its peer sends
/// faster than the data is passed on.
pub const DEFAULT_STREAM_BUFFER: usize = MAX_STREAM_BUFFER;
/// The largest per-stream buffer accepted: 16 MiB, a window that fills 1 Gbit/s at 130 ms.
pub const MAX_STREAM_BUFFER: usize = 16 * 1024 * 1024;

/// The yamux connection receive window for a session of `max_streams` streams whose streams
/// may each hold `stream_buffer` bytes.
///
/// rust-yamux 0.14 gives every stream a 256 KiB receive window and grows (never shrinks) the
/// window of a stream that is read quickly, towards the bandwidth-delay product. The only cap
/// it offers is on the sum over the connection: each stream keeps its 256 KiB, and growth
/// comes out of a pool of what the connection window leaves above `streams × 256 KiB`. Making
/// that pool `stream_buffer − 256 KiB` caps any one stream's window at `stream_buffer`, and the
/// whole session's at `streams × 256 KiB + (stream_buffer − 256 KiB)`; at the minimum no
/// window grows at all.
///
/// What this bounds: bytes the peer may send on a stream that the local side has not read (a
/// peer that sends more breaks the protocol and the session ends). What it does not bound:
/// frames the local side has written and yamux has queued for the connection, up to about 11
/// frames of 16 KiB per stream and never beyond the peer's window; and whatever the caller
/// buffers itself (see [`copy_buffer_len`]).
pub fn connection_receive_window(max_streams: usize, stream_buffer: usize) -> usize {
    let stream_buffer = stream_buffer.clamp(MIN_STREAM_BUFFER, MAX_STREAM_BUFFER);
    let streams = max_streams.saturating_add(YAMUX_STREAM_HEADROOM);
    streams
        .saturating_mul(MIN_STREAM_BUFFER)
        .saturating_add(stream_buffer - MIN_STREAM_BUFFER)
}

/// The copy buffer, per direction, for splicing a stream whose buffer is `stream_buffer`
/// bytes onto a socket: about a sixteenth of it, within 16 KiB..=64 KiB, less a yamux frame
/// header. Splicing one stream thus holds at most `stream_buffer` in the yamux window plus
/// twice this in copy buffers.
///
/// A full read of this many bytes goes out as one yamux frame that fills whole TLS records:
/// with a round 64 KiB it went out as a frame of [`FRAME_BODY`] bytes and one of 12, which cost
/// a frame, a hand-off to the session task and a TLS record of their own for every 64 KiB.
pub fn copy_buffer_len(stream_buffer: usize) -> usize {
    (stream_buffer / 16).clamp(TLS_RECORD, FRAME_BODY + YAMUX_HEADER) - YAMUX_HEADER
}

/// The most plaintext one TLS record carries.
const TLS_RECORD: usize = 16 * 1024;
/// yamux's frame header.
const YAMUX_HEADER: usize = 12;
/// The longest frame body written: a frame with its header fills four TLS records. Larger
/// frames than yamux's 16 KiB default mean fewer hand-offs between a stream and the session's
/// task per byte; still small enough that one stream's burst delays another's by well under a
/// millisecond at the speeds a proxy sees.
const FRAME_BODY: usize = 4 * TLS_RECORD - YAMUX_HEADER;

/// Streams yamux may have beyond ours, so that its own limit (fatal to the whole connection
/// when crossed) never fires before the semaphore refuses.
const YAMUX_STREAM_HEADROOM: usize = 16;

/// Why a stream could not be opened, or why a session ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    /// The session is closed or closing.
    #[error("session closed")]
    Closed,
    /// [`SessionConfig::max_streams`] streams are already open.
    #[error("too many streams open on this session")]
    TooManyStreams,
    /// yamux reported an error.
    #[error("multiplexer error: {0}")]
    Mux(String),
}

enum Command {
    Open(oneshot::Sender<Result<yamux::Stream, SessionError>>),
    Close,
}

/// A handle to a running session. Cloning it is cheap; the session ends when [`Session::close`]
/// is called, when the peer or the connection goes away, or when every handle is dropped.
#[derive(Clone)]
pub struct Session {
    commands: mpsc::Sender<Command>,
    permits: Arc<Semaphore>,
    max_streams: usize,
    closed: CancellationToken,
    unresponsive: Arc<AtomicBool>,
}

/// Streams the peer opened, in the order it opened them.
pub struct Incoming {
    streams: mpsc::Receiver<MuxStream>,
}

impl Incoming {
    /// The next stream the peer opened; `None` once the session has ended.
    pub async fn accept(&mut self) -> Option<MuxStream> {
        self.streams.recv().await
    }
}

impl Session {
    /// Starts a session over `io` (an established, protected connection) on the current tokio
    /// runtime.
    pub fn spawn<T>(io: T, role: Role, config: SessionConfig) -> (Session, Incoming)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        // Leave yamux a little room above our own limit so that its fatal check never fires.
        let yamux_streams = config.max_streams.saturating_add(YAMUX_STREAM_HEADROOM);
        let mut yamux_config = yamux::Config::default();
        // Each setter asserts window >= streams * 256 KiB, so lift the window cap first.
        yamux_config.set_max_connection_receive_window(None);
        yamux_config.set_max_num_streams(yamux_streams);
        yamux_config.set_max_connection_receive_window(Some(connection_receive_window(
            config.max_streams,
            config.stream_buffer,
        )));
        let mode = match role {
            Role::Client => yamux::Mode::Client,
            Role::Proxy => yamux::Mode::Server,
        };
        // yamux writes a frame's 12-byte header and its body as two writes. Coalesce hands
        // them to TLS as one, so a frame of [`FRAME_BODY`] bytes fills whole TLS records, and
        // sends what one turn of the driver wrote as one write.
        yamux_config.set_split_send_size(FRAME_BODY);
        let cork = Arc::new(Cork::default());
        let io = Coalesce::new(io, cork.clone());
        let connection = yamux::Connection::new(io.compat(), yamux_config, mode);

        let (commands, command_rx) = mpsc::channel(64);
        let (incoming_tx, incoming_rx) = mpsc::channel(config.accept_backlog.max(1));
        let permits = Arc::new(Semaphore::new(config.max_streams));
        let closed = CancellationToken::new();
        let driver = Driver {
            connection,
            cork,
            commands: command_rx,
            incoming: incoming_tx,
            permits: permits.clone(),
            pending_open: None,
            closing: false,
            resets: ResetLog::default(),
        };
        let done = closed.clone();
        tokio::spawn(async move {
            match driver.run().await {
                Ok(()) => debug!("session ended"),
                Err(err) => debug!(%err, "session ended with an error"),
            }
            done.cancel();
        });
        let session = Session {
            commands,
            permits,
            max_streams: config.max_streams,
            closed,
            unresponsive: Arc::new(AtomicBool::new(false)),
        };
        let incoming = Incoming {
            streams: incoming_rx,
        };
        (session, incoming)
    }

    /// Opens a new stream to the peer.
    ///
    /// Fails at once when the stream limit is reached. Otherwise waits while the peer has 256
    /// streams unacknowledged (yamux's backpressure): callers put a deadline on it.
    pub async fn open(&self) -> Result<MuxStream, SessionError> {
        let permit = self
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.closed_or(SessionError::TooManyStreams))?;
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Open(reply))
            .await
            .map_err(|_| SessionError::Closed)?;
        let stream = answer.await.map_err(|_| SessionError::Closed)??;
        Ok(MuxStream::new(stream, permit))
    }

    fn closed_or(&self, err: SessionError) -> SessionError {
        if self.is_closed() {
            SessionError::Closed
        } else {
            err
        }
    }

    /// Starts closing the session: no new streams, and yamux tells the peer. Streams already
    /// open see an error or end of stream. Returns at once; see [`Session::closed`].
    pub fn close(&self) {
        // If the queue is full the driver is busy; a dropped command would leave the session
        // open, so fall back to waiting for room on a spawned task.
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.commands.try_send(Command::Close) {
            let commands = self.commands.clone();
            tokio::spawn(async move { commands.send(cmd).await });
        }
    }

    /// Resolves once the session has ended, for whatever reason.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Notes whether the peer seems not to be answering (a stream it should have acknowledged
    /// by now, say), for those choosing between sessions. It changes nothing in the session.
    pub fn set_unresponsive(&self, unresponsive: bool) {
        self.unresponsive.store(unresponsive, Ordering::Relaxed);
    }

    /// What [`Session::set_unresponsive`] last noted, on any handle of this session.
    pub fn is_unresponsive(&self) -> bool {
        self.unresponsive.load(Ordering::Relaxed)
    }

    /// Whether every stream this session may hold is open, so that opening another would fail.
    pub fn is_full(&self) -> bool {
        self.permits.available_permits() == 0
    }

    /// Whether `self` and `other` are handles to the same session.
    pub fn same_session(&self, other: &Session) -> bool {
        Arc::ptr_eq(&self.permits, &other.permits)
    }

    /// How many streams are open now, in both directions.
    pub fn open_streams(&self) -> usize {
        self.max_streams - self.permits.available_permits()
    }
}

struct Driver<T> {
    connection: yamux::Connection<T>,
    /// Held while yamux turns, so that what it writes leaves as one write.
    cork: Arc<Cork>,
    commands: mpsc::Receiver<Command>,
    incoming: mpsc::Sender<MuxStream>,
    permits: Arc<Semaphore>,
    pending_open: Option<oneshot::Sender<Result<yamux::Stream, SessionError>>>,
    closing: bool,
    resets: ResetLog,
}

/// Warns about inbound streams reset for want of room, without a line per stream: a peer over
/// the limit may open thousands.
#[derive(Default)]
struct ResetLog {
    last_warning: Option<std::time::Instant>,
    unreported: u64,
}

impl ResetLog {
    /// How often at most a warning is written.
    const EVERY: std::time::Duration = std::time::Duration::from_secs(60);

    fn reset(&mut self, why: &'static str) {
        self.unreported += 1;
        if self
            .last_warning
            .is_some_and(|at| at.elapsed() < Self::EVERY)
        {
            return;
        }
        warn!(
            streams = self.unreported,
            "{why}; resetting new inbound streams (at most one warning a minute)"
        );
        self.last_warning = Some(std::time::Instant::now());
        self.unreported = 0;
    }
}

impl<T> Driver<T>
where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    async fn run(mut self) -> Result<(), yamux::ConnectionError> {
        let result = poll_fn(|cx| self.poll(cx)).await;
        // Wake any caller still waiting to open a stream.
        if let Some(reply) = self.pending_open.take() {
            let _ = reply.send(Err(SessionError::Closed));
        }
        self.commands.close();
        while let Ok(Command::Open(reply)) = self.commands.try_recv() {
            let _ = reply.send(Err(SessionError::Closed));
        }
        result
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), yamux::ConnectionError>> {
        self.cork.hold();
        let turn = self.poll_turn(cx);
        if self.cork.release() && turn.is_pending() {
            // What yamux flushed during the turn is still buffered. It flushes at every step
            // of its loop, so one more turn, with the cork off, writes it out (and serves
            // anything that came meanwhile).
            return self.poll_turn(cx);
        }
        turn
    }

    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), yamux::ConnectionError>> {
        if !self.closing {
            if let Poll::Ready(Err(err)) = self.poll_commands(cx) {
                return Poll::Ready(Err(err));
            }
        }
        if self.closing {
            return self.connection.poll_close(cx);
        }
        loop {
            match self.connection.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => self.deliver(stream),
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Err(err)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Serves open and close requests until none is ready, or yamux makes us wait.
    fn poll_commands(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), yamux::ConnectionError>> {
        loop {
            if self.pending_open.is_none() {
                match self.commands.poll_recv(cx) {
                    Poll::Ready(Some(Command::Open(reply))) => self.pending_open = Some(reply),
                    Poll::Ready(Some(Command::Close)) | Poll::Ready(None) => {
                        self.closing = true;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            let Some(reply) = self.pending_open.take() else {
                continue;
            };
            if reply.is_closed() {
                continue; // The caller gave up (its deadline passed).
            }
            match self.connection.poll_new_outbound(cx) {
                Poll::Ready(Ok(stream)) => {
                    // If the caller went away meanwhile, dropping the stream resets it.
                    let _ = reply.send(Ok(stream));
                }
                Poll::Ready(Err(err)) => {
                    let _ = reply.send(Err(SessionError::Mux(err.to_string())));
                    return Poll::Ready(Err(err));
                }
                Poll::Pending => {
                    self.pending_open = Some(reply);
                    return Poll::Pending;
                }
            }
        }
    }

    fn deliver(&mut self, stream: yamux::Stream) {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.resets
                .reset("the peer opened more streams than allowed");
            return;
        };
        match self.incoming.try_send(MuxStream::new(stream, permit)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.resets.reset("the inbound stream backlog is full");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!("nobody accepts inbound streams; resetting the new stream");
            }
        }
    }
}

/// One multiplexed stream, with tokio's I/O traits. Shutting down its write side sends a FIN
/// (half-close); dropping it without a shutdown resets it. It holds one slot of the session's
/// stream limit until dropped.
pub struct MuxStream {
    inner: Compat<yamux::Stream>,
    _permit: OwnedSemaphorePermit,
}

impl MuxStream {
    fn new(stream: yamux::Stream, permit: OwnedSemaphorePermit) -> Self {
        Self {
            inner: stream.compat(),
            _permit: permit,
        }
    }
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MuxStream({})", self.inner.get_ref().id())
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair(config: SessionConfig) -> ((Session, Incoming), (Session, Incoming)) {
        let (a, b) = tokio::io::duplex(4096);
        (
            Session::spawn(a, Role::Client, config.clone()),
            Session::spawn(b, Role::Proxy, config),
        )
    }

    #[tokio::test]
    async fn streams_carry_bytes_and_half_close_both_ways() {
        let ((client, _client_in), (_proxy, mut proxy_in)) = pair(SessionConfig::default());
        let mut out = client.open().await.expect("open");
        out.write_all(b"ping").await.expect("write");
        out.shutdown().await.expect("shutdown");
        let mut inbound = proxy_in.accept().await.expect("inbound stream");
        let mut got = Vec::new();
        inbound.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"ping");
        // The other direction still works after the first one was closed.
        inbound.write_all(b"pong").await.expect("write back");
        inbound.shutdown().await.expect("shutdown back");
        let mut back = Vec::new();
        out.read_to_end(&mut back).await.expect("read back");
        assert_eq!(back, b"pong");
    }

    /// Counts the writes that reach the transport.
    struct CountWrites<T> {
        inner: T,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for CountWrites<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for CountWrites<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Over Tor, two small writes in a row wait in the relays (Nagle's algorithm against a
    /// delayed acknowledgement), so what the session has to send at one time leaves as one
    /// write: here, the first frames of two streams.
    #[tokio::test]
    async fn frames_ready_at_once_leave_in_one_write() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = CountWrites {
            inner: a,
            writes: writes.clone(),
        };
        let (proxy, _proxy_in) = Session::spawn(counted, Role::Proxy, SessionConfig::default());
        let (_client, mut client_in) = Session::spawn(b, Role::Client, SessionConfig::default());
        let mut first = proxy.open().await.expect("open");
        let mut second = proxy.open().await.expect("open");
        // Let yamux's opening Ping and its Pong go by.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let before = writes.load(Ordering::Relaxed);
        // On this single-threaded runtime the session's task runs only after both writes.
        first.write_all(b"first").await.expect("write");
        second.write_all(b"second").await.expect("write");
        for expected in [&b"first"[..], b"second"] {
            let mut inbound = client_in.accept().await.expect("inbound stream");
            let mut got = vec![0; expected.len()];
            inbound.read_exact(&mut got).await.expect("read");
            assert_eq!(got, expected);
        }
        assert_eq!(writes.load(Ordering::Relaxed) - before, 1);
    }

    #[tokio::test]
    async fn stream_limit_fails_fast_and_frees_on_drop() {
        let config = SessionConfig {
            max_streams: 2,
            accept_backlog: 8,
            ..SessionConfig::default()
        };
        let ((client, _c), (_proxy, _p)) = pair(config);
        let first = client.open().await.expect("first");
        let _second = client.open().await.expect("second");
        assert!(matches!(
            client.open().await,
            Err(SessionError::TooManyStreams)
        ));
        assert_eq!(client.open_streams(), 2);
        drop(first);
        assert!(client.open().await.is_ok());
    }

    #[test]
    fn stream_buffer_sets_the_growth_pool_and_is_clamped() {
        let base = (10 + YAMUX_STREAM_HEADROOM) * MIN_STREAM_BUFFER;
        assert_eq!(connection_receive_window(10, MIN_STREAM_BUFFER), base);
        assert_eq!(
            connection_receive_window(10, 1024 * 1024),
            base + 768 * 1024
        );
        // Below the yamux minimum means the minimum; above the cap means the cap.
        assert_eq!(connection_receive_window(10, 1), base);
        assert_eq!(
            connection_receive_window(10, usize::MAX),
            base + MAX_STREAM_BUFFER - MIN_STREAM_BUFFER
        );
        assert_eq!(copy_buffer_len(MIN_STREAM_BUFFER), 16 * 1024 - 12);
        assert_eq!(copy_buffer_len(512 * 1024), 32 * 1024 - 12);
        assert_eq!(copy_buffer_len(MAX_STREAM_BUFFER), FRAME_BODY);
    }

    /// Writes `chunk` to `stream` until a write waits `wait_ms` (the peer's window is spent) or
    /// `limit` bytes went out; returns the bytes written.
    async fn write_until_held(
        stream: &mut MuxStream,
        chunk: &[u8],
        limit: usize,
        wait_ms: u64,
    ) -> usize {
        let wait = std::time::Duration::from_millis(wait_ms);
        let mut written = 0;
        while written < limit {
            match tokio::time::timeout(wait, stream.write_all(chunk)).await {
                Ok(result) => {
                    result.expect("write");
                    written += chunk.len();
                }
                Err(_) => break,
            }
        }
        written
    }

    /// A stream nobody reads holds at most its window: the writer is held back after 256 KiB,
    /// and the session (and its other streams) carry on.
    #[tokio::test]
    async fn an_unread_stream_holds_at_most_its_window() {
        let ((client, _c), (_proxy, mut proxy_in)) = pair(SessionConfig::default());
        let mut unread = client.open().await.expect("open");
        let chunk = vec![7u8; 16 * 1024];
        let written = write_until_held(&mut unread, &chunk, 2 * MIN_STREAM_BUFFER, 300).await;
        assert!(written >= MIN_STREAM_BUFFER - chunk.len(), "{written}");
        assert!(written <= MIN_STREAM_BUFFER, "{written} bytes buffered");
        let _held = proxy_in.accept().await.expect("the unread stream");
        // Another stream still works.
        let mut other = client.open().await.expect("open another");
        other.write_all(b"x").await.expect("write");
        other.shutdown().await.expect("shutdown");
        let mut inbound = proxy_in.accept().await.expect("second stream");
        let mut got = Vec::new();
        inbound.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"x");
    }

    /// Copies `from` to `to` at about `bytes_per_sec`, each read's length worth of time after
    /// it: a link where a yamux ping (12 bytes) comes back at once and a window's worth of
    /// data takes a while, as on a Tor circuit whose queues fill under load.
    async fn paced_copy<R, W>(mut from: R, mut to: W, bytes_per_sec: u64)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let pause = std::time::Duration::from_micros(n as u64 * 1_000_000 / bytes_per_sec);
            tokio::time::sleep(pause).await;
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// The windows of a tunnel's streams grow when the data's round trip is longer than the
    /// ping's. yamux grows a window whose sender used half of it within two round trips, and
    /// takes the round trip from one ping, taken here at once over an idle link (well under a
    /// millisecond), while 128 KiB take 13 ms to cross. Upstream's rule never grows this
    /// stream's window; third_party/yamux takes the round trip as at least 50 ms, and does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tunnel_windows_grow_after_an_idle_ping() {
        let (client_io, client_link) = tokio::io::duplex(64 * 1024);
        let (proxy_link, proxy_io) = tokio::io::duplex(64 * 1024);
        let (client_read, client_write) = tokio::io::split(client_link);
        let (proxy_read, proxy_write) = tokio::io::split(proxy_link);
        // Data from client to proxy at 10 MB/s; the proxy's window updates and pongs at once.
        let forward = tokio::spawn(paced_copy(client_read, proxy_write, 10_000_000));
        let back = tokio::spawn(async move {
            let (mut from, mut to) = (proxy_read, client_write);
            tokio::io::copy(&mut from, &mut to).await
        });
        let (client, _c) = Session::spawn(client_io, Role::Client, SessionConfig::default());
        let (_proxy, mut proxy_in) =
            Session::spawn(proxy_io, Role::Proxy, SessionConfig::default());

        // A 2 MiB transfer, read as it comes: the proxy's window for the stream grows.
        let mut out = client.open().await.expect("open");
        let chunk = vec![7u8; 16 * 1024];
        let total = 2 * 1024 * 1024;
        let writer = tokio::spawn(async move {
            for _ in 0..total / chunk.len() {
                out.write_all(&chunk).await.expect("write");
            }
            (out, chunk)
        });
        let mut inbound = proxy_in.accept().await.expect("inbound stream");
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0;
        while read < total {
            let n = inbound.read(&mut buf).await.expect("read");
            assert!(n > 0, "the stream ended after {read} bytes");
            read += n;
        }
        let (mut out, chunk) = writer.await.expect("writer");

        // Now nobody reads: the writer may send what the window allows, no more.
        let written = write_until_held(&mut out, &chunk, MAX_STREAM_BUFFER, 500).await;
        assert!(
            written >= 2 * MIN_STREAM_BUFFER,
            "the window stayed near yamux's initial 256 KiB: {written} bytes sent unread"
        );
        forward.abort();
        back.abort();
    }

    #[tokio::test]
    async fn close_ends_both_sides() {
        let ((client, _c), (proxy, mut proxy_in)) = pair(SessionConfig::default());
        client.close();
        client.closed().await;
        proxy.closed().await;
        assert!(proxy_in.accept().await.is_none());
        assert!(matches!(client.open().await, Err(SessionError::Closed)));
    }

    #[tokio::test]
    async fn dropping_the_transport_ends_the_session() {
        let (a, b) = tokio::io::duplex(1024);
        let (client, _incoming) = Session::spawn(a, Role::Client, SessionConfig::default());
        drop(b);
        client.closed().await;
        assert!(client.is_closed());
    }

    /// Streams the peer opens while nobody accepts wait in the backlog, in order and with their
    /// bytes (the client counts on it while it hands a draining session to a task of its own);
    /// one beyond the backlog is reset at once rather than left hanging.
    #[tokio::test]
    async fn unaccepted_streams_wait_in_the_backlog_and_one_beyond_it_is_reset() {
        let config = SessionConfig {
            accept_backlog: 2,
            ..SessionConfig::default()
        };
        let ((_client, mut client_in), (proxy, _proxy_in)) = pair(config);
        let mut opened = Vec::new();
        for i in 0..3u8 {
            let mut stream = proxy.open().await.expect("open");
            stream.write_all(&[i]).await.expect("write");
            opened.push(stream);
        }
        // Its opener reads the reset as the end of the stream.
        let mut third = opened.pop().expect("three streams");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), third.read(&mut buf));
        assert_eq!(read.await.expect("reset in time").expect("read"), 0);
        for i in 0..2u8 {
            let mut waiting = client_in.accept().await.expect("a waiting stream");
            waiting.read_exact(&mut buf).await.expect("its byte");
            assert_eq!(buf[0], i);
        }
    }
}
