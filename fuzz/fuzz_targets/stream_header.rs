//! The data stream header (`shroud_mux::header`).
//!
//! Properties, beyond not panicking:
//! - a header that decodes has a hostname in normal form and survives encode then decode;
//! - `StreamHeader::read`, fed in small pieces, reads exactly one header's bytes and agrees
//!   with `decode` on them; when the whole input is one header, `read` finds it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shroud_fuzz::{block_on, Chunked};
use shroud_mux::header::{StreamHeader, MAX_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let decoded = StreamHeader::decode(data);
    if let Ok(header) = &decoded {
        assert_eq!(
            shroud_mux::hostname::normalize(&header.hostname).as_deref(),
            Ok(header.hostname.as_str())
        );
        let encoded = header.encode();
        assert!(encoded.len() <= MAX_HEADER_LEN);
        assert_eq!(StreamHeader::decode(&encoded).ok().as_ref(), Some(header));
    }

    let mut reader = Chunked::seeded_by_content(data);
    let read = block_on(StreamHeader::read(&mut reader));
    if let Ok(header) = &read {
        let consumed = &data[..reader.position];
        assert!(consumed.len() <= MAX_HEADER_LEN);
        assert_eq!(StreamHeader::decode(consumed).ok().as_ref(), Some(header));
    }
    if let Ok(header) = &decoded {
        assert_eq!(
            read.ok().as_ref(),
            Some(header),
            "decode finds a header read does not"
        );
        assert_eq!(reader.position, data.len());
    }
});
