//! Steady visitor load spread over several proxies, with every outcome counted.
//!
//! A [`Load`] starts requests at a fixed rate, each on a fresh visitor connection, as a
//! browser would send them to the addresses DNS gave it: the i-th request tries the proxies in
//! turn starting at `i % n`, and moves on to the next when the TCP connection is refused, so a
//! proxy that is down costs a retry, not a failure. Once a proxy has accepted the connection,
//! the request counts against that proxy: it either succeeds (every byte checked) or fails with
//! a cause.
//!
//! The counters per proxy make "only the requests in flight there failed" checkable: read
//! [`Load::snapshot`] just before and just after a proxy dies, and
//! `after.started - before.finished` bounds the requests that were in flight at that proxy.
//!
//! For longer runs that must say which failure came from what (the soak), a load can also keep
//! a [`Record`] of every request ([`LoadSpec::keep_records`]): where it went, when it started
//! and ended, which origin answered (told apart by certificate, [`LoadSpec::origins`]), how
//! many bytes were checked, and its [`Outcome`]. Corruption, bytes that arrived but were not
//! the ones sent, is an outcome of its own, never mixed with failures; [`Snapshot::corrupted`]
//! counts it. Each request's work can vary with its index ([`LoadSpec::vary`]), and a
//! [`Request::PacedBulk`] keeps a connection open for a long time at a walking pace.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bulk::BulkError;
use crate::visitor::{bulk_transfer, bulk_transfer_paced, client_config, http_exchange};

/// What each request does once it has a TLS connection to the origin.
#[derive(Debug, Clone)]
pub enum Request {
    /// `GET path` against an [`crate::HttpOrigin`]; status 200 and the origin's body expected.
    Get {
        /// The request target.
        path: String,
    },
    /// The bulk protocol against a [`crate::BulkOrigin`]: `bytes` each way, hashed.
    Bulk {
        /// Bytes sent in each direction.
        bytes: u64,
    },
    /// The bulk protocol at a walking pace, for a long-lived connection: `bytes` each way, one
    /// piece of at most `chunk` bytes sent and one read every `tick`, so the transfer lasts
    /// about `bytes / chunk` ticks. Checked as [`Request::Bulk`] is.
    PacedBulk {
        /// Bytes sent in each direction.
        bytes: u64,
        /// Bytes sent, and read, per tick.
        chunk: usize,
        /// Time between pieces.
        tick: Duration,
    },
}

impl Request {
    /// A short name for the kind of request: `get`, `bulk` or `paced`.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Get { .. } => "get",
            Request::Bulk { .. } => "bulk",
            Request::PacedBulk { .. } => "paced",
        }
    }
}

/// Picks the work of each request from its index (0, 1, 2, ... in the order they start), for
/// a load whose requests differ: sizes drawn from a seeded generator, a path per request.
#[derive(Clone)]
pub struct Vary(pub Arc<dyn Fn(u64) -> Request + Send + Sync>);

impl std::fmt::Debug for Vary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Vary(..)")
    }
}

/// What to send, where, and how fast.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The proxies' public TLS addresses, as DNS would list them.
    pub proxies: Vec<SocketAddr>,
    /// The hostname visitors ask for (SNI and `Host`).
    pub host: String,
    /// What visitors trust: the origin's CA.
    pub roots: RootCertStore,
    /// Requests started per second.
    pub per_second: u32,
    /// What each request does.
    pub request: Request,
    /// Longest a request may take, from its first connect to its last byte.
    pub timeout: Duration,
    /// Most requests in flight at once; the rate yields to this bound.
    pub max_in_flight: usize,
    /// If set, one request starts each `every` and `per_second` is not used (for rates below
    /// one a second).
    pub every: Option<Duration>,
    /// If set, each request's work, from its index; `request` is then not used.
    pub vary: Option<Vary>,
    /// The end-entity certificates of the origins that may answer, so that each [`Record`]
    /// says which one did ([`Record::origin`]): the index of the one the TLS handshake showed.
    pub origins: Vec<CertificateDer<'static>>,
    /// Keep a [`Record`] of every request, for [`Load::records`].
    pub keep_records: bool,
    /// How long each visitor pauses between its TLS handshake and its request, as a person
    /// or a slow page does: it keeps requests in flight, so that a failure has some to hit.
    pub think: Duration,
}

