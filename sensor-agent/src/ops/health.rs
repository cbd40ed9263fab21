//! Alerts the agent raises about itself, with their own rule ids:
//!
//! | rule | when |
//! | --- | --- |
//! | `SELF-LOSS` | records were lost in the kernel (ring buffer full): the agent was blind |
//! | `SELF-SHED` | the spool was full and shed records before the collector had them |
//! | `SELF-PROBE` | an optional probe could not attach, or the probes fell silent while the host kept creating processes |
//! | `SELF-CONFIG` | the configuration or rule files changed on disk, or a reload was applied or refused |
//!
//! Signals, ptrace and memory writes aimed at the agent, and kernel code loaded by other
//! processes, are rules of the embedded pack (`SELF-TAMPER-*` in rules/epmm.yaml): they
//! come from kernel events like any detection.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use sensor_proto::v1::{Alert, Severity};

/// Impair Defenses: Disable or Modify Tools / Indicator Blocking.
const IMPAIR: &[&str] = &["T1562.001", "T1562.006"];

fn now() -> Option<pbjson_types::Timestamp> {
    let d = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Some(pbjson_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    })
}

fn alert(
    rule_id: &str,
    title: String,
    severity: Severity,
    rationale: &str,
    details: BTreeMap<String, String>,
) -> Alert {
    Alert {
        rule_id: rule_id.to_owned(),
        title,
        severity: severity as i32,
        techniques: IMPAIR.iter().map(|t| (*t).to_owned()).collect(),
        rationale: rationale.to_owned(),
        time: now(),
        first_time: now(),
        details: details.into_iter().collect(),
        ..Default::default()
    }
}

/// Records lost in the kernel since the last report, by kind name.
pub fn loss(lost: &BTreeMap<String, u64>, total_since_start: u64) -> Option<Alert> {
    let sum: u64 = lost.values().sum();
    if sum == 0 {
        return None;
    }
    let mut details: BTreeMap<String, String> = lost
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (format!("lost.{k}"), n.to_string()))
        .collect();
    details.insert("lost".into(), sum.to_string());
    details.insert("lost_since_start".into(), total_since_start.to_string());
    Some(alert(
        "SELF-LOSS",
        format!("{sum} kernel records lost: the ring buffer was full"),
        Severity::High,
        "While the ring buffer is full the agent does not see what happens on the host; an \
         attacker can flood it to hide. Raise --ring-mib or find the flood.",
        details,
    ))
}

/// The spool shed records since the last report.
pub fn shed(events: u64, alerts: u64) -> Option<Alert> {
    if events + alerts == 0 {
        return None;
    }
    let details = BTreeMap::from([
        ("shed_events".to_owned(), events.to_string()),
        ("shed_alerts".to_owned(), alerts.to_string()),
    ]);
    Some(alert(
        "SELF-SHED",
        format!(
            "{events} events and {alerts} alerts lost before delivery (spool full, its disk not writable, or its files damaged)"
        ),
        if alerts > 0 {
            Severity::High
        } else {
            Severity::Medium
        },
        "The spool could not keep these records: it reached its bound while the collector \
         was unreachable, its disk refused writes, or its files were damaged. The collector \
         is told exactly which numbers are lost; the records will never reach it.",
        details,
    ))
}

/// The probes the agent runs without, once at start: each with why it did not attach.
pub fn probes_unavailable(unavailable: &[(&str, &str)]) -> Option<Alert> {
    if unavailable.is_empty() {
        return None;
    }
    let names: Vec<&str> = unavailable.iter().map(|(p, _)| *p).collect();
    Some(alert(
        "SELF-PROBE",
        format!(
            "probes not attached: {}: the agent is blind to what they report",
            names.join(", ")
        ),
        Severity::High,
        "A probe that does not run leaves a class of behaviour unseen.",
        unavailable
            .iter()
            .map(|(probe, reason)| (format!("probe.{probe}"), (*reason).to_owned()))
            .collect(),
    ))
}

/// The process probes fell silent: processes were created, no fork was seen.
pub fn probes_silent(created: u64, seconds: u64) -> Alert {
    alert(
        "SELF-PROBE",
        format!(
            "no process event for {seconds} s while the host created {created} processes: the probes are detached or blinded"
        ),
        Severity::Critical,
        "The kernel's pid counter moved and no fork reached the agent: its probes no longer \
         deliver.",
        BTreeMap::from([
            ("processes_created".to_owned(), created.to_string()),
            ("seconds".to_owned(), seconds.to_string()),
        ]),
    )
}

pub fn config_changed(paths: &[PathBuf]) -> Alert {
    let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    alert(
        "SELF-CONFIG",
        format!(
            "configuration or rules changed on disk: {}",
            list.join(", ")
        ),
        Severity::Medium,
        "Who changes the agent's configuration or rules can blind it; a change an operator \
         made is applied with a reload (SIGHUP).",
        BTreeMap::from([("changed".to_owned(), list.join("\n"))]),
    )
}

