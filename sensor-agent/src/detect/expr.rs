//! The condition language of rules, Falco-like:
//!
//! ```text
//! proc.name in (shells) and lineage.identity = "tomcat" and not jvm_plumbing
//! file.path startswith "/mi/tomcat/webapps/" and file.ext in ("jsp", "jspx", "war")
//! net.remote_port = 443 and exec.stdin = "socket"
//! exec.filename = $payload
//! ```
//!
//! `and`, `or`, `not`, parentheses; comparisons `=` `!=` `<` `<=` `>` `>=`, `contains`,
//! `icontains`, `startswith`, `endswith`, `glob`, `regex`, `in`. A value is a quoted string,
//! a number, `true`/`false`, `$capture`, or a parenthesised list of them and of list
//! names. A list on the right means "any of". A list-valued field (`proc.argv`,
//! `ancestor.name`) matches when any element does. A bare name is a boolean field or a
//! macro. A field that does not apply to the event makes every comparison false.
//!
//! Parsing and type checking happen once, when rules load, and report the byte offset of
//! the problem; evaluation never fails.
//!
//! What a rule file can cost is bounded at load: `not` and parentheses nest at most
//! [`MAX_NESTING`] deep, a macro is compiled once and shared by every condition naming it,
//! and a condition may not reach more than [`MAX_WEIGHT`] comparisons or [`MAX_DEPTH`]
//! levels once its macros are expanded (a macro doubling another forty times is refused,
//! not evaluated 2^40 times per event). Lists are shared, not copied, by the conditions
//! that use them whole.

use std::{collections::HashMap, sync::Arc};

use globset::{GlobBuilder, GlobMatcher};
use regex::Regex;
use sensor_proto::EventKind;

use super::fields::{Ctx, Field, Kind, Value};

/// How deep `not` and parentheses may nest in one condition.
pub const MAX_NESTING: usize = 64;
/// How deep evaluation may recurse through a condition and the macros it names.
pub const MAX_DEPTH: u32 = 256;
/// Comparisons one condition may stand for once its macros are expanded.
pub const MAX_WEIGHT: u64 = 100_000;
/// Comparisons all the loaded conditions together may stand for.
pub const MAX_TOTAL_WEIGHT: u64 = 5_000_000;

/// A problem in a condition, at a byte offset into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    pub offset: usize,
    pub message: String,
}

impl ExprError {
    fn at(offset: usize, message: impl Into<String>) -> Self {
        Self {
            offset,
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Var(String),
    Str(String),
    Int(i64),
    LParen,
    RParen,
    Comma,
    Op(&'static str),
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, ExprError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push((start, Tok::LParen));
                i += 1;
            }
            b')' => {
                out.push((start, Tok::RParen));
                i += 1;
            }
            b',' => {
                out.push((start, Tok::Comma));
                i += 1;
            }
            b'=' => {
                i += if bytes.get(i + 1) == Some(&b'=') {
                    2
                } else {
                    1
                };
                out.push((start, Tok::Op("=")));
            }
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                out.push((start, Tok::Op("!=")));
                i += 2;
            }
            b'<' | b'>' => {
                let eq = bytes.get(i + 1) == Some(&b'=');
                let op = match (c, eq) {
                    (b'<', true) => "<=",
                    (b'<', false) => "<",
                    (_, true) => ">=",
                    _ => ">",
                };
                out.push((start, Tok::Op(op)));
                i += if eq { 2 } else { 1 };
            }
            b'"' | b'\'' => {
                let quote = c;
                let mut value = String::new();
                i += 1;
                loop {
                    let Some(&b) = bytes.get(i) else {
                        return Err(ExprError::at(start, "string is not closed"));
                    };
                    if b == quote {
                        i += 1;
                        break;
                    }
                    if b == b'\\' {
                        let Some(&next) = bytes.get(i + 1) else {
                            return Err(ExprError::at(i, "string ends with a lone backslash"));
                        };
                        value.push(match next {
                            b'n' => '\n',
                            b't' => '\t',
                            b'\\' => '\\',
                            b'"' => '"',
                            b'\'' => '\'',
                            _ => {
                                return Err(ExprError::at(
                                    i,
                                    format!("unknown escape \\{}", next as char),
                                ));
                            }
                        });
                        i += 2;
                        continue;
                    }
                    // Copy one UTF-8 character.
                    let ch = src[i..].chars().next().unwrap_or('?');
                    value.push(ch);
                    i += ch.len_utf8();
                }
                out.push((start, Tok::Str(value)));
            }
            b'$' => {
                i += 1;
                let begin = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                if begin == i {
                    return Err(ExprError::at(
                        start,
                        "`$` must be followed by a capture name",
                    ));
                }
                out.push((start, Tok::Var(src[begin..i].to_owned())));
            }
            b'-' | b'0'..=b'9' => {
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_alphanumeric() {
                    i += 1;
                }
                let text = &src[start..i];
                let value = if let Some(hex) = text.strip_prefix("0x") {
                    i64::from_str_radix(hex, 16)
                } else if let Some(oct) = text.strip_prefix("0o") {
                    i64::from_str_radix(oct, 8)
                } else {
                    text.parse()
                };
                let value =
                    value.map_err(|_| ExprError::at(start, format!("`{text}` is not a number")))?;
                out.push((start, Tok::Int(value)));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b'.' | b'-'))
                {
                    i += 1;
                }
                out.push((start, Tok::Ident(src[start..i].to_owned())));
            }
            _ => {
                let ch = src[i..].chars().next().unwrap_or('?');
                return Err(ExprError::at(start, format!("unexpected character `{ch}`")));
            }
        }
    }
    Ok(out)
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Contains,
    IContains,
    StartsWith,
    EndsWith,
    Glob,
    Regex,
}

