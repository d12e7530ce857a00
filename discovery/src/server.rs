//! The HTTPS API: hyper's HTTP/1.1 over tokio-rustls, one request per connection.
//!
//! Every connection is bounded: a TLS handshake deadline, a header read deadline, a deadline on
//! the whole connection, a 4 KiB request body, a cap on connections at once, and a per-address
//! rate limit. State lives in memory only; a restarted service rebuilds it from the fleet file
//! and the next heartbeats. See [`crate::api`] for the routes. A reload replaces the HTTPS
//! certificate and the fleet file's proxies while it runs, through a [`ServiceHandle`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use shroud_mux::auth::SecretKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

use crate::api::{self, Heartbeat, HeartbeatReply, MAX_PEERS_IN_REPLY};
use crate::cname::{CnameCheck, Verdict};
use crate::dns::{Answerer, DnsZone};
use crate::fleet::{Fleet, FleetFile, HeartbeatError, StaticsChange};
use crate::metrics::{DiscoveryMetrics, HeartbeatOutcome, ListOutcome};
use crate::ratelimit::{RateConfig, RateLimiter};
use crate::secret::FleetSecret;
use crate::signed::{self, ProxyList, LIST_VERSION};

/// Default number of proxies in a list.
pub const DEFAULT_MAX_PROXIES: usize = 3;
/// Default validity of a list.
pub const DEFAULT_LIST_TTL: Duration = Duration::from_secs(300);
/// Largest request head hyper buffers, in bytes.
const MAX_HEAD_BUFFER: usize = 16 * 1024;

/// Bounds on what one connection or address may cost.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Deadline for the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Deadline for the request head once the connection is up.
    pub header_read_timeout: Duration,
    /// Deadline for the whole connection.
    pub connection_timeout: Duration,
    /// Largest request body read, in bytes.
    pub max_body: usize,
    /// The per-address rate limit.
    pub rate: RateConfig,
    /// On shutdown, how long requests in flight may take to finish.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            connection_timeout: Duration::from_secs(30),
            max_body: api::MAX_REQUEST_BODY,
            rate: RateConfig::default(),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// The CNAME requirement: lists only for hostnames that are CNAMEs into `domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequireCname {
    /// The domain, normalised: `HOST` must be a CNAME to `HOST.domain`.
    pub domain: String,
    /// The DNS servers asked, over UDP and TCP (`ADDR:PORT`, usually port 53).
    pub dns_servers: Vec<SocketAddr>,
}

/// Everything the service needs to run.
#[derive(Debug)]
pub struct ServerConfig {
    /// The HTTPS certificate and key.
    pub tls: Arc<rustls::ServerConfig>,
    /// The key lists are signed with; clients pin its public half.
    pub signing_key: Arc<SecretKey>,
    /// The fleet, with its static entries.
    pub fleet: Fleet,
    /// The secret heartbeats must present; `None` refuses every heartbeat.
    pub fleet_secret: Option<FleetSecret>,
    /// Most proxies in one list.
    pub max_proxies: usize,
    /// How long a list is valid.
    pub list_ttl: Duration,
    /// The CNAME requirement, if any.
    pub require_cname: Option<RequireCname>,
    /// Bounds on connections and addresses.
    pub limits: Limits,
    /// The authoritative DNS zone to serve as well, if any.
    pub dns: Option<DnsService>,
    /// What the service counts, for `--metrics-listen`.
    pub metrics: Arc<DiscoveryMetrics>,
}

/// The service's DNS: a zone and the sockets to answer it on.
#[derive(Debug)]
pub struct DnsService {
    /// What the zone is and how it answers.
    pub zone: DnsZone,
    /// UDP, bound to the same address as `tcp`.
    pub udp: tokio::net::UdpSocket,
    /// TCP, for answers that do not fit UDP and resolvers that prefer it.
    pub tcp: TcpListener,
}

impl ServerConfig {
    /// A configuration with the default list size, list validity and limits, no heartbeats
    /// and no CNAME requirement.
    pub fn new(tls: Arc<rustls::ServerConfig>, signing_key: Arc<SecretKey>, fleet: Fleet) -> Self {
        Self {
            tls,
            signing_key,
            fleet,
            fleet_secret: None,
            max_proxies: DEFAULT_MAX_PROXIES,
            list_ttl: DEFAULT_LIST_TTL,
            require_cname: None,
            limits: Limits::default(),
            dns: None,
            metrics: Arc::default(),
        }
    }
}

