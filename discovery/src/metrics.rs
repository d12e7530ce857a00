//! What the discovery service counts, for Prometheus on `--metrics-listen` (see
//! `docs/METRICS.md`).
//!
//! Lists and heartbeats are counted by how each request ended; DNS questions by the response
//! code they got. The proxies it knows are read from the fleet at each scrape. No label holds a
//! hostname asked about, a proxy's address or a client's address.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use hickory_proto::op::ResponseCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use shroud_process::metrics::{Lifecycle, Readiness, ReadinessFn};
use tokio::time::Instant;

use crate::fleet::Fleet;

type Labels1 = [(&'static str, &'static str); 1];

/// How a request for a list ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListOutcome {
    /// A signed list was sent.
    Served,
    /// No `host`, a repeated one, or one that is not a hostname: `400`.
    BadRequest,
    /// The host is not a CNAME into `--require-cname`'s domain: `403`.
    NotCname,
    /// DNS could not be asked for the CNAME check: `503`.
    CnameUnavailable,
    /// No healthy proxy to list: `404`.
    NoProxies,
    /// The list could not be dated or signed: `500`.
    Error,
}

impl ListOutcome {
    const ALL: [ListOutcome; 6] = [
        ListOutcome::Served,
        ListOutcome::BadRequest,
        ListOutcome::NotCname,
        ListOutcome::CnameUnavailable,
        ListOutcome::NoProxies,
        ListOutcome::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            ListOutcome::Served => "served",
            ListOutcome::BadRequest => "bad_request",
            ListOutcome::NotCname => "not_cname",
            ListOutcome::CnameUnavailable => "cname_unavailable",
            ListOutcome::NoProxies => "no_proxies",
            ListOutcome::Error => "error",
        }
    }
}

/// How a heartbeat ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// A proxy new to the fleet (or back after its timeout) joined.
    Joined,
    /// A proxy already listed was refreshed.
    Refreshed,
    /// A proxy said it is leaving, and was delisted.
    Left,
    /// No or the wrong fleet secret: `401`.
    Unauthorized,
    /// This service takes no heartbeats (no `--fleet-secret-file`): `403`.
    Disabled,
    /// A body too large or not a valid heartbeat: `400`, `413`.
    BadRequest,
    /// The fleet is as large as it may be: `503`.
    Full,
}

impl HeartbeatOutcome {
    const ALL: [HeartbeatOutcome; 7] = [
        HeartbeatOutcome::Joined,
        HeartbeatOutcome::Refreshed,
        HeartbeatOutcome::Left,
        HeartbeatOutcome::Unauthorized,
        HeartbeatOutcome::Disabled,
        HeartbeatOutcome::BadRequest,
        HeartbeatOutcome::Full,
    ];

    fn label(self) -> &'static str {
        match self {
            HeartbeatOutcome::Joined => "joined",
            HeartbeatOutcome::Refreshed => "refreshed",
            HeartbeatOutcome::Left => "left",
            HeartbeatOutcome::Unauthorized => "unauthorized",
            HeartbeatOutcome::Disabled => "disabled",
            HeartbeatOutcome::BadRequest => "bad_request",
            HeartbeatOutcome::Full => "full",
        }
    }
}

/// The DNS response codes counted apart; any other counts as `other`.
const RCODES: [(ResponseCode, &str); 6] = [
    (ResponseCode::NoError, "noerror"),
    (ResponseCode::NXDomain, "nxdomain"),
    (ResponseCode::Refused, "refused"),
    (ResponseCode::FormErr, "formerr"),
    (ResponseCode::NotImp, "notimp"),
    (ResponseCode::ServFail, "servfail"),
];

