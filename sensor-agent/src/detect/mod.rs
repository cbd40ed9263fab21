//! Detection: decoded events and the process table in, alerts out. Knows nothing of the
//! kernel, so a live run and a replayed trace go through exactly this code.
//!
//! On each event: web-tier identities label the process (exec), single-event rules of the
//! event's kind are tested, sequences advance, allow-list entries veto, repeats collapse.

pub mod alert;
pub mod enforce;
pub mod expr;
pub mod fields;
pub mod places;
pub mod rules;
pub mod sequence;
pub mod sigma;
pub mod threshold;
pub mod users;

use std::sync::Arc;

use rustc_hash::FxHashMap;

use sensor_proto::{
    EventKind,
    v1::{Alert, Event, event},
};

use self::{
    alert::{AgentIdentity, AlertInput, Collapser},
    fields::Ctx,
    rules::{Body, RuleSet},
    sequence::Tracker,
    sigma::SigmaSet,
    threshold::Counter,
    users::UserNames,
};
use crate::{
    decode::BootClock,
    proctable::{LineageLabel, ProcessInfo, ProcessTable},
};

/// Repeats of a rule on one process tree within this window collapse into one alert.
/// (The configuration's default, `[agent] collapse_seconds`.)
pub fn default_collapse_window_ns() -> u64 {
    crate::config::AgentSection::default().collapse_seconds * crate::config::SECOND_NS
}

/// Counters of what detection did.
#[derive(Clone, Debug, Default)]
pub struct DetectStats {
    /// Occurrences folded into an alert already raised (the collapse window).
    pub collapsed: u64,
    /// Matches an allow-list entry vetoed.
    pub allowed: u64,
}

pub struct Engine {
    rules: Arc<RuleSet>,
    sigma: Arc<SigmaSet>,
    /// Single-event rules by `EventKind::index`: (index into `rules.rules`, whether the
    /// rule can only match a process of a web-tier lineage, `Cond::needs_lineage`).
    singles: [Vec<(usize, bool)>; EventKind::COUNT],
    /// Sequence rules with a step on each event kind, by `EventKind::index`.
    sequences: [Vec<usize>; EventKind::COUNT],
    trackers: FxHashMap<usize, Tracker>,
    /// The windows of each threshold rule.
    counters: FxHashMap<usize, Counter>,
    collapser: Collapser,
    users: UserNames,
    identity: AgentIdentity,
    clock: BootClock,
    agent_pid: u32,
    next_alert: u64,
    last_expiry_ns: u64,
    /// Sources of enforced identities found since `take_labelled` (pid, start, label).
    labelled: Vec<(u32, u64, u32)>,
    pub stats: DetectStats,
}

impl Engine {
    pub fn new(
        rules: Arc<RuleSet>,
        sigma: Arc<SigmaSet>,
        users: UserNames,
        identity: AgentIdentity,
        clock: BootClock,
        agent_pid: u32,
    ) -> Self {
        let mut engine = Self {
            rules: Arc::new(RuleSet::default()),
            sigma,
            singles: Default::default(),
            sequences: Default::default(),
            trackers: FxHashMap::default(),
            counters: FxHashMap::default(),
            collapser: Collapser::new(default_collapse_window_ns()),
            users,
            identity,
            clock,
            agent_pid,
            next_alert: 1,
            last_expiry_ns: 0,
            labelled: Vec::new(),
            stats: DetectStats::default(),
        };
        engine.set_rules(rules);
        engine
    }

    /// Repeats of a rule on one process tree within `window_ns` collapse into one alert
    /// (0: every match is its own alert).
    pub fn set_collapse_window(&mut self, window_ns: u64) {
        self.collapser = Collapser::new(window_ns);
    }

    /// Replaces the rule set (live reload): partial sequences of the old set are dropped.
    pub fn set_rules(&mut self, rules: Arc<RuleSet>) {
        self.singles = Default::default();
        self.sequences = Default::default();
        self.trackers.clear();
        self.counters.clear();
        for (i, rule) in rules.rules.iter().enumerate() {
            match &rule.body {
                Body::Single {
                    on,
                    threshold,
                    cond,
                } => {
                    let web = cond.needs_lineage();
                    for kind in on {
                        self.singles[kind.index()].push((i, web));
                    }
                    if threshold.is_some() {
                        self.counters.insert(i, Counter::default());
                    }
                }
                Body::Sequence { steps, .. } => {
                    for kind in EventKind::ALL {
                        if steps.iter().any(|s| s.on.contains(&kind)) {
                            self.sequences[kind.index()].push(i);
                        }
                    }
                    self.trackers.insert(i, Tracker::default());
                }
                Body::Sigma => {}
            }
        }
        self.rules = rules;
    }

