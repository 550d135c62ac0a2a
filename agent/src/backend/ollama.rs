//! Ollama's native API: streaming NDJSON from `/api/generate` and `/api/chat`, with Ollama's
//! own counts and nanosecond durations from the final line.

use super::lines::parse_lines;
use super::{
    info_json, read_json, request_error, status_error, Backend, EngineReport, GenRequest, Item,
    ItemStream,
};
use bench_schemas::{EngineInfo, ErrorBody, ErrorCode, Missing, Mode, ModelInfo, TokenCountSource};
use futures::future::BoxFuture;
use serde_json::{json, Value};

/// A backend for one Ollama server.
pub struct Ollama {
    base_url: String,
    http: reqwest::Client,
}

impl Ollama {
    /// `base_url` like `http://127.0.0.1:11434`.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            http: super::http_client(),
        }
    }

    fn body(req: &GenRequest) -> (&'static str, Value) {
        let mut options = json!({
            "num_predict": req.max_tokens,
            "temperature": req.temperature,
            "num_ctx": req.num_ctx,
        });
        if let Some(seed) = req.seed {
            options["seed"] = json!(seed);
        }
        match req.mode {
            // An agent-built prompt (`prompt_tokens`) goes in raw: the model's template would
            // add tokens the agent did not count.
            Mode::Generate => (
                "/api/generate",
                json!({"model": req.model, "prompt": req.prompt, "stream": true, "options": options, "raw": req.raw}),
            ),
            Mode::Chat => (
                "/api/chat",
                json!({
                    "model": req.model,
                    "messages": [{"role": "user", "content": req.prompt}],
                    "stream": true,
                    "options": options,
                }),
            ),
        }
    }
}

/// Ollama's `/api/show`: `details` (format, family, parameter_size, quantization_level) and
/// `model_info` (GGUF metadata: `general.parameter_count`, `<arch>.context_length`).
fn read_show(v: &Value, info: &mut ModelInfo) {
    let text = |o: Option<&Value>, k: &str| {
        o.and_then(|o| o.get(k))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let details = v.get("details");
    info.format = text(details, "format");
    info.family = text(details, "family");
    info.parameter_size = text(details, "parameter_size");
    info.quantization = text(details, "quantization_level");
    let meta = v.get("model_info");
    info.parameter_count = meta
        .and_then(|m| m.get("general.parameter_count"))
        .and_then(Value::as_u64);
    if let Some(arch) = text(meta, "general.architecture") {
        info.family = info.family.take().or(Some(arch.clone()));
        info.context_length = meta
            .and_then(|m| m.get(format!("{arch}.context_length")))
            .and_then(Value::as_u64);
    }
}

fn ns_to_ms(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64).map(|ns| ns / 1e6)
}

fn rate(count: Option<u64>, ms: Option<f64>) -> Option<f64> {
    match (count, ms) {
        (Some(n), Some(ms)) if ms > 0.0 => Some(n as f64 / (ms / 1000.0)),
        _ => None,
    }
}

