//! PID 1 of the kernel-matrix guests (`cargo xtask kmatrix`).
//!
//! As PID 1 it mounts what a system has (not tracefs: the agent mounts that itself), brings
//! loopback up, and runs itself as `drive HOOKS` once per syscall-hook mode. A drive starts
//! the agent, re-enacts every kind of event the agent claims plus two attacks its rules
//! know (a shell on a socket, a program run from memory), stops the agent and checks its
//! JSON lines. The `auto` drive runs the agent with `--enforce on` and adds an
//! enforcement smoke: a RewriteMap-helper look-alike runs its allowed baseline and then a
//! payload written to /tmp, which must be refused (BPF-LSM, where the kernel has it
//! active) or killed at exec (elsewhere). PID 1 writes the reports and the agent's logs to the second serial port,
//! which the host reads, and powers the guest off. The guest has no network device: every
//! socket here is on 127.0.0.1.

use std::{
    ffi::CString,
    fmt::Write as _,
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

const AGENT: &str = "/kmx/sensor-agent";
const METRICS: &str = "127.0.0.1:9464";
/// Under TCG the verifier takes its time: the agent has this long to get ready.
const READY_WITHIN: Duration = Duration::from_secs(400);
const MARK: &str = "kmx-smoke";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("drive") => {
            let hooks = args.get(2).cloned().unwrap_or_else(|| "auto".into());
            let report = drive(&hooks);
            println!("{report}");
        }
        _ => init(),
    }
}

/// PID 1: the system around the drives.
fn init() {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
        ("tmpfs", "/run", "tmpfs"),
        ("securityfs", "/sys/kernel/security", "securityfs"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2"),
    ] {
        let _ = fs::create_dir_all(target);
        mount(source, target, fstype);
    }
    loopback_up();
    let mut serial = Serial::open("/dev/ttyS1");
    serial.line("KMX-BEGIN");
    let lsm = fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    let mut reports = Vec::new();
    for hooks in ["auto", "sys_exit"] {
        let out = Command::new("/proc/self/exe")
            .args(["drive", hooks])
            .stderr(Stdio::inherit())
            .output();
        let report = match out {
            Ok(out) => serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|e| {
                json!({"hooks": hooks, "error": format!("drive printed no report ({e}, exit {})", out.status)})
            }),
            Err(e) => json!({"hooks": hooks, "error": format!("cannot run the drive: {e}")}),
        };
        for log in ["out", "err"] {
            let path = format!("/tmp/agent-{hooks}.{log}");
            serial.file(&format!("agent-{hooks}.{log}"), &path);
        }
        reports.push(report);
    }
    let summary = json!({
        "kernel": uname_release(),
        "lsm": lsm.trim(),
        "btf": fs::metadata("/sys/kernel/btf/vmlinux").map(|m| m.len()).unwrap_or(0),
        "runs": reports,
    });
    serial.line("KMX-REPORT");
    serial.line(&summary.to_string());
    serial.line("KMX-END");
    // SAFETY: plain syscalls; this is the end of the guest.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
}

/// The second serial port, in raw mode so that what is written arrives as written.
struct Serial(fs::File);

impl Serial {
    fn open(path: &str) -> Serial {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(path)
            .or_else(|_| fs::File::create("/tmp/kmx-serial"))
            .expect("somewhere to write the report");
        // SAFETY: termios of an open descriptor; failure leaves cooked mode (the host
        // strips carriage returns anyway).
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(file.as_raw_fd(), &mut t) == 0 {
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(file.as_raw_fd(), libc::TCSANOW, &t);
            }
        }
        Serial(file)
    }

    fn line(&mut self, line: &str) {
        let _ = writeln!(self.0, "{line}");
    }

    /// A file, framed so the host can cut it out.
    fn file(&mut self, name: &str, path: &str) {
        let body = fs::read(path).unwrap_or_default();
        self.line(&format!("KMX-FILE {name} {}", body.len()));
        let _ = self.0.write_all(&body);
        self.line("");
        self.line("KMX-FILE-END");
    }
}

fn mount(source: &str, target: &str, fstype: &str) {
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (source, target, fstype) = (c(source), c(target), c(fstype));
    // SAFETY: valid C strings; a failure (already mounted, not in this kernel) is fine.
    unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        );
    }
}

/// `ip link set lo up`.
fn loopback_up() {
    // SAFETY: an ioctl on a fresh datagram socket with a zeroed, named ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        libc::close(fd);
    }
}

fn uname_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// What one drive found: one check per claimed event kind and rule.
struct Checks {
    items: Vec<Value>,
}

