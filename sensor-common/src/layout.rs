//! Byte offsets of the kernel structure fields the probes read.
//!
//! Rust eBPF has no CO-RE relocations, so the agent reads the running kernel's BTF at start,
//! fills this struct and writes it into the probes' read-only data before loading them. The
//! probes then read fields at these offsets; one object works on every kernel with BTF.

/// Offsets in bytes from the start of the named struct. `u16` is enough: the largest struct
/// read here (`task_struct`) is well below 64 KiB.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// Non-zero once filled in by the agent; the probes do nothing while it is zero.
    pub ready: u32,
    pub task_pid: u16,
    pub task_tgid: u16,
    pub task_real_parent: u16,
    pub task_group_leader: u16,
    pub task_comm: u16,
    pub task_mm: u16,
    pub task_fs: u16,
    pub task_files: u16,
    pub task_real_cred: u16,
    pub task_start_boottime: u16,
    pub task_exit_code: u16,
    pub task_signal: u16,
    /// `signal_struct.live`: threads of the process still running.
    pub signal_live: u16,
    pub bprm_filename: u16,
    /// `linux_binprm.fdpath`, set when execveat ran a descriptor; 0 when the kernel has no
    /// such field.
    pub bprm_fdpath: u16,
    /// `linux_binprm.file` and `.buf` (the first bytes of the file: `#!` for a script), read
    /// by the enforcement hook at `bprm_check_security`.
    pub bprm_file: u16,
    pub bprm_buf: u16,

    pub mm_arg_start: u16,
    pub mm_arg_end: u16,
    pub mm_exe_file: u16,

    pub file_f_path: u16,
    pub file_f_inode: u16,
    pub file_f_flags: u16,
    pub file_f_mode: u16,
    pub file_private_data: u16,

    pub path_mnt: u16,
    pub path_dentry: u16,

    pub dentry_d_parent: u16,
    pub dentry_d_name: u16,
    pub dentry_d_inode: u16,

    pub qstr_len: u16,
    pub qstr_name: u16,

    pub inode_i_mode: u16,
    pub inode_i_nlink: u16,
    pub inode_i_sb: u16,
    pub inode_i_ino: u16,
    pub inode_i_rdev: u16,
    pub inode_i_size: u16,
    /// Seconds of the modification and status-change times (`i_mtime.tv_sec` before 6.7,
    /// `__i_mtime` in 6.7-6.10, `i_mtime_sec` from 6.11; likewise ctime from 6.6).
    pub inode_mtime_sec: u16,
    pub inode_ctime_sec: u16,

    pub sb_s_magic: u16,
    pub sb_s_dev: u16,

    /// Offset of the `struct vfsmount` embedded in `struct mount`.
    pub mount_mnt: u16,
    pub mount_mnt_parent: u16,
    pub mount_mnt_mountpoint: u16,
    pub vfsmount_mnt_root: u16,
    pub vfsmount_mnt_sb: u16,

    pub fs_root: u16,
    pub fs_pwd: u16,

    pub files_fdt: u16,
    pub fdtable_max_fds: u16,
    pub fdtable_fd: u16,

    pub cred_uid: u16,
    pub cred_gid: u16,
    pub cred_euid: u16,
    pub cred_egid: u16,

    pub socket_type: u16,
    pub socket_sk: u16,

    pub sk_family: u16,
    pub sk_daddr: u16,
    pub sk_rcv_saddr: u16,
    pub sk_dport: u16,
    pub sk_num: u16,
    pub sk_v6_daddr: u16,
    pub sk_v6_rcv_saddr: u16,

    /// The name an open was given, as the kernel copied it from the caller
    /// (`current->nameidata->name->name`), and the directory descriptor it is relative to.
    /// All 0 where this kernel's BTF does not describe them: the name is then not reported.
    pub task_nameidata: u16,
    pub nameidata_name: u16,
    pub nameidata_dfd: u16,
    pub filename_name: u16,

    /// Offsets in `struct pt_regs` of the six syscall arguments as they stand at syscall
    /// exit (x86_64: di, si, dx, r10, r8, r9), and of the syscall number (orig_ax).
    pub regs_args: [u16; 6],
    pub regs_nr: u16,
    pub _pad: u16,
}
