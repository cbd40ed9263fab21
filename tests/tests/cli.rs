//! The command line on bad input: precise errors, non-zero exits, nothing started.

use std::process::Command;

use sensor_e2e::{Scratch, agent_bin, sigma_linux_rules};

#[test]
fn rules_check_reports_file_line_column_and_fails() {
    let dir = Scratch::new("badrules");
    std::fs::write(
        dir.path("bad.yaml"),
        "rules:\n  - id: LOCAL-1\n    title: t\n    severity: high\n    on: [exec]\n    condition: proc.name = \"sh\" and proc.nmae = \"x\"\n",
    )
    .unwrap();
    std::fs::write(dir.path("also-bad.yaml"), "lists: [\n").unwrap();
    let out = Command::new(agent_bin())
        .args(["rules", "check", dir.str()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bad = format!(
        "{}:6:37: unknown field or macro `proc.nmae`",
        dir.path("bad.yaml").display()
    );
    assert!(stdout.contains(&bad), "{stdout}");
    assert!(
        stdout.contains(&format!("{}:", dir.path("also-bad.yaml").display())),
        "{stdout}"
    );
}

#[test]
fn rules_check_accepts_good_rules_and_counts_sigma() {
    let dir = Scratch::new("goodrules");
    std::fs::write(
        dir.path("local.yaml"),
        "append:\n  - name: shells\n    items: [yash]\nrules:\n  - id: LOCAL-2\n    title: yash from the web tier\n    severity: medium\n    techniques: [T1059]\n    on: [exec]\n    condition: web_child and proc.name = \"yash\"\n",
    )
    .unwrap();
    let sigma = sigma_linux_rules();
    let out = Command::new(agent_bin())
        .args([
            "rules",
            "check",
            dir.str(),
            "--sigma",
            sigma.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("files: ok") || stdout.contains(": ok"),
        "{stdout}"
    );
    // ../shared/sigma/rules/linux: every process_creation, network_connection and
    // file_event rule loads except those naming fields Linux events do not have.
    assert!(
        stdout.contains("sigma: 130 loaded, 5 unsupported, 0 invalid"),
        "{stdout}"
    );
    assert!(
        stdout.contains("field `DestinationHostname` is not available"),
        "{stdout}"
    );
}

/// `rules check` shows the enforcement policy as compiled, an operator's extension
/// included, and names allowed executables that do not exist on this host.
#[test]
fn rules_check_shows_the_enforcement_policy() {
    let dir = Scratch::new("enforcerules");
    std::fs::write(
        dir.path("local.yaml"),
        "enforce:\n  - identity: rewritemap-helper\n    append: true\n    allow: [/usr/bin/sha256sum, /opt/nowhere/tool]\n",
    )
    .unwrap();
    let out = Command::new(agent_bin())
        .args(["rules", "check", dir.str()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("enforcement: 2 identities"), "{stdout}");
    assert!(
        stdout.contains(
            "rewritemap-helper (label 1, rule enforce:rewritemap-helper): may run /usr/bin/date, /bin/date, /usr/bin/sha256sum, /opt/nowhere/tool; never socket_stdio, unlinked, tmp_written"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("tomcat (label 2, rule enforce:tomcat): may run anything not denied; never socket_stdio, unlinked, tmp_written"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "warning: rewritemap-helper: allowed executable /opt/nowhere/tool does not exist here"
        ),
        "{stdout}"
    );
}

/// A file rule that no watched place serves is named; one that confines its path is not.
#[test]
fn rules_check_warns_about_a_file_rule_no_probe_can_see() {
    let dir = Scratch::new("blindrules");
    std::fs::write(
        dir.path("local.yaml"),
        "rules:\n  - id: LOCAL-BLIND\n    title: any php file\n    severity: high\n    on: [file]\n    condition: file.ext = \"php\"\n  - id: LOCAL-SEEN\n    title: php in the web root\n    severity: high\n    on: [file]\n    condition: file.path startswith \"/srv/www/\" and file.ext = \"php\"\n",
    )
    .unwrap();
    let out = Command::new(agent_bin())
        .args(["rules", "check", dir.str()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("warning: rule LOCAL-BLIND: its condition does not confine file.path"),
        "{stdout}"
    );
    assert!(!stdout.contains("LOCAL-SEEN"), "{stdout}");
}

#[test]
fn run_refuses_broken_rules_before_loading_anything() {
    sensor_e2e::require_root();
    let dir = Scratch::new("brokenrun");
    std::fs::write(dir.path("x.yaml"), "rules:\n  - id: X\n    title: t\n    severity: nope\n    on: [exec]\n    condition: proc.uid = 0\n").unwrap();
    let out = Command::new(agent_bin())
        .args(["run", "--rules", dir.str()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("x.yaml:4:15: severity `nope` is not one of low, medium, high, critical"),
        "{stderr}"
    );
    assert!(!stderr.contains("ready"), "{stderr}");
}

#[test]
fn an_unknown_probe_or_hook_mode_is_refused_on_the_command_line() {
    for (flag, value) in [("--skip-probe", "nett"), ("--syscall-hooks", "kprobe")] {
        let out = Command::new(agent_bin())
            .args(["run", flag, value])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("invalid value '{value}'")) && stderr.contains("sys_exit"),
            "{stderr}"
        );
    }
}

/// `learn` says what is wrong with its arguments and with its traces, and writes nothing.
#[test]
fn learn_refuses_bad_arguments_and_unreadable_traces() {
    let dir = Scratch::new("learnargs");
    let out_file = dir.path("baseline.yaml");
    let garbage = dir.path("garbage.trace");
    std::fs::write(&garbage, b"not a trace at all").unwrap();
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["--out", out_file.to_str().unwrap()], "give --duration"),
        (
            vec!["--duration", "soon", "--out", out_file.to_str().unwrap()],
            "`soon` is not a duration",
        ),
        (
            vec![
                "--duration",
                "5s",
                "--out",
                out_file.to_str().unwrap(),
                garbage.to_str().unwrap(),
            ],
            "not both",
        ),
        (
            vec![
                "--out",
                out_file.to_str().unwrap(),
                garbage.to_str().unwrap(),
            ],
            "could not be read",
        ),
    ];
    for (args, expected) in cases {
        let out = Command::new(agent_bin())
            .arg("learn")
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!out_file.exists(), "{args:?} wrote a baseline");
    }
}
