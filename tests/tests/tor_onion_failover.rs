//! The relays holding an onion proxy's introduction points die, and a client's tunnel comes
//! back: through the surviving one when two of three die, and through new ones, once Arti
//! replaces them, when all three do. Its own test binary, because it kills relays of its own
//! network.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use shroud_tests::onion::OnionProxy;
use shroud_tests::process::Process;
use shroud_tests::stack::{binary, make_key, proxy_args, Pki};
use shroud_tests::tornet::{Relay, TorNet};
use shroud_tests::{https_get_retrying, init, within, HttpOrigin};

const HOST: &str = "example.test";
const NAME: &str = "onion.proxy.test";
/// What a relay logs (info, rend domain) when a service asks it to be an introduction point.
const ESTABLISH_INTRO: &str = "Received an ESTABLISH_INTRO request";
/// Middle relays in this test's network.
const MIDDLES: usize = 6;

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

/// Binds a client through an onion proxy, kills the relays of `kill` of its three
/// introduction points, and checks that a client starting afterwards binds within `recovery`,
/// and that visitors get through. Returns how long after the kill the new client was bound.
async fn kill_intro_points_and_come_back(kill: usize, recovery: Duration) -> Duration {
    init();
    // Six middles rather than two: the consensus keeps listing the killed relays, and paths
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
    let args = OnionProxy::args(base, &pki.dir().join("proxy-state"), &net.network_file);
    let proxy = OnionProxy::start(args).await.unwrap();
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

    // The service keeps three introduction points; the relays' logs say which they are.
    let before = poll(Duration::from_secs(60), || {
        let found = intro_points(&net);
        (found.len() >= 3).then_some(found)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no three introduction points in the relays' logs: {:?}",
            intro_points(&net)
        )
    });
    let doomed: Vec<&Relay> = before.iter().map(|(relay, _)| relay).take(kill).collect();
    let nicks: Vec<&str> = doomed.iter().map(|relay| relay.nick.as_str()).collect();
    let all: Vec<&str> = before
        .iter()
        .map(|(relay, _)| relay.nick.as_str())
        .collect();
    eprintln!("tor onion failover: introduction points at {all:?}; killing {nicks:?}");
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
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_of_its_intro_points_killed_an_onion_proxy_takes_tunnels_through_the_third() {
    let back = kill_intro_points_and_come_back(2, Duration::from_secs(120)).await;
    eprintln!("tor onion failover: two introduction points killed; a tunnel {back:?} after");
}

/// Arti 0.47 keeps an introduction point it cannot reach as "establishing", and so keeps
/// retrying the same relay, until it has failed for 15 minutes (`FAULTY_IPT_THRESHOLD` in
/// tor-hsservice's `ipt_establish.rs`); only then does it pick another relay and publish it.
/// With all three relays dead the service is unreachable that long, so this test takes about
/// 16 minutes (2026-12-07: a new client bound 933 s after the kill; 971 s in all): run it with
/// `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes ~16 minutes: Arti replaces an unreachable introduction point after 15"]
async fn with_all_its_intro_points_killed_an_onion_proxy_is_back_once_arti_replaces_them() {
    let back = kill_intro_points_and_come_back(3, Duration::from_secs(25 * 60)).await;
    eprintln!("tor onion failover: all introduction points killed; a tunnel {back:?} after");
}