    pub fn set_sigma(&mut self, sigma: Arc<SigmaSet>) {
        self.sigma = sigma;
    }

    /// The processes that became sources of an enforced identity since the last call:
    /// (pid, start time, kernel label).
    pub fn take_labelled(&mut self) -> Vec<(u32, u64, u32)> {
        std::mem::take(&mut self.labelled)
    }

    /// Names the identity and rule of the enforcement verdict an exec event carries.
    pub fn name_enforcement(&self, event: &mut Event) {
        if self.rules.enforce.is_empty() {
            return;
        }
        let enforcement = match event.kind.as_mut() {
            Some(event::Kind::Exec(e)) => e.enforcement.as_mut(),
            Some(event::Kind::ExecFailed(e)) => e.enforcement.as_mut(),
            _ => None,
        };
        if let Some(e) = enforcement {
            self.rules.enforce.name(e);
        }
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    pub fn sigma(&self) -> &SigmaSet {
        &self.sigma
    }

    pub fn users(&self) -> &UserNames {
        &self.users
    }

    pub fn identity(&self) -> &AgentIdentity {
        &self.identity
    }

    pub fn set_clock(&mut self, clock: BootClock) {
        self.clock = clock;
    }

    /// Labels every process of a freshly seeded table with its web-tier identity.
    pub fn label_table(&self, table: &mut ProcessTable) {
        table.relabel(|table, p| self.classify(table, p));
    }

    /// The identity `p` itself has, if any.
    fn classify(&self, table: &ProcessTable, p: &ProcessInfo) -> Option<Arc<LineageLabel>> {
        let probe = Event {
            pid: p.pid,
            tid: p.pid,
            kind: Some(event::Kind::Exec(Default::default())),
            ..Default::default()
        };
        let ctx = Ctx::new(&probe, table, &self.users, self.agent_pid, &[]);
        // The label `p` inherited, if any: it may only be replaced by an identity that
        // names it in `within`, and only when `p`'s parent runs the source's very
        // executable (the source, or a fork of it such as an httpd worker).
        let parent = table.get(p.ppid);
        let inherited = parent.and_then(|parent| parent.lineage.clone());
        self.rules
            .identities
            .iter()
            .filter(|i| match (&inherited, parent) {
                (None, _) => true,
                (Some(label), Some(parent)) => {
                    parent.exe == label.source_exe && i.within.iter().any(|w| *w == label.identity)
                }
                (Some(_), None) => false,
            })
            .find(|i| i.cond.eval(&ctx))
            .map(|i| {
                Arc::new(LineageLabel {
                    identity: i.name.clone(),
                    source_pid: p.pid,
                    source_start_ns: p.start_boot_ns,
                    source_exe: p.exe.clone(),
                    source_argv: p.argv.clone(),
                })
            })
    }

    /// One event, after the process table has applied it. Returns the alerts to emit.
    pub fn on_event(&mut self, event: &Arc<Event>, table: &mut ProcessTable) -> Vec<Alert> {
        let kind = EventKind::of(event);
        if kind == Some(EventKind::Exec)
            && let Some(p) = table.get(event.pid)
            && let Some(label) = self.classify(table, p)
        {
            if let Some(entry) = self.rules.enforce.by_identity(&label.identity) {
                self.labelled
                    .push((event.pid, label.source_start_ns, entry.label));
            }
            table.set_lineage(event.pid, Some(label));
        }
        let table: &ProcessTable = table;
        let mut matched: Vec<(usize, Vec<Arc<Event>>)> = Vec::new();
        let ctx = Ctx::new(event, table, &self.users, self.agent_pid, &[]);
        if let Some(singles) = kind.map(|k| &self.singles[k.index()]) {
            // Most processes of a host are not of the web tier: the rules that can only
            // match one of its processes are not looked at for the others.
            let web = ctx.proc.is_some_and(|p| p.lineage.is_some());
            for &(i, needs_web) in singles {
                if needs_web && !web {
                    continue;
                }
                let Body::Single {
                    cond, threshold, ..
                } = &self.rules.rules[i].body
                else {
                    continue;
                };
                if !cond.eval(&ctx) {
                    continue;
                }
                match threshold {
                    None => matched.push((i, vec![Arc::clone(event)])),
                    Some(t) => {
                        if let Some(evidence) =
                            self.counters.entry(i).or_default().feed(t, event, &ctx)
                        {
                            matched.push((i, evidence));
                        }
                    }
                }
            }
        }
        if let Some((kind, seqs)) = kind.map(|k| (k, &self.sequences[k.index()])) {
            let env = sequence::Env {
                table,
                users: &self.users,
                agent_pid: self.agent_pid,
            };
            for &i in seqs {
                let Body::Sequence { within_ns, steps } = &self.rules.rules[i].body else {
                    continue;
                };
                let tracker = self.trackers.entry(i).or_default();
                for evidence in tracker.feed(steps, *within_ns, kind, event, &env, &ctx) {
                    matched.push((i, evidence));
                }
            }
        }
        let mut built = Vec::new();
        let rules = Arc::clone(&self.rules);
        for (i, evidence) in matched {
            let rule = &rules.rules[i];
            if rules
                .allows
                .iter()
                .any(|a| a.rules.is_match(&*rule.id) && a.cond.eval(&ctx))
            {
                self.stats.allowed += 1;
                continue;
            }
            built.push(alert::build(AlertInput {
                rule,
                evidence: evidence.into_iter().map(Arc::unwrap_or_clone).collect(),
                table,
                users: &self.users,
                clock: &self.clock,
                identity: &self.identity,
            }));
        }
        let sigma = Arc::clone(&self.sigma);
        for m in sigma.matching(event, &ctx) {
            let mut alert = alert::build(AlertInput {
                rule: m.rule,
                evidence: vec![Event::clone(event)],
                table,
                users: &self.users,
                clock: &self.clock,
                identity: &self.identity,
            });
            alert.details = m
                .fields
                .into_iter()
                .map(|(field, value)| (field.name().to_owned(), value))
                .collect();
            built.push(alert);
        }
        drop(ctx);
        let mut out = Vec::new();
        for alert in built {
            self.emit(alert, event.boot_ns, &mut out);
        }
        // Close collapse windows at most once per second of event time.
        if event.boot_ns >= self.last_expiry_ns + 1_000_000_000 {
            self.last_expiry_ns = event.boot_ns;
            let expired = self.collapser.expire(event.boot_ns);
            out.extend(expired);
        }
        out
    }

    fn emit(&mut self, mut alert: Alert, now_ns: u64, out: &mut Vec<Alert>) {
        alert.id = format!("{}:{}", self.identity.agent_id, self.next_alert);
        match self.collapser.offer(alert, now_ns) {
            Some(alert) => {
                self.next_alert += 1;
                out.push(alert);
            }
            None => self.stats.collapsed += 1,
        }
    }

    /// Numbers and stamps an alert the agent raises about itself (SELF-*): no rule, no
    /// collapse (the caller raises it once per occurrence).
    pub fn stamp_self_alert(&mut self, mut alert: Alert) -> Alert {
        alert.id = format!("{}:{}", self.identity.agent_id, self.next_alert);
        alert.host = self.identity.host.clone();
        alert.agent_id = self.identity.agent_id.clone();
        alert.source = "agent".to_owned();
        alert.count = 1;
        self.next_alert += 1;
        alert
    }

    /// Closes every collapse window (end of a trace, shutdown): the repeat counts.
    pub fn finish(&mut self) -> Vec<Alert> {
        self.collapser.expire(u64::MAX)
    }
}

/// Why the rules could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("rule files have errors:\n{0}")]
    Rules(#[from] rules::RuleErrors),
    #[error("cannot read the Sigma rules: {0}")]
    Sigma(#[from] std::io::Error),
}

/// The rule directories (after the embedded pack) and Sigma directories of `sources`,
/// compiled; what was loaded is logged.
pub fn load(
    sources: &crate::config::RuleSources,
) -> Result<(Arc<RuleSet>, Arc<SigmaSet>), LoadError> {
    let set = rules::load(&sources.rules, true)?;
    let sigma_set = SigmaSet::load(&sources.sigma)?;
    if !sources.sigma.is_empty() {
        let (loaded, unsupported, invalid) = sigma_set.counts();
        tracing::info!(
            loaded,
            unsupported,
            invalid,
            "Sigma rules loaded; `sensor-agent rules check --sigma DIR` lists the reasons"
        );
    }
    tracing::info!(
        rules = set.rules.len(),
        identities = set.identities.len(),
        files = set.files.len(),
        "detection rules loaded"
    );
    Ok((Arc::new(set), Arc::new(sigma_set)))
}

#[cfg(test)]
mod tests;
