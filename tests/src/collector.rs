//! The reference collector under test, test certificates (made here with rcgen, never
//! committed), and ways to raise alerts on demand.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc::Receiver},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::Value;

use crate::{Output, Scratch, marker};

/// Path of the collector binary under test.
pub fn collector_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SENSOR_COLLECTOR_BIN") {
        return PathBuf::from(path);
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sensor-collector");
    assert!(
        path.is_file(),
        "no collector binary at {}: run the tests with `cargo xtask test`",
        path.display()
    );
    path
}

/// A running `sensor-collector` and the alert lines it printed.
pub struct Collector {
    child: Child,
    pub addr: SocketAddr,
    lines: Receiver<Value>,
    seen: Vec<Value>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    /// `sensor-collector --listen LISTEN --db DB EXTRA...`, waiting for it to listen.
    pub fn start(db: &Path, listen: &str, extra: &[&str]) -> Collector {
        Self::start_command(Command::new(collector_bin()), db, listen, extra)
    }

    /// As `start`, with at most `nofile` descriptors (soft and hard limit).
    pub fn start_with_nofile(db: &Path, listen: &str, extra: &[&str], nofile: u64) -> Collector {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(collector_bin());
        // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child before exec.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Self::start_command(cmd, db, listen, extra)
    }

    fn start_command(mut cmd: Command, db: &Path, listen: &str, extra: &[&str]) -> Collector {
        let child = cmd
            .args(["--listen", listen, "--db"])
            .arg(db)
            .args(extra)
            .env("SENSOR_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the collector");
        let (child, lines, log, ready) =
            Output::follow(child, "the collector", "listening", Duration::from_secs(20));
        let addr = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("address="))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in the collector's line: {ready}"));
        Collector {
            child,
            addr,
            lines,
            seen: Vec::new(),
            log,
        }
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until at least `n` printed alerts match `pred`; returns all that match.
    pub fn wait_alerts(
        &mut self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut count = self.seen.iter().filter(|v| pred(v)).count();
        while count < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(v) => {
                    count += usize::from(pred(&v));
                    self.seen.push(v);
                }
                Err(_) if left.is_zero() => panic!(
                    "the collector printed {count} of {n} expected alerts within {timeout:?}; its log:\n{}",
                    self.log()
                ),
                Err(_) => {}
            }
        }
        self.seen.iter().filter(|v| pred(v)).cloned().collect()
    }

    /// Whether the collector has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Stops the collector with SIGTERM (by its pid) and waits for it, bounded.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pids of the stored B17 alerts of `exe` from `agent` (`db`: a SQLite file or a
/// `postgres://` URL), asserting none is stored twice.
pub fn stored_pids(db: &Path, agent: &str, exe: &str) -> BTreeSet<u64> {
    let alerts = query("alerts", db, &["--agent", agent, "--rule", "EPMM-B17"]);
    let mine: Vec<&Value> = alerts.iter().filter(|l| b17_of(l, exe)).collect();
    let pids: BTreeSet<u64> = mine.iter().map(|l| alert_pid(l)).collect();
    assert_eq!(
        pids.len(),
        mine.len(),
        "an alert was stored twice: {mine:#?}"
    );
    pids
}

