//! The control stream: the first stream a client opens on a tunnel.
//!
//! Every message is a frame: a 2-byte big-endian body length, then the body, whose first byte is
//! the message type. Bodies are at most [`MAX_FRAME_LEN`] bytes. See PROTOCOL.md for the
//! exchange; this module only knows how to put messages on the wire and take them off.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth::CHALLENGE_LEN;
use crate::codec::{put_str8, DecodeError, Reader};

/// The newest protocol version this crate speaks.
pub const VERSION: u8 = 2;
/// Every protocol version this crate speaks, most preferred first. Version 2 is version 1 with
/// [`Message::Unbound`]; a peer that speaks only version 1 never receives one.
pub const VERSIONS: [u8; 2] = [2, 1];
/// The first version in which a proxy may send [`Message::Unbound`].
pub const UNBOUND_SINCE: u8 = 2;

/// The version a proxy chooses from the versions a client's Hello offers: the first of them,
/// in the client's order of preference, that this crate speaks.
pub fn choose_version(offered: &[u8]) -> Option<u8> {
    offered.iter().copied().find(|v| VERSIONS.contains(v))
}
/// Largest control frame body accepted, in bytes.
pub const MAX_FRAME_LEN: usize = 16 * 1024;
/// Most hostnames one bind may carry.
pub const MAX_BIND_HOSTNAMES: usize = 32;

/// One message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Client: the protocol versions it speaks. Proxy: the one version it chose.
    Hello {
        /// Versions, most preferred first.
        versions: Vec<u8>,
    },
    /// Proxy: a fresh random value the bind proof must cover.
    Challenge {
        /// The random value.
        challenge: [u8; CHALLENGE_LEN],
    },
    /// Client: the hostnames to bind, and the proof that it holds `key`.
    Bind {
        /// The client's ed25519 public key.
        key: [u8; 32],
        /// Signature over the transcript (see [`crate::auth::bind_transcript`]).
        signature: [u8; 64],
        /// The names to bind, each with what it serves.
        hostnames: Vec<BindName>,
    },
    /// Proxy: the outcome for each hostname of a bind, in the bind's order.
    BindResult {
        /// One entry per hostname asked for.
        results: Vec<BindOutcome>,
    },
    /// Either side: are you there? The peer answers with a [`Message::Pong`] of the same nonce.
    Ping {
        /// Echoed back in the pong.
        nonce: u64,
    },
    /// The answer to a [`Message::Ping`].
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// Proxy: it is shutting down; open a tunnel elsewhere. Streams in flight may finish.
    GoAway {
        /// Human-readable reason.
        reason: String,
    },
    /// Proxy, version 2 on: it no longer routes `hostname` to this tunnel, unasked (its
    /// authorization was withdrawn: the authorized file was reloaded, or its DNS record went).
    /// The tunnel stays up for its other names; with none left, the proxy closes it.
    Unbound {
        /// The hostname, as the bind gave it.
        hostname: String,
        /// Why, as a bind would have been refused now; never [`BindStatus::Bound`].
        status: BindStatus,
        /// Human-readable detail.
        reason: String,
    },
    /// Either side: a fatal protocol error; the sender closes the tunnel after sending it.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

/// One hostname of a bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindName {
    /// The normalised hostname.
    pub name: String,
    /// Whether the client serves plain-HTTP visitors for it. When false the proxy answers
    /// them with a redirect to HTTPS.
    pub http: bool,
}

/// The proxy's verdict on one hostname of a bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindOutcome {
    /// The hostname, as the bind gave it.
    pub name: String,
    /// Bound, or why not.
    pub status: BindStatus,
    /// Human-readable detail; empty when bound.
    pub reason: String,
}

/// Whether a hostname was bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindStatus {
    /// The tunnel now receives this hostname's visitors.
    Bound,
    /// The proxy's policy does not let this key bind this hostname.
    NotAuthorized,
    /// The hostname is not acceptable (malformed, or a name the proxy keeps for itself).
    InvalidHostname,
    /// A limit of the proxy was reached.
    LimitReached,
    /// The signature did not verify.
    BadProof,
    /// The proxy could not decide now (a check it needs failed); trying later may work.
    Unavailable,
    /// The bind by itself asks for more than a limit of the proxy allows (more hostnames than
    /// one key may hold), so sending it again unchanged can never bind this name.
    ExceedsLimit,
    /// The proxy's policy does not grant this key the hostname, and the name's DNS TXT
    /// authorization (which the proxy consults) does not list the key: not yet, or no longer.
    /// Publishing a record changes that without the client doing anything, so it is not a
    /// refusal for good.
    NotListed,
    /// A status this crate does not know, from a newer peer. It is a refusal; since nothing
    /// says retrying is futile, it is treated as one that may succeed later. Never holds one
    /// of the codes above.
    Other(u8),
}

