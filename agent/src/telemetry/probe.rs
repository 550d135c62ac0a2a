//! One source of telemetry. Each probe adds what it can read to a [`Reading`]; a probe that
//! cannot read at all is never built (it is reported as `missing` instead).

use bench_schemas::GpuSample;
use std::time::Instant;

/// One GPU's numbers in a reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReading {
    /// What goes on the wire.
    pub sample: GpuSample,
    /// Cumulative energy counter, joules, where the source has one (NVML
    /// `total_energy_consumption`): preferred to integrating `power_w`.
    pub energy_j: Option<f64>,
}

/// Every source's numbers at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// When it was taken.
    pub at: Instant,
    /// CPU busy % over all logical CPUs since the previous reading.
    pub cpu_pct: Option<f64>,
    /// Memory in use, bytes.
    pub mem_used_bytes: Option<u64>,
    /// CPU package energy, joules, cumulative (RAPL `energy_uj`, wrap-around already undone
    /// by the probe).
    pub cpu_energy_j: Option<f64>,
    /// CPU package power, watts, from sources that give power rather than energy.
    pub cpu_power_w: Option<f64>,
    /// Per GPU.
    pub gpus: Vec<GpuReading>,
    /// A whole-machine power figure (Apple's combined CPU+GPU+ANE), watts, when a source gives
    /// one instead of parts.
    pub combined_power_w: Option<f64>,
}

impl Reading {
    /// An empty reading at `at`.
    pub fn new(at: Instant) -> Self {
        Self {
            at,
            cpu_pct: None,
            mem_used_bytes: None,
            cpu_energy_j: None,
            cpu_power_w: None,
            gpus: Vec::new(),
            combined_power_w: None,
        }
    }

    /// Makes this reading an empty one at `at`, keeping its GPU list's allocation (the
    /// sampler reuses readings dropped from its ring).
    pub fn reset(&mut self, at: Instant) {
        let mut gpus = std::mem::take(&mut self.gpus);
        gpus.clear();
        *self = Self {
            gpus,
            ..Self::new(at)
        };
    }
}

/// A telemetry source.
pub trait Probe: Send {
    /// What it reads, as (group, source): `("cpu", "sysinfo")`, `("cpu_power", "rapl")`,
    /// `("gpu", "nvml")`, `("power", "macmon")`.
    fn sources(&self) -> Vec<(&'static str, String)>;
    /// Adds its numbers to `r`. Must be cheap (it runs at the sampling rate) and must not
    /// block for long: a source that produces its numbers slowly (a child process) reads them
    /// on its own thread and hands over the latest here.
    fn read(&mut self, r: &mut Reading);
    /// A job's sampling begins: a source that runs something of its own (a child process)
    /// starts it here.
    fn resume(&mut self) {}
    /// The job's sampling ended: nothing of the probe's may keep running between jobs.
    fn pause(&mut self) {}
}
