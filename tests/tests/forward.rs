//! Forwarding to a SIEM end to end: a real agent streams alerts to the real collector,
//! which forwards every stored alert to a real rsyslog (Debian's, started here on
//! loopback with its own configuration, writing each message to a file). rsyslog is
//! stopped while alerts keep coming and started again: it receives every alert once.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use sensor_e2e::{
    Agent, Scratch,
    collector::{Collector, TmpProgram, agent_args, b17_of, free_port},
    rsyslog::{Rsyslog, stored_ids, wait_forwarded},
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn rsyslog_receives_every_stored_alert_once_across_its_restart() {
    let scratch = Scratch::new("forward");
    let db = scratch.path("c.db");
    let out: PathBuf = scratch.path("siem.log");
    let port = free_port();
    let mut rsyslog = Rsyslog::start(&scratch, port, &out);
    let target = format!("tcp://127.0.0.1:{port}");
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut collector = Collector::start(
        &db,
        "127.0.0.1:0",
        &["--forward-syslog", &target, "--metrics", &metrics_addr],
    );
    let url = collector.url("http");
    let spool = scratch.path("spool");
    let mut agent = Agent::start_with(&agent_args(&url, spool.to_str().unwrap(), "e2e-forward"));
    let prog = TmpProgram::new("forward");
    for _ in 0..3 {
        prog.run();
    }
    collector.wait_alerts(3, TIMEOUT, |l| b17_of(l, prog.exe()));
    wait_forwarded(&db, prog.exe(), &out, 3, TIMEOUT);
    // rsyslog may write a batch before the forwarder has seen it still open and moved
    // its cursor: a receiver gone in that window gets the batch again (at least once,
    // docs/delivery.md). The outage here starts once the cursor moved.
    let lag = format!("sensor_collector_forward_lag_alerts{{target=\"{target}\"}} ");
    let deadline = Instant::now() + TIMEOUT;
    while metric(&scrape(&metrics_addr), &lag) != 0 {
        assert!(
            Instant::now() < deadline,
            "the forwarder's cursor did not move"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The SIEM goes away; alerts keep coming and are stored.
    rsyslog.stop();
    for _ in 0..3 {
        prog.run();
    }
    collector.wait_alerts(3, TIMEOUT, |l| b17_of(l, prog.exe()));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        collector.log().contains("syslog forwarding interrupted"),
        "the outage is logged:\n{}",
        collector.log()
    );

    // The collector says how far behind the SIEM is.
    let behind = metric(&scrape(&metrics_addr), &lag);
    assert!(behind >= 3, "lag {behind} with 3 alerts waiting");

    // Back: what it missed arrives, then what comes next.
    let _rsyslog = Rsyslog::start(&scratch, port, &out);
    prog.run();
    let got = wait_forwarded(&db, prog.exe(), &out, 7, TIMEOUT);
    let ids = stored_ids(&db, prog.exe());
    assert_eq!(ids.len(), 7, "{ids:?}");
    for id in &ids {
        assert_eq!(
            got.get(id),
            Some(&1),
            "{id} received {:?} times",
            got.get(id)
        );
    }
    // The syslog header carries the host, the rule, the store's key (unique for ever:
    // what the SIEM de-duplicates on) and the alert's own id.
    let text = std::fs::read_to_string(&out).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    for line in text.lines() {
        let json = &line[line.find('{').unwrap()..];
        let alert: Value = serde_json::from_str(json).unwrap();
        let alert = &alert["alert"];
        assert!(line.contains(alert["host"].as_str().unwrap()), "{line}");
        let key = line
            .split("[sensor@32473 id=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_else(|| panic!("no structured data: {line}"));
        assert!(key.starts_with("e2e-forward:"), "{line}");
        keys.insert(key.to_owned());
        let tail = format!(
            "\" alert=\"{}\" rule=\"EPMM-B17\"",
            alert["id"].as_str().unwrap()
        );
        assert!(line.contains(&tail), "{line}");
        assert!(
            line.contains(" sensor-agent EPMM-B17 [sensor@32473 "),
            "{line}"
        );
    }
    assert_eq!(
        keys.len(),
        text.lines().count(),
        "each stored alert once: {text}"
    );
    let text = scrape(&metrics_addr);
    assert_eq!(metric(&text, &lag), 0, "{text}");
    let forwarded = format!("sensor_collector_forwarded_alerts_total{{target=\"{target}\"}} ");
    assert!(metric(&text, &forwarded) >= 7, "{text}");
    assert!(
        metric(&text, "sensor_collector_alerts_stored_total ") >= 7,
        "{text}"
    );
    assert_eq!(metric(&text, "sensor_collector_streams "), 1, "{text}");
    assert!(
        text.contains("sensor_collector_commit_seconds_bucket"),
        "{text}"
    );
    agent.stop();
    collector.stop();
}

/// The collector's /metrics page.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// The value of the series whose line starts with `prefix` (name, labels and a space).
fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}")) as u64
}
