//! Tor's guard and vanguards, on a private Tor network on 127.0.0.1 (Debian's `tor`; see
//! `shroud_tests::tornet`): what the client's state directory keeps across a restart, and what
//! `--vanguards` makes Arti do. These tests never skip: without `tor` they fail and say so.
//!
//! What is observed, and how:
//! - Arti's own state files in `STATE/tor/state/state`: `guards.json` (the guard sample, in the
//!   order Arti prefers its guards) and `vanguards.json` (full vanguards' second- and third-hop
//!   sets, written only in full mode).
//! - Arti's log line for each onion-service circuit it prepares (`selecting HS circuit stem
//!   vanguards=full`, `tor_circmgr::hspool` at trace), so the mode is the one Arti used, not
//!   only the one it was given.
//! - Which relays the client's process holds TCP connections to (`/proc`), each relay being a
//!   tor on 127.0.0.1 with an ORPort of its own.
//!
//! All tests share one network.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use shroud_tests::onion::{private_violations, OnionProxy};
use shroud_tests::process::{Output, Process};
use shroud_tests::stack::{binary, Pki, TestProxy};
use shroud_tests::tornet::{tcp_connections_of, TorNet};
use shroud_tests::{init, HttpOrigin};

const HOST: &str = "example.test";

/// How many fresh state directories `a_fresh_state_directory_chooses_its_guard_anew` tries.
const FRESH_CLIENTS: usize = 8;

/// Arti's own log of the onion-service circuits it prepares, with the vanguard mode of each.
const HSPOOL_LOG: &str = "info,tor_circmgr::hspool=trace";

async fn network() -> &'static TorNet {
    tokio::task::spawn_blocking(TorNet::shared)
        .await
        .unwrap()
        .expect(
            "the private Tor network must start (is Debian's tor installed? .ci/run installs it)",
        )
}

