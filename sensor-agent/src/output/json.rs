//! JSON lines on a writer (stdout by default): one `{"event": {...}}` or `{"alert": {...}}`
//! object per line, in the protobuf JSON mapping of `sensor.v1.Output`.

use std::io::Write;

use sensor_proto::v1::{Alert, Event};
use tracing::error;

use super::Sink;

pub struct JsonLines<W: Write> {
    out: W,
    /// Print events (alerts are always printed).
    events: bool,
    /// Set after the first write error (a closed pipe); later lines are dropped quietly.
    broken: bool,
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            events: true,
            broken: false,
        }
    }

    /// Prints events only when `events` (the pipeline may hand events to other sinks).
    pub fn with_events(mut self, events: bool) -> Self {
        self.events = events;
        self
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    /// Writes `{"<key>": <value>}` and a newline.
    fn line<T: serde::Serialize>(&mut self, key: &str, value: &T) {
        if self.broken {
            return;
        }
        let result = (|| -> std::io::Result<()> {
            write!(self.out, "{{\"{key}\":")?;
            serde_json::to_writer(&mut self.out, value)?;
            self.out.write_all(b"}\n")
        })();
        if let Err(err) = result {
            error!(error = %err, "cannot write JSON lines to the output; dropping further lines");
            self.broken = true;
        }
    }
}

impl<W: Write> Sink for JsonLines<W> {
    fn event(&mut self, event: &Event) {
        if self.events {
            self.line("event", event);
        }
    }

    fn alert(&mut self, alert: &Alert) {
        self.line("alert", alert);
    }

    fn flush(&mut self) {
        if !self.broken && self.out.flush().is_err() {
            self.broken = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use sensor_proto::v1::{ExitEvent, Output, event, output};

    use super::*;

    /// A line is exactly the protobuf JSON mapping of the `Output` wrapper.
    #[test]
    fn line_is_the_output_wrapper_mapping() {
        let ev = Event {
            pid: 7,
            boot_ns: 12,
            comm: "sh".into(),
            kind: Some(event::Kind::Exit(ExitEvent {
                exit_code: 3,
                ..Default::default()
            })),
            ..Default::default()
        };
        let mut sink = JsonLines::new(Vec::new());
        sink.event(&ev);
        let text = String::from_utf8(sink.into_inner()).unwrap();
        assert!(text.ends_with('\n'));
        let parsed: Output = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(parsed.item, Some(output::Item::Event(ev)));
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["event"]["pid"], 7);
        assert_eq!(
            value["event"]["bootNs"], "12",
            "64-bit integers are strings"
        );
        assert_eq!(value["event"]["exit"]["exitCode"], 3);
    }
}
