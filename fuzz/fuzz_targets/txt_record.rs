//! TXT record values (`shroud_proxy::dns_auth::parse_key_record`).
//!
//! Properties, beyond not panicking:
//! - a value accepted as a key is exactly `shroud-key=` and that key as shroud prints it:
//!   one key has one spelling, so a record cannot smuggle a key in another form;
//! - the key any 32 input bytes make (if they are a valid key) is read back from its record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shroud_mux::auth::PublicKey;
use shroud_proxy::dns_auth::{parse_key_record, KEY_PREFIX};

fuzz_target!(|data: &[u8]| {
    if let Some(key) = parse_key_record(data) {
        assert_eq!(format!("{KEY_PREFIX}{key}").as_bytes(), data);
    }
    if let Some(bytes) = data.first_chunk::<32>() {
        if let Ok(key) = PublicKey::from_bytes(bytes) {
            let record = format!("{KEY_PREFIX}{key}");
            assert_eq!(parse_key_record(record.as_bytes()), Some(key));
        }
    }
});