impl LoadSpec {
    /// `per_second` GETs of `/load` to `host` through `proxies`, 10 s each at most.
    pub fn get(
        proxies: Vec<SocketAddr>,
        host: &str,
        roots: RootCertStore,
        per_second: u32,
    ) -> Self {
        Self {
            proxies,
            host: host.to_owned(),
            roots,
            per_second,
            request: Request::Get {
                path: "/load".into(),
            },
            timeout: Duration::from_secs(10),
            max_in_flight: 1024,
            every: None,
            vary: None,
            origins: Vec::new(),
            keep_records: false,
            think: Duration::ZERO,
        }
    }
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It completed, every byte checked.
    Ok,
    /// It ended early, with no wrong byte seen: refused, reset, cut short, timed out. The error,
    /// with its context chain.
    Failed(String),
    /// Bytes arrived that were not the ones sent: a pattern or SHA-256 mismatch, an answer
    /// other than the origin's, a TLS record that failed its integrity check. Never a
    /// consequence of a peer or path merely going away.
    Corrupted(String),
    /// Every proxy refused the connection.
    Unreachable,
    /// The load was stopped with [`Load::abort_with_records`] while it was in flight.
    Aborted,
}

/// What happened to one request, kept when [`LoadSpec::keep_records`] is set.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its index in the load, in the order requests started.
    pub index: u64,
    /// What it did.
    pub request: Request,
    /// The proxy that accepted its connection (index into [`LoadSpec::proxies`]), if any did.
    pub proxy: Option<usize>,
    /// When it began, before its first connection attempt.
    pub started: std::time::Instant,
    /// When a proxy accepted its TCP connection.
    pub connected: Option<std::time::Instant>,
    /// When it ended, either way.
    pub ended: std::time::Instant,
    /// The origin that answered (index into [`LoadSpec::origins`]), once the TLS handshake
    /// showed it; `None` before that, or if its certificate is not in the list.
    pub origin: Option<usize>,
    /// Bytes checked against what was sent (response bodies; both directions of bulk
    /// transfers), counted only when the request completed.
    pub bytes_verified: u64,
    /// How it ended.
    pub outcome: Outcome,
}

/// Counters of one proxy.
#[derive(Debug, Default)]
struct Counters {
    refused: AtomicU64,
    started: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Counts of one proxy at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyCounts {
    /// Connections this proxy refused (the request moved on to the next proxy).
    pub refused: u64,
    /// Requests whose connection this proxy accepted.
    pub started: u64,
    /// Of those, the ones that completed with every byte intact.
    pub ok: u64,
    /// Of those, the ones that failed.
    pub failed: u64,
}

impl ProxyCounts {
    /// Requests that have ended, either way.
    pub fn finished(&self) -> u64 {
        self.ok + self.failed
    }

    /// Requests accepted and not yet ended.
    pub fn in_flight(&self) -> u64 {
        self.started - self.finished()
    }
}

/// Everything counted so far.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Per proxy, in the order of [`LoadSpec::proxies`].
    pub proxies: Vec<ProxyCounts>,
    /// Requests that reached no proxy at all (every one refused).
    pub unreachable: u64,
    /// Failures by cause (the error's outermost context), with their counts.
    pub causes: BTreeMap<String, u64>,
    /// Of the failed requests, those that saw corruption ([`Outcome::Corrupted`]).
    pub corrupted: u64,
    /// Bytes checked by completed requests ([`Record::bytes_verified`]).
    pub bytes_verified: u64,
}

impl Snapshot {
    /// Successful requests over every proxy.
    pub fn ok(&self) -> u64 {
        self.proxies.iter().map(|p| p.ok).sum()
    }

