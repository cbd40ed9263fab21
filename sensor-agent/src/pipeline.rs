//! The path of an event after it leaves the kernel: decode -> process table -> outputs.
//!
//! Live runs feed raw ring-buffer records in; replay feeds decoded events in. Everything
//! from `handle_event` on is the same code for both.

use std::{collections::BTreeMap, time::Instant};

use sensor_proto::{
    EventKind,
    v1::{Alert, Event, TraceHeader, event},
};
use tracing::warn;

use crate::{
    decode::{self, BootClock, DecodeContext},
    detect::Engine,
    output::Sink,
    proctable::ProcessTable,
    trace::{self, flight::FlightRecorder, recorder::Recorder},
};

/// The clock offset moves by less than this between readings without being a change
/// worth recording (a reading's own jitter).
const CLOCK_SLACK_NS: i128 = 1_000_000;

/// Rule evaluation is timed on one event in this many (`PipelineStats::detect_ns`).
const DETECT_TIMED_EVERY: u64 = 16;

/// A trace header describing the pipeline's state now.
fn header(
    table: &ProcessTable,
    engine: &Engine,
    decode: &DecodeContext,
    reason: &str,
    now_ns: u64,
) -> TraceHeader {
    trace::header(
        reason,
        engine.identity(),
        table,
        engine.users(),
        &decode.clock,
        decode.agent_pid,
        now_ns,
    )
}

/// What went through the pipeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    pub records: u64,
    pub decode_errors: u64,
    pub events: u64,
    pub alerts: u64,
    /// Events by kind, indexed by `EventKind::index` (last: events without a kind).
    pub by_kind: [u64; EVENT_KIND_SLOTS],
    /// Time spent in detection (the rules), in nanoseconds: measured on one event in
    /// `DETECT_TIMED_EVERY` and scaled, an estimate that converges over thousands of events.
    pub detect_ns: u64,
    /// Alerts by (rule id, severity).
    pub alerts_by: BTreeMap<(String, i32), u64>,
    /// Execs enforcement acted on, by (action: killed, denied, would_kill; rule).
    pub enforced: BTreeMap<(String, String), u64>,
}

impl PipelineStats {
    /// Events of `kind` so far.
    pub fn events_of(&self, kind: EventKind) -> u64 {
        self.by_kind[kind.index()]
    }

    /// (kind, events) for every kind.
    pub fn kinds(&self) -> impl Iterator<Item = (EventKind, u64)> + '_ {
        EventKind::ALL
            .into_iter()
            .map(|k| (k, self.by_kind[k.index()]))
    }
}

/// One slot per event kind, and one for events without a kind.
pub const EVENT_KIND_SLOTS: usize = EventKind::COUNT + 1;

pub struct Pipeline<S: Sink> {
    pub table: ProcessTable,
    pub engine: Engine,
    pub sink: S,
    /// Print every event (`--events`).
    pub print_events: bool,
    pub decode: DecodeContext,
    pub stats: PipelineStats,
    /// `--record`: every event to trace files.
    pub recorder: Option<Recorder>,
    /// The last seconds of events, written out when an alert fires.
    pub flight: Option<FlightRecorder>,
    /// What executables are (live runs only: replayed events carry it).
    pub executables: Option<crate::executables::Executables>,
}

impl<S: Sink> Pipeline<S> {
    pub fn new(
        table: ProcessTable,
        engine: Engine,
        sink: S,
        print_events: bool,
        decode: DecodeContext,
    ) -> Self {
        Self {
            table,
            engine,
            sink,
            print_events,
            decode,
            stats: PipelineStats::default(),
            recorder: None,
            flight: None,
            executables: None,
        }
    }

    /// A new reading of the boot clock offset; recorded when it really moved.
    pub fn set_clock(&mut self, clock: BootClock) {
        if (clock.boot_epoch_ns - self.decode.clock.boot_epoch_ns).abs() < CLOCK_SLACK_NS {
            return;
        }
        self.decode.clock = clock;
        self.engine.set_clock(clock);
        if let Some(recorder) = self.recorder.as_mut()
            && let Err(e) = recorder.clock(clock.boot_epoch_ns as i64)
        {
            warn!(error = %e, "cannot record the clock change");
        }
    }

    /// One raw record from the kernel.
    pub fn handle_record(&mut self, bytes: &[u8]) {
        self.stats.records += 1;
        match decode::decode(bytes, &self.decode) {
            Ok(Some(mut event)) => {
                // Live runs read what each new executable is; replay has it recorded.
                self.engine.name_enforcement(&mut event);
                if let Some(executables) = self.executables.as_mut() {
                    executables.enrich(&mut event);
                    link_parent_connections(&mut event, &self.table, executables.root());
                }
                self.handle_event(event)
            }
            Ok(None) => {}
            Err(err) => {
                self.stats.decode_errors += 1;
                // A decode error means the agent and its probes disagree: loud, but bounded.
                if self.stats.decode_errors <= 10 || self.stats.decode_errors.is_power_of_two() {
                    warn!(error = %err, count = self.stats.decode_errors, "dropping an undecodable kernel record");
                }
            }
        }
    }

