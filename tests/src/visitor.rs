//! Visitors: what a user on the internet does against a shroud proxy (or,
//! in the harness's own tests, directly against an origin).
//!
//! TLS visitors verify the server's certificate fully against the roots they
//! are given, for the name they ask for. A test that hands them only its own
//! [`crate::pki::TestCa`] therefore proves that the TLS session ended at the
//! origin holding that CA's leaf, untouched by the proxy.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context as _};
use rustls::crypto::aws_lc_rs;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::bulk::{self, BulkError, Direction, PatternGen, BUF_LEN, ORIGIN_SEED, VISITOR_SEED};

/// A rustls client configuration trusting exactly `roots` and offering the
/// given ALPN protocols (none if `alpn` is empty).
///
/// It names the aws-lc-rs provider explicitly, so it works whether or not
/// [`crate::init`] ran.
///
/// # Panics
///
/// If the provider supports no safe TLS version, which would be a bug.
pub fn client_config(roots: RootCertStore, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let builder = match ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder,
        Err(err) => panic!("aws-lc-rs offers no safe TLS version: {err}"),
    };
    let mut config = builder.with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Connects to `addr` and completes a TLS handshake for `sni`, verifying the
/// server's certificate for that name against `roots`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    roots: RootCertStore,
) -> anyhow::Result<TlsStream<TcpStream>> {
    tls_connect_with(addr, sni, client_config(roots, &[])).await
}

/// Like [`tls_connect`], with a caller-built configuration (for ALPN, say).
pub async fn tls_connect_with(
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    tls_handshake(tcp, addr, sni, config).await
}

/// Completes a TLS handshake for `sni` on `tcp`, a connection to `addr`, verifying the
/// server's certificate with `config`.
pub async fn tls_handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(sni.to_owned())
        .with_context(|| format!("{sni:?} is not a valid TLS server name"))?;
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr} for {sni}"))
}

/// An HTTP response as a visitor received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The header fields, in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body, with any chunked transfer coding removed.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text, with invalid UTF-8 replaced.
    pub fn body_text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
}

/// `GET path` over TLS to `addr`, with SNI and `Host` both `sni`; verifies
/// the certificate against `roots`.
pub async fn https_get(
    addr: SocketAddr,
    sni: &str,
    roots: RootCertStore,
    path: &str,
) -> anyhow::Result<HttpResponse> {
    let stream = tls_connect(addr, sni, roots).await?;
    http_exchange(stream, get_request(sni, path).as_bytes()).await
}

/// [`https_get`], tried again every `pause` until a response arrives, as a visitor reloads
/// a page that would not load; whatever the status. It never gives up: wrap it in
/// [`crate::within`].
pub async fn https_get_retrying(
    addr: SocketAddr,
    sni: &str,
    roots: RootCertStore,
    path: &str,
    pause: Duration,
) -> HttpResponse {
    loop {
        match https_get(addr, sni, roots.clone(), path).await {
            Ok(response) => return response,
            Err(_) => tokio::time::sleep(pause).await,
        }
    }
}

/// `GET path` over plain TCP to `addr`, with the given `Host` header.
pub async fn http_get(
    addr: SocketAddr,
    host_header: &str,
    path: &str,
) -> anyhow::Result<HttpResponse> {
    raw_http(addr, get_request(host_header, path).as_bytes()).await
}

/// Sends `request` verbatim over plain TCP to `addr` and parses the answer.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> anyhow::Result<HttpResponse> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    http_exchange(stream, request).await
}

/// Sends `request` on `stream`, reads until the server closes, and parses
/// the response. A body shorter or longer than its `Content-Length` is an
/// error, so truncation on the way is caught. A `HEAD` request (the request
/// starts with `HEAD `) expects no body.
pub async fn http_exchange<S>(mut stream: S, request: &[u8]) -> anyhow::Result<HttpResponse>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(request)
        .await
        .context("send HTTP request")?;
    stream.flush().await.context("send HTTP request")?;

    let mut raw = Vec::new();
    let mut clean_close = true;
    if let Err(err) = stream.read_to_end(&mut raw).await {
        // A TLS peer that closes without close_notify; fine if the response
        // carries its own length, which parsing checks below.
        if err.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() {
            clean_close = false;
        } else {
            return Err(err).context("read HTTP response");
        }
    }
    // A response to HEAD has headers describing a body it never carries.
    let head_request = request.starts_with(b"HEAD ");
    let (response, self_delimited) = parse_response(&raw, head_request)?;
    ensure!(
        clean_close || self_delimited,
        "HTTP response without a length ended without a TLS close_notify (possibly truncated)"
    );
    Ok(response)
}

/// A visitor's `GET path` for `host`, asking the server to close the connection after.
pub fn get_request(host: &str, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: shroud-tests\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
}

/// Parses a whole HTTP/1.x response read to EOF. Also says whether the body
/// length came from the message itself (Content-Length or chunked) rather
/// than from the connection closing.
fn parse_response(raw: &[u8], head_request: bool) -> anyhow::Result<(HttpResponse, bool)> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            anyhow!(
                "HTTP response has no complete head ({} bytes received)",
                raw.len()
            )
        })?;
    let head = std::str::from_utf8(&raw[..head_end]).context("HTTP response head is not UTF-8")?;
    let rest = &raw[head_end + 4..];

    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    ensure!(
        version.starts_with("HTTP/1."),
        "bad HTTP status line {status_line:?}"
    );
    let status: u16 = parts
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line {status_line:?}"))?;

    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| anyhow!("bad HTTP header line {line:?}"))?;
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };

    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    let self_delimited = if head_request {
        ensure!(rest.is_empty(), "response to HEAD carries a body");
        true
    } else if chunked {
        response.body = decode_chunked(rest)?;
        true
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length
            .parse()
            .with_context(|| format!("bad Content-Length {length:?}"))?;
        ensure!(
            rest.len() == length,
            "HTTP body is {} bytes but Content-Length says {length}",
            rest.len()
        );
        response.body = rest.to_vec();
        true
    } else {
        response.body = rest.to_vec();
        false
    };
    Ok((response, self_delimited))
}

