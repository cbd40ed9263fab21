//! Resolves the kernel structure offsets the probes need from the running kernel's BTF.
//!
//! This is what CO-RE relocations would do for a C program: one probe object, any kernel
//! with BTF. A field that moved is found at its new place; a field that is gone is an error
//! naming the struct and the field.

use std::path::Path;

use btf_rs::{Btf, BtfType, Type};
use sensor_common::KernelLayout;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read kernel BTF from {path}: {source}")]
    Read { path: String, source: btf_rs::Error },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {strukt} has no field {field}")]
    NoField { strukt: String, field: String },
    #[error("kernel BTF: field {strukt}.{field} is a bitfield, which the probes cannot read")]
    Bitfield { strukt: String, field: String },
    #[error("syscall argument registers are not known for {0}; the agent supports x86_64")]
    Arch(&'static str),
    #[error("kernel BTF: offset of {strukt}.{field} ({offset}) does not fit in 16 bits")]
    TooFar {
        strukt: String,
        field: String,
        offset: u32,
    },
}

/// Reads `path` (normally `/sys/kernel/btf/vmlinux`) and resolves every offset.
pub fn resolve(path: &Path) -> Result<KernelLayout, LayoutError> {
    let btf = Btf::from_file(path).map_err(|source| LayoutError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let r = Resolver { btf: &btf };
    // Optional: without them an open reported at `security_file_open` carries the file
    // the kernel opened but not the name it was given.
    let given = (|| {
        Ok::<_, LayoutError>((
            r.offset("task_struct", "nameidata")?,
            r.offset("nameidata", "name")?,
            r.offset("nameidata", "dfd")?,
            r.offset("filename", "name")?,
        ))
    })()
    .unwrap_or_default();
    Ok(KernelLayout {
        ready: 1,
        task_pid: r.offset("task_struct", "pid")?,
        task_tgid: r.offset("task_struct", "tgid")?,
        task_real_parent: r.offset("task_struct", "real_parent")?,
        task_group_leader: r.offset("task_struct", "group_leader")?,
        task_comm: r.offset("task_struct", "comm")?,
        task_mm: r.offset("task_struct", "mm")?,
        task_fs: r.offset("task_struct", "fs")?,
        task_files: r.offset("task_struct", "files")?,
        task_real_cred: r.offset("task_struct", "real_cred")?,
        task_start_boottime: r.offset("task_struct", "start_boottime")?,
        task_exit_code: r.offset("task_struct", "exit_code")?,
        task_signal: r.offset("task_struct", "signal")?,
        signal_live: r.offset("signal_struct", "live")?,
        bprm_filename: r.offset("linux_binprm", "filename")?,
        bprm_fdpath: r.offset("linux_binprm", "fdpath").unwrap_or(0),
        bprm_file: r.offset("linux_binprm", "file")?,
        bprm_buf: r.offset("linux_binprm", "buf")?,
        mm_arg_start: r.offset("mm_struct", "arg_start")?,
        mm_arg_end: r.offset("mm_struct", "arg_end")?,
        mm_exe_file: r.offset("mm_struct", "exe_file")?,
        file_f_path: r.offset("file", "f_path")?,
        file_f_inode: r.offset("file", "f_inode")?,
        file_f_flags: r.offset("file", "f_flags")?,
        file_f_mode: r.offset("file", "f_mode")?,
        file_private_data: r.offset("file", "private_data")?,
        path_mnt: r.offset("path", "mnt")?,
        path_dentry: r.offset("path", "dentry")?,
        dentry_d_parent: r.offset("dentry", "d_parent")?,
        dentry_d_name: r.offset("dentry", "d_name")?,
        dentry_d_inode: r.offset("dentry", "d_inode")?,
        qstr_len: r.offset("qstr", "len")?,
        qstr_name: r.offset("qstr", "name")?,
        inode_i_mode: r.offset("inode", "i_mode")?,
        inode_i_nlink: r.offset("inode", "__i_nlink")?,
        inode_i_sb: r.offset("inode", "i_sb")?,
        inode_i_ino: r.offset("inode", "i_ino")?,
        inode_i_rdev: r.offset("inode", "i_rdev")?,
        inode_i_size: r.offset("inode", "i_size")?,
        inode_mtime_sec: r.offset_any("inode", &["i_mtime_sec", "__i_mtime", "i_mtime"])?,
        inode_ctime_sec: r.offset_any("inode", &["i_ctime_sec", "__i_ctime", "i_ctime"])?,
        sb_s_magic: r.offset("super_block", "s_magic")?,
        sb_s_dev: r.offset("super_block", "s_dev")?,
        mount_mnt: r.offset("mount", "mnt")?,
        mount_mnt_parent: r.offset("mount", "mnt_parent")?,
        mount_mnt_mountpoint: r.offset("mount", "mnt_mountpoint")?,
        vfsmount_mnt_root: r.offset("vfsmount", "mnt_root")?,
        vfsmount_mnt_sb: r.offset("vfsmount", "mnt_sb")?,
        fs_root: r.offset("fs_struct", "root")?,
        fs_pwd: r.offset("fs_struct", "pwd")?,
        files_fdt: r.offset("files_struct", "fdt")?,
        fdtable_max_fds: r.offset("fdtable", "max_fds")?,
        fdtable_fd: r.offset("fdtable", "fd")?,
        cred_uid: r.offset("cred", "uid")?,
        cred_gid: r.offset("cred", "gid")?,
        cred_euid: r.offset("cred", "euid")?,
        cred_egid: r.offset("cred", "egid")?,
        socket_type: r.offset("socket", "type")?,
        socket_sk: r.offset("socket", "sk")?,
        sk_family: r.offset("sock", "__sk_common.skc_family")?,
        sk_daddr: r.offset("sock", "__sk_common.skc_daddr")?,
        sk_rcv_saddr: r.offset("sock", "__sk_common.skc_rcv_saddr")?,
        sk_dport: r.offset("sock", "__sk_common.skc_dport")?,
        sk_num: r.offset("sock", "__sk_common.skc_num")?,
        sk_v6_daddr: r.offset("sock", "__sk_common.skc_v6_daddr")?,
        sk_v6_rcv_saddr: r.offset("sock", "__sk_common.skc_v6_rcv_saddr")?,
        task_nameidata: given.0,
        nameidata_name: given.1,
        nameidata_dfd: given.2,
        filename_name: given.3,
        regs_args: syscall_arg_offsets(&r)?,
        regs_nr: r.offset("pt_regs", SYSCALL_NR_REG)?,
        _pad: 0,
    })
}

/// `struct pt_regs` fields holding the six syscall arguments at syscall exit, and the
/// syscall number.
#[cfg(target_arch = "x86_64")]
const SYSCALL_ARG_REGS: [&str; 6] = ["di", "si", "dx", "r10", "r8", "r9"];
#[cfg(target_arch = "x86_64")]
const SYSCALL_NR_REG: &str = "orig_ax";

#[cfg(target_arch = "x86_64")]
fn syscall_arg_offsets(r: &Resolver<'_>) -> Result<[u16; 6], LayoutError> {
    let mut offsets = [0u16; 6];
    for (slot, reg) in offsets.iter_mut().zip(SYSCALL_ARG_REGS) {
        *slot = r.offset("pt_regs", reg)?;
    }
    Ok(offsets)
}

#[cfg(not(target_arch = "x86_64"))]
const SYSCALL_NR_REG: &str = "unsupported";

#[cfg(not(target_arch = "x86_64"))]
fn syscall_arg_offsets(_: &Resolver<'_>) -> Result<[u16; 6], LayoutError> {
    Err(LayoutError::Arch(std::env::consts::ARCH))
}

struct Resolver<'a> {
    btf: &'a Btf,
}

