//! A visitor's ClientHello, read without answering it.
//!
//! With ACME, a TLS stream may be a certificate authority validating the hostname
//! (TLS-ALPN-01: ALPN `acme-tls/1` only) rather than a visitor, and the client must answer
//! that itself, whether or not it terminates visitors' TLS. It reads the ClientHello first,
//! keeping the bytes, decides, and hands the bytes on with [`shroud_mux::replay::Replay`] (to
//! a TLS acceptor) or writes them to the origin (which terminates TLS itself).

use std::io;

use rustls::server::Acceptor;
use shroud_mux::replay::{read_more, ReadMore};
use tokio::io::AsyncRead;

/// Largest ClientHello read, records included, in bytes.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// What the ClientHello asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The server name, if any.
    pub sni: Option<String>,
    /// The ALPN protocols offered, in order.
    pub alpn: Vec<Vec<u8>>,
}

impl Hello {
    /// Whether this is a TLS-ALPN-01 validation: `acme-tls/1` is the only protocol offered
    /// (RFC 8737 §3), so no browser's ClientHello is ever taken for one.
    pub fn is_acme_validation(&self) -> bool {
        self.alpn.len() == 1 && self.alpn[0] == crate::acme::ACME_TLS_ALPN
    }
}

/// Reads one ClientHello from `io`, at most [`MAX_CLIENT_HELLO`] bytes: what it asks for, and
/// every byte read (the ClientHello, and possibly what followed it in the same read).
///
/// Applies no deadline: callers wrap it in a timeout.
pub async fn read_client_hello<R: AsyncRead + Unpin>(io: &mut R) -> io::Result<(Hello, Vec<u8>)> {
    let mut acceptor = Acceptor::default();
    let mut bytes = Vec::new();
    loop {
        let before = bytes.len();
        match read_more(io, &mut bytes, MAX_CLIENT_HELLO).await? {
            ReadMore::Read(_) => {}
            ReadMore::Full => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "ClientHello larger than 16 KiB",
                ))
            }
            ReadMore::Eof => return Err(io::ErrorKind::UnexpectedEof.into()),
        }
        let mut fresh = &bytes[before..];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let found = Hello {
                    sni: hello.server_name().map(str::to_owned),
                    alpn: hello
                        .alpn()
                        .map(|offered| offered.map(<[u8]>::to_vec).collect())
                        .unwrap_or_default(),
                };
                return Ok((found, bytes));
            }
            Ok(None) => {}
            Err((err, _alert)) => return Err(io::Error::new(io::ErrorKind::InvalidData, err)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use tokio::io::AsyncReadExt as _;

    use super::*;

    /// The bytes a rustls client sends first, offering `alpn`.
    async fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from("example.test").unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let handshake = tokio::spawn(async move { connector.connect(name, client).await });
        let mut buf = vec![0u8; 64 * 1024];
        let n = server.read(&mut buf).await.unwrap();
        buf.truncate(n);
        handshake.abort();
        buf
    }

    #[tokio::test]
    async fn a_validation_is_told_from_a_visitor() {
        let validation = client_hello(&[b"acme-tls/1"]).await;
        let (hello, bytes) = read_client_hello(&mut validation.as_slice()).await.unwrap();
        assert_eq!(hello.sni.as_deref(), Some("example.test"));
        assert!(hello.is_acme_validation());
        assert_eq!(bytes, validation);

        for alpn in [&[][..], &[&b"h2"[..], b"http/1.1"], &[b"acme-tls/1", b"h2"]] {
            let visitor = client_hello(alpn).await;
            let (hello, _) = read_client_hello(&mut visitor.as_slice()).await.unwrap();
            assert!(!hello.is_acme_validation(), "{alpn:?}");
        }
    }

    /// Yields one byte per read, as the slowest network would.
    struct OneByte<'a>(&'a [u8]);

    impl AsyncRead for OneByte<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            if let Some((first, rest)) = self.0.split_first() {
                buf.put_slice(&[*first]);
                self.0 = rest;
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn any_split_of_the_hello_is_read_whole() {
        let validation = client_hello(&[b"acme-tls/1"]).await;
        let mut slow = OneByte(&validation);
        let (hello, bytes) = read_client_hello(&mut slow).await.unwrap();
        assert!(hello.is_acme_validation());
        assert_eq!(bytes, validation);
    }

    #[tokio::test]
    async fn junk_and_truncation_are_errors() {
        let junk = b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n".to_vec();
        assert!(read_client_hello(&mut junk.as_slice()).await.is_err());
        let validation = client_hello(&[b"acme-tls/1"]).await;
        let cut = &validation[..validation.len() / 2];
        let err = read_client_hello(&mut &cut[..]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
