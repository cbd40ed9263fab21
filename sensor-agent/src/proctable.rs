//! The process table: every process on the host as the agent knows it, with its ancestry.
//!
//! Seeded from /proc at start (so a Tomcat started before the agent has exe, argv, user and
//! ancestry), then kept current from events alone: fork copies the parent, exec replaces
//! the image, exit marks the entry, which is pruned after a retention period so that late
//! events and alerts still find their ancestry. Time is the events' boot clock, never the
//! wall clock, so replaying a trace rebuilds the same table.

use std::{collections::VecDeque, sync::Arc};

use rustc_hash::FxHashMap;

use sensor_proto::v1::{Event, ExeIdentity, event};

/// How long an exited process stays in the table, in boot-clock nanoseconds.
pub const DEFAULT_RETENTION_NS: u64 = 60 * 1_000_000_000;
/// Bound on the number of entries (live and exited).
pub const DEFAULT_CAPACITY: usize = 65_536;
/// Ancestry walks stop after this many levels (a cycle guard).
pub const MAX_ANCESTRY: usize = 64;

/// One process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub ppid: u32,
    /// Start time of the parent, to tell a parent from a later process reusing its pid.
    pub parent_start_ns: u64,
    pub start_boot_ns: u64,
    pub exe: Arc<str>,
    pub argv: Arc<[String]>,
    /// argv joined with spaces, computed once per image.
    pub cmdline: Arc<str>,
    pub argv_truncated: bool,
    pub comm: String,
    pub uid: u32,
    pub gid: u32,
    pub euid: u32,
    pub egid: u32,
    pub cwd: Arc<str>,
    pub cgroup_id: u64,
    pub exe_memfd: bool,
    pub exe_deleted: bool,
    /// What the executable is (content, package, shell...), when the agent read it.
    pub exe_identity: Option<Arc<ExeIdentity>>,
    /// Boot time of the last exec seen (0 when the image predates the agent).
    pub exec_boot_ns: u64,
    /// Set when the process has exited: boot time, exit status and signal.
    pub exited: Option<Exited>,
    /// Where this entry came from.
    pub source: Source,
    /// The web-tier identity this process is or descends from: inherited through fork
    /// and exec, replaced when the process itself has an identity.
    pub lineage: Option<Arc<LineageLabel>>,
}

/// A web-tier identity and the process that has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineageLabel {
    pub identity: Arc<str>,
    pub source_pid: u32,
    pub source_start_ns: u64,
    pub source_exe: Arc<str>,
    pub source_argv: Arc<[String]>,
}

/// argv as one string, the way Sigma's CommandLine and our `proc.cmdline` see it.
pub fn join_argv(argv: &[String]) -> Arc<str> {
    argv.join(" ").into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exited {
    pub boot_ns: u64,
    pub exit_code: i32,
    pub signal: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Read from /proc when the agent started.
    Proc,
    /// Created by a fork event (image inherited from the parent).
    Fork,
    /// Replaced by an exec event.
    Exec,
    /// First seen in an event other than fork or exec (its start was missed).
    Partial,
}

/// Counters of what the table did, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub inserted: u64,
    pub pruned: u64,
    /// Entries dropped because the table was full.
    pub evicted: u64,
}

/// The process that last wrote a file the probes reported (created it, opened it for
/// writing, made it executable, renamed or linked it there): what "who wrote this
/// executable" is answered from.
#[derive(Clone, Debug)]
pub struct Writer {
    pub pid: u32,
    pub exe: Arc<str>,
    /// The writer's web-tier identity, if it had one.
    pub identity: Option<Arc<str>>,
    pub boot_ns: u64,
}

/// Files whose writer is remembered at most; the oldest are forgotten first.
pub const MAX_WRITERS: usize = 4096;

