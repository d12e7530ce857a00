//! Discovery and DNS, end to end on loopback with a real DNS server: clients find their proxies,
//! domain owners authorize keys with TXT records.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::rr::RecordType;
use shroud_client::discovery::DiscoverySource;
use shroud_client::fleet::FleetSource as _;
use shroud_client::shared::TunnelState;
use shroud_client::transport::{DirectTransport, Resolve};
use shroud_discovery::fleet::{Fleet, FleetFile};
use shroud_discovery::secret::FleetSecret;
use shroud_discovery::server::{RequireCname, ServerConfig};
use shroud_discovery::signed::{self, ProxyEntry, ProxyList};
use shroud_mux::auth::SecretKey;
use shroud_proxy::server::bind_listener;
use shroud_tests::dns::TestDns;
use shroud_tests::process::Process;
use shroud_tests::stack::ProxyProcess;
use shroud_tests::stack::{authorize, binary, make_key, ClientSpec, Pki, TestClient, TestProxy};
use shroud_tests::{https_get, init, tls_connect, within, HttpOrigin};
use tokio_util::sync::CancellationToken;

const HOST: &str = "example.test";
const DISCOVERY: &str = "discovery.test";
const SECRET: &str = "a-fleet-secret-of-sufficient-length";

struct Discovery {
    addr: SocketAddr,
    key: SecretKey,
    stop: CancellationToken,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start_discovery(
    pki: &Pki,
    fleet_toml: &str,
    list_ttl: Duration,
    require_cname: Option<RequireCname>,
) -> Discovery {
    start_discovery_with(
        pki,
        fleet_toml,
        list_ttl,
        require_cname,
        Duration::from_secs(1),
    )
    .await
}

async fn start_discovery_with(
    pki: &Pki,
    fleet_toml: &str,
    list_ttl: Duration,
    require_cname: Option<RequireCname>,
    heartbeat_timeout: Duration,
) -> Discovery {
    // Some proxies announce themselves to the IP (nothing resolves names in tests); others,
    // and clients, use the name through --resolve. The certificate covers both.
    let (cert, key_file) = pki
        .ca
        .issue(&[DISCOVERY, "127.0.0.1"])
        .write_files(pki.dir(), DISCOVERY)
        .unwrap();
    let tls = shroud_discovery::server::tls_config(&cert, &key_file).unwrap();
    let key = SecretKey::generate().unwrap();
    let fleet = Fleet::new(
        FleetFile::parse(fleet_toml).unwrap().validate().unwrap(),
        heartbeat_timeout,
    );
    let mut config = ServerConfig::new(tls, Arc::new(SecretKey::from_seed(&key.to_seed())), fleet);
    config.fleet_secret = Some(FleetSecret::new(SECRET.to_owned()).unwrap());
    config.list_ttl = list_ttl;
    config.require_cname = require_cname;
    let listener = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(shroud_discovery::server::run(
        listener,
        config,
        stop.clone(),
    ));
    Discovery { addr, key, stop }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A client-side discovery source for `HOST`, dialling the service on loopback.
fn source(pki: &Pki, discovery: &Discovery) -> DiscoverySource {
    DiscoverySource::new(
        &[format!("https://{DISCOVERY}:{}", discovery.addr.port())],
        discovery.key.public(),
        HOST,
        Some(&pki.ca_path),
        3,
        Duration::from_secs(10),
    )
    .unwrap()
}

fn direct_to(addrs: &[(&str, SocketAddr)]) -> DirectTransport {
    let mut resolve = Resolve::new();
    for (name, addr) in addrs {
        resolve.insert(name, addr.port(), addr.ip());
    }
    DirectTransport::new(resolve, Duration::from_secs(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_serves_file_and_heartbeat_proxies_and_drops_a_silent_one() {
    init();
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key = SecretKey::generate().unwrap();
    let policy = authorize(HOST, &key);
    let [one, two] = TestProxy::start_each(&pki, ["one.proxy.test", "two.proxy.test"], &policy)
        .await
        .unwrap();
    // `one` is in the fleet file; `two` announces itself with heartbeats.
    let fleet = format!(
        "[[proxy]]\nname = \"one.proxy.test\"\nport = {}\nregion = \"eu\"\n",
        one.https.port()
    );
    let discovery = start_discovery(&pki, &fleet, Duration::from_secs(3), None).await;
    let heartbeats = CancellationToken::new();
    let url: shroud_discovery::announce::DiscoveryUrl =
        format!("https://127.0.0.1:{}", discovery.addr.port())
            .parse()
            .unwrap();
    let entry = ProxyEntry {
        name: "two.proxy.test".into(),
        port: two.https.port(),
        region: "us".into(),
        onion: None,
    };
    let tls = shroud_discovery::announce::client_tls(Some(&pki.ca_path)).unwrap();
    let beats = heartbeats.clone();
    let announcer = tokio::spawn(async move {
        shroud_discovery::announce::run(
            &shroud_discovery::announce::Endpoint::new(url, tls),
            FleetSecret::new(SECRET.to_owned()).unwrap(),
            &shroud_discovery::announce::Presence::new(entry),
            // Every request here comes from 127.0.0.1, which the service rate-limits (5/s):
            // leave the client room to fetch its list.
            Duration::from_millis(500),
            beats,
        )
        .await
    });

    let mut spec = ClientSpec::new(
        HOST,
        origin.addr(),
        vec![
            one.dial(),
            two.dial(),
            (DISCOVERY.to_owned(), discovery.addr),
        ],
    );
    spec.key = key;
    spec.fleet = Some(Box::new(source(&pki, &discovery)));
    let mut client = TestClient::start(&pki, spec).unwrap();
    within(30, client.wait_bound(2)).await;
    for proxy in [&one, &two] {
        let response = within(20, https_get(proxy.https, HOST, pki.ca.root_store(), "/"))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
    }

    // `two` goes silent without saying goodbye (a crash): it misses its heartbeats, leaves the
    // list, and the client closes its tunnel at the next refresh.
    announcer.abort();
    within(
        40,
        client
            .client
            .wait_for_proxies(|proxies| proxies.len() == 1 && proxies[0].name == "one.proxy.test"),
    )
    .await;
    let response = within(20, https_get(one.https, HOST, pki.ca.root_store(), "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    drop(heartbeats);
}

/// An HTTPS server on loopback that answers every request with the next of `bodies`.
async fn fake_discovery(
    pki: &Pki,
    bodies: Vec<Vec<u8>>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let config = pki.origin_tls(&[DISCOVERY]);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        for body in bodies {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            response.extend_from_slice(&body);
            let _ = tls.write_all(&response).await;
            let _ = tls.shutdown().await;
        }
    });
    (addr, task)
}

fn list(issued_at: u64, expires_at: u64) -> ProxyList {
    ProxyList {
        version: 1,
        host: HOST.into(),
        issued_at,
        expires_at,
        proxies: vec![ProxyEntry {
            name: "one.proxy.test".into(),
            port: 443,
            region: "eu".into(),
            onion: None,
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_refuses_forged_expired_and_replayed_lists() {
    init();
    let pki = Pki::new().unwrap();
    let pinned = SecretKey::generate().unwrap();
    let impostor = SecretKey::generate().unwrap();
    let t = now();
    let bodies = vec![
        // Re-signed by another key (a compromised front end or a Tor exit would do this).
        signed::sign(&list(t, t + 300), &impostor).unwrap(),
        // Signed by the right key, but expired.
        signed::sign(&list(t - 600, t - 300), &pinned).unwrap(),
        // A good list...
        signed::sign(&list(t, t + 300), &pinned).unwrap(),
        // ...then an older one, replayed.
        signed::sign(&list(t - 100, t + 200), &pinned).unwrap(),
    ];
    let (addr, _server) = fake_discovery(&pki, bodies).await;
    let mut source = DiscoverySource::new(
        &[format!("https://{DISCOVERY}:{}", addr.port())],
        pinned.public(),
        HOST,
        Some(&pki.ca_path),
        3,
        Duration::from_secs(10),
    )
    .unwrap();
    let transport = direct_to(&[(DISCOVERY, addr)]);

    let forged = source.fetch(&transport).await.unwrap_err();
    assert!(forged.permanent, "{forged}");
    assert!(forged.message.contains("signature"), "{forged}");

    let expired = source.fetch(&transport).await.unwrap_err();
    assert!(expired.message.contains("expired"), "{expired}");

    let good = source.fetch(&transport).await.unwrap();
    assert_eq!(good.proxies.len(), 1);

    let replayed = source.fetch(&transport).await.unwrap_err();
    assert!(replayed.message.contains("replay"), "{replayed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_only_discovery_flags_finds_its_proxies_and_serves() {
    init();
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let proxy = TestProxy::start(&pki, "one.proxy.test", &format!("{HOST} {key}\n"))
        .await
        .unwrap();
    let fleet = format!(
        "[[proxy]]\nname = \"one.proxy.test\"\nport = {}\nregion = \"eu\"\n",
        proxy.https.port()
    );
    let discovery = start_discovery(&pki, &fleet, Duration::from_secs(300), None).await;
    let args: Vec<String> = [
        HOST.to_owned(),
        origin.addr().to_string(),
        "--transport".into(),
        "direct".into(),
        "--discovery".into(),
        format!("https://{DISCOVERY}:{}", discovery.addr.port()),
        "--discovery-key".into(),
        discovery.key.public().to_string(),
        "--proxy-ca".into(),
        pki.ca_path.display().to_string(),
        "--key".into(),
        key_path.display().to_string(),
        "--resolve".into(),
        format!("{DISCOVERY}:{}:127.0.0.1", discovery.addr.port()),
        "--resolve".into(),
        format!("one.proxy.test:{}:127.0.0.1", proxy.https.port()),
    ]
    .into();
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(30))
        .await
        .unwrap();
    let response = within(
        20,
        https_get(proxy.https, HOST, pki.ca.root_store(), "/found"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);

    // Pinned to a key the service does not sign with: refused, exit 1, and it says why.
    let mut wrong = args.clone();
    let at = wrong.iter().position(|a| a == "--discovery-key").unwrap();
    wrong[at + 1] = SecretKey::generate().unwrap().public().to_string();
    let mut refused = Process::spawn(&binary("shroud"), &wrong).unwrap();
    let status = refused.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(
        refused.output_text().contains("signature"),
        "{}",
        refused.output_text()
    );

    // With no source of proxies at all: a clear error.
    let output = std::process::Command::new(binary("shroud"))
        .args([HOST, "127.0.0.1:443", "--transport", "direct", "--key"])
        .arg(&key_path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("--proxy") && err.contains("--discovery") && err.contains("--srv"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txt_records_grant_refuse_and_revoke_binds() {
    init();
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let dns = TestDns::start("test.").await.unwrap();
    let key = SecretKey::generate().unwrap();
    dns.add_txt("_shroud.example.test", "v=unrelated", 1)
        .unwrap();
    dns.add_txt(
        "_shroud.example.test",
        &format!("shroud-key={}", key.public()),
        1,
    )
    .unwrap();
    // No authorized file entries at all: only DNS can grant.
    let proxy = TestProxy::start_with_dns(&pki, "proxy.test", "", dns.addr)
        .await
        .unwrap();

    // Granted by the TXT record.
    let mut spec = ClientSpec::new(HOST, origin.addr(), vec![proxy.dial()]);
    spec.key = SecretKey::from_seed(&key.to_seed());
    let mut client = TestClient::start(&pki, spec).unwrap();
    within(20, client.wait_bound(1)).await;
    let response = within(20, https_get(proxy.https, HOST, pki.ca.root_store(), "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);

    // Another key for the same name: refused and told why, but not for good (the owner may
    // yet list it), so it keeps trying; once a record lists it, it binds without a restart.
    let other_key = SecretKey::generate().unwrap();
    let mut other = ClientSpec::new(HOST, origin.addr(), vec![proxy.dial()]);
    other.key = SecretKey::from_seed(&other_key.to_seed());
    let mut waiting = TestClient::start(&pki, other).unwrap();
    let told_why = |s: &TunnelState| matches!(s, TunnelState::Waiting { reason } if reason.contains("_shroud.example.test"));
    within(20, waiting.client.wait_for(0, told_why)).await;
    dns.add_txt(
        "_shroud.example.test",
        &format!("shroud-key={}", other_key.public()),
        1,
    )
    .unwrap();
    within(90, waiting.client.wait_bound(1)).await;

    // The owner removes the records: the bound tunnels lose the name at the next check (the
    // TTL, at least 5 s), visitors are no longer routed, and the clients wait for a record
    // again instead of binding.
    dns.remove("_shroud.example.test", RecordType::TXT);
    within(60, client.client.wait_for(0, told_why)).await;
    within(60, waiting.client.wait_for(0, told_why)).await;
    assert!(tls_connect(proxy.https, HOST, pki.ca.root_store())
        .await
        .is_err());

    // DNS down: a bind is refused as unavailable, never granted.
    let key2 = SecretKey::generate().unwrap();
    dns.add_txt(
        "_shroud.two.test",
        &format!("shroud-key={}", key2.public()),
        1,
    )
    .unwrap();
    drop(dns);
    let mut spec = ClientSpec::new("two.test", origin.addr(), vec![proxy.dial()]);
    spec.key = key2;
    let mut unavailable = TestClient::start(&pki, spec).unwrap();
    within(60, unavailable.client.wait_for(0, |s| {
        matches!(s, TunnelState::Waiting { reason } if reason.contains("could not be checked"))
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_cname_lists_proxies_only_for_names_pointed_at_the_operator() {
    init();
    let pki = Pki::new().unwrap();
    let dns = TestDns::start("test.").await.unwrap();
    dns.add_cname(HOST, "example.test.proxies.test", 60)
        .unwrap();
    let fleet = "[[proxy]]\nname = \"one.proxy.test\"\nport = 443\nregion = \"eu\"\n";
    let on = start_discovery(
        &pki,
        fleet,
        Duration::from_secs(300),
        Some(RequireCname {
            domain: "proxies.test".into(),
            dns_servers: vec![dns.addr],
        }),
    )
    .await;
    let off = start_discovery(&pki, fleet, Duration::from_secs(300), None).await;
    let get = |addr: SocketAddr, host: &'static str| {
        let roots = pki.ca.root_store();
        async move {
            let stream = tls_connect(addr, DISCOVERY, roots).await.unwrap();
            let request = format!(
                "GET /v1/proxies?host={host} HTTP/1.1\r\nHost: {DISCOVERY}\r\nConnection: close\r\n\r\n"
            );
            shroud_tests::http_exchange(stream, request.as_bytes())
                .await
                .unwrap()
        }
    };
    assert_eq!(within(20, get(on.addr, HOST)).await.status, 200);
    let refused = within(20, get(on.addr, "other.test")).await;
    assert_eq!(refused.status, 403);
    assert_eq!(within(20, get(off.addr, "other.test")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_binary_announces_itself_and_leaves_at_once_on_sigterm() {
    init();
    let pki = Pki::new().unwrap();
    // A long heartbeat timeout: only the proxy's own goodbye can remove it quickly.
    let discovery = start_discovery_with(
        &pki,
        "",
        Duration::from_secs(300),
        None,
        Duration::from_secs(300),
    )
    .await;
    let secret_file = pki.dir().join("fleet.secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    // The service by name, which only --resolve can find here, as an operator whose
    // discovery name is not in DNS yet would run it.
    let extra: Vec<String> = [
        "--discovery".to_owned(),
        format!("https://{DISCOVERY}:{}", discovery.addr.port()),
        "--resolve".into(),
        format!("{DISCOVERY}:{}:127.0.0.1", discovery.addr.port()),
        "--discovery-ca".into(),
        pki.ca_path.display().to_string(),
        "--fleet-secret-file".into(),
        secret_file.display().to_string(),
        "--region".into(),
        "eu".into(),
        "--public-name".into(),
        "one.proxy.test:443".into(),
        "--heartbeat-secs".into(),
        "1".into(),
    ]
    .into();
    let mut proxy = ProxyProcess::start_with_args(
        &pki,
        "one.proxy.test",
        "",
        "127.0.0.1:0".parse().unwrap(),
        &extra,
    )
    .await
    .unwrap();

    let transport = direct_to(&[(DISCOVERY, discovery.addr)]);
    let mut listed = source(&pki, &discovery);
    let fleet = within(30, async {
        loop {
            if let Ok(fleet) = listed.fetch(&transport).await {
                break fleet;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(fleet.proxies.len(), 1);
    assert_eq!(fleet.proxies[0].name, "one.proxy.test");

    proxy.process.terminate();
    let status = proxy
        .process
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap();
    assert!(status.success());
    let err = within(10, source(&pki, &discovery).fetch(&transport))
        .await
        .unwrap_err();
    assert!(
        err.message.contains("404"),
        "the proxy left the list at once: {err}"
    );
}
