//! File activity in watched places: writes and creations, truncation, renames onto or
//! away from, unlinks, chmod adding execute, timestamp changes and links.
//!
//! An open is judged by the file the kernel opened: where fentry exists, at
//! `security_file_open` (fexit, for the verdict); elsewhere at the open syscalls' exit,
//! from the descriptor they returned. Its path is walked up from the file's dentry, so a
//! symbolic link, `..`, `/proc/self/root/...` or a bind mount leads to the real place, and
//! the name the caller gave goes along when it differs (at `security_file_open` the
//! kernel's copy of it, from the path walk's `nameidata`; at the syscall exit the caller's
//! string). Whether the open
//! created the file is the kernel's own FMODE_CREATED, so `O_CREAT|O_TRUNC` of a file
//! already there is a truncation. An open that failed, and the path operations (rename,
//! unlink, chmod, utimes, truncate, link by name), are matched on the path the caller
//! named; those given a descriptor use the file behind it.
//!
//! Cost: most opens are read-only and return after one flag test. A candidate builds the
//! absolute path (walked backwards from a dentry, then for a syscall the argument) and asks
//! an LPM trie of watched prefixes and a few watched suffixes; only a match is reported.
//! Each CPU remembers the last opened file's answer (`OPEN_SEEN`), so a storm of writes to
//! one file walks its path once; a rename anywhere, or a new watch list, forgets it.

use aya_ebpf::{
    helpers::generated::bpf_get_current_task,
    macros::{fexit, map},
    maps::{Array, LpmTrie, PerCpuArray},
    programs::FExitContext,
};
use sensor_common::{
    FileRecord, MAX_WATCH_SUFFIXES, WATCH_KEY_BYTES, WatchSuffix, file_info, file_op, kind, slot,
};

use crate::{
    kernel::{
        KPtr, bounded, copy_kernel, get, get_ptr, off, read_kernel_str, read_ptr, read_user,
        read_user_str, task_fd_file,
    },
    maps::{SCRATCH, submit_scratch},
    path::{PATH_AREA, PATHBUF, read_path, walk_path_backwards},
    syscalls::{Syscall, fexit_syscalls, fill_header, handler, watching},
};

/// Watched path prefixes: key = path bytes, value = `file_op` bits wanted.
#[map]
pub static WATCH: LpmTrie<[u8; WATCH_KEY_BYTES], u32> = LpmTrie::with_max_entries(1024, 0);

/// Watched suffixes, filled in by the agent.
#[unsafe(no_mangle)]
static WATCH_SUFFIXES: [WatchSuffix; MAX_WATCH_SUFFIXES] = [WatchSuffix {
    len: 0,
    ops: 0,
    bytes: [0; 16],
    mask: [0; 16],
}; MAX_WATCH_SUFFIXES];

/// The open cache's control, set by the agent: [0] = 1 when the cache may be used (the
/// rename probe is attached, so renames invalidate it), [1] = the epoch, which the agent
/// moves when the watch list changes and every rename moves too.
#[map]
pub static OPEN_CACHE_CTL: Array<u64> = Array::with_max_entries(2, 0);

/// The last file an open asked about on this CPU and the watched operations its path had:
/// a storm of writes to one file (a log, a spool) walks its path once, not per open.
/// Keyed by what makes the path: the mount, the dentry, its parent, its name and inode.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SeenOpen {
    mnt: u64,
    dentry: u64,
    parent: u64,
    name: u64,
    inode: u64,
    epoch: u64,
    ops: u64,
}

#[map]
static OPEN_SEEN: PerCpuArray<SeenOpen> = PerCpuArray::with_max_entries(1, 0);

/// A rename may change the path of any file below what it moved: cached decisions go.
#[inline(always)]
fn bump_open_epoch() {
    if let Some(epoch) = OPEN_CACHE_CTL.get_ptr_mut(1) {
        // SAFETY: a map value; a lost increment under a race still moves the epoch away
        // from what any cache holds.
        unsafe { *epoch = (*epoch).wrapping_add(1) };
    }
}

/// Where the directory part of a path ends in the PATHBUF area: the directory is written
/// backwards before it, the argument after it.
const DIR_END: usize = 1024;
const AREA: usize = PATH_AREA;

