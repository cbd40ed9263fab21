//! Decoding: kernel records (`sensor-common` wire structs) into `sensor.v1` events.
//!
//! This is the first stage that replay shares with a live run's later stages: everything
//! after it works on `Event`s and never sees raw records. Bad records are errors that say
//! what is wrong, never panics.

use std::{mem::size_of, net::IpAddr};

use pbjson_types::Timestamp;
use sensor_common::{
    ExecFailedRecord, ExecRecord, ExitRecord, FdInfo as WireFd, ForkRecord, Header, exec_flags,
    fd_kind, kind,
};
use sensor_proto::v1::{
    Event, ExecEvent, ExecFailedEvent, ExitEvent, FdInfo, FdKind, ForkEvent, SocketInfo, event,
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

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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
    let mut path = String::new();
    for part in parts {
        // A memfd's dentry is "memfd:NAME" with no parent; a root component "/" (the
        // dentry of a pseudo filesystem's root) adds nothing.
        if part == b"/" {
            continue;
        }
        path.push('/');
        path.push_str(&String::from_utf8_lossy(part));
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

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8], clock: &BootClock) -> Result<Event, DecodeError> {
    let hdr: Header = read_struct(bytes, "header")?;
    let mut ev = header_event(&hdr, clock);
    ev.kind = Some(match hdr.kind {
        kind::EXEC => event::Kind::Exec(decode_exec(bytes, clock)?),
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
        other => return Err(DecodeError::UnknownKind(other)),
    });
    Ok(ev)
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
        error: errno_name(r.errno).to_owned(),
        execveat: r.exec_flags & exec_flags::EXECVEAT != 0,
        dirfd: r.dirfd,
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
        libc::AF_INET => (
            ip4(&wire.local_addr).to_string(),
            ip4(&wire.remote_addr).to_string(),
        ),
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

fn ip4(bytes: &[u8; 16]) -> IpAddr {
    IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
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

/// Symbolic name of an errno value, as `errno(3)` spells it.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::E2BIG => "E2BIG",
        libc::ENOEXEC => "ENOEXEC",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ETXTBSY => "ETXTBSY",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ELOOP => "ELOOP",
        libc::ELIBBAD => "ELIBBAD",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ECONNRESET => "ECONNRESET",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EALREADY => "EALREADY",
        libc::EISCONN => "EISCONN",
        _ => "EUNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let ev = decode(&bytes, &BootClock::default()).unwrap();
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
        let err = decode(&bytes, &BootClock::default()).unwrap_err();
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
            decode(&[1, 2, 3], &BootClock::default()),
            Err(DecodeError::Short { .. })
        ));
        let hdr = Header {
            kind: 999,
            ..Default::default()
        };
        assert_eq!(
            decode(&bytes_of(&hdr), &BootClock::default()),
            Err(DecodeError::UnknownKind(999))
        );
        let hdr = Header {
            kind: kind::EXEC,
            ..Default::default()
        };
        assert!(matches!(
            decode(&bytes_of(&hdr), &BootClock::default()),
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
        let Some(event::Kind::Exec(exec)) = decode(&bytes, &BootClock::default()).unwrap().kind
        else {
            panic!()
        };
        assert_eq!(exec.exe, "/memfd:kworker");
        assert!(exec.exe_memfd && exec.exe_deleted);

        // The same name on a regular, linked file is not a memfd.
        r.exec_flags = 0;
        r.exe_fs_magic = 0xEF53;
        let mut bytes = bytes_of(&r);
        bytes.extend_from_slice(b"memfd:kworker\0");
        let Some(event::Kind::Exec(exec)) = decode(&bytes, &BootClock::default()).unwrap().kind
        else {
            panic!()
        };
        assert!(!exec.exe_memfd);
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
        let Some(event::Kind::Exit(exit)) =
            decode(&bytes_of(&r), &BootClock::default()).unwrap().kind
        else {
            panic!()
        };
        assert_eq!((exit.exit_code, exit.signal), (3, 0));
        let r = ExitRecord { exit_code: 9, ..r };
        let Some(event::Kind::Exit(exit)) =
            decode(&bytes_of(&r), &BootClock::default()).unwrap().kind
        else {
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
    }
}
