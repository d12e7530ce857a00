//! The local proxy's request reader (`shroud_socks::request`: SOCKS5 with its method
//! selection and username/password, SOCKS4's refusal, HTTP CONNECT).
//!
//! Properties, beyond not panicking:
//! - a slice read and a read in small pieces give the same request (but for the early data
//!   read past an HTTP head) or errors with the same reply, and the server writes the same
//!   bytes during the handshake;
//! - no more bytes are read than the input holds, and during a SOCKS5 handshake the server
//!   writes only its method selection (and the authentication status): at most 4 bytes;
//! - an accepted destination has a port, and a name host is in normal form, not numeric, and
//!   parses back to itself from its text;
//! - an accepted SOCKS5 request consumed exactly its own bytes: re-encoding the parsed request
//!   (same method, credentials and address type) gives the bytes read;
//! - an HTTP CONNECT's early data is exactly what was read past the head.
#![no_main]

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use shroud_fuzz::{block_on, Chunked};
use shroud_socks::request::{read_protocol, read_request, Protocol, Request, RequestError};
use shroud_socks::{Destination, Host, Reply};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection whose reads come from a reader and whose writes are kept.
struct Talk<R> {
    reader: R,
    written: Vec<u8>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Talk<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl<R: Unpin> AsyncWrite for Talk<R> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

type Outcome = (Option<Protocol>, Result<Request, Option<Reply>>, Vec<u8>);

/// Reads one request from `talk`: the protocol, then the rest.
fn run<R: AsyncRead + Unpin>(talk: &mut Talk<R>) -> Outcome {
    let outcome = block_on(async {
        let protocol = read_protocol(talk).await?;
        Ok::<_, RequestError>((protocol, read_request(talk, protocol).await))
    });
    match outcome {
        Ok((protocol, result)) => (
            Some(protocol),
            result.map_err(|err| err.reply()),
            talk.written.clone(),
        ),
        Err(err) => (None, Err(err.reply()), talk.written.clone()),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut whole = Talk {
        reader: data,
        written: Vec::new(),
    };
    let from_slice = run(&mut whole);
    let consumed = data.len() - whole.reader.len();

    let mut chunked = Talk {
        reader: Chunked::seeded_by_content(data),
        written: Vec::new(),
    };
    let from_pieces = run(&mut chunked);
    assert!(chunked.reader.position <= data.len());
    // How much of what follows an HTTP head was read with it depends on the pieces.
    let without_early_data = |outcome: &Outcome| {
        let mut outcome = outcome.clone();
        if let Ok(request) = &mut outcome.1 {
            request.early_data.clear();
        }
        outcome
    };
    assert_eq!(
        without_early_data(&from_slice),
        without_early_data(&from_pieces),
        "slice and piecewise reads disagree"
    );

    let (protocol, result, written) = from_slice;
    if protocol == Some(Protocol::Socks5) {
        assert!(written.len() <= 4 + 10, "handshake wrote {written:?}");
    }
    let Ok(request) = result else { return };
    check_destination(&request.destination);
    match protocol {
        Some(Protocol::Socks5) => {
            assert!(written.len() <= 4);
            assert_eq!(
                reencode_socks5(data, &request, &written),
                &data[..consumed],
                "the request read is not the bytes consumed"
            );
        }
        Some(Protocol::Http { .. }) => {
            assert!(
                data[..consumed].ends_with(&request.early_data),
                "early data is not what followed the head"
            );
        }
        other => panic!("a request accepted in {other:?}"),
    }
});

fn check_destination(destination: &Destination) {
    assert_ne!(destination.port, 0);
    if let Host::Name(name) = &destination.host {
        assert_eq!(
            shroud_mux::hostname::normalize(name).as_deref(),
            Ok(name.as_str())
        );
        assert!(!name.rsplit('.').next().unwrap_or_default().bytes().all(|b| b.is_ascii_digit()));
    }
    let text = destination.to_string();
    let (host, port) = text.rsplit_once(':').expect("host:port");
    assert_eq!(
        Destination::parse(host, port.parse().expect("a port")).as_ref(),
        Ok(destination),
        "{text} does not parse back"
    );
}

/// The SOCKS5 bytes for `request` as this input sent it: its greeting (copied: the methods
/// offered), the credentials, then the request in the address type the input used.
fn reencode_socks5(data: &[u8], request: &Request, written: &[u8]) -> Vec<u8> {
    let methods = usize::from(data[1]);
    let mut out = data[..2 + methods].to_vec();
    if written.get(1) == Some(&2) {
        out.push(1);
        out.extend_from_slice(request.credentials.as_deref().expect("credentials kept"));
    } else {
        assert!(request.credentials.is_none());
    }
    let at = out.len();
    let (command, reserved, address_type) = (data[at + 1], data[at + 2], data[at + 3]);
    out.extend_from_slice(&[5, command, reserved, address_type]);
    match (address_type, &request.destination.host) {
        (1, Host::Ip(ip)) | (4, Host::Ip(ip)) => {
            // An IPv4-mapped IPv6 address is held as IPv4: take the input's own octets.
            let len = if address_type == 1 { 4 } else { 16 };
            let octets = &data[at + 4..at + 4 + len];
            match ip {
                std::net::IpAddr::V4(v4) if len == 4 => assert_eq!(octets, v4.octets()),
                _ => {}
            }
            out.extend_from_slice(octets);
        }
        (3, _) => {
            let len = usize::from(data[at + 4]);
            out.extend_from_slice(&data[at + 4..at + 5 + len]);
        }
        other => panic!("address type {other:?} accepted"),
    }
    out.extend_from_slice(&request.destination.port.to_be_bytes());
    out
}
