//! Delivery benchmark (run by `cargo xtask bench delivery`): the agent streams over mutual
//! TLS to the collector, both syncing to disk as they do in production.
//!
//! 1. Latency: one exec from /tmp at a time (raising EPMM-B17); the time from starting
//!    the process to the collector printing the stored alert. Median and p99.
//! 2. Throughput: a burst of execs, each raising an alert; alerts stored per second, and
//!    the burst's duration with and without the agent and collector running (ratio).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use sensor_e2e::{
    Agent, Scratch,
    collector::{Certs, Collector, TmpProgram, b17_of},
};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn burst(exe: &str, n: u32) -> Duration {
    let start = Instant::now();
    let status = Command::new("/bin/sh")
        .args([
            "-c",
            &format!("i=0; while [ $i -lt {n} ]; do {exe}; i=$((i+1)); done"),
        ])
        .status()
        .expect("run the burst");
    assert!(status.success());
    start.elapsed()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let samples: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let burst_n: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);

    let certs = Certs::new();
    let scratch = Scratch::new("delivery-bench");
    let db = scratch.path("c.db");
    let tls = certs.collector_args();
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let prog = TmpProgram::new("bench");

    // Baseline burst: nothing running.
    let baseline = burst(prog.exe(), burst_n);

    let mut collector = Collector::start(&db, "127.0.0.1:0", &tls);
    let url = collector.url("https");
    let spool = scratch.path("spool");
    let mut agent_args: Vec<String> = [
        "run",
        "--collapse",
        "0",
        "--collector",
        &url,
        "--spool",
        spool.to_str().unwrap(),
        // Under mutual TLS the agent id is a name of the agent's certificate.
        "--agent-id",
        "agent-a",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    agent_args.extend(certs.agent_args("agent-a"));
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let mut agent = Agent::start_with(&agent_args);

    // Latency, one alert at a time.
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let start = Instant::now();
        prog.run();
        collector.wait_alerts(i + 1, Duration::from_secs(30), |l| b17_of(l, prog.exe()));
        latencies.push(start.elapsed());
    }
    latencies.sort();

    // Throughput: a burst of alerts.
    let start = Instant::now();
    let with_sensor = burst(prog.exe(), burst_n);
    collector.wait_alerts(samples + burst_n as usize, Duration::from_secs(300), |l| {
        b17_of(l, prog.exe())
    });
    let stored_in = start.elapsed();
    agent.stop();
    collector.stop();

    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| exec -> stored alert, median ({samples} samples) | {:.1} ms |",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3
    );
    println!(
        "| exec -> stored alert, p99 | {:.1} ms |",
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "| burst of {burst_n} alerting execs, stored in | {:.2} s ({:.0} alerts/s) |",
        stored_in.as_secs_f64(),
        f64::from(burst_n) / stored_in.as_secs_f64()
    );
    println!(
        "| the burst's own duration: baseline / with agent+collector | {:.2} s / {:.2} s (ratio {:.2}) |",
        baseline.as_secs_f64(),
        with_sensor.as_secs_f64(),
        with_sensor.as_secs_f64() / baseline.as_secs_f64()
    );
}
