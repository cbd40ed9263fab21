//! File activity in watched places, end to end: a directory the test watches, one it
//! does not, and the default watch on executables dropped in /tmp.

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use sensor_e2e::{Agent, event_of, marker};
use serde_json::Value;

fn dir(name: &str) -> PathBuf {
    let dir = Path::new("/var/tmp").join(marker(name));
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn file_event<'a>(line: &'a Value, op: &str, path: &str) -> Option<&'a Value> {
    event_of(line, "file").filter(|e| e["file"]["op"] == op && e["file"]["path"] == path)
}

#[test]
fn writes_renames_unlinks_chmod_and_touch_in_a_watched_directory() {
    let watched = dir("watched");
    let w = watched.to_str().unwrap().to_owned();
    let mut agent = Agent::start(&["--watch", &format!("{w}/")]);

    let jsp = format!("{w}/403.jsp");
    fs::write(&jsp, "<% out.println(1); %>").unwrap();
    fs::rename(&jsp, format!("{w}/404.jsp")).unwrap();
    let moved = format!("{w}/404.jsp");
    fs::set_permissions(&moved, fs::Permissions::from_mode(0o755)).unwrap();
    // touch -r: timestamps copied from another file (timestomping).
    let status = Command::new("/usr/bin/touch")
        .args(["-r", "/etc/hostname", &moved])
        .status()
        .unwrap();
    assert!(status.success());
    // A relative path from a shell whose cwd is the watched directory.
    let status = Command::new("/bin/sh")
        .args(["-c", "echo x > relative.css && rm relative.css"])
        .current_dir(&watched)
        .status()
        .unwrap();
    assert!(status.success());
    fs::remove_file(&moved).unwrap();

    let create = agent.wait_for("the creation", |l| {
        file_event(l, "FILE_OP_CREATE", &jsp).is_some()
    });
    assert_eq!(
        create["event"]["pid"].as_u64(),
        Some(u64::from(std::process::id()))
    );
    assert!(create["event"]["file"]["flags"].as_u64().unwrap() & libc::O_CREAT as u64 != 0);
    let rename = agent.wait_for("the rename", |l| {
        file_event(l, "FILE_OP_RENAME", &moved).is_some()
    });
    assert_eq!(rename["event"]["file"]["otherPath"], jsp.as_str());
    let chmod = agent.wait_for("the chmod +x", |l| {
        file_event(l, "FILE_OP_CHMOD_EXEC", &moved).is_some()
    });
    assert_eq!(chmod["event"]["file"]["mode"].as_u64(), Some(0o755));
    agent.wait_for("the timestamp change", |l| {
        file_event(l, "FILE_OP_UTIMES", &moved).is_some()
    });
    let rel = format!("{w}/relative.css");
    let relative = agent.wait_for("the relative creation", |l| {
        file_event(l, "FILE_OP_CREATE", &rel).is_some()
    });
    assert_eq!(relative["event"]["comm"], "sh");
    agent.wait_for("the relative unlink", |l| {
        file_event(l, "FILE_OP_UNLINK", &rel).is_some()
    });
    agent.wait_for("the unlink", |l| {
        file_event(l, "FILE_OP_UNLINK", &moved).is_some()
    });
    let _ = fs::remove_dir_all(&watched);
    agent.stop();
}

