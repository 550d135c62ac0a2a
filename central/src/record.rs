//! What central keeps per job in the `bench_jobs` bucket, and how one event changes it.
//!
//! Applying is idempotent by stream sequence: a job's events reach the indexer in stream order
//! and a record is persisted before the events that changed it are acknowledged, so an event at
//! or below the record's `last_stream_seq` was applied already (a redelivery) and is skipped.
//!
//! Runs: every acceptance of the job on a machine is a run with its own `run_id`. The first
//! event of a new run on a machine moves the machine's current run into `earlier_runs` (a run
//! that had not finished is marked `superseded`) and starts the machine afresh, so a re-used
//! `job_id` is recorded and shown as a new run, never dropped or mixed into the old one. `seq`
//! is gapless per run: `gaps` counts the sequence numbers never seen.

use crate::error::ErrorInfo;
use bench_schemas::event::StopReason;
use bench_schemas::fingerprint::Fingerprint;
use bench_schemas::{CellResult, Event, EventKind, Job, Metrics, Shape, Summary};
use serde::{Deserialize, Serialize};

/// Who submitted the job.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `POST /api/jobs`.
    Central,
    /// Anyone else (the `nats` CLI, a script): seen first in the event stream.
    External,
}

/// A job's state over all its machines.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Some machine has not finished (or dispatch is still gathering answers).
    Running,
    /// Every machine finished its runs.
    Done,
    /// No machine finished, and not all were cancelled.
    Failed,
    /// Every machine was cancelled.
    Cancelled,
    /// Some machines finished, others failed or were cancelled.
    Partial,
}

impl JobStatus {
    /// Every status, for metrics.
    pub const ALL: [JobStatus; 5] = [
        Self::Running,
        Self::Done,
        Self::Failed,
        Self::Cancelled,
        Self::Partial,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Partial => "partial",
        }
    }
}

/// One machine's state in a job.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Sent or accepted, not started.
    Queued,
    /// Running its repeats.
    Running,
    /// `job_done`.
    Done,
    /// `job_error`, refused, offline, or stalled.
    Failed,
    /// `job_cancelled`.
    Cancelled,
}

impl RunStatus {
    /// No more events are expected.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }
}

/// One machine's part of a job.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct MachineRun {
    /// The machine.
    pub machine_id: String,
    /// The agent's label, from `job_accepted`.
    pub label: Option<String>,
    /// Backend kind, from `job_accepted` / `job_done`.
    pub engine: Option<String>,
    /// Where it stands.
    pub status: RunStatus,
    /// The run on this machine (`<boot_id>-<n>`; empty until its first event, and for events
    /// of agents older than run ids).
    #[serde(default)]
    pub run_id: String,
    /// Highest event `seq` applied in this run.
    pub last_seq: u64,
    /// Events of this run applied (`last_seq - events` were never seen: `gaps`).
    #[serde(default)]
    pub events: u64,
    /// Server time (unix ms) of the last event, for the stall timeout.
    pub last_event_ms: Option<u64>,
    /// Queue position when accepted.
    pub position: Option<u32>,
    /// The run in progress.
    pub current_repeat: Option<u32>,
    /// Whether that run is a warmup.
    pub current_warmup: bool,
    /// Whether that run is the cold one (the first request after a model load).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub current_cold: bool,
    /// Text of the last finished measured repeat (the whole output once `job_done` arrived).
    pub output_text: String,
    /// Text of the measured repeat streaming now (or cut short): memory only, never written to KV (the
    /// stream holds every token; rewriting growing text per batch is what made KV cost grow
    /// with the square of the job).
    #[serde(skip)]
    pub live_text: String,
    /// Every finished run, warmups flagged.
    pub repeats: Vec<Metrics>,
    /// Over the measured runs.
    pub summary: Option<Summary>,
    /// Why it failed or was cancelled.
    pub error: Option<ErrorInfo>,
    /// Why the repeats stopped, from `job_done`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReason>,
    /// What was measured (prompt size, depth, output length), from `job_done`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Shape>,
    /// Events missing from its sequence (should stay 0).
    #[serde(default)]
    pub gaps: u64,
    /// `output_text` was cut to fit the KV value limit (the stream keeps every token).
    #[serde(default)]
    pub output_truncated: bool,
    /// Earlier runs of this job on this machine, oldest first (at most [`EARLIER_RUNS_KEPT`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_runs: Vec<EarlierRun>,
    /// Re-submissions of the job this machine refused after it had run it (the last refusal is
    /// in `refused`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refusals: u32,
    /// The last such refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<ErrorInfo>,
    /// What this run measured on: the newest of `job_accepted`, the first `job_started` and
    /// `job_done` that carried one (in stream order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    /// A matrix job: each cell this run finished or gave up (`cell_done`, then `job_done`),
    /// in the order they ended; one entry per cell key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cells: Vec<CellResult>,
    /// A matrix job: the cell of the run in progress (from `job_started`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_cell: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Most text of one streaming repeat held in memory per machine (the stream keeps all of it).
