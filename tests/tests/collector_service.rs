//! The collector as a service: its configuration file, and the systemd notification
//! protocol its unit relies on (`Type=notify`, `WatchdogSec`), spoken to a notify socket
//! this test binds.

use std::{
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sensor_e2e::{
    Scratch,
    collector::{collector_bin, free_port},
};

#[test]
fn the_collector_reads_its_file_and_tells_systemd_it_is_ready_and_alive() {
    let dir = Scratch::new("collector-service");
    let port = free_port();
    let config = dir.path("collector.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndb = \"{}\"\nsilence_seconds = 30\nretain_days = 30\n",
            dir.path("c.db").display()
        ),
    )
    .unwrap();
    let socket_path = dir.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // As systemd does for a service's main process: WATCHDOG_PID is its own pid (the
    // shell's, which exec keeps).
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" --config \"$1\"")
        .arg(collector_bin())
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env("SENSOR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline
        && !(messages.iter().any(|m: &String| m.contains("READY=1"))
            && messages.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let ready = messages.iter().any(|m| m.contains("READY=1"));
    let pings = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    // The address came from the file.
    let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    // SAFETY: SIGTERM to the collector this test started, by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(ready, "no READY=1: {messages:?}");
    assert!(pings >= 2, "fewer than two watchdog pings: {messages:?}");
    assert!(
        listening,
        "not listening on the file's address 127.0.0.1:{port}"
    );
    assert!(stopping, "no STOPPING=1 at SIGTERM");
    assert!(status.success(), "{status}");

    // A bad file: the collector does not start and says where.
    std::fs::write(&config, "listen = \"127.0.0.1:1\"\nretain = 3\n").unwrap();
    let out = Command::new(collector_bin())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2:1: unknown field `retain`", config.display())),
        "{err}"
    );
}