/// Writes that reach a watched directory by another way than its name: a symbolic link, a
/// `..`, `/proc/self/root` and a bind mount. Each is reported at the path of the file the
/// kernel opened, with the caller's path beside it.
#[test]
fn writes_through_links_dots_proc_root_and_bind_mounts_are_reported_where_they_land() {
    let watched = dir("landing");
    let elsewhere = dir("elsewhere");
    let w = watched.to_str().unwrap().to_owned();
    let q = elsewhere.to_str().unwrap().to_owned();
    let same_fs = |p: &Path| fs::metadata(p).unwrap().dev() == fs::metadata("/").unwrap().dev();
    assert!(
        same_fs(&watched),
        "this test needs /var/tmp on the root filesystem (bind mounts of it are climbed through)"
    );
    let mut agent = Agent::start(&["--watch", &format!("{w}/")]);

    let link = format!("{q}/link");
    std::os::unix::fs::symlink(&watched, &link).unwrap();
    let bind = format!("{q}/bind");
    fs::create_dir(&bind).unwrap();
    let status = Command::new("mount")
        .args(["--bind", &w, &bind])
        .status()
        .unwrap();
    assert!(status.success(), "mount --bind {w} {bind}");
    let wname = watched.file_name().unwrap().to_str().unwrap();
    let ways = [
        (format!("{link}/via-link.jsp"), format!("{w}/via-link.jsp")),
        (
            format!("{q}/../{wname}/via-dots.jsp"),
            format!("{w}/via-dots.jsp"),
        ),
        (
            format!("/proc/self/root{w}/via-proc-root.jsp"),
            format!("{w}/via-proc-root.jsp"),
        ),
        (format!("{bind}/via-bind.jsp"), format!("{w}/via-bind.jsp")),
    ];
    for (given, _) in &ways {
        fs::write(
            given,
            "<% Runtime.getRuntime().exec(request.getParameter(\"c\")); %>",
        )
        .unwrap();
    }
    let status = Command::new("umount").arg(&bind).status().unwrap();
    assert!(status.success(), "umount {bind}");

    for (given, real) in &ways {
        let ev = agent.wait_for(&format!("the write through {given}"), |l| {
            file_event(l, "FILE_OP_CREATE", real).is_some()
        });
        let f = &ev["event"]["file"];
        assert_eq!(f["givenPath"], given.as_str(), "{ev}");
        assert_eq!(f["resolved"], true, "{ev}");
        assert_eq!(f["created"], true, "{ev}");
    }
    let _ = fs::remove_dir_all(&watched);
    let _ = fs::remove_dir_all(&elsewhere);
    agent.stop();
}

/// `: > log` opens with O_CREAT|O_TRUNC: on a file that exists it is a truncation, not a
/// creation; `>>` is a write; a new file is a creation.
#[test]
fn an_open_that_truncates_an_existing_file_is_a_truncation() {
    let watched = dir("logs");
    let w = watched.to_str().unwrap().to_owned();
    let log = format!("{w}/access.log");
    fs::write(&log, "10.0.0.1 GET /mifs/\n".repeat(100)).unwrap();
    let mut agent = Agent::start(&["--watch", &format!("{w}/")]);

    let fresh = format!("{w}/new.log");
    let status = Command::new("/bin/sh")
        .args([
            "-c",
            &format!(": > {log}; echo cover >> {log}; : > {fresh}"),
        ])
        .status()
        .unwrap();
    assert!(status.success());

    let trunc = agent.wait_for("the truncation", |l| {
        file_event(l, "FILE_OP_TRUNCATE", &log).is_some()
    });
    let f = &trunc["event"]["file"];
    assert_eq!(f["existed"], true, "{trunc}");
    assert_ne!(f["created"], true, "{trunc}");
    assert!(f["flags"].as_u64().unwrap() & libc::O_TRUNC as u64 != 0);
    let append = agent.wait_for("the append", |l| {
        file_event(l, "FILE_OP_OPEN_WRITE", &log).is_some()
    });
    assert!(append["event"]["file"]["flags"].as_u64().unwrap() & libc::O_APPEND as u64 != 0);
    let created = agent.wait_for("the creation", |l| {
        file_event(l, "FILE_OP_CREATE", &fresh).is_some()
    });
    assert_eq!(created["event"]["file"]["created"], true, "{created}");
    let wrong = agent.collect(Duration::from_millis(200), |l| {
        file_event(l, "FILE_OP_CREATE", &log).is_some()
    });
    assert!(
        wrong.is_empty(),
        "the truncated log was reported created: {wrong:?}"
    );
    let _ = fs::remove_dir_all(&watched);
    agent.stop();
}

