//! [`hold`] against a fake proxy over in-memory pipes, TLS, yamux and the control handshake
//! included: the reconnect schedule, the keepalive deadline and the drain, as the tunnel task
//! really runs them. Most tests run in paused time, which makes the schedule exact (to tokio's
//! millisecond timer tick) and the tests instant.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use futures::future::BoxFuture;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use shroud_mux::auth::SecretKey;
use shroud_mux::header::{self, StreamHeader, StreamKind};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, DuplexStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::*;
use tokio_util::task::TaskTracker;

use crate::shared::{States, Target, Timing};
use crate::transport::{BoxStream, Transport};

const HOST: &str = "example.test";
const PROXY: &str = "proxy.test";
/// The origin of tests whose proxy opens no data stream: never dialled.
const NO_ORIGIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// How long a test waits for what it expects, in paused time: long enough for any schedule
/// here, and a failure that is quick to reach (paused time runs at CPU speed).
const PATIENCE: Duration = Duration::from_secs(24 * 3600);

/// Awaits `fut`, failing the test if it takes longer than [`PATIENCE`].
#[track_caller]
fn patiently<F: Future>(fut: F) -> impl Future<Output = F::Output> {
    let caller = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(PATIENCE, fut).await {
            Ok(output) => output,
            Err(_) => panic!("the step at {caller} did not finish within {PATIENCE:?}"),
        }
    }
}

/// Timing with round numbers: pings every 10 s, delays from 1 s doubling to 16 s, a session
/// stable after 60 s.
fn timing() -> Timing {
    Timing {
        keepalive_interval: secs(10),
        backoff_base: secs(1),
        backoff_cap: secs(16),
        stable_after: secs(60),
        ..Timing::default()
    }
}

/// What the fake proxy saw, when, and on which connection attempt (counted from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Event {
    at: Instant,
    conn: usize,
    what: What,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    /// The client tried to connect.
    Attempt,
    /// The proxy sent the bind result: the tunnel is up.
    Bound,
    /// A ping from the client arrived.
    Ping,
    /// The proxy sent go-away.
    GoAway,
    /// The session ended, closed by either side.
    Ended,
}

/// Everything the fake proxy saw, in order.
#[derive(Clone)]
struct Log(Arc<watch::Sender<Vec<Event>>>);

impl Log {
    fn new() -> Self {
        Self(Arc::new(watch::channel(Vec::new()).0))
    }

    fn note(&self, conn: usize, what: What) {
        let at = Instant::now();
        self.0
            .send_modify(|events| events.push(Event { at, conn, what }));
    }

    /// Every event so far.
    fn snapshot(&self) -> Vec<Event> {
        self.0.borrow().clone()
    }

    /// Waits until the events satisfy `done`, and returns them.
    #[track_caller]
    fn wait_for(&self, done: impl Fn(&[Event]) -> bool) -> impl Future<Output = Vec<Event>> {
        let mut events = self.0.subscribe();
        patiently(async move {
            let seen = events.wait_for(|events| done(events)).await;
            seen.map(|events| events.clone())
                .expect("the log's sender lives in self")
        })
    }
}

fn time_of(events: &[Event], conn: usize, what: What) -> Option<Instant> {
    events
        .iter()
        .find(|e| e.conn == conn && e.what == what)
        .map(|e| e.at)
}

/// Every time `what` happened, on any connection.
fn times(events: &[Event], what: What) -> Vec<Instant> {
    events
        .iter()
        .filter(|e| e.what == what)
        .map(|e| e.at)
        .collect()
}

fn has(conn: usize, what: What) -> impl Fn(&[Event]) -> bool {
    move |events| time_of(events, conn, what).is_some()
}

fn attempts_at_least(n: usize) -> impl Fn(&[Event]) -> bool {
    move |events| times(events, What::Attempt).len() >= n
}

/// Asserts that `waited` is a reconnect delay whose ceiling was `ceiling`: drawn from
/// `[ceiling / 2, ceiling]`, then rounded up to tokio's 1 ms timer tick.
#[track_caller]
fn assert_delay(waited: Duration, ceiling: Duration, what: &str) {
    assert!(
        waited >= ceiling / 2 && waited < ceiling + Duration::from_millis(1),
        "{what}: waited {waited:?}, not within [{:?}, {ceiling:?}]",
        ceiling / 2
    );
}

/// What the fake proxy does with one connection attempt.
enum Plan {
    /// Refuse it, as a proxy that is down or restarting does.
    Refuse,
    /// Complete TLS and the bind, then run the script on the proxy's end of the tunnel.
    Bind(Script),
    /// Complete TLS, then refuse the bind with this status, and close.
    RefuseBind(BindStatus),
}

type Script = Box<dyn FnOnce(ProxyEnd) -> BoxFuture<'static, ()> + Send>;

fn bind<F, Fut>(script: F) -> Plan
where
    F: FnOnce(ProxyEnd) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Plan::Bind(Box::new(move |end| Box::pin(script(end))))
}

