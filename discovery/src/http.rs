//! A minimal, bounded HTTP/1.1 client over any byte stream.
//!
//! One request per stream, `Connection: close`. It makes no assumption about the transport, so
//! the shroud client can run it over TLS over a Tor stream. The response head is capped at
//! [`MAX_HEAD_LEN`] and the body at the caller's limit; bodies come with `Content-Length` or
//! run to the end of the stream. Chunked transfer coding is refused, since the discovery
//! service never sends it. There is no timeout here: wrap the call in
//! [`tokio::time::timeout`].

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Largest response head read, in bytes.
pub const MAX_HEAD_LEN: usize = 16 * 1024;
/// Most response header lines accepted.
const MAX_HEADERS: usize = 64;

/// A response: its status and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, at most the caller's `max_body` bytes.
    pub body: Vec<u8>,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Reading or writing the stream failed.
    #[error("the connection failed")]
    Io(#[from] io::Error),
    /// A part of the request would break the request's framing (a line break, a space in the
    /// path, an empty method).
    #[error("the request's {0} holds characters not allowed there")]
    InvalidRequest(&'static str),
    /// The response head is longer than [`MAX_HEAD_LEN`].
    #[error("the response head is longer than {MAX_HEAD_LEN} bytes")]
    HeadTooLarge,
    /// The response head is not HTTP/1.x.
    #[error("the response is not valid HTTP/1.1")]
    MalformedHead(#[source] httparse::Error),
    /// The `Content-Length` header is missing a number or appears with different values.
    #[error("the response has an invalid Content-Length")]
    BadContentLength,
    /// The response uses a transfer coding (such as chunked), which this client does not read.
    #[error("the response uses Transfer-Encoding, which this client does not support")]
    TransferEncoding,
    /// The response is an interim (1xx) response, which this client never asks for.
    #[error("the server sent an interim {0} response")]
    Interim(u16),
    /// The body is longer than the caller allowed.
    #[error("the response body is longer than {limit} bytes")]
    BodyTooLarge {
        /// The caller's limit.
        limit: usize,
    },
    /// The stream ended before the head or the announced body was complete.
    #[error("the connection closed before the response was complete")]
    Truncated,
}

/// Sends one request on `stream` and reads the response.
///
/// `host` is the `Host` header (with `:port` if not the default); `headers` are added as given.
/// When `body` is given it is sent with its `Content-Length`. The response body is read up to
/// `max_body` bytes; a longer one is an error, not a truncation.
pub async fn request<S>(
    mut stream: S,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    max_body: usize,
) -> Result<Response, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = request_head(method, host, path, headers, body.map(<[u8]>::len))?;
    stream.write_all(head.as_bytes()).await?;
    if let Some(body) = body {
        stream.write_all(body).await?;
    }
    stream.flush().await?;

    let (status, content_length, mut buf) = read_head(&mut stream).await?;
    let no_body = method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304;
    let body = if no_body {
        Vec::new()
    } else {
        match content_length {
            Some(len) => {
                if len > max_body as u64 {
                    return Err(HttpError::BodyTooLarge { limit: max_body });
                }
                // Bounded by max_body just above.
                let len = len as usize;
                if buf.len() < len {
                    let have = buf.len();
                    buf.resize(len, 0);
                    read_exact_or_truncated(&mut stream, &mut buf[have..]).await?;
                }
                // Anything past the announced length is not part of this response.
                buf.truncate(len);
                buf
            }
            None => read_to_end_bounded(&mut stream, buf, max_body).await?,
        }
    };
    // Close our side politely (for TLS, a close_notify); the response is already complete.
    if let Err(err) = stream.shutdown().await {
        tracing::debug!(%err, "closing the HTTP stream failed");
    }
    Ok(Response { status, body })
}

/// Renders the request line and headers, refusing anything that could split them.
fn request_head(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body_len: Option<usize>,
) -> Result<String, HttpError> {
    let is_token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
    };
    let is_value = |s: &str| s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
    if !is_token(method) {
        return Err(HttpError::InvalidRequest("method"));
    }
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HttpError::InvalidRequest("host"));
    }
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HttpError::InvalidRequest("path"));
    }
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        if !is_token(name) {
            return Err(HttpError::InvalidRequest("header name"));
        }
        if !is_value(value) {
            return Err(HttpError::InvalidRequest("header value"));
        }
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    if let Some(len) = body_len {
        head.push_str(&format!("Content-Length: {len}\r\n"));
    }
    head.push_str("\r\n");
    Ok(head)
}

