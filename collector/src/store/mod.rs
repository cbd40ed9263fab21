//! The store: agents, every sequence number received (or declared lost) per agent, alerts
//! and streamed events; SQLite in a file (`--db FILE`, one collector) or PostgreSQL
//! (`--db postgres://...`, any number of collectors sharing one database).
//!
//! One writer task owns the store's connection. Stream handlers send it requests; it takes
//! every request that is waiting, applies them all in one transaction and only then
//! answers, so an acknowledgement always means "committed". De-duplication is the
//! primary key (agent id, sequence number) of `records`, a constraint of the database: a
//! resent record is ignored whichever collector it reaches, and only newly stored alerts
//! are printed.
//!
//! The bookkeeping (what is contiguous, what is a gap) is written once, in this module,
//! over [`Backend`]: the statements each database needs are in `sqlite.rs` and
//! `postgres.rs`.

mod postgres;
pub(crate) mod sqlite;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use sensor_proto::v1::{
    AgentIdentity, Alert, Envelope, Heartbeat, Output, Severity, envelope, output,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

pub type Result<T> = anyhow::Result<T>;

/// Where the store is: `--db`.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(PathBuf),
    Postgres(Box<postgres::Target>),
}

impl Db {
    /// `postgres://...` or `postgresql://...` (libpq's URL form; `sslmode=require` or
    /// `verify-full` for TLS, whose server certificate must chain to `ca`) or a file.
    pub fn parse(s: &str, ca: Option<&Path>) -> Result<Db> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(Db::Postgres(Box::new(postgres::Target::parse(s, ca)?)))
        } else if s.contains("://") {
            anyhow::bail!("--db {s}: a file, or postgres://USER@HOST:PORT/DB")
        } else {
            if ca.is_some() {
                anyhow::bail!("--db-ca is for a postgres:// database, --db {s} is a file");
            }
            Ok(Db::Sqlite(PathBuf::from(s)))
        }
    }

    /// For logs: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Db::Sqlite(path) => path.display().to_string(),
            Db::Postgres(target) => target.describe(),
        }
    }

    /// Opens (creating or migrating the schema) and starts the writer on it. Called
    /// before the serving runtime exists.
    pub fn start_writer(
        &self,
        out: Box<dyn Write + Send>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> Result<(Writer, StoreThread)> {
        match self {
            Db::Sqlite(path) => {
                let backend = sqlite::SqliteBackend::new(sqlite::open(path)?);
                Ok(Writer::start(backend, out, metrics))
            }
            Db::Postgres(target) => {
                postgres::prepare(target)?;
                Ok(Writer::start(
                    postgres::PgBackend::new((**target).clone()),
                    out,
                    metrics,
                ))
            }
        }
    }

    /// Stored alerts matching `q`, oldest first, as JSON lines.
    pub async fn query_alerts(&self, q: &AlertQuery) -> Result<Vec<String>> {
        match self {
            Db::Sqlite(path) => Ok(sqlite::query_alerts(&sqlite::open_existing(path)?, q)?),
            Db::Postgres(target) => postgres::query_alerts(target, q).await,
        }
    }

    pub async fn query_agents(&self, silent_after_ns: i64) -> Result<Vec<AgentRow>> {
        match self {
            Db::Sqlite(path) => Ok(sqlite::query_agents(
                &sqlite::open_existing(path)?,
                silent_after_ns,
            )?),
            Db::Postgres(target) => postgres::query_agents(target, silent_after_ns).await,
        }
    }

    /// `--retain`: deletes the alerts older than `before_ns`, but never one a syslog target
    /// of `targets` has not taken yet. Agent state (agents, sequence records, gaps) stays.
    /// Returns the alerts deleted.
    pub async fn prune(&self, before_ns: i64, targets: &[String]) -> Result<usize> {
        match self {
            Db::Sqlite(path) => {
                let (path, targets) = (path.clone(), targets.to_vec());
                tokio::task::spawn_blocking(move || -> Result<usize> {
                    Ok(sqlite::prune(&sqlite::open(&path)?, before_ns, &targets)?)
                })
                .await?
            }
            Db::Postgres(target) => postgres::prune(target, before_ns, targets).await,
        }
    }

    /// A connection for the syslog forwarder of `target_name`. On PostgreSQL it holds the
    /// target's lock: one collector of the fleet forwards to a target at a time (the
    /// others wait here, and take over when its connection ends).
    pub async fn forward_source(
        &self,
        target_name: &str,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<Source>> {
        match self {
            Db::Sqlite(path) => Ok(Some(Source::Sqlite(sqlite::forward_connection(path)?))),
            Db::Postgres(target) => Ok(postgres::forward_source(target, target_name, stop)
                .await?
                .map(Source::Postgres)),
        }
    }
}

/// A position in the store's stream of alerts, as forwarders keep it: on SQLite
/// `(0, rowid)`; on PostgreSQL `(transaction id, row id)`, in the order transactions
/// became visible to every reader (see `postgres.rs`).
pub type Pos = (i64, i64);

/// One stored alert, as the forwarder reads it.
#[derive(Debug)]
pub struct ForwardRow {
    pub pos: Pos,
    pub agent_id: String,
    pub seq: i64,
    pub time_ns: i64,
    pub rule_id: String,
    pub severity: i32,
    pub host: String,
    pub json: String,
}

/// The forwarder's connection to the store.
pub enum Source {
    Sqlite(rusqlite::Connection),
    Postgres(postgres::ForwardConn),
}

impl Source {
    /// The cursor of `target` ((0, 0) when it was never forwarded to: everything goes).
    pub async fn cursor(&mut self, target: &str) -> Result<Pos> {
        match self {
            Source::Sqlite(conn) => Ok((0, sqlite::cursor(conn, target)?)),
            Source::Postgres(conn) => conn.cursor(target).await,
        }
    }

    /// Up to `limit` alerts after `after`, in order.
    pub async fn read_batch(&mut self, after: Pos, limit: i64) -> Result<Vec<ForwardRow>> {
        match self {
            Source::Sqlite(conn) => Ok(sqlite::read_batch(conn, after.1, limit)?),
            Source::Postgres(conn) => conn.read_batch(after, limit).await,
        }
    }

    pub async fn set_cursor(&mut self, target: &str, pos: Pos) -> Result<()> {
        match self {
            Source::Sqlite(conn) => Ok(sqlite::set_cursor(conn, target, pos.1)?),
            Source::Postgres(conn) => conn.set_cursor(target, pos).await,
        }
    }

    /// Stored alerts after `after` (the forward lag).
    pub async fn lag(&mut self, after: Pos) -> Result<i64> {
        match self {
            Source::Sqlite(conn) => Ok(sqlite::lag(conn, after.1)?),
            Source::Postgres(conn) => conn.lag(after).await,
        }
    }
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Both databases' integers are signed; sequence numbers are below 2^63 (microseconds
/// since 1970 plus a count), so the cast is exact.
fn sql_u64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// One alert row to insert.
pub(crate) struct AlertRow {
    pub agent_id: String,
    pub seq: i64,
    pub time_ns: i64,
    pub rule_id: String,
    pub severity: i32,
    pub title: String,
    pub host: String,
    pub json: String,
}

/// What the bookkeeping needs of a database, inside the transaction `begin` opened.
/// Written for the writer's own thread (no `Send` futures needed).
#[allow(async_fn_in_trait)]
pub(crate) trait Backend {
    async fn begin(&mut self) -> Result<()>;
    async fn commit(&mut self) -> Result<()>;
    async fn rollback(&mut self);
    /// Takes the rows of these agents for this transaction (another collector's
    /// transaction on the same agents waits), in this order.
    async fn lock_agents(&mut self, agent_ids: &[&str]) -> Result<()>;
    async fn upsert_agent(
        &mut self,
        identity: &AgentIdentity,
        peer: &str,
        now: i64,
        last_seq: i64,
    ) -> Result<()>;
    async fn contiguous(&mut self, agent_id: &str) -> Result<u64>;
    async fn set_contiguous(&mut self, agent_id: &str, value: u64) -> Result<()>;
    async fn stored_any(&mut self, agent_id: &str) -> Result<bool>;
    /// Adds a gap unless the same one is there; true when added.
    async fn add_gap(&mut self, agent_id: &str, from: u64, to: u64, kind: &str) -> Result<bool>;
    /// Runs [`ADVANCE`] for each of these agents: their new contiguous marks.
    async fn advance(&mut self, agent_ids: &[&str]) -> Result<HashMap<String, u64>>;
    /// Inserts the records (agent id, sequence number, kind) that are not there; returns
    /// the positions in `records` of those inserted.
    async fn insert_records(
        &mut self,
        records: &[(&str, i64, &'static str)],
    ) -> Result<HashSet<usize>>;
    async fn insert_alerts(&mut self, rows: &[AlertRow]) -> Result<()>;
    async fn insert_events(&mut self, rows: &[(&str, i64, String)]) -> Result<()>;
    /// Each agent (once) was heard from now, having sent up to this sequence number.
    async fn touch_agents(&mut self, agents: &[(&str, i64)], now: i64) -> Result<()>;
    async fn heartbeat(
        &mut self,
        agent_id: &str,
        now: i64,
        heartbeat: &Heartbeat,
        kernel_lost: &str,
    ) -> Result<()>;
}

/// What stream handlers ask of the writer.
pub enum Request {
    /// An agent connected: its identity; answers with the contiguous sequence number.
    Hello {
        identity: AgentIdentity,
        first_seq: u64,
        last_seq: u64,
        peer: String,
        reply: oneshot::Sender<std::result::Result<u64, String>>,
    },
    /// Records from an agent; answers with the new contiguous sequence number.
    Records {
        agent_id: String,
        envelopes: Vec<Envelope>,
        reply: oneshot::Sender<std::result::Result<u64, String>>,
    },
    Heartbeat {
        agent_id: String,
        heartbeat: Heartbeat,
    },
    /// The service watchdog: answered once a transaction with it committed (the store
    /// task runs and the database takes writes).
    Ping {
        reply: oneshot::Sender<std::result::Result<u64, String>>,
    },
}

impl Request {
    fn agent_id(&self) -> Option<&str> {
        match self {
            Request::Hello { identity, .. } => Some(&identity.agent_id),
            Request::Records { agent_id, .. } | Request::Heartbeat { agent_id, .. } => {
                Some(agent_id)
            }
            Request::Ping { .. } => None,
        }
    }
}

/// The writer's handle.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
}

/// The writer's thread: it ends once every [`Writer`] is gone and what they sent is
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
    /// Starts the writer on its own thread (and, for PostgreSQL, its own single-threaded
    /// runtime, where the driver's connection task runs too); new alerts are printed on
    /// `out` as JSON lines.
    pub(crate) fn start<B: Backend + Send + 'static>(
        backend: B,
        out: Box<dyn Write + Send>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> (Self, StoreThread) {
        let (tx, rx) = mpsc::channel(1024);
        let thread = std::thread::Builder::new()
            .name("store".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the store thread's runtime");
                runtime.block_on(write_loop(backend, rx, out, &metrics));
            })
            .expect("spawning the store thread");
        (Self { tx }, StoreThread(thread))
    }

    pub async fn request(&self, request: Request) -> std::result::Result<(), String> {
        self.tx
            .send(request)
            .await
            .map_err(|_| "the store has stopped".to_owned())
    }
}

async fn write_loop<B: Backend>(
    mut backend: B,
    mut rx: mpsc::Receiver<Request>,
    mut out: Box<dyn Write + Send>,
    metrics: &crate::metrics::Metrics,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut printed = Vec::new();
        let started = std::time::Instant::now();
        let result = apply_batch(&mut backend, &batch, &mut printed).await;
        if result.is_err() {
            backend.rollback().await;
        }
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
                error!(error = %format!("{e:#}"), "cannot store a batch; the agents will resend it");
                for request in batch {
                    if let Request::Hello { reply, .. }
                    | Request::Records { reply, .. }
                    | Request::Ping { reply } = request
                    {
                        let _ = reply.send(Err(format!("store error: {e:#}")));
                    }
                }
            }
        }
    }
}

