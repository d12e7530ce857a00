//! Reads a TLS ClientHello without terminating TLS.
//!
//! The proxy routes a visitor's connection by the server name it asks for, yet never holds the
//! origin's keys: it reads just enough of the first flight to find the `server_name` and ALPN
//! extensions, then replays every byte it read to the origin through the tunnel.
//!
//! The parser works on whatever prefix of the stream has arrived. It walks the TLS records
//! (a ClientHello may be split across several, and a record may arrive in pieces), gathers the
//! handshake bytes they carry, and parses the ClientHello once all of it is there. Every length
//! is checked against what is left, so no input makes it panic.

use std::collections::HashSet;
use std::io;

use tokio::io::AsyncRead;

use shroud_mux::replay::{read_more, ReadMore};

/// TLS record content type of a handshake record.
const CONTENT_HANDSHAKE: u8 = 22;
/// TLS record content type of an alert record.
const CONTENT_ALERT: u8 = 21;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Length of a TLS record header: type, version, length.
const RECORD_HEADER_LEN: usize = 5;
/// Length of a handshake message header: type and a 24-bit length.
const HANDSHAKE_HEADER_LEN: usize = 4;
/// The largest record body accepted: 2^14 bytes of plaintext, plus the 256 bytes of slack
/// that RFC 5246 allows a compressed record.
const MAX_RECORD_LEN: usize = 16384 + 256;
/// Extension type of `server_name` (RFC 6066).
const EXT_SERVER_NAME: u16 = 0;
/// Extension type of `application_layer_protocol_negotiation` (RFC 7301).
const EXT_ALPN: u16 = 16;
/// `NameType` of a DNS host name in the `server_name` extension.
const NAME_TYPE_HOST_NAME: u8 = 0;

/// What the proxy learns from a ClientHello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `host_name` of the `server_name` extension, normalised; `None` when the client sent
    /// no server name (for instance because it connected to an IP address).
    pub sni: Option<String>,
    /// The ALPN protocol names the client offers, in its order of preference; empty when it
    /// sent no ALPN extension.
    pub alpn: Vec<Vec<u8>>,
}

/// Why a ClientHello could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SniffError {
    /// Reading from the connection failed.
    #[error("reading the TLS ClientHello failed")]
    Io(#[from] io::Error),
    /// The connection closed before the ClientHello was complete.
    #[error("connection closed before the TLS ClientHello was complete")]
    Eof,
    /// The ClientHello did not fit in the allowed number of bytes.
    #[error("TLS ClientHello is larger than the proxy accepts")]
    TooLarge,
    /// The first bytes are not a TLS handshake record.
    #[error("not TLS: the connection does not start with a TLS handshake record")]
    NotTls,
    /// The bytes are TLS records but do not hold a well-formed ClientHello.
    #[error("malformed TLS ClientHello: {0}")]
    Malformed(&'static str),
}

/// Parses the ClientHello at the start of `buf`, the bytes a visitor has sent so far.
///
/// Returns `Ok(None)` while the bytes are a valid but incomplete prefix of a ClientHello, and
/// the hello's contents once it is complete. Bytes after the ClientHello are ignored.
pub fn parse_client_hello(buf: &[u8]) -> Result<Option<ClientHelloInfo>, SniffError> {
    match scan(buf)? {
        Scan::Done(info) => Ok(Some(info)),
        Scan::Need { .. } => Ok(None),
    }
}

/// Reads from `io` until a whole ClientHello has arrived.
///
/// Returns what the hello says together with every byte read, which the caller must replay to
/// the origin. Fails with [`SniffError::TooLarge`] rather than buffer more than `max_len` bytes.
/// There is no deadline in here: the caller wraps this in `tokio::time::timeout`.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    io: &mut R,
    max_len: usize,
) -> Result<(ClientHelloInfo, Vec<u8>), SniffError> {
    let mut buf = Vec::new();
    // Only parse again once enough bytes are there to change the outcome, so a client that
    // trickles its hello in one byte at a time costs linear, not quadratic, work.
    let mut parse_at = 1;
    loop {
        if buf.len() >= parse_at {
            match scan(&buf)? {
                Scan::Done(info) => return Ok((info, buf)),
                Scan::Need {
                    at_least,
                    hello_len,
                } => {
                    // The records carrying a hello are at least as long as the hello itself.
                    let hello_fits = hello_len
                        .is_none_or(|len| len.saturating_add(RECORD_HEADER_LEN) <= max_len);
                    if at_least > max_len || !hello_fits {
                        return Err(SniffError::TooLarge);
                    }
                    parse_at = at_least;
                }
            }
        }
        match read_more(io, &mut buf, max_len).await? {
            ReadMore::Read(_) => {}
            ReadMore::Full => return Err(SniffError::TooLarge),
            ReadMore::Eof => return Err(SniffError::Eof),
        }
    }
}

