//! What a result was measured on: the machine, the engine, the model and the job's effective
//! settings, with a stable [`Fingerprint::fingerprint_id`] over the parts that change
//! performance. Every fact names its source; a source that did not answer is listed in
//! `missing` with why, never guessed.

use crate::registry::Hardware;
use serde::{Deserialize, Serialize};

/// A source the agent tried that gave nothing (no NVIDIA driver, not a Mac, `/props` absent).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// The source: `nvml`, `system_profiler`, `amd-smi`, `rocm-smi`, `/api/show`, ...
    pub source: String,
    /// Why it gave nothing.
    pub reason: String,
}

impl Missing {
    /// `source` gave nothing, because of `reason`.
    pub fn new(source: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self {
            source: source.into(),
            reason: reason.to_string(),
        }
    }
}

/// One GPU.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Gpu {
    /// Index as its source numbers it.
    pub index: u32,
    /// `nvidia`, `apple`, `amd`.
    pub vendor: String,
    /// Marketing name (`NVIDIA H200`, `Apple M4 Max`).
    pub name: String,
    /// Dedicated memory in bytes (unified memory on Apple is the machine's memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Driver version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// CUDA version the driver supports (`12.8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_version: Option<String>,
    /// The card's maximum PCIe generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_gen_max: Option<u32>,
    /// The card's maximum PCIe lane count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_width_max: Option<u32>,
    /// PCIe generation of the link now (drops when idle on NVIDIA: not in the fingerprint id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_gen: Option<u32>,
    /// Lanes of the link now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_width: Option<u32>,
    /// GPU cores (Apple `sppci_cores`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<u32>,
    /// Stable device id (NVML UUID), when the source has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// `nvml`, `system_profiler`, `amd-smi`, `rocm-smi`.
    pub source: String,
}

/// The engine that served the model.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct EngineInfo {
    /// Backend kind: `ollama`, `openai`, `mock`.
    pub kind: String,
    /// The server behind the kind, when it says: `ollama`, `llama.cpp`, `vllm`, `lm-studio`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Its version (Ollama `/api/version`, vLLM `/version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Its build (llama.cpp `/props` `build_info`: `b6123-abc1234`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// Sources that did not answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<Missing>,
}

/// The model as the engine describes it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct ModelInfo {
    /// The name the job asked for.
    pub name: String,
    /// Content digest (Ollama's `sha256:...`; for a GGUF the agent can read, `sha256:` of the
    /// file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Parameters (`general.parameter_count`, llama.cpp `n_params`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter_count: Option<u64>,
    /// The engine's own size label (Ollama `8.0B`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter_size: Option<String>,
    /// Quantisation (`Q4_K_M`, `Q8_0`, `F16`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<String>,
    /// Context length the model was trained for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u64>,
    /// Architecture or family (`llama`, `gemma3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// File format (`gguf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Size of the weights in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Sources that did not answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<Missing>,
}

/// The settings the job ran with once defaults and its profile were applied.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Settings {
    /// `generate` or `chat`.
    pub mode: String,
    /// Context window requested.
    pub num_ctx: u32,
    /// Most (or, with `ignore_eos`, exactly) generated tokens.
    pub max_tokens: u32,
    /// Exact prompt size, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
    /// Context filled first.
    #[serde(default)]
    pub depth: u32,
    /// Generation ignores end-of-sequence.
    #[serde(default)]
    pub ignore_eos: bool,
    /// `cold` or `warm`.
    pub cache: String,
    /// Sampling temperature.
    pub temperature: f64,
    /// Sampling seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// Everything a result was measured on.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Fingerprint {
    /// `fp-` and 16 hex digits: a hash of [`Fingerprint::parts`], so equal ids mean "same
    /// machine, same setup".
    pub fingerprint_id: String,
    /// The machine.
    pub hardware: Hardware,
    /// The engine.
    pub engine: EngineInfo,
    /// The model.
    pub model: ModelInfo,
    /// The job's effective settings.
    pub settings: Settings,
}

/// One part of a fingerprint that differs between two of them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Dotted name (`gpu0.driver_version`, `engine.build`, `model.quantization`).
    pub field: String,
    /// Its value in the first (empty when absent).
    pub before: String,
    /// Its value in the second.
    pub after: String,
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(T::to_string).unwrap_or_default()
}

