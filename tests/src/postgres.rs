//! A PostgreSQL server of the test's own: Debian's binaries (version 15 or later), a
//! cluster made by `initdb` in a scratch directory, listening on 127.0.0.1 only, stopped
//! by its pid. PostgreSQL refuses to run as root: as root the cluster belongs to the
//! `postgres` user the Debian package creates, and the server runs as that user.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::collector::free_port;

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The newest installed server's `bin` directory (version 15 or later).
fn bin_dir() -> PathBuf {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|v| {
            *v >= 15 && Path::new(&format!("/usr/lib/postgresql/{v}/bin/postgres")).exists()
        })
        .max()
        .expect("PostgreSQL 15 or later under /usr/lib/postgresql (the test command installs it)");
    PathBuf::from(format!("/usr/lib/postgresql/{newest}/bin"))
}

/// The uid and gid the server runs as: `postgres` when we are root, ourselves otherwise.
fn owner() -> Option<(u32, u32)> {
    // SAFETY: plain libc calls; getpwnam's result is read at once, before any other call.
    unsafe {
        if libc::geteuid() != 0 {
            return None;
        }
        let pw = libc::getpwnam(c"postgres".as_ptr());
        assert!(
            !pw.is_null(),
            "no postgres user (the Debian postgresql package creates it)"
        );
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn as_owner(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = owner() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

pub struct Postgres {
    dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Postgres {
    /// A new cluster in `dir` (created; it must not exist) with a superuser `sensor`
    /// trusted on loopback, started.
    pub fn start(dir: &Path) -> Postgres {
        Self::start_with(dir, None)
    }

    /// As `start`; with `tls` (certificate and key, PEM) the server speaks TLS and takes
    /// only TLS connections (`hostssl` in pg_hba.conf, no `host` line).
    pub fn start_with(dir: &Path, tls: Option<(&Path, &Path)>) -> Postgres {
        std::fs::create_dir_all(dir).unwrap();
        if let Some((uid, gid)) = owner() {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).unwrap();
        }
        let out = as_owner(&mut Command::new(bin_dir().join("initdb")))
            .args([
                "-U",
                "sensor",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(dir.join("data"))
            .current_dir(dir)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let data = dir.join("data");
        let mut options = String::new();
        if let Some((cert, key)) = tls {
            for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
                std::fs::copy(from, data.join(to)).unwrap();
                let path = data.join(to);
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
                if let Some((uid, gid)) = owner() {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
                }
            }
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .unwrap();
            options.push_str("ssl = on\n");
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut conf, options.as_bytes()).unwrap();
        let mut pg = Postgres {
            dir: dir.to_owned(),
            port: free_port(),
            child: None,
        };
        pg.start_again();
        pg
    }

    /// `postgres://sensor@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://sensor@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again) on the same port and data, waiting until it answers.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        if let Some((uid, gid)) = owner() {
            std::os::unix::fs::chown(self.dir.join("server.log"), Some(uid), Some(gid)).unwrap();
        }
        let child = as_owner(&mut Command::new(bin_dir().join("postgres")))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("port={}", self.port))
            .args(["-c"])
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args(["-c", "max_connections=200", "-c", "fsync=on"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ready = Command::new(bin_dir().join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("postgres exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not answer within {START_TIMEOUT:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the server: SIGINT (fast shutdown: open transactions roll back, connections
    /// are closed) to the postmaster we started, by its pid; waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling the server this test started, by its pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + START_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// psql connected to the server as `sensor`, stopping at the first error.
    pub fn client(&self) -> Command {
        let mut cmd = Command::new(bin_dir().join("psql"));
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "sensor", "-d", "postgres", "-v", "ON_ERROR_STOP=1"]);
        cmd
    }

    /// One SQL statement's result through psql, unaligned, tuples only.
    pub fn psql(&self, sql: &str) -> String {
        let out = self
            .client()
            .args(["-At", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
