//! Delivery end to end: real agents (real probes) stream alerts to the real collector over
//! loopback; the collector is stopped, agents are killed, certificates are wrong, garbage
//! is sent, spools overflow. Every alert must be stored exactly once, and every loss said.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use prost::Message;
use sensor_e2e::{
    Agent, Scratch, alert_of,
    collector::{
        Certs, Collector, TmpProgram, agent_args, alert_pid, b17_of, free_port, query, stored_pids,
        wait_agent_row,
    },
    num,
};
use sensor_proto::{
    frames::{Frame, FrameCodec, STREAM_PATH},
    v1::{AgentIdentity, Alert, Envelope, Hello, Output, agent_message, envelope, output},
};

const STORE_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn alerts_raised_while_the_collector_is_down_are_stored_exactly_once() {
    let scratch = Scratch::new("deliver-down");
    let db = scratch.path("c.db");
    let spool = scratch.path("spool");
    let mut collector = Collector::start(&db, "127.0.0.1:0", &[]);
    let port = collector.addr.port();
    let url = collector.url("http");
    let mut agent = Agent::start_with(&agent_args(&url, spool.to_str().unwrap(), "e2e-down"));
    let prog = TmpProgram::new("down");
    let mut pids = BTreeSet::from([u64::from(prog.run())]);
    collector.wait_alerts(1, STORE_TIMEOUT, |l| b17_of(l, prog.exe()));
    collector.stop();

    // Thirty seconds without a collector, alerts raised all along.
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(30) {
        pids.insert(u64::from(prog.run()));
        std::thread::sleep(Duration::from_secs(3));
    }
    let mut collector = Collector::start(&db, &format!("127.0.0.1:{port}"), &[]);
    pids.insert(u64::from(prog.run()));
    // The agent raised each one...
    for pid in &pids {
        agent.wait_for("a B17 alert", |l| {
            b17_of(l, prog.exe()) && alert_pid(l) == *pid
        });
    }
    // ...and the restarted collector receives every one it did not have, once.
    collector.wait_alerts(pids.len() - 1, STORE_TIMEOUT, |l| b17_of(l, prog.exe()));
    assert_eq!(stored_pids(&db, "e2e-down", prog.exe()), pids);
    assert!(
        agent.log().contains("collector unreachable"),
        "the outage is logged:\n{}",
        agent.log()
    );
    let row = wait_agent_row(
        &db,
        "e2e-down",
        "every number accounted for",
        STORE_TIMEOUT,
        |r| r["outstanding"] == 0 && num(&r["lastSeq"]) > 0,
    );
    assert_eq!(row["gap"], 0);
    agent.stop();
}

/// Two collectors given in order: the first is SIGKILLed mid-stream, the agent fails over
/// to the second, and returns to the first once it is back. Every alert is stored, none
/// twice in a store (each collector has its own database here; a shared database is
/// issue 16's PostgreSQL store).
#[test]
fn an_agent_fails_over_to_the_next_collector_and_returns_to_the_first() {
    let scratch = Scratch::new("deliver-failover");
    let (db_a, db_b) = (scratch.path("a.db"), scratch.path("b.db"));
    let spool = scratch.path("spool");
    let mut first = Collector::start(&db_a, "127.0.0.1:0", &[]);
    let port_a = first.addr.port();
    let mut second = Collector::start(&db_b, "127.0.0.1:0", &[]);
    let (url_a, url_b) = (first.url("http"), second.url("http"));
    let mut args = agent_args(&url_a, spool.to_str().unwrap(), "e2e-failover");
    args.extend(["--collector", url_b.as_str()]);
    let mut agent = Agent::start_with(&args);
    let prog = TmpProgram::new("failover");
    let mut pids = BTreeSet::from([u64::from(prog.run())]);
    first.wait_alerts(1, STORE_TIMEOUT, |l| b17_of(l, prog.exe()));

    // The first collector dies without a word; the second takes over.
    // SAFETY: SIGKILL to the collector this test started, by its pid.
    unsafe { libc::kill(first.pid() as i32, libc::SIGKILL) };
    for _ in 0..3 {
        pids.insert(u64::from(prog.run()));
    }
    second.wait_alerts(3, STORE_TIMEOUT, |l| b17_of(l, prog.exe()));
    assert!(
        agent.log().contains("failing over to the next collector"),
        "{}",
        agent.log()
    );

    // The first comes back (same port, same database): the agent returns to it.
    let mut first = Collector::start(&db_a, &format!("127.0.0.1:{port_a}"), &[]);
    agent.wait_for_log("returning to the first collector", STORE_TIMEOUT);
    let last = u64::from(prog.run());
    pids.insert(last);
    first.wait_alerts(1, STORE_TIMEOUT, |l| {
        b17_of(l, prog.exe()) && alert_pid(l) == last
    });

    // Every alert in one store or the other; none twice in either (stored_pids checks).
    let (in_a, in_b) = (
        stored_pids(&db_a, "e2e-failover", prog.exe()),
        stored_pids(&db_b, "e2e-failover", prog.exe()),
    );
    let union: BTreeSet<u64> = in_a.union(&in_b).copied().collect();
    assert_eq!(union, pids, "a: {in_a:?}, b: {in_b:?}");
    assert!(in_a.contains(&last), "back on the first: {in_a:?}");
    agent.stop();
    second.stop();
    first.stop();
}

