//! `shroud --proxy-protocol v1|v2` against a real server: Debian's nginx, listening with
//! `proxy_protocol` for plain HTTP and for TLS.
//!
//! The real `shroud-proxy` and `shroud` binaries run with nginx as the client's TARGET (TLS)
//! and `--http-target` (plain HTTP). Visitors connect to the proxy from loopback addresses of
//! their own (127.0.0.x), HTTPS ones verifying nginx's own certificate through the proxy's SNI
//! routing. What is asserted is what nginx and the visitors see: every response is nginx's
//! file, byte for byte, and nginx's access log names each request's own visitor, address and
//! port exactly, with the proxy's public port as the destination.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use shroud_tests::nginx::{Nginx, NginxSpec};
use shroud_tests::process::Process;
use shroud_tests::scale::connect_from;
use shroud_tests::stack::{binary, direct_client_args, log_addr, make_key, Pki, ProxyProcess};
use shroud_tests::visitor::{client_config, get_request, http_exchange, tls_handshake};
use shroud_tests::{init, within, PatternGen};

const HOST: &str = "example.test";
const PROXY: &str = "proxy.test";
/// Visitors of each kind (HTTPS, plain HTTP) per test.
const VISITORS: u8 = 4;
/// The file nginx serves, large enough to take many frames through the tunnel.
const FILE_LEN: usize = 300 * 1024;

/// How a visitor reached nginx.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Https,
    Http,
}

/// A visitor's request and what it saw of its own connection.
#[derive(Debug)]
struct Visit {
    scheme: Scheme,
    /// The visitor's own address and port, as the proxy sees it.
    source: SocketAddr,
    status: u16,
    body: Vec<u8>,
}

/// Everything a test runs: nginx, a proxy, and a client publishing nginx through it.
struct Stack {
    pki: Pki,
    nginx: Nginx,
    proxy: ProxyProcess,
    proxy_http: SocketAddr,
    _client: Process,
    file: Vec<u8>,
}

impl Stack {
    async fn start(version: &str) -> Self {
        let pki = Pki::new().unwrap();
        let mut file = vec![0; FILE_LEN];
        PatternGen::new(7).fill(&mut file);
        let (cert, key) = pki.issue_files(HOST).unwrap();
        let spec = NginxSpec {
            server_name: HOST,
            tls: Some((&cert, &key)),
            files: &[("data.bin", &file)],
        };
        let nginx = Nginx::start(&spec).await.unwrap();
        let https_target = nginx.https.expect("nginx's TLS listener");

        let key_path = pki.dir().join("client.key");
        let public = make_key(&key_path).unwrap();
        let extra = ["--listen-http", "127.0.0.1:0"].map(str::to_owned);
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let mut proxy = ProxyProcess::start_with_args(
            &pki,
            PROXY,
            &format!("{HOST} {public}\n"),
            listen,
            &extra,
        )
        .await
        .unwrap();
        let line = proxy
            .process
            .wait_for_line("listener=\"http\"", Duration::from_secs(20))
            .await
            .unwrap();
        let proxy_http = log_addr(&line).unwrap();

        let mut args =
            direct_client_args(&pki, &key_path, HOST, https_target, &[(PROXY, proxy.https)]);
        args.extend([
            "--http-target".to_owned(),
            nginx.http.to_string(),
            "--proxy-protocol".to_owned(),
            version.to_owned(),
        ]);
        let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
        client
            .wait_for_line("tunnel up", Duration::from_secs(30))
            .await
            .unwrap();
        Self {
            pki,
            nginx,
            proxy,
            proxy_http,
            _client: client,
            file,
        }
    }

    /// Where visitors go, for tasks of their own.
    fn entry(&self) -> Entry {
        Entry {
            https: self.proxy.https,
            http: self.proxy_http,
            roots: self.pki.ca.root_store(),
        }
    }
}

