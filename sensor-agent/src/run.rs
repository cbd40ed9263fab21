//! `sensor-agent run`: load the probes, seed the process table, stream until SIGINT/SIGTERM.

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use crate::decode::record_event_kind;
use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    config::RuleSources,
    decode::{BootClock, DecodeContext},
    delivery::{Delivery, DeliveryOptions, appliance},
    detect::{Engine, alert::AgentIdentity, users::UserNames},
    executables::Executables,
    ops::{
        health::{self, Fingerprint, Liveness},
        metrics::{self, Metrics, Snapshot},
        notify::Notifier,
        reload::{self, ReloadSource},
    },
    output::{Sink, json::JsonLines},
    pipeline::Pipeline,
    probes::{
        LoadOptions, Probes,
        enforce::Enforcer,
        loader::{LossCounters, State},
    },
    proc_seed,
    proctable::ProcessTable,
    trace::{
        flight::{FlightOptions, FlightRecorder},
        recorder::{RecordOptions, Recorder},
    },
};

/// Options of a live run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub print_events: bool,
    pub load: LoadOptions,
    /// Rule files, Sigma rules and extra watched paths in force at start.
    pub sources: RuleSources,
    pub identity: AgentIdentity,
    /// `--record`: where to write trace files.
    pub record: Option<RecordOptions>,
    /// Flight recorder: where to write the seconds around each alert.
    pub flight: Option<FlightOptions>,
    /// `--collector`: stream alerts to a collector through the spool.
    pub delivery: Option<DeliveryOptions>,
    /// `--collapse`: the collapse window, when not the default.
    pub collapse_window_ns: Option<u64>,
    /// `--metrics`: serve Prometheus text here.
    pub metrics: Option<std::net::SocketAddr>,
    /// The configuration file read at start, read again on SIGHUP.
    pub config_path: Option<PathBuf>,
    /// The command line's rule lists (they win over the file's on reload too).
    pub cli_sources: RuleSources,
    /// `--enforce` (wins over the file's on reload too).
    pub cli_enforce: Option<crate::probes::enforce::Mode>,
    /// Stop after this long, as on SIGTERM (`learn --duration`).
    pub duration: Option<Duration>,
}

/// Where a live run's output goes: the collector's spool, then JSON lines on stdout (in
/// that order: whatever was printed is already in the spool file when the agent dies).
/// Where a live agent's events and alerts go: the collector (through the spool) when one
/// is configured, and standard output.
struct Outputs {
    delivery: Option<Delivery>,
    stdout: JsonLines<std::io::BufWriter<std::io::StdoutLock<'static>>>,
}

impl Sink for Outputs {
    fn event(&mut self, event: &sensor_proto::v1::Event) {
        self.delivery.event(event);
        self.stdout.event(event);
    }

    fn alert(&mut self, alert: &sensor_proto::v1::Alert) {
        self.delivery.alert(alert);
        self.stdout.alert(alert);
    }

    fn flush(&mut self) {
        self.delivery.flush();
        self.stdout.flush();
    }

    fn wants_events(&self) -> bool {
        self.delivery.wants_events() || self.stdout.wants_events()
    }
}

/// How long a stopping agent waits for the collector to acknowledge what it sent.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

/// What the agent tells the collector about itself.
pub fn collector_identity(identity: &AgentIdentity) -> sensor_proto::v1::AgentIdentity {
    let info = appliance::detect(Path::new("/"));
    sensor_proto::v1::AgentIdentity {
        agent_id: identity.agent_id.clone(),
        host: identity.host.clone(),
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        epmm_version: info.epmm_version,
        hotfix_installed: info.hotfix_installed,
        hotfix_evidence: info.hotfix_evidence,
    }
}

/// How often loss counters are read and the clock offset refreshed.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// How often the ring is drained when the kernel does not wake us (it only does once a
/// quarter of the ring is full): the bound on event latency under light load.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

