//! Syscall exits, reached in one of two ways with the same handler bodies:
//! - `fexit` on the syscall's own function (`__x64_sys_connect`...) where the kernel offers
//!   fentry: only the syscalls we care about pay, nothing else changes path;
//! - the fallback, one program on `raw_syscalls:sys_exit` that looks the syscall number up
//!   in `SLOTS` and tail-calls the handler of the syscalls we care about. Everything else
//!   returns after one register read and one array lookup, but attaching it moves every
//!   task onto the slow syscall path.
//!
//! Why not the per-syscall tracepoints: those build a perf record of every argument before
//! calling BPF (about 0.35 us per entry or exit, measured). And why only at exit: the
//! argument registers are still intact there, so nothing is carried from entry to exit.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_ktime_get_boot_ns},
    },
    macros::{map, raw_tracepoint},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::RawTracePointContext,
};
use core::ffi::c_void;
use sensor_common::{Header, MAX_SYSCALL_NR, TASK_COMM_LEN, slot};

use crate::kernel::{KPtr, agent_tgid, get, layout_ready, off, read, regs_arg};

/// Syscall number -> slot (`sensor_common::slot`), filled in by the agent.
#[map]
pub static SLOTS: Array<u32> = Array::with_max_entries(MAX_SYSCALL_NR, 0);

/// Slot -> handler program.
#[map]
pub static HANDLERS: ProgramArray = ProgramArray::with_max_entries(slot::COUNT, 0);

/// The syscall being handled on this CPU: what the dispatcher read, for the handler.
/// Arguments are read from the registers only by the handler that needs them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Syscall {
    pub slot: u32,
    pub nr: u32,
    pub ret: i64,
    pub regs: u64,
}

impl Syscall {
    /// Argument `i` (0-5), as the caller passed it.
    #[inline(always)]
    pub fn arg(&self, i: usize) -> u64 {
        get::<u64>(self.regs as KPtr, regs_arg(i))
    }
}

#[map]
static CURRENT: PerCpuArray<Syscall> = PerCpuArray::with_max_entries(1, 0);

/// True when the probes should look at the current task at all.
#[inline(always)]
pub fn watching() -> bool {
    layout_ready() && (bpf_get_current_pid_tgid() >> 32) as u32 != agent_tgid()
}

/// Runs at every syscall exit on the host: keep it to one register read and one lookup.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    if !layout_ready() {
        return 0;
    }
    let regs: KPtr = ctx.arg(0);
    let Ok(nr) = read::<u64>(regs, off!(regs_nr)) else {
        return 0;
    };
    if nr >= MAX_SYSCALL_NR as u64 {
        return 0;
    }
    let slot = match SLOTS.get(nr as u32) {
        Some(&slot) if slot != slot::NONE => slot,
        _ => return 0,
    };
    let Some(current) = CURRENT.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot; the tail-called handler reads it on the same CPU.
    let current = unsafe { &mut *current };
    current.slot = slot;
    current.nr = nr as u32;
    current.ret = ctx.arg(1);
    current.regs = regs as u64;
    // SAFETY: a tail call replaces this program; on failure (no handler) we just return.
    unsafe { HANDLERS.tail_call(&ctx, slot) };
    0
}

/// Attached once and dropped by the agent, to learn whether the kernel lets it use fexit
/// (some do not: fentry support compiled out, or a hypervisor that refuses trampolines).
#[aya_ebpf::macros::fexit(function = "security_file_open")]
pub fn probe_fexit(_ctx: aya_ebpf::programs::FExitContext) -> i32 {
    0
}

/// The syscall the dispatcher handed over.
#[inline(always)]
pub fn current() -> Option<Syscall> {
    // SAFETY: this CPU's slot, a copy is returned.
    CURRENT.get_ptr(0).map(|p| unsafe { *p })
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

/// Declares a handler program: tail-called by `sys_exit` with the syscall in CURRENT.
/// With three names, the body walks paths and takes the walk flavour (`path.rs`): the
/// first program uses `bpf_loop`, the second the bounded loop.
macro_rules! handler {
    ($fn:ident, $body:expr) => {
        #[aya_ebpf::macros::raw_tracepoint]
        pub fn $fn(_ctx: aya_ebpf::programs::RawTracePointContext) -> i32 {
            if $crate::syscalls::watching()
                && let Some(sc) = $crate::syscalls::current()
            {
                let body: fn(&$crate::syscalls::Syscall) = $body;
                body(&sc);
            }
            0
        }
    };
    ($fn:ident, $bounded:ident, $body:ident) => {
        $crate::syscalls::handler!($fn, |sc| $body::<true>(sc));
        $crate::syscalls::handler!($bounded, |sc| $body::<false>(sc));
    };
}
pub(crate) use handler;

/// Declares `fexit` programs on syscall functions, each running a handler body for its
/// slot: `fexit_syscalls!(body; prog "__x64_sys_x" slot::X, ...)`. The function's only
/// argument is the caller's `pt_regs`; the return value follows it.
///
/// Both are copied out of the context rather than read as typed arguments: in 5.10's BTF
/// some syscall wrappers type their argument as a pointer to a forward-declared
/// `pt_regs`, and that verifier refuses a typed read of it ("arg0 type FWD is not a
/// struct"). The raw words are the same on every kernel.
macro_rules! fexit_syscalls {
    ($body:expr; $($prog:ident $func:literal $slot:expr),+ $(,)?) => {
        $(
            #[aya_ebpf::macros::fexit(function = $func)]
            pub fn $prog(ctx: aya_ebpf::programs::FExitContext) -> i32 {
                if $crate::syscalls::watching() {
                    use aya_ebpf::EbpfContext as _;
                    let args = ctx.as_ptr() as $crate::kernel::KPtr;
                    let sc = $crate::syscalls::Syscall {
                        slot: $slot,
                        nr: 0,
                        ret: $crate::kernel::get::<i64>(args, 8),
                        regs: $crate::kernel::get::<u64>(args, 0),
                    };
                    let body: fn(&$crate::syscalls::Syscall) = $body;
                    body(&sc);
                }
                0
            }
        )+
    };
}
pub(crate) use fexit_syscalls;