/// The discovery service's counters.
pub struct DiscoveryMetrics {
    /// Reloads made, and failed; the service's reloads count into it.
    pub reloads: shroud_process::reload::ReloadCounts,
    lists: Family<Labels1, Counter>,
    list_handles: Vec<Counter>,
    heartbeats: Family<Labels1, Counter>,
    heartbeat_handles: Vec<Counter>,
    rate_limited: Counter,
    /// By rcode, in `RCODES` order; served by the collector once DNS is on.
    dns_handles: Vec<Counter>,
    dns_other: Counter,
    dns_enabled: OnceLock<()>,
    fleet: OnceLock<Arc<Mutex<Fleet>>>,
    lifecycle: Lifecycle,
}

impl Default for DiscoveryMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for DiscoveryMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryMetrics").finish_non_exhaustive()
    }
}

impl DiscoveryMetrics {
    /// Every counter at zero.
    pub fn new() -> Self {
        let lists = Family::<Labels1, Counter>::default();
        let list_handles = ListOutcome::ALL
            .iter()
            .map(|o| lists.get_or_create_owned(&[("outcome", o.label())]))
            .collect();
        let heartbeats = Family::<Labels1, Counter>::default();
        let heartbeat_handles = HeartbeatOutcome::ALL
            .iter()
            .map(|o| heartbeats.get_or_create_owned(&[("outcome", o.label())]))
            .collect();
        let dns_handles = RCODES.iter().map(|_| Counter::default()).collect();
        let dns_other = Counter::default();
        Self {
            reloads: shroud_process::reload::ReloadCounts::default(),
            lists,
            list_handles,
            heartbeats,
            heartbeat_handles,
            rate_limited: Counter::default(),
            dns_handles,
            dns_other,
            dns_enabled: OnceLock::new(),
            fleet: OnceLock::new(),
            lifecycle: Lifecycle::new("shutting down"),
        }
    }

    /// Counts a request for a list that ended as `outcome`.
    pub fn list(&self, outcome: ListOutcome) {
        let at = ListOutcome::ALL.iter().position(|o| *o == outcome);
        if let Some(at) = at {
            self.list_handles[at].inc();
        }
    }

    /// Counts a heartbeat that ended as `outcome`.
    pub fn heartbeat(&self, outcome: HeartbeatOutcome) {
        let at = HeartbeatOutcome::ALL.iter().position(|o| *o == outcome);
        if let Some(at) = at {
            self.heartbeat_handles[at].inc();
        }
    }

    /// Counts a request refused by the per-address rate limit.
    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// Counts a DNS question answered with `code`.
    pub fn dns_answer(&self, code: ResponseCode) {
        match RCODES.iter().position(|(c, _)| *c == code) {
            Some(at) => self.dns_handles[at].inc(),
            None => self.dns_other.inc(),
        };
    }

    /// The service answers DNS: its counters are served.
    pub(crate) fn dns_enabled(&self) {
        let _ = self.dns_enabled.set(());
    }

    /// The fleet the service lists, read at each scrape.
    pub(crate) fn watch_fleet(&self, fleet: Arc<Mutex<Fleet>>) {
        let _ = self.fleet.set(fleet);
    }

    /// The listeners are up: `/readyz` says ready.
    pub(crate) fn serving(&self) {
        self.lifecycle.serving();
    }

    /// The service is stopping: `/readyz` says so.
    pub(crate) fn stopping(&self) {
        self.lifecycle.stopping();
    }

    /// What `/readyz` reports now. The signing key is loaded before anything listens, so
    /// listening means it is.
    pub fn readiness(&self) -> Readiness {
        self.lifecycle.readiness()
    }
}

/// Registers the service's metrics in `registry` (made with the prefix `shroud_discovery`),
/// and returns what `/readyz` asks.
pub fn register(metrics: &Arc<DiscoveryMetrics>, registry: &mut Registry) -> ReadinessFn {
    metrics.reloads.register(registry);
    registry.register(
        "lists",
        "Requests for a list of proxies, by outcome",
        metrics.lists.clone(),
    );
    registry.register(
        "heartbeats",
        "Heartbeats from proxies, by outcome",
        metrics.heartbeats.clone(),
    );
    registry.register(
        "rate_limited",
        "Requests refused by the per-address rate limit",
        metrics.rate_limited.clone(),
    );
    registry.register_collector(Box::new(Collected {
        metrics: metrics.clone(),
    }));
    let metrics = metrics.clone();
    Arc::new(move || metrics.readiness())
}

