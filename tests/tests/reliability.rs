//! Faults that must cost neither alerts nor the sensor: a full spool disk, a damaged spool,
//! an idle-socket flood and a descriptor shortage at the collector, a collector stopped
//! with streams open, hostile rule files. Each is re-created for real (a 1 MiB tmpfs,
//! flipped bytes, hundreds of sockets from another loopback address, a low descriptor
//! limit, SIGTERM, rule files built to exhaust a naive parser) and the test asserts that
//! nothing accepted is lost without a declared gap, detection keeps running, and the
//! collector keeps serving a good agent.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use sensor_e2e::{
    Agent, Scratch, agent_bin, alert_of,
    collector::{
        Collector, TmpProgram, alert_pid, b17_of, free_port, query, stored_pids, wait_agent_row,
    },
    num,
};

const STORE_TIMEOUT: Duration = Duration::from_secs(45);

/// These tests load the machine (thousands of execs, hundreds of sockets) and pick free
/// ports that a neighbour could take meanwhile: they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn agent_args<'a>(url: &'a str, spool: &'a str, id: &'a str) -> Vec<&'a str> {
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
        "1",
        "--heartbeat",
        "1",
    ]
}

/// A tmpfs of `size` mounted by the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs at {}", at.display());
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("segment-")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_full_spool_disk_declares_what_it_could_not_keep_and_delivery_resumes() {
    full_disk(false);
}

/// The same with the agent restarted while the disk is still full: the count of what it
/// could not write survives in the spool's ledger and is declared all the same.
#[test]
fn losses_on_a_full_disk_are_declared_after_a_restart_too() {
    full_disk(true);
}

