//! What the proxy counts, for Prometheus on `--metrics-listen` (see `docs/METRICS.md`).
//!
//! Everything here is kept whether or not the endpoint is on: a count is one relaxed atomic
//! add on a handle made at start, so the paths that count never hash a label set or take a
//! lock per byte. Every series of a fixed label set exists from the start (at 0), so rates
//! work from the first scrape. Bytes are counted by [`shroud_mux::splice::splice_reporting`]
//! once per burst, not per read.
//!
//! Labels never hold a visitor's address, a key or an origin's address. The one label with
//! an open set of values, `hostname`, is kept to names bound on this proxy, at most
//! [`HOSTNAME_SERIES`] of them ([`Hostnames`]); visitors of any other bound name count under
//! [`OTHER_HOSTNAMES`]. A name's series go when its last tunnel does.
//!
//! What is cheaper to read than to count (limit refusals, bound names, live peers) is read
//! from the proxy's state at each scrape ([`Collected`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use shroud_mux::control::BindStatus;
use shroud_process::metrics::{Lifecycle, Readiness, ReadinessFn};

use crate::admission::Limit;
use crate::shared::Shared;

/// Most hostnames with series of their own; visitors of other names bound here count under
/// [`OTHER_HOSTNAMES`].
pub const HOSTNAME_SERIES: usize = 256;
/// The `hostname` label of the bucket for bound names beyond [`HOSTNAME_SERIES`]; no hostname
/// can be spelt so.
pub const OTHER_HOSTNAMES: &str = "(other)";

/// The listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `--listen-https`.
    Https,
    /// `--listen-http`.
    Http,
    /// `--listen-tunnel`.
    Tunnel,
}

impl Listener {
    const ALL: [Listener; 3] = [Listener::Https, Listener::Http, Listener::Tunnel];

    /// Its `listener` label.
    pub fn label(self) -> &'static str {
        match self {
            Listener::Https => "https",
            Listener::Http => "http",
            Listener::Tunnel => "tunnel",
        }
    }
}

/// What became of a connection on a public listener. Every connection accepted counts under
/// exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A shroud client's tunnel, not a visitor.
    Tunnel,
    /// Spliced onto a tunnel here.
    Routed,
    /// Handed to a peer of the fleet that holds its name.
    Forwarded,
    /// Plain HTTP for a name served over HTTPS only: answered `308`.
    Redirected,
    /// No tunnel for its name, here or at a peer: `unrecognized_name`, or `404`.
    UnknownName,
    /// Closed at once: `--max-connections`.
    RefusedConnections,
    /// Closed, or `429`: `--max-connections-per-address`.
    RefusedPerAddress,
    /// `503` or an alert: `--max-connections-per-hostname`.
    RefusedPerHostname,
    /// `503` or an alert: the tunnel had `--max-streams-per-tunnel` streams open.
    RefusedStreamsPerTunnel,
    /// No complete ClientHello or request head in time.
    SniffTimeout,
    /// Gone before its ClientHello or request head was complete.
    ClosedEarly,
    /// An unreadable ClientHello or request head.
    Malformed,
    /// A ClientHello or request head over its size limit.
    TooLarge,
    /// A ClientHello without SNI that is no shroud client.
    NoSni,
    /// The tunnel did not accept the visitor's stream in time: `504` or an alert.
    TunnelTimeout,
    /// The tunnel failed while its stream was being opened: `502` or an alert.
    TunnelFailed,
    /// Peers held the name, but none took the visitor.
    ForwardFailed,
}

impl Outcome {
    const ALL: [Outcome; 17] = [
        Outcome::Tunnel,
        Outcome::Routed,
        Outcome::Forwarded,
        Outcome::Redirected,
        Outcome::UnknownName,
        Outcome::RefusedConnections,
        Outcome::RefusedPerAddress,
        Outcome::RefusedPerHostname,
        Outcome::RefusedStreamsPerTunnel,
        Outcome::SniffTimeout,
        Outcome::ClosedEarly,
        Outcome::Malformed,
        Outcome::TooLarge,
        Outcome::NoSni,
        Outcome::TunnelTimeout,
        Outcome::TunnelFailed,
        Outcome::ForwardFailed,
    ];

