//! The regression flag of `GET /api/jobs/{id}`: each machine against its newest earlier job
//! with the **same setup** (same model, shape and cell key, and the same fingerprint when both
//! runs have one), so "this machine got slower" is said only where nothing else changed and the
//! difference is beyond the 95% intervals. A changed fingerprint is `previous`'s to report.

use crate::cells::{cell_machine, cells_of, RunView};
use crate::compare::JobDetail;
use crate::fingerprints::PREVIOUS_SCAN;
use crate::record::JobRecord;
use crate::AppState;
use bench_schemas::{Job, Separation, Shape, Stats, Summary};
use serde::Serialize;
use std::collections::HashMap;

/// Earlier records loaded at most per request while looking (most are in memory).
const REGRESSION_LOADS: usize = 24;

/// One metric of one cell, before (the earlier job) and after (this one).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct RegressionMetric {
    /// The cell key (`""` without a matrix).
    pub cell: String,
    /// `gen_tokens_per_s` (higher is better) or `ttft_ms` (lower is better).
    pub metric: &'static str,
    /// The earlier job's median.
    pub before: f64,
    /// This job's median.
    pub after: f64,
    /// `(after - before) / before` in percent (null when `before` is 0).
    pub pct: Option<f64>,
    /// The two medians' 95% intervals are separated.
    pub exceeds_ci: bool,
    /// The direction is the worse one.
    pub worse: bool,
}

/// A machine against its newest earlier job with the same setup.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Regression {
    /// That job.
    pub job_id: String,
    /// When it was created (unix ms).
    pub created_ms: u64,
    /// Some metric is worse beyond the intervals.
    pub regressed: bool,
    /// Each metric of each cell both have.
    pub metrics: Vec<RegressionMetric>,
}

/// What one cell of one run measured, and on what.
#[derive(Debug, Clone)]
struct CellSetup {
    key: String,
    model: String,
    shape: Shape,
    fingerprint_id: Option<String>,
    summary: Summary,
}

fn setups(job: Option<&Job>, v: &RunView) -> Vec<CellSetup> {
    cells_of(job)
        .iter()
        .filter_map(|cell| {
            let cm = cell_machine(job, cell, v);
            Some(CellSetup {
                key: cell.key.clone(),
                model: cell.job.model.clone(),
                shape: cell.job.shape(),
                fingerprint_id: cm.fingerprint_id,
                summary: cm.summary?,
            })
        })
        .collect()
}

fn same_setup(a: &CellSetup, b: &CellSetup) -> bool {
    a.key == b.key
        && a.model == b.model
        && a.shape == b.shape
        && match (&a.fingerprint_id, &b.fingerprint_id) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        }
}

