//! What the client counts, for Prometheus on `--metrics-listen` (see `docs/METRICS.md`).
//!
//! Counters and gauges live in [`ClientMetrics`], which every task reaches through
//! [`crate::shared::ClientConfig::metrics`]; a count is one atomic add on a handle made at
//! start. What is cheaper to read than to count (each tunnel's state, the certificate's
//! expiry) is read at each scrape. The `proxy` label holds a proxy's name and port as the
//! client was told them (the list is bounded: `--proxy` flags, or `--max-proxies`), and its
//! series leave with the proxy; no label holds the target, a key or a visitor's address.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use shroud_mux::control::BindStatus;
use shroud_process::metrics::{Readiness, ReadinessFn};
use tokio::sync::watch;

use crate::acme::Acme;
use crate::shared::{States, TunnelState};
use crate::tunnel::AttemptError;

type Labels1 = [(&'static str, &'static str); 1];

/// The states a tunnel's `state` label takes, one series each per proxy.
const STATES: [&str; 5] = ["connecting", "bound", "waiting", "failed", "stopped"];

/// The results an attempt's `result` label takes.
const ATTEMPT_RESULTS: [&str; 8] = [
    "bound",
    "connect_failed",
    "tls_failed",
    "certificate_refused",
    "not_shroud",
    "timeout",
    "protocol_error",
    "refused",
];

/// The client's counters and gauges.
pub struct ClientMetrics {
    /// Reloads made, and failed; the reloader counts into it.
    pub reloads: shroud_process::reload::ReloadCounts,
    streams: Counter,
    streams_active: Gauge,
    origin_failures: Family<Labels1, Counter>,
    origin_failure_handles: [Counter; 2],
    bind_refusals: Family<Labels1, Counter>,
    bind_refusal_handles: Vec<Counter>,
    bind_refusal_other: Counter,
    attempts: Family<Labels1, Counter>,
    attempt_handles: Vec<Counter>,
    ends: Family<Labels1, Counter>,
    end_handles: [Counter; 2],
    tor_percent: Gauge,
    tor_ready: Gauge,
    tor: OnceLock<()>,
    certificate_expiry: AtomicI64,
    circuits: OnceLock<Arc<crate::circuits::CircuitBudget>>,
    /// The onion service's self-checks (`--onion`), served once it is set.
    pub onion: shroud_tor::onion_service::OnionMetrics,
}

impl Default for ClientMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ClientMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientMetrics").finish_non_exhaustive()
    }
}

impl ClientMetrics {
    /// Every metric at zero.
    pub fn new() -> Self {
        let origin_failures = Family::<Labels1, Counter>::default();
        let origin_failure_handles =
            ["tls", "http"].map(|kind| origin_failures.get_or_create_owned(&[("kind", kind)]));
        let bind_refusals = Family::<Labels1, Counter>::default();
        let bind_refusal_handles = BindStatus::KNOWN
            .iter()
            .filter(|status| **status != BindStatus::Bound)
            .map(|status| bind_refusals.get_or_create_owned(&[("status", status.label())]))
            .collect();
        let bind_refusal_other = bind_refusals.get_or_create_owned(&[("status", "other")]);
        let attempts = Family::<Labels1, Counter>::default();
        let attempt_handles = ATTEMPT_RESULTS
            .iter()
            .map(|result| attempts.get_or_create_owned(&[("result", *result)]))
            .collect();
        let ends = Family::<Labels1, Counter>::default();
        let end_handles =
            ["lost", "go_away"].map(|why| ends.get_or_create_owned(&[("reason", why)]));
        Self {
            reloads: shroud_process::reload::ReloadCounts::default(),
            streams: Counter::default(),
            streams_active: Gauge::default(),
            origin_failures,
            origin_failure_handles,
            bind_refusals,
            bind_refusal_handles,
            bind_refusal_other,
            attempts,
            attempt_handles,
            ends,
            end_handles,
            tor_percent: Gauge::default(),
            tor_ready: Gauge::default(),
            tor: OnceLock::new(),
            certificate_expiry: AtomicI64::new(0),
            circuits: OnceLock::new(),
            onion: shroud_tor::onion_service::OnionMetrics::default(),
        }
    }

    /// Counts a stream the proxy opened (a visitor) as open until the guard is dropped.
    pub(crate) fn stream(&self) -> StreamGuard {
        self.streams.inc();
        self.streams_active.inc();
        StreamGuard(self.streams_active.clone())
    }

    /// Counts a connection to the origin that failed, for a TLS (`tls`) or plain-HTTP visitor.
    pub(crate) fn origin_failed(&self, http: bool) {
        self.origin_failure_handles[usize::from(http)].inc();
    }

