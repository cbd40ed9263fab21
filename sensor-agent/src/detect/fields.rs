//! The fields a rule condition can test, and how each is read from an event, its process,
//! the parent, the ancestors, the lineage label, or a sequence capture.
//!
//! A field is resolved by name once, when a rule is compiled; evaluation is a `match`
//! over `Field` with values borrowed from the event and the process table.

use std::{borrow::Cow, net::IpAddr, sync::OnceLock};

use sensor_proto::{
    EventKind,
    v1::{DupEvent, Event, ExecEvent, FdKind, FileEvent, FileOp, SocketInfo, event},
};

use crate::{
    detect::users::UserNames,
    proctable::{ProcessInfo, ProcessTable},
};

/// Open flags (x86-64) the `file.flag_*` fields test.
const O_CREAT: u32 = 0o100;
const O_EXCL: u32 = 0o200;
const O_TRUNC: u32 = 0o1000;
const O_APPEND: u32 = 0o2000;

/// What a field holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Str,
    Int,
    Bool,
    /// Several strings; a comparison holds when it holds for any of them.
    StrList,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Str => "a string",
            Kind::Int => "a number",
            Kind::Bool => "a boolean",
            Kind::StrList => "a list of strings",
        }
    }
}

/// The field table: per field its variant, name, type, the event kinds it is set on
/// (empty: all), its description (checked against docs/rules.md) and its getter, which
/// reads the field from a condition's context `c` (`Value::Missing` where it does not
/// apply). One line of the table is one field.
macro_rules! fields {
    ($( $variant:ident => $name:literal, $kind:ident, [$($on:ident),*], $doc:literal,
        |$c:ident| $get:expr; )*) => {
        /// A field a condition can test.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Field {
            $( #[doc = $doc] $variant, )*
        }

        /// (name, field, kind, event kinds it is set on (empty: all), description).
        pub const FIELDS: &[(&str, Field, Kind, &[EventKind], &str)] = &[
            $( ($name, Field::$variant, Kind::$kind, &[$(EventKind::$on),*], $doc), )*
        ];

        impl Field {
            /// This field's value for `ctx`.
            pub fn get<'a>(self, ctx: &Ctx<'a>) -> Value<'a> {
                use event::Kind as K;
                match self {
                    $( Field::$variant => {
                        let $c = ctx;
                        $get
                    } )*
                }
            }
        }
    };
}

