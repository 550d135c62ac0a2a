//! Stream ingestion: the durable `BENCH_EVENTS` consumer, applied to the [`Index`] in batches
//! of what is already waiting, fanned out live on the [`Hub`] as it is applied.
//!
//! Persistence is decoupled from the event rate: token batches only change memory. Touched
//! records are written to KV (and the consumer acknowledged up to the last applied message,
//! `AckPolicy::All`) right after a batch that changed a status (accepted, started, a repeat or
//! the job finished), else at most every [`FLUSH_EVERY`] or [`ACK_EVERY`] messages. A crash
//! in between redelivers from the ack floor, and [`crate::record::JobRecord::apply`] skips
//! what the stored records already hold. So per token the cost is one parse, one in-memory
//! apply and one shared frame, whatever the job's size.

use crate::hub::{sse_frame, Hub, HubMsg, JobFrame};
use crate::index::{Change, Index, Ingested};
use crate::jobs_kv::{persist_retrying, JobsKv};
use crate::metrics::Metrics;
use crate::record::Applied;
use crate::results::Results;
use async_nats::jetstream;
use bench_schemas::{Event, EventKind};
use futures::{FutureExt, StreamExt};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Most messages applied in one go.
pub const BATCH_MAX: usize = 1024;
/// Most bytes pulled in one batch.
pub const BATCH_MAX_BYTES: usize = 8 << 20;
/// Longest time applied events wait to be persisted and acknowledged.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Most messages applied before a flush (well under the consumer's `max_ack_pending`).
pub const ACK_EVERY: usize = 20_000;

/// What ingestion needs from central.
#[derive(Clone, Copy)]
pub struct Ingest<'a> {
    /// The index.
    pub index: &'a Index,
    /// Where records are persisted.
    pub kv: &'a JobsKv,
    /// Live listeners.
    pub hub: &'a Hub,
    /// Counters.
    pub metrics: &'a Metrics,
    /// Results writer queue.
    pub results: &'a Results,
    /// The machines' signing keys: an event must be signed by the machine it names.
    pub keys: &'a crate::signing::Keys,
    /// Stops everything.
    pub shutdown: &'a CancellationToken,
    /// A follower's mirror: a job it has not seen is looked up in KV before its first event is
    /// applied (the leader wrote it at dispatch), so it is not taken for an external job.
    pub load_unknown: bool,
}

/// Tells listeners about a change of a job and, when it finished, queues its results.
pub fn announce(hub: &Hub, results: &Results, job_id: &str, change: &Change) {
    if let Some(item) = &change.item {
        if let Ok(json) = serde_json::to_string(item) {
            hub.send(HubMsg::Job { item: json.into() });
        }
    }
    if let Some(last_seq) = change.finished_at {
        let status = change.item.as_ref().map(|i| i.status);
        if let Some(status) = status {
            hub.send_job(job_id, JobFrame::End { status, last_seq });
        }
        results.request(job_id);
    }
}

/// Whether a kind changes what the KV record must say promptly.
fn is_status(kind: &EventKind) -> bool {
    !matches!(kind, EventKind::LlmToken(_) | EventKind::Telemetry(_))
}

