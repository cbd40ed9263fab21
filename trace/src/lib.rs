//! Reading and writing trace files (docs/traces.md), in a crate of its own so that the
//! fuzzer and other tools can use it without the agent. Readers never panic: a truncated
//! file yields every complete record before the cut, then says where it was cut; a
//! corrupt or foreign one says what is wrong and at which offset.

use std::{
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
};

use prost::Message;
use sensor_proto::v1::{TraceHeader, TraceRecord};

/// The first six bytes of every trace file.
pub const MAGIC: &[u8; 6] = b"SNSTRC";
/// The format this agent writes and reads.
pub const FORMAT_VERSION: u8 = 1;
const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;
/// Largest record accepted: a bound against hostile length prefixes.
pub const MAX_RECORD: u64 = 16 * 1024 * 1024;
/// zstd level: fast, and about 8x smaller on event streams.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{file}: {source}")]
    Io { file: String, source: io::Error },
    #[error("{file}: not a trace file (it does not start with \"SNSTRC\")")]
    BadMagic { file: String },
    #[error("{file}: trace format version {found}; this agent reads version {FORMAT_VERSION}")]
    Version { file: String, found: u8 },
    #[error("{file}: unknown compression {found} (0: none, 1: zstd)")]
    Compression { file: String, found: u8 },
    #[error(
        "{file}: truncated at offset {offset} (in record {record}); {record} complete records before the cut were read"
    )]
    Truncated {
        file: String,
        offset: u64,
        record: u64,
    },
    #[error("{file}: record {record} at offset {offset} is corrupt: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        record: u64,
        reason: String,
    },
    #[error(
        "{file}: record {record} at offset {offset} claims {len} bytes, more than the {MAX_RECORD} allowed"
    )]
    TooLarge {
        file: String,
        offset: u64,
        record: u64,
        len: u64,
    },
}

impl TraceError {
    /// True for a cut file (the records before it are good), false for damage.
    pub fn is_truncation(&self) -> bool {
        matches!(self, TraceError::Truncated { .. })
    }
}

/// Counts bytes going through a writer (the file's size, compression included).
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

enum Sink {
    Plain(Counting<BufWriter<File>>),
    Zstd(zstd::stream::Encoder<'static, Counting<BufWriter<File>>>),
}

/// Writes one trace file.
pub struct TraceWriter {
    path: PathBuf,
    sink: Option<Sink>,
    records: u64,
    buf: Vec<u8>,
}

impl TraceWriter {
    /// Creates `path` and writes the header.
    pub fn create(path: &Path, header: &TraceHeader, compress: bool) -> Result<Self, TraceError> {
        let err = |source| TraceError::Io {
            file: path.display().to_string(),
            source,
        };
        let file = File::create(path).map_err(err)?;
        let mut out = Counting {
            inner: BufWriter::new(file),
            count: 0,
        };
        out.write_all(MAGIC).map_err(err)?;
        out.write_all(&[
            FORMAT_VERSION,
            if compress {
                COMPRESSION_ZSTD
            } else {
                COMPRESSION_NONE
            },
        ])
        .map_err(err)?;
        let sink = if compress {
            Sink::Zstd(zstd::stream::Encoder::new(out, ZSTD_LEVEL).map_err(err)?)
        } else {
            Sink::Plain(out)
        };
        let mut writer = Self {
            path: path.to_path_buf(),
            sink: Some(sink),
            records: 0,
            buf: Vec::with_capacity(4096),
        };
        writer.write_message(header)?;
        Ok(writer)
    }

    fn write_message<M: Message>(&mut self, m: &M) -> Result<(), TraceError> {
        self.buf.clear();
        m.encode_length_delimited(&mut self.buf)
            .map_err(|e| self.io(io::Error::other(e)))?;
        let result = match self.sink.as_mut() {
            Some(Sink::Plain(w)) => w.write_all(&self.buf),
            Some(Sink::Zstd(w)) => w.write_all(&self.buf),
            None => Err(io::Error::other("the trace file is already finished")),
        };
        result.map_err(|e| self.io(e))?;
        self.records += 1;
        Ok(())
    }

