//! Which models an agent offers: `llm_models` from config plus what the engine itself lists,
//! cached for `engine_models_refresh_s`. A job for a model neither names is refused with
//! `model_not_found` before it queues (llama-server, for one, would otherwise answer any model
//! name with its own model).
//!
//! An engine running a benchmark is never asked for its list: the runner holds the engine's
//! [`ModelCatalog::lease`] for the whole job, and heartbeats, `/capabilities` and job intake then
//! use the cached list, however old. A list request on the engine's HTTP server would otherwise
//! compete with the generation being timed.

use crate::backend::Backend;
use bench_schemas::{ErrorBody, ErrorCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedRwLockWriteGuard, RwLock};

/// A hung engine must not stall job intake or heartbeats.
const LIST_TIMEOUT: Duration = Duration::from_secs(3);

/// The engine's list as far as it is known.
enum Listed {
    /// Fetched just now, or cached and fresh.
    Fresh(Vec<String>),
    /// A benchmark runs on the engine: the cached list (fetched `age` ago) stands in.
    Busy(Vec<String>, Duration),
    /// Not known: the engine failed, or is busy and nothing is cached.
    Unknown(ErrorBody),
}

/// Engine model lists, per backend kind.
pub struct ModelCatalog {
    cache: Mutex<HashMap<&'static str, (Instant, Vec<String>)>>,
    /// Per backend kind: list requests hold it shared, a running job exclusively.
    engines: Mutex<HashMap<&'static str, Arc<RwLock<()>>>>,
    refresh: Duration,
}

impl ModelCatalog {
    /// An empty catalog whose lists count as fresh for `refresh`.
    pub fn new(refresh: Duration) -> Self {
        Self {
            cache: Mutex::default(),
            engines: Mutex::default(),
            refresh,
        }
    }

    fn engine(&self, kind: &'static str) -> Arc<RwLock<()>> {
        self.engines
            .lock()
            .expect("lock")
            .entry(kind)
            .or_default()
            .clone()
    }

    /// Held by the runner while a job runs on the `kind` engine: no list request reaches the
    /// engine meanwhile. Waits (at most the list timeout) for a request already under way.
    pub async fn lease(&self, kind: &'static str) -> OwnedRwLockWriteGuard<()> {
        self.engine(kind).write_owned().await
    }

    fn cached(&self, kind: &'static str) -> Option<(Duration, Vec<String>)> {
        let cache = self.cache.lock().expect("lock");
        cache
            .get(kind)
            .map(|(at, list)| (at.elapsed(), list.clone()))
    }

    async fn list(&self, backend: &dyn Backend, force: bool) -> Listed {
        let kind = backend.kind();
        let cached = self.cached(kind);
        if let Some((age, list)) = &cached {
            if !force && *age < self.refresh {
                return Listed::Fresh(list.clone());
            }
        }
        // Shared while the request runs, so a job about to start waits for it to end.
        let Ok(_reading) = self.engine(kind).try_read_owned() else {
            return match cached {
                Some((age, list)) => Listed::Busy(list, age),
                None => Listed::Unknown(ErrorBody::new(
                    ErrorCode::EngineError,
                    "the engine is running a benchmark and is not asked meanwhile; its model list is not cached yet",
                )),
            };
        };
        let list = match tokio::time::timeout(LIST_TIMEOUT, backend.list_models()).await {
            Ok(Ok(list)) => list,
            Ok(Err(e)) => return Listed::Unknown(e),
            Err(_) => {
                return Listed::Unknown(ErrorBody::new(
                    ErrorCode::Timeout,
                    format!("the engine did not list its models within {LIST_TIMEOUT:?}"),
                ))
            }
        };
        self.cache
            .lock()
            .expect("lock")
            .insert(kind, (Instant::now(), list.clone()));
        Listed::Fresh(list)
    }

    /// The engine's list: from cache when fresh or when the engine is busy, else fetched
    /// (`force` refetches an idle engine's list even when fresh).
    pub async fn engine_models(
        &self,
        backend: &dyn Backend,
        force: bool,
    ) -> Result<Vec<String>, ErrorBody> {
        match self.list(backend, force).await {
            Listed::Fresh(list) | Listed::Busy(list, _) => Ok(list),
            Listed::Unknown(e) => Err(e),
        }
    }

    /// Configured models followed by the engine's (engine unknown: configured only).
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
        let has = |list: &[String]| list.iter().any(|m| backend.same_model(model, m));
        let listed = match self.list(backend, false).await {
            Listed::Fresh(list) | Listed::Busy(list, _) if has(&list) => return Ok(()),
            // A stale cache may miss a model pulled a moment ago: ask once more (an idle
            // engine only).
            Listed::Fresh(_) => self.list(backend, true).await,
            other => other,
        };
        let not_found = |list: Vec<String>, note: String| {
            let mut offered = configured.to_vec();
            offered.extend(list);
            Err(ErrorBody::new(
                ErrorCode::ModelNotFound,
                format!(
                    "model {model:?} is not available on this agent ({} engine); available: {offered:?}{note}",
                    backend.kind()
                ),
            ))
        };
        match listed {
            Listed::Fresh(list) if has(&list) => Ok(()),
            Listed::Fresh(list) => not_found(list, String::new()),
            Listed::Busy(list, _) if has(&list) => Ok(()),
            Listed::Busy(list, age) => not_found(
                list,
                format!(
                    " (the engine's list as of {}s ago: it is not asked while it runs a benchmark)",
                    age.as_secs()
                ),
            ),
            Listed::Unknown(_) if configured.is_empty() => Ok(()),
            Listed::Unknown(e) => Err(ErrorBody::new(
                ErrorCode::ModelNotFound,
                format!("model {model:?} is not in llm_models {configured:?} and the engine cannot be asked ({})", e.message),
            )),
        }
    }
}
