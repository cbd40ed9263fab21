//! Decoding: kernel records (`sensor-common` wire structs) into `sensor.v1` events.
//!
//! This is the first stage that replay shares with a live run's later stages: everything
//! after it works on `Event`s and never sees raw records. Bad records are errors that say
//! what is wrong, never panics.

use std::{mem::size_of, net::IpAddr};

use pbjson_types::Timestamp;
use sensor_common::{
    BpfRecord, DupRecord, ExecFailedRecord, ExecRecord, ExitRecord, FdInfo as WireFd, FileRecord,
    ForkRecord, Header, MemfdRecord, ModuleRecord, NetRecord, PtraceRecord, SignalRecord,
    SocketRecord, VmWriteRecord, dup_call, exec_flags, fd_kind, file_info, file_op, kind,
};
use sensor_proto::{
    EventKind,
    v1::{
        AcceptEvent, Action, BindEvent, BpfLoadEvent, ConnectEvent, DupEvent, Enforcement, Event,
        ExecEvent, ExecFailedEvent, ExitEvent, FdInfo, FdKind, FileEvent, FileOp, ForkEvent,
        ListenEvent, MemfdCreateEvent, ModuleLoadEvent, ProcMemWriteEvent, ProcessVmWriteEvent,
        PtraceEvent, SignalEvent, SocketEvent, SocketInfo, event,
    },
};

/// Magic number of tmpfs/shmem superblocks, where memfds live.
pub const TMPFS_MAGIC: u64 = 0x0102_1994;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {need}-byte {what}")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("record of kind {0} is unknown to this agent")]
    UnknownKind(u16),
    #[error("{what} record says its strings take {claimed} bytes but only {available} follow")]
    Overrun {
        what: &'static str,
        claimed: usize,
        available: usize,
    },
}

/// What decoding needs to know besides the record: the clock, and who the agent is.
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeContext {
    pub clock: BootClock,
    /// The agent's pid, to mark signals, ptrace and memory writes aimed at it.
    pub agent_pid: u32,
}

/// Converts the kernel's boot-based clock to wall-clock time.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootClock {
    /// Wall-clock nanoseconds at boot (CLOCK_REALTIME - CLOCK_BOOTTIME).
    pub boot_epoch_ns: i128,
}

impl BootClock {
    /// Measures the offset between the wall clock and the boot clock now.
    pub fn now() -> Self {
        let real = clock_ns(libc::CLOCK_REALTIME);
        let boot = clock_ns(libc::CLOCK_BOOTTIME);
        Self {
            boot_epoch_ns: real - boot,
        }
    }

    pub fn wall(&self, boot_ns: u64) -> Timestamp {
        // In 64 bits (every time until 2262) the divisions by a constant are multiplies;
        // in 128 they are library calls, and this runs for every event.
        if let Ok(epoch) = i64::try_from(self.boot_epoch_ns)
            && let Ok(boot) = i64::try_from(boot_ns)
            && let Some(ns) = epoch.checked_add(boot)
        {
            return Timestamp {
                seconds: ns.div_euclid(1_000_000_000),
                nanos: ns.rem_euclid(1_000_000_000) as i32,
            };
        }
        let ns = self.boot_epoch_ns + i128::from(boot_ns);
        Timestamp {
            seconds: ns.div_euclid(1_000_000_000) as i64,
            nanos: ns.rem_euclid(1_000_000_000) as i32,
        }
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Reads a `T` from the start of `bytes`.
fn read_struct<T: Copy>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::Short {
            what,
            len: bytes.len(),
            need: size_of::<T>(),
        });
    }
    // SAFETY: length checked above; the wire structs are plain `repr(C)` integers and byte
    // arrays, valid for any bit pattern; read_unaligned copes with the ring's alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Splits `len` bytes off the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], len: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
    if len > rest.len() {
        return Err(DecodeError::Overrun {
            what,
            claimed: len,
            available: rest.len(),
        });
    }
    let (head, tail) = rest.split_at(len);
    *rest = tail;
    Ok(head)
}

/// Kernel bytes as text; invalid UTF-8 becomes U+FFFD. Valid text (nearly all of it)
/// takes the standard library's fast validation and one copy.
fn lossy(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    push_lossy(&mut text, bytes);
    text
}