    fn io(&self, source: io::Error) -> TraceError {
        TraceError::Io {
            file: self.path.display().to_string(),
            source,
        }
    }

    pub fn write(&mut self, record: &TraceRecord) -> Result<(), TraceError> {
        self.write_message(record)
    }

    /// Makes everything written so far readable (ends the current zstd block).
    pub fn flush(&mut self) -> Result<(), TraceError> {
        let result = match self.sink.as_mut() {
            Some(Sink::Plain(w)) => w.flush(),
            Some(Sink::Zstd(w)) => w.flush(),
            None => Ok(()),
        };
        result.map_err(|e| self.io(e))
    }

    /// Bytes on disk so far (after compression, up to the last flush for zstd).
    pub fn bytes(&self) -> u64 {
        match &self.sink {
            Some(Sink::Plain(w)) => w.count,
            Some(Sink::Zstd(w)) => w.get_ref().count,
            None => 0,
        }
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ends the file (the zstd frame) and syncs it to disk.
    pub fn finish(mut self) -> Result<PathBuf, TraceError> {
        let out = match self.sink.take() {
            Some(Sink::Plain(w)) => w,
            Some(Sink::Zstd(w)) => w.finish().map_err(|e| self.io(e))?,
            None => return Ok(self.path.clone()),
        };
        let file = out
            .inner
            .into_inner()
            .map_err(|e| self.io(e.into_error()))?;
        file.sync_all().map_err(|e| self.io(e))?;
        Ok(self.path.clone())
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        // Best effort: an unfinished zstd frame is still readable up to the last flush.
        if let Some(Sink::Zstd(w)) = self.sink.take() {
            let _ = w.finish().map(|mut out| out.flush());
        }
    }
}

/// Counts the bytes read from the (decompressed) stream, for error offsets.
struct Offset<R> {
    inner: R,
    offset: u64,
}

impl<R: Read> Read for Offset<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// Reads one trace file.
pub struct TraceReader {
    file: String,
    stream: Offset<Box<dyn Read>>,
    header: TraceHeader,
    records: u64,
    done: bool,
    buf: Vec<u8>,
}

/// How reading one length-delimited message ended.
enum Next {
    Message(Vec<u8>),
    End,
}

impl TraceReader {
    pub fn open(path: &Path) -> Result<Self, TraceError> {
        let file = path.display().to_string();
        let f = File::open(path).map_err(|source| TraceError::Io {
            file: file.clone(),
            source,
        })?;
        Self::from_reader(file, Box::new(BufReader::new(f)))
    }

