//! Reading one job's stored events back from `BENCH_EVENTS`, in stream order, from any
//! sequence: the SSE replay, the `.ndjson` export and `events.ndjson` all come from here.
//! Each event is checked as ingestion checks it ([`crate::signing`]): a forged one (not signed
//! by the machine it names) is never handed out.

use crate::signing::{Keys, Verdict};
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use bench_schemas::subjects;
use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;

/// A replay in progress: yields stored events after `after`, up to what the stream held when it
/// was opened.
pub struct Replay {
    messages: Ordered,
    /// The last stream sequence to yield.
    pub until: u64,
    done: bool,
    keys: Arc<Keys>,
}

/// The job's last stored sequence, 0 when it has none.
pub async fn last_seq(stream: &Stream, job_id: &str) -> Result<u64, async_nats::Error> {
    match stream
        .get_last_raw_message_by_subject(&subjects::events(job_id))
        .await
    {
        Ok(m) => Ok(m.sequence),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Opens a replay of the job's events with stream sequence > `after`, leaving out those `keys`
/// refuse; None when there are none.
pub async fn open(
    stream: &Stream,
    keys: &Arc<Keys>,
    job_id: &str,
    after: u64,
) -> Result<Option<Replay>, async_nats::Error> {
    let until = last_seq(stream, job_id).await?;
    if until <= after {
        return Ok(None);
    }
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: subjects::events(job_id),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ..Default::default()
        })
        .await?;
    Ok(Some(Replay {
        messages: consumer.messages().await?,
        until,
        done: false,
        keys: keys.clone(),
    }))
}

/// How long a replay waits for a stored message before it concludes there is none.
const STALL: std::time::Duration = std::time::Duration::from_secs(10);

impl Replay {
    /// The next `(stream_seq, payload)`, or None at the end.
    pub async fn next(&mut self) -> Result<Option<(u64, Bytes)>, async_nats::Error> {
        while !self.done {
            // The events may be purged under us (a DELETE racing the job's end): then nothing
            // more arrives, and waiting for `until` would hang the caller.
            let next = tokio::time::timeout(STALL, self.messages.next()).await;
            let m = match next {
                Err(_) | Ok(None) => {
                    self.done = true;
                    return Ok(None);
                }
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(Some(Ok(m))) => m,
            };
            let info = m.info()?;
            let seq = info.stream_sequence;
            if seq >= self.until || info.pending == 0 {
                self.done = true;
            }
            if allowed(&self.keys, &m, &info).await {
                return Ok(Some((seq, m.payload.clone())));
            }
        }
        Ok(None)
    }
}

/// Whether the event passes the check ingestion made (not counted again: ingestion counted it;
/// what is not an event at all is left to the reader, as before).
async fn allowed(
    keys: &Keys,
    m: &async_nats::jetstream::Message,
    info: &async_nats::jetstream::message::Info<'_>,
) -> bool {
    #[derive(serde::Deserialize)]
    struct Names<'a> {
        #[serde(borrow)]
        machine_id: std::borrow::Cow<'a, str>,
    }
    let Ok(names) = serde_json::from_slice::<Names<'_>>(&m.payload) else {
        return true;
    };
    let stored_ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
    let verdict = keys
        .check(&names.machine_id, &m.payload, m.headers.as_ref(), stored_ms)
        .await;
    if let Verdict::Forged(why) = verdict {
        tracing::debug!(subject = %m.subject, stream_seq = info.stream_sequence, machine_id = %names.machine_id, why = why.as_str(), "forged event left out of a replay");
        return false;
    }
    true
}

/// Every stored event of the job, in stream order.
pub async fn read_all(
    stream: &Stream,
    keys: &Arc<Keys>,
    job_id: &str,
) -> Result<Vec<(u64, Bytes)>, async_nats::Error> {
    let mut out = Vec::new();
    if let Some(mut r) = open(stream, keys, job_id, 0).await? {
        while let Some(item) = r.next().await? {
            out.push(item);
        }
    }
    Ok(out)
}
