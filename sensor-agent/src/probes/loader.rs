//! Loads the embedded probe object, fills in the kernel layout and attaches every concern
//! in the best mode the kernel offers (`catalog.rs`), saying for each what it got and why.
//!
//! The object is compiled by `build.rs` and embedded in the binary: nothing is read from
//! disk at run time except the kernel's own BTF.

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{
        Array, MapData, PerCpuArray, ProgramArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{BtfTracePoint, FExit, Program, ProgramError, ProgramFd, RawTracePoint},
};
use sensor_common::{KernelLayout, WATCH_KEY_BYTES, kind};
use tracing::{debug, info, warn};

use super::{
    catalog::{self, Flavours, Probe, SYSCALL_CONCERNS, SyscallConcern, SyscallHooks},
    layout, preflight, syscalls,
    watch::{self, WatchError, WatchRule},
};

static PROBE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sensor"));

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
    #[error("the process lifecycle probes are required and did not attach: {0}")]
    Required(String),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("probe object map {name}: {reason}")]
    Map { name: &'static str, reason: String },
}

/// Options of the loader.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Size of the kernel-to-agent ring buffer, bytes (a power of two, page multiple).
    pub ring_bytes: u32,
    /// Optional probes not to attach (to measure what each attach point costs).
    pub skip: Vec<Probe>,
    /// How syscalls are hooked.
    pub syscall_hooks: SyscallHooks,
    /// Watched path prefixes for the file probes.
    pub watch: Vec<WatchRule>,
    /// Watched path suffixes (at most `MAX_WATCH_SUFFIXES`, 16 bytes each).
    pub watch_suffixes: Vec<(String, u32)>,
    /// `--enforce`: with anything but `off`, the BPF-LSM hook is attached where the kernel
    /// has BPF-LSM active (else `on` kills at exec).
    pub enforce: super::enforce::Mode,
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
            ring_bytes: crate::config::AgentSection::default().ring_mib * crate::config::MIB as u32,
            skip: Vec::new(),
            syscall_hooks: SyscallHooks::Auto,
            watch: Vec::new(),
            watch_suffixes: Vec::new(),
            enforce: super::enforce::Mode::Off,
        }
    }
}

/// Where a concern's programs attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// BTF tracepoints (`tp_btf`).
    TpBtf,
    /// `fexit` on the kernel functions themselves.
    Fexit,
    /// The raw `sys_exit` tracepoint's dispatcher.
    SysExit,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::TpBtf => "tp_btf",
            Mode::Fexit => "fexit",
            Mode::SysExit => "sys_exit",
        }
    }
}

/// How a concern's programs walk paths (`path.rs` in the probes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    BpfLoop,
    /// Without `bpf_loop`: paths up to `sensor_common::BOUNDED_DEPTH` components.
    Bounded,
}

impl Walk {
    pub fn name(self) -> &'static str {
        match self {
            Walk::BpfLoop => "bpf_loop",
            Walk::Bounded => "bounded",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Attached,
    /// Left out on purpose (`--skip-probe`).
    Skipped,
    /// Could not attach: why, in one line.
    Unavailable(String),
}

/// What became of one concern.
#[derive(Clone, Debug)]
pub struct ProbeStatus {
    /// `process` for the lifecycle, else the probe's name.
    pub name: &'static str,
    pub mode: Option<Mode>,
    pub walk: Option<Walk>,
    pub state: State,
}

impl ProbeStatus {
    fn new(name: &'static str, state: State) -> Self {
        Self {
            name,
            mode: None,
            walk: None,
            state,
        }
    }

