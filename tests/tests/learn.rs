//! `sensor-agent learn`: a baseline learned on the live host quiets the appliance's own
//! maintenance shell, in replay and live, and an attacker's shell from the same JVM still
//! alerts.

use std::{path::PathBuf, process::Command, time::Duration};

use sensor_e2e::{
    Agent, Scratch, agent_bin, alert_of, json_lines, marker, replay, tomcat_reenact, traces_in,
};
use serde_json::Value;

/// The lines `replay ARGS TRACES` printed; it must succeed.
fn replayed(args: &[&str], traces: &[PathBuf]) -> Vec<Value> {
    let out = replay(args, traces);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&out)
}

/// A B2 alert (Tomcat started a shell) whose shell ran `cmd`.
fn b2_of(line: &Value, cmd: &str) -> bool {
    alert_of(line, "EPMM-B2").is_some_and(|a| a["process"]["argv"].to_string().contains(cmd))
}

fn jvm_shell(cmd: &str) {
    let out = tomcat_reenact(&["exec", "/bin/sh", "-c", cmd])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_learned_baseline_quiets_the_maintenance_shell_and_not_the_attackers() {
    let dir = Scratch::new("learn");
    let baseline = dir.path("baseline.yaml");
    let recording = dir.path("recording");
    let maintenance = format!("ulimit -n; : {}", marker("maintenance"));

    // Long enough for a JVM to start and compile the re-enactment on a loaded machine.
    let mut learner = Agent::start_with(&[
        "learn",
        "--duration",
        "30s",
        "--out",
        baseline.to_str().unwrap(),
        "--record",
        recording.to_str().unwrap(),
    ]);
    jvm_shell(&maintenance);
    learner.wait_for_log("baseline learned", Duration::from_secs(90));
    assert!(learner.stop().success(), "{}", learner.log());

    let text = std::fs::read_to_string(&baseline).unwrap();
    assert!(text.contains("rules: [EPMM-B2]"), "{text}");
    assert!(text.contains("ulimit -n; : e2e"), "{text}");
    assert!(
        text.contains("[0-9]+"),
        "the pid in the marker is a template: {text}"
    );
    let check = Command::new(agent_bin())
        .args(["rules", "check"])
        .arg(&baseline)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the learned file loads: {}",
        String::from_utf8_lossy(&check.stdout)
    );

    // The learning run's own recording: an alert without the baseline, quiet with it.
    let traces = traces_in(&recording);
    assert!(!traces.is_empty(), "the learning run recorded");
    let without = replayed(&["--collapse", "0"], &traces);
    assert!(without.iter().any(|l| b2_of(l, &maintenance)));
    let with = replayed(
        &["--collapse", "0", "--rules", baseline.to_str().unwrap()],
        &traces,
    );
    assert!(!with.iter().any(|l| b2_of(l, &maintenance)));

    // Live, with the baseline loaded: the maintenance shell is quiet, another shell from
    // the same kind of JVM is not.
    let mut agent = Agent::start(&["--rules", baseline.to_str().unwrap()]);
    jvm_shell(&maintenance);
    let attack = format!("id; : {}", marker("attacker"));
    jvm_shell(&attack);
    agent.wait_for("the attacker's shell", |l| b2_of(l, &attack));
    let quiet = agent.collect(Duration::from_millis(200), |l| b2_of(l, &maintenance));
    assert!(quiet.is_empty(), "{quiet:?}");
    agent.stop();
}