/// One transaction for the whole batch, in a few statements whatever its size: the
/// agents' rows taken in order; Hellos; every stream's records inserted at once (the
/// database says which were new); heartbeats; then each agent's contiguous mark, which
/// answers its Hello or records. The answers are sent after the commit.
pub(crate) async fn apply_batch<B: Backend>(
    backend: &mut B,
    batch: &[Request],
    printed: &mut Vec<String>,
) -> Result<Vec<u64>> {
    backend.begin().await?;
    let mut agents: Vec<&str> = batch.iter().filter_map(Request::agent_id).collect();
    agents.sort_unstable();
    agents.dedup();
    backend.lock_agents(&agents).await?;
    for request in batch {
        if let Request::Hello {
            identity,
            first_seq,
            last_seq,
            peer,
            ..
        } = request
        {
            hello(backend, identity, *first_seq, *last_seq, peer).await?;
        }
    }
    store_records(backend, batch, printed).await?;
    for request in batch {
        if let Request::Heartbeat {
            agent_id,
            heartbeat,
        } = request
        {
            let lost: serde_json::Map<String, serde_json::Value> = heartbeat
                .kernel_lost
                .iter()
                .map(|(k, v)| (k.clone(), (*v).into()))
                .collect();
            backend
                .heartbeat(
                    agent_id,
                    now_ns(),
                    heartbeat,
                    &serde_json::Value::Object(lost).to_string(),
                )
                .await?;
        }
    }
    let mut answered: Vec<&str> = batch
        .iter()
        .filter_map(|r| match r {
            Request::Hello { identity, .. } => Some(identity.agent_id.as_str()),
            Request::Records { agent_id, .. } => Some(agent_id.as_str()),
            _ => None,
        })
        .collect();
    answered.sort_unstable();
    answered.dedup();
    let marks = backend.advance(&answered).await?;
    let answers = batch
        .iter()
        .map(|r| {
            r.agent_id()
                .and_then(|a| marks.get(a))
                .copied()
                .unwrap_or(0)
        })
        .collect();
    backend.commit().await?;
    Ok(answers)
}