    /// Failed requests over every proxy (unreachable ones not included).
    pub fn failed(&self) -> u64 {
        self.proxies.iter().map(|p| p.failed).sum()
    }
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ok {}, failed {}, unreachable {}",
            self.ok(),
            self.failed(),
            self.unreachable
        )?;
        if self.corrupted > 0 {
            write!(f, ", CORRUPTED {}", self.corrupted)?;
        }
        for (i, p) in self.proxies.iter().enumerate() {
            write!(
                f,
                "; proxy {i}: ok {} failed {} refused {}",
                p.ok, p.failed, p.refused
            )?;
        }
        for (cause, n) in &self.causes {
            write!(f, "; {n} x {cause}")?;
        }
        Ok(())
    }
}

struct Stats {
    proxies: Vec<Counters>,
    unreachable: AtomicU64,
    causes: Mutex<BTreeMap<String, u64>>,
    corrupted: AtomicU64,
    bytes_verified: AtomicU64,
    /// Every request's record, if the spec keeps them.
    records: Option<Mutex<Vec<Record>>>,
}

impl Stats {
    fn snapshot(&self) -> Snapshot {
        // Read `ok`/`failed` before `started`, so that no snapshot shows more finished than
        // started requests.
        let proxies = self
            .proxies
            .iter()
            .map(|c| {
                let ok = c.ok.load(Ordering::SeqCst);
                let failed = c.failed.load(Ordering::SeqCst);
                ProxyCounts {
                    refused: c.refused.load(Ordering::SeqCst),
                    started: c.started.load(Ordering::SeqCst),
                    ok,
                    failed,
                }
            })
            .collect();
        Snapshot {
            proxies,
            unreachable: self.unreachable.load(Ordering::SeqCst),
            causes: self
                .causes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            corrupted: self.corrupted.load(Ordering::SeqCst),
            bytes_verified: self.bytes_verified.load(Ordering::SeqCst),
        }
    }

    fn keep(&self, record: Record) {
        if let Some(records) = &self.records {
            records
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(record);
        }
    }

    fn fail(&self, proxy: Option<usize>, cause: String) {
        match proxy {
            Some(i) => self.proxies[i].failed.fetch_add(1, Ordering::SeqCst),
            None => self.unreachable.fetch_add(1, Ordering::SeqCst),
        };
        *self
            .causes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cause)
            .or_default() += 1;
    }
}

/// A running load; stop it with [`Load::stop`].
pub struct Load {
    stats: Arc<Stats>,
    stop: CancellationToken,
    abort: CancellationToken,
    task: JoinHandle<()>,
}

