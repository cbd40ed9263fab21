//! SigmaHQ rules (`--sigma DIR`): Linux `process_creation`, `network_connection` and
//! `file_event` rules, evaluated by the `sigma-rust` crate on a Sigma-shaped view of our
//! events. A rule that uses a field we cannot fill, or a modifier the evaluator lacks, is
//! not loaded and is reported with the reason: a rule that silently never matches is
//! worse than one that says it cannot.
//!
//! Field mapping (Sysmon for Linux names onto our events):
//!
//! | Sigma | ours |
//! | --- | --- |
//! | Image, CommandLine, CurrentDirectory, User, ProcessId | proc.exe, proc.cmdline, proc.cwd, proc.user, proc.pid |
//! | ParentImage, ParentCommandLine, ParentProcessId | parent.exe, parent.cmdline, parent.pid |
//! | OriginalFileName | proc.name (Linux executables carry no original name) |
//! | DestinationIp/Port, SourceIp/Port | remote and local ends; swapped for accepted connections |
//! | Initiated | "true" for connect, "false" for accept |
//! | Protocol | "tcp" (stream) or "udp" (dgram) |
//! | TargetFilename | file.path (only watched paths reach us) |

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use sensor_proto::v1::{Event, FileOp, event};
use serde_norway::Value as Yaml;

use super::{
    fields::{Ctx, Field, Value},
    rules::{Body, Rule, Severity, Technique},
};
use crate::detect::expr::Cond;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    ProcessCreation,
    NetworkConnection,
    FileEvent,
}

impl Category {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "process_creation" => Category::ProcessCreation,
            "network_connection" => Category::NetworkConnection,
            "file_event" => Category::FileEvent,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Category::ProcessCreation => "process_creation",
            Category::NetworkConnection => "network_connection",
            Category::FileEvent => "file_event",
        }
    }

    /// Sigma fields we fill for this category.
    fn fields(self) -> &'static [&'static str] {
        const PROCESS: &[&str] = &[
            "Image",
            "CommandLine",
            "CurrentDirectory",
            "User",
            "ProcessId",
            "ParentImage",
            "ParentCommandLine",
            "ParentProcessId",
            "OriginalFileName",
        ];
        const NETWORK: &[&str] = &[
            "Image",
            "CommandLine",
            "User",
            "ProcessId",
            "DestinationIp",
            "DestinationPort",
            "SourceIp",
            "SourcePort",
            "Initiated",
            "Protocol",
        ];
        const FILE: &[&str] = &[
            "Image",
            "CommandLine",
            "User",
            "ProcessId",
            "TargetFilename",
        ];
        match self {
            Category::ProcessCreation => PROCESS,
            Category::NetworkConnection => NETWORK,
            Category::FileEvent => FILE,
        }
    }
}

/// Why fields that Sigma rules use cannot be filled.
fn unsupported_reason(field: &str) -> &'static str {
    match field {
        "DestinationHostname" | "SourceHostname" => "no DNS names: connections are seen by address",
        "LogonId" | "LogonGuid" => "no login session id in Linux events",
        "Hashes" | "md5" | "sha1" | "sha256" | "Imphash" => "executables are not hashed",
        "Product" | "Company" | "Description" | "FileVersion" => {
            "no version resource on Linux executables"
        }
        "ParentUser" => "the parent's user is not mapped",
        _ => "not a field of this category's events",
    }
}

/// What happened to one rule file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Loaded {
        id: String,
        category: &'static str,
    },
    /// A Linux rule of a supported category that cannot be evaluated, and why.
    Unsupported {
        category: String,
        reason: String,
    },
    /// Not a Linux process_creation/network_connection/file_event rule.
    NotApplicable {
        reason: String,
    },
    Invalid {
        reason: String,
    },
}

#[derive(Clone, Debug)]
pub struct Report {
    pub file: String,
    pub outcome: Outcome,
}

struct SigmaRule {
    rule: Rule,
    category: Category,
    sigma: sigma_rust::Rule,
}

