//! Pairing syscall entry and exit: arguments worth keeping are stored at entry, keyed by
//! thread, and taken back at exit together with the result.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_ktime_get_boot_ns},
    },
    programs::TracePointContext,
};
use core::ffi::c_void;
use sensor_common::{Header, TASK_COMM_LEN};

use crate::{
    kernel::{agent_tgid, layout_ready},
    maps::PENDING,
};

/// Arguments kept between a syscall's entry and its exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pending {
    /// Which entry stored them (a record kind, or a finer tag); exit checks it matches.
    pub tag: u64,
    pub args: [u64; 6],
}

/// Argument `i` of a `sys_enter_*` tracepoint (each is 8 bytes, from offset 16).
#[inline(always)]
pub fn arg(ctx: &TracePointContext, i: usize) -> u64 {
    // SAFETY: offsets from the syscall tracepoints' format files.
    unsafe { ctx.read_at::<u64>(16 + 8 * i) }.unwrap_or(0)
}

/// The return value in a `sys_exit_*` tracepoint.
#[inline(always)]
pub fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: offset from the syscall tracepoints' format files.
    unsafe { ctx.read_at::<i64>(16) }.unwrap_or(0)
}

/// All six arguments of a `sys_enter_*` tracepoint.
#[inline(always)]
pub fn args(ctx: &TracePointContext) -> [u64; 6] {
    [
        arg(ctx, 0),
        arg(ctx, 1),
        arg(ctx, 2),
        arg(ctx, 3),
        arg(ctx, 4),
        arg(ctx, 5),
    ]
}

#[inline(always)]
pub fn remember(tag: u64, args: [u64; 6]) {
    let pending = Pending { tag, args };
    let _ = PENDING.insert(&bpf_get_current_pid_tgid(), &pending, 0);
}

/// Takes back what the entry of the same syscall (`tag`) stored for this thread.
#[inline(always)]
pub fn take(tag: u64) -> Option<[u64; 6]> {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let pending = unsafe { PENDING.get(&key) }.copied()?;
    let _ = PENDING.remove(&key);
    (pending.tag == tag).then_some(pending.args)
}

/// True when the probes should look at the current task at all.
#[inline(always)]
pub fn watching() -> bool {
    layout_ready() && (bpf_get_current_pid_tgid() >> 32) as u32 != agent_tgid()
}

/// Fills `hdr` in place for the current task (no stack copy of the struct).
#[inline(always)]
pub fn fill_header(hdr: &mut Header, kind: u16, size: usize) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    hdr.kind = kind;
    hdr.flags = 0;
    hdr.size = size as u32;
    // SAFETY: helpers without arguments, and one writing 16 bytes into `hdr.comm`.
    unsafe {
        hdr.boot_ns = bpf_ktime_get_boot_ns();
        hdr.cgroup_id = bpf_get_current_cgroup_id();
        bpf_get_current_comm(hdr.comm.as_mut_ptr() as *mut c_void, TASK_COMM_LEN as u32);
    }
    hdr.pid = (pid_tgid >> 32) as u32;
    hdr.tid = pid_tgid as u32;
    hdr.uid = uid_gid as u32;
    hdr.gid = (uid_gid >> 32) as u32;
}

/// Declares a syscall tracepoint program that runs `body` for tasks we watch.
macro_rules! syscall_tp {
    ($fn:ident, $name:literal, $body:expr) => {
        #[aya_ebpf::macros::tracepoint(category = "syscalls", name = $name)]
        pub fn $fn(ctx: aya_ebpf::programs::TracePointContext) -> u32 {
            if $crate::syscalls::watching() {
                let body: fn(&aya_ebpf::programs::TracePointContext) = $body;
                body(&ctx);
            }
            0
        }
    };
}
pub(crate) use syscall_tp;
