//! Detection throughput: kernel records through decode, the process table and the full
//! default rule pack (and, when `SENSOR_SIGMA_DIR` names a SigmaHQ rules directory, every
//! loadable Sigma rule), into a sink that discards. Reports events per second on one core.
//!
//! `cargo bench -p sensor-agent --bench detection`; `BENCH_ONLY=service` (or `curl`) runs
//! one mix alone, `BENCH_CYCLES` sets its size. `cargo xtask bench detect --against REV`
//! runs it beside an older revision's, alternating, and gives the ratios.

use std::{sync::Arc, time::Instant};

use sensor_agent::{
    decode::{BootClock, DecodeContext},
    detect::{Engine, alert::AgentIdentity, rules, sigma::SigmaSet, users::UserNames},
    output::Sink,
    pipeline::Pipeline,
    proctable::ProcessTable,
};
use sensor_common::{
    ExecRecord, ExitRecord, FileRecord, ForkRecord, NetRecord, fd_kind, file_op, kind,
};
use sensor_proto::v1::{Alert, Event};

/// The same allocator as the agent binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Discard {
    alerts: u64,
}

impl Sink for Discard {
    fn event(&mut self, _: &Event) {}
    fn alert(&mut self, _: &Alert) {
        self.alerts += 1;
    }
    fn flush(&mut self) {}
}

