//! Writes the seed corpora of the targets whose inputs shroud itself produces (control
//! messages, stream headers, peer frames, TXT values, authorized files, signed lists, gossip
//! packets), with shroud's own encoders, into `seeds/TARGET/`. The ClientHellos and HTTP
//! heads come from real clients instead (`seeds/capture.sh`).
//!
//! `cargo run --example gen_seeds` from `fuzz/` (stable is enough; no libFuzzer involved).

use std::fs;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use foca::{AccumulatingRuntime, BroadcastHandler, Config, Foca, Invalidates};
use rand::rngs::StdRng;
use rand::SeedableRng;
use shroud_discovery::secret::FleetSecret;
use shroud_discovery::signed::{sign, ProxyEntry, ProxyList};
use shroud_mux::auth::SecretKey;
use shroud_mux::control::{BindName, BindOutcome, BindStatus, ErrorCode, Message};
use shroud_mux::header::{StreamHeader, StreamKind};
use shroud_proxy::gossip::{receive_frames, Announcement};
use shroud_proxy::peers::{FleetConfig, PeerId, Peers};

const NOW: u64 = 1_700_000_000;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    fs::create_dir_all(&dir).expect("seed directory");
    fs::write(dir.join(name), bytes).expect("seed file");
}

fn framed(messages: &[Message]) -> Vec<u8> {
    let mut out = Vec::new();
    for message in messages {
        let body = message.encode();
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
    }
    out
}

