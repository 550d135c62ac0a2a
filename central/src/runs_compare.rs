//! Run against run: `GET /api/compare?run=<job>:<machine>[:<cell>]&run=...` sets any recorded
//! runs (of any jobs, machines and cells) side by side against the first, and
//! `GET /api/compare?jobs=<a>,<b>,...` does it for every (machine, cell) the baseline job shares
//! with the others. Each metric compares medians and says whether the 95% intervals separate;
//! `changes` is the fingerprint diff against the baseline entry.

use crate::cells::{cell_machine, is_matrix, CellState, RunView};
use crate::error::ApiError;
use crate::record::JobRecord;
use crate::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use bench_schemas::fingerprint::{Change, Fingerprint};
use bench_schemas::matrix::Cell;
use bench_schemas::{validate_job_id, validate_machine_id, Job, Load, Separation, Stats, Summary};
use serde::Serialize;

/// Fewest runs or jobs compared.
pub const MIN_COMPARED: usize = 2;
/// Most runs or jobs compared.
pub const MAX_COMPARED: usize = 8;

/// One metric against the baseline entry's.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct MetricDelta {
    /// The baseline's median (or load figure).
    pub baseline: f64,
    /// This entry's.
    pub value: f64,
    /// `value - baseline`.
    pub delta: f64,
    /// `value / baseline` (null when the baseline is 0).
    pub ratio: Option<f64>,
    /// `delta / baseline` in percent (null when the baseline is 0).
    pub pct: Option<f64>,
    /// Both have a 95% interval and they are separated (false for load figures).
    pub exceeds_ci: bool,
    /// The direction is the worse one (lower rate, higher time or energy).
    pub worse: bool,
}

/// Each metric both sides have.
#[derive(Serialize, Debug, Clone, Default, PartialEq)]
pub struct VsBaseline {
    /// Decode rate (higher is better).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gen_tokens_per_s: Option<MetricDelta>,
    /// Time to first token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<MetricDelta>,
    /// Total time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<MetricDelta>,
    /// llama-bench's pp.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pp_tokens_per_s: Option<MetricDelta>,
    /// llama-bench's tg.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tg_tokens_per_s: Option<MetricDelta>,
    /// Energy per generated token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joules_per_token: Option<MetricDelta>,
    /// Load: what the machine serves in total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tokens_per_s: Option<MetricDelta>,
    /// Load: TTFT p99 across the requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_p99_ms: Option<MetricDelta>,
}

/// One run of one machine in one cell of one job.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Entry {
    /// `<job_id>:<machine_id>[:<cell>]`.
    #[serde(rename = "ref")]
    pub reference: String,
    /// The job.
    pub job_id: String,
    /// The machine.
    pub machine_id: String,
    /// The cell key (`""` without a matrix).
    pub cell: String,
    /// The machine's label.
    pub label: String,
    /// When the job was created (unix ms).
    pub created_ms: u64,
    /// The cell's model.
    pub model: String,
    /// Where the machine stands in the cell.
    pub status: CellState,
    /// What the cell was measured on.
    pub fingerprint_id: Option<String>,
    /// Over the cell's measured runs.
    pub summary: Option<Summary>,
    /// A load cell's aggregate.
    pub load: Option<Load>,
    /// Against the group's baseline entry (null on it).
    pub vs_baseline: Option<VsBaseline>,
    /// The fingerprint diff against the baseline entry (absent when either has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<Vec<Change>>,
    #[serde(skip)]
    fingerprint: Option<Fingerprint>,
}

/// Entries compared with their first.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Group {
    /// The machine, when every entry's is the same.
    pub machine_id: Option<String>,
    /// The cell, when every entry's is the same.
    pub cell: Option<String>,
    /// The baseline first.
    pub entries: Vec<Entry>,
}

/// `GET /api/compare`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The first `run` (its ref) or the first of `jobs`.
    pub baseline: String,
    /// One group (`run=`) or one per shared (machine, cell) (`jobs=`).
    pub groups: Vec<Group>,
}

/// The job's cells; a job central never saw (no `job_accepted`) is one cell with an empty key.
fn job_cells(r: &JobRecord) -> Vec<Cell> {
    match &r.job {
        Some(j) => j.cells(),
        None => Job::new("", "").cells(),
    }
}

