//! Where the file rules look. The kernel reports file activity only in watched places (an
//! LPM trie of prefixes and a few suffixes, `probes/watch.rs`), so the watch list is
//! derived from the loaded rules: every place a file rule's condition confines `file.path`
//! to is watched for the operations the rule asks about. A rule whose condition does not
//! confine the path (only `file.ext`, say) could only see what other rules make watched;
//! `rules check` says so, and names the places no probe can report.
//!
//! The derivation over-approximates, never under: `a and b` is confined by whichever side
//! confines (both, when both do: the smaller set), `a or b` by the union of both sides
//! (nowhere, if one side is not confined), `not a` by nothing.

use std::collections::BTreeMap;

use sensor_common::{MAX_WATCH_SUFFIXES, WATCH_KEY_BYTES, file_op};

use super::{
    expr::{Cond, Op, Rhs},
    fields::Field,
    rules::{Body, RuleSet},
};

/// Longest suffix the probes compare (`WatchSuffix::bytes`).
pub const MAX_SUFFIX: usize = 16;

/// A place a condition confines `file.path` to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Place {
    /// Paths that start with this.
    Prefix(String),
    /// Paths that end with this (a name that can be anywhere).
    Suffix(String),
}

/// What a condition needs watched: the places with the operations wanted in each, or
/// (`Anywhere`) no confinement of the path, with the operations it may hold for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Need {
    Anywhere(u32),
    At(BTreeMap<Place, u32>),
}

impl Need {
    fn ops(&self) -> u32 {
        match self {
            Need::Anywhere(ops) => *ops,
            Need::At(places) => places.values().fold(0, |a, b| a | b),
        }
    }

    fn restrict(self, ops: u32) -> Need {
        match self {
            Need::Anywhere(o) => Need::Anywhere(o & ops),
            Need::At(places) => Need::At(
                places
                    .into_iter()
                    .map(|(p, o)| (p, o & ops))
                    .filter(|(_, o)| *o != 0)
                    .collect(),
            ),
        }
    }

    fn and(self, other: Need) -> Need {
        match (self, other) {
            (Need::Anywhere(a), Need::Anywhere(b)) => Need::Anywhere(a & b),
            (Need::Anywhere(ops), at @ Need::At(_)) | (at @ Need::At(_), Need::Anywhere(ops)) => {
                at.restrict(ops)
            }
            (Need::At(a), Need::At(b)) => {
                let (ops_a, ops_b) = (
                    a.values().fold(0, |x, y| x | y),
                    b.values().fold(0, |x, y| x | y),
                );
                if a.len() <= b.len() {
                    Need::At(a).restrict(ops_b)
                } else {
                    Need::At(b).restrict(ops_a)
                }
            }
        }
    }

    fn or(self, other: Need) -> Need {
        match (self, other) {
            (Need::At(mut a), Need::At(b)) => {
                for (place, ops) in b {
                    *a.entry(place).or_default() |= ops;
                }
                Need::At(a)
            }
            (a, b) => Need::Anywhere(a.ops() | b.ops()),
        }
    }
}

fn strs(rhs: &Rhs) -> Option<&[String]> {
    match rhs {
        Rhs::Strs(items) | Rhs::Indexed(items, _) => Some(items),
        _ => None,
    }
}

fn at(places: impl IntoIterator<Item = Place>) -> Need {
    Need::At(places.into_iter().map(|p| (p, file_op::ALL)).collect())
}

fn need(cond: &Cond) -> Need {
    match cond {
        Cond::And(items) => items
            .iter()
            .fold(Need::Anywhere(file_op::ALL), |n, c| n.and(need(c))),
        Cond::Or(items) => items
            .iter()
            .map(need)
            .reduce(Need::or)
            .unwrap_or(Need::At(BTreeMap::new())),
        Cond::Macro(m) => need(&m.cond),
        Cond::Const(false) => Need::At(BTreeMap::new()),
        Cond::Test { field, op, rhs } => test(*field, *op, rhs),
        Cond::Not(_) | Cond::Truthy(_) | Cond::Const(true) => Need::Anywhere(file_op::ALL),
    }
}