impl Op {
    fn from_word(word: &str) -> Option<Op> {
        Some(match word {
            "contains" => Op::Contains,
            "icontains" => Op::IContains,
            "startswith" => Op::StartsWith,
            "endswith" => Op::EndsWith,
            "glob" => Op::Glob,
            "regex" => Op::Regex,
            "in" => Op::Eq,
            _ => return None,
        })
    }

    fn from_symbol(sym: &str) -> Op {
        match sym {
            "=" => Op::Eq,
            "!=" => Op::Ne,
            "<" => Op::Lt,
            "<=" => Op::Le,
            ">" => Op::Gt,
            _ => Op::Ge,
        }
    }

    fn is_string_op(self) -> bool {
        matches!(
            self,
            Op::Contains | Op::IContains | Op::StartsWith | Op::EndsWith | Op::Glob | Op::Regex
        )
    }

    fn is_order(self) -> bool {
        matches!(self, Op::Lt | Op::Le | Op::Gt | Op::Ge)
    }
}

/// The right-hand side of a compiled comparison.
#[derive(Clone, Debug)]
pub enum Rhs {
    /// Shared with the list it came from when the condition names one list whole.
    Strs(Arc<[String]>),
    /// A long list (at least `INDEX_AT` strings), with its index: a hash set for `=`,
    /// automata for `startswith`, `endswith` and `contains`, so a comparison costs about
    /// the length of the value, not the length of the list. Shared by every condition that
    /// names the same list.
    Indexed(Arc<[String]>, Arc<StrIndex>),
    Ints(Vec<i64>),
    Bool(bool),
    Var(String),
    Globs(Vec<GlobMatcher>),
    Regexes(Vec<Regex>),
}

/// Lists at least this long are compared through an index.
pub const INDEX_AT: usize = 6;

/// The index of a list, each part built the first time an operator needs it.
#[derive(Debug, Default)]
pub struct StrIndex {
    /// For `=` and `!=`: positions in the list, found by the item's hash (the strings are
    /// the list's own, not a second copy).
    exact: std::sync::OnceLock<hashbrown::HashTable<u32>>,
    /// For `startswith`: the items no other item starts (a longer item adds nothing),
    /// sorted, as positions in the list. A value starts with an item exactly when it
    /// starts with the greatest of these that is not greater than it: everything sorted
    /// between an item and a value it starts also starts with that item. So a test is a
    /// binary search and one comparison, with no automaton to walk through memory.
    prefixes: std::sync::OnceLock<Box<[u32]>>,
    /// Unanchored, overlapping: for `contains` any match, for `endswith` one that ends
    /// where the value does.
    anywhere: std::sync::OnceLock<Option<aho_corasick::AhoCorasick>>,
}

impl StrIndex {
    fn exact(&self, items: &[String]) -> &hashbrown::HashTable<u32> {
        self.exact.get_or_init(|| {
            let mut table = hashbrown::HashTable::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let hash = hash_str(item);
                if table.find(hash, |&j| items[j as usize] == *item).is_none() {
                    table.insert_unique(hash, i as u32, |&j| hash_str(&items[j as usize]));
                }
            }
            table
        })
    }

    fn has_exact(&self, items: &[String], s: &str) -> bool {
        self.exact(items)
            .find(hash_str(s), |&j| items[j as usize] == s)
            .is_some()
    }

    fn prefixes(&self, items: &[String]) -> &[u32] {
        self.prefixes.get_or_init(|| {
            let mut sorted: Vec<u32> = (0..items.len() as u32).collect();
            sorted.sort_unstable_by(|&a, &b| items[a as usize].cmp(&items[b as usize]));
            sorted.dedup_by(|b, a| items[*b as usize] == items[*a as usize]);
            // Sorted, an item that starts with another comes after it (and after
            // everything between them, which starts with it too): keep the first of each run.
            let mut kept: Vec<u32> = Vec::with_capacity(sorted.len());
            for i in sorted {
                let item = &items[i as usize];
                if kept
                    .last()
                    .is_none_or(|&k| !item.starts_with(items[k as usize].as_str()))
                {
                    kept.push(i);
                }
            }
            kept.into_boxed_slice()
        })
    }

    fn anywhere(&self, items: &[String]) -> Option<&aho_corasick::AhoCorasick> {
        self.anywhere
            .get_or_init(|| aho_corasick::AhoCorasick::new(items).ok())
            .as_ref()
    }

    /// Whether `s` compares true with `op` against any item (`Ne`: against none).
    fn test(&self, items: &[String], s: &str, op: Op) -> bool {
        match op {
            Op::Eq => self.has_exact(items, s),
            Op::Ne => !self.has_exact(items, s),
            Op::StartsWith => {
                let prefixes = self.prefixes(items);
                let after = prefixes.partition_point(|&i| items[i as usize].as_str() <= s);
                after > 0 && s.starts_with(items[prefixes[after - 1] as usize].as_str())
            }
            Op::EndsWith => match self.anywhere(items) {
                Some(ac) => ac.find_overlapping_iter(s).any(|m| m.end() == s.len()),
                None => items.iter().any(|r| s.ends_with(r.as_str())),
            },
            Op::Contains => match self.anywhere(items) {
                Some(ac) => ac.is_match(s),
                None => items.iter().any(|r| s.contains(r.as_str())),
            },
            _ => false,
        }
    }
}

