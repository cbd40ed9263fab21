//! The systemd notification protocol (`sd_notify`): `READY=1` once the probes are
//! attached, `WATCHDOG=1` from the event loop (a stalled loop stops pinging and systemd
//! restarts the service), `RELOADING=1`/`READY=1` around a reload, `STOPPING=1`.
//! Without `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

pub struct Notifier {
    /// How often to ping the watchdog: half of `WATCHDOG_USEC`, when systemd set one.
    pub watchdog: Option<Duration>,
    last_ping: Option<std::time::Instant>,
}

impl Notifier {
    pub fn from_env() -> Self {
        let mut usec = 0;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(100)));
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
