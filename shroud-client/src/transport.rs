//! How the client reaches a proxy: the byte stream that TLS then runs over.
//!
//! [`Transport`] is the seam: [`DirectTransport`] dials TCP from this machine (so the proxy sees
//! its address); [`crate::tor::TorTransport`] implements the same trait through Arti. `--resolve`
//! overrides let tests and operators point a proxy's name at an address of their choosing while
//! TLS still checks the name.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use hickory_resolver::TokioResolver;
pub use shroud_process::resolve::Resolve;

/// A connected byte stream, whatever carries it.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + ?Sized> AsyncStream for T {}

/// A boxed [`AsyncStream`], as returned by [`Transport::connect`].
pub type BoxStream = Box<dyn AsyncStream>;

/// A way to open a byte stream to a proxy.
pub trait Transport: Send + Sync + 'static {
    /// Opens a stream to `host:port`. Errors say which `host:port` failed.
    fn connect<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<BoxStream>>;

    /// A short name for logs: `direct`, `tor`.
    fn name(&self) -> &'static str;

    /// A keeper of one proxy's circuit across its reconnects, for a transport that has
    /// circuits (Tor); `None` (the default) when every connection is made afresh by
    /// [`Transport::connect`].
    fn circuit(&self) -> Option<Box<dyn KeptCircuit>> {
        None
    }
}

/// One proxy's circuit, kept across that proxy's reconnects for as long as it works, so that
/// a proxy that ends its sessions costs no new circuits (see [`crate::circuits`]).
pub trait KeptCircuit: Send + Sync {
    /// Whether a circuit is held that the next [`KeptCircuit::connect`] will open its stream
    /// on; if not, that call builds a new circuit, which must be charged first. A held circuit
    /// found closed is given up here, so that the answer holds until that call.
    fn is_held(&mut self) -> bool;

    /// Opens a stream to `host:port`: on the circuit held (failing if it has closed since
    /// [`KeptCircuit::is_held`]), or else on a new one, which is then held. A failure that
    /// shows the circuit itself is bad gives it up; a refusal by the proxy's side (the exit
    /// answered, the proxy did not take the connection) keeps it.
    fn connect<'a>(&'a mut self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<BoxStream>>;

    /// Why the last circuit was given up, if one was.
    fn given_up(&self) -> Option<&str>;
}

/// Which transport to reach proxies with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// Dial proxies straight from this machine; each proxy sees this machine's address.
    Direct,
    /// Dial proxies through Tor (embedded Arti): no proxy learns this machine's address.
    Tor,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Tor => "tor",
        })
    }
}

/// Dials proxies over TCP from this machine, so each proxy sees this machine's address.
#[derive(Clone)]
pub struct DirectTransport {
    resolve: Resolve,
    connect_timeout: Duration,
    /// Where names without an override are looked up, when not the system's resolver.
    resolver: Option<TokioResolver>,
}

impl fmt::Debug for DirectTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectTransport")
            .field("resolve", &self.resolve)
            .field("connect_timeout", &self.connect_timeout)
            .field("own_resolver", &self.resolver.is_some())
            .finish()
    }
}

impl DirectTransport {
    /// A transport that honours `resolve` overrides and gives up on a proxy after
    /// `connect_timeout`, name lookup included.
    pub fn new(resolve: Resolve, connect_timeout: Duration) -> Self {
        Self {
            resolve,
            connect_timeout,
            resolver: None,
        }
    }

    /// Looks names up at `server` (`--dns-server`) instead of through the system's resolver.
    /// Overrides still come first.
    pub fn with_dns_server(
        mut self,
        server: SocketAddr,
    ) -> Result<Self, shroud_process::dns::ResolverError> {
        let try_timeout = (self.connect_timeout / 4).max(std::time::Duration::from_millis(200));
        self.resolver = Some(shroud_process::dns::resolver(
            Some(server),
            try_timeout,
            true,
        )?);
        Ok(self)
    }

    /// The addresses of `host:port`: an override, or a lookup at the configured server, or
    /// the system's lookup; an IP literal is itself.
    async fn addresses(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        if let Some(addr) = self.resolve.get(host, port) {
            return Ok(vec![addr]);
        }
        match &self.resolver {
            Some(resolver) if host.parse::<std::net::IpAddr>().is_err() => {
                let found = resolver.lookup_ip(host).await.map_err(io::Error::other)?;
                Ok(found.iter().map(|ip| SocketAddr::new(ip, port)).collect())
            }
            _ => Ok(tokio::net::lookup_host((host, port)).await?.collect()),
        }
    }

