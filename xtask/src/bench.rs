//! Benchmarks, run side by side with the no-sensor baseline in the same invocation.
//!
//! Each round runs the workload once without the agent and once with it (the order
//! alternates between rounds), and the report gives medians and their ratio, the agent's
//! CPU time while it ran, and what it counted as delivered and lost.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{cargo, step, workspace};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Which workload: `exec` (fork+exec of /bin/true).
    #[arg(default_value = "exec")]
    workload: Workload,
    /// Operations per run.
    #[arg(long, default_value_t = 20_000)]
    iterations: u32,
    /// Rounds; each has one baseline run and one run with the agent.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Extra arguments for `sensor-agent run`.
    #[arg(long, allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Benchmark this agent binary instead of building the workspace's (to set an older
    /// build's ratio beside the current one's).
    #[arg(long, value_name = "PATH")]
    agent: Option<std::path::PathBuf>,
    /// `detect` only: run the detection benchmark of this revision (built in a worktree
    /// under target/bench-against) beside this tree's, alternating, and give the ratios.
    #[arg(long, value_name = "REV")]
    against: Option<String>,
    /// Also count what the probes themselves execute: `kernel.bpf_stats_enabled` during
    /// each run with the agent, and the run time of every BPF program (`bpftool prog
    /// show`) divided by the iterations. Wall time on a noisy VM moves by more than the
    /// probes cost; this does not see the agent's userspace, which `agent CPU` does.
    #[arg(long)]
    bpf_stats: bool,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Workload {
    /// fork+exec of /bin/true, waited for one at a time.
    Exec,
    /// Loopback TCP: connect, accept, close, one cycle at a time.
    Connect,
    /// open(O_RDONLY) and close of an existing file: what most opens on a host are.
    Open,
    /// open(O_WRONLY|O_CREAT|O_TRUNC) and close of a file by relative path in a directory
    /// nobody watches: the most the file probes do for an open they do not report.
    OpenWrite,
    /// Alerts from agent to collector over mutual TLS with fsync on both sides: latency
    /// from exec to stored alert (`--iterations` samples) and a burst's alerts per second.
    Delivery,
    /// Simulated agents (100 and 1,000 concurrent streams) sending `--iterations` alerts in
    /// all to collectors on SQLite, PostgreSQL, and PostgreSQL with two collectors: stored
    /// alerts per second and stream-to-commit latency.
    Fleet,
    /// The detection benchmark (`cargo bench -p sensor-agent --bench detection`: decode,
    /// process table and rules, no probes), `--rounds` times; with `--against REV`, beside
    /// that revision's, as ratios. `BENCH_CYCLES` and `SENSOR_SIGMA_DIR` are passed on.
    Detect,
}

/// What one run with the agent cost and delivered.
struct AgentRun {
    wall: Duration,
    cpu: Duration,
    records: u64,
    lost: u64,
    /// Nanoseconds spent in BPF programs during the workload (`--bpf-stats`).
    bpf_ns: Option<u64>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if let Workload::Detect = args.workload {
        return crate::detect_bench::run(args.against.as_deref(), args.rounds);
    }
    if !crate::is_root() {
        bail!("the benchmark loads the probes and must run as root");
    }
    if let Workload::Delivery = args.workload {
        return delivery(&args);
    }
    if let Workload::Fleet = args.workload {
        return fleet(&args);
    }
    if args.bpf_stats {
        crate::setup::ensure_apt("bpftool", std::path::Path::new("/usr/sbin/bpftool"))?;
    }
    let bin = match &args.agent {
        Some(bin) => bin.clone(),
        None => {
            step("build the agent (release)");
            cargo(&["build", "--release", "--package", "sensor-agent"])?;
            workspace().join("target/release/sensor-agent")
        }
    };

