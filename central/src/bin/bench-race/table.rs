//! What `bench-race` prints: a llama-bench-like results table (one row per machine x cell),
//! the comparison of jobs, and the fleet. Markdown (comfy-table), CSV or JSON.
//!
//! Every table is built from central's documents as JSON (`GET /api/jobs/{id}`,
//! `/api/compare`, `/api/machines`); `--nats` builds the same job document with central's own
//! library, so both paths print the same table.

use crate::args::Output;
use anyhow::Result;
use bench_schemas::Job;
use comfy_table::presets::ASCII_MARKDOWN;
use comfy_table::{CellAlignment, ContentArrangement, Table};
use serde::Serialize;
use serde_json::Value;

/// One results row: one machine in one cell.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Row {
    /// The machine.
    pub machine_id: String,
    /// Its label.
    pub label: String,
    /// The cell's model.
    pub model: String,
    /// The cell key (empty without a matrix).
    pub cell: String,
    /// llama-bench-like test name (`pp512-tg128`, `tg64`, `gen128 c4`).
    pub test: String,
    /// done, failed, running, pending, cancelled.
    pub status: String,
    /// Why it failed (`code: message`).
    pub error: Option<String>,
    /// Measured runs (requests of a load cell).
    pub n: Option<u64>,
    /// Median decode rate (per stream in a load cell), tokens/s.
    pub tokens_per_s: Option<f64>,
    /// Its standard deviation.
    pub tokens_per_s_stdev: Option<f64>,
    /// Its 95% interval.
    pub tokens_per_s_ci_low: Option<f64>,
    /// Its 95% interval.
    pub tokens_per_s_ci_high: Option<f64>,
    /// Median TTFT, ms.
    pub ttft_ms: Option<f64>,
    /// Median prompt processing rate, tokens/s.
    pub pp_tokens_per_s: Option<f64>,
    /// Load: streams.
    pub concurrency: Option<u64>,
    /// Load: total output tokens/s.
    pub output_tokens_per_s: Option<f64>,
    /// Load: requests/s.
    pub requests_per_s: Option<f64>,
    /// Load: TTFT p99, ms.
    pub ttft_p99_ms: Option<f64>,
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn error_of(v: &Value) -> Option<String> {
    let code = v["code"].as_str()?;
    Some(match v["message"].as_str() {
        Some(m) if !m.is_empty() => format!("{code}: {m}"),
        _ => code.to_string(),
    })
}

/// llama-bench's test name for a cell's job.
fn test_name(j: &Job) -> String {
    let shape = j.shape();
    let mut s = match (&j.profile, shape.prompt_tokens) {
        (Some(p), _) => p.clone(),
        (None, Some(pp)) => format!("pp{pp}-tg{}", shape.max_tokens),
        (None, None) if shape.ignore_eos => format!("tg{}", shape.max_tokens),
        (None, None) => format!("gen{}", shape.max_tokens),
    };
    if shape.depth > 0 {
        s.push_str(&format!(" @ d{}", shape.depth));
    }
    if j.is_load() {
        s.push_str(&format!(" c{}", j.concurrency.unwrap_or(1)));
    }
    s
}

