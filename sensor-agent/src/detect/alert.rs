//! Building alerts (the process, its ancestry to pid 1, the lineage label, the evidence)
//! and collapsing repeats of a rule on one process tree into one alert with a count.

use std::collections::HashMap;

use sensor_proto::v1::{self as pb, Event};

use crate::{
    decode::BootClock,
    detect::{
        rules::{Rule, Severity},
        users::UserNames,
    },
    proctable::{ProcessInfo, ProcessTable},
};

/// Who raises the alerts.
#[derive(Clone, Debug, Default)]
pub struct AgentIdentity {
    pub agent_id: String,
    pub host: String,
}

pub fn severity(s: Severity) -> pb::Severity {
    match s {
        Severity::Low => pb::Severity::Low,
        Severity::Medium => pb::Severity::Medium,
        Severity::High => pb::Severity::High,
        Severity::Critical => pb::Severity::Critical,
    }
}

pub fn process_info(p: &ProcessInfo, users: &UserNames, clock: &BootClock) -> pb::ProcessInfo {
    pb::ProcessInfo {
        pid: p.pid,
        ppid: p.ppid,
        exe: p.exe.to_string(),
        argv: p.argv.to_vec(),
        argv_truncated: p.argv_truncated,
        uid: p.uid,
        user: users.name(p.uid),
        euid: p.euid,
        cwd: p.cwd.to_string(),
        start_time: (p.start_boot_ns != 0).then(|| clock.wall(p.start_boot_ns)),
        start_boot_ns: p.start_boot_ns,
        comm: p.comm.clone(),
        exe_memfd: p.exe_memfd,
        exe_deleted: p.exe_deleted,
        exited: p.exited.is_some(),
        exe_identity: p.exe_identity.as_deref().cloned(),
    }
}

/// A process tree, process or field value that groups events (collapsing repeats,
/// sequence steps). Small and `Copy` on purpose: it is computed for many events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupKey {
    /// A web-tier identity's process (pid, start).
    Web(u32, u64),
    /// The top of a process tree under init (pid, start).
    Tree(u32, u64),
    Pid(u32),
    /// A hash of a field value.
    Value(u64),
}

impl std::fmt::Display for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupKey::Web(pid, start) => write!(f, "web:{pid}:{start}"),
            GroupKey::Tree(pid, start) => write!(f, "tree:{pid}:{start}"),
            GroupKey::Pid(pid) => write!(f, "pid:{pid}"),
            GroupKey::Value(h) => write!(f, "value:{h:016x}"),
        }
    }
}

/// The process tree a process belongs to, for collapsing repeats and grouping sequence
/// steps: its web-tier identity's process when it has one, else the top of its tree
/// under init (a service's main process, a login).
pub fn tree_key(table: &ProcessTable, pid: u32) -> GroupKey {
    let Some(p) = table.get(pid) else {
        return GroupKey::Pid(pid);
    };
    if let Some(l) = &p.lineage {
        return GroupKey::Web(l.source_pid, l.source_start_ns);
    }
    let mut top = p;
    let mut current = p;
    for _ in 0..crate::proctable::MAX_ANCESTRY {
        let Some(parent) = table.parent_of(current) else {
            break;
        };
        if parent.pid != 1 && parent.ppid != 0 {
            top = parent;
        }
        current = parent;
    }
    GroupKey::Tree(top.pid, top.start_boot_ns)
}

/// Everything an alert is built from.
pub struct AlertInput<'a> {
    pub rule: &'a Rule,
    /// The triggering events, oldest first; the last one's process is the alert's.
    pub evidence: Vec<Event>,
    pub table: &'a ProcessTable,
    pub users: &'a UserNames,
    pub clock: &'a BootClock,
    pub identity: &'a AgentIdentity,
}

/// The alert for `input`; its `id` is assigned when it is emitted.
pub fn build(input: AlertInput<'_>) -> pb::Alert {
    let AlertInput {
        rule,
        evidence,
        table,
        users,
        clock,
        identity,
    } = input;
    let last = evidence.last().cloned().unwrap_or_default();
    let pid = last.pid;
    let proc = table.get(pid);
    let lineage = proc.and_then(|p| p.lineage.as_ref()).map(|l| pb::Lineage {
        identity: l.identity.to_string(),
        source_pid: l.source_pid,
        source_exe: l.source_exe.to_string(),
        source_argv: l.source_argv.to_vec(),
        depth: table.depth_to(pid, l.source_pid).unwrap_or(0),
    });
    let process = proc.map(|p| process_info(p, users, clock)).or_else(|| {
        Some(pb::ProcessInfo {
            pid,
            comm: last.comm.clone(),
            uid: last.uid,
            user: users.name(last.uid),
            ..Default::default()
        })
    });
    let ancestry = table
        .ancestry(pid)
        .into_iter()
        .map(|p| process_info(p, users, clock))
        .collect();
    let time = last.time;
    let enforced = enforcement_of(&last);
    pb::Alert {
        id: String::new(),
        rule_id: rule.id.to_string(),
        title: rule.title.to_string(),
        severity: severity(rule.severity) as i32,
        techniques: rule
            .techniques
            .iter()
            .map(|t| t.as_str().to_owned())
            .collect(),
        rationale: rule.rationale.to_string(),
        time,
        host: identity.host.clone(),
        agent_id: identity.agent_id.clone(),
        process,
        ancestry,
        lineage,
        first_time: evidence.first().and_then(|e| e.time),
        evidence,
        count: 1,
        // What was done is part of what happened: a kill never collapses into an audit.
        dedup_key: match enforced {
            Some(e) => format!("{}@{}#action{}", rule.id, tree_key(table, pid), e.action),
            None => format!("{}@{}", rule.id, tree_key(table, pid)),
        },
        source: rule.source.to_string(),
        flight_record: String::new(),
        details: Default::default(),
        action: enforced.map_or(0, |e| e.action),
        enforcement: enforced.map(|e| e.rule.clone()).unwrap_or_default(),
    }
}

