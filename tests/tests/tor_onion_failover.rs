//! The relays holding an onion proxy's introduction points die, and a client's tunnel comes
//! back: through the surviving one when two of three die, and through new ones when all three
//! do, once the proxy's self-check through Tor has failed and it has relaunched its service
//! (Arti alone would take 15 minutes). `shroud --onion`'s service heals the same way: a Tor
//! visitor gets through again. Its own test binary, because it kills relays of its own
//! networks (one per test).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use shroud_tests::onion::OnionProxy;
use shroud_tests::ports::free_port;
use shroud_tests::process::Process;
use shroud_tests::stack::{binary, make_key, proxy_args, Pki};
use shroud_tests::tornet::{Relay, RelayKind, TorNet};
use shroud_tests::{https_get_retrying, init, within, HttpOrigin};

const HOST: &str = "example.test";
const NAME: &str = "onion.proxy.test";
/// What a relay logs (info, rend domain) when a service asks it to be an introduction point.
const ESTABLISH_INTRO: &str = "Received an ESTABLISH_INTRO request";
/// Middle relays in this test's network: enough that with three relays dead (and still
/// listed as running, as the authorities learn it only after many minutes) most paths avoid
/// them.
const MIDDLES: usize = 10;

/// The relays whose log says a service made them an introduction point, with how many
/// times it did.
fn intro_points(net: &TorNet) -> Vec<(Relay, usize)> {
    net.relays()
        .iter()
        .filter_map(|relay| {
            let log = std::fs::read_to_string(relay.rend_log()).unwrap_or_default();
            let count = log.matches(ESTABLISH_INTRO).count();
            (count > 0).then(|| (relay.clone(), count))
        })
        .collect()
}

/// Polls until `check` gives `Some`, every 100 ms, up to `limit`.
async fn poll<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn client_args(
    net: &TorNet,
    pki: &Pki,
    key: &std::path::Path,
    state: &std::path::Path,
    origin: std::net::SocketAddr,
    proxy: &str,
) -> Vec<String> {
    [
        HOST,
        &origin.to_string(),
        "--proxy",
        proxy,
        "--proxy-ca",
        &pki.ca_path.display().to_string(),
        "--key",
        &key.display().to_string(),
        "--state-dir",
        &state.display().to_string(),
        "--tor-network",
        &net.network_file.display().to_string(),
        "--max-backoff-secs",
        "5",
        // Every try while the service is unreachable builds new circuits, which the churn
        // budget paces (three at once, then one every 10 minutes by default; tor_churn.rs
        // tests that): this test is about how soon the service is back, so the budget is
        // out of its way.
        "--max-circuits-per-proxy-per-hour",
        "3600",
        "--max-circuits-per-hour",
        "36000",
    ]
    .map(String::from)
    .to_vec()
}

/// How many proxies (each with a new key) may be started before one has its introduction
/// points where the test may kill them.
const PROXY_ATTEMPTS: usize = 20;

/// Waits (up to `limit`) until the consensus an authority serves lists every relay of `net`
/// as Stable: introduction points must be, and a young network's first consensuses give the
/// flag to few relays besides the authorities, so services launched then pick authorities.
async fn wait_until_every_relay_is_stable(net: &TorNet, limit: Duration) {
    let consensus = net.relays()[0].data_dir.join("cached-microdesc-consensus");
    let stable = || {
        let text = std::fs::read_to_string(&consensus).unwrap_or_default();
        let flags: Vec<&str> = text.lines().filter(|line| line.starts_with("s ")).collect();
        flags.len() == net.relays().len()
            && flags
                .iter()
                .all(|line| line.split(' ').any(|flag| flag == "Stable"))
    };
    if poll(limit, || stable().then_some(())).await.is_none() {
        eprintln!("tor onion failover: not every relay is Stable after {limit:?}; going on");
    }
}

