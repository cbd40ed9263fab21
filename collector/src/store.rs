//! The SQLite store: agents, every sequence number received (or declared lost) per agent,
//! alerts and streamed events.
//!
//! One writer thread owns the connection. Stream handlers send it requests; it takes every
//! request that is waiting, applies them all in one transaction (WAL, `synchronous=FULL`:
//! durable at commit) and only then answers, so an acknowledgement always means "on disk".
//! De-duplication is the primary key (agent id, sequence number): a resent record is
//! ignored, and only newly stored alerts are printed.

use std::{
    io::Write,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OptionalExtension, params};
use sensor_proto::v1::{
    AgentIdentity, Alert, Envelope, Heartbeat, Output, Severity, envelope, output,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

/// Bumped when the schema changes; an older file is refused rather than misread.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    kernel TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    epmm_version TEXT NOT NULL,
    hotfix_installed INTEGER NOT NULL,
    hotfix_evidence TEXT NOT NULL,
    peer TEXT NOT NULL,
    first_seen_ns INTEGER NOT NULL,
    last_seen_ns INTEGER NOT NULL,
    -- Highest sequence number the agent says it assigned (Hello, heartbeats).
    last_seq INTEGER NOT NULL DEFAULT 0,
    -- Every number up to this one is stored or accounted for (shed, gap).
    contiguous INTEGER NOT NULL DEFAULT 0,
    kernel_lost TEXT NOT NULL DEFAULT '{}',
    shed_events INTEGER NOT NULL DEFAULT 0,
    shed_alerts INTEGER NOT NULL DEFAULT 0,
    spool_pending INTEGER NOT NULL DEFAULT 0
);
-- One row per sequence number received: alert, event, or shed (the record of a loss).
CREATE TABLE IF NOT EXISTS records (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;
-- Ranges of numbers accounted for without a record: 'shed' (the agent's spool was full
-- and it said so), 'reset' (lost with an earlier spool of the agent, Hello.first_seq) or
-- 'unused' (reserved by the agent's spool and never used: nothing lost).
CREATE TABLE IF NOT EXISTS gaps (
    agent_id TEXT NOT NULL,
    from_seq INTEGER NOT NULL,
    to_seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    noticed_ns INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS gaps_range ON gaps (agent_id, from_seq, to_seq, kind);
CREATE TABLE IF NOT EXISTS alerts (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    rule_id TEXT NOT NULL,
    severity INTEGER NOT NULL,
    title TEXT NOT NULL,
    host TEXT NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
);
CREATE INDEX IF NOT EXISTS alerts_time ON alerts (time_ns);
CREATE INDEX IF NOT EXISTS alerts_rule ON alerts (rule_id);
CREATE TABLE IF NOT EXISTS events (
    agent_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
);
-- Per syslog target: the last alert row forwarded to it (`forward.rs`).
CREATE TABLE IF NOT EXISTS forward (target TEXT PRIMARY KEY, last_rowid INTEGER NOT NULL);
";

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// SQLite integers are signed; sequence numbers are below 2^63 (microseconds since 1970
/// plus a count), so the cast is exact.
fn sql_u64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// `--retain`: deletes the alerts older than `before_ns`, but never one a syslog target of
/// `targets` has not taken yet, nor the newest alert (whose row number keeps the next
/// ones above every cursor). Agent state (agents, sequence records, gaps) stays. Returns
/// the alerts deleted.
pub fn prune(conn: &Connection, before_ns: i64, targets: &[String]) -> rusqlite::Result<usize> {
    let mut forwarded = i64::MAX;
    for target in targets {
        forwarded = forwarded.min(crate::forward::cursor(conn, target)?);
    }
    conn.execute(
        "DELETE FROM alerts WHERE time_ns < ?1 AND rowid <= ?2
         AND rowid < (SELECT MAX(rowid) FROM alerts)",
        params![before_ns, forwarded],
    )
}

pub fn open(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)
        .map_err(|e| anyhow::anyhow!("--db {}: cannot open: {e}", path.display()))?;
    let setup = || -> rusqlite::Result<()> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)
    };
    setup().map_err(|e| {
        anyhow::anyhow!(
            "--db {}: not a usable collector database: {e}",
            path.display()
        )
    })?;
    let version: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match version {
        None => {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                [SCHEMA_VERSION.to_string()],
            )?;
        }
        Some(v) if v == SCHEMA_VERSION.to_string() => {}
        Some(v) => anyhow::bail!(
            "--db {}: schema version {v}, this collector reads version {SCHEMA_VERSION}",
            path.display()
        ),
    }
    Ok(conn)
}