/// An agent connected: its identity, and where its numbers start.
async fn hello<B: Backend>(
    backend: &mut B,
    identity: &AgentIdentity,
    first_seq: u64,
    last_seq: u64,
    peer: &str,
) -> Result<()> {
    let agent = identity.agent_id.as_str();
    backend
        .upsert_agent(identity, peer, now_ns(), sql_u64(last_seq))
        .await?;
    let contiguous = backend.contiguous(agent).await?;
    if first_seq > contiguous + 1 {
        // Numbers below first_seq never come: a new agent starts there; an agent with a
        // new spool lost what its old spool held unsent.
        if backend.stored_any(agent).await? {
            warn!(
                agent,
                from = contiguous + 1,
                to = first_seq - 1,
                "the agent's spool is new: records it never sent are lost"
            );
            backend
                .add_gap(agent, contiguous + 1, first_seq - 1, "reset")
                .await?;
        }
        backend.set_contiguous(agent, first_seq - 1).await?;
    }
    Ok(())
}

fn kind(env: &Envelope) -> Option<&'static str> {
    match &env.body {
        Some(envelope::Body::Output(Output {
            item: Some(output::Item::Alert(_)),
        })) => Some("alert"),
        Some(envelope::Body::Output(_)) => Some("event"),
        Some(envelope::Body::Shed(_)) => Some("shed"),
        None => None,
    }
}

