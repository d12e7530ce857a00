//! Every way we know to take a hostname that is not yours, tried against in-process proxies
//! (issue 13). Each test asserts zero successes from where a user stands: the attacker's tunnel
//! receives no visitor (its fake origin accepts nothing and its session gets no stream), the
//! legitimate origin gets every visitor, and the bind is refused with the specific status of
//! PROTOCOL.md §4.5.
//!
//! Most attacks need more control than the shroud client gives, so [`RawTunnel`] speaks the
//! tunnel protocol by hand with the mux crate's own primitives (TLS with ALPN `shroud/1`, the
//! exporter, yamux, the control messages), exactly as `shroud-client/src/tunnel.rs` does, but
//! lets the test choose every field of the Bind. [`Mitm`] is a man in the middle with a
//! certificate the victim trusts, relaying the victim's control messages over its own TLS
//! session to the real proxy.
//!
//! Hostnames (§6): the proxy compares names byte for byte after one normalisation (lower-case
//! ASCII, one trailing dot removed). Internationalised names are accepted only as A-labels
//! (`xn--...`), which is what browsers put in SNI and `Host`; the Unicode form is not a
//! hostname to the proxy: refused in a Bind, an authorized file, an SNI or a `Host` header, and
//! never mapped to its A-label.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use hickory_proto::rr::RecordType;
use shroud_client::shared::TunnelState;
use shroud_mux::auth::{self, PublicKey, SecretKey, EXPORTER_LABEL, EXPORTER_LEN};
use shroud_mux::control::{self, BindName, BindOutcome, BindStatus, ErrorCode, Message, VERSION};
use shroud_mux::header::{self, StreamHeader};
use shroud_mux::{Incoming, MuxStream, Role, Session, SessionConfig};
use shroud_tests::dns::TestDns;
use shroud_tests::scale::client_hello;
use shroud_tests::stack::{authorize, ClientSpec, Pki, TestClient, TestProxy};
use shroud_tests::{
    client_config, http_get, https_get, init, raw_http, tls_connect, tls_connect_with, within,
    HttpOrigin,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const PROXY: &str = "proxy.test";
const TENANT: &str = "example.com";

// ---------------------------------------------------------------------------------------------
// A tunnel driven by hand.
// ---------------------------------------------------------------------------------------------

/// One tunnel connection to a proxy, driven message by message: TLS with ALPN `shroud/1` (the
/// proxy's certificate verified, as the real client does), yamux, and the control stream.
struct RawTunnel {
    session: Session,
    incoming: Incoming,
    control: MuxStream,
    /// This connection's TLS exporter value (§5.1).
    exporter: [u8; EXPORTER_LEN],
    /// The proxy's challenge, once [`RawTunnel::hello`] has run.
    challenge: [u8; 32],
}

impl RawTunnel {
    /// Connects to `addr` as a tunnel, up to the open control stream; no message sent yet.
    async fn connect(pki: &Pki, addr: SocketAddr) -> anyhow::Result<Self> {
        let config = shroud_client::tls::client_config(Some(&pki.ca_path))?;
        let tls = tls_connect_with(addr, PROXY, config).await?;
        let (_, connection) = tls.get_ref();
        ensure!(
            connection.alpn_protocol() == Some(shroud_mux::ALPN),
            "the proxy did not select ALPN shroud/1"
        );
        let exporter =
            connection.export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)?;
        let (session, incoming) = Session::spawn(tls, Role::Client, SessionConfig::default());
        let control = session.open().await?;
        Ok(Self {
            session,
            incoming,
            control,
            exporter,
            challenge: [0; 32],
        })
    }

    /// [`RawTunnel::connect`], then Hello both ways and the proxy's Challenge.
    async fn open(pki: &Pki, addr: SocketAddr) -> anyhow::Result<Self> {
        let mut tunnel = Self::connect(pki, addr).await?;
        tunnel.hello().await?;
        Ok(tunnel)
    }

    async fn hello(&mut self) -> anyhow::Result<()> {
        let hello = Message::Hello {
            versions: vec![VERSION],
        };
        control::write_message(&mut self.control, &hello).await?;
        match control::read_message(&mut self.control).await? {
            Message::Hello { versions } if versions == [VERSION] => {}
            other => bail!("expected the proxy's hello, got {other:?}"),
        }
        match control::read_message(&mut self.control).await? {
            Message::Challenge { challenge } => self.challenge = challenge,
            other => bail!("expected a challenge, got {other:?}"),
        }
        Ok(())
    }

    /// A Bind for `names` that `key` signs over this connection's challenge and exporter: what
    /// an honest client sends.
    fn signed_bind(&self, key: &SecretKey, names: &[&str]) -> Message {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let public = key.public();
        let transcript = auth::bind_transcript(&self.challenge, &self.exporter, &public, &names);
        Message::Bind {
            key: public.to_bytes(),
            signature: key.sign(&transcript),
            hostnames: names
                .into_iter()
                .map(|name| BindName { name, http: false })
                .collect(),
        }
    }

    /// Sends `bind` and returns the proxy's answer: its outcomes, or the Error it sent instead.
    async fn bind(&mut self, bind: &Message) -> anyhow::Result<Result<Vec<BindOutcome>, Message>> {
        control::write_message(&mut self.control, bind).await?;
        match control::read_message(&mut self.control).await? {
            Message::BindResult { results } => Ok(Ok(results)),
            error @ Message::Error { .. } => Ok(Err(error)),
            other => bail!("expected a bind result, got {other:?}"),
        }
    }

    /// Sends `bind`, expecting a BindResult, and returns each name's status.
    async fn bind_statuses(&mut self, bind: &Message) -> Vec<(String, BindStatus)> {
        let outcomes = within(20, self.bind(bind))
            .await
            .expect("the bind exchange failed")
            .unwrap_or_else(|error| panic!("the proxy answered the bind with {error:?}"));
        outcomes.into_iter().map(|o| (o.name, o.status)).collect()
    }

    /// Closes our side and counts the visitor streams the proxy opens on this tunnel until it
    /// closes the session, as it does after a bind that bound nothing.
    async fn streams_until_closed(mut self) -> usize {
        // Our side of the control stream done: the proxy need not wait for it.
        let _gone = self.control.shutdown().await;
        let mut streams = 0;
        while let Some(_stream) = self.incoming.accept().await {
            streams += 1;
        }
        streams
    }

    /// Serves this bound tunnel as the client does: each stream the proxy opens is
    /// acknowledged and spliced to `target`. The returned handle counts the streams.
    fn serve(self, target: SocketAddr) -> Served {
        let streams = Arc::new(AtomicUsize::new(0));
        let counted = streams.clone();
        let mut incoming = self.incoming;
        let task = tokio::spawn(async move {
            while let Some(stream) = incoming.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Err(err) = serve_stream(stream, target).await {
                        tracing::debug!(%err, "raw tunnel stream ended with an error");
                    }
                });
            }
        });
        Served {
            streams,
            session: self.session,
            _control: self.control,
            task,
        }
    }
}

