//! The durable spool: every alert (and streamed event) waits here, on disk, until the
//! collector acknowledges it, across collector outages, agent restarts and crashes.
//!
//! Layout: `DIR/state` (acknowledged sequence number, reserved numbers, first number;
//! replaced atomically) and `DIR/segment-<n>` files: a header, then records
//! `[magic][u32 length][u32 crc32][Envelope]`. A segment is deleted once nothing in it is
//! pending. Files the spool did not write are left alone.
//!
//! fsync policy: nothing is handed to the sender before it is on disk (`fdatasync`). The
//! agent syncs after every batch of kernel records that raised an alert (group commit:
//! one `fdatasync` covers the batch), and otherwise once a second, so a crash loses at most
//! the last second of streamed events and never an alert that was sent or acknowledged.
//!
//! Bound: the pending records' bytes stay under `max_bytes`. To make room the spool sheds
//! the oldest pending events first, then (only when nothing but alerts is left) the oldest
//! alerts, and queues a `Shed` record listing every sequence number it dropped.
//!
//! Faults degrade it, never stop it (docs/delivery.md states the guarantees):
//! - a record that cannot be written (disk full, I/O error) is rolled back, takes no
//!   sequence number, and is counted; once a write succeeds again, a `Shed` record numbers
//!   and declares the loss, and the agent raises SELF-SHED. The count is kept on disk too,
//!   in `DIR/unwritten`, a block allocated when the spool opens and rewritten in place (a
//!   full disk still takes it), so an agent restarted before the disk recovers declares
//!   the losses of the run before;
//! - numbers are never reused: the state reserves them ahead ([`RESERVE`]) and a restart
//!   continues after the reservation, declaring what was reserved and not used;
//! - a damaged record is skipped (each record carries a magic and a checksum, so reading
//!   resumes at the next good one), and the numbers it may have held are declared lost;
//! - a missing or damaged state is rebuilt from the segments: everything they hold is
//!   pending again (the collector drops what it already has), numbering jumps to the
//!   clock, and the jump is declared unused;
//! - an acknowledgement frees segments even when the state cannot be written.

use std::{
    collections::{BTreeMap, BTreeSet},
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
            max_bytes: crate::config::CollectorSection::default().spool_max_mib
                * crate::config::MIB,
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
    /// Events and alerts declared lost: shed to stay in the bound, not writable, or
    /// damaged on disk.
    pub shed_events: u64,
    pub shed_alerts: u64,
    pub acked: u64,
    /// Writes that failed (each a record rolled back and counted as lost).
    pub write_errors: u64,
}

/// Sequence numbers the state reserves ahead of the last one handed out: a restart
/// continues after the reservation, so a number that reached the collector is never
/// handed out again, whatever happened to the segment that held it.
pub const RESERVE: u64 = 4096;

/// `acked`, `reserved`, `first_seq` and a CRC32 of the three.
const STATE_LEN: usize = 28;

/// The first bytes of every segment this spool writes.
const SEGMENT_HEADER: &[u8; 16] = b"SENSOR-SPOOL-v2\n";
/// The first bytes of every record, where reading resumes after damage.
const RECORD_MAGIC: &[u8; 4] = b"SREC";
/// Largest record accepted when reading (the collector's message limit).
const MAX_RECORD: usize = 4 * 1024 * 1024;

/// The ledger of records not written and not declared yet (`DIR/unwritten`).
const LEDGER: &str = "unwritten";
const LEDGER_MAGIC: &[u8; 16] = b"SENSOR-UNWRIT-1\n";
/// Allocated whole when the spool opens, so that rewriting it needs no new block.
const LEDGER_LEN: usize = 4096;
/// The reason kept with the counts.
const LEDGER_REASON: usize = 512;

/// Encodes the ledger: magic, events, alerts, reason length, reason, CRC32 of all before.
fn encode_ledger(u: &Unwritten) -> Vec<u8> {
    let mut reason = u.error.as_bytes();
    if reason.len() > LEDGER_REASON {
        let mut end = LEDGER_REASON;
        while !u.error.is_char_boundary(end) {
            end -= 1;
        }
        reason = &reason[..end];
    }
    let mut out = Vec::with_capacity(LEDGER_LEN);
    out.extend_from_slice(LEDGER_MAGIC);
    out.extend_from_slice(&u.events.to_le_bytes());
    out.extend_from_slice(&u.alerts.to_le_bytes());
    out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    out.extend_from_slice(reason);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.resize(LEDGER_LEN, 0);
    out
}

/// The counts a ledger holds, or None when it holds none or is not one.
fn decode_ledger(data: &[u8]) -> Option<Unwritten> {
    let head = data.get(..34)?;
    if &head[..16] != LEDGER_MAGIC {
        return None;
    }
    let word = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().unwrap_or_default());
    let (events, alerts) = (word(16), word(24));
    let len = usize::from(u16::from_le_bytes([head[32], head[33]]));
    let reason = data.get(34..34 + len)?;
    let crc = data.get(34 + len..38 + len)?;
    if crc32fast::hash(&data[..34 + len]).to_le_bytes() != crc {
        return None;
    }
    Some(Unwritten {
        events,
        alerts,
        error: String::from_utf8_lossy(reason).into_owned(),
    })
}

