//! Wire structs shared by the eBPF probes (`sensor-ebpf`) and the userspace agent.
//!
//! Every record in the ring buffer starts with a [`Header`]; `Header::kind` says which
//! record follows. Variable-length records (exec, file, ...) carry their strings after the
//! fixed part, in the order documented on each struct. Both sides are built from this one
//! crate and the agent embeds the probes it was built with, so they cannot disagree on a
//! layout; traces keep decoded events (protobuf), not these records.
#![no_std]

pub mod layout;

pub use layout::KernelLayout;

pub const TASK_COMM_LEN: usize = 16;

/// Maximum bytes of argv copied at exec (the kernel's `mm->arg_start..arg_end`).
pub const MAX_ARGS: usize = 4096;
/// Maximum bytes of the exec filename (`bprm->filename`) or a syscall path argument.
pub const MAX_FILENAME: usize = 1024;
/// Maximum bytes of one path component (NAME_MAX + NUL).
pub const MAX_COMPONENT: usize = 256;
/// Maximum path components walked for one path (exe, cwd, file) with `bpf_loop`.
pub const MAX_DEPTH: usize = 48;
/// The same for kernels without `bpf_loop` (5.10), where the verifier checks every step.
pub const BOUNDED_DEPTH: usize = 24;
/// Bound on the offset at which a variable-length field may start inside a record's data.
pub const DATA_OFFSET_LIMIT: usize = 8192;
/// Size of the per-CPU scratch buffer a record is assembled in before it is copied out.
pub const SCRATCH_SIZE: usize = 16384;
/// Bound on the fixed part of a variable-length record (a power of two).
pub const MAX_RECORD_HEADER: usize = 4096;

/// Record kinds (`Header::kind`).
pub mod kind {
    pub const EXEC: u16 = 1;
    pub const EXEC_FAILED: u16 = 2;
    pub const FORK: u16 = 3;
    pub const EXIT: u16 = 4;
    pub const CONNECT: u16 = 5;
    pub const ACCEPT: u16 = 6;
    pub const BIND: u16 = 7;
    pub const LISTEN: u16 = 8;
    pub const SOCKET: u16 = 9;
    pub const DUP: u16 = 10;
    pub const MEMFD_CREATE: u16 = 11;
    pub const PTRACE: u16 = 12;
    pub const VM_WRITE: u16 = 13;
    pub const FILE: u16 = 14;
    pub const MODULE_LOAD: u16 = 15;
    pub const BPF_LOAD: u16 = 16;
    pub const SIGNAL: u16 = 17;
    /// One past the highest kind; sizes the loss counters.
    pub const COUNT: u16 = 18;
}

/// Flags of an exec record (`ExecRecord::exec_flags`).
pub mod exec_flags {
    /// argv was longer than [`super::MAX_ARGS`] and was cut.
    pub const ARGS_TRUNCATED: u32 = 1 << 0;
    /// argv could not be read from the new program's memory.
    pub const ARGS_UNREADABLE: u32 = 1 << 1;
    pub const FILENAME_TRUNCATED: u32 = 1 << 2;
    pub const EXE_PATH_TRUNCATED: u32 = 1 << 3;
    pub const CWD_TRUNCATED: u32 = 1 << 4;
    /// The walk from the executable's dentry ended on a mount outside the task's root:
    /// an internal mount (memfd, anonymous shmem) or a file outside a chroot.
    pub const EXE_OUTSIDE_ROOT: u32 = 1 << 5;
    /// The executable's inode has no links left (unlinked after open, or a memfd).
    pub const EXE_UNLINKED: u32 = 1 << 6;
    /// The record comes from `execveat` (the filename may be relative to a descriptor).
    pub const EXECVEAT: u32 = 1 << 7;
}

/// Common prefix of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub kind: u16,
    pub flags: u16,
    /// Bytes of the whole record, header included.
    pub size: u32,
    /// `bpf_ktime_get_boot_ns()` when the record was made.
    pub boot_ns: u64,
    /// Process id (thread-group id).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Real uid and gid, as seen from the initial user namespace.
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub comm: [u8; TASK_COMM_LEN],
}

/// Descriptor kinds reported for fds 0-2 at exec.
pub mod fd_kind {
    pub const NONE: u8 = 0;
    pub const FILE: u8 = 1;
    pub const DIR: u8 = 2;
    pub const PIPE: u8 = 3;
    pub const SOCKET: u8 = 4;
    pub const TTY: u8 = 5;
    pub const CHAR: u8 = 6;
    pub const OTHER: u8 = 7;
}

