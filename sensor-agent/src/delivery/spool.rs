//! The durable spool: every alert (and streamed event) waits here, on disk, until the
//! collector acknowledges it, across collector outages, agent restarts and crashes.
//!
//! Layout: `DIR/state` (acknowledged sequence number and next sequence number, replaced
//! atomically) and `DIR/segment-<n>` files of records `[u32 length][u32 crc32][Envelope]`.
//! A segment is deleted once nothing in it is pending.
//!
//! fsync policy: nothing is handed to the sender before it is on disk (`fdatasync`). The
//! agent syncs after every batch of kernel records that raised an alert (group commit:
//! one `fdatasync` covers the batch), and otherwise once a second, so a crash loses at most
//! the last second of streamed events and never an alert that was sent or acknowledged.
//! The state file (acknowledged and next sequence numbers) is replaced atomically
//! (write, `fdatasync`, rename, directory `fsync`).
//!
//! Bound: the pending records' bytes stay under `max_bytes`. To make room the spool sheds
//! the oldest pending events first, then (only when nothing but alerts is left) the oldest
//! alerts, and queues a `Shed` record listing every sequence number it dropped.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use prost::Message;
use sensor_proto::v1::{Envelope, Output, Shed, envelope, output};
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("spool {path}: the state file is corrupt; move the directory away to start afresh")]
    State { path: String },
}

#[derive(Clone, Debug)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    /// Bound on the bytes of pending records.
    pub max_bytes: u64,
    /// A new segment file starts past this size.
    pub segment_bytes: u64,
}

impl SpoolOptions {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            max_bytes: 256 * 1024 * 1024,
            segment_bytes: 4 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Alert,
    Event,
    /// A Shed record: never shed itself.
    Shed,
}

#[derive(Clone, Debug)]
struct Pending {
    class: Class,
    bytes: Arc<[u8]>,
    segment: u64,
}

/// Counters for heartbeats and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub appended: u64,
    pub shed_events: u64,
    pub shed_alerts: u64,
    pub acked: u64,
}

