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
    assert!(
        back == sent,
        "the echo came back altered: {} bytes, starting {:?}",
        back.len(),
        String::from_utf8_lossy(&back[..back.len().min(200)])
    );
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

    // A client whose key the proxy does not authorize is refused; it would ask again only
    // after --refused-retry-secs (or a SIGHUP), so one refusal is all the proxy sees.
    let mut stranger = client(&pki, &stranger_path, origin.addr(), &proxy, &[]);
    proxy
        .wait_for("the stranger refused", |e| {
            e.value(
                "shroud_proxy_bind_results_total",
                &[("status", "not_authorized")],
            ) == 1.0
        })
        .await;
    stranger.kill();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_is_ready_only_while_a_tunnel_is_bound() {
    init();
    let pki = Pki::new().unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let roots = pki.ca.root_store();
    // One proxy, not up yet; another that refuses this key for good.
    let one_addr = SocketAddr::from(([127, 0, 0, 1], shroud_tests::ports::free_port().unwrap()));
    let other = shroud_mux::auth::SecretKey::generate().unwrap();
    let refusing = ProxyProcess::start(
        &pki,
        "two.proxy.test",
        &format!("{HOST} {}\n", other.public()),
        ANY.parse().unwrap(),
    )
    .await
    .unwrap();
    // Plain HTTP goes to a port where nothing listens.
    let dead = SocketAddr::from(([127, 0, 0, 1], shroud_tests::ports::free_port().unwrap()));
    let mut args = direct_client_args(
        &pki,
        &key_path,
        HOST,
        origin.addr(),
        &[
            ("one.proxy.test", one_addr),
            ("two.proxy.test", refusing.https),
        ],
    );
    args.extend(["--http-target", &dead.to_string(), "--metrics-listen", ANY].map(String::from));
    let mut shroud = Process::spawn(&binary("shroud"), &args).unwrap();
    let endpoint = metrics::endpoint(&mut shroud, Duration::from_secs(20))
        .await
        .unwrap();
    let one = format!("one.proxy.test:{}", one_addr.port());
    let two = format!("two.proxy.test:{}", refusing.https.port());
    let state = |e: &Exposition, proxy: &str, state: &str| {
        e.value(
            "shroud_client_tunnels",
            &[("proxy", proxy), ("state", state)],
        )
    };

    // No tunnel bound: not ready, and why.
    // Refused by policy, the client waits for the proxy's operator rather than giving up.
    let refused = metrics::wait_for(endpoint, SETTLE, "the refusal counted", |e| {
        state(e, &two, "waiting") == 1.0
            && e.value(
                "shroud_client_bind_refusals_total",
                &[("status", "not_authorized")],
            ) == 1.0
    })
    .await
    .unwrap();
    assert_eq!(
        refused.value(
            "shroud_client_bind_refusals_total",
            &[("status", "not_authorized")]
        ),
        1.0
    );
    assert_eq!(refused.sum("shroud_client_bind_refusals_total", &[]), 1.0);
    assert_eq!(
        refused.value(
            "shroud_client_tunnel_attempts_total",
            &[("result", "refused")]
        ),
        1.0
    );
    assert_eq!(
        metrics::status(endpoint, "/readyz").await.unwrap(),
        (
            503,
            "not ready: no tunnel bound (0 of 2 proxies)\n".to_owned()
        )
    );
    assert_eq!(metrics::status(endpoint, "/healthz").await.unwrap().0, 200);
    // The direct transport: no Tor gauges.
    assert!(refused.families.keys().all(|name| !name.contains("tor")));

    // The first proxy comes up: the client binds and is ready.
    let policy = format!("{HOST} {key}\n");
    let http_listener = ["--listen-http".to_owned(), ANY.to_owned()];
    let mut proxy =
        ProxyProcess::start_with_args(&pki, "one.proxy.test", &policy, one_addr, &http_listener)
            .await
            .unwrap();
    let line = proxy
        .process
        .wait_for_line("listener=\"http\"", Duration::from_secs(20))
        .await
        .unwrap();
    let proxy_http = log_addr(&line).unwrap();
    let body = metrics::wait_for_status(endpoint, "/readyz", 200, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(body, "ready\n");

    // Three visitors served, and a plain-HTTP one whose origin is down.
    for _ in 0..3 {
        let response = within(
            20,
            shroud_tests::https_get(proxy.https, HOST, roots.clone(), "/"),
        )
        .await
        .unwrap();
        assert_eq!(response.status, 200);
    }
    let response = within(20, shroud_tests::http_get(proxy_http, HOST, "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 502);
    let served = metrics::wait_for(endpoint, SETTLE, "the visitors counted", |e| {
        e.value("shroud_client_streams_total", &[]) == 4.0
            && e.value("shroud_client_streams_active", &[]) == 0.0
    })
    .await
    .unwrap();
    assert_eq!(state(&served, &one, "bound"), 1.0);
    assert_eq!(state(&served, &one, "connecting"), 0.0);
    assert_eq!(state(&served, &two, "waiting"), 1.0);
    assert_eq!(
        served.value(
            "shroud_client_tunnel_attempts_total",
            &[("result", "bound")]
        ),
        1.0
    );
    assert!(
        served.value(
            "shroud_client_tunnel_attempts_total",
            &[("result", "connect_failed")]
        ) >= 1.0,
        "the attempts while the proxy was down were not counted"
    );
    let failures = |kind| {
        served.value(
            "shroud_client_origin_connect_failures_total",
            &[("kind", kind)],
        )
    };
    assert_eq!((failures("http"), failures("tls")), (1.0, 0.0));

    // The proxy killed: the tunnel is lost, and the client is not ready any more.
    proxy.kill();
    let body = metrics::wait_for_status(endpoint, "/readyz", 503, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(body, "not ready: no tunnel bound (0 of 2 proxies)\n");
    let lost = metrics::wait_for(endpoint, SETTLE, "the loss counted", |e| {
        e.value("shroud_client_tunnel_ends_total", &[("reason", "lost")]) == 1.0
    })
    .await
    .unwrap();
    assert_eq!(state(&lost, &one, "bound"), 0.0);
    assert_eq!(
        lost.value("shroud_client_tunnel_ends_total", &[("reason", "go_away")]),
        0.0
    );
}

const DISCOVERY: &str = "discovery.test";
const SECRET: &str = "a-fleet-secret-of-sufficient-length";

/// Writes the fleet secret (mode 0600) and returns its path.
fn secret_file(pki: &Pki) -> String {
    let path = pki.dir().join("fleet.secret");
    std::fs::write(&path, SECRET).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path.display().to_string()
}

/// `method path` over HTTPS to the discovery service, with `extra` header lines and `body`.
async fn discovery_request(
    pki: &Pki,
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra: &str,
    body: &str,
) -> u16 {
    let stream = tls_connect(addr, DISCOVERY, pki.ca.root_store())
        .await
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {DISCOVERY}\r\n{extra}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    shroud_tests::http_exchange(stream, request.as_bytes())
        .await
        .unwrap()
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_counts_heartbeats_lists_and_dns_answers() {
    init();
    let pki = Pki::new().unwrap();
    let signing_key = pki.dir().join("signing.key");
    shroud_mux::keyfile::load_or_create(&signing_key).unwrap();
    let secret = secret_file(&pki);
    let (cert, key) = pki.issue_files(DISCOVERY).unwrap();
    let args: Vec<String> = [
        "--listen",
        ANY,
        "--tls-cert",
        &cert.display().to_string(),
        "--tls-key",
        &key.display().to_string(),
        "--signing-key",
        &signing_key.display().to_string(),
        "--fleet-secret-file",
        &secret,
        "--heartbeat-timeout-secs",
        "300",
        "--dns-listen",
        ANY,
        "--dns-zone",
        "proxy.test",
        "--dns-ns",
        "ns1.discovery.example",
        "--metrics-listen",
        ANY,
    ]
    .map(str::to_owned)
    .into();
    let mut discovery = Process::spawn(&binary("shroud-discovery"), &args).unwrap();
    let limit = Duration::from_secs(20);
    let dns = log_addr(
        &discovery
            .wait_for_line("answering DNS", limit)
            .await
            .unwrap(),
    )
    .unwrap();
    let https = discovery
        .output_text()
        .lines()
        .filter(|l| l.contains("listening") && !l.contains("listener=\"metrics\""))
        .map(|l| log_addr(l).unwrap())
        .next()
        .expect("the HTTPS listener is logged before DNS");
    let endpoint = metrics::endpoint(&mut discovery, limit).await.unwrap();
    metrics::wait_for_status(endpoint, "/readyz", 200, SETTLE)
        .await
        .unwrap();
    let start = metrics::scrape(endpoint).await.unwrap();
    assert_eq!(
        start.value("shroud_discovery_proxies", &[("kind", "live")]),
        0.0
    );
    assert_eq!(
        start.value("shroud_discovery_proxies", &[("kind", "static")]),
        0.0
    );
    assert_eq!(start.sum("shroud_discovery_heartbeats_total", &[]), 0.0);
    assert_eq!(start.sum("shroud_discovery_dns_queries_total", &[]), 0.0);

    // A proxy announces itself every second, holding HOST's tunnel.
    let client_key = pki.dir().join("client.key");
    let policy = format!("{HOST} {}\n", make_key(&client_key).unwrap());
    let extra: Vec<String> = [
        "--discovery".to_owned(),
        format!("https://{DISCOVERY}:{}", https.port()),
        "--resolve".into(),
        format!("{DISCOVERY}:{}:127.0.0.1", https.port()),
        "--discovery-ca".into(),
        pki.ca_path.display().to_string(),
        "--fleet-secret-file".into(),
        secret.clone(),
        "--region".into(),
        "eu".into(),
        "--public-name".into(),
        "one.proxy.test:443".into(),
        "--public-addr".into(),
        "192.0.2.10".into(),
        "--heartbeat-secs".into(),
        "1".into(),
    ]
    .into();
    let mut proxy = ProxyProcess::start_with_args(
        &pki,
        "one.proxy.test",
        &policy,
        ANY.parse().unwrap(),
        &extra,
    )
    .await
    .unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let client_args = direct_client_args(
        &pki,
        &client_key,
        HOST,
        origin.addr(),
        &[("one.proxy.test", proxy.https)],
    );
    let _shroud = Process::spawn(&binary("shroud"), &client_args).unwrap();
    let joined = metrics::wait_for(endpoint, SETTLE, "the proxy joined and refreshed", |e| {
        e.value(
            "shroud_discovery_heartbeats_total",
            &[("outcome", "refreshed")],
        ) >= 1.0
    })
    .await
    .unwrap();
    assert_eq!(
        joined.value(
            "shroud_discovery_heartbeats_total",
            &[("outcome", "joined")]
        ),
        1.0
    );
    assert_eq!(
        joined.value("shroud_discovery_proxies", &[("kind", "live")]),
        1.0
    );

    // Three lists served, one request without a host, one heartbeat with the wrong secret.
    for host in [HOST, "other.test", HOST] {
        let status = discovery_request(
            &pki,
            https,
            "GET",
            &format!("/v1/proxies?host={host}"),
            "",
            "",
        )
        .await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        discovery_request(&pki, https, "GET", "/v1/proxies", "", "").await,
        400
    );
    let wrong = "Authorization: Bearer not-the-fleet-secret\r\n";
    assert_eq!(
        discovery_request(&pki, https, "POST", "/v1/heartbeat", wrong, "{}").await,
        401
    );
    // DNS: the zone answers HOST with the address of the proxy holding it, once bound.
    let resolver = shroud_process::dns::resolver(Some(dns), Duration::from_secs(2), false).unwrap();
    let name = format!("{HOST}.proxy.test.");
    let answered = within(20, async {
        loop {
            if let Ok(found) = resolver.ipv4_lookup(name.as_str()).await {
                if found.answers().len() == 1 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    answered.await;

    let counted = metrics::wait_for(endpoint, SETTLE, "the requests counted", |e| {
        e.value("shroud_discovery_lists_total", &[("outcome", "served")]) == 3.0
    })
    .await
    .unwrap();
    let lists = |outcome| counted.value("shroud_discovery_lists_total", &[("outcome", outcome)]);
    assert_eq!((lists("bad_request"), lists("no_proxies")), (1.0, 0.0));
    assert_eq!(counted.sum("shroud_discovery_lists_total", &[]), 4.0);
    assert_eq!(
        counted.value(
            "shroud_discovery_heartbeats_total",
            &[("outcome", "unauthorized")]
        ),
        1.0
    );
    // Each lookup was one question; those before the bind was announced found no address.
    let noerror = counted.value(
        "shroud_discovery_dns_queries_total",
        &[("rcode", "noerror")],
    );
    assert!(noerror >= 1.0);
    assert_eq!(
        counted.sum("shroud_discovery_dns_queries_total", &[]),
        noerror
    );

    // The proxy leaves on SIGTERM: counted, and no longer listed.
    proxy.process.terminate();
    assert!(proxy
        .process
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap()
        .success());
    let left = metrics::wait_for(endpoint, SETTLE, "the proxy left", |e| {
        e.value("shroud_discovery_heartbeats_total", &[("outcome", "left")]) == 1.0
    })
    .await
    .unwrap();
    assert_eq!(
        left.value("shroud_discovery_proxies", &[("kind", "live")]),
        0.0
    );

    // On SIGTERM the service says it is going, then stops.
    discovery.terminate();
    let status = discovery.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_visitor_is_counted_out_at_one_proxy_and_in_at_the_other() {
    init();
    let pki = Pki::new().unwrap();
    let secret = secret_file(&pki);
    let client_key = shroud_mux::auth::SecretKey::generate().unwrap();
    let policy = format!("{HOST} {}\n", client_key.public());
    let peer_ports = shroud_tests::ports::free_ports::<2>().unwrap();
    let peer = |i: usize| format!("127.0.0.1:{}", peer_ports[i]);
    let mut members = Vec::new();
    for i in 0..2 {
        let name = format!("p{i}.proxy.test");
        let args = [
            "--listen-http",
            ANY,
            "--metrics-listen",
            ANY,
            "--listen-peer",
            &peer(i),
            "--peer",
            &peer(1 - i),
            "--fleet-secret-file",
            &secret,
        ]
        .map(str::to_owned);
        let mut process =
            ProxyProcess::start_with_args(&pki, &name, &policy, ANY.parse().unwrap(), &args)
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
        members.push(Proxy {
            process,
            http,
            metrics,
        });
    }
    // The client holds a tunnel to the first proxy only.
    let echo = EchoOrigin::plain().await.unwrap();
    let mut spec = shroud_tests::stack::ClientSpec::new(
        HOST,
        echo.addr(),
        vec![("p0.proxy.test".to_owned(), members[0].process.https)],
    );
    spec.key = client_key;
    spec.http_target = Some(echo.addr());
    let mut client = shroud_tests::stack::TestClient::start(&pki, spec).unwrap();
    within(30, client.wait_bound(1)).await;
    for member in &members {
        member
            .wait_for("the other proxy alive", |e| {
                e.value("shroud_proxy_peers_alive", &[]) == 1.0
            })
            .await;
    }
    // The second proxy has heard the first holds the name: gossip may take up to its
    // refresh (15 s) to carry a list sent before the two counted each other as members.
    metrics::wait_for(
        members[1].metrics,
        Duration::from_secs(30),
        "the holder's names gossiped",
        |e| e.value("shroud_proxy_peer_hostnames", &[]) == 1.0,
    )
    .await
    .unwrap();
    let holder_knows = members[0].scrape().await;
    assert_eq!(holder_knows.value("shroud_proxy_peer_hostnames", &[]), 0.0);

    // A visitor at the second proxy goes to the first, which holds the name.
    let moved = within(30, echo_over_http(members[1].http, 50_000)).await as f64;
    let bytes = |e: &Exposition, path, direction| {
        e.value(
            "shroud_proxy_visitor_bytes_total",
            &[("path", path), ("direction", direction)],
        )
    };
    let out = members[1]
        .wait_for("the forwarder's bytes", |e| {
            bytes(e, "forwarded_out", "to_visitor") == moved
        })
        .await;
    assert_eq!(bytes(&out, "forwarded_out", "to_origin"), moved);
    assert_eq!(connections(&out, "http", "forwarded"), 1.0);
    assert_eq!(out.sum("shroud_proxy_connections_total", &[]), 1.0);
    let forwarded = |e: &Exposition, direction, result| {
        e.value(
            "shroud_proxy_forwarded_visitors_total",
            &[("direction", direction), ("result", result)],
        )
    };
    assert_eq!(forwarded(&out, "out", "accepted"), 1.0);
    assert_eq!(out.sum("shroud_proxy_forwarded_visitors_total", &[]), 1.0);
    // Nothing is bound there, so no name is labelled there.
    assert_eq!(out.value("shroud_proxy_bound_hostnames", &[]), 0.0);
    assert!(out.all("shroud_proxy_hostname_visitors_total").is_empty());

    let holder = members[0]
        .wait_for("the holder's bytes", |e| {
            bytes(e, "forwarded_in", "to_visitor") == moved
        })
        .await;
    assert_eq!(bytes(&holder, "forwarded_in", "to_origin"), moved);
    assert_eq!(forwarded(&holder, "in", "accepted"), 1.0);
    assert_eq!(
        holder.sum("shroud_proxy_forwarded_visitors_total", &[]),
        1.0
    );
    // It reached no listener there, yet had its stream opened and counts under its name.
    assert_eq!(
        holder.sum("shroud_proxy_connections_total", &[("listener", "http")]),
        0.0
    );
    assert_eq!(
        holder.value("shroud_proxy_stream_open_seconds_count", &[]),
        1.0
    );
    assert_eq!(
        holder.value(
            "shroud_proxy_hostname_visitors_total",
            &[("hostname", HOST)]
        ),
        1.0
    );
    assert_eq!(
        holder.value(
            "shroud_proxy_hostname_bytes_total",
            &[("hostname", HOST), ("direction", "to_origin")]
        ),
        moved
    );
}