    /// Its `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Tunnel => "tunnel",
            Outcome::Routed => "routed",
            Outcome::Forwarded => "forwarded",
            Outcome::Redirected => "redirected",
            Outcome::UnknownName => "unknown_name",
            Outcome::RefusedConnections => "refused_max_connections",
            Outcome::RefusedPerAddress => "refused_per_address",
            Outcome::RefusedPerHostname => "refused_per_hostname",
            Outcome::RefusedStreamsPerTunnel => "refused_streams_per_tunnel",
            Outcome::SniffTimeout => "sniff_timeout",
            Outcome::ClosedEarly => "closed_early",
            Outcome::Malformed => "malformed",
            Outcome::TooLarge => "too_large",
            Outcome::NoSni => "no_sni",
            Outcome::TunnelTimeout => "tunnel_timeout",
            Outcome::TunnelFailed => "tunnel_failed",
            Outcome::ForwardFailed => "forward_failed",
        }
    }

    /// Whether a connection on `listener` can end so: the series that exist.
    fn possible_on(self, listener: Listener) -> bool {
        match (listener, self) {
            (_, Outcome::RefusedConnections | Outcome::RefusedPerAddress) => true,
            (Listener::Tunnel, outcome) => outcome == Outcome::Tunnel,
            (Listener::Https, Outcome::Redirected) => false,
            (Listener::Http, Outcome::Tunnel | Outcome::NoSni) => false,
            _ => true,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a tunnel's handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// At least one name was bound.
    Bound,
    /// The bind was answered, and no name was bound.
    Refused,
    /// TLS, the protocol or a deadline failed before a bind was answered.
    Failed,
}

impl Handshake {
    const ALL: [Handshake; 3] = [Handshake::Bound, Handshake::Refused, Handshake::Failed];

    fn label(self) -> &'static str {
        match self {
            Handshake::Bound => "bound",
            Handshake::Refused => "refused",
            Handshake::Failed => "failed",
        }
    }
}

/// Which way a visitor's bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A visitor here, onto a tunnel here.
    Local,
    /// A visitor here, forwarded to the peer holding its name.
    ForwardedOut,
    /// A visitor a peer forwarded here, onto a tunnel here.
    ForwardedIn,
}

impl Path {
    const ALL: [Path; 3] = [Path::Local, Path::ForwardedOut, Path::ForwardedIn];

    fn label(self) -> &'static str {
        match self {
            Path::Local => "local",
            Path::ForwardedOut => "forwarded_out",
            Path::ForwardedIn => "forwarded_in",
        }
    }
}

/// The bounds of the stream-open histogram, in seconds: from a tunnel on the same host to a
/// tunnel over Tor on a bad day, up to the 20 s open deadline.
const STREAM_OPEN_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
];

type Labels2 = [(&'static str, &'static str); 2];
type Labels1 = [(&'static str, &'static str); 1];