pub struct ProcessTable {
    /// Keyed by pid; Fx hashing: pids are not attacker-chosen keys worth SipHash.
    procs: FxHashMap<u32, ProcessInfo>,
    /// path -> its last writer, and the order paths were written in (for the bound).
    writers: FxHashMap<Arc<str>, Writer>,
    writer_order: VecDeque<Arc<str>>,
    /// Exit order: (pid, exit boot time), oldest first.
    exited: VecDeque<(u32, u64)>,
    retention_ns: u64,
    capacity: usize,
    stats: TableStats,
}

impl Default for ProcessTable {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY, DEFAULT_RETENTION_NS)
    }
}

impl ProcessTable {
    pub fn new(capacity: usize, retention_ns: u64) -> Self {
        Self {
            procs: FxHashMap::default(),
            writers: FxHashMap::default(),
            writer_order: VecDeque::new(),
            exited: VecDeque::new(),
            retention_ns,
            capacity: capacity.max(16),
            stats: TableStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    pub fn stats(&self) -> TableStats {
        self.stats
    }

    pub fn get(&self, pid: u32) -> Option<&ProcessInfo> {
        self.procs.get(&pid)
    }

    /// Every entry, in pid order (for snapshots).
    pub fn snapshot(&self) -> Vec<ProcessInfo> {
        let mut all: Vec<ProcessInfo> = self.procs.values().cloned().collect();
        all.sort_by_key(|p| p.pid);
        all
    }

    /// Sets what the executable of `pid` is (a process seeded from /proc).
    pub fn set_exe_identity(&mut self, pid: u32, identity: Arc<ExeIdentity>) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.exe_identity = Some(identity);
        }
    }

