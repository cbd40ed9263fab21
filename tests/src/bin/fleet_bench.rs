//! Fleet benchmark (run by `cargo xtask bench fleet`): simulated agents stream alerts to
//! collectors over loopback gRPC, each agent one stream with one alert in flight (it sends
//! the next when the collector acknowledged the last, as the agent's spool does when it
//! has little to send). Stores: SQLite (one collector), PostgreSQL with one collector, and
//! PostgreSQL with two collectors (the agents split between them). For each store and
//! each number of concurrent streams: alerts stored per second, and the median and p99
//! of stream-to-commit latency (alert sent to its acknowledgement, which the collector
//! sends only after the commit). Everything runs on this machine: the load generator, the
//! collectors and the database share its cores.
//!
//! Usage: fleet-bench STREAMS[,STREAMS...] ALERTS_TOTAL

use std::{
    path::Path,
    time::{Duration, Instant},
};

use prost::Message;
use sensor_e2e::{Scratch, collector::Collector, postgres::Postgres};
use sensor_proto::{
    frames::{Frame, FrameCodec, STREAM_PATH},
    v1::{
        AgentIdentity, Alert, Envelope, Hello, Output, ProcessInfo, Severity, agent_message,
        collector_message, envelope, output,
    },
};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Connections being set up at once.
const HANDSHAKES: usize = 64;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// An alert the size of a real one (process, argv, rationale), for `agent`, number `seq`.
fn alert(agent: &str, seq: u64) -> Frame {
    let alert = Alert {
        id: format!("{agent}:{seq}"),
        rule_id: "EPMM-B1".into(),
        title: "Shell or downloader spawned by the web tier".into(),
        severity: Severity::Critical as i32,
        techniques: vec!["T1190".into(), "T1059.004".into()],
        rationale: "Tomcat and the RewriteMap helpers never start shells or downloaders; \
                    injected code does, first thing (CVE-2026-1281/1340)."
            .repeat(3),
        time: Some(sensor_proto::Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        }),
        host: format!("{agent}.epmm.example"),
        agent_id: agent.into(),
        process: Some(ProcessInfo {
            pid: 4242,
            ppid: 1234,
            exe: "/usr/bin/curl".into(),
            argv: vec![
                "curl".into(),
                "-s".into(),
                "http://127.0.0.1:8080/stage2.sh".into(),
                "-o".into(),
                "/tmp/.x".into(),
            ],
            user: "tomcat".into(),
            cwd: "/opt/ivanti/tomcat".into(),
            ..Default::default()
        }),
        count: 1,
        ..Default::default()
    };
    let env = Envelope {
        seq,
        body: Some(envelope::Body::Output(Output {
            item: Some(output::Item::Alert(alert)),
        })),
    };
    Frame::envelope(&env.encode_to_vec())
}

