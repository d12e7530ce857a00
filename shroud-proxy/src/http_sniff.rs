//! Reads the head of a plain-HTTP request, to learn which host a visitor asks for.
//!
//! The proxy does not speak HTTP beyond this: it finds the host (and the path, for a redirect
//! to HTTPS), then replays every byte it read to the origin, or answers with a
//! [`simple_response`] and closes.

use std::io;

use tokio::io::AsyncRead;

use shroud_mux::replay::{read_more, ReadMore};

/// The most header lines a request head may have.
const MAX_HEADERS: usize = 64;

/// What the proxy learns from a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The host the request is for, normalised, without a port. Taken from the authority of an
    /// absolute-form target if there is one, else from the `Host` header.
    pub host: String,
    /// The path and query to use in a redirect: the origin-form target as given, or the path
    /// and query of an absolute-form target; `/` if there is none.
    pub path: String,
}

/// Why a request head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpSniffError {
    /// Reading from the connection failed.
    #[error("reading the HTTP request head failed")]
    Io(#[from] io::Error),
    /// The connection closed before the head was complete.
    #[error("connection closed before the HTTP request head was complete")]
    Eof,
    /// The head did not fit in the allowed number of bytes.
    #[error("HTTP request head is larger than the proxy accepts")]
    TooLarge,
    /// The head has more header lines than the proxy accepts.
    #[error("HTTP request head has more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    /// The bytes are not an HTTP/1.x request head.
    #[error("malformed HTTP request head: {0}")]
    Malformed(httparse::Error),
    /// An HTTP/1.1 request with neither a `Host` header nor an absolute-form target, or an
    /// HTTP/1.0 request without a `Host` header.
    #[error("HTTP request names no host")]
    MissingHost,
    /// More than one `Host` header.
    #[error("HTTP request has more than one Host header")]
    DuplicateHost,
    /// The host is not a hostname the proxy could route (the reason says why).
    #[error("HTTP request has an unusable host: {0}")]
    BadHost(String),
}

/// Reads from `io` until a whole request head has arrived.
///
/// Returns the host and path together with every byte read, including any that came after the
/// head (a body, or pipelined requests): the caller must replay them all to the origin. Fails
/// with [`HttpSniffError::TooLarge`] rather than buffer more than `max_len` bytes. There is no
/// deadline in here: the caller wraps this in `tokio::time::timeout`.
pub async fn read_request_head<R: AsyncRead + Unpin>(
    io: &mut R,
    max_len: usize,
) -> Result<(RequestHead, Vec<u8>), HttpSniffError> {
    let mut buf = Vec::new();
    // Parsing again is only worth it once a new line has arrived (a head ends with an empty
    // line) and something other than the empty lines a client may send before a request has.
    // That keeps a client trickling bytes in from costing quadratic work.
    let mut seen_content = false;
    loop {
        let filled = buf.len();
        match read_more(io, &mut buf, max_len).await? {
            ReadMore::Read(_) => {}
            ReadMore::Full => return Err(HttpSniffError::TooLarge),
            ReadMore::Eof => return Err(HttpSniffError::Eof),
        }
        let new = &buf[filled..];
        let first_content = !seen_content && new.iter().any(|b| !matches!(b, b'\r' | b'\n'));
        seen_content |= first_content;
        if seen_content && (first_content || new.contains(&b'\n')) {
            if let Some(head) = parse_head(&buf)? {
                return Ok((head, buf));
            }
        }
    }
}