async fn serve_stream(mut stream: MuxStream, target: SocketAddr) -> anyhow::Result<()> {
    let _header = StreamHeader::read(&mut stream).await?;
    header::write_ack(&mut stream).await?;
    let mut origin = TcpStream::connect(target).await?;
    shroud_mux::splice::splice(&mut origin, &mut stream, 64 * 1024).await?;
    Ok(())
}

/// A bound [`RawTunnel`] serving its streams.
struct Served {
    streams: Arc<AtomicUsize>,
    session: Session,
    /// Held open: the proxy ends a tunnel whose control stream closes.
    _control: MuxStream,
    task: JoinHandle<()>,
}

impl Served {
    fn streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
        self.session.close();
    }
}

/// Each name with its status, for comparing with an expected list.
fn expect(pairs: &[(&str, BindStatus)]) -> Vec<(String, BindStatus)> {
    pairs
        .iter()
        .map(|(name, status)| ((*name).to_owned(), *status))
        .collect()
}

/// A copy of a secret key (the type is deliberately not `Clone`).
fn same_key(key: &SecretKey) -> SecretKey {
    SecretKey::from_seed(&key.to_seed())
}

/// Makes `n` TLS visitors to `name` and asserts that each gets `200` from an origin.
async fn visit_ok(pki: &Pki, proxy: &TestProxy, name: &str, n: usize) {
    for i in 0..n {
        let response = within(30, https_get(proxy.https, name, pki.ca.root_store(), "/"))
            .await
            .unwrap_or_else(|err| panic!("visitor {i} to {name}: {err:#}"));
        assert_eq!(response.status, 200, "visitor {i} to {name}");
    }
}

/// Asserts that a TLS visitor to `name` is turned away by the proxy (no tunnel serves it).
async fn visit_refused(pki: &Pki, proxy: &TestProxy, name: &str) {
    let result = within(30, tls_connect(proxy.https, name, pki.ca.root_store())).await;
    assert!(
        result.is_err(),
        "a TLS visitor to {name} completed a handshake with someone"
    );
}

/// A client that publishes `hostname` at `target` through `proxy` with `key`.
fn client(
    pki: &Pki,
    proxy: &TestProxy,
    hostname: &str,
    target: SocketAddr,
    key: SecretKey,
) -> TestClient {
    let mut spec = ClientSpec::new(hostname, target, vec![proxy.dial()]);
    spec.key = key;
    TestClient::start(pki, spec).unwrap()
}