pub async fn run(mut options: RunOptions) -> anyhow::Result<()> {
    let (rule_set, sigma_set) = crate::detect::load(&options.sources)?;
    let watch = reload::watch_rules(&rule_set, &options.sources.watch)?;
    options.load.watch = watch.prefixes;
    options.load.watch_suffixes = watch.suffixes;
    // Before the probes: a bad URL, TLS file or spool is an error at start, not later.
    let delivery = options
        .delivery
        .as_ref()
        .map(|d| Delivery::start(d, collector_identity(&options.identity)))
        .transpose()
        .context("cannot deliver to the collector")?;
    let mut probes = Probes::load(&options.load).context("cannot start the probes")?;
    // Seed after attaching: a process started in between is seen by both, and the events
    // (applied after the seed) bring it up to date.
    let mut table = ProcessTable::default();
    let seeded = proc_seed::seed(&mut table, Path::new("/proc")).context("cannot read /proc")?;
    info!(agent_id = %options.identity.agent_id, host = %options.identity.host, "agent identity");
    let clock = BootClock::now();
    let mut engine = Engine::new(
        rule_set,
        sigma_set,
        UserNames::load(Path::new("/etc/passwd")),
        options.identity.clone(),
        clock,
        std::process::id(),
    );
    if let Some(window) = options.collapse_window_ns {
        engine.set_collapse_window(window);
    }
    // What every running executable is, before the web-tier identities (which may ask).
    let mut executables = Executables::load(Path::new("/"));
    executables.label_seeded(&mut table);
    engine.label_table(&mut table);
    // Prevention: the policy in the kernel and the web-tier processes running now
    // labelled, before the first event is handled.
    let applied = probes
        .enforcer
        .apply(
            options.load.enforce,
            &engine.rules().enforce,
            executables.shell_paths(),
            &table,
        )
        .map_err(|e| anyhow::anyhow!("cannot put the enforcement policy in the kernel: {e}"))?;
    log_enforcement(&probes.enforcer, &applied);
    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout().lock());
    let mut pipeline = Pipeline::new(
        table,
        engine,
        Outputs {
            delivery,
            stdout: JsonLines::new(stdout).with_events(options.print_events),
        },
        options.print_events,
        DecodeContext {
            clock,
            agent_pid: std::process::id(),
        },
    );
    pipeline.executables = Some(executables);
    if let Some(record) = &options.record {
        pipeline.recorder = Some(Recorder::new(record.clone()).context("cannot record")?);
        info!(path = %record.path.display(), "recording events");
    }
    if let Some(flight) = &options.flight {
        pipeline.flight =
            Some(FlightRecorder::new(flight.clone()).context("cannot start the flight recorder")?);
        info!(dir = %flight.dir.display(), "flight recorder on");
    }
    let metrics = match options.metrics {
        Some(addr) => {
            let metrics = Arc::new(Metrics::new());
            metrics::serve(addr, Arc::clone(&metrics))
                .await
                .with_context(|| format!("--metrics {addr}: cannot listen"))?;
            Some(metrics)
        }
        None => None,
    };
    // Probes the agent runs without (not those skipped on purpose) are its blind spots.
    let unavailable: Vec<(&str, &str)> = probes.unavailable().collect();
    if let Some(alert) = health::probes_unavailable(&unavailable) {
        pipeline.raise_self(alert);
    }
    if let Some(metrics) = &metrics {
        metrics.set_probes(&probes.status);
        metrics.set_enforcement(
            probes.enforcer.mode().name(),
            probes.enforcer.mechanism().name(),
        );
    }
    let attached = probes
        .status
        .iter()
        .filter(|s| s.state == State::Attached)
        .count();
    let skipped = probes
        .status
        .iter()
        .filter(|s| s.state == State::Skipped)
        .count();
    let summary = probes.summary();
    let enforce = match probes.enforcer.mode() {
        crate::probes::enforce::Mode::Off => "off".to_owned(),
        mode => format!("{}+{}", mode.name(), probes.enforcer.mechanism().name()),
    };
    if !unavailable.is_empty() {
        let why: Vec<String> = unavailable
            .iter()
            .map(|(probe, reason)| format!("{probe} ({reason})"))
            .collect();
        warn!(
            processes = seeded,
            probes = %summary,
            enforce = %enforce,
            "ready, DEGRADED: {} of {} probes attached; unavailable: {}",
            attached,
            probes.status.len(),
            why.join("; ")
        );
    } else if skipped > 0 {
        info!(
            processes = seeded,
            probes = %summary,
            enforce = %enforce,
            "ready: {attached} of {} probes attached, {skipped} skipped as asked; process table seeded",
            probes.status.len()
        );
    } else {
        info!(
            processes = seeded,
            probes = %summary,
            enforce = %enforce,
            "ready: all probes attached, process table seeded"
        );
    }
    let notifier = Notifier::from_env();
    notifier.ready(&format!(
        "watching: {attached} of {} probes attached{}",
        probes.status.len(),
        if unavailable.is_empty() {
            ""
        } else {
            " (degraded)"
        }
    ));
    let ops = Ops {
        notifier,
        metrics,
        reload: ReloadSource {
            config_path: options.config_path.clone(),
            cli: options.cli_sources.clone(),
            cli_enforce: options.cli_enforce,
        },
        watch: options.load.watch.clone(),
        watch_suffixes: options.load.watch_suffixes.clone(),
        watched_files: watched_files(options.config_path.as_ref(), &options.sources),
        ring_capacity: u64::from(options.load.ring_bytes),
        stop_at: options.duration.map(|d| tokio::time::Instant::now() + d),
    };
    event_loop(probes, &mut pipeline, ops).await
}