/// Loads the HTTPS certificate chain and key from PEM files (ALPN `http/1.1`).
pub fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    tls_config_for(shroud_process::tls::load_certified_key(cert, key)?)
}

/// The HTTPS configuration serving `certified` (ALPN `http/1.1`).
pub fn tls_config_for(
    certified: rustls::sign::CertifiedKey,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    Ok(Arc::new(shroud_process::tls::single_cert_config(
        certified,
        &[b"http/1.1"],
    )?))
}

/// Shared state of all connections.
struct State {
    /// The HTTPS configuration; a reload replaces it, and each handshake takes the one in place.
    tls: RwLock<Arc<rustls::ServerConfig>>,
    reloads: shroud_process::reload::ReloadCounts,
    signing_key: Arc<SecretKey>,
    fleet: Arc<Mutex<Fleet>>,
    fleet_secret: Option<FleetSecret>,
    max_proxies: usize,
    list_ttl: Duration,
    cname: Option<CnameCheck>,
    /// The zone this service's DNS answers, without the final dot: names inside it resolve to
    /// the fleet by construction, and need no CNAME.
    own_zone: Option<String>,
    limiter: Mutex<RateLimiter>,
    max_body: usize,
    metrics: Arc<DiscoveryMetrics>,
}

/// Locks a mutex whose holders never leave its data half-changed, so a poisoned one is fine.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves the API on `listener` until `shutdown` is cancelled, then stops accepting and waits
/// up to the drain deadline for requests in flight.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    Service::new(config)?.run(listener, shutdown).await
}

/// A service set up and ready to serve, as [`run`] does in one step; its [`ServiceHandle`]
/// reaches into it while it runs.
pub struct Service {
    state: Arc<State>,
    limits: Limits,
    dns: Option<DnsService>,
    metrics: Arc<DiscoveryMetrics>,
}

/// What a reload replaces in a running service: the HTTPS certificate and the fleet file's
/// static proxies. Heartbeats' proxies, the signing key and every other setting stay.
#[derive(Clone)]
pub struct ServiceHandle {
    state: Arc<State>,
}

impl ServiceHandle {
    /// Serves new connections with `tls`; connections already open keep theirs.
    pub fn set_tls(&self, tls: Arc<rustls::ServerConfig>) {
        match self.state.tls.write() {
            Ok(mut slot) => *slot = tls,
            Err(poisoned) => *poisoned.into_inner() = tls,
        }
    }

    /// Lists `file`'s proxies as the static ones from now on, in place of the old file's.
    pub fn replace_statics(&self, file: FleetFile) -> StaticsChange {
        lock(&self.state.fleet).replace_statics(file)
    }

    /// How many reloads took effect, and how many failed.
    pub fn reload_counts(&self) -> &shroud_process::reload::ReloadCounts {
        &self.state.reloads
    }
}

impl Service {
    /// Sets up the service `config` describes: its state, and the CNAME check's resolver.
    pub fn new(config: ServerConfig) -> anyhow::Result<Self> {
        let cname = match &config.require_cname {
            None => None,
            Some(require) => {
                if require.dns_servers.is_empty() {
                    anyhow::bail!("the CNAME requirement needs at least one DNS server");
                }
                let check = CnameCheck::new(require.domain.clone(), &require.dns_servers)
                    .context("setting up the DNS resolver")?;
                Some(check)
            }
        };
        let limits = config.limits;
        let state = Arc::new(State {
            tls: RwLock::new(config.tls),
            reloads: config.metrics.reloads.clone(),
            signing_key: config.signing_key,
            fleet: Arc::new(Mutex::new(config.fleet)),
            fleet_secret: config.fleet_secret,
            max_proxies: config.max_proxies.min(signed::MAX_PROXIES),
            // Clients refuse lists valid for longer than this; never make one.
            list_ttl: config
                .list_ttl
                .min(Duration::from_secs(signed::MAX_LIFETIME_SECS)),
            cname,
            own_zone: config.dns.as_ref().map(|dns| {
                let apex = dns.zone.apex.to_ascii();
                apex.strip_suffix('.').unwrap_or(&apex).to_owned()
            }),
            limiter: Mutex::new(RateLimiter::new(limits.rate)),
            max_body: limits.max_body,
            metrics: config.metrics.clone(),
        });
        config.metrics.watch_fleet(state.fleet.clone());
        Ok(Self {
            state,
            limits,
            dns: config.dns,
            metrics: config.metrics,
        })
    }

