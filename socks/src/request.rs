//! One request from a local program, whichever protocol it speaks, and the reply to it.
//!
//! The first byte tells the protocols apart: 5 is SOCKS5, 4 is SOCKS4 (refused: it carries
//! IPv4 addresses, so programs resolve names themselves, and SOCKS4a is seldom configured
//! on purpose), an ASCII letter an HTTP request head. A caller reads the protocol with
//! [`read_protocol`], the request with [`read_request`], and answers with [`write_reply`]:
//! [`Reply::Succeeded`] once the connection is open, or what went wrong.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::dest::{Destination, DestinationError};
use crate::{http_connect, socks5};

/// Which protocol a program speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// SOCKS5.
    Socks5,
    /// SOCKS4 or SOCKS4a: answered with a refusal.
    Socks4,
    /// An HTTP/1.x request head; only CONNECT is served.
    Http {
        /// The head's first byte, already read.
        first: u8,
    },
}

/// A request to open a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Where to.
    pub destination: Destination,
    /// What the program authenticated with, if anything (SOCKS5 username and password, HTTP
    /// `Proxy-Authorization`); never checked, only used to keep its streams apart.
    pub credentials: Option<Vec<u8>>,
    /// Bytes the program sent after its request without waiting for the reply; they go to the
    /// destination first.
    pub early_data: Vec<u8>,
}

/// The outcome told to a program: SOCKS5's reply codes, which HTTP CONNECT answers with a
/// status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The connection is open (SOCKS5 0, HTTP 200).
    Succeeded,
    /// Something failed that no other code describes (SOCKS5 1, HTTP 502).
    GeneralFailure,
    /// The destination is not allowed (SOCKS5 2, "connection not allowed by ruleset"; HTTP
    /// 403).
    NotAllowed,
    /// No route to the destination's network (SOCKS5 3, HTTP 502).
    NetworkUnreachable,
    /// The host could not be found or reached (SOCKS5 4, HTTP 502).
    HostUnreachable,
    /// The destination refused the connection (SOCKS5 5, HTTP 502).
    ConnectionRefused,
    /// The connection did not open in time (SOCKS5 6, "TTL expired"; HTTP 504).
    TimedOut,
    /// A SOCKS5 command other than CONNECT (SOCKS5 7, HTTP 405).
    CommandNotSupported,
    /// A SOCKS5 address type other than IPv4, domain and IPv6 (SOCKS5 8, HTTP 400).
    AddressTypeNotSupported,
    /// A malformed request (SOCKS5 1, HTTP 400).
    BadRequest,
    /// An HTTP method other than CONNECT (SOCKS5 7, HTTP 405).
    MethodNotAllowed,
    /// An HTTP request head over [`http_connect::MAX_HEAD`] (SOCKS5 1, HTTP 431).
    HeadTooLarge,
    /// The proxy is serving as many connections as it may (SOCKS5 1, HTTP 503).
    Busy,
}

impl Reply {
    /// The SOCKS5 reply code.
    pub fn socks5_code(self) -> u8 {
        match self {
            Reply::Succeeded => 0,
            Reply::GeneralFailure | Reply::BadRequest | Reply::HeadTooLarge | Reply::Busy => 1,
            Reply::NotAllowed => 2,
            Reply::NetworkUnreachable => 3,
            Reply::HostUnreachable => 4,
            Reply::ConnectionRefused => 5,
            Reply::TimedOut => 6,
            Reply::CommandNotSupported | Reply::MethodNotAllowed => 7,
            Reply::AddressTypeNotSupported => 8,
        }
    }

    /// The HTTP status code and reason phrase.
    pub fn http_status(self) -> (u16, &'static str) {
        match self {
            Reply::Succeeded => (200, "Connection established"),
            Reply::NotAllowed => (403, "Forbidden"),
            Reply::GeneralFailure
            | Reply::NetworkUnreachable
            | Reply::HostUnreachable
            | Reply::ConnectionRefused => (502, "Bad Gateway"),
            Reply::TimedOut => (504, "Gateway Timeout"),
            Reply::CommandNotSupported | Reply::MethodNotAllowed => (405, "Method Not Allowed"),
            Reply::AddressTypeNotSupported | Reply::BadRequest => (400, "Bad Request"),
            Reply::HeadTooLarge => (431, "Request Header Fields Too Large"),
            Reply::Busy => (503, "Service Unavailable"),
        }
    }
}