/// Metrics read at each scrape.
#[derive(Debug)]
struct Collected {
    metrics: Arc<DiscoveryMetrics>,
}

impl Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(fleet) = self.metrics.fleet.get() {
            let (statics, healthy) = {
                let fleet = fleet.lock().unwrap_or_else(PoisonError::into_inner);
                (fleet.statics().len(), fleet.healthy(Instant::now()).len())
            };
            let live = healthy.saturating_sub(statics);
            let mut family = encoder.encode_descriptor(
                "proxies",
                "Proxies that may be listed now, by kind: static (the fleet file) or live (heard \
                 from within the heartbeat timeout).",
                None,
                MetricType::Gauge,
            )?;
            for (kind, count) in [("static", statics), ("live", live)] {
                let count = i64::try_from(count).unwrap_or(i64::MAX);
                ConstGauge::new(count).encode(family.encode_family(&[("kind", kind)])?)?;
            }
        }
        if self.metrics.dns_enabled.get().is_some() {
            let mut family = encoder.encode_descriptor(
                "dns_queries",
                "DNS questions answered, by response code.",
                None,
                MetricType::Counter,
            )?;
            for sample in self
                .metrics
                .dns_handles
                .iter()
                .zip(RCODES.iter().map(|(_, l)| *l))
            {
                let (counter, label) = sample;
                counter.encode(family.encode_family(&[("rcode", label)])?)?;
            }
            self.metrics
                .dns_other
                .encode(family.encode_family(&[("rcode", "other")])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use crate::fleet::FleetFile;

    use super::*;

    fn scrape(metrics: &Arc<DiscoveryMetrics>) -> String {
        let mut registry = Registry::with_prefix("shroud_discovery");
        register(metrics, &mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn counts_by_outcome_and_reads_the_fleet() {
        let metrics = Arc::new(DiscoveryMetrics::new());
        metrics.list(ListOutcome::Served);
        metrics.list(ListOutcome::Served);
        metrics.heartbeat(HeartbeatOutcome::Unauthorized);
        let text = scrape(&metrics);
        assert!(text.contains("shroud_discovery_lists_total{outcome=\"served\"} 2\n"));
        assert!(text.contains("shroud_discovery_lists_total{outcome=\"no_proxies\"} 0\n"));
        assert!(text.contains("shroud_discovery_heartbeats_total{outcome=\"unauthorized\"} 1\n"));
        // No fleet and no DNS yet: neither is served.
        assert!(!text.contains("shroud_discovery_proxies"), "{text}");
        assert!(!text.contains("dns_queries"), "{text}");

        let file = FleetFile::parse("[[proxy]]\nname = \"a.test\"\nport = 443\nregion = \"eu\"\n")
            .unwrap();
        metrics.watch_fleet(Arc::new(Mutex::new(Fleet::new(
            file,
            Duration::from_secs(30),
        ))));
        metrics.dns_enabled();
        metrics.dns_answer(ResponseCode::NXDomain);
        metrics.dns_answer(ResponseCode::YXDomain);
        let text = scrape(&metrics);
        assert!(
            text.contains("shroud_discovery_proxies{kind=\"static\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("shroud_discovery_proxies{kind=\"live\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("shroud_discovery_dns_queries_total{rcode=\"nxdomain\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("shroud_discovery_dns_queries_total{rcode=\"other\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("shroud_discovery_dns_queries_total{rcode=\"noerror\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn ready_while_serving() {
        let metrics = DiscoveryMetrics::new();
        assert!(matches!(metrics.readiness(), Readiness::NotReady(_)));
        metrics.serving();
        assert_eq!(metrics.readiness(), Readiness::Ready);
        metrics.stopping();
        assert_eq!(metrics.readiness(), Readiness::not_ready("shutting down"));
    }
}
