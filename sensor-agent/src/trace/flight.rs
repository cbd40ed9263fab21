//! The flight recorder: the last seconds of events in memory (bounded in bytes); when an
//! alert fires, they and the following seconds are written to a trace file named in the
//! alert, so a responder sees what led up to it.

use std::{collections::VecDeque, path::PathBuf};

use prost::Message;
use sensor_proto::v1::{Alert, Event, TraceHeader, TraceRecord, trace_record};
use tracing::{info, warn};

use super::format::{TraceError, TraceWriter};

#[derive(Clone, Debug)]
pub struct FlightOptions {
    pub dir: PathBuf,
    /// Events kept from before an alert.
    pub before_ns: u64,
    /// Events written after it.
    pub after_ns: u64,
    /// Bound on the memory the ring takes (encoded event bytes).
    pub max_bytes: usize,
}

impl FlightOptions {
    pub fn new(dir: PathBuf) -> Self {
        use crate::config::{FlightSection, MIB, SECOND_NS};
        let defaults = FlightSection::default();
        Self {
            dir,
            before_ns: defaults.before_seconds * SECOND_NS,
            after_ns: defaults.after_seconds * SECOND_NS,
            max_bytes: defaults.max_mib * MIB as usize,
        }
    }
}

struct Capture {
    writer: TraceWriter,
    until_ns: u64,
}

pub struct FlightRecorder {
    opts: FlightOptions,
    ring: VecDeque<(Event, usize)>,
    ring_bytes: usize,
    capture: Option<Capture>,
    pub captures: u64,
}

impl FlightRecorder {
    pub fn new(opts: FlightOptions) -> Result<Self, TraceError> {
        std::fs::create_dir_all(&opts.dir).map_err(|source| TraceError::Io {
            file: opts.dir.display().to_string(),
            source,
        })?;
        Ok(Self {
            opts,
            ring: VecDeque::new(),
            ring_bytes: 0,
            capture: None,
            captures: 0,
        })
    }

    fn record(event: &Event) -> TraceRecord {
        TraceRecord {
            item: Some(trace_record::Item::Event(event.clone())),
        }
    }

    /// Every event, before the table and detection see it.
    pub fn on_event(&mut self, event: &Event) {
        let size = event.encoded_len();
        self.ring.push_back((event.clone(), size));
        self.ring_bytes += size;
        let now = event.boot_ns;
        while let Some((front, size)) = self.ring.front() {
            let old = now.saturating_sub(front.boot_ns) > self.opts.before_ns;
            if !old && self.ring_bytes <= self.opts.max_bytes {
                break;
            }
            self.ring_bytes -= size;
            self.ring.pop_front();
        }
        if let Some(capture) = self.capture.as_mut() {
            if now > capture.until_ns {
                self.close();
            } else if let Err(e) = capture.writer.write(&Self::record(event)) {
                warn!(error = %e, "flight record write failed");
                self.capture = None;
            }
        }
    }

    /// An alert fired: start a capture (or join the one under way) and name it in the
    /// alert.
    pub fn on_alert(&mut self, alert: &mut Alert, now_ns: u64, header: &dyn Fn() -> TraceHeader) {
        if let Some(capture) = &self.capture {
            alert.flight_record = capture.writer.path().display().to_string();
            return;
        }
        let name: String = alert
            .id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self.opts.dir.join(format!("flight-{name}.trace.zst"));
        let mut writer = match TraceWriter::create(&path, &header(), true) {
            Ok(w) => w,
            Err(e) => {
                warn!(error = %e, "cannot start a flight record");
                return;
            }
        };
        for (event, _) in &self.ring {
            if let Err(e) = writer.write(&Self::record(event)) {
                warn!(error = %e, "flight record write failed");
                return;
            }
        }
        let _ = writer.flush();
        alert.flight_record = path.display().to_string();
        self.captures += 1;
        self.capture = Some(Capture {
            writer,
            until_ns: now_ns.saturating_add(self.opts.after_ns),
        });
    }

    /// Ends the capture under way, if any.
    pub fn close(&mut self) {
        if let Some(capture) = self.capture.take() {
            match capture.writer.finish() {
                Ok(path) => info!(trace = %path.display(), "flight record complete"),
                Err(e) => warn!(error = %e, "flight record not completed"),
            }
        }
    }

    pub fn flush(&mut self) {
        if let Some(capture) = self.capture.as_mut() {
            let _ = capture.writer.flush();
        }
    }
}