impl Checks {
    fn add(&mut self, name: &str, ok: bool, detail: String) {
        self.items
            .push(json!({"name": name, "ok": ok, "detail": detail}));
    }
}

/// Starts the agent with `--syscall-hooks HOOKS`, re-enacts, stops it, checks.
fn drive(hooks: &str) -> Value {
    let out_path = format!("/tmp/agent-{hooks}.out");
    let err_path = format!("/tmp/agent-{hooks}.err");
    let enforce = hooks == "auto";
    if enforce {
        // The helper's allow list, as an operator's file extends the pack's (the guest
        // has no `date`).
        let _ = fs::create_dir_all("/tmp/kmx-rules");
        let _ = fs::write(
            "/tmp/kmx-rules/local.yaml",
            "enforce:\n  - identity: rewritemap-helper\n    append: true\n    allow: [/bin/true]\n",
        );
    }
    let started = Instant::now();
    let mut args = vec![
        "run",
        "--events",
        "--collapse",
        "0",
        "--syscall-hooks",
        hooks,
        "--metrics",
        METRICS,
    ];
    if enforce {
        args.extend(["--enforce", "on", "--rules", "/tmp/kmx-rules"]);
    }
    let agent = Command::new(AGENT)
        .args(&args)
        .env("SENSOR_LOG", "info,sensor_agent::probes=debug")
        .env("NO_COLOR", "1")
        .stdout(fs::File::create(&out_path).expect("agent stdout file"))
        .stderr(fs::File::create(&err_path).expect("agent stderr file"))
        .spawn();
    let mut agent = match agent {
        Ok(a) => a,
        Err(e) => return json!({"hooks": hooks, "error": format!("cannot start the agent: {e}")}),
    };
    let agent_pid = agent.id() as i32;
    // Ready, or exited, or out of time.
    let mut ready_line = None;
    while started.elapsed() < READY_WITHIN {
        let log = fs::read_to_string(&err_path).unwrap_or_default();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("sensor_agent::run") && l.contains(" ready"))
        {
            ready_line = Some(line.to_owned());
            break;
        }
        if let Ok(Some(_)) = agent.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let ready_secs = started.elapsed().as_secs_f64();
    let Some(ready_line) = ready_line else {
        let _ = agent.kill();
        let status = agent.wait().map(|s| s.to_string()).unwrap_or_default();
        return json!({"hooks": hooks, "ready": false, "ready_secs": ready_secs, "agent_exit": status});
    };
    let metrics = scrape();
    let probes = series(&metrics, "sensor_probes");
    let enforcement = series(&metrics, "sensor_enforcement_mode");

    let mut expect = Expect::default();
    reenact(agent_pid, &mut expect);
    if enforce {
        enforce_smoke(&err_path, &mut expect);
    }
    // The agent drains its ring every few milliseconds; give it time under TCG.
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(agent_pid, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut exit = None;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = agent.try_wait() {
            exit = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let exit = match exit {
        Some(status) => status.to_string(),
        None => {
            let _ = agent.kill();
            let _ = agent.wait();
            "killed: no exit within 120 s of SIGINT".to_owned()
        }
    };
    let lines: Vec<Value> = fs::read_to_string(&out_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut checks = check(&lines, &expect, &KernelView::of(&probes));
    if enforce {
        check_enforcement(&lines, &expect, &mut checks);
    }
    let alerts: Vec<String> = lines
        .iter()
        .filter_map(|l| l.pointer("/alert/ruleId").and_then(Value::as_str))
        .map(str::to_owned)
        .collect();
    json!({
        "hooks": hooks,
        "ready": true,
        "ready_secs": ready_secs,
        "ready_line": ready_line,
        "probes": probes,
        "enforcement": enforcement.first(),
        "checks": checks.items,
        "alerts": alerts,
        "lines": lines.len(),
        "agent_exit": exit,
    })
}

/// The agent's metrics page.
fn scrape() -> String {
    let mut body = String::new();
    if let Ok(mut s) = TcpStream::connect(METRICS) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: kmx\r\n\r\n");
        let _ = s.read_to_string(&mut body);
    }
    body
}

/// The labels of every series of the metric family `name` on `body`.
fn series(body: &str, name: &str) -> Vec<Value> {
    let prefix = format!("{name}{{");
    body.lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|l| {
            let labels = &l[l.find('{').map_or(0, |i| i + 1)..l.rfind('}').unwrap_or(l.len())];
            let mut map = serde_json::Map::new();
            let mut rest = labels;
            while let Some(eq) = rest.find("=\"") {
                let key = rest[..eq].trim_start_matches(',').trim().to_owned();
                let after = &rest[eq + 2..];
                // Values are escaped Prometheus strings: find the closing quote.
                let mut end = 0;
                let bytes = after.as_bytes();
                while end < bytes.len()
                    && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\'))
                {
                    end += 1;
                }
                map.insert(key, Value::String(after[..end].replace("\\\"", "\"")));
                rest = &after[(end + 1).min(after.len())..];
            }
            Value::Object(map)
        })
        .collect()
}

/// What the re-enactment did, to find it again in the agent's lines.
#[derive(Default)]
struct Expect {
    driver: u32,
    true_pid: u32,
    listen_port: u16,
    dup_pid: u32,
    memfd_pid: u32,
    ptrace_target: u32,
    /// The tracer inside a new pid namespace (its host pid), and the ptrace argument it
    /// used (its target's pid in that namespace).
    ns_tracer: u32,
    ns_target_arg: u32,
    /// A closed port connected to with an address length of `sockaddr_storage` (128).
    wide_port: u16,
    cron_file: String,
    /// Enforcement smoke: the helper's pid and what its two programs exited with.
    helper_pid: u32,
    helper_output: String,
    linked_file: String,
    bound_file: String,
    errors: Vec<String>,
}

fn reenact(agent_pid: i32, e: &mut Expect) {
    e.driver = std::process::id();
    let note = |e: &mut Expect, what: &str, r: std::io::Result<()>| {
        if let Err(err) = r {
            e.errors.push(format!("{what}: {err}"));
        }
    };

    // A program with argv, an executable and a working directory.
    let cwd = "/tmp/kmx-cwd";
    let _ = fs::create_dir_all(cwd);
    match Command::new("/bin/true").arg(MARK).current_dir(cwd).spawn() {
        Ok(mut child) => {
            e.true_pid = child.id();
            let _ = child.wait();
        }
        Err(err) => e.errors.push(format!("/bin/true: {err}")),
    }
    // An exec that fails.
    let _ = Command::new(format!("/nonexistent/{MARK}")).spawn();

    // Loopback: bind, listen, connect, accept.
    let listener = match TcpListener::bind("127.0.0.1:0") {
        Ok(l) => l,
        Err(err) => {
            e.errors.push(format!("bind: {err}"));
            return;
        }
    };
    e.listen_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let client = TcpStream::connect(("127.0.0.1", e.listen_port));
    let accepted = listener.accept();
    let (client, _server) = match (client, accepted) {
        (Ok(c), Ok((s, _))) => (c, s),
        (c, a) => {
            e.errors
                .push(format!("connect/accept: {:?} {:?}", c.err(), a.err()));
            return;
        }
    };

    // A reverse shell: a child puts the connected socket on its stdio (dup2) and becomes
    // a shell.
    let sh = CString::new("/bin/sh").unwrap();
    let argv = [
        c"sh".as_ptr(),
        c"-c".as_ptr(),
        c"exit 0".as_ptr(),
        std::ptr::null(),
    ];
    // SAFETY: the child only calls async-signal-safe functions before exec.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            let fd = client.as_raw_fd();
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
            libc::execv(sh.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
    }
    e.dup_pid = pid as u32;
    wait(pid);

    // A program run from memory: /bin/true copied into a memfd and executed from it.
    let memfd_exec = (|| {
        let name = CString::new(format!("{MARK}-payload")).unwrap();
        // SAFETY: a valid name; the descriptor is owned below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut file = fs::File::from(memfd);
        file.write_all(&fs::read("/bin/true")?)?;
        let argv = [c"kmx-payload".as_ptr(), std::ptr::null()];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        // SAFETY: as for the reverse shell.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: execveat of the memfd itself (AT_EMPTY_PATH).
            unsafe {
                libc::syscall(
                    libc::SYS_execveat,
                    file.as_raw_fd(),
                    c"".as_ptr(),
                    argv.as_ptr(),
                    envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                );
                libc::_exit(127);
            }
        }
        wait(pid);
        Ok(pid as u32)
    })();
    match memfd_exec {
        Ok(pid) => e.memfd_pid = pid,
        Err(err) => e.errors.push(format!("memfd exec: {err}")),
    }

    // ptrace attach to a child of ours that waits.
    // SAFETY: the child only pauses.
    let target = unsafe { libc::fork() };
    if target == 0 {
        loop {
            // SAFETY: waits for a signal.
            unsafe { libc::pause() };
        }
    }
    e.ptrace_target = target as u32;
    // SAFETY: attaching to, then detaching from and killing, our own child.
    unsafe {
        if libc::ptrace(libc::PTRACE_ATTACH, target, 0, 0) != 0 {
            e.errors
                .push(format!("ptrace: {}", std::io::Error::last_os_error()));
        } else {
            let mut status = 0;
            libc::waitpid(target, &mut status, 0);
            libc::ptrace(libc::PTRACE_DETACH, target, 0, 0);
        }
        libc::kill(target, libc::SIGKILL);
    }
    wait(target);

    connect_wide(e);
    connect_rewritten(e);
    ptrace_in_namespace(e);

    // A write in a watched directory (the default list watches /etc/cron*).
    e.cron_file = format!("/etc/cron.d/{MARK}");
    let r = fs::create_dir_all("/etc/cron.d")
        .and_then(|()| fs::write(&e.cron_file, "* * * * * root true\n"));
    note(e, "cron file", r);

    // The same through a symbolic link and through a bind mount: the event names the file
    // the kernel opened, under the watched /etc/cron.d.
    e.linked_file = format!("/etc/cron.d/{MARK}-link");
    let _ = fs::remove_file("/tmp/kmx-cron");
    let r = std::os::unix::fs::symlink("/etc/cron.d", "/tmp/kmx-cron")
        .and_then(|()| fs::write(format!("/tmp/kmx-cron/{MARK}-link"), "# via a link\n"));
    note(e, "file through a link", r);
    e.bound_file = format!("/etc/cron.d/{MARK}-bind");
    let r = fs::create_dir_all("/tmp/kmx-bind")
        .and_then(|()| bind_mount("/etc/cron.d", "/tmp/kmx-bind"))
        .and_then(|()| fs::write(format!("/tmp/kmx-bind/{MARK}-bind"), "# via a bind\n"));
    note(e, "file through a bind mount", r);
    // SAFETY: unmounts what this driver mounted.
    unsafe { libc::umount2(c"/tmp/kmx-bind".as_ptr(), libc::MNT_DETACH) };

    // A signal to the agent (one that does nothing to it).
    // SAFETY: SIGCONT to the agent we started.
    unsafe { libc::kill(agent_pid, libc::SIGCONT) };
}