const AT_FDCWD: i64 = -100;
const O_WRONLY: u64 = 0o1;
const O_RDWR: u64 = 0o2;
const O_CREAT: u64 = 0o100;
const O_TRUNC: u64 = 0o1000;
const O_APPEND: u64 = 0o2000;
const S_IXUGO: u64 = 0o111;
/// `file->f_mode`: this open created the file.
const FMODE_CREATED: u32 = 0x100000;

/// Where a path comes from.
#[derive(Clone, Copy)]
enum Source {
    /// A string, relative to a directory descriptor (or the cwd): the caller's (user
    /// memory), or the kernel's copy of it (`kernel`).
    Name { dirfd: i64, path: u64, kernel: bool },
    /// The file open at a descriptor.
    Fd(i64),
    /// A `struct file`.
    File(KPtr),
}

/// A built path: `len` bytes at `start` in the PATHBUF area.
#[derive(Clone, Copy)]
struct Built {
    start: usize,
    len: usize,
    truncated: bool,
}

#[inline(always)]
fn current_task() -> KPtr {
    // SAFETY: helper without arguments.
    unsafe { bpf_get_current_task() as KPtr }
}

/// Assembles the absolute path of `source` in this CPU's PATHBUF area.
#[inline(always)]
fn build<const LOOP: bool>(source: Source) -> Option<Built> {
    let buf = PATHBUF.get_ptr_mut(0)?;
    // SAFETY: this CPU's buffer.
    let area = unsafe { (*buf).area.as_mut_ptr() };
    let task = current_task();
    let fs = read_ptr(task, off!(task_fs)).ok()?;
    let root = read_path(fs, off!(fs_root)).ok()?;
    let (dir, tail) = match source {
        Source::Name {
            dirfd,
            path,
            kernel,
        } => {
            let mut first = [0u8; 1];
            if kernel {
                first[0] = get::<u8>(path as KPtr, 0);
            } else {
                read_user(first.as_mut_ptr(), 1, path as KPtr).ok()?;
            }
            if first[0] == b'/' {
                let n = name_str(
                    kernel,
                    area.wrapping_add(DIR_END),
                    (AREA - DIR_END) as u32,
                    path as KPtr,
                )
                .ok()?;
                return Some(Built {
                    start: DIR_END,
                    len: n.saturating_sub(1),
                    truncated: n >= AREA - DIR_END,
                });
            }
            let dir = if dirfd == AT_FDCWD {
                read_path(fs, off!(fs_pwd)).ok()?
            } else {
                read_path(task_fd_file(task, dirfd as u32), off!(file_f_path)).ok()?
            };
            // SAFETY: DIR_END is inside the area.
            unsafe { *area.wrapping_add(DIR_END) = b'/' };
            let n = name_str(
                kernel,
                area.wrapping_add(DIR_END + 1),
                (AREA - DIR_END - 1) as u32,
                path as KPtr,
            )
            .ok()?;
            let n = n.saturating_sub(1);
            // An empty argument (AT_EMPTY_PATH) names the directory itself.
            let tail = if n == 0 { 0 } else { n + 1 };
            (dir, tail)
        }
        Source::Fd(fd) => (
            read_path(task_fd_file(task, fd as u32), off!(file_f_path)).ok()?,
            0,
        ),
        Source::File(file) => (read_path(file, off!(file_f_path)).ok()?, 0),
    };
    let walk = walk_path_backwards::<LOOP>(DIR_END, dir, root);
    Some(Built {
        start: walk.end,
        len: DIR_END - walk.end + tail,
        truncated: walk.truncated || tail >= AREA - DIR_END - 1,
    })
}