    fn attached(name: &'static str, mode: Mode, walk: Option<Walk>) -> Self {
        Self {
            name,
            mode: Some(mode),
            walk,
            state: State::Attached,
        }
    }
}

/// The loaded, attached probes and the maps the agent reads.
pub struct Probes {
    /// Keeps programs and links alive; dropping it detaches everything.
    pub ebpf: Ebpf,
    pub ring: RingBuf<MapData>,
    pub lost: LossCounters,
    /// Every concern: how it is attached, or why not.
    pub status: Vec<ProbeStatus>,
    /// The enforcement maps (`--enforce`).
    pub enforcer: super::enforce::Enforcer,
}

impl Probes {
    pub fn load(options: &LoadOptions) -> Result<Self, LoadError> {
        preflight::check_privileges()?;
        preflight::check_btf()?;
        preflight::check_kernel()?;
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
        set_watch(&mut ebpf, &[], &options.watch)?;

        let mut loader = Loader {
            ebpf: &mut ebpf,
            btf: &btf,
            // SENSOR_PROBE_WALK=bounded loads the flavour of kernels without bpf_loop
            // here too: to measure its verifier cost on a development machine.
            bpf_loop: preflight::has_bpf_loop()
                && std::env::var("SENSOR_PROBE_WALK").as_deref() != Ok("bounded"),
        };
        let mut status = vec![loader.process()?];
        status.extend(loader.syscalls(options)?);
        status.push(if options.skip.contains(&Probe::SignalGenerate) {
            ProbeStatus::new(catalog::SIGNAL, State::Skipped)
        } else {
            match loader.btf_tracepoint(catalog::SIGNAL) {
                Ok(()) => ProbeStatus::attached(catalog::SIGNAL, Mode::TpBtf, None),
                Err(reason) => ProbeStatus::new(catalog::SIGNAL, State::Unavailable(reason)),
            }
        });
        for s in &status {
            match &s.state {
                State::Attached => debug!(
                    probe = s.name,
                    mode = s.mode.map_or("-", Mode::name),
                    walk = s.walk.map_or("-", Walk::name),
                    "attached"
                ),
                State::Skipped => info!(probe = s.name, "not attached, as asked"),
                State::Unavailable(reason) => warn!(
                    probe = s.name,
                    %reason,
                    "probe unavailable; the agent is blind to what it reports"
                ),
            }
        }

        // The open cache is sound only while renames move its epoch: with path_files.
        let renames_seen = status
            .iter()
            .any(|s| s.name == Probe::PathFiles.name() && matches!(s.state, State::Attached));
        set_open_cache(&mut ebpf, Some(renames_seen))?;

        // Enforcement: the LSM hook only when asked for (it runs on every exec).
        let mechanism = if options.enforce == super::enforce::Mode::Off {
            super::enforce::Mechanism::Kill
        } else {
            match super::enforce::attach_lsm(&mut ebpf, &btf) {
                Ok(()) => super::enforce::Mechanism::Lsm,
                Err(reason) => {
                    info!(%reason, "enforcement kills at exec (no BPF-LSM hook)");
                    super::enforce::Mechanism::Kill
                }
            }
        };
        let enforcer = super::enforce::Enforcer::new(&mut ebpf, mechanism)?;
        let ring = take_map(&mut ebpf, "EVENTS")?;
        let lost = take_map(&mut ebpf, "LOST")?;
        Ok(Self {
            ebpf,
            ring,
            lost: LossCounters(lost),
            status,
            enforcer,
        })
    }

    /// Concerns that could not attach (not those skipped on purpose), with the reason.
    pub fn unavailable(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.status.iter().filter_map(|s| match &s.state {
            State::Unavailable(reason) => Some((s.name, reason.as_str())),
            _ => None,
        })
    }

