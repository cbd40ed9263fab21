//! The TCP connections a process holds, read from `/proc` when the web tier starts a shell
//! or an interpreter. An in-JVM reverse shell connects out and then pumps that socket into
//! a shell on pipes, however long it waits in between: the socket the parent still holds
//! links the two, where a time window would be guessed (THREATS.md B8).
//!
//! Only connections the process opened outwards count: an accepted one has a local port
//! some socket of the same network namespace listens on.

use std::path::Path;

use procfs::{
    net::{TcpNetEntry, TcpState},
    process::{FDTarget, Process},
};
use rustc_hash::FxHashSet;
use sensor_proto::v1::SocketInfo;

/// Descriptors looked at per process at most (a JVM may hold many thousands).
pub const MAX_FDS: usize = 65_536;

/// The established (or connecting) outbound TCP connections `pid` holds, the newest socket
/// first; empty when the process is gone or unreadable.
pub fn outbound(proc_root: &Path, pid: u32) -> Vec<SocketInfo> {
    let Ok(process) = Process::new_with_root(proc_root.join(pid.to_string())) else {
        return Vec::new();
    };
    let Ok(fds) = process.fd() else {
        return Vec::new();
    };
    let sockets: FxHashSet<u64> = fds
        .take(MAX_FDS)
        .filter_map(|fd| match fd.ok()?.target {
            FDTarget::Socket(inode) => Some(inode),
            _ => None,
        })
        .collect();
    if sockets.is_empty() {
        return Vec::new();
    }
    let v4 = process.tcp().unwrap_or_default();
    let v6 = process.tcp6().unwrap_or_default();
    select(
        &sockets,
        v4.iter()
            .map(|e| (e, "inet"))
            .chain(v6.iter().map(|e| (e, "inet6"))),
    )
}

/// The outbound connections among `entries` whose socket is one of `sockets`.
fn select<'a>(
    sockets: &FxHashSet<u64>,
    entries: impl Iterator<Item = (&'a TcpNetEntry, &'static str)> + Clone,
) -> Vec<SocketInfo> {
    let listening: FxHashSet<u16> = entries
        .clone()
        .filter(|(e, _)| e.state == TcpState::Listen)
        .map(|(e, _)| e.local_address.port())
        .collect();
    let mut out: Vec<(u64, SocketInfo)> = entries
        .filter(|(e, _)| {
            sockets.contains(&e.inode)
                && matches!(e.state, TcpState::Established | TcpState::SynSent)
                && !listening.contains(&e.local_address.port())
        })
        .map(|(e, family)| {
            (
                e.inode,
                SocketInfo {
                    family: family.to_owned(),
                    r#type: "stream".to_owned(),
                    local_addr: e.local_address.ip().to_canonical().to_string(),
                    local_port: u32::from(e.local_address.port()),
                    remote_addr: e.remote_address.ip().to_canonical().to_string(),
                    remote_port: u32::from(e.remote_address.port()),
                },
            )
        })
        .collect();
    // Socket inodes are handed out in increasing order: the highest is the newest.
    out.sort_by_key(|(inode, _)| std::cmp::Reverse(*inode));
    out.dedup_by_key(|(inode, _)| *inode);
    out.into_iter().map(|(_, s)| s).collect()
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn an_outbound_connection_is_found_and_an_accepted_one_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let out = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let found = outbound(Path::new("/proc"), std::process::id());
        let ours: Vec<_> = found
            .iter()
            .filter(|s| s.remote_port == u32::from(port) || s.local_port == u32::from(port))
            .collect();
        assert_eq!(ours.len(), 1, "{found:?}");
        assert_eq!(ours[0].remote_addr, "127.0.0.1");
        assert_eq!(
            ours[0].local_port,
            u32::from(out.local_addr().unwrap().port())
        );
        drop(out);
        assert!(outbound(Path::new("/proc"), u32::MAX).is_empty());
    }
}
