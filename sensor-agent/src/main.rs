//! `sensor-agent`: the command line. Logic lives in the library; see `lib.rs`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

use sensor_agent::{
    config, delivery, detect, identity,
    probes::{LoadOptions, Probe, SyscallHooks, enforce::Mode as EnforceMode},
    replay, run,
    trace::{flight::FlightOptions, recorder::RecordOptions},
};
use tracing_subscriber::EnvFilter;

/// mimalloc: the pipeline allocates per event (strings of argv, paths); glibc's allocator
/// was a quarter of detection time in `cargo bench --bench detection`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sensor-agent",
    version,
    about = "eBPF host sensor for Ivanti EPMM appliances"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the probes and watch the host until SIGINT or SIGTERM.
    Run(Box<RunArgs>),
    /// Work with rule files.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Run recorded traces through the same detection as a live run and print the same
    /// JSON lines.
    Replay(ReplayArgs),
    /// Learn the appliance's own baseline: watch a clean appliance for a while (or read
    /// recorded traces) and write the web tier's legitimate programs as an allow-list rule
    /// file to review and load with --rules.
    Learn(LearnArgs),
}

#[derive(clap::Args)]
struct LearnArgs {
    /// How long to watch the live host: 30s, 45m, 12h, 7d. Not with TRACES.
    #[arg(long, value_parser = learn_duration)]
    duration: Option<std::time::Duration>,
    /// The rule file to write (YAML, `allow:` entries).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Learn from these recorded traces instead of the live host.
    traces: Vec<PathBuf>,
    /// Keep the live run's recording in this directory (default: a temporary one, removed
    /// after learning).
    #[arg(long, value_name = "DIR")]
    record: Option<PathBuf>,
    /// Rule directory (repeatable), after the embedded EPMM pack.
    #[arg(long = "rules", value_name = "DIR")]
    rules: Vec<PathBuf>,
}

fn learn_duration(s: &str) -> Result<std::time::Duration, String> {
    detect::rules::parse_duration(s)
        .map(std::time::Duration::from_nanos)
        .ok_or_else(|| format!("`{s}` is not a duration like 30s, 45m, 12h, 7d"))
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// Trace files, in order (rotated files of one recording continue each other).
    #[arg(required = true)]
    traces: Vec<PathBuf>,
    /// Also print every event.
    #[arg(long)]
    events: bool,
    /// Rule directory (repeatable), after the embedded EPMM pack.
    #[arg(long = "rules", value_name = "DIR")]
    rules: Vec<PathBuf>,
    /// SigmaHQ rule directory (repeatable).
    #[arg(long = "sigma", value_name = "DIR")]
    sigma: Vec<PathBuf>,
    /// As `run --collapse`: repeats of a rule on one process tree within this many
    /// seconds collapse into one alert; 0: every match is its own alert (60). Replay with
    /// the live run's value to get its very lines.
    #[arg(long, value_name = "SECONDS")]
    collapse: Option<u64>,
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validate rule files (after the embedded EPMM pack) and Sigma rules; print each
    /// error as file:line:column and exit non-zero on any.
    Check {
        /// Rule directories or files.
        dirs: Vec<PathBuf>,
        /// SigmaHQ rule directories: list what loads and why the rest do not.
        #[arg(long = "sigma", value_name = "DIR")]
        sigma: Vec<PathBuf>,
    },
}

