//! Process lifecycle, end to end: the real probes see real processes start, fail to start,
//! fork from threads, and exit.

use std::{os::unix::process::CommandExt, process::Command, time::Duration};

use sensor_e2e::{Agent, argv, event_of, marker, num};

/// A known argv appears with the right exe, argv, uid and parent.
#[test]
fn exec_reports_exe_argv_uid_and_parent() {
    let mut agent = Agent::start(&[]);
    let tag = marker("exec");
    let status = Command::new("/bin/echo")
        .args([tag.as_str(), "second arg", ""])
        .uid(65534)
        .current_dir("/tmp")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());

    let line = agent.wait_for("the exec of /bin/echo", |l| {
        event_of(l, "exec").is_some_and(|e| argv(e).get(1) == Some(&tag))
    });
    let ev = &line["event"];
    assert_eq!(argv(ev), ["/bin/echo", tag.as_str(), "second arg", ""]);
    assert_eq!(ev["exec"]["filename"], "/bin/echo");
    let exe = ev["exec"]["exe"].as_str().unwrap();
    let real = std::fs::canonicalize("/bin/echo").unwrap();
    assert_eq!(
        exe,
        real.to_str().unwrap(),
        "exe is the path the kernel resolved"
    );
    assert_eq!(num(&ev["uid"]), 65534);
    assert_eq!(num(&ev["exec"]["euid"]), 65534);
    assert_eq!(num(&ev["exec"]["ppid"]), u64::from(std::process::id()));
    assert_eq!(ev["exec"]["cwd"], "/tmp");
    assert!(
        ev["time"].as_str().unwrap().starts_with("20"),
        "wall-clock time"
    );
    assert!(num(&ev["bootNs"]) > 0);
    assert!(num(&ev["exec"]["startBootNs"]) > 0);
    agent.stop();
}

/// A child forked from a secondary thread reports the process as its parent, and keeps the
/// thread's name (THREATS.md 5.1: the JVM forks from worker threads).
#[test]
fn child_of_a_secondary_thread_names_the_process_as_parent() {
    let mut agent = Agent::start(&[]);
    let tag = marker("thread");
    let worker = std::thread::Builder::new()
        .name("e2e-forker".into())
        .spawn({
            let tag = tag.clone();
            move || {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() } as u32;
                let status = Command::new("/bin/true").arg(&tag).status().unwrap();
                assert!(status.success());
                tid
            }
        })
        .unwrap();
    let thread_id = worker.join().unwrap();
    assert_ne!(
        thread_id,
        std::process::id(),
        "the fork came from another thread"
    );

    let line = agent.wait_for("the exec from the worker thread", |l| {
        event_of(l, "exec").is_some_and(|e| argv(e).get(1) == Some(&tag))
    });
    let exec = &line["event"]["exec"];
    assert_eq!(num(&exec["ppid"]), u64::from(std::process::id()));
    assert_eq!(exec["parentThreadComm"], "e2e-forker");

    let child_pid = num(&line["event"]["pid"]);
    let fork = agent.wait_for("the fork from the worker thread", |l| {
        event_of(l, "fork").is_some_and(|e| num(&e["pid"]) == child_pid)
    });
    let fork = &fork["event"]["fork"];
    assert_eq!(num(&fork["parentPid"]), u64::from(std::process::id()));
    assert_eq!(num(&fork["parentTid"]), u64::from(thread_id));
    assert_eq!(fork["parentThreadComm"], "e2e-forker");
    assert_ne!(fork["thread"], true);
    agent.stop();
}

/// Fork and exit, with the exit status and the killing signal.
#[test]
fn fork_and_exit_with_code_and_signal() {
    let mut agent = Agent::start(&[]);
    let exits_7 = Command::new("/bin/sh")
        .args(["-c", "exit 7"])
        .spawn()
        .unwrap();
    let pid_7 = u64::from(exits_7.id());
    let mut killed = Command::new("/bin/sleep").arg("30").spawn().unwrap();
    let pid_killed = u64::from(killed.id());
    killed.kill().unwrap();
    let _ = killed.wait();
    let mut exits_7 = exits_7;
    assert_eq!(exits_7.wait().unwrap().code(), Some(7));

    let fork = agent.wait_for("the fork of sh", |l| {
        event_of(l, "fork").is_some_and(|e| num(&e["pid"]) == pid_7)
    });
    assert_eq!(
        num(&fork["event"]["fork"]["parentPid"]),
        u64::from(std::process::id())
    );
    let exit = agent.wait_for("the exit of sh", |l| {
        event_of(l, "exit").is_some_and(|e| num(&e["pid"]) == pid_7)
    });
    assert_eq!(num(&exit["event"]["exit"]["exitCode"]), 7);
    assert_eq!(num(&exit["event"]["exit"]["signal"]), 0);
    assert_eq!(
        num(&exit["event"]["exit"]["ppid"]),
        u64::from(std::process::id())
    );

    let exit = agent.wait_for("the exit of the killed sleep", |l| {
        event_of(l, "exit").is_some_and(|e| num(&e["pid"]) == pid_killed)
    });
    assert_eq!(num(&exit["event"]["exit"]["signal"]), 9);
    agent.stop();
}

