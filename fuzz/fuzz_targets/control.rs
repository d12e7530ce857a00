//! Control messages and their framing (`shroud_mux::control`).
//!
//! Properties, beyond not panicking:
//! - a body that decodes encodes back to exactly the same bytes (one encoding per message),
//!   except an error code shroud does not know, which reads as `internal` by design, so its
//!   body re-encodes with code 5; either way the re-encoding decodes to the same message;
//! - reading a stream of frames in small pieces consumes exactly each frame, and writing
//!   each message read gives back the bytes it was read from (same exception);
//! - a frame refused as too large announced more than `MAX_FRAME_LEN` bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shroud_fuzz::{block_on, Chunked};
use shroud_mux::control::{read_message, write_message, Message, ReadError, MAX_FRAME_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(data) {
        check_encoding(&message, data);
    }

    let mut reader = Chunked::seeded_by_content(data);
    loop {
        let start = reader.position;
        match block_on(read_message(&mut reader)) {
            Ok(message) => {
                let mut written = Vec::new();
                block_on(write_message(&mut written, &message)).expect("writing to a Vec");
                let consumed = &data[start..reader.position];
                assert_eq!(consumed.len(), written.len());
                assert_eq!(consumed[..2], written[..2], "length prefix");
                check_encoding(&message, &consumed[2..]);
            }
            Err(ReadError::TooLarge(len)) => {
                assert!(len > MAX_FRAME_LEN);
                break;
            }
            Err(ReadError::Closed) => {
                assert_eq!(start, data.len(), "closed with bytes left");
                break;
            }
            Err(_) => break,
        }
    }
});

/// Checks that `message`, decoded from `body`, encodes back to `body` (see the exception for
/// unknown error codes above) and that its encoding decodes to it.
fn check_encoding(message: &Message, body: &[u8]) {
    let encoded = message.encode();
    assert_eq!(Message::decode(&encoded).ok().as_ref(), Some(message));
    const T_ERROR: u8 = 0x08;
    let unknown_error_code = body[0] == T_ERROR && !(1..=5).contains(&body[1]);
    if unknown_error_code {
        assert_eq!(encoded[1], 5);
        assert_eq!(encoded[2..], body[2..]);
    } else {
        assert_eq!(encoded, body, "{message:?} re-encodes differently");
    }
}