/// Why a request could not be read, or cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Reading or writing the connection failed.
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] io::Error),
    /// The program closed the connection before its request was complete.
    #[error("connection closed before the request was complete")]
    Eof,
    /// The first byte is none of the protocols served.
    #[error("not SOCKS5 nor HTTP (first byte {0:#04x})")]
    UnknownProtocol(u8),
    /// SOCKS4 or SOCKS4a.
    #[error("SOCKS4 is not served, only SOCKS5 (and HTTP CONNECT)")]
    Socks4,
    /// A SOCKS5 greeting that offers neither no authentication nor username/password; it was
    /// answered already.
    #[error("the SOCKS5 greeting offers neither no authentication nor username/password")]
    NoAcceptableMethod,
    /// A SOCKS5 message that breaks the protocol.
    #[error("{0}")]
    Malformed(&'static str),
    /// A request understood but not served; `reply` says what to answer.
    #[error("{reason}")]
    Refused {
        /// What to answer.
        reply: Reply,
        /// Why, in words.
        reason: String,
    },
    /// The destination is not acceptable.
    #[error("{0}")]
    Destination(DestinationError),
}

impl RequestError {
    /// What to answer the program, if anything can still be answered.
    pub fn reply(&self) -> Option<Reply> {
        match self {
            RequestError::Io(_)
            | RequestError::Eof
            | RequestError::UnknownProtocol(_)
            | RequestError::NoAcceptableMethod => None,
            RequestError::Socks4 => Some(Reply::GeneralFailure),
            RequestError::Malformed(_) => Some(Reply::BadRequest),
            RequestError::Refused { reply, .. } => Some(*reply),
            RequestError::Destination(DestinationError::Numeric(_)) => Some(Reply::NotAllowed),
            RequestError::Destination(_) => Some(Reply::BadRequest),
        }
    }
}

/// Reads the first byte and says which protocol it starts.
pub async fn read_protocol<R: AsyncRead + Unpin>(io: &mut R) -> Result<Protocol, RequestError> {
    let mut first = [0u8; 1];
    if io.read(&mut first).await? == 0 {
        return Err(RequestError::Eof);
    }
    match first[0] {
        socks5::VERSION => Ok(Protocol::Socks5),
        4 => Ok(Protocol::Socks4),
        b if b.is_ascii_uppercase() => Ok(Protocol::Http { first: b }),
        b => Err(RequestError::UnknownProtocol(b)),
    }
}

/// Reads the rest of the request in `protocol`, answering SOCKS5's method selection and
/// authentication on `io` on the way. An error's [`RequestError::reply`] says what to answer.
pub async fn read_request<S>(io: &mut S, protocol: Protocol) -> Result<Request, RequestError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let result = match protocol {
        Protocol::Socks5 => socks5::read_connect(io).await.map(|c| Request {
            destination: c.destination,
            credentials: c.credentials,
            early_data: Vec::new(),
        }),
        Protocol::Socks4 => Err(RequestError::Socks4),
        Protocol::Http { first } => http_connect::read_connect(io, first)
            .await
            .map(|c| Request {
                destination: c.destination,
                credentials: c.credentials,
                early_data: c.early_data,
            }),
    };
    // A read that hit the end of the stream is the program leaving, not an I/O failure.
    result.map_err(|err| match err {
        RequestError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => RequestError::Eof,
        other => other,
    })
}

/// Writes the reply to a request in `protocol`. For HTTP, a failure's `detail` is the response
/// body (one line of text; the connection then closes).
pub async fn write_reply<W>(
    io: &mut W,
    protocol: Protocol,
    reply: Reply,
    detail: &str,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    match protocol {
        Protocol::Socks5 => io.write_all(&socks5::encode_reply(reply)).await?,
        // SOCKS4's "request rejected or failed", whatever the reason: SOCKS4 has no better.
        Protocol::Socks4 => io.write_all(&[0, 0x5b, 0, 0, 0, 0, 0, 0]).await?,
        Protocol::Http { .. } => io.write_all(&http_response(reply, detail)).await?,
    }
    io.flush().await
}

