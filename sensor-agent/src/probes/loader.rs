//! Loads the embedded probe object, fills in the kernel layout and attaches every program.
//!
//! The object is compiled by `build.rs` and embedded in the binary: nothing is read from
//! disk at run time except the kernel's own BTF.

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{
        MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{BtfTracePoint, Program, ProgramError, TracePoint},
};
use sensor_common::{KernelLayout, WATCH_KEY_BYTES, kind};
use tracing::{debug, info, warn};

use super::{
    layout, preflight,
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

/// An optional syscall tracepoint whose program has the tracepoint's name.
const fn syscall(name: &'static str) -> ProbeSpec {
    ProbeSpec {
        program: name,
        attach: Attach::Tracepoint("syscalls", name),
        required: false,
    }
}

/// A required BTF tracepoint whose program has the tracepoint's name.
const fn btf(name: &'static str, required: bool) -> ProbeSpec {
    ProbeSpec {
        program: name,
        attach: Attach::Btf(name),
        required,
    }
}

/// Every program of the probe object, in attach order. The process lifecycle is required:
/// without it there is no process tree. The rest degrade: a kernel without a syscall
/// tracepoint (modules compiled out, say) loses what that probe reports, and says so.
pub const PROBES: &[ProbeSpec] = &[
    btf("sched_process_fork", true),
    btf("sched_process_exec", true),
    btf("sched_process_exit", true),
    syscall("sys_enter_execve"),
    syscall("sys_exit_execve"),
    syscall("sys_enter_execveat"),
    syscall("sys_exit_execveat"),
    // Network.
    syscall("sys_enter_connect"),
    syscall("sys_exit_connect"),
    syscall("sys_exit_accept"),
    syscall("sys_exit_accept4"),
    syscall("sys_enter_bind"),
    syscall("sys_exit_bind"),
    syscall("sys_enter_listen"),
    syscall("sys_exit_listen"),
    syscall("sys_enter_socket"),
    syscall("sys_exit_socket"),
    // Descriptor redirection.
    syscall("sys_enter_dup"),
    syscall("sys_exit_dup"),
    syscall("sys_enter_dup2"),
    syscall("sys_exit_dup2"),
    syscall("sys_enter_dup3"),
    syscall("sys_exit_dup3"),
    syscall("sys_enter_fcntl"),
    syscall("sys_exit_fcntl"),
    // Injection.
    syscall("sys_enter_memfd_create"),
    syscall("sys_enter_ptrace"),
    syscall("sys_exit_ptrace"),
    syscall("sys_enter_process_vm_writev"),
    syscall("sys_exit_process_vm_writev"),
    // Files in watched places.
    syscall("sys_enter_openat"),
    syscall("sys_exit_openat"),
    syscall("sys_enter_open"),
    syscall("sys_exit_open"),
    syscall("sys_enter_creat"),
    syscall("sys_exit_creat"),
    syscall("sys_enter_openat2"),
    syscall("sys_exit_openat2"),
    syscall("sys_enter_renameat2"),
    syscall("sys_exit_renameat2"),
    syscall("sys_enter_renameat"),
    syscall("sys_exit_renameat"),
    syscall("sys_enter_rename"),
    syscall("sys_exit_rename"),
    syscall("sys_enter_unlinkat"),
    syscall("sys_exit_unlinkat"),
    syscall("sys_enter_unlink"),
    syscall("sys_exit_unlink"),
    syscall("sys_enter_fchmodat"),
    syscall("sys_exit_fchmodat"),
    syscall("sys_enter_fchmodat2"),
    syscall("sys_exit_fchmodat2"),
    syscall("sys_enter_chmod"),
    syscall("sys_exit_chmod"),
    syscall("sys_enter_fchmod"),
    syscall("sys_exit_fchmod"),
    syscall("sys_enter_utimensat"),
    syscall("sys_exit_utimensat"),
    syscall("sys_enter_utimes"),
    syscall("sys_exit_utimes"),
    syscall("sys_enter_futimesat"),
    syscall("sys_exit_futimesat"),
    syscall("sys_enter_utime"),
    syscall("sys_exit_utime"),
    syscall("sys_enter_truncate"),
    syscall("sys_exit_truncate"),
    syscall("sys_enter_ftruncate"),
    syscall("sys_exit_ftruncate"),
    syscall("sys_enter_linkat"),
    syscall("sys_exit_linkat"),
    syscall("sys_enter_link"),
    syscall("sys_exit_link"),
    syscall("sys_enter_symlinkat"),
    syscall("sys_exit_symlinkat"),
    // Tampering.
    syscall("sys_enter_init_module"),
    syscall("sys_enter_finit_module"),
    syscall("sys_enter_bpf"),
    syscall("sys_exit_bpf"),
    btf("signal_generate", false),
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
    /// Detaches every program, several at a time: each tracepoint detach waits for the
    /// kernel (about 70 ms here), and one after the other 77 of them took 5.3 s; in
    /// parallel 2.7 s (the kernel serialises part of it).
    pub fn detach(ebpf: &mut Ebpf) {
        let mut programs: Vec<&mut Program> = ebpf.programs_mut().map(|(_, p)| p).collect();
        std::thread::scope(|scope| {
            for chunk in programs.chunks_mut(4) {
                scope.spawn(move || {
                    for program in chunk {
                        let _ = match program {
                            Program::TracePoint(p) => p.unload(),
                            Program::BtfTracePoint(p) => p.unload(),
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