/// The `file_op` bits the watch rules want for this path.
#[inline(always)]
fn wanted(built: &Built) -> u32 {
    let Some(buf) = PATHBUF.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's buffer.
    let buf = unsafe { &mut *buf };
    let start = built.start & (AREA - 1);
    let len = if built.len > WATCH_KEY_BYTES {
        WATCH_KEY_BYTES
    } else {
        built.len
    };
    buf.key.prefix_len = (len * 8) as u32;
    copy_kernel(
        core::ptr::addr_of_mut!(buf.key.data) as *mut u8,
        bounded(len, 2 * WATCH_KEY_BYTES - 1),
        buf.area.as_ptr().wrapping_add(start),
    );
    let mut ops = WATCH.get(&buf.key).copied().unwrap_or(0);

    // The last 16 bytes of the path against the watched suffixes. A path shorter than 16
    // bytes brings bytes from before it in the area; a slot longer than the path is
    // skipped, and a shorter one's mask leaves them out.
    let end = (built.start + built.len).wrapping_sub(16) & (AREA - 1);
    let tail = buf.area.as_ptr().wrapping_add(end) as *const u64;
    // SAFETY: end + 16 <= AREA + slack.
    let (t0, t1) = unsafe { (tail.read_unaligned(), tail.add(1).read_unaligned()) };
    ops |= sensor_match_suffixes(t0, t1, built.len as u64) as u32;
    ops
}

/// The ops of the watched suffixes the path ending in the 16 bytes `t0`,`t1` (`len` bytes
/// long in all) has. A global function: the verifier checks its loop over the slots once,
/// on its own, instead of once for every state of every caller (5.10 gave up on the
/// path handler with the loop inlined).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sensor_match_suffixes(t0: u64, t1: u64, len: u64) -> u64 {
    let mut ops = 0u64;
    for i in 0..MAX_WATCH_SUFFIXES {
        // SAFETY: a read of a global the agent writes before loading; `i` is in bounds.
        let slot = unsafe { core::ptr::read_volatile(&WATCH_SUFFIXES[i]) };
        if slot.len == 0 || u64::from(slot.len) > len {
            continue;
        }
        let bytes = slot.bytes.as_ptr() as *const u64;
        let mask = slot.mask.as_ptr() as *const u64;
        // SAFETY: 16-byte arrays read as two words.
        let (b0, b1, m0, m1) = unsafe {
            (
                bytes.read_unaligned(),
                bytes.add(1).read_unaligned(),
                mask.read_unaligned(),
                mask.add(1).read_unaligned(),
            )
        };
        if t0 & m0 == b0 && t1 & m1 == b1 {
            ops |= u64::from(slot.ops);
        }
    }
    ops
}

/// `watched` for an opened file, through this CPU's one-entry cache of the last file's
/// watched operations: an open of the same file under the same epoch that wants none of
/// `bits` ends without walking the path.
#[inline(always)]
fn watched_file<const LOOP: bool>(file: KPtr, bits: u32) -> Option<Built> {
    if bits == 0 {
        return None;
    }
    let enabled = OPEN_CACHE_CTL.get(0).copied().unwrap_or(0) != 0;
    let epoch = OPEN_CACHE_CTL.get(1).copied().unwrap_or(0);
    let mnt = get::<u64>(file, off!(file_f_path) + off!(path_mnt));
    let dentry = get_ptr(file, off!(file_f_path) + off!(path_dentry));
    let key = SeenOpen {
        mnt,
        dentry: dentry as u64,
        parent: get::<u64>(dentry, off!(dentry_d_parent)),
        name: get::<u64>(dentry, off!(dentry_d_name) + off!(qstr_name)),
        inode: get::<u64>(file, off!(file_f_inode)),
        epoch,
        ops: 0,
    };
    let seen = OPEN_SEEN.get_ptr_mut(0)?;
    // SAFETY: this CPU's entry.
    let seen = unsafe { &mut *seen };
    if enabled
        && seen.mnt == key.mnt
        && seen.dentry == key.dentry
        && seen.parent == key.parent
        && seen.name == key.name
        && seen.inode == key.inode
        && seen.epoch == key.epoch
        && seen.ops & u64::from(bits) == 0
    {
        return None;
    }
    let built = build::<LOOP>(Source::File(file))?;
    let ops = wanted(&built);
    *seen = SeenOpen {
        ops: u64::from(ops),
        ..key
    };
    (ops & bits != 0).then_some(built)
}

