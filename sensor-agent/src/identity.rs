//! Who this agent is: a stable agent id and the host name, stamped on every alert.

use std::path::Path;

pub use crate::detect::alert::AgentIdentity;

/// The machine id (`/etc/machine-id`), stable across reboots and reinstalls of the agent.
fn machine_id(path: &Path) -> Option<String> {
    let id = std::fs::read_to_string(path).ok()?;
    let id = id.trim();
    (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

/// The identity of this host's agent: `agent_id` overrides the machine-derived id.
pub fn detect(agent_id: Option<String>) -> AgentIdentity {
    let host = host_name();
    let agent_id = agent_id
        .or_else(|| {
            machine_id(Path::new("/etc/machine-id"))
                .map(|m| format!("agent-{}", &m[..16.min(m.len())]))
        })
        .unwrap_or_else(|| format!("agent-{host}"));
    AgentIdentity { agent_id, host }
}
