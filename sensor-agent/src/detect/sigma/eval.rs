//! Evaluating every compiled Sigma rule of a category on one event: one pass of an
//! Aho-Corasick automaton per field over the field's (lowercased) text finds the literals
//! of all rules at once, so the cost grows with the event, not with the number of rules;
//! the rules' conditions then read a bit set.

use std::{cmp::Ordering, net::IpAddr, str::FromStr};

use aho_corasick::{AhoCorasick, MatchKind};

use super::{
    compile::{Atom, Base, Cond, Detection, Literals, Op, Place, Test, compare},
    view::{FIELDS, Filled, Scalar, SigmaField, View},
};

/// The literals of one field (case-folded or cased), in one automaton.
#[derive(Debug)]
struct FieldScan {
    ac: AhoCorasick,
    /// Per automaton pattern: the literal ids and where each must occur.
    hits: Vec<Vec<(u32, Place)>>,
}

/// Finds every rule's literals in an event's fields.
#[derive(Debug, Default)]
pub struct Scanner {
    /// By field index: the case-folded literals, then the cased ones.
    folded: Vec<Option<FieldScan>>,
    cased: Vec<Option<FieldScan>>,
    /// Literals that are the empty string: they match an empty field only (exact).
    empty: Vec<(SigmaField, u32, bool)>,
    literals: usize,
    /// What the last long texts held (see `TextCache`).
    cache: std::sync::Mutex<TextCache>,
}

/// Texts at least this long are remembered with the literals found in them.
const CACHED_TEXT: usize = 256;
/// How many long texts are remembered.
const CACHE_ENTRIES: usize = 64;

/// The literals found in recent long texts, by field: the command line of a JVM comes
/// back in every child's `ParentCommandLine` and in each of its restarts, and costs a
/// 3 KiB scan each time otherwise. Compared by content, so a hit is exact; a text never
/// seen before (an attacker's random argv) costs one scan as without the cache.
#[derive(Debug, Default)]
struct TextCache {
    entries: Vec<CachedText>,
    next: usize,
}

#[derive(Debug)]
struct CachedText {
    field: usize,
    cased: bool,
    text: String,
    found: Vec<u32>,
}

impl Scanner {
    pub fn new(lits: &Literals) -> Result<Self, String> {
        let mut folded: Vec<Option<FieldScan>> = (0..FIELDS).map(|_| None).collect();
        let mut cased: Vec<Option<FieldScan>> = (0..FIELDS).map(|_| None).collect();
        let mut empty = Vec::new();
        for (field, slot) in folded.iter_mut().enumerate() {
            *slot = build(lits, field, false, &mut empty)?;
        }
        for (field, slot) in cased.iter_mut().enumerate() {
            *slot = build(lits, field, true, &mut Vec::new())?;
        }
        Ok(Self {
            folded,
            cased,
            empty,
            literals: lits.entries.len(),
            cache: Default::default(),
        })
    }

    /// Scans one field's text, through the cache when it is long.
    fn scan_text(
        &self,
        field: usize,
        cased: bool,
        scan: &FieldScan,
        text: &str,
        found: &mut [u64],
    ) {
        if text.len() < CACHED_TEXT {
            run(scan, text, &mut |id| set(found, id));
            return;
        }
        let Ok(mut cache) = self.cache.lock() else {
            run(scan, text, &mut |id| set(found, id));
            return;
        };
        if let Some(hit) = cache
            .entries
            .iter()
            .find(|e| e.field == field && e.cased == cased && e.text == text)
        {
            for &id in &hit.found {
                set(found, id);
            }
            return;
        }
        let mut ids = Vec::new();
        run(scan, text, &mut |id| ids.push(id));
        for &id in &ids {
            set(found, id);
        }
        ids.sort_unstable();
        ids.dedup();
        let entry = CachedText {
            field,
            cased,
            text: text.to_owned(),
            found: ids,
        };
        let slot = cache.next;
        cache.next = (slot + 1) % CACHE_ENTRIES;
        if slot < cache.entries.len() {
            cache.entries[slot] = entry;
        } else {
            cache.entries.push(entry);
        }
    }