fn bytes_of<T>(v: &T) -> Vec<u8> {
    // SAFETY: plain repr(C) wire structs.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

/// One cycle of a busy appliance: a service forks and execs a program that connects out,
/// writes a log file and exits. With `downloader`, the program is curl, which starts a
/// partial match of the download-chmod-execute sequence every time (the worst case for
/// the sequence tracker); without, it is logger.
fn cycle(pid: u32, t: u64, downloader: bool) -> Vec<Vec<u8>> {
    let (args, filename, exe): (&[u8], &[u8], &[u8]) = if downloader {
        (
            b"/usr/bin/curl\0-s\0-o\0/var/cache/x\0https://updates.example/feed\0",
            b"/usr/bin/curl",
            b"curl\0bin\0usr\0",
        )
    } else {
        (
            b"/usr/bin/logger\0-t\0mi-monitor\0cpu-usage\0threshold\0reached\0",
            b"/usr/bin/logger",
            b"logger\0bin\0usr\0",
        )
    };
    let cwd = b"var\0";
    let mut exec = ExecRecord::default();
    exec.hdr.kind = kind::EXEC;
    exec.hdr.pid = pid;
    exec.hdr.tid = pid;
    exec.hdr.boot_ns = t + 1;
    exec.hdr.comm[..4].copy_from_slice(b"curl");
    exec.ppid = 500;
    exec.start_boot_ns = t;
    exec.args_len = args.len() as u16;
    exec.filename_len = filename.len() as u16;
    exec.exe_len = exe.len() as u16;
    exec.cwd_len = cwd.len() as u16;
    for s in &mut exec.stdio {
        s.kind = fd_kind::PIPE;
    }
    let mut exec_bytes = bytes_of(&exec);
    exec_bytes.extend_from_slice(args);
    exec_bytes.extend_from_slice(filename);
    exec_bytes.extend_from_slice(exe);
    exec_bytes.extend_from_slice(cwd);

    let mut connect = NetRecord::default();
    connect.hdr.kind = kind::CONNECT;
    connect.hdr.pid = pid;
    connect.hdr.boot_ns = t + 2;
    connect.fd = 3;
    connect.sock.kind = fd_kind::SOCKET;
    connect.sock.family = libc::AF_INET as u16;
    connect.sock.sock_type = libc::SOCK_STREAM as u8;
    connect.sock.remote_port = 443;
    connect.sock.remote_addr[..4].copy_from_slice(&[10, 1, 2, 3]);

    let path = b"/var/log/httpd/https-access_log";
    let mut file = FileRecord::default();
    file.hdr.kind = kind::FILE;
    file.hdr.pid = pid;
    file.hdr.boot_ns = t + 3;
    file.op = file_op::OPEN_WRITE;
    file.path_len = path.len() as u16;
    let mut file_bytes = bytes_of(&file);
    file_bytes.extend_from_slice(path);

    vec![
        fork_record(pid, 500, t),
        exec_bytes,
        bytes_of(&connect),
        file_bytes,
        exit_record(pid, 500, t, t + 4),
    ]
}

/// An exec record of `pid` (child of `ppid`) running `path` with `argv`.
fn exec_record(pid: u32, ppid: u32, t: u64, path: &str, argv: &[String]) -> Vec<u8> {
    let args: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    // The kernel walks the executable's dentries leaf first.
    let exe: Vec<u8> = path
        .rsplit('/')
        .filter(|c| !c.is_empty())
        .flat_map(|c| c.bytes().chain([0]))
        .collect();
    let name = path.rsplit('/').next().unwrap_or(path).as_bytes();
    let cwd = b"tomcat\0mi\0";
    let mut exec = ExecRecord::default();
    exec.hdr.kind = kind::EXEC;
    exec.hdr.pid = pid;
    exec.hdr.tid = pid;
    exec.hdr.boot_ns = t + 1;
    let comm = name.len().min(15);
    exec.hdr.comm[..comm].copy_from_slice(&name[..comm]);
    exec.ppid = ppid;
    exec.start_boot_ns = t;
    // The kernel copies at most 4 KiB of arguments.
    let args = &args[..args.len().min(4096)];
    exec.args_len = args.len() as u16;
    exec.filename_len = path.len() as u16;
    exec.exe_len = exe.len() as u16;
    exec.cwd_len = cwd.len() as u16;
    for s in &mut exec.stdio {
        s.kind = fd_kind::PIPE;
    }
    let mut bytes = bytes_of(&exec);
    bytes.extend_from_slice(args);
    bytes.extend_from_slice(path.as_bytes());
    bytes.extend_from_slice(&exe);
    bytes.extend_from_slice(cwd);
    bytes
}

fn fork_record(pid: u32, ppid: u32, t: u64) -> Vec<u8> {
    let mut fork = ForkRecord::default();
    fork.hdr.kind = kind::FORK;
    fork.hdr.pid = pid;
    fork.hdr.tid = pid;
    fork.hdr.boot_ns = t;
    fork.parent_pid = ppid;
    fork.parent_tid = ppid;
    fork.child_start_boot_ns = t;
    bytes_of(&fork)
}

fn exit_record(pid: u32, ppid: u32, start: u64, t: u64) -> Vec<u8> {
    let mut exit = ExitRecord::default();
    exit.hdr.kind = kind::EXIT;
    exit.hdr.pid = pid;
    exit.hdr.boot_ns = t;
    exit.ppid = ppid;
    exit.start_boot_ns = start;
    bytes_of(&exit)
}

/// A Tomcat JVM's command line: 60 `-D` properties, about 3 KiB; `salt` makes it
/// unique (an attacker starting long-argv programs that no cache has seen).
fn jvm_argv(salt: Option<u32>) -> Vec<String> {
    let mut argv = vec!["/usr/lib/jvm/java-17/bin/java".to_owned()];
    let salt = salt.map_or(String::new(), |s| format!("-{s}"));
    argv.extend((0..60).map(|i| {
        format!("-Dcom.mobileiron.vsp.property{i:02}=/mi/tomcat/conf/vsp/settings/value-{i:02}{salt}.properties")
    }));
    argv.extend(
        [
            "-classpath",
            "/mi/tomcat/bin/bootstrap.jar:/mi/tomcat/bin/tomcat-juli.jar",
        ]
        .map(String::from),
    );
    argv.push("org.apache.catalina.startup.Bootstrap".into());
    argv.push("start".into());
    argv
}

/// The Sigma worst case of issue 14: a Tomcat JVM whose children are, three times in
/// four, a maintenance shell, and once a JVM with a 3 KiB command line; each child forks,
/// execs and exits (3 events). With `unique`, every child JVM's command line differs.
fn jvm_mix(children: u32, unique: bool) -> Vec<Vec<u8>> {
    let jvm = jvm_argv(None);
    let shell: Vec<String> = ["/bin/sh", "-c", "ulimit -n"].map(String::from).to_vec();
    let mut out = vec![
        fork_record(400, 1, 1),
        exec_record(400, 1, 1, "/usr/lib/jvm/java-17/bin/java", &jvm),
    ];
    for i in 0..children {
        let pid = 10_000 + (i % 30_000);
        let t = u64::from(i + 1) * 1_000_000;
        out.push(fork_record(pid, 400, t));
        out.push(if i % 4 == 3 {
            let argv = if unique {
                jvm_argv(Some(i))
            } else {
                jvm.clone()
            };
            exec_record(pid, 400, t, "/usr/lib/jvm/java-17/bin/java", &argv)
        } else {
            exec_record(pid, 400, t, "/bin/sh", &shell)
        });
        out.push(exit_record(pid, 400, t, t + 4));
    }
    out
}

fn pipeline(sigma: SigmaSet) -> Pipeline<Discard> {
    let set =
        rules::compile_texts(&[(rules::DEFAULT_PACK_NAME.into(), rules::DEFAULT_PACK.into())])
            .unwrap();
    let engine = Engine::new(
        Arc::new(set),
        Arc::new(sigma),
        UserNames::default(),
        AgentIdentity::default(),
        BootClock::default(),
        1,
    );
    Pipeline::new(
        ProcessTable::default(),
        engine,
        Discard { alerts: 0 },
        false,
        DecodeContext::default(),
    )
}

/// Live with `--record`: the same records, timed with the recorder writing a trace.
fn run_recording(records: &[Vec<u8>], dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let trace = dir.join(format!("{name}.trace.zst"));
    let mut p = pipeline(SigmaSet::default());
    p.recorder = Some(
        sensor_agent::trace::recorder::Recorder::new(
            sensor_agent::trace::recorder::RecordOptions::new(trace.clone()),
        )
        .unwrap(),
    );
    let start = Instant::now();
    for (i, r) in records.iter().enumerate() {
        p.handle_record(r);
        if i % 50_000 == 0 {
            p.flush_traces();
        }
    }
    p.finish();
    let secs = start.elapsed().as_secs_f64();
    let events = p.stats.events;
    let size = std::fs::metadata(&trace).map_or(0, |m| m.len());
    let mix = if name == "service" {
        String::new()
    } else {
        format!(", {name} mix")
    };
    println!(
        "| default pack + recording (zstd){mix} | 0 | {events} | {secs:.3} s | {:.0} | {} | trace {:.1} MiB, {:.1} bytes/event |",
        events as f64 / secs,
        p.sink.alerts,
        size as f64 / 1048576.0,
        size as f64 / events as f64
    );
    trace
}

/// Replay of the recorded trace: read, decompress, pipeline.
fn run_replay(label: &str, trace: &std::path::Path, sigma: SigmaSet) -> f64 {
    let set = Arc::new(
        rules::compile_texts(&[(rules::DEFAULT_PACK_NAME.into(), rules::DEFAULT_PACK.into())])
            .unwrap(),
    );
    let sigma_rules = sigma.len();
    let mut out = std::io::sink();
    let start = Instant::now();
    let summary = sensor_agent::replay::replay(
        &sensor_agent::replay::ReplayOptions {
            traces: vec![trace.to_path_buf()],
            print_events: false,
            collapse_window_ns: None,
        },
        set,
        Arc::new(sigma),
        &mut out,
    );
    let secs = start.elapsed().as_secs_f64();
    println!(
        "| {label} | {sigma_rules} | {} | {secs:.3} s | {:.0} | {} |",
        summary.events,
        summary.events as f64 / secs,
        summary.alerts
    );
    secs
}

/// Service cycles (see `cycle`).
fn cycles(n: u32, downloader: bool) -> Vec<Vec<u8>> {
    (0..n)
        .flat_map(|i| cycle(10_000 + (i % 30_000), u64::from(i) * 1_000_000, downloader))
        .collect()
}

/// The pipeline over `records` (prepared up front: only decode onwards is timed); events/s.
fn run(label: &str, sigma: SigmaSet, records: &[Vec<u8>]) -> f64 {
    let set =
        rules::compile_texts(&[(rules::DEFAULT_PACK_NAME.into(), rules::DEFAULT_PACK.into())])
            .unwrap();
    let sigma_rules = sigma.len();
    let engine = Engine::new(
        Arc::new(set),
        Arc::new(sigma),
        UserNames::default(),
        AgentIdentity::default(),
        BootClock::default(),
        1,
    );
    let mut pipeline = Pipeline::new(
        ProcessTable::default(),
        engine,
        Discard { alerts: 0 },
        false,
        DecodeContext::default(),
    );
    let start = Instant::now();
    for r in records {
        pipeline.handle_record(r);
    }
    pipeline.finish();
    let secs = start.elapsed().as_secs_f64();
    let events = pipeline.stats.events;
    println!(
        "| {label} | {sigma_rules} | {events} | {secs:.3} s | {:.0} | {} |",
        events as f64 / secs,
        pipeline.sink.alerts
    );
    events as f64 / secs
}

fn main() {
    let n = std::env::var("BENCH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    println!("| rules | Sigma rules | events | time | events/s (one core) | alerts |");
    println!("| --- | --- | --- | --- | --- | --- |");
    // One mix alone (`BENCH_ONLY=service` or `curl`), to compare builds side by side.
    if let Ok(mix) = std::env::var("BENCH_ONLY") {
        let downloader = match mix.as_str() {
            "service" => false,
            "curl" => true,
            other => {
                eprintln!("BENCH_ONLY={other:?}: the mixes are `service` and `curl`");
                std::process::exit(2);
            }
        };
        run(
            &format!("default pack, {mix} mix"),
            SigmaSet::default(),
            &cycles(n, downloader),
        );
        return;
    }
    // One set of records in memory at a time, as before the JVM mix was added: a second
    // million records held during a run made its allocations fault in fresh pages.
    run(
        "default pack, service mix",
        SigmaSet::default(),
        &cycles(n, false),
    );
    run(
        "default pack, curl mix",
        SigmaSet::default(),
        &cycles(n, true),
    );
    let dir = tempfile::tempdir().expect("temporary directory");
    // The records are dropped before the replay: a replay allocates beside 1,000,000 live
    // records otherwise, which the old bench never did.
    let trace = run_recording(&cycles(n, false), dir.path(), "service");
    run_replay(
        "replay of that trace, default pack",
        &trace,
        SigmaSet::default(),
    );
    let Some(sigma_dir) = std::env::var_os("SENSOR_SIGMA_DIR") else {
        return;
    };
    // cargo runs benches from the package directory: a relative path is taken from the
    // workspace root, where the command is typed.
    let sigma_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(sigma_dir);
    let sigma = || {
        SigmaSet::load(std::slice::from_ref(&sigma_dir))
            .unwrap_or_else(|e| panic!("load Sigma rules from {}: {e}", sigma_dir.display()))
    };
    run(
        "default pack + SigmaHQ, service mix",
        sigma(),
        &cycles(n, false),
    );
    // Issue 14's trace: 4,000 children of a JVM, 1,000 of them JVMs (12,000 events).
    let children = std::env::var("BENCH_JVM_CHILDREN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n / 50);
    let jvm = jvm_mix(children, false);
    let without = run("default pack, JVM mix", SigmaSet::default(), &jvm);
    let with = run("default pack + SigmaHQ, JVM mix", sigma(), &jvm);
    let trace = run_recording(&jvm, dir.path(), "JVM");
    let replay_without = run_replay(
        "replay of the JVM mix, default pack",
        &trace,
        SigmaSet::default(),
    );
    let replay_with = run_replay(
        "replay of the JVM mix, default pack + SigmaHQ",
        &trace,
        sigma(),
    );
    let unique = jvm_mix(children, true);
    let unique_without = run(
        "default pack, JVM mix, unique command lines",
        SigmaSet::default(),
        &unique,
    );
    let unique_with = run(
        "default pack + SigmaHQ, JVM mix, unique command lines",
        sigma(),
        &unique,
    );
    println!();
    println!(
        "JVM mix with SigmaHQ: pipeline {:.2}x the time without, replay {:.2}x; \
         with unique command lines, pipeline {:.2}x",
        without / with,
        replay_with / replay_without,
        unique_without / unique_with
    );
}