/// What stream handlers ask of the writer.
pub enum Request {
    /// An agent connected: its identity; answers with the contiguous sequence number.
    Hello {
        identity: AgentIdentity,
        first_seq: u64,
        last_seq: u64,
        peer: String,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    /// Records from an agent; answers with the new contiguous sequence number.
    Records {
        agent_id: String,
        envelopes: Vec<Envelope>,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    Heartbeat {
        agent_id: String,
        heartbeat: Heartbeat,
    },
    /// The service watchdog: answered once a transaction with it committed (the store
    /// thread runs and the database takes writes).
    Ping {
        reply: oneshot::Sender<Result<u64, String>>,
    },
}

/// The writer's handle.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
}

/// The writer thread: it ends once every [`Writer`] is gone and what they sent is
/// committed.
pub struct StoreThread(std::thread::JoinHandle<()>);

impl StoreThread {
    pub fn join(self) {
        if self.0.join().is_err() {
            tracing::error!("the store thread panicked");
        }
    }
}

impl Writer {
    /// Starts the writer thread on `conn`; new alerts are printed on `out` as JSON lines.
    pub fn start(
        conn: Connection,
        out: Box<dyn Write + Send>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> (Self, StoreThread) {
        let (tx, rx) = mpsc::channel(1024);
        let thread = std::thread::Builder::new()
            .name("store".into())
            .spawn(move || write_loop(conn, rx, out, &metrics))
            .expect("spawning the store thread");
        (Self { tx }, StoreThread(thread))
    }

    pub async fn request(&self, request: Request) -> Result<(), String> {
        self.tx
            .send(request)
            .await
            .map_err(|_| "the store has stopped".to_owned())
    }
}

fn write_loop(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Request>,
    mut out: Box<dyn Write + Send>,
    metrics: &crate::metrics::Metrics,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut printed = Vec::new();
        let started = std::time::Instant::now();
        let result = (|| -> rusqlite::Result<Vec<u64>> {
            let tx = conn.transaction()?;
            let mut answers = Vec::with_capacity(batch.len());
            for request in &batch {
                answers.push(apply(&tx, request, &mut printed)?);
            }
            tx.commit()?;
            Ok(answers)
        })();
        metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(answers) => {
                metrics.alerts_stored.inc_by(printed.len() as u64);
                for line in &printed {
                    let _ = writeln!(out, "{line}");
                }
                let _ = out.flush();
                for (request, answer) in batch.into_iter().zip(answers) {
                    match request {
                        Request::Hello { reply, .. }
                        | Request::Records { reply, .. }
                        | Request::Ping { reply } => {
                            let _ = reply.send(Ok(answer));
                        }
                        Request::Heartbeat { .. } => {}
                    }
                }
            }
            Err(e) => {
                // Nothing of the batch is stored: no acknowledgement, the agents resend.
                error!(error = %e, "cannot store a batch; the agents will resend it");
                for request in batch {
                    if let Request::Hello { reply, .. }
                    | Request::Records { reply, .. }
                    | Request::Ping { reply } = request
                    {
                        let _ = reply.send(Err(format!("store error: {e}")));
                    }
                }
            }
        }
    }
}