fn decode_chunked(mut rest: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("truncated chunk size line"))?;
        let line = std::str::from_utf8(&rest[..line_end]).context("chunk size is not UTF-8")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers, if any, are not interesting here.
            return Ok(body);
        }
        ensure!(rest.len() >= size + 2, "truncated chunk");
        body.extend_from_slice(&rest[..size]);
        ensure!(
            &rest[size..size + 2] == b"\r\n",
            "chunk not followed by CRLF"
        );
        rest = &rest[size + 2..];
    }
}

/// Runs the visitor side of the bulk-transfer protocol ([`crate::bulk`]) on
/// `stream`: sends `n` bytes while receiving `n`, then checks both
/// directions arrived intact.
///
/// A failed check is returned as a [`BulkError`] inside the `anyhow::Error`
/// (use `downcast_ref`), naming the direction that differed.
pub async fn bulk_transfer<S>(stream: S, n: u64) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    bulk_transfer_paced(stream, n, BUF_LEN, None).await
}

/// [`bulk_transfer`] in pieces of at most `chunk` bytes each way and, with a `pace`, at a
/// walking pace: one piece sent and one read per tick of it, each direction on its own
/// clock, for a connection that stays open a long time.
pub(crate) async fn bulk_transfer_paced<S>(
    stream: S,
    n: u64,
    chunk: usize,
    pace: Option<Duration>,
) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    writer
        .write_all(&n.to_be_bytes())
        .await
        .context("visitor→origin: send the transfer length")?;

    let send = async {
        bulk::send_pattern(&mut writer, VISITOR_SEED, n, true, chunk, pace)
            .await
            .context("visitor→origin: send bytes")
    };
    let receive = receive_checked(&mut reader, n, chunk, pace);
    let (sent_hash, ()) = tokio::try_join!(send, receive)?;
    let sent_hash = sent_hash.ok_or_else(|| anyhow!("send_pattern returned no hash"))?;
    check_origin_hash(&mut reader, sent_hash).await
}

/// Reads exactly `n` bytes, at most `chunk` at a time and, with a `pace`, one read per tick
/// of it, and compares them with the origin's pattern.
async fn receive_checked<R: AsyncRead + Unpin>(
    reader: &mut R,
    n: u64,
    chunk: usize,
    pace: Option<Duration>,
) -> anyhow::Result<()> {
    let mut expected = PatternGen::new(ORIGIN_SEED);
    let mut buf = vec![0u8; chunk];
    let mut want = vec![0u8; chunk];
    let mut ticks = pace.map(tokio::time::interval);
    let mut got = 0u64;
    while got < n {
        if let Some(ticks) = &mut ticks {
            ticks.tick().await;
        }
        let len = bulk::chunk_len(n - got, buf.len());
        let read = reader
            .read(&mut buf[..len])
            .await
            .context("origin→visitor: receive bytes")?;
        if read == 0 {
            return Err(BulkError::Truncated {
                direction: Direction::OriginToVisitor,
                received: got,
                expected: n,
            }
            .into());
        }
        expected.fill(&mut want[..read]);
        // Slice equality is a memcmp even in debug builds; only a mismatch
        // pays for the byte-by-byte search.
        if buf[..read] != want[..read] {
            let at = buf[..read]
                .iter()
                .zip(&want[..read])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(BulkError::Corrupted {
                direction: Direction::OriginToVisitor,
                offset: Some(got + at as u64),
            }
            .into());
        }
        got += read as u64;
    }
    Ok(())
}

/// Reads the origin's SHA-256 of what it received, the end of the bulk protocol, and checks
/// it against `sent`, the hash of what the visitor sent.
async fn check_origin_hash<R: AsyncRead + Unpin>(
    reader: &mut R,
    sent: [u8; 32],
) -> anyhow::Result<()> {
    let mut origin_hash = [0u8; 32];
    reader.read_exact(&mut origin_hash).await.context(
        "visitor→origin: read the origin's SHA-256 of what it received \
         (did all the bytes reach it?)",
    )?;
    if origin_hash != sent {
        return Err(BulkError::Corrupted {
            direction: Direction::VisitorToOrigin,
            offset: None,
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_response;

    #[test]
    fn parses_content_length_response() -> anyhow::Result<()> {
        let raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nX-A: b\r\n\r\nnop";
        let (resp, delimited) = parse_response(raw, false)?;
        assert!(delimited);
        assert_eq!(resp.status, 404);
        assert_eq!(resp.header("x-a"), Some("b"));
        assert_eq!(resp.body, b"nop");
        Ok(())
    }

    #[test]
    fn parses_chunked_response() -> anyhow::Result<()> {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let (resp, delimited) = parse_response(raw, false)?;
        assert!(delimited);
        assert_eq!(resp.body, b"abcde");
        Ok(())
    }

    #[test]
    fn rejects_short_body() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort";
        assert!(parse_response(raw, false).is_err());
    }

    #[test]
    fn body_without_length_is_not_self_delimited() -> anyhow::Result<()> {
        let (resp, delimited) = parse_response(b"HTTP/1.0 502 Bad Gateway\r\n\r\nbad", false)?;
        assert!(!delimited);
        assert_eq!(resp.status, 502);
        assert_eq!(resp.body, b"bad");
        Ok(())
    }
}
