//! The header that opens every data stream, and the client's one-byte acknowledgement.
//!
//! The proxy opens one stream per visitor connection and writes a [`StreamHeader`] first.
//! The client answers with [`ACK_ACCEPTED`] once it accepts the stream, whether or not its
//! origin answers: yamux only counts a stream as acknowledged once the acceptor sends something,
//! and stops opening new streams while 256 are unacknowledged, so an origin that never answers
//! must not be what holds the acknowledgement back. [`Acknowledging`] sends it with the first
//! bytes the client writes on the stream, or on its own after [`ACK_HOLD`].

use std::future::Future as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;

use crate::codec::{put_str8, DecodeError, Reader};
use crate::hostname;

/// The byte a client writes first on every data stream it accepts.
pub const ACK_ACCEPTED: u8 = 0x00;
/// Header format version.
const HEADER_VERSION: u8 = 1;
/// The longest possible header: version, kind, name, address (v6), public port.
pub const MAX_HEADER_LEN: usize = 1 + 1 + 1 + 255 + 1 + 16 + 2 + 2;

/// What the visitor speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// TLS, routed by SNI; the client sends it to its TLS target.
    Tls,
    /// Plain HTTP, routed by Host; the client sends it to its HTTP target.
    Http,
}

/// The first bytes of a data stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// The normalised hostname the visitor asked for.
    pub hostname: String,
    /// What the visitor speaks.
    pub kind: StreamKind,
    /// The visitor's address, as the proxy saw it.
    pub visitor: SocketAddr,
    /// The proxy port the visitor connected to.
    pub public_port: u16,
}

impl StreamHeader {
    /// Encodes the header.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_HEADER_LEN);
        out.push(HEADER_VERSION);
        out.push(match self.kind {
            StreamKind::Tls => 1,
            StreamKind::Http => 2,
        });
        put_str8(&mut out, &self.hostname);
        match self.visitor.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&self.visitor.port().to_be_bytes());
        out.extend_from_slice(&self.public_port.to_be_bytes());
        out
    }

    /// Reads a header from the stream, byte-exactly: nothing after it is consumed.
    ///
    /// Applies no deadline: callers wrap it in a timeout.
    pub async fn read<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Self, HeaderError> {
        // Fixed part up to the name length, then the name, then the address family, then the rest.
        let mut fixed = [0u8; 3];
        reader.read_exact(&mut fixed).await?;
        let name_len = fixed[2] as usize;
        let mut buf = Vec::with_capacity(MAX_HEADER_LEN);
        buf.extend_from_slice(&fixed);
        buf.resize(3 + name_len + 1, 0);
        reader.read_exact(&mut buf[3..]).await?;
        let addr_len = match buf[3 + name_len] {
            4 => 4,
            6 => 16,
            _ => return Err(DecodeError::Invalid("address family").into()),
        };
        let start = buf.len();
        buf.resize(start + addr_len + 4, 0);
        reader.read_exact(&mut buf[start..]).await?;
        Ok(Self::decode(&buf)?)
    }

    /// Decodes a complete header.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        if r.u8()? != HEADER_VERSION {
            return Err(DecodeError::Invalid("header version"));
        }
        let kind = match r.u8()? {
            1 => StreamKind::Tls,
            2 => StreamKind::Http,
            _ => return Err(DecodeError::Invalid("stream kind")),
        };
        let raw_name = r.str8("hostname")?;
        let hostname =
            hostname::normalize(&raw_name).map_err(|_| DecodeError::Invalid("hostname"))?;
        let ip = match r.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
            _ => return Err(DecodeError::Invalid("address family")),
        };
        let visitor = SocketAddr::new(ip, r.u16()?);
        let public_port = r.u16()?;
        r.finish()?;
        Ok(Self {
            hostname,
            kind,
            visitor,
            public_port,
        })
    }
}

/// Why a stream header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The stream failed or ended early.
    #[error("stream header: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a valid header.
    #[error("malformed stream header: {0}")]
    Malformed(#[from] DecodeError),
}

