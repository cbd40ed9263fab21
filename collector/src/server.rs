//! The `sensor.v1.Collector` service: one task per agent stream.
//!
//! A stream must open with `Hello`; then envelopes are stored in batches (whatever has
//! arrived when the store is free) and acknowledged cumulatively once on disk. A stream
//! that breaks the protocol, sends garbage or an oversized message, or falls silent is
//! closed with a status that says why; other agents' streams are not affected.

use std::{pin::Pin, time::Duration};

use futures_util::StreamExt;
use sensor_proto::v1::{
    Ack, AgentIdentity, AgentMessage, CollectorMessage, Envelope, agent_message, collector_message,
    collector_server,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::store::{Request as StoreRequest, Writer};

/// Largest message accepted from an agent.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Envelopes stored per transaction, at most, per stream.
const BATCH: usize = 1024;

pub struct Collector {
    pub writer: Writer,
    /// A stream with no message for this long is closed (agents heartbeat every few
    /// seconds).
    pub silence: Duration,
    /// Turns true when the collector stops: streams end after their current commit.
    pub stop: tokio::sync::watch::Receiver<bool>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// What a stream ends with when the collector stops: agents reconnect later.
fn stopping() -> Status {
    Status::unavailable("the collector is stopping; reconnect later")
}

fn check_identity(identity: Option<AgentIdentity>) -> Result<AgentIdentity, Status> {
    let identity =
        identity.ok_or_else(|| Status::invalid_argument("Hello carries no agent identity"))?;
    let id = &identity.agent_id;
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
    {
        return Err(Status::invalid_argument(format!(
            "agent id {id:?}: 1 to 128 characters of [A-Za-z0-9-_.:@]"
        )));
    }
    Ok(identity)
}

/// Under mutual TLS an agent may only speak for itself: its agent id must be one of the DNS
/// names (subjectAltName) of the client certificate it connected with, so that a
/// compromised appliance holding a valid certificate cannot store alerts, acknowledge
/// numbers or report heartbeats in another agent's name. Plaintext (loopback only) binds
/// nothing. The chain itself was verified during the handshake.
fn check_certificate_binding(
    agent_id: &str,
    certs: Option<&[rustls_pki_types::CertificateDer<'static>]>,
) -> Result<(), Status> {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Ok(());
    };
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| {
        Status::permission_denied(format!("the client certificate cannot be read: {e}"))
    })?;
    let name = rustls_pki_types::ServerName::try_from(agent_id).map_err(|_| {
        Status::permission_denied(format!(
            "agent id {agent_id:?} is not a DNS name; under mutual TLS the agent id must be one of its certificate's DNS names"
        ))
    })?;
    cert.verify_is_valid_for_subject_name(&name).map_err(|_| {
        Status::permission_denied(format!(
            "agent id {agent_id:?} is not a DNS name of the client certificate; under mutual TLS an agent may only stream as the name its certificate was issued for"
        ))
    })
}

async fn ask(
    writer: &Writer,
    make: impl FnOnce(oneshot::Sender<Result<u64, String>>) -> StoreRequest,
) -> Result<u64, Status> {
    let (reply, answer) = oneshot::channel();
    writer
        .request(make(reply))
        .await
        .map_err(Status::unavailable)?;
    answer
        .await
        .map_err(|_| Status::unavailable("the store has stopped"))?
        .map_err(Status::unavailable)
}

type AckStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<CollectorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl collector_server::Collector for Collector {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<AckStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let certs = request.peer_certs();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.silence, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello in time"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(agent_message::Msg::Hello(hello)) => hello,
            _ => {
                warn!(%peer, "stream refused: the first message was not Hello");
                return Err(Status::invalid_argument("the first message must be Hello"));
            }
        };
        let identity = check_identity(hello.identity)
            .and_then(|identity| {
                check_certificate_binding(&identity.agent_id, certs.as_deref().map(Vec::as_slice))?;
                Ok(identity)
            })
            .inspect_err(|e| {
                warn!(%peer, error = %e.message(), "stream refused");
            })?;
        let agent_id = identity.agent_id.clone();
        let contiguous = ask(&self.writer, |reply| StoreRequest::Hello {
            identity: identity.clone(),
            first_seq: hello.first_seq,
            last_seq: hello.last_seq,
            peer: peer.clone(),
            reply,
        })
        .await?;
        info!(agent = %agent_id, host = %identity.host, %peer, last_seq = hello.last_seq, stored_up_to = contiguous, "agent connected");
        let (tx, rx) = mpsc::channel(16);
        // The agent learns at once where to resend from.
        let _ = tx.send(Ok(ack(contiguous))).await;
        let writer = self.writer.clone();
        let silence = self.silence;
        let mut stop = self.stop.clone();
        let open = crate::metrics::StreamGuard::new(&self.metrics);
        tokio::spawn(async move {
            let _open = open;
            let result = serve(&writer, &agent_id, &mut inbound, &tx, silence, &mut stop).await;
            match result {
                Ok(()) => info!(agent = %agent_id, %peer, "agent disconnected"),
                Err(status) => {
                    warn!(agent = %agent_id, %peer, code = ?status.code(), error = %status.message(), "agent stream closed");
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn ack(seq: u64) -> CollectorMessage {
    CollectorMessage {
        msg: Some(collector_message::Msg::Ack(Ack { seq })),
    }
}

async fn serve(
    writer: &Writer,
    agent_id: &str,
    inbound: &mut Streaming<AgentMessage>,
    tx: &mpsc::Sender<Result<CollectorMessage, Status>>,
    silence: Duration,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), Status> {
    let mut last_acked = 0u64;
    loop {
        if *stop.borrow() {
            return Err(stopping());
        }
        let next = tokio::select! {
            next = tokio::time::timeout(silence, inbound.message()) => next,
            _ = stop.wait_for(|s| *s) => return Err(stopping()),
        };
        let first = match next {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "agent silent for {} s",
                    silence.as_secs()
                )));
            }
            Ok(message) => message?,
        };
        let Some(first) = first else {
            return Ok(());
        };
        // Everything that has already arrived goes into one transaction.
        let mut messages = vec![first];
        while messages.len() < BATCH {
            match futures_util::FutureExt::now_or_never(inbound.next()) {
                Some(Some(message)) => messages.push(message?),
                Some(None) | None => break,
            }
        }
        let mut envelopes: Vec<Envelope> = Vec::new();
        for message in messages {
            match message.msg {
                Some(agent_message::Msg::Envelope(env)) => {
                    if env.seq == 0 || env.body.is_none() {
                        return Err(Status::invalid_argument(format!(
                            "envelope {} has no sequence number or no body",
                            env.seq
                        )));
                    }
                    envelopes.push(env);
                }
                Some(agent_message::Msg::Heartbeat(heartbeat)) => {
                    writer
                        .request(StoreRequest::Heartbeat {
                            agent_id: agent_id.to_owned(),
                            heartbeat,
                        })
                        .await
                        .map_err(Status::unavailable)?;
                }
                Some(agent_message::Msg::Hello(_)) => {
                    return Err(Status::invalid_argument("a second Hello on one stream"));
                }
                None => return Err(Status::invalid_argument("an empty message")),
            }
        }
        if envelopes.is_empty() {
            continue;
        }
        let contiguous = ask(writer, |reply| StoreRequest::Records {
            agent_id: agent_id.to_owned(),
            envelopes,
            reply,
        })
        .await?;
        if contiguous != last_acked {
            last_acked = contiguous;
            if tx.send(Ok(ack(contiguous))).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn cert_for(names: &[&str]) -> rustls_pki_types::CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn an_agent_streams_only_as_a_name_of_its_certificate() {
        let certs = [cert_for(&["agent-a", "epmm-1.example.org"])];
        assert!(check_certificate_binding("agent-a", Some(&certs)).is_ok());
        assert!(check_certificate_binding("epmm-1.example.org", Some(&certs)).is_ok());
        let other = check_certificate_binding("agent-b", Some(&certs)).unwrap_err();
        assert_eq!(other.code(), tonic::Code::PermissionDenied);
        assert!(
            other
                .message()
                .contains("\"agent-b\" is not a DNS name of the client certificate")
        );
        let odd = check_certificate_binding("agent@a", Some(&certs)).unwrap_err();
        assert!(
            odd.message().contains("is not a DNS name;"),
            "{}",
            odd.message()
        );
        // Plaintext (loopback only): nothing to bind to.
        assert!(check_certificate_binding("anything", None).is_ok());
    }
}
