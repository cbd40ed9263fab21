//! `sensor-agent`: the command line. Logic lives in the library; see `lib.rs`.

use clap::{Parser, Subcommand};
use sensor_agent::{
    probes::{LoadOptions, watch},
    run,
};
use tracing_subscriber::EnvFilter;

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
}

#[derive(clap::Args)]
struct RunArgs {
    /// Also print every event as a JSON line (`{"event": {...}}`).
    #[arg(long)]
    events: bool,
    /// Size of the kernel-to-agent ring buffer in MiB (a power of two).
    #[arg(long, default_value_t = 16, value_parser = parse_ring_mib)]
    ring_mib: u32,
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
    }))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