/// Appends kernel bytes as text to `out` (see `lossy`).
fn push_lossy(out: &mut String, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => out.push_str(text),
        Err(_) => out.push_str(&String::from_utf8_lossy(bytes)),
    }
}

/// A fixed-size C string (comm): up to the first NUL.
fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    lossy(&bytes[..end])
}

/// argv as laid out in memory: NUL-separated, the last one possibly cut without its NUL.
fn split_args(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes.split(|&b| b == 0).map(lossy).collect()
}

/// Joins path components written leaf first, each NUL-terminated, into an absolute path.
fn join_components(bytes: &[u8]) -> String {
    let mut parts: Vec<&[u8]> = bytes
        .split(|&b| b == 0)
        .filter(|part| !part.is_empty())
        .collect();
    if parts.is_empty() {
        return "/".to_owned();
    }
    parts.reverse();
    let mut path = String::with_capacity(bytes.len() + 1);
    for part in parts {
        // A memfd's dentry is "memfd:NAME" with no parent; a root component "/" (the
        // dentry of a pseudo filesystem's root) adds nothing.
        if part == b"/" {
            continue;
        }
        path.push('/');
        push_lossy(&mut path, part);
    }
    if path.is_empty() {
        "/".to_owned()
    } else {
        path
    }
}

fn header_event(hdr: &Header, clock: &BootClock) -> Event {
    Event {
        time: Some(clock.wall(hdr.boot_ns)),
        boot_ns: hdr.boot_ns,
        pid: hdr.pid,
        tid: hdr.tid,
        uid: hdr.uid,
        gid: hdr.gid,
        comm: cstr(&hdr.comm),
        cgroup_id: hdr.cgroup_id,
        kind: None,
    }
}

/// Decodes one ring-buffer record. `Ok(None)` is a record that is deliberately not an
/// event (a write-open under /proc that is not a process's memory).
/// A kernel `dev_t` (major in the top 12 bits, minor in the low 20) as `stat` reports it.
fn user_dev(kernel: u32) -> u64 {
    let (major, minor) = (kernel >> 20, kernel & 0xfffff);
    libc::makedev(major, minor)
}

/// The kind of the events records of wire kind `kind` decode to (a file record may also
/// become a `proc_mem_write`; its losses count as `file`); `None` for an unknown kind.
pub fn record_event_kind(kind: u16) -> Option<EventKind> {
    Some(match kind {
        kind::EXEC => EventKind::Exec,
        kind::EXEC_FAILED => EventKind::ExecFailed,
        kind::FORK => EventKind::Fork,
        kind::EXIT => EventKind::Exit,
        kind::CONNECT => EventKind::Connect,
        kind::ACCEPT => EventKind::Accept,
        kind::BIND => EventKind::Bind,
        kind::LISTEN => EventKind::Listen,
        kind::SOCKET => EventKind::Socket,
        kind::DUP => EventKind::Dup,
        kind::MEMFD_CREATE => EventKind::MemfdCreate,
        kind::PTRACE => EventKind::Ptrace,
        kind::VM_WRITE => EventKind::ProcessVmWrite,
        kind::FILE => EventKind::File,
        kind::MODULE_LOAD => EventKind::ModuleLoad,
        kind::BPF_LOAD => EventKind::BpfLoad,
        kind::SIGNAL => EventKind::Signal,
        _ => return None,
    })
}

