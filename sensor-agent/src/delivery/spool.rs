//! The durable spool: every alert (and streamed event) waits here, on disk, until the
//! collector acknowledges it, across collector outages, agent restarts and crashes.
//!
//! Layout: `DIR/state` (acknowledged, next and first sequence numbers, replaced
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
use sensor_proto::v1::{Envelope, Output, SeqRange, Shed, envelope, output};
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

/// `acked`, `next_seq`, `first_seq` and a CRC32 of the three.
const STATE_LEN: usize = 28;

pub struct Spool {
    opts: SpoolOptions,
    next_seq: u64,
    /// The first sequence number this spool assigned (told to the collector in `Hello`).
    first_seq: u64,
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
    /// See [`Spool::take_rewind`].
    rewind: Option<u64>,
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
        let (acked, mut next_seq, first_seq) = match fs::read(&state_path) {
            Ok(bytes) => {
                let word = |i: usize| {
                    u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or_default())
                };
                if bytes.len() != STATE_LEN
                    || crc32fast::hash(&bytes[..24])
                        != u32::from_le_bytes(bytes[24..28].try_into().unwrap_or_default())
                {
                    return Err(SpoolError::State {
                        path: state_path.display().to_string(),
                    });
                }
                (word(0), word(1), word(2))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A new spool numbers from the clock (microseconds), so that an agent whose
                // spool was lost or wiped keeps increasing sequence numbers and the
                // collector's de-duplication never mistakes its new records for old ones.
                let first = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_micros() as u64)
                    .max(1);
                (first - 1, first, first)
            }
            Err(e) => return Err(io_err(&state_path)(e)),
        };
        let mut spool = Self {
            opts,
            next_seq: next_seq.max(1),
            first_seq,
            acked,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            segments: BTreeMap::new(),
            current: None,
            unsynced: false,
            unsynced_alert: false,
            durable: 0,
            rewind: None,
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
                    // A later record of the same number (a Shed record in the place of a
                    // shed one) replaces the earlier.
                    spool.remove(seq);
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
        // Records reported shed are still in their segment files: they stay dropped.
        let shed: Vec<SeqRange> = spool
            .pending
            .values()
            .filter(|p| p.class == Class::Shed)
            .filter_map(|p| match Envelope::decode(&p.bytes[..]).ok()?.body? {
                envelope::Body::Shed(shed) => Some(shed.dropped),
                _ => None,
            })
            .flatten()
            .collect();
        for range in shed {
            let covered: Vec<u64> = spool
                .pending
                .range(range.first..=range.last)
                .filter(|(_, p)| p.class != Class::Shed)
                .map(|(s, _)| *s)
                .collect();
            for seq in covered {
                spool.remove(seq);
            }
        }
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

    pub fn first_seq(&self) -> u64 {
        self.first_seq
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
        if seq > self.durable {
            return Vec::new();
        }
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
        self.make_room(env.encoded_len() as u64 + 2)?;
        env.seq = self.next_seq;
        let seq = self.append(class, env.encode_to_vec(), None)?;
        self.unsynced_alert |= class == Class::Alert;
        Ok(seq)
    }

    /// Writes a record with a new sequence number, or (a Shed record) with `reuse`, the
    /// number of a record it replaces.
    fn append(
        &mut self,
        class: Class,
        bytes: Vec<u8>,
        reuse: Option<u64>,
    ) -> Result<u64, SpoolError> {
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
        let seq = reuse.unwrap_or(self.next_seq);
        if reuse.is_none() {
            self.next_seq += 1;
        }
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
    /// It frees a sixteenth of the bound at once, so that a spool kept full by a long
    /// outage sheds (and scans its records) once per many records, not at every one.
    fn make_room(&mut self, incoming: u64) -> Result<(), SpoolError> {
        if self.pending_bytes + incoming <= self.opts.max_bytes {
            return Ok(());
        }
        let target = self
            .opts
            .max_bytes
            .saturating_sub(self.opts.max_bytes / 16)
            .saturating_sub(incoming);
        let mut dropped: Vec<SeqRange> = Vec::new();
        let (mut events, mut alerts) = (0u64, 0u64);
        for class in [Class::Event, Class::Alert] {
            let victims: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, p)| p.class == class)
                .map(|(s, _)| *s)
                .collect();
            for seq in victims {
                // Room for the Shed record that reports the loss, too.
                let shed_size = 64 + 24 * (dropped.len() as u64 + 1);
                if self.pending_bytes + shed_size <= target {
                    break;
                }
                if let Some(p) = self.remove(seq) {
                    add_to_ranges(&mut dropped, seq);
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
        // The Shed record takes the place of the oldest record it reports, so that it is
        // sent before everything after the loss: the collector can account for the loss
        // before it needs to, whatever its window.
        let seq = dropped[0].first;
        let env = Envelope {
            seq,
            body: Some(envelope::Body::Shed(Shed {
                dropped,
                events,
                alerts,
                reason: format!("spool full ({} bytes)", self.opts.max_bytes),
            })),
        };
        self.append(Class::Shed, env.encode_to_vec(), Some(seq))?;
        self.rewind = Some(self.rewind.map_or(seq, |r| r.min(seq)));
        self.sync()
    }

    /// The lowest sequence number written behind the sender's back since the last call
    /// (a Shed record in the place of a record that may have been sent already).
    pub fn take_rewind(&mut self) -> Option<u64> {
        self.rewind.take()
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
        let mut bytes = Vec::with_capacity(STATE_LEN);
        bytes.extend_from_slice(&self.acked.to_le_bytes());
        bytes.extend_from_slice(&self.next_seq.to_le_bytes());
        bytes.extend_from_slice(&self.first_seq.to_le_bytes());
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

/// Adds `seq` to sorted, disjoint ranges, merging neighbours.
fn add_to_ranges(ranges: &mut Vec<SeqRange>, seq: u64) {
    let at = ranges.partition_point(|r| r.last < seq);
    if ranges.get(at).is_some_and(|r| r.first <= seq) {
        return;
    }
    let joins_prev = at > 0 && ranges[at - 1].last + 1 == seq;
    let joins_next = ranges.get(at).is_some_and(|r| r.first == seq + 1);
    match (joins_prev, joins_next) {
        (true, true) => {
            ranges[at - 1].last = ranges[at].last;
            ranges.remove(at);
        }
        (true, false) => ranges[at - 1].last = seq,
        (false, true) => ranges[at].first = seq,
        (false, false) => ranges.insert(
            at,
            SeqRange {
                first: seq,
                last: seq,
            },
        ),
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
        let base = spool.first_seq() - 1;
        assert!(
            base > 1_700_000_000_000_000,
            "a new spool numbers from the clock"
        );
        for n in 0..10 {
            assert_eq!(spool.push(alert(n)).unwrap(), base + u64::from(n) + 1);
        }
        spool.sync().unwrap();
        spool.ack(base + 4).unwrap();
        drop(spool);

        let mut spool = Spool::open(opts.clone()).unwrap();
        assert_eq!(spool.first_seq(), base + 1);
        assert_eq!(spool.acked(), base + 4);
        assert_eq!(spool.pending(), 6);
        let first = spool.from_seq(0, 100);
        assert_eq!(first[0].0, base + 5);
        assert_eq!(decode(&first[0].1).seq, base + 5);
        assert_eq!(
            spool.push(alert(10)).unwrap(),
            base + 11,
            "sequence numbers are never reused"
        );
        spool.ack(base + 11).unwrap();
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
            base + 11,
            "the counter survives even with nothing pending"
        );
    }

    #[test]
    fn ranges_merge() {
        let mut r = Vec::new();
        for seq in [5, 7, 6, 1, 9, 2, 7] {
            add_to_ranges(&mut r, seq);
        }
        let pairs: Vec<(u64, u64)> = r.iter().map(|r| (r.first, r.last)).collect();
        assert_eq!(pairs, [(1, 2), (5, 7), (9, 9)]);
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
        assert_eq!(spool.durable(), spool.first_seq() + 1);
        assert_eq!(spool.from_seq(0, 10).len(), 2);
        assert!(spool.from_seq(spool.durable() + 1, 10).is_empty());
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
        let mut spool = Spool::open(opts.clone()).unwrap();
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
                    let listed: Vec<u64> =
                        shed.dropped.iter().flat_map(|r| r.first..=r.last).collect();
                    assert_eq!(shed.events, listed.len() as u64);
                    declared.extend(listed);
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
        let present: Vec<u64> = pending
            .iter()
            .filter(|(_, b)| matches!(decode(b).body, Some(envelope::Body::Output(_))))
            .map(|(s, _)| *s)
            .collect();
        for e in &events {
            assert!(
                present.contains(e) != declared.contains(e),
                "event {e} is either pending or declared shed"
            );
        }
        assert_eq!(declared.len() as u64, spool.stats.shed_events);
        // Each Shed record sits at the first number it reports, and the sender is told to
        // look back there.
        for (seq, bytes) in &pending {
            if let Some(envelope::Body::Shed(shed)) = decode(bytes).body {
                assert_eq!(shed.dropped[0].first, *seq);
            }
        }
        assert!(spool.take_rewind().is_some());
        // After a restart the shed records stay shed (their bytes are still in the
        // segment files).
        let before: Vec<u64> = pending.iter().map(|(s, _)| *s).collect();
        drop(spool);
        let spool = Spool::open(opts).unwrap();
        let after: Vec<u64> = spool.from_seq(0, 1000).iter().map(|(s, _)| *s).collect();
        assert_eq!(before, after);
    }
}
