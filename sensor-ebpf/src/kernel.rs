//! Reading kernel and user memory at the offsets the agent resolved from BTF.
//!
//! Every read of kernel or user memory goes through the functions here; the rest of the
//! probes deal in plain values. Variable sizes handed to a read helper pass through
//! [`bounded`] first, which is what keeps the verifiers of 5.10 to 7.x agreeing that the
//! size is in range (see its comment).

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{
    bpf_probe_read_kernel as probe_read_kernel_raw, bpf_probe_read_kernel_str, bpf_probe_read_user,
    bpf_probe_read_user_str,
};
use sensor_common::{FdInfo, KernelLayout, fd_kind};

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
    bprm_file: 0,
    bprm_buf: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    mm_exe_file: 0,
    file_f_path: 0,
    file_f_inode: 0,
    file_f_flags: 0,
    file_f_mode: 0,
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
    inode_i_size: 0,
    inode_mtime_sec: 0,
    inode_ctime_sec: 0,
    sb_s_magic: 0,
    sb_s_dev: 0,
    mount_mnt: 0,
    mount_mnt_parent: 0,
    mount_mnt_mountpoint: 0,
    vfsmount_mnt_root: 0,
    vfsmount_mnt_sb: 0,
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
    task_nameidata: 0,
    nameidata_name: 0,
    nameidata_dfd: 0,
    filename_name: 0,
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
        // SAFETY: a read of a read-only global the agent filled before loading.
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
    // SAFETY: a read of a read-only global the agent filled before loading.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(LAYOUT.ready)) != 0 }
}

#[inline(always)]
pub fn agent_tgid() -> u32 {
    // SAFETY: a read of a read-only global the agent filled before loading.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(AGENT_TGID)) }
}

pub type KPtr = *const u8;

/// Reads a `T` at `base + offset` in kernel memory, or says why it could not.
#[inline(always)]
pub fn read<T: Copy>(base: KPtr, offset: usize) -> Result<T, i64> {
    if base.is_null() {
        return Err(-1);
    }
    match probe::<T>(base, offset) {
        (value, 0) => Ok(value),
        (_, err) => Err(err),
    }
}

/// A `T` at `base + offset`, or zero when it cannot be read: no branch, so nothing for
/// the compiler to spill a default for (see `probe`).
#[inline(always)]
pub fn get<T: Copy>(base: KPtr, offset: usize) -> T {
    probe::<T>(base, offset).0
}

/// A pointer at `base + offset`, or null.
#[inline(always)]
pub fn get_ptr(base: KPtr, offset: usize) -> KPtr {
    get::<u64>(base, offset) as KPtr
}

/// The value at `base + offset` and the helper's result (0, or a negative errno with the
/// value zeroed).
///
/// The destination starts zeroed, never uninitialised: 5.10's verifier rejects a program
/// in which any path reads a stack slot nothing wrote ("invalid read from stack"), and the
/// compiler is free to read an uninitialised value on the path where the read failed.
#[inline(always)]
fn probe<T: Copy>(base: KPtr, offset: usize) -> (T, i64) {
    let mut value = core::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: the helper writes at most size_of::<T>() bytes into `value`, and zeroes them
    // when the source cannot be read (a null base included); T is plain data.
    unsafe {
        let ret = probe_read_kernel_raw(
            value.as_mut_ptr() as *mut c_void,
            core::mem::size_of::<T>() as u32,
            base.wrapping_add(offset) as *const c_void,
        );
        (value.assume_init(), ret)
    }
}

/// Copies `len` bytes at `base + offset` in kernel memory straight to `dst` (no stack
/// copy, no memcpy loop for the verifier to walk). On failure the helper zeroes `dst`.
#[inline(always)]
pub fn read_into(dst: *mut u8, len: u32, base: KPtr, offset: usize) -> bool {
    copy_kernel(dst, len, base.wrapping_add(offset))
}

/// Copies `len` bytes of kernel memory at `src` to `dst`; for lengths computed at run time,
/// pass them through [`bounded`]. On failure the helper zeroes `dst`.
#[inline(always)]
pub fn copy_kernel(dst: *mut u8, len: u32, src: KPtr) -> bool {
    // SAFETY: the helper validates the source and zero-fills `dst` on failure.
    unsafe { probe_read_kernel_raw(dst as *mut c_void, len, src as *const c_void) == 0 }
}

/// `len & mask` as a helper's size argument, in a form every verifier accepts.
///
/// A size that the code clamped with a comparison is not always known bounded by the
/// verifier: 6.1 loses the bound when the compiler compares one copy of the value and
/// passes a reloaded one ("R2 min value is negative"), 6.12 loses it when the compared
/// value is linked to another by a constant ("R2 unbounded memory access"). The volatile
/// read hides the earlier clamp from the compiler, so the mask is emitted right before the
/// call and the verifier sees a fresh value in `[0, mask]`. `mask` is 2^k - 1 and at least
/// the largest `len` the caller allows.
#[inline(always)]
pub fn bounded(len: usize, mask: usize) -> u32 {
    // SAFETY: a read of a local.
    let opaque = unsafe { core::ptr::read_volatile(&len) };
    (opaque & mask) as u32
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
    get_ptr(array, fd as usize * 8)
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
    // Fields are read straight into `out` (zeroed by the helper on failure) rather than
    // through `read(..).unwrap_or(0)`: on 5.10 the compiler's spills of such defaults
    // became reads of stack slots nothing wrote on some path, which that verifier refuses.
    read_into(field(&mut out.ino), 8, inode, off!(inode_i_ino));
    out.kind = match mode & S_IFMT {
        S_IFSOCK => fd_kind::SOCKET,
        S_IFIFO => fd_kind::PIPE,
        S_IFREG => fd_kind::FILE,
        S_IFDIR => fd_kind::DIR,
        S_IFCHR => {
            let major = get::<u32>(inode, off!(inode_i_rdev)) >> 20;
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
    // `socket.type` is a short; its low byte is the type (little-endian).
    read_into(field(&mut out.sock_type), 1, sock, off!(socket_type));
    let Ok(sk) = read_ptr(sock, off!(socket_sk)) else {
        return;
    };
    describe_sock(sk, out);
}

/// A field of a record as the destination of a read.
#[inline(always)]
fn field<T>(f: &mut T) -> *mut u8 {
    f as *mut T as *mut u8
}

/// Fills family, addresses and ports from a `struct sock`.
#[inline(always)]
pub fn describe_sock(sk: KPtr, out: &mut FdInfo) {
    if !read_into(field(&mut out.family), 2, sk, off!(sk_family)) {
        return;
    }
    read_into(field(&mut out.local_port), 2, sk, off!(sk_num));
    read_into(field(&mut out.remote_port), 2, sk, off!(sk_dport));
    out.remote_port = u16::from_be(out.remote_port);
    let family = out.family;
    if family == AF_INET {
        read_into(out.local_addr.as_mut_ptr(), 4, sk, off!(sk_rcv_saddr));
        read_into(out.remote_addr.as_mut_ptr(), 4, sk, off!(sk_daddr));
    } else if family == AF_INET6 {
        read_into(out.local_addr.as_mut_ptr(), 16, sk, off!(sk_v6_rcv_saddr));
        read_into(out.remote_addr.as_mut_ptr(), 16, sk, off!(sk_v6_daddr));
    }
}