/// A proxy behind a [`Transport`]: each connection attempt takes the next plan (refusing once
/// there are none left) and is logged.
struct FakeProxy {
    plans: Mutex<VecDeque<Plan>>,
    attempts: AtomicUsize,
    log: Log,
    tls: TlsAcceptor,
}

impl Transport for FakeProxy {
    fn connect<'a>(&'a self, _host: &'a str, _port: u16) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            let conn = self.attempts.fetch_add(1, Ordering::SeqCst);
            self.log.note(conn, What::Attempt);
            let plan = self.plans.lock().unwrap().pop_front();
            match plan.unwrap_or(Plan::Refuse) {
                Plan::Refuse => Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "the fake proxy refuses",
                )),
                Plan::Bind(script) => {
                    let (client, proxy) = tokio::io::duplex(64 * 1024);
                    let tunnel =
                        serve_tunnel(proxy, self.tls.clone(), conn, script, self.log.clone());
                    tokio::spawn(tunnel);
                    Ok(Box::new(client) as BoxStream)
                }
                Plan::RefuseBind(status) => {
                    let (client, proxy) = tokio::io::duplex(64 * 1024);
                    tokio::spawn(refuse_bind(proxy, self.tls.clone(), status));
                    Ok(Box::new(client) as BoxStream)
                }
            }
        })
    }

    fn name(&self) -> &'static str {
        "fake"
    }
}

/// The proxy's side of one tunnel: TLS, the control handshake, then the script.
async fn serve_tunnel(io: DuplexStream, tls: TlsAcceptor, conn: usize, script: Script, log: Log) {
    let tls = tls.accept(io).await.expect("TLS with the client");
    let (session, mut incoming) = Session::spawn(tls, Role::Proxy, SessionConfig::default());
    let mut control = incoming.accept().await.expect("the control stream");
    bind_any(&mut control).await;
    log.note(conn, What::Bound);

    let watched = session.clone();
    let ended = log.clone();
    tokio::spawn(async move {
        watched.closed().await;
        ended.note(conn, What::Ended);
    });
    let (mut reader, writer) = tokio::io::split(control);
    let (messages_tx, messages) = mpsc::unbounded_channel();
    let pings = log.clone();
    tokio::spawn(async move {
        while let Ok(message) = control::read_message(&mut reader).await {
            if matches!(message, Message::Ping { .. }) {
                pings.note(conn, What::Ping);
            }
            // Scripts that stopped listening still get their pings logged.
            let _ = messages_tx.send(message);
        }
    });
    script(ProxyEnd {
        conn,
        session,
        messages,
        writer,
        log,
    })
    .await;
}

/// The proxy's side of a tunnel whose bind it refuses with `status`.
async fn refuse_bind(io: DuplexStream, tls: TlsAcceptor, status: BindStatus) {
    let tls = tls.accept(io).await.expect("TLS with the client");
    let (session, mut incoming) = Session::spawn(tls, Role::Proxy, SessionConfig::default());
    let mut control = incoming.accept().await.expect("the control stream");
    bind_with(&mut control, status).await;
    // The client reads the result, then closes.
    let mut rest = Vec::new();
    let _ = control.read_to_end(&mut rest).await;
    session.close();
}

/// Hello, challenge, bind, and every name bound. The proof is not checked: binding is not what
/// these tests are about.
async fn bind_any(control: &mut MuxStream) {
    bind_with(control, BindStatus::Bound).await;
}

/// Hello, challenge, bind, and every name given `status`.
async fn bind_with(control: &mut MuxStream, status: BindStatus) {
    let hello = control::read_message(control).await.expect("hello");
    assert!(matches!(hello, Message::Hello { .. }), "{hello:?}");
    let hello = Message::Hello {
        versions: vec![shroud_mux::control::VERSION],
    };
    control::write_message(control, &hello)
        .await
        .expect("hello");
    let challenge = Message::Challenge { challenge: [9; 32] };
    control::write_message(control, &challenge)
        .await
        .expect("challenge");
    let Message::Bind { hostnames, .. } = control::read_message(control).await.expect("bind")
    else {
        panic!("expected a bind");
    };
    let results = hostnames
        .into_iter()
        .map(|name| BindOutcome {
            name: name.name,
            status,
            reason: match status {
                BindStatus::Bound => String::new(),
                _ => "not on this proxy's list".into(),
            },
        })
        .collect();
    control::write_message(control, &Message::BindResult { results })
        .await
        .expect("bind result");
}

/// The proxy's end of a bound tunnel, for a script to drive.
struct ProxyEnd {
    conn: usize,
    session: Session,
    messages: mpsc::UnboundedReceiver<Message>,
    writer: WriteHalf<MuxStream>,
    log: Log,
}

impl ProxyEnd {
    /// Answers every ping for `period`, or until the control stream ends.
    async fn answer_pings_for(&mut self, period: Duration) {
        let until = Instant::now() + period;
        while let Ok(Some(message)) = tokio::time::timeout_at(until, self.messages.recv()).await {
            self.answer(message).await;
        }
    }