/// A TCP connect that passes `sizeof(struct sockaddr_storage)` (128) as the address
/// length, as many programs do, to a port nothing listens on. A refused connect leaves no
/// peer in the socket, so the event's address can only come from the address the caller
/// passed (the kernel's copy where the security hooks run): it must name the port.
fn connect_wide(e: &mut Expect) {
    let r = (|| -> std::io::Result<u16> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        // SAFETY: a zeroed sockaddr_storage is valid; it holds a sockaddr_in; the socket
        // is closed before returning.
        unsafe {
            let mut storage: libc::sockaddr_storage = std::mem::zeroed();
            let sin = &mut storage as *mut libc::sockaddr_storage as *mut libc::sockaddr_in;
            (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
            (*sin).sin_port = port.to_be();
            (*sin).sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let rc = libc::connect(fd, &storage as *const _ as *const libc::sockaddr, len);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if rc == 0 || err.raw_os_error() != Some(libc::ECONNREFUSED) {
                return Err(std::io::Error::other(format!(
                    "expected ECONNREFUSED, got {rc} ({err})"
                )));
            }
        }
        Ok(port)
    })();
    match r {
        Ok(port) => e.wide_port = port,
        Err(err) => e
            .errors
            .push(format!("connect with a 128-byte address: {err}")),
    }
}

