//! Tamper signals, end to end: signals aimed at the agent and BPF programs loaded by
//! someone else.

use sensor_e2e::{Agent, event_of, num};

#[test]
fn signal_aimed_at_the_agent_names_the_sender() {
    let mut agent = Agent::start(&[]);
    let target = agent.pid();
    // SIGWINCH: ignored by default, so the agent keeps running.
    // SAFETY: signalling our own child by pid.
    assert_eq!(unsafe { libc::kill(target as i32, libc::SIGWINCH) }, 0);
    let line = agent.wait_for("the signal to the agent", |l| {
        event_of(l, "signal").is_some_and(|e| e["signal"]["signalName"] == "SIGWINCH")
    });
    let ev = &line["event"];
    assert_eq!(num(&ev["pid"]), u64::from(std::process::id()), "the sender");
    assert_eq!(num(&ev["signal"]["targetPid"]), u64::from(target));
    assert_eq!(num(&ev["signal"]["signal"]), libc::SIGWINCH as u64);
    agent.stop();
}

/// Loads the smallest valid BPF program (r0 = 0; exit) as a socket filter.
fn load_bpf_program(name: &[u8]) -> i64 {
    #[repr(C)]
    struct Attr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        rest: [u8; 64],
    }
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let mut attr = Attr {
        prog_type: 1, // BPF_PROG_TYPE_SOCKET_FILTER
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        rest: [0; 64],
    };
    attr.prog_name[..name.len()].copy_from_slice(name);
    // SAFETY: a valid BPF_PROG_LOAD attribute block that outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            5, // BPF_PROG_LOAD
            &attr as *const Attr,
            std::mem::size_of::<Attr>() as u32,
        )
    }
}

#[test]
fn bpf_program_load_by_another_process_is_reported() {
    let mut agent = Agent::start(&[]);
    let fd = load_bpf_program(b"e2e_probe");
    assert!(
        fd >= 0,
        "BPF_PROG_LOAD failed: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: closing the descriptor we got.
    unsafe { libc::close(fd as i32) };
    let line = agent.wait_for("the BPF program load", |l| {
        event_of(l, "bpfLoad").is_some_and(|e| e["bpfLoad"]["progName"] == "e2e_probe")
    });
    assert_eq!(num(&line["event"]["bpfLoad"]["progType"]), 1);
    assert_eq!(num(&line["event"]["pid"]), u64::from(std::process::id()));
    assert_eq!(num(&line["event"]["bpfLoad"]["result"]), fd as u64);
    agent.stop();
}
