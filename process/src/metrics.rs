//! The metrics endpoint every binary serves on `--metrics-listen ADDR`: a small HTTP/1 server
//! for Prometheus and for whatever checks the process's health.
//!
//! - `GET /metrics`: the binary's [`Registry`] in the OpenMetrics text format
//!   ([`CONTENT_TYPE`], ending with `# EOF`) when the request's `Accept` names it, as
//!   Prometheus's does; otherwise in the classic Prometheus text format 0.0.4
//!   ([`CLASSIC_CONTENT_TYPE`]), which older tools (and `promtool check metrics`) read.
//! - `GET /healthz`: `200 ok` for as long as the process serves at all.
//! - `GET /readyz`: `200 ready` when the binary says it is ready, else `503` with a one-line
//!   reason, from the [`ReadinessFn`] the binary supplies.
//!
//! `HEAD` is answered like `GET`, without the body. Any other path is `404`, any other method
//! on these paths `405`. The server never reads a request body, reads each request head
//! within [`Limits::header_read_timeout`], closes every connection after one request (or
//! [`Limits::connection_timeout`]), and serves [`Limits::max_connections`] connections at once,
//! closing any more at once: a scraper that misbehaves cannot hold the process's memory or
//! descriptors. It speaks plain HTTP; bind it to loopback or a private interface.
//!
//! A binary builds its registry with [`registry`] (which adds `<prefix>_build_info` and
//! `<prefix>_start_time_seconds`), registers its own metrics, and calls [`spawn`] with its
//! [`MetricsArgs`]. The bound address is logged as `listening addr=… listener="metrics"`,
//! the same line the proxy logs for its other listeners, so a test that asked for port 0 reads
//! the port from it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
pub use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

/// The media type of `/metrics` for a scraper that accepts OpenMetrics (Prometheus does).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The media type of `/metrics` for anyone else: the classic Prometheus text format.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The path Prometheus scrapes.
pub const METRICS_PATH: &str = "/metrics";
/// The liveness path: 200 while the process serves.
pub const HEALTHZ_PATH: &str = "/healthz";
/// The readiness path: 200 when ready, 503 and the reason otherwise.
pub const READYZ_PATH: &str = "/readyz";

/// The `--metrics-listen` flag, the same on every binary.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics (GET /metrics), /healthz and /readyz over plain HTTP on ADDR,
    /// e.g. 127.0.0.1:9100. Off unless given; keep ADDR off the public internet
    #[arg(long, env = "SHROUD_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Whether a process is ready for its work, as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Ready: `/readyz` answers 200.
    Ready,
    /// Not ready, and why (one line, shown to whoever asks): `/readyz` answers 503.
    NotReady(String),
}

impl Readiness {
    /// Not ready, for `reason`.
    pub fn not_ready(reason: impl Into<String>) -> Self {
        Self::NotReady(reason.into())
    }
}

/// Where a server is in its life, for `/readyz`: starting until its listeners are up, then
/// serving, then stopping for good from its shutdown signal (a drain), with the one-line
/// reason given at [`Lifecycle::new`].
#[derive(Debug)]
pub struct Lifecycle {
    phase: std::sync::atomic::AtomicU8,
    stopping: &'static str,
}

impl Lifecycle {
    const STARTING: u8 = 0;
    const SERVING: u8 = 1;
    const STOPPING: u8 = 2;

    /// A server that is starting, and says `stopping` (`"draining"`) once it stops.
    pub fn new(stopping: &'static str) -> Self {
        Self {
            phase: std::sync::atomic::AtomicU8::new(Self::STARTING),
            stopping,
        }
    }

