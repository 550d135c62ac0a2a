//! Matrix jobs in `GET /api/jobs/{id}`: each cell's machines (status, summary, load), a ranking
//! and winner per cell, and the concurrency sweeps with their capacity under the job's SLO.
//! Computed on the read path from what the record holds (each machine's runs, tagged with their
//! `cell`, and its `cell_done` results); ingest does no per-cell work.

use crate::compare::{self, MachineDetail, Rank};
use crate::error::ErrorInfo;
use crate::record::{MachineRun, RunStatus};
use bench_schemas::matrix::{capacity, Cell, AXES};
use bench_schemas::{CellResult, CellStatus, Job, Load, Metrics, Slo, Summary};
use serde::Serialize;
use std::collections::BTreeMap;

/// Where one machine stands in one cell.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CellState {
    /// No run of it yet.
    Pending,
    /// Its runs have begun, its `cell_done` has not come.
    Running,
    /// Its `cell_done` said done.
    Done,
    /// It failed, or the machine failed or was cancelled before it ended.
    Failed,
}

/// One machine in one cell.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct CellMachine {
    /// The machine.
    pub machine_id: String,
    /// Where it stands.
    pub status: CellState,
    /// Why it failed.
    pub error: Option<ErrorInfo>,
    /// The `cell_done` summary, before it `Summary::of` the cell's runs (null without runs).
    pub summary: Option<Summary>,
    /// A load cell's aggregate (from `cell_done`).
    pub load: Option<Load>,
    /// Runs of the cell recorded (warmups included).
    pub runs: u32,
    /// The fingerprint the cell was measured on.
    pub fingerprint_id: Option<String>,
}

impl CellMachine {
    /// Whether there is anything measured to compare.
    pub fn has_data(&self) -> bool {
        self.runs > 0 || self.summary.is_some() || self.load.is_some()
    }
}

/// One cell of a matrix job.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct CellView {
    /// The cell key.
    pub cell: String,
    /// Its axes' values.
    pub values: BTreeMap<String, String>,
    /// Each machine, in the job's machine order.
    pub machines: Vec<CellMachine>,
    /// Like the top-level ranking, over this cell's measured runs.
    pub ranking: Vec<Rank>,
    /// The rank 1 machine when its interval separates from the runner-up's.
    pub winner: Option<String>,
}

/// One point of a machine's sweep.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SweepPoint {
    /// Streams at once.
    pub concurrency: u32,
    /// The cell key.
    pub cell: String,
    /// Its aggregate.
    pub load: Load,
}

/// One machine's sweep.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct SweepMachine {
    /// The machine.
    pub machine_id: String,
    /// Rising concurrency, only cells with a load.
    pub points: Vec<SweepPoint>,
    /// schemas `matrix::capacity` under the job's slo (null without one).
    pub capacity: Option<u32>,
}

/// Cells that differ only in concurrency.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Sweep {
    /// The cell key without its `concurrency=` part.
    pub group: String,
    /// The other axes' values.
    pub values: BTreeMap<String, String>,
    /// The job's objective.
    pub slo: Option<Slo>,
    /// Each machine.
    pub machines: Vec<SweepMachine>,
}

/// What one machine's shown run holds, from a record or from a job document.
#[derive(Debug, Clone, Copy)]
pub struct RunView<'a> {
    /// The machine.
    pub machine_id: &'a str,
    /// Every finished run (each with its `cell`).
    pub repeats: &'a [Metrics],
    /// Its `cell_done` results.
    pub results: &'a [CellResult],
    /// Over all its measured runs (a job without a matrix: the one cell's).
    pub summary: Option<&'a Summary>,
    /// Its fingerprint id.
    pub fingerprint_id: Option<&'a str>,
    /// The machine's status.
    pub status: RunStatus,
    /// The machine's error.
    pub error: Option<&'a ErrorInfo>,
    /// The cell of the run in progress.
    pub current_cell: Option<&'a str>,
}