    /// The handle a reload uses while the service runs.
    pub fn handle(&self) -> ServiceHandle {
        ServiceHandle {
            state: self.state.clone(),
        }
    }

    /// Serves the API on `listener` until `shutdown` is cancelled, then stops accepting and
    /// waits up to the drain deadline for requests in flight.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let Self {
            state,
            limits,
            dns,
            metrics,
        } = self;
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        let tracker = TaskTracker::new();
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "listening");
        }
        if let Some(dns) = dns {
            if let Ok(addr) = dns.udp.local_addr() {
                info!(%addr, zone = %dns.zone.apex, "answering DNS");
            }
            metrics.dns_enabled();
            let answerer = Answerer::new(dns.zone, state.fleet.clone()).counting(metrics.clone());
            tracker.spawn(crate::dns::serve(
                dns.udp,
                dns.tcp,
                answerer,
                shutdown.clone(),
            ));
        }

        metrics.serving();
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning; the listener survives.
                    warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                debug!(%peer, "connection limit reached; closing new connection");
                continue;
            };
            let connection = Connection {
                // The certificate in place now: a reload may have replaced it.
                acceptor: TlsAcceptor::from(state.tls()),
                state: state.clone(),
                limits: limits.clone(),
                shutdown: shutdown.clone(),
                peer,
            };
            tracker.spawn(
                async move {
                    connection.serve(stream).await;
                    drop(permit);
                }
                .instrument(tracing::debug_span!("connection", %peer)),
            );
        }

        drop(listener);
        metrics.stopping();
        tracker.close();
        info!("shutting down");
        if tokio::time::timeout(limits.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!("drain deadline passed with connections still open; closing them");
        }
        Ok(())
    }
}

impl State {
    fn tls(&self) -> Arc<rustls::ServerConfig> {
        match self.tls.read() {
            Ok(tls) => tls.clone(),
            // A writer panicked mid-assignment of an Arc: the value is still whole.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// One accepted connection.
struct Connection {
    state: Arc<State>,
    acceptor: TlsAcceptor,
    limits: Limits,
    shutdown: CancellationToken,
    peer: SocketAddr,
}

impl Connection {
    async fn serve(self, stream: TcpStream) {
        if let Err(err) = stream.set_nodelay(true) {
            debug!(%err, "could not set TCP_NODELAY");
        }
        let handshake = tokio::time::timeout(
            self.limits.tls_handshake_timeout,
            self.acceptor.accept(stream),
        );
        let tls = match handshake.await {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                debug!(%err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!("TLS handshake timed out");
                return;
            }
        };

        let state = self.state.clone();
        let peer = self.peer;
        let service = service_fn(move |request| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(request, peer, &state).await) }
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .keep_alive(false)
            .max_buf_size(MAX_HEAD_BUFFER);
        let connection = builder.serve_connection(TokioIo::new(tls), service);
        let mut connection = std::pin::pin!(connection);
        let deadline = tokio::time::sleep(self.limits.connection_timeout);
        let mut deadline = std::pin::pin!(deadline);
        let mut draining = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        debug!(%err, "connection ended with an error");
                    }
                    return;
                }
                () = &mut deadline => {
                    debug!("connection outlived its deadline; closing it");
                    return;
                }
                () = self.shutdown.cancelled(), if !draining => {
                    connection.as_mut().graceful_shutdown();
                    draining = true;
                }
            }
        }
    }
}

type Reply = Response<Full<Bytes>>;

