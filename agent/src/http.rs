//! The local HTTP surface, in the original's shapes: `GET /health` and `GET /capabilities`.
//! Nothing in the fleet needs it (agents dial out); it is for people and probes on the machine.

use crate::Shared;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;

/// The router.
pub fn app(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/capabilities", get(capabilities))
        .with_state(shared)
}

async fn health(State(s): State<Arc<Shared>>) -> Json<Value> {
    let occ = s.queue.occupancy();
    Json(json!({
        "ok": true,
        "machine_id": s.cfg.machine_id,
        "label": s.cfg.label,
        "boot_id": s.boot_id,
        "nats": format!("{}", s.client.connection_state()).to_lowercase(),
        "busy": occ.running.is_some(),
        "current_job": occ.running,
        "queued": occ.waiting,
        "publisher": s.publisher.stats(),
    }))
}

async fn capabilities(State(s): State<Arc<Shared>>) -> Json<Value> {
    let backend = s.default_backend();
    let models = s.models.offered(&*backend, &s.cfg.llm_models).await;
    Json(json!({
        "machine_id": s.cfg.machine_id,
        "label": s.cfg.label,
        "tests": [bench_schemas::TEST_LLM_GENERATE],
        "llm_models": models,
        "whisper_models": s.cfg.whisper_models,
        "sdxl_profiles": s.cfg.sdxl_profiles,
        "engine": backend.kind(),
        "engine_url": backend.base_url(),
        "backends": s.backends.iter().map(|b| b.kind()).collect::<Vec<_>>(),
        "labels": s.cfg.labels,
        "hardware": s.hardware,
        "version": crate::VERSION,
    }))
}