/// The proxy's public listeners and the roots that verify nginx's certificate.
#[derive(Clone)]
struct Entry {
    https: SocketAddr,
    http: SocketAddr,
    roots: rustls::RootCertStore,
}

impl Entry {
    /// One visitor from `source`, asking for `/data.bin?visitor=N`.
    async fn visit(self, scheme: Scheme, source: IpAddr, n: u8) -> anyhow::Result<(String, Visit)> {
        let uri = format!("/data.bin?visitor={n}");
        let request = get_request(HOST, &uri);
        let (source, response) = match scheme {
            Scheme::Https => {
                let tcp = connect_from(source, self.https).await?;
                let me = tcp.local_addr()?;
                let config = client_config(self.roots, &[]);
                let tls = tls_handshake(tcp, self.https, HOST, config).await?;
                (me, http_exchange(tls, request.as_bytes()).await?)
            }
            Scheme::Http => {
                let tcp = connect_from(source, self.http).await?;
                let me = tcp.local_addr()?;
                (me, http_exchange(tcp, request.as_bytes()).await?)
            }
        };
        let visit = Visit {
            scheme,
            source,
            status: response.status,
            body: response.body,
        };
        Ok((uri, visit))
    }
}

/// The loopback address visitor `n` of a test connects from: `base + n`.
fn visitor_ip(base: u8, n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, base + n))
}

