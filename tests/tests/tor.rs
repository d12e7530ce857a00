//! The Tor transport on a private Tor network on 127.0.0.1 (Debian's `tor`; see
//! `shroud_tests::tornet`). These tests never skip: without `tor` they fail and say so.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shroud_tests::onion::{
    files_under, private_violations, tcp_peers, wait_for_address, OnionProxy,
};
use shroud_tests::process::Process;
use shroud_tests::stack::{binary, Pki, TestProxy};
use shroud_tests::tornet::{socket_owner, tcp_connections_of, TorNet};
use shroud_tests::{https_get, init, within, HttpOrigin};

const HOST: &str = "example.test";

async fn network() -> &'static TorNet {
    tokio::task::spawn_blocking(TorNet::shared)
        .await
        .unwrap()
        .expect(
            "the private Tor network must start (is Debian's tor installed? .ci/run installs it)",
        )
}

/// The peers of the TCP connections this process accepted on `port`.
/// This process's connections accepted on `port`, as (local, remote).
fn peers_on(port: u16) -> Vec<(SocketAddr, SocketAddr)> {
    tcp_connections_of(std::process::id())
        .into_iter()
        .filter(|(local, _)| local.port() == port)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_tunnels_cross_tor_and_no_proxy_sees_the_client() {
    init();
    let net = network().await;
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key_path = pki.dir().join("client.key");
    let key = shroud_tests::stack::make_key(&key_path).unwrap();
    let policy = format!("{HOST} {key}\n");
    let [one, two] = TestProxy::start_each(&pki, ["one.proxy.test", "two.proxy.test"], &policy)
        .await
        .unwrap();

    // No --transport: Tor is the default.
    let state = pki.dir().join("state");
    let mut args = vec![
        HOST.to_owned(),
        origin.addr().to_string(),
        "--proxy-ca".into(),
        pki.ca_path.display().to_string(),
        "--key".into(),
        key_path.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--tor-network".into(),
        net.network_file.display().to_string(),
    ];
    for proxy in [&one, &two] {
        args.extend([
            "--proxy".into(),
            format!("{}:{}", proxy.name, proxy.https.port()),
            "--resolve".into(),
            format!("{}:{}:127.0.0.1", proxy.name, proxy.https.port()),
        ]);
    }
    let started = Instant::now();
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("Tor bootstrapped", Duration::from_secs(120))
        .await
        .unwrap();
    let bootstrapped = started.elapsed();
    client
        .wait_for_line("tunnel up", Duration::from_secs(90))
        .await
        .unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(90))
        .await
        .unwrap();
    eprintln!(
        "tor: client bootstrapped in {bootstrapped:?}, both tunnels up after {:?}",
        started.elapsed()
    );
    let log = client.output_text();
    assert!(
        log.contains("Tor bootstrap:"),
        "bootstrap progress is shown: {log}"
    );
    assert!(
        !log.contains(&origin.addr().to_string()),
        "the target is never logged at info"
    );

    // Visitors reach the origin through either proxy, verifying the origin's certificate.
    for proxy in [&one, &two] {
        let response = within(
            60,
            https_get(proxy.https, HOST, pki.ca.root_store(), "/via-tor"),
        )
        .await
        .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body_text(), "hello from origin: GET /via-tor\n");
    }

    // Each proxy's tunnel connection comes from a tor process of the network (an exit), never
    // from the client; on loopback every address is 127.0.0.1, so tell them apart by process.
    let exits: Vec<u32> = net.exits().iter().map(|r| r.pid).collect();
    for proxy in [&one, &two] {
        let peers = peers_on(proxy.https.port());
        assert!(!peers.is_empty(), "{} holds its tunnel", proxy.name);
        for (local, peer) in peers {
            let owner =
                socket_owner(peer, local).expect("the far end of a tunnel belongs to a process");
            assert_ne!(
                owner,
                client.pid(),
                "{} sees the client directly",
                proxy.name
            );
            assert!(
                exits.contains(&owner),
                "{}'s tunnel comes from pid {owner}, not an exit relay {exits:?}",
                proxy.name
            );
        }
    }
    let proxy_ports = [one.https.port(), two.https.port()];
    let direct: Vec<_> = tcp_connections_of(client.pid())
        .into_iter()
        .filter(|(_, remote)| proxy_ports.contains(&remote.port()))
        .collect();
    assert!(
        direct.is_empty(),
        "the client holds TCP connections to proxies: {direct:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_bootstrap_fails_and_says_why() {
    init();
    // A network whose directory authority listens nowhere: bootstrap cannot progress. Nothing
    // leaves loopback.
    let pki = Pki::new().unwrap();
    let net = network().await;
    let text = std::fs::read_to_string(&net.network_file).unwrap();
    let dead = net.relays().iter().fold(text, |text, relay| {
        text.replace(&relay.or_addr().to_string(), "127.0.0.1:9")
            .replace(&relay.dir_addr().to_string(), "127.0.0.1:9")
    });
    let dead_file = pki.dir().join("dead-network.toml");
    std::fs::write(&dead_file, dead).unwrap();
    let key_path = pki.dir().join("client.key");
    let args = [
        HOST,
        "127.0.0.1:9",
        "--proxy",
        "proxy.test:443",
        "--key",
        key_path.to_str().unwrap(),
        "--state-dir",
        pki.dir().join("state").to_str().unwrap(),
        "--tor-network",
        dead_file.to_str().unwrap(),
        "--tor-bootstrap-timeout-secs",
        "5",
    ]
    .map(String::from);
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    let status = client.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert_eq!(status.code(), Some(1));
    let log = client.output_text();
    assert!(
        log.contains("Tor bootstrap did not finish within 5 s"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_are_looked_up_through_tor_and_name_the_proxies() {
    init();
    let net = network().await;
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key_path = pki.dir().join("client.key");
    let key = shroud_tests::stack::make_key(&key_path).unwrap();
    let proxy = TestProxy::start(&pki, "srv.proxy.test", &format!("{HOST} {key}\n"))
        .await
        .unwrap();
    let dns = shroud_tests::dns::TestDns::start("test.").await.unwrap();
    dns.add_srv(
        "_shroud._tcp.example.test",
        10,
        5,
        proxy.https.port(),
        "srv.proxy.test",
        60,
    )
    .unwrap();

    // Only --srv: no --proxy, no --discovery. The DNS query crosses Tor to --dns-server.
    let args: Vec<String> = [
        HOST.to_owned(),
        origin.addr().to_string(),
        "--srv".into(),
        "--dns-server".into(),
        dns.addr.to_string(),
        "--proxy-ca".into(),
        pki.ca_path.display().to_string(),
        "--key".into(),
        key_path.display().to_string(),
        "--state-dir".into(),
        pki.dir().join("state").display().to_string(),
        "--tor-network".into(),
        net.network_file.display().to_string(),
        "--resolve".into(),
        format!("srv.proxy.test:{}:127.0.0.1", proxy.https.port()),
    ]
    .into();
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(120))
        .await
        .unwrap();
    assert!(dns.queries() >= 1, "the SRV query reached the DNS server");
    let response = within(
        60,
        https_get(proxy.https, HOST, pki.ca.root_store(), "/srv"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);

    // Without --dns-server, tor mode refuses rather than ask this machine's resolver.
    let mut no_server = args.clone();
    let at = no_server.iter().position(|a| a == "--dns-server").unwrap();
    no_server.drain(at..at + 2);
    let output = std::process::Command::new(binary("shroud"))
        .args(&no_server)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("--dns-server"), "{err}");
}

/// A TCP relay in front of pebble that records, for every connection it accepts, which
/// process the far end belongs to. pebble builds its URLs from the request's Host, so once
/// the client starts at the relay's directory URL every ACME request comes through here.
struct OwnerRecordingRelay {
    addr: SocketAddr,
    owners: std::sync::Arc<std::sync::Mutex<Vec<Option<u32>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl OwnerRecordingRelay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let owners = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = owners.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, peer)) = listener.accept().await else {
                    return;
                };
                // Looked up at once, while the connection is open.
                let owner = socket_owner(peer, addr);
                record.lock().unwrap().push(owner);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, owners, task }
    }
}

