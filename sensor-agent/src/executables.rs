//! What an executable is, whatever it is called: its content (SHA-256), the package that
//! installed its path, and whether its content is that of an installed shell or script
//! interpreter. Names and argv are the attacker's to choose; content and package
//! ownership are not.
//!
//! Identities are keyed by what the kernel says of the file at exec (device, inode, size,
//! modification and status-change times) and computed once per file version: an exec
//! storm of one program hashes it once. The first 16 MiB are hashed; a new executable
//! costs one read of it (measured in `Executables::stats`). Package databases (dpkg's
//! lists, rpm's file list) are read at start and again when they change.

use std::{
    collections::HashSet,
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Instant, SystemTime},
};

use rustc_hash::FxHashMap;
use sensor_proto::v1::{Event, ExeIdentity, ExecEvent, event};
use tracing::{debug, info, warn};

/// Content hashed per executable.
const HASH_LIMIT: u64 = 16 * 1024 * 1024;
/// Identities kept; past it the cache starts again (a host runs far fewer programs).
const CACHE_LIMIT: usize = 65_536;

/// Names whose package-installed files are shells, and interpreters (versioned names too).
const SHELL_NAMES: &[&str] = &[
    "sh", "bash", "dash", "ash", "ksh", "ksh93", "mksh", "zsh", "csh", "tcsh", "fish", "busybox",
    "yash", "rbash",
];
const INTERPRETER_PREFIXES: &[&str] = &[
    "python", "perl", "ruby", "php", "lua", "node", "nodejs", "tclsh", "wish", "expect", "pwsh",
];

/// The file version an identity belongs to.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    ctime: i64,
}

/// Counters of the cache, for metrics and the benchmark note.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExeStats {
    pub hashed: u64,
    pub hashed_bytes: u64,
    pub hash_ns: u64,
    pub cached: u64,
}

/// Which package installed which path.
#[derive(Default)]
pub struct Packages {
    owner: FxHashMap<Box<str>, Arc<str>>,
    /// The database files read, with their times, to notice a change.
    sources: Vec<(PathBuf, Option<SystemTime>)>,
}

impl Packages {
    /// Reads dpkg's file lists and rpm's database under `root`.
    pub fn load(root: &Path) -> Self {
        let mut p = Packages::default();
        let usrmerge = usrmerged_dirs(root);
        let dpkg = root.join("var/lib/dpkg/info");
        if let Ok(dir) = std::fs::read_dir(&dpkg) {
            for entry in dir.flatten() {
                let path = entry.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let Some(package) = name.strip_suffix(".list") else {
                    continue;
                };
                // "libc6:amd64" -> "libc6"
                let package: Arc<str> = package.split(':').next().unwrap_or(package).into();
                if let Ok(text) = std::fs::read_to_string(&path) {
                    for line in text.lines().filter(|l| l.starts_with('/')) {
                        p.add(line, &package, &usrmerge);
                    }
                }
            }
            p.sources.push((dpkg.clone(), modified(&dpkg)));
        }
        let rpmdb = root.join("var/lib/rpm");
        if rpmdb.is_dir() && root == Path::new("/") {
            match Command::new("rpm")
                .args(["-qa", "--qf", "[%{FILENAMES}\t%{NAME}\n]"])
                .output()
            {
                Ok(out) if out.status.success() => {
                    for line in String::from_utf8_lossy(&out.stdout).lines() {
                        if let Some((path, package)) = line.split_once('\t') {
                            p.add(path, &Arc::from(package), &usrmerge);
                        }
                    }
                }
                Ok(out) => {
                    warn!(status = %out.status, "rpm -qa failed: rpm-installed files are not known as such")
                }
                Err(e) => debug!(error = %e, "no rpm command"),
            }
            p.sources.push((rpmdb.clone(), modified(&rpmdb)));
        }
        p
    }

