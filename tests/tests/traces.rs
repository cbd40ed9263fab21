//! Traces end to end: a live re-enactment recorded and replayed gives the live run's
//! alerts; replay is deterministic; the flight recorder keeps what came before an alert;
//! damaged files are reported by name and offset.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use sensor_e2e::{
    Agent, ReverseShell, Scratch, alert_of, json_lines as lines, marker, replay, tomcat_reenact,
    traces_in,
};
use serde_json::Value;

/// An alert without the flight-record path, the one field replay does not reproduce.
fn comparable(mut line: Value) -> Value {
    if let Some(alert) = line.get_mut("alert").and_then(Value::as_object_mut) {
        alert.remove("flightRecord");
    }
    line
}

fn reverse_shell(tag: &str) {
    ReverseShell::start(tag).exit();
}

#[test]
fn a_recorded_re_enactment_replays_to_the_same_alerts() {
    let dir = Scratch::new("record");
    let mut agent = Agent::start(&["--record", &format!("{}/", dir.str())]);
    let tag = marker("replay");
    let out = tomcat_reenact(&["exec", "/bin/sh", "-c", &format!("id; echo {tag}")])
        .output()
        .unwrap();
    assert!(out.status.success());
    reverse_shell(&tag);
    agent.wait_for("the Tomcat shell", |l| alert_of(l, "EPMM-B2").is_some());
    agent.wait_for("the reverse shell", |l| alert_of(l, "EPMM-B7").is_some());
    let status = agent.stop();
    assert!(status.success());

    let traces = traces_in(&dir.0);
    assert!(!traces.is_empty(), "the agent recorded");
    // The live agent ran with --collapse 0 (the harness's default): so does the replay.
    let out = replay(&["--collapse", "0"], &traces);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed: Vec<Value> = lines(&out).into_iter().map(comparable).collect();
    let live: Vec<Value> = agent_alerts_after_stop(&mut agent);
    assert!(live.iter().any(|l| alert_of(l, "EPMM-B2").is_some()));
    assert_eq!(
        replayed, live,
        "replay prints exactly the live run's alerts"
    );
}

/// Every alert line the agent printed, flight paths removed.
fn agent_alerts_after_stop(agent: &mut Agent) -> Vec<Value> {
    agent
        .collect(std::time::Duration::from_millis(100), |l| {
            l.get("alert").is_some()
        })
        .into_iter()
        .map(comparable)
        .collect()
}

#[test]
fn replay_is_deterministic_and_prints_events_on_request() {
    let dir = Scratch::new("determinism");
    let trace = dir.path("one.trace");
    let mut agent = Agent::start(&["--record", trace.to_str().unwrap()]);
    let tag = marker("det");
    reverse_shell(&tag);
    agent.wait_for("the reverse shell", |l| alert_of(l, "EPMM-B7").is_some());
    agent.stop();
    let traces = [trace];
    let first = replay(&["--events"], &traces);
    let second = replay(&["--events"], &traces);
    assert!(first.status.success());
    assert_eq!(first.stdout, second.stdout, "byte for byte");
    let all = lines(&first);
    assert!(
        all.iter()
            .any(|l| l["event"]["exec"]["argv"].to_string().contains(&tag))
    );
    assert!(all.iter().any(|l| alert_of(l, "EPMM-B7").is_some()));
}

#[test]
fn the_flight_record_of_an_alert_holds_what_came_before_it() {
    let flights = Scratch::new("flight");
    // No collapse: another test's reverse shell, seen first, must not absorb this one.
    let mut agent = Agent::start(&[
        "--flight-dir",
        flights.str(),
        "--flight-after",
        "1",
        "--collapse",
        "0",
    ]);
    let before = marker("before");
    let status = Command::new("/bin/echo")
        .arg(&before)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let tag = marker("flight");
    reverse_shell(&tag);
    // This test's shell: its parent's command line carries the tag (other tests' reverse
    // shells run meanwhile).
    let line = agent.wait_for("the alert", |l| {
        alert_of(l, "EPMM-B7").is_some_and(|a| {
            a["process"]["argv"].to_string().contains("-i")
                && a["ancestry"][0]["argv"].to_string().contains(&tag)
        })
    });
    let path = line["alert"]["flightRecord"]
        .as_str()
        .expect("the alert names its flight record")
        .to_owned();
    assert!(path.starts_with(flights.str()), "{path}");
    agent.stop();
    let out = replay(&["--events"], &[PathBuf::from(&path)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = lines(&out);
    let echo = events
        .iter()
        .position(|l| l["event"]["exec"]["argv"].to_string().contains(&before))
        .expect("the echo from before the alert is in the flight record");
    let shell = events
        .iter()
        .position(|l| l["event"]["exec"]["argv"].to_string().contains(&tag))
        .expect("the alert's shell is in the flight record");
    assert!(echo < shell);
}

#[test]
fn damaged_traces_are_reported_by_file_and_offset() {
    let dir = Scratch::new("damaged");
    let trace = dir.path("t.trace");
    let mut agent = Agent::start(&["--record", trace.to_str().unwrap()]);
    for _ in 0..20 {
        Command::new("/bin/true").status().unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    agent.stop();
    let full = std::fs::read(&trace).unwrap();

    // Cut: the complete records before the cut are replayed; the cut is reported.
    let cut = dir.path("cut.trace");
    std::fs::write(&cut, &full[..full.len() - 3]).unwrap();
    let out = replay(&["--events"], std::slice::from_ref(&cut));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}: truncated at offset", cut.display())),
        "{stderr}"
    );
    assert!(!lines(&out).is_empty(), "records before the cut");

    // Not a trace; another version: refused by name, non-zero exit, no panic.
    let junk = dir.path("junk.trace");
    std::fs::write(&junk, b"{\"not\": \"a trace\"}").unwrap();
    let out = replay(&[], std::slice::from_ref(&junk));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}: not a trace file", junk.display())),
        "{stderr}"
    );
    let mut v9 = full.clone();
    v9[6] = 9;
    let other = dir.path("v9.trace");
    std::fs::write(&other, v9).unwrap();
    let out = replay(&[], std::slice::from_ref(&other));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("trace format version 9; this agent reads version 1")
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
