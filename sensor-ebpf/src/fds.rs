//! Descriptor redirection: dup, dup2, dup3 and fcntl(F_DUPFD*) landing on fds 0-2, with
//! what the duplicated descriptor is (a socket there is a reverse shell's signature; a pipe
//! is a JVM child's plumbing).

use aya_ebpf::helpers::generated::bpf_get_current_task;
use sensor_common::{DupRecord, dup_call, kind, slot};

use crate::{
    kernel::{KPtr, describe_file, task_fd_file},
    maps::{EVENTS, count_lost, wakeup_flags},
    syscalls::{Syscall, fexit_syscalls, fill_header, handler},
};

const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;

handler!(dup, on_dup);
fexit_syscalls!(on_dup;
    fx_dup "__x64_sys_dup" slot::DUP,
    fx_dup2 "__x64_sys_dup2" slot::DUP2,
    fx_dup3 "__x64_sys_dup3" slot::DUP3,
    fx_fcntl "__x64_sys_fcntl" slot::FCNTL,
);

#[inline(always)]
fn on_dup(sc: &Syscall) {
    let (call, newfd) = match sc.slot {
        slot::DUP => (dup_call::DUP, -1),
        slot::DUP2 => (dup_call::DUP2, sc.arg(1) as i32),
        slot::DUP3 => (dup_call::DUP3, sc.arg(1) as i32),
        slot::FCNTL if sc.arg(1) == F_DUPFD || sc.arg(1) == F_DUPFD_CLOEXEC => {
            (dup_call::FCNTL, sc.arg(2) as i32)
        }
        _ => return,
    };
    // Only descriptors that became (or were to become) stdin, stdout or stderr matter.
    let result = sc.ret;
    if result > 2 || (result < 0 && !(0..=2).contains(&newfd)) {
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
    r.oldfd = sc.arg(0) as i32;
    r.newfd = newfd;
    r.result = result as i32;
    // The new descriptor now refers to the same open file as the old one.
    let fd = if result >= 0 {
        result as u32
    } else {
        sc.arg(0) as u32
    };
    // SAFETY: helper without arguments.
    let task = unsafe { bpf_get_current_task() } as KPtr;
    describe_file(task_fd_file(task, fd), &mut r.file);
    entry.submit(wakeup_flags());
}
