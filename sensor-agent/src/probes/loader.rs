//! Loads the embedded probe object, fills in the kernel layout and attaches every program.
//!
//! The object is compiled by `build.rs` and embedded in the binary: nothing is read from
//! disk at run time except the kernel's own BTF.

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, ProgramError, TracePoint},
};
use sensor_common::{KernelLayout, kind};
use tracing::{debug, info, warn};

use super::{layout, preflight};

static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sensor"));

/// Where a program attaches.
#[derive(Clone, Copy, Debug)]
pub enum Attach {
    /// A BTF-typed raw tracepoint (`tp_btf/<name>`).
    Btf(&'static str),
    /// A classic tracepoint `category/name`.
    Tracepoint(&'static str, &'static str),
}

/// One program of the probe object.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSpec {
    pub program: &'static str,
    pub attach: Attach,
    /// Without a required probe the agent refuses to start; without an optional one it
    /// logs what it cannot see and goes on.
    pub required: bool,
}

/// Every program of the probe object, in attach order.
pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: "sched_process_fork",
        attach: Attach::Btf("sched_process_fork"),
        required: true,
    },
    ProbeSpec {
        program: "sched_process_exec",
        attach: Attach::Btf("sched_process_exec"),
        required: true,
    },
    ProbeSpec {
        program: "sched_process_exit",
        attach: Attach::Btf("sched_process_exit"),
        required: true,
    },
    ProbeSpec {
        program: "sys_enter_execve",
        attach: Attach::Tracepoint("syscalls", "sys_enter_execve"),
        required: false,
    },
    ProbeSpec {
        program: "sys_exit_execve",
        attach: Attach::Tracepoint("syscalls", "sys_exit_execve"),
        required: false,
    },
    ProbeSpec {
        program: "sys_enter_execveat",
        attach: Attach::Tracepoint("syscalls", "sys_enter_execveat"),
        required: false,
    },
    ProbeSpec {
        program: "sys_exit_execveat",
        attach: Attach::Tracepoint("syscalls", "sys_exit_execveat"),
        required: false,
    },
];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Preflight(#[from] preflight::PreflightError),
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    #[error("cannot parse kernel BTF for the BTF tracepoints: {0}")]
    Btf(#[from] aya::BtfError),
    #[error("loading the probe object failed: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("probe {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("probe {0} is required and cannot be skipped")]
    Required(&'static str),
    #[error("probe object has no program {0}; the agent and its embedded probes disagree")]
    MissingProgram(&'static str),
    #[error("probe object map {name}: {reason}")]
    Map { name: &'static str, reason: String },
}

/// Options of the loader.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Size of the kernel-to-agent ring buffer, bytes (a power of two, page multiple).
    pub ring_bytes: u32,
    /// Optional probes not to attach (to measure what each attach point costs).
    pub skip: Vec<String>,
}

impl LoadOptions {
    /// Pending bytes above which the kernel wakes the agent instead of waiting for its
    /// next timed drain: a quarter of the ring.
    pub fn wakeup_bytes(&self) -> u64 {
        u64::from(self.ring_bytes / 4)
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            ring_bytes: 16 * 1024 * 1024,
            skip: Vec::new(),
        }
    }
}

/// The loaded, attached probes and the maps the agent reads.
pub struct Probes {
    /// Keeps programs and links alive; dropping it detaches everything.
    pub ebpf: Ebpf,
    pub ring: RingBuf<MapData>,
    pub lost: LossCounters,
    pub attached: Vec<&'static str>,
    /// Optional probes that could not attach, with the reason.
    pub unavailable: Vec<(&'static str, String)>,
}

impl Probes {
    pub fn load(options: &LoadOptions) -> Result<Self, LoadError> {
        preflight::check_privileges()?;
        preflight::check_btf()?;
        if preflight::ensure_tracefs()? {
            info!(path = preflight::TRACEFS, "mounted tracefs");
        }
        raise_memlock();

        let kernel_layout: KernelLayout =
            layout::resolve(std::path::Path::new(preflight::VMLINUX_BTF))?;
        let agent_tgid = std::process::id();
        let btf = Btf::from_sys_fs()?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("LAYOUT", &kernel_layout, true)
            .override_global("AGENT_TGID", &agent_tgid, true)
            .override_global("WAKEUP_BYTES", &options.wakeup_bytes(), true)
            .map_max_entries("EVENTS", options.ring_bytes)
            .load(PROBE_OBJECT)?;

        let mut attached = Vec::new();
        let mut unavailable = Vec::new();
        for spec in PROBES {
            if options.skip.iter().any(|s| s == spec.program) {
                if spec.required {
                    return Err(LoadError::Required(spec.program));
                }
                info!(probe = spec.program, "not attached, as asked");
                unavailable.push((spec.program, "skipped by --skip-probe".to_owned()));
                continue;
            }
            match attach(&mut ebpf, spec, &btf) {
                Ok(()) => {
                    debug!(probe = spec.program, "attached");
                    attached.push(spec.program);
                }
                Err(err) if !spec.required => {
                    warn!(probe = spec.program, error = %err, "optional probe unavailable; the agent is blind to what it reports");
                    unavailable.push((spec.program, err.to_string()));
                }
                Err(err) => return Err(err),
            }
        }

        let ring = take_map(&mut ebpf, "EVENTS")?;
        let lost = take_map(&mut ebpf, "LOST")?;
        Ok(Self {
            ebpf,
            ring,
            lost: LossCounters(lost),
            attached,
            unavailable,
        })
    }
}

/// The kernel's per-CPU counters of records that did not fit in the ring buffer.
pub struct LossCounters(PerCpuArray<MapData, u64>);

impl LossCounters {
    /// Records lost so far, per record kind, summed over CPUs.
    pub fn counts(&self) -> Vec<(u16, u64)> {
        (1..kind::COUNT)
            .map(|k| {
                let total = self
                    .0
                    .get(&u32::from(k), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (k, total)
            })
            .collect()
    }
}

fn attach(ebpf: &mut Ebpf, spec: &ProbeSpec, btf: &Btf) -> Result<(), LoadError> {
    let program = ebpf
        .program_mut(spec.program)
        .ok_or(LoadError::MissingProgram(spec.program))?;
    let wrap = |source| LoadError::Program {
        program: spec.program,
        source,
    };
    match spec.attach {
        Attach::Btf(name) => {
            let p: &mut BtfTracePoint = program.try_into().map_err(wrap)?;
            p.load(name, btf).map_err(wrap)?;
            p.attach().map_err(wrap)?;
        }
        Attach::Tracepoint(category, name) => {
            preflight::check_tracepoint(category, name)?;
            let p: &mut TracePoint = program.try_into().map_err(wrap)?;
            p.load().map_err(wrap)?;
            p.attach(category, name).map_err(wrap)?;
        }
    }
    Ok(())
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::Map {
        name,
        reason: "missing from the probe object".into(),
    })?;
    T::try_from(map).map_err(|e| LoadError::Map {
        name,
        reason: e.to_string(),
    })
}

/// Older kernels charge BPF memory to RLIMIT_MEMLOCK; newer ones to the cgroup, where
/// raising the limit may be refused (EPERM) and does not matter.
fn raise_memlock() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        debug!(
            error = %std::io::Error::last_os_error(),
            "cannot raise RLIMIT_MEMLOCK; fine on kernels that charge BPF memory to the cgroup"
        );
    }
}