pub const LIVE_TEXT_MAX: usize = 1 << 20;

/// Earlier runs kept per machine; older ones are counted in `EarlierRun` order only.
pub const EARLIER_RUNS_KEPT: usize = 20;

/// A finished (or superseded) earlier run of the job on one machine.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct EarlierRun {
    /// Its run id.
    pub run_id: String,
    /// How it ended.
    pub status: RunStatus,
    /// Why it failed or was cancelled.
    pub error: Option<ErrorInfo>,
    /// Over its measured repeats.
    pub summary: Option<Summary>,
    /// Every repeat it finished.
    pub repeats: Vec<Metrics>,
    /// Server time (unix ms) of its last event.
    pub last_event_ms: Option<u64>,
    /// Its fingerprint's id (the whole fingerprint stays with the current run only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint_id: Option<String>,
}

impl MachineRun {
    /// A machine that has been sent the job.
    pub fn new(machine_id: &str) -> Self {
        Self {
            machine_id: machine_id.to_string(),
            label: None,
            engine: None,
            status: RunStatus::Queued,
            run_id: String::new(),
            last_seq: 0,
            events: 0,
            last_event_ms: None,
            position: None,
            current_repeat: None,
            current_warmup: false,
            current_cold: false,
            output_text: String::new(),
            live_text: String::new(),
            repeats: Vec::new(),
            summary: None,
            error: None,
            stop_reason: None,
            shape: None,
            gaps: 0,
            output_truncated: false,
            earlier_runs: Vec::new(),
            refusals: 0,
            refused: None,
            fingerprint: None,
            cells: Vec::new(),
            current_cell: None,
        }
    }

    /// Moves the current run into `earlier_runs` (failing it as superseded when it had not
    /// finished) and starts `run_id` afresh (`""`: a new run is being dispatched and its id is
    /// not known yet).
    pub fn begin_run(&mut self, run_id: &str) {
        if !self.run_id.is_empty() {
            if !self.status.is_terminal() {
                self.fail(ErrorInfo::new(
                    "superseded",
                    format!("run {run_id} of the same job started on this machine before this run finished"),
                ));
            }
            self.earlier_runs.push(EarlierRun {
                run_id: std::mem::take(&mut self.run_id),
                status: self.status,
                error: self.error.take(),
                summary: self.summary.take(),
                repeats: std::mem::take(&mut self.repeats),
                last_event_ms: self.last_event_ms,
                fingerprint_id: self.fingerprint.take().map(|f| f.fingerprint_id),
            });
            if self.earlier_runs.len() > EARLIER_RUNS_KEPT {
                self.earlier_runs.remove(0);
            }
        }
        let fresh = MachineRun::new(&self.machine_id);
        *self = MachineRun {
            run_id: run_id.to_string(),
            label: self.label.take(),
            engine: self.engine.take(),
            earlier_runs: std::mem::take(&mut self.earlier_runs),
            refusals: self.refusals,
            refused: self.refused.take(),
            ..fresh
        };
    }