pub fn decode(bytes: &[u8], ctx: &DecodeContext) -> Result<Option<Event>, DecodeError> {
    let clock = &ctx.clock;
    let hdr: Header = read_struct(bytes, "header")?;
    let mut ev = header_event(&hdr, clock);
    ev.kind = Some(match hdr.kind {
        kind::EXEC => event::Kind::Exec(Box::new(decode_exec(bytes, clock)?)),
        kind::EXEC_FAILED => event::Kind::ExecFailed(decode_exec_failed(bytes)?),
        kind::FORK => {
            let r: ForkRecord = read_struct(bytes, "fork record")?;
            event::Kind::Fork(ForkEvent {
                parent_pid: r.parent_pid,
                parent_tid: r.parent_tid,
                parent_thread_comm: cstr(&r.parent_thread_comm),
                thread: r.is_thread != 0,
                start_boot_ns: r.child_start_boot_ns,
                start_time: Some(clock.wall(r.child_start_boot_ns)),
            })
        }
        kind::EXIT => {
            let r: ExitRecord = read_struct(bytes, "exit record")?;
            event::Kind::Exit(ExitEvent {
                ppid: r.ppid,
                exit_code: ((r.exit_code >> 8) & 0xff) as i32,
                signal: r.exit_code & 0x7f,
                core_dumped: r.exit_code & 0x80 != 0,
                start_boot_ns: r.start_boot_ns,
            })
        }
        kind::CONNECT | kind::ACCEPT | kind::BIND | kind::LISTEN => decode_net(hdr.kind, bytes)?,
        kind::SOCKET => {
            let r: SocketRecord = read_struct(bytes, "socket record")?;
            event::Kind::Socket(SocketEvent {
                family: family_name(r.family as u16),
                r#type: socket_type_name(r.sock_type as u8),
                protocol: r.protocol,
                fd: r.result.max(-1),
                error: error_of(r.result),
            })
        }
        kind::DUP => {
            let r: DupRecord = read_struct(bytes, "dup record")?;
            event::Kind::Dup(DupEvent {
                call: match r.call {
                    dup_call::DUP => "dup",
                    dup_call::DUP2 => "dup2",
                    dup_call::DUP3 => "dup3",
                    _ => "fcntl",
                }
                .into(),
                oldfd: r.oldfd,
                newfd: r.newfd,
                result: r.result,
                error: error_of(r.result),
                file: Some(fd_info(r.result.max(0) as u32, &r.file)),
            })
        }
        kind::MEMFD_CREATE => {
            let r: MemfdRecord = read_struct(bytes, "memfd record")?;
            let mut rest = &bytes[size_of::<MemfdRecord>()..];
            let name = take(&mut rest, usize::from(r.name_len), "memfd name")?;
            event::Kind::MemfdCreate(MemfdCreateEvent {
                name: lossy(name),
                flags: r.flags,
                flag_names: memfd_flag_names(r.flags),
            })
        }
        kind::PTRACE => {
            let r: PtraceRecord = read_struct(bytes, "ptrace record")?;
            event::Kind::Ptrace(PtraceEvent {
                request: ptrace_request_name(r.request).into(),
                request_code: r.request,
                target_pid: r.target as u32,
                addr: r.addr,
                result: r.result,
                error: error_of(r.result),
                target_is_agent: ctx.agent_pid != 0 && r.target as u32 == ctx.agent_pid,
            })
        }
        kind::VM_WRITE => {
            let r: VmWriteRecord = read_struct(bytes, "process_vm_writev record")?;
            event::Kind::ProcessVmWrite(ProcessVmWriteEvent {
                target_pid: r.target as u32,
                bytes: r.result,
                error: if r.result < 0 {
                    errno_name((-r.result) as i32)
                } else {
                    String::new()
                },
                local_iovecs: r.local_iovecs,
                remote_iovecs: r.remote_iovecs,
                target_is_agent: ctx.agent_pid != 0 && r.target as u32 == ctx.agent_pid,
            })
        }
        kind::FILE => match decode_file(bytes, ctx)? {
            Some(kind) => kind,
            None => return Ok(None),
        },
        kind::MODULE_LOAD => {
            let r: ModuleRecord = read_struct(bytes, "module record")?;
            event::Kind::ModuleLoad(ModuleLoadEvent {
                call: if r.call == 0 {
                    "init_module"
                } else {
                    "finit_module"
                }
                .into(),
                fd: r.fd,
            })
        }
        kind::BPF_LOAD => {
            let r: BpfRecord = read_struct(bytes, "bpf record")?;
            event::Kind::BpfLoad(BpfLoadEvent {
                prog_type: r.prog_type,
                prog_name: cstr(&r.name),
                result: r.result,
                error: error_of(r.result),
            })
        }
        kind::SIGNAL => {
            let r: SignalRecord = read_struct(bytes, "signal record")?;
            event::Kind::Signal(SignalEvent {
                signal: r.signal,
                signal_name: signal_name(r.signal).into(),
                target_pid: r.target_pid,
                target_tid: r.target_tid,
                result: r.result,
            })
        }
        other => return Err(DecodeError::UnknownKind(other)),
    });
    Ok(Some(ev))
}

/// The errno name of a negative syscall result, empty for a success.
fn error_of(result: i32) -> String {
    if result < 0 {
        errno_name(-result)
    } else {
        String::new()
    }
}

