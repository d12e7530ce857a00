//! Bytes read to route a connection, and a stream that first yields them again.
//!
//! The proxy reads a ClientHello or HTTP head to decide where a connection goes
//! ([`read_more`] is how both sniffers read), and the client reads a visitor's ClientHello to
//! tell a certificate authority's validation from a visitor. Those bytes must then reach
//! whoever handles the connection: a TLS acceptor ([`Replay`]), or the stream they are written
//! onto directly.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

/// Most bytes a sniffer asks for in one read.
const READ_CHUNK: usize = 4096;

/// What [`read_more`] got.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadMore {
    /// This many bytes (at least one) were appended.
    Read(usize),
    /// `buf` already holds `max_len` bytes; nothing was read.
    Full,
    /// The peer closed the connection.
    Eof,
}

/// Appends what `io` has next to `buf`, at most 4 KiB (`READ_CHUNK`) and never past `max_len`
/// in all. On an error `buf` is left as it was.
pub async fn read_more<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    max_len: usize,
) -> io::Result<ReadMore> {
    let room = max_len.saturating_sub(buf.len()).min(READ_CHUNK);
    if room == 0 {
        return Ok(ReadMore::Full);
    }
    let filled = buf.len();
    buf.resize(filled + room, 0);
    let read = io.read(&mut buf[filled..]).await;
    buf.truncate(filled + *read.as_ref().unwrap_or(&0));
    match read? {
        0 => Ok(ReadMore::Eof),
        n => Ok(ReadMore::Read(n)),
    }
}

/// `inner`, with `prefix` read first.
#[derive(Debug)]
pub struct Replay<S> {
    prefix: Vec<u8>,
    offset: usize,
    inner: S,
}

impl<S> Replay<S> {
    /// Wraps `inner` so that reads return `prefix` before anything from `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            offset: 0,
            inner,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.offset < self.prefix.len() {
            let rest = &self.prefix[self.offset..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.offset += n;
            if self.offset == self.prefix.len() {
                self.prefix = Vec::new();
                self.offset = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
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

    #[tokio::test]
    async fn prefix_comes_first_then_the_stream() {
        let (mut far, near) = tokio::io::duplex(16);
        far.write_all(b" world").await.unwrap();
        drop(far);
        let mut replay = Replay::new(b"hello".to_vec(), near);
        let mut small = [0u8; 3];
        replay.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"hel");
        let mut rest = String::new();
        replay.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "lo world");
    }

    #[tokio::test]
    async fn read_more_appends_within_its_bound() {
        let mut source: &[u8] = b"abcdef";
        let mut buf = b"xy".to_vec();
        assert_eq!(
            read_more(&mut source, &mut buf, 5).await.unwrap(),
            ReadMore::Read(3)
        );
        assert_eq!(buf, b"xyabc");
        assert_eq!(
            read_more(&mut source, &mut buf, 5).await.unwrap(),
            ReadMore::Full
        );
        assert_eq!(
            read_more(&mut source, &mut buf, 64).await.unwrap(),
            ReadMore::Read(3)
        );
        assert_eq!(
            read_more(&mut source, &mut buf, 64).await.unwrap(),
            ReadMore::Eof
        );
        assert_eq!(buf, b"xyabcdef", "nothing is lost or padded");
    }
}