fields! {
    EventKind => "event.kind", Str, [], "exec, connect, file... (the `on:` names)",
        |c| s(EventKind::of(c.event).map_or("none", EventKind::name));
    EventPid => "event.pid", Int, [], "pid of the process that acted",
        |c| Value::Int(i64::from(c.event.pid));
    EventUid => "event.uid", Int, [], "real uid of the acting task",
        |c| Value::Int(i64::from(c.event.uid));
    EventComm => "event.comm", Str, [], "kernel task name of the acting task",
        |c| s(&c.event.comm);

    ProcPid => "proc.pid", Int, [], "the process",
        |c| Value::Int(i64::from(c.event.pid));
    ProcPpid => "proc.ppid", Int, [], "its parent's pid",
        |c| proc_value(c.proc, |p| Value::Int(i64::from(p.ppid)));
    ProcExe => "proc.exe", Str, [], "executable path as the kernel resolved it",
        |c| proc_value(c.proc, |p| s(&p.exe));
    ProcName => "proc.name", Str, [], "last component of proc.exe",
        |c| c.proc_name().map_or(Value::Missing, s);
    ProcArgv => "proc.argv", StrList, [], "each argument (any matches)",
        |c| proc_value(c.proc, |p| {
            Value::List(p.argv.iter().map(|a| Cow::Borrowed(a.as_str())).collect())
        });
    ProcArgv0 => "proc.argv0", Str, [], "argv[0]",
        |c| {
            proc_value(c.proc, |p| s(p.argv.first().map_or("", String::as_str)))
        };
    ProcArgs => "proc.args", Str, [], "arguments after argv[0], joined by spaces",
        |c| proc_value(c.proc, |p| {
            let first = p.argv.first().map_or(0, |a| a.len());
            s(p.cmdline.get(first..).map_or("", str::trim_start))
        });
    ProcCmdline => "proc.cmdline", Str, [], "argv joined by spaces",
        |c| proc_value(c.proc, |p| s(&p.cmdline));
    ProcArgc => "proc.argc", Int, [], "number of arguments",
        |c| proc_value(c.proc, |p| Value::Int(p.argv.len() as i64));
    ProcUid => "proc.uid", Int, [], "real uid",
        |c| proc_value(c.proc, |p| Value::Int(i64::from(p.uid)));
    ProcEuid => "proc.euid", Int, [], "effective uid",
        |c| proc_value(c.proc, |p| Value::Int(i64::from(p.euid)));
    ProcUser => "proc.user", Str, [], "user name of proc.uid",
        |c| {
            proc_value(c.proc, |p| Value::Str(Cow::Owned(c.users.name(p.uid))))
        };
    ProcCwd => "proc.cwd", Str, [], "working directory",
        |c| proc_value(c.proc, |p| s(&p.cwd));
    ProcComm => "proc.comm", Str, [], "kernel task name",
        |c| proc_value(c.proc, |p| s(&p.comm));
    ProcExeMemfd => "proc.exe_memfd", Bool, [], "the executable is a memfd",
        |c| proc_value(c.proc, |p| Value::Bool(p.exe_memfd));
    ProcExeDeleted => "proc.exe_deleted", Bool, [], "the executable has no name on disk",
        |c| proc_value(c.proc, |p| Value::Bool(p.exe_deleted));
    ProcExeSha256 => "proc.exe_sha256", Str, [], "SHA-256 of the executable's content (hex)",
        |c| exe_identity(c.proc, |i| s(&i.sha256));
    ProcExePackage => "proc.exe_package", Str, [], "package that installed the executable's path, \"\" if none",
        |c| exe_identity(c.proc, |i| s(&i.package));
    ProcExeShell => "proc.exe_shell", Bool, [], "the executable's content is an installed shell, whatever its name or place",
        |c| exe_identity(c.proc, |i| Value::Bool(i.shell));
    ProcExeInterpreter => "proc.exe_interpreter", Bool, [], "the executable's content is an installed script interpreter (python, perl...)",
        |c| exe_identity(c.proc, |i| Value::Bool(i.interpreter));
    ProcExeChanged => "proc.exe_changed_since_boot", Bool, [], "the executable was written or changed (ctime) after boot",
        |c| exe_identity(c.proc, |i| Value::Bool(i.changed_since_boot));
    ProcExeWriter => "proc.exe_writer", Str, [], "executable of the process that last wrote the executable's path, as the probes saw it (\"\" if unseen)",
        |c| match c.proc {
            Some(p) => s(c.table.writer_of(&p.exe).map_or("", |w| &w.exe)),
            None => Value::Missing,
        };
    ProcExeWriterIdentity => "proc.exe_writer_identity", Str, [], "web-tier identity of that writer, \"\" if none or unseen",
        |c| match c.proc {
            Some(p) => s(c
                .table
                .writer_of(&p.exe)
                .and_then(|w| w.identity.as_deref())
                .unwrap_or("")),
            None => Value::Missing,
        };
    ProcScriptPackage => "proc.script_package", Str, [], "for a script run by a shell or interpreter, the package that installed the script",
        |c| exe_identity(c.proc, |i| s(&i.script_package));

    ParentPid => "parent.pid", Int, [], "the parent process",
        |c| proc_value(c.parent(), |p| Value::Int(i64::from(p.pid)));
    ParentExe => "parent.exe", Str, [], "parent's executable",
        |c| proc_value(c.parent(), |p| s(&p.exe));
    ParentName => "parent.name", Str, [], "last component of parent.exe",
        |c| proc_value(c.parent(), |p| s(basename(&p.exe)));
    ParentCmdline => "parent.cmdline", Str, [], "parent's argv joined by spaces",
        |c| proc_value(c.parent(), |p| s(&p.cmdline));
    ParentArgv => "parent.argv", StrList, [], "parent's arguments (any matches)",
        |c| proc_value(c.parent(), |p| {
            Value::List(p.argv.iter().map(|a| Cow::Borrowed(a.as_str())).collect())
        });
    ParentUid => "parent.uid", Int, [], "parent's real uid",
        |c| proc_value(c.parent(), |p| Value::Int(i64::from(p.uid)));
    ParentComm => "parent.comm", Str, [], "parent's task name",
        |c| proc_value(c.parent(), |p| s(&p.comm));
    ParentThread => "parent.thread", Str, [Exec], "name of the parent thread that forked (a JVM pool)",
        |c| match c.event.kind.as_ref() {
            Some(K::Exec(e)) => s(&e.parent_thread_comm),
            _ => Value::Missing,
        };
    ParentExeShell => "parent.exe_shell", Bool, [], "the parent's executable is an installed shell's content",
        |c| exe_identity(c.parent(), |i| Value::Bool(i.shell));

    AncestorExe => "ancestor.exe", StrList, [], "executables of all ancestors (any matches)",
        |c| Value::List(
            c.ancestors()
                .iter()
                .map(|p| Cow::Borrowed(&*p.exe))
                .collect(),
        );
    AncestorName => "ancestor.name", StrList, [], "names of all ancestors (any matches)",
        |c| Value::List(
            c.ancestors()
                .iter()
                .map(|p| Cow::Borrowed(basename(&p.exe)))
                .collect(),
        );
    AncestorCmdline => "ancestor.cmdline", StrList, [], "command lines of all ancestors",
        |c| Value::List(
            c.ancestors()
                .iter()
                .map(|p| Cow::Borrowed(&*p.cmdline))
                .collect(),
        );
    AncestorExePackage => "ancestor.exe_package", StrList, [], "packages that installed the ancestors' executables",
        |c| Value::List(
            c.ancestors()
                .iter()
                .filter_map(|p| p.exe_identity.as_deref())
                .map(|i| Cow::Borrowed(i.package.as_str()))
                .collect(),
        );
    AncestorScriptPackage => "ancestor.script_package", StrList, [], "packages that installed the scripts the ancestors ran",
        |c| Value::List(
            c.ancestors()
                .iter()
                .filter_map(|p| p.exe_identity.as_deref())
                .map(|i| Cow::Borrowed(i.script_package.as_str()))
                .collect(),
        );

    LineageIdentity => "lineage.identity", Str, [], "web-tier identity the process descends from, \"\" if none",
        |c| s(c
            .proc
            .and_then(|p| p.lineage.as_deref())
            .map_or("", |l| &l.identity));
    LineageTainted => "lineage.tainted", Bool, [], "the process descends from (or is) a web-tier identity",
        |c| Value::Bool(c.proc.is_some_and(|p| p.lineage.is_some()));
    // The source is the image that took the identity: a source that execs
    // something else is no longer one, so `exec` in a helper cannot hide a payload.
    LineageIsSource => "lineage.is_source", Bool, [], "the process itself has the identity",
        |c| Value::Bool(c.proc.is_some_and(|p| {
            p.lineage.as_ref().is_some_and(|l| {
                l.source_pid == p.pid && l.source_exe == p.exe && l.source_argv == p.argv
            })
        }));
    LineageDepth => "lineage.depth", Int, [], "generations below the identity's process",
        |c| {
            match c.proc.and_then(|p| p.lineage.as_ref().map(|l| (p, l))) {
                Some((p, l)) => c
                    .table
                    .depth_to(p.pid, l.source_pid)
                    .map_or(Value::Missing, |d| Value::Int(i64::from(d))),
                None => Value::Missing,
            }
        };
    LineageSourceExe => "lineage.source_exe", Str, [], "executable of the identity's process",
        |c| match c.proc.and_then(|p| p.lineage.as_deref()) {
            Some(l) => s(&l.source_exe),
            None => Value::Missing,
        };
    LineageSourceImage => "lineage.source_image", Bool, [], "the process runs its source's very executable (a worker fork, or the source itself)",
        |c| Value::Bool(
            c.proc
                .is_some_and(|p| p.lineage.as_ref().is_some_and(|l| l.source_exe == p.exe)),
        );

    ExecFilename => "exec.filename", Str, [Exec], "filename passed to execve",
        |c| match c.event.kind.as_ref() {
            Some(K::Exec(e)) => s(&e.filename),
            _ => Value::Missing,
        };
    ExecStdin => "exec.stdin", Str, [Exec], "what fd 0 is: none, file, dir, pipe, socket, tty, char, other",
        |c| exec(c, |e| stdio(e, 0));
    ExecStdout => "exec.stdout", Str, [Exec], "what fd 1 is",
        |c| exec(c, |e| stdio(e, 1));
    ExecStderr => "exec.stderr", Str, [Exec], "what fd 2 is",
        |c| exec(c, |e| stdio(e, 2));
    ExecStdioSocket => "exec.stdio_socket", Bool, [Exec], "any of fds 0-2 is a socket",
        |c| match c.event.kind.as_ref() {
            Some(K::Exec(e)) => {
                Value::Bool(e.stdio.iter().any(|f| f.kind == FdKind::Socket as i32))
            }
            _ => Value::Missing,
        };
    ExecStdioRemoteAddr => "exec.stdio_remote_addr", StrList, [Exec], "remote addresses of socket fds 0-2",
        |c| match c.event.kind.as_ref() {
            Some(K::Exec(e)) => Value::List(
                e.stdio
                    .iter()
                    .filter_map(|f| f.socket.as_ref())
                    .filter(|s| !s.remote_addr.is_empty())
                    .map(|s| Cow::Borrowed(s.remote_addr.as_str()))
                    .collect(),
            ),
            _ => Value::Missing,
        };
    ExecParentConnected => "exec.parent_connected", Bool, [Exec], "a shell or interpreter whose web-tier parent held a TCP connection out when it started",
        |c| match c.event.kind.as_ref() {
            Some(K::Exec(e)) => Value::Bool(!e.parent_connections.is_empty()),
            _ => Value::Missing,
        };
    ExecParentRemoteAddr => "exec.parent_remote_addr", Str, [Exec], "remote address of that parent's newest outbound connection",
        |c| match c.event.kind.as_ref() {
            Some(K::Exec(e)) => e
                .parent_connections
                .first()
                .map_or(Value::Missing, |c| s(&c.remote_addr)),
            _ => Value::Missing,
        };
    ExecParentRemotePort => "exec.parent_remote_port", Int, [Exec], "remote port of that parent's newest outbound connection",
        |c| match c.event.kind.as_ref() {
            Some(K::Exec(e)) => e
                .parent_connections
                .first()
                .map_or(Value::Missing, |c| Value::Int(i64::from(c.remote_port))),
            _ => Value::Missing,
        };
    ExecTty => "exec.tty", Bool, [Exec], "any of fds 0-2 is a terminal",
        |c| match c.event.kind.as_ref() {
            Some(K::Exec(e)) => {
                Value::Bool(e.stdio.iter().any(|f| f.kind == FdKind::Tty as i32))
            }
            _ => Value::Missing,
        };
    ExecExecveat => "exec.execveat", Bool, [Exec], "started with execveat (fexecve)",
        |c| match c.event.kind.as_ref() {
            Some(K::Exec(e)) => Value::Bool(e.execveat),
            _ => Value::Missing,
        };
    ExecArgvTruncated => "exec.argv_truncated", Bool, [Exec], "argv was longer than 4 KiB",
        |c| match c.event.kind.as_ref() {
            Some(K::Exec(e)) => Value::Bool(e.argv_truncated),
            _ => Value::Missing,
        };

    EnforceAction => "enforce.action", Str, [Exec, ExecFailed], "what enforcement did: killed, denied, would_kill (absent when nothing)",
        |c| crate::detect::alert::enforcement_of(c.event)
            .map_or(Value::Missing, |e| s(crate::detect::alert::action_name(e.action)));
    EnforceRule => "enforce.rule", Str, [Exec, ExecFailed], "the enforcement rule that decided (enforce:IDENTITY)",
        |c| crate::detect::alert::enforcement_of(c.event).map_or(Value::Missing, |e| s(&e.rule));
    EnforceReason => "enforce.reason", Str, [Exec, ExecFailed], "the shape that decided: not_allowed, socket_stdio, socket_shell, unlinked, tmp_written",
        |c| crate::detect::alert::enforcement_of(c.event).map_or(Value::Missing, |e| s(&e.reason));

    ExecFailedFilename => "exec_failed.filename", Str, [ExecFailed], "the filename that failed",
        |c| match c.event.kind.as_ref() {
            Some(K::ExecFailed(e)) => s(&e.filename),
            _ => Value::Missing,
        };
    ExecFailedError => "exec_failed.error", Str, [ExecFailed], "errno name",
        |c| match c.event.kind.as_ref() {
            Some(K::ExecFailed(e)) => s(&e.error),
            _ => Value::Missing,
        };

    NetFamily => "net.family", Str, [Connect, Accept, Bind, Listen, Socket], "inet, inet6, unix...",
        |c| match c.event.kind.as_ref() {
            Some(K::Socket(e)) => s(&e.family),
            _ => sock(c, |k| s(&k.family)),
        };
    NetType => "net.type", Str, [Connect, Accept, Bind, Listen, Socket], "stream, dgram...",
        |c| match c.event.kind.as_ref() {
            Some(K::Socket(e)) => s(&e.r#type),
            _ => sock(c, |k| s(&k.r#type)),
        };
    NetLocalAddr => "net.local_addr", Str, [Connect, Accept, Bind, Listen], "local address",
        |c| sock(c, |k| s(&k.local_addr));
    NetLocalPort => "net.local_port", Int, [Connect, Accept, Bind, Listen], "local port",
        |c| sock(c, |k| Value::Int(i64::from(k.local_port)));
    NetRemoteAddr => "net.remote_addr", Str, [Connect, Accept], "remote address",
        |c| sock(c, |k| s(&k.remote_addr));
    NetRemotePort => "net.remote_port", Int, [Connect, Accept], "remote port",
        |c| sock(c, |k| Value::Int(i64::from(k.remote_port)));
    NetRemotePublic => "net.remote_public", Bool, [Connect, Accept], "remote address is neither loopback, private, link-local nor unspecified",
        |c| sock(c, |k| Value::Bool(is_public(&k.remote_addr)));
    NetRemoteLoopback => "net.remote_loopback", Bool, [Connect, Accept], "remote address is loopback",
        |c| sock(c, |k| Value::Bool(is_loopback(&k.remote_addr)));
    NetUnixPath => "net.unix_path", Str, [Connect, Bind], "unix socket path (@name when abstract)",
        |c| match c.event.kind.as_ref() {
            Some(K::Connect(e)) => s(&e.unix_path),
            Some(K::Bind(e)) => s(&e.unix_path),
            _ => Value::Missing,
        };
    NetResult => "net.result", Int, [Connect, Bind, Listen, Socket], "syscall result",
        |c| match c.event.kind.as_ref() {
            Some(K::Connect(e)) => Value::Int(i64::from(e.result)),
            Some(K::Bind(e)) => Value::Int(i64::from(e.result)),
            Some(K::Listen(e)) => Value::Int(i64::from(e.result)),
            Some(K::Socket(e)) => Value::Int(i64::from(e.fd)),
            _ => Value::Missing,
        };
    NetError => "net.error", Str, [Connect, Bind, Listen, Socket], "errno name of a failure",
        |c| match c.event.kind.as_ref() {
            Some(K::Connect(e)) => s(&e.error),
            Some(K::Bind(e)) => s(&e.error),
            Some(K::Listen(e)) => s(&e.error),
            Some(K::Socket(e)) => s(&e.error),
            _ => Value::Missing,
        };
    NetInProgress => "net.in_progress", Bool, [Connect], "non-blocking connect in progress",
        |c| match c.event.kind.as_ref() {
            Some(K::Connect(e)) => Value::Bool(e.in_progress),
            _ => Value::Missing,
        };
    NetBacklog => "net.backlog", Int, [Listen], "listen backlog",
        |c| match c.event.kind.as_ref() {
            Some(K::Listen(e)) => Value::Int(i64::from(e.backlog)),
            _ => Value::Missing,
        };

    DupCall => "dup.call", Str, [Dup], "dup, dup2, dup3, fcntl",
        |c| dup(c, |d| s(&d.call));
    DupNewfd => "dup.newfd", Int, [Dup], "descriptor obtained",
        |c| dup(c, |d| Value::Int(i64::from(d.result)));
    DupFdKind => "dup.fd_kind", Str, [Dup], "what was duplicated: socket, pipe, file...",
        |c| dup(c, |d| s(d.file.as_ref().map_or("unknown", |f| fd_kind_name(f.kind))));
    DupRemoteAddr => "dup.remote_addr", Str, [Dup], "remote address when a socket was duplicated",
        |c| dup(c, |d| s(dup_socket(d).map_or("", |k| k.remote_addr.as_str())));
    DupRemotePort => "dup.remote_port", Int, [Dup], "remote port when a socket was duplicated",
        |c| dup(c, |d| Value::Int(i64::from(dup_socket(d).map_or(0, |k| k.remote_port))));

    MemfdName => "memfd.name", Str, [MemfdCreate], "memfd name",
        |c| match c.event.kind.as_ref() {
            Some(K::MemfdCreate(m)) => s(&m.name),
            _ => Value::Missing,
        };

    PtraceRequest => "ptrace.request", Str, [Ptrace], "PTRACE_ATTACH, PTRACE_POKETEXT...",
        |c| match c.event.kind.as_ref() {
            Some(K::Ptrace(p)) => s(&p.request),
            _ => Value::Missing,
        };
    TargetPid => "target.pid", Int, [Ptrace, ProcessVmWrite, ProcMemWrite, Signal], "process acted upon",
        |c| target(c, |t| Value::Int(i64::from(t)));
    TargetExe => "target.exe", Str, [Ptrace, ProcessVmWrite, ProcMemWrite, Signal], "its executable",
        |c| target(c, |t| proc_value(c.table.get(t), |p| s(&p.exe)));
    TargetName => "target.name", Str, [Ptrace, ProcessVmWrite, ProcMemWrite, Signal], "its name",
        |c| target(c, |t| proc_value(c.table.get(t), |p| s(basename(&p.exe))));
    TargetIsAgent => "target.is_agent", Bool, [Ptrace, ProcessVmWrite, ProcMemWrite, Signal], "the target is this agent",
        |c| target(c, |t| Value::Bool(c.agent_pid != 0 && t == c.agent_pid));
    TargetIsSelf => "target.is_self", Bool, [Ptrace, ProcessVmWrite, ProcMemWrite], "the process acts on itself",
        |c| target(c, |t| Value::Bool(t == c.event.pid));
    Result => "result", Int, [], "syscall result of the event (0 when it has none)",
        |c| Value::Int(match c.event.kind.as_ref() {
            Some(K::Connect(e)) => i64::from(e.result),
            Some(K::Bind(e)) => i64::from(e.result),
            Some(K::Listen(e)) => i64::from(e.result),
            Some(K::Dup(e)) => i64::from(e.result),
            Some(K::Ptrace(e)) => i64::from(e.result),
            Some(K::ProcessVmWrite(e)) => e.bytes,
            Some(K::File(e)) => i64::from(e.result),
            Some(K::ProcMemWrite(e)) => i64::from(e.result),
            Some(K::BpfLoad(e)) => i64::from(e.result),
            Some(K::ExecFailed(e)) => -i64::from(e.errno),
            _ => 0,
        });

    FileOp => "file.op", Str, [File], "open_write, create, truncate, create_exec, rename, unlink, chmod_exec, utimes, link",
        |c| file(c, |f| s(file_op_name(f.op)));
    FilePath => "file.path", Str, [File], "absolute path",
        |c| file(c, |f| s(&f.path));
    FileName => "file.name", Str, [File], "last component of file.path",
        |c| file(c, |f| s(c.file_name(&f.path)));
    FileDir => "file.dir", Str, [File], "file.path without its last component",
        |c| file(c, |f| s(f.path.rsplit_once('/').map_or("", |(d, _)| d)));
    FileExt => "file.ext", Str, [File], "extension of file.name, without the dot",
        |c| file(c, |f| s(basename(&f.path).rsplit_once('.').map_or("", |(_, e)| e)));
    FileOtherPath => "file.other_path", Str, [File], "the other name of a rename",
        |c| file(c, |f| s(&f.other_path));
    FileIsSource => "file.is_source", Bool, [File], "file.path is where a rename came from",
        |c| file(c, |f| Value::Bool(f.path_is_source));
    FileMode => "file.mode", Int, [File], "mode given to open or chmod",
        |c| file(c, |f| Value::Int(i64::from(f.mode)));
    FileFlags => "file.flags", Int, [File], "open flags",
        |c| file(c, |f| Value::Int(i64::from(f.flags)));
    FileGivenPath => "file.given_path", Str, [File], "the path as the process gave it, when a link, '..' or another mount made it differ from file.path",
        |c| file(c, |f| s(&f.given_path));
    FileResolved => "file.resolved", Bool, [File], "file.path was walked up from the file the kernel opened",
        |c| file(c, |f| Value::Bool(f.resolved));
    FileCreated => "file.created", Bool, [File], "the open created the file (known when file.resolved)",
        |c| file(c, |f| Value::Bool(f.created));
    FileExisted => "file.existed", Bool, [File], "the file was there before the open (known when file.resolved)",
        |c| file(c, |f| Value::Bool(f.existed));
    FileFlagCreate => "file.flag_create", Bool, [File], "the open asked O_CREAT",
        |c| file(c, |f| open_flag(f, O_CREAT));
    FileFlagTruncate => "file.flag_truncate", Bool, [File], "the open asked O_TRUNC",
        |c| file(c, |f| open_flag(f, O_TRUNC));
    FileFlagAppend => "file.flag_append", Bool, [File], "the open asked O_APPEND",
        |c| file(c, |f| open_flag(f, O_APPEND));
    FileFlagExclusive => "file.flag_exclusive", Bool, [File], "the open asked O_EXCL",
        |c| file(c, |f| open_flag(f, O_EXCL));

    BpfProgName => "bpf.prog_name", Str, [BpfLoad], "name of the loaded program",
        |c| match c.event.kind.as_ref() {
            Some(K::BpfLoad(b)) => s(&b.prog_name),
            _ => Value::Missing,
        };
    BpfProgType => "bpf.prog_type", Int, [BpfLoad], "BPF program type",
        |c| match c.event.kind.as_ref() {
            Some(K::BpfLoad(b)) => Value::Int(i64::from(b.prog_type)),
            _ => Value::Missing,
        };
    SignalName => "signal.name", Str, [Signal], "SIGTERM, SIGKILL...",
        |c| match c.event.kind.as_ref() {
            Some(K::Signal(sg)) => s(&sg.signal_name),
            _ => Value::Missing,
        };
    ModuleCall => "module.call", Str, [ModuleLoad], "init_module or finit_module",
        |c| match c.event.kind.as_ref() {
            Some(K::ModuleLoad(m)) => s(&m.call),
            _ => Value::Missing,
        };
}

impl Field {
    pub fn by_name(name: &str) -> Option<(Field, Kind, &'static [EventKind])> {
        FIELDS
            .iter()
            .find(|(n, ..)| *n == name)
            .map(|&(_, f, k, on, _)| (f, k, on))
    }
}

/// A field's value for one event.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Bool(bool),
    List(Vec<Cow<'a, str>>),
    /// The field does not apply to this event (or the process is unknown).
    Missing,
}

/// Everything a condition can look at for one event.
pub struct Ctx<'a> {
    pub event: &'a Event,
    pub table: &'a ProcessTable,
    pub proc: Option<&'a ProcessInfo>,
    pub users: &'a UserNames,
    pub agent_pid: u32,
    /// Values captured by earlier steps of a sequence (`$name`).
    pub vars: &'a [(String, String)],
    ancestors: OnceLock<Vec<&'a ProcessInfo>>,
    /// `proc.name` and `file.name`, asked by many rules of one event: found once.
    proc_name: std::cell::OnceCell<&'a str>,
    file_name: std::cell::OnceCell<&'a str>,
    /// Values of the rule set's macros for this event: 0 not yet asked, 1 false, 2 true.
    macros: [std::cell::Cell<u8>; MACRO_MEMO],
}

/// Macros of a rule set whose value an event's context remembers (the pack has 11).
pub const MACRO_MEMO: usize = 32;

impl<'a> Ctx<'a> {
    pub fn new(
        event: &'a Event,
        table: &'a ProcessTable,
        users: &'a UserNames,
        agent_pid: u32,
        vars: &'a [(String, String)],
    ) -> Self {
        Self {
            event,
            table,
            proc: table.get(event.pid),
            users,
            agent_pid,
            vars,
            ancestors: OnceLock::new(),
            proc_name: std::cell::OnceCell::new(),
            file_name: std::cell::OnceCell::new(),
            macros: [const { std::cell::Cell::new(0) }; MACRO_MEMO],
        }
    }

    /// The value of macro `slot` for this event, computed by `eval` the first time.
    pub fn memo(&self, slot: usize, eval: impl FnOnce() -> bool) -> bool {
        let cell = &self.macros[slot % MACRO_MEMO];
        match cell.get() {
            1 => false,
            2 => true,
            _ => {
                let value = eval();
                cell.set(1 + u8::from(value));
                value
            }
        }
    }

    /// The last component of the process's executable.
    fn proc_name(&self) -> Option<&'a str> {
        let p = self.proc?;
        Some(self.proc_name.get_or_init(|| basename(&p.exe)))
    }

    /// The last component of a file event's path.
    fn file_name(&self, path: &'a str) -> &'a str {
        self.file_name.get_or_init(|| basename(path))
    }

    pub fn ancestors(&self) -> &[&'a ProcessInfo] {
        self.ancestors.get_or_init(|| match self.proc {
            Some(p) => self.table.ancestry(p.pid),
            None => Vec::new(),
        })
    }

    fn parent(&self) -> Option<&'a ProcessInfo> {
        self.ancestors().first().copied()
    }

    pub fn var(&self, name: &str) -> Option<&'a str> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[inline(always)]
fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn fd_kind_name(kind: i32) -> &'static str {
    match FdKind::try_from(kind).unwrap_or(FdKind::Unspecified) {
        FdKind::None => "none",
        FdKind::File => "file",
        FdKind::Dir => "dir",
        FdKind::Pipe => "pipe",
        FdKind::Socket => "socket",
        FdKind::Tty => "tty",
        FdKind::Char => "char",
        FdKind::Other => "other",
        FdKind::Unspecified => "unknown",
    }
}

pub fn file_op_name(op: i32) -> &'static str {
    match FileOp::try_from(op).unwrap_or(FileOp::Unspecified) {
        FileOp::OpenWrite => "open_write",
        FileOp::Create => "create",
        FileOp::Truncate => "truncate",
        FileOp::CreateExec => "create_exec",
        FileOp::Rename => "rename",
        FileOp::Unlink => "unlink",
        FileOp::ChmodExec => "chmod_exec",
        FileOp::Utimes => "utimes",
        FileOp::Link => "link",
        FileOp::Unspecified => "unknown",
    }
}

