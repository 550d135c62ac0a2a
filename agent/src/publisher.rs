//! Publishes events in order, exactly once into JetStream: each event carries
//! `Nats-Msg-Id: <job_id>.<machine_id>.<seq>`, and a publish whose ack is lost (server restart,
//! network blip) is retried with the same id, which the stream's duplicate window drops.

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::HeaderMap;
use bench_schemas::{subjects, Event};
use bytes::Bytes;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

/// Wall-clock Unix ms (for `ts_ms` and expiry; never for metrics).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Outgoing {
    subject: String,
    msg_id: String,
    payload: Bytes,
}

/// A handle that queues events for the publishing task. Cloning is cheap.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Outgoing>,
}

/// How long one event is retried before it is given up (and logged).
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

impl Publisher {
    /// Starts the publishing task.
    pub fn spawn(client: async_nats::Client) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(client, rx));
        (Self { tx }, task)
    }

    /// Queues an event.
    pub fn send(&self, event: &Event) {
        self.send_with_id(
            event,
            subjects::msg_id(&event.job_id, &event.machine_id, event.seq),
        );
    }

    /// Queues an event with an explicit message id (refusals, which are not part of a job's
    /// gapless sequence).
    pub fn send_with_id(&self, event: &Event, msg_id: String) {
        let payload = match serde_json::to_vec(event) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::error!(error = %e, "event not serialisable");
                return;
            }
        };
        let out = Outgoing {
            subject: subjects::events(&event.job_id),
            msg_id,
            payload,
        };
        if self.tx.send(out).is_err() {
            tracing::warn!(job_id = %event.job_id, "publisher stopped; event dropped");
        }
    }
}

async fn run(client: async_nats::Client, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut js = jetstream::new(client.clone());
    // A lost ack (server restart) is retried after this; the duplicate window drops repeats.
    js.set_timeout(Duration::from_secs(2));
    let mut warned = false;
    while let Some(out) = rx.recv().await {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", out.msg_id.as_str());
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            let res = match js
                .publish_with_headers(out.subject.clone(), headers.clone(), out.payload.clone())
                .await
            {
                Ok(ack) => ack.await.map(|_| ()),
                Err(e) => Err(e),
            };
            match res {
                Ok(()) => break,
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    // No stream (nobody created BENCH_EVENTS): live subscribers still get it.
                    if !warned {
                        tracing::warn!(
                            "no JetStream stream on {}; events are not stored",
                            subjects::EVENTS_ALL
                        );
                        warned = true;
                    }
                    if client
                        .publish_with_headers(
                            out.subject.clone(),
                            headers.clone(),
                            out.payload.clone(),
                        )
                        .await
                        .is_ok()
                    {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, msg_id = %out.msg_id, "event not acknowledged; retrying")
                }
            }
            if started.elapsed() > GIVE_UP_AFTER {
                tracing::error!(msg_id = %out.msg_id, "event dropped after {GIVE_UP_AFTER:?} of retries");
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
    let _ = client.flush().await;
}
