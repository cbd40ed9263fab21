//! Our events as Sigma sees them: the Sysmon-for-Linux field names of a category, each
//! filled from our event fields once per event, with its lowercase form (Sigma compares
//! case-insensitively unless a rule says `cased`).

use std::borrow::Cow;

use sensor_proto::v1::{Event, FileOp, event};

use crate::detect::fields::{Ctx, Field, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    ProcessCreation,
    NetworkConnection,
    FileEvent,
}

impl Category {
    pub const ALL: [Category; 3] = [
        Category::ProcessCreation,
        Category::NetworkConnection,
        Category::FileEvent,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "process_creation" => Category::ProcessCreation,
            "network_connection" => Category::NetworkConnection,
            "file_event" => Category::FileEvent,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Category::ProcessCreation => "process_creation",
            Category::NetworkConnection => "network_connection",
            Category::FileEvent => "file_event",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The Sigma fields we fill for this category.
    pub fn fields(self) -> &'static [SigmaField] {
        use SigmaField as F;
        const PROCESS: &[SigmaField] = &[
            F::Image,
            F::CommandLine,
            F::CurrentDirectory,
            F::User,
            F::ProcessId,
            F::ParentImage,
            F::ParentCommandLine,
            F::ParentProcessId,
            F::OriginalFileName,
        ];
        const NETWORK: &[SigmaField] = &[
            F::Image,
            F::CommandLine,
            F::User,
            F::ProcessId,
            F::DestinationIp,
            F::DestinationPort,
            F::SourceIp,
            F::SourcePort,
            F::Initiated,
            F::Protocol,
        ];
        const FILE: &[SigmaField] = &[
            F::Image,
            F::CommandLine,
            F::User,
            F::ProcessId,
            F::TargetFilename,
        ];
        match self {
            Category::ProcessCreation => PROCESS,
            Category::NetworkConnection => NETWORK,
            Category::FileEvent => FILE,
        }
    }

    pub fn field(self, name: &str) -> Option<SigmaField> {
        self.fields().iter().copied().find(|f| f.name() == name)
    }
}

/// A Sigma field we can fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SigmaField {
    Image,
    CommandLine,
    CurrentDirectory,
    User,
    ProcessId,
    ParentImage,
    ParentCommandLine,
    ParentProcessId,
    OriginalFileName,
    DestinationIp,
    DestinationPort,
    SourceIp,
    SourcePort,
    Initiated,
    Protocol,
    TargetFilename,
}

/// How many [`SigmaField`]s there are.
pub const FIELDS: usize = 16;

impl SigmaField {
    pub fn name(self) -> &'static str {
        use SigmaField as F;
        match self {
            F::Image => "Image",
            F::CommandLine => "CommandLine",
            F::CurrentDirectory => "CurrentDirectory",
            F::User => "User",
            F::ProcessId => "ProcessId",
            F::ParentImage => "ParentImage",
            F::ParentCommandLine => "ParentCommandLine",
            F::ParentProcessId => "ParentProcessId",
            F::OriginalFileName => "OriginalFileName",
            F::DestinationIp => "DestinationIp",
            F::DestinationPort => "DestinationPort",
            F::SourceIp => "SourceIp",
            F::SourcePort => "SourcePort",
            F::Initiated => "Initiated",
            F::Protocol => "Protocol",
            F::TargetFilename => "TargetFilename",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// One field's value in an event: text or a number, as the Sigma event would hold it.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Bool(bool),
}

/// A filled field: its value, its text (numbers in decimal, as Sigma's wildcard matching
/// sees them) and that text lowercased.
#[derive(Clone, Debug)]
pub struct Filled<'a> {
    pub value: Scalar<'a>,
    pub text: Cow<'a, str>,
    pub lower: Cow<'a, str>,
}

impl<'a> Filled<'a> {
    pub fn new(value: Scalar<'a>) -> Self {
        let text: Cow<'a, str> = match &value {
            Scalar::Str(s) => s.clone(),
            Scalar::Int(i) => Cow::Owned(i.to_string()),
            Scalar::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        };
        let lower = lowercase(&text);
        Self { value, text, lower }
    }
}

/// Lowercase as Sigma does: character by character (`char::to_lowercase`, not the
/// context-sensitive `str::to_lowercase`), borrowing when nothing changes.
pub fn lowercase<'a>(s: &Cow<'a, str>) -> Cow<'a, str> {
    if s.is_ascii() {
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(s.to_ascii_lowercase())
        } else {
            s.clone()
        }
    } else {
        Cow::Owned(s.chars().flat_map(char::to_lowercase).collect())
    }
}

/// An event in a category, its fields by [`SigmaField::index`]; `None` where the event
/// has no value (a rule's comparisons on it are false, `|exists: false` is true).
#[derive(Clone, Debug)]
pub struct View<'a> {
    pub category: Category,
    pub fields: [Option<Filled<'a>>; FIELDS],
}

impl<'a> View<'a> {
    pub fn new(category: Category) -> Self {
        Self {
            category,
            fields: Default::default(),
        }
    }