/// `run` flags. Each has a key in the configuration file (`--config`, default
/// /etc/sensor-agent/agent.toml); a flag given here wins. Defaults are the file's.
#[derive(clap::Args)]
struct RunArgs {
    /// Configuration file (default /etc/sensor-agent/agent.toml when it exists).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Also print every event as a JSON line (`{"event": {...}}`). [agent] events
    #[arg(long)]
    events: bool,
    /// Size of the kernel-to-agent ring buffer in MiB, a power of two (16). [agent] ring_mib
    #[arg(long, value_parser = parse_ring_mib, value_name = "MIB")]
    ring_mib: Option<u32>,
    /// Rule directory (repeatable), loaded after the embedded EPMM pack. [rules] dirs
    #[arg(long = "rules", value_name = "DIR")]
    rules: Vec<PathBuf>,
    /// SigmaHQ rule directory (repeatable): Linux process_creation, network_connection
    /// and file_event rules. [rules] sigma
    #[arg(long = "sigma", value_name = "DIR")]
    sigma: Vec<PathBuf>,
    /// Record every event into trace files: a directory (files rotated by size and age,
    /// oldest deleted past the total bound) or one file. [record] path
    #[arg(long = "record", value_name = "FILE_OR_DIR")]
    record: Option<PathBuf>,
    /// Rotate a trace file past this size (64 MiB). [record] max_mib
    #[arg(long, value_name = "MIB")]
    record_max_mib: Option<u64>,
    /// Rotate a trace file past this age (3600 s). [record] max_age_seconds
    #[arg(long, value_name = "SECONDS")]
    record_max_age: Option<u64>,
    /// Delete the oldest trace files past this total (1024 MiB). [record] max_total_mib
    #[arg(long, value_name = "MIB")]
    record_max_total_mib: Option<u64>,
    /// Flight recorder: write the seconds before and after each alert to this directory
    /// (the alert names the file). [flight] dir
    #[arg(long = "flight-dir", value_name = "DIR")]
    flight_dir: Option<PathBuf>,
    /// Seconds of events kept before an alert (30). [flight] before_seconds
    #[arg(long, value_name = "SECONDS")]
    flight_before: Option<u64>,
    /// Seconds of events written after an alert (10). [flight] after_seconds
    #[arg(long, value_name = "SECONDS")]
    flight_after: Option<u64>,
    /// Bound on the memory of the flight recorder's ring (32 MiB). [flight] max_mib
    #[arg(long, value_name = "MIB")]
    flight_max_mib: Option<usize>,
    /// Agent id stamped on alerts (default: derived from /etc/machine-id). [agent] agent_id
    #[arg(long = "agent-id")]
    agent_id: Option<String>,
    /// Also report file activity under this absolute path prefix (repeatable), besides
    /// the default watch list. [rules] watch
    #[arg(long = "watch", value_name = "PATH")]
    watch: Vec<String>,
    /// Do not attach this optional probe (repeatable); to measure what each costs.
    /// [agent] skip_probes
    #[arg(long = "skip-probe", value_name = "PROBE")]
    skip_probes: Vec<Probe>,
    /// How syscalls are hooked: `auto` (fexit on the syscalls' own functions where the
    /// kernel offers it, else the sys_exit dispatcher) or `sys_exit`. [agent] syscall_hooks
    #[arg(long = "syscall-hooks", value_name = "HOOKS")]
    syscall_hooks: Option<SyscallHooks>,
    /// Prevention for the web-tier lineages the rules' `enforce:` sections name: `off`,
    /// `audit` (alerts say what would have been stopped) or `on` (the exec is refused by
    /// BPF-LSM where active, else the program is killed at exec) (off). [agent] enforce
    #[arg(long, value_name = "MODE")]
    enforce: Option<EnforceMode>,
    /// Repeats of a rule on one process tree within this many seconds collapse into one
    /// alert with a count; 0: every match is its own alert (60). [agent] collapse_seconds
    #[arg(long, value_name = "SECONDS")]
    collapse: Option<u64>,
    /// Stream alerts to this collector: `https://HOST:PORT` (mutual TLS, with --tls-cert,
    /// --tls-key and --tls-ca) or `http://127.0.0.1:PORT` (plaintext, loopback only).
    /// Repeatable: the first is preferred, the next ones take over when it fails or falls
    /// silent, and the agent returns to the first once it answers. [collector] url (a URL
    /// or a list)
    #[arg(long, value_name = "URL")]
    collector: Vec<String>,
    /// Also stream every event to the collector, not only alerts. [collector] send_events
    #[arg(long)]
    send_events: bool,
    /// Where unacknowledged records wait for the collector, kept across restarts
    /// (/var/lib/sensor-agent/spool). [collector] spool
    #[arg(long, value_name = "DIR")]
    spool: Option<PathBuf>,
    /// Bound on the spool (256 MiB); past it, the oldest events are shed first, then
    /// alerts, and the collector is told exactly which. [collector] spool_max_mib
    #[arg(long, value_name = "MIB")]
    spool_max_mib: Option<u64>,
    /// This agent's certificate (PEM) for mutual TLS with the collector. [collector] tls_cert
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert. [collector] tls_key
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed the collector's certificate. [collector] tls_ca
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Seconds between heartbeats to the collector (5). [collector] heartbeat_seconds
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat: Option<u64>,
    /// Longest wait between reconnection attempts, exponential backoff with jitter up to
    /// this (30 s). [collector] retry_max_seconds
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    collector_retry_max: Option<u64>,
    /// Serve Prometheus/OpenMetrics text at http://ADDR/metrics. [metrics] listen
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

fn parse_ring_mib(value: &str) -> Result<u32, String> {
    let mib: u32 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of MiB"))?;
    if !(1..=1024).contains(&mib) || !mib.is_power_of_two() {
        return Err(format!(
            "{mib} MiB: the ring buffer must be a power of two between 1 and 1024 MiB"
        ));
    }
    Ok(mib)
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_env("SENSOR_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_command(*args),
        Command::Rules(RulesCommand::Check { dirs, sigma }) => rules_check(&dirs, &sigma),
        Command::Replay(args) => replay_command(args),
        Command::Learn(args) => learn_command(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_command(args: RunArgs) -> anyhow::Result<()> {
    let (config, config_path) = config::load(args.config.as_deref())?;
    let c = &config;
    use sensor_agent::config::{MIB, SECOND_NS as S};
    let skip = if args.skip_probes.is_empty() {
        c.agent.skip_probes.clone()
    } else {
        args.skip_probes
    };
    let load = LoadOptions {
        ring_bytes: args.ring_mib.unwrap_or(c.agent.ring_mib) * MIB as u32,
        skip,
        syscall_hooks: args.syscall_hooks.unwrap_or(c.agent.syscall_hooks),
        enforce: args.enforce.unwrap_or(c.agent.enforce),
        ..LoadOptions::default()
    };
    let cli_sources = config::RuleSources {
        rules: args.rules,
        sigma: args.sigma,
        watch: args.watch,
    };
    let sources = config::RuleSources::resolve(c, &cli_sources);
    let record = args
        .record
        .or(c.record.path.clone())
        .map(|path| RecordOptions {
            path,
            max_file_bytes: args.record_max_mib.unwrap_or(c.record.max_mib).max(1) * MIB,
            max_file_age_ns: args
                .record_max_age
                .unwrap_or(c.record.max_age_seconds)
                .max(1)
                * S,
            max_total_bytes: args
                .record_max_total_mib
                .unwrap_or(c.record.max_total_mib)
                .max(1)
                * MIB,
        });
    let flight = args
        .flight_dir
        .or(c.flight.dir.clone())
        .map(|dir| FlightOptions {
            dir,
            before_ns: args.flight_before.unwrap_or(c.flight.before_seconds) * S,
            after_ns: args.flight_after.unwrap_or(c.flight.after_seconds) * S,
            max_bytes: args.flight_max_mib.unwrap_or(c.flight.max_mib).max(1) * MIB as usize,
        });
    let urls = if args.collector.is_empty() {
        c.collector.url.clone()
    } else {
        args.collector.clone()
    };
    let delivery = (!urls.is_empty()).then(|| {
        let spool = args.spool.clone().unwrap_or(c.collector.spool.clone());
        let mut d = delivery::DeliveryOptions::new(urls, spool);
        d.tls = delivery::TlsFiles {
            cert: args.tls_cert.clone().or(c.collector.tls_cert.clone()),
            key: args.tls_key.clone().or(c.collector.tls_key.clone()),
            ca: args.tls_ca.clone().or(c.collector.tls_ca.clone()),
        };
        d.spool.max_bytes = args
            .spool_max_mib
            .unwrap_or(c.collector.spool_max_mib)
            .max(1)
            * MIB;
        d.send_events = args.send_events || c.collector.send_events;
        d.heartbeat =
            std::time::Duration::from_secs(args.heartbeat.unwrap_or(c.collector.heartbeat_seconds));
        d.backoff_max = std::time::Duration::from_secs(
            args.collector_retry_max
                .unwrap_or(c.collector.retry_max_seconds),
        );
        d
    });
    if args.send_events && delivery.is_none() {
        anyhow::bail!("--send-events needs a collector (--collector or [collector] url)");
    }
    let agent_id = args
        .agent_id
        .or_else(|| (!c.agent.agent_id.is_empty()).then(|| c.agent.agent_id.clone()));
    runtime()?.block_on(run::run(run::RunOptions {
        print_events: args.events || c.agent.events,
        load,
        sources,
        identity: identity::detect(agent_id),
        record,
        flight,
        delivery,
        collapse_window_ns: Some(
            args.collapse
                .unwrap_or(c.agent.collapse_seconds)
                .saturating_mul(S),
        ),
        metrics: args.metrics.or(c.metrics.listen),
        config_path,
        cli_sources,
        cli_enforce: args.enforce,
        duration: None,
    }))
}

fn learn_command(args: LearnArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let (traces, host, span, _tmp) = match (args.duration, args.traces.is_empty()) {
        (Some(_), false) => {
            anyhow::bail!("learn: --duration watches the live host; give it or traces, not both")
        }
        (None, true) => {
            anyhow::bail!("learn: give --duration (watch the live host) or recorded traces")
        }
        (None, false) => (
            args.traces.clone(),
            "the recorded host".to_owned(),
            format!("{} trace files", args.traces.len()),
            None,
        ),
        (Some(duration), true) => {
            let (dir, tmp) = match &args.record {
                Some(dir) => {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    (dir.clone(), None)
                }
                None => {
                    let tmp = tempfile::Builder::new()
                        .prefix("sensor-learn-")
                        .tempdir_in("/var/tmp")
                        .context(
                            "cannot create a directory for the learning recording in /var/tmp",
                        )?;
                    (tmp.path().to_path_buf(), Some(tmp))
                }
            };
            let identity = identity::detect(None);
            let host = identity.host.clone();
            let started = std::time::SystemTime::now();
            use sensor_agent::config::MIB;
            runtime()?.block_on(run::run(run::RunOptions {
                print_events: false,
                load: LoadOptions::default(),
                sources: config::RuleSources {
                    rules: args.rules.clone(),
                    sigma: Vec::new(),
                    watch: Vec::new(),
                },
                identity,
                record: Some(RecordOptions {
                    path: dir.join(""),
                    max_file_bytes: 256 * MIB,
                    max_file_age_ns: u64::MAX,
                    max_total_bytes: u64::MAX,
                }),
                collapse_window_ns: Some(0),
                duration: Some(duration),
                ..run::RunOptions::default()
            }))?;
            let traces = sensor_agent::trace::recorder::recorded_files(&dir)
                .with_context(|| format!("cannot read {}", dir.display()))?;
            let span = format!(
                "{} s of the live host from {}",
                duration.as_secs(),
                sensor_agent::learn::rfc3339(&pbjson_types::Timestamp {
                    seconds: started
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64),
                    nanos: 0,
                })
            );
            (traces, host, span, tmp)
        }
    };
    let (rules, sigma) = detect::load(&config::RuleSources {
        rules: args.rules.clone(),
        ..Default::default()
    })?;
    let policy = rules.enforce.clone();
    let mut printed = Vec::new();
    let summary = replay::replay(
        &replay::ReplayOptions {
            traces,
            print_events: false,
            collapse_window_ns: Some(0),
        },
        rules,
        sigma,
        &mut printed,
    );
    if summary.failed > 0 {
        anyhow::bail!("learn: {} trace files could not be read", summary.failed);
    }
    let mut learner = sensor_agent::learn::Learner::default();
    learner
        .json_lines(&String::from_utf8_lossy(&printed))
        .map_err(anyhow::Error::msg)?;
    sensor_agent::learn::write(&args.out, &learner.rule_file(&host, &span, &policy))
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    tracing::info!(
        events = summary.events,
        alerts = summary.alerts,
        learned = learner.learned(),
        left_alerting = learner.not_learned.values().sum::<u64>(),
        out = %args.out.display(),
        "baseline learned; review it, then load it with --rules"
    );
    Ok(())
}

fn replay_command(args: ReplayArgs) -> anyhow::Result<()> {
    let (rules, sigma) = detect::load(&config::RuleSources {
        rules: args.rules.clone(),
        sigma: args.sigma.clone(),
        watch: Vec::new(),
    })?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let summary = replay::replay(
        &replay::ReplayOptions {
            traces: args.traces,
            print_events: args.events,
            collapse_window_ns: args
                .collapse
                .map(|s| s.saturating_mul(sensor_agent::config::SECOND_NS)),
        },
        rules,
        sigma,
        &mut out,
    );
    std::io::Write::flush(&mut out)?;
    tracing::info!(
        files = summary.files,
        events = summary.events,
        alerts = summary.alerts,
        truncated = summary.truncated,
        failed = summary.failed,
        "replay done"
    );
    if summary.failed > 0 {
        anyhow::bail!(
            "{} trace file(s) could not be read completely",
            summary.failed
        );
    }
    Ok(())
}

/// `rules check`: every error on stdout as file:line:column, non-zero exit on any.
fn rules_check(dirs: &[PathBuf], sigma: &[PathBuf]) -> anyhow::Result<()> {
    let mut failed = false;
    match detect::rules::load(dirs, true) {
        Ok(set) => {
            println!(
                "rules: {} rules, {} identities, {} allow entries from {} files: ok",
                set.rules.len(),
                set.identities.len(),
                set.allows.len(),
                set.files.len()
            );
            // Where the file rules look is what the probes watch: say what they cannot see.
            let places = detect::places::derive(&set);
            println!(
                "watched: {} prefixes and {} names anywhere, from the file rules",
                places.prefixes.len(),
                places.suffixes.len()
            );
            for warning in &places.warnings {
                println!("warning: {warning}");
            }
            // What `--enforce audit|on` puts in the kernel, as resolved on this host.
            if set.enforce.is_empty() {
                println!("enforcement: no policy");
            } else {
                println!(
                    "enforcement: {} identities (applied with --enforce audit|on):",
                    set.enforce.entries.len()
                );
                print!("{}", set.enforce.describe());
                for entry in &set.enforce.entries {
                    for path in entry.allow.iter().flatten() {
                        if sensor_agent::probes::enforce::file_key(std::path::Path::new(path), 0)
                            .is_none()
                        {
                            println!(
                                "warning: {}: allowed executable {path} does not exist here",
                                entry.identity
                            );
                        }
                    }
                }
            }
        }
        Err(errors) => {
            failed = true;
            println!("{errors}");
        }
    }
    if !sigma.is_empty() {
        let set = detect::sigma::SigmaSet::load(sigma)?;
        for report in &set.reports {
            use detect::sigma::Outcome;
            match &report.outcome {
                Outcome::Loaded { id, category } => {
                    println!("{}: loaded {id} ({category})", report.file)
                }
                Outcome::Unsupported { category, reason } => {
                    println!("{}: unsupported ({category}): {reason}", report.file)
                }
                Outcome::Invalid { reason } => {
                    failed = true;
                    println!("{}: invalid: {reason}", report.file)
                }
                Outcome::NotApplicable { reason } => println!("{}: skipped: {reason}", report.file),
            }
        }
        let (loaded, unsupported, invalid) = set.counts();
        println!("sigma: {loaded} loaded, {unsupported} unsupported, {invalid} invalid");
    }
    if failed {
        anyhow::bail!("rule check failed");
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
