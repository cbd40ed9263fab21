//! The gRPC client that drains the spool into the collector.
//!
//! One long-lived bidirectional stream: `Hello`, then every durable pending record in
//! sequence order (at most [`WINDOW`] unacknowledged at a time), a `Heartbeat` every few
//! seconds; the collector answers with cumulative `Ack`s, which free the spool. On any
//! failure the client waits (exponential backoff with full jitter) and reconnects, then
//! resends from the last acknowledgement: delivery is at least once, and the collector
//! de-duplicates by (agent id, sequence number).

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use sensor_proto::{
    Timestamp,
    frames::{Frame, FrameCodec, STREAM_PATH},
    pem,
    v1::{AgentIdentity, Heartbeat, Hello, agent_message, collector_message},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    codegen::http::uri::PathAndQuery,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri},
};
use tracing::{debug, info, warn};

use super::spool::Spool;

/// Records sent and not yet acknowledged, at most.
const WINDOW: usize = 4096;
/// Records taken from the spool at a time.
const BATCH: usize = 256;
/// Largest message either side accepts (an alert with its evidence is a few KiB).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
const BACKOFF_START: Duration = Duration::from_millis(250);
/// Connecting, TLS and the stream's opening, at most.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// Records sent and no acknowledgement for this long: the stream is stuck; reconnect.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// While streaming to a fallback collector, how often the first one is tried again.
const PRIMARY_PROBE: Duration = Duration::from_secs(5);

/// Client certificate, key and the CA that signed the collector's certificate.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

/// One collector: where, and its URL for the log.
#[derive(Clone, Debug)]
pub struct Target {
    pub endpoint: Endpoint,
    pub url: String,
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The collectors in order of preference: the agent streams to the first that
    /// answers, fails over to the next on an error or silence, and returns to the first
    /// as soon as it answers again.
    pub targets: Vec<Target>,
    pub identity: AgentIdentity,
    pub heartbeat: Duration,
    pub backoff_max: Duration,
}

/// State shared by the pipeline (which fills the spool) and the client (which drains it).
pub struct Shared {
    spool: Mutex<Spool>,
    /// The spool's durable sequence number, for the client to wake on.
    durable: watch::Sender<u64>,
    /// The acknowledged sequence number, for shutdown to wait on.
    acked: watch::Sender<u64>,
    /// Records lost in the kernel since start, by kind, for heartbeats.
    kernel_lost: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    pub fn new(spool: Spool) -> Arc<Self> {
        let (durable, acked) = (spool.durable(), spool.acked());
        Arc::new(Self {
            spool: Mutex::new(spool),
            durable: watch::Sender::new(durable),
            acked: watch::Sender::new(acked),
            kernel_lost: Mutex::new(BTreeMap::new()),
        })
    }

    /// The spool; a panic elsewhere while holding it does not make it unusable (its
    /// state is on disk and each operation leaves it consistent).
    pub fn spool(&self) -> MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the client that more is durable.
    pub fn published(&self, durable: u64) {
        self.durable.send_if_modified(|d| {
            let moved = *d != durable;
            *d = durable;
            moved
        });
    }

    pub fn set_kernel_lost(&self, lost: BTreeMap<String, u64>) {
        *self.kernel_lost.lock().unwrap_or_else(|p| p.into_inner()) = lost;
    }

    /// Waits until everything assigned so far is acknowledged, or `timeout`.
    pub async fn wait_acked(&self, timeout: Duration) -> bool {
        let target = self.spool().last_seq();
        let mut rx = self.acked.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|a| *a >= target))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn heartbeat(&self) -> Heartbeat {
        let spool = self.spool();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Heartbeat {
            time: Some(Timestamp {
                seconds: now.as_secs() as i64,
                nanos: now.subsec_nanos() as i32,
            }),
            last_seq: spool.last_seq(),
            kernel_lost: self
                .kernel_lost
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .into_iter()
                .collect(),
            spool_shed_events: spool.stats.shed_events,
            spool_shed_alerts: spool.stats.shed_alerts,
            spool_pending: spool.pending() as u64,
        }
    }
}

