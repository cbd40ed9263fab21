//! SIGHUP: re-read the configuration's `[rules]` (rule files, Sigma rules, watched
//! paths) and `enforce` (the kill switch of prevention), build everything new first, and swap only when all of it is good. A broken
//! rule set is refused with its errors and the running set stays in force.

use std::{path::PathBuf, sync::Arc};

use aya::Ebpf;
use tracing::warn;

use crate::{
    config::{self, RuleSources},
    detect::{rules::RuleSet, sigma::SigmaSet},
    probes::watch::{WatchList, WatchRule},
};

/// Where the running rules came from, to read them again.
#[derive(Clone, Debug)]
pub struct ReloadSource {
    pub config_path: Option<PathBuf>,
    /// The command line's lists, which win over the file's.
    pub cli: RuleSources,
    /// `--enforce`, which wins over the file's `enforce`.
    pub cli_enforce: Option<crate::probes::enforce::Mode>,
}

/// A complete new rule set, ready to swap in.
pub struct Prepared {
    pub sources: RuleSources,
    pub rules: Arc<RuleSet>,
    pub sigma: Arc<SigmaSet>,
    pub watch: WatchList,
    pub enforce: crate::probes::enforce::Mode,
}

/// Why a reload was refused (the running rules stay in force).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Rules(#[from] crate::detect::LoadError),
    #[error("{0}")]
    Watch(#[from] crate::probes::watch::WatchError),
    #[error("cannot update the watched paths: {0}")]
    Probes(#[from] crate::probes::loader::LoadError),
}

/// Reads and checks everything; changes nothing.
pub fn prepare(source: &ReloadSource) -> Result<Prepared, ReloadError> {
    let config = match &source.config_path {
        Some(path) => config::load(Some(path))?.0,
        None => config::Config::default(),
    };
    let sources = RuleSources::resolve(&config, &source.cli);
    let (rules, sigma) = crate::detect::load(&sources)?;
    let watch = watch_rules(&rules, &sources.watch)?;
    Ok(Prepared {
        sources,
        rules,
        sigma,
        watch,
        enforce: source.cli_enforce.unwrap_or(config.agent.enforce),
    })
}

/// The watch list the rules of `set` need, plus `extra` prefixes; warnings logged.
pub fn watch_rules(
    set: &RuleSet,
    extra: &[String],
) -> Result<WatchList, crate::probes::watch::WatchError> {
    let list = WatchList::for_rules(set, extra)?;
    for warning in &list.warnings {
        warn!("{warning}");
    }
    Ok(list)
}

/// Replaces the probes' watched prefixes: new entries are written before stale ones are
/// removed, so no watched path is unwatched for a moment.
pub fn swap_watch(
    ebpf: &mut Ebpf,
    old: &[WatchRule],
    new: &[WatchRule],
) -> Result<(), ReloadError> {
    crate::probes::loader::set_watch(ebpf, old, new)?;
    // What the kernel cached of the old list's answers goes.
    crate::probes::loader::set_open_cache(ebpf, None)?;
    Ok(())
}
