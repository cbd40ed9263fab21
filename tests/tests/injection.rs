//! Fileless execution and injection into other processes, end to end.

use std::{
    ffi::CString,
    os::unix::process::CommandExt,
    process::{Child, Command},
};

use sensor_e2e::{Agent, event_of, marker, num};

/// Runs /bin/true from a memfd: memfd_create, copy, execveat(fd, "", AT_EMPTY_PATH).
/// Everything the child does after fork is a raw syscall on data prepared before it.
fn exec_from_memfd(name: &str) -> std::process::ExitStatus {
    let memfd_name = CString::new(name).unwrap();
    let source = CString::new("/bin/true").unwrap();
    let empty = CString::new("").unwrap();
    let arg0 = CString::new("memfd-payload").unwrap();
    let mut cmd = Command::new("/bin/false");
    // SAFETY: only async-signal-safe syscalls after fork; all pointers were made before it.
    unsafe {
        cmd.pre_exec(move || {
            // Arrays on the stack: no allocation after fork.
            let argv = [arg0.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null::<libc::c_char>()];
            let mfd = libc::memfd_create(memfd_name.as_ptr(), 0);
            let src = libc::open(source.as_ptr(), libc::O_RDONLY);
            if mfd < 0 || src < 0 {
                return Err(std::io::Error::last_os_error());
            }
            loop {
                let n = libc::sendfile(mfd, src, std::ptr::null_mut(), 1 << 20);
                if n <= 0 {
                    break;
                }
            }
            libc::syscall(
                libc::SYS_execveat,
                mfd,
                empty.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            Err(std::io::Error::last_os_error())
        });
    }
    cmd.status().unwrap()
}

#[test]
fn memfd_execution_is_flagged_from_the_kernel_view() {
    let mut agent = Agent::start(&[]);
    let name = marker("memfd");
    let status = exec_from_memfd(&name);
    assert!(
        status.success(),
        "the memfd copy of /bin/true ran: {status}"
    );

    let create = agent.wait_for("memfd_create", |l| {
        event_of(l, "memfdCreate").is_some_and(|e| e["memfdCreate"]["name"] == name.as_str())
    });
    let pid = num(&create["event"]["pid"]);
    let exec = agent.wait_for("the exec of the memfd", |l| {
        event_of(l, "exec").is_some_and(|e| num(&e["pid"]) == pid)
    });
    let exec = &exec["event"]["exec"];
    assert_eq!(exec["exeMemfd"], true, "{exec}");
    assert_eq!(exec["exeDeleted"], true);
    assert_eq!(exec["execveat"], true);
    assert_eq!(exec["exe"], format!("/memfd:{name}"));
    assert_eq!(exec["argv"][0], "memfd-payload");
    agent.stop();
}

/// A `sleep` child to inject into, and a writable address in it.
fn victim() -> (Child, usize) {
    let child = Command::new("/bin/sleep").arg("30").spawn().unwrap();
    let pid = child.id();
    // Bounded wait for the exec to replace the forked image.
    for _ in 0..200 {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe.to_string_lossy().ends_with("sleep") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps
        .lines()
        .find(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with("rw"))
        })
        .expect("a writable mapping");
    let start = usize::from_str_radix(line.split('-').next().unwrap(), 16).unwrap();
    (child, start)
}

#[test]
fn ptrace_attach_process_vm_writev_and_proc_mem() {
    let mut agent = Agent::start(&[]);
    let (mut child, addr) = victim();
    let target = child.id() as i32;

    // SAFETY: tracing and writing into our own child, with its own bytes written back.
    unsafe {
        assert_eq!(libc::ptrace(libc::PTRACE_ATTACH, target, 0, 0), 0);
        let mut status = 0;
        libc::waitpid(target, &mut status, 0);
        let mut word = [0u8; 8];
        let local = libc::iovec {
            iov_base: word.as_mut_ptr().cast(),
            iov_len: 8,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: 8,
        };
        assert_eq!(libc::process_vm_readv(target, &local, 1, &remote, 1, 0), 8);
        assert_eq!(libc::process_vm_writev(target, &local, 1, &remote, 1, 0), 8);
        libc::ptrace(libc::PTRACE_DETACH, target, 0, 0);
    }
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{target}/mem"))
        .unwrap();
    drop(mem);
    child.kill().unwrap();
    let _ = child.wait();

    let me = u64::from(std::process::id());
    let attach = agent.wait_for("PTRACE_ATTACH", |l| {
        event_of(l, "ptrace").is_some_and(|e| num(&e["ptrace"]["targetPid"]) == target as u64)
    });
    let p = &attach["event"]["ptrace"];
    assert_eq!(p["request"], "PTRACE_ATTACH");
    assert_eq!(num(&attach["event"]["pid"]), me);
    assert_eq!(p["error"], serde_json::Value::Null, "it succeeded");

    let write = agent.wait_for("process_vm_writev", |l| {
        event_of(l, "processVmWrite")
            .is_some_and(|e| num(&e["processVmWrite"]["targetPid"]) == target as u64)
    });
    assert_eq!(num(&write["event"]["processVmWrite"]["bytes"]), 8);
    assert_eq!(num(&write["event"]["pid"]), me);

    let open = agent.wait_for("/proc/PID/mem opened for writing", |l| {
        event_of(l, "procMemWrite")
            .is_some_and(|e| num(&e["procMemWrite"]["targetPid"]) == target as u64)
    });
    assert_eq!(
        open["event"]["procMemWrite"]["path"],
        format!("/proc/{target}/mem")
    );
    agent.stop();
}
