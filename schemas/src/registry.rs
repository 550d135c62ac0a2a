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

/// The machine an agent runs on (see [`crate::fingerprint`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Hardware {
    /// CPU model name (Apple: `machdep.cpu.brand_string`).
    pub cpu: String,
    /// Logical CPUs.
    pub cores: u32,
    /// Physical cores, where the OS says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_cores: Option<u32>,
    /// Physical memory in bytes.
    pub memory_bytes: u64,
    /// `linux`, `macos`, `windows`, ...
    pub os: String,
    /// OS name and version (`Debian GNU/Linux 12`, `macOS 15.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// Kernel version (`6.1.0-27-amd64`, Darwin `24.1.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    /// `x86_64`, `aarch64`, ...
    pub arch: String,
    /// Free text from config (`RTX 4090`, `M4 Max`), if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// Apple Silicon chip (`Apple M4 Max`), from `system_profiler`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chip: Option<String>,
    /// GPUs found (NVML, `system_profiler`, `amd-smi`/`rocm-smi`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<crate::fingerprint::Gpu>,
    /// Sources that did not answer, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<crate::fingerprint::Missing>,
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
    /// The default backend's engine (kind, server, version, build), once it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_info: Option<crate::fingerprint::EngineInfo>,
    /// Telemetry sources this agent samples during jobs (`cpu` -> `sysinfo`, `gpu` -> `nvml`);
    /// no `power` key means no power sensor.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub telemetry: BTreeMap<String, String>,
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
    /// The public nkey (`U...`) this agent signs its events with (header
    /// [`crate::subjects::SIGNATURE_HEADER`]). Central learns a machine's keys only from here: under
    /// `nats/conf/auth.conf` only that agent may write its entry. Absent from agents that do not
    /// sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
}
