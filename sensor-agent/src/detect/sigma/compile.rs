//! A Sigma rule's `detection` compiled into our matcher's terms: a condition over named
//! selections, a selection an "any of" its groups, a group an "all of" its field tests,
//! a field test an "any of" (or, with `|all`, "all of") its values. String values become
//! literals (exact, prefix, suffix, substring) that the shared matcher finds for every
//! rule at once, or, when a value has wildcards inside, a glob matched on its own.
//!
//! Semantics follow the Sigma specification as `sigma-rust` (our reference in the
//! differential test) implements it: comparisons are case-insensitive unless `|cased`,
//! `*` and `?` are wildcards and `\` escapes them, a field missing from the event makes
//! every comparison on it false (`|exists: false` true), numbers compare with numbers
//! only. A rule we cannot compile exactly is refused with the reason, never half-compiled.

use std::{cmp::Ordering, collections::HashMap, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD_NO_PAD};
use cidr::IpCidr;
use regex::Regex;
use serde_norway::Value as Yaml;

use super::view::{Category, SigmaField};

/// Why a rule is not loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A valid rule that needs what our events do not have.
    Unsupported(String),
    /// Not a valid Sigma rule.
    Invalid(String),
}

fn invalid<T>(reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::Invalid(reason.into()))
}

fn unsupported<T>(reason: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal::Unsupported(reason.into()))
}

/// A YAML scalar of a rule, as Sigma types it.
#[derive(Clone, Debug, PartialEq)]
pub enum Base {
    Str(String),
    Int(i64),
    Unsigned(u64),
    Float(f64),
    Bool(bool),
    Null,
}

impl Base {
    fn from_yaml(v: &Yaml) -> Option<Self> {
        Some(match v {
            Yaml::Bool(b) => Base::Bool(*b),
            Yaml::Null => Base::Null,
            Yaml::String(s) => Base::Str(s.clone()),
            Yaml::Number(n) => {
                if let Some(i) = n.as_i64() {
                    Base::Int(i)
                } else if let Some(u) = n.as_u64() {
                    Base::Unsigned(u)
                } else {
                    Base::Float(n.as_f64()?)
                }
            }
            _ => return None,
        })
    }

    /// The text of a value used as a field name (`|fieldref`).
    fn text(&self) -> String {
        match self {
            Base::Str(s) => s.clone(),
            Base::Int(i) => i.to_string(),
            Base::Unsigned(u) => u.to_string(),
            Base::Float(f) => f.to_string(),
            Base::Bool(b) => b.to_string(),
            Base::Null => String::new(),
        }
    }
}

/// Where a literal must occur in the (lowercased unless cased) field text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Place {
    Exact,
    Prefix,
    Suffix,
    Anywhere,
}

/// One element of a glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tok {
    Star,
    One,
    Text(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Contains,
    StartsWith,
    EndsWith,
    Lt,
    Lte,
    Gt,
    Gte,
    Re,
    Cidr,
}

impl Op {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "contains" => Op::Contains,
            "startswith" => Op::StartsWith,
            "endswith" => Op::EndsWith,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "re" => Op::Re,
            "cidr" => Op::Cidr,
            _ => return None,
        })
    }

    fn is_order(self) -> bool {
        matches!(self, Op::Lt | Op::Lte | Op::Gt | Op::Gte)
    }
}

/// One value of a field test.
#[derive(Clone, Debug)]
pub enum Atom {
    /// A literal found by the shared matcher: its id.
    Lit(u32),
    /// True whenever the field has a value (`*`, or an empty prefix/suffix/substring).
    Present,
    /// A value with wildcards inside, as an anchored regular expression (`*` is `.*`,
    /// `?` is `.`): the regex crate matches in time linear in the text, where a
    /// backtracking glob could be made to take exponential time by the command line.
    Glob {
        re: Regex,
        cased: bool,
    },
    /// Typed equality (numbers against numbers).
    Eq(Base),
    Order(Op, Base),
    Regex(Regex),
    Cidr(IpCidr),
    /// Compare with another field of the event.
    FieldRef {
        other: SigmaField,
        op: Option<Op>,
        cased: bool,
    },
}