/// Applies one request inside the batch's transaction.
fn apply(
    tx: &rusqlite::Transaction<'_>,
    request: &Request,
    printed: &mut Vec<String>,
) -> rusqlite::Result<u64> {
    match request {
        Request::Hello {
            identity,
            first_seq,
            last_seq,
            peer,
            ..
        } => {
            let now = now_ns();
            tx.execute(
                "INSERT INTO agents (agent_id, host, kernel, agent_version, epmm_version,
                    hotfix_installed, hotfix_evidence, peer, first_seen_ns, last_seen_ns, last_seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)
                 ON CONFLICT (agent_id) DO UPDATE SET host = ?2, kernel = ?3,
                    agent_version = ?4, epmm_version = ?5, hotfix_installed = ?6,
                    hotfix_evidence = ?7, peer = ?8, last_seen_ns = ?9,
                    last_seq = max(last_seq, ?10)",
                params![
                    identity.agent_id,
                    identity.host,
                    identity.kernel,
                    identity.agent_version,
                    identity.epmm_version,
                    identity.hotfix_installed,
                    identity.hotfix_evidence,
                    peer,
                    now,
                    sql_u64(*last_seq),
                ],
            )?;
            let contiguous = contiguous(tx, &identity.agent_id)?;
            let stored_any: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM records WHERE agent_id = ?1)",
                [&identity.agent_id],
                |r| r.get(0),
            )?;
            if *first_seq > contiguous + 1 {
                // Numbers below first_seq never come: a new agent starts there; an agent
                // with a new spool lost what its old spool held unsent.
                if stored_any {
                    warn!(agent = %identity.agent_id, from = contiguous + 1, to = first_seq - 1, "the agent's spool is new: records it never sent are lost");
                    add_gap(
                        tx,
                        &identity.agent_id,
                        contiguous + 1,
                        first_seq - 1,
                        "reset",
                    )?;
                }
                set_contiguous(tx, &identity.agent_id, first_seq - 1)?;
            }
            advance(tx, &identity.agent_id)
        }
        Request::Records {
            agent_id,
            envelopes,
            ..
        } => {
            for env in envelopes {
                store_envelope(tx, agent_id, env, printed)?;
            }
            tx.execute(
                "UPDATE agents SET last_seen_ns = ?2, last_seq = max(last_seq, ?3) WHERE agent_id = ?1",
                params![
                    agent_id,
                    now_ns(),
                    sql_u64(envelopes.iter().map(|e| e.seq).max().unwrap_or(0))
                ],
            )?;
            advance(tx, agent_id)
        }
        Request::Heartbeat {
            agent_id,
            heartbeat,
        } => {
            let lost: serde_json::Map<String, serde_json::Value> = heartbeat
                .kernel_lost
                .iter()
                .map(|(k, v)| (k.clone(), (*v).into()))
                .collect();
            tx.execute(
                "UPDATE agents SET last_seen_ns = ?2, last_seq = max(last_seq, ?3),
                    kernel_lost = ?4, shed_events = ?5, shed_alerts = ?6, spool_pending = ?7
                 WHERE agent_id = ?1",
                params![
                    agent_id,
                    now_ns(),
                    sql_u64(heartbeat.last_seq),
                    serde_json::Value::Object(lost).to_string(),
                    sql_u64(heartbeat.spool_shed_events),
                    sql_u64(heartbeat.spool_shed_alerts),
                    sql_u64(heartbeat.spool_pending),
                ],
            )?;
            Ok(0)
        }
        Request::Ping { .. } => Ok(0),
    }
}

fn store_envelope(
    tx: &rusqlite::Transaction<'_>,
    agent_id: &str,
    env: &Envelope,
    printed: &mut Vec<String>,
) -> rusqlite::Result<()> {
    let seq = sql_u64(env.seq);
    let kind = match &env.body {
        Some(envelope::Body::Output(Output {
            item: Some(output::Item::Alert(_)),
        })) => "alert",
        Some(envelope::Body::Output(_)) => "event",
        Some(envelope::Body::Shed(_)) => "shed",
        None => return Ok(()),
    };
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO records (agent_id, seq, kind) VALUES (?1, ?2, ?3)",
        params![agent_id, seq, kind],
    )?;
    if inserted == 0 {
        // Already stored: a resend. A Shed record can take the number of a record stored
        // before the agent shed it; its report still counts.
        if let Some(envelope::Body::Shed(shed)) = &env.body {
            record_shed(tx, agent_id, env.seq, shed)?;
        }
        return Ok(());
    }
    match &env.body {
        Some(envelope::Body::Output(Output {
            item: Some(output::Item::Alert(alert)),
        })) => {
            let line = json_line(&output::Item::Alert(alert.clone()));
            tx.execute(
                "INSERT OR IGNORE INTO alerts (agent_id, seq, time_ns, rule_id, severity, title, host, json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    agent_id,
                    seq,
                    alert_time_ns(alert),
                    alert.rule_id,
                    alert.severity,
                    alert.title,
                    alert.host,
                    line
                ],
            )?;
            printed.push(line);
        }
        Some(envelope::Body::Output(Output {
            item: Some(output::Item::Event(event)),
        })) => {
            tx.execute(
                "INSERT OR IGNORE INTO events (agent_id, seq, json) VALUES (?1, ?2, ?3)",
                params![
                    agent_id,
                    seq,
                    json_line(&output::Item::Event(event.clone()))
                ],
            )?;
        }
        Some(envelope::Body::Shed(shed)) => record_shed(tx, agent_id, env.seq, shed)?,
        _ => {}
    }
    Ok(())
}