    /// Answers the first `count` pings and none after, until the control stream ends.
    async fn answer_pings(&mut self, count: usize) {
        let mut answered = 0;
        while let Some(message) = self.messages.recv().await {
            if answered < count && matches!(message, Message::Ping { .. }) {
                self.answer(message).await;
                answered += 1;
            }
        }
    }

    async fn answer(&mut self, message: Message) {
        if let Message::Ping { nonce } = message {
            // The client may have closed the tunnel meanwhile.
            let _ = control::write_message(&mut self.writer, &Message::Pong { nonce }).await;
        }
    }

    /// Pings the client; true if the matching pong came back.
    async fn ping(&mut self, nonce: u64) -> bool {
        let ping = Message::Ping { nonce };
        if control::write_message(&mut self.writer, &ping)
            .await
            .is_err()
        {
            return false;
        }
        while let Some(message) = self.messages.recv().await {
            if message == (Message::Pong { nonce }) {
                return true;
            }
        }
        false
    }

    /// Takes `hostname` from the tunnel, as a proxy whose authorization was reloaded does.
    async fn unbind(&mut self, hostname: &str, status: BindStatus) {
        let unbound = Message::Unbound {
            hostname: hostname.into(),
            status,
            reason: "the authorized file no longer lists it".into(),
        };
        control::write_message(&mut self.writer, &unbound)
            .await
            .expect("unbound");
    }

    async fn go_away(&mut self) {
        let go_away = Message::GoAway {
            reason: "restarting".into(),
        };
        control::write_message(&mut self.writer, &go_away)
            .await
            .expect("go-away");
        self.log.note(self.conn, What::GoAway);
    }

    /// Opens a data stream as the proxy does for a TLS visitor, sends `payload`, half-closes,
    /// and returns what comes back once the client has acknowledged the stream.
    async fn visit(&self, payload: &[u8]) -> io::Result<Vec<u8>> {
        let mut stream = self.session.open().await.map_err(io::Error::other)?;
        let header = StreamHeader {
            hostname: HOST.to_owned(),
            kind: StreamKind::Tls,
            visitor: SocketAddr::from(([192, 0, 2, 1], 5000)),
            public_port: 443,
        };
        let mut first = header.encode();
        first.extend_from_slice(payload);
        stream.write_all(&first).await?;
        stream.shutdown().await?;
        header::read_ack(&mut stream).await?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await?;
        Ok(back)
    }

    /// Opens a data stream with `header`, and returns it once the client has acknowledged it.
    async fn open(&self, header: &StreamHeader) -> io::Result<MuxStream> {
        let mut stream = self.session.open().await.map_err(io::Error::other)?;
        stream.write_all(&header.encode()).await?;
        header::read_ack(&mut stream).await?;
        Ok(stream)
    }
}

/// Sends `payload` as a visitor does, half-closes, and returns all that comes back.
async fn exchange<S>(mut visitor: S, payload: &[u8]) -> io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    visitor.write_all(payload).await?;
    visitor.shutdown().await?;
    let mut back = Vec::new();
    visitor.read_to_end(&mut back).await?;
    Ok(back)
}

/// A CA, the fake proxy's certificate for [`PROXY`] issued by it, and the client's TLS settings
/// that trust the CA (the real ones, with `--proxy-ca`).
fn tls_pair() -> (TlsAcceptor, Arc<rustls::ClientConfig>) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![PROXY.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let client = crate::tls::client_config(Some(&ca_path)).unwrap();

    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    server.alpn_protocols = vec![shroud_mux::ALPN.to_vec()];
    (TlsAcceptor::from(Arc::new(server)), client)
}

/// A tunnel task running [`hold`] against a fake proxy that follows `plans`.
struct Held {
    log: Log,
    states: watch::Receiver<States>,
    proxy: ProxyAddr,
    /// This tunnel's stop, as when its proxy leaves the list.
    stop: CancellationToken,
    /// The whole client's shutdown.
    shutdown: CancellationToken,
    tracker: TaskTracker,
    task: JoinHandle<Option<String>>,
    /// What SIGHUP does: asks a tunnel waiting after a policy refusal to try again now.
    retry: watch::Sender<u64>,
}

impl Held {
    fn start(plans: Vec<Plan>, timing: Timing, origin: SocketAddr) -> Self {
        Self::start_terminating_tls(plans, timing, origin, None)
    }

    /// [`Held::start`], with the client terminating visitors' TLS with `origin_tls` (as with
    /// `--tls-cert`) if given.
    fn start_terminating_tls(
        plans: Vec<Plan>,
        timing: Timing,
        origin: SocketAddr,
        origin_tls: Option<TlsAcceptor>,
    ) -> Self {
        Self::start_with(plans, timing, origin, origin_tls, None)
    }

