//! The in-memory job index: a small list entry for every stored job (what `GET /api/jobs`
//! pages through, newest first), and the full [`JobRecord`] of the recently used ones, at most
//! `cache_jobs` of them (least recently used finished records are dropped and loaded back from
//! KV on demand by [`crate::jobs_kv`]). Unfinished and not-yet-persisted records always stay.
//!
//! Nothing here talks to NATS and no lock is held across an await: changes bump a record's
//! `version`; whoever persists takes a [`Snapshot`] under the lock, writes it without the lock
//! and reports back with [`Index::mark_written`].

use crate::record::{Applied, JobRecord, JobStatus, Source};
use bench_schemas::Event;
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::RwLock;

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
    /// The job's `ppN-tgM` profile, when it has one (its prompt may then be empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Status.
    pub status: JobStatus,
    /// central or external.
    pub source: Source,
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
            profile: r.job.as_ref().and_then(|j| j.profile.clone()),
            status: r.status,
            source: r.source,
            machines: r.machines.iter().map(|m| m.machine_id.clone()).collect(),
        }
    }
}

/// What a change did to a job, for the caller to announce.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Its list item, when it is new or its status or machines changed.
    pub item: Option<JobListItem>,
    /// It is finished now (at this stream sequence).
    pub finished_at: Option<u64>,
}

/// A record's bytes to write, and what they are a version of.
#[derive(Debug)]
pub struct Snapshot {
    /// The value.
    pub bytes: Option<Vec<u8>>,
    /// The record's version they were taken at.
    pub version: u64,
    /// The KV revision they replace (0: the key does not exist).
    pub revision: u64,
}

struct Entry {
    item: JobListItem,
    last_stream_seq: u64,
    record: Option<JobRecord>,
    /// Bumped by every change.
    version: u64,
    /// The last version known to be in KV.
    written: u64,
    /// KV revision of the last write or load.
    revision: u64,
    /// LRU clock of the last use.
    used: u64,
    /// A follower applied events to it that KV does not hold yet (see [`Index::mark_mirrored`]).
    ahead: bool,
}

impl Entry {
    /// A record as read from KV at `revision`: nothing unwritten.
    fn loaded(item: JobListItem, record: JobRecord, revision: u64, used: u64) -> Self {
        Self {
            item,
            last_stream_seq: record.last_stream_seq,
            record: Some(record),
            version: 0,
            written: 0,
            revision,
            used,
            ahead: false,
        }
    }

    fn evictable(&self) -> bool {
        self.record.is_some()
            && self.written == self.version
            && !self.ahead
            && self.item.status != JobStatus::Running
    }
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<String, Entry>,
    /// Newest first.
    order: BTreeSet<(Reverse<u64>, Reverse<String>)>,
    cached: usize,
    clock: u64,
}

/// What [`Index::apply_event`] found.
#[derive(Debug)]
pub enum Ingested {
    /// Applied (or skipped as a duplicate or stale event).
    Applied(Applied, Change),
    /// The job is stored but its record is not in memory: load it, [`Index::insert_loaded`],
    /// and apply again.
    NotLoaded,
}

/// The index.
pub struct Index {
    inner: RwLock<Inner>,
    deleted: RwLock<HashSet<String>>,
    cache_jobs: usize,
}

/// Slack over `cache_jobs` before an eviction pass (so passes are rare and amortised).
const EVICT_SLACK: usize = 64;