    /// One line for the log and systemd: how every concern is attached.
    pub fn summary(&self) -> String {
        self.status
            .iter()
            .map(|s| match (&s.state, s.mode) {
                (State::Attached, Some(mode)) => match s.walk {
                    Some(walk) => format!("{}={}+{}", s.name, mode.name(), walk.name()),
                    None => format!("{}={}", s.name, mode.name()),
                },
                (State::Attached, None) => format!("{}=attached", s.name),
                (State::Skipped, _) => format!("{}=skipped", s.name),
                (State::Unavailable(_), _) => format!("{}=UNAVAILABLE", s.name),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Detaches and unloads every program, several at a time: each tracepoint detach
    /// waits for the kernel (tens of milliseconds here).
    pub fn detach(ebpf: &mut Ebpf) {
        let mut programs: Vec<&mut Program> = ebpf.programs_mut().map(|(_, p)| p).collect();
        std::thread::scope(|scope| {
            for chunk in programs.chunks_mut(4) {
                scope.spawn(move || {
                    for program in chunk {
                        let _ = match program {
                            Program::FExit(p) => p.unload(),
                            Program::BtfTracePoint(p) => p.unload(),
                            Program::RawTracePoint(p) => p.unload(),
                            Program::Lsm(p) => p.unload(),
                            _ => Ok(()),
                        };
                    }
                });
            }
        });
    }
}

/// Attaches the concerns one by one, each in the best mode that loads.
struct Loader<'a> {
    ebpf: &'a mut Ebpf,
    btf: &'a Btf,
    /// The kernel has `bpf_loop`: walking programs prefer that flavour.
    bpf_loop: bool,
}

impl Loader<'_> {
    /// Fork, exec and exit on BTF tracepoints; the agent does not start without them.
    fn process(&mut self) -> Result<ProbeStatus, LoadError> {
        let required =
            |what: &str, reason: String| LoadError::Required(format!("{what}: {reason}"));
        self.btf_tracepoint(catalog::FORK)
            .map_err(|r| required(catalog::FORK, r))?;
        let walk = self
            .flavoured(catalog::EXEC, |l, name| {
                l.btf_tracepoint_as(name, "sched_process_exec")
            })
            .map_err(|r| required("sched_process_exec", r))?;
        self.btf_tracepoint(catalog::EXIT)
            .map_err(|r| required(catalog::EXIT, r))?;
        Ok(ProbeStatus::attached("process", Mode::TpBtf, Some(walk)))
    }

    /// Every syscall concern by fexit where it can, else through the dispatcher.
    fn syscalls(&mut self, options: &LoadOptions) -> Result<Vec<ProbeStatus>, LoadError> {
        let fexit = match options.syscall_hooks {
            SyscallHooks::Auto => self.probe_fexit(),
            SyscallHooks::SysExit => Err("--syscall-hooks sys_exit".to_owned()),
        };
        if let Err(reason) = &fexit {
            info!(%reason, "syscalls are hooked through the sys_exit dispatcher (no fexit)");
        }
        let mut status = Vec::new();
        // Concerns waiting for the dispatcher: (index in `status`, concern, handler).
        let mut dispatched = Vec::new();
        for concern in SYSCALL_CONCERNS {
            let name = concern.probe.name();
            if options.skip.contains(&concern.probe) {
                status.push(ProbeStatus::new(name, State::Skipped));
                continue;
            }
            if fexit.is_ok() {
                match self.fexits(concern) {
                    Ok(walk) => {
                        status.push(ProbeStatus::attached(name, Mode::Fexit, walk));
                        continue;
                    }
                    Err(reason) => {
                        warn!(probe = name, %reason, "fexit refused; falling back to the sys_exit dispatcher");
                    }
                }
            }
            if options.skip.contains(&Probe::SysExit) {
                status.push(ProbeStatus::new(
                    name,
                    State::Unavailable(
                        "needs the sys_exit dispatcher, which was skipped by --skip-probe".into(),
                    ),
                ));
                continue;
            }
            match self.handler(concern.handler) {
                Ok((fd, walk)) => {
                    dispatched.push((status.len(), concern, fd));
                    let mut s = ProbeStatus::attached(name, Mode::SysExit, walk);
                    s.state = State::Unavailable("the sys_exit dispatcher is not attached".into());
                    status.push(s);
                }
                Err(reason) => status.push(ProbeStatus::new(name, State::Unavailable(reason))),
            }
        }
        if dispatched.is_empty() {
            return Ok(status);
        }
        self.fill_dispatch(&dispatched)?;
        let attached = self
            .program::<RawTracePoint>(catalog::SYS_EXIT)
            .and_then(|p| {
                p.load()?;
                p.attach("sys_exit").map(|_| ())
            });
        let state = match attached {
            Ok(()) => State::Attached,
            Err(err) => State::Unavailable(format!(
                "the sys_exit dispatcher did not attach: {}",
                short_reason(&err)
            )),
        };
        for (i, _, _) in &dispatched {
            status[*i].state = state.clone();
        }
        Ok(status)
    }

    /// Loads and attaches the do-nothing fexit program once: whether fexit works at all.
    fn probe_fexit(&mut self) -> Result<(), String> {
        let probe = catalog::FEXIT_PROBE;
        let result = self
            .fexit_program(probe.program.with_loop, probe.function)
            .map_err(|e| {
                format!(
                    "fexit is not available on this kernel: {}",
                    short_reason(&e)
                )
            });
        if let Ok(p) = self.program::<FExit>(probe.program.with_loop) {
            let _ = p.unload();
        }
        result
    }

    /// Attaches every fexit program of `concern`; on any failure, detaches those that did
    /// and says why.
    fn fexits(&mut self, concern: &SyscallConcern) -> Result<Option<Walk>, String> {
        let mut attached = Vec::new();
        let mut walk = None;
        let mut failure = None;
        for f in concern.fexit {
            if f.optional
                && self
                    .btf
                    .id_by_type_name_kind(f.function, aya_obj::btf::BtfKind::Func)
                    .is_err()
            {
                debug!(
                    function = f.function,
                    "not in this kernel; its syscall is not either"
                );
                continue;
            }
            match self.flavoured(f.program, |l, name| l.fexit_program(name, f.function)) {
                Ok(w) => {
                    attached.push(*f);
                    if f.program.bounded.is_some() {
                        walk = Some(w);
                    }
                }
                Err(reason) => {
                    failure = Some(format!("{}: {reason}", f.function));
                    break;
                }
            }
        }
        match failure {
            None => Ok(walk),
            Some(reason) => {
                for f in attached {
                    self.unload_fexit(f.program);
                }
                Err(reason)
            }
        }
    }

    /// Loads a dispatcher handler (not attached: the dispatcher tail-calls it).
    fn handler(&mut self, flavours: Flavours) -> Result<(ProgramFd, Option<Walk>), String> {
        let mut fd = None;
        let walk = self.flavoured(flavours, |l, name| {
            let p = l.program::<RawTracePoint>(name)?;
            p.load()?;
            let dup = p.fd()?.try_clone().map_err(|e| {
                ProgramError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: e,
                })
            })?;
            fd = Some(dup);
            Ok(())
        })?;
        let fd = fd.ok_or("the handler loaded without a descriptor")?;
        Ok((fd, flavours.bounded.is_some().then_some(walk)))
    }