impl<'a> RunView<'a> {
    /// From a record.
    pub fn of_run(m: &'a MachineRun) -> Self {
        Self {
            machine_id: &m.machine_id,
            repeats: &m.repeats,
            results: &m.cells,
            summary: m.summary.as_ref(),
            fingerprint_id: m.fingerprint.as_ref().map(|f| f.fingerprint_id.as_str()),
            status: m.status,
            error: m.error.as_ref(),
            current_cell: m.current_cell.as_deref(),
        }
    }

    /// From a job document's machine (no run in progress known).
    pub fn of_detail(m: &'a MachineDetail) -> Self {
        Self {
            machine_id: &m.machine_id,
            repeats: &m.repeats,
            results: &m.cells,
            summary: m.summary.as_ref(),
            fingerprint_id: m.fingerprint.as_ref().map(|f| f.fingerprint_id.as_str()),
            status: m.status,
            error: m.error.as_ref(),
            current_cell: None,
        }
    }
}

/// Whether the job varies anything (its cells have keys).
pub fn is_matrix(job: Option<&Job>) -> bool {
    job.and_then(|j| j.matrix.as_ref())
        .is_some_and(|m| !m.is_empty())
}

/// The job's cells (one with an empty key without a matrix; none without a job).
pub fn cells_of(job: Option<&Job>) -> Vec<Cell> {
    job.map(Job::cells).unwrap_or_default()
}

/// The runs of cell `key` (`""`: the runs without a cell).
pub fn runs_of<'a>(repeats: &'a [Metrics], key: &'a str) -> impl Iterator<Item = &'a Metrics> {
    repeats
        .iter()
        .filter(move |r| r.cell.as_deref().unwrap_or("") == key)
}

/// One machine in one cell.
pub fn cell_machine(job: Option<&Job>, cell: &Cell, v: &RunView) -> CellMachine {
    let include_short = job.is_some_and(|j| j.include_short);
    let runs: Vec<&Metrics> = runs_of(v.repeats, &cell.key).collect();
    let result = v.results.iter().find(|c| c.cell == cell.key);
    let machine_fp = v.fingerprint_id.map(str::to_string);
    if !is_matrix(job) {
        // The whole job is the one cell: the machine's own state.
        let status = match v.status {
            RunStatus::Queued => CellState::Pending,
            RunStatus::Running => CellState::Running,
            RunStatus::Done => CellState::Done,
            RunStatus::Failed | RunStatus::Cancelled => CellState::Failed,
        };
        return CellMachine {
            machine_id: v.machine_id.to_string(),
            status,
            error: v.error.cloned(),
            summary: v
                .summary
                .cloned()
                .or_else(|| (!runs.is_empty()).then(|| Summary::of_refs(&runs, include_short))),
            load: result.and_then(|r| r.load.clone()),
            runs: runs.len() as u32,
            fingerprint_id: result.and_then(|r| r.fingerprint_id.clone()).or(machine_fp),
        };
    }
    let machine_failed = matches!(v.status, RunStatus::Failed | RunStatus::Cancelled);
    let (status, error) = match result {
        Some(r) => (
            match r.status {
                CellStatus::Done => CellState::Done,
                CellStatus::Failed => CellState::Failed,
            },
            r.error.clone().map(ErrorInfo::from),
        ),
        None if machine_failed => (CellState::Failed, v.error.cloned()),
        None if v.status == RunStatus::Done => (CellState::Done, None),
        None if !runs.is_empty() || v.current_cell == Some(cell.key.as_str()) => {
            (CellState::Running, None)
        }
        None => (CellState::Pending, None),
    };
    let summary = result
        .and_then(|r| r.summary.clone())
        .or_else(|| (!runs.is_empty()).then(|| Summary::of_refs(&runs, include_short)));
    let fingerprint_id = result
        .and_then(|r| r.fingerprint_id.clone())
        .or_else(|| (!runs.is_empty()).then_some(machine_fp).flatten());
    CellMachine {
        machine_id: v.machine_id.to_string(),
        status,
        error,
        summary,
        load: result.and_then(|r| r.load.clone()),
        runs: runs.len() as u32,
        fingerprint_id,
    }
}

