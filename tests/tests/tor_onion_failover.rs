//! The relays holding an onion proxy's introduction points die, and a client's tunnel comes
//! back: through the surviving one when two of three die, and through new ones when all three
//! do, once the proxy's self-check through Tor has failed and it has relaunched its service
//! (Arti alone would take 15 minutes). Its own test binary, because it kills relays of its own
//! network.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use shroud_tests::onion::OnionProxy;
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
    ]
    .map(String::from)
    .to_vec()
}

/// How many proxies (each with a new key) may be started before one has its introduction
/// points where the test may kill them.
const PROXY_ATTEMPTS: usize = 12;

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
/// new consensus, and Tor clients are left with a stale list of relays (on which, early in a
/// private network's life, only the authorities are Stable, which introduction points must
/// be). So a proxy that chose authorities is stopped and another started, with a new key and
/// so new introduction points.
async fn start_proxy_off_authorities(
    net: &TorNet,
    pki: &Pki,
    base: &[String],
    extra: &[&str],
    kill: usize,
) -> (OnionProxy, Vec<Relay>) {
    let mut chosen = Vec::new();
    for attempt in 1..=PROXY_ATTEMPTS {
        let before = intro_points(net);
        let state = pki.dir().join(format!("proxy-state-{attempt}"));
        let mut args = OnionProxy::args(base.to_vec(), &state, &net.network_file);
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
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
    extra: &[&str],
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
    let (back, proxy) = kill_intro_points_and_come_back(
        3,
        Duration::from_secs(300),
        &["--onion-probe-interval-secs", "5"],
    )
    .await;
    eprintln!("tor onion failover: all introduction points killed; a tunnel {back:?} after");
    let log = proxy.process.output_text();
    assert!(
        log.contains("onion service unreachable through Tor: relaunching it"),
        "the proxy's self-check found the service unreachable and relaunched it: {log}"
    );
    assert!(log.contains("onion service relaunched"), "{log}");
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
