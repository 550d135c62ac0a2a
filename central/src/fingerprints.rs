//! Fingerprint differences between runs: `GET /api/fingerprints/diff?a=<job>:<machine>&b=...`
//! for any two recorded runs, and, in `GET /api/jobs/{id}`, each machine against its own
//! previous job ([`previous`]), so a change of driver, engine build or quantisation between two
//! results is said next to them instead of being guessed from the numbers.

use crate::compare::{JobDetail, Previous};
use crate::error::ApiError;
use crate::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use bench_schemas::fingerprint::{Change, Fingerprint};
use bench_schemas::{validate_job_id, validate_machine_id};
use serde::{Deserialize, Serialize};

/// Earlier jobs looked through (newest first) for a machine's previous one.
pub const PREVIOUS_SCAN: usize = 200;
/// Records loaded at most per machine while looking (a job of the machine without a
/// fingerprint, from before fingerprints, is passed over).
const PREVIOUS_LOADS: usize = 3;

/// `?a=&b=`.
#[derive(Deserialize, Debug)]
pub struct DiffParams {
    /// `<job_id>:<machine_id>`, the "before".
    pub a: Option<String>,
    /// `<job_id>:<machine_id>`, the "after".
    pub b: Option<String>,
}

/// One side of a diff.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Side {
    /// The job.
    pub job_id: String,
    /// The machine.
    pub machine_id: String,
    /// The run shown for the machine in that job.
    pub run_id: String,
    /// When the job was created (unix ms).
    pub created_ms: u64,
    /// Its fingerprint id.
    pub fingerprint_id: String,
    /// The whole fingerprint.
    pub fingerprint: Fingerprint,
}

/// `GET /api/fingerprints/diff`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Diff {
    /// Before.
    pub a: Side,
    /// After.
    pub b: Side,
    /// Same fingerprint id (and so no change in anything that changes performance).
    pub same: bool,
    /// Every part that differs, in [`Fingerprint::parts`] order.
    pub changes: Vec<Change>,
}

/// `<job_id>:<machine_id>`, validated.
fn parse_ref(name: &str, v: Option<&str>) -> Result<(String, String), ApiError> {
    let v = v.filter(|v| !v.is_empty()).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "give {name}=<job_id>:<machine_id> (both a and b are needed)"
        ))
    })?;
    let (job, machine) = v.split_once(':').ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{name}={v:?} is not <job_id>:<machine_id> (no ':')"
        ))
    })?;
    validate_job_id(job)?;
    validate_machine_id(machine)?;
    Ok((job.to_string(), machine.to_string()))
}

async fn side(state: &AppState, job_id: &str, machine_id: &str) -> Result<Side, ApiError> {
    let r = state
        .record(job_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {job_id}")))?;
    let m = r
        .machine(machine_id)
        .ok_or_else(|| ApiError::NotFound(format!("job {job_id} has no machine {machine_id}")))?;
    let fp = m.fingerprint.clone().ok_or_else(|| {
        ApiError::NotFound(format!(
            "no fingerprint recorded for {machine_id} in job {job_id} (its agent sent none yet)"
        ))
    })?;
    Ok(Side {
        job_id: job_id.to_string(),
        machine_id: machine_id.to_string(),
        run_id: m.run_id.clone(),
        created_ms: r.created_ms,
        fingerprint_id: fp.fingerprint_id.clone(),
        fingerprint: fp,
    })
}

/// `GET /api/fingerprints/diff?a=<job_id>:<machine_id>&b=<job_id>:<machine_id>`.
pub async fn diff(
    State(state): State<AppState>,
    params: Result<Query<DiffParams>, QueryRejection>,
) -> Result<Json<Diff>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (ja, ma) = parse_ref("a", p.a.as_deref())?;
    let (jb, mb) = parse_ref("b", p.b.as_deref())?;
    let a = side(&state, &ja, &ma).await?;
    let b = side(&state, &jb, &mb).await?;
    let changes = a.fingerprint.diff(&b.fingerprint);
    Ok(Json(Diff {
        same: a.fingerprint_id == b.fingerprint_id && changes.is_empty(),
        changes,
        a,
        b,
    }))
}

/// Fills each machine's `previous`: the newest job created before this one that ran on the
/// same machine and recorded a fingerprint for it, compared with this one. Looks through at
/// most [`PREVIOUS_SCAN`] list entries (memory) and loads a few records; a machine without a
/// fingerprint here is left alone.
pub async fn previous(state: &AppState, d: &mut JobDetail) {
    let wanted: Vec<usize> = (0..d.machines.len())
        .filter(|&i| d.machines[i].fingerprint.is_some())
        .collect();
    if wanted.is_empty() {
        return;
    }
    let (earlier, _) = state.index.list(PREVIOUS_SCAN, Some(d.created_ms));
    for i in wanted {
        let mid = d.machines[i].machine_id.clone();
        for item in earlier
            .iter()
            .filter(|j| j.job_id != d.job_id && j.machines.contains(&mid))
            .take(PREVIOUS_LOADS)
        {
            let Ok(Some(r)) = state.record(&item.job_id).await else {
                continue;
            };
            let Some(fp) = r.machine(&mid).and_then(|m| m.fingerprint.as_ref()) else {
                continue;
            };
            let now = d.machines[i].fingerprint.as_ref().expect("filtered");
            let changes = fp.diff(now);
            d.machines[i].previous = Some(Previous {
                job_id: r.job_id.clone(),
                created_ms: r.created_ms,
                fingerprint_id: fp.fingerprint_id.clone(),
                same: fp.fingerprint_id == now.fingerprint_id && changes.is_empty(),
                changes,
            });
            break;
        }
    }
}
