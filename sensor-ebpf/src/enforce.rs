//! Prevention (`--enforce`): the policy applied at exec to the web-tier lineages.
//!
//! The agent labels the processes it identifies as web-tier sources (`LINEAGE`); a fork
//! inherits its parent's label here, in the kernel, so a descendant is labelled before it
//! can run anything and no descendant can shed the label. At exec a labelled process is
//! judged against its label's policy (`POLICY`, `ALLOWED`, `SHELLS`, `TMP_DIRS`): an
//! executable outside the label's allow list, any program (or only an installed shell)
//! with an inet socket on its stdio, an
//! executable with no name (memfd, deleted file), or a file written since boot under a
//! temporary directory. Nothing here looks at a name or argv: files are inode and device.
//!
//! Where BPF-LSM is active the exec is refused at `bprm_check_security` (EPERM); elsewhere
//! `sched_process_exec` sends SIGKILL to the new program, which dies before its first
//! instruction. Unlabelled processes, pid 1 and the agent are never touched. Nothing is
//! pinned: when the agent stops, every program and map goes with it.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{bpf_get_current_task, bpf_send_signal},
    },
    macros::{lsm, map},
    maps::{Array, HashMap, LruHashMap},
    programs::LsmContext,
};
use sensor_common::{
    FdInfo,
    enforce::{
        ACTION_DENIED, ACTION_KILLED, ACTION_WOULD_KILL, ALLOW_LIST, Config, DENY_SOCKET_SHELL,
        DENY_SOCKET_STDIO, DENY_TMP_WRITTEN, DENY_UNLINKED, FileKey, Lineage, MAX_LABELS, MECH_LSM,
        MODE_OFF, MODE_ON, REASON_NOT_ALLOWED, REASON_SOCKET_SHELL, REASON_SOCKET_STDIO,
        REASON_TMP_WRITTEN, REASON_UNLINKED, TMP_DEPTH, verdict,
    },
    fd_kind,
};

use crate::kernel::{KPtr, agent_tgid, get, get_ptr, layout_ready, off, read_ptr};

#[map]
pub static ENFORCE_CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Flags of each label (`ALLOW_LIST`, `DENY_*`), indexed by label.
#[map]
pub static POLICY: Array<u32> = Array::with_max_entries(MAX_LABELS, 0);

/// Web-tier label of each labelled process, by tgid.
#[map]
pub static LINEAGE: HashMap<u32, Lineage> = HashMap::with_max_entries(16384, 0);

/// Executables a label's descendants may run (key label = the label).
#[map]
pub static ALLOWED: HashMap<FileKey, u8> = HashMap::with_max_entries(4096, 0);

/// The installed shells and interpreters (key label 0).
#[map]
pub static SHELLS: HashMap<FileKey, u8> = HashMap::with_max_entries(1024, 0);

/// The temporary directories (key label 0).
#[map]
pub static TMP_DIRS: HashMap<FileKey, u8> = HashMap::with_max_entries(64, 0);

/// Verdicts of execs the LSM hook refused, by pid_tgid, until the failed exec reports.
#[map]
pub static DENIED: LruHashMap<u64, u32> = LruHashMap::with_max_entries(1024, 0);

const SIGKILL: u32 = 9;
const EPERM: i32 = 1;
const TMPFS_MAGIC: u64 = 0x0102_1994;

#[inline(always)]
fn config() -> Option<&'static Config> {
    let cfg = ENFORCE_CONFIG.get(0)?;
    (cfg.mode != MODE_OFF).then_some(cfg)
}

/// A fork: the child process takes its parent's label.
#[inline(always)]
pub fn inherit(parent: KPtr, child_tgid: u32, child_start_ns: u64) {
    let leader = get_ptr(parent, off!(task_group_leader));
    let parent_tgid = get::<u32>(parent, off!(task_tgid));
    let Some(label) = label_of(parent_tgid, leader) else {
        return;
    };
    let entry = Lineage {
        start_boot_ns: child_start_ns,
        label,
        _pad: 0,
    };
    let _ = LINEAGE.insert(&child_tgid, &entry, 0);
}

/// The last thread of `tgid` exited.
#[inline(always)]
pub fn forget(tgid: u32) {
    let _ = LINEAGE.remove(&tgid);
}

