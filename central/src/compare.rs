//! The comparison: per machine, its runs and summary; a ranking by median decode tokens/s; and
//! deltas against a baseline machine chosen per request. Also the CSV export.

use crate::error::{ApiError, ErrorInfo};
use crate::record::{JobRecord, JobStatus, RunStatus, Source};
use crate::registry::Registry;
use bench_schemas::{Job, Metrics, Stats, Summary};
use serde::Serialize;

/// One machine in `GET /api/jobs/{id}`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct MachineDetail {
    /// The machine.
    pub machine_id: String,
    /// machines.yaml label, else the agent's.
    pub label: String,
    /// Backend kind.
    pub engine: Option<String>,
    /// queued, running, done, failed, cancelled.
    pub status: RunStatus,
    /// Text of the last measured repeat so far.
    pub output_text: String,
    /// Every finished run, warmups flagged.
    pub repeats: Vec<Metrics>,
    /// Over the measured runs.
    pub summary: Option<Summary>,
    /// Why it failed.
    pub error: Option<ErrorInfo>,
    /// Last event seq applied.
    pub last_seq: u64,
    /// The run shown (`<boot_id>-<n>`).
    pub run_id: String,
    /// Sequence numbers of this run never received (should stay 0).
    pub gaps: u64,
    /// Earlier runs of the job on this machine, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub earlier_runs: Vec<crate::record::EarlierRun>,
    /// Re-submissions this machine refused after running the job.
    pub refusals: u32,
    /// The last such refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<ErrorInfo>,
}

/// Percent differences against the baseline's medians.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Delta {
    /// Decode rate.
    pub gen_tokens_per_s_pct: Option<f64>,
    /// Time to first token.
    pub ttft_ms_pct: Option<f64>,
    /// Total time.
    pub total_ms_pct: Option<f64>,
}

/// One ranking row.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Rank {
    /// 1 = fastest decode.
    pub rank: u32,
    /// The machine.
    pub machine_id: String,
    /// Decode rate over the measured repeats.
    pub gen_tokens_per_s: Stats,
    /// TTFT.
    pub ttft_ms: Option<Stats>,
    /// Total time.
    pub total_ms: Option<Stats>,
    /// Against the baseline, when one was chosen.
    pub delta_vs_baseline: Option<Delta>,
    /// Rank 1 only: its [min,max] does not overlap the runner-up's.
    pub clear_winner: bool,
}

/// `GET /api/jobs/{id}`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct JobDetail {
    /// The job.
    pub job_id: String,
    /// Unix ms.
    pub created_ms: u64,
    /// Over all machines.
    pub status: JobStatus,
    /// central or external.
    pub source: Source,
    /// As submitted.
    pub job: Option<Job>,
    /// Each machine.
    pub machines: Vec<MachineDetail>,
    /// Fastest first.
    pub ranking: Vec<Rank>,
    /// The baseline, if chosen.
    pub baseline: Option<String>,
}

fn pct(value: Option<f64>, base: Option<f64>) -> Option<f64> {
    match (value, base) {
        (Some(v), Some(b)) if b != 0.0 && v.is_finite() && b.is_finite() => {
            Some((v - b) / b * 100.0)
        }
        _ => None,
    }
}