/// Builds `source` and returns it when a watch rule wants any of `bits` on it.
#[inline(always)]
fn watched<const LOOP: bool>(source: Source, bits: u32) -> Option<Built> {
    if bits == 0 {
        return None;
    }
    let built = build::<LOOP>(source)?;
    (wanted(&built) & bits != 0).then_some(built)
}

/// Copies a built path into the record's data at `dst`; returns the bytes copied.
#[inline(always)]
fn copy_path(built: &Built, dst: *mut u8) -> usize {
    let Some(buf) = PATHBUF.get_ptr_mut(0) else {
        return 0;
    };
    let len = if built.len > AREA - 1 {
        AREA - 1
    } else {
        built.len
    };
    // SAFETY: this CPU's buffer.
    let src = unsafe { (*buf).area.as_ptr() }.wrapping_add(built.start & (AREA - 1));
    copy_kernel(dst, bounded(len, AREA - 1), src);
    len
}

/// Submits a FileRecord for `path` (already built and matched) and, for renames, the
/// other name, built after the first is copied out.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit<const LOOP: bool>(
    result: i64,
    op: u16,
    flags: u64,
    mode: u64,
    path: &Built,
    other: Option<Source>,
    info: u16,
) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the scratch buffer holds a FileRecord and two paths after it.
    let r = unsafe { &mut *(scratch as *mut FileRecord) };
    let data = (scratch as *mut u8).wrapping_add(core::mem::size_of::<FileRecord>());
    fill_header(&mut r.hdr, kind::FILE, 0);
    r.op = op;
    r.info = info;
    r.flags = flags as u32;
    r.mode = mode as u32;
    r.result = result as i32;
    r.truncated = path.truncated as u32;
    r.path_len = copy_path(path, data) as u16;
    r.other_len = 0;
    if let Some(other) = other
        && let Some(built) = build::<LOOP>(other)
    {
        let at = (r.path_len as usize) & (AREA - 1);
        r.other_len = copy_path(&built, data.wrapping_add(at)) as u16;
        r.truncated |= (built.truncated as u32) << 1;
    }
    let size = core::mem::size_of::<FileRecord>() + r.path_len as usize + r.other_len as usize;
    r.hdr.size = size as u32;
    submit_scratch(scratch, size, kind::FILE);
}

/// The operations an open with `flags` and `mode` may perform, when all that is known is
/// what it asked for (an open that failed).
#[inline(always)]
fn open_bits(flags: u64, mode: u64) -> u32 {
    let mut bits = 0;
    if flags & (O_WRONLY | O_RDWR | O_APPEND) != 0 {
        bits |= file_op::bit(file_op::OPEN_WRITE);
    }
    if flags & O_CREAT != 0 {
        bits |= file_op::bit(file_op::CREATE);
        if mode & S_IXUGO != 0 {
            bits |= file_op::bit(file_op::CREATE_EXEC);
        }
    }
    if flags & O_TRUNC != 0 {
        bits |= file_op::bit(file_op::TRUNCATE);
    }
    bits
}

/// The operations an open of `file` with `flags` performed: a creation only when the
/// kernel created the file (its mode then decides whether it is executable), a
/// truncation only of a file that was there, a write whenever it may write.
#[inline(always)]
fn opened_bits(file: KPtr, flags: u64) -> (u32, u64, u16) {
    let created = get::<u32>(file, off!(file_f_mode)) & FMODE_CREATED != 0;
    let mut bits = 0;
    if flags & (O_WRONLY | O_RDWR | O_APPEND | O_TRUNC) != 0 {
        bits |= file_op::bit(file_op::OPEN_WRITE);
    }
    if created {
        let mode = u64::from(get::<u16>(
            get_ptr(file, off!(file_f_inode)),
            off!(inode_i_mode),
        )) & 0o7777;
        bits |= file_op::bit(file_op::CREATE);
        if mode & S_IXUGO != 0 {
            bits |= file_op::bit(file_op::CREATE_EXEC);
        }
        (bits, mode, file_info::RESOLVED | file_info::CREATED)
    } else {
        if flags & O_TRUNC != 0 {
            bits |= file_op::bit(file_op::TRUNCATE);
        }
        (bits, 0, file_info::RESOLVED)
    }
}

