//! The comparison: per machine, its runs and summary; a ranking by median decode tokens/s; and
//! deltas against a baseline machine chosen per request. Also the CSV export.

use crate::error::{ApiError, ErrorInfo};
use crate::record::{JobRecord, JobStatus, RunStatus, Source};
use crate::registry::Registry;
use bench_schemas::event::StopReason;
use bench_schemas::fingerprint::{Change, Fingerprint};
use bench_schemas::metrics::MIN_CI_SAMPLES;
use bench_schemas::telemetry::MeanPeak;
use bench_schemas::{CellResult, Job, Metrics, Separation, Shape, Stats, Summary};
use serde::Serialize;

/// This machine's fingerprint against the one of its previous job (`GET /api/jobs/{id}` only).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Previous {
    /// The newest earlier job that ran on the machine with a fingerprint.
    pub job_id: String,
    /// When it was created (unix ms).
    pub created_ms: u64,
    /// Its fingerprint id.
    pub fingerprint_id: String,
    /// Same fingerprint id.
    pub same: bool,
    /// What differs from that job to this one (`before` is that job's value).
    pub changes: Vec<Change>,
}

/// One energy ranking row (lower joules per token first).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct EnergyRank {
    /// 1 = least energy per generated token.
    pub rank: u32,
    /// The machine.
    pub machine_id: String,
    /// Over the measured repeats.
    pub joules_per_token: Stats,
    /// Over the measured repeats.
    pub tokens_per_joule: Option<Stats>,
    /// Mean total power per run, over the measured repeats.
    pub power_w: Option<Stats>,
    /// Where the power came from (the last measured run's `telemetry.power_source`).
    pub power_source: Option<String>,
}

/// Energy per token across the racers: ranked only when every racer measured it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Energy {
    /// Every machine with a decode rate has `summary.joules_per_token`.
    pub available: bool,
    /// Why not, when not (`no sensor on <labels>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Least energy per token first (empty when not available).
    pub ranking: Vec<EnergyRank>,
}

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
    /// Why its repeats stopped (once done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReason>,
    /// What it measured (once done).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape: Option<Shape>,
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
    /// What the run measured on (machine, engine, model, settings), newest seen.
    pub fingerprint: Option<Fingerprint>,
    /// Against the machine's previous job with a fingerprint (`GET /api/jobs/{id}` and
    /// `export.json`; null when there is none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<Previous>,
    /// A matrix job: its raw `cell_done` results (empty otherwise).
    pub cells: Vec<CellResult>,
    /// Against the machine's newest earlier job with the same setup (absent when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regression: Option<crate::regression::Regression>,
}

impl MachineDetail {
    /// A machine with nothing but its id and label (the ranking's view of one cell).
    pub fn bare(machine_id: &str, label: &str) -> Self {
        Self {
            machine_id: machine_id.to_string(),
            label: label.to_string(),
            engine: None,
            status: RunStatus::Queued,
            output_text: String::new(),
            repeats: Vec::new(),
            summary: None,
            error: None,
            stop_reason: None,
            shape: None,
            last_seq: 0,
            run_id: String::new(),
            gaps: 0,
            earlier_runs: Vec::new(),
            refusals: 0,
            refused: None,
            fingerprint: None,
            previous: None,
            cells: Vec::new(),
            regression: None,
        }
    }
}

/// Percent differences against the baseline's medians, each with whether it exceeds the 95%
/// intervals (the two intervals are separated: the difference is more than run-to-run noise).
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Delta {
    /// Decode rate.
    pub gen_tokens_per_s_pct: Option<f64>,
    /// Whether the decode rates' intervals separate.
    pub gen_tokens_per_s_exceeds_ci: bool,
    /// Time to first token.
    pub ttft_ms_pct: Option<f64>,
    /// Whether the TTFTs' intervals separate.
    pub ttft_ms_exceeds_ci: bool,
    /// Total time.
    pub total_ms_pct: Option<f64>,
    /// Whether the total times' intervals separate.
    pub total_ms_exceeds_ci: bool,
}