/// The numbers a Shed record reports, as 'shed' gaps (idempotent: a resent report counts
/// once).
fn record_shed(
    tx: &rusqlite::Transaction<'_>,
    agent_id: &str,
    seq: u64,
    shed: &sensor_proto::v1::Shed,
) -> rusqlite::Result<()> {
    let mut added = 0;
    for range in &shed.dropped {
        if range.first <= range.last && range.first >= seq {
            added += add_gap(tx, agent_id, range.first, range.last, "shed")?;
        }
    }
    // Numbers the agent reserved and never used: accounted for, not lost.
    for range in &shed.unused {
        if range.first <= range.last && range.first >= seq {
            add_gap(tx, agent_id, range.first, range.last, "unused")?;
        }
    }
    if added > 0 {
        warn!(agent = %agent_id, events = shed.events, alerts = shed.alerts, reason = %shed.reason, "the agent shed records it could not keep");
    }
    Ok(())
}

fn alert_time_ns(alert: &Alert) -> i64 {
    alert.time.as_ref().map_or(0, |t| {
        t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos)
    })
}

/// `{"alert": {...}}`: the same line the agent prints.
pub fn json_line(item: &output::Item) -> String {
    serde_json::to_string(&Output {
        item: Some(item.clone()),
    })
    .unwrap_or_else(|e| format!("{{\"error\":\"unprintable record: {e}\"}}"))
}

fn contiguous(tx: &rusqlite::Transaction<'_>, agent_id: &str) -> rusqlite::Result<u64> {
    tx.query_row(
        "SELECT contiguous FROM agents WHERE agent_id = ?1",
        [agent_id],
        |r| r.get::<_, i64>(0),
    )
    .optional()
    .map(|c| c.unwrap_or(0) as u64)
}

fn set_contiguous(
    tx: &rusqlite::Transaction<'_>,
    agent_id: &str,
    value: u64,
) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE agents SET contiguous = ?2 WHERE agent_id = ?1",
        params![agent_id, sql_u64(value)],
    )?;
    Ok(())
}

fn add_gap(
    tx: &rusqlite::Transaction<'_>,
    agent_id: &str,
    from: u64,
    to: u64,
    kind: &str,
) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT OR IGNORE INTO gaps (agent_id, from_seq, to_seq, kind, noticed_ns) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![agent_id, sql_u64(from), sql_u64(to), kind, now_ns()],
    )
}

/// Moves the agent's contiguous mark over every number now stored or accounted for.
fn advance(tx: &rusqlite::Transaction<'_>, agent_id: &str) -> rusqlite::Result<u64> {
    let start = contiguous(tx, agent_id)?;
    let mut mark = start;
    let mut gap = tx.prepare_cached(
        "SELECT max(to_seq) FROM gaps WHERE agent_id = ?1 AND from_seq <= ?2 AND to_seq >= ?2",
    )?;
    let mut stored =
        tx.prepare_cached("SELECT seq FROM records WHERE agent_id = ?1 AND seq > ?2 ORDER BY seq")?;
    loop {
        let covered: Option<i64> =
            gap.query_row(params![agent_id, sql_u64(mark + 1)], |r| r.get(0))?;
        if let Some(to) = covered {
            mark = to as u64;
            continue;
        }
        let before = mark;
        let mut rows = stored.query(params![agent_id, sql_u64(mark)])?;
        while let Some(row) = rows.next()? {
            let seq = row.get::<_, i64>(0)? as u64;
            if seq != mark + 1 {
                break;
            }
            mark = seq;
        }
        if mark == before {
            break;
        }
    }
    if mark != start {
        set_contiguous(tx, agent_id, mark)?;
    }
    Ok(mark)
}

