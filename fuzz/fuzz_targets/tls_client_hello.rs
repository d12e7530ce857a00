//! The ClientHello sniffer (`shroud_proxy::tls_sniff`).
//!
//! Properties, beyond not panicking:
//! - read from a slice and from a reader that yields small pieces, the result is the same,
//!   and the bytes returned (the ones the proxy replays to the tunnel) are exactly the bytes
//!   read, a prefix of the input, with nothing lost or added;
//! - the reader agrees with `parse_client_hello` on the whole input, and a prefix of what
//!   it read either needs more or gives the same hello, never an error;
//! - where rustls' own ClientHello parser (`rustls::server::Acceptor`) accepts the same
//!   bytes, the server name and ALPN list found are the ones rustls finds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shroud_fuzz::{block_on, Chunked};
use shroud_proxy::tls_sniff::{parse_client_hello, read_client_hello, ClientHelloInfo};

/// The proxy's default `max_client_hello`.
const MAX: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let parsed = parse_client_hello(data);

    let mut whole = data;
    let from_slice = block_on(read_client_hello(&mut whole, MAX));
    if let Ok((info, bytes)) = &from_slice {
        assert_eq!(
            &data[..bytes.len()],
            &bytes[..],
            "replayed bytes differ from bytes read"
        );
        assert_eq!(
            bytes.len() + whole.len(),
            data.len(),
            "bytes read but not returned"
        );
        match &parsed {
            Ok(Some(whole_info)) => assert_eq!(info, whole_info),
            other => panic!("reader found {info:?}, parse_client_hello {other:?}"),
        }
        // A prefix of what was read either needs more or is already the whole hello (the
        // bytes read may run past it), never an error: the verdict cannot flip as bytes
        // arrive. Checking every prefix costs quadratic time on a 2 KiB hello; a few cut
        // points drawn from the input, the record and handshake headers and the last byte
        // cover the edges.
        let hash = shroud_fuzz::fnv1a(data);
        let drawn = (0..8).map(|i| (hash >> (i * 8)) as usize);
        for end in [0, 1, 4, 5, 6, 9, bytes.len() - 1].into_iter().chain(drawn) {
            let end = end % bytes.len();
            match parse_client_hello(&bytes[..end]) {
                Ok(None) => {}
                Ok(Some(found)) => assert_eq!(&found, info, "prefix of {end} bytes"),
                Err(err) => panic!("prefix of {end} bytes: {err:?}"),
            }
        }
    } else if let Ok(Some(info)) = &parsed {
        // A complete hello that fits is read.
        if data.len() <= MAX {
            panic!("parse_client_hello found {info:?}, the reader {from_slice:?}");
        }
    }

    let mut chunked = Chunked::seeded_by_content(data);
    let from_pieces = block_on(read_client_hello(&mut chunked, MAX));
    match (&from_slice, &from_pieces) {
        (Ok((a, _)), Ok((b, bytes))) => {
            assert_eq!(a, b, "slice and piecewise reads disagree");
            assert_eq!(bytes.len(), chunked.position, "bytes read but not returned");
            assert_eq!(&data[..bytes.len()], &bytes[..]);
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!("slice read {a:?}, piecewise read {b:?}"),
    }

    if let Ok(Some(ours)) = &parsed {
        check_against_rustls(data, ours);
    }
});

/// Compares with what rustls finds in the same bytes, where rustls accepts them.
fn check_against_rustls(data: &[u8], ours: &ClientHelloInfo) {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = data;
    let accepted = loop {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => break accepted,
            Ok(None) => continue,
            Err(_) => return,
        }
    };
    let hello = accepted.client_hello();
    match hello.server_name() {
        Some(name) => {
            let normal = shroud_mux::hostname::normalize(name).ok();
            assert_eq!(ours.sni, normal, "rustls found server name {name:?}");
        }
        // rustls ignores a host_name that is an IP address (RFC 6066 forbids them).
        None => assert!(
            ours.sni
                .as_deref()
                .is_none_or(|sni| sni.parse::<std::net::IpAddr>().is_ok()),
            "rustls found no server name, we found {:?}",
            ours.sni
        ),
    }
    let alpn: Vec<Vec<u8>> = hello
        .alpn()
        .map(|list| list.map(<[u8]>::to_vec).collect())
        .unwrap_or_default();
    assert_eq!(ours.alpn, alpn, "ALPN differs from rustls'");
}