    /// [`Held::start`] through a transport with circuits: each connection on the circuit
    /// held, or on a new one counted in `circuits.built`, charged to `circuits.budget`.
    fn start_with_circuits(plans: Vec<Plan>, timing: Timing, circuits: &FakeCircuits) -> Self {
        Self::start_with(plans, timing, NO_ORIGIN, None, Some(circuits.clone()))
    }

    fn start_with(
        plans: Vec<Plan>,
        timing: Timing,
        origin: SocketAddr,
        origin_tls: Option<TlsAcceptor>,
        circuits: Option<FakeCircuits>,
    ) -> Self {
        let (acceptor, client_tls) = tls_pair();
        let log = Log::new();
        let fake = FakeProxy {
            plans: Mutex::new(plans.into()),
            attempts: AtomicUsize::new(0),
            log: log.clone(),
            tls: acceptor,
        };
        let budget = circuits.as_ref().map_or_else(
            || Arc::new(crate::circuits::CircuitBudget::default()),
            |c| c.budget.clone(),
        );
        let transport: Arc<dyn Transport> = match circuits {
            Some(circuits) => Arc::new(Circuited {
                proxy: Arc::new(fake),
                circuits,
            }),
            None => Arc::new(fake),
        };
        let target = Target {
            host: origin.ip().to_string(),
            port: origin.port(),
        };
        let config = ClientConfig {
            hostname: HOST.to_owned(),
            target: target.clone(),
            http_target: Some(target),
            acme: None,
            origin_tls,
            transport,
            tls: client_tls,
            key: SecretKey::from_seed(&[7; 32]),
            timing,
            metrics: Arc::default(),
        };
        let proxy = ProxyAddr::new(PROXY.to_owned(), 443);
        let (states_tx, states) = watch::channel(States::new());
        let (reporter, _retired) = StateReporter::new(states_tx, proxy.clone());
        let shutdown = CancellationToken::new();
        let stop = shutdown.child_token();
        let tracker = TaskTracker::new();
        let tasks = StreamTasks {
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
        };
        let retry = watch::Sender::new(0);
        let task = tokio::spawn(hold(
            proxy.clone(),
            Arc::new(config),
            reporter,
            stop.clone(),
            tasks,
            retry.subscribe(),
            budget,
        ));
        Self {
            log,
            states,
            proxy,
            stop,
            shutdown,
            tracker,
            task,
            retry,
        }
    }

    /// Waits until the tunnel's state satisfies `done`, and returns it.
    async fn wait_state(&mut self, done: impl Fn(&TunnelState) -> bool) -> TunnelState {
        let proxy = self.proxy.clone();
        let seen = patiently(
            self.states
                .wait_for(|states| states.get(&proxy).is_some_and(&done)),
        )
        .await;
        seen.expect("the state outlives the task")[&self.proxy].clone()
    }

    /// Stops the tunnel task as the client does when the proxy leaves the list, and returns
    /// what the task returned.
    async fn stop(self) -> Option<String> {
        self.stop.cancel();
        patiently(self.task).await.expect("the tunnel task")
    }
}

#[tokio::test(start_paused = true)]
async fn refused_attempts_wait_doubling_jittered_delays_up_to_the_cap() {
    let mut held = Held::start(Vec::new(), timing(), NO_ORIGIN);
    let events = held.log.wait_for(attempts_at_least(9)).await;
    let attempts = times(&events, What::Attempt);
    for (i, ceiling) in [1, 2, 4, 8, 16, 16, 16, 16].into_iter().enumerate() {
        let waited = attempts[i + 1] - attempts[i];
        assert_delay(waited, secs(ceiling), &format!("before attempt {}", i + 1));
    }
    let state = held
        .wait_state(|s| matches!(s, TunnelState::Waiting { .. }))
        .await;
    assert!(
        format!("{state:?}").contains("the fake proxy refuses"),
        "{state:?}"
    );
    assert_eq!(held.stop().await, None);
}

#[tokio::test(start_paused = true)]
async fn a_short_session_keeps_the_delays_growing_and_a_stable_one_resets_them() {
    let session = |lasting: Duration| {
        bind(move |mut end| async move {
            end.answer_pings_for(lasting).await;
            end.session.close();
        })
    };
    let plans = vec![
        Plan::Refuse,
        Plan::Refuse,
        Plan::Refuse,
        session(secs(30)),
        Plan::Refuse,
        session(secs(61)),
    ];
    let held = Held::start(plans, timing(), NO_ORIGIN);
    let events = held.log.wait_for(attempts_at_least(9)).await;
    let attempts = times(&events, What::Attempt);
    let ended = |conn| time_of(&events, conn, What::Ended).expect("session ended");

    assert_delay(attempts[1] - attempts[0], secs(1), "after one refusal");
    assert_delay(attempts[2] - attempts[1], secs(2), "after two");
    assert_delay(attempts[3] - attempts[2], secs(4), "after three");
    assert_eq!(ended(3) - attempts[3], secs(30));
    // 30 s is short of stable: the loss counts as the fourth failure in a row.
    assert_delay(attempts[4] - ended(3), secs(8), "after a short session");
    assert_delay(attempts[5] - attempts[4], secs(16), "at the cap");
    assert_eq!(ended(5) - attempts[5], secs(61));
    // 61 s is stable: the count starts over.
    assert_delay(attempts[6] - ended(5), secs(1), "after a stable session");
    assert_delay(attempts[7] - attempts[6], secs(2), "then doubling");
    assert_delay(attempts[8] - attempts[7], secs(4), "and again");
    assert_eq!(held.stop().await, None);
}