/// Waits until the client's only tunnel has been refused with a reason containing `text`:
/// given up on, or (a refusal by the policy, which a reload may change) waiting to ask again.
async fn wait_refused(client: &mut TestClient, text: &str) {
    within(
        20,
        client.client.wait_for(0, |s| {
            matches!(s, TunnelState::Failed { reason } | TunnelState::Waiting { reason }
                if reason.contains(text))
        }),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 1. A key the authorized file does not list for the name.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_not_authorized_for_the_name_binds_nothing() {
    init();
    let pki = Pki::new().unwrap();
    let owner = SecretKey::generate().unwrap();
    let attacker = SecretKey::generate().unwrap();
    let stranger = SecretKey::generate().unwrap();
    // The attacker is a customer too, with a name of its own.
    let authorized = authorize(TENANT, &owner) + &authorize("attacker.test", &attacker);
    let proxy = TestProxy::start(&pki, PROXY, &authorized).await.unwrap();
    let legit = HttpOrigin::tls(pki.origin_tls(&[TENANT])).await.unwrap();
    // The attacker's origin holds a certificate for the victim's name too, so a visitor routed
    // there would complete its handshake and count.
    let fake = HttpOrigin::tls(pki.origin_tls(&[TENANT, "attacker.test"]))
        .await
        .unwrap();

    // The attacker's real client asks first, while the name is free: refused, and it asks
    // again only after a long wait.
    let mut attacker_client = client(&pki, &proxy, TENANT, fake.addr(), same_key(&attacker));
    wait_refused(&mut attacker_client, "not authorized").await;

    // By hand: its own key for the victim's name, beside its own name. The proxy judges each
    // name: the attacker's name binds, the victim's is NotAuthorized.
    let mut raw = within(20, RawTunnel::open(&pki, proxy.https))
        .await
        .unwrap();
    let bind = raw.signed_bind(&attacker, &[TENANT, "attacker.test"]);
    assert_eq!(
        raw.bind_statuses(&bind).await,
        expect(&[
            (TENANT, BindStatus::NotAuthorized),
            ("attacker.test", BindStatus::Bound)
        ])
    );
    let attacker_tunnel = raw.serve(fake.addr());

    // A key in no line at all, and the owner's public key claimed without its secret (the
    // signature is the attacker's): NotAuthorized, and BadProof.
    let mut raw = within(20, RawTunnel::open(&pki, proxy.https))
        .await
        .unwrap();
    let bind = raw.signed_bind(&stranger, &[TENANT]);
    assert_eq!(
        raw.bind_statuses(&bind).await,
        expect(&[(TENANT, BindStatus::NotAuthorized)])
    );
    assert_eq!(within(20, raw.streams_until_closed()).await, 0);
    let mut raw = within(20, RawTunnel::open(&pki, proxy.https))
        .await
        .unwrap();
    let Message::Bind {
        signature,
        hostnames,
        ..
    } = raw.signed_bind(&attacker, &[TENANT])
    else {
        unreachable!()
    };
    let claimed = Message::Bind {
        key: owner.public().to_bytes(),
        signature,
        hostnames,
    };
    assert_eq!(
        raw.bind_statuses(&claimed).await,
        expect(&[(TENANT, BindStatus::BadProof)])
    );
    assert_eq!(within(20, raw.streams_until_closed()).await, 0);

    // The owner binds; every visitor of the name reaches the owner's origin.
    let mut owner_client = client(&pki, &proxy, TENANT, legit.addr(), owner);
    within(20, owner_client.wait_bound(1)).await;
    visit_ok(&pki, &proxy, TENANT, 6).await;
    assert_eq!(legit.accepted(), 6);
    assert_eq!(
        attacker_tunnel.streams(),
        0,
        "the attacker's tunnel got a visitor"
    );
    assert_eq!(fake.accepted(), 0, "the attacker's origin got a visitor");
    // Control: the attacker's tunnel is up and does get visitors of its own name.
    visit_ok(&pki, &proxy, "attacker.test", 1).await;
    assert_eq!(attacker_tunnel.streams(), 1);
    assert_eq!(fake.accepted(), 1);
    assert!(matches!(
        &attacker_client.client.states()[0].1,
        TunnelState::Waiting { reason } if reason.contains("not authorized")
    ));
}

// ---------------------------------------------------------------------------------------------
// 2. A valid Bind replayed on another connection.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_replayed_on_a_new_connection_is_a_bad_proof() {
    init();
    let pki = Pki::new().unwrap();
    let owner = SecretKey::generate().unwrap();
    let proxy = TestProxy::start(&pki, PROXY, &authorize(TENANT, &owner))
        .await
        .unwrap();
    let legit = HttpOrigin::tls(pki.origin_tls(&[TENANT])).await.unwrap();

    // The owner's tunnel, driven by hand so that its Bind can be captured byte for byte.
    let mut original = within(20, RawTunnel::open(&pki, proxy.https))
        .await
        .unwrap();
    let captured = original.signed_bind(&owner, &[TENANT]);
    assert_eq!(
        original.bind_statuses(&captured).await,
        expect(&[(TENANT, BindStatus::Bound)])
    );
    let (first_challenge, first_exporter) = (original.challenge, original.exporter);
    let owner_tunnel = original.serve(legit.addr());
    visit_ok(&pki, &proxy, TENANT, 1).await;

    // The same Bind on fresh connections, on the shared port and on the tunnel-only listener.
    // Each has its own challenge and exporter, so the signature covers neither.
    for (listener, addr) in [("https", proxy.https), ("tunnel", proxy.tunnel)] {
        let mut replay = within(20, RawTunnel::open(&pki, addr)).await.unwrap();
        assert_ne!(
            replay.challenge, first_challenge,
            "{listener}: a reused challenge"
        );
        assert_ne!(
            replay.exporter, first_exporter,
            "{listener}: a shared exporter"
        );
        assert_eq!(
            replay.bind_statuses(&captured).await,
            expect(&[(TENANT, BindStatus::BadProof)]),
            "{listener}"
        );
        assert_eq!(
            within(20, replay.streams_until_closed()).await,
            0,
            "{listener}: the replaying tunnel got a visitor"
        );
    }

    // And after the owner's tunnel has gone, with the name free: still refused.
    drop(owner_tunnel);
    let mut replay = within(20, RawTunnel::open(&pki, proxy.https))
        .await
        .unwrap();
    assert_eq!(
        replay.bind_statuses(&captured).await,
        expect(&[(TENANT, BindStatus::BadProof)])
    );
    assert_eq!(within(20, replay.streams_until_closed()).await, 0);

    // The owner's real client binds again; every visitor reaches the owner's origin.
    let mut owner_client = client(&pki, &proxy, TENANT, legit.addr(), owner);
    within(20, owner_client.wait_bound(1)).await;
    visit_ok(&pki, &proxy, TENANT, 5).await;
    assert_eq!(legit.accepted(), 6);
}

// ---------------------------------------------------------------------------------------------
// 3. A Bind relayed by a man in the middle over its own TLS session.
// ---------------------------------------------------------------------------------------------

/// What the man in the middle saw and got.
#[derive(Default)]
struct MitmReport {
    /// The exporter of the victim's TLS session with the man in the middle.
    victim_exporter: Option<[u8; EXPORTER_LEN]>,
    /// The exporter of the man in the middle's own TLS session with the proxy.
    upstream_exporter: Option<[u8; EXPORTER_LEN]>,
    /// The challenge the proxy sent (and the victim was given unchanged).
    challenge: Option<[u8; 32]>,
    /// The victim's Bind, as relayed.
    bind: Option<Message>,
    /// The proxy's answer to it.
    results: Option<Vec<BindOutcome>>,
}

/// A man in the middle in front of a proxy: it terminates the victim's tunnel TLS with a
/// certificate for the proxy's name that the victim trusts (a mis-issued one, say), opens its
/// own tunnel to the real proxy, and relays the control messages between the two. Any stream
/// the proxy opens to it goes to its own origin.
struct Mitm {
    addr: SocketAddr,
    report: Arc<Mutex<MitmReport>>,
    upstream_streams: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Mitm {
    async fn start(pki: &Pki, proxy: SocketAddr, fake_origin: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let tls = tokio_rustls::TlsAcceptor::from(
            pki.ca.issue(&[PROXY]).server_config(&[shroud_mux::ALPN]),
        );
        let report = Arc::new(Mutex::new(MitmReport::default()));
        let upstream_streams = Arc::new(AtomicUsize::new(0));
        let pki_ca = pki.ca_path.clone();
        let (seen, streams) = (report.clone(), upstream_streams.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (tls, seen, streams, ca) =
                    (tls.clone(), seen.clone(), streams.clone(), pki_ca.clone());
                tokio::spawn(async move {
                    if let Err(err) = relay(tcp, tls, &ca, proxy, fake_origin, seen, streams).await
                    {
                        tracing::debug!(%err, "man in the middle: relay ended");
                    }
                });
            }
        });
        Ok(Self {
            addr,
            report,
            upstream_streams,
            task,
        })
    }
}

