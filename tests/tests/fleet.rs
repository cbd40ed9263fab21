//! The fleet end to end: two collectors share one PostgreSQL database (a server of the
//! test's own, Debian's, on loopback); one real agent (real probes) is given both. The
//! first collector is killed mid-stream, the database is restarted mid-stream: every
//! alert is stored exactly once, the agent has one consistent row, and nothing is
//! acknowledged that was not committed (an alert acknowledged and then lost would be
//! missing here: the agent drops what was acknowledged).

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use sensor_e2e::{
    Agent, Scratch,
    collector::{
        Collector, TmpProgram, agent_args, alert_pid, b17_of, free_port, query, stored_pids,
        wait_agent_row,
    },
    postgres::Postgres,
    rsyslog::{Rsyslog, received, stored_ids, wait_forwarded},
};
use serde_json::Value;

const STORE_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the database holds exactly `pids` for `exe` (each once).
fn wait_stored(url: &str, agent: &str, exe: &str, pids: &BTreeSet<u64>) {
    let deadline = Instant::now() + STORE_TIMEOUT;
    loop {
        let stored = stored_pids(Path::new(url), agent, exe);
        if &stored == pids {
            return;
        }
        assert!(
            stored.is_subset(pids),
            "stored alerts nobody raised: {stored:?} vs {pids:?}"
        );
        assert!(
            Instant::now() < deadline,
            "stored {} of {}: missing {:?}",
            stored.len(),
            pids.len(),
            pids.difference(&stored).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits until the agent's row says every number is accounted for, and checks the agent
/// has that one row only; returns it.
fn wait_consistent_row(url: &str, agent: &str) -> Value {
    let db = Path::new(url);
    let row = wait_agent_row(
        db,
        agent,
        "every number accounted for",
        STORE_TIMEOUT,
        |r| r["outstanding"] == 0 && r["lastSeq"].as_u64() == r["contiguousSeq"].as_u64(),
    );
    let rows = query("agents", db, &["--json"]);
    let rows: Vec<&Value> = rows.iter().filter(|r| r["agentId"] == agent).collect();
    assert_eq!(rows.len(), 1, "one row per agent: {rows:#?}");
    row
}

#[test]
fn two_collectors_on_postgres_store_every_alert_once_when_the_first_is_killed() {
    let scratch = Scratch::new("fleet-kill");
    let pg = Postgres::start(&scratch.path("pg"));
    let url = pg.url();
    let db = Path::new(&url);
    let mut first = Collector::start(db, "127.0.0.1:0", &[]);
    let port_a = first.addr.port();
    let mut second = Collector::start(db, "127.0.0.1:0", &[]);
    let (url_a, url_b) = (first.url("http"), second.url("http"));
    let spool = scratch.path("spool");
    let mut args = agent_args(&url_a, spool.to_str().unwrap(), "e2e-fleet-kill");
    args.extend(["--collector", url_b.as_str()]);
    let mut agent = Agent::start_with(&args);
    let prog = TmpProgram::new("fleet-kill");

    let mut pids = BTreeSet::new();
    for _ in 0..5 {
        pids.insert(u64::from(prog.run()));
    }
    first.wait_alerts(1, STORE_TIMEOUT, |l| b17_of(l, prog.exe()));
    // SIGKILL mid-stream: alerts keep coming while the agent fails over.
    // SAFETY: SIGKILL to the collector this test started, by its pid.
    unsafe { libc::kill(first.pid() as i32, libc::SIGKILL) };
    for _ in 0..10 {
        pids.insert(u64::from(prog.run()));
    }
    wait_stored(&url, "e2e-fleet-kill", prog.exe(), &pids);
    assert!(
        agent.log().contains("failing over to the next collector"),
        "{}",
        agent.log()
    );

    // The first comes back on its port: the agent returns to it, same database.
    let mut first = Collector::start(db, &format!("127.0.0.1:{port_a}"), &[]);
    agent.wait_for_log("returning to the first collector", STORE_TIMEOUT);
    let last = u64::from(prog.run());
    pids.insert(last);
    first.wait_alerts(1, STORE_TIMEOUT, |l| {
        b17_of(l, prog.exe()) && alert_pid(l) == last
    });
    wait_stored(&url, "e2e-fleet-kill", prog.exe(), &pids);
    let row = wait_consistent_row(&url, "e2e-fleet-kill");
    assert_eq!(row["gap"], 0, "{row:#}");
    assert_eq!(row["shed"], 0, "{row:#}");
    assert!(
        row["alerts"].as_u64().unwrap() >= pids.len() as u64,
        "{row:#}"
    );
    agent.stop();
    second.stop();
    first.stop();
}

#[test]
fn two_collectors_on_postgres_store_every_alert_once_across_a_database_restart() {
    let scratch = Scratch::new("fleet-dbrestart");
    let mut pg = Postgres::start(&scratch.path("pg"));
    let url = pg.url();
    let db = Path::new(&url);
    let mut first = Collector::start(db, "127.0.0.1:0", &[]);
    let mut second = Collector::start(db, "127.0.0.1:0", &[]);
    let (url_a, url_b) = (first.url("http"), second.url("http"));
    let spool = scratch.path("spool");
    let mut args = agent_args(&url_a, spool.to_str().unwrap(), "e2e-fleet-db");
    args.extend(["--collector", url_b.as_str()]);
    let mut agent = Agent::start_with(&args);
    let prog = TmpProgram::new("fleet-db");

    let mut pids = BTreeSet::new();
    for _ in 0..5 {
        pids.insert(u64::from(prog.run()));
    }
    first.wait_alerts(5, STORE_TIMEOUT, |l| b17_of(l, prog.exe()));
    // The database goes away mid-stream (fast shutdown: what was not committed is rolled
    // back) while alerts keep coming, and comes back.
    for i in 0..10 {
        pids.insert(u64::from(prog.run()));
        if i == 2 {
            pg.stop();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    pg.start_again();
    for _ in 0..3 {
        pids.insert(u64::from(prog.run()));
    }
    wait_stored(&url, "e2e-fleet-db", prog.exe(), &pids);
    let logs = format!("{}\n{}", first.log(), second.log());
    assert!(
        logs.contains("cannot store a batch") || logs.contains("cannot connect"),
        "no collector noticed the database was gone:\n{logs}"
    );
    let row = wait_consistent_row(&url, "e2e-fleet-db");
    assert_eq!(row["gap"], 0, "{row:#}");
    // Both collectors keep serving on the restarted database.
    assert!(!first.exited() && !second.exited());
    agent.stop();
    second.stop();
    first.stop();
}

/// Waits until rsyslog wrote each stored B17 alert of `exe` (at least `n` of them), and
/// checks it wrote each exactly once.
fn wait_forwarded_once(url: &str, exe: &str, out: &Path, n: usize) {
    let db = Path::new(url);
    let got = wait_forwarded(db, exe, out, n, STORE_TIMEOUT);
    for id in stored_ids(db, exe) {
        assert_eq!(got[&id], 1, "{id} received {} times: {got:?}", got[&id]);
    }
}

/// Both collectors are configured to forward to the same SIEM: one forwards (it holds the
/// target's lock in the database), the other stands by, so each alert arrives once. The
/// forwarding one stops; the other takes over from the shared cursor.
#[test]
fn a_fleet_forwards_each_alert_once_and_hands_forwarding_over() {
    let scratch = Scratch::new("fleet-forward");
    let pg = Postgres::start(&scratch.path("pg"));
    let url = pg.url();
    let db = Path::new(&url);
    let out = scratch.path("siem.log");
    let port = free_port();
    let _rsyslog = Rsyslog::start(&scratch, port, &out);
    let target = format!("tcp://127.0.0.1:{port}");
    let forward = ["--forward-syslog", target.as_str()];
    let mut collectors = [
        Collector::start(db, "127.0.0.1:0", &forward),
        Collector::start(db, "127.0.0.1:0", &forward),
    ];
    let (url_a, url_b) = (collectors[0].url("http"), collectors[1].url("http"));
    let spool = scratch.path("spool");
    let mut args = agent_args(&url_a, spool.to_str().unwrap(), "e2e-fleet-forward");
    args.extend(["--collector", url_b.as_str()]);
    let mut agent = Agent::start_with(&args);
    let prog = TmpProgram::new("fleet-forward");
    for _ in 0..5 {
        prog.run();
    }
    wait_forwarded_once(&url, prog.exe(), &out, 5);
    let forwarding = |c: &Collector| c.log().contains("forwarding alerts to syslog");
    let holder = collectors
        .iter()
        .position(forwarding)
        .expect("one collector forwards");
    let other = 1 - holder;
    assert!(
        !forwarding(&collectors[other]),
        "both collectors forward:\n{}",
        collectors[other].log()
    );
    assert!(
        collectors[other].log().contains("standing by"),
        "{}",
        collectors[other].log()
    );

    collectors[holder].stop();
    for _ in 0..5 {
        prog.run();
    }
    wait_forwarded_once(&url, prog.exe(), &out, 10);
    assert!(
        forwarding(&collectors[other]),
        "the standby took over:\n{}",
        collectors[other].log()
    );
    agent.stop();
}

/// Two collectors' transactions take alert row numbers in one order and commit in
/// another. A forwarder that followed row numbers would pass a row still uncommitted and
/// never send it; ours waits for it. Re-enacted with psql: a transaction inserts an alert
/// and stays open while a later one inserts and commits another.
#[test]
fn forwarding_on_postgres_never_skips_a_row_committed_late() {
    use std::io::Write;
    use std::process::Stdio;
    let scratch = Scratch::new("fleet-order");
    let pg = Postgres::start(&scratch.path("pg"));
    let url = pg.url();
    let out = scratch.path("siem.log");
    let port = free_port();
    let _rsyslog = Rsyslog::start(&scratch, port, &out);
    let target = format!("tcp://127.0.0.1:{port}");
    let mut collector = Collector::start(
        Path::new(&url),
        "127.0.0.1:0",
        &["--forward-syslog", &target],
    );
    let insert = |seq: u32| {
        format!(
            "INSERT INTO alerts (agent_id, seq, time_ns, rule_id, severity, title, host, json) \
             VALUES ('order', {seq}, 1769766000000000000, 'EPMM-B1', 4, 't', 'h', \
             '{{\"alert\":{{\"id\":\"order:{seq}\"}}}}');"
        )
    };
    let mut open = pg
        .client()
        .arg("-q")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run psql");
    let mut stdin = open.stdin.take().unwrap();
    writeln!(stdin, "BEGIN; {}", insert(1)).unwrap();
    stdin.flush().unwrap();
    // The open transaction has its row (the lower number) before the next one commits.
    let deadline = Instant::now() + STORE_TIMEOUT;
    while pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'")
        != "1"
    {
        assert!(
            Instant::now() < deadline,
            "psql did not open its transaction"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    pg.psql(&insert(2));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        received(&out).is_empty(),
        "forwarded past a transaction still open: {:?}",
        received(&out)
    );
    writeln!(stdin, "COMMIT;").unwrap();
    drop(stdin);
    assert!(open.wait().unwrap().success());
    let deadline = Instant::now() + STORE_TIMEOUT;
    loop {
        let got = received(&out);
        if got.len() == 2 {
            assert!(got.values().all(|n| *n == 1), "{got:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rsyslog has {got:?}; the collector:\n{}",
            collector.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    collector.stop();
}

/// TLS to the database: a server that takes only TLS connections is reached with
/// `--db-ca` (its certificate chains to that CA and names the host); without it, or with
/// another CA, the collector refuses to start and says why.
#[test]
fn the_collector_reaches_a_tls_only_database_with_the_right_ca_only() {
    use sensor_e2e::collector::{Certs, collector_bin};
    let certs = Certs::new();
    let scratch = Scratch::new("fleet-tls");
    let cert = certs.dir.path("collector.pem");
    let key = certs.dir.path("collector.key");
    let pg = Postgres::start_with(&scratch.path("pg"), Some((&cert, &key)));
    let url = format!("postgres://sensor@localhost:{}/postgres", pg.port);
    let refused = |url: &str, extra: &[&str]| {
        let out = std::process::Command::new(collector_bin())
            .args(["--listen", "127.0.0.1:0", "--db", url])
            .args(extra)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with {extra:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Plaintext: the server's pg_hba.conf has no entry for it.
    let err = refused(&url, &[]);
    assert!(
        err.contains("cannot connect") && err.contains("no encryption"),
        "{err}"
    );
    let err = refused(&url, &["--db-ca", &certs.path("rogue-ca.pem")]);
    assert!(err.contains("cannot connect"), "{err}");
    let err = refused(&format!("{url}?sslmode=require"), &[]);
    assert!(err.contains("--db-ca"), "{err}");

    // The right CA: the collector starts, and the query commands reach the database too.
    let ca = certs.path("ca.pem");
    let mut collector = Collector::start(Path::new(&url), "127.0.0.1:0", &["--db-ca", &ca]);
    // It connected (TLS is the only way in) and created the schema.
    assert_eq!(pg.psql("SELECT max(version) FROM schema_migrations"), "1");
    // `query` asserts the command succeeded.
    query("agents", Path::new(&url), &["--json", "--db-ca", &ca]);
    collector.stop();
}

/// `--retain` on PostgreSQL: old alerts go at start, new ones and agent state stay, and
/// nothing a syslog target has not taken yet is deleted.
#[test]
fn retention_on_postgres_keeps_new_alerts_and_what_syslog_has_not_taken() {
    let scratch = Scratch::new("fleet-retain");
    let pg = Postgres::start(&scratch.path("pg"));
    let url = pg.url();
    let db = Path::new(&url);
    Collector::start(db, "127.0.0.1:0", &[]).stop();
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let insert = |seq: u32, time_ns: u128| {
        pg.psql(&format!(
            "INSERT INTO alerts (agent_id, seq, time_ns, rule_id, severity, title, host, json) \
             VALUES ('old', {seq}, {time_ns}, 'EPMM-B1', 4, 't', 'h', '{{\"alert\":{{}}}}')"
        ));
    };
    for seq in 1..=3 {
        insert(seq, 1_000_000_000);
    }
    insert(4, now_ns);
    let count = || pg.psql("SELECT count(*) FROM alerts");
    let wait_count = |want: &str| {
        let deadline = Instant::now() + STORE_TIMEOUT;
        while count() != want {
            assert!(Instant::now() < deadline, "{} alerts, want {want}", count());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut collector = Collector::start(db, "127.0.0.1:0", &["--retain", "1"]);
    wait_count("1");
    collector.stop();

    // A syslog target that never took anything (nobody listens): old alerts wait for it.
    insert(5, 1_000_000_000);
    let target = format!("tcp://127.0.0.1:{}", free_port());
    let mut collector = Collector::start(
        db,
        "127.0.0.1:0",
        &["--retain", "1", "--forward-syslog", &target],
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(), "2", "an alert the target has not taken was pruned");
    assert!(
        !collector.log().contains("retention: cannot prune"),
        "{}",
        collector.log()
    );
    collector.stop();
}