/// Reads until a complete response head; returns the status, the Content-Length if any, and
/// the bytes read past the head.
async fn read_head<S>(stream: &mut S) -> Result<(u16, Option<u64>, Vec<u8>), HttpError>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let room = MAX_HEAD_LEN + 1 - buf.len();
        let want = room.min(chunk.len());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(HttpError::Truncated);
        }
        let searched_from = buf.len().saturating_sub(2);
        buf.extend_from_slice(&chunk[..n]);
        // The head ends at a blank line; parse only once one may have arrived.
        let window = &buf[searched_from..];
        let may_be_complete =
            window.windows(2).any(|w| w == b"\n\n") || window.windows(3).any(|w| w == b"\n\r\n");
        if !may_be_complete {
            if buf.len() > MAX_HEAD_LEN {
                return Err(HttpError::HeadTooLarge);
            }
            continue;
        }

        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) if head_len > MAX_HEAD_LEN => {
                return Err(HttpError::HeadTooLarge);
            }
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response.code.ok_or(HttpError::Truncated)?;
                if (100..200).contains(&status) {
                    return Err(HttpError::Interim(status));
                }
                let content_length = content_length(response.headers)?;
                return Ok((status, content_length, buf.split_off(head_len)));
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > MAX_HEAD_LEN {
                    return Err(HttpError::HeadTooLarge);
                }
            }
            Err(err) => return Err(HttpError::MalformedHead(err)),
        }
    }
}

/// The response's Content-Length, refusing transfer codings and conflicting lengths.
fn content_length(headers: &[httparse::Header<'_>]) -> Result<Option<u64>, HttpError> {
    let mut length = None;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let text =
                std::str::from_utf8(header.value).map_err(|_| HttpError::BadContentLength)?;
            let text = text.trim();
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::BadContentLength);
            }
            let value: u64 = text.parse().map_err(|_| HttpError::BadContentLength)?;
            if length.is_some_and(|previous| previous != value) {
                return Err(HttpError::BadContentLength);
            }
            length = Some(value);
        }
    }
    Ok(length)
}

async fn read_exact_or_truncated<S>(stream: &mut S, buf: &mut [u8]) -> Result<(), HttpError>
where
    S: AsyncRead + Unpin,
{
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Err(HttpError::Truncated),
        Err(err) => Err(HttpError::Io(err)),
    }
}

