//! The kinds of events, one vocabulary for rules (`on:`), metrics labels, statistics and
//! loss counters: the `oneof kind` of [`Event`](crate::v1::Event).

use crate::v1::{Event, event};

/// What an event is: one variant per arm of `Event.kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    Exec,
    ExecFailed,
    Fork,
    Exit,
    Connect,
    Accept,
    Bind,
    Listen,
    Socket,
    Dup,
    MemfdCreate,
    Ptrace,
    ProcessVmWrite,
    File,
    ProcMemWrite,
    ModuleLoad,
    BpfLoad,
    Signal,
}

impl EventKind {
    /// Every kind, in `index` order.
    pub const ALL: [EventKind; 18] = [
        EventKind::Exec,
        EventKind::ExecFailed,
        EventKind::Fork,
        EventKind::Exit,
        EventKind::Connect,
        EventKind::Accept,
        EventKind::Bind,
        EventKind::Listen,
        EventKind::Socket,
        EventKind::Dup,
        EventKind::MemfdCreate,
        EventKind::Ptrace,
        EventKind::ProcessVmWrite,
        EventKind::File,
        EventKind::ProcMemWrite,
        EventKind::ModuleLoad,
        EventKind::BpfLoad,
        EventKind::Signal,
    ];

    /// How many kinds there are.
    pub const COUNT: usize = Self::ALL.len();

    /// The name rules use in `on:`, and metrics in their `kind` label.
    pub const fn name(self) -> &'static str {
        match self {
            EventKind::Exec => "exec",
            EventKind::ExecFailed => "exec_failed",
            EventKind::Fork => "fork",
            EventKind::Exit => "exit",
            EventKind::Connect => "connect",
            EventKind::Accept => "accept",
            EventKind::Bind => "bind",
            EventKind::Listen => "listen",
            EventKind::Socket => "socket",
            EventKind::Dup => "dup",
            EventKind::MemfdCreate => "memfd_create",
            EventKind::Ptrace => "ptrace",
            EventKind::ProcessVmWrite => "process_vm_write",
            EventKind::File => "file",
            EventKind::ProcMemWrite => "proc_mem_write",
            EventKind::ModuleLoad => "module_load",
            EventKind::BpfLoad => "bpf_load",
            EventKind::Signal => "signal",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The position in [`EventKind::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The kind of `event`; `None` for an event without one.
    pub fn of(event: &Event) -> Option<Self> {
        use event::Kind as K;
        Some(match event.kind.as_ref()? {
            K::Exec(_) => EventKind::Exec,
            K::ExecFailed(_) => EventKind::ExecFailed,
            K::Fork(_) => EventKind::Fork,
            K::Exit(_) => EventKind::Exit,
            K::Connect(_) => EventKind::Connect,
            K::Accept(_) => EventKind::Accept,
            K::Bind(_) => EventKind::Bind,
            K::Listen(_) => EventKind::Listen,
            K::Socket(_) => EventKind::Socket,
            K::Dup(_) => EventKind::Dup,
            K::MemfdCreate(_) => EventKind::MemfdCreate,
            K::Ptrace(_) => EventKind::Ptrace,
            K::ProcessVmWrite(_) => EventKind::ProcessVmWrite,
            K::File(_) => EventKind::File,
            K::ProcMemWrite(_) => EventKind::ProcMemWrite,
            K::ModuleLoad(_) => EventKind::ModuleLoad,
            K::BpfLoad(_) => EventKind::BpfLoad,
            K::Signal(_) => EventKind::Signal,
        })
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_indexes_follow_all() {
        for (i, k) in EventKind::ALL.into_iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_eq!(EventKind::parse(k.name()), Some(k));
        }
        assert_eq!(EventKind::parse("process_vm_writev"), None);
    }

    #[test]
    fn every_arm_of_the_proto_has_a_kind() {
        let event = |kind| Event {
            kind: Some(kind),
            ..Default::default()
        };
        assert_eq!(
            EventKind::of(&event(event::Kind::Signal(Default::default()))),
            Some(EventKind::Signal)
        );
        assert_eq!(
            EventKind::of(&event(event::Kind::ProcMemWrite(Default::default()))),
            Some(EventKind::ProcMemWrite)
        );
        assert_eq!(EventKind::of(&Event::default()), None);
    }
}
