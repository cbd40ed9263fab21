//! The PostgreSQL store (`--db postgres://USER@HOST:PORT/DB`): any number of collectors
//! share one database.
//!
//! - De-duplication is the primary key (agent id, sequence number) of `records`; an
//!   insert that meets it does nothing, whichever collector made the first one.
//! - Each batch takes the rows of its agents (`SELECT ... FOR UPDATE`, in id order) before
//!   it reads their contiguous mark: an agent that fails over while its old stream is
//!   still being committed elsewhere has its bookkeeping done one transaction at a time.
//! - An acknowledgement is sent only after COMMIT returned; a batch that fails (the
//!   database restarted, the connection broke) is rolled back, answered with an error,
//!   and resent by the agent; the writer reconnects for the next batch.
//! - Forwarders read alerts in the order they became visible to everyone, not in row-id
//!   order: two collectors' transactions take row ids concurrently and commit in any
//!   order, so a row with a lower id can appear after a reader passed it. Every alert row
//!   carries the id of the transaction that wrote it (`xid8`); a forwarder takes only rows
//!   of transactions older than the oldest one still running (`pg_snapshot_xmin`), in
//!   (transaction, row) order, and keeps that pair as its cursor. No such row can appear
//!   later. A transaction left open somewhere in the database delays forwarding; it never
//!   makes it skip.
//! - Schema migrations are numbered (`schema_migrations`), applied at start in one
//!   transaction under an advisory lock (collectors starting together apply them once);
//!   a database migrated by a newer collector is refused.
//! - PostgreSQL text cannot hold NUL: NULs in what agents send become U+FFFD (the JSON
//!   lines escape them and are stored as they are).

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use sensor_proto::v1::{AgentIdentity, Heartbeat};
use tokio_postgres::{Client, Config, NoTls, Statement, config::SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

use super::{
    AGENT_COLUMNS, AgentRow, AgentValues, AlertQuery, AlertRow, Backend, ForwardRow, Pos, Result,
    now_ns,
};

/// The numbered migrations; each runs once, in order, in the start-up transaction.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "
CREATE TABLE agents (
    agent_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    kernel TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    epmm_version TEXT NOT NULL,
    hotfix_installed BOOLEAN NOT NULL,
    hotfix_evidence TEXT NOT NULL,
    peer TEXT NOT NULL,
    first_seen_ns BIGINT NOT NULL,
    last_seen_ns BIGINT NOT NULL,
    last_seq BIGINT NOT NULL DEFAULT 0,
    contiguous BIGINT NOT NULL DEFAULT 0,
    kernel_lost TEXT NOT NULL DEFAULT '{}',
    shed_events BIGINT NOT NULL DEFAULT 0,
    shed_alerts BIGINT NOT NULL DEFAULT 0,
    spool_pending BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE records (
    agent_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
);
CREATE TABLE gaps (
    agent_id TEXT NOT NULL,
    from_seq BIGINT NOT NULL,
    to_seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    noticed_ns BIGINT NOT NULL,
    UNIQUE (agent_id, from_seq, to_seq, kind)
);
CREATE TABLE alerts (
    row_id BIGINT GENERATED ALWAYS AS IDENTITY,
    xid XID8 NOT NULL DEFAULT pg_current_xact_id(),
    agent_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    time_ns BIGINT NOT NULL,
    rule_id TEXT NOT NULL,
    severity INTEGER NOT NULL,
    title TEXT NOT NULL,
    host TEXT NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
);
CREATE INDEX alerts_visible ON alerts (xid, row_id);
CREATE INDEX alerts_time ON alerts (time_ns);
CREATE INDEX alerts_rule ON alerts (rule_id);
CREATE TABLE events (
    agent_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (agent_id, seq)
);
-- Per syslog target: the last alert forwarded to it, as (transaction, row).
CREATE TABLE forward (target TEXT PRIMARY KEY, last_xid XID8 NOT NULL, last_row BIGINT NOT NULL);
",
)];

/// Any constant: the advisory lock the start-up migration holds.
const MIGRATION_LOCK: i64 = 0x5e_5501_c011;

