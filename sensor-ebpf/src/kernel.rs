//! Reading kernel structures at the offsets the agent resolved from BTF.
//!
//! Every unsafe read of kernel memory goes through `read`/`read_str` here; the rest of the
//! probes deal in plain values.

use core::ffi::c_void;

use aya_ebpf::helpers::{
    bpf_probe_read_kernel,
    generated::{
        bpf_loop, bpf_probe_read_kernel as probe_read_kernel_raw, bpf_probe_read_kernel_str,
        bpf_probe_read_user, bpf_probe_read_user_str,
    },
};
use sensor_common::{
    DATA_OFFSET_LIMIT, FdInfo, KernelLayout, MAX_COMPONENT, MAX_DEPTH, MAX_RECORD_HEADER, fd_kind,
};

use crate::maps::{PATHBUF, SCRATCH, WALK};

/// Filled in by the agent before loading (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
pub static LAYOUT: KernelLayout = KernelLayout {
    ready: 0,
    task_pid: 0,
    task_tgid: 0,
    task_real_parent: 0,
    task_group_leader: 0,
    task_comm: 0,
    task_mm: 0,
    task_fs: 0,
    task_files: 0,
    task_real_cred: 0,
    task_start_boottime: 0,
    task_exit_code: 0,
    task_signal: 0,
    signal_live: 0,
    bprm_filename: 0,
    bprm_fdpath: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    mm_exe_file: 0,
    file_f_path: 0,
    file_f_inode: 0,
    file_private_data: 0,
    path_mnt: 0,
    path_dentry: 0,
    dentry_d_parent: 0,
    dentry_d_name: 0,
    dentry_d_inode: 0,
    qstr_len: 0,
    qstr_name: 0,
    inode_i_mode: 0,
    inode_i_nlink: 0,
    inode_i_sb: 0,
    inode_i_ino: 0,
    inode_i_rdev: 0,
    sb_s_magic: 0,
    mount_mnt: 0,
    mount_mnt_parent: 0,
    mount_mnt_mountpoint: 0,
    vfsmount_mnt_root: 0,
    fs_root: 0,
    fs_pwd: 0,
    files_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    cred_uid: 0,
    cred_gid: 0,
    cred_euid: 0,
    cred_egid: 0,
    socket_type: 0,
    socket_sk: 0,
    sk_family: 0,
    sk_daddr: 0,
    sk_rcv_saddr: 0,
    sk_dport: 0,
    sk_num: 0,
    sk_v6_daddr: 0,
    sk_v6_rcv_saddr: 0,
    regs_args: [0; 6],
    regs_nr: 0,
    _pad: 0,
};

/// The agent's own process id; its activity is not reported.
#[unsafe(no_mangle)]
static AGENT_TGID: u32 = 0;

/// Offset of a `KernelLayout` field, read so that the compiler cannot fold the default.
macro_rules! off {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!(crate::kernel::LAYOUT.$field)) }
            as usize
    };
}
pub(crate) use off;

/// Offset in `struct pt_regs` of syscall argument `i` (0-5).
#[inline(always)]
pub fn regs_arg(i: usize) -> usize {
    // SAFETY: read of a read-only global; `i % 6` keeps the index in bounds.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(LAYOUT.regs_args[i % 6])) as usize }
}

#[inline(always)]
pub fn layout_ready() -> bool {
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(LAYOUT.ready)) != 0 }
}

#[inline(always)]
pub fn agent_tgid() -> u32 {
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(AGENT_TGID)) }
}

pub type KPtr = *const u8;

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
pub fn read<T: Copy>(base: KPtr, offset: usize) -> Result<T, i64> {
    if base.is_null() {
        return Err(-1);
    }
    // SAFETY: bpf_probe_read_kernel validates the address and fails cleanly.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset) as *const T).map_err(|e| e as i64) }
}

/// Copies `len` bytes at `base + offset` in kernel memory straight to `dst` (no stack
/// copy, no memcpy loop for the verifier to walk). On failure the helper zeroes `dst`.
#[inline(always)]
pub fn read_into(dst: *mut u8, len: u32, base: KPtr, offset: usize) -> bool {
    // SAFETY: the helper validates the source and zero-fills `dst` on failure.
    unsafe {
        probe_read_kernel_raw(
            dst as *mut c_void,
            len,
            base.wrapping_add(offset) as *const c_void,
        ) == 0
    }
}

/// Reads a pointer at `base + offset`.
#[inline(always)]
pub fn read_ptr(base: KPtr, offset: usize) -> Result<KPtr, i64> {
    read::<u64>(base, offset).map(|v| v as KPtr)
}

