//! `sensor-agent learn`: a baseline of the appliance itself. No public source lists what
//! EPMM's Tomcat and its helpers legitimately start, so the agent learns it on a clean
//! appliance: every web-tier alert of a *learnable* rule seen while learning becomes an
//! `allow:` entry of a rule file, keyed by what the process is (the content hash of its
//! executable, the kernel-resolved executable of its parent, its web-tier identity) and by
//! its command line as an anchored template (runs of three or more digits, such as pids
//! and ports, match any digits; everything else only itself). The operator reviews the file and loads it with `--rules`; what falls
//! outside it still alerts.
//!
//! Never learned, whatever happened while learning: shapes that are never benign (a
//! socket on the shell's stdio, an executable from a memfd or deleted, writes into the web
//! root, persistence, anti-forensics, injection...). Only the rules in [`LEARNABLE`] are,
//! and each entry also requires the exec not to be on a socket nor from memory.
//!
//! Where the rule set's `enforce:` policy gives an identity an allow list (the RewriteMap
//! helpers), the programs its descendants ran while learning and the list does not name
//! are also written as an `enforce:` entry that appends them (`append: true`), so the
//! baseline that stops alerting also stops being killed under `--enforce on`. Identities
//! without an allow list get none: appending one would forbid everything else.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
};

use crate::detect::enforce::Policy;

use sensor_proto::v1::{Alert, event};

/// Rules a legitimate maintenance action of the product may raise, and so may be learned:
/// the helpers' programs outside the built-in baseline (B1), shells and interpreters of
/// the Tomcat JVM (B2), network tools it runs (B3), connections of its tools (B24).
pub const LEARNABLE: &[&str] = &["EPMM-B1", "EPMM-B2", "EPMM-B3", "EPMM-B24"];

/// One learned shape.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Shape {
    rule: String,
    identity: String,
    sha256: String,
    exe: String,
    parent_exe: String,
    /// The command line as a glob (exec), or the remote port (connect).
    cmdline: Option<String>,
    port: Option<u32>,
}

#[derive(Debug, Default)]
struct Seen {
    count: u64,
    first: String,
    last: String,
}

/// What a learning run saw.
#[derive(Debug, Default)]
pub struct Learner {
    shapes: BTreeMap<Shape, Seen>,
    /// Alerts of rules that are not learnable (they stay alerts after learning).
    pub not_learned: BTreeMap<String, u64>,
}

/// `s` as an anchored regular expression matching itself, each run of three or more
/// digits (pids, ports, times) standing for any run of digits — and nothing else, so the
/// template cannot be stretched over an appended command.
pub fn template(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('^');
    let mut literal = String::new();
    let mut digits = String::new();
    let flush = |literal: &mut String, digits: &mut String, out: &mut String| {
        if digits.len() >= 3 {
            escape(literal, out);
            out.push_str("[0-9]+");
            literal.clear();
        } else {
            literal.push_str(digits);
        }
        digits.clear();
    };
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        flush(&mut literal, &mut digits, &mut out);
        literal.push(c);
    }
    flush(&mut literal, &mut digits, &mut out);
    escape(&literal, &mut out);
    out.push('$');
    out
}

/// `s` as regex text matching itself: only the characters the syntax gives a meaning
/// outside classes are escaped, so the file stays readable (`ulimit -n`, not `ulimit \-n`).
fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        if matches!(
            c,
            '\\' | '.'
                | '+'
                | '*'
                | '?'
                | '('
                | ')'
                | '|'
                | '['
                | ']'
                | '{'
                | '}'
                | '^'
                | '$'
                | '#'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
}

