//! Forwarding every stored alert to a SIEM over syslog: RFC 5424 messages over TCP with
//! octet-counting framing (RFC 6587), one forwarder per target.
//!
//! Each target has a durable cursor in the store (`forward`: the last alert row it
//! took): the forwarder reads the alerts after it, writes them, checks that the receiver
//! has not closed the connection, and only then moves the cursor. A SIEM outage delays
//! and never drops: the forwarder reconnects with back-off and starts again from the
//! cursor. Delivery is at least once: an alert the receiver took just before it went away
//! can come again, with the same `id` in its structured data.
//!
//! The message is the alert's JSON line; the header and structured data carry what a SIEM
//! routes on: `<PRI>1 TIME HOST sensor-agent - RULE [sensor@32473 id="AGENT:SEQ"
//! alert="AGENT:N" rule=".." severity=".." agent=".."] {json}`; `id` is the store's key,
//! unique for ever (what a SIEM de-duplicates on), `alert` the alert's own id. Facility 13 (log audit); severity critical -> 2,
//! high -> 3, medium -> 4, low -> 5.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::watch};
use tracing::{info, warn};

/// Alerts read and written per round.
const BATCH: i64 = 256;
/// How long an idle forwarder waits before looking for new alerts.
const IDLE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A syslog receiver: `tcp://HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// As given: the cursor's key in the store.
    pub name: String,
    pub host: String,
    pub port: u16,
}

pub fn parse_target(s: &str) -> Result<Target, String> {
    let rest = s
        .strip_prefix("tcp://")
        .ok_or_else(|| format!("{s:?}: a syslog target is tcp://HOST:PORT"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: no port (tcp://HOST:PORT)"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?}: the port is 1-65535"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{s:?}: no host"));
    }
    Ok(Target {
        name: s.to_owned(),
        host: host.to_owned(),
        port,
    })
}

/// One stored alert, as the forwarder reads it.
#[derive(Debug)]
struct Row {
    rowid: i64,
    agent_id: String,
    seq: i64,
    time_ns: i64,
    rule_id: String,
    severity: i32,
    host: String,
    json: String,
}

fn read_batch(conn: &Connection, after: i64) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached(
        "SELECT rowid, agent_id, seq, time_ns, rule_id, severity, host, json FROM alerts
         WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
    )?;
    stmt.query_map(params![after, BATCH], |r| {
        Ok(Row {
            rowid: r.get(0)?,
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

fn set_cursor(conn: &Connection, target: &str, rowid: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO forward (target, last_rowid) VALUES (?1, ?2)
         ON CONFLICT (target) DO UPDATE SET last_rowid = excluded.last_rowid",
        params![target, rowid],
    )?;
    Ok(())
}

/// Printable ASCII without spaces, at most `max` characters, "-" when empty (RFC 5424's
/// HOSTNAME, APP-NAME and MSGID).
fn header_field(s: &str, max: usize) -> String {
    let f: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if f.is_empty() { "-".to_owned() } else { f }
}

/// An SD-PARAM value: `"`, `\` and `]` escaped.
fn param(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn severities(severity: i32) -> (u8, &'static str) {
    use sensor_proto::v1::Severity;
    match Severity::try_from(severity) {
        Ok(Severity::Critical) => (2, "critical"),
        Ok(Severity::High) => (3, "high"),
        Ok(Severity::Medium) => (4, "medium"),
        Ok(Severity::Low) => (5, "low"),
        _ => (5, "unspecified"),
    }
}

/// The RFC 5424 message of one alert, framed with its length (RFC 6587 octet counting).
fn frame(row: &Row) -> Vec<u8> {
    const FACILITY_LOG_AUDIT: u8 = 13;
    let (level, severity) = severities(row.severity);
    let time = humantime::format_rfc3339_micros(
        std::time::UNIX_EPOCH + Duration::from_nanos(row.time_ns.max(0) as u64),
    );
    // The store's key (agent id, sequence number) is unique for ever; the alert's own id
    // (`AGENT:N`, as the agent printed it) restarts with each agent run.
    let id = format!("{}:{}", row.agent_id, row.seq);
    let alert_id = serde_json::from_str::<serde_json::Value>(&row.json)
        .ok()
        .and_then(|v| v["alert"]["id"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let message = format!(
        "<{}>1 {time} {} sensor-agent - {} [sensor@32473 id=\"{}\" alert=\"{}\" rule=\"{}\" severity=\"{severity}\" agent=\"{}\"] {}",
        FACILITY_LOG_AUDIT * 8 + level,
        header_field(&row.host, 255),
        header_field(&row.rule_id, 32),
        param(&id),
        param(&alert_id),
        param(&row.rule_id),
        param(&row.agent_id),
        row.json,
    );
    let mut out = format!("{} ", message.len()).into_bytes();
    out.extend_from_slice(message.as_bytes());
    out
}

/// Forwards to `target` until `stop` is set.
pub async fn run(db: PathBuf, target: Target, mut stop: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        if *stop.borrow() {
            return;
        }
        match forward(&db, &target, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                warn!(target = %target.name, error = %format!("{e:#}"), retry_in = ?backoff, "syslog forwarding interrupted; the alerts wait in the store");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection's worth of forwarding; `Ok` only when asked to stop.
async fn forward(
    db: &Path,
    target: &Target,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let conn = open(db)?;
    let mut after = cursor(&conn, &target.name)?;
    let mut stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .with_context(|| format!("cannot connect to {}:{}", target.host, target.port))?;
    stream.set_nodelay(true)?;
    info!(target = %target.name, from_row = after, "forwarding alerts to syslog");
    loop {
        let rows = read_batch(&conn, after)?;
        if rows.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(IDLE) => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            receiver_alive(&stream)?;
            continue;
        }
        let mut bytes = Vec::new();
        for row in &rows {
            bytes.extend_from_slice(&frame(row));
        }
        stream
            .write_all(&bytes)
            .await
            .context("the receiver went away")?;
        stream.flush().await?;
        // A receiver that closed its end has not taken these: the cursor stays.
        tokio::time::sleep(Duration::from_millis(20)).await;
        receiver_alive(&stream)?;
        let last = rows.last().map_or(after, |r| r.rowid);
        set_cursor(&conn, &target.name, last)?;
        after = last;
    }
}

/// Errors when the receiver closed the connection (it never sends anything).
fn receiver_alive(stream: &TcpStream) -> anyhow::Result<()> {
    let mut buf = [0u8; 64];
    match stream.try_read(&mut buf) {
        Ok(0) => anyhow::bail!("the receiver closed the connection"),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e).context("the connection failed"),
    }
}

fn open(db: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(db)
        .with_context(|| format!("--db {}: cannot open for forwarding", db.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_target("tcp://127.0.0.1:6514").unwrap(),
            Target {
                name: "tcp://127.0.0.1:6514".into(),
                host: "127.0.0.1".into(),
                port: 6514
            }
        );
        assert_eq!(parse_target("tcp://[::1]:514").unwrap().host, "::1");
        for (bad, why) in [
            ("udp://h:514", "tcp://HOST:PORT"),
            ("tcp://h", "no port"),
            ("tcp://h:0", "1-65535"),
            ("tcp://:514", "no host"),
        ] {
            let err = parse_target(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn frames_are_rfc5424_with_octet_counting() {
        let row = Row {
            rowid: 7,
            agent_id: "agent-1".into(),
            seq: 42,
            time_ns: 1_769_766_000_123_456_789,
            rule_id: "EPMM-B1".into(),
            severity: sensor_proto::v1::Severity::Critical as i32,
            host: "epmm 01".into(),
            json:
                r#"{"alert":{"id":"agent-1:9","ruleId":"EPMM-B1","title":"a \"quoted\" ]title"}}"#
                    .into(),
        };
        let framed = String::from_utf8(frame(&row)).unwrap();
        let (len, message) = framed.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), message.len());
        assert!(
            message
                .starts_with("<106>1 2026-01-30T09:40:00.123456Z epmm01 sensor-agent - EPMM-B1 "),
            "{message}"
        );
        assert!(
            message.contains(
                r#"[sensor@32473 id="agent-1:42" alert="agent-1:9" rule="EPMM-B1" severity="critical" agent="agent-1"] {"alert""#
            ),
            "{message}"
        );
        assert!(message.ends_with(&row.json));
        assert_eq!(param(r#"a"b\c]"#), r#"a\"b\\c\]"#);
    }
}
