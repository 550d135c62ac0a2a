//! Synthetic tokens at a configured pace. Only ever used when chosen explicitly (`engine: mock`
//! or a job's `backend: "mock"`); it labels itself `engine: "mock"` and its counts `mock`.

use super::{Backend, EngineReport, GenRequest, Item, ItemStream};
use crate::config::MockConfig;
use bench_schemas::{EngineInfo, ErrorBody, ModelInfo, TokenCountSource};
use futures::future::BoxFuture;
use futures::StreamExt;
use std::time::Duration;

const WORDS: &[&str] = &[
    " the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", " while",
    " unified", " memory", " feeds", " tensor", " cores", " at", " full", " speed", ".",
];

/// Model offered when no `llm_models` are configured.
pub const DEFAULT_MOCK_MODEL: &str = "mock";

/// The mock engine.
pub struct Mock {
    cfg: MockConfig,
    models: Vec<String>,
}

impl Mock {
    /// A mock offering `models` (or `mock` when empty).
    pub fn new(cfg: MockConfig, models: Vec<String>) -> Self {
        let models = if models.is_empty() {
            vec![DEFAULT_MOCK_MODEL.to_string()]
        } else {
            models
        };
        Self { cfg, models }
    }
}

impl Backend for Mock {
    fn kind(&self) -> &'static str {
        "mock"
    }

    // Nothing is ever cached.
    fn has_cache_switch(&self) -> bool {
        true
    }

    fn engine_info(&self) -> BoxFuture<'_, EngineInfo> {
        Box::pin(async {
            EngineInfo {
                kind: "mock".into(),
                server: Some("mock".into()),
                version: Some(crate::VERSION.to_string()),
                ..EngineInfo::default()
            }
        })
    }

    fn model_info<'a>(&'a self, model: &'a str) -> BoxFuture<'a, ModelInfo> {
        Box::pin(async move {
            ModelInfo {
                name: model.to_string(),
                missing: vec![bench_schemas::Missing::new(
                    "mock",
                    "the mock engine has no weights",
                )],
                ..ModelInfo::default()
            }
        })
    }

    fn base_url(&self) -> &str {
        ""
    }

    fn list_models(&self) -> BoxFuture<'_, Result<Vec<String>, ErrorBody>> {
        let models = self.models.clone();
        Box::pin(async move { Ok(models) })
    }

    fn model_loaded<'a>(&'a self, _model: &'a str) -> BoxFuture<'a, Option<bool>> {
        // Nothing loads: no run of the mock is ever cold.
        Box::pin(async { Some(true) })
    }

    fn generate(&self, req: GenRequest) -> BoxFuture<'_, Result<ItemStream, ErrorBody>> {
        let ttft = Duration::from_secs_f64(self.cfg.ttft_ms / 1000.0);
        let gap = Duration::from_secs_f64(1.0 / self.cfg.tokens_per_s);
        let n = req.max_tokens as u64;
        let prompt_tokens = req.prompt.split_whitespace().count() as u64;
        Box::pin(async move {
            let tokens = futures::stream::unfold(0u64, move |i| async move {
                if i > n {
                    return None;
                }
                if i == n {
                    let report = EngineReport {
                        gen_tokens: Some((n, TokenCountSource::Mock)),
                        prompt_tokens: Some(prompt_tokens),
                        done_reason: Some("length".into()),
                        ..Default::default()
                    };
                    return Some((Ok(Item::Final(report)), i + 1));
                }
                tokio::time::sleep(if i == 0 { ttft } else { gap }).await;
                let text = WORDS[(i as usize) % WORDS.len()].to_string();
                Some((
                    Ok(Item::Text {
                        text,
                        tokens: Some(1),
                        reasoning: false,
                    }),
                    i + 1,
                ))
            });
            Ok(tokens.boxed())
        })
    }
}