#[tokio::test(start_paused = true)]
async fn a_go_away_restarts_the_delays_from_the_base_and_the_old_session_drains() {
    let mut plans: Vec<Plan> = (0..6).map(|_| Plan::Refuse).collect();
    plans.push(bind(|mut end| async move {
        end.answer_pings_for(secs(30)).await;
        end.go_away().await;
        end.answer_pings_for(secs(5)).await;
        end.session.close();
    }));
    plans.extend([Plan::Refuse, Plan::Refuse]);
    plans.push(bind(
        |mut end| async move { end.answer_pings(usize::MAX).await },
    ));
    let held = Held::start(plans, timing(), NO_ORIGIN);
    let events = held.log.wait_for(has(9, What::Bound)).await;
    let attempts = times(&events, What::Attempt);
    for i in 0..6 {
        let ceiling = secs(16).min(secs(1 << i));
        assert_delay(attempts[i + 1] - attempts[i], ceiling, "before the bind");
    }
    // Six failures in a row had reached the cap; the go-away starts over from the base.
    let go_away = time_of(&events, 6, What::GoAway).expect("go-away sent");
    assert_delay(attempts[7] - go_away, secs(1), "after the go-away");
    assert_delay(
        attempts[8] - attempts[7],
        secs(2),
        "refused while restarting",
    );
    assert_delay(attempts[9] - attempts[8], secs(4), "refused again");

    // The old session lived on until the proxy closed it, 5 s later, and the client did not
    // ping it before its interval was due.
    let events = held.log.wait_for(has(6, What::Ended)).await;
    assert_eq!(time_of(&events, 6, What::Ended), Some(go_away + secs(5)));
    let late_pings = events
        .iter()
        .filter(|e| e.conn == 6 && e.what == What::Ping && e.at > go_away)
        .count();
    assert_eq!(late_pings, 0);
    assert_eq!(held.stop().await, None);
}