impl Resolver<'_> {
    /// Byte offset of `field` (dotted for nested named members) in `struct strukt`.
    fn offset(&self, strukt: &str, field: &str) -> Result<u16, LayoutError> {
        let no_field = || LayoutError::NoField {
            strukt: strukt.to_owned(),
            field: field.to_owned(),
        };
        let mut current = self.named_struct(strukt)?;
        let mut total_bits = 0u32;
        let mut parts = field.split('.').peekable();
        while let Some(part) = parts.next() {
            let (bits, member) = self.find_member(&current, part).ok_or_else(no_field)?;
            if member.bitfield_size().is_some_and(|size| size != 0) {
                return Err(LayoutError::Bitfield {
                    strukt: strukt.to_owned(),
                    field: field.to_owned(),
                });
            }
            total_bits += bits;
            if parts.peek().is_some() {
                current = self.struct_of(&member).ok_or_else(no_field)?;
            }
        }
        let offset = total_bits / 8;
        u16::try_from(offset).map_err(|_| LayoutError::TooFar {
            strukt: strukt.to_owned(),
            field: field.to_owned(),
            offset,
        })
    }

    /// The offset of the first of `fields` the struct has: a field renamed across kernel
    /// releases. For a `timespec64` the seconds come first, so its offset is theirs.
    fn offset_any(&self, strukt: &str, fields: &[&str]) -> Result<u16, LayoutError> {
        let mut last = None;
        for field in fields {
            match self.offset(strukt, field) {
                Ok(offset) => return Ok(offset),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| LayoutError::NoStruct(strukt.to_owned())))
    }

    fn named_struct(&self, name: &str) -> Result<btf_rs::Struct, LayoutError> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| LayoutError::NoStruct(name.to_owned()))?;
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| LayoutError::NoStruct(name.to_owned()))
    }

    /// Finds `name` among the members of `s`, descending into anonymous structs and unions.
    /// Returns the bit offset from the start of `s`.
    fn find_member(&self, s: &btf_rs::Struct, name: &str) -> Option<(u32, btf_rs::Member)> {
        for member in &s.members {
            let member_name = self.btf.resolve_name(member).unwrap_or_default();
            if member_name == name {
                return Some((member.bit_offset(), member.clone()));
            }
            if member_name.is_empty()
                && let Some(inner) = self.struct_of(member)
                && let Some((bits, found)) = self.find_member(&inner, name)
            {
                return Some((member.bit_offset() + bits, found));
            }
        }
        None
    }

    /// The struct or union a member's type resolves to, through typedefs and qualifiers.
    fn struct_of(&self, member: &btf_rs::Member) -> Option<btf_rs::Struct> {
        let mut t = self.btf.resolve_chained_type(member).ok()?;
        for _ in 0..16 {
            match t {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::TypeTag(_) => {
                    let next: &dyn BtfType = t.as_btf_type()?;
                    t = self.btf.resolve_chained_type(next).ok()?;
                }
                _ => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every machine we build on has BTF; the offsets must come out plausible.
    #[test]
    fn resolves_running_kernel() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let layout = resolve(path).expect("kernel BTF resolves");
        assert_eq!(layout.ready, 1);
        assert!(layout.task_tgid > layout.task_pid - 8 && layout.task_tgid != 0);
        assert_eq!(layout.path_mnt, 0);
        assert_eq!(layout.path_dentry, 8);
        // skc_daddr is the first member of sock_common.
        assert_eq!(layout.sk_daddr, 0);
        assert_eq!(layout.sk_rcv_saddr, 4);
        assert_eq!(layout.qstr_len, 4);
        // x86_64 pt_regs: di is the 15th word, orig_ax the 16th.
        assert_eq!(layout.regs_args[0], 14 * 8);
        assert_eq!(layout.regs_nr, 15 * 8);
        // The given name of an open: `filename.name` is its first member.
        assert!(layout.task_nameidata != 0 && layout.nameidata_name != 0);
        assert_eq!(layout.filename_name, 0);
    }

    #[test]
    fn unknown_field_is_named() {
        let btf = Btf::from_file("/sys/kernel/btf/vmlinux").unwrap();
        let r = Resolver { btf: &btf };
        let err = r.offset("task_struct", "no_such_field").unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel BTF: struct task_struct has no field no_such_field"
        );
        let err = r.offset("no_such_struct", "x").unwrap_err();
        assert_eq!(err.to_string(), "kernel BTF has no struct no_such_struct");
    }
}
