//! NVIDIA GPUs through NVML: the fingerprint's [`gpus`] and the telemetry [`NvmlProbe`].
//! `libnvidia-ml` is loaded at run time ([`Nvml::init`]) once per process, so an agent on a
//! machine without the driver starts and reports `nvml` as missing.

use crate::telemetry::probe::{GpuReading, Probe, Reading};
use bench_schemas::{Gpu, GpuSample, Missing};
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use std::sync::OnceLock;

static NVML: OnceLock<Result<Nvml, String>> = OnceLock::new();

/// The process-wide NVML handle, loaded on first use; the reason when it cannot be.
pub fn nvml() -> Result<&'static Nvml, Missing> {
    NVML.get_or_init(|| Nvml::init().map_err(|e| format!("libnvidia-ml not loadable: {e}")))
        .as_ref()
        .map_err(|reason| Missing::new("nvml", reason.clone()))
}

/// NVML's CUDA driver version (`1000 * major + 10 * minor`, as `nvmlSystemGetCudaDriverVersion`
/// documents: 12080) as `major.minor` (`12.8`).
pub fn cuda_version(v: i32) -> String {
    format!(
        "{}.{}",
        nvml_wrapper::cuda_driver_version_major(v),
        nvml_wrapper::cuda_driver_version_minor(v)
    )
}

/// NVML power (mW) in watts.
pub fn milliwatts_to_w(mw: u32) -> f64 {
    f64::from(mw) / 1e3
}

/// NVML energy (mJ since the driver was loaded) in joules.
pub fn millijoules_to_j(mj: u64) -> f64 {
    mj as f64 / 1e3
}

fn devices(nvml: &'static Nvml) -> Result<Vec<(u32, Device<'static>)>, Missing> {
    let n = nvml
        .device_count()
        .map_err(|e| Missing::new("nvml", format!("NVML loaded but cannot count GPUs: {e}")))?;
    if n == 0 {
        return Err(Missing::new("nvml", "NVML loaded but reports no GPU"));
    }
    let mut out = Vec::new();
    let mut first_err = None;
    for i in 0..n {
        match nvml.device_by_index(i) {
            Ok(d) => out.push((i, d)),
            Err(e) => {
                tracing::warn!(index = i, error = %e, "NVML cannot open GPU");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) if out.is_empty() => Err(Missing::new(
            "nvml",
            format!("NVML cannot open any GPU: {e}"),
        )),
        _ => Ok(out),
    }
}

/// Every NVIDIA GPU NVML sees, in NVML's index order. A value NVML does not give for a card
/// (PCIe on some boards, CUDA version on old drivers) is left out, never guessed.
pub fn gpus() -> Result<Vec<Gpu>, Missing> {
    let nvml = nvml()?;
    let driver = nvml.sys_driver_version().ok();
    let cuda = nvml.sys_cuda_driver_version().ok().map(cuda_version);
    Ok(devices(nvml)?
        .into_iter()
        .map(|(index, d)| Gpu {
            index,
            vendor: "nvidia".into(),
            name: d.name().unwrap_or_default(),
            memory_bytes: d.memory_info().ok().map(|m| m.total),
            driver_version: driver.clone(),
            cuda_version: cuda.clone(),
            pcie_gen_max: d.max_pcie_link_gen().ok(),
            pcie_width_max: d.max_pcie_link_width().ok(),
            pcie_gen: d.current_pcie_link_gen().ok(),
            pcie_width: d.current_pcie_link_width().ok(),
            cores: None,
            uuid: d.uuid().ok(),
            source: "nvml".into(),
        })
        .collect())
}

struct Card {
    index: u32,
    device: Device<'static>,
    /// Cleared the first time the card says it has no energy counter (pre-Volta), so it is
    /// not asked again at every read.
    has_energy: bool,
}

/// Per GPU: busy %, memory in use, board power, GPU temperature, graphics and memory clocks
/// and the cumulative energy counter (Volta and later). Device handles are opened once; each
/// read is a handful of NVML calls per GPU (no process spawned, nothing enumerated).
pub struct NvmlProbe {
    cards: Vec<Card>,
}

impl NvmlProbe {
    /// Opens every GPU; the reason when NVML cannot be loaded or sees none.
    pub fn open() -> Result<Self, Missing> {
        let cards = devices(nvml()?)?
            .into_iter()
            .map(|(index, device)| Card {
                index,
                device,
                has_energy: true,
            })
            .collect();
        Ok(Self { cards })
    }
}

impl Probe for NvmlProbe {
    fn sources(&self) -> Vec<(&'static str, String)> {
        vec![("gpu", "nvml".into()), ("gpu_power", "nvml".into())]
    }

    fn read(&mut self, r: &mut Reading) {
        for c in &mut self.cards {
            let d = &c.device;
            let energy_j = if c.has_energy {
                match d.total_energy_consumption() {
                    Ok(mj) => Some(millijoules_to_j(mj)),
                    Err(NvmlError::NotSupported) => {
                        c.has_energy = false;
                        None
                    }
                    Err(_) => None,
                }
            } else {
                None
            };
            r.gpus.push(GpuReading {
                sample: GpuSample {
                    index: c.index,
                    util_pct: d.utilization_rates().ok().map(|u| f64::from(u.gpu)),
                    mem_used_bytes: d.memory_info().ok().map(|m| m.used),
                    power_w: d.power_usage().ok().map(milliwatts_to_w),
                    temp_c: d.temperature(TemperatureSensor::Gpu).ok().map(f64::from),
                    clock_mhz: d.clock_info(Clock::Graphics).ok(),
                    mem_clock_mhz: d.clock_info(Clock::Memory).ok(),
                },
                energy_j,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_version_as_nvml_documents_it() {
        // nvmlSystemGetCudaDriverVersion: CUDA_VERSION = 1000 * major + 10 * minor.
        assert_eq!(cuda_version(12080), "12.8");
        assert_eq!(cuda_version(12040), "12.4");
        assert_eq!(cuda_version(11020), "11.2");
        assert_eq!(cuda_version(13000), "13.0");
        assert_eq!(cuda_version(10010), "10.1");
    }

    #[test]
    fn units() {
        // nvmlDeviceGetPowerUsage is mW, nvmlDeviceGetTotalEnergyConsumption mJ.
        assert_eq!(milliwatts_to_w(71_234), 71.234);
        assert_eq!(millijoules_to_j(1_500), 1.5);
    }

    #[test]
    fn without_the_driver_nvml_is_missing_with_the_loader_error() {
        // Passes on a GPU machine too: there it must find at least one GPU.
        match gpus() {
            Ok(g) => assert!(!g.is_empty() && g.iter().all(|g| g.source == "nvml")),
            Err(m) => {
                assert_eq!(m.source, "nvml");
                assert!(!m.reason.is_empty());
            }
        }
    }
}