/// The proxy's counters, gauges and histogram, with a handle per series of a fixed label set.
pub struct ProxyMetrics {
    connections: Family<Labels2, Counter>,
    /// By listener, then outcome; a handle outside `connections` for impossible pairs.
    connection_handles: Vec<Vec<Counter>>,
    open_connections: Gauge,
    tunnels: Gauge,
    handshakes: Family<Labels1, Counter>,
    handshake_handles: Vec<Counter>,
    binds: Family<Labels1, Counter>,
    bind_handles: Vec<Counter>,
    bind_other: Counter,
    bytes: Family<Labels2, Counter>,
    /// By path, then direction: to the origin, to the visitor.
    byte_handles: Vec<[Counter; 2]>,
    stream_open: Histogram,
    forwarded: Family<Labels2, Counter>,
    /// By direction (out, in), then result (accepted, refused).
    forwarded_handles: [[Counter; 2]; 2],
    lifecycle: Lifecycle,
    draining: Gauge,
    hostnames: Hostnames,
    /// The onion service's self-checks (`--onion-tunnel`), served once it is set.
    pub onion: shroud_tor::onion_service::OnionMetrics,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    /// Every metric at zero.
    pub fn new() -> Self {
        let connections = Family::<Labels2, Counter>::default();
        let connection_handles = Listener::ALL
            .iter()
            .map(|&listener| {
                Outcome::ALL
                    .iter()
                    .map(|&outcome| {
                        if outcome.possible_on(listener) {
                            connections.get_or_create_owned(&[
                                ("listener", listener.label()),
                                ("outcome", outcome.label()),
                            ])
                        } else {
                            Counter::default()
                        }
                    })
                    .collect()
            })
            .collect();
        let handshakes = Family::<Labels1, Counter>::default();
        let handshake_handles = Handshake::ALL
            .iter()
            .map(|h| handshakes.get_or_create_owned(&[("result", h.label())]))
            .collect();
        let binds = Family::<Labels1, Counter>::default();
        let bind_handles = BindStatus::KNOWN
            .iter()
            .map(|status| binds.get_or_create_owned(&[("status", status.label())]))
            .collect();
        let bind_other = binds.get_or_create_owned(&[("status", "other")]);
        let bytes = Family::<Labels2, Counter>::default();
        let byte_handles = Path::ALL
            .iter()
            .map(|path| {
                ["to_origin", "to_visitor"].map(|direction| {
                    bytes.get_or_create_owned(&[("path", path.label()), ("direction", direction)])
                })
            })
            .collect();
        let forwarded = Family::<Labels2, Counter>::default();
        let forwarded_handles = ["out", "in"].map(|direction| {
            ["accepted", "refused"].map(|result| {
                forwarded.get_or_create_owned(&[("direction", direction), ("result", result)])
            })
        });
        Self {
            connections,
            connection_handles,
            open_connections: Gauge::default(),
            tunnels: Gauge::default(),
            handshakes,
            handshake_handles,
            binds,
            bind_handles,
            bind_other,
            bytes,
            byte_handles,
            stream_open: Histogram::new(STREAM_OPEN_BUCKETS),
            forwarded,
            forwarded_handles,
            lifecycle: Lifecycle::new("draining"),
            draining: Gauge::default(),
            hostnames: Hostnames::new(HOSTNAME_SERIES),
            onion: shroud_tor::onion_service::OnionMetrics::default(),
        }
    }

    /// Counts a connection on `listener` that ended as `outcome`.
    pub fn connection(&self, listener: Listener, outcome: Outcome) {
        let by_listener = &self.connection_handles[Listener::ALL
            .iter()
            .position(|l| *l == listener)
            .unwrap_or(0)];
        by_listener[outcome.index()].inc();
    }

    /// Counts a connection as open until the guard is dropped.
    pub(crate) fn open_connection(&self) -> GaugeGuard {
        GaugeGuard::new(&self.open_connections)
    }

    /// Counts a tunnel as bound until the guard is dropped.
    pub(crate) fn tunnel_bound(&self) -> GaugeGuard {
        GaugeGuard::new(&self.tunnels)
    }

    /// Counts a tunnel handshake that ended as `result`.
    pub(crate) fn handshake(&self, result: Handshake) {
        let at = Handshake::ALL
            .iter()
            .position(|h| *h == result)
            .unwrap_or(0);
        self.handshake_handles[at].inc();
    }

    /// Counts one name's verdict in a bind result.
    pub(crate) fn bind_result(&self, status: BindStatus) {
        let counter = match BindStatus::KNOWN.iter().position(|s| *s == status) {
            Some(at) => &self.bind_handles[at],
            None => &self.bind_other,
        };
        counter.inc();
    }

    /// The byte counters of `path`: to the origin, to the visitor.
    pub(crate) fn bytes(&self, path: Path) -> &[Counter; 2] {
        let at = Path::ALL.iter().position(|p| *p == path).unwrap_or(0);
        &self.byte_handles[at]
    }

    /// Records how long a tunnel stream took to open and be accepted.
    pub(crate) fn stream_opened(&self, took: Duration) {
        self.stream_open.observe(took.as_secs_f64());
    }

