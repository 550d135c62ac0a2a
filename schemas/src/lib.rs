//! The bench-race wire contract, shared by the agent, central and every test.
//!
//! Layout: [`ids`] validates the identifiers that become subject tokens; [`subjects`] is the one
//! place that builds NATS subjects, stream and bucket names; [`job`] is what a client submits;
//! [`reply`] is the agent's immediate answer to a request; [`event`] is the envelope and every
//! event type an agent publishes on `bench.events.<job_id>`; [`metrics`] defines each number a
//! benchmark reports and how repeats are summarised; [`registry`] is what an agent keeps in the
//! `bench_agents` KV bucket; [`fingerprint`] is what a result was measured on; [`telemetry`] is
//! what the machine did meanwhile. Data flows job -> reply -> events (started, tokens, repeat_done,
//! job_done | job_error | job_cancelled).
//!
//! This crate depends on serde only, so that any program can speak the contract.

pub mod error;
pub mod event;
pub mod fingerprint;
pub mod ids;
pub mod job;
pub mod matrix;
pub mod metrics;
pub mod registry;
pub mod reply;
pub mod subjects;
pub mod telemetry;

pub use error::{ErrorBody, ErrorCode};
pub use event::{Event, EventKind};
pub use fingerprint::{Change, EngineInfo, Fingerprint, Gpu, Missing, ModelInfo, Settings};
pub use ids::{validate_job_id, validate_machine_id, IdError};
pub use job::{CacheMode, Job, JobLimits, Mode, Profile, Repeat, Selector, Shape, StartMode};
pub use matrix::{Cell, CellResult, CellStatus, Load, Matrix, Order, Slo};
pub use metrics::{ColdRun, Metrics, Percentiles, Separation, Stats, Summary, TokenCountSource};
pub use registry::{AgentInfo, AgentStatus, Hardware};
pub use reply::JobReply;
pub use telemetry::{GpuSample, MeanPeak, Sample, TelemetrySummary};

/// Cuts `s` to at most `max` bytes on a character boundary; true when it cut. Every bound on
/// text that crosses the wire (messages, outputs) uses this one.
pub fn truncate_utf8(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    true
}

/// The only test type this version runs.
pub const TEST_LLM_GENERATE: &str = "llm_generate";

#[cfg(test)]
mod tests {
    #[test]
    fn truncates_on_a_char_boundary() {
        let mut s = "aé".repeat(3);
        assert!(super::truncate_utf8(&mut s, 4));
        assert_eq!(s, "aéa");
        assert!(!super::truncate_utf8(&mut s, 4));
    }
}
