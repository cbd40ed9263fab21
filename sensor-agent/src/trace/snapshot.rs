//! The process table to and from a trace header, so that replay starts with the ancestry
//! and lineage the live agent had.

use std::sync::Arc;

use sensor_proto::v1::{Lineage, ProcessInfo as PbProcess, TableEntry};

use crate::{
    decode::BootClock,
    detect::{alert::process_info, users::UserNames},
    proctable::{Exited, LineageLabel, ProcessInfo, ProcessTable, Source, join_argv},
};

fn source_name(s: Source) -> &'static str {
    match s {
        Source::Proc => "proc",
        Source::Fork => "fork",
        Source::Exec => "exec",
        Source::Partial => "partial",
    }
}

fn source_of(s: &str) -> Source {
    match s {
        "proc" => Source::Proc,
        "fork" => Source::Fork,
        "exec" => Source::Exec,
        _ => Source::Partial,
    }
}

pub fn to_entries(table: &ProcessTable, users: &UserNames, clock: &BootClock) -> Vec<TableEntry> {
    table
        .snapshot()
        .iter()
        .map(|p| TableEntry {
            process: Some(process_info(p, users, clock)),
            parent_start_ns: p.parent_start_ns,
            exec_boot_ns: p.exec_boot_ns,
            gid: p.gid,
            egid: p.egid,
            cgroup_id: p.cgroup_id,
            lineage: p.lineage.as_ref().map(|l| Lineage {
                identity: l.identity.to_string(),
                source_pid: l.source_pid,
                source_exe: l.source_exe.to_string(),
                source_argv: l.source_argv.to_vec(),
                depth: 0,
            }),
            lineage_source_start_ns: p.lineage.as_ref().map_or(0, |l| l.source_start_ns),
            exited_boot_ns: p.exited.map_or(0, |e| e.boot_ns),
            exit_code: p.exited.map_or(0, |e| e.exit_code),
            exit_signal: p.exited.map_or(0, |e| e.signal),
            source: source_name(p.source).into(),
        })
        .collect()
}

/// A table holding the snapshot's processes.
pub fn from_entries(entries: &[TableEntry], table: &mut ProcessTable) {
    for e in entries {
        let Some(p) = &e.process else { continue };
        table.insert(entry(p, e));
    }
}

fn entry(p: &PbProcess, e: &TableEntry) -> ProcessInfo {
    ProcessInfo {
        pid: p.pid,
        ppid: p.ppid,
        parent_start_ns: e.parent_start_ns,
        start_boot_ns: p.start_boot_ns,
        exe: p.exe.as_str().into(),
        cmdline: join_argv(&p.argv),
        argv: p.argv.clone().into(),
        argv_truncated: p.argv_truncated,
        comm: p.comm.clone(),
        uid: p.uid,
        gid: e.gid,
        euid: p.euid,
        egid: e.egid,
        cwd: p.cwd.as_str().into(),
        cgroup_id: e.cgroup_id,
        exe_memfd: p.exe_memfd,
        exe_deleted: p.exe_deleted,
        exe_identity: p.exe_identity.clone().map(Arc::new),
        exec_boot_ns: e.exec_boot_ns,
        exited: p.exited.then_some(Exited {
            boot_ns: e.exited_boot_ns,
            exit_code: e.exit_code,
            signal: e.exit_signal,
        }),
        source: source_of(&e.source),
        lineage: e.lineage.as_ref().map(|l| {
            Arc::new(LineageLabel {
                identity: l.identity.as_str().into(),
                source_pid: l.source_pid,
                source_start_ns: e.lineage_source_start_ns,
                source_exe: l.source_exe.as_str().into(),
                source_argv: l.source_argv.clone().into(),
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use sensor_proto::v1::{Event, ExecEvent, event};

    use super::*;

    #[test]
    fn a_table_survives_the_round_trip() {
        let mut table = ProcessTable::default();
        for (pid, ppid, exe) in [
            (1, 0, "/sbin/init"),
            (10, 1, "/usr/bin/java"),
            (20, 10, "/bin/sh"),
        ] {
            table.apply(&Event {
                pid,
                boot_ns: u64::from(pid),
                kind: Some(event::Kind::Exec(Box::new(ExecEvent {
                    ppid,
                    exe: exe.into(),
                    argv: vec![exe.into(), "-x".into()],
                    start_boot_ns: u64::from(pid),
                    ..Default::default()
                }))),
                ..Default::default()
            });
        }
        table.set_lineage(
            10,
            Some(Arc::new(LineageLabel {
                identity: "tomcat".into(),
                source_pid: 10,
                source_start_ns: 10,
                source_exe: "/usr/bin/java".into(),
                source_argv: vec!["java".to_owned()].into(),
            })),
        );
        let entries = to_entries(&table, &UserNames::default(), &BootClock::default());
        let mut back = ProcessTable::default();
        from_entries(&entries, &mut back);
        assert_eq!(back.snapshot(), table.snapshot());
        assert_eq!(back.ancestry(20).len(), 2);
    }
}