/// The relays that became introduction points since `before` (counts from [`intro_points`]).
fn new_intro_points(net: &TorNet, before: &[(Relay, usize)]) -> Vec<Relay> {
    intro_points(net)
        .into_iter()
        .filter(|(relay, count)| {
            let earlier = before
                .iter()
                .find(|(r, _)| r.nick == relay.nick)
                .map_or(0, |(_, n)| *n);
            *count > earlier
        })
        .map(|(relay, _)| relay)
        .collect()
}

/// Starts an onion proxy whose three introduction points include at least `kill` relays that
/// are not directory authorities, and returns it with `kill` of those. Killing an authority
/// kills more than an introduction point: with a majority of them gone the network makes no
/// new consensus, and Tor clients are left with a stale list of relays, much of it dead. So a
/// proxy that chose authorities is stopped and another started, with a new key and so new
/// introduction points (each try has about even odds with 15 relays, all voted Stable).
async fn start_proxy_off_authorities(
    net: &TorNet,
    pki: &Pki,
    base: &[String],
    extra: &[String],
    kill: usize,
) -> (OnionProxy, Vec<Relay>) {
    wait_until_every_relay_is_stable(net, Duration::from_secs(180)).await;
    let mut chosen = Vec::new();
    for attempt in 1..=PROXY_ATTEMPTS {
        let before = intro_points(net);
        let state = pki.dir().join(format!("proxy-state-{attempt}"));
        let mut args = OnionProxy::args(base.to_vec(), &state, &net.network_file);
        args.extend(extra.iter().cloned());
        let proxy = OnionProxy::start(args).await.unwrap();
        // The service keeps three introduction points; the relays' logs say which they are.
        let Some(found) = poll(Duration::from_secs(60), || {
            let found = new_intro_points(net, &before);
            (found.len() >= 3).then_some(found)
        })
        .await
        else {
            eprintln!(
                "tor onion failover: attempt {attempt}: fewer than three introduction points"
            );
            continue;
        };
        let nicks: Vec<&str> = found.iter().map(|relay| relay.nick.as_str()).collect();
        let killable: Vec<Relay> = found
            .iter()
            .filter(|relay| relay.kind != RelayKind::Authority)
            .take(kill)
            .cloned()
            .collect();
        if killable.len() == kill {
            eprintln!("tor onion failover: introduction points at {nicks:?} (attempt {attempt})");
            return (proxy, killable);
        }
        eprintln!("tor onion failover: attempt {attempt}: introduction points at {nicks:?}");
        chosen.push(nicks.join(","));
    }
    panic!(
        "no proxy in {PROXY_ATTEMPTS} had {kill} introduction points off the authorities: \
         {chosen:?}"
    );
}