pub struct Spool {
    opts: SpoolOptions,
    next_seq: u64,
    acked: u64,
    pending: BTreeMap<u64, Pending>,
    pending_bytes: u64,
    /// segment id -> records still pending in it.
    segments: BTreeMap<u64, u64>,
    current: Option<(u64, File, u64)>,
    unsynced: bool,
    /// An alert was appended since the last sync.
    unsynced_alert: bool,
    /// Every record up to this one is on disk: what the sender may send.
    durable: u64,
    pub stats: SpoolStats,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn segment_id(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("segment-")?
        .parse()
        .ok()
}

impl Spool {
    /// Opens (or creates) the spool in `opts.dir` and recovers what a previous run left.
    pub fn open(opts: SpoolOptions) -> Result<Self, SpoolError> {
        fs::create_dir_all(&opts.dir).map_err(io_err(&opts.dir))?;
        let state_path = opts.dir.join("state");
        let (acked, mut next_seq) = match fs::read(&state_path) {
            Ok(bytes) => {
                if bytes.len() != 20
                    || crc32fast::hash(&bytes[..16])
                        != u32::from_le_bytes(bytes[16..20].try_into().unwrap_or_default())
                {
                    return Err(SpoolError::State {
                        path: state_path.display().to_string(),
                    });
                }
                let acked = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
                let next = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
                (acked, next)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (0, 1),
            Err(e) => return Err(io_err(&state_path)(e)),
        };
        let mut spool = Self {
            opts,
            next_seq: next_seq.max(1),
            acked,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            segments: BTreeMap::new(),
            current: None,
            unsynced: false,
            unsynced_alert: false,
            durable: 0,
            stats: SpoolStats::default(),
        };
        let mut files: Vec<(u64, PathBuf)> = fs::read_dir(&spool.opts.dir)
            .map_err(io_err(&spool.opts.dir))?
            .filter_map(Result::ok)
            .filter_map(|e| segment_id(&e.path()).map(|id| (id, e.path())))
            .collect();
        files.sort();
        for (id, path) in &files {
            for (seq, bytes) in spool.recover_segment(path)? {
                next_seq = next_seq.max(seq + 1);
                if seq > spool.acked {
                    let class = classify(&bytes);
                    spool.pending_bytes += bytes.len() as u64;
                    *spool.segments.entry(*id).or_default() += 1;
                    spool.pending.insert(
                        seq,
                        Pending {
                            class,
                            bytes: bytes.into(),
                            segment: *id,
                        },
                    );
                }
            }
            spool.segments.entry(*id).or_default();
        }
        spool.next_seq = spool.next_seq.max(next_seq);
        spool.durable = spool.last_seq();
        // Segments with nothing pending can go.
        let empty: Vec<u64> = spool
            .segments
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in empty {
            spool.delete_segment(id);
        }
        Ok(spool)
    }

    /// Reads a segment's records, truncating a torn tail (a crash mid-write).
    fn recover_segment(&self, path: &Path) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let mut data = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(io_err(path))?;
        let mut out = Vec::new();
        let mut at = 0usize;
        while at + 8 <= data.len() {
            let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap_or_default()) as usize;
            let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap_or_default());
            let Some(payload) = data.get(at + 8..at + 8 + len) else {
                break;
            };
            if crc32fast::hash(payload) != crc {
                break;
            }
            match Envelope::decode(payload) {
                Ok(env) => out.push((env.seq, payload.to_vec())),
                Err(_) => break,
            }
            at += 8 + len;
        }
        if at < data.len() {
            warn!(segment = %path.display(), kept = at, dropped = data.len() - at, "spool segment had a torn tail; truncated");
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(at as u64))
                .map_err(io_err(path))?;
        }
        Ok(out)
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The highest sequence number assigned so far.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Every record up to this sequence number is on disk.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// An alert waits for a sync before it can be sent.
    pub fn alert_unsynced(&self) -> bool {
        self.unsynced_alert
    }

    /// Durable pending records from `seq` on, in order, as encoded Envelopes.
    pub fn from_seq(&self, seq: u64, limit: usize) -> Vec<(u64, Arc<[u8]>)> {
        self.pending
            .range(seq..=self.durable)
            .take(limit)
            .map(|(s, p)| (*s, Arc::clone(&p.bytes)))
            .collect()
    }

    /// Adds an alert or event; it becomes sendable at the next [`Spool::sync`].
    pub fn push(&mut self, output: Output) -> Result<u64, SpoolError> {
        let class = match &output.item {
            Some(output::Item::Alert(_)) => Class::Alert,
            _ => Class::Event,
        };
        let mut env = Envelope {
            seq: self.next_seq,
            body: Some(envelope::Body::Output(output)),
        };
        // Shedding may queue a Shed record first, which takes a sequence number: encode
        // with the number this record really gets.
        self.make_room(env.encoded_len() as u64 + 2)?;
        env.seq = self.next_seq;
        let seq = self.append(class, env.encode_to_vec())?;
        self.unsynced_alert |= class == Class::Alert;
        Ok(seq)
    }

    fn append(&mut self, class: Class, bytes: Vec<u8>) -> Result<u64, SpoolError> {
        let needs_new = self
            .current
            .as_ref()
            .is_none_or(|(_, _, size)| *size >= self.opts.segment_bytes);
        if needs_new {
            self.sync()?;
            let id = self.segments.keys().next_back().map_or(1, |last| last + 1);
            let path = self.opts.dir.join(format!("segment-{id:010}"));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            self.segments.entry(id).or_default();
            self.current = Some((id, file, 0));
            self.persist_state()?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let Some((id, file, size)) = self.current.as_mut() else {
            unreachable!("a segment was just opened");
        };
        let mut record = Vec::with_capacity(8 + bytes.len());
        record.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
        record.extend_from_slice(&bytes);
        let path = self.opts.dir.join(format!("segment-{id:010}"));
        file.write_all(&record).map_err(io_err(&path))?;
        *size += record.len() as u64;
        let id = *id;
        *self.segments.entry(id).or_default() += 1;
        self.pending_bytes += bytes.len() as u64;
        self.pending.insert(
            seq,
            Pending {
                class,
                bytes: bytes.into(),
                segment: id,
            },
        );
        self.unsynced = true;
        self.stats.appended += 1;
        Ok(seq)
    }

    /// Sheds pending records until `incoming` more bytes fit: events first, oldest first.
    fn make_room(&mut self, incoming: u64) -> Result<(), SpoolError> {
        if self.pending_bytes + incoming <= self.opts.max_bytes {
            return Ok(());
        }
        let mut dropped = Vec::new();
        let (mut events, mut alerts) = (0u64, 0u64);
        for class in [Class::Event, Class::Alert] {
            let victims: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, p)| p.class == class)
                .map(|(s, _)| *s)
                .collect();
            for seq in victims {
                // Room for the record and for the Shed record that reports the loss.
                let shed_size = 64 + 10 * (dropped.len() as u64 + 1);
                if self.pending_bytes + incoming + shed_size <= self.opts.max_bytes {
                    break;
                }
                if let Some(p) = self.remove(seq) {
                    dropped.push(seq);
                    match p.class {
                        Class::Event => events += 1,
                        _ => alerts += 1,
                    }
                }
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
        self.stats.shed_events += events;
        self.stats.shed_alerts += alerts;
        warn!(events, alerts, "spool full: shed the oldest unsent records");
        let seq = self.next_seq;
        let env = Envelope {
            seq,
            body: Some(envelope::Body::Shed(Shed {
                dropped,
                events,
                alerts,
                reason: format!("spool full ({} bytes)", self.opts.max_bytes),
            })),
        };
        self.append(Class::Shed, env.encode_to_vec())?;
        self.sync()
    }

    fn remove(&mut self, seq: u64) -> Option<Pending> {
        let p = self.pending.remove(&seq)?;
        self.pending_bytes -= p.bytes.len() as u64;
        if let Some(n) = self.segments.get_mut(&p.segment) {
            *n = n.saturating_sub(1);
        }
        Some(p)
    }

    /// Puts what was appended on disk and makes it sendable.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if self.unsynced {
            if let Some((id, file, _)) = &self.current {
                file.sync_data()
                    .map_err(io_err(&self.opts.dir.join(format!("segment-{id:010}"))))?;
            }
            self.unsynced = false;
            self.unsynced_alert = false;
        }
        self.durable = self.last_seq();
        Ok(())
    }

    /// The collector stored everything up to `seq`.
    pub fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        if seq <= self.acked {
            return Ok(());
        }
        let seq = seq.min(self.last_seq());
        let done: Vec<u64> = self.pending.range(..=seq).map(|(s, _)| *s).collect();
        for s in done {
            self.remove(s);
            self.stats.acked += 1;
        }
        self.acked = seq;
        self.persist_state()?;
        let current = self.current.as_ref().map(|(id, ..)| *id);
        let empty: Vec<u64> = self
            .segments
            .iter()
            .filter(|(id, n)| **n == 0 && Some(**id) != current)
            .map(|(id, _)| *id)
            .collect();
        for id in empty {
            self.delete_segment(id);
        }
        Ok(())
    }

    fn delete_segment(&mut self, id: u64) {
        self.segments.remove(&id);
        let path = self.opts.dir.join(format!("segment-{id:010}"));
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(segment = %path.display(), error = %e, "cannot delete an acknowledged spool segment");
        }
    }

    /// Writes the acknowledged and next sequence numbers, atomically.
    fn persist_state(&self) -> Result<(), SpoolError> {
        let path = self.opts.dir.join("state");
        let tmp = self.opts.dir.join("state.tmp");
        let mut bytes = Vec::with_capacity(20);
        bytes.extend_from_slice(&self.acked.to_le_bytes());
        bytes.extend_from_slice(&self.next_seq.to_le_bytes());
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        (|| -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.opts.dir)?.sync_all()
        })()
        .map_err(io_err(&path))
    }
}

