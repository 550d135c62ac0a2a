//! The results index: every job's [`JobRecord`] in memory, persisted to the `bench_jobs` KV
//! bucket, fed by the durable `BENCH_EVENTS` consumer ([`run`]) and watched by the stall timeout
//! ([`stall_loop`]).
//!
//! Ingestion works in batches of the messages already waiting: apply each to memory (and tell
//! live listeners), write every touched record to KV once, then acknowledge the batch's last
//! message (the consumer acks "all up to here"). A crash anywhere in between redelivers the
//! batch, and [`JobRecord::apply`] skips what was already applied.

use crate::error::ErrorInfo;
use crate::hub::HubMsg;
use crate::record::{Applied, JobRecord, JobStatus, RunStatus};
use crate::registry::MachineStatus;
use crate::{now_ms, Shared};
use async_nats::jetstream::{self, kv};
use bench_schemas::Event;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Most messages applied before one KV write and ack.
pub const BATCH_MAX: usize = 512;
/// How long an update outside ingestion (dispatch, stall) retries its KV write.
pub const UPDATE_PERSIST_WAIT: Duration = Duration::from_secs(5);

/// One item of `GET /api/jobs`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct JobListItem {
    /// The job.
    pub job_id: String,
    /// Unix ms.
    pub created_ms: u64,
    /// Model, when known.
    pub model: String,
    /// First 200 characters of the prompt.
    pub prompt: String,
    /// Status.
    pub status: JobStatus,
    /// central or external.
    pub source: crate::record::Source,
    /// Its machines.
    pub machines: Vec<String>,
}

impl JobListItem {
    /// The list item of a record.
    pub fn of(r: &JobRecord) -> Self {
        Self {
            job_id: r.job_id.clone(),
            created_ms: r.created_ms,
            model: r.job.as_ref().map(|j| j.model.clone()).unwrap_or_default(),
            prompt: r
                .job
                .as_ref()
                .map(|j| j.prompt.chars().take(200).collect())
                .unwrap_or_default(),
            status: r.status,
            source: r.source,
            machines: r.machines.iter().map(|m| m.machine_id.clone()).collect(),
        }
    }
}

/// Jobs in memory, written through to KV.
pub struct Index {
    jobs: RwLock<HashMap<String, JobRecord>>,
    deleted: RwLock<HashSet<String>>,
    /// Serialises writers so KV sees record versions in the order memory did.
    writer: tokio::sync::Mutex<()>,
    kv: kv::Store,
}

impl Index {
    /// Loads every record from the bucket.
    pub async fn load(kv: kv::Store) -> Result<Self, async_nats::Error> {
        let mut jobs = HashMap::new();
        let mut keys = kv.keys().await?;
        while let Some(key) = keys.next().await {
            let key = key?;
            if let Some(bytes) = kv.get(&key).await? {
                match serde_json::from_slice::<JobRecord>(&bytes) {
                    Ok(r) => {
                        jobs.insert(key, r);
                    }
                    Err(e) => tracing::warn!(%key, error = %e, "unreadable job record skipped"),
                }
            }
        }
        tracing::info!(jobs = jobs.len(), "index loaded");
        Ok(Self {
            jobs: RwLock::new(jobs),
            deleted: RwLock::default(),
            writer: tokio::sync::Mutex::new(()),
            kv,
        })
    }

    /// A copy of one record.
    pub fn get(&self, job_id: &str) -> Option<JobRecord> {
        self.jobs.read().expect("index lock").get(job_id).cloned()
    }

    /// Whether the job was deleted since central started.
    pub fn was_deleted(&self, job_id: &str) -> bool {
        self.deleted.read().expect("deleted lock").contains(job_id)
    }

    /// Whether the job is indexed.
    pub fn contains(&self, job_id: &str) -> bool {
        self.jobs.read().expect("index lock").contains_key(job_id)
    }