/// Binds a client through an onion proxy (started with `extra` arguments), kills the relays
/// of `kill` of its three introduction points, and checks that a client starting afterwards
/// binds within `recovery`, and that visitors get through. Returns how long after the kill the
/// new client was bound, and the proxy.
async fn kill_intro_points_and_come_back(
    kill: usize,
    recovery: Duration,
    extra: &[String],
) -> (Duration, OnionProxy) {
    init();
    // Ten middles rather than two: the consensus keeps listing the killed relays, and paths
    // through the survivors must remain likely enough to build.
    let net = tokio::task::spawn_blocking(|| TorNet::start_with_middles(MIDDLES))
        .await
        .unwrap()
        .expect("the private Tor network must start (is Debian's tor installed?)");
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let base = proxy_args(&pki, NAME, &format!("{HOST} {key}\n")).unwrap();
    let (proxy, doomed) = start_proxy_off_authorities(&net, &pki, &base, extra, kill).await;
    let dial = proxy.client_proxy(NAME);
    let state = |n: u32| pki.dir().join(format!("client-{n}"));

    let mut client = Process::spawn(
        &binary("shroud"),
        &client_args(&net, &pki, &key_path, &state(1), origin.addr(), &dial),
    )
    .unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(180))
        .await
        .unwrap();
    let pause = Duration::from_millis(200);
    let roots = pki.ca.root_store();
    let first = within(
        60,
        https_get_retrying(proxy.https, HOST, roots.clone(), "/1", pause),
    )
    .await;
    assert_eq!(first.status, 200);

    let nicks: Vec<&str> = doomed.iter().map(|relay| relay.nick.as_str()).collect();
    eprintln!("tor onion failover: killing {nicks:?}");
    let killed_at = Instant::now();
    for relay in &doomed {
        net.kill(relay.pid);
    }
    // The first client goes with them: the next tunnel must find the service anew, from
    // the published descriptor.
    client.kill();

    let mut fresh = Process::spawn(
        &binary("shroud"),
        &client_args(&net, &pki, &key_path, &state(2), origin.addr(), &dial),
    )
    .unwrap();
    if let Err(err) = fresh.wait_for_line("tunnel up", recovery).await {
        let live: Vec<String> = intro_points(&net)
            .into_iter()
            .map(|(relay, n)| format!("{} ({n})", relay.nick))
            .collect();
        panic!(
            "no tunnel within {recovery:?} of killing {nicks:?} ({err}); relays that were ever \
             introduction points: {live:?}"
        );
    }
    let back = killed_at.elapsed();
    let again = within(
        60,
        https_get_retrying(proxy.https, HOST, roots, "/2", pause),
    )
    .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body_text(), "hello from origin: GET /2\n");
    (back, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_of_its_intro_points_killed_an_onion_proxy_takes_tunnels_through_the_third() {
    let (back, _proxy) = kill_intro_points_and_come_back(2, Duration::from_secs(120), &[]).await;
    eprintln!("tor onion failover: two introduction points killed; a tunnel {back:?} after");
}

/// Arti keeps retrying an introduction point it cannot reach for 15 minutes before it picks
/// another relay (`FAULTY_IPT_THRESHOLD` in tor-hsservice), so with all three relays dead the
/// service would be unreachable that long (measured 2026-12-07: a new client bound 933 s after
/// the kill). The proxy checks itself through Tor every `--onion-probe-interval-secs` (5 s
/// here, 120 s by default), and relaunches with new introduction points after three failed
/// checks in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_all_its_intro_points_killed_an_onion_proxy_relaunches_and_is_back_within_minutes() {
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let extra = [
        "--onion-probe-interval-secs".to_owned(),
        "5".to_owned(),
        "--metrics-listen".to_owned(),
        metrics.to_string(),
    ];
    let (back, proxy) = kill_intro_points_and_come_back(3, Duration::from_secs(300), &extra).await;
    eprintln!("tor onion failover: all introduction points killed; a tunnel {back:?} after");
    let log = proxy.process.output_text();
    assert!(
        log.contains("onion service unreachable through Tor: relaunching it"),
        "the proxy's self-check found the service unreachable and relaunched it: {log}"
    );
    assert!(log.contains("onion service relaunched"), "{log}");
    // The operator sees it in the metrics too. (Whether the proxy's own checks get through
    // again here depends on its Tor client's paths, many of which still go through the dead
    // relays; a_healthy_onion_proxys_self_checks_succeed_and_never_relaunch_it shows that
    // they do get through.)
    let scraped = shroud_tests::metrics::scrape(metrics).await.unwrap();
    let relaunches = scraped.value("shroud_proxy_onion_relaunches_total", &[]);
    let failed = scraped.value("shroud_proxy_onion_probes_total", &[("result", "failed")]);
    eprintln!("tor onion failover: metrics: {relaunches} relaunches, {failed} failed checks");
    assert!(relaunches >= 1.0, "{relaunches}");
    assert!(failed >= 3.0, "{failed}");
    // And it still stops cleanly.
    let mut proxy = proxy;
    proxy.process.terminate();
    let status = proxy
        .process
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// A 56-character onion address in `line`, if it holds one.
fn onion_address_in(line: &str) -> Option<String> {
    line.split(|c: char| !c.is_ascii_alphanumeric() && c != '.')
        .find(|word| word.ends_with(".onion") && word.len() == 56 + ".onion".len())
        .map(str::to_owned)
}

/// One `GET path` over TLS for HOST through `visitor` to `onion`:443, on circuits of its own:
/// Arti keeps a descriptor per isolation and fetches it again only when an introduction point
/// refuses it, so a visitor that wants the service's new introduction points asks anew.
async fn visit_once(
    visitor: &arti_client::TorClient<tor_rtcompat::PreferredRuntime>,
    onion: &str,
    roots: rustls::RootCertStore,
    path: &str,
) -> anyhow::Result<shroud_tests::HttpResponse> {
    let mut prefs = arti_client::StreamPrefs::new();
    prefs.connect_to_onion_services(arti_client::config::BoolOrAuto::Explicit(true));
    prefs.set_isolation(arti_client::IsolationToken::new());
    let stream = visitor.connect_with_prefs((onion, 443), &prefs).await?;
    let name = rustls_pki_types::ServerName::try_from(HOST)?;
    let tls = tokio_rustls::TlsConnector::from(shroud_tests::client_config(roots, &[]))
        .connect(name, stream)
        .await?;
    shroud_tests::visitor::http_exchange(
        tls,
        shroud_tests::visitor::get_request(HOST, path).as_bytes(),
    )
    .await
}

/// Visits until a visit gets through, within `limit`; how long it took.
async fn visit_until_through(
    visitor: &arti_client::TorClient<tor_rtcompat::PreferredRuntime>,
    onion: &str,
    roots: &rustls::RootCertStore,
    path: &str,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let visit = visit_once(visitor, onion, roots.clone(), path);
        match tokio::time::timeout(Duration::from_secs(60), visit).await {
            Ok(Ok(response)) => {
                assert_eq!(response.status, 200);
                assert_eq!(
                    response.body_text(),
                    format!("hello from origin: GET {path}\n")
                );
                return started.elapsed();
            }
            Ok(Err(err)) if started.elapsed() < limit => {
                eprintln!("tor onion failover: visit {attempt} failed: {err:#}");
            }
            Err(_) if started.elapsed() < limit => {
                eprintln!("tor onion failover: visit {attempt} timed out");
            }
            Ok(Err(err)) => panic!("no visit through {onion} within {limit:?}: {err:#}"),
            Err(_) => panic!("no visit through {onion} within {limit:?}: the last timed out"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// `shroud --onion` heals its own onion service the same way: with every relay holding its
/// introduction points killed, visitors over Tor reach the origin again once it relaunches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_all_its_intro_points_killed_a_clients_onion_service_relaunches_and_visitors_are_back()
{
    init();
    let net = tokio::task::spawn_blocking(|| TorNet::start_with_middles(MIDDLES))
        .await
        .unwrap()
        .expect("the private Tor network must start (is Debian's tor installed?)");
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let proxy = shroud_tests::stack::TestProxy::start(&pki, NAME, &format!("{HOST} {key}\n"))
        .await
        .unwrap();
    let args = |state: &std::path::Path| -> Vec<String> {
        [
            HOST,
            &origin.addr().to_string(),
            "--onion",
            "--onion-probe-interval-secs",
            "5",
            "--proxy",
            &format!("{NAME}:{}", proxy.https.port()),
            "--resolve",
            &format!("{NAME}:{}:127.0.0.1", proxy.https.port()),
            "--proxy-ca",
            &pki.ca_path.display().to_string(),
            "--key",
            &key_path.display().to_string(),
            "--state-dir",
            &state.display().to_string(),
            "--tor-network",
            &net.network_file.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    };

    // As for the proxy: a client whose service chose authorities is replaced by another, with
    // a new key.
    wait_until_every_relay_is_stable(&net, Duration::from_secs(180)).await;
    let mut found = None;
    for attempt in 1..=PROXY_ATTEMPTS {
        let before = intro_points(&net);
        let state = pki.dir().join(format!("client-state-{attempt}"));
        let mut client = Process::spawn(&binary("shroud"), &args(&state)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut onion = None;
        while onion.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = client.wait_for_line(".onion", left).await.unwrap();
            onion = onion_address_in(&line);
        }
        client
            .wait_for_line(
                "onion service published its descriptor",
                Duration::from_secs(120),
            )
            .await
            .unwrap();
        let Some(points) = poll(Duration::from_secs(60), || {
            let found = new_intro_points(&net, &before);
            (found.len() >= 3).then_some(found)
        })
        .await
        else {
            eprintln!("tor onion failover: client {attempt}: fewer than three introduction points");
            continue;
        };
        let nicks: Vec<&str> = points.iter().map(|relay| relay.nick.as_str()).collect();
        eprintln!("tor onion failover: client {attempt}: introduction points at {nicks:?}");
        if points
            .iter()
            .all(|relay| relay.kind != RelayKind::Authority)
        {
            found = Some((client, onion.unwrap(), points));
            break;
        }
    }
    let (client, onion, doomed) = found.expect("a client with introduction points off authorities");

    let visitor_state = net.new_state_root().unwrap();
    let visitor =
        arti_client::TorClient::create_bootstrapped(net.arti_config(&visitor_state).unwrap())
            .await
            .unwrap();
    let roots = pki.ca.root_store();
    visit_until_through(&visitor, &onion, &roots, "/1", Duration::from_secs(120)).await;

    eprintln!("tor onion failover: killing the client's introduction points");
    for relay in &doomed {
        net.kill(relay.pid);
    }
    let back = visit_until_through(&visitor, &onion, &roots, "/2", Duration::from_secs(300)).await;
    eprintln!(
        "tor onion failover: the client's onion service, all introduction points killed: a \
         visitor through {back:?} after"
    );
    let log = client.output_text();
    assert!(
        log.contains("onion service unreachable through Tor: relaunching it"),
        "the client's self-check found its service unreachable and relaunched it: {log}"
    );
    assert!(
        !log.contains(&origin.addr().to_string()),
        "the target is never logged"
    );
}

/// While nothing is wrong, the self-checks get through and the service is never relaunched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_onion_proxys_self_checks_succeed_and_never_relaunch_it() {
    init();
    let net = tokio::task::spawn_blocking(TorNet::start)
        .await
        .unwrap()
        .expect("the private Tor network must start (is Debian's tor installed?)");
    let pki = Pki::new().unwrap();
    let key = make_key(&pki.dir().join("client.key")).unwrap();
    let base = proxy_args(&pki, NAME, &format!("{HOST} {key}\n")).unwrap();
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let mut args = OnionProxy::args(base, &pki.dir().join("proxy-state"), &net.network_file);
    args.extend(
        [
            "--onion-probe-interval-secs",
            "5",
            "--metrics-listen",
            &metrics.to_string(),
        ]
        .map(String::from),
    );
    let proxy = OnionProxy::start(args).await.unwrap();
    let scraped = shroud_tests::metrics::wait_for(
        metrics,
        Duration::from_secs(120),
        "three successful checks",
        |e| e.value("shroud_proxy_onion_probes_total", &[("result", "ok")]) >= 3.0,
    )
    .await
    .unwrap();
    let failed = scraped.value("shroud_proxy_onion_probes_total", &[("result", "failed")]);
    let relaunches = scraped.value("shroud_proxy_onion_relaunches_total", &[]);
    eprintln!("tor onion failover: healthy: {failed} failed checks, {relaunches} relaunches");
    assert_eq!(relaunches, 0.0, "{}", proxy.process.output_text());
}
