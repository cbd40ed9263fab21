//! Paths from dentries: the walk from a `struct path` up to the task's root, crossing
//! mount points (a bind mount of the root's filesystem climbed through, to the path the
//! file has in the tree), written either as NUL-terminated components (exec records) or as a
//! `/a/b/c` string assembled right to left (file probes).
//!
//! Two flavours of every program that walks, chosen by the agent at load time (`LOOP`):
//! - `bpf_loop` (5.17+): the verifier checks one step, so paths may be [`MAX_DEPTH`]
//!   components deep at no verification cost;
//! - a plain bounded loop of [`BOUNDED_DEPTH`] steps for kernels without it (5.10 has
//!   neither the helper nor callback subprograms: "number of funcs in func_info doesn't
//!   match number of subprogs"). The verifier walks every iteration, hence the lower bound.
//!
//! The walk's state lives in a per-CPU map, not on the stack: map values are opaque to the
//! verifier, so every step (and every early exit of the bounded loop) reaches the code
//! after it in the same state, and the verifier checks that code once.

use core::ffi::c_void;

use aya_ebpf::{helpers::generated::bpf_loop, macros::map, maps::PerCpuArray};
use sensor_common::{
    BOUNDED_DEPTH, DATA_OFFSET_LIMIT, MAX_COMPONENT, MAX_DEPTH, MAX_RECORD_HEADER,
};

use crate::{
    kernel::{KPtr, bounded, copy_kernel, get, off, read_kernel_str, read_ptr},
    maps::SCRATCH,
};

/// Size of the PATHBUF area a path is assembled in (a power of two).
pub const PATH_AREA: usize = 2048;
/// Longest name component copied by a backward walk (NAME_MAX).
pub const NAME_MAX: usize = 255;

/// State of the path walk in progress on each CPU.
#[map]
static WALK: PerCpuArray<WalkState> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU space where the file probes assemble a path.
#[map]
pub static PATHBUF: PerCpuArray<PathBuf> = PerCpuArray::with_max_entries(1, 0);

/// A path being assembled for the file probes: the LPM key first, then the work area.
#[repr(C)]
pub struct PathBuf {
    /// The LPM key: bit length, then the first bytes of the path.
    pub key: aya_ebpf::maps::lpm_trie::Key<[u8; sensor_common::WATCH_KEY_BYTES]>,
    pub _pad: [u8; 4],
    /// Slack after the area lets a masked offset plus a name stay in bounds.
    pub area: [u8; PATH_AREA + NAME_MAX + 1],
}

/// A `struct path`: the mount and the dentry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Path {
    pub mnt: KPtr,
    pub dentry: KPtr,
}

/// The `struct path` at `base + offset`.
#[inline(always)]
pub fn read_path(base: KPtr, offset: usize) -> Result<Path, i64> {
    Ok(Path {
        mnt: read_ptr(base, offset + off!(path_mnt))?,
        dentry: read_ptr(base, offset + off!(path_dentry))?,
    })
}

/// Result of a dentry walk.
pub struct Walk {
    /// Forward: offset in the data area after the last component written. Backward:
    /// offset in the PATHBUF area of the first byte of the path.
    pub end: usize,
    pub truncated: bool,
    /// The walk ended on a root that is not the task's root (internal mount, pseudo file,
    /// or outside a chroot).
    pub outside_root: bool,
}

#[repr(C)]
struct WalkState {
    dentry: u64,
    vfsmnt: u64,
    mount: u64,
    root_dentry: u64,
    root_mnt: u64,
    /// Offset of the data area in the scratch buffer (forward walks).
    base: u64,
    /// See [`Walk::end`].
    end: u64,
    /// `DONE` and `OUTSIDE_ROOT`.
    flags: u64,
}

const DONE: u64 = 1;
const OUTSIDE_ROOT: u64 = 2;

/// Writes the components of `path`, leaf first, each NUL-terminated, into the scratch
/// buffer's data area (which starts `base` bytes into it) from offset `start`. Mount points
/// are crossed; the walk stops at `root` (the task's root).
#[inline(always)]
pub fn walk_path<const LOOP: bool>(base: usize, start: usize, path: Path, root: Path) -> Walk {
    run_walk::<LOOP, false>(path, root, base, start)
}