    /// The text to show: the repeat streaming (or cut short by a failure) when there is one,
    /// else the last finished one.
    pub fn text(&self) -> &str {
        if self.live_text.is_empty() {
            &self.output_text
        } else {
            &self.live_text
        }
    }

    /// Marks it failed without an event (refused, offline, stalled).
    pub fn fail(&mut self, error: ErrorInfo) {
        self.status = RunStatus::Failed;
        self.error = Some(error);
        self.keep_cut_text();
    }

    /// A repeat cut short keeps what it streamed, in the stored record (a central restart must
    /// still show it).
    fn keep_cut_text(&mut self) {
        if !self.live_text.is_empty() {
            self.output_text = std::mem::take(&mut self.live_text);
        }
        self.current_repeat = None;
    }
}

/// A job as indexed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// The job.
    pub job_id: String,
    /// Unix ms it was submitted (central) or first seen (external).
    pub created_ms: u64,
    /// Who submitted it.
    pub source: Source,
    /// The job as submitted, when known.
    pub job: Option<Job>,
    /// Central is still gathering dispatch answers.
    pub dispatching: bool,
    /// Its machines, in dispatch (or first-seen) order.
    pub machines: Vec<MachineRun>,
    /// Highest stream sequence of its events seen.
    pub last_stream_seq: u64,
    /// Derived from the machines.
    pub status: JobStatus,
    /// Unix ms it last became finished.
    pub finished_ms: Option<u64>,
    /// Unix ms after which a dispatch that never completed (central killed, NATS gone) is
    /// given up: `dispatching` is cleared and machines that never answered are failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_deadline_ms: Option<u64>,
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It changed the record.
    Changed,
    /// Already applied (redelivery or a repeated refusal).
    Duplicate,
    /// An event of a run this machine has already moved past (counted, not applied).
    Stale,
    /// A `telemetry` sample: counted in the run's sequence (it holds a `seq`), nothing else
    /// the record shows changes. Never announced nor urgent: its counts are written with the
    /// next regular flush (at most one write per flush, however many samples), before the ack,
    /// so a crash never turns acknowledged samples into a gap.
    Sampled,
}

impl JobRecord {
    /// A job central is dispatching.
    pub fn dispatched(job_id: &str, job: Job, machines: &[String], now_ms: u64) -> Self {
        Self {
            job_id: job_id.to_string(),
            created_ms: now_ms,
            source: Source::Central,
            job: Some(job),
            dispatching: true,
            machines: machines.iter().map(|m| MachineRun::new(m)).collect(),
            last_stream_seq: 0,
            status: JobStatus::Running,
            finished_ms: None,
            dispatch_deadline_ms: None,
        }
    }

    /// A job first seen in the event stream.
    pub fn external(job_id: &str, seen_ms: u64) -> Self {
        Self {
            job_id: job_id.to_string(),
            created_ms: seen_ms,
            source: Source::External,
            job: None,
            dispatching: false,
            machines: Vec::new(),
            last_stream_seq: 0,
            status: JobStatus::Running,
            finished_ms: None,
            dispatch_deadline_ms: None,
        }
    }

    /// The machine's run, added when missing.
    pub fn machine_mut(&mut self, machine_id: &str) -> &mut MachineRun {
        let i = match self
            .machines
            .iter()
            .position(|m| m.machine_id == machine_id)
        {
            Some(i) => i,
            None => {
                self.machines.push(MachineRun::new(machine_id));
                self.machines.len() - 1
            }
        };
        &mut self.machines[i]
    }

    /// The machine's run.
    pub fn machine(&self, machine_id: &str) -> Option<&MachineRun> {
        self.machines.iter().find(|m| m.machine_id == machine_id)
    }

    /// True when no machine will send more and dispatch is over.
    pub fn is_finished(&self) -> bool {
        self.status != JobStatus::Running
    }