/// The ranking of machines that have a measured decode rate.
pub fn ranking(machines: &[MachineDetail], baseline: Option<&str>) -> Vec<Rank> {
    let median = |s: &Option<Stats>| s.map(|s| s.median);
    let base = baseline
        .and_then(|b| machines.iter().find(|m| m.machine_id == b))
        .and_then(|m| m.summary.as_ref());
    let mut rows: Vec<Rank> = machines
        .iter()
        .filter_map(|m| {
            let s = m.summary.as_ref()?;
            Some(Rank {
                rank: 0,
                machine_id: m.machine_id.clone(),
                gen_tokens_per_s: s.gen_tokens_per_s?,
                ttft_ms: s.ttft_ms,
                total_ms: s.total_ms,
                delta_vs_baseline: base.map(|b| Delta {
                    gen_tokens_per_s_pct: pct(
                        median(&s.gen_tokens_per_s),
                        median(&b.gen_tokens_per_s),
                    ),
                    ttft_ms_pct: pct(median(&s.ttft_ms), median(&b.ttft_ms)),
                    total_ms_pct: pct(median(&s.total_ms), median(&b.total_ms)),
                }),
                clear_winner: false,
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        b.gen_tokens_per_s
            .median
            .total_cmp(&a.gen_tokens_per_s.median)
            .then_with(|| a.machine_id.cmp(&b.machine_id))
    });
    for (i, r) in rows.iter_mut().enumerate() {
        r.rank = i as u32 + 1;
    }
    if rows.len() >= 2 {
        // One repeat has no spread to compare the gap with: no verdict.
        let (a, b) = (&rows[0].gen_tokens_per_s, &rows[1].gen_tokens_per_s);
        rows[0].clear_winner = a.n >= 2 && b.n >= 2 && a.min > b.max;
    }
    rows
}

/// The document for `GET /api/jobs/{id}?baseline=`.
pub fn detail(
    r: &JobRecord,
    registry: &Registry,
    baseline: Option<&str>,
) -> Result<JobDetail, ApiError> {
    if let Some(b) = baseline {
        if r.machine(b).is_none() {
            return Err(ApiError::UnknownMachine(b.to_string()));
        }
    }
    let machines: Vec<MachineDetail> = r
        .machines
        .iter()
        .map(|m| MachineDetail {
            machine_id: m.machine_id.clone(),
            label: registry
                .label(&m.machine_id)
                .or_else(|| m.label.clone())
                .unwrap_or_else(|| m.machine_id.clone()),
            engine: m.engine.clone(),
            status: m.status,
            output_text: m.text().to_string(),
            repeats: m.repeats.clone(),
            summary: m.summary.clone(),
            error: m.error.clone(),
            last_seq: m.last_seq,
            run_id: m.run_id.clone(),
            gaps: m.gaps,
            earlier_runs: m.earlier_runs.clone(),
            refusals: m.refusals,
            refused: m.refused.clone(),
        })
        .collect();
    Ok(JobDetail {
        job_id: r.job_id.clone(),
        created_ms: r.created_ms,
        status: r.status,
        source: r.source,
        job: r.job.clone(),
        ranking: ranking(&machines, baseline),
        machines,
        baseline: baseline.map(str::to_string),
    })
}

/// Header of the CSV export.
pub const CSV_HEADER: &str = "job_id,machine_id,label,engine,model,repeat_index,warmup,ttft_ms,total_ms,gen_tokens,gen_tokens_per_s,tpot_ms,prompt_tokens,token_count_source";

fn csv_field(s: &str) -> String {
    // A cell starting with = + - @ is a formula to a spreadsheet: neutralise it.
    if s.starts_with(['=', '+', '-', '@']) {
        return csv_field(&format!("'{s}"));
    }
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One row per machine and repeat.
pub fn csv(d: &JobDetail) -> String {
    let model = d.job.as_ref().map(|j| j.model.as_str()).unwrap_or("");
    let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for m in &d.machines {
        for r in &m.repeats {
            let source = serde_json::to_value(r.token_count_source)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let row = [
                csv_field(&d.job_id),
                csv_field(&m.machine_id),
                csv_field(&m.label),
                csv_field(m.engine.as_deref().unwrap_or("")),
                csv_field(model),
                r.repeat_index.to_string(),
                r.warmup.to_string(),
                r.ttft_ms.to_string(),
                r.total_ms.to_string(),
                r.gen_tokens.to_string(),
                opt(r.gen_tokens_per_s),
                opt(r.tpot_ms),
                r.prompt_tokens.map(|p| p.to_string()).unwrap_or_default(),
                source,
            ];
            out.push_str(&row.join(","));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, rates: &[f64]) -> MachineDetail {
        let stats = Stats::from_samples(rates.iter().copied());
        MachineDetail {
            machine_id: id.into(),
            label: id.into(),
            engine: None,
            status: RunStatus::Done,
            output_text: String::new(),
            repeats: vec![],
            summary: Some(Summary {
                repeats: rates.len() as u32,
                gen_tokens_per_s: stats,
                ttft_ms: Stats::from_samples([10.0]),
                ..Default::default()
            }),
            error: None,
            last_seq: 0,
            run_id: String::new(),
            gaps: 0,
            earlier_runs: vec![],
            refusals: 0,
            refused: None,
        }
    }

    #[test]
    fn ranks_by_median_rate_with_deltas() {
        let ms = vec![
            machine("slow", &[10.0, 11.0, 12.0]),
            machine("fast", &[20.0, 21.0, 22.0]),
            machine("none", &[]),
        ];
        let single = ranking(&[machine("a", &[30.0]), machine("b", &[10.0])], None);
        assert!(
            !single[0].clear_winner,
            "one repeat each: no spread, no verdict"
        );
        let r = ranking(&ms, Some("slow"));
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].machine_id.as_str(), r[0].rank, r[0].clear_winner),
            ("fast", 1, true)
        );
        let d = r[0].delta_vs_baseline.unwrap();
        assert!((d.gen_tokens_per_s_pct.unwrap() - 90.909).abs() < 0.01);
        assert_eq!(d.ttft_ms_pct, Some(0.0));
        let overlap = ranking(
            &[machine("a", &[10.0, 30.0]), machine("b", &[20.0, 25.0])],
            None,
        );
        assert!(!overlap[0].clear_winner);
        assert!(overlap[0].delta_vs_baseline.is_none());
    }

    #[test]
    fn csv_quotes() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("@cmd"), "'@cmd");
    }
}