    /// Newest first, created strictly before `before`, at most `limit`; and whether more exist.
    pub fn list(&self, limit: usize, before: Option<u64>) -> (Vec<JobListItem>, bool) {
        let jobs = self.jobs.read().expect("index lock");
        let mut items: Vec<&JobRecord> = jobs
            .values()
            .filter(|r| before.is_none_or(|b| r.created_ms < b))
            .collect();
        items.sort_by(|a, b| {
            b.created_ms
                .cmp(&a.created_ms)
                .then_with(|| b.job_id.cmp(&a.job_id))
        });
        let more = items.len() > limit;
        (
            items.into_iter().take(limit).map(JobListItem::of).collect(),
            more,
        )
    }

    /// Jobs per status.
    pub fn status_counts(&self) -> HashMap<JobStatus, usize> {
        let mut counts = HashMap::new();
        for r in self.jobs.read().expect("index lock").values() {
            *counts.entry(r.status).or_insert(0) += 1;
        }
        counts
    }

    /// Ids of unfinished jobs.
    pub fn running_ids(&self) -> Vec<String> {
        self.jobs
            .read()
            .expect("index lock")
            .values()
            .filter(|r| !r.is_finished())
            .map(|r| r.job_id.clone())
            .collect()
    }

    /// Ids of finished jobs.
    pub fn finished_ids(&self) -> Vec<String> {
        self.jobs
            .read()
            .expect("index lock")
            .values()
            .filter(|r| r.is_finished())
            .map(|r| r.job_id.clone())
            .collect()
    }

