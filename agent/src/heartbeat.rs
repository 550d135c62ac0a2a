//! Keeps this agent's entry in the `bench_agents` KV bucket fresh: every `heartbeat_s` (at a
//! phase of its own, so a fleet's beats stay spread), and
//! within [`STATUS_COALESCE`] when it turns busy or idle. The bucket's max age (15 s) makes a dead agent's entry
//! expire; a clean shutdown deletes it. The entry's models come from the cache while a job runs
//! (see [`crate::models`]): a heartbeat never asks a busy engine. The entry carries the public
//! key the agent signs its events with: the first stored heartbeat releases the publisher
//! ([`crate::publisher::Publisher::announced`]).

use crate::Shared;
use async_nats::jetstream;
use bench_schemas::{AgentInfo, AgentStatus};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// How long a change of busy or idle waits for the changes that follow it before the entry is
/// stored.
pub const STATUS_COALESCE: std::time::Duration = std::time::Duration::from_millis(250);

/// This agent's registry entry now.
pub async fn info(shared: &Shared) -> AgentInfo {
    let occ = shared.queue.occupancy();
    let backend = shared.default_backend();
    AgentInfo {
        machine_id: shared.cfg.machine_id.clone(),
        label: shared.cfg.label.clone(),
        status: if occ.running.is_some() {
            AgentStatus::Busy
        } else {
            AgentStatus::Idle
        },
        engine: backend.kind().to_string(),
        models: shared
            .models
            .offered(&*backend, &shared.cfg.llm_models)
            .await,
        hardware: shared.hardware.clone(),
        engine_info: shared.described.engine(&*backend),
        telemetry: shared.telemetry.sources(),
        labels: shared.cfg.labels.clone(),
        version: crate::VERSION.to_string(),
        boot_id: shared.boot_id.clone(),
        ts_ms: crate::publisher::now_ms(),
        heartbeat_s: shared.cfg.heartbeat.as_secs_f64(),
        current_job: occ.running,
        queued: occ.waiting,
        signing_key: Some(shared.publisher.signing_key().to_string()),
    }
}

/// The heartbeat loop.
pub async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let js = jetstream::new(shared.client.clone());
    let mut occupancy = shared.queue.watch();
    let mut store = None;
    // The periodic beat keeps its own phase, from a random part of a period after start: a
    // store for a busy/idle change does not move it. (Restarting the period at every store let
    // one broadcast job line up a whole fleet's heartbeats: every agent's next beat came one
    // period after the same job's end, all at once, and again every period after.)
    let period = shared.cfg.heartbeat;
    let phase = (uuid::Uuid::new_v4().as_u128() % 1024) as f64 / 1024.0;
    let mut due = tokio::time::Instant::now() + period.mul_f64(phase);
    loop {
        if store.is_none() {
            match bench_nats::streams::ensure_agents_bucket(&js, bench_nats::streams::AGENTS_TTL, 1)
                .await
            {
                Ok(s) => store = Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the {} bucket; will retry", bench_schemas::subjects::AGENTS_BUCKET)
                }
            }
        }
        if let Some(kv) = &store {
            // What this entry says is what the queue says now: a change already seen is not
            // sent again.
            occupancy.borrow_and_update();
            let body = serde_json::to_vec(&info(&shared).await).expect("serialises");
            match kv.put(&shared.cfg.machine_id, body.into()).await {
                Ok(_) => shared.publisher.announced(),
                Err(e) => tracing::debug!(error = %e, "heartbeat not stored"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(due) => {
                let now = tokio::time::Instant::now();
                due += period;
                if due <= now {
                    // The last store took longer than a period (NATS away): a period from now.
                    due = now + period;
                }
            }
            _ = occupancy.changed() => {
                // A job's accept, start and end come within moments of each other (and a
                // broadcast reaches the whole fleet at once): one entry for all of them, sent
                // once the moment has passed, instead of one store each while the fleet answers.
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(STATUS_COALESCE) => {}
                }
            }
        }
    }
    if let Some(kv) = store {
        let _ = kv.delete(&shared.cfg.machine_id).await;
    }
}