fn classify(bytes: &[u8]) -> Class {
    match Envelope::decode(bytes).ok().and_then(|e| e.body) {
        Some(envelope::Body::Shed(_)) => Class::Shed,
        Some(envelope::Body::Output(Output {
            item: Some(output::Item::Alert(_)),
        })) => Class::Alert,
        _ => Class::Event,
    }
}

#[cfg(test)]
mod tests {
    use sensor_proto::v1::{Alert, Event};

    use super::*;

    fn alert(n: u32) -> Output {
        Output {
            item: Some(output::Item::Alert(Alert {
                rule_id: format!("R{n}"),
                ..Default::default()
            })),
        }
    }

    fn event(n: u32) -> Output {
        Output {
            item: Some(output::Item::Event(Event {
                pid: n,
                comm: "e".repeat(100),
                ..Default::default()
            })),
        }
    }

    fn decode(bytes: &[u8]) -> Envelope {
        Envelope::decode(bytes).unwrap()
    }

    #[test]
    fn pending_records_survive_a_restart_and_acks_free_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = SpoolOptions::new(dir.path().to_path_buf());
        opts.segment_bytes = 300;
        let mut spool = Spool::open(opts.clone()).unwrap();
        for n in 0..10 {
            assert_eq!(spool.push(alert(n)).unwrap(), u64::from(n) + 1);
        }
        spool.sync().unwrap();
        spool.ack(4).unwrap();
        drop(spool);

