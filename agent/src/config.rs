//! Agent configuration: YAML into [`RawConfig`], environment overrides, then a validated
//! [`Config`] whose errors name the file, the key and the fix.

use crate::telemetry::{ApplePower, TelemetryConfig};
pub use bench_nats::settings::{process_env, ConfigError, Env};
use bench_nats::NatsConfig;
use bench_schemas::{validate_machine_id, JobLimits};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Config file used when neither `--config` nor `BENCH_AGENT_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "agent/config/agent.yaml";
/// Default local HTTP bind host: loopback, since nothing needs to reach an agent.
pub const DEFAULT_BIND_HOST: &str = "127.0.0.1";
/// Default local HTTP port (the original's).
pub const DEFAULT_BIND_PORT: u16 = 9001;
/// Default Ollama address.
pub const DEFAULT_OLLAMA_URL: &str = "http://127.0.0.1:11434";
/// Token batching: flush at this many characters...
pub const DEFAULT_FLUSH_CHARS: usize = 64;
/// ...or this many seconds after the first buffered character.
pub const DEFAULT_FLUSH_SECONDS: f64 = 0.10;
/// Heartbeat period.
pub const DEFAULT_HEARTBEAT_S: f64 = 3.0;
/// No byte from the engine for this long fails the run with `timeout`.
pub const DEFAULT_ENGINE_IDLE_TIMEOUT_S: f64 = 120.0;
/// Jobs waiting behind the running one.
pub const DEFAULT_MAX_QUEUE: usize = 64;
/// Events waiting for the publisher: at 40 events/s a run outlasts a NATS outage of minutes; at
/// ~500 bytes an event the queue stays a few MB.
pub const DEFAULT_MAX_EVENT_QUEUE: usize = 10_000;
/// JetStream acks awaited at once. One at a time caps an agent at 1/RTT events per second (~6/s
/// at a 150 ms round trip); 256 in flight carries a fast engine's token stream over such a link.
pub const DEFAULT_PUBLISH_WINDOW: usize = 256;
/// How long the engine's model list is trusted while the engine is idle.
pub const DEFAULT_ENGINE_MODELS_REFRESH_S: f64 = 30.0;
/// Telemetry sampling period: 4 Hz resolves a decode of a second or two without costing a
/// measurable share of a core.
pub const DEFAULT_TELEMETRY_INTERVAL_MS: u64 = 250;
/// Shortest sampling period: below it the probes' own reads (sysinfo walks /proc) start to be
/// a load of their own.
pub const MIN_TELEMETRY_INTERVAL_MS: u64 = 50;
/// Longest sampling period: a slower sampler would leave most runs with no sample at all.
pub const MAX_TELEMETRY_INTERVAL_MS: u64 = 10_000;
/// Linux powercap root where RAPL zones live.
pub const DEFAULT_RAPL_ROOT: &str = "/sys/class/powercap";

/// Which engine a backend talks to.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// Ollama's native API.
    Ollama,
    /// Any OpenAI-compatible server (llama-server, vLLM, LM Studio, SGLang).
    Openai,
    /// Synthetic tokens, for trying the pipeline without an engine. Never a fallback.
    Mock,
}

impl EngineKind {
    /// The name used in events and the registry.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ollama => "ollama",
            Self::Openai => "openai",
            Self::Mock => "mock",
        }
    }
}

/// The mock engine's pace.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// Tokens per second.
    #[serde(default = "default_mock_rate")]
    pub tokens_per_s: f64,
    /// Delay before the first token.
    #[serde(default = "default_mock_ttft")]
    pub ttft_ms: f64,
}

fn default_mock_rate() -> f64 {
    200.0
}
fn default_mock_ttft() -> f64 {
    20.0
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            tokens_per_s: default_mock_rate(),
            ttft_ms: default_mock_ttft(),
        }
    }
}

/// Job limits as YAML.
#[derive(Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Largest prompt in bytes.
    pub max_prompt_bytes: Option<usize>,
    /// Largest `max_tokens`.
    pub max_tokens: Option<u32>,
    /// Largest `repeat + warmup`.
    pub max_runs: Option<u32>,
    /// Largest `num_ctx`.
    pub max_num_ctx: Option<u32>,
    /// Jobs allowed to wait.
    pub max_queue: Option<usize>,
    /// Events allowed to wait for the publisher.
    pub max_event_queue: Option<usize>,
}

/// `telemetry:` as YAML.
#[derive(Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    /// Sample during jobs at all (default true).
    pub enabled: Option<bool>,
    /// Between samples, ms (default 250).
    pub interval_ms: Option<u64>,
    /// Linux powercap root for RAPL.
    pub rapl_root: Option<PathBuf>,
    /// Ask NVML for NVIDIA GPUs.
    pub nvml: Option<bool>,
    /// auto | macmon | powermetrics | off.
    pub apple_power: Option<ApplePower>,
}

/// The YAML as written. Unknown keys are errors, so a typo never silently does nothing.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Unique id, a subject token.
    pub machine_id: Option<String>,
    /// Human-readable name.
    pub label: Option<String>,
    /// Local HTTP (health, capabilities) host.
    pub bind_host: Option<String>,
    /// Local HTTP port; 0 picks a free one.
    pub bind_port: Option<u16>,
    /// Default engine: ollama (default), openai or mock.
    pub engine: Option<EngineKind>,
    /// Ollama's address.
    pub ollama_base_url: Option<String>,
    /// OpenAI-compatible server's address (without `/v1`).
    pub openai_base_url: Option<String>,
    /// Bearer token for the OpenAI-compatible server.
    pub openai_api_key: Option<String>,
    /// Extra fields merged into every OpenAI-compatible request body. Default
    /// `{cache_prompt: false}`: llama.cpp would otherwise reuse the prompt's KV cache from the
    /// previous repeat, and every repeat after the first would time a cached prompt.
    pub openai_extra_body: Option<serde_json::Map<String, serde_json::Value>>,
    /// Whether the OpenAI-compatible server takes `ignore_eos` (llama.cpp and vLLM do; default
    /// true). Without it a fixed-length job's runs that stop early are flagged `short_output`.
    pub openai_ignore_eos: Option<bool>,
    /// Mock pace.
    pub mock: Option<MockConfig>,
    /// Models offered; when empty the engine's own list is used.
    #[serde(default)]
    pub llm_models: Vec<String>,
    /// Kept from the original config; listed in /capabilities.
    #[serde(default)]
    pub whisper_models: Vec<String>,
    /// Kept from the original config; listed in /capabilities.
    #[serde(default)]
    pub sdxl_profiles: Vec<String>,
    /// Labels that broadcast selectors match (`accelerator: nvidia`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Free-text accelerator shown in the registry (`RTX 4090`).
    pub accelerator: Option<String>,
    /// NATS connection.
    #[serde(default)]
    pub nats: NatsConfig,
    /// Job limits.
    #[serde(default)]
    pub limits: RawLimits,
    /// Token batching by size.
    pub stream_flush_chars: Option<usize>,
    /// Token batching by time.
    pub stream_flush_seconds: Option<f64>,
    /// Heartbeat period.
    pub heartbeat_s: Option<f64>,
    /// Engine silence that fails a run.
    pub engine_idle_timeout_s: Option<f64>,
    /// How long an idle engine's model list is cached.
    pub engine_models_refresh_s: Option<f64>,
    /// JetStream acks in flight at once.
    pub publish_window: Option<usize>,
    /// Machine sampling during jobs.
    #[serde(default)]
    pub telemetry: RawTelemetry,
    /// Seed file of the key events are signed with when the agent has no NATS nkey (created
    /// 0600 at the first start). Default: `$XDG_STATE_HOME` (else `~/.local/state`, Windows
    /// `%LOCALAPPDATA%`) `/bench-race/<machine_id>.signing.nk`.
    pub signing_key_file: Option<PathBuf>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from (for messages).
    pub source: PathBuf,
    /// Unique id.
    pub machine_id: String,
    /// Label.
    pub label: String,
    /// Local HTTP host.
    pub bind_host: String,
    /// Local HTTP port.
    pub bind_port: u16,
    /// Default engine.
    pub engine: EngineKind,
    /// Ollama, when configured.
    pub ollama_base_url: Option<String>,
    /// OpenAI-compatible server, when configured.
    pub openai_base_url: Option<String>,
    /// Its key.
    pub openai_api_key: Option<String>,
    /// Extra request-body fields for the OpenAI-compatible backend.
    pub openai_extra_body: serde_json::Map<String, serde_json::Value>,
    /// Whether to send `ignore_eos` for fixed-length jobs.
    pub openai_ignore_eos: bool,
    /// Mock pace.
    pub mock: MockConfig,
    /// Models offered.
    pub llm_models: Vec<String>,
    /// Listed in /capabilities.
    pub whisper_models: Vec<String>,
    /// Listed in /capabilities.
    pub sdxl_profiles: Vec<String>,
    /// Selector labels.
    pub labels: BTreeMap<String, String>,
    /// Accelerator text.
    pub accelerator: Option<String>,
    /// NATS.
    pub nats: NatsConfig,
    /// Job limits.
    pub limits: JobLimits,
    /// Jobs allowed to wait.
    pub max_queue: usize,
    /// Events allowed to wait for the publisher.
    pub max_event_queue: usize,
    /// JetStream acks in flight at once.
    pub publish_window: usize,
    /// How long an idle engine's model list is cached.
    pub engine_models_refresh: Duration,
    /// Token batching by size.
    pub flush_chars: usize,
    /// Token batching by time.
    pub flush_interval: Duration,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Engine silence that fails a run.
    pub engine_idle_timeout: Duration,
    /// Machine sampling during jobs.
    pub telemetry: TelemetryConfig,
    /// Where the signing key is kept when NATS has no nkey (None: no place to keep one, so a
    /// new key at every start; see [`crate::publisher::Signer::load`]).
    pub signing_key_file: Option<PathBuf>,
    /// Whether `signing_key_file` was configured (else it is the default path).
    pub signing_key_file_set: bool,
}

impl Config {
    /// Reads, overrides and validates `path`.
    pub fn load(path: &Path, env: &Env) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "-".into(),
            problem: format!("cannot read the file ({e})"),
            fix: format!(
                "create it (see agent/config/agent.example.yaml) or pass --config / set BENCH_AGENT_CONFIG; default is {DEFAULT_CONFIG_PATH}"
            ),
        })?;
        Self::parse(&text, path, env)
    }

    /// Parses YAML text as if read from `path`.
    pub fn parse(text: &str, path: &Path, env: &Env) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(" (line {}, column {})", l.line(), l.column()));
            ConfigError {
                file: file.clone(),
                key: "-".into(),
                problem: format!("{e}{}", at.unwrap_or_default()),
                fix: "correct the YAML; every key is listed in agent/config/agent.example.yaml"
                    .into(),
            }
        })?;
        Self::from_raw(raw, path, env)
    }

    /// Applies environment overrides to `raw` and validates it.
    pub fn from_raw(raw: RawConfig, path: &Path, env: &Env) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let err = |key: &str, problem: String, fix: &str| ConfigError {
            file: file.clone(),
            key: key.into(),
            problem,
            fix: fix.into(),
        };
        let get = |k: &str| env.get(k).filter(|v| !v.trim().is_empty()).cloned();
        let parse_env = |k: &str| -> Result<Option<f64>, ConfigError> {
            get(k)
                .map(|v| {
                    v.parse::<f64>().map_err(|_| ConfigError {
                        file: format!("environment ({file})"),
                        key: k.into(),
                        problem: format!("{v:?} is not a number"),
                        fix: format!("set {k} to a number or unset it"),
                    })
                })
                .transpose()
        };

        let machine_id = raw.machine_id.clone().ok_or_else(|| {
            err(
                "machine_id",
                "missing".into(),
                "add `machine_id: my-box` (a-z, 0-9, '_' and '-')",
            )
        })?;
        validate_machine_id(&machine_id).map_err(|e| {
            err(
                "machine_id",
                e.to_string(),
                "use lowercase letters, digits, '_' and '-', not 'all'",
            )
        })?;
        let label = raw.label.clone().unwrap_or_else(|| machine_id.clone());

        let bind_host = get("AGENT_HOST")
            .or(raw.bind_host)
            .unwrap_or_else(|| DEFAULT_BIND_HOST.into());
        let bind_port = match get("AGENT_PORT") {
            Some(p) => p.parse::<u16>().map_err(|_| ConfigError {
                file: format!("environment ({file})"),
                key: "AGENT_PORT".into(),
                problem: format!("{p:?} is not a port"),
                fix: "set AGENT_PORT to 0..65535".into(),
            })?,
            None => raw.bind_port.unwrap_or(DEFAULT_BIND_PORT),
        };

        // OLLAMA_HOST / OLLAMA_PORT override the URL's parts, as in the original.
        let mut ollama = raw.ollama_base_url.clone();
        if get("OLLAMA_HOST").is_some() || get("OLLAMA_PORT").is_some() {
            let host = get("OLLAMA_HOST").unwrap_or_else(|| "127.0.0.1".into());
            let host = host
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string();
            let port = get("OLLAMA_PORT").unwrap_or_else(|| "11434".into());
            ollama = Some(if host.contains(':') {
                format!("http://{host}")
            } else {
                format!("http://{host}:{port}")
            });
        }
        let engine = raw.engine.unwrap_or(EngineKind::Ollama);
        if engine == EngineKind::Ollama && ollama.is_none() {
            ollama = Some(DEFAULT_OLLAMA_URL.into());
        }
        for (key, url) in [
            ("ollama_base_url", &ollama),
            ("openai_base_url", &raw.openai_base_url),
        ] {
            if let Some(u) = url {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err(err(
                        key,
                        format!("{u:?} is not an http(s) URL"),
                        "write it as http://host:port",
                    ));
                }
            }
        }
        if engine == EngineKind::Openai && raw.openai_base_url.is_none() {
            return Err(err(
                "openai_base_url",
                "missing while engine is openai".into(),
                "add `openai_base_url: http://127.0.0.1:8081` (the server's address, without /v1)",
            ));
        }
        let mock = raw.mock.clone().unwrap_or_default();
        let pace_ok = (0.01..=1e6).contains(&mock.tokens_per_s);
        if !pace_ok || !(0.0..=600_000.0).contains(&mock.ttft_ms) {
            return Err(err(
                "mock",
                "tokens_per_s must be 0.01..1e6 and ttft_ms 0..600000".into(),
                "e.g. `mock: {tokens_per_s: 50, ttft_ms: 30}`",
            ));
        }

        let flush_chars = match get("BENCH_STREAM_FLUSH_CHARS") {
            Some(v) => v.parse::<usize>().map_err(|_| ConfigError {
                file: format!("environment ({file})"),
                key: "BENCH_STREAM_FLUSH_CHARS".into(),
                problem: format!("{v:?} is not a whole number"),
                fix: "set it to e.g. 64".into(),
            })?,
            None => raw.stream_flush_chars.unwrap_or(DEFAULT_FLUSH_CHARS),
        };
        let flush_s = parse_env("BENCH_STREAM_FLUSH_SECONDS")?
            .or(raw.stream_flush_seconds)
            .unwrap_or(DEFAULT_FLUSH_SECONDS);
        if !(flush_s.is_finite() && flush_s > 0.0 && flush_s <= 10.0) {
            return Err(err(
                "stream_flush_seconds",
                format!("{flush_s} is out of range"),
                "use 0.01..10 (default 0.10)",
            ));
        }
        let heartbeat_s = raw.heartbeat_s.unwrap_or(DEFAULT_HEARTBEAT_S);
        if !(0.1..=5.0).contains(&heartbeat_s) {
            return Err(err(
                "heartbeat_s",
                format!("{heartbeat_s} is out of range"),
                "use 0.1..5 (default 3): registry entries expire 15 s after the last beat",
            ));
        }
        let idle = raw
            .engine_idle_timeout_s
            .unwrap_or(DEFAULT_ENGINE_IDLE_TIMEOUT_S);
        if !(0.1..=86_400.0).contains(&idle) {
            return Err(err(
                "engine_idle_timeout_s",
                format!("{idle} is out of range"),
                "use 0.1..86400 seconds (default 120)",
            ));
        }

        let d = JobLimits::default();
        let limits = JobLimits {
            max_prompt_bytes: raw.limits.max_prompt_bytes.unwrap_or(d.max_prompt_bytes),
            max_tokens: raw.limits.max_tokens.unwrap_or(d.max_tokens),
            max_runs: raw.limits.max_runs.unwrap_or(d.max_runs),
            max_num_ctx: raw.limits.max_num_ctx.unwrap_or(d.max_num_ctx),
        };
        if limits.max_prompt_bytes == 0
            || limits.max_tokens == 0
            || limits.max_runs == 0
            || raw.limits.max_queue == Some(0)
        {
            return Err(err(
                "limits",
                "limits must be positive".into(),
                "remove the key to use the default",
            ));
        }

        let max_queue = raw.limits.max_queue.unwrap_or(DEFAULT_MAX_QUEUE);
        let max_event_queue = raw
            .limits
            .max_event_queue
            .unwrap_or(DEFAULT_MAX_EVENT_QUEUE);
        // Every waiting job and the running one hold a slot for their final event, so that
        // it can always be queued; the rest is room for the running job's stream.
        if !(max_queue.saturating_add(2)..=1_000_000).contains(&max_event_queue) {
            return Err(err(
                "limits.max_event_queue",
                format!(
                    "{max_event_queue} is out of range: it must exceed limits.max_queue + 1 ({}) and be at most 1000000",
                    max_queue.saturating_add(1)
                ),
                "use e.g. 10000 (the default), or lower limits.max_queue",
            ));
        }
        let publish_window = raw.publish_window.unwrap_or(DEFAULT_PUBLISH_WINDOW);
        if !(1..=4096).contains(&publish_window) {
            return Err(err(
                "publish_window",
                format!("{publish_window} is out of range"),
                "use 1..4096 (default 256)",
            ));
        }
        let refresh = raw
            .engine_models_refresh_s
            .unwrap_or(DEFAULT_ENGINE_MODELS_REFRESH_S);
        if !(0.1..=86_400.0).contains(&refresh) {
            return Err(err(
                "engine_models_refresh_s",
                format!("{refresh} is out of range"),
                "use 0.1..86400 seconds (default 30)",
            ));
        }

        let t = &raw.telemetry;
        let interval_ms = t.interval_ms.unwrap_or(DEFAULT_TELEMETRY_INTERVAL_MS);
        if !(MIN_TELEMETRY_INTERVAL_MS..=MAX_TELEMETRY_INTERVAL_MS).contains(&interval_ms) {
            return Err(err(
                "telemetry.interval_ms",
                format!("{interval_ms} is out of range"),
                "use 50..10000 ms (default 250 = 4 Hz), or `telemetry: {enabled: false}` for none",
            ));
        }
        let telemetry = TelemetryConfig {
            enabled: t.enabled.unwrap_or(true),
            interval: Duration::from_millis(interval_ms),
            rapl_root: t
                .rapl_root
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_RAPL_ROOT)),
            nvml: t.nvml.unwrap_or(true),
            apple_power: t.apple_power.unwrap_or_default(),
        };

        let mut nats = raw.nats.clone();
        if let Some(url) = get("NATS_URL") {
            nats.url = Some(url);
        }
        // Resolved from the environment passed in (tests pass none, and keep no key file).
        let signing_key_file_set = raw.signing_key_file.is_some();
        let signing_key_file = raw.signing_key_file.clone().or_else(|| {
            let state = get("XDG_STATE_HOME")
                .map(PathBuf::from)
                .or_else(|| get("HOME").map(|h| Path::new(&h).join(".local/state")))
                .or_else(|| get("LOCALAPPDATA").map(PathBuf::from))?;
            Some(
                state
                    .join("bench-race")
                    .join(format!("{machine_id}.signing.nk")),
            )
        });

        Ok(Self {
            source: path.to_path_buf(),
            machine_id,
            label,
            bind_host,
            bind_port,
            engine,
            ollama_base_url: ollama.map(|u| u.trim_end_matches('/').to_string()),
            openai_base_url: raw
                .openai_base_url
                .map(|u| u.trim_end_matches('/').trim_end_matches("/v1").to_string()),
            openai_api_key: raw.openai_api_key,
            openai_ignore_eos: raw.openai_ignore_eos.unwrap_or(true),
            openai_extra_body: raw.openai_extra_body.unwrap_or_else(|| {
                serde_json::Map::from_iter([(
                    "cache_prompt".to_string(),
                    serde_json::Value::Bool(false),
                )])
            }),
            mock,
            llm_models: raw.llm_models,
            whisper_models: raw.whisper_models,
            sdxl_profiles: raw.sdxl_profiles,
            labels: raw.labels,
            accelerator: raw.accelerator,
            nats,
            limits,
            max_queue,
            max_event_queue,
            publish_window,
            engine_models_refresh: Duration::from_secs_f64(refresh),
            flush_chars: flush_chars.max(1),
            flush_interval: Duration::from_secs_f64(flush_s),
            heartbeat: Duration::from_secs_f64(heartbeat_s),
            engine_idle_timeout: Duration::from_secs_f64(idle),
            telemetry,
            signing_key_file,
            signing_key_file_set,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(yaml, Path::new("agent.yaml"), &env)
    }

    #[test]
    fn minimal_and_overrides() {
        let c = parse("machine_id: box1\n", &[]).unwrap();
        assert_eq!(c.label, "box1");
        assert_eq!(c.engine, EngineKind::Ollama);
        assert_eq!(c.ollama_base_url.as_deref(), Some(DEFAULT_OLLAMA_URL));
        assert_eq!(c.flush_chars, 64);
        assert_eq!(
            (c.max_event_queue, c.publish_window),
            (DEFAULT_MAX_EVENT_QUEUE, DEFAULT_PUBLISH_WINDOW)
        );
        let c = parse(
            "machine_id: box1\nlimits: {max_queue: 1, max_event_queue: 3}\npublish_window: 1\n",
            &[],
        )
        .unwrap();
        assert_eq!((c.max_event_queue, c.publish_window), (3, 1));
        assert_eq!(
            c.openai_extra_body["cache_prompt"], false,
            "no prompt cache between repeats by default"
        );
        let c = parse(
            "machine_id: box1\n",
            &[
                ("OLLAMA_HOST", "10.0.0.5"),
                ("OLLAMA_PORT", "1234"),
                ("AGENT_PORT", "0"),
                ("BENCH_STREAM_FLUSH_CHARS", "8"),
                ("BENCH_STREAM_FLUSH_SECONDS", "0.5"),
                ("NATS_URL", "nats://h:1"),
            ],
        )
        .unwrap();
        assert_eq!(c.ollama_base_url.as_deref(), Some("http://10.0.0.5:1234"));
        assert_eq!((c.bind_port, c.flush_chars), (0, 8));
        assert_eq!(c.flush_interval, Duration::from_millis(500));
        assert_eq!(c.nats.url.as_deref(), Some("nats://h:1"));
    }

    #[test]
    fn errors_name_file_key_and_fix() {
        let e = parse("label: x\n", &[]).unwrap_err();
        assert_eq!(e.key, "machine_id");
        assert!(
            e.to_string()
                .starts_with("agent.yaml: machine_id: missing. Fix:"),
            "{e}"
        );
        let e = parse("machine_id: Bad.Id\n", &[]).unwrap_err();
        assert_eq!(e.key, "machine_id");
        let e = parse("machine_id: a\nmachine_idd: b\n", &[]).unwrap_err();
        assert!(e.problem.contains("machine_idd"), "{e}");
        let e = parse("machine_id: a\nengine: openai\n", &[]).unwrap_err();
        assert_eq!(e.key, "openai_base_url");
        let e = parse("machine_id: a\n", &[("BENCH_STREAM_FLUSH_SECONDS", "soon")]).unwrap_err();
        assert_eq!(e.key, "BENCH_STREAM_FLUSH_SECONDS");
        for bad in [
            "mock: {tokens_per_s: 1.0e-30}",
            "mock: {ttft_ms: 1.0e12}",
            "engine_idle_timeout_s: 1.0e20",
            "limits: {max_queue: 0}",
            "limits: {max_event_queue: 0}",
            "limits: {max_queue: 10, max_event_queue: 11}",
            "publish_window: 0",
            "publish_window: 100000",
            "engine_models_refresh_s: 0",
        ] {
            assert!(
                parse(&format!("machine_id: a\n{bad}\n"), &[]).is_err(),
                "{bad}"
            );
        }
        let e = parse("machine_id: a\nengine: gpt\n", &[]).unwrap_err();
        assert!(e.problem.contains("gpt"), "{e}");
    }

    #[test]
    fn the_example_config_parses() {
        let c = parse(include_str!("../config/agent.example.yaml"), &[]).unwrap();
        assert_eq!(c.telemetry, TelemetryConfig::default());
    }

    #[test]
    fn telemetry_section() {
        let c = parse("machine_id: a\n", &[]).unwrap();
        assert_eq!(c.telemetry, TelemetryConfig::default());
        assert_eq!(c.telemetry.interval, Duration::from_millis(250));
        let c = parse(
            "machine_id: a\ntelemetry: {enabled: false, interval_ms: 50, rapl_root: /tmp/pc, nvml: false, apple_power: off}\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.telemetry,
            TelemetryConfig {
                enabled: false,
                interval: Duration::from_millis(50),
                rapl_root: PathBuf::from("/tmp/pc"),
                nvml: false,
                apple_power: ApplePower::Off,
            }
        );
        for (yaml, want) in [
            ("macmon", ApplePower::Macmon),
            ("powermetrics", ApplePower::Powermetrics),
            ("auto", ApplePower::Auto),
        ] {
            let c = parse(
                &format!("machine_id: a\ntelemetry: {{apple_power: {yaml}}}\n"),
                &[],
            )
            .unwrap();
            assert_eq!(c.telemetry.apple_power, want);
        }
        assert_eq!(
            parse("machine_id: a\ntelemetry: {interval_ms: 10000}\n", &[])
                .unwrap()
                .telemetry
                .interval,
            Duration::from_secs(10)
        );
        for bad in ["interval_ms: 49", "interval_ms: 10001", "interval_ms: 0"] {
            let e = parse(&format!("machine_id: a\ntelemetry: {{{bad}}}\n"), &[]).unwrap_err();
            assert_eq!(e.key, "telemetry.interval_ms", "{bad}");
            assert!(e.fix.contains("50..10000"), "{e}");
        }
        for bad in [
            "apple_power: always",
            "intervall_ms: 100",
            "interval_ms: -5",
        ] {
            assert!(
                parse(&format!("machine_id: a\ntelemetry: {{{bad}}}\n"), &[]).is_err(),
                "{bad}"
            );
        }
    }
}