/// Polls `sensor-collector agents` until `pred` holds for `agent`'s row, within
/// `timeout`; returns the row.
pub fn wait_agent_row(
    db: &Path,
    agent: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = query("agents", db, &["--json"]);
        let row = rows.into_iter().find(|r| r["agentId"] == agent);
        if let Some(row) = &row
            && pred(row)
        {
            return row.clone();
        }
        assert!(Instant::now() < deadline, "{what}: agent row now {row:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `sensor-collector SUBCOMMAND --db DB ARGS...` as parsed JSON lines.
pub fn query(subcommand: &str, db: &Path, args: &[&str]) -> Vec<Value> {
    let out = Command::new(collector_bin())
        .arg(subcommand)
        .arg("--db")
        .arg(db)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run sensor-collector");
    assert!(
        out.status.success(),
        "sensor-collector {subcommand} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A free loopback port (bound, then released) for a server started later (a collector,
/// PostgreSQL, rsyslog). It is taken below the ephemeral range: an agent dialling a
/// closed ephemeral port over and over can end up connected to itself (TCP simultaneous
/// open). A port is handed out once per test process: tests run in parallel and their
/// servers bind some time after asking, so "free now" alone gave two tests the same port
/// (one test's collector reached another's PostgreSQL).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768);
    let start = 10_000 + (std::process::id() % 5_000) as u16;
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let port = (start..low.max(start + 1))
        .find(|port| {
            !given.contains(port) && std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok()
        })
        .expect("a free loopback port below the ephemeral range");
    given.push(port);
    port
}

/// A CA, a collector certificate for 127.0.0.1/localhost, agent certificates signed by the
/// CA, and an agent certificate from a different CA; PEM files in a scratch directory.
pub struct Certs {
    pub dir: Scratch,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-signed CA");
    (params, key, cert.pem())
}

impl Certs {
    pub fn new() -> Certs {
        let dir = Scratch::new("certs");
        let write = |name: &str, text: &str| std::fs::write(dir.path(name), text).unwrap();
        let leaf = |issuer: &Issuer<'_, KeyPair>, names: Vec<String>, cn: &str, prefix: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, issuer).unwrap();
            write(&format!("{prefix}.pem"), &cert.pem());
            write(&format!("{prefix}.key"), &key.serialize_pem());
        };
        let (params, key, pem) = ca("sensor test CA");
        write("ca.pem", &pem);
        let issuer = Issuer::new(params, key);
        leaf(
            &issuer,
            vec!["localhost".into(), "127.0.0.1".into()],
            "collector",
            "collector",
        );
        leaf(&issuer, vec!["agent-a".into()], "agent-a", "agent-a");
        leaf(&issuer, vec!["agent-b".into()], "agent-b", "agent-b");
        let (params, key, pem) = ca("rogue CA");
        write("rogue-ca.pem", &pem);
        let rogue = Issuer::new(params, key);
        leaf(&rogue, vec!["agent-r".into()], "agent-r", "rogue");
        Certs { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.path(name).to_string_lossy().into_owned()
    }

    /// `--tls-cert/--tls-key/--tls-client-ca` for the collector.
    pub fn collector_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("collector.pem"),
            "--tls-key".into(),
            self.path("collector.key"),
            "--tls-client-ca".into(),
            self.path("ca.pem"),
        ]
    }

    /// `--tls-cert/--tls-key/--tls-ca` for an agent whose files are `NAME.pem/.key`.
    pub fn agent_args(&self, name: &str) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path(&format!("{name}.pem")),
            "--tls-key".into(),
            self.path(&format!("{name}.key")),
            "--tls-ca".into(),
            self.path("ca.pem"),
        ]
    }
}

impl Default for Certs {
    fn default() -> Self {
        Self::new()
    }
}

/// `sensor-agent run` streaming to the collector at `url` through the spool in `spool`,
/// as agent `id`: every alert a line (no collapse), quick retries and heartbeats.
pub fn agent_args<'a>(url: &'a str, spool: &'a str, id: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--collapse",
        "0",
        "--collector",
        url,
        "--spool",
        spool,
        "--agent-id",
        id,
        "--collector-retry-max",
        "2",
        "--heartbeat",
        "1",
    ]
}

/// A program in /tmp that raises EPMM-B17 each time it runs (execution from a writable
/// location). Removed on drop.
pub struct TmpProgram(pub PathBuf);

impl TmpProgram {
    pub fn new(name: &str) -> TmpProgram {
        let path = PathBuf::from("/tmp").join(marker(name));
        std::fs::copy("/bin/true", &path).expect("copy /bin/true to /tmp");
        TmpProgram(path)
    }

    pub fn exe(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }

    /// Runs it once and returns its pid.
    pub fn run(&self) -> u32 {
        let mut child = crate::spawn_retrying(&mut Command::new(&self.0));
        let pid = child.id();
        child.wait().expect("wait for the /tmp program");
        pid
    }
}

impl Drop for TmpProgram {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The B17 alert lines (agent stdout or collector stdout) of `exe`.
pub fn b17_of(line: &Value, exe: &str) -> bool {
    crate::alert_of(line, "EPMM-B17").is_some_and(|a| a["process"]["exe"] == exe)
}

/// The pid of an alert line's process.
pub fn alert_pid(line: &Value) -> u64 {
    crate::num(&line["alert"]["process"]["pid"])
}
