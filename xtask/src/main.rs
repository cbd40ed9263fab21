//! Build orchestration. `cargo xtask run` and `cargo xtask test` are the README's two
//! commands: each installs what is missing on a fresh machine, builds, and runs.

mod bench;
mod detect_bench;
mod kmatrix;
mod package;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "Build, run, test and benchmark the EPMM sensor"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the prerequisites (llvm-22-dev, bpf-linker 0.13, rust-src for nightly).
    Setup,
    /// Build and run the agent with its embedded defaults (as root). Arguments after `--`
    /// go to `sensor-agent run`.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the whole test suite: formatting, clippy, unit and end-to-end tests, the kernel
    /// matrix and a bounded fuzzing run (as root).
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy` (for quick iterations).
        #[arg(long)]
        no_lint: bool,
        /// Skip the bounded fuzzing of the trace reader.
        #[arg(long)]
        no_fuzz: bool,
        /// Skip the kernel matrix (`cargo xtask kmatrix`).
        #[arg(long)]
        no_kmatrix: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmarks against the no-sensor baseline; results go to stdout.
    Bench(bench::BenchArgs),
    /// Build the RPM and DEB packages (binaries, systemd unit, configuration, rules).
    Package(package::PackageArgs),
    /// Boot the release agent on the Debian kernel matrix (5.10, 6.1, 6.12, 7.x) under
    /// qemu and check every probe loads and every event kind arrives (as root).
    Kmatrix(kmatrix::KmatrixArgs),
    /// Fuzz the trace reader for a bounded time (cargo-fuzz, nightly).
    Fuzz {
        /// Seconds of fuzzing.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::ensure_all(),
        Cmd::Run { args } => {
            setup::ensure_all()?;
            cargo(&["build", "--release", "--package", "sensor-agent"])?;
            let bin = workspace().join("target/release/sensor-agent");
            let mut cmd = as_root(&bin);
            cmd.arg("run").args(&args);
            let status = cmd.status().context("cannot start the agent")?;
            if !status.success() {
                bail!("sensor-agent exited with {status}");
            }
            Ok(())
        }
        Cmd::Test {
            no_lint,
            no_fuzz,
            no_kmatrix,
            args,
        } => test(no_lint, no_fuzz, no_kmatrix, &args),
        Cmd::Fuzz { seconds } => {
            setup::ensure_all()?;
            fuzz(seconds)
        }
        Cmd::Package(args) => {
            setup::ensure_all()?;
            package::run(&args)
        }
        Cmd::Kmatrix(args) => {
            setup::ensure_all()?;
            kmatrix::run(&args)
        }
        Cmd::Bench(args) => {
            setup::ensure_all()?;
            bench::run(args)
        }
    }
}

fn test(no_lint: bool, no_fuzz: bool, no_kmatrix: bool, args: &[String]) -> Result<()> {
    setup::ensure_all()?;
    if !no_lint {
        step("cargo fmt --check");
        cargo(&["fmt", "--all", "--check"])?;
        step("cargo clippy --all-targets -- -D warnings");
        cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    }
    step("build the agent with its embedded probes, and the collector");
    cargo(&[
        "build",
        "--package",
        "sensor-agent",
        "--package",
        "sensor-collector",
    ])?;
    if !is_root() {
        bail!(
            "the end-to-end tests load the real probes and must run as root; rerun with sudo (CI runs as root)"
        );
    }
    setup::ensure_test_tools()?;
    package::run(&package::PackageArgs {
        out: PathBuf::from("target/packages/test"),
        debug: true,
    })?;
    step("cargo test --workspace");
    let bin = workspace().join("target/debug/sensor-agent");
    let mut cmd = Command::new(cargo_bin());
    cmd.current_dir(workspace())
        .args(["test", "--workspace"])
        .env("SENSOR_AGENT_BIN", &bin)
        .env(
            "SENSOR_COLLECTOR_BIN",
            workspace().join("target/debug/sensor-collector"),
        )
        .env(
            "SENSOR_PACKAGE_DIR",
            workspace().join("target/packages/test"),
        )
        .args(args);
    run(&mut cmd)?;
    sigma_differential(1_000_000)?;
    if !no_kmatrix {
        kmatrix::run(&kmatrix::KmatrixArgs::default())?;
    }
    if !no_fuzz {
        fuzz(60)?;
    }
    Ok(())
}

/// The Sigma differential test (our compiled Sigma against sigma-rust) over `events`
/// generated events, in a release build: the debug run of `cargo test` does 20,000.
fn sigma_differential(events: u64) -> Result<()> {
    step(&format!(
        "Sigma differential test: {events} generated events against sigma-rust (release)"
    ));
    let mut cmd = Command::new(cargo_bin());
    cmd.current_dir(workspace())
        .args([
            "test",
            "--release",
            "--package",
            "sensor-agent",
            "--lib",
            "detect::sigma::tests::generated_events_agree_with_the_reference",
            "--",
            "--exact",
            "--nocapture",
        ])
        .env("SENSOR_SIGMA_DIFFERENTIAL_EVENTS", events.to_string());
    run(&mut cmd)
}

/// Fuzzes the trace reader for `seconds`, seeded with the fixture traces.
fn fuzz(seconds: u64) -> Result<()> {
    setup::ensure_cargo_fuzz()?;
    let corpus = workspace().join("fuzz/corpus/trace_reader");
    std::fs::create_dir_all(&corpus)?;
    for entry in std::fs::read_dir(workspace().join("rules/fixtures"))? {
        let path = entry?.path();
        if path.to_string_lossy().ends_with(".trace.zst") {
            std::fs::copy(&path, corpus.join(path.file_name().unwrap_or_default()))?;
        }
    }
    step(&format!("cargo fuzz run trace_reader ({seconds} s)"));
    run(Command::new("cargo")
        .current_dir(workspace().join("fuzz"))
        .args(["+nightly", "fuzz", "run", "trace_reader", "--"])
        .arg(format!("-max_total_time={seconds}")))
}

/// Runs `cargo` with `args` in the workspace.
pub fn cargo(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(cargo_bin());
    cmd.current_dir(workspace()).args(args);
    run(&mut cmd)
}

pub fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

/// Runs a command, failing with its command line when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// A command for `program`, through sudo when we are not root.
pub fn as_root(program: &Path) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg(program);
        cmd
    }
}

pub fn is_root() -> bool {
    // SAFETY: plain syscall without arguments.
    unsafe { libc::geteuid() == 0 }
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn step(what: &str) {
    eprintln!("\n==> {what}");
}
