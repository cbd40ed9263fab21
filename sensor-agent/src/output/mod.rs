//! Outputs: where events and alerts go after detection: JSON lines on stdout and, with
//! `--collector`, the spool that feeds the collector (`crate::delivery`).

pub mod json;

use sensor_proto::v1::{Alert, Event};

/// A destination for what the pipeline produces.
pub trait Sink {
    fn event(&mut self, event: &Event);
    fn alert(&mut self, alert: &Alert);
    /// Called after each batch of records, so lines reach readers within milliseconds.
    fn flush(&mut self);
    /// Wants every event even when they are not printed (`--send-events`).
    fn wants_events(&self) -> bool {
        false
    }
}

/// A destination that may be off.
impl<S: Sink> Sink for Option<S> {
    fn event(&mut self, event: &Event) {
        if let Some(s) = self {
            s.event(event);
        }
    }

    fn alert(&mut self, alert: &Alert) {
        if let Some(s) = self {
            s.alert(alert);
        }
    }

    fn flush(&mut self) {
        if let Some(s) = self {
            s.flush();
        }
    }

    fn wants_events(&self) -> bool {
        self.as_ref().is_some_and(Sink::wants_events)
    }
}
