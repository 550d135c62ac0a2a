//! The job a client submits on `bench.jobs.<machine_id>` or `bench.jobs.all`.

use crate::error::{ErrorBody, ErrorCode};
use crate::ids::{validate_job_id, validate_machine_id};
use crate::matrix::{Matrix, Order, Slo, MAX_CONCURRENCY, MAX_DURATION_S, MAX_JOB_RUNS};
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
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum Selector {
    /// Only these machine ids.
    Machines(Vec<String>),
    /// Only agents whose configured labels contain every pair.
    Labels(BTreeMap<String, String>),
}

/// A list is [`Selector::Machines`], a map [`Selector::Labels`], read in one pass. (serde's
/// `untagged` would first copy the whole value into a buffer and then try each variant: twice
/// the work for every agent of a broadcast that lists the fleet's ids.)
impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = Selector;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of machine ids or a map of labels")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Selector, A::Error> {
                let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(id) = seq.next_element::<String>()? {
                    ids.push(id);
                }
                Ok(Selector::Machines(ids))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Selector, A::Error> {
                let mut labels = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    labels.insert(k, v);
                }
                Ok(Selector::Labels(labels))
            }
        }
        d.deserialize_any(Either)
    }
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

/// How many measured repeats: a number, or `"auto"`: repeat until the decode rate's 95%
/// interval is narrower than `target_ci_pct` or the race is decided, at most `max_repeat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// Exactly this many.
    Count(u32),
    /// Until the interval or the race says stop.
    Auto,
}

impl Default for Repeat {
    fn default() -> Self {
        Self::Count(1)
    }
}

impl Serialize for Repeat {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Count(n) => s.serialize_u32(*n),
            Self::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Repeat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u32),
            S(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("repeat must be a whole number or \"auto\""))?
        {
            Raw::N(n) => Ok(Self::Count(n)),
            Raw::S(s) if s == "auto" => Ok(Self::Auto),
            Raw::S(s) => Err(serde::de::Error::custom(format!(
                "repeat must be a whole number or \"auto\", got {s:?}"
            ))),
        }
    }
}

/// Whether measured prompts may be served from the engine's prompt cache.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Every measured repeat processes its whole prompt (the default).
    #[default]
    Cold,
    /// Repeats may reuse the engine's cached prompt.
    Warm,
}

/// A named test shape, llama-bench's `ppN-tgM`: a prompt of exactly N tokens, then exactly M
/// generated tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// Prompt tokens.
    pub pp: u32,
    /// Generated tokens.
    pub tg: u32,
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("profile must look like \"pp512-tg128\", got {s:?}");
        let (pp, tg) = s.split_once('-').ok_or_else(bad)?;
        let num = |part: &str, prefix: &str| {
            part.strip_prefix(prefix)
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(bad)
        };
        Ok(Self {
            pp: num(pp, "pp")?,
            tg: num(tg, "tg")?,
        })
    }
}

/// Default `max_repeat` for `repeat: "auto"`.
pub const DEFAULT_MAX_REPEAT: u32 = 20;
/// Default `target_ci_pct` for `repeat: "auto"`.
pub const DEFAULT_TARGET_CI_PCT: f64 = 2.0;

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
    /// The prompt text. With `prompt_tokens` it is the material the exact-size prompt is built
    /// from (a fixed text when empty).
    #[serde(default)]
    pub prompt: String,
    /// Build a prompt of exactly this many tokens for the model (as the engine counts them,
    /// BOS included, like llama-bench's `-p`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
    /// Tokens of context already filled before the measured prompt (llama-bench's `-d`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub depth: u32,
    /// `ppN-tgM`: sets `prompt_tokens` N, `max_tokens` M and `ignore_eos`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Generate exactly `max_tokens` (where the engine allows it). Default: on for
    /// `prompt_tokens`/`profile` jobs, off for free prompts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
    /// Count runs flagged `short_output` in the summary.
    #[serde(default, skip_serializing_if = "is_default")]
    pub include_short: bool,
    /// `cold` (default): every measured prompt is processed in full; `warm`: may be cached.
    #[serde(default, skip_serializing_if = "is_default")]
    pub cache: CacheMode,
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
    /// Measured repeats: a number or `"auto"`.
    #[serde(default)]
    pub repeat: Repeat,
    /// `repeat: "auto"`: most measured repeats (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_repeat: Option<u32>,
    /// `repeat: "auto"`: stop once the decode rate's 95% interval half-width is under this
    /// percentage of its median (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ci_pct: Option<f64>,
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
    /// Lists of values to race every combination of ([`crate::matrix`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix: Option<Matrix>,
    /// Cells one after another (default) or `interleaved` per repeat.
    #[serde(default, skip_serializing_if = "is_default")]
    pub order: Order,
    /// Concurrent closed-loop streams: makes the job (or cell) a load test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Load: measured requests per stream (default: `repeat`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u32>,
    /// Load: streams keep starting requests for this long instead of a count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<u32>,
    /// The objective a concurrency sweep's capacity is judged against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slo: Option<Slo>,
}

