//! Maps shared by all probes, and the one way a record leaves the kernel.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use sensor_common::{SCRATCH_SIZE, kind};

/// Records to userspace. The agent sets the size at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Records that did not fit in `EVENTS`, per CPU, indexed by record kind.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(kind::COUNT as u32, 0);

/// Per-CPU space to assemble variable-length records (too big for the 512-byte stack).
#[map]
pub static SCRATCH: PerCpuArray<[u8; SCRATCH_SIZE]> = PerCpuArray::with_max_entries(1, 0);

/// State of the path walk in progress on each CPU (see `kernel::walk_path`).
#[map]
pub static WALK: PerCpuArray<crate::kernel::WalkState> = PerCpuArray::with_max_entries(1, 0);

/// Arguments of an `execve`/`execveat` in flight, keyed by pid_tgid, kept until the syscall
/// returns so that a failure can be reported with its filename.
#[map]
pub static EXEC_ARGS: LruHashMap<u64, ExecArgs> = LruHashMap::with_max_entries(16384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecArgs {
    pub filename: u64,
    pub dirfd: i64,
    pub flags: u32,
    pub _pad: u32,
}

/// Counts a record of `kind` that could not be delivered.
#[inline(always)]
pub fn count_lost(kind: u16) {
    if let Some(counter) = LOST.get_ptr_mut(kind as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *counter += 1 };
    }
}

/// Copies `len` bytes of the scratch buffer into the ring buffer, or counts the loss.
#[inline(always)]
pub fn submit_scratch(scratch: *mut [u8; SCRATCH_SIZE], len: usize, kind: u16) {
    let len = if len > SCRATCH_SIZE { SCRATCH_SIZE } else { len };
    // SAFETY: `len` is bounded by the scratch size just above.
    let data = unsafe { core::slice::from_raw_parts(scratch as *const u8, len) };
    if EVENTS.output::<[u8]>(data, 0).is_err() {
        count_lost(kind);
    }
}
