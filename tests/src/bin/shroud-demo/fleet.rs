//! `shroud-demo --fleet N`: a fleet on loopback with replicated discovery and its DNS.
//!
//! Two discovery instances share a signing key and answer the zone `proxy.test`; N proxies,
//! each on a loopback address of its own (127.0.0.10, .11, ...) and one common port, announce
//! themselves to both with that address, and link to each other (gossip and forwarding); a
//! client asks either instance for its proxies and holds tunnels to two of them. `dig` at
//! either instance answers `example.test.proxy.test` with the two holders, and `curl` reaches
//! the origin through every proxy, the others forwarding to a holder.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use shroud_client::discovery::DiscoverySource;
use shroud_discovery::announce::{client_tls, Endpoint, Presence};
use shroud_discovery::dns::DnsZone;
use shroud_discovery::fleet::{Fleet, FleetFile};
use shroud_discovery::secret::FleetSecret;
use shroud_discovery::server::{DnsService, ServerConfig};
use shroud_discovery::signed::ProxyEntry;
use shroud_mux::auth::SecretKey;
use shroud_proxy::peers::FleetConfig;
use shroud_proxy::policy::Policy;
use shroud_proxy::server::{bind_listener, tunnel_tls_config, Listeners};
use shroud_proxy::shared::{Limits, ProxyConfig, Shared};
use shroud_tests::stack::{authorize, ClientSpec, Pki, TestClient};
use shroud_tests::{https_get, HttpOrigin};
use tokio_util::sync::CancellationToken;

const HOST: &str = "example.test";
const ZONE: &str = "proxy.test";
const SECRET: &str = "the-demo-fleet-secret-of-some-length";

/// A discovery instance running in this process.
struct Instance {
    name: String,
    https: SocketAddr,
    dns: SocketAddr,
}

/// A proxy running in this process.
struct Proxy {
    name: String,
    https: SocketAddr,
    peer: SocketAddr,
}

/// How many proxies the client holds tunnels to; the rest forward.
const HOLDERS: usize = 2;

