//! What an agent keeps fresh in the `bench_agents` KV bucket (key = machine_id).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Agent status as the fleet sees it. `offline` is never written by an agent: it is what a
/// reader concludes when the key expired or its heartbeat is stale.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Waiting for work.
    Idle,
    /// Running a job.
    Busy,
    /// Not heart-beating.
    Offline,
}

/// The machine an agent runs on.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Hardware {
    /// CPU model name.
    pub cpu: String,
    /// Logical CPUs.
    pub cores: u32,
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// `linux`, `macos`, ...
    pub os: String,
    /// `x86_64`, `aarch64`, ...
    pub arch: String,
    /// Free text from config (`RTX 4090`, `M4 Max`), if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
}

/// One heartbeat.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct AgentInfo {
    /// The agent's id.
    pub machine_id: String,
    /// Human-readable name.
    pub label: String,
    /// idle or busy.
    pub status: AgentStatus,
    /// Backend kind of the default backend: `ollama`, `openai`, `mock`.
    pub engine: String,
    /// Models the agent offers.
    pub models: Vec<String>,
    /// Machine facts.
    pub hardware: Hardware,
    /// Selector labels from config.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Agent version.
    pub version: String,
    /// Random id of this agent process, new at every start: a run whose `run_id` names another
    /// boot ([`crate::subjects::boot_of`]) will never finish (the agent restarted and lost it).
    #[serde(default)]
    pub boot_id: String,
    /// Unix ms of this heartbeat.
    pub ts_ms: u64,
    /// Seconds between heartbeats.
    pub heartbeat_s: f64,
    /// The running job, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_job: Option<String>,
    /// Jobs waiting behind it.
    #[serde(default)]
    pub queued: u32,
}
