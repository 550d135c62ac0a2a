//! The machine's facts. (Being rewritten on sysinfo, NVML, Apple and AMD sources.)

use bench_schemas::Hardware;

/// Facts about this machine.
pub fn hardware(accelerator: Option<String>) -> Hardware {
    Hardware {
        cores: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(0),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        accelerator,
        ..Hardware::default()
    }
}
