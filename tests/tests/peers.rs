//! Every proxy of a fleet serves every name: five `shroud-proxy` processes gossip over
//! authenticated peer links, a client holds tunnels to two of them, and visitors at any of
//! the five reach the origin, the three without a tunnel forwarding them to a holder.
//!
//! What is asserted is what a visitor and the origin see: HTTPS (certificate verified) and
//! plain-HTTP visitors get through at every proxy, and the origin reads each visitor's own
//! address and port in a PROXY protocol header (each visitor connects from a loopback address
//! of its own). A holder killed with SIGKILL under steady load costs only what was in flight
//! through it, and drops out of routing within gossip's detection time. A process without
//! the fleet secret can neither link nor change a route.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shroud_mux::auth::SecretKey;
use shroud_tests::ports::free_ports;
use shroud_tests::scale::connect_from;
use shroud_tests::stack::{ClientSpec, Pki, ProxyProcess, TestClient};
use shroud_tests::visitor::{get_request, http_exchange, tls_handshake};
use shroud_tests::{init, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "example.test";
const SECRET: &str = "a-fleet-secret-of-sufficient-length";
const PROXIES: usize = 5;
/// The proxies the client holds tunnels to.
const HOLDERS: [usize; 2] = [0, 1];

fn proxy_name(i: usize) -> String {
    format!("p{i}.proxy.example")
}

/// The loopback address visitor `n` connects from.
fn visitor_ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + n))
}

/// An origin that expects a PROXY protocol v1 line on every connection, then (with TLS, the
/// certificate for [`HOST`]) one request, and answers with the source the line named.
struct ProxyProtocolOrigin {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ProxyProtocolOrigin {
    async fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = within(30, Self::serve(stream, tls)).await;
                });
            }
        });
        Self { addr, task }
    }

    async fn serve(
        mut stream: TcpStream,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> anyhow::Result<()> {
        let source = read_proxy_line(&mut stream).await?;
        match tls {
            Some(tls) => answer(tls.accept(stream).await?, &source).await,
            None => answer(stream, &source).await,
        }
    }
}

impl Drop for ProxyProtocolOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads `PROXY TCP4 SRC DST SPORT DPORT\r\n` and returns `SRC:SPORT`.
async fn read_proxy_line(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        anyhow::ensure!(line.len() < 108, "PROXY line too long");
        line.push(stream.read_u8().await?);
    }
    let line = String::from_utf8(line)?;
    let fields: Vec<&str> = line.trim_end().split(' ').collect();
    anyhow::ensure!(
        fields.len() == 6 && fields[0] == "PROXY",
        "not a PROXY line: {line:?}"
    );
    Ok(format!("{}:{}", fields[2], fields[4]))
}

/// Reads a request head and answers `200` with `source` as the body.
async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    source: &str,
) -> anyhow::Result<()> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(head.len() < 16 * 1024, "request head too long");
        head.push(stream.read_u8().await?);
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{source}",
        source.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// A proxy process of the fleet, with its listeners.
struct Member {
    proxy: ProxyProcess,
    http: SocketAddr,
    peer: SocketAddr,
}

/// The running fleet: [`PROXIES`] proxies that all know each other's peer addresses, and a
/// client holding tunnels to the [`HOLDERS`], with `--proxy-protocol v1` to the origins.
struct Fleet {
    pki: Pki,
    members: Vec<Member>,
    _client: TestClient,
    _origins: (ProxyProtocolOrigin, ProxyProtocolOrigin),
}

impl Fleet {
    async fn start() -> Self {
        let pki = Pki::new().unwrap();
        let secret_file = write_secret(&pki, "fleet.secret", SECRET);
        let client_key = SecretKey::generate().unwrap();
        let policy = format!("{HOST} {}\n", client_key.public());
        let peer_ports = free_ports::<PROXIES>().unwrap();
        let peer_addr = |i: usize| SocketAddr::from(([127, 0, 0, 1], peer_ports[i]));
        let mut members = Vec::new();
        for i in 0..PROXIES {
            let seeds = (0..PROXIES).filter(|j| *j != i).map(peer_addr);
            let member = Member::start(&pki, i, &policy, peer_addr(i), seeds, &secret_file).await;
            members.push(member);
        }

        let tls_origin = ProxyProtocolOrigin::start(Some(tokio_rustls::TlsAcceptor::from(
            pki.origin_tls(&[HOST]),
        )))
        .await;
        let http_origin = ProxyProtocolOrigin::start(None).await;
        let proxies = HOLDERS
            .iter()
            .map(|i| (proxy_name(*i), members[*i].proxy.https))
            .collect();
        let mut spec = ClientSpec::new(HOST, tls_origin.addr, proxies);
        spec.key = client_key;
        spec.http_target = Some(http_origin.addr);
        spec.timing.proxy_protocol = Some(shroud_client::proxy_protocol::Version::V1);
        let mut client = TestClient::start(&pki, spec).unwrap();
        within(30, client.wait_bound(HOLDERS.len())).await;
        Self {
            pki,
            members,
            _client: client,
            _origins: (tls_origin, http_origin),
        }
    }