/// One simulated agent: connects (at most [`HANDSHAKES`] at once, as agents' back-off
/// jitter spreads reconnections), says Hello, reports ready and waits for `go`; then
/// sends `n` alerts one at a time; the latency of each.
async fn agent(
    url: String,
    id: String,
    n: u64,
    handshakes: std::sync::Arc<tokio::sync::Semaphore>,
    ready: tokio::sync::mpsc::Sender<()>,
    mut go: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<Duration>> {
    let permit = handshakes.acquire_owned().await?;
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(TIMEOUT)
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("{id}: connect: {e:?}"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Frame>(4);
    tx.send(Frame::message(agent_message::Msg::Hello(Hello {
        identity: Some(AgentIdentity {
            agent_id: id.clone(),
            host: format!("{id}.epmm.example"),
            agent_version: "bench".into(),
            epmm_version: "12.7.0.0".into(),
            ..Default::default()
        }),
        last_seq: 0,
        first_seq: 1,
    })))
    .await?;
    let response = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            tonic::codegen::http::uri::PathAndQuery::from_static(STREAM_PATH),
            FrameCodec,
        )
        .await
        .map_err(|e| anyhow::anyhow!("{id}: open the stream: {e}"))?;
    let mut inbound = response.into_inner();
    // The answer to Hello: where the store stands.
    inbound
        .message()
        .await
        .map_err(|e| anyhow::anyhow!("{id}: the answer to Hello: {e}"))?;
    drop(permit);
    ready.send(()).await?;
    go.wait_for(|g| *g).await?;
    let mut latencies = Vec::with_capacity(n as usize);
    for seq in 1..=n {
        let sent = Instant::now();
        tx.send(alert(&id, seq)).await?;
        loop {
            let message = tokio::time::timeout(TIMEOUT, inbound.message())
                .await
                .map_err(|_| anyhow::anyhow!("{id}: no acknowledgement of {seq}"))?
                .map_err(|e| {
                    anyhow::anyhow!("{id}: waiting for the acknowledgement of {seq}: {e}")
                })?
                .ok_or_else(|| anyhow::anyhow!("{id}: the collector ended the stream"))?;
            if let Some(collector_message::Msg::Ack(ack)) = message.msg
                && ack.seq >= seq
            {
                break;
            }
        }
        latencies.push(sent.elapsed());
    }
    Ok(latencies)
}

struct Result {
    streams: usize,
    alerts: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

/// `streams` agents spread over `urls`, `total` alerts in all.
fn load(collectors: &[Collector], streams: usize, total: usize, tag: &str) -> Result {
    let urls: Vec<String> = collectors.iter().map(|c| c.url("http")).collect();
    eprintln!("fleet-bench: {tag}, {streams} streams");
    let per = (total / streams).max(1) as u64;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut started = Instant::now();
    let mut latencies: Vec<Duration> = runtime.block_on(async {
        let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
        let (ready_tx, mut ready) = tokio::sync::mpsc::channel(streams);
        let (go_tx, go) = tokio::sync::watch::channel(false);
        let tasks: Vec<_> = (0..streams)
            .map(|i| {
                let url = urls[i % urls.len()].clone();
                tokio::spawn(agent(
                    url,
                    format!("bench-{tag}-{streams}-{i}"),
                    per,
                    handshakes.clone(),
                    ready_tx.clone(),
                    go.clone(),
                ))
            })
            .collect();
        drop(ready_tx);
        // Every stream open before the clock starts (a failed one ends the wait early
        // and reports below).
        for _ in 0..streams {
            if ready.recv().await.is_none() {
                break;
            }
        }
        started = Instant::now();
        let _ = go_tx.send(true);
        let mut all = Vec::new();
        for task in tasks {
            match task.await.expect("agent task") {
                Ok(latencies) => all.extend(latencies),
                Err(e) => {
                    for c in collectors {
                        let log = c.log();
                        let tail: Vec<&str> = log
                            .lines()
                            .filter(|l| !l.contains(" INFO ") || l.contains("closing"))
                            .take(30)
                            .collect();
                        eprintln!("collector {}:\n{}", c.url("http"), tail.join("\n"));
                    }
                    panic!("{e:#}")
                }
            }
        }
        all
    });
    let elapsed = started.elapsed();
    latencies.sort();
    Result {
        streams,
        alerts: latencies.len(),
        elapsed,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
    }
}

fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let streams: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "100,1000".into())
        .split(',')
        .map(|s| s.parse().expect("STREAMS: numbers separated by commas"))
        .collect();
    let total: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    raise_nofile();
    let scratch = Scratch::new("fleet-bench");
    // Every stream comes from 127.0.0.1: the per-peer bound must allow them all.
    let limits = ["--max-connections-per-peer", "5000", "--silence", "600"];
    let mut rows = Vec::new();

    let sqlite = scratch.path("c.db");
    for &n in &streams {
        let mut collector = Collector::start(&sqlite, "127.0.0.1:0", &limits);
        let result = load(std::slice::from_ref(&collector), n, total, "sqlite");
        rows.push(("SQLite, 1 collector", result));
        collector.stop();
    }

    let pg = Postgres::start(&scratch.path("pg"));
    let url = pg.url();
    for collectors in [1, 2] {
        for &n in &streams {
            let mut running: Vec<Collector> = (0..collectors)
                .map(|_| Collector::start(Path::new(&url), "127.0.0.1:0", &limits))
                .collect();
            let label = if collectors == 1 {
                "PostgreSQL, 1 collector"
            } else {
                "PostgreSQL, 2 collectors"
            };
            rows.push((label, load(&running, n, total, &format!("pg{collectors}"))));
            for c in &mut running {
                c.stop();
            }
        }
    }
    println!(
        "| store | concurrent streams | alerts | stored alerts/s | stream-to-commit median | p99 |"
    );
    println!("|---|---|---|---|---|---|");
    for (label, r) in &rows {
        println!(
            "| {label} | {} | {} | {:.0} | {:.1} ms | {:.1} ms |",
            r.streams,
            r.alerts,
            r.alerts as f64 / r.elapsed.as_secs_f64(),
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3
        );
    }
}