/// Records that could not be written, waiting to be numbered and declared.
#[derive(Clone, Debug, Default)]
struct Unwritten {
    events: u64,
    alerts: u64,
    /// The last error, for the declaration's reason.
    error: String,
}

pub struct Spool {
    opts: SpoolOptions,
    next_seq: u64,
    /// Numbers below this one may have been handed out (persisted in the state).
    reserved: u64,
    /// The first sequence number this spool assigned (told to the collector in `Hello`).
    first_seq: u64,
    acked: u64,
    pending: BTreeMap<u64, Pending>,
    pending_bytes: u64,
    /// segment id -> records still pending in it.
    segments: BTreeMap<u64, u64>,
    /// Ids of files named like segments that this spool did not write: never touched,
    /// never reused.
    foreign: BTreeSet<u64>,
    current: Option<(u64, File, u64)>,
    unsynced: bool,
    /// An alert was appended since the last sync.
    unsynced_alert: bool,
    /// Every record up to this one is on disk: what the sender may send.
    durable: u64,
    /// See [`Spool::take_rewind`].
    rewind: Option<u64>,
    /// The declaration of what recovery at open lost or left unused, when the disk did not
    /// take it then: (its number, the encoded record, records declared lost).
    recovery: Option<(u64, Vec<u8>, u64)>,
    unwritten: Unwritten,
    /// A declaration of unwritten records is being written.
    declaring: bool,
    /// `DIR/unwritten`, when it could be allocated.
    ledger: Option<File>,
    /// The ledger was rewritten since the last sync.
    ledger_dirty: bool,
    /// The ledger is cleared at the next sync, once the declaration is on disk.
    ledger_clear: bool,
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

/// What reading one segment found.
#[derive(Default)]
struct Scan {
    records: Vec<(u64, Vec<u8>)>,
    /// Damaged stretches: (last good number before, first good number after, bytes).
    /// `None` before: at the start of the segment; `None` after: at its end.
    damage: Vec<(Option<u64>, Option<u64>, usize)>,
    /// Valid length of the file (up to the end of the last good record).
    valid: usize,
}

/// How a file named like a segment reads.
enum SegmentFile {
    Ours(Scan),
    /// Written by the previous record format (no header, no magic).
    Legacy(Scan),
    Foreign,
}

/// The time in microseconds: where a spool with no trustworthy numbering starts, beyond
/// any number an earlier spool of this agent handed out.
fn clock_seq() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64)
        .max(1)
}

/// The state file: `(acked, reserved, first_seq)`, or None when it is missing or damaged.
fn read_state(path: &Path) -> Result<Option<(u64, u64, u64)>, SpoolError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            warn!(state = %path.display(), error = %e, "cannot read the spool state; rebuilding it from the segments");
            return Ok(None);
        }
    };
    let word =
        |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    if bytes.len() != STATE_LEN
        || crc32fast::hash(&bytes[..24])
            != u32::from_le_bytes(bytes[24..28].try_into().unwrap_or_default())
    {
        warn!(state = %path.display(), bytes = bytes.len(), "the spool state is damaged; rebuilding it from the segments");
        return Ok(None);
    }
    Ok(Some((word(0), word(1), word(2))))
}

/// Reads the records of a segment written with [`SEGMENT_HEADER`], resuming after damage
/// at the next record whose magic, length and checksum are right.
fn scan_v2(data: &[u8]) -> Scan {
    let mut scan = Scan {
        valid: SEGMENT_HEADER.len(),
        ..Scan::default()
    };
    let mut at = SEGMENT_HEADER.len();
    let mut damaged_from: Option<usize> = None;
    while at < data.len() {
        match record_at(data, at) {
            Some((seq, payload, end)) => {
                if let Some(from) = damaged_from.take() {
                    let before = scan.records.last().map(|(s, _)| *s);
                    scan.damage.push((before, Some(seq), at - from));
                }
                scan.records.push((seq, payload.to_vec()));
                scan.valid = end;
                at = end;
            }
            None => {
                damaged_from.get_or_insert(at);
                // The next candidate record.
                at = match data[at + 1..]
                    .windows(RECORD_MAGIC.len())
                    .position(|w| w == RECORD_MAGIC)
                {
                    Some(i) => at + 1 + i,
                    None => data.len(),
                };
            }
        }
    }
    if let Some(from) = damaged_from {
        let before = scan.records.last().map(|(s, _)| *s);
        scan.damage.push((before, None, data.len() - from));
    }
    scan
}

/// The record at `at`: (number, payload, end), when magic, length and checksum hold and it
/// decodes.
fn record_at(data: &[u8], at: usize) -> Option<(u64, &[u8], usize)> {
    let head = data.get(at..at + 12)?;
    if &head[..4] != RECORD_MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(head[4..8].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[8..12].try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let payload = data.get(at + 12..at + 12 + len)?;
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let env = Envelope::decode(payload).ok()?;
    Some((env.seq, payload, at + 12 + len))
}

/// Reads a segment of the previous format (`[u32 length][u32 crc32][Envelope]`, no
/// header); it has no magic to resume at, so reading stops at the first bad record.
fn scan_v1(data: &[u8]) -> Scan {
    let mut scan = Scan::default();
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
        let Ok(env) = Envelope::decode(payload) else {
            break;
        };
        scan.records.push((env.seq, payload.to_vec()));
        at += 8 + len;
    }
    scan.valid = at;
    if at < data.len() {
        let before = scan.records.last().map(|(s, _)| *s);
        scan.damage.push((before, None, data.len() - at));
    }
    scan
}