/// Threads are reported as threads, and a thread's exit is not a process exit.
#[test]
fn thread_creation_is_flagged_and_only_process_exit_reported() {
    let mut agent = Agent::start(&[]);
    let handle = std::thread::Builder::new()
        .name("e2e-thread".into())
        .spawn(|| unsafe { libc::gettid() } as u64)
        .unwrap();
    let tid = handle.join().unwrap();
    let line = agent.wait_for("the clone of a thread", |l| {
        event_of(l, "fork").is_some_and(|e| num(&e["tid"]) == tid)
    });
    assert_eq!(line["event"]["fork"]["thread"], true);
    assert_eq!(num(&line["event"]["pid"]), u64::from(std::process::id()));
    let own_exits = agent.collect(Duration::from_millis(500), |l| {
        event_of(l, "exit").is_some_and(|e| num(&e["pid"]) == u64::from(std::process::id()))
    });
    assert!(
        own_exits.is_empty(),
        "a thread exit is not a process exit: {own_exits:?}"
    );
    agent.stop();
}

/// A failed exec is reported with its filename and errno.
#[test]
fn failed_exec_reports_errno() {
    let mut agent = Agent::start(&[]);
    let missing = format!("/nonexistent/{}", marker("enoent"));
    let err = Command::new(&missing).spawn().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));

    let dir = tempfile_dir();
    let not_exec = dir.join(marker("eacces"));
    std::fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    let err = Command::new(&not_exec).spawn().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));

    let line = agent.wait_for("the failed exec (ENOENT)", |l| {
        event_of(l, "execFailed").is_some_and(|e| e["execFailed"]["filename"] == missing.as_str())
    });
    assert_eq!(
        num(&line["event"]["execFailed"]["errno"]),
        libc::ENOENT as u64
    );
    assert_eq!(line["event"]["execFailed"]["error"], "ENOENT");

    let path = not_exec.to_str().unwrap().to_owned();
    let line = agent.wait_for("the failed exec (EACCES)", |l| {
        event_of(l, "execFailed").is_some_and(|e| e["execFailed"]["filename"] == path.as_str())
    });
    assert_eq!(line["event"]["execFailed"]["error"], "EACCES");
    let _ = std::fs::remove_dir_all(dir);
    agent.stop();
}

/// argv longer than 4 KiB is cut and flagged; 32 arguments and more come through.
#[test]
fn long_argv_is_truncated_and_flagged() {
    let mut agent = Agent::start(&[]);
    let tag = marker("long");
    let mut args = vec![tag.clone()];
    args.extend((0..40).map(|i| format!("arg{i:02}-{}", "x".repeat(150))));
    Command::new("/bin/true").args(&args).status().unwrap();
    let short_tag = marker("many");
    let many: Vec<String> = (0..40).map(|i| format!("a{i}")).collect();
    Command::new("/bin/true")
        .arg(&short_tag)
        .args(&many)
        .status()
        .unwrap();

    let line = agent.wait_for("the exec with a long argv", |l| {
        event_of(l, "exec").is_some_and(|e| argv(e).get(1) == Some(&tag))
    });
    let exec = &line["event"]["exec"];
    assert_eq!(exec["argvTruncated"], true);
    let got = argv(&line["event"]);
    // The kernel keeps argv NUL-separated; the cut one has lost its NUL.
    let total: usize = got.iter().map(|a| a.len()).sum::<usize>() + got.len() - 1;
    assert_eq!(total, 4096, "exactly 4 KiB of argv kept");
    assert_eq!(got[2], args[1], "arguments before the cut are intact");

    let line = agent.wait_for("the exec with 41 arguments", |l| {
        event_of(l, "exec").is_some_and(|e| argv(e).get(1) == Some(&short_tag))
    });
    assert_eq!(argv(&line["event"]).len(), 42);
    assert_ne!(line["event"]["exec"]["argvTruncated"], true);
    agent.stop();
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(marker("dir"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