async fn handle(request: Request<Incoming>, peer: SocketAddr, state: &State) -> Reply {
    if !lock(&state.limiter).allow(peer.ip(), Instant::now()) {
        debug!("rate limit exceeded");
        state.metrics.rate_limited();
        let mut reply = text(StatusCode::TOO_MANY_REQUESTS, "too many requests\n");
        reply
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return reply;
    }
    let method = request.method().clone();
    match (method, request.uri().path()) {
        (Method::GET, api::HEALTHZ_PATH) => text(StatusCode::OK, "ok\n"),
        (Method::GET, api::PROXIES_PATH) => {
            let reply = proxies(&request, state).await;
            // Each way a list request ends has a status of its own.
            state.metrics.list(match reply.status() {
                StatusCode::OK => ListOutcome::Served,
                StatusCode::BAD_REQUEST => ListOutcome::BadRequest,
                StatusCode::FORBIDDEN => ListOutcome::NotCname,
                StatusCode::SERVICE_UNAVAILABLE => ListOutcome::CnameUnavailable,
                StatusCode::NOT_FOUND => ListOutcome::NoProxies,
                _ => ListOutcome::Error,
            });
            reply
        }
        (Method::POST, api::HEARTBEAT_PATH) => heartbeat(request, peer, state).await,
        (_, api::HEALTHZ_PATH | api::PROXIES_PATH) => not_allowed("GET"),
        (_, api::HEARTBEAT_PATH) => not_allowed("POST"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn proxies(request: &Request<Incoming>, state: &State) -> Reply {
    let Some(host) = host_param(request.uri().query()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "give the hostname once, as ?host=HOSTNAME\n",
        );
    };
    let host = match shroud_mux::hostname::normalize(&host) {
        Ok(host) => host,
        Err(err) => return text(StatusCode::BAD_REQUEST, &format!("invalid host: {err}\n")),
    };

    let in_own_zone = state.own_zone.as_deref().is_some_and(|zone| {
        host.strip_suffix(zone)
            .is_some_and(|head| head.ends_with('.'))
    });
    if let (Some(cname), false) = (&state.cname, in_own_zone) {
        let expected = format!("{host}.{}", cname.domain());
        match cname.check(&host).await {
            Ok(Verdict::Confirmed) => {}
            Ok(Verdict::Absent) => {
                debug!(%host, "no CNAME; refusing");
                return text(
                    StatusCode::FORBIDDEN,
                    &format!("{host} is not a CNAME to {expected}\n"),
                );
            }
            Ok(Verdict::Elsewhere { target }) => {
                debug!(%host, %target, "CNAME elsewhere; refusing");
                return text(
                    StatusCode::FORBIDDEN,
                    &format!("{host} is a CNAME to {target}, not to {expected}\n"),
                );
            }
            Err(err) => {
                warn!(%host, err = %anyhow::Error::new(err), "CNAME check failed; refusing");
                let mut reply = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("could not check the DNS of {host}; try again later\n"),
                );
                reply
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
                return reply;
            }
        }
    }

    let mut proxies = lock(&state.fleet).select(&host, state.max_proxies, Instant::now());
    if !wants_onion(request.uri().query()) {
        // Clients that did not ask would refuse an entry with a field they do not know.
        for entry in &mut proxies {
            entry.onion = None;
        }
    }
    if proxies.is_empty() {
        return text(
            StatusCode::NOT_FOUND,
            &format!("no healthy proxy for {host}\n"),
        );
    }
    let Ok(since_epoch) = SystemTime::now().duration_since(UNIX_EPOCH) else {
        warn!("the system clock is before 1970; cannot date lists");
        return text(StatusCode::INTERNAL_SERVER_ERROR, "clock error\n");
    };
    let issued_at = since_epoch.as_secs();
    let list = ProxyList {
        version: LIST_VERSION,
        host,
        issued_at,
        expires_at: issued_at.saturating_add(state.list_ttl.as_secs()),
        proxies,
    };
    match signed::sign(&list, &state.signing_key) {
        Ok(body) => {
            let mut reply = Response::new(Full::new(Bytes::from(body)));
            let headers = reply.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            reply
        }
        Err(err) => {
            warn!(err = %anyhow::Error::new(err), "signing a list failed");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not sign the list\n",
            )
        }
    }
}

/// Whether the request asks for proxies' onion endpoints ([`api::ONION_PARAM`]).
fn wants_onion(query: Option<&str>) -> bool {
    query.is_some_and(|query| query.split('&').any(|pair| pair == api::ONION_PARAM))
}

/// The value of the one `host` parameter; `None` if it is missing or repeated.
fn host_param(query: Option<&str>) -> Option<String> {
    let mut found = None;
    for pair in query?.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "host" {
            if found.is_some() {
                return None;
            }
            found = Some(value.to_owned());
        }
    }
    found
}