/// The socket a connect really reaches, and the name another thread leaves in the
/// caller's buffer while the connect waits.
const UNIX_REAL: &str = "/tmp/kmx-real.sock";
const UNIX_FAKE: &str = "/tmp/kmx-fake.sock";

/// A blocking connect whose address another thread rewrites while the kernel makes it
/// wait (a unix listener with a full backlog): the kernel connects to `UNIX_REAL`, the
/// caller's buffer says `UNIX_FAKE` by the time the syscall returns.
fn connect_rewritten(e: &mut Expect) {
    let r = (|| -> std::io::Result<()> {
        use std::os::unix::net::{UnixListener, UnixStream};
        let _ = fs::remove_file(UNIX_REAL);
        let _ = fs::remove_file("/tmp/kmx-first.sock");
        let listener = UnixListener::bind(UNIX_REAL)?;
        // Backlog 0: one connection waits in the queue, the next connect blocks.
        // SAFETY: listen(2) on a socket we own.
        if unsafe { libc::listen(listener.as_raw_fd(), 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The first connection through another name of the same socket, so that only the
        // second connect names UNIX_REAL.
        fs::hard_link(UNIX_REAL, "/tmp/kmx-first.sock")?;
        let _first = UnixStream::connect("/tmp/kmx-first.sock")?;
        // SAFETY: a zeroed sockaddr_un is valid; the path fits.
        let mut addr: Box<libc::sockaddr_un> = Box::new(unsafe { std::mem::zeroed() });
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (dst, src) in addr.sun_path.iter_mut().zip(UNIX_REAL.bytes()) {
            *dst = src as libc::c_char;
        }
        let at = &mut *addr as *mut libc::sockaddr_un as usize;
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            // SAFETY: a new socket, connected with the buffer the main thread keeps alive
            // until this thread is joined.
            unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                let _ = tx.send(libc::gettid());
                let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                let rc = libc::connect(fd, at as *const libc::sockaddr, len);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if rc == 0 { Ok(()) } else { Err(err) }
            }
        });
        let tid = rx.recv().map_err(std::io::Error::other)?;
        // Blocked in connect (syscall 42) once /proc says so; bounded.
        let blocked = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            fs::read_to_string(format!("/proc/self/task/{tid}/syscall"))
                .is_ok_and(|s| s.split_whitespace().next() == Some("42"))
        });
        for (dst, src) in addr.sun_path.iter_mut().zip(UNIX_FAKE.bytes()) {
            *dst = src as libc::c_char;
        }
        let _accepted = listener.accept()?;
        let done = waiter
            .join()
            .map_err(|_| std::io::Error::other("connect thread"))?;
        drop(addr);
        if !blocked {
            return Err(std::io::Error::other("the connect never waited"));
        }
        done
    })();
    if let Err(err) = r {
        e.errors.push(format!("rewritten connect: {err}"));
    }
}