/// Copies a NUL-terminated kernel string of at most `max` bytes to `dst`; returns the bytes
/// copied including the NUL.
#[inline(always)]
pub fn read_kernel_str(dst: *mut u8, max: u32, src: KPtr) -> Result<usize, i64> {
    // SAFETY: the helper bounds the copy by `max` and fails on a bad source.
    let n = unsafe { bpf_probe_read_kernel_str(dst as *mut c_void, max, src as *const c_void) };
    if n < 0 { Err(n) } else { Ok(n as usize) }
}

/// As `read_kernel_str`, from the current task's memory.
#[inline(always)]
pub fn read_user_str(dst: *mut u8, max: u32, src: KPtr) -> Result<usize, i64> {
    // SAFETY: as above; user faults make the helper fail, not the program.
    let n = unsafe { bpf_probe_read_user_str(dst as *mut c_void, max, src as *const c_void) };
    if n < 0 { Err(n) } else { Ok(n as usize) }
}

/// Copies `len` bytes of the current task's memory to `dst`.
#[inline(always)]
pub fn read_user(dst: *mut u8, len: u32, src: KPtr) -> Result<(), i64> {
    // SAFETY: as above.
    let r = unsafe { bpf_probe_read_user(dst as *mut c_void, len, src as *const c_void) };
    if r < 0 { Err(r) } else { Ok(()) }
}

/// A `struct path`: the mount and the dentry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Path {
    pub mnt: KPtr,
    pub dentry: KPtr,
}

#[inline(always)]
pub fn read_path(base: KPtr, offset: usize) -> Result<Path, i64> {
    Ok(Path {
        mnt: read_ptr(base, offset + off!(path_mnt))?,
        dentry: read_ptr(base, offset + off!(path_dentry))?,
    })
}

/// Result of a dentry walk.
pub struct Walk {
    /// Offset in the data area after the last component written.
    pub end: usize,
    pub truncated: bool,
    /// The walk ended on a root that is not the task's root (internal mount, pseudo file,
    /// or outside a chroot).
    pub outside_root: bool,
}

/// State of a dentry walk, shared with the `bpf_loop` callback through a per-CPU map.
///
/// It lives in a map, not on the stack, on purpose: the verifier tracks the exact range of
/// stack values, so a growing `end` would make every iteration a new state to check, while
/// map values are opaque scalars and the callback converges after one pass.
#[repr(C)]
pub struct WalkState {
    dentry: u64,
    vfsmnt: u64,
    mount: u64,
    root_dentry: u64,
    root_mnt: u64,
    /// Offset of the data area in the scratch buffer (forward walks).
    base: u64,
    /// Forward: offset after the last component written. Backward: offset of the first
    /// byte written in the PATHBUF area.
    end: u64,
    /// `WALK_*` bits.
    flags: u64,
}

const WALK_DONE: u64 = 1;
const WALK_OUTSIDE_ROOT: u64 = 2;
/// Write `/name` pieces right to left into PATHBUF instead of NUL-terminated names left
/// to right into SCRATCH.
const WALK_BACKWARDS: u64 = 4;

/// Size of the PATHBUF area a path is assembled in (a power of two).
pub const PATH_AREA: usize = 2048;
/// Longest name component copied by a backward walk (NAME_MAX).
const NAME_MAX: usize = 255;

/// Writes the components of `path`, leaf first, each NUL-terminated, into the scratch
/// buffer's data area (which starts `base` bytes into it) from offset `start`. Mount points
/// are crossed; the walk stops at `root` (the task's root).
///
/// The loop runs under `bpf_loop`, so the verifier checks one step instead of every
/// iteration of every path in a program.
#[inline(always)]
pub fn walk_path(base: usize, start: usize, path: Path, root: Path) -> Walk {
    run_walk(path, root, base, start, 0)
}

/// Writes `path` as a string, `/a/b/c`, right to left into the PATHBUF area so that it
/// ends at `end`. Returns the walk with `end` set to where the string starts.
#[inline(always)]
pub fn walk_path_backwards(end: usize, path: Path, root: Path) -> Walk {
    run_walk(path, root, 0, end, WALK_BACKWARDS)
}