impl BindStatus {
    fn code(self) -> u8 {
        match self {
            Self::Bound => 0,
            Self::NotAuthorized => 1,
            Self::InvalidHostname => 2,
            Self::LimitReached => 3,
            Self::BadProof => 4,
            Self::Unavailable => 5,
            Self::ExceedsLimit => 6,
            Self::NotListed => 7,
            Self::Other(code) => code,
        }
    }

    /// Every code decodes: codes added after this crate was written arrive as
    /// [`BindStatus::Other`], so a newer proxy's answer is never malformed here.
    fn from_code(code: u8) -> Self {
        match code {
            0 => Self::Bound,
            1 => Self::NotAuthorized,
            2 => Self::InvalidHostname,
            3 => Self::LimitReached,
            4 => Self::BadProof,
            5 => Self::Unavailable,
            6 => Self::ExceedsLimit,
            7 => Self::NotListed,
            other => Self::Other(other),
        }
    }

    /// Every status this crate knows, in code order.
    pub const KNOWN: [BindStatus; 8] = [
        Self::Bound,
        Self::NotAuthorized,
        Self::InvalidHostname,
        Self::LimitReached,
        Self::BadProof,
        Self::Unavailable,
        Self::ExceedsLimit,
        Self::NotListed,
    ];

    /// A short name for logs and metric labels: `bound`, `not_authorized`, …, and `other` for
    /// every status this crate does not know.
    pub fn label(self) -> &'static str {
        match self {
            Self::Bound => "bound",
            Self::NotAuthorized => "not_authorized",
            Self::InvalidHostname => "invalid_hostname",
            Self::LimitReached => "limit_reached",
            Self::BadProof => "bad_proof",
            Self::Unavailable => "unavailable",
            Self::ExceedsLimit => "exceeds_limit",
            Self::NotListed => "not_listed",
            Self::Other(_) => "other",
        }
    }

    /// Whether retrying the same bind later can change the answer.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            Self::NotAuthorized | Self::InvalidHostname | Self::BadProof | Self::ExceedsLimit
        )
    }
}

/// Why a tunnel is being torn down by a [`Message::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// No protocol version in common.
    UnsupportedVersion,
    /// A message arrived that the protocol does not allow at this point.
    UnexpectedMessage,
    /// A message could not be decoded.
    Malformed,
    /// The peer did not answer in time.
    Timeout,
    /// Anything else.
    Internal,
}

impl ErrorCode {
    fn code(self) -> u8 {
        match self {
            Self::UnsupportedVersion => 1,
            Self::UnexpectedMessage => 2,
            Self::Malformed => 3,
            Self::Timeout => 4,
            Self::Internal => 5,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            1 => Self::UnsupportedVersion,
            2 => Self::UnexpectedMessage,
            3 => Self::Malformed,
            4 => Self::Timeout,
            _ => Self::Internal,
        }
    }
}

const T_HELLO: u8 = 0x01;
const T_CHALLENGE: u8 = 0x02;
const T_BIND: u8 = 0x03;
const T_BIND_RESULT: u8 = 0x04;
const T_PING: u8 = 0x05;
const T_PONG: u8 = 0x06;
const T_GO_AWAY: u8 = 0x07;
const T_ERROR: u8 = 0x08;
const T_UNBOUND: u8 = 0x09;