fn full_disk(restart: bool) {
    let _serial = serial();
    let scratch = Scratch::new(if restart {
        "rel-diskfull-restart"
    } else {
        "rel-diskfull"
    });
    let db = scratch.path("c.db");
    let disk = Tmpfs::mount(scratch.path("spool"), "1m");
    let spool = disk.0.to_str().unwrap().to_owned();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut args = agent_args(&url, &spool, "e2e-diskfull");
    args.push("--send-events");
    let mut agent = Agent::start_with(&args);

    // The collector is down: events fill the 1 MiB disk, then alerts arrive on a full one.
    let status = Command::new("/bin/sh")
        .args([
            "-c",
            "i=0; while [ $i -lt 6000 ]; do /bin/true; i=$((i+1)); done",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    agent.wait_for_log("cannot spool a record", STORE_TIMEOUT);
    let prog = TmpProgram::new("diskfull");
    let lost_pids: Vec<u64> = (0..20).map(|_| u64::from(prog.run())).collect();
    // Detection goes on: every alert is still printed.
    for pid in &lost_pids {
        agent.wait_for("a B17 alert on a full disk", |l| {
            b17_of(l, prog.exe()) && alert_pid(l) == *pid
        });
    }

    let mut printed = Vec::new();
    if restart {
        printed = agent.collect(Duration::from_millis(500), |l| l.get("alert").is_some());
        agent.stop();
        agent = Agent::start_with(&args);
    }

    // The collector comes: what is on disk is delivered, acknowledged segments free the
    // disk, the records that could not be written are declared, and SELF-SHED says so.
    let mut collector = Collector::start(&db, &format!("127.0.0.1:{port}"), &[]);
    let row = wait_agent_row(
        &db,
        "e2e-diskfull",
        "losses declared, nothing outstanding",
        STORE_TIMEOUT,
        |r| r["outstanding"] == 0 && num(&r["shed"]) >= lost_pids.len() as u64,
    );
    let stored = stored_pids(&db, "e2e-diskfull", prog.exe());
    assert!(
        lost_pids.iter().all(|p| !stored.contains(p)),
        "the alerts of the full disk were declared lost, not stored: {stored:?}"
    );
    // SELF-SHED counts the alerts lost (the twenty, and any other raised meanwhile).
    let deadline = Instant::now() + STORE_TIMEOUT;
    loop {
        let declared: u64 = query(
            "alerts",
            &db,
            &["--agent", "e2e-diskfull", "--rule", "SELF-SHED"],
        )
        .iter()
        .filter_map(|l| {
            l["alert"]["details"]["shed_alerts"]
                .as_str()?
                .parse::<u64>()
                .ok()
        })
        .sum();
        if declared >= lost_pids.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SELF-SHED declared {declared} alerts lost"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Every alert the agent printed is stored or within the declared loss.
    printed.extend(agent.collect(Duration::from_millis(500), |l| l.get("alert").is_some()));
    let stored_all = query("alerts", &db, &["--agent", "e2e-diskfull"]);
    assert!(
        stored_all.len() as u64 + num(&row["shed"]) >= printed.len() as u64,
        "{} stored + {} declared < {} printed",
        stored_all.len(),
        num(&row["shed"]),
        printed.len()
    );

    // Delivery goes on by itself.
    let later: BTreeSet<u64> = (0..5).map(|_| u64::from(prog.run())).collect();
    collector.wait_alerts(later.len(), STORE_TIMEOUT, |l| {
        b17_of(l, prog.exe()) && later.contains(&alert_pid(l))
    });
    assert!(later.is_subset(&stored_pids(&db, "e2e-diskfull", prog.exe())));
    agent.stop();
    collector.stop();
}

#[test]
fn a_damaged_spool_keeps_every_good_record_and_never_reuses_a_number() {
    let _serial = serial();
    let scratch = Scratch::new("rel-damaged");
    let db = scratch.path("c.db");
    let spool = scratch.path("spool");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let id = "e2e-damaged";
    let spool_str = spool.to_str().unwrap().to_owned();
    let prog = TmpProgram::new("damaged");

    // Thirty alerts wait in the spool while the collector is down.
    let mut agent = Agent::start_with(&agent_args(&url, &spool_str, id));
    let pids: Vec<u64> = (0..30).map(|_| u64::from(prog.run())).collect();
    for pid in &pids {
        agent.wait_for("B17", |l| b17_of(l, prog.exe()) && alert_pid(l) == *pid);
    }
    std::thread::sleep(Duration::from_millis(1500));
    agent.stop();

    // One byte flipped a third into the segment; a foreign file and a directory named like
    // segments; then the state damaged too.
    let segment = &segments(&spool)[0];
    let mut data = std::fs::read(segment).unwrap();
    let at = data.len() / 3;
    data[at] ^= 0x5a;
    std::fs::write(segment, &data).unwrap();
    let foreign = spool.join("segment-0000099999");
    std::fs::write(&foreign, "not the spool's").unwrap();
    let blocking = spool.join("segment-0000099998");
    std::fs::create_dir(&blocking).unwrap();
    std::fs::write(spool.join("state"), "garbage").unwrap();

    // The agent starts anyway, detects, and delivers every good record once.
    let mut collector = Collector::start(&db, &format!("127.0.0.1:{port}"), &[]);
    let mut agent = Agent::start_with(&agent_args(&url, &spool_str, id));
    let after: Vec<u64> = (0..5).map(|_| u64::from(prog.run())).collect();
    std::thread::sleep(Duration::from_secs(3));
    for pid in &after {
        agent.wait_for("B17 after the damage", |l| {
            b17_of(l, prog.exe()) && alert_pid(l) == *pid
        });
    }
    let row = wait_agent_row(&db, id, "everything accounted for", STORE_TIMEOUT, |r| {
        r["outstanding"] == 0 && num(&r["alerts"]) >= 34
    });
    let stored = stored_pids(&db, id, prog.exe());
    let kept = pids.iter().filter(|p| stored.contains(p)).count();
    assert!(
        kept >= 29,
        "every record but the damaged one is kept ({kept} of 30): {stored:?}"
    );
    assert!(
        after.iter().all(|p| stored.contains(p)),
        "new alerts are stored: a reused number would have been dropped as a duplicate"
    );
    assert!(
        kept == 30 || num(&row["shed"]) >= 1,
        "the damaged record is declared: {row}"
    );
    assert_eq!(std::fs::read(&foreign).unwrap(), b"not the spool's");
    assert!(blocking.is_dir());
    assert!(agent.log().contains("left alone"), "{}", agent.log());
    agent.stop();
    collector.stop();
}

/// A plaintext collector on loopback flooded with idle connections from 127.0.0.2 stays
/// responsive: it closes them after its first-bytes deadline, caps them per peer, and a
/// good agent from 127.0.0.1 is served meanwhile.
#[test]
fn an_idle_connection_flood_does_not_hold_the_collector_down() {
    let _serial = serial();
    let scratch = Scratch::new("rel-flood");
    let db = scratch.path("c.db");
    let port = free_port();
    let collector = Collector::start_with_nofile(
        &db,
        &format!("127.0.0.1:{port}"),
        &["--max-connections-per-peer", "64"],
        256,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let flood = runtime.block_on(open_idle(port, 400));
    assert!(
        flood.len() >= 300,
        "the flood opened {} sockets",
        flood.len()
    );
    std::thread::sleep(Duration::from_millis(500));
    let fds = open_fds(collector.pid());
    assert!(
        fds < 200,
        "the collector holds {fds} descriptors: the per-peer bound failed"
    );
    assert!(
        collector
            .log()
            .contains("this peer has as many connections"),
        "{}",
        collector.log()
    );

    let spool = scratch.path("spool");
    let url = format!("http://127.0.0.1:{port}");
    let mut agent = Agent::start_with(&agent_args(&url, spool.to_str().unwrap(), "e2e-flood"));
    let prog = TmpProgram::new("flood");
    let pid = u64::from(prog.run());
    let mut collector = collector;
    collector.wait_alerts(1, STORE_TIMEOUT, |l| {
        b17_of(l, prog.exe()) && alert_pid(l) == pid
    });

    // The idle sockets are closed by the collector, not kept forever.
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_fds(collector.pid()) > 40 {
        assert!(
            Instant::now() < deadline,
            "idle connections were not reaped: {} fds",
            open_fds(collector.pid())
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        collector.log().contains("bytes in the first 10 s"),
        "{}",
        collector.log()
    );
    drop(flood);
    agent.stop();
    collector.stop();
}

/// With fewer descriptors than connections it would accept, the collector runs out of
/// descriptors: it backs off and says so instead of spinning, and serves again once the
/// idle connections are gone.
#[test]
fn out_of_descriptors_the_collector_backs_off_instead_of_spinning() {
    let _serial = serial();
    let scratch = Scratch::new("rel-emfile");
    let db = scratch.path("c.db");
    let port = free_port();
    let mut collector = Collector::start_with_nofile(
        &db,
        &format!("127.0.0.1:{port}"),
        &[
            "--max-connections",
            "100000",
            "--max-connections-per-peer",
            "100000",
        ],
        128,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let flood = runtime.block_on(open_idle(port, 300));
    let before = cpu_ticks(collector.pid());
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_ticks(collector.pid()) - before;
    // 3 s is 300 ticks of one core; a spinning accept loop took 94% of one.
    assert!(
        used < 60,
        "the collector used {used} of 300 ticks while out of descriptors"
    );
    assert!(
        collector.log().contains("out of descriptors"),
        "{}",
        collector.log()
    );

    // The flood's sockets are reaped after the first-bytes deadline; a good agent is then
    // served (it retries every second).
    let spool = scratch.path("spool");
    let url = format!("http://127.0.0.1:{port}");
    let mut agent = Agent::start_with(&agent_args(&url, spool.to_str().unwrap(), "e2e-emfile"));
    let prog = TmpProgram::new("emfile");
    let pid = u64::from(prog.run());
    collector.wait_alerts(1, Duration::from_secs(90), |l| {
        b17_of(l, prog.exe()) && alert_pid(l) == pid
    });
    drop(flood);
    agent.stop();
    collector.stop();
}

/// SIGTERM with agent streams open: the collector stops within its bound, the agents keep
/// their records and deliver them to the next collector.
#[test]
fn sigterm_with_open_streams_stops_within_a_bound() {
    let _serial = serial();
    let scratch = Scratch::new("rel-sigterm");
    let db = scratch.path("c.db");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut collector = Collector::start(&db, &listen, &[]);
    let spool = scratch.path("spool");
    let url = format!("http://127.0.0.1:{port}");
    let mut agent = Agent::start_with(&agent_args(&url, spool.to_str().unwrap(), "e2e-sigterm"));
    let prog = TmpProgram::new("sigterm");
    let first = u64::from(prog.run());
    collector.wait_alerts(1, STORE_TIMEOUT, |l| {
        b17_of(l, prog.exe()) && alert_pid(l) == first
    });

    // SAFETY: signalling the collector we started, by its pid.
    unsafe { libc::kill(collector.pid() as i32, libc::SIGTERM) };
    let started = Instant::now();
    while !collector.exited() {
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "the collector did not stop within 12 s of SIGTERM:\n{}",
            collector.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(collector.log().contains("SIGTERM: stopping"));

    // Alerts raised while it is down reach the next collector on the same database.
    let during = u64::from(prog.run());
    agent.wait_for("B17 while the collector is down", |l| {
        b17_of(l, prog.exe()) && alert_pid(l) == during
    });
    let mut collector = Collector::start(&db, &listen, &[]);
    collector.wait_alerts(1, STORE_TIMEOUT, |l| {
        b17_of(l, prog.exe()) && alert_pid(l) == during
    });
    assert_eq!(
        stored_pids(&db, "e2e-sigterm", prog.exe()),
        BTreeSet::from([first, during])
    );
    agent.stop();
    collector.stop();
}

/// Rule files built to exhaust the rule compiler are refused with an error that says
/// where, in `rules check`, at start and on SIGHUP, and cost memory in proportion to
/// their size.
#[test]
fn hostile_rule_files_are_refused_where_they_are_wrong() {
    let _serial = serial();
    let scratch = Scratch::new("rel-rules");
    let rule = |id: &str, condition: &str| {
        format!(
            "rules:\n  - id: {id}\n    title: t\n    severity: low\n    on: [exec]\n    condition: {condition}\n"
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "deep-not.yaml",
            rule(
                "DEEP-NOT",
                &format!("{}proc.uid = 0", "not ".repeat(40_000)),
            ),
            "nest more than 64 levels",
        ),
        (
            "deep-parens.yaml",
            rule(
                "DEEP-PARENS",
                &format!(
                    "\"{}proc.uid = 0{}\"",
                    "(".repeat(40_000),
                    ")".repeat(40_000)
                ),
            ),
            "nest more than 64 levels",
        ),
        (
            "doubling.yaml",
            doubling_macros(40),
            "comparisons once its macros are expanded",
        ),
    ];
    for (name, text, expect) in &cases {
        let dir = scratch.path(name.trim_end_matches(".yaml"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
        let started = Instant::now();
        let out = Command::new(agent_bin())
            .args(["rules", "check"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{name}: {:?}",
            started.elapsed()
        );
        assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let located = format!("{}:", dir.join(name).display());
        assert!(
            stdout.contains(&located) && stdout.contains(expect),
            "{name}: {stdout}"
        );
        // The agent refuses to start on it, with the same error, and does not crash.
        let out = Command::new(agent_bin())
            .args(["run", "--rules"])
            .arg(&dir)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{name}: the agent crashed: {out:?}"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(expect),
            "{name}"
        );
    }

    // A file over the size bound is refused before it is read.
    let big = scratch.path("big");
    std::fs::create_dir_all(&big).unwrap();
    let item = "some-program-name-that-is-long-enough";
    let items = 17 * 1024 * 1024 / (item.len() + 4);
    let mut text = String::from("lists:\n  - name: huge\n    items:\n");
    for i in 0..items {
        text.push_str(&format!("      - {item}{i}\n"));
    }
    std::fs::write(big.join("huge.yaml"), &text).unwrap();
    let (out, _) = check_with_rss(&big);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("rule files are limited to"));

    // A list just under the bound, named whole by fifty rules: shared, so the memory stays
    // proportional to the file, not to the rules that use it.
    let shared = scratch.path("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let items = 14 * 1024 * 1024 / (item.len() + 12);
    let mut text = String::from("lists:\n  - name: many\n    items:\n");
    for i in 0..items {
        text.push_str(&format!("      - {item}{i}\n"));
    }
    text.push_str("rules:\n");
    for n in 0..50 {
        text.push_str(&format!(
            "  - id: SHARED-{n}\n    title: t\n    severity: low\n    on: [exec]\n    condition: proc.name in (many) and proc.uid = {n}\n"
        ));
    }
    let size = text.len() as u64;
    std::fs::write(shared.join("shared.yaml"), &text).unwrap();
    let (out, max_rss) = check_with_rss(&shared);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        max_rss < 12 * size + 200 * 1024 * 1024,
        "a {size}-byte rule file took {max_rss} bytes to check"
    );

    // SIGHUP with a hostile file: the reload is refused, the running rules stay.
    let live = scratch.path("live");
    std::fs::create_dir_all(&live).unwrap();
    let mut agent =
        Agent::start_with(&["run", "--collapse", "0", "--rules", live.to_str().unwrap()]);
    std::fs::write(live.join("deep.yaml"), &cases[0].1).unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_for("SELF-CONFIG reload refused", |l| {
        alert_of(l, "SELF-CONFIG").is_some_and(|a| a.to_string().contains("nest more than 64"))
    });
    let prog = TmpProgram::new("after-reload");
    let pid = u64::from(prog.run());
    agent.wait_for("detection goes on", |l| {
        b17_of(l, prog.exe()) && alert_pid(l) == pid
    });
    agent.stop();
}

/// Forty macros, each naming the one before twice.
fn doubling_macros(levels: usize) -> String {
    let mut text = String::from("macros:\n  - name: m0\n    condition: proc.uid = 0\n");
    for n in 1..=levels {
        text.push_str(&format!(
            "  - name: m{n}\n    condition: m{p} or m{p}\n",
            p = n - 1
        ));
    }
    text.push_str(&format!(
        "rules:\n  - id: DOUBLED\n    title: t\n    severity: low\n    on: [exec]\n    condition: m{levels}\n"
    ));
    text
}

/// `sensor-agent rules check DIR` and its peak resident memory in bytes.
// The child is reaped by wait4, which reports its rusage; std's wait cannot.
#[allow(clippy::zombie_processes)]
fn check_with_rss(dir: &Path) -> (std::process::Output, u64) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(agent_bin())
        .args(["rules", "check"])
        .arg(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut { stdout }, &mut s).unwrap();
        s
    });
    let mut status = 0;
    // SAFETY: zeroed rusage filled by wait4 for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for the child we spawned, by its pid.
    unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let stdout = reader.join().unwrap();
    (
        std::process::Output {
            status: std::process::ExitStatus::from_raw(status),
            stdout,
            stderr: Vec::new(),
        },
        usage.ru_maxrss as u64 * 1024,
    )
}

/// Opens up to `n` TCP connections to the collector from 127.0.0.2 and sends nothing.
async fn open_idle(port: u16, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut sockets = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let connect = socket.connect(format!("127.0.0.1:{port}").parse().unwrap());
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(Ok(stream)) => sockets.push(stream),
            _ => break,
        }
    }
    sockets
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// User and system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    field(11) + field(12)
}
