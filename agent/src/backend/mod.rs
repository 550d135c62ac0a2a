//! Inference engines behind one trait. A backend sends one generation request and turns the
//! engine's stream into [`Item`]s; timing is the runner's job, so every backend is measured by
//! the same clock.

mod lines;
pub mod mock;
pub mod ollama;
pub mod openai;

use bench_schemas::{EngineInfo, Missing, ModelInfo};
use bench_schemas::{ErrorBody, ErrorCode, Job, Mode, TokenCountSource};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use std::sync::Arc;

pub use lines::LineSplitter;

/// What one run asks the engine for.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// Model name.
    pub model: String,
    /// Prompt text.
    pub prompt: String,
    /// Raw completion or chat.
    pub mode: Mode,
    /// Token cap.
    pub max_tokens: u32,
    /// Temperature.
    pub temperature: f64,
    /// Context size (Ollama `num_ctx`; OpenAI servers take it at load time and ignore it here).
    pub num_ctx: u32,
    /// Seed.
    pub seed: Option<u64>,
    /// Generate exactly `max_tokens` (llama.cpp and vLLM `ignore_eos`), where the backend can.
    pub ignore_eos: bool,
    /// Whether the engine may serve the prompt's prefix from its cache (llama.cpp
    /// `cache_prompt`). `None`: the backend's configured default.
    pub cache_prompt: Option<bool>,
    /// The agent built the prompt to an exact size: send it without the model's template
    /// (Ollama `raw`).
    pub raw: bool,
}

impl From<&Job> for GenRequest {
    fn from(j: &Job) -> Self {
        let shape = j.shape();
        Self {
            model: j.model.clone(),
            prompt: j.prompt.clone(),
            mode: j.mode,
            max_tokens: shape.max_tokens,
            temperature: j.temperature,
            num_ctx: j.num_ctx,
            seed: j.seed,
            ignore_eos: shape.ignore_eos,
            cache_prompt: None,
            raw: false,
        }
    }
}

/// The engine's own account of a finished generation. Everything is optional: engines differ.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EngineReport {
    /// Generated tokens as the engine counted them, with where that count came from.
    pub gen_tokens: Option<(u64, TokenCountSource)>,
    /// Prompt tokens as the engine counted them (the whole prompt).
    pub prompt_tokens: Option<u64>,
    /// Prompt tokens the engine evaluated (not served from its cache).
    pub prompt_evaluated: Option<u64>,
    /// Model load time.
    pub load_ms: Option<f64>,
    /// Engine's decode time.
    pub gen_ms: Option<f64>,
    /// Engine's prompt time.
    pub prompt_ms: Option<f64>,
    /// Engine's end-to-end time.
    pub total_ms: Option<f64>,
    /// Engine's decode rate.
    pub gen_tokens_per_s: Option<f64>,
    /// Engine's prompt rate.
    pub prompt_tokens_per_s: Option<f64>,
    /// Why it stopped.
    pub done_reason: Option<String>,
}

/// One element of an engine stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// Generated text (possibly empty: role headers, keep-alives). `tokens` when the engine
    /// says how many tokens the chunk holds.
    Text {
        /// The text.
        text: String,
        /// Tokens in it.
        tokens: Option<u64>,
        /// A reasoning model's thinking (timed as generated text; not an answer token).
        reasoning: bool,
    },
    /// The engine's final message; the stream ends after it.
    Final(EngineReport),
}

/// The stream of a running generation.
pub type ItemStream = BoxStream<'static, Result<Item, ErrorBody>>;

