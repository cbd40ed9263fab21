//! Sequences: a rule whose steps must match in order, within a time window, on events
//! that share a key (the same process tree, process, or parent). Partial matches are kept
//! per rule, bounded in number and expired by event time.

use sensor_proto::v1::Event;

use super::{
    alert::tree_key,
    fields::{Ctx, Value},
    rules::{Key, Step},
    users::UserNames,
};
use crate::proctable::ProcessTable;

/// What evaluating a step needs besides the event.
pub struct Env<'a> {
    pub table: &'a ProcessTable,
    pub users: &'a UserNames,
    pub agent_pid: u32,
}

/// Partial matches kept per rule at most; the oldest go first.
pub const MAX_PARTIALS: usize = 4096;

#[derive(Clone, Debug)]
struct Partial {
    /// Index of the step it waits for.
    next: usize,
    key: String,
    started_ns: u64,
    vars: Vec<(String, String)>,
    evidence: Vec<Event>,
}

/// The partial matches of one sequence rule.
#[derive(Default, Debug)]
pub struct Tracker {
    partials: Vec<Partial>,
}

fn key_of(key: Key, ctx: &Ctx<'_>) -> Option<String> {
    let ev = ctx.event;
    Some(match key {
        Key::Tree => tree_key(ctx.table, ev.pid),
        Key::Process => format!("pid:{}", ev.pid),
        Key::Parent => format!("pid:{}", ctx.proc?.ppid),
        Key::Field(f) => match f.get(ctx) {
            Value::Str(s) => format!("s:{s}"),
            Value::Int(i) => format!("i:{i}"),
            _ => return None,
        },
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

impl Tracker {
    /// Feeds one event. Returns the evidence of every sequence it completes.
    pub fn feed(
        &mut self,
        steps: &[Step],
        within_ns: u64,
        kind: &str,
        event: &Event,
        env: &Env<'_>,
    ) -> Vec<Vec<Event>> {
        fn make_ctx<'a>(
            event: &'a Event,
            env: &'a Env<'_>,
            vars: &'a [(String, String)],
        ) -> Ctx<'a> {
            Ctx::new(event, env.table, env.users, env.agent_pid, vars)
        }
        let now = event.boot_ns;
        self.partials
            .retain(|p| now.saturating_sub(p.started_ns) <= within_ns);
        let mut done = Vec::new();
        let mut advanced = Vec::new();
        // Advance partial matches waiting for a step this event can satisfy.
        let mut i = 0;
        while i < self.partials.len() {
            let step = &steps[self.partials[i].next];
            if !step.on.contains(&kind) {
                i += 1;
                continue;
            }
            let matched = {
                let p = &self.partials[i];
                let ctx = make_ctx(event, env, &p.vars);
                key_of(step.key, &ctx).is_some_and(|k| k == p.key) && step.cond.eval(&ctx)
            };
            if matched {
                let mut p = self.partials.swap_remove(i);
                let snapshot = p.vars.clone();
                capture(step, &make_ctx(event, env, &snapshot), &mut p.vars);
                p.evidence.push(event.clone());
                p.next += 1;
                if p.next == steps.len() {
                    done.push(p.evidence);
                } else {
                    advanced.push(p);
                }
                continue;
            }
            i += 1;
        }
        // Start a new partial match.
        let first = &steps[0];
        if first.on.contains(&kind) {
            let ctx = make_ctx(event, env, &[]);
            if let Some(key) = key_of(first.key, &ctx)
                && first.cond.eval(&ctx)
            {
                let mut vars = Vec::new();
                capture(first, &ctx, &mut vars);
                // A fresher start replaces an identical one still waiting for step 2.
                self.partials
                    .retain(|p| !(p.next == 1 && p.key == key && p.vars == vars));
                if steps.len() > 1 {
                    advanced.push(Partial {
                        next: 1,
                        key,
                        started_ns: now,
                        vars,
                        evidence: vec![event.clone()],
                    });
                }
            }
        }
        self.partials.extend(advanced);
        if self.partials.len() > MAX_PARTIALS {
            self.partials.sort_by_key(|p| p.started_ns);
            let excess = self.partials.len() - MAX_PARTIALS;
            self.partials.drain(..excess);
        }
        done
    }

    pub fn len(&self) -> usize {
        self.partials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.partials.is_empty()
    }
}
