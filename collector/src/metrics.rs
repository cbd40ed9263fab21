//! `--metrics ADDR`: the collector's Prometheus/OpenMetrics text at `http://ADDR/metrics`
//! (prometheus-client; the HTTP side is `sensor_proto::metrics_http`, shared with the
//! agent). Counters are atomics updated where things happen: the stream handlers, the
//! store thread (per transaction), the forwarders (per batch).

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    pub target: String,
}

pub struct Metrics {
    registry: Registry,
    /// Agent streams open now.
    pub streams: Gauge,
    /// Alerts stored for the first time (not the duplicates of a resend).
    pub alerts_stored: Counter,
    /// Time from the start of a store transaction to its commit.
    pub commit_seconds: Histogram,
    pub forwarded: Family<TargetLabel, Counter>,
    /// Stored alerts a syslog target has not taken yet.
    pub forward_lag: Family<TargetLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sensor_collector");
        let m = Self {
            streams: Gauge::default(),
            alerts_stored: Counter::default(),
            // 0.5 ms to about 4 s.
            commit_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            forwarded: Family::default(),
            forward_lag: Family::default(),
            registry: Registry::default(),
        };
        registry.register("streams", "Agent streams open now", m.streams.clone());
        registry.register(
            "alerts_stored",
            "Alerts stored for the first time (a resent duplicate is not counted)",
            m.alerts_stored.clone(),
        );
        registry.register(
            "commit_seconds",
            "Store transactions, from their first statement to the commit (an acknowledgement waits for it)",
            m.commit_seconds.clone(),
        );
        registry.register(
            "forwarded_alerts",
            "Alerts written to a syslog target (again after an interrupted batch)",
            m.forwarded.clone(),
        );
        registry.register(
            "forward_lag_alerts",
            "Stored alerts a syslog target has not taken yet",
            m.forward_lag.clone(),
        );
        Self { registry, ..m }
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        text
    }

    pub fn target(&self, target: &str) -> TargetLabel {
        TargetLabel {
            target: target.to_owned(),
        }
    }
}

/// An open stream, counted for as long as it lives.
pub struct StreamGuard(Arc<Metrics>);

impl StreamGuard {
    pub fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.streams.inc();
        Self(Arc::clone(metrics))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_counted_is_exposed() {
        let m = Arc::new(Metrics::new());
        let guard = StreamGuard::new(&m);
        m.alerts_stored.inc_by(3);
        m.commit_seconds.observe(0.002);
        m.forwarded
            .get_or_create(&m.target("tcp://siem:514"))
            .inc_by(2);
        m.forward_lag
            .get_or_create(&m.target("tcp://siem:514"))
            .set(5);
        let text = m.render();
        for line in [
            "sensor_collector_streams 1",
            "sensor_collector_alerts_stored_total 3",
            "sensor_collector_commit_seconds_count 1",
            "sensor_collector_forwarded_alerts_total{target=\"tcp://siem:514\"} 2",
            "sensor_collector_forward_lag_alerts{target=\"tcp://siem:514\"} 5",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        drop(guard);
        assert!(m.render().contains("sensor_collector_streams 0"));
    }
}