/// What the event loop does besides events: systemd, metrics, reload, self-health.
struct Ops {
    notifier: Notifier,
    metrics: Option<Arc<Metrics>>,
    reload: ReloadSource,
    /// The watch list in the probes now.
    watch: Vec<crate::probes::watch::WatchRule>,
    /// The names watched anywhere, fixed when the probes were loaded.
    watch_suffixes: Vec<(String, u32)>,
    /// The configuration file and rule directories, watched for changes on disk.
    watched_files: Vec<PathBuf>,
    /// Size of the kernel ring buffer in bytes.
    ring_capacity: u64,
    /// When to stop by itself, if ever.
    stop_at: Option<tokio::time::Instant>,
}

/// Hands every record waiting in the ring to the pipeline; returns the ring space they
/// took (the kernel's 8-byte header per record, rounded up to 8 bytes): the depth of the
/// kernel queue at the moment the agent came to drain it.
fn drain_ring(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline<Outputs>) -> u64 {
    let mut bytes = 0u64;
    while let Some(item) = ring.next() {
        bytes += (item.len() as u64 + 8).next_multiple_of(8);
        pipeline.handle_record(&item);
    }
    bytes
}

/// The configuration file and the rule directories in force: what SELF-CONFIG watches.
fn watched_files(config: Option<&PathBuf>, sources: &RuleSources) -> Vec<PathBuf> {
    config
        .into_iter()
        .chain(&sources.rules)
        .chain(&sources.sigma)
        .cloned()
        .collect()
}

/// How often the configuration and rule files are checked for changes, and the probes
/// for silence.
const HEALTH_EVERY: Duration = Duration::from_secs(5);
const LIVENESS_EVERY: Duration = Duration::from_secs(30);

/// The running agent between events: what the loop's handlers share.
struct Agent<'p> {
    pipeline: &'p mut Pipeline<Outputs>,
    /// Keeps the programs attached; detached on stop.
    ebpf: aya::Ebpf,
    enforcer: Enforcer,
    lost: LossCounters,
    ops: Ops,
    /// Kernel losses so far, by record kind.
    last_lost: Vec<u64>,
    /// Spool sheds (events, alerts) already reported.
    last_shed: (u64, u64),
    /// Ring bytes read since start, and the deepest the ring was at a drain since the
    /// last metrics publication.
    ring_read: u64,
    ring_peak: u64,
    /// The watched configuration and rule files as last read, and whether a change was
    /// already reported.
    fingerprint: Fingerprint,
    reported_change: bool,
    liveness: Liveness,
}

