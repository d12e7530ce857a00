//! Forwarding between proxies in this process: the one-hop rule (two proxies that each believe
//! the other holds a name forward a visitor once, and it is refused and answered at once), and
//! a holder's tunnel stream carrying the forwarded visitor's first bytes, against fake tunnel
//! clients over in-memory yamux sessions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shroud_mux::header::{StreamHeader, ACK_ACCEPTED};
use shroud_mux::{Role, Session, SessionConfig};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::peers::{FleetConfig, PeerId};
use crate::policy::Policy;
use crate::server::{self, Listeners};
use crate::shared::{Limits, ProxyConfig, Shared};

const NAME: &str = "loop.test";

/// A proxy serving plain HTTP and peer links on loopback: its state, HTTP and peer addresses.
async fn proxy(shutdown: &CancellationToken) -> (Arc<Shared>, SocketAddr, SocketAddr) {
    let tls = crate::testing::self_signed_tls();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_addr, peer_addr) = (http.local_addr().unwrap(), peer.local_addr().unwrap());
    let secret = shroud_discovery::secret::FleetSecret::new("a-fleet-secret-for-tests".into());
    let config = ProxyConfig {
        tunnel_name: "proxy.test".into(),
        tls,
        policy: Policy::parse("").unwrap(),
        dns: None,
        word_domains: Vec::new(),
        limits: Limits::default(),
        fleet: Some(FleetConfig {
            advertise: peer_addr,
            seeds: Vec::new(),
            secret: secret.unwrap(),
        }),
    };
    let shared = Shared::new(config, shutdown.clone());
    let listeners = Listeners {
        http: Some(http),
        peer: Some(peer),
        ..Listeners::default()
    };
    tokio::spawn(server::serve(listeners, shared.clone(), shutdown.clone()));
    (shared, http_addr, peer_addr)
}

/// Makes `shared` believe the peers at `holders` are alive and hold [`NAME`].
fn believe_held_by(shared: &Shared, holders: &[SocketAddr]) {
    let peers = shared.peers().unwrap();
    for &addr in holders {
        let id = PeerId { addr, bump: 1 };
        peers.member_up(id.clone());
        assert!(peers.record_holding(id, 1, vec![NAME.to_owned()]));
    }
    let mut believed = peers.holders(NAME);
    believed.sort();
    let mut wanted = holders.to_vec();
    wanted.sort();
    assert_eq!(believed, wanted);
}

/// A plain-HTTP request for [`NAME`], as a visitor sends it.
fn request() -> String {
    format!("GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n")
}

/// Sends [`request`] to `http` and reads the answer to its end, within 5 s.
async fn visit(http: SocketAddr) -> String {
    let visit = async {
        let mut visitor = tokio::net::TcpStream::connect(http).await.unwrap();
        visitor.write_all(request().as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        visitor.read_to_end(&mut answer).await.unwrap();
        String::from_utf8(answer).unwrap()
    };
    tokio::time::timeout(Duration::from_secs(5), visit)
        .await
        .expect("the visitor got no answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_that_each_believe_the_other_holds_a_name_do_not_loop() {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (a, a_http, a_peer) = proxy(&shutdown).await;
    let (b, b_http, b_peer) = proxy(&shutdown).await;
    believe_held_by(&a, &[b_peer]);
    believe_held_by(&b, &[a_peer]);

    for (http, from, to) in [(a_http, &a, b_peer), (b_http, &b, a_peer)] {
        // Forwarded once, refused by the peer (which routes to its own tunnels only), and
        // answered by the first proxy: well within a second on loopback, where a forwarding
        // loop would leave the visitor with no answer.
        let answer = visit(http).await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        // It was answered after a forward, not before one.
        assert!(from.peers().unwrap().linked(to));
    }
}

/// What a fake tunnel client does with a stream once it has read the header and the request.
#[derive(Clone, Copy)]
enum Client {
    /// Acknowledges in the same write as its origin's whole answer, `HTTP/1.1 200 OK` and
    /// `hi`: a client whose acknowledgement waits for the origin's first bytes, as shroud's
    /// does within its ACK_HOLD, so the request must come with the stream header.
    AnswersTheRequest,
    /// Resets the stream unacknowledged, as a client whose origin connection failed after the
    /// request was passed on.
    Resets,
}

/// Binds a tunnel for [`NAME`] (plain HTTP too) on `shared`, whose client behaves as `client`;
/// counts the streams that reached it.
fn bind(shared: &Shared, client: Client) -> Arc<AtomicUsize> {
    let (proxy_io, client_io) = tokio::io::duplex(64 * 1024);
    let (session, _incoming) = Session::spawn(proxy_io, Role::Proxy, SessionConfig::default());
    let (client_session, mut incoming) =
        Session::spawn(client_io, Role::Client, SessionConfig::default());
    let opened = Arc::new(AtomicUsize::new(0));
    let counter = opened.clone();
    tokio::spawn(async move {
        let _keep = client_session;
        while let Some(mut stream) = incoming.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let header = StreamHeader::read(&mut stream).await.unwrap();
            assert_eq!(header.hostname, NAME);
            let mut got = vec![0; request().len()];
            stream.read_exact(&mut got).await.unwrap();
            assert_eq!(got, request().as_bytes());
            match client {
                Client::Resets => drop(stream),
                Client::AnswersTheRequest => {
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi";
                    let mut first = vec![ACK_ACCEPTED];
                    first.extend_from_slice(answer);
                    stream.write_all(&first).await.unwrap();
                    stream.shutdown().await.unwrap();
                }
            }
        }
    });
    let id = shared.registry.new_tunnel_id();
    shared.registry.bind(NAME, id, session, true);
    opened
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_visitors_first_bytes_reach_the_tunnel_with_its_stream_header() {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (a, a_http, _) = proxy(&shutdown).await;
    let (b, _, b_peer) = proxy(&shutdown).await;
    let opened = bind(&b, Client::AnswersTheRequest);
    believe_held_by(&a, &[b_peer]);

    // The client answers only once it has the request: had the holder opened the stream with
    // the header alone and waited for the acknowledgement before taking the request from the
    // link, neither would move until the stream-open timeout.
    let answer = visit(a_http).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nhi"), "{answer}");
    assert_eq!(opened.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_request_that_reached_a_tunnel_is_not_offered_to_another_holder() {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (a, a_http, _) = proxy(&shutdown).await;
    let (b, _, b_peer) = proxy(&shutdown).await;
    let (c, _, c_peer) = proxy(&shutdown).await;
    let at_b = bind(&b, Client::Resets);
    let at_c = bind(&c, Client::AnswersTheRequest);
    believe_held_by(&a, &[b_peer, c_peer]);

    // Whichever holder is offered the visitor first: if it is the one whose client resets
    // after taking the request, the request may have reached its origin, and the visitor is
    // told the tunnel failed rather than having it sent again through the other.
    let answer = visit(a_http).await;
    let (b_saw, c_saw) = (at_b.load(Ordering::SeqCst), at_c.load(Ordering::SeqCst));
    if b_saw == 1 {
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        assert_eq!(c_saw, 0, "the request was sent twice");
    } else {
        assert_eq!((b_saw, c_saw), (0, 1));
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    }
}
