//! The link between two proxies of one fleet (PROTOCOL.md §11): how each end proves it knows
//! the fleet secret, what opens each stream, and the frames and answers that follow.
//!
//! A link is TLS with ALPN [`ALPN`], then a proof each way, then yamux. The dialling proxy
//! opens every stream: one [`StreamKind::Gossip`] stream carrying membership frames, and a
//! [`StreamKind::Forward`] stream per visitor it hands over. A forwarded visitor is never
//! forwarded again: what arrives on a link is routed to a local tunnel or refused.

use std::io;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The ALPN protocol identifier of a peer link.
pub const ALPN: &[u8] = b"shroud-peer/1";
/// The label passed to the TLS exporter for the proof.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-shroud-peer-v1";
/// Length in bytes of the exporter value the proof covers.
pub const EXPORTER_LEN: usize = 32;
/// Length in bytes of a proof.
pub const PROOF_LEN: usize = 32;
/// Largest gossip frame, in bytes.
pub const MAX_GOSSIP_FRAME: usize = 256 * 1024;

/// Which end of the link a proof comes from. Each end proves a different message, so one
/// end's proof cannot be reflected back as the other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The proxy that opened the connection.
    Dialer,
    /// The proxy that accepted it.
    Listener,
}

impl Side {
    fn context(self) -> &'static [u8] {
        match self {
            Side::Dialer => b"shroud-peer/1 dialer\0",
            Side::Listener => b"shroud-peer/1 listener\0",
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], side: Side, exporter: &[u8; EXPORTER_LEN]) -> HmacSha256 {
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(side.context());
    mac.update(exporter);
    mac
}

/// The proof `side` sends: HMAC-SHA256 keyed by the fleet secret over its side's context and
/// the connection's exporter value, so it holds for this TLS connection only.
pub fn proof(secret: &[u8], side: Side, exporter: &[u8; EXPORTER_LEN]) -> [u8; PROOF_LEN] {
    mac(secret, side, exporter).finalize().into_bytes().into()
}

/// Whether `candidate` is the proof `side` owes on the connection with `exporter`, compared in
/// constant time.
pub fn verify(
    secret: &[u8],
    side: Side,
    exporter: &[u8; EXPORTER_LEN],
    candidate: &[u8; PROOF_LEN],
) -> bool {
    mac(secret, side, exporter).verify_slice(candidate).is_ok()
}

/// What a stream on a link carries; its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Membership frames, each a `u32` big-endian length and that many bytes.
    Gossip,
    /// A visitor: a [`crate::header::StreamHeader`], then its bytes.
    Forward,
}

impl StreamKind {
    /// The byte that opens a stream of this kind.
    pub fn byte(self) -> u8 {
        match self {
            StreamKind::Gossip => 1,
            StreamKind::Forward => 2,
        }
    }

    /// The kind a stream's first byte names, if any.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(StreamKind::Gossip),
            2 => Some(StreamKind::Forward),
            _ => None,
        }
    }
}

/// Writes one gossip frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &[u8]) -> io::Result<()> {
    if frame.len() > MAX_GOSSIP_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "gossip frame too large",
        ));
    }
    let len = u32::try_from(frame.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    writer.write_all(&len.to_be_bytes()).await?;
    writer.write_all(frame).await?;
    writer.flush().await
}

/// Reads one gossip frame into `buf`; `Ok(false)` at a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    let mut len = [0u8; 4];
    // Only an end before the first byte of a length is clean; one inside it is a truncated
    // frame, an error like an end inside the body.
    if reader.read(&mut len[..1]).await? == 0 {
        return Ok(false);
    }
    reader.read_exact(&mut len[1..]).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_GOSSIP_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("gossip frame of {len} bytes is over the {MAX_GOSSIP_FRAME}-byte limit"),
        ));
    }
    buf.resize(len, 0);
    reader.read_exact(buf).await?;
    Ok(true)
}

