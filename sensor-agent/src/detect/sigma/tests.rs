//! Sigma: loading, and the differential test against `sigma-rust`, the reference
//! evaluator: over the SigmaHQ corpus, the recorded fixture traces and generated events,
//! both must agree on which rules match every event.

use std::{
    borrow::Cow,
    cell::RefCell,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde_norway::Value as Yaml;

use super::*;
use crate::detect::rules;

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

#[test]
fn matches_carry_the_fields_that_matched() {
    let set = SigmaSet::from_texts(&[("r.yml", RULE)]).unwrap();
    let mut v = View::new(Category::ProcessCreation);
    v.set(SigmaField::ParentImage, text("/usr/lib/jvm/bin/JAVA"));
    v.set(SigmaField::Image, text("/bin/bash"));
    v.set(SigmaField::CommandLine, text("bash -i"));
    let m = set.matching_view(&v);
    assert_eq!(m.len(), 1);
    assert_eq!(
        m[0].fields,
        vec![
            (SigmaField::Image, "/bin/bash".to_owned()),
            (SigmaField::ParentImage, "/usr/lib/jvm/bin/JAVA".to_owned())
        ]
    );
    v.set(SigmaField::Image, text("/bin/bashful"));
    assert!(set.matching_view(&v).is_empty());
}

#[test]
fn every_modifier_the_language_has() {
    let rule = |detection: &str| {
        format!(
            "title: t\nid: x\nlogsource:\n  product: linux\n  category: process_creation\ndetection:\n{detection}\n"
        )
    };
    let cases: &[(&str, &[(&str, bool)])] = &[
        (
            "  sel:\n    CommandLine|base64offset|contains: '/bin/bash'\n  condition: sel",
            &[
                ("echo L2Jpbi9iYXNo|base64 -d", true),
                ("echo vYmluL2Jhc2g=", true),
                ("echo /bin/bash", false),
            ],
        ),
        (
            "  sel:\n    CommandLine|windash|contains: ' -exec '\n  condition: sel",
            &[
                ("find . /exec x", true),
                ("find . -exec x", true),
                ("find . exec x", false),
            ],
        ),
        (
            "  sel:\n    CommandLine|re: '^nc(at)? .*-e'\n  condition: sel",
            &[("ncat 1 -e sh", true), ("NC 1 -e", false)],
        ),
        (
            "  sel:\n    CommandLine|contains|all:\n      - 'a'\n      - 'b'\n  condition: sel",
            &[("xAyB", true), ("xa", false)],
        ),
        (
            "  sel:\n    CommandLine|cased: 'Ab'\n  condition: sel",
            &[("Ab", true), ("ab", false)],
        ),
        (
            "  sel:\n    CommandLine: 'a?c*z'\n  condition: sel",
            &[("ABCz", true), ("abz", false), ("aXcYYz", true)],
        ),
        (
            "  sel:\n    CurrentDirectory|exists: false\n  condition: sel",
            &[("anything", true)],
        ),
        (
            "  sel:\n    CommandLine|fieldref|endswith: Image\n  condition: sel",
            &[("/BIN/SH", true), ("/bin/sh -c", false)],
        ),
    ];
    for (detection, events) in cases {
        let yaml = rule(detection);
        let set = SigmaSet::from_texts(&[("r.yml", &yaml)]).unwrap();
        assert_eq!(set.len(), 1, "{detection}: {:?}", set.reports);
        let reference = sigma_rust::rule_from_yaml(&yaml).unwrap();
        for (cmdline, expected) in *events {
            let mut v = View::new(Category::ProcessCreation);
            v.set(SigmaField::CommandLine, text_owned(cmdline));
            v.set(SigmaField::Image, text("/bin/sh"));
            assert_eq!(
                !set.matching_view(&v).is_empty(),
                *expected,
                "{detection} on {cmdline}"
            );
            assert_eq!(
                reference.is_match(&reference_event(&v)),
                *expected,
                "reference: {detection} on {cmdline}"
            );
        }
    }
    let cidr = "title: t\nlogsource:\n  product: linux\n  category: network_connection\ndetection:\n  sel:\n    DestinationIp|cidr: '127.0.0.0/8'\n    DestinationPort: 4444\n  condition: sel\n";
    let set = SigmaSet::from_texts(&[("r.yml", cidr)]).unwrap();
    let mut v = View::new(Category::NetworkConnection);
    v.set(SigmaField::DestinationIp, text("127.1.2.3"));
    v.set(SigmaField::DestinationPort, Scalar::Int(4444));
    assert_eq!(set.matching_view(&v).len(), 1);
    v.set(SigmaField::DestinationPort, Scalar::Int(4445));
    assert!(set.matching_view(&v).is_empty());
}

/// Wildcards inside a value are matched by the regex engine, in time linear in the text:
/// a command line cannot make a rule with many `*`/`?` backtrack (a backtracking glob
/// takes about 4096^10 steps on this one).
#[test]
fn wildcards_cannot_be_made_slow() {
    let rule = "title: t\nlogsource:\n  product: linux\n  category: process_creation\ndetection:\n  sel:\n    CommandLine: '*?*?*?*?*?*?*?*?*?*?b'\n  condition: sel\n";
    let set = SigmaSet::from_texts(&[("r.yml", rule)]).unwrap();
    assert_eq!(set.len(), 1);
    let mut v = View::new(Category::ProcessCreation);
    v.set(SigmaField::CommandLine, text_owned(&"a".repeat(4096)));
    let start = std::time::Instant::now();
    assert!(set.matching_view(&v).is_empty());
    v.set(
        SigmaField::CommandLine,
        text_owned(&format!("{}B", "a".repeat(4095))),
    );
    assert_eq!(set.matching_view(&v).len(), 1);
    assert!(
        start.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn malformed_rules_are_invalid_with_the_reason() {
    let base = "title: t\nlogsource:\n  product: linux\n  category: process_creation\ndetection:\n";
    for (detection, reason) in [
        (
            "  sel:\n    Image: x\n  condition: sel and",
            "condition ends",
        ),
        (
            "  sel:\n    Image: x\n  condition: other",
            "not a selection",
        ),
        (
            "  sel:\n    Image|contains: 5\n  condition: sel",
            "needs string values",
        ),
        (
            "  sel:\n    Image|re: '('\n  condition: sel",
            "invalid regular expression",
        ),
        (
            "  sel:\n    Image|startswith|endswith: x\n  condition: sel",
            "conflicting",
        ),
        ("  sel:\n    Image: []\n  condition: sel", "empty list"),
        (
            "  sel:\n    Image:\n      a: b\n  condition: sel",
            "scalars",
        ),
        ("  sel:\n    Image: x", "no `condition`"),
    ] {
        let text = format!("{base}{detection}\n");
        let mut set = SigmaSet::default();
        match set.add("r.yml", &text) {
            Outcome::Invalid { reason: r } => assert!(r.contains(reason), "{detection}: {r}"),
            other => panic!("{detection}: {other:?}"),
        }
        assert!(
            sigma_rust::rule_from_yaml(&text).is_err(),
            "the reference accepts {detection}"
        );
    }
    let mut set = SigmaSet::default();
    let text = format!("{base}  sel:\n    Image: x\n  condition: sel\nlevel: severe\n");
    assert!(matches!(set.add("r.yml", &text), Outcome::Invalid { .. }));
    assert!(
        set.literals.entries.is_empty(),
        "a refused rule leaves no literal"
    );
}

fn text(s: &'static str) -> Scalar<'static> {
    Scalar::Str(Cow::Borrowed(s))
}

fn text_owned(s: &str) -> Scalar<'static> {
    Scalar::Str(Cow::Owned(s.to_owned()))
}

/// The SigmaHQ Linux rules shipped beside the project.
fn corpus_dir() -> PathBuf {
    [
        std::env::var_os("SENSOR_SIGMA_DIR").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/sigma")),
        Some(PathBuf::from("/work/shared/sigma")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_dir())
    .expect("the SigmaHQ rules are not at ../shared/sigma; set SENSOR_SIGMA_DIR")
}

/// The event the reference evaluates: the same fields and types.
fn reference_event(view: &View<'_>) -> sigma_rust::Event {
    let mut e = sigma_rust::Event::new();
    for field in view.category.fields() {
        match view.get(*field).map(|f| &f.value) {
            Some(Scalar::Str(s)) => e.insert(field.name(), s.to_string()),
            Some(Scalar::Int(i)) => e.insert(field.name(), *i),
            Some(Scalar::Bool(b)) => e.insert(field.name(), *b),
            None => {}
        }
    }
    e
}

/// The corpus, ours and the reference's, rule by rule.
struct Corpus {
    set: SigmaSet,
    /// Per loaded rule, in our order: id, category, YAML text.
    rules: Vec<(String, Category, String)>,
}

fn corpus() -> Corpus {
    let set = SigmaSet::load(&[corpus_dir()]).unwrap();
    let mut rules = Vec::new();
    let ids: Vec<(String, Category)> = set.rules().map(|(i, c)| (i.to_owned(), c)).collect();
    let mut ids = ids.into_iter();
    for report in &set.reports {
        if let Outcome::Loaded { .. } = report.outcome {
            let text = std::fs::read_to_string(&report.file).unwrap();
            if let Err(e) = sigma_rust::rule_from_yaml(&text) {
                panic!(
                    "{}: loaded by us, refused by the reference: {e}",
                    report.file
                );
            }
            let (id, category) = ids.next().unwrap();
            rules.push((id, category, text));
        }
    }
    Corpus { set, rules }
}

#[test]
fn the_corpus_loads_as_before_and_as_the_reference_reads_it() {
    let c = corpus();
    assert_eq!(c.set.counts(), (162, 5, 0), "{:#?}", c.set.reports);
    assert_eq!(c.rules.len(), 162);
    for report in &c.set.reports {
        if let Outcome::Unsupported { reason, .. } = &report.outcome {
            assert!(
                reason.contains("DestinationHostname") || reason.contains("LogonId"),
                "{}: {reason}",
                report.file
            );
        }
    }
}

/// The reference rules in force while a test runs events through us (see `observe`).
#[derive(Default)]
struct Observer {
    rules: Vec<(String, Category, sigma_rust::Rule)>,
    compared: usize,
    matched: usize,
    mismatches: Vec<String>,
}

thread_local! {
    static OBSERVER: RefCell<Option<Observer>> = const { RefCell::new(None) };
}

/// Called by `matching_view` in tests: compares our matches with the reference's.
pub(super) fn observe(view: &View<'_>, ours: &[SigmaMatch<'_>]) {
    OBSERVER.with(|o| {
        let mut o = o.borrow_mut();
        let Some(o) = o.as_mut() else { return };
        let mut ours: Vec<&str> = ours.iter().map(|m| &*m.rule.id).collect();
        ours.sort_unstable();
        let event = reference_event(view);
        let mut theirs: Vec<&str> = o
            .rules
            .iter()
            .filter(|(_, c, r)| *c == view.category && r.is_match(&event))
            .map(|(id, _, _)| id.as_str())
            .collect();
        theirs.sort_unstable();
        o.compared += 1;
        o.matched += ours.len();
        if ours != theirs && o.mismatches.len() < 20 {
            let m = format!("{view:?}: ours {ours:?}, reference {theirs:?}");
            o.mismatches.push(m);
        }
    });
}

/// Runs `f` with every match of ours compared with the reference's.
fn observed(c: &Corpus, f: impl FnOnce()) -> Observer {
    let rules = c
        .rules
        .iter()
        .map(|(id, category, text)| {
            let r = sigma_rust::rule_from_yaml(text).unwrap();
            (id.clone(), *category, r)
        })
        .collect();
    OBSERVER.with(|o| {
        *o.borrow_mut() = Some(Observer {
            rules,
            ..Observer::default()
        })
    });
    f();
    OBSERVER.with(|o| o.borrow_mut().take()).unwrap_or_default()
}

#[test]
fn fixture_traces_agree_with_the_reference() {
    let c = corpus();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules/fixtures");
    let mut traces: Vec<PathBuf> = std::fs::read_dir(&fixtures)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".trace.zst"))
        .collect();
    traces.sort();
    assert!(traces.len() >= 3, "{traces:?}");
    let set = Arc::new(SigmaSet::load(&[corpus_dir()]).unwrap());
    let pack = Arc::new(
        rules::compile_texts(&[(rules::DEFAULT_PACK_NAME.into(), rules::DEFAULT_PACK.into())])
            .unwrap(),
    );
    let o = observed(&c, || {
        for trace in &traces {
            let opts = crate::replay::ReplayOptions {
                traces: vec![trace.clone()],
                print_events: false,
                collapse_window_ns: None,
            };
            let summary =
                crate::replay::replay(&opts, pack.clone(), set.clone(), &mut std::io::sink());
            assert!(summary.events > 0, "{}", trace.display());
        }
    });
    assert!(o.mismatches.is_empty(), "{:#?}", o.mismatches);
    assert!(
        o.compared > 50,
        "only {} Sigma events in the fixtures",
        o.compared
    );
    assert!(o.matched > 0, "no Sigma rule matched any fixture event");
}

/// One group of a rule: each field with the values it is compared with.
type GroupValues = Vec<(SigmaField, Vec<String>)>;

/// Random events built from the rules' own literals (whole, cut, cased otherwise, at
/// the edges of longer values) so that the corpus reaches matches and near misses.
struct Generator {
    rng: fastrand::Rng,
    /// Per category: the rules' groups as (field, values) lists.
    groups: Vec<Vec<GroupValues>>,
    /// Per field index: every literal any rule compares it with.
    pool: Vec<Vec<String>>,
}

impl Generator {
    fn new(c: &Corpus, seed: u64) -> Self {
        let mut groups = vec![Vec::new(); 3];
        let mut pool = vec![Vec::new(); super::view::FIELDS];
        for (_, category, text) in &c.rules {
            let yaml: Yaml = serde_norway::from_str(text).unwrap();
            for (name, sel) in yaml["detection"].as_mapping().unwrap() {
                if name.as_str() == Some("condition") {
                    continue;
                }
                let maps: Vec<&serde_norway::Mapping> = match sel {
                    Yaml::Mapping(m) => vec![m],
                    Yaml::Sequence(s) => s.iter().filter_map(Yaml::as_mapping).collect(),
                    _ => Vec::new(),
                };
                for m in maps {
                    let mut group = Vec::new();
                    for (key, values) in m {
                        let name = key.as_str().unwrap().split('|').next().unwrap();
                        let Some(field) = category.field(name) else {
                            continue;
                        };
                        let values: Vec<String> = match values {
                            Yaml::Sequence(s) => s.iter().map(scalar_text).collect(),
                            v => vec![scalar_text(v)],
                        };
                        pool[field.index()].extend(values.iter().cloned());
                        group.push((field, values));
                    }
                    groups[category.index()].push(group);
                }
            }
        }
        Self {
            rng: fastrand::Rng::with_seed(seed),
            groups,
            pool,
        }
    }

    fn filler(&mut self) -> String {
        const PIECES: &[&str] = &[
            "", " ", "/", "-", "a", "x", "/tmp/", " -c ", "=", ".", "sh", "\u{0130}", "Σ",
        ];
        (0..self.rng.usize(0..3))
            .map(|_| PIECES[self.rng.usize(..PIECES.len())])
            .collect()
    }

    /// A value from a rule literal: wildcards filled, cut, recased, embedded.
    fn around(&mut self, literal: &str) -> String {
        let mut v = String::new();
        let mut escaped = false;
        for ch in literal.chars() {
            match ch {
                '\\' if !escaped => escaped = true,
                '*' if !escaped => v.push_str(&self.filler()),
                '?' if !escaped => v.push(self.rng.alphanumeric()),
                _ => {
                    escaped = false;
                    v.push(ch);
                }
            }
        }
        match self.rng.usize(0..10) {
            0 => {
                let mut chars = v.chars();
                chars.next();
                v = chars.as_str().to_owned();
            }
            1 => {
                v.pop();
            }
            _ => {}
        }
        v = match self.rng.usize(0..4) {
            0 => v.to_uppercase(),
            1 => v
                .chars()
                .map(|c| {
                    if self.rng.bool() {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect(),
            _ => v,
        };
        match self.rng.usize(0..4) {
            0 => v,
            1 => format!("{}{v}", self.filler()),
            2 => format!("{v}{}", self.filler()),
            _ => format!("{}{v}{}", self.filler(), self.filler()),
        }
    }

    fn value(&mut self, field: SigmaField, wanted: Option<&[String]>) -> Option<Scalar<'static>> {
        use SigmaField as F;
        if self.rng.usize(0..12) == 0 {
            return None;
        }
        let literal = match wanted {
            Some(values) if self.rng.usize(0..5) != 0 => {
                Some(values[self.rng.usize(..values.len())].clone())
            }
            _ => {
                let pool = &self.pool[field.index()];
                (!pool.is_empty() && self.rng.bool())
                    .then(|| pool[self.rng.usize(..pool.len())].clone())
            }
        };
        let numeric = matches!(
            field,
            F::ProcessId | F::ParentProcessId | F::DestinationPort | F::SourcePort
        );
        if numeric {
            let n = literal
                .and_then(|l| l.parse::<i64>().ok())
                .unwrap_or_else(|| self.rng.i64(0..70_000));
            return Some(Scalar::Int(n));
        }
        let text = match literal {
            Some(l) => self.around(&l),
            None => self.filler(),
        };
        Some(Scalar::Str(Cow::Owned(text)))
    }

    fn event(&mut self) -> View<'static> {
        let category = Category::ALL[self.rng.usize(..3)];
        let groups = &self.groups[category.index()];
        let group = if groups.is_empty() {
            Vec::new()
        } else {
            groups[self.rng.usize(..groups.len())].clone()
        };
        let mut view = View::new(category);
        for &field in category.fields() {
            let wanted = group
                .iter()
                .find(|(f, _)| *f == field)
                .map(|(_, v)| v.as_slice());
            if let Some(value) = self.value(field, wanted) {
                view.set(field, value);
            }
        }
        view
    }
}

fn scalar_text(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// `SENSOR_SIGMA_DIFFERENTIAL_EVENTS` events (20,000 by default; `cargo xtask test` runs a
/// million in a release build) generated from the corpus's literals.
#[test]
fn generated_events_agree_with_the_reference() {
    let events: usize = std::env::var("SENSOR_SIGMA_DIFFERENTIAL_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let c = corpus();
    let mut generator = Generator::new(&c, 0x5167_4d41);
    let start = std::time::Instant::now();
    let o = observed(&c, || {
        for _ in 0..events {
            let view = generator.event();
            c.set.matching_view(&view);
        }
    });
    eprintln!(
        "{} generated events, {} rule matches, compared with the reference in {:.1} s",
        o.compared,
        o.matched,
        start.elapsed().as_secs_f64()
    );
    assert!(o.mismatches.is_empty(), "{:#?}", o.mismatches);
    assert_eq!(o.compared, events);
    assert!(
        o.matched > events / 50,
        "too few matches to tell: {}",
        o.matched
    );
}
