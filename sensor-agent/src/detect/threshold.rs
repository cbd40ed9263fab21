//! Thresholds: a rule that fires when the events it matches, grouped by a key (the same
//! process tree, process, parent or field value), carry `count` distinct values of some
//! fields within a sliding window — a fan-out such as a port scan, recognised by what it
//! does rather than by the tool's name.
//!
//! Per key only the distinct values seen in the window are kept (each once, as a hash,
//! with the time it was last seen), so one key costs at most `count` entries; keys are
//! bounded too and expire with their window.

use std::{
    collections::VecDeque,
    hash::{Hash, Hasher},
    sync::Arc,
};

use rustc_hash::{FxHashMap, FxHasher};

use sensor_proto::v1::Event;

use super::{
    alert::GroupKey,
    fields::{Ctx, Value},
    rules::Threshold,
    sequence::key_of,
};

/// Keys (process trees, processes...) followed at once per rule; past it the key seen
/// least recently is forgotten.
pub const MAX_KEYS: usize = 4096;

/// Events kept as an alert's evidence: the first ones of the window and the last.
pub const MAX_EVIDENCE: usize = 8;

#[derive(Debug, Default)]
struct Window {
    /// Distinct values (hash) -> when last seen.
    seen: FxHashMap<u64, u64>,
    /// (time, hash) in arrival order, for expiry; stale pairs are skipped.
    order: VecDeque<(u64, u64)>,
    evidence: Vec<Arc<Event>>,
    last_ns: u64,
}

impl Window {
    fn expire(&mut self, now: u64, within_ns: u64) {
        while let Some(&(t, h)) = self.order.front() {
            if now.saturating_sub(t) <= within_ns {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&h) == Some(&t) {
                self.seen.remove(&h);
            }
        }
        if self.seen.is_empty() {
            self.evidence.clear();
        }
    }
}

/// The windows of one threshold rule.
#[derive(Debug, Default)]
pub struct Counter {
    windows: FxHashMap<GroupKey, Window>,
}

/// The hash of the distinct fields' values, `None` when one is unset.
fn value_hash(t: &Threshold, ctx: &Ctx<'_>) -> Option<u64> {
    let mut h = FxHasher::default();
    for f in &t.distinct {
        match f.get(ctx) {
            Value::Str(s) => s.hash(&mut h),
            Value::Int(i) => i.hash(&mut h),
            _ => return None,
        }
    }
    Some(h.finish())
}

impl Counter {
    /// Feeds an event the rule's condition matched. Returns the evidence when this event
    /// brings its key to `count` distinct values; the window then starts again.
    pub fn feed(
        &mut self,
        t: &Threshold,
        event: &Arc<Event>,
        ctx: &Ctx<'_>,
    ) -> Option<Vec<Arc<Event>>> {
        let key = key_of(t.key, ctx)?;
        let value = value_hash(t, ctx)?;
        let now = event.boot_ns;
        if !self.windows.contains_key(&key) && self.windows.len() >= MAX_KEYS {
            self.forget(now, t.within_ns);
        }
        let window = self.windows.entry(key).or_default();
        window.expire(now, t.within_ns);
        window.last_ns = now;
        let new = window.seen.insert(value, now).is_none();
        window.order.push_back((now, value));
        if !new {
            return None;
        }
        if window.evidence.len() + 1 < MAX_EVIDENCE {
            window.evidence.push(Arc::clone(event));
        }
        if window.seen.len() < t.count as usize {
            return None;
        }
        let mut evidence = std::mem::take(&mut window.evidence);
        evidence.push(Arc::clone(event));
        self.windows.remove(&key);
        Some(evidence)
    }

    /// Room for a new key: the windows that expired go, else the one seen least recently.
    fn forget(&mut self, now: u64, within_ns: u64) {
        self.windows
            .retain(|_, w| now.saturating_sub(w.last_ns) <= within_ns);
        if self.windows.len() >= MAX_KEYS
            && let Some(oldest) = self
                .windows
                .iter()
                .min_by_key(|(_, w)| w.last_ns)
                .map(|(k, _)| *k)
        {
            self.windows.remove(&oldest);
        }
    }

    /// Keys followed now (for tests and bounds).
    pub fn keys(&self) -> usize {
        self.windows.len()
    }
}