/// A TLS fatal alert record carrying `unrecognized_name` (112), for the proxy to send before
/// closing a connection whose server name it does not serve.
pub fn unrecognized_name_alert() -> [u8; 7] {
    const UNRECOGNIZED_NAME: u8 = 112;
    fatal_alert(UNRECOGNIZED_NAME)
}

/// A TLS fatal alert record carrying `internal_error` (80), for the proxy to send before
/// closing a connection it turns away because a limit is reached (too many visitors for the
/// name, or the name's tunnel has too many streams open). TLS has no "busy, try later" alert;
/// `internal_error` is the one RFC 8446 gives for a failure "unrelated to the peer or the
/// correctness of the protocol", and browsers show it as a failed connection, not a
/// certificate problem.
pub fn internal_error_alert() -> [u8; 7] {
    const INTERNAL_ERROR: u8 = 80;
    fatal_alert(INTERNAL_ERROR)
}

/// A plaintext alert record (legacy version TLS 1.2, as records before the handshake carry)
/// of level fatal with `description`.
fn fatal_alert(description: u8) -> [u8; 7] {
    const LEVEL_FATAL: u8 = 2;
    [
        CONTENT_ALERT,
        0x03,
        0x03,
        0x00,
        0x02,
        LEVEL_FATAL,
        description,
    ]
}

/// Where a scan of the buffered bytes got to.
enum Scan {
    /// The ClientHello is complete.
    Done(ClientHelloInfo),
    /// More bytes are needed.
    Need {
        /// Nothing new can be learnt before the buffer holds this many bytes.
        at_least: usize,
        /// The length of the ClientHello message, once its header has arrived.
        hello_len: Option<usize>,
    },
}

/// Walks the records in `buf`, gathering handshake bytes until the ClientHello is complete.
fn scan(buf: &[u8]) -> Result<Scan, SniffError> {
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        let first_record = pos == 0;
        let rest = buf.get(pos..).unwrap_or_default();
        check_record_header(rest, first_record)?;
        let Some((header, after_header)) = rest.split_first_chunk::<RECORD_HEADER_LEN>() else {
            return Ok(Scan::Need {
                at_least: pos + RECORD_HEADER_LEN,
                hello_len: hello_len(&handshake),
            });
        };
        let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if record_len == 0 {
            return Err(SniffError::Malformed("empty handshake record"));
        }
        if record_len > MAX_RECORD_LEN {
            return Err(SniffError::Malformed("record longer than TLS allows"));
        }
        let body = after_header.get(..record_len).unwrap_or(after_header);
        handshake.extend_from_slice(body);

        // How many more handshake bytes until something new can be checked: the rest of the
        // handshake header, or the rest of the hello.
        if handshake
            .first()
            .is_some_and(|&kind| kind != HANDSHAKE_CLIENT_HELLO)
        {
            return Err(SniffError::Malformed(
                "first handshake message is not a ClientHello",
            ));
        }
        let wanted = match hello_len(&handshake) {
            None => HANDSHAKE_HEADER_LEN - handshake.len(),
            Some(len) if handshake.len() >= len => {
                return parse_hello_body(&handshake[HANDSHAKE_HEADER_LEN..len]).map(Scan::Done);
            }
            Some(len) => len - handshake.len(),
        };
        let record_missing = record_len - body.len();
        if record_missing > 0 {
            return Ok(Scan::Need {
                at_least: buf.len() + record_missing.min(wanted),
                hello_len: hello_len(&handshake),
            });
        }
        pos += RECORD_HEADER_LEN + record_len;
    }
}