fn main() {
    let key = SecretKey::from_seed(&[7; 32]);
    let public = key.public();

    // Control: each message alone (the body), and a session's exchange framed.
    let messages = vec![
        Message::Hello { versions: vec![1] },
        Message::Challenge { challenge: [9; 32] },
        Message::Bind {
            key: [3; 32],
            signature: [4; 64],
            hostnames: vec![
                BindName {
                    name: "example.test".into(),
                    http: true,
                },
                BindName {
                    name: "www.example.test".into(),
                    http: false,
                },
            ],
        },
        Message::BindResult {
            results: vec![
                BindOutcome {
                    name: "example.test".into(),
                    status: BindStatus::Bound,
                    reason: String::new(),
                },
                BindOutcome {
                    name: "x.test".into(),
                    status: BindStatus::NotAuthorized,
                    reason: "not listed".into(),
                },
            ],
        },
        Message::Ping { nonce: 42 },
        Message::Pong { nonce: 42 },
        Message::GoAway {
            reason: "shutting down".into(),
        },
        Message::Error {
            code: ErrorCode::UnsupportedVersion,
            message: "bad version".into(),
        },
        Message::Unbound {
            hostname: "x.test".into(),
            status: BindStatus::NotAuthorized,
            reason: "no longer authorized".into(),
        },
    ];
    for (i, message) in messages.iter().enumerate() {
        write("control", &format!("body-{i}"), &message.encode());
    }
    write("control", "session", &framed(&messages));

    // Stream headers, alone and followed by the visitor's first bytes.
    for (i, (host, kind, visitor)) in [
        ("example.test", StreamKind::Tls, "192.0.2.7:50123"),
        ("www.example.test", StreamKind::Http, "[2001:db8::7]:443"),
    ]
    .into_iter()
    .enumerate()
    {
        let header = StreamHeader {
            hostname: host.into(),
            kind,
            visitor: visitor.parse().expect("address"),
            public_port: 443,
        };
        let mut bytes = header.encode();
        write("stream_header", &format!("header-{i}"), &bytes);
        bytes.extend_from_slice(b"\x16\x03\x01");
        write("stream_header", &format!("header-{i}-then-data"), &bytes);
    }

    // Peer link: replies, gossip frames, a proof input.
    for byte in 0..5u8 {
        write("peer", &format!("reply-{byte}"), &[byte]);
    }
    let mut frames = Vec::new();
    for frame in [&b"gossip one"[..], b"", &[0xab; 300]] {
        frames.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        frames.extend_from_slice(frame);
    }
    write("peer", "frames", &frames);
    write("peer", "oversized", &(256 * 1024 + 1u32).to_be_bytes());

    // TXT values.
    write(
        "txt_record",
        "key",
        format!("shroud-key={public}").as_bytes(),
    );
    write("txt_record", "spf", b"v=spf1 -all");
    let text = public.to_string();
    let raw = URL_SAFE_NO_PAD
        .decode(text.strip_prefix("ed25519:").expect("prefix"))
        .expect("base64");
    write("txt_record", "raw-key", &raw);

    // Authorized files.
    let other = SecretKey::from_seed(&[8; 32]).public();
    write(
        "authorized",
        "example",
        format!(
            "# authorized clients\n\nBlog.Example.COM.\t{public}   # Alice\n  *.dev.example.com {other}\nblog.example.com {other}\n"
        )
        .as_bytes(),
    );
    write(
        "authorized",
        "wildcard-only",
        format!("*.example.test {public}").as_bytes(),
    );

    // Signed lists: mode byte 0 (a whole body) and 1 (a payload the target signs).
    let list = ProxyList {
        version: 1,
        host: "example.test".into(),
        issued_at: NOW - 10,
        expires_at: NOW + 3600,
        proxies: vec![
            ProxyEntry {
                name: "p1.fleet.test".into(),
                port: 443,
                region: "eu".into(),
                onion: None,
            },
            ProxyEntry {
                name: "p2.fleet.test".into(),
                port: 8443,
                region: "us".into(),
                onion: None,
            },
        ],
    };
    let mut body = vec![0];
    body.extend(sign(&list, &key).expect("sign"));
    write("signed_list", "body", &body);
    let mut payload = vec![1];
    payload.extend(serde_json::to_vec(&list).expect("json"));
    write("signed_list", "payload", &payload);

    // Gossip: an announcement alone (mode 0), and foca packets from a peer (mode 1): its
    // join announcement, then a gossip packet carrying its list of names.
    let me: SocketAddr = "192.0.2.1:7443".parse().expect("address");
    let them = PeerId {
        addr: "192.0.2.2:7443".parse().expect("address"),
        bump: 5,
    };
    let announcement = Announcement {
        holder: them.clone(),
        version: 1,
        names: vec!["example.test".into(), "www.example.test".into()],
    };
    let encoded = postcard::to_allocvec(&announcement).expect("postcard");
    let mut item = vec![0];
    item.extend_from_slice(&encoded);
    write("gossip", "announcement", &item);

    let mut peer = Foca::with_custom_broadcast(
        them,
        Config::new_lan(NonZeroU32::new(20).expect("nonzero")),
        StdRng::seed_from_u64(1),
        foca::PostcardCodec,
        Pass,
    );
    let mut runtime = AccumulatingRuntime::new();
    peer.announce(PeerId { addr: me, bump: 0 }, &mut runtime)
        .expect("announce");
    let mut packets = Vec::new();
    while let Some((_, data)) = runtime.to_send() {
        packets.push(data.to_vec());
    }
    // Learn of `me` so that gossip goes to it.
    peer.apply_many(
        std::iter::once(foca::Member::alive(PeerId { addr: me, bump: 0 })),
        true,
        &mut runtime,
    )
    .expect("apply");
    while runtime.to_send().is_some() {}
    peer.add_broadcast(&encoded).expect("broadcast");
    peer.gossip(&mut runtime).expect("gossip");
    while let Some((_, data)) = runtime.to_send() {
        packets.push(data.to_vec());
    }
    let mut input = vec![1];
    for packet in &packets {
        input.extend_from_slice(&(packet.len() as u16).to_be_bytes());
        input.extend_from_slice(packet);
    }
    write("gossip", "join-then-names", &input);
    // The packets reach shroud's handler: after them, this proxy routes the names to the peer.
    let peers = std::sync::Arc::new(Peers::new(
        FleetConfig {
            advertise: me,
            seeds: Vec::new(),
            secret: FleetSecret::new("a-fleet-secret-for-fuzzing-only".into()).expect("secret"),
        },
        64 * 1024,
    ));
    let accepted = receive_frames(&peers, packets.iter().map(Vec::as_slice));
    assert_eq!(accepted, packets.len());
    assert!(
        peers.holds("www.example.test"),
        "the gossip seed does not reach the handler"
    );
    println!(
        "wrote seeds; {} gossip packets, names routed",
        packets.len()
    );
}

/// A broadcast handler that passes anything on: the peer side only needs to send.
struct Pass;

struct AnyKey;

impl Invalidates for AnyKey {
    fn invalidates(&self, _other: &Self) -> bool {
        false
    }
}

impl BroadcastHandler<PeerId> for Pass {
    type Key = AnyKey;
    type Error = std::io::Error;

    fn receive_item(
        &mut self,
        _data: &[u8],
        _sender: Option<&PeerId>,
    ) -> Result<Option<AnyKey>, std::io::Error> {
        // Some: foca only disseminates an item its handler calls new, its own included.
        Ok(Some(AnyKey))
    }
}
