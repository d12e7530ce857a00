//! An onion service's self-checks and relaunches as Prometheus metrics, for whichever binary
//! hosts it.

use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;

use super::OnionHealth;

/// Serves `onion_probes_total{result="ok"|"failed"}` and `onion_relaunches_total` (under the
/// registry's prefix) once a service's [`OnionHealth`] is [set](Self::set), nothing before:
/// register it at start, set it when the service launches. Clones share the service.
#[derive(Debug, Clone, Default)]
pub struct OnionMetrics(Arc<OnceLock<Arc<OnionHealth>>>);

impl OnionMetrics {
    /// Serves `health` from now on (the first call wins).
    pub fn set(&self, health: Arc<OnionHealth>) {
        let _ = self.0.set(health);
    }
}

impl Collector for OnionMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(health) = self.0.get() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "onion_probes",
            "The onion service's checks of itself through Tor, by result: ok (it answered), \
             failed.",
            None,
            MetricType::Counter,
        )?;
        for (result, value) in [
            ("ok", health.probes_succeeded()),
            ("failed", health.probes_failed()),
        ] {
            ConstCounter::new(value).encode(family.encode_family(&[("result", result)])?)?;
        }
        ConstCounter::new(health.relaunches()).encode(encoder.encode_descriptor(
            "onion_relaunches",
            "Times the onion service was relaunched with new introduction points, after its \
             checks failed.",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::Ordering;

    use prometheus_client::registry::Registry;

    use super::*;

    #[test]
    fn nothing_until_set_then_every_series() {
        let metrics = OnionMetrics::default();
        let mut registry = Registry::with_prefix("shroud_proxy");
        registry.register_collector(Box::new(metrics.clone()));
        let text = |registry: &Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
            text
        };
        assert!(!text(&registry).contains("onion"), "{}", text(&registry));
        let health = Arc::new(OnionHealth::default());
        health.probes_failed.fetch_add(2, Ordering::Relaxed);
        health.relaunches.fetch_add(1, Ordering::Relaxed);
        metrics.set(health);
        let text = text(&registry);
        assert!(
            text.contains("shroud_proxy_onion_probes_total{result=\"ok\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("shroud_proxy_onion_probes_total{result=\"failed\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shroud_proxy_onion_relaunches_total 1\n"),
            "{text}"
        );
    }
}