/// What a descriptor refers to, with the addresses when it is an inet socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdInfo {
    /// One of [`fd_kind`].
    pub kind: u8,
    /// Socket type (`SOCK_STREAM`...) when `kind` is SOCKET.
    pub sock_type: u8,
    /// Address family (`AF_INET`, `AF_INET6`, `AF_UNIX`...) when `kind` is SOCKET.
    pub family: u16,
    /// Local and remote port, host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    /// Inode number of the open file (pairs the two ends of a pipe).
    pub ino: u64,
    /// IPv4 addresses use the first four bytes.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// A program was executed (`sched_process_exec`).
///
/// Data after the struct: argv (`args_len` bytes, NUL-separated), the filename the caller
/// passed (`filename_len` bytes, no NUL), the executable's path components leaf first, each
/// NUL-terminated (`exe_len` bytes), then the cwd's components the same way (`cwd_len`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecRecord {
    pub hdr: Header,
    /// Thread-group id of the parent (the process, never the forking thread).
    pub ppid: u32,
    pub euid: u32,
    pub egid: u32,
    /// See [`exec_flags`].
    pub exec_flags: u32,
    /// `task->start_boottime` of the process.
    pub start_boot_ns: u64,
    pub exe_ino: u64,
    /// Magic of the executable's filesystem (`TMPFS_MAGIC` for a memfd).
    pub exe_fs_magic: u64,
    /// The executable's size, and its modification and status-change times (seconds).
    pub exe_size: u64,
    pub exe_mtime: i64,
    pub exe_ctime: i64,
    /// Device of the executable's filesystem, in the kernel's encoding (major << 20).
    pub exe_dev: u32,
    /// What enforcement decided for this exec ([`enforce::verdict`]; 0 when nothing).
    pub enforce: u32,
    pub exe_nlink: u32,
    /// The pid before exec: differs from `hdr.pid` when a non-leader thread exec'd.
    pub old_tid: u32,
    /// Name of the parent *thread* (for a JVM, the worker pool that spawned the child).
    pub parent_thread_comm: [u8; TASK_COMM_LEN],
    pub args_len: u16,
    pub filename_len: u16,
    pub exe_len: u16,
    pub cwd_len: u16,
    /// What fds 0, 1 and 2 of the new program refer to.
    pub stdio: [FdInfo; 3],
}

/// An `execve`/`execveat` returned an error.
///
/// Data after the struct: the filename argument (`filename_len` bytes, no NUL).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExecFailedRecord {
    pub hdr: Header,
    /// Positive errno.
    pub errno: i32,
    /// [`exec_flags::EXECVEAT`] or [`exec_flags::FILENAME_TRUNCATED`].
    pub exec_flags: u32,
    /// `dirfd` of `execveat`.
    pub dirfd: i32,
    pub filename_len: u16,
    /// The enforcement verdict when the enforcement hook refused this exec (`EPERM`), in
    /// the encoding of [`enforce::verdict`]; 0 otherwise.
    pub enforce: u16,
}

/// A task was created (`sched_process_fork`). The header names the *child*.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ForkRecord {
    pub hdr: Header,
    /// Thread-group id of the creating process.
    pub parent_pid: u32,
    /// The creating thread.
    pub parent_tid: u32,
    pub parent_thread_comm: [u8; TASK_COMM_LEN],
    pub child_start_boot_ns: u64,
    /// 1 when the new task is a thread of the same process (CLONE_THREAD).
    pub is_thread: u32,
    pub _pad: u32,
}

/// The last thread of a process exited (`sched_process_exit` with `group_dead`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExitRecord {
    pub hdr: Header,
    pub ppid: u32,
    /// Raw wait status: exit status in bits 8-15, terminating signal in bits 0-6,
    /// core-dump flag in bit 7.
    pub exit_code: u32,
    pub start_boot_ns: u64,
}

/// A `connect`, `accept`/`accept4`, `bind` or `listen` (kind in the header).
///
/// Data after the struct: the unix socket path (`unix_path_len` bytes) for AF_UNIX.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NetRecord {
    pub hdr: Header,
    /// The socket's descriptor (for accept, the listening one).
    pub fd: i32,
    /// Syscall result: 0, the accepted descriptor, or a negative errno.
    pub result: i32,
    /// `listen` backlog.
    pub backlog: i32,
    pub unix_path_len: u16,
    pub _pad: u16,
    /// Family, type, local and remote endpoint. For connect the remote endpoint is the
    /// address asked for; for bind the local one is.
    pub sock: FdInfo,
}

