//! `sensor-collector`: the reference collector.
//!
//! `sensor-collector --listen ADDR --db FILE` receives agents' streams, stores what they
//! send in SQLite and prints each new alert as a JSON line; `sensor-collector alerts`
//! queries the stored alerts and `sensor-collector agents` lists the fleet.

mod config;
mod forward;
mod listener;
mod metrics;
mod server;
mod store;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sensor_proto::{pem, v1::Severity};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "sensor-collector",
    version,
    about = "Reference collector of the EPMM sensor: receives agents' alert streams",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (every flag below has a key: packaging/collector.toml); a flag
    /// given here wins over the file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (HOST:PORT; port 0 picks a free one, logged at start).
    /// Plaintext is served only on loopback addresses; anything else needs --tls-*.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The store: a SQLite file (created when missing; one collector), or
    /// `postgres://USER@HOST:PORT/DB` shared by several collectors (schema created and
    /// migrated at start; password in the URL or PGPASSWORD; `?sslmode=require` or
    /// --db-ca for TLS).
    #[arg(long, value_name = "FILE|URL")]
    db: Option<String>,
    /// The CA (PEM) the PostgreSQL server's certificate must chain to (TLS to the database).
    #[arg(long, value_name = "FILE")]
    db_ca: Option<PathBuf>,
    /// The collector's certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) agents' client certificates must be signed by.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Close a stream that sends nothing (not even a heartbeat) for this many seconds (60).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    silence: Option<u64>,
    /// Connections served at once (default: the descriptor limit, raised to its hard
    /// value at start, less 64).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: Option<u64>,
    /// Connections served at once from one peer address (64).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections_per_peer: Option<u64>,
    /// Forward every stored alert to this syslog receiver (`tcp://HOST:PORT`, or
    /// `tls://HOST:PORT` with --forward-ca: RFC 5424, octet-counting framing), from a
    /// durable cursor: an outage delays, never drops (repeatable).
    #[arg(long = "forward-syslog", value_name = "URL", value_parser = forward::parse_target)]
    forward_syslog: Vec<forward::Target>,
    /// The CA (PEM) the certificates of `tls://` syslog receivers must chain to.
    #[arg(long, value_name = "FILE")]
    forward_ca: Option<PathBuf>,
    /// Serve Prometheus/OpenMetrics text at http://ADDR/metrics (streams, alerts stored,
    /// commit latency, forward lag per syslog target).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Delete stored alerts older than this many days (hourly; agent state is kept, and
    /// nothing a syslog target has not taken yet).
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u64).range(1..=36500))]
    retain: Option<u64>,
}

/// How often `--retain` prunes.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How long streams get to close on SIGTERM/SIGINT before the collector exits anyway.
const STOP_GRACE: Duration = Duration::from_secs(10);

#[derive(Subcommand)]
enum Command {
    /// Stored alerts as JSON lines, oldest first.
    Alerts {
        /// The store: a SQLite file or a postgres:// URL.
        #[arg(long, value_name = "FILE|URL")]
        db: String,
        #[arg(long, value_name = "FILE")]
        db_ca: Option<PathBuf>,
        /// Only this agent.
        #[arg(long, value_name = "AGENT_ID")]
        agent: Option<String>,
        /// Only this rule id.
        #[arg(long, value_name = "RULE_ID")]
        rule: Option<String>,
        /// At least this severity: low, medium, high, critical.
        #[arg(long, value_parser = parse_severity)]
        severity: Option<Severity>,
        /// From this time: RFC 3339 (`2026-01-30T10:00:00Z`) or an age (`90m`, `2h`, `7d`).
        #[arg(long, value_parser = parse_time)]
        since: Option<i64>,
        /// Up to this time (same forms as --since).
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
        #[arg(long)]
        limit: Option<u64>,
    },
    /// The fleet: every agent with its EPMM version and hotfix status, vulnerable ones
    /// flagged, and whether any sequence number is outstanding.
    Agents {
        /// The store: a SQLite file or a postgres:// URL.
        #[arg(long, value_name = "FILE|URL")]
        db: String,
        #[arg(long, value_name = "FILE")]
        db_ca: Option<PathBuf>,
        /// One JSON object per agent instead of a table.
        #[arg(long)]
        json: bool,
        /// An agent not heard from for this many seconds is flagged silent.
        #[arg(long, default_value_t = 30, value_name = "SECONDS")]
        silent_after: u64,
    },
}