#[test]
fn a_file_outside_watched_places_produces_nothing() {
    let watched = dir("watched-2");
    let quiet = dir("quiet");
    let w = watched.to_str().unwrap().to_owned();
    let mut agent = Agent::start(&["--watch", &format!("{w}/")]);

    let unwatched = quiet.join("payload.jsp");
    fs::write(&unwatched, "x").unwrap();
    fs::rename(&unwatched, quiet.join("renamed.jsp")).unwrap();
    fs::remove_file(quiet.join("renamed.jsp")).unwrap();
    // Written after the unwatched file by the same thread: once it is seen, anything about
    // the unwatched one would have been seen too.
    let marker_file = format!("{w}/after");
    fs::write(&marker_file, "x").unwrap();
    agent.wait_for("the watched write that follows", |l| {
        file_event(l, "FILE_OP_CREATE", &marker_file).is_some()
    });
    let q = quiet.to_str().unwrap().to_owned();
    let leaked = agent.collect(Duration::from_millis(300), |l| {
        event_of(l, "file")
            .is_some_and(|e| e["file"]["path"].as_str().unwrap_or("").starts_with(&q))
    });
    assert!(
        leaked.is_empty(),
        "unwatched file activity was reported: {leaked:?}"
    );
    let _ = fs::remove_dir_all(&watched);
    let _ = fs::remove_dir_all(&quiet);
    agent.stop();
}

/// The default watch list: an executable created in /tmp is reported, a plain file is not.
#[test]
fn executables_dropped_in_tmp_are_reported_by_default() {
    let mut agent = Agent::start(&[]);
    let plain = format!("/tmp/{}", marker("plain"));
    let exe = format!("/tmp/{}", marker("dropper"));
    fs::write(&plain, "data").unwrap();
    fs::copy("/bin/true", &exe).unwrap(); // keeps the 0755 mode: created executable
    let staged = format!("/tmp/{}", marker("staged"));
    fs::write(&staged, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o700)).unwrap();

    agent.wait_for("the executable created in /tmp", |l| {
        file_event(l, "FILE_OP_CREATE_EXEC", &exe).is_some()
    });
    agent.wait_for("chmod +x in /tmp", |l| {
        file_event(l, "FILE_OP_CHMOD_EXEC", &staged).is_some()
    });
    let leaked = agent.collect(Duration::from_millis(200), |l| {
        event_of(l, "file").is_some_and(|e| e["file"]["path"] == plain.as_str())
    });
    assert!(
        leaked.is_empty(),
        "a non-executable file in /tmp was reported: {leaked:?}"
    );
    for f in [&plain, &exe, &staged] {
        let _ = fs::remove_file(f);
    }
    agent.stop();
}

#[test]
fn bad_watch_path_is_refused_with_a_clear_error() {
    sensor_e2e::require_root();
    let out = Command::new(sensor_e2e::agent_bin())
        .args(["run", "--watch", "relative/dir"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("watched path \"relative/dir\" is not absolute"),
        "{stderr}"
    );
}

/// Each CPU remembers the last opened file's answer, so a storm of writes to one file
/// walks its path once. A rename must make it forget: a file written in an unwatched
/// directory, the directory moved into a watched one, the same file (same dentry, same
/// parent) written again on the same CPU is reported under its new path.
#[test]
fn a_file_moved_into_a_watched_place_is_reported_at_its_next_write() {
    let watched = dir("cache-watched");
    let outside = dir("cache-outside");
    let w = watched.to_str().unwrap().to_owned();
    let mut agent = Agent::start(&["--watch", &format!("{w}/")]);
    let o = outside.to_str().unwrap().to_owned();
    fs::create_dir_all(format!("{o}/sub")).unwrap();
    // One shell pinned to CPU 0 does all three: the opens are its own (builtin `:`).
    let script = format!(": > {o}/sub/f; : > {o}/sub/f; mv {o}/sub {w}/sub; : > {w}/sub/f");
    let status = Command::new("taskset")
        .args(["-c", "0", "/bin/bash", "-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    let moved = format!("{w}/sub/f");
    agent.wait_for("the write after the move", |l| {
        event_of(l, "file").is_some_and(|e| {
            e["file"]["path"] == moved.as_str()
                && matches!(
                    e["file"]["op"].as_str(),
                    Some("FILE_OP_TRUNCATE" | "FILE_OP_OPEN_WRITE")
                )
        })
    });
    agent.stop();
    let _ = fs::remove_dir_all(&watched);
    let _ = fs::remove_dir_all(&outside);
}
