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

use std::collections::HashMap;

use globset::{GlobBuilder, GlobMatcher};
use regex::Regex;

use super::fields::{Ctx, Field, Kind, Value};

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
    Strs(Vec<String>),
    Ints(Vec<i64>),
    Bool(bool),
    Var(String),
    Globs(Vec<GlobMatcher>),
    Regexes(Vec<Regex>),
}

/// A compiled condition.
#[derive(Clone, Debug)]
pub enum Cond {
    And(Vec<Cond>),
    Or(Vec<Cond>),
    Not(Box<Cond>),
    Test { field: Field, op: Op, rhs: Rhs },
    Truthy(Field),
    Const(bool),
}

/// Names a condition can refer to besides fields.
pub struct Env<'a> {
    pub lists: &'a HashMap<String, Vec<String>>,
    /// Already-compiled macros.
    pub macros: &'a HashMap<String, Cond>,
    /// Capture names a sequence step may use (`$name`).
    pub vars: &'a [String],
    /// Event kinds the condition runs on, to refuse fields that never apply.
    pub on: &'a [String],
}

/// Parses and type-checks `src`.
pub fn compile(src: &str, env: &Env<'_>) -> Result<Cond, ExprError> {
    let tokens = lex(src)?;
    let mut p = Parser {
        tokens,
        pos: 0,
        env,
        end: src.len(),
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
}

/// A literal on the right of a comparison, before type checking.
enum Lit {
    Str(String),
    Int(i64),
    Bool(bool),
    Var(String),
}

impl Parser<'_> {
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
            self.pos += 1;
            return Ok(Cond::Not(Box::new(self.not()?)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Cond, ExprError> {
        let offset = self.offset();
        match self.next() {
            Some((_, Tok::LParen)) => {
                let inner = self.or()?;
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
            if let Some(cond) = self.env.macros.get(name) {
                return Ok(cond.clone());
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
            && let Some(kind) = self.env.on.iter().find(|k| !applies.contains(&k.as_str()))
        {
            return Err(ExprError::at(
                offset,
                format!(
                    "field `{name}` is never set on `{kind}` events (only on: {})",
                    applies.join(", ")
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
                Some(items) => items.iter().cloned().map(Lit::Str).collect(),
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
                let mut strs = Vec::new();
                for v in values {
                    match v {
                        Lit::Str(s) => strs.push(s),
                        Lit::Int(i) => strs.push(i.to_string()),
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
                    _ => Rhs::Strs(strs),
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
                for v in values {
                    match v {
                        Lit::Int(i) => ints.push(i),
                        Lit::Str(s) => match s.parse() {
                            Ok(i) => ints.push(i),
                            Err(_) => return bad(format!("`{name}` is a number; {s:?} is not")),
                        },
                        _ => return bad(format!("`{name}` is a number")),
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
        }
    }

    /// Every field the condition reads.
    pub fn fields(&self, out: &mut Vec<Field>) {
        match self {
            Cond::And(items) | Cond::Or(items) => items.iter().for_each(|c| c.fields(out)),
            Cond::Not(inner) => inner.fields(out),
            Cond::Truthy(f) | Cond::Test { field: f, .. } => out.push(*f),
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

    fn env_compile(src: &str) -> Result<Cond, ExprError> {
        let mut lists = HashMap::new();
        lists.insert(
            "shells".to_owned(),
            vec!["sh".to_owned(), "bash".to_owned()],
        );
        let mut macros = HashMap::new();
        macros.insert("always".to_owned(), Cond::Const(true));
        let env = Env {
            lists: &lists,
            macros: &macros,
            vars: &["payload".to_owned()],
            on: &["exec".to_owned()],
        };
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
}