impl Index {
    /// An empty index keeping at most `cache_jobs` finished records in memory.
    pub fn new(cache_jobs: usize) -> Self {
        Self {
            inner: RwLock::default(),
            deleted: RwLock::default(),
            cache_jobs: cache_jobs.max(1),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().expect("index lock")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().expect("index lock")
    }

    /// Adds a record read from KV at `revision` (start-up, or loaded on demand). Start-up loads
    /// keep only the unfinished and the newest records in memory.
    pub fn insert_loaded(&self, record: JobRecord, revision: u64) {
        let mut inner = self.write();
        inner.clock += 1;
        let used = inner.clock;
        let id = record.job_id.clone();
        if let Some(e) = inner.jobs.get(&id) {
            if e.record.is_some() {
                return;
            }
        }
        let item = JobListItem::of(&record);
        inner
            .order
            .insert((Reverse(item.created_ms), Reverse(id.clone())));
        let had = inner
            .jobs
            .insert(id, Entry::loaded(item, record, revision, used));
        if had.as_ref().is_none_or(|e| e.record.is_none()) {
            inner.cached += 1;
        }
        self.evict(&mut inner);
    }

    fn evict(&self, inner: &mut Inner) {
        if inner.cached <= self.cache_jobs + EVICT_SLACK {
            return;
        }
        let mut candidates: Vec<(u64, String)> = inner
            .jobs
            .iter()
            .filter(|(_, e)| e.evictable())
            .map(|(id, e)| (e.used, id.clone()))
            .collect();
        candidates.sort_unstable();
        let excess = inner.cached - self.cache_jobs;
        for (_, id) in candidates.into_iter().take(excess) {
            if let Some(e) = inner.jobs.get_mut(&id) {
                e.record = None;
                inner.cached -= 1;
            }
        }
    }

    /// A copy of one record, when it is in memory.
    pub fn get(&self, job_id: &str) -> Option<JobRecord> {
        self.read().jobs.get(job_id).and_then(|e| e.record.clone())
    }

    /// Whether the job is stored (in memory or only in KV).
    pub fn contains(&self, job_id: &str) -> bool {
        self.read().jobs.contains_key(job_id)
    }

    /// Whether the job is stored but its record is not in memory.
    pub fn needs_load(&self, job_id: &str) -> bool {
        self.read()
            .jobs
            .get(job_id)
            .is_some_and(|e| e.record.is_none())
    }

    /// Records held in memory / jobs known.
    pub fn sizes(&self) -> (usize, usize) {
        let inner = self.read();
        (inner.cached, inner.jobs.len())
    }

    /// Whether the job was deleted since central started.
    pub fn was_deleted(&self, job_id: &str) -> bool {
        self.deleted.read().expect("deleted lock").contains(job_id)
    }

    /// The job's status and last stream sequence, without copying the record.
    pub fn progress(&self, job_id: &str) -> Option<(JobStatus, u64)> {
        self.read()
            .jobs
            .get(job_id)
            .map(|e| (e.item.status, e.last_stream_seq))
    }

    /// Newest first, created strictly before `before`, at most `limit`; and whether more exist.
    pub fn list(&self, limit: usize, before: Option<u64>) -> (Vec<JobListItem>, bool) {
        let inner = self.read();
        // Ascending order is newest first; everything created before `b` sorts after every
        // entry created at `b`, the greatest of which has the smallest id's Reverse: "".
        let mut it: Box<dyn Iterator<Item = &(Reverse<u64>, Reverse<String>)>> = match before {
            None => Box::new(inner.order.iter()),
            Some(b) => Box::new(inner.order.range((
                std::ops::Bound::Excluded((Reverse(b), Reverse(String::new()))),
                std::ops::Bound::Unbounded,
            ))),
        };
        let mut out = Vec::with_capacity(limit.min(inner.order.len()));
        for (_, Reverse(id)) in it.by_ref() {
            if out.len() == limit {
                return (out, true);
            }
            if let Some(e) = inner.jobs.get(id) {
                out.push(e.item.clone());
            }
        }
        (out, false)
    }

    /// Jobs per status.
    pub fn status_counts(&self) -> HashMap<JobStatus, usize> {
        let mut counts = HashMap::new();
        for e in self.read().jobs.values() {
            *counts.entry(e.item.status).or_insert(0) += 1;
        }
        counts
    }

    /// Ids of unfinished jobs.
    pub fn running_ids(&self) -> Vec<String> {
        self.read()
            .jobs
            .iter()
            .filter(|(_, e)| e.item.status == JobStatus::Running)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Ids of finished jobs.
    pub fn finished_ids(&self) -> Vec<String> {
        self.read()
            .jobs
            .iter()
            .filter(|(_, e)| e.item.status != JobStatus::Running)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Ids of records changed since they were last written.
    pub fn dirty_ids(&self) -> Vec<String> {
        self.read()
            .jobs
            .iter()
            .filter(|(_, e)| e.version != e.written)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Finished jobs created before `cutoff_ms` (their KV entries have aged out or will).
    pub fn forget_older_than(&self, cutoff_ms: u64) -> usize {
        let mut inner = self.write();
        let old: Vec<String> = inner
            .jobs
            .iter()
            .filter(|(_, e)| {
                e.item.created_ms < cutoff_ms
                    && e.item.status != JobStatus::Running
                    && e.version == e.written
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &old {
            if let Some(e) = inner.jobs.remove(id) {
                inner
                    .order
                    .remove(&(Reverse(e.item.created_ms), Reverse(id.clone())));
                if e.record.is_some() {
                    inner.cached -= 1;
                }
            }
        }
        old.len()
    }

    /// Applies one stream event (see [`JobRecord::apply`]); creates the job when it is new.
    pub fn apply_event(
        &self,
        ev: &Event,
        stream_seq: u64,
        published_ms: u64,
        now_ms: u64,
    ) -> Ingested {
        let mut inner = self.write();
        inner.clock += 1;
        let used = inner.clock;
        let inner = &mut *inner;
        let created = !inner.jobs.contains_key(&ev.job_id);
        if created {
            let r = JobRecord::external(&ev.job_id, published_ms);
            let item = JobListItem::of(&r);
            inner
                .order
                .insert((Reverse(item.created_ms), Reverse(ev.job_id.clone())));
            inner.jobs.insert(
                ev.job_id.clone(),
                Entry {
                    item,
                    last_stream_seq: 0,
                    record: Some(r),
                    version: 0,
                    written: 0,
                    revision: 0,
                    used,
                    ahead: false,
                },
            );
            inner.cached += 1;
        }
        let e = inner.jobs.get_mut(&ev.job_id).expect("present");
        let Some(r) = e.record.as_mut() else {
            return Ingested::NotLoaded;
        };
        e.used = used;
        let machines = r.machines.len();
        let had_job = r.job.is_some();
        let applied = r.apply(ev, stream_seq, published_ms);
        if applied == Applied::Sampled {
            // No announcement, but the run's counters (seq, gaps) changed: written with the
            // next regular flush, before its ack, so a crash cannot turn acknowledged samples
            // into a gap. At most one write per flush, however many samples arrive.
            e.version += 1;
            e.last_stream_seq = r.last_stream_seq;
        }
        if matches!(applied, Applied::Duplicate | Applied::Sampled) {
            return Ingested::Applied(
                applied,
                Change {
                    item: None,
                    finished_at: None,
                },
            );
        }
        let old = r.refresh_status(now_ms);
        e.version += 1;
        e.last_stream_seq = r.last_stream_seq;
        let changed = created
            || old != r.status
            || machines != r.machines.len()
            || had_job != r.job.is_some();
        // A finished job that changes (late events of a run failed by a stall, a refused
        // re-submission) is announced again, so its results are rewritten.
        let change = Change {
            item: changed.then(|| JobListItem::of(r)),
            finished_at: r.is_finished().then_some(r.last_stream_seq),
        };
        if let Some(item) = &change.item {
            e.item = item.clone();
        }
        if created {
            self.evict(inner);
        }
        Ingested::Applied(applied, change)
    }

    /// Changes one record in memory (outside ingestion): `f` gets the record (None when it does
    /// not exist or is not in memory) and returns the new one, or None to leave it. Persist it
    /// afterwards.
    pub fn update(
        &self,
        job_id: &str,
        now_ms: u64,
        f: impl FnOnce(Option<JobRecord>) -> Option<JobRecord>,
    ) -> Option<(JobRecord, Change)> {
        let mut inner = self.write();
        inner.clock += 1;
        let used = inner.clock;
        let inner = &mut *inner;
        let before = inner.jobs.get(job_id).and_then(|e| e.record.clone());
        let old = before.as_ref().map(|r| (r.status, r.machines.len()));
        let mut r = f(before)?;
        r.refresh_status(now_ms);
        let item = JobListItem::of(&r);
        let change = Change {
            item: (old != Some((r.status, r.machines.len()))).then(|| item.clone()),
            finished_at: r.is_finished().then_some(r.last_stream_seq),
        };
        match inner.jobs.get_mut(job_id) {
            Some(e) => {
                if e.record.is_none() {
                    inner.cached += 1;
                }
                e.item = item;
                e.last_stream_seq = r.last_stream_seq;
                e.record = Some(r.clone());
                e.version += 1;
                e.used = used;
            }
            None => {
                inner
                    .order
                    .insert((Reverse(item.created_ms), Reverse(job_id.to_string())));
                inner.jobs.insert(
                    job_id.to_string(),
                    Entry {
                        item,
                        last_stream_seq: r.last_stream_seq,
                        record: Some(r.clone()),
                        version: 1,
                        written: 0,
                        revision: 0,
                        used,
                        ahead: false,
                    },
                );
                inner.cached += 1;
                self.evict(inner);
            }
        }
        Some((r, change))
    }

    /// The bytes to write for a changed record (None when it is unchanged or gone); values are
    /// cut to `max` bytes.
    pub fn snapshot(&self, job_id: &str, max: usize) -> Option<Snapshot> {
        let inner = self.read();
        let e = inner.jobs.get(job_id)?;
        if e.version == e.written {
            return None;
        }
        let r = e.record.as_ref()?;
        Some(Snapshot {
            bytes: r.to_kv_bytes(max),
            version: e.version,
            revision: e.revision,
        })
    }

    /// `version` of the record is in KV at `revision`.
    pub fn mark_written(&self, job_id: &str, version: u64, revision: u64) {
        let mut inner = self.write();
        if let Some(e) = inner.jobs.get_mut(job_id) {
            e.written = e.written.max(version);
            e.revision = e.revision.max(revision);
        }
        // Now perhaps evictable: a burst of new jobs must not keep every record in memory.
        self.evict(&mut inner);
    }

    /// The key is at `revision` in KV (someone else wrote it): the next write replaces that.
    pub fn set_revision(&self, job_id: &str, revision: u64) {
        if let Some(e) = self.write().jobs.get_mut(job_id) {
            e.revision = revision;
        }
    }

    /// The KV revision the record was last written or loaded at.
    pub fn revision_of(&self, job_id: &str) -> Option<u64> {
        self.read().jobs.get(job_id).map(|e| e.revision)
    }

    /// A follower applied events to these records that only the leader writes to KV: they are
    /// not dirty for this central (it does not write them) but ahead of KV until the leader's
    /// write is adopted ([`Index::adopt`]), and kept in memory until then.
    pub fn mark_mirrored<'a>(&self, job_ids: impl IntoIterator<Item = &'a String>) {
        let mut inner = self.write();
        for id in job_ids {
            if let Some(e) = inner.jobs.get_mut(id) {
                if e.version != e.written {
                    e.written = e.version;
                    e.ahead = true;
                }
            }
        }
    }

    /// On becoming the leader: every record ahead of KV becomes dirty (to be written now),
    /// since the durable consumer's redelivery of those events is a duplicate and would not.
    pub fn take_ahead(&self) -> Vec<String> {
        let mut inner = self.write();
        let mut ids = Vec::new();
        for (id, e) in inner.jobs.iter_mut().filter(|(_, e)| e.ahead) {
            e.ahead = false;
            e.version += 1;
            ids.push(id.clone());
        }
        ids
    }

    /// A record another central (the leader) wrote to KV at `revision`, seen by a follower:
    /// it replaces ours unless ours came from a later revision or holds later events (then the
    /// leader's next write catches up). Returns what changed, to announce.
    pub fn adopt(&self, record: JobRecord, revision: u64) -> Option<Change> {
        if self.was_deleted(&record.job_id) {
            return None;
        }
        let mut inner = self.write();
        inner.clock += 1;
        let used = inner.clock;
        let inner = &mut *inner;
        let item = JobListItem::of(&record);
        let finished = record.is_finished();
        match inner.jobs.get_mut(&record.job_id) {
            Some(e) => {
                if e.revision >= revision {
                    return None;
                }
                e.revision = revision;
                if e.last_stream_seq > record.last_stream_seq {
                    return None;
                }
                let was = (e.item.status, e.item.machines.len());
                let was_finished = e.item.status != JobStatus::Running;
                if e.record.is_none() {
                    inner.cached += 1;
                }
                e.item = item.clone();
                e.last_stream_seq = record.last_stream_seq;
                e.record = Some(record);
                e.written = e.version;
                e.ahead = false;
                e.used = used;
                let change = Change {
                    item: (was != (item.status, item.machines.len())).then_some(item),
                    finished_at: (finished && !was_finished).then_some(e.last_stream_seq),
                };
                self.evict(inner);
                Some(change)
            }
            None => {
                let id = record.job_id.clone();
                inner
                    .order
                    .insert((Reverse(item.created_ms), Reverse(id.clone())));
                inner
                    .jobs
                    .insert(id, Entry::loaded(item.clone(), record, revision, used));
                inner.cached += 1;
                self.evict(inner);
                Some(Change {
                    item: Some(item),
                    finished_at: None,
                })
            }
        }
    }

    /// Drops a job whose KV entry has aged out, without remembering it as deleted (an event for
    /// it starts a new record).
    pub fn remove_forgotten(&self, job_id: &str) {
        let mut inner = self.write();
        if let Some(e) = inner.jobs.remove(job_id) {
            inner
                .order
                .remove(&(Reverse(e.item.created_ms), Reverse(job_id.to_string())));
            if e.record.is_some() {
                inner.cached -= 1;
            }
        }
    }

    /// Removes a job; later events for it are ignored. Returns whether it existed.
    pub fn remove(&self, job_id: &str) -> bool {
        self.deleted
            .write()
            .expect("deleted lock")
            .insert(job_id.to_string());
        let mut inner = self.write();
        match inner.jobs.remove(job_id) {
            Some(e) => {
                inner
                    .order
                    .remove(&(Reverse(e.item.created_ms), Reverse(job_id.to_string())));
                if e.record.is_some() {
                    inner.cached -= 1;
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bench_schemas::event::Accepted;
    use bench_schemas::{EventKind, Job};

    fn accepted(job: &str) -> Event {
        Event {
            job_id: job.into(),
            machine_id: "a".into(),
            run_id: "b-1".into(),
            seq: 1,
            ts_ms: 0,
            kind: EventKind::JobAccepted(Accepted {
                job: Job::new("m", "p"),
                position: 0,
                engine: "mock".into(),
                engine_url: String::new(),
                label: "A".into(),
                agent_version: "0".into(),
                fingerprint: None,
            }),
        }
    }

    #[test]
    fn a_follower_adopts_the_leaders_writes_unless_it_is_ahead() {
        let index = Index::new(10);
        let mut kv = JobRecord::dispatched("j", Job::new("m", "p"), &["a".into()], 1);
        // A new job from the leader's write: adopted and announced.
        let c = index.adopt(kv.clone(), 5).expect("new job");
        assert!(c.item.is_some());
        // The same or an older revision: nothing.
        assert!(index.adopt(kv.clone(), 5).is_none());
        // The follower applies an event the leader has not written yet: it is ahead, kept in
        // memory, not dirty for this central.
        index.apply_event(&accepted("j"), 7, 100, 0);
        index.mark_mirrored([&"j".to_string()]);
        assert!(index.dirty_ids().is_empty());
        // The leader's write of an older state (seq 0 < 7) is not adopted, only its revision.
        assert!(index.adopt(kv.clone(), 6).is_none());
        assert_eq!(index.revision_of("j"), Some(6));
        assert_eq!(index.get("j").unwrap().last_stream_seq, 7);
        // Once the leader's write holds the event, it replaces ours and we are no longer ahead.
        kv.apply(&accepted("j"), 7, 100);
        kv.dispatching = false;
        index.adopt(kv.clone(), 8).expect("caught up");
        assert!(
            !index.get("j").unwrap().dispatching,
            "the leader's own fields adopted"
        );
        assert!(index.take_ahead().is_empty());
        // Taking the lease while ahead: the record becomes dirty, to be written.
        index.apply_event(&accepted("j"), 9, 100, 0);
        index.mark_mirrored([&"j".to_string()]);
        assert_eq!(index.take_ahead(), vec!["j".to_string()]);
        assert_eq!(index.dirty_ids(), vec!["j".to_string()]);
    }

    #[test]
    fn lists_newest_first_and_pages() {
        let index = Index::new(10);
        for i in 0..5u64 {
            index.apply_event(&accepted(&format!("j{i}")), i + 1, 100 + i, 0);
        }
        let (page, more) = index.list(2, None);
        assert_eq!(
            page.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(),
            ["j4", "j3"]
        );
        assert!(more);
        let (page, more) = index.list(10, Some(page[1].created_ms));
        assert_eq!(
            page.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(),
            ["j2", "j1", "j0"]
        );
        assert!(!more);
        assert!(index.list(10, Some(0)).0.is_empty());
    }

    #[test]
    fn keeps_at_most_the_cache_limit_of_clean_finished_records() {
        let index = Index::new(4);
        let n = 4 + EVICT_SLACK as u64 + 10;
        for i in 0..n {
            let id = format!("j{i}");
            let mut r = JobRecord::external(&id, i);
            r.refresh_status(i);
            r.status = JobStatus::Done;
            index.insert_loaded(r, i + 1);
        }
        let (cached, known) = index.sizes();
        assert_eq!(known, n as usize);
        assert!(cached <= 4 + EVICT_SLACK, "{cached}");
        // The newest stay; the oldest are listed but must be loaded again.
        assert!(index.get(&format!("j{}", n - 1)).is_some());
        assert!(index.needs_load("j0"));
        assert!(matches!(
            index.apply_event(&accepted("j0"), 1, 0, 0),
            Ingested::NotLoaded
        ));
    }

    #[test]
    fn unwritten_changes_are_never_evicted() {
        let index = Index::new(1);
        for i in 0..(EVICT_SLACK as u64 + 10) {
            index.apply_event(&accepted(&format!("j{i}")), 1, i, 0);
        }
        // Every record is running and unwritten: all stay.
        assert_eq!(index.sizes().0, EVICT_SLACK + 10);
        assert_eq!(index.dirty_ids().len(), EVICT_SLACK + 10);
        let snap = index.snapshot("j0", 1 << 20).unwrap();
        index.mark_written("j0", snap.version, 7);
        assert!(index.snapshot("j0", 1 << 20).is_none());
    }
}