    /// Applies one event stored at `stream_seq` at server time `published_ms`.
    pub fn apply(&mut self, ev: &Event, stream_seq: u64, published_ms: u64) -> Applied {
        if stream_seq <= self.last_stream_seq {
            return Applied::Duplicate;
        }
        self.last_stream_seq = stream_seq;
        let warmups = self.job.as_ref().map(|j| j.warmup);
        let include_short = self.job.as_ref().is_some_and(|j| j.include_short);
        if let EventKind::JobAccepted(a) = &ev.kind {
            if self.job.is_none() {
                self.job = Some(a.job.clone());
            }
        }
        let known = self.machine(&ev.machine_id).is_some();
        let m = self.machine_mut(&ev.machine_id);
        let mut new_run = false;
        if ev.seq == 0 {
            // A refusal belongs to no run. Before any run it fails the machine (unless something
            // already ended it: dispatch saw the same refusal); after one, it is a refused
            // re-submission, recorded beside the run it leaves standing.
            if !m.run_id.is_empty() {
                if let EventKind::JobError(f) = &ev.kind {
                    m.refusals += 1;
                    m.refused = Some(f.error.clone().into());
                }
                return Applied::Changed;
            }
            if m.last_seq > 0 || m.status.is_terminal() {
                return Applied::Duplicate;
            }
        } else {
            if ev.run_id != m.run_id {
                if m.earlier_runs.iter().any(|r| r.run_id == ev.run_id) {
                    return Applied::Stale;
                }
                m.begin_run(&ev.run_id);
                new_run = true;
            }
            m.events += 1;
            m.last_seq = m.last_seq.max(ev.seq);
            m.gaps = m.last_seq - m.events.min(m.last_seq);
        }
        m.last_event_ms = Some(published_ms);
        match &ev.kind {
            EventKind::JobAccepted(a) => {
                m.label = Some(a.label.clone());
                m.engine = Some(a.engine.clone());
                m.position = Some(a.position);
                if a.fingerprint.is_some() {
                    m.fingerprint = a.fingerprint.clone();
                }
            }
            EventKind::JobStarted(s) => {
                if s.fingerprint.is_some() {
                    m.fingerprint = s.fingerprint.clone();
                }
                m.status = RunStatus::Running;
                m.current_repeat = Some(s.repeat_index);
                m.current_warmup = s.warmup;
                m.current_cold = s.cold;
                if m.current_cell != s.cell {
                    m.current_cell = s.cell.clone();
                }
                if !s.warmup && !s.cold {
                    m.live_text.clear();
                }
            }
            EventKind::LlmToken(t) => {
                // The run's own flags say whether it is measured: a cold run (index 0, before
                // any warmups) shifts the indices, so `index < warmup` no longer tells. Only
                // when its job_started never arrived does the index decide, as before.
                let unmeasured = if m.current_repeat == Some(t.repeat_index) {
                    m.current_warmup || m.current_cold
                } else {
                    warmups.is_some_and(|w| t.repeat_index < w)
                };
                if !unmeasured {
                    if m.live_text.len() + t.text.len() <= LIVE_TEXT_MAX {
                        m.live_text.push_str(&t.text);
                    } else {
                        // Memory per machine stays bounded whatever a (forged) stream sends.
                        m.output_truncated = true;
                    }
                }
            }
            EventKind::RepeatDone(metrics) => {
                if !metrics.warmup && !metrics.cold {
                    m.output_text = std::mem::take(&mut m.live_text);
                }
                // Kept in repeat_index order, one per index: the next run is appended, a
                // replayed or late one is put in its place (no sort of the whole list).
                match m
                    .repeats
                    .binary_search_by_key(&metrics.repeat_index, |r| r.repeat_index)
                {
                    Ok(i) => m.repeats[i] = metrics.clone(),
                    Err(i) => m.repeats.insert(i, metrics.clone()),
                }
                // A matrix job's machine summary is its first cell's (the one that ran
                // first), as in job_done; each cell's own is computed when the API is read.
                // So a run of a later cell costs nothing here, however many cells ran before.
                let first_cell = m.repeats.first().and_then(|r| r.cell.clone());
                if metrics.cell == first_cell {
                    m.summary = Some(match &first_cell {
                        None => Summary::of(&m.repeats, include_short),
                        Some(_) => {
                            let runs: Vec<&Metrics> =
                                m.repeats.iter().filter(|r| r.cell == first_cell).collect();
                            Summary::of_refs(&runs, include_short)
                        }
                    });
                }
            }
            EventKind::CellDone(c) => {
                // One entry per cell (a bounded list: the agent runs at most MAX_CELLS).
                match m.cells.iter().position(|x| x.cell == c.cell) {
                    Some(i) => m.cells[i] = c.clone(),
                    None if m.cells.len() < bench_schemas::matrix::MAX_CELLS => {
                        m.cells.push(c.clone())
                    }
                    None => {}
                }
            }
            EventKind::JobDone(d) => {
                if !d.cells.is_empty() {
                    m.cells = d.cells.clone();
                }
                m.status = RunStatus::Done;
                m.engine = Some(d.engine.clone());
                m.repeats = d.repeats.clone();
                m.summary = Some(d.summary.clone());
                m.output_text = d.output_text.clone();
                m.live_text = String::new();
                m.current_repeat = None;
                m.error = None;
                m.stop_reason = Some(d.stop_reason);
                m.shape = d.shape;
                if d.fingerprint.is_some() {
                    m.fingerprint = d.fingerprint.clone();
                }
            }
            EventKind::JobError(f) => {
                m.status = RunStatus::Failed;
                m.error = Some(f.error.clone().into());
                m.keep_cut_text();
            }
            EventKind::JobCancelled(c) => {
                m.status = RunStatus::Cancelled;
                m.error = Some(ErrorInfo::new("cancelled", c.reason.clone()));
                m.keep_cut_text();
            }
            // A sample that opened the machine or its run changed what the record shows.
            EventKind::Telemetry(_) if new_run || !known => {}
            EventKind::Telemetry(_) => return Applied::Sampled,
        }
        Applied::Changed
    }