    /// The listeners are up: ready, unless the server is stopping already.
    pub fn serving(&self) {
        let _ = self.phase.compare_exchange(
            Self::STARTING,
            Self::SERVING,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// The server is stopping: not ready from now on.
    pub fn stopping(&self) {
        self.phase
            .store(Self::STOPPING, std::sync::atomic::Ordering::SeqCst);
    }

    /// What `/readyz` reports now.
    pub fn readiness(&self) -> Readiness {
        match self.phase.load(std::sync::atomic::Ordering::SeqCst) {
            Self::SERVING => Readiness::Ready,
            Self::STOPPING => Readiness::not_ready(self.stopping),
            _ => Readiness::not_ready("starting: listeners not up yet"),
        }
    }
}

/// What `/readyz` asks on each request. Called on the server's task: it must be quick and
/// must not block (read an atomic or a `watch` channel).
pub type ReadinessFn = Arc<dyn Fn() -> Readiness + Send + Sync>;

/// Bounds on what the endpoint's clients may cost.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Deadline for a request head once the connection is up.
    pub header_read_timeout: Duration,
    /// Deadline for a whole connection (one request and its answer).
    pub connection_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            header_read_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(15),
        }
    }
}

/// Largest request head read, in bytes.
const MAX_HEAD_BUFFER: usize = 8 * 1024;

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound.
    #[error("--metrics-listen {addr}: cannot listen there")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

/// A registry whose metric names all start with `prefix` (such as `shroud_proxy`), holding
/// `<prefix>_build_info{version}` (always 1) and `<prefix>_start_time_seconds` (when the
/// process started, in Unix seconds), which every binary reports.
pub fn registry(prefix: &str) -> Registry {
    let mut registry = Registry::with_prefix(prefix);
    // An info metric's samples take the suffix `_info`: this one is `<prefix>_build_info`.
    registry.register(
        "build",
        "The version of this binary, as a label; always 1",
        Info::new([("version", env!("CARGO_PKG_VERSION"))]),
    );
    let started: Gauge = Gauge::default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        });
    started.set(now);
    registry.register(
        "start_time_seconds",
        "When this process started, in seconds since the Unix epoch",
        started,
    );
    registry
}

/// Binds `addr` for the endpoint. Must run inside a Tokio runtime.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    let bind = || {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        TcpListener::from_std(listener)
    };
    bind().map_err(|source| MetricsError::Bind { addr, source })
}

/// What the endpoint serves.
#[derive(Clone)]
pub struct Endpoint {
    /// The metrics of `/metrics`.
    pub registry: Arc<Registry>,
    /// The answer of `/readyz`.
    pub readiness: ReadinessFn,
    /// Bounds on connections.
    pub limits: Limits,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").finish_non_exhaustive()
    }
}

/// When `args` asks for the endpoint: binds it, logs where, and serves `registry` and
/// `readiness` on a task of its own until `shutdown` is cancelled. Returns the task, or `None`
/// when `--metrics-listen` is not given. A bind that fails is an error naming the flag.
pub fn spawn(
    args: &MetricsArgs,
    registry: Registry,
    readiness: ReadinessFn,
    shutdown: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, MetricsError> {
    let Some(addr) = args.metrics_listen else {
        return Ok(None);
    };
    let listener = bind(addr)?;
    let endpoint = Endpoint {
        registry: Arc::new(registry),
        readiness,
        limits: Limits::default(),
    };
    Ok(Some(tokio::spawn(serve(listener, endpoint, shutdown))))
}

/// Serves the endpoint on `listener` until `shutdown` is cancelled; connections in flight
/// then get a moment to finish.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, listener = "metrics", "listening");
    }
    let permits = Arc::new(Semaphore::new(endpoint.limits.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning; the listener survives.
                warn!(%err, listener = "metrics", "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            debug!(%peer, "metrics connection limit reached; closing new connection");
            continue;
        };
        let endpoint = endpoint.clone();
        tracker.spawn(
            async move {
                serve_connection(stream, endpoint).await;
                drop(permit);
            }
            .instrument(tracing::debug_span!("metrics", %peer)),
        );
    }
    drop(listener);
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
}

