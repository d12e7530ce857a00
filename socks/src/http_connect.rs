//! HTTP CONNECT (RFC 9110 §9.3.6): `CONNECT host:port HTTP/1.1`, then the proxy answers `200`
//! and the connection carries the program's bytes to the destination.
//!
//! Only CONNECT is served: a proxy request for a plain-HTTP URL (`GET http://...`) is answered
//! `405` with a text saying so. A `Proxy-Authorization` header is not checked; like SOCKS5
//! credentials, its value only keeps the program's streams apart from others'.

use tokio::io::{AsyncRead, AsyncReadExt as _};

use crate::dest::Destination;
use crate::request::{Reply, RequestError};

/// The largest request head accepted, in bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// The most header lines a head may have.
const MAX_HEADERS: usize = 64;

/// A CONNECT request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Where to.
    pub destination: Destination,
    /// The `Proxy-Authorization` header's value, if any.
    pub credentials: Option<Vec<u8>>,
    /// Bytes that came after the head (a program that did not wait for the `200`): they belong
    /// to the destination.
    pub early_data: Vec<u8>,
}

/// Reads a request head from `io`, of which `first` was read already, and takes the CONNECT
/// request from it.
pub async fn read_connect<R>(io: &mut R, first: u8) -> Result<Connect, RequestError>
where
    R: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(512);
    buf.push(first);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(connect) = parse(&buf)? {
            return Ok(connect);
        }
        if buf.len() >= MAX_HEAD {
            return Err(RequestError::Refused {
                reply: Reply::HeadTooLarge,
                reason: format!("HTTP request head larger than {MAX_HEAD} bytes"),
            });
        }
        // Never read past the limit: what a head may hold bounds what is buffered.
        let room = (MAX_HEAD - buf.len()).min(chunk.len());
        let n = io.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(RequestError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The CONNECT request in `buf`, `None` if the head is not complete yet.
fn parse(buf: &[u8]) -> Result<Option<Connect>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(RequestError::Refused {
                reply: Reply::BadRequest,
                reason: format!("HTTP request head with more than {MAX_HEADERS} header lines"),
            })
        }
        Err(err) => {
            return Err(RequestError::Refused {
                reply: Reply::BadRequest,
                reason: format!("malformed HTTP request head: {err}"),
            })
        }
    };
    let method = request.method.unwrap_or_default();
    if method != "CONNECT" {
        return Err(RequestError::Refused {
            reply: Reply::MethodNotAllowed,
            reason: format!(
                "HTTP {method} is not served: this proxy only tunnels (CONNECT host:port)"
            ),
        });
    }
    let target = request.path.unwrap_or_default();
    let destination = authority(target)?;
    let credentials = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("proxy-authorization"))
        .map(|h| h.value.to_vec());
    Ok(Some(Connect {
        destination,
        credentials,
        early_data: buf[head_len..].to_vec(),
    }))
}

/// Reads a CONNECT target: `host:port`, or `[v6]:port`; the port is required.
fn authority(target: &str) -> Result<Destination, RequestError> {
    let bad = |why: &str| RequestError::Refused {
        reply: Reply::BadRequest,
        reason: format!("CONNECT target {target:?}: {why}"),
    };
    let (host, port) = match target.strip_prefix('[') {
        Some(rest) => {
            let (host, port) = rest
                .split_once("]:")
                .ok_or_else(|| bad("expected [ADDRESS]:PORT"))?;
            (host, port)
        }
        None => target
            .rsplit_once(':')
            .filter(|(host, _)| !host.contains(':'))
            .ok_or_else(|| bad("expected HOST:PORT"))?,
    };
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port is not a number from 1 to 65535"))?;
    Destination::parse(host, port).map_err(RequestError::Destination)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dest::Host;

    async fn read(bytes: &[u8]) -> Result<Connect, RequestError> {
        let (first, rest) = bytes.split_first().unwrap();
        let mut rest = rest;
        read_connect(&mut rest, *first).await
    }

    #[tokio::test]
    async fn reads_a_connect_head_and_keeps_what_follows() {
        let c = read(
            b"CONNECT Example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\
              Proxy-Authorization: Basic YTpi\r\n\r\n\x16\x03\x01",
        )
        .await
        .unwrap();
        assert_eq!(c.destination.to_string(), "example.com:443");
        assert_eq!(c.credentials.as_deref(), Some(&b"Basic YTpi"[..]));
        assert_eq!(c.early_data, b"\x16\x03\x01");

        let c = read(b"CONNECT [2001:db8::1]:8443 HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(c.destination.host, Host::Ip("2001:db8::1".parse().unwrap()));
        assert_eq!(c.destination.port, 8443);
        assert!(c.credentials.is_none());
    }

    #[tokio::test]
    async fn refuses_other_methods_and_bad_targets() {
        let reply = |r: Result<Connect, RequestError>| match r {
            Err(RequestError::Refused { reply, .. }) => Some(reply),
            Err(RequestError::Destination(_)) => Some(Reply::BadRequest),
            _ => None,
        };
        assert_eq!(
            reply(read(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n").await),
            Some(Reply::MethodNotAllowed)
        );
        for target in [
            "example.com",
            "example.com:0",
            "example.com:99999",
            "[::1]443",
            "::1:443",
            "a b:1",
        ] {
            let head = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
            assert_eq!(
                reply(read(head.as_bytes()).await),
                Some(Reply::BadRequest),
                "{target}"
            );
        }
        assert_eq!(
            reply(read(b"CONNECT\0 x HTTP/1.1\r\n\r\n").await),
            Some(Reply::BadRequest)
        );
    }

    #[tokio::test]
    async fn a_head_too_large_or_cut_short_is_an_error() {
        let mut big = b"CONNECT example.com:443 HTTP/1.1\r\n".to_vec();
        while big.len() <= MAX_HEAD {
            big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let mut long_header = b"CONNECT example.com:443 HTTP/1.1\r\nX: ".to_vec();
        long_header.resize(MAX_HEAD * 2, b'a');
        for bytes in [big, long_header] {
            assert!(matches!(
                read(&bytes).await,
                Err(RequestError::Refused {
                    reply: Reply::HeadTooLarge,
                    ..
                }) | Err(RequestError::Refused {
                    reply: Reply::BadRequest,
                    ..
                })
            ));
        }
        assert!(matches!(
            read(b"CONNECT example.com:443 HTTP/1.1\r\n").await,
            Err(RequestError::Eof)
        ));
    }
}