fn parse_severity(s: &str) -> Result<Severity, String> {
    match s.to_ascii_lowercase().as_str() {
        "low" => Ok(Severity::Low),
        "medium" => Ok(Severity::Medium),
        "high" => Ok(Severity::High),
        "critical" => Ok(Severity::Critical),
        _ => Err(format!("{s:?}: one of low, medium, high, critical")),
    }
}

/// Nanoseconds since the epoch from RFC 3339 or an age before now.
fn parse_time(s: &str) -> Result<i64, String> {
    let time = match humantime::parse_rfc3339_weak(s) {
        Ok(t) => t,
        Err(_) => {
            let age = humantime::parse_duration(s).map_err(|_| {
                format!(
                    "{s:?}: not an RFC 3339 time (2026-01-30T10:00:00Z) or an age (90m, 2h, 7d)"
                )
            })?;
            std::time::SystemTime::now()
                .checked_sub(age)
                .ok_or_else(|| format!("{s:?}: before the epoch"))?
        }
    };
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .map_err(|_| format!("{s:?}: before the epoch"))
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_env("SENSOR_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Alerts {
            db,
            db_ca,
            agent,
            rule,
            severity,
            since,
            until,
            limit,
        }) => alerts(
            &db,
            db_ca.as_deref(),
            &store::AlertQuery {
                agent,
                rule,
                severity,
                since_ns: since,
                until_ns: until,
                limit,
            },
        ),
        Some(Command::Agents {
            db,
            db_ca,
            json,
            silent_after,
        }) => agents(&db, db_ca.as_deref(), json, silent_after),
        None => serve(cli.serve),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs one query of a subcommand on a runtime of its own.
fn query<T>(
    db: &str,
    ca: Option<&std::path::Path>,
    run: impl AsyncFnOnce(store::Db) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let db = store::Db::parse(db, ca)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(db))
}

fn alerts(db: &str, ca: Option<&std::path::Path>, q: &store::AlertQuery) -> anyhow::Result<()> {
    let lines = query(db, ca, async |db| {
        db.query_alerts(q).await.context("cannot query the alerts")
    })?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for line in lines {
        std::io::Write::write_all(&mut out, line.as_bytes())?;
        std::io::Write::write_all(&mut out, b"\n")?;
    }
    std::io::Write::flush(&mut out)?;
    Ok(())
}

fn agents(
    db: &str,
    ca: Option<&std::path::Path>,
    json: bool,
    silent_after: u64,
) -> anyhow::Result<()> {
    let silent_ns = (silent_after as i64).saturating_mul(1_000_000_000);
    let rows = query(db, ca, async |db| {
        db.query_agents(silent_ns)
            .await
            .context("cannot query the agents")
    })?;
    if json {
        for row in &rows {
            println!("{}", serde_json::to_string(row)?);
        }
        return Ok(());
    }
    println!(
        "{:<28} {:<20} {:<20} {:<8} {:<11} {:<7} {:>7} {:>11} {:>6}",
        "AGENT",
        "HOST",
        "EPMM",
        "HOTFIX",
        "CVE-2026-1281",
        "STATUS",
        "ALERTS",
        "OUTSTANDING",
        "SHED"
    );
    for r in &rows {
        println!(
            "{:<28} {:<20} {:<20} {:<8} {:<13} {:<7} {:>7} {:>11} {:>6}",
            r.agent_id,
            r.host,
            if r.epmm_version.is_empty() {
                "-"
            } else {
                &r.epmm_version
            },
            if r.hotfix_installed { "yes" } else { "no" },
            if r.vulnerable { "VULNERABLE" } else { "-" },
            if r.silent { "silent" } else { "ok" },
            r.alerts,
            r.outstanding,
            r.shed,
        );
    }
    Ok(())
}