/// A remote address that is neither loopback, private, link-local, nor unspecified.
pub fn is_public(addr: &str) -> bool {
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                // 100.64.0.0/10, carrier-grade NAT
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64))
        }
        Ok(IpAddr::V6(v6)) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(&v4.to_string());
            }
            let seg = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || (seg & 0xfe00) == 0xfc00 // unique local
                || (seg & 0xffc0) == 0xfe80) // link local
        }
        Err(_) => false,
    }
}

fn is_loopback(addr: &str) -> bool {
    addr.parse::<IpAddr>().is_ok_and(|a| match a {
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        IpAddr::V4(v4) => v4.is_loopback(),
    })
}

#[inline(always)]
fn s<'a>(v: &'a str) -> Value<'a> {
    Value::Str(Cow::Borrowed(v))
}

#[inline(always)]
fn proc_value<'a>(
    p: Option<&'a ProcessInfo>,
    get: impl FnOnce(&'a ProcessInfo) -> Value<'a>,
) -> Value<'a> {
    p.map_or(Value::Missing, get)
}

/// A value of an exec event; missing on other events.
#[inline(always)]
fn exec<'a>(c: &Ctx<'a>, get: impl FnOnce(&'a ExecEvent) -> Value<'a>) -> Value<'a> {
    match c.event.kind.as_ref() {
        Some(event::Kind::Exec(e)) => get(e),
        _ => Value::Missing,
    }
}