    /// Counts a forwarded visitor: `outgoing` (handed to a peer) or incoming, and whether it
    /// was taken.
    pub(crate) fn forwarded(&self, outgoing: bool, accepted: bool) {
        self.forwarded_handles[usize::from(!outgoing)][usize::from(!accepted)].inc();
    }

    /// The per-hostname series.
    pub(crate) fn hostnames(&self) -> &Hostnames {
        &self.hostnames
    }

    /// The listeners are up: `/readyz` says ready.
    pub(crate) fn serving(&self) {
        self.lifecycle.serving();
    }

    /// The proxy is draining: `/readyz` says so, and the `draining` gauge is 1.
    pub(crate) fn draining(&self) {
        self.lifecycle.stopping();
        self.draining.set(1);
    }

    /// What `/readyz` reports now.
    pub fn readiness(&self) -> Readiness {
        self.lifecycle.readiness()
    }
}

/// Registers every metric of the proxy that `shared` serves in `registry` (made with the
/// prefix `shroud_proxy`), and returns what `/readyz` asks.
pub fn register(shared: &Arc<Shared>, registry: &mut Registry) -> ReadinessFn {
    let m = &shared.metrics;
    registry.register(
        "connections",
        "Connections accepted on the public listeners, by listener and by what became of each",
        m.connections.clone(),
    );
    registry.register(
        "open_connections",
        "Connections (visitors and tunnels) being served now",
        m.open_connections.clone(),
    );
    registry.register("tunnels", "Tunnels bound now", m.tunnels.clone());
    registry.register(
        "tunnel_handshakes",
        "Tunnel handshakes, by result: bound (a name at least), refused (no name), failed",
        m.handshakes.clone(),
    );
    registry.register(
        "bind_results",
        "Hostnames asked for in binds, by the proxy's answer",
        m.binds.clone(),
    );
    registry.register_with_unit(
        "visitor",
        "Bytes copied for visitors, by path (local, forwarded_out, forwarded_in) and direction",
        Unit::Bytes,
        m.bytes.clone(),
    );
    registry.register_with_unit(
        "stream_open",
        "Time to open a tunnel stream for a visitor and have the client accept it",
        Unit::Seconds,
        m.stream_open.clone(),
    );
    registry.register(
        "forwarded_visitors",
        "Visitors forwarded between the proxies of the fleet, by direction and result",
        m.forwarded.clone(),
    );
    registry.register(
        "draining",
        "1 while the proxy drains on its way out, else 0",
        m.draining.clone(),
    );
    registry.register(
        "hostname_visitors",
        "Visitors put on a tunnel here, by hostname (names bound here only, capped)",
        m.hostnames.visitors.clone(),
    );
    registry.register_with_unit(
        "hostname",
        "Bytes copied for visitors onto tunnels here, by hostname and direction (names bound \
         here only, capped)",
        Unit::Bytes,
        m.hostnames.bytes.clone(),
    );
    shared.reloads.register(registry);
    registry.register_collector(Box::new(m.onion.clone()));
    registry.register_collector(Box::new(Collected {
        shared: shared.clone(),
    }));
    let shared = shared.clone();
    Arc::new(move || shared.metrics.readiness())
}

/// Metrics read from the proxy's state at each scrape.
struct Collected {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Collected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collected").finish_non_exhaustive()
    }
}