#[test]
fn an_agent_killed_mid_stream_and_restarted_loses_and_duplicates_nothing() {
    let scratch = Scratch::new("deliver-kill");
    let db = scratch.path("c.db");
    let spool = scratch.path("spool");
    let mut collector = Collector::start(&db, "127.0.0.1:0", &[]);
    let url = collector.url("http");
    let args = agent_args(&url, spool.to_str().unwrap(), "e2e-kill");
    let prog = TmpProgram::new("kill");

    let mut first = Agent::start_with(&args);
    let mut raised = BTreeSet::new();
    for _ in 0..12 {
        raised.insert(u64::from(prog.run()));
    }
    // Once the agent has printed them they are in its spool file; kill it at once, while
    // some are most likely unsent or unacknowledged.
    for pid in &raised {
        first.wait_for("a B17 alert", |l| {
            b17_of(l, prog.exe()) && alert_pid(l) == *pid
        });
    }
    first.kill();
    let before_restart = stored_pids(&db, "e2e-kill", prog.exe()).len();

    let mut second = Agent::start_with(&args);
    let mut later = BTreeSet::new();
    for _ in 0..5 {
        later.insert(u64::from(prog.run()));
    }
    for pid in &later {
        second.wait_for("a B17 alert", |l| {
            b17_of(l, prog.exe()) && alert_pid(l) == *pid
        });
    }
    raised.extend(later);
    collector.wait_alerts(raised.len(), STORE_TIMEOUT, |l| b17_of(l, prog.exe()));
    assert_eq!(
        stored_pids(&db, "e2e-kill", prog.exe()),
        raised,
        "{before_restart} were stored before the restart"
    );
    // The collector printed each alert once, whatever was resent.
    let printed = collector.wait_alerts(raised.len(), STORE_TIMEOUT, |l| b17_of(l, prog.exe()));
    assert_eq!(
        printed.len(),
        raised.len(),
        "printed once each: {printed:#?}"
    );
    wait_agent_row(
        &db,
        "e2e-kill",
        "every number accounted for",
        STORE_TIMEOUT,
        |r| r["outstanding"] == 0,
    );
    second.stop();
}

