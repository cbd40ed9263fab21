//! Rules as data: YAML files of lists, macros, web-tier identities, rules, allow-list
//! entries and disables, merged in order (the embedded EPMM pack first, then each
//! `--rules` directory's files by name), then compiled. Every error names
//! `file:line:column`.
//!
//! A later file overrides by name: a list, macro, identity or rule with the same name or
//! id replaces the earlier one; `append` extends a list; `disable` turns rules off by id
//! (globs allowed); `allow` entries suppress alerts of matching rules when their condition
//! holds; an `enforce` entry for an identity replaces the earlier one, or with
//! `append: true` extends it (`enforce.rs`).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use globset::{Glob, GlobSet, GlobSetBuilder};
use marked_yaml::{Marker, Spanned};
use sensor_proto::EventKind;
use serde::Deserialize;

use super::{
    enforce::{EnforceDef, Entry as EnforceEntry, Policy, Shape},
    expr::{self, Cond, Env, ExprError, Macro},
    fields::{Field, Kind},
};

/// The EPMM rule pack, embedded so the agent works with no files at all.
pub const DEFAULT_PACK: &str = include_str!("../../../rules/epmm.yaml");
pub const DEFAULT_PACK_NAME: &str = "<embedded>/rules/epmm.yaml";

/// A problem in a rule file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct RuleError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// All the errors found in a set of files (loading goes on after the first one), one per
/// line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct RuleErrors(pub Vec<RuleError>);

/// Alert severity (THREATS.md 4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "low" | "informational" | "info" => Severity::Low,
            "medium" => Severity::Medium,
            "high" => Severity::High,
            "critical" => Severity::Critical,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

/// A MITRE ATT&CK technique id, `T1059` or `T1059.004`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Technique(String);