    /// Writes the record to KV, retrying until it succeeds, `shutdown` fires, or `give_up`
    /// passes (ingestion has no deadline: it must not ack what is not stored).
    async fn put(
        &self,
        shared: &Shared,
        job_id: &str,
        give_up: Option<tokio::time::Instant>,
    ) -> Result<(), async_nats::Error> {
        // Leave room for the KV headers under the server's max_payload.
        let max = (shared.client.server_info().max_payload.max(64 * 1024)) - 4096;
        let body = {
            let jobs = self.jobs.read().expect("index lock");
            match jobs.get(job_id) {
                Some(r) => r.to_kv_bytes(max),
                None => return Ok(()),
            }
        };
        let Some(body) = body else {
            // Retrying cannot help; the stream still holds every event of the job.
            tracing::error!(%job_id, max, "job record too large for the jobs bucket even without output text; not persisted");
            shared.metrics.kv_errors.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.kv.put(job_id, body.clone().into()).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    shared.metrics.kv_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%job_id, error = %e, "writing the job record failed; retrying");
                    if shared.shutdown.is_cancelled()
                        || give_up.is_some_and(|t| tokio::time::Instant::now() >= t)
                    {
                        return Err(e.into());
                    }
                }
            }
            tokio::select! {
                _ = shared.shutdown.cancelled() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Creates or changes one record (outside ingestion): `f` gets the record (None when it
    /// does not exist) and returns the new one. Persists it and tells listeners on a status
    /// change.
    pub async fn update(
        &self,
        shared: &Shared,
        job_id: &str,
        f: impl FnOnce(Option<JobRecord>) -> Option<JobRecord>,
    ) -> Result<Option<JobRecord>, async_nats::Error> {
        let _w = self.writer.lock().await;
        let (after, old) = {
            let mut jobs = self.jobs.write().expect("index lock");
            let before = jobs.get(job_id).cloned();
            let old = before.as_ref().map(|r| r.status);
            let Some(mut r) = f(before) else {
                return Ok(None);
            };
            r.refresh_status(now_ms());
            jobs.insert(job_id.to_string(), r.clone());
            (r, old)
        };
        // A request must not hang while NATS is away; the next batch touching the job stores it.
        let give_up = tokio::time::Instant::now() + UPDATE_PERSIST_WAIT;
        self.put(shared, job_id, Some(give_up)).await?;
        if old != Some(after.status) {
            announce(shared, &after);
        }
        Ok(Some(after))
    }

    /// Removes a job from memory and KV; later events for it are ignored.
    pub async fn remove(&self, job_id: &str) -> Result<bool, async_nats::Error> {
        let _w = self.writer.lock().await;
        self.deleted
            .write()
            .expect("deleted lock")
            .insert(job_id.to_string());
        let existed = self
            .jobs
            .write()
            .expect("index lock")
            .remove(job_id)
            .is_some();
        self.kv.purge(job_id).await?;
        Ok(existed)
    }
}

/// Tells listeners about a job's status and, when it finished, queues its results.
fn announce(shared: &Shared, r: &JobRecord) {
    if let Ok(item) = serde_json::to_string(&JobListItem::of(r)) {
        shared.hub.send(HubMsg::Job {
            job_id: r.job_id.as_str().into(),
            status: r.status,
            item: item.into(),
        });
    }
    if r.is_finished() {
        shared.results.request(&r.job_id);
    }
}

/// Applies a batch of stream messages; returns whether it was persisted and acknowledged.
async fn apply_batch(shared: &Shared, batch: &[jetstream::Message]) -> bool {
    let index = &shared.index;
    let _w = index.writer.lock().await;
    let mut dirty = BTreeSet::new();
    let now = now_ms();
    for msg in batch {
        let Ok(info) = msg.info() else {
            shared
                .metrics
                .events_invalid
                .fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let stream_seq = info.stream_sequence;
        let published_ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        if info.pending == 0 {
            shared.metrics.caught_up.store(true, Ordering::Relaxed);
        }
        shared
            .metrics
            .last_stream_seq
            .fetch_max(stream_seq, Ordering::Relaxed);
        let event: Event = match serde_json::from_slice(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                shared
                    .metrics
                    .events_invalid
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(subject = %msg.subject, stream_seq, error = %e, "not an event; skipped");
                continue;
            }
        };
        // The ids become KV keys and file names: an event must be about the job its subject
        // names, with valid ids, or it is counted and skipped (and acked with the batch).
        let well_formed = bench_schemas::validate_job_id(&event.job_id).is_ok()
            && bench_schemas::validate_machine_id(&event.machine_id).is_ok()
            && msg.subject.as_str() == bench_schemas::subjects::events(&event.job_id);
        if !well_formed {
            shared
                .metrics
                .events_invalid
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(subject = %msg.subject, stream_seq, job_id = %event.job_id, machine_id = %event.machine_id, "event with invalid ids or a job_id its subject does not name; skipped");
            continue;
        }
        if shared
            .index
            .deleted
            .read()
            .expect("deleted lock")
            .contains(&event.job_id)
        {
            continue;
        }
        let outcome = {
            let mut jobs = index.jobs.write().expect("index lock");
            let created = !jobs.contains_key(&event.job_id);
            let r = jobs
                .entry(event.job_id.clone())
                .or_insert_with(|| JobRecord::external(&event.job_id, published_ms));
            let applied = r.apply(&event, stream_seq, published_ms);
            let old = r.refresh_status(now);
            (applied, created || old != r.status)
        };
        match outcome.0 {
            Applied::Changed => shared
                .metrics
                .events_ingested
                .fetch_add(1, Ordering::Relaxed),
            Applied::Duplicate => shared
                .metrics
                .events_duplicate
                .fetch_add(1, Ordering::Relaxed),
        };
        // Live listeners see every stored event; SSE de-duplicates by stream sequence.
        if let Ok(data) = std::str::from_utf8(&msg.payload) {
            shared.hub.send(HubMsg::Event {
                stream_seq,
                job_id: event.job_id.as_str().into(),
                kind: event.kind.name(),
                data: data.into(),
            });
        }
        if outcome.1 {
            if let Some(r) = index.get(&event.job_id) {
                announce(shared, &r);
            }
        }
        dirty.insert(event.job_id);
    }
    for job_id in &dirty {
        if index.put(shared, job_id, None).await.is_err() {
            return false;
        }
    }
    shared.metrics.batches.fetch_add(1, Ordering::Relaxed);
    match batch.last() {
        Some(last) => match last.double_ack().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "ack not confirmed; resuming from the ack floor");
                false
            }
        },
        None => true,
    }
}