impl Ingest<'_> {
    /// Applies a batch to memory and the hub; returns whether it changed a status.
    pub(crate) async fn apply(
        &self,
        batch: &[jetstream::Message],
        touched: &mut HashSet<String>,
    ) -> bool {
        let mut urgent = false;
        let now = crate::now_ms();
        // Parsed and checked for well-formed ids first, then every signature of the batch
        // verified in one pass (see crate::signing), then applied in order.
        let mut events = Vec::with_capacity(batch.len());
        for msg in batch {
            let Ok(info) = msg.info() else {
                self.metrics.events_invalid.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let stream_seq = info.stream_sequence;
            let published_ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            self.metrics
                .caught_up
                .store(info.pending == 0, Ordering::Relaxed);
            self.metrics
                .last_stream_seq
                .fetch_max(stream_seq, Ordering::Relaxed);
            let event: Event = match serde_json::from_slice(&msg.payload) {
                Ok(e) => e,
                Err(e) => {
                    self.metrics.events_invalid.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(subject = %msg.subject, stream_seq, error = %e, "not an event; skipped");
                    continue;
                }
            };
            // The ids become KV keys and file names: an event must be about the job its subject
            // names, with valid ids, or it is counted and skipped (and acked with the batch).
            let well_formed = bench_schemas::validate_job_id(&event.job_id).is_ok()
                && bench_schemas::validate_machine_id(&event.machine_id).is_ok()
                && bench_schemas::subjects::is_events_of(&msg.subject, &event.job_id);
            if !well_formed {
                self.metrics.events_invalid.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(subject = %msg.subject, stream_seq, job_id = %event.job_id, machine_id = %event.machine_id, "event with invalid ids or a job_id its subject does not name; skipped");
                continue;
            }
            events.push((msg, event, stream_seq, published_ms));
        }
        // Any agent may publish on bench.events.*: only a key the named machine announced in
        // its own registry entry vouches for an event (see crate::signing).
        let verdicts = {
            let items: Vec<_> = events
                .iter()
                .map(|(msg, event, _, published_ms)| crate::signing::Item {
                    machine: &event.machine_id,
                    payload: &msg.payload,
                    headers: msg.headers.as_ref(),
                    stored_ms: *published_ms,
                })
                .collect();
            self.keys.check_batch(&items).await
        };
        for ((msg, event, stream_seq, published_ms), verdict) in events.into_iter().zip(verdicts) {
            match verdict {
                crate::signing::Verdict::Signed => {}
                crate::signing::Verdict::Unsigned => {
                    self.metrics.events_unsigned.fetch_add(1, Ordering::Relaxed);
                }
                crate::signing::Verdict::Forged(why) => {
                    self.metrics.events_forged.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(subject = %msg.subject, stream_seq, machine_id = %event.machine_id, job_id = %event.job_id, kind = event.kind.name(), why = why.as_str(), "forged event: not signed by a key of the machine it names; skipped");
                    continue;
                }
            }
            if self.index.was_deleted(&event.job_id) {
                continue;
            }
            if self.load_unknown && !self.index.contains(&event.job_id) {
                self.load(&event.job_id).await;
            }
            let (applied, change) = loop {
                match self
                    .index
                    .apply_event(&event, stream_seq, published_ms, now)
                {
                    Ingested::Applied(a, c) => break (a, c),
                    Ingested::NotLoaded => self.load(&event.job_id).await,
                }
            };
            let counter = match applied {
                Applied::Changed => &self.metrics.events_ingested,
                Applied::Duplicate => &self.metrics.events_duplicate,
                Applied::Stale => &self.metrics.events_stale,
                Applied::Sampled => &self.metrics.events_sampled,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if applied == Applied::Duplicate {
                continue;
            }
            self.hub.send_job_with(&event.job_id, || JobFrame::Event {
                seq: stream_seq,
                frame: sse_frame(Some(stream_seq), event.kind.name(), &msg.payload),
            });
            if applied == Applied::Sampled {
                // Persisted with the next regular flush (never urgent, never announced).
                if !touched.contains(&event.job_id) {
                    touched.insert(event.job_id);
                }
                continue;
            }
            announce(self.hub, self.results, &event.job_id, &change);
            urgent |= is_status(&event.kind) || change.item.is_some();
            if !touched.contains(&event.job_id) {
                touched.insert(event.job_id);
            }
        }
        urgent
    }

    /// Loads an evicted record back (retrying until NATS answers or shutdown).
    async fn load(&self, job_id: &str) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.kv.load(job_id).await {
                Ok(Some((r, rev))) => return self.index.insert_loaded(r, rev),
                Ok(None) => {
                    // Aged out of KV between listing and now: start it afresh.
                    self.index.remove_forgotten(job_id);
                    return;
                }
                Err(e) => {
                    tracing::warn!(%job_id, error = %e, "loading a job record failed; retrying")
                }
            }
            if self.shutdown.is_cancelled() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Persists what the applied messages changed, then acknowledges up to `last`.
    async fn flush(&self, touched: &mut HashSet<String>, last: &jetstream::Message) -> bool {
        let writes = touched
            .iter()
            .map(|id| persist_retrying(self.index, self.kv, id, None, self.shutdown));
        let ok = futures::future::join_all(writes)
            .await
            .iter()
            .all(Result::is_ok);
        if !ok {
            self.metrics.kv_errors.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        touched.clear();
        self.metrics.batches.fetch_add(1, Ordering::Relaxed);
        match last.double_ack().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "ack not confirmed; resuming from the ack floor");
                false
            }
        }
    }
}

/// What woke the ingestion loop (one value per wake-up, moved at once: its size is no cost).
#[allow(clippy::large_enum_variant)]
enum Wake {
    /// The flush in flight ended (whether it stored and acknowledged, and what it held).
    Flushed((bool, HashSet<String>)),
    /// Applied events have waited [`FLUSH_EVERY`].
    Timer,
    /// The consumer's next message.
    Message(
        Option<Result<jetstream::Message, async_nats::jetstream::consumer::pull::MessagesError>>,
    ),
}