/// Checks as much of a record header as `bytes` holds.
fn check_record_header(bytes: &[u8], first_record: bool) -> Result<(), SniffError> {
    let wrong = |what| {
        if first_record {
            SniffError::NotTls
        } else {
            SniffError::Malformed(what)
        }
    };
    if bytes.first().is_some_and(|&t| t != CONTENT_HANDSHAKE) {
        return Err(wrong("a record of another type interrupts the ClientHello"));
    }
    if bytes.get(1).is_some_and(|&major| major != 0x03) {
        return Err(wrong("record version is not TLS"));
    }
    Ok(())
}

/// The total length (header included) of the handshake message at the start of `handshake`,
/// once its header is there.
fn hello_len(handshake: &[u8]) -> Option<usize> {
    let header = handshake.first_chunk::<HANDSHAKE_HEADER_LEN>()?;
    let body_len = u32::from_be_bytes([0, header[1], header[2], header[3]]);
    // A u24 always fits in usize on the platforms tokio supports.
    Some(HANDSHAKE_HEADER_LEN + usize::try_from(body_len).unwrap_or(usize::MAX - 4))
}

/// Parses the body of a ClientHello message (RFC 8446 section 4.1.2, RFC 5246 section 7.4.1.2).
fn parse_hello_body(body: &[u8]) -> Result<ClientHelloInfo, SniffError> {
    let mut r = Reader::new(body);
    r.take(2, "truncated legacy_version")?;
    r.take(32, "truncated random")?;
    let session_id = r.vec8("truncated legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(SniffError::Malformed(
            "legacy_session_id longer than 32 bytes",
        ));
    }
    let suites = r.vec16("truncated cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniffError::Malformed("cipher_suites has a bad length"));
    }
    if r.vec8("truncated legacy_compression_methods")?.is_empty() {
        return Err(SniffError::Malformed("no compression methods"));
    }
    let mut info = ClientHelloInfo::default();
    // TLS 1.2 and earlier allow a hello without any extensions.
    if r.is_empty() {
        return Ok(info);
    }
    let mut extensions = Reader::new(r.vec16("truncated extensions")?);
    if !r.is_empty() {
        return Err(SniffError::Malformed("bytes after the extensions"));
    }
    let mut seen = HashSet::new();
    while !extensions.is_empty() {
        let kind = extensions.u16("truncated extension type")?;
        let data = extensions.vec16("extension overruns the extensions block")?;
        if !seen.insert(kind) {
            return Err(SniffError::Malformed("duplicate extension"));
        }
        match kind {
            EXT_SERVER_NAME => info.sni = parse_server_name(data)?,
            EXT_ALPN => info.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    Ok(info)
}

/// Parses the `server_name` extension's data, returning its normalised `host_name`.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, SniffError> {
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.vec16("truncated server_name list")?);
    if !outer.is_empty() {
        return Err(SniffError::Malformed("bytes after the server_name list"));
    }
    if list.is_empty() {
        return Err(SniffError::Malformed("empty server_name list"));
    }
    let mut host_name = None;
    while !list.is_empty() {
        let name_type = list.u8("truncated server name type")?;
        let name = list.vec16("server name overruns its list")?;
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        if host_name.is_some() {
            return Err(SniffError::Malformed(
                "more than one host_name in server_name",
            ));
        }
        let text = std::str::from_utf8(name)
            .map_err(|_| SniffError::Malformed("server name is not ASCII"))?;
        let normalized = shroud_mux::hostname::normalize(text)
            .map_err(|_| SniffError::Malformed("server name is not a valid hostname"))?;
        host_name = Some(normalized);
    }
    Ok(host_name)
}

/// Parses the ALPN extension's data into its list of protocol names.
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, SniffError> {
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.vec16("truncated ALPN list")?);
    if !outer.is_empty() {
        return Err(SniffError::Malformed("bytes after the ALPN list"));
    }
    if list.is_empty() {
        return Err(SniffError::Malformed("empty ALPN list"));
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let name = list.vec8("ALPN protocol overruns its list")?;
        if name.is_empty() {
            return Err(SniffError::Malformed("empty ALPN protocol name"));
        }
        protocols.push(name.to_vec());
    }
    Ok(protocols)
}