impl Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let refusals = self.shared.admission.refusals();
        let mut family = encoder.encode_descriptor(
            "limit_refusals",
            "Work refused by each limit since start, by the flag that sets it.",
            None,
            MetricType::Counter,
        )?;
        for limit in Limit::ALL {
            let labels = [("limit", limit.flag().trim_start_matches('-'))];
            ConstCounter::new(refusals.get(limit)).encode(family.encode_family(&labels)?)?;
        }
        let bound = i64::try_from(self.shared.registry.hostname_count()).unwrap_or(i64::MAX);
        ConstGauge::new(bound).encode(encoder.encode_descriptor(
            "bound_hostnames",
            "Hostnames with at least one tunnel bound here.",
            None,
            MetricType::Gauge,
        )?)?;
        if let Some(peers) = &self.shared.peers {
            let alive = i64::try_from(peers.alive()).unwrap_or(i64::MAX);
            ConstGauge::new(alive).encode(encoder.encode_descriptor(
                "peers_alive",
                "Other proxies of the fleet this one knows to be alive.",
                None,
                MetricType::Gauge,
            )?)?;
            let held = i64::try_from(peers.held_names()).unwrap_or(i64::MAX);
            ConstGauge::new(held).encode(encoder.encode_descriptor(
                "peer_hostnames",
                "Hostnames that alive peers hold: those this proxy can forward visitors of.",
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

/// A gauge raised while this lives.
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

type HostnameLabel = [(&'static str, String); 1];
type HostnameBytesLabel = [(&'static str, String); 2];

/// The series of hostnames bound here: one set per name, for at most `cap` names at once,
/// and one shared by the rest. The registry says when a name is bound ([`Hostnames::bound`])
/// and when its last tunnel goes ([`Hostnames::unbound`]), under its own lock, so the two
/// never cross; visitors take their name's set once ([`Hostnames::series`]).
#[derive(Clone)]
pub struct Hostnames {
    cap: usize,
    named: Arc<Mutex<HashMap<String, Arc<HostSeries>>>>,
    other: Arc<Mutex<Option<Arc<HostSeries>>>>,
    visitors: Family<HostnameLabel, Counter>,
    bytes: Family<HostnameBytesLabel, Counter>,
}

/// One hostname's counters (or the shared bucket's).
#[derive(Debug)]
pub struct HostSeries {
    /// Visitors put on a tunnel.
    pub visitors: Counter,
    /// Bytes to the origin, and to the visitor.
    pub bytes: [Counter; 2],
}

impl Hostnames {
    /// Series for at most `cap` names at once.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            named: Arc::default(),
            other: Arc::default(),
            visitors: Family::default(),
            bytes: Family::default(),
        }
    }

    fn make(&self, label: &str) -> HostSeries {
        let bytes = |direction: &'static str| {
            self.bytes.get_or_create_owned(&[
                ("hostname", label.to_owned()),
                ("direction", direction.to_owned()),
            ])
        };
        HostSeries {
            visitors: self
                .visitors
                .get_or_create_owned(&[("hostname", label.to_owned())]),
            bytes: [bytes("to_origin"), bytes("to_visitor")],
        }
    }

    /// `hostname` has its first tunnel here: it gets series of its own if there is room.
    pub fn bound(&self, hostname: &str) {
        let mut named = lock(&self.named);
        if named.len() < self.cap && !named.contains_key(hostname) {
            let series = Arc::new(self.make(hostname));
            named.insert(hostname.to_owned(), series);
        }
    }

    /// `hostname`'s last tunnel here is gone: its series go too.
    pub fn unbound(&self, hostname: &str) {
        if lock(&self.named).remove(hostname).is_none() {
            return;
        }
        let label = hostname.to_owned();
        self.visitors.remove(&[("hostname", label.clone())]);
        for direction in ["to_origin", "to_visitor"] {
            self.bytes.remove(&[
                ("hostname", label.clone()),
                ("direction", direction.to_owned()),
            ]);
        }
    }

    /// The series a visitor of `hostname` counts in: its own, or the shared bucket's.
    pub fn series(&self, hostname: &str) -> Arc<HostSeries> {
        if let Some(series) = lock(&self.named).get(hostname) {
            return series.clone();
        }
        lock(&self.other)
            .get_or_insert_with(|| Arc::new(self.make(OTHER_HOSTNAMES)))
            .clone()
    }

    /// How many names have series of their own.
    pub fn named(&self) -> usize {
        lock(&self.named).len()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is one insert or removal: a panic elsewhere cannot leave it half-done.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn scrape(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::with_prefix("shroud_proxy");
        register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn hostname_series_are_capped_and_leave_with_their_name() {
        let hostnames = Hostnames::new(2);
        hostnames.bound("a.test");
        hostnames.bound("b.test");
        hostnames.bound("c.test");
        hostnames.bound("a.test");
        assert_eq!(hostnames.named(), 2);
        hostnames.series("a.test").visitors.inc();
        hostnames.series("c.test").visitors.inc_by(2);
        hostnames.series("d.test").visitors.inc_by(3);
        hostnames.series("b.test").bytes[0].inc_by(10);
        let text = scrape(|r| {
            r.register("hostname_visitors", "v", hostnames.visitors.clone());
            r.register_with_unit("hostname", "b", Unit::Bytes, hostnames.bytes.clone());
        });
        assert!(text.contains("shroud_proxy_hostname_visitors_total{hostname=\"a.test\"} 1\n"));
        // Names beyond the cap share one bucket.
        assert!(text.contains("shroud_proxy_hostname_visitors_total{hostname=\"(other)\"} 5\n"));
        assert!(!text.contains("c.test"), "{text}");
        assert!(text.contains(
            "shroud_proxy_hostname_bytes_total{hostname=\"b.test\",direction=\"to_origin\"} 10\n"
        ));

        // An unbound name's series go, and its place is free for the next name.
        hostnames.unbound("a.test");
        hostnames.unbound("never.test");
        assert_eq!(hostnames.named(), 1);
        hostnames.bound("c.test");
        hostnames.series("c.test").visitors.inc();
        let text = scrape(|r| {
            r.register("hostname_visitors", "v", hostnames.visitors.clone());
            r.register_with_unit("hostname", "b", Unit::Bytes, hostnames.bytes.clone());
        });
        assert!(!text.contains("a.test"), "{text}");
        assert!(text.contains("shroud_proxy_hostname_visitors_total{hostname=\"c.test\"} 1\n"));
        assert!(text.contains("{hostname=\"b.test\",direction=\"to_visitor\"} 0\n"));
    }

    #[test]
    fn only_possible_connection_series_exist() {
        let metrics = ProxyMetrics::new();
        metrics.connection(Listener::Https, Outcome::Routed);
        metrics.connection(Listener::Http, Outcome::Routed);
        metrics.connection(Listener::Http, Outcome::Routed);
        // Impossible pairs count nowhere visible.
        metrics.connection(Listener::Tunnel, Outcome::Routed);
        let text = scrape(|r| r.register("connections", "c", metrics.connections.clone()));
        assert!(text
            .contains("shroud_proxy_connections_total{listener=\"https\",outcome=\"routed\"} 1\n"));
        assert!(text
            .contains("shroud_proxy_connections_total{listener=\"http\",outcome=\"routed\"} 2\n"));
        assert!(text.contains(
            "shroud_proxy_connections_total{listener=\"tunnel\",outcome=\"tunnel\"} 0\n"
        ));
        assert!(!text.contains("listener=\"tunnel\",outcome=\"routed\""));
        assert!(!text.contains("listener=\"https\",outcome=\"redirected\""));
        assert!(!text.contains("listener=\"http\",outcome=\"no_sni\""));
    }

    #[test]
    fn readiness_follows_the_phase() {
        let metrics = ProxyMetrics::new();
        assert!(matches!(metrics.readiness(), Readiness::NotReady(_)));
        metrics.serving();
        assert_eq!(metrics.readiness(), Readiness::Ready);
        metrics.draining();
        assert_eq!(metrics.readiness(), Readiness::not_ready("draining"));
        // Draining is for good.
        metrics.serving();
        assert_eq!(metrics.readiness(), Readiness::not_ready("draining"));
        assert_eq!(metrics.draining.get(), 1);
    }

    #[test]
    fn bind_statuses_each_have_a_series() {
        let metrics = ProxyMetrics::new();
        metrics.bind_result(BindStatus::Bound);
        metrics.bind_result(BindStatus::NotListed);
        metrics.bind_result(BindStatus::Other(42));
        let text = scrape(|r| r.register("bind_results", "b", metrics.binds.clone()));
        assert!(text.contains("shroud_proxy_bind_results_total{status=\"bound\"} 1\n"));
        assert!(text.contains("shroud_proxy_bind_results_total{status=\"not_listed\"} 1\n"));
        assert!(text.contains("shroud_proxy_bind_results_total{status=\"other\"} 1\n"));
        assert!(text.contains("shroud_proxy_bind_results_total{status=\"bad_proof\"} 0\n"));
    }
}
