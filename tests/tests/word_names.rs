//! Word names, as a user without a domain meets them: `shroud --fleet-name DOMAIN TARGET` prints
//! the URL it publishes at, the same at every start; visitors reach the origin there; another
//! key gets other words, and cannot bind the first key's.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use shroud_mux::auth::PublicKey;
use shroud_tests::process::Process;
use shroud_tests::stack::{binary, direct_client_args, make_key, Pki, ProxyProcess};
use shroud_tests::{https_get, init, within, HttpOrigin};

const DOMAIN: &str = "fleet.test";
const PROXY: &str = "proxy.test";

/// Runs `shroud --fleet-name DOMAIN TARGET` with the key at `key` until its tunnel is up, and
/// returns it with the URL it printed.
async fn publish(
    pki: &Pki,
    key: &Path,
    target: SocketAddr,
    proxy: SocketAddr,
) -> (Process, String) {
    let mut args = direct_client_args(pki, key, "unused", target, &[(PROXY, proxy)]);
    // In place of HOSTNAME: the domain, and TARGET alone.
    args.splice(0..1, ["--fleet-name".to_owned(), DOMAIN.to_owned()]);
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(30))
        .await
        .unwrap();
    let url = client
        .output_text()
        .lines()
        .find(|line| line.contains("https://"))
        .and_then(|line| line.split_whitespace().find(|w| w.starts_with("https://")))
        .expect("the URL on stdout")
        .to_owned();
    (client, url)
}

/// Asserts that a visitor of `host` at the proxy on `https` reaches the origin.
async fn serves(pki: &Pki, https: SocketAddr, host: &str) {
    let response = within(20, https_get(https, host, pki.ca.root_store(), "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{host}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_publishes_at_its_own_words_and_only_there() {
    init();
    let pki = Pki::new().unwrap();
    // No authorized entries: word names need none.
    let extra = ["--word-names".to_owned(), DOMAIN.to_owned()];
    let proxy =
        ProxyProcess::start_with_args(&pki, PROXY, "", "127.0.0.1:0".parse().unwrap(), &extra)
            .await
            .unwrap();

    let (alice_key, bob_key) = (pki.dir().join("alice.key"), pki.dir().join("bob.key"));
    let alice: PublicKey = make_key(&alice_key).unwrap().parse().unwrap();
    let bob: PublicKey = make_key(&bob_key).unwrap().parse().unwrap();
    let alice_name = shroud_mux::words::word_name(&alice, DOMAIN);
    let bob_name = shroud_mux::words::word_name(&bob, DOMAIN);
    assert_ne!(alice_name, bob_name, "two keys, two names");

    let origin = HttpOrigin::tls(pki.origin_tls(&[&alice_name, &bob_name]))
        .await
        .unwrap();
    let (mut first, url) = publish(&pki, &alice_key, origin.addr(), proxy.https).await;
    assert_eq!(url, format!("https://{alice_name}/"));
    serves(&pki, proxy.https, &alice_name).await;

    // Restarted, the same key publishes at the same name.
    first.kill();
    let (_again, url_again) = publish(&pki, &alice_key, origin.addr(), proxy.https).await;
    assert_eq!(url_again, url, "stable across restarts");

    // Another key gets its own words, and serves there too.
    let (_bob, bob_url) = publish(&pki, &bob_key, origin.addr(), proxy.https).await;
    assert_eq!(bob_url, format!("https://{bob_name}/"));
    serves(&pki, proxy.https, &bob_name).await;

    // Bob's key cannot bind Alice's words: refused for good, saying whose name is whose.
    let args = direct_client_args(
        &pki,
        &bob_key,
        &alice_name,
        origin.addr(),
        &[(PROXY, proxy.https)],
    );
    let output = within(30, async {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(binary("shroud"))
                .args(&args)
                .env("NO_COLOR", "1")
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    })
    .await;
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("word names") && err.contains(&bob_name),
        "{err}"
    );
    // ...and Alice's name still reaches Alice's tunnel.
    serves(&pki, proxy.https, &alice_name).await;
}
