//! Failure under load, with the real binaries: proxies restarted one by one, a proxy killed
//! with SIGKILL, and one of two redundant clients killed, each while visitors keep arriving at
//! a steady rate. What is asserted is what visitors see: who failed, and how many.
//!
//! Visitors behave like a browser given every proxy's address: a refused connection moves on
//! to the next address. Once a proxy has accepted a visitor's connection, that visitor must be
//! served, unless it was in flight at a proxy or client that was killed outright.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use shroud_tests::load::{Load, LoadSpec, Snapshot};
use shroud_tests::process::Process;
use shroud_tests::stack::{
    binary, direct_client_args, make_key, FreezableRelay, Pki, ProxyProcess,
};
use shroud_tests::{init, within, HttpOrigin};

const HOST: &str = "example.test";
const NAMES: [&str; 3] = ["one.proxy.test", "two.proxy.test", "three.proxy.test"];

/// Visitors per second in every test here: the "say 200 requests/s".
const RATE: u32 = 200;
/// Each visitor waits this long between its handshake and its request, so that about
/// `RATE × THINK` = 40 requests are in flight at any moment (some 13 per proxy): a failure
/// always has requests to hit, and a drain always has streams to wait for.
const THINK: Duration = Duration::from_millis(200);

/// Three proxy processes authorizing `policy`, and one client process publishing `target`
/// through all of them, bound everywhere.
struct Fleet {
    pki: Pki,
    proxies: Vec<ProxyProcess>,
}

impl Fleet {
    async fn start(pki: Pki, policy: &str) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut proxies = Vec::new();
        for name in NAMES {
            proxies.push(ProxyProcess::start(&pki, name, policy, any).await.unwrap());
        }
        Self { pki, proxies }
    }

    fn addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        NAMES
            .iter()
            .copied()
            .zip(self.proxies.iter().map(|p| p.https))
            .collect()
    }

    fn load(&self) -> Load {
        let proxies = self.proxies.iter().map(|p| p.https).collect();
        Load::start(LoadSpec {
            think: THINK,
            ..LoadSpec::get(proxies, HOST, self.pki.ca.root_store(), RATE)
        })
    }

    /// Starts a client publishing `target` with the key at `key`, and waits until every proxy
    /// has bound it.
    async fn client(&mut self, key: &std::path::Path, target: SocketAddr) -> Process {
        let args = direct_client_args(&self.pki, key, HOST, target, &self.addrs());
        let client = Process::spawn(&binary("shroud"), &args).unwrap();
        for proxy in &mut self.proxies {
            proxy
                .process
                .wait_for_line("tunnel bound", Duration::from_secs(30))
                .await
                .unwrap();
        }
        client
    }
}

async fn origin(pki: &Pki) -> HttpOrigin {
    HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap()
}

/// Key files for two clients serving HOST (two machines, each with its own copy of the
/// service), and the policy that lets both bind it.
fn two_keys(pki: &Pki) -> (PathBuf, PathBuf, String) {
    let (key_a, key_b) = (pki.dir().join("a.key"), pki.dir().join("b.key"));
    let policy = format!(
        "{HOST} {}\n{HOST} {}\n",
        make_key(&key_a).unwrap(),
        make_key(&key_b).unwrap()
    );
    (key_a, key_b, policy)
}

