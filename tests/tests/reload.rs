//! Live reload, with the real binaries: SIGHUP (and `--watch`) change what a proxy authorizes
//! and which certificate it serves, what a discovery service lists and with which certificate,
//! and which certificate a client terminates visitors' TLS with, without a visitor of a name
//! that stays failing; a reload that fails changes nothing and says why.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shroud_mux::auth::{self, SecretKey, EXPORTER_LABEL, EXPORTER_LEN};
use shroud_mux::control::{self, BindName, BindStatus, Message, ReadError};
use shroud_mux::{MuxStream, Role, Session, SessionConfig};
use shroud_tests::load::{Load, LoadSpec};
use shroud_tests::pki::TestCa;
use shroud_tests::process::Process;
use shroud_tests::stack::{
    binary, direct_client_args, log_addr, make_key, Pki, ProxyProcess, TestProxy,
};
use shroud_tests::visitor::{client_config, get_request, tls_connect_with};
use shroud_tests::{http_exchange, https_get, init, tls_connect, within, HttpOrigin};

const PROXY: &str = "proxy.test";
const A: &str = "a.test";
const B: &str = "b.test";
const C: &str = "c.test";

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The authorized file `ProxyProcess` wrote for the proxy named [`PROXY`].
fn authorized_file(pki: &Pki) -> PathBuf {
    pki.dir().join(format!("{PROXY}.authorized"))
}

/// The authorized-file text that lets `key` (as `shroud key` prints it) bind each of `names`.
fn lines(key: &str, names: &[&str]) -> String {
    names.iter().map(|name| format!("{name} {key}\n")).collect()
}

/// A `shroud` client binary publishing `hostname` at `target` through the proxy at `proxy`,
/// with the key at `key`, asking again 1 s after its proxy's policy refuses it, and trusting
/// the certificates in `proxy_ca`.
fn spawn_client(
    pki: &Pki,
    key: &Path,
    hostname: &str,
    target: SocketAddr,
    proxy: SocketAddr,
    proxy_ca: &Path,
) -> Process {
    let mut args = direct_client_args(pki, key, hostname, target, &[(PROXY, proxy)]);
    let ca = args.iter().position(|a| a == "--proxy-ca").unwrap() + 1;
    args[ca] = proxy_ca.display().to_string();
    args.extend(["--refused-retry-secs".into(), "1".into()]);
    Process::spawn(&binary("shroud"), &args).unwrap()
}