/// Parses one NDJSON line of `/api/generate` or `/api/chat`.
pub fn parse_line(line: &str) -> Result<Vec<Item>, ErrorBody> {
    if line.trim().is_empty() {
        return Ok(vec![]);
    }
    let v: Value = serde_json::from_str(line).map_err(|e| {
        ErrorBody::new(
            ErrorCode::StreamBroken,
            format!("Ollama sent a line that is not JSON ({e}): {line:.200}"),
        )
    })?;
    if let Some(err) = v.get("error") {
        let msg = err.as_str().unwrap_or("unknown error").to_string();
        let code = if msg.contains("not found") {
            ErrorCode::ModelNotFound
        } else {
            ErrorCode::EngineError
        };
        return Err(ErrorBody::new(code, format!("Ollama: {msg}")));
    }
    // A thinking model's reasoning is generated text too: `eval_count` counts it, so it is timed
    // like the answer (otherwise TTFT would include all the thinking and the decode rate
    // would divide every token by the answer's time alone).
    // Each streamed line is one token (Ollama's runner sends a line per sampled token).
    let str_at = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default();
    let thinking = [str_at("/thinking"), str_at("/message/thinking")].concat();
    let answer = [str_at("/response"), str_at("/message/content")].concat();
    let mut items = Vec::new();
    for (text, reasoning) in [(thinking, true), (answer, false)] {
        if !text.is_empty() {
            items.push(Item::Text {
                text,
                tokens: Some(1),
                reasoning,
            });
        }
    }
    if v.get("done").and_then(Value::as_bool) == Some(true) {
        let eval_count = v.get("eval_count").and_then(Value::as_u64);
        let prompt_count = v.get("prompt_eval_count").and_then(Value::as_u64);
        let gen_ms = ns_to_ms(&v, "eval_duration");
        let prompt_ms = ns_to_ms(&v, "prompt_eval_duration");
        items.push(Item::Final(EngineReport {
            gen_tokens: eval_count.map(|n| (n, TokenCountSource::OllamaEvalCount)),
            prompt_tokens: prompt_count,
            // Ollama counts only the prompt tokens it evaluated (a cached prefix is left out).
            prompt_evaluated: prompt_count,
            load_ms: ns_to_ms(&v, "load_duration"),
            gen_ms,
            prompt_ms,
            total_ms: ns_to_ms(&v, "total_duration"),
            gen_tokens_per_s: rate(eval_count, gen_ms),
            prompt_tokens_per_s: rate(prompt_count, prompt_ms),
            done_reason: v
                .get("done_reason")
                .and_then(Value::as_str)
                .map(str::to_string),
        }));
    }
    Ok(items)
}