/// EPMM releases before 12.8.0.0 are vulnerable to CVE-2026-1281/1340 without the hotfix
/// (THREATS.md: the permanent fix is 12.8.0.0; before it, the hotfix RPM).
pub fn vulnerable(epmm_version: &str, hotfix_installed: bool) -> bool {
    if hotfix_installed || epmm_version.is_empty() {
        return false;
    }
    let parts: Vec<u32> = epmm_version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .take(4)
        .collect();
    parts.as_slice() < [12, 8, 0, 0].as_slice()
}

/// Filters of `sensor-collector alerts`.
#[derive(Clone, Debug, Default)]
pub struct AlertQuery {
    pub agent: Option<String>,
    pub rule: Option<String>,
    /// At least this severity.
    pub severity: Option<Severity>,
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    pub limit: Option<u64>,
}

/// Stored alerts matching `q`, oldest first, as JSON lines.
pub fn query_alerts(conn: &Connection, q: &AlertQuery) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT json FROM alerts
         WHERE (?1 IS NULL OR agent_id = ?1) AND (?2 IS NULL OR rule_id = ?2)
           AND severity >= ?3 AND (?4 IS NULL OR time_ns >= ?4) AND (?5 IS NULL OR time_ns <= ?5)
         ORDER BY time_ns, agent_id, seq LIMIT ?6",
    )?;
    let rows = stmt.query_map(
        params![
            q.agent,
            q.rule,
            q.severity.map_or(0, |s| s as i32),
            q.since_ns,
            q.until_ns,
            q.limit.map_or(i64::MAX, sql_u64),
        ],
        |r| r.get::<_, String>(0),
    )?;
    rows.collect()
}

/// One agent of the fleet as `sensor-collector agents` shows it.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRow {
    pub agent_id: String,
    pub host: String,
    pub kernel: String,
    pub agent_version: String,
    pub epmm_version: String,
    pub hotfix_installed: bool,
    pub hotfix_evidence: String,
    /// CVE-2026-1281/1340: an EPMM release before 12.8.0.0 without the hotfix.
    pub vulnerable: bool,
    pub peer: String,
    pub last_seen: String,
    /// No message for longer than the silence threshold.
    pub silent: bool,
    pub last_seq: u64,
    pub contiguous_seq: u64,
    /// Numbers the agent assigned that are neither stored nor declared lost (in flight,
    /// or missing while the agent cannot reach the collector).
    pub outstanding: u64,
    pub alerts: u64,
    pub events: u64,
    /// Numbers the agent declared shed in Shed records (its spool was full).
    pub shed: u64,
    /// Numbers lost with an earlier spool.
    pub gap: u64,
    /// Records the agent's last heartbeat says it shed since it started.
    pub shed_reported: u64,
    pub kernel_lost: serde_json::Value,
    pub spool_pending: u64,
}