async fn event_loop(
    probes: Probes,
    pipeline: &mut Pipeline<Outputs>,
    ops: Ops,
) -> anyhow::Result<()> {
    let Probes {
        ring,
        ebpf,
        lost,
        enforcer,
        ..
    } = probes;
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long
    // as the AsyncFd owns the ring buffer.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .context("cannot poll the probes' ring buffer")?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    let mut health = tokio::time::interval(HEALTH_EVERY);
    let mut liveness_tick = tokio::time::interval(LIVENESS_EVERY);
    let mut drain = tokio::time::interval(DRAIN_INTERVAL);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop_at = ops.stop_at;
    let mut agent = Agent {
        pipeline,
        ebpf,
        enforcer,
        lost,
        fingerprint: Fingerprint::read(&ops.watched_files),
        ops,
        last_lost: vec![0u64; usize::from(sensor_common::kind::COUNT)],
        last_shed: (0, 0),
        ring_read: 0,
        ring_peak: 0,
        reported_change: false,
        liveness: Liveness::default(),
    };
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let depth = drain_ring(guard.get_inner_mut(), agent.pipeline);
                guard.clear_ready();
                agent.on_ring(depth);
            }
            _ = drain.tick() => {
                let depth = drain_ring(ring.get_mut(), agent.pipeline);
                agent.on_ring(depth);
            }
            _ = housekeeping.tick() => agent.on_tick(),
            _ = health.tick() => agent.on_health(),
            _ = liveness_tick.tick() => agent.on_liveness(),
            _ = sighup.recv() => agent.on_reload(),
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = async { tokio::time::sleep_until(stop_at.unwrap_or_else(tokio::time::Instant::now)).await }, if stop_at.is_some() => {
                info!("duration reached: stopping");
                break;
            }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
        }
    }
    agent.ops.notifier.stopping();
    // Drain what is already in the ring before leaving.
    drain_ring(ring.get_mut(), agent.pipeline);
    agent.on_stop().await;
    Ok(())
}