fn test(field: Field, op: Op, rhs: &Rhs) -> Need {
    let Some(values) = strs(rhs) else {
        return Need::Anywhere(file_op::ALL);
    };
    match (field, op) {
        (Field::FileOp, Op::Eq) => Need::Anywhere(
            values
                .iter()
                .filter_map(|v| op_named(v))
                .fold(0, |ops, op| ops | file_op::bit(op)),
        ),
        (Field::FilePath, Op::StartsWith | Op::Eq) => {
            at(values.iter().map(|v| Place::Prefix(v.clone())))
        }
        (Field::FileDir, Op::Eq) => at(values.iter().map(|v| Place::Prefix(format!("{v}/")))),
        (Field::FileDir, Op::StartsWith) => at(values.iter().map(|v| Place::Prefix(v.clone()))),
        (Field::FilePath, Op::EndsWith) => at(values.iter().map(|v| Place::Suffix(v.clone()))),
        (Field::FileName, Op::Eq) => at(values.iter().map(|v| Place::Suffix(format!("/{v}")))),
        (Field::FileName, Op::EndsWith) => at(values.iter().map(|v| Place::Suffix(v.clone()))),
        _ => Need::Anywhere(file_op::ALL),
    }
}

/// The `file_op` of a name as rules write it (`file.op`).
fn op_named(name: &str) -> Option<u16> {
    Some(match name {
        "open_write" => file_op::OPEN_WRITE,
        "create" => file_op::CREATE,
        "truncate" => file_op::TRUNCATE,
        "create_exec" => file_op::CREATE_EXEC,
        "rename" => file_op::RENAME,
        "unlink" => file_op::UNLINK,
        "chmod_exec" => file_op::CHMOD_EXEC,
        "utimes" => file_op::UTIMES,
        "link" => file_op::LINK,
        _ => return None,
    })
}

/// The watch list the rules need, and what cannot be watched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Places {
    /// Prefix → operations.
    pub prefixes: BTreeMap<String, u32>,
    /// Suffix → operations.
    pub suffixes: BTreeMap<String, u32>,
    /// One line per rule (or place) the probes cannot serve, saying why.
    pub warnings: Vec<String>,
}

/// The file conditions of a rule set: (rule id, condition) of every rule, or sequence
/// step, that applies to file events.
fn file_conditions(set: &RuleSet) -> Vec<(&str, &Cond)> {
    let mut out = Vec::new();
    for rule in &set.rules {
        match &rule.body {
            Body::Single { on, cond, .. } if on.contains(&sensor_proto::EventKind::File) => {
                out.push((&*rule.id, cond))
            }
            Body::Sequence { steps, .. } => {
                for step in steps
                    .iter()
                    .filter(|s| s.on.contains(&sensor_proto::EventKind::File))
                {
                    out.push((&*rule.id, &step.cond));
                }
            }
            Body::Single { .. } | Body::Sigma => {}
        }
    }
    out
}

/// Derives the places every file rule of `set` needs watched.
pub fn derive(set: &RuleSet) -> Places {
    let mut places = Places::default();
    for (id, cond) in file_conditions(set) {
        match need(cond) {
            Need::Anywhere(0) => {}
            Need::Anywhere(_) => places.warnings.push(format!(
                "rule {id}: its condition does not confine file.path (startswith, =, \
                 endswith, file.dir or file.name), so it sees only places other rules or \
                 --watch make watched"
            )),
            Need::At(needed) => {
                for (place, ops) in needed {
                    if let Some(warning) = add(&mut places, place, ops) {
                        places.warnings.push(format!("rule {id}: {warning}"));
                    }
                }
            }
        }
    }
    if places.suffixes.len() > MAX_WATCH_SUFFIXES {
        let dropped: Vec<String> = places
            .suffixes
            .keys()
            .skip(MAX_WATCH_SUFFIXES)
            .cloned()
            .collect();
        for suffix in &dropped {
            places.suffixes.remove(suffix);
        }
        places.warnings.push(format!(
            "the probes watch at most {MAX_WATCH_SUFFIXES} names anywhere; not watched: {}",
            dropped.join(", ")
        ));
    }
    places
}