impl Technique {
    pub fn parse(s: &str) -> Option<Self> {
        let up = s.trim().to_ascii_uppercase();
        let rest = up.strip_prefix('T')?;
        let (main, sub) = match rest.split_once('.') {
            Some((m, s)) => (m, Some(s)),
            None => (rest, None),
        };
        let digits = |d: &str, n: usize| d.len() == n && d.bytes().all(|b| b.is_ascii_digit());
        (digits(main, 4) && sub.is_none_or(|s| digits(s, 3))).then_some(Technique(up))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// ---- The file format -------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    lists: Vec<ListDef>,
    #[serde(default)]
    append: Vec<ListDef>,
    #[serde(default)]
    macros: Vec<MacroDef>,
    #[serde(default)]
    identities: Vec<IdentityDef>,
    #[serde(default)]
    rules: Vec<RuleDef>,
    #[serde(default)]
    disable: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<AllowDef>,
    #[serde(default)]
    enforce: Vec<EnforceDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListDef {
    name: Spanned<String>,
    items: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MacroDef {
    name: Spanned<String>,
    condition: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityDef {
    name: Spanned<String>,
    /// Tested on exec events; the process that matches is the identity's source.
    condition: Spanned<String>,
    /// A process already in a web-tier lineage takes this identity only as a direct
    /// child of a process running the source's executable, of one of these identities
    /// (the helpers httpd or its workers start). Without
    /// it, only processes outside every lineage can take the identity: a descendant can
    /// never shed or replace the label it inherited.
    #[serde(default)]
    within: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDef {
    id: Spanned<String>,
    title: Spanned<String>,
    severity: Spanned<String>,
    #[serde(default)]
    techniques: Vec<Spanned<String>>,
    #[serde(default)]
    rationale: String,
    #[serde(default)]
    on: Vec<Spanned<String>>,
    condition: Option<Spanned<String>>,
    sequence: Option<SequenceDef>,
    /// With `condition`: the rule fires when the matching events of one key carry this
    /// many distinct values within the window (a fan-out), not on each event.
    threshold: Option<ThresholdDef>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SequenceDef {
    within: Spanned<String>,
    steps: Vec<StepDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ThresholdDef {
    /// The fields whose combined values are counted (e.g. remote address and port).
    distinct: Vec<Spanned<String>>,
    /// How many distinct values make the rule fire (2 to MAX_THRESHOLD).
    count: Spanned<String>,
    within: Spanned<String>,
    /// Whose events are counted together: `tree` (default), `process`, `parent`, or a
    /// field name.
    #[serde(default)]
    key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepDef {
    on: Vec<Spanned<String>>,
    condition: Spanned<String>,
    /// What the steps of one match share: `tree` (default), `process`, `parent`, or a
    /// field name.
    #[serde(default)]
    key: Option<Spanned<String>>,
    /// Values later steps can use as `$name`: name -> field.
    #[serde(default)]
    capture: Vec<CaptureDef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptureDef {
    name: Spanned<String>,
    field: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowDef {
    rules: Vec<Spanned<String>>,
    condition: Spanned<String>,
    #[serde(default)]
    reason: String,
}

// ---- Compiled form ---------------------------------------------------------------------

/// What the steps of a sequence share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// The web-tier ancestor when there is one, else the top of the process tree under
    /// init.
    Tree,
    Process,
    Parent,
    Field(Field),
}

#[derive(Clone, Debug)]
pub struct Step {
    pub on: Vec<EventKind>,
    pub cond: Cond,
    pub key: Key,
    pub captures: Vec<(String, Field)>,
}

/// A fan-out: `count` distinct values of `distinct` among one key's matching events
/// within `within_ns`.
#[derive(Clone, Debug)]
pub struct Threshold {
    pub distinct: Vec<Field>,
    pub count: u32,
    pub within_ns: u64,
    pub key: Key,
}

/// The largest `threshold.count` a rule may ask for: what one key keeps is bounded by it.
pub const MAX_THRESHOLD: u32 = 10_000;

#[derive(Clone, Debug)]
pub enum Body {
    Single {
        on: Vec<EventKind>,
        cond: Cond,
        threshold: Option<Threshold>,
    },
    Sequence {
        within_ns: u64,
        steps: Vec<Step>,
    },
    /// A SigmaHQ rule: its compiled detection lives in `sigma::SigmaSet`.
    Sigma,
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub id: Arc<str>,
    pub title: Arc<str>,
    pub severity: Severity,
    pub techniques: Vec<Technique>,
    pub rationale: Arc<str>,
    /// The file the rule came from.
    pub source: Arc<str>,
    pub body: Body,
}

#[derive(Clone, Debug)]
pub struct Identity {
    pub name: Arc<str>,
    pub cond: Cond,
    /// Identities whose sources may start a process of this one (see `IdentityDef`).
    pub within: Vec<Arc<str>>,
}

#[derive(Clone, Debug)]
pub struct Allow {
    pub rules: GlobSet,
    pub cond: Cond,
    pub reason: String,
}

/// Everything detection needs from the rule files.
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub identities: Vec<Identity>,
    pub allows: Vec<Allow>,
    /// What `--enforce` applies in the kernel (`enforce:` sections).
    pub enforce: Policy,
    /// Files that were loaded, in order.
    pub files: Vec<String>,
}

// ---- Loading ---------------------------------------------------------------------------

/// A source text and its name, with positions mapped back to it.
struct Source<'a> {
    name: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, marker: Option<&Marker>, message: impl Into<String>) -> RuleError {
        let (line, column) = marker.map_or((1, 1), |m| (m.line(), m.column()));
        RuleError {
            file: self.name.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }

    fn at<T>(&self, spanned: &Spanned<T>, message: impl Into<String>) -> RuleError {
        self.error(spanned.span().start(), message)
    }

    /// An error at `offset` inside the condition text `cond`.
    fn in_condition(&self, cond: &Spanned<String>, err: &ExprError) -> RuleError {
        let Some(start) = cond.span().start() else {
            return self.error(None, err.message.clone());
        };
        let (line, column) = locate(self.text, start, cond, err.offset);
        RuleError {
            file: self.name.to_owned(),
            line,
            column,
            message: err.message.clone(),
        }
    }
}

/// The file line and column of byte `offset` of scalar `value`, which starts at `start`.
/// Each line of the value is looked up in the file after the previous one, which works
/// for plain, quoted and block scalars alike.
fn locate(text: &str, start: &Marker, value: &str, offset: usize) -> (usize, usize) {
    let fallback = (start.line(), start.column());
    // Byte position of the scalar's start in the file.
    let mut pos: usize = text
        .split_inclusive('\n')
        .take(start.line().saturating_sub(1))
        .map(str::len)
        .sum();
    pos += text[pos..]
        .chars()
        .take(start.column().saturating_sub(1))
        .map(char::len_utf8)
        .sum::<usize>();
    let mut line_start = 0;
    for piece in value.split_inclusive('\n') {
        let body = piece.trim_end_matches('\n');
        let line_end = line_start + piece.len();
        let Some(found) = text.get(pos..).and_then(|rest| rest.find(body)) else {
            return fallback;
        };
        let at = pos + found;
        if offset < line_end || line_end == value.len() {
            let target = at + offset.saturating_sub(line_start).min(body.len());
            let before = &text[..target];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            return (line, column);
        }
        pos = at + body.len();
        line_start = line_end;
    }
    fallback
}

/// Rule definitions merged from several files, not yet compiled.
#[derive(Default)]
struct Merged {
    lists: HashMap<String, Vec<String>>,
    /// Macro definitions in order of first definition; a redefinition replaces in place.
    macros: Vec<(String, Spanned<String>, usize)>,
    identities: Vec<(String, Spanned<String>, Vec<String>, usize)>,
    rules: Vec<(RuleDef, usize)>,
    disabled: Vec<(Spanned<String>, usize)>,
    allows: Vec<(AllowDef, usize)>,
    /// One per identity: the definition, and the files that made it.
    enforce: Vec<(EnforceDef, Vec<usize>)>,
    sources: Vec<(String, String)>,
}

/// Reads every `*.yaml`/`*.yml` file of each directory (by name) after the default pack,
/// and compiles the result.
pub fn load(dirs: &[PathBuf], with_default: bool) -> Result<RuleSet, RuleErrors> {
    let mut texts = Vec::new();
    if with_default {
        texts.push((DEFAULT_PACK_NAME.to_owned(), DEFAULT_PACK.to_owned()));
    }
    let mut errors = Vec::new();
    for dir in dirs {
        match rule_files(dir) {
            Ok(files) => {
                for file in files {
                    match read_rule_file(&file) {
                        Ok(text) => texts.push((file.display().to_string(), text)),
                        Err(message) => errors.push(RuleError {
                            file: file.display().to_string(),
                            line: 1,
                            column: 1,
                            message,
                        }),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    match compile_texts(&texts) {
        Ok(set) if errors.is_empty() => Ok(set),
        Ok(_) => Err(RuleErrors(errors)),
        Err(RuleErrors(more)) => {
            errors.extend(more);
            Err(RuleErrors(errors))
        }
    }
}

/// Largest rule file read: parsing holds the whole document, with positions, in memory,
/// so the bound on a file is what bounds the memory a rule directory can cost.
pub const MAX_RULE_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Reads a rule file, refusing one larger than [`MAX_RULE_FILE_BYTES`] before reading it.
pub fn read_rule_file(file: &Path) -> Result<String, String> {
    let len = std::fs::metadata(file)
        .map_err(|e| format!("cannot read: {e}"))?
        .len();
    if len > MAX_RULE_FILE_BYTES {
        return Err(format!(
            "the file is {len} bytes; rule files are limited to {MAX_RULE_FILE_BYTES} bytes (16 MiB): split it, or move long lists to several files with `append`"
        ));
    }
    std::fs::read_to_string(file).map_err(|e| format!("cannot read: {e}"))
}

/// The rule files of `dir` (or `dir` itself when it is a file), sorted.
pub fn rule_files(dir: &Path) -> Result<Vec<PathBuf>, RuleError> {
    let err = |message: String| RuleError {
        file: dir.display().to_string(),
        line: 1,
        column: 1,
        message,
    };
    if dir.is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| err(format!("cannot read directory: {e}")))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Parses and compiles named texts, in order.
pub fn compile_texts(texts: &[(String, String)]) -> Result<RuleSet, RuleErrors> {
    let mut merged = Merged::default();
    let mut errors = Vec::new();
    for (index, (name, text)) in texts.iter().enumerate() {
        merged.sources.push((name.clone(), text.clone()));
        let src = Source { name, text };
        let file: RuleFile = if text.trim().is_empty() {
            RuleFile::default()
        } else {
            match marked_yaml::from_yaml(index, text) {
                Ok(f) => f,
                Err(e) => {
                    errors.push(yaml_error(&src, &e));
                    continue;
                }
            }
        };
        merge(&mut merged, file, index, &src, &mut errors);
    }
    // Compile what parsed even after errors, so that one run reports every problem.
    let set = compile(&mut merged, &mut errors);
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(RuleErrors(errors))
    }
}

fn yaml_error(src: &Source<'_>, e: &marked_yaml::FromYamlError) -> RuleError {
    use marked_yaml::{FromYamlError, LoadError};
    match e {
        FromYamlError::ParseYaml(load) => {
            let marker = match load {
                LoadError::TopLevelMustBeMapping(m)
                | LoadError::TopLevelMustBeSequence(m)
                | LoadError::UnexpectedAnchor(m)
                | LoadError::MappingKeyMustBeScalar(m)
                | LoadError::UnexpectedTag(m)
                | LoadError::ScanError(m, _) => Some(*m),
                LoadError::DuplicateKey(inner) => inner.key.span().start().copied(),
            };
            src.error(marker.as_ref(), format!("invalid YAML: {load}"))
        }
        FromYamlError::FromNode(node) => {
            let path = node
                .path()
                .map(|p| format!(" (at {p})"))
                .unwrap_or_default();
            src.error(node.start_mark().as_ref(), format!("{}{path}", **node))
        }
    }
}

fn merge(
    m: &mut Merged,
    file: RuleFile,
    index: usize,
    src: &Source<'_>,
    errors: &mut Vec<RuleError>,
) {
    for list in file.lists {
        m.lists.insert(list.name.to_string(), list.items);
    }
    for list in file.append {
        match m.lists.get_mut(list.name.as_str()) {
            Some(items) => items.extend(list.items),
            None => errors.push(src.at(
                &list.name,
                format!("append to unknown list `{}`", *list.name),
            )),
        }
    }
    for mac in file.macros {
        let name = mac.name.to_string();
        if Field::by_name(&name).is_some() || matches!(name.as_str(), "and" | "or" | "not" | "in") {
            errors.push(src.at(
                &mac.name,
                format!("macro name `{name}` is a field or keyword"),
            ));
            continue;
        }
        match m.macros.iter_mut().find(|(n, ..)| *n == name) {
            Some(slot) => {
                slot.1 = mac.condition;
                slot.2 = index;
            }
            None => m.macros.push((name, mac.condition, index)),
        }
    }
    for ident in file.identities {
        let name = ident.name.to_string();
        let within: Vec<String> = ident.within.iter().map(|w| w.to_string()).collect();
        match m.identities.iter_mut().find(|(n, ..)| *n == name) {
            Some(slot) => {
                slot.1 = ident.condition;
                slot.2 = within;
                slot.3 = index;
            }
            None => m.identities.push((name, ident.condition, within, index)),
        }
    }
    for rule in file.rules {
        match m.rules.iter_mut().find(|(r, _)| *r.id == *rule.id) {
            Some(slot) => *slot = (rule, index),
            None => m.rules.push((rule, index)),
        }
    }
    m.disabled
        .extend(file.disable.into_iter().map(|d| (d, index)));
    m.allows.extend(file.allow.into_iter().map(|a| (a, index)));
    for def in file.enforce {
        match m
            .enforce
            .iter_mut()
            .find(|(e, _)| *e.identity == *def.identity)
        {
            Some((earlier, files)) if def.append => {
                if let Some(more) = def.allow {
                    earlier.allow.get_or_insert_with(Vec::new).extend(more);
                }
                earlier.deny.extend(def.deny);
                if !def.rationale.is_empty() {
                    earlier.rationale = def.rationale;
                }
                files.push(index);
            }
            Some(slot) => *slot = (def, vec![index]),
            None if def.append => errors.push(src.at(
                &def.identity,
                format!(
                    "`append` to the enforcement of `{}`, which no earlier file defines",
                    *def.identity
                ),
            )),
            None => m.enforce.push((def, vec![index])),
        }
    }
}

fn event_kinds(
    on: &[Spanned<String>],
    src: &Source<'_>,
    errors: &mut Vec<RuleError>,
) -> Vec<EventKind> {
    on.iter()
        .filter_map(|k| match EventKind::parse(k) {
            Some(kind) => Some(kind),
            None => {
                let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.name()).collect();
                errors.push(src.at(
                    k,
                    format!("unknown event kind `{}`; one of: {}", **k, names.join(", ")),
                ));
                None
            }
        })
        .collect()
}

/// `5s`, `500ms`, `2m`, `1h` in nanoseconds.
/// A sequence step's or threshold's `key:`; `at` places the error when there is none.
fn parse_key(
    key: Option<&Spanned<String>>,
    at: &Spanned<String>,
    s: &Source<'_>,
    errors: &mut Vec<RuleError>,
) -> Option<Key> {
    Some(match key.map(|k| k.as_str()) {
        None | Some("tree") => Key::Tree,
        Some("process") => Key::Process,
        Some("parent") => Key::Parent,
        Some(name) => match Field::by_name(name) {
            Some((f, Kind::Int | Kind::Str, _)) => Key::Field(f),
            _ => {
                errors.push(s.at(
                    key.unwrap_or(at),
                    format!(
                        "key `{name}` is not tree, process, parent or a string or number field"
                    ),
                ));
                return None;
            }
        },
    })
}

/// A rule's `threshold:`, checked against the event kinds of its `on:`.
fn parse_threshold(
    def: &ThresholdDef,
    on: &[EventKind],
    s: &Source<'_>,
    errors: &mut Vec<RuleError>,
) -> Option<Threshold> {
    let before = errors.len();
    let within_ns = parse_duration(&def.within);
    if within_ns.is_none() {
        errors.push(s.at(
            &def.within,
            format!("`{}` is not a duration like 5s, 500ms, 2m", *def.within),
        ));
    }
    let count = def
        .count
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (2..=MAX_THRESHOLD).contains(n));
    if count.is_none() {
        errors.push(s.at(
            &def.count,
            format!(
                "count `{}` is not a number from 2 to {MAX_THRESHOLD}",
                *def.count
            ),
        ));
    }
    if def.distinct.is_empty() {
        errors.push(s.at(
            &def.within,
            "a threshold needs `distinct:` (the fields counted)",
        ));
    }
    let mut distinct = Vec::new();
    for name in &def.distinct {
        match Field::by_name(name) {
            Some((f, Kind::Int | Kind::Str, kinds)) if on.iter().all(|k| kinds.contains(k)) => {
                distinct.push(f)
            }
            Some((_, Kind::Int | Kind::Str, _)) => errors.push(s.at(
                name,
                format!(
                    "`{}` is not set on every event kind of the rule's `on:`",
                    **name
                ),
            )),
            _ => errors.push(s.at(
                name,
                format!(
                    "distinct needs string or number fields; `{}` is not one",
                    **name
                ),
            )),
        }
    }
    let key = parse_key(def.key.as_ref(), &def.within, s, errors);
    if errors.len() > before {
        return None;
    }
    Some(Threshold {
        distinct,
        count: count?,
        within_ns: within_ns?,
        key: key?,
    })
}

/// A duration like `500ms`, `5s`, `2m`, `12h`, `7d` or `1h 30m` (humantime), in
/// nanoseconds (never 0, at most u64::MAX).
pub fn parse_duration(s: &str) -> Option<u64> {
    let d = humantime::parse_duration(s.trim()).ok()?;
    u64::try_from(d.as_nanos()).ok().filter(|v| *v > 0)
}

fn compile(m: &mut Merged, errors: &mut Vec<RuleError>) -> RuleSet {
    let src = |index: usize| Source {
        name: &m.sources[index].0,
        text: &m.sources[index].1,
    };
    // Lists are shared by the conditions that use them whole (expr.rs).
    // Moved, not copied: a list's strings exist once.
    let lists: HashMap<String, Arc<[String]>> = std::mem::take(&mut m.lists)
        .into_iter()
        .map(|(name, items)| (name, Arc::from(items)))
        .collect();
    let m = &*m;
    // Macros, in order; each may use the ones before it; compiled once, shared.
    let mut macros: HashMap<String, Arc<Macro>> = HashMap::new();
    for (name, cond_text, index) in &m.macros {
        let env = Env::new(&lists, &macros);
        match expr::compile(cond_text, &env) {
            Ok(cond) => {
                let n = macros.len();
                macros.insert(name.clone(), Macro::numbered(cond, n));
            }
            Err(e) => errors.push(src(*index).in_condition(cond_text, &e)),
        }
    }
    let exec_on = [EventKind::Exec];
    let identities: Vec<Identity> = m
        .identities
        .iter()
        .filter_map(|(name, cond_text, within, index)| {
            let env = Env::new(&lists, &macros).on(&exec_on);
            match expr::compile(cond_text, &env) {
                Ok(cond) => Some(Identity {
                    name: name.as_str().into(),
                    cond,
                    within: within.iter().map(|w| w.as_str().into()).collect(),
                }),
                Err(e) => {
                    errors.push(src(*index).in_condition(cond_text, &e));
                    None
                }
            }
        })
        .collect();

    // Disables: ids or globs over ids.
    let mut disabled = GlobSetBuilder::new();
    for (pattern, index) in &m.disabled {
        match Glob::new(pattern) {
            Ok(g) => {
                disabled.add(g);
            }
            Err(e) => errors.push(src(*index).at(pattern, format!("bad rule id pattern: {e}"))),
        }
    }
    let disabled = disabled.build().unwrap_or_else(|_| GlobSet::empty());

    let mut rules = Vec::new();
    for (def, index) in &m.rules {
        let s = src(*index);
        if !def.enabled || disabled.is_match(def.id.as_str()) {
            continue;
        }
        if let Some(rule) = compile_rule(def, &s, &lists, &macros, errors) {
            rules.push(rule);
        }
    }

    let mut allows = Vec::new();
    for (def, index) in &m.allows {
        let s = src(*index);
        let mut set = GlobSetBuilder::new();
        for pattern in &def.rules {
            match Glob::new(pattern) {
                Ok(g) => {
                    set.add(g);
                }
                Err(e) => errors.push(s.at(pattern, format!("bad rule id pattern: {e}"))),
            }
        }
        let env = Env::new(&lists, &macros);
        match expr::compile(&def.condition, &env) {
            Ok(cond) => allows.push(Allow {
                rules: set.build().unwrap_or_else(|_| GlobSet::empty()),
                cond,
                reason: def.reason.clone(),
            }),
            Err(e) => errors.push(s.in_condition(&def.condition, &e)),
        }
    }

    let enforce = compile_enforce(m, &identities, errors);
    for entry in &enforce.entries {
        let on = [EventKind::Exec, EventKind::ExecFailed];
        let text = format!("enforce.rule = \"{}\"", entry.rule_id());
        let env = Env::new(&lists, &macros).on(&on);
        if let Ok(cond) = expr::compile(&text, &env) {
            rules.push(Rule {
                id: entry.rule_id().into(),
                title: entry.title().into(),
                severity: Severity::Critical,
                techniques: vec![Technique("T1190".to_owned())],
                rationale: entry.rationale.trim().into(),
                source: entry.source.clone(),
                body: Body::Single {
                    on: on.to_vec(),
                    cond,
                    threshold: None,
                },
            });
        }
    }

    // The whole set's cost per event is bounded too, not only each condition's.
    let total = rules
        .iter()
        .flat_map(|r| match &r.body {
            Body::Single { cond, .. } => vec![cond],
            Body::Sequence { steps, .. } => steps.iter().map(|s| &s.cond).collect(),
            Body::Sigma => Vec::new(),
        })
        .chain(identities.iter().map(|i| &i.cond))
        .chain(allows.iter().map(|a| &a.cond))
        .fold(0u64, |sum, c| sum.saturating_add(c.weight()));
    if total > expr::MAX_TOTAL_WEIGHT
        && let Some((name, _)) = m.sources.last()
    {
        errors.push(RuleError {
            file: name.clone(),
            line: 1,
            column: 1,
            message: format!(
                "the rules loaded stand for {total} comparisons per event once their macros are expanded; the limit is {}",
                expr::MAX_TOTAL_WEIGHT
            ),
        });
    }

    RuleSet {
        rules,
        identities,
        allows,
        enforce,
        files: m.sources.iter().map(|(n, _)| n.clone()).collect(),
    }
}

/// The `enforce:` entries, each checked: a known identity, known shapes, absolute paths.
fn compile_enforce(m: &Merged, identities: &[Identity], errors: &mut Vec<RuleError>) -> Policy {
    let mut entries = Vec::new();
    for (def, files) in &m.enforce {
        let last = *files.last().unwrap_or(&0);
        let s = Source {
            name: &m.sources[last].0,
            text: &m.sources[last].1,
        };
        let before = errors.len();
        if !identities.iter().any(|i| *i.name == **def.identity) {
            errors.push(s.at(
                &def.identity,
                format!(
                    "enforcement for unknown identity `{}`; the identities are: {}",
                    *def.identity,
                    identities
                        .iter()
                        .map(|i| &*i.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let mut deny = Vec::new();
        for shape in &def.deny {
            match Shape::parse(shape) {
                Some(sh) if !deny.contains(&sh) => deny.push(sh),
                Some(_) => {}
                None => errors.push(s.at(
                    shape,
                    format!(
                        "unknown shape `{}`; one of: {}",
                        **shape,
                        Shape::ALL.map(Shape::name).join(", ")
                    ),
                )),
            }
        }
        deny.sort();
        for path in def.allow.iter().flatten() {
            if !path.starts_with('/') {
                errors.push(s.at(
                    path,
                    format!("`{}`: an allowed executable is an absolute path", **path),
                ));
            }
        }
        if errors.len() > before {
            continue;
        }
        if entries.len() as u32 + 1 >= sensor_common::enforce::MAX_LABELS {
            errors.push(s.at(
                &def.identity,
                format!(
                    "more than {} enforced identities",
                    sensor_common::enforce::MAX_LABELS - 2
                ),
            ));
            break;
        }
        entries.push(EnforceEntry {
            identity: def.identity.as_str().into(),
            label: entries.len() as u32 + 1,
            allow: def
                .allow
                .as_ref()
                .map(|l| l.iter().map(|p| p.to_string()).collect()),
            deny,
            rationale: def.rationale.trim().to_owned(),
            source: files
                .iter()
                .map(|i| m.sources[*i].0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
                .into(),
        });
    }
    Policy { entries }
}

/// What compiling one file's rules needs: the file, its lists and macros, and where
/// errors go.
struct RuleCx<'x> {
    s: &'x Source<'x>,
    lists: &'x HashMap<String, Arc<[String]>>,
    macros: &'x HashMap<String, Arc<Macro>>,
    errors: &'x mut Vec<RuleError>,
}

impl RuleCx<'_> {
    fn error(&mut self, at: &Spanned<String>, message: impl Into<String>) {
        let e = self.s.at(at, message);
        self.errors.push(e);
    }

    fn env<'e>(&'e self, on: &'e [EventKind]) -> Env<'e> {
        Env::new(self.lists, self.macros).on(on)
    }
}

fn compile_rule(
    def: &RuleDef,
    s: &Source<'_>,
    lists: &HashMap<String, Arc<[String]>>,
    macros: &HashMap<String, Arc<Macro>>,
    errors: &mut Vec<RuleError>,
) -> Option<Rule> {
    let before = errors.len();
    let mut cx = RuleCx {
        s,
        lists,
        macros,
        errors,
    };
    let severity = Severity::parse(&def.severity);
    if severity.is_none() {
        cx.error(
            &def.severity,
            format!(
                "severity `{}` is not one of low, medium, high, critical",
                *def.severity
            ),
        );
    }
    let techniques = compile_techniques(def, &mut cx);
    let body = match (&def.condition, &def.sequence) {
        (Some(cond_text), None) => compile_single(def, cond_text, &mut cx)?,
        (None, Some(_)) if def.threshold.is_some() => {
            cx.error(
                &def.id,
                "`threshold` goes with `condition`; a sequence cannot have one",
            );
            return None;
        }
        (None, Some(seq)) => compile_sequence(def, seq, &mut cx)?,
        (Some(_), Some(_)) => {
            cx.error(
                &def.id,
                "a rule has either `condition` or `sequence`, not both",
            );
            return None;
        }
        (None, None) => {
            cx.error(&def.id, "a rule needs a `condition` or a `sequence`");
            return None;
        }
    };
    if cx.errors.len() > before {
        return None;
    }
    Some(Rule {
        id: def.id.as_str().into(),
        title: def.title.as_str().into(),
        severity: severity?,
        techniques,
        rationale: def.rationale.trim().into(),
        source: s.name.into(),
        body,
    })
}

fn compile_techniques(def: &RuleDef, cx: &mut RuleCx<'_>) -> Vec<Technique> {
    def.techniques
        .iter()
        .filter_map(|t| {
            let parsed = Technique::parse(t);
            if parsed.is_none() {
                cx.error(
                    t,
                    format!(
                        "`{}` is not an ATT&CK technique id (T1234 or T1234.567)",
                        **t
                    ),
                );
            }
            parsed
        })
        .collect()
}

/// `on:` + `condition:` (+ `threshold:`).
fn compile_single(def: &RuleDef, cond_text: &Spanned<String>, cx: &mut RuleCx<'_>) -> Option<Body> {
    if def.on.is_empty() {
        cx.error(&def.id, "a rule needs `on:` (the event kinds it tests)");
        return None;
    }
    let on = event_kinds(&def.on, cx.s, cx.errors);
    let threshold = match &def.threshold {
        Some(t) => Some(parse_threshold(t, &on, cx.s, cx.errors)?),
        None => None,
    };
    match expr::compile(cond_text, &cx.env(&on)) {
        Ok(cond) => Some(Body::Single {
            on,
            cond,
            threshold,
        }),
        Err(e) => {
            let e = cx.s.in_condition(cond_text, &e);
            cx.errors.push(e);
            None
        }
    }
}

/// `sequence:` with `within:` and two or more steps; each step may use the captures of
/// the steps before it.
fn compile_sequence(def: &RuleDef, seq: &SequenceDef, cx: &mut RuleCx<'_>) -> Option<Body> {
    let Some(within_ns) = parse_duration(&seq.within) else {
        cx.error(
            &seq.within,
            format!("`{}` is not a duration like 5s, 500ms, 2m", *seq.within),
        );
        return None;
    };
    if seq.steps.len() < 2 {
        cx.error(&def.id, "a sequence needs at least two steps");
        return None;
    }
    let mut vars: Vec<String> = Vec::new();
    let steps = seq
        .steps
        .iter()
        .filter_map(|step| compile_step(step, &mut vars, cx))
        .collect();
    Some(Body::Sequence { within_ns, steps })
}

fn compile_step(step: &StepDef, vars: &mut Vec<String>, cx: &mut RuleCx<'_>) -> Option<Step> {
    let on = event_kinds(&step.on, cx.s, cx.errors);
    if on.is_empty() {
        cx.error(&step.condition, "each step needs `on:`");
        return None;
    }
    let cond = match expr::compile(&step.condition, &cx.env(&on).vars(vars)) {
        Ok(c) => c,
        Err(e) => {
            let e = cx.s.in_condition(&step.condition, &e);
            cx.errors.push(e);
            return None;
        }
    };
    let key = parse_key(step.key.as_ref(), &step.condition, cx.s, cx.errors)?;
    let mut captures = Vec::new();
    for cap in &step.capture {
        match Field::by_name(&cap.field) {
            Some((f, Kind::Str | Kind::Int, _)) => {
                captures.push((cap.name.to_string(), f));
                vars.push(cap.name.to_string());
            }
            _ => cx.error(
                &cap.field,
                format!(
                    "capture needs a string or number field; `{}` is not one",
                    *cap.field
                ),
            ),
        }
    }
    Some(Step {
        on,
        cond,
        key,
        captures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Result<RuleSet, RuleErrors> {
        compile_texts(&[("t.yaml".to_owned(), text.to_owned())])
    }

    #[test]
    fn the_default_pack_compiles() {
        let set = compile_texts(&[(DEFAULT_PACK_NAME.into(), DEFAULT_PACK.into())])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(set.rules.len() >= 20, "{} rules", set.rules.len());
        assert!(set.identities.len() >= 3);
        for rule in &set.rules {
            assert!(!rule.techniques.is_empty(), "{} has no technique", rule.id);
            assert!(!rule.rationale.is_empty(), "{} has no rationale", rule.id);
        }
    }

    /// Rules that can only match a web-tier process are found as such (and only those):
    /// the engine skips them for every other process.
    #[test]
    fn rules_that_need_a_web_tier_lineage_are_recognised() {
        let set = compile_texts(&[(DEFAULT_PACK_NAME.into(), DEFAULT_PACK.into())]).unwrap();
        let needs = |id: &str| {
            let rule = set.rules.iter().find(|r| &*r.id == id).unwrap();
            match &rule.body {
                Body::Single { cond, .. } => cond.needs_lineage(),
                _ => panic!("{id} is not a single-event rule"),
            }
        };
        for id in [
            "EPMM-B1",
            "EPMM-B2",
            "EPMM-B3",
            "EPMM-B6",
            "EPMM-B11",
            "EPMM-B18-EXEC",
        ] {
            assert!(needs(id), "{id} asks for the web tier");
        }
        for id in [
            "EPMM-B7",
            "EPMM-B12",
            "EPMM-B16",
            "EPMM-B17",
            "EPMM-B21",
            "EPMM-B5-WRITTEN",
        ] {
            assert!(!needs(id), "{id} can match any process");
        }
        let one = |cond: &str| {
            let text = format!(
                "rules:\n  - id: T\n    title: t\n    severity: low\n    techniques: [T1059]\n    on: [exec]\n    condition: {cond}\n"
            );
            let set = compile_texts(&[("t.yaml".into(), text)]).unwrap();
            match &set.rules[0].body {
                Body::Single { cond, .. } => cond.needs_lineage(),
                _ => unreachable!(),
            }
        };
        assert!(one("lineage.tainted and proc.uid = 0"));
        assert!(one(
            "lineage.identity in (\"tomcat\", \"httpd\") or (lineage.tainted and proc.uid = 0)"
        ));
        assert!(
            !one("lineage.identity = \"\""),
            "matches processes without a lineage"
        );
        assert!(!one("not lineage.tainted"));
        assert!(!one("lineage.tainted or proc.uid = 0"));
        assert!(!one("lineage.identity != \"tomcat\""));
    }

    #[test]
    fn enforcement_compiles_overrides_and_refuses_what_it_cannot_apply() {
        let pack = (DEFAULT_PACK_NAME.to_owned(), DEFAULT_PACK.to_owned());
        let set = compile_texts(std::slice::from_ref(&pack)).unwrap();
        let helper = set.enforce.by_identity("rewritemap-helper").unwrap();
        assert_eq!(helper.label, 1);
        assert!(
            helper
                .allow
                .as_ref()
                .unwrap()
                .contains(&"/usr/bin/date".to_owned())
        );
        let tomcat = set.enforce.by_identity("tomcat").unwrap();
        assert_eq!(tomcat.allow, None, "tomcat has no allow list");
        assert_eq!(
            tomcat.flags(),
            sensor_common::enforce::DENY_SOCKET_STDIO
                | sensor_common::enforce::DENY_UNLINKED
                | sensor_common::enforce::DENY_TMP_WRITTEN
        );
        assert!(set.rules.iter().any(|r| &*r.id == "enforce:tomcat"));

        // An operator's file extends the helper's allow list.
        let local = "enforce:\n  - identity: rewritemap-helper\n    append: true\n    allow: [/usr/bin/sha256sum]\n";
        let set = compile_texts(&[pack.clone(), ("local.yaml".into(), local.into())]).unwrap();
        let helper = set.enforce.by_identity("rewritemap-helper").unwrap();
        let allow = helper.allow.as_ref().unwrap();
        assert!(
            allow.contains(&"/usr/bin/date".to_owned())
                && allow.contains(&"/usr/bin/sha256sum".to_owned())
        );
        assert!(helper.source.contains("local.yaml"), "{}", helper.source);
        // Without append it replaces: no allow list any more.
        let local = "enforce:\n  - identity: rewritemap-helper\n    deny: [unlinked]\n";
        let set = compile_texts(&[pack.clone(), ("local.yaml".into(), local.into())]).unwrap();
        let helper = set.enforce.by_identity("rewritemap-helper").unwrap();
        assert_eq!(
            (helper.allow.clone(), helper.flags()),
            (None, sensor_common::enforce::DENY_UNLINKED)
        );

        // Errors name the file, line and column.
        let bad = "enforce:\n  - identity: nginx\n    deny: [reverse_shell]\n    allow: [date]\n";
        let err = compile_texts(&[pack.clone(), ("bad.yaml".into(), bad.into())]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("bad.yaml:2:15: enforcement for unknown identity `nginx`"),
            "{text}"
        );
        assert!(
            text.contains("bad.yaml:3:12: unknown shape `reverse_shell`"),
            "{text}"
        );
        assert!(
            text.contains("bad.yaml:4:13: `date`: an allowed executable is an absolute path"),
            "{text}"
        );
        let orphan = "enforce:\n  - identity: httpd\n    append: true\n    allow: [/bin/x]\n";
        let err = compile_texts(&[pack, ("o.yaml".into(), orphan.into())]).unwrap_err();
        assert!(
            err.to_string()
                .contains("`append` to the enforcement of `httpd`"),
            "{err}"
        );
    }

    #[test]
    fn condition_errors_have_file_line_and_column() {
        let text = "rules:\n  - id: X-1\n    title: t\n    severity: high\n    on: [exec]\n    condition: proc.name = \"sh\" and proc.nme = \"x\"\n";
        let err = one(text).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(
            err.to_string(),
            "t.yaml:6:37: unknown field or macro `proc.nme`"
        );
    }

    #[test]
    fn block_scalar_conditions_are_located() {
        let text = "macros:\n  - name: m\n    condition: |\n      proc.name = \"sh\"\n      and bogus.field = 1\n";
        let err = one(text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.yaml:5:11: unknown field or macro `bogus.field`"
        );
    }

    #[test]
    fn structural_errors_are_located() {
        let err = one("rules:\n  - id: X\n    title: t\n    severity: urgent\n    on: [exec]\n    condition: proc.uid = 0\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.yaml:4:15: severity `urgent` is not one of low, medium, high, critical"
        );
        let err = one("rules:\n  - id: X\n    title: t\n    severity: low\n    on: [exek]\n    condition: proc.uid = 0\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("t.yaml:5:10: unknown event kind `exek`"),
            "{err}"
        );
        let err = one("rules:\n  - id: X\n    titel: t\n").unwrap_err();
        assert!(err.to_string().starts_with("t.yaml:3:"), "{err}");
        assert!(err.to_string().contains("titel"), "{err}");
        let err = one("rules: [\n").unwrap_err();
        assert!(err.to_string().starts_with("t.yaml:"), "{err}");
        let err = one("rules:\n  - id: X\n    title: t\n    severity: low\n    techniques: [T59]\n    on: [exec]\n    condition: proc.uid = 0\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.yaml:5:18: `T59` is not an ATT&CK technique id (T1234 or T1234.567)"
        );
    }

    #[test]
    fn thresholds_compile_and_bad_ones_are_located() {
        let rule = |threshold: &str| {
            format!(
                "rules:\n  - id: S\n    title: t\n    severity: high\n    on: [connect]\n    condition: net.result != 0\n    threshold:\n{threshold}"
            )
        };
        let set = one(&rule(
            "      distinct: [net.remote_addr, net.remote_port]\n      count: 16\n      within: 10s\n      key: process\n",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let Body::Single {
            threshold: Some(t), ..
        } = &set.rules[0].body
        else {
            panic!("no threshold");
        };
        assert_eq!(
            (t.count, t.within_ns, t.key),
            (16, 10_000_000_000, Key::Process)
        );
        assert_eq!(t.distinct.len(), 2);

        let err = |threshold: &str| one(&rule(threshold)).unwrap_err().to_string();
        assert_eq!(
            err("      distinct: [net.remote_port]\n      count: 1\n      within: 10s\n"),
            "t.yaml:9:14: count `1` is not a number from 2 to 10000"
        );
        assert_eq!(
            err("      distinct: [net.remote_port]\n      count: many\n      within: 10s\n"),
            "t.yaml:9:14: count `many` is not a number from 2 to 10000"
        );
        assert_eq!(
            err("      distinct: [net.remote_port]\n      count: 5\n      within: soon\n"),
            "t.yaml:10:15: `soon` is not a duration like 5s, 500ms, 2m"
        );
        assert_eq!(
            err("      distinct: [file.path]\n      count: 5\n      within: 1s\n"),
            "t.yaml:8:18: `file.path` is not set on every event kind of the rule's `on:`"
        );
        assert_eq!(
            err("      distinct: [net.remote_public]\n      count: 5\n      within: 1s\n"),
            "t.yaml:8:18: distinct needs string or number fields; `net.remote_public` is not one"
        );
        assert!(
            err("      distinct: []\n      count: 5\n      within: 1s\n")
                .contains("a threshold needs `distinct:`")
        );
        assert!(
            err("      distinct: [net.remote_port]\n      count: 5\n      within: 1s\n      key: nowhere\n")
                .contains("key `nowhere` is not tree, process, parent")
        );
        // A sequence cannot carry one.
        let seq = "rules:\n  - id: Q\n    title: t\n    severity: high\n    sequence:\n      within: 5s\n      steps:\n        - on: [exec]\n          condition: proc.uid = 0\n        - on: [exec]\n          condition: proc.uid = 0\n    threshold:\n      distinct: [proc.name]\n      count: 3\n      within: 1s\n";
        assert!(
            one(seq)
                .unwrap_err()
                .to_string()
                .contains("`threshold` goes with `condition`"),
        );
    }

    #[test]
    fn later_files_override_disable_and_extend() {
        let base = "lists:\n  - name: shells\n    items: [sh]\nrules:\n  - id: A\n    title: a\n    severity: low\n    techniques: [T1059]\n    rationale: r\n    on: [exec]\n    condition: proc.name in (shells)\n  - id: B\n    title: b\n    severity: low\n    on: [exec]\n    condition: proc.uid = 0\n";
        let over = "append:\n  - name: shells\n    items: [bash]\nrules:\n  - id: A\n    title: replaced\n    severity: critical\n    on: [exec]\n    condition: proc.name in (shells)\ndisable: [B]\n";
        let set = compile_texts(&[
            ("a.yaml".into(), base.into()),
            ("b.yaml".into(), over.into()),
        ])
        .unwrap();
        assert_eq!(set.rules.len(), 1);
        assert_eq!(&*set.rules[0].title, "replaced");
        assert_eq!(set.rules[0].severity, Severity::Critical);
        assert_eq!(&*set.rules[0].source, "b.yaml");
        let err = compile_texts(&[(
            "a.yaml".into(),
            "append:\n  - name: nosuch\n    items: [x]\n".into(),
        )])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "a.yaml:2:11: append to unknown list `nosuch`"
        );
    }

    #[test]
    fn sequences_compile_with_captures() {
        let text = "rules:\n  - id: S\n    title: s\n    severity: high\n    sequence:\n      within: 60s\n      steps:\n        - on: [file]\n          condition: file.op = \"chmod_exec\"\n          capture:\n            - name: payload\n              field: file.path\n        - on: [exec]\n          condition: proc.exe = $payload\n";
        let set = one(text).unwrap();
        let Body::Sequence { within_ns, steps } = &set.rules[0].body else {
            panic!()
        };
        assert_eq!(*within_ns, 60_000_000_000);
        assert_eq!(
            steps[0].captures,
            vec![("payload".to_owned(), Field::FilePath)]
        );
        let bad = text.replace("$payload", "$nope");
        let err = one(&bad).unwrap_err();
        assert!(err.to_string().contains("`$nope` is not captured"), "{err}");
    }

    #[test]
    fn techniques_and_durations() {
        assert!(Technique::parse("t1059.004").is_some());
        assert!(Technique::parse("T1059").is_some());
        assert!(Technique::parse("T105").is_none());
        assert!(Technique::parse("T1059.04").is_none());
        assert_eq!(parse_duration("5s"), Some(5_000_000_000));
        assert_eq!(parse_duration("250ms"), Some(250_000_000));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("1h 30m"), Some(5_400_000_000_000));
        assert_eq!(parse_duration("5 parsecs"), None);
        assert_eq!(parse_duration("600000000d"), None, "beyond u64 nanoseconds");
    }
}