impl Agent<'_> {
    /// Records were drained from the ring (`depth` bytes of it): out they go.
    fn on_ring(&mut self, depth: u64) {
        if depth == 0 {
            return;
        }
        // New sources of enforced identities: they and what they already started are
        // labelled in the kernel, whose forks carry the label on from here.
        let sources = self.pipeline.engine.take_labelled();
        if !sources.is_empty() && self.enforcer.mode() != crate::probes::enforce::Mode::Off {
            let labelled = self.enforcer.label_table(&self.pipeline.table);
            for (pid, _, label) in sources {
                info!(
                    pid,
                    label, labelled, "enforcement: new web-tier source labelled"
                );
            }
        }
        self.ring_read += depth;
        self.ring_peak = self.ring_peak.max(depth);
        self.pipeline.flush();
    }

    /// Every second: clock, traces, kernel losses, spool, metrics, systemd watchdog.
    fn on_tick(&mut self) {
        self.pipeline.set_clock(BootClock::now());
        self.pipeline.flush_traces();
        self.report_losses();
        let pipeline = &mut *self.pipeline;
        let mut spool = (0, 0, 0, 0);
        if let Some(delivery) = pipeline.sink.delivery.as_mut() {
            delivery.tick(loss_map(&self.last_lost));
            spool = delivery.spool_counts();
        }
        let (records, bytes, shed_events, shed_alerts) = spool;
        if let Some(alert) = health::shed(
            shed_events - self.last_shed.0,
            shed_alerts - self.last_shed.1,
        ) {
            pipeline.raise_self(alert);
        }
        self.last_shed = (shed_events, shed_alerts);
        if let Some(metrics) = &self.ops.metrics {
            metrics.publish(&Snapshot {
                pipeline: pipeline.stats.clone(),
                detect: pipeline.engine.stats.clone(),
                lost: self
                    .last_lost
                    .iter()
                    .enumerate()
                    .filter_map(|(k, n)| Some((record_event_kind(k as u16)?, *n)))
                    .map(|(k, n)| (k.name().to_owned(), n))
                    .collect(),
                process_table: pipeline.table.len(),
                spool_records: records,
                spool_bytes: bytes,
                shed_events,
                shed_alerts,
                ring_capacity: self.ops.ring_capacity,
                ring_peak: self.ring_peak,
                ring_read: self.ring_read,
            });
        }
        self.ring_peak = 0;
        let status = format!(
            "events {}, alerts {}, lost {}",
            pipeline.stats.events,
            pipeline.stats.alerts,
            self.last_lost.iter().sum::<u64>()
        );
        self.ops.notifier.alive(&status);
    }

    /// Kernel losses since the last look: logged, and a SELF-LOSS alert.
    fn report_losses(&mut self) {
        let lost_now = report_losses(&self.lost, &mut self.last_lost);
        if let Some(alert) = health::loss(&lost_now, self.last_lost.iter().sum()) {
            self.pipeline.raise_self(alert);
        }
    }

    /// Every few seconds: executables changed on disk, configuration or rules changed.
    fn on_health(&mut self) {
        if let Some(executables) = self.pipeline.executables.as_mut() {
            executables.refresh();
        }
        let now = Fingerprint::read(&self.ops.watched_files);
        let changed = self.fingerprint.changes(&now);
        if !changed.is_empty() && !self.reported_change {
            self.reported_change = true;
            self.pipeline.raise_self(health::config_changed(&changed));
        }
    }

    /// Processes are being created but the probes report none: they were detached.
    fn on_liveness(&mut self) {
        let stats = &self.pipeline.stats;
        let process_events = stats.events_of(sensor_proto::EventKind::Exec)
            + stats.events_of(sensor_proto::EventKind::Fork);
        if let Some(pid) = health::last_pid()
            && let Some(created) = self.liveness.check(pid, process_events)
        {
            self.pipeline
                .raise_self(health::probes_silent(created, LIVENESS_EVERY.as_secs()));
        }
    }

    /// SIGHUP: everything new is built first; swapped only when all of it is good.
    fn on_reload(&mut self) {
        info!("SIGHUP: reloading the rules");
        self.ops.notifier.reloading();
        let outcome = reload::prepare(&self.ops.reload).and_then(|new| {
            reload::swap_watch(&mut self.ebpf, &self.ops.watch, &new.watch.prefixes)?;
            Ok(new)
        });
        match outcome {
            Ok(new) => {
                if new.watch.suffixes != self.ops.watch_suffixes {
                    warn!(
                        "the new rules watch other names anywhere ({:?}); names are set when \
                         the probes load and change at the next start",
                        new.watch
                            .suffixes
                            .iter()
                            .map(|(s, _)| s)
                            .collect::<Vec<_>>()
                    );
                }
                let (rules, sigma) = (new.rules.rules.len(), new.sigma.counts().0);
                let shells = self
                    .pipeline
                    .executables
                    .as_ref()
                    .map_or(&[][..], |e| e.shell_paths());
                match self.enforcer.apply(
                    new.enforce,
                    &new.rules.enforce,
                    shells,
                    &self.pipeline.table,
                ) {
                    Ok(applied) => {
                        log_enforcement(&self.enforcer, &applied);
                        if let Some(metrics) = &self.ops.metrics {
                            metrics.set_enforcement(
                                self.enforcer.mode().name(),
                                self.enforcer.mechanism().name(),
                            );
                        }
                    }
                    Err(e) => error!("cannot update the enforcement policy: {e}"),
                }
                self.pipeline.engine.set_rules(new.rules);
                self.pipeline.engine.set_sigma(new.sigma);
                self.ops.watch = new.watch.prefixes;
                self.ops.watched_files =
                    watched_files(self.ops.reload.config_path.as_ref(), &new.sources);
                self.fingerprint = Fingerprint::read(&self.ops.watched_files);
                self.reported_change = false;
                info!(rules, sigma, "reloaded");
                self.pipeline
                    .raise_self(health::reloaded(rules, sigma, new.sources.watch.len()));
            }
            Err(e) => {
                error!("reload refused; the running rules stay in force:\n{e}");
                self.pipeline
                    .raise_self(health::reload_refused(&e.to_string()));
            }
        }
        self.ops.notifier.ready("reloaded");
    }

    /// The end: last alerts out, the collector given its chance to acknowledge, the
    /// probes detached (nothing of the agent stays in the kernel).
    async fn on_stop(mut self) {
        self.pipeline.finish();
        self.report_losses();
        if let Some(delivery) = self.pipeline.sink.delivery.as_mut() {
            delivery.tick(loss_map(&self.last_lost));
            delivery.close(CLOSE_WAIT).await;
        }
        // Nothing is enforced from here on, whatever happens to the detach.
        if let Err(e) = self.enforcer.stop() {
            warn!("cannot switch enforcement off: {e}");
        }
        Probes::detach(&mut self.ebpf);
        let stats = &self.pipeline.stats;
        if let Some(exes) = self.pipeline.executables.as_ref() {
            let s = &exes.stats;
            info!(
                hashed = s.hashed,
                hashed_mib = s.hashed_bytes / (1024 * 1024),
                hash_ms = s.hash_ns / 1_000_000,
                us_per_new_executable = s.hash_ns / s.hashed.max(1) / 1000,
                cached = s.cached,
                "executable identities"
            );
        }
        info!(
            records = stats.records,
            events = stats.events,
            alerts = stats.alerts,
            decode_errors = stats.decode_errors,
            lost_in_kernel = self.last_lost.iter().sum::<u64>(),
            "stopped"
        );
        let _ = std::io::stderr().flush();
    }
}

