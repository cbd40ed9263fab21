//! Descriptor redirection: dup, dup2, dup3 and fcntl(F_DUPFD*) landing on fds 0-2, with
//! what the duplicated descriptor is (a socket there is a reverse shell's signature; a pipe
//! is a JVM child's plumbing).

use aya_ebpf::{helpers::generated::bpf_get_current_task, programs::TracePointContext};
use sensor_common::{DupRecord, dup_call, kind};

use crate::{
    kernel::{KPtr, describe_file, task_fd_file},
    maps::{EVENTS, count_lost, wakeup_flags},
    syscalls::{args, fill_header, remember, ret, syscall_tp, take},
};

const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;

/// Tag of a pending dup: the record kind in the high bits, the call in the low ones.
const fn tag(call: u32) -> u64 {
    ((kind::DUP as u64) << 8) | call as u64
}

syscall_tp!(sys_enter_dup, "sys_enter_dup", |ctx| {
    remember(tag(dup_call::DUP), args(ctx))
});
syscall_tp!(sys_exit_dup, "sys_exit_dup", |ctx| on_exit(
    ctx,
    dup_call::DUP
));

syscall_tp!(sys_enter_dup2, "sys_enter_dup2", |ctx| {
    let a = args(ctx);
    if a[1] <= 2 {
        remember(tag(dup_call::DUP2), a);
    }
});
syscall_tp!(sys_exit_dup2, "sys_exit_dup2", |ctx| on_exit(
    ctx,
    dup_call::DUP2
));

syscall_tp!(sys_enter_dup3, "sys_enter_dup3", |ctx| {
    let a = args(ctx);
    if a[1] <= 2 {
        remember(tag(dup_call::DUP3), a);
    }
});
syscall_tp!(sys_exit_dup3, "sys_exit_dup3", |ctx| on_exit(
    ctx,
    dup_call::DUP3
));

syscall_tp!(sys_enter_fcntl, "sys_enter_fcntl", |ctx| {
    let a = args(ctx);
    // The new descriptor is the lowest free one at or above the argument.
    if (a[1] == F_DUPFD || a[1] == F_DUPFD_CLOEXEC) && a[2] <= 2 {
        remember(tag(dup_call::FCNTL), a);
    }
});
syscall_tp!(sys_exit_fcntl, "sys_exit_fcntl", |ctx| on_exit(
    ctx,
    dup_call::FCNTL
));

fn on_exit(ctx: &TracePointContext, call: u32) {
    let Some(a) = take(tag(call)) else {
        return;
    };
    let result = ret(ctx);
    // Only descriptors that became stdin, stdout or stderr matter (dup and fcntl may
    // return a higher one).
    if result > 2 {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<DupRecord>(0) else {
        count_lost(kind::DUP);
        return;
    };
    // SAFETY: every field is written before submit.
    let r = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(&mut r.hdr, kind::DUP, core::mem::size_of::<DupRecord>());
    r.call = call;
    r.oldfd = a[0] as i32;
    r.newfd = match call {
        dup_call::DUP2 | dup_call::DUP3 => a[1] as i32,
        dup_call::FCNTL => a[2] as i32,
        _ => -1,
    };
    r.result = result as i32;
    // The new descriptor now refers to the same open file as the old one.
    let fd = if result >= 0 {
        result as u32
    } else {
        a[0] as u32
    };
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as KPtr;
    describe_file(task_fd_file(task, fd), &mut r.file);
    entry.submit(wakeup_flags());
}