fn decode_net(kind: u16, bytes: &[u8]) -> Result<event::Kind, DecodeError> {
    let r: NetRecord = read_struct(bytes, "network record")?;
    let mut rest = &bytes[size_of::<NetRecord>()..];
    let raw_path = take(&mut rest, usize::from(r.unix_path_len), "unix socket path")?;
    let unix_path = unix_path(raw_path);
    let socket = Some(socket_info(&r.sock));
    let error = error_of(r.result);
    Ok(match kind {
        kind::CONNECT => event::Kind::Connect(ConnectEvent {
            fd: r.fd,
            socket,
            result: r.result,
            in_progress: r.result == -libc::EINPROGRESS,
            error,
            unix_path,
        }),
        kind::ACCEPT => event::Kind::Accept(AcceptEvent { fd: r.fd, socket }),
        kind::BIND => event::Kind::Bind(BindEvent {
            fd: r.fd,
            socket,
            result: r.result,
            error,
            unix_path,
        }),
        _ => event::Kind::Listen(ListenEvent {
            fd: r.fd,
            socket,
            backlog: r.backlog,
            result: r.result,
            error,
        }),
    })
}

/// A `sun_path`: up to the first NUL; an abstract name (leading NUL) as `@name`.
fn unix_path(raw: &[u8]) -> String {
    match raw.split_first() {
        None => String::new(),
        Some((0, name)) => {
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            format!("@{}", String::from_utf8_lossy(&name[..end]))
        }
        Some(_) => cstr(raw),
    }
}

/// `/proc/PID/mem` (or `/proc/self/mem`, `/proc/PID/task/TID/mem`): the target pid.
fn proc_mem_target(path: &str, writer: u32) -> Option<u32> {
    let rest = path.strip_prefix("/proc/")?.strip_suffix("/mem")?;
    let first = rest.split('/').next()?;
    let pid = match first {
        "self" | "thread-self" => writer,
        digits => digits.parse().ok()?,
    };
    // Anything between the pid and "/mem" must be "task/TID".
    let middle = rest[first.len()..].trim_start_matches('/');
    let ok = middle.is_empty()
        || middle
            .strip_prefix("task/")
            .is_some_and(|tid| tid.bytes().all(|b| b.is_ascii_digit()) && !tid.is_empty());
    ok.then_some(pid)
}

fn decode_file(bytes: &[u8], ctx: &DecodeContext) -> Result<Option<event::Kind>, DecodeError> {
    let r: FileRecord = read_struct(bytes, "file record")?;
    let hdr: Header = read_struct(bytes, "header")?;
    let mut rest = &bytes[size_of::<FileRecord>()..];
    let path = lossy(take(&mut rest, usize::from(r.path_len), "file path")?);
    let other = lossy(take(
        &mut rest,
        usize::from(r.other_len),
        "other file path",
    )?);
    if path.starts_with("/proc/") {
        // The /proc rule only exists to catch writes into a process's memory.
        return Ok(proc_mem_target(&path, hdr.pid).map(|target| {
            event::Kind::ProcMemWrite(ProcMemWriteEvent {
                target_pid: target,
                path,
                result: r.result,
                error: error_of(r.result),
                target_is_agent: ctx.agent_pid != 0 && target == ctx.agent_pid,
            })
        }));
    }
    let op = match r.op {
        file_op::OPEN_WRITE => FileOp::OpenWrite,
        file_op::CREATE => FileOp::Create,
        file_op::TRUNCATE => FileOp::Truncate,
        file_op::CREATE_EXEC => FileOp::CreateExec,
        file_op::RENAME => FileOp::Rename,
        file_op::UNLINK => FileOp::Unlink,
        file_op::CHMOD_EXEC => FileOp::ChmodExec,
        file_op::UTIMES => FileOp::Utimes,
        file_op::LINK => FileOp::Link,
        _ => FileOp::Unspecified,
    };
    let resolved = r.info & file_info::RESOLVED != 0;
    let created = r.info & file_info::CREATED != 0;
    let (other, given) = if r.info & file_info::OTHER_IS_GIVEN != 0 {
        // The caller's string, kept only where it says something the resolved path does not.
        let given = normalize(&other);
        (
            String::new(),
            if given == path { String::new() } else { given },
        )
    } else {
        (other, String::new())
    };
    Ok(Some(event::Kind::File(FileEvent {
        op: op as i32,
        path,
        path_truncated: r.truncated & 1 != 0,
        other_path: other,
        path_is_source: r.info & file_info::PATH_IS_SOURCE != 0,
        flags: r.flags,
        mode: r.mode,
        result: r.result,
        error: error_of(r.result),
        given_path: given,
        resolved,
        created,
        existed: resolved && !created,
    })))
}

