//! Writes `results/runs/<job_id>/{metadata.json, events.ndjson, summary.json}` when a job
//! finishes, off the ingestion path (a queue of job ids and one writer task). Files are written
//! to a temporary name and renamed, so a reader never sees half a file.

use crate::{compare, replay, Shared};
use serde_json::json;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Queue of jobs whose results should be (re)written.
#[derive(Debug)]
pub struct Results {
    tx: mpsc::UnboundedSender<String>,
    queued: Mutex<HashSet<String>>,
}

impl Results {
    /// The queue and its receiving end.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                tx,
                queued: Mutex::default(),
            },
            rx,
        )
    }

    /// Asks for the job's results to be written (once, however often asked while queued).
    pub fn request(&self, job_id: &str) {
        if self
            .queued
            .lock()
            .expect("results lock")
            .insert(job_id.to_string())
        {
            let _ = self.tx.send(job_id.to_string());
        }
    }
}

/// `results/runs/<job_id>`.
pub fn run_dir(results_dir: &Path, job_id: &str) -> PathBuf {
    // Ids are validated on ingest; this keeps a path out of `results/` impossible regardless.
    assert!(
        bench_schemas::validate_job_id(job_id).is_ok(),
        "job id {job_id:?} reached the results writer unvalidated"
    );
    results_dir.join("runs").join(job_id)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Writes one job's results now.
pub async fn write(shared: &Shared, job_id: &str) -> Result<PathBuf, async_nats::Error> {
    let Some(record) = shared.record(job_id).await.map_err(|e| e.to_string())? else {
        return Err(format!("job {job_id} is not indexed").into());
    };
    let events = replay::read_all(&shared.stream, shared.registry.keys(), job_id).await?;
    let detail = compare::detail(&record, &shared.registry, None).map_err(|e| e.to_string())?;
    let metadata = json!({
        "job_id": record.job_id,
        "created_ms": record.created_ms,
        "finished_ms": record.finished_ms,
        "status": record.status,
        "source": record.source,
        "job": record.job,
        "machines": record.machines.iter().map(|m| json!({
            "machine_id": m.machine_id,
            "label": m.label,
            "engine": m.engine,
            "run_id": m.run_id,
            "status": m.status,
            "error": m.error,
            "events": m.events,
            "gaps": m.gaps,
            "earlier_runs": m.earlier_runs.iter().map(|e| json!({
                "run_id": e.run_id, "status": e.status, "error": e.error,
            })).collect::<Vec<_>>(),
            "refusals": m.refusals,
        })).collect::<Vec<_>>(),
        "events": events.len(),
        "central_version": crate::VERSION,
        "written_ms": crate::now_ms(),
    });
    let mut ndjson = Vec::new();
    for (_, payload) in &events {
        ndjson.extend_from_slice(payload);
        ndjson.push(b'\n');
    }
    let dir = run_dir(&shared.cfg.results_dir, job_id);
    let (d, meta, summary) = (
        dir.clone(),
        serde_json::to_vec_pretty(&metadata)?,
        serde_json::to_vec_pretty(&detail)?,
    );
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::create_dir_all(&d)?;
        write_atomic(&d.join("events.ndjson"), &ndjson)?;
        write_atomic(&d.join("summary.json"), &summary)?;
        // metadata.json last: its presence means the run is complete.
        write_atomic(&d.join("metadata.json"), &meta)
    })
    .await??;
    Ok(dir)
}

/// The writer task.
pub async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<String>) {
    loop {
        let job_id = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            id = rx.recv() => match id { Some(id) => id, None => return },
        };
        shared
            .results
            .queued
            .lock()
            .expect("results lock")
            .remove(&job_id);
        if !shared.index.contains(&job_id) {
            continue;
        }
        match write(&shared, &job_id).await {
            Ok(dir) => tracing::info!(%job_id, dir = %dir.display(), "results written"),
            Err(e) => tracing::error!(%job_id, error = %e, "writing results failed"),
        }
    }
}

/// Queues finished jobs whose results are missing (central stopped before writing them).
pub fn backfill(shared: &Shared) {
    for job_id in shared.index.finished_ids() {
        if !run_dir(&shared.cfg.results_dir, &job_id)
            .join("metadata.json")
            .exists()
        {
            shared.results.request(&job_id);
        }
    }
}
