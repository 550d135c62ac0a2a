//! The "done when" on real parts: a matrix of two output lengths crossed with a
//! concurrency sweep [1,2,4], raced by an agent on the real llama-server (gemma-3-270m, four
//! slots) and a mock agent, submitted through central; central's cells, sweeps, capacity and
//! CSV rows per machine x cell x repeat.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

/// A sweep of 6 cells on a 2-core machine: well under this.
const SWEEP_WAIT: Duration = Duration::from_secs(300);

fn cell<'a>(job: &'a Value, key: &str) -> &'a Value {
    job["cells"]
        .as_array()
        .expect("cells")
        .iter()
        .find(|c| c["cell"] == key)
        .unwrap_or_else(|| panic!("cell {key} in {:#}", job["cells"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matrix_with_a_concurrency_sweep_on_the_real_engine() {
    let fleet = LlamaRace::start("telemetry:\n  enabled: false\n", 400.0).await;
    let base = fleet.central.base();

    let (s, out) = post(
        &base,
        "/api/jobs",
        &json!({"machines": ["llama", "mock"], "model": ENGINE_MODEL, "prompt": "The capital of France is",
                "num_ctx": 2048, "repeat": 2, "warmup": 1,
                "matrix": {"max_tokens": [8, 16], "concurrency": [1, 2, 4]},
                "slo": {"ttft_p99_ms": 60000}}),
    )
    .await;
    assert_eq!(s, 201, "{out}");
    let job_id = out["job_id"].as_str().unwrap().to_string();
    let path = format!("/api/jobs/{job_id}");
    let job = within("the sweep finishes", SWEEP_WAIT, async {
        loop {
            let (status, v) = get(&base, &path).await;
            if status == 200 && v["status"] != "running" {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert_eq!(job["status"], "done", "{job:#}");

    let keys: Vec<&str> = job["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cell"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "max_tokens=8,concurrency=1",
            "max_tokens=8,concurrency=2",
            "max_tokens=8,concurrency=4",
            "max_tokens=16,concurrency=1",
            "max_tokens=16,concurrency=2",
            "max_tokens=16,concurrency=4"
        ]
    );
    for key in &keys {
        let c = cell(&job, key);
        let conc: u64 = c["values"]["concurrency"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let max_tokens: u64 = c["values"]["max_tokens"].as_str().unwrap().parse().unwrap();
        for id in ["llama", "mock"] {
            let m = machine_in(c, id);
            assert_eq!(m["status"], "done", "{key} {id}: {m:#}");
            let load = &m["load"];
            assert_eq!(load["concurrency"], conc, "{key} {id}");
            assert_eq!(load["requests"], 2 * conc, "{key} {id}");
            assert!(load["output_tokens_per_s"].as_f64().unwrap() > 0.0);
            assert!(load["ttft_ms"]["p99"].as_f64().unwrap() > 0.0);
            // Free prompts stop at max_tokens or at the model's end of text, never beyond.
            assert!(
                load["output_tokens"].as_u64().unwrap() <= 2 * conc * max_tokens,
                "{key} {id}: {load}"
            );
        }
    }
    // Four slots: four streams are served at once, so the last of them gets its first token
    // long before one whole request of a single stream is over (queued, it would wait for
    // three).
    let single = machine_in(cell(&job, "max_tokens=16,concurrency=1"), "llama");
    let four = machine_in(cell(&job, "max_tokens=16,concurrency=4"), "llama");
    let one_request_ms = single["summary"]["total_ms"]["median"].as_f64().unwrap();
    let ttft_p99_4 = four["load"]["ttft_ms"]["p99"].as_f64().unwrap();
    assert!(
        ttft_p99_4 < one_request_ms,
        "4 streams on 4 slots: TTFT p99 {ttft_p99_4} ms should be under one request's {one_request_ms} ms"
    );

    // One sweep per output length, a point per concurrency, and a capacity within the SLO.
    let sweeps = job["sweeps"].as_array().expect("sweeps");
    assert_eq!(sweeps.len(), 2, "{sweeps:#?}");
    for sw in sweeps {
        for m in sw["machines"].as_array().unwrap() {
            let points: Vec<u64> = m["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["concurrency"].as_u64().unwrap())
                .collect();
            assert_eq!(points, [1, 2, 4], "{sw:#}");
            assert_eq!(m["capacity"], 4, "{sw:#}");
        }
    }

    // The CSV has one row per machine x cell x repeat, each naming its cell.
    let csv = csv_export(&base, &job_id).await;
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert!(header.contains(&"cell"), "{header:?}");
    let rows: Vec<&str> = lines.collect();
    let total_runs: usize = job["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["repeats"].as_array().unwrap().len())
        .sum();
    assert_eq!(rows.len(), total_runs);
    // Cell keys hold a comma, so the CSV quotes them.
    for key in &keys {
        let quoted = format!("\"{key}\"");
        let n = rows.iter().filter(|r| r.contains(&quoted)).count();
        assert!(n >= 2 * 2, "{key}: {n} rows");
    }
}
