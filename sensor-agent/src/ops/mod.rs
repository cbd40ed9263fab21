//! Running as a service: systemd readiness and watchdog, the Prometheus endpoint, live
//! reload of the rules, and the alerts the agent raises about its own health.

pub mod health;
pub mod metrics;
pub mod notify;
pub mod reload;