impl Backend for Ollama {
    fn kind(&self) -> &'static str {
        "ollama"
    }

    fn base_url(&self) -> &str {
        &self.base_url
    }

    fn same_model(&self, model: &str, listed: &str) -> bool {
        let tagged = |m: &str| {
            if m.contains(':') {
                m.to_string()
            } else {
                format!("{m}:latest")
            }
        };
        tagged(model) == tagged(listed)
    }

    fn list_models(&self) -> BoxFuture<'_, Result<Vec<String>, ErrorBody>> {
        Box::pin(async move {
            let url = format!("{}/api/tags", self.base_url);
            let resp = self
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| request_error(&self.base_url, e))?;
            let v = read_json(&self.base_url, resp).await?;
            Ok(v.get("models")
                .and_then(Value::as_array)
                .map(|ms| {
                    ms.iter()
                        .filter_map(|m| m.get("name")?.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default())
        })
    }

    fn model_loaded<'a>(&'a self, model: &'a str) -> BoxFuture<'a, Option<bool>> {
        Box::pin(async move {
            let url = format!("{}/api/ps", self.base_url);
            let resp = self.http.get(&url).send().await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let v: Value = resp.json().await.ok()?;
            let models = v.get("models")?.as_array()?;
            Some(models.iter().any(|m| {
                ["name", "model"]
                    .iter()
                    .filter_map(|k| m.get(*k).and_then(Value::as_str))
                    .any(|listed| self.same_model(model, listed))
            }))
        })
    }

    fn engine_info(&self) -> BoxFuture<'_, EngineInfo> {
        Box::pin(async move {
            let mut info = EngineInfo {
                kind: self.kind().to_string(),
                server: Some("ollama".into()),
                ..EngineInfo::default()
            };
            let url = format!("{}/api/version", self.base_url);
            match info_json(self.http.get(&url)).await {
                Ok(v) => {
                    info.version = v.get("version").and_then(Value::as_str).map(str::to_string)
                }
                Err(e) => info.missing.push(Missing::new("/api/version", e)),
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
            let url = format!("{}/api/show", self.base_url);
            match info_json(self.http.post(&url).json(&json!({ "model": model }))).await {
                Ok(v) => read_show(&v, &mut info),
                Err(e) => info.missing.push(Missing::new("/api/show", e)),
            }
            let url = format!("{}/api/tags", self.base_url);
            match info_json(self.http.get(&url)).await {
                Ok(v) => {
                    let listed = v.get("models").and_then(Value::as_array).and_then(|ms| {
                        ms.iter().find(|m| {
                            ["name", "model"]
                                .iter()
                                .filter_map(|k| m.get(*k).and_then(Value::as_str))
                                .any(|l| self.same_model(model, l))
                        })
                    });
                    match listed {
                        Some(m) => {
                            info.digest = m.get("digest").and_then(Value::as_str).map(|d| {
                                if d.contains(':') {
                                    d.to_string()
                                } else {
                                    format!("sha256:{d}")
                                }
                            });
                            info.size_bytes = m.get("size").and_then(Value::as_u64);
                        }
                        None => info
                            .missing
                            .push(Missing::new("/api/tags", format!("{model} is not listed"))),
                    }
                }
                Err(e) => info.missing.push(Missing::new("/api/tags", e)),
            }
            info
        })
    }

    fn generate(&self, req: GenRequest) -> BoxFuture<'_, Result<ItemStream, ErrorBody>> {
        Box::pin(async move {
            let (path, body) = Self::body(&req);
            let url = format!("{}{path}", self.base_url);
            let resp = self
                .http
                .post(&url)
                .json(&body)
                .send()
                .await
                .map_err(|e| request_error(&self.base_url, e))?;
            if !resp.status().is_success() {
                return Err(status_error(&self.base_url, &req.model, resp).await);
            }
            Ok(parse_lines(resp, self.base_url.clone(), parse_line))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_answer_fills_the_model() {
        // The `/api/show` answer as Ollama's API documentation shows it (abridged).
        let v: Value = serde_json::from_str(r#"{"modelfile":"","parameters":"","template":"","details":{"parent_model":"","format":"gguf","family":"llama","families":["llama"],"parameter_size":"8.0B","quantization_level":"Q4_0"},"model_info":{"general.architecture":"llama","general.file_type":2,"general.parameter_count":8030261248,"general.quantization_version":2,"llama.context_length":8192,"llama.embedding_length":4096}}"#).unwrap();
        let mut m = ModelInfo::default();
        read_show(&v, &mut m);
        assert_eq!(m.quantization.as_deref(), Some("Q4_0"));
        assert_eq!(m.parameter_size.as_deref(), Some("8.0B"));
        assert_eq!(m.parameter_count, Some(8_030_261_248));
        assert_eq!(m.context_length, Some(8192));
        assert_eq!(
            (m.family.as_deref(), m.format.as_deref()),
            (Some("llama"), Some("gguf"))
        );
    }

    #[test]
    fn final_line_units() {
        let items = parse_line(r#"{"model":"m","created_at":"x","response":"","done":true,"done_reason":"stop","total_duration":5000000000,"load_duration":1000000,"prompt_eval_count":10,"prompt_eval_duration":500000000,"eval_count":100,"eval_duration":2000000000}"#).unwrap();
        let Item::Final(r) = &items[0] else {
            panic!("{items:?}")
        };
        assert_eq!(r.gen_tokens, Some((100, TokenCountSource::OllamaEvalCount)));
        assert_eq!(
            (r.load_ms, r.gen_ms, r.prompt_ms, r.total_ms),
            (Some(1.0), Some(2000.0), Some(500.0), Some(5000.0))
        );
        assert_eq!(
            (r.gen_tokens_per_s, r.prompt_tokens_per_s),
            (Some(50.0), Some(20.0))
        );
    }

    #[test]
    fn thinking_is_generated_text() {
        let items = parse_line(r#"{"model":"m","message":{"role":"assistant","content":"","thinking":"Let me see"},"done":false}"#).unwrap();
        assert_eq!(
            items,
            vec![Item::Text {
                text: "Let me see".into(),
                tokens: Some(1),
                reasoning: true,
            }]
        );
    }

    #[test]
    fn chat_and_errors() {
        let items = parse_line(
            r#"{"model":"m","message":{"role":"assistant","content":"Hi"},"done":false}"#,
        )
        .unwrap();
        assert_eq!(
            items,
            vec![Item::Text {
                text: "Hi".into(),
                tokens: Some(1),
                reasoning: false,
            }]
        );
        assert_eq!(
            parse_line(r#"{"error":"model 'x' not found"}"#)
                .unwrap_err()
                .code,
            ErrorCode::ModelNotFound
        );
        assert_eq!(
            parse_line("nope").unwrap_err().code,
            ErrorCode::StreamBroken
        );
    }
}