    /// Reads a trace from any byte source (`name` is used in errors).
    pub fn from_reader(name: String, mut input: Box<dyn Read>) -> Result<Self, TraceError> {
        let mut prefix = [0u8; 8];
        let mut got = 0;
        while got < prefix.len() {
            match input.read(&mut prefix[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(TraceError::Io { file: name, source }),
            }
        }
        if got < 6 || &prefix[..6] != MAGIC {
            return Err(TraceError::BadMagic { file: name });
        }
        if got < 8 {
            return Err(TraceError::Truncated {
                file: name,
                offset: got as u64,
                record: 0,
            });
        }
        if prefix[6] != FORMAT_VERSION {
            return Err(TraceError::Version {
                file: name,
                found: prefix[6],
            });
        }
        let body: Box<dyn Read> = match prefix[7] {
            COMPRESSION_NONE => input,
            COMPRESSION_ZSTD => {
                Box::new(
                    zstd::stream::Decoder::new(input).map_err(|source| TraceError::Io {
                        file: name.clone(),
                        source,
                    })?,
                )
            }
            found => return Err(TraceError::Compression { file: name, found }),
        };
        let mut reader = Self {
            file: name,
            stream: Offset {
                inner: body,
                offset: 0,
            },
            header: TraceHeader::default(),
            records: 0,
            done: false,
            buf: Vec::new(),
        };
        let header = match reader.next_message()? {
            Next::Message(bytes) => TraceHeader::decode(bytes.as_slice())
                .map_err(|e| reader.corrupt(0, format!("the header does not decode: {e}")))?,
            Next::End => {
                return Err(TraceError::Truncated {
                    file: reader.file.clone(),
                    offset: 0,
                    record: 0,
                });
            }
        };
        if header.format_version != u32::from(FORMAT_VERSION) {
            return Err(TraceError::Version {
                file: reader.file.clone(),
                found: header.format_version.min(255) as u8,
            });
        }
        reader.header = header;
        Ok(reader)
    }

    pub fn header(&self) -> &TraceHeader {
        &self.header
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    /// Records read so far (the header not included).
    pub fn records(&self) -> u64 {
        self.records
    }

    fn corrupt(&self, offset: u64, reason: String) -> TraceError {
        TraceError::Corrupt {
            file: self.file.clone(),
            offset,
            record: self.records,
            reason,
        }
    }

    fn truncated(&self, offset: u64) -> TraceError {
        TraceError::Truncated {
            file: self.file.clone(),
            offset,
            record: self.records,
        }
    }

    /// Maps a read error: an early end of a zstd frame or file is a cut, anything else
    /// is damage.
    fn read_error(&self, start: u64, e: io::Error) -> TraceError {
        if e.kind() == io::ErrorKind::UnexpectedEof || e.to_string().contains("incomplete frame") {
            self.truncated(start)
        } else {
            self.corrupt(start, e.to_string())
        }
    }

    fn read_byte(&mut self) -> io::Result<Option<u8>> {
        let mut b = [0u8; 1];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return Ok(None),
                Ok(_) => return Ok(Some(b[0])),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn next_message(&mut self) -> Result<Next, TraceError> {
        let start = self.stream.offset;
        // The varint length prefix.
        let mut len: u64 = 0;
        for i in 0..10 {
            let byte = match self.read_byte() {
                Ok(Some(b)) => b,
                Ok(None) if i == 0 => return Ok(Next::End),
                Ok(None) => return Err(self.truncated(start)),
                Err(e) => return Err(self.read_error(start, e)),
            };
            len |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                break;
            }
            if i == 9 {
                return Err(self.corrupt(start, "the length prefix is not a varint".into()));
            }
        }
        if len > MAX_RECORD {
            return Err(TraceError::TooLarge {
                file: self.file.clone(),
                offset: start,
                record: self.records,
                len,
            });
        }
        let mut bytes = std::mem::take(&mut self.buf);
        bytes.clear();
        bytes.resize(len as usize, 0);
        let mut got = 0;
        while got < bytes.len() {
            match self.stream.read(&mut bytes[got..]) {
                Ok(0) => return Err(self.truncated(start)),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_error(start, e)),
            }
        }
        Ok(Next::Message(bytes))
    }

    /// The next record; `None` at the end. After an error the reader is done.
    pub fn next_record(&mut self) -> Option<Result<TraceRecord, TraceError>> {
        if self.done {
            return None;
        }
        let start = self.stream.offset;
        let result = match self.next_message() {
            Ok(Next::End) => {
                self.done = true;
                return None;
            }
            Ok(Next::Message(bytes)) => {
                let decoded = TraceRecord::decode(bytes.as_slice())
                    .map_err(|e| self.corrupt(start, format!("does not decode: {e}")));
                self.buf = bytes;
                decoded
            }
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => self.records += 1,
            Err(_) => self.done = true,
        }
        Some(result)
    }
}

impl Iterator for TraceReader {
    type Item = Result<TraceRecord, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_record()
    }
}

#[cfg(test)]
mod tests {
    use sensor_proto::v1::{Event, trace_record};

    use super::*;

    fn header() -> TraceHeader {
        TraceHeader {
            format_version: u32::from(FORMAT_VERSION),
            host: "h".into(),
            ..Default::default()
        }
    }

