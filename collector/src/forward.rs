//! Forwarding every stored alert to a SIEM over syslog: RFC 5424 messages over TCP with
//! octet-counting framing (RFC 6587), or over TLS (RFC 5425, `tls://`, the receiver's
//! certificate checked against `--forward-ca`), one forwarder per target.
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

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::watch};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tracing::{info, warn};

use crate::store::{Db, ForwardRow as Row};

/// Alerts read and written per round.
const BATCH: i64 = 256;
/// How long an idle forwarder waits before looking for new alerts.
const IDLE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A syslog receiver: `tcp://HOST:PORT` or `tls://HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// As given: the cursor's key in the store.
    pub name: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

pub fn parse_target(s: &str) -> Result<Target, String> {
    let (tls, rest) = match (s.strip_prefix("tcp://"), s.strip_prefix("tls://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => {
            return Err(format!(
                "{s:?}: a syslog target is tcp://HOST:PORT or tls://HOST:PORT"
            ));
        }
    };
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
        tls,
    })
}

/// How `tls://` targets are reached: the CA (PEM) their certificates must chain to.
pub fn tls_connector(ca: &Path) -> Result<TlsConnector, String> {
    Ok(TlsConnector::from(Arc::new(client_config(
        ca,
        "--forward-ca",
    )?)))
}

