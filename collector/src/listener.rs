//! The accept loop, hardened: a peer that connects and says nothing, or floods the
//! collector with idle connections, cannot hold it down.
//!
//! - Bounds: connections in total ([`Limits::total`], under the descriptor limit) and per
//!   peer address ([`Limits::per_peer`]); past either, a connection is accepted and closed
//!   at once (so the kernel's backlog never fills) and logged, at most once a second.
//! - Deadlines: a connection must send its first [`FIRST_BYTES`] (a TLS ClientHello, or the
//!   HTTP/2 preface) within [`Limits::first_bytes`], and is closed after [`Limits::idle`]
//!   without a byte (agents heartbeat every few seconds and answer HTTP/2 pings).
//! - Out of descriptors (EMFILE, ENFILE): the loop waits with back-off and says so, instead
//!   of spinning on a listening socket that stays readable.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::Sleep,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{info, warn};

/// What a connection must send before it counts as started: the length of the HTTP/2
/// preface (a TLS ClientHello is longer).
pub const FIRST_BYTES: u64 = 24;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub total: usize,
    pub per_peer: usize,
    pub first_bytes: Duration,
    pub idle: Duration,
}

impl Limits {
    /// Defaults sized from the descriptor limit: room for the store, logs and some slack.
    pub fn for_descriptors(nofile: u64) -> Self {
        Self {
            total: (nofile.saturating_sub(64) as usize).clamp(16, 65_536),
            per_peer: 64,
            first_bytes: Duration::from_secs(10),
            idle: Duration::from_secs(90),
        }
    }
}

/// Raises the soft descriptor limit to the hard one (systemd's default soft limit, 1024,
/// is low for a collector of many agents); returns the limit in force.
pub fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                info!(
                    from = limit.rlim_cur,
                    to = limit.rlim_max,
                    "raised the descriptor limit"
                );
                return limit.rlim_max;
            }
        }
    }
    limit.rlim_cur
}

/// Connections per peer address, shared by the accept loop and the connections.
type PeerCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Accepts on `listener` under `limits`; the stream ends when the receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
) -> ReceiverStream<Result<Guarded, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, limits, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    limits: Limits,
    tx: mpsc::Sender<Result<Guarded, io::Error>>,
) {
    let slots = Arc::new(Semaphore::new(limits.total));
    let peers: PeerCounts = Arc::default();
    let mut backoff = Duration::from_millis(50);
    let mut last_refusal_log: Option<Instant> = None;
    let mut refused = 0u64;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = Duration::from_millis(50);
                accepted
            }
            Err(e) if is_out_of_descriptors(&e) => {
                warn!(error = %e, wait_ms = backoff.as_millis() as u64, "out of descriptors: not accepting for a moment");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(e) => {
                // A connection reset before it was accepted, and the like.
                warn!(error = %e, "accept failed");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                refused += 1;
                log_refusal(
                    &mut last_refusal_log,
                    refused,
                    peer,
                    "the collector has as many connections as it serves",
                );
                continue;
            }
        };
        let admitted = {
            let mut counts = peers.lock().unwrap_or_else(|p| p.into_inner());
            let n = counts.entry(peer.ip()).or_default();
            if *n >= limits.per_peer {
                false
            } else {
                *n += 1;
                true
            }
        };
        if !admitted {
            refused += 1;
            log_refusal(
                &mut last_refusal_log,
                refused,
                peer,
                "this peer has as many connections as one peer may have",
            );
            continue;
        }
        let guarded = Guarded {
            inner: stream,
            peer,
            accepted: Instant::now(),
            read: 0,
            limits,
            deadline: Box::pin(tokio::time::sleep(limits.first_bytes)),
            _slot: permit,
            peers: Arc::clone(&peers),
        };
        if tx.send(Ok(guarded)).await.is_err() {
            return;
        }
    }
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn log_refusal(last: &mut Option<Instant>, refused: u64, peer: SocketAddr, why: &str) {
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
        *last = Some(Instant::now());
        warn!(%peer, refused_so_far = refused, "connection refused: {why}");
    }
}

/// An accepted connection under the collector's deadlines; it gives back its slot and its
/// peer's count when dropped.
pub struct Guarded {
    inner: TcpStream,
    peer: SocketAddr,
    accepted: Instant,
    read: u64,
    limits: Limits,
    /// When the connection is closed unless it reads: the first-bytes deadline, then the
    /// idle one, pushed back by every read.
    deadline: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
    peers: PeerCounts,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let mut counts = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.peer.ip()) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.peer.ip());
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = (buf.filled().len() - before) as u64;
                self.read += n;
                if n > 0 && self.read >= FIRST_BYTES {
                    let next = tokio::time::Instant::now() + self.limits.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let why = if self.read < FIRST_BYTES {
                        format!(
                            "{} bytes in the first {} s",
                            self.read,
                            self.limits.first_bytes.as_secs()
                        )
                    } else {
                        format!("idle for {} s", self.limits.idle.as_secs())
                    };
                    info!(peer = %self.peer, open_s = self.accepted.elapsed().as_secs(), "closing a connection: {why}");
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

use std::future::Future;

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}
