//! The fields a rule condition can test, and how each is read from an event, its process,
//! the parent, the ancestors, the lineage label, or a sequence capture.
//!
//! A field is resolved by name once, when a rule is compiled; evaluation is a `match`
//! over `Field` with values borrowed from the event and the process table.

use std::{borrow::Cow, net::IpAddr, sync::OnceLock};

use sensor_proto::{
    EventKind,
    v1::{Event, FdKind, FileOp, event},
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

macro_rules! fields {
    ($( $variant:ident => $name:literal, $kind:ident, [$($on:ident),*], $doc:literal; )*) => {
        /// A field a condition can test.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Field {
            $( #[doc = $doc] $variant, )*
        }

        /// (name, field, kind, event kinds it is set on (empty: all), description).
        pub const FIELDS: &[(&str, Field, Kind, &[EventKind], &str)] = &[
            $( ($name, Field::$variant, Kind::$kind, &[$(EventKind::$on),*], $doc), )*
        ];
    };
}

fields! {
    EventKind => "event.kind", Str, [], "exec, connect, file... (the `on:` names)";
    EventPid => "event.pid", Int, [], "pid of the process that acted";
    EventUid => "event.uid", Int, [], "real uid of the acting task";
    EventComm => "event.comm", Str, [], "kernel task name of the acting task";

    ProcPid => "proc.pid", Int, [], "the process";
    ProcPpid => "proc.ppid", Int, [], "its parent's pid";
    ProcExe => "proc.exe", Str, [], "executable path as the kernel resolved it";
    ProcName => "proc.name", Str, [], "last component of proc.exe";
    ProcArgv => "proc.argv", StrList, [], "each argument (any matches)";
    ProcArgv0 => "proc.argv0", Str, [], "argv[0]";
    ProcArgs => "proc.args", Str, [], "arguments after argv[0], joined by spaces";
    ProcCmdline => "proc.cmdline", Str, [], "argv joined by spaces";
    ProcArgc => "proc.argc", Int, [], "number of arguments";
    ProcUid => "proc.uid", Int, [], "real uid";
    ProcEuid => "proc.euid", Int, [], "effective uid";
    ProcUser => "proc.user", Str, [], "user name of proc.uid";
    ProcCwd => "proc.cwd", Str, [], "working directory";
    ProcComm => "proc.comm", Str, [], "kernel task name";
    ProcExeMemfd => "proc.exe_memfd", Bool, [], "the executable is a memfd";
    ProcExeDeleted => "proc.exe_deleted", Bool, [], "the executable has no name on disk";
    ProcExeSha256 => "proc.exe_sha256", Str, [], "SHA-256 of the executable's content (hex)";
    ProcExePackage => "proc.exe_package", Str, [], "package that installed the executable's path, \"\" if none";
    ProcExeShell => "proc.exe_shell", Bool, [], "the executable's content is an installed shell, whatever its name or place";
    ProcExeInterpreter => "proc.exe_interpreter", Bool, [], "the executable's content is an installed script interpreter (python, perl...)";
    ProcExeChanged => "proc.exe_changed_since_boot", Bool, [], "the executable was written or changed (ctime) after boot";
    ProcExeWriter => "proc.exe_writer", Str, [], "executable of the process that last wrote the executable's path, as the probes saw it (\"\" if unseen)";
    ProcExeWriterIdentity => "proc.exe_writer_identity", Str, [], "web-tier identity of that writer, \"\" if none or unseen";
    ProcScriptPackage => "proc.script_package", Str, [], "for a script run by a shell or interpreter, the package that installed the script";

    ParentPid => "parent.pid", Int, [], "the parent process";
    ParentExe => "parent.exe", Str, [], "parent's executable";
    ParentName => "parent.name", Str, [], "last component of parent.exe";
    ParentCmdline => "parent.cmdline", Str, [], "parent's argv joined by spaces";
    ParentArgv => "parent.argv", StrList, [], "parent's arguments (any matches)";
    ParentUid => "parent.uid", Int, [], "parent's real uid";
    ParentComm => "parent.comm", Str, [], "parent's task name";
    ParentThread => "parent.thread", Str, [Exec], "name of the parent thread that forked (a JVM pool)";
    ParentExeShell => "parent.exe_shell", Bool, [], "the parent's executable is an installed shell's content";

    AncestorExe => "ancestor.exe", StrList, [], "executables of all ancestors (any matches)";
    AncestorName => "ancestor.name", StrList, [], "names of all ancestors (any matches)";
    AncestorCmdline => "ancestor.cmdline", StrList, [], "command lines of all ancestors";
    AncestorExePackage => "ancestor.exe_package", StrList, [], "packages that installed the ancestors' executables";
    AncestorScriptPackage => "ancestor.script_package", StrList, [], "packages that installed the scripts the ancestors ran";

    LineageIdentity => "lineage.identity", Str, [], "web-tier identity the process descends from, \"\" if none";
    LineageTainted => "lineage.tainted", Bool, [], "the process descends from (or is) a web-tier identity";
    LineageIsSource => "lineage.is_source", Bool, [], "the process itself has the identity";
    LineageDepth => "lineage.depth", Int, [], "generations below the identity's process";
    LineageSourceExe => "lineage.source_exe", Str, [], "executable of the identity's process";
    LineageSourceImage => "lineage.source_image", Bool, [], "the process runs its source's very executable (a worker fork, or the source itself)";

    ExecFilename => "exec.filename", Str, [Exec], "filename passed to execve";
    ExecStdin => "exec.stdin", Str, [Exec], "what fd 0 is: none, file, dir, pipe, socket, tty, char, other";
    ExecStdout => "exec.stdout", Str, [Exec], "what fd 1 is";
    ExecStderr => "exec.stderr", Str, [Exec], "what fd 2 is";
    ExecStdioSocket => "exec.stdio_socket", Bool, [Exec], "any of fds 0-2 is a socket";
    ExecStdioRemoteAddr => "exec.stdio_remote_addr", StrList, [Exec], "remote addresses of socket fds 0-2";
    ExecParentConnected => "exec.parent_connected", Bool, [Exec], "a shell or interpreter whose web-tier parent held a TCP connection out when it started";
    ExecParentRemoteAddr => "exec.parent_remote_addr", Str, [Exec], "remote address of that parent's newest outbound connection";
    ExecParentRemotePort => "exec.parent_remote_port", Int, [Exec], "remote port of that parent's newest outbound connection";
    ExecTty => "exec.tty", Bool, [Exec], "any of fds 0-2 is a terminal";
    ExecExecveat => "exec.execveat", Bool, [Exec], "started with execveat (fexecve)";
    ExecArgvTruncated => "exec.argv_truncated", Bool, [Exec], "argv was longer than 4 KiB";

    ExecFailedFilename => "exec_failed.filename", Str, [ExecFailed], "the filename that failed";
    ExecFailedError => "exec_failed.error", Str, [ExecFailed], "errno name";

    NetFamily => "net.family", Str, [Connect, Accept, Bind, Listen, Socket], "inet, inet6, unix...";
    NetType => "net.type", Str, [Connect, Accept, Bind, Listen, Socket], "stream, dgram...";
    NetLocalAddr => "net.local_addr", Str, [Connect, Accept, Bind, Listen], "local address";
    NetLocalPort => "net.local_port", Int, [Connect, Accept, Bind, Listen], "local port";
    NetRemoteAddr => "net.remote_addr", Str, [Connect, Accept], "remote address";
    NetRemotePort => "net.remote_port", Int, [Connect, Accept], "remote port";
    NetRemotePublic => "net.remote_public", Bool, [Connect, Accept], "remote address is neither loopback, private, link-local nor unspecified";
    NetRemoteLoopback => "net.remote_loopback", Bool, [Connect, Accept], "remote address is loopback";
    NetUnixPath => "net.unix_path", Str, [Connect, Bind], "unix socket path (@name when abstract)";
    NetResult => "net.result", Int, [Connect, Bind, Listen, Socket], "syscall result";
    NetError => "net.error", Str, [Connect, Bind, Listen, Socket], "errno name of a failure";
    NetInProgress => "net.in_progress", Bool, [Connect], "non-blocking connect in progress";
    NetBacklog => "net.backlog", Int, [Listen], "listen backlog";

    DupCall => "dup.call", Str, [Dup], "dup, dup2, dup3, fcntl";
    DupNewfd => "dup.newfd", Int, [Dup], "descriptor obtained";
    DupFdKind => "dup.fd_kind", Str, [Dup], "what was duplicated: socket, pipe, file...";
    DupRemoteAddr => "dup.remote_addr", Str, [Dup], "remote address when a socket was duplicated";
    DupRemotePort => "dup.remote_port", Int, [Dup], "remote port when a socket was duplicated";

    MemfdName => "memfd.name", Str, [MemfdCreate], "memfd name";

    PtraceRequest => "ptrace.request", Str, [Ptrace], "PTRACE_ATTACH, PTRACE_POKETEXT...";
    TargetPid => "target.pid", Int, [Ptrace, ProcessVmWrite, ProcMemWrite, Signal], "process acted upon";
    TargetExe => "target.exe", Str, [Ptrace, ProcessVmWrite, ProcMemWrite, Signal], "its executable";
    TargetName => "target.name", Str, [Ptrace, ProcessVmWrite, ProcMemWrite, Signal], "its name";
    TargetIsAgent => "target.is_agent", Bool, [Ptrace, ProcessVmWrite, ProcMemWrite, Signal], "the target is this agent";
    TargetIsSelf => "target.is_self", Bool, [Ptrace, ProcessVmWrite, ProcMemWrite], "the process acts on itself";
    Result => "result", Int, [], "syscall result of the event (0 when it has none)";

    FileOp => "file.op", Str, [File], "open_write, create, truncate, create_exec, rename, unlink, chmod_exec, utimes, link";
    FilePath => "file.path", Str, [File], "absolute path";
    FileName => "file.name", Str, [File], "last component of file.path";
    FileDir => "file.dir", Str, [File], "file.path without its last component";
    FileExt => "file.ext", Str, [File], "extension of file.name, without the dot";
    FileOtherPath => "file.other_path", Str, [File], "the other name of a rename";
    FileIsSource => "file.is_source", Bool, [File], "file.path is where a rename came from";
    FileMode => "file.mode", Int, [File], "mode given to open or chmod";
    FileFlags => "file.flags", Int, [File], "open flags";
    FileGivenPath => "file.given_path", Str, [File], "the path as the process gave it, when a link, '..' or another mount made it differ from file.path";
    FileResolved => "file.resolved", Bool, [File], "file.path was walked up from the file the kernel opened";
    FileCreated => "file.created", Bool, [File], "the open created the file (known when file.resolved)";
    FileExisted => "file.existed", Bool, [File], "the file was there before the open (known when file.resolved)";
    FileFlagCreate => "file.flag_create", Bool, [File], "the open asked O_CREAT";
    FileFlagTruncate => "file.flag_truncate", Bool, [File], "the open asked O_TRUNC";
    FileFlagAppend => "file.flag_append", Bool, [File], "the open asked O_APPEND";
    FileFlagExclusive => "file.flag_exclusive", Bool, [File], "the open asked O_EXCL";

    BpfProgName => "bpf.prog_name", Str, [BpfLoad], "name of the loaded program";
    BpfProgType => "bpf.prog_type", Int, [BpfLoad], "BPF program type";
    SignalName => "signal.name", Str, [Signal], "SIGTERM, SIGKILL...";
    ModuleCall => "module.call", Str, [ModuleLoad], "init_module or finit_module";
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
}

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

fn s<'a>(v: &'a str) -> Value<'a> {
    Value::Str(Cow::Borrowed(v))
}