pub fn query_agents(conn: &Connection, silent_after_ns: i64) -> rusqlite::Result<Vec<AgentRow>> {
    let now = now_ns();
    let mut stmt = conn.prepare(
        "SELECT a.agent_id, host, kernel, agent_version, epmm_version, hotfix_installed,
            hotfix_evidence, peer, last_seen_ns, last_seq, contiguous, kernel_lost, spool_pending,
            (SELECT count(*) FROM records r WHERE r.agent_id = a.agent_id AND kind = 'alert'),
            (SELECT count(*) FROM records r WHERE r.agent_id = a.agent_id AND kind = 'event'),
            (SELECT coalesce(sum(to_seq - from_seq + 1), 0) FROM gaps g WHERE g.agent_id = a.agent_id AND kind = 'shed'),
            (SELECT coalesce(sum(to_seq - from_seq + 1), 0) FROM gaps g WHERE g.agent_id = a.agent_id AND kind = 'reset'),
            shed_events, shed_alerts
         FROM agents a ORDER BY a.agent_id",
    )?;
    let rows = stmt.query_map([], |r| {
        let epmm_version: String = r.get(4)?;
        let hotfix_installed: bool = r.get(5)?;
        let last_seen_ns: i64 = r.get(8)?;
        let last_seq = r.get::<_, i64>(9)? as u64;
        let contiguous = r.get::<_, i64>(10)? as u64;
        let lost: String = r.get(11)?;
        Ok(AgentRow {
            agent_id: r.get(0)?,
            host: r.get(1)?,
            kernel: r.get(2)?,
            agent_version: r.get(3)?,
            vulnerable: vulnerable(&epmm_version, hotfix_installed),
            epmm_version,
            hotfix_installed,
            hotfix_evidence: r.get(6)?,
            peer: r.get(7)?,
            last_seen: humantime::format_rfc3339_millis(
                UNIX_EPOCH + std::time::Duration::from_nanos(last_seen_ns.max(0) as u64),
            )
            .to_string(),
            silent: now - last_seen_ns > silent_after_ns,
            last_seq,
            contiguous_seq: contiguous,
            outstanding: last_seq.saturating_sub(contiguous),
            spool_pending: r.get::<_, i64>(12)? as u64,
            alerts: r.get::<_, i64>(13)? as u64,
            events: r.get::<_, i64>(14)? as u64,
            shed: r.get::<_, i64>(15)? as u64,
            gap: r.get::<_, i64>(16)? as u64,
            shed_reported: (r.get::<_, i64>(17)? + r.get::<_, i64>(18)?) as u64,
            kernel_lost: serde_json::from_str(&lost).unwrap_or_default(),
        })
    })?;
    rows.collect()
}