async fn serve_connection(stream: TcpStream, endpoint: Endpoint) {
    let limits = endpoint.limits.clone();
    let service = service_fn(move |request| {
        let reply = answer(&request, &endpoint);
        async move { Ok::<_, Infallible>(reply) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(false)
        .max_buf_size(MAX_HEAD_BUFFER);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.connection_timeout, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => debug!(%err, "metrics connection ended with an error"),
        Err(_) => debug!("metrics connection outlived its deadline; closing it"),
    }
}

type Reply = Response<Full<Bytes>>;

/// The answer to one request; the body is never read.
fn answer(request: &Request<Incoming>, endpoint: &Endpoint) -> Reply {
    let path = request.uri().path();
    if !matches!(path, METRICS_PATH | HEALTHZ_PATH | READYZ_PATH) {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut reply = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        reply
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return reply;
    }
    match path {
        METRICS_PATH => {
            let openmetrics = request
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|value| value.to_str().ok())
                .any(|value| value.contains("application/openmetrics-text"));
            metrics(&endpoint.registry, openmetrics)
        }
        HEALTHZ_PATH => text(StatusCode::OK, "ok\n"),
        _ => match (endpoint.readiness)() {
            Readiness::Ready => text(StatusCode::OK, "ready\n"),
            Readiness::NotReady(reason) => {
                // One line, whatever the reason holds.
                let reason: String = reason
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("not ready: {reason}\n"),
                )
            }
        },
    }
}

/// The registry's metrics, in OpenMetrics text or the classic format.
fn metrics(registry: &Registry, openmetrics: bool) -> Reply {
    use prometheus_client::encoding::{prometheus_text, text};
    let mut body = String::new();
    let (encoded, content_type) = if openmetrics {
        (text::encode(&mut body, registry), CONTENT_TYPE)
    } else {
        (
            prometheus_text::encode(&mut body, registry),
            CLASSIC_CONTENT_TYPE,
        )
    };
    if let Err(err) = encoded {
        warn!(%err, "encoding the metrics failed");
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode the metrics\n",
        );
    }
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    let headers = reply.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    reply
}