/// Writes `path` as a string, `/a/b/c`, right to left into the PATHBUF area so that it
/// ends at `end`. Returns the walk with `end` set to where the string starts.
#[inline(always)]
pub fn walk_path_backwards<const LOOP: bool>(end: usize, path: Path, root: Path) -> Walk {
    run_walk::<LOOP, true>(path, root, 0, end)
}

#[inline(always)]
fn run_walk<const LOOP: bool, const BACKWARDS: bool>(
    path: Path,
    root: Path,
    base: usize,
    start: usize,
) -> Walk {
    let Some(state) = WALK.get_ptr_mut(0) else {
        return Walk {
            end: start,
            truncated: true,
            outside_root: false,
        };
    };
    // SAFETY: this CPU's slot; nothing else runs on this CPU while we do.
    let s = unsafe { &mut *state };
    s.dentry = path.dentry as u64;
    s.vfsmnt = path.mnt as u64;
    s.mount = (path.mnt as u64).wrapping_sub(off!(mount_mnt) as u64);
    s.root_dentry = root.dentry as u64;
    s.root_mnt = root.mnt as u64;
    s.base = base as u64;
    s.end = start as u64;
    s.flags = 0;
    if LOOP {
        let callback = if BACKWARDS {
            step_backwards as *mut c_void
        } else {
            step_forward as *mut c_void
        };
        // SAFETY: the callback finds its state in the WALK map; no context is passed.
        unsafe { bpf_loop(MAX_DEPTH as u32, callback, core::ptr::null_mut(), 0) };
    } else if BACKWARDS {
        sensor_walk_backwards();
    } else {
        sensor_walk_forward();
    }
    // SAFETY: reads of this CPU's slot; volatile so that the verifier, not the compiler,
    // decides what it knows of them (an opaque map value).
    let (end, flags) = unsafe {
        (
            core::ptr::read_volatile(&s.end),
            core::ptr::read_volatile(&s.flags),
        )
    };
    Walk {
        end: end as usize,
        truncated: flags & DONE == 0,
        outside_root: flags & OUTSIDE_ROOT != 0,
    }
}

/// The bounded walks, as global functions: the verifier checks a global function once, on
/// its own, whatever calls it, where it would check an inlined loop again for every state
/// a caller reaches it in (every syscall slot of a dispatcher handler, every kind of path
/// source). The state is in the WALK map; the return value means nothing.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sensor_walk_forward() -> i64 {
    bounded_walk::<false>()
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn sensor_walk_backwards() -> i64 {
    bounded_walk::<true>()
}

#[inline(always)]
fn bounded_walk<const BACKWARDS: bool>() -> i64 {
    let Some(s) = WALK.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot, filled in by run_walk.
    let s = unsafe { &mut *s };
    for _ in 0..BOUNDED_DEPTH {
        if step::<BACKWARDS>(s) {
            break;
        }
    }
    0
}

/// `bpf_loop` callbacks, one per direction so that each program holds only the writer it
/// uses: 1 stops the loop, 0 goes on.
#[inline(never)]
extern "C" fn step_forward(_index: u64, _ctx: *mut c_void) -> i64 {
    loop_step::<false>()
}

#[inline(never)]
extern "C" fn step_backwards(_index: u64, _ctx: *mut c_void) -> i64 {
    loop_step::<true>()
}

#[inline(always)]
fn loop_step<const BACKWARDS: bool>() -> i64 {
    match WALK.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, filled in by run_walk.
        Some(s) => step::<BACKWARDS>(unsafe { &mut *s }) as i64,
        None => 1,
    }
}