/// The rows of a job document: every cell (in the job's order) x every machine.
pub fn rows(detail: &Value) -> Vec<Row> {
    let job: Option<Job> = serde_json::from_value(detail["job"].clone()).ok();
    let cells: Vec<(String, Option<Job>)> = match &job {
        Some(j) => j
            .cells()
            .into_iter()
            .map(|c| (c.key, Some(c.job)))
            .collect(),
        None => vec![(String::new(), None)],
    };
    let machines = detail["machines"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for (key, cell_job) in &cells {
        for m in &machines {
            out.push(row(detail, m, key, cell_job.as_ref()));
        }
    }
    out
}

fn row(detail: &Value, m: &Value, key: &str, job: Option<&Job>) -> Row {
    let id = text(&m["machine_id"]);
    // The machine's own cell result, else the document's view of the cell (before cell_done).
    let result = m["cells"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["cell"] == key))
        .cloned();
    let view = detail["cells"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["cell"] == key))
        .and_then(|c| {
            c["machines"]
                .as_array()?
                .iter()
                .find(|x| x["machine_id"] == id.as_str())
        })
        .cloned();
    let (summary, load, status, error) = match (&result, &view) {
        (Some(r), _) => (
            r["summary"].clone(),
            r["load"].clone(),
            text(&r["status"]),
            error_of(&r["error"]),
        ),
        (None, Some(v)) => (
            v["summary"].clone(),
            v["load"].clone(),
            text(&v["status"]),
            error_of(&v["error"]),
        ),
        (None, None) if key.is_empty() => (
            m["summary"].clone(),
            Value::Null,
            text(&m["status"]),
            error_of(&m["error"]),
        ),
        (None, None) => {
            let machine_status = text(&m["status"]);
            let status = match machine_status.as_str() {
                "failed" | "cancelled" => machine_status,
                "done" => "missing".into(),
                _ => "pending".into(),
            };
            (Value::Null, Value::Null, status, error_of(&m["error"]))
        }
    };
    // A machine that failed as a whole fails its unfinished cells too.
    let status = if status != "done" && status != "failed" && text(&m["status"]) == "failed" {
        "failed".to_string()
    } else {
        status
    };
    let error = error.or_else(|| {
        (status == "failed")
            .then(|| error_of(&m["error"]))
            .flatten()
    });
    let rate = if load.is_object() {
        &load["per_stream_tokens_per_s"]
    } else {
        &summary["gen_tokens_per_s"]
    };
    let n = if load.is_object() {
        load["requests"].as_u64()
    } else {
        summary["repeats"].as_u64()
    };
    let model = job
        .map(|j| j.model.clone())
        .unwrap_or_else(|| text(&detail["job"]["model"]));
    Row {
        machine_id: id.clone(),
        label: m["label"].as_str().unwrap_or(&id).to_string(),
        model,
        cell: key.to_string(),
        test: job.map(test_name).unwrap_or_default(),
        status,
        error,
        n,
        tokens_per_s: num(&rate["median"]),
        tokens_per_s_stdev: num(&rate["stdev"]),
        tokens_per_s_ci_low: num(&rate["ci_low"]),
        tokens_per_s_ci_high: num(&rate["ci_high"]),
        ttft_ms: num(&summary["ttft_ms"]["median"]).or_else(|| num(&load["ttft_ms"]["p50"])),
        pp_tokens_per_s: num(&summary["pp_tokens_per_s"]["median"]),
        concurrency: load["concurrency"].as_u64(),
        output_tokens_per_s: num(&load["output_tokens_per_s"]),
        requests_per_s: num(&load["requests_per_s"]),
        ttft_p99_ms: num(&load["ttft_ms"]["p99"]),
    }
}

fn f(v: Option<f64>, decimals: usize) -> String {
    v.map(|x| format!("{x:.decimals$}")).unwrap_or_default()
}

