//! `sensor-agent`: the command line. Logic lives in the library; see `lib.rs`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

use sensor_agent::{
    detect, identity,
    probes::{LoadOptions, watch},
    run,
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
    Run(RunArgs),
    /// Work with rule files.
    #[command(subcommand)]
    Rules(RulesCommand),
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
        Command::Run(args) => run_command(args),
        Command::Rules(RulesCommand::Check { dirs, sigma }) => rules_check(&dirs, &sigma),
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
    runtime()?.block_on(run::run(run::RunOptions {
        print_events: args.events,
        load,
        rules: args.rules,
        sigma: args.sigma,
        identity: identity::detect(args.agent_id),
    }))
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
