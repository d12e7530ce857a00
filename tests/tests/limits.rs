//! The proxy's limits, as visitors and clients meet them: each refuses new work early with a
//! clear answer (an HTTP status, a TLS alert, a bind refusal naming the limit), spares the
//! work it does not concern, and lets new work in again once the old is gone.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use rustls::RootCertStore;
use shroud_client::shared::TunnelState;
use shroud_mux::auth::SecretKey;
use shroud_proxy::shared::Limits;
use shroud_tests::scale::{connect_from, https_get_from};
use shroud_tests::stack::{ClientSpec, Pki, ProxyProcess, TestClient, TestProxy};
use shroud_tests::{
    bulk_transfer, client_config, http_exchange, http_get, https_get, https_get_retrying, init,
    tls_connect, within, BulkOrigin, HttpOrigin, HttpResponse,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const HOST: &str = "example.test";
const OTHER: &str = "other.test";
const PROXY: &str = "proxy.test";
/// A second loopback address: on Linux all of 127.0.0.0/8 is the loopback interface.
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Limits for tests that hold connections open without sending anything: generous read
/// deadlines, so only the limit under test closes them, and no waiting for unbound names.
fn patient(limits: Limits) -> Limits {
    Limits {
        client_hello_timeout: Duration::from_secs(60),
        http_head_timeout: Duration::from_secs(60),
        route_wait: Duration::ZERO,
        ..limits
    }
}

/// The authorized-file text that lets `key` bind every name in `names`.
fn authorized(key: &SecretKey, names: &[&str]) -> String {
    names
        .iter()
        .map(|name| format!("{name} {}\n", key.public()))
        .collect()
}

/// A copy of `key`, for another client of the same service.
fn same(key: &SecretKey) -> SecretKey {
    SecretKey::from_seed(&key.to_seed())
}

/// Starts a client publishing `hostname` through `proxy` with `key`, without waiting for it.
fn client(
    pki: &Pki,
    proxy: &TestProxy,
    hostname: &str,
    key: SecretKey,
    target: SocketAddr,
    http_target: Option<SocketAddr>,
) -> TestClient {
    let mut spec = ClientSpec::new(hostname, target, vec![proxy.dial()]);
    spec.key = key;
    spec.http_target = http_target;
    TestClient::start(pki, spec).unwrap()
}

/// An HTTPS origin for both test names, and a plain-HTTP one.
async fn origins(pki: &Pki) -> (HttpOrigin, HttpOrigin) {
    let config = pki.origin_tls(&[HOST, OTHER]);
    (
        HttpOrigin::tls(config).await.unwrap(),
        HttpOrigin::plain().await.unwrap(),
    )
}

/// A proxy with its limits, publishing HOST and OTHER, each through a client of its own (one
/// key) that is bound; HOST's client also forwards plain HTTP.
struct TwoNames {
    host: TestClient,
    _other: TestClient,
    proxy: TestProxy,
    _origins: (HttpOrigin, HttpOrigin),
    pki: Pki,
}

/// Starts [`TwoNames`] with `limits`.
async fn two_names(limits: Limits) -> TwoNames {
    let pki = Pki::new().unwrap();
    let (tls_origin, http_origin) = origins(&pki).await;
    let key = SecretKey::generate().unwrap();
    let proxy = TestProxy::start_with(&pki, PROXY, &authorized(&key, &[HOST, OTHER]), limits)
        .await
        .unwrap();
    let mut host = client(
        &pki,
        &proxy,
        HOST,
        same(&key),
        tls_origin.addr(),
        Some(http_origin.addr()),
    );
    let mut other = client(&pki, &proxy, OTHER, key, tls_origin.addr(), None);
    within(20, host.wait_bound(1)).await;
    within(20, other.wait_bound(1)).await;
    TwoNames {
        host,
        _other: other,
        proxy,
        _origins: (tls_origin, http_origin),
        pki,
    }
}

/// `n` TLS visitors of `sni` that hold their connections open, each handshake with the
/// origin done.
async fn hold_visitors(
    addr: SocketAddr,
    sni: &str,
    roots: &RootCertStore,
    n: usize,
) -> Vec<TlsStream<TcpStream>> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(
            within(20, tls_connect(addr, sni, roots.clone()))
                .await
                .unwrap(),
        );
    }
    held
}

/// `GET /` over plain HTTP from `source`.
async fn http_get_from(
    source: IpAddr,
    addr: SocketAddr,
    host: &str,
) -> anyhow::Result<HttpResponse> {
    let tcp = connect_from(source, addr).await?;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    http_exchange(tcp, request.as_bytes()).await
}

