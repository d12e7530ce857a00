//! The HTTP request head sniffer (`shroud_proxy::http_sniff`).
//!
//! Properties, beyond not panicking:
//! - the bytes returned (replayed to the tunnel) are exactly the bytes read, a prefix of
//!   the input;
//! - a slice read and a read in small pieces find the same head, or both fail;
//! - the host found is a hostname in normal form, and the path starts with `/`;
//! - the host is the one httparse's own view of the head gives: the absolute-form target's
//!   authority, else the single `Host` header, without its port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shroud_fuzz::{block_on, Chunked};
use shroud_proxy::http_sniff::{read_request_head, RequestHead};

/// The proxy's default `max_http_head`.
const MAX: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut whole = data;
    let from_slice = block_on(read_request_head(&mut whole, MAX));
    if let Ok((head, bytes)) = &from_slice {
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
        check_head(bytes, head);
    }

    let mut chunked = Chunked::seeded_by_content(data);
    let from_pieces = block_on(read_request_head(&mut chunked, MAX));
    if let Ok((head, bytes)) = &from_pieces {
        assert_eq!(bytes.len(), chunked.position, "bytes read but not returned");
        assert_eq!(&data[..bytes.len()], &bytes[..]);
        check_head(bytes, head);
    }
    match (&from_slice, &from_pieces) {
        (Ok((a, _)), Ok((b, _))) => assert_eq!(a, b, "slice and piecewise reads disagree"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("slice read {a:?}, piecewise read {b:?}"),
    }
});

/// Checks a head found in `bytes` against an independent reading of it with httparse.
fn check_head(bytes: &[u8], head: &RequestHead) {
    assert_eq!(
        shroud_mux::hostname::normalize(&head.host).as_deref(),
        Ok(head.host.as_str()),
        "host not in normal form"
    );
    assert!(head.path.starts_with('/'), "path {:?}", head.path);

    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    assert!(matches!(
        request.parse(bytes),
        Ok(httparse::Status::Complete(_))
    ));
    let target = request.path.unwrap_or_default();
    let lower = target.to_ascii_lowercase();
    let authority = ["http://", "https://"]
        .iter()
        .find_map(|scheme| lower.strip_prefix(scheme))
        .map(|rest| {
            rest.split(['/', '?', '#'])
                .next()
                .unwrap_or_default()
                .to_string()
        });
    let authority = authority.unwrap_or_else(|| {
        let hosts: Vec<_> = request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("host"))
            .collect();
        assert_eq!(hosts.len(), 1, "a head accepted without exactly one Host");
        String::from_utf8_lossy(hosts[0].value)
            .trim_matches([' ', '\t'])
            .to_ascii_lowercase()
    });
    let host = authority.split(':').next().unwrap_or_default();
    let host = host.strip_suffix('.').unwrap_or(host);
    assert_eq!(
        head.host, host,
        "host differs from the head's authority {authority:?}"
    );
}
