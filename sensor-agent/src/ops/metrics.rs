//! `--metrics ADDR`: Prometheus/OpenMetrics text at `http://ADDR/metrics`
//! (prometheus-client).
//!
//! The event loop owns every counter it updates; once a second it publishes them here
//! (`Metrics::publish`), so scrapes never touch the hot path and lag it by at most a
//! second. The HTTP side is `sensor_proto::metrics_http`, shared with the collector.

use std::{net::SocketAddr, sync::Arc};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tracing::warn;

use crate::{detect::DetectStats, pipeline::PipelineStats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    rule: String,
    severity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: String,
}

/// One concern of the probes: how it is attached (`mode`, `walk`), or why not (`reason`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    probe: String,
    state: String,
    mode: String,
    walk: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnforcementLabels {
    action: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
    mechanism: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// Everything the agent publishes.
pub struct Metrics {
    registry: Registry,
    events: Family<KindLabel, Counter>,
    lost: Family<KindLabel, Counter>,
    alerts: Family<AlertLabels, Counter>,
    suppressed: Family<ReasonLabel, Counter>,
    decode_errors: Counter,
    detect_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    process_table: Gauge,
    resident_bytes: Gauge,
    spool_records: Gauge,
    spool_bytes: Gauge,
    spool_shed: Family<ClassLabel, Counter>,
    ring_capacity: Gauge,
    ring_peak: Gauge,
    ring_read: Counter,
    probes: Family<ProbeLabels, Gauge>,
    enforced: Family<EnforcementLabels, Counter>,
    enforce_mode: Family<ModeLabels, Gauge>,
}

/// A reading of the agent's counters, made by the event loop.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub pipeline: PipelineStats,
    pub detect: DetectStats,
    /// Kernel losses since start, by kind name.
    pub lost: Vec<(String, u64)>,
    pub process_table: usize,
    pub spool_records: u64,
    pub spool_bytes: u64,
    pub shed_events: u64,
    pub shed_alerts: u64,
    /// Size of the kernel ring buffer.
    pub ring_capacity: u64,
    /// The most bytes found waiting in the ring at one drain since the last snapshot.
    pub ring_peak: u64,
    /// Ring bytes read since start.
    pub ring_read: u64,
}

