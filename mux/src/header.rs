//! The header that opens every data stream, and the client's one-byte acknowledgement.
//!
//! The proxy opens one stream per visitor connection and writes a [`StreamHeader`] first.
//! The client answers with [`ACK_ACCEPTED`] as soon as it accepts the stream, before it dials the
//! origin: yamux only counts a stream as acknowledged once the acceptor sends something, and
//! stops opening new streams while 256 are unacknowledged, so an origin that never answers must
//! not be what holds the acknowledgement back.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
}