/// A database to reach: the parsed URL and, for TLS, the connector.
#[derive(Clone)]
pub struct Target {
    config: Config,
    tls: Option<MakeRustlsConnect>,
    described: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.described)
    }
}

impl Target {
    /// libpq's URL form. TLS when the URL says `sslmode=require` or `--db-ca` is given:
    /// the server's certificate must chain to `ca` and name the host. A password not in
    /// the URL is taken from `PGPASSWORD` (a systemd credential or environment file
    /// keeps it off the command line).
    pub fn parse(url: &str, ca: Option<&Path>) -> Result<Target> {
        let mut config: Config = url
            .parse()
            .map_err(|e| anyhow::anyhow!("--db {}: not a PostgreSQL URL: {e}", redact(url)))?;
        if config.get_password().is_none()
            && let Ok(password) = std::env::var("PGPASSWORD")
        {
            config.password(password);
        }
        config.connect_timeout(Duration::from_secs(10));
        config.application_name("sensor-collector");
        let described = describe(&config);
        let tls = match (ca, config.get_ssl_mode()) {
            (Some(ca), _) => {
                config.ssl_mode(SslMode::Require);
                let client =
                    crate::forward::client_config(ca, "--db-ca").map_err(anyhow::Error::msg)?;
                Some(MakeRustlsConnect::new(client))
            }
            (None, SslMode::Require) => anyhow::bail!(
                "--db {described}: sslmode=require needs --db-ca FILE (the CA of the \
                 database server's certificate)"
            ),
            (None, _) => {
                config.ssl_mode(SslMode::Disable);
                None
            }
        };
        Ok(Target {
            config,
            tls,
            described,
        })
    }

    pub fn describe(&self) -> String {
        self.described.clone()
    }

    /// A connection; its protocol task runs on the current runtime until the client goes.
    async fn connect(&self) -> Result<Client> {
        let what = || format!("--db {}: cannot connect", self.described);
        let client = match &self.tls {
            Some(tls) => {
                let (client, connection) =
                    self.config.connect(tls.clone()).await.with_context(what)?;
                tokio::spawn(connection);
                client
            }
            None => {
                let (client, connection) = self.config.connect(NoTls).await.with_context(what)?;
                tokio::spawn(connection);
                client
            }
        };
        Ok(client)
    }
}

fn redact(url: &str) -> String {
    url.parse::<Config>()
        .map(|c| describe(&c))
        .unwrap_or_else(|_| "(the URL given)".to_owned())
}

/// `postgres://USER@HOST:PORT/DB`, never the password.
fn describe(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

/// Checks the database at start (reachable, credentials, schema) and applies what
/// migrations it lacks; on a runtime of its own (the serving one does not exist yet).
pub fn prepare(target: &Target) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = target.connect().await?;
        migrate(&mut client)
            .await
            .with_context(|| format!("--db {}: schema migration", target.described))
    })
}

async fn migrate(client: &mut Client) -> Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await?
        .get(0);
    let newest = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > newest {
        anyhow::bail!(
            "the database is at schema version {current}, this collector knows up to \
             {newest}: upgrade the collector"
        );
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("migration {version}"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await?;
        info!(version, "database schema migrated");
    }
    tx.commit().await?;
    Ok(())
}