    /// The record as KV bytes, at most `max` long: when it would be larger, output texts are
    /// cut (flagged `output_truncated`). None when even that does not fit.
    pub fn to_kv_bytes(&self, max: usize) -> Option<Vec<u8>> {
        let body = serde_json::to_vec(self).ok()?;
        if body.len() <= max {
            return Some(body);
        }
        let mut slim = self.clone();
        let text: usize = slim.machines.iter().map(|m| m.output_text.len()).sum();
        let budget = (max.saturating_sub(body.len() - text)) / slim.machines.len().max(1);
        for m in &mut slim.machines {
            if bench_schemas::truncate_utf8(&mut m.output_text, budget) {
                m.output_truncated = true;
            }
        }
        let body = serde_json::to_vec(&slim).ok()?;
        (body.len() <= max).then_some(body)
    }

    /// Recomputes `status` (and `finished_ms` when it becomes finished). Returns the old status.
    pub fn refresh_status(&mut self, now_ms: u64) -> JobStatus {
        let old = self.status;
        self.status = derive_status(self.dispatching, &self.machines);
        if self.status != JobStatus::Running
            && (old == JobStatus::Running || self.finished_ms.is_none())
        {
            self.finished_ms = Some(now_ms);
        }
        if self.status == JobStatus::Running {
            self.finished_ms = None;
        }
        old
    }
}