#[inline(always)]
fn run_walk(path: Path, root: Path, base: usize, start: usize, mode: u64) -> Walk {
    let unfinished = Walk {
        end: start,
        truncated: true,
        outside_root: false,
    };
    let Some(state) = WALK.get_ptr_mut(0) else {
        return unfinished;
    };
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do.
    let state = unsafe { &mut *state };
    state.dentry = path.dentry as u64;
    state.vfsmnt = path.mnt as u64;
    state.mount = (path.mnt as u64).wrapping_sub(off!(mount_mnt) as u64);
    state.root_dentry = root.dentry as u64;
    state.root_mnt = root.mnt as u64;
    state.base = base as u64;
    state.end = start as u64;
    state.flags = mode;
    // SAFETY: the callback finds its state in the WALK map; no context pointer is passed.
    unsafe {
        bpf_loop(
            MAX_DEPTH as u32,
            walk_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    Walk {
        end: state.end as usize,
        truncated: state.flags & WALK_DONE == 0,
        outside_root: state.flags & WALK_OUTSIDE_ROOT != 0,
    }
}

/// One step of a walk: returns 1 to stop the loop, 0 to go on.
#[inline(never)]
extern "C" fn walk_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot, filled in by run_walk.
    let s = unsafe { &mut *s };
    let dentry = s.dentry as KPtr;
    let vfsmnt = s.vfsmnt as KPtr;
    let mount = s.mount as KPtr;
    if s.dentry == s.root_dentry && s.vfsmnt == s.root_mnt {
        s.flags |= WALK_DONE;
        return 1;
    }
    let Ok(mnt_root) = read_ptr(vfsmnt, off!(vfsmount_mnt_root)) else {
        return 1;
    };
    if dentry == mnt_root {
        let Ok(parent_mount) = read_ptr(mount, off!(mount_mnt_parent)) else {
            return 1;
        };
        if parent_mount == mount {
            s.flags |= WALK_DONE | WALK_OUTSIDE_ROOT;
            return 1;
        }
        let Ok(mountpoint) = read_ptr(mount, off!(mount_mnt_mountpoint)) else {
            return 1;
        };
        s.dentry = mountpoint as u64;
        s.mount = parent_mount as u64;
        s.vfsmnt = (parent_mount as u64).wrapping_add(off!(mount_mnt) as u64);
        return 0;
    }
    let Ok(parent) = read_ptr(dentry, off!(dentry_d_parent)) else {
        return 1;
    };
    let Ok(name) = read_ptr(dentry, off!(dentry_d_name) + off!(qstr_name)) else {
        return 1;
    };
    let written = if s.flags & WALK_BACKWARDS != 0 {
        write_name_backwards(s, dentry, name)
    } else {
        write_name_forward(s, name)
    };
    if !written {
        return 1;
    }
    if dentry == parent {
        // A pseudo file (memfd, anonymous inode) has no parent to climb to.
        s.flags |= WALK_DONE | WALK_OUTSIDE_ROOT;
        return 1;
    }
    s.dentry = parent as u64;
    0
}

/// Appends `name` and its NUL at `s.end` in the scratch data area.
#[inline(always)]
fn write_name_forward(s: &mut WalkState, name: KPtr) -> bool {
    let end = s.end as usize;
    if end >= DATA_OFFSET_LIMIT - MAX_COMPONENT {
        return false;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // Record headers are well under 4 KiB (asserted in sensor-common); the mask tells the
    // verifier so.
    let base = (s.base as usize) & (MAX_RECORD_HEADER - 1);
    let dst = (scratch as *mut u8).wrapping_add(base + (end & (DATA_OFFSET_LIMIT - 1)));
    match read_kernel_str(dst, MAX_COMPONENT as u32, name) {
        Ok(n) if n > 0 => {
            s.end = (end + n) as u64;
            true
        }
        _ => false,
    }
}

/// Prepends `/name` before `s.end` in the PATHBUF area.
#[inline(always)]
fn write_name_backwards(s: &mut WalkState, dentry: KPtr, name: KPtr) -> bool {
    let Some(buf) = PATHBUF.get_ptr_mut(0) else {
        return false;
    };
    let len = read::<u32>(dentry, off!(dentry_d_name) + off!(qstr_len)).unwrap_or(0) as usize;
    let len = len & NAME_MAX;
    let pos = s.end as usize;
    if pos <= len + 1 {
        return false;
    }
    let pos = (pos - len) & (PATH_AREA - 1);
    // SAFETY: this CPU's buffer; pos < PATH_AREA and len <= NAME_MAX fit in its slack.
    unsafe {
        let area = (*buf).area.as_mut_ptr();
        probe_read_kernel_raw(
            area.wrapping_add(pos) as *mut c_void,
            len as u32,
            name as *const c_void,
        );
        let pos = (pos - 1) & (PATH_AREA - 1);
        *area.wrapping_add(pos) = b'/';
        s.end = pos as u64;
    }
    true
}

/// A path being assembled for the file probes: the LPM key first, then the work area.
#[repr(C)]
pub struct PathBuf {
    /// The LPM key: bit length, then the first bytes of the path.
    pub key: aya_ebpf::maps::lpm_trie::Key<[u8; sensor_common::WATCH_KEY_BYTES]>,
    pub _pad: [u8; 4],
    /// Slack after the area lets a masked offset plus a name stay in bounds.
    pub area: [u8; PATH_AREA + NAME_MAX + 1],
}

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const S_IFREG: u16 = 0o100000;
const S_IFDIR: u16 = 0o040000;
const S_IFCHR: u16 = 0o020000;
const S_IFIFO: u16 = 0o010000;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The open file behind descriptor `fd` of `task`, or null.
#[inline(always)]
pub fn task_fd_file(task: KPtr, fd: u32) -> KPtr {
    let Ok(files) = read_ptr(task, off!(task_files)) else {
        return core::ptr::null();
    };
    let Ok(fdt) = read_ptr(files, off!(files_fdt)) else {
        return core::ptr::null();
    };
    let Ok(max) = read::<u32>(fdt, off!(fdtable_max_fds)) else {
        return core::ptr::null();
    };
    if fd >= max {
        return core::ptr::null();
    }
    let Ok(array) = read_ptr(fdt, off!(fdtable_fd)) else {
        return core::ptr::null();
    };
    read_ptr(array, fd as usize * 8).unwrap_or(core::ptr::null())
}

/// Describes an open file: its kind, and for an inet socket, its addresses. Every field of
/// `out` is written (the scratch buffer it lives in is reused).
#[inline(always)]
pub fn describe_file(file: KPtr, out: &mut FdInfo) {
    // FdInfo is 48 bytes: six words. Volatile stores keep LLVM from turning this into a
    // call to memset, which aya implements as a byte loop the verifier walks 48 times.
    let words = out as *mut FdInfo as *mut u64;
    for i in 0..core::mem::size_of::<FdInfo>() / 8 {
        // SAFETY: in bounds of `out`, which is 8-byte aligned.
        unsafe { words.add(i).write_volatile(0) };
    }
    let Ok(inode) = read_ptr(file, off!(file_f_inode)) else {
        return;
    };
    let Ok(mode) = read::<u16>(inode, off!(inode_i_mode)) else {
        return;
    };
    out.ino = read::<u64>(inode, off!(inode_i_ino)).unwrap_or(0);
    out.kind = match mode & S_IFMT {
        S_IFSOCK => fd_kind::SOCKET,
        S_IFIFO => fd_kind::PIPE,
        S_IFREG => fd_kind::FILE,
        S_IFDIR => fd_kind::DIR,
        S_IFCHR => {
            let major = read::<u32>(inode, off!(inode_i_rdev)).unwrap_or(0) >> 20;
            // 4: virtual consoles and serial, 5: /dev/tty and ptmx, 136-143: pseudo terminals.
            if major == 4 || major == 5 || (136..=143).contains(&major) {
                fd_kind::TTY
            } else {
                fd_kind::CHAR
            }
        }
        _ => fd_kind::OTHER,
    };
    if out.kind != fd_kind::SOCKET {
        return;
    }
    let Ok(sock) = read_ptr(file, off!(file_private_data)) else {
        return;
    };
    out.sock_type = read::<u16>(sock, off!(socket_type)).unwrap_or(0) as u8;
    let Ok(sk) = read_ptr(sock, off!(socket_sk)) else {
        return;
    };
    describe_sock(sk, out);
}

/// Fills family, addresses and ports from a `struct sock`.
#[inline(always)]
pub fn describe_sock(sk: KPtr, out: &mut FdInfo) {
    let Ok(family) = read::<u16>(sk, off!(sk_family)) else {
        return;
    };
    out.family = family;
    out.local_port = read::<u16>(sk, off!(sk_num)).unwrap_or(0);
    out.remote_port = u16::from_be(read::<u16>(sk, off!(sk_dport)).unwrap_or(0));
    if family == AF_INET {
        read_into(out.local_addr.as_mut_ptr(), 4, sk, off!(sk_rcv_saddr));
        read_into(out.remote_addr.as_mut_ptr(), 4, sk, off!(sk_daddr));
    } else if family == AF_INET6 {
        read_into(out.local_addr.as_mut_ptr(), 16, sk, off!(sk_v6_rcv_saddr));
        read_into(out.remote_addr.as_mut_ptr(), 16, sk, off!(sk_v6_daddr));
    }
}