    /// Counts a name the proxy refused to bind, by its status.
    pub(crate) fn bind_refused(&self, status: BindStatus) {
        let at = BindStatus::KNOWN
            .iter()
            .filter(|s| **s != BindStatus::Bound)
            .position(|s| *s == status);
        match at {
            Some(at) => self.bind_refusal_handles[at].inc(),
            None => self.bind_refusal_other.inc(),
        };
    }

    /// Counts an attempt to bring a tunnel up: bound, or how it failed.
    pub(crate) fn attempt(&self, result: Result<(), &AttemptError>) {
        let label = match result {
            Ok(()) => "bound",
            Err(AttemptError::Connect(_)) => "connect_failed",
            Err(AttemptError::Tls(_)) => "tls_failed",
            Err(AttemptError::Certificate(_)) => "certificate_refused",
            Err(AttemptError::NotShroud) => "not_shroud",
            Err(AttemptError::Timeout(_)) => "timeout",
            Err(AttemptError::Protocol(_)) => "protocol_error",
            Err(
                AttemptError::Refused(_)
                | AttemptError::RefusedForGood(_)
                | AttemptError::NotAuthorized(_),
            ) => "refused",
        };
        if let Some(at) = ATTEMPT_RESULTS.iter().position(|r| *r == label) {
            self.attempt_handles[at].inc();
        }
    }

    /// Counts a bound tunnel that ended: lost, or drained by its proxy (`go_away`).
    pub(crate) fn tunnel_ended(&self, go_away: bool) {
        self.end_handles[usize::from(go_away)].inc();
    }

    /// Serves what `budget` counts of each proxy's Tor circuits from now on.
    pub fn count_circuits(&self, budget: Arc<crate::circuits::CircuitBudget>) {
        let _ = self.circuits.set(budget);
    }

    /// Marks the transport as Tor: its bootstrap gauges are served from now on.
    pub fn tor_enabled(&self) {
        let _ = self.tor.set(());
    }

    /// Records Tor's bootstrap progress (0 to 100) and whether it is ready for traffic.
    pub fn tor_status(&self, percent: i64, ready: bool) {
        self.tor_percent.set(percent.clamp(0, 100));
        self.tor_ready.set(i64::from(ready));
    }

    /// Tor's bootstrap progress, if the transport is Tor.
    fn tor_progress(&self) -> Option<(i64, bool)> {
        self.tor
            .get()
            .map(|()| (self.tor_percent.get(), self.tor_ready.get() == 1))
    }

    /// Records when the certificate the client terminates visitors' TLS with (`--tls-cert`)
    /// expires. A reload of the certificate calls this again.
    pub fn set_certificate_expiry(&self, not_after: SystemTime) {
        let secs = not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.certificate_expiry.store(secs, Ordering::Relaxed);
    }
}

/// A stream counted as active while this lives.
pub(crate) struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the client's metrics and readiness read, besides [`ClientMetrics`]: the tunnels'
/// states once the client runs, and the ACME certificate if there is one.
#[derive(Clone, Default)]
pub struct Sources {
    /// The tunnels' states, set when the client starts.
    pub states: Arc<OnceLock<watch::Receiver<States>>>,
    /// The ACME certificate's keeper, set once ACME has started.
    pub acme: Arc<OnceLock<Arc<Acme>>>,
}

/// Registers every metric of the client in `registry` (made with the prefix `shroud_client`),
/// and returns what `/readyz` asks: at least one tunnel bound.
pub fn register(
    metrics: &Arc<ClientMetrics>,
    sources: &Sources,
    registry: &mut Registry,
) -> ReadinessFn {
    let m = metrics;
    m.reloads.register(registry);
    registry.register(
        "streams",
        "Streams the proxies opened, one per visitor",
        m.streams.clone(),
    );
    registry.register(
        "streams_active",
        "Visitor streams open now",
        m.streams_active.clone(),
    );
    registry.register(
        "origin_connect_failures",
        "Connections to the origin that failed, by the kind of visitor (tls, http)",
        m.origin_failures.clone(),
    );
    registry.register(
        "bind_refusals",
        "Hostnames a proxy refused to bind, by its status",
        m.bind_refusals.clone(),
    );
    registry.register(
        "tunnel_attempts",
        "Attempts to bring a tunnel up, by result",
        m.attempts.clone(),
    );
    registry.register(
        "tunnel_ends",
        "Bound tunnels that ended, by reason: lost, or go_away (the proxy drained)",
        m.ends.clone(),
    );
    registry.register_collector(Box::new(m.onion.clone()));
    registry.register_collector(Box::new(Collected {
        metrics: metrics.clone(),
        sources: sources.clone(),
    }));
    let (metrics, states) = (metrics.clone(), sources.states.clone());
    Arc::new(move || readiness(&metrics, &states))
}

