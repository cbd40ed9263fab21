//! The `enforce:` section of the rule language: per web-tier identity, what its
//! descendants may run, as data the kernel evaluates at exec (`--enforce`).
//!
//! ```yaml
//! enforce:
//!   - identity: rewritemap-helper
//!     allow: [/usr/bin/date, /bin/date]      # an allow list: nothing else may run
//!     deny: [socket_stdio, unlinked, tmp_written]
//!     rationale: ...
//! ```
//! A later file's entry for the same identity replaces the earlier one; with
//! `append: true` it adds its `allow` and `deny` to it instead (an operator's override of
//! the pack). Each entry also becomes the alert rule `enforce:IDENTITY`, raised whenever
//! the kernel stopped (or, in audit, would have stopped) a program under it.

use std::sync::Arc;

use marked_yaml::Spanned;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnforceDef {
    pub identity: Spanned<String>,
    /// Executables (paths, resolved to the file they name when the policy is applied)
    /// that the identity's descendants may run. Present (even empty): nothing else may.
    #[serde(default)]
    pub allow: Option<Vec<Spanned<String>>>,
    /// Shapes that may never run under the identity.
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
    #[serde(default)]
    pub append: bool,
    #[serde(default)]
    pub rationale: String,
}

/// A shape of program that a policy can refuse whatever its allow list says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shape {
    /// Any program with an inet socket on fd 0, 1 or 2, whatever its file (a copied or
    /// renamed shell included).
    SocketStdio,
    /// A shell or interpreter (by identity: an installed one) with an inet socket on fd
    /// 0, 1 or 2.
    SocketShell,
    /// An executable with no name: a memfd or a deleted file.
    Unlinked,
    /// A file written or changed since boot under /tmp, /var/tmp, /dev/shm or /run/user.
    TmpWritten,
}

impl Shape {
    pub const ALL: [Shape; 4] = [
        Shape::SocketStdio,
        Shape::SocketShell,
        Shape::Unlinked,
        Shape::TmpWritten,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::SocketStdio => "socket_stdio",
            Shape::SocketShell => "socket_shell",
            Shape::Unlinked => "unlinked",
            Shape::TmpWritten => "tmp_written",
        }
    }

    pub fn parse(s: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|x| x.name() == s)
    }

    pub fn flag(self) -> u32 {
        use sensor_common::enforce as e;
        match self {
            Shape::SocketStdio => e::DENY_SOCKET_STDIO,
            Shape::SocketShell => e::DENY_SOCKET_SHELL,
            Shape::Unlinked => e::DENY_UNLINKED,
            Shape::TmpWritten => e::DENY_TMP_WRITTEN,
        }
    }
}

/// One identity's compiled policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub identity: Arc<str>,
    /// Its number in the kernel (1-based, the entry's position).
    pub label: u32,
    pub allow: Option<Vec<String>>,
    pub deny: Vec<Shape>,
    pub rationale: String,
    /// The file(s) it came from.
    pub source: Arc<str>,
}

impl Entry {
    pub fn rule_id(&self) -> String {
        rule_id(&self.identity)
    }

    pub fn title(&self) -> String {
        format!(
            "Enforcement: a program under {} broke its policy",
            self.identity
        )
    }

    /// The kernel's `POLICY` flags of this entry.
    pub fn flags(&self) -> u32 {
        let allow = if self.allow.is_some() {
            sensor_common::enforce::ALLOW_LIST
        } else {
            0
        };
        self.deny.iter().fold(allow, |f, s| f | s.flag())
    }
}

pub fn rule_id(identity: &str) -> String {
    format!("enforce:{identity}")
}

/// The whole enforcement policy of a rule set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub entries: Vec<Entry>,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn by_label(&self, label: u32) -> Option<&Entry> {
        self.entries.get((label as usize).checked_sub(1)?)
    }

    pub fn by_identity(&self, identity: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| &*e.identity == identity)
    }

    /// Names the identity and rule of an enforcement verdict the kernel reported.
    pub fn name(&self, enforcement: &mut sensor_proto::v1::Enforcement) {
        if let Some(entry) = self.by_label(enforcement.label) {
            enforcement.identity = entry.identity.to_string();
            enforcement.rule = entry.rule_id();
        }
    }

    /// For `rules check`: the compiled policy, one identity per line.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for e in &self.entries {
            let allow = match &e.allow {
                Some(list) if list.is_empty() => "nothing".to_owned(),
                Some(list) => list.join(", "),
                None => "anything not denied".to_owned(),
            };
            let deny: Vec<&str> = e.deny.iter().map(|s| s.name()).collect();
            out.push_str(&format!(
                "  {} (label {}, rule {}): may run {}; never {}\n",
                e.identity,
                e.label,
                e.rule_id(),
                allow,
                if deny.is_empty() {
                    "-".to_owned()
                } else {
                    deny.join(", ")
                }
            ));
        }
        out
    }
}