/// An inference engine.
pub trait Backend: Send + Sync {
    /// `ollama`, `openai` or `mock`.
    fn kind(&self) -> &'static str;
    /// The engine's address (empty for mock).
    fn base_url(&self) -> &str;
    /// The models the engine has.
    fn list_models(&self) -> BoxFuture<'_, Result<Vec<String>, ErrorBody>>;
    /// Sends the request; resolves once the engine has answered with a streaming body.
    fn generate(&self, req: GenRequest) -> BoxFuture<'_, Result<ItemStream, ErrorBody>>;
    /// Whether `model` names the same model as `listed` (Ollama's `:latest` rule, say).
    fn same_model(&self, model: &str, listed: &str) -> bool {
        model == listed
    }
    /// The engine's tokenizer: the token ids of `text` as a prompt would be tokenized, without
    /// BOS. `Ok(None)` when the engine has no tokenizer endpoint (Ollama).
    fn tokenize<'a>(
        &'a self,
        _model: &'a str,
        _text: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u32>>, ErrorBody>> {
        Box::pin(async { Ok(None) })
    }
    /// The text of token ids (only called where [`Backend::tokenize`] answered).
    fn detokenize<'a>(
        &'a self,
        _model: &'a str,
        _tokens: &'a [u32],
    ) -> BoxFuture<'a, Result<String, ErrorBody>> {
        Box::pin(async {
            Err(ErrorBody::new(
                ErrorCode::EngineError,
                "this engine has no detokenizer",
            ))
        })
    }
    /// Whether a request can keep the engine from serving the prompt from its cache
    /// ([`GenRequest::cache_prompt`]). Where it cannot (Ollama), a cold job gets a unique first
    /// word per run instead.
    fn has_cache_switch(&self) -> bool {
        false
    }
    /// Whether the engine has `model` loaded now (Ollama `/api/ps`). `None`: it cannot say,
    /// and the agent goes by what it ran last.
    fn model_loaded<'a>(&'a self, _model: &'a str) -> BoxFuture<'a, Option<bool>> {
        Box::pin(async { None })
    }
    /// The engine's identity (server, version, build), asked before a job's first run. What
    /// it cannot say is listed in `missing`.
    fn engine_info(&self) -> BoxFuture<'_, EngineInfo> {
        Box::pin(async {
            EngineInfo {
                kind: self.kind().to_string(),
                missing: vec![Missing::new(
                    self.kind(),
                    "this backend reports no engine version",
                )],
                ..EngineInfo::default()
            }
        })
    }
    /// What the engine says about `model`: digest, parameters, quantisation, context length.
    fn model_info<'a>(&'a self, model: &'a str) -> BoxFuture<'a, ModelInfo> {
        Box::pin(async move {
            ModelInfo {
                name: model.to_string(),
                missing: vec![Missing::new(self.kind(), "this backend describes no model")],
                ..ModelInfo::default()
            }
        })
    }
}

/// How long one fingerprint question may take: the engine is idle between runs, so a slower
/// answer means the source is not there (the whole description is also bounded by the
/// engine's idle timeout, see [`crate::fingerprint::Described::refresh`]).
pub(crate) const INFO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// GETs (or POSTs `body` to) `url` for a JSON answer, bounded by [`INFO_TIMEOUT`]; the error is
/// a reason for `missing`.
pub(crate) async fn info_json(rb: reqwest::RequestBuilder) -> Result<serde_json::Value, String> {
    let resp = rb
        .timeout(INFO_TIMEOUT)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("answered {status}"));
    }
    resp.json()
        .await
        .map_err(|e| format!("not JSON: {}", e.without_url()))
}

/// A shared backend.
pub type DynBackend = Arc<dyn Backend>;

/// A reqwest client for engines: no overall timeout (streams are long), short connect timeout.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        // No pooled connections: llama-server closes kept-alive ones under us (a reused one failed
        // ~1 run in 5 with "error sending request"), and a fresh connection per run keeps TTFT
        // comparable between runs.
        .pool_max_idle_per_host(0)
        .build()
        .expect("http client")
}

/// Maps a transport error on the request itself.
pub(crate) fn request_error(url: &str, e: reqwest::Error) -> ErrorBody {
    if e.is_connect() {
        ErrorBody::new(
            ErrorCode::EngineUnreachable,
            format!("cannot connect to the engine at {url}: {e}"),
        )
    } else if e.is_timeout() {
        ErrorBody::new(
            ErrorCode::Timeout,
            format!("engine at {url} timed out: {e}"),
        )
    } else {
        ErrorBody::new(
            ErrorCode::StreamBroken,
            format!("engine at {url} failed: {e}"),
        )
    }
}

/// Reads an engine's JSON answer: an error status becomes its coded error, a body that is not
/// JSON an `engine_error` naming the address.
pub(crate) async fn read_json(
    base_url: &str,
    resp: reqwest::Response,
) -> Result<serde_json::Value, ErrorBody> {
    if !resp.status().is_success() {
        return Err(status_error(base_url, "", resp).await);
    }
    let url = resp.url().to_string();
    resp.json()
        .await
        .map_err(|e| ErrorBody::new(ErrorCode::EngineError, format!("{url}: {e}")))
}

/// Maps a transport error while reading the streaming body.
pub(crate) fn body_error(url: &str, e: reqwest::Error) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::StreamBroken,
        format!("stream from {url} broke: {e}"),
    )
}

/// Reads an error response into a code: a 404 that talks about the model is `model_not_found`.
pub(crate) async fn status_error(url: &str, model: &str, resp: reqwest::Response) -> ErrorBody {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let detail = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            Some(
                e.get("message")
                    .and_then(|m| m.as_str())
                    .or(e.as_str())?
                    .to_string(),
            )
        })
        .unwrap_or_else(|| body.chars().take(300).collect());
    let code = if status == reqwest::StatusCode::NOT_FOUND
        && (detail.contains("model") || detail.contains(model))
    {
        ErrorCode::ModelNotFound
    } else {
        ErrorCode::EngineError
    };
    ErrorBody::new(code, format!("engine at {url} answered {status}: {detail}"))
}