/// The receiving proxy's answer to a forwarded visitor, one byte. Only [`Reply::Accepted`]
/// is followed by the visitor's bytes from the origin; after any other the stream ends, and
/// nothing the visitor sent has reached a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A tunnel stream is open and acknowledged; bytes flow both ways from here.
    Accepted,
    /// No tunnel for the name here (any more).
    NoTunnel,
    /// Only tunnels that want HTTPS hold the name: a plain-HTTP visitor is redirected.
    HttpsOnly,
    /// The name has as many visitors here as it may.
    HostnameFull,
    /// A tunnel holds the name but no stream could be made ready on it in time.
    Failed,
}

impl Reply {
    /// The byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            Reply::Accepted => 0,
            Reply::NoTunnel => 1,
            Reply::HttpsOnly => 2,
            Reply::HostnameFull => 3,
            Reply::Failed => 4,
        }
    }

    /// Reads a reply; an unknown byte is an error.
    pub async fn read<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Self> {
        let mut byte = [0u8; 1];
        reader.read_exact(&mut byte).await?;
        match byte[0] {
            0 => Ok(Reply::Accepted),
            1 => Ok(Reply::NoTunnel),
            2 => Ok(Reply::HttpsOnly),
            3 => Ok(Reply::HostnameFull),
            4 => Ok(Reply::Failed),
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown forward reply {other:#04x}"),
            )),
        }
    }

    /// Writes the reply and flushes it.
    pub async fn write<W: AsyncWrite + Unpin>(self, writer: &mut W) -> io::Result<()> {
        writer.write_all(&[self.byte()]).await?;
        writer.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a-fleet-secret-of-sufficient-length";

    #[test]
    fn a_proof_holds_for_its_side_secret_and_connection_only() {
        let exporter = [7u8; EXPORTER_LEN];
        let dialer = proof(SECRET, Side::Dialer, &exporter);
        assert!(verify(SECRET, Side::Dialer, &exporter, &dialer));
        // Reflected back as the other side's proof.
        assert!(!verify(SECRET, Side::Listener, &exporter, &dialer));
        // Another connection.
        assert!(!verify(SECRET, Side::Dialer, &[8u8; EXPORTER_LEN], &dialer));
        // Another secret.
        assert!(!verify(
            b"another-secret-entirely",
            Side::Dialer,
            &exporter,
            &dialer
        ));
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversized_ones_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let writer = tokio::spawn(async move {
            write_frame(&mut a, b"hello").await?;
            write_frame(&mut a, &[]).await?;
            assert!(write_frame(&mut a, &vec![0; MAX_GOSSIP_FRAME + 1])
                .await
                .is_err());
            a.write_all(&(MAX_GOSSIP_FRAME as u32 + 1).to_be_bytes())
                .await
        });
        let mut buf = Vec::new();
        assert!(read_frame(&mut b, &mut buf).await.unwrap_or(false));
        assert_eq!(buf, b"hello");
        assert!(read_frame(&mut b, &mut buf).await.unwrap_or(false));
        assert!(buf.is_empty());
        assert!(read_frame(&mut b, &mut buf).await.is_err());
        assert!(matches!(writer.await, Ok(Ok(()))));
    }

    /// Found by the `peer` fuzz target: a stream that ended inside a length prefix was
    /// reported as a clean end between frames.
    #[tokio::test]
    async fn an_end_inside_a_length_prefix_is_an_error_not_a_clean_end() {
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut &[][..], &mut buf).await,
            Ok(false)
        ));
        for cut in 1..4 {
            let mut reader = &[0u8, 0, 0, 5][..cut];
            let err = read_frame(&mut reader, &mut buf).await.err();
            assert_eq!(
                err.map(|err| err.kind()),
                Some(io::ErrorKind::UnexpectedEof),
                "cut after {cut} bytes"
            );
        }
        let mut reader = &[0u8, 0, 0, 2, b'h'][..];
        assert!(read_frame(&mut reader, &mut buf).await.is_err());
    }

    #[tokio::test]
    async fn replies_round_trip() {
        for reply in [
            Reply::Accepted,
            Reply::NoTunnel,
            Reply::HttpsOnly,
            Reply::HostnameFull,
            Reply::Failed,
        ] {
            let mut bytes = Vec::new();
            assert!(reply.write(&mut bytes).await.is_ok());
            assert_eq!(Reply::read(&mut bytes.as_slice()).await.ok(), Some(reply));
        }
        assert!(Reply::read(&mut [9u8].as_slice()).await.is_err());
    }
}
