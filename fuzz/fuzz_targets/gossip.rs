//! Gossip between proxies (`shroud_proxy::gossip`): foca packets whose custom broadcasts
//! carry postcard-encoded `Announcement`s.
//!
//! The first input byte picks the mode: even, the rest is one broadcast item for
//! `Announcement::decode`; odd, the rest is a sequence of frames (each a 2-byte big-endian
//! length and its bytes) handed in turn to a fresh member through `gossip::receive_frames`:
//! foca's decoding, its membership updates and the announcement checks, as a proxy runs
//! them on what its peers send.
//!
//! Properties, beyond not panicking:
//! - an accepted announcement carries at most 2048 names, each a hostname in normal form,
//!   and encodes back to an announcement that decodes to the same;
//! - foca accepts no more frames than it was given, and no name is ever routed to this
//!   proxy's own address (a peer cannot claim to be us).
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use shroud_discovery::secret::FleetSecret;
use shroud_proxy::gossip::{receive_frames, Announcement};
use shroud_proxy::peers::{FleetConfig, Peers};

/// This proxy's link address in every run.
const ME: &str = "192.0.2.1:7443";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(announcement) = Announcement::decode(rest) {
            assert!(announcement.names.len() <= 2048);
            for name in &announcement.names {
                assert_eq!(
                    shroud_mux::hostname::normalize(name).as_deref(),
                    Ok(name.as_str())
                );
            }
            let again = postcard::to_allocvec(&announcement).expect("encoding");
            assert_eq!(Announcement::decode(&again).ok(), Some(announcement));
        }
        return;
    }

    let mut frames = Vec::new();
    let mut rest = rest;
    while let Some((len, after)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)).min(after.len());
        let (frame, after) = after.split_at(len);
        frames.push(frame);
        rest = after;
    }
    let me: SocketAddr = ME.parse().expect("address");
    let secret = FleetSecret::new("a-fleet-secret-for-fuzzing-only".into()).expect("secret");
    let peers = Arc::new(Peers::new(
        FleetConfig {
            advertise: me,
            seeds: Vec::new(),
            secret,
        },
        64 * 1024,
    ));
    let accepted = receive_frames(&peers, frames.iter().copied());
    assert!(accepted <= frames.len());
    for name in names_in(data) {
        assert!(
            !peers.holders(&name).contains(&me),
            "{name} routed to ourselves"
        );
    }
});

/// Strings in `data` that could be names an announcement carried: runs of hostname bytes.
fn names_in(data: &[u8]) -> Vec<String> {
    data.split(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')))
        .filter(|run| run.len() >= 3)
        .map(|run| String::from_utf8_lossy(run).into_owned())
        .collect()
}