fn derive_status(dispatching: bool, machines: &[MachineRun]) -> JobStatus {
    if dispatching || machines.iter().any(|m| !m.status.is_terminal()) {
        return JobStatus::Running;
    }
    let done = machines
        .iter()
        .filter(|m| m.status == RunStatus::Done)
        .count();
    let cancelled = machines
        .iter()
        .filter(|m| m.status == RunStatus::Cancelled)
        .count();
    if !machines.is_empty() && done == machines.len() {
        JobStatus::Done
    } else if done > 0 {
        JobStatus::Partial
    } else if !machines.is_empty() && cancelled == machines.len() {
        JobStatus::Cancelled
    } else {
        JobStatus::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bench_schemas::event::{Accepted, Cancelled, Started, Token};

    fn ev(machine: &str, seq: u64, kind: EventKind) -> Event {
        run_ev(machine, "b1-1", seq, kind)
    }

    fn run_ev(machine: &str, run: &str, seq: u64, kind: EventKind) -> Event {
        Event {
            job_id: "j".into(),
            machine_id: machine.into(),
            run_id: if seq == 0 { String::new() } else { run.into() },
            seq,
            ts_ms: 1,
            kind,
        }
    }

    fn done() -> EventKind {
        EventKind::JobDone(bench_schemas::event::Done {
            cells: Vec::new(),
            model: "m".into(),
            engine: "mock".into(),
            ttft_ms: 1.0,
            gen_tokens: 1,
            gen_tokens_per_s: None,
            total_ms: 1.0,
            token_count_source: bench_schemas::TokenCountSource::Mock,
            repeats: Vec::new(),
            summary: Summary::default(),
            output_text: "first".into(),
            pp_tokens_per_s: None,
            tg_tokens_per_s: None,
            shape: None,
            stop_reason: Default::default(),
            fingerprint: None,
        })
    }

    #[test]
    fn a_reused_job_id_is_a_new_run() {
        let mut r = JobRecord::external("j", 0);
        r.apply(&run_ev("a", "b1-1", 1, accepted()), 1, 0);
        r.apply(&run_ev("a", "b1-1", 2, done()), 2, 0);
        r.refresh_status(1);
        assert_eq!(r.status, JobStatus::Done);
        // The second run: same job, same machine, its own run id and seq from 1.
        assert_eq!(
            r.apply(&run_ev("a", "b1-2", 1, accepted()), 3, 0),
            Applied::Changed
        );
        r.refresh_status(2);
        let m = r.machine("a").unwrap();
        assert_eq!(
            (m.run_id.as_str(), m.status, m.last_seq),
            ("b1-2", RunStatus::Queued, 1)
        );
        assert_eq!(m.earlier_runs.len(), 1);
        assert_eq!(m.earlier_runs[0].run_id, "b1-1");
        assert_eq!(m.earlier_runs[0].status, RunStatus::Done);
        assert_eq!((r.status, r.finished_ms), (JobStatus::Running, None));
        // A late event of the first run is not mixed into the second.
        assert_eq!(
            r.apply(&run_ev("a", "b1-1", 3, done()), 4, 0),
            Applied::Stale
        );
        // A refused re-submission leaves the run standing and is recorded.
        let refusal = EventKind::JobError(bench_schemas::event::Failed {
            error: bench_schemas::ErrorBody::new(bench_schemas::ErrorCode::QueueFull, "full"),
            repeat_index: None,
        });
        assert_eq!(
            r.apply(&run_ev("a", "", 0, refusal), 5, 0),
            Applied::Changed
        );
        let m = r.machine("a").unwrap();
        assert_eq!((m.status, m.refusals), (RunStatus::Queued, 1));
        assert_eq!(m.refused.as_ref().unwrap().code, "queue_full");
        // A new run while one is unfinished supersedes it (its agent restarted, say).
        r.apply(&run_ev("a", "b2-1", 1, accepted()), 6, 0);
        let m = r.machine("a").unwrap();
        assert_eq!(m.earlier_runs[1].status, RunStatus::Failed);
        assert_eq!(m.earlier_runs[1].error.as_ref().unwrap().code, "superseded");
    }

    #[test]
    fn gaps_count_sequence_numbers_never_seen() {
        let mut r = JobRecord::external("j", 0);
        r.apply(&ev("a", 1, accepted()), 1, 0);
        let started = |i| {
            EventKind::JobStarted(Started {
                cell: None,
                stream: None,
                repeat_index: i,
                warmup: false,
                cold: false,
                fingerprint: None,
            })
        };
        r.apply(&ev("a", 3, started(1)), 2, 0);
        assert_eq!(r.machine("a").unwrap().gaps, 1);
        // Late, not lost: it arrives after all and closes the gap.
        r.apply(&ev("a", 2, started(0)), 3, 0);
        assert_eq!(r.machine("a").unwrap().gaps, 0);
    }

    fn accepted() -> EventKind {
        EventKind::JobAccepted(Accepted {
            job: Job::new("m", "p"),
            position: 0,
            engine: "mock".into(),
            engine_url: String::new(),
            label: "A".into(),
            agent_version: "0".into(),
            fingerprint: None,
        })
    }

    #[test]
    fn redelivery_is_a_no_op() {
        let mut r = JobRecord::external("j", 0);
        assert_eq!(r.apply(&ev("a", 1, accepted()), 10, 0), Applied::Changed);
        let started = ev(
            "a",
            2,
            EventKind::JobStarted(Started {
                cell: None,
                stream: None,
                repeat_index: 0,
                warmup: false,
                cold: false,
                fingerprint: None,
            }),
        );
        let token = ev(
            "a",
            3,
            EventKind::LlmToken(Token {
                repeat_index: 0,
                text: "hi".into(),
                tokens: Some(1),
                t_ms: 1.0,
            }),
        );
        r.apply(&started, 11, 0);
        r.apply(&token, 12, 0);
        let before = r.clone();
        assert_eq!(r.apply(&token, 12, 0), Applied::Duplicate);
        assert_eq!(r.apply(&started, 11, 0), Applied::Duplicate);
        assert_eq!(r, before);
        assert_eq!(r.machines[0].text(), "hi");
        assert_eq!(r.job.as_ref().map(|j| j.model.as_str()), Some("m"));
    }

    #[test]
    fn a_cold_run_and_warmups_are_not_the_text_shown() {
        // warmup 0 and the model not loaded: the agent runs a cold request at index 0 first,
        // so index 0 is not measured although `0 < warmup` is false.
        let mut r = JobRecord::dispatched("j", Job::new("m", "p"), &["a".into()], 0);
        let started = |i, warmup, cold| {
            EventKind::JobStarted(Started {
                cell: None,
                stream: None,
                repeat_index: i,
                warmup,
                cold,
                fingerprint: None,
            })
        };
        let token = |i, text: &str| {
            EventKind::LlmToken(Token {
                repeat_index: i,
                text: text.into(),
                tokens: Some(1),
                t_ms: 1.0,
            })
        };
        let mut seq = 0;
        let mut apply = |r: &mut JobRecord, kind| {
            seq += 1;
            r.apply(&ev("a", seq, kind), seq, 0)
        };
        apply(&mut r, accepted());
        apply(&mut r, started(0, false, true));
        apply(&mut r, token(0, "cold"));
        assert_eq!(r.machine("a").unwrap().text(), "");
        let mut cold = metrics_at(0);
        cold.cold = true;
        apply(&mut r, EventKind::RepeatDone(cold));
        apply(&mut r, started(1, false, false));
        apply(&mut r, token(1, "warm"));
        assert_eq!(r.machine("a").unwrap().text(), "warm");
        apply(&mut r, EventKind::RepeatDone(metrics_at(1)));
        let m = r.machine("a").unwrap();
        assert_eq!(m.output_text, "warm");
        let s = m.summary.as_ref().unwrap();
        assert_eq!(s.repeats, 1);
        assert!(s.cold.is_some());
    }

    fn metrics_at(i: u32) -> Metrics {
        Metrics {
            cell: None,
            start_ms: None,
            stream: None,
            repeat_index: i,
            warmup: false,
            cold: false,
            ttft_ms: 10.0,
            ttfot_ms: Some(10.0),
            total_ms: 20.0,
            gen_tokens: 2,
            token_count_source: bench_schemas::TokenCountSource::Mock,
            streamed_tokens: 2,
            gen_tokens_per_s: Some(100.0),
            tpot_ms: Some(10.0),
            itl_ms: None,
            prompt_tokens: None,
            prompt_tokens_per_s: None,
            prompt_evaluated: None,
            prompt_cache_hit: false,
            pp_tokens_per_s: None,
            tg_tokens_per_s: Some(100.0),
            load_ms: None,
            engine_gen_tokens_per_s: None,
            engine_prompt_tokens_per_s: None,
            engine_gen_ms: None,
            engine_prompt_ms: None,
            engine_total_ms: None,
            chunks: 2,
            output_chars: 4,
            done_reason: None,
            short_output: false,
            null_reason: None,
            telemetry: None,
        }
    }

    #[test]
    fn a_matrix_machine_summary_is_its_first_cell_and_runs_stay_in_order() {
        let mut r = JobRecord::external("j", 0);
        r.apply(&ev("a", 1, accepted()), 1, 0);
        let at = |i: u32, cell: &str, rate: f64| {
            let mut m = metrics_at(i);
            m.cell = Some(cell.into());
            m.gen_tokens_per_s = Some(rate);
            EventKind::RepeatDone(m)
        };
        // Interleaved cells, one arriving out of order: runs sorted, one per index.
        for (seq, (i, cell, rate)) in [
            (0, "c=1", 10.0),
            (2, "c=1", 12.0),
            (1, "c=2", 50.0),
            (3, "c=2", 52.0),
            (2, "c=1", 12.0),
        ]
        .into_iter()
        .enumerate()
        {
            let seq = seq as u64 + 2;
            r.apply(&ev("a", seq, at(i, cell, rate)), seq, 0);
        }
        let m = r.machine("a").unwrap();
        let idx: Vec<u32> = m.repeats.iter().map(|x| x.repeat_index).collect();
        assert_eq!(idx, [0, 1, 2, 3]);
        let s = m.summary.as_ref().unwrap();
        assert_eq!(s.repeats, 2);
        assert_eq!(s.gen_tokens_per_s.unwrap().median, 11.0);
    }

    #[test]
    fn oversized_records_are_cut_to_fit() {
        let mut r = JobRecord::external("j", 0);
        r.machine_mut("a").output_text = "é".repeat(10_000);
        r.machine_mut("b").output_text = "x".repeat(100);
        assert!(r.to_kv_bytes(1 << 20).unwrap().len() > 20_000);
        let cut: JobRecord = serde_json::from_slice(&r.to_kv_bytes(4_000).unwrap()).unwrap();
        assert!(cut.machines[0].output_truncated && cut.machines[0].output_text.len() < 2_000);
        assert!(!cut.machines[1].output_truncated);
        assert!(r.to_kv_bytes(10).is_none());
    }

    #[test]
    fn status_over_machines() {
        let mut r = JobRecord::dispatched("j", Job::new("m", "p"), &["a".into(), "b".into()], 0);
        r.dispatching = false;
        r.refresh_status(1);
        assert_eq!(r.status, JobStatus::Running);
        r.machine_mut("a").fail(ErrorInfo::new("offline", "x"));
        r.apply(
            &ev(
                "b",
                1,
                EventKind::JobCancelled(Cancelled {
                    repeat_index: None,
                    reason: "r".into(),
                }),
            ),
            1,
            0,
        );
        r.refresh_status(2);
        assert_eq!((r.status, r.finished_ms), (JobStatus::Failed, Some(2)));
        // A late accept from the machine reported offline re-opens the job.
        r.apply(&ev("a", 1, accepted()), 2, 0);
        r.refresh_status(3);
        assert_eq!((r.status, r.finished_ms), (JobStatus::Running, None));
    }
}