#[tokio::test(start_paused = true)]
async fn go_aways_soon_after_each_bind_still_back_off() {
    let flapping = || {
        bind(|mut end| async move {
            end.go_away().await;
            tokio::time::sleep(secs(1)).await;
            end.session.close();
        })
    };
    let plans = (0..4).map(|_| flapping()).collect();
    let held = Held::start(plans, timing(), NO_ORIGIN);
    let events = held.log.wait_for(attempts_at_least(5)).await;
    let attempts = times(&events, What::Attempt);
    for (conn, ceiling) in [1, 2, 4, 8].into_iter().enumerate() {
        let go_away = time_of(&events, conn, What::GoAway).expect("go-away sent");
        assert_delay(
            attempts[conn + 1] - go_away,
            secs(ceiling),
            "after a go-away",
        );
    }
    assert_eq!(held.stop().await, None);
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_ping_marks_the_tunnel_lost_two_intervals_later() {
    let plans = vec![bind(|mut end| async move { end.answer_pings(3).await })];
    let mut held = Held::start(plans, timing(), NO_ORIGIN);
    let events = held.log.wait_for(has(0, What::Ended)).await;
    let bound = time_of(&events, 0, What::Bound).expect("bound");
    let pings: Vec<Duration> = times(&events, What::Ping)
        .into_iter()
        .map(|at| at - bound)
        .collect();
    // One ping per interval; the fourth goes unanswered, and the tunnel is given up 2 × 10 s
    // after it, as PROTOCOL.md §4.6 says.
    assert_eq!(pings, [secs(10), secs(20), secs(30), secs(40)]);
    assert_eq!(time_of(&events, 0, What::Ended), Some(bound + secs(60)));
    let state = held
        .wait_state(|s| matches!(s, TunnelState::Waiting { .. }))
        .await;
    assert!(
        format!("{state:?}").contains("no keepalive answer"),
        "{state:?}"
    );
    // And the task reconnects after its delay.
    let events = held.log.wait_for(attempts_at_least(2)).await;
    assert_delay(
        times(&events, What::Attempt)[1] - bound - secs(60),
        secs(1),
        "after the loss",
    );
    assert_eq!(held.stop().await, None);
}

#[tokio::test(start_paused = true)]
async fn a_draining_tunnel_outlives_its_tunnel_task_but_not_the_client() {
    let (pong_tx, pong) = oneshot::channel();
    let plans = vec![
        bind(|mut end| async move {
            end.go_away().await;
            // The proxy may still ping while it drains; the client answers.
            let _ = pong_tx.send(end.ping(77).await);
            end.answer_pings(usize::MAX).await;
        }),
        bind(|mut end| async move { end.answer_pings(usize::MAX).await }),
    ];
    let held = Held::start(plans, timing(), NO_ORIGIN);
    held.log.wait_for(has(1, What::Bound)).await;
    let answered = patiently(pong).await.expect("the script ran");
    assert!(answered, "no pong while draining");

    // The proxy leaves the list: the tunnel task ends and closes its bound session, but the
    // draining one is the proxy's to close, and it does not within an hour.
    let (log, shutdown, tracker) = (
        held.log.clone(),
        held.shutdown.clone(),
        held.tracker.clone(),
    );
    assert_eq!(held.stop().await, None);
    log.wait_for(has(1, What::Ended)).await;
    let within_an_hour = tokio::time::timeout(secs(3600), log.wait_for(has(0, What::Ended)));
    assert!(
        within_an_hour.await.is_err(),
        "the draining session was closed"
    );

    // The client stops: the draining session goes at once, and its task with it.
    let stopped_at = Instant::now();
    shutdown.cancel();
    let events = log.wait_for(has(0, What::Ended)).await;
    assert_eq!(time_of(&events, 0, What::Ended), Some(stopped_at));
    tracker.close();
    patiently(tracker.wait()).await;
}

#[tokio::test(start_paused = true)]
async fn a_draining_tunnel_whose_proxy_goes_silent_is_closed_two_intervals_after_its_ping() {
    let plans = vec![
        bind(|mut end| async move {
            end.go_away().await;
            // Neither pongs nor a close: the proxy, or the path to it, died silently.
            end.answer_pings(0).await;
        }),
        bind(|mut end| async move { end.answer_pings(usize::MAX).await }),
    ];
    let held = Held::start(plans, timing(), NO_ORIGIN);
    let events = held.log.wait_for(has(0, What::Ended)).await;
    let go_away = time_of(&events, 0, What::GoAway).expect("go-away sent");
    let late_pings: Vec<Duration> = events
        .iter()
        .filter(|e| e.conn == 0 && e.what == What::Ping && e.at > go_away)
        .map(|e| e.at - go_away)
        .collect();
    assert_eq!(late_pings, [secs(10)]);
    assert_eq!(time_of(&events, 0, What::Ended), Some(go_away + secs(30)));
    assert_eq!(held.stop().await, None);
}

/// An origin that echoes what each connection sends, then closes its side.
async fn echo_origin() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.into_split();
                if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
                    let _ = writer.shutdown().await;
                }
            });
        }
    });
    addr
}

// Real time: the stream reaches a real origin on loopback, and paused time would skip ahead
// while the socket works.
#[tokio::test]
async fn a_draining_tunnel_serves_a_stream_the_proxy_opens_after_its_go_away() {
    let origin = echo_origin().await;
    let (visited_tx, visited) = oneshot::channel();
    let plans = vec![bind(|mut end| async move {
        end.go_away().await;
        // A visitor routed just before the drain began: its stream arrives after the client
        // has already moved on to a new tunnel.
        end.log.wait_for(attempts_at_least(2)).await;
        let _ = visited_tx.send(end.visit(b"late visitor").await);
        end.session.close();
    })];
    let timing = Timing {
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(100),
        ..Timing::default()
    };
    let held = Held::start(plans, timing, origin);
    let echoed = tokio::time::timeout(secs(10), visited)
        .await
        .expect("the late stream was served in time")
        .expect("the script ran")
        .expect("the late stream");
    assert_eq!(echoed, b"late visitor");

    // Once the proxy has closed it, the draining session's task is done.
    let ended = held.log.wait_for(has(0, What::Ended));
    tokio::time::timeout(secs(10), ended)
        .await
        .expect("the proxy closed the drained session");
    let tracker = held.tracker.clone();
    tracker.close();
    tokio::time::timeout(secs(10), tracker.wait())
        .await
        .expect("the drained session's task ended");
    assert_eq!(held.stop().await, None);
}