/// The loaded Sigma rules and what happened to every file.
#[derive(Default)]
pub struct SigmaSet {
    rules: Vec<SigmaRule>,
    pub reports: Vec<Report>,
}

impl std::fmt::Debug for SigmaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigmaSet")
            .field("rules", &self.rules.len())
            .field("reports", &self.reports.len())
            .finish()
    }
}

impl SigmaSet {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// (loaded, unsupported, invalid) among the applicable rules.
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for r in &self.reports {
            match r.outcome {
                Outcome::Loaded { .. } => c.0 += 1,
                Outcome::Unsupported { .. } => c.1 += 1,
                Outcome::Invalid { .. } => c.2 += 1,
                Outcome::NotApplicable { .. } => {}
            }
        }
        c
    }

    /// Loads every `.yml`/`.yaml` under each directory, recursively.
    pub fn load(dirs: &[PathBuf]) -> std::io::Result<Self> {
        let mut files = Vec::new();
        for dir in dirs {
            collect(dir, &mut files)?;
        }
        files.sort();
        let mut set = SigmaSet::default();
        for file in files {
            let name = file.display().to_string();
            let outcome = match super::rules::read_rule_file(&file) {
                Ok(text) => set.add(&name, &text),
                Err(reason) => Outcome::Invalid { reason },
            };
            set.reports.push(Report {
                file: name,
                outcome,
            });
        }
        Ok(set)
    }

    /// Parses one rule text and keeps it when it can be evaluated.
    pub fn add(&mut self, file: &str, text: &str) -> Outcome {
        let doc: Yaml = match serde_norway::from_str(text) {
            Ok(d) => d,
            Err(e) => {
                return Outcome::Invalid {
                    reason: format!("invalid YAML: {e}"),
                };
            }
        };
        let logsource = &doc["logsource"];
        let product = logsource["product"].as_str().unwrap_or("");
        let category_name = logsource["category"].as_str().unwrap_or("");
        if product != "linux" {
            return Outcome::NotApplicable {
                reason: format!("product `{product}` is not linux"),
            };
        }
        let Some(category) = Category::parse(category_name) else {
            return Outcome::NotApplicable {
                reason: format!(
                    "category `{category_name}` is not process_creation, network_connection or file_event"
                ),
            };
        };
        if let Err(reason) = check_detection(&doc["detection"], category) {
            return Outcome::Unsupported {
                category: category_name.to_owned(),
                reason,
            };
        }
        let sigma = match sigma_rust::rule_from_yaml(text) {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Unsupported {
                    category: category_name.to_owned(),
                    reason: format!("the Sigma evaluator refuses it: {e}"),
                };
            }
        };
        let id = sigma.id.clone().unwrap_or_else(|| file.to_owned());
        // The crate does not export its Level type; its Debug names are the levels.
        let severity = sigma
            .level
            .as_ref()
            .and_then(|l| Severity::parse(&format!("{l:?}")))
            .unwrap_or(Severity::Low);
        let techniques = sigma
            .tags
            .iter()
            .flatten()
            .filter_map(|t| t.strip_prefix("attack."))
            .filter_map(Technique::parse)
            .collect();
        let rule = Rule {
            id: format!("sigma:{id}").into(),
            title: sigma.title.as_str().into(),
            severity,
            techniques,
            rationale: sigma.description.clone().unwrap_or_default().trim().into(),
            source: format!("sigma:{file}").into(),
            body: Body::Single {
                on: Vec::new(),
                cond: Cond::Const(true),
                threshold: None,
            },
        };
        self.rules.push(SigmaRule {
            rule,
            category,
            sigma,
        });
        Outcome::Loaded {
            id: format!("sigma:{id}"),
            category: category.name(),
        }
    }

    /// The rules matching `event`.
    pub fn matching<'s>(&'s self, event: &Event, ctx: &Ctx<'_>) -> Vec<&'s Rule> {
        if self.rules.is_empty() {
            return Vec::new();
        }
        let Some((category, sigma_event)) = to_sigma(event, ctx) else {
            return Vec::new();
        };
        self.rules
            .iter()
            .filter(|r| r.category == category && r.sigma.is_match(&sigma_event))
            .map(|r| &r.rule)
            .collect()
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if dir.is_file() {
        out.push(dir.to_path_buf());
        return Ok(());
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yml" || e == "yaml") {
            out.push(path);
        }
    }
    Ok(())
}

