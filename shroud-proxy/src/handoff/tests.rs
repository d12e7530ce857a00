//! [`open`]'s retry and patience paths, against fake clients over in-memory yamux sessions:
//! a [`Shared`] made with [`Shared::new`], tunnels bound straight into its registry, and no
//! sockets. Time is paused, so waits are exact and instant.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use shroud_mux::{Role, SessionConfig};
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::policy::Policy;
use crate::shared::{Limits, ProxyConfig};

const HOST: &str = "example.test";
/// What the visitor sent before it was routed: the bytes every stream must carry first.
const HELLO: &[u8] = b"\x16\x03\x01 a ClientHello, or a request head";

/// How a fake client treats the streams the proxy opens to it.
#[derive(Clone, Copy)]
enum Client {
    /// Acknowledges, then reports the header and the bytes that follow it.
    Accepts,
    /// Drops each stream unacknowledged, as a client that failed a moment ago.
    Resets,
    /// Keeps each stream open and never acknowledges it, as a client whose Tor circuit died
    /// while its connection lingers.
    Silent,
}

/// A tunnel bound for [`HOST`], and what its client saw.
struct Tunnel {
    session: Session,
    /// Header and initial bytes of each stream the client accepted.
    streams: mpsc::UnboundedReceiver<(StreamHeader, Vec<u8>)>,
    /// How many streams reached the client, whatever it did with them.
    opened: Arc<std::sync::atomic::AtomicUsize>,
}

fn shared(limits: Limits) -> Arc<Shared> {
    let tls = crate::testing::self_signed_tls();
    let config = ProxyConfig {
        tunnel_name: "proxy.test".into(),
        tls,
        policy: Policy::parse("").unwrap(),
        dns: None,
        word_domains: Vec::new(),
        limits,
        fleet: None,
    };
    Shared::new(config, CancellationToken::new())
}

/// Binds a new tunnel for [`HOST`] (plain HTTP too) whose client behaves as `client`.
fn bind(shared: &Shared, client: Client) -> Tunnel {
    let (proxy_io, client_io) = tokio::io::duplex(64 * 1024);
    let (session, _incoming) = Session::spawn(proxy_io, Role::Proxy, SessionConfig::default());
    let (client_session, mut incoming) =
        Session::spawn(client_io, Role::Client, SessionConfig::default());
    let (report, streams) = mpsc::unbounded_channel();
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = opened.clone();
    tokio::spawn(async move {
        let _keep = client_session;
        let mut held = Vec::new();
        while let Some(mut stream) = incoming.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match client {
                Client::Resets => drop(stream),
                Client::Silent => held.push(stream),
                Client::Accepts => {
                    header::write_ack(&mut stream).await.unwrap();
                    let header = StreamHeader::read(&mut stream).await.unwrap();
                    let mut initial = vec![0; HELLO.len()];
                    stream.read_exact(&mut initial).await.unwrap();
                    let _ = report.send((header, initial));
                    held.push(stream);
                }
            }
        }
    });
    let id = shared.registry.new_tunnel_id();
    shared.registry.bind(HOST, id, session.clone(), true);
    Tunnel {
        session,
        streams,
        opened,
    }
}

fn header(kind: StreamKind) -> StreamHeader {
    StreamHeader {
        hostname: HOST.into(),
        kind,
        visitor: "203.0.113.7:50000".parse().unwrap(),
        public_port: 443,
    }
}

