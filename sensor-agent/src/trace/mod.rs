//! Traces: recording decoded events, the flight recorder, and the file format replay
//! reads. docs/traces.md describes the format.

pub mod flight;
pub mod recorder;
pub use sensor_trace as format;
pub mod snapshot;

use sensor_proto::v1::TraceHeader;

use crate::{
    decode::BootClock,
    detect::{alert::AgentIdentity, users::UserNames},
    proctable::ProcessTable,
};

/// `uname -r` of this host.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The header of a trace starting now from `table`.
pub fn header(
    reason: &str,
    identity: &AgentIdentity,
    table: &ProcessTable,
    users: &UserNames,
    clock: &BootClock,
    agent_pid: u32,
    now_boot_ns: u64,
) -> TraceHeader {
    TraceHeader {
        format_version: u32::from(format::FORMAT_VERSION),
        host: identity.host.clone(),
        agent_id: identity.agent_id.clone(),
        kernel: kernel_release(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        start_time: Some(clock.wall(now_boot_ns)),
        boot_epoch_ns: clock
            .boot_epoch_ns
            .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
        agent_pid,
        reason: reason.to_owned(),
        processes: snapshot::to_entries(table, users, clock),
        users: users.pairs().map(|(u, n)| (u, n.to_owned())).collect(),
    }
}