    pub fn get(&self, field: SigmaField) -> Option<&Filled<'a>> {
        self.fields[field.index()].as_ref()
    }

    pub fn set(&mut self, field: SigmaField, value: Scalar<'a>) {
        self.fields[field.index()] = Some(Filled::new(value));
    }

    fn put(&mut self, field: SigmaField, value: Value<'a>) {
        let scalar = match value {
            Value::Str(s) => Scalar::Str(s),
            Value::Int(i) => Scalar::Int(i),
            Value::Bool(b) => Scalar::Bool(b),
            Value::List(items) => Scalar::Str(Cow::Owned(items.join(" "))),
            Value::Missing => return,
        };
        self.set(field, scalar);
    }
}

/// Our event as Sigma sees it; `None` for events no category covers.
///
/// | Sigma | ours |
/// | --- | --- |
/// | Image, CommandLine, CurrentDirectory, User, ProcessId | proc.exe, proc.cmdline, proc.cwd, proc.user, proc.pid |
/// | ParentImage, ParentCommandLine, ParentProcessId | parent.exe, parent.cmdline, parent.pid |
/// | OriginalFileName | proc.name (Linux executables carry no original name) |
/// | DestinationIp/Port, SourceIp/Port | remote and local ends; swapped for accepted connections |
/// | Initiated | "true" for connect, "false" for accept |
/// | Protocol | "tcp" (stream) or "udp" (dgram) |
/// | TargetFilename | file.path of a created, written, truncated, linked or renamed-to file |
pub fn view<'a>(event: &'a Event, ctx: &Ctx<'a>) -> Option<View<'a>> {
    use SigmaField as F;
    use event::Kind as K;
    let process = |v: &mut View<'a>| {
        v.put(F::Image, Field::ProcExe.get(ctx));
        v.put(F::CommandLine, Field::ProcCmdline.get(ctx));
        v.put(F::User, Field::ProcUser.get(ctx));
        v.put(F::ProcessId, Field::ProcPid.get(ctx));
    };
    match event.kind.as_ref()? {
        K::Exec(_) => {
            let mut v = View::new(Category::ProcessCreation);
            process(&mut v);
            v.put(F::CurrentDirectory, Field::ProcCwd.get(ctx));
            v.put(F::OriginalFileName, Field::ProcName.get(ctx));
            v.put(F::ParentImage, Field::ParentExe.get(ctx));
            v.put(F::ParentCommandLine, Field::ParentCmdline.get(ctx));
            v.put(F::ParentProcessId, Field::ParentPid.get(ctx));
            Some(v)
        }
        kind @ (K::Connect(_) | K::Accept(_)) => {
            let (sock, initiated) = match kind {
                K::Connect(c) => (c.socket.as_ref()?, true),
                K::Accept(a) => (a.socket.as_ref()?, false),
                _ => return None,
            };
            let mut v = View::new(Category::NetworkConnection);
            process(&mut v);
            let (src, src_port, dst, dst_port) = if initiated {
                (
                    &sock.local_addr,
                    sock.local_port,
                    &sock.remote_addr,
                    sock.remote_port,
                )
            } else {
                (
                    &sock.remote_addr,
                    sock.remote_port,
                    &sock.local_addr,
                    sock.local_port,
                )
            };
            let text = |s: &'static str| Scalar::Str(Cow::Borrowed(s));
            v.set(F::Initiated, text(if initiated { "true" } else { "false" }));
            v.set(F::SourceIp, Scalar::Str(Cow::Borrowed(src)));
            v.set(F::SourcePort, Scalar::Int(i64::from(src_port)));
            v.set(F::DestinationIp, Scalar::Str(Cow::Borrowed(dst)));
            v.set(F::DestinationPort, Scalar::Int(i64::from(dst_port)));
            let protocol = match sock.r#type.as_str() {
                "stream" => "tcp",
                "dgram" => "udp",
                other => other,
            };
            v.set(F::Protocol, Scalar::Str(Cow::Borrowed(protocol)));
            Some(v)
        }
        K::File(f) => {
            let created = matches!(
                FileOp::try_from(f.op).unwrap_or(FileOp::Unspecified),
                FileOp::Create
                    | FileOp::CreateExec
                    | FileOp::OpenWrite
                    | FileOp::Truncate
                    | FileOp::Link
            ) || (f.op == FileOp::Rename as i32 && !f.path_is_source);
            if !created {
                return None;
            }
            let mut v = View::new(Category::FileEvent);
            process(&mut v);
            v.set(F::TargetFilename, Scalar::Str(Cow::Borrowed(&f.path)));
            Some(v)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercase_is_per_character_and_borrows_when_unchanged() {
        assert!(matches!(
            lowercase(&Cow::Borrowed("/usr/bin/nc")),
            Cow::Borrowed(_)
        ));
        assert_eq!(lowercase(&Cow::Borrowed("/USR/Bin")), "/usr/bin");
        // str::to_lowercase would give a final sigma (ς) at the end of a word.
        assert_eq!(lowercase(&Cow::Borrowed("ΟΔΟΣ")), "οδοσ");
        assert_eq!(lowercase(&Cow::Borrowed("İ")), "i\u{307}");
    }
}