/// Indexes `BENCH_EVENTS` until shutdown.
pub async fn run(shared: Arc<Shared>, mut consumer: jetstream::consumer::PullConsumer) {
    let shutdown = shared.shutdown.clone();
    // Grows while batches cannot be stored or acknowledged (NATS away, missing permissions),
    // so a persistent failure does not turn into a redelivery storm.
    let mut backoff = Duration::ZERO;
    'outer: loop {
        let mut messages = match consumer.messages().await {
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
            shared.metrics.caught_up.store(true, Ordering::Relaxed);
        }
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                m = messages.next() => m,
            };
            let mut batch = match first {
                None => continue 'outer,
                Some(Ok(m)) => vec![m],
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "indexer pull error");
                    continue;
                }
            };
            while batch.len() < BATCH_MAX {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(m),
                    _ => break,
                }
            }
            if apply_batch(&shared, &batch).await {
                backoff = Duration::ZERO;
            } else {
                if shutdown.is_cancelled() {
                    break 'outer;
                }
                drop(messages);
                backoff = (backoff * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = tokio::time::sleep(backoff) => {}
                }
                match crate::store::open_indexer(&shared.stream).await {
                    Ok(c) => consumer = c,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reopen the indexer consumer; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => break 'outer,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
                continue 'outer;
            }
        }
    }
    tracing::info!("indexer stopped");
}

/// Marks machines failed whose job went silent while their agent is gone (or no longer runs
/// it). Waits until the indexer has caught up, so a restart never judges by stale times.
pub async fn stall_loop(shared: Arc<Shared>) {
    let period =
        (shared.cfg.stall_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !shared.metrics.caught_up.load(Ordering::Relaxed) {
            continue;
        }
        let now = now_ms();
        let timeout_ms = shared.cfg.stall_timeout.as_millis() as u64;
        for job_id in shared.index.running_ids() {
            let Some(r) = shared.index.get(&job_id) else {
                continue;
            };
            if r.dispatching {
                continue;
            }
            let stalled: Vec<String> = r
                .machines
                .iter()
                .filter(|m| !m.status.is_terminal())
                .filter(|m| {
                    now.saturating_sub(m.last_event_ms.unwrap_or(r.created_ms)) > timeout_ms
                })
                .filter(|m| {
                    let (status, current) = shared.registry.status_of(&m.machine_id, now);
                    // Queued behind other work on a live agent is waiting, not stalled.
                    status == MachineStatus::Offline
                        || (m.status == RunStatus::Running
                            && current.as_deref() != Some(job_id.as_str()))
                })
                .map(|m| m.machine_id.clone())
                .collect();
            if stalled.is_empty() {
                continue;
            }
            let secs = shared.cfg.stall_timeout.as_secs_f64();
            let res = shared
                .index
                .update(&shared, &job_id, |r| {
                    let mut r = r?;
                    for id in &stalled {
                        let m = r.machine_mut(id);
                        if !m.status.is_terminal() {
                            tracing::warn!(%job_id, machine_id = %id, "no events for {secs:.0} s and the agent is gone; marking it failed");
                            m.fail(ErrorInfo::new(
                                "stalled",
                                format!("no events for {secs:.0} s and the agent is not running the job (offline or restarted)"),
                            ));
                        }
                    }
                    Some(r)
                })
                .await;
            if res.is_ok() {
                shared
                    .metrics
                    .stalls
                    .fetch_add(stalled.len() as u64, Ordering::Relaxed);
            }
        }
    }
}
