//! Prevention from userspace: puts the rule set's enforcement policy, the web-tier labels
//! and the mode into the probes' maps (`sensor-ebpf/src/enforce.rs` decides at exec).
//!
//! The kernel knows files by inode and device only, so the policy's paths are resolved
//! here, when it is applied: an allowed executable replaced later (a package update) is
//! a new inode and needs a reload (SIGHUP) of the agent.

use std::{collections::HashSet, os::unix::fs::MetadataExt, path::Path};

use aya::{
    Btf, Ebpf,
    maps::{Array, HashMap, MapData},
    programs::Lsm,
};
use sensor_common::enforce::{self as e, Config, FileKey, Lineage};
use tracing::{info, warn};

use crate::{
    detect::enforce::Policy,
    proctable::{ProcessTable, Source},
};

/// `--enforce` / `enforce`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Mode {
    /// Nothing is judged.
    #[default]
    Off,
    /// Judged and reported (`ACTION_WOULD_KILL`); nothing is stopped.
    Audit,
    /// Stopped: refused (BPF-LSM) or killed at exec.
    On,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Audit => "audit",
            Mode::On => "on",
        }
    }

    fn kernel(self) -> u32 {
        match self {
            Mode::Off => e::MODE_OFF,
            Mode::Audit => e::MODE_AUDIT,
            Mode::On => e::MODE_ON,
        }
    }
}

/// How `on` stops a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// BPF-LSM `bprm_check_security`: the exec fails with EPERM.
    Lsm,
    /// SIGKILL from `sched_process_exec`, before the program's first instruction.
    Kill,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Lsm => "lsm",
            Mechanism::Kill => "kill",
        }
    }
}

/// Temporary directories: files written since boot under them may not run where a
/// policy says `tmp_written` (and each per-user runtime directory found at apply time).
const TMP_DIRS: [&str; 3] = ["/tmp", "/var/tmp", "/dev/shm"];

