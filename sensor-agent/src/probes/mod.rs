//! The kernel side as seen from userspace: prerequisites, kernel layout, loading and
//! attaching the embedded probes, and the maps records and loss counters come through.

pub mod catalog;
pub mod enforce;
pub mod layout;
pub mod loader;
pub mod preflight;
pub mod syscalls;
pub mod watch;

pub use catalog::{Probe, SyscallHooks};
pub use loader::{LoadOptions, Probes};