/// Indexes `BENCH_EVENTS` until shutdown.
pub async fn run(
    ingest: Ingest<'_>,
    stream: &jetstream::stream::Stream,
    mut consumer: jetstream::consumer::PullConsumer,
) {
    let shutdown = ingest.shutdown;
    // Grows while batches cannot be stored or acknowledged (NATS away, missing permissions),
    // so a persistent failure does not turn into a redelivery storm.
    let mut backoff = Duration::ZERO;
    let mut touched = HashSet::new();
    'outer: loop {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(BATCH_MAX)
            // Forged events may be max_payload each: bound what one batch holds in memory.
            .max_bytes_per_batch(BATCH_MAX_BYTES)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull from the indexer consumer; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // Nothing waiting at all means caught up, too.
        if consumer.info().await.is_ok_and(|i| i.num_pending == 0) {
            ingest.metrics.caught_up.store(true, Ordering::Relaxed);
        }
        let mut unacked: Option<jetstream::Message> = None;
        let mut count = 0usize;
        let mut flush_at: Option<tokio::time::Instant> = None;
        let mut want_flush = false;
        // One flush at a time, run beside ingestion (a KV write and an ack round trip must not
        // hold up the next events' way to the browsers). It hands back the records it was
        // given when it fails.
        type Flush<'f> = std::pin::Pin<
            Box<dyn std::future::Future<Output = (bool, HashSet<String>)> + Send + 'f>,
        >;
        let mut flushing: Option<Flush<'_>> = None;
        let ok = loop {
            let wake = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    if let Some(f) = flushing.take() {
                        let _ = tokio::time::timeout(Duration::from_secs(5), f).await;
                    }
                    if let Some(last) = unacked.take() {
                        let _ = tokio::time::timeout(Duration::from_secs(5), ingest.flush(&mut touched, &last)).await;
                    }
                    break 'outer;
                }
                r = async { flushing.as_mut().expect("guarded").await }, if flushing.is_some() => Wake::Flushed(r),
                _ = async { tokio::time::sleep_until(flush_at.expect("guarded")).await }, if flush_at.is_some() && !want_flush => Wake::Timer,
                m = messages.next() => Wake::Message(m),
            };
            match wake {
                Wake::Flushed((done, failed)) => {
                    flushing = None;
                    if !done {
                        touched.extend(failed);
                        break false;
                    }
                    backoff = Duration::ZERO;
                }
                Wake::Timer => {
                    flush_at = None;
                    want_flush = true;
                }
                Wake::Message(None) => {
                    if let Some(f) = flushing.take() {
                        let (done, failed) = f.await;
                        if !done {
                            touched.extend(failed);
                            break false;
                        }
                    }
                    break true;
                }
                Wake::Message(Some(Err(e))) => {
                    tracing::debug!(error = %e, "indexer pull error");
                }
                Wake::Message(Some(Ok(first))) => {
                    let mut batch = vec![first];
                    while batch.len() < BATCH_MAX {
                        match messages.next().now_or_never() {
                            Some(Some(Ok(m))) => batch.push(m),
                            _ => break,
                        }
                    }
                    let urgent = ingest.apply(&batch, &mut touched).await;
                    count += batch.len();
                    unacked = batch.pop();
                    if urgent || count >= ACK_EVERY {
                        want_flush = true;
                    } else if flush_at.is_none() {
                        flush_at = Some(tokio::time::Instant::now() + FLUSH_EVERY);
                    }
                }
            }
            if want_flush && flushing.is_none() {
                want_flush = false;
                flush_at = None;
                count = 0;
                if let Some(last) = unacked.take() {
                    let mut set = std::mem::take(&mut touched);
                    flushing = Some(Box::pin(async move {
                        let done = ingest.flush(&mut set, &last).await;
                        (done, set)
                    }));
                }
            }
        };
        if shutdown.is_cancelled() {
            break;
        }
        if ok {
            continue;
        }
        drop(messages);
        backoff = (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::select! {
            _ = shutdown.cancelled() => break 'outer,
            _ = tokio::time::sleep(backoff) => {}
        }
        match crate::store::open_indexer(stream).await {
            Ok(c) => consumer = c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reopen the indexer consumer; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    tracing::info!("indexer stopped");
}
