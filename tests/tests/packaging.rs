//! The systemd unit and the packages, as built by `cargo xtask package` (the test suite
//! builds them with `--debug` first and names the directory in SENSOR_PACKAGE_DIR).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use sensor_e2e::{
    Agent, Scratch, agent_bin,
    collector::{TmpProgram, b17_of},
};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// (path, mode, configuration file)
const EXPECTED: &[(&str, u32, bool)] = &[
    ("/usr/bin/sensor-agent", 0o755, false),
    ("/usr/bin/sensor-collector", 0o755, false),
    ("/usr/lib/systemd/system/sensor-agent.service", 0o644, false),
    (
        "/usr/lib/systemd/system/sensor-collector.service",
        0o644,
        false,
    ),
    ("/usr/lib/sysusers.d/sensor-collector.conf", 0o644, false),
    ("/etc/sensor-agent/agent.toml", 0o600, true),
    ("/etc/sensor-collector/collector.toml", 0o640, true),
    ("/usr/share/sensor-agent/rules/epmm.yaml", 0o644, false),
    ("/usr/share/doc/sensor-agent/README.md", 0o644, false),
    ("/usr/share/doc/sensor-agent/operations.md", 0o644, false),
    ("/usr/share/doc/sensor-agent/rules.md", 0o644, false),
    ("/usr/share/doc/sensor-agent/delivery.md", 0o644, false),
];
const EXPECTED_DIRS: &[(&str, u32)] = &[
    ("/etc/sensor-agent", 0o700),
    ("/etc/sensor-collector", 0o750),
    ("/var/lib/sensor-agent", 0o700),
];

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!("{name} is not installed; `cargo xtask test` installs it (apt)");
}