/// The entry of `machine_id` in cell `cell` of `r` (no cell: the job's only one, or a matrix
/// job's first cell the machine measured); None when the machine has nothing in the cell.
fn entry(
    state: &AppState,
    r: &JobRecord,
    machine_id: &str,
    cell: Option<&str>,
) -> Result<Option<Entry>, ApiError> {
    let m = r.machine(machine_id).ok_or_else(|| {
        ApiError::NotFound(format!("job {} has no machine {machine_id}", r.job_id))
    })?;
    let cells = job_cells(r);
    let view = RunView::of_run(m);
    let measured = |c: &Cell| {
        let cm = cell_machine(r.job.as_ref(), c, &view);
        cm.has_data().then_some(cm)
    };
    let found = match cell {
        Some(key) => {
            let c = cells.iter().find(|c| c.key == key).ok_or_else(|| {
                ApiError::NotFound(format!("job {} has no cell {key:?}", r.job_id))
            })?;
            measured(c).map(|cm| (c, cm))
        }
        None if is_matrix(r.job.as_ref()) => {
            cells.iter().find_map(|c| measured(c).map(|cm| (c, cm)))
        }
        None => cells.first().and_then(|c| measured(c).map(|cm| (c, cm))),
    };
    let Some((c, cm)) = found else {
        return Ok(None);
    };
    let mut reference = format!("{}:{machine_id}", r.job_id);
    if !c.key.is_empty() {
        reference = format!("{reference}:{}", c.key);
    }
    Ok(Some(Entry {
        reference,
        job_id: r.job_id.clone(),
        machine_id: machine_id.to_string(),
        cell: c.key.clone(),
        label: state
            .registry
            .label(machine_id)
            .or_else(|| m.label.clone())
            .unwrap_or_else(|| machine_id.to_string()),
        created_ms: r.created_ms,
        model: c.job.model.clone(),
        status: cm.status,
        fingerprint_id: cm.fingerprint_id,
        summary: cm.summary,
        load: cm.load,
        vs_baseline: None,
        changes: None,
        fingerprint: m.fingerprint.clone(),
    }))
}

fn delta(
    base: Option<f64>,
    value: Option<f64>,
    ci: Option<(&Stats, &Stats)>,
    higher_better: bool,
) -> Option<MetricDelta> {
    let (b, v) = (base?, value?);
    if !(b.is_finite() && v.is_finite()) {
        return None;
    }
    let d = v - b;
    Some(MetricDelta {
        baseline: b,
        value: v,
        delta: d,
        ratio: (b != 0.0).then(|| v / b),
        pct: (b != 0.0).then(|| d / b * 100.0),
        exceeds_ci: ci.is_some_and(|(x, y)| Separation::of(x, y).separated),
        worse: if higher_better { v < b } else { v > b },
    })
}

fn stat(
    base: &Option<Summary>,
    e: &Option<Summary>,
    f: fn(&Summary) -> Option<Stats>,
    higher_better: bool,
) -> Option<MetricDelta> {
    let (b, v) = (base.as_ref().and_then(f)?, e.as_ref().and_then(f)?);
    delta(
        Some(b.median),
        Some(v.median),
        Some((&b, &v)),
        higher_better,
    )
}

fn vs_baseline(base: &Entry, e: &Entry) -> VsBaseline {
    let (bs, es) = (&base.summary, &e.summary);
    let load = |x: &Entry, f: fn(&Load) -> Option<f64>| x.load.as_ref().and_then(f);
    let out_rate = |l: &Load| Some(l.output_tokens_per_s);
    let p99 = |l: &Load| l.ttft_ms.map(|p| p.p99);
    VsBaseline {
        gen_tokens_per_s: stat(bs, es, |s| s.gen_tokens_per_s, true),
        ttft_ms: stat(bs, es, |s| s.ttft_ms, false),
        total_ms: stat(bs, es, |s| s.total_ms, false),
        pp_tokens_per_s: stat(bs, es, |s| s.pp_tokens_per_s, true),
        tg_tokens_per_s: stat(bs, es, |s| s.tg_tokens_per_s, true),
        joules_per_token: stat(bs, es, |s| s.joules_per_token, false),
        output_tokens_per_s: delta(load(base, out_rate), load(e, out_rate), None, true),
        ttft_p99_ms: delta(load(base, p99), load(e, p99), None, false),
    }
}

/// Fills `vs_baseline` and `changes` against the first entry; names the machine and cell when
/// every entry shares them.
fn group(mut entries: Vec<Entry>) -> Group {
    let base = entries[0].clone();
    for (i, e) in entries.iter_mut().enumerate() {
        if i > 0 {
            e.vs_baseline = Some(vs_baseline(&base, e));
        }
        e.changes = match (&base.fingerprint, &e.fingerprint) {
            (Some(b), Some(f)) => Some(b.diff(f)),
            _ => None,
        };
    }
    let same = |f: fn(&Entry) -> &str| {
        let first = f(&entries[0]);
        entries
            .iter()
            .all(|e| f(e) == first)
            .then(|| first.to_string())
    };
    Group {
        machine_id: same(|e| &e.machine_id),
        cell: same(|e| &e.cell),
        entries,
    }
}

/// `<job_id>:<machine_id>[:<cell>]`, validated.
fn parse_run(v: &str) -> Result<(String, String, Option<String>), ApiError> {
    let (job, rest) = v.split_once(':').ok_or_else(|| {
        ApiError::BadRequest(format!(
            "run={v:?} is not <job_id>:<machine_id>[:<cell>] (no ':')"
        ))
    })?;
    let (machine, cell) = match rest.split_once(':') {
        Some((m, c)) => (m, Some(c.to_string())),
        None => (rest, None),
    };
    validate_job_id(job)?;
    validate_machine_id(machine)?;
    Ok((job.to_string(), machine.to_string(), cell))
}

