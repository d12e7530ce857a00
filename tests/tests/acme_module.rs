//! The ACME client (`shroud_client::acme`) against Debian's pebble, over the direct transport,
//! with a responder standing in for the proxies and the tunnel: it reads each ClientHello and
//! serves [`Acme::challenge_config`] to `acme-tls/1` and [`Acme::visitor_config`] to anything
//! else.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use shroud_client::acme::{Acme, AcmeConfig, AcmeError, Export, Timing, ACME_TLS_ALPN};
use shroud_client::transport::{BoxStream, DirectTransport, Resolve, Transport};
use shroud_tests::init;
use shroud_tests::pebble::{Pebble, PebbleSetup};
use shroud_tests::ports::free_port;
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

const HOST: &str = "shroud.example.com";
/// Generous for a 2-core machine running other tests; pebble issues in about a second.
const ISSUE: Duration = Duration::from_secs(60);

/// The direct transport, counting its connections.
struct Counting {
    inner: DirectTransport,
    connects: AtomicUsize,
}

impl Counting {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: DirectTransport::new(Resolve::new(), Duration::from_secs(5)),
            connects: AtomicUsize::new(0),
        })
    }
}

impl Transport for Counting {
    fn connect<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<BoxStream>> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.inner.connect(host, port)
    }

    fn name(&self) -> &'static str {
        "counting"
    }
}

/// Stands in for the proxies and the tunnel on pebble's `tlsPort`.
struct Responder {
    port: u16,
    acme: Arc<Mutex<Option<Arc<Acme>>>>,
    /// Challenge handshakes completed.
    challenges: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Responder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acme: Arc<Mutex<Option<Arc<Acme>>>> = Arc::default();
        let challenges = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let acme = acme.clone();
            let challenges = challenges.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let acme = acme.lock().unwrap().clone();
                    let challenges = challenges.clone();
                    tokio::spawn(async move {
                        let Some(acme) = acme else { return };
                        let acceptor =
                            LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
                        let Ok(start) = timeout(Duration::from_secs(5), acceptor).await else {
                            return;
                        };
                        let Ok(start) = start else { return };
                        let hello = start.client_hello();
                        let sni = hello.server_name().unwrap_or_default().to_owned();
                        let is_challenge = hello
                            .alpn()
                            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
                        let config = if is_challenge {
                            match acme.challenge_config(&sni) {
                                Some(config) => config,
                                None => return,
                            }
                        } else {
                            acme.visitor_config()
                        };
                        if let Ok(Ok(mut tls)) =
                            timeout(Duration::from_secs(5), start.into_stream(config)).await
                        {
                            if is_challenge {
                                challenges.fetch_add(1, Ordering::SeqCst);
                            }
                            // The validator closes once it has seen the certificate.
                            let mut buf = [0u8; 64];
                            let _ = timeout(
                                Duration::from_secs(5),
                                tokio::io::AsyncReadExt::read(&mut tls, &mut buf),
                            )
                            .await;
                        }
                    });
                }
            }
        });
        Self {
            port,
            acme,
            challenges,
            task,
        }
    }

    /// Serves `acme` from now on.
    fn serve(&self, acme: &Arc<Acme>) {
        *self.acme.lock().unwrap() = Some(acme.clone());
    }

    /// A `ready_to_validate` that says yes once the responder serves an [`Acme`] and it has
    /// been asked `no_first` times; counts the calls.
    fn ready_hook(
        &self,
        no_first: usize,
        calls: Arc<AtomicUsize>,
    ) -> Box<dyn Fn() -> bool + Send + Sync> {
        let acme = self.acme.clone();
        Box::new(move || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            n >= no_first && acme.lock().unwrap().is_some()
        })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config(setup: &PebbleSetup, state_dir: &Path, hostname: &str) -> AcmeConfig {
    let mut config = AcmeConfig::new(
        hostname,
        "ops@example.com",
        &setup.directory_url(),
        state_dir.to_owned(),
    );
    config.extra_ca = Some(setup.ca_pem());
    config.agree_tos = true;
    config.timing = Timing {
        retry_base: Duration::from_millis(200),
        retry_cap: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        validation_timeout: Duration::from_secs(30),
        tunnel_poll: Duration::from_millis(20),
        tunnel_wait: Duration::from_secs(10),
        reload_timeout: Duration::from_secs(10),
    };
    config
}

async fn start(
    config: AcmeConfig,
    responder: &Responder,
    transport: Arc<dyn Transport>,
    shutdown: &CancellationToken,
) -> Arc<Acme> {
    let hook = responder.ready_hook(0, Arc::default());
    let acme = Acme::start(config, transport, hook, shutdown.child_token())
        .await
        .unwrap();
    responder.serve(&acme);
    acme
}

fn direct() -> Arc<dyn Transport> {
    Arc::new(DirectTransport::new(Resolve::new(), Duration::from_secs(5)))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn leaf(acme: &Acme) -> CertificateDer<'static> {
    acme.certificate().unwrap().cert[0].clone()
}