/// The label of process `tgid` whose group leader is `leader`, if it has one. An entry
/// made for an earlier process with the same pid does not count (the agent writes 0 as
/// the start time only for processes it found running at start, and checks them).
#[inline(always)]
fn label_of(tgid: u32, leader: KPtr) -> Option<u32> {
    // SAFETY: a map value read; entries are plain data.
    let entry = unsafe { LINEAGE.get(&tgid) }?;
    let start = get::<u64>(leader, off!(task_start_boottime));
    (entry.label != 0 && (entry.start_boot_ns == 0 || entry.start_boot_ns == start))
        .then_some(entry.label)
}

/// What the kernel says of the executable being judged.
pub struct Exe {
    pub inode: KPtr,
    pub dentry: KPtr,
    pub ino: u64,
    pub dev: u32,
    pub nlink: u32,
    pub mtime: i64,
    pub ctime: i64,
}

impl Exe {
    #[inline(always)]
    pub fn of_file(file: KPtr) -> Option<Exe> {
        let inode = read_ptr(file, off!(file_f_inode)).ok()?;
        let dentry = read_ptr(file, off!(file_f_path) + off!(path_dentry)).ok()?;
        let sb = get_ptr(inode, off!(inode_i_sb));
        Some(Exe {
            inode,
            dentry,
            ino: get::<u64>(inode, off!(inode_i_ino)),
            dev: get::<u32>(sb, off!(sb_s_dev)),
            nlink: get::<u32>(inode, off!(inode_i_nlink)),
            mtime: get::<i64>(inode, off!(inode_mtime_sec)),
            ctime: get::<i64>(inode, off!(inode_ctime_sec)),
        })
    }

    /// No name left: deleted, or a memfd (a tmpfs dentry that is its own parent).
    #[inline(always)]
    fn unlinked(&self) -> bool {
        if self.nlink == 0 {
            return true;
        }
        let parent = get_ptr(self.dentry, off!(dentry_d_parent));
        let sb = get_ptr(self.inode, off!(inode_i_sb));
        parent == self.dentry && get::<u64>(sb, off!(sb_s_magic)) == TMPFS_MAGIC
    }

    /// Under one of the temporary directories, up to `TMP_DEPTH` levels above.
    #[inline(always)]
    fn in_tmp_dir(&self) -> bool {
        let mut dentry = self.dentry;
        for _ in 0..TMP_DEPTH {
            let parent = get_ptr(dentry, off!(dentry_d_parent));
            if parent.is_null() || parent == dentry {
                return false;
            }
            let inode = get_ptr(parent, off!(dentry_d_inode));
            let sb = get_ptr(inode, off!(inode_i_sb));
            let key = FileKey {
                ino: get::<u64>(inode, off!(inode_i_ino)),
                dev: get::<u32>(sb, off!(sb_s_dev)),
                label: 0,
            };
            // SAFETY: a map lookup of plain data.
            if unsafe { TMP_DIRS.get(&key) }.is_some() {
                return true;
            }
            dentry = parent;
        }
        false
    }
}

/// Whether any of fds 0-2 is an inet socket.
#[inline(always)]
pub fn inet_stdio(stdio: &[FdInfo; 3]) -> bool {
    let inet = |f: &FdInfo| f.kind == fd_kind::SOCKET && (f.family == 2 || f.family == 10);
    inet(&stdio[0]) || inet(&stdio[1]) || inet(&stdio[2])
}

/// The shape of `label`'s policy that `exe` breaks (a `REASON_*`), or 0.
#[inline(always)]
fn judge(cfg: &Config, label: u32, exe: &Exe, inet_stdio: bool) -> u32 {
    let Some(&flags) = POLICY.get(label) else {
        return 0;
    };
    if flags & DENY_UNLINKED != 0 && exe.unlinked() {
        return REASON_UNLINKED;
    }
    let file = |label| FileKey {
        ino: exe.ino,
        dev: exe.dev,
        label,
    };
    // Whatever the file is: a copy or rename of a shell is still wired to the network.
    if flags & DENY_SOCKET_STDIO != 0 && inet_stdio {
        return REASON_SOCKET_STDIO;
    }
    // SAFETY: map lookups of plain data.
    if flags & DENY_SOCKET_SHELL != 0 && inet_stdio && unsafe { SHELLS.get(&file(0)) }.is_some() {
        return REASON_SOCKET_SHELL;
    }
    let changed = if exe.mtime > exe.ctime {
        exe.mtime
    } else {
        exe.ctime
    };
    if flags & DENY_TMP_WRITTEN != 0 && changed >= cfg.boot_wall_sec && exe.in_tmp_dir() {
        return REASON_TMP_WRITTEN;
    }
    // SAFETY: as above.
    if flags & ALLOW_LIST != 0 && unsafe { ALLOWED.get(&file(label)) }.is_none() {
        return REASON_NOT_ALLOWED;
    }
    0
}

