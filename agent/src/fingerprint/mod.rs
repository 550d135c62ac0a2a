//! What a result is measured on ([`bench_schemas::Fingerprint`]): the machine ([`hardware`]:
//! sysinfo for CPU, memory and OS on every OS; NVML, `system_profiler`/`sysctl` and
//! `amd-smi`/`rocm-smi` for GPUs), the engine and model (asked of the backend, see
//! [`crate::backend::Backend::engine_info`]) and the job's effective settings. A source that
//! does not answer is reported in `missing`, never guessed.

pub mod amd;
pub mod apple;
pub mod digest;
pub mod hardware;
pub mod nvidia;

use crate::backend::Backend;
use bench_schemas::{CacheMode, EngineInfo, Fingerprint, Hardware, Job, Mode, ModelInfo, Settings};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The job's settings once defaults and its profile are applied.
pub fn settings(job: &Job) -> Settings {
    let shape = job.shape();
    Settings {
        mode: match job.mode {
            Mode::Generate => "generate",
            Mode::Chat => "chat",
        }
        .into(),
        num_ctx: job.num_ctx,
        max_tokens: shape.max_tokens,
        prompt_tokens: shape.prompt_tokens,
        depth: shape.depth,
        ignore_eos: shape.ignore_eos,
        cache: match job.cache {
            CacheMode::Cold => "cold",
            CacheMode::Warm => "warm",
        }
        .into(),
        temperature: job.temperature,
        seed: job.seed,
    }
}

/// The fingerprint of `job` on this machine with this engine and model, its id set.
pub fn fingerprint(
    hardware: &Hardware,
    engine: EngineInfo,
    model: ModelInfo,
    job: &Job,
) -> Fingerprint {
    Fingerprint {
        fingerprint_id: String::new(),
        hardware: hardware.clone(),
        engine,
        model,
        settings: settings(job),
    }
    .with_id()
}

/// The latest description of each engine and model this agent ran: `job_accepted` and the
/// registry entry read it (they never ask an engine), and the runner refreshes it before a
/// job's first run, when the engine is idle and leased to that job.
#[derive(Default)]
pub struct Described {
    engines: Mutex<HashMap<String, EngineInfo>>,
    models: Mutex<HashMap<(String, String), ModelInfo>>,
    /// Bumped when an answer that differs from the last one is kept: a fingerprint built from
    /// older answers is then stale. (The runner asks again before every job: mostly the same.)
    generation: AtomicU64,
    /// The last fingerprint [`Self::fingerprint_of`] built.
    last: Mutex<Option<LastFingerprint>>,
}

/// A fingerprint and what it was built from.
struct LastFingerprint {
    generation: u64,
    engine: String,
    model: String,
    settings: Settings,
    fingerprint: Fingerprint,
}

fn engine_key(b: &dyn Backend) -> String {
    format!("{} {}", b.kind(), b.base_url())
}

impl Described {
    /// Asks the engine now (engine and model, at once), and keeps the answers. Bounded by
    /// `budget` as a whole (each request is bounded too): an engine that does not answer in
    /// time is described by what it said last, else as missing with the reason.
    pub async fn refresh(
        &self,
        backend: &dyn Backend,
        model: &str,
        budget: std::time::Duration,
    ) -> (EngineInfo, ModelInfo) {
        let asked = futures::future::join(backend.engine_info(), backend.model_info(model));
        let (engine, described) = match tokio::time::timeout(budget, asked).await {
            Ok(answers) => answers,
            Err(_) => {
                if let Some(cached) = self.cached(backend, model) {
                    return cached;
                }
                let late = || {
                    bench_schemas::Missing::new(
                        backend.kind(),
                        format!("the engine did not describe itself within {budget:?}"),
                    )
                };
                return (
                    EngineInfo {
                        kind: backend.kind().to_string(),
                        missing: vec![late()],
                        ..EngineInfo::default()
                    },
                    ModelInfo {
                        name: model.to_string(),
                        missing: vec![late()],
                        ..ModelInfo::default()
                    },
                );
            }
        };
        let key = engine_key(backend);
        let engine_was = self
            .engines
            .lock()
            .expect("described lock")
            .insert(key.clone(), engine.clone());
        let model_was = self
            .models
            .lock()
            .expect("described lock")
            .insert((key, model.to_string()), described.clone());
        if engine_was.as_ref() != Some(&engine) || model_was.as_ref() != Some(&described) {
            self.generation.fetch_add(1, Ordering::Release);
        }
        (engine, described)
    }