impl Message {
    /// Encodes the message body (without the length prefix).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Self::Hello { versions } => {
                out.push(T_HELLO);
                let versions = &versions[..versions.len().min(255)];
                out.push(versions.len() as u8);
                out.extend_from_slice(versions);
            }
            Self::Challenge { challenge } => {
                out.push(T_CHALLENGE);
                out.extend_from_slice(challenge);
            }
            Self::Bind {
                key,
                signature,
                hostnames,
            } => {
                out.push(T_BIND);
                out.extend_from_slice(key);
                out.extend_from_slice(signature);
                out.push(hostnames.len().min(255) as u8);
                for entry in hostnames.iter().take(255) {
                    put_str8(&mut out, &entry.name);
                    out.push(u8::from(entry.http));
                }
            }
            Self::BindResult { results } => {
                out.push(T_BIND_RESULT);
                out.push(results.len().min(255) as u8);
                for outcome in results.iter().take(255) {
                    put_str8(&mut out, &outcome.name);
                    out.push(outcome.status.code());
                    put_str8(&mut out, &outcome.reason);
                }
            }
            Self::Ping { nonce } => {
                out.push(T_PING);
                out.extend_from_slice(&nonce.to_be_bytes());
            }
            Self::Pong { nonce } => {
                out.push(T_PONG);
                out.extend_from_slice(&nonce.to_be_bytes());
            }
            Self::GoAway { reason } => {
                out.push(T_GO_AWAY);
                put_str8(&mut out, reason);
            }
            Self::Error { code, message } => {
                out.push(T_ERROR);
                out.push(code.code());
                put_str8(&mut out, message);
            }
            Self::Unbound {
                hostname,
                status,
                reason,
            } => {
                out.push(T_UNBOUND);
                put_str8(&mut out, hostname);
                out.push(status.code());
                put_str8(&mut out, reason);
            }
        }
        out
    }

    /// Decodes a message body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let message = match r.u8()? {
            T_HELLO => {
                let count = r.u8()? as usize;
                Self::Hello {
                    versions: r.bytes(count)?.to_vec(),
                }
            }
            T_CHALLENGE => Self::Challenge {
                challenge: r.array()?,
            },
            T_BIND => {
                let key = r.array()?;
                let signature = r.array()?;
                let count = r.u8()? as usize;
                if count > MAX_BIND_HOSTNAMES {
                    return Err(DecodeError::Invalid("hostname count"));
                }
                let mut hostnames = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = r.str8("hostname")?;
                    let http = match r.u8()? {
                        0 => false,
                        1 => true,
                        _ => return Err(DecodeError::Invalid("http flag")),
                    };
                    hostnames.push(BindName { name, http });
                }
                Self::Bind {
                    key,
                    signature,
                    hostnames,
                }
            }
            T_BIND_RESULT => {
                let count = r.u8()? as usize;
                let mut results = Vec::with_capacity(count);
                for _ in 0..count {
                    let name = r.str8("hostname")?;
                    let status = BindStatus::from_code(r.u8()?);
                    let reason = r.str8("reason")?;
                    results.push(BindOutcome {
                        name,
                        status,
                        reason,
                    });
                }
                Self::BindResult { results }
            }
            T_PING => Self::Ping { nonce: r.u64()? },
            T_PONG => Self::Pong { nonce: r.u64()? },
            T_GO_AWAY => Self::GoAway {
                reason: r.str8("reason")?,
            },
            T_ERROR => Self::Error {
                code: ErrorCode::from_code(r.u8()?),
                message: r.str8("message")?,
            },
            T_UNBOUND => {
                let hostname = r.str8("hostname")?;
                let status = match BindStatus::from_code(r.u8()?) {
                    BindStatus::Bound => return Err(DecodeError::Invalid("unbound status")),
                    status => status,
                };
                Self::Unbound {
                    hostname,
                    status,
                    reason: r.str8("reason")?,
                }
            }
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(message)
    }
}

/// Why a control message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream failed.
    #[error("control stream: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the stream cleanly between two messages.
    #[error("control stream closed by the peer")]
    Closed,
    /// The length prefix announced a body over [`MAX_FRAME_LEN`].
    #[error("control frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    /// The body did not decode.
    #[error("malformed control message: {0}")]
    Malformed(#[from] DecodeError),
}

/// Reads one message. Applies no deadline: callers wrap it in a timeout.
pub async fn read_message<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Message, ReadError> {
    let mut len = [0u8; 2];
    match reader.read(&mut len[..1]).await? {
        0 => return Err(ReadError::Closed),
        _ => {
            reader.read_exact(&mut len[1..]).await?;
        }
    }
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ReadError::TooLarge(len));
    }
    if len == 0 {
        return Err(ReadError::Malformed(DecodeError::Truncated));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Ok(Message::decode(&body)?)
}

