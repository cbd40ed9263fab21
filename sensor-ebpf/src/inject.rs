//! Code injection signals: memfd_create (fileless payloads), ptrace requests that write
//! or take control, and process_vm_writev into another process.
//!
//! The target of a ptrace attach is the task the kernel resolved where fentry exists
//! (`security_ptrace_access_check`): its process id as the host sees it, where the
//! syscall's argument is a thread id in the caller's pid namespace.

use aya_ebpf::{
    EbpfContext as _,
    helpers::bpf_get_current_pid_tgid,
    macros::{fexit, map},
    maps::LruHashMap,
    programs::FExitContext,
};
use sensor_common::{MemfdRecord, PtraceRecord, VmWriteRecord, kind, slot};

use crate::{
    kernel::{KPtr, get, get_ptr, off, read_user_str},
    maps::{EVENTS, SCRATCH, count_lost, submit_scratch, wakeup_flags},
    syscalls::{Syscall, fexit_syscalls, fill_header, handler},
};

/// `MFD_NAME_MAX_LEN` plus the NUL.
const MEMFD_NAME_MAX: u32 = 250;

handler!(inject, on_inject);
fexit_syscalls!(on_inject;
    fx_memfd_create "__x64_sys_memfd_create" slot::MEMFD_CREATE,
    fx_ptrace "__x64_sys_ptrace" slot::PTRACE,
    fx_process_vm_writev "__x64_sys_process_vm_writev" slot::PROCESS_VM_WRITEV,
);

/// Thread (pid_tgid) -> the host process id of the task its last ptrace access check was
/// about.
#[map]
static PTRACE_CHECKED: LruHashMap<u64, u32> = LruHashMap::with_max_entries(1024, 0);

/// `PTRACE_MODE_ATTACH`: the access an attach asks for (reads of /proc ask for less).
const PTRACE_MODE_ATTACH: u64 = 2;

/// `security_ptrace_access_check(struct task_struct *child, unsigned int mode)`.
#[fexit(function = "security_ptrace_access_check")]
pub fn fx_ptrace_check(ctx: FExitContext) -> i32 {
    if crate::syscalls::watching() {
        let args = ctx.as_ptr() as KPtr;
        let child = get_ptr(args, 0);
        if get::<u64>(args, 8) & PTRACE_MODE_ATTACH != 0 && !child.is_null() {
            let tgid = get::<u32>(child, off!(task_tgid));
            let _ = PTRACE_CHECKED.insert(&bpf_get_current_pid_tgid(), &tgid, 0);
        }
    }
    0
}

#[inline(always)]
fn on_inject(sc: &Syscall) {
    match sc.slot {
        slot::MEMFD_CREATE => memfd_create(sc),
        slot::PTRACE => ptrace(sc),
        slot::PROCESS_VM_WRITEV => vm_write(sc),
        _ => {}
    }
}

#[inline(always)]
fn memfd_create(sc: &Syscall) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the scratch buffer holds a MemfdRecord and the name after it.
    let r = unsafe { &mut *(scratch as *mut MemfdRecord) };
    let data = (scratch as *mut u8).wrapping_add(core::mem::size_of::<MemfdRecord>());
    fill_header(&mut r.hdr, kind::MEMFD_CREATE, 0);
    r.flags = sc.arg(1) as u32;
    r._pad = 0;
    let n = read_user_str(data, MEMFD_NAME_MAX, sc.arg(0) as KPtr).unwrap_or(0);
    let n = if n > 0 { n - 1 } else { 0 };
    r.name_len = n as u16;
    let size = core::mem::size_of::<MemfdRecord>() + n;
    r.hdr.size = size as u32;
    submit_scratch(scratch, size, kind::MEMFD_CREATE);
}

const PTRACE_POKETEXT: u64 = 4;
const PTRACE_POKEDATA: u64 = 5;
const PTRACE_POKEUSER: u64 = 6;
const PTRACE_SETREGS: u64 = 13;
const PTRACE_SETFPREGS: u64 = 15;
const PTRACE_ATTACH: u64 = 16;
const PTRACE_SETREGSET: u64 = 0x4205;
const PTRACE_SEIZE: u64 = 0x4206;

#[inline(always)]
fn ptrace(sc: &Syscall) {
    let request = sc.arg(0);
    if !matches!(
        request,
        PTRACE_POKETEXT
            | PTRACE_POKEDATA
            | PTRACE_POKEUSER
            | PTRACE_SETREGS
            | PTRACE_SETFPREGS
            | PTRACE_ATTACH
            | PTRACE_SETREGSET
            | PTRACE_SEIZE
    ) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<PtraceRecord>(0) else {
        count_lost(kind::PTRACE);
        return;
    };
    // SAFETY: every field is written before submit.
    let r = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(
        &mut r.hdr,
        kind::PTRACE,
        core::mem::size_of::<PtraceRecord>(),
    );
    r.request = request as i64;
    r.target = sc.arg(1) as i32;
    // A successful attach went through the access check last: the kernel's own target.
    if matches!(request, PTRACE_ATTACH | PTRACE_SEIZE) {
        let key = bpf_get_current_pid_tgid();
        // SAFETY: the value is copied before the entry is removed.
        if let Some(&tgid) = unsafe { PTRACE_CHECKED.get(&key) } {
            if sc.ret == 0 {
                r.target = tgid as i32;
            }
            let _ = PTRACE_CHECKED.remove(&key);
        }
    }
    r.addr = sc.arg(2);
    r.result = sc.ret as i32;
    entry.submit(wakeup_flags());
}

#[inline(always)]
fn vm_write(sc: &Syscall) {
    let Some(mut entry) = EVENTS.reserve::<VmWriteRecord>(0) else {
        count_lost(kind::VM_WRITE);
        return;
    };
    // SAFETY: every field is written before submit.
    let r = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(
        &mut r.hdr,
        kind::VM_WRITE,
        core::mem::size_of::<VmWriteRecord>(),
    );
    r.target = sc.arg(0) as i32;
    r._pad = 0;
    r.result = sc.ret;
    r.local_iovecs = sc.arg(2);
    r.remote_iovecs = sc.arg(4);
    entry.submit(wakeup_flags());
}
