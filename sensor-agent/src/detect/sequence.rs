//! Sequences: a rule whose steps must match in order, within a time window, on events
//! that share a key (the same process tree, process, or parent). Partial matches are kept
//! per rule, indexed by (step awaited, key) so an event only looks at the partial matches
//! it can continue, bounded in number and expired by event time.

use std::{collections::VecDeque, sync::Arc};

use rustc_hash::FxHashMap;

use sensor_proto::{EventKind, v1::Event};

use super::{
    alert::{GroupKey, tree_key},
    fields::{Ctx, Value},
    rules::{Key, Step},
    users::UserNames,
};
use crate::proctable::ProcessTable;

/// Partial matches kept per rule at most; the oldest go first.
pub const MAX_PARTIALS: usize = 4096;

/// What evaluating a step needs besides the event.
pub struct Env<'a> {
    pub table: &'a ProcessTable,
    pub users: &'a UserNames,
    pub agent_pid: u32,
}

#[derive(Clone, Debug)]
struct Partial {
    started_ns: u64,
    vars: Vec<(String, String)>,
    /// Shared with the pipeline and other rules: a partial match costs no copy of its events.
    evidence: Vec<Arc<Event>>,
}

/// The partial matches of one sequence rule.
#[derive(Default, Debug)]
pub struct Tracker {
    /// (index of the step awaited, key) -> partial matches, oldest first.
    waiting: FxHashMap<(usize, GroupKey), Vec<Partial>>,
    /// Creation order, for expiry and the bound: (started, step, key).
    order: VecDeque<(u64, usize, GroupKey)>,
    count: usize,
    /// Partial matches waiting for each step: an event only computes its key for a step
    /// someone waits for (a tree key walks the ancestry).
    per_step: Vec<usize>,
}

/// The group an event belongs to under `key`; `None` when the key's field is unset.
pub(super) fn key_of(key: Key, ctx: &Ctx<'_>) -> Option<GroupKey> {
    use std::hash::{Hash, Hasher};
    let ev = ctx.event;
    Some(match key {
        Key::Tree => tree_key(ctx.table, ev.pid),
        Key::Process => GroupKey::Pid(ev.pid),
        Key::Parent => GroupKey::Pid(ctx.proc?.ppid),
        Key::Field(f) => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            match f.get(ctx) {
                Value::Str(s) => s.hash(&mut h),
                Value::Int(i) => i.hash(&mut h),
                _ => return None,
            }
            GroupKey::Value(h.finish())
        }
    })
}

fn capture(step: &Step, ctx: &Ctx<'_>, vars: &mut Vec<(String, String)>) {
    for (name, field) in &step.captures {
        let value = match field.get(ctx) {
            Value::Str(s) => s.into_owned(),
            Value::Int(i) => i.to_string(),
            _ => String::new(),
        };
        vars.retain(|(n, _)| n != name);
        vars.push((name.clone(), value));
    }
}

fn make_ctx<'a>(event: &'a Event, env: &'a Env<'_>, vars: &'a [(String, String)]) -> Ctx<'a> {
    Ctx::new(event, env.table, env.users, env.agent_pid, vars)
}

impl Tracker {
    /// Feeds one event. Returns the evidence of every sequence it completes.
    pub fn feed(
        &mut self,
        steps: &[Step],
        within_ns: u64,
        kind: EventKind,
        event: &Arc<Event>,
        env: &Env<'_>,
        plain: &Ctx<'_>,
    ) -> Vec<Vec<Arc<Event>>> {
        let now = event.boot_ns;
        self.expire(now, within_ns);
        let mut done = Vec::new();
        let mut advanced: Vec<(usize, GroupKey, Partial)> = Vec::new();
        // Continue the partial matches waiting for a step this event can be.
        for (index, step) in steps.iter().enumerate().skip(1) {
            if !step.on.contains(&kind) || self.per_step.get(index).is_none_or(|n| *n == 0) {
                continue;
            }
            let Some(key) = key_of(step.key, plain) else {
                continue;
            };
            let Some(waiting) = self.waiting.get_mut(&(index, key)) else {
                continue;
            };
            let mut i = 0;
            while i < waiting.len() {
                let p = &waiting[i];
                // Without captures the event's own context answers (no lookup per partial).
                let holds = || {
                    if p.vars.is_empty() {
                        step.cond.eval(plain)
                    } else {
                        step.cond.eval(&make_ctx(event, env, &p.vars))
                    }
                };
                if now.saturating_sub(p.started_ns) > within_ns || !holds() {
                    i += 1;
                    continue;
                }
                let mut p = waiting.remove(i);
                self.count -= 1;
                self.per_step[index] -= 1;
                let snapshot = p.vars.clone();
                capture(step, &make_ctx(event, env, &snapshot), &mut p.vars);
                p.evidence.push(Arc::clone(event));
                if index + 1 == steps.len() {
                    done.push(p.evidence);
                } else {
                    advanced.push((index + 1, key, p));
                }
            }
        }
        // Start a new partial match.
        let first = &steps[0];
        if steps.len() > 1
            && first.on.contains(&kind)
            && first.cond.eval(plain)
            && let Some(key) = key_of(first.key, plain)
        {
            let mut vars = Vec::new();
            capture(first, plain, &mut vars);
            // A fresher start replaces an identical one still waiting for step 2.
            if let Some(waiting) = self.waiting.get_mut(&(1, key)) {
                let before = waiting.len();
                waiting.retain(|p| p.vars != vars);
                self.count -= before - waiting.len();
                self.per_step[1] -= before - waiting.len();
            }
            advanced.push((
                1,
                key,
                Partial {
                    started_ns: now,
                    vars,
                    evidence: vec![Arc::clone(event)],
                },
            ));
        }
        for (index, key, p) in advanced {
            self.order.push_back((p.started_ns, index, key));
            self.waiting.entry((index, key)).or_default().push(p);
            self.count += 1;
            if self.per_step.len() <= index {
                self.per_step.resize(index + 1, 0);
            }
            self.per_step[index] += 1;
        }
        while self.count > MAX_PARTIALS {
            if !self.drop_oldest() {
                break;
            }
        }
        done
    }

    /// Drops partial matches started more than `within_ns` before `now`.
    fn expire(&mut self, now: u64, within_ns: u64) {
        while let Some((started, _, _)) = self.order.front() {
            if now.saturating_sub(*started) <= within_ns {
                break;
            }
            self.drop_oldest();
        }
    }

    /// Removes the oldest partial match behind the oldest `order` entry (entries whose
    /// partial already advanced or completed are skipped).
    fn drop_oldest(&mut self) -> bool {
        let Some((started, index, key)) = self.order.pop_front() else {
            return false;
        };
        let slot = (index, key);
        if let Some(waiting) = self.waiting.get_mut(&slot) {
            if let Some(pos) = waiting.iter().position(|p| p.started_ns == started) {
                waiting.remove(pos);
                self.count -= 1;
                self.per_step[index] -= 1;
            }
            if waiting.is_empty() {
                self.waiting.remove(&slot);
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}