/// `sched_process_exec`: judges the new program of `task` (process `tgid`) and, when it
/// breaks its lineage's policy, kills it (`on`) or only says so (`audit`). Returns the
/// verdict for the exec record.
#[inline(always)]
pub fn at_exec(task: KPtr, tgid: u32, exe_file: KPtr, stdio: &[FdInfo; 3]) -> u32 {
    let Some(cfg) = config() else {
        return 0;
    };
    if tgid <= 1 || tgid == agent_tgid() {
        return 0;
    }
    let Some(label) = label_of(tgid, task) else {
        return 0;
    };
    let Some(exe) = Exe::of_file(exe_file) else {
        return 0;
    };
    let reason = judge(cfg, label, &exe, inet_stdio(stdio));
    if reason == 0 {
        return 0;
    }
    let action = if cfg.mode == MODE_ON {
        // SAFETY: signals the current process, the one that just exec'd; the signal is
        // delivered before it returns to user space.
        if unsafe { bpf_send_signal(SIGKILL) } == 0 {
            ACTION_KILLED
        } else {
            ACTION_WOULD_KILL
        }
    } else {
        ACTION_WOULD_KILL
    };
    verdict(action, reason, label)
}

/// Where BPF-LSM is active and enforcement is on: refuses the exec before the old
/// program is replaced. A script is judged by its interpreter (the next call), as the
/// exec path judges the program the kernel runs.
#[lsm(hook = "bprm_check_security")]
pub fn enforce_bprm(ctx: LsmContext) -> i32 {
    let previous: i32 = ctx.arg(1);
    if previous != 0 {
        return previous;
    }
    if !layout_ready() {
        return 0;
    }
    match on_bprm(&ctx) {
        Some(v) => {
            let _ = DENIED.insert(&bpf_get_current_pid_tgid(), &v, 0);
            -EPERM
        }
        None => 0,
    }
}

#[inline(always)]
fn on_bprm(ctx: &LsmContext) -> Option<u32> {
    let cfg = config()?;
    if cfg.mode != MODE_ON || cfg.mechanism != MECH_LSM {
        return None;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid <= 1 || tgid == agent_tgid() {
        return None;
    }
    let bprm: KPtr = ctx.arg(0);
    // SAFETY: the helper returns the running task.
    let task = unsafe { bpf_get_current_task() } as KPtr;
    let leader = get_ptr(task, off!(task_group_leader));
    let label = label_of(tgid, leader)?;
    if get::<u16>(bprm, off!(bprm_buf)) == u16::from_le_bytes(*b"#!") {
        return None;
    }
    let exe = Exe::of_file(get_ptr(bprm, off!(bprm_file)))?;
    let mut stdio = [FdInfo::default(); 3];
    crate::kernel::describe_file(crate::kernel::task_fd_file(task, 0), &mut stdio[0]);
    crate::kernel::describe_file(crate::kernel::task_fd_file(task, 1), &mut stdio[1]);
    crate::kernel::describe_file(crate::kernel::task_fd_file(task, 2), &mut stdio[2]);
    let reason = judge(cfg, label, &exe, inet_stdio(&stdio));
    (reason != 0).then_some(verdict(ACTION_DENIED, reason, label))
}

/// A failed exec: the verdict of the LSM hook if it was the one that refused it.
#[inline(always)]
pub fn denied_verdict() -> u32 {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: a map lookup of plain data.
    let v = unsafe { DENIED.get(&key) }.copied().unwrap_or(0);
    if v != 0 {
        let _ = DENIED.remove(&key);
    }
    v
}
