#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Tests of the private Tor network harness itself, without shroud: an Arti
//! client configured from the network file alone reaches a local echo
//! server, and the connection the server sees comes from one of the exits.

use std::net::SocketAddr;
use std::time::Instant;

use arti_client::TorClient;
use shroud_tests::tornet::{socket_owner, tcp_connections_of, RelayKind, TorNet};
use shroud_tests::{init, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arti_reaches_local_echo_through_an_exit() -> anyhow::Result<()> {
    init();
    let waited = Instant::now();
    let net = tokio::task::spawn_blocking(TorNet::shared).await??;
    eprintln!(
        "tornet: consensus listing all {} relays after {:.1?} (waited {:.1?} here); files in {}",
        net.relays().len(),
        net.startup_time(),
        waited.elapsed(),
        net.network_file.parent().unwrap().display()
    );
    assert_eq!(net.relays().len(), 8);
    assert_eq!(net.exits().len(), 3);
    assert_eq!(net.tor_pids().len(), 8);
    for relay in net.relays() {
        assert_eq!(net.relay_by_pid(relay.pid).unwrap().nick, relay.nick);
        assert_eq!(relay.v3ident.is_some(), relay.kind == RelayKind::Authority);
    }

    let config = net.arti_config(&net.new_state_root()?)?;
    let started = Instant::now();
    let client = within(60, TorClient::create_bootstrapped(config)).await?;
    eprintln!("tornet: arti bootstrapped in {:.1?}", started.elapsed());

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut socket, peer) = listener.accept().await?;
        let (mut reader, mut writer) = socket.split();
        let echoed = tokio::io::copy(&mut reader, &mut writer).await?;
        anyhow::Ok((peer, echoed))
    });

    let started = Instant::now();
    let mut stream = within(30, client.connect(("127.0.0.1", echo_addr.port()))).await?;
    let payload: Vec<u8> = (0..32 * 1024_u32).map(|i| (i % 251) as u8).collect();
    stream.write_all(&payload).await?;
    stream.flush().await?;
    let mut back = vec![0; payload.len()];
    within(30, stream.read_exact(&mut back)).await?;
    assert!(back == payload, "the echo came back altered");
    eprintln!(
        "tornet: stream opened and 32 KiB echoed in {:.1?}",
        started.elapsed()
    );

    // The connection is still open: find who holds its far end.
    let peer = tcp_peer_of(echo_addr);
    let owner = socket_owner(peer, echo_addr).expect("someone holds the echo server's peer socket");
    let exit = net
        .relay_by_pid(owner)
        .unwrap_or_else(|| panic!("pid {owner} holding {peer} is not a tor of the network"));
    assert_eq!(exit.kind, RelayKind::Exit, "{} is not an exit", exit.nick);
    assert_ne!(owner, std::process::id());
    assert!(tcp_connections_of(owner).contains(&(peer, echo_addr)));
    eprintln!(
        "tornet: the echo server's peer {peer} is {} (pid {owner})",
        exit.nick
    );

    stream.shutdown().await?;
    drop(stream);
    let (accepted_peer, echoed) = within(30, server).await??;
    assert_eq!(accepted_peer, peer);
    assert_eq!(echoed, payload.len() as u64);
    Ok(())
}

/// The remote end of the one established connection to `server`, as this
/// process sees it.
fn tcp_peer_of(server: SocketAddr) -> SocketAddr {
    let mine = tcp_connections_of(std::process::id());
    let peers: Vec<SocketAddr> = mine
        .iter()
        .filter(|(local, _)| *local == server)
        .map(|(_, remote)| *remote)
        .collect();
    assert_eq!(peers.len(), 1, "connections to {server}: {mine:?}");
    peers[0]
}

#[tokio::test]
async fn socket_helpers_see_a_local_connection() -> anyhow::Result<()> {
    init();
    let me = std::process::id();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = listener.local_addr()?;
    let (client, accepted) = tokio::join!(TcpStream::connect(server_addr), listener.accept());
    let client = client?;
    let (_accepted, peer) = accepted?;
    let client_addr = client.local_addr()?;
    assert_eq!(peer, client_addr);

    assert_eq!(socket_owner(client_addr, server_addr), Some(me));
    assert_eq!(socket_owner(server_addr, client_addr), Some(me));
    let conns = tcp_connections_of(me);
    assert!(conns.contains(&(client_addr, server_addr)), "{conns:?}");
    assert!(conns.contains(&(server_addr, client_addr)), "{conns:?}");

    // Nobody holds a port that was just released.
    let free = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    assert_eq!(socket_owner(free, server_addr), None);
    assert!(tcp_connections_of(u32::MAX).is_empty());
    Ok(())
}