    fn add(&mut self, path: &str, package: &Arc<str>, usrmerge: &[(String, String)]) {
        self.owner.insert(path.into(), Arc::clone(package));
        // /bin/bash in a list is /usr/bin/bash on a merged-/usr system: the kernel gives
        // the resolved path.
        for (from, to) in usrmerge {
            if let Some(rest) = path.strip_prefix(from.as_str())
                && rest.starts_with('/')
            {
                self.owner
                    .insert(format!("{to}{rest}").into(), Arc::clone(package));
            }
        }
    }

    /// The package that installed `path`, if one did.
    pub fn owner(&self, path: &str) -> Option<&Arc<str>> {
        self.owner.get(path)
    }

    /// A package database changed since it was read.
    pub fn stale(&self) -> bool {
        self.sources
            .iter()
            .any(|(path, when)| modified(path) != *when)
    }

    pub fn len(&self) -> usize {
        self.owner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }

    /// Every path a package installed.
    fn paths(&self) -> impl Iterator<Item = &str> {
        self.owner.keys().map(|k| &**k)
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// `(/bin, /usr/bin)` and the like where `/bin` is a link into `/usr`.
fn usrmerged_dirs(root: &Path) -> Vec<(String, String)> {
    ["bin", "sbin", "lib", "lib32", "lib64", "libx32"]
        .iter()
        .filter_map(|dir| {
            let target = std::fs::read_link(root.join(dir)).ok()?;
            let target = target.to_str()?.trim_start_matches('/');
            target
                .starts_with("usr/")
                .then(|| (format!("/{dir}"), format!("/{target}")))
        })
        .collect()
}

/// SHA-256 of the first [`HASH_LIMIT`] bytes of `file`, hex.
fn sha256(mut file: File) -> std::io::Result<(String, u64)> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    while total < HASH_LIMIT {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let n = n.min((HASH_LIMIT - total) as usize);
        ctx.update(&buf[..n]);
        total += n as u64;
    }
    let digest = ctx.finish();
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, total))
}

/// The agent's knowledge of executables.
pub struct Executables {
    root: PathBuf,
    packages: Packages,
    /// Content hashes of the installed shells and interpreters.
    shells: HashSet<String>,
    interpreters: HashSet<String>,
    /// The files those hashes were read from (what enforcement knows a shell by).
    shell_paths: Vec<PathBuf>,
    /// Boot time, seconds since the epoch.
    boot_time: i64,
    cache: FxHashMap<Key, Arc<ExeIdentity>>,
    pub stats: ExeStats,
}

impl Executables {
    /// Reads the package databases under `root` and hashes the installed shells and
    /// interpreters.
    pub fn load(root: &Path) -> Self {
        let started = Instant::now();
        let mut exes = Executables {
            root: root.to_path_buf(),
            packages: Packages::load(root),
            shells: HashSet::new(),
            interpreters: HashSet::new(),
            shell_paths: Vec::new(),
            boot_time: boot_time(root),
            cache: FxHashMap::default(),
            stats: ExeStats::default(),
        };
        exes.learn_shells();
        info!(
            packaged_paths = exes.packages.len(),
            shells = exes.shells.len(),
            interpreters = exes.interpreters.len(),
            ms = started.elapsed().as_millis() as u64,
            "executable identities: package databases read, shells and interpreters hashed"
        );
        exes
    }