    /// An HTTPS visitor from `visitor_ip(n)` at member `i`: the body the origin answered.
    async fn https_visit(&self, i: usize, n: u8) -> anyhow::Result<(String, String)> {
        let addr = self.members[i].proxy.https;
        let tcp = connect_from(visitor_ip(n), addr).await?;
        let me = tcp.local_addr()?.to_string();
        let config = shroud_tests::visitor::client_config(self.pki.ca.root_store(), &[]);
        let tls = tls_handshake(tcp, addr, HOST, config).await?;
        let response = http_exchange(tls, get_request(HOST, "/").as_bytes()).await?;
        anyhow::ensure!(response.status == 200, "status {}", response.status);
        Ok((me, String::from_utf8(response.body)?))
    }

    /// A plain-HTTP visitor from `visitor_ip(n)` at member `i`.
    async fn http_visit(&self, i: usize, n: u8) -> anyhow::Result<(String, String)> {
        let tcp = connect_from(visitor_ip(n), self.members[i].http).await?;
        let me = tcp.local_addr()?.to_string();
        let response = http_exchange(tcp, get_request(HOST, "/").as_bytes()).await?;
        anyhow::ensure!(response.status == 200, "status {}", response.status);
        Ok((me, String::from_utf8(response.body)?))
    }
}

impl Member {
    async fn start(
        pki: &Pki,
        i: usize,
        policy: &str,
        peer: SocketAddr,
        seeds: impl Iterator<Item = SocketAddr>,
        secret_file: &str,
    ) -> Self {
        let mut extra: Vec<String> = [
            "--listen-http",
            "127.0.0.1:0",
            "--listen-peer",
            &peer.to_string(),
            "--fleet-secret-file",
            secret_file,
        ]
        .map(str::to_owned)
        .into();
        for seed in seeds {
            extra.extend(["--peer".to_owned(), seed.to_string()]);
        }
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut proxy = ProxyProcess::start_with_args(pki, &proxy_name(i), policy, listen, &extra)
            .await
            .unwrap();
        let line = proxy
            .process
            .wait_for_line("listener=\"http\"", Duration::from_secs(20))
            .await
            .unwrap();
        let http = shroud_tests::stack::log_addr(&line).unwrap();
        Self { proxy, http, peer }
    }
}

