//! A fleet served from replicated discovery: two `shroud-discovery` instances with their DNS
//! zone, proxies announcing to both, a client holding tunnels to two of them. What is asserted
//! is what a resolver and a visitor see: the zone answers a hostname with the public addresses
//! of the proxies holding it, at either instance; the answer follows a holder that leaves; and
//! one instance going away takes no name down.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use shroud_client::discovery::DiscoverySource;
use shroud_mux::auth::SecretKey;
use shroud_tests::ports::free_ports;
use shroud_tests::process::Process;
use shroud_tests::stack::{binary, log_addr, ClientSpec, Pki, ProxyProcess, TestClient};
use shroud_tests::{https_get, init, within, HttpOrigin};

const HOST: &str = "example.test";
const ZONE: &str = "proxy.test";
const SECRET: &str = "a-fleet-secret-of-sufficient-length";
const PROXIES: usize = 3;

/// A `shroud-discovery` process with its HTTPS and DNS addresses.
struct DiscoveryProcess {
    process: Process,
    name: String,
    https: SocketAddr,
    dns: SocketAddr,
}

impl DiscoveryProcess {
    async fn start(pki: &Pki, name: &str, signing_key: &str, secret: &str, timeout: &str) -> Self {
        let (cert, key) = pki.issue_files(name).unwrap();
        let args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert.display().to_string(),
            "--tls-key",
            &key.display().to_string(),
            "--signing-key",
            signing_key,
            "--fleet-secret-file",
            secret,
            "--heartbeat-timeout-secs",
            timeout,
            "--list-ttl-secs",
            "12",
            "--max-proxies",
            "2",
            "--dns-listen",
            "127.0.0.1:0",
            "--dns-zone",
            ZONE,
            "--dns-ns",
            "ns1.discovery.example",
            "--dns-ns",
            "ns2.discovery.example",
        ]
        .map(str::to_owned)
        .into();
        let mut process = Process::spawn(&binary("shroud-discovery"), &args).unwrap();
        let limit = Duration::from_secs(20);
        let https = log_addr(&process.wait_for_line("listening", limit).await.unwrap()).unwrap();
        let dns = log_addr(&process.wait_for_line("answering DNS", limit).await.unwrap()).unwrap();
        Self {
            process,
            name: name.to_owned(),
            https,
            dns,
        }
    }

    fn url(&self) -> String {
        format!("https://{}:{}", self.name, self.https.port())
    }

    fn resolve(&self) -> String {
        format!("{}:{}:127.0.0.1", self.name, self.https.port())
    }
}

/// The public address proxy `i` announces (made up: only DNS answers carry it).
fn public_addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10 + i as u8))
}

fn proxy_name(i: usize) -> String {
    format!("p{i}.proxy.example")
}