    /// Asks the engine for its identity only (within `budget`), and keeps it.
    pub async fn refresh_engine(&self, backend: &dyn Backend, budget: std::time::Duration) {
        let Ok(engine) = tokio::time::timeout(budget, backend.engine_info()).await else {
            return;
        };
        let was = self
            .engines
            .lock()
            .expect("described lock")
            .insert(engine_key(backend), engine.clone());
        if was.as_ref() != Some(&engine) {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// The fingerprint of `job` from the last answers for its engine and model (None: never
    /// described), as `job_accepted` carries it. Every agent of a broadcast builds one at once,
    /// and building means hashing the whole description: the last one is kept and handed out
    /// again while the answers and the job's settings are the same.
    pub fn fingerprint_of(
        &self,
        hardware: &Hardware,
        backend: &dyn Backend,
        job: &Job,
    ) -> Option<Fingerprint> {
        // Read before the answers: a newer answer kept meanwhile makes what is built here stale.
        let generation = self.generation.load(Ordering::Acquire);
        let engine = engine_key(backend);
        let settings = settings(job);
        if let Some(l) = self.last.lock().expect("described lock").as_ref() {
            if l.generation == generation
                && l.engine == engine
                && l.model == job.model
                && l.settings == settings
            {
                return Some(l.fingerprint.clone());
            }
        }
        let (engine_info, model_info) = self.cached(backend, &job.model)?;
        let fingerprint = fingerprint(hardware, engine_info, model_info, job);
        *self.last.lock().expect("described lock") = Some(LastFingerprint {
            generation,
            engine,
            model: job.model.clone(),
            settings,
            fingerprint: fingerprint.clone(),
        });
        Some(fingerprint)
    }

    /// The last answers for this engine and model, if it was described before.
    pub fn cached(&self, backend: &dyn Backend, model: &str) -> Option<(EngineInfo, ModelInfo)> {
        let key = engine_key(backend);
        let engine = self
            .engines
            .lock()
            .expect("described lock")
            .get(&key)?
            .clone();
        let model = self
            .models
            .lock()
            .expect("described lock")
            .get(&(key, model.to_string()))?
            .clone();
        Some((engine, model))
    }

    /// The last answer of this engine about itself.
    pub fn engine(&self, backend: &dyn Backend) -> Option<EngineInfo> {
        self.engines
            .lock()
            .expect("described lock")
            .get(&engine_key(backend))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::mock::Mock;
    use crate::config::MockConfig;

    fn job(num_ctx: u32) -> Job {
        serde_json::from_value(serde_json::json!({"model": "m", "prompt": "p", "num_ctx": num_ctx}))
            .unwrap()
    }

    #[tokio::test]
    async fn the_last_fingerprint_is_kept_while_its_sources_are_the_same() {
        let d = Described::default();
        let hw = Hardware::default();
        let mock = Mock::new(
            MockConfig {
                tokens_per_s: 100.0,
                ttft_ms: 1.0,
            },
            vec!["m".into()],
        );
        assert_eq!(
            d.fingerprint_of(&hw, &mock, &job(2048)),
            None,
            "never described"
        );
        let (engine, model) = d
            .refresh(&mock, "m", std::time::Duration::from_secs(5))
            .await;
        let built = fingerprint(&hw, engine, model, &job(2048));
        assert_eq!(
            d.fingerprint_of(&hw, &mock, &job(2048)).as_ref(),
            Some(&built)
        );
        assert_eq!(
            d.fingerprint_of(&hw, &mock, &job(2048)).as_ref(),
            Some(&built)
        );
        // Other settings: another fingerprint, with another id.
        let other = d.fingerprint_of(&hw, &mock, &job(4096)).unwrap();
        assert_ne!(other.fingerprint_id, built.fingerprint_id);
        assert_eq!(other.settings.num_ctx, 4096);
        // The same answers again (the runner asks before every job): the kept one stands.
        let generation = || d.last.lock().unwrap().as_ref().unwrap().generation;
        let before = generation();
        let budget = std::time::Duration::from_secs(5);
        d.refresh(&mock, "m", budget).await;
        d.refresh_engine(&mock, budget).await;
        assert_eq!(
            d.fingerprint_of(&hw, &mock, &job(4096)).as_ref(),
            Some(&other)
        );
        assert_eq!(generation(), before, "not rebuilt");
        // A different answer (here: none before it) makes it stale: the next is rebuilt.
        d.engines.lock().unwrap().clear();
        d.refresh_engine(&mock, budget).await;
        assert_eq!(d.fingerprint_of(&hw, &mock, &job(4096)), Some(other));
        assert!(generation() > before, "rebuilt after the new answer");
    }
}