/// A TLS client that trusts the certificates of `ca` (PEM; `flag` names it in errors)
/// and checks the server's name: syslog receivers, the PostgreSQL server.
pub fn client_config(ca: &Path, flag: &str) -> Result<rustls::ClientConfig, String> {
    let pem = sensor_proto::pem::certificates(ca, flag)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("{flag} {}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{flag} {}: {e}", ca.display()))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// A connection to a receiver.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    async fn open(target: &Target, tls: Option<&TlsConnector>) -> anyhow::Result<Conn> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .with_context(|| format!("cannot connect to {}:{}", target.host, target.port))?;
        tcp.set_nodelay(true)?;
        if !target.tls {
            return Ok(Conn::Plain(tcp));
        }
        let connector = tls.context("tls:// targets need --forward-ca")?;
        let name = ServerName::try_from(target.host.clone())
            .with_context(|| format!("{}: not a DNS name or address", target.host))?;
        let stream = tokio::time::timeout(Duration::from_secs(15), connector.connect(name, tcp))
            .await
            .context("no TLS handshake within 15 s")?
            .context("TLS handshake")?;
        Ok(Conn::Tls(Box::new(stream)))
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Conn::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    /// Errors when the receiver closed the connection (receivers never send data; a TLS
    /// receiver's session tickets are taken by the TLS layer, its close is end of data).
    async fn alive(&mut self) -> anyhow::Result<()> {
        let mut buf = [0u8; 64];
        let read = match self {
            Conn::Plain(s) => match s.try_read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                other => other,
            },
            Conn::Tls(s) => {
                use tokio::io::AsyncReadExt;
                // Polled once: nothing to read is the usual answer.
                match tokio::time::timeout(Duration::ZERO, s.read(&mut buf)).await {
                    Err(_) => return Ok(()),
                    Ok(read) => read,
                }
            }
        };
        match read {
            Ok(0) => anyhow::bail!("the receiver closed the connection"),
            Ok(_) => Ok(()),
            Err(e) => Err(e).context("the connection failed"),
        }
    }
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
pub async fn run(
    db: Db,
    target: Target,
    tls: Option<TlsConnector>,
    metrics: Arc<crate::metrics::Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        if *stop.borrow() {
            return;
        }
        let started = std::time::Instant::now();
        match forward(&db, &target, tls.as_ref(), &metrics, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                // A connection that served for a while starts the back-off again.
                if started.elapsed() > BACKOFF_MAX * 2 {
                    backoff = Duration::from_millis(250);
                }
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
    db: &Db,
    target: &Target,
    tls: Option<&TlsConnector>,
    metrics: &crate::metrics::Metrics,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Some(mut source) = db.forward_source(&target.name, stop).await? else {
        return Ok(());
    };
    let label = metrics.target(&target.name);
    let lag = metrics.forward_lag.get_or_create(&label).clone();
    let forwarded = metrics.forwarded.get_or_create(&label).clone();
    let mut after = source.cursor(&target.name).await?;
    lag.set(source.lag(after).await?);
    let mut stream = Conn::open(target, tls).await?;
    info!(target = %target.name, from = ?after, "forwarding alerts to syslog");
    loop {
        let rows = source.read_batch(after, BATCH).await?;
        lag.set(source.lag(after).await?);
        if rows.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(IDLE) => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            stream.alive().await?;
            continue;
        }
        let mut bytes = Vec::new();
        for row in &rows {
            bytes.extend_from_slice(&frame(row));
        }
        stream
            .send(&bytes)
            .await
            .context("the receiver went away")?;
        // A receiver that closed its end has not taken these: the cursor stays.
        tokio::time::sleep(Duration::from_millis(20)).await;
        stream.alive().await?;
        let last = rows.last().map_or(after, |r| r.pos);
        source.set_cursor(&target.name, last).await?;
        forwarded.inc_by(rows.len() as u64);
        after = last;
        lag.set(source.lag(after).await?);
    }
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
                port: 6514,
                tls: false,
            }
        );
        assert_eq!(parse_target("tcp://[::1]:514").unwrap().host, "::1");
        assert!(parse_target("tls://siem.example:6514").unwrap().tls);
        for (bad, why) in [
            ("udp://h:514", "tcp://HOST:PORT or tls://HOST:PORT"),
            ("tcp://h", "no port"),
            ("tcp://h:0", "1-65535"),
            ("tcp://:514", "no host"),
        ] {
            let err = parse_target(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    /// A self-signed certificate for `localhost` and its key, as a TLS acceptor, and the
    /// certificate's PEM (the CA a forwarder must be given).
    fn tls_server() -> (tokio_rustls::TlsAcceptor, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        (
            tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            cert.pem(),
        )
    }

    /// Over TLS, a receiver whose certificate chains to --forward-ca gets the stored
    /// alerts, framed; one signed by another CA gets nothing (the handshake fails and the
    /// cursor stays).
    #[tokio::test]
    async fn tls_receivers_are_checked_and_served() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let conn = crate::store::sqlite::open(&path).unwrap();
        let db = Db::Sqlite(path);
        conn.execute(
            "INSERT INTO alerts (agent_id, seq, time_ns, rule_id, severity, title, host, json)
             VALUES ('a', 7, 1769766000000000000, 'EPMM-B1', 4, 't', 'epmm01', '{\"alert\":{\"id\":\"a:1\"}}')",
            [],
        )
        .unwrap();
        let (acceptor, ca_pem) = tls_server();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &ca_pem).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = parse_target(&format!("tls://localhost:{port}")).unwrap();

        // Another CA: refused, nothing forwarded.
        let (_, other_pem) = tls_server();
        let other = dir.path().join("other.pem");
        std::fs::write(&other, &other_pem).unwrap();
        let (_stop_tx, mut stop) = watch::channel(false);
        let server = async {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.is_err()
        };
        let wrong = tls_connector(&other).unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let client = forward(&db, &target, Some(&wrong), &metrics, &mut stop);
        let (refused, result) = tokio::join!(server, client);
        assert!(refused, "the server saw a completed handshake");
        assert!(format!("{:#}", result.unwrap_err()).contains("TLS handshake"));
        assert_eq!(
            crate::store::sqlite::cursor(&conn, &target.name).unwrap(),
            0
        );

        // The right CA: the alert arrives, framed.
        let connector = tls_connector(&ca).unwrap();
        tokio::spawn(run(
            db.clone(),
            target.clone(),
            Some(connector),
            Arc::clone(&metrics),
            stop.clone(),
        ));
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&received).ends_with('}') {
            let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
                .await
                .expect("a frame within 10 s")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&received));
            received.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8(received).unwrap();
        let (len, message) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), message.len());
        assert!(
            message.contains(r#"[sensor@32473 id="a:7" alert="a:1" rule="EPMM-B1""#),
            "{message}"
        );
        // The cursor moves once the receiver took it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while crate::store::sqlite::cursor(&conn, &target.name).unwrap() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the cursor did not move"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[test]
    fn frames_are_rfc5424_with_octet_counting() {
        let row = Row {
            pos: (0, 7),
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