impl Drop for Mitm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    tcp: TcpStream,
    tls: tokio_rustls::TlsAcceptor,
    ca: &std::path::Path,
    proxy: SocketAddr,
    fake_origin: SocketAddr,
    seen: Arc<Mutex<MitmReport>>,
    streams: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    // The victim's side: the man in the middle plays the proxy.
    let victim_tls = tls.accept(tcp).await?;
    let victim_exporter: [u8; EXPORTER_LEN] =
        victim_tls
            .get_ref()
            .1
            .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)?;
    let (victim_session, mut victim_incoming) =
        Session::spawn(victim_tls, Role::Proxy, SessionConfig::default());
    let mut down = victim_incoming
        .accept()
        .await
        .context("the victim opened no control stream")?;

    // Its own side: a tunnel to the real proxy, over its own TLS session.
    let config = shroud_client::tls::client_config(Some(ca))?;
    let upstream_tls = tls_connect_with(proxy, PROXY, config).await?;
    let upstream_exporter: [u8; EXPORTER_LEN] = upstream_tls.get_ref().1.export_keying_material(
        [0u8; EXPORTER_LEN],
        EXPORTER_LABEL,
        None,
    )?;
    let (upstream_session, mut upstream_incoming) =
        Session::spawn(upstream_tls, Role::Client, SessionConfig::default());
    let mut up = upstream_session.open().await?;
    {
        let mut report = seen.lock().unwrap();
        report.victim_exporter = Some(victim_exporter);
        report.upstream_exporter = Some(upstream_exporter);
    }

    // Hello down to up; Hello and Challenge up to down; the Bind down to up; the result back.
    let hello = control::read_message(&mut down).await?;
    control::write_message(&mut up, &hello).await?;
    let hello = control::read_message(&mut up).await?;
    control::write_message(&mut down, &hello).await?;
    let challenge = control::read_message(&mut up).await?;
    if let Message::Challenge { challenge } = &challenge {
        seen.lock().unwrap().challenge = Some(*challenge);
    }
    control::write_message(&mut down, &challenge).await?;
    let bind = control::read_message(&mut down).await?;
    seen.lock().unwrap().bind = Some(bind.clone());
    control::write_message(&mut up, &bind).await?;
    let result = control::read_message(&mut up).await?;
    if let Message::BindResult { results } = &result {
        seen.lock().unwrap().results = Some(results.clone());
    }
    control::write_message(&mut down, &result).await?;

    // Had anything bound, the proxy's visitors would arrive here; send them to its own origin.
    let _done = up.shutdown().await;
    while let Some(stream) = upstream_incoming.accept().await {
        streams.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(serve_stream(stream, fake_origin));
    }
    victim_session.close();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bind_relayed_through_a_man_in_the_middle_is_a_bad_proof() {
    init();
    let pki = Pki::new().unwrap();
    let owner = SecretKey::generate().unwrap();
    let proxy = TestProxy::start(&pki, PROXY, &authorize(TENANT, &owner))
        .await
        .unwrap();
    let legit = HttpOrigin::tls(pki.origin_tls(&[TENANT])).await.unwrap();
    let fake = HttpOrigin::tls(pki.origin_tls(&[TENANT])).await.unwrap();
    let mitm = Mitm::start(&pki, proxy.https, fake.addr()).await.unwrap();

    // The owner's real client is pointed at the man in the middle (DNS poisoned, say), whose
    // certificate it accepts. Its signature is good, for its own session; the proxy checks it
    // against the man in the middle's session and refuses it.
    let mut spec = ClientSpec::new(TENANT, legit.addr(), vec![(PROXY.to_owned(), mitm.addr)]);
    spec.key = same_key(&owner);
    let mut victim = TestClient::start(&pki, spec).unwrap();
    wait_refused(&mut victim, "signature did not verify").await;

    let report = std::mem::take(&mut *mitm.report.lock().unwrap());
    assert_eq!(
        report
            .results
            .expect("the proxy answered the relayed bind")
            .into_iter()
            .map(|o| (o.name, o.status))
            .collect::<Vec<_>>(),
        expect(&[(TENANT, BindStatus::BadProof)])
    );
    // Why: the victim signed the proxy's own challenge (relayed unchanged) over the exporter of
    // its session with the man in the middle, which is not the exporter of the session the
    // proxy holds.
    let (victim_exporter, upstream_exporter) = (
        report.victim_exporter.unwrap(),
        report.upstream_exporter.unwrap(),
    );
    assert_ne!(victim_exporter, upstream_exporter);
    let challenge = report.challenge.unwrap();
    let Some(Message::Bind {
        key,
        signature,
        hostnames,
    }) = report.bind
    else {
        panic!("no bind relayed");
    };
    let key = PublicKey::from_bytes(&key).unwrap();
    let names: Vec<String> = hostnames.into_iter().map(|h| h.name).collect();
    let over_victim = auth::bind_transcript(&challenge, &victim_exporter, &key, &names);
    let over_upstream = auth::bind_transcript(&challenge, &upstream_exporter, &key, &names);
    assert!(
        key.verify(&over_victim, &signature),
        "the victim's proof is genuine"
    );
    assert!(!key.verify(&over_upstream, &signature));

    // The owner reaches the proxy directly and binds; visitors reach the owner's origin and
    // nothing reaches the man in the middle.
    let mut owner_client = client(&pki, &proxy, TENANT, legit.addr(), owner);
    within(20, owner_client.wait_bound(1)).await;
    visit_ok(&pki, &proxy, TENANT, 5).await;
    assert_eq!(legit.accepted(), 5);
    assert_eq!(mitm.upstream_streams.load(Ordering::SeqCst), 0);
    assert_eq!(fake.accepted(), 0);
}

