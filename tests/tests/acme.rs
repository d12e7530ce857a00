//! A certificate for the hidden origin: the `shroud` binary with `--acme` gets one from
//! Debian's pebble, whose validator reaches the client only through the proxy's HTTPS port
//! (TLS-ALPN-01 routed by SNI like any visitor), and visitors verify it against pebble's root.
//!
//! Both modes: the client terminating visitors' TLS with the certificate (plaintext to
//! TARGET), and `--acme-export`, where TARGET terminates TLS with the exported files and the
//! client passes visitors' TLS through. And what a user sees when something is missing: no
//! `--acme-agree-tos` (the terms are named, exit 1), a CA down at start (serving waits, then
//! works), a name the CA refuses (exit 1 with the CA's detail). And renewal: new visitors get
//! the new certificate while a visitor connected before keeps its connection.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use shroud_tests::pebble::{Pebble, PebbleSetup};
use shroud_tests::process::Process;
use shroud_tests::stack::{
    binary, direct_client_args, make_key, ClientSpec, Pki, TestClient, TestProxy,
};
use shroud_tests::{https_get, init, within, HttpOrigin};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const HOST: &str = "example.test";

/// A proxy on loopback that lets one client key publish [`HOST`], and a pebble whose
/// validator dials that proxy's HTTPS port.
struct Setup {
    pki: Pki,
    key_path: PathBuf,
    proxy: TestProxy,
    pebble: PebbleSetup,
}

impl Setup {
    async fn new() -> Self {
        let pki = Pki::new().unwrap();
        let key_path = pki.dir().join("client.key");
        let key = make_key(&key_path).unwrap();
        let proxy = TestProxy::start(&pki, "proxy.test", &format!("{HOST} {key}\n"))
            .await
            .unwrap();
        let pebble = PebbleSetup::new(proxy.https.port());
        Self {
            pki,
            key_path,
            proxy,
            pebble,
        }
    }

    /// The `shroud` arguments publishing [`HOST`] at `target` with `--acme`.
    fn client_args(&self, target: SocketAddr, extra: &[&str]) -> Vec<String> {
        let mut args = direct_client_args(
            &self.pki,
            &self.key_path,
            HOST,
            target,
            &[("proxy.test", self.proxy.https)],
        );
        let state = self.pki.dir().join("state");
        args.extend([
            "--acme".to_owned(),
            "admin@example.org".into(),
            "--acme-directory".into(),
            self.pebble.directory_url(),
            "--acme-ca".into(),
            self.pebble.ca_pem().display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
        ]);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }
}

