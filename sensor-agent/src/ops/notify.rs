//! The systemd notification protocol (`sd_notify`): `READY=1` once the probes are
//! attached, `WATCHDOG=1` from the event loop (a stalled loop stops pinging and systemd
//! restarts the service), `RELOADING=1`/`READY=1` around a reload, `STOPPING=1`.
//! Without `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

/// `WATCHDOG_USEC`, when it is meant for this process: as libsystemd's
/// `sd_watchdog_enabled`, an absent `WATCHDOG_PID` means this process (the sd-notify
/// crate's own check requires it).
fn watchdog_usec(usec: Option<&str>, pid: Option<&str>) -> Option<u64> {
    let usec: u64 = usec?.parse().ok().filter(|u| *u > 0)?;
    match pid {
        None => Some(usec),
        Some(pid) => (pid.parse::<u32>().ok()? == std::process::id()).then_some(usec),
    }
}

pub struct Notifier {
    /// How often to ping the watchdog: half of `WATCHDOG_USEC`, when systemd set one.
    pub watchdog: Option<Duration>,
    last_ping: Option<std::time::Instant>,
}

impl Notifier {
    pub fn from_env() -> Self {
        let watchdog = watchdog_usec(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
        )
        .map(|usec| Duration::from_micros(usec / 2).max(Duration::from_millis(100)));
        Self {
            watchdog,
            last_ping: None,
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(false, states) {
            warn!(error = %e, "cannot notify systemd");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        self.send(&[NotifyState::Reloading]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// From the event loop's housekeeping: pings when the watchdog is on and half its
    /// period has passed.
    pub fn alive(&mut self, status: &str) {
        let Some(every) = self.watchdog else {
            return;
        };
        let now = std::time::Instant::now();
        if self
            .last_ping
            .is_none_or(|t| now.duration_since(t) >= every)
        {
            self.last_ping = Some(now);
            self.send(&[NotifyState::Watchdog, NotifyState::Status(status)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_ours_unless_another_pid_is_named() {
        let me = std::process::id().to_string();
        assert_eq!(watchdog_usec(Some("2000000"), None), Some(2_000_000));
        assert_eq!(watchdog_usec(Some("2000000"), Some(&me)), Some(2_000_000));
        assert_eq!(watchdog_usec(Some("2000000"), Some("1")), None);
        assert_eq!(watchdog_usec(Some("0"), None), None);
        assert_eq!(watchdog_usec(Some("soon"), None), None);
        assert_eq!(watchdog_usec(None, None), None);
    }
}
