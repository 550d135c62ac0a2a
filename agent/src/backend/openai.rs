//! OpenAI-compatible servers (llama.cpp `llama-server`, vLLM, LM Studio, SGLang): streaming
//! Server-Sent Events from `/v1/completions` and `/v1/chat/completions`, token counts from
//! `usage` (asked for with `stream_options.include_usage`) and llama.cpp's `timings` when sent.

use super::lines::parse_lines;
use super::{
    info_json, read_json, request_error, status_error, Backend, EngineReport, GenRequest, Item,
    ItemStream,
};
use bench_schemas::{EngineInfo, ErrorBody, ErrorCode, Missing, Mode, ModelInfo, TokenCountSource};
use futures::future::BoxFuture;
use serde_json::{json, Value};

/// A backend for one OpenAI-compatible server.
pub struct OpenAi {
    base_url: String,
    api_key: Option<String>,
    extra_body: serde_json::Map<String, Value>,
    ignore_eos: bool,
    http: reqwest::Client,
}

impl OpenAi {
    /// `base_url` without `/v1`, like `http://127.0.0.1:8081`.
    pub fn new(base_url: impl Into<String>, api_key: Option<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key,
            extra_body: serde_json::Map::new(),
            ignore_eos: true,
            http: super::http_client(),
        }
    }

    /// Whether the server takes `ignore_eos` (llama.cpp and vLLM do; default true). Without it
    /// a fixed-length job's short runs are flagged `short_output`.
    pub fn with_ignore_eos(mut self, supported: bool) -> Self {
        self.ignore_eos = supported;
        self
    }

    /// Fields merged into every request body (`cache_prompt: false` for llama.cpp, say).
    pub fn with_extra_body(mut self, extra: serde_json::Map<String, Value>) -> Self {
        self.extra_body = extra;
        self
    }

    fn body(&self, req: &GenRequest) -> (&'static str, Value) {
        let (path, mut body) = Self::base_body(req);
        for (k, v) in &self.extra_body {
            body[k] = v.clone();
        }
        // Per-request settings the job decides override the configured defaults.
        if req.ignore_eos && self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Some(cache) = req.cache_prompt {
            body["cache_prompt"] = json!(cache);
        }
        (path, body)
    }

    fn base_body(req: &GenRequest) -> (&'static str, Value) {
        let mut body = json!({
            "model": req.model,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(seed) = req.seed {
            body["seed"] = json!(seed);
        }
        match req.mode {
            Mode::Generate => {
                body["prompt"] = json!(req.prompt);
                ("/v1/completions", body)
            }
            Mode::Chat => {
                body["messages"] = json!([{"role": "user", "content": req.prompt}]);
                ("/v1/chat/completions", body)
            }
        }
    }

    fn authorize(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }
}

/// Accumulates what the chunks say about the whole generation until `[DONE]`.
#[derive(Default)]
pub struct SseParser {
    report: EngineReport,
    usage_tokens: Option<u64>,
    timings_tokens: Option<u64>,
}

impl SseParser {
    /// Parses one SSE line.
    pub fn line(&mut self, line: &str) -> Result<Vec<Item>, ErrorBody> {
        let Some(data) = line.strip_prefix("data:") else {
            return Ok(vec![]); // blank separators, `event:`, `: comments`
        };
        let data = data.trim();
        if data == "[DONE]" {
            let mut report = std::mem::take(&mut self.report);
            report.gen_tokens = self
                .timings_tokens
                .map(|n| (n, TokenCountSource::LlamacppTimings))
                .or(self
                    .usage_tokens
                    .map(|n| (n, TokenCountSource::OpenaiUsage)));
            return Ok(vec![Item::Final(report)]);
        }
        let v: Value = serde_json::from_str(data).map_err(|e| {
            ErrorBody::new(
                ErrorCode::StreamBroken,
                format!("server sent an event that is not JSON ({e}): {data:.200}"),
            )
        })?;
        if let Some(err) = v.get("error") {
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .or(err.as_str())
                .unwrap_or("unknown error");
            return Err(ErrorBody::new(
                ErrorCode::EngineError,
                format!("server error: {msg}"),
            ));
        }
        let mut items = Vec::new();
        if let Some(choice) = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        {
            // Reasoning (`reasoning_content` from llama.cpp/vLLM/DeepSeek, `reasoning`
            // elsewhere) is generated and counted in `completion_tokens`: time it with the answer.
            let str_at = |p: &str| {
                choice
                    .pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
            };
            let thinking = [
                str_at("/delta/reasoning_content"),
                str_at("/delta/reasoning"),
            ]
            .concat();
            let answer = [str_at("/text"), str_at("/delta/content")].concat();
            // A role-only delta (`{"role":"assistant"}`) or empty text is never a token.
            for (text, reasoning) in [(thinking, true), (answer, false)] {
                if !text.is_empty() {
                    items.push(Item::Text {
                        text,
                        tokens: None,
                        reasoning,
                    });
                }
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.report.done_reason = Some(reason.to_string());
            }
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage_tokens = u
                .get("completion_tokens")
                .and_then(Value::as_u64)
                .or(self.usage_tokens);
            if let Some(p) = u.get("prompt_tokens").and_then(Value::as_u64) {
                self.report.prompt_tokens = Some(p);
            }
        }
        if let Some(t) = v.get("timings").filter(|t| t.is_object()) {
            let f = |k: &str| t.get(k).and_then(Value::as_f64);
            self.timings_tokens = t
                .get("predicted_n")
                .and_then(Value::as_u64)
                .or(self.timings_tokens);
            // `prompt_n` counts only the tokens evaluated (not those served from the prompt
            // cache): `usage.prompt_tokens` is the prompt's size when both are sent.
            let evaluated = t.get("prompt_n").and_then(Value::as_u64);
            self.report.prompt_evaluated = evaluated.or(self.report.prompt_evaluated);
            let cached = t.get("cache_n").and_then(Value::as_u64);
            self.report.prompt_tokens = self.report.prompt_tokens.or(match (evaluated, cached) {
                (Some(e), Some(c)) => Some(e + c),
                (e, _) => e,
            });
            self.report.gen_ms = f("predicted_ms").or(self.report.gen_ms);
            self.report.prompt_ms = f("prompt_ms").or(self.report.prompt_ms);
            self.report.gen_tokens_per_s =
                f("predicted_per_second").or(self.report.gen_tokens_per_s);
            self.report.prompt_tokens_per_s =
                f("prompt_per_second").or(self.report.prompt_tokens_per_s);
            if let (Some(p), Some(g)) = (self.report.prompt_ms, self.report.gen_ms) {
                self.report.total_ms = Some(p + g);
            }
        }
        Ok(items)
    }
}

/// llama.cpp's file type name (`llama_model_ftype_name`: `Q4_K - Medium`, `IQ4_XS - 4.25 bpw`,
/// `Q8_0`) in the short form Ollama and file names use (`Q4_K_M`, `IQ4_XS`, `Q8_0`), so that
/// quantisations compare across engines.
pub fn short_quant(ftype: &str) -> String {
    match ftype.split_once(" - ") {
        None => ftype.trim().to_string(),
        Some((q, size)) => match size.trim() {
            "Small" => format!("{}_S", q.trim()),
            "Medium" => format!("{}_M", q.trim()),
            "Large" => format!("{}_L", q.trim()),
            _ => q.trim().to_string(),
        },
    }
}

/// One `/v1/models` entry: llama.cpp's `meta` (n_params, n_ctx_train, size, ftype), vLLM's
/// `max_model_len`.
fn read_listed(e: &Value, info: &mut ModelInfo) {
    if let Some(meta) = e.get("meta") {
        info.parameter_count = meta.get("n_params").and_then(Value::as_u64);
        info.context_length = meta.get("n_ctx_train").and_then(Value::as_u64);
        info.size_bytes = meta.get("size").and_then(Value::as_u64);
        if let Some(f) = meta.get("ftype").and_then(Value::as_str) {
            info.quantization = Some(short_quant(f));
        }
    }
    if let Some(n) = e.get("max_model_len").and_then(Value::as_u64) {
        info.context_length = Some(n);
    }
}

impl OpenAi {
    async fn get(&self, path: &str) -> Result<Value, String> {
        let url = format!("{}{path}", self.base_url);
        info_json(self.authorize(self.http.get(&url))).await
    }

    /// llama.cpp's `/props`: the loaded model's file and type, and the build.
    async fn props(&self) -> Option<Value> {
        self.get("/props")
            .await
            .ok()
            .filter(|v| v.get("build_info").is_some() || v.get("model_path").is_some())
    }
}

impl Backend for OpenAi {
    fn kind(&self) -> &'static str {
        "openai"
    }

    fn engine_info(&self) -> BoxFuture<'_, EngineInfo> {
        Box::pin(async move {
            let mut info = EngineInfo {
                kind: self.kind().to_string(),
                ..EngineInfo::default()
            };
            let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
            if let Some(p) = self.props().await {
                info.server = Some("llama.cpp".into());
                info.build = text(&p, "build_info");
                return info;
            }
            info.missing.push(Missing::new(
                "/props",
                "not a llama.cpp server (no build_info)",
            ));
            match self.get("/version").await {
                Ok(v) if v.get("version").is_some() => {
                    info.server = Some("vllm".into());
                    info.version = text(&v, "version");
                    return info;
                }
                Ok(_) => info
                    .missing
                    .push(Missing::new("/version", "no version field")),
                Err(e) => info.missing.push(Missing::new("/version", e)),
            }
            match self.get("/api/v0/models").await {
                Ok(_) => info.server = Some("lm-studio".into()),
                Err(e) => info.missing.push(Missing::new("/api/v0/models", e)),
            }
            info
        })
    }

    fn model_info<'a>(&'a self, model: &'a str) -> BoxFuture<'a, ModelInfo> {
        Box::pin(async move {
            let mut info = ModelInfo {
                name: model.to_string(),
                ..ModelInfo::default()
            };
            match self.get("/v1/models").await {
                Ok(v) => {
                    let entry = v.get("data").and_then(Value::as_array).and_then(|d| {
                        d.iter()
                            .find(|m| m.get("id").and_then(Value::as_str) == Some(model))
                    });
                    match entry {
                        Some(e) => read_listed(e, &mut info),
                        None => info
                            .missing
                            .push(Missing::new("/v1/models", format!("{model} is not listed"))),
                    }
                }
                Err(e) => info.missing.push(Missing::new("/v1/models", e)),
            }
            if let Some(p) = self.props().await {
                if let Some(ftype) = p.get("model_ftype").and_then(Value::as_str) {
                    info.quantization = Some(short_quant(ftype));
                }
                if let Some(path) = p.get("model_path").and_then(Value::as_str) {
                    if path.ends_with(".gguf") {
                        info.format = Some("gguf".into());
                    }
                    match crate::fingerprint::digest::file_sha256(path.into()).await {
                        Ok(d) => info.digest = Some(d),
                        Err(e) => info.missing.push(Missing::new("model file digest", e)),
                    }
                }
            } else if info.quantization.is_none() {
                match self.get(&format!("/api/v0/models/{model}")).await {
                    Ok(v) => {
                        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
                        info.quantization = text("quantization");
                        info.family = text("arch");
                        info.context_length = v.get("max_context_length").and_then(Value::as_u64);
                    }
                    Err(e) => info.missing.push(Missing::new(
                        "quantization",
                        format!("the engine does not say (/props absent, /api/v0/models: {e})"),
                    )),
                }
            }
            info
        })
    }

    // llama.cpp `cache_prompt` (vLLM and LM Studio ignore it; their free prompts run as sent).
    fn has_cache_switch(&self) -> bool {
        true
    }

    fn base_url(&self) -> &str {
        &self.base_url
    }

    fn list_models(&self) -> BoxFuture<'_, Result<Vec<String>, ErrorBody>> {
        Box::pin(async move {
            let url = format!("{}/v1/models", self.base_url);
            let resp = self
                .authorize(self.http.get(&url))
                .send()
                .await
                .map_err(|e| request_error(&self.base_url, e))?;
            let v = read_json(&self.base_url, resp).await?;
            Ok(v.get("data")
                .and_then(Value::as_array)
                .map(|ms| {
                    ms.iter()
                        .filter_map(|m| m.get("id")?.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default())
        })
    }

    fn tokenize<'a>(
        &'a self,
        _model: &'a str,
        text: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u32>>, ErrorBody>> {
        Box::pin(async move {
            // llama.cpp and vLLM: `POST /tokenize`; a server without it (LM Studio) answers 404.
            let url = format!("{}/tokenize", self.base_url);
            let resp = self
                .authorize(self.http.post(&url))
                .json(&json!({"content": text, "prompt": text, "add_special": false}))
                .send()
                .await
                .map_err(|e| request_error(&self.base_url, e))?;
            if matches!(resp.status().as_u16(), 404 | 405 | 501) {
                return Ok(None);
            }
            let v = read_json(&self.base_url, resp).await?;
            let ids = v
                .get("tokens")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    ErrorBody::new(
                        ErrorCode::EngineError,
                        format!("{url} answered without a tokens list"),
                    )
                })?
                .iter()
                .map(|t| {
                    // llama.cpp answers ids, or `{id, piece}` with `with_pieces`.
                    t.as_u64()
                        .or_else(|| t.get("id").and_then(Value::as_u64))
                        .map(|id| id as u32)
                })
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| {
                    ErrorBody::new(
                        ErrorCode::EngineError,
                        format!("{url}: a token is not an id"),
                    )
                })?;
            Ok(Some(ids))
        })
    }

    fn detokenize<'a>(
        &'a self,
        _model: &'a str,
        tokens: &'a [u32],
    ) -> BoxFuture<'a, Result<String, ErrorBody>> {
        Box::pin(async move {
            let url = format!("{}/detokenize", self.base_url);
            let resp = self
                .authorize(self.http.post(&url))
                .json(&json!({"tokens": tokens}))
                .send()
                .await
                .map_err(|e| request_error(&self.base_url, e))?;
            let v = read_json(&self.base_url, resp).await?;
            v.get("content")
                .or_else(|| v.get("prompt"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| {
                    ErrorBody::new(
                        ErrorCode::EngineError,
                        format!("{url} answered without content"),
                    )
                })
        })
    }

    fn generate(&self, req: GenRequest) -> BoxFuture<'_, Result<ItemStream, ErrorBody>> {
        Box::pin(async move {
            let (path, body) = self.body(&req);
            let url = format!("{}{path}", self.base_url);
            let resp = self
                .authorize(self.http.post(&url))
                .json(&body)
                .send()
                .await
                .map_err(|e| request_error(&self.base_url, e))?;
            if !resp.status().is_success() {
                return Err(status_error(&self.base_url, &req.model, resp).await);
            }
            let mut parser = SseParser::default();
            Ok(parse_lines(resp, self.base_url.clone(), move |l| {
                parser.line(l)
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantisation_names_match_ollama_s() {
        for (ftype, short) in [
            ("Q4_K - Medium", "Q4_K_M"),
            ("Q3_K - Small", "Q3_K_S"),
            ("Q3_K - Large", "Q3_K_L"),
            ("IQ4_XS - 4.25 bpw", "IQ4_XS"),
            ("Q8_0", "Q8_0"),
            ("BF16", "BF16"),
        ] {
            assert_eq!(short_quant(ftype), short, "{ftype}");
        }
    }

    #[test]
    fn llamacpp_models_entry() {
        // llama-server's `/v1/models` entry (recorded from the demo engine, build b0-unknown).
        let e: Value = serde_json::from_str(r#"{"id":"gemma-3-270m","aliases":["gemma-3-270m"],"object":"model","owned_by":"llamacpp","meta":{"vocab_type":1,"n_vocab":262144,"n_ctx":4096,"n_ctx_train":32768,"n_embd":640,"n_params":268098176,"size":246587904,"ftype":"Q4_K - Medium"}}"#).unwrap();
        let mut m = ModelInfo::default();
        read_listed(&e, &mut m);
        assert_eq!(m.parameter_count, Some(268_098_176));
        assert_eq!(m.context_length, Some(32768));
        assert_eq!(m.size_bytes, Some(246_587_904));
        assert_eq!(m.quantization.as_deref(), Some("Q4_K_M"));
    }

    #[test]
    fn llamacpp_stream() {
        let mut p = SseParser::default();
        assert_eq!(
            p.line(r#"data: {"choices":[{"text":"Hel","index":0,"finish_reason":null}]}"#)
                .unwrap(),
            vec![Item::Text {
                text: "Hel".into(),
                tokens: None,
                reasoning: false,
            }]
        );
        assert!(p.line("").unwrap().is_empty());
        p.line(r#"data: {"choices":[{"text":"","finish_reason":"length"}],"usage":{"completion_tokens":9,"prompt_tokens":4},"timings":{"prompt_n":1,"prompt_ms":10.0,"predicted_n":8,"predicted_ms":100.0,"predicted_per_second":80.0,"prompt_per_second":400.0}}"#).unwrap();
        let Item::Final(r) = p.line("data: [DONE]").unwrap().remove(0) else {
            panic!()
        };
        assert_eq!(r.gen_tokens, Some((8, TokenCountSource::LlamacppTimings)));
        assert_eq!(
            (r.prompt_tokens, r.done_reason.as_deref(), r.total_ms),
            (Some(4), Some("length"), Some(110.0))
        );
    }

    #[test]
    fn reasoning_is_timed_as_generated_text_and_extra_body_is_sent() {
        let mut p = SseParser::default();
        let items = p
            .line(r#"data: {"choices":[{"delta":{"reasoning_content":"hmm"}}]}"#)
            .unwrap();
        assert_eq!(
            items,
            vec![Item::Text {
                text: "hmm".into(),
                tokens: None,
                reasoning: true,
            }]
        );
        let extra = serde_json::Map::from_iter([("cache_prompt".to_string(), Value::Bool(false))]);
        let b = OpenAi::new("http://x", None).with_extra_body(extra);
        let req = GenRequest {
            model: "m".into(),
            prompt: "p".into(),
            mode: Mode::Generate,
            max_tokens: 4,
            temperature: 0.0,
            num_ctx: 8,
            seed: None,
            ignore_eos: true,
            cache_prompt: Some(true),
            raw: false,
        };
        let (path, body) = b.body(&req);
        assert_eq!(path, "/v1/completions");
        assert_eq!(
            body["cache_prompt"], true,
            "the job's choice beats the default"
        );
        assert_eq!(body["ignore_eos"], true);
        let (_, plain) = b.with_ignore_eos(false).body(&req);
        assert!(plain.get("ignore_eos").is_none());
        assert_eq!(body["stream_options"]["include_usage"], true);
    }

    #[test]
    fn usage_only_and_chat() {
        let mut p = SseParser::default();
        assert_eq!(
            p.line(r#"data: {"choices":[{"delta":{"content":"x"}}]}"#)
                .unwrap()
                .len(),
            1
        );
        p.line(r#"data: {"choices":[],"usage":{"completion_tokens":3,"prompt_tokens":2}}"#)
            .unwrap();
        let Item::Final(r) = p.line("data: [DONE]").unwrap().remove(0) else {
            panic!()
        };
        assert_eq!(r.gen_tokens, Some((3, TokenCountSource::OpenaiUsage)));
        assert_eq!(
            p.line(r#"data: {"error":{"message":"boom"}}"#)
                .unwrap_err()
                .code,
            ErrorCode::EngineError
        );
    }
}