fn write_secret(pki: &Pki, name: &str, secret: &str) -> String {
    let path = pki.dir().join(name);
    std::fs::write(&path, secret).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxy_serves_the_name_and_the_origin_sees_each_visitor() {
    init();
    let fleet = Fleet::start().await;
    let started = Instant::now();
    for i in 0..PROXIES {
        let n = (2 * i) as u8;
        // A proxy that has not heard of the holders yet holds the visitor until it has
        // (the route wait), so the first visit also shows gossip converging.
        let (me, seen) = within(30, fleet.https_visit(i, n)).await.unwrap();
        assert_eq!(
            seen, me,
            "HTTPS via proxy {i}: the origin saw the visitor's address"
        );
        let (me, seen) = within(30, fleet.http_visit(i, n + 1)).await.unwrap();
        assert_eq!(
            seen, me,
            "HTTP via proxy {i}: the origin saw the visitor's address"
        );
    }
    eprintln!(
        "HTTPS and HTTP visitors got through at all {PROXIES} proxies ({} forwarding) within {:?}",
        PROXIES - HOLDERS.len(),
        started.elapsed()
    );
}

/// Steady load: a loop of HTTPS visitors at each of the given proxies, one visit at a time.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    loops: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(fleet: &Fleet, at: &[usize]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut loops = Vec::new();
        for &i in at {
            let addr = fleet.members[i].proxy.https;
            let roots = fleet.pki.ca.root_store();
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            loops.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let visit = shroud_tests::https_get(addr, HOST, roots.clone(), "/");
                    match tokio::time::timeout(Duration::from_secs(20), visit).await {
                        Ok(Ok(response)) if response.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let status = other.map(|r| r.map(|r| r.status));
                            eprintln!("visitor at proxy {i} failed: {status:?}");
                        }
                    }
                }
            }));
        }
        Self {
            stop,
            ok,
            failed,
            loops,
        }
    }

    fn succeeded(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the loops; the visits that succeeded and failed.
    async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.loops {
            within(30, task).await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// A fleet serving at every proxy, under load at every one but `victim`.
async fn loaded_fleet(victim: usize) -> (Fleet, Load) {
    let fleet = Fleet::start().await;
    for i in 0..PROXIES {
        within(30, fleet.https_visit(i, 0)).await.unwrap();
    }
    let others: Vec<usize> = (0..PROXIES).filter(|i| *i != victim).collect();
    let load = Load::start(&fleet, &others);
    within(20, async {
        while load.succeeded() < 20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    (fleet, load)
}

/// Waits until member `observer` logs that gossip dropped member `gone`; how long it took
/// from `since`.
async fn dropped(fleet: &mut Fleet, observer: usize, gone: usize, since: Instant) -> Duration {
    let line = format!(
        "peer left or stopped answering peer={}",
        fleet.members[gone].peer
    );
    let process = &mut fleet.members[observer].proxy.process;
    within(20, process.wait_for_line(&line, Duration::from_secs(20)))
        .await
        .unwrap();
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_under_load_costs_only_its_visitors_in_flight() {
    init();
    const VICTIM: usize = HOLDERS[0];
    let (mut fleet, load) = loaded_fleet(VICTIM).await;

    fleet.members[VICTIM].proxy.kill();
    let killed = Instant::now();
    // A proxy without a tunnel notices through gossip alone.
    let detected = dropped(&mut fleet, PROXIES - 1, VICTIM, killed).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failed) = load.stop().await;
    eprintln!(
        "kill -9 of a holder: {failed} of {} visits failed, gossip dropped it after {detected:?}",
        ok + failed
    );
    // At most the visits in flight through the victim: one per loop.
    assert!(failed < PROXIES, "{failed} visits failed");
    assert!(
        detected <= Duration::from_secs(10),
        "detected after {detected:?}"
    );
    // And after: every survivor still serves.
    for i in (0..PROXIES).filter(|i| *i != VICTIM) {
        within(20, fleet.https_visit(i, 1)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_stopped_gracefully_under_load_costs_no_visitor() {
    init();
    const LEAVING: usize = HOLDERS[0];
    let (mut fleet, load) = loaded_fleet(LEAVING).await;

    fleet.members[LEAVING].proxy.process.terminate();
    let stopped = Instant::now();
    // It says goodbye: the others drop it at once, not after the detection time.
    let left = dropped(&mut fleet, PROXIES - 1, LEAVING, stopped).await;
    let status = fleet.members[LEAVING]
        .proxy
        .process
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed) = load.stop().await;
    eprintln!(
        "SIGTERM of a holder: {failed} of {} visits failed, gossip dropped it after {left:?}",
        ok + failed
    );
    assert_eq!(failed, 0);
    assert!(left < Duration::from_secs(2), "dropped after {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_without_the_fleet_secret_neither_links_nor_routes() {
    init();
    let mut fleet = Fleet::start().await;
    // An outsider: a proxy with another secret, seeded with every member, holding a name
    // of its own for a client of its own.
    let outsider_secret =
        write_secret(&fleet.pki, "outsider.secret", "not-the-fleet-secret-at-all");
    const OUTSIDER_HOST: &str = "outsider.test";
    let key = SecretKey::generate().unwrap();
    let policy = format!("{OUTSIDER_HOST} {}\n", key.public());
    let [port] = free_ports::<1>().unwrap();
    let peer = SocketAddr::from(([127, 0, 0, 1], port));
    let seeds = fleet.members.iter().map(|m| m.peer);
    let outsider = Member::start(&fleet.pki, 9, &policy, peer, seeds, &outsider_secret).await;
    let origin = shroud_tests::HttpOrigin::plain().await.unwrap();
    let mut spec = ClientSpec::new(
        OUTSIDER_HOST,
        origin.addr(),
        vec![(proxy_name(9), outsider.proxy.https)],
    );
    spec.key = key;
    spec.http_target = Some(origin.addr());
    let mut client = TestClient::start(&fleet.pki, spec).unwrap();
    within(30, client.wait_bound(1)).await;

    // The members refuse its links.
    for member in &mut fleet.members {
        let refused = member
            .proxy
            .process
            .wait_for_line("does not hold the fleet secret", Duration::from_secs(30));
        within(30, refused).await.unwrap();
    }

    // A raw attempt with a made-up proof gets no proof back: the connection just ends.
    let tcp = TcpStream::connect(fleet.members[2].peer).await.unwrap();
    let config =
        shroud_tests::visitor::client_config(fleet.pki.ca.root_store(), &[shroud_mux::peer::ALPN]);
    let mut tls = tls_handshake(tcp, fleet.members[2].peer, &proxy_name(2), config)
        .await
        .unwrap();
    tls.write_all(&[0x55; shroud_mux::peer::PROOF_LEN])
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = within(15, tls.read_to_end(&mut rest)).await;
    assert!(
        rest.is_empty(),
        "the listener sent {read:?} {rest:?} to an outsider"
    );

    // No member routes the outsider's name, and every member still serves the fleet's.
    for i in 0..PROXIES {
        let response = within(
            20,
            shroud_tests::http_get(fleet.members[i].http, OUTSIDER_HOST, "/"),
        )
        .await
        .unwrap();
        assert_eq!(response.status, 404, "proxy {i} routed the outsider's name");
        within(30, fleet.https_visit(i, 3)).await.unwrap();
    }
    for member in &fleet.members {
        let text = member.proxy.process.output_text();
        assert!(
            !text.contains(&format!("peer joined peer={peer}")),
            "a member let the outsider in"
        );
    }
}