#[test]
fn mutual_tls_serves_two_agents_and_refuses_a_foreign_ca_and_an_impostor() {
    let certs = Certs::new();
    let scratch = Scratch::new("deliver-tls");
    let db = scratch.path("c.db");
    let collector_args = certs.collector_args();
    let collector_args: Vec<&str> = collector_args.iter().map(String::as_str).collect();
    let mut collector = Collector::start(&db, "127.0.0.1:0", &collector_args);
    let url = collector.url("https");

    let start = |id: &str, files: &str| {
        let spool = scratch.path(&format!("spool-{id}"));
        let mut args: Vec<String> = agent_args(&url, spool.to_str().unwrap(), id)
            .into_iter()
            .map(str::to_owned)
            .collect();
        args.extend(certs.agent_args(files));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start_with(&args)
    };
    let mut a = start("agent-a", "agent-a");
    let mut b = start("agent-b", "agent-b");
    let mut rogue = start("agent-r", "rogue");
    // A valid certificate, but another agent's name: an agent speaks only for itself.
    let mut impostor = start("agent-x", "agent-a");

    let prog = TmpProgram::new("tls");
    let mut pids = BTreeSet::new();
    for _ in 0..3 {
        pids.insert(u64::from(prog.run()));
    }
    // Both agents see every exec and stream concurrently over mutual TLS.
    collector.wait_alerts(2 * pids.len(), STORE_TIMEOUT, |l| b17_of(l, prog.exe()));
    assert_eq!(stored_pids(&db, "agent-a", prog.exe()), pids);
    assert_eq!(stored_pids(&db, "agent-b", prog.exe()), pids);

    // The agent whose certificate comes from another CA is refused: it raised the same
    // alerts, nothing of it is stored, and it says why it cannot deliver.
    for pid in &pids {
        rogue.wait_for("a B17 alert", |l| {
            b17_of(l, prog.exe()) && alert_pid(l) == *pid
        });
    }
    rogue.wait_for_log("collector unreachable", STORE_TIMEOUT);
    let agents = query("agents", &db, &["--json"]);
    assert!(
        agents.iter().all(|r| r["agentId"] != "agent-r"),
        "the foreign-CA agent got through: {agents:#?}"
    );
    assert!(stored_pids(&db, "agent-r", prog.exe()).is_empty());

    let refused = |log: String| {
        log.lines().any(|l| {
            l.contains("agent-x") && l.contains("is not a DNS name of the client certificate")
        })
    };
    let deadline = Instant::now() + STORE_TIMEOUT;
    while !(refused(impostor.log()) && refused(collector.log())) {
        assert!(
            Instant::now() < deadline,
            "the impostor was not refused with the reason:\n{}\n{}",
            impostor.log(),
            collector.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let agents = query("agents", &db, &["--json"]);
    assert!(
        agents.iter().all(|r| r["agentId"] != "agent-x"),
        "the impostor got through: {agents:#?}"
    );
    assert!(stored_pids(&db, "agent-x", prog.exe()).is_empty());
    for agent in [&mut a, &mut b, &mut rogue, &mut impostor] {
        agent.stop();
    }
}

/// Talks gRPC to the collector directly, as a broken or hostile client would.
async fn raw_stream(url: &str, frames: Vec<Frame>) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let response = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(frames)),
            tonic::codegen::http::uri::PathAndQuery::from_static(STREAM_PATH),
            FrameCodec,
        )
        .await?;
    let mut inbound = response.into_inner();
    // Read until the collector ends the stream (bounded: the collector closes on error).
    tokio::time::timeout(Duration::from_secs(20), async {
        while inbound.message().await?.is_some() {}
        Ok(())
    })
    .await
    .map_err(|_| tonic::Status::deadline_exceeded("the collector kept the stream open"))?
}

fn hello(id: &str) -> Frame {
    Frame::message(agent_message::Msg::Hello(Hello {
        identity: Some(AgentIdentity {
            agent_id: id.into(),
            ..Default::default()
        }),
        last_seq: 1,
        first_seq: 1,
    }))
}

