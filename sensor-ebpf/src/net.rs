//! Network syscalls: connect (with its result, EINPROGRESS included), accept/accept4,
//! bind, listen and socket creation, each with the socket's family, type and endpoints.

use aya_ebpf::helpers::generated::bpf_get_current_task;
use sensor_common::{FdInfo, NetRecord, SocketRecord, kind, slot};

use crate::{
    kernel::{KPtr, bounded, describe_file, read_user, task_fd_file},
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

#[inline(always)]
fn current_task() -> KPtr {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_current_task() as KPtr }
}

/// Reads a user `struct sockaddr` of `len` bytes: the family and, for inet, port and
/// address into `out` (as the remote or local end); for unix, the path into `path`.
/// Returns the unix path length.
#[inline(always)]
fn read_sockaddr(addr: u64, len: u64, out: &mut FdInfo, remote: bool, path: *mut u8) -> u16 {
    // Family (2 bytes) and, for inet, the port in network order.
    let mut head = [0u8; 4];
    if addr == 0 || len < 4 || read_user(head.as_mut_ptr(), 4, addr as KPtr).is_err() {
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
            let _ = read_user(dst.as_mut_ptr(), 4, (addr + 4) as KPtr);
        } else if family == AF_INET6 && len >= SOCKADDR_IN6 as u64 - 4 {
            let _ = read_user(dst.as_mut_ptr(), 16, (addr + 8) as KPtr);
        }
        return 0;
    }
    if family == AF_UNIX && len > 2 {
        let n = if len > SOCKADDR_UN as u64 {
            SOCKADDR_UN as u64
        } else {
            len
        } - 2;
        if read_user(path, bounded(n as usize, 127), (addr + 2) as KPtr).is_ok() {
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
        r.unix_path_len = read_sockaddr(addr, len, &mut r.sock, remote, data);
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