async fn heartbeat(request: Request<Incoming>, peer: SocketAddr, state: &State) -> Reply {
    let Some(secret) = &state.fleet_secret else {
        state.metrics.heartbeat(HeartbeatOutcome::Disabled);
        return text(
            StatusCode::FORBIDDEN,
            "heartbeats are not enabled on this service\n",
        );
    };
    let authorized = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| bearer_token(value.as_bytes()))
        .is_some_and(|token| secret.matches(token));
    if !authorized {
        // Neither the expected nor the received value is logged.
        warn!(%peer, "heartbeat with a missing or wrong fleet secret");
        state.metrics.heartbeat(HeartbeatOutcome::Unauthorized);
        let mut reply = text(StatusCode::UNAUTHORIZED, "wrong or missing fleet secret\n");
        reply
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return reply;
    }

    let body = match read_body(request, state.max_body).await {
        Ok(body) => body,
        Err(reply) => {
            state.metrics.heartbeat(HeartbeatOutcome::BadRequest);
            return reply;
        }
    };
    let beat: Heartbeat = match serde_json::from_slice(&body) {
        Ok(beat) => beat,
        Err(err) => {
            state.metrics.heartbeat(HeartbeatOutcome::BadRequest);
            return text(
                StatusCode::BAD_REQUEST,
                &format!("invalid heartbeat: {err}\n"),
            );
        }
    };
    let mut fleet = lock(&state.fleet);
    if beat.leaving {
        if fleet.leave(&beat.name, beat.port) {
            info!(name = %beat.name, port = beat.port, "proxy left");
        }
        state.metrics.heartbeat(HeartbeatOutcome::Left);
        return no_content();
    }
    let now = Instant::now();
    match fleet.heartbeat(beat.entry(), beat.reach(), now) {
        Ok(joined) => {
            if joined {
                info!(name = %beat.name, port = beat.port, region = %beat.region, "proxy joined");
            }
            state.metrics.heartbeat(if joined {
                HeartbeatOutcome::Joined
            } else {
                HeartbeatOutcome::Refreshed
            });
            if beat.peer.is_none() {
                return no_content();
            }
            let peers = fleet.peer_links((&beat.name, beat.port), MAX_PEERS_IN_REPLY, now);
            drop(fleet);
            json(&HeartbeatReply { peers })
        }
        Err(err @ HeartbeatError::Entry(_)) => {
            state.metrics.heartbeat(HeartbeatOutcome::BadRequest);
            text(
                StatusCode::BAD_REQUEST,
                &format!("invalid heartbeat: {err}\n"),
            )
        }
        Err(err @ HeartbeatError::Full(_)) => {
            state.metrics.heartbeat(HeartbeatOutcome::Full);
            warn!(%err, name = %beat.name, "heartbeat refused");
            text(StatusCode::SERVICE_UNAVAILABLE, &format!("{err}\n"))
        }
    }
}

/// `TOKEN` from `Bearer TOKEN`, the scheme matched without regard to case.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(token)
}

/// Reads the body, at most `max` bytes; the error is the reply to send.
async fn read_body(request: Request<Incoming>, max: usize) -> Result<Bytes, Reply> {
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("the request body is limited to {max} bytes\n"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(too_large());
    }
    match Limited::new(request.into_body(), max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(err) => {
            debug!(%err, "reading the request body failed");
            Err(text(StatusCode::BAD_REQUEST, "could not read the body\n"))
        }
    }
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

fn json<T: serde::Serialize>(value: &T) -> Reply {
    let Ok(body) = serde_json::to_vec(value) else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode the answer\n",
        );
    };
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    reply
}

fn no_content() -> Reply {
    let mut reply = Response::new(Full::new(Bytes::new()));
    *reply.status_mut() = StatusCode::NO_CONTENT;
    reply
}

fn not_allowed(allow: &'static str) -> Reply {
    let mut reply = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    reply
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_parameter_must_appear_once() {
        assert_eq!(host_param(Some("host=a.test")).as_deref(), Some("a.test"));
        assert_eq!(
            host_param(Some("x=1&host=a.test")).as_deref(),
            Some("a.test")
        );
        assert_eq!(host_param(Some("host=a.test&host=b.test")), None);
        assert_eq!(
            host_param(Some("host=a.test&onion=1")).as_deref(),
            Some("a.test")
        );
        assert!(wants_onion(Some("host=a.test&onion=1")));
        assert!(!wants_onion(Some("host=a.test&onion=0")));
        assert!(!wants_onion(Some("host=a.test")));
        assert!(!wants_onion(None));
        assert_eq!(host_param(Some("hostx=a.test")), None);
        assert_eq!(host_param(None), None);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bear"), None);
    }
}