    /// One decoded event: record it, update the table, detect, then hand both on.
    pub fn handle_event(&mut self, event: Event) {
        // Shared by the rules that keep it as evidence (partial sequences, thresholds).
        let event = std::sync::Arc::new(event);
        self.stats.events += 1;
        if let Some(recorder) = self.recorder.as_mut() {
            let (table, engine, decode) = (&self.table, &self.engine, &self.decode);
            // Made only when a file starts: a header carries the whole process table.
            let header = || header(table, engine, decode, "record", event.boot_ns);
            if let Err(e) = recorder.record(&event, &header) {
                warn!(error = %e, "recording stopped");
                self.recorder = None;
            }
        }
        if let Some(flight) = self.flight.as_mut() {
            flight.on_event(&event);
        }
        self.stats.by_kind[EventKind::of(&event).map_or(EventKind::COUNT, EventKind::index)] += 1;
        if let Some(e) = crate::detect::alert::enforcement_of(&event) {
            let action = crate::detect::alert::action_name(e.action);
            *self
                .stats
                .enforced
                .entry((action.to_owned(), e.rule.clone()))
                .or_default() += 1;
        }
        self.table.apply(&event);
        // Two clock reads per event cost as much as several rules: one event in
        // DETECT_TIMED_EVERY is timed, and its time scaled.
        let started = self
            .stats
            .events
            .is_multiple_of(DETECT_TIMED_EVERY)
            .then(Instant::now);
        let mut alerts = self.engine.on_event(&event, &mut self.table);
        if let Some(started) = started {
            self.stats.detect_ns += started.elapsed().as_nanos() as u64 * DETECT_TIMED_EVERY;
        }
        if self.print_events || self.sink.wants_events() {
            self.sink.event(&event);
        }
        for alert in &mut alerts {
            if let Some(flight) = self.flight.as_mut() {
                let (table, engine, decode) = (&self.table, &self.engine, &self.decode);
                let reason = format!("flight:{}", alert.id);
                let header = || header(table, engine, decode, &reason, event.boot_ns);
                flight.on_alert(alert, event.boot_ns, &header);
            }
            self.count_alert(alert);
            self.sink.alert(alert);
        }
    }

    fn count_alert(&mut self, alert: &Alert) {
        self.stats.alerts += 1;
        *self
            .stats
            .alerts_by
            .entry((alert.rule_id.clone(), alert.severity))
            .or_default() += 1;
    }

    /// An alert the agent raises about itself (`ops::health`): numbered, counted, and
    /// sent to the outputs like any other.
    pub fn raise_self(&mut self, alert: Alert) {
        let alert = self.engine.stamp_self_alert(alert);
        tracing::warn!(rule = %alert.rule_id, title = %alert.title, "self-health alert");
        self.count_alert(&alert);
        self.sink.alert(&alert);
        self.sink.flush();
    }

    /// End of input: report the repeats still counted in open collapse windows, and
    /// complete the trace files.
    pub fn finish(&mut self) {
        for alert in self.engine.finish() {
            self.count_alert(&alert);
            self.sink.alert(&alert);
        }
        if let Some(recorder) = self.recorder.as_mut()
            && let Err(e) = recorder.finish()
        {
            warn!(error = %e, "the last trace file is incomplete");
        }
        if let Some(flight) = self.flight.as_mut() {
            flight.close();
        }
        self.sink.flush();
    }

    pub fn flush(&mut self) {
        self.sink.flush();
    }

    /// Makes the trace files readable up to now (called about once a second).
    pub fn flush_traces(&mut self) {
        if let Some(recorder) = self.recorder.as_mut()
            && let Err(e) = recorder.flush()
        {
            warn!(error = %e, "cannot flush the trace file");
        }
        if let Some(flight) = self.flight.as_mut() {
            flight.flush();
        }
    }
}

/// A shell or interpreter started by the web tier: the connections its parent holds
/// outwards (live runs; a replayed event carries the ones it was recorded with).
fn link_parent_connections(event: &mut Event, table: &ProcessTable, root: &std::path::Path) {
    if let Some(event::Kind::Exec(exec)) = event.kind.as_mut()
        && exec.parent_connections.is_empty()
        && exec
            .exe_identity
            .as_ref()
            .is_some_and(|i| i.shell || i.interpreter)
        && table.get(exec.ppid).is_some_and(|p| p.lineage.is_some())
    {
        exec.parent_connections = crate::connections::outbound(&root.join("proc"), exec.ppid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_of_reads_the_slot_of_the_named_kind() {
        let mut stats = PipelineStats::default();
        for (i, slot) in stats.by_kind.iter_mut().enumerate() {
            *slot = i as u64 + 1;
        }
        for (i, kind) in EventKind::ALL.into_iter().enumerate() {
            assert_eq!(stats.events_of(kind), i as u64 + 1, "{kind}");
        }
        assert_eq!(stats.kinds().count(), EventKind::COUNT);
    }
}