/// A scratch root with the unit, the agent binary and the host's systemd units, so that
/// `systemd-analyze --root` can check the unit as installed.
fn unit_root() -> Scratch {
    let root = Scratch::new("unit-root");
    for dir in ["usr/bin", "bin", "etc/systemd/system", "usr/lib/systemd"] {
        std::fs::create_dir_all(root.path(dir)).unwrap();
    }
    std::fs::copy(agent_bin(), root.path("usr/bin/sensor-agent")).unwrap();
    std::fs::copy(
        sensor_e2e::collector::collector_bin(),
        root.path("usr/bin/sensor-collector"),
    )
    .unwrap();
    std::fs::copy("/bin/kill", root.path("bin/kill")).unwrap();
    for unit in ["sensor-agent.service", "sensor-collector.service"] {
        std::fs::copy(
            workspace().join("packaging").join(unit),
            root.path("etc/systemd/system").join(unit),
        )
        .unwrap();
    }
    let units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|d| Path::new(d).join("sysinit.target").exists())
        .expect("the host's systemd units");
    let status = Command::new("cp")
        .args(["-a", units])
        .arg(root.path("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(status.success());
    root
}

/// `systemd-analyze verify` of `unit` installed in a scratch root, and its exposure
/// score (`systemd-analyze security --offline=yes`), which docs/operations.md records as
/// "`UNIT`: exposure N.N".
fn verify_and_score(unit: &str) -> f64 {
    let analyze = tool("systemd-analyze");
    let root = unit_root();
    let root_arg = format!("--root={}", root.str());
    let installed = format!("/etc/systemd/system/{unit}");
    let out = Command::new(&analyze)
        .args(["verify", &root_arg, &installed])
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify {unit}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&analyze)
        .args([
            "security",
            "--offline=yes",
            &root_arg,
            "--no-pager",
            &installed,
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let score: f64 = text
        .split(&format!("Overall exposure level for {unit}:"))
        .nth(1)
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    let doc = std::fs::read_to_string(workspace().join("docs/operations.md")).unwrap();
    assert!(
        doc.contains(&format!("`{unit}`: exposure {score:.1}")),
        "docs/operations.md does not record \"`{unit}`: exposure {score:.1}\""
    );
    score
}

#[test]
fn the_unit_verifies_and_its_security_exposure_is_the_documented_one() {
    let score = verify_and_score("sensor-agent.service");
    assert!(score <= 4.0, "exposure {score}");
    // The unit speaks the protocol the agent implements.
    let unit = std::fs::read_to_string(workspace().join("packaging/sensor-agent.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StateDirectory=sensor-agent",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "CapabilityBoundingSet=CAP_BPF",
    ] {
        assert!(unit.lines().any(|l| l.starts_with(line)), "{line} missing");
    }
}

/// The collector's unit: notify with a watchdog, its own user, no capability, hardened.
#[test]
fn the_collector_unit_verifies_and_is_hardened() {
    let score = verify_and_score("sensor-collector.service");
    assert!(score <= 2.0, "exposure {score}");
    let unit =
        std::fs::read_to_string(workspace().join("packaging/sensor-collector.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "User=sensor-collector",
        "StateDirectory=sensor-collector",
        "ExecStart=/usr/bin/sensor-collector --config /etc/sensor-collector/collector.toml",
        "CapabilityBoundingSet=",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.lines().any(|l| l.starts_with(line)), "{line} missing");
    }
}

fn package_dir() -> PathBuf {
    let dir = std::env::var_os("SENSOR_PACKAGE_DIR")
        .map(|d| workspace().join(d))
        .unwrap_or_else(|| workspace().join("target/packages"));
    assert!(
        dir.is_dir(),
        "no packages in {}: run `cargo xtask test` (it builds them) or `cargo xtask package`",
        dir.display()
    );
    dir
}

fn find(ext: &str) -> PathBuf {
    std::fs::read_dir(package_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(ext))
        .unwrap_or_else(|| panic!("no {ext} in {}", package_dir().display()))
}

/// dpkg itself installs the DEB into a scratch root: every documented path lands with its
/// mode, and dpkg records agent.toml as a conffile. (Dependencies are forced: the scratch
/// root has no systemd; the postinst's `systemctl daemon-reload` tolerates its absence.)
#[test]
fn dpkg_installs_the_deb() {
    use std::os::unix::fs::PermissionsExt;
    let deb = find("_amd64.deb");
    let dpkg = tool("dpkg");
    let root = Scratch::new("dpkg-root");
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(root.path(dir)).unwrap();
    }
    std::fs::write(root.path("var/lib/dpkg/status"), "").unwrap();
    let out = Command::new(&dpkg)
        .arg(format!("--root={}", root.str()))
        .args([
            "--force-depends",
            "--force-script-chrootless",
            "--no-triggers",
            "-i",
        ])
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dpkg -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (path, mode, _) in EXPECTED {
        let meta = std::fs::metadata(root.path(&path[1..]))
            .unwrap_or_else(|e| panic!("{path} not installed: {e}"));
        assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{path}");
    }
    for (path, mode) in EXPECTED_DIRS {
        let meta = std::fs::metadata(root.path(&path[1..])).unwrap();
        assert!(meta.is_dir(), "{path}");
        assert_eq!(meta.permissions().mode() & 0o7777, *mode, "{path}");
    }
    let conffiles =
        std::fs::read_to_string(root.path("var/lib/dpkg/info/sensor-agent.conffiles")).unwrap();
    assert_eq!(
        conffiles.trim(),
        "/etc/sensor-agent/agent.toml\n/etc/sensor-collector/collector.toml"
    );
    // The collector's user, made by the postinst in the root dpkg installed into.
    let passwd = std::fs::read_to_string(root.path("etc/passwd")).unwrap_or_default();
    assert!(
        passwd.lines().any(|l| l.starts_with("sensor-collector:")),
        "no sensor-collector user in the root's /etc/passwd:\n{passwd}"
    );
    // The installed agent is the one built: it runs and knows its version.
    let out = Command::new(root.path("usr/bin/sensor-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_deb_holds_what_is_documented() {
    let deb = find("_amd64.deb");
    let dpkg = tool("dpkg-deb");
    let field = |name: &str| {
        let out = Command::new(&dpkg)
            .arg("--field")
            .arg(&deb)
            .arg(name)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(field("Package"), "sensor-agent");
    assert_eq!(field("Architecture"), "amd64");
    assert!(field("Version").starts_with(env!("CARGO_PKG_VERSION")));
    assert_eq!(field("Depends"), "systemd");
    let out = Command::new(&dpkg)
        .arg("--info")
        .arg(&deb)
        .arg("conffiles")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "/etc/sensor-agent/agent.toml\n/etc/sensor-collector/collector.toml"
    );
    let out = Command::new(&dpkg)
        .arg("--info")
        .arg(&deb)
        .arg("postinst")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("systemctl daemon-reload"));

    let out = Command::new(&dpkg)
        .arg("--contents")
        .arg(&deb)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    // drwx------ root/root 0 1970-01-01 00:00 ./etc/sensor-agent/
    let entries: Vec<(String, String, String)> = listing
        .lines()
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (
                cols[0].to_owned(),
                cols[1].to_owned(),
                cols[5]
                    .trim_start_matches('.')
                    .trim_end_matches('/')
                    .to_owned(),
            )
        })
        .collect();
    let mode_string = |mode: u32, dir: bool| {
        let mut s = String::from(if dir { "d" } else { "-" });
        for shift in [6, 3, 0] {
            let bits = (mode >> shift) & 7;
            s.push(if bits & 4 != 0 { 'r' } else { '-' });
            s.push(if bits & 2 != 0 { 'w' } else { '-' });
            s.push(if bits & 1 != 0 { 'x' } else { '-' });
        }
        s
    };
    for (path, mode, _) in EXPECTED {
        let entry = entries
            .iter()
            .find(|(_, _, p)| p == path)
            .unwrap_or_else(|| panic!("{path} missing:\n{listing}"));
        assert_eq!(entry.0, mode_string(*mode, false), "{path}");
        assert_eq!(entry.1, "root/root", "{path}");
    }
    for (path, mode) in EXPECTED_DIRS {
        let entry = entries
            .iter()
            .find(|(_, _, p)| p == path)
            .unwrap_or_else(|| panic!("{path} missing"));
        assert_eq!(entry.0, mode_string(*mode, true), "{path}");
    }
    let files = entries
        .iter()
        .filter(|(m, _, _)| m.starts_with('-'))
        .count();
    assert_eq!(files, EXPECTED.len(), "nothing undocumented:\n{listing}");
}

#[test]
fn the_rpm_holds_what_is_documented() {
    let path = find(".x86_64.rpm");
    let package = rpm::Package::open(&path).unwrap();
    let meta = &package.metadata;
    assert_eq!(meta.get_name().unwrap(), "sensor-agent");
    assert_eq!(meta.get_version().unwrap(), env!("CARGO_PKG_VERSION"));
    assert_eq!(meta.get_arch().unwrap(), "x86_64");
    assert!(
        meta.get_requires()
            .unwrap()
            .iter()
            .any(|d| d.name == "systemd")
    );
    assert!(
        meta.get_post_install_script()
            .unwrap()
            .script
            .contains("daemon-reload")
    );
    let entries = meta.get_file_entries().unwrap();
    for (file, mode, config) in EXPECTED {
        let entry = entries
            .iter()
            .find(|e| e.path == Path::new(file))
            .unwrap_or_else(|| panic!("{file} missing"));
        assert_eq!(u32::from(entry.mode.permissions()), *mode, "{file}");
        assert_eq!(entry.ownership.user, "root");
        assert_eq!(entry.ownership.group, "root");
        assert_eq!(
            entry.flags.contains(rpm::FileFlags::CONFIG),
            *config,
            "{file} config flag"
        );
        if *config {
            assert!(
                entry.flags.contains(rpm::FileFlags::NOREPLACE),
                "{file} noreplace"
            );
        }
    }
    for (dir, mode) in EXPECTED_DIRS {
        let entry = entries
            .iter()
            .find(|e| e.path == Path::new(dir))
            .unwrap_or_else(|| panic!("{dir} missing"));
        assert!(
            matches!(entry.mode, rpm::FileMode::Dir { .. }),
            "{dir} is a directory"
        );
        assert_eq!(u32::from(entry.mode.permissions()), *mode, "{dir}");
    }
    assert_eq!(entries.len(), EXPECTED.len() + EXPECTED_DIRS.len());
}

/// The unit's `CapabilityBoundingSet`, in setpriv's spelling: `-all,+bpf,+perfmon,...`.
fn unit_bounding_set() -> String {
    let unit = std::fs::read_to_string(workspace().join("packaging/sensor-agent.service")).unwrap();
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit has a CapabilityBoundingSet");
    std::iter::once("-all".to_owned())
        .chain(
            caps.split_whitespace()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs the agent as systemd would under the unit: root, the unit's bounding set, no
/// inheritable capabilities, no new privileges (setpriv does what the unit asks of
/// systemd). With exactly those capabilities the agent must attach and detect; with the
/// BPF ones removed it must refuse to start, saying which are missing.
#[test]
fn the_units_capabilities_are_enough_and_needed() {
    let setpriv = tool("setpriv");
    let bounding = unit_bounding_set();
    let wrapped = |bounding: &str| {
        let mut cmd = Command::new(&setpriv);
        cmd.args([
            "--bounding-set",
            bounding,
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
        ])
        .arg(agent_bin())
        .args(["run", "--collapse", "0"]);
        cmd
    };
    let mut agent = Agent::start_command(wrapped(&bounding));
    let prog = TmpProgram::new("caps");
    prog.run();
    agent.wait_for("B17 under the unit's capabilities", |l| {
        b17_of(l, prog.exe())
    });
    agent.stop();

    let without_bpf: String = bounding
        .split(',')
        .filter(|c| !["+bpf", "+perfmon", "+sys_admin"].contains(c))
        .collect::<Vec<_>>()
        .join(",");
    let out = wrapped(&without_bpf).env("NO_COLOR", "1").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)"),
        "{stderr}"
    );
}