/// The kind of what the exec's descriptor `fd` (0-2) refers to.
#[inline(always)]
fn stdio(e: &ExecEvent, fd: usize) -> Value<'_> {
    s(e.stdio.get(fd).map_or("unknown", |f| fd_kind_name(f.kind)))
}

/// A value of the socket of a connect, accept, bind or listen.
#[inline(always)]
fn sock<'a>(c: &Ctx<'a>, get: impl FnOnce(&'a SocketInfo) -> Value<'a>) -> Value<'a> {
    use event::Kind as K;
    let sock = match c.event.kind.as_ref() {
        Some(K::Connect(e)) => e.socket.as_ref(),
        Some(K::Accept(e)) => e.socket.as_ref(),
        Some(K::Bind(e)) => e.socket.as_ref(),
        Some(K::Listen(e)) => e.socket.as_ref(),
        _ => None,
    };
    sock.map_or(Value::Missing, get)
}

/// A value of a dup event.
#[inline(always)]
fn dup<'a>(c: &Ctx<'a>, get: impl FnOnce(&'a DupEvent) -> Value<'a>) -> Value<'a> {
    match c.event.kind.as_ref() {
        Some(event::Kind::Dup(d)) => get(d),
        _ => Value::Missing,
    }
}

/// The socket a dup put on standard input, output or error, if it was one.
#[inline(always)]
fn dup_socket(d: &DupEvent) -> Option<&SocketInfo> {
    d.file.as_ref().and_then(|f| f.socket.as_ref())
}