/// Adds one place; says why when no probe can see it.
fn add(places: &mut Places, place: Place, ops: u32) -> Option<String> {
    match place {
        Place::Prefix(prefix) => {
            if !prefix.starts_with('/') {
                return Some(format!(
                    "{prefix:?} is not an absolute path; file paths always are"
                ));
            }
            if prefix.starts_with("/proc/") || prefix == "/proc" {
                return Some(format!(
                    "{prefix:?}: under /proc only writes into process memory are reported \
                     (proc_mem_write events)"
                ));
            }
            // A longer prefix is watched by its first bytes: more is reported, never less.
            let mut key = prefix;
            if key.len() > WATCH_KEY_BYTES {
                let mut cut = WATCH_KEY_BYTES;
                while !key.is_char_boundary(cut) {
                    cut -= 1;
                }
                key.truncate(cut);
            }
            *places.prefixes.entry(key).or_default() |= ops;
            None
        }
        Place::Suffix(suffix) => {
            if suffix.is_empty() {
                return Some("an empty name or suffix cannot be watched".into());
            }
            // The probes compare the last bytes: a longer suffix is watched by its end.
            let mut cut = suffix.len().saturating_sub(MAX_SUFFIX);
            while !suffix.is_char_boundary(cut) {
                cut += 1;
            }
            *places.suffixes.entry(suffix[cut..].to_owned()).or_default() |= ops;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::rules::compile_texts;

    fn places(rules: &str) -> Places {
        let text = format!("rules:\n{rules}");
        let set = compile_texts(&[("t.yaml".into(), text)]).unwrap();
        derive(&set)
    }

    fn bits(ops: &[u16]) -> u32 {
        ops.iter().fold(0, |b, op| b | file_op::bit(*op))
    }

    #[test]
    fn a_prefix_with_operations_is_watched_for_those_operations() {
        let p = places(
            r#"
  - id: R
    title: t
    severity: high
    on: [file]
    condition: file.path startswith ("/etc/cron", "/var/spool/cron/") and file.op in ("create", "rename")
"#,
        );
        let ops = bits(&[file_op::CREATE, file_op::RENAME]);
        assert_eq!(p.prefixes.get("/etc/cron"), Some(&ops));
        assert_eq!(p.prefixes.get("/var/spool/cron/"), Some(&ops));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn either_side_of_an_or_is_watched_with_its_own_operations_and_names_are_suffixes() {
        let p = places(
            r#"
  - id: R
    title: t
    severity: high
    on: [file]
    condition: >-
      (file.path startswith "/var/log/httpd/" and file.op = "truncate")
      or (file.name in ("authorized_keys", ".bashrc") and not file.is_source)
"#,
        );
        assert_eq!(
            p.prefixes.get("/var/log/httpd/"),
            Some(&bits(&[file_op::TRUNCATE]))
        );
        assert_eq!(p.suffixes.get("/authorized_keys"), Some(&file_op::ALL));
        assert_eq!(p.suffixes.get("/.bashrc"), Some(&file_op::ALL));
    }

    #[test]
    fn an_unconfined_rule_a_proc_prefix_and_a_long_name_are_warned_about() {
        let p = places(
            r#"
  - id: EXT
    title: t
    severity: high
    on: [file]
    condition: file.ext = "jsp" or file.path startswith "/mi/"
  - id: PROC
    title: t
    severity: high
    on: [file]
    condition: file.path startswith "/proc/self/"
  - id: LONG
    title: t
    severity: high
    on: [file]
    condition: file.name = "a-name-far-too-long-for-a-suffix"
  - id: EXEC
    title: t
    severity: high
    on: [exec]
    condition: proc.name = "x"
"#,
        );
        let text = p.warnings.join("\n");
        assert!(
            text.contains("rule EXT") && text.contains("does not confine"),
            "{text}"
        );
        assert!(
            text.contains("rule PROC") && text.contains("/proc"),
            "{text}"
        );
        assert!(!text.contains("LONG") && !text.contains("EXEC"), "{text}");
        assert!(p.prefixes.is_empty(), "{:?}", p.prefixes);
        // A name longer than the probes compare is watched by its last bytes.
        let name = "/a-name-far-too-long-for-a-suffix";
        assert!(
            p.suffixes.contains_key(&name[name.len() - MAX_SUFFIX..]),
            "{:?}",
            p.suffixes
        );
    }

    #[test]
    fn macros_and_sequence_steps_are_followed() {
        let p = places(
            r#"
  - id: SEQ
    title: t
    severity: high
    sequence:
      within: 10s
      steps:
        - on: [exec]
          condition: proc.name = "curl"
        - on: [file]
          condition: file.op in ("chmod_exec", "create_exec") and file.dir = "/dev/shm"
"#,
        );
        assert_eq!(
            p.prefixes.get("/dev/shm/"),
            Some(&bits(&[file_op::CHMOD_EXEC, file_op::CREATE_EXEC]))
        );
    }

    /// The EPMM pack confines every file rule: none of its rules is blind.
    #[test]
    fn the_epmm_pack_needs_no_warning() {
        let set = crate::detect::rules::load(&[], true).unwrap();
        let p = derive(&set);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        for place in [
            "/mi/tomcat/webapps/",
            "/etc/cron",
            "/var/log/httpd/",
            "/tmp/",
        ] {
            assert!(p.prefixes.contains_key(place), "{place} not watched");
        }
    }
}