/// One ranking row.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Rank {
    /// 1 = fastest decode (by median).
    pub rank: u32,
    /// The machine.
    pub machine_id: String,
    /// Decode rate over the measured repeats.
    pub gen_tokens_per_s: Stats,
    /// TTFT.
    pub ttft_ms: Option<Stats>,
    /// Total time.
    pub total_ms: Option<Stats>,
    /// Time to the first answer token (after any reasoning).
    pub ttfot_ms: Option<Stats>,
    /// llama-bench's pp (prompt tokens/s).
    pub pp_tokens_per_s: Option<Stats>,
    /// llama-bench's tg (generated tokens/s).
    pub tg_tokens_per_s: Option<Stats>,
    /// Against the baseline, when one was chosen.
    pub delta_vs_baseline: Option<Delta>,
    /// Its decode rate's 95% interval against the next row's; None on the last row.
    pub separation: Option<Separation>,
    /// What the comparison with the next row says, in words.
    pub verdict: String,
    /// Rank 1 only: its decode rate's 95% interval is separated from the runner-up's.
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
    /// Energy per token, where every racer has a power sensor.
    pub energy: Energy,
    /// The baseline, if chosen.
    pub baseline: Option<String>,
    /// A matrix job: each cell's machines, ranking and winner (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cells: Option<Vec<crate::cells::CellView>>,
    /// A matrix job: its concurrency sweeps (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweeps: Option<Vec<crate::cells::Sweep>>,
}

fn pct(value: Option<f64>, base: Option<f64>) -> Option<f64> {
    match (value, base) {
        (Some(v), Some(b)) if b != 0.0 && v.is_finite() && b.is_finite() => {
            Some((v - b) / b * 100.0)
        }
        _ => None,
    }
}

fn exceeds(a: &Option<Stats>, b: &Option<Stats>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if Separation::of(a, b).separated)
}