/// `/readyz`: ready once a tunnel is bound.
fn readiness(metrics: &ClientMetrics, states: &OnceLock<watch::Receiver<States>>) -> Readiness {
    if let Some((percent, false)) = metrics.tor_progress() {
        if states.get().is_none() {
            return Readiness::not_ready(format!("Tor bootstrapping ({percent}%)"));
        }
    }
    let Some(states) = states.get() else {
        return Readiness::not_ready("starting");
    };
    let states = states.borrow();
    let bound = states
        .values()
        .filter(|s| **s == TunnelState::Bound)
        .count();
    if bound > 0 {
        return Readiness::Ready;
    }
    Readiness::not_ready(format!("no tunnel bound (0 of {} proxies)", states.len()))
}

/// Metrics read at each scrape.
struct Collected {
    metrics: Arc<ClientMetrics>,
    sources: Sources,
}

impl std::fmt::Debug for Collected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collected").finish_non_exhaustive()
    }
}

impl Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(states) = self.sources.states.get() {
            let states: Vec<(String, &'static str)> = states
                .borrow()
                .iter()
                .map(|(proxy, state)| (proxy.to_string(), state_label(state)))
                .collect();
            let mut family = encoder.encode_descriptor(
                "tunnels",
                "Each proxy's tunnel, 1 for the state it is in and 0 for the others.",
                None,
                MetricType::Gauge,
            )?;
            for (proxy, current) in &states {
                for state in STATES {
                    let labels = [("proxy", proxy.as_str()), ("state", state)];
                    let value = i64::from(state == *current);
                    ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        if let Some((percent, ready)) = self.metrics.tor_progress() {
            ConstGauge::new(percent).encode(encoder.encode_descriptor(
                "tor_bootstrap_percent",
                "How far Tor has bootstrapped, 0 to 100.",
                None,
                MetricType::Gauge,
            )?)?;
            ConstGauge::new(i64::from(ready)).encode(encoder.encode_descriptor(
                "tor_ready",
                "1 when Tor can build circuits for traffic, else 0.",
                None,
                MetricType::Gauge,
            )?)?;
        }
        if let Some(budget) = self.metrics.circuits.get() {
            let counts = budget.counts();
            let mut family = encoder.encode_descriptor(
                "tor_circuits",
                "New Tor circuits built for each proxy's tunnel (each charged to the circuit \
                 budget); a reconnect on the circuit held costs none.",
                None,
                MetricType::Counter,
            )?;
            for count in &counts {
                let labels = [("proxy", count.proxy.as_str())];
                ConstCounter::new(count.built).encode(family.encode_family(&labels)?)?;
            }
            let mut family = encoder.encode_descriptor(
                "circuit_budget_waits",
                "Times a proxy's tunnel had to wait because the circuit budget \
                 (--max-circuits-per-proxy-per-hour, --max-circuits-per-hour) was spent.",
                None,
                MetricType::Counter,
            )?;
            for count in &counts {
                let labels = [("proxy", count.proxy.as_str())];
                ConstCounter::new(count.waits).encode(family.encode_family(&labels)?)?;
            }
        }
        let expiry = match self.sources.acme.get() {
            Some(acme) => acme
                .certificate()
                .and_then(|certified| certified.cert.first().and_then(not_after))
                .map(|at| (at, "acme")),
            None => {
                let secs = self.metrics.certificate_expiry.load(Ordering::Relaxed);
                (secs > 0).then_some((secs, "file"))
            }
        };
        if let Some((secs, source)) = expiry {
            let mut family = encoder.encode_descriptor(
                "certificate_expiry_timestamp",
                "When the certificate visitors' TLS is terminated with expires, in seconds \
                 since the Unix epoch, by where it came from (acme, file).",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            ConstGauge::new(secs).encode(family.encode_family(&[("source", source)])?)?;
        }
        Ok(())
    }
}

fn state_label(state: &TunnelState) -> &'static str {
    match state {
        TunnelState::Connecting => "connecting",
        TunnelState::Bound => "bound",
        TunnelState::Waiting { .. } => "waiting",
        TunnelState::Failed { .. } => "failed",
        TunnelState::Stopped => "stopped",
    }
}

/// When a DER certificate stops being valid, in Unix seconds.
pub fn not_after(cert: &rustls_pki_types::CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use crate::shared::ProxyAddr;

    use super::*;

    fn scrape(metrics: &Arc<ClientMetrics>, sources: &Sources) -> (String, ReadinessFn) {
        let mut registry = Registry::with_prefix("shroud_client");
        let readiness = register(metrics, sources, &mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        (text, readiness)
    }

    #[test]
    fn tunnel_states_and_readiness_follow_the_client() {
        let metrics = Arc::new(ClientMetrics::new());
        let sources = Sources::default();
        metrics.tor_enabled();
        metrics.tor_status(40, false);
        let (text, readiness) = scrape(&metrics, &sources);
        assert_eq!(readiness(), Readiness::not_ready("Tor bootstrapping (40%)"));
        assert!(
            text.contains("shroud_client_tor_bootstrap_percent 40\n"),
            "{text}"
        );
        assert!(text.contains("shroud_client_tor_ready 0\n"), "{text}");
        assert!(!text.contains("shroud_client_tunnels{"), "{text}");

        metrics.tor_status(100, true);
        let mut states = States::new();
        let one = ProxyAddr::new("one.test".into(), 443);
        let two = ProxyAddr::new("two.test".into(), 8443);
        states.insert(one.clone(), TunnelState::Connecting);
        states.insert(two.clone(), TunnelState::Waiting { reason: "x".into() });
        let (tx, rx) = watch::channel(states);
        let _ = sources.states.set(rx);
        assert_eq!(
            readiness(),
            Readiness::not_ready("no tunnel bound (0 of 2 proxies)")
        );
        tx.send_modify(|states| {
            states.insert(one.clone(), TunnelState::Bound);
        });
        assert_eq!(readiness(), Readiness::Ready);
        let (text, _) = scrape(&metrics, &sources);
        assert!(text.contains("shroud_client_tunnels{proxy=\"one.test:443\",state=\"bound\"} 1\n"));
        assert!(
            text.contains("shroud_client_tunnels{proxy=\"one.test:443\",state=\"connecting\"} 0\n")
        );
        assert!(
            text.contains("shroud_client_tunnels{proxy=\"two.test:8443\",state=\"waiting\"} 1\n")
        );
        // A proxy that leaves the list leaves no series behind.
        tx.send_modify(|states| {
            states.remove(&two);
        });
        let (text, _) = scrape(&metrics, &sources);
        assert!(!text.contains("two.test"), "{text}");
    }

    #[test]
    fn counts_refusals_attempts_and_the_certificate() {
        let metrics = Arc::new(ClientMetrics::new());
        let sources = Sources::default();
        metrics.bind_refused(BindStatus::LimitReached);
        metrics.bind_refused(BindStatus::Other(99));
        metrics.attempt(Ok(()));
        metrics.attempt(Err(&AttemptError::Timeout("the bind")));
        metrics.origin_failed(true);
        let _active = metrics.stream();
        drop(metrics.stream());
        let (text, _) = scrape(&metrics, &sources);
        for line in [
            "shroud_client_bind_refusals_total{status=\"limit_reached\"} 1\n",
            "shroud_client_bind_refusals_total{status=\"other\"} 1\n",
            "shroud_client_bind_refusals_total{status=\"not_authorized\"} 0\n",
            "shroud_client_tunnel_attempts_total{result=\"bound\"} 1\n",
            "shroud_client_tunnel_attempts_total{result=\"timeout\"} 1\n",
            "shroud_client_origin_connect_failures_total{kind=\"http\"} 1\n",
            "shroud_client_origin_connect_failures_total{kind=\"tls\"} 0\n",
            "shroud_client_streams_total 2\n",
            "shroud_client_streams_active 1\n",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
        assert!(!text.contains("bind_refusals_total{status=\"bound\"}"));
        // No certificate, no expiry; one from a file, its date.
        assert!(!text.contains("certificate_expiry"), "{text}");
        metrics.set_certificate_expiry(UNIX_EPOCH + std::time::Duration::from_secs(2_000_000_000));
        let (text, _) = scrape(&metrics, &sources);
        assert!(
            text.contains(
                "shroud_client_certificate_expiry_timestamp_seconds{source=\"file\"} 2000000000\n"
            ),
            "{text}"
        );
        // Without Tor, no Tor gauges.
        assert!(!text.contains("tor_"), "{text}");
    }

    #[test]
    fn reads_a_certificates_expiry() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 4);
        let cert = params.self_signed(&key).unwrap();
        let secs = not_after(cert.der()).unwrap();
        assert_eq!(secs, 1_935_619_200);
    }
}