#[derive(Clone, Debug)]
pub struct Test {
    pub field: SigmaField,
    pub exists: Option<bool>,
    pub all: bool,
    pub atoms: Vec<Atom>,
}

#[derive(Clone, Debug)]
pub struct Selection {
    /// Any of these groups; a group is all of its tests.
    pub groups: Vec<Vec<Test>>,
}

#[derive(Clone, Debug)]
pub enum Cond {
    Sel(usize),
    Not(Box<Cond>),
    And(Vec<Cond>),
    Or(Vec<Cond>),
}

#[derive(Clone, Debug)]
pub struct Detection {
    pub selections: Vec<Selection>,
    pub cond: Cond,
}

impl Detection {
    /// Literals at least one of which must be found for the rule to match, when there
    /// is such a set: rules none of whose trigger literals is in an event are not
    /// evaluated for it. `None` when the rule can match without any literal (a negation,
    /// a regex, a number...).
    pub fn trigger(&self) -> Option<Vec<u32>> {
        let mut out = self.cond_trigger(&self.cond)?;
        out.sort_unstable();
        out.dedup();
        Some(out)
    }

    fn cond_trigger(&self, cond: &Cond) -> Option<Vec<u32>> {
        match cond {
            Cond::Sel(i) => {
                let mut out = Vec::new();
                for group in &self.selections[*i].groups {
                    // Any one test of the group is necessary: take the narrowest.
                    out.extend(group.iter().filter_map(test_trigger).min_by_key(Vec::len)?);
                }
                Some(out)
            }
            Cond::Not(_) => None,
            Cond::And(items) => items
                .iter()
                .filter_map(|c| self.cond_trigger(c))
                .min_by_key(Vec::len),
            Cond::Or(items) => {
                let mut out = Vec::new();
                for c in items {
                    out.extend(self.cond_trigger(c)?);
                }
                Some(out)
            }
        }
    }
}

/// A test whose every value is a shared literal needs one of them found.
fn test_trigger(test: &Test) -> Option<Vec<u32>> {
    if test.exists.is_some() || test.atoms.is_empty() {
        return None;
    }
    test.atoms
        .iter()
        .map(|a| match a {
            Atom::Lit(id) => Some(*id),
            _ => None,
        })
        .collect()
}

/// Literals of every rule, shared: one id per (field, place, text, cased).
#[derive(Default, Debug)]
pub struct Literals {
    pub entries: Vec<Literal>,
    index: HashMap<Literal, u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Literal {
    pub field: SigmaField,
    pub place: Place,
    pub text: String,
    pub cased: bool,
}

impl Literals {
    /// Forgets the literals added since there were `len` (a rule that was refused).
    pub fn truncate(&mut self, len: usize) {
        for lit in self.entries.drain(len..) {
            self.index.remove(&lit);
        }
    }

    fn id(&mut self, lit: Literal) -> u32 {
        if let Some(&id) = self.index.get(&lit) {
            return id;
        }
        let id = self.entries.len() as u32;
        self.entries.push(lit.clone());
        self.index.insert(lit, id);
        id
    }
}

/// Why a field Sigma rules use cannot be filled.
fn unavailable_reason(field: &str) -> &'static str {
    match field {
        "DestinationHostname" | "SourceHostname" => "no DNS names: connections are seen by address",
        "LogonId" | "LogonGuid" => "no login session id in Linux events",
        "Hashes" | "md5" | "sha1" | "sha256" | "Imphash" => {
            "executable hashes are computed after the exec event, not carried by it"
        }
        "Product" | "Company" | "Description" | "FileVersion" => {
            "no version resource on Linux executables"
        }
        "ParentUser" => "the parent's user is not mapped",
        _ => "not a field of this category's events",
    }
}