/// The listening socket, with a backlog for a fleet reconnecting at once (after a restart
/// of the collector, a thousand agents' handshakes arrive within their back-off jitter;
/// the default backlog of 1024 overflowed into SYN cookies and resets in the fleet
/// benchmark). The kernel caps it at `net.core.somaxconn`.
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(8192)
}

/// Tells systemd (when it runs the collector as a `Type=notify` service).
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// The service watchdog: pings systemd every `every` (half of `WatchdogSec`) only when
/// the store committed a transaction since the last ping; a stuck store or database gets
/// the service restarted.
async fn watchdog(
    writer: store::Writer,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (reply, committed) = tokio::sync::oneshot::channel();
        if writer.request(store::Request::Ping { reply }).await.is_ok()
            && matches!(committed.await, Ok(Ok(_)))
        {
            notify(&[sd_notify::NotifyState::Watchdog]);
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// `--retain DAYS`: prunes at start and then hourly, on its own connection.
async fn retention(
    db: store::Db,
    days: u64,
    targets: Vec<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let before = now.saturating_sub((days as i64).saturating_mul(86_400 * 1_000_000_000));
        let pruned = db.prune(before, &targets).await;
        match pruned {
            Ok(0) => {}
            Ok(n) => info!(alerts = n, days, "retention: pruned old alerts"),
            Err(e) => warn!(error = %format!("{e:#}"), "retention: cannot prune"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The command line over the configuration file: a flag given wins.
fn merge(mut args: ServeArgs) -> anyhow::Result<ServeArgs> {
    let Some(path) = &args.config else {
        return Ok(args);
    };
    let file = config::load(path).map_err(anyhow::Error::msg)?;
    args.listen = args.listen.or(file.listen);
    args.db = args.db.or(file.db);
    args.db_ca = args.db_ca.or(file.db_ca);
    args.tls_cert = args.tls_cert.or(file.tls_cert);
    args.tls_key = args.tls_key.or(file.tls_key);
    args.tls_client_ca = args.tls_client_ca.or(file.tls_client_ca);
    args.silence = args.silence.or(file.silence_seconds);
    args.max_connections = args.max_connections.or(file.max_connections);
    args.max_connections_per_peer = args
        .max_connections_per_peer
        .or(file.max_connections_per_peer);
    args.retain = args.retain.or(file.retain_days);
    args.forward_ca = args.forward_ca.or(file.forward_ca);
    args.metrics = args.metrics.or(file.metrics);
    if args.forward_syslog.is_empty() {
        args.forward_syslog = file
            .forward_syslog
            .iter()
            .map(|t| {
                forward::parse_target(t)
                    .map_err(|e| anyhow::anyhow!("{}: forward_syslog: {e}", path.display()))
            })
            .collect::<anyhow::Result<_>>()?;
    }
    Ok(args)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let args = merge(args)?;
    let listen = args
        .listen
        .context("--listen ADDR is required (or a subcommand: alerts, agents)")?;
    let db = args
        .db
        .as_deref()
        .context("--db FILE|URL is required (or a subcommand: alerts, agents)")?;
    let db = store::Db::parse(db, args.db_ca.as_deref())?;
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_client_ca) {
        (None, None, None) => {
            if !listen.ip().is_loopback() {
                anyhow::bail!(
                    "--listen {listen}: plaintext is served only on loopback addresses; \
                     give --tls-cert, --tls-key and --tls-client-ca"
                );
            }
            None
        }
        (Some(cert), Some(key), Some(ca)) => Some(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(
                    pem::certificates(cert, "--tls-cert").map_err(anyhow::Error::msg)?,
                    pem::private_key(key, "--tls-key").map_err(anyhow::Error::msg)?,
                ))
                .client_ca_root(Certificate::from_pem(
                    pem::certificates(ca, "--tls-client-ca").map_err(anyhow::Error::msg)?,
                )),
        ),
        _ => anyhow::bail!("mutual TLS needs all of --tls-cert, --tls-key and --tls-client-ca"),
    };
    // TLS to syslog receivers: checked at start, not at the first connection.
    let forward_tls = match (&args.forward_ca, args.forward_syslog.iter().any(|t| t.tls)) {
        (Some(ca), _) => Some(forward::tls_connector(ca).map_err(anyhow::Error::msg)?),
        (None, true) => anyhow::bail!("a tls:// --forward-syslog target needs --forward-ca FILE"),
        (None, false) => None,
    };
    let metrics = std::sync::Arc::new(metrics::Metrics::new());
    let (writer, store_thread) =
        db.start_writer(Box::new(std::io::stdout()), std::sync::Arc::clone(&metrics))?;
    let nofile = listener::raise_nofile();
    let mut limits = listener::Limits::for_descriptors(nofile);
    if let Some(n) = args.max_connections {
        limits.total = n as usize;
    }
    limits.per_peer = args.max_connections_per_peer.unwrap_or(64) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = runtime.block_on(async move {
        let listener = bind(listen).with_context(|| format!("--listen {listen}: cannot bind"))?;
        let local = listener.local_addr()?;
        let incoming = listener::incoming(listener, limits);
        let mut builder = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)));
        let secure = tls.is_some();
        if let Some(tls) = tls {
            builder = builder
                .tls_config(tls.timeout(limits.first_bytes))
                .context("TLS configuration")?;
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let watchdog_writer = writer.clone();
        let service = sensor_proto::v1::collector_server::CollectorServer::new(server::Collector {
            writer,
            silence: Duration::from_secs(args.silence.unwrap_or(60)),
            stop: stop_rx.clone(),
            metrics: std::sync::Arc::clone(&metrics),
        })
        .max_decoding_message_size(server::MAX_MESSAGE_BYTES);
        info!(
            address = %local,
            tls = secure,
            db = %db.describe(),
            max_connections = limits.total,
            per_peer = limits.per_peer,
            "listening"
        );
        if let Some(addr) = args.metrics {
            let m = std::sync::Arc::clone(&metrics);
            sensor_proto::metrics_http::serve(addr, std::sync::Arc::new(move || m.render()))
                .await
                .with_context(|| format!("--metrics {addr}: cannot listen"))?;
        }
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("listening on {local}")),
        ]);
        let mut usec = 0;
        if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
            tokio::spawn(watchdog(
                watchdog_writer.clone(),
                Duration::from_micros(usec / 2),
                stop_rx.clone(),
            ));
        }
        for target in &args.forward_syslog {
            tokio::spawn(forward::run(
                db.clone(),
                target.clone(),
                forward_tls.clone(),
                std::sync::Arc::clone(&metrics),
                stop_rx.clone(),
            ));
        }
        if let Some(days) = args.retain {
            let targets: Vec<String> = args.forward_syslog.iter().map(|t| t.name.clone()).collect();
            tokio::spawn(retention(db.clone(), days, targets, stop_rx.clone()));
        }
        let mut stopping = stop_rx;
        let server =
            builder
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopping.wait_for(|s| *s).await;
                });
        tokio::pin!(server);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing a SIGTERM handler")?;
        tokio::select! {
            served = &mut server => return served.context("the server failed"),
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
        }
        notify(&[sd_notify::NotifyState::Stopping]);
        // Streams end after their current commit, telling agents to reconnect later.
        let _ = stop_tx.send(true);
        match tokio::time::timeout(STOP_GRACE, server).await {
            Ok(served) => served.context("the server failed"),
            Err(_) => {
                warn!(
                    seconds = STOP_GRACE.as_secs(),
                    "connections still open after the grace period: closing them"
                );
                Ok(())
            }
        }
    });
    // Every stream task (and its handle on the store) goes with the runtime; the store
    // then finishes what it was given and commits.
    runtime.shutdown_timeout(Duration::from_secs(1));
    store_thread.join();
    info!("stopped");
    served
}