/// A machine as the ranking sees it in one cell: the cell's summary (the ranking reads nothing
/// else), and with `with_runs` its runs of the cell (the first cell's, which the top-level
/// energy reads).
fn in_cell(
    m: &MachineDetail,
    cell: &str,
    summary: Option<Summary>,
    with_runs: bool,
) -> MachineDetail {
    let mut d = MachineDetail::bare(&m.machine_id, &m.label);
    if with_runs {
        d.repeats = runs_of(&m.repeats, cell).cloned().collect();
    }
    d.summary = summary;
    d
}

/// The matrix part of a job document: its cells (with rankings), its sweeps, and the first
/// cell's machines as the ranking sees them (for the top-level ranking and energy).
pub struct MatrixView {
    /// Each cell.
    pub cells: Vec<CellView>,
    /// Each concurrency sweep.
    pub sweeps: Vec<Sweep>,
    /// The first cell's machines (runs and summary of that cell only).
    pub first: Vec<MachineDetail>,
}

/// The cells and sweeps of a matrix job; `runs[i]` is `machines[i]`'s record view.
pub fn matrix_view(
    job: &Job,
    machines: &[MachineDetail],
    runs: &[RunView],
    baseline: Option<&str>,
) -> MatrixView {
    let mut cells = Vec::new();
    let mut first = Vec::new();
    let all = job.cells();
    for (i, cell) in all.iter().enumerate() {
        let cms: Vec<CellMachine> = runs
            .iter()
            .map(|v| cell_machine(Some(job), cell, v))
            .collect();
        let slice: Vec<MachineDetail> = machines
            .iter()
            .zip(&cms)
            .map(|(m, cm)| in_cell(m, &cell.key, cm.summary.clone(), i == 0))
            .collect();
        let ranking = compare::ranking(&slice, baseline);
        let winner = ranking
            .first()
            .filter(|r| r.clear_winner)
            .map(|r| r.machine_id.clone());
        if i == 0 {
            first = slice;
        }
        cells.push(CellView {
            cell: cell.key.clone(),
            values: cell.values.clone(),
            machines: cms,
            ranking,
            winner,
        });
    }
    MatrixView {
        sweeps: sweeps(job, &all, &cells),
        cells,
        first,
    }
}

/// One sweep per group of cells that differ only in concurrency (none when the matrix does
/// not vary it).
fn sweeps(job: &Job, all: &[Cell], views: &[CellView]) -> Vec<Sweep> {
    let varies = job
        .matrix
        .as_ref()
        .is_some_and(|m| !m.concurrency.is_empty());
    if !varies {
        return Vec::new();
    }
    // Group key and values, in first-seen order.
    let mut groups: Vec<(String, BTreeMap<String, String>, Vec<usize>)> = Vec::new();
    for (i, cell) in all.iter().enumerate() {
        let values: BTreeMap<String, String> = cell
            .values
            .iter()
            .filter(|(k, _)| k.as_str() != "concurrency")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let group: Vec<String> = AXES
            .iter()
            .filter_map(|a| values.get(*a).map(|v| format!("{a}={v}")))
            .collect();
        let group = group.join(",");
        match groups.iter_mut().find(|g| g.0 == group) {
            Some(g) => g.2.push(i),
            None => groups.push((group, values, vec![i])),
        }
    }
    let n = views.first().map_or(0, |v| v.machines.len());
    groups
        .into_iter()
        .map(|(group, values, idx)| Sweep {
            group,
            values,
            slo: job.slo,
            machines: (0..n)
                .map(|mi| {
                    let mut points: Vec<SweepPoint> = idx
                        .iter()
                        .filter_map(|&ci| {
                            let load = views[ci].machines[mi].load.clone()?;
                            Some(SweepPoint {
                                concurrency: all[ci].job.concurrency.unwrap_or(load.concurrency),
                                cell: all[ci].key.clone(),
                                load,
                            })
                        })
                        .collect();
                    points.sort_by_key(|p| p.concurrency);
                    let pairs: Vec<(u32, &Load)> =
                        points.iter().map(|p| (p.concurrency, &p.load)).collect();
                    SweepMachine {
                        machine_id: views[0].machines[mi].machine_id.clone(),
                        capacity: job.slo.and_then(|slo| capacity(&slo, &pairs)),
                        points,
                    }
                })
                .collect(),
        })
        .collect()
}