/// Compiles `detection` for `category`, adding its literals to `lits`.
pub fn compile(
    detection: &Yaml,
    category: Category,
    lits: &mut Literals,
) -> Result<Detection, Refusal> {
    let Some(map) = detection.as_mapping() else {
        return invalid("the rule has no detection mapping");
    };
    let mut condition = None;
    // Parse every selection first, then check fields: a malformed rule is invalid even
    // when it also names a field we lack.
    let mut raw = Vec::new();
    for (name, selection) in map {
        let Some(name) = name.as_str() else {
            return invalid(format!("detection key {name:?} is not a string"));
        };
        match name {
            "condition" => condition = Some(selection),
            "timeframe" => {
                return unsupported("`timeframe` (correlation over time) is not supported");
            }
            _ => raw.push((name, selection)),
        }
    }
    let Some(condition) = condition else {
        return invalid("the detection has no `condition`");
    };
    let Some(condition) = condition.as_str() else {
        return invalid("`condition` must be one string (a list of conditions is not supported)");
    };
    let mut parsed = Vec::new();
    for (name, selection) in &raw {
        parsed.push(parse_selection(name, selection)?);
    }
    let names: Vec<&str> = raw.iter().map(|(n, _)| *n).collect();
    let cond = parse_condition(condition, &names)?;
    let mut selections = Vec::new();
    for (_, groups) in parsed {
        let mut out = Vec::new();
        for group in groups {
            let mut tests = Vec::new();
            for (key, values) in group {
                tests.push(compile_test(&key, values, category, lits)?);
            }
            out.push(tests);
        }
        selections.push(Selection { groups: out });
    }
    Ok(Detection { selections, cond })
}

type Group<'y> = Vec<(String, Vec<Base>)>;

fn parse_selection<'y>(
    name: &'y str,
    selection: &Yaml,
) -> Result<(&'y str, Vec<Group<'y>>), Refusal> {
    let group = |m: &serde_norway::Mapping| -> Result<Group<'y>, Refusal> {
        let mut out = Vec::new();
        for (key, value) in m {
            let Some(key) = key.as_str() else {
                return invalid(format!(
                    "selection `{name}`: field name {key:?} is not a string"
                ));
            };
            let values = match value {
                Yaml::Sequence(items) => items
                    .iter()
                    .map(|v| Base::from_yaml(v).ok_or(()))
                    .collect::<Result<Vec<_>, _>>(),
                v => Base::from_yaml(v).map(|b| vec![b]).ok_or(()),
            };
            let Ok(values) = values else {
                return invalid(format!(
                    "selection `{name}`, `{key}`: values must be scalars or a list of scalars"
                ));
            };
            if values.is_empty() {
                return invalid(format!("selection `{name}`, `{key}`: empty list of values"));
            }
            out.push((key.to_owned(), values));
        }
        Ok(out)
    };
    match selection {
        Yaml::Mapping(m) => Ok((name, vec![group(m)?])),
        Yaml::Sequence(items) => {
            if items.is_empty() {
                return invalid(format!("selection `{name}` is an empty list"));
            }
            if !items[0].is_mapping() {
                return unsupported(format!(
                    "selection `{name}` is a keyword search, which needs raw log lines"
                ));
            }
            let mut groups = Vec::new();
            for item in items {
                let Some(m) = item.as_mapping() else {
                    return invalid(format!("selection `{name}` mixes field maps and keywords"));
                };
                groups.push(group(m)?);
            }
            Ok((name, groups))
        }
        _ => invalid(format!("selection `{name}` is neither a map nor a list")),
    }
}

