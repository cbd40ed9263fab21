//! The committed fixture traces (rules/fixtures, recorded from real re-enactments) replayed
//! through the default pack: the rules expected for each fire, the others do not.

use std::{path::PathBuf, sync::Arc};

use sensor_agent::{
    detect::{rules, sigma::SigmaSet},
    replay::{ReplayOptions, replay},
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../rules/fixtures")
}

#[test]
fn fixtures_raise_the_expected_rules() {
    let set = Arc::new(rules::load(&[], true).unwrap());
    let expected = std::fs::read_to_string(fixtures().join("expected.txt")).unwrap();
    let mut checked = 0;
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (file, rules) = line.split_once(':').unwrap();
        let mut out = Vec::new();
        let summary = replay(
            &ReplayOptions {
                traces: vec![fixtures().join(file)],
                print_events: false,
                collapse_window_ns: None,
            },
            Arc::clone(&set),
            Arc::new(SigmaSet::default()),
            &mut out,
        );
        assert_eq!(summary.failed, 0, "{file}");
        assert_eq!(summary.truncated, 0, "{file}");
        let fired: Vec<String> = String::from_utf8(out)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["alert"]["ruleId"].as_str().map(str::to_owned)
            })
            .collect();
        for rule in rules.split_whitespace() {
            match rule.strip_prefix('!') {
                Some(absent) => assert!(
                    !fired.iter().any(|f| f == absent),
                    "{file}: {absent} fired: {fired:?}"
                ),
                None => assert!(
                    fired.iter().any(|f| f == rule),
                    "{file}: {rule} did not fire: {fired:?}"
                ),
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 3);
}

#[test]
fn the_same_fixture_replays_byte_for_byte() {
    let set = Arc::new(rules::load(&[], true).unwrap());
    let run = || {
        let mut out = Vec::new();
        replay(
            &ReplayOptions {
                traces: vec![fixtures().join("java-reverse-shell.trace.zst")],
                print_events: true,
                collapse_window_ns: None,
            },
            Arc::clone(&set),
            Arc::new(SigmaSet::default()),
            &mut out,
        );
        out
    };
    let first = run();
    assert!(!first.is_empty());
    assert_eq!(first, run());
}