/// What row `a` against the next row `b` says. Separation is judged on the exact 95%
/// order-statistic interval of each median (schemas `median_ci`), never on min/max or means.
fn verdict(first: bool, a: &Rank, b: &Rank, sep: &Separation) -> String {
    let gap = pct(
        Some(a.gen_tokens_per_s.median),
        Some(b.gen_tokens_per_s.median),
    )
    .unwrap_or(0.0);
    match sep.overlap_pct {
        None => {
            let short: Vec<String> = [a, b]
                .iter()
                .filter(|r| (r.gen_tokens_per_s.n as usize) < MIN_CI_SAMPLES)
                .map(|r| format!("{} has {}", r.machine_id, r.gen_tokens_per_s.n))
                .collect();
            format!(
                "needs {MIN_CI_SAMPLES} repeats per machine for a 95% interval ({}; try repeat \"auto\")",
                short.join(", ")
            )
        }
        Some(_) if sep.separated && first => format!(
            "clear winner: {gap:.1}% faster than {}, 95% intervals separated",
            b.machine_id
        ),
        Some(_) if sep.separated => format!(
            "{gap:.1}% faster than {}, 95% intervals separated",
            b.machine_id
        ),
        Some(o) if first => format!(
            "no clear winner: intervals overlap by {o:.0}% ({} leads {} by {gap:.1}%)",
            a.machine_id, b.machine_id
        ),
        Some(o) => format!(
            "not separated from {}: intervals overlap by {o:.0}%",
            b.machine_id
        ),
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
                ttfot_ms: s.ttfot_ms,
                pp_tokens_per_s: s.pp_tokens_per_s,
                tg_tokens_per_s: s.tg_tokens_per_s,
                delta_vs_baseline: base.map(|b| Delta {
                    gen_tokens_per_s_pct: pct(
                        median(&s.gen_tokens_per_s),
                        median(&b.gen_tokens_per_s),
                    ),
                    gen_tokens_per_s_exceeds_ci: exceeds(&s.gen_tokens_per_s, &b.gen_tokens_per_s),
                    ttft_ms_pct: pct(median(&s.ttft_ms), median(&b.ttft_ms)),
                    ttft_ms_exceeds_ci: exceeds(&s.ttft_ms, &b.ttft_ms),
                    total_ms_pct: pct(median(&s.total_ms), median(&b.total_ms)),
                    total_ms_exceeds_ci: exceeds(&s.total_ms, &b.total_ms),
                }),
                separation: None,
                verdict: String::new(),
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
    let n = rows.len();
    for i in 0..n {
        rows[i].rank = i as u32 + 1;
        if i + 1 < n {
            let sep = Separation::of(&rows[i].gen_tokens_per_s, &rows[i + 1].gen_tokens_per_s);
            rows[i].verdict = verdict(i == 0, &rows[i], &rows[i + 1], &sep);
            rows[i].separation = Some(sep);
        } else if n == 1 {
            rows[i].verdict = "the only machine with a decode rate: nothing to compare".into();
        } else {
            rows[i].verdict = format!("last of {n}");
        }
    }
    if let Some(first) = rows.first_mut() {
        first.clear_winner = first.separation.is_some_and(|s| s.separated);
    }
    rows
}

/// The last measured run's power source.
fn power_source(m: &MachineDetail) -> Option<String> {
    m.repeats
        .iter()
        .rev()
        .filter(|r| !r.warmup && !r.cold)
        .find_map(|r| r.telemetry.as_ref()?.power_source.clone())
}

/// Energy per token of the machines in `ranking` (the racers with a decode rate).
pub fn energy(machines: &[MachineDetail], ranking: &[Rank]) -> Energy {
    let racers: Vec<&MachineDetail> = ranking
        .iter()
        .filter_map(|r| machines.iter().find(|m| m.machine_id == r.machine_id))
        .collect();
    if racers.is_empty() {
        return Energy {
            available: false,
            reason: Some("no measured runs yet".into()),
            ranking: Vec::new(),
        };
    }
    let jpt = |m: &MachineDetail| m.summary.as_ref().and_then(|s| s.joules_per_token);
    let missing: Vec<&str> = racers
        .iter()
        .filter(|m| jpt(m).is_none())
        .map(|m| m.label.as_str())
        .collect();
    if !missing.is_empty() {
        return Energy {
            available: false,
            reason: Some(format!("no sensor on {}", missing.join(", "))),
            ranking: Vec::new(),
        };
    }
    let mut rows: Vec<EnergyRank> = racers
        .iter()
        .filter_map(|m| {
            let s = m.summary.as_ref()?;
            Some(EnergyRank {
                rank: 0,
                machine_id: m.machine_id.clone(),
                joules_per_token: s.joules_per_token?,
                tokens_per_joule: s.tokens_per_joule,
                power_w: s.power_w,
                power_source: power_source(m),
            })
        })
        .collect();
    rows.sort_by(|a, b| {
        a.joules_per_token
            .median
            .total_cmp(&b.joules_per_token.median)
            .then_with(|| a.machine_id.cmp(&b.machine_id))
    });
    for (i, r) in rows.iter_mut().enumerate() {
        r.rank = i as u32 + 1;
    }
    Energy {
        available: true,
        reason: None,
        ranking: rows,
    }
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
            stop_reason: m.stop_reason,
            shape: m.shape,
            last_seq: m.last_seq,
            run_id: m.run_id.clone(),
            gaps: m.gaps,
            earlier_runs: m.earlier_runs.clone(),
            refusals: m.refusals,
            refused: m.refused.clone(),
            fingerprint: m.fingerprint.clone(),
            previous: None,
            cells: m.cells.clone(),
            regression: None,
        })
        .collect();
    let job = r.job.as_ref().filter(|j| crate::cells::is_matrix(Some(j)));
    let (ranking, energy, cells, sweeps) = match job {
        Some(job) => {
            // A matrix job: the top-level ranking and energy are the first cell's.
            let runs: Vec<crate::cells::RunView> = r
                .machines
                .iter()
                .map(crate::cells::RunView::of_run)
                .collect();
            let v = crate::cells::matrix_view(job, &machines, &runs, baseline);
            let ranking = v
                .cells
                .first()
                .map(|c| c.ranking.clone())
                .unwrap_or_default();
            let energy = energy(&v.first, &ranking);
            (ranking, energy, Some(v.cells), Some(v.sweeps))
        }
        None => {
            let ranking = ranking(&machines, baseline);
            let energy = energy(&machines, &ranking);
            (ranking, energy, None, None)
        }
    };
    Ok(JobDetail {
        job_id: r.job_id.clone(),
        created_ms: r.created_ms,
        status: r.status,
        source: r.source,
        job: r.job.clone(),
        energy,
        ranking,
        machines,
        baseline: baseline.map(str::to_string),
        cells,
        sweeps,
    })
}