/// The single op an open is reported as (the most telling of its bits).
#[inline(always)]
fn open_op(bits: u32) -> u16 {
    if bits & file_op::bit(file_op::CREATE_EXEC) != 0 {
        file_op::CREATE_EXEC
    } else if bits & file_op::bit(file_op::CREATE) != 0 {
        file_op::CREATE
    } else if bits & file_op::bit(file_op::TRUNCATE) != 0 {
        file_op::TRUNCATE
    } else {
        file_op::OPEN_WRITE
    }
}

fn user(dirfd: u64, path: u64) -> Source {
    Source::Name {
        dirfd: dirfd as i32 as i64,
        path,
        kernel: false,
    }
}

fn cwd(path: u64) -> Source {
    Source::Name {
        dirfd: AT_FDCWD,
        path,
        kernel: false,
    }
}

/// A NUL-terminated string of user or kernel memory.
#[inline(always)]
fn name_str(kernel: bool, dst: *mut u8, max: u32, src: KPtr) -> Result<usize, i64> {
    if kernel {
        read_kernel_str(dst, max, src)
    } else {
        read_user_str(dst, max, src)
    }
}

/// The name the open in progress was given, as the kernel copied it from the caller (its
/// path walk's `nameidata`, alive while `security_file_open` runs), or None where this
/// kernel's BTF did not describe it.
#[inline(always)]
fn given_name() -> Option<Source> {
    let at = off!(task_nameidata);
    if at == 0 {
        return None;
    }
    let nd = get_ptr(current_task(), at);
    let name = get_ptr(nd, off!(nameidata_name));
    let path = get_ptr(name, off!(filename_name));
    if nd.is_null() || name.is_null() || path.is_null() {
        return None;
    }
    Some(Source::Name {
        dirfd: i64::from(get::<i32>(nd, off!(nameidata_dfd))),
        path: path as u64,
        kernel: true,
    })
}

fn fd(fd: u64) -> Source {
    Source::Fd(fd as i32 as i64)
}

handler!(open_files, open_files_bounded, on_open);

#[inline(always)]
fn on_open<const LOOP: bool>(sc: &Syscall) {
    // The flags first: most opens are read-only and end here, after one register read.
    let flags = match sc.slot {
        slot::OPENAT => sc.arg(2),
        slot::OPEN => sc.arg(1),
        slot::CREAT => O_CREAT | O_WRONLY | O_TRUNC,
        slot::OPENAT2 => {
            // struct open_how { u64 flags; u64 mode; u64 resolve; }
            let mut flags = 0u64;
            if read_user(&mut flags as *mut u64 as *mut u8, 8, sc.arg(2) as KPtr).is_err() {
                return;
            }
            flags
        }
        _ => return,
    };
    if flags & (O_WRONLY | O_RDWR | O_APPEND | O_CREAT | O_TRUNC) == 0 {
        return;
    }
    let (source, mode) = match sc.slot {
        slot::OPENAT => (user(sc.arg(0), sc.arg(1)), sc.arg(3)),
        slot::OPEN => (cwd(sc.arg(0)), sc.arg(2)),
        slot::CREAT => (cwd(sc.arg(0)), sc.arg(1)),
        _ => {
            let mut mode = 0u64;
            let _ = read_user(
                &mut mode as *mut u64 as *mut u8,
                8,
                sc.arg(2).wrapping_add(8) as KPtr,
            );
            (user(sc.arg(0), sc.arg(1)), mode)
        }
    };
    // An open that succeeded is judged by the file it opened, found from the descriptor it
    // returned: its path walked up from the dentry, the caller's string kept beside it.
    if sc.ret >= 0 {
        let file = task_fd_file(current_task(), sc.ret as u32);
        if !file.is_null() {
            let (bits, mode, info) = opened_bits(file, flags);
            if let Some(path) = watched_file::<LOOP>(file, bits) {
                let info = info | file_info::OTHER_IS_GIVEN;
                emit::<LOOP>(
                    sc.ret,
                    open_op(bits),
                    flags,
                    mode,
                    &path,
                    Some(source),
                    info,
                );
            }
            return;
        }
    }
    let bits = open_bits(flags, mode);
    if let Some(path) = watched::<LOOP>(source, bits) {
        emit::<LOOP>(sc.ret, open_op(bits), flags, mode, &path, None, 0);
    }
}

