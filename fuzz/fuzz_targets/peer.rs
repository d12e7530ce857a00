//! The peer link's frames (`shroud_mux::peer`): gossip frames, the forward reply, the
//! stream kind byte, and the link proof.
//!
//! Properties, beyond not panicking:
//! - reading gossip frames in small pieces consumes exactly each frame, writing the frame
//!   read gives back its bytes, and a frame refused as too large announced more than
//!   `MAX_GOSSIP_FRAME` bytes;
//! - `Ok(false)`, "clean end of stream", comes only where the stream really ended between
//!   frames, not in the middle of a length prefix;
//! - a reply read is the byte it was read from; the stream kind byte round-trips;
//! - a proof verifies only for the side that made it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shroud_fuzz::{block_on, Chunked};
use shroud_mux::peer::{
    proof, read_frame, verify, write_frame, Reply, Side, StreamKind, EXPORTER_LEN, MAX_GOSSIP_FRAME,
};

fuzz_target!(|data: &[u8]| {
    let mut reader = Chunked::seeded_by_content(data);
    match block_on(Reply::read(&mut reader)) {
        Ok(reply) => assert_eq!(reply.byte(), data[0]),
        Err(_) => assert!(data.first().is_none_or(|&b| b > 4)),
    }
    if let Some(&byte) = data.first() {
        if let Some(kind) = StreamKind::from_byte(byte) {
            assert_eq!(kind.byte(), byte);
        }
    }

    let mut reader = Chunked::seeded_by_content(data);
    let mut frame = Vec::new();
    loop {
        let start = reader.position;
        match block_on(read_frame(&mut reader, &mut frame)) {
            Ok(true) => {
                let mut written = Vec::new();
                block_on(write_frame(&mut written, &frame)).expect("writing to a Vec");
                assert_eq!(&data[start..reader.position], &written[..]);
            }
            Ok(false) => {
                assert_eq!(
                    start,
                    data.len(),
                    "a truncated length prefix read as a clean end"
                );
                break;
            }
            Err(err) => {
                if err.kind() == std::io::ErrorKind::InvalidData {
                    let len = u32::from_be_bytes(data[start..start + 4].try_into().unwrap());
                    assert!(len as usize > MAX_GOSSIP_FRAME);
                }
                break;
            }
        }
    }

    if let Some((exporter, secret)) = data.split_first_chunk::<EXPORTER_LEN>() {
        let made = proof(secret, Side::Dialer, exporter);
        assert!(verify(secret, Side::Dialer, exporter, &made));
        assert!(!verify(secret, Side::Listener, exporter, &made));
    }
});