fn opened(tunnel: &Tunnel) -> usize {
    tunnel.opened.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn a_tls_visitor_whose_stream_dies_unaccepted_is_retried_on_another_tunnel() {
    let shared = shared(Limits::default());
    let failing = bind(&shared, Client::Resets);
    let mut good = bind(&shared, Client::Accepts);

    let header = header(StreamKind::Tls);
    open(&shared, failing.session.clone(), &header, HELLO)
        .await
        .expect("the second tunnel takes the visitor");

    // Routing afresh takes tunnels in turn and may offer the failing one again (its session is
    // still open); the visitor still lands within its attempts.
    assert!((1..OPEN_ATTEMPTS).contains(&opened(&failing)));
    let (seen, initial) = good.streams.recv().await.unwrap();
    assert_eq!(seen, header, "the header arrives intact");
    assert_eq!(
        initial, HELLO,
        "the bytes read before routing are replayed first"
    );
    assert!(!good.session.is_unresponsive());
}

#[tokio::test(start_paused = true)]
async fn a_plain_http_request_is_never_sent_twice() {
    let shared = shared(Limits::default());
    let failing = bind(&shared, Client::Resets);
    let good = bind(&shared, Client::Accepts);

    // The request may have reached the origin before the stream died: it is not replayed.
    let err = open(
        &shared,
        failing.session.clone(),
        &header(StreamKind::Http),
        HELLO,
    )
    .await
    .expect_err("no retry for plain HTTP");
    assert!(matches!(err, SpliceError::Tunnel(_)), "{err}");
    assert_eq!(opened(&failing), 1);
    assert_eq!(opened(&good), 0, "the other tunnel never saw the request");
}

#[tokio::test(start_paused = true)]
async fn a_visitor_tries_at_most_open_attempts_tunnels() {
    let shared = shared(Limits::default());
    let tunnels: Vec<Tunnel> = (0..OPEN_ATTEMPTS + 1)
        .map(|_| bind(&shared, Client::Resets))
        .collect();

    let err = open(
        &shared,
        tunnels[0].session.clone(),
        &header(StreamKind::Tls),
        HELLO,
    )
    .await
    .expect_err("every tunnel fails");
    assert!(matches!(err, SpliceError::Tunnel(_)), "{err}");
    let tried: usize = tunnels.iter().map(opened).sum();
    assert_eq!(tried, OPEN_ATTEMPTS);
}

#[tokio::test(start_paused = true)]
async fn a_silent_tunnel_gets_ack_patience_when_another_could_take_the_visitor() {
    let shared = shared(Limits::default());
    let silent = bind(&shared, Client::Silent);
    let mut good = bind(&shared, Client::Accepts);

    let started = Instant::now();
    open(
        &shared,
        silent.session.clone(),
        &header(StreamKind::Tls),
        HELLO,
    )
    .await
    .expect("the responsive tunnel takes the visitor");
    let waited = started.elapsed();

    assert!(
        waited >= ACK_PATIENCE && waited < ACK_PATIENCE + Duration::from_secs(1),
        "waited {waited:?}, not the patience of {ACK_PATIENCE:?}"
    );
    assert_eq!(opened(&silent), 1);
    assert!(silent.session.is_unresponsive(), "routing now avoids it");
    assert!(good.streams.recv().await.is_some());
    assert!(
        !shared.registry.has_alternative(HOST, false, &good.session),
        "the silent tunnel is no alternative while unresponsive"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_last_tunnel_gets_the_whole_stream_open_timeout() {
    let limits = Limits {
        stream_open_timeout: Duration::from_secs(20),
        ..Limits::default()
    };
    let shared = shared(limits);
    let silent = bind(&shared, Client::Silent);

    let started = Instant::now();
    let err = open(
        &shared,
        silent.session.clone(),
        &header(StreamKind::Tls),
        HELLO,
    )
    .await
    .expect_err("nobody acknowledges");
    let waited = started.elapsed();

    assert!(matches!(err, SpliceError::AckTimeout), "{err}");
    assert!(
        waited >= Duration::from_secs(20) && waited < Duration::from_secs(21),
        "waited {waited:?}"
    );
    assert_eq!(
        opened(&silent),
        1,
        "a visitor that waited in full is not retried"
    );
    assert!(silent.session.is_unresponsive());
}

#[tokio::test(start_paused = true)]
async fn an_unresponsive_tunnel_that_acknowledges_again_is_trusted_again() {
    let shared = shared(Limits::default());
    let mut tunnel = bind(&shared, Client::Accepts);
    tunnel.session.set_unresponsive(true);

    open(
        &shared,
        tunnel.session.clone(),
        &header(StreamKind::Tls),
        HELLO,
    )
    .await
    .unwrap();
    assert!(tunnel.streams.recv().await.is_some());
    assert!(!tunnel.session.is_unresponsive());
}
