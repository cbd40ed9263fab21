//! Maps shared by all probes, and the one way a record leaves the kernel.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
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

/// Bytes waiting in `EVENTS` above which a record wakes the agent up (set by the agent).
/// Below it records are written without a wake-up and the agent drains the ring on a short
/// timer: a wake-up per record costs the traced workload a context switch each time.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 0;

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Ring-buffer flags for the record about to be written.
#[inline(always)]
pub fn wakeup_flags() -> u64 {
    // SAFETY: read of a read-only global.
    let threshold = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(WAKEUP_BYTES)) };
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
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
    // Records are smaller than the scratch buffer by construction; the clamp and mask keep
    // the verifier sure of it.
    let len = if len >= SCRATCH_SIZE {
        SCRATCH_SIZE - 1
    } else {
        len
    };
    let len = crate::kernel::bounded(len, SCRATCH_SIZE - 1) as usize;
    // SAFETY: `len` is below the scratch size.
    let data = unsafe { core::slice::from_raw_parts(scratch as *const u8, len) };
    if EVENTS.output::<[u8]>(data, wakeup_flags()).is_err() {
        count_lost(kind);
    }
}