fn severity_name(s: i32) -> String {
    sensor_proto::v1::Severity::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("SEVERITY_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| s.to_string())
}

/// Sets a monotonic counter to `total` (counters only move forward).
fn advance(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sensor");
        let m = Self {
            events: Family::default(),
            lost: Family::default(),
            alerts: Family::default(),
            suppressed: Family::default(),
            decode_errors: Counter::default(),
            detect_seconds: Counter::default(),
            process_table: Gauge::default(),
            resident_bytes: Gauge::default(),
            spool_records: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_shed: Family::default(),
            ring_capacity: Gauge::default(),
            ring_peak: Gauge::default(),
            ring_read: Counter::default(),
            probes: Family::default(),
            enforced: Family::default(),
            enforce_mode: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events",
            "Events from the kernel probes, by kind",
            m.events.clone(),
        );
        registry.register(
            "kernel_lost_records",
            "Records lost in the kernel because the ring buffer was full, by kind",
            m.lost.clone(),
        );
        registry.register(
            "alerts",
            "Alerts raised, by rule and severity",
            m.alerts.clone(),
        );
        registry.register(
            "alerts_suppressed",
            "Rule matches that raised no alert: collapsed into an alert already raised (counted in its repeat), or vetoed by an allow-list entry",
            m.suppressed.clone(),
        );
        registry.register(
            "decode_errors",
            "Kernel records the agent could not decode",
            m.decode_errors.clone(),
        );
        registry.register(
            "rule_evaluation_seconds",
            "Time spent evaluating the rules, measured on one event in 16 and scaled (divide by sensor_events_total for the mean per event)",
            m.detect_seconds.clone(),
        );
        registry.register(
            "process_table_entries",
            "Processes in the agent's process table",
            m.process_table.clone(),
        );
        registry.register(
            "resident_memory_bytes",
            "Resident memory of the agent",
            m.resident_bytes.clone(),
        );
        registry.register(
            "spool_pending_records",
            "Records waiting in the spool for the collector's acknowledgement",
            m.spool_records.clone(),
        );
        registry.register(
            "spool_pending_bytes",
            "Bytes of the records waiting in the spool",
            m.spool_bytes.clone(),
        );
        registry.register(
            "spool_shed_records",
            "Records the full spool shed before delivery, by class",
            m.spool_shed.clone(),
        );
        registry.register(
            "ring_capacity_bytes",
            "Size of the kernel ring buffer the probes write to",
            m.ring_capacity.clone(),
        );
        registry.register(
            "ring_queue_peak_bytes",
            "Kernel queue depth: the most bytes waiting in the ring buffer when the agent drained it, over the last second",
            m.ring_peak.clone(),
        );
        registry.register(
            "ring_read_bytes",
            "Bytes the agent read from the kernel ring buffer",
            m.ring_read.clone(),
        );
        registry.register(
            "probes",
            "The probes' concerns, 1 per concern: state attached, skipped or unavailable (with the reason), mode tp_btf, fexit or sys_exit, path walk bpf_loop or bounded",
            m.probes.clone(),
        );
        registry.register(
            "enforcement_actions",
            "Execs enforcement stopped (killed, denied) or, in audit, would have stopped, by action and enforcement rule",
            m.enforced.clone(),
        );
        registry.register(
            "enforcement_mode",
            "1 for the enforcement mode in force (off, audit, on) and how `on` stops a program (lsm, kill)",
            m.enforce_mode.clone(),
        );
        Self { registry, ..m }
    }

    /// Publishes the enforcement mode in force (at start and on every reload).
    pub fn set_enforcement(&self, mode: &str, mechanism: &str) {
        self.enforce_mode.clear();
        self.enforce_mode
            .get_or_create(&ModeLabels {
                mode: mode.to_owned(),
                mechanism: mechanism.to_owned(),
            })
            .set(1);
    }

    /// Publishes how every concern of the probes is attached (once, at start).
    pub fn set_probes(&self, status: &[crate::probes::loader::ProbeStatus]) {
        use crate::probes::loader::State;
        for s in status {
            let (state, reason) = match &s.state {
                State::Attached => ("attached", String::new()),
                State::Skipped => ("skipped", String::new()),
                State::Unavailable(reason) => ("unavailable", reason.clone()),
            };
            self.probes
                .get_or_create(&ProbeLabels {
                    probe: s.name.to_owned(),
                    state: state.to_owned(),
                    mode: s.mode.map_or("", |m| m.name()).to_owned(),
                    walk: s.walk.map_or("", |w| w.name()).to_owned(),
                    reason,
                })
                .set(1);
        }
    }

    pub fn publish(&self, s: &Snapshot) {
        // Every kind is exposed, at 0 until it is seen.
        for (kind, n) in s.pipeline.kinds() {
            let kind = kind.name().to_owned();
            advance(&self.events.get_or_create(&KindLabel { kind }), n);
        }
        for (kind, n) in &s.lost {
            advance(
                &self.lost.get_or_create(&KindLabel { kind: kind.clone() }),
                *n,
            );
        }
        for ((rule, severity), n) in &s.pipeline.alerts_by {
            let labels = AlertLabels {
                rule: rule.clone(),
                severity: severity_name(*severity),
            };
            advance(&self.alerts.get_or_create(&labels), *n);
        }
        for ((action, rule), n) in &s.pipeline.enforced {
            let labels = EnforcementLabels {
                action: action.clone(),
                rule: rule.clone(),
            };
            advance(&self.enforced.get_or_create(&labels), *n);
        }
        for (reason, n) in [
            ("collapsed", s.detect.collapsed),
            ("allowed", s.detect.allowed),
        ] {
            let reason = reason.to_owned();
            advance(&self.suppressed.get_or_create(&ReasonLabel { reason }), n);
        }
        advance(&self.decode_errors, s.pipeline.decode_errors);
        let seconds = s.pipeline.detect_ns as f64 / 1e9;
        let now = self.detect_seconds.get();
        if seconds > now {
            self.detect_seconds.inc_by(seconds - now);
        }
        self.process_table.set(s.process_table as i64);
        self.resident_bytes.set(resident_bytes() as i64);
        self.spool_records.set(s.spool_records as i64);
        self.ring_capacity.set(s.ring_capacity as i64);
        self.ring_peak.set(s.ring_peak as i64);
        advance(&self.ring_read, s.ring_read);
        self.spool_bytes.set(s.spool_bytes as i64);
        for (class, n) in [("event", s.shed_events), ("alert", s.shed_alerts)] {
            advance(
                &self.spool_shed.get_or_create(&ClassLabel {
                    class: class.to_owned(),
                }),
                n,
            );
        }
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(e) = encode(&mut text, &self.registry) {
            warn!(error = %e, "cannot encode the metrics");
        }
        text
    }
}