    fn event(pid: u32) -> TraceRecord {
        TraceRecord {
            item: Some(trace_record::Item::Event(Event {
                pid,
                comm: "x".repeat(40),
                ..Default::default()
            })),
        }
    }

    /// Writes `n` events, flushing every 50 as the agent does every second (zstd data
    /// becomes readable block by block).
    fn write(path: &Path, compress: bool, n: u32) {
        let mut w = TraceWriter::create(path, &header(), compress).unwrap();
        for pid in 0..n {
            w.write(&event(pid)).unwrap();
            if pid % 50 == 49 {
                w.flush().unwrap();
            }
        }
        w.finish().unwrap();
    }

    fn read_all(path: &Path) -> (Vec<u32>, Option<TraceError>) {
        let mut pids = Vec::new();
        let mut reader = match TraceReader::open(path) {
            Ok(r) => r,
            Err(e) => return (pids, Some(e)),
        };
        for r in &mut reader {
            match r {
                Ok(TraceRecord {
                    item: Some(trace_record::Item::Event(e)),
                }) => pids.push(e.pid),
                Ok(_) => {}
                Err(e) => return (pids, Some(e)),
            }
        }
        (pids, None)
    }

    #[test]
    fn round_trip_plain_and_zstd() {
        let dir = tempfile::tempdir().unwrap();
        for compress in [false, true] {
            let path = dir.path().join(format!("t{compress}"));
            write(&path, compress, 100);
            let (pids, err) = read_all(&path);
            assert!(err.is_none(), "{err:?}");
            assert_eq!(pids, (0..100).collect::<Vec<_>>());
            assert_eq!(TraceReader::open(&path).unwrap().header().host, "h");
        }
    }

    #[test]
    fn a_cut_file_yields_every_complete_record_before_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        for compress in [false, true] {
            let path = dir.path().join("t");
            write(&path, compress, 2000);
            let full = std::fs::read(&path).unwrap();
            for cut in [full.len() * 3 / 4, full.len() / 2, full.len() - 1] {
                std::fs::write(&path, &full[..cut]).unwrap();
                let (pids, err) = read_all(&path);
                let err = err.expect("the cut is reported");
                assert!(err.is_truncation(), "{err}");
                assert!(err.to_string().contains("truncated at offset"), "{err}");
                assert!(
                    !pids.is_empty(),
                    "records before the cut are read ({compress}, {cut})"
                );
                assert_eq!(
                    pids,
                    (0..pids.len() as u32).collect::<Vec<_>>(),
                    "in order, none skipped"
                );
            }
        }
    }

    #[test]
    fn foreign_wrong_version_and_hostile_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, b"hello world").unwrap();
        let err = TraceReader::open(&path).err().unwrap();
        assert!(
            err.to_string()
                .ends_with("not a trace file (it does not start with \"SNSTRC\")"),
            "{err}"
        );
        assert!(err.to_string().starts_with(&path.display().to_string()));

        std::fs::write(&path, b"SNSTRC\x09\x00").unwrap();
        let err = TraceReader::open(&path).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: trace format version 9; this agent reads version 1",
                path.display()
            )
        );

        std::fs::write(&path, b"SNSTRC\x01\x07").unwrap();
        assert!(matches!(
            TraceReader::open(&path),
            Err(TraceError::Compression { found: 7, .. })
        ));

        // A length prefix asking for 2^40 bytes.
        let mut hostile = b"SNSTRC\x01\x00".to_vec();
        hostile.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x20]);
        std::fs::write(&path, &hostile).unwrap();
        assert!(matches!(
            TraceReader::open(&path),
            Err(TraceError::TooLarge { .. })
        ));

        // Garbage where a record should be.
        write(&path, false, 3);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 5] = 0xff;
        bytes[n - 4] = 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (pids, err) = read_all(&path);
        assert_eq!(pids.len(), 2);
        assert!(err.is_some());
    }
}