        let mut spool = Spool::open(opts.clone()).unwrap();
        assert_eq!(spool.acked(), 4);
        assert_eq!(spool.pending(), 6);
        let first = spool.from_seq(0, 100);
        assert_eq!(first[0].0, 5);
        assert_eq!(decode(&first[0].1).seq, 5);
        assert_eq!(
            spool.push(alert(10)).unwrap(),
            11,
            "sequence numbers are never reused"
        );
        spool.ack(11).unwrap();
        assert_eq!(spool.pending(), 0);
        let segments = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("segment-")
            })
            .count();
        assert!(
            segments <= 1,
            "acknowledged segments are deleted ({segments} left)"
        );
        drop(spool);
        let spool = Spool::open(opts).unwrap();
        assert_eq!(
            spool.last_seq(),
            11,
            "the counter survives even with nothing pending"
        );
    }

    #[test]
    fn nothing_is_sendable_before_it_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(SpoolOptions::new(dir.path().to_path_buf())).unwrap();
        spool.push(event(1)).unwrap();
        assert!(!spool.alert_unsynced());
        spool.push(alert(2)).unwrap();
        assert!(spool.alert_unsynced());
        assert!(spool.from_seq(0, 10).is_empty());
        spool.sync().unwrap();
        assert!(!spool.alert_unsynced());
        assert_eq!(spool.durable(), 2);
        assert_eq!(spool.from_seq(0, 10).len(), 2);
    }

    #[test]
    fn a_torn_tail_is_truncated_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions::new(dir.path().to_path_buf());
        let mut spool = Spool::open(opts.clone()).unwrap();
        for n in 0..3 {
            spool.push(alert(n)).unwrap();
        }
        spool.sync().unwrap();
        drop(spool);
        let segment = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().contains("segment-"))
            .unwrap();
        let mut f = OpenOptions::new().append(true).open(&segment).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        let spool = Spool::open(opts).unwrap();
        assert_eq!(spool.pending(), 3);
    }

    #[test]
    fn a_full_spool_sheds_events_before_alerts_and_says_exactly_which() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = SpoolOptions::new(dir.path().to_path_buf());
        opts.max_bytes = 3_000;
        let mut spool = Spool::open(opts).unwrap();
        let mut alerts = Vec::new();
        let mut events = Vec::new();
        for n in 0..40 {
            if n % 4 == 0 {
                alerts.push(spool.push(alert(n)).unwrap());
            } else {
                events.push(spool.push(event(n)).unwrap());
            }
        }
        assert!(spool.pending_bytes() <= 3_000);
        spool.sync().unwrap();
        assert!(spool.stats.shed_events > 0);
        assert_eq!(spool.stats.shed_alerts, 0, "events go first");
        // Every alert is still pending; the Shed records list exactly the events dropped.
        let pending = spool.from_seq(0, 1000);
        let mut declared = Vec::new();
        for (seq, bytes) in &pending {
            match decode(bytes).body {
                Some(envelope::Body::Shed(shed)) => {
                    assert_eq!(shed.alerts, 0);
                    assert_eq!(shed.events, shed.dropped.len() as u64);
                    declared.extend(shed.dropped);
                }
                Some(envelope::Body::Output(_)) => {
                    assert!(alerts.contains(seq) || events.contains(seq))
                }
                None => panic!(),
            }
        }
        for a in &alerts {
            assert!(pending.iter().any(|(s, _)| s == a), "alert {a} kept");
        }
        let present: Vec<u64> = pending.iter().map(|(s, _)| *s).collect();
        for e in &events {
            assert!(
                present.contains(e) != declared.contains(e),
                "event {e} is either pending or declared shed"
            );
        }
        assert_eq!(declared.len() as u64, spool.stats.shed_events);
    }
}