/// Header of the CSV export: the original columns first (their places unchanged), then the
/// fidelity ones and the job's shape, then the machine's fingerprint (the same on each of its
/// rows) and the run's telemetry.
pub const CSV_HEADER: &str = "job_id,machine_id,label,engine,model,repeat_index,warmup,ttft_ms,total_ms,gen_tokens,gen_tokens_per_s,tpot_ms,prompt_tokens,token_count_source,cold,ttfot_ms,streamed_tokens,pp_tokens_per_s,tg_tokens_per_s,prompt_evaluated,prompt_cache_hit,short_output,null_reason,profile,job_prompt_tokens,depth,fingerprint_id,cpu,gpu,memory_bytes,os_version,kernel_version,engine_server,engine_version,engine_build,model_digest,model_quantization,model_parameter_count,cpu_pct_mean,cpu_pct_peak,gpu_util_pct_mean,power_w_mean,power_w_peak,energy_j,joules_per_token,tokens_per_joule,power_source,cell,stream,start_ms";

/// A number as a CSV cell: empty when it is not finite (NaN, infinity) or missing.
fn num_cell(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite())
        .map(|x| x.to_string())
        .unwrap_or_default()
}

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

/// The fingerprint columns of a machine's rows (empty cells without one).
fn fingerprint_cells(fp: Option<&Fingerprint>) -> [String; 12] {
    let Some(f) = fp else {
        return Default::default();
    };
    let (h, e, m) = (&f.hardware, &f.engine, &f.model);
    let text = |v: &Option<String>| csv_field(v.as_deref().unwrap_or(""));
    let gpus: Vec<&str> = h.gpus.iter().map(|g| g.name.as_str()).collect();
    [
        csv_field(&f.fingerprint_id),
        csv_field(&h.cpu),
        csv_field(&gpus.join("+")),
        h.memory_bytes.to_string(),
        text(&h.os_version),
        text(&h.kernel_version),
        text(&e.server),
        text(&e.version),
        text(&e.build),
        text(&m.digest),
        text(&m.quantization),
        m.parameter_count.map(|n| n.to_string()).unwrap_or_default(),
    ]
}