/// Checks `--collector URL` and the TLS files: `http://` only to loopback, `https://`
/// only with a client certificate, its key and the collector's CA.
pub fn endpoint(url: &str, tls: &TlsFiles) -> Result<Endpoint, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("--collector {url:?}: not a URL: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("--collector {url:?}: the URL has no host"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("--collector {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    match uri.scheme_str() {
        Some("http") => {
            let loopback =
                bare == "localhost" || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(format!(
                    "--collector {url}: plaintext (http://) is allowed only to a loopback address; \
                     use https:// with --tls-cert, --tls-key and --tls-ca"
                ));
            }
            if tls.cert.is_some() || tls.key.is_some() || tls.ca.is_some() {
                return Err(format!(
                    "--collector {url}: TLS files were given for a plaintext URL; use https://"
                ));
            }
            Ok(endpoint)
        }
        Some("https") => {
            let need = |file: &Option<PathBuf>, flag: &str| {
                file.clone().ok_or_else(|| {
                    format!("--collector {url}: https:// needs {flag} (mutual TLS: --tls-cert, --tls-key, --tls-ca)")
                })
            };
            let (cert, key, ca) = (
                need(&tls.cert, "--tls-cert")?,
                need(&tls.key, "--tls-key")?,
                need(&tls.ca, "--tls-ca")?,
            );
            let config = ClientTlsConfig::new()
                .domain_name(bare)
                .ca_certificate(Certificate::from_pem(pem::certificates(&ca, "--tls-ca")?))
                .identity(Identity::from_pem(
                    pem::certificates(&cert, "--tls-cert")?,
                    pem::private_key(&key, "--tls-key")?,
                ));
            endpoint
                .tls_config(config)
                .map_err(|e| format!("--collector {url}: TLS configuration: {e}"))
        }
        other => Err(format!(
            "--collector {url:?}: scheme {:?} is not http:// (loopback) or https://",
            other.unwrap_or("")
        )),
    }
}