/// Writes one message and flushes it.
pub async fn write_message<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
) -> io::Result<()> {
    let body = message.encode();
    if body.len() > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "control message too large",
        ));
    }
    let mut frame = Vec::with_capacity(2 + body.len());
    frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
    frame.extend_from_slice(&body);
    writer.write_all(&frame).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                versions: vec![1, 2],
            },
            Message::Challenge { challenge: [7; 32] },
            Message::Bind {
                key: [1; 32],
                signature: [2; 64],
                hostnames: vec![
                    BindName {
                        name: "example.test".into(),
                        http: true,
                    },
                    BindName {
                        name: "b.example.test".into(),
                        http: false,
                    },
                ],
            },
            Message::BindResult {
                results: vec![BindOutcome {
                    name: "example.test".into(),
                    status: BindStatus::NotAuthorized,
                    reason: "no policy entry".into(),
                }],
            },
            Message::Ping { nonce: 42 },
            Message::Pong { nonce: u64::MAX },
            Message::GoAway {
                reason: "draining".into(),
            },
            Message::Error {
                code: ErrorCode::UnsupportedVersion,
                message: "speak 1".into(),
            },
            Message::Unbound {
                hostname: "example.test".into(),
                status: BindStatus::NotAuthorized,
                reason: "no longer authorized".into(),
            },
        ]
    }

    #[tokio::test]
    async fn messages_round_trip_through_a_tiny_pipe() {
        let (mut a, mut b) = tokio::io::duplex(3);
        let sent = samples();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            for m in &sent {
                write_message(&mut a, m).await?;
            }
            io::Result::Ok(())
        });
        for m in expected {
            assert_eq!(read_message(&mut b).await.ok(), Some(m));
        }
        assert!(matches!(read_message(&mut b).await, Err(ReadError::Closed)));
        assert!(writer.await.is_ok());
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_reading_it() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let big = (MAX_FRAME_LEN as u16 + 1).to_be_bytes();
        tokio::io::AsyncWriteExt::write_all(&mut a, &big).await.ok();
        assert!(matches!(
            read_message(&mut b).await,
            Err(ReadError::TooLarge(n)) if n == MAX_FRAME_LEN + 1
        ));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        assert_eq!(
            Message::decode(&[0x99]),
            Err(DecodeError::UnknownType(0x99))
        );
        assert_eq!(
            Message::decode(&[T_PING, 1, 2]),
            Err(DecodeError::Truncated)
        );
        let mut ping = Message::Ping { nonce: 1 }.encode();
        ping.push(0);
        assert_eq!(Message::decode(&ping), Err(DecodeError::TrailingBytes(1)));
        let mut bind = vec![T_BIND];
        bind.extend_from_slice(&[0; 96]);
        bind.push(200);
        assert_eq!(
            Message::decode(&bind),
            Err(DecodeError::Invalid("hostname count"))
        );
    }

    #[test]
    fn bind_statuses_round_trip_and_unknown_ones_still_decode() {
        let all = [
            BindStatus::Bound,
            BindStatus::NotAuthorized,
            BindStatus::InvalidHostname,
            BindStatus::LimitReached,
            BindStatus::BadProof,
            BindStatus::Unavailable,
            BindStatus::ExceedsLimit,
            BindStatus::NotListed,
        ];
        for (code, status) in all.into_iter().enumerate() {
            assert_eq!(status.code() as usize, code);
            assert_eq!(BindStatus::from_code(code as u8), status);
        }
        // A newer proxy's status is a refusal worth retrying, never a malformed message.
        let result = Message::BindResult {
            results: vec![BindOutcome {
                name: "example.test".into(),
                status: BindStatus::Other(42),
                reason: "something new".into(),
            }],
        };
        let mut body = result.encode();
        assert_eq!(Message::decode(&body), Ok(result));
        let status_at = body.len() - 1 - "something new".len() - 1;
        body[status_at] = 6;
        let Ok(Message::BindResult { results }) = Message::decode(&body) else {
            panic!("status 6 did not decode");
        };
        assert_eq!(results[0].status, BindStatus::ExceedsLimit);
        assert!(!BindStatus::Other(42).is_permanent());
        assert!(!BindStatus::LimitReached.is_permanent());
        assert!(BindStatus::ExceedsLimit.is_permanent());
        assert!(
            !BindStatus::NotListed.is_permanent(),
            "a TXT record may be published"
        );
    }

    #[test]
    fn every_truncation_of_every_message_fails_cleanly() {
        for m in samples() {
            let body = m.encode();
            for cut in 0..body.len() {
                assert!(Message::decode(&body[..cut]).is_err(), "{m:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn versions_are_chosen_in_the_clients_order() {
        assert_eq!(choose_version(&[2, 1]), Some(2));
        assert_eq!(choose_version(&[1]), Some(1));
        assert_eq!(choose_version(&[1, 2]), Some(1));
        assert_eq!(choose_version(&[9, 2]), Some(2));
        assert_eq!(choose_version(&[0, 3]), None);
        assert_eq!(choose_version(&[]), None);
        assert_eq!(VERSIONS[0], VERSION);
        assert!(VERSIONS.contains(&UNBOUND_SINCE));
    }

    #[test]
    fn unbound_has_its_worked_example_and_never_says_bound() {
        let unbound = Message::Unbound {
            hostname: "b.test".into(),
            status: BindStatus::NotAuthorized,
            reason: "gone".into(),
        };
        // PROTOCOL.md §4.9.
        let body = unbound.encode();
        assert_eq!(
            body,
            [0x09, 0x06, b'b', b'.', b't', b'e', b's', b't', 0x01, 0x04, b'g', b'o', b'n', b'e']
        );
        assert_eq!(Message::decode(&body), Ok(unbound));
        let mut bound = body.clone();
        bound[8] = 0;
        assert_eq!(
            Message::decode(&bound),
            Err(DecodeError::Invalid("unbound status"))
        );
        // A status this crate does not know yet still decodes.
        let mut newer = body;
        newer[8] = 42;
        assert!(matches!(
            Message::decode(&newer),
            Ok(Message::Unbound {
                status: BindStatus::Other(42),
                ..
            })
        ));
    }
}