// Real time, for the real origin on loopback.
#[tokio::test]
async fn with_proxy_protocol_the_origin_reads_the_visitor_then_their_bytes() {
    let origin = echo_origin().await;
    // A certificate visitors trust, for the client to terminate their TLS with.
    let (visitor_facing, visitor_tls) = tls_pair();
    let http = StreamHeader {
        hostname: HOST.to_owned(),
        kind: StreamKind::Http,
        visitor: "[2001:db8::7]:6000".parse().unwrap(),
        public_port: 80,
    };
    let tls = StreamHeader {
        hostname: HOST.to_owned(),
        kind: StreamKind::Tls,
        visitor: "[::ffff:192.0.2.1]:5000".parse().unwrap(),
        public_port: 443,
    };
    let request = b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n";
    let secret: Vec<u8> = (0..=255).cycle().take(100_000).collect();
    let (echoed_tx, echoed) = oneshot::channel();
    let plans = vec![bind(move |mut end| async move {
        let served = async {
            let plain = exchange(end.open(&http).await?, request).await?;
            let stream = end.open(&tls).await?;
            let name = crate::tls::server_name(PROXY).map_err(io::Error::other)?;
            let visitor = TlsConnector::from(visitor_tls)
                .connect(name, stream)
                .await?;
            let decrypted = exchange(visitor, &secret).await?;
            io::Result::Ok((plain, decrypted, secret))
        };
        let _ = echoed_tx.send(served.await);
        end.answer_pings(usize::MAX).await;
    })];
    let timing = Timing {
        proxy_protocol: Some(crate::proxy_protocol::Version::V1),
        ..Timing::default()
    };
    let held = Held::start_terminating_tls(plans, timing, origin, Some(visitor_facing));
    let (plain, decrypted, secret) = tokio::time::timeout(secs(10), echoed)
        .await
        .expect("both visitors were served in time")
        .expect("the script ran")
        .expect("both visitors");

    // The origin echoes all it received: the header, then the visitor's bytes untouched.
    let mut expected = b"PROXY TCP6 2001:db8::7 :: 6000 80\r\n".to_vec();
    expected.extend_from_slice(request);
    assert_eq!(
        plain.escape_ascii().to_string(),
        expected.escape_ascii().to_string()
    );
    // Behind --tls-cert: the header, then the decrypted bytes; the mapped address as IPv4.
    let mut expected = b"PROXY TCP4 192.0.2.1 0.0.0.0 5000 443\r\n".to_vec();
    expected.extend_from_slice(&secret);
    assert!(decrypted == expected, "{:?}", decrypted.get(..60));
    assert_eq!(held.stop().await, None);
}

/// Timing with round numbers, and 100 s before asking a proxy whose policy refused again.
fn refused_timing() -> Timing {
    Timing {
        refused_retry: secs(100),
        ..timing()
    }
}

#[tokio::test(start_paused = true)]
async fn a_policy_refusal_is_asked_again_after_the_long_wait_or_at_once_when_told() {
    let plans = (0..3)
        .map(|_| Plan::RefuseBind(BindStatus::NotAuthorized))
        .collect();
    let mut held = Held::start(plans, refused_timing(), NO_ORIGIN);
    let events = held.log.wait_for(attempts_at_least(2)).await;
    let attempts = times(&events, What::Attempt);
    // Not the backoff's 1 s: the refusal's own wait, not a loop against it.
    assert_eq!(attempts[1] - attempts[0], secs(100));
    let state = held
        .wait_state(|s| matches!(s, TunnelState::Waiting { .. }))
        .await;
    assert!(
        format!("{state:?}").contains("not on this proxy's list"),
        "{state:?}"
    );
    // What SIGHUP does: the waiting tunnel asks again now.
    tokio::time::advance(secs(10)).await;
    let told = Instant::now();
    held.retry.send_modify(|asked| *asked += 1);
    let events = held.log.wait_for(attempts_at_least(3)).await;
    assert!(times(&events, What::Attempt)[2] - told < secs(1));
    // Never given up on.
    assert_eq!(held.stop().await, None);
}

#[tokio::test(start_paused = true)]
async fn an_unbound_hostname_ends_the_tunnel_and_waits_as_a_refusal_does() {
    let plans = vec![
        bind(|mut end| async move {
            // A name this tunnel never bound is no business of it.
            end.unbind("other.test", BindStatus::NotAuthorized).await;
            assert!(end.ping(1).await, "the tunnel stays up");
            end.unbind(HOST, BindStatus::NotAuthorized).await;
            end.answer_pings(usize::MAX).await;
        }),
        Plan::RefuseBind(BindStatus::NotAuthorized),
    ];
    let mut held = Held::start(plans, refused_timing(), NO_ORIGIN);
    let events = held.log.wait_for(has(0, What::Ended)).await;
    let ended = time_of(&events, 0, What::Ended).expect("ended");
    let state = held
        .wait_state(|s| matches!(s, TunnelState::Waiting { .. }))
        .await;
    assert!(
        format!("{state:?}").contains("the authorized file no longer lists it"),
        "{state:?}"
    );
    let events = held.log.wait_for(attempts_at_least(2)).await;
    assert_eq!(times(&events, What::Attempt)[1] - ended, secs(100));
    assert_eq!(held.stop().await, None);
}

#[tokio::test(start_paused = true)]
async fn an_unbound_for_want_of_a_dns_record_retries_with_the_backoff() {
    let plans = vec![bind(|mut end| async move {
        end.unbind(HOST, BindStatus::NotListed).await;
        end.answer_pings(usize::MAX).await;
    })];
    let held = Held::start(plans, refused_timing(), NO_ORIGIN);
    let events = held.log.wait_for(attempts_at_least(2)).await;
    let ended = time_of(&events, 0, What::Ended).expect("ended");
    // A record may be published any moment: the usual delays, from the base.
    assert_delay(
        times(&events, What::Attempt)[1] - ended,
        secs(1),
        "after NotListed",
    );
    assert_eq!(held.stop().await, None);
}

