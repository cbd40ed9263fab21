//! Outputs: where events and alerts go after detection (stdout JSON lines for now).

pub mod json;

use sensor_proto::v1::{Alert, Event};

/// A destination for what the pipeline produces.
pub trait Sink {
    fn event(&mut self, event: &Event);
    fn alert(&mut self, alert: &Alert);
    /// Called after each batch of records, so lines reach readers within milliseconds.
    fn flush(&mut self);
}
