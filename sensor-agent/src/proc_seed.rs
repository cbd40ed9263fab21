//! Seeds the process table from /proc when the agent starts, so that processes started
//! before it (the Tomcat JVM, httpd and its RewriteMap helpers) have exe, argv, user and
//! ancestry from the first event on.

use std::path::Path;

use tracing::debug;

use crate::proctable::{ProcessInfo, ProcessTable, Source};

/// Reads every process under `proc_root` (normally `/proc`) into `table`. Processes that
/// vanish while being read are skipped. Returns how many were added.
pub fn seed(table: &mut ProcessTable, proc_root: &Path) -> std::io::Result<usize> {
    let processes = procfs::process::all_processes_with_root(proc_root)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", proc_root.display())))?;
    let mut seeded = Vec::new();
    for process in processes.flatten() {
        let Ok(stat) = process.stat() else { continue };
        let status = process.status().ok();
        let (exe, exe_deleted) = match process.exe() {
            Ok(path) => {
                let path = path.to_string_lossy().into_owned();
                match path.strip_suffix(" (deleted)") {
                    Some(stripped) => (stripped.to_owned(), true),
                    None => (path, false),
                }
            }
            Err(_) => (String::new(), false),
        };
        let argv = process.cmdline().unwrap_or_default();
        let uid = status.as_ref().map_or(u32::MAX, |s| s.ruid);
        let gid = status.as_ref().map_or(u32::MAX, |s| s.rgid);
        seeded.push(ProcessInfo {
            pid: stat.pid as u32,
            ppid: stat.ppid.max(0) as u32,
            parent_start_ns: 0,
            start_boot_ns: boot_ns(&stat),
            exe_memfd: exe.starts_with("/memfd:"),
            exe: exe.into(),
            exe_deleted,
            cmdline: crate::proctable::join_argv(&argv),
            argv: argv.into(),
            argv_truncated: false,
            comm: stat.comm.clone(),
            uid,
            gid,
            euid: status.as_ref().map_or(uid, |s| s.euid),
            egid: status.as_ref().map_or(gid, |s| s.egid),
            cwd: process
                .cwd()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default()
                .into(),
            cgroup_id: 0,
            exe_identity: None,
            exec_boot_ns: 0,
            exited: None,
            source: Source::Proc,
            lineage: None,
        });
    }
    let starts: std::collections::HashMap<u32, u64> =
        seeded.iter().map(|p| (p.pid, p.start_boot_ns)).collect();
    let count = seeded.len();
    for mut info in seeded {
        info.parent_start_ns = starts.get(&info.ppid).copied().unwrap_or(0);
        table.insert(info);
    }
    debug!(count, "process table seeded from {}", proc_root.display());
    Ok(count)
}

/// A process's start in nanoseconds since boot, at clock-tick precision (`seed` and
/// `start_boot_ns` must agree exactly: enforcement compares the two).
fn boot_ns(stat: &procfs::process::Stat) -> u64 {
    let ticks = procfs::ticks_per_second().max(1);
    stat.starttime.saturating_mul(1_000_000_000) / ticks
}

/// The start time of process `pid` as `seed` reads it (clock-tick precision), if it runs.
pub fn start_boot_ns(pid: u32) -> Option<u64> {
    let stat = procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()?;
    Some(boot_ns(&stat))
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    /// A process started before the table exists is found with exe, argv, user and its
    /// ancestry through the shell that started it, up to pid 1.
    #[test]
    fn process_started_before_is_seeded_with_ancestry() {
        let mut child = Command::new("/bin/sh")
            .args(["-c", "sleep 30 & wait"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let shell = child.id();
        // Wait (bounded) for the shell to fork its sleep.
        let mut sleeper = None;
        for _ in 0..200 {
            let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
                .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                let pid: u32 = pid.parse().unwrap();
                if std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .unwrap_or_default()
                    .starts_with("sleep")
                {
                    sleeper = Some(pid);
                    break;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let sleeper = sleeper.expect("the shell started sleep");

        let mut table = ProcessTable::default();
        let n = seed(&mut table, Path::new("/proc")).unwrap();
        assert!(n > 3);
        let entry = table.get(sleeper).expect("sleep is in the table").clone();
        assert_eq!(&*entry.argv, ["sleep", "30"]);
        assert!(entry.exe.ends_with("/sleep"), "exe {}", entry.exe);
        assert_eq!(entry.uid, nix::unistd::getuid().as_raw());
        let ancestry = table.ancestry(sleeper);
        assert_eq!(ancestry[0].pid, shell);
        assert_eq!(&*ancestry[0].argv, ["/bin/sh", "-c", "sleep 30 & wait"]);
        assert_eq!(ancestry[1].pid, std::process::id(), "then the test itself");
        assert_eq!(ancestry.last().unwrap().pid, 1, "up to init");

        // SAFETY: kill has no memory preconditions; the pid is the sleeper this test spawned.
        unsafe { libc::kill(sleeper as i32, libc::SIGKILL) };
        let _ = child.wait();
    }
}