/// `t` as RFC 3339 text (UTC), as the JSON lines print times.
pub fn rfc3339(t: &pbjson_types::Timestamp) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Learner {
    /// Takes one alert of the learning run.
    pub fn alert(&mut self, alert: &Alert) {
        let learnable = LEARNABLE.contains(&alert.rule_id.as_str());
        let (Some(process), Some(lineage), Some(last)) = (
            alert.process.as_ref(),
            alert.lineage.as_ref(),
            alert.evidence.last(),
        ) else {
            *self.not_learned.entry(alert.rule_id.clone()).or_default() += 1;
            return;
        };
        let (cmdline, port) = match &last.kind {
            Some(event::Kind::Exec(e))
                if !e.exe_memfd
                    && !e.exe_deleted
                    && !e
                        .stdio
                        .iter()
                        .any(|f| f.kind == sensor_proto::v1::FdKind::Socket as i32) =>
            {
                (Some(template(&e.argv.join(" "))), None)
            }
            Some(event::Kind::Connect(c)) => (None, c.socket.as_ref().map(|s| s.remote_port)),
            _ => (None, None),
        };
        let sha256 = process
            .exe_identity
            .as_ref()
            .map(|i| i.sha256.clone())
            .unwrap_or_default();
        if !learnable || (cmdline.is_none() && port.is_none()) || sha256.is_empty() {
            *self.not_learned.entry(alert.rule_id.clone()).or_default() += 1;
            return;
        }
        let shape = Shape {
            rule: alert.rule_id.clone(),
            identity: lineage.identity.clone(),
            sha256,
            exe: process.exe.clone(),
            parent_exe: alert
                .ancestry
                .first()
                .map(|p| p.exe.clone())
                .unwrap_or_default(),
            cmdline,
            port,
        };
        let time = alert.time.as_ref().map(rfc3339).unwrap_or_default();
        let seen = self.shapes.entry(shape).or_default();
        seen.count += alert.count.max(1);
        if seen.first.is_empty() {
            seen.first = time.clone();
        }
        seen.last = time;
    }

    /// Takes the JSON lines a replay printed (alerts; other lines are skipped).
    pub fn json_lines(&mut self, text: &str) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        struct Line {
            alert: Option<Alert>,
        }
        for (n, line) in text.lines().enumerate() {
            let parsed: Line = serde_json::from_str(line)
                .map_err(|e| format!("replay output line {}: {e}", n + 1))?;
            if let Some(alert) = parsed.alert {
                self.alert(&alert);
            }
        }
        Ok(())
    }

    pub fn learned(&self) -> usize {
        self.shapes.len()
    }

    /// The programs learned under each identity whose enforcement has an allow list that
    /// does not name them (by the kernel-resolved path of the executable).
    fn enforce_additions(&self, policy: &Policy) -> BTreeMap<&str, BTreeSet<&str>> {
        let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for shape in self.shapes.keys() {
            if shape.cmdline.is_none() || !shape.exe.starts_with('/') {
                continue;
            }
            let Some(allow) = policy
                .by_identity(&shape.identity)
                .and_then(|e| e.allow.as_ref())
            else {
                continue;
            };
            if !allow.contains(&shape.exe) {
                out.entry(&shape.identity).or_default().insert(&shape.exe);
            }
        }
        out
    }

    /// The rule file: a header saying where and when it was learned, then one `allow:`
    /// entry per shape, and the `enforce:` additions for identities with an allow list.
    pub fn rule_file(&self, host: &str, span: &str, policy: &Policy) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Baseline learned by `sensor-agent learn` on {host} ({span}).\n\
             # Review every entry before loading it with --rules: each silences the named rule\n\
             # for this executable content, parent executable and command line only.\n\
             # Never learned: sockets on stdio, memfd or deleted executables, web-root writes,\n\
             # persistence, anti-forensics, injection (only {} are learnable).",
            LEARNABLE.join(", ")
        );
        if !self.not_learned.is_empty() {
            let _ = writeln!(out, "# Seen while learning and left alerting:");
            for (rule, n) in &self.not_learned {
                let _ = writeln!(out, "#   {rule}: {n}");
            }
        }
        if self.shapes.is_empty() {
            let _ = writeln!(out, "allow: []");
            return out;
        }
        let additions = self.enforce_additions(policy);
        if !additions.is_empty() {
            let _ = writeln!(
                out,
                "# Under --enforce on, these programs may also run under their identity (the\n\
                 # allow list of the loaded policy does not name them). Each is resolved to its\n\
                 # file when the policy is applied; the never-allowed shapes still apply."
            );
            let _ = writeln!(out, "enforce:");
            for (identity, exes) in &additions {
                let _ = writeln!(out, "  - identity: {}", quote(identity));
                let _ = writeln!(out, "    append: true");
                let _ = writeln!(out, "    allow:");
                for exe in exes {
                    let _ = writeln!(out, "      - {}", quote(exe));
                }
            }
        }
        let _ = writeln!(out, "allow:");
        for (shape, seen) in &self.shapes {
            let mut cond = format!(
                "lineage.identity = {} and proc.exe_sha256 = {} and parent.exe = {}",
                quote(&shape.identity),
                quote(&shape.sha256),
                quote(&shape.parent_exe)
            );
            if let Some(cmdline) = &shape.cmdline {
                let _ = write!(
                    cond,
                    " and proc.cmdline regex {} and not exec.stdio_socket and not proc.exe_memfd and not proc.exe_deleted",
                    quote(cmdline)
                );
            }
            if let Some(port) = shape.port {
                let _ = write!(cond, " and net.remote_port = {port}");
            }
            let _ = writeln!(out, "  - rules: [{}]", shape.rule);
            let _ = writeln!(out, "    # {}", shape.exe);
            let _ = writeln!(out, "    condition: '{}'", cond.replace('\'', "''"));
            let _ = writeln!(
                out,
                "    reason: {}",
                quote(&format!(
                    "learned: seen {} times, {} to {}",
                    seen.count, seen.first, seen.last
                ))
            );
        }
        out
    }
}

