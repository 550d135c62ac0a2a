//! Which models an agent offers: `llm_models` from config plus what the engine itself lists,
//! cached briefly. A job for a model neither names is refused with `model_not_found` before it
//! queues (llama-server, for one, would otherwise answer any model name with its own model).

use crate::backend::Backend;
use bench_schemas::{ErrorBody, ErrorCode};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const FRESH: Duration = Duration::from_secs(30);
/// A hung engine must not stall job intake or heartbeats.
const LIST_TIMEOUT: Duration = Duration::from_secs(3);

/// Engine model lists, per backend kind.
#[derive(Default)]
pub struct ModelCatalog {
    cache: Mutex<HashMap<&'static str, (Instant, Vec<String>)>>,
}

impl ModelCatalog {
    /// The engine's list, from cache when fresh (`force` refetches).
    pub async fn engine_models(
        &self,
        backend: &dyn Backend,
        force: bool,
    ) -> Result<Vec<String>, ErrorBody> {
        if !force {
            if let Some((at, list)) = self.cache.lock().expect("lock").get(backend.kind()) {
                if at.elapsed() < FRESH {
                    return Ok(list.clone());
                }
            }
        }
        let list = match tokio::time::timeout(LIST_TIMEOUT, backend.list_models()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(ErrorBody::new(
                    ErrorCode::Timeout,
                    format!("the engine did not list its models within {LIST_TIMEOUT:?}"),
                ))
            }
        };
        self.cache
            .lock()
            .expect("lock")
            .insert(backend.kind(), (Instant::now(), list.clone()));
        Ok(list)
    }

    /// Configured models followed by the engine's (unreachable engine: configured only).
    pub async fn offered(&self, backend: &dyn Backend, configured: &[String]) -> Vec<String> {
        let mut all = configured.to_vec();
        if let Ok(list) = self.engine_models(backend, false).await {
            for m in list {
                if !all.iter().any(|c| backend.same_model(c, &m)) {
                    all.push(m);
                }
            }
        }
        all
    }

    /// Ok when the model is offered, or when nothing can be known (no list configured and the
    /// engine unreachable: the run will then fail with `engine_unreachable`).
    pub async fn check(
        &self,
        backend: &dyn Backend,
        configured: &[String],
        model: &str,
    ) -> Result<(), ErrorBody> {
        if configured.iter().any(|c| backend.same_model(model, c)) {
            return Ok(());
        }
        let listed = match self.engine_models(backend, false).await {
            Ok(list) if list.iter().any(|m| backend.same_model(model, m)) => return Ok(()),
            // A stale cache may miss a model pulled a moment ago: ask once more.
            Ok(_) => self.engine_models(backend, true).await,
            Err(e) => Err(e),
        };
        match listed {
            Ok(list) if list.iter().any(|m| backend.same_model(model, m)) => Ok(()),
            Ok(list) => {
                let mut offered = configured.to_vec();
                offered.extend(list);
                Err(ErrorBody::new(
                    ErrorCode::ModelNotFound,
                    format!("model {model:?} is not available on this agent ({} engine); available: {offered:?}", backend.kind()),
                ))
            }
            Err(_) if configured.is_empty() => Ok(()),
            Err(e) => Err(ErrorBody::new(
                ErrorCode::ModelNotFound,
                format!("model {model:?} is not in llm_models {configured:?} and the engine cannot be asked ({e})"),
            )),
        }
    }
}