/// How long a client may hold a stream's acknowledgement back to send it with the first bytes
/// it writes on the stream (PROTOCOL.md §7.3).
pub const ACK_HOLD: Duration = Duration::from_millis(100);

/// At most this much of the first write goes into the frame that carries the acknowledgement
/// (it is copied once to join them).
const JOINED: usize = 16 * 1024;

/// The client's side of a data stream, acknowledging it (§7.3): the acknowledgement goes out in
/// the same frame as the first bytes written on the stream (for a TLS visitor, the origin's
/// ServerHello), or alone once [`ACK_HOLD`] has passed since [`Acknowledging::new`], or when
/// the stream is shut down, whichever comes first.
///
/// Why: over Tor, a one-byte frame followed a few milliseconds later by the origin's first
/// bytes crossed each relay as two small writes, and the relays' Nagle algorithm held the
/// second until the next relay acknowledged the first, which Linux delays by 40 ms or more
/// when it has nothing to send back: a visitor's first byte came in 3 ms or in 47 ms.
///
/// The deadline is noticed while the stream is read or written, and by [`Acknowledging::poll_due`]
/// for a caller waiting on something else (the origin's connect). A stream dropped before the
/// acknowledgement went out is reset unacknowledged, and the proxy may offer its visitor to
/// another tunnel.
pub struct Acknowledging<S> {
    inner: S,
    /// Until the acknowledgement is out: when it must go alone.
    due: Option<Pin<Box<Sleep>>>,
}

impl<S> Acknowledging<S> {
    /// A stream just accepted, its acknowledgement not yet written.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            due: Some(Box::pin(tokio::time::sleep(ACK_HOLD))),
        }
    }

    /// Whether the acknowledgement is written.
    pub fn acknowledged(&self) -> bool {
        self.due.is_none()
    }
}

