//! `cargo xtask kmatrix`: the release agent on real Debian kernels under qemu.
//!
//! Each kernel boots with an initramfs whose PID 1 is `kmx-guest` (tests/src/bin): it runs
//! the agent once with fexit where the kernel offers it and once on the `sys_exit`
//! dispatcher, re-enacts every event kind the agent claims and two attacks, and reports
//! over the second serial port. Kernel packages come from the Debian mirror with a private
//! apt state under the cache directory (nothing is installed into the host's /boot) and
//! stay cached between runs. The guest has no network device.
//!
//! On our build machines /dev/kvm is PVM nested virtualisation, which hangs stock kernels,
//! so qemu uses TCG there and KVM where it works.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{cargo, step, workspace};

/// The Debian suites of the matrix: the three LTS kernels and the newest.
const SUITES: &[(&str, &str)] = &[
    ("bullseye-security", "5.10"),
    ("bookworm-security", "6.1"),
    ("trixie-security", "6.12"),
    ("trixie-backports", "7.x"),
    ("forky", "7.x"),
];

#[derive(clap::Args, Default)]
pub struct KmatrixArgs {
    /// Debian suites whose linux-image-amd64 to boot (default: all of the matrix).
    suites: Vec<String>,
    /// Cache of the private apt state, packages and unpacked kernels
    /// (default /var/cache/sensor-kmatrix).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Use only kernels already in the cache (no apt).
    #[arg(long)]
    offline: bool,
    /// Seconds a guest may run (default 900).
    #[arg(long)]
    timeout: Option<u64>,
    /// Write the table of this run to this Markdown file too (e.g. docs/kernels.md).
    #[arg(long)]
    write_table: Option<PathBuf>,
}

pub fn run(args: &KmatrixArgs) -> Result<()> {
    if !crate::is_root() {
        bail!("the kernel matrix uses apt-get and qemu as root; rerun with sudo (CI runs as root)");
    }
    ensure_host_tools()?;
    step("build the release agent and the guest driver");
    cargo(&["build", "--release", "--package", "sensor-agent"])?;
    cargo(&["build", "--package", "sensor-e2e", "--bin", "kmx-guest"])?;
    let out = workspace().join("target/kmatrix");
    fs::create_dir_all(&out)?;
    let initramfs = out.join("initramfs.cpio");
    build_initramfs(&initramfs)?;

    let suites: Vec<String> = if args.suites.is_empty() {
        SUITES.iter().map(|(s, _)| (*s).to_owned()).collect()
    } else {
        args.suites.clone()
    };
    let cache = args
        .cache
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/cache/sensor-kmatrix"));
    let timeout = args.timeout.unwrap_or(900);
    let apt = Apt::new(&cache)?;
    if !args.offline {
        apt.update()?;
    }
    let accel = Accel::detect();
    step(&format!("boot {} kernels ({})", suites.len(), accel.name()));
    let mut rows = Vec::new();
    for suite in &suites {
        let kernel = match apt.kernel(suite, args.offline) {
            Ok(k) => k,
            Err(e) => {
                rows.push(Row::failed(suite, format!("no kernel: {e:#}")));
                continue;
            }
        };
        let dir = out.join(&kernel.version);
        fs::create_dir_all(&dir)?;
        let mut row = boot(&kernel, suite, &initramfs, &dir, accel, timeout)
            .unwrap_or_else(|e| Row::failed(suite, format!("{e:#}")));
        if row.guest_never_started {
            // The kernel itself failed before our PID 1 ran: under emulated SMP a boot
            // can die patching its own text (an int3 oops in the clock code, seen once in
            // forky's 7.2 under TCG). Nothing of ours was running; boot it once more and
            // say so. A failure once the guest driver started is never retried.
            let first = dir.join("console-first-boot.log");
            let _ = fs::rename(dir.join("console.log"), &first);
            eprintln!(
                "{}: the kernel failed before the guest driver started ({}); booting it once more",
                row.label,
                first.display()
            );
            row = boot(&kernel, suite, &initramfs, &dir, accel, timeout)
                .unwrap_or_else(|e| Row::failed(suite, format!("{e:#}")));
            row.second_boot = true;
        }
        eprintln!("{}", row.line());
        rows.push(row);
    }
    let table = render(&rows, accel);
    println!("\n{table}");
    fs::write(out.join("matrix.md"), &table)?;
    if let Some(path) = &args.write_table {
        fs::write(path, &table).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.label.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "kernel matrix failed on {} (logs under {})",
            failed.join(", "),
            out.display()
        );
    }
    Ok(())
}