    /// The literals found in `view`, as a bit set indexed by literal id.
    pub fn scan(&self, view: &View<'_>, found: &mut Vec<u64>) {
        found.clear();
        found.resize(self.literals.div_ceil(64), 0);
        for (i, filled) in view.fields.iter().enumerate() {
            let Some(filled) = filled else { continue };
            if let Some(Some(scan)) = self.folded.get(i) {
                self.scan_text(i, false, scan, &filled.lower, found);
            }
            if let Some(Some(scan)) = self.cased.get(i) {
                self.scan_text(i, true, scan, &filled.text, found);
            }
        }
        for &(field, id, cased) in &self.empty {
            if let Some(f) = view.get(field) {
                let text = if cased { &f.text } else { &f.lower };
                if text.is_empty() {
                    set(found, id);
                }
            }
        }
    }
}

fn build(
    lits: &Literals,
    field: usize,
    cased: bool,
    empty: &mut Vec<(SigmaField, u32, bool)>,
) -> Result<Option<FieldScan>, String> {
    let mut patterns: Vec<&str> = Vec::new();
    let mut hits: Vec<Vec<(u32, Place)>> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for (id, lit) in lits.entries.iter().enumerate() {
        if lit.field.index() != field || lit.cased != cased {
            continue;
        }
        if lit.text.is_empty() {
            // Only an exact empty value is a literal (an empty prefix is `Present`).
            empty.push((lit.field, id as u32, cased));
            continue;
        }
        let slot = *index.entry(lit.text.as_str()).or_insert_with(|| {
            patterns.push(lit.text.as_str());
            hits.push(Vec::new());
            patterns.len() - 1
        });
        hits[slot].push((id as u32, lit.place));
    }
    if patterns.is_empty() {
        return Ok(None);
    }
    // The crate picks the automaton: a DFA for few literals, a contiguous NFA for many
    // (the ~1,600 CommandLine literals of the SigmaHQ corpus would make a 9.8 MB DFA
    // that scans no faster, measured with the detection bench).
    let ac = AhoCorasick::builder()
        .match_kind(MatchKind::Standard)
        .build(&patterns)
        .map_err(|e| format!("the literals of the Sigma rules do not fit an automaton: {e}"))?;
    Ok(Some(FieldScan { ac, hits }))
}

fn set(found: &mut [u64], id: u32) {
    found[id as usize / 64] |= 1 << (id % 64);
}

/// Calls `hit` with every literal of `scan` found in `text` where it must be.
fn run(scan: &FieldScan, text: &str, hit: &mut impl FnMut(u32)) {
    let len = text.len();
    for m in scan.ac.find_overlapping_iter(text) {
        let (start, end) = (m.start(), m.end());
        for &(id, place) in &scan.hits[m.pattern().as_usize()] {
            let placed = match place {
                Place::Anywhere => true,
                Place::Prefix => start == 0,
                Place::Suffix => end == len,
                Place::Exact => start == 0 && end == len,
            };
            if placed {
                hit(id);
            }
        }
    }
}

/// One event's view with the literals found in it.
pub struct Facts<'v, 'a> {
    pub view: &'v View<'a>,
    pub found: &'v [u64],
}

impl Facts<'_, '_> {
    fn lit(&self, id: u32) -> bool {
        self.found[id as usize / 64] & (1 << (id % 64)) != 0
    }
}

impl Detection {
    pub fn matches(&self, facts: &Facts<'_, '_>) -> bool {
        self.cond_true(&self.cond, facts)
    }

    fn cond_true(&self, cond: &Cond, facts: &Facts<'_, '_>) -> bool {
        match cond {
            Cond::Sel(i) => self.selection_true(*i, facts),
            Cond::Not(c) => !self.cond_true(c, facts),
            Cond::And(items) => items.iter().all(|c| self.cond_true(c, facts)),
            Cond::Or(items) => items.iter().any(|c| self.cond_true(c, facts)),
        }
    }

    fn selection_true(&self, i: usize, facts: &Facts<'_, '_>) -> bool {
        self.selections[i]
            .groups
            .iter()
            .any(|g| g.iter().all(|t| test_true(t, facts)))
    }

    /// The fields whose tests made the rule match (in selections that are true and not
    /// negated), with their values: the alert's evidence.
    pub fn matched_fields(&self, facts: &Facts<'_, '_>) -> Vec<(SigmaField, String)> {
        let mut out = Vec::new();
        self.collect(&self.cond, facts, &mut out);
        out.sort_by_key(|(f, _)| *f);
        out.dedup_by_key(|(f, _)| *f);
        out
    }