/// Parses the request head at the start of `buf`; `Ok(None)` if it is not complete yet.
fn parse_head(buf: &[u8]) -> Result<Option<RequestHead>, HttpSniffError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpSniffError::TooManyHeaders),
        Err(err) => return Err(HttpSniffError::Malformed(err)),
    }

    let mut host_header = None;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("host") {
            if host_header.is_some() {
                return Err(HttpSniffError::DuplicateHost);
            }
            host_header = Some(header.value);
        }
    }

    // httparse only completes a head with a method, a target and a version.
    let target = request.path.unwrap_or("/");
    if let Some((authority, path)) = split_absolute_form(target) {
        // RFC 9112 section 3.2.2: the target's authority overrides the Host header.
        return Ok(Some(RequestHead {
            host: parse_authority(authority)?,
            path,
        }));
    }
    let path = if target.starts_with('/') {
        target.to_string()
    } else {
        // Asterisk-form (`OPTIONS *`) and authority-form (`CONNECT`) targets hold no path.
        "/".to_string()
    };
    let value = host_header.ok_or(HttpSniffError::MissingHost)?;
    let value = std::str::from_utf8(value)
        .map_err(|_| HttpSniffError::BadHost("Host header is not ASCII".into()))?;
    Ok(Some(RequestHead {
        host: parse_authority(value.trim_matches([' ', '\t']))?,
        path,
    }))
}

/// Splits an absolute-form `http` or `https` target into its authority and the path and
/// query to redirect to.
fn split_absolute_form(target: &str) -> Option<(&str, String)> {
    let rest = ["http://", "https://"].iter().find_map(|scheme| {
        let prefix = target.get(..scheme.len())?;
        prefix
            .eq_ignore_ascii_case(scheme)
            .then(|| &target[scheme.len()..])
    })?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let path = path.split('#').next().unwrap_or_default();
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    Some((authority, path))
}

/// Reads the host out of an authority (`host`, `host:port`), refusing what could never route.
fn parse_authority(authority: &str) -> Result<String, HttpSniffError> {
    let bad = |why: &str| Err(HttpSniffError::BadHost(why.to_string()));
    if authority.starts_with('[') {
        return bad("IP literals in brackets are never routed");
    }
    if authority.contains('@') {
        return bad("user information is not allowed in the authority");
    }
    let host = match authority.split_once(':') {
        None => authority,
        Some((host, port)) => {
            // RFC 3986 allows an empty port; anything else must be a port number.
            if !port.is_empty()
                && (!port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err())
            {
                return bad("port is not a number");
            }
            host
        }
    };
    shroud_mux::hostname::normalize(host).map_err(|err| HttpSniffError::BadHost(err.to_string()))
}