// ---------------------------------------------------------------------------------------------
// 4. A TXT record withdrawn while its key is bound.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txt_record_revoked_while_bound_unbinds_at_the_next_check() {
    init();
    let pki = Pki::new().unwrap();
    let dns = TestDns::start(TENANT).await.unwrap();
    let txt = format!("_shroud.{TENANT}");
    let revoked = SecretKey::generate().unwrap();
    let successor = SecretKey::generate().unwrap();
    // TTL 1 s: the proxy caches it for its floor, 5 s (deploy/README.md).
    dns.add_txt(&txt, &format!("shroud-key={}", revoked.public()), 1)
        .unwrap();
    // No authorized file: only DNS grants.
    let proxy = TestProxy::start_with_dns(&pki, PROXY, "", dns.addr)
        .await
        .unwrap();
    let old_origin = HttpOrigin::tls(pki.origin_tls(&[TENANT])).await.unwrap();
    let new_origin = HttpOrigin::tls(pki.origin_tls(&[TENANT])).await.unwrap();

    // A record covers exactly its name: the listed key gets no name below it.
    let a_tenant = format!("a.{TENANT}");
    let mut raw = within(20, RawTunnel::open(&pki, proxy.https))
        .await
        .unwrap();
    let bind = raw.signed_bind(&revoked, &[a_tenant.as_str()]);
    assert_eq!(
        raw.bind_statuses(&bind).await,
        expect(&[(a_tenant.as_str(), BindStatus::NotListed)])
    );
    assert_eq!(within(20, raw.streams_until_closed()).await, 0);

    // While the record lists it, the key serves the name.
    let mut old = client(&pki, &proxy, TENANT, old_origin.addr(), revoked);
    within(20, old.wait_bound(1)).await;
    visit_ok(&pki, &proxy, TENANT, 1).await;
    assert_eq!(old_origin.accepted(), 1);

    // The owner withdraws it (the key leaked, say) and lists a new one.
    let revoked_at = Instant::now();
    assert_eq!(dns.remove(&txt, RecordType::TXT), 1);
    dns.add_txt(&txt, &format!("shroud-key={}", successor.public()), 1)
        .unwrap();
    let mut new = client(&pki, &proxy, TENANT, new_origin.addr(), successor);

    // At the next check (the cached answer's expiry, at most 5 s away) the proxy unbinds the
    // name and closes the tunnel, which had no other.
    within(20, old.client.wait_for(0, |s| *s != TunnelState::Bound)).await;
    let unbound_after = revoked_at.elapsed();
    eprintln!("revoked key unbound {unbound_after:?} after the record was withdrawn");
    assert!(
        unbound_after < Duration::from_secs(5 + 3),
        "unbound only after {unbound_after:?}"
    );
    let old_seen = old_origin.accepted();

    // Every visitor from now on reaches the new key's origin; the revoked key's tunnel is
    // refused each time it comes back (NotListed, so it keeps trying) and gets none.
    within(30, new.wait_bound(1)).await;
    visit_ok(&pki, &proxy, TENANT, 5).await;
    assert_eq!(new_origin.accepted(), 5);
    within(
        30,
        old.client.wait_for(0, |s| {
            matches!(s, TunnelState::Waiting { reason } if reason.contains("_shroud.example.com"))
        }),
    )
    .await;
    visit_ok(&pki, &proxy, TENANT, 2).await;
    assert_eq!(new_origin.accepted(), 7);
    assert_eq!(
        old_origin.accepted() - old_seen,
        0,
        "the revoked key's origin got a visitor after it was unbound"
    );
    assert_eq!(
        old_seen, 1,
        "the revoked key's origin got a visitor after the revocation"
    );
    assert_ne!(old.client.states()[0].1, TunnelState::Bound);
}