/// Exponential backoff with full jitter: a random wait in [base/2, base], base doubling
/// up to the cap, so a fleet does not reconnect in step after a collector restart.
struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = self.base;
        self.base = (self.base * 2).min(self.max);
        let half = base / 2;
        half + half.mul_f64(fastrand::f64())
    }

    fn reset(&mut self) {
        self.base = BACKOFF_START.min(self.max);
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {}", chain(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("the collector closed the stream")]
    Closed,
    #[error("{0} within the time allowed")]
    Stalled(&'static str),
    #[error("spool: {0}")]
    Spool(#[from] super::spool::SpoolError),
    /// Not a failure: the preferred collector answers again.
    #[error("the first collector answers again")]
    PrimaryBack,
}

/// An error with its causes: "transport error: tcp connect error: Connection refused".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Runs until the task is dropped.
pub async fn run(shared: Arc<Shared>, options: ClientOptions) {
    let mut backoff = Backoff {
        base: BACKOFF_START,
        max: options.backoff_max.max(BACKOFF_START),
    };
    let mut failures = 0u64;
    // The collector streamed to (an index into `options.targets`).
    let mut current = 0usize;
    loop {
        let started = Instant::now();
        let mut acked_any = false;
        let result = session(&shared, &options, current, &mut acked_any).await;
        if acked_any || started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
            failures = 0;
        }
        let url = &options.targets[current].url;
        if let Err(SessionError::PrimaryBack) = result {
            info!(from = %url, to = %options.targets[0].url, "returning to the first collector");
            current = 0;
            continue;
        }
        failures += 1;
        let wait = backoff.next();
        let pending = shared.spool().pending();
        if let Err(e) = result {
            // Every failure while alerts wait is worth a line; the wait bounds the rate.
            warn!(collector = %url, error = %e, pending, retry_in_ms = wait.as_millis() as u64, attempt = failures, "collector unreachable; records stay in the spool");
        }
        if options.targets.len() > 1 {
            current = (current + 1) % options.targets.len();
            info!(to = %options.targets[current].url, "failing over to the next collector");
        }
        tokio::time::sleep(wait).await;
    }
}

/// Tries the first collector every `PRIMARY_PROBE` until it answers (a connection: TCP,
/// TLS and HTTP/2 handshakes), then says so on `back`.
async fn watch_primary(target: Target, back: watch::Sender<bool>) {
    loop {
        tokio::time::sleep(PRIMARY_PROBE).await;
        if let Ok(Ok(_)) = tokio::time::timeout(OPEN_TIMEOUT, target.endpoint.connect()).await {
            back.send_replace(true);
            return;
        }
    }
}

async fn session(
    shared: &Shared,
    options: &ClientOptions,
    current: usize,
    acked_any: &mut bool,
) -> Result<(), SessionError> {
    let target = &options.targets[current];
    let (mut next, last_seq, first_seq) = {
        let spool = shared.spool();
        (spool.acked() + 1, spool.last_seq(), spool.first_seq())
    };
    let (tx, rx) = mpsc::channel::<Frame>(BATCH);
    let hello = Frame::message(agent_message::Msg::Hello(Hello {
        identity: Some(options.identity.clone()),
        last_seq,
        first_seq,
    }));
    tx.send(hello).await.map_err(|_| SessionError::Closed)?;
    // A peer that accepts TCP and then says nothing (or a connection to ourselves) must
    // not hold the client: the whole opening is bounded.
    let opening = async {
        let channel: Channel = target.endpoint.connect().await?;
        let mut grpc = tonic::client::Grpc::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let response = grpc
            .streaming(
                tonic::Request::new(ReceiverStream::new(rx)),
                PathAndQuery::from_static(STREAM_PATH),
                FrameCodec,
            )
            .await?;
        Ok::<_, SessionError>(response)
    };
    let response = tokio::time::timeout(OPEN_TIMEOUT, opening)
        .await
        .map_err(|_| SessionError::Stalled("no answer to the stream's opening"))??;
    let mut inbound = response.into_inner();
    info!(collector = %target.url, resend_from = next, "connected to the collector");
    // On a fallback collector: watch for the first one, ended with the session.
    let (back_tx, mut back) = watch::channel(false);
    let mut watching = current > 0;
    let _primary = (current > 0).then(|| {
        AbortOnDrop(tokio::spawn(watch_primary(
            options.targets[0].clone(),
            back_tx,
        )))
    });
    let mut durable_rx = shared.durable.subscribe();
    let mut heartbeat = tokio::time::interval(options.heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_progress = Instant::now();
    // Sequence numbers sent and not yet acknowledged, oldest first. The window counts
    // records, not numbers: numbers are sparse where the spool shed.
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    loop {
        // Fill the window with what is durable.
        loop {
            let batch = {
                let mut spool = shared.spool();
                if let Some(rewind) = spool.take_rewind() {
                    next = next.min(rewind);
                }
                while in_flight.front().is_some_and(|s| *s <= spool.acked()) {
                    in_flight.pop_front();
                }
                if in_flight.len() >= WINDOW {
                    break;
                }
                next = next.max(spool.acked() + 1);
                spool.from_seq(next, BATCH.min(WINDOW - in_flight.len()))
            };
            let Some(&(last, _)) = batch.last() else {
                break;
            };
            for (seq, bytes) in &batch {
                tx.send(Frame::envelope(bytes))
                    .await
                    .map_err(|_| SessionError::Closed)?;
                in_flight.push_back(*seq);
            }
            next = last + 1;
        }
        tokio::select! {
            message = inbound.message() => {
                let Some(message) = message? else {
                    return Err(SessionError::Closed);
                };
                if let Some(collector_message::Msg::Ack(ack)) = message.msg {
                    let acked = {
                        let mut spool = shared.spool();
                        spool.ack(ack.seq)?;
                        spool.acked()
                    };
                    debug!(acked, "collector acknowledged");
                    shared.acked.send_replace(acked);
                    *acked_any = true;
                    last_progress = Instant::now();
                }
            }
            changed = durable_rx.changed() => {
                if changed.is_err() {
                    return Err(SessionError::Closed);
                }
            }
            changed = back.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                } else if *back.borrow() {
                    return Err(SessionError::PrimaryBack);
                }
            }
            _ = heartbeat.tick() => {
                let acked = shared.spool().acked();
                let waiting = in_flight.iter().any(|s| *s > acked);
                if !waiting {
                    last_progress = Instant::now();
                } else if last_progress.elapsed() > ACK_TIMEOUT {
                    return Err(SessionError::Stalled("no acknowledgement of the records sent"));
                }
                let beat = Frame::message(agent_message::Msg::Heartbeat(shared.heartbeat()));
                tx.send(beat).await.map_err(|_| SessionError::Closed)?;
            }
        }
    }
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(cert: bool, key: bool, ca: bool) -> TlsFiles {
        let p = |b: bool| b.then(|| PathBuf::from("/nonexistent/x.pem"));
        TlsFiles {
            cert: p(cert),
            key: p(key),
            ca: p(ca),
        }
    }

    #[test]
    fn plaintext_is_only_for_loopback() {
        for ok in [
            "http://127.0.0.1:4000",
            "http://127.1.2.3:4000",
            "http://[::1]:4000",
            "http://localhost:4000",
        ] {
            assert!(endpoint(ok, &TlsFiles::default()).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:4000",
            "http://collector.example:4000",
            "http://[2001:db8::1]:4000",
        ] {
            let err = endpoint(bad, &TlsFiles::default()).unwrap_err();
            assert!(err.contains("only to a loopback address"), "{bad}: {err}");
        }
        let err = endpoint("http://127.0.0.1:4000", &files(true, true, true)).unwrap_err();
        assert!(err.contains("use https://"), "{err}");
    }

    #[test]
    fn https_needs_every_tls_file_and_says_which_is_missing() {
        let err =
            endpoint("https://collector.example:4000", &files(true, false, true)).unwrap_err();
        assert!(err.contains("--tls-key"), "{err}");
        let err = endpoint("https://collector.example:4000", &files(true, true, true)).unwrap_err();
        assert!(err.contains("/nonexistent/x.pem"), "{err}");
        for bad in ["ftp://x:1", "not a url", "https://"] {
            assert!(endpoint(bad, &TlsFiles::default()).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let mut b = Backoff {
            base: BACKOFF_START,
            max: Duration::from_secs(8),
        };
        let waits: Vec<Duration> = (0..12).map(|_| b.next()).collect();
        assert!(waits[0] >= BACKOFF_START / 2 && waits[0] <= BACKOFF_START);
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(8)));
        assert!(waits[11] >= Duration::from_secs(4), "{waits:?}");
        b.reset();
        assert!(b.next() <= BACKOFF_START);
    }
}
