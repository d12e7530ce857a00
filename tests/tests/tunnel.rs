//! End to end over the direct transport: visitor, proxy, tunnel, client, origin, on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use shroud_client::shared::TunnelState;
use shroud_proxy::shared::Limits;
use shroud_tests::scale::client_hello;
use shroud_tests::stack::{authorize, ClientSpec, FreezableRelay, Pki, TestClient, TestProxy};
use shroud_tests::{
    bulk_transfer, client_config, http_get, https_get, https_get_retrying, init, raw_http,
    tls_connect, within, BulkOrigin, EchoOrigin, HttpOrigin, SilentOrigin,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "example.test";
const PROXY: &str = "proxy.test";

/// A proxy that authorizes one fresh client key for `HOST`, and that client, bound.
async fn published(pki: &Pki, target: SocketAddr) -> (TestProxy, TestClient) {
    published_with(pki, target, None, Limits::default()).await
}

async fn published_with(
    pki: &Pki,
    target: SocketAddr,
    http_target: Option<SocketAddr>,
    limits: Limits,
) -> (TestProxy, TestClient) {
    let mut spec = ClientSpec::new(HOST, target, vec![]);
    spec.http_target = http_target;
    let proxy = TestProxy::start_with(pki, PROXY, &authorize(HOST, &spec.key), limits)
        .await
        .unwrap();
    spec.proxies = vec![proxy.dial()];
    let mut client = TestClient::start(pki, spec).unwrap();
    within(20, client.wait_bound(1)).await;
    (proxy, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_visitor_reaches_tls_origin_and_verifies_its_certificate() {
    init();
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let (proxy, _client) = published(&pki, origin.addr()).await;

    // The visitor trusts only the test CA and checks the certificate for example.test: the
    // handshake can only succeed if the proxy passed the origin's own TLS through untouched.
    let response = within(
        20,
        https_get(proxy.https, HOST, pki.ca.root_store(), "/hello"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "hello from origin: GET /hello\n");
    assert_eq!(response.header("x-origin"), Some("test"));

    // SNI is matched case-insensitively.
    let upper = within(
        20,
        https_get(proxy.https, "EXAMPLE.test", pki.ca.root_store(), "/"),
    )
    .await
    .unwrap();
    assert_eq!(upper.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_visitor_reaches_http_target_or_gets_redirected() {
    init();
    let pki = Pki::new().unwrap();
    let tls_origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let http_origin = HttpOrigin::plain().await.unwrap();

    let (proxy, _client) = published_with(
        &pki,
        tls_origin.addr(),
        Some(http_origin.addr()),
        Limits::default(),
    )
    .await;
    let response = within(20, http_get(proxy.http, "Example.Test:80", "/plain?x=1"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "hello from origin: GET /plain?x=1\n");
    drop(proxy);

    // Without an HTTP target the proxy answers a redirect to HTTPS itself.
    let (proxy, _client) = published(&pki, tls_origin.addr()).await;
    let response = within(20, http_get(proxy.http, HOST, "/a/b?c=d"))
        .await
        .unwrap();
    assert_eq!(response.status, 308);
    assert_eq!(
        response.header("location"),
        Some("https://example.test/a/b?c=d")
    );
    // Absolute-form targets route by their authority.
    let absolute =
        b"GET http://example.test/abs HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n";
    let response = within(20, raw_http(proxy.http, absolute)).await.unwrap();
    assert_eq!(response.status, 308);
    assert_eq!(
        response.header("location"),
        Some("https://example.test/abs")
    );
    assert_eq!(http_origin.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_hostnames_are_refused_and_bad_heads_get_errors() {
    init();
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST, "other.test"]))
        .await
        .unwrap();
    let (proxy, _client) = published(&pki, origin.addr()).await;

    // TLS: the handshake fails (the proxy sends unrecognized_name and closes).
    let err = within(
        20,
        tls_connect(proxy.https, "other.test", pki.ca.root_store()),
    )
    .await
    .expect_err("TLS to an unknown name must fail");
    let text = format!("{err:#}").to_lowercase();
    assert!(
        text.contains("unrecognisedname") || text.contains("unrecognized") || text.contains("eof"),
        "{text}"
    );

    // HTTP: 404 with a short body naming nothing internal.
    let response = within(20, http_get(proxy.http, "other.test", "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 404);
    let body = response.body_text();
    assert!(
        !body.contains("127.0.0.1") && !body.contains(PROXY),
        "{body}"
    );

    // Duplicate Host, missing Host, oversized head: 400/400/431, and the proxy still serves.
    let dup = b"GET / HTTP/1.1\r\nHost: example.test\r\nHost: example.test\r\n\r\n";
    assert_eq!(
        within(20, raw_http(proxy.http, dup)).await.unwrap().status,
        400
    );
    let missing = b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n";
    assert_eq!(
        within(20, raw_http(proxy.http, missing))
            .await
            .unwrap()
            .status,
        400
    );
    let mut huge = b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    huge.extend_from_slice(b"\r\n\r\n");
    let answer = within(20, raw_http(proxy.http, &huge)).await;
    if let Ok(response) = answer {
        assert_eq!(response.status, 431);
    } // A reset while the proxy closes on unread bytes is an acceptable close too.
    assert_eq!(
        within(20, https_get(proxy.https, HOST, pki.ca.root_store(), "/"))
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_slow_client_hellos_are_closed_within_the_deadline() {
    init();
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let limits = Limits {
        client_hello_timeout: Duration::from_secs(2),
        http_head_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let (proxy, _client) = published_with(&pki, origin.addr(), None, limits).await;

    // Garbage, a TLS record announcing a huge handshake, and an endless stream of records:
    // each is closed promptly.
    let mut oversized = vec![22, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
    oversized.resize(5 + 0x4000, 0);
    let mut endless = Vec::new();
    for _ in 0..4 {
        endless.extend_from_slice(&[22, 3, 1, 0x40, 0x00]);
        endless.resize(endless.len() + 0x4000, 0x41);
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            b"\x00\x01\x02 definitely not TLS\r\n\r\n".to_vec(),
        ),
        ("oversized", oversized),
        ("endless", endless),
        (
            "http on the tls port",
            b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n".to_vec(),
        ),
    ];
    for (name, bytes) in cases {
        let mut stream = TcpStream::connect(proxy.https).await.unwrap();
        let _ = stream.write_all(&bytes).await;
        let mut sink = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "{name}: connection not closed within 5 s");
    }

    // A visitor that stalls half-way through its ClientHello is cut at the 2 s deadline.
    let mut stalled = TcpStream::connect(proxy.https).await.unwrap();
    stalled.write_all(&[22, 3, 1, 0, 200, 1, 0]).await.unwrap();
    let start = std::time::Instant::now();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(6), stalled.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "stalled ClientHello not closed");
    assert!(start.elapsed() >= Duration::from_millis(1500));

    // A stalled HTTP head is answered 408 at its deadline.
    let mut stalled = TcpStream::connect(proxy.http).await.unwrap();
    stalled
        .write_all(b"GET / HTTP/1.1\r\nHost: exa")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(6), stalled.read_to_end(&mut answer)).await;
    assert!(closed.is_ok(), "stalled HTTP head not closed");
    assert!(
        answer.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // And real visitors were never held up.
    let response = within(20, https_get(proxy.https, HOST, pki.ca.root_store(), "/ok"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_or_hostname_outside_the_policy_binds_nothing_and_says_why() {
    init();
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let authorized_key = shroud_mux::auth::SecretKey::generate().unwrap();
    let policy = authorize("other.test", &authorized_key);
    let proxy = TestProxy::start(&pki, PROXY, &policy).await.unwrap();

    // The client waits to ask again (the proxy may authorize it later), saying why.
    async fn refused_reason(mut client: TestClient) -> String {
        let refused = |s: &TunnelState| matches!(s, TunnelState::Waiting { reason } if reason.contains("not authorized"));
        within(20, client.client.wait_for(0, refused)).await;
        match &client.client.states()[0].1 {
            TunnelState::Waiting { reason } => reason.clone(),
            other => panic!("{other:?}"),
        }
    }

    // Wrong key for the hostname.
    let spec = ClientSpec::new(HOST, origin.addr(), vec![proxy.dial()]);
    let client = TestClient::start(&pki, spec).unwrap();
    let text = refused_reason(client).await;
    assert!(text.contains(HOST), "{text}");

    // The authorized key, but a hostname the policy does not give it.
    let mut spec = ClientSpec::new(HOST, origin.addr(), vec![proxy.dial()]);
    spec.key = shroud_mux::auth::SecretKey::from_seed(&authorized_key.to_seed());
    let client = TestClient::start(&pki, spec).unwrap();
    refused_reason(client).await;

    // Nothing was routed.
    assert!(tls_connect(proxy.https, HOST, pki.ca.root_store())
        .await
        .is_err());
    assert_eq!(origin.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_on_one_proxy_never_cross() {
    init();
    let pki = Pki::new().unwrap();
    let origin_a = HttpOrigin::tls(pki.origin_tls(&["a.test"])).await.unwrap();
    let origin_b = HttpOrigin::tls(pki.origin_tls(&["b.test"])).await.unwrap();
    let mut spec_a = ClientSpec::new("a.test", origin_a.addr(), vec![]);
    let mut spec_b = ClientSpec::new("b.test", origin_b.addr(), vec![]);
    let policy = authorize("a.test", &spec_a.key) + &authorize("b.test", &spec_b.key);
    let proxy = TestProxy::start(&pki, PROXY, &policy).await.unwrap();
    spec_a.proxies = vec![proxy.dial()];
    spec_b.proxies = vec![proxy.dial()];
    let mut a = TestClient::start(&pki, spec_a).unwrap();
    let mut b = TestClient::start(&pki, spec_b).unwrap();
    within(20, a.wait_bound(1)).await;
    within(20, b.wait_bound(1)).await;

    for round in 0..10 {
        // Each origin's certificate is only valid for its own name, so a crossed route fails
        // verification.
        let (host, origin) = if round % 2 == 0 {
            ("a.test", &origin_a)
        } else {
            ("b.test", &origin_b)
        };
        let before = origin.accepted();
        let response = within(20, https_get(proxy.https, host, pki.ca.root_store(), "/"))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(origin.accepted(), before + 1);
    }
    assert_eq!(origin_a.accepted(), 5);
    assert_eq!(origin_b.accepted(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfer_arrives_byte_exact_both_ways() {
    init();
    let pki = Pki::new().unwrap();
    let origin = BulkOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let (proxy, _client) = published(&pki, origin.addr()).await;
    let stream = within(20, tls_connect(proxy.https, HOST, pki.ca.root_store()))
        .await
        .unwrap();
    within(300, bulk_transfer(stream, 256 * 1024 * 1024))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_visitor_still_receives_the_whole_response() {
    init();
    let pki = Pki::new().unwrap();
    let origin = EchoOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let (proxy, _client) = published(&pki, origin.addr()).await;

    let mut stream = within(20, tls_connect(proxy.https, HOST, pki.ca.root_store()))
        .await
        .unwrap();
    let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    stream.write_all(&message).await.unwrap();
    // close_notify plus a TCP write shutdown: the visitor has nothing more to say.
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    within(20, stream.read_to_end(&mut echoed)).await.unwrap();
    assert_eq!(echoed.len(), message.len());
    assert!(echoed == message, "echo differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_visitors_all_complete() {
    init();
    let pki = Pki::new().unwrap();
    let origin = EchoOrigin::plain().await.unwrap();
    // All thousand come from 127.0.0.1 at once: more than one address may open by default.
    let limits = Limits {
        max_connections_per_address: 1000,
        ..Limits::default()
    };
    let (proxy, _client) = published_with(&pki, origin.addr(), Some(origin.addr()), limits).await;

    // Plain-HTTP visitors to an echo origin: each sends a request head and a unique payload,
    // half-closes, and must read back exactly what it sent.
    let mut visitors = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let addr = proxy.http;
        visitors.spawn(async move {
            let mut request =
                format!("POST /{i} HTTP/1.1\r\nHost: example.test\r\n\r\n").into_bytes();
            request.extend_from_slice(format!("visitor {i} payload").repeat(50).as_bytes());
            use anyhow::Context as _;
            let mut stream = TcpStream::connect(addr).await.context("connect")?;
            stream.write_all(&request).await.context("write")?;
            stream.shutdown().await.context("shutdown")?;
            let mut echoed = Vec::new();
            stream.read_to_end(&mut echoed).await.context("read")?;
            anyhow::ensure!(echoed == request, "visitor {i}: echo differs");
            anyhow::Ok(())
        });
    }
    let mut done = 0;
    within(120, async {
        while let Some(result) = visitors.join_next().await {
            result.unwrap().unwrap();
            done += 1;
        }
    })
    .await;
    assert_eq!(done, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_never_answers_does_not_freeze_the_tunnel() {
    init();
    let pki = Pki::new().unwrap();
    let silent = SilentOrigin::plain().await.unwrap();
    let answering = HttpOrigin::plain().await.unwrap();
    // TLS visitors go to the silent origin, plain-HTTP visitors to the answering one: both
    // share the one tunnel.
    let (proxy, _client) = published_with(
        &pki,
        silent.addr(),
        Some(answering.addr()),
        Limits::default(),
    )
    .await;

    // 300 visitors whose streams the origin accepts and never answers: more than yamux's 256
    // unacknowledged streams, if the client did not acknowledge each stream at once.
    let hello = client_hello(client_config(rustls::RootCertStore::empty(), &[]), HOST).unwrap();
    let mut stuck = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(proxy.https).await.unwrap();
        stream.write_all(&hello).await.unwrap();
        stuck.push(stream);
    }
    within(60, silent.wait_accepted(300)).await;

    // New streams still open and are served.
    for i in 0..5 {
        let response = within(20, http_get(proxy.http, HOST, &format!("/after/{i}")))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
    }
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_streams_in_flight_finish() {
    init();
    let pki = Pki::new().unwrap();
    let origin = EchoOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let (proxy, client) = published(&pki, origin.addr()).await;

    let mut stream = within(20, tls_connect(proxy.https, HOST, pki.ca.root_store()))
        .await
        .unwrap();
    stream.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    within(20, stream.read_exact(&mut buf)).await.unwrap();

    // SIGTERM's equivalent: the proxy stops accepting and sends go-away...
    let https = proxy.https;
    proxy.begin_shutdown();
    let mut client = client;
    within(20, client.client.wait_for(0, |s| *s != TunnelState::Bound)).await;
    // ...while the stream in flight keeps working until the visitor is done.
    stream.write_all(b"after").await.unwrap();
    let mut buf = [0u8; 5];
    within(20, stream.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"after");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(20, stream.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
    within(20, proxy.shutdown()).await.unwrap();
    // And the listener is gone.
    assert!(TcpStream::connect(https).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_finds_a_silently_dead_tunnel_and_the_client_rebinds() {
    init();
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let mut spec = ClientSpec::new(HOST, origin.addr(), vec![]);
    let limits = Limits {
        tunnel_idle_timeout: Duration::from_secs(4),
        ..Limits::default()
    };
    let proxy = TestProxy::start_with(&pki, PROXY, &authorize(HOST, &spec.key), limits)
        .await
        .unwrap();
    // The client reaches the proxy through a relay that the test can silence.
    let relay = FreezableRelay::start(proxy.https).await.unwrap();
    spec.proxies = vec![(PROXY.to_owned(), relay.addr)];
    spec.timing.keepalive_interval = Duration::from_secs(1);
    let mut client = TestClient::start(&pki, spec).unwrap();
    within(20, client.wait_bound(1)).await;

    relay.freeze_existing(1);
    let frozen_at = std::time::Instant::now();
    within(20, client.client.wait_for(0, |s| *s != TunnelState::Bound)).await;
    let detected = frozen_at.elapsed();
    // Worst case: the ping just before the freeze is answered, the next goes unanswered, and
    // death is declared two intervals after it: three intervals (30 s at the default 10 s),
    // plus scheduling slack on a loaded machine.
    assert!(
        detected <= Duration::from_millis(4_500),
        "took {detected:?}"
    );
    match &client.client.states()[0].1 {
        TunnelState::Waiting { reason } | TunnelState::Failed { reason } => {
            assert!(reason.contains("keepalive"), "{reason}")
        }
        _ => {} // Already reconnecting.
    }
    // A fresh connection through the relay binds again, and once the proxy has dropped the
    // silent tunnel (idle timeout), visitors are served.
    within(20, client.wait_bound(1)).await;
    let pause = Duration::from_millis(200);
    let response = within(
        30,
        https_get_retrying(proxy.https, HOST, pki.ca.root_store(), "/again", pause),
    )
    .await;
    assert_eq!(response.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visitors_are_spread_across_tunnels_bound_to_one_hostname() {
    init();
    let pki = Pki::new().unwrap();
    let config = pki.origin_tls(&[HOST]);
    let first = HttpOrigin::tls(config.clone()).await.unwrap();
    let second = HttpOrigin::tls(config).await.unwrap();
    // The same service run from two machines: two clients, one key, one hostname.
    let key = shroud_mux::auth::SecretKey::generate().unwrap();
    let proxy = TestProxy::start(&pki, PROXY, &authorize(HOST, &key))
        .await
        .unwrap();
    let mut spec_a = ClientSpec::new(HOST, first.addr(), vec![proxy.dial()]);
    spec_a.key = shroud_mux::auth::SecretKey::from_seed(&key.to_seed());
    let mut spec_b = ClientSpec::new(HOST, second.addr(), vec![proxy.dial()]);
    spec_b.key = key;
    let mut a = TestClient::start(&pki, spec_a).unwrap();
    let mut b = TestClient::start(&pki, spec_b).unwrap();
    within(20, a.wait_bound(1)).await;
    within(20, b.wait_bound(1)).await;

    for _ in 0..10 {
        let response = within(20, https_get(proxy.https, HOST, pki.ca.root_store(), "/"))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
    }
    assert_eq!(first.accepted(), 5);
    assert_eq!(second.accepted(), 5);

    // One machine goes away: its binding goes with it and the other takes every visitor.
    drop(a);
    let before = second.accepted();
    for _ in 0..4 {
        // The proxy may route one visitor to the closing tunnel before it notices.
        let pause = Duration::from_millis(50);
        let response = within(
            20,
            https_get_retrying(proxy.https, HOST, pki.ca.root_store(), "/", pause),
        )
        .await;
        assert_eq!(response.status, 200);
    }
    assert_eq!(second.accepted(), before + 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_can_terminate_visitors_tls_for_a_plain_origin() {
    init();
    let pki = Pki::new().unwrap();
    let plain = HttpOrigin::plain().await.unwrap();
    let mut spec = ClientSpec::new(HOST, plain.addr(), vec![]);
    let proxy = TestProxy::start(&pki, PROXY, &authorize(HOST, &spec.key))
        .await
        .unwrap();
    spec.proxies = vec![proxy.dial()];
    let (cert, key) = pki.issue_files(HOST).unwrap();
    spec.origin_tls = Some(
        shroud_client::tls::origin_server_config(&cert, &key)
            .unwrap()
            .into(),
    );
    let mut client = TestClient::start(&pki, spec).unwrap();
    within(20, client.wait_bound(1)).await;

    let response = within(
        20,
        https_get(proxy.https, HOST, pki.ca.root_store(), "/tls-here"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "hello from origin: GET /tls-here\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_may_use_a_dedicated_tunnel_listener() {
    init();
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let mut spec = ClientSpec::new(HOST, origin.addr(), vec![]);
    let proxy = TestProxy::start(&pki, PROXY, &authorize(HOST, &spec.key))
        .await
        .unwrap();
    spec.proxies = vec![(PROXY.to_owned(), proxy.tunnel)];
    let mut client = TestClient::start(&pki, spec).unwrap();
    within(20, client.wait_bound(1)).await;
    let response = within(20, https_get(proxy.https, HOST, pki.ca.root_store(), "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);

    // A visitor on the tunnel-only listener is not routed anywhere.
    assert!(tls_connect(proxy.tunnel, HOST, pki.ca.root_store())
        .await
        .is_err());
}