impl Load {
    /// Starts sending requests at once.
    pub fn start(spec: LoadSpec) -> Self {
        let stats = Arc::new(Stats {
            proxies: spec.proxies.iter().map(|_| Counters::default()).collect(),
            unreachable: AtomicU64::new(0),
            causes: Mutex::new(BTreeMap::new()),
            corrupted: AtomicU64::new(0),
            bytes_verified: AtomicU64::new(0),
            records: spec.keep_records.then(|| Mutex::new(Vec::new())),
        });
        let (stop, abort) = (CancellationToken::new(), CancellationToken::new());
        let task = tokio::spawn(drive(spec, stats.clone(), stop.clone(), abort.clone()));
        Self {
            stats,
            stop,
            abort,
            task,
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> Snapshot {
        self.stats.snapshot()
    }

    /// The records of the requests that have ended so far, in the order they ended; empty
    /// unless [`LoadSpec::keep_records`] was set.
    pub fn records(&self) -> Vec<Record> {
        self.stats
            .records
            .as_ref()
            .map_or_else(Vec::new, |records| {
                records.lock().unwrap_or_else(|p| p.into_inner()).clone()
            })
    }

    /// Waits until at least `n` requests have succeeded, or fails after `limit`.
    pub async fn wait_ok(&self, n: u64, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while self.snapshot().ok() < n {
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{n} successful requests not reached in {limit:?}: {}",
                    self.snapshot()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until `n` more requests have succeeded than had when it was called, or fails
    /// after `limit`: "a while of serving" after some event.
    pub async fn wait_more_ok(&self, n: u64, limit: Duration) -> anyhow::Result<()> {
        let ok = self.snapshot().ok();
        self.wait_ok(ok + n, limit).await
    }

    /// Stops starting requests, waits for those in flight (each bounded by its timeout), and
    /// returns the final counts.
    pub async fn stop(self) -> Snapshot {
        self.stop_with_records().await.0
    }

    /// Like [`Load::stop`], and also returns every request's record (empty unless
    /// [`LoadSpec::keep_records`] was set), in the order they ended.
    pub async fn stop_with_records(mut self) -> (Snapshot, Vec<Record>) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
        self.finish()
    }

    /// Like [`Load::stop_with_records`], but gives the requests in flight only `grace` to
    /// end; those still running then end at once, as [`Outcome::Aborted`] (counted as failed
    /// in the [`Snapshot`], with that cause).
    pub async fn abort_with_records(mut self, grace: Duration) -> (Snapshot, Vec<Record>) {
        self.stop.cancel();
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            self.abort.cancel();
            let _ = (&mut self.task).await;
        }
        self.finish()
    }

    /// The final counts and the records, once the driver task has ended.
    fn finish(self) -> (Snapshot, Vec<Record>) {
        let records = self
            .stats
            .records
            .as_ref()
            .map_or_else(Vec::new, |records| {
                std::mem::take(&mut *records.lock().unwrap_or_else(|p| p.into_inner()))
            });
        (self.stats.snapshot(), records)
    }
}

async fn drive(
    spec: LoadSpec,
    stats: Arc<Stats>,
    stop: CancellationToken,
    abort: CancellationToken,
) {
    let spec = Arc::new(spec);
    let tls = client_config(spec.roots.clone(), &[]);
    let slots = Arc::new(Semaphore::new(spec.max_in_flight));
    let requests = TaskTracker::new();
    let period = spec
        .every
        .unwrap_or(Duration::from_secs(1) / spec.per_second.max(1));
    let mut ticker = tokio::time::interval(period);
    // After a stall, keep the rate instead of sending a burst to catch up.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    for i in 0usize.. {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let slot = tokio::select! {
            () = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (spec, stats, tls, abort) = (spec.clone(), stats.clone(), tls.clone(), abort.clone());
        requests.spawn(async move {
            one_request(i, &spec, &stats, tls, &abort).await;
            drop(slot);
        });
    }
    requests.close();
    requests.wait().await;
}

async fn one_request(
    i: usize,
    spec: &LoadSpec,
    stats: &Stats,
    tls: Arc<ClientConfig>,
    abort: &CancellationToken,
) {
    let index = i as u64;
    let request = match &spec.vary {
        Some(vary) => (vary.0)(index),
        None => spec.request.clone(),
    };
    let mut record = Record {
        index,
        request,
        proxy: None,
        started: std::time::Instant::now(),
        connected: None,
        ended: std::time::Instant::now(),
        origin: None,
        bytes_verified: 0,
        outcome: Outcome::Unreachable,
    };
    let deadline = Instant::now() + spec.timeout;
    let n = spec.proxies.len();
    let mut reached = None;
    for k in 0..n {
        let index = (i + k) % n;
        match tokio::time::timeout_at(deadline, TcpStream::connect(spec.proxies[index])).await {
            Ok(Ok(tcp)) => {
                reached = Some((index, tcp));
                break;
            }
            Ok(Err(_)) => {
                stats.proxies[index].refused.fetch_add(1, Ordering::SeqCst);
            }
            Err(_) => break,
        }
    }
    let Some((index, tcp)) = reached else {
        stats.fail(None, "no proxy accepted the connection".into());
        record.ended = std::time::Instant::now();
        stats.keep(record);
        return;
    };
    record.proxy = Some(index);
    record.connected = Some(std::time::Instant::now());
    stats.proxies[index].started.fetch_add(1, Ordering::SeqCst);
    let exchanged = tokio::select! {
        exchanged = tokio::time::timeout_at(
            deadline,
            exchange(spec, &record.request, tls, tcp, &mut record.origin),
        ) => Some(exchanged),
        () = abort.cancelled() => None,
    };
    record.ended = std::time::Instant::now();
    record.outcome = match exchanged {
        None => {
            stats.fail(Some(index), "aborted: the load was stopped".into());
            Outcome::Aborted
        }
        Some(Ok(Ok(bytes))) => {
            stats.proxies[index].ok.fetch_add(1, Ordering::SeqCst);
            stats.bytes_verified.fetch_add(bytes, Ordering::SeqCst);
            record.bytes_verified = bytes;
            Outcome::Ok
        }
        Some(Ok(Err(err))) => {
            let cause = format!("{err:#}");
            stats.fail(Some(index), cause.clone());
            if corruption(&err) {
                stats.corrupted.fetch_add(1, Ordering::SeqCst);
                Outcome::Corrupted(cause)
            } else {
                Outcome::Failed(cause)
            }
        }
        Some(Err(_)) => {
            let cause = format!("timed out after {:?}", spec.timeout);
            stats.fail(Some(index), cause.clone());
            Outcome::Failed(cause)
        }
    };
    stats.keep(record);
}

/// An answer that is not the origin's: the wrong status or body.
#[derive(Debug)]
struct WrongAnswer(String);

impl std::fmt::Display for WrongAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WrongAnswer {}

/// Whether `err` shows bytes that arrived altered, rather than a connection that ended early.
fn corruption(err: &anyhow::Error) -> bool {
    use rustls::AlertDescription as Alert;
    let tls_says_altered = |err: &rustls::Error| {
        matches!(
            err,
            rustls::Error::DecryptError
                | rustls::Error::InvalidMessage(_)
                | rustls::Error::AlertReceived(
                    Alert::BadRecordMac | Alert::DecryptError | Alert::DecodeError
                )
        )
    };
    err.chain().any(|cause| {
        if cause.is::<WrongAnswer>() {
            return true;
        }
        if let Some(bulk) = cause.downcast_ref::<BulkError>() {
            return matches!(bulk, BulkError::Corrupted { .. });
        }
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return tls_says_altered(tls);
        }
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .is_some_and(tls_says_altered)
    })
}

