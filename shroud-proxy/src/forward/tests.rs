//! The one-hop rule, on two proxies in this process that each believe the other holds a
//! name: a visitor for it is forwarded once, refused by the other, and answered at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

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

/// Makes `shared` believe the peer at `addr` is alive and holds [`NAME`].
fn believe_holds(shared: &Shared, addr: SocketAddr) {
    let peers = shared.peers().unwrap();
    let id = PeerId { addr, bump: 1 };
    peers.member_up(id.clone());
    assert!(peers.record_holding(id, 1, vec![NAME.to_owned()]));
    assert_eq!(peers.holders(NAME), vec![addr]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_that_each_believe_the_other_holds_a_name_do_not_loop() {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (a, a_http, a_peer) = proxy(&shutdown).await;
    let (b, b_http, b_peer) = proxy(&shutdown).await;
    believe_holds(&a, b_peer);
    believe_holds(&b, a_peer);

    for (http, from, to) in [(a_http, &a, b_peer), (b_http, &b, a_peer)] {
        let visit = async {
            let mut visitor = tokio::net::TcpStream::connect(http).await.unwrap();
            let request = format!("GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n");
            visitor.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            visitor.read_to_end(&mut answer).await.unwrap();
            String::from_utf8(answer).unwrap()
        };
        // Forwarded once, refused by the peer (which routes to its own tunnels only), and
        // answered by the first proxy: well within a second on loopback.
        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), visit)
            .await
            .expect("a forwarding loop: no answer");
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        // It was answered after a forward, not before one.
        assert!(from.peers().unwrap().linked(to));
    }
}