/// Visitors through the proxy, each from its own address, concurrently; nginx must log each
/// one's own address and port, and every visitor must get nginx's file intact.
async fn nginx_sees_each_visitor(version: &str, base: u8) {
    init();
    let stack = Stack::start(version).await;
    let started = Instant::now();

    let mut visits = BTreeMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..2 * VISITORS {
        let scheme = if n < VISITORS {
            Scheme::Https
        } else {
            Scheme::Http
        };
        tasks.spawn(stack.entry().visit(scheme, visitor_ip(base, n), n));
    }
    while let Some(joined) = within(60, tasks.join_next()).await {
        let (uri, visit) = joined.unwrap().unwrap();
        assert_eq!(visit.status, 200, "{uri} ({:?})", visit.scheme);
        assert!(
            visit.body == stack.file,
            "{uri} ({:?}): the body differs from nginx's file ({} bytes, not {})",
            visit.scheme,
            visit.body.len(),
            stack.file.len()
        );
        visits.insert(uri, visit);
    }
    let elapsed = started.elapsed();

    let lines = stack
        .nginx
        .wait_access_lines(visits.len(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(
        lines.len(),
        visits.len(),
        "one access log line per visitor: {lines:#?}"
    );
    let sources: std::collections::BTreeSet<_> = visits.values().map(|v| v.source).collect();
    assert_eq!(
        sources.len(),
        visits.len(),
        "every visitor had its own source"
    );
    for line in &lines {
        let visit = visits
            .get(&line.uri)
            .unwrap_or_else(|| panic!("nginx logged a request no visitor made: {line:?}"));
        assert_eq!(
            line.source, visit.source,
            "{}: nginx logged {} as the visitor, who was {} ({:?})",
            line.uri, line.source, visit.source, visit.scheme
        );
        let (public_port, nginx_port) = match visit.scheme {
            Scheme::Https => (stack.proxy.https.port(), stack.nginx.https.unwrap().port()),
            Scheme::Http => (stack.proxy_http.port(), stack.nginx.http.port()),
        };
        assert_eq!(line.destination_port, public_port, "{line:?}");
        assert_eq!(line.server_port, nginx_port, "{line:?}");
        assert_eq!(line.status, 200, "{line:?}");
        assert_eq!(line.body_bytes, FILE_LEN as u64, "{line:?}");
    }
    let errors = stack.nginx.error_log();
    assert!(
        !errors.contains("broken header"),
        "nginx refused a PROXY header: {errors}"
    );
    eprintln!(
        "PROXY protocol {version}: nginx logged {} visitors' own addresses ({} HTTPS, {} HTTP, \
         {FILE_LEN} bytes each) in {elapsed:?}",
        lines.len(),
        VISITORS,
        VISITORS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_logs_each_visitors_address_from_a_v1_header() {
    nginx_sees_each_visitor("v1", 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_logs_each_visitors_address_from_a_v2_header() {
    nginx_sees_each_visitor("v2", 40).await;
}

/// The control: the same nginx, reached by a client without --proxy-protocol, refuses every
/// connection (nginx takes the request line for a broken PROXY header), so the tests above
/// pass only because the header is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_refuses_visitors_when_the_client_sends_no_header() {
    init();
    let pki = Pki::new().unwrap();
    let spec = NginxSpec {
        server_name: HOST,
        tls: None,
        files: &[("data.bin", b"unreachable")],
    };
    let nginx = Nginx::start(&spec).await.unwrap();
    let key_path = pki.dir().join("client.key");
    let public = make_key(&key_path).unwrap();
    let extra = ["--listen-http", "127.0.0.1:0"].map(str::to_owned);
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut proxy =
        ProxyProcess::start_with_args(&pki, PROXY, &format!("{HOST} {public}\n"), listen, &extra)
            .await
            .unwrap();
    let line = proxy
        .process
        .wait_for_line("listener=\"http\"", Duration::from_secs(20))
        .await
        .unwrap();
    let proxy_http = log_addr(&line).unwrap();
    let mut args = direct_client_args(&pki, &key_path, HOST, nginx.http, &[(PROXY, proxy.https)]);
    args.extend(["--http-target".to_owned(), nginx.http.to_string()]);
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(30))
        .await
        .unwrap();

    let tcp = within(10, connect_from(visitor_ip(60, 0), proxy_http))
        .await
        .unwrap();
    let request = get_request(HOST, "/data.bin");
    let answer = within(30, http_exchange(tcp, request.as_bytes())).await;
    assert!(
        answer
            .as_ref()
            .map_or(true, |response| response.status != 200),
        "nginx served a visitor without a PROXY header: {answer:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nginx.error_log().contains("broken header") {
        assert!(
            Instant::now() < deadline,
            "nginx did not report a broken PROXY header: {}",
            nginx.error_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An onion visitor has no address: the header shroud sends for one (v1 `UNKNOWN`, v2 `LOCAL`)
/// is accepted by nginx, which serves the request and logs no PROXY source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_accepts_the_header_of_a_visitor_without_an_address() {
    use shroud_client::proxy_protocol::{encode_unknown, Version};
    use tokio::io::AsyncWriteExt as _;

    init();
    let file = b"served to an onion visitor\n";
    let spec = NginxSpec {
        server_name: HOST,
        tls: None,
        files: &[("onion.txt", file)],
    };
    let nginx = Nginx::start(&spec).await.unwrap();
    for (round, version) in [Version::V1, Version::V2].into_iter().enumerate() {
        let mut tcp = tokio::net::TcpStream::connect(nginx.http).await.unwrap();
        tcp.write_all(&encode_unknown(version)).await.unwrap();
        let response = within(
            10,
            http_exchange(tcp, get_request(HOST, "/onion.txt").as_bytes()),
        )
        .await
        .unwrap();
        assert_eq!(response.status, 200, "{version:?}: {}", nginx.error_log());
        assert_eq!(response.body, file);
        let deadline = Instant::now() + Duration::from_secs(5);
        let log = loop {
            let log = nginx.access_log_text();
            if log.lines().count() > round || Instant::now() >= deadline {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let line = log.lines().nth(round).unwrap_or_default();
        assert!(
            line.starts_with("- "),
            "{version:?}: no PROXY source: {line:?}"
        );
        assert!(
            line.ends_with(" 200 27 /onion.txt"),
            "{version:?}: {line:?}"
        );
    }
}