/// `security_file_open(struct file *file)`, after the LSMs gave their verdict (the return
/// value, 0 when the open goes ahead).
#[fexit(function = "security_file_open")]
pub fn fx_file_open(ctx: FExitContext) -> i32 {
    if watching() {
        on_file_open::<true>(ctx.arg(0), ctx.arg(1));
    }
    0
}

#[fexit(function = "security_file_open")]
pub fn fxb_file_open(ctx: FExitContext) -> i32 {
    if watching() {
        on_file_open::<false>(ctx.arg(0), ctx.arg(1));
    }
    0
}

/// The flags are the open's own (the kernel clears O_CREAT and O_TRUNC from `f_flags`
/// only after this hook).
#[inline(always)]
fn on_file_open<const LOOP: bool>(file: KPtr, verdict: i64) {
    let flags = u64::from(get::<u32>(file, off!(file_f_flags)));
    if flags & (O_WRONLY | O_RDWR | O_APPEND | O_CREAT | O_TRUNC) == 0 {
        return;
    }
    let (bits, mode, info) = opened_bits(file, flags);
    if let Some(path) = watched_file::<LOOP>(file, bits) {
        let given = given_name();
        let info = if given.is_some() {
            info | file_info::OTHER_IS_GIVEN
        } else {
            info
        };
        emit::<LOOP>(verdict, open_op(bits), flags, mode, &path, given, info);
    }
}

handler!(path_files, path_files_bounded, on_path);
fexit_syscalls!(on_path::<true>;
    fx_renameat2 "__x64_sys_renameat2" slot::RENAMEAT2,
    fx_renameat "__x64_sys_renameat" slot::RENAMEAT,
    fx_rename "__x64_sys_rename" slot::RENAME,
    fx_unlinkat "__x64_sys_unlinkat" slot::UNLINKAT,
    fx_unlink "__x64_sys_unlink" slot::UNLINK,
    fx_fchmodat "__x64_sys_fchmodat" slot::FCHMODAT,
    fx_fchmodat2 "__x64_sys_fchmodat2" slot::FCHMODAT2,
    fx_chmod "__x64_sys_chmod" slot::CHMOD,
    fx_fchmod "__x64_sys_fchmod" slot::FCHMOD,
    fx_utimensat "__x64_sys_utimensat" slot::UTIMENSAT,
    fx_utimes "__x64_sys_utimes" slot::UTIMES,
    fx_futimesat "__x64_sys_futimesat" slot::FUTIMESAT,
    fx_utime "__x64_sys_utime" slot::UTIME,
    fx_truncate "__x64_sys_truncate" slot::TRUNCATE,
    fx_ftruncate "__x64_sys_ftruncate" slot::FTRUNCATE,
    fx_linkat "__x64_sys_linkat" slot::LINKAT,
    fx_link "__x64_sys_link" slot::LINK,
    fx_symlinkat "__x64_sys_symlinkat" slot::SYMLINKAT,
);
fexit_syscalls!(on_path::<false>;
    fxb_renameat2 "__x64_sys_renameat2" slot::RENAMEAT2,
    fxb_renameat "__x64_sys_renameat" slot::RENAMEAT,
    fxb_rename "__x64_sys_rename" slot::RENAME,
    fxb_unlinkat "__x64_sys_unlinkat" slot::UNLINKAT,
    fxb_unlink "__x64_sys_unlink" slot::UNLINK,
    fxb_fchmodat "__x64_sys_fchmodat" slot::FCHMODAT,
    fxb_fchmodat2 "__x64_sys_fchmodat2" slot::FCHMODAT2,
    fxb_chmod "__x64_sys_chmod" slot::CHMOD,
    fxb_fchmod "__x64_sys_fchmod" slot::FCHMOD,
    fxb_utimensat "__x64_sys_utimensat" slot::UTIMENSAT,
    fxb_utimes "__x64_sys_utimes" slot::UTIMES,
    fxb_futimesat "__x64_sys_futimesat" slot::FUTIMESAT,
    fxb_utime "__x64_sys_utime" slot::UTIME,
    fxb_truncate "__x64_sys_truncate" slot::TRUNCATE,
    fxb_ftruncate "__x64_sys_ftruncate" slot::FTRUNCATE,
    fxb_linkat "__x64_sys_linkat" slot::LINKAT,
    fxb_link "__x64_sys_link" slot::LINK,
    fxb_symlinkat "__x64_sys_symlinkat" slot::SYMLINKAT,
);

