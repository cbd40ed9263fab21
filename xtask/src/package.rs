//! `cargo xtask package`: an RPM (EPMM appliances are RHEL-family) and a DEB of the agent.
//!
//! The RPM is written with the `rpm` crate (what cargo-generate-rpm is built on); the DEB
//! is an `ar` archive of a control and a data tarball (tar, flate2), which is all a .deb
//! is; neither needs rpmbuild or dpkg-deb on the build machine. Contents and modes are
//! the table below; docs/operations.md documents it and tests/tests/packaging.rs checks
//! the built files against it.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::{cargo, step, workspace};

pub const NAME: &str = "sensor-agent";
const SUMMARY: &str = "eBPF host sensor for Ivanti EPMM appliances";
const DESCRIPTION: &str = "Kernel probes (eBPF) watch process execution, network syscalls and \
file activity; the agent keeps the process tree, detects injected-code behaviour on the EPMM \
web tier and streams alerts to a collector over mutual TLS. Includes the reference collector.";

/// One file of the packages.
struct Entry {
    /// Source, relative to the workspace (binaries: relative to the target directory).
    source: Source,
    dest: &'static str,
    mode: u32,
    config: bool,
}

enum Source {
    Workspace(&'static str),
    Binary(&'static str),
}

const ENTRIES: &[Entry] = &[
    Entry {
        source: Source::Binary("sensor-agent"),
        dest: "/usr/bin/sensor-agent",
        mode: 0o755,
        config: false,
    },
    Entry {
        source: Source::Binary("sensor-collector"),
        dest: "/usr/bin/sensor-collector",
        mode: 0o755,
        config: false,
    },
    Entry {
        source: Source::Workspace("packaging/sensor-agent.service"),
        dest: "/usr/lib/systemd/system/sensor-agent.service",
        mode: 0o644,
        config: false,
    },
    Entry {
        source: Source::Workspace("packaging/agent.toml"),
        dest: "/etc/sensor-agent/agent.toml",
        mode: 0o600,
        config: true,
    },
    Entry {
        source: Source::Workspace("packaging/sensor-collector.service"),
        dest: "/usr/lib/systemd/system/sensor-collector.service",
        mode: 0o644,
        config: false,
    },
    Entry {
        source: Source::Workspace("packaging/sensor-collector.sysusers"),
        dest: "/usr/lib/sysusers.d/sensor-collector.conf",
        mode: 0o644,
        config: false,
    },
    Entry {
        source: Source::Workspace("packaging/collector.toml"),
        dest: "/etc/sensor-collector/collector.toml",
        mode: 0o640,
        config: true,
    },
    Entry {
        source: Source::Workspace("rules/epmm.yaml"),
        dest: "/usr/share/sensor-agent/rules/epmm.yaml",
        mode: 0o644,
        config: false,
    },
    Entry {
        source: Source::Workspace("README.md"),
        dest: "/usr/share/doc/sensor-agent/README.md",
        mode: 0o644,
        config: false,
    },
    Entry {
        source: Source::Workspace("docs/operations.md"),
        dest: "/usr/share/doc/sensor-agent/operations.md",
        mode: 0o644,
        config: false,
    },
    Entry {
        source: Source::Workspace("docs/rules.md"),
        dest: "/usr/share/doc/sensor-agent/rules.md",
        mode: 0o644,
        config: false,
    },
    Entry {
        source: Source::Workspace("docs/delivery.md"),
        dest: "/usr/share/doc/sensor-agent/delivery.md",
        mode: 0o644,
        config: false,
    },
];

/// Directories the packages own, with their modes.
const DIRS: &[(&str, u32)] = &[
    ("/etc/sensor-agent", 0o700),
    ("/etc/sensor-collector", 0o750),
    ("/var/lib/sensor-agent", 0o700),
];

/// The collector's user (into the root dpkg installs to, when it is not /), then the
/// units; neither unit is enabled or started.
const POST_INSTALL: &str = "systemd-sysusers --root=\"${DPKG_ROOT:-/}\" sensor-collector.conf >/dev/null 2>&1 || :\n\
chgrp sensor-collector \"${DPKG_ROOT:-}/etc/sensor-collector\" \"${DPKG_ROOT:-}/etc/sensor-collector/collector.toml\" >/dev/null 2>&1 || :\n\
systemctl daemon-reload >/dev/null 2>&1 || :\n";
const PRE_REMOVE: &str =
    "systemctl stop sensor-agent.service sensor-collector.service >/dev/null 2>&1 || :\n";
const POST_REMOVE: &str = "systemctl daemon-reload >/dev/null 2>&1 || :\n";

#[derive(clap::Args)]
pub struct PackageArgs {
    /// Where to write the packages.
    #[arg(long, default_value = "target/packages")]
    pub out: PathBuf,
    /// Package the debug build (quicker; for tests), not the release build.
    #[arg(long)]
    pub debug: bool,
}

pub fn run(args: &PackageArgs) -> Result<()> {
    let profile = if args.debug { "debug" } else { "release" };
    step(&format!("build the agent and the collector ({profile})"));
    let mut build = vec![
        "build",
        "--package",
        "sensor-agent",
        "--package",
        "sensor-collector",
    ];
    if !args.debug {
        build.push("--release");
    }
    cargo(&build)?;
    let bins = workspace().join("target").join(profile);
    let out = workspace().join(&args.out);
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let version = env!("CARGO_PKG_VERSION");
    step("write the RPM");
    let rpm = out.join(format!("{NAME}-{version}-1.x86_64.rpm"));
    // Debug builds are for tests: fast compression of their large binaries.
    let level = if args.debug { 1 } else { 9 };
    write_rpm(&rpm, &bins, version, level)?;
    println!("{}", rpm.display());
    step("write the DEB");
    let deb = out.join(format!("{NAME}_{version}-1_amd64.deb"));
    write_deb(&deb, &bins, version, level)?;
    println!("{}", deb.display());
    Ok(())
}

fn source_path(entry: &Entry, bins: &Path) -> PathBuf {
    match entry.source {
        Source::Workspace(rel) => workspace().join(rel),
        Source::Binary(name) => bins.join(name),
    }
}

fn write_rpm(path: &Path, bins: &Path, version: &str, level: u32) -> Result<()> {
    let mut builder = rpm::PackageBuilder::new(NAME, version, "Apache-2.0", "x86_64", SUMMARY)
        .using_config(rpm::BuildConfig::v4().compression(rpm::CompressionWithLevel::Gzip(level)))
        .description(DESCRIPTION)
        .release("1")
        .requires(rpm::Dependency::any("systemd"))
        .post_install_script(POST_INSTALL)
        .pre_uninstall_script(PRE_REMOVE)
        .post_uninstall_script(POST_REMOVE);
    for entry in ENTRIES {
        let mut options = rpm::FileOptions::new(entry.dest)
            .mode(rpm::FileMode::regular(entry.mode as u16))
            .user("root")
            .group("root");
        if entry.config {
            options = options.is_config_noreplace();
        }
        let source = source_path(entry, bins);
        builder = builder
            .with_file(&source, options)
            .with_context(|| format!("rpm: {}", source.display()))?;
    }
    for (dir, mode) in DIRS {
        builder = builder.with_file_contents(
            Vec::new(),
            rpm::FileOptions::new(*dir)
                .mode(rpm::FileMode::dir(*mode as u16))
                .user("root")
                .group("root"),
        )?;
    }
    let package = builder.build().context("rpm: build")?;
    package
        .write_file(path)
        .with_context(|| format!("rpm: write {}", path.display()))
}

/// A gzip-compressed tar of `files`: (path inside, mode, contents or None for a dir).
/// Names are written as given ("./usr/..."), as dpkg-deb does: the tar crate's path
/// setters would drop the leading "./".
fn tarball(files: &[(String, u32, Option<Vec<u8>>)], level: u32) -> Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    let mut tar = tar::Builder::new(gz);
    for (path, mode, data) in files {
        let mut header = tar::Header::new_gnu();
        let name = match data {
            Some(_) => path.clone(),
            None => format!("{path}/"),
        };
        let slot = &mut header.as_old_mut().name;
        anyhow::ensure!(
            name.len() < slot.len(),
            "deb: path too long for a tar header: {name}"
        );
        slot[..name.len()].copy_from_slice(name.as_bytes());
        header.set_mode(*mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_username("root")?;
        header.set_groupname("root")?;
        header.set_mtime(0);
        let bytes: &[u8] = data.as_deref().unwrap_or_default();
        header.set_entry_type(if data.is_some() {
            tar::EntryType::Regular
        } else {
            tar::EntryType::Directory
        });
        header.set_size(bytes.len() as u64);
        header.set_cksum();
        tar.append(&header, bytes)?;
    }
    Ok(tar.into_inner()?.finish()?)
}

fn write_deb(path: &Path, bins: &Path, version: &str, level: u32) -> Result<()> {
    let mut data_files: Vec<(String, u32, Option<Vec<u8>>)> = vec![(".".into(), 0o755, None)];
    let mut dirs: Vec<String> = Vec::new();
    let mut installed_size = 0u64;
    for entry in ENTRIES {
        // Parent directories first, as dpkg expects.
        let mut parent = Path::new(entry.dest).parent();
        let mut chain = Vec::new();
        while let Some(p) = parent.filter(|p| *p != Path::new("/")) {
            chain.push(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
        for dir in chain.into_iter().rev() {
            if !dirs.contains(&dir) {
                let mode = DIRS
                    .iter()
                    .find(|(d, _)| *d == dir)
                    .map_or(0o755, |(_, m)| *m);
                data_files.push((format!(".{dir}"), mode, None));
                dirs.push(dir);
            }
        }
        let source = source_path(entry, bins);
        let bytes = fs::read(&source).with_context(|| format!("deb: {}", source.display()))?;
        installed_size += bytes.len() as u64;
        data_files.push((format!(".{}", entry.dest), entry.mode, Some(bytes)));
    }
    for (dir, mode) in DIRS {
        if !dirs.iter().any(|d| d == dir) {
            data_files.push((format!(".{dir}"), *mode, None));
        }
    }
    let control = format!(
        "Package: {NAME}\nVersion: {version}-1\nArchitecture: amd64\nMaintainer: EPMM sensor team <sensor@example.invalid>\n\
         Installed-Size: {}\nDepends: systemd\nSection: admin\nPriority: optional\n\
         Description: {SUMMARY}\n {DESCRIPTION}\n",
        installed_size.div_ceil(1024)
    );
    let conffiles: String = ENTRIES
        .iter()
        .filter(|e| e.config)
        .map(|e| format!("{}\n", e.dest))
        .collect();
    let script = |body: &str| format!("#!/bin/sh\nset -e\n{body}").into_bytes();
    let control_tar = tarball(
        &[
            ("./control".into(), 0o644, Some(control.into_bytes())),
            ("./conffiles".into(), 0o644, Some(conffiles.into_bytes())),
            ("./postinst".into(), 0o755, Some(script(POST_INSTALL))),
            ("./prerm".into(), 0o755, Some(script(PRE_REMOVE))),
            ("./postrm".into(), 0o755, Some(script(POST_REMOVE))),
        ],
        9,
    )?;
    let data_tar = tarball(&data_files, level)?;
    let file = fs::File::create(path).with_context(|| format!("deb: {}", path.display()))?;
    let mut ar = ar::Builder::new(file);
    for (name, bytes) in [
        ("debian-binary", b"2.0\n".to_vec()),
        ("control.tar.gz", control_tar),
        ("data.tar.gz", data_tar),
    ] {
        let mut header = ar::Header::new(name.as_bytes().to_vec(), bytes.len() as u64);
        header.set_mode(0o644);
        ar.append(&header, bytes.as_slice())?;
    }
    ar.into_inner()?.flush()?;
    Ok(())
}
