//! Running as a service, end to end with the real probes: the configuration file, SIGHUP
//! reload, the metrics endpoint, the systemd notification protocol, self-health alerts.

use std::{
    io::{Read, Write},
    os::unix::net::UnixDatagram,
    process::Command,
    time::{Duration, Instant},
};

use sensor_e2e::{
    Agent, LINE_TIMEOUT, Scratch, agent_bin, alert_of,
    collector::{TmpProgram, b17_of, free_port},
    event_of, marker, num,
};
use serde_json::Value;

#[test]
fn configuration_errors_name_the_file_line_and_key() {
    let scratch = Scratch::new("config-bad");
    let path = scratch.path("agent.toml");
    for (text, expect) in [
        (
            "[agent]\nring_mib = 16\nringmib = 4\n",
            ":3:1: unknown field `ringmib`",
        ),
        ("[agent]\nring_mib = 3\n", "powers of two"),
        ("[collector]\nheartbeat_seconds = \"often\"\n", ":2:"),
        (
            "[agent]\nskip_probes = [\"all\"]\n",
            "expected one of `sys_exit`",
        ),
        (
            "[agent]\nsyscall_hooks = \"kprobes\"\n",
            "expected `auto` or `sys_exit`",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let out = Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&path)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{}", path.display())) && stderr.contains(expect),
            "{text:?}: {stderr}"
        );
    }
    let out = Command::new(agent_bin())
        .args(["run", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
}

#[test]
fn the_configuration_file_applies_and_flags_override_it() {
    let scratch = Scratch::new("config-good");
    let path = scratch.path("agent.toml");
    std::fs::write(
        &path,
        "[agent]\nagent_id = \"from-file\"\ncollapse_seconds = 0\n",
    )
    .unwrap();
    let prog = TmpProgram::new("config");
    let config = path.to_str().unwrap();
    let mut from_file = Agent::start_with(&["run", "--config", config]);
    let mut from_flag = Agent::start_with(&["run", "--config", config, "--agent-id", "from-flag"]);
    prog.run();
    prog.run();
    let a = from_file.wait_for("B17", |l| b17_of(l, prog.exe()));
    assert_eq!(a["alert"]["agentId"], "from-file");
    let b = from_flag.wait_for("B17", |l| b17_of(l, prog.exe()));
    assert_eq!(b["alert"]["agentId"], "from-flag");
    // collapse_seconds = 0 from the file: both runs are alerts of their own.
    let both = from_file.collect(Duration::from_secs(2), |l| b17_of(l, prog.exe()));
    assert_eq!(both.len(), 2, "{both:#?}");
    from_file.stop();
    from_flag.stop();
}

fn rule(id: &str, tag: &str) -> String {
    format!(
        "rules:\n  - id: {id}\n    title: e2e reload\n    severity: low\n    techniques: [T1059]\n    rationale: test\n    on: [exec]\n    condition: proc.cmdline contains \"{tag}\"\n"
    )
}

fn self_alert<'a>(line: &'a Value, what: &str) -> Option<&'a Value> {
    alert_of(line, "SELF-CONFIG").filter(|a| a["details"]["reload"] == what)
}

