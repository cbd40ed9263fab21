//! Process lifecycle: exec (successful and failed), fork/clone and exit.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use sensor_common::{
    DATA_OFFSET_LIMIT, ExecFailedRecord, ExecRecord, ExitRecord, ForkRecord, MAX_ARGS,
    MAX_FILENAME, TASK_COMM_LEN, exec_flags, kind, slot,
};

use crate::{
    enforce,
    kernel::{
        KPtr, agent_tgid, bounded, describe_file, get, get_ptr, layout_ready, off, read, read_into,
        read_kernel_str, read_ptr, read_user, read_user_str, task_fd_file,
    },
    maps::{EVENTS, SCRATCH, count_lost, submit_scratch, wakeup_flags},
    path::{read_path, walk_path},
    syscalls::{Syscall, fexit_syscalls, fill_header, handler},
};

#[inline(always)]
fn is_agent() -> bool {
    (bpf_get_current_pid_tgid() >> 32) as u32 == agent_tgid()
}

/// Where an exec record's strings start in the scratch buffer.
const DATA_BASE: usize = core::mem::size_of::<ExecRecord>();

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    if layout_ready() && !is_agent() {
        let _ = on_exec::<true>(&ctx);
    }
    0
}

/// The same without `bpf_loop` (see `path.rs`).
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec_bounded(ctx: BtfTracePointContext) -> i32 {
    if layout_ready() && !is_agent() {
        let _ = on_exec::<false>(&ctx);
    }
    0
}