/// Text PostgreSQL can store: NUL becomes U+FFFD.
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// The writer's statements, prepared once per connection.
struct Statements {
    lock_agents: Statement,
    upsert_agent: Statement,
    contiguous: Statement,
    set_contiguous: Statement,
    stored_any: Statement,
    add_gap: Statement,
    advance: Statement,
    insert_records: Statement,
    insert_alerts: Statement,
    insert_events: Statement,
    touch_agents: Statement,
    heartbeat: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements> {
        Ok(Statements {
            lock_agents: client
                .prepare(
                    "SELECT agent_id FROM agents WHERE agent_id = ANY($1::text[])
                     ORDER BY agent_id FOR UPDATE",
                )
                .await?,
            upsert_agent: client
                .prepare(
                    "INSERT INTO agents (agent_id, host, kernel, agent_version, epmm_version,
                        hotfix_installed, hotfix_evidence, peer, first_seen_ns, last_seen_ns, last_seq)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)
                     ON CONFLICT (agent_id) DO UPDATE SET host = EXCLUDED.host,
                        kernel = EXCLUDED.kernel, agent_version = EXCLUDED.agent_version,
                        epmm_version = EXCLUDED.epmm_version,
                        hotfix_installed = EXCLUDED.hotfix_installed,
                        hotfix_evidence = EXCLUDED.hotfix_evidence, peer = EXCLUDED.peer,
                        last_seen_ns = EXCLUDED.last_seen_ns,
                        last_seq = GREATEST(agents.last_seq, EXCLUDED.last_seq)",
                )
                .await?,
            contiguous: client
                .prepare("SELECT contiguous FROM agents WHERE agent_id = $1")
                .await?,
            set_contiguous: client
                .prepare("UPDATE agents SET contiguous = $2 WHERE agent_id = $1")
                .await?,
            stored_any: client
                .prepare("SELECT EXISTS (SELECT 1 FROM records WHERE agent_id = $1)")
                .await?,
            add_gap: client
                .prepare(
                    "INSERT INTO gaps (agent_id, from_seq, to_seq, kind, noticed_ns)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                )
                .await?,
            advance: client.prepare(super::ADVANCE).await?,
            insert_records: client
                .prepare(
                    "INSERT INTO records (agent_id, seq, kind)
                     SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])
                     ON CONFLICT DO NOTHING RETURNING agent_id, seq",
                )
                .await?,
            insert_alerts: client
                .prepare(
                    "INSERT INTO alerts (agent_id, seq, time_ns, rule_id, severity, title, host, json)
                     SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[],
                        $5::int4[], $6::text[], $7::text[], $8::text[])
                     ON CONFLICT DO NOTHING",
                )
                .await?,
            insert_events: client
                .prepare(
                    "INSERT INTO events (agent_id, seq, json)
                     SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])
                     ON CONFLICT DO NOTHING",
                )
                .await?,
            touch_agents: client
                .prepare(
                    "UPDATE agents a SET last_seen_ns = $1, last_seq = GREATEST(a.last_seq, u.l)
                     FROM unnest($2::text[], $3::bigint[]) AS u(id, l) WHERE a.agent_id = u.id",
                )
                .await?,
            heartbeat: client
                .prepare(
                    "UPDATE agents SET last_seen_ns = $2, last_seq = GREATEST(last_seq, $3),
                        kernel_lost = $4, shed_events = $5, shed_alerts = $6,
                        spool_pending = $7
                     WHERE agent_id = $1",
                )
                .await?,
        })
    }
}

/// The writer's connection: made on the store thread's runtime at the first batch, made
/// again for the next batch after it broke.
pub struct PgBackend {
    target: Target,
    live: Option<(Client, Statements)>,
}

impl PgBackend {
    pub fn new(target: Target) -> Self {
        Self { target, live: None }
    }

    fn live(&self) -> Result<&(Client, Statements)> {
        self.live.as_ref().context("no connection to the database")
    }
}