/// Resident set size (/proc/self/statm); 0 when it cannot be read.
pub fn resident_bytes() -> u64 {
    procfs::process::Process::myself()
        .and_then(|p| p.statm())
        .map_or(0, |m| m.resident * procfs::page_size())
}

/// Serves `metrics` at `http://ADDR/metrics` (`sensor_proto::metrics_http`); returns the
/// address bound.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    sensor_proto::metrics_http::serve(addr, Arc::new(move || metrics.render())).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn publish_moves_the_counters() {
        let m = Metrics::new();
        let mut s = Snapshot::default();
        s.pipeline.by_kind[0] = 5;
        s.pipeline.alerts_by.insert(
            (
                "EPMM-B2".into(),
                sensor_proto::v1::Severity::Critical as i32,
            ),
            2,
        );
        s.lost.push(("exec".into(), 7));
        s.pipeline
            .enforced
            .insert(("killed".into(), "enforce:tomcat".into()), 4);
        m.set_enforcement("on", "kill");
        s.process_table = 42;
        s.detect.collapsed = 3;
        s.detect.allowed = 1;
        m.publish(&s);
        s.pipeline.by_kind[0] = 9;
        m.publish(&s);
        let text = m.render();
        assert!(
            text.contains("sensor_events_total{kind=\"exec\"} 9"),
            "{text}"
        );
        assert!(
            text.contains("sensor_alerts_suppressed_total{reason=\"collapsed\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("sensor_alerts_suppressed_total{reason=\"allowed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("sensor_alerts_total{rule=\"EPMM-B2\",severity=\"critical\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("sensor_kernel_lost_records_total{kind=\"exec\"} 7"),
            "{text}"
        );
        assert!(text.contains("sensor_process_table_entries 42"), "{text}");
        assert!(
            text.contains(
                "sensor_enforcement_actions_total{action=\"killed\",rule=\"enforce:tomcat\"} 4"
            ),
            "{text}"
        );
        assert!(
            text.contains("sensor_enforcement_mode{mode=\"on\",mechanism=\"kill\"} 1"),
            "{text}"
        );
        assert!(text.contains("sensor_resident_memory_bytes "), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    /// Sends `request` on a new connection and returns the whole answer.
    async fn ask(addr: SocketAddr, request: &[u8]) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The server may answer (and close) before it has read all of a long request.
        let _ = conn.write_all(request).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn bad_requests_get_a_404_and_do_not_stop_the_server() {
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::new(Metrics::new()))
            .await
            .unwrap();
        // A client that connects and says nothing holds only its own connection.
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        for request in [
            &b"POST /metrics HTTP/1.1\r\n\r\n"[..],
            b"GET /etc/passwd HTTP/1.1\r\n\r\n",
            b"\x00\xff garbage \r\n\r\n",
            &[b'A'; 20_000][..],
        ] {
            let answer = ask(addr, request).await;
            assert!(
                answer.starts_with("HTTP/1.1 404 Not Found\r\n"),
                "{:?}: {answer}",
                String::from_utf8_lossy(&request[..request.len().min(40)])
            );
        }
        let answer = ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("# EOF\n"), "{answer}");
    }
}
