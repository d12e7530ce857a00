//! The runtime shroud's Arti runs on: Arti's own tokio runtime, except that every TCP
//! connection it makes to a relay has Nagle's algorithm off (`TCP_NODELAY`).
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

use arti_client::TorClient;
use async_trait::async_trait;
use tokio::net::{TcpSocket, TcpStream};
use tor_rtcompat::{
    CompoundRuntime, NetStreamProvider, PreferredRuntime, RuntimeSubstExt as _, TcpConnectOptions,
    TcpListenOptions,
};

/// The runtime shroud's Arti clients run on; see the module documentation.
pub type TorRuntime = CompoundRuntime<
    PreferredRuntime,
    PreferredRuntime,
    PreferredRuntime,
    NoDelayTcp,
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
    Ok(preferred.with_tcp_provider(NoDelayTcp(preferred.clone())))
}

/// Arti's TCP provider, with `TCP_NODELAY` set on every connection it makes.
#[derive(Clone)]
pub struct NoDelayTcp(PreferredRuntime);

/// Arti's own TCP stream type (it carries the socket options Arti sets later, such as KIST's
/// `TCP_NOTSENT_LOWAT`).
type ArtiTcpStream = <PreferredRuntime as NetStreamProvider>::Stream;

#[async_trait]
impl NetStreamProvider for NoDelayTcp {
    type Stream = ArtiTcpStream;
    type Listener = <PreferredRuntime as NetStreamProvider>::Listener;
    type ConnectOptions = TcpConnectOptions;
    type ListenOptions = TcpListenOptions;

    async fn connect(
        &self,
        addr: &SocketAddr,
        options: &TcpConnectOptions,
    ) -> io::Result<ArtiTcpStream> {
        connect(addr, options).await.map(ArtiTcpStream::from)
    }

    /// Arti as a client never listens on TCP; should it, its own listener serves.
    async fn listen(
        &self,
        addr: &SocketAddr,
        options: &TcpListenOptions,
    ) -> io::Result<Self::Listener> {
        self.0.listen(addr, options).await
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
    async fn connections_to_relays_have_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = TcpConnectOptions::default();
        let (stream, accepted) = tokio::join!(connect(&addr, &options), listener.accept());
        accepted.unwrap();
        assert!(stream.unwrap().nodelay().unwrap());
    }
}