/// The roots a visitor trusts: pebble's, and nothing else.
async fn pebble_roots(pebble: &Pebble) -> rustls::RootCertStore {
    pebble.roots().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_gets_a_certificate_through_its_tunnel_and_terminates_with_it() {
    init();
    let setup = Setup::new().await;
    let pebble = setup.pebble.start().unwrap();
    let origin = HttpOrigin::plain().await.unwrap();
    let args = setup.client_args(origin.addr(), &["--acme-agree-tos"]);
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("installed a new certificate", Duration::from_secs(60))
        .await
        .unwrap();

    // A visitor that trusts only pebble's root reaches the origin, in plaintext there.
    let roots = pebble_roots(&pebble).await;
    let response = within(20, https_get(setup.proxy.https, HOST, roots, "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "hello from origin: GET /\n");
    let log = client.output_text();
    // The CA was asked to validate only once the tunnel was up (the check arrives through it).
    let up = log.find("tunnel up").expect("the tunnel came up");
    let asked = log
        .find("asked the CA to validate")
        .expect("validation was asked for");
    assert!(up < asked, "{log}");
    assert!(
        log.contains("answered the certificate authority's TLS-ALPN-01 check"),
        "{log}"
    );
    // The check never reached the origin: only the visitor did.
    assert_eq!(origin.accepted(), 1);
    // The key and account never reach the log; the files holding them are the owner's.
    let acme_dir = setup.pki.dir().join("state").join("acme");
    for path in files_under(&acme_dir) {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
        if path.file_name().is_some_and(|n| n == "privkey.pem") {
            let key = std::fs::read_to_string(&path).unwrap();
            let body = key.lines().nth(1).unwrap();
            assert!(!log.contains(body), "the key reached the log");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_export_the_origin_terminates_tls_with_the_exported_files() {
    init();
    let setup = Setup::new().await;
    let pebble = setup.pebble.start().unwrap();
    let export = setup.pki.dir().join("export");
    std::fs::create_dir(&export).unwrap();
    // The origin listens from the start, and loads the files once the reload command says
    // they are there, as a real server would on its reload signal.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    let marker = export.join("reloaded");
    let reload = format!("touch {}", marker.display());
    let args = setup.client_args(
        target,
        &[
            "--acme-agree-tos",
            "--acme-export",
            &export.display().to_string(),
            "--acme-reload-cmd",
            &reload,
        ],
    );
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("the reload command succeeded", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(marker.exists());
    for name in ["fullchain.pem", "privkey.pem"] {
        let mode = std::fs::metadata(export.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    let served = tokio::spawn(serve_tls_once(listener, export.clone()));

    let roots = pebble_roots(&pebble).await;
    let response = within(20, https_get(setup.proxy.https, HOST, roots, "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body_text(), "terminated by the origin");
    within(10, served).await.unwrap();
}

/// Accepts one connection and answers it over TLS with the certificate and key in `dir`.
async fn serve_tls_once(listener: tokio::net::TcpListener, dir: PathBuf) {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join("fullchain.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("privkey.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(config))
        .accept(tcp)
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tls.read_u8().await.unwrap());
    }
    let body = "terminated by the origin";
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(response.as_bytes()).await.unwrap();
    tls.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_agreeing_to_the_terms_the_client_names_them_and_exits() {
    init();
    let setup = Setup::new().await;
    let _pebble = setup.pebble.start().unwrap();
    let args = setup.client_args("127.0.0.1:9".parse().unwrap(), &[]);
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    let status = client.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(1));
    let log = client.output_text();
    assert!(log.contains("--acme-agree-tos"), "{log}");
    // pebble's terms URL.
    assert!(log.contains("data:text/plain"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_down_at_start_is_waited_for_and_then_serves() {
    init();
    let setup = Setup::new().await;
    let origin = HttpOrigin::plain().await.unwrap();
    let mut args = setup.client_args(origin.addr(), &["--acme-agree-tos"]);
    // Retry the CA quickly, as a test can afford.
    args.extend(["--acme-retry-secs".to_owned(), "1".into()]);
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("could not obtain a certificate", Duration::from_secs(30))
        .await
        .unwrap();
    // Serving waits: a visitor gets no certificate yet, and the client keeps running.
    let pebble = setup.pebble.start().unwrap();
    client
        .wait_for_line("installed a new certificate", Duration::from_secs(60))
        .await
        .unwrap();
    let roots = pebble_roots(&pebble).await;
    let response = within(20, https_get(setup.proxy.https, HOST, roots, "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_ca_refuses_ends_the_client_with_the_cas_reason() {
    init();
    let mut setup = Setup::new().await;
    setup.pebble.blocklist = vec![HOST.to_owned()];
    let _pebble = setup.pebble.start().unwrap();
    let args = setup.client_args("127.0.0.1:9".parse().unwrap(), &["--acme-agree-tos"]);
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    let status = client.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert_eq!(status.code(), Some(1));
    let log = client.output_text();
    assert!(log.contains("rejectedIdentifier"), "{log}");
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_serves_new_visitors_and_an_open_one_is_not_dropped() {
    init();
    let pki = Pki::new().unwrap();
    let client_key = shroud_mux::auth::SecretKey::generate().unwrap();
    let policy = format!("{HOST} {}\n", client_key.public());
    let proxy = TestProxy::start(&pki, "proxy.test", &policy).await.unwrap();
    let mut setup = PebbleSetup::new(proxy.https.port());
    setup.validity_secs = Some(3600);
    let pebble = setup.start().unwrap();
    let origin = shroud_tests::EchoOrigin::plain().await.unwrap();

    // The client in this process, its ACME due for renewal a few seconds after each issue.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let mut config = shroud_client::acme::AcmeConfig::new(
        HOST,
        "admin@example.org",
        &setup.directory_url(),
        pki.dir().join("state"),
    );
    config.agree_tos = true;
    config.extra_ca = Some(setup.ca_pem());
    config.renew_before = Some(Duration::from_secs(3600 - 4));
    config.timing.retry_base = Duration::from_secs(1);
    let transport = Arc::new(shroud_client::transport::DirectTransport::new(
        shroud_client::transport::Resolve::new(),
        Duration::from_secs(5),
    ));
    let acme = shroud_client::acme::Acme::start(config, transport, Box::new(|| true), shutdown)
        .await
        .unwrap();
    let mut installed = acme.watch();
    let mut spec = ClientSpec::new(HOST, origin.addr(), vec![proxy.dial()]);
    spec.key = client_key;
    spec.acme = Some(shroud_client::shared::AcmeTls {
        acme: acme.clone(),
        terminate: true,
    });
    let mut client = TestClient::start(&pki, spec).unwrap();
    within(30, client.wait_bound(1)).await;
    within(60, acme.ready()).await.unwrap();

    // A visitor connects and keeps its connection open across the renewal.
    let roots = pebble_roots(&pebble).await;
    let config = shroud_tests::visitor::client_config(roots.clone(), &[]);
    let mut open = shroud_tests::visitor::tls_connect_with(proxy.https, HOST, config.clone())
        .await
        .unwrap();
    let first = open.get_ref().1.peer_certificates().unwrap()[0].clone();
    echo(&mut open, b"before the renewal").await;

    let generation = *installed.borrow();
    within(60, installed.wait_for(|g| *g > generation))
        .await
        .unwrap();

    // The open connection still works, on the certificate it started with.
    echo(&mut open, b"after the renewal").await;
    // A new visitor (a new browser: no session to resume) gets the new certificate, which
    // verifies too.
    let mut fresh = shroud_tests::visitor::tls_connect(proxy.https, HOST, roots)
        .await
        .unwrap();
    let second = fresh.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(first, second, "new visitors get the renewed certificate");
    echo(&mut fresh, b"a new visitor").await;
}

/// Writes `bytes` and reads them back from an echoing origin.
async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) {
    stream.write_all(bytes).await.unwrap();
    stream.flush().await.unwrap();
    let mut back = vec![0u8; bytes.len()];
    within(10, stream.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_the_ca_cannot_complete_is_logged_with_its_detail_and_retried() {
    init();
    let mut setup = Setup::new().await;
    // The validator dials a port where nothing listens instead of the proxy's: every check
    // fails, as when DNS points the name elsewhere.
    setup.pebble = PebbleSetup::new(shroud_tests::ports::free_port().unwrap());
    let _pebble = setup.pebble.start().unwrap();
    let origin = HttpOrigin::plain().await.unwrap();
    let args = setup.client_args(
        origin.addr(),
        &["--acme-agree-tos", "--acme-retry-secs", "1"],
    );
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    for _ in 0..2 {
        client
            .wait_for_line("could not obtain a certificate", Duration::from_secs(60))
            .await
            .unwrap();
    }
    let log = client.output_text();
    // The CA's own problem type and detail, as it gave them.
    assert!(log.contains("urn:ietf:params:acme:error:"), "{log}");
    assert!(log.contains("detail="), "{log}");
    // A failed check is no reason to stop: the client still serves its tunnel.
    assert!(
        client.try_status().unwrap().is_none(),
        "the client exited: {log}"
    );
}
