//! `--metrics-listen`: the real binaries' metrics scraped and parsed (strictly, as
//! OpenMetrics) after traffic whose every connection and byte the test knows, and their
//! `/readyz` flipping as tunnels and listeners come and go.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use shroud_tests::metrics::{self, Exposition};
use shroud_tests::process::Process;
use shroud_tests::stack::{binary, direct_client_args, log_addr, make_key, Pki, ProxyProcess};
use shroud_tests::{init, tls_connect, within, EchoOrigin, HttpOrigin};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const HOST: &str = "example.test";
const PROXY: &str = "proxy.test";
const ANY: &str = "127.0.0.1:0";

/// How long a value may take to reach what a test expects: counts settle a moment after the
/// traffic that made them.
const SETTLE: Duration = Duration::from_secs(10);

/// A proxy process with an HTTP listener and its metrics endpoint, authorizing `policy`.
struct Proxy {
    process: ProxyProcess,
    http: SocketAddr,
    metrics: SocketAddr,
}

impl Proxy {
    async fn start(pki: &Pki, policy: &str, extra: &[&str]) -> Self {
        let mut args: Vec<String> = ["--listen-http", ANY, "--metrics-listen", ANY]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut process =
            ProxyProcess::start_with_args(pki, PROXY, policy, ANY.parse().unwrap(), &args)
                .await
                .unwrap();
        let line = process
            .process
            .wait_for_line("listener=\"http\"", Duration::from_secs(20))
            .await
            .unwrap();
        let http = log_addr(&line).unwrap();
        let metrics = metrics::endpoint(&mut process.process, Duration::from_secs(20))
            .await
            .unwrap();
        Self {
            process,
            http,
            metrics,
        }
    }

    async fn scrape(&self) -> Exposition {
        metrics::scrape(self.metrics).await.unwrap()
    }

    async fn wait_for(&self, what: &str, check: impl Fn(&Exposition) -> bool) -> Exposition {
        metrics::wait_for(self.metrics, SETTLE, what, check)
            .await
            .unwrap()
    }
}

fn connections(e: &Exposition, listener: &str, outcome: &str) -> f64 {
    e.value(
        "shroud_proxy_connections_total",
        &[("listener", listener), ("outcome", outcome)],
    )
}

/// Starts a `shroud` client publishing HOST through `proxy`, with `extra` arguments.
fn client(
    pki: &Pki,
    key: &std::path::Path,
    target: SocketAddr,
    proxy: &Proxy,
    extra: &[String],
) -> Process {
    let mut args = direct_client_args(pki, key, HOST, target, &[(PROXY, proxy.process.https)]);
    args.extend_from_slice(extra);
    Process::spawn(&binary("shroud"), &args).unwrap()
}