    let mut baseline = Vec::new();
    let mut with_agent = Vec::new();
    for round in 0..args.rounds {
        step(&format!("round {}/{}", round + 1, args.rounds));
        let agent_first = round % 2 == 1;
        if !agent_first {
            baseline.push(workload(args.workload, args.iterations)?);
        }
        with_agent.push(run_with_agent(&bin, &args)?);
        if agent_first {
            baseline.push(workload(args.workload, args.iterations)?);
        }
        let b = baseline.last().unwrap();
        let a = with_agent.last().unwrap();
        eprintln!(
            "baseline {:.3}s, with agent {:.3}s (agent cpu {:.3}s, records {}, lost {}{})",
            b.as_secs_f64(),
            a.wall.as_secs_f64(),
            a.cpu.as_secs_f64(),
            a.records,
            a.lost,
            a.bpf_ns.map_or(String::new(), |ns| format!(
                ", BPF {:.3} us per operation",
                per_op_us(ns, args.iterations)
            ))
        );
    }
    if args.bpf_stats {
        let mut per_op: Vec<f64> = with_agent
            .iter()
            .filter_map(|a| a.bpf_ns)
            .map(|ns| per_op_us(ns, args.iterations))
            .collect();
        per_op.sort_by(f64::total_cmp);
        if let Some(mid) = per_op.get(per_op.len() / 2) {
            println!(
                "BPF programs: {mid:.3} us per operation (median of {} rounds; {})",
                per_op.len(),
                per_op
                    .iter()
                    .map(|v| format!("{v:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let base_median = median(baseline.clone());
    let agent_median = median(with_agent.iter().map(|a| a.wall).collect());
    let cpu_median = median(with_agent.iter().map(|a| a.cpu).collect());
    let lost: u64 = with_agent.iter().map(|a| a.lost).sum();
    let records: Vec<u64> = with_agent.iter().map(|a| a.records).collect();
    println!(
        "| workload | iterations | rounds | baseline median | with agent median | ratio | agent CPU (median) | records per run | lost |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {:?} | {} | {} | {:.3} s | {:.3} s | {:.3} | {:.3} s | {} | {} |",
        args.workload,
        args.iterations,
        args.rounds,
        base_median.as_secs_f64(),
        agent_median.as_secs_f64(),
        agent_median.as_secs_f64() / base_median.as_secs_f64(),
        cpu_median.as_secs_f64(),
        records
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        lost
    );
    Ok(())
}

/// Builds the release `packages` and the benchmark binary `bench` (tests/src/bin), and
/// runs it with `args`, pointed at the release agent and collector.
fn harness(packages: &[&str], bench: &str, args: &[&str]) -> Result<()> {
    step(&format!(
        "build {} and {bench} (release)",
        packages.join(", ")
    ));
    let mut build = vec!["build", "--release"];
    for package in packages {
        build.extend(["--package", package]);
    }
    cargo(&build)?;
    cargo(&[
        "build",
        "--release",
        "--package",
        "sensor-e2e",
        "--bin",
        bench,
    ])?;
    let release = workspace().join("target/release");
    let status = Command::new(release.join(bench))
        .args(args)
        .env("SENSOR_AGENT_BIN", release.join("sensor-agent"))
        .env("SENSOR_COLLECTOR_BIN", release.join("sensor-collector"))
        .status()
        .with_context(|| format!("run {bench}"))?;
    if !status.success() {
        bail!("{bench} failed ({status})");
    }
    Ok(())
}

/// The delivery benchmark (tests/src/bin/delivery_bench.rs).
fn delivery(args: &BenchArgs) -> Result<()> {
    let samples = args.iterations.min(10_000).to_string();
    harness(
        &["sensor-agent", "sensor-collector"],
        "delivery-bench",
        &[&samples, "2000"],
    )
}

/// The fleet benchmark (tests/src/bin/fleet_bench.rs), against a PostgreSQL server of its
/// own.
fn fleet(args: &BenchArgs) -> Result<()> {
    crate::setup::ensure_apt(
        "postgresql",
        std::path::Path::new("/usr/share/postgresql-common/pg_wrapper"),
    )?;
    harness(
        &["sensor-collector"],
        "fleet-bench",
        &["100,1000", &args.iterations.to_string()],
    )
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn workload(kind: Workload, iterations: u32) -> Result<Duration> {
    match kind {
        Workload::Exec => {
            let start = Instant::now();
            for _ in 0..iterations {
                let status = Command::new("/bin/true")
                    .status()
                    .context("fork+exec of /bin/true")?;
                if !status.success() {
                    bail!("/bin/true failed: {status}");
                }
            }
            Ok(start.elapsed())
        }
        Workload::Connect => connect_storm(iterations),
        Workload::Open => open_storm(iterations, false),
        Workload::OpenWrite => open_storm(iterations, true),
        Workload::Delivery | Workload::Fleet | Workload::Detect => {
            bail!("this benchmark has its own runner")
        }
    }
}

fn connect_storm(iterations: u32) -> Result<Duration> {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd,
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    // The server answers one byte; the client reads it and resets the connection
    // (SO_LINGER 0): no socket is left in TIME_WAIT, so runs do not slow each other down
    // by exhausting ports.
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let mut rest = [0u8; 1];
        for _ in 0..iterations {
            let (mut conn, _) = listener.accept()?;
            conn.write_all(b"x")?;
            // Returns on the client's reset.
            let _ = conn.read(&mut rest);
        }
        Ok(())
    });
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let start = Instant::now();
    let mut byte = [0u8; 1];
    for _ in 0..iterations {
        let mut conn = TcpStream::connect(addr).context("loopback connect")?;
        conn.read_exact(&mut byte).context("loopback read")?;
        // SAFETY: valid socket and option buffer.
        unsafe {
            libc::setsockopt(
                conn.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as u32,
            );
        }
    }
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the accepting thread panicked"))??;
    Ok(start.elapsed())
}

fn open_storm(iterations: u32, write: bool) -> Result<Duration> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir().join(format!("sensor-bench-open-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("bench.txt"), "x")?;
    let previous = std::env::current_dir()?;
    std::env::set_current_dir(&dir)?;
    let start = Instant::now();
    let result = (|| -> Result<()> {
        let mut options = std::fs::OpenOptions::new();
        if write {
            options.write(true).create(true).truncate(true).mode(0o644);
        } else {
            options.read(true);
        }
        for _ in 0..iterations {
            options.open("bench.txt")?;
        }
        Ok(())
    })();
    let elapsed = start.elapsed();
    std::env::set_current_dir(previous)?;
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| elapsed)
}

fn run_with_agent(bin: &std::path::Path, args: &BenchArgs) -> Result<AgentRun> {
    let mut agent = Command::new(bin)
        .arg("run")
        .args(&args.agent_args)
        .env("SENSOR_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start the agent")?;
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = agent.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut log = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let ready = line.contains("ready");
                log.push(line);
                if ready {
                    break;
                }
            }
            Err(_) if Instant::now() > deadline => {
                let _ = agent.kill();
                bail!("the agent was not ready within 60 s:\n{}", log.join("\n"));
            }
            Err(_) => {
                if let Ok(Some(status)) = agent.try_wait() {
                    bail!("the agent exited with {status}:\n{}", log.join("\n"));
                }
            }
        }
    }
    // CPU spent loading (BTF parsing, verification) is not the workload's cost.
    let cpu_at_ready = proc_cpu(agent.id())?;
    let stats = if args.bpf_stats {
        Some(BpfStats::start()?)
    } else {
        None
    };
    let wall = workload(args.workload, args.iterations);
    let bpf_ns = match stats {
        Some(stats) => Some(stats.finish()?),
        None => None,
    };
    let wall = wall?;
    let cpu = stop_and_measure(&mut agent)?.saturating_sub(cpu_at_ready);
    drop(rx.recv_timeout(Duration::from_millis(1)));
    let _ = reader.join();
    let log: Vec<String> = log.into_iter().chain(rx.try_iter()).collect();
    let stopped = log
        .iter()
        .find(|l| l.contains("stopped"))
        .with_context(|| format!("the agent did not log its totals:\n{}", log.join("\n")))?;
    Ok(AgentRun {
        wall,
        cpu,
        records: field(stopped, "records"),
        lost: field(stopped, "lost_in_kernel"),
        bpf_ns,
    })
}

fn per_op_us(ns: u64, iterations: u32) -> f64 {
    ns as f64 / f64::from(iterations.max(1)) / 1000.0
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The kernel's per-program run time, counted while this lives: the value of the sysctl
/// before, and each program's total at the start.
struct BpfStats {
    previous: String,
    before: std::collections::HashMap<u64, u64>,
}

impl BpfStats {
    fn start() -> Result<BpfStats> {
        let previous = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("cannot read {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("cannot enable {BPF_STATS}"))?;
        Ok(BpfStats {
            previous: previous.trim().to_owned(),
            before: bpf_run_times()?,
        })
    }

    /// Nanoseconds every program ran since `start`; the sysctl is put back.
    fn finish(self) -> Result<u64> {
        let after = bpf_run_times();
        let _ = std::fs::write(BPF_STATS, &self.previous);
        Ok(after?
            .iter()
            .map(|(id, ns)| ns.saturating_sub(self.before.get(id).copied().unwrap_or(0)))
            .sum())
    }
}

/// Program id -> total run time in ns, from `bpftool prog show --json`.
fn bpf_run_times() -> Result<std::collections::HashMap<u64, u64>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
        .context("cannot run bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let progs: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    Ok(progs
        .iter()
        .filter_map(|p| {
            Some((
                p.get("id")?.as_u64()?,
                p.get("run_time_ns")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0),
            ))
        })
        .collect())
}

/// `name=value` from a log line.
fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User+system CPU time of a running process, from /proc/PID/stat.
fn proc_cpu(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised comm; utime and stime are the 14th and 15th overall.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// SIGTERM, then wait4 for the agent's user+system CPU time.
fn stop_and_measure(agent: &mut Child) -> Result<Duration> {
    let pid = agent.id() as i32;
    // SAFETY: signalling and reaping our own child by pid.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
        let mut status = 0;
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::wait4(pid, &mut status, 0, &mut usage) != pid {
            bail!(
                "wait4 on the agent failed: {}",
                std::io::Error::last_os_error()
            );
        }
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
    }
}