fn read_segment(data: &[u8]) -> SegmentFile {
    if data.starts_with(SEGMENT_HEADER) {
        return SegmentFile::Ours(scan_v2(data));
    }
    let legacy = scan_v1(data);
    if legacy.records.is_empty() {
        SegmentFile::Foreign
    } else {
        SegmentFile::Legacy(legacy)
    }
}

impl Spool {
    /// Opens (or creates) the spool in `opts.dir` and recovers what a previous run left.
    /// Damage in the files costs records (declared), never the start.
    pub fn open(opts: SpoolOptions) -> Result<Self, SpoolError> {
        fs::create_dir_all(&opts.dir).map_err(io_err(&opts.dir))?;
        let state = read_state(&opts.dir.join("state"))?;
        let mut spool = Self {
            opts,
            next_seq: 1,
            reserved: 1,
            first_seq: 0,
            acked: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            segments: BTreeMap::new(),
            foreign: BTreeSet::new(),
            current: None,
            unsynced: false,
            unsynced_alert: false,
            durable: 0,
            rewind: None,
            recovery: None,
            unwritten: Unwritten::default(),
            declaring: false,
            ledger: None,
            ledger_dirty: false,
            ledger_clear: false,
            stats: SpoolStats::default(),
        };
        let scans = spool.read_segments()?;
        let numbers = || {
            scans
                .iter()
                .flat_map(|(_, scan)| scan.records.iter().map(|(s, _)| *s))
        };
        let recovered_max = numbers().max();
        // Where numbering continues: past every number an earlier run may have handed out.
        let (acked, first_seq, restart_at) = match (state, recovered_max) {
            (Some((acked, reserved, first)), _) => (
                acked,
                first,
                reserved.max(recovered_max.map_or(0, |m| m + 1)),
            ),
            (None, None) => {
                // A new spool numbers from the clock, so that an agent whose spool was
                // lost or wiped keeps increasing numbers and the collector's
                // de-duplication never mistakes its new records for old ones.
                let first = clock_seq();
                (first - 1, first, first)
            }
            (None, Some(max)) => {
                // The state is gone but records are here: every one is pending again (the
                // collector drops those it has), and numbering jumps to the clock.
                let first = numbers().min().unwrap_or(max);
                warn!(
                    records = numbers().count(),
                    "spool state rebuilt from the segments: every record in them is pending again (the collector drops what it already stored)"
                );
                (first - 1, first, clock_seq().max(max + 1))
            }
        };
        spool.acked = acked;
        spool.first_seq = first_seq;
        for (id, scan) in &scans {
            spool.segments.entry(*id).or_default();
            for (seq, bytes) in &scan.records {
                if *seq > spool.acked {
                    // A later record of the same number (a Shed record in the place of a
                    // shed one) replaces the earlier.
                    spool.remove(*seq);
                    spool.insert(*seq, classify(bytes), bytes.clone().into(), *id);
                }
            }
        }
        spool.drop_shed_records();

        // What recovery cost: the numbers damaged records may have held (between the good
        // records around them; after the last good one, up to what was reserved), and the
        // numbers reserved but never used, which the collector must not wait for.
        let last_good = recovered_max.unwrap_or(acked).max(acked);
        let mut lost: Vec<SeqRange> = Vec::new();
        for (id, scan) in &scans {
            for (before, after, bytes) in &scan.damage {
                let from = before.map_or(acked, |b| b.max(acked)) + 1;
                let to = match after {
                    Some(a) => a.saturating_sub(1),
                    None => restart_at.saturating_sub(1).min(last_good + RESERVE),
                };
                warn!(
                    segment = id,
                    bytes,
                    from,
                    to,
                    "spool records damaged on disk: skipped; the numbers they may have held are declared lost"
                );
                if from <= to {
                    add_range(&mut lost, from, to);
                }
            }
        }
        let lost = subtract_present(&lost, &spool.pending);
        let used = lost
            .iter()
            .map(|r| r.last)
            .max()
            .unwrap_or(0)
            .max(last_good);
        let mut unused = Vec::new();
        if used + 1 < restart_at {
            add_range(&mut unused, used + 1, restart_at - 1);
        }
        spool.next_seq = restart_at.max(1);
        spool.reserved = spool.next_seq;
        spool.declare_recovery(lost, unused);
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
        if let Err(e) = spool.reserve(spool.next_seq) {
            warn!(error = %e, "cannot write the spool state; records wait until it can be written");
        }
        spool.open_ledger();
        Ok(spool)
    }