/// Runs the fleet demo with `count` proxies; with `check`, asks the DNS and visits through
/// every proxy, then returns; else serves until Ctrl-C.
pub async fn run(count: usize, check: bool) -> anyhow::Result<()> {
    anyhow::ensure!((1..=32).contains(&count), "--fleet takes 1 to 32 proxies");
    let pki = Pki::new()?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let signing =
        SecretKey::generate().map_err(|err| anyhow::anyhow!("making a signing key: {err}"))?;
    let names = ["d1.discovery.test", "d2.discovery.test"];
    let mut instances = Vec::new();
    for name in names {
        let instance = start_instance(&pki, name, &names, &signing, count, &shutdown)
            .await
            .with_context(|| format!("starting discovery instance {name}"))?;
        instances.push(instance);
    }

    let mut spec = ClientSpec::new(HOST, "127.0.0.1:1".parse()?, Vec::new());
    let authorized = authorize(HOST, &spec.key);
    let mut proxies = Vec::new();
    let mut port = 0;
    for i in 0..count {
        let seeds = proxies.iter().map(|p: &Proxy| p.peer.to_string()).collect();
        let proxy = start_proxy(&pki, i, port, &authorized, &instances, seeds, &shutdown)
            .await
            .with_context(|| format!("starting proxy {i}"))?;
        port = proxy.https.port();
        proxies.push(proxy);
    }

    // Before the client asks for its list, let every proxy's first heartbeat reach both
    // instances: until a name is held, the zone answers the proxies its list would name.
    let want: Vec<IpAddr> = proxies.iter().map(|p| p.https.ip()).collect();
    let holders = count.min(HOLDERS);
    for instance in &instances {
        wait_for_answer(instance.dns, &want).await?;
    }

    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST]))
        .await
        .context("starting the sample origin")?;
    spec.target = origin.addr();
    let urls: Vec<String> = instances
        .iter()
        .map(|i| format!("https://{}:{}", i.name, i.https.port()))
        .collect();
    spec.fleet = Some(Box::new(DiscoverySource::new(
        &urls,
        signing.public(),
        HOST,
        Some(&pki.ca_path),
        holders,
        Duration::from_secs(10),
    )?));
    spec.proxies = proxies.iter().map(|p| (p.name.clone(), p.https)).collect();
    spec.proxies
        .extend(instances.iter().map(|i| (i.name.clone(), i.https)));
    let mut client = TestClient::start(&pki, spec).context("starting the client")?;
    tokio::time::timeout(Duration::from_secs(60), client.wait_bound(holders))
        .await
        .context("the client did not bind its tunnels within 60 s")?;
    let held: Vec<IpAddr> = client
        .client
        .states()
        .iter()
        .filter(|(_, state)| *state == shroud_client::shared::TunnelState::Bound)
        .filter_map(|(proxy, _)| proxies.iter().find(|p| p.name == proxy.name))
        .map(|p| p.https.ip())
        .collect();

    let ca = pki.ca_path.display();
    println!();
    println!("shroud demo: {HOST} is published through a fleet of {count} proxies, with two");
    println!("discovery instances answering the zone {ZONE}. The client holds tunnels to");
    println!("{holders} of the proxies; each proxy announces its address and names to both");
    println!("instances, and the proxies gossip over peer links, so the others forward visitors");
    println!("to a holder.");
    println!();
    println!("Ask either instance where visitors of {HOST} go:");
    println!();
    for instance in &instances {
        println!(
            "  dig @{} -p {} +short {HOST}.{ZONE} A",
            instance.dns.ip(),
            instance.dns.port()
        );
    }
    println!();
    println!("Reach the origin through every proxy, holder or not (the origin's certificate");
    println!("verified end to end):");
    println!();
    for proxy in &proxies {
        println!(
            "  curl --cacert {ca} --resolve {HOST}:{port}:{ip} https://{HOST}:{port}/",
            port = proxy.https.port(),
            ip = proxy.https.ip()
        );
    }
    println!();

    if check {
        for instance in &instances {
            let found = wait_for_answer(instance.dns, &held).await?;
            println!("check: DNS at {} -> {found:?}", instance.dns);
        }
        for proxy in &proxies {
            let response = https_get(proxy.https, HOST, pki.ca.root_store(), "/")
                .await
                .with_context(|| format!("HTTPS through {}", proxy.name))?;
            anyhow::ensure!(
                response.status == 200,
                "{} answered {}",
                proxy.name,
                response.status
            );
            println!(
                "check: HTTPS via {} -> {} {}",
                proxy.https,
                response.status,
                response.body_text().trim()
            );
        }
        return Ok(());
    }
    println!("Serving until Ctrl-C.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

async fn start_instance(
    pki: &Pki,
    name: &str,
    names: &[&str],
    signing: &SecretKey,
    count: usize,
    shutdown: &CancellationToken,
) -> anyhow::Result<Instance> {
    let (cert, key) = pki.issue_files(name)?;
    let tls = shroud_discovery::server::tls_config(&cert, &key)?;
    let fleet = Fleet::new(FleetFile::default(), Duration::from_secs(5));
    let signing = Arc::new(SecretKey::from_seed(&signing.to_seed()));
    let mut config = ServerConfig::new(tls, signing, fleet);
    config.fleet_secret = Some(FleetSecret::new(SECRET.to_owned())?);
    config.max_proxies = count;
    config.list_ttl = Duration::from_secs(60);
    let ns: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let (udp, tcp) = shroud_discovery::dns::bind((Ipv4Addr::LOCALHOST, 0).into())?;
    let dns = udp.local_addr()?;
    config.dns = Some(DnsService {
        zone: DnsZone::new(ZONE, &ns, 5, count)?,
        udp,
        tcp,
    });
    let listener = bind_listener((Ipv4Addr::LOCALHOST, 0).into())?;
    let https = listener.local_addr()?;
    tokio::spawn(shroud_discovery::server::run(
        listener,
        config,
        shutdown.clone(),
    ));
    Ok(Instance {
        name: name.to_owned(),
        https,
        dns,
    })
}

/// Starts proxy `i` on 127.0.0.(10 + i) at `port` (0: any), announcing itself to `instances`
/// and joining the fleet through the peer addresses `seeds`.
async fn start_proxy(
    pki: &Pki,
    i: usize,
    port: u16,
    authorized: &str,
    instances: &[Instance],
    seeds: Vec<String>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Proxy> {
    let name = format!("p{i}.proxies.test");
    let ip = Ipv4Addr::new(127, 0, 0, 10 + u8::try_from(i)?);
    let (cert, key) = pki.issue_files(&name)?;
    let config = ProxyConfig {
        tunnel_name: name.clone(),
        tls: tunnel_tls_config(&cert, &key)?,
        policy: Policy::parse(authorized)?,
        dns: None,
        word_domains: Vec::new(),
        limits: Limits::default(),
        fleet: None,
    };
    let listener = bind_listener(SocketAddr::new(ip.into(), port))
        .with_context(|| format!("binding {ip}:{port}"))?;
    let https = listener.local_addr()?;
    let peer_listener = bind_listener(SocketAddr::new(ip.into(), 0))
        .with_context(|| format!("binding {ip}:0 for peers"))?;
    let peer = peer_listener.local_addr()?;
    let config = ProxyConfig {
        fleet: Some(FleetConfig {
            advertise: peer,
            seeds,
            secret: FleetSecret::new(SECRET.to_owned())?,
        }),
        ..config
    };
    let shared = Shared::new(config, shutdown.clone());
    let listeners = Listeners {
        https: Some(listener),
        peer: Some(peer_listener),
        ..Listeners::default()
    };
    tokio::spawn(shroud_proxy::server::serve(
        listeners,
        shared.clone(),
        shutdown.clone(),
    ));
    let presence = Arc::new(Presence {
        entry: ProxyEntry {
            name: name.clone(),
            port: https.port(),
            region: format!("r{i}"),
            onion: None,
        },
        addrs: vec![ip.into()],
        changes: Some(shared.watch_names()),
        names: Box::new(move || shared.bound_names()),
        peer: Some(peer),
        on_peers: None,
    });
    let tls = client_tls(Some(&pki.ca_path))?;
    for instance in instances {
        let mut endpoint = Endpoint::new(
            format!("https://{}:{}", instance.name, instance.https.port()).parse()?,
            tls.clone(),
        );
        endpoint
            .resolve
            .insert(&instance.name, instance.https.port(), instance.https.ip());
        let (presence, shutdown) = (presence.clone(), shutdown.clone());
        let secret = FleetSecret::new(SECRET.to_owned())?;
        tokio::spawn(async move {
            shroud_discovery::announce::run(
                &endpoint,
                secret,
                &presence,
                Duration::from_secs(1),
                shutdown,
            )
            .await;
        });
    }
    Ok(Proxy { name, https, peer })
}

/// Asks `dns` for `HOST.ZONE` until it answers exactly `want` (in any order), up to 20 s.
async fn wait_for_answer(dns: SocketAddr, want: &[IpAddr]) -> anyhow::Result<Vec<IpAddr>> {
    let resolver = shroud_process::dns::resolver(Some(dns), Duration::from_secs(2), false)?;
    let mut want = want.to_vec();
    want.sort();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut found: Vec<IpAddr> = match resolver.lookup_ip(format!("{HOST}.{ZONE}.")).await {
            Ok(answer) => answer.iter().collect(),
            Err(_) => Vec::new(),
        };
        found.sort();
        if found == want {
            return Ok(found);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "DNS at {dns} answered {found:?}, not the proxies {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