/// A tracer inside a new pid namespace attaches to its child by the namespace's pid (2);
/// the driver learns the tracer's host pid through a pipe.
fn ptrace_in_namespace(e: &mut Expect) {
    let mut fds = [0; 2];
    // SAFETY: a pipe for the child's one message.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        e.errors
            .push(format!("pipe: {}", std::io::Error::last_os_error()));
        return;
    }
    // SAFETY: the children below only make syscalls before they exit.
    let outer = unsafe { libc::fork() };
    if outer == 0 {
        // SAFETY: a forked child of a single-threaded moment: syscalls only, then _exit.
        unsafe {
            libc::close(fds[0]);
            if libc::unshare(libc::CLONE_NEWPID) != 0 {
                libc::_exit(2);
            }
            let tracer = libc::fork();
            if tracer == 0 {
                // Pid 1 of the new namespace; its child is pid 2 there.
                let target = libc::fork();
                if target == 0 {
                    loop {
                        libc::pause();
                    }
                }
                let mut status = 0;
                let ok = libc::ptrace(libc::PTRACE_ATTACH, target, 0, 0) == 0;
                if ok {
                    libc::waitpid(target, &mut status, 0);
                    libc::ptrace(libc::PTRACE_DETACH, target, 0, 0);
                }
                libc::kill(target, libc::SIGKILL);
                libc::waitpid(target, &mut status, 0);
                libc::_exit(if ok && target == 2 { 0 } else { 3 });
            }
            let host_pid = (tracer as u32).to_ne_bytes();
            libc::write(fds[1], host_pid.as_ptr().cast(), 4);
            let mut status = 0;
            libc::waitpid(tracer, &mut status, 0);
            libc::_exit(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                4
            });
        }
    }
    // SAFETY: our end of the pipe; the child writes four bytes.
    unsafe { libc::close(fds[1]) };
    let mut buf = [0u8; 4];
    // SAFETY: reads into a local buffer.
    let n = unsafe { libc::read(fds[0], buf.as_mut_ptr().cast(), 4) };
    // SAFETY: our end of the pipe, closed once.
    unsafe { libc::close(fds[0]) };
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(outer, &mut status, 0) };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    if n != 4 || code != 0 {
        e.errors
            .push(format!("ptrace in a pid namespace: exit {code}, {n} bytes"));
        return;
    }
    e.ns_tracer = u32::from_ne_bytes(buf);
    e.ns_target_arg = 2;
}