/// Builds a complete, small `text/plain` response that closes the connection.
///
/// Carriage returns and line feeds are dropped from `reason` and the extra headers, so that
/// no caller can split the response by passing them through.
pub fn simple_response(
    status: u16,
    reason: &str,
    extra_headers: &[(&str, &str)],
    body: &str,
) -> Vec<u8> {
    let clean = |text: &str| text.replace(['\r', '\n'], "");
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n",
        clean(reason),
        body.len()
    );
    for (name, value) in extra_headers {
        head.push_str(&format!("{}: {}\r\n", clean(name), clean(value)));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::OneByte;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const MAX: usize = 8 * 1024;

    async fn read(bytes: &[u8]) -> Result<(RequestHead, Vec<u8>), HttpSniffError> {
        let mut reader = bytes;
        read_request_head(&mut reader, MAX).await
    }

    async fn head(bytes: &str) -> RequestHead {
        read(bytes.as_bytes()).await.unwrap().0
    }

    async fn bad_host(bytes: &str) -> String {
        match read(bytes.as_bytes()).await {
            Err(HttpSniffError::BadHost(why)) => why,
            other => panic!("expected BadHost for {bytes:?}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn host_is_normalised_and_port_stripped() {
        let got = head("GET /a/b?c=d HTTP/1.1\r\nHOST: WWW.Example.Test.:8080\r\n\r\n").await;
        assert_eq!(
            got,
            RequestHead {
                host: "www.example.test".into(),
                path: "/a/b?c=d".into()
            }
        );
        let got = head("GET / HTTP/1.1\r\nhost:   example.test  \r\n\r\n").await;
        assert_eq!(got.host, "example.test");
        let got = head("GET / HTTP/1.1\r\nhost: example.test:\r\n\r\n").await;
        assert_eq!(got.host, "example.test");
    }

    #[tokio::test]
    async fn other_headers_and_bare_line_feeds_are_fine() {
        let got =
            head("\r\nPOST /x HTTP/1.1\nUser-Agent: t\nX-Host: evil.test\nHost: a.test\n\n").await;
        assert_eq!(got.host, "a.test");
        assert_eq!(got.path, "/x");
    }

    #[tokio::test]
    async fn absolute_form_overrides_host() {
        let got = head("GET http://Example.test:80/a?b HTTP/1.1\r\nHost: other.test\r\n\r\n").await;
        assert_eq!(got.host, "example.test");
        assert_eq!(got.path, "/a?b");
        let got = head("GET HTTPS://example.test HTTP/1.1\r\n\r\n").await;
        assert_eq!(got.path, "/");
        let got = head("GET http://example.test?q=1 HTTP/1.1\r\n\r\n").await;
        assert_eq!(got.path, "/?q=1");
        bad_host("GET http://[::1]/ HTTP/1.1\r\n\r\n").await;
        bad_host("GET http://user@example.test/ HTTP/1.1\r\n\r\n").await;
        bad_host("GET http:///x HTTP/1.1\r\nHost: example.test\r\n\r\n").await;
    }

    #[tokio::test]
    async fn other_target_forms_redirect_to_root() {
        let got = head("OPTIONS * HTTP/1.1\r\nHost: example.test\r\n\r\n").await;
        assert_eq!(got.path, "/");
        let got = head("CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n").await;
        assert_eq!(got.host, "example.test");
        assert_eq!(got.path, "/");
    }

    #[tokio::test]
    async fn host_problems_are_reported() {
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\nHost: a.test\r\nhost: a.test\r\n\r\n").await,
            Err(HttpSniffError::DuplicateHost)
        ));
        assert!(matches!(
            read(b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n").await,
            Err(HttpSniffError::DuplicateHost)
        ));
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n").await,
            Err(HttpSniffError::MissingHost)
        ));
        assert!(matches!(
            read(b"GET / HTTP/1.0\r\n\r\n").await,
            Err(HttpSniffError::MissingHost)
        ));
        let got = head("GET / HTTP/1.0\r\nHost: old.test\r\n\r\n").await;
        assert_eq!(got.host, "old.test");

        bad_host("GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n").await;
        bad_host("GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n").await;
        bad_host("GET / HTTP/1.1\r\nHost: ::1\r\n\r\n").await;
        bad_host("GET / HTTP/1.1\r\nHost: a.test:http\r\n\r\n").await;
        bad_host("GET / HTTP/1.1\r\nHost: a.test:99999\r\n\r\n").await;
        bad_host("GET / HTTP/1.1\r\nHost: a.test:+80\r\n\r\n").await;
        bad_host("GET / HTTP/1.1\r\nHost: \r\n\r\n").await;
        bad_host("GET / HTTP/1.1\r\nHost: a b.test\r\n\r\n").await;
        bad_host("GET / HTTP/1.1\r\nHost: a..test\r\n\r\n").await;
        bad_host("GET / HTTP/1.1\r\nHost: -a.test\r\n\r\n").await;
        let why = bad_host("GET / HTTP/1.1\r\nHost: a.test:x\r\n\r\n").await;
        assert_eq!(why, "port is not a number");
        let mut non_ascii = b"GET / HTTP/1.1\r\nHost: \xc3\xa9.test\r\n\r\n".to_vec();
        assert!(matches!(
            read(&non_ascii).await,
            Err(HttpSniffError::BadHost(_))
        ));
        non_ascii[22] = 0xff;
        assert!(read(&non_ascii).await.is_err());
    }

    #[tokio::test]
    async fn one_byte_reads_return_every_byte() {
        let request = b"GET /p HTTP/1.1\r\nHost: Example.test\r\n\r\n";
        let mut reader = OneByte(request);
        let (got, bytes) = read_request_head(&mut reader, MAX).await.unwrap();
        assert_eq!(got.host, "example.test");
        assert_eq!(got.path, "/p");
        assert_eq!(bytes, request);
    }

    #[tokio::test]
    async fn tiny_duplex_delivers_the_head_in_pieces() {
        let request = b"GET /p HTTP/1.1\r\nHost: example.test\r\nContent-Length: 2\r\n\r\nhi";
        let (mut client, mut server) = tokio::io::duplex(2);
        let writer = tokio::spawn(async move {
            client.write_all(request).await?;
            client.shutdown().await
        });
        let (got, mut bytes) = read_request_head(&mut server, MAX).await.unwrap();
        assert_eq!(got.host, "example.test");
        server.read_to_end(&mut bytes).await.unwrap();
        assert_eq!(bytes, request);
        writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn pipelined_bytes_are_returned() {
        let request =
            b"GET /1 HTTP/1.1\r\nHost: a.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: b.test\r\n\r\n";
        let (got, bytes) = read(request).await.unwrap();
        assert_eq!(got.host, "a.test");
        assert_eq!(got.path, "/1");
        assert_eq!(bytes, request);
    }

    #[tokio::test]
    async fn size_and_shape_limits() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: a.test\r\n\r\n", "x".repeat(MAX));
        assert!(matches!(
            read(long.as_bytes()).await,
            Err(HttpSniffError::TooLarge)
        ));
        let empty_lines = "\r\n".repeat(MAX);
        assert!(matches!(
            read(empty_lines.as_bytes()).await,
            Err(HttpSniffError::TooLarge)
        ));
        // Exactly at the limit is fine.
        let request = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n";
        let mut reader = &request[..];
        assert!(read_request_head(&mut reader, request.len()).await.is_ok());
        let mut reader = &request[..];
        assert!(matches!(
            read_request_head(&mut reader, request.len() - 1).await,
            Err(HttpSniffError::TooLarge)
        ));

        let many = format!(
            "GET / HTTP/1.1\r\nHost: a.test\r\n{}\r\n",
            "X-A: b\r\n".repeat(MAX_HEADERS)
        );
        assert!(matches!(
            read(many.as_bytes()).await,
            Err(HttpSniffError::TooManyHeaders)
        ));
        assert!(matches!(
            read(b"GET / HTTP/1.1\r\nHost: a.test").await,
            Err(HttpSniffError::Eof)
        ));
        assert!(matches!(read(b"").await, Err(HttpSniffError::Eof)));
        assert!(matches!(
            read(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n").await,
            Err(HttpSniffError::Malformed(_))
        ));
        assert!(matches!(
            read(b"GET / HTTP/2.0\r\nHost: a.test\r\n\r\n").await,
            Err(HttpSniffError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn garbage_is_refused_early() {
        // No line feed comes, yet the first bytes are enough to refuse.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"\x16\x03\x01\x02\x00").await.unwrap();
        // Were the bytes not refused as they come, this would end in Eof instead.
        drop(client);
        assert!(matches!(
            read_request_head(&mut server, MAX).await,
            Err(HttpSniffError::Malformed(_))
        ));
    }

    #[test]
    fn simple_response_is_well_formed() {
        let response = simple_response(
            308,
            "Permanent Redirect",
            &[("Location", "https://a.test/x")],
            "moved\n",
        );
        assert_eq!(
            String::from_utf8(response).unwrap(),
            "HTTP/1.1 308 Permanent Redirect\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 6\r\n\
             Connection: close\r\n\
             Location: https://a.test/x\r\n\
             \r\n\
             moved\n"
        );
        let response = simple_response(404, "Not\r\nFound", &[("X", "a\r\nSet-Cookie: b")], "é");
        let text = String::from_utf8(response).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 NotFound\r\n"));
        assert!(text.contains("Content-Length: 2\r\n"));
        assert!(text.contains("X: aSet-Cookie: b\r\n"));
    }
}