/// A cursor over a byte slice whose every read is bounds-checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Takes the next `n` bytes, or fails with `Malformed(what)` if fewer are left.
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniffError> {
        let (head, rest) = self
            .rest
            .split_at_checked(n)
            .ok_or(SniffError::Malformed(what))?;
        self.rest = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SniffError> {
        let bytes = self.take(1, what)?;
        Ok(bytes[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SniffError> {
        let bytes = self.take(2, what)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], SniffError> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], SniffError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::OneByte;

    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Default cap used in the tests, as the proxy would use it.
    const MAX: usize = 16 * 1024;

    /// The first flight of a real rustls client.
    fn client_hello(server_name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"shroud/1".to_vec(), b"h2".to_vec()];
        let name = ServerName::try_from(server_name.to_string()).expect("server name");
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("write_tls");
        }
        out
    }

    /// The handshake bytes of a stream made of handshake records.
    fn handshake_bytes(records: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = records;
        while let Some((header, after)) = rest.split_first_chunk::<5>() {
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            out.extend_from_slice(&after[..len]);
            rest = &after[len..];
        }
        out
    }

    /// Frames handshake bytes into records, cutting them at `cuts`.
    fn reframe(handshake: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain(std::iter::once(&handshake.len())) {
            let piece = &handshake[start..end];
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(piece.len() as u16).to_be_bytes());
            out.extend_from_slice(piece);
            start = end;
        }
        out
    }

    /// A ClientHello built by hand, with the given extensions.
    fn hello_with_extensions(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0xab; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext.extend_from_slice(data);
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut handshake = vec![1];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        reframe(&handshake, &[])
    }

    fn sni_extension(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![0];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name);
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        data
    }

    fn expect_malformed(buf: &[u8]) -> &'static str {
        match parse_client_hello(buf) {
            Err(SniffError::Malformed(why)) => why,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn real_hello_gives_lower_cased_sni_and_alpn() {
        let hello = client_hello("Example.Test");
        // rustls sends the name as given; lower-casing it is the parser's job.
        assert!(hello.windows(12).any(|w| w == b"Example.Test"));
        let info = parse_client_hello(&hello).unwrap().expect("complete");
        assert_eq!(info.sni.as_deref(), Some("example.test"));
        assert_eq!(info.alpn, vec![b"shroud/1".to_vec(), b"h2".to_vec()]);
    }

    #[test]
    fn hand_built_upper_case_sni_is_normalised() {
        let hello =
            hello_with_extensions(&[(EXT_SERVER_NAME, sni_extension(b"WWW.Example.TEST."))]);
        let info = parse_client_hello(&hello).unwrap().expect("complete");
        assert_eq!(info.sni.as_deref(), Some("www.example.test"));
        assert!(info.alpn.is_empty());
    }

    #[test]
    fn ip_address_gives_no_sni() {
        let hello = client_hello("192.0.2.7");
        let info = parse_client_hello(&hello).unwrap().expect("complete");
        assert_eq!(info.sni, None);
        assert_eq!(info.alpn.len(), 2);
    }

    #[test]
    fn hello_without_extensions_is_accepted() {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&[0, 0, 2, 0, 0x2f, 1, 0]);
        let mut handshake = vec![1, 0, 0, body.len() as u8];
        handshake.extend_from_slice(&body);
        let info = parse_client_hello(&reframe(&handshake, &[]))
            .unwrap()
            .expect("complete");
        assert_eq!(info, ClientHelloInfo::default());
    }

    #[test]
    fn every_proper_prefix_needs_more() {
        let hello = client_hello("example.test");
        for end in 0..hello.len() {
            assert!(
                matches!(parse_client_hello(&hello[..end]), Ok(None)),
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn hello_split_across_records_at_every_point() {
        let hello = client_hello("example.test");
        let handshake = handshake_bytes(&hello);
        let expected = parse_client_hello(&hello).unwrap();
        for cut in 1..handshake.len() {
            let framed = reframe(&handshake, &[cut]);
            assert_eq!(
                parse_client_hello(&framed).unwrap(),
                expected,
                "cut at {cut}"
            );
            for end in 0..framed.len() {
                assert!(matches!(parse_client_hello(&framed[..end]), Ok(None)));
            }
        }
        let many = reframe(&handshake, &[1, 2, 3, 4, 50, 51, 200]);
        assert_eq!(parse_client_hello(&many).unwrap(), expected);
    }

    #[test]
    fn trailing_bytes_after_the_hello_are_ignored() {
        let mut stream = client_hello("example.test");
        stream.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
        let info = parse_client_hello(&stream).unwrap().expect("complete");
        assert_eq!(info.sni.as_deref(), Some("example.test"));
    }

    #[test]
    fn non_tls_is_recognised_from_the_first_bytes() {
        assert!(matches!(parse_client_hello(b"G"), Err(SniffError::NotTls)));
        assert!(matches!(
            parse_client_hello(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"),
            Err(SniffError::NotTls)
        ));
        assert!(matches!(
            parse_client_hello(b"\x16\x04"),
            Err(SniffError::NotTls)
        ));
        assert!(matches!(
            parse_client_hello(&[0x80, 0x2e, 0x01]),
            Err(SniffError::NotTls)
        ));
        assert!(matches!(parse_client_hello(&[]), Ok(None)));
    }

    #[test]
    fn structural_errors_are_malformed() {
        // Not a ClientHello (a ServerHello).
        let mut hello = client_hello("example.test");
        hello[5] = 2;
        expect_malformed(&hello);

        // Record too long, and empty.
        expect_malformed(&[22, 3, 1, 0x41, 0x01]);
        expect_malformed(&[22, 3, 1, 0, 0]);

        // A record of another type in the middle of the hello.
        let handshake = handshake_bytes(&client_hello("example.test"));
        let mut framed = reframe(&handshake, &[10]);
        let second = 5 + 10;
        framed[second] = 23;
        expect_malformed(&framed);

        // The handshake length claims less than the body holds.
        let mut short = client_hello("example.test");
        let len = u32::from_be_bytes([0, short[6], short[7], short[8]]) - 1;
        short[6..9].copy_from_slice(&len.to_be_bytes()[1..]);
        expect_malformed(&short);
    }

    #[test]
    fn duplicate_extensions_are_refused() {
        let sni = sni_extension(b"example.test");
        let hello =
            hello_with_extensions(&[(EXT_SERVER_NAME, sni.clone()), (EXT_SERVER_NAME, sni)]);
        assert_eq!(expect_malformed(&hello), "duplicate extension");
        let hello = hello_with_extensions(&[(0xff01, vec![0]), (0xff01, vec![0])]);
        assert_eq!(expect_malformed(&hello), "duplicate extension");
    }

    #[test]
    fn bad_server_names_are_refused() {
        for name in [
            &b"bad name.test"[..],
            b"",
            b"a..b",
            b"\xff.test",
            b"-x.test",
        ] {
            let hello = hello_with_extensions(&[(EXT_SERVER_NAME, sni_extension(name))]);
            expect_malformed(&hello);
        }
        let mut two = sni_extension(b"a.test");
        let extra = [0, 0, 6, b'b', b'.', b't', b'e', b's', b't'];
        two.extend_from_slice(&extra);
        let list_len = (two.len() - 2) as u16;
        two[..2].copy_from_slice(&list_len.to_be_bytes());
        let hello = hello_with_extensions(&[(EXT_SERVER_NAME, two)]);
        expect_malformed(&hello);
    }

    #[test]
    fn bad_alpn_is_refused() {
        for data in [
            vec![0, 0],
            vec![0, 1, 0],
            vec![0, 3, 2, b'h'],
            vec![0, 3, 2, b'h', b'2', 9],
        ] {
            let hello = hello_with_extensions(&[(EXT_ALPN, data)]);
            expect_malformed(&hello);
        }
    }

    #[test]
    fn no_input_makes_the_parser_panic() {
        let hello = client_hello("example.test");
        let split = reframe(&handshake_bytes(&hello), &[7, 100]);
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for base in [&hello, &split] {
            for _ in 0..3000 {
                let mut mutated = base.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % mutated.len();
                    match next() % 4 {
                        0 => mutated[at] ^= 1 << (next() % 8),
                        1 => mutated[at] = next() as u8,
                        2 => mutated.truncate(at.max(1)),
                        _ => mutated.insert(at, next() as u8),
                    }
                }
                let _ = parse_client_hello(&mutated);
            }
        }
        for _ in 0..3000 {
            let len = (next() % 300) as usize;
            let mut random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = random.first_mut() {
                *first = 22;
            }
            if let Some(second) = random.get_mut(1) {
                *second = 3;
            }
            let _ = parse_client_hello(&random);
        }
    }

    #[tokio::test]
    async fn reads_one_byte_at_a_time_and_returns_every_byte() {
        let mut stream = reframe(&handshake_bytes(&client_hello("Example.Test")), &[40]);
        let hello_len = stream.len();
        stream.extend_from_slice(b"\x17\x03\x03");
        let mut reader = OneByte(&stream);
        let (info, bytes) = read_client_hello(&mut reader, MAX).await.unwrap();
        assert_eq!(info.sni.as_deref(), Some("example.test"));
        // A reader that yields one byte at a time is read exactly to the end of the hello.
        assert_eq!(bytes, stream[..hello_len]);
    }

    #[tokio::test]
    async fn reads_through_a_tiny_duplex() {
        let hello = client_hello("example.test");
        let (mut client, mut server) = tokio::io::duplex(3);
        let sent = hello.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await?;
            client.write_all(b"early data").await?;
            client.shutdown().await
        });
        let (info, bytes) = read_client_hello(&mut server, MAX).await.unwrap();
        assert_eq!(info.sni.as_deref(), Some("example.test"));
        assert!(bytes.starts_with(&hello));
        assert!(bytes.len() <= hello.len() + 3);
        // Whatever the proxy did not read is still there for the splice.
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        let mut all = bytes;
        all.extend_from_slice(&rest);
        let mut expected = hello;
        expected.extend_from_slice(b"early data");
        assert_eq!(all, expected);
        writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn oversized_hello_is_too_large() {
        // A 20 KiB handshake message spread over two valid records.
        let mut handshake = vec![1];
        let body_len = 20 * 1024 - 4;
        handshake.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        handshake.resize(4 + body_len, 0);
        let stream = reframe(&handshake, &[16384]);
        let mut reader = &stream[..];
        assert!(matches!(
            read_client_hello(&mut reader, MAX).await,
            Err(SniffError::TooLarge)
        ));

        // A hello that would fit, but in so many small records that their headers push the
        // stream over the limit.
        let mut handshake = vec![1];
        let body_len = MAX - 100;
        handshake.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        handshake.resize(4 + body_len, 0);
        let cuts: Vec<usize> = (1..handshake.len() / 100).map(|i| i * 100).collect();
        let stream = reframe(&handshake, &cuts);
        assert!(stream.len() > MAX);
        let mut reader = OneByte(&stream);
        assert!(matches!(
            read_client_hello(&mut reader, MAX).await,
            Err(SniffError::TooLarge)
        ));

        // A real hello that does not fit a small limit.
        let hello = client_hello("example.test");
        let mut reader = &hello[..];
        assert!(matches!(
            read_client_hello(&mut reader, hello.len() - 1).await,
            Err(SniffError::TooLarge)
        ));
        let mut reader = &hello[..];
        assert!(read_client_hello(&mut reader, hello.len()).await.is_ok());
    }

    #[tokio::test]
    async fn garbage_and_http_are_not_tls() {
        let mut reader = &b"\x00\x01\x02garbage"[..];
        assert!(matches!(
            read_client_hello(&mut reader, MAX).await,
            Err(SniffError::NotTls)
        ));
        let mut reader = &b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"[..];
        assert!(matches!(
            read_client_hello(&mut reader, MAX).await,
            Err(SniffError::NotTls)
        ));
    }

    #[tokio::test]
    async fn early_close_is_eof() {
        let hello = client_hello("example.test");
        let mut reader = &hello[..hello.len() / 2];
        assert!(matches!(
            read_client_hello(&mut reader, MAX).await,
            Err(SniffError::Eof)
        ));
        let mut reader = &b""[..];
        assert!(matches!(
            read_client_hello(&mut reader, MAX).await,
            Err(SniffError::Eof)
        ));
    }

    #[test]
    fn alert_is_a_fatal_unrecognized_name_record() {
        assert_eq!(unrecognized_name_alert(), [21, 3, 3, 0, 2, 2, 112]);
        assert_eq!(internal_error_alert(), [21, 3, 3, 0, 2, 2, 80]);
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            SniffError::Malformed("duplicate extension").to_string(),
            "malformed TLS ClientHello: duplicate extension"
        );
        assert!(SniffError::NotTls.to_string().starts_with("not TLS"));
    }
}