/// How many requests were in flight at `proxy` at some moment between `before` and `after`:
/// at most the ones that had started by `after` less those that had ended by `before`.
fn in_flight_between(before: &Snapshot, after: &Snapshot, proxy: usize) -> u64 {
    after.proxies[proxy].started - before.proxies[proxy].finished()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_proxy_loses_no_visitor() {
    init();
    let pki = Pki::new().unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let mut fleet = Fleet::start(pki, &format!("{HOST} {key}\n")).await;
    let origin = origin(&fleet.pki).await;
    let _client = fleet.client(&key_path, origin.addr()).await;

    let load = fleet.load();
    load.wait_ok(u64::from(RATE), Duration::from_secs(30))
        .await
        .unwrap();
    for (name, proxy) in NAMES.iter().zip(&mut fleet.proxies) {
        let started = Instant::now();
        within(60, proxy.restart_gracefully(Duration::from_secs(30)))
            .await
            .unwrap();
        proxy
            .process
            .wait_for_line("tunnel bound", Duration::from_secs(30))
            .await
            .unwrap();
        eprintln!(
            "proxy {name} restarted and bound again in {:?}; so far: {}",
            started.elapsed(),
            load.snapshot()
        );
        // Some visitors through the new process before the next one goes down.
        load.wait_more_ok(u64::from(RATE) / 2, Duration::from_secs(30))
            .await
            .unwrap();
    }
    let result = within(30, load.stop()).await;
    eprintln!("rolling restart under {RATE} visitors/s: {result}");
    assert_eq!(result.failed(), 0, "{result}");
    assert_eq!(result.unreachable, 0, "{result}");
    assert!(result.ok() >= u64::from(RATE), "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_proxy_fails_only_the_visitors_in_flight_there() {
    init();
    let pki = Pki::new().unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let mut fleet = Fleet::start(pki, &format!("{HOST} {key}\n")).await;
    let origin = origin(&fleet.pki).await;
    let mut client = fleet.client(&key_path, origin.addr()).await;

    let load = fleet.load();
    load.wait_ok(u64::from(RATE), Duration::from_secs(30))
        .await
        .unwrap();
    let before = load.snapshot();
    fleet.proxies[0].kill();
    let after = load.snapshot();
    let in_flight = in_flight_between(&before, &after, 0);
    client
        .wait_for_line("tunnel lost", Duration::from_secs(30))
        .await
        .unwrap();
    // A while of serving through the other two.
    load.wait_more_ok(u64::from(RATE), Duration::from_secs(30))
        .await
        .unwrap();

    let restarted = Instant::now();
    fleet.proxies[0].restart().await.unwrap();
    fleet.proxies[0]
        .process
        .wait_for_line("tunnel bound", Duration::from_secs(30))
        .await
        .unwrap();
    let rebound = restarted.elapsed();
    load.wait_more_ok(u64::from(RATE), Duration::from_secs(30))
        .await
        .unwrap();
    let result = within(30, load.stop()).await;
    eprintln!(
        "kill -9 under {RATE} visitors/s: {in_flight} in flight at the killed proxy, \
         {} failed there; bound there again {rebound:?} after its restart; {result}",
        result.proxies[0].failed
    );
    assert!(in_flight > 0, "nothing was in flight at the kill: {result}");
    assert!(
        result.proxies[0].failed <= in_flight,
        "{} failed at the killed proxy, but only {in_flight} were in flight: {result}",
        result.proxies[0].failed
    );
    assert_eq!(
        result.proxies[1].failed + result.proxies[2].failed,
        0,
        "{result}"
    );
    assert_eq!(result.unreachable, 0, "{result}");
    // The client's backoff cap is 1 s; allow for the proxy's start and the handshake.
    assert!(
        rebound < Duration::from_secs(10),
        "rebound after {rebound:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_of_two_redundant_clients_dies_the_other_serves() {
    init();
    let pki = Pki::new().unwrap();
    let (key_a, key_b, policy) = two_keys(&pki);
    let mut fleet = Fleet::start(pki, &policy).await;
    // Two machines, each with its own copy of the service.
    let (origin_a, origin_b) = (origin(&fleet.pki).await, origin(&fleet.pki).await);
    let mut client_a = fleet.client(&key_a, origin_a.addr()).await;
    let _client_b = fleet.client(&key_b, origin_b.addr()).await;

    let load = fleet.load();
    load.wait_ok(u64::from(RATE), Duration::from_secs(30))
        .await
        .unwrap();
    assert!(origin_a.accepted() > 0 && origin_b.accepted() > 0);

    let before = load.snapshot();
    client_a.kill();
    let after = load.snapshot();
    let in_flight: u64 = (0..NAMES.len())
        .map(|i| in_flight_between(&before, &after, i))
        .sum();
    let served_by_b = origin_b.accepted();
    load.wait_more_ok(2 * u64::from(RATE), Duration::from_secs(30))
        .await
        .unwrap();
    let result = within(30, load.stop()).await;
    eprintln!(
        "one of two clients killed under {RATE} visitors/s: at most {in_flight} in flight \
         anywhere, {} failed; {result}",
        result.failed()
    );
    assert!(in_flight > 0, "nothing was in flight at the kill: {result}");
    assert!(
        result.failed() <= in_flight,
        "{} failed but at most {in_flight} were in flight when the client died: {result}",
        result.failed()
    );
    assert_eq!(result.unreachable, 0, "{result}");
    // Everything served since the kill went to the surviving copy of the service.
    let since = (origin_b.accepted() - served_by_b) as u64;
    assert!(
        since >= (2 * u64::from(RATE)).saturating_sub(in_flight),
        "{since}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redundant_client_that_dies_silently_is_passed_over_within_seconds() {
    // Over Tor a dead client's tunnel can linger at the proxy (the exit keeps the connection
    // open) until the idle timeout. Here the path of one of two clients freezes: its tunnel
    // stays open at the proxy, carrying nothing. Visitors must still all be served.
    init();
    let pki = Pki::new().unwrap();
    let (key_a, key_b, policy) = two_keys(&pki);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut proxy = ProxyProcess::start(&pki, NAMES[0], &policy, any)
        .await
        .unwrap();
    let relay = FreezableRelay::start(proxy.https).await.unwrap();
    let (origin_a, origin_b) = (origin(&pki).await, origin(&pki).await);
    let via_relay = [(NAMES[0], relay.addr)];
    let args = direct_client_args(&pki, &key_a, HOST, origin_a.addr(), &via_relay);
    let _client_a = Process::spawn(&binary("shroud"), &args).unwrap();
    let args = direct_client_args(
        &pki,
        &key_b,
        HOST,
        origin_b.addr(),
        &[(NAMES[0], proxy.https)],
    );
    let _client_b = Process::spawn(&binary("shroud"), &args).unwrap();
    for _ in 0..2 {
        proxy
            .process
            .wait_for_line("tunnel bound", Duration::from_secs(30))
            .await
            .unwrap();
    }

    let load = Load::start(LoadSpec::get(
        vec![proxy.https],
        HOST,
        pki.ca.root_store(),
        50,
    ));
    load.wait_ok(50, Duration::from_secs(30)).await.unwrap();
    assert!(origin_a.accepted() > 0 && origin_b.accepted() > 0);
    let before = load.snapshot();
    relay.freeze_existing(1);
    let after = load.snapshot();
    let in_flight = in_flight_between(&before, &after, 0);
    let frozen_at = Instant::now();
    // Ten seconds of visitors: the frozen tunnel keeps its binding all along (the proxy's
    // idle timeout is 45 s), though client A reconnects over a fresh path within seconds.
    load.wait_more_ok(500, Duration::from_secs(30))
        .await
        .unwrap();
    let result = within(30, load.stop()).await;
    eprintln!(
        "one of two clients frozen, 50 visitors/s for {:?}: {in_flight} in flight at the \
         freeze; {result}",
        frozen_at.elapsed()
    );
    // Those in flight through the frozen path are lost with it; every later visitor sent to
    // the dead tunnel waits a few seconds at most and is then served by the other client.
    assert!(
        result.failed() <= in_flight,
        "{in_flight} in flight: {result}"
    );
    assert_eq!(result.unreachable, 0, "{result}");
}