#[inline(always)]
fn on_exec<const LOOP: bool>(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let task: KPtr = ctx.arg(0);
    let old_tid: i32 = ctx.arg(1);
    let bprm: KPtr = ctx.arg(2);
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(0i64)?;
    let rec = scratch as *mut ExecRecord;
    let data = (scratch as *mut u8).wrapping_add(core::mem::size_of::<ExecRecord>());
    // SAFETY: `rec` points at the start of this CPU's scratch buffer, large enough for an
    // ExecRecord followed by its data (checked by sensor-common's const assertions).
    let r = unsafe { &mut *rec };
    fill_header(&mut r.hdr, kind::EXEC, 0);
    r.old_tid = old_tid as u32;
    r.exec_flags = 0;
    // execveat of a descriptor (fexecve) leaves the descriptor's path in bprm->fdpath.
    if off!(bprm_fdpath) != 0 && get::<u64>(bprm, off!(bprm_fdpath)) != 0 {
        r.exec_flags = exec_flags::EXECVEAT;
    }

    let parent = read_ptr(task, off!(task_real_parent))?;
    r.ppid = get::<u32>(parent, off!(task_tgid));
    read_into(
        r.parent_thread_comm.as_mut_ptr(),
        TASK_COMM_LEN as u32,
        parent,
        off!(task_comm),
    );
    r.start_boot_ns = get::<u64>(task, off!(task_start_boottime));
    let cred = read_ptr(task, off!(task_real_cred))?;
    r.euid = read::<u32>(cred, off!(cred_euid)).unwrap_or(u32::MAX);
    r.egid = read::<u32>(cred, off!(cred_egid)).unwrap_or(u32::MAX);

    // argv as the kernel just laid it out in the new program's memory.
    let mm = read_ptr(task, off!(task_mm))?;
    let arg_start = get::<u64>(mm, off!(mm_arg_start));
    let arg_end = get::<u64>(mm, off!(mm_arg_end));
    let mut len = arg_end.wrapping_sub(arg_start);
    if len > MAX_ARGS as u64 {
        len = MAX_ARGS as u64;
        r.exec_flags |= exec_flags::ARGS_TRUNCATED;
    }
    let mut end = 0usize;
    if len > 0
        && read_user(
            data,
            bounded(len as usize, 2 * MAX_ARGS - 1),
            arg_start as KPtr,
        )
        .is_ok()
    {
        end = len as usize;
    } else {
        r.exec_flags |= exec_flags::ARGS_UNREADABLE;
    }
    r.args_len = end as u16;

    // The filename the caller asked for (`/proc/self/fd/3`, a symlink, a script...).
    let filename = get_ptr(bprm, off!(bprm_filename));
    let dst = data.wrapping_add(end & (DATA_OFFSET_LIMIT - 1));
    let n = read_kernel_str(dst, MAX_FILENAME as u32, filename).unwrap_or(0);
    let n = if n > 0 { n - 1 } else { 0 };
    if n + 1 >= MAX_FILENAME {
        r.exec_flags |= exec_flags::FILENAME_TRUNCATED;
    }
    r.filename_len = n as u16;
    end += n;

    // The executable as the kernel resolved it.
    let fs = read_ptr(task, off!(task_fs))?;
    let root = read_path(fs, off!(fs_root))?;
    r.exe_len = 0;
    r.exe_ino = 0;
    r.exe_nlink = 0;
    r.exe_fs_magic = 0;
    r.exe_size = 0;
    r.exe_mtime = 0;
    r.exe_ctime = 0;
    r.exe_dev = 0;
    r.enforce = 0;
    let exe_file = get_ptr(mm, off!(mm_exe_file));
    if let Ok(exe) = read_ptr(mm, off!(mm_exe_file)) {
        if let Ok(inode) = read_ptr(exe, off!(file_f_inode)) {
            // The executable's identity: what it is, not what it is called.
            r.exe_ino = get::<u64>(inode, off!(inode_i_ino));
            r.exe_nlink = get::<u32>(inode, off!(inode_i_nlink));
            r.exe_size = get::<u64>(inode, off!(inode_i_size));
            r.exe_mtime = get::<i64>(inode, off!(inode_mtime_sec));
            r.exe_ctime = get::<i64>(inode, off!(inode_ctime_sec));
            if let Ok(sb) = read_ptr(inode, off!(inode_i_sb)) {
                r.exe_fs_magic = get::<u64>(sb, off!(sb_s_magic));
                r.exe_dev = get::<u32>(sb, off!(sb_s_dev));
            }
            if r.exe_nlink == 0 {
                r.exec_flags |= exec_flags::EXE_UNLINKED;
            }
        }
        if let Ok(path) = read_path(exe, off!(file_f_path)) {
            let walk = walk_path::<LOOP>(DATA_BASE, end, path, root);
            if walk.truncated {
                r.exec_flags |= exec_flags::EXE_PATH_TRUNCATED;
            }
            if walk.outside_root {
                r.exec_flags |= exec_flags::EXE_OUTSIDE_ROOT;
            }
            r.exe_len = (walk.end - end) as u16;
            end = walk.end;
        }
    }

    // The working directory.
    r.cwd_len = 0;
    if let Ok(pwd) = read_path(fs, off!(fs_pwd)) {
        let walk = walk_path::<LOOP>(DATA_BASE, end, pwd, root);
        if walk.truncated {
            r.exec_flags |= exec_flags::CWD_TRUNCATED;
        }
        r.cwd_len = (walk.end - end) as u16;
        end = walk.end;
    }

    // What the new program reads from and writes to. Written out, not a loop: a loop
    // left the compiler a first iteration whose spilled values 5.10 saw as never written.
    describe_file(task_fd_file(task, 0), &mut r.stdio[0]);
    describe_file(task_fd_file(task, 1), &mut r.stdio[1]);
    describe_file(task_fd_file(task, 2), &mut r.stdio[2]);

    r.enforce = enforce::at_exec(task, r.hdr.pid, exe_file, &r.stdio);

    let size = core::mem::size_of::<ExecRecord>() + end;
    r.hdr.size = size as u32;
    submit_scratch(scratch, size, kind::EXEC);
    Ok(())
}

handler!(exec_failed, on_exec_failed);
fexit_syscalls!(on_exec_failed;
    fx_execve "__x64_sys_execve" slot::EXECVE,
    fx_execveat "__x64_sys_execveat" slot::EXECVEAT,
);