// ---------------------------------------------------------------------------------------------
// 5. A visitor that offers ALPN shroud/1 to the proxy's own name, without a valid key.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_shroud_without_a_valid_key_binds_nothing_and_disturbs_no_one() {
    init();
    let pki = Pki::new().unwrap();
    let owner = SecretKey::generate().unwrap();
    let proxy = TestProxy::start(&pki, PROXY, &authorize(TENANT, &owner))
        .await
        .unwrap();
    let legit = HttpOrigin::tls(pki.origin_tls(&[TENANT])).await.unwrap();
    let mut owner_client = client(&pki, &proxy, TENANT, legit.addr(), owner);
    within(20, owner_client.wait_bound(1)).await;
    // Every state the owner's tunnel passes through from now on.
    let mut states = owner_client.client.watch_states();
    let left_bound = Arc::new(AtomicUsize::new(0));
    let counter = left_bound.clone();
    let watcher = tokio::spawn(async move {
        while states.changed().await.is_ok() {
            if states
                .borrow_and_update()
                .values()
                .any(|s| *s != TunnelState::Bound)
            {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    visit_ok(&pki, &proxy, TENANT, 1).await;

    // A browser-like visitor offering shroud/1 among others, to the proxy's name: the proxy
    // takes it for a tunnel (its own certificate, ALPN shroud/1). Its HTTP request is not
    // yamux, and the proxy hangs up.
    let config = client_config(pki.ca.root_store(), &[b"h2", b"http/1.1", shroud_mux::ALPN]);
    let mut tls = within(20, tls_connect_with(proxy.https, PROXY, config))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(shroud_mux::ALPN));
    let request = format!("GET / HTTP/1.1\r\nHost: {TENANT}\r\n\r\n");
    let _sent = tls.write_all(request.as_bytes()).await;
    let mut sink = Vec::new();
    let _closed = within(25, tls.read_to_end(&mut sink)).await;

    // No SNI at all (a visitor by IP address) with shroud/1: also a tunnel to the proxy, which
    // answers with its own ServerHello; nothing is routed.
    let hello = client_hello(
        client_config(pki.ca.root_store(), &[shroud_mux::ALPN]),
        "127.0.0.1",
    )
    .unwrap();
    let mut tcp = TcpStream::connect(proxy.https).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    let mut first = [0u8; 1];
    within(20, tcp.read_exact(&mut first)).await.unwrap();
    assert_eq!(
        first[0], 0x16,
        "the proxy answers a tunnel's handshake itself"
    );
    drop(tcp);

    // The whole tunnel protocol without a valid key. A key that is no curve point, and a
    // valid key with a zero signature: BadProof for every name.
    let not_a_point = (0u8..=255)
        .map(|b| [b; 32])
        .find(|bytes| PublicKey::from_bytes(bytes).is_err())
        .unwrap();
    let stranger = SecretKey::generate().unwrap();
    let names = vec![BindName {
        name: TENANT.into(),
        http: true,
    }];
    for (what, key) in [
        ("not a point", not_a_point),
        ("zero signature", stranger.public().to_bytes()),
    ] {
        let mut raw = within(20, RawTunnel::open(&pki, proxy.https))
            .await
            .unwrap();
        let bind = Message::Bind {
            key,
            signature: [0; 64],
            hostnames: names.clone(),
        };
        assert_eq!(
            raw.bind_statuses(&bind).await,
            expect(&[(TENANT, BindStatus::BadProof)]),
            "{what}"
        );
        assert_eq!(within(20, raw.streams_until_closed()).await, 0, "{what}");
    }
    // A valid, unlisted key, properly signed: the tenant's name is NotAuthorized and the
    // proxy's own name is no hostname a client may bind, whoever asks.
    let mut raw = within(20, RawTunnel::open(&pki, proxy.https))
        .await
        .unwrap();
    let bind = raw.signed_bind(&stranger, &[TENANT, PROXY]);
    assert_eq!(
        raw.bind_statuses(&bind).await,
        expect(&[
            (TENANT, BindStatus::NotAuthorized),
            (PROXY, BindStatus::InvalidHostname)
        ])
    );
    assert_eq!(within(20, raw.streams_until_closed()).await, 0);
    // Out of order: a Bind before Hello, and a Bind naming nothing. The proxy answers Error
    // and closes.
    let mut raw = within(20, RawTunnel::connect(&pki, proxy.https))
        .await
        .unwrap();
    let bind = raw.signed_bind(&stranger, &[TENANT]);
    let answer = within(20, raw.bind(&bind)).await.unwrap();
    assert!(
        matches!(
            answer,
            Err(Message::Error {
                code: ErrorCode::UnexpectedMessage,
                ..
            })
        ),
        "{answer:?}"
    );
    assert_eq!(within(20, raw.streams_until_closed()).await, 0);
    let mut raw = within(20, RawTunnel::open(&pki, proxy.https))
        .await
        .unwrap();
    let empty = raw.signed_bind(&stranger, &[]);
    let answer = within(20, raw.bind(&empty)).await.unwrap();
    assert!(
        matches!(
            answer,
            Err(Message::Error {
                code: ErrorCode::UnexpectedMessage,
                ..
            })
        ),
        "{answer:?}"
    );
    assert_eq!(within(20, raw.streams_until_closed()).await, 0);

    // shroud/1 with a tenant's name is an ordinary visitor: its TLS goes to the tenant's
    // origin, which completes the handshake with its own certificate.
    let config = client_config(pki.ca.root_store(), &[shroud_mux::ALPN, b"http/1.1"]);
    let tls = within(20, tls_connect_with(proxy.https, TENANT, config))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    drop(tls);
    within(20, legit.wait_accepted(2)).await;

    // Nothing was bound: the proxy's own name routes nowhere. And the owner's tunnel never
    // left its bound state; its visitors all arrive.
    visit_refused(&pki, &proxy, PROXY).await;
    visit_ok(&pki, &proxy, TENANT, 3).await;
    assert_eq!(legit.accepted(), 5);
    assert_eq!(
        left_bound.load(Ordering::SeqCst),
        0,
        "the owner's tunnel was disturbed"
    );
    assert_eq!(owner_client.client.states()[0].1, TunnelState::Bound);
    watcher.abort();
}

// ---------------------------------------------------------------------------------------------
// 6. A wildcard grant stretched to names it does not cover.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_grant_covers_names_below_only() {
    init();
    let pki = Pki::new().unwrap();
    let holder = SecretKey::generate().unwrap();
    let apex_owner = SecretKey::generate().unwrap();
    let authorized = format!("*.{TENANT} {}\n", holder.public()) + &authorize(TENANT, &apex_owner);
    let proxy = TestProxy::start(&pki, PROXY, &authorized).await.unwrap();
    let names = [
        TENANT,
        "evil-example.com",
        "example.com.evil.test",
        "a.example.com",
        "a.b.example.com",
    ];
    // The wildcard holder's origin has a certificate for every name tried, so any visitor
    // routed to it would complete its handshake and count.
    let holder_origin = HttpOrigin::tls(pki.origin_tls(&names)).await.unwrap();
    let apex_origin = HttpOrigin::tls(pki.origin_tls(&[TENANT])).await.unwrap();

    let mut raw = within(20, RawTunnel::open(&pki, proxy.https))
        .await
        .unwrap();
    let bind = raw.signed_bind(&holder, &names);
    assert_eq!(
        raw.bind_statuses(&bind).await,
        expect(&[
            (TENANT, BindStatus::NotAuthorized),
            ("evil-example.com", BindStatus::NotAuthorized),
            ("example.com.evil.test", BindStatus::NotAuthorized),
            ("a.example.com", BindStatus::Bound),
            ("a.b.example.com", BindStatus::Bound),
        ])
    );
    let holder_tunnel = raw.serve(holder_origin.addr());
    // The holder's real client, for the apex: refused.
    let mut apex_try = client(
        &pki,
        &proxy,
        TENANT,
        holder_origin.addr(),
        same_key(&holder),
    );
    wait_refused(&mut apex_try, "not authorized").await;

    let mut apex = client(&pki, &proxy, TENANT, apex_origin.addr(), apex_owner);
    within(20, apex.wait_bound(1)).await;
    visit_ok(&pki, &proxy, TENANT, 3).await;
    visit_refused(&pki, &proxy, "evil-example.com").await;
    visit_refused(&pki, &proxy, "example.com.evil.test").await;
    assert_eq!(apex_origin.accepted(), 3);
    assert_eq!(
        holder_tunnel.streams(),
        0,
        "the wildcard holder's tunnel got a visitor"
    );
    assert_eq!(
        holder_origin.accepted(),
        0,
        "the wildcard holder's origin got a visitor"
    );
    // Control: the names the wildcard does cover reach the holder.
    visit_ok(&pki, &proxy, "a.example.com", 1).await;
    visit_ok(&pki, &proxy, "a.b.example.com", 1).await;
    assert_eq!(holder_tunnel.streams(), 2);
    assert_eq!(holder_origin.accepted(), 2);
}

// ---------------------------------------------------------------------------------------------
// 7. Spellings of a name.
// ---------------------------------------------------------------------------------------------

/// The A-label of `bücher.example`, and the Unicode form.
const IDN: &str = "xn--bcher-kva.example";
const IDN_UNICODE: &str = "bücher.example";

/// A real ClientHello (rustls's) whose SNI carries `sni` byte for byte, including spellings
/// rustls never sends itself (it strips a trailing dot; it refuses non-ASCII): made for a
/// placeholder of the same length, into which `sni` is then written.
fn hello_with_sni(sni: &[u8]) -> Vec<u8> {
    assert!(sni.len() > 5);
    let placeholder = format!("{}.test", "q".repeat(sni.len() - 5));
    let config = client_config(rustls::RootCertStore::empty(), &[b"http/1.1"]);
    let mut hello = client_hello(config, &placeholder).unwrap();
    let at: Vec<usize> = hello
        .windows(sni.len())
        .enumerate()
        .filter(|(_, w)| *w == placeholder.as_bytes())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        at.len(),
        1,
        "the placeholder appears once in the ClientHello"
    );
    hello[at[0]..at[0] + sni.len()].copy_from_slice(sni);
    hello
}