    /// Puts the loaded handlers in the dispatcher's table and maps this architecture's
    /// syscall numbers to their slots.
    fn fill_dispatch(
        &mut self,
        dispatched: &[(usize, &SyscallConcern, ProgramFd)],
    ) -> Result<(), LoadError> {
        let map_err = |name: &'static str| {
            move |e: aya::maps::MapError| LoadError::Map {
                name,
                reason: e.to_string(),
            }
        };
        let mut table: ProgramArray<&mut MapData> =
            ProgramArray::try_from(self.ebpf.map_mut("HANDLERS").ok_or(LoadError::Map {
                name: "HANDLERS",
                reason: "missing from the probe object".into(),
            })?)
            .map_err(map_err("HANDLERS"))?;
        let mut served = Vec::new();
        for (_, concern, fd) in dispatched {
            for &slot in concern.slots {
                table.set(slot, fd, 0).map_err(map_err("HANDLERS"))?;
                served.push(slot);
            }
        }
        let mut slots: Array<&mut MapData, u32> =
            Array::try_from(self.ebpf.map_mut("SLOTS").ok_or(LoadError::Map {
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

    /// Tries the flavours of a program, `bpf_loop` first where the kernel has it; returns
    /// the flavour that loaded, or why none did.
    fn flavoured(
        &mut self,
        flavours: Flavours,
        mut load: impl FnMut(&mut Self, &'static str) -> Result<(), ProgramError>,
    ) -> Result<Walk, String> {
        let mut order = Vec::with_capacity(2);
        if self.bpf_loop || flavours.bounded.is_none() {
            order.push((flavours.with_loop, Walk::BpfLoop));
        }
        if let Some(bounded) = flavours.bounded {
            order.push((bounded, Walk::Bounded));
        }
        let mut reasons = Vec::new();
        for (name, walk) in order {
            let started = std::time::Instant::now();
            match load(self, name) {
                Ok(()) => {
                    debug!(
                        program = name,
                        verified_insns = self.verified_insns(name),
                        ms = started.elapsed().as_millis() as u64,
                        "loaded"
                    );
                    if !reasons.is_empty() {
                        warn!(program = name, rejected = %reasons.join("; "), "loaded a fallback flavour");
                    }
                    return Ok(walk);
                }
                Err(err) => {
                    debug!(program = name, error = %err, "program rejected");
                    reasons.push(format!("{name}: {}", short_reason(&err)));
                }
            }
        }
        Err(reasons.join("; "))
    }

    /// The instructions the verifier walked for `name` (Linux 5.16+), for the debug log.
    fn verified_insns(&mut self, name: &'static str) -> u32 {
        self.ebpf
            .program(name)
            .and_then(|p| p.info().ok())
            .and_then(|info| info.verified_instruction_count())
            .unwrap_or(0)
    }

    /// Detaches whichever flavour of an fexit program attached.
    fn unload_fexit(&mut self, flavours: Flavours) {
        for name in [Some(flavours.with_loop), flavours.bounded]
            .into_iter()
            .flatten()
        {
            if let Ok(p) = self.program::<FExit>(name) {
                let _ = p.unload();
            }
        }
    }

    fn program<T>(&mut self, name: &'static str) -> Result<&mut T, ProgramError>
    where
        for<'p> &'p mut T: TryFrom<&'p mut Program, Error = ProgramError>,
    {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| missing(name))?
            .try_into()
    }

    fn btf_tracepoint(&mut self, name: &'static str) -> Result<(), String> {
        self.btf_tracepoint_as(name, name)
            .map_err(|e| short_reason(&e))
    }

    fn btf_tracepoint_as(
        &mut self,
        program: &'static str,
        tracepoint: &str,
    ) -> Result<(), ProgramError> {
        let btf = self.btf;
        let p = self.program::<BtfTracePoint>(program)?;
        p.load(tracepoint, btf)?;
        p.attach().map(|_| ())
    }

    fn fexit_program(&mut self, program: &'static str, function: &str) -> Result<(), ProgramError> {
        let btf = self.btf;
        let p = self.program::<FExit>(program)?;
        p.load(function, btf)?;
        p.attach().map(|_| ())
    }
}

/// A program the agent expects is missing from the embedded object: a build mismatch.
fn missing(name: &'static str) -> ProgramError {
    ProgramError::SyscallError(aya::sys::SyscallError {
        call: "the embedded probe object has no such program",
        io_error: std::io::Error::new(std::io::ErrorKind::NotFound, name),
    })
}

/// The line of a load error that says what went wrong: for a verifier rejection, its last
/// message rather than the whole log (which goes to the debug log).
pub fn short_reason(err: &ProgramError) -> String {
    if let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = err
    {
        let log = verifier_log.to_string();
        let verdict = log
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| {
                !l.is_empty()
                    && !l.starts_with("processed ")
                    && !l.starts_with("verification time")
                    && !l.starts_with("stack depth")
                    && !l.starts_with("max_states_per_insn")
            })
            .unwrap_or("");
        return if verdict.is_empty() {
            format!("the kernel refused the program: {io_error}")
        } else {
            format!("verifier: {verdict}")
        };
    }
    err.to_string()
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

/// Controls the kernel's per-CPU cache of the last opened file's watched operations:
/// `enable` turns it on or off; every call moves its epoch, so what it held is forgotten
/// (call it after any change of the watch list).
pub fn set_open_cache(ebpf: &mut Ebpf, enable: Option<bool>) -> Result<(), LoadError> {
    let map_err = |reason: String| LoadError::Map {
        name: "OPEN_CACHE_CTL",
        reason,
    };
    let map = ebpf
        .map_mut("OPEN_CACHE_CTL")
        .ok_or_else(|| map_err("missing from the probe object".into()))?;
    let mut ctl: aya::maps::Array<&mut MapData, u64> =
        aya::maps::Array::try_from(map).map_err(|e| map_err(e.to_string()))?;
    if let Some(enable) = enable {
        ctl.set(0, u64::from(enable), 0)
            .map_err(|e| map_err(e.to_string()))?;
    }
    let epoch = ctl.get(&1, 0).map_err(|e| map_err(e.to_string()))?;
    ctl.set(1, epoch.wrapping_add(1), 0)
        .map_err(|e| map_err(e.to_string()))?;
    Ok(())
}

/// Moves the probes' watched prefixes (their LPM trie) from `old` to `new`: new entries
/// are written before stale ones are removed, so no path stays watched by both lists or
/// by neither for a moment. At load, `old` is empty.
pub fn set_watch(ebpf: &mut Ebpf, old: &[WatchRule], new: &[WatchRule]) -> Result<(), LoadError> {
    let map_err = |reason: String| LoadError::Map {
        name: "WATCH",
        reason,
    };
    let map = ebpf
        .map_mut("WATCH")
        .ok_or_else(|| map_err("missing from the probe object".into()))?;
    let mut trie: LpmTrie<&mut MapData, [u8; WATCH_KEY_BYTES], u32> =
        LpmTrie::try_from(map).map_err(|e| map_err(e.to_string()))?;
    let new_entries = watch::effective(new);
    for (prefix, ops) in &new_entries {
        let (bits, data) = watch::lpm_key(prefix);
        trie.insert(&Key::new(bits, data), *ops, 0)
            .map_err(|e| map_err(format!("watch {prefix}: {e}")))?;
    }
    for (prefix, _) in watch::effective(old) {
        if !new_entries.iter().any(|(p, _)| *p == prefix) {
            let (bits, data) = watch::lpm_key(&prefix);
            trie.remove(&Key::new(bits, data))
                .map_err(|e| map_err(format!("unwatch {prefix}: {e}")))?;
        }
    }
    Ok(())
}

pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
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