/// A RewriteMap-helper look-alike, started once the agent enforces: it waits for a line,
/// runs its allowed baseline (/bin/true) and a payload written to /tmp since boot.
fn enforce_smoke(err_path: &str, e: &mut Expect) {
    const HELPER: &str = "/tmp/kmx-mi/bin/map-appstore-url";
    let script = format!(
        "#!/bin/sh\nread line\n/bin/true {MARK}-baseline\necho baseline=$?\n/tmp/kmx-payload {MARK}-payload\necho payload=$?\n/bin/true {MARK}-socket <&3\necho socket=$?\n"
    );
    let prepared = fs::create_dir_all("/tmp/kmx-mi/bin")
        .and_then(|()| fs::write(HELPER, script))
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(HELPER, fs::Permissions::from_mode(0o755))
        })
        .and_then(|()| fs::copy("/bin/true", "/tmp/kmx-payload").map(|_| ()));
    if let Err(err) = prepared {
        e.errors.push(format!("enforcement smoke: {err}"));
        return;
    }
    // A loopback connection the helper gets on fd 3, to put on a program's stdin: even
    // the allowed /bin/true is stopped when it is wired to the network (socket_stdio).
    let wired = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr().map(|a| (l, a)))
        .and_then(|(l, a)| TcpStream::connect(a).map(|c| (l, c)));
    let (_listener, socket) = match wired {
        Ok(pair) => pair,
        Err(err) => {
            e.errors.push(format!("enforcement smoke: socket: {err}"));
            return;
        }
    };
    let socket_fd = socket.as_raw_fd();
    let mut command = Command::new(HELPER);
    command.stdin(Stdio::piped()).stdout(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; nothing else runs in the child before exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            if libc::dup2(socket_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut helper = match command.spawn() {
        Ok(h) => h,
        Err(err) => {
            e.errors.push(format!("enforcement smoke: {HELPER}: {err}"));
            return;
        }
    };
    e.helper_pid = helper.id();
    // The agent labels the helper once it has seen its exec.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && !fs::read_to_string(err_path)
            .unwrap_or_default()
            .contains("new web-tier source labelled")
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(mut stdin) = helper.stdin.take() {
        let _ = stdin.write_all(b"go\n");
    }
    match helper.wait_with_output() {
        Ok(out) => {
            e.helper_output = String::from_utf8_lossy(&out.stdout)
                .trim()
                .replace('\n', " ")
        }
        Err(err) => e.errors.push(format!("enforcement smoke: {err}")),
    }
}

/// The baseline ran, the payload did not, and the alert says how it was stopped: refused
/// where BPF-LSM is active, killed elsewhere.
fn check_enforcement(lines: &[Value], e: &Expect, c: &mut Checks) {
    let lsm = fs::read_to_string("/sys/kernel/security/lsm")
        .unwrap_or_default()
        .trim()
        .split(',')
        .any(|m| m == "bpf");
    let (action, exit) = if lsm {
        ("ACTION_DENIED", "payload=126")
    } else {
        ("ACTION_KILLED", "payload=137")
    };
    let out = &e.helper_output;
    c.add(
        "enforce_stopped",
        out.contains("baseline=0") && out.contains(exit),
        format!("helper {}: {out} (want baseline=0 {exit})", e.helper_pid),
    );
    let socket_exit = exit.replace("payload", "socket");
    let socket_alert = lines.iter().filter_map(|l| l.get("alert")).any(|a| {
        a.pointer("/ruleId").and_then(Value::as_str) == Some("enforce:rewritemap-helper")
            && a.pointer("/action").and_then(Value::as_str) == Some(action)
            && a.to_string().contains("socket_stdio")
    });
    c.add(
        "enforce_socket_stdio",
        out.contains(&socket_exit) && socket_alert,
        format!("allowed /bin/true with a socket on stdin: {out} (want {socket_exit}, an alert for socket_stdio)"),
    );
    let alert = lines.iter().filter_map(|l| l.get("alert")).find(|a| {
        a.pointer("/ruleId").and_then(Value::as_str) == Some("enforce:rewritemap-helper")
    });
    let got = alert
        .and_then(|a| a.pointer("/action"))
        .and_then(Value::as_str)
        .unwrap_or("no alert");
    c.add(
        "enforce_alert",
        got == action,
        format!("{got} (want {action})"),
    );
}

fn bind_mount(from: &str, to: &str) -> std::io::Result<()> {
    let from = std::ffi::CString::new(from)?;
    let to = std::ffi::CString::new(to)?;
    // SAFETY: valid C strings; a bind mount takes no type or data.
    let rc = unsafe {
        libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn wait(pid: i32) {
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// Which concerns run on the security hooks' view (fexit), from `sensor_probes`.
struct KernelView {
    net: bool,
    inject: bool,
}

impl KernelView {
    fn of(probes: &[Value]) -> KernelView {
        let fexit = |probe: &str| {
            probes.iter().any(|p| {
                p.get("probe").and_then(Value::as_str) == Some(probe)
                    && p.get("mode")
                        .and_then(Value::as_str)
                        .is_some_and(|m| m.starts_with("fexit"))
            })
        };
        KernelView {
            net: fexit("net"),
            inject: fexit("inject"),
        }
    }
}

fn check(lines: &[Value], e: &Expect, kernel_view: &KernelView) -> Checks {
    let mut c = Checks { items: Vec::new() };
    for err in &e.errors {
        c.add("re-enactment", false, err.clone());
    }
    let events: Vec<&Value> = lines.iter().filter_map(|l| l.get("event")).collect();
    let pid_of = |ev: &Value| ev.get("pid").and_then(Value::as_u64).unwrap_or(0) as u32;
    let find = |kind: &str, pred: &dyn Fn(&Value, &Value) -> bool| -> Option<&Value> {
        events
            .iter()
            .copied()
            .find(|ev| ev.get(kind).is_some_and(|body| pred(ev, body)))
    };
    let s = |v: &Value, p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let n = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);

    let exec = find("exec", &|ev, b| {
        pid_of(ev) == e.true_pid && b.get("argv").is_some_and(|a| a.to_string().contains(MARK))
    });
    c.add(
        "exec",
        exec.is_some_and(|ev| {
            s(ev, "/exec/exe") == "/bin/true" && s(ev, "/exec/cwd") == "/tmp/kmx-cwd"
        }),
        exec.map_or("no exec of /bin/true".into(), |ev| {
            format!(
                "exe {} cwd {} argv {}",
                s(ev, "/exec/exe"),
                s(ev, "/exec/cwd"),
                ev.pointer("/exec/argv").cloned().unwrap_or_default()
            )
        }),
    );
    let fork = find("fork", &|ev, b| {
        pid_of(ev) == e.true_pid && n(b, "/parentPid") as u32 == e.driver
    });
    c.add(
        "fork",
        fork.is_some(),
        format!("child {} of {}", e.true_pid, e.driver),
    );
    let exit = find("exit", &|ev, _| pid_of(ev) == e.true_pid);
    c.add("exit", exit.is_some(), format!("pid {}", e.true_pid));
    let failed = find("execFailed", &|_, b| s(b, "/filename").contains(MARK));
    c.add(
        "exec_failed",
        failed.is_some(),
        failed.map_or("none".into(), |ev| s(ev, "/execFailed/error")),
    );
    let port = u64::from(e.listen_port);
    // bind asked for port 0 (the kernel picks one): the event carries the address asked
    // for, so it is found by its address and descriptor's owner.
    let bind = find("bind", &|ev, b| {
        pid_of(ev) == e.driver && s(b, "/socket/localAddr") == "127.0.0.1"
    });
    c.add("bind", bind.is_some(), "127.0.0.1:0".into());
    for (kind, name, ptr) in [
        ("listen", "listen", "/socket/localPort"),
        ("connect", "connect", "/socket/remotePort"),
        ("accept", "accept", "/socket/localPort"),
    ] {
        let found = find(kind, &|ev, b| pid_of(ev) == e.driver && n(b, ptr) == port);
        c.add(name, found.is_some(), format!("127.0.0.1:{port}"));
    }
    let dup = find("dup", &|ev, b| {
        pid_of(ev) == e.dup_pid && s(b, "/file/kind") == "FD_KIND_SOCKET"
    });
    c.add(
        "dup",
        dup.is_some(),
        format!("dup2 of a socket onto stdio by {}", e.dup_pid),
    );
    let shell = find("exec", &|ev, b| {
        pid_of(ev) == e.dup_pid && s(b, "/stdio/0/kind") == "FD_KIND_SOCKET"
    });
    c.add(
        "exec_socket_stdio",
        shell.is_some(),
        format!("/bin/sh on a socket, pid {}", e.dup_pid),
    );
    let memfd = find("memfdCreate", &|_, b| s(b, "/name").contains(MARK));
    c.add("memfd_create", memfd.is_some(), format!("{MARK}-payload"));
    let memfd_exec = find("exec", &|ev, b| {
        pid_of(ev) == e.memfd_pid && b.get("exeMemfd") == Some(&Value::Bool(true))
    });
    c.add(
        "exec_memfd",
        memfd_exec.is_some(),
        memfd_exec.map_or("none".into(), |ev| s(ev, "/exec/exe")),
    );
    let ptrace = find("ptrace", &|ev, b| {
        pid_of(ev) == e.driver && n(b, "/targetPid") as u32 == e.ptrace_target
    });
    c.add(
        "ptrace",
        ptrace.is_some(),
        ptrace.map_or("none".into(), |ev| s(ev, "/ptrace/request")),
    );
    let wide = find("connect", &|ev, b| {
        pid_of(ev) == e.driver
            && n(b, "/socket/remotePort") == u64::from(e.wide_port)
            && s(b, "/socket/remoteAddr") == "127.0.0.1"
    });
    c.add(
        "connect_storage_len",
        e.wide_port != 0 && wide.is_some(),
        format!(
            "refused connect to 127.0.0.1:{} with a 128-byte address",
            e.wide_port
        ),
    );
    // Where the kernel's copy is used (fexit on the security hooks), the event names what
    // the kernel did; on the dispatcher, what the caller's memory said afterwards, which
    // proves the re-enactment raced as meant.
    let unix = |path: &str| {
        find("connect", &|ev, b| {
            pid_of(ev) == e.driver && s(b, "/unixPath") == path
        })
        .is_some()
    };
    let (want, other) = if kernel_view.net {
        (UNIX_REAL, UNIX_FAKE)
    } else {
        (UNIX_FAKE, UNIX_REAL)
    };
    c.add(
        if kernel_view.net {
            "connect_kernel_copy"
        } else {
            "connect_caller_buffer"
        },
        unix(want) && !unix(other),
        format!("rewritten connect reported as {want}"),
    );
    let ns_target = find("fork", &|_, b| {
        n(b, "/parentPid") as u32 == e.ns_tracer && e.ns_tracer != 0
    })
    .map_or(0, &pid_of);
    let want = if kernel_view.inject {
        ns_target
    } else {
        e.ns_target_arg
    };
    let got = find("ptrace", &|ev, _| {
        pid_of(ev) == e.ns_tracer && e.ns_tracer != 0
    })
    .map_or(0, |ev| n(ev, "/ptrace/targetPid") as u32);
    c.add(
        if kernel_view.inject { "ptrace_kernel_target" } else { "ptrace_caller_pid" },
        want != 0 && got == want,
        format!(
            "attach from pid {} to its namespace's pid 2 (host pid {ns_target}): reported {got}, want {want}",
            e.ns_tracer
        ),
    );
    let file = find("file", &|_, b| s(b, "/path") == e.cron_file);
    c.add(
        "file",
        file.is_some(),
        file.map_or(format!("nothing on {}", e.cron_file), |ev| {
            s(ev, "/file/op")
        }),
    );
    let linked = find("file", &|_, b| s(b, "/path") == e.linked_file);
    c.add(
        "file_resolved",
        linked.is_some(),
        format!("/tmp/kmx-cron/{MARK}-link reported as {}", e.linked_file),
    );
    // The name the writer gave goes along with the resolved path, in both hook modes (at
    // security_file_open the kernel's copy of it).
    let given = format!("/tmp/kmx-cron/{MARK}-link");
    let gave = linked
        .map(|ev| s(ev, "/file/givenPath"))
        .unwrap_or_default();
    c.add(
        "file_given_path",
        gave == given,
        format!("given path {gave:?}, want {given}"),
    );
    let bound = find("file", &|_, b| s(b, "/path") == e.bound_file);
    c.add(
        "file_bind_mount",
        bound.is_some(),
        format!("/tmp/kmx-bind/{MARK}-bind reported as {}", e.bound_file),
    );
    let signal = find("signal", &|ev, _| pid_of(ev) == e.driver);
    c.add(
        "signal",
        signal.is_some(),
        signal.map_or("none".into(), |ev| s(ev, "/signal/name")),
    );

    let alerts: Vec<&Value> = lines.iter().filter_map(|l| l.get("alert")).collect();
    for (rule, pid, what) in [
        ("EPMM-B7", e.dup_pid, "shell with a socket on its stdio"),
        ("EPMM-B16", e.memfd_pid, "program run from memory"),
    ] {
        let fired = alerts
            .iter()
            .any(|a| s(a, "/ruleId") == rule && n(a, "/process/pid") as u32 == pid);
        let mut detail = String::new();
        let _ = write!(detail, "{what}, pid {pid}");
        c.add(rule, fired, detail);
    }
    c
}