/// Opens an existing store for queries (never creates one).
pub fn open_existing(path: &Path) -> anyhow::Result<Connection> {
    if !path.is_file() {
        anyhow::bail!("--db {}: no such collector database", path.display());
    }
    open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensor_proto::v1::{Event, SeqRange, Shed};

    fn alert_env(seq: u64, rule: &str) -> Envelope {
        Envelope {
            seq,
            body: Some(envelope::Body::Output(Output {
                item: Some(output::Item::Alert(Alert {
                    rule_id: rule.into(),
                    severity: Severity::High as i32,
                    ..Default::default()
                })),
            })),
        }
    }

    fn event_env(seq: u64) -> Envelope {
        Envelope {
            seq,
            body: Some(envelope::Body::Output(Output {
                item: Some(output::Item::Event(Event::default())),
            })),
        }
    }

    fn hello(conn: &mut Connection, id: &str, first: u64) -> u64 {
        let tx = conn.transaction().unwrap();
        let (reply, _) = oneshot::channel();
        let r = apply(
            &tx,
            &Request::Hello {
                identity: AgentIdentity {
                    agent_id: id.into(),
                    epmm_version: "12.7.0.0".into(),
                    ..Default::default()
                },
                first_seq: first,
                last_seq: first,
                peer: "test".into(),
                reply,
            },
            &mut Vec::new(),
        )
        .unwrap();
        tx.commit().unwrap();
        r
    }

    fn records(conn: &mut Connection, id: &str, envs: Vec<Envelope>) -> (u64, usize) {
        let tx = conn.transaction().unwrap();
        let (reply, _) = oneshot::channel();
        let mut printed = Vec::new();
        let r = apply(
            &tx,
            &Request::Records {
                agent_id: id.into(),
                envelopes: envs,
                reply,
            },
            &mut printed,
        )
        .unwrap();
        tx.commit().unwrap();
        (r, printed.len())
    }

    #[test]
    fn retention_keeps_what_a_syslog_target_has_not_taken_and_the_newest_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("c.db")).unwrap();
        hello(&mut conn, "a", 1);
        // Alerts 1-5 at times 1-5 s after the epoch.
        let envs = (1..=5)
            .map(|seq| {
                let mut env = alert_env(seq, "EPMM-B1");
                if let Some(envelope::Body::Output(Output {
                    item: Some(output::Item::Alert(a)),
                })) = env.body.as_mut()
                {
                    a.time = Some(sensor_proto::Timestamp {
                        seconds: seq as i64,
                        nanos: 0,
                    });
                }
                env
            })
            .collect();
        records(&mut conn, "a", envs);
        let seqs = |conn: &Connection| -> Vec<i64> {
            let mut stmt = conn.prepare("SELECT seq FROM alerts ORDER BY seq").unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let target = "tcp://127.0.0.1:514".to_owned();
        // The target took the first two rows: only those may go, however old the rest.
        conn.execute(
            "INSERT INTO forward (target, last_rowid) VALUES (?1, 2)",
            [&target],
        )
        .unwrap();
        let all_old = 10 * 1_000_000_000;
        assert_eq!(
            prune(&conn, all_old, std::slice::from_ref(&target)).unwrap(),
            2
        );
        assert_eq!(seqs(&conn), vec![3, 4, 5]);
        // Without targets: everything old but the newest row.
        assert_eq!(prune(&conn, all_old, &[]).unwrap(), 2);
        assert_eq!(seqs(&conn), vec![5]);
        // Agent state stays.
        let contiguous: i64 = conn
            .query_row(
                "SELECT contiguous FROM agents WHERE agent_id = 'a'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(contiguous, 5);
        // Newer than the cut-off: kept.
        records(&mut conn, "a", vec![alert_env(6, "EPMM-B2")]);
        assert_eq!(prune(&conn, 3 * 1_000_000_000, &[]).unwrap(), 0);
    }

    #[test]
    fn duplicates_are_ignored_and_the_mark_waits_for_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join("c.db")).unwrap();
        assert_eq!(
            hello(&mut conn, "a", 100),
            99,
            "a new agent starts at first_seq"
        );
        assert_eq!(
            records(
                &mut conn,
                "a",
                vec![alert_env(100, "R1"), alert_env(102, "R2")]
            ),
            (100, 2)
        );
        assert_eq!(
            records(&mut conn, "a", vec![alert_env(100, "R1")]),
            (100, 0),
            "a duplicate is not printed again"
        );
        assert_eq!(records(&mut conn, "a", vec![event_env(101)]), (102, 0));
        // The agent shed 103..105 and says so in 103, the first number it reports.
        let shed = Envelope {
            seq: 103,
            body: Some(envelope::Body::Shed(Shed {
                dropped: vec![SeqRange {
                    first: 103,
                    last: 105,
                }],
                events: 3,
                alerts: 0,
                reason: "full".into(),
                unused: Vec::new(),
            })),
        };
        assert_eq!(records(&mut conn, "a", vec![shed.clone()]).0, 105);
        assert_eq!(
            records(&mut conn, "a", vec![shed]).0,
            105,
            "a resent report"
        );
        let alerts = query_alerts(&conn, &AlertQuery::default()).unwrap();
        assert_eq!(alerts.len(), 2);
        let agents = query_agents(&conn, i64::MAX).unwrap();
        assert_eq!(agents[0].shed, 3, "counted once");
        assert_eq!(agents[0].alerts, 2);
        assert!(agents[0].vulnerable);
        // A new spool (first_seq far ahead) with records stored: a gap, counted.
        assert_eq!(hello(&mut conn, "a", 1000), 999);
        assert_eq!(query_agents(&conn, i64::MAX).unwrap()[0].gap, 1000 - 106);
        let by_rule = query_alerts(
            &conn,
            &AlertQuery {
                rule: Some("R2".into()),
                severity: Some(Severity::High),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(by_rule.len(), 1);
        let critical = query_alerts(
            &conn,
            &AlertQuery {
                severity: Some(Severity::Critical),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(critical.is_empty());
    }

    #[test]
    fn vulnerability() {
        assert!(vulnerable("12.7.0.0 Build 55", false));
        assert!(vulnerable("11.12.0.1", false));
        assert!(!vulnerable("12.7.0.0", true), "hotfixed");
        assert!(!vulnerable("12.8.0.0", false), "fixed release");
        assert!(!vulnerable("", false), "not an EPMM appliance");
    }
}
