//! SigmaHQ rules (`--sigma DIR`): Linux `process_creation`, `network_connection` and
//! `file_event` rules, compiled at load into our own matcher (see `compile`) and evaluated
//! on a Sigma-shaped view of our events (see `view` for the field mapping). All the
//! rules' literals are found in one pass per field (see `eval`), so an event costs about
//! the same with 10 rules as with 200. A rule that uses a field we cannot fill, or a
//! modifier we cannot evaluate exactly, is not loaded and is reported with the reason: a
//! rule that silently never matches is worse than one that says it cannot.
//!
//! `sigma-rust` is the reference: the differential test in `tests.rs` (the SigmaHQ corpus,
//! the fixture traces, and generated events: 20,000 under `cargo test`, 1,000,000 in a
//! release build under `cargo xtask test`) checks that both agree on which rules match.

mod compile;
mod eval;
mod view;

use std::path::{Path, PathBuf};

use sensor_proto::v1::Event;
use serde_norway::Value as Yaml;

pub use self::view::{Category, Filled, Scalar, SigmaField, View, view};
use self::{
    compile::{Detection, Literals, Refusal},
    eval::{Facts, Scanner},
};
use super::{
    fields::Ctx,
    rules::{Body, Rule, Severity, Technique},
};

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
    detection: Detection,
}

/// The loaded Sigma rules and what happened to every file.
#[derive(Default)]
pub struct SigmaSet {
    rules: Vec<SigmaRule>,
    /// Rule indexes by category.
    by_category: [Vec<usize>; 3],
    /// Per category, the rules evaluated for every event (no trigger literals).
    always: [Vec<usize>; 3],
    /// Per literal id, the rules it triggers (see `Detection::trigger`).
    triggers: Vec<Vec<usize>>,
    literals: Literals,
    scanner: Scanner,
    pub reports: Vec<Report>,
}

impl std::fmt::Debug for SigmaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigmaSet")
            .field("rules", &self.rules.len())
            .field("literals", &self.literals.entries.len())
            .field("reports", &self.reports.len())
            .finish()
    }
}