    /// Sets the lineage label of `pid`.
    pub fn set_lineage(&mut self, pid: u32, label: Option<Arc<LineageLabel>>) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.lineage = label;
        }
    }

    /// Labels every entry, parents before children: its own identity if `classify` gives
    /// one, else its parent's label. Used after seeding, when no fork events linked them.
    pub fn relabel(
        &mut self,
        classify: impl Fn(&ProcessTable, &ProcessInfo) -> Option<Arc<LineageLabel>>,
    ) {
        let mut order: Vec<(u64, u32)> = self
            .procs
            .values()
            .map(|p| (p.start_boot_ns, p.pid))
            .collect();
        order.sort_unstable();
        for (_, pid) in order {
            let Some(p) = self.procs.get(&pid) else {
                continue;
            };
            let label =
                classify(self, p).or_else(|| self.parent_of(p).and_then(|pp| pp.lineage.clone()));
            if let Some(p) = self.procs.get_mut(&pid) {
                p.lineage = label;
            }
        }
    }

    /// Generations from `pid` up to the process `source_pid` (0 when it is itself).
    pub fn depth_to(&self, pid: u32, source_pid: u32) -> Option<u32> {
        if pid == source_pid {
            return Some(0);
        }
        self.ancestry(pid)
            .iter()
            .position(|p| p.pid == source_pid)
            .map(|i| i as u32 + 1)
    }

    /// Inserts or replaces an entry (seeding from /proc or from a trace snapshot).
    pub fn insert(&mut self, info: ProcessInfo) {
        self.make_room();
        if let Some(exited) = info.exited {
            self.exited.push_back((info.pid, exited.boot_ns));
        }
        self.procs.insert(info.pid, info);
        self.stats.inserted += 1;
    }

    /// The parent of `p`, if it is still (or was recently) known and really is its parent.
    pub fn parent_of(&self, p: &ProcessInfo) -> Option<&ProcessInfo> {
        if p.ppid == 0 || p.ppid == p.pid {
            return None;
        }
        let parent = self.procs.get(&p.ppid)?;
        // A pid reused after the parent died belongs to a younger process.
        (parent.start_boot_ns <= p.start_boot_ns
            && (p.parent_start_ns == 0 || parent.start_boot_ns == p.parent_start_ns))
            .then_some(parent)
    }

    /// Ancestors of `pid`, parent first, up to pid 1 (or the first unknown one).
    pub fn ancestry(&self, pid: u32) -> Vec<&ProcessInfo> {
        let mut out = Vec::new();
        let Some(mut current) = self.procs.get(&pid) else {
            return out;
        };
        while out.len() < MAX_ANCESTRY {
            let Some(parent) = self.parent_of(current) else {
                break;
            };
            out.push(parent);
            current = parent;
        }
        out
    }

    /// Updates the table from one event.
    /// The last writer of `path`, if the probes reported one.
    pub fn writer_of(&self, path: &str) -> Option<&Writer> {
        self.writers.get(path)
    }

    fn note_writer(&mut self, ev: &Event, file: &sensor_proto::v1::FileEvent) {
        use sensor_proto::v1::FileOp;
        let written = match FileOp::try_from(file.op) {
            Ok(FileOp::Create | FileOp::OpenWrite | FileOp::Truncate | FileOp::CreateExec)
            | Ok(FileOp::ChmodExec | FileOp::Link) => file.path.as_str(),
            Ok(FileOp::Rename) if file.path_is_source => file.other_path.as_str(),
            Ok(FileOp::Rename) => file.path.as_str(),
            _ => return,
        };
        if written.is_empty() || file.result < 0 {
            return;
        }
        let proc = self.procs.get(&ev.pid);
        let writer = Writer {
            pid: ev.pid,
            exe: proc.map_or_else(|| Arc::from(""), |p| p.exe.clone()),
            identity: proc.and_then(|p| p.lineage.as_ref().map(|l| l.identity.clone())),
            boot_ns: ev.boot_ns,
        };
        // A file written again (a log, a spool) is updated in place, without allocating.
        if let Some(known) = self.writers.get_mut(written) {
            *known = writer;
            return;
        }
        let path: Arc<str> = written.into();
        self.writers.insert(path.clone(), writer);
        self.writer_order.push_back(path);
        while self.writer_order.len() > MAX_WRITERS {
            if let Some(old) = self.writer_order.pop_front() {
                self.writers.remove(&old);
            }
        }
    }

    pub fn apply(&mut self, ev: &Event) {
        if let Some(event::Kind::File(file)) = &ev.kind {
            self.note_writer(ev, file);
        }
        match &ev.kind {
            Some(event::Kind::Fork(fork)) if !fork.thread => {
                let child = match self.procs.get(&fork.parent_pid) {
                    Some(parent) => ProcessInfo {
                        pid: ev.pid,
                        ppid: fork.parent_pid,
                        parent_start_ns: parent.start_boot_ns,
                        start_boot_ns: fork.start_boot_ns,
                        exited: None,
                        source: Source::Fork,
                        uid: ev.uid,
                        gid: ev.gid,
                        comm: ev.comm.clone(),
                        cgroup_id: ev.cgroup_id,
                        ..parent.clone()
                    },
                    None => ProcessInfo {
                        ppid: fork.parent_pid,
                        start_boot_ns: fork.start_boot_ns,
                        source: Source::Fork,
                        ..partial(ev)
                    },
                };
                self.replace(child);
            }
            Some(event::Kind::Exec(exec)) => {
                let parent_start_ns = self
                    .procs
                    .get(&exec.ppid)
                    .map(|p| p.start_boot_ns)
                    .unwrap_or(0);
                // The label survives exec: the same process, a new image.
                let lineage = self
                    .procs
                    .get(&ev.pid)
                    .and_then(|p| p.lineage.clone())
                    .or_else(|| self.procs.get(&exec.ppid).and_then(|p| p.lineage.clone()));
                let info = ProcessInfo {
                    pid: ev.pid,
                    ppid: exec.ppid,
                    parent_start_ns,
                    start_boot_ns: exec.start_boot_ns,
                    exe: exec.exe.as_str().into(),
                    cmdline: join_argv(&exec.argv),
                    argv: exec.argv.clone().into(),
                    argv_truncated: exec.argv_truncated,
                    comm: ev.comm.clone(),
                    uid: ev.uid,
                    gid: ev.gid,
                    euid: exec.euid,
                    egid: exec.egid,
                    cwd: exec.cwd.as_str().into(),
                    cgroup_id: ev.cgroup_id,
                    exe_memfd: exec.exe_memfd,
                    exe_deleted: exec.exe_deleted,
                    exe_identity: exec.exe_identity.as_deref().cloned().map(Arc::new),
                    exec_boot_ns: ev.boot_ns,
                    exited: None,
                    source: Source::Exec,
                    lineage,
                };
                self.replace(info);
            }
            Some(event::Kind::Exit(exit)) => {
                if let Some(p) = self.procs.get_mut(&ev.pid)
                    && p.exited.is_none()
                {
                    p.exited = Some(Exited {
                        boot_ns: ev.boot_ns,
                        exit_code: exit.exit_code,
                        signal: exit.signal,
                    });
                    self.exited.push_back((ev.pid, ev.boot_ns));
                }
                self.prune(ev.boot_ns);
            }
            Some(_) if !self.procs.contains_key(&ev.pid) => self.replace(partial(ev)),
            _ => {}
        }
    }

    /// Replaces the entry for `info.pid` (a new process or a new image).
    fn replace(&mut self, info: ProcessInfo) {
        if !self.procs.contains_key(&info.pid) {
            self.make_room();
            self.stats.inserted += 1;
        }
        self.procs.insert(info.pid, info);
    }

    /// Drops exited entries older than the retention period.
    pub fn prune(&mut self, now_boot_ns: u64) {
        while let Some(&(pid, at)) = self.exited.front() {
            if now_boot_ns.saturating_sub(at) < self.retention_ns {
                break;
            }
            self.exited.pop_front();
            self.remove_if_exited_at(pid, at, false);
        }
    }

    /// Removes `pid` if it is still the exited entry recorded at `at` (not a reused pid).
    fn remove_if_exited_at(&mut self, pid: u32, at: u64, evicting: bool) -> bool {
        let matches = self
            .procs
            .get(&pid)
            .is_some_and(|p| p.exited.is_some_and(|e| e.boot_ns == at));
        if matches {
            self.procs.remove(&pid);
            if evicting {
                self.stats.evicted += 1;
            } else {
                self.stats.pruned += 1;
            }
        }
        matches
    }

    /// Keeps the table under its capacity: the oldest exited entries go first, then the
    /// oldest live ones (whose exit events were evidently missed).
    fn make_room(&mut self) {
        while self.procs.len() >= self.capacity {
            if let Some((pid, at)) = self.exited.pop_front() {
                self.remove_if_exited_at(pid, at, true);
                continue;
            }
            let oldest = self
                .procs
                .values()
                .min_by_key(|p| (p.start_boot_ns, p.pid))
                .map(|p| p.pid);
            match oldest {
                Some(pid) => {
                    self.procs.remove(&pid);
                    self.stats.evicted += 1;
                }
                None => break,
            }
        }
    }
}

