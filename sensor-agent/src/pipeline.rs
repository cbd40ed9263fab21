//! The path of an event after it leaves the kernel: decode -> process table -> outputs.
//!
//! Live runs feed raw ring-buffer records in; replay feeds decoded events in. Everything
//! from `handle_event` on is the same code for both.

use sensor_proto::v1::Event;
use tracing::warn;

use crate::{
    decode::{self, DecodeContext},
    detect::Engine,
    output::Sink,
    proctable::ProcessTable,
};

/// What went through the pipeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    pub records: u64,
    pub decode_errors: u64,
    pub events: u64,
    pub alerts: u64,
}

pub struct Pipeline<S: Sink> {
    pub table: ProcessTable,
    pub engine: Engine,
    pub sink: S,
    /// Print every event (`--events`).
    pub print_events: bool,
    pub decode: DecodeContext,
    pub stats: PipelineStats,
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
        }
    }

    /// One raw record from the kernel.
    pub fn handle_record(&mut self, bytes: &[u8]) {
        self.stats.records += 1;
        match decode::decode(bytes, &self.decode) {
            Ok(Some(event)) => self.handle_event(event),
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

    /// One decoded event: update the table, detect, then hand both on.
    pub fn handle_event(&mut self, event: Event) {
        self.stats.events += 1;
        self.table.apply(&event);
        let alerts = self.engine.on_event(&event, &mut self.table);
        if self.print_events {
            self.sink.event(&event);
        }
        for alert in &alerts {
            self.stats.alerts += 1;
            self.sink.alert(alert);
        }
    }

    /// End of input: report the repeats still counted in open collapse windows.
    pub fn finish(&mut self) {
        for alert in self.engine.finish() {
            self.stats.alerts += 1;
            self.sink.alert(&alert);
        }
        self.sink.flush();
    }

    pub fn flush(&mut self) {
        self.sink.flush();
    }
}
