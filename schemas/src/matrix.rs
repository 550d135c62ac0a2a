//! Matrix races and load: a job may carry `matrix`, lists of values for some of its settings; its
//! **cells** are their cartesian product, each a plain [`Job`] with one value per axis and a
//! stable `cell` key (`"model=q4,concurrency=2"`: the axes in [`AXES`] order, the values as they
//! were written). A cell with `concurrency` (or `requests` / `duration_s`) is a **load** cell: C
//! streams against the engine at once, each starting its next request when the previous ends;
//! its aggregate is a [`Load`]. Every machine reports each cell it finished, or why not, in a
//! `cell_done` event ([`CellResult`]), and all of them again in `job_done.cells`.

use crate::error::ErrorBody;
use crate::event::StopReason;
use crate::job::Job;
use crate::metrics::{percentiles, Metrics, Percentiles, Stats, Summary};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The most cells one job may have.
pub const MAX_CELLS: usize = 64;
/// The most concurrent streams one cell may run.
pub const MAX_CONCURRENCY: u32 = 64;
/// The longest `duration_s` of a load cell.
pub const MAX_DURATION_S: u32 = 3600;
/// The most runs a matrix job may ask of one machine over all its cells (each cell is also
/// bounded by the agent's `max_runs`). `job_done` carries every run's metrics, and NATS refuses
/// a message over its `max_payload` (1 MiB by default): a larger job's final event would be
/// dropped and the job never end.
pub const MAX_JOB_RUNS: u64 = 512;

/// The axes a matrix may vary, in the order cell keys name them.
pub const AXES: [&str; 9] = [
    "model",
    "backend",
    "num_ctx",
    "prompt_tokens",
    "profile",
    "max_tokens",
    "depth",
    "temperature",
    "concurrency",
];

/// The values of each axis; an absent or empty list leaves the job's own setting.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Matrix {
    /// Engine model names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model: Vec<String>,
    /// Backend names of the agent's config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend: Vec<String>,
    /// Context windows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub num_ctx: Vec<u32>,
    /// Exact prompt sizes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_tokens: Vec<u32>,
    /// `ppN-tgM` shapes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<String>,
    /// Output lengths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub max_tokens: Vec<u32>,
    /// Context filled before the measured prompt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depth: Vec<u32>,
    /// Sampling temperatures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub temperature: Vec<f64>,
    /// Concurrent streams: every cell of this axis is a load cell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub concurrency: Vec<u32>,
}

/// In which order a machine runs its cells.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Every repeat of a cell before the next cell (the default).
    #[default]
    Sequential,
    /// One measured repeat of each cell per round, so slow drift (heat, background load)
    /// spreads over every cell instead of landing on the last ones. A load cell runs whole in
    /// its place of the first round (its streams are one closed loop).
    Interleaved,
}

/// Service-level objective of a concurrency sweep: the capacity question.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    /// Highest acceptable TTFT p99 across a load cell's requests, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p99_ms: Option<f64>,
}

impl Slo {
    /// Whether a load result is within the objective (true when it sets none).
    pub fn met_by(&self, load: &Load) -> bool {
        match self.ttft_p99_ms {
            None => true,
            Some(max) => load.ttft_ms.is_some_and(|p| p.p99 <= max),
        }
    }
}

/// One cell of a job: its key, the value of each varied axis, and the job it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Stable key: `axis=value` for each varied axis in [`AXES`] order, joined by `,`; empty for
    /// a job without a matrix.
    pub key: String,
    /// The varied axes and their values, as written in the key.
    pub values: BTreeMap<String, String>,
    /// The job this cell runs (no matrix).
    pub job: Job,
}

/// How a machine's cell ended.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CellStatus {
    /// Every run of it finished.
    Done,
    /// It could not run or stopped (`error` says why); the machine went on with the next cell.
    Failed,
}

/// `cell_done`, and each entry of `job_done.cells`: one machine's result for one cell.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CellResult {
    /// The cell key.
    pub cell: String,
    /// Its axes' values.
    #[serde(default)]
    pub values: BTreeMap<String, String>,
    /// Done or failed.
    pub status: CellStatus,
    /// Why it failed (`model_not_found`, `timeout`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Over the cell's measured runs (every request of a load cell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// A load cell's aggregate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<Load>,
    /// Why its repeats stopped.
    #[serde(default)]
    pub stop_reason: StopReason,
    /// The fingerprint its runs were measured on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint_id: Option<String>,
    /// First and last `repeat_index` of its runs (warmups included), when it ran any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_range: Option<(u32, u32)>,
}