/// An entry for a process first seen in the middle of its life.
fn partial(ev: &Event) -> ProcessInfo {
    ProcessInfo {
        pid: ev.pid,
        ppid: 0,
        parent_start_ns: 0,
        start_boot_ns: 0,
        exe: "".into(),
        argv: Vec::new().into(),
        cmdline: "".into(),
        argv_truncated: false,
        comm: ev.comm.clone(),
        uid: ev.uid,
        gid: ev.gid,
        euid: ev.uid,
        egid: ev.gid,
        cwd: "".into(),
        cgroup_id: ev.cgroup_id,
        exe_memfd: false,
        exe_deleted: false,
        exe_identity: None,
        exec_boot_ns: 0,
        exited: None,
        source: Source::Partial,
        lineage: None,
    }
}

#[cfg(test)]
mod tests {
    use sensor_proto::v1::{ExecEvent, ExitEvent, ForkEvent};

    use super::*;

    fn ev(pid: u32, boot_ns: u64, kind: event::Kind) -> Event {
        Event {
            pid,
            tid: pid,
            boot_ns,
            comm: "t".into(),
            kind: Some(kind),
            ..Default::default()
        }
    }

    fn fork(pid: u32, parent: u32, at: u64) -> Event {
        ev(
            pid,
            at,
            event::Kind::Fork(ForkEvent {
                parent_pid: parent,
                start_boot_ns: at,
                ..Default::default()
            }),
        )
    }

