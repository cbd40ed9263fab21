//! Network syscalls: connect (with its result, EINPROGRESS included), accept/accept4,
//! bind, listen and socket creation, each with the socket's family, type and endpoints.
//!
//! The address a connect or bind asked for is the kernel's own copy where fentry exists:
//! `security_socket_connect`/`security_socket_bind` see it after the kernel copied it from
//! the caller, and leave it for the syscall's exit (`SOCKADDR_COPY`). Reading the caller's
//! buffer again at the exit would report whatever another thread wrote there while the
//! syscall waited (a blocking connect), not the address the kernel used.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_current_task},
    macros::{fexit, map},
    maps::LruHashMap,
    programs::FExitContext,
};
use sensor_common::{FdInfo, NetRecord, SocketRecord, kind, slot};

use crate::{
    kernel::{
        KPtr, bounded, copy_kernel, describe_file, get, get_ptr, off, read_user, task_fd_file,
    },
    maps::{EVENTS, SCRATCH, count_lost, submit_scratch, wakeup_flags},
    syscalls::{Syscall, fexit_syscalls, fill_header, handler},
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// `sizeof(struct sockaddr_un)`.
const SOCKADDR_UN: usize = 110;
/// `sizeof(struct sockaddr_in6)`, the largest inet address.
const SOCKADDR_IN6: usize = 28;

/// Bytes of a kernel address copy kept: a `sockaddr_un` fits.
const COPY_BYTES: usize = 128;

/// A connect's or bind's address as the kernel copied it, for the syscall's exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockAddrCopy {
    /// The `struct socket` it was for (a later syscall on another socket ignores it).
    sock: u64,
    /// `kind::CONNECT` or `kind::BIND`.
    op: u32,
    len: u32,
    addr: [u8; COPY_BYTES],
}

/// Thread (pid_tgid) -> the address its connect or bind in progress asked for.
#[map]
static SOCKADDR_COPY: LruHashMap<u64, SockAddrCopy> = LruHashMap::with_max_entries(4096, 0);

/// `security_socket_connect(struct socket *, struct sockaddr *, int)`: the address is in
/// kernel memory here. Raw context words, as for the syscall wrappers (`syscalls.rs`).
#[fexit(function = "security_socket_connect")]
pub fn fx_sock_connect(ctx: FExitContext) -> i32 {
    keep_sockaddr(&ctx, kind::CONNECT);
    0
}

/// `security_socket_bind(struct socket *, struct sockaddr *, int)`.
#[fexit(function = "security_socket_bind")]
pub fn fx_sock_bind(ctx: FExitContext) -> i32 {
    keep_sockaddr(&ctx, kind::BIND);
    0
}

#[inline(always)]
fn keep_sockaddr(ctx: &FExitContext, op: u16) {
    if !crate::syscalls::watching() {
        return;
    }
    let args = ctx.as_ptr() as KPtr;
    let sock = get::<u64>(args, 0);
    let addr = get::<u64>(args, 8);
    let len = get::<u64>(args, 16) as u32 as usize;
    let mut copy = SockAddrCopy {
        sock,
        op: u32::from(op),
        len: 0,
        addr: [0; COPY_BYTES],
    };
    // A caller may pass more than the address (`sizeof(struct sockaddr_storage)`, 128):
    // what is read of it fits in a `sockaddr_un`.
    let n = if len > SOCKADDR_UN { SOCKADDR_UN } else { len };
    if addr != 0
        && n > 0
        && copy_kernel(
            copy.addr.as_mut_ptr(),
            bounded(n, COPY_BYTES - 1),
            addr as KPtr,
        )
    {
        copy.len = bounded(n, COPY_BYTES - 1);
        let _ = SOCKADDR_COPY.insert(&bpf_get_current_pid_tgid(), &copy, 0);
    }
}

/// Where the reported address of a connect or bind on `file` comes from: the kernel's
/// copy when the LSM hook kept one for this socket, else the caller's buffer.
#[inline(always)]
fn sockaddr_source(op: u16, file: KPtr, user_addr: u64, user_len: u64) -> (u64, u64, bool) {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: a copy of the value is taken before the entry is removed.
    let Some(copy) = (unsafe { SOCKADDR_COPY.get(&key) }) else {
        return (user_addr, user_len, false);
    };
    let (sock, kept_op, len) = (copy.sock, copy.op, copy.len);
    let at = copy.addr.as_ptr() as u64;
    let ours = kept_op == u32::from(op) && sock == get_ptr(file, off!(file_private_data)) as u64;
    if ours {
        return (at, u64::from(len), true);
    }
    let _ = SOCKADDR_COPY.remove(&key);
    (user_addr, user_len, false)
}

#[inline(always)]
fn current_task() -> KPtr {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_current_task() as KPtr }
}

/// Copies `len` bytes at `src`, kernel or user memory.
#[inline(always)]
fn copy_from(kernel: bool, dst: *mut u8, len: u32, src: u64) -> bool {
    if kernel {
        copy_kernel(dst, len, src as KPtr)
    } else {
        read_user(dst, len, src as KPtr).is_ok()
    }
}