/// Sends a ClientHello whose SNI is `sni` and returns the connection.
async fn send_hello(proxy: &TestProxy, sni: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(proxy.https).await.unwrap();
    tcp.write_all(&hello_with_sni(sni)).await.unwrap();
    tcp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spellings_of_a_name_match_its_tenant_and_nothing_else_does() {
    init();
    let pki = Pki::new().unwrap();
    let owner = SecretKey::generate().unwrap();
    let idn_owner = SecretKey::generate().unwrap();
    // The authorized file may spell the name as it likes; it is normalised when read.
    let authorized = format!("Example.COM. {}\n", owner.public()) + &authorize(IDN, &idn_owner);
    let proxy = TestProxy::start(&pki, PROXY, &authorized).await.unwrap();
    let tls_origin = HttpOrigin::tls(pki.origin_tls(&[TENANT])).await.unwrap();
    let http_origin = HttpOrigin::plain().await.unwrap();
    let idn_origin = HttpOrigin::tls(pki.origin_tls(&[IDN])).await.unwrap();
    let mut spec = ClientSpec::new(TENANT, tls_origin.addr(), vec![proxy.dial()]);
    spec.key = same_key(&owner);
    spec.http_target = Some(http_origin.addr());
    let mut tenant = TestClient::start(&pki, spec).unwrap();
    let mut idn_tenant = client(&pki, &proxy, IDN, idn_origin.addr(), idn_owner);
    within(20, tenant.wait_bound(1)).await;
    within(20, idn_tenant.wait_bound(1)).await;

    // Binds must carry the normal form: other spellings, and the Unicode form, are
    // InvalidHostname even for the key the name belongs to.
    let mut raw = within(20, RawTunnel::open(&pki, proxy.https))
        .await
        .unwrap();
    let bind = raw.signed_bind(&owner, &["Example.com", "example.com.", IDN_UNICODE]);
    assert_eq!(
        raw.bind_statuses(&bind).await,
        expect(&[
            ("Example.com", BindStatus::InvalidHostname),
            ("example.com.", BindStatus::InvalidHostname),
            (IDN_UNICODE, BindStatus::InvalidHostname),
        ])
    );
    assert_eq!(within(20, raw.streams_until_closed()).await, 0);
    // An authorized file cannot name the Unicode form either: the operator writes the A-label.
    let unicode_line = format!(
        "{IDN_UNICODE} {}\n",
        SecretKey::generate().unwrap().public()
    );
    assert!(shroud_proxy::policy::Policy::parse(&unicode_line).is_err());

    // TLS: upper case and a trailing dot reach the tenant. rustls keeps the case but strips a
    // trailing dot, so that spelling is sent by hand and counted at the origin.
    visit_ok(&pki, &proxy, "EXAMPLE.COM", 1).await;
    visit_ok(&pki, &proxy, "Example.Com", 1).await;
    assert_eq!(tls_origin.accepted(), 2);
    let dotted = send_hello(&proxy, b"example.com.").await;
    within(20, tls_origin.wait_accepted(3)).await;
    drop(dotted);
    // The A-label reaches its tenant in any case; the Unicode form is not a hostname: the proxy
    // hangs up without routing it anywhere.
    visit_ok(&pki, &proxy, IDN, 1).await;
    visit_ok(&pki, &proxy, "XN--BCHER-KVA.Example", 1).await;
    assert_eq!(idn_origin.accepted(), 2);
    let mut unicode = send_hello(&proxy, IDN_UNICODE.as_bytes()).await;
    let mut sink = Vec::new();
    let _closed = within(20, unicode.read_to_end(&mut sink)).await;
    assert!(
        sink.is_empty(),
        "the proxy answered a non-ASCII SNI: {sink:?}"
    );
    assert_eq!(idn_origin.accepted(), 2);
    assert_eq!(tls_origin.accepted(), 3);

    // Plain HTTP: a port, upper case and a trailing dot in Host reach the tenant.
    for host in [
        "example.com:80",
        "EXAMPLE.COM.",
        "example.com.:8080",
        "Example.Com:",
    ] {
        let response = within(20, http_get(proxy.http, host, "/")).await.unwrap();
        assert_eq!(response.status, 200, "Host: {host}");
    }
    assert_eq!(http_origin.accepted(), 4);
    // The A-label is bound (without plain HTTP: the proxy redirects); the Unicode form is not a
    // hostname.
    let response = within(20, http_get(proxy.http, IDN, "/")).await.unwrap();
    assert_eq!(response.status, 308);
    assert_eq!(
        response.header("location"),
        Some("https://xn--bcher-kva.example/")
    );
    // User information, a port that is no port, and other junk around the name: 400, and
    // nothing reaches any origin.
    for host in [
        "user@example.com",
        "user:pass@example.com",
        "example.com@evil.test",
        "example.com:80@evil.test",
        "example.com:80:80",
        "example.com:99999",
        "example.com:http",
        "example.com evil.test",
        IDN_UNICODE,
    ] {
        let response = within(20, http_get(proxy.http, host, "/")).await.unwrap();
        assert_eq!(response.status, 400, "Host: {host}");
    }
    let absolute = b"GET http://user@example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n";
    let response = within(20, raw_http(proxy.http, absolute)).await.unwrap();
    assert_eq!(
        response.status, 400,
        "absolute-form target with user information"
    );
    assert_eq!(http_origin.accepted(), 4);
    assert_eq!(tls_origin.accepted(), 3);
    assert_eq!(idn_origin.accepted(), 2);
}

// ---------------------------------------------------------------------------------------------
// 8. A keep-alive connection whose next request names another tenant.
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 origin that keeps connections alive and records the `Host` of every request,
/// answering each with `{tenant} answered Host: {host}`.
struct KeepAliveOrigin {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    hosts: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl KeepAliveOrigin {
    async fn start(
        tenant: &'static str,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let hosts = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), hosts.clone());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (seen, acceptor) = (seen.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let served = match acceptor {
                        None => answer_requests(tcp, tenant, seen).await,
                        Some(acceptor) => match acceptor.accept(tcp).await {
                            Ok(tls) => answer_requests(tls, tenant, seen).await,
                            Err(err) => Err(err.into()),
                        },
                    };
                    if let Err(err) = served {
                        tracing::debug!(%err, "keep-alive origin connection ended");
                    }
                });
            }
        });
        Ok(Self {
            addr,
            accepted,
            hosts,
            task,
        })
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn hosts(&self) -> Vec<String> {
        self.hosts.lock().unwrap().clone()
    }
}