fn text(status: StatusCode, body: &str) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(body.to_owned())));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    reply
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Mutex;

    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    struct Running {
        addr: SocketAddr,
        ready: Arc<Mutex<Readiness>>,
        counter: Counter,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(limits: Limits) -> Running {
        let mut registry = registry("shroud_test");
        let counter: Counter = Counter::default();
        registry.register("things", "Things seen", counter.clone());
        let ready = Arc::new(Mutex::new(Readiness::not_ready("starting\nup")));
        let readiness: ReadinessFn = {
            let ready = ready.clone();
            Arc::new(move || ready.lock().unwrap().clone())
        };
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let endpoint = Endpoint {
            registry: Arc::new(registry),
            readiness,
            limits,
        };
        let task = tokio::spawn(serve(listener, endpoint, shutdown.clone()));
        Running {
            addr,
            ready,
            counter,
            shutdown,
            task,
        }
    }

    /// Sends `request` as is and reads the whole answer (the server closes after one); a
    /// connection the server resets reads as no answer.
    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut answer = Vec::new();
        let exchange = async {
            stream.write_all(request.as_bytes()).await?;
            stream.read_to_end(&mut answer).await
        };
        let read = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .expect("the server answers and closes");
        match read {
            Ok(_) => String::from_utf8(answer).unwrap(),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => String::new(),
            Err(err) => panic!("{err}"),
        }
    }

    /// What Prometheus 2.x sends.
    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
        application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    async fn get(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
        let answer = exchange(
            addr,
            &format!("{method} {path} HTTP/1.1\r\nHost: x\r\nAccept: {PROMETHEUS_ACCEPT}\r\n\r\n"),
        )
        .await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let status = head[9..12].parse().unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let running = start(Limits::default()).await;
        running.counter.inc_by(3);
        let (status, head, body) = get(running.addr, "GET", "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("content-type: {CONTENT_TYPE}")),
            "{head}"
        );
        assert!(
            body.contains("# TYPE shroud_test_things counter\n"),
            "{body}"
        );
        assert!(body.contains("\nshroud_test_things_total 3\n"), "{body}");
        assert!(
            body.contains("shroud_test_build_info{version=\"0.1.0\"} 1"),
            "{body}"
        );
        assert!(body.contains("\nshroud_test_start_time_seconds "), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        // Without OpenMetrics in Accept (curl, older tools): the classic format.
        let answer = exchange(running.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            answer
                .to_ascii_lowercase()
                .contains(&format!("content-type: {CLASSIC_CONTENT_TYPE}")),
            "{answer}"
        );
        assert!(
            answer.contains("\nshroud_test_things_total 3\n"),
            "{answer}"
        );
        assert!(!answer.contains("# EOF"), "{answer}");

        assert_eq!(get(running.addr, "GET", "/healthz").await.0, 200);
        // Not ready: 503 and the reason, on one line.
        let (status, _, body) = get(running.addr, "GET", "/readyz").await;
        assert_eq!((status, body.as_str()), (503, "not ready: starting up\n"));
        *running.ready.lock().unwrap() = Readiness::Ready;
        let (status, _, body) = get(running.addr, "GET", "/readyz?verbose=1").await;
        assert_eq!((status, body.as_str()), (200, "ready\n"));
        // HEAD: the same status, no body.
        let (status, _, body) = get(running.addr, "HEAD", "/metrics").await;
        assert_eq!((status, body.as_str()), (200, ""));

        running.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), running.task)
            .await
            .expect("the server stops on shutdown")
            .unwrap();
        assert!(TcpStream::connect(running.addr).await.is_err());
    }

    #[tokio::test]
    async fn other_paths_are_404_and_other_methods_405() {
        let running = start(Limits::default()).await;
        for path in ["/", "/metrics/", "/metricsx", "/v1/proxies", "/../metrics"] {
            assert_eq!(get(running.addr, "GET", path).await.0, 404, "{path}");
        }
        for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
            let (status, head, _) = get(running.addr, method, "/metrics").await;
            assert_eq!(status, 405, "{method}");
            assert!(
                head.to_ascii_lowercase().contains("allow: get, head"),
                "{head}"
            );
        }
        // A body is never read: the answer comes at once, and the connection closes.
        let answer = exchange(
            running.addr,
            "POST /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nabc",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
        // Garbage gets a 400 or a closed connection, and the server serves on.
        let answer = exchange(running.addr, "\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
            "{answer}"
        );
        assert_eq!(get(running.addr, "GET", "/healthz").await.0, 200);
    }

    #[tokio::test]
    async fn slow_heads_and_extra_connections_are_closed() {
        let limits = Limits {
            max_connections: 2,
            header_read_timeout: Duration::from_millis(300),
            connection_timeout: Duration::from_millis(600),
        };
        let running = start(limits).await;
        // A head that never ends is closed within the deadlines.
        let mut slow = TcpStream::connect(running.addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost:")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest))
            .await
            .expect("a slow head is cut off")
            .ok();
        assert!(started.elapsed() < Duration::from_secs(2));
        // So is a connection that sends nothing.
        let mut silent = TcpStream::connect(running.addr).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "{read:?}");

        // Two connections fill the endpoint; a third is closed at once, unanswered.
        let _one = TcpStream::connect(running.addr).await.unwrap();
        let _two = TcpStream::connect(running.addr).await.unwrap();
        // Let the server take both before the third arrives.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let answer = exchange(running.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(answer, "", "a connection over the cap was served");
        // Once they time out, the endpoint serves again.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let answer = exchange(running.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never served again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_taken_address_is_an_error_naming_the_flag() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let args = MetricsArgs {
            metrics_listen: Some(addr),
        };
        let readiness: ReadinessFn = Arc::new(|| Readiness::Ready);
        let err = spawn(
            &args,
            registry("x"),
            readiness.clone(),
            CancellationToken::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("--metrics-listen {addr}")),
            "{err}"
        );
        assert!(std::error::Error::source(&err).is_some());
        let off = spawn(
            &MetricsArgs::default(),
            registry("x"),
            readiness,
            CancellationToken::new(),
        )
        .unwrap();
        assert!(off.is_none());
    }
}