/// The A records `dns` answers for `HOST.ZONE`, as a resolver would get them.
async fn answer(dns: SocketAddr) -> BTreeSet<IpAddr> {
    let resolver = shroud_process::dns::resolver(Some(dns), Duration::from_secs(2), false).unwrap();
    match resolver.lookup_ip(format!("{HOST}.{ZONE}.")).await {
        Ok(found) => found.iter().filter(IpAddr::is_ipv4).collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Waits until `dns` answers exactly `want`, for up to `secs`; returns how long it took.
async fn converges(dns: SocketAddr, want: &BTreeSet<IpAddr>, secs: u64) -> Duration {
    let started = std::time::Instant::now();
    within(secs, async {
        while answer(dns).await != *want {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    started.elapsed()
}

/// A running fleet: two discovery instances, [`PROXIES`] proxy processes announcing to both
/// with `heartbeat_secs`, and an in-process client holding tunnels to two of them.
struct FleetRun {
    pki: Pki,
    one: DiscoveryProcess,
    two: DiscoveryProcess,
    proxies: Vec<ProxyProcess>,
    client: TestClient,
    _origin: HttpOrigin,
}

impl FleetRun {
    async fn start(heartbeat_secs: u64, heartbeat_timeout_secs: u64) -> Self {
        Self::start_with(heartbeat_secs, heartbeat_timeout_secs, false).await
    }

    /// [`FleetRun::start`], the proxies also linked as a fleet (`--listen-peer`) when
    /// `linked`: with no `--peer`, so they find each other through the discovery service.
    async fn start_with(heartbeat_secs: u64, heartbeat_timeout_secs: u64, linked: bool) -> Self {
        let pki = Pki::new().unwrap();
        let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();

        let signing_key = pki.dir().join("signing.key");
        let signing = shroud_mux::keyfile::load_or_create(&signing_key).unwrap().0;
        let secret_file = pki.dir().join("fleet.secret");
        std::fs::write(&secret_file, SECRET).unwrap();
        std::fs::set_permissions(
            &secret_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let (key_arg, secret_arg) = (
            signing_key.display().to_string(),
            secret_file.display().to_string(),
        );
        let timeout = heartbeat_timeout_secs.to_string();
        let one =
            DiscoveryProcess::start(&pki, "d1.discovery.test", &key_arg, &secret_arg, &timeout)
                .await;
        let two =
            DiscoveryProcess::start(&pki, "d2.discovery.test", &key_arg, &secret_arg, &timeout)
                .await;

        // Every proxy announces itself, its public address and its names to both instances.
        let client_key = SecretKey::generate().unwrap();
        let policy = format!("{HOST} {}\n", client_key.public());
        let ports = free_ports::<PROXIES>().unwrap();
        let peer_ports = free_ports::<PROXIES>().unwrap();
        let mut proxies = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let mut extra: Vec<String> = [
                "--discovery".to_owned(),
                one.url(),
                "--discovery".into(),
                two.url(),
                "--resolve".into(),
                one.resolve(),
                "--resolve".into(),
                two.resolve(),
                "--discovery-ca".into(),
                pki.ca_path.display().to_string(),
                "--fleet-secret-file".into(),
                secret_arg.clone(),
                "--region".into(),
                format!("r{i}"),
                "--public-name".into(),
                format!("{}:{port}", proxy_name(i)),
                "--public-addr".into(),
                public_addr(i).to_string(),
                "--heartbeat-secs".into(),
                heartbeat_secs.to_string(),
            ]
            .into();
            if linked {
                extra.extend([
                    "--listen-peer".into(),
                    format!("127.0.0.1:{}", peer_ports[i]),
                ]);
            }
            let listen = SocketAddr::from(([127, 0, 0, 1], *port));
            let proxy =
                ProxyProcess::start_with_args(&pki, &proxy_name(i), &policy, listen, &extra)
                    .await
                    .unwrap();
            proxies.push(proxy);
        }

        // A client asks either instance (the first, while it answers) and holds two tunnels.
        let urls = [one.url(), two.url()];
        let source = DiscoverySource::new(
            &urls,
            signing.public(),
            HOST,
            Some(&pki.ca_path),
            2,
            Duration::from_secs(10),
        )
        .unwrap();
        let mut resolve: Vec<(String, SocketAddr)> = (0..PROXIES)
            .map(|i| (proxy_name(i), proxies[i].https))
            .collect();
        resolve.push((one.name.clone(), one.https));
        resolve.push((two.name.clone(), two.https));
        let mut spec = ClientSpec::new(HOST, origin.addr(), resolve);
        spec.key = client_key;
        spec.fleet = Some(Box::new(source));
        let mut client = TestClient::start(&pki, spec).unwrap();
        within(60, client.wait_bound(2)).await;
        Self {
            pki,
            one,
            two,
            proxies,
            client,
            _origin: origin,
        }
    }

    /// The public addresses of the proxies the client holds a bound tunnel to.
    fn holders(&self) -> BTreeSet<IpAddr> {
        self.client
            .client
            .states()
            .iter()
            .filter(|(_, state)| *state == shroud_client::shared::TunnelState::Bound)
            .map(|(proxy, _)| {
                let i = (0..PROXIES).find(|i| proxy_name(*i) == proxy.name).unwrap();
                public_addr(i)
            })
            .collect()
    }

    /// Asserts that a visitor at the proxy listening on `https` reaches the origin.
    async fn serves(&self, https: SocketAddr) {
        let response = within(20, https_get(https, HOST, self.pki.ca.root_store(), "/"))
            .await
            .unwrap();
        assert_eq!(response.status, 200, "via {https}");
    }

    /// Which proxy has public address `addr`.
    fn index_of(addr: IpAddr) -> usize {
        (0..PROXIES).find(|i| public_addr(*i) == addr).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zone_answers_the_holders_at_every_instance_and_survives_losing_one() {
    init();
    // Long heartbeats: the answers below follow binds because a change of names sends a
    // heartbeat at once, not because the periodic one came round.
    let mut run = FleetRun::start(30, 90).await;
    let want = run.holders();
    assert_eq!(want.len(), 2);

    // Both instances answer the two holders, and visitors get through at each of them.
    let first = converges(run.one.dns, &want, 10).await;
    converges(run.two.dns, &want, 10).await;
    eprintln!("both instances answered the holders {first:?} after the tunnels bound");
    for addr in &want {
        let proxy = &run.proxies[FleetRun::index_of(*addr)];
        run.serves(proxy.https).await;
    }

    // A holder leaves (SIGTERM: it tells both instances at once). Its address leaves the
    // answers, and once the client holds a tunnel elsewhere, the new holder's comes in.
    let leaving = FleetRun::index_of(*want.iter().next().unwrap());
    run.proxies[leaving].process.terminate();
    run.proxies[leaving]
        .process
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap();
    within(60, async {
        loop {
            let now = run.holders();
            if now.len() == 2 && !now.contains(&public_addr(leaving)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let want = run.holders();
    let moved = converges(run.one.dns, &want, 10).await;
    converges(run.two.dns, &want, 10).await;
    eprintln!("the answer followed the leaving holder {moved:?} after the client moved");

    // One instance dies: the other still answers, the client keeps its tunnels through its
    // next refresh (it asks the other instance), and visitors still get through.
    run.one.process.kill();
    assert_eq!(answer(run.two.dns).await, want);
    assert!(
        answer(run.one.dns).await.is_empty(),
        "the killed instance is gone"
    );
    // Lists last 12 s and are asked for again after 2/3 of that: wait past one refresh.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(run.holders(), want, "the client kept its tunnels");
    assert_eq!(answer(run.two.dns).await, want);
    let holder = &run.proxies[FleetRun::index_of(*want.iter().next().unwrap())];
    run.serves(holder.https).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_without_a_word_leaves_the_answers_within_the_heartbeat_timeout() {
    init();
    const TIMEOUT_SECS: u64 = 5;
    let mut run = FleetRun::start(1, TIMEOUT_SECS).await;
    let want = run.holders();
    converges(run.one.dns, &want, 10).await;
    converges(run.two.dns, &want, 10).await;

    // kill -9: no leaving heartbeat. The instances notice only the silence.
    let victim = FleetRun::index_of(*want.iter().next().unwrap());
    run.proxies[victim].kill();
    let killed = std::time::Instant::now();
    let gone = |answer: &BTreeSet<IpAddr>| !answer.contains(&public_addr(victim));
    for dns in [run.one.dns, run.two.dns] {
        within(TIMEOUT_SECS + 10, async {
            while !gone(&answer(dns).await) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
    }
    let detected = killed.elapsed();
    eprintln!("both instances stopped answering the killed holder {detected:?} after kill -9");
    // The heartbeat timeout, plus one heartbeat interval and the polling above.
    assert!(
        detected < Duration::from_secs(TIMEOUT_SECS + 3),
        "{detected:?} for a timeout of {TIMEOUT_SECS} s"
    );
    // The surviving holder still serves visitors throughout.
    let survivor = want
        .iter()
        .find(|a| FleetRun::index_of(**a) != victim)
        .unwrap();
    let proxy = &run.proxies[FleetRun::index_of(*survivor)];
    run.serves(proxy.https).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_that_found_each_other_through_discovery_forward_even_with_it_down() {
    init();
    // No --peer anywhere: each proxy's heartbeat names its link, and the service's answer
    // names the others'.
    let mut run = FleetRun::start_with(1, 30, true).await;
    let holders = run.holders();
    assert_eq!(holders.len(), 2);
    let visit_all = |run: &FleetRun| {
        let targets: Vec<SocketAddr> = run.proxies.iter().map(|p| p.https).collect();
        let roots = run.pki.ca.root_store();
        async move {
            for https in targets {
                let visit = shroud_tests::visitor::https_get_retrying(
                    https,
                    HOST,
                    roots.clone(),
                    "/",
                    Duration::from_millis(200),
                );
                let response = within(30, visit).await;
                assert_eq!(response.status, 200, "via {https}");
            }
        }
    };
    // Every proxy serves, the one without a tunnel by forwarding.
    let started = std::time::Instant::now();
    visit_all(&run).await;
    eprintln!(
        "all {PROXIES} proxies served {:?} after the tunnels bound",
        started.elapsed()
    );

    // Discovery goes away entirely: gossip and forwarding need only the peers.
    run.one.process.kill();
    run.two.process.kill();
    visit_all(&run).await;
}