/// One row per machine and repeat.
pub fn csv(d: &JobDetail) -> String {
    let model = d.job.as_ref().map(|j| j.model.as_str()).unwrap_or("");
    let profile = d
        .job
        .as_ref()
        .and_then(|j| j.profile.as_deref())
        .unwrap_or("");
    let shape = d.job.as_ref().map(Job::shape);
    let job_prompt_tokens = shape
        .and_then(|s| s.prompt_tokens)
        .map(|n| n.to_string())
        .unwrap_or_default();
    let depth = shape.map(|s| s.depth.to_string()).unwrap_or_default();
    let int = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_default();
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for m in &d.machines {
        let fp = fingerprint_cells(m.fingerprint.as_ref());
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
                num_cell(Some(r.ttft_ms)),
                num_cell(Some(r.total_ms)),
                r.gen_tokens.to_string(),
                num_cell(r.gen_tokens_per_s),
                num_cell(r.tpot_ms),
                int(r.prompt_tokens),
                source,
                r.cold.to_string(),
                num_cell(r.ttfot_ms),
                r.streamed_tokens.to_string(),
                num_cell(r.pp_tokens_per_s),
                num_cell(r.tg_tokens_per_s),
                int(r.prompt_evaluated),
                r.prompt_cache_hit.to_string(),
                r.short_output.to_string(),
                csv_field(r.null_reason.as_deref().unwrap_or("")),
                csv_field(profile),
                job_prompt_tokens.clone(),
                depth.clone(),
            ];
            let t = r.telemetry.as_ref();
            let mean_peak =
                |f: fn(&bench_schemas::telemetry::TelemetrySummary) -> Option<MeanPeak>| {
                    let v = t.and_then(f);
                    [num_cell(v.map(|v| v.mean)), num_cell(v.map(|v| v.peak))]
                };
            let [cpu_mean, cpu_peak] = mean_peak(|t| t.cpu_pct);
            let [gpu_mean, _] = mean_peak(|t| t.gpu_util_pct);
            let [power_mean, power_peak] = mean_peak(|t| t.power_w);
            let telemetry = [
                cpu_mean,
                cpu_peak,
                gpu_mean,
                power_mean,
                power_peak,
                num_cell(t.and_then(|t| t.energy_j)),
                num_cell(t.and_then(|t| t.joules_per_token)),
                num_cell(t.and_then(|t| t.tokens_per_joule)),
                csv_field(t.and_then(|t| t.power_source.as_deref()).unwrap_or("")),
            ];
            let run_cells = [
                csv_field(r.cell.as_deref().unwrap_or("")),
                r.stream.map(|s| s.to_string()).unwrap_or_default(),
                num_cell(r.start_ms),
            ];
            let row: Vec<&str> = row
                .iter()
                .chain(fp.iter())
                .chain(telemetry.iter())
                .chain(run_cells.iter())
                .map(String::as_str)
                .collect();
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
            status: RunStatus::Done,
            summary: Some(Summary {
                repeats: rates.len() as u32,
                gen_tokens_per_s: stats,
                ttft_ms: Stats::from_samples([10.0]),
                ..Default::default()
            }),
            ..MachineDetail::bare(id, id)
        }
    }

    #[test]
    fn a_winner_only_where_the_95_percent_intervals_separate() {
        // Three repeats each, ranges far apart: the old min/max rule called a winner; an
        // interval of the median needs 6 samples, so now it says what it needs.
        let three = ranking(
            &[
                machine("slow", &[10.0, 11.0, 12.0]),
                machine("fast", &[20.0, 21.0, 22.0]),
                machine("none", &[]),
            ],
            Some("slow"),
        );
        assert_eq!(three.len(), 2);
        assert_eq!((three[0].machine_id.as_str(), three[0].rank), ("fast", 1));
        assert!(!three[0].clear_winner);
        assert_eq!(
            three[0].separation,
            Some(Separation {
                separated: false,
                overlap_pct: None
            })
        );
        assert!(
            three[0]
                .verdict
                .starts_with("needs 6 repeats per machine for a 95% interval"),
            "{}",
            three[0].verdict
        );
        assert!(three[0].verdict.contains("fast has 3"));
        let d = three[0].delta_vs_baseline.unwrap();
        assert!((d.gen_tokens_per_s_pct.unwrap() - 90.909).abs() < 0.01);
        assert!(
            !d.gen_tokens_per_s_exceeds_ci,
            "no interval, nothing exceeds it"
        );
        assert_eq!(d.ttft_ms_pct, Some(0.0));
        assert_eq!(three[1].separation, None);
        assert_eq!(three[1].verdict, "last of 2");

        // Six repeats each with separated intervals: a winner, and the delta exceeds them.
        let six = ranking(
            &[
                machine("a", &[10.0, 10.1, 10.2, 10.3, 10.4, 10.5]),
                machine("b", &[11.0, 11.1, 11.2, 11.3, 11.4, 11.5]),
            ],
            Some("a"),
        );
        assert_eq!(six[0].machine_id, "b");
        assert!(six[0].clear_winner);
        assert_eq!(six[0].separation.unwrap().overlap_pct, Some(0.0));
        assert!(
            six[0].verdict.starts_with("clear winner: "),
            "{}",
            six[0].verdict
        );
        assert!(
            six[0]
                .delta_vs_baseline
                .unwrap()
                .gen_tokens_per_s_exceeds_ci
        );

        // Six each, intervals overlapping by half the narrower one: no clear winner, by how much.
        let overlap = ranking(
            &[
                machine("a", &[10.0, 10.1, 10.2, 10.3, 10.4, 10.5]),
                machine("c", &[10.25, 10.35, 10.45, 10.55, 10.65, 10.75]),
            ],
            Some("a"),
        );
        assert_eq!(overlap[0].machine_id, "c");
        assert!(!overlap[0].clear_winner);
        let sep = overlap[0].separation.unwrap();
        assert!(!sep.separated && (sep.overlap_pct.unwrap() - 50.0).abs() < 1e-9);
        assert!(
            overlap[0]
                .verdict
                .starts_with("no clear winner: intervals overlap by 50%"),
            "{}",
            overlap[0].verdict
        );
        assert!(
            !overlap[0]
                .delta_vs_baseline
                .unwrap()
                .gen_tokens_per_s_exceeds_ci
        );

        // One repeat each: no interval, no winner.
        let one = ranking(&[machine("x", &[30.0]), machine("y", &[10.0])], None);
        assert!(!one[0].clear_winner && one[0].delta_vs_baseline.is_none());
        let solo = ranking(&[machine("x", &[30.0])], None);
        assert!(solo[0].verdict.starts_with("the only machine"));
    }

    #[test]
    fn csv_has_the_fidelity_columns_and_no_nan() {
        let mut m = machine("a", &[1.0]);
        let mut run: Metrics =
            serde_json::from_str(include_str!("../../schemas/messages/metrics.json")).unwrap();
        run.ttft_ms = f64::NAN;
        run.gen_tokens_per_s = None;
        run.null_reason = Some("no token generated".into());
        run.short_output = true;
        m.repeats = vec![run];
        let mut job = Job::new("m", "");
        job.profile = Some("pp512-tg128".into());
        job.depth = 64;
        let d = JobDetail {
            job_id: "j".into(),
            created_ms: 0,
            status: JobStatus::Done,
            source: Source::Central,
            job: Some(job),
            machines: vec![m],
            ranking: vec![],
            energy: energy(&[], &[]),
            baseline: None,
            cells: None,
            sweeps: None,
        };
        let text = csv(&d);
        let lines: Vec<&str> = text.lines().collect();
        let head: Vec<&str> = lines[0].split(',').collect();
        let row: Vec<&str> = lines[1].split(',').collect();
        assert_eq!(head.len(), row.len());
        let cell = |name: &str| row[head.iter().position(|h| *h == name).unwrap()];
        assert_eq!(cell("ttft_ms"), "");
        assert_eq!(cell("gen_tokens_per_s"), "");
        assert_eq!(cell("null_reason"), "no token generated");
        assert_eq!(cell("short_output"), "true");
        assert_eq!(cell("cold"), "false");
        assert_eq!(cell("pp_tokens_per_s"), "310.1");
        assert_eq!(cell("streamed_tokens"), "156");
        assert_eq!(
            (cell("profile"), cell("job_prompt_tokens"), cell("depth")),
            ("pp512-tg128", "512", "64")
        );
        assert!(!text.contains("NaN") && !text.contains("inf"));
    }

    #[test]
    fn csv_quotes() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("@cmd"), "'@cmd");
    }
}
