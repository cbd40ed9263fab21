//! Which syscalls the exit dispatcher hands to which handler program: this architecture's
//! syscall numbers mapped to the probes' slots, and the slots each handler serves.

use sensor_common::slot;

/// A handler program and the slots it serves.
pub struct Handler {
    pub program: &'static str,
    pub slots: &'static [u32],
}

pub const HANDLERS: &[Handler] = &[
    Handler {
        program: "exec_failed",
        slots: &[slot::EXECVE, slot::EXECVEAT],
    },
    Handler {
        program: "net",
        slots: &[
            slot::CONNECT,
            slot::ACCEPT,
            slot::ACCEPT4,
            slot::BIND,
            slot::LISTEN,
            slot::SOCKET,
        ],
    },
    Handler {
        program: "dup",
        slots: &[slot::DUP, slot::DUP2, slot::DUP3, slot::FCNTL],
    },
    Handler {
        program: "inject",
        slots: &[slot::MEMFD_CREATE, slot::PTRACE, slot::PROCESS_VM_WRITEV],
    },
    Handler {
        program: "open_files",
        slots: &[slot::OPENAT, slot::OPEN, slot::CREAT, slot::OPENAT2],
    },
    Handler {
        program: "path_files",
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
    Handler {
        program: "tamper",
        slots: &[slot::INIT_MODULE, slot::FINIT_MODULE, slot::BPF],
    },
];

/// `fchmodat2` (Linux 6.6), missing from older libc bindings.
#[cfg(target_arch = "x86_64")]
const SYS_FCHMODAT2: i64 = 452;

/// (syscall number, slot) for this architecture.
#[cfg(target_arch = "x86_64")]
pub fn numbers() -> Vec<(i64, u32)> {
    use libc::*;
    vec![
        (SYS_execve, slot::EXECVE),
        (SYS_execveat, slot::EXECVEAT),
        (SYS_connect, slot::CONNECT),
        (SYS_accept, slot::ACCEPT),
        (SYS_accept4, slot::ACCEPT4),
        (SYS_bind, slot::BIND),
        (SYS_listen, slot::LISTEN),
        (SYS_socket, slot::SOCKET),
        (SYS_dup, slot::DUP),
        (SYS_dup2, slot::DUP2),
        (SYS_dup3, slot::DUP3),
        (SYS_fcntl, slot::FCNTL),
        (SYS_memfd_create, slot::MEMFD_CREATE),
        (SYS_ptrace, slot::PTRACE),
        (SYS_process_vm_writev, slot::PROCESS_VM_WRITEV),
        (SYS_openat, slot::OPENAT),
        (SYS_open, slot::OPEN),
        (SYS_creat, slot::CREAT),
        (SYS_openat2, slot::OPENAT2),
        (SYS_renameat2, slot::RENAMEAT2),
        (SYS_renameat, slot::RENAMEAT),
        (SYS_rename, slot::RENAME),
        (SYS_unlinkat, slot::UNLINKAT),
        (SYS_unlink, slot::UNLINK),
        (SYS_fchmodat, slot::FCHMODAT),
        (SYS_FCHMODAT2, slot::FCHMODAT2),
        (SYS_chmod, slot::CHMOD),
        (SYS_fchmod, slot::FCHMOD),
        (SYS_utimensat, slot::UTIMENSAT),
        (SYS_utimes, slot::UTIMES),
        (SYS_futimesat, slot::FUTIMESAT),
        (SYS_utime, slot::UTIME),
        (SYS_truncate, slot::TRUNCATE),
        (SYS_ftruncate, slot::FTRUNCATE),
        (SYS_linkat, slot::LINKAT),
        (SYS_link, slot::LINK),
        (SYS_symlinkat, slot::SYMLINKAT),
        (SYS_init_module, slot::INIT_MODULE),
        (SYS_finit_module, slot::FINIT_MODULE),
        (SYS_bpf, slot::BPF),
    ]
}

#[cfg(not(target_arch = "x86_64"))]
pub fn numbers() -> Vec<(i64, u32)> {
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_has_one_handler_and_a_number() {
        let mut served: Vec<u32> = HANDLERS
            .iter()
            .flat_map(|h| h.slots.iter().copied())
            .collect();
        served.sort_unstable();
        let all: Vec<u32> = (1..slot::COUNT).collect();
        assert_eq!(served, all, "each slot served exactly once");
        let mut numbered: Vec<u32> = numbers().iter().map(|&(_, s)| s).collect();
        numbered.sort_unstable();
        assert_eq!(numbered, all, "each slot has a syscall number");
        assert!(
            numbers()
                .iter()
                .all(|&(nr, _)| (0..i64::from(sensor_common::MAX_SYSCALL_NR)).contains(&nr))
        );
    }
}