/// The modifiers of one `Field|mod|mod` key.
#[derive(Default, Debug)]
struct Modifiers {
    op: Option<Op>,
    all: bool,
    cased: bool,
    exists: bool,
    fieldref: bool,
    transform: Option<Transform>,
    utf16: Option<Utf16>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Transform {
    Base64,
    Base64Offset,
    Windash,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Utf16 {
    Le,
    Be,
    Bom,
}

fn parse_modifiers(key: &str) -> Result<Modifiers, Refusal> {
    let mut m = Modifiers::default();
    for raw in key.split('|').skip(1) {
        let s = raw.to_lowercase();
        match s.as_str() {
            "all" => m.all = true,
            "fieldref" => m.fieldref = true,
            "cased" => m.cased = true,
            "exists" => m.exists = true,
            "expand" => {
                return unsupported(format!(
                    "modifier `expand` (in `{key}`) needs placeholder values we do not have"
                ));
            }
            _ => {
                if let Some(op) = Op::parse(&s) {
                    if m.op.is_some() {
                        return invalid(format!("`{key}`: conflicting modifiers"));
                    }
                    m.op = Some(op);
                } else if let Some(u) = match s.as_str() {
                    "utf16le" | "wide" => Some(Utf16::Le),
                    "utf16be" => Some(Utf16::Be),
                    "utf16" => Some(Utf16::Bom),
                    _ => None,
                } {
                    if m.utf16.is_some() {
                        return invalid(format!("`{key}`: conflicting modifiers"));
                    }
                    m.utf16 = Some(u);
                } else if let Some(t) = match s.as_str() {
                    "base64" => Some(Transform::Base64),
                    "base64offset" => Some(Transform::Base64Offset),
                    "windash" => Some(Transform::Windash),
                    _ => None,
                } {
                    if m.transform.is_some() {
                        return invalid(format!("`{key}`: conflicting modifiers"));
                    }
                    m.transform = Some(t);
                } else {
                    return unsupported(format!("modifier `{raw}` (in `{key}`) is not supported"));
                }
            }
        }
    }
    if m.utf16.is_some()
        && !matches!(
            m.transform,
            Some(Transform::Base64 | Transform::Base64Offset)
        )
    {
        return invalid(format!(
            "`{key}`: utf16 modifiers need base64 or base64offset"
        ));
    }
    if matches!(m.op, Some(Op::Re | Op::Cidr)) && m.transform.is_some() {
        return invalid(format!("`{key}`: re and cidr stand alone"));
    }
    if m.exists && (m.op.is_some() || m.all || m.cased || m.fieldref || m.transform.is_some()) {
        return invalid(format!("`{key}`: exists stands alone"));
    }
    Ok(m)
}

fn compile_test(
    key: &str,
    values: Vec<Base>,
    category: Category,
    lits: &mut Literals,
) -> Result<Test, Refusal> {
    let name = key.split('|').next().unwrap_or("");
    let m = parse_modifiers(key)?;
    let Some(field) = category.field(name) else {
        return unsupported(format!(
            "field `{name}` is not available for {}: {}",
            category.name(),
            unavailable_reason(name)
        ));
    };
    if m.exists {
        return match values.as_slice() {
            [Base::Bool(b)] => Ok(Test {
                field,
                exists: Some(*b),
                all: false,
                atoms: Vec::new(),
            }),
            _ => invalid(format!("`{key}`: exists takes one boolean")),
        };
    }
    let mut values = values;
    if let Some(t) = m.transform {
        let mut out = Vec::new();
        for v in &values {
            let Base::Str(s) = v else {
                return invalid(format!("`{key}`: {t:?} needs string values"));
            };
            match t {
                Transform::Base64 => out.push(Base::Str(encode_base64(s, m.utf16))),
                Transform::Base64Offset => {
                    out.extend(encode_base64_offset(s, m.utf16).into_iter().map(Base::Str))
                }
                Transform::Windash => out.extend(windash(s).into_iter().map(Base::Str)),
            }
        }
        values = out;
    }
    if m.fieldref {
        let mut atoms = Vec::new();
        for v in &values {
            let other_name = v.text();
            let Some(other) = category.field(&other_name) else {
                return unsupported(format!(
                    "`{key}` refers to field `{other_name}`, not available for {}: {}",
                    category.name(),
                    unavailable_reason(&other_name)
                ));
            };
            if matches!(m.op, Some(Op::Re | Op::Cidr)) {
                return unsupported(format!("`{key}`: fieldref with re or cidr"));
            }
            atoms.push(Atom::FieldRef {
                other,
                op: m.op,
                cased: m.cased,
            });
        }
        return Ok(Test {
            field,
            exists: None,
            all: m.all,
            atoms,
        });
    }
    let mut atoms = Vec::new();
    for v in values {
        let atom = match (m.op, v) {
            (Some(op), v) if op.is_order() => Atom::Order(op, v),
            (Some(Op::Re), Base::Str(s)) => match Regex::new(&s) {
                Ok(re) => Atom::Regex(re),
                Err(e) => return invalid(format!("`{key}`: invalid regular expression: {e}")),
            },
            (Some(Op::Cidr), Base::Str(s)) => match IpCidr::from_str(&s) {
                Ok(c) => Atom::Cidr(c),
                Err(e) => return invalid(format!("`{key}`: `{s}` is not a network: {e}")),
            },
            (op, Base::Str(s)) => literal_or_glob(field, op, &s, m.cased, lits)?,
            (Some(op), _) => return invalid(format!("`{key}`: {op:?} needs string values")),
            (None, v) => Atom::Eq(v),
        };
        atoms.push(atom);
    }
    Ok(Test {
        field,
        exists: None,
        all: m.all,
        atoms,
    })
}

/// A string value (after transforms) as a shared literal, or a glob when it has
/// wildcards inside.
fn literal_or_glob(
    field: SigmaField,
    op: Option<Op>,
    value: &str,
    cased: bool,
    lits: &mut Literals,
) -> Result<Atom, Refusal> {
    let mut toks = tokenize(value, !cased);
    match op {
        Some(Op::StartsWith) => toks.push(Tok::Star),
        Some(Op::EndsWith) => toks.insert(0, Tok::Star),
        Some(Op::Contains) => {
            toks.insert(0, Tok::Star);
            toks.push(Tok::Star);
        }
        _ => {}
    }
    toks.dedup_by(|a, b| *a == Tok::Star && *b == Tok::Star);
    let (place, text) = match toks.as_slice() {
        [] => (Place::Exact, String::new()),
        [Tok::Text(t)] => (Place::Exact, t.clone()),
        [Tok::Star] => return Ok(Atom::Present),
        [Tok::Text(t), Tok::Star] => (Place::Prefix, t.clone()),
        [Tok::Star, Tok::Text(t)] => (Place::Suffix, t.clone()),
        [Tok::Star, Tok::Text(t), Tok::Star] => (Place::Anywhere, t.clone()),
        _ => return glob(&toks, cased),
    };
    Ok(Atom::Lit(lits.id(Literal {
        field,
        place,
        text,
        cased,
    })))
}

/// The anchored regular expression of a glob (the text already lowercased unless cased).
fn glob(toks: &[Tok], cased: bool) -> Result<Atom, Refusal> {
    let mut pattern = String::from("(?s)\\A");
    for t in toks {
        match t {
            Tok::Star => pattern.push_str(".*"),
            Tok::One => pattern.push('.'),
            Tok::Text(text) => pattern.push_str(&regex::escape(text)),
        }
    }
    pattern.push_str("\\z");
    // Escaped text, `.` and `.*` always compile; only a value beyond the regex engine's
    // size limit is refused.
    match Regex::new(&pattern) {
        Ok(re) => Ok(Atom::Glob { re, cased }),
        Err(e) => unsupported(format!("a wildcard value is too large to match: {e}")),
    }
}

/// Splits a Sigma string value into text and wildcards: `*` any run, `?` one character,
/// `\*` `\?` `\\` escapes (any other backslash is literal). Lowercased unless cased.
pub fn tokenize(s: &str, lowercase: bool) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut escaped = false;
    let flush = |text: &mut String, out: &mut Vec<Tok>| {
        if !text.is_empty() {
            out.push(Tok::Text(std::mem::take(text)));
        }
    };
    for c in s.chars() {
        match c {
            '*' | '?' if escaped => {
                text.push(c);
                escaped = false;
            }
            '*' => {
                flush(&mut text, &mut out);
                if out.last() != Some(&Tok::Star) {
                    out.push(Tok::Star);
                }
            }
            '?' => {
                flush(&mut text, &mut out);
                out.push(Tok::One);
            }
            '\\' if escaped => {
                text.push('\\');
                escaped = false;
            }
            '\\' => escaped = true,
            _ => {
                if escaped {
                    text.push('\\');
                    escaped = false;
                }
                if lowercase {
                    text.extend(c.to_lowercase());
                } else {
                    text.push(c);
                }
            }
        }
    }
    if escaped {
        text.push('\\');
    }
    flush(&mut text, &mut out);
    out
}

/// Whether `toks` matches all of `s` (backtracking over stars: exact glob semantics).
pub fn glob_match(toks: &[Tok], s: &str) -> bool {
    match toks.split_first() {
        None => s.is_empty(),
        Some((Tok::Text(t), rest)) => s
            .strip_prefix(t.as_str())
            .is_some_and(|r| glob_match(rest, r)),
        Some((Tok::One, rest)) => {
            let mut chars = s.chars();
            chars.next().is_some() && glob_match(rest, chars.as_str())
        }
        Some((Tok::Star, rest)) => {
            if rest.is_empty() {
                return true;
            }
            // Try every start of the rest; a text token narrows the starts to its
            // occurrences.
            if let Some(Tok::Text(t)) = rest.first() {
                let mut from = 0;
                while let Some(pos) = s[from..].find(t.as_str()) {
                    let at = from + pos;
                    if glob_match(rest, &s[at..]) {
                        return true;
                    }
                    from = at + s[at..].chars().next().map_or(1, char::len_utf8);
                }
                false
            } else {
                s.char_indices()
                    .map(|(i, _)| i)
                    .chain(std::iter::once(s.len()))
                    .any(|i| glob_match(rest, &s[i..]))
            }
        }
    }
}

fn encode_base64(input: &str, utf16: Option<Utf16>) -> String {
    let bytes: Vec<u8> = match utf16 {
        Some(Utf16::Le) => input.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        Some(Utf16::Be) => input.encode_utf16().flat_map(u16::to_be_bytes).collect(),
        Some(Utf16::Bom) => [0xFF, 0xFE]
            .into_iter()
            .chain(input.encode_utf16().flat_map(u16::to_le_bytes))
            .collect(),
        None => input.as_bytes().to_vec(),
    };
    let mut encoded = STANDARD_NO_PAD.encode(bytes);
    // The last character of an unpadded encoding depends on what follows: drop it.
    if matches!(encoded.len() % 4, 2 | 3) {
        encoded.pop();
    }
    encoded
}

/// The three encodings of `input` at byte offsets 0, 1 and 2 of a base64 stream, without
/// the characters that depend on the unknown bytes before it.
fn encode_base64_offset(input: &str, utf16: Option<Utf16>) -> Vec<String> {
    let width = if utf16.is_some() { 2 } else { 1 };
    let mut out = Vec::new();
    let first = encode_base64(input, utf16);
    if !first.is_empty() {
        out.push(first);
    }
    for shift in 1..=2usize {
        let prefixed = format!("{}{input}", "\0".repeat(shift * width));
        let mut encoded = encode_base64(&prefixed, utf16);
        let skip = shift * width * (1 + width) - (shift - 1);
        if encoded.len() > skip {
            encoded.drain(..skip);
            out.push(encoded);
        }
    }
    out
}

/// `input` with each of its `-flag` words also written with the other Windows option
/// dashes (`/`, en dash, em dash, horizontal bar).
fn windash(input: &str) -> Vec<String> {
    const DASHES: [&str; 5] = ["-", "/", "\u{2013}", "\u{2014}", "\u{2015}"];
    let mut out = vec![input.to_owned()];
    let mut flags: Vec<&str> = input
        .split(' ')
        .filter(|w| DASHES.iter().any(|d| w.starts_with(d)))
        .collect();
    flags.sort_unstable();
    flags.dedup();
    for flag in flags {
        for dash in DASHES {
            if flag.starts_with(dash) {
                continue;
            }
            let first = flag.chars().next().map_or(0, char::len_utf8);
            let new = format!("{dash}{}", &flag[first..]);
            out.push(input.replace(flag, &new));
        }
    }
    out
}

/// The `condition` over the selection names, `1 of`/`all of` patterns resolved.
fn parse_condition(src: &str, names: &[&str]) -> Result<Cond, Refusal> {
    let mut toks = Vec::new();
    let mut word = String::new();
    let flush = |word: &mut String, toks: &mut Vec<String>| {
        if !word.is_empty() {
            toks.push(std::mem::take(word));
        }
    };
    for c in src.chars() {
        match c {
            '(' | ')' => {
                flush(&mut word, &mut toks);
                toks.push(c.to_string());
            }
            c if c.is_ascii_whitespace() => flush(&mut word, &mut toks),
            c => word.push(c),
        }
    }
    flush(&mut word, &mut toks);
    let mut p = CondParser {
        toks,
        pos: 0,
        names,
        depth: 0,
    };
    let cond = p.or()?;
    if let Some(t) = p.toks.get(p.pos) {
        return invalid(format!("condition `{src}`: unexpected `{t}`"));
    }
    Ok(cond)
}

struct CondParser<'n> {
    toks: Vec<String>,
    pos: usize,
    names: &'n [&'n str],
    depth: usize,
}