impl Backend for PgBackend {
    async fn begin(&mut self) -> Result<()> {
        if self.live.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            warn!(db = %self.target.described, "the database connection closed; reconnecting");
            self.live = None;
        }
        if self.live.is_none() {
            let client = self.target.connect().await?;
            let statements = Statements::prepare(&client).await?;
            self.live = Some((client, statements));
        }
        Ok(self.live()?.0.batch_execute("BEGIN").await?)
    }

    async fn commit(&mut self) -> Result<()> {
        Ok(self.live()?.0.batch_execute("COMMIT").await?)
    }

    async fn rollback(&mut self) {
        if let Some((client, _)) = &self.live
            && client.batch_execute("ROLLBACK").await.is_err()
        {
            self.live = None;
        }
    }

    async fn lock_agents(&mut self, agent_ids: &[&str]) -> Result<()> {
        let (c, s) = self.live()?;
        c.query(&s.lock_agents, &[&agent_ids]).await?;
        Ok(())
    }

    async fn upsert_agent(
        &mut self,
        identity: &AgentIdentity,
        peer: &str,
        now: i64,
        last_seq: i64,
    ) -> Result<()> {
        let (c, s) = self.live()?;
        c.execute(
            &s.upsert_agent,
            &[
                &text(&identity.agent_id),
                &text(&identity.host),
                &text(&identity.kernel),
                &text(&identity.agent_version),
                &text(&identity.epmm_version),
                &identity.hotfix_installed,
                &text(&identity.hotfix_evidence),
                &text(peer),
                &now,
                &last_seq,
            ],
        )
        .await?;
        Ok(())
    }

    async fn contiguous(&mut self, agent_id: &str) -> Result<u64> {
        let (c, s) = self.live()?;
        let row = c.query_opt(&s.contiguous, &[&text(agent_id)]).await?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0)) as u64)
    }

    async fn set_contiguous(&mut self, agent_id: &str, value: u64) -> Result<()> {
        let (c, s) = self.live()?;
        c.execute(
            &s.set_contiguous,
            &[&text(agent_id), &super::sql_u64(value)],
        )
        .await?;
        Ok(())
    }

    async fn stored_any(&mut self, agent_id: &str) -> Result<bool> {
        let (c, s) = self.live()?;
        Ok(c.query_one(&s.stored_any, &[&text(agent_id)]).await?.get(0))
    }

    async fn add_gap(&mut self, agent_id: &str, from: u64, to: u64, kind: &str) -> Result<bool> {
        let (c, s) = self.live()?;
        Ok(c.execute(
            &s.add_gap,
            &[
                &text(agent_id),
                &super::sql_u64(from),
                &super::sql_u64(to),
                &kind,
                &now_ns(),
            ],
        )
        .await?
            > 0)
    }

    /// One statement per agent, sent together: the driver pipelines them (one round
    /// trip for the batch).
    async fn advance(&mut self, agent_ids: &[&str]) -> Result<HashMap<String, u64>> {
        let (c, s) = self.live()?;
        let ids: Vec<Cow<'_, str>> = agent_ids.iter().map(|a| text(a)).collect();
        let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> =
            ids.iter().map(|id| [id as _]).collect();
        let rows =
            futures_util::future::try_join_all(params.iter().map(|p| c.query_opt(&s.advance, p)))
                .await?;
        Ok(agent_ids
            .iter()
            .zip(rows)
            .map(|(id, row)| {
                let mark = row.map_or(0, |r| r.get::<_, i64>(0)) as u64;
                ((*id).to_owned(), mark)
            })
            .collect())
    }

    async fn insert_records(
        &mut self,
        records: &[(&str, i64, &'static str)],
    ) -> Result<HashSet<usize>> {
        let (c, s) = self.live()?;
        let agents: Vec<Cow<'_, str>> = records.iter().map(|r| text(r.0)).collect();
        let seqs: Vec<i64> = records.iter().map(|r| r.1).collect();
        let kinds: Vec<&str> = records.iter().map(|r| r.2).collect();
        // Rows come back as stored: (agent id, number) -> its position in `records` (the
        // first, for a record the batch holds twice: the second meets the first).
        let mut position: HashMap<(&str, i64), usize> = HashMap::with_capacity(records.len());
        for (i, (agent, seq)) in agents.iter().zip(&seqs).enumerate() {
            position.entry((agent.as_ref(), *seq)).or_insert(i);
        }
        let agents: Vec<&str> = agents.iter().map(|a| a.as_ref()).collect();
        Ok(c.query(&s.insert_records, &[&agents, &seqs, &kinds])
            .await?
            .iter()
            .filter_map(|r| {
                position
                    .get(&(r.get::<_, &str>(0), r.get::<_, i64>(1)))
                    .copied()
            })
            .collect())
    }

    async fn insert_alerts(&mut self, rows: &[AlertRow]) -> Result<()> {
        let (c, s) = self.live()?;
        let owned = |f: fn(&AlertRow) -> &str| -> Vec<String> {
            rows.iter().map(|a| text(f(a)).into_owned()).collect()
        };
        let agent = owned(|a| &a.agent_id);
        let rule = owned(|a| &a.rule_id);
        let title = owned(|a| &a.title);
        let host = owned(|a| &a.host);
        let seq: Vec<i64> = rows.iter().map(|a| a.seq).collect();
        let time: Vec<i64> = rows.iter().map(|a| a.time_ns).collect();
        let severity: Vec<i32> = rows.iter().map(|a| a.severity).collect();
        let json: Vec<&str> = rows.iter().map(|a| a.json.as_str()).collect();
        c.execute(
            &s.insert_alerts,
            &[&agent, &seq, &time, &rule, &severity, &title, &host, &json],
        )
        .await?;
        Ok(())
    }

    async fn insert_events(&mut self, rows: &[(&str, i64, String)]) -> Result<()> {
        let (c, s) = self.live()?;
        let agent: Vec<String> = rows.iter().map(|r| text(r.0).into_owned()).collect();
        let seq: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let json: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
        c.execute(&s.insert_events, &[&agent, &seq, &json]).await?;
        Ok(())
    }

    async fn touch_agents(&mut self, agents: &[(&str, i64)], now: i64) -> Result<()> {
        let (c, s) = self.live()?;
        let ids: Vec<String> = agents.iter().map(|a| text(a.0).into_owned()).collect();
        let last: Vec<i64> = agents.iter().map(|a| a.1).collect();
        c.execute(&s.touch_agents, &[&now, &ids, &last]).await?;
        Ok(())
    }

    async fn heartbeat(
        &mut self,
        agent_id: &str,
        now: i64,
        heartbeat: &Heartbeat,
        kernel_lost: &str,
    ) -> Result<()> {
        let (c, s) = self.live()?;
        c.execute(
            &s.heartbeat,
            &[
                &text(agent_id),
                &now,
                &super::sql_u64(heartbeat.last_seq),
                &text(kernel_lost),
                &super::sql_u64(heartbeat.spool_shed_events),
                &super::sql_u64(heartbeat.spool_shed_alerts),
                &super::sql_u64(heartbeat.spool_pending),
            ],
        )
        .await?;
        Ok(())
    }
}

/// A connection for queries, with the schema checked (never created).
async fn query_connection(target: &Target) -> Result<Client> {
    let client = target.connect().await?;
    let version: Option<i32> = client
        .query_one(
            "SELECT CASE WHEN to_regclass('schema_migrations') IS NULL THEN NULL
                    ELSE (SELECT max(version) FROM schema_migrations) END",
            &[],
        )
        .await?
        .get(0);
    if version.is_none() {
        anyhow::bail!(
            "--db {}: not a collector database (no schema; a collector creates it at start)",
            target.described
        );
    }
    Ok(client)
}

pub async fn query_alerts(target: &Target, q: &AlertQuery) -> Result<Vec<String>> {
    let client = query_connection(target).await?;
    let rows = client
        .query(
            "SELECT json FROM alerts
             WHERE ($1::text IS NULL OR agent_id = $1) AND ($2::text IS NULL OR rule_id = $2)
               AND severity >= $3 AND ($4::bigint IS NULL OR time_ns >= $4)
               AND ($5::bigint IS NULL OR time_ns <= $5)
             ORDER BY time_ns, agent_id, seq LIMIT $6",
            &[
                &q.agent,
                &q.rule,
                &q.severity.map_or(0, |s| s as i32),
                &q.since_ns,
                &q.until_ns,
                &q.limit.map_or(i64::MAX, super::sql_u64),
            ],
        )
        .await
        .context("cannot query the alerts")?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub async fn query_agents(target: &Target, silent_after_ns: i64) -> Result<Vec<AgentRow>> {
    let client = query_connection(target).await?;
    let now = now_ns();
    let rows = client
        .query(
            &format!("SELECT {AGENT_COLUMNS} FROM agents a ORDER BY a.agent_id"),
            &[],
        )
        .await
        .context("cannot query the agents")?;
    Ok(rows
        .iter()
        .map(|r| {
            AgentValues {
                agent_id: r.get(0),
                host: r.get(1),
                kernel: r.get(2),
                agent_version: r.get(3),
                epmm_version: r.get(4),
                hotfix_installed: r.get(5),
                hotfix_evidence: r.get(6),
                peer: r.get(7),
                last_seen_ns: r.get(8),
                last_seq: r.get(9),
                contiguous: r.get(10),
                kernel_lost: r.get(11),
                spool_pending: r.get(12),
                alerts: r.get(13),
                events: r.get(14),
                shed: r.get(15),
                gap: r.get(16),
                shed_events: r.get(17),
                shed_alerts: r.get(18),
            }
            .row(now, silent_after_ns)
        })
        .collect())
}

/// `--retain` on PostgreSQL: row ids are never reused, so no row needs keeping for them.
pub async fn prune(target: &Target, before_ns: i64, targets: &[String]) -> Result<usize> {
    let client = query_connection(target).await?;
    let mut oldest: Option<Pos> = None;
    for name in targets {
        let pos = cursor(&client, name).await?;
        oldest = Some(oldest.map_or(pos, |o| o.min(pos)));
    }
    let deleted = match oldest {
        None => {
            client
                .execute("DELETE FROM alerts WHERE time_ns < $1", &[&before_ns])
                .await?
        }
        Some((xid, row)) => {
            client
                .execute(
                    "DELETE FROM alerts WHERE time_ns < $1
                     AND (xid, row_id) <= ($2::text::xid8, $3)",
                    &[&before_ns, &xid.to_string(), &row],
                )
                .await?
        }
    };
    Ok(deleted as usize)
}

async fn cursor(client: &Client, target: &str) -> Result<Pos> {
    let row = client
        .query_opt(
            "SELECT last_xid::text, last_row FROM forward WHERE target = $1",
            &[&target],
        )
        .await?;
    Ok(match row {
        Some(r) => (r.get::<_, String>(0).parse()?, r.get(1)),
        None => (0, 0),
    })
}

/// How often a collector that does not hold a target's lock tries again.
const STANDBY_RETRY: Duration = Duration::from_secs(2);

/// A forwarder's connection, holding its target's advisory lock for as long as it lives.
pub struct ForwardConn {
    client: Client,
}

/// Connects and waits for `target_name`'s lock (`None` when asked to stop first).
pub async fn forward_source(
    target: &Target,
    target_name: &str,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Option<ForwardConn>> {
    let client = target.connect().await?;
    let key = format!("sensor-collector forward {target_name}");
    let mut told = false;
    loop {
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
            .await?
            .get(0);
        if got {
            return Ok(Some(ForwardConn { client }));
        }
        if !told {
            info!(
                target = target_name,
                "another collector forwards to this target; standing by"
            );
            told = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(STANDBY_RETRY) => {}
            _ = stop.wait_for(|s| *s) => return Ok(None),
        }
    }
}

impl ForwardConn {
    pub async fn cursor(&mut self, target: &str) -> Result<Pos> {
        cursor(&self.client, target).await
    }

    pub async fn read_batch(&mut self, after: Pos, limit: i64) -> Result<Vec<ForwardRow>> {
        let rows = self
            .client
            .query(
                "SELECT xid::text, row_id, agent_id, seq, time_ns, rule_id, severity, host, json
                 FROM alerts
                 WHERE (xid, row_id) > ($1::text::xid8, $2)
                   AND xid < pg_snapshot_xmin(pg_current_snapshot())
                 ORDER BY xid, row_id LIMIT $3",
                &[&after.0.to_string(), &after.1, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ForwardRow {
                    pos: (r.get::<_, String>(0).parse()?, r.get(1)),
                    agent_id: r.get(2),
                    seq: r.get(3),
                    time_ns: r.get(4),
                    rule_id: r.get(5),
                    severity: r.get(6),
                    host: r.get(7),
                    json: r.get(8),
                })
            })
            .collect()
    }

    pub async fn set_cursor(&mut self, target: &str, pos: Pos) -> Result<()> {
        self.client
            .execute(
                "INSERT INTO forward (target, last_xid, last_row) VALUES ($1, $2::text::xid8, $3)
                 ON CONFLICT (target) DO UPDATE SET last_xid = EXCLUDED.last_xid,
                    last_row = EXCLUDED.last_row",
                &[&target, &pos.0.to_string(), &pos.1],
            )
            .await?;
        Ok(())
    }

    pub async fn lag(&mut self, after: Pos) -> Result<i64> {
        Ok(self
            .client
            .query_one(
                "SELECT count(*) FROM alerts WHERE (xid, row_id) > ($1::text::xid8, $2)",
                &[&after.0.to_string(), &after.1],
            )
            .await?
            .get(0))
    }
}