    /// Takes over the counts a previous run could not declare, and makes sure the ledger
    /// is allocated for this one.
    fn open_ledger(&mut self) {
        use std::os::unix::fs::FileExt;
        let path = self.opts.dir.join(LEDGER);
        let old = fs::read(&path).ok();
        if let Some(before) = old.as_deref().and_then(decode_ledger)
            && before.events + before.alerts > 0
        {
            warn!(
                events = before.events,
                alerts = before.alerts,
                "records the previous run could not write are declared lost at the next write"
            );
            self.unwritten.events += before.events;
            self.unwritten.alerts += before.alerts;
            self.unwritten.error = before.error;
        }
        let allocated = old.as_ref().is_some_and(|d| d.len() == LEDGER_LEN);
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .and_then(|f| {
                f.write_all_at(&encode_ledger(&self.unwritten), 0)?;
                if !allocated {
                    f.sync_all()?;
                    File::open(&self.opts.dir)?.sync_all()?;
                }
                Ok(f)
            });
        match opened {
            Ok(f) => self.ledger = Some(f),
            Err(e) => warn!(
                ledger = %path.display(),
                error = %e,
                "cannot allocate the spool's ledger of unwritten records: a restart while the disk refuses writes forgets their count"
            ),
        }
    }

    /// Rewrites the ledger in place with the current count.
    fn write_ledger(&mut self) {
        use std::os::unix::fs::FileExt;
        if let Some(f) = &self.ledger {
            if let Err(e) = f.write_all_at(&encode_ledger(&self.unwritten), 0) {
                warn!(error = %e, "cannot update the spool's ledger of unwritten records: counting in memory only");
                self.ledger = None;
                return;
            }
            self.ledger_dirty = true;
        }
    }

    /// Reads every file named like a segment: ours (both formats) are returned with what
    /// they hold; others are left alone and logged once.
    fn read_segments(&mut self) -> Result<Vec<(u64, Scan)>, SpoolError> {
        let mut found: Vec<(u64, PathBuf)> = fs::read_dir(&self.opts.dir)
            .map_err(io_err(&self.opts.dir))?
            .filter_map(Result::ok)
            .filter_map(|e| segment_id(&e.path()).map(|id| (id, e.path())))
            .collect();
        found.sort();
        let mut scans = Vec::new();
        for (id, path) in found {
            // Not a regular file (a directory, a socket, a link): not ours.
            let regular = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
            let data = if regular {
                let mut data = Vec::new();
                File::open(&path)
                    .and_then(|mut f| f.read_to_end(&mut data))
                    .map_err(io_err(&path))?;
                Some(data)
            } else {
                None
            };
            let read = match &data {
                // Created, then the agent stopped before the header: ours, empty.
                Some(d) if d.is_empty() => SegmentFile::Ours(Scan::default()),
                Some(d) => read_segment(d),
                None => SegmentFile::Foreign,
            };
            match read {
                SegmentFile::Ours(scan) | SegmentFile::Legacy(scan) => scans.push((id, scan)),
                SegmentFile::Foreign => {
                    warn!(file = %path.display(), "a file named like a spool segment that the spool did not write: left alone");
                    self.foreign.insert(id);
                }
            }
        }
        Ok(scans)
    }