/// Reads a `struct sockaddr` of `len` bytes (the kernel's copy, or the caller's buffer):
/// the family and, for inet, port and address into `out` (as the remote or local end); for
/// unix, the path into `path`. Returns the unix path length.
#[inline(always)]
fn read_sockaddr(
    (addr, len, kernel): (u64, u64, bool),
    out: &mut FdInfo,
    remote: bool,
    path: *mut u8,
) -> u16 {
    // Family (2 bytes) and, for inet, the port in network order.
    let mut head = [0u8; 4];
    if addr == 0 || len < 4 || !copy_from(kernel, head.as_mut_ptr(), 4, addr) {
        return 0;
    }
    let family = u16::from_ne_bytes([head[0], head[1]]);
    let port = u16::from_be_bytes([head[2], head[3]]);
    out.family = family;
    if family == AF_INET || family == AF_INET6 {
        let dst = if remote {
            out.remote_port = port;
            &mut out.remote_addr
        } else {
            out.local_port = port;
            &mut out.local_addr
        };
        let words = dst.as_mut_ptr() as *mut u64;
        // SAFETY: 16 bytes, 8-byte aligned inside FdInfo; volatile so no memset call.
        unsafe {
            words.write_volatile(0);
            words.add(1).write_volatile(0);
        }
        if family == AF_INET && len >= 8 {
            copy_from(kernel, dst.as_mut_ptr(), 4, addr + 4);
        } else if family == AF_INET6 && len >= SOCKADDR_IN6 as u64 - 4 {
            copy_from(kernel, dst.as_mut_ptr(), 16, addr + 8);
        }
        return 0;
    }
    if family == AF_UNIX && len > 2 {
        let n = if len > SOCKADDR_UN as u64 {
            SOCKADDR_UN as u64
        } else {
            len
        } - 2;
        if copy_from(kernel, path, bounded(n as usize, 127), addr + 2) {
            return n as u16;
        }
    }
    0
}

/// Builds a NetRecord in the scratch buffer for descriptor `fd` and submits it.
/// `sockaddr`: (pointer, length, is the remote end) of a user address to report.
#[inline(always)]
fn submit_net(kind: u16, fd: i32, result: i32, backlog: i32, sockaddr: Option<(u64, u64, bool)>) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the scratch buffer holds a NetRecord and SOCKADDR_UN bytes after it.
    let r = unsafe { &mut *(scratch as *mut NetRecord) };
    let data = (scratch as *mut u8).wrapping_add(core::mem::size_of::<NetRecord>());
    fill_header(&mut r.hdr, kind, 0);
    r.fd = fd;
    r.result = result;
    r.backlog = backlog;
    r._pad = 0;
    let file = if fd >= 0 {
        task_fd_file(current_task(), fd as u32)
    } else {
        core::ptr::null()
    };
    describe_file(file, &mut r.sock);
    r.unix_path_len = 0;
    if let Some((addr, len, remote)) = sockaddr {
        let source = sockaddr_source(kind, file, addr, len);
        r.unix_path_len = read_sockaddr(source, &mut r.sock, remote, data);
        if source.2 {
            let _ = SOCKADDR_COPY.remove(&bpf_get_current_pid_tgid());
        }
    }
    let size = core::mem::size_of::<NetRecord>() + r.unix_path_len as usize;
    r.hdr.size = size as u32;
    submit_scratch(scratch, size, kind);
}

handler!(net, on_net);
fexit_syscalls!(on_net;
    fx_connect "__x64_sys_connect" slot::CONNECT,
    fx_accept "__x64_sys_accept" slot::ACCEPT,
    fx_accept4 "__x64_sys_accept4" slot::ACCEPT4,
    fx_bind "__x64_sys_bind" slot::BIND,
    fx_listen "__x64_sys_listen" slot::LISTEN,
    fx_socket "__x64_sys_socket" slot::SOCKET,
);

#[inline(always)]
fn on_net(sc: &Syscall) {
    let fd = sc.arg(0) as i32;
    let result = sc.ret as i32;
    match sc.slot {
        slot::CONNECT => submit_net(
            kind::CONNECT,
            fd,
            result,
            0,
            Some((sc.arg(1), sc.arg(2), true)),
        ),
        // The accepted descriptor carries both ends; the listening one is not needed.
        slot::ACCEPT | slot::ACCEPT4 if result >= 0 => {
            submit_net(kind::ACCEPT, result, result, 0, None)
        }
        slot::BIND => submit_net(
            kind::BIND,
            fd,
            result,
            0,
            Some((sc.arg(1), sc.arg(2), false)),
        ),
        slot::LISTEN => submit_net(kind::LISTEN, fd, result, sc.arg(1) as i32, None),
        slot::SOCKET => submit_socket(sc),
        _ => {}
    }
}

#[inline(always)]
fn submit_socket(sc: &Syscall) {
    let Some(mut entry) = EVENTS.reserve::<SocketRecord>(0) else {
        count_lost(kind::SOCKET);
        return;
    };
    // SAFETY: every field is written before submit.
    let r = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(
        &mut r.hdr,
        kind::SOCKET,
        core::mem::size_of::<SocketRecord>(),
    );
    r.family = sc.arg(0) as u32;
    // SOCK_NONBLOCK and SOCK_CLOEXEC share the type argument.
    r.sock_type = (sc.arg(1) as u32) & 0xf;
    r.protocol = sc.arg(2) as i32;
    r.result = sc.ret as i32;
    entry.submit(wakeup_flags());
}