/// Modifiers the evaluator implements (all but `expand`, which needs placeholders).
const MODIFIERS: &[&str] = &[
    "contains",
    "startswith",
    "endswith",
    "all",
    "base64",
    "base64offset",
    "utf16le",
    "utf16be",
    "utf16",
    "wide",
    "windash",
    "re",
    "i",
    "m",
    "s",
    "cidr",
    "exists",
    "lt",
    "lte",
    "gt",
    "gte",
    "fieldref",
    "cased",
];

/// Every field and modifier in the detection must be one we can evaluate.
fn check_detection(detection: &Yaml, category: Category) -> Result<(), String> {
    let Some(map) = detection.as_mapping() else {
        return Err("the rule has no detection mapping".into());
    };
    for (name, selection) in map {
        let name = name.as_str().unwrap_or("");
        if name == "condition" || name == "timeframe" {
            if name == "timeframe" {
                return Err("`timeframe` (correlation over time) is not supported".into());
            }
            continue;
        }
        let maps: Vec<&serde_norway::Mapping> = match selection {
            Yaml::Mapping(m) => vec![m],
            Yaml::Sequence(items) => {
                if items.iter().any(|i| !i.is_mapping()) {
                    return Err(format!(
                        "selection `{name}` is a keyword search, which needs raw log lines"
                    ));
                }
                items.iter().filter_map(Yaml::as_mapping).collect()
            }
            _ => return Err(format!("selection `{name}` is neither a map nor a list")),
        };
        for m in maps {
            for key in m.keys() {
                let key = key.as_str().unwrap_or("");
                let mut parts = key.split('|');
                let field = parts.next().unwrap_or("");
                if !category.fields().contains(&field) {
                    return Err(format!(
                        "field `{field}` is not available for {}: {}",
                        category.name(),
                        unsupported_reason(field)
                    ));
                }
                for modifier in parts {
                    if !MODIFIERS.contains(&modifier) {
                        return Err(format!(
                            "modifier `{modifier}` (in `{key}`) is not supported"
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

fn put(event: &mut sigma_rust::Event, key: &str, value: Value<'_>) {
    match value {
        Value::Str(s) => event.insert(key, s.into_owned()),
        Value::Int(i) => event.insert(key, i),
        Value::Bool(b) => event.insert(key, b),
        Value::List(items) => event.insert(key, items.join(" ")),
        Value::Missing => {}
    }
}

/// Our event as Sigma sees it, with its category; None for events no category covers.
fn to_sigma(event: &Event, ctx: &Ctx<'_>) -> Option<(Category, sigma_rust::Event)> {
    use event::Kind as K;
    let mut s = sigma_rust::Event::new();
    let process = |s: &mut sigma_rust::Event| {
        put(s, "Image", Field::ProcExe.get(ctx));
        put(s, "CommandLine", Field::ProcCmdline.get(ctx));
        put(s, "User", Field::ProcUser.get(ctx));
        put(s, "ProcessId", Field::ProcPid.get(ctx));
    };
    let category = match event.kind.as_ref()? {
        K::Exec(_) => {
            process(&mut s);
            put(&mut s, "CurrentDirectory", Field::ProcCwd.get(ctx));
            put(&mut s, "OriginalFileName", Field::ProcName.get(ctx));
            put(&mut s, "ParentImage", Field::ParentExe.get(ctx));
            put(&mut s, "ParentCommandLine", Field::ParentCmdline.get(ctx));
            put(&mut s, "ParentProcessId", Field::ParentPid.get(ctx));
            Category::ProcessCreation
        }
        K::Connect(_) | K::Accept(_) => {
            process(&mut s);
            let sock = match event.kind.as_ref()? {
                K::Connect(c) => c.socket.as_ref()?,
                K::Accept(a) => a.socket.as_ref()?,
                _ => return None,
            };
            let initiated = matches!(event.kind, Some(K::Connect(_)));
            let (src, src_port, dst, dst_port) = if initiated {
                (
                    &sock.local_addr,
                    sock.local_port,
                    &sock.remote_addr,
                    sock.remote_port,
                )
            } else {
                (
                    &sock.remote_addr,
                    sock.remote_port,
                    &sock.local_addr,
                    sock.local_port,
                )
            };
            s.insert("Initiated", if initiated { "true" } else { "false" });
            s.insert("SourceIp", src.clone());
            s.insert("SourcePort", i64::from(src_port));
            s.insert("DestinationIp", dst.clone());
            s.insert("DestinationPort", i64::from(dst_port));
            let protocol = match sock.r#type.as_str() {
                "stream" => "tcp",
                "dgram" => "udp",
                other => other,
            };
            s.insert("Protocol", protocol.to_owned());
            Category::NetworkConnection
        }
        K::File(f) => {
            let created = matches!(
                FileOp::try_from(f.op).unwrap_or(FileOp::Unspecified),
                FileOp::Create
                    | FileOp::CreateExec
                    | FileOp::OpenWrite
                    | FileOp::Truncate
                    | FileOp::Link
            ) || (f.op == FileOp::Rename as i32 && !f.path_is_source);
            if !created {
                return None;
            }
            process(&mut s);
            s.insert("TargetFilename", f.path.clone());
            Category::FileEvent
        }
        _ => return None,
    };
    Some((category, s))
}

/// A Sigma set shared between the engine and reloads.
pub type Shared = Arc<SigmaSet>;

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: &str = r#"
title: Shell spawned by Java
id: 11111111-2222-3333-4444-555555555555
status: test
description: A test rule.
tags:
  - attack.execution
  - attack.t1059.004
logsource:
  product: linux
  category: process_creation
detection:
  selection:
    ParentImage|endswith: '/java'
    Image|endswith:
      - '/sh'
      - '/bash'
  condition: selection
level: high
"#;

    #[test]
    fn loads_a_rule_and_maps_tags_and_level() {
        let mut set = SigmaSet::default();
        let outcome = set.add("r.yml", RULE);
        assert_eq!(
            outcome,
            Outcome::Loaded {
                id: "sigma:11111111-2222-3333-4444-555555555555".into(),
                category: "process_creation"
            }
        );
        let rule = &set.rules[0].rule;
        assert_eq!(rule.severity, Severity::High);
        assert_eq!(
            rule.techniques,
            vec![Technique::parse("T1059.004").unwrap()]
        );
    }

    #[test]
    fn unsupported_fields_and_modifiers_are_reported() {
        let mut set = SigmaSet::default();
        let text = RULE.replace("ParentImage|endswith", "DestinationHostname|endswith");
        match set.add("r.yml", &text) {
            Outcome::Unsupported { reason, .. } => assert_eq!(
                reason,
                "field `DestinationHostname` is not available for process_creation: no DNS names: connections are seen by address"
            ),
            other => panic!("{other:?}"),
        }
        let text = RULE.replace("ParentImage|endswith", "ParentImage|expand");
        match set.add("r.yml", &text) {
            Outcome::Unsupported { reason, .. } => {
                assert!(reason.contains("modifier `expand`"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        let text = RULE.replace("product: linux", "product: windows");
        assert!(matches!(
            set.add("r.yml", &text),
            Outcome::NotApplicable { .. }
        ));
        assert!(matches!(
            set.add("r.yml", "title: [unclosed"),
            Outcome::Invalid { .. }
        ));
        assert_eq!(set.len(), 0);
    }
}