    /// Hashes every package-installed shell (and /etc/shells) and interpreter.
    fn learn_shells(&mut self) {
        let etc_shells = std::fs::read_to_string(self.root.join("etc/shells")).unwrap_or_default();
        let mut shells: Vec<String> = etc_shells
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with('/'))
            .map(str::to_owned)
            .collect();
        let mut interpreters = Vec::new();
        for path in self.packages.paths() {
            let Some((dir, name)) = path.rsplit_once('/') else {
                continue;
            };
            if !matches!(
                dir,
                "/bin" | "/usr/bin" | "/sbin" | "/usr/sbin" | "/usr/local/bin"
            ) {
                continue;
            }
            if SHELL_NAMES.contains(&name) {
                shells.push(path.to_owned());
            } else if is_interpreter_name(name) {
                interpreters.push(path.to_owned());
            }
        }
        for (paths, into) in [
            (shells, &mut self.shells),
            (interpreters, &mut self.interpreters),
        ] {
            for path in paths {
                let full = self.root.join(path.trim_start_matches('/'));
                // A package's symlink (/usr/bin/sh -> dash) hashes its target.
                if let Ok(file) = File::open(&full)
                    && std::fs::metadata(&full).is_ok_and(|m| m.is_file())
                    && let Ok((hash, _)) = sha256(file)
                {
                    into.insert(hash);
                    self.shell_paths.push(full);
                }
            }
        }
    }

    /// Fills in the identity of an exec event's executable (live runs; a replayed event
    /// carries the one it was recorded with).
    pub fn enrich(&mut self, event: &mut Event) {
        let pid = event.pid;
        if let Some(event::Kind::Exec(exec)) = event.kind.as_mut()
            && exec.exe_identity.is_none()
        {
            let identity = self.identify(pid, exec);
            exec.exe_identity = Some(Box::new((*identity).clone()));
        }
    }

    /// The installed shells and interpreters (paths under the root).
    pub fn shell_paths(&self) -> &[PathBuf] {
        &self.shell_paths
    }

    /// The host root the identities are read under (`/` on a live host).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The identity of the executable `exec` ran, from the cache or by reading it through
    /// `/proc/PID/exe` (the very file, even renamed or deleted since).
    pub fn identify(&mut self, pid: u32, exec: &ExecEvent) -> Arc<ExeIdentity> {
        let key = Key {
            dev: exec.exe_dev,
            ino: exec.exe_inode,
            size: exec.exe_size,
            mtime: exec.exe_mtime,
            ctime: exec.exe_ctime,
        };
        let cacheable = key.ino != 0 && !exec.exe_memfd;
        if cacheable && let Some(hit) = self.cache.get(&key) {
            self.stats.cached += 1;
            return self.with_packages(hit, exec);
        }
        let started = Instant::now();
        // The very file this exec ran, and only it: by the time the agent reads it the
        // process may have exec'd again (jspawnhelper becomes /bin/sh within
        // microseconds), so /proc/PID/exe is taken only when its inode is the exec's.
        let same_file = |file: File| -> std::io::Result<File> {
            let ino = std::os::unix::fs::MetadataExt::ino(&file.metadata()?);
            if key.ino == 0 || ino == key.ino {
                Ok(file)
            } else {
                Err(std::io::Error::other("not the file this exec ran"))
            }
        };
        let file = File::open(format!("/proc/{pid}/exe"))
            .and_then(same_file)
            .or_else(|_| {
                // The process is gone or runs another program: the path, if it is still
                // the same file.
                File::open(self.root.join(exec.exe.trim_start_matches('/'))).and_then(same_file)
            });
        let mut identity = ExeIdentity {
            changed_since_boot: key.ctime > self.boot_time,
            ..Default::default()
        };
        match file.and_then(sha256) {
            Ok((hash, bytes)) => {
                identity.shell = self.shells.contains(&hash);
                identity.interpreter = self.interpreters.contains(&hash);
                identity.sha256 = hash;
                self.stats.hashed += 1;
                self.stats.hashed_bytes += bytes;
                self.stats.hash_ns += started.elapsed().as_nanos() as u64;
            }
            Err(e) => {
                debug!(pid, exe = %exec.exe, error = %e, "cannot read an executable");
                identity.unreadable = true;
            }
        }
        let identity = Arc::new(identity);
        if cacheable {
            if self.cache.len() >= CACHE_LIMIT {
                self.cache.clear();
            }
            self.cache.insert(key, Arc::clone(&identity));
        }
        self.with_packages(&identity, exec)
    }

    /// The cached content identity with the package of the path it ran from (the same
    /// content may be installed at one path and copied to another), and for a script,
    /// the package of the script the kernel ran (`exec.filename`, when it is not the
    /// executable itself).
    fn with_packages(&self, identity: &Arc<ExeIdentity>, exec: &ExecEvent) -> Arc<ExeIdentity> {
        let package = self.packages.owner(&exec.exe).map_or("", |p| &**p);
        let script_package =
            if (identity.shell || identity.interpreter) && exec.filename != exec.exe {
                let script = if exec.filename.starts_with('/') {
                    exec.filename.clone()
                } else {
                    format!("{}/{}", exec.cwd.trim_end_matches('/'), exec.filename)
                };
                self.packages.owner(&script).map_or("", |p| &**p)
            } else {
                ""
            };
        if identity.package == package && identity.script_package == script_package {
            Arc::clone(identity)
        } else {
            Arc::new(ExeIdentity {
                package: package.to_owned(),
                script_package: script_package.to_owned(),
                ..(**identity).clone()
            })
        }
    }

    /// Reads what the executables of processes seeded from /proc are.
    pub fn label_seeded(&mut self, table: &mut crate::proctable::ProcessTable) {
        use std::os::unix::fs::MetadataExt;
        for p in table.snapshot() {
            let Ok(meta) = std::fs::metadata(format!("/proc/{}/exe", p.pid)) else {
                continue;
            };
            let exec = ExecEvent {
                exe: p.exe.to_string(),
                exe_dev: meta.dev(),
                exe_inode: meta.ino(),
                exe_size: meta.size(),
                exe_mtime: meta.mtime(),
                exe_ctime: meta.ctime(),
                exe_memfd: p.exe_memfd,
                ..Default::default()
            };
            let identity = self.identify(p.pid, &exec);
            table.set_exe_identity(p.pid, identity);
        }
    }

    /// Reads the package databases again when they changed (an install or upgrade).
    pub fn refresh(&mut self) {
        if self.packages.stale() {
            self.packages = Packages::load(&self.root);
            self.shells.clear();
            self.interpreters.clear();
            self.shell_paths.clear();
            self.learn_shells();
            self.cache.clear();
            info!(
                packaged_paths = self.packages.len(),
                "package databases changed: read again"
            );
        }
    }
}

