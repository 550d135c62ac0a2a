//! The job a client submits on `bench.jobs.<machine_id>` or `bench.jobs.all`.

use crate::error::{ErrorBody, ErrorCode};
use crate::ids::{validate_job_id, validate_machine_id};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Default `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 128;
/// Default `num_ctx`.
pub const DEFAULT_NUM_CTX: u32 = 2048;
/// How far ahead `start_at_ms` may be.
pub const MAX_START_DELAY_MS: u64 = 10 * 60 * 1000;
/// Default `temperature`: greedy decoding, so repeated runs produce the same tokens.
pub const DEFAULT_TEMPERATURE: f64 = 0.0;

/// How the prompt reaches the engine.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Raw completion: Ollama `/api/generate`, OpenAI `/v1/completions`.
    #[default]
    Generate,
    /// One user message: Ollama `/api/chat`, OpenAI `/v1/chat/completions`.
    Chat,
}

/// Which agents take part in a broadcast job. Agents that don't match stay silent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum Selector {
    /// Only these machine ids.
    Machines(Vec<String>),
    /// Only agents whose configured labels contain every pair.
    Labels(BTreeMap<String, String>),
}

impl Selector {
    /// Whether an agent with this id and these labels takes part.
    pub fn matches(&self, machine_id: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::Machines(ids) => ids.iter().any(|m| m == machine_id),
            Selector::Labels(want) => want.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }
}

/// When a job starts on each agent.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartMode {
    /// As soon as the agent is free (the default).
    #[default]
    Immediate,
    /// At `start_at_ms` (wall clock), so a broadcast race starts simultaneously.
    Together,
}

fn default_test_type() -> String {
    crate::TEST_LLM_GENERATE.to_string()
}
fn default_max_tokens() -> u32 {
    DEFAULT_MAX_TOKENS
}
fn default_num_ctx() -> u32 {
    DEFAULT_NUM_CTX
}
fn default_temperature() -> f64 {
    DEFAULT_TEMPERATURE
}
fn default_one() -> u32 {
    1
}
fn default_true() -> bool {
    true
}
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A benchmark job. Field names are the original bench-race's; unknown fields are refused so a
/// typo (`max_token`) is an error rather than a silently ignored setting.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Assigned by the agent (a UUID) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Only `llm_generate` in this version.
    #[serde(default = "default_test_type")]
    pub test_type: String,
    /// Engine model name (`llama3.1:8b`, `gemma-3-270m`, ...).
    #[serde(default)]
    pub model: String,
    /// The prompt text.
    #[serde(default)]
    pub prompt: String,
    /// Most tokens to generate.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Sampling temperature.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Context window requested from the engine.
    #[serde(default = "default_num_ctx")]
    pub num_ctx: u32,
    /// Sampling seed, passed to the engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Measured repeats.
    #[serde(default = "default_one")]
    pub repeat: u32,
    /// Unmeasured repeats run first (model load, caches).
    #[serde(default)]
    pub warmup: u32,
    /// Stream tokens (always true for measurements; kept for compatibility).
    #[serde(default = "default_true")]
    pub stream: bool,
    /// Backend name when the agent has more than one configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Raw completion or chat.
    #[serde(default, skip_serializing_if = "is_default")]
    pub mode: Mode,
    /// Free text carried into the results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_label: Option<String>,
    /// Unix ms after which an agent refuses the job (`expired`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Broadcast filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Start immediately or together.
    #[serde(default, skip_serializing_if = "is_default")]
    pub start: StartMode,
    /// Unix ms at which a `start: together` job begins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at_ms: Option<u64>,
}

/// Limits an agent enforces on incoming jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct JobLimits {
    /// Largest prompt in bytes.
    pub max_prompt_bytes: usize,
    /// Largest `max_tokens`.
    pub max_tokens: u32,
    /// Largest `repeat + warmup`.
    pub max_runs: u32,
    /// Largest `num_ctx`.
    pub max_num_ctx: u32,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_prompt_bytes: 64 * 1024,
            max_tokens: 8192,
            max_runs: 100,
            max_num_ctx: 1 << 20,
        }
    }
}

impl Job {
    /// A job with defaults for everything but model and prompt.
    pub fn new(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            job_id: None,
            test_type: default_test_type(),
            model: model.into(),
            prompt: prompt.into(),
            max_tokens: DEFAULT_MAX_TOKENS,
            temperature: DEFAULT_TEMPERATURE,
            num_ctx: DEFAULT_NUM_CTX,
            seed: None,
            repeat: 1,
            warmup: 0,
            stream: true,
            backend: None,
            mode: Mode::Generate,
            run_label: None,
            expires_at: None,
            selector: None,
            start: StartMode::Immediate,
            start_at_ms: None,
        }
    }

    /// Checks everything that does not need the engine. The model's existence is the
    /// backend's to check.
    pub fn validate(&self, limits: &JobLimits) -> Result<(), ErrorBody> {
        let bad = |code, msg: String| Err(ErrorBody::new(code, msg));
        if let Some(id) = &self.job_id {
            validate_job_id(id).map_err(|e| ErrorBody::new(ErrorCode::InvalidId, e.to_string()))?;
        }
        if self.test_type != crate::TEST_LLM_GENERATE {
            return bad(
                ErrorCode::UnknownTestType,
                format!(
                    "test_type {:?} is not supported; use \"llm_generate\"",
                    self.test_type
                ),
            );
        }
        if self.model.trim().is_empty() {
            return bad(ErrorCode::MissingModel, "model is required".into());
        }
        if self.prompt.is_empty() {
            return bad(ErrorCode::InvalidJob, "prompt is empty".into());
        }
        if self.prompt.len() > limits.max_prompt_bytes {
            return bad(
                ErrorCode::PromptTooLarge,
                format!(
                    "prompt is {} bytes; this agent accepts at most {} (agent config max_prompt_bytes)",
                    self.prompt.len(),
                    limits.max_prompt_bytes
                ),
            );
        }
        if self.max_tokens == 0 || self.max_tokens > limits.max_tokens {
            return bad(
                ErrorCode::InvalidMaxTokens,
                format!(
                    "max_tokens must be 1..={}, got {}",
                    limits.max_tokens, self.max_tokens
                ),
            );
        }
        if !(self.temperature.is_finite() && (0.0..=5.0).contains(&self.temperature)) {
            return bad(
                ErrorCode::InvalidJob,
                format!("temperature must be 0..=5, got {}", self.temperature),
            );
        }
        if self.num_ctx == 0 || self.num_ctx > limits.max_num_ctx {
            return bad(
                ErrorCode::InvalidJob,
                format!(
                    "num_ctx must be 1..={}, got {}",
                    limits.max_num_ctx, self.num_ctx
                ),
            );
        }
        if self.repeat == 0 || self.repeat.saturating_add(self.warmup) > limits.max_runs {
            return bad(
                ErrorCode::InvalidJob,
                format!(
                    "repeat must be >= 1 and repeat + warmup <= {}, got repeat {} warmup {}",
                    limits.max_runs, self.repeat, self.warmup
                ),
            );
        }
        if let Some(Selector::Machines(ids)) = &self.selector {
            for id in ids {
                validate_machine_id(id)
                    .map_err(|e| ErrorBody::new(ErrorCode::InvalidId, format!("selector: {e}")))?;
            }
        }
        if self.start == StartMode::Together && self.start_at_ms.is_none() {
            return bad(
                ErrorCode::InvalidJob,
                "start \"together\" needs start_at_ms".into(),
            );
        }
        Ok(())
    }

    /// Checks what depends on the clock (`now_ms`, Unix ms): not expired, and a shared start
    /// no further than [`MAX_START_DELAY_MS`] ahead (an agent runs one job at a time, so a
    /// start far in the future would park it).
    pub fn validate_times(&self, now_ms: u64) -> Result<(), ErrorBody> {
        if self.expires_at.is_some_and(|t| t < now_ms) {
            return Err(ErrorBody::new(
                ErrorCode::Expired,
                "expires_at is in the past",
            ));
        }
        match self.start_at_ms {
            Some(at) if at > now_ms.saturating_add(MAX_START_DELAY_MS) => Err(ErrorBody::new(
                ErrorCode::InvalidJob,
                format!(
                    "start_at_ms is more than {} s ahead",
                    MAX_START_DELAY_MS / 1000
                ),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_in() {
        let j: Job = serde_json::from_str(r#"{"model":"m","prompt":"p"}"#).unwrap();
        assert_eq!(j, Job::new("m", "p"));
        assert!(j.validate(&JobLimits::default()).is_ok());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e =
            serde_json::from_str::<Job>(r#"{"model":"m","prompt":"p","max_token":5}"#).unwrap_err();
        assert!(e.to_string().contains("max_token"), "{e}");
    }

    #[test]
    fn validation_codes() {
        let l = JobLimits {
            max_prompt_bytes: 10,
            ..JobLimits::default()
        };
        let code = |f: &dyn Fn(&mut Job)| {
            let mut j = Job::new("m", "p");
            f(&mut j);
            j.validate(&l).unwrap_err().code
        };
        assert_eq!(
            code(&|j| j.job_id = Some("a.b".into())),
            ErrorCode::InvalidId
        );
        assert_eq!(
            code(&|j| j.test_type = "whisper".into()),
            ErrorCode::UnknownTestType
        );
        assert_eq!(code(&|j| j.model = " ".into()), ErrorCode::MissingModel);
        assert_eq!(
            code(&|j| j.prompt = "x".repeat(11)),
            ErrorCode::PromptTooLarge
        );
        assert_eq!(code(&|j| j.max_tokens = 0), ErrorCode::InvalidMaxTokens);
        assert_eq!(
            code(&|j| j.max_tokens = 1_000_000),
            ErrorCode::InvalidMaxTokens
        );
        assert_eq!(code(&|j| j.repeat = 0), ErrorCode::InvalidJob);
        assert_eq!(code(&|j| j.temperature = f64::NAN), ErrorCode::InvalidJob);
    }

    #[test]
    fn selectors() {
        let labels: BTreeMap<String, String> =
            [("accelerator".to_string(), "nvidia".to_string())].into();
        let s: Selector = serde_json::from_str(r#"{"accelerator":"nvidia"}"#).unwrap();
        assert!(s.matches("x", &labels));
        assert!(!s.matches("x", &BTreeMap::new()));
        let s: Selector = serde_json::from_str(r#"["a","b"]"#).unwrap();
        assert!(s.matches("b", &BTreeMap::new()));
        assert!(!s.matches("c", &labels));
    }
}
