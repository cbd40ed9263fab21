//! This architecture's syscall numbers, mapped to the probes' slots (which handler serves
//! which slot is in `catalog.rs`).

use sensor_common::slot;

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
    fn every_slot_has_a_number() {
        let all: Vec<u32> = (1..slot::COUNT).collect();
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
