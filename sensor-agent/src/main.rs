//! `sensor-agent`: the command line. Logic lives in the library; see `lib.rs`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

use sensor_agent::{
    delivery, detect, identity,
    probes::{LoadOptions, watch},
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

#[derive(clap::Args)]
struct RunArgs {
    /// Also print every event as a JSON line (`{"event": {...}}`).
    #[arg(long)]
    events: bool,
    /// Size of the kernel-to-agent ring buffer in MiB (a power of two).
    #[arg(long, default_value_t = 16, value_parser = parse_ring_mib)]
    ring_mib: u32,
    /// Rule directory (repeatable), loaded after the embedded EPMM pack.
    #[arg(long = "rules", value_name = "DIR")]
    rules: Vec<PathBuf>,
    /// SigmaHQ rule directory (repeatable): Linux process_creation, network_connection
    /// and file_event rules.
    #[arg(long = "sigma", value_name = "DIR")]
    sigma: Vec<PathBuf>,
    /// Record every event into trace files: a directory (files rotated by size and age,
    /// oldest deleted past the total bound) or one file.
    #[arg(long = "record", value_name = "FILE_OR_DIR")]
    record: Option<PathBuf>,
    /// Rotate a trace file past this size (MiB).
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    record_max_mib: u64,
    /// Rotate a trace file past this age (seconds).
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    record_max_age: u64,
    /// Delete the oldest trace files past this total (MiB).
    #[arg(long, default_value_t = 1024, value_name = "MIB")]
    record_max_total_mib: u64,
    /// Flight recorder: write the seconds before and after each alert to this directory
    /// (the alert names the file).
    #[arg(long = "flight-dir", value_name = "DIR")]
    flight_dir: Option<PathBuf>,
    /// Seconds of events kept before an alert.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    flight_before: u64,
    /// Seconds of events written after an alert.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    flight_after: u64,
    /// Bound on the memory of the flight recorder's ring (MiB).
    #[arg(long, default_value_t = 32, value_name = "MIB")]
    flight_max_mib: usize,
    /// Agent id stamped on alerts (default: derived from /etc/machine-id).
    #[arg(long = "agent-id")]
    agent_id: Option<String>,
    /// Also report file activity under this absolute path prefix (repeatable), besides
    /// the default watch list.
    #[arg(long = "watch", value_name = "PATH")]
    watch: Vec<String>,
    /// Do not attach this optional probe (repeatable); to measure what each costs.
    #[arg(long = "skip-probe", value_name = "PROBE")]
    skip_probes: Vec<String>,
    /// Repeats of a rule on one process tree within this many seconds collapse into one
    /// alert with a count (0: every match is its own alert).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    collapse: u64,
    /// Stream alerts to this collector: `https://HOST:PORT` (mutual TLS, with --tls-cert,
    /// --tls-key and --tls-ca) or `http://127.0.0.1:PORT` (plaintext, loopback only).
    #[arg(long, value_name = "URL")]
    collector: Option<String>,
    /// Also stream every event to the collector, not only alerts.
    #[arg(long, requires = "collector")]
    send_events: bool,
    /// Where unacknowledged records wait for the collector (kept across restarts).
    #[arg(
        long,
        default_value = "/var/lib/sensor-agent/spool",
        value_name = "DIR"
    )]
    spool: PathBuf,
    /// Bound on the spool (MiB); past it, the oldest events are shed first, then alerts,
    /// and the collector is told exactly which.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    spool_max_mib: u64,
    /// This agent's certificate (PEM) for mutual TLS with the collector.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed the collector's certificate.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Seconds between heartbeats to the collector.
    #[arg(long, default_value_t = 5, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat: u64,
    /// Longest wait between reconnection attempts (seconds; exponential backoff with
    /// jitter up to this).
    #[arg(long, default_value_t = 30, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    collector_retry_max: u64,
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
    let mut load = LoadOptions {
        ring_bytes: args.ring_mib * 1024 * 1024,
        skip: args.skip_probes,
        ..LoadOptions::default()
    };
    for prefix in &args.watch {
        load.watch.push(watch::rule_for(prefix)?);
    }
    const S: u64 = 1_000_000_000;
    const MIB: u64 = 1024 * 1024;
    let record = args.record.map(|path| RecordOptions {
        path,
        max_file_bytes: args.record_max_mib.max(1) * MIB,
        max_file_age_ns: args.record_max_age.max(1) * S,
        max_total_bytes: args.record_max_total_mib.max(1) * MIB,
    });
    let flight = args.flight_dir.map(|dir| FlightOptions {
        dir,
        before_ns: args.flight_before * S,
        after_ns: args.flight_after * S,
        max_bytes: args.flight_max_mib.max(1) * 1024 * 1024,
    });
    let delivery = args.collector.map(|url| {
        let mut d = delivery::DeliveryOptions::new(url, args.spool);
        d.tls = delivery::TlsFiles {
            cert: args.tls_cert,
            key: args.tls_key,
            ca: args.tls_ca,
        };
        d.spool.max_bytes = args.spool_max_mib.max(1) * MIB;
        d.send_events = args.send_events;
        d.heartbeat = std::time::Duration::from_secs(args.heartbeat);
        d.backoff_max = std::time::Duration::from_secs(args.collector_retry_max);
        d
    });
    runtime()?.block_on(run::run(run::RunOptions {
        print_events: args.events,
        load,
        rules: args.rules,
        sigma: args.sigma,
        identity: identity::detect(args.agent_id),
        record,
        flight,
        delivery,
        collapse_window_ns: Some(args.collapse.saturating_mul(S)),
    }))
}

fn replay_command(args: ReplayArgs) -> anyhow::Result<()> {
    let (rules, sigma) = run::load_detection(&args.rules, &args.sigma)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let summary = replay::replay(
        &replay::ReplayOptions {
            traces: args.traces,
            print_events: args.events,
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
        Ok(set) => println!(
            "rules: {} rules, {} identities, {} allow entries from {} files: ok",
            set.rules.len(),
            set.identities.len(),
            set.allows.len(),
            set.files.len()
        ),
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