/// Waits until a visitor for `name` gets the origin's answer through `proxy`.
async fn wait_routed(proxy: SocketAddr, name: &str, roots: &rustls::RootCertStore) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = https_get(proxy, name, roots.clone(), "/").await {
            assert_eq!(response.status, 200);
            return;
        }
        assert!(Instant::now() < deadline, "{name} was never routed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What became of a TLS visitor for a name.
#[derive(Debug, PartialEq, Eq)]
enum Visit {
    /// It reached the origin.
    Routed,
    /// The proxy turned it away as a name it does not route (`unrecognized_name`).
    TurnedAway,
    /// Anything else: a visitor routed to a tunnel in the instant it was closed, say.
    Failed(String),
}

async fn visit(proxy: SocketAddr, name: &str, roots: &rustls::RootCertStore) -> Visit {
    match tls_connect(proxy, name, roots.clone()).await {
        Ok(_) => Visit::Routed,
        Err(err) => {
            let text = format!("{err:#}").to_lowercase();
            if text.contains("unrecognisedname") || text.contains("unrecognized") {
                Visit::TurnedAway
            } else {
                Visit::Failed(text)
            }
        }
    }
}

/// Whether the proxy turns a TLS visitor for `name` away as a name it does not route.
async fn turned_away(proxy: SocketAddr, name: &str, roots: &rustls::RootCertStore) -> bool {
    match visit(proxy, name, roots).await {
        Visit::TurnedAway => true,
        Visit::Routed => false,
        Visit::Failed(err) => panic!("{name}: {err}"),
    }
}

/// Whether a tunnel's TLS handshake with the proxy succeeds for a client trusting only `ca`.
async fn tunnel_handshake_trusting(proxy: SocketAddr, ca: &TestCa) -> bool {
    let config = client_config(ca.root_store(), &[shroud_mux::ALPN]);
    tls_connect_with(proxy, PROXY, config).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_names_under_load_and_a_broken_file_changes_nothing() {
    init();
    let pki = Pki::new().unwrap();
    let roots = pki.ca.root_store();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[A, B, C])).await.unwrap();
    let mut proxy = ProxyProcess::start(&pki, PROXY, &lines(&key, &[A, B]), loopback())
        .await
        .unwrap();
    // One machine, one key, three names: one client process each, as the shroud@ unit runs.
    let mut clients: Vec<Process> = [A, B, C]
        .iter()
        .map(|name| {
            spawn_client(
                &pki,
                &key_path,
                name,
                origin.addr(),
                proxy.https,
                &pki.ca_path,
            )
        })
        .collect();
    wait_routed(proxy.https, A, &roots).await;
    wait_routed(proxy.https, B, &roots).await;
    // C is not authorized yet: refused, and its client waits to ask again rather than exit.
    clients[2]
        .wait_for_line("not authorized by this proxy", Duration::from_secs(20))
        .await
        .unwrap();
    assert!(turned_away(proxy.https, C, &roots).await);

    let load = Load::start(LoadSpec::get(vec![proxy.https], A, roots.clone(), 20));
    load.wait_ok(20, Duration::from_secs(30)).await.unwrap();

    // Add C, drop B.
    std::fs::write(authorized_file(&pki), lines(&key, &[A, C])).unwrap();
    let signalled = Instant::now();
    proxy.process.hangup();
    // B stops routing within a second of the signal.
    let mut looks = 0;
    loop {
        // A visitor routed to B's tunnel just as it closes fails otherwise: look again.
        let seen = visit(proxy.https, B, &roots).await;
        if seen == Visit::TurnedAway {
            break;
        }
        looks += 1;
        assert!(looks < 500, "B is still not turned away: {seen:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let unrouted_after = signalled.elapsed();
    assert!(
        unrouted_after < Duration::from_secs(1),
        "B routed for {unrouted_after:?} after the signal"
    );
    let reloaded = proxy
        .process
        .wait_for_line("reloaded", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(reloaded.contains("added=1"), "{reloaded}");
    assert!(reloaded.contains("removed=1"), "{reloaded}");
    // B's client is told why, and says so.
    let told = clients[1]
        .wait_for_line("the proxy unbound this hostname", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(told.contains("WARN"), "{told}");
    assert!(told.contains("no longer granted"), "{told}");
    assert!(told.contains("not authorized for this hostname"), "{told}");
    // C's client asks again on its own, and C is reached.
    wait_routed(proxy.https, C, &roots).await;
    let c_after = signalled.elapsed();
    // B's client asks again later (not in a loop), is refused, and stays up.
    clients[1]
        .wait_for_line("hostname not bound", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(clients[1].try_status().unwrap().is_none());
    assert!(turned_away(proxy.https, B, &roots).await);

    // A file with a bad line changes nothing, and the log names the file and the line.
    let broken = lines(&key, &[A, C]) + "d.test ed25519:not-a-key\n";
    std::fs::write(authorized_file(&pki), broken).unwrap();
    proxy.process.hangup();
    let failed = proxy
        .process
        .wait_for_line("reload failed", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(failed.contains("line 3"), "{failed}");
    assert!(
        failed.contains(&authorized_file(&pki).display().to_string()),
        "{failed}"
    );
    assert!(failed.contains("ERROR"), "{failed}");
    wait_routed(proxy.https, A, &roots).await;
    wait_routed(proxy.https, C, &roots).await;
    assert!(turned_away(proxy.https, B, &roots).await);
    load.wait_more_ok(20, Duration::from_secs(30))
        .await
        .unwrap();

    let snapshot = load.stop().await;
    eprintln!(
        "B unrouted {unrouted_after:?} after SIGHUP; C reached {c_after:?} after it; A: {snapshot}"
    );
    assert_eq!(snapshot.failed(), 0, "{snapshot}");
    assert_eq!(snapshot.unreachable, 0, "{snapshot}");
    for client in &mut clients {
        assert!(client.try_status().unwrap().is_none(), "a client exited");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_replaces_the_tunnel_certificate_for_new_handshakes_only_and_keeps_it_on_a_bad_key()
{
    init();
    let pki = Pki::new().unwrap();
    let roots = pki.ca.root_store();
    let other_ca = TestCa::new("another shroud test CA");
    // The client trusts both CAs, so that a reconnect (there should be none) would not fail
    // for the certificate.
    let both = pki.dir().join("both.pem");
    std::fs::write(
        &both,
        format!("{}{}", pki.ca.cert_pem(), other_ca.cert_pem()),
    )
    .unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[A])).await.unwrap();
    let mut proxy = ProxyProcess::start(&pki, PROXY, &lines(&key, &[A]), loopback())
        .await
        .unwrap();
    let _client = spawn_client(&pki, &key_path, A, origin.addr(), proxy.https, &both);
    wait_routed(proxy.https, A, &roots).await;
    let load = Load::start(LoadSpec::get(vec![proxy.https], A, roots.clone(), 20));
    load.wait_ok(20, Duration::from_secs(30)).await.unwrap();
    assert!(tunnel_handshake_trusting(proxy.https, &pki.ca).await);
    // A visitor connected before the swap.
    let before = tls_connect(proxy.https, A, roots.clone()).await.unwrap();

    // A certificate from another CA, written where the proxy reads it.
    other_ca
        .issue(&[PROXY])
        .write_files(pki.dir(), PROXY)
        .unwrap();
    proxy.process.hangup();
    let reloaded = proxy
        .process
        .wait_for_line("reloaded", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(reloaded.contains("replaced"), "{reloaded}");
    assert!(tunnel_handshake_trusting(proxy.https, &other_ca).await);
    assert!(!tunnel_handshake_trusting(proxy.https, &pki.ca).await);
    // The connection opened before goes on.
    let response = http_exchange(before, get_request(A, "/").as_bytes())
        .await
        .unwrap();
    assert_eq!(response.status, 200);

    // A key that is not the certificate's: the certificate in place stays.
    let stray = other_ca.issue(&[PROXY]);
    let key_file = pki.dir().join(format!("{PROXY}.key"));
    std::fs::write(&key_file, &stray.key_pem).unwrap();
    proxy.process.hangup();
    let failed = proxy
        .process
        .wait_for_line("reload failed", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(failed.contains("usable pair"), "{failed}");
    assert!(tunnel_handshake_trusting(proxy.https, &other_ca).await);
    // A key that cannot be read: the same, and the file is named.
    std::fs::remove_file(&key_file).unwrap();
    proxy.process.hangup();
    let failed = proxy
        .process
        .wait_for_line("reload failed", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(failed.contains(&key_file.display().to_string()), "{failed}");
    assert!(tunnel_handshake_trusting(proxy.https, &other_ca).await);

    load.wait_more_ok(20, Duration::from_secs(30))
        .await
        .unwrap();
    let snapshot = load.stop().await;
    assert_eq!(snapshot.failed(), 0, "{snapshot}");
    assert_eq!(snapshot.unreachable, 0, "{snapshot}");
    assert!(proxy.process.try_status().unwrap().is_none());
}

/// A tunnel spoken by hand, to see exactly what the proxy sends a client of a given version.
struct RawTunnel {
    _session: Session,
    control: MuxStream,
    version: u8,
}

impl RawTunnel {
    /// Connects, offers `versions`, and binds `name` with `key`; the bind must succeed.
    async fn bind(
        pki: &Pki,
        proxy: SocketAddr,
        key: &SecretKey,
        versions: &[u8],
        name: &str,
    ) -> Self {
        let config = shroud_client::tls::client_config(Some(&pki.ca_path)).unwrap();
        let tls = tls_connect_with(proxy, PROXY, config).await.unwrap();
        let exporter: [u8; EXPORTER_LEN] = tls
            .get_ref()
            .1
            .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
            .unwrap();
        let (session, _incoming) = Session::spawn(tls, Role::Client, SessionConfig::default());
        let mut control = session.open().await.unwrap();
        let hello = Message::Hello {
            versions: versions.to_vec(),
        };
        control::write_message(&mut control, &hello).await.unwrap();
        let Message::Hello { versions: chosen } =
            control::read_message(&mut control).await.unwrap()
        else {
            panic!("no hello from the proxy");
        };
        let Message::Challenge { challenge } = control::read_message(&mut control).await.unwrap()
        else {
            panic!("no challenge from the proxy");
        };
        let names = vec![name.to_owned()];
        let transcript = auth::bind_transcript(&challenge, &exporter, &key.public(), &names);
        let bind = Message::Bind {
            key: key.public().to_bytes(),
            signature: key.sign(&transcript),
            hostnames: vec![BindName {
                name: name.to_owned(),
                http: false,
            }],
        };
        control::write_message(&mut control, &bind).await.unwrap();
        let Message::BindResult { results } = control::read_message(&mut control).await.unwrap()
        else {
            panic!("no bind result");
        };
        assert_eq!(results[0].status, BindStatus::Bound, "{results:?}");
        Self {
            _session: session,
            control,
            version: chosen[0],
        }
    }

    /// Every message the proxy sends until the control stream ends.
    async fn messages_until_closed(mut self) -> Vec<Message> {
        let mut messages = Vec::new();
        loop {
            match control::read_message(&mut self.control).await {
                Ok(message) => messages.push(message),
                Err(ReadError::Closed | ReadError::Io(_)) => return messages,
                Err(err) => panic!("a malformed message from the proxy: {err}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_client_is_told_why_its_name_went_and_a_version_1_client_is_never_sent_unbound()
{
    init();
    let pki = Pki::new().unwrap();
    let key = SecretKey::generate().unwrap();
    let public = key.public().to_string();
    let proxy = ProxyProcess::start(&pki, PROXY, &lines(&public, &[A, B]), loopback())
        .await
        .unwrap();
    let new = within(20, RawTunnel::bind(&pki, proxy.https, &key, &[2, 1], B)).await;
    let old = within(20, RawTunnel::bind(&pki, proxy.https, &key, &[1], B)).await;
    let kept = within(20, RawTunnel::bind(&pki, proxy.https, &key, &[2, 1], A)).await;
    assert_eq!((new.version, old.version), (2, 1));

    std::fs::write(authorized_file(&pki), lines(&public, &[A])).unwrap();
    proxy.process.hangup();
    let told = within(10, new.messages_until_closed()).await;
    match &told[..] {
        [Message::Unbound {
            hostname,
            status: BindStatus::NotAuthorized,
            reason,
        }] => {
            assert_eq!(hostname, B);
            assert!(reason.contains("no longer granted"), "{reason}");
        }
        other => panic!("expected one Unbound, got {other:?}"),
    }
    // The old client's tunnel is closed with nothing it could not read.
    assert_eq!(within(10, old.messages_until_closed()).await, []);
    // A tunnel whose name stays is left alone: it still answers a ping.
    let mut kept = kept;
    control::write_message(&mut kept.control, &Message::Ping { nonce: 7 })
        .await
        .unwrap();
    let pong = within(10, control::read_message(&mut kept.control))
        .await
        .unwrap();
    assert_eq!(pong, Message::Pong { nonce: 7 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_watch_an_edit_is_picked_up_without_a_signal() {
    init();
    let pki = Pki::new().unwrap();
    let roots = pki.ca.root_store();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[C])).await.unwrap();
    let watch = ["--watch", "--watch-interval-secs", "1"].map(str::to_owned);
    let mut proxy = ProxyProcess::start_with_args(&pki, PROXY, "", loopback(), &watch)
        .await
        .unwrap();
    let mut client = spawn_client(&pki, &key_path, C, origin.addr(), proxy.https, &pki.ca_path);
    client
        .wait_for_line("not authorized by this proxy", Duration::from_secs(20))
        .await
        .unwrap();

    std::fs::write(authorized_file(&pki), lines(&key, &[C])).unwrap();
    let edited = Instant::now();
    let reloading = proxy
        .process
        .wait_for_line("reloading", Duration::from_secs(5))
        .await
        .unwrap();
    let seen_after = edited.elapsed();
    assert!(reloading.contains("authorized changed"), "{reloading}");
    // One interval, the time the edit is given to settle (0.3 s), and some slack.
    assert!(
        seen_after < Duration::from_millis(2500),
        "the edit was seen {seen_after:?} after it was made"
    );
    proxy
        .process
        .wait_for_line("reloaded", Duration::from_secs(5))
        .await
        .unwrap();
    wait_routed(proxy.https, C, &roots).await;
    eprintln!("--watch saw the edit after {seen_after:?}");
}

/// The `shroud-discovery` binary on loopback with the files it reads.
struct DiscoveryProcess {
    process: Process,
    addr: SocketAddr,
    fleet: PathBuf,
    signing: SecretKey,
}

/// The fleet-file text listing each of `names` on port 443 in region `eu`.
fn fleet_toml(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| format!("[[proxy]]\nname = \"{name}\"\nport = 443\nregion = \"eu\"\n\n"))
        .collect()
}

impl DiscoveryProcess {
    async fn start(pki: &Pki, fleet: &str) -> Self {
        let (cert, key) = pki.issue_files("discovery.test").unwrap();
        let signing_path = pki.dir().join("signing.key");
        let (signing, _) = shroud_mux::keyfile::load_or_create(&signing_path).unwrap();
        let fleet_path = pki.dir().join("fleet.toml");
        std::fs::write(&fleet_path, fleet).unwrap();
        let args = [
            "--listen".to_owned(),
            "127.0.0.1:0".into(),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
            "--signing-key".into(),
            signing_path.display().to_string(),
            "--fleet".into(),
            fleet_path.display().to_string(),
        ];
        let mut process = Process::spawn(&binary("shroud-discovery"), &args).unwrap();
        let line = process
            .wait_for_line("listening", Duration::from_secs(20))
            .await
            .unwrap();
        Self {
            addr: log_addr(&line).unwrap(),
            process,
            fleet: fleet_path,
            signing,
        }
    }

    /// The proxies the service lists for `a.test` now, as a client with `ca` asks for them.
    async fn listed(&self, ca: &Path) -> Vec<String> {
        use shroud_client::fleet::FleetSource as _;
        let mut source = shroud_client::discovery::DiscoverySource::new(
            &[format!("https://discovery.test:{}", self.addr.port())],
            self.signing.public(),
            A,
            Some(ca),
            3,
            Duration::from_secs(10),
        )
        .unwrap();
        let mut resolve = shroud_client::transport::Resolve::new();
        resolve.insert("discovery.test", self.addr.port(), self.addr.ip());
        let transport =
            shroud_client::transport::DirectTransport::new(resolve, Duration::from_secs(5));
        let fleet = within(20, source.fetch(&transport)).await.unwrap();
        let mut names: Vec<String> = fleet.proxies.iter().map(|p| p.name.clone()).collect();
        names.sort();
        names
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_reloads_its_fleet_file_and_certificate_on_sighup() {
    init();
    let pki = Pki::new().unwrap();
    let mut discovery = DiscoveryProcess::start(&pki, &fleet_toml(&["p1.test", "p2.test"])).await;
    assert_eq!(discovery.listed(&pki.ca_path).await, ["p1.test", "p2.test"]);

    std::fs::write(&discovery.fleet, fleet_toml(&["p2.test", "p3.test"])).unwrap();
    discovery.process.hangup();
    let reloaded = discovery
        .process
        .wait_for_line("reloaded", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(reloaded.contains("added=1"), "{reloaded}");
    assert!(reloaded.contains("removed=1"), "{reloaded}");
    assert_eq!(discovery.listed(&pki.ca_path).await, ["p2.test", "p3.test"]);

    // Not TOML: nothing changes, and the log says where.
    std::fs::write(
        &discovery.fleet,
        "[[proxy]]\nname = \"p4.test\nport = 443\n",
    )
    .unwrap();
    discovery.process.hangup();
    let failed = discovery
        .process
        .wait_for_line("reload failed", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(failed.contains("line 2"), "{failed}");
    assert!(failed.contains("fleet.toml"), "{failed}");
    assert_eq!(discovery.listed(&pki.ca_path).await, ["p2.test", "p3.test"]);

    // A certificate from another CA, with the fleet file fixed: both take effect.
    let other_ca = TestCa::new("another discovery CA");
    let other_ca_path = other_ca.write_pem(pki.dir(), "other-ca").unwrap();
    other_ca
        .issue(&["discovery.test"])
        .write_files(pki.dir(), "discovery.test")
        .unwrap();
    std::fs::write(&discovery.fleet, fleet_toml(&["p3.test"])).unwrap();
    discovery.process.hangup();
    let reloaded = discovery
        .process
        .wait_for_line("reloaded", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(reloaded.contains("replaced"), "{reloaded}");
    assert_eq!(discovery.listed(&other_ca_path).await, ["p3.test"]);
    assert!(discovery.process.try_status().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_serves_visitors_its_new_certificate_after_sighup_and_keeps_it_on_a_bad_one() {
    init();
    let pki = Pki::new().unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let proxy = TestProxy::start(&pki, PROXY, &lines(&key, &[A]))
        .await
        .unwrap();
    // The client terminates visitors' TLS and speaks plain HTTP to the origin.
    let origin = HttpOrigin::plain().await.unwrap();
    let (cert, cert_key) = pki.ca.issue(&[A]).write_files(pki.dir(), A).unwrap();
    let mut args = direct_client_args(&pki, &key_path, A, origin.addr(), &[(PROXY, proxy.https)]);
    args.extend([
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        cert_key.display().to_string(),
    ]);
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    let roots = pki.ca.root_store();
    wait_routed(proxy.https, A, &roots).await;
    let before = tls_connect(proxy.https, A, roots.clone()).await.unwrap();

    let other_ca = TestCa::new("another origin CA");
    other_ca.issue(&[A]).write_files(pki.dir(), A).unwrap();
    client.hangup();
    let reloaded = client
        .wait_for_line("reloaded", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(reloaded.contains("replaced"), "{reloaded}");
    wait_routed(proxy.https, A, &other_ca.root_store()).await;
    assert!(tls_connect(proxy.https, A, roots.clone()).await.is_err());
    let response = http_exchange(before, get_request(A, "/").as_bytes())
        .await
        .unwrap();
    assert_eq!(response.status, 200);

    // A key that is not the certificate's: nothing changes.
    std::fs::write(&cert_key, other_ca.issue(&[A]).key_pem).unwrap();
    client.hangup();
    let failed = client
        .wait_for_line("reload failed", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(failed.contains("cannot be used together"), "{failed}");
    wait_routed(proxy.https, A, &other_ca.root_store()).await;
    assert!(client.try_status().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_reloaded_file_drops_stays_bound_while_its_dns_record_grants_it() {
    init();
    let pki = Pki::new().unwrap();
    let key = SecretKey::generate().unwrap();
    let public = key.public().to_string();
    let (in_dns, not_in_dns) = ("a.example.test", "b.example.test");
    let dns = shroud_tests::dns::TestDns::start("example.test")
        .await
        .unwrap();
    dns.add_txt(
        &format!("_shroud.{in_dns}."),
        &format!("shroud-key={public}"),
        300,
    )
    .unwrap();
    let extra = [
        "--authorize-dns".to_owned(),
        "--dns-server".into(),
        dns.addr.to_string(),
    ];
    let proxy = ProxyProcess::start_with_args(
        &pki,
        PROXY,
        &lines(&public, &[in_dns, not_in_dns]),
        loopback(),
        &extra,
    )
    .await
    .unwrap();
    let mut kept = within(
        20,
        RawTunnel::bind(&pki, proxy.https, &key, &[2, 1], in_dns),
    )
    .await;
    let dropped = within(
        20,
        RawTunnel::bind(&pki, proxy.https, &key, &[2, 1], not_in_dns),
    )
    .await;

    // The file no longer grants either name; DNS still grants one of them.
    std::fs::write(authorized_file(&pki), "").unwrap();
    proxy.process.hangup();
    let told = within(10, dropped.messages_until_closed()).await;
    match &told[..] {
        [Message::Unbound {
            hostname,
            status: BindStatus::NotListed,
            reason,
        }] => {
            assert_eq!(hostname, not_in_dns);
            assert!(reason.contains("_shroud.b.example.test"), "{reason}");
        }
        other => panic!("expected one Unbound, got {other:?}"),
    }
    control::write_message(&mut kept.control, &Message::Ping { nonce: 1 })
        .await
        .unwrap();
    let pong = within(10, control::read_message(&mut kept.control))
        .await
        .unwrap();
    assert_eq!(pong, Message::Pong { nonce: 1 });
}

/// The TOML of a proxy config file holding `args` (pairs of `--flag value`), and `extra` lines.
fn config_toml(args: &[String], extra: &str) -> String {
    let mut text: String = args
        .chunks(2)
        .map(|pair| format!("{} = {:?}\n", pair[0].trim_start_matches("--"), pair[1]))
        .collect();
    text.push_str(extra);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_the_config_file_anew_and_a_broken_one_changes_nothing() {
    init();
    let pki = Pki::new().unwrap();
    let roots = pki.ca.root_store();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[A, B])).await.unwrap();
    // The config file names the authorized file; a second one, granting B instead of A, waits
    // beside it.
    let args = shroud_tests::stack::proxy_args(&pki, PROXY, &lines(&key, &[A])).unwrap();
    let only_b = pki.dir().join("only-b.authorized");
    std::fs::write(&only_b, lines(&key, &[B])).unwrap();
    let config = pki.dir().join("proxy.toml");
    std::fs::write(&config, config_toml(&args, "")).unwrap();
    let mut proxy = ProxyProcess::start_args(vec![
        "--config".into(),
        config.display().to_string(),
        "--listen-https".into(),
        "127.0.0.1:0".into(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
    ])
    .await
    .unwrap();
    let metrics = shroud_tests::metrics::endpoint(&mut proxy.process, Duration::from_secs(10))
        .await
        .unwrap();
    let mut clients: Vec<Process> = [A, B]
        .iter()
        .map(|name| {
            spawn_client(
                &pki,
                &key_path,
                name,
                origin.addr(),
                proxy.https,
                &pki.ca_path,
            )
        })
        .collect();
    wait_routed(proxy.https, A, &roots).await;
    assert!(turned_away(proxy.https, B, &roots).await);

    // The file now points at the other authorized file, and changes a limit no reload applies.
    let authorized_at = args.iter().position(|a| a == "--authorized").unwrap() + 1;
    let mut moved = args.clone();
    moved[authorized_at] = only_b.display().to_string();
    std::fs::write(&config, config_toml(&moved, "max-connections = 1000\n")).unwrap();
    let signalled = Instant::now();
    proxy.process.hangup();
    let mut looks = 0;
    while visit(proxy.https, A, &roots).await != Visit::TurnedAway {
        looks += 1;
        assert!(looks < 500, "A is still routed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let unrouted_after = signalled.elapsed();
    assert!(
        unrouted_after < Duration::from_secs(1),
        "A routed for {unrouted_after:?} after the signal"
    );
    let restart = proxy
        .process
        .wait_for_line("only after a restart", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(restart.contains("--max-connections"), "{restart}");
    assert!(!restart.contains("--authorized"), "{restart}");
    wait_routed(proxy.https, B, &roots).await;

    // A key the proxy does not know, on line 6: nothing changes, and the log says where.
    let broken = config_toml(&moved, "max-connections = 1000\nmax-conections = 5\n");
    assert_eq!(broken.lines().count(), 6);
    std::fs::write(&config, broken).unwrap();
    proxy.process.hangup();
    let failed = proxy
        .process
        .wait_for_line("reload failed", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        failed.contains(&format!("{}:6", config.display())),
        "{failed}"
    );
    assert!(failed.contains("max-conections"), "{failed}");
    wait_routed(proxy.https, B, &roots).await;
    assert!(turned_away(proxy.https, A, &roots).await);
    // Both reloads counted, by result.
    let scraped = shroud_tests::metrics::scrape(metrics).await.unwrap();
    let reloads = |result| scraped.value("shroud_proxy_reloads_total", &[("result", result)]);
    assert_eq!((reloads("succeeded"), reloads("failed")), (1.0, 1.0));
    for client in &mut clients {
        assert!(client.try_status().unwrap().is_none(), "a client exited");
    }
}
