//! What the machine was doing while a job ran: `telemetry` events (one sample each, at the
//! agent's `telemetry.interval_ms`, 4 Hz by default) on the job's own subject, and per repeat a
//! [`TelemetrySummary`] in its metrics. Every number names its source in `sources`; a number
//! no source gives is absent, never zero.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One GPU at one instant.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct GpuSample {
    /// Which GPU (as in the fingerprint).
    pub index: u32,
    /// Busy %, 0-100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub util_pct: Option<f64>,
    /// Memory in use, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_used_bytes: Option<u64>,
    /// Board power, watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
    /// Temperature, °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_c: Option<f64>,
    /// Graphics/SM clock, MHz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_mhz: Option<u32>,
    /// Memory clock, MHz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_clock_mhz: Option<u32>,
}

/// `telemetry`: one sample of the machine.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Sample {
    /// The run in progress when it was taken (none between runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_index: Option<u32>,
    /// Ms since sampling began for this job (monotonic clock).
    pub t_ms: f64,
    /// CPU busy % over all logical CPUs, 0-100, since the previous sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pct: Option<f64>,
    /// Memory in use, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_used_bytes: Option<u64>,
    /// CPU package power, watts (RAPL, powermetrics, macmon), since the previous sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_power_w: Option<f64>,
    /// Every power source together (CPU package + GPUs, or Apple's combined power), watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
    /// Per GPU.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuSample>,
    /// Which source gave each group of numbers: `cpu` -> `sysinfo`, `cpu_power` -> `rapl`,
    /// `gpu` -> `nvml`, ...
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, String>,
}

/// Mean and peak of one quantity over a window.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct MeanPeak {
    /// Mean over the samples.
    pub mean: f64,
    /// Largest sample.
    pub peak: f64,
}

impl MeanPeak {
    /// Of the finite values, or None when there are none.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let (mut n, mut sum, mut peak) = (0u32, 0.0, f64::NEG_INFINITY);
        for v in values.into_iter().filter(|v| v.is_finite()) {
            n += 1;
            sum += v;
            peak = peak.max(v);
        }
        (n > 0).then(|| Self {
            mean: sum / f64::from(n),
            peak,
        })
    }
}

/// One repeat's telemetry: over the samples taken during the run, and energy over its decode
/// window (first to last content chunk).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct TelemetrySummary {
    /// Samples taken during the run.
    pub samples: u32,
    /// CPU busy %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_pct: Option<MeanPeak>,
    /// Memory in use, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_used_bytes: Option<MeanPeak>,
    /// Busiest GPU's busy %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_util_pct: Option<MeanPeak>,
    /// GPU memory in use over all GPUs, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mem_used_bytes: Option<MeanPeak>,
    /// Hottest GPU, °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_temp_c: Option<MeanPeak>,
    /// Total power, watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<MeanPeak>,
    /// Energy over the decode window, joules (every power source together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_j: Option<f64>,
    /// `energy_j` / tokens generated in the decode window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joules_per_token: Option<f64>,
    /// Tokens generated in the decode window / `energy_j`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_joule: Option<f64>,
    /// The decode window, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_window_ms: Option<f64>,
    /// Where the power came from (`rapl`, `nvml`, `rapl+nvml`, `powermetrics`, `macmon`);
    /// absent means no sensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_source: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_peak_skip_non_finite() {
        let m = MeanPeak::of([1.0, f64::NAN, 3.0]).unwrap();
        assert_eq!((m.mean, m.peak), (2.0, 3.0));
        assert!(MeanPeak::of([]).is_none());
    }

    #[test]
    fn a_sample_without_sources_is_small() {
        let s = Sample {
            t_ms: 250.0,
            cpu_pct: Some(12.5),
            ..Sample::default()
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"t_ms":250.0,"cpu_pct":12.5}"#
        );
    }
}