/// Where BPF-LSM is active (the kernel's LSM list names `bpf`).
pub fn bpf_lsm_active() -> bool {
    const LSM_LIST: &str = "/sys/kernel/security/lsm";
    if !Path::new(LSM_LIST).exists() {
        // securityfs is not mounted here (a minimal system): mount it to read the list.
        let _ = std::fs::create_dir_all("/sys/kernel/security");
        let _ = nix::mount::mount(
            Some("securityfs"),
            "/sys/kernel/security",
            Some("securityfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    std::fs::read_to_string(LSM_LIST).is_ok_and(|l| l.trim().split(',').any(|m| m == "bpf"))
}

/// Loads and attaches the LSM hook; why not, when it cannot.
pub fn attach_lsm(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), String> {
    if !bpf_lsm_active() {
        return Err("BPF-LSM is not active on this kernel (no `bpf` in the lsm= list)".into());
    }
    let program: &mut Lsm = ebpf
        .program_mut("enforce_bprm")
        .ok_or("enforce_bprm missing from the probe object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    program
        .load("bprm_check_security", btf)
        .map_err(|e| super::loader::short_reason(&e))?;
    program
        .attach()
        .map(|_| ())
        .map_err(|e| super::loader::short_reason(&e))
}

/// The enforcement maps and what is in them.
pub struct Enforcer {
    config: Array<MapData, Config>,
    policy: Array<MapData, u32>,
    lineage: HashMap<MapData, u32, Lineage>,
    allowed: HashMap<MapData, FileKey, u8>,
    shells: HashMap<MapData, FileKey, u8>,
    tmp_dirs: HashMap<MapData, FileKey, u8>,
    mode: Mode,
    mechanism: Mechanism,
    /// Label of every enforced identity, by name, as last applied.
    labels: Vec<(String, u32)>,
}

/// What applying a policy did, for the log and `rules check`.
#[derive(Debug, Default)]
pub struct Applied {
    pub allowed: usize,
    /// Allowed paths that name no file here (skipped).
    pub missing: Vec<String>,
    pub shells: usize,
    pub labelled: usize,
}

fn map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, super::loader::LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    super::loader::take_map(ebpf, name)
}

/// A file's identity in the kernel's encoding of devices (`major << 20 | minor`).
pub fn file_key(path: &Path, label: u32) -> Option<FileKey> {
    let meta = std::fs::metadata(path).ok()?;
    Some(FileKey {
        ino: meta.ino(),
        dev: kernel_dev(meta.dev()),
        label,
    })
}

fn kernel_dev(dev: u64) -> u32 {
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    ((major as u32) << 20) | (minor as u32 & 0xfffff)
}

impl Enforcer {
    /// Takes the maps out of the loaded object; `mechanism` is what `on` will use.
    pub fn new(ebpf: &mut Ebpf, mechanism: Mechanism) -> Result<Self, super::loader::LoadError> {
        Ok(Self {
            config: map(ebpf, "ENFORCE_CONFIG")?,
            policy: map(ebpf, "POLICY")?,
            lineage: map(ebpf, "LINEAGE")?,
            allowed: map(ebpf, "ALLOWED")?,
            shells: map(ebpf, "SHELLS")?,
            tmp_dirs: map(ebpf, "TMP_DIRS")?,
            mode: Mode::Off,
            mechanism,
            labels: Vec::new(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// Puts `policy` in force in `mode`: the policy maps first, then every process of
    /// `table` in an enforced lineage labelled, then the mode. `shells` are the installed
    /// shells and interpreters.
    pub fn apply(
        &mut self,
        mode: Mode,
        policy: &Policy,
        shells: &[std::path::PathBuf],
        table: &ProcessTable,
    ) -> Result<Applied, String> {
        let err = |what: &'static str| move |e: aya::maps::MapError| format!("{what}: {e}");
        let mut applied = Applied::default();
        if mode == Mode::Off {
            // The switch first: nothing is judged from here on.
            self.set_mode(Mode::Off)?;
        }
        // Policy flags, then allow lists (new entries before stale ones go).
        for label in 1..e::MAX_LABELS {
            let flags = policy.by_label(label).map_or(0, |entry| entry.flags());
            self.policy.set(label, flags, 0).map_err(err("POLICY"))?;
        }
        let mut wanted = HashSet::new();
        for entry in &policy.entries {
            for path in entry.allow.iter().flatten() {
                match file_key(Path::new(path), entry.label) {
                    Some(key) => {
                        wanted.insert(key);
                    }
                    None => applied.missing.push(format!("{}: {path}", entry.identity)),
                }
            }
        }
        applied.allowed = wanted.len();
        replace(&mut self.allowed, &wanted).map_err(err("ALLOWED"))?;
        let shell_keys: HashSet<FileKey> = shells.iter().filter_map(|p| file_key(p, 0)).collect();
        applied.shells = shell_keys.len();
        replace(&mut self.shells, &shell_keys).map_err(err("SHELLS"))?;
        let mut tmp: HashSet<FileKey> = TMP_DIRS
            .iter()
            .filter_map(|d| file_key(Path::new(d), 0))
            .collect();
        if let Ok(dir) = std::fs::read_dir("/run/user") {
            tmp.extend(dir.flatten().filter_map(|d| file_key(&d.path(), 0)));
        }
        replace(&mut self.tmp_dirs, &tmp).map_err(err("TMP_DIRS"))?;

        // Labels: a changed policy may number identities differently. Entries the kernel
        // made by inheritance are renumbered, not dropped (the agent may not know those
        // processes yet); entries of identities no longer enforced go.
        let labels: Vec<(String, u32)> = policy
            .entries
            .iter()
            .map(|e| (e.identity.to_string(), e.label))
            .collect();
        if labels != self.labels {
            let renumber = |old: u32| {
                let name = &self.labels.iter().find(|(_, l)| *l == old)?.0;
                labels.iter().find(|(n, _)| n == name).map(|(_, l)| *l)
            };
            let entries: Vec<(u32, Lineage)> = self.lineage.iter().flatten().collect();
            let mut changes = Vec::new();
            for (pid, entry) in entries {
                changes.push((pid, entry, renumber(entry.label)));
            }
            for (pid, mut entry, label) in changes {
                match label {
                    Some(l) => {
                        entry.label = l;
                        let _ = self.lineage.insert(pid, entry, 0);
                    }
                    None => {
                        let _ = self.lineage.remove(&pid);
                    }
                }
            }
            self.labels = labels;
        }
        self.set_mode(mode)?;
        if mode != Mode::Off {
            applied.labelled = self.label_table(table);
        }
        Ok(applied)
    }

    /// The agent stops: nothing is judged any more (the programs go next).
    pub fn stop(&mut self) -> Result<(), String> {
        self.set_mode(Mode::Off)
    }

    /// Labels every process of `table` in an enforced lineage.
    pub fn label_table(&mut self, table: &ProcessTable) -> usize {
        let mut n = 0;
        for p in table.snapshot() {
            let Some(lineage) = p.lineage.as_ref() else {
                continue;
            };
            let Some(label) = self.label_of(&lineage.identity) else {
                continue;
            };
            if p.exited.is_some() {
                continue;
            }
            // Processes found in /proc have a start time of clock-tick precision: their
            // entry says 0 (not checked by the kernel), and is taken back at once if the
            // pid now belongs to another process.
            let exact = matches!(p.source, Source::Exec | Source::Fork);
            let start = if exact { p.start_boot_ns } else { 0 };
            if self.label(p.pid, start, label) {
                if !exact && crate::proc_seed::start_boot_ns(p.pid) != Some(p.start_boot_ns) {
                    let _ = self.lineage.remove(&p.pid);
                    continue;
                }
                n += 1;
            }
        }
        n
    }

    fn label_of(&self, identity: &str) -> Option<u32> {
        self.labels
            .iter()
            .find(|(name, _)| name == identity)
            .map(|(_, l)| *l)
    }

    /// Labels process `pid` (started at `start_ns`, 0: unchecked) with `label`.
    pub fn label(&mut self, pid: u32, start_ns: u64, label: u32) -> bool {
        if self.mode == Mode::Off || pid <= 1 || pid == std::process::id() {
            return false;
        }
        let entry = Lineage {
            start_boot_ns: start_ns,
            label,
            _pad: 0,
        };
        match self.lineage.insert(pid, entry, 0) {
            Ok(()) => true,
            Err(err) => {
                warn!(pid, %err, "cannot label a web-tier process for enforcement");
                false
            }
        }
    }

    fn set_mode(&mut self, mode: Mode) -> Result<(), String> {
        let mechanism = match self.mechanism {
            Mechanism::Lsm => e::MECH_LSM,
            Mechanism::Kill => e::MECH_KILL,
        };
        let config = Config {
            mode: mode.kernel(),
            mechanism,
            boot_wall_sec: boot_wall_sec(),
        };
        self.config
            .set(0, config, 0)
            .map_err(|e| format!("ENFORCE_CONFIG: {e}"))?;
        if mode != self.mode {
            info!(
                mode = mode.name(),
                mechanism = self.mechanism.name(),
                "enforcement mode"
            );
        }
        self.mode = mode;
        Ok(())
    }
}

/// Makes `map` hold exactly `wanted`: adds first, then removes the rest.
fn replace(
    map: &mut HashMap<MapData, FileKey, u8>,
    wanted: &HashSet<FileKey>,
) -> Result<(), aya::maps::MapError> {
    for key in wanted {
        map.insert(*key, 1, 0)?;
    }
    let stale: Vec<FileKey> = map
        .keys()
        .flatten()
        .filter(|k| !wanted.contains(k))
        .collect();
    for key in stale {
        map.remove(&key)?;
    }
    Ok(())
}

/// The boot time in wall-clock seconds (now minus CLOCK_BOOTTIME), rounded down: a file
/// whose mtime or ctime is at or after it was written since boot.
fn boot_wall_sec() -> i64 {
    let clock = crate::decode::BootClock::now();
    (clock.boot_epoch_ns / 1_000_000_000) as i64 - 1
}