    /// Records reported shed are still in their segment files: they stay dropped.
    fn drop_shed_records(&mut self) {
        let shed: Vec<SeqRange> = self
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
            let covered: Vec<u64> = self
                .pending
                .range(range.first..=range.last)
                .filter(|(_, p)| p.class != Class::Shed)
                .map(|(s, _)| *s)
                .collect();
            for seq in covered {
                self.remove(seq);
            }
        }
    }

    /// Queues the Shed record that tells the collector what recovery could not keep. It
    /// takes the first number it declares (which no record holds), like every Shed record.
    fn declare_recovery(&mut self, lost: Vec<SeqRange>, unused: Vec<SeqRange>) {
        let Some(seq) = lost.iter().chain(&unused).map(|r| r.first).min() else {
            return;
        };
        let count: u64 = lost.iter().map(|r| r.last - r.first + 1).sum();
        let reason = if count > 0 {
            "spool records damaged on disk"
        } else {
            "numbers reserved by an earlier run and not used"
        };
        let env = Envelope {
            seq,
            body: Some(envelope::Body::Shed(Shed {
                dropped: lost,
                // Which of them were alerts cannot be known: counted as events.
                events: count,
                alerts: 0,
                reason: reason.to_owned(),
                unused,
            })),
        };
        let bytes = env.encode_to_vec();
        match self.append(Class::Shed, bytes.clone(), Some(seq)) {
            Ok(_) => self.stats.shed_events += count,
            Err(e) => {
                warn!(error = %e, "cannot write the record declaring what the spool's recovery lost: written at the first write the disk takes");
                self.recovery = Some((seq, bytes, count));
            }
        }
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

    /// Adds an alert or event; it becomes sendable at the next [`Spool::sync`]. A record
    /// that cannot be written is counted, takes no number, and is declared lost once the
    /// spool can write again.
    pub fn push(&mut self, output: Output) -> Result<u64, SpoolError> {
        let class = match &output.item {
            Some(output::Item::Alert(_)) => Class::Alert,
            _ => Class::Event,
        };
        let result = self.declare_unwritten().and_then(|()| {
            let mut env = Envelope {
                seq: self.next_seq,
                body: Some(envelope::Body::Output(output)),
            };
            self.make_room(env.encoded_len() as u64 + 2)?;
            env.seq = self.next_seq;
            self.append(class, env.encode_to_vec(), None)
        });
        match result {
            Ok(seq) => {
                self.unsynced_alert |= class == Class::Alert;
                Ok(seq)
            }
            Err(e) => {
                self.stats.write_errors += 1;
                match class {
                    Class::Alert => self.unwritten.alerts += 1,
                    _ => self.unwritten.events += 1,
                }
                self.unwritten.error = e.to_string();
                self.ledger_clear = false;
                self.write_ledger();
                Err(e)
            }
        }
    }

    /// Numbers and writes the Shed record for records that could not be written, once a
    /// write succeeds again.
    fn declare_unwritten(&mut self) -> Result<(), SpoolError> {
        // Writing the declaration may open a segment, which syncs, which declares: once.
        if self.declaring {
            return Ok(());
        }
        self.declaring = true;
        let result = self.write_unwritten();
        self.declaring = false;
        result
    }

    fn write_unwritten(&mut self) -> Result<(), SpoolError> {
        if let Some((seq, bytes, count)) = self.recovery.take() {
            if let Err(e) = self.append(Class::Shed, bytes.clone(), Some(seq)) {
                self.recovery = Some((seq, bytes, count));
                return Err(e);
            }
            self.stats.shed_events += count;
            // Below numbers the sender may have passed.
            self.rewind = Some(self.rewind.map_or(seq, |r| r.min(seq)));
        }
        let Unwritten {
            events,
            alerts,
            ref error,
        } = self.unwritten;
        let error = error.clone();
        if events + alerts == 0 {
            return Ok(());
        }
        // The Shed record takes the first of the numbers it declares.
        let first = self.next_seq;
        let last = first + events + alerts - 1;
        if last >= self.reserved {
            self.reserve(last + 1)?;
        }
        let env = Envelope {
            seq: first,
            body: Some(envelope::Body::Shed(Shed {
                dropped: vec![SeqRange { first, last }],
                events,
                alerts,
                reason: format!("the spool could not be written: {error}"),
                unused: Vec::new(),
            })),
        };
        self.append(Class::Shed, env.encode_to_vec(), Some(first))?;
        self.next_seq = last + 1;
        self.stats.shed_events += events;
        self.stats.shed_alerts += alerts;
        warn!(
            events,
            alerts, "the spool can write again: records it could not write are declared lost"
        );
        self.unwritten = Unwritten::default();
        // Cleared once the declaration is synced (a crash before leaves both counts).
        self.ledger_clear = true;
        Ok(())
    }

    /// Writes a record with a new sequence number, or (a Shed record) with `reuse`, a
    /// number chosen by the caller. On failure nothing changes: the file is cut back, no
    /// number is consumed.
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
            self.open_segment()?;
        }
        let seq = reuse.unwrap_or(self.next_seq);
        if reuse.is_none() && seq >= self.reserved {
            self.reserve(seq + 1)?;
        }
        let Some((id, file, size)) = self.current.as_mut() else {
            unreachable!("a segment was just opened");
        };
        let mut record = Vec::with_capacity(12 + bytes.len());
        record.extend_from_slice(RECORD_MAGIC);
        record.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
        record.extend_from_slice(&bytes);
        let path = self.opts.dir.join(format!("segment-{id:010}"));
        if let Err(e) = file.write_all(&record) {
            // Cut back what part of the record made it, so that the next one follows the
            // last good record; a segment that cannot be cut is left for a new one.
            if file.set_len(*size).is_err() {
                self.current = None;
            }
            return Err(io_err(&path)(e));
        }
        *size += record.len() as u64;
        let id = *id;
        if reuse.is_none() {
            self.next_seq += 1;
        }
        self.insert(seq, class, bytes.into(), id);
        self.unsynced = true;
        self.stats.appended += 1;
        Ok(seq)
    }

    /// Starts a new segment file, after every existing one (foreign names included).
    fn open_segment(&mut self) -> Result<(), SpoolError> {
        let id = self
            .segments
            .keys()
            .chain(self.foreign.iter())
            .max()
            .map_or(1, |last| last + 1);
        let path = self.opts.dir.join(format!("segment-{id:010}"));
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if let Err(e) = file.write_all(SEGMENT_HEADER) {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(io_err(&path)(e));
        }
        self.segments.entry(id).or_default();
        self.current = Some((id, file, SEGMENT_HEADER.len() as u64));
        Ok(())
    }

    fn insert(&mut self, seq: u64, class: Class, bytes: Arc<[u8]>, segment: u64) {
        self.pending_bytes += bytes.len() as u64;
        *self.segments.entry(segment).or_default() += 1;
        self.pending.insert(
            seq,
            Pending {
                class,
                bytes,
                segment,
            },
        );
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
        let mut removed = Vec::new();
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
                    add_range(&mut dropped, seq, seq);
                    match p.class {
                        Class::Event => events += 1,
                        _ => alerts += 1,
                    }
                    removed.push((seq, p));
                }
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
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
                unused: Vec::new(),
            })),
        };
        if let Err(e) = self.append(Class::Shed, env.encode_to_vec(), Some(seq)) {
            // The loss could not be written down: nothing is shed after all.
            for (seq, p) in removed {
                self.insert(seq, p.class, p.bytes, p.segment);
            }
            return Err(e);
        }
        self.stats.shed_events += events;
        self.stats.shed_alerts += alerts;
        warn!(events, alerts, "spool full: shed the oldest unsent records");
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

    /// Puts what was appended on disk and makes it sendable. Records that could not be
    /// written are declared here too, once the disk takes writes again (the agent syncs
    /// every second, whether or not anything new arrives).
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        let _ = self.declare_unwritten();
        if self.unsynced {
            if let Some((id, file, _)) = &self.current {
                file.sync_data()
                    .map_err(io_err(&self.opts.dir.join(format!("segment-{id:010}"))))?;
            }
            self.unsynced = false;
            self.unsynced_alert = false;
        }
        if self.ledger_clear {
            self.ledger_clear = false;
            self.write_ledger();
        }
        if self.ledger_dirty
            && let Some(f) = &self.ledger
        {
            self.ledger_dirty = false;
            if let Err(e) = f.sync_data() {
                warn!(error = %e, "cannot sync the spool's ledger of unwritten records");
            }
        }
        self.durable = self.last_seq();
        Ok(())
    }

    /// The collector stored everything up to `seq`. Segments that hold nothing pending any
    /// more are deleted even when the state cannot be written: freeing the disk is what
    /// lets a full spool recover.
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
        // A disk that refused writes gets back the space of an emptied current segment
        // too (on a small disk the whole spool may be that one segment).
        if self.unwritten.events + self.unwritten.alerts > 0
            && let Some((id, ..)) = self.current
            && self.segments.get(&id) == Some(&0)
        {
            self.current = None;
        }
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
        if let Err(e) = self.persist_state() {
            warn!(error = %e, "cannot write the spool state; the acknowledgement is kept in memory and written with the next one");
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

    /// Reserves the numbers up to `beyond` and [`RESERVE`] more, writing the state. No
    /// number at or past the written reservation is ever handed out: when the state
    /// cannot be written (disk full), the record that needed it is not written either.
    fn reserve(&mut self, beyond: u64) -> Result<(), SpoolError> {
        let before = self.reserved;
        self.reserved = beyond + RESERVE;
        self.persist_state().inspect_err(|_| self.reserved = before)
    }

    /// Writes the acknowledged and reserved numbers, atomically.
    fn persist_state(&self) -> Result<(), SpoolError> {
        let path = self.opts.dir.join("state");
        let tmp = self.opts.dir.join("state.tmp");
        let mut bytes = Vec::with_capacity(STATE_LEN);
        bytes.extend_from_slice(&self.acked.to_le_bytes());
        bytes.extend_from_slice(&self.reserved.max(self.next_seq).to_le_bytes());
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
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(&path)(e)
        })
    }
}