fn is_interpreter_name(name: &str) -> bool {
    INTERPRETER_PREFIXES.iter().any(|prefix| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit() || c == '.'))
    })
}

/// Boot time in seconds since the epoch (`btime` of /proc/stat).
fn boot_time(root: &Path) -> i64 {
    std::fs::read_to_string(root.join("proc/stat"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root with a dpkg list installing a "bash" and a "python3.11", and /etc/shells.
    fn fake_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for dir in ["usr/bin", "var/lib/dpkg/info", "etc", "proc", "tmp"] {
            std::fs::create_dir_all(r.join(dir)).unwrap();
        }
        std::fs::write(r.join("usr/bin/bash"), b"#!fake bash content").unwrap();
        std::fs::write(r.join("usr/bin/python3.11"), b"fake python content").unwrap();
        std::fs::write(r.join("usr/bin/true"), b"fake true").unwrap();
        // /bin is merged into /usr/bin, as on Debian.
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        std::fs::write(
            r.join("var/lib/dpkg/info/bash.list"),
            "/.\n/bin\n/bin/bash\n",
        )
        .unwrap();
        std::fs::write(
            r.join("var/lib/dpkg/info/python3.11-minimal:amd64.list"),
            "/usr/bin/python3.11\n",
        )
        .unwrap();
        std::fs::write(r.join("var/lib/dpkg/info/coreutils.list"), "/bin/true\n").unwrap();
        std::fs::write(r.join("etc/shells"), "# shells\n/bin/bash\n").unwrap();
        std::fs::write(r.join("proc/stat"), "cpu 1 2 3\nbtime 1000\n").unwrap();
        root
    }

    fn exec(path: &str, ino: u64, ctime: i64) -> ExecEvent {
        ExecEvent {
            exe: path.into(),
            exe_inode: ino,
            exe_dev: 1,
            exe_size: 10,
            exe_mtime: ctime,
            exe_ctime: ctime,
            ..Default::default()
        }
    }

    #[test]
    fn packages_know_merged_usr_paths_and_strip_the_architecture() {
        let root = fake_root();
        let p = Packages::load(root.path());
        assert_eq!(p.owner("/usr/bin/bash").map(|p| &**p), Some("bash"));
        assert_eq!(p.owner("/bin/bash").map(|p| &**p), Some("bash"));
        assert_eq!(
            p.owner("/usr/bin/python3.11").map(|p| &**p),
            Some("python3.11-minimal")
        );
        assert!(p.owner("/tmp/bash").is_none());
        assert!(!p.stale());
    }

    #[test]
    fn a_copied_shell_is_a_shell_and_a_renamed_interpreter_an_interpreter() {
        let root = fake_root();
        let r = root.path();
        let mut exes = Executables::load(r);
        std::fs::copy(r.join("usr/bin/bash"), r.join("tmp/notashell")).unwrap();
        std::fs::copy(r.join("usr/bin/python3.11"), r.join("tmp/py")).unwrap();
        // pid 0 has no /proc/0/exe: the path is read (same inode as the event says).
        let ino =
            |p: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(r.join(p)).unwrap());
        let copied = exes.identify(0, &exec("/tmp/notashell", ino("tmp/notashell"), 2000));
        assert!(copied.shell && !copied.interpreter, "{copied:?}");
        assert_eq!(copied.package, "", "a copy is not package-owned");
        assert!(copied.changed_since_boot);
        let installed = exes.identify(0, &exec("/usr/bin/bash", ino("usr/bin/bash"), 500));
        assert!(installed.shell && installed.package == "bash" && !installed.changed_since_boot);
        assert_eq!(installed.sha256, copied.sha256);
        let py = exes.identify(0, &exec("/tmp/py", ino("tmp/py"), 2000));
        assert!(py.interpreter && !py.shell);
        let t = exes.identify(0, &exec("/usr/bin/true", ino("usr/bin/true"), 500));
        assert!(!t.shell && !t.interpreter && t.package == "coreutils");
        // The second exec of a file version is a cache hit.
        let hashed = exes.stats.hashed;
        exes.identify(0, &exec("/usr/bin/true", ino("usr/bin/true"), 500));
        assert_eq!(exes.stats.hashed, hashed);
        assert_eq!(exes.stats.cached, 1);
    }

    /// A process that exec'd again before the agent read it (jspawnhelper becoming
    /// /bin/sh): its /proc/PID/exe is another file, which must not be taken for this one.
    #[test]
    fn a_process_running_another_program_now_is_not_read_for_this_exec() {
        let root = fake_root();
        let r = root.path();
        let mut exes = Executables::load(r);
        let ino = std::os::unix::fs::MetadataExt::ino(
            &std::fs::metadata(r.join("usr/bin/bash")).unwrap(),
        );
        // This test process's /proc/PID/exe is the test binary, not the bash the event
        // names: the path (same inode) is read instead.
        let identity = exes.identify(std::process::id(), &exec("/usr/bin/bash", ino, 500));
        assert!(identity.shell, "{identity:?}");
        assert_eq!(identity.package, "bash");
    }

    #[test]
    fn interpreter_names_include_versions_only() {
        assert!(is_interpreter_name("python3.11"));
        assert!(is_interpreter_name("perl5.36.0"));
        assert!(is_interpreter_name("node"));
        assert!(!is_interpreter_name("python3-config"));
        assert!(!is_interpreter_name("perldoc"));
    }
}
