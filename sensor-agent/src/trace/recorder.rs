//! Recording: every decoded event to trace files, rotated by size and age, with a bound
//! on the total disk they take (the oldest go first). A directory path rotates; a file
//! path is one file.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use sensor_proto::v1::{Event, TraceHeader, TraceRecord, trace_record};
use tracing::{info, warn};

use super::format::{TraceError, TraceWriter};

/// File names of rotated traces: `sensor-<unix seconds>-<sequence>.trace.zst`.
const PREFIX: &str = "sensor-";
const SUFFIX: &str = ".trace.zst";

#[derive(Clone, Debug)]
pub struct RecordOptions {
    /// A directory (rotated files) or a file.
    pub path: PathBuf,
    pub max_file_bytes: u64,
    pub max_file_age_ns: u64,
    pub max_total_bytes: u64,
}

impl RecordOptions {
    pub fn new(path: PathBuf) -> Self {
        use crate::config::{MIB, RecordSection, SECOND_NS};
        let defaults = RecordSection::default();
        Self {
            path,
            max_file_bytes: defaults.max_mib * MIB,
            max_file_age_ns: defaults.max_age_seconds * SECOND_NS,
            max_total_bytes: defaults.max_total_mib * MIB,
        }
    }
}

pub struct Recorder {
    opts: RecordOptions,
    rotating: bool,
    current: Option<(TraceWriter, u64)>,
    sequence: u64,
    pub files_written: u64,
    pub files_deleted: u64,
}

impl Recorder {
    pub fn new(opts: RecordOptions) -> Result<Self, TraceError> {
        let rotating = opts.path.is_dir() || opts.path.to_string_lossy().ends_with('/');
        if rotating {
            std::fs::create_dir_all(&opts.path).map_err(|source| TraceError::Io {
                file: opts.path.display().to_string(),
                source,
            })?;
        }
        Ok(Self {
            opts,
            rotating,
            current: None,
            sequence: 0,
            files_written: 0,
            files_deleted: 0,
        })
    }

    fn next_path(&mut self) -> PathBuf {
        if !self.rotating {
            return self.opts.path.clone();
        }
        self.sequence += 1;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.opts
            .path
            .join(format!("{PREFIX}{secs:010}-{:06}{SUFFIX}", self.sequence))
    }

    /// Records `event`, opening (or rotating to) a file whose header `header()` makes.
    pub fn record(
        &mut self,
        event: &Event,
        header: &dyn Fn() -> TraceHeader,
    ) -> Result<(), TraceError> {
        let rotate = match &self.current {
            None => true,
            Some((w, started)) => {
                self.rotating
                    && (w.bytes() >= self.opts.max_file_bytes
                        || event.boot_ns.saturating_sub(*started) >= self.opts.max_file_age_ns)
            }
        };
        if rotate {
            self.rotate(event.boot_ns, header)?;
        }
        if let Some((w, _)) = self.current.as_mut() {
            w.write(&TraceRecord {
                item: Some(trace_record::Item::Event(event.clone())),
            })?;
        }
        Ok(())
    }

    /// The wall clock moved against the boot clock.
    pub fn clock(&mut self, boot_epoch_ns: i64) -> Result<(), TraceError> {
        if let Some((w, _)) = self.current.as_mut() {
            w.write(&TraceRecord {
                item: Some(trace_record::Item::BootEpochNs(boot_epoch_ns)),
            })?;
        }
        Ok(())
    }

    fn rotate(&mut self, now_ns: u64, header: &dyn Fn() -> TraceHeader) -> Result<(), TraceError> {
        if let Some((w, _)) = self.current.take() {
            let path = w.finish()?;
            info!(trace = %path.display(), "trace file complete");
        }
        let path = self.next_path();
        let writer = TraceWriter::create(&path, &header(), true)?;
        self.files_written += 1;
        self.current = Some((writer, now_ns));
        if self.rotating {
            self.enforce_total(&path);
        }
        Ok(())
    }

    /// Deletes the oldest rotated files until the directory is within its bound.
    fn enforce_total(&mut self, keep: &Path) {
        let Ok(files) = recorded_files(&self.opts.path) else {
            return;
        };
        let files: Vec<(PathBuf, u64)> = files
            .into_iter()
            .map(|path| {
                let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                (path, len)
            })
            .collect();
        let mut total: u64 = files.iter().map(|(_, len)| len).sum();
        for (path, len) in files {
            if total <= self.opts.max_total_bytes || path == keep {
                break;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    total -= len;
                    self.files_deleted += 1;
                }
                Err(e) => warn!(trace = %path.display(), error = %e, "cannot delete an old trace"),
            }
        }
    }

    /// Makes what was recorded so far readable on disk.
    pub fn flush(&mut self) -> Result<(), TraceError> {
        match self.current.as_mut() {
            Some((w, _)) => w.flush(),
            None => Ok(()),
        }
    }

    pub fn finish(&mut self) -> Result<Option<PathBuf>, TraceError> {
        match self.current.take() {
            Some((w, _)) => w.finish().map(Some),
            None => Ok(None),
        }
    }
}

/// The trace files a recording into the directory `dir` wrote, oldest first (their names
/// sort in recording order); other files there are not its own.
pub fn recorded_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(PREFIX) && name.ends_with(SUFFIX)
        })
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::format::TraceReader;

    fn event(pid: u32, boot_ns: u64) -> Event {
        Event {
            pid,
            boot_ns,
            comm: "payload".repeat(50),
            ..Default::default()
        }
    }

    fn header() -> TraceHeader {
        TraceHeader {
            format_version: 1,
            host: "h".into(),
            ..Default::default()
        }
    }

    fn trace_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    #[test]
    fn rotates_by_size_and_keeps_the_total_under_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = RecordOptions::new(dir.path().to_path_buf());
        opts.max_file_bytes = 2_000;
        opts.max_total_bytes = 10_000;
        let mut rec = Recorder::new(opts).unwrap();
        for i in 0..2_000 {
            rec.record(&event(i, u64::from(i)), &header).unwrap();
            if i % 10 == 0 {
                rec.flush().unwrap();
            }
        }
        rec.finish().unwrap();
        let files = trace_files(dir.path());
        assert!(rec.files_written > 5, "{} files written", rec.files_written);
        assert!(rec.files_deleted > 0, "old files deleted");
        let total: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
        // The bound holds up to the file still being written when it was checked.
        assert!(total <= 10_000 + 2_000 + 4_096, "{total} bytes on disk");
        // The newest files are kept, and each reads back on its own.
        let last = files.last().unwrap();
        let mut reader = TraceReader::open(last).unwrap();
        assert!(reader.all(|r| r.is_ok()));
    }

    #[test]
    fn rotates_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = RecordOptions::new(dir.path().to_path_buf());
        opts.max_file_age_ns = 1_000;
        let mut rec = Recorder::new(opts).unwrap();
        for i in 0..10 {
            rec.record(&event(i, u64::from(i) * 600), &header).unwrap();
        }
        rec.finish().unwrap();
        assert_eq!(
            trace_files(dir.path()).len(),
            5,
            "a new file every 1,000 ns of events"
        );
    }

    #[test]
    fn a_file_path_is_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.trace");
        let mut opts = RecordOptions::new(path.clone());
        opts.max_file_bytes = 10;
        let mut rec = Recorder::new(opts).unwrap();
        for i in 0..100 {
            rec.record(&event(i, u64::from(i)), &header).unwrap();
        }
        rec.finish().unwrap();
        assert_eq!(trace_files(dir.path()), std::slice::from_ref(&path));
        assert_eq!(TraceReader::open(&path).unwrap().count(), 100);
    }
}