    fn exec(pid: u32, ppid: u32, at: u64, start: u64, exe: &str) -> Event {
        ev(
            pid,
            at,
            event::Kind::Exec(Box::new(ExecEvent {
                ppid,
                exe: exe.into(),
                argv: vec![exe.into()],
                start_boot_ns: start,
                ..Default::default()
            })),
        )
    }

    fn exit(pid: u32, at: u64) -> Event {
        ev(pid, at, event::Kind::Exit(ExitEvent::default()))
    }

    #[test]
    fn fork_exec_exit_builds_ancestry() {
        let mut t = ProcessTable::new(100, 10);
        t.apply(&exec(1, 0, 1, 1, "/sbin/init"));
        t.apply(&fork(10, 1, 5));
        t.apply(&exec(10, 1, 6, 5, "/usr/bin/java"));
        t.apply(&fork(20, 10, 7));
        assert_eq!(
            &*t.get(20).unwrap().exe,
            "/usr/bin/java",
            "fork inherits the image"
        );
        t.apply(&exec(20, 10, 8, 7, "/bin/sh"));
        let chain: Vec<&str> = t.ancestry(20).iter().map(|p| &*p.exe).collect();
        assert_eq!(chain, ["/usr/bin/java", "/sbin/init"]);

        t.apply(&exit(20, 9));
        assert!(t.get(20).unwrap().exited.is_some(), "kept after exit");
        t.apply(&exit(10, 30));
        assert!(t.get(20).is_none(), "pruned after the retention period");
        assert!(t.get(10).is_some());
        assert_eq!(t.stats().pruned, 1);
    }

    #[test]
    fn reused_pid_is_not_a_parent() {
        let mut t = ProcessTable::new(100, 1_000);
        t.apply(&exec(10, 1, 1, 1, "/bin/old"));
        t.apply(&fork(20, 10, 2));
        // pid 10 dies and is reused by an unrelated, younger process.
        t.apply(&exit(10, 3));
        t.apply(&exec(10, 1, 4, 4, "/bin/new"));
        assert!(t.ancestry(20).is_empty());
    }

    #[test]
    fn capacity_evicts_exited_first() {
        let mut t = ProcessTable::new(16, u64::MAX);
        for pid in 1..=16 {
            t.apply(&exec(pid, 0, u64::from(pid), u64::from(pid), "/bin/x"));
        }
        t.apply(&exit(3, 100));
        t.apply(&exec(99, 0, 101, 101, "/bin/y"));
        assert_eq!(t.len(), 16);
        assert!(t.get(3).is_none(), "the exited entry made room");
        t.apply(&exec(100, 0, 102, 102, "/bin/z"));
        assert_eq!(t.len(), 16);
        assert!(t.get(1).is_none(), "then the oldest live one");
        assert_eq!(t.stats().evicted, 2);
    }

    #[test]
    fn ancestry_survives_a_cycle() {
        let mut t = ProcessTable::new(100, 1_000);
        t.apply(&exec(5, 6, 1, 1, "/a"));
        t.apply(&exec(6, 5, 1, 1, "/b"));
        assert!(t.ancestry(5).len() <= MAX_ANCESTRY);
    }
}
