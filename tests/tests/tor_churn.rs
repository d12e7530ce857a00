//! The churn budget on a private Tor network: hostile proxies (see `shroud_tests::hostile`)
//! drop, drain, stall or black-hole every tunnel of the real `shroud` binary, and the client
//! builds no more Tor circuits for them than its budget allows, counted from outside the
//! client too (which exit relay each tunnel arrived from), while its tunnel to an honest proxy
//! keeps serving visitors. The tests share one network.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shroud_tests::hostile::{Arrival, Behaviour, HostileProxy};
use shroud_tests::load::{Load, LoadSpec};
use shroud_tests::metrics::{self, Exposition};
use shroud_tests::process::Process;
use shroud_tests::stack::{binary, make_key, Pki, TestProxy};
use shroud_tests::tornet::TorNet;
use shroud_tests::{https_get_retrying, init, within, HttpOrigin};

const HOST: &str = "example.test";

async fn network() -> &'static TorNet {
    tokio::task::spawn_blocking(TorNet::shared)
        .await
        .unwrap()
        .expect(
            "the private Tor network must start (is Debian's tor installed? .ci/run installs it)",
        )
}

/// Starts `shroud` through the network's Tor with a tunnel to each of `proxies` (NAME:PORT on
/// 127.0.0.1), metrics on, and `extra` flags; returns it and its metrics address.
async fn start_client(
    net: &TorNet,
    pki: &Pki,
    origin: SocketAddr,
    proxies: &[String],
    extra: &[&str],
) -> (Process, SocketAddr) {
    let key_path = pki.dir().join("client.key");
    make_key(&key_path).unwrap();
    let mut args = vec![
        HOST.to_owned(),
        origin.to_string(),
        "--proxy-ca".into(),
        pki.ca_path.display().to_string(),
        "--key".into(),
        key_path.display().to_string(),
        "--state-dir".into(),
        pki.dir().join("state").display().to_string(),
        "--tor-network".into(),
        net.network_file.display().to_string(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
    ];
    for proxy in proxies {
        let port = proxy.rsplit_once(':').unwrap().1;
        let name = proxy.rsplit_once(':').unwrap().0;
        args.extend([
            "--proxy".into(),
            proxy.clone(),
            "--resolve".into(),
            format!("{name}:{port}:127.0.0.1"),
        ]);
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    let metrics = metrics::endpoint(&mut client, Duration::from_secs(120))
        .await
        .unwrap();
    (client, metrics)
}

/// New circuits the client says it built for `proxy`'s tunnel.
fn circuits(scrape: &Exposition, proxy: &str) -> f64 {
    scrape.value("shroud_client_tor_circuits_total", &[("proxy", proxy)])
}

/// How many times the exit changed from one arrival to the next, plus one: each change needs a
/// circuit of its own, so this is a floor on the circuits the tunnels arrived over.
fn exit_runs(arrivals: &[Arrival]) -> usize {
    let owners: Vec<Option<u32>> = arrivals.iter().map(|a| a.owner).collect();
    if owners.is_empty() {
        return 0;
    }
    1 + owners.windows(2).filter(|w| w[0] != w[1]).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_the_proxy_drops_comes_back_over_the_same_exit_and_circuit() {
    init();
    let net = network().await;
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let hostile = HostileProxy::start(
        &pki,
        "drop.proxy.test",
        Behaviour::DropAfter(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let (client, metrics) = start_client(
        net,
        &pki,
        origin.addr(),
        &[hostile.proxy_arg()],
        &["--max-backoff-secs", "2"],
    )
    .await;

    // Five tunnels bound, each dropped two seconds after its bind.
    let bound = |scrape: &Exposition| {
        scrape.value(
            "shroud_client_tunnel_attempts_total",
            &[("result", "bound")],
        )
    };
    let scrape = within(180, async {
        loop {
            let scrape = metrics::scrape(metrics).await.unwrap();
            if bound(&scrape) >= 5.0 {
                return scrape;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let arrivals = hostile.arrivals();
    assert!(arrivals.len() >= 5, "{arrivals:?}");
    let exits: BTreeSet<Option<u32>> = arrivals.iter().map(|a| a.owner).collect();
    let [Some(exit)] = exits.iter().copied().collect::<Vec<_>>()[..] else {
        panic!("the tunnels arrived from more than one exit, or one unknown: {arrivals:?}");
    };
    let relay = net
        .relay_by_pid(exit)
        .expect("an exit relay of the network");
    assert_eq!(relay.kind, shroud_tests::tornet::RelayKind::Exit);
    assert_eq!(
        circuits(&scrape, &hostile.proxy_arg()),
        1.0,
        "one circuit for every tunnel: {arrivals:?}"
    );
    eprintln!(
        "tor churn: {} tunnels dropped by the proxy, all over one circuit through {}",
        arrivals.len(),
        relay.nick
    );
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_proxies_get_no_more_circuits_than_the_budget_and_an_honest_one_keeps_serving() {
    init();
    let net = network().await;
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let honest = TestProxy::start(&pki, "honest.proxy.test", &format!("{HOST} {key}\n"))
        .await
        .unwrap();
    let mut hostile = Vec::new();
    for (name, behaviour) in [
        (
            "drop.proxy.test",
            Behaviour::DropAfter(Duration::from_secs(2)),
        ),
        (
            "goaway.proxy.test",
            Behaviour::GoAwayAfter(Duration::from_secs(2)),
        ),
        ("stall.proxy.test", Behaviour::StallAfterTls),
        ("blackhole.proxy.test", Behaviour::Blackhole),
    ] {
        hostile.push(HostileProxy::start(&pki, name, behaviour).await.unwrap());
    }
    let honest_arg = format!("{}:{}", honest.name, honest.https.port());
    let mut proxies = vec![honest_arg.clone()];
    proxies.extend(hostile.iter().map(HostileProxy::proxy_arg));
    // The budget scaled down: four circuits an hour per proxy, twenty in all. Half of each may
    // go at once, the rest paced (one every 15 minutes per proxy), so over this test's few
    // minutes a proxy gets at most two.
    const PER_PROXY: f64 = 4.0;
    const BURST: f64 = PER_PROXY / 2.0;
    const TOTAL: f64 = 20.0;
    let (mut client, metrics) = start_client(
        net,
        &pki,
        origin.addr(),
        &proxies,
        &[
            "--max-circuits-per-proxy-per-hour",
            "4",
            "--max-circuits-per-hour",
            "20",
            "--max-backoff-secs",
            "4",
        ],
    )
    .await;
    let started = Instant::now();

    // Visitors through the honest proxy, from its first tunnel to the end.
    let pause = Duration::from_millis(100);
    let first = within(
        180,
        https_get_retrying(honest.https, HOST, pki.ca.root_store(), "/first", pause),
    )
    .await;
    assert_eq!(first.status, 200);
    let load = Load::start(LoadSpec::get(
        vec![honest.https],
        HOST,
        pki.ca.root_store(),
        20,
    ));

    // Until the black hole has spent its share and waits, and the others have had a few
    // tunnels each; bounded.
    let blackhole = &hostile[3];
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let scrape = metrics::scrape(metrics).await.unwrap();
        let waits = scrape.value(
            "shroud_client_circuit_budget_waits_total",
            &[("proxy", &blackhole.proxy_arg())],
        );
        let busy = hostile[..3].iter().all(|h| h.arrivals().len() >= 3);
        if waits >= 1.0 && busy {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hostile proxies did not all churn within 300 s: {:?}",
            hostile
                .iter()
                .map(|h| (h.name.clone(), h.arrivals().len()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // A while longer, so that a client without the budget would show it.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let window = started.elapsed();
    let scrape = metrics::scrape(metrics).await.unwrap();

    let mut total = circuits(&scrape, &honest_arg);
    assert_eq!(total, 1.0, "the honest proxy's tunnel never needed another");
    for proxy in &hostile {
        let arrivals = proxy.arrivals();
        let built = circuits(&scrape, &proxy.proxy_arg());
        total += built;
        let exits: BTreeSet<Option<u32>> = arrivals.iter().map(|a| a.owner).collect();
        eprintln!(
            "tor churn: {} over {window:?}: {} connections reached it from {} exits ({} exit \
             runs); the client built {built} circuits for it",
            proxy.name,
            arrivals.len(),
            exits.len(),
            exit_runs(&arrivals)
        );
        assert!(built >= 1.0, "{}: no circuit counted", proxy.name);
        assert!(built <= BURST, "{}: {built} circuits", proxy.name);
        // Seen from the proxy's side: each exit it saw, and each change of exit, took a
        // circuit of its own.
        assert!(exits.iter().all(Option::is_some), "{arrivals:?}");
        assert!(exits.len() as f64 <= built, "{}: {arrivals:?}", proxy.name);
        assert!(
            exit_runs(&arrivals) as f64 <= built,
            "{}: {arrivals:?}",
            proxy.name
        );
    }
    assert!(total <= TOTAL / 2.0, "{total} circuits in all");
    // The drop, the go-away and the stall end sessions, never circuits: one circuit each.
    for proxy in &hostile[..3] {
        assert_eq!(circuits(&scrape, &proxy.proxy_arg()), 1.0, "{}", proxy.name);
        assert!(proxy.arrivals().len() >= 3, "{}", proxy.name);
    }
    // The black hole makes every stream time out at the exit: its circuits are given up, and
    // past its share the tunnel waits, with a warning naming it.
    let arrivals = blackhole.arrivals();
    assert_eq!(circuits(&scrape, &blackhole.proxy_arg()), BURST);
    assert!(
        arrivals.len() as f64 <= 2.0 * BURST,
        "a circuit carries one stream the proxy answers and at most one it does not: \
         {arrivals:?}"
    );
    let log = client.output_text();
    let warning = log
        .lines()
        .find(|line| line.contains("waits for the circuit budget"))
        .expect("a warning about the budget");
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains(&blackhole.proxy_arg()), "{warning}");
    assert!(
        warning.contains("--max-circuits-per-proxy-per-hour"),
        "{warning}"
    );
    assert!(
        warning.contains("no answer from the exit"),
        "the warning says why the last circuit was given up: {warning}"
    );

    let result = within(60, load.stop()).await;
    assert!(result.ok() > 0, "{result}");
    assert_eq!(
        result.failed() + result.unreachable,
        0,
        "visitors of the honest proxy failed: {result}"
    );
    client.terminate();
    let _ = client.wait_exit(Duration::from_secs(20)).await;
}

/// The figures of docs/RESILIENCE.md: the four hostile proxies and an honest one against a
/// client with every default (backoff up to 60 s, the budget 6 an hour per proxy and 24 in
/// all), for `SHROUD_CHURN_MINUTES` minutes (10 unless told). Each connection that reaches a
/// hostile proxy is one attempt, and before the budget each attempt built a new circuit: the
/// arrivals per hour are the circuits per hour without it. Run by hand:
/// `cargo test -p shroud-tests --test tor_churn -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement of several minutes, for docs/RESILIENCE.md"]
async fn measure_churn_with_the_default_settings() {
    init();
    let minutes: u64 = std::env::var("SHROUD_CHURN_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(10);
    let net = network().await;
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key = make_key(&pki.dir().join("client.key")).unwrap();
    let honest = TestProxy::start(&pki, "honest.proxy.test", &format!("{HOST} {key}\n"))
        .await
        .unwrap();
    let mut hostile = Vec::new();
    for (name, behaviour) in [
        (
            "drop.proxy.test",
            Behaviour::DropAfter(Duration::from_secs(3)),
        ),
        (
            "goaway.proxy.test",
            Behaviour::GoAwayAfter(Duration::from_secs(3)),
        ),
        ("stall.proxy.test", Behaviour::StallAfterTls),
        ("blackhole.proxy.test", Behaviour::Blackhole),
    ] {
        hostile.push(HostileProxy::start(&pki, name, behaviour).await.unwrap());
    }
    let honest_arg = format!("{}:{}", honest.name, honest.https.port());
    let mut proxies = vec![honest_arg.clone()];
    proxies.extend(hostile.iter().map(HostileProxy::proxy_arg));
    let (client, metrics) = start_client(net, &pki, origin.addr(), &proxies, &[]).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(minutes * 60)).await;
    let window = started.elapsed();
    let scrape = metrics::scrape(metrics).await.unwrap();
    let per_hour = |n: f64| n * 3600.0 / window.as_secs_f64();
    for proxy in &hostile {
        let seen = proxy.arrivals();
        let arrivals = seen.len() as f64;
        let exits: BTreeSet<Option<u32>> = seen.iter().map(|a| a.owner).collect();
        let built = circuits(&scrape, &proxy.proxy_arg());
        let waits = scrape.value(
            "shroud_client_circuit_budget_waits_total",
            &[("proxy", &proxy.proxy_arg())],
        );
        eprintln!(
            "churn figures: {} over {window:?}: {arrivals} attempts reached it ({:.0}/h, the \
             circuits per hour without the budget) from {} exits in {} runs; {built} circuits \
             built ({:.1}/h), {waits} budget waits",
            proxy.name,
            per_hour(arrivals),
            exits.len(),
            exit_runs(&seen),
            per_hour(built),
        );
    }
    eprintln!(
        "churn figures: honest proxy: {} circuits",
        circuits(&scrape, &honest_arg)
    );
    drop(client);
}