pub fn reloaded(rules: usize, sigma: usize, watch: usize) -> Alert {
    alert(
        "SELF-CONFIG",
        format!("rules reloaded: {rules} rules, {sigma} Sigma rules, {watch} extra watched paths"),
        Severity::Low,
        "An operator reloaded the rules (SIGHUP).",
        BTreeMap::from([
            ("reload".to_owned(), "applied".to_owned()),
            ("rules".to_owned(), rules.to_string()),
            ("sigma".to_owned(), sigma.to_string()),
        ]),
    )
}

pub fn reload_refused(error: &str) -> Alert {
    alert(
        "SELF-CONFIG",
        "reload refused: the new rules have errors; the running rules stay in force".to_owned(),
        Severity::Medium,
        "A reload (SIGHUP) found errors in the configuration or rule files.",
        BTreeMap::from([
            ("reload".to_owned(), "refused".to_owned()),
            ("error".to_owned(), error.to_owned()),
        ]),
    )
}

/// What the agent's configuration and rule files look like on disk: paths with their
/// modification time and size. A change between two readings is worth an alert.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(BTreeMap<PathBuf, (Option<SystemTime>, u64)>);

impl Fingerprint {
    /// The files `paths` name, and the files directly inside those that are directories.
    pub fn read(paths: &[PathBuf]) -> Self {
        let mut map = BTreeMap::new();
        let mut add = |p: &Path| {
            let meta = std::fs::metadata(p).ok();
            map.insert(
                p.to_path_buf(),
                (
                    meta.as_ref().and_then(|m| m.modified().ok()),
                    meta.map_or(u64::MAX, |m| m.len()),
                ),
            );
        };
        for path in paths {
            add(path);
            if let Ok(entries) = std::fs::read_dir(path) {
                for entry in entries.flatten() {
                    add(&entry.path());
                }
            }
        }
        Self(map)
    }

    /// Paths added, removed or changed from `self` to `now`.
    pub fn changes(&self, now: &Fingerprint) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = now
            .0
            .iter()
            .filter(|(p, v)| self.0.get(*p) != Some(v))
            .map(|(p, _)| p.clone())
            .collect();
        out.extend(self.0.keys().filter(|p| !now.0.contains_key(*p)).cloned());
        out.sort();
        out
    }
}

/// Notices probes that stopped delivering: the kernel's last pid (`/proc/loadavg`)
/// moved by more than a margin while no fork or exec event arrived.
#[derive(Debug, Default)]
pub struct Liveness {
    last_pid: Option<u64>,
    events_at_last: u64,
    reported: bool,
}

/// Processes created without a single event before the probes are called silent: a few
/// may be the agent's own (filtered in the kernel).
const SILENT_MARGIN: u64 = 20;

impl Liveness {
    /// `process_events`: fork/exec events seen so far. Returns the processes created in a
    /// window that brought none, once (until events flow again).
    pub fn check(&mut self, last_pid: u64, process_events: u64) -> Option<u64> {
        let Some(prev) = self.last_pid.replace(last_pid) else {
            self.events_at_last = process_events;
            return None;
        };
        let events = process_events - self.events_at_last.min(process_events);
        self.events_at_last = process_events;
        if events > 0 {
            self.reported = false;
            return None;
        }
        // pids wrap at pid_max: treat a smaller value as progress from 0.
        let created = if last_pid >= prev {
            last_pid - prev
        } else {
            last_pid
        };
        if created > SILENT_MARGIN && !self.reported {
            self.reported = true;
            return Some(created);
        }
        None
    }
}

/// The kernel's most recently assigned pid.
pub fn last_pid() -> Option<u64> {
    use procfs::Current as _;
    procfs::LoadAverage::current()
        .ok()
        .map(|l| u64::from(l.latest_pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_alert_counts_what_was_lost() {
        assert!(loss(&BTreeMap::new(), 0).is_none());
        let lost = BTreeMap::from([("exec".to_owned(), 10), ("fork".to_owned(), 5)]);
        let a = loss(&lost, 40).unwrap();
        assert_eq!(a.rule_id, "SELF-LOSS");
        assert_eq!(a.details["lost"], "15");
        assert_eq!(a.details["lost.exec"], "10");
        assert_eq!(a.details["lost_since_start"], "40");
    }

    #[test]
    fn silent_probes_are_noticed_once() {
        let mut l = Liveness::default();
        assert_eq!(l.check(1000, 0), None, "first reading");
        assert_eq!(l.check(1100, 50), None, "events flowed");
        assert_eq!(
            l.check(1105, 50),
            None,
            "a few processes: the agent's own, perhaps"
        );
        assert_eq!(l.check(1200, 50), Some(95));
        assert_eq!(l.check(1300, 50), None, "reported once");
        assert_eq!(l.check(1400, 60), None);
        assert_eq!(l.check(1500, 60), Some(100), "silent again");
    }

    #[test]
    fn fingerprint_notices_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, "x").unwrap();
        let paths = vec![dir.path().to_path_buf()];
        let before = Fingerprint::read(&paths);
        assert!(before.changes(&Fingerprint::read(&paths)).is_empty());
        std::fs::write(&file, "xy").unwrap();
        std::fs::write(dir.path().join("b.yaml"), "new").unwrap();
        let changes = before.changes(&Fingerprint::read(&paths));
        assert!(changes.contains(&file));
        assert!(changes.contains(&dir.path().join("b.yaml")));
    }
}
