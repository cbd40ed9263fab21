//! Delivery to the central collector: the durable spool, the gRPC client that drains it,
//! and the appliance facts the agent identifies itself with.
//!
//! The pipeline writes every alert (and, with `--send-events`, every event) into the
//! spool through [`Delivery`], a [`Sink`]; the client task sends what is durable and frees
//! what the collector acknowledges.

pub mod appliance;
pub mod client;
pub mod spool;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use sensor_proto::v1::{Alert, Event, Output, output};
use tracing::{error, info, warn};

use crate::output::Sink;
pub use client::{ClientOptions, Shared, TlsFiles};
pub use spool::{Spool, SpoolOptions};

/// `--collector` and what goes with it.
#[derive(Clone, Debug)]
pub struct DeliveryOptions {
    /// Collector URLs in order of preference (at least one).
    pub urls: Vec<String>,
    pub tls: TlsFiles,
    pub spool: SpoolOptions,
    /// Stream every event too, not only alerts.
    pub send_events: bool,
    pub heartbeat: Duration,
    pub backoff_max: Duration,
}

impl DeliveryOptions {
    pub fn new(urls: Vec<String>, spool_dir: PathBuf) -> Self {
        let defaults = crate::config::CollectorSection::default();
        Self {
            urls,
            tls: TlsFiles::default(),
            spool: SpoolOptions::new(spool_dir),
            send_events: defaults.send_events,
            heartbeat: Duration::from_secs(defaults.heartbeat_seconds),
            backoff_max: Duration::from_secs(defaults.retry_max_seconds),
        }
    }
}

/// The pipeline's side of delivery.
pub struct Delivery {
    shared: Arc<Shared>,
    send_events: bool,
    errors: u64,
}

/// Why delivery could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The collector URL or the TLS files (the message names which and why).
    #[error("{0}")]
    Collector(String),
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
}

impl Delivery {
    /// Opens the spool and starts the client task (on the current tokio runtime).
    pub fn start(
        options: &DeliveryOptions,
        identity: sensor_proto::v1::AgentIdentity,
    ) -> Result<Self, StartError> {
        let targets = options
            .urls
            .iter()
            .map(|url| {
                client::endpoint(url, &options.tls).map(|endpoint| client::Target {
                    endpoint,
                    url: url.clone(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartError::Collector)?;
        if targets.is_empty() {
            return Err(StartError::Collector("no collector URL".into()));
        }
        let spool = Spool::open(options.spool.clone())?;
        info!(
            collectors = %options.urls.join(", "),
            spool = %options.spool.dir.display(),
            pending = spool.pending(),
            acked = spool.acked(),
            last_seq = spool.last_seq(),
            "delivering to the collector"
        );
        let shared = Shared::new(spool);
        tokio::spawn(client::run(
            Arc::clone(&shared),
            ClientOptions {
                targets,
                identity,
                heartbeat: options.heartbeat,
                backoff_max: options.backoff_max,
            },
        ));
        Ok(Self {
            shared,
            send_events: options.send_events,
            errors: 0,
        })
    }

    fn push(&mut self, item: output::Item) {
        let result = self.shared.spool().push(Output { item: Some(item) });
        if let Err(e) = result {
            self.errors += 1;
            if self.errors <= 10 || self.errors.is_power_of_two() {
                error!(error = %e, count = self.errors, "cannot spool a record for the collector");
            }
        }
    }

    /// Syncs the spool and hands what is durable to the client.
    fn sync(&mut self) {
        let mut spool = self.shared.spool();
        if let Err(e) = spool.sync() {
            self.errors += 1;
            error!(error = %e, "cannot sync the spool; records wait in memory");
            return;
        }
        let durable = spool.durable();
        drop(spool);
        self.shared.published(durable);
    }

    /// Once a second: sync streamed events, refresh the loss counters for heartbeats.
    pub fn tick(&mut self, kernel_lost: BTreeMap<String, u64>) {
        self.shared.set_kernel_lost(kernel_lost);
        self.sync();
    }

    /// Pending records and bytes, events and alerts shed since start.
    pub fn spool_counts(&self) -> (u64, u64, u64, u64) {
        let spool = self.shared.spool();
        (
            spool.pending() as u64,
            spool.pending_bytes(),
            spool.stats.shed_events,
            spool.stats.shed_alerts,
        )
    }

    /// At shutdown: everything on disk, then a short wait for the collector to
    /// acknowledge it (what it does not acknowledge is resent by the next run).
    pub async fn close(&mut self, wait: Duration) {
        self.sync();
        let pending = self.shared.spool().pending();
        if pending == 0 {
            return;
        }
        if !self.shared.wait_acked(wait).await {
            let pending = self.shared.spool().pending();
            warn!(
                pending,
                "stopping with records not yet acknowledged; they stay in the spool for the next run"
            );
        }
    }
}

impl Sink for Delivery {
    fn event(&mut self, event: &Event) {
        if self.send_events {
            self.push(output::Item::Event(event.clone()));
        }
    }

    fn alert(&mut self, alert: &Alert) {
        self.push(output::Item::Alert(alert.clone()));
    }

    fn wants_events(&self) -> bool {
        self.send_events
    }

    /// After each batch of kernel records: an alert in the batch is synced now (one
    /// `fdatasync` for the batch) and sent; events alone wait for the next tick.
    fn flush(&mut self) {
        let waiting = self.shared.spool().alert_unsynced();
        if waiting {
            self.sync();
        }
    }
}