fn ensure_host_tools() -> Result<()> {
    use crate::setup::ensure_apt;
    ensure_apt("qemu-system-x86", Path::new("/usr/bin/qemu-system-x86_64"))?;
    ensure_apt("cpio", Path::new("/usr/bin/cpio"))?;
    ensure_apt("dpkg", Path::new("/usr/bin/dpkg-deb"))?;
    ensure_apt(
        "debian-archive-keyring",
        Path::new("/usr/share/keyrings/debian-archive-keyring.gpg"),
    )
}

/// qemu's accelerator: KVM when /dev/kvm is usable, TCG otherwise and under PVM.
#[derive(Clone, Copy)]
enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn detect() -> Self {
        if let Ok(forced) = std::env::var("KMX_ACCEL") {
            return if forced == "kvm" {
                Accel::Kvm
            } else {
                Accel::Tcg
            };
        }
        if Path::new("/sys/module/kvm_pvm").exists() || !Path::new("/dev/kvm").exists() {
            Accel::Tcg
        } else {
            Accel::Kvm
        }
    }

    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-machine", "q35,accel=kvm", "-cpu", "host"],
            Accel::Tcg => &[
                "-machine",
                "q35",
                "-accel",
                "tcg,thread=multi",
                "-cpu",
                "max",
            ],
        }
    }
}

/// The guest's root: the driver as /init, the agent, a shell and `true` with their
/// libraries, and the few files a system has.
fn build_initramfs(path: &Path) -> Result<()> {
    let root = path.with_extension("root");
    let _ = fs::remove_dir_all(&root);
    for dir in [
        "bin",
        "kmx",
        "etc/cron.d",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "var/lib/sensor-agent",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    let target = workspace().join("target");
    let copies = [
        (target.join("debug/kmx-guest"), "init"),
        (target.join("release/sensor-agent"), "kmx/sensor-agent"),
        (PathBuf::from("/usr/bin/dash"), "bin/sh"),
        (PathBuf::from("/usr/bin/true"), "bin/true"),
    ];
    for (from, to) in &copies {
        fs::copy(from, root.join(to)).with_context(|| format!("copy {}", from.display()))?;
        copy_libraries(from, &root)?;
    }
    fs::write(
        root.join("etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )?;
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;
    fs::write(root.join("etc/hostname"), "kmx\n")?;
    let list = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            root.display(),
            path.display()
        ))
        .status()?;
    if !list.success() {
        bail!("cpio failed building {}", path.display());
    }
    fs::remove_dir_all(&root)?;
    Ok(())
}

/// Copies the shared libraries `binary` needs (as ldd lists them) under `root`.
fn copy_libraries(binary: &Path, root: &Path) -> Result<()> {
    let out = Command::new("ldd").arg(binary).output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(lib) = line
            .split_whitespace()
            .find(|w| w.starts_with('/') && w.contains(".so"))
        else {
            continue;
        };
        let dest = root.join(lib.trim_start_matches('/'));
        if dest.exists() {
            continue;
        }
        fs::create_dir_all(dest.parent().expect("a library has a directory"))?;
        fs::copy(lib, &dest).with_context(|| format!("copy {lib}"))?;
    }
    Ok(())
}

/// A private apt configuration under the cache: the host's sources stay as they are.
struct Apt {
    dir: PathBuf,
    config: PathBuf,
    cache: PathBuf,
}

