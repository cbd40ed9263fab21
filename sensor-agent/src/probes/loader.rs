//! Loads the embedded probe object, fills in the kernel layout and attaches every program.
//!
//! The object is compiled by `build.rs` and embedded in the binary: nothing is read from
//! disk at run time except the kernel's own BTF.

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{
        Array, MapData, PerCpuArray, ProgramArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{BtfTracePoint, Program, ProgramError, RawTracePoint, TracePoint},
};
use sensor_common::{KernelLayout, WATCH_KEY_BYTES, kind};
use tracing::{debug, info, warn};

use super::{
    layout, preflight, syscalls,
    watch::{self, WatchError, WatchRule},
};

static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sensor"));

/// Where a program attaches.
#[derive(Clone, Copy, Debug)]
pub enum Attach {
    /// A BTF-typed raw tracepoint (`tp_btf/<name>`).
    Btf(&'static str),
    /// A classic tracepoint `category/name`.
    Tracepoint(&'static str, &'static str),
    /// A raw tracepoint (`raw_tp`), by tracepoint name.
    RawTracepoint(&'static str),
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

/// A BTF tracepoint whose program has the tracepoint's name.
const fn btf(name: &'static str, required: bool) -> ProbeSpec {
    ProbeSpec {
        program: name,
        attach: Attach::Btf(name),
        required,
    }
}

/// Every attached program. The process lifecycle is required: without it there is no
/// process tree. The rest degrade with a log line saying what the agent no longer sees.
/// The syscall handlers (`syscalls::HANDLERS`) are not attached: `sys_exit` tail-calls
/// them.
pub const PROBES: &[ProbeSpec] = &[
    btf("sched_process_fork", true),
    btf("sched_process_exec", true),
    btf("sched_process_exit", true),
    btf("signal_generate", false),
    ProbeSpec {
        program: "sys_exit",
        attach: Attach::RawTracepoint("sys_exit"),
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
    #[error(transparent)]
    Watch(#[from] WatchError),
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
    /// Watched path prefixes for the file probes.
    pub watch: Vec<WatchRule>,
    /// Watched path suffixes (at most four, 16 bytes each).
    pub watch_suffixes: Vec<(String, u32)>,
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
            watch: watch::default_rules(),
            watch_suffixes: watch::default_suffixes(),
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
        for rule in &options.watch {
            watch::validate(rule)?;
        }
        let suffixes = watch::suffix_slots(&options.watch_suffixes)?;
        let btf = Btf::from_sys_fs()?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("LAYOUT", &kernel_layout, true)
            .override_global("AGENT_TGID", &agent_tgid, true)
            .override_global("WAKEUP_BYTES", &options.wakeup_bytes(), true)
            .override_global("WATCH_SUFFIXES", &suffixes, true)
            .map_max_entries("EVENTS", options.ring_bytes)
            .load(PROBE_OBJECT)?;

        fill_watch(&mut ebpf, &options.watch)?;
        let mut attached = Vec::new();
        let mut unavailable = Vec::new();
        // Handlers first: once sys_exit is attached it dispatches to them.
        load_handlers(&mut ebpf, &options.skip, &mut unavailable)?;
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

impl Probes {
    /// Detaches and unloads every program, several at a time: each tracepoint detach
    /// waits for the kernel (tens of milliseconds here).
    pub fn detach(ebpf: &mut Ebpf) {
        let mut programs: Vec<&mut Program> = ebpf.programs_mut().map(|(_, p)| p).collect();
        std::thread::scope(|scope| {
            for chunk in programs.chunks_mut(4) {
                scope.spawn(move || {
                    for program in chunk {
                        let _ = match program {
                            Program::TracePoint(p) => p.unload(),
                            Program::BtfTracePoint(p) => p.unload(),
                            Program::RawTracePoint(p) => p.unload(),
                            _ => Ok(()),
                        };
                    }
                });
            }
        });
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

/// Loads the syscall handlers, puts them in the dispatcher's table, and maps this
/// architecture's syscall numbers to the slots of the handlers that loaded.
fn load_handlers(
    ebpf: &mut Ebpf,
    skip: &[String],
    unavailable: &mut Vec<(&'static str, String)>,
) -> Result<(), LoadError> {
    let mut served = Vec::new();
    let mut fds = Vec::new();
    for handler in syscalls::HANDLERS {
        if skip.iter().any(|s| s == handler.program) {
            info!(probe = handler.program, "not loaded, as asked");
            unavailable.push((handler.program, "skipped by --skip-probe".to_owned()));
            continue;
        }
        let program = ebpf
            .program_mut(handler.program)
            .ok_or(LoadError::MissingProgram(handler.program))?;
        let loaded = (|| -> Result<_, ProgramError> {
            let p: &mut RawTracePoint = program.try_into()?;
            p.load()?;
            p.fd()?.try_clone().map_err(|e| {
                ProgramError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: e,
                })
            })
        })();
        match loaded {
            Ok(fd) => {
                debug!(probe = handler.program, "loaded");
                fds.push((handler, fd));
                served.extend_from_slice(handler.slots);
            }
            Err(err) => {
                warn!(probe = handler.program, error = %err, "syscall handler unavailable; the agent is blind to what it reports");
                unavailable.push((handler.program, err.to_string()));
            }
        }
    }
    let map_err = |name: &'static str| {
        move |e: aya::maps::MapError| LoadError::Map {
            name,
            reason: e.to_string(),
        }
    };
    let mut table: ProgramArray<&mut MapData> =
        ProgramArray::try_from(ebpf.map_mut("HANDLERS").ok_or(LoadError::Map {
            name: "HANDLERS",
            reason: "missing from the probe object".into(),
        })?)
        .map_err(map_err("HANDLERS"))?;
    for (handler, fd) in &fds {
        for &slot in handler.slots {
            table.set(slot, fd, 0).map_err(map_err("HANDLERS"))?;
        }
    }
    let mut slots: Array<&mut MapData, u32> =
        Array::try_from(ebpf.map_mut("SLOTS").ok_or(LoadError::Map {
            name: "SLOTS",
            reason: "missing from the probe object".into(),
        })?)
        .map_err(map_err("SLOTS"))?;
    for (nr, slot) in syscalls::numbers() {
        if served.contains(&slot) {
            slots.set(nr as u32, slot, 0).map_err(map_err("SLOTS"))?;
        }
    }
    Ok(())
}

/// Writes the watched prefixes into the probes' LPM trie.
fn fill_watch(ebpf: &mut Ebpf, rules: &[WatchRule]) -> Result<(), LoadError> {
    let map_err = |reason: String| LoadError::Map {
        name: "WATCH",
        reason,
    };
    let map = ebpf
        .map_mut("WATCH")
        .ok_or_else(|| map_err("missing from the probe object".into()))?;
    let mut trie: LpmTrie<&mut MapData, [u8; WATCH_KEY_BYTES], u32> =
        LpmTrie::try_from(map).map_err(|e| map_err(e.to_string()))?;
    for (prefix, ops) in watch::effective(rules) {
        let (bits, data) = watch::lpm_key(&prefix);
        trie.insert(&Key::new(bits, data), ops, 0)
            .map_err(|e| map_err(format!("{prefix}: {e}")))?;
    }
    Ok(())
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
        Attach::RawTracepoint(name) => {
            let p: &mut RawTracePoint = program.try_into().map_err(wrap)?;
            p.load().map_err(wrap)?;
            p.attach(name).map_err(wrap)?;
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