impl CondParser<'_> {
    fn peek_kw(&self) -> Option<String> {
        self.toks.get(self.pos).map(|t| t.to_lowercase())
    }

    fn or(&mut self) -> Result<Cond, Refusal> {
        let mut items = vec![self.and()?];
        while self.peek_kw().as_deref() == Some("or") {
            self.pos += 1;
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 {
            items.pop().unwrap_or(Cond::Or(Vec::new()))
        } else {
            Cond::Or(items)
        })
    }

    fn and(&mut self) -> Result<Cond, Refusal> {
        let mut items = vec![self.unary()?];
        while self.peek_kw().as_deref() == Some("and") {
            self.pos += 1;
            items.push(self.unary()?);
        }
        Ok(if items.len() == 1 {
            items.pop().unwrap_or(Cond::And(Vec::new()))
        } else {
            Cond::And(items)
        })
    }

    fn unary(&mut self) -> Result<Cond, Refusal> {
        self.depth += 1;
        if self.depth > crate::detect::expr::MAX_NESTING {
            return invalid("condition nests too deep");
        }
        let out = self.primary();
        self.depth -= 1;
        out
    }

    fn primary(&mut self) -> Result<Cond, Refusal> {
        let Some(tok) = self.toks.get(self.pos).cloned() else {
            return invalid("condition ends where a selection is expected");
        };
        self.pos += 1;
        match tok.to_lowercase().as_str() {
            "not" => Ok(Cond::Not(Box::new(self.unary()?))),
            "(" => {
                let inner = self.or()?;
                if self.toks.get(self.pos).map(String::as_str) != Some(")") {
                    return invalid("condition: missing `)`");
                }
                self.pos += 1;
                Ok(inner)
            }
            q @ ("1" | "all") if self.peek_kw().as_deref() == Some("of") => {
                self.pos += 1;
                let Some(pattern) = self.toks.get(self.pos).cloned() else {
                    return invalid(format!("condition: `{q} of` without a pattern"));
                };
                self.pos += 1;
                let chosen: Vec<Cond> = if pattern.eq_ignore_ascii_case("them") {
                    (0..self.names.len()).map(Cond::Sel).collect()
                } else {
                    let toks = name_pattern(&pattern);
                    self.names
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| glob_match(&toks, n))
                        .map(|(i, _)| Cond::Sel(i))
                        .collect()
                };
                Ok(if q == "1" {
                    Cond::Or(chosen)
                } else {
                    Cond::And(chosen)
                })
            }
            ")" | "and" | "or" => invalid(format!("condition: unexpected `{tok}`")),
            _ => match self.names.iter().position(|n| *n == tok) {
                Some(i) => Ok(Cond::Sel(i)),
                None => invalid(format!("condition names `{tok}`, which is not a selection")),
            },
        }
    }
}