#[inline(always)]
fn on_exec_failed(sc: &Syscall) {
    // A successful exec returns 0 in the new program; sched_process_exec reported it.
    if sc.ret >= 0 {
        return;
    }
    let (filename, dirfd, flags) = match sc.slot {
        slot::EXECVE => (sc.arg(0), -100, 0),
        slot::EXECVEAT => (sc.arg(1), sc.arg(0) as i32, exec_flags::EXECVEAT),
        _ => return,
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the scratch buffer holds an ExecFailedRecord and MAX_FILENAME bytes after it.
    let r = unsafe { &mut *(scratch as *mut ExecFailedRecord) };
    let data = (scratch as *mut u8).wrapping_add(core::mem::size_of::<ExecFailedRecord>());
    fill_header(&mut r.hdr, kind::EXEC_FAILED, 0);
    r.errno = (-sc.ret) as i32;
    r.exec_flags = flags;
    r.dirfd = dirfd;
    r.enforce = if sc.ret == -1 {
        enforce::denied_verdict() as u16
    } else {
        0
    };
    let n = read_user_str(data, MAX_FILENAME as u32, filename as KPtr).unwrap_or(0);
    let n = if n > 0 { n - 1 } else { 0 };
    if n + 1 >= MAX_FILENAME {
        r.exec_flags |= exec_flags::FILENAME_TRUNCATED;
    }
    r.filename_len = n as u16;
    let size = core::mem::size_of::<ExecFailedRecord>() + n;
    r.hdr.size = size as u32;
    submit_scratch(scratch, size, kind::EXEC_FAILED);
}

#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    if layout_ready() && !is_agent() {
        let _ = on_fork(&ctx);
    }
    0
}

#[inline(always)]
fn on_fork(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let parent: KPtr = ctx.arg(0);
    let child: KPtr = ctx.arg(1);
    let child_pid = get::<u32>(child, off!(task_pid));
    let child_tgid = get::<u32>(child, off!(task_tgid));
    let child_start = get::<u64>(child, off!(task_start_boottime));
    // Before anything can fail: a new process is labelled even when its record is lost.
    if child_pid == child_tgid {
        enforce::inherit(parent, child_tgid, child_start);
    }
    let Some(mut entry) = EVENTS.reserve::<ForkRecord>(0) else {
        count_lost(kind::FORK);
        return Ok(());
    };
    // SAFETY: every field is written below before submit.
    let r = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(&mut r.hdr, kind::FORK, core::mem::size_of::<ForkRecord>());
    r.hdr.pid = child_tgid;
    r.hdr.tid = child_pid;
    read_into(
        r.hdr.comm.as_mut_ptr(),
        TASK_COMM_LEN as u32,
        child,
        off!(task_comm),
    );
    r.parent_tid = get::<u32>(parent, off!(task_pid));
    r.parent_pid = get::<u32>(parent, off!(task_tgid));
    read_into(
        r.parent_thread_comm.as_mut_ptr(),
        TASK_COMM_LEN as u32,
        parent,
        off!(task_comm),
    );
    r.child_start_boot_ns = child_start;
    r.is_thread = (child_pid != child_tgid) as u32;
    r._pad = 0;
    entry.submit(wakeup_flags());
    Ok(())
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    if layout_ready() && !is_agent() {
        let _ = on_exit(&ctx);
    }
    0
}

#[inline(always)]
fn on_exit(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let task: KPtr = ctx.arg(0);
    // Only the last thread of a process reports: `signal->live` has already been
    // decremented for this thread when the tracepoint fires.
    let signal = read_ptr(task, off!(task_signal))?;
    let live = read::<i32>(signal, off!(signal_live))?;
    if live != 0 {
        return Ok(());
    }
    enforce::forget((bpf_get_current_pid_tgid() >> 32) as u32);
    let Some(mut entry) = EVENTS.reserve::<ExitRecord>(0) else {
        count_lost(kind::EXIT);
        return Ok(());
    };
    // SAFETY: every field is written below before submit.
    let r = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(&mut r.hdr, kind::EXIT, core::mem::size_of::<ExitRecord>());
    let parent = get_ptr(task, off!(task_real_parent));
    r.ppid = get::<u32>(parent, off!(task_tgid));
    r.exit_code = get::<u32>(task, off!(task_exit_code));
    r.start_boot_ns = get::<u64>(task, off!(task_start_boottime));
    entry.submit(wakeup_flags());
    Ok(())
}