/// One step of a walk: returns true to stop.
#[inline(always)]
fn step<const BACKWARDS: bool>(s: &mut WalkState) -> bool {
    let dentry = s.dentry as KPtr;
    let vfsmnt = s.vfsmnt as KPtr;
    let mount = s.mount as KPtr;
    if s.dentry == s.root_dentry && s.vfsmnt == s.root_mnt {
        s.flags |= DONE;
        return true;
    }
    let Ok(mnt_root) = read_ptr(vfsmnt, off!(vfsmount_mnt_root)) else {
        return true;
    };
    if dentry == mnt_root {
        if other_mount_of_root_fs(s, vfsmnt) {
            return false;
        }
        let Ok(parent_mount) = read_ptr(mount, off!(mount_mnt_parent)) else {
            return true;
        };
        if parent_mount == mount {
            s.flags |= DONE | OUTSIDE_ROOT;
            return true;
        }
        let Ok(mountpoint) = read_ptr(mount, off!(mount_mnt_mountpoint)) else {
            return true;
        };
        s.dentry = mountpoint as u64;
        s.mount = parent_mount as u64;
        s.vfsmnt = (parent_mount as u64).wrapping_add(off!(mount_mnt) as u64);
        return false;
    }
    let Ok(parent) = read_ptr(dentry, off!(dentry_d_parent)) else {
        return true;
    };
    let Ok(name) = read_ptr(dentry, off!(dentry_d_name) + off!(qstr_name)) else {
        return true;
    };
    let written = if BACKWARDS {
        write_name_backwards(s, dentry, name)
    } else {
        write_name_forward(s, name)
    };
    if !written {
        return true;
    }
    if dentry == parent {
        // A pseudo file (memfd, anonymous inode) has no parent to climb to.
        s.flags |= DONE | OUTSIDE_ROOT;
        return true;
    }
    s.dentry = parent as u64;
    false
}

/// At the root of a mount: when the mount shows (part of) the filesystem the task's root
/// is on, a bind mount (`mount --bind /etc/cron.d /tmp/x`, or of `/` itself), the walk
/// goes on from the same dentry in the root's mount, so a file reached through the bind
/// mount gets the path it has in the tree (`/etc/cron.d/job`, not `/tmp/x/job`). Mounts
/// of other filesystems are crossed to where they are mounted.
#[inline(always)]
fn other_mount_of_root_fs(s: &mut WalkState, vfsmnt: KPtr) -> bool {
    let root_mnt = s.root_mnt as KPtr;
    if vfsmnt == root_mnt {
        return false;
    }
    let (Ok(sb), Ok(root_sb)) = (
        read_ptr(vfsmnt, off!(vfsmount_mnt_sb)),
        read_ptr(root_mnt, off!(vfsmount_mnt_sb)),
    ) else {
        return false;
    };
    if sb != root_sb {
        return false;
    }
    s.vfsmnt = root_mnt as u64;
    s.mount = (root_mnt as u64).wrapping_sub(off!(mount_mnt) as u64);
    true
}

/// Appends `name` and its NUL at `s.end` in the scratch data area.
#[inline(always)]
fn write_name_forward(s: &mut WalkState, name: KPtr) -> bool {
    // SAFETY: read of this CPU's slot (volatile: see run_walk).
    let end = unsafe { core::ptr::read_volatile(&s.end) } as usize;
    if end >= DATA_OFFSET_LIMIT - MAX_COMPONENT {
        return false;
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // Record headers are well under 4 KiB (asserted in sensor-common); the masks tell the
    // verifier so.
    let at = (s.base as usize & (MAX_RECORD_HEADER - 1)) + (end & (DATA_OFFSET_LIMIT - 1));
    let dst = (scratch as *mut u8).wrapping_add(at);
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
    let len = get::<u32>(dentry, off!(dentry_d_name) + off!(qstr_len)) as usize;
    let len = len & NAME_MAX;
    // SAFETY: read of this CPU's slot (volatile: see run_walk).
    let pos = unsafe { core::ptr::read_volatile(&s.end) } as usize;
    if pos <= len + 1 {
        return false;
    }
    let pos = (pos - len) & (PATH_AREA - 1);
    // SAFETY: this CPU's buffer; pos < PATH_AREA and len <= NAME_MAX fit in its slack.
    unsafe {
        let area = (*buf).area.as_mut_ptr();
        copy_kernel(area.wrapping_add(pos), bounded(len, NAME_MAX), name);
        let pos = (pos - 1) & (PATH_AREA - 1);
        *area.wrapping_add(pos) = b'/';
        s.end = pos as u64;
    }
    true
}