/// A value about the process a ptrace, memory write or signal acted upon.
#[inline(always)]
fn target<'a>(c: &Ctx<'a>, get: impl FnOnce(u32) -> Value<'a>) -> Value<'a> {
    use event::Kind as K;
    match c.event.kind.as_ref() {
        Some(K::Ptrace(p)) => get(p.target_pid),
        Some(K::ProcessVmWrite(p)) => get(p.target_pid),
        Some(K::ProcMemWrite(p)) => get(p.target_pid),
        Some(K::Signal(p)) => get(p.target_pid),
        _ => Value::Missing,
    }
}

/// A value of a file event.
#[inline(always)]
fn file<'a>(c: &Ctx<'a>, get: impl FnOnce(&'a FileEvent) -> Value<'a>) -> Value<'a> {
    match c.event.kind.as_ref() {
        Some(event::Kind::File(f)) => get(f),
        _ => Value::Missing,
    }
}

/// Whether an open (or a truncating open) had flag `bit`; false for other operations.
#[inline(always)]
fn open_flag(f: &FileEvent, bit: u32) -> Value<'static> {
    let is_open = matches!(
        FileOp::try_from(f.op),
        Ok(FileOp::OpenWrite | FileOp::Create | FileOp::CreateExec)
    ) || (f.op == FileOp::Truncate as i32 && f.flags & O_TRUNC != 0);
    Value::Bool(is_open && f.flags & bit != 0)
}