/// Runs `request` over `tcp`; returns how many bytes it checked. Sets `origin` as soon as the
/// handshake shows which origin answered.
async fn exchange(
    spec: &LoadSpec,
    request: &Request,
    tls: Arc<ClientConfig>,
    tcp: TcpStream,
    origin: &mut Option<usize>,
) -> anyhow::Result<u64> {
    use anyhow::Context as _;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(spec.host.clone()).context("hostname")?;
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    if let Some(leaf) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        *origin = spec.origins.iter().position(|known| known == leaf);
    }
    if !spec.think.is_zero() {
        tokio::time::sleep(spec.think).await;
    }
    match request {
        Request::Get { path } => {
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                spec.host
            );
            let response = http_exchange(stream, request.as_bytes())
                .await
                .context("HTTP exchange")?;
            if response.status != 200 {
                return Err(WrongAnswer(format!("HTTP status {}", response.status)).into());
            }
            let expected = format!("hello from origin: GET {path}\n");
            if response.body != expected.as_bytes() {
                return Err(WrongAnswer("unexpected body".into()).into());
            }
            Ok(response.body.len() as u64)
        }
        Request::Bulk { bytes } => {
            bulk_transfer(stream, *bytes)
                .await
                .context("bulk transfer")?;
            Ok(2 * bytes)
        }
        Request::PacedBulk { bytes, chunk, tick } => {
            bulk_transfer_paced(stream, *bytes, (*chunk).max(1), Some(*tick))
                .await
                .context("paced bulk transfer")?;
            Ok(2 * bytes)
        }
    }
}
