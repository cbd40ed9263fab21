//! The SQLite store (`--db FILE`): one collector, one file. WAL and `synchronous=FULL`:
//! durable at commit. The bookkeeping is `mod.rs`'s; here are its statements.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    time::Duration,
};

use rusqlite::{Connection, OptionalExtension, params};
use sensor_proto::v1::{AgentIdentity, Heartbeat};

use super::{
    AGENT_COLUMNS, AgentRow, AgentValues, AlertQuery, AlertRow, Backend, ForwardRow, Result, now_ns,
};

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

/// `--retain` (`Db::prune`); here the newest alert is kept too: its row number keeps the
/// next ones above every cursor (SQLite reuses the numbers of deleted last rows).
pub fn prune(conn: &Connection, before_ns: i64, targets: &[String]) -> rusqlite::Result<usize> {
    let mut forwarded = i64::MAX;
    for target in targets {
        forwarded = forwarded.min(cursor(conn, target)?);
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

/// The bookkeeping's statements on one connection, in the transaction `begin` opened.
pub struct SqliteBackend {
    conn: Connection,
}

impl SqliteBackend {
    pub fn new(conn: Connection) -> Self {
        Self { conn }
    }
}

impl Backend for SqliteBackend {
    async fn begin(&mut self) -> Result<()> {
        Ok(self.conn.execute_batch("BEGIN")?)
    }

    async fn commit(&mut self) -> Result<()> {
        Ok(self.conn.execute_batch("COMMIT")?)
    }

    async fn rollback(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    /// One writer per file: the transaction is the lock.
    async fn lock_agents(&mut self, _agent_ids: &[&str]) -> Result<()> {
        Ok(())
    }

    async fn upsert_agent(
        &mut self,
        identity: &AgentIdentity,
        peer: &str,
        now: i64,
        last_seq: i64,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO agents (agent_id, host, kernel, agent_version, epmm_version,
                    hotfix_installed, hotfix_evidence, peer, first_seen_ns, last_seen_ns, last_seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)
                 ON CONFLICT (agent_id) DO UPDATE SET host = ?2, kernel = ?3,
                    agent_version = ?4, epmm_version = ?5, hotfix_installed = ?6,
                    hotfix_evidence = ?7, peer = ?8, last_seen_ns = ?9,
                    last_seq = max(last_seq, ?10)",
            )?
            .execute(params![
                identity.agent_id,
                identity.host,
                identity.kernel,
                identity.agent_version,
                identity.epmm_version,
                identity.hotfix_installed,
                identity.hotfix_evidence,
                peer,
                now,
                last_seq,
            ])?;
        Ok(())
    }

    async fn contiguous(&mut self, agent_id: &str) -> Result<u64> {
        Ok(self
            .conn
            .prepare_cached("SELECT contiguous FROM agents WHERE agent_id = ?1")?
            .query_row([agent_id], |r| r.get::<_, i64>(0))
            .optional()?
            .unwrap_or(0) as u64)
    }

    async fn set_contiguous(&mut self, agent_id: &str, value: u64) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE agents SET contiguous = ?2 WHERE agent_id = ?1")?
            .execute(params![agent_id, super::sql_u64(value)])?;
        Ok(())
    }

    async fn stored_any(&mut self, agent_id: &str) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM records WHERE agent_id = ?1)")?
            .query_row([agent_id], |r| r.get(0))?)
    }

    async fn add_gap(&mut self, agent_id: &str, from: u64, to: u64, kind: &str) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO gaps (agent_id, from_seq, to_seq, kind, noticed_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                agent_id,
                super::sql_u64(from),
                super::sql_u64(to),
                kind,
                now_ns()
            ])?
            > 0)
    }

    async fn advance(&mut self, agent_ids: &[&str]) -> Result<HashMap<String, u64>> {
        let mut stmt = self.conn.prepare_cached(super::ADVANCE)?;
        let mut marks = HashMap::new();
        for agent_id in agent_ids {
            let mark: Option<i64> = stmt.query_row([agent_id], |r| r.get(0)).optional()?;
            marks.insert((*agent_id).to_owned(), mark.unwrap_or(0) as u64);
        }
        Ok(marks)
    }

    async fn insert_records(
        &mut self,
        records: &[(&str, i64, &'static str)],
    ) -> Result<HashSet<usize>> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO records (agent_id, seq, kind) VALUES (?1, ?2, ?3)",
        )?;
        let mut inserted = HashSet::new();
        for (i, (agent_id, seq, kind)) in records.iter().enumerate() {
            if stmt.execute(params![agent_id, seq, kind])? > 0 {
                inserted.insert(i);
            }
        }
        Ok(inserted)
    }

    async fn insert_alerts(&mut self, rows: &[AlertRow]) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO alerts (agent_id, seq, time_ns, rule_id, severity, title, host, json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for a in rows {
            stmt.execute(params![
                a.agent_id, a.seq, a.time_ns, a.rule_id, a.severity, a.title, a.host, a.json
            ])?;
        }
        Ok(())
    }

    async fn insert_events(&mut self, rows: &[(&str, i64, String)]) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO events (agent_id, seq, json) VALUES (?1, ?2, ?3)",
        )?;
        for (agent_id, seq, json) in rows {
            stmt.execute(params![agent_id, seq, json])?;
        }
        Ok(())
    }

    async fn touch_agents(&mut self, agents: &[(&str, i64)], now: i64) -> Result<()> {
        let mut stmt = self.conn.prepare_cached(
            "UPDATE agents SET last_seen_ns = ?2, last_seq = max(last_seq, ?3) WHERE agent_id = ?1",
        )?;
        for (agent_id, last_seq) in agents {
            stmt.execute(params![agent_id, now, last_seq])?;
        }
        Ok(())
    }

    async fn heartbeat(
        &mut self,
        agent_id: &str,
        now: i64,
        heartbeat: &Heartbeat,
        kernel_lost: &str,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE agents SET last_seen_ns = ?2, last_seq = max(last_seq, ?3),
                    kernel_lost = ?4, shed_events = ?5, shed_alerts = ?6, spool_pending = ?7
                 WHERE agent_id = ?1",
            )?
            .execute(params![
                agent_id,
                now,
                super::sql_u64(heartbeat.last_seq),
                kernel_lost,
                super::sql_u64(heartbeat.spool_shed_events),
                super::sql_u64(heartbeat.spool_shed_alerts),
                super::sql_u64(heartbeat.spool_pending),
            ])?;
        Ok(())
    }
}

