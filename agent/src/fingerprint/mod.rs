//! What a result is measured on ([`bench_schemas::Fingerprint`]): the machine ([`hardware`]:
//! sysinfo for CPU, memory and OS on every OS; NVML, `system_profiler`/`sysctl` and
//! `amd-smi`/`rocm-smi` for GPUs), the engine and model (asked of the backend, see
//! [`crate::backend::Backend::engine_info`]) and the job's effective settings. A source that
//! does not answer is reported in `missing`, never guessed.

pub mod amd;
pub mod apple;
pub mod gguf;
pub mod hardware;
pub mod nvidia;
