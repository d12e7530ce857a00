//! The real binaries, started and stopped by PID: what an operator and a user see.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use shroud_tests::init;
use shroud_tests::process::Process;
use shroud_tests::stack::{
    authorize, binary, direct_client_args, make_key, Pki, ProxyProcess, TestProxy,
};

const HOST: &str = "example.test";

/// Arguments for a `shroud` client binary publishing HOST at `target` through `proxies`.
fn client_args(
    pki: &Pki,
    key: &std::path::Path,
    target: SocketAddr,
    proxies: &[(&str, SocketAddr)],
) -> Vec<String> {
    direct_client_args(pki, key, HOST, target, proxies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_every_proxy_refuses_for_good_exits_non_zero_and_says_why() {
    init();
    let pki = Pki::new().unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let proxy = TestProxy::start(&pki, "proxy.test", &format!("{HOST} {key}\n"))
        .await
        .unwrap();
    // The proxy's own name: no reload can ever let a client bind it.
    let mut args = direct_client_args(
        &pki,
        &key_path,
        "proxy.test",
        "127.0.0.1:9".parse().unwrap(),
        &[("proxy.test", proxy.https)],
    );
    args.extend(["--refused-retry-secs".into(), "1".into()]);
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    let status = client.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(1));
    let log = client.output_text();
    assert!(log.contains("the proxy's own name"), "{log}");
    assert!(log.contains("no tunnel can succeed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_the_policy_refuses_stays_up_says_why_and_asks_again_later() {
    init();
    let pki = Pki::new().unwrap();
    let key_path = pki.dir().join("client.key");
    make_key(&key_path).unwrap();
    // The proxy authorizes some other key only, for now: its operator may add this one and
    // reload, so the client asks again, slowly, rather than exit.
    let other = shroud_mux::auth::SecretKey::generate().unwrap();
    let proxy = TestProxy::start(&pki, "proxy.test", &authorize(HOST, &other))
        .await
        .unwrap();
    let mut args = client_args(
        &pki,
        &key_path,
        "127.0.0.1:9".parse().unwrap(),
        &[("proxy.test", proxy.https)],
    );
    args.extend(["--refused-retry-secs".into(), "1".into()]);
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    for _ in 0..2 {
        let refused = client
            .wait_for_line("hostname not bound", Duration::from_secs(30))
            .await
            .unwrap();
        assert!(refused.contains("not authorized"), "{refused}");
        let waiting = client
            .wait_for_line("asking it again later", Duration::from_secs(5))
            .await
            .unwrap();
        assert!(waiting.contains("retry_in_secs=1"), "{waiting}");
    }
    assert!(client.try_status().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_proxy_certificate_refuses_it() {
    init();
    let pki = Pki::new().unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let proxy = TestProxy::start(&pki, "proxy.test", &format!("{HOST} {key}\n"))
        .await
        .unwrap();
    // Trust a different CA than the one that signed the proxy.
    let stranger = Pki::new().unwrap();
    let mut args = client_args(
        &stranger,
        &key_path,
        "127.0.0.1:9".parse().unwrap(),
        &[("proxy.test", proxy.https)],
    );
    args.push("--connect-timeout-secs".into());
    args.push("5".into());
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    let status = client.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(
        client.output_text().contains("certificate"),
        "{}",
        client.output_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_proxy_and_exits_zero() {
    init();
    let pki = Pki::new().unwrap();
    let mut proxy = ProxyProcess::start(&pki, "proxy.test", "", "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    proxy.process.terminate();
    let status = proxy
        .process
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(proxy.process.output_text().contains("SIGTERM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_log_format_json_every_log_line_is_a_json_object() {
    init();
    let pki = Pki::new().unwrap();
    let mut args = shroud_tests::stack::proxy_args(&pki, "proxy.test", "").unwrap();
    args.extend(
        [
            "--listen-https",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "-v",
        ]
        .map(str::to_owned),
    );
    // An empty RUST_LOG counts as unset, so -v decides.
    let env = [("RUST_LOG", std::ffi::OsStr::new(""))];
    let mut proxy = Process::spawn_with(
        &binary("shroud-proxy"),
        &args,
        &env,
        shroud_tests::process::Output::Echo,
    )
    .unwrap();
    proxy
        .wait_for_line("listening", Duration::from_secs(20))
        .await
        .unwrap();
    proxy.terminate();
    let status = proxy.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "{status}");
    let log = proxy.output_text();
    let mut messages = Vec::new();
    for line in log.lines() {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
        assert!(event["timestamp"].is_string(), "{line}");
        assert!(event["level"].is_string(), "{line}");
        messages.push(event["fields"]["message"].as_str().unwrap_or("").to_owned());
    }
    assert!(messages.iter().any(|m| m == "listening"), "{log}");
    // -v: shroud's own debug lines are there too.
    assert!(log.contains("\"level\":\"DEBUG\""), "{log}");
}