/// Removes `.` components and repeated slashes (`/tmp/./x` and `/tmp//x` are `/tmp/x`);
/// `..` stays, since resolving it needs the filesystem (symbolic links).
pub fn normalize(path: &str) -> String {
    if path.is_empty() {
        return String::new();
    }
    let mut out = String::with_capacity(path.len());
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        out.push('/');
        out.push_str(part);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn memfd_flag_names(flags: u32) -> Vec<String> {
    const NAMES: [(u32, &str); 5] = [
        (0x1, "MFD_CLOEXEC"),
        (0x2, "MFD_ALLOW_SEALING"),
        (0x4, "MFD_HUGETLB"),
        (0x8, "MFD_NOEXEC_SEAL"),
        (0x10, "MFD_EXEC"),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect()
}

fn ptrace_request_name(request: i64) -> &'static str {
    match request {
        4 => "PTRACE_POKETEXT",
        5 => "PTRACE_POKEDATA",
        6 => "PTRACE_POKEUSER",
        13 => "PTRACE_SETREGS",
        15 => "PTRACE_SETFPREGS",
        16 => "PTRACE_ATTACH",
        0x4205 => "PTRACE_SETREGSET",
        0x4206 => "PTRACE_SEIZE",
        _ => "PTRACE_OTHER",
    }
}

/// The signal's name ("SIGTERM"), "SIGRT" for a real-time or unknown number.
pub fn signal_name(signal: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(signal).map_or("SIGRT", |s| s.as_str())
}

fn decode_exec(bytes: &[u8], clock: &BootClock) -> Result<ExecEvent, DecodeError> {
    let r: ExecRecord = read_struct(bytes, "exec record")?;
    let mut rest = &bytes[size_of::<ExecRecord>()..];
    let args = take(&mut rest, usize::from(r.args_len), "exec argv")?;
    let filename = take(&mut rest, usize::from(r.filename_len), "exec filename")?;
    let exe = take(&mut rest, usize::from(r.exe_len), "exec exe path")?;
    let cwd = take(&mut rest, usize::from(r.cwd_len), "exec cwd")?;
    let flags = r.exec_flags;
    let exe_path = if r.exe_len == 0 {
        String::new()
    } else {
        join_components(exe)
    };
    let exe_name = exe_path.rsplit('/').next().unwrap_or("");
    let exe_deleted = flags & exec_flags::EXE_UNLINKED != 0;
    let exe_outside_root = flags & exec_flags::EXE_OUTSIDE_ROOT != 0;
    Ok(ExecEvent {
        ppid: r.ppid,
        parent_thread_comm: cstr(&r.parent_thread_comm),
        filename: lossy(filename),
        filename_truncated: flags & exec_flags::FILENAME_TRUNCATED != 0,
        argv: split_args(args),
        argv_truncated: flags & exec_flags::ARGS_TRUNCATED != 0,
        argv_unreadable: flags & exec_flags::ARGS_UNREADABLE != 0,
        exe_memfd: r.exe_fs_magic == TMPFS_MAGIC
            && exe_deleted
            && exe_outside_root
            && exe_name.starts_with("memfd:"),
        exe: exe_path,
        exe_truncated: flags & exec_flags::EXE_PATH_TRUNCATED != 0,
        exe_deleted,
        exe_outside_root,
        exe_inode: r.exe_ino,
        exe_fs_magic: r.exe_fs_magic,
        exe_dev: user_dev(r.exe_dev),
        exe_size: r.exe_size,
        exe_mtime: r.exe_mtime,
        exe_ctime: r.exe_ctime,
        // Filled in by the pipeline (`executables.rs`, `connections.rs`) from /proc.
        exe_identity: None,
        parent_connections: Vec::new(),
        cwd: if r.cwd_len == 0 {
            String::new()
        } else {
            join_components(cwd)
        },
        cwd_truncated: flags & exec_flags::CWD_TRUNCATED != 0,
        euid: r.euid,
        egid: r.egid,
        start_boot_ns: r.start_boot_ns,
        start_time: Some(clock.wall(r.start_boot_ns)),
        old_tid: r.old_tid,
        stdio: r
            .stdio
            .iter()
            .enumerate()
            .map(|(fd, info)| fd_info(fd as u32, info))
            .collect(),
        execveat: flags & exec_flags::EXECVEAT != 0,
        enforcement: enforcement(r.enforce).map(Box::new),
    })
}

/// The kernel's enforcement verdict; the agent names the identity and rule later
/// (`enforce::Policy::name`).
fn enforcement(verdict: u32) -> Option<Enforcement> {
    use sensor_common::enforce as e;
    let action = match e::action(verdict) {
        e::ACTION_WOULD_KILL => Action::WouldKill,
        e::ACTION_KILLED => Action::Killed,
        e::ACTION_DENIED => Action::Denied,
        _ => return None,
    };
    let reason = match e::reason(verdict) {
        e::REASON_NOT_ALLOWED => "not_allowed",
        e::REASON_SOCKET_SHELL => "socket_shell",
        e::REASON_SOCKET_STDIO => "socket_stdio",
        e::REASON_UNLINKED => "unlinked",
        e::REASON_TMP_WRITTEN => "tmp_written",
        _ => "unknown",
    };
    Some(Enforcement {
        action: action as i32,
        reason: reason.to_owned(),
        label: e::label(verdict),
        ..Default::default()
    })
}

fn decode_exec_failed(bytes: &[u8]) -> Result<ExecFailedEvent, DecodeError> {
    let r: ExecFailedRecord = read_struct(bytes, "failed-exec record")?;
    let mut rest = &bytes[size_of::<ExecFailedRecord>()..];
    let filename = take(
        &mut rest,
        usize::from(r.filename_len),
        "failed-exec filename",
    )?;
    Ok(ExecFailedEvent {
        filename: lossy(filename),
        filename_truncated: r.exec_flags & exec_flags::FILENAME_TRUNCATED != 0,
        errno: r.errno,
        error: errno_name(r.errno),
        execveat: r.exec_flags & exec_flags::EXECVEAT != 0,
        dirfd: r.dirfd,
        enforcement: enforcement(u32::from(r.enforce)).map(Box::new),
    })
}

pub fn fd_info(fd: u32, wire: &WireFd) -> FdInfo {
    let kind = match wire.kind {
        fd_kind::NONE => FdKind::None,
        fd_kind::FILE => FdKind::File,
        fd_kind::DIR => FdKind::Dir,
        fd_kind::PIPE => FdKind::Pipe,
        fd_kind::SOCKET => FdKind::Socket,
        fd_kind::TTY => FdKind::Tty,
        fd_kind::CHAR => FdKind::Char,
        _ => FdKind::Other,
    };
    FdInfo {
        fd,
        kind: kind as i32,
        inode: wire.ino,
        socket: (kind == FdKind::Socket).then(|| socket_info(wire)),
    }
}

pub fn socket_info(wire: &WireFd) -> SocketInfo {
    let (local_addr, remote_addr) = match i32::from(wire.family) {
        libc::AF_INET => (ip4(&wire.local_addr), ip4(&wire.remote_addr)),
        libc::AF_INET6 => (
            IpAddr::from(wire.local_addr).to_string(),
            IpAddr::from(wire.remote_addr).to_string(),
        ),
        _ => (String::new(), String::new()),
    };
    SocketInfo {
        family: family_name(wire.family),
        r#type: socket_type_name(wire.sock_type),
        local_addr,
        local_port: u32::from(wire.local_port),
        remote_addr,
        remote_port: u32::from(wire.remote_port),
    }
}

/// The dotted quad of the first four bytes, as `Ipv4Addr`'s `Display` writes it, without
/// the formatting machinery (every connect, accept, bind and listen formats two).
fn ip4(bytes: &[u8; 16]) -> String {
    let mut out = String::with_capacity(15);
    for (i, &octet) in bytes[..4].iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
    out
}

pub fn family_name(family: u16) -> String {
    match i32::from(family) {
        libc::AF_UNIX => "unix".into(),
        libc::AF_INET => "inet".into(),
        libc::AF_INET6 => "inet6".into(),
        libc::AF_NETLINK => "netlink".into(),
        libc::AF_PACKET => "packet".into(),
        other => format!("af_{other}"),
    }
}

pub fn socket_type_name(sock_type: u8) -> String {
    match i32::from(sock_type) {
        libc::SOCK_STREAM => "stream".into(),
        libc::SOCK_DGRAM => "dgram".into(),
        libc::SOCK_RAW => "raw".into(),
        libc::SOCK_SEQPACKET => "seqpacket".into(),
        other => format!("type_{other}"),
    }
}

/// Symbolic name of an errno value, as `errno(3)` spells it ("EACCES"); "EUNKNOWN" for
/// a number the C library does not name.
pub fn errno_name(errno: i32) -> String {
    match nix::errno::Errno::from_raw(errno) {
        nix::errno::Errno::UnknownErrno => "EUNKNOWN".to_owned(),
        known => format!("{known:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_text_read_as_the_standard_library_writes_them() {
        for octets in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [10, 1, 2, 3],
            [255, 255, 255, 255],
            [9, 99, 100, 250],
        ] {
            let mut wire = [0u8; 16];
            wire[..4].copy_from_slice(&octets);
            assert_eq!(ip4(&wire), std::net::Ipv4Addr::from(octets).to_string());
        }
        for bytes in [&b"plain"[..], b"caf\xc3\xa9", b"bad \xff\xfe byte", b""] {
            assert_eq!(lossy(bytes), String::from_utf8_lossy(bytes));
        }
        assert_eq!(join_components(b"x\xff\0tmp\0"), "/tmp/x\u{fffd}");
    }

    fn decode_one(bytes: &[u8]) -> Result<Event, DecodeError> {
        decode(bytes, &DecodeContext::default()).map(|e| e.expect("an event, not a skipped record"))
    }

    fn bytes_of<T>(value: &T) -> Vec<u8> {
        // SAFETY: test helper over plain repr(C) structs.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn exec_record(data: &[u8], args: u16, filename: u16, exe: u16, cwd: u16) -> Vec<u8> {
        let mut r = ExecRecord::default();
        r.hdr.kind = kind::EXEC;
        r.hdr.pid = 42;
        r.hdr.comm[..4].copy_from_slice(b"java");
        r.ppid = 7;
        r.args_len = args;
        r.filename_len = filename;
        r.exe_len = exe;
        r.cwd_len = cwd;
        let mut bytes = bytes_of(&r);
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn exec_strings_are_split_and_paths_joined() {
        let mut data = Vec::new();
        data.extend_from_slice(b"sh\0-c\0id\0");
        data.extend_from_slice(b"/bin/sh");
        data.extend_from_slice(b"dash\0bin\0usr\0");
        data.extend_from_slice(b"tmp\0");
        let bytes = exec_record(&data, 9, 7, 13, 4);
        let ev = decode_one(&bytes).unwrap();
        assert_eq!(ev.pid, 42);
        assert_eq!(ev.comm, "java");
        let Some(event::Kind::Exec(exec)) = ev.kind else {
            panic!("not an exec: {ev:?}");
        };
        assert_eq!(exec.argv, ["sh", "-c", "id"]);
        assert_eq!(exec.filename, "/bin/sh");
        assert_eq!(exec.exe, "/usr/bin/dash");
        assert_eq!(exec.cwd, "/tmp");
        assert_eq!(exec.ppid, 7);
        assert_eq!(exec.stdio.len(), 3);
    }

    #[test]
    fn overrunning_lengths_are_an_error_not_a_panic() {
        let bytes = exec_record(b"sh\0", 3, 500, 0, 0);
        let err = decode_one(&bytes).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Overrun {
                what: "exec filename",
                claimed: 500,
                available: 0
            }
        );
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        assert!(matches!(
            decode(&[1, 2, 3], &DecodeContext::default()),
            Err(DecodeError::Short { .. })
        ));
        let hdr = Header {
            kind: 999,
            ..Default::default()
        };
        assert_eq!(
            decode_one(&bytes_of(&hdr)),
            Err(DecodeError::UnknownKind(999))
        );
        let hdr = Header {
            kind: kind::EXEC,
            ..Default::default()
        };
        assert!(matches!(
            decode_one(&bytes_of(&hdr)),
            Err(DecodeError::Short {
                what: "exec record",
                ..
            })
        ));
    }

    #[test]
    fn memfd_exe_is_recognised_from_the_kernel_view() {
        let mut r = ExecRecord::default();
        r.hdr.kind = kind::EXEC;
        r.exe_len = 14;
        r.exe_fs_magic = TMPFS_MAGIC;
        r.exec_flags = exec_flags::EXE_UNLINKED | exec_flags::EXE_OUTSIDE_ROOT;
        let mut bytes = bytes_of(&r);
        bytes.extend_from_slice(b"memfd:kworker\0");
        let Some(event::Kind::Exec(exec)) = decode_one(&bytes).unwrap().kind else {
            panic!()
        };
        assert_eq!(exec.exe, "/memfd:kworker");
        assert!(exec.exe_memfd && exec.exe_deleted);

        // The same name on a regular, linked file is not a memfd.
        r.exec_flags = 0;
        r.exe_fs_magic = 0xEF53;
        let mut bytes = bytes_of(&r);
        bytes.extend_from_slice(b"memfd:kworker\0");
        let Some(event::Kind::Exec(exec)) = decode_one(&bytes).unwrap().kind else {
            panic!()
        };
        assert!(!exec.exe_memfd);
    }

    #[test]
    fn errno_and_signal_names_come_from_the_c_library() {
        assert_eq!(errno_name(libc::EACCES), "EACCES");
        assert_eq!(errno_name(libc::ECONNREFUSED), "ECONNREFUSED");
        assert_eq!(errno_name(libc::EWOULDBLOCK), "EAGAIN");
        assert_eq!(errno_name(100_000), "EUNKNOWN");
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(libc::SIGSTKFLT), "SIGSTKFLT");
        assert_eq!(signal_name(libc::SIGRTMIN() + 2), "SIGRT");
    }

    #[test]
    fn exit_status_and_signal() {
        let r = ExitRecord {
            hdr: Header {
                kind: kind::EXIT,
                ..Default::default()
            },
            exit_code: 3 << 8,
            ..Default::default()
        };
        let Some(event::Kind::Exit(exit)) = decode_one(&bytes_of(&r)).unwrap().kind else {
            panic!()
        };
        assert_eq!((exit.exit_code, exit.signal), (3, 0));
        let r = ExitRecord { exit_code: 9, ..r };
        let Some(event::Kind::Exit(exit)) = decode_one(&bytes_of(&r)).unwrap().kind else {
            panic!()
        };
        assert_eq!((exit.exit_code, exit.signal), (0, 9));
    }

    #[test]
    fn boot_clock_converts() {
        let clock = BootClock {
            boot_epoch_ns: 1_700_000_000_000_000_000,
        };
        let t = clock.wall(1_500_000_000);
        assert_eq!((t.seconds, t.nanos), (1_700_000_001, 500_000_000));
        // The 64-bit path and the 128-bit one agree, before 1970 and past 2262 too.
        for (epoch, boot) in [
            (-1_500_000_001, 1),
            (-3_000_000_000_000_000_000, 7),
            (9_000_000_000_000_000_000, u64::MAX),
            (i128::from(i64::MAX), 1),
        ] {
            let t = BootClock {
                boot_epoch_ns: epoch,
            }
            .wall(boot);
            let ns = epoch + i128::from(boot);
            assert_eq!(
                (i128::from(t.seconds), i128::from(t.nanos)),
                (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000)),
                "{epoch} + {boot}"
            );
        }
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn proc_mem_targets() {
        assert_eq!(proc_mem_target("/proc/123/mem", 9), Some(123));
        assert_eq!(proc_mem_target("/proc/self/mem", 9), Some(9));
        assert_eq!(proc_mem_target("/proc/12/task/13/mem", 9), Some(12));
        assert_eq!(proc_mem_target("/proc/12/oom_score_adj", 9), None);
        assert_eq!(proc_mem_target("/proc/sys/kernel/mem", 9), None);
        assert_eq!(proc_mem_target("/proc/12/task//mem", 9), None);
    }

    #[test]
    fn paths_are_normalised_lexically() {
        assert_eq!(normalize("/tmp/./x"), "/tmp/x");
        assert_eq!(normalize("/var//tmp/y/."), "/var/tmp/y");
        assert_eq!(normalize("/a/../b"), "/a/../b");
        assert_eq!(normalize("/"), "/");
        assert_eq!(normalize(""), "");
    }

    #[test]
    fn unix_paths() {
        assert_eq!(unix_path(b"/run/x.sock\0\0"), "/run/x.sock");
        assert_eq!(unix_path(b"\0abstract\0"), "@abstract");
        assert_eq!(unix_path(b""), "");
    }
}