#[test]
fn garbage_and_oversized_messages_are_refused_and_other_agents_still_served() {
    let scratch = Scratch::new("deliver-garbage");
    let db = scratch.path("c.db");
    let spool = scratch.path("spool");
    let mut collector = Collector::start(&db, "127.0.0.1:0", &[]);
    let url = collector.url("http");
    let mut agent = Agent::start_with(&agent_args(&url, spool.to_str().unwrap(), "e2e-good"));
    let prog = TmpProgram::new("garbage");
    prog.run();
    collector.wait_alerts(1, STORE_TIMEOUT, |l| b17_of(l, prog.exe()));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Not HTTP/2 at all.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(collector.addr)
            .await
            .unwrap();
        tcp.write_all(&[0x16; 4096]).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "the collector keeps a garbage connection open"
        );

        // gRPC carrying bytes that are no protobuf message.
        let garbage = Frame(bytes::Bytes::from_static(
            b"\xff\xff\xff\xff\xff\xff\xff\xff\x01garbage",
        ));
        let err = raw_stream(&url, vec![garbage]).await.unwrap_err();
        assert_ne!(err.code(), tonic::Code::Ok);

        // An envelope before Hello.
        let early = Frame::envelope(&Envelope { seq: 1, body: None }.encode_to_vec());
        let err = raw_stream(&url, vec![early]).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

        // An 8 MiB alert after a good Hello.
        let huge = Envelope {
            seq: 1,
            body: Some(envelope::Body::Output(Output {
                item: Some(output::Item::Alert(Alert {
                    title: "x".repeat(8 << 20),
                    ..Default::default()
                })),
            })),
        };
        let err = raw_stream(
            &url,
            vec![hello("e2e-huge"), Frame::envelope(&huge.encode_to_vec())],
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");

        // A malformed agent id.
        let err = raw_stream(&url, vec![hello("bad id; drop table")])
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    });
    assert!(
        query("alerts", &db, &["--agent", "e2e-huge"]).is_empty(),
        "nothing of the oversized stream is stored"
    );

    // The real agent's stream was not disturbed: its next alert arrives.
    let pid = u64::from(prog.run());
    collector.wait_alerts(2, STORE_TIMEOUT, |l| b17_of(l, prog.exe()));
    assert!(stored_pids(&db, "e2e-good", prog.exe()).contains(&pid));
    assert!(
        !collector
            .log()
            .contains("agent stream closed agent=e2e-good"),
        "the good agent's stream was closed:\n{}",
        collector.log()
    );
    agent.stop();
}

#[test]
fn a_full_spool_sheds_events_first_and_reports_exactly_what_it_shed() {
    let scratch = Scratch::new("deliver-shed");
    let db = scratch.path("c.db");
    let spool = scratch.path("spool");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut args = agent_args(&url, spool.to_str().unwrap(), "e2e-shed");
    args.extend(["--send-events", "--spool-max-mib", "1"]);
    let mut agent = Agent::start_with(&args);
    let prog = TmpProgram::new("shed");
    let mut pids = BTreeSet::new();
    for _ in 0..3 {
        pids.insert(u64::from(prog.run()));
    }
    // About 18,000 events: about twice what 1 MiB holds.
    let status = std::process::Command::new("/bin/sh")
        .args([
            "-c",
            "i=0; while [ $i -lt 6000 ]; do /bin/true; i=$((i+1)); done",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    for _ in 0..2 {
        pids.insert(u64::from(prog.run()));
    }
    for pid in &pids {
        agent.wait_for("a B17 alert", |l| {
            b17_of(l, prog.exe()) && alert_pid(l) == *pid
        });
    }
    agent.wait_for_log("spool full", STORE_TIMEOUT);

    let mut collector = Collector::start(&db, &format!("127.0.0.1:{port}"), &[]);
    collector.wait_alerts(pids.len(), STORE_TIMEOUT, |l| b17_of(l, prog.exe()));
    assert_eq!(
        stored_pids(&db, "e2e-shed", prog.exe()),
        pids,
        "events go first: every alert kept"
    );
    // What the agent logged it shed, what its heartbeat reports, and what its Shed records
    // declared to the collector are the same numbers, and nothing else is missing.
    let row = wait_agent_row(
        &db,
        "e2e-shed",
        "shed accounted and nothing outstanding",
        STORE_TIMEOUT,
        |r| r["outstanding"] == 0 && num(&r["shed"]) > 0 && r["shed"] == r["shedReported"],
    );
    let logged: u64 = agent
        .log()
        .lines()
        .filter(|l| l.contains("spool full"))
        .map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            field("events=") + field("alerts=")
        })
        .sum();
    assert_eq!(num(&row["shed"]), logged, "row {row}");
    assert!(
        num(&row["events"]) > 0,
        "the events that fit were delivered: {row}"
    );
    agent.stop();
    // The operator was told too: SELF-SHED alerts, whose counts add up to the same number.
    let told: u64 = agent
        .collect(Duration::from_millis(100), |l| {
            alert_of(l, "SELF-SHED").is_some()
        })
        .iter()
        .map(|l| {
            let details = &l["alert"]["details"];
            assert_eq!(num(&details["shed_alerts"]), 0, "alerts kept: {l}");
            num(&details["shed_events"])
        })
        .sum();
    assert_eq!(told, logged, "SELF-SHED counts");
}