/// A connection of the forwarder.
pub fn forward_connection(db: &Path) -> Result<Connection> {
    let conn = Connection::open(db)
        .map_err(|e| anyhow::anyhow!("--db {}: cannot open for forwarding: {e}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

pub fn read_batch(conn: &Connection, after: i64, limit: i64) -> rusqlite::Result<Vec<ForwardRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT rowid, agent_id, seq, time_ns, rule_id, severity, host, json FROM alerts
         WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
    )?;
    stmt.query_map(params![after, limit], |r| {
        Ok(ForwardRow {
            pos: (0, r.get(0)?),
            agent_id: r.get(1)?,
            seq: r.get(2)?,
            time_ns: r.get(3)?,
            rule_id: r.get(4)?,
            severity: r.get(5)?,
            host: r.get(6)?,
            json: r.get(7)?,
        })
    })?
    .collect()
}

/// The cursor of `target` (0 when it was never forwarded to: everything stored goes).
pub fn cursor(conn: &Connection, target: &str) -> rusqlite::Result<i64> {
    Ok(conn
        .query_row(
            "SELECT last_rowid FROM forward WHERE target = ?1",
            [target],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

pub fn set_cursor(conn: &Connection, target: &str, rowid: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO forward (target, last_rowid) VALUES (?1, ?2)
         ON CONFLICT (target) DO UPDATE SET last_rowid = excluded.last_rowid",
        params![target, rowid],
    )?;
    Ok(())
}

pub fn lag(conn: &Connection, after: i64) -> rusqlite::Result<i64> {
    let newest: Option<i64> = conn.query_row("SELECT MAX(rowid) FROM alerts", [], |r| r.get(0))?;
    Ok((newest.unwrap_or(0) - after).max(0))
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
            q.limit.map_or(i64::MAX, super::sql_u64),
        ],
        |r| r.get::<_, String>(0),
    )?;
    rows.collect()
}

pub fn query_agents(conn: &Connection, silent_after_ns: i64) -> rusqlite::Result<Vec<AgentRow>> {
    let now = now_ns();
    let mut stmt = conn.prepare(&format!(
        "SELECT {AGENT_COLUMNS} FROM agents a ORDER BY a.agent_id"
    ))?;
    let rows = stmt.query_map([], |r| {
        Ok(AgentValues {
            agent_id: r.get(0)?,
            host: r.get(1)?,
            kernel: r.get(2)?,
            agent_version: r.get(3)?,
            epmm_version: r.get(4)?,
            hotfix_installed: r.get(5)?,
            hotfix_evidence: r.get(6)?,
            peer: r.get(7)?,
            last_seen_ns: r.get(8)?,
            last_seq: r.get(9)?,
            contiguous: r.get(10)?,
            kernel_lost: r.get(11)?,
            spool_pending: r.get(12)?,
            alerts: r.get(13)?,
            events: r.get(14)?,
            shed: r.get(15)?,
            gap: r.get(16)?,
            shed_events: r.get(17)?,
            shed_alerts: r.get(18)?,
        }
        .row(now, silent_after_ns))
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
    use crate::store::Request;
    use sensor_proto::v1::{
        Alert, Envelope, Event, Output, SeqRange, Severity, Shed, envelope, output,
    };
    use tokio::sync::oneshot;

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

    fn run(db: &mut SqliteBackend, request: Request, printed: &mut Vec<String>) -> u64 {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(crate::store::apply_batch(
            db,
            std::slice::from_ref(&request),
            printed,
        ))
        .unwrap()[0]
    }

    fn hello(db: &mut SqliteBackend, id: &str, first: u64) -> u64 {
        let (reply, _) = oneshot::channel();
        let request = Request::Hello {
            identity: AgentIdentity {
                agent_id: id.into(),
                epmm_version: "12.7.0.0".into(),
                ..Default::default()
            },
            first_seq: first,
            last_seq: first,
            peer: "test".into(),
            reply,
        };
        run(db, request, &mut Vec::new())
    }

    fn records(db: &mut SqliteBackend, id: &str, envs: Vec<Envelope>) -> (u64, usize) {
        let (reply, _) = oneshot::channel();
        let mut printed = Vec::new();
        let request = Request::Records {
            agent_id: id.into(),
            envelopes: envs,
            reply,
        };
        let r = run(db, request, &mut printed);
        (r, printed.len())
    }

    #[test]
    fn retention_keeps_what_a_syslog_target_has_not_taken_and_the_newest_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = SqliteBackend::new(open(&dir.path().join("c.db")).unwrap());
        hello(&mut db, "a", 1);
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
        records(&mut db, "a", envs);
        let seqs = |conn: &Connection| -> Vec<i64> {
            let mut stmt = conn.prepare("SELECT seq FROM alerts ORDER BY seq").unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .map(|r| r.unwrap())
                .collect()
        };
        let target = "tcp://127.0.0.1:514".to_owned();
        // The target took the first two rows: only those may go, however old the rest.
        db.conn
            .execute(
                "INSERT INTO forward (target, last_rowid) VALUES (?1, 2)",
                [&target],
            )
            .unwrap();
        let all_old = 10 * 1_000_000_000;
        assert_eq!(
            prune(&db.conn, all_old, std::slice::from_ref(&target)).unwrap(),
            2
        );
        assert_eq!(seqs(&db.conn), vec![3, 4, 5]);
        // Without targets: everything old but the newest row.
        assert_eq!(prune(&db.conn, all_old, &[]).unwrap(), 2);
        assert_eq!(seqs(&db.conn), vec![5]);
        // Agent state stays.
        let contiguous: i64 = db
            .conn
            .query_row(
                "SELECT contiguous FROM agents WHERE agent_id = 'a'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(contiguous, 5);
        // Newer than the cut-off: kept.
        records(&mut db, "a", vec![alert_env(6, "EPMM-B2")]);
        assert_eq!(prune(&db.conn, 3 * 1_000_000_000, &[]).unwrap(), 0);
    }

    /// Two streams of one agent (an old one still draining after a reconnection) in one
    /// batch with the same record: stored and printed once, both answered.
    #[test]
    fn a_record_twice_in_one_batch_is_printed_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = SqliteBackend::new(open(&dir.path().join("c.db")).unwrap());
        hello(&mut db, "a", 1);
        let batch: Vec<Request> = (0..2)
            .map(|_| Request::Records {
                agent_id: "a".into(),
                envelopes: vec![alert_env(1, "R1"), event_env(2)],
                reply: oneshot::channel().0,
            })
            .collect();
        let mut printed = Vec::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let answers = rt
            .block_on(crate::store::apply_batch(&mut db, &batch, &mut printed))
            .unwrap();
        assert_eq!(answers, vec![2, 2]);
        assert_eq!(printed.len(), 1, "{printed:?}");
        assert_eq!(
            query_alerts(&db.conn, &AlertQuery::default())
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn duplicates_are_ignored_and_the_mark_waits_for_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = SqliteBackend::new(open(&dir.path().join("c.db")).unwrap());
        assert_eq!(
            hello(&mut db, "a", 100),
            99,
            "a new agent starts at first_seq"
        );
        assert_eq!(
            records(
                &mut db,
                "a",
                vec![alert_env(100, "R1"), alert_env(102, "R2")]
            ),
            (100, 2)
        );
        assert_eq!(
            records(&mut db, "a", vec![alert_env(100, "R1")]),
            (100, 0),
            "a duplicate is not printed again"
        );
        assert_eq!(records(&mut db, "a", vec![event_env(101)]), (102, 0));
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
        assert_eq!(records(&mut db, "a", vec![shed.clone()]).0, 105);
        assert_eq!(records(&mut db, "a", vec![shed]).0, 105, "a resent report");
        let alerts = query_alerts(&db.conn, &AlertQuery::default()).unwrap();
        assert_eq!(alerts.len(), 2);
        let agents = query_agents(&db.conn, i64::MAX).unwrap();
        assert_eq!(agents[0].shed, 3, "counted once");
        assert_eq!(agents[0].alerts, 2);
        assert!(agents[0].vulnerable);
        // A new spool (first_seq far ahead) with records stored: a gap, counted.
        assert_eq!(hello(&mut db, "a", 1000), 999);
        assert_eq!(query_agents(&db.conn, i64::MAX).unwrap()[0].gap, 1000 - 106);
        let by_rule = query_alerts(
            &db.conn,
            &AlertQuery {
                rule: Some("R2".into()),
                severity: Some(Severity::High),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(by_rule.len(), 1);
        let critical = query_alerts(
            &db.conn,
            &AlertQuery {
                severity: Some(Severity::Critical),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(critical.is_empty());
    }
}
