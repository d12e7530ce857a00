//! Slow and silent peers leave other visitors' latency essentially unchanged: a visitor that
//! sends its ClientHello one byte per second, 5,000 idle connections that send nothing, and an
//! origin that reads nothing while visitors stream megabytes at it.
//!
//! Each test runs the real `shroud-proxy` and `shroud` binaries (processes with runtimes of
//! their own, as deployed), times sequential HTTPS GETs of a good visitor, from 127.0.0.2,
//! before the attack and while it runs, and asserts that every good request succeeds, that the
//! median under attack is at most 3 × the baseline median + 20 ms, and that no request takes
//! over 3 s. The attackers come from other loopback addresses, at most 100 per address, as
//! from many hosts: a per-address limit does not stop them, so the proxy itself must cope.
//! The tests take turns, so that none loads the two shared cores for another.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use shroud_tests::process::Process;
use shroud_tests::scale::{self, connect_from, spread_source, Latencies};
use shroud_tests::stack::{binary, direct_client_args, make_key, Pki, ProxyProcess};
use shroud_tests::{client_config, init, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

const HOST: &str = "example.test";
const PROXY: &str = "proxy.test";
/// Where the good visitor comes from; no attacker shares it.
const GOOD_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Good requests in the baseline, and at least as many under attack.
const SAMPLES: usize = 40;
/// The proxy's ClientHello deadline (`Limits::client_hello_timeout`; no flag sets it).
const CLIENT_HELLO_DEADLINE: Duration = Duration::from_secs(5);
/// How late past the deadline a loaded machine may close a slow visitor.
const DEADLINE_SLACK: Duration = Duration::from_secs(3);
/// No good request may take longer, attack or not. Generous: when thousands of attackers
/// reconnect at once, the kernel's accept queue (net.core.somaxconn) may overflow and drop a
/// good visitor's SYN, which costs it a 1 s retransmission on top of a loaded machine's delays.
const CAP: Duration = Duration::from_secs(3);
/// The body the origin answers a GET with.
const BODY: &str = "hello from the sink origin\n";

/// The tests take turns: each measures latency, which another running beside it would skew.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An HTTPS origin with two more tricks than a plain one: it answers any request with 200,
/// except `POST /sink`, whose head it reads and then never another byte, holding the
/// connection open until dropped; and `GET /flood`, which it answers with an endless body as
/// fast as the visitor takes it. Counts connections, requests it stopped reading, floods, and
/// the bytes they sent.
struct SinkOrigin {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    sinks: Arc<AtomicUsize>,
    floods: Arc<Flooded>,
    stop: CancellationToken,
}

/// Floods started, and the bytes all of them wrote.
#[derive(Default)]
struct Flooded {
    started: AtomicUsize,
    bytes: AtomicU64,
}

impl SinkOrigin {
    async fn start(tls: Arc<rustls::ServerConfig>) -> Self {
        // Small, fixed kernel buffers (accepted sockets inherit them), as a remote origin's
        // would not be this host's memory: see the stalled-streams test.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(SMALL_BUFFER).unwrap();
        socket.set_send_buffer_size(SMALL_BUFFER).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, sinks) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let floods = Arc::new(Flooded::default());
        let stop = CancellationToken::new();
        let acceptor = TlsAcceptor::from(tls);
        let (counted, sinking, stopped) = (accepted.clone(), sinks.clone(), stop.clone());
        let flooding = floods.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                counted.fetch_add(1, Ordering::Relaxed);
                let (acceptor, sinking, stopped, flooding) = (
                    acceptor.clone(),
                    sinking.clone(),
                    stopped.clone(),
                    flooding.clone(),
                );
                tokio::spawn(async move {
                    tokio::select! {
                        () = stopped.cancelled() => {}
                        () = serve_sink(stream, acceptor, sinking, flooding) => {}
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            sinks,
            floods,
            stop,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    fn sinks(&self) -> usize {
        self.sinks.load(Ordering::Relaxed)
    }
}

impl Drop for SinkOrigin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve_sink(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    sinks: Arc<AtomicUsize>,
    floods: Arc<Flooded>,
) {
    let Ok(Ok(mut tls)) =
        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
    else {
        return;
    };
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    if head.starts_with(b"POST /sink ") {
        // Never read again; hold the connection until the origin is dropped.
        sinks.fetch_add(1, Ordering::Relaxed);
        std::future::pending::<()>().await;
    }
    if head.starts_with(b"GET /flood ") {
        // As fast as the visitor takes it, for as long as the connection lasts.
        floods.started.fetch_add(1, Ordering::Relaxed);
        let chunk = vec![0x5a; 64 * 1024];
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n";
        if tls.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        while tls.write_all(&chunk).await.is_ok() {
            floods
                .bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        return;
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    if tls.write_all(response.as_bytes()).await.is_ok() && tls.shutdown().await.is_ok() {
        // Read to the visitor's close, so closing here never resets the connection.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(n) = tls.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

/// A proxy and a client (the real binaries) publishing a [`SinkOrigin`].
struct Stack {
    origin: SinkOrigin,
    proxy: ProxyProcess,
    client: Process,
    visitors: Arc<ClientConfig>,
    good_requests: usize,
    _pki: Pki,
}

impl Stack {
    async fn start() -> Self {
        let pki = Pki::new().unwrap();
        let origin = SinkOrigin::start(pki.ca.issue(&[HOST]).server_config(&[])).await;
        let key_path = pki.dir().join("client.key");
        let key = make_key(&key_path).unwrap();
        let proxy = ProxyProcess::start(
            &pki,
            PROXY,
            &format!("{HOST} {key}\n"),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let args = direct_client_args(&pki, &key_path, HOST, origin.addr, &[(PROXY, proxy.https)]);
        let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
        client
            .wait_for_line("tunnel up", Duration::from_secs(30))
            .await
            .unwrap();
        let visitors = client_config(pki.ca.root_store(), &[]);
        let mut stack = Self {
            origin,
            proxy,
            client,
            visitors,
            good_requests: 0,
            _pki: pki,
        };
        // Warm up: first connections pay for lazy setup in every process.
        stack.good_get().await.unwrap();
        stack
    }

    /// One good visitor's GET, timed; it must succeed with the origin's answer.
    async fn good_get(&mut self) -> anyhow::Result<Duration> {
        self.good_requests += 1;
        let started = Instant::now();
        let get = scale::https_get_from(
            GOOD_SOURCE,
            self.proxy.https,
            HOST,
            self.visitors.clone(),
            "/ping",
        );
        let response = tokio::time::timeout(Duration::from_secs(10), get).await??;
        anyhow::ensure!(
            response.status == 200 && response.body_text() == BODY,
            "unexpected answer {response:?}"
        );
        Ok(started.elapsed())
    }

    /// Sequential good GETs: at least `min` of them, and on until `done()`.
    async fn good_gets(&mut self, min: usize, done: impl Fn() -> bool) -> Latencies {
        self.paced_gets(min, Duration::ZERO, done).await
    }

    /// [`Stack::good_gets`] with `pause` between one GET's end and the next one's start, as
    /// ordinary traffic leaves the machine room rather than saturating it.
    async fn paced_gets(
        &mut self,
        min: usize,
        pause: Duration,
        done: impl Fn() -> bool,
    ) -> Latencies {
        let mut latencies = Latencies::new();
        while latencies.len() < min || !done() {
            match self.good_get().await {
                Ok(took) => latencies.push(took),
                Err(err) => panic!("good request {} failed: {err:#}", latencies.len() + 1),
            }
            tokio::time::sleep(pause).await;
        }
        latencies
    }

    fn rss(&self) -> (u64, u64) {
        (
            scale::rss_bytes(self.proxy.process.pid()).unwrap_or(0),
            scale::rss_bytes(self.client.pid()).unwrap_or(0),
        )
    }
}

/// Prints the figures and asserts the latency under attack is essentially the baseline's.
fn assert_unchanged(attack: &str, baseline: &Latencies, under_attack: &Latencies) {
    println!("{attack}: baseline {baseline}");
    println!("{attack}: under attack {under_attack}");
    let bound = baseline.p50() * 3 + Duration::from_millis(20);
    assert!(
        under_attack.p50() <= bound,
        "{attack}: median latency {:?} under attack, over 3 × the baseline's {:?} + 20 ms",
        under_attack.p50(),
        baseline.p50()
    );
    assert!(
        under_attack.max() <= CAP,
        "{attack}: a good request took {:?} under attack (cap {CAP:?})",
        under_attack.max()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_dribbling_its_client_hello_is_cut_off_and_slows_no_one() {
    init();
    let _turn = SERIAL.lock().await;
    let mut stack = Stack::start().await;
    let baseline = within(60, stack.good_gets(SAMPLES, || true)).await;

    // A real ClientHello for the published name, one byte a second, from 20 visitors.
    let hello = Arc::new(scale::client_hello(stack.visitors.clone(), HOST).unwrap());
    const DRIBBLERS: usize = 20;
    let proxy = stack.proxy.https;
    let running = Arc::new(AtomicUsize::new(DRIBBLERS));
    let mut dribblers = Vec::new();
    for i in 0..DRIBBLERS {
        let (hello, running) = (hello.clone(), running.clone());
        dribblers.push(tokio::spawn(async move {
            let outcome = dribble(spread_source(21, i, 1), proxy, &hello).await;
            running.fetch_sub(1, Ordering::Relaxed);
            outcome
        }));
    }
    let under_attack = within(
        60,
        stack.good_gets(SAMPLES, || running.load(Ordering::Relaxed) == 0),
    )
    .await;

    let mut lifetimes = Vec::new();
    for dribbler in dribblers {
        let (lived, sent) = dribbler.await.unwrap();
        assert!(
            sent < hello.len(),
            "the whole ClientHello went out: {sent} bytes"
        );
        assert!(
            // Not much before the deadline either (this side may notice its connect late).
            lived >= CLIENT_HELLO_DEADLINE - Duration::from_secs(1)
                && lived <= CLIENT_HELLO_DEADLINE + DEADLINE_SLACK,
            "a dribbling visitor lived {lived:?}; the ClientHello deadline is {CLIENT_HELLO_DEADLINE:?}"
        );
        lifetimes.push((lived, sent));
    }
    let shortest = lifetimes.iter().map(|l| l.0).min().unwrap_or_default();
    let longest = lifetimes.iter().map(|l| l.0).max().unwrap_or_default();
    let most_sent = lifetimes.iter().map(|l| l.1).max().unwrap_or_default();
    println!(
        "dribbled ClientHello: {DRIBBLERS} visitors closed by the proxy after {shortest:?} to \
         {longest:?}, having sent at most {most_sent} of its {} bytes",
        hello.len()
    );
    // Nobody dribbling reached the origin: its connections are the good visitors'.
    assert_eq!(stack.origin.accepted(), stack.good_requests);
    assert_unchanged("dribbled ClientHello", &baseline, &under_attack);
}

/// Sends `hello` one byte a second until the proxy closes the connection; returns how long it
/// lived and how many bytes went out.
async fn dribble(source: IpAddr, proxy: SocketAddr, hello: &[u8]) -> (Duration, usize) {
    let stream = connect_from(source, proxy).await.unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    let mut sent = 0;
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // An alert, say: keep waiting for the close.
            },
            _ = ticks.tick(), if sent < hello.len() => {
                if writer.write_all(&hello[sent..sent + 1]).await.is_err() {
                    break;
                }
                sent += 1;
            }
        }
    }
    (started.elapsed(), sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_connections_slow_no_one() {
    init();
    let _turn = SERIAL.lock().await;
    const IDLE: usize = 5000;
    // The idle connections here and at the proxy (the child inherits the raised limit).
    scale::ensure_fd_limit(IDLE as u64 + 1024).unwrap();
    let mut stack = Stack::start().await;
    let baseline = within(60, stack.good_gets(SAMPLES, || true)).await;

    // Each slot holds one connection that sends nothing; when the proxy closes it, the slot
    // connects again, so 5,000 stay open for as long as the attack lasts.
    let proxy = stack.proxy.https;
    let stop = CancellationToken::new();
    let open = Arc::new(AtomicUsize::new(0));
    let cycled = Arc::new(AtomicUsize::new(0));
    let lifetimes = Arc::new(Mutex::new(Vec::new()));
    let connect_errors = Arc::new(AtomicU64::new(0));
    let mut slots = Vec::new();
    for i in 0..IDLE {
        let (stop, open, cycled, lifetimes, connect_errors) = (
            stop.clone(),
            open.clone(),
            cycled.clone(),
            lifetimes.clone(),
            connect_errors.clone(),
        );
        slots.push(tokio::spawn(async move {
            let source = spread_source(22, i, 100);
            let mut first = true;
            while !stop.is_cancelled() {
                let mut conn = match connect_from(source, proxy).await {
                    Ok(conn) => conn,
                    Err(_) => {
                        connect_errors.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // From the handshake's end: a SYN dropped in a full accept queue is no delay
                // of the proxy's.
                let started = Instant::now();
                open.fetch_add(1, Ordering::Relaxed);
                let mut byte = [0u8; 1];
                let closed = tokio::select! {
                    () = stop.cancelled() => false,
                    _ = conn.read(&mut byte) => true,
                };
                open.fetch_sub(1, Ordering::Relaxed);
                if closed {
                    lifetimes.lock().unwrap().push(started.elapsed());
                    if std::mem::take(&mut first) {
                        cycled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    within(60, async {
        while open.load(Ordering::Relaxed) < IDLE {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Connected is not yet accepted: wait until the proxy holds them all (the kernel's accept
    // queue may still have some).
    let proxy_pid = stack.proxy.process.pid();
    within(60, async {
        while scale::open_fds(proxy_pid).unwrap_or(0) <= IDLE {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (proxy_rss, client_rss) = stack.rss();
    println!(
        "idle attack: {IDLE} open; proxy {} fds, RSS {} MiB; client RSS {} MiB",
        scale::open_fds(proxy_pid).unwrap_or(0),
        proxy_rss >> 20,
        client_rss >> 20
    );

    // Measure until every slot's first connection was closed by the proxy's deadline and
    // replaced: the attack's whole cycle, its reconnect wave included.
    let under_attack = within(
        60,
        stack.good_gets(SAMPLES, || cycled.load(Ordering::Relaxed) == IDLE),
    )
    .await;
    stop.cancel();
    for slot in slots {
        within(10, slot).await.unwrap();
    }

    let lifetimes = lifetimes.lock().unwrap().clone();
    let longest = lifetimes.iter().max().copied().unwrap_or_default();
    let shortest = lifetimes.iter().min().copied().unwrap_or_default();
    println!(
        "idle attack: {} connections closed by the proxy, after {shortest:?} to {longest:?}; {} connect errors",
        lifetimes.len(),
        connect_errors.load(Ordering::Relaxed)
    );
    assert!(
        longest <= CLIENT_HELLO_DEADLINE + DEADLINE_SLACK,
        "an idle connection lived {longest:?}; the ClientHello deadline is {CLIENT_HELLO_DEADLINE:?}"
    );
    assert_eq!(stack.origin.accepted(), stack.good_requests);
    assert_unchanged("5,000 idle connections", &baseline, &under_attack);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_reads_nothing_stalls_no_other_visitor_on_the_tunnel() {
    init();
    let _turn = SERIAL.lock().await;
    let mut stack = Stack::start().await;
    let baseline = within(60, stack.good_gets(SAMPLES, || true)).await;
    let (proxy_before, client_before) = stack.rss();

    // Visitors on the same tunnel POST 64 MiB each to an origin that stops reading after the
    // request head. They must stall (every buffer on the way is bounded) without holding up
    // anyone else.
    const SINKS: usize = 8;
    const UPLOAD: u64 = 64 << 20;
    let pushed: Arc<Vec<AtomicU64>> = Arc::new((0..SINKS).map(|_| AtomicU64::new(0)).collect());
    let stop = CancellationToken::new();
    let mut uploads = Vec::new();
    for i in 0..SINKS {
        let (pushed, stop) = (pushed.clone(), stop.clone());
        let (proxy, config) = (stack.proxy.https, stack.visitors.clone());
        uploads.push(tokio::spawn(async move {
            let mut tls = scale::tls_connect_from(spread_source(23, i, 1), proxy, HOST, config)
                .await
                .unwrap();
            let head =
                format!("POST /sink HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {UPLOAD}\r\n\r\n");
            tls.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![0x5a; 64 * 1024];
            let upload = async {
                while pushed[i].load(Ordering::Relaxed) < UPLOAD {
                    tls.write_all(&chunk).await?;
                    pushed[i].fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                Ok::<_, std::io::Error>(())
            };
            tokio::select! {
                () = stop.cancelled() => {}
                result = upload => result.unwrap(),
            }
        }));
    }
    // Wait until all reached the origin and stopped moving: a second without progress.
    let total = || {
        pushed
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    within(60, async {
        let mut last = (0, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = total();
            if now != last.0 {
                last = (now, Instant::now());
            } else if stack.origin.sinks() == SINKS && last.1.elapsed() >= Duration::from_secs(1) {
                return;
            }
        }
    })
    .await;
    let stalled: Vec<u64> = pushed.iter().map(|p| p.load(Ordering::Relaxed)).collect();
    let (proxy_stalled, client_stalled) = stack.rss();
    println!(
        "silent origin: {SINKS} uploads stalled after {:?} MiB each; RSS proxy {} → {} MiB, client {} → {} MiB",
        stalled.iter().map(|b| b >> 20).collect::<Vec<_>>(),
        proxy_before >> 20,
        proxy_stalled >> 20,
        client_before >> 20,
        client_stalled >> 20,
    );
    assert!(
        stalled.iter().all(|&b| b > 0 && b < UPLOAD),
        "every upload must stall part way: {stalled:?}"
    );
    // Bounded buffering: a stalled stream costs the proxy and the client a window and copy
    // buffers, not the megabytes the visitor pushed.
    for (who, before, after) in [
        ("proxy", proxy_before, proxy_stalled),
        ("client", client_before, client_stalled),
    ] {
        assert!(
            after.saturating_sub(before) < 64 << 20,
            "{who} RSS grew from {before} to {after} bytes while {SINKS} uploads stalled"
        );
    }

    let under_attack = within(60, stack.good_gets(SAMPLES, || true)).await;
    // Still stalled: nothing drained them meanwhile.
    assert_eq!(stack.origin.sinks(), SINKS);
    stop.cancel();
    for upload in uploads {
        within(10, upload).await.unwrap();
    }
    assert_unchanged("origin that reads nothing", &baseline, &under_attack);
}

/// What the docs (docs/LOAD.md, "Memory under abuse") promise a stalled stream costs each of
/// the proxy and the client at most: its yamux receive window (256 KiB; more only out of the
/// tunnel's pool), frames queued toward the peer (at most about 11 of 16 KiB), and the two
/// copy buffers of its splice (64 KiB each at the default stream buffer).
const PER_STALLED_STREAM: u64 = 256 * 1024 + 176 * 1024 + 2 * 64 * 1024;
/// The tunnel's pool for windows that grew past 256 KiB (`--stream-buffer-bytes` − 256 KiB).
const TUNNEL_POOL: u64 = 16 * 1024 * 1024 - 256 * 1024;
/// Allocator and runtime slack on top of the bound: freed memory an allocator keeps, task
/// and socket bookkeeping.
const SLACK: u64 = 32 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_stalled_both_ways_stay_within_the_stated_memory_bound() {
    init();
    let _turn = SERIAL.lock().await;
    let mut stack = Stack::start().await;
    let baseline = within(60, stack.good_gets(SAMPLES, || true)).await;
    let (proxy_before, client_before) = stack.rss();

    // 64 visitors upload to an origin that stops reading, and 64 download from an origin
    // that sends as fast as it can but never read a byte: every stream stalls, one way each.
    // The attackers' own sockets (and the origin's) keep small kernel buffers, as remote
    // hosts' would be out of this machine's memory: on loopback, hundreds of autotuned
    // socket buffers would push the kernel's TCP memory (net.ipv4.tcp_mem) into pressure,
    // where it delays every connection on the host, shroud's or not.
    const EACH: usize = 64;
    const UPLOAD: u64 = 16 << 20;
    let pushed = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..EACH {
        let (pushed, stopped) = (pushed.clone(), stop.clone());
        let (proxy, config) = (stack.proxy.https, stack.visitors.clone());
        tasks.push(tokio::spawn(async move {
            let stop = stopped;
            let mut tls = small_buffered_tls(spread_source(24, i, 100), proxy, config).await;
            let head =
                format!("POST /sink HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {UPLOAD}\r\n\r\n");
            tls.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![0x5a; 64 * 1024];
            let upload = async {
                let mut sent = 0;
                while sent < UPLOAD {
                    tls.write_all(&chunk).await?;
                    sent += chunk.len() as u64;
                    pushed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                Ok::<_, std::io::Error>(())
            };
            tokio::select! {
                () = stop.cancelled() => {}
                result = upload => result.unwrap(),
            }
        }));
        let stop = stop.clone();
        let (proxy, config) = (stack.proxy.https, stack.visitors.clone());
        tasks.push(tokio::spawn(async move {
            let mut tls = small_buffered_tls(spread_source(25, i, 100), proxy, config).await;
            let request = format!("GET /flood HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
            tls.write_all(request.as_bytes()).await.unwrap();
            // Never read: hold the connection until the test is done.
            stop.cancelled().await;
        }));
    }
    // Stalled: every stream reached the origin and nothing moved for a second, either way.
    let moved =
        || pushed.load(Ordering::Relaxed) + stack.origin.floods.bytes.load(Ordering::Relaxed);
    within(120, async {
        let mut last = (0, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = moved();
            let all_in = stack.origin.sinks() == EACH
                && stack.origin.floods.started.load(Ordering::Relaxed) == EACH;
            if now != last.0 {
                last = (now, Instant::now());
            } else if all_in && last.1.elapsed() >= Duration::from_secs(1) {
                return;
            }
        }
    })
    .await;
    let (proxy_stalled, client_stalled) = stack.rss();
    let uploaded = pushed.load(Ordering::Relaxed);
    let flooded = stack.origin.floods.bytes.load(Ordering::Relaxed);
    let streams = 2 * EACH as u64;
    let bound = streams * PER_STALLED_STREAM + TUNNEL_POOL + SLACK;
    println!(
        "stalled both ways: {EACH} uploads stalled after {} MiB in all, {EACH} downloads after {} MiB; \
         RSS proxy {} → {} MiB, client {} → {} MiB; bound {} MiB each",
        uploaded >> 20,
        flooded >> 20,
        proxy_before >> 20,
        proxy_stalled >> 20,
        client_before >> 20,
        client_stalled >> 20,
        bound >> 20,
    );
    assert!(uploaded < EACH as u64 * UPLOAD, "the uploads must stall");
    for (who, before, after) in [
        ("proxy", proxy_before, proxy_stalled),
        ("client", client_before, client_stalled),
    ] {
        let grew = after.saturating_sub(before);
        println!(
            "stalled both ways: {who} holds {} KiB per stalled stream",
            grew / streams / 1024
        );
        assert!(
            grew <= bound,
            "{who} RSS grew by {grew} bytes for {streams} stalled streams (bound {bound})"
        );
    }

    // Everyone else is still served at the usual speed, on the same tunnel.
    let under_attack = within(60, stack.good_gets(SAMPLES, || true)).await;
    stop.cancel();
    for task in tasks {
        within(10, task).await.unwrap();
    }
    assert_unchanged("128 streams stalled both ways", &baseline, &under_attack);
}

/// Socket buffers of an attacker's connection, and of the origin's: 64 KiB, fixed.
const SMALL_BUFFER: u32 = 64 * 1024;

/// A visitor's TLS connection from `source` whose socket keeps [`SMALL_BUFFER`]s.
async fn small_buffered_tls(
    source: IpAddr,
    proxy: SocketAddr,
    config: Arc<ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(SMALL_BUFFER).unwrap();
    socket.set_send_buffer_size(SMALL_BUFFER).unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let tcp = socket.connect(proxy).await.unwrap();
    shroud_tests::visitor::tls_handshake(tcp, proxy, HOST, config)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_junk_connections_slows_no_bound_tunnel() {
    init();
    let _turn = SERIAL.lock().await;
    // The rate asked for, and for how long.
    const RATE: u64 = 10_000;
    const SECS: u64 = 30;
    let mut stack = Stack::start().await;
    // Good visitors come every 20 ms or so, before and during the flood: ordinary traffic,
    // which leaves the cores to the proxy and the flood.
    const PAUSE: Duration = Duration::from_millis(20);
    let baseline = within(60, stack.paced_gets(SAMPLES, PAUSE, || true)).await;
    let (proxy_before, _) = stack.rss();

    // The flood runs in a process of its own at a lower priority: its CPU stands for the
    // attackers' machines, not for the proxy's.
    let started = Instant::now();
    let args: Vec<String> = [
        "-n".to_owned(),
        "10".into(),
        binary("shroud-junk").display().to_string(),
        stack.proxy.https.to_string(),
        RATE.to_string(),
        SECS.to_string(),
    ]
    .into();
    let mut flood = Process::spawn(std::path::Path::new("nice"), &args).unwrap();
    let under_attack = within(
        SECS + 60,
        stack.paced_gets(SAMPLES, PAUSE, || {
            started.elapsed() >= Duration::from_secs(SECS)
        }),
    )
    .await;
    let line = flood
        .wait_for_line("made ", Duration::from_secs(30))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let counts: Vec<u64> = line
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    let [made, closed] = counts[..] else {
        panic!("unexpected summary {line:?}");
    };
    let (proxy_after, _) = stack.rss();
    println!(
        "junk flood: {made} junk connections in {elapsed:.1?} ({:.0}/s, asked {RATE}/s), {closed} \
         closed by the proxy at once; proxy RSS {} → {} MiB",
        made as f64 / SECS as f64,
        proxy_before >> 20,
        proxy_after >> 20,
    );
    assert!(
        made >= RATE * SECS / 4,
        "the flood reached only {made} connections"
    );
    // The proxy closes junk promptly: nearly all within the 2 s each waits.
    assert!(
        closed * 10 >= made * 9,
        "{closed} of {made} junk connections closed by the proxy"
    );
    // None reached the origin.
    assert_eq!(stack.origin.accepted(), stack.good_requests);
    assert_unchanged("junk connection flood", &baseline, &under_attack);
}