impl Drop for OwnerRecordingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_reaches_the_ca_only_through_tor() {
    init();
    let net = network().await;
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::plain().await.unwrap();
    let key_path = pki.dir().join("client.key");
    let key = shroud_tests::stack::make_key(&key_path).unwrap();
    let proxy = TestProxy::start(&pki, "one.proxy.test", &format!("{HOST} {key}\n"))
        .await
        .unwrap();
    let setup = shroud_tests::pebble::PebbleSetup::new(proxy.https.port());
    let pebble = setup.start().unwrap();
    let relay =
        OwnerRecordingRelay::start(SocketAddr::from(([127, 0, 0, 1], setup.acme_port))).await;

    let state = pki.dir().join("state");
    let args: Vec<String> = vec![
        HOST.to_owned(),
        origin.addr().to_string(),
        "--proxy-ca".into(),
        pki.ca_path.display().to_string(),
        "--key".into(),
        key_path.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--tor-network".into(),
        net.network_file.display().to_string(),
        "--proxy".into(),
        format!("{}:{}", proxy.name, proxy.https.port()),
        "--resolve".into(),
        format!("{}:{}:127.0.0.1", proxy.name, proxy.https.port()),
        "--acme".into(),
        "admin@example.org".into(),
        "--acme-agree-tos".into(),
        "--acme-directory".into(),
        format!("https://127.0.0.1:{}/dir", relay.addr.port()),
        "--acme-ca".into(),
        setup.ca_pem().display().to_string(),
    ];
    let started = Instant::now();
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("installed a new certificate", Duration::from_secs(180))
        .await
        .unwrap();
    eprintln!(
        "tor: a certificate through Tor {:?} after start",
        started.elapsed()
    );

