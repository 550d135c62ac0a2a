//! Reading one job's stored events back from `BENCH_EVENTS`, in stream order, from any
//! sequence: the SSE replay, the `.ndjson` export and `events.ndjson` all come from here.
//! Each event is checked as ingestion checks it ([`crate::signing`]): a forged one (not signed
//! by the machine it names) is never handed out. The events already received are checked
//! together (up to [`CHECK_BATCH`]: one batch verification, not one verification each).

use crate::signing::{Item, Keys, Verdict};
use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use bench_schemas::subjects;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use std::collections::VecDeque;
use std::sync::Arc;

/// Most stored events checked in one go: those already received when the first arrives.
pub const CHECK_BATCH: usize = 256;

/// A replay in progress: yields stored events after `after`, up to what the stream held when it
/// was opened.
pub struct Replay {
    messages: Ordered,
    /// The last stream sequence to yield.
    pub until: u64,
    done: bool,
    keys: Arc<Keys>,
    /// Checked, not yet handed out.
    ready: VecDeque<(u64, Bytes)>,
    /// An error that came after events still in `ready`.
    failed: Option<async_nats::Error>,
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
        ready: VecDeque::new(),
        failed: None,
    }))
}

/// How long a replay waits for a stored message before it concludes there is none.
const STALL: std::time::Duration = std::time::Duration::from_secs(10);

impl Replay {
    /// The next `(stream_seq, payload)`, or None at the end.
    pub async fn next(&mut self) -> Result<Option<(u64, Bytes)>, async_nats::Error> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Ok(Some(item));
            }
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            if self.done {
                return Ok(None);
            }
            self.receive().await?;
        }
    }

    /// Waits for the next stored message, takes those already received after it (up to
    /// [`CHECK_BATCH`]), checks them together and queues those allowed.
    async fn receive(&mut self) -> Result<(), async_nats::Error> {
        let mut got = Vec::new();
        while !self.done && got.len() < CHECK_BATCH {
            let next = if got.is_empty() {
                // The events may be purged under us (a DELETE racing the job's end): then
                // nothing more arrives, and waiting for `until` would hang the caller.
                tokio::time::timeout(STALL, self.messages.next())
                    .await
                    .unwrap_or_default()
            } else {
                match self.messages.next().now_or_never() {
                    // Not received yet: check what is here first.
                    None => break,
                    Some(next) => next,
                }
            };
            let m = match next {
                None => {
                    self.done = true;
                    break;
                }
                Some(Err(e)) if got.is_empty() => return Err(e.into()),
                Some(Err(e)) => {
                    self.failed = Some(e.into());
                    break;
                }
                Some(Ok(m)) => m,
            };
            let info = m.info()?;
            let (seq, stored_ms) = (
                info.stream_sequence,
                (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
            );
            if seq >= self.until || info.pending == 0 {
                self.done = true;
            }
            got.push((seq, stored_ms, m));
        }
        let allowed = allowed(&self.keys, &got).await;
        self.ready.extend(
            got.into_iter()
                .zip(allowed)
                .filter(|(_, ok)| *ok)
                .map(|((seq, _, m), _)| (seq, m.payload.clone())),
        );
        Ok(())
    }
}

/// Whether each event passes the check ingestion made (not counted again: ingestion counted
/// it; what is not an event at all is left to the reader, as before).
async fn allowed(keys: &Keys, got: &[(u64, u64, async_nats::jetstream::Message)]) -> Vec<bool> {
    #[derive(serde::Deserialize)]
    struct Names<'a> {
        #[serde(borrow)]
        machine_id: std::borrow::Cow<'a, str>,
    }
    let names: Vec<Option<Names<'_>>> = got
        .iter()
        .map(|(_, _, m)| serde_json::from_slice(&m.payload).ok())
        .collect();
    let items: Vec<Item<'_>> = got
        .iter()
        .zip(&names)
        .filter_map(|((_, stored_ms, m), names)| {
            Some(Item {
                machine: &names.as_ref()?.machine_id,
                payload: &m.payload,
                headers: m.headers.as_ref(),
                stored_ms: *stored_ms,
            })
        })
        .collect();
    let mut verdicts = keys.check_batch(&items).await.into_iter();
    got.iter()
        .zip(&names)
        .map(|((seq, _, m), names)| {
            let Some(names) = names else {
                return true;
            };
            let Some(Verdict::Forged(why)) = verdicts.next() else {
                return true;
            };
            tracing::debug!(subject = %m.subject, stream_seq = seq, machine_id = %names.machine_id, why = why.as_str(), "forged event left out of a replay");
            false
        })
        .collect()
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