/// Asserts that the proxy closes `stream` within `secs`, shorter than its read deadlines,
/// without waiting for the visitor to say anything: it refused the connection before reading.
async fn assert_closed_unread(mut stream: TcpStream, secs: u64) {
    let mut sink = Vec::new();
    let read = within(secs, stream.read_to_end(&mut sink)).await;
    assert!(
        read.is_err() || sink.is_empty(),
        "the proxy answered {sink:?}"
    );
}

/// Asserts that a TLS handshake for `sni` fails with the proxy's `internal_error` alert.
async fn assert_tls_refused_with_alert(addr: SocketAddr, sni: &str, roots: RootCertStore) {
    let err = within(20, tls_connect(addr, sni, roots))
        .await
        .expect_err("the handshake must fail");
    let text = format!("{err:#}");
    assert!(text.contains("InternalError"), "{text}");
}

/// Asserts that the next visitor of HOST is turned away: over TLS with the proxy's
/// `internal_error` alert, over plain HTTP with a 503 that says `why`. Returns the 503.
async fn assert_turned_away(proxy: &TestProxy, roots: &RootCertStore, why: &str) -> HttpResponse {
    assert_tls_refused_with_alert(proxy.https, HOST, roots.clone()).await;
    let response = within(20, http_get(proxy.http, HOST, "/")).await.unwrap();
    assert_eq!(response.status, 503);
    assert!(
        response.body_text().contains(why),
        "{}",
        response.body_text()
    );
    response
}

/// Retries `GET /` for `sni` until it is answered, as a visitor would after a refusal, and
/// asserts that it was served.
async fn served_again(addr: SocketAddr, sni: &str, roots: RootCertStore) {
    let pause = Duration::from_millis(100);
    let response = within(20, https_get_retrying(addr, sni, roots, "/", pause)).await;
    assert_eq!(response.status, 200);
}