impl Drop for KeepAliveOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one message head (up to the blank line) from `io`, keeping what follows in `buf`.
/// `None` at a clean end of stream between messages.
async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
) -> anyhow::Result<Option<String>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf.drain(..end + 4).collect())?;
            return Ok(Some(head));
        }
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            ensure!(buf.is_empty(), "connection closed inside a message head");
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn answer_requests<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    tenant: &'static str,
    seen: Arc<Mutex<Vec<String>>>,
) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    while let Some(head) = read_head(&mut io, &mut buf).await? {
        let host = header_value(&head, "host").unwrap_or_default().to_owned();
        seen.lock().unwrap().push(host.clone());
        let close = header_value(&head, "connection").is_some_and(|v| v == "close");
        let body = format!("{tenant} answered Host: {host}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Tenant: {tenant}\r\n\r\n{body}",
            body.len()
        );
        io.write_all(response.as_bytes()).await?;
        io.flush().await?;
        if close {
            io.shutdown().await?;
            break;
        }
    }
    Ok(())
}

/// Reads one response with a Content-Length body; returns its `X-Tenant` and body.
async fn read_response<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
) -> anyhow::Result<(String, String)> {
    let head = read_head(io, buf).await?.context("no response")?;
    ensure!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let length: usize = header_value(&head, "content-length")
        .context("no Content-Length")?
        .parse()?;
    while buf.len() < length {
        let mut chunk = [0u8; 4096];
        let n = io.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed inside a body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8(buf.drain(..length).collect())?;
    let tenant = header_value(&head, "x-tenant")
        .unwrap_or_default()
        .to_owned();
    Ok((tenant, body))
}

/// Two requests on one connection, the second for `second_host`; if `pipelined`, both are
/// written before either answer is read. Returns each answer's tenant and body.
async fn two_requests<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    first_host: &str,
    second_host: &str,
    pipelined: bool,
) -> anyhow::Result<[(String, String); 2]> {
    let request = |host: &str| format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut buf = Vec::new();
    io.write_all(request(first_host).as_bytes()).await?;
    if pipelined {
        io.write_all(request(second_host).as_bytes()).await?;
    }
    io.flush().await?;
    let first = read_response(io, &mut buf).await?;
    if !pipelined {
        io.write_all(request(second_host).as_bytes()).await?;
        io.flush().await?;
    }
    let second = read_response(io, &mut buf).await?;
    Ok([first, second])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_request_for_another_tenant_stays_with_the_first() {
    init();
    let pki = Pki::new().unwrap();
    const A: &str = "a.example.com";
    const B: &str = "b.example.com";
    let key_a = SecretKey::generate().unwrap();
    let key_b = SecretKey::generate().unwrap();
    let proxy = TestProxy::start(&pki, PROXY, &(authorize(A, &key_a) + &authorize(B, &key_b)))
        .await
        .unwrap();
    let a_tls = KeepAliveOrigin::start("a", Some(pki.origin_tls(&[A])))
        .await
        .unwrap();
    let a_plain = KeepAliveOrigin::start("a", None).await.unwrap();
    let b_tls = KeepAliveOrigin::start("b", Some(pki.origin_tls(&[B])))
        .await
        .unwrap();
    let b_plain = KeepAliveOrigin::start("b", None).await.unwrap();
    let mut clients = Vec::new();
    for (name, key, tls, plain) in [(A, key_a, &a_tls, &a_plain), (B, key_b, &b_tls, &b_plain)] {
        let mut spec = ClientSpec::new(name, tls.addr, vec![proxy.dial()]);
        spec.key = key;
        spec.http_target = Some(plain.addr);
        let mut client = TestClient::start(&pki, spec).unwrap();
        within(20, client.wait_bound(1)).await;
        clients.push(client);
    }

    // The proxy routes a connection once, by its first request's Host (or its SNI), and then
    // only copies bytes. A later request on the same connection naming tenant B therefore
    // goes to tenant A's origin, never to B's. That cannot matter: the bytes go to A, which
    // the visitor chose to connect to and which chose to serve them, exactly as if the
    // visitor had connected to A directly and sent A a request naming B. (A real server then
    // answers 421 Misdirected Request, or whatever its virtual hosts say.)
    for pipelined in [false, true] {
        let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
        let answers = within(20, two_requests(&mut tcp, A, B, pipelined))
            .await
            .unwrap();
        assert_eq!(
            answers,
            [
                ("a".to_owned(), format!("a answered Host: {A}\n")),
                ("a".to_owned(), format!("a answered Host: {B}\n")),
            ],
            "plain HTTP, pipelined: {pipelined}"
        );
    }
    // Over TLS the proxy cannot even see the second request: it is inside A's TLS session.
    let mut tls = within(20, tls_connect(proxy.https, A, pki.ca.root_store()))
        .await
        .unwrap();
    let answers = within(20, two_requests(&mut tls, A, B, false))
        .await
        .unwrap();
    assert_eq!(answers[1].0, "a");

    assert_eq!(a_plain.accepted(), 2);
    assert_eq!(a_plain.hosts(), [A, B, A, B]);
    assert_eq!(a_tls.accepted(), 1);
    assert_eq!(a_tls.hosts(), [A, B]);
    assert_eq!(b_plain.accepted(), 0, "tenant B's origin saw a connection");
    assert_eq!(b_tls.accepted(), 0, "tenant B's origin saw a connection");
    assert!(b_plain.hosts().is_empty() && b_tls.hosts().is_empty());

    // Control: B's own visitors do reach B.
    let response = within(20, http_get(proxy.http, B, "/")).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-tenant"), Some("b"));
    assert_eq!(b_plain.accepted(), 1);
}