fn hash_str(s: &str) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one(s)
}

/// The index of each long list, shared by every condition that names it: keyed by the
/// list's address, which cannot be reused while its `Weak` is held here; entries of lists
/// gone are dropped when the next one is added.
fn index_of(items: &Arc<[String]>) -> Arc<StrIndex> {
    type Cache = rustc_hash::FxHashMap<usize, (std::sync::Weak<[String]>, Arc<StrIndex>)>;
    static CACHE: std::sync::Mutex<Option<Cache>> = std::sync::Mutex::new(None);
    let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = guard.get_or_insert_with(Default::default);
    let key = Arc::as_ptr(items) as *const u8 as usize;
    if let Some((weak, index)) = cache.get(&key)
        && weak.upgrade().is_some_and(|live| Arc::ptr_eq(&live, items))
    {
        return Arc::clone(index);
    }
    cache.retain(|_, (weak, _)| weak.strong_count() > 0);
    let index = Arc::new(StrIndex::default());
    cache.insert(key, (Arc::downgrade(items), Arc::clone(&index)));
    index
}

/// `Strs`, or `Indexed` for a long list compared with an operator the index serves.
fn strs_rhs(items: Arc<[String]>, op: Op) -> Rhs {
    if items.len() >= INDEX_AT
        && matches!(
            op,
            Op::Eq | Op::Ne | Op::StartsWith | Op::EndsWith | Op::Contains
        )
    {
        let index = index_of(&items);
        Rhs::Indexed(items, index)
    } else {
        Rhs::Strs(items)
    }
}

/// A compiled condition.
#[derive(Clone, Debug)]
pub enum Cond {
    And(Vec<Cond>),
    Or(Vec<Cond>),
    Not(Box<Cond>),
    Test {
        field: Field,
        op: Op,
        rhs: Rhs,
    },
    Truthy(Field),
    Const(bool),
    /// A macro, compiled once and shared.
    Macro(Arc<Macro>),
}

/// A compiled macro with what it costs once expanded.
#[derive(Debug)]
pub struct Macro {
    pub cond: Cond,
    weight: u64,
    depth: u32,
    /// Where an event's context remembers this macro's value (`Ctx::memo`): many rules
    /// of one event ask the same macro (`web_child`, `package_manager`...).
    slot: Option<usize>,
}

impl Macro {
    /// A macro whose value is computed each time it is asked.
    pub fn new(cond: Cond) -> Arc<Macro> {
        Self::numbered(cond, usize::MAX)
    }

    /// The `n`th macro of a rule set: its value is computed once per event (for the
    /// first `fields::MACRO_MEMO` macros of the set).
    pub fn numbered(cond: Cond, n: usize) -> Arc<Macro> {
        let (weight, depth) = cond.measure();
        Arc::new(Macro {
            cond,
            weight,
            depth,
            slot: (n < super::fields::MACRO_MEMO).then_some(n),
        })
    }
}

/// Names a condition can refer to besides fields.
pub struct Env<'a> {
    pub lists: &'a HashMap<String, Arc<[String]>>,
    /// Already-compiled macros.
    pub macros: &'a HashMap<String, Arc<Macro>>,
    /// Capture names a sequence step may use (`$name`).
    pub vars: &'a [String],
    /// Event kinds the condition runs on, to refuse fields that never apply.
    pub on: &'a [EventKind],
}

impl<'a> Env<'a> {
    /// Lists and macros, no captures, any event kind.
    pub fn new(
        lists: &'a HashMap<String, Arc<[String]>>,
        macros: &'a HashMap<String, Arc<Macro>>,
    ) -> Self {
        Self {
            lists,
            macros,
            vars: &[],
            on: &[],
        }
    }

    /// Only on these event kinds: fields never set on them are refused.
    pub fn on(self, on: &'a [EventKind]) -> Self {
        Self { on, ..self }
    }

    /// With the captures of earlier sequence steps.
    pub fn vars(self, vars: &'a [String]) -> Self {
        Self { vars, ..self }
    }
}

/// Parses and type-checks `src`.
pub fn compile(src: &str, env: &Env<'_>) -> Result<Cond, ExprError> {
    let tokens = lex(src)?;
    let mut p = Parser {
        tokens,
        pos: 0,
        env,
        end: src.len(),
        nesting: 0,
    };
    if p.tokens.is_empty() {
        return Err(ExprError::at(0, "the condition is empty"));
    }
    let cond = p.or()?;
    if let Some((offset, tok)) = p.tokens.get(p.pos) {
        return Err(ExprError::at(
            *offset,
            format!("unexpected {}", describe(tok)),
        ));
    }
    let (weight, depth) = cond.measure();
    if weight > MAX_WEIGHT {
        return Err(ExprError::at(
            0,
            format!(
                "the condition stands for {weight} comparisons once its macros are expanded; the limit is {MAX_WEIGHT}"
            ),
        ));
    }
    if depth > MAX_DEPTH {
        return Err(ExprError::at(
            0,
            format!(
                "the condition nests {depth} levels deep once its macros are expanded; the limit is {MAX_DEPTH}"
            ),
        ));
    }
    Ok(cond)
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Ident(s) => format!("`{s}`"),
        Tok::Var(s) => format!("`${s}`"),
        Tok::Str(s) => format!("string \"{s}\""),
        Tok::Int(i) => format!("number {i}"),
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::Comma => "`,`".into(),
        Tok::Op(o) => format!("`{o}`"),
    }
}