impl Fingerprint {
    /// The parts that change performance, by name, in a fixed order: the fingerprint id hashes
    /// them and [`Fingerprint::diff`] compares them. Labels, current PCIe link state and the
    /// `missing` notes are left out (they change without the machine changing).
    pub fn parts(&self) -> Vec<(String, String)> {
        let h = &self.hardware;
        let mut p: Vec<(String, String)> = vec![
            ("cpu".into(), h.cpu.clone()),
            ("physical_cores".into(), opt(&h.physical_cores)),
            ("cores".into(), h.cores.to_string()),
            ("memory_bytes".into(), h.memory_bytes.to_string()),
            ("os".into(), h.os.clone()),
            ("os_version".into(), opt(&h.os_version)),
            ("kernel_version".into(), opt(&h.kernel_version)),
            ("arch".into(), h.arch.clone()),
            ("chip".into(), opt(&h.chip)),
            ("gpus".into(), h.gpus.len().to_string()),
        ];
        for (i, g) in h.gpus.iter().enumerate() {
            let k = |f: &str| format!("gpu{i}.{f}");
            p.extend([
                (k("vendor"), g.vendor.clone()),
                (k("name"), g.name.clone()),
                (k("memory_bytes"), opt(&g.memory_bytes)),
                (k("driver_version"), opt(&g.driver_version)),
                (k("cuda_version"), opt(&g.cuda_version)),
                (k("pcie_gen_max"), opt(&g.pcie_gen_max)),
                (k("pcie_width_max"), opt(&g.pcie_width_max)),
                (k("cores"), opt(&g.cores)),
            ]);
        }
        let e = &self.engine;
        let m = &self.model;
        let s = &self.settings;
        p.extend([
            ("engine.kind".into(), e.kind.clone()),
            ("engine.server".into(), opt(&e.server)),
            ("engine.version".into(), opt(&e.version)),
            ("engine.build".into(), opt(&e.build)),
            ("model.name".into(), m.name.clone()),
            ("model.digest".into(), opt(&m.digest)),
            ("model.parameter_count".into(), opt(&m.parameter_count)),
            ("model.quantization".into(), opt(&m.quantization)),
            ("model.context_length".into(), opt(&m.context_length)),
            ("settings.mode".into(), s.mode.clone()),
            ("settings.num_ctx".into(), s.num_ctx.to_string()),
            ("settings.max_tokens".into(), s.max_tokens.to_string()),
            ("settings.prompt_tokens".into(), opt(&s.prompt_tokens)),
            ("settings.depth".into(), s.depth.to_string()),
            ("settings.ignore_eos".into(), s.ignore_eos.to_string()),
            ("settings.cache".into(), s.cache.clone()),
            ("settings.temperature".into(), s.temperature.to_string()),
            ("settings.seed".into(), opt(&s.seed)),
        ]);
        p
    }

    /// The id of these parts: FNV-1a (64-bit) over `name=value\n` lines. An identity, not a
    /// security check: it only has to tell setups apart.
    pub fn id_of(parts: &[(String, String)]) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (k, v) in parts {
            for b in k.bytes().chain([b'=']).chain(v.bytes()).chain([b'\n']) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        format!("fp-{h:016x}")
    }

    /// Sets `fingerprint_id` from the parts; returns self.
    pub fn with_id(mut self) -> Self {
        self.fingerprint_id = Self::id_of(&self.parts());
        self
    }

    /// The parts that differ from `self` to `other`, in order (a part only one side has is a
    /// change from or to empty).
    pub fn diff(&self, other: &Fingerprint) -> Vec<Change> {
        let a = self.parts();
        let b = other.parts();
        let mut out = Vec::new();
        let value = |p: &[(String, String)], k: &str| {
            p.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let mut seen = std::collections::BTreeSet::new();
        for (k, _) in a.iter().chain(b.iter()) {
            if !seen.insert(k.clone()) {
                continue;
            }
            let (before, after) = (value(&a, k), value(&b, k));
            if before != after {
                out.push(Change {
                    field: k.clone(),
                    before,
                    after,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> Fingerprint {
        Fingerprint {
            fingerprint_id: String::new(),
            hardware: Hardware {
                cpu: "AMD EPYC".into(),
                cores: 2,
                memory_bytes: 1 << 34,
                os: "linux".into(),
                arch: "x86_64".into(),
                gpus: vec![Gpu {
                    vendor: "nvidia".into(),
                    name: "NVIDIA H200".into(),
                    driver_version: Some("570.86".into()),
                    pcie_gen: Some(1),
                    source: "nvml".into(),
                    ..Gpu::default()
                }],
                ..Hardware::default()
            },
            engine: EngineInfo {
                kind: "openai".into(),
                server: Some("llama.cpp".into()),
                build: Some("b6000-aaaa".into()),
                ..EngineInfo::default()
            },
            model: ModelInfo {
                name: "m".into(),
                quantization: Some("Q4_K_M".into()),
                ..ModelInfo::default()
            },
            settings: Settings {
                mode: "generate".into(),
                num_ctx: 2048,
                max_tokens: 32,
                cache: "cold".into(),
                ..Settings::default()
            },
        }
        .with_id()
    }

    #[test]
    fn id_is_stable_and_follows_what_changes_performance() {
        let a = fp();
        assert_eq!(a.fingerprint_id, fp().fingerprint_id);
        assert!(a.fingerprint_id.starts_with("fp-") && a.fingerprint_id.len() == 19);
        // Labels, the idle PCIe link and missing notes are not performance.
        let mut same = a.clone();
        same.hardware.accelerator = Some("label".into());
        same.hardware.gpus[0].pcie_gen = Some(4);
        same.model.missing.push(Missing {
            source: "x".into(),
            reason: "y".into(),
        });
        assert_eq!(same.with_id().fingerprint_id, a.fingerprint_id);
        let mut b = a.clone();
        b.hardware.gpus[0].driver_version = Some("575.51".into());
        b.engine.build = Some("b6100-bbbb".into());
        b.model.quantization = Some("Q8_0".into());
        let b = b.with_id();
        assert_ne!(b.fingerprint_id, a.fingerprint_id);
        let fields: Vec<_> = a.diff(&b).into_iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            ["gpu0.driver_version", "engine.build", "model.quantization"]
        );
        assert_eq!(a.diff(&a), vec![]);
    }

    #[test]
    fn a_gpu_added_is_listed_field_by_field() {
        let a = fp();
        let mut b = a.clone();
        b.hardware.gpus.push(Gpu {
            index: 1,
            vendor: "nvidia".into(),
            name: "NVIDIA H200".into(),
            source: "nvml".into(),
            ..Gpu::default()
        });
        let d = a.diff(&b);
        assert_eq!(d[0].field, "gpus");
        assert!(d
            .iter()
            .any(|c| c.field == "gpu1.name" && c.before.is_empty()));
    }
}