impl<S: AsyncWrite + Unpin> Acknowledging<S> {
    /// Writes the acknowledgement alone once it is due. Ready when it is written (at once if it
    /// already was); until then, wakes the task when it falls due.
    pub fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(due) = self.due.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        ready!(due.as_mut().poll(cx));
        self.poll_write_ack(cx)
    }

    fn poll_write_ack(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &[ACK_ACCEPTED]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.due = None;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Acknowledging<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Pending here only means the acknowledgement is not due yet (or the stream cannot
        // take it yet): the read goes on.
        if let Poll::Ready(Err(err)) = this.poll_due(cx) {
            return Poll::Ready(Err(err));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Acknowledging<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.due.is_none() || buf.is_empty() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        let take = buf.len().min(JOINED);
        let mut joined = Vec::with_capacity(1 + take);
        joined.push(ACK_ACCEPTED);
        joined.extend_from_slice(&buf[..take]);
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &joined))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        this.due = None;
        if n > 1 {
            return Poll::Ready(Ok(n - 1));
        }
        // Only the acknowledgement went out.
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.due.is_some() {
            ready!(this.poll_write_ack(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Writes the acknowledgement a client owes every data stream, and flushes it.
pub async fn write_ack<W: AsyncWrite + Unpin>(writer: &mut W) -> io::Result<()> {
    writer.write_all(&[ACK_ACCEPTED]).await?;
    writer.flush().await
}

/// Reads the client's acknowledgement. Any byte but [`ACK_ACCEPTED`] is an error.
pub async fn read_ack<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<()> {
    let mut ack = [0u8; 1];
    reader.read_exact(&mut ack).await?;
    if ack[0] == ACK_ACCEPTED {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected stream acknowledgement {:#04x}", ack[0]),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(visitor: &str) -> StreamHeader {
        StreamHeader {
            hostname: "example.test".into(),
            kind: StreamKind::Http,
            visitor: visitor.parse().unwrap_or_else(|e| panic!("{e}")),
            public_port: 443,
        }
    }

    #[tokio::test]
    async fn header_reads_exactly_its_own_bytes() {
        for visitor in ["192.0.2.1:5000", "[2001:db8::1]:6000"] {
            let header = sample(visitor);
            let mut bytes = header.encode();
            bytes.extend_from_slice(b"payload");
            let (mut a, mut b) = tokio::io::duplex(2);
            let writer = tokio::spawn(async move { a.write_all(&bytes).await });
            let read = StreamHeader::read(&mut b).await.ok();
            assert_eq!(read, Some(header));
            let mut rest = [0u8; 7];
            assert!(b.read_exact(&mut rest).await.is_ok());
            assert_eq!(&rest, b"payload");
            assert!(writer.await.is_ok());
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        let good = sample("192.0.2.1:1").encode();
        for cut in 0..good.len() {
            assert!(StreamHeader::decode(&good[..cut]).is_err());
        }
        let mut bad_kind = good.clone();
        bad_kind[1] = 9;
        assert!(StreamHeader::decode(&bad_kind).is_err());
        let mut bad_name = good.clone();
        bad_name[3] = b' ';
        assert!(StreamHeader::decode(&bad_name).is_err());
    }
    /// Records each write it is given, in full.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().0.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_acknowledgement_goes_out_in_one_write_with_the_first_bytes() {
        let mut stream = Acknowledging::new(Writes::default());
        tokio::time::advance(ACK_HOLD / 2).await;
        stream.write_all(b"server hello").await.unwrap();
        stream.write_all(b"more").await.unwrap();
        assert!(stream.acknowledged());
        assert_eq!(stream.inner.0, [&b"\0server hello"[..], b"more"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_first_write_carries_the_acknowledgement_and_the_rest_follows() {
        let mut stream = Acknowledging::new(Writes::default());
        let long = vec![7u8; JOINED + 100];
        stream.write_all(&long).await.unwrap();
        let written: Vec<u8> = stream.inner.0.concat();
        assert_eq!(written[0], ACK_ACCEPTED);
        assert_eq!(&written[1..], &long[..]);
        assert_eq!(stream.inner.0[0].len(), 1 + JOINED);
    }

    #[tokio::test(start_paused = true)]
    async fn with_nothing_to_send_the_acknowledgement_goes_alone_after_the_hold() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut stream = Acknowledging::new(near);
        // The client waits to read from the proxy, as a splice does; nothing comes.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let n = stream.read(&mut buf).await.unwrap();
            (stream, n)
        });
        let started = tokio::time::Instant::now();
        let mut ack = [9u8; 1];
        far.read_exact(&mut ack).await.unwrap();
        assert_eq!(ack, [ACK_ACCEPTED]);
        assert_eq!(started.elapsed(), ACK_HOLD);
        far.write_all(b"x").await.unwrap();
        let (stream, n) = reader.await.unwrap();
        assert_eq!(n, 1);
        assert!(stream.acknowledged());
    }

    #[tokio::test(start_paused = true)]
    async fn poll_due_writes_it_while_the_caller_waits_on_something_else() {
        let mut stream = Acknowledging::new(Writes::default());
        let waited = std::future::poll_fn(|cx| stream.poll_due(cx));
        tokio::time::timeout(ACK_HOLD * 2, waited)
            .await
            .expect("due within the hold")
            .unwrap();
        assert_eq!(stream.inner.0, [vec![ACK_ACCEPTED]]);
        // Once written, nothing more is owed.
        assert!(std::future::poll_fn(|cx| stream.poll_due(cx)).await.is_ok());
        stream.write_all(b"later").await.unwrap();
        assert_eq!(stream.inner.0.concat(), b"\0later");
    }

    #[tokio::test(start_paused = true)]
    async fn shutting_down_unacknowledged_sends_the_acknowledgement_first() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut stream = Acknowledging::new(near);
        stream.shutdown().await.unwrap();
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [ACK_ACCEPTED]);
    }
}