struct Parser<'a> {
    tokens: Vec<(usize, Tok)>,
    pos: usize,
    env: &'a Env<'a>,
    end: usize,
    /// `not`s and parentheses open around the current position.
    nesting: usize,
}

/// A literal on the right of a comparison, before type checking.
enum Lit {
    Str(String),
    Int(i64),
    Bool(bool),
    Var(String),
    /// A list named whole.
    List(Arc<[String]>),
}

impl Parser<'_> {
    /// Enters one more level of `not` or parentheses, refusing past [`MAX_NESTING`] before
    /// the parser's own recursion could exhaust the stack.
    fn deeper(&mut self, offset: usize) -> Result<(), ExprError> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err(ExprError::at(
                offset,
                format!("`not` and parentheses nest more than {MAX_NESTING} levels deep here"),
            ));
        }
        Ok(())
    }

    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|(_, t)| t)
    }

    fn offset(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |(o, _)| *o)
    }

    fn next(&mut self) -> Option<(usize, Tok)> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(w)) if w == word)
    }

    fn or(&mut self) -> Result<Cond, ExprError> {
        let mut items = vec![self.and()?];
        while self.is_word("or") {
            self.pos += 1;
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 {
            items.pop().unwrap_or(Cond::Const(false))
        } else {
            Cond::Or(items)
        })
    }

    fn and(&mut self) -> Result<Cond, ExprError> {
        let mut items = vec![self.not()?];
        while self.is_word("and") {
            self.pos += 1;
            items.push(self.not()?);
        }
        Ok(if items.len() == 1 {
            items.pop().unwrap_or(Cond::Const(true))
        } else {
            Cond::And(items)
        })
    }

    fn not(&mut self) -> Result<Cond, ExprError> {
        if self.is_word("not") {
            self.deeper(self.offset())?;
            self.pos += 1;
            let inner = self.not()?;
            self.nesting -= 1;
            return Ok(Cond::Not(Box::new(inner)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Cond, ExprError> {
        let offset = self.offset();
        match self.next() {
            Some((_, Tok::LParen)) => {
                self.deeper(offset)?;
                let inner = self.or()?;
                self.nesting -= 1;
                match self.next() {
                    Some((_, Tok::RParen)) => Ok(inner),
                    _ => Err(ExprError::at(offset, "this `(` is never closed")),
                }
            }
            Some((_, Tok::Ident(name))) => self.predicate(offset, &name),
            Some((_, tok)) => Err(ExprError::at(
                offset,
                format!("expected a field, a macro or `(`, found {}", describe(&tok)),
            )),
            None => Err(ExprError::at(offset, "the condition ends too early")),
        }
    }

    fn predicate(&mut self, offset: usize, name: &str) -> Result<Cond, ExprError> {
        match name {
            "true" => return Ok(Cond::Const(true)),
            "false" => return Ok(Cond::Const(false)),
            _ => {}
        }
        let Some((field, kind, applies)) = Field::by_name(name) else {
            if let Some(m) = self.env.macros.get(name) {
                return Ok(Cond::Macro(Arc::clone(m)));
            }
            if self.env.lists.contains_key(name) {
                return Err(ExprError::at(
                    offset,
                    format!("`{name}` is a list; use it on the right of `in` or another operator"),
                ));
            }
            return Err(ExprError::at(
                offset,
                format!("unknown field or macro `{name}`"),
            ));
        };
        if !applies.is_empty()
            && let Some(kind) = self.env.on.iter().find(|k| !applies.contains(k))
        {
            return Err(ExprError::at(
                offset,
                format!(
                    "field `{name}` is never set on `{kind}` events (only on: {})",
                    applies
                        .iter()
                        .map(|k| k.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        // The operator, if any.
        let op_offset = self.offset();
        let op = match self.peek() {
            Some(Tok::Op(sym)) => {
                let op = Op::from_symbol(sym);
                self.pos += 1;
                op
            }
            Some(Tok::Ident(word)) => match Op::from_word(word) {
                Some(op) => {
                    self.pos += 1;
                    op
                }
                None => return self.truthy(offset, name, field, kind),
            },
            _ => return self.truthy(offset, name, field, kind),
        };
        let value_offset = self.offset();
        let values = self.values()?;
        self.check(name, field, kind, op, values, op_offset, value_offset)
    }

    fn truthy(
        &self,
        offset: usize,
        name: &str,
        field: Field,
        kind: Kind,
    ) -> Result<Cond, ExprError> {
        if kind == Kind::Bool {
            Ok(Cond::Truthy(field))
        } else {
            Err(ExprError::at(
                offset,
                format!(
                    "field `{name}` is {}, not a boolean: compare it (e.g. `{name} = ...`)",
                    kind.name()
                ),
            ))
        }
    }

    /// One value, or a parenthesised list of values and list names.
    fn values(&mut self) -> Result<Vec<Lit>, ExprError> {
        let offset = self.offset();
        match self.next() {
            Some((_, Tok::LParen)) => {
                let mut out = Vec::new();
                loop {
                    let item_offset = self.offset();
                    match self.next() {
                        Some((_, Tok::RParen)) if out.is_empty() => {
                            return Err(ExprError::at(item_offset, "empty list"));
                        }
                        Some((_, tok)) => out.extend(self.literal(item_offset, tok, true)?),
                        None => return Err(ExprError::at(offset, "this `(` is never closed")),
                    }
                    match self.next() {
                        Some((_, Tok::Comma)) => continue,
                        Some((_, Tok::RParen)) => break,
                        Some((o, tok)) => {
                            return Err(ExprError::at(
                                o,
                                format!("expected `,` or `)`, found {}", describe(&tok)),
                            ));
                        }
                        None => return Err(ExprError::at(offset, "this `(` is never closed")),
                    }
                }
                Ok(out)
            }
            Some((_, tok)) => self.literal(offset, tok, true),
            None => Err(ExprError::at(
                offset,
                "a value is missing after the operator",
            )),
        }
    }

    fn literal(&self, offset: usize, tok: Tok, lists: bool) -> Result<Vec<Lit>, ExprError> {
        Ok(match tok {
            Tok::Str(s) => vec![Lit::Str(s)],
            Tok::Int(i) => vec![Lit::Int(i)],
            Tok::Var(v) => {
                if !self.env.vars.contains(&v) {
                    return Err(ExprError::at(
                        offset,
                        format!("`${v}` is not captured by an earlier step of this sequence"),
                    ));
                }
                vec![Lit::Var(v)]
            }
            Tok::Ident(w) if w == "true" => vec![Lit::Bool(true)],
            Tok::Ident(w) if w == "false" => vec![Lit::Bool(false)],
            Tok::Ident(name) if lists => match self.env.lists.get(&name) {
                Some(items) => vec![Lit::List(Arc::clone(items))],
                None => {
                    return Err(ExprError::at(
                        offset,
                        format!("unknown list `{name}` (strings must be quoted)"),
                    ));
                }
            },
            tok => {
                return Err(ExprError::at(
                    offset,
                    format!("expected a value, found {}", describe(&tok)),
                ));
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        &self,
        name: &str,
        field: Field,
        kind: Kind,
        op: Op,
        values: Vec<Lit>,
        op_offset: usize,
        value_offset: usize,
    ) -> Result<Cond, ExprError> {
        let bad = |message: String| Err(ExprError::at(value_offset, message));
        if let [Lit::Var(v)] = values.as_slice() {
            if !matches!(kind, Kind::Str | Kind::StrList) || !matches!(op, Op::Eq | Op::Ne) {
                return Err(ExprError::at(
                    op_offset,
                    format!(
                        "a capture compares with `=` or `!=` against a string field; `{name}` is {}",
                        kind.name()
                    ),
                ));
            }
            return Ok(Cond::Test {
                field,
                op,
                rhs: Rhs::Var(v.clone()),
            });
        }
        match kind {
            Kind::Str | Kind::StrList => {
                if op.is_order() {
                    return Err(ExprError::at(
                        op_offset,
                        format!("`{name}` is {}; `<`, `>` compare numbers", kind.name()),
                    ));
                }
                // A list named whole, compared as it is: shared, not copied.
                if let [Lit::List(items)] = values.as_slice()
                    && matches!(
                        op,
                        Op::Eq | Op::Ne | Op::Contains | Op::StartsWith | Op::EndsWith
                    )
                {
                    return Ok(Cond::Test {
                        field,
                        op,
                        rhs: strs_rhs(Arc::clone(items), op),
                    });
                }
                let mut strs = Vec::new();
                for v in values {
                    match v {
                        Lit::Str(s) => strs.push(s),
                        Lit::Int(i) => strs.push(i.to_string()),
                        Lit::List(items) => strs.extend(items.iter().cloned()),
                        _ => {
                            return bad(format!(
                                "`{name}` is {}; compare it with strings",
                                kind.name()
                            ));
                        }
                    }
                }
                let rhs = match op {
                    Op::Glob => Rhs::Globs(
                        strs.iter()
                            .map(|g| {
                                GlobBuilder::new(g)
                                    .literal_separator(false)
                                    .build()
                                    .map(|g| g.compile_matcher())
                                    .map_err(|e| {
                                        ExprError::at(value_offset, format!("bad glob {g:?}: {e}"))
                                    })
                            })
                            .collect::<Result<_, _>>()?,
                    ),
                    Op::Regex => Rhs::Regexes(
                        strs.iter()
                            .map(|r| {
                                Regex::new(r).map_err(|e| {
                                    ExprError::at(value_offset, format!("bad regex {r:?}: {e}"))
                                })
                            })
                            .collect::<Result<_, _>>()?,
                    ),
                    Op::IContains => Rhs::Strs(strs.iter().map(|s| s.to_lowercase()).collect()),
                    _ => strs_rhs(strs.into(), op),
                };
                Ok(Cond::Test { field, op, rhs })
            }
            Kind::Int => {
                if op.is_string_op() {
                    return Err(ExprError::at(
                        op_offset,
                        format!("`{name}` is a number; string operators do not apply"),
                    ));
                }
                let mut ints = Vec::new();
                let mut parse = |s: &str| match s.parse() {
                    Ok(i) => {
                        ints.push(i);
                        Ok(())
                    }
                    Err(_) => Err(format!("`{name}` is a number; {s:?} is not")),
                };
                for v in values {
                    let parsed = match v {
                        Lit::Int(i) => parse(&i.to_string()),
                        Lit::Str(s) => parse(&s),
                        Lit::List(items) => items.iter().try_for_each(|s| parse(s)),
                        _ => Err(format!("`{name}` is a number")),
                    };
                    if let Err(message) = parsed {
                        return bad(message);
                    }
                }
                if op.is_order() && ints.len() != 1 {
                    return bad("`<` and `>` take one number".into());
                }
                Ok(Cond::Test {
                    field,
                    op,
                    rhs: Rhs::Ints(ints),
                })
            }
            Kind::Bool => {
                if !matches!(op, Op::Eq | Op::Ne) {
                    return Err(ExprError::at(
                        op_offset,
                        format!("`{name}` is a boolean; use `=` or `!=`"),
                    ));
                }
                match values.as_slice() {
                    [Lit::Bool(b)] => Ok(Cond::Test {
                        field,
                        op,
                        rhs: Rhs::Bool(*b),
                    }),
                    _ => bad(format!(
                        "`{name}` is a boolean; compare it with true or false"
                    )),
                }
            }
        }
    }
}

impl Cond {
    /// Evaluates the condition for one event.
    pub fn eval(&self, ctx: &Ctx<'_>) -> bool {
        match self {
            Cond::And(items) => items.iter().all(|c| c.eval(ctx)),
            Cond::Or(items) => items.iter().any(|c| c.eval(ctx)),
            Cond::Not(inner) => !inner.eval(ctx),
            Cond::Const(b) => *b,
            Cond::Truthy(field) => matches!(field.get(ctx), Value::Bool(true)),
            Cond::Test { field, op, rhs } => test(&field.get(ctx), *op, rhs, ctx),
            Cond::Macro(m) => match m.slot {
                Some(slot) => ctx.memo(slot, || m.cond.eval(ctx)),
                None => m.cond.eval(ctx),
            },
        }
    }

    /// Whether the condition can only hold for a process in a web-tier lineage (it asks
    /// for `lineage.tainted`, or for a `lineage.identity` among named ones, in every way
    /// it can hold): such rules are not even looked at for other processes.
    pub fn needs_lineage(&self) -> bool {
        match self {
            Cond::And(items) => items.iter().any(Cond::needs_lineage),
            Cond::Or(items) => !items.is_empty() && items.iter().all(Cond::needs_lineage),
            Cond::Macro(m) => m.cond.needs_lineage(),
            Cond::Truthy(Field::LineageTainted) => true,
            Cond::Test {
                field: Field::LineageTainted,
                op: Op::Eq,
                rhs: Rhs::Bool(true),
            } => true,
            Cond::Test {
                field: Field::LineageIdentity,
                op: Op::Eq,
                rhs: Rhs::Strs(items) | Rhs::Indexed(items, _),
            } => !items.is_empty() && items.iter().all(|i| !i.is_empty()),
            _ => false,
        }
    }

    /// Comparisons this condition stands for once its macros are expanded.
    pub fn weight(&self) -> u64 {
        self.measure().0
    }

    /// Comparisons this condition stands for once macros are expanded, and how deep
    /// evaluation recurses; both saturate. Macros carry theirs, so this is linear in the
    /// condition's own size however its macros nest.
    fn measure(&self) -> (u64, u32) {
        match self {
            Cond::And(items) | Cond::Or(items) => items.iter().fold((1, 1), |(w, d), c| {
                let (cw, cd) = c.measure();
                (w.saturating_add(cw), d.max(cd.saturating_add(1)))
            }),
            Cond::Not(inner) => {
                let (w, d) = inner.measure();
                (w.saturating_add(1), d.saturating_add(1))
            }
            Cond::Macro(m) => (m.weight, m.depth.saturating_add(1)),
            Cond::Test { .. } | Cond::Truthy(_) | Cond::Const(_) => (1, 1),
        }
    }

    /// Every field the condition reads.
    pub fn fields(&self, out: &mut Vec<Field>) {
        match self {
            Cond::And(items) | Cond::Or(items) => items.iter().for_each(|c| c.fields(out)),
            Cond::Not(inner) => inner.fields(out),
            Cond::Truthy(f) | Cond::Test { field: f, .. } => out.push(*f),
            Cond::Macro(m) => m.cond.fields(out),
            Cond::Const(_) => {}
        }
    }
}

fn test(value: &Value<'_>, op: Op, rhs: &Rhs, ctx: &Ctx<'_>) -> bool {
    match value {
        Value::Missing => false,
        Value::Str(s) => test_str(s, op, rhs, ctx),
        Value::List(items) => {
            let any = |op| items.iter().any(|s| test_str(s, op, rhs, ctx));
            if op == Op::Ne { !any(Op::Eq) } else { any(op) }
        }
        Value::Int(i) => match rhs {
            Rhs::Ints(ints) => match op {
                Op::Eq => ints.contains(i),
                Op::Ne => !ints.contains(i),
                Op::Lt => ints.first().is_some_and(|r| i < r),
                Op::Le => ints.first().is_some_and(|r| i <= r),
                Op::Gt => ints.first().is_some_and(|r| i > r),
                Op::Ge => ints.first().is_some_and(|r| i >= r),
                _ => false,
            },
            _ => false,
        },
        Value::Bool(b) => match (rhs, op) {
            (Rhs::Bool(r), Op::Eq) => b == r,
            (Rhs::Bool(r), Op::Ne) => b != r,
            _ => false,
        },
    }
}

fn test_str(s: &str, op: Op, rhs: &Rhs, ctx: &Ctx<'_>) -> bool {
    match rhs {
        Rhs::Strs(strs) => match op {
            Op::Eq => strs.iter().any(|r| s == r),
            Op::Ne => strs.iter().all(|r| s != r),
            Op::Contains => strs.iter().any(|r| s.contains(r.as_str())),
            Op::IContains => {
                let lower = s.to_lowercase();
                strs.iter().any(|r| lower.contains(r.as_str()))
            }
            Op::StartsWith => strs.iter().any(|r| s.starts_with(r.as_str())),
            Op::EndsWith => strs.iter().any(|r| s.ends_with(r.as_str())),
            _ => false,
        },
        Rhs::Indexed(items, index) => index.test(items, s, op),
        Rhs::Globs(globs) => globs.iter().any(|g| g.is_match(s)),
        Rhs::Regexes(res) => res.iter().any(|r| r.is_match(s)),
        Rhs::Var(name) => match ctx.var(name) {
            Some(v) => (op == Op::Eq) == (s == v),
            None => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_indexed_list_compares_like_the_plain_one() {
        let lists: [&[&str]; 3] = [
            &[
                "/etc/cron",
                "/etc/rc.d/",
                "/var/spool/cron/",
                ".bashrc",
                "authorized_keys",
                "/",
                "ab",
                "a",
                "",
            ],
            // Items that start others, siblings that sort between them, duplicates.
            &[
                "/a",
                "/a/b/z",
                "/a/b",
                "/a-",
                "/ab",
                "/etc/cron",
                "/etc/cron.d/",
                "/etc/crontab",
                "/etc/rc.d/",
                "/etc/rc.d/",
                "/var/spool/cron/",
                "/é/x",
            ],
            &["b", "ba", "bb", "c", "cab", "d", "zz"],
        ];
        let values = [
            "",
            "/",
            "a",
            "ab",
            "abc",
            "/a",
            "/a/",
            "/a/c",
            "/a/b/z/q",
            "/a-b",
            "/a.",
            "/ab",
            "/aa",
            "/etc/crontab",
            "/etc/cron.daily/x",
            "/etc/cro",
            "/etc/rc.d/rc.local",
            "/etc/rc.d",
            "/root/.bashrc",
            "/home/u/.ssh/authorized_keys",
            "/home/u/.ssh/authorized_keys2",
            "x/etc/cron",
            "/var/spool/cron",
            "/var/spool/cron/root",
            "é/ab",
            "/é/x/y",
            "/é",
            "b",
            "bab",
            "bc",
            "ca",
            "cb",
            "zz",
            "zzz",
            "z",
        ];
        for list in lists {
            let items: Arc<[String]> = list.iter().map(|s| (*s).to_owned()).collect();
            let index = StrIndex::default();
            for op in [Op::Eq, Op::Ne, Op::StartsWith, Op::EndsWith, Op::Contains] {
                for v in values {
                    let plain = match op {
                        Op::Eq => items.iter().any(|r| v == r),
                        Op::Ne => items.iter().all(|r| v != r),
                        Op::StartsWith => items.iter().any(|r| v.starts_with(r.as_str())),
                        Op::EndsWith => items.iter().any(|r| v.ends_with(r.as_str())),
                        _ => items.iter().any(|r| v.contains(r.as_str())),
                    };
                    assert_eq!(index.test(&items, v, op), plain, "{op:?} {v:?} in {list:?}");
                }
            }
        }
        let items: Arc<[String]> = lists[0].iter().map(|s| (*s).to_owned()).collect();
        // Conditions naming one long list share one index.
        let (a, b) = (
            strs_rhs(Arc::clone(&items), Op::Eq),
            strs_rhs(Arc::clone(&items), Op::StartsWith),
        );
        match (a, b) {
            (Rhs::Indexed(_, x), Rhs::Indexed(_, y)) => assert!(Arc::ptr_eq(&x, &y)),
            other => panic!("{other:?}"),
        }
    }

    fn env_compile(src: &str) -> Result<Cond, ExprError> {
        let mut lists: HashMap<String, Arc<[String]>> = HashMap::new();
        lists.insert(
            "shells".to_owned(),
            vec!["sh".to_owned(), "bash".to_owned()].into(),
        );
        let mut macros = HashMap::new();
        macros.insert("always".to_owned(), Macro::new(Cond::Const(true)));
        let vars = ["payload".to_owned()];
        let env = Env::new(&lists, &macros).on(&[EventKind::Exec]).vars(&vars);
        compile(src, &env)
    }

    #[test]
    fn parses_the_documented_forms() {
        for src in [
            r#"proc.name in (shells) and lineage.identity = "tomcat" and not always"#,
            r#"proc.exe startswith ("/tmp/", "/dev/shm/") or proc.cmdline icontains "base64""#,
            "proc.uid = 0 and proc.argc >= 3",
            r#"exec.stdio_socket and (parent.name = "java" or ancestor.name in (shells, "httpd"))"#,
            "exec.filename = $payload",
            r#"proc.cmdline regex "\\| *(ba)?sh" and proc.exe glob "/usr/*/bin/java""#,
            "proc.euid in (0, 48, '91')",
        ] {
            env_compile(src).unwrap_or_else(|e| panic!("{src}: {e:?}"));
        }
    }

    #[test]
    fn errors_point_at_the_problem() {
        let cases = [
            ("proc.nme = \"x\"", 0, "unknown field or macro `proc.nme`"),
            ("proc.name = \"x\" and", 19, "the condition ends too early"),
            ("proc.name = \"x", 12, "string is not closed"),
            (
                "proc.pid contains \"1\"",
                9,
                "`proc.pid` is a number; string operators do not apply",
            ),
            ("proc.exe", 0, "field `proc.exe` is a string, not a boolean"),
            (
                "file.path = \"/x\"",
                0,
                "field `file.path` is never set on `exec` events",
            ),
            ("proc.name in (nosuch)", 14, "unknown list `nosuch`"),
            ("exec.filename = $other", 16, "`$other` is not captured"),
            ("(proc.uid = 0", 0, "this `(` is never closed"),
            ("proc.uid = 0 proc.uid = 1", 13, "unexpected `proc.uid`"),
            ("shells", 0, "`shells` is a list"),
            ("proc.exe regex \"(\"", 15, "bad regex"),
        ];
        for (src, offset, message) in cases {
            let err = env_compile(src).expect_err(src);
            assert_eq!(err.offset, offset, "{src}: {err:?}");
            assert!(err.message.contains(message), "{src}: {err:?}");
        }
    }

    #[test]
    fn nesting_is_bounded_before_the_stack_is() {
        // 40,000 `not`s: refused at the first one past the limit, no recursion beyond it.
        let src = format!("{}proc.uid = 0", "not ".repeat(40_000));
        let err = env_compile(&src).unwrap_err();
        assert_eq!(err.offset, 4 * MAX_NESTING, "{err:?}");
        assert!(err.message.contains("nest more than 64 levels"), "{err:?}");
        let src = format!("{}proc.uid = 0{}", "(".repeat(40_000), ")".repeat(40_000));
        let err = env_compile(&src).unwrap_err();
        assert_eq!(err.offset, MAX_NESTING, "{err:?}");
        // Up to the limit is fine.
        let ok = format!("{}proc.uid = 0", "not ".repeat(MAX_NESTING));
        assert!(env_compile(&ok).is_ok());
    }

    #[test]
    fn macros_are_shared_and_their_expansion_is_bounded() {
        let lists: HashMap<String, Arc<[String]>> = HashMap::new();
        let mut macros: HashMap<String, Arc<Macro>> = HashMap::new();
        let compile_in = |src: &str, macros: &HashMap<String, Arc<Macro>>| {
            compile(src, &Env::new(&lists, macros))
        };
        macros.insert(
            "m0".into(),
            Macro::new(compile_in("proc.uid = 0", &macros).unwrap()),
        );
        // Each macro doubles the one before: m_n stands for 2^n comparisons.
        let mut refused = None;
        for n in 1..=40 {
            let src = format!("m{0} or m{0}", n - 1);
            match compile_in(&src, &macros) {
                Ok(cond) => {
                    // Shared, not copied: both sides point at the same compiled macro.
                    if let Cond::Or(items) = &cond
                        && let [Cond::Macro(a), Cond::Macro(b)] = items.as_slice()
                    {
                        assert!(Arc::ptr_eq(a, b));
                    } else {
                        panic!("m{n} is not an `or` of two shared macros: {cond:?}");
                    }
                    macros.insert(format!("m{n}"), Macro::new(cond));
                }
                Err(e) => {
                    refused = Some((n, e));
                    break;
                }
            }
        }
        let (n, err) = refused.expect("a macro doubling forty times is refused");
        assert!(
            err.message
                .contains("comparisons once its macros are expanded")
                && err.message.contains("limit is 100000"),
            "{err:?}"
        );
        // 2^17 > 100,000 >= 2^16, counting the `or` nodes too.
        assert_eq!(n, 16, "{err:?}");
    }

    #[test]
    fn a_list_named_whole_is_shared() {
        let shells: Arc<[String]> = vec!["sh".to_owned(), "bash".to_owned()].into();
        let lists = HashMap::from([("shells".to_owned(), Arc::clone(&shells))]);
        let macros = HashMap::new();
        let env = Env::new(&lists, &macros).on(&[EventKind::Exec]);
        match compile("proc.name in (shells)", &env).unwrap() {
            Cond::Test {
                rhs: Rhs::Strs(items),
                ..
            } => assert!(Arc::ptr_eq(&items, &shells)),
            other => panic!("{other:?}"),
        }
        // Mixed with literals it is a new list with both.
        match compile("proc.name in (shells, \"zsh\")", &env).unwrap() {
            Cond::Test {
                rhs: Rhs::Strs(items),
                ..
            } => assert_eq!(&*items, &["sh", "bash", "zsh"]),
            other => panic!("{other:?}"),
        }
    }
}