/// The short name of an enforcement action: killed, denied, would_kill.
pub fn action_name(action: i32) -> &'static str {
    match pb::Action::try_from(action) {
        Ok(pb::Action::Killed) => "killed",
        Ok(pb::Action::Denied) => "denied",
        Ok(pb::Action::WouldKill) => "would_kill",
        _ => "none",
    }
}

/// What enforcement decided for the exec `event` reports, if anything.
pub fn enforcement_of(event: &Event) -> Option<&pb::Enforcement> {
    match event.kind.as_ref()? {
        pb::event::Kind::Exec(e) => e.enforcement.as_deref(),
        pb::event::Kind::ExecFailed(e) => e.enforcement.as_deref(),
        _ => None,
    }
    .filter(|e| e.action != pb::Action::None as i32)
}

/// One alert already raised, and what happened since.
struct Raised {
    alert: pb::Alert,
    /// Boot time after which a new occurrence starts a new alert.
    window_end_ns: u64,
    /// Occurrences since the alert was raised.
    repeats: u64,
    last_evidence: Vec<Event>,
    last_time: Option<pbjson_types::Timestamp>,
}

/// Collapses repeats of a rule on one process tree within a window.
pub struct Collapser {
    window_ns: u64,
    raised: HashMap<String, Raised>,
}

impl Collapser {
    pub fn new(window_ns: u64) -> Self {
        Self {
            window_ns,
            raised: HashMap::new(),
        }
    }

    /// An occurrence at `now_ns`: `Some(alert)` to emit now, `None` when it collapses into
    /// an alert already raised.
    pub fn offer(&mut self, alert: pb::Alert, now_ns: u64) -> Option<pb::Alert> {
        if let Some(r) = self.raised.get_mut(&alert.dedup_key)
            && now_ns < r.window_end_ns
        {
            r.repeats += 1;
            r.last_time = alert.time;
            r.last_evidence = alert.evidence;
            return None;
        }
        self.raised.insert(
            alert.dedup_key.clone(),
            Raised {
                alert: alert.clone(),
                window_end_ns: now_ns.saturating_add(self.window_ns),
                repeats: 0,
                last_evidence: Vec::new(),
                last_time: None,
            },
        );
        Some(alert)
    }

    /// Ends the windows that closed by `now_ns` (all of them with `u64::MAX`): for each
    /// that saw repeats, an alert with the total count and the last occurrence's evidence.
    pub fn expire(&mut self, now_ns: u64) -> Vec<pb::Alert> {
        let mut closed: Vec<String> = self
            .raised
            .iter()
            .filter(|(_, r)| r.window_end_ns <= now_ns)
            .map(|(k, _)| k.clone())
            .collect();
        closed.sort();
        closed
            .into_iter()
            .filter_map(|k| self.raised.remove(&k))
            .filter(|r| r.repeats > 0)
            .map(|r| pb::Alert {
                count: r.repeats + 1,
                time: r.last_time,
                evidence: r.last_evidence,
                ..r.alert
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(key: &str) -> pb::Alert {
        pb::Alert {
            dedup_key: key.into(),
            rule_id: "R".into(),
            count: 1,
            ..Default::default()
        }
    }

    #[test]
    fn repeats_within_the_window_collapse_into_a_count() {
        let mut c = Collapser::new(100);
        assert!(c.offer(alert("a"), 0).is_some());
        assert!(c.offer(alert("a"), 10).is_none());
        assert!(c.offer(alert("a"), 20).is_none());
        assert!(
            c.offer(alert("b"), 20).is_some(),
            "another tree is another alert"
        );
        assert!(c.expire(50).is_empty(), "windows still open");
        let summary = c.expire(100);
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].count, 3);
        assert!(c.offer(alert("a"), 150).is_some(), "a new window");
        assert!(c.expire(u64::MAX).is_empty(), "nothing repeated");
    }
}