fn count_ok(what: &str, n: usize) -> Result<(), ApiError> {
    if (MIN_COMPARED..=MAX_COMPARED).contains(&n) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "give {MIN_COMPARED} to {MAX_COMPARED} {what} to compare, got {n}"
        )))
    }
}

async fn load(state: &AppState, job_id: &str) -> Result<JobRecord, ApiError> {
    state
        .record(job_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job {job_id}")))
}

/// `GET /api/compare?run=...&run=...` or `?jobs=a,b,...`.
pub async fn compare(
    State(state): State<AppState>,
    params: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<Comparison>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let runs: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k == "run")
        .map(|(_, v)| v.as_str())
        .collect();
    let jobs: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k == "jobs")
        .flat_map(|(_, v)| v.split(','))
        .collect();
    match (runs.is_empty(), jobs.is_empty()) {
        (false, false) => Err(ApiError::BadRequest(
            "give either run=<job_id>:<machine_id>[:<cell>] (repeated) or jobs=<a>,<b>, not both"
                .into(),
        )),
        (true, true) => Err(ApiError::BadRequest(
            "give run=<job_id>:<machine_id>[:<cell>] at least twice, or jobs=<a>,<b>".into(),
        )),
        (false, true) => by_runs(&state, &runs).await.map(Json),
        (true, false) => by_jobs(&state, &jobs).await.map(Json),
    }
}

async fn by_runs(state: &AppState, runs: &[&str]) -> Result<Comparison, ApiError> {
    count_ok("runs", runs.len())?;
    let refs = runs
        .iter()
        .map(|r| parse_run(r))
        .collect::<Result<Vec<_>, _>>()?;
    let mut entries = Vec::with_capacity(refs.len());
    for (job, machine, cell) in &refs {
        let r = load(state, job).await?;
        let e = entry(state, &r, machine, cell.as_deref())?.ok_or_else(|| {
            ApiError::NotFound(match cell {
                Some(c) => format!("{machine} has no runs in cell {c:?} of job {job}"),
                None => format!("{machine} has no runs in job {job}"),
            })
        })?;
        entries.push(e);
    }
    let g = group(entries);
    Ok(Comparison {
        baseline: g.entries[0].reference.clone(),
        groups: vec![g],
    })
}

async fn by_jobs(state: &AppState, jobs: &[&str]) -> Result<Comparison, ApiError> {
    count_ok("jobs", jobs.len())?;
    for j in jobs {
        validate_job_id(j)?;
    }
    let mut records = Vec::with_capacity(jobs.len());
    for j in jobs {
        records.push(load(state, j).await?);
    }
    let base = &records[0];
    let mut groups = Vec::new();
    for m in &base.machines {
        for c in job_cells(base) {
            let Some(first) = entry(state, base, &m.machine_id, Some(&c.key))? else {
                continue;
            };
            let mut entries = vec![first];
            for r in &records[1..] {
                if r.machine(&m.machine_id).is_none()
                    || !job_cells(r).iter().any(|x| x.key == c.key)
                {
                    continue;
                }
                if let Some(e) = entry(state, r, &m.machine_id, Some(&c.key))? {
                    entries.push(e);
                }
            }
            if entries.len() > 1 {
                groups.push(group(entries));
            }
        }
    }
    if groups.is_empty() {
        return Err(ApiError::NotFound(format!(
            "no machine and cell of job {} has runs in the other jobs ({})",
            jobs[0],
            jobs[1..].join(", ")
        )));
    }
    Ok(Comparison {
        baseline: jobs[0].to_string(),
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_references_parse_with_a_cell_that_holds_colons() {
        assert_eq!(
            parse_run("J1:m1:model=b:q8,concurrency=2").unwrap(),
            (
                "J1".into(),
                "m1".into(),
                Some("model=b:q8,concurrency=2".into())
            )
        );
        assert_eq!(
            parse_run("J1:m1").unwrap(),
            ("J1".into(), "m1".into(), None)
        );
        assert_eq!(parse_run("J1").unwrap_err().code(), "bad_request");
        assert_eq!(parse_run("J.1:m1").unwrap_err().code(), "invalid_id");
        assert_eq!(parse_run("J1:M!").unwrap_err().code(), "invalid_id");
    }

    #[test]
    fn deltas_say_the_direction_and_the_interval() {
        let d = delta(Some(50.0), Some(40.0), None, true).unwrap();
        assert_eq!((d.delta, d.ratio, d.pct), (-10.0, Some(0.8), Some(-20.0)));
        assert!(d.worse && !d.exceeds_ci);
        let d = delta(Some(100.0), Some(120.0), None, false).unwrap();
        assert!(d.worse);
        assert!(delta(Some(0.0), Some(1.0), None, true)
            .unwrap()
            .pct
            .is_none());
        assert!(delta(None, Some(1.0), None, true).is_none());
    }
}