/// A socket was created.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketRecord {
    pub hdr: Header,
    pub family: u32,
    /// Socket type without the SOCK_NONBLOCK/SOCK_CLOEXEC flags.
    pub sock_type: u32,
    pub protocol: i32,
    /// The new descriptor or a negative errno.
    pub result: i32,
}

/// Which call duplicated a descriptor.
pub mod dup_call {
    pub const DUP: u32 = 0;
    pub const DUP2: u32 = 1;
    pub const DUP3: u32 = 2;
    pub const FCNTL: u32 = 3;
}

/// A descriptor was duplicated onto fd 0, 1 or 2.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DupRecord {
    pub hdr: Header,
    /// One of [`dup_call`].
    pub call: u32,
    pub oldfd: i32,
    /// The requested target (dup2/dup3), or the minimum (fcntl), or -1 (dup).
    pub newfd: i32,
    /// The descriptor obtained, or a negative errno.
    pub result: i32,
    /// What the duplicated descriptor refers to.
    pub file: FdInfo,
}

/// `memfd_create` was called.
///
/// Data after the struct: the name (`name_len` bytes, no NUL).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemfdRecord {
    pub hdr: Header,
    pub flags: u32,
    pub name_len: u16,
    pub _pad: u16,
}

/// A `ptrace` request that can inject or take control (ATTACH, SEIZE, POKE*, SET*REGS*).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PtraceRecord {
    pub hdr: Header,
    pub request: i64,
    pub target: i32,
    pub result: i32,
    pub addr: u64,
}

/// `process_vm_writev` into another process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmWriteRecord {
    pub hdr: Header,
    pub target: i32,
    pub _pad: i32,
    /// Bytes written, or a negative errno.
    pub result: i64,
    pub local_iovecs: u64,
    pub remote_iovecs: u64,
}

/// File operations reported in watched places (`FileRecord::op`), and the bits of a watch
/// rule saying which of them it wants (`1 << op`).
pub mod file_op {
    /// Opened for writing (or appending) an existing file.
    pub const OPEN_WRITE: u16 = 0;
    /// Opened with O_CREAT.
    pub const CREATE: u16 = 1;
    /// Opened with O_TRUNC, or truncate/ftruncate.
    pub const TRUNCATE: u16 = 2;
    /// Created with an executable mode.
    pub const CREATE_EXEC: u16 = 3;
    /// Renamed onto (or away from) a watched path.
    pub const RENAME: u16 = 4;
    pub const UNLINK: u16 = 5;
    /// chmod/fchmod/fchmodat with an execute bit in the new mode.
    pub const CHMOD_EXEC: u16 = 6;
    /// Access or modification times set (utimensat, utimes, futimesat, utime).
    pub const UTIMES: u16 = 7;
    /// A hard or symbolic link created at a watched path.
    pub const LINK: u16 = 8;
    pub const COUNT: u16 = 9;

    pub const fn bit(op: u16) -> u32 {
        1 << op
    }
    /// Every operation.
    pub const ALL: u32 = (1 << COUNT) - 1;
}

/// A file operation on a watched path.
///
/// Data after the struct: the absolute path (`path_len` bytes), then for a rename the
/// other path (`other_len` bytes): the old name when the new one is watched, or the new
/// name when the old one is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FileRecord {
    pub hdr: Header,
    /// One of [`file_op`].
    pub op: u16,
    /// [`file_info`] bits.
    pub info: u16,
    /// `open` flags, `unlinkat` flags, or `renameat2` flags.
    pub flags: u32,
    /// Mode given to open (O_CREAT) or chmod.
    pub mode: u32,
    pub result: i32,
    pub path_len: u16,
    pub other_len: u16,
    /// Bit 0: `path` was cut; bit 1: `other` was cut.
    pub truncated: u32,
}

