//! The `bench_jobs` KV bucket: loading records (all at start-up in one pass over the bucket's
//! stream, or one on demand) and writing them with compare-and-set, so that two writers of the
//! same record (ingestion and an API call) can never leave an older version in KV.
//!
//! [`persist`] is the one way a changed record reaches KV: it snapshots the record from the
//! [`Index`] (no lock held while writing), writes it at the revision it last saw, and on a
//! conflict re-reads the revision and writes the now newest snapshot.

use crate::index::Index;
use crate::record::JobRecord;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The bucket, and what was written to it.
pub struct JobsKv {
    kv: kv::Store,
    stream: Stream,
    /// Largest value accepted (the server's max payload less room for headers).
    pub max_value: usize,
    /// Values written.
    pub writes: AtomicU64,
    /// Bytes of values written.
    pub bytes: AtomicU64,
}

/// A write that did not happen.
#[derive(Debug)]
pub enum WriteError {
    /// The key is not at the expected revision.
    Conflict,
    /// NATS failed.
    Nats(async_nats::Error),
}

/// How long one look-up of the whole bucket may take per record before it is given up.
const LOAD_STALL: Duration = Duration::from_secs(10);

impl JobsKv {
    /// The bucket `kv` (whose stream is `stream`), taking values up to `max_value` bytes.
    pub fn new(kv: kv::Store, stream: Stream, max_value: usize) -> Self {
        Self {
            kv,
            stream,
            max_value,
            writes: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// Hands every record and its revision to `add`, read in one pass (the last value per key,
    /// oldest write first), without holding them all at once; returns how many.
    pub async fn load_all(
        &self,
        mut add: impl FnMut(JobRecord, u64),
    ) -> Result<usize, async_nats::Error> {
        let mut n = 0;
        let info = self.stream.get_info().await?;
        if info.state.messages == 0 {
            return Ok(n);
        }
        let prefix = format!("$KV.{}.", self.kv.name);
        let consumer = self
            .stream
            .create_consumer(OrderedConfig {
                filter_subject: format!("{prefix}>"),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        loop {
            let m = match tokio::time::timeout(LOAD_STALL, messages.next()).await {
                Err(_) | Ok(None) => break,
                Ok(Some(m)) => m?,
            };
            let info = m.info()?;
            let (revision, pending) = (info.stream_sequence, info.pending);
            let removed = m
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
            if !removed {
                let key = m.subject.as_str().strip_prefix(&prefix).unwrap_or_default();
                match serde_json::from_slice::<JobRecord>(&m.payload) {
                    Ok(r) if r.job_id == key => {
                        add(r, revision);
                        n += 1;
                    }
                    Ok(_) => tracing::warn!(%key, "job record under another key skipped"),
                    Err(e) => tracing::warn!(%key, error = %e, "unreadable job record skipped"),
                }
            }
            if pending == 0 {
                break;
            }
        }
        Ok(n)
    }

    /// One record and its revision.
    pub async fn load(&self, job_id: &str) -> Result<Option<(JobRecord, u64)>, async_nats::Error> {
        let Some(entry) = self.kv.entry(job_id).await? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        Ok(Some((
            serde_json::from_slice(&entry.value)?,
            entry.revision,
        )))
    }

    /// Writes `bytes` over `revision` (0: the key must not exist); returns the new revision.
    pub async fn write(
        &self,
        job_id: &str,
        bytes: Vec<u8>,
        revision: u64,
    ) -> Result<u64, WriteError> {
        let len = bytes.len() as u64;
        let res = if revision == 0 {
            self.kv.create(job_id, bytes.into()).await.map_err(|e| {
                if e.kind() == CreateErrorKind::AlreadyExists {
                    WriteError::Conflict
                } else {
                    WriteError::Nats(e.into())
                }
            })
        } else {
            self.kv
                .update(job_id, bytes.into(), revision)
                .await
                .map_err(|e| {
                    if e.kind() == UpdateErrorKind::WrongLastRevision {
                        WriteError::Conflict
                    } else {
                        WriteError::Nats(e.into())
                    }
                })
        };
        if res.is_ok() {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(len, Ordering::Relaxed);
        }
        res
    }

    /// The key's current revision (0 when it has none).
    pub async fn revision(&self, job_id: &str) -> Result<u64, async_nats::Error> {
        Ok(self
            .kv
            .entry(job_id)
            .await?
            .map(|e| e.revision)
            .unwrap_or(0))
    }

    /// Every write to the bucket from `revision` on (a follower's view of the leader's writes).
    pub async fn watch_from(&self, revision: u64) -> Result<kv::Watch, async_nats::Error> {
        Ok(self.kv.watch_all_from_revision(revision.max(1)).await?)
    }

    /// The bucket's last revision (0 when it is empty).
    pub async fn last_revision(&self) -> Result<u64, async_nats::Error> {
        Ok(self.stream.get_info().await?.state.last_sequence)
    }

    /// Removes the key and its history.
    pub async fn purge(&self, job_id: &str) -> Result<(), async_nats::Error> {
        Ok(self.kv.purge(job_id).await?)
    }
}

/// Writes the record's newest version to KV (nothing when it is unchanged). A conflict means
/// someone wrote the key since we last did: take its revision and write again, memory being
/// the newest state.
pub async fn persist(index: &Index, kv: &JobsKv, job_id: &str) -> Result<(), async_nats::Error> {
    for _ in 0..8 {
        let Some(snap) = index.snapshot(job_id, kv.max_value) else {
            return Ok(());
        };
        let Some(bytes) = snap.bytes else {
            // Retrying cannot help; the stream still holds every event of the job.
            tracing::error!(%job_id, max = kv.max_value, "job record too large for the jobs bucket even without output text; not persisted");
            index.mark_written(job_id, snap.version, snap.revision);
            return Ok(());
        };
        match kv.write(job_id, bytes, snap.revision).await {
            Ok(revision) => {
                index.mark_written(job_id, snap.version, revision);
                if index.snapshot(job_id, kv.max_value).is_none() {
                    return Ok(());
                }
            }
            Err(WriteError::Conflict) => {
                let revision = kv.revision(job_id).await?;
                index.set_revision(job_id, revision);
            }
            Err(WriteError::Nats(e)) => return Err(e),
        }
    }
    Err(format!("job record {job_id} kept changing under its writes").into())
}

/// [`persist`], retried with back-off until it succeeds, `give_up` passes or `cancelled`.
pub async fn persist_retrying(
    index: &Index,
    kv: &JobsKv,
    job_id: &str,
    give_up: Option<tokio::time::Instant>,
    cancelled: &tokio_util::sync::CancellationToken,
) -> Result<(), async_nats::Error> {
    let mut backoff = Duration::from_millis(50);
    loop {
        match persist(index, kv, job_id).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(%job_id, error = %e, "writing the job record failed; retrying");
                let now = tokio::time::Instant::now();
                if cancelled.is_cancelled() || give_up.is_some_and(|t| now + backoff >= t) {
                    return Err(e);
                }
            }
        }
        tokio::select! {
            _ = cancelled.cancelled() => {}
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