/// A `1 of`/`all of` pattern: `*` is the only wildcard, case matters.
fn name_pattern(p: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    for (i, part) in p.split('*').enumerate() {
        if i > 0 && out.last() != Some(&Tok::Star) {
            out.push(Tok::Star);
        }
        if !part.is_empty() {
            out.push(Tok::Text(part.to_owned()));
        }
    }
    out
}

/// Order comparison of two typed values (same types only, as Sigma compares).
pub fn compare(a: &Base, b: &Base) -> Option<Ordering> {
    match (a, b) {
        (Base::Str(x), Base::Str(y)) => x.partial_cmp(y),
        (Base::Int(x), Base::Int(y)) => x.partial_cmp(y),
        (Base::Unsigned(x), Base::Unsigned(y)) => x.partial_cmp(y),
        (Base::Float(x), Base::Float(y)) => x.partial_cmp(y),
        (Base::Bool(x), Base::Bool(y)) => x.partial_cmp(y),
        (Base::Null, Base::Null) => Some(Ordering::Equal),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenize_escapes_and_wildcards() {
        assert_eq!(
            tokenize(r"A\*b?C*\\d\x", true),
            vec![
                Tok::Text("a*b".into()),
                Tok::One,
                Tok::Text("c".into()),
                Tok::Star,
                Tok::Text(r"\d\x".into())
            ]
        );
    }

    #[test]
    fn globs_backtrack() {
        let g = tokenize("*a?c", true);
        assert!(glob_match(&g, "aabc"));
        assert!(!glob_match(&g, "abca"));
        let g = tokenize("/etc/*.conf", true);
        assert!(glob_match(&g, "/etc/x.conf.conf"));
        assert!(!glob_match(&g, "/etc/x.confx"));
    }

    #[test]
    fn base64_encodings_match_the_sigma_examples() {
        assert_eq!(encode_base64("/bin/bash", None), "L2Jpbi9iYXNo");
        assert_eq!(encode_base64("cmd", Some(Utf16::Le)), "YwBtAGQA");
        assert_eq!(encode_base64("cmd", Some(Utf16::Be)), "AGMAbQBk");
        assert_eq!(encode_base64("cmd", Some(Utf16::Bom)), "//5jAG0AZA");
        assert_eq!(
            encode_base64_offset("/bin/bash", None),
            ["L2Jpbi9iYXNo", "9iaW4vYmFza", "vYmluL2Jhc2"]
        );
        assert_eq!(encode_base64_offset("1", None), ["M", "x"]);
    }

    #[test]
    fn windash_writes_every_dash() {
        let v = windash("-a x");
        assert_eq!(v.len(), 5);
        assert!(v.contains(&"/a x".to_owned()));
        assert!(v.contains(&"\u{2014}a x".to_owned()));
    }

    #[test]
    fn conditions_resolve_patterns() {
        let names = ["selection_a", "selection_b", "filter_main_x"];
        let c = parse_condition("all of selection_* and not 1 of filter_main_*", &names).unwrap();
        let Cond::And(items) = c else { panic!() };
        assert!(matches!(&items[0], Cond::And(s) if s.len() == 2));
        assert!(matches!(&items[1], Cond::Not(_)));
        assert!(parse_condition("selection_a and", &names).is_err());
        assert!(parse_condition("nope", &names).is_err());
        assert!(parse_condition("(selection_a", &names).is_err());
        let deep = format!("{}selection_a", "not ".repeat(100));
        assert!(parse_condition(&deep, &names).is_err());
    }
}
