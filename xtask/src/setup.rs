//! Installs what building the probes needs, each step skipped when already satisfied:
//! the nightly toolchain's `rust-src`, LLVM 22 (`llvm-22-dev` from apt) and `bpf-linker`
//! 0.13 built against it. A step that cannot proceed says why and what to do.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::{is_root, run, step};

/// The toolchain the eBPF crate is built with (aya-build runs `rustup run nightly`).
const NIGHTLY: &str = "nightly";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13";

pub fn ensure_all() -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is not installed; the eBPF build needs rustup and a nightly toolchain")?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        step("install the nightly toolchain (for the eBPF probes)");
        run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
            .context("no nightly toolchain and `rustup toolchain install nightly` failed")?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        NIGHTLY,
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    step("rustup component add rust-src --toolchain nightly");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
        .context("cannot add rust-src to the nightly toolchain (the eBPF build needs it for -Z build-std=core)")
}

fn bpf_linker_version() -> Option<String> {
    output(Command::new("bpf-linker").arg("--version"))
}

fn ensure_bpf_linker() -> Result<()> {
    if let Some(version) = bpf_linker_version()
        && version.contains(&format!("bpf-linker {BPF_LINKER_VERSION}."))
    {
        return Ok(());
    }
    ensure_llvm()?;
    step("cargo install bpf-linker 0.13 (built against LLVM 22)");
    run(Command::new(crate::cargo_bin())
        .args([
            "install",
            "bpf-linker",
            "--version",
            &format!("^{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
            "--force",
        ])
        // bpf-linker's build script looks for LLVM under this prefix.
        .env("LLVM_PREFIX", LLVM_PREFIX))
    .context("building bpf-linker failed")?;
    match bpf_linker_version() {
        Some(v) if v.contains(&format!("bpf-linker {BPF_LINKER_VERSION}.")) => Ok(()),
        Some(v) => bail!(
            "bpf-linker on PATH is {} after installing {BPF_LINKER_VERSION}: put ~/.cargo/bin first on PATH",
            v.trim()
        ),
        None => bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH"),
    }
}

fn ensure_llvm() -> Result<()> {
    ensure_apt(
        "llvm-22-dev",
        &Path::new(LLVM_PREFIX).join("lib/libLLVM.so"),
    )
}

/// The tools the packaging tests read the unit and the packages with, the web server the
/// prevention test attacks, the syslog receiver the forwarding test feeds and the
/// database server of the fleet tests.
pub fn ensure_test_tools() -> Result<()> {
    ensure_apt("systemd", Path::new("/usr/bin/systemd-analyze"))?;
    ensure_apt("dpkg", Path::new("/usr/bin/dpkg-deb"))?;
    // The prevention test runs a real httpd with a RewriteMap helper (on loopback, in a
    // scratch directory, with its own configuration).
    ensure_apt("apache2", Path::new("/usr/sbin/apache2"))?;
    // The syslog forwarding test sends alerts to a real rsyslog, also on loopback.
    ensure_apt("rsyslog", Path::new("/usr/sbin/rsyslogd"))?;
    // The fleet tests run PostgreSQL servers of their own (initdb in a scratch directory,
    // loopback only); any Debian server of version 15 or later.
    ensure_apt(
        "postgresql",
        Path::new("/usr/share/postgresql-common/pg_wrapper"),
    )
}

/// Installs an apt `package` unless `probe` (a file it provides) exists.
pub fn ensure_apt(package: &str, probe: &Path) -> Result<()> {
    if probe.exists() {
        return Ok(());
    }
    let missing = probe.display();
    if !is_root() {
        bail!("{missing} is missing; install it with `sudo apt-get install {package}`, then rerun");
    }
    if output(Command::new("apt-get").arg("--version")).is_none() {
        bail!("{missing} is missing and apt-get is not available to install {package}");
    }
    step(&format!("apt-get install {package}"));
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    if install().is_err() {
        // A fresh machine may have stale package lists.
        run(Command::new("apt-get").arg("update")).context("apt-get update failed")?;
        install().with_context(|| format!("apt-get install {package} failed"))?;
    }
    if !probe.exists() {
        bail!("{package} is installed but {missing} is missing");
    }
    Ok(())
}

/// cargo-fuzz, for `cargo xtask fuzz` (and the test suite's bounded fuzzing).
pub fn ensure_cargo_fuzz() -> Result<()> {
    if output(Command::new(crate::cargo_bin()).args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    step("cargo install cargo-fuzz");
    run(Command::new(crate::cargo_bin()).args(["install", "cargo-fuzz", "--locked"]))
        .context("cannot install cargo-fuzz")
}