/// The enforcement mode in force and what its policy resolved to.
fn log_enforcement(enforcer: &Enforcer, applied: &crate::probes::enforce::Applied) {
    use crate::probes::enforce::Mode;
    if enforcer.mode() == Mode::Off {
        info!("enforcement off");
        return;
    }
    for missing in &applied.missing {
        warn!(executable = %missing, "allowed executable not found here; not allowed");
    }
    info!(
        mode = enforcer.mode().name(),
        mechanism = enforcer.mechanism().name(),
        allowed = applied.allowed,
        shells = applied.shells,
        labelled = applied.labelled,
        "enforcement in force"
    );
}

/// The event kind name of records of wire kind `kind`.
fn record_kind_name(kind: u16) -> &'static str {
    record_event_kind(kind).map_or("unknown", |k| k.name())
}

/// Kernel losses by kind name, for heartbeats.
fn loss_map(totals: &[u64]) -> BTreeMap<String, u64> {
    totals
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| (record_kind_name(k as u16).to_owned(), *n))
        .collect()
}

/// Logs records lost in the kernel since the last call; returns them by kind name.
fn report_losses(
    lost: &crate::probes::loader::LossCounters,
    last: &mut [u64],
) -> BTreeMap<String, u64> {
    let mut new = BTreeMap::new();
    for (k, total) in lost.counts() {
        let slot = &mut last[usize::from(k)];
        if total > *slot {
            warn!(
                kind = record_kind_name(k),
                lost = total - *slot,
                total,
                "records lost in the kernel: the ring buffer was full"
            );
            new.insert(record_kind_name(k).to_owned(), total - *slot);
            *slot = total;
        }
    }
    new
}
