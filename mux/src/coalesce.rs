//! Sends what the session writes in one turn of its task as one write.
//!
//! yamux writes each frame as two writes, its 12-byte header and then its body, and flushes
//! after every frame; a tunnel's task often has several frames to send at once (a Ping before
//! the first frame after ten idle seconds, a Pong, window updates, small frames of several
//! streams). Straight onto a TLS stream, each write became a TLS record and each flush a
//! syscall; over Tor, each became a write of its own in every relay, and the relays' Nagle
//! algorithm holds back a small write that follows another until the next relay acknowledges
//! the first, which it delays by 40 ms or more when it has nothing to send back. [`Coalesce`]
//! copies short writes into a buffer of its own, hands a long write to the TLS stream together
//! with what is buffered as one vectored write (rustls packs both into the same records without
//! copying either first), and, while its [`Cork`] is held, puts flushes off: the session's
//! driver holds it for one turn of the yamux connection and flushes once after.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes that fit in the buffer beside what it holds are copied into it; a longer write goes
/// out at once with what is buffered. A session's frames of data are up to 64 KiB: those are
/// not copied.
const BUFFERED: usize = 16 * 1024;

/// After a flush, a buffer that grew past this is given back, so an idle tunnel holds little.
const KEPT: usize = 1024;

/// Whether flushes of a [`Coalesce`] are put off, and whether one was.
#[derive(Debug, Default)]
pub(crate) struct Cork {
    held: AtomicBool,
    flush_put_off: AtomicBool,
}

impl Cork {
    /// Puts flushes off until [`Cork::release`].
    pub(crate) fn hold(&self) {
        self.held.store(true, Ordering::Relaxed);
    }

    /// Lets flushes through again. Returns whether one was put off meanwhile: the bytes are
    /// still buffered, and the next flush writes them.
    pub(crate) fn release(&self) -> bool {
        self.held.store(false, Ordering::Relaxed);
        self.flush_put_off.swap(false, Ordering::Relaxed)
    }
}

/// A byte stream whose writes wait in a buffer for a long write or a flush the [`Cork`] lets
/// through.
pub(crate) struct Coalesce<T> {
    inner: T,
    cork: Arc<Cork>,
    /// `buf[start..]` is waiting to be written.
    buf: Vec<u8>,
    start: usize,
}

impl<T> Coalesce<T> {
    pub(crate) fn new(inner: T, cork: Arc<Cork>) -> Self {
        Self {
            inner,
            cork,
            buf: Vec::new(),
            start: 0,
        }
    }

    fn waiting(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn clear(&mut self) {
        self.start = 0;
        if self.buf.capacity() > KEPT {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes out what is buffered.
    fn poll_write_buffered(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.start < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.start..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.start += n;
        }
        self.clear();
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.waiting().len() + buf.len() <= BUFFERED {
            // Short: keep it for the next long write or flush (a header waiting for its body,
            // a Ping, a small frame).
            if this.start > 0 {
                this.buf.drain(..this.start);
                this.start = 0;
            }
            // At least KEPT at a time: a turn's headers and small frames take one allocation.
            this.buf.reserve(buf.len().max(KEPT));
            this.buf.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        while this.start < this.buf.len() {
            let slices = [IoSlice::new(&this.buf[this.start..]), IoSlice::new(buf)];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let buffered = this.waiting().len();
            if n > buffered {
                this.clear();
                return Poll::Ready(Ok(n - buffered));
            }
            // Only (part of) what was buffered went out; `buf` is not written yet.
            this.start += n;
        }
        this.clear();
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.cork.held.load(Ordering::Relaxed) {
            this.cork.flush_put_off.store(true, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_write_buffered(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_buffered(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Records every write the inner stream was asked for, accepting at most `step` bytes at
    /// a time, so partial vectored writes happen.
    struct Recorder {
        writes: Vec<Vec<u8>>,
        step: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let n = buf.len().min(this.step);
            this.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = joined.len().min(this.step);
            this.writes.push(joined[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn recorder(step: usize) -> (Coalesce<Recorder>, Arc<Cork>) {
        let cork = Arc::new(Cork::default());
        let inner = Recorder {
            writes: Vec::new(),
            step,
        };
        (Coalesce::new(inner, cork.clone()), cork)
    }

    #[tokio::test]
    async fn a_header_goes_out_with_its_body() {
        let (mut join, _) = recorder(usize::MAX);
        join.write_all(&[1; 12]).await.unwrap();
        assert!(join.inner.writes.is_empty(), "the header was written alone");
        // A long body goes out at once, with its header, as one write.
        join.write_all(&[2; 40_000]).await.unwrap();
        assert_eq!(join.inner.writes.len(), 1);
        assert_eq!(join.inner.writes[0].len(), 40_012);
        // A short frame, and a header with no body (a window update), go out on flush.
        join.write_all(&[3; 12]).await.unwrap();
        join.write_all(&[4; 300]).await.unwrap();
        join.write_all(&[5; 12]).await.unwrap();
        assert_eq!(join.inner.writes.len(), 1);
        join.flush().await.unwrap();
        assert_eq!(join.inner.writes.len(), 2);
        assert_eq!(join.inner.writes[1].len(), 324);
    }

    #[tokio::test]
    async fn while_the_cork_is_held_flushes_wait_and_one_write_carries_them_all() {
        let (mut join, cork) = recorder(usize::MAX);
        cork.hold();
        // A Ping, then two small frames, each flushed, as yamux does in one turn.
        join.write_all(&[1; 12]).await.unwrap();
        join.flush().await.unwrap();
        for body in [[2u8; 12].as_slice(), &[3; 200], &[4; 12], &[5; 3000]] {
            join.write_all(body).await.unwrap();
            join.flush().await.unwrap();
        }
        assert!(
            join.inner.writes.is_empty(),
            "a flush went through the cork"
        );
        assert!(cork.release(), "the cork must report the flush it put off");
        assert!(!cork.release(), "reported once");
        join.flush().await.unwrap();
        assert_eq!(join.inner.writes.len(), 1);
        assert_eq!(join.inner.writes[0].len(), 12 + 12 + 200 + 12 + 3000);
        // An idle tunnel does not keep a grown buffer.
        assert_eq!(join.buf.capacity(), 0);
    }

    #[tokio::test]
    async fn partial_writes_keep_every_byte_in_order() {
        for step in [1, 5, 12, 13, 100, 5000] {
            let (mut join, cork) = recorder(step);
            let mut expected = Vec::new();
            for round in 0..20u8 {
                let header = [round; 12];
                // Short bodies and long ones (past the buffer) in turn.
                let len = usize::from(round) * 1_900 + 40;
                let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
                if round % 3 == 0 {
                    cork.hold();
                }
                join.write_all(&header).await.unwrap();
                join.write_all(&body).await.unwrap();
                join.flush().await.unwrap();
                cork.release();
                expected.extend_from_slice(&header);
                expected.extend_from_slice(&body);
            }
            join.write_all(b"tail").await.unwrap();
            join.shutdown().await.unwrap();
            expected.extend_from_slice(b"tail");
            let written: Vec<u8> = join.inner.writes.concat();
            assert!(written == expected, "bytes altered with step {step}");
        }
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut join = Coalesce::new(near, Arc::new(Cork::default()));
        far.write_all(b"hello").await.unwrap();
        let mut got = [0; 5];
        join.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}