/// Writes `text` to `path` (through a temporary file beside it, so a reader never sees
/// half a file).
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_their_command_and_nothing_appended() {
        let re = |s: &str| regex::Regex::new(&template(s)).unwrap();
        assert!(re("sh -c ulimit -n").is_match("sh -c ulimit -n"));
        assert!(!re("sh -c ulimit -n").is_match("sh -c ulimit -n; id"));
        let kill = re("kill -0 12345 2>/dev/null; true");
        assert!(kill.is_match("kill -0 777 2>/dev/null; true"));
        assert!(!kill.is_match("kill -0 1; curl x|sh; 2>/dev/null; true"));
        let star = re("ls *.jsp [a] (b) a-b # $x ^ | {1}");
        assert!(star.is_match("ls *.jsp [a] (b) a-b # $x ^ | {1}"));
        assert!(!star.is_match("ls x.jsp a b"));
    }

    #[test]
    fn never_benign_shapes_and_other_rules_are_not_learned() {
        use sensor_proto::v1::{
            Event, ExeIdentity, ExecEvent, FdInfo, FdKind, Lineage, ProcessInfo,
        };
        let alert = |rule: &str, stdio: FdKind, memfd: bool| Alert {
            rule_id: rule.into(),
            process: Some(ProcessInfo {
                exe: "/usr/bin/dash".into(),
                exe_identity: Some(ExeIdentity {
                    sha256: "ab".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            lineage: Some(Lineage {
                identity: "tomcat".into(),
                ..Default::default()
            }),
            evidence: vec![Event {
                kind: Some(event::Kind::Exec(Box::new(ExecEvent {
                    argv: vec!["sh".into(), "-c".into(), "ulimit -n".into()],
                    exe_memfd: memfd,
                    stdio: vec![FdInfo {
                        kind: stdio as i32,
                        ..Default::default()
                    }],
                    ..Default::default()
                }))),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut l = Learner::default();
        l.alert(&alert("EPMM-B2", FdKind::Socket, false));
        l.alert(&alert("EPMM-B2", FdKind::Pipe, true));
        l.alert(&alert("EPMM-B7", FdKind::Pipe, false));
        assert_eq!(l.learned(), 0);
        assert_eq!(l.not_learned["EPMM-B2"], 2);
        l.alert(&alert("EPMM-B2", FdKind::Pipe, false));
        l.alert(&alert("EPMM-B2", FdKind::Pipe, false));
        assert_eq!(l.learned(), 1);
        let file = l.rule_file("h", "test", &Policy::default());
        assert!(file.contains("seen 2 times"), "{file}");
        assert!(!file.contains("enforce:"), "{file}");
        let set = crate::detect::rules::compile_texts(&[
            (
                crate::detect::rules::DEFAULT_PACK_NAME.into(),
                crate::detect::rules::DEFAULT_PACK.into(),
            ),
            ("learned.yaml".into(), file.clone()),
        ]);
        assert!(set.is_ok(), "{file}");
    }

    #[test]
    fn programs_outside_an_identitys_allow_list_are_appended_to_its_enforcement() {
        use crate::detect::rules::{DEFAULT_PACK, DEFAULT_PACK_NAME, compile_texts};
        use sensor_proto::v1::{Event, ExeIdentity, ExecEvent, Lineage, ProcessInfo};
        let alert = |rule: &str, identity: &str, exe: &str| Alert {
            rule_id: rule.into(),
            process: Some(ProcessInfo {
                exe: exe.into(),
                exe_identity: Some(ExeIdentity {
                    sha256: format!("{exe}-hash"),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            lineage: Some(Lineage {
                identity: identity.into(),
                ..Default::default()
            }),
            evidence: vec![Event {
                kind: Some(event::Kind::Exec(Box::new(ExecEvent {
                    argv: vec![exe.into()],
                    ..Default::default()
                }))),
                ..Default::default()
            }],
            ..Default::default()
        };
        let pack = compile_texts(&[(DEFAULT_PACK_NAME.into(), DEFAULT_PACK.into())]).unwrap();
        let mut l = Learner::default();
        // The helper ran a utility of a newer version, and the date the pack allows.
        l.alert(&alert("EPMM-B1", "rewritemap-helper", "/usr/bin/basename"));
        l.alert(&alert("EPMM-B1", "rewritemap-helper", "/usr/bin/date"));
        // Tomcat has no allow list: nothing may be appended to it.
        l.alert(&alert("EPMM-B2", "tomcat", "/usr/bin/dash"));
        let file = l.rule_file("h", "test", &pack.enforce);
        let set = compile_texts(&[
            (DEFAULT_PACK_NAME.into(), DEFAULT_PACK.into()),
            ("learned.yaml".into(), file.clone()),
        ])
        .unwrap_or_else(|e| panic!("{e}\n{file}"));
        let helper = set.enforce.by_identity("rewritemap-helper").unwrap();
        assert_eq!(
            helper.allow.as_deref().unwrap(),
            ["/usr/bin/date", "/bin/date", "/usr/bin/basename"],
            "{file}"
        );
        assert_eq!(
            helper.deny,
            pack.enforce.by_identity("rewritemap-helper").unwrap().deny
        );
        let tomcat = set.enforce.by_identity("tomcat").unwrap();
        assert_eq!(tomcat.allow, None, "{file}");
        assert_eq!(
            tomcat.deny,
            pack.enforce.by_identity("tomcat").unwrap().deny
        );
    }
}