fn proc_value<'a>(
    p: Option<&'a ProcessInfo>,
    get: impl FnOnce(&'a ProcessInfo) -> Value<'a>,
) -> Value<'a> {
    p.map_or(Value::Missing, get)
}

/// A value of the executable identity of `p`; missing when the agent has none.
fn exe_identity<'a>(
    p: Option<&'a ProcessInfo>,
    get: impl FnOnce(&'a sensor_proto::v1::ExeIdentity) -> Value<'a>,
) -> Value<'a> {
    p.and_then(|p| p.exe_identity.as_deref())
        .map_or(Value::Missing, get)
}

impl Field {
    /// This field's value for `ctx`.
    pub fn get<'a>(self, ctx: &Ctx<'a>) -> Value<'a> {
        use event::Kind as K;
        let ev = ctx.event;
        let kind = ev.kind.as_ref();
        match self {
            Field::EventKind => s(EventKind::of(ev).map_or("none", EventKind::name)),
            Field::EventPid => Value::Int(i64::from(ev.pid)),
            Field::EventUid => Value::Int(i64::from(ev.uid)),
            Field::EventComm => s(&ev.comm),

            Field::ProcPid => Value::Int(i64::from(ev.pid)),
            Field::ProcPpid => proc_value(ctx.proc, |p| Value::Int(i64::from(p.ppid))),
            Field::ProcExe => proc_value(ctx.proc, |p| s(&p.exe)),
            Field::ProcName => ctx.proc_name().map_or(Value::Missing, s),
            Field::ProcArgv => proc_value(ctx.proc, |p| {
                Value::List(p.argv.iter().map(|a| Cow::Borrowed(a.as_str())).collect())
            }),
            Field::ProcArgv0 => {
                proc_value(ctx.proc, |p| s(p.argv.first().map_or("", String::as_str)))
            }
            Field::ProcArgs => proc_value(ctx.proc, |p| {
                let first = p.argv.first().map_or(0, |a| a.len());
                s(p.cmdline.get(first..).map_or("", str::trim_start))
            }),
            Field::ProcCmdline => proc_value(ctx.proc, |p| s(&p.cmdline)),
            Field::ProcArgc => proc_value(ctx.proc, |p| Value::Int(p.argv.len() as i64)),
            Field::ProcUid => proc_value(ctx.proc, |p| Value::Int(i64::from(p.uid))),
            Field::ProcEuid => proc_value(ctx.proc, |p| Value::Int(i64::from(p.euid))),
            Field::ProcUser => {
                proc_value(ctx.proc, |p| Value::Str(Cow::Owned(ctx.users.name(p.uid))))
            }
            Field::ProcCwd => proc_value(ctx.proc, |p| s(&p.cwd)),
            Field::ProcComm => proc_value(ctx.proc, |p| s(&p.comm)),
            Field::ProcExeMemfd => proc_value(ctx.proc, |p| Value::Bool(p.exe_memfd)),
            Field::ProcExeDeleted => proc_value(ctx.proc, |p| Value::Bool(p.exe_deleted)),
            Field::ProcExeSha256 => exe_identity(ctx.proc, |i| s(&i.sha256)),
            Field::ProcExePackage => exe_identity(ctx.proc, |i| s(&i.package)),
            Field::ProcExeShell => exe_identity(ctx.proc, |i| Value::Bool(i.shell)),
            Field::ProcExeInterpreter => exe_identity(ctx.proc, |i| Value::Bool(i.interpreter)),
            Field::ProcExeChanged => exe_identity(ctx.proc, |i| Value::Bool(i.changed_since_boot)),
            Field::ProcExeWriter => match ctx.proc {
                Some(p) => s(ctx.table.writer_of(&p.exe).map_or("", |w| &w.exe)),
                None => Value::Missing,
            },
            Field::ProcExeWriterIdentity => match ctx.proc {
                Some(p) => s(ctx
                    .table
                    .writer_of(&p.exe)
                    .and_then(|w| w.identity.as_deref())
                    .unwrap_or("")),
                None => Value::Missing,
            },
            Field::ProcScriptPackage => exe_identity(ctx.proc, |i| s(&i.script_package)),

            Field::ParentPid => proc_value(ctx.parent(), |p| Value::Int(i64::from(p.pid))),
            Field::ParentExe => proc_value(ctx.parent(), |p| s(&p.exe)),
            Field::ParentName => proc_value(ctx.parent(), |p| s(basename(&p.exe))),
            Field::ParentCmdline => proc_value(ctx.parent(), |p| s(&p.cmdline)),
            Field::ParentArgv => proc_value(ctx.parent(), |p| {
                Value::List(p.argv.iter().map(|a| Cow::Borrowed(a.as_str())).collect())
            }),
            Field::ParentUid => proc_value(ctx.parent(), |p| Value::Int(i64::from(p.uid))),
            Field::ParentComm => proc_value(ctx.parent(), |p| s(&p.comm)),
            Field::ParentExeShell => exe_identity(ctx.parent(), |i| Value::Bool(i.shell)),
            Field::ParentThread => match kind {
                Some(K::Exec(e)) => s(&e.parent_thread_comm),
                _ => Value::Missing,
            },

            Field::AncestorExe => Value::List(
                ctx.ancestors()
                    .iter()
                    .map(|p| Cow::Borrowed(&*p.exe))
                    .collect(),
            ),
            Field::AncestorName => Value::List(
                ctx.ancestors()
                    .iter()
                    .map(|p| Cow::Borrowed(basename(&p.exe)))
                    .collect(),
            ),
            Field::AncestorExePackage => Value::List(
                ctx.ancestors()
                    .iter()
                    .filter_map(|p| p.exe_identity.as_deref())
                    .map(|i| Cow::Borrowed(i.package.as_str()))
                    .collect(),
            ),
            Field::AncestorScriptPackage => Value::List(
                ctx.ancestors()
                    .iter()
                    .filter_map(|p| p.exe_identity.as_deref())
                    .map(|i| Cow::Borrowed(i.script_package.as_str()))
                    .collect(),
            ),
            Field::AncestorCmdline => Value::List(
                ctx.ancestors()
                    .iter()
                    .map(|p| Cow::Borrowed(&*p.cmdline))
                    .collect(),
            ),

            Field::LineageIdentity => s(ctx
                .proc
                .and_then(|p| p.lineage.as_deref())
                .map_or("", |l| &l.identity)),
            Field::LineageTainted => Value::Bool(ctx.proc.is_some_and(|p| p.lineage.is_some())),
            // The source is the image that took the identity: a source that execs
            // something else is no longer one, so `exec` in a helper cannot hide a payload.
            Field::LineageIsSource => Value::Bool(ctx.proc.is_some_and(|p| {
                p.lineage.as_ref().is_some_and(|l| {
                    l.source_pid == p.pid && l.source_exe == p.exe && l.source_argv == p.argv
                })
            })),
            Field::LineageSourceImage => Value::Bool(
                ctx.proc
                    .is_some_and(|p| p.lineage.as_ref().is_some_and(|l| l.source_exe == p.exe)),
            ),
            Field::LineageDepth => {
                match ctx.proc.and_then(|p| p.lineage.as_ref().map(|l| (p, l))) {
                    Some((p, l)) => ctx
                        .table
                        .depth_to(p.pid, l.source_pid)
                        .map_or(Value::Missing, |d| Value::Int(i64::from(d))),
                    None => Value::Missing,
                }
            }
            Field::LineageSourceExe => match ctx.proc.and_then(|p| p.lineage.as_deref()) {
                Some(l) => s(&l.source_exe),
                None => Value::Missing,
            },

            Field::ExecFilename => match kind {
                Some(K::Exec(e)) => s(&e.filename),
                _ => Value::Missing,
            },
            Field::ExecStdin | Field::ExecStdout | Field::ExecStderr => match kind {
                Some(K::Exec(e)) => {
                    let fd = match self {
                        Field::ExecStdin => 0,
                        Field::ExecStdout => 1,
                        _ => 2,
                    };
                    s(e.stdio.get(fd).map_or("unknown", |f| fd_kind_name(f.kind)))
                }
                _ => Value::Missing,
            },
            Field::ExecStdioSocket => match kind {
                Some(K::Exec(e)) => {
                    Value::Bool(e.stdio.iter().any(|f| f.kind == FdKind::Socket as i32))
                }
                _ => Value::Missing,
            },
            Field::ExecStdioRemoteAddr => match kind {
                Some(K::Exec(e)) => Value::List(
                    e.stdio
                        .iter()
                        .filter_map(|f| f.socket.as_ref())
                        .filter(|s| !s.remote_addr.is_empty())
                        .map(|s| Cow::Borrowed(s.remote_addr.as_str()))
                        .collect(),
                ),
                _ => Value::Missing,
            },
            Field::ExecParentConnected => match kind {
                Some(K::Exec(e)) => Value::Bool(!e.parent_connections.is_empty()),
                _ => Value::Missing,
            },
            Field::ExecParentRemoteAddr => match kind {
                Some(K::Exec(e)) => e
                    .parent_connections
                    .first()
                    .map_or(Value::Missing, |c| s(&c.remote_addr)),
                _ => Value::Missing,
            },
            Field::ExecParentRemotePort => match kind {
                Some(K::Exec(e)) => e
                    .parent_connections
                    .first()
                    .map_or(Value::Missing, |c| Value::Int(i64::from(c.remote_port))),
                _ => Value::Missing,
            },
            Field::ExecTty => match kind {
                Some(K::Exec(e)) => {
                    Value::Bool(e.stdio.iter().any(|f| f.kind == FdKind::Tty as i32))
                }
                _ => Value::Missing,
            },
            Field::ExecExecveat => match kind {
                Some(K::Exec(e)) => Value::Bool(e.execveat),
                _ => Value::Missing,
            },
            Field::ExecArgvTruncated => match kind {
                Some(K::Exec(e)) => Value::Bool(e.argv_truncated),
                _ => Value::Missing,
            },

            Field::ExecFailedFilename => match kind {
                Some(K::ExecFailed(e)) => s(&e.filename),
                _ => Value::Missing,
            },
            Field::ExecFailedError => match kind {
                Some(K::ExecFailed(e)) => s(&e.error),
                _ => Value::Missing,
            },

            Field::NetFamily
            | Field::NetType
            | Field::NetLocalAddr
            | Field::NetLocalPort
            | Field::NetRemoteAddr
            | Field::NetRemotePort
            | Field::NetRemotePublic
            | Field::NetRemoteLoopback => {
                let sock = match kind {
                    Some(K::Connect(e)) => e.socket.as_ref(),
                    Some(K::Accept(e)) => e.socket.as_ref(),
                    Some(K::Bind(e)) => e.socket.as_ref(),
                    Some(K::Listen(e)) => e.socket.as_ref(),
                    Some(K::Socket(e)) => {
                        return match self {
                            Field::NetFamily => s(&e.family),
                            Field::NetType => s(&e.r#type),
                            _ => Value::Missing,
                        };
                    }
                    _ => None,
                };
                let Some(sock) = sock else {
                    return Value::Missing;
                };
                match self {
                    Field::NetFamily => s(&sock.family),
                    Field::NetType => s(&sock.r#type),
                    Field::NetLocalAddr => s(&sock.local_addr),
                    Field::NetLocalPort => Value::Int(i64::from(sock.local_port)),
                    Field::NetRemoteAddr => s(&sock.remote_addr),
                    Field::NetRemotePort => Value::Int(i64::from(sock.remote_port)),
                    Field::NetRemotePublic => Value::Bool(is_public(&sock.remote_addr)),
                    _ => Value::Bool(is_loopback(&sock.remote_addr)),
                }
            }
            Field::NetUnixPath => match kind {
                Some(K::Connect(e)) => s(&e.unix_path),
                Some(K::Bind(e)) => s(&e.unix_path),
                _ => Value::Missing,
            },
            Field::NetResult => match kind {
                Some(K::Connect(e)) => Value::Int(i64::from(e.result)),
                Some(K::Bind(e)) => Value::Int(i64::from(e.result)),
                Some(K::Listen(e)) => Value::Int(i64::from(e.result)),
                Some(K::Socket(e)) => Value::Int(i64::from(e.fd)),
                _ => Value::Missing,
            },
            Field::NetError => match kind {
                Some(K::Connect(e)) => s(&e.error),
                Some(K::Bind(e)) => s(&e.error),
                Some(K::Listen(e)) => s(&e.error),
                Some(K::Socket(e)) => s(&e.error),
                _ => Value::Missing,
            },
            Field::NetInProgress => match kind {
                Some(K::Connect(e)) => Value::Bool(e.in_progress),
                _ => Value::Missing,
            },
            Field::NetBacklog => match kind {
                Some(K::Listen(e)) => Value::Int(i64::from(e.backlog)),
                _ => Value::Missing,
            },

            Field::DupCall
            | Field::DupNewfd
            | Field::DupFdKind
            | Field::DupRemoteAddr
            | Field::DupRemotePort => {
                let Some(K::Dup(d)) = kind else {
                    return Value::Missing;
                };
                match self {
                    Field::DupCall => s(&d.call),
                    Field::DupNewfd => Value::Int(i64::from(d.result)),
                    Field::DupFdKind => {
                        s(d.file.as_ref().map_or("unknown", |f| fd_kind_name(f.kind)))
                    }
                    Field::DupRemoteAddr => s(d
                        .file
                        .as_ref()
                        .and_then(|f| f.socket.as_ref())
                        .map_or("", |s| s.remote_addr.as_str())),
                    _ => Value::Int(i64::from(
                        d.file
                            .as_ref()
                            .and_then(|f| f.socket.as_ref())
                            .map_or(0, |s| s.remote_port),
                    )),
                }
            }

            Field::MemfdName => match kind {
                Some(K::MemfdCreate(m)) => s(&m.name),
                _ => Value::Missing,
            },
            Field::PtraceRequest => match kind {
                Some(K::Ptrace(p)) => s(&p.request),
                _ => Value::Missing,
            },
            Field::TargetPid
            | Field::TargetExe
            | Field::TargetName
            | Field::TargetIsAgent
            | Field::TargetIsSelf => {
                let target = match kind {
                    Some(K::Ptrace(p)) => p.target_pid,
                    Some(K::ProcessVmWrite(p)) => p.target_pid,
                    Some(K::ProcMemWrite(p)) => p.target_pid,
                    Some(K::Signal(p)) => p.target_pid,
                    _ => return Value::Missing,
                };
                match self {
                    Field::TargetPid => Value::Int(i64::from(target)),
                    Field::TargetIsAgent => {
                        Value::Bool(ctx.agent_pid != 0 && target == ctx.agent_pid)
                    }
                    Field::TargetIsSelf => Value::Bool(target == ev.pid),
                    Field::TargetExe => proc_value(ctx.table.get(target), |p| s(&p.exe)),
                    _ => proc_value(ctx.table.get(target), |p| s(basename(&p.exe))),
                }
            }
            Field::Result => Value::Int(match kind {
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
            }),

            Field::FileOp
            | Field::FilePath
            | Field::FileName
            | Field::FileDir
            | Field::FileExt
            | Field::FileOtherPath
            | Field::FileIsSource
            | Field::FileMode
            | Field::FileFlags
            | Field::FileGivenPath
            | Field::FileResolved
            | Field::FileCreated
            | Field::FileExisted
            | Field::FileFlagCreate
            | Field::FileFlagTruncate
            | Field::FileFlagAppend
            | Field::FileFlagExclusive => {
                let Some(K::File(f)) = kind else {
                    return Value::Missing;
                };
                let is_open = matches!(
                    FileOp::try_from(f.op),
                    Ok(FileOp::OpenWrite | FileOp::Create | FileOp::CreateExec)
                ) || (f.op == FileOp::Truncate as i32 && f.flags & O_TRUNC != 0);
                let flag = |bit: u32| Value::Bool(is_open && f.flags & bit != 0);
                match self {
                    Field::FileOp => s(file_op_name(f.op)),
                    Field::FilePath => s(&f.path),
                    Field::FileName => s(ctx.file_name(&f.path)),
                    Field::FileDir => s(f.path.rsplit_once('/').map_or("", |(d, _)| d)),
                    Field::FileExt => s(basename(&f.path).rsplit_once('.').map_or("", |(_, e)| e)),
                    Field::FileOtherPath => s(&f.other_path),
                    Field::FileIsSource => Value::Bool(f.path_is_source),
                    Field::FileMode => Value::Int(i64::from(f.mode)),
                    Field::FileGivenPath => s(&f.given_path),
                    Field::FileResolved => Value::Bool(f.resolved),
                    Field::FileCreated => Value::Bool(f.created),
                    Field::FileExisted => Value::Bool(f.existed),
                    Field::FileFlagCreate => flag(O_CREAT),
                    Field::FileFlagTruncate => flag(O_TRUNC),
                    Field::FileFlagAppend => flag(O_APPEND),
                    Field::FileFlagExclusive => flag(O_EXCL),
                    _ => Value::Int(i64::from(f.flags)),
                }
            }

            Field::BpfProgName => match kind {
                Some(K::BpfLoad(b)) => s(&b.prog_name),
                _ => Value::Missing,
            },
            Field::BpfProgType => match kind {
                Some(K::BpfLoad(b)) => Value::Int(i64::from(b.prog_type)),
                _ => Value::Missing,
            },
            Field::SignalName => match kind {
                Some(K::Signal(sg)) => s(&sg.signal_name),
                _ => Value::Missing,
            },
            Field::ModuleCall => match kind {
                Some(K::ModuleLoad(m)) => s(&m.call),
                _ => Value::Missing,
            },
        }
    }
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