/// A visitor's handshake with `acme`'s visitor configuration, trusting only `root_pem`:
/// returns the negotiated ALPN protocol and the leaf the visitor saw.
async fn visit(acme: &Arc<Acme>, root_pem: &str) -> (Option<Vec<u8>>, CertificateDer<'static>) {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap())
        .unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let (client_io, server_io) = tokio::io::duplex(4096);
    let server = tokio_rustls::TlsAcceptor::from(acme.visitor_config());
    let server_task = tokio::spawn(async move { server.accept(server_io).await.map(|_| ()) });
    let tls = TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from(HOST).unwrap(), client_io)
        .await
        .expect("the visitor verifies the certificate against pebble's root");
    server_task.await.unwrap().unwrap();
    let (_, connection) = tls.get_ref();
    (
        connection.alpn_protocol().map(<[u8]>::to_vec),
        connection.peer_certificates().unwrap()[0]
            .clone()
            .into_owned(),
    )
}

fn new_accounts(pebble: &Pebble) -> usize {
    pebble.log().matches("POST /sign-me-up").count()
}

#[tokio::test]
async fn obtains_a_certificate_that_verifies_exports_it_and_reuses_the_account() {
    init();
    let responder = Responder::start().await;
    let setup = PebbleSetup::new(responder.port);
    let pebble = setup.start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let export_dir = state.path().join("export");
    let marker = state.path().join("reloaded");
    let mut config = config(&setup, state.path(), HOST);
    config.export = Some(Export {
        dir: export_dir.clone(),
        reload_cmd: Some(format!("echo reloaded >> '{}'", marker.display())),
    });
    let shutdown = CancellationToken::new();

    let began = std::time::Instant::now();
    let calls = Arc::new(AtomicUsize::new(0));
    let acme = Acme::start(
        config.clone(),
        direct(),
        responder.ready_hook(3, calls.clone()),
        shutdown.child_token(),
    )
    .await
    .unwrap();
    assert!(acme.certificate().is_none());
    responder.serve(&acme);
    let mut watch = acme.watch();
    timeout(ISSUE, acme.ready()).await.unwrap().unwrap();
    eprintln!("issued in {:?}", began.elapsed());
    assert_eq!(*watch.borrow_and_update(), 1);
    assert!(
        calls.load(Ordering::SeqCst) >= 4,
        "the tunnels were asked until they said yes"
    );
    assert!(
        responder.challenges.load(Ordering::SeqCst) >= 1,
        "pebble validated through the responder"
    );
    assert!(
        acme.challenge_config(HOST).is_none(),
        "the challenge is withdrawn"
    );

    let root = pebble.root_pem().await.unwrap();
    let (alpn, seen) = visit(&acme, &root).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(seen, leaf(&acme));

    let acme_dir = state.path().join("acme");
    let host_dir = acme_dir.join(HOST);
    assert_eq!(mode(&acme_dir), 0o700);
    assert_eq!(mode(&host_dir), 0o700);
    for file in ["fullchain.pem", "privkey.pem"] {
        assert_eq!(mode(&host_dir.join(file)), 0o600, "{file}");
        assert_eq!(mode(&export_dir.join(file)), 0o600, "export {file}");
        assert_eq!(
            std::fs::read(host_dir.join(file)).unwrap(),
            std::fs::read(export_dir.join(file)).unwrap(),
            "{file} is exported as stored"
        );
    }
    let accounts: Vec<PathBuf> = std::fs::read_dir(&acme_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(mode(&accounts[0]), 0o600);
    // The reload command ran once the files were in place (it may still be finishing).
    timeout(Duration::from_secs(10), async {
        while !std::fs::read_to_string(&marker).is_ok_and(|m| m == "reloaded\n") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the reload command ran once");
    assert_eq!(new_accounts(&pebble), 1);

    // A restart without the certificate orders again with the stored account.
    shutdown.cancel();
    let first = leaf(&acme);
    std::fs::remove_file(host_dir.join("fullchain.pem")).unwrap();
    std::fs::remove_file(host_dir.join("privkey.pem")).unwrap();
    let shutdown = CancellationToken::new();
    config.export = None;
    let acme = start(config, &responder, direct(), &shutdown).await;
    timeout(ISSUE, acme.ready()).await.unwrap().unwrap();
    assert_ne!(leaf(&acme), first);
    assert_eq!(new_accounts(&pebble), 1, "no second account was made");
    shutdown.cancel();
}

#[tokio::test]
async fn a_stored_certificate_is_served_at_once_without_the_ca() {
    init();
    let responder = Responder::start().await;
    let setup = PebbleSetup::new(responder.port);
    let pebble = setup.start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let acme = start(
        config(&setup, state.path(), HOST),
        &responder,
        direct(),
        &shutdown,
    )
    .await;
    timeout(ISSUE, acme.ready()).await.unwrap().unwrap();
    let first = leaf(&acme);
    let root = pebble.root_pem().await.unwrap();
    shutdown.cancel();
    drop(pebble);

    let transport = Counting::new();
    let shutdown = CancellationToken::new();
    let acme = Acme::start(
        config(&setup, state.path(), HOST),
        transport.clone(),
        Box::new(|| true),
        shutdown.child_token(),
    )
    .await
    .unwrap();
    assert_eq!(leaf(&acme), first, "served as soon as start returns");
    assert_eq!(
        transport.connects.load(Ordering::SeqCst),
        0,
        "start did not contact the CA"
    );
    assert_eq!(*acme.watch().borrow(), 1);
    timeout(Duration::from_secs(1), acme.ready())
        .await
        .unwrap()
        .unwrap();
    let (_, seen) = visit(&acme, &root).await;
    assert_eq!(seen, first);
    shutdown.cancel();
}

#[tokio::test]
async fn forced_renewal_swaps_the_certificate_for_new_handshakes() {
    init();
    let responder = Responder::start().await;
    let mut setup = PebbleSetup::new(responder.port);
    setup.validity_secs = Some(3600);
    let pebble = setup.start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut config = config(&setup, state.path(), HOST);
    // Due a second after issuance.
    config.renew_before = Some(Duration::from_secs(3599));
    let shutdown = CancellationToken::new();
    let acme = start(config, &responder, direct(), &shutdown).await;
    let mut watch = acme.watch();
    timeout(ISSUE, acme.ready()).await.unwrap().unwrap();
    let first = leaf(&acme);
    let root = pebble.root_pem().await.unwrap();

    timeout(ISSUE, watch.wait_for(|generation| *generation >= 2))
        .await
        .unwrap()
        .unwrap();
    let second = leaf(&acme);
    assert_ne!(second, first);
    let (_, seen) = visit(&acme, &root).await;
    assert_eq!(seen, second);
    let stored = std::fs::read(state.path().join("acme").join(HOST).join("fullchain.pem")).unwrap();
    let stored = CertificateDer::pem_slice_iter(&stored)
        .next()
        .unwrap()
        .unwrap();
    assert!(stored == first || stored == second);
    shutdown.cancel();
}

#[tokio::test]
async fn without_agreeing_start_names_the_terms() {
    init();
    let responder = Responder::start().await;
    let setup = PebbleSetup::new(responder.port);
    let pebble = setup.start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut config = config(&setup, state.path(), HOST);
    config.agree_tos = false;
    let err = Acme::start(
        config,
        direct(),
        Box::new(|| true),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, AcmeError::TermsNotAgreed { terms } if terms == "data:text/plain,Do%20what%20thou%20wilt"),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("data:text/plain,Do%20what%20thou%20wilt"),
        "{text}"
    );
    assert!(text.contains("--acme-agree-tos"), "{text}");
    assert_eq!(new_accounts(&pebble), 0);
}

#[tokio::test]
async fn a_ca_down_at_start_is_retried_until_it_answers() {
    init();
    let responder = Responder::start().await;
    let setup = PebbleSetup::new(responder.port);
    let state = tempfile::tempdir().unwrap();
    let transport = Counting::new();
    let shutdown = CancellationToken::new();
    let acme = start(
        config(&setup, state.path(), HOST),
        &responder,
        transport.clone(),
        &shutdown,
    )
    .await;

    // At least two attempts fail before the CA comes up.
    timeout(Duration::from_secs(20), async {
        while transport.connects.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(acme.certificate().is_none());
    let _pebble = setup.start().unwrap();
    timeout(ISSUE, acme.ready()).await.unwrap().unwrap();
    shutdown.cancel();
}

#[tokio::test]
async fn a_name_the_ca_refuses_ends_ready_with_its_reason() {
    init();
    let responder = Responder::start().await;
    let mut setup = PebbleSetup::new(responder.port);
    setup.blocklist = vec!["blocked.example.com".to_owned()];
    let _pebble = setup.start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let acme = start(
        config(&setup, state.path(), "blocked.example.com"),
        &responder,
        direct(),
        &shutdown,
    )
    .await;
    let err = timeout(ISSUE, acme.ready()).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, AcmeError::Refused { kind, .. } if kind.ends_with(":rejectedIdentifier")),
        "{err:?}"
    );
    assert!(err.to_string().contains("blocked.example.com"), "{err}");
    shutdown.cancel();
}

#[tokio::test]
async fn stopping_before_a_certificate_ends_ready() {
    init();
    let state = tempfile::tempdir().unwrap();
    let mut config = AcmeConfig::new(
        HOST,
        "",
        &format!("https://127.0.0.1:{}/dir", free_port().unwrap()),
        state.path().to_owned(),
    );
    config.agree_tos = true;
    let shutdown = CancellationToken::new();
    let acme = Acme::start(config, direct(), Box::new(|| true), shutdown.clone())
        .await
        .unwrap();
    shutdown.cancel();
    let err = timeout(Duration::from_secs(5), acme.ready())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, AcmeError::Stopped), "{err:?}");
}