/// What is known about a [`FileRecord`]'s paths and outcome (`FileRecord::info`).
pub mod file_info {
    /// `path` is the source of a rename (a watched file moved away).
    pub const PATH_IS_SOURCE: u16 = 1;
    /// `path` was walked up from the file the kernel opened (links, `..`, bind mounts and
    /// `/proc/<pid>/root` resolved), not taken from the caller's string.
    pub const RESOLVED: u16 = 2;
    /// This open created the file (the kernel's FMODE_CREATED); without it, an open that
    /// succeeded found the file in place.
    pub const CREATED: u16 = 4;
    /// `other` is the path as the caller gave it (cwd or directory descriptor resolved).
    pub const OTHER_IS_GIVEN: u16 = 8;
}

/// A kernel module load was attempted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ModuleRecord {
    pub hdr: Header,
    /// 0: init_module, 1: finit_module.
    pub call: u32,
    /// finit_module's descriptor.
    pub fd: i32,
}

/// A BPF program was loaded (`bpf(BPF_PROG_LOAD)`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BpfRecord {
    pub hdr: Header,
    pub prog_type: u32,
    /// The program descriptor, or a negative errno.
    pub result: i32,
    pub name: [u8; 16],
}

/// A signal aimed at the agent (`signal_generate`); the header names the sender.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SignalRecord {
    pub hdr: Header,
    pub signal: i32,
    pub target_pid: u32,
    pub target_tid: u32,
    /// `TRACE_SIGNAL_*` result: 0 delivered, 1 ignored, 2 already pending...
    pub result: i32,
}

/// The syscalls the exit dispatcher hands to a handler. The agent maps this
/// architecture's syscall numbers to these slots (`SLOTS` map); the probes only know slots.
pub mod slot {
    pub const NONE: u32 = 0;
    pub const EXECVE: u32 = 1;
    pub const EXECVEAT: u32 = 2;
    pub const CONNECT: u32 = 3;
    pub const ACCEPT: u32 = 4;
    pub const ACCEPT4: u32 = 5;
    pub const BIND: u32 = 6;
    pub const LISTEN: u32 = 7;
    pub const SOCKET: u32 = 8;
    pub const DUP: u32 = 9;
    pub const DUP2: u32 = 10;
    pub const DUP3: u32 = 11;
    pub const FCNTL: u32 = 12;
    pub const MEMFD_CREATE: u32 = 13;
    pub const PTRACE: u32 = 14;
    pub const PROCESS_VM_WRITEV: u32 = 15;
    pub const OPENAT: u32 = 16;
    pub const OPEN: u32 = 17;
    pub const CREAT: u32 = 18;
    pub const OPENAT2: u32 = 19;
    pub const RENAMEAT2: u32 = 20;
    pub const RENAMEAT: u32 = 21;
    pub const RENAME: u32 = 22;
    pub const UNLINKAT: u32 = 23;
    pub const UNLINK: u32 = 24;
    pub const FCHMODAT: u32 = 25;
    pub const FCHMODAT2: u32 = 26;
    pub const CHMOD: u32 = 27;
    pub const FCHMOD: u32 = 28;
    pub const UTIMENSAT: u32 = 29;
    pub const UTIMES: u32 = 30;
    pub const FUTIMESAT: u32 = 31;
    pub const UTIME: u32 = 32;
    pub const TRUNCATE: u32 = 33;
    pub const FTRUNCATE: u32 = 34;
    pub const LINKAT: u32 = 35;
    pub const LINK: u32 = 36;
    pub const SYMLINKAT: u32 = 37;
    pub const INIT_MODULE: u32 = 38;
    pub const FINIT_MODULE: u32 = 39;
    pub const BPF: u32 = 40;
    /// One past the highest slot; sizes the handler table.
    pub const COUNT: u32 = 41;
}

/// Syscall numbers the dispatcher looks up (`SLOTS` map size).
pub const MAX_SYSCALL_NR: u32 = 1024;

/// A watched path prefix: the LPM trie key (bit length and bytes).
pub const WATCH_KEY_BYTES: usize = 256;

/// A watched path suffix (for names that can be anywhere, like `authorized_keys`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchSuffix {
    /// Bytes used at the end of `bytes` (0 disables the slot).
    pub len: u32,
    /// Operations wanted (`file_op::bit`).
    pub ops: u32,
    /// The suffix, right-aligned, zeros before it.
    pub bytes: [u8; 16],
    /// 0xff where `bytes` holds the suffix, 0 elsewhere.
    pub mask: [u8; 16],
}

/// Slots for watched suffixes.
pub const MAX_WATCH_SUFFIXES: usize = 16;

