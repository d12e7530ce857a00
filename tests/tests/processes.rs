//! The real binaries, started and stopped by PID: what an operator and a user see.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shroud_tests::stack::{authorize, binary, make_key, Pki, Process, ProxyProcess, TestProxy};
use shroud_tests::{https_get, init, within, HttpOrigin};

const HOST: &str = "example.test";

/// Arguments for a `shroud` client binary publishing HOST at `target` through `proxies`.
fn client_args(
    pki: &Pki,
    key: &std::path::Path,
    target: SocketAddr,
    proxies: &[(&str, SocketAddr)],
) -> Vec<String> {
    let mut args = vec![
        HOST.to_owned(),
        target.to_string(),
        "--transport".into(),
        "direct".into(),
        "--proxy-ca".into(),
        pki.ca_path.display().to_string(),
        "--key".into(),
        key.display().to_string(),
        "--max-backoff-secs".into(),
        "1".into(),
        "--keepalive-secs".into(),
        "2".into(),
    ];
    for (name, addr) in proxies {
        args.extend([
            "--proxy".into(),
            format!("{name}:{}", addr.port()),
            "--resolve".into(),
            format!("{name}:{}:{}", addr.port(), addr.ip()),
        ]);
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_proxy_is_rejoined_and_the_other_never_stops_serving() {
    init();
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.ca.issue(&[HOST]).server_config(&[b"http/1.1"]))
        .await
        .unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path);
    let policy = format!("{HOST} {key}\n");
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut first = ProxyProcess::start(&pki, "one.proxy.test", &policy, any_port)
        .await
        .unwrap();
    let second = ProxyProcess::start(&pki, "two.proxy.test", &policy, any_port)
        .await
        .unwrap();

    let args = client_args(
        &pki,
        &key_path,
        origin.addr(),
        &[
            ("one.proxy.test", first.https),
            ("two.proxy.test", second.https),
        ],
    );
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(30))
        .await
        .unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(30))
        .await
        .unwrap();
    // The client never logs its target at info level.
    assert!(!client.stderr_text().contains(&origin.addr().to_string()));

    // Visitors through the second proxy, without pause, for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (addr, roots) = (second.https, pki.ca.root_store());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match https_get(addr, HOST, roots.clone(), "/steady").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    within(20, wait_until(|| ok.load(Ordering::Relaxed) >= 5)).await;

    // SIGKILL the first proxy: no go-away, its sockets just vanish.
    first.kill();
    client
        .wait_for_line("tunnel lost", Duration::from_secs(30))
        .await
        .unwrap();
    let served_before_restart = ok.load(Ordering::Relaxed);

    // It comes back on the same port; the client binds there again by itself.
    first.restart().await.unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(30))
        .await
        .unwrap();
    let response = within(
        20,
        https_get(first.https, HOST, pki.ca.root_store(), "/back"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);

    within(
        20,
        wait_until(|| ok.load(Ordering::Relaxed) >= served_before_restart + 5),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "visitors through the proxy that stayed up must never fail ({} succeeded)",
        ok.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_every_proxy_refuses_exits_non_zero_and_says_why() {
    init();
    let pki = Pki::new().unwrap();
    let key_path = pki.dir().join("client.key");
    make_key(&key_path);
    // The proxy authorizes some other key only.
    let other = shroud_mux::auth::SecretKey::generate().unwrap();
    let proxy = TestProxy::start(&pki, "proxy.test", &authorize(HOST, &other))
        .await
        .unwrap();
    let args = client_args(
        &pki,
        &key_path,
        "127.0.0.1:9".parse().unwrap(),
        &[("proxy.test", proxy.https)],
    );
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    let status = client.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(1));
    let log = client.stderr_text();
    assert!(log.contains("not authorized"), "{log}");
    assert!(log.contains("no tunnel can succeed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_trust_the_proxy_certificate_refuses_it() {
    init();
    let pki = Pki::new().unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path);
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
        client.stderr_text().contains("certificate"),
        "{}",
        client.stderr_text()
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
    assert!(proxy.process.stderr_text().contains("SIGTERM"));
}

async fn wait_until(done: impl Fn() -> bool) {
    while !done() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