/// The metrics of every cell `now` and `before` both measured with the same setup.
fn compare(now: &[CellSetup], before: &[CellSetup]) -> Vec<RegressionMetric> {
    let mut out = Vec::new();
    for n in now {
        let Some(b) = before.iter().find(|b| same_setup(n, b)) else {
            continue;
        };
        let metrics: [(&'static str, Option<Stats>, Option<Stats>, bool); 2] = [
            (
                "gen_tokens_per_s",
                b.summary.gen_tokens_per_s,
                n.summary.gen_tokens_per_s,
                true,
            ),
            ("ttft_ms", b.summary.ttft_ms, n.summary.ttft_ms, false),
        ];
        for (metric, before, after, higher_better) in metrics {
            let (Some(before), Some(after)) = (before, after) else {
                continue;
            };
            if !(before.median.is_finite() && after.median.is_finite()) {
                continue;
            }
            let pct = (before.median != 0.0)
                .then(|| (after.median - before.median) / before.median * 100.0);
            out.push(RegressionMetric {
                cell: n.key.clone(),
                metric,
                before: before.median,
                after: after.median,
                pct,
                exceeds_ci: Separation::of(&before, &after).separated,
                worse: if higher_better {
                    after.median < before.median
                } else {
                    after.median > before.median
                },
            });
        }
    }
    out
}

/// Fills each machine's `regression`: the newest job created before this one (among the
/// [`PREVIOUS_SCAN`] before it) that ran on the machine with the same setup in some cell.
pub async fn regression(state: &AppState, d: &mut JobDetail) {
    let now: Vec<Vec<CellSetup>> = d
        .machines
        .iter()
        .map(|m| setups(d.job.as_ref(), &RunView::of_detail(m)))
        .collect();
    if now.iter().all(Vec::is_empty) {
        return;
    }
    let (earlier, _) = state.index.list(PREVIOUS_SCAN, Some(d.created_ms));
    let mut loaded: HashMap<String, Option<JobRecord>> = HashMap::new();
    for (i, setup) in now.iter().enumerate() {
        if setup.is_empty() {
            continue;
        }
        let mid = d.machines[i].machine_id.clone();
        for item in earlier
            .iter()
            .filter(|j| j.job_id != d.job_id && j.machines.contains(&mid))
        {
            if !loaded.contains_key(&item.job_id) {
                if loaded.len() >= REGRESSION_LOADS {
                    break;
                }
                let r = state.record(&item.job_id).await.ok().flatten();
                loaded.insert(item.job_id.clone(), r);
            }
            let Some(Some(r)) = loaded.get(&item.job_id) else {
                continue;
            };
            let Some(m) = r.machine(&mid) else {
                continue;
            };
            let metrics = compare(setup, &setups(r.job.as_ref(), &RunView::of_run(m)));
            if metrics.is_empty() {
                continue;
            }
            d.machines[i].regression = Some(Regression {
                job_id: r.job_id.clone(),
                created_ms: r.created_ms,
                regressed: metrics.iter().any(|m| m.worse && m.exceeds_ci),
                metrics,
            });
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(key: &str, fp: Option<&str>, rates: &[f64]) -> CellSetup {
        CellSetup {
            key: key.into(),
            model: "m".into(),
            shape: Job::new("m", "p").shape(),
            fingerprint_id: fp.map(str::to_string),
            summary: Summary {
                repeats: rates.len() as u32,
                gen_tokens_per_s: Stats::from_samples(rates.iter().copied()),
                ttft_ms: Stats::from_samples(rates.iter().map(|r| 1000.0 / r)),
                ..Summary::default()
            },
        }
    }

    #[test]
    fn slower_beyond_the_intervals_is_a_regression_and_a_new_fingerprint_is_not() {
        let fast = [50.0, 50.5, 51.0, 51.5, 52.0, 52.5];
        let slow = [40.0, 40.5, 41.0, 41.5, 42.0, 42.5];
        let m = compare(
            &[setup("", Some("fp1"), &slow)],
            &[setup("", Some("fp1"), &fast)],
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].metric, "gen_tokens_per_s");
        assert!(m[0].worse && m[0].exceeds_ci);
        assert!((m[0].pct.unwrap() - (41.25 - 51.25) / 51.25 * 100.0).abs() < 1e-9);
        assert_eq!(m[1].metric, "ttft_ms");
        assert!(m[1].worse, "a longer TTFT is worse");
        // Another fingerprint, another cell, another model: nothing to compare.
        assert!(compare(
            &[setup("", Some("fp2"), &slow)],
            &[setup("", Some("fp1"), &fast)]
        )
        .is_empty());
        assert!(compare(&[setup("a", None, &slow)], &[setup("b", None, &fast)]).is_empty());
        let mut other = setup("", None, &fast);
        other.model = "x".into();
        assert!(compare(&[setup("", None, &slow)], &[other]).is_empty());
        // Faster, or within the noise: not regressed.
        let m = compare(&[setup("", None, &fast)], &[setup("", None, &slow)]);
        assert!(!m[0].worse && m[0].exceeds_ci);
        let m = compare(
            &[setup("", None, &fast[..3])],
            &[setup("", None, &slow[..3])],
        );
        assert!(!m[0].exceeds_ci, "no interval below 6 runs");
    }
}