/// The aggregate of a load cell: C closed-loop streams, every measured request counted.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Load {
    /// Streams at once.
    pub concurrency: u32,
    /// Measured requests that finished.
    pub requests: u32,
    /// First request sent to last final message, ms.
    pub wall_ms: f64,
    /// Generated tokens over all requests (the engine's count).
    pub output_tokens: u64,
    /// `output_tokens` / wall time: what the machine serves in total.
    pub output_tokens_per_s: f64,
    /// Requests / wall time.
    pub requests_per_s: f64,
    /// TTFT across the requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<Percentiles>,
    /// Inter-token latency across every token of every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub itl_ms: Option<Percentiles>,
    /// Each request's decode rate: what one user sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_stream_tokens_per_s: Option<Stats>,
}

impl Load {
    /// The aggregate of `runs` (the measured requests, each with `start_ms`: when it was sent,
    /// ms since the load began) and `itl` (every inter-token gap of every request, ms).
    pub fn of(concurrency: u32, runs: &[&Metrics], itl: &[f64]) -> Option<Self> {
        if runs.is_empty() {
            return None;
        }
        let start = runs
            .iter()
            .map(|m| m.start_ms.unwrap_or(0.0))
            .fold(f64::INFINITY, f64::min);
        let end = runs
            .iter()
            .map(|m| m.start_ms.unwrap_or(0.0) + finite_or_zero(m.total_ms))
            .fold(f64::NEG_INFINITY, f64::max);
        let wall_ms = (end - start).max(0.0);
        let output_tokens: u64 = runs.iter().map(|m| m.gen_tokens).sum();
        let per_s = |x: f64| {
            if wall_ms > 0.0 {
                x / (wall_ms / 1000.0)
            } else {
                0.0
            }
        };
        let ttft: Vec<f64> = runs
            .iter()
            .map(|m| m.ttft_ms)
            .filter(|t| t.is_finite())
            .collect();
        Some(Self {
            concurrency,
            requests: runs.len() as u32,
            wall_ms,
            output_tokens,
            output_tokens_per_s: per_s(output_tokens as f64),
            requests_per_s: per_s(runs.len() as f64),
            ttft_ms: percentiles(&ttft),
            itl_ms: percentiles(itl),
            per_stream_tokens_per_s: Stats::from_samples(
                runs.iter().filter_map(|m| m.gen_tokens_per_s),
            ),
        })
    }
}

