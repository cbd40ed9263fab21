//! File activity in watched places: writes and creations, truncation, renames onto or
//! away from, unlinks, chmod adding execute, timestamp changes and links.
//!
//! Cost: most opens are read-only and return after one flag test. A candidate builds the
//! absolute path (the cwd or directory descriptor's path, walked backwards, then the
//! argument) and asks an LPM trie of watched prefixes and a few watched suffixes; only a
//! match is remembered until the syscall returns, when the record is built with the result.

use aya_ebpf::{
    helpers::generated::{bpf_get_current_task, bpf_probe_read_kernel},
    macros::map,
    maps::LpmTrie,
    programs::TracePointContext,
};
use core::ffi::c_void;
use sensor_common::{FileRecord, MAX_WATCH_SUFFIXES, WATCH_KEY_BYTES, WatchSuffix, file_op, kind};

use crate::{
    kernel::{
        KPtr, PATH_AREA, off, read_path, read_ptr, read_user, read_user_str, task_fd_file,
        walk_path_backwards,
    },
    maps::{PATHBUF, SCRATCH, submit_scratch},
    syscalls::{args, fill_header, remember, ret, syscall_tp, take},
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

/// Where a path comes from.
#[derive(Clone, Copy)]
enum Source {
    /// A user string, relative to a directory descriptor (or the cwd).
    User { dirfd: i64, path: u64 },
    /// The file open at a descriptor.
    Fd(i64),
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
fn build(source: Source) -> Option<Built> {
    let buf = PATHBUF.get_ptr_mut(0)?;
    // SAFETY: this CPU's buffer.
    let area = unsafe { (*buf).area.as_mut_ptr() };
    let task = current_task();
    let fs = read_ptr(task, off!(task_fs)).ok()?;
    let root = read_path(fs, off!(fs_root)).ok()?;
    let (dir, tail) = match source {
        Source::User { dirfd, path } => {
            let mut first = [0u8; 1];
            read_user(first.as_mut_ptr(), 1, path as KPtr).ok()?;
            if first[0] == b'/' {
                let n = read_user_str(
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
            let n = read_user_str(
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
    };
    let walk = walk_path_backwards(DIR_END, dir, root);
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
    // SAFETY: copies inside this CPU's buffer; lengths bounded above.
    unsafe {
        bpf_probe_read_kernel(
            core::ptr::addr_of_mut!(buf.key.data) as *mut c_void,
            len as u32,
            buf.area.as_ptr().wrapping_add(start) as *const c_void,
        );
    }
    let mut ops = WATCH.get(&buf.key).copied().unwrap_or(0);

    // The last 16 bytes of the path against the watched suffixes.
    if built.len >= 16 {
        let end = (built.start + built.len - 16) & (AREA - 1);
        let tail = buf.area.as_ptr().wrapping_add(end) as *const u64;
        // SAFETY: end + 16 <= AREA + slack.
        let (t0, t1) = unsafe { (tail.read_unaligned(), tail.add(1).read_unaligned()) };
        for i in 0..MAX_WATCH_SUFFIXES {
            let slot = unsafe { core::ptr::read_volatile(&WATCH_SUFFIXES[i]) };
            if slot.len == 0 {
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
                ops |= slot.ops;
            }
        }
    }
    ops
}

/// Does a watch rule want `bits` on `source`?
#[inline(always)]
fn watched(source: Source, bits: u32) -> bool {
    bits != 0 && build(source).is_some_and(|built| wanted(&built) & bits != 0)
}

/// Tags of pending file syscalls: the record kind in the high bits, the syscall below.
const fn tag(call: u64) -> u64 {
    ((kind::FILE as u64) << 8) | call
}

/// Copies a built path into the record's data at `at`; returns the bytes copied.
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
    // SAFETY: bounded copy out of this CPU's PATHBUF.
    unsafe {
        bpf_probe_read_kernel(
            dst as *mut c_void,
            len as u32,
            (*buf).area.as_ptr().wrapping_add(built.start & (AREA - 1)) as *const c_void,
        );
    }
    len
}

/// Builds and submits a FileRecord for `path` (and `other`, for renames).
#[inline(always)]
fn emit(
    op: u16,
    flags: u64,
    mode: u64,
    result: i64,
    path: Source,
    other: Option<Source>,
    path_is_source: bool,
) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the scratch buffer holds a FileRecord and two paths after it.
    let r = unsafe { &mut *(scratch as *mut FileRecord) };
    let data = (scratch as *mut u8).wrapping_add(core::mem::size_of::<FileRecord>());
    fill_header(&mut r.hdr, kind::FILE, 0);
    r.op = op;
    r.path_is_source = path_is_source as u16;
    r.flags = flags as u32;
    r.mode = mode as u32;
    r.result = result as i32;
    r.truncated = 0;
    r.path_len = 0;
    r.other_len = 0;
    if let Some(built) = build(path) {
        r.path_len = copy_path(&built, data) as u16;
        r.truncated |= built.truncated as u32;
    }
    if let Some(other) = other
        && let Some(built) = build(other)
    {
        let at = (r.path_len as usize) & (AREA - 1);
        r.other_len = copy_path(&built, data.wrapping_add(at)) as u16;
        r.truncated |= (built.truncated as u32) << 1;
    }
    let size = core::mem::size_of::<FileRecord>() + r.path_len as usize + r.other_len as usize;
    r.hdr.size = size as u32;
    submit_scratch(scratch, size, kind::FILE);
}

/// The operations an open with `flags` and `mode` performs.
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

// Syscall numbers are only tags here; any distinct values do.
const OPENAT: u64 = 1;
const OPEN: u64 = 2;
const CREAT: u64 = 3;
const OPENAT2: u64 = 4;
const RENAMEAT2: u64 = 5;
const RENAMEAT: u64 = 6;
const RENAME: u64 = 7;
const UNLINKAT: u64 = 8;
const UNLINK: u64 = 9;
const FCHMODAT: u64 = 10;
const FCHMODAT2: u64 = 11;
const CHMOD: u64 = 12;
const FCHMOD: u64 = 13;
const UTIMENSAT: u64 = 14;
const UTIMES: u64 = 15;
const FUTIMESAT: u64 = 16;
const UTIME: u64 = 17;
const TRUNCATE: u64 = 18;
const FTRUNCATE: u64 = 19;
const LINKAT: u64 = 20;
const LINK: u64 = 21;
const SYMLINKAT: u64 = 22;

/// Remembers the arguments of an open that a rule wants.
#[inline(always)]
fn open_enter(call: u64, a: [u64; 6], dirfd: i64, path: u64, flags: u64, mode: u64) {
    let bits = open_bits(flags, mode);
    if watched(Source::User { dirfd, path }, bits) {
        let mut a = a;
        // Normalised: dirfd, path, flags, mode.
        a[0] = dirfd as u64;
        a[1] = path;
        a[2] = flags;
        a[3] = mode;
        remember(tag(call), a);
    }
}

#[inline(always)]
fn open_exit(ctx: &TracePointContext, call: u64) {
    if let Some(a) = take(tag(call)) {
        let op = open_op(open_bits(a[2], a[3]));
        let source = Source::User {
            dirfd: a[0] as i64,
            path: a[1],
        };
        emit(op, a[2], a[3], ret(ctx), source, None, false);
    }
}

syscall_tp!(sys_enter_openat, "sys_enter_openat", |ctx| {
    let a = args(ctx);
    open_enter(OPENAT, a, a[0] as i32 as i64, a[1], a[2], a[3]);
});
syscall_tp!(sys_exit_openat, "sys_exit_openat", |ctx| open_exit(
    ctx, OPENAT
));

syscall_tp!(sys_enter_open, "sys_enter_open", |ctx| {
    let a = args(ctx);
    open_enter(OPEN, a, AT_FDCWD, a[0], a[1], a[2]);
});
syscall_tp!(sys_exit_open, "sys_exit_open", |ctx| open_exit(ctx, OPEN));

syscall_tp!(sys_enter_creat, "sys_enter_creat", |ctx| {
    let a = args(ctx);
    open_enter(CREAT, a, AT_FDCWD, a[0], O_CREAT | O_WRONLY | O_TRUNC, a[1]);
});
syscall_tp!(sys_exit_creat, "sys_exit_creat", |ctx| open_exit(
    ctx, CREAT
));

syscall_tp!(sys_enter_openat2, "sys_enter_openat2", |ctx| {
    let a = args(ctx);
    // struct open_how { u64 flags; u64 mode; u64 resolve; }
    let mut how = [0u8; 16];
    if read_user(how.as_mut_ptr(), 16, a[2] as KPtr).is_ok() {
        let flags = u64::from_ne_bytes([
            how[0], how[1], how[2], how[3], how[4], how[5], how[6], how[7],
        ]);
        let mode = u64::from_ne_bytes([
            how[8], how[9], how[10], how[11], how[12], how[13], how[14], how[15],
        ]);
        open_enter(OPENAT2, a, a[0] as i32 as i64, a[1], flags, mode);
    }
});
syscall_tp!(sys_exit_openat2, "sys_exit_openat2", |ctx| open_exit(
    ctx, OPENAT2
));

/// Renames: the new name watched (something moved onto a watched path), or the old one
/// (a watched file moved away, as `sed -i` and log cleaners do).
#[inline(always)]
fn rename_enter(call: u64, olddir: i64, old: u64, newdir: i64, new: u64, flags: u64) {
    let bit = file_op::bit(file_op::RENAME);
    let onto = watched(
        Source::User {
            dirfd: newdir,
            path: new,
        },
        bit,
    );
    if onto
        || watched(
            Source::User {
                dirfd: olddir,
                path: old,
            },
            bit,
        )
    {
        remember(
            tag(call),
            [
                olddir as u64,
                old,
                newdir as u64,
                new,
                flags,
                (!onto) as u64,
            ],
        );
    }
}

#[inline(always)]
fn rename_exit(ctx: &TracePointContext, call: u64) {
    if let Some(a) = take(tag(call)) {
        let old = Source::User {
            dirfd: a[0] as i64,
            path: a[1],
        };
        let new = Source::User {
            dirfd: a[2] as i64,
            path: a[3],
        };
        let away = a[5] != 0;
        let (path, other) = if away { (old, new) } else { (new, old) };
        emit(file_op::RENAME, a[4], 0, ret(ctx), path, Some(other), away);
    }
}

syscall_tp!(sys_enter_renameat2, "sys_enter_renameat2", |ctx| {
    let a = args(ctx);
    rename_enter(
        RENAMEAT2,
        a[0] as i32 as i64,
        a[1],
        a[2] as i32 as i64,
        a[3],
        a[4],
    );
});
syscall_tp!(sys_exit_renameat2, "sys_exit_renameat2", |ctx| rename_exit(
    ctx, RENAMEAT2
));
syscall_tp!(sys_enter_renameat, "sys_enter_renameat", |ctx| {
    let a = args(ctx);
    rename_enter(
        RENAMEAT,
        a[0] as i32 as i64,
        a[1],
        a[2] as i32 as i64,
        a[3],
        0,
    );
});
syscall_tp!(sys_exit_renameat, "sys_exit_renameat", |ctx| rename_exit(
    ctx, RENAMEAT
));
syscall_tp!(sys_enter_rename, "sys_enter_rename", |ctx| {
    let a = args(ctx);
    rename_enter(RENAME, AT_FDCWD, a[0], AT_FDCWD, a[1], 0);
});
syscall_tp!(sys_exit_rename, "sys_exit_rename", |ctx| rename_exit(
    ctx, RENAME
));

/// Operations on one path: remember (dirfd-or-fd, path, flags, mode, op, is_fd).
#[inline(always)]
fn path_enter(call: u64, op: u16, source: Source, flags: u64, mode: u64) {
    if watched(source, file_op::bit(op)) {
        let (a0, a1, is_fd) = match source {
            Source::User { dirfd, path } => (dirfd as u64, path, 0),
            Source::Fd(fd) => (fd as u64, 0, 1),
        };
        remember(tag(call), [a0, a1, flags, mode, op as u64, is_fd]);
    }
}

#[inline(always)]
fn path_exit(ctx: &TracePointContext, call: u64) {
    if let Some(a) = take(tag(call)) {
        let source = if a[5] != 0 {
            Source::Fd(a[0] as i64)
        } else {
            Source::User {
                dirfd: a[0] as i64,
                path: a[1],
            }
        };
        emit(a[4] as u16, a[2], a[3], ret(ctx), source, None, false);
    }
}

fn user(dirfd: u64, path: u64) -> Source {
    Source::User {
        dirfd: dirfd as i32 as i64,
        path,
    }
}

fn cwd(path: u64) -> Source {
    Source::User {
        dirfd: AT_FDCWD,
        path,
    }
}

syscall_tp!(sys_enter_unlinkat, "sys_enter_unlinkat", |ctx| {
    let a = args(ctx);
    path_enter(UNLINKAT, file_op::UNLINK, user(a[0], a[1]), a[2], 0);
});
syscall_tp!(sys_exit_unlinkat, "sys_exit_unlinkat", |ctx| path_exit(
    ctx, UNLINKAT
));
syscall_tp!(sys_enter_unlink, "sys_enter_unlink", |ctx| {
    path_enter(UNLINK, file_op::UNLINK, cwd(args(ctx)[0]), 0, 0);
});
syscall_tp!(sys_exit_unlink, "sys_exit_unlink", |ctx| path_exit(
    ctx, UNLINK
));

/// chmod matters here when the new mode makes the file executable.
#[inline(always)]
fn chmod_enter(call: u64, source: Source, mode: u64) {
    if mode & S_IXUGO != 0 {
        path_enter(call, file_op::CHMOD_EXEC, source, 0, mode);
    }
}

syscall_tp!(sys_enter_fchmodat, "sys_enter_fchmodat", |ctx| {
    let a = args(ctx);
    chmod_enter(FCHMODAT, user(a[0], a[1]), a[2]);
});
syscall_tp!(sys_exit_fchmodat, "sys_exit_fchmodat", |ctx| path_exit(
    ctx, FCHMODAT
));
syscall_tp!(sys_enter_fchmodat2, "sys_enter_fchmodat2", |ctx| {
    let a = args(ctx);
    chmod_enter(FCHMODAT2, user(a[0], a[1]), a[2]);
});
syscall_tp!(sys_exit_fchmodat2, "sys_exit_fchmodat2", |ctx| path_exit(
    ctx, FCHMODAT2
));
syscall_tp!(sys_enter_chmod, "sys_enter_chmod", |ctx| {
    let a = args(ctx);
    chmod_enter(CHMOD, cwd(a[0]), a[1]);
});
syscall_tp!(sys_exit_chmod, "sys_exit_chmod", |ctx| path_exit(
    ctx, CHMOD
));
syscall_tp!(sys_enter_fchmod, "sys_enter_fchmod", |ctx| {
    let a = args(ctx);
    chmod_enter(FCHMOD, Source::Fd(a[0] as i32 as i64), a[1]);
});
syscall_tp!(sys_exit_fchmod, "sys_exit_fchmod", |ctx| path_exit(
    ctx, FCHMOD
));

syscall_tp!(sys_enter_utimensat, "sys_enter_utimensat", |ctx| {
    let a = args(ctx);
    // A null filename sets the times of the file open at dirfd (futimens).
    let source = if a[1] == 0 {
        Source::Fd(a[0] as i32 as i64)
    } else {
        user(a[0], a[1])
    };
    path_enter(UTIMENSAT, file_op::UTIMES, source, a[3], 0);
});
syscall_tp!(sys_exit_utimensat, "sys_exit_utimensat", |ctx| path_exit(
    ctx, UTIMENSAT
));
syscall_tp!(sys_enter_utimes, "sys_enter_utimes", |ctx| {
    path_enter(UTIMES, file_op::UTIMES, cwd(args(ctx)[0]), 0, 0);
});
syscall_tp!(sys_exit_utimes, "sys_exit_utimes", |ctx| path_exit(
    ctx, UTIMES
));
syscall_tp!(sys_enter_futimesat, "sys_enter_futimesat", |ctx| {
    let a = args(ctx);
    path_enter(FUTIMESAT, file_op::UTIMES, user(a[0], a[1]), 0, 0);
});
syscall_tp!(sys_exit_futimesat, "sys_exit_futimesat", |ctx| path_exit(
    ctx, FUTIMESAT
));
syscall_tp!(sys_enter_utime, "sys_enter_utime", |ctx| {
    path_enter(UTIME, file_op::UTIMES, cwd(args(ctx)[0]), 0, 0);
});
syscall_tp!(sys_exit_utime, "sys_exit_utime", |ctx| path_exit(
    ctx, UTIME
));

syscall_tp!(sys_enter_truncate, "sys_enter_truncate", |ctx| {
    path_enter(TRUNCATE, file_op::TRUNCATE, cwd(args(ctx)[0]), 0, 0);
});
syscall_tp!(sys_exit_truncate, "sys_exit_truncate", |ctx| path_exit(
    ctx, TRUNCATE
));
syscall_tp!(sys_enter_ftruncate, "sys_enter_ftruncate", |ctx| {
    let a = args(ctx);
    path_enter(
        FTRUNCATE,
        file_op::TRUNCATE,
        Source::Fd(a[0] as i32 as i64),
        0,
        0,
    );
});
syscall_tp!(sys_exit_ftruncate, "sys_exit_ftruncate", |ctx| path_exit(
    ctx, FTRUNCATE
));

syscall_tp!(sys_enter_linkat, "sys_enter_linkat", |ctx| {
    let a = args(ctx);
    path_enter(LINKAT, file_op::LINK, user(a[2], a[3]), a[4], 0);
});
syscall_tp!(sys_exit_linkat, "sys_exit_linkat", |ctx| path_exit(
    ctx, LINKAT
));
syscall_tp!(sys_enter_link, "sys_enter_link", |ctx| {
    path_enter(LINK, file_op::LINK, cwd(args(ctx)[1]), 0, 0);
});
syscall_tp!(sys_exit_link, "sys_exit_link", |ctx| path_exit(ctx, LINK));
syscall_tp!(sys_enter_symlinkat, "sys_enter_symlinkat", |ctx| {
    let a = args(ctx);
    path_enter(SYMLINKAT, file_op::LINK, user(a[1], a[2]), 0, 0);
});
syscall_tp!(sys_exit_symlinkat, "sys_exit_symlinkat", |ctx| path_exit(
    ctx, SYMLINKAT
));