fn markdown(header: &[&str], body: Vec<Vec<String>>, right: std::ops::Range<usize>) -> String {
    let mut t = Table::new();
    t.load_style(ASCII_MARKDOWN)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for r in body {
        t.add_row(r);
    }
    for i in right {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.to_string()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv(header: &[&str], body: &[Vec<String>]) -> String {
    let mut out = header.join(",");
    out.push('\n');
    for r in body {
        let cells: Vec<String> = r.iter().map(|c| csv_field(c)).collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn opt_num(v: Option<f64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

/// Prints the results of a job.
pub fn print_rows(detail: &Value, rows: &[Row], output: Output) -> Result<()> {
    match output {
        Output::Json => {
            let doc = serde_json::json!({
                "job_id": detail["job_id"],
                "status": detail["status"],
                "rows": rows,
                "ranking": detail["ranking"],
                "sweeps": detail["sweeps"],
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        Output::Csv => {
            let header = [
                "job_id",
                "machine_id",
                "label",
                "model",
                "cell",
                "test",
                "status",
                "error",
                "n",
                "tokens_per_s",
                "tokens_per_s_stdev",
                "tokens_per_s_ci_low",
                "tokens_per_s_ci_high",
                "ttft_ms",
                "pp_tokens_per_s",
                "concurrency",
                "output_tokens_per_s",
                "requests_per_s",
                "ttft_p99_ms",
            ];
            let job_id = text(&detail["job_id"]);
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        job_id.clone(),
                        r.machine_id.clone(),
                        r.label.clone(),
                        r.model.clone(),
                        r.cell.clone(),
                        r.test.clone(),
                        r.status.clone(),
                        r.error.clone().unwrap_or_default(),
                        r.n.map(|n| n.to_string()).unwrap_or_default(),
                        opt_num(r.tokens_per_s),
                        opt_num(r.tokens_per_s_stdev),
                        opt_num(r.tokens_per_s_ci_low),
                        opt_num(r.tokens_per_s_ci_high),
                        opt_num(r.ttft_ms),
                        opt_num(r.pp_tokens_per_s),
                        r.concurrency.map(|n| n.to_string()).unwrap_or_default(),
                        opt_num(r.output_tokens_per_s),
                        opt_num(r.requests_per_s),
                        opt_num(r.ttft_p99_ms),
                    ]
                })
                .collect();
            print!("{}", csv(&header, &body));
        }
        Output::Md => {
            println!("{}", results_markdown(rows));
            let notes = verdicts(detail);
            for n in notes {
                println!("{n}");
            }
        }
    }
    Ok(())
}

/// The results as a Markdown table.
pub fn results_markdown(rows: &[Row]) -> String {
    let with_cell = rows.iter().any(|r| !r.cell.is_empty());
    let with_pp = rows.iter().any(|r| r.pp_tokens_per_s.is_some());
    let with_load = rows.iter().any(|r| r.concurrency.is_some());
    let mut header = vec!["machine", "model"];
    if with_cell {
        header.push("cell");
    }
    header.extend(["test", "n", "t/s", "ttft ms"]);
    if with_pp {
        header.push("pp t/s");
    }
    if with_load {
        header.extend(["out t/s", "req/s", "ttft p99 ms"]);
    }
    header.push("status");
    let body = rows
        .iter()
        .map(|r| {
            let mut c = vec![r.machine_id.clone(), r.model.clone()];
            if with_cell {
                c.push(r.cell.clone());
            }
            let rate = match (r.tokens_per_s, r.tokens_per_s_stdev) {
                (Some(m), Some(s)) => format!("{m:.2} ± {s:.2}"),
                (Some(m), None) => format!("{m:.2}"),
                _ => String::new(),
            };
            c.extend([
                r.test.clone(),
                r.n.map(|n| n.to_string()).unwrap_or_default(),
                rate,
                f(r.ttft_ms, 1),
            ]);
            if with_pp {
                c.push(f(r.pp_tokens_per_s, 2));
            }
            if with_load {
                c.extend([
                    f(r.output_tokens_per_s, 2),
                    f(r.requests_per_s, 2),
                    f(r.ttft_p99_ms, 1),
                ]);
            }
            c.push(match &r.error {
                Some(e) => format!("{} ({e})", r.status),
                None => r.status.clone(),
            });
            c
        })
        .collect();
    let first_num = if with_cell { 4 } else { 3 };
    markdown(&header, body, first_num..header.len() - 1)
}

/// The ranking's verdict (and each sweep's capacity), as lines under the table.
fn verdicts(detail: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let status = text(&detail["status"]);
    out.push(format!("\njob {} {status}", text(&detail["job_id"])));
    if detail["cells"].as_array().is_none_or(|c| c.is_empty()) {
        if let Some(first) = detail["ranking"].as_array().and_then(|r| r.first()) {
            out.push(format!(
                "{}: {}",
                text(&first["machine_id"]),
                text(&first["verdict"])
            ));
        }
    } else {
        for c in detail["cells"].as_array().into_iter().flatten() {
            if let Some(w) = c["winner"].as_str() {
                out.push(format!("[{}] clear winner: {w}", text(&c["cell"])));
            }
        }
    }
    for s in detail["sweeps"].as_array().into_iter().flatten() {
        for m in s["machines"].as_array().into_iter().flatten() {
            let cap = m["capacity"]
                .as_u64()
                .map(|c| format!("capacity {c} streams"))
                .unwrap_or_else(|| "no capacity within the SLO".into());
            let group = text(&s["group"]);
            let group = if group.is_empty() {
                String::new()
            } else {
                format!(" [{group}]")
            };
            if !s["slo"].is_null() {
                out.push(format!("{}{group}: {cap}", text(&m["machine_id"])));
            }
        }
    }
    out
}

/// The metric a compare entry is judged on: the decode rate, else a load's output rate.
fn rate_metric(vs: &Value) -> Option<(&'static str, &Value)> {
    ["gen_tokens_per_s", "output_tokens_per_s"]
        .into_iter()
        .find_map(|k| vs.get(k).filter(|v| v.is_object()).map(|v| (k, v)))
}

fn entry_rate(e: &Value) -> Option<f64> {
    num(&e["summary"]["gen_tokens_per_s"]["median"])
        .or_else(|| num(&e["load"]["output_tokens_per_s"]))
}

/// Prints `/api/compare`.
pub fn print_compare(v: &Value, output: Output) -> Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let header = [
        "machine",
        "cell",
        "job",
        "t/s",
        "Δ t/s",
        "Δ %",
        "ratio",
        "beyond CI",
        "ttft ms",
        "Δ ttft %",
        "ttft beyond CI",
        "changes",
    ];
    let mut body = Vec::new();
    for g in v["groups"].as_array().into_iter().flatten() {
        for e in g["entries"].as_array().into_iter().flatten() {
            let vs = &e["vs_baseline"];
            let mut row = vec![
                text(&e["machine_id"]),
                text(&e["cell"]),
                text(&e["job_id"]),
                f(entry_rate(e), 2),
            ];
            match rate_metric(vs) {
                Some((_, d)) => row.extend([
                    f(num(&d["delta"]), 2),
                    f(num(&d["pct"]), 1),
                    f(num(&d["ratio"]), 3),
                    yes_no(&d["exceeds_ci"], &d["worse"]),
                ]),
                None if vs.is_null() => row.extend([
                    "baseline".into(),
                    String::new(),
                    String::new(),
                    String::new(),
                ]),
                None => row.extend([String::new(), String::new(), String::new(), String::new()]),
            }
            row.push(f(num(&e["summary"]["ttft_ms"]["median"]), 1));
            let t = &vs["ttft_ms"];
            row.push(f(num(&t["pct"]), 1));
            row.push(if t.is_object() {
                yes_no(&t["exceeds_ci"], &t["worse"])
            } else {
                String::new()
            });
            let changes: Vec<String> = e["changes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| text(&c["field"]))
                .collect();
            row.push(changes.join(" "));
            body.push(row);
        }
    }
    match output {
        Output::Csv => print!("{}", csv(&header, &body)),
        _ => {
            println!("{}", markdown(&header, body, 3..header.len() - 1));
            println!("\nbaseline: {}", text(&v["baseline"]));
        }
    }
    Ok(())
}

fn yes_no(exceeds: &Value, worse: &Value) -> String {
    let dir = if worse == true { "worse" } else { "better" };
    if exceeds == true {
        format!("yes ({dir})")
    } else {
        "no".into()
    }
}

/// Entries of `/api/compare` whose rate is below the baseline's by more than `pct` percent,
/// in words.
pub fn slower_than(v: &Value, pct: f64) -> Vec<String> {
    let mut out = Vec::new();
    for g in v["groups"].as_array().into_iter().flatten() {
        for e in g["entries"].as_array().into_iter().flatten() {
            let Some((metric, d)) = rate_metric(&e["vs_baseline"]) else {
                continue;
            };
            let Some(p) = num(&d["pct"]) else { continue };
            if p < -pct {
                let cell = text(&e["cell"]);
                let cell = if cell.is_empty() {
                    String::new()
                } else {
                    format!(" [{cell}]")
                };
                out.push(format!(
                    "{}{cell}: {metric} {:.2} vs {:.2} in the baseline ({p:+.1}%{})",
                    text(&e["machine_id"]),
                    num(&d["value"]).unwrap_or(f64::NAN),
                    num(&d["baseline"]).unwrap_or(f64::NAN),
                    if d["exceeds_ci"] == true {
                        ", beyond the 95% intervals"
                    } else {
                        ""
                    }
                ));
            }
        }
    }
    out
}

/// Prints `/api/machines`.
pub fn print_machines(v: &Value, output: Output) -> Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let header = [
        "machine",
        "label",
        "status",
        "engine",
        "models",
        "current job",
        "last seen s ago",
    ];
    let now = bench_central::now_ms();
    let body: Vec<Vec<String>> = v["machines"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let models: Vec<String> = m["models"]
                .as_array()
                .into_iter()
                .flatten()
                .map(text)
                .collect();
            vec![
                text(&m["machine_id"]),
                text(&m["label"]),
                text(&m["status"]),
                text(&m["engine"]),
                models.join(" "),
                text(&m["current_job"]),
                m["last_seen_ms"]
                    .as_u64()
                    .map(|t| format!("{:.1}", now.saturating_sub(t) as f64 / 1000.0))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    match output {
        Output::Csv => print!("{}", csv(&header, &body)),
        _ => println!("{}", markdown(&header, body, 6..7)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_of_a_plain_and_a_matrix_job() {
        let stats = json!({"n": 3, "median": 50.0, "mean": 50.0, "stdev": 1.5, "min": 48.0, "max": 52.0, "ci_low": null, "ci_high": null});
        let d = json!({"job_id": "j", "status": "done",
            "job": {"model": "m", "prompt": "p", "max_tokens": 16},
            "machines": [
                {"machine_id": "a", "label": "A", "status": "done", "summary": {"repeats": 3, "gen_tokens_per_s": stats, "ttft_ms": stats}},
                {"machine_id": "b", "label": "B", "status": "failed", "summary": null, "error": {"code": "model_not_found", "message": "no m"}}]});
        let r = rows(&d);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].test.as_str(), r[0].tokens_per_s, r[0].n),
            ("gen16", Some(50.0), Some(3))
        );
        assert_eq!(r[1].error.as_deref(), Some("model_not_found: no m"));
        let md = results_markdown(&r);
        assert!(md.contains("50.00 ± 1.50") && md.contains("| b "), "{md}");

        let load = json!({"concurrency": 2, "requests": 4, "wall_ms": 100.0, "output_tokens": 64,
            "output_tokens_per_s": 640.0, "requests_per_s": 40.0, "ttft_ms": {"p50": 5.0, "p90": 6.0, "p99": 7.0}});
        let d = json!({"job_id": "j", "status": "done",
            "job": {"model": "m", "prompt": "p", "matrix": {"max_tokens": [8, 16], "concurrency": [1, 2]}},
            "machines": [{"machine_id": "a", "status": "done",
                "cells": [{"cell": "max_tokens=8,concurrency=2", "status": "done", "load": load, "stop_reason": "count"}]}]});
        let r = rows(&d);
        assert_eq!(r.len(), 4);
        let c = r
            .iter()
            .find(|r| r.cell == "max_tokens=8,concurrency=2")
            .unwrap();
        assert_eq!(
            (c.test.as_str(), c.ttft_p99_ms, c.concurrency),
            ("gen8 c2", Some(7.0), Some(2))
        );
        assert_eq!(r[0].status, "missing");
    }

    #[test]
    fn slower_entries() {
        let v = json!({"baseline": "A:a", "groups": [{"machine_id": "a", "cell": "", "entries": [
            {"job_id": "A", "machine_id": "a", "cell": "", "vs_baseline": null},
            {"job_id": "B", "machine_id": "a", "cell": "", "vs_baseline": {"gen_tokens_per_s": {"baseline": 100.0, "value": 70.0, "delta": -30.0, "ratio": 0.7, "pct": -30.0, "exceeds_ci": false, "worse": true}}}]}]});
        assert_eq!(slower_than(&v, 20.0).len(), 1);
        assert!(slower_than(&v, 40.0).is_empty());
    }
}