fn finite_or_zero(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// The highest concurrency whose load meets the objective, over one machine's sweep points
/// (`(concurrency, load)`): the points are taken in rising concurrency and the answer is the
/// last one before the first that misses (a sweep that recovers later does not count).
pub fn capacity(slo: &Slo, points: &[(u32, &Load)]) -> Option<u32> {
    let mut sorted: Vec<(u32, &Load)> = points.to_vec();
    sorted.sort_by_key(|p| p.0);
    let mut best = None;
    for (c, load) in sorted {
        if !slo.met_by(load) {
            break;
        }
        best = Some(c);
    }
    best
}

fn fmt_f64(x: f64) -> String {
    // Rust prints 0.7 as "0.7" and 1.0 as "1"; the key keeps that shortest form.
    format!("{x}")
}

impl Matrix {
    /// The varied axes with their values as written, in [`AXES`] order (empty lists skipped).
    pub fn axes(&self) -> Vec<(&'static str, Vec<String>)> {
        let s = |v: &[u32]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let all: [(&'static str, Vec<String>); 9] = [
            ("model", self.model.clone()),
            ("backend", self.backend.clone()),
            ("num_ctx", s(&self.num_ctx)),
            ("prompt_tokens", s(&self.prompt_tokens)),
            ("profile", self.profile.clone()),
            ("max_tokens", s(&self.max_tokens)),
            ("depth", s(&self.depth)),
            (
                "temperature",
                self.temperature.iter().map(|x| fmt_f64(*x)).collect(),
            ),
            ("concurrency", s(&self.concurrency)),
        ];
        all.into_iter().filter(|(_, v)| !v.is_empty()).collect()
    }

    /// How many cells the matrix has (saturating).
    pub fn len(&self) -> usize {
        self.axes()
            .iter()
            .fold(1usize, |n, (_, v)| n.saturating_mul(v.len()))
    }

    /// Whether no axis is varied.
    pub fn is_empty(&self) -> bool {
        self.axes().is_empty()
    }
}

/// Applies one axis value to a cell's job.
fn apply(job: &mut Job, m: &Matrix, axis: &str, i: usize) {
    match axis {
        "model" => job.model = m.model[i].clone(),
        "backend" => job.backend = Some(m.backend[i].clone()),
        "num_ctx" => job.num_ctx = m.num_ctx[i],
        "prompt_tokens" => job.prompt_tokens = Some(m.prompt_tokens[i]),
        "profile" => job.profile = Some(m.profile[i].clone()),
        "max_tokens" => job.max_tokens = m.max_tokens[i],
        "depth" => job.depth = m.depth[i],
        "temperature" => job.temperature = m.temperature[i],
        "concurrency" => job.concurrency = Some(m.concurrency[i]),
        _ => unreachable!("axis {axis} is listed in AXES"),
    }
}

impl Job {
    /// The job's cells in order (the last axis varies fastest). A job without a matrix is one
    /// cell with an empty key. Call after [`Job::validate`] (which bounds their number).
    pub fn cells(&self) -> Vec<Cell> {
        let Some(m) = self.matrix.as_ref().filter(|m| !m.is_empty()) else {
            return vec![Cell {
                key: String::new(),
                values: BTreeMap::new(),
                job: self.clone(),
            }];
        };
        let axes = m.axes();
        let n = m.len().min(MAX_CELLS);
        let mut base = self.clone();
        base.matrix = None;
        base.order = Order::Sequential;
        (0..n)
            .map(|mut idx| {
                // Mixed-radix digits, the last axis fastest.
                let mut digits = vec![0usize; axes.len()];
                for (a, (_, vals)) in axes.iter().enumerate().rev() {
                    digits[a] = idx % vals.len();
                    idx /= vals.len();
                }
                let mut job = base.clone();
                let mut values = BTreeMap::new();
                let mut key = Vec::with_capacity(axes.len());
                for (a, (axis, vals)) in axes.iter().enumerate() {
                    apply(&mut job, m, axis, digits[a]);
                    key.push(format!("{axis}={}", vals[digits[a]]));
                    values.insert(axis.to_string(), vals[digits[a]].clone());
                }
                Cell {
                    key: key.join(","),
                    values,
                    job,
                }
            })
            .collect()
    }

    /// Whether this job (or cell) runs concurrent closed-loop streams.
    pub fn is_load(&self) -> bool {
        self.concurrency.is_some() || self.requests.is_some() || self.duration_s.is_some()
    }
}

/// Checks a matrix on its own: known values, no repeats in an axis, not too many cells, and
/// axes that can go together. Each cell's job is then checked by [`Job::validate`].
pub(crate) fn validate_matrix(job: &Job, m: &Matrix) -> Result<(), String> {
    for (axis, vals) in m.axes() {
        let mut seen = std::collections::BTreeSet::new();
        for v in &vals {
            if !seen.insert(v) {
                return Err(format!("matrix.{axis} lists {v:?} twice"));
            }
        }
    }
    if m.len() > MAX_CELLS {
        return Err(format!(
            "the matrix has {} cells; at most {MAX_CELLS}",
            m.len()
        ));
    }
    if !m.profile.is_empty() && (!m.prompt_tokens.is_empty() || !m.max_tokens.is_empty()) {
        return Err(
            "matrix.profile sets prompt_tokens and max_tokens: vary either the profile or those"
                .into(),
        );
    }
    if !m.concurrency.is_empty() && job.concurrency.is_some() {
        return Err("concurrency is both a job setting and a matrix axis; keep one".into());
    }
    Ok(())
}

/// The most runs the cells ask for together, each counted at its bound: its warmups, a cold
/// run, and its repeats (`max_repeat` for `auto`; a load cell every request of every stream,
/// `max_runs` with `duration_s`).
pub(crate) fn max_job_runs(cells: &[Cell], max_runs: u32) -> u64 {
    cells
        .iter()
        .map(|c| {
            let j = &c.job;
            let measured = if j.is_load() {
                match j.duration_s {
                    Some(_) => u64::from(max_runs),
                    None => {
                        u64::from(j.concurrency.unwrap_or(1)) * u64::from(j.requests_per_stream())
                    }
                }
            } else {
                u64::from(j.max_repeat())
            };
            measured + u64::from(j.warmup) + 1
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(v: &str) -> Job {
        serde_json::from_str(v).unwrap()
    }

    #[test]
    fn cells_are_the_product_with_stable_keys() {
        let j = job(
            r#"{"model":"m","prompt":"p","matrix":{"concurrency":[1,2],"model":["a","b:q8"],"temperature":[0.7]}}"#,
        );
        assert!(j.validate(&crate::JobLimits::default()).is_ok());
        let cells = j.cells();
        let keys: Vec<&str> = cells.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "model=a,temperature=0.7,concurrency=1",
                "model=a,temperature=0.7,concurrency=2",
                "model=b:q8,temperature=0.7,concurrency=1",
                "model=b:q8,temperature=0.7,concurrency=2"
            ]
        );
        assert_eq!(cells[3].job.model, "b:q8");
        assert_eq!(cells[3].job.concurrency, Some(2));
        assert_eq!(cells[3].job.temperature, 0.7);
        assert!(cells[3].job.matrix.is_none());
        assert_eq!(cells[3].values["model"], "b:q8");
        let plain = Job::new("m", "p").cells();
        assert_eq!(plain.len(), 1);
        assert_eq!(plain[0].key, "");
    }

    #[test]
    fn bad_matrices_are_refused() {
        let l = crate::JobLimits::default();
        let err = |v: &str| job(v).validate(&l).unwrap_err().message;
        assert!(
            err(r#"{"model":"m","prompt":"p","matrix":{"max_tokens":[4,4]}}"#).contains("twice")
        );
        assert!(err(
            r#"{"model":"m","prompt":"p","matrix":{"profile":["pp8-tg4"],"max_tokens":[4]}}"#
        )
        .contains("profile"));
        let many: Vec<String> = (1..=65).map(|i| i.to_string()).collect();
        assert!(err(&format!(
            r#"{{"model":"m","prompt":"p","matrix":{{"max_tokens":[{}]}}}}"#,
            many.join(",")
        ))
        .contains("at most 64"));
        // A cell that breaks the job's own rules names the cell.
        assert!(
            err(r#"{"model":"m","prompt":"p","matrix":{"max_tokens":[4,0]}}"#)
                .contains("max_tokens=0")
        );
        assert!(serde_json::from_str::<Job>(
            r#"{"model":"m","prompt":"p","matrix":{"modle":["x"]}}"#
        )
        .is_err());
        assert!(
            err(r#"{"model":"m","prompt":"p","concurrency":2,"repeat":"auto"}"#).contains("auto")
        );
        assert!(err(r#"{"model":"m","prompt":"p","concurrency":0}"#).contains("concurrency"));
        assert!(
            err(r#"{"model":"m","prompt":"p","concurrency":2,"requests":2,"duration_s":5}"#)
                .contains("duration_s")
        );
    }

    #[test]
    fn a_matrix_is_bounded_in_runs_over_all_its_cells() {
        // Each cell within max_runs, but 64 cells x 100 runs would make a job_done (every run's
        // metrics) several MiB: over NATS' max_payload, so it would be dropped and the job
        // would never end. The whole job is bounded by MAX_JOB_RUNS.
        let l = crate::JobLimits::default();
        let tokens: Vec<String> = (1..=64).map(|i| i.to_string()).collect();
        let big = job(&format!(
            r#"{{"model":"m","prompt":"p","repeat":99,"warmup":1,"matrix":{{"max_tokens":[{}]}}}}"#,
            tokens.join(",")
        ));
        let e = big.validate(&l).unwrap_err();
        assert!(
            e.message.contains("runs over its 64 cells"),
            "{}",
            e.message
        );
        // Load cells count every request of every stream; duration_s cells their bound.
        let load = job(
            r#"{"model":"m","prompt":"p","repeat":12,"warmup":1,"matrix":{"max_tokens":[8,16],"concurrency":[1,2,3,4,5,6,7,8]}}"#,
        );
        assert!(load.validate(&l).unwrap_err().message.contains("runs over"));
        let timed = job(
            r#"{"model":"m","prompt":"p","repeat":1,"duration_s":5,"matrix":{"concurrency":[1,2,4,8,16,32]}}"#,
        );
        assert!(timed
            .validate(&l)
            .unwrap_err()
            .message
            .contains("runs over"));
        // What the README shows still fits: 64 cells of 5 repeats after a warmup, a sweep.
        let ok = job(&format!(
            r#"{{"model":"m","prompt":"p","repeat":5,"warmup":1,"matrix":{{"max_tokens":[{}]}}}}"#,
            tokens.join(",")
        ));
        ok.validate(&l).unwrap();
        job(r#"{"model":"m","prompt":"p","repeat":4,"warmup":1,"matrix":{"concurrency":[1,2,4,8]},"slo":{"ttft_p99_ms":1000}}"#)
            .validate(&l)
            .unwrap();
        // And a job_done holding MAX_JOB_RUNS full runs (telemetry, a cell key) fits 1 MiB.
        let mut m: Metrics =
            serde_json::from_str(include_str!("../messages/metrics.json")).unwrap();
        m.cell = Some("model=gemma-3-270m-instruct-q8_0,max_tokens=4096,concurrency=64".into());
        m.stream = Some(63);
        m.start_ms = Some(123_456.789_012);
        let bytes = serde_json::to_vec(&vec![m; MAX_JOB_RUNS as usize])
            .unwrap()
            .len();
        assert!(bytes < 700 * 1024, "{bytes} bytes");
    }

    fn run(start_ms: f64, ttft: f64, total: f64, tokens: u64, rate: f64) -> Metrics {
        let mut m: Metrics = serde_json::from_str(
            r#"{"repeat_index":0,"warmup":false,"ttft_ms":0,"total_ms":0,"gen_tokens":0,"token_count_source":"engine","streamed_tokens":0,"chunks":0,"output_chars":0}"#,
        )
        .unwrap();
        m.start_ms = Some(start_ms);
        m.ttft_ms = ttft;
        m.total_ms = total;
        m.gen_tokens = tokens;
        m.gen_tokens_per_s = Some(rate);
        m
    }

    #[test]
    fn load_aggregates_against_known_numbers() {
        // Two streams, two requests each, over exactly 2 s: 400 tokens, 4 requests.
        let runs = [
            run(0.0, 100.0, 1000.0, 100, 110.0),
            run(0.0, 200.0, 900.0, 100, 120.0),
            run(1000.0, 50.0, 1000.0, 100, 105.0),
            run(900.0, 300.0, 1000.0, 100, 100.0),
        ];
        let refs: Vec<&Metrics> = runs.iter().collect();
        let l = Load::of(2, &refs, &[10.0, 20.0, 30.0]).unwrap();
        assert_eq!(l.wall_ms, 2000.0);
        assert_eq!(l.output_tokens, 400);
        assert_eq!(l.output_tokens_per_s, 200.0);
        assert_eq!(l.requests_per_s, 2.0);
        assert_eq!(l.ttft_ms.unwrap().p99, 300.0);
        assert_eq!(l.ttft_ms.unwrap().p50, 100.0);
        assert_eq!(l.itl_ms.unwrap().p50, 20.0);
        assert_eq!(l.per_stream_tokens_per_s.unwrap().median, 107.5);
        let slo = Slo {
            ttft_p99_ms: Some(250.0),
        };
        assert!(!slo.met_by(&l));
        let ok = Load::of(1, &refs[..2], &[]).unwrap();
        assert!(slo.met_by(&ok));
        assert_eq!(capacity(&slo, &[(4, &l), (1, &ok), (8, &ok)]), Some(1));
        assert_eq!(capacity(&slo, &[(4, &l)]), None);
        assert!(Load::of(1, &[], &[]).is_none());
    }
}