/// Sends `head` and `len` bytes of payload on a plain-HTTP connection to the echo origin,
/// half-closes, and checks every byte comes back; returns how many bytes went each way.
async fn echo_over_http(addr: SocketAddr, len: usize) -> u64 {
    let head = format!("POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len}\r\n\r\n");
    let mut sent = head.into_bytes();
    sent.extend((0..len).map(|i| (i * 7 % 251) as u8));
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&sent).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert!(back == sent, "the echo came back altered");
    sent.len() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_counts_every_connection_byte_and_bind_exactly() {
    init();
    let pki = Pki::new().unwrap();
    let key_path = pki.dir().join("client.key");
    let stranger_path = pki.dir().join("stranger.key");
    let key = make_key(&key_path).unwrap();
    make_key(&stranger_path).unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let echo = EchoOrigin::plain().await.unwrap();
    let proxy = Proxy::start(
        &pki,
        &format!("{HOST} {key}\n"),
        &["--max-connections-per-hostname", "2"],
    )
    .await;
    let roots = pki.ca.root_store();

    // A visitor that never finishes its ClientHello: cut off after 5 s, counted then.
    let mut stalled = TcpStream::connect(proxy.process.https).await.unwrap();
    stalled.write_all(&[0x16, 0x03]).await.unwrap();

    // Listening: ready, alive, nothing counted yet.
    metrics::wait_for_status(proxy.metrics, "/readyz", 200, SETTLE)
        .await
        .unwrap();
    assert_eq!(
        metrics::status(proxy.metrics, "/healthz").await.unwrap().0,
        200
    );
    let start = proxy.scrape().await;
    assert_eq!(start.get("shroud_proxy_tunnels", &[]), Some(0.0));
    assert_eq!(start.get("shroud_proxy_bound_hostnames", &[]), Some(0.0));
    assert_eq!(start.get("shroud_proxy_draining", &[]), Some(0.0));
    assert_eq!(start.sum("shroud_proxy_connections_total", &[]), 0.0);
    assert_eq!(
        start.get("shroud_proxy_build_info", &[("version", "0.1.0")]),
        Some(1.0)
    );
    assert!(start.get("shroud_proxy_start_time_seconds", &[]).unwrap() > 1.7e9);
    assert_eq!(
        start.families["shroud_proxy_stream_open_seconds"].kind,
        "histogram"
    );

    // A client whose key the proxy does not authorize is refused, and gives up.
    let mut stranger = client(&pki, &stranger_path, origin.addr(), &proxy, &[]);
    let status = within(30, stranger.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(1));
    // The real client, with plain HTTP going to the echo origin.
    let http_target = ["--http-target".to_owned(), echo.addr().to_string()];
    let mut shroud = client(&pki, &key_path, origin.addr(), &proxy, &http_target);
    let bound = proxy
        .wait_for("the tunnel bound", |e| {
            e.value("shroud_proxy_tunnels", &[]) == 1.0
        })
        .await;
    assert_eq!(bound.value("shroud_proxy_bound_hostnames", &[]), 1.0);
    let handshake = |result| {
        bound.value(
            "shroud_proxy_tunnel_handshakes_total",
            &[("result", result)],
        )
    };
    assert_eq!(
        (
            handshake("bound"),
            handshake("refused"),
            handshake("failed")
        ),
        (1.0, 1.0, 0.0)
    );
    let bind = |status| bound.value("shroud_proxy_bind_results_total", &[("status", status)]);
    assert_eq!((bind("bound"), bind("not_authorized")), (1.0, 1.0));
    assert_eq!(bound.sum("shroud_proxy_bind_results_total", &[]), 2.0);
    assert_eq!(connections(&bound, "https", "tunnel"), 2.0);

    // Five HTTPS visitors routed, three for a name nobody publishes.
    for _ in 0..5 {
        let response = within(
            20,
            shroud_tests::https_get(proxy.process.https, HOST, roots.clone(), "/"),
        )
        .await
        .unwrap();
        assert_eq!(response.status, 200);
    }
    for _ in 0..3 {
        let refused = within(
            20,
            tls_connect(proxy.process.https, "unknown.test", roots.clone()),
        )
        .await;
        assert!(refused.is_err(), "a name nobody publishes was served");
    }
    // Plain HTTP for an unknown name, a malformed head, and plain HTTP on the TLS port.
    let response = within(20, shroud_tests::http_get(proxy.http, "unknown.test", "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 404);
    let response = within(20, shroud_tests::raw_http(proxy.http, b"NONSENSE\r\n\r\n"))
        .await
        .unwrap();
    assert_eq!(response.status, 400);
    let mut not_tls = TcpStream::connect(proxy.process.https).await.unwrap();
    not_tls
        .write_all(b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = within(10, not_tls.read_to_end(&mut sink)).await;

    // Two visitors held open fill the name's limit of 2; a third is refused.
    proxy
        .wait_for("the visitors so far gone", |e| {
            e.value("shroud_proxy_open_connections", &[]) <= 2.0
        })
        .await;
    let held_a = within(20, tls_connect(proxy.process.https, HOST, roots.clone()))
        .await
        .unwrap();
    let held_b = within(20, tls_connect(proxy.process.https, HOST, roots.clone()))
        .await
        .unwrap();
    let refused = within(20, tls_connect(proxy.process.https, HOST, roots.clone())).await;
    assert!(
        refused.is_err(),
        "a visitor over the hostname limit was served"
    );
    drop((held_a, held_b));

    // Bytes: two echo exchanges over plain HTTP, counted to the byte both ways.
    let quiet = proxy
        .wait_for("only the tunnel and the stalled visitor left", |e| {
            e.value("shroud_proxy_open_connections", &[]) <= 2.0
                && e.value("shroud_proxy_stream_open_seconds_count", &[]) == 7.0
        })
        .await;
    let local = |e: &Exposition, direction| {
        e.value(
            "shroud_proxy_visitor_bytes_total",
            &[("path", "local"), ("direction", direction)],
        )
    };
    let by_host = |e: &Exposition, direction| {
        e.value(
            "shroud_proxy_hostname_bytes_total",
            &[("hostname", HOST), ("direction", direction)],
        )
    };
    let before = [
        local(&quiet, "to_origin"),
        local(&quiet, "to_visitor"),
        by_host(&quiet, "to_origin"),
        by_host(&quiet, "to_visitor"),
    ];
    // The TLS visitors moved bytes too, counted under their name as well.
    assert!(before[0] > 0.0 && before[1] > 0.0);
    assert_eq!((before[0], before[1]), (before[2], before[3]));
    let mut moved = 0;
    for len in [100_000, 1] {
        moved += within(20, echo_over_http(proxy.http, len)).await;
    }
    let moved = moved as f64;
    let after = proxy
        .wait_for("every byte counted", |e| {
            local(e, "to_origin") == before[0] + moved
                && local(e, "to_visitor") == before[1] + moved
        })
        .await;
    assert_eq!(by_host(&after, "to_origin"), before[2] + moved);
    assert_eq!(by_host(&after, "to_visitor"), before[3] + moved);
    let forwarded = after.sum(
        "shroud_proxy_visitor_bytes_total",
        &[("path", "forwarded_out")],
    ) + after.sum(
        "shroud_proxy_visitor_bytes_total",
        &[("path", "forwarded_in")],
    );
    assert_eq!(forwarded, 0.0);

    // Every connection, by listener and outcome, once the stalled visitor is cut off.
    let done = proxy
        .wait_for("the stalled visitor cut off", |e| {
            connections(e, "https", "sniff_timeout") == 1.0
        })
        .await;
    drop(stalled);
    let expected_https = [
        ("tunnel", 2.0),
        ("routed", 7.0),
        ("unknown_name", 3.0),
        ("malformed", 1.0),
        ("refused_per_hostname", 1.0),
        ("sniff_timeout", 1.0),
    ];
    for (outcome, count) in expected_https {
        assert_eq!(
            connections(&done, "https", outcome),
            count,
            "https {outcome}"
        );
    }
    let https_total: f64 = expected_https.iter().map(|(_, n)| n).sum();
    assert_eq!(
        done.sum("shroud_proxy_connections_total", &[("listener", "https")]),
        https_total
    );
    let expected_http = [("routed", 2.0), ("unknown_name", 1.0), ("malformed", 1.0)];
    for (outcome, count) in expected_http {
        assert_eq!(connections(&done, "http", outcome), count, "http {outcome}");
    }
    assert_eq!(
        done.sum("shroud_proxy_connections_total", &[("listener", "http")]),
        4.0
    );
    assert_eq!(
        done.sum("shroud_proxy_connections_total", &[("listener", "tunnel")]),
        0.0
    );
    // Each routed visitor had its stream opened once, and counted under its name.
    assert_eq!(
        done.value("shroud_proxy_stream_open_seconds_count", &[]),
        9.0
    );
    assert!(done.value("shroud_proxy_stream_open_seconds_sum", &[]) > 0.0);
    assert_eq!(
        done.value(
            "shroud_proxy_hostname_visitors_total",
            &[("hostname", HOST)]
        ),
        9.0
    );
    let limit = |name| done.value("shroud_proxy_limit_refusals_total", &[("limit", name)]);
    assert_eq!(limit("max-connections-per-hostname"), 1.0);
    assert_eq!(done.sum("shroud_proxy_limit_refusals_total", &[]), 1.0);
    // No label anywhere holds an address.
    for sample in &done.samples {
        for value in sample.labels.values() {
            assert!(!value.contains("127.0.0.1"), "{sample:?}");
        }
    }

    // The client gone: no tunnel, no bound name, and the name's series gone with it.
    shroud.kill();
    let gone = proxy
        .wait_for("the tunnel gone", |e| {
            e.value("shroud_proxy_tunnels", &[]) == 0.0
        })
        .await;
    assert_eq!(gone.value("shroud_proxy_bound_hostnames", &[]), 0.0);
    assert!(
        gone.samples
            .iter()
            .all(|s| s.labels.get("hostname").map(String::as_str) != Some(HOST)),
        "the unbound name's series stayed"
    );
    // Counters stay.
    assert_eq!(connections(&gone, "https", "routed"), 7.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_says_draining_while_it_drains() {
    init();
    let pki = Pki::new().unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let mut proxy = Proxy::start(&pki, &format!("{HOST} {key}\n"), &[]).await;
    let _shroud = client(&pki, &key_path, origin.addr(), &proxy, &[]);
    proxy
        .wait_for("the tunnel bound", |e| {
            e.value("shroud_proxy_tunnels", &[]) == 1.0
        })
        .await;
    assert_eq!(
        metrics::status(proxy.metrics, "/readyz").await.unwrap(),
        (200, "ready\n".to_owned())
    );
    // A visitor held open keeps the drain going (up to the harness's 5 s).
    let held = within(
        20,
        tls_connect(proxy.process.https, HOST, pki.ca.root_store()),
    )
    .await
    .unwrap();
    proxy.process.process.terminate();
    let body = metrics::wait_for_status(proxy.metrics, "/readyz", 503, SETTLE)
        .await
        .unwrap();
    assert_eq!(body, "not ready: draining\n");
    let draining = proxy.scrape().await;
    assert_eq!(draining.value("shroud_proxy_draining", &[]), 1.0);
    // Alive all the same.
    assert_eq!(
        metrics::status(proxy.metrics, "/healthz").await.unwrap().0,
        200
    );
    drop(held);
    let status = proxy
        .process
        .process
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    // The endpoint went with the process.
    assert!(TcpStream::connect(proxy.metrics).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_address_that_cannot_be_bound_stops_the_proxy_naming_the_flag() {
    init();
    let pki = Pki::new().unwrap();
    let taken = std::net::TcpListener::bind(ANY).unwrap();
    let addr = taken.local_addr().unwrap();
    let mut args = vec!["--listen-https".to_owned(), ANY.to_owned()];
    args.extend(shroud_tests::stack::proxy_args(&pki, PROXY, "").unwrap());
    args.extend(["--metrics-listen".to_owned(), addr.to_string()]);
    let mut proxy = Process::spawn(&binary("shroud-proxy"), &args).unwrap();
    let status = proxy.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert_eq!(status.code(), Some(1));
    let log = proxy.output_text();
    assert!(log.contains(&format!("--metrics-listen {addr}")), "{log}");
}
