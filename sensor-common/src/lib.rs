//! Wire structs shared by the eBPF probes (`sensor-ebpf`) and the userspace agent.
//!
//! Every record in the ring buffer starts with a [`Header`]; `Header::kind` says which
//! record follows. Variable-length records (exec, file, ...) carry their strings after the
//! fixed part, in the order documented on each struct. Layout changes must bump
//! [`WIRE_VERSION`], which the agent checks against the probes it embeds.
#![no_std]

pub mod layout;

pub use layout::KernelLayout;

/// Version of the records below; the agent refuses probes built with another version.
pub const WIRE_VERSION: u32 = 1;

pub const TASK_COMM_LEN: usize = 16;

/// Maximum bytes of argv copied at exec (the kernel's `mm->arg_start..arg_end`).
pub const MAX_ARGS: usize = 4096;
/// Maximum bytes of the exec filename (`bprm->filename`) or a syscall path argument.
pub const MAX_FILENAME: usize = 1024;
/// Maximum bytes of one path component (NAME_MAX + NUL).
pub const MAX_COMPONENT: usize = 256;
/// Maximum path components walked for one path (exe, cwd, file).
pub const MAX_DEPTH: usize = 48;
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
    /// One past the highest kind; sizes the loss counters.
    pub const COUNT: u16 = 5;

    pub const fn name(kind: u16) -> &'static str {
        match kind {
            EXEC => "exec",
            EXEC_FAILED => "exec_failed",
            FORK => "fork",
            EXIT => "exit",
            _ => "unknown",
        }
    }
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
    pub _pad: u16,
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

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `repr(C)`, no padding-dependent invariants.
    unsafe impl aya::Pod for super::KernelLayout {}
}

/// Sizes the agent checks against what the probes declare.
pub const fn record_sizes() -> [(u16, usize); 4] {
    [
        (kind::EXEC, core::mem::size_of::<ExecRecord>()),
        (kind::EXEC_FAILED, core::mem::size_of::<ExecFailedRecord>()),
        (kind::FORK, core::mem::size_of::<ForkRecord>()),
        (kind::EXIT, core::mem::size_of::<ExitRecord>()),
    ]
}

const _: () = assert!(core::mem::size_of::<ExecRecord>() < MAX_RECORD_HEADER);
const _: () = assert!(MAX_RECORD_HEADER + DATA_OFFSET_LIMIT + MAX_ARGS <= SCRATCH_SIZE);
const _: () = assert!(MAX_RECORD_HEADER.is_power_of_two());
const _: () = assert!(DATA_OFFSET_LIMIT.is_power_of_two());