/// Every Records request of the batch: the records inserted in one statement, then the
/// alerts and events that were new, the shed reports, and the agents' last-seen.
async fn store_records<B: Backend>(
    backend: &mut B,
    batch: &[Request],
    printed: &mut Vec<String>,
) -> Result<()> {
    let streams: Vec<(&str, &[Envelope])> = batch
        .iter()
        .filter_map(|r| match r {
            Request::Records {
                agent_id,
                envelopes,
                ..
            } => Some((agent_id.as_str(), envelopes.as_slice())),
            _ => None,
        })
        .collect();
    if streams.is_empty() {
        return Ok(());
    }
    let records: Vec<(&str, i64, &'static str)> = streams
        .iter()
        .flat_map(|(agent, envs)| {
            envs.iter()
                .filter_map(move |env| kind(env).map(|k| (*agent, sql_u64(env.seq), k)))
        })
        .collect();
    let inserted = backend.insert_records(&records).await?;
    let mut alerts = Vec::new();
    let mut events = Vec::new();
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    // The position in `records` of the next envelope that has a record.
    let mut position = 0;
    for (agent_id, envelopes) in &streams {
        let seen = last.entry(agent_id).or_insert(0);
        for env in *envelopes {
            let seq = sql_u64(env.seq);
            *seen = (*seen).max(seq);
            let new = kind(env).is_some() && {
                position += 1;
                inserted.contains(&(position - 1))
            };
            match &env.body {
                // A Shed record can take the number of a record stored before the agent
                // shed it; its report still counts (and counts once: gaps are unique).
                Some(envelope::Body::Shed(shed)) => {
                    record_shed(backend, agent_id, env.seq, shed).await?
                }
                Some(envelope::Body::Output(Output {
                    item: Some(output::Item::Alert(alert)),
                })) if new => {
                    let line = json_line(&output::Item::Alert(alert.clone()));
                    alerts.push(AlertRow {
                        agent_id: (*agent_id).to_owned(),
                        seq,
                        time_ns: alert_time_ns(alert),
                        rule_id: alert.rule_id.clone(),
                        severity: alert.severity,
                        title: alert.title.clone(),
                        host: alert.host.clone(),
                        json: line.clone(),
                    });
                    printed.push(line);
                }
                Some(envelope::Body::Output(Output {
                    item: Some(output::Item::Event(event)),
                })) if new => events.push((
                    *agent_id,
                    seq,
                    json_line(&output::Item::Event(event.clone())),
                )),
                _ => {}
            }
        }
    }
    if !alerts.is_empty() {
        backend.insert_alerts(&alerts).await?;
    }
    if !events.is_empty() {
        backend.insert_events(&events).await?;
    }
    let touched: Vec<(&str, i64)> = last.into_iter().collect();
    backend.touch_agents(&touched, now_ns()).await
}

/// The numbers a Shed record reports, as 'shed' gaps (idempotent: a resent report counts
/// once).
async fn record_shed<B: Backend>(
    backend: &mut B,
    agent_id: &str,
    seq: u64,
    shed: &sensor_proto::v1::Shed,
) -> Result<()> {
    let mut added = false;
    for range in &shed.dropped {
        if range.first <= range.last && range.first >= seq {
            added |= backend
                .add_gap(agent_id, range.first, range.last, "shed")
                .await?;
        }
    }
    // Numbers the agent reserved and never used: accounted for, not lost.
    for range in &shed.unused {
        if range.first <= range.last && range.first >= seq {
            backend
                .add_gap(agent_id, range.first, range.last, "unused")
                .await?;
        }
    }
    if added {
        warn!(agent = %agent_id, events = shed.events, alerts = shed.alerts, reason = %shed.reason, "the agent shed records it could not keep");
    }
    Ok(())
}

/// Moves agent `$1`'s contiguous mark over every number now stored (`records`) or
/// accounted for (`gaps`), in one statement both databases run (one round trip to
/// PostgreSQL instead of one per step): each step of the walk takes the furthest gap that
/// covers the next number, or the next number's record; it stops at the first number with
/// neither.
pub(crate) const ADVANCE: &str = "
UPDATE agents SET contiguous = (
    WITH RECURSIVE walk(mark) AS (
        SELECT contiguous FROM agents WHERE agent_id = $1
        UNION ALL
        SELECT coalesce(
            (SELECT max(g.to_seq) FROM gaps g
              WHERE g.agent_id = $1 AND g.from_seq <= w.mark + 1 AND g.to_seq >= w.mark + 1),
            (SELECT r.seq FROM records r WHERE r.agent_id = $1 AND r.seq = w.mark + 1))
        FROM walk w
        WHERE coalesce(
            (SELECT max(g.to_seq) FROM gaps g
              WHERE g.agent_id = $1 AND g.from_seq <= w.mark + 1 AND g.to_seq >= w.mark + 1),
            (SELECT r.seq FROM records r WHERE r.agent_id = $1 AND r.seq = w.mark + 1)) IS NOT NULL
    )
    SELECT max(mark) FROM walk
)
WHERE agent_id = $1
RETURNING contiguous";

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

/// The columns both databases' agent queries return, in this order.
pub(crate) const AGENT_COLUMNS: &str =
    "a.agent_id, host, kernel, agent_version, epmm_version, hotfix_installed,
     hotfix_evidence, peer, last_seen_ns, last_seq, contiguous, kernel_lost, spool_pending,
     (SELECT count(*) FROM records r WHERE r.agent_id = a.agent_id AND kind = 'alert'),
     (SELECT count(*) FROM records r WHERE r.agent_id = a.agent_id AND kind = 'event'),
     CAST((SELECT coalesce(sum(to_seq - from_seq + 1), 0) FROM gaps g WHERE g.agent_id = a.agent_id AND kind = 'shed') AS BIGINT),
     CAST((SELECT coalesce(sum(to_seq - from_seq + 1), 0) FROM gaps g WHERE g.agent_id = a.agent_id AND kind = 'reset') AS BIGINT),
     shed_events, shed_alerts";

/// The raw values of one row of [`AGENT_COLUMNS`].
pub(crate) struct AgentValues {
    pub agent_id: String,
    pub host: String,
    pub kernel: String,
    pub agent_version: String,
    pub epmm_version: String,
    pub hotfix_installed: bool,
    pub hotfix_evidence: String,
    pub peer: String,
    pub last_seen_ns: i64,
    pub last_seq: i64,
    pub contiguous: i64,
    pub kernel_lost: String,
    pub spool_pending: i64,
    pub alerts: i64,
    pub events: i64,
    pub shed: i64,
    pub gap: i64,
    pub shed_events: i64,
    pub shed_alerts: i64,
}

impl AgentValues {
    pub(crate) fn row(self, now: i64, silent_after_ns: i64) -> AgentRow {
        let (last_seq, contiguous) = (self.last_seq as u64, self.contiguous as u64);
        AgentRow {
            vulnerable: vulnerable(&self.epmm_version, self.hotfix_installed),
            agent_id: self.agent_id,
            host: self.host,
            kernel: self.kernel,
            agent_version: self.agent_version,
            epmm_version: self.epmm_version,
            hotfix_installed: self.hotfix_installed,
            hotfix_evidence: self.hotfix_evidence,
            peer: self.peer,
            last_seen: humantime::format_rfc3339_millis(
                UNIX_EPOCH + std::time::Duration::from_nanos(self.last_seen_ns.max(0) as u64),
            )
            .to_string(),
            silent: now - self.last_seen_ns > silent_after_ns,
            last_seq,
            contiguous_seq: contiguous,
            outstanding: last_seq.saturating_sub(contiguous),
            spool_pending: self.spool_pending as u64,
            alerts: self.alerts as u64,
            events: self.events as u64,
            shed: self.shed as u64,
            gap: self.gap as u64,
            shed_reported: (self.shed_events + self.shed_alerts) as u64,
            kernel_lost: serde_json::from_str(&self.kernel_lost).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vulnerability() {
        assert!(vulnerable("12.7.0.0 Build 55", false));
        assert!(vulnerable("11.12.0.1", false));
        assert!(!vulnerable("12.7.0.0", true), "hotfixed");
        assert!(!vulnerable("12.8.0.0", false), "fixed release");
        assert!(!vulnerable("", false), "not an EPMM appliance");
    }

    #[test]
    fn db_urls_and_files() {
        assert!(matches!(Db::parse("c.db", None).unwrap(), Db::Sqlite(_)));
        let pg = Db::parse("postgres://sensor:secret@127.0.0.1:5432/sensor", None).unwrap();
        assert_eq!(pg.describe(), "postgres://sensor@127.0.0.1:5432/sensor");
        let err = Db::parse("mysql://h/db", None).unwrap_err().to_string();
        assert!(err.contains("postgres://"), "{err}");
        let err = Db::parse("postgres://h/db?sslmode=require", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--db-ca"), "{err}");
        let err = Db::parse("postgres://h:nope/db", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--db"), "{err}");
    }
}
