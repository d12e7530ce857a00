//! Keeps yamux's frame headers in the same TLS record as their bodies.
//!
//! yamux writes each frame as two writes, its 12-byte header and then its body. Straight onto
//! a TLS stream, every header became a TLS record of its own (and, with rustls writing records
//! out as they are made, a syscall of its own). [`HeaderJoin`] holds a short write back and
//! hands it to the TLS stream together with the next write as one vectored write, which rustls
//! packs into the same records without copying either part first.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes of at most this many bytes are held back to go out with the next one.
const HELD: usize = 32;

/// A byte stream whose short writes wait for the next write or a flush.
pub(crate) struct HeaderJoin<T> {
    inner: T,
    held: [u8; HELD],
    /// `held[start..end]` is waiting to be written.
    start: usize,
    end: usize,
}

impl<T> HeaderJoin<T> {
    pub(crate) fn new(inner: T) -> Self {
        Self {
            inner,
            held: [0; HELD],
            start: 0,
            end: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> HeaderJoin<T> {
    /// Writes out what is held.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.start < self.end {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.start..self.end]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.start += n;
        }
        self.start = 0;
        self.end = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeaderJoin<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.end + buf.len() <= HELD {
            // Short: hold it for the next write (a header waiting for its body).
            this.held[this.end..this.end + buf.len()].copy_from_slice(buf);
            this.end += buf.len();
            return Poll::Ready(Ok(buf.len()));
        }
        while this.start < this.end {
            let slices = [
                IoSlice::new(&this.held[this.start..this.end]),
                IoSlice::new(buf),
            ];
            let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let held = this.end - this.start;
            if n > held {
                this.start = 0;
                this.end = 0;
                return Poll::Ready(Ok(n - held));
            }
            // Only (part of) what was held went out; `buf` is not written yet.
            this.start += n;
        }
        this.start = 0;
        this.end = 0;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_held(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeaderJoin<T> {
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

    #[tokio::test]
    async fn a_header_goes_out_with_its_body() {
        let mut join = HeaderJoin::new(Recorder {
            writes: Vec::new(),
            step: usize::MAX,
        });
        join.write_all(&[1; 12]).await.unwrap();
        assert!(join.inner.writes.is_empty(), "the header was written alone");
        join.write_all(&[2; 1000]).await.unwrap();
        assert_eq!(join.inner.writes.len(), 1);
        assert_eq!(join.inner.writes[0].len(), 1012);
        // A header with no body (a window update) goes out on flush.
        join.write_all(&[3; 12]).await.unwrap();
        join.flush().await.unwrap();
        assert_eq!(join.inner.writes.len(), 2);
        assert_eq!(join.inner.writes[1], vec![3; 12]);
    }

    #[tokio::test]
    async fn partial_writes_keep_every_byte_in_order() {
        for step in [1, 5, 12, 13, 100] {
            let mut join = HeaderJoin::new(Recorder {
                writes: Vec::new(),
                step,
            });
            let mut expected = Vec::new();
            for round in 0..20u8 {
                let header = [round; 12];
                let body: Vec<u8> = (0..(round as usize * 37 + 40)).map(|i| i as u8).collect();
                join.write_all(&header).await.unwrap();
                join.write_all(&body).await.unwrap();
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
        let mut join = HeaderJoin::new(near);
        far.write_all(b"hello").await.unwrap();
        let mut got = [0; 5];
        join.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}