/// Adds `first..=last` to sorted, disjoint ranges, merging neighbours and overlaps.
fn add_range(ranges: &mut Vec<SeqRange>, first: u64, last: u64) {
    ranges.push(SeqRange { first, last });
    ranges.sort_by_key(|r| r.first);
    let mut merged: Vec<SeqRange> = Vec::with_capacity(ranges.len());
    for r in ranges.drain(..) {
        match merged.last_mut() {
            Some(prev) if r.first <= prev.last.saturating_add(1) => {
                prev.last = prev.last.max(r.last)
            }
            _ => merged.push(r),
        }
    }
    *ranges = merged;
}

/// `ranges` without the numbers `present` holds.
fn subtract_present(ranges: &[SeqRange], present: &BTreeMap<u64, Pending>) -> Vec<SeqRange> {
    let mut out = Vec::new();
    for r in ranges {
        let mut from = r.first;
        for (&seq, _) in present.range(r.first..=r.last) {
            if seq > from {
                add_range(&mut out, from, seq - 1);
            }
            from = seq + 1;
        }
        if from <= r.last {
            add_range(&mut out, from, r.last);
        }
    }
    out
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

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("segment-")
            })
            .collect();
        v.sort();
        v
    }

    type Ranges = Vec<(u64, u64)>;

    /// The Shed records pending: (number, lost ranges, unused ranges).
    fn sheds(spool: &Spool) -> Vec<(u64, Ranges, Ranges)> {
        spool
            .from_seq(0, 100_000)
            .iter()
            .filter_map(|(seq, b)| match decode(b).body {
                Some(envelope::Body::Shed(s)) => Some((
                    *seq,
                    s.dropped.iter().map(|r| (r.first, r.last)).collect(),
                    s.unused.iter().map(|r| (r.first, r.last)).collect(),
                )),
                _ => None,
            })
            .collect()
    }

    fn outputs(spool: &Spool) -> Vec<u64> {
        spool
            .from_seq(0, 100_000)
            .iter()
            .filter(|(_, b)| matches!(decode(b).body, Some(envelope::Body::Output(_))))
            .map(|(s, _)| *s)
            .collect()
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
        assert!(sheds(&spool).is_empty(), "a new spool declares nothing");
        for n in 0..10 {
            assert_eq!(spool.push(alert(n)).unwrap(), base + u64::from(n) + 1);
        }
        spool.sync().unwrap();
        spool.ack(base + 4).unwrap();
        drop(spool);

        let mut spool = Spool::open(opts.clone()).unwrap();
        assert_eq!(spool.first_seq(), base + 1);
        assert_eq!(spool.acked(), base + 4);
        assert_eq!(outputs(&spool), (base + 5..=base + 10).collect::<Vec<_>>());
        // Numbering continues after what the first run reserved, and the numbers it
        // reserved but did not use are declared unused (nothing lost).
        let restart = base + 1 + RESERVE;
        assert_eq!(
            sheds(&spool),
            [(base + 11, vec![], vec![(base + 11, restart - 1)])]
        );
        assert_eq!(
            spool.push(alert(10)).unwrap(),
            restart,
            "sequence numbers are never reused"
        );
        spool.sync().unwrap();
        spool.ack(restart).unwrap();
        assert_eq!(spool.pending(), 0);
        assert!(
            segments(dir.path()).len() <= 1,
            "acknowledged segments are deleted"
        );
        drop(spool);
        let spool = Spool::open(opts).unwrap();
        assert!(
            spool.last_seq() > restart,
            "the counter survives even with nothing pending"
        );
    }

    /// The declarations of unwritten records pending: (events, alerts, reason).
    fn unwritten_declared(spool: &Spool) -> Vec<(u64, u64, String)> {
        spool
            .pending
            .values()
            .filter_map(|p| match decode(&p.bytes).body {
                Some(envelope::Body::Shed(s)) if s.reason.contains("could not be written") => {
                    Some((s.events, s.alerts, s.reason))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn losses_counted_on_a_refusing_disk_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions::new(dir.path().to_path_buf());
        let mut spool = Spool::open(opts.clone()).unwrap();
        spool.push(alert(0)).unwrap();
        spool.sync().unwrap();
        // The disk refuses writes: the segment's descriptor can no longer write (a failed
        // write gives the segment up, so each push gets a refusing one).
        let refuse = |spool: &mut Spool| {
            if spool.current.is_none() {
                spool.open_segment().unwrap();
            }
            let (id, _, size) = spool.current.take().unwrap();
            let read_only = File::open(dir.path().join(format!("segment-{id:010}"))).unwrap();
            spool.current = Some((id, read_only, size));
        };
        for n in 1..=3 {
            refuse(&mut spool);
            assert!(spool.push(alert(n)).is_err());
        }
        refuse(&mut spool);
        assert!(spool.push(event(4)).is_err());
        assert!(unwritten_declared(&spool).is_empty());
        // Stopped before the disk took a write again.
        drop(spool);

        // Restarted; the disk takes writes again: the previous run's losses are declared.
        let mut spool = Spool::open(opts.clone()).unwrap();
        spool.push(alert(5)).unwrap();
        let declared = unwritten_declared(&spool);
        assert_eq!(declared.len(), 1, "{declared:?}");
        assert_eq!((declared[0].0, declared[0].1), (1, 3));
        assert!(declared[0].2.contains("segment-"), "{declared:?}");
        spool.sync().unwrap();
        drop(spool);

        // Declared once: the next restart does not declare them again.
        let mut spool = Spool::open(opts.clone()).unwrap();
        spool.push(alert(6)).unwrap();
        assert_eq!(unwritten_declared(&spool).len(), 1);

        // A damaged ledger is no count at all.
        assert!(decode_ledger(&[0u8; LEDGER_LEN]).is_none());
        let mut bytes = encode_ledger(&Unwritten {
            events: 7,
            alerts: 8,
            error: "é".repeat(400),
        });
        let back = decode_ledger(&bytes).unwrap();
        assert_eq!((back.events, back.alerts), (7, 8));
        assert_eq!(back.error, "é".repeat(256), "cut at a character boundary");
        bytes[20] ^= 1;
        assert!(decode_ledger(&bytes).is_none());
    }

    #[test]
    fn ranges_merge() {
        let mut r = Vec::new();
        for seq in [5, 7, 6, 1, 9, 2, 7] {
            add_range(&mut r, seq, seq);
        }
        add_range(&mut r, 20, 30);
        add_range(&mut r, 25, 40);
        let pairs: Vec<(u64, u64)> = r.iter().map(|r| (r.first, r.last)).collect();
        assert_eq!(pairs, [(1, 2), (5, 7), (9, 9), (20, 40)]);
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
    fn a_torn_tail_is_skipped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions::new(dir.path().to_path_buf());
        let mut spool = Spool::open(opts.clone()).unwrap();
        let seqs: Vec<u64> = (0..3).map(|n| spool.push(alert(n)).unwrap()).collect();
        spool.sync().unwrap();
        drop(spool);
        let segment = &segments(dir.path())[0];
        let mut f = OpenOptions::new().append(true).open(segment).unwrap();
        f.write_all(&[b'S', b'R', b'E', b'C', 200, 0, 0, 0, 1, 2, 3])
            .unwrap();
        let spool = Spool::open(opts).unwrap();
        assert_eq!(outputs(&spool), seqs);
        // The record being written may have had the next number: declared lost, up to
        // what the run had reserved.
        let [(at, lost, unused)] = sheds(&spool).try_into().unwrap();
        assert_eq!(lost, [(seqs[2] + 1, seqs[0] + RESERVE - 1)]);
        assert!(unused.is_empty());
        assert_eq!(at, seqs[2] + 1);
        assert!(spool.last_seq() >= seqs[0] + RESERVE - 1);
    }

    #[test]
    fn a_damaged_record_costs_itself_only() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions::new(dir.path().to_path_buf());
        let mut spool = Spool::open(opts.clone()).unwrap();
        let seqs: Vec<u64> = (0..30).map(|n| spool.push(alert(n)).unwrap()).collect();
        spool.sync().unwrap();
        drop(spool);
        // One byte flipped a third of the way in.
        let segment = &segments(dir.path())[0];
        let mut data = fs::read(segment).unwrap();
        let at = data.len() / 3;
        data[at] ^= 0x55;
        fs::write(segment, &data).unwrap();

        let mut spool = Spool::open(opts.clone()).unwrap();
        let kept = outputs(&spool);
        assert_eq!(kept.len(), 29, "only the damaged record is gone");
        let lost: Vec<u64> = seqs.iter().copied().filter(|s| !kept.contains(s)).collect();
        assert_eq!(lost.len(), 1);
        let declared = sheds(&spool);
        assert!(
            declared
                .iter()
                .any(|(_, l, _)| l.contains(&(lost[0], lost[0]))),
            "the damaged number is declared lost: {declared:?}"
        );
        assert_eq!(spool.stats.shed_events, 1);
        // Numbers go on past anything the damaged record could have been.
        let next = spool.push(alert(99)).unwrap();
        assert!(next > *seqs.last().unwrap());
        spool.sync().unwrap();
        drop(spool);
        // And the declaration survives another restart (it is in the segment now).
        let spool = Spool::open(opts).unwrap();
        assert!(outputs(&spool).contains(&next));
        assert!(
            sheds(&spool)
                .iter()
                .any(|(_, l, _)| l.contains(&(lost[0], lost[0])))
        );
    }

    #[test]
    fn a_damaged_or_missing_state_is_rebuilt_from_the_segments() {
        for damage in ["garbage", "empty", "missing"] {
            let dir = tempfile::tempdir().unwrap();
            let opts = SpoolOptions::new(dir.path().to_path_buf());
            let mut spool = Spool::open(opts.clone()).unwrap();
            let seqs: Vec<u64> = (0..5).map(|n| spool.push(alert(n)).unwrap()).collect();
            spool.sync().unwrap();
            spool.ack(seqs[1]).unwrap();
            drop(spool);
            let state = dir.path().join("state");
            match damage {
                "garbage" => fs::write(&state, b"not a spool state, not at all").unwrap(),
                "empty" => fs::write(&state, b"").unwrap(),
                _ => fs::remove_file(&state).unwrap(),
            }
            let mut spool = Spool::open(opts).unwrap_or_else(|e| panic!("{damage}: {e}"));
            // What is on disk is pending again, the acknowledged ones included (the
            // collector drops those it has).
            assert_eq!(outputs(&spool), seqs, "{damage}");
            let next = spool.push(alert(9)).unwrap();
            assert!(
                next > *seqs.last().unwrap() + 1_000,
                "{damage}: numbering jumps"
            );
            let [(_, lost, unused)] = sheds(&spool).try_into().unwrap();
            assert!(lost.is_empty(), "{damage}");
            assert_eq!(unused, [(seqs[4] + 1, next - 1)], "{damage}");
        }
    }

    #[test]
    fn files_the_spool_did_not_write_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SpoolOptions::new(dir.path().to_path_buf());
        let foreign = dir.path().join("segment-0000000007");
        fs::write(&foreign, b"someone else's notes").unwrap();
        let blocking = dir.path().join("segment-0000000008");
        fs::create_dir(&blocking).unwrap();
        let mut spool = Spool::open(opts.clone()).unwrap();
        let seq = spool.push(alert(1)).unwrap();
        spool.sync().unwrap();
        spool.ack(seq).unwrap();
        let mut spool = Spool::open(opts).unwrap();
        spool.push(alert(2)).unwrap();
        spool.sync().unwrap();
        assert_eq!(fs::read(&foreign).unwrap(), b"someone else's notes");
        assert!(blocking.is_dir());
        // New segments are numbered after them.
        assert!(
            segments(dir.path())
                .iter()
                .any(|p| p.ends_with("segment-0000000009") || p.ends_with("segment-0000000010"))
        );
    }

    #[test]
    fn segments_of_the_previous_format_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = Vec::new();
        for seq in [41u64, 42] {
            let bytes = Envelope {
                seq,
                body: Some(envelope::Body::Output(alert(seq as u32))),
            }
            .encode_to_vec();
            data.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            data.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
            data.extend_from_slice(&bytes);
        }
        fs::write(dir.path().join("segment-0000000001"), &data).unwrap();
        let spool = Spool::open(SpoolOptions::new(dir.path().to_path_buf())).unwrap();
        assert_eq!(outputs(&spool), [41, 42]);
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
        let last = spool.last_seq();
        drop(spool);
        let spool = Spool::open(opts).unwrap();
        let after: Vec<u64> = spool.from_seq(0, 1000).iter().map(|(s, _)| *s).collect();
        // The same, and the record declaring the numbers reserved and not used.
        assert_eq!(after[..before.len()], before[..]);
        assert_eq!(after[before.len()..], [last + 1]);
    }
}