#[inline(always)]
fn on_path<const LOOP: bool>(sc: &Syscall) {
    // The arguments the operations below use (none takes a sixth).
    let a = [sc.arg(0), sc.arg(1), sc.arg(2), sc.arg(3), sc.arg(4)];
    // (op, path, flags, mode) of the one-path operations; renames apart.
    let (op, source, flags, mode) = match sc.slot {
        slot::RENAMEAT2 => {
            return rename::<LOOP>(sc, user(a[0], a[1]), user(a[2], a[3]), a[4]);
        }
        slot::RENAMEAT => return rename::<LOOP>(sc, user(a[0], a[1]), user(a[2], a[3]), 0),
        slot::RENAME => return rename::<LOOP>(sc, cwd(a[0]), cwd(a[1]), 0),
        slot::UNLINKAT => (file_op::UNLINK, user(a[0], a[1]), a[2], 0),
        slot::UNLINK => (file_op::UNLINK, cwd(a[0]), 0, 0),
        // chmod matters here when the new mode makes the file executable.
        slot::FCHMODAT | slot::FCHMODAT2 if a[2] & S_IXUGO != 0 => {
            (file_op::CHMOD_EXEC, user(a[0], a[1]), 0, a[2])
        }
        slot::CHMOD if a[1] & S_IXUGO != 0 => (file_op::CHMOD_EXEC, cwd(a[0]), 0, a[1]),
        slot::FCHMOD if a[1] & S_IXUGO != 0 => (file_op::CHMOD_EXEC, fd(a[0]), 0, a[1]),
        // A null filename sets the times of the file open at dirfd (futimens).
        slot::UTIMENSAT if a[1] == 0 => (file_op::UTIMES, fd(a[0]), a[3], 0),
        slot::UTIMENSAT => (file_op::UTIMES, user(a[0], a[1]), a[3], 0),
        slot::UTIMES | slot::UTIME => (file_op::UTIMES, cwd(a[0]), 0, 0),
        slot::FUTIMESAT => (file_op::UTIMES, user(a[0], a[1]), 0, 0),
        slot::TRUNCATE => (file_op::TRUNCATE, cwd(a[0]), 0, 0),
        slot::FTRUNCATE => (file_op::TRUNCATE, fd(a[0]), 0, 0),
        slot::LINKAT => (file_op::LINK, user(a[2], a[3]), a[4], 0),
        slot::LINK => (file_op::LINK, cwd(a[1]), 0, 0),
        slot::SYMLINKAT => (file_op::LINK, user(a[1], a[2]), 0, 0),
        _ => return,
    };
    if let Some(path) = watched::<LOOP>(source, file_op::bit(op)) {
        emit::<LOOP>(sc.ret, op, flags, mode, &path, None, 0);
    }
}

/// Renames: the new name watched (something moved onto a watched path), or the old one
/// (a watched file moved away, as `sed -i` and log cleaners do).
#[inline(always)]
fn rename<const LOOP: bool>(sc: &Syscall, old: Source, new: Source, flags: u64) {
    bump_open_epoch();
    let bit = file_op::bit(file_op::RENAME);
    if let Some(path) = watched::<LOOP>(new, bit) {
        emit::<LOOP>(sc.ret, file_op::RENAME, flags, 0, &path, Some(old), 0);
    } else if let Some(path) = watched::<LOOP>(old, bit) {
        emit::<LOOP>(
            sc.ret,
            file_op::RENAME,
            flags,
            0,
            &path,
            Some(new),
            file_info::PATH_IS_SOURCE,
        );
    }
}