/// Waits until the client's one tunnel has been refused with a reason containing `needle`,
/// and returns that reason.
async fn refusal(client: &mut TestClient, needle: &str) -> String {
    within(
        20,
        client.client.wait_for(
            0,
            |state| matches!(state, TunnelState::Waiting { reason } if reason.contains(needle)),
        ),
    )
    .await;
    match &client.client.states()[0].1 {
        TunnelState::Waiting { reason } => reason.clone(),
        // Between two attempts the state is Connecting; the reason was seen above.
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_turn_away_one_address_and_spare_the_others() {
    init();
    let pki = Pki::new().unwrap();
    let (tls_origin, http_origin) = origins(&pki).await;
    let key = SecretKey::generate().unwrap();
    let limits = patient(Limits {
        max_connections_per_address: 3,
        ..Limits::default()
    });
    let proxy = TestProxy::start_with(&pki, PROXY, &authorized(&key, &[HOST]), limits)
        .await
        .unwrap();
    let mut publisher = client(
        &pki,
        &proxy,
        HOST,
        key,
        tls_origin.addr(),
        Some(http_origin.addr()),
    );
    within(20, publisher.wait_bound(1)).await;
    let roots = pki.ca.root_store();

    // Two silent connections from 127.0.0.1, and a visitor who holds its connection to the
    // origin open: three, the limit. The client's tunnel also came from 127.0.0.1, but a
    // bound tunnel no longer counts, or the visitor would not have got through.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(proxy.https).await.unwrap());
    }
    let visitor = within(20, tls_connect(proxy.https, HOST, roots.clone()))
        .await
        .unwrap();

    // The address is full. The HTTPS listener takes connections in order, so the next one is
    // judged after the others are counted: it is closed before the proxy reads a byte.
    assert_closed_unread(TcpStream::connect(proxy.https).await.unwrap(), 10).await;
    let refused = within(20, https_get(proxy.https, HOST, roots.clone(), "/")).await;
    assert!(refused.is_err(), "a TLS visitor over the limit is closed");
    // Plain HTTP is told why.
    let response = within(20, http_get(proxy.http, HOST, "/")).await.unwrap();
    assert_eq!(response.status, 429);
    assert_eq!(response.header("retry-after"), Some("5"));
    assert!(response.body_text().contains("too many connections"));

    // Visitors from another address are served all along, over TLS and plain HTTP.
    let response = within(
        20,
        https_get_from(
            ELSEWHERE,
            proxy.https,
            HOST,
            client_config(roots.clone(), &[]),
            "/",
        ),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "hello from origin: GET /\n");
    let response = within(20, http_get_from(ELSEWHERE, proxy.http, HOST))
        .await
        .unwrap();
    assert_eq!(response.status, 200);

    // Once the others close, 127.0.0.1 is served again.
    drop((silent, visitor));
    served_again(proxy.https, HOST, roots).await;
    let response = within(20, http_get(proxy.http, HOST, "/")).await.unwrap();
    assert_eq!(response.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_hostname_turn_away_that_name_only() {
    init();
    let net = two_names(patient(Limits {
        max_connections_per_hostname: 2,
        ..Limits::default()
    }))
    .await;
    let (proxy, roots) = (&net.proxy, net.pki.ca.root_store());

    // Two visitors of HOST hold their connections open (the handshake with the origin done:
    // they are spliced, so counted).
    let held = hold_visitors(proxy.https, HOST, &roots, 2).await;

    // A third: TLS visitors get a fatal internal_error alert, plain-HTTP ones a 503.
    let response = assert_turned_away(proxy, &roots, "too many visitors").await;
    assert_eq!(response.header("retry-after"), Some("5"));
    assert!(!response.body_text().contains(PROXY));

    // Another name on the same proxy is untouched.
    for _ in 0..3 {
        let response = within(20, https_get(proxy.https, OTHER, roots.clone(), "/"))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
    }

    // Visitors of HOST that leave make room.
    drop(held);
    served_again(proxy.https, HOST, roots).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_tunnel_turn_visitors_away_with_a_clear_answer() {
    init();
    // The control stream counts: two visitor streams per tunnel.
    let net = two_names(patient(Limits {
        max_streams_per_tunnel: 3,
        ..Limits::default()
    }))
    .await;
    let (proxy, roots) = (&net.proxy, net.pki.ca.root_store());

    let held = hold_visitors(proxy.https, HOST, &roots, 2).await;
    assert_turned_away(proxy, &roots, "too many connections open").await;

    // The other tunnel has streams to spare; the full one keeps what it holds, and the
    // tunnel itself stays up.
    let response = within(20, https_get(proxy.https, OTHER, roots.clone(), "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(net.host.client.states()[0].1, TunnelState::Bound);

    drop(held);
    served_again(proxy.https, HOST, roots).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_per_key_refuse_the_next_tunnel_until_one_closes() {
    init();
    let pki = Pki::new().unwrap();
    let (tls_origin, _) = origins(&pki).await;
    let key = SecretKey::generate().unwrap();
    let limits = Limits {
        max_tunnels_per_key: 2,
        ..Limits::default()
    };
    let proxy = TestProxy::start_with(&pki, PROXY, &authorized(&key, &[HOST]), limits)
        .await
        .unwrap();
    let mut first = client(&pki, &proxy, HOST, same(&key), tls_origin.addr(), None);
    let mut second = client(&pki, &proxy, HOST, same(&key), tls_origin.addr(), None);
    within(20, first.wait_bound(1)).await;
    within(20, second.wait_bound(1)).await;

    // The third tunnel of the key is refused, and its client says which limit and keeps
    // trying (it waits; it has not given up).
    let mut third = client(&pki, &proxy, HOST, key, tls_origin.addr(), None);
    let reason = refusal(&mut third, "--max-tunnels-per-key").await;
    assert!(reason.contains("(2, --max-tunnels-per-key)"), "{reason}");
    assert!(reason.contains(HOST), "{reason}");

    // The first two serve all along.
    let roots = pki.ca.root_store();
    for _ in 0..4 {
        let response = within(20, https_get(proxy.https, HOST, roots.clone(), "/"))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
    }
    assert_eq!(first.client.states()[0].1, TunnelState::Bound);
    assert_eq!(second.client.states()[0].1, TunnelState::Bound);

    // When one closes, the third gets in on its next attempt.
    drop(first);
    within(20, third.wait_bound(1)).await;
    served_again(proxy.https, HOST, roots).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostnames_per_key_count_distinct_names_over_the_keys_tunnels() {
    init();
    let pki = Pki::new().unwrap();
    let (tls_origin, _) = origins(&pki).await;
    let key = SecretKey::generate().unwrap();
    let limits = patient(Limits {
        max_hostnames_per_key: 1,
        ..Limits::default()
    });
    let proxy = TestProxy::start_with(&pki, PROXY, &authorized(&key, &[HOST, OTHER]), limits)
        .await
        .unwrap();
    let mut host = client(&pki, &proxy, HOST, same(&key), tls_origin.addr(), None);
    within(20, host.wait_bound(1)).await;

    // A second name for the key is one too many, though the policy allows it.
    let mut other = client(&pki, &proxy, OTHER, same(&key), tls_origin.addr(), None);
    let reason = refusal(&mut other, "--max-hostnames-per-key").await;
    assert!(reason.contains("(1, --max-hostnames-per-key)"), "{reason}");

    // The same name again costs nothing: a second machine serving HOST binds.
    let mut host_again = client(&pki, &proxy, HOST, key, tls_origin.addr(), None);
    within(20, host_again.wait_bound(1)).await;
    let roots = pki.ca.root_store();
    let response = within(20, https_get(proxy.https, HOST, roots.clone(), "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert!(!matches!(other.client.states()[0].1, TunnelState::Bound));

    // Once no tunnel holds HOST, the waiting client binds OTHER.
    drop(host);
    drop(host_again);
    within(20, other.wait_bound(1)).await;
    served_again(proxy.https, OTHER, roots).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_proxy_closes_new_connections_before_reading_them() {
    init();
    let pki = Pki::new().unwrap();
    let (tls_origin, _) = origins(&pki).await;
    let key = SecretKey::generate().unwrap();
    // The tunnel holds one connection, and one silent visitor the other.
    let limits = patient(Limits {
        max_connections: 2,
        ..Limits::default()
    });
    let proxy = TestProxy::start_with(&pki, PROXY, &authorized(&key, &[HOST]), limits)
        .await
        .unwrap();
    let mut publisher = client(&pki, &proxy, HOST, key, tls_origin.addr(), None);
    within(20, publisher.wait_bound(1)).await;

    let silent = TcpStream::connect(proxy.https).await.unwrap();
    assert_closed_unread(TcpStream::connect(proxy.https).await.unwrap(), 10).await;
    // Other addresses too: this limit is the proxy's own.
    assert_closed_unread(connect_from(ELSEWHERE, proxy.https).await.unwrap(), 10).await;
    // The tunnel is unharmed, and visitors get in once there is room.
    assert_eq!(publisher.client.states()[0].1, TunnelState::Bound);
    drop(silent);
    served_again(proxy.https, HOST, pki.ca.root_store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn larger_stream_buffers_carry_bulk_data_byte_exact() {
    init();
    let pki = Pki::new().unwrap();
    let origin = BulkOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key = SecretKey::generate().unwrap();
    let limits = Limits {
        stream_buffer: 1024 * 1024,
        ..Limits::default()
    };
    let proxy = TestProxy::start_with(&pki, PROXY, &authorized(&key, &[HOST]), limits)
        .await
        .unwrap();
    let mut spec = ClientSpec::new(HOST, origin.addr(), vec![proxy.dial()]);
    spec.key = key;
    spec.timing.stream_buffer = shroud_mux::session::MAX_STREAM_BUFFER;
    let mut publisher = TestClient::start(&pki, spec).unwrap();
    within(20, publisher.wait_bound(1)).await;
    // Several at once, so windows compete for the session's pool.
    let mut transfers = Vec::new();
    for _ in 0..3 {
        let stream = within(20, tls_connect(proxy.https, HOST, pki.ca.root_store()))
            .await
            .unwrap();
        transfers.push(tokio::spawn(bulk_transfer(stream, 16 * 1024 * 1024)));
    }
    for transfer in transfers {
        within(120, transfer).await.unwrap().unwrap();
    }
}

/// The real binary: the flags reach the limits, and the refusal reaches the operator's log
/// and the client's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_binary_applies_its_limit_flags() {
    init();
    let pki = Pki::new().unwrap();
    let (tls_origin, _) = origins(&pki).await;
    let key = SecretKey::generate().unwrap();
    let any_port: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let extra: Vec<String> = [
        "--max-tunnels-per-key=1",
        "--max-connections-per-address=2",
        "--stream-buffer-bytes=524288",
    ]
    .map(String::from)
    .to_vec();
    let mut proxy =
        ProxyProcess::start_with_args(&pki, PROXY, &authorized(&key, &[HOST]), any_port, &extra)
            .await
            .unwrap();
    let dial = vec![(PROXY.to_owned(), proxy.https)];
    let mut spec = ClientSpec::new(HOST, tls_origin.addr(), dial.clone());
    spec.key = same(&key);
    let mut first = TestClient::start(&pki, spec).unwrap();
    within(20, first.wait_bound(1)).await;

    // Two connections from this address at once: a silent one and a visitor get in; the next
    // is closed unread, well before the proxy's 5 s deadline for a ClientHello.
    let roots = pki.ca.root_store();
    let silent = TcpStream::connect(proxy.https).await.unwrap();
    let visitor = within(20, tls_connect(proxy.https, HOST, roots.clone()))
        .await
        .unwrap();
    assert_closed_unread(TcpStream::connect(proxy.https).await.unwrap(), 3).await;
    drop((silent, visitor));
    served_again(proxy.https, HOST, roots).await;

    // A second tunnel of the key is refused, and both the client and the operator see why.
    let mut spec = ClientSpec::new(HOST, tls_origin.addr(), dial);
    spec.key = key;
    let mut second = TestClient::start(&pki, spec).unwrap();
    let reason = refusal(&mut second, "--max-tunnels-per-key").await;
    assert!(reason.contains("(1, --max-tunnels-per-key)"), "{reason}");
    proxy
        .process
        .wait_for_line("LimitReached", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(first.client.states()[0].1, TunnelState::Bound);
}
