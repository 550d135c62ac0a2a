//! Samples the machine while a job runs (see [`bench_schemas::telemetry`]): a thread reads
//! every [`probe::Probe`] at the configured interval (4 Hz by default), publishes each sample
//! as a `telemetry` event and keeps a bounded ring of readings from which each repeat's
//! [`bench_schemas::TelemetrySummary`] (means, peaks, energy over the decode window) is built.

pub mod probe;
pub mod probes;
pub mod sampler;

use std::path::PathBuf;
use std::time::Duration;

/// Where Apple power comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApplePower {
    /// `macmon` when installed, else `powermetrics` when the agent may run it (root).
    #[default]
    Auto,
    /// Only `macmon pipe`.
    Macmon,
    /// Only `powermetrics` (needs root).
    Powermetrics,
    /// No Apple power.
    Off,
}

/// `telemetry:` in agent.yaml, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// Sample during jobs at all.
    pub enabled: bool,
    /// Between samples (default 250 ms = 4 Hz; bounded to 50 ms..10 s).
    pub interval: Duration,
    /// Linux powercap root for RAPL (default `/sys/class/powercap`).
    pub rapl_root: PathBuf,
    /// Ask NVML (loaded at run time; absent driver = no NVIDIA source).
    pub nvml: bool,
    /// Apple power source.
    pub apple_power: ApplePower,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_millis(250),
            rapl_root: PathBuf::from("/sys/class/powercap"),
            nvml: true,
            apple_power: ApplePower::Auto,
        }
    }
}
