//! Tamper signals: kernel module loads, BPF program loads by processes other than the
//! agent, and signals aimed at the agent.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use sensor_common::{BpfRecord, ModuleRecord, SignalRecord, kind, slot};

use crate::{
    kernel::{KPtr, agent_tgid, get, layout_ready, off, read, read_user},
    maps::{EVENTS, count_lost, wakeup_flags},
    syscalls::{Syscall, fexit_syscalls, fill_header, handler},
};

handler!(tamper, on_tamper);
fexit_syscalls!(on_tamper;
    fx_init_module "__x64_sys_init_module" slot::INIT_MODULE,
    fx_finit_module "__x64_sys_finit_module" slot::FINIT_MODULE,
    fx_bpf "__x64_sys_bpf" slot::BPF,
);

#[inline(always)]
fn on_tamper(sc: &Syscall) {
    match sc.slot {
        slot::INIT_MODULE => module_load(0, -1),
        slot::FINIT_MODULE => module_load(1, sc.arg(0) as i32),
        slot::BPF if sc.arg(0) == BPF_PROG_LOAD => bpf_load(sc),
        _ => {}
    }
}

#[inline(always)]
fn module_load(call: u32, fd: i32) {
    let Some(mut entry) = EVENTS.reserve::<ModuleRecord>(0) else {
        count_lost(kind::MODULE_LOAD);
        return;
    };
    // SAFETY: every field is written before submit.
    let r = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(
        &mut r.hdr,
        kind::MODULE_LOAD,
        core::mem::size_of::<ModuleRecord>(),
    );
    r.call = call;
    r.fd = fd;
    entry.submit(wakeup_flags());
}

const BPF_PROG_LOAD: u64 = 5;
/// Offset of `prog_name` in the BPF_PROG_LOAD part of `union bpf_attr`.
const ATTR_PROG_NAME: u64 = 48;

#[inline(always)]
fn bpf_load(sc: &Syscall) {
    let attr = sc.arg(1);
    let Some(mut entry) = EVENTS.reserve::<BpfRecord>(0) else {
        count_lost(kind::BPF_LOAD);
        return;
    };
    // SAFETY: every field is written before submit.
    let r = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(
        &mut r.hdr,
        kind::BPF_LOAD,
        core::mem::size_of::<BpfRecord>(),
    );
    let mut prog_type = [0u8; 4];
    let _ = read_user(prog_type.as_mut_ptr(), 4, attr as KPtr);
    r.prog_type = u32::from_ne_bytes(prog_type);
    if read_user(r.name.as_mut_ptr(), 16, (attr + ATTR_PROG_NAME) as KPtr).is_err() {
        r.name[0] = 0;
    }
    r.result = sc.ret as i32;
    entry.submit(wakeup_flags());
}

/// `signal_generate(int sig, struct kernel_siginfo *info, struct task_struct *task,
/// int type, int result)`: every signal generated; only those aimed at the agent are kept.
#[btf_tracepoint(function = "signal_generate")]
pub fn signal_generate(ctx: BtfTracePointContext) -> i32 {
    if !layout_ready() {
        return 0;
    }
    let target: KPtr = ctx.arg(2);
    let Ok(target_pid) = read::<u32>(target, off!(task_tgid)) else {
        return 0;
    };
    if target_pid != agent_tgid() {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<SignalRecord>(0) else {
        count_lost(kind::SIGNAL);
        return 0;
    };
    // SAFETY: every field is written before submit.
    let r = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(
        &mut r.hdr,
        kind::SIGNAL,
        core::mem::size_of::<SignalRecord>(),
    );
    r.signal = ctx.arg(0);
    r.target_pid = target_pid;
    r.target_tid = get::<u32>(target, off!(task_pid));
    r.result = ctx.arg(4);
    entry.submit(wakeup_flags());
    0
}