/// What a job measures once its profile is applied.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Exact prompt size in tokens, when the job asks for one.
    pub prompt_tokens: Option<u32>,
    /// Context filled before the measured prompt.
    pub depth: u32,
    /// Tokens to generate.
    pub max_tokens: u32,
    /// Whether generation must run to `max_tokens`.
    pub ignore_eos: bool,
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
            prompt_tokens: None,
            depth: 0,
            profile: None,
            ignore_eos: None,
            include_short: false,
            cache: CacheMode::Cold,
            max_repeat: None,
            target_ci_pct: None,
            max_tokens: DEFAULT_MAX_TOKENS,
            temperature: DEFAULT_TEMPERATURE,
            num_ctx: DEFAULT_NUM_CTX,
            seed: None,
            repeat: Repeat::Count(1),
            warmup: 0,
            stream: true,
            backend: None,
            mode: Mode::Generate,
            run_label: None,
            expires_at: None,
            selector: None,
            start: StartMode::Immediate,
            start_at_ms: None,
            matrix: None,
            order: Order::Sequential,
            concurrency: None,
            requests: None,
            duration_s: None,
            slo: None,
        }
    }

    /// Checks everything that does not need the engine. The model's existence is the
    /// backend's to check. A matrix job is checked as a whole and then cell by cell (an error
    /// in a cell names it).
    pub fn validate(&self, limits: &JobLimits) -> Result<(), ErrorBody> {
        let Some(m) = self.matrix.as_ref().filter(|m| !m.is_empty()) else {
            return self.validate_cell(limits);
        };
        crate::matrix::validate_matrix(self, m)
            .map_err(|e| ErrorBody::new(ErrorCode::InvalidJob, e))?;
        if let Some(slo) = &self.slo {
            validate_slo(slo)?;
        }
        let cells = self.cells();
        for cell in &cells {
            cell.job.validate_cell(limits).map_err(|mut e| {
                e.message = format!("cell {}: {}", cell.key, e.message);
                e
            })?;
        }
        let runs = crate::matrix::max_job_runs(&cells, limits.max_runs);
        if runs > MAX_JOB_RUNS {
            return Err(ErrorBody::new(
                ErrorCode::InvalidJob,
                format!(
                    "the matrix asks for up to {runs} runs over its {} cells (warmups, a cold run and repeats of each; a load cell every request); at most {MAX_JOB_RUNS}: fewer cells, repeats or requests",
                    cells.len()
                ),
            ));
        }
        Ok(())
    }

    fn validate_cell(&self, limits: &JobLimits) -> Result<(), ErrorBody> {
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
        if let Some(p) = &self.profile {
            let prof: Profile = p
                .parse()
                .map_err(|e| ErrorBody::new(ErrorCode::InvalidJob, e))?;
            if self.prompt_tokens.is_some_and(|n| n != prof.pp) {
                return bad(
                    ErrorCode::InvalidJob,
                    format!(
                        "profile {p} sets prompt_tokens {}; drop prompt_tokens or make it agree",
                        prof.pp
                    ),
                );
            }
        }
        if self.prompt.is_empty() && self.prompt_tokens.is_none() && self.profile.is_none() {
            return bad(
                ErrorCode::InvalidJob,
                "prompt is empty (give a prompt, prompt_tokens or a profile)".into(),
            );
        }
        if (self.prompt_tokens.is_some() || self.profile.is_some() || self.depth > 0)
            && self.mode == Mode::Chat
        {
            return bad(
                ErrorCode::InvalidJob,
                "prompt_tokens, profile and depth need mode \"generate\": a chat template adds tokens the agent cannot hold exact".into(),
            );
        }
        if self.prompt_tokens == Some(0) {
            return bad(ErrorCode::InvalidJob, "prompt_tokens must be >= 1".into());
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
        match self.repeat {
            Repeat::Count(n) => {
                if self.max_repeat.is_some() || self.target_ci_pct.is_some() {
                    return bad(
                        ErrorCode::InvalidJob,
                        "max_repeat and target_ci_pct go with repeat \"auto\"".into(),
                    );
                }
                if n == 0 || n.saturating_add(self.warmup) > limits.max_runs {
                    return bad(
                        ErrorCode::InvalidJob,
                        format!(
                            "repeat must be >= 1 and repeat + warmup <= {}, got repeat {n} warmup {}",
                            limits.max_runs, self.warmup
                        ),
                    );
                }
            }
            Repeat::Auto => {
                let max = self.max_repeat();
                let min = crate::metrics::MIN_CI_SAMPLES as u32;
                if max < min || max.saturating_add(self.warmup) > limits.max_runs {
                    return bad(
                        ErrorCode::InvalidJob,
                        format!(
                            "max_repeat must be {min}..={} (a 95% interval of the median needs {min} runs; max_repeat + warmup <= {}), got {max}",
                            limits.max_runs.saturating_sub(self.warmup),
                            limits.max_runs
                        ),
                    );
                }
                let t = self.target_ci_pct();
                if !(t.is_finite() && t > 0.0 && t <= 100.0) {
                    return bad(
                        ErrorCode::InvalidJob,
                        format!("target_ci_pct must be > 0 and <= 100, got {t}"),
                    );
                }
            }
        }
        let shape = self.shape();
        let need = u64::from(shape.prompt_tokens.unwrap_or(0))
            + u64::from(self.depth)
            + u64::from(shape.max_tokens);
        if shape.prompt_tokens.is_some() && need > u64::from(self.num_ctx) {
            return bad(
                ErrorCode::InvalidJob,
                format!(
                    "depth + prompt_tokens + max_tokens is {need} tokens, more than num_ctx {}; raise num_ctx",
                    self.num_ctx
                ),
            );
        }
        if shape.max_tokens > limits.max_tokens {
            return bad(
                ErrorCode::InvalidMaxTokens,
                format!(
                    "max_tokens must be 1..={}, got {} (from the profile)",
                    limits.max_tokens, shape.max_tokens
                ),
            );
        }
        if let Some(Selector::Machines(ids)) = &self.selector {
            for id in ids {
                validate_machine_id(id)
                    .map_err(|e| ErrorBody::new(ErrorCode::InvalidId, format!("selector: {e}")))?;
            }
        }
        if self.is_load() {
            self.validate_load(limits)?;
        }
        if let Some(slo) = &self.slo {
            validate_slo(slo)?;
        }
        if self.start == StartMode::Together && self.start_at_ms.is_none() {
            return bad(
                ErrorCode::InvalidJob,
                "start \"together\" needs start_at_ms".into(),
            );
        }
        Ok(())
    }

    fn validate_load(&self, limits: &JobLimits) -> Result<(), ErrorBody> {
        let bad = |msg: String| Err(ErrorBody::new(ErrorCode::InvalidJob, msg));
        let c = self.concurrency.unwrap_or(1);
        if c == 0 || c > MAX_CONCURRENCY {
            return bad(format!(
                "concurrency must be 1..={MAX_CONCURRENCY}, got {c}"
            ));
        }
        let Repeat::Count(n) = self.repeat else {
            return bad("repeat \"auto\" stops on a single stream's interval; a load cell (concurrency, requests, duration_s) needs a number of requests".into());
        };
        if self.requests.is_some() && self.duration_s.is_some() {
            return bad("give requests (per stream) or duration_s, not both".into());
        }
        if let Some(d) = self.duration_s {
            if d == 0 || d > MAX_DURATION_S {
                return bad(format!("duration_s must be 1..={MAX_DURATION_S}, got {d}"));
            }
        }
        let per_stream = self.requests.unwrap_or(n);
        let total = u64::from(per_stream) * u64::from(c) + u64::from(self.warmup);
        if per_stream == 0 || total > u64::from(limits.max_runs) {
            return bad(format!(
                "concurrency x requests + warmup must be 1..={} (agent config max_runs), got {c} x {per_stream} + {}",
                limits.max_runs, self.warmup
            ));
        }
        Ok(())
    }

    /// Load: measured requests each stream runs (`requests`, else `repeat`); with
    /// `duration_s`, the most the whole cell may run.
    pub fn requests_per_stream(&self) -> u32 {
        self.requests.unwrap_or(match self.repeat {
            Repeat::Count(n) => n,
            Repeat::Auto => 1,
        })
    }

    /// The shape the job asks for, with its profile applied: call after [`Job::validate`].
    pub fn shape(&self) -> Shape {
        let profile = self
            .profile
            .as_deref()
            .and_then(|p| p.parse::<Profile>().ok());
        let prompt_tokens = profile.map(|p| p.pp).or(self.prompt_tokens);
        let max_tokens = profile.map_or(self.max_tokens, |p| p.tg);
        Shape {
            prompt_tokens,
            depth: self.depth,
            max_tokens,
            ignore_eos: self.ignore_eos.unwrap_or(prompt_tokens.is_some()),
        }
    }

    /// The most measured repeats this job may run.
    pub fn max_repeat(&self) -> u32 {
        match self.repeat {
            Repeat::Count(n) => n,
            Repeat::Auto => self.max_repeat.unwrap_or(DEFAULT_MAX_REPEAT),
        }
    }

    /// The precision `repeat: "auto"` aims at, in percent of the median.
    pub fn target_ci_pct(&self) -> f64 {
        self.target_ci_pct.unwrap_or(DEFAULT_TARGET_CI_PCT)
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

fn validate_slo(slo: &Slo) -> Result<(), ErrorBody> {
    match slo.ttft_p99_ms {
        Some(t) if !(t.is_finite() && t > 0.0) => Err(ErrorBody::new(
            ErrorCode::InvalidJob,
            format!("slo.ttft_p99_ms must be > 0, got {t}"),
        )),
        _ => Ok(()),
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
        assert_eq!(
            code(&|j| j.repeat = Repeat::Count(0)),
            ErrorCode::InvalidJob
        );
        assert_eq!(
            code(&|j| j.profile = Some("pp512".into())),
            ErrorCode::InvalidJob
        );
        assert_eq!(
            code(&|j| {
                j.profile = Some("pp8-tg4".into());
                j.prompt_tokens = Some(9);
            }),
            ErrorCode::InvalidJob
        );
        assert_eq!(
            code(&|j| {
                j.prompt_tokens = Some(8);
                j.mode = Mode::Chat;
            }),
            ErrorCode::InvalidJob
        );
        assert_eq!(
            code(&|j| {
                j.prompt_tokens = Some(2000);
                j.depth = 100;
            }),
            ErrorCode::InvalidJob
        );
        assert_eq!(
            code(&|j| {
                j.repeat = Repeat::Auto;
                j.max_repeat = Some(5);
            }),
            ErrorCode::InvalidJob
        );
        assert_eq!(
            code(&|j| {
                j.repeat = Repeat::Auto;
                j.target_ci_pct = Some(0.0);
            }),
            ErrorCode::InvalidJob
        );
        assert_eq!(code(&|j| j.max_repeat = Some(9)), ErrorCode::InvalidJob);
        assert_eq!(code(&|j| j.temperature = f64::NAN), ErrorCode::InvalidJob);
    }

    #[test]
    fn shapes_profiles_and_auto_repeat() {
        let j: Job = serde_json::from_str(
            r#"{"model":"m","profile":"pp512-tg128","repeat":"auto","depth":256,"num_ctx":4096}"#,
        )
        .unwrap();
        assert!(j.validate(&JobLimits::default()).is_ok());
        assert_eq!(
            j.shape(),
            Shape {
                prompt_tokens: Some(512),
                depth: 256,
                max_tokens: 128,
                ignore_eos: true
            }
        );
        assert_eq!((j.max_repeat(), j.target_ci_pct()), (20, 2.0));
        let back: Job = serde_json::from_str(&serde_json::to_string(&j).unwrap()).unwrap();
        assert_eq!(back, j);
        let e = serde_json::from_str::<Job>(r#"{"model":"m","prompt":"p","repeat":"many"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("auto"), "{e}");
        let free = Job::new("m", "p");
        assert!(!free.shape().ignore_eos);
        assert_eq!(free.shape().prompt_tokens, None);
        assert_eq!("pp1-tg2".parse::<Profile>(), Ok(Profile { pp: 1, tg: 2 }));
        assert!("pp0-tg2".parse::<Profile>().is_err());
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
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"["a","b"]"#);
        for bad in ["7", r#""x""#, r#"[1]"#, r#"{"a":1}"#, "null"] {
            let e = serde_json::from_str::<Selector>(bad)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("list of machine ids or a map of labels") || e.contains("invalid type"),
                "{bad}: {e}"
            );
        }
    }
}
