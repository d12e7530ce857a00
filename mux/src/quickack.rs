//! Acknowledging every read at once, for sockets whose far end is a Tor relay.
//!
//! A C-tor relay writes each cell to its next hop as it comes, with Nagle's algorithm on: a
//! second small write waits in its kernel until the first is acknowledged. Linux, receiving
//! on a connection that looks interactive, delays that acknowledgement by up to 40 ms when
//! it has nothing to send back. A visitor's first bytes are exactly such a pair of small
//! writes, so on an otherwise idle connection one in a few of them waited 40 ms.
//! `TCP_QUICKACK` makes the receiver acknowledge at once; Linux clears it again as it sees
//! fit, so it is set again after every short read. Long reads need no help (Linux acknowledges
//! every second full segment of a bulk transfer anyway) and are most of a busy link's reads,
//! so the `setsockopt` costs little where bytes are many.

use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Asks the kernel to acknowledge what `socket` has received at once, and not to delay the
/// next few acknowledgements either. Does nothing off Linux, or if the option is refused (the
/// connection still works; its acknowledgements are only delayed as usual).
pub fn acknowledge_now(socket: &impl AsFd) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let _ = socket2::SockRef::from(socket).set_tcp_quickack(true);
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = socket;
}

/// Reads shorter than this set `TCP_QUICKACK` again: a few cells' worth, where a relay's Nagle
/// may be holding the rest.
pub const SHORT_READ: usize = 16 * 1024;

/// After a read of `read` bytes from `socket`: [`acknowledge_now`] if it returned data, and
/// less than [`SHORT_READ`] of it: the rule of [`QuickAck`] and of shroud_tor's links to relays.
pub fn after_read(socket: &impl AsFd, read: usize) {
    if (1..SHORT_READ).contains(&read) {
        acknowledge_now(socket);
    }
}

/// A TCP stream that acknowledges what it reads at once: [`after_read`] after every read.
#[derive(Debug)]
pub struct QuickAck<S>(S);

impl<S: AsFd> QuickAck<S> {
    /// Wraps `stream`, and acknowledges at once from here on.
    pub fn new(stream: S) -> Self {
        acknowledge_now(&stream);
        Self(stream)
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &S {
        &self.0
    }
}

impl<S: AsyncRead + AsFd + Unpin> AsyncRead for QuickAck<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.0).poll_read(cx, buf);
        after_read(&self.0, buf.filled().len() - before);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for QuickAck<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// The option is on after wrapping and after every read that returned data, though each
    /// reply written in between turns the kernel back towards delayed ACKs.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn every_read_leaves_quick_acknowledgement_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connected, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let mut far = connected.unwrap();
        let mut near = QuickAck::new(accepted.unwrap().0);
        let quick = |s: &QuickAck<tokio::net::TcpStream>| {
            socket2::SockRef::from(s.get_ref()).tcp_quickack().unwrap()
        };
        assert!(quick(&near));
        let mut buf = [0u8; 16];
        for round in 0..3u8 {
            // Writing back and forth is what turns a Linux receiver to delayed ACKs.
            far.write_all(&[round; 16]).await.unwrap();
            near.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, [round; 16]);
            assert!(quick(&near), "round {round}");
            near.write_all(&buf).await.unwrap();
            far.read_exact(&mut buf).await.unwrap();
        }
    }
}