/// Reads to the end of the stream, keeping at most `max` bytes.
async fn read_to_end_bounded<S>(
    stream: &mut S,
    mut buf: Vec<u8>,
    max: usize,
) -> Result<Vec<u8>, HttpError>
where
    S: AsyncRead + Unpin,
{
    if buf.len() > max {
        return Err(HttpError::BodyTooLarge { limit: max });
    }
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(buf);
        }
        if buf.len() + n > max {
            return Err(HttpError::BodyTooLarge { limit: max });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, DuplexStream};

    use super::*;

    /// Runs a one-shot server on the far end of a tiny duplex pipe: it reads the request head
    /// (and `body_len` more bytes), answers `response`, and returns what it read.
    fn serve(
        response: Vec<u8>,
        body_len: usize,
    ) -> (DuplexStream, tokio::task::JoinHandle<Vec<u8>>) {
        let (client, mut server) = duplex(7);
        let task = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut byte = [0u8; 1];
            while !got.ends_with(b"\r\n\r\n") {
                if server.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                got.push(byte[0]);
            }
            let mut body = vec![0u8; body_len];
            server.read_exact(&mut body).await.unwrap();
            got.extend_from_slice(&body);
            // The client may have stopped reading (too large); ignore a broken pipe.
            let _ = server.write_all(&response).await;
            let _ = server.shutdown().await;
            got
        });
        (client, task)
    }

    #[tokio::test]
    async fn get_with_content_length() {
        let (stream, server) = serve(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Other: y\r\n\r\nhello".to_vec(),
            0,
        );
        let response = request(
            stream,
            "GET",
            "disc.example:8443",
            "/v1/proxies?host=a.test",
            &[("Accept", "application/json")],
            None,
            100,
        )
        .await
        .unwrap();
        assert_eq!(
            response,
            Response {
                status: 200,
                body: b"hello".to_vec()
            }
        );
        let sent = String::from_utf8(server.await.unwrap()).unwrap();
        assert_eq!(
            sent,
            "GET /v1/proxies?host=a.test HTTP/1.1\r\nHost: disc.example:8443\r\n\
             Connection: close\r\nAccept: application/json\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn post_body_and_empty_response() {
        let (stream, server) = serve(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), 4);
        let response = request(stream, "POST", "d.test", "/x", &[], Some(b"{}{}"), 10)
            .await
            .unwrap();
        assert_eq!(response.status, 204);
        assert!(response.body.is_empty());
        let sent = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(sent.contains("Content-Length: 4\r\n\r\n{}{}"), "{sent}");
    }

    #[tokio::test]
    async fn body_to_eof_without_content_length() {
        let (stream, _server) = serve(b"HTTP/1.0 200 OK\r\n\r\nsome body".to_vec(), 0);
        let response = request(stream, "GET", "d.test", "/", &[], None, 100)
            .await
            .unwrap();
        assert_eq!(response.body, b"some body");
    }

    #[tokio::test]
    async fn oversized_responses_are_refused() {
        let (stream, _server) = serve(
            b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n".to_vec(),
            0,
        );
        let err = request(stream, "GET", "d.test", "/", &[], None, 100)
            .await
            .unwrap_err();
        assert!(
            matches!(err, HttpError::BodyTooLarge { limit: 100 }),
            "{err:?}"
        );

        let mut eof_body = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        eof_body.extend_from_slice(&[b'x'; 101]);
        let (stream, _server) = serve(eof_body, 0);
        let err = request(stream, "GET", "d.test", "/", &[], None, 100)
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::BodyTooLarge { .. }), "{err:?}");

        let mut huge_head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..2000 {
            huge_head.extend_from_slice(format!("X-{i}: yyyy\r\n").as_bytes());
        }
        let (stream, _server) = serve(huge_head, 0);
        let err = request(stream, "GET", "d.test", "/", &[], None, 100)
            .await
            .unwrap_err();
        // Either limit may trip first; both refuse the response.
        assert!(
            matches!(
                err,
                HttpError::HeadTooLarge | HttpError::MalformedHead(httparse::Error::TooManyHeaders)
            ),
            "{err:?}"
        );

        let long_line = format!("HTTP/1.1 200 OK\r\nX: {}\r\n\r\n", "y".repeat(MAX_HEAD_LEN));
        let (stream, _server) = serve(long_line.into_bytes(), 0);
        let err = request(stream, "GET", "d.test", "/", &[], None, 100)
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::HeadTooLarge), "{err:?}");
    }

    #[tokio::test]
    async fn malformed_responses_are_refused() {
        type Check = fn(&HttpError) -> bool;
        let cases: [(&[u8], Check); 7] = [
            (b"NOT HTTP\r\n\r\n", |e| {
                matches!(e, HttpError::MalformedHead(_))
            }),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                |e| matches!(e, HttpError::TransferEncoding),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                |e| matches!(e, HttpError::BadContentLength),
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", |e| {
                matches!(e, HttpError::BadContentLength)
            }),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", |e| {
                matches!(e, HttpError::Truncated)
            }),
            (b"HTTP/1.1 200 OK\r\nContent-", |e| {
                matches!(e, HttpError::Truncated)
            }),
            (b"HTTP/1.1 100 Continue\r\n\r\n", |e| {
                matches!(e, HttpError::Interim(100))
            }),
        ];
        for (response, expected) in cases {
            let (stream, _server) = serve(response.to_vec(), 0);
            let err = request(stream, "GET", "d.test", "/", &[], None, 100)
                .await
                .unwrap_err();
            assert!(
                expected(&err),
                "{:?}: {err:?}",
                String::from_utf8_lossy(response)
            );
        }
    }

    #[tokio::test]
    async fn request_injection_is_refused() {
        for (method, host, path, header) in [
            ("GET\r\n", "d.test", "/", ("A", "b")),
            ("GET", "d.test\r\nX: y", "/", ("A", "b")),
            ("GET", "d.test", "/ HTTP/1.1\r\n", ("A", "b")),
            ("GET", "d.test", "relative", ("A", "b")),
            ("GET", "d.test", "/", ("A:", "b")),
            ("GET", "d.test", "/", ("A", "b\r\nX: y")),
        ] {
            let (client, _server) = duplex(64);
            let err = request(client, method, host, path, &[header], None, 10)
                .await
                .unwrap_err();
            assert!(matches!(err, HttpError::InvalidRequest(_)), "{err:?}");
        }
    }
}