/// A value of the executable identity of `p`; missing when the agent has none.
#[inline(always)]
fn exe_identity<'a>(
    p: Option<&'a ProcessInfo>,
    get: impl FnOnce(&'a sensor_proto::v1::ExeIdentity) -> Value<'a>,
) -> Value<'a> {
    p.and_then(|p| p.exe_identity.as_deref())
        .map_or(Value::Missing, get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_resolve() {
        let mut names: Vec<&str> = FIELDS.iter().map(|f| f.0).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "duplicate field names");
        for (name, field, kind, on, _) in FIELDS {
            assert_eq!(Field::by_name(name), Some((*field, *kind, *on)));
        }
    }

    #[test]
    fn a_macro_is_evaluated_once_per_event() {
        let table = ProcessTable::default();
        let users = UserNames::default();
        let event = Event::default();
        let evaluations = std::cell::Cell::new(0);
        let ask = |ctx: &Ctx<'_>, value: bool| {
            ctx.memo(3, || {
                evaluations.set(evaluations.get() + 1);
                value
            })
        };
        let ctx = Ctx::new(&event, &table, &users, 0, &[]);
        assert!(ask(&ctx, true));
        assert!(ask(&ctx, false), "the first value stands for the event");
        assert_eq!(evaluations.get(), 1);
        // The next event's context asks again.
        let ctx = Ctx::new(&event, &table, &users, 0, &[]);
        assert!(!ask(&ctx, false));
        assert!(!ask(&ctx, true));
        assert_eq!(evaluations.get(), 2);
    }

    #[test]
    fn every_field_is_documented() {
        let doc = include_str!("../../../docs/rules.md");
        for (name, ..) in FIELDS {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "docs/rules.md does not list {name}"
            );
        }
    }

    #[test]
    fn public_addresses() {
        for a in [
            "8.8.8.8",
            "193.24.123.42",
            "2001:4860::8888",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(a), "{a}");
        }
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "100.64.1.1",
            "",
            "junk",
        ] {
            assert!(!is_public(a), "{a}");
        }
    }
}