    async fn dial(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        if shroud_mux::onion::is_onion(host) {
            // Looking it up would only leak the name to a resolver.
            let err = io::Error::new(
                io::ErrorKind::Unsupported,
                "an onion address is reached only through Tor (--transport tor)",
            );
            return Err(dial_error(host, port, "cannot connect to", err));
        }
        let deadline = Instant::now() + self.connect_timeout;
        let addrs = match tokio::time::timeout_at(deadline, self.addresses(host, port)).await {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(err)) => return Err(dial_error(host, port, "could not resolve", err)),
            Err(_) => return Err(self.timed_out(host, port)),
        };
        if addrs.is_empty() {
            let err = io::Error::new(io::ErrorKind::NotFound, "the name has no addresses");
            return Err(dial_error(host, port, "could not resolve", err));
        }

        let mut last_err = None;
        for (i, addr) in addrs.iter().enumerate() {
            // Share what time is left among the addresses still to try, so that one address
            // that drops packets cannot use up the whole budget.
            let left = deadline.saturating_duration_since(Instant::now());
            let share = left / u32::try_from(addrs.len() - i).unwrap_or(u32::MAX);
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    stream.set_nodelay(true).map_err(|err| {
                        dial_error(host, port, "could not set TCP_NODELAY on", err)
                    })?;
                    return Ok(stream);
                }
                Ok(Err(err)) => {
                    tracing::debug!(%err, host, port, %addr, "could not connect to an address");
                    last_err = Some(err);
                }
                Err(_) => {
                    tracing::debug!(host, port, %addr, "timed out connecting to an address");
                }
            }
        }
        match last_err {
            Some(err) => Err(dial_error(host, port, "could not connect to", err)),
            None => Err(self.timed_out(host, port)),
        }
    }

    fn timed_out(&self, host: &str, port: u16) -> io::Error {
        let err = io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {:?}", self.connect_timeout),
        );
        dial_error(host, port, "could not connect to", err)
    }
}

/// Bytes read from a proxy's socket at once, below TLS.
const SOCKET_READ_BUFFER: usize = 32 * 1024;

impl Transport for DirectTransport {
    fn connect<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            let stream = self.dial(host, port).await?;
            // rustls reads a socket 4 KiB at a time, so a 16 KiB record took four syscalls;
            // reads from this buffer are copies instead.
            let stream = tokio::io::BufReader::with_capacity(SOCKET_READ_BUFFER, stream);
            Ok(Box::new(stream) as BoxStream)
        })
    }

    fn name(&self) -> &'static str {
        "direct"
    }
}

/// A dial failure: says what was being done to which `host:port`, keeps the cause as its source
/// and its kind for callers that branch on it.
#[derive(Debug, thiserror::Error)]
#[error("{action} {host}:{port}")]
struct DialError {
    action: &'static str,
    host: String,
    port: u16,
    #[source]
    source: io::Error,
}

fn dial_error(host: &str, port: u16, action: &'static str, source: io::Error) -> io::Error {
    io::Error::new(
        source.kind(),
        DialError {
            action,
            host: host.to_owned(),
            port,
            source,
        },
    )
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::net::{IpAddr, Ipv4Addr};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn dials_an_override_for_a_made_up_name() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut resolve = Resolve::new();
        resolve.insert("proxy.invalid", port, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let transport = DirectTransport::new(resolve, Duration::from_secs(5));
        assert_eq!(transport.name(), "direct");

        let (mut stream, accepted) = tokio::join!(
            async { transport.connect("Proxy.Invalid", port).await.unwrap() },
            async { listener.accept().await.unwrap().0 }
        );
        let mut accepted = accepted;
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn a_refused_port_errors_naming_host_and_port() {
        // Take a free port, then close it, so nothing listens there.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut resolve = Resolve::new();
        resolve.insert("proxy.invalid", port, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let transport = DirectTransport::new(resolve, Duration::from_secs(5));

        let err = match transport.connect("proxy.invalid", port).await {
            Ok(_) => panic!("connected to a closed port"),
            Err(err) => err,
        };
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(
            err.to_string()
                .contains(&format!("could not connect to proxy.invalid:{port}")),
            "{err}"
        );
        assert!(err.source().is_some(), "the cause is kept as the source");
    }

    #[tokio::test]
    async fn never_looks_up_an_onion_address() {
        let transport = DirectTransport::new(Resolve::new(), Duration::from_secs(5));
        let onion = shroud_mux::onion::from_public_key(&[1; 32]);
        let err = match transport.connect(&onion, 443).await {
            Ok(_) => panic!("dialed an onion address directly"),
            Err(err) => err,
        };
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        assert!(format!("{:?}", err).contains("only through Tor"), "{err:?}");
    }

    #[tokio::test]
    async fn dials_by_name_lookup_without_an_override() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let transport = DirectTransport::new(Resolve::new(), Duration::from_secs(5));
        let (stream, _accepted) = tokio::join!(
            async { transport.connect("127.0.0.1", port).await.unwrap() },
            async { listener.accept().await.unwrap() }
        );
        drop(stream);
    }
}
