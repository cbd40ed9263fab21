//! `sensor-agent replay TRACE...`: recorded events through the same pipeline as a live
//! run (process table, detection, outputs), from the state the trace's header describes.
//! The same trace and rules print the same lines, byte for byte.

use std::{
    fs::File,
    io::{BufReader, IsTerminal, Write},
    path::PathBuf,
    sync::Arc,
};

use indicatif::{ProgressBar, ProgressStyle};
use sensor_proto::v1::{TraceHeader, trace_record};
use tracing::{info, warn};

use crate::{
    decode::{BootClock, DecodeContext},
    detect::{Engine, alert::AgentIdentity, rules::RuleSet, sigma::SigmaSet, users::UserNames},
    output::json::JsonLines,
    pipeline::Pipeline,
    proctable::ProcessTable,
    trace::{
        format::{TraceError, TraceReader},
        snapshot,
    },
};

#[derive(Clone, Debug, Default)]
pub struct ReplayOptions {
    pub traces: Vec<PathBuf>,
    pub print_events: bool,
    /// The collapse window, as `run --collapse` (None: the default).
    pub collapse_window_ns: Option<u64>,
}

/// What a replay went through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub files: u64,
    pub events: u64,
    pub alerts: u64,
    /// Files cut short (their complete records were replayed).
    pub truncated: u64,
    /// Files that could not be read, or were damaged part way.
    pub failed: u64,
}

/// A pipeline rebuilt from a trace header.
fn pipeline<W: Write>(
    header: &TraceHeader,
    rules: &Arc<RuleSet>,
    sigma: &Arc<SigmaSet>,
    out: W,
    opts: &ReplayOptions,
) -> Pipeline<JsonLines<W>> {
    let clock = BootClock {
        boot_epoch_ns: i128::from(header.boot_epoch_ns),
    };
    let mut table = ProcessTable::default();
    snapshot::from_entries(&header.processes, &mut table);
    let users = UserNames::from_pairs(header.users.iter().map(|(u, n)| (*u, n.clone())));
    let mut engine = Engine::new(
        Arc::clone(rules),
        Arc::clone(sigma),
        users,
        AgentIdentity {
            agent_id: header.agent_id.clone(),
            host: header.host.clone(),
        },
        clock,
        header.agent_pid,
    );
    if let Some(window) = opts.collapse_window_ns {
        engine.set_collapse_window(window);
    }
    Pipeline::new(
        table,
        engine,
        JsonLines::new(out),
        opts.print_events,
        DecodeContext {
            clock,
            agent_pid: header.agent_pid,
        },
    )
}

/// A file that carries on the one before it (a rotated recording of the same agent and
/// boot): its events continue the same state rather than start from its snapshot.
fn continues(prev: &TraceHeader, next: &TraceHeader) -> bool {
    prev.agent_id == next.agent_id
        && prev.host == next.host
        && prev.reason == "record"
        && next.reason == "record"
        && (prev.boot_epoch_ns - next.boot_epoch_ns).abs() < 1_000_000_000
}

pub fn replay<W: Write>(
    opts: &ReplayOptions,
    rules: Arc<RuleSet>,
    sigma: Arc<SigmaSet>,
    out: &mut W,
) -> ReplaySummary {
    let mut summary = ReplaySummary::default();
    let mut current: Option<(TraceHeader, Pipeline<JsonLines<&mut W>>)> = None;
    let progress = std::io::stderr().is_terminal();
    let mut out = Some(out);
    for path in &opts.traces {
        summary.files += 1;
        let opened = File::open(path)
            .map_err(|source| TraceError::Io {
                file: path.display().to_string(),
                source,
            })
            .and_then(|f| {
                let len = f.metadata().map_or(0, |m| m.len());
                let input: Box<dyn std::io::Read> = if progress {
                    let bar = ProgressBar::new(len).with_style(
                        ProgressStyle::with_template(
                            "{msg} [{bar:40}] {bytes}/{total_bytes} {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.set_message(path.display().to_string());
                    Box::new(bar.wrap_read(BufReader::new(f)))
                } else {
                    Box::new(BufReader::new(f))
                };
                TraceReader::from_reader(path.display().to_string(), input)
            });
        let mut reader = match opened {
            Ok(r) => r,
            Err(e) => {
                summary.failed += 1;
                warn!("{e}");
                continue;
            }
        };
        let header = reader.header().clone();
        let keep = current
            .as_ref()
            .is_some_and(|(prev, _)| continues(prev, &header));
        if !keep {
            if let Some((_, mut p)) = current.take() {
                p.finish();
                summary.events += p.stats.events;
                summary.alerts += p.stats.alerts;
                out = Some(p.sink.into_inner());
            }
            let Some(w) = out.take() else { break };
            current = Some((header.clone(), pipeline(&header, &rules, &sigma, w, opts)));
        }
        let Some((prev, pipeline)) = current.as_mut() else {
            break;
        };
        *prev = header;
        for record in &mut reader {
            match record {
                Ok(r) => match r.item {
                    Some(trace_record::Item::Event(event)) => pipeline.handle_event(event),
                    Some(trace_record::Item::BootEpochNs(epoch)) => pipeline.set_clock(BootClock {
                        boot_epoch_ns: i128::from(epoch),
                    }),
                    None => {}
                },
                Err(e) if e.is_truncation() => {
                    summary.truncated += 1;
                    warn!("{e}");
                }
                Err(e) => {
                    summary.failed += 1;
                    warn!("{e}");
                }
            }
        }
        info!(trace = %path.display(), records = reader.records(), "replayed");
    }
    if let Some((_, mut p)) = current.take() {
        p.finish();
        summary.events += p.stats.events;
        summary.alerts += p.stats.alerts;
    }
    summary
}
