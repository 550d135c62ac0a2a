//! The event envelope and every event type an agent publishes on `bench.events.<job_id>`.
//!
//! On the wire: `{"job_id","machine_id","run_id","seq","ts_ms","type","payload"}` with the header
//! `Nats-Msg-Id: <job_id>.<machine_id>.<run_id>.<seq>`. Every acceptance of a job on a machine
//! is a run with its own `run_id` (a re-used `job_id` is a new run, never a retry). `seq` starts
//! at 1 per run and has no gaps, so a reader can tell a missing event from a late one.

use crate::error::ErrorBody;
use crate::fingerprint::Fingerprint;
use crate::job::{Job, Shape};
use crate::matrix::CellResult;
use crate::metrics::{Metrics, Summary, TokenCountSource};
use crate::telemetry::Sample;
use serde::{Deserialize, Serialize};

/// One event.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Event {
    /// The job.
    pub job_id: String,
    /// The machine that produced it.
    pub machine_id: String,
    /// The run on that machine: `<boot_id>-<n>` ([`crate::subjects::run_id`]). Empty only on
    /// refusals (`seq` 0), which belong to no run.
    #[serde(default)]
    pub run_id: String,
    /// 1-based, per run, gapless; 0 for a refusal.
    pub seq: u64,
    /// Unix ms on the agent's wall clock (for display; metrics use the monotonic clock).
    pub ts_ms: u64,
    /// `type` and `payload`.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The event types, tagged `type` with their data under `payload`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", content = "payload", rename_all = "snake_case")]
// `job_done` is the large one and there is one per run: boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum EventKind {
    /// The agent queued the job.
    JobAccepted(Accepted),
    /// One run (warmup or measured) begins.
    JobStarted(Started),
    /// Generated text, batched.
    LlmToken(Token),
    /// One run finished, with its metrics.
    RepeatDone(Metrics),
    /// Every run finished.
    JobDone(Done),
    /// The job failed; no more events follow for this machine.
    JobError(Failed),
    /// The job was cancelled; no more events follow for this machine.
    JobCancelled(Cancelled),
    /// One sample of the machine while the job runs.
    Telemetry(Sample),
    /// One matrix cell finished on this machine (or could not run): its result.
    CellDone(CellResult),
}

impl EventKind {
    /// The wire name of the type.
    pub fn name(&self) -> &'static str {
        match self {
            Self::JobAccepted(_) => "job_accepted",
            Self::JobStarted(_) => "job_started",
            Self::LlmToken(_) => "llm_token",
            Self::RepeatDone(_) => "repeat_done",
            Self::JobDone(_) => "job_done",
            Self::JobError(_) => "job_error",
            Self::JobCancelled(_) => "job_cancelled",
            Self::Telemetry(_) => "telemetry",
            Self::CellDone(_) => "cell_done",
        }
    }

    /// True for the last event a machine sends for a job.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::JobDone(_) | Self::JobError(_) | Self::JobCancelled(_)
        )
    }
}

/// `job_accepted`: the whole job (so a job submitted with the `nats` CLI can be recorded by
/// anyone reading the stream) and what will run it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The job as the agent will run it (with its `job_id`).
    pub job: Job,
    /// Jobs ahead of it on this agent.
    pub position: u32,
    /// Backend kind: `ollama`, `openai`, `mock`.
    pub engine: String,
    /// The engine's address (empty for mock).
    pub engine_url: String,
    /// The agent's label.
    pub label: String,
    /// Agent version.
    pub agent_version: String,
    /// What the job runs on: machine, engine, model, effective settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
}

/// `job_started`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Started {
    /// 0-based over all runs, warmups first.
    pub repeat_index: u32,
    /// Whether this run is a warmup.
    pub warmup: bool,
    /// Whether this is the first request after a model load (reported apart).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold: bool,
    /// On the first run only: the fingerprint as asked of the engine right before it (the
    /// one in `job_accepted` came from the agent's cache and may be absent or older).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    /// The matrix cell this run belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<String>,
    /// Load cells: which stream runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<u32>,
}

/// `llm_token`: a batch of generated text.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Token {
    /// Which run.
    pub repeat_index: u32,
    /// The text.
    pub text: String,
    /// Tokens in this batch, when the engine says (one per streamed chunk on Ollama and
    /// llama.cpp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Ms since the request was sent, at the last chunk of the batch.
    #[serde(deserialize_with = "crate::metrics::nullable_f64")]
    pub t_ms: f64,
}

/// `job_done`: every run's metrics, their summary, and the original's top-level fields (the
/// medians over measured runs).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Done {
    /// Model.
    pub model: String,
    /// Backend kind.
    pub engine: String,
    /// Median TTFT.
    #[serde(deserialize_with = "crate::metrics::nullable_f64")]
    pub ttft_ms: f64,
    /// Median generated tokens.
    pub gen_tokens: u64,
    /// Median decode rate.
    pub gen_tokens_per_s: Option<f64>,
    /// Median total time.
    #[serde(deserialize_with = "crate::metrics::nullable_f64")]
    pub total_ms: f64,
    /// Where token counts came from.
    pub token_count_source: TokenCountSource,
    /// Every run, warmups included (flagged).
    pub repeats: Vec<Metrics>,
    /// Over the measured runs.
    pub summary: Summary,
    /// The full output of the last measured run.
    pub output_text: String,
    /// Median llama-bench `pp` (prompt tokens/s).
    #[serde(default)]
    pub pp_tokens_per_s: Option<f64>,
    /// Median llama-bench `tg` (generated tokens/s).
    #[serde(default)]
    pub tg_tokens_per_s: Option<f64>,
    /// What was measured: prompt size, depth, output length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<Shape>,
    /// Why the repeats stopped.
    #[serde(default)]
    pub stop_reason: StopReason,
    /// What the runs were measured on (as in the first `job_started`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    /// A matrix job: every cell's result, in cell order (the top-level fields then describe
    /// the first cell that finished).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cells: Vec<CellResult>,
}

/// Why a machine stopped repeating.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// It ran the `repeat` the job asked for.
    #[default]
    Count,
    /// `repeat: "auto"`: the decode rate's interval reached `target_ci_pct`.
    Precision,
    /// `repeat: "auto"`: its interval separated from every other racer's.
    Decided,
    /// `repeat: "auto"`: it reached `max_repeat` first.
    MaxRepeat,
}

/// `job_error`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Failed {
    /// What went wrong.
    #[serde(flatten)]
    pub error: ErrorBody,
    /// The run it happened in, if one had started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_index: Option<u32>,
}

/// `job_cancelled`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Cancelled {
    /// The run that was interrupted, if one was running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_index: Option<u32>,
    /// Who or what cancelled.
    pub reason: String,
}
