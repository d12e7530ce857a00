//! The runtime shroud's Arti runs on: Arti's own tokio runtime, except that every TCP
//! connection it makes to a relay has Nagle's algorithm off (`TCP_NODELAY`) and acknowledges
//! short reads at once (`TCP_QUICKACK`, see [`shroud_mux::quickack`]: the guard is a C-tor
//! relay whose small writes wait on our ACKs).
//!
//! Why: Arti writes a circuit's cells to its guard as they come, and Tor's flow control lets a
//! stream send only so far ahead of the far end's acknowledgements (SENDMEs). Under Nagle, the
//! short tail of each burst waits in the kernel until the guard acknowledges the segment before
//! it, which a Linux guard delays by up to 40 ms when it has nothing to send back; the window
//! then opens that much later. Measured on the private Tor network (shroud-tor-latency, 8 MiB
//! downloads): a tunnel moved 2.55 MB/s with Nagle and 6.66 MB/s without, and a bare Arti
//! stream 5.23 and 7.17. Cells are fixed-size and the link is TLS, so what the guard (or
//! someone watching the link) sees is the same cells in smaller segments, sent sooner.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd as _, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use arti_client::TorClient;
use async_trait::async_trait;
use futures::io::{AsyncRead, AsyncWrite};
use shroud_mux::quickack::{acknowledge_now, after_read};
use tokio::net::{TcpSocket, TcpStream};
use tor_rtcompat::{
    CompoundRuntime, NetStreamListener, NetStreamProvider, PreferredRuntime, RuntimeSubstExt as _,
    StreamOps, TcpConnectOptions, TcpListenOptions,
};

/// The runtime shroud's Arti clients run on; see the module documentation.
pub type TorRuntime = CompoundRuntime<
    PreferredRuntime,
    PreferredRuntime,
    PreferredRuntime,
    RelayTcp,
    PreferredRuntime,
    PreferredRuntime,
    PreferredRuntime,
>;

/// An Arti client as shroud's binaries run it.
pub type Tor = TorClient<TorRuntime>;

/// [`TorRuntime`] on the tokio runtime this is called from; an error outside one, as
/// [`PreferredRuntime::current`] gives.
pub fn current() -> io::Result<TorRuntime> {
    let preferred = PreferredRuntime::current()?;
    Ok(preferred.with_tcp_provider(RelayTcp))
}

/// Arti's TCP provider, with `TCP_NODELAY` set on every connection it makes, and
/// `TCP_QUICKACK` after its short reads.
#[derive(Clone)]
pub struct RelayTcp;

/// Arti's own TCP stream type (it carries the socket options Arti sets later, such as KIST's
/// `TCP_NOTSENT_LOWAT`).
type ArtiTcpStream = <PreferredRuntime as NetStreamProvider>::Stream;

#[async_trait]
impl NetStreamProvider for RelayTcp {
    type Stream = RelayStream;
    type Listener = NoListener;
    type ConnectOptions = TcpConnectOptions;
    type ListenOptions = TcpListenOptions;

    async fn connect(
        &self,
        addr: &SocketAddr,
        options: &TcpConnectOptions,
    ) -> io::Result<RelayStream> {
        let stream = connect(addr, options).await?;
        acknowledge_now(&stream);
        Ok(RelayStream {
            socket: stream.as_fd().try_clone_to_owned()?,
            stream: ArtiTcpStream::from(stream),
        })
    }

    /// Arti as a client never listens on TCP (onion services listen on circuits), so this
    /// provider refuses to rather than hand out streams without its socket options.
    async fn listen(&self, _: &SocketAddr, _: &TcpListenOptions) -> io::Result<NoListener> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "shroud's Tor runtime makes no TCP listeners",
        ))
    }
}

/// The listener [`RelayTcp::listen`] never makes.
pub enum NoListener {}

impl NetStreamListener for NoListener {
    type Stream = RelayStream;
    type Incoming = futures::stream::Pending<io::Result<(RelayStream, SocketAddr)>>;

    fn incoming(self) -> Self::Incoming {
        match self {}
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match *self {}
    }
}

/// A connection to a relay: Arti's own stream type, and a second descriptor of its socket to
/// set `TCP_QUICKACK` through (Arti's type does not lend its own).
pub struct RelayStream {
    stream: ArtiTcpStream,
    socket: OwnedFd,
}

impl AsyncRead for RelayStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(read)) = polled {
            after_read(&self.socket, read);
        }
        polled
    }
}

impl AsyncWrite for RelayStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_close(cx)
    }
}

/// KIST's `TCP_NOTSENT_LOWAT` and the rest, as Arti's own stream does them.
impl StreamOps for RelayStream {
    fn set_tcp_notsent_lowat(&self, notsent_lowat: u32) -> io::Result<()> {
        self.stream.set_tcp_notsent_lowat(notsent_lowat)
    }

    fn new_handle(&self) -> Box<dyn StreamOps + Send + Unpin> {
        self.stream.new_handle()
    }
}

/// Connects to `addr` as Arti's own provider does, with Nagle's algorithm off.
async fn connect(addr: &SocketAddr, options: &TcpConnectOptions) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // Buffer sizes only take effect when set before connecting (tcp(7)).
    let common = options.common();
    if let Some(size) = common.send_buffer_size() {
        socket.set_send_buffer_size(buffer_size(*size))?;
    }
    if let Some(size) = common.recv_buffer_size() {
        socket.set_recv_buffer_size(buffer_size(*size))?;
    }
    let stream = socket.connect(*addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A socket buffer size as the kernel takes it (sizes beyond `u32` are clamped).
fn buffer_size(size: usize) -> u32 {
    u32::try_from(size).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_to_relays_have_nagle_off_and_acknowledge_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = TcpConnectOptions::default();
        let (stream, accepted) = tokio::join!(RelayTcp.connect(&addr, &options), listener.accept());
        // Kept open: a FIN from the far end would turn the near end to delayed ACKs.
        let _far = accepted.unwrap();
        let stream = stream.unwrap();
        let socket = socket2::SockRef::from(&stream.socket);
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.tcp_quickack().unwrap());
    }

    #[tokio::test]
    async fn the_runtime_makes_no_listeners() {
        let addr = "127.0.0.1:0".parse().unwrap();
        let refused = RelayTcp.listen(&addr, &TcpListenOptions::default()).await;
        assert_eq!(refused.err().unwrap().kind(), io::ErrorKind::Unsupported);
    }
}
