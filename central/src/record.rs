//! What central keeps per job in the `bench_jobs` bucket, and how one event changes it.
//!
//! Applying is idempotent: each machine's events carry a gapless `seq`, and an event whose
//! `seq` is not past the machine's `last_seq` was applied already (a redelivery) and is skipped.

use crate::error::ErrorInfo;
use bench_schemas::{Event, EventKind, Job, Metrics, Summary};
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
    /// Highest event `seq` applied.
    pub last_seq: u64,
    /// Server time (unix ms) of the last event, for the stall timeout.
    pub last_event_ms: Option<u64>,
    /// Queue position when accepted.
    pub position: Option<u32>,
    /// The run in progress.
    pub current_repeat: Option<u32>,
    /// Whether that run is a warmup.
    pub current_warmup: bool,
    /// Text of the last measured repeat so far.
    pub output_text: String,
    /// Every finished run, warmups flagged.
    pub repeats: Vec<Metrics>,
    /// Over the measured runs.
    pub summary: Option<Summary>,
    /// Why it failed or was cancelled.
    pub error: Option<ErrorInfo>,
    /// Events missing from its sequence (should stay 0).
    #[serde(default)]
    pub gaps: u64,
    /// `output_text` was cut to fit the KV value limit (the stream keeps every token).
    #[serde(default)]
    pub output_truncated: bool,
}

impl MachineRun {
    /// A machine that has been sent the job.
    pub fn new(machine_id: &str) -> Self {
        Self {
            machine_id: machine_id.to_string(),
            label: None,
            engine: None,
            status: RunStatus::Queued,
            last_seq: 0,
            last_event_ms: None,
            position: None,
            current_repeat: None,
            current_warmup: false,
            output_text: String::new(),
            repeats: Vec::new(),
            summary: None,
            error: None,
            gaps: 0,
            output_truncated: false,
        }
    }

    /// Marks it failed without an event (refused, offline, stalled).
    pub fn fail(&mut self, error: ErrorInfo) {
        self.status = RunStatus::Failed;
        self.error = Some(error);
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
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It changed the record.
    Changed,
    /// Already applied (redelivery or a repeated refusal).
    Duplicate,
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
        self.last_stream_seq = self.last_stream_seq.max(stream_seq);
        let warmups = self.job.as_ref().map(|j| j.warmup);
        if let EventKind::JobAccepted(a) = &ev.kind {
            if self.job.is_none() {
                self.job = Some(a.job.clone());
            }
        }
        let m = self.machine_mut(&ev.machine_id);
        if ev.seq == 0 {
            // A refusal, outside the job's sequence: it only counts for a machine that never
            // accepted this job (a duplicate submission's refusal must not fail the original).
            if m.last_seq > 0 || m.status.is_terminal() {
                return Applied::Duplicate;
            }
        } else if ev.seq <= m.last_seq {
            return Applied::Duplicate;
        } else {
            m.gaps += ev.seq - m.last_seq - 1;
            m.last_seq = ev.seq;
        }
        m.last_event_ms = Some(published_ms);
        match &ev.kind {
            EventKind::JobAccepted(a) => {
                m.label = Some(a.label.clone());
                m.engine = Some(a.engine.clone());
                m.position = Some(a.position);
                if m.status == RunStatus::Failed
                    && m.error
                        .as_ref()
                        .is_some_and(|e| e.code == "offline" || e.code == "timeout")
                {
                    // The answer was late, not missing: the machine is running it after all.
                    m.error = None;
                    m.status = RunStatus::Queued;
                }
            }
            EventKind::JobStarted(s) => {
                m.status = RunStatus::Running;
                m.current_repeat = Some(s.repeat_index);
                m.current_warmup = s.warmup;
                if !s.warmup {
                    m.output_text.clear();
                }
            }
            EventKind::LlmToken(t) => {
                let warmup = match warmups {
                    Some(w) => t.repeat_index < w,
                    None => m.current_warmup && m.current_repeat == Some(t.repeat_index),
                };
                if !warmup {
                    m.output_text.push_str(&t.text);
                }
            }
            EventKind::RepeatDone(metrics) => {
                m.repeats.retain(|r| r.repeat_index != metrics.repeat_index);
                m.repeats.push(metrics.clone());
                m.repeats.sort_by_key(|r| r.repeat_index);
                m.summary = Some(Summary::of(&m.repeats));
            }
            EventKind::JobDone(d) => {
                m.status = RunStatus::Done;
                m.engine = Some(d.engine.clone());
                m.repeats = d.repeats.clone();
                m.summary = Some(d.summary.clone());
                m.output_text = d.output_text.clone();
                m.current_repeat = None;
                m.error = None;
            }
            EventKind::JobError(f) => {
                m.status = RunStatus::Failed;
                m.error = Some(f.error.clone().into());
                m.current_repeat = None;
            }
            EventKind::JobCancelled(c) => {
                m.status = RunStatus::Cancelled;
                m.error = Some(ErrorInfo::new("cancelled", c.reason.clone()));
                m.current_repeat = None;
            }
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
            if m.output_text.len() > budget {
                let mut cut = budget;
                while !m.output_text.is_char_boundary(cut) {
                    cut -= 1;
                }
                m.output_text.truncate(cut);
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
        Event {
            job_id: "j".into(),
            machine_id: machine.into(),
            seq,
            ts_ms: 1,
            kind,
        }
    }

    fn accepted() -> EventKind {
        EventKind::JobAccepted(Accepted {
            job: Job::new("m", "p"),
            position: 0,
            engine: "mock".into(),
            engine_url: String::new(),
            label: "A".into(),
            agent_version: "0".into(),
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
                repeat_index: 0,
                warmup: false,
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
        assert_eq!(r.machines[0].output_text, "hi");
        assert_eq!(r.job.as_ref().map(|j| j.model.as_str()), Some("m"));
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