struct Kernel {
    version: String,
    vmlinuz: PathBuf,
}

impl Apt {
    fn new(cache: &Path) -> Result<Self> {
        let dir = cache.join("apt");
        for d in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(d))?;
        }
        fs::create_dir_all(cache.join("debs"))?;
        fs::create_dir_all(cache.join("kernels"))?;
        let status = dir.join("status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        let (main, security) = host_mirrors();
        let key = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";
        let mut sources = String::new();
        for s in [
            "bullseye",
            "bookworm",
            "trixie",
            "trixie-backports",
            "forky",
        ] {
            let _ = writeln!(sources, "deb {key} {main} {s} main");
        }
        for s in ["bullseye-security", "bookworm-security", "trixie-security"] {
            let _ = writeln!(sources, "deb {key} {security} {s} main");
        }
        fs::write(dir.join("sources.list"), sources)?;
        let config = dir.join("apt.conf");
        let d = dir.display();
        fs::write(
            &config,
            format!(
                "Dir::State::Lists \"{d}/lists\";\nDir::Etc::SourceList \"{d}/sources.list\";\n\
                 Dir::Etc::SourceParts \"/nonexistent\";\nDir::Cache \"{d}/cache\";\n\
                 Dir::State::status \"{d}/status\";\nAcquire::Languages \"none\";\n\
                 APT::Architectures {{ \"amd64\"; }};\nAPT::Sandbox::User \"root\";\n"
            ),
        )?;
        Ok(Self {
            dir,
            config,
            cache: cache.to_path_buf(),
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("apt-get");
        cmd.env("APT_CONFIG", &self.config).args(args);
        cmd
    }

    /// Refreshes the private package lists when they are older than a day.
    fn update(&self) -> Result<()> {
        let fresh = fs::read_dir(self.dir.join("lists"))?.flatten().any(|e| {
            e.file_name().to_string_lossy().contains("Packages")
                && e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(86_400))
        });
        if fresh {
            return Ok(());
        }
        step("apt-get update (private lists for the kernel matrix)");
        let out = self.command(&["update"]).output()?;
        if !out.status.success() {
            eprintln!(
                "apt-get update reported errors; going on with what was fetched:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Downloads `package` into the cache's debs directory; returns the file.
    fn download(&self, package: &str) -> Result<PathBuf> {
        let debs = self.cache.join("debs");
        let out = self
            .command(&["download", package])
            .current_dir(&debs)
            .output()?;
        if !out.status.success() {
            bail!(
                "apt-get download {package}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let name = package.split('/').next().unwrap_or(package);
        newest(&debs, &format!("{name}_"))
            .with_context(|| format!("apt-get download {package} left no {name}_*.deb"))
    }

    /// The kernel image of `suite`'s linux-image-amd64, downloaded and unpacked once.
    fn kernel(&self, suite: &str, offline: bool) -> Result<Kernel> {
        let kernels = self.cache.join("kernels");
        if offline {
            for entry in fs::read_dir(&kernels)?.flatten() {
                let source = fs::read_to_string(entry.path().join("source")).unwrap_or_default();
                if source.split_whitespace().next() == Some(suite) {
                    return Ok(Kernel {
                        version: entry.file_name().to_string_lossy().into_owned(),
                        vmlinuz: entry.path().join("vmlinuz"),
                    });
                }
            }
            bail!("{suite} is not in the cache {}", kernels.display());
        }
        let meta = self.download(&format!("linux-image-amd64/{suite}"))?;
        let depends = deb_field(&meta, "Depends")?;
        let _ = fs::remove_file(&meta);
        let image = depends
            .split([',', ' ', '|'])
            .find(|d| {
                d.starts_with("linux-image-")
                    && d.as_bytes().get(12).is_some_and(u8::is_ascii_digit)
            })
            .with_context(|| {
                format!("linux-image-amd64/{suite} depends on no versioned image: {depends}")
            })?
            .to_owned();
        let version = image.trim_start_matches("linux-image-").to_owned();
        let dir = kernels.join(&version);
        let vmlinuz = dir.join("vmlinuz");
        if !vmlinuz.is_file() {
            step(&format!("download {image} ({suite})"));
            let deb = self.download(&image)?;
            let unpacked = self.cache.join(format!("x-{version}"));
            let _ = fs::remove_dir_all(&unpacked);
            unpack(&deb, &unpacked)?;
            // Debian 7.x splits the image: vmlinuz in linux-binary-*, config in linux-base-*.
            if find_vmlinuz(&unpacked).is_none() {
                for dep in deb_field(&deb, "Depends")?.split([',', ' ']) {
                    if dep.starts_with("linux-binary-") || dep.starts_with("linux-base-") {
                        unpack(&self.download(dep)?, &unpacked)?;
                    }
                }
            }
            let found = find_vmlinuz(&unpacked)
                .with_context(|| format!("no vmlinuz in {image} or its parts"))?;
            fs::create_dir_all(&dir)?;
            fs::copy(found, &vmlinuz)?;
            fs::remove_dir_all(&unpacked)?;
        }
        fs::write(dir.join("source"), format!("{suite} {image}\n"))?;
        Ok(Kernel { version, vmlinuz })
    }
}

/// The main and security mirrors the host's apt already uses (Debian's own otherwise).
fn host_mirrors() -> (String, String) {
    let mut text = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.flatten() {
            text.push_str(&fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    let find = |suffix: &str| {
        text.split_whitespace()
            .find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with(suffix))
            .map(|w| w.trim_end_matches('/').to_owned())
    };
    (
        find("/debian").unwrap_or_else(|| "http://deb.debian.org/debian".into()),
        find("/debian-security").unwrap_or_else(|| "http://deb.debian.org/debian-security".into()),
    )
}

fn newest(dir: &Path, prefix: &str) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

fn deb_field(deb: &Path, field: &str) -> Result<String> {
    let out = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg(field)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn unpack(deb: &Path, into: &Path) -> Result<()> {
    fs::create_dir_all(into)?;
    crate::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into))
}

fn find_vmlinuz(root: &Path) -> Option<PathBuf> {
    let boot = fs::read_dir(root.join("boot")).ok().and_then(|d| {
        d.flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
            .map(|e| e.path())
    });
    boot.or_else(|| {
        let modules = root.join("usr/lib/modules");
        fs::read_dir(modules)
            .ok()?
            .flatten()
            .map(|e| e.path().join("vmlinuz"))
            .find(|p| p.is_file())
    })
}

/// What one kernel did.
struct Row {
    label: String,
    boot_secs: f64,
    report: Option<Value>,
    error: Option<String>,
    /// The guest's driver never wrote to its serial port: the kernel died first.
    guest_never_started: bool,
    /// This row is the second boot of its kernel (the first never reached the driver).
    second_boot: bool,
}

impl Row {
    fn failed(label: &str, error: String) -> Self {
        Row {
            label: label.to_owned(),
            boot_secs: 0.0,
            report: None,
            error: Some(error),
            guest_never_started: false,
            second_boot: false,
        }
    }

    fn runs(&self) -> Vec<&Value> {
        self.report
            .as_ref()
            .and_then(|r| r.get("runs"))
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    }

    /// Every run ready, no probe unavailable, every check passed.
    fn passed(&self) -> bool {
        let runs = self.runs();
        self.error.is_none()
            && runs.len() == 2
            && runs.iter().all(|run| {
                run.get("ready") == Some(&Value::Bool(true))
                    && unavailable(run).is_empty()
                    && failed_checks(run).is_empty()
                    && !run
                        .get("probes")
                        .and_then(Value::as_array)
                        .is_none_or(Vec::is_empty)
            })
    }

    fn line(&self) -> String {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let mut line = format!(
            "{verdict} {} (boot+runs {:.0} s{})",
            self.label,
            self.boot_secs,
            if self.second_boot {
                "; second boot, the first died before the guest driver started"
            } else {
                ""
            }
        );
        if let Some(e) = &self.error {
            let _ = write!(line, ": {e}");
        }
        for run in self.runs() {
            let hooks = run.get("hooks").and_then(Value::as_str).unwrap_or("?");
            let _ = write!(line, "\n  {hooks}: {}", run_summary(run));
        }
        line
    }
}

fn unavailable(run: &Value) -> Vec<String> {
    run.get("probes")
        .and_then(Value::as_array)
        .map(|probes| {
            probes
                .iter()
                .filter(|p| p.get("state").and_then(Value::as_str) == Some("unavailable"))
                .map(|p| format!("{} ({})", label(p, "probe"), label(p, "reason")))
                .collect()
        })
        .unwrap_or_default()
}

fn failed_checks(run: &Value) -> Vec<String> {
    run.get("checks")
        .and_then(Value::as_array)
        .map(|checks| {
            checks
                .iter()
                .filter(|c| c.get("ok") != Some(&Value::Bool(true)))
                .map(|c| format!("{}: {}", label(c, "name"), label(c, "detail")))
                .collect()
        })
        .unwrap_or_else(|| vec!["no checks ran".to_owned()])
}

fn label<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The order of the agent's concerns in the table.
const PROBE_ORDER: &[&str] = &[
    "process",
    "exec_failed",
    "net",
    "dup",
    "inject",
    "open_files",
    "path_files",
    "tamper",
    "signal_generate",
];

/// `open_files=fexit+bpf_loop`-style modes of every attached concern.
fn modes(run: &Value) -> String {
    run.get("probes")
        .and_then(Value::as_array)
        .map(|probes| {
            let mut probes: Vec<&Value> = probes.iter().collect();
            probes.sort_by_key(|p| PROBE_ORDER.iter().position(|n| *n == label(p, "probe")));
            probes
                .iter()
                .map(|p| {
                    let mut m = format!("{}={}", label(p, "probe"), label(p, "mode"));
                    if !label(p, "walk").is_empty() {
                        let _ = write!(m, "+{}", label(p, "walk"));
                    }
                    if label(p, "state") != "attached" {
                        let _ = write!(m, " ({})", label(p, "state").to_uppercase());
                    }
                    m
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .map(|m| match run.get("enforcement").filter(|e| !e.is_null()) {
            Some(e) if label(e, "mode") != "off" => {
                format!(
                    "{m}, enforce={}+{}",
                    label(e, "mode"),
                    label(e, "mechanism")
                )
            }
            _ => m,
        })
        .unwrap_or_default()
}

fn run_summary(run: &Value) -> String {
    if let Some(e) = run.get("error").and_then(Value::as_str) {
        return format!("ERROR {e}");
    }
    if run.get("ready") != Some(&Value::Bool(true)) {
        return format!("agent not ready (exit: {})", label(run, "agent_exit"));
    }
    let checks = run
        .get("checks")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let failed = failed_checks(run);
    let unavailable = unavailable(run);
    let mut s = format!(
        "ready in {:.1} s; {}/{} checks",
        run.get("ready_secs").and_then(Value::as_f64).unwrap_or(0.0),
        checks - failed.len(),
        checks
    );
    if !failed.is_empty() {
        let _ = write!(s, "; FAILED: {}", failed.join("; "));
    }
    if !unavailable.is_empty() {
        let _ = write!(s, "; UNAVAILABLE: {}", unavailable.join("; "));
    }
    let _ = write!(s, "; {}", modes(run));
    s
}

/// Boots `kernel` with the driver as init and reads its report from the second serial port.
fn boot(
    kernel: &Kernel,
    suite: &str,
    initramfs: &Path,
    dir: &Path,
    accel: Accel,
    timeout: u64,
) -> Result<Row> {
    let console = dir.join("console.log");
    let serial = dir.join("serial.log");
    let _ = fs::remove_file(&serial);
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(accel.args())
        .args([
            "-smp",
            "2",
            "-m",
            "2048",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 rdinit=/init panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("qemu.log"))?)
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let deadline = started + Duration::from_secs(timeout);
    let status = loop {
        if let Some(status) = qemu.try_wait()? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            let _ = qemu.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let label = format!("{} ({suite})", kernel.version);
    let mut row = Row {
        label,
        boot_secs: started.elapsed().as_secs_f64(),
        report: None,
        error: None,
        guest_never_started: false,
        second_boot: false,
    };
    let text = String::from_utf8_lossy(&fs::read(&serial).unwrap_or_default()).replace('\r', "");
    row.guest_never_started = !text.contains("KMX-BEGIN");
    save_files(&text, dir)?;
    match text
        .split("KMX-REPORT\n")
        .nth(1)
        .and_then(|r| r.lines().next())
    {
        Some(report) => {
            fs::write(dir.join("report.json"), report)?;
            row.report =
                Some(serde_json::from_str(report).context("the guest's report is not JSON")?);
        }
        None => {
            row.error = Some(match status {
                None => format!(
                    "no report within {timeout} s (console: {})",
                    console.display()
                ),
                Some(s) => format!(
                    "guest ended ({s}) without a report (console: {})",
                    console.display()
                ),
            });
        }
    }
    Ok(row)
}

/// Cuts the framed files (the agent's logs) out of the serial output.
fn save_files(text: &str, dir: &Path) -> Result<()> {
    let mut rest = text;
    while let Some(at) = rest.find("KMX-FILE ") {
        rest = &rest[at + "KMX-FILE ".len()..];
        let Some((head, body)) = rest.split_once('\n') else {
            break;
        };
        let name = head.split_whitespace().next().unwrap_or("file");
        let end = body.find("\nKMX-FILE-END").unwrap_or(body.len());
        fs::write(dir.join(name.replace('/', "_")), &body[..end])?;
        rest = &body[end..];
    }
    Ok(())
}

/// The Markdown table of a run: per kernel, the mode of every concern in each run, what
/// was unavailable and why, the event kinds seen and the rules fired.
fn render(rows: &[Row], accel: Accel) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Kernel matrix, `cargo xtask kmatrix` ({}, 2 vCPU, 2 GiB guests; times under TCG are not performance figures)\n",
        accel.name()
    );
    let _ = writeln!(
        t,
        "| kernel | hooks | agent | probes: mode (+ path walk) | unavailable | events and rules checked |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|");
    for row in rows {
        if row.runs().is_empty() {
            let _ = writeln!(
                t,
                "| {} | - | FAIL | - | - | {} |",
                row.label,
                row.error.as_deref().unwrap_or("")
            );
            continue;
        }
        for run in row.runs() {
            let hooks = label(run, "hooks");
            let agent = if run.get("ready") == Some(&Value::Bool(true)) {
                format!(
                    "ready {:.1} s",
                    run.get("ready_secs").and_then(Value::as_f64).unwrap_or(0.0)
                )
            } else {
                "NOT READY".to_owned()
            };
            let unavailable = unavailable(run);
            let checks = run
                .get("checks")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let mut seen = BTreeMap::new();
            for c in &checks {
                seen.insert(
                    label(c, "name").to_owned(),
                    c.get("ok") == Some(&Value::Bool(true)),
                );
            }
            let checked: Vec<String> = seen
                .iter()
                .map(|(name, ok)| {
                    if *ok {
                        name.clone()
                    } else {
                        format!("**{name} MISSING**")
                    }
                })
                .collect();
            let _ = writeln!(
                t,
                "| {}{} | {hooks} | {agent} | {} | {} | {} |",
                row.label,
                if row.second_boot {
                    " (second boot)"
                } else {
                    ""
                },
                modes(run),
                if unavailable.is_empty() {
                    "none".to_owned()
                } else {
                    unavailable.join("; ")
                },
                checked.join(", ")
            );
        }
    }
    t
}