/// Prevention: the policy the probes apply at exec to the web-tier lineages the agent
/// labels (`--enforce`), and how they report what they decided.
pub mod enforce {
    /// `Config::mode`.
    pub const MODE_OFF: u32 = 0;
    /// Decide and report, stop nothing.
    pub const MODE_AUDIT: u32 = 1;
    pub const MODE_ON: u32 = 2;

    /// `Config::mechanism`: SIGKILL from `sched_process_exec` (the new program never runs
    /// an instruction), or EPERM from the BPF-LSM hook `bprm_check_security`.
    pub const MECH_KILL: u32 = 0;
    pub const MECH_LSM: u32 = 1;

    /// What happened to an exec (the proto `Action` enum has the same numbers).
    pub const ACTION_NONE: u32 = 0;
    pub const ACTION_WOULD_KILL: u32 = 1;
    pub const ACTION_KILLED: u32 = 2;
    pub const ACTION_DENIED: u32 = 3;

    /// Why: the shape that decided.
    pub const REASON_NOT_ALLOWED: u32 = 1;
    /// A shell or interpreter with an inet socket on fd 0, 1 or 2.
    pub const REASON_SOCKET_SHELL: u32 = 2;
    /// An executable with no name left: a memfd or a deleted file.
    pub const REASON_UNLINKED: u32 = 3;
    /// A file written (or changed) since boot under a temporary directory.
    pub const REASON_TMP_WRITTEN: u32 = 4;
    /// Any program with an inet socket on fd 0, 1 or 2, whatever its file.
    pub const REASON_SOCKET_STDIO: u32 = 5;

    /// `Policy` flags of a label.
    pub const ALLOW_LIST: u32 = 1 << 0;
    pub const DENY_SOCKET_SHELL: u32 = 1 << 1;
    pub const DENY_UNLINKED: u32 = 1 << 2;
    pub const DENY_TMP_WRITTEN: u32 = 1 << 3;
    pub const DENY_SOCKET_STDIO: u32 = 1 << 4;

    /// Labels 1..MAX_LABELS (0: none); the `POLICY` array's size.
    pub const MAX_LABELS: u32 = 64;
    /// Directory levels above an executable looked at for a temporary directory.
    pub const TMP_DEPTH: usize = 8;

    /// `action | reason << 4 | label << 8`, small enough for the u16 of a failed exec.
    pub const fn verdict(action: u32, reason: u32, label: u32) -> u32 {
        (action & 0xf) | (reason & 0xf) << 4 | (label & 0xff) << 8
    }
    pub const fn action(verdict: u32) -> u32 {
        verdict & 0xf
    }
    pub const fn reason(verdict: u32) -> u32 {
        (verdict >> 4) & 0xf
    }
    pub const fn label(verdict: u32) -> u32 {
        (verdict >> 8) & 0xff
    }

    /// The global switch (`ENFORCE_CONFIG[0]`), changed by the agent at run time.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Config {
        pub mode: u32,
        pub mechanism: u32,
        /// Boot time as wall-clock seconds: files with a later mtime or ctime were
        /// written since boot.
        pub boot_wall_sec: i64,
    }

    /// The web-tier label of a process (`LINEAGE`, keyed by tgid). `start_boot_ns` ties
    /// the entry to the process it was made for: a recycled pid is not labelled.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Lineage {
        pub start_boot_ns: u64,
        pub label: u32,
        pub _pad: u32,
    }

    /// A file by identity as the kernel sees it (`i_ino`, `s_dev` in the kernel's
    /// encoding), for a label (the allow lists) or label 0 (the shell and tmp-dir sets).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct FileKey {
        pub ino: u64,
        pub dev: u32,
        pub label: u32,
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `repr(C)`, no padding.
    unsafe impl aya::Pod for super::enforce::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::enforce::Lineage {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::enforce::FileKey {}
    // SAFETY: plain-old-data, `repr(C)`, no padding-dependent invariants.
    unsafe impl aya::Pod for super::KernelLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::WatchSuffix {}
}

const _: () = assert!(core::mem::size_of::<ExecRecord>() < MAX_RECORD_HEADER);
const _: () = assert!(MAX_RECORD_HEADER + DATA_OFFSET_LIMIT + MAX_ARGS <= SCRATCH_SIZE);
const _: () = assert!(MAX_RECORD_HEADER.is_power_of_two());
const _: () = assert!(DATA_OFFSET_LIMIT.is_power_of_two());