    fn collect(&self, cond: &Cond, facts: &Facts<'_, '_>, out: &mut Vec<(SigmaField, String)>) {
        match cond {
            Cond::Sel(i) => {
                for group in &self.selections[*i].groups {
                    if group.iter().all(|t| test_true(t, facts)) {
                        for t in group {
                            if let Some(f) = facts.view.get(t.field) {
                                out.push((t.field, f.text.to_string()));
                            }
                        }
                    }
                }
            }
            Cond::Not(_) => {}
            Cond::And(items) | Cond::Or(items) => {
                for c in items {
                    if self.cond_true(c, facts) {
                        self.collect(c, facts, out);
                    }
                }
            }
        }
    }
}

fn test_true(test: &Test, facts: &Facts<'_, '_>) -> bool {
    let Some(value) = facts.view.get(test.field) else {
        return test.exists == Some(false);
    };
    if let Some(exists) = test.exists {
        return exists;
    }
    for atom in &test.atoms {
        let hit = match atom {
            Atom::FieldRef { other, op, cased } => match facts.view.get(*other) {
                Some(o) => field_ref(value, o, *op, *cased),
                // A reference to a field the event lacks fails the whole test.
                None => return false,
            },
            _ => atom_true(atom, value, facts),
        };
        if hit != test.all {
            return hit;
        }
    }
    test.all
}

fn atom_true(atom: &Atom, value: &Filled<'_>, facts: &Facts<'_, '_>) -> bool {
    match atom {
        Atom::Lit(id) => facts.lit(*id),
        Atom::Present => true,
        Atom::Glob { re, cased } => re.is_match(if *cased { &value.text } else { &value.lower }),
        Atom::Eq(b) => equal(&value.value, b),
        Atom::Order(op, b) => order(&value.value, *op, b),
        Atom::Regex(re) => re.is_match(&value.text),
        Atom::Cidr(net) => match &value.value {
            Scalar::Str(s) => IpAddr::from_str(s).is_ok_and(|ip| net.contains(&ip)),
            _ => false,
        },
        Atom::FieldRef { .. } => false,
    }
}

fn base_of(s: &Scalar<'_>) -> Base {
    match s {
        Scalar::Str(s) => Base::Str(s.to_string()),
        Scalar::Int(i) => Base::Int(*i),
        Scalar::Bool(b) => Base::Bool(*b),
    }
}

fn equal(value: &Scalar<'_>, b: &Base) -> bool {
    match (value, b) {
        (Scalar::Str(s), Base::Str(t)) => s == t,
        (Scalar::Int(i), Base::Int(j)) => i == j,
        (Scalar::Bool(x), Base::Bool(y)) => x == y,
        _ => false,
    }
}

fn order(value: &Scalar<'_>, op: Op, b: &Base) -> bool {
    let Some(o) = compare(&base_of(value), b) else {
        return false;
    };
    match op {
        Op::Lt => o == Ordering::Less,
        Op::Lte => o != Ordering::Greater,
        Op::Gt => o == Ordering::Greater,
        Op::Gte => o != Ordering::Less,
        _ => false,
    }
}

/// `Field|fieldref|op: Other`: the two values compared as Sigma does (text operators on
/// texts only, lowercased with `str::to_lowercase` unless cased; no operator is typed
/// equality).
fn field_ref(value: &Filled<'_>, other: &Filled<'_>, op: Option<Op>, cased: bool) -> bool {
    let texts = || match (&value.value, &other.value) {
        (Scalar::Str(a), Scalar::Str(b)) => Some(if cased {
            (a.to_string(), b.to_string())
        } else {
            (a.to_lowercase(), b.to_lowercase())
        }),
        _ => None,
    };
    match op {
        None => equal(&value.value, &base_of(&other.value)),
        Some(Op::Contains) => texts().is_some_and(|(a, b)| a.contains(&b)),
        Some(Op::StartsWith) => texts().is_some_and(|(a, b)| a.starts_with(&b)),
        Some(Op::EndsWith) => texts().is_some_and(|(a, b)| a.ends_with(&b)),
        Some(op) => order(&value.value, op, &base_of(&other.value)),
    }
}
