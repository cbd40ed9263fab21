//! Checks what the probes need before loading them, and says exactly what is missing.

use std::{fs, path::Path};

/// Where the kernel exposes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Where tracefs is mounted (and mounted by us when it is not).
pub const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "the agent must run as root with CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN); it runs as uid {uid} with effective capabilities {caps:#x}, which lack them. Start it with sudo, or through the systemd unit (its CapabilityBoundingSet has what is needed)"
    )]
    NotPrivileged { uid: u32, caps: u64 },
    #[error(
        "this kernel exposes no BTF at {VMLINUX_BTF}; the probes need a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
    #[error("tracefs is not mounted at {TRACEFS} and mounting it failed: {0}")]
    Tracefs(String),
    #[error("tracepoint {0} is absent from this kernel ({TRACEFS}/events/{0} does not exist)")]
    NoTracepoint(String),
    #[error(
        "this kernel ({release}) lacks {feature}, which the probes need; the agent runs on Linux 5.10 and later, or on a distribution kernel that carries these features (docs/kernels.md)"
    )]
    KernelTooOld {
        release: String,
        feature: &'static str,
    },
}

/// What the probes need from the kernel beyond BTF, each with the release that brought it.
/// Checked by asking the kernel, not by its version: distribution kernels backport. (BTF
/// tracepoints, 5.5, are older than the ring buffer; the process probes' own attach says
/// so should a kernel lack them.)
pub fn check_kernel() -> Result<(), PreflightError> {
    use aya::{
        maps::MapType,
        programs::ProgramType,
        sys::{is_helper_supported, is_map_supported},
    };
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown release".to_owned());
    check_features(&release, |feature| match feature {
        Feature::RingBuffer => is_map_supported(MapType::RingBuf).unwrap_or(false),
        Feature::Helper(helper, _) => {
            is_helper_supported(ProgramType::RawTracePoint, helper).unwrap_or(false)
        }
    })
}

/// A kernel feature the probes cannot do without.
#[derive(Clone, Copy, Debug)]
pub enum Feature {
    RingBuffer,
    Helper(aya::sys::BpfHelper, &'static str),
}

impl Feature {
    const REQUIRED: [Feature; 4] = [
        Feature::RingBuffer,
        Feature::Helper(
            aya::sys::BpfHelper::BPF_FUNC_probe_read_kernel,
            "the bpf_probe_read_kernel helper (Linux 5.5)",
        ),
        Feature::Helper(
            aya::sys::BpfHelper::BPF_FUNC_ktime_get_boot_ns,
            "the bpf_ktime_get_boot_ns helper (Linux 5.8)",
        ),
        Feature::Helper(
            aya::sys::BpfHelper::BPF_FUNC_ringbuf_output,
            "the bpf_ringbuf_output helper (Linux 5.8)",
        ),
    ];

    fn describe(self) -> &'static str {
        match self {
            Feature::RingBuffer => "the BPF ring buffer (Linux 5.8)",
            Feature::Helper(_, what) => what,
        }
    }
}

/// The first required feature `has` says the kernel lacks, as the refusal operators read.
fn check_features(release: &str, has: impl Fn(Feature) -> bool) -> Result<(), PreflightError> {
    match Feature::REQUIRED.into_iter().find(|f| !has(*f)) {
        Some(missing) => Err(PreflightError::KernelTooOld {
            release: release.to_owned(),
            feature: missing.describe(),
        }),
        None => Ok(()),
    }
}

/// The kernel has `bpf_loop` (5.17, and some distribution backports): the programs that
/// walk paths can then use the flavour that walks up to `MAX_DEPTH` components.
pub fn has_bpf_loop() -> bool {
    use aya::{
        programs::ProgramType,
        sys::{BpfHelper, is_helper_supported},
    };
    is_helper_supported(ProgramType::RawTracePoint, BpfHelper::BPF_FUNC_loop).unwrap_or(false)
}

/// Effective capabilities of this process (/proc/self/status); none when unreadable.
fn effective_caps() -> u64 {
    procfs::process::Process::myself()
        .and_then(|p| p.status())
        .map_or(0, |s| s.capeff)
}

pub fn check_privileges() -> Result<(), PreflightError> {
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_PERFMON: u64 = 1 << 38;
    const CAP_BPF: u64 = 1 << 39;
    let caps = effective_caps();
    let uid = nix::unistd::geteuid().as_raw();
    // Being uid 0 is not enough: a bounding set or a container may have taken the
    // capabilities away, and the map creation would then fail with a bare EPERM.
    if caps & CAP_SYS_ADMIN != 0 || (caps & CAP_BPF != 0 && caps & CAP_PERFMON != 0) {
        Ok(())
    } else {
        Err(PreflightError::NotPrivileged { uid, caps })
    }
}

pub fn check_btf() -> Result<(), PreflightError> {
    if Path::new(VMLINUX_BTF).is_file() {
        Ok(())
    } else {
        Err(PreflightError::NoBtf)
    }
}

/// Mounts tracefs at its usual place when it is missing. Returns true when we mounted it.
pub fn ensure_tracefs() -> Result<bool, PreflightError> {
    let events = Path::new(TRACEFS).join("events");
    if events.is_dir() {
        return Ok(false);
    }
    if !Path::new(TRACEFS).is_dir() {
        fs::create_dir_all(TRACEFS).map_err(|e| PreflightError::Tracefs(e.to_string()))?;
    }
    nix::mount::mount(
        Some("tracefs"),
        TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| PreflightError::Tracefs(e.to_string()))?;
    if events.is_dir() {
        Ok(true)
    } else {
        Err(PreflightError::Tracefs(format!(
            "mounted, but {} is still missing",
            events.display()
        )))
    }
}

/// A classic tracepoint `category/name` exists on this kernel.
pub fn check_tracepoint(category: &str, name: &str) -> Result<(), PreflightError> {
    let id = Path::new(TRACEFS)
        .join("events")
        .join(category)
        .join(name)
        .join("id");
    if id.is_file() {
        Ok(())
    } else {
        Err(PreflightError::NoTracepoint(format!("{category}/{name}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_kernel_is_refused_with_the_missing_feature_named() {
        assert!(check_features("6.1.0-57-amd64", |_| true).is_ok());
        let err = check_features("4.18.0-80.el8.x86_64", |f| {
            !matches!(f, Feature::RingBuffer)
        })
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "this kernel (4.18.0-80.el8.x86_64) lacks the BPF ring buffer (Linux 5.8), which the probes need; the agent runs on Linux 5.10 and later, or on a distribution kernel that carries these features (docs/kernels.md)"
        );
        let err = check_features("5.4.0", |f| {
            !matches!(
                f,
                Feature::Helper(aya::sys::BpfHelper::BPF_FUNC_ktime_get_boot_ns, _)
            )
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("bpf_ktime_get_boot_ns helper (Linux 5.8)"),
            "{err}"
        );
    }

    /// On the machines we build on, every required feature is there.
    #[test]
    fn this_kernel_has_what_the_probes_need() {
        if nix::unistd::geteuid().is_root() {
            check_kernel().unwrap();
        }
    }
}