#[test]
fn sighup_applies_a_good_rule_set_and_refuses_a_broken_one() {
    let scratch = Scratch::new("reload");
    let rules_dir = scratch.path("rules");
    let watched = scratch.path("watched");
    std::fs::create_dir_all(&rules_dir).unwrap();
    std::fs::create_dir_all(&watched).unwrap();
    let (one, two) = (marker("reload-one"), marker("reload-two"));
    std::fs::write(rules_dir.join("local.yaml"), rule("E2E-ONE", &one)).unwrap();
    let config = scratch.path("agent.toml");
    std::fs::write(
        &config,
        format!("[rules]\ndirs = [\"{}\"]\n", rules_dir.display()),
    )
    .unwrap();
    let mut agent = Agent::start(&["--config", config.to_str().unwrap(), "--collapse", "0"]);
    let echo = |tag: &str| {
        Command::new("/bin/sh")
            .args(["-c", &format!("true {tag}")])
            .status()
            .unwrap();
    };
    echo(&one);
    agent.wait_for("E2E-ONE", |l| alert_of(l, "E2E-ONE").is_some());

    // A good new set, with a new watched path in the configuration.
    std::fs::write(rules_dir.join("local.yaml"), rule("E2E-TWO", &two)).unwrap();
    std::fs::write(
        &config,
        format!(
            "[rules]\ndirs = [\"{}\"]\nwatch = [\"{}\"]\n",
            rules_dir.display(),
            watched.display()
        ),
    )
    .unwrap();
    // The change on disk is noticed before anyone reloads.
    agent.wait_for("SELF-CONFIG changed", |l| {
        alert_of(l, "SELF-CONFIG").is_some_and(|a| {
            a["details"]["changed"]
                .as_str()
                .is_some_and(|c| c.contains("local.yaml"))
        })
    });
    agent.signal(libc::SIGHUP);
    agent.wait_for("reload applied", |l| self_alert(l, "applied").is_some());
    echo(&two);
    echo(&one);
    agent.wait_for("E2E-TWO", |l| alert_of(l, "E2E-TWO").is_some());
    let file = watched.join("dropped.jsp");
    std::fs::write(&file, "x").unwrap();
    agent.wait_for("a file event under the new watched path", |l| {
        event_of(l, "file").is_some_and(|e| e["file"]["path"] == file.to_str().unwrap())
    });

    // A broken set is refused, with the file and line; the running set stays.
    std::fs::write(
        rules_dir.join("local.yaml"),
        "rules:\n  - id: E2E-BROKEN\n    on: [exec]\n    condition: proc.name ===\n",
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    let refused = agent.wait_for("reload refused", |l| self_alert(l, "refused").is_some());
    let error = refused["alert"]["details"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("local.yaml:"), "{error}");
    agent.wait_for_log("reload refused", LINE_TIMEOUT);
    let three = format!("{two}-again");
    echo(&three);
    agent.wait_for("E2E-TWO still in force", |l| {
        alert_of(l, "E2E-TWO").is_some_and(|a| a["process"]["argv"].to_string().contains(&three))
    });
    let ones = agent.collect(Duration::from_secs(1), |l| alert_of(l, "E2E-ONE").is_some());
    assert_eq!(ones.len(), 1, "E2E-ONE left with the first reload");
    agent.stop();
}

fn scrape(port: u16) -> String {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_expose_the_counters_and_they_move() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut agent = Agent::start_with(&["run", "--metrics", &addr, "--collapse", "0"]);
    std::thread::sleep(Duration::from_millis(1500));
    let before = scrape(port);
    for series in [
        "sensor_events_total{kind=\"exec\"}",
        "sensor_kernel_lost_records_total{kind=\"exec\"}",
        "sensor_rule_evaluation_seconds_total",
        "sensor_process_table_entries",
        "sensor_resident_memory_bytes",
        "sensor_spool_pending_records",
        "sensor_decode_errors_total",
        "sensor_ring_queue_peak_bytes",
        "sensor_ring_read_bytes_total",
    ] {
        assert!(
            metric(&before, series).is_some(),
            "{series} missing:\n{before}"
        );
    }
    // Every concern of the probes, with how it is attached: here, without fentry, the
    // syscalls go through the sys_exit dispatcher.
    for probe in [
        "exec_failed",
        "net",
        "dup",
        "inject",
        "open_files",
        "path_files",
        "tamper",
    ] {
        let attached = before.lines().any(|l| {
            l.starts_with("sensor_probes{")
                && l.contains(&format!("probe=\"{probe}\""))
                && l.contains("state=\"attached\"")
                && (l.contains("mode=\"sys_exit\"") || l.contains("mode=\"fexit\""))
                && l.ends_with(" 1")
        });
        assert!(attached, "sensor_probes for {probe}:\n{before}");
    }
    assert!(
        before.lines().any(|l| l.starts_with("sensor_probes{")
            && l.contains("probe=\"process\"")
            && l.contains("mode=\"tp_btf\"")
            && l.contains("walk=\"bpf_loop\"")),
        "{before}"
    );
    assert!(
        !before.contains("state=\"unavailable\""),
        "no probe unavailable here:\n{before}"
    );
    let execs = metric(&before, "sensor_events_total{kind=\"exec\"}").unwrap();
    assert!(metric(&before, "sensor_process_table_entries").unwrap() > 10.0);
    assert!(metric(&before, "sensor_resident_memory_bytes").unwrap() > 1e6);
    let capacity = metric(&before, "sensor_ring_capacity_bytes").unwrap();
    assert_eq!(capacity, 16.0 * 1024.0 * 1024.0, "the default ring size");
    let ring_read = metric(&before, "sensor_ring_read_bytes_total").unwrap();

    let prog = TmpProgram::new("metrics");
    for _ in 0..20 {
        prog.run();
    }
    agent.wait_for("B17", |l| b17_of(l, prog.exe()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = scrape(port);
        let moved = metric(&after, "sensor_events_total{kind=\"exec\"}").unwrap() >= execs + 20.0;
        let alerts = metric(
            &after,
            "sensor_alerts_total{rule=\"EPMM-B17\",severity=\"high\"}",
        );
        if moved && alerts.is_some_and(|n| n >= 20.0) {
            assert!(metric(&after, "sensor_rule_evaluation_seconds_total").unwrap() > 0.0);
            // 20 exec records of at least a few hundred bytes each went through the ring.
            let read = metric(&after, "sensor_ring_read_bytes_total").unwrap();
            assert!(
                read >= ring_read + 20.0 * 256.0,
                "ring bytes read {ring_read} -> {read}"
            );
            assert!(metric(&after, "sensor_ring_queue_peak_bytes").unwrap() <= capacity);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the counters did not move:\n{after}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    agent.stop();
}

#[test]
fn notify_socket_receives_ready_watchdog_reloading_and_stopping() {
    let scratch = Scratch::new("notify");
    let path = scratch.path("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut agent = Agent::start_env(
        &["run"],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let mut seen = Vec::new();
    let expect = |what: &str, seen: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !seen.iter().any(|m| m.lines().any(|l| l == what)) {
            assert!(Instant::now() < deadline, "no {what}: got {seen:?}");
            let mut buf = [0u8; 4096];
            if let Ok(n) = socket.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    };
    expect("READY=1", &mut seen);
    seen.clear();
    // The event loop keeps the watchdog fed: several pings within a few seconds.
    for _ in 0..2 {
        expect("WATCHDOG=1", &mut seen);
        seen.clear();
    }
    agent.signal(libc::SIGHUP);
    expect("RELOADING=1", &mut seen);
    agent.signal(libc::SIGTERM);
    expect("STOPPING=1", &mut seen);
    agent.stop();
}

#[test]
fn a_ring_overflow_raises_the_loss_self_alert_with_the_count() {
    let mut agent = Agent::start_with(&["run", "--ring-mib", "1", "--collapse", "0"]);
    // Stopped, the agent cannot drain: a burst of execs overflows its 1 MiB ring.
    agent.signal(libc::SIGSTOP);
    let status = Command::new("/bin/sh")
        .args([
            "-c",
            "i=0; while [ $i -lt 3000 ]; do /bin/true; i=$((i+1)); done",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    agent.signal(libc::SIGCONT);
    agent.wait_for("SELF-LOSS", |l| alert_of(l, "SELF-LOSS").is_some());
    // The test's SIGSTOP is tampering, and is reported as such.
    let me = std::process::id();
    agent.wait_for("SELF-TAMPER-SIGNAL", |l| {
        alert_of(l, "SELF-TAMPER-SIGNAL")
            .is_some_and(|a| num(&a["process"]["pid"]) == u64::from(me))
    });
    agent.stop();
    let alerts = agent.collect(Duration::from_millis(100), |l| {
        alert_of(l, "SELF-LOSS").is_some()
    });
    let alerted: u64 = alerts
        .iter()
        .map(|l| num(&l["alert"]["details"]["lost"]))
        .sum();
    let log = agent.log();
    let total: u64 = log
        .lines()
        .find(|l| l.contains(" stopped "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("lost_in_kernel="))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stop line:\n{log}"));
    assert!(total > 0);
    assert_eq!(
        alerted, total,
        "the loss alerts count every lost record: {alerts:#?}"
    );
    let last = alerts.last().unwrap();
    assert_eq!(num(&last["alert"]["details"]["lost_since_start"]), total);
}

/// The ready line tells the truth about the probes: "all probes attached" only when all
/// are; a probe left out on purpose is said to be skipped; a probe that cannot attach is
/// named with its reason, and raises one SELF-PROBE alert that lists them all.
#[test]
fn readiness_names_every_probe_that_did_not_attach() {
    let ready_line = |agent: &Agent| {
        agent
            .log()
            .lines()
            .find(|l| l.contains("sensor_agent::run") && l.contains(" ready"))
            .unwrap_or_default()
            .to_owned()
    };

    let mut agent = Agent::start_with(&["run", "--collapse", "0"]);
    let line = ready_line(&agent);
    assert!(line.contains("ready: all probes attached"), "{line}");
    assert!(
        line.contains("process=tp_btf") && line.contains("net="),
        "modes: {line}"
    );
    agent.stop();

    let mut agent = Agent::start_with(&["run", "--collapse", "0", "--skip-probe", "tamper"]);
    let line = ready_line(&agent);
    assert!(
        line.contains("1 skipped as asked") && line.contains("tamper=skipped"),
        "{line}"
    );
    assert!(!line.contains("all probes attached"), "{line}");
    let probes = agent.collect(Duration::from_secs(1), |l| {
        alert_of(l, "SELF-PROBE").is_some()
    });
    assert!(probes.is_empty(), "skipping is not a failure: {probes:?}");
    agent.stop();

    // Syscalls forced onto the dispatcher, and the dispatcher left out: every syscall
    // concern is unavailable, on any kernel.
    let mut agent = Agent::start_with(&[
        "run",
        "--collapse",
        "0",
        "--syscall-hooks",
        "sys_exit",
        "--skip-probe",
        "sys_exit",
    ]);
    let line = ready_line(&agent);
    assert!(line.contains("DEGRADED"), "{line}");
    assert!(!line.contains("all probes attached"), "{line}");
    let concerns = [
        "exec_failed",
        "net",
        "dup",
        "inject",
        "open_files",
        "path_files",
        "tamper",
    ];
    for probe in concerns {
        assert!(
            line.contains(&format!(
                "{probe} (needs the sys_exit dispatcher, which was skipped"
            )),
            "{probe}: {line}"
        );
    }
    let alert = agent.wait_for("SELF-PROBE", |l| alert_of(l, "SELF-PROBE").is_some());
    let details = &alert["alert"]["details"];
    for probe in concerns {
        assert!(
            details[format!("probe.{probe}")]
                .as_str()
                .is_some_and(|r| r.contains("sys_exit dispatcher")),
            "{probe} in {alert}"
        );
    }
    let all = agent.collect(Duration::from_secs(2), |l| {
        alert_of(l, "SELF-PROBE").is_some()
    });
    assert_eq!(all.len(), 1, "SELF-PROBE is raised once: {all:?}");
    agent.stop();
}
