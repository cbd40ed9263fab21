//! What the agent watches and how each concern can be attached: the one table the loader,
//! the command line (`--skip-probe`), the configuration file and the metrics read.
//!
//! A concern is attached in the best mode the kernel offers: the process lifecycle and
//! signals on BTF tracepoints; syscalls by `fexit` on their own functions where the kernel
//! has fentry, else through the `sys_exit` dispatcher; opens by `fexit` on
//! `security_file_open` (the file the kernel actually opened) where it can, and connect,
//! bind and ptrace attach take the kernel's copy of their address and the task it resolved
//! from `security_socket_connect`/`_bind` and `security_ptrace_access_check`. Programs that
//! walk paths come in two flavours (`bpf_loop`, or a bounded loop for kernels without it).

use sensor_common::slot;

/// The optional probes an operator may leave out (`--skip-probe`, `skip_probes`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Probe {
    /// The syscall exit dispatcher, for every concern that falls back to it.
    SysExit,
    ExecFailed,
    Net,
    Dup,
    Inject,
    OpenFiles,
    PathFiles,
    Tamper,
    SignalGenerate,
}

impl Probe {
    pub const ALL: [Probe; 9] = [
        Probe::SysExit,
        Probe::ExecFailed,
        Probe::Net,
        Probe::Dup,
        Probe::Inject,
        Probe::OpenFiles,
        Probe::PathFiles,
        Probe::Tamper,
        Probe::SignalGenerate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Probe::SysExit => "sys_exit",
            Probe::ExecFailed => "exec_failed",
            Probe::Net => "net",
            Probe::Dup => "dup",
            Probe::Inject => "inject",
            Probe::OpenFiles => "open_files",
            Probe::PathFiles => "path_files",
            Probe::Tamper => "tamper",
            Probe::SignalGenerate => "signal_generate",
        }
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How syscalls are hooked (`--syscall-hooks`, `syscall_hooks`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum SyscallHooks {
    /// `fexit` where the kernel offers it, the `sys_exit` dispatcher elsewhere.
    #[default]
    Auto,
    /// The `sys_exit` dispatcher for every syscall concern (to compare, or to work around
    /// a kernel whose fentry misbehaves).
    SysExit,
}

/// A program in two flavours: with `bpf_loop` and with the bounded loop. Programs that do
/// not walk paths have one.
#[derive(Clone, Copy, Debug)]
pub struct Flavours {
    pub with_loop: &'static str,
    pub bounded: Option<&'static str>,
}

const fn one(name: &'static str) -> Flavours {
    Flavours {
        with_loop: name,
        bounded: None,
    }
}

const fn two(with_loop: &'static str, bounded: &'static str) -> Flavours {
    Flavours {
        with_loop,
        bounded: Some(bounded),
    }
}

/// An `fexit` program and the kernel function it attaches to.
#[derive(Clone, Copy, Debug)]
pub struct Fexit {
    pub program: Flavours,
    pub function: &'static str,
    /// The function may be missing from an older kernel (its syscall is, too).
    pub optional: bool,
}

const fn fx(program: &'static str, function: &'static str) -> Fexit {
    Fexit {
        program: one(program),
        function,
        optional: false,
    }
}

const fn fx2(program: &'static str, bounded: &'static str, function: &'static str) -> Fexit {
    Fexit {
        program: two(program, bounded),
        function,
        optional: false,
    }
}

/// An `fexit` program on a security hook that gives a concern the kernel's own view of
/// what the syscall asked for (the address a connect used, the task an attach reached);
/// without it (no such hook in this kernel) the concern reads what the caller passed.
const fn fx_lsm(program: &'static str, function: &'static str) -> Fexit {
    Fexit {
        program: one(program),
        function,
        optional: true,
    }
}

/// A syscall concern: its `fexit` programs, and its handler for the `sys_exit` dispatcher
/// with the slots that handler serves.
#[derive(Debug)]
pub struct SyscallConcern {
    pub probe: Probe,
    pub fexit: &'static [Fexit],
    pub handler: Flavours,
    pub slots: &'static [u32],
}

pub const SYSCALL_CONCERNS: &[SyscallConcern] = &[
    SyscallConcern {
        probe: Probe::ExecFailed,
        fexit: &[
            fx("fx_execve", "__x64_sys_execve"),
            fx("fx_execveat", "__x64_sys_execveat"),
        ],
        handler: one("exec_failed"),
        slots: &[slot::EXECVE, slot::EXECVEAT],
    },
    SyscallConcern {
        probe: Probe::Net,
        fexit: &[
            fx("fx_connect", "__x64_sys_connect"),
            fx("fx_accept", "__x64_sys_accept"),
            fx("fx_accept4", "__x64_sys_accept4"),
            fx("fx_bind", "__x64_sys_bind"),
            fx("fx_listen", "__x64_sys_listen"),
            fx("fx_socket", "__x64_sys_socket"),
            fx_lsm("fx_sock_connect", "security_socket_connect"),
            fx_lsm("fx_sock_bind", "security_socket_bind"),
        ],
        handler: one("net"),
        slots: &[
            slot::CONNECT,
            slot::ACCEPT,
            slot::ACCEPT4,
            slot::BIND,
            slot::LISTEN,
            slot::SOCKET,
        ],
    },
    SyscallConcern {
        probe: Probe::Dup,
        fexit: &[
            fx("fx_dup", "__x64_sys_dup"),
            fx("fx_dup2", "__x64_sys_dup2"),
            fx("fx_dup3", "__x64_sys_dup3"),
            fx("fx_fcntl", "__x64_sys_fcntl"),
        ],
        handler: one("dup"),
        slots: &[slot::DUP, slot::DUP2, slot::DUP3, slot::FCNTL],
    },
    SyscallConcern {
        probe: Probe::Inject,
        fexit: &[
            fx("fx_memfd_create", "__x64_sys_memfd_create"),
            fx("fx_ptrace", "__x64_sys_ptrace"),
            fx("fx_process_vm_writev", "__x64_sys_process_vm_writev"),
            fx_lsm("fx_ptrace_check", "security_ptrace_access_check"),
        ],
        handler: one("inject"),
        slots: &[slot::MEMFD_CREATE, slot::PTRACE, slot::PROCESS_VM_WRITEV],
    },
    SyscallConcern {
        probe: Probe::OpenFiles,
        fexit: &[fx2("fx_file_open", "fxb_file_open", "security_file_open")],
        handler: two("open_files", "open_files_bounded"),
        slots: &[slot::OPENAT, slot::OPEN, slot::CREAT, slot::OPENAT2],
    },
    SyscallConcern {
        probe: Probe::PathFiles,
        fexit: &[
            fx2("fx_renameat2", "fxb_renameat2", "__x64_sys_renameat2"),
            fx2("fx_renameat", "fxb_renameat", "__x64_sys_renameat"),
            fx2("fx_rename", "fxb_rename", "__x64_sys_rename"),
            fx2("fx_unlinkat", "fxb_unlinkat", "__x64_sys_unlinkat"),
            fx2("fx_unlink", "fxb_unlink", "__x64_sys_unlink"),
            fx2("fx_fchmodat", "fxb_fchmodat", "__x64_sys_fchmodat"),
            // fchmodat2 arrived in 6.6.
            Fexit {
                program: two("fx_fchmodat2", "fxb_fchmodat2"),
                function: "__x64_sys_fchmodat2",
                optional: true,
            },
            fx2("fx_chmod", "fxb_chmod", "__x64_sys_chmod"),
            fx2("fx_fchmod", "fxb_fchmod", "__x64_sys_fchmod"),
            fx2("fx_utimensat", "fxb_utimensat", "__x64_sys_utimensat"),
            fx2("fx_utimes", "fxb_utimes", "__x64_sys_utimes"),
            fx2("fx_futimesat", "fxb_futimesat", "__x64_sys_futimesat"),
            fx2("fx_utime", "fxb_utime", "__x64_sys_utime"),
            fx2("fx_truncate", "fxb_truncate", "__x64_sys_truncate"),
            fx2("fx_ftruncate", "fxb_ftruncate", "__x64_sys_ftruncate"),
            fx2("fx_linkat", "fxb_linkat", "__x64_sys_linkat"),
            fx2("fx_link", "fxb_link", "__x64_sys_link"),
            fx2("fx_symlinkat", "fxb_symlinkat", "__x64_sys_symlinkat"),
        ],
        handler: two("path_files", "path_files_bounded"),
        slots: &[
            slot::RENAMEAT2,
            slot::RENAMEAT,
            slot::RENAME,
            slot::UNLINKAT,
            slot::UNLINK,
            slot::FCHMODAT,
            slot::FCHMODAT2,
            slot::CHMOD,
            slot::FCHMOD,
            slot::UTIMENSAT,
            slot::UTIMES,
            slot::FUTIMESAT,
            slot::UTIME,
            slot::TRUNCATE,
            slot::FTRUNCATE,
            slot::LINKAT,
            slot::LINK,
            slot::SYMLINKAT,
        ],
    },
    SyscallConcern {
        probe: Probe::Tamper,
        fexit: &[
            fx("fx_init_module", "__x64_sys_init_module"),
            fx("fx_finit_module", "__x64_sys_finit_module"),
            fx("fx_bpf", "__x64_sys_bpf"),
        ],
        handler: one("tamper"),
        slots: &[slot::INIT_MODULE, slot::FINIT_MODULE, slot::BPF],
    },
];

/// The process lifecycle, required: without it there is no process tree.
pub const FORK: &str = "sched_process_fork";
pub const EXEC: Flavours = two("sched_process_exec", "sched_process_exec_bounded");
pub const EXIT: &str = "sched_process_exit";
/// Signals aimed at the agent (optional).
pub const SIGNAL: &str = "signal_generate";
/// The syscall exit dispatcher.
pub const SYS_EXIT: &str = "sys_exit";
/// A do-nothing `fexit` program the agent loads and attaches once to learn whether the
/// kernel lets it use fexit at all.
pub const FEXIT_PROBE: Fexit = fx("probe_fexit", "security_file_open");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_one_concern() {
        let mut served: Vec<u32> = SYSCALL_CONCERNS
            .iter()
            .flat_map(|c| c.slots.iter().copied())
            .collect();
        served.sort_unstable();
        let all: Vec<u32> = (1..slot::COUNT).collect();
        assert_eq!(served, all, "each slot served exactly once");
    }

    #[test]
    fn probe_names_round_trip() {
        use clap::ValueEnum;
        for probe in Probe::ALL {
            let parsed = Probe::from_str(probe.name(), false).unwrap();
            assert_eq!(parsed, probe);
        }
    }
}