/// The ed25519 identity of a relay as Arti writes it in its state files.
fn ed_id(entry: &Value) -> Option<String> {
    entry
        .pointer("/id/ed25519")
        .or_else(|| entry.get("ed25519"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The guards of Arti's `guards.json` under `state` (the client's `--state-dir`), in the
/// order Arti picks them: confirmed guards first (a circuit used the first), then the rest of
/// the sample in sample order. Empty if the file is not there yet.
fn guard_order(state: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(state.join("tor/state/state/guards.json")) else {
        return Vec::new();
    };
    let json: Value = serde_json::from_str(&text).unwrap();
    let set = &json["default"];
    let mut order: Vec<String> = set["confirmed"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(ed_id)
        .collect();
    for guard in set["guards"].as_array().into_iter().flatten() {
        let id = ed_id(guard).expect("a guard entry with an ed25519 identity");
        if !order.contains(&id) {
            order.push(id);
        }
    }
    order
}

/// Whether Arti has confirmed a guard (built a circuit through it) in `state`.
fn confirmed_guard(state: &Path) -> Option<String> {
    let text = std::fs::read_to_string(state.join("tor/state/state/guards.json")).ok()?;
    let json: Value = serde_json::from_str(&text).ok()?;
    json["default"]["confirmed"]
        .as_array()?
        .first()
        .and_then(ed_id)
}

/// The second- and third-hop vanguard sets of `vanguards.json` under `state`, by identity;
/// `None` if Arti has not written the file.
fn vanguard_sets(state: &Path) -> Option<(BTreeSet<String>, BTreeSet<String>)> {
    let text = std::fs::read_to_string(state.join("tor/state/state/vanguards.json")).ok()?;
    let json: Value = serde_json::from_str(&text).unwrap();
    let layer = |name: &str| -> BTreeSet<String> {
        json[name]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|vanguard| ed_id(&vanguard["id"]))
            .collect()
    };
    Some((layer("l2_vanguards"), layer("l3_vanguards")))
}

/// The nickname of the relay of `net` whose ed25519 identity is `id`.
fn nick(net: &TorNet, id: &str) -> String {
    net.relays()
        .iter()
        .find(|relay| relay.ed_identity == id)
        .map_or_else(|| format!("unknown relay {id}"), |relay| relay.nick.clone())
}

/// The relays of `net` that process `pid` holds TCP connections to, by nickname.
fn relays_connected(net: &TorNet, pid: u32) -> BTreeSet<String> {
    let ports: BTreeSet<u16> = tcp_connections_of(pid)
        .into_iter()
        .map(|(_, remote)| remote.port())
        .collect();
    net.relays()
        .iter()
        .filter(|relay| ports.contains(&relay.or_port))
        .map(|relay| relay.nick.clone())
        .collect()
}

/// Polls `check` every 100 ms until it gives a value, for up to `limit`.
async fn poll<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An origin, a proxy that lets the client's key bind HOST, and the arguments of a `shroud`
/// client through Tor with its own onion service (`--onion`), state in `state`.
struct Setup {
    _origin: HttpOrigin,
    _proxy: TestProxy,
    _pki: Pki,
    state: PathBuf,
    args: Vec<String>,
}

impl Setup {
    async fn new(net: &TorNet, extra: &[&str]) -> Setup {
        let pki = Pki::new().unwrap();
        let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
        let key_path = pki.dir().join("client.key");
        let key = shroud_tests::stack::make_key(&key_path).unwrap();
        let proxy = TestProxy::start(&pki, "guard.proxy.test", &format!("{HOST} {key}\n"))
            .await
            .unwrap();
        let state = pki.dir().join("state");
        let mut args: Vec<String> = vec![
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
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        Setup {
            _origin: origin,
            _proxy: proxy,
            _pki: pki,
            state,
            args,
        }
    }

    /// Starts the client and waits until its tunnel is up and its onion service published,
    /// noting every relay it connects to meanwhile (polled every 50 ms), in the order first
    /// seen.
    async fn run(&self, net: &TorNet) -> (Process, Vec<String>) {
        let mut client = Process::spawn_with(
            &binary("shroud"),
            &self.args,
            &[("RUST_LOG", OsStr::new(HSPOOL_LOG))],
            Output::Echo,
        )
        .unwrap();
        let started = Instant::now();
        let mut seen: Vec<String> = Vec::new();
        let (mut tunnel, mut published) = (false, false);
        let deadline = Instant::now() + Duration::from_secs(180);
        while !(tunnel && published) {
            for relay in relays_connected(net, client.pid()) {
                if !seen.contains(&relay) {
                    seen.push(relay);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the client did not come up: {}",
                client.output_text()
            );
            let line = match client
                .wait_for_line("", Duration::from_millis(50).min(left))
                .await
            {
                Ok(line) => line,
                Err(_) => {
                    if let Some(status) = client.try_status().unwrap() {
                        panic!("the client exited ({status}): {}", client.output_text());
                    }
                    continue;
                }
            };
            tunnel |= line.contains("tunnel up");
            published |= line.contains("onion service published its descriptor");
        }
        eprintln!(
            "tor_guard: tunnel up and onion service published after {:?}; relays connected, \
             in order: {seen:?}",
            started.elapsed()
        );
        (client, seen)
    }
}

/// Stops `client` with SIGTERM and checks that it exits 0.
async fn stop(client: &mut Process) {
    client.terminate();
    let status = client.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", client.output_text());
}

/// The vanguards the client says it uses, in its `Tor bootstrapped` line.
fn announced_vanguards(log: &str) -> String {
    let line = log
        .lines()
        .find(|line| line.contains("Tor bootstrapped"))
        .expect("a Tor bootstrapped line");
    let rest = &line[line.find("vanguards=").expect(line) + "vanguards=".len()..];
    rest.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The vanguard modes of the onion-service circuits Arti prepared, from its log.
fn hs_circuit_modes(log: &str) -> BTreeSet<String> {
    log.lines()
        .filter(|line| line.contains("selecting HS circuit stem"))
        .filter_map(|line| {
            let rest = &line[line.find("vanguards=")? + "vanguards=".len()..];
            Some(rest.split_whitespace().next()?.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_vanguards_and_the_guard_outlive_a_restart_on_the_same_state_directory() {
    init();
    let net = network().await;
    // No --vanguards: full is the default.
    let setup = Setup::new(net, &[]).await;
    let (mut client, seen) = setup.run(net).await;

    // Arti used full vanguards for the onion service's circuits, and keeps both layers in the
    // state directory.
    assert_eq!(
        hs_circuit_modes(&client.output_text()),
        BTreeSet::from(["full".to_owned()]),
        "vanguard modes of onion-service circuits"
    );
    assert_eq!(announced_vanguards(&client.output_text()), "full");
    let (l2, l3) = poll("vanguards.json", Duration::from_secs(60), || {
        vanguard_sets(&setup.state).filter(|(l2, l3)| !l2.is_empty() && !l3.is_empty())
    })
    .await;
    let names = |set: &BTreeSet<String>| set.iter().map(|id| nick(net, id)).collect::<Vec<_>>();
    eprintln!(
        "tor_guard: vanguards L2 {:?}, L3 {:?}",
        names(&l2),
        names(&l3)
    );
    // Arti writes its guards every few minutes and at exit: read them once it has exited.
    stop(&mut client).await;
    let guard = confirmed_guard(&setup.state).expect("a confirmed guard in guards.json");
    let order = guard_order(&setup.state);
    assert_eq!(order.first(), Some(&guard));
    // Circuits use the first primary guard, directory requests any of the first three.
    let primary: BTreeSet<String> = order.iter().take(3).map(|id| nick(net, id)).collect();
    eprintln!(
        "tor_guard: guard {}, primary guards {primary:?}",
        nick(net, &guard)
    );
    assert!(
        seen.contains(&nick(net, &guard)),
        "the client connected to its guard {}: {seen:?}",
        nick(net, &guard)
    );
    let saved = vanguard_sets(&setup.state).unwrap();
    assert_eq!(saved, (l2, l3), "the vanguards, as saved at exit");

    // Started again on the same state directory: the same guard, the same vanguards, and
    // connections to its primary guards only (no new directory fallback, no other relay).
    let (mut again, seen) = setup.run(net).await;
    assert!(
        seen.contains(&nick(net, &guard)),
        "the restarted client connects to its guard {}: {seen:?}",
        nick(net, &guard)
    );
    let strangers: Vec<&String> = seen.iter().filter(|n| !primary.contains(*n)).collect();
    assert!(
        strangers.is_empty(),
        "the restarted client connected to {strangers:?}, not among its primary guards \
         {primary:?}"
    );
    assert_eq!(
        hs_circuit_modes(&again.output_text()),
        BTreeSet::from(["full".to_owned()])
    );
    stop(&mut again).await;
    assert_eq!(confirmed_guard(&setup.state), Some(guard));
    assert_eq!(
        vanguard_sets(&setup.state).unwrap(),
        saved,
        "the restarted client kept its vanguards"
    );

    // Nobody else may enter where Arti keeps them: every directory under the state directory
    // is the owner's alone, and so are the guard and vanguard files. (Arti leaves its lock
    // files and directory cache 0644, behind those directories.)
    let open: Vec<(PathBuf, u32)> = private_violations(&setup.state.join("tor"))
        .into_iter()
        .filter(|(path, _)| path.is_dir() || path.extension() == Some(OsStr::new("json")))
        .collect();
    assert!(open.is_empty(), "{open:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lite_vanguards_are_what_arti_uses_when_asked_and_are_not_kept() {
    init();
    let net = network().await;
    let setup = Setup::new(net, &["--vanguards", "lite"]).await;
    let (mut client, _) = setup.run(net).await;
    let modes = hs_circuit_modes(&client.output_text());
    assert_eq!(modes, BTreeSet::from(["lite".to_owned()]));
    assert_eq!(announced_vanguards(&client.output_text()), "lite");
    stop(&mut client).await;
    // Arti writes vanguards.json only for full vanguards: lite ones are chosen anew each start.
    assert!(
        vanguard_sets(&setup.state).is_none(),
        "{:?}",
        vanguard_sets(&setup.state)
    );
    assert!(confirmed_guard(&setup.state).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_state_directory_chooses_its_guard_anew() {
    init();
    let net = network().await;
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = target.local_addr().unwrap().port();
    tokio::spawn(async move { while let Ok((_stream, _)) = target.accept().await {} });
    let mut guards = Vec::new();
    for _ in 0..FRESH_CLIENTS {
        let began = Instant::now();
        let state = net.new_state_root().unwrap();
        let config = shroud_client::tor::arti_config(
            Some(&net.network_file),
            &state.join("tor"),
            shroud_client::tor::Vanguards::Full,
        )
        .unwrap();
        // On a runtime of its own, so that all of Arti's tasks end with it and its circuit
        // manager writes guards.json at once, as a client process does when it exits.
        tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let client = arti_client::TorClient::create_bootstrapped(config)
                    .await
                    .unwrap();
                // A circuit through an exit confirms the guard it used.
                client.connect(("127.0.0.1", port)).await.unwrap();
            });
            runtime.shutdown_timeout(Duration::from_secs(10));
        })
        .await
        .unwrap();
        let guard = confirmed_guard(&state).expect("a confirmed guard in guards.json");
        guards.push(nick(net, &guard));
        eprintln!(
            "tor_guard: a fresh state directory's guard is {} ({:?})",
            nick(net, &guard),
            began.elapsed()
        );
    }
    // With several relays voted Guard, fresh state directories do not all pick the same one
    // (with 5 equally likely candidates, 8 alike would happen once in 5^7 = 78,125 runs).
    let distinct: BTreeSet<&String> = guards.iter().collect();
    assert!(distinct.len() > 1, "{guards:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_onion_proxy_and_the_clients_that_dial_it_keep_full_vanguards() {
    init();
    let net = network().await;
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key_path = pki.dir().join("client.key");
    let key = shroud_tests::stack::make_key(&key_path).unwrap();
    let name = "onion.proxy.test";
    // The proxy's --onion-tunnel service, with no --vanguards: full.
    let proxy_state = pki.dir().join("proxy-state");
    let base = shroud_tests::stack::proxy_args(&pki, name, &format!("{HOST} {key}\n")).unwrap();
    let proxy = OnionProxy::start(OnionProxy::args(base, &proxy_state, &net.network_file))
        .await
        .unwrap();
    let (l2, l3) = poll(
        "the proxy's vanguards.json",
        Duration::from_secs(60),
        || vanguard_sets(&proxy_state).filter(|(l2, l3)| !l2.is_empty() && !l3.is_empty()),
    )
    .await;
    eprintln!(
        "tor_guard: the onion proxy's vanguards: {} L2, {} L3",
        l2.len(),
        l3.len()
    );

    // A client whose tunnel goes to that onion service: its rendezvous and introduction
    // circuits are onion-service circuits, with full vanguards, kept in its state directory.
    let state = pki.dir().join("client-state");
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
        proxy.client_proxy(name),
    ];
    let mut client = Process::spawn_with(
        &binary("shroud"),
        &args,
        &[("RUST_LOG", OsStr::new(HSPOOL_LOG))],
        Output::Echo,
    )
    .unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(180))
        .await
        .unwrap();
    stop(&mut client).await;
    assert_eq!(
        hs_circuit_modes(&client.output_text()),
        BTreeSet::from(["full".to_owned()])
    );
    let (l2, l3) = vanguard_sets(&state).expect("the client's vanguards.json");
    assert!(!l2.is_empty() && !l3.is_empty(), "{l2:?} {l3:?}");
}
