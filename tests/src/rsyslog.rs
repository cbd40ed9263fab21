//! Debian's rsyslog as the SIEM of the forwarding tests: started in the foreground on
//! loopback with its own configuration, writing each message to a file; stopped by pid.

use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::Scratch;

const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Rsyslog {
    child: Child,
}

impl Rsyslog {
    /// rsyslogd in the foreground: TCP on 127.0.0.1:`port`, every message's MSG part (the
    /// alert's JSON line) appended to `out`. Messages up to 1 MiB: an alert carries its
    /// ancestry's argv and is easily larger than rsyslog's default of 8 KiB, which it
    /// truncates (seen in CI, where an ancestor is `bash -c` with a 30 KB script).
    pub fn start(dir: &Scratch, port: u16, out: &Path) -> Rsyslog {
        let work = dir.path("rsyslog-work");
        std::fs::create_dir_all(&work).unwrap();
        let conf = dir.path("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                "global(workDirectory=\"{}\" maxMessageSize=\"1m\")\n\
                 module(load=\"imtcp\")\n\
                 template(name=\"msgonly\" type=\"string\" string=\"%pri% %hostname% %app-name% %msgid% %structured-data% %msg%\\n\")\n\
                 ruleset(name=\"siem\") {{ action(type=\"omfile\" file=\"{}\" template=\"msgonly\") }}\n\
                 input(type=\"imtcp\" address=\"127.0.0.1\" port=\"{port}\" ruleset=\"siem\")\n",
                work.display(),
                out.display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.path("rsyslog.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .expect("start rsyslogd (the test command installs the rsyslog package)");
        let deadline = Instant::now() + TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "rsyslogd did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Rsyslog { child }
    }

    pub fn stop(&mut self) {
        // SAFETY: signalling the rsyslogd we started, by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Alert id -> how many times rsyslog wrote it.
pub fn received(out: &Path) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in std::fs::read_to_string(out).unwrap_or_default().lines() {
        let json = &line[line.find('{').unwrap_or(0)..];
        let value: Value = serde_json::from_str(json)
            .unwrap_or_else(|e| panic!("rsyslog wrote a line that is not an alert ({e}): {line}"));
        *seen
            .entry(value["alert"]["id"].as_str().unwrap_or("").to_owned())
            .or_default() += 1;
    }
    seen
}

/// The ids of the B17 alerts of `exe` the collector stored in `db` (a file or a URL).
pub fn stored_ids(db: &Path, exe: &str) -> Vec<String> {
    crate::collector::query("alerts", db, &[])
        .iter()
        .filter(|l| crate::collector::b17_of(l, exe))
        .map(|l| l["alert"]["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until rsyslog wrote every alert the collector stored for `exe` (at least `n` of
/// them), within `timeout`; returns what it received.
pub fn wait_forwarded(
    db: &Path,
    exe: &str,
    out: &Path,
    n: usize,
    timeout: Duration,
) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let ids = stored_ids(db, exe);
        let got = received(out);
        if ids.len() >= n && ids.iter().all(|id| got.contains_key(id)) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "rsyslog has {} of the {} stored alerts: {got:?}",
            ids.iter().filter(|id| got.contains_key(*id)).count(),
            ids.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