/// An HTTP response for `reply`: a bare `200` head for success, else a short text body.
fn http_response(reply: Reply, detail: &str) -> Vec<u8> {
    let (code, reason) = reply.http_status();
    if reply == Reply::Succeeded {
        return format!("HTTP/1.1 {code} {reason}\r\n\r\n").into_bytes();
    }
    // One line, whatever the detail held.
    let body: String = detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let allow = if code == 405 {
        "Allow: CONNECT\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\n{allow}Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        body.len() + 1
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::dest::Host;

    /// Runs the server side over a duplex pipe with a tiny buffer (partial reads and writes)
    /// while the program side writes `sent` and reads everything the server writes.
    async fn exchange(sent: &[u8]) -> (Result<Request, RequestError>, Vec<u8>) {
        let (program, mut server) = duplex(7);
        let sent = sent.to_vec();
        let program_side = tokio::spawn(async move {
            let (mut reader, mut writer) = tokio::io::split(program);
            let write = async {
                let _ = writer.write_all(&sent).await;
                // The end of what the program sends: a request cut short reads as one.
                let _ = writer.shutdown().await;
            };
            let mut received = Vec::new();
            let mut buf = [0u8; 64];
            let read = async {
                loop {
                    match reader.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => received.extend_from_slice(&buf[..n]),
                    }
                }
            };
            tokio::join!(write, read);
            received
        });
        let result = match read_protocol(&mut server).await {
            Ok(protocol) => {
                let result = read_request(&mut server, protocol).await;
                let reply = match &result {
                    Ok(_) => Some(Reply::Succeeded),
                    Err(err) => err.reply(),
                };
                if let Some(reply) = reply {
                    write_reply(&mut server, protocol, reply, "detail")
                        .await
                        .unwrap();
                }
                result
            }
            Err(err) => Err(err),
        };
        drop(server);
        (result, program_side.await.unwrap())
    }

    fn connect(atyp: u8, addr: &[u8], port: u16) -> Vec<u8> {
        let mut bytes = vec![5, 1, 0, atyp];
        bytes.extend_from_slice(addr);
        bytes.extend_from_slice(&port.to_be_bytes());
        bytes
    }

    const OK: [u8; 10] = [5, 0, 0, 1, 0, 0, 0, 0, 0, 0];

    #[tokio::test]
    async fn socks5_connect_by_name_without_auth() {
        let mut sent = vec![5, 1, 0];
        let mut name = vec![11];
        name.extend_from_slice(b"Example.COM");
        sent.extend(connect(3, &name, 443));
        let (request, received) = exchange(&sent).await;
        let request = request.unwrap();
        assert_eq!(request.destination.host, Host::Name("example.com".into()));
        assert_eq!(request.destination.port, 443);
        assert_eq!(request.credentials, None);
        assert_eq!(received[..2], [5, 0], "no authentication chosen");
        assert_eq!(received[2..], OK);
    }

    #[tokio::test]
    async fn socks5_connect_by_address_with_username_and_password() {
        // Offers both methods: username/password is chosen, for isolation.
        let mut sent = vec![5, 2, 0, 2, 1, 3, b'b', b'o', b'b', 2, b'p', b'w'];
        sent.extend(connect(1, &[192, 0, 2, 7], 8080));
        let (request, received) = exchange(&sent).await;
        let request = request.unwrap();
        assert_eq!(request.destination.to_string(), "192.0.2.7:8080");
        assert_eq!(request.credentials.as_deref(), Some(&b"\x03bob\x02pw"[..]));
        assert_eq!(received, [&[5, 2, 1, 0][..], &OK].concat());

        let v6: std::net::Ipv6Addr = "2001:db8::5".parse().unwrap();
        let mut sent = vec![5, 1, 0];
        sent.extend(connect(4, &v6.octets(), 443));
        let (request, _) = exchange(&sent).await;
        assert_eq!(
            request.unwrap().destination.to_string(),
            "[2001:db8::5]:443"
        );
    }

    #[tokio::test]
    async fn socks5_refusals_carry_the_right_code() {
        let code = |received: &[u8]| received.get(2).copied().zip(received.get(3).copied());
        // BIND (2) and UDP ASSOCIATE (3): command not supported, after the whole request.
        for command in [2, 3, 0xf0] {
            let mut sent = vec![5, 1, 0];
            let mut request = connect(1, &[192, 0, 2, 1], 80);
            request[1] = command;
            sent.extend(request);
            let (result, received) = exchange(&sent).await;
            assert!(matches!(result, Err(RequestError::Refused { .. })));
            assert_eq!(code(&received), Some((5, 7)), "{received:?}");
        }
        // Address type 2 does not exist.
        let mut sent = vec![5, 1, 0];
        sent.extend(connect(2, &[0, 0, 0, 0], 80));
        let (_, received) = exchange(&sent).await;
        assert_eq!(code(&received), Some((5, 8)));
        // A numeric name: not allowed by ruleset. An empty or bad one: general failure.
        for (name, expected) in [(&b"\x05127.1"[..], 2), (b"\x00", 1), (b"\x03a b", 1)] {
            let mut sent = vec![5, 1, 0];
            sent.extend(connect(3, name, 80));
            let (_, received) = exchange(&sent).await;
            assert_eq!(code(&received), Some((5, expected)), "{name:?}");
        }
        // Port 0.
        let mut sent = vec![5, 1, 0];
        sent.extend(connect(1, &[192, 0, 2, 1], 0));
        let (_, received) = exchange(&sent).await;
        assert_eq!(code(&received), Some((5, 1)));
    }

    #[tokio::test]
    async fn socks5_bad_greetings_and_auth_close_cleanly() {
        // Only GSSAPI offered: "no acceptable methods", then nothing more.
        let (result, received) = exchange(&[5, 1, 1]).await;
        assert!(matches!(result, Err(RequestError::NoAcceptableMethod)));
        assert_eq!(received, [5, 0xff]);
        // No methods at all.
        let (result, received) = exchange(&[5, 0]).await;
        assert!(matches!(result, Err(RequestError::Malformed(_))));
        assert_eq!(received, [5, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
        // Username/password with the wrong sub-version: refused with status 1.
        let (result, received) = exchange(&[5, 1, 2, 9, 0, 0]).await;
        assert!(result.is_err());
        assert_eq!(received[..4], [5, 2, 1, 1]);
        // Cut short anywhere: an end of stream, no reply.
        let mut whole = vec![5, 1, 0];
        whole.extend(connect(3, b"\x0bexample.com", 443));
        for cut in 1..whole.len() {
            let (result, _) = exchange(&whole[..cut]).await;
            assert!(
                matches!(result, Err(RequestError::Eof)),
                "cut at {cut}: {result:?}"
            );
        }
        // Not a protocol served.
        let (result, received) = exchange(&[0x16, 3, 1]).await;
        assert!(matches!(result, Err(RequestError::UnknownProtocol(0x16))));
        assert!(received.is_empty());
    }

    #[tokio::test]
    async fn socks4_is_refused_in_socks4() {
        let (result, received) = exchange(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).await;
        assert!(matches!(result, Err(RequestError::Socks4)));
        assert_eq!(received, [0, 0x5b, 0, 0, 0, 0, 0, 0]);
    }

    #[tokio::test]
    async fn http_connect_replies() {
        let (request, received) =
            exchange(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").await;
        assert_eq!(request.unwrap().destination.to_string(), "example.com:443");
        assert_eq!(received, b"HTTP/1.1 200 Connection established\r\n\r\n");

        let (_, received) = exchange(b"GET http://example.com/ HTTP/1.1\r\n\r\n").await;
        let text = String::from_utf8(received).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("Allow: CONNECT\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\ndetail\n"), "{text}");
        assert!(text.contains("Content-Length: 7\r\n"), "{text}");
    }

    #[test]
    fn failure_bodies_are_one_line() {
        let body = http_response(Reply::NotAllowed, "a\r\nInjected: yes");
        let text = String::from_utf8(body).unwrap();
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"));
        assert!(text.ends_with("\r\n\r\na  Injected: yes\n"), "{text}");
    }
}