/// A rule that matched one event, and the fields that made it match with their values.
pub struct SigmaMatch<'s> {
    pub rule: &'s Rule,
    pub fields: Vec<(SigmaField, String)>,
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
        set.build().map_err(std::io::Error::other)?;
        Ok(set)
    }

    /// Compiles rule texts given as (file name, text): the outcome of each.
    pub fn from_texts(texts: &[(&str, &str)]) -> Result<Self, String> {
        let mut set = SigmaSet::default();
        for (file, text) in texts {
            let outcome = set.add(file, text);
            set.reports.push(Report {
                file: (*file).to_owned(),
                outcome,
            });
        }
        set.build()?;
        Ok(set)
    }

    /// Builds the shared literal matcher once every rule is in.
    fn build(&mut self) -> Result<(), String> {
        self.scanner = Scanner::new(&self.literals)?;
        self.always = Default::default();
        self.triggers = vec![Vec::new(); self.literals.entries.len()];
        for (i, r) in self.rules.iter().enumerate() {
            match r.detection.trigger() {
                Some(lits) => {
                    for id in lits {
                        self.triggers[id as usize].push(i);
                    }
                }
                None => self.always[r.category.index()].push(i),
            }
        }
        Ok(())
    }

    /// Parses one rule text and keeps it when it can be evaluated exactly.
    fn add(&mut self, file: &str, text: &str) -> Outcome {
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
        let meta = match Meta::parse(&doc) {
            Ok(m) => m,
            Err(reason) => return Outcome::Invalid { reason },
        };
        // Literals of a refused rule must not stay in the shared matcher.
        let mut literals = std::mem::take(&mut self.literals);
        let mark = literals.entries.len();
        let detection = match compile::compile(&doc["detection"], category, &mut literals) {
            Ok(d) => d,
            Err(refusal) => {
                literals.truncate(mark);
                self.literals = literals;
                return match refusal {
                    Refusal::Unsupported(reason) => Outcome::Unsupported {
                        category: category_name.to_owned(),
                        reason,
                    },
                    Refusal::Invalid(reason) => Outcome::Invalid { reason },
                };
            }
        };
        self.literals = literals;
        let id = meta.id.unwrap_or_else(|| file.to_owned());
        let rule = Rule {
            id: format!("sigma:{id}").into(),
            title: meta.title.into(),
            severity: meta.severity,
            techniques: meta.techniques,
            rationale: meta.description.trim().into(),
            source: format!("sigma:{file}").into(),
            body: Body::Sigma,
        };
        self.by_category[category.index()].push(self.rules.len());
        self.rules.push(SigmaRule {
            rule,
            category,
            detection,
        });
        Outcome::Loaded {
            id: format!("sigma:{id}"),
            category: category.name(),
        }
    }

    /// The rules matching `event`, with the fields that made each match.
    pub fn matching<'s, 'e>(&'s self, event: &'e Event, ctx: &Ctx<'e>) -> Vec<SigmaMatch<'s>> {
        if self.rules.is_empty() {
            return Vec::new();
        }
        let Some(view) = view(event, ctx) else {
            return Vec::new();
        };
        self.matching_view(&view)
    }

    /// The rules matching an event as Sigma sees it.
    pub fn matching_view<'s>(&'s self, view: &View<'_>) -> Vec<SigmaMatch<'s>> {
        if self.by_category[view.category.index()].is_empty() {
            return Vec::new();
        }
        let mut found = Vec::new();
        self.scanner.scan(view, &mut found);
        // The rules worth evaluating: those without triggers, and those a found literal
        // triggers; in load order.
        let mut candidates = self.always[view.category.index()].clone();
        for (word, bits) in found.iter().enumerate() {
            let mut bits = *bits;
            while bits != 0 {
                let id = word * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(rules) = self.triggers.get(id) {
                    candidates.extend(rules);
                }
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        let facts = Facts {
            view,
            found: &found,
        };
        let matched: Vec<SigmaMatch<'s>> = candidates
            .iter()
            .map(|&i| &self.rules[i])
            .filter(|r| r.category == view.category)
            .filter(|r| r.detection.matches(&facts))
            .map(|r| SigmaMatch {
                rule: &r.rule,
                fields: r.detection.matched_fields(&facts),
            })
            .collect();
        #[cfg(test)]
        tests::observe(view, &matched);
        matched
    }

    /// The loaded rules' ids and categories, in load order.
    pub fn rules(&self) -> impl Iterator<Item = (&str, Category)> {
        self.rules.iter().map(|r| (&*r.rule.id, r.category))
    }
}

/// What a Sigma rule says about itself.
struct Meta {
    title: String,
    id: Option<String>,
    severity: Severity,
    techniques: Vec<Technique>,
    description: String,
}

impl Meta {
    fn parse(doc: &Yaml) -> Result<Self, String> {
        let opt_str = |key: &str| -> Result<Option<String>, String> {
            match &doc[key] {
                Yaml::Null => Ok(None),
                Yaml::String(s) => Ok(Some(s.clone())),
                other => Err(format!("`{key}` must be a string, not {other:?}")),
            }
        };
        let title = opt_str("title")?.ok_or("the rule has no `title`")?;
        if let Some(status) = opt_str("status")?
            && ![
                "stable",
                "test",
                "experimental",
                "deprecated",
                "unsupported",
            ]
            .contains(&status.as_str())
        {
            return Err(format!("unknown status `{status}`"));
        }
        let severity = match opt_str("level")? {
            None => Severity::Low,
            Some(level) => match level.as_str() {
                "informational" | "low" | "medium" | "high" | "critical" => {
                    Severity::parse(&level).unwrap_or(Severity::Low)
                }
                _ => return Err(format!("unknown level `{level}`")),
            },
        };
        let techniques = match &doc["tags"] {
            Yaml::Null => Vec::new(),
            Yaml::Sequence(tags) => {
                let mut out = Vec::new();
                for tag in tags {
                    let Some(tag) = tag.as_str() else {
                        return Err(format!("tag {tag:?} is not a string"));
                    };
                    if let Some(t) = tag.strip_prefix("attack.").and_then(Technique::parse) {
                        out.push(t);
                    }
                }
                out
            }
            other => return Err(format!("`tags` must be a list, not {other:?}")),
        };
        Ok(Self {
            title,
            id: opt_str("id")?,
            severity,
            techniques,
            description: opt_str("description")?.unwrap_or_default(),
        })
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

#[cfg(test)]
mod tests;