/// The circuits of a [`Circuited`] transport: how many were built, whether each breaks after
/// one connection, and the budget they are charged to.
#[derive(Clone)]
struct FakeCircuits {
    built: Arc<AtomicUsize>,
    break_each: bool,
    budget: Arc<crate::circuits::CircuitBudget>,
}

impl FakeCircuits {
    fn new(break_each: bool, per_proxy: u32) -> Self {
        Self {
            built: Arc::default(),
            break_each,
            budget: Arc::new(crate::circuits::CircuitBudget::new(per_proxy, 100)),
        }
    }

    fn built(&self) -> usize {
        self.built.load(Ordering::SeqCst)
    }
}

/// The fake proxy behind a transport that keeps a circuit per tunnel, as Tor's does.
struct Circuited {
    proxy: Arc<FakeProxy>,
    circuits: FakeCircuits,
}

impl Transport for Circuited {
    fn connect<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<BoxStream>> {
        self.proxy.connect(host, port)
    }

    fn name(&self) -> &'static str {
        "circuited"
    }

    fn circuit(&self) -> Option<Box<dyn crate::transport::KeptCircuit>> {
        Some(Box::new(FakeCircuit {
            proxy: self.proxy.clone(),
            circuits: self.circuits.clone(),
            held: false,
        }))
    }
}

struct FakeCircuit {
    proxy: Arc<FakeProxy>,
    circuits: FakeCircuits,
    held: bool,
}

impl crate::transport::KeptCircuit for FakeCircuit {
    fn is_held(&mut self) -> bool {
        self.held
    }

    fn connect<'a>(&'a mut self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            if !self.held {
                self.circuits.built.fetch_add(1, Ordering::SeqCst);
            }
            self.held = !self.circuits.break_each;
            self.proxy.connect(host, port).await
        })
    }

    fn given_up(&self) -> Option<&str> {
        self.circuits.break_each.then_some("the fake circuit broke")
    }
}

#[tokio::test(start_paused = true)]
async fn reconnects_on_the_held_circuit_cost_no_new_circuit() {
    let circuits = FakeCircuits::new(false, 2);
    // Five tunnels, each dropped by the proxy a second after its bind.
    let plans = (0..5)
        .map(|_| {
            bind(|end: ProxyEnd| async move {
                tokio::time::sleep(secs(1)).await;
                end.session.close();
            })
        })
        .collect();
    let held = Held::start_with_circuits(plans, timing(), &circuits);
    let events = held
        .log
        .wait_for(|e| times(e, What::Bound).len() >= 5)
        .await;
    assert_eq!(times(&events, What::Bound).len(), 5);
    assert_eq!(circuits.built(), 1, "one circuit for every tunnel");
    assert_eq!(circuits.budget.counts()[0].waits, 0);
    held.stop().await;
}

#[tokio::test(start_paused = true)]
async fn past_its_share_a_tunnel_waits_for_the_budget_and_builds_again_paced() {
    // Every circuit breaks and the proxy refuses: each attempt needs a new circuit. Two an
    // hour: the first at once, the second half an hour after it, the third once the first
    // leaves the hour.
    let circuits = FakeCircuits::new(true, 2);
    let mut held = Held::start_with_circuits(Vec::new(), timing(), &circuits);
    let state = held
        .wait_state(
            |s| matches!(s, TunnelState::Waiting { reason } if reason.contains("circuit budget")),
        )
        .await;
    let TunnelState::Waiting { reason } = state else {
        unreachable!()
    };
    assert!(
        reason.contains("--max-circuits-per-proxy-per-hour"),
        "{reason}"
    );
    let first = times(&held.log.snapshot(), What::Attempt)[0];
    assert_eq!(circuits.built(), 1);
    // A quarter of an hour on, still waiting; no attempt, no circuit.
    tokio::time::advance(Duration::from_secs(900)).await;
    assert_eq!(circuits.built(), 1);
    assert_eq!(times(&held.log.snapshot(), What::Attempt).len(), 1);
    let events = held.log.wait_for(attempts_at_least(2)).await;
    let second = times(&events, What::Attempt)[1];
    assert!(
        second - first >= crate::circuits::WINDOW / 2,
        "{:?}",
        second - first
    );
    assert_eq!(circuits.built(), 2);
    let events = held.log.wait_for(attempts_at_least(3)).await;
    let third = times(&events, What::Attempt)[2];
    assert!(
        third - first >= crate::circuits::WINDOW,
        "{:?}",
        third - first
    );
    assert_eq!(circuits.built(), 3);
    assert!(circuits.budget.counts()[0].waits >= 2);
    held.stop().await;
}