    // A visitor trusting only pebble's root reaches the origin.
    let roots = pebble.roots().await.unwrap();
    let response = within(60, https_get(proxy.https, HOST, roots, "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);

    // Every request to the CA came from an exit relay of the network, none from the client.
    let exits: Vec<u32> = net.exits().iter().map(|r| r.pid).collect();
    let owners = relay.owners.lock().unwrap().clone();
    assert!(
        owners.len() >= 3,
        "the ACME exchange went through the relay: {owners:?}"
    );
    for owner in owners {
        let owner = owner.expect("the far end of an ACME connection belongs to a process");
        assert_ne!(owner, client.pid(), "the CA saw the client directly");
        assert!(
            exits.contains(&owner),
            "an ACME connection from pid {owner}, not an exit {exits:?}"
        );
    }
}

/// `GET path` over TLS for HOST, through an Arti client to `onion`:443, verifying the origin's
/// certificate for HOST against `roots`. Retried (bounded) while the service's descriptor is
/// not yet where the visitor looks for it.
async fn get_through_onion(
    visitor: &arti_client::TorClient<tor_rtcompat::PreferredRuntime>,
    onion: &str,
    roots: rustls::RootCertStore,
    path: &str,
) -> shroud_tests::HttpResponse {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = async {
            let mut prefs = arti_client::StreamPrefs::new();
            prefs.connect_to_onion_services(arti_client::config::BoolOrAuto::Explicit(true));
            let stream = visitor.connect_with_prefs((onion, 443), &prefs).await?;
            let name = rustls_pki_types::ServerName::try_from(HOST)?;
            let tls =
                tokio_rustls::TlsConnector::from(shroud_tests::client_config(roots.clone(), &[]))
                    .connect(name, stream)
                    .await?;
            shroud_tests::visitor::http_exchange(
                tls,
                shroud_tests::visitor::get_request(HOST, path).as_bytes(),
            )
            .await
        }
        .await;
        match result {
            Ok(response) => {
                eprintln!("tor: onion visit succeeded at attempt {attempt}");
                return response;
            }
            Err(err) if Instant::now() < deadline => {
                eprintln!("tor: onion visit attempt {attempt} failed: {err:#}");
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Err(err) => panic!("no visit through the onion service within 120 s: {err:#}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onion_publishes_the_origin_as_an_onion_service_with_a_lasting_address() {
    init();
    let net = network().await;
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key_path = pki.dir().join("client.key");
    let key = shroud_tests::stack::make_key(&key_path).unwrap();
    let proxy = TestProxy::start(&pki, "onion.proxy.test", &format!("{HOST} {key}\n"))
        .await
        .unwrap();
    let state = pki.dir().join("state");
    let args: Vec<String> = vec![
        HOST.to_owned(),
        origin.addr().to_string(),
        "--onion".into(),
        "--proxy-ca".into(),
        pki.ca_path.display().to_string(),
        "--key".into(),
        key_path.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--tor-network".into(),
        net.network_file.display().to_string(),
        "--proxy".into(),
        format!("{}:{}", proxy.name, proxy.https.port()),
        "--resolve".into(),
        format!("{}:{}:127.0.0.1", proxy.name, proxy.https.port()),
    ];
    let started = Instant::now();
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    let onion = wait_for_address(&mut client, Duration::from_secs(120))
        .await
        .unwrap();
    client
        .wait_for_line(
            "onion service published its descriptor",
            Duration::from_secs(120),
        )
        .await
        .unwrap();
    eprintln!(
        "tor: onion service published {:?} after start",
        started.elapsed()
    );

    // A Tor visitor (Arti) reaches the origin through the onion address and verifies the
    // origin's own certificate for its public name: TLS passed through end to end.
    let visitor_state = net.new_state_root().unwrap();
    let visitor =
        arti_client::TorClient::create_bootstrapped(net.arti_config(&visitor_state).unwrap())
            .await
            .unwrap();
    let visited = Instant::now();
    let response = get_through_onion(&visitor, &onion, pki.ca.root_store(), "/via-onion").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "hello from origin: GET /via-onion\n");
    eprintln!("tor: first onion visit took {:?}", visited.elapsed());
    // The same origin answers at its public name, through the proxy (once the tunnel is up).
    let response = within(
        90,
        shroud_tests::https_get_retrying(
            proxy.https,
            HOST,
            pki.ca.root_store(),
            "/via-proxy",
            Duration::from_millis(200),
        ),
    )
    .await;
    assert_eq!(response.body_text(), "hello from origin: GET /via-proxy\n");

    // The service's key: in Arti's keystore under the state directory, readable by no one else.
    let keystore = state.join("tor/state/keystore");
    let keys = files_under(&keystore);
    assert!(
        keys.iter().any(|k| k.to_string_lossy().contains("hs_id")),
        "the identity key is in {}: {keys:?}",
        keystore.display()
    );
    assert_eq!(private_violations(&keystore), vec![], "keystore modes");

    // Stopped cleanly, and started again with the same state directory: the same address.
    client.terminate();
    let status = client.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", client.output_text());
    assert!(client.output_text().contains("onion service stopped"));
    let mut again = Process::spawn(&binary("shroud"), &args).unwrap();
    assert_eq!(
        wait_for_address(&mut again, Duration::from_secs(120))
            .await
            .unwrap(),
        onion
    );
    let log = again.output_text();
    assert!(
        !log.contains(&origin.addr().to_string()),
        "the target is never logged"
    );
}

/// Runs curl (silent but for errors, 60 s at most) with `args`; returns its exit code, stdout
/// and stderr.
async fn curl(args: &[&str]) -> (Option<i32>, String, String) {
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "60"])
            .args(&args)
            .output()
            .expect("curl runs (Debian's curl; .ci/run installs it)")
    })
    .await
    .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_listen_takes_local_programs_through_tor_exits() {
    init();
    let net = network().await;
    let pki = Pki::new().unwrap();
    let server = HttpOrigin::plain().await.unwrap();
    // The server's connections pass a relay that records which process each comes from.
    let relay = OwnerRecordingRelay::start(server.addr()).await;
    let key_path = pki.dir().join("client.key");
    let key = shroud_tests::stack::make_key(&key_path).unwrap();
    let proxy = TestProxy::start(&pki, "socks.proxy.test", &format!("{HOST} {key}\n"))
        .await
        .unwrap();
    let socks_port = shroud_tests::ports::free_port().unwrap();
    let socks = format!("127.0.0.1:{socks_port}");
    let args: Vec<String> = vec![
        HOST.to_owned(),
        "127.0.0.1:9".into(),
        "--socks-listen".into(),
        socks.clone(),
        "--proxy-ca".into(),
        pki.ca_path.display().to_string(),
        "--key".into(),
        key_path.display().to_string(),
        "--state-dir".into(),
        pki.dir().join("state").display().to_string(),
        "--tor-network".into(),
        net.network_file.display().to_string(),
        "--proxy".into(),
        format!("{}:{}", proxy.name, proxy.https.port()),
        "--resolve".into(),
        format!("{}:{}:127.0.0.1", proxy.name, proxy.https.port()),
    ];
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("HTTP CONNECT proxy", Duration::from_secs(120))
        .await
        .unwrap();

    let url = |path: &str| format!("http://{}{path}", relay.addr);
    // SOCKS5, the name (here an address) handed to the proxy, not resolved by curl.
    let (code, body, err) = curl(&["--socks5-hostname", &socks, &url("/by-socks")]).await;
    assert_eq!(code, Some(0), "curl through SOCKS5: {err}");
    assert_eq!(body, "hello from origin: GET /by-socks\n");
    // HTTP CONNECT on the same port.
    let (code, body, err) = curl(&[
        "--proxytunnel",
        "--proxy",
        &format!("http://{socks}"),
        &url("/by-connect"),
    ])
    .await;
    assert_eq!(code, Some(0), "curl through HTTP CONNECT: {err}");
    assert_eq!(body, "hello from origin: GET /by-connect\n");

    // The server saw exit relays, never the client.
    let exits: Vec<u32> = net.exits().iter().map(|r| r.pid).collect();
    let owners = relay.owners.lock().unwrap().clone();
    assert_eq!(owners.len(), 2, "one connection per request: {owners:?}");
    for owner in owners {
        let owner = owner.expect("the far end of each connection belongs to a process");
        assert_ne!(owner, client.pid(), "the server saw the client directly");
        assert!(
            exits.contains(&owner),
            "a connection from pid {owner}, not an exit {exits:?}"
        );
    }
    let direct: Vec<_> = tcp_connections_of(client.pid())
        .into_iter()
        .filter(|(_, remote)| remote.port() == relay.addr.port())
        .collect();
    assert!(
        direct.is_empty(),
        "the client connected to the server itself: {direct:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onion_and_socks_refuse_what_they_cannot_do_safely() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("client.key");
    let run = |extra: &[&str]| {
        let mut args = vec![HOST, "127.0.0.1:9", "--proxy", "proxy.test", "--key"];
        args.push(key.to_str().unwrap());
        args.extend_from_slice(extra);
        std::process::Command::new(binary("shroud"))
            .args(&args)
            .output()
            .unwrap()
    };
    for (extra, says) in [
        (
            &["--transport", "direct", "--onion"][..],
            "--onion publishes through Tor",
        ),
        (
            &["--transport", "direct", "--socks-listen", "127.0.0.1:0"][..],
            "--socks-listen sends programs' connections through Tor",
        ),
        (
            &["--socks-listen", "0.0.0.0:0"][..],
            "is not a loopback address",
        ),
    ] {
        let output = run(extra);
        assert_eq!(output.status.code(), Some(1), "{extra:?}");
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.contains(says), "{extra:?}: {err}");
    }
}

/// A `shroud` client through Tor on `net`, publishing `HOST` at `origin` through `proxies`
/// (`--proxy` values), with its own state under `state` and quick reconnects.
fn tor_client_args(
    net: &TorNet,
    pki: &Pki,
    key: &std::path::Path,
    state: &std::path::Path,
    origin: SocketAddr,
    proxies: &[String],
) -> Vec<String> {
    let mut args = vec![
        HOST.to_owned(),
        origin.to_string(),
        "--proxy-ca".into(),
        pki.ca_path.display().to_string(),
        "--key".into(),
        key.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--tor-network".into(),
        net.network_file.display().to_string(),
        "--max-backoff-secs".into(),
        "5".into(),
    ];
    for proxy in proxies {
        args.extend(["--proxy".into(), proxy.clone()]);
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_onion_proxy_takes_tunnels_that_never_touch_an_exit() {
    init();
    let net = network().await;
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key_path = pki.dir().join("client.key");
    let key = shroud_tests::stack::make_key(&key_path).unwrap();
    let name = "onion.proxy.test";
    let state = pki.dir().join("proxy-state");
    let base = shroud_tests::stack::proxy_args(&pki, name, &format!("{HOST} {key}\n")).unwrap();
    let args = OnionProxy::args(base, &state, &net.network_file);
    let started = Instant::now();
    let mut proxy = OnionProxy::start(args).await.unwrap();
    eprintln!(
        "tor onion: proxy's service reachable {:?} after start",
        started.elapsed()
    );

    // The service's key is on disk, mode 0600, and no directory under the state directory
    // lets others in (so neither do the lock files and directory cache Arti writes with the
    // umask's mode).
    let keystore = state.join("tor/state/keystore");
    let keys = files_under(&keystore);
    assert!(
        keys.iter().any(|k| k.to_string_lossy().contains("hs_id")),
        "the identity key is in the keystore: {keys:?}"
    );
    let loose: Vec<_> = private_violations(&state)
        .into_iter()
        .filter(|(path, _)| path.is_dir() || path.starts_with(&keystore))
        .collect();
    assert_eq!(loose, vec![], "state directory modes");

    // A client names the proxy NAME@ADDRESS.onion: its tunnel goes to the onion service.
    let client_state = pki.dir().join("client-state");
    let args = tor_client_args(
        net,
        &pki,
        &key_path,
        &client_state,
        origin.addr(),
        &[proxy.client_proxy(name)],
    );
    let started = Instant::now();
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(180))
        .await
        .unwrap();
    eprintln!(
        "tor onion: tunnel through the onion service up {:?} after the client started",
        started.elapsed()
    );
    let bound = proxy
        .process
        .wait_for_line("tunnel bound", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(bound.contains("peer=onion"), "{bound}");

    // Visitors reach the origin, whose own certificate they verify.
    let response = within(
        60,
        https_get(proxy.https, HOST, pki.ca.root_store(), "/via-onion"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "hello from origin: GET /via-onion\n");

    // /proc: no exit relay holds a connection to the proxy, and neither does the client,
    // whose every TCP connection is a Tor channel to a relay's ORPort.
    let exits: Vec<u32> = net.exits().iter().map(|r| r.pid).collect();
    for exit in &exits {
        let to_proxy: Vec<_> = tcp_connections_of(*exit)
            .into_iter()
            .filter(|(_, remote)| remote.port() == proxy.https.port())
            .collect();
        assert!(to_proxy.is_empty(), "exit {exit} holds {to_proxy:?}");
    }
    for (local, remote, owner) in tcp_peers(proxy.process.pid()) {
        if local.port() == proxy.https.port() {
            assert_eq!(
                owner,
                Some(std::process::id()),
                "only this test's visitors connect to the proxy ({remote})"
            );
        }
    }
    let client_peers = tcp_peers(client.pid());
    assert!(
        !client_peers.is_empty(),
        "the client holds its Tor channels"
    );
    for (_, remote, owner) in client_peers {
        assert_ne!(
            remote.port(),
            proxy.https.port(),
            "the client dialed the proxy"
        );
        if remote == origin.addr() {
            continue;
        }
        let relay = owner.and_then(|pid| net.relay_by_pid(pid));
        assert!(
            relay.is_some_and(|relay| relay.or_port == remote.port()),
            "the client holds a connection to {remote} (pid {owner:?}), not a relay's ORPort"
        );
    }

    // A bare ADDRESS.onion means the certificate must name the onion address: this one does
    // not, and the client refuses it for good rather than trust the address alone.
    let args = tor_client_args(
        net,
        &pki,
        &key_path,
        &pki.dir().join("bare-state"),
        origin.addr(),
        std::slice::from_ref(&proxy.address),
    );
    let mut bare = Process::spawn(&binary("shroud"), &args).unwrap();
    let status = bare.wait_exit(Duration::from_secs(180)).await.unwrap();
    assert_eq!(status.code(), Some(1));
    let log = bare.output_text();
    assert!(log.contains("the proxy's certificate was refused"), "{log}");

    // Restarted with the same state directory, the proxy has the same address; with a
    // certificate that also names it, the bare address works, and the first client's tunnel
    // comes back on its own.
    proxy.process.terminate();
    proxy
        .process
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap();
    pki.ca
        .issue(&[name, &proxy.address])
        .write_files(pki.dir(), name)
        .unwrap();
    let address = proxy.address.clone();
    let proxy = OnionProxy::start(proxy.args.clone()).await.unwrap();
    assert_eq!(
        proxy.address, address,
        "the onion address survives a restart"
    );
    let args = tor_client_args(
        net,
        &pki,
        &key_path,
        &pki.dir().join("bare-state-2"),
        origin.addr(),
        std::slice::from_ref(&proxy.address),
    );
    let mut bare = Process::spawn(&binary("shroud"), &args).unwrap();
    bare.wait_for_line("tunnel up", Duration::from_secs(180))
        .await
        .unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(180))
        .await
        .unwrap();
    let response = within(
        60,
        https_get(proxy.https, HOST, pki.ca.root_store(), "/again"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_list_carries_an_onion_proxys_endpoint_and_a_tor_client_dials_it() {
    use shroud_discovery::fleet::{Fleet, FleetFile};
    use shroud_mux::auth::SecretKey;

    init();
    let net = network().await;
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();

    // A discovery service with no static proxies: the onion proxy announces itself.
    const DISCOVERY: &str = "discovery.test";
    const SECRET: &str = "a-fleet-secret-of-sufficient-length";
    let (cert, key_file) = pki
        .ca
        .issue(&[DISCOVERY])
        .write_files(pki.dir(), DISCOVERY)
        .unwrap();
    let signing = SecretKey::generate().unwrap();
    let fleet = Fleet::new(FleetFile::default(), Duration::from_secs(30));
    let mut config = shroud_discovery::server::ServerConfig::new(
        shroud_discovery::server::tls_config(&cert, &key_file).unwrap(),
        std::sync::Arc::new(SecretKey::from_seed(&signing.to_seed())),
        fleet,
    );
    config.fleet_secret =
        Some(shroud_discovery::secret::FleetSecret::new(SECRET.to_owned()).unwrap());
    let listener = shroud_proxy::server::bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
    let discovery = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_discovery = stop.clone().drop_guard();
    tokio::spawn(shroud_discovery::server::run(listener, config, stop));
    let secret_file = pki.dir().join("fleet.secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let discovery_url = format!("https://{DISCOVERY}:{}", discovery.port());
    let discovery_resolve = format!("{DISCOVERY}:{}:127.0.0.1", discovery.port());

    let key_path = pki.dir().join("client.key");
    let key = shroud_tests::stack::make_key(&key_path).unwrap();
    let name = "listed.proxy.test";
    let mut args = OnionProxy::args(
        shroud_tests::stack::proxy_args(&pki, name, &format!("{HOST} {key}\n")).unwrap(),
        &pki.dir().join("proxy-state"),
        &net.network_file,
    );
    args.extend(
        [
            "--discovery",
            &discovery_url,
            "--resolve",
            &discovery_resolve,
            "--discovery-ca",
            &pki.ca_path.display().to_string(),
            "--fleet-secret-file",
            &secret_file.display().to_string(),
            "--region",
            "eu",
            // The name and port a client would dial through an exit; the list says so, and
            // carries the onion endpoint beside them.
            "--public-name",
            &format!("{name}:443"),
            "--heartbeat-secs",
            "1",
        ]
        .map(String::from),
    );
    let proxy = OnionProxy::start(args).await.unwrap();

    // A Tor client that knows only the discovery service: it asks through Tor, gets the entry
    // with its onion endpoint, and dials that, checking the certificate for the entry's name.
    let args: Vec<String> = [
        HOST,
        &origin.addr().to_string(),
        "--discovery",
        &discovery_url,
        "--discovery-key",
        &signing.public().to_string(),
        "--resolve",
        &discovery_resolve,
        "--proxy-ca",
        &pki.ca_path.display().to_string(),
        "--key",
        &key_path.display().to_string(),
        "--state-dir",
        &pki.dir().join("client-state").display().to_string(),
        "--tor-network",
        &net.network_file.display().to_string(),
        "--max-backoff-secs",
        "5",
    ]
    .map(String::from)
    .to_vec();
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    let up = client
        .wait_for_line("tunnel up", Duration::from_secs(180))
        .await
        .unwrap();
    assert!(
        up.contains(&format!("proxy={name}@{}:443", proxy.address)),
        "the tunnel goes to the listed onion endpoint: {up}"
    );
    let response = within(
        60,
        https_get(proxy.https, HOST, pki.ca.root_store(), "/listed"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
    // No exit carries the tunnel to the proxy's TLS port.
    for exit in net.exits() {
        let to_proxy: Vec<_> = tcp_connections_of(exit.pid)
            .into_iter()
            .filter(|(_, remote)| remote.port() == proxy.https.port())
            .collect();
        assert!(to_proxy.is_empty(), "{} holds {to_proxy:?}", exit.nick);
    }
}

/// `tor_client_args` for a client of one TestProxy on loopback, found through `--resolve`.
fn tor_client_of(
    net: &TorNet,
    pki: &Pki,
    key: &std::path::Path,
    state: &std::path::Path,
    origin: SocketAddr,
    proxy: &TestProxy,
) -> Vec<String> {
    let mut args = tor_client_args(
        net,
        pki,
        key,
        state,
        origin,
        &[format!("{}:{}", proxy.name, proxy.https.port())],
    );
    args.extend([
        "--resolve".into(),
        format!("{}:{}:127.0.0.1", proxy.name, proxy.https.port()),
    ]);
    args
}

/// Curl through the SOCKS5 proxy at `socks` (the name handed to the proxy), retried (bounded)
/// while the onion service's descriptor is not yet where the SOCKS proxy's Tor looks for it;
/// `args` are curl's other arguments, the URL last. Returns the body.
async fn curl_onion_retrying(socks: SocketAddr, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    let socks = socks.to_string();
    let mut failure = String::new();
    for attempt in 1..=40 {
        let mut all = vec!["--socks5-hostname", &socks];
        all.extend_from_slice(args);
        let (code, body, err) = curl(&all).await;
        if code == Some(0) {
            eprintln!("tor: onion visit through {socks} succeeded at attempt {attempt}");
            return body;
        }
        eprintln!("tor: onion visit attempt {attempt} through {socks} failed: {err}");
        failure = format!("curl {code:?}: {err}");
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    panic!("no visit through {socks} within 120 s: {failure}")
}

/// Asks for `url`, a port the onion service does not serve, through the SOCKS5 proxy at
/// `socks`. A timeout (SOCKS reply 6: no rendezvous in time on this small network) is the Tor
/// network's, not the service's answer, so it is asked again, at most three times; any other
/// answer is returned as curl gave it.
async fn curl_unserved_port(socks: &str, url: &str) -> (Option<i32>, String, String) {
    let mut attempt = 1;
    loop {
        let (code, body, err) = curl(&["--socks5-hostname", socks, url]).await;
        let timed_out = code == Some(97) && err.contains("(6)");
        if !timed_out || attempt == 3 {
            return (code, body, err);
        }
        eprintln!("tor: asking for an unserved port through {socks} timed out: {err}");
        attempt += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn onion_port_80_serves_the_http_target_to_tor_visitors_and_other_ports_are_refused() {
    init();
    let net = network().await;
    let pki = Pki::new().unwrap();
    let tls_origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let http_origin = HttpOrigin::plain().await.unwrap();
    // The http origin's connections pass a relay that records which process each comes from.
    let http_relay = OwnerRecordingRelay::start(http_origin.addr()).await;
    let key_path = pki.dir().join("client.key");
    let key = shroud_tests::stack::make_key(&key_path).unwrap();
    let proxy = TestProxy::start(&pki, "port80.proxy.test", &format!("{HOST} {key}\n"))
        .await
        .unwrap();

    // The client publishing the origin: 443 to TARGET, 80 to --http-target.
    let mut args = tor_client_of(
        net,
        &pki,
        &key_path,
        &pki.dir().join("onion-state"),
        tls_origin.addr(),
        &proxy,
    );
    args.extend([
        "--onion".into(),
        "--http-target".into(),
        http_relay.addr.to_string(),
    ]);
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    let onion = wait_for_address(&mut client, Duration::from_secs(120))
        .await
        .unwrap();
    client
        .wait_for_line(
            "onion service published its descriptor",
            Duration::from_secs(120),
        )
        .await
        .unwrap();
    // Logged before the descriptor's line, on the same stream.
    assert!(
        client.output_text().contains("80 to --http-target"),
        "the log names the ports"
    );

    // A C-tor visitor fetches plain HTTP from port 80 of the onion address: the http origin
    // answers, the body (which repeats the long path) intact.
    let ctor = tokio::task::spawn_blocking(|| net.start_socks_client("port80-visitor"))
        .await
        .unwrap()
        .unwrap();
    let ctor_socks = ctor.socks.unwrap();
    let path: String = (0..3000)
        .map(|i| char::from(b'a' + u8::try_from(i % 26).unwrap()))
        .collect();
    let path = format!("/{path}");
    let body = curl_onion_retrying(ctor_socks, &[&format!("http://{onion}{path}")]).await;
    assert_eq!(body, format!("hello from origin: GET {path}\n"));
    assert_eq!(http_origin.accepted(), 1, "the http origin answered");
    assert_eq!(tls_origin.accepted(), 0, "port 80 never reaches TARGET");

    // Another port: the service refuses the stream, the visitor is told, and the service
    // keeps serving.
    let socks = ctor_socks.to_string();
    let (code, body, err) =
        curl_unserved_port(&socks, &format!("http://{onion}:8080/other-port")).await;
    assert_eq!(code, Some(97), "a stream to port 8080: {body}{err}");
    assert!(
        err.contains("(5)"),
        "SOCKS5 reply 5, connection refused: {err}"
    );
    assert_eq!(http_origin.accepted(), 1, "port 8080 reached no origin");
    assert_eq!(tls_origin.accepted(), 0, "port 8080 reached no origin");
    let body = curl_onion_retrying(ctor_socks, &[&format!("http://{onion}/after")]).await;
    assert_eq!(body, "hello from origin: GET /after\n");

    // Another shroud client's --socks-listen reaches the onion service too (inside Tor, no
    // exit): plain HTTP on 80, and TLS on 443 with the origin's certificate verified for HOST.
    let socks_port = shroud_tests::ports::free_port().unwrap();
    let socks_addr = SocketAddr::from(([127, 0, 0, 1], socks_port));
    let mut args = tor_client_of(
        net,
        &pki,
        &key_path,
        &pki.dir().join("socks-state"),
        "127.0.0.1:9".parse().unwrap(),
        &proxy,
    );
    args.extend(["--socks-listen".into(), socks_addr.to_string()]);
    let mut socks_client = Process::spawn(&binary("shroud"), &args).unwrap();
    socks_client
        .wait_for_line("HTTP CONNECT proxy", Duration::from_secs(120))
        .await
        .unwrap();
    let body = curl_onion_retrying(socks_addr, &[&format!("http://{onion}{path}")]).await;
    assert_eq!(body, format!("hello from origin: GET {path}\n"));
    let ca = pki.ca_path.display().to_string();
    let body = curl_onion_retrying(
        socks_addr,
        &[
            "--cacert",
            &ca,
            "--connect-to",
            &format!("{HOST}:443:{onion}:443"),
            &format!("https://{HOST}/tls-through-socks"),
        ],
    )
    .await;
    assert_eq!(body, "hello from origin: GET /tls-through-socks\n");
    assert_eq!(tls_origin.accepted(), 1, "TLS went to TARGET");
    // A port the service does not serve: the SOCKS client says so, and serves on.
    let socks = socks_addr.to_string();
    let (code, _, err) =
        curl_unserved_port(&socks, &format!("http://{onion}:8080/other-port")).await;
    assert_eq!(code, Some(97), "curl's SOCKS error for port 8080: {err}");
    assert!(
        err.contains("(5)"),
        "SOCKS5 reply 5, connection refused, as C-tor says: {err}"
    );
    let body = curl_onion_retrying(socks_addr, &[&format!("http://{onion}/again")]).await;
    assert_eq!(body, "hello from origin: GET /again\n");
    // None of it left Tor through an exit: every connection to the http origin came from the
    // client that publishes it.
    let owners = http_relay.owners.lock().unwrap().clone();
    assert_eq!(owners.len(), 4, "one connection per visit: {owners:?}");
    for owner in owners {
        assert_eq!(owner, Some(client.pid()), "a connection to the http origin");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_hands_names_to_the_exit_which_resolves_them() {
    init();
    let net = network().await;
    let pki = Pki::new().unwrap();
    let server = HttpOrigin::plain().await.unwrap();
    let relay = OwnerRecordingRelay::start(server.addr()).await;
    // A name only the exits' resolver knows: this machine's resolver has never heard of it.
    let name = format!("socks-by-name.{}", shroud_tests::tornet::EXIT_RESOLVER_ZONE);
    let resolver = net.exit_resolver();
    resolver
        .add_a(&name, "127.0.0.1".parse().unwrap(), 60)
        .unwrap();
    let key_path = pki.dir().join("client.key");
    let key = shroud_tests::stack::make_key(&key_path).unwrap();
    let proxy = TestProxy::start(&pki, "names.proxy.test", &format!("{HOST} {key}\n"))
        .await
        .unwrap();
    let socks_port = shroud_tests::ports::free_port().unwrap();
    let socks = format!("127.0.0.1:{socks_port}");
    let mut args = tor_client_of(
        net,
        &pki,
        &key_path,
        &pki.dir().join("state"),
        "127.0.0.1:9".parse().unwrap(),
        &proxy,
    );
    args.extend(["--socks-listen".into(), socks.clone()]);
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("HTTP CONNECT proxy", Duration::from_secs(120))
        .await
        .unwrap();
    let url = |host: &str, path: &str| format!("http://{host}:{}{path}", relay.addr.port());

    // Resolved here (curl's --socks5 resolves before it asks the proxy), the name fails.
    let (code, _, err) = curl(&["--socks5", &socks, &url(&name, "/here")]).await;
    assert_ne!(code, Some(0), "{name} resolved on this machine");
    eprintln!("tor: {name} resolved on this machine: curl {code:?}: {err}");

    // Handed to the SOCKS proxy as a name, it reaches the server: an exit resolved it.
    let asked = resolver.queries();
    let (code, body, err) = curl(&["--socks5-hostname", &socks, &url(&name, "/by-name")]).await;
    assert_eq!(code, Some(0), "curl through SOCKS5 by name: {err}");
    assert_eq!(body, "hello from origin: GET /by-name\n");
    assert!(
        resolver.queries() > asked,
        "the exits' resolver was asked for {name}"
    );
    // HTTP CONNECT carries the name too.
    let (code, body, err) = curl(&[
        "--proxytunnel",
        "--proxy",
        &format!("http://{socks}"),
        &url(&name, "/by-name-connect"),
    ])
    .await;
    assert_eq!(code, Some(0), "curl through HTTP CONNECT by name: {err}");
    assert_eq!(body, "hello from origin: GET /by-name-connect\n");

    // `localhost` is in this machine's /etc/hosts, as 127.0.0.1, where the server listens:
    // curl resolving it itself gets there (the exit is handed the address)...
    let (code, body, err) = curl(&["--socks5", &socks, &url("localhost", "/local-lookup")]).await;
    assert_eq!(
        code,
        Some(0),
        "curl through SOCKS5 to localhost resolved here: {err}"
    );
    assert_eq!(
        body,
        "hello from origin: GET /local-lookup
"
    );
    // ...but handed to the proxy as a name, it goes to the exit, whose resolver is asked and
    // does not know it (C-tor exits ask their DNS server for every name: libevent's evdns
    // reads /etc/hosts only for getaddrinfo, which tor does not use). Had the client looked
    // the name up here, it would have reached the server. The program is told the host is
    // unreachable, and the proxy serves on.
    let asked = resolver.queries();
    let (code, _, err) = curl(&["--socks5-hostname", &socks, &url("localhost", "/")]).await;
    assert_eq!(code, Some(97), "curl's SOCKS error for localhost: {err}");
    assert!(
        err.contains("(4)"),
        "SOCKS5 reply 4, host unreachable: {err}"
    );
    assert!(
        resolver.queries() > asked,
        "the exits' resolver was asked for localhost"
    );
    let (code, body, err) = curl(&["--socks5-hostname", &socks, &url(&name, "/again")]).await;
    assert_eq!(code, Some(0), "curl by name after a failure: {err}");
    assert_eq!(body, "hello from origin: GET /again\n");

    // Every connection came from an exit relay, none from the client.
    let exits: Vec<u32> = net.exits().iter().map(|r| r.pid).collect();
    let owners = relay.owners.lock().unwrap().clone();
    assert_eq!(owners.len(), 4, "one connection per request: {owners:?}");
    for owner in owners {
        let owner = owner.expect("the far end of each connection belongs to a process");
        assert!(
            exits.contains(&owner),
            "a connection from pid {owner}, not an exit {exits:?}"
        );
    }
}
